//! Measurements, not pass/fail timing: each prints its figures. They are `#[ignore]`d so the
//! normal suite stays fast; run them with
//! `cargo test --release --test measure -- --ignored --nocapture --test-threads 1`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{rt, wait_for, Cluster};

/// How long reads of a key stop after kill -9 of its owner, seen through the survivors.
/// `KV_FAILOVER_ROUNDS` (default 5) fresh clusters, one kill each.
#[test]
#[ignore]
fn failover_read_gap() {
    let rounds: usize = std::env::var("KV_FAILOVER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    rt().block_on(async {
        let mut gaps = Vec::new();
        for round in 0..rounds {
            let mut c = Cluster::start(3, "").await;
            let key = format!("fo-{round}");
            let owner = c
                .client_all()
                .put(key.as_bytes(), b"v")
                .await
                .expect("put")
                .node_id as usize;
            let survivors: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
            let client = Arc::new(c.client(&survivors));
            // Reads through the survivors, back to back; record the last success before the
            // kill and the first after it.
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let reader = {
                let (client, key, stop) = (client.clone(), key.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut ok_times = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if client.get(key.as_bytes(), false).await.is_ok() {
                            ok_times.push(Instant::now());
                        }
                    }
                    ok_times
                })
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            let killed = Instant::now();
            c.kill9(owner);
            wait_for("a read after the kill", Duration::from_secs(20), || {
                let client = client.clone();
                let key = key.clone();
                async move { client.get(key.as_bytes(), false).await.ok().map(|_| ()) }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let times = reader.await.expect("reader");
            // The longest stretch without a successful read, from just before the kill on.
            let mut gap = Duration::ZERO;
            let window: Vec<&Instant> = times
                .iter()
                .filter(|t| **t + Duration::from_millis(200) >= killed)
                .collect();
            for w in window.windows(2) {
                gap = gap.max(*w[1] - *w[0]);
            }
            println!("round {round}: owner {owner} killed; reads stopped for {gap:?}");
            gaps.push(gap);
        }
        gaps.sort();
        // Nearest-rank percentiles.
        let pct = |p: f64| gaps[((p * gaps.len() as f64).ceil() as usize).clamp(1, gaps.len()) - 1];
        println!(
            "failover read gap over {} rounds: min {:?}, p50 {:?}, p99 {:?}, max {:?}",
            gaps.len(),
            gaps[0],
            pct(0.50),
            pct(0.99),
            gaps[gaps.len() - 1]
        );
    });
}

/// Loads `n` keys with 256 concurrent writers.
async fn load(c: &Cluster, n: u32, value_len: usize) -> Duration {
    let client = Arc::new(c.client_all());
    let t = Instant::now();
    let mut tasks = Vec::new();
    let writers = 256u32;
    for w in 0..writers {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let value = vec![b'v'; value_len];
            let mut i = w;
            while i < n {
                client
                    .put(format!("key-{i:08}").as_bytes(), &value)
                    .await
                    .expect("put");
                i += writers;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    t.elapsed()
}

/// A wiped node holding 100k keys (256-byte values; `KV_REBUILD_KEYS` for more) rebuilt from
/// its peers.
#[test]
#[ignore]
fn rebuild_wiped_node() {
    rt().block_on(async {
        let n: u32 = std::env::var("KV_REBUILD_KEYS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let mut c = Cluster::start(3, "").await;
        let took = load(&c, n, 256).await;
        println!(
            "loaded {n} keys in {took:?} ({:.0} puts/s)",
            n as f64 / took.as_secs_f64()
        );
        assert!(c.stop(1).success());
        c.wipe(1);
        // The log file goes on from node 1's first life, which may have logged shards it joined
        // (recover_done with 0 keys): count only what the rebuilt process logs.
        let before = c.log(1).len();
        let log_since = |c: &Cluster| c.log(1).get(before..).unwrap_or_default().to_string();
        let t = Instant::now();
        c.spawn(1);
        let shards = 8;
        wait_for(
            "node 1 to recover every shard",
            Duration::from_secs(300),
            || {
                let done = log_since(&c).matches("recover_done").count();
                async move { (done >= shards).then_some(()) }
            },
        )
        .await;
        let streamed = t.elapsed();
        // Then the log after the stream, until every shard holds what its leader had.
        wait_for(
            "node 1 to catch up on every shard",
            Duration::from_secs(300),
            || {
                let done = log_since(&c).matches("recover_caught_up").count();
                async move { (done >= shards).then_some(()) }
            },
        )
        .await;
        let took = t.elapsed();
        // Read now: the shards finish their pulls together, and a read at the moment the last
        // one was logged may have caught another's line half written.
        let log = log_since(&c);
        let (mut keys, mut bytes, mut pull_ms) = (0u64, 0u64, 0u64);
        for line in log.lines().filter(|l| l.contains("recover_done")) {
            let field = |name: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{name}=")))
                    .and_then(|v| v.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
                    .unwrap_or(0)
            };
            keys += field("keys");
            bytes += field("bytes");
            // The shards are pulled concurrently: the longest pull is the streaming time.
            pull_ms = pull_ms.max(field("duration_ms"));
        }
        assert_eq!(
            keys,
            u64::from(n),
            "the recover_done lines account for every key"
        );
        println!(
            "wiped node rebuilt: {keys} keys ({:.1} MB) streamed over Recover in {streamed:?} \
             from process start ({:.1} MB/s; the pulls themselves {pull_ms} ms, {:.1} MB/s); \
             every shard caught up with its leader after {took:?}",
            bytes as f64 / 1e6,
            bytes as f64 / 1e6 / streamed.as_secs_f64(),
            bytes as f64 / 1e3 / pull_ms.max(1) as f64
        );
        let alone = c.client(&[1]);
        let last = format!("key-{:08}", n - 1);
        let got = alone.get(last.as_bytes(), true).await.expect("stale get");
        assert_eq!(got.value.map(|v| v.len()), Some(256));
    });
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name: utime is 14th, stime 15th overall.
    let after = stat.rsplit(')').next().unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Idle CPU of a 3-node cluster, for several shard counts (to choose the default).
#[test]
#[ignore]
fn idle_cpu_by_shard_count() {
    rt().block_on(async {
        let ticks_per_sec = 100.0; // USER_HZ on Linux
        for shards in [1u32, 4, 8, 16, 32, 64] {
            let c = Cluster::start(3, &format!("shards = {shards}")).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let pids = c.pids();
            let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
            let window = Duration::from_secs(10);
            tokio::time::sleep(window).await;
            let after: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
            let pct: Vec<f64> = before
                .iter()
                .zip(&after)
                .map(|(b, a)| (a - b) as f64 / ticks_per_sec / window.as_secs_f64() * 100.0)
                .collect();
            let total: f64 = pct.iter().sum();
            println!(
                "shards {shards:>3}: idle CPU per node {:?} %, cluster total {total:.1} % of one core",
                pct.iter().map(|p| format!("{p:.1}")).collect::<Vec<_>>()
            );
        }
    });
}

/// What [`kvstore::state::fill_order`] saves a rebuild: `KV_FILL_KEYS` (default 1,000,000)
/// ascending 16-byte keys with 256-byte values inserted into a fresh sled tree (configured as a
/// node's, [`kvstore::state::sled_config`]), in batches the size of a `Recover` batch, once in
/// key order and once in fill order, `KV_FILL_ROUNDS` (default 3) times alternating. Prints the
/// process's CPU, the wall time and the size of sled's files for each.
#[test]
#[ignore]
fn staging_insert_order() {
    let env = |name: &str, default: usize| -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (n, rounds) = (env("KV_FILL_KEYS", 1_000_000), env("KV_FILL_ROUNDS", 3));
    // A 1 MiB Recover batch holds this many of these pairs.
    let batch = (1 << 20) / (16 + 256) + 1;
    let value = vec![7u8; 256];
    let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("d/{i:014}").into_bytes()).collect();
    for round in 1..=rounds {
        for fill in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = kvstore::state::sled_config(dir.path())
                .open()
                .expect("open sled");
            let tree = db.open_tree("staging").expect("open tree");
            let me = std::process::id();
            let (cpu0, t) = (cpu_ticks(me), Instant::now());
            for chunk in keys.chunks(batch) {
                let order: Vec<usize> = if fill {
                    kvstore::state::fill_order(chunk.len()).collect()
                } else {
                    (0..chunk.len()).collect()
                };
                for i in order {
                    tree.insert(chunk[i].as_slice(), value.as_slice())
                        .expect("insert");
                }
            }
            tree.flush().expect("flush");
            let (cpu, wall) = (cpu_ticks(me) - cpu0, t.elapsed());
            assert_eq!(tree.len(), n);
            drop((tree, db));
            let bytes: u64 = std::fs::read_dir(dir.path())
                .expect("read dir")
                .filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum();
            println!(
                "round {round}, {}: {n} inserts in {:.2} s CPU, {:.2} s wall; sled files {:.0} MB",
                if fill { "fill order" } else { "key order " },
                cpu as f64 / 100.0, // USER_HZ
                wall.as_secs_f64(),
                bytes as f64 / 1e6
            );
        }
    }
}
