//! Bad input, bad config, the kvctl contract (exit codes), and graceful stop.

mod common;

use std::time::Duration;

use common::{kvctl_with, kvnode_exit, rt, Cluster};
use kvstore::bench::etcdpb;
use kvstore::client::ClientError;

#[test]
fn bad_input_is_rejected_and_the_node_stays_up() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let client = c.client(&[0]);
        let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
            (vec![], b"v".to_vec(), "empty"),
            (vec![b'k'; 4097], b"v".to_vec(), "4096"),
            (b"k".to_vec(), vec![0u8; 1024 * 1024 + 1], "1048576"),
        ];
        for (k, v, needle) in cases {
            match client.put(&k, &v).await {
                Err(ClientError::InvalidArgument(m)) => assert!(m.contains(needle), "{m}"),
                other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
            }
        }
        match client.get(b"", false).await {
            Err(ClientError::InvalidArgument(_)) => {}
            other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
        }
        // The limits themselves are accepted.
        client
            .put(&vec![b'k'; 4096], &vec![7u8; 1024 * 1024])
            .await
            .expect("max-size put");
        let got = client.get(&vec![b'k'; 4096], false).await.expect("get");
        assert_eq!(got.value.map(|v| v.len()), Some(1024 * 1024));
        assert!(c.is_running(0));

        // A malformed peer message is refused, not fatal.
        let mut raw =
            kvstore::pb::cluster_client::ClusterClient::connect(format!("http://{}", c.addrs[0]))
                .await
                .expect("connect");
        for kind in [1, 2, 3, 99] {
            let r = raw
                .raft(kvstore::pb::RaftRequest {
                    shard: 0,
                    kind,
                    payload: vec![0xff; 17],
                    from: 1,
                    id: 0,
                })
                .await;
            assert!(r.is_err(), "garbage raft message kind {kind} accepted");
        }
        let r = raw
            .raft(kvstore::pb::RaftRequest {
                shard: 9999,
                kind: 1,
                payload: vec![],
                from: 1,
                id: 0,
            })
            .await;
        assert!(r.is_err());
        // The same on a peer's stream: each message is answered with its own error, by id, and
        // the stream goes on serving.
        let garbage: Vec<_> = [1, 2, 3, 99]
            .into_iter()
            .enumerate()
            .map(|(i, kind)| kvstore::pb::RaftRequest {
                shard: if kind == 3 { 9999 } else { 0 },
                kind,
                payload: vec![0xff; 17],
                from: 1,
                id: 100 + i as u64,
            })
            .collect();
        let mut replies = raw
            .raft_stream(tokio_stream::iter(garbage))
            .await
            .expect("raft stream opens")
            .into_inner();
        let mut ids = Vec::new();
        for _ in 0..4 {
            let r = tokio::time::timeout(Duration::from_secs(10), replies.message())
                .await
                .expect("a reply within 10 s")
                .expect("stream intact")
                .expect("a reply per message");
            assert_ne!(r.code, 0, "garbage message {} accepted: {r:?}", r.id);
            assert!(r.reply.is_none());
            ids.push(r.id);
        }
        ids.sort();
        assert_eq!(ids, vec![100, 101, 102, 103]);
        client
            .put(b"still", b"alive")
            .await
            .expect("node serves after garbage");
    });
}

/// `kv.v1.KeyValue/Session` serves each request as its unary call: the same results (seen by
/// the unary client), the same validation errors, routing fields where the unary reply has
/// headers, and a reply per request by id, whatever order they finish in.
#[test]
fn a_session_serves_requests_as_their_unary_calls() {
    use kvstore::pb::{session_reply::Result as R, session_request::Op};
    use kvstore::pb::{DeleteRequest, GetRequest, PutRequest};
    rt().block_on(async {
        let c = Cluster::start(3, "").await;
        let unary = c.client(&[0]);
        let ch = kvstore::peers::channel(&c.addrs[0], Duration::from_secs(2)).expect("channel");
        let session = kvstore::client::Session::new(&c.addrs[0], ch);
        let t = Duration::from_secs(10);
        let put = |k: &str, v: &str| {
            Op::Put(PutRequest {
                key: k.into(),
                value: v.into(),
            })
        };

        let (r, hint) = session.call(put("s/a", "1"), t).await.expect("put");
        let R::Put(p) = r else { panic!("{r:?}") };
        assert_eq!(hint.shards, 8);
        assert_eq!(
            hint.shard,
            Some(kvstore::placement::shard_for_key(b"s/a", 8))
        );
        assert_eq!(hint.leader, Some(p.node_id));
        let got = unary.get(b"s/a", false).await.expect("unary get");
        assert_eq!(got.value.as_deref(), Some(&b"1"[..]));
        assert_eq!(got.node_id, p.node_id, "the same leader served both");

        let get = |k: &str, stale| {
            Op::Get(GetRequest {
                key: k.into(),
                stale,
            })
        };
        match session.call(get("s/a", false), t).await.expect("get") {
            (R::Get(g), _) => assert!(g.found && g.value == b"1"),
            other => panic!("{other:?}"),
        }
        // A stale read is not routed: no routing fields, as no headers on the unary reply.
        let (_, hint) = session.call(get("s/a", true), t).await.expect("stale get");
        assert_eq!((hint.shards, hint.shard, hint.leader), (0, None, None));
        let del = |k: &str| Op::Delete(DeleteRequest { key: k.into() });
        match session.call(del("s/a"), t).await.expect("delete") {
            (R::Delete(d), _) => assert!(d.deleted),
            other => panic!("{other:?}"),
        }
        match session.call(del("s/a"), t).await.expect("delete again") {
            (R::Delete(d), _) => assert!(!d.deleted),
            other => panic!("{other:?}"),
        }
        assert_eq!(unary.get(b"s/a", false).await.expect("get").value, None);

        // Bad input: the unary call's error, and the session goes on.
        let e = session
            .call(
                Op::Put(PutRequest {
                    key: vec![b'k'; 4097],
                    value: b"v".to_vec(),
                }),
                t,
            )
            .await
            .expect_err("oversize key");
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("4096"), "{}", e.message());

        // Many requests at once on the one stream, each answered.
        let puts = (0..200).map(|i| session.call(put(&format!("s/{i}"), &i.to_string()), t));
        for r in futures::future::join_all(puts).await {
            r.expect("concurrent put");
        }
        for i in (0..200).step_by(37) {
            let got = unary
                .get(format!("s/{i}").as_bytes(), false)
                .await
                .expect("get");
            assert_eq!(got.value, Some(i.to_string().into_bytes()));
        }

        // On the wire: a request with no operation gets its own error, by id.
        let mut raw = kvstore::pb::key_value_client::KeyValueClient::connect(format!(
            "http://{}",
            c.addrs[1]
        ))
        .await
        .expect("connect");
        let reqs = vec![
            kvstore::pb::SessionRequest {
                id: 5,
                timeout_ms: 0,
                op: None,
            },
            kvstore::pb::SessionRequest {
                id: 6,
                timeout_ms: 5000,
                op: Some(get("s/7", false)),
            },
        ];
        let mut replies = raw
            .session(tokio_stream::iter(reqs))
            .await
            .expect("session opens")
            .into_inner();
        let mut seen = Vec::new();
        for _ in 0..2 {
            let r = tokio::time::timeout(Duration::from_secs(10), replies.message())
                .await
                .expect("a reply within 10 s")
                .expect("stream intact")
                .expect("a reply per request");
            match r.id {
                5 => assert_eq!(r.code, tonic::Code::InvalidArgument as i32, "{r:?}"),
                6 => assert!(
                    matches!(&r.result, Some(R::Get(g)) if g.value == b"7"),
                    "{r:?}"
                ),
                _ => panic!("unexpected reply {r:?}"),
            }
            seen.push(r.id);
        }
        seen.sort();
        assert_eq!(seen, vec![5, 6]);
    });
}

/// Nodes forward clients' requests to each other on a session opened with `kv-forwarded`
/// (`Session::forwarding`): the receiver executes what it leads and refuses the rest as "not
/// leader" (not executed, with a hint), never forwarding it again, and a client's session on the
/// same node, without the header, is routed as usual.
#[test]
fn a_forwarding_session_executes_only_what_its_node_leads() {
    use kvstore::pb::{session_reply::Result as R, session_request::Op};
    use kvstore::pb::{GetRequest, PutRequest};
    rt().block_on(async {
        let c = Cluster::start(3, "").await;
        let t = Duration::from_secs(10);
        let put = |k: &str, v: &str| {
            Op::Put(PutRequest {
                key: k.into(),
                value: v.into(),
            })
        };
        let ch = |i: usize| kvstore::peers::channel(&c.addrs[i], t).expect("channel");
        let client = kvstore::client::Session::new(&c.addrs[0], ch(0));
        let forwarding = kvstore::client::Session::forwarding(0, ch(0));

        // Which node leads a key's shard, by the client's session (node 0 routes it to the
        // leader, whose id the reply names). Leadership can move between that probe and the
        // forwarded call (a rebalance), so each case is retried on a fresh probe; what must
        // never happen is node 0 executing a forwarded request elsewhere.
        let probe = |k: String| {
            let client = &client;
            async move {
                let (_, hint) = client.call(put(&k, "old"), t).await.expect("routed put");
                (k, hint.leader.expect("a put's reply names its leader"))
            }
        };
        let (mut mine, mut refused) = (None, None);
        for k in 0..400 {
            if mine.is_some() && refused.is_some() {
                break;
            }
            let (key, leader) = probe(format!("f/{k}")).await;
            match forwarding.call(put(&key, "new"), t).await {
                Ok((R::Put(p), _)) => {
                    assert_eq!(
                        p.node_id, 0,
                        "a forwarded put of {key} went on to another node"
                    );
                    mine = mine.or(Some(key));
                }
                Ok(r) => panic!("{r:?}"),
                Err(e) if leader == 0 => eprintln!("{key}: leadership moved: {e:?}"),
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
                    assert!(kvstore::router::not_executed(&e), "{e:?}");
                    let hint = kvstore::client::RouteHint::from_headers(e.metadata()).leader;
                    assert_ne!(hint, Some(0), "{e:?}");
                    assert!(
                        hint.is_some(),
                        "a not-leader refusal names the leader: {e:?}"
                    );
                    refused = refused.or(Some(key));
                }
            }
        }
        assert!(
            !forwarding.is_unary() && !client.is_unary(),
            "both went on streams"
        );
        let mine = mine.expect("node 0 executed a forwarded put of a shard it leads");
        let other = refused.expect("node 0 refused a forwarded put of a shard it does not lead");

        let get = |k: &str| {
            Op::Get(GetRequest {
                key: k.into(),
                stale: false,
            })
        };
        for (key, want) in [(&mine, "new"), (&other, "old")] {
            match client.call(get(key), t).await.expect("get") {
                (R::Get(g), _) => assert_eq!(g.value, want.as_bytes(), "{key}"),
                r => panic!("{r:?}"),
            }
        }
    });
}

#[test]
fn kvctl_exit_codes_and_output() {
    rt().block_on(async {
        let c = Cluster::start(3, "").await;
        let (code, _, err) = c.kvctl(&[0], &["put", "a", "123"]);
        assert_eq!(code, 0, "{err}");
        let (code, out, _) = c.kvctl(&[1], &["get", "a"]);
        assert_eq!((code, out.as_str()), (0, "123\n"));
        let (code, out, err) = c.kvctl(&[2], &["get", "missing"]);
        assert_eq!((code, out.as_str()), (1, ""), "{err}");
        let (code, _, _) = c.kvctl(&[2], &["delete", "a"]);
        assert_eq!(code, 0);
        let (code, _, _) = c.kvctl(&[2], &["delete", "a"]);
        assert_eq!(code, 0, "delete of an absent key still exits 0");
        let (code, out, _) = c.kvctl(&[0], &["status"]);
        assert_eq!(code, 0);
        assert!(out.contains("SHARD") && out.contains("up"), "{out}");
        // Endpoint failover: a dead endpoint first, a live one second.
        let dead = format!("127.0.0.1:{}", common::free_ports(1)[0]);
        let (code, out, err) = kvctl_with(
            &["--endpoints", &format!("{dead},{}", c.addrs[0])],
            &["get", "missing-too"],
        );
        assert_eq!((code, out.as_str()), (1, ""), "{err}");
        // Nothing reachable: exit 2 with a message.
        let (code, _, err) = kvctl_with(
            &["--endpoints", &dead, "--timeout-ms", "1000"],
            &["get", "a"],
        );
        assert_eq!(code, 2);
        assert!(err.contains("unavailable"), "{err}");
        // The interactive prompt, fed from a pipe.
        let mut child = std::process::Command::new(common::KVCTL)
            .args(["--endpoints", &c.addrs[1]])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("kvctl prompt");
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().expect("stdin");
            stdin
                .write_all(b"put p 123\nget p\ndelete p\nget p\n")
                .expect("write");
        }
        let out = child.wait_with_output().expect("prompt output");
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.contains("OK")
                && out.contains("FOUND value=123")
                && out.contains("DELETED")
                && out.contains("NOT FOUND"),
            "{out}"
        );
        assert!(out.contains("[Node "), "{out}");
    });
}

#[test]
fn bad_config_and_foreign_data_dirs_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("c.toml");
    let data = dir.path().join("data");
    let cfg_s = cfg.to_str().expect("utf8");

    std::fs::write(&cfg, "[[nodes]]\nid = 0\naddr = \"127.0.0.1\"\n").expect("write");
    let (code, err) = kvnode_exit(&["--id", "0", "--config", cfg_s], &data);
    assert_eq!(code, 2);
    assert_eq!(err.trim().lines().count(), 1, "one clear line: {err}");
    assert!(err.contains("host:port"), "{err}");

    let ports = common::free_ports(3);
    let good: String = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("[[nodes]]\nid = {i}\naddr = \"127.0.0.1:{p}\"\n"))
        .collect();
    std::fs::write(&cfg, &good).expect("write");
    let (code, err) = kvnode_exit(&["--id", "7", "--config", cfg_s], &data);
    assert_eq!(code, 2);
    assert!(err.contains("node id 7"), "{err}");

    std::fs::write(&cfg, format!("shard = 3\n{good}")).expect("write");
    let (code, err) = kvnode_exit(&["--id", "0", "--config", cfg_s], &data);
    assert_eq!(code, 2);
    assert!(err.contains("unknown key"), "{err}");

    // Address in use.
    std::fs::write(&cfg, &good).expect("write");
    let busy = std::net::TcpListener::bind(format!("127.0.0.1:{}", ports[0])).expect("bind");
    let (code, err) = kvnode_exit(&["--id", "0", "--config", cfg_s], &data);
    assert_eq!(code, 2);
    assert!(err.contains("cannot listen"), "{err}");
    drop(busy);

    // A data dir of another node.
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::write(
        data.join("IDENTITY"),
        "node_id = 1\ncluster_name = \"kvstore\"\nshards = 8\n",
    )
    .expect("write");
    let (code, err) = kvnode_exit(&["--id", "0", "--config", cfg_s], &data);
    assert_eq!(code, 2);
    assert!(err.contains("belongs to node 1"), "{err}");
    // And of another cluster.
    std::fs::write(
        data.join("IDENTITY"),
        "node_id = 0\ncluster_name = \"other\"\nshards = 8\n",
    )
    .expect("write");
    let (code, err) = kvnode_exit(&["--id", "0", "--config", cfg_s], &data);
    assert_eq!(code, 2);
    assert!(err.contains("cluster \"other\""), "{err}");
}

#[test]
fn sigterm_stops_gracefully_and_loses_nothing() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let client = c.client_all();
        for i in 0..50u32 {
            client
                .put(format!("g{i}").as_bytes(), b"v")
                .await
                .expect("put");
        }
        for i in 0..3 {
            let status = c.stop(i);
            assert!(status.success(), "node {i} exit status {status:?}");
        }
        for i in 0..3 {
            c.spawn(i);
        }
        c.wait_ready(Duration::from_secs(30)).await;
        let client = c.client_all();
        for i in 0..50u32 {
            let got = client
                .get(format!("g{i}").as_bytes(), false)
                .await
                .expect("get");
            assert_eq!(got.value.as_deref(), Some(&b"v"[..]));
        }
    });
}

/// A WAL damaged in the middle (not a torn tail) must stop the node from starting, with a clear
/// message, rather than serve a log with a hole in it.
#[test]
fn wal_damage_in_the_middle_refuses_to_start() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "").await;
        let client = c.client_all();
        for i in 0..100u32 {
            client
                .put(format!("w{i}").as_bytes(), &[b'x'; 100])
                .await
                .expect("put");
        }
        assert!(c.stop(0).success());
        let wal = c.data_dir(0).join("wal");
        let mut segs: Vec<_> = std::fs::read_dir(&wal)
            .expect("wal dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        segs.sort();
        let seg = segs.first().expect("a segment");
        let mut bytes = std::fs::read(seg).expect("read segment");
        assert!(bytes.len() > 4000, "segment has records");
        // Flip a byte in an early record; intact records follow it.
        bytes[2000] ^= 0xff;
        std::fs::write(seg, &bytes).expect("write segment");
        let cfg = c.config.to_str().expect("utf8").to_string();
        let (code, err) = common::kvnode_exit(&["--id", "0", "--config", &cfg], &c.data_dir(0));
        assert_eq!(code, 2, "{err}");
        let last = err.trim().lines().last().unwrap_or_default();
        assert!(
            last.starts_with("kvnode: write-ahead log") && last.contains(".wal"),
            "{err}"
        );
    });
}

/// The fixtures' nodes die with the thread that started them, so a test process killed outright
/// (no `Drop` runs) leaves no node behind.
#[test]
fn a_node_dies_with_the_thread_that_started_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = common::free_ports(3);
    let config = dir.path().join("cluster.toml");
    let nodes: String = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("[[nodes]]\nid = {i}\naddr = \"127.0.0.1:{p}\"\n\n"))
        .collect();
    std::fs::write(&config, nodes).expect("write config");
    let data = dir.path().join("node0");
    // Not waited for in the thread on purpose: the thread must end with the node running; the
    // test reaps it with waitpid at the end.
    #[allow(clippy::zombie_processes)]
    let pid = std::thread::spawn(move || {
        let child = common::kvnode()
            .args(["--id", "0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn kvnode");
        // Serving (it waits for its peers): alive until something kills it.
        let addr = format!("127.0.0.1:{}", ports[0]);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "node never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        child.id()
    })
    .join()
    .expect("starter thread");
    // The starter thread has ended: the kernel kills the node (it stays a zombie, unreaped).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit(')').next().map(|r| r.trim().to_string()));
        match state {
            None => break,
            Some(s) if s.starts_with('Z') || s.starts_with('X') => break,
            Some(_) => {}
        }
        if std::time::Instant::now() > deadline {
            // Do not leave it running if the mechanism failed.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("node {pid} outlived the thread that started it");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reap it.
    unsafe {
        libc::waitpid(pid as i32, std::ptr::null_mut(), 0);
    }
}

/// `kvctl bench` for 1 s after 0.2 s of warm-up against `endpoints`, with `args`: its JSON report,
/// checked for successful operations, no errors and ordered percentiles.
fn bench_report(endpoints: &str, args: &[&str]) -> serde_json::Value {
    let common = [
        "bench",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--output",
        "json",
    ];
    let (code, out, err) = kvctl_with(&["--endpoints", endpoints], &[&common[..], args].concat());
    assert_eq!(code, 0, "kvctl bench {args:?}: {err}");
    let r: serde_json::Value = serde_json::from_str(&out).expect("JSON report");
    assert!(r["ops"].as_u64().unwrap_or(0) > 0, "{r}");
    assert!(r["ops_per_sec"].as_f64().unwrap_or(0.0) > 0.0, "{r}");
    assert_eq!(r["errors"].as_u64(), Some(0), "{r}");
    let l = &r["latency_ms"];
    let p = |k: &str| l[k].as_f64().expect("a percentile");
    assert!(
        p("p50") > 0.0 && p("p50") <= p("p99") && p("p99") <= p("max"),
        "{l}"
    );
    r
}

/// `kvctl bench` against a real cluster, end to end: a preloaded 50/50 run and a stale-read run
/// on unary calls, each reporting successful operations, no errors and ordered percentiles in
/// its JSON; the preload wrote every key of the key space, with the requested value size.
#[test]
fn kvctl_bench_measures_a_cluster() {
    rt().block_on(async {
        let c = Cluster::start(3, "").await;
        let eps = c.addrs.join(",");
        let run = |extra: &[&str]| {
            let args = ["--clients", "4", "--keys", "200", "--value-size", "100"];
            bench_report(&eps, &[&args[..], extra].concat())
        };

        let r = run(&["--workload", "a", "--preload"]);
        assert_eq!(r["workload"].as_str(), Some("a"), "{r}");
        assert_eq!(r["preload"]["keys"].as_u64(), Some(200), "{r}");
        assert_eq!(r["preload"]["errors"].as_u64(), Some(0), "{r}");
        assert!(r["get"]["ops"].as_u64().unwrap_or(0) > 0, "{r}");
        assert!(r["put"]["ops"].as_u64().unwrap_or(0) > 0, "{r}");
        assert_eq!(r["not_found"].as_u64(), Some(0), "every key preloaded: {r}");
        let client = c.client_all();
        for k in [0u32, 57, 199] {
            let key = format!("bench/{k:010}");
            let got = client.get(key.as_bytes(), false).await.expect("get");
            assert_eq!(got.value.map(|v| v.len()), Some(100), "{key}");
        }

        let r = run(&["--workload", "c", "--stale", "--unary", "--no-routing"]);
        assert_eq!(r["reads"].as_str(), Some("stale"), "{r}");
        assert_eq!(r["routed"].as_bool(), Some(false), "{r}");
        assert!(r["put"].is_null(), "a read-only run reports no puts: {r}");
    });
}

/// A stand-in for etcd's KV service: stores what it is sent and counts how it was asked.
#[derive(Default)]
struct FakeEtcd {
    data: std::sync::Mutex<std::collections::HashMap<Vec<u8>, Vec<u8>>>,
    puts: std::sync::atomic::AtomicU64,
    linearizable: std::sync::atomic::AtomicU64,
    serializable: std::sync::atomic::AtomicU64,
    value_sizes: std::sync::Mutex<std::collections::BTreeSet<usize>>,
}

#[tonic::async_trait]
impl etcdpb::kv_server::Kv for FakeEtcd {
    async fn range(
        &self,
        req: tonic::Request<etcdpb::RangeRequest>,
    ) -> Result<tonic::Response<etcdpb::RangeResponse>, tonic::Status> {
        use std::sync::atomic::Ordering::Relaxed;
        let r = req.into_inner();
        if r.serializable {
            &self.serializable
        } else {
            &self.linearizable
        }
        .fetch_add(1, Relaxed);
        let kvs = self
            .data
            .lock()
            .unwrap()
            .get(&r.key)
            .map(|v| etcdpb::KeyValue {
                key: r.key.clone(),
                value: v.clone(),
                ..Default::default()
            })
            .into_iter()
            .collect::<Vec<_>>();
        Ok(tonic::Response::new(etcdpb::RangeResponse {
            count: kvs.len() as i64,
            kvs,
            ..Default::default()
        }))
    }

    async fn put(
        &self,
        req: tonic::Request<etcdpb::PutRequest>,
    ) -> Result<tonic::Response<etcdpb::PutResponse>, tonic::Status> {
        let r = req.into_inner();
        self.puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.value_sizes.lock().unwrap().insert(r.value.len());
        self.data.lock().unwrap().insert(r.key, r.value);
        Ok(tonic::Response::new(Default::default()))
    }
}

/// `kvctl bench --target etcd` speaks etcd's v3 KV API: against a stand-in etcd it preloads
/// every key with the requested value size, reads linearizably (or serializably with
/// `--stale`), and reports its runs like a kvstore run.
#[test]
fn kvctl_bench_speaks_etcd() {
    use std::sync::atomic::Ordering::Relaxed;
    rt().block_on(async {
        let etcd = std::sync::Arc::new(FakeEtcd::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(etcdpb::kv_server::KvServer::from_arc(etcd.clone()))
                .serve_with_incoming(kvstore::server::incoming(listener, 16)),
        );
        let run = |extra: &[&str]| {
            let args = [
                "--target",
                "etcd",
                "--clients",
                "4",
                "--keys",
                "100",
                "--value-size",
                "64",
            ];
            let r =
                tokio::task::block_in_place(|| bench_report(&addr, &[&args[..], extra].concat()));
            assert_eq!(r["target"].as_str(), Some("etcd"), "{r}");
            r
        };

        let r = run(&["--workload", "a", "--preload"]);
        assert_eq!(r["preload"]["keys"].as_u64(), Some(100), "{r}");
        assert_eq!(r["not_found"].as_u64(), Some(0), "every key preloaded: {r}");
        assert_eq!(etcd.data.lock().unwrap().len(), 100);
        assert_eq!(*etcd.value_sizes.lock().unwrap(), [64].into());
        assert!(
            etcd.puts.load(Relaxed) > 100,
            "the preload, then the run's puts"
        );
        let linearizable = etcd.linearizable.load(Relaxed);
        assert!(linearizable > 0);
        assert_eq!(etcd.serializable.load(Relaxed), 0);

        let r = run(&["--workload", "c", "--stale"]);
        assert_eq!(r["reads"].as_str(), Some("stale"), "{r}");
        let stale_reads = r["get"]["ops"].as_u64().unwrap_or(0);
        assert!(
            etcd.serializable.load(Relaxed) >= stale_reads && stale_reads > 0,
            "--stale reads are serializable: {r}"
        );
        // At most one read per client of the first run was still on its way when it exited.
        assert!(etcd.linearizable.load(Relaxed) <= linearizable + 4);
        server.abort();
    });
}
