//! The original system's four failure scenarios, on real `kvnode` processes, with the outcome a
//! replicated store must give — plus catch-up after a restart and forwarding from every node.

mod common;

use std::time::{Duration, Instant};

use common::{rt, wait_for, Cluster};

/// Scenario 1: kill -9 the owner (leader) of key b; reads and writes of b go on via the others.
#[test]
fn owner_killed_reads_and_writes_go_on() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let client = c.client_all();
        let put = client.put(b"b", b"nguyet").await.expect("put b");
        let owner = put.node_id as usize;
        c.kill9(owner);
        let killed = Instant::now();

        let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
        let survivors = c.client(&others);
        let got = survivors
            .get(b"b", false)
            .await
            .expect("get b after the owner died");
        assert_eq!(got.value.as_deref(), Some(&b"nguyet"[..]));
        assert_ne!(got.node_id as usize, owner, "served by a new leader");
        eprintln!(
            "reads of b resumed {:?} after kill -9 of its owner",
            killed.elapsed()
        );

        survivors
            .put(b"b", b"still-writable")
            .await
            .expect("put b after the owner died");
        let got = survivors.get(b"b", false).await.expect("get b");
        assert_eq!(got.value.as_deref(), Some(&b"still-writable"[..]));

        // Both owners said so in their logs (`KV_EVENT=leader_elected` in the journal), the new
        // one in a later term than the last of the dead one.
        let shard = kvstore::placement::shard_for_key(b"b", kvstore::config::DEFAULT_SHARDS);
        // The latest term in which a log says its node became the leader of b's shard.
        let last_elected = |log: String| -> Option<u64> {
            let prefix = format!("became leader of shard {shard} in term ");
            log.lines()
                .filter(|l| l.contains("leader_elected"))
                .filter_map(|l| l.split(&prefix).nth(1)?.split_whitespace().next()?.parse().ok())
                .max()
        };
        let old_term = last_elected(c.log(owner))
            .expect("the first owner logged leader_elected for b's shard");
        let new_owner = got.node_id as usize;
        let new_term = wait_for("leader_elected from the new owner", Duration::from_secs(10), || {
            let term = last_elected(c.log(new_owner));
            async move { term.filter(|t| *t > old_term) }
        })
        .await;
        eprintln!("shard {shard}: leader_elected by node {owner} in term {old_term}, then node {new_owner} in term {new_term}");
    });
}

/// Scenario 2: a replica down: nothing visible.
#[test]
fn replica_down_nothing_visible() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let client = c.client_all();
        let owner = client.put(b"a", b"123").await.expect("put a").node_id as usize;
        let replica = (owner + 1) % 3;
        c.kill9(replica);
        let others: Vec<usize> = (0..3).filter(|i| *i != replica).collect();
        let client = c.client(&others);
        let t = Instant::now();
        let got = client.get(b"a", false).await.expect("get a");
        assert_eq!(got.value.as_deref(), Some(&b"123"[..]));
        assert_eq!(got.node_id as usize, owner, "the owner still serves");
        client
            .put(b"a2", b"456")
            .await
            .expect("write with a replica down");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no failover needed: {:?}",
            t.elapsed()
        );
    });
}

/// Scenario 3: every node killed -9 right after acknowledged writes; after restart nothing is lost.
#[test]
fn all_killed_then_restarted_nothing_lost() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let client = c.client_all();
        for i in 0..300u32 {
            client
                .put(
                    format!("key-{i}").as_bytes(),
                    format!("value-{i}").as_bytes(),
                )
                .await
                .expect("put");
        }
        client.delete(b"key-7").await.expect("delete");
        for i in 0..3 {
            c.kill9(i);
        }
        let down = c.client_all();
        assert!(
            down.get(b"key-1", false).await.is_err(),
            "no node answers while all are down"
        );
        for i in 0..3 {
            c.spawn(i);
        }
        c.wait_ready(Duration::from_secs(30)).await;
        let client = c.client_all();
        for i in 0..300u32 {
            let got = client
                .get(format!("key-{i}").as_bytes(), false)
                .await
                .expect("get");
            if i == 7 {
                assert_eq!(got.value, None, "the delete survived too");
            } else {
                assert_eq!(
                    got.value,
                    Some(format!("value-{i}").into_bytes()),
                    "key-{i}"
                );
            }
        }
    });
}

/// Scenario 4: a node's data dir wiped; restarted, it is rebuilt from its peers (Recover), and
/// serves every key from its own replica.
#[test]
fn wiped_node_is_rebuilt() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let client = c.client_all();
        for i in 0..200u32 {
            client
                .put(format!("k{i}").as_bytes(), format!("v{i}").as_bytes())
                .await
                .expect("put");
        }
        assert!(c.stop(1).success(), "graceful stop exits 0");
        c.wipe(1);
        // Writes while it is gone must reach it too.
        client
            .put(b"during", b"outage")
            .await
            .expect("put while node 1 is down");
        // Its log file goes on from its first life: what the rebuilt process logs starts here.
        let before = c.log(1).len();
        c.spawn(1);
        let alone = c.client(&[1]);
        for i in (0..200u32).chain(std::iter::once(999)) {
            let (k, v) = if i == 999 {
                (b"during".to_vec(), b"outage".to_vec())
            } else {
                (format!("k{i}").into_bytes(), format!("v{i}").into_bytes())
            };
            wait_for(
                &format!("node 1 to serve {k:?} from its own replica"),
                Duration::from_secs(30),
                || {
                    let (alone, k, v) = (&alone, k.clone(), v.clone());
                    async move {
                        let got = alone.get(&k, true).await.ok()?;
                        (got.node_id == 1 && got.value == Some(v)).then_some(())
                    }
                },
            )
            .await;
        }
        let log = c.log(1);
        let rebuilt = log.get(before..).unwrap_or_default();
        assert!(
            rebuilt.contains("recover_done"),
            "node 1 logged recover_done after its restart:\n{rebuilt}"
        );
    });
}

/// A node restarted with its disk catches up on the writes it missed.
#[test]
fn restarted_node_catches_up() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let client = c.client_all();
        client.put(b"before", b"1").await.expect("put");
        c.kill9(2);
        let client = c.client(&[0, 1]);
        for i in 0..100u32 {
            client
                .put(format!("missed-{i}").as_bytes(), b"x")
                .await
                .expect("put while down");
        }
        c.spawn(2);
        let alone = c.client(&[2]);
        for key in ["before".to_string(), "missed-0".into(), "missed-99".into()] {
            wait_for(
                &format!("node 2 to catch up on {key}"),
                Duration::from_secs(30),
                || {
                    let (alone, key) = (&alone, key.clone());
                    async move {
                        let got = alone.get(key.as_bytes(), true).await.ok()?;
                        got.value.is_some().then_some(())
                    }
                },
            )
            .await;
        }
    });
}

/// Any node serves any key: write through each node, read through each other node.
#[test]
fn forwarding_from_every_node() {
    rt().block_on(async {
        let c = Cluster::start(3, "").await;
        for w in 0..3 {
            let writer = c.client(&[w]);
            for k in 0..8u32 {
                let key = format!("fwd-{w}-{k}");
                writer
                    .put(key.as_bytes(), key.as_bytes())
                    .await
                    .expect("put");
            }
        }
        for r in 0..3 {
            let reader = c.client(&[r]);
            for w in 0..3 {
                for k in 0..8u32 {
                    let key = format!("fwd-{w}-{k}");
                    let got = reader.get(key.as_bytes(), false).await.expect("get");
                    assert_eq!(
                        got.value.as_deref(),
                        Some(key.as_bytes()),
                        "{key} via node {r}"
                    );
                }
            }
        }
        // Deletes report whether the key existed, through any node.
        let d = c.client(&[2]).delete(b"fwd-0-0").await.expect("delete");
        assert!(d.value);
        let d = c
            .client(&[1])
            .delete(b"fwd-0-0")
            .await
            .expect("delete again");
        assert!(!d.value);
    });
}

/// A client that knows every endpoint sends writes and linearizable reads straight to the leader
/// of the key's shard (learned from `Status` and the replies' headers), so no node has to forward
/// them: the endpoint it talked to is the node that executed the request.
#[test]
fn client_sends_requests_to_the_shard_leader() {
    rt().block_on(async {
        let c = Cluster::start(3, "").await;
        let client = c.client_all();
        let keys: Vec<String> = (0..24).map(|k| format!("route-{k}")).collect();
        let direct = |endpoint: &str, node: u64| endpoint == c.addrs[node as usize];
        // The first request of a key may take the hop (its leader is not known yet, and the
        // routes from Status are learned in the background); from then on none should.
        wait_for(
            "every request to go straight to its shard's leader",
            Duration::from_secs(15),
            || {
                let (client, keys, direct) = (&client, &keys, &direct);
                async move {
                    let mut all_direct = true;
                    for k in keys {
                        let put = client.put(k.as_bytes(), b"v").await.expect("put");
                        let get = client.get(k.as_bytes(), false).await.expect("get");
                        assert_eq!(get.value.as_deref(), Some(&b"v"[..]));
                        all_direct &= direct(&put.endpoint, put.node_id)
                            && direct(&get.endpoint, get.node_id);
                    }
                    all_direct.then_some(())
                }
            },
        )
        .await;
        let d = client.delete(b"route-0").await.expect("delete");
        assert!(d.value && direct(&d.endpoint, d.node_id), "{d:?}");
    });
}

/// A follower that was down while the leader snapshotted and purged its log cannot catch up
/// from the log: the leader offers its snapshot and the follower pulls it over Recover.
#[test]
fn lagging_follower_gets_a_snapshot() {
    rt().block_on(async {
        // Snapshot (and purge) every 50 entries, so a short outage outruns the log.
        let mut c = Cluster::start(3, "shards = 2\nsnapshot_logs = 50").await;
        let client = c.client_all();
        client.put(b"first", b"1").await.expect("put");
        c.kill9(2);
        let client = c.client(&[0, 1]);
        for i in 0..400u32 {
            client
                .put(format!("lag-{i}").as_bytes(), format!("{i}").as_bytes())
                .await
                .expect("put");
        }
        let before = c.log(2).len();
        c.spawn(2);
        let alone = c.client(&[2]);
        for i in [0u32, 199, 399] {
            let key = format!("lag-{i}");
            wait_for(
                &format!("node 2 to have {key}"),
                Duration::from_secs(30),
                || {
                    let (alone, key) = (&alone, key.clone());
                    async move {
                        let got = alone.get(key.as_bytes(), true).await.ok()?;
                        (got.value == Some(i.to_string().into_bytes())).then_some(())
                    }
                },
            )
            .await;
        }
        let log = c.log(2);
        let restarted = log.get(before..).unwrap_or_default();
        assert!(
            restarted.contains("recover_done"),
            "node 2 was rebuilt from a snapshot after its restart:\n{restarted}"
        );
    });
}

/// `SIGTERM` hands the node's leaderships to its peers first: a client writing all along sees
/// no failed write, and the node exits 0.
#[test]
fn planned_stop_loses_no_write() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let client = std::sync::Arc::new(c.client_all());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed, mut slowest) = (0u32, Vec::new(), Duration::ZERO);
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    match client.put(format!("ps-{}", i % 64).as_bytes(), b"v").await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                    slowest = slowest.max(t.elapsed());
                    i += 1;
                }
                (ok, failed, slowest)
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = c.stop(0);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (ok, failed, slowest) = writer.await.expect("writer");
        assert!(status.success(), "exit status {status:?}");
        assert!(
            failed.is_empty(),
            "{} failed writes: {:?}",
            failed.len(),
            &failed[..failed.len().min(3)]
        );
        assert!(ok > 10, "writes went on: {ok}");
        eprintln!("{ok} writes, none failed; slowest {slowest:?}");
        assert!(
            c.log(0).contains("handed shard"),
            "node 0 handed its shards off:\n{}",
            c.log(0)
        );
    });
}

/// After a node comes back, leadership returns to each shard's preferred leader, so every node
/// again leads its share.
#[test]
fn leadership_rebalances_after_restart() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        c.kill9(0);
        let client = c.client(&[1]);
        wait_for(
            "the survivors to lead every shard",
            Duration::from_secs(30),
            || {
                let client = &client;
                async move {
                    let s = client.status().await.ok()?.value;
                    let taken = s.shards.iter().all(|sh| sh.has_leader && sh.leader != 0);
                    taken.then_some(())
                }
            },
        )
        .await;
        c.spawn(0);
        wait_for(
            "every shard led by its preferred leader",
            Duration::from_secs(60),
            || {
                let client = &client;
                async move {
                    let s = client.status().await.ok()?.value;
                    let balanced = !s.shards.is_empty()
                        && s.shards
                            .iter()
                            .all(|sh| sh.has_leader && sh.leader == sh.preferred_leader);
                    balanced.then_some(())
                }
            },
        )
        .await;
        let s = client.status().await.expect("status").value;
        let mut per_node = [0usize; 3];
        for sh in &s.shards {
            per_node[sh.leader as usize] += 1;
        }
        assert!(
            per_node.iter().max().unwrap_or(&0) - per_node.iter().min().unwrap_or(&0) <= 1,
            "{per_node:?}"
        );
    });
}

/// A client that keeps talking to a node being stopped (no routing, no failover of its own
/// until told) is never left not knowing whether its write happened: once the node has handed
/// off its shards it refuses new requests as *not executed* while the connection stays open,
/// and the client moves on at the first refusal.
#[test]
fn stopping_node_refuses_clients_safely() {
    use kvstore::pb::key_value_client::KeyValueClient;
    use kvstore::pb::PutRequest;
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let addrs: Vec<String> = c.addrs.iter().map(|a| format!("http://{a}")).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (addrs, stop) = (addrs.clone(), stop.clone());
            tokio::spawn(async move {
                let mut node0 = KeyValueClient::connect(addrs[0].clone())
                    .await
                    .expect("connect to node 0");
                let mut node1 = KeyValueClient::connect(addrs[1].clone())
                    .await
                    .expect("connect to node 1");
                let (mut refused, mut ambiguous, mut ok_after) = (0u32, Vec::new(), 0u32);
                let mut i = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let req = PutRequest {
                        key: format!("drain-{}", i % 32).into_bytes(),
                        value: b"v".to_vec(),
                    };
                    i += 1;
                    let r = if refused == 0 {
                        node0.put(req).await
                    } else {
                        node1.put(req).await
                    };
                    match r {
                        Ok(_) if refused > 0 => ok_after += 1,
                        Ok(_) => {}
                        Err(s) if kvstore::router::not_executed(&s) => refused += 1,
                        Err(s) => ambiguous.push(format!("{:?}: {}", s.code(), s.message())),
                    }
                }
                (refused, ambiguous, ok_after)
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = c.stop(0);
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (refused, ambiguous, ok_after) = writer.await.expect("writer");
        assert!(status.success(), "exit status {status:?}");
        assert!(
            ambiguous.is_empty(),
            "writes with an unknown outcome: {ambiguous:?}"
        );
        assert!(refused > 0, "node 0 never refused a request while stopping");
        assert!(ok_after > 0, "writes went on through node 1");
    });
}

/// The same with sessions: writers that keep sending on their session with a node being
/// stopped never see an outcome they cannot act on. Requests the node read are answered; it
/// ends the stream telling that the rest were not executed, and refuses new streams as such.
#[test]
fn stopping_node_leaves_no_session_request_ambiguous() {
    use kvstore::pb::{session_request::Op, PutRequest};
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let ch = kvstore::peers::channel(&c.addrs[0], Duration::from_secs(2)).expect("channel");
        let session = std::sync::Arc::new(kvstore::client::Session::new(&c.addrs[0], ch));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writers: Vec<_> = (0..16)
            .map(|w| {
                let (session, stop) = (session.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut ok, mut refused, mut ambiguous) = (0u32, 0u32, Vec::new());
                    let mut i = 0u32;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let op = Op::Put(PutRequest {
                            key: format!("sdrain-{w}-{}", i % 8).into_bytes(),
                            value: b"v".to_vec(),
                        });
                        i += 1;
                        match session.call(op, Duration::from_secs(5)).await {
                            Ok(_) => ok += 1,
                            Err(s) if kvstore::router::not_executed(&s) => {
                                refused += 1;
                                // Not executed, so safe to send again; do not spin on a dead node.
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            Err(s) => ambiguous.push(format!("{:?}: {}", s.code(), s.message())),
                        }
                    }
                    (ok, refused, ambiguous)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = tokio::task::block_in_place(|| c.stop(0));
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut ok, mut refused, mut ambiguous) = (0, 0, Vec::new());
        for w in writers {
            let (o, r, a) = w.await.expect("writer");
            ok += o;
            refused += r;
            ambiguous.extend(a);
        }
        assert!(status.success(), "exit status {status:?}");
        assert!(ok > 0, "no write went through before the stop");
        assert!(refused > 0, "node 0 never refused a request while stopping");
        assert!(
            ambiguous.is_empty(),
            "{} writes with an unknown outcome (of {ok} ok, {refused} refused): {:?}",
            ambiguous.len(),
            &ambiguous[..ambiguous.len().min(5)]
        );
    });
}

/// A restarted node refuses every vote for 2 × `election_timeout_ms`, then votes as Raft says.
/// Before the restart it may have promised a leader not to vote for anyone that long, and leader
/// leases (src/lease.rs) rely on the promise being kept; openraft 0.9.25 keeps it by stamping the
/// vote it reads from disk with the start time. This catches an upgrade that stops doing so.
#[test]
fn restarted_node_holds_its_vote_while_a_lease_may_run() {
    use kvstore::pb::cluster_client::ClusterClient;
    use kvstore::pb::{RaftKind, RaftRequest};
    use kvstore::raft::{LogId, NodeId, Vote};
    use openraft::raft::{VoteRequest, VoteResponse};
    use openraft::CommittedLeaderId;

    // 3 s of hold: far longer than a restart takes.
    const HOLD: Duration = Duration::from_millis(3000);
    rt().block_on(async {
        let mut c = Cluster::start(3, "election_timeout_ms = 1500").await;
        for i in 0..3 {
            c.kill9(i);
        }
        // Node 2 alone: no leader is alive, so once the hold is over openraft grants the vote.
        let started = Instant::now();
        c.spawn(2);
        let url = format!("http://{}", c.addrs[2]);
        let raw = wait_for("node 2 serving", Duration::from_secs(10), || {
            let url = url.clone();
            async move { ClusterClient::connect(url).await.ok() }
        })
        .await;
        // A candidate far ahead in term and log, so nothing but the hold can refuse it.
        let ask = VoteRequest::new(
            Vote::new(1_000_000, 0),
            Some(LogId::new(CommittedLeaderId::new(999_999, 0), 1 << 40)),
        );
        let payload = bincode::serialize(&ask).expect("encode");
        let granted = || {
            let (mut raw, payload) = (raw.clone(), payload.clone());
            async move {
                let req = RaftRequest {
                    shard: 0,
                    kind: RaftKind::Vote as i32,
                    payload,
                    from: 0,
                    id: 0,
                };
                let give_up = Instant::now() + Duration::from_secs(10);
                let reply = loop {
                    match raw.raft(req.clone()).await {
                        Ok(r) => break r.into_inner(),
                        // Listening, but shard 0 not open yet (a busy machine): ask again.
                        Err(s) if s.code() == tonic::Code::NotFound && Instant::now() < give_up => {
                            tokio::time::sleep(Duration::from_millis(10)).await
                        }
                        Err(s) => panic!("vote rpc: {s:?}"),
                    }
                };
                let r: Result<VoteResponse<NodeId>, openraft::error::RaftError<NodeId>> =
                    bincode::deserialize(&reply.payload).expect("decode");
                r.expect("vote answered").vote_granted
            }
        };
        let first = granted().await;
        let asked_after = started.elapsed();
        assert!(
            asked_after < HOLD,
            "node 2 took {asked_after:?} to answer: the test needs the answer inside the hold"
        );
        assert!(!first, "a vote granted {asked_after:?} after a restart");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if granted().await {
                break;
            }
            assert!(Instant::now() < deadline, "the vote was never granted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let granted_after = started.elapsed();
        assert!(
            granted_after >= HOLD,
            "granted {granted_after:?} after the start, inside the hold"
        );
    });
}
