//! Jepsen-style chaos on real processes: concurrent clients on a few keys record every operation
//! while a nemesis kill -9s nodes, pauses them (SIGSTOP), wipes a node's data dir before
//! restarting it, partitions the network (every node reaches every peer through a proxy that
//! can cut the link), and makes a node lose power: restarted with the WAL's `lose_unsynced`
//! fault, it aborts a little later with its WAL cut back to what it knew was durable. The
//! history is then checked for linearizability, and every node's own copy of each key (a stale
//! read) must come to match what the cluster serves.
//!
//! `cargo test` runs a bounded run (`KV_CHAOS_SECS`, default 30 s); `scripts/chaos.sh` runs it for
//! as long as asked and prints the figures.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::linearizability::{check, Call, Op, Ret};
use common::proxy::Proxy;
use common::{rt, wait_for, Cluster};
use kvstore::client::{Client, ClientError};
use rand::{Rng, SeedableRng};

const NODES: usize = 3;
const KEYS: usize = 4;
const CLIENTS: usize = 6;

#[derive(Default, Debug)]
struct Faults {
    kills: u32,
    pauses: u32,
    wipes: u32,
    partitions: u32,
    /// Restarts with the WAL's `lose_unsynced` fault: the node aborts with its WAL cut back to
    /// what it knew was durable, as after a power loss (only the ones that happened count).
    power_losses: u32,
    /// Of those, the ones that hit a node that had become a shard's leader again.
    power_losses_leading: u32,
}

#[test]
fn chaos_history_is_linearizable() {
    let secs: u64 = std::env::var("KV_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed: u64 = std::env::var("KV_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("chaos: {secs} s, seed {seed} (KV_CHAOS_SEED={seed} repeats the nemesis schedule)");
    rt().block_on(run(Duration::from_secs(secs), seed));
}

async fn run(duration: Duration, seed: u64) {
    let mut c = Cluster::configure(NODES, "shards = 2\nrequest_timeout_ms = 3000");
    // proxies[i][j]: how node i reaches node j.
    let mut proxies: Vec<Vec<Option<Proxy>>> = Vec::new();
    for i in 0..NODES {
        let mut row = Vec::new();
        for j in 0..NODES {
            row.push(if i == j {
                None
            } else {
                Some(Proxy::start(c.addrs[j].parse().expect("addr")).await)
            });
        }
        proxies.push(row);
    }
    for (i, row) in proxies.iter().enumerate() {
        let mut toml = String::from("shards = 2\nrequest_timeout_ms = 3000\n");
        for (j, proxy) in row.iter().enumerate() {
            let addr = match proxy {
                Some(p) => p.addr.to_string(),
                None => c.addrs[j].clone(),
            };
            toml.push_str(&format!("[[nodes]]\nid = {j}\naddr = \"{addr}\"\n"));
        }
        let path = c.dir.path().join(format!("node{i}.toml"));
        std::fs::write(&path, toml).expect("write node config");
        c.node_configs[i] = Some(path);
    }
    for i in 0..NODES {
        c.spawn(i);
    }
    c.wait_ready(Duration::from_secs(30)).await;

    let start = Instant::now();
    let history: Arc<Mutex<Vec<Op>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for client_id in 0..CLIENTS {
        // Each client starts at a different node and fails over to the others.
        let eps: Vec<String> = (0..NODES)
            .map(|k| c.addrs[(client_id + k) % NODES].clone())
            .collect();
        let client = Client::new(&eps, Duration::from_secs(2)).expect("client");
        let (history, stop) = (history.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (client_id as u64 + 1));
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("k{}", rng.gen_range(0..KEYS)).into_bytes();
                let r: f64 = rng.gen();
                let call = if r < 0.5 {
                    Call::Get
                } else if r < 0.85 {
                    n += 1;
                    Call::Put(format!("c{client_id}-{n}").into_bytes())
                } else {
                    Call::Delete
                };
                let invoked = start.elapsed();
                let outcome = match &call {
                    Call::Get => client.get(&key, false).await.map(|s| Ret::Get(s.value)),
                    Call::Put(v) => client.put(&key, v).await.map(|_| Ret::Put),
                    Call::Delete => client.delete(&key).await.map(|s| Ret::Delete(s.value)),
                };
                let completed = match outcome {
                    Ok(ret) => Some((start.elapsed(), ret)),
                    Err(ClientError::InvalidArgument(m)) => panic!("invalid argument: {m}"),
                    // Unknown outcome: it may or may not have taken effect.
                    Err(_) => None,
                };
                let failed = completed.is_none();
                history.lock().unwrap_or_else(|p| p.into_inner()).push(Op {
                    client: client_id,
                    key,
                    call,
                    invoked,
                    completed,
                });
                if failed {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }

    // The nemesis: one fault at a time, healed before the next.
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut faults = Faults::default();
    while start.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(500..1500))).await;
        let victim = rng.gen_range(0..NODES);
        let hold = Duration::from_millis(rng.gen_range(300..2500));
        match rng.gen_range(0..5) {
            0 => {
                faults.kills += 1;
                println!(
                    "{:>6.1}s nemesis: kill -9 node {victim} for {hold:?}",
                    start.elapsed().as_secs_f64()
                );
                c.kill9(victim);
                tokio::time::sleep(hold).await;
                c.spawn(victim);
            }
            1 => {
                faults.pauses += 1;
                println!(
                    "{:>6.1}s nemesis: SIGSTOP node {victim} for {hold:?}",
                    start.elapsed().as_secs_f64()
                );
                c.pause(victim);
                tokio::time::sleep(hold).await;
                c.resume(victim);
            }
            2 => {
                faults.wipes += 1;
                println!(
                    "{:>6.1}s nemesis: kill -9 node {victim}, wipe its data dir, restart",
                    start.elapsed().as_secs_f64()
                );
                c.kill9(victim);
                c.wipe(victim);
                tokio::time::sleep(hold).await;
                c.spawn(victim);
                // Let it rebuild before the next fault can take another replica.
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            4 => {
                // Small counts hit it as a follower catching up, large ones once the balancer has
                // handed its shards back (3-8 s after a restart) and it leads again.
                let n = rng.gen_range(200..15_000);
                println!(
                    "{:>6.1}s nemesis: node {victim} restarted to lose power after {n} WAL writes",
                    start.elapsed().as_secs_f64()
                );
                c.kill9(victim);
                let seen = c.log(victim).len();
                let fault = format!("lose_unsynced:{n}");
                c.spawn_env(victim, &[("KV_WAL_FAULT", fault.as_str())]);
                let spawned = Instant::now();
                let deadline = spawned + Duration::from_secs(20);
                while c.is_running(victim) && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Ends it too if the fault did not come in time.
                c.kill9(victim);
                let log = c.log(victim);
                let since = log.get(seen..).unwrap_or_default();
                if since.contains("unsynced bytes") {
                    faults.power_losses += 1;
                    let led = since.matches("became leader").count();
                    if led > 0 {
                        faults.power_losses_leading += 1;
                    }
                    println!(
                        "        (lost power {:?} after its restart, having become leader {led} times)",
                        spawned.elapsed()
                    );
                } else {
                    faults.kills += 1;
                    println!("        (no power loss within 20 s: killed instead)");
                }
                tokio::time::sleep(hold).await;
                c.spawn(victim);
            }
            _ => {
                faults.partitions += 1;
                println!(
                    "{:>6.1}s nemesis: isolate node {victim} for {hold:?}",
                    start.elapsed().as_secs_f64()
                );
                for other in 0..NODES {
                    if other != victim {
                        for (a, b) in [(victim, other), (other, victim)] {
                            if let Some(p) = &proxies[a][b] {
                                p.block();
                            }
                        }
                    }
                }
                tokio::time::sleep(hold).await;
                for row in &proxies {
                    for p in row.iter().flatten() {
                        p.heal();
                    }
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in clients {
        t.await.expect("client task");
    }
    // Healed: every node up. A final read of every key through each node joins the history.
    for i in 0..NODES {
        if !c.is_running(i) {
            c.spawn(i);
        }
    }
    c.wait_ready(Duration::from_secs(60)).await;
    for i in 0..NODES {
        let client = c.client(&[i]);
        for k in 0..KEYS {
            let key = format!("k{k}").into_bytes();
            let invoked = start.elapsed();
            let got = client
                .get(&key, false)
                .await
                .expect("final read after healing");
            history.lock().unwrap_or_else(|p| p.into_inner()).push(Op {
                client: 100 + i,
                key,
                call: Call::Get,
                invoked,
                completed: Some((start.elapsed(), Ret::Get(got.value))),
            });
        }
    }

    // Replicas converge: each node's own copy (a stale read) comes to hold what the cluster
    // serves. Linearizable reads go through leaders, so a follower whose log diverged from its
    // leader's would pass the history check; this catches it unless a later write hides it.
    for k in 0..KEYS {
        let key = format!("k{k}").into_bytes();
        let want = c
            .client_all()
            .get(&key, false)
            .await
            .expect("read after healing")
            .value;
        for i in 0..NODES {
            let client = c.client(&[i]);
            let what = format!("node {i}'s own copy of k{k} to match the cluster's ({want:?})");
            wait_for(&what, Duration::from_secs(30), || {
                let (client, key, want) = (&client, &key, &want);
                async move {
                    let got = client.get(key, true).await.ok()?.value;
                    (got == *want).then_some(())
                }
            })
            .await;
        }
    }

    let history = history.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let unknown = history.iter().filter(|o| o.completed.is_none()).count();
    let ok = history.len() - unknown;
    let t = Instant::now();
    let violations = check(&history);
    println!(
        "chaos summary: seed {seed}, faults {faults:?}, operations {} ({ok} completed, {unknown} unknown), \
         checked in {:?}, violations {}",
        history.len(),
        t.elapsed(),
        violations.len()
    );
    for v in &violations {
        let mut ops = v.ops.clone();
        ops.sort_by_key(|o| o.invoked);
        let at = common::linearizability::first_violation_time(&ops).unwrap_or_default();
        eprintln!(
            "non-linearizable history for key {:?}; it first fails at {at:?}; the ops before that:",
            String::from_utf8_lossy(&v.key)
        );
        for o in ops
            .iter()
            .filter(|o| o.invoked < at && o.invoked + Duration::from_secs(3) > at)
        {
            eprintln!("  {}", describe(o));
        }
    }
    assert!(
        violations.is_empty(),
        "{} key(s) with non-linearizable histories (seed {seed})",
        violations.len()
    );
    assert!(
        ok > 50,
        "too few completed operations to mean anything: {ok}"
    );
}

fn describe(o: &Op) -> String {
    let show = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let call = match &o.call {
        Call::Put(v) => format!("put {}", show(v)),
        Call::Get => "get".into(),
        Call::Delete => "delete".into(),
    };
    let ret = match &o.completed {
        None => "unknown".to_string(),
        Some((t, r)) => {
            let r = match r {
                Ret::Get(v) => format!("-> {:?}", v.as_deref().map(show)),
                Ret::Delete(e) => format!("-> existed={e}"),
                Ret::Put => "ok".into(),
            };
            format!("{:.3}s {r}", t.as_secs_f64())
        }
    };
    format!(
        "client {:>3} {:.3}s {call:<12} {ret}",
        o.client,
        o.invoked.as_secs_f64()
    )
}
