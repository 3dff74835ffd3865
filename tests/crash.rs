//! Crash consistency: nothing acknowledged is lost, whatever moment a node dies at.
//!
//! Writers put unique keys (one write per key, so there is no ambiguity about which value must
//! be there) while nodes are killed with SIGKILL at random moments, all of them at once in some
//! rounds, or made to fail at a fault point inside the WAL's write/fsync path (the WAL's
//! `KV_WAL_FAULT` testing hook). Every outcome a writer saw is recorded in a ledger:
//!
//! - acknowledged: the key must be readable afterwards with exactly its value;
//! - refused (`UNAVAILABLE`, "certainly not executed"): the key must be absent;
//! - unknown (`DEADLINE_EXCEEDED` and the like): absent, or present with its value.
//!
//! After the faults, every node is restarted and the ledger is checked with linearizable reads
//! through the cluster, then with stale reads against each node alone once it has caught up.
//! `KV_CRASH_SEED` repeats a run's schedule; `KV_CRASH_ROUNDS` sets the number of kill rounds.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{rt, wait_for, Cluster};
use kvstore::client::{Client, ClientError};
use rand::{Rng, SeedableRng};

const NODES: usize = 3;
const WRITERS: usize = 16;
/// Shards and a short request timeout keep a debug-build run on 2 shared cores modest.
const CONFIG: &str = "shards = 4\nrequest_timeout_ms = 3000";

fn seed() -> u64 {
    let seed = std::env::var("KV_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed} (KV_CRASH_SEED={seed} repeats this schedule)");
    seed
}

/// What the writers saw, per key.
#[derive(Default)]
struct Ledger {
    acked: HashMap<String, String>,
    unknown: HashMap<String, String>,
    refused: Vec<String>,
}

impl Ledger {
    fn summary(&self) -> String {
        format!(
            "{} acknowledged, {} unknown, {} refused",
            self.acked.len(),
            self.unknown.len(),
            self.refused.len()
        )
    }
}

/// `WRITERS` tasks putting unique keys until stopped.
struct Load {
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Load {
    fn start(c: &Cluster, tag: &str) -> Load {
        let ledger: Arc<Mutex<Ledger>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            // Each writer starts at a different node and fails over to the others.
            let eps: Vec<String> = (0..NODES)
                .map(|k| c.addrs[(w + k) % NODES].clone())
                .collect();
            let client = Client::new(&eps, Duration::from_secs(2)).expect("client");
            let (ledger, stop, tag) = (ledger.clone(), stop.clone(), tag.to_string());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("{tag}-w{w:02}-{n:06}");
                    let value = format!("value of {key}");
                    match client.put(key.as_bytes(), value.as_bytes()).await {
                        Ok(_) => {
                            lock(&ledger).acked.insert(key, value);
                        }
                        Err(ClientError::Unavailable(_)) => {
                            lock(&ledger).refused.push(key);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(ClientError::InvalidArgument(m)) => panic!("invalid argument: {m}"),
                        Err(_) => {
                            lock(&ledger).unknown.insert(key, value);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }));
        }
        Load {
            ledger,
            stop,
            tasks,
        }
    }

    fn acked(&self) -> usize {
        lock(&self.ledger).acked.len()
    }

    /// Waits (bounded) until `more` further writes have been acknowledged.
    async fn wait_acked(&self, more: usize, timeout: Duration) {
        let want = self.acked() + more;
        wait_for(&format!("{want} acknowledged writes"), timeout, || {
            let n = self.acked();
            async move { (n >= want).then_some(()) }
        })
        .await;
    }

    async fn finish(self) -> Ledger {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("writer task");
        }
        std::mem::take(&mut *lock(&self.ledger))
    }
}

/// Checks the ledger with linearizable reads through every node; panics on the first breach.
async fn verify_linearizable(c: &Cluster, ledger: &Ledger) {
    let t = Instant::now();
    let mut checks: Vec<(String, Option<String>, bool)> = Vec::new();
    for (k, v) in &ledger.acked {
        checks.push((k.clone(), Some(v.clone()), false));
    }
    for (k, v) in &ledger.unknown {
        checks.push((k.clone(), Some(v.clone()), true));
    }
    for k in &ledger.refused {
        checks.push((k.clone(), None, false));
    }
    let checks = Arc::new(checks);
    let mut tasks = Vec::new();
    const READERS: usize = 8;
    for r in 0..READERS {
        let client = c.client_all();
        let checks = checks.clone();
        tasks.push(tokio::spawn(async move {
            let mut present_unknown = 0usize;
            for (key, want, maybe) in checks.iter().skip(r).step_by(READERS) {
                let mut attempt = 0;
                let got = loop {
                    match client.get(key.as_bytes(), false).await {
                        Ok(s) => break s.value,
                        Err(e) if attempt < 20 => {
                            attempt += 1;
                            eprintln!("read of {key} failed, retrying: {e}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("read of {key} keeps failing: {e}"),
                    }
                };
                let got = got.map(|v| String::from_utf8_lossy(&v).into_owned());
                match (want, maybe) {
                    (Some(v), false) => assert_eq!(
                        got.as_ref(),
                        Some(v),
                        "acknowledged write of {key} is lost or wrong"
                    ),
                    (None, _) => assert_eq!(
                        got, None,
                        "write of {key} was refused as not executed, yet it is there"
                    ),
                    (Some(v), true) => {
                        if let Some(g) = &got {
                            assert_eq!(g, v, "write of {key} (outcome unknown) has a wrong value");
                            present_unknown += 1;
                        }
                    }
                }
            }
            present_unknown
        }));
    }
    let mut present_unknown = 0;
    for t in tasks {
        present_unknown += t.await.expect("reader task");
    }
    println!(
        "verified {} keys with linearizable reads in {:.1?} ({}; {present_unknown} of the unknown \
         ones were applied)",
        checks.len(),
        t.elapsed(),
        ledger.summary()
    );
}

/// Stale reads against node `i` alone: once it has caught up (bounded wait), every acknowledged
/// write is there with its value, and no refused write is.
async fn verify_stale_on(c: &Cluster, i: usize, ledger: &Ledger) {
    let client = c.client(&[i]);
    let mut acked: Vec<(&String, &String)> = ledger.acked.iter().collect();
    acked.sort();
    let t = Instant::now();
    for (key, value) in acked {
        let what = format!("node {i} to serve {key} from its own replica");
        let got = wait_for(&what, Duration::from_secs(30), || {
            let client = &client;
            async move {
                match client.get(key.as_bytes(), true).await {
                    Ok(s) if s.value.is_some() => s.value,
                    _ => None,
                }
            }
        })
        .await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            value.as_str(),
            "node {i} serves a wrong value for {key}"
        );
    }
    for key in &ledger.refused {
        if let Ok(s) = client.get(key.as_bytes(), true).await {
            assert_eq!(s.value, None, "node {i} serves refused write {key}");
        }
    }
    for (key, value) in &ledger.unknown {
        if let Ok(Some(got)) = client.get(key.as_bytes(), true).await.map(|s| s.value) {
            assert_eq!(String::from_utf8_lossy(&got), value.as_str(), "{key}");
        }
    }
    println!(
        "node {i}: stale reads of {} keys agree with the ledger ({:.1?})",
        ledger.acked.len() + ledger.refused.len() + ledger.unknown.len(),
        t.elapsed()
    );
}

async fn restart_all_and_verify(c: &mut Cluster, ledger: &Ledger) {
    for i in 0..NODES {
        if !c.is_running(i) {
            c.kill9(i); // reap an exited one
            c.spawn(i);
        }
    }
    c.wait_ready(Duration::from_secs(60)).await;
    verify_linearizable(c, ledger).await;
    for i in 0..NODES {
        verify_stale_on(c, i, ledger).await;
    }
}

/// Rounds of kill -9 on one random node, or on all of them, at random moments under load.
#[test]
fn kill9_under_load_loses_no_acknowledged_write() {
    let seed = seed();
    let rounds: usize = std::env::var("KV_CRASH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    rt().block_on(async {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut c = Cluster::start(NODES, CONFIG).await;
        let load = Load::start(&c, "k");
        load.wait_acked(50, Duration::from_secs(30)).await;
        for round in 1..=rounds {
            // Every third round (and the last) takes the whole cluster down at once.
            let all = round % 3 == 0 || round == rounds;
            tokio::time::sleep(Duration::from_millis(rng.gen_range(100..1200))).await;
            let victims: Vec<usize> = if all {
                (0..NODES).collect()
            } else {
                vec![rng.gen_range(0..NODES)]
            };
            let before = load.acked();
            for &v in &victims {
                c.kill9(v);
            }
            let hold = Duration::from_millis(rng.gen_range(100..800));
            println!(
                "round {round}: kill -9 node(s) {victims:?} after {before} acknowledged writes, \
                 down for {hold:?}"
            );
            tokio::time::sleep(hold).await;
            for &v in &victims {
                c.spawn(v);
            }
            c.wait_ready(Duration::from_secs(60)).await;
            // Let the load make progress before the next fault.
            load.wait_acked(20, Duration::from_secs(30)).await;
        }
        let ledger = load.finish().await;
        println!("after {rounds} rounds: {}", ledger.summary());
        restart_all_and_verify(&mut c, &ledger).await;
    });
}

/// Waits (bounded) for node `i` to exit on its own, polling without blocking the runtime.
async fn wait_exit(c: &mut Cluster, i: usize, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = c.wait_exit(i, Duration::ZERO) {
            return status;
        }
        if Instant::now() > deadline {
            panic!("node {i} still running {timeout:?} after its fault should have hit");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The process-crash fault points of the WAL: abort just before an fsync, right after a write
/// that no fsync covers yet, and (as a power loss may) after cutting the WAL back to what it knew
/// was durable. The node is restarted without the fault and nothing acknowledged may be missing.
#[test]
fn crash_at_wal_fault_points_loses_no_acknowledged_write() {
    let seed = seed();
    rt().block_on(async {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut c = Cluster::start(NODES, CONFIG).await;
        let load = Load::start(&c, "f");
        load.wait_acked(30, Duration::from_secs(30)).await;
        // lose_unsynced also cuts the WAL back to what was known durable, as a power loss may.
        let kinds = ["crash_before_fsync", "crash_after_write", "lose_unsynced"];
        for round in 0..6 {
            let (kind, victim) = (kinds[round % 3], rng.gen_range(0..NODES));
            let fault = format!("{kind}:{}", rng.gen_range(5..60));
            println!("node {victim}: restarted with KV_WAL_FAULT={fault}");
            c.kill9(victim);
            c.spawn_env(victim, &[("KV_WAL_FAULT", &fault)]);
            let status = wait_exit(&mut c, victim, Duration::from_secs(60)).await;
            let log = c.log(victim);
            assert!(
                log.contains("aborting at the injected fault point"),
                "node {victim} exited ({status:?}) but not at the fault point"
            );
            if kind == "lose_unsynced" {
                assert!(
                    log.contains("unsynced bytes"),
                    "the WAL was not cut back:\n{log}"
                );
            }
            println!(
                "node {victim} aborted at {fault} ({status:?}) after {} acknowledged writes",
                load.acked()
            );
            c.spawn(victim);
            c.wait_ready(Duration::from_secs(60)).await;
            load.wait_acked(20, Duration::from_secs(30)).await;
        }
        let ledger = load.finish().await;
        restart_all_and_verify(&mut c, &ledger).await;
    });
}

/// A node whose WAL fsync (or write) fails must not go on as if nothing happened: the WAL
/// refuses all further work (fsyncgate) and the node exits (status 1), so its supervisor restarts it and recovery decides
/// what survived. Writes go on through the other two nodes meanwhile; nothing acknowledged is
/// lost, and after the restart the faulty node serves only what the cluster committed.
#[test]
fn wal_io_failure_stops_the_node_and_loses_no_acknowledged_write() {
    let seed = seed();
    rt().block_on(async {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut c = Cluster::start(NODES, CONFIG).await;
        let load = Load::start(&c, "s");
        load.wait_acked(30, Duration::from_secs(30)).await;
        for kind in ["fsync", "write", "fsync"] {
            let victim = rng.gen_range(0..NODES);
            let fault = format!("{kind}:{}", rng.gen_range(10..80));
            println!("node {victim}: restarted with KV_WAL_FAULT={fault}");
            c.kill9(victim);
            c.spawn_env(victim, &[("KV_WAL_FAULT", &fault)]);
            let t = Instant::now();
            let status = wait_exit(&mut c, victim, Duration::from_secs(60)).await;
            assert!(
                !status.success(),
                "node {victim} exited 0 after a {kind} failure"
            );
            let log = c.log(victim);
            assert!(
                log.contains(&format!("injected {kind} failure")),
                "node {victim} exited ({status:?}) without the injected {kind} failure"
            );
            assert!(
                log.contains("fatal: shard"),
                "node {victim} did not say why it stopped"
            );
            println!(
                "node {victim} exited {:.1?} after start, on the {kind} failure ({status:?}); {} \
                 acknowledged so far",
                t.elapsed(),
                load.acked()
            );
            // The other two are a majority: writes go on without the faulty node.
            load.wait_acked(50, Duration::from_secs(30)).await;
            c.spawn(victim);
            c.wait_ready(Duration::from_secs(60)).await;
            load.wait_acked(20, Duration::from_secs(30)).await;
        }
        let ledger = load.finish().await;
        restart_all_and_verify(&mut c, &ledger).await;
    });
}

/// A node restarted while it led a shard does not resume leading that term from its disk: after
/// a power loss its log may end before entries it had already sent, and new entries under the
/// same log ids would break Raft's log matching on the followers holding the old ones (once
/// seen here: a follower that never applied acknowledged writes; see `kvstore::raft::log_store`).
/// It may lead again, but only in a later term.
#[test]
fn a_restarted_leader_does_not_resume_its_term() {
    rt().block_on(async {
        let mut c = Cluster::start(NODES, "shards = 1").await;
        let status = c.client(&[0]).status().await.expect("status").value;
        let shard = status.shards.first().expect("shard 0");
        assert!(shard.has_leader, "ready means a leader: {shard:?}");
        let (leader, term) = (shard.leader as usize, shard.term);
        let before = c.log(leader).len();
        c.kill9(leader);
        c.spawn(leader);
        c.wait_ready(Duration::from_secs(60)).await;
        let log = c.log(leader);
        let restarted = log.get(before..).unwrap_or_default();
        assert!(
            restarted.contains(" starting: config "),
            "the log holds the restarted process:\n{restarted}"
        );
        let resumed = format!("became leader of shard 0 in term {term} ");
        assert!(
            !restarted.contains(&resumed),
            "node {leader} led shard 0 in term {term} and resumed it after a restart:\n{restarted}"
        );
        // Whoever leads now (it may be the restarted node again) does so in a later term.
        let now = wait_for("the restarted node to see a leader of shard 0 in a later term", Duration::from_secs(30), || {
            let client = c.client(&[leader]);
            async move {
                let s = client.status().await.ok()?.value;
                let sh = s.shards.first()?.clone();
                (sh.has_leader && sh.term > term).then_some(sh)
            }
        })
        .await;
        println!(
            "node {leader} led shard 0 in term {term}; after its restart node {} leads it in term {}",
            now.leader, now.term
        );
        // And the shard serves writes.
        c.client_all().put(b"after-restart", b"v").await.expect("put");
    });
}
