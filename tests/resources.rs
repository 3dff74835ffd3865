//! Bounded resources: abusive clients must not take a node down, blow up its memory, or starve
//! well-behaved clients.
//!
//! Each abuse runs against node 0 of a 3-node cluster while a normal client keeps doing a
//! put + linearizable get through node 0 alone; the test prints that client's latencies and node
//! 0's resident memory (VmRSS from /proc) before, during and after. It asserts only loose bounds:
//! every probe answers within the request timeout, the node stays up, and RSS stays under a
//! generous ceiling. The abuses:
//!
//! 1. 2,000 idle TCP connections (no byte sent);
//! 2. 300 connections that send half of the HTTP/2 preface and stall;
//! 3. stalled readers: connections that open many streams, each a `Get` of a 1 MiB value, with an
//!    HTTP/2 receive window of 0, and never read a byte: the node must not buffer without bound;
//! 4. a flood of oversize puts (5 MiB values, 32 at a time): all refused, none stored; and one
//!    of 20 MiB, over the client message limit: refused before being buffered.
//!
//! Then it checks that the node closed every abusive connection by itself (no preface within the
//! handshake timeout; keepalive PINGs unanswered). `KV_RESOURCES_PAUSE=SECS` keeps the cluster
//! up that long at the end, to look at node 0 by hand.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{rt, Cluster};
use kvstore::client::{Client, ClientError};

const VICTIM: usize = 0;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Far above what a healthy node needs (tens of MiB), far below "memory exploded".
const RSS_CEILING_MIB: u64 = 1024;

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}

/// Latencies of a well-behaved client's put + get through node 0, sampled until `stop`.
struct Prober {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<Duration>>,
}

impl Prober {
    fn start(c: &Cluster, tag: &'static str) -> Prober {
        let client = Client::new(&[c.addrs[VICTIM].clone()], REQUEST_TIMEOUT).expect("client");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("probe-{tag}-{n}");
                let t = Instant::now();
                client
                    .put(key.as_bytes(), b"v")
                    .await
                    .unwrap_or_else(|e| panic!("{tag}: a normal put failed during abuse: {e}"));
                let got = client
                    .get(key.as_bytes(), false)
                    .await
                    .unwrap_or_else(|e| panic!("{tag}: a normal get failed during abuse: {e}"));
                assert_eq!(got.value.as_deref(), Some(&b"v"[..]));
                samples.push(t.elapsed());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            samples
        });
        Prober { stop, task }
    }

    async fn finish(self) -> Vec<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("prober")
    }
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    if samples.is_empty() {
        return "no samples".into();
    }
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    format!(
        "{} probes, put+get p50 {:.1?}, p99 {:.1?}, max {:.1?}",
        samples.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    )
}

/// Runs `abuse` (which returns what must be kept alive while it lasts) and reports.
async fn under_abuse<T>(
    c: &mut Cluster,
    name: &'static str,
    hold: Duration,
    abuse: impl std::future::Future<Output = T>,
) -> T {
    let pid = c.pid(VICTIM).expect("node 0 runs");
    let before = rss_mib(pid);
    let t = Instant::now();
    let kept = abuse.await;
    let set_up = t.elapsed();
    let prober = Prober::start(c, name);
    let mut peak = rss_mib(pid);
    let until = Instant::now() + hold;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss_mib(pid));
    }
    let mut samples = prober.finish().await;
    assert!(c.is_running(VICTIM), "{name}: node 0 died");
    println!(
        "{name}: set up in {set_up:.1?}; RSS {before} MiB before, peak {peak} MiB; {}",
        summary(&mut samples)
    );
    assert!(
        samples.iter().all(|d| *d < REQUEST_TIMEOUT * 2),
        "{name}: a normal request took longer than the request timeout"
    );
    assert!(
        peak < RSS_CEILING_MIB,
        "{name}: node 0's memory exploded: {peak} MiB"
    );
    kept
}

fn connect(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_nodelay(true).ok();
    s
}

/// A literal HPACK header field without indexing, new name (RFC 7541 6.2.2), short strings.
fn hpack_literal(out: &mut Vec<u8>, name: &str, value: &str) {
    assert!(name.len() < 127 && value.len() < 127);
    out.push(0x00);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// Bytes of an HTTP/2 connection that announces a receive window of 0 (so the server may not
/// send any response body) and opens `streams` unary `Get`s of `key`.
fn stalled_reader_bytes(authority: &str, key: &[u8], streams: u32) -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS: INITIAL_WINDOW_SIZE (0x4) = 0.
    frame(&mut out, 0x4, 0, 0, &[0, 4, 0, 0, 0, 0]);
    // The GetRequest protobuf: field 1 (key, bytes), field 2 (stale) = true.
    let mut msg = vec![0x0a, key.len() as u8];
    msg.extend_from_slice(key);
    msg.extend_from_slice(&[0x10, 0x01]);
    let mut grpc = vec![0u8];
    grpc.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    grpc.extend_from_slice(&msg);
    for i in 0..streams {
        let id = 1 + 2 * i;
        let mut headers = Vec::new();
        hpack_literal(&mut headers, ":method", "POST");
        hpack_literal(&mut headers, ":scheme", "http");
        hpack_literal(&mut headers, ":path", "/kv.v1.KeyValue/Get");
        hpack_literal(&mut headers, ":authority", authority);
        hpack_literal(&mut headers, "content-type", "application/grpc");
        hpack_literal(&mut headers, "te", "trailers");
        frame(&mut out, 0x1, 0x4, id, &headers); // HEADERS, END_HEADERS
        frame(&mut out, 0x0, 0x1, id, &grpc); // DATA, END_STREAM
    }
    out
}

/// Reads from an abusive connection until the server closes it; false if still open at `deadline`.
fn closed_by_server(s: &mut TcpStream, deadline: Instant) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left.min(Duration::from_secs(1))))
            .expect("read timeout");
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
}

#[test]
fn abusive_clients_do_not_take_a_node_down() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "shards = 2").await;
        let addr = c.addrs[VICTIM].clone();
        let client = c.client(&[VICTIM]);
        let big = vec![7u8; 1024 * 1024];
        client.put(b"big", &big).await.expect("put big");
        let baseline = Prober::start(&c, "baseline");
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut samples = baseline.finish().await;
        let pid = c.pid(VICTIM).expect("pid");
        let rss_baseline = rss_mib(pid);
        println!(
            "baseline: RSS {rss_baseline} MiB; {}",
            summary(&mut samples)
        );
        let abuse_start = Instant::now();

        // 1. Idle connections: not a byte sent.
        let idle: Vec<TcpStream> = under_abuse(
            &mut c,
            "2000 idle TCP connections",
            Duration::from_secs(2),
            {
                let addr = addr.clone();
                async move {
                    tokio::task::spawn_blocking(move || (0..2000).map(|_| connect(&addr)).collect())
                        .await
                        .expect("connect idle")
                }
            },
        )
        .await;

        // 2. Half a preface, then nothing.
        let slow: Vec<TcpStream> =
            under_abuse(&mut c, "300 half-preface stalls", Duration::from_secs(2), {
                let addr = addr.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        (0..300)
                            .map(|_| {
                                let mut s = connect(&addr);
                                s.write_all(b"PRI * HTTP/2.0\r\n").expect("write");
                                s
                            })
                            .collect()
                    })
                    .await
                    .expect("connect slow")
                }
            })
            .await;

        // 3. Streams whose responses (1 MiB each) can never be sent: the client announces a
        // window of 0 and never reads, not even the server's PINGs.
        const CONNS: u32 = 4;
        const STREAMS: u32 = 100;
        let stalled: Vec<TcpStream> = under_abuse(
            &mut c,
            "stalled readers (4 conns x 100 streams of 1 MiB)",
            Duration::from_secs(3),
            {
                let addr = addr.clone();
                async move {
                    tokio::task::spawn_blocking(move || {
                        (0..CONNS)
                            .map(|_| {
                                let mut s = connect(&addr);
                                let bytes = stalled_reader_bytes(&addr, b"big", STREAMS);
                                s.write_all(&bytes).expect("write streams");
                                s
                            })
                            .collect()
                    })
                    .await
                    .expect("stalled readers")
                }
            },
        )
        .await;

        // 4. Oversize puts, 32 at a time: refused without being buffered.
        let refused = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let flood: Vec<_> = (0..32)
            .map(|i| {
                let client =
                    Client::new(std::slice::from_ref(&addr), REQUEST_TIMEOUT).expect("client");
                let (refused, stop) = (refused.clone(), stop.clone());
                tokio::spawn(async move {
                    let value = vec![1u8; 5 * 1024 * 1024];
                    let key = format!("oversize-{i}");
                    while !stop.load(Ordering::Relaxed) {
                        match client.put(key.as_bytes(), &value).await {
                            Ok(_) => panic!("a 5 MiB value was accepted"),
                            // RESOURCE_EXHAUSTED: the message is over the server's limit.
                            Err(ClientError::InvalidArgument(_) | ClientError::Unknown(_)) => {}
                            Err(e) => panic!("oversize put: unexpected error {e}"),
                        }
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        under_abuse(
            &mut c,
            "oversize puts (5 MiB values, 32 concurrent)",
            Duration::from_secs(3),
            async {},
        )
        .await;
        stop.store(true, Ordering::Relaxed);
        for t in flood {
            t.await.expect("flood task");
        }
        println!("oversize puts refused: {}", refused.load(Ordering::Relaxed));
        for i in 0..32 {
            let got = client
                .get(format!("oversize-{i}").as_bytes(), false)
                .await
                .expect("get");
            assert_eq!(got.value, None, "an oversize value was stored");
        }

        // Over the client message limit (8 MiB): refused before it is buffered.
        let huge = vec![2u8; 20 * 1024 * 1024];
        let t = Instant::now();
        match client.put(b"huge", &huge).await {
            Ok(_) => panic!("a 20 MiB value was accepted"),
            Err(e) => println!("20 MiB put refused in {:.1?}: {e}", t.elapsed()),
        }
        let got = client.get(b"huge", false).await.expect("get huge");
        assert_eq!(got.value, None, "the 20 MiB value was stored");

        // The node closes what it must not keep: connections without a preface after the
        // handshake timeout (10 s), stalled readers after an unanswered keepalive PING (<= 20 s).
        let deadline = abuse_start + Duration::from_secs(40);
        let t = Instant::now();
        let abusive: Vec<(&str, Vec<TcpStream>)> = vec![
            ("idle", idle),
            ("half-preface", slow),
            ("stalled reader", stalled),
        ];
        let report = tokio::task::spawn_blocking(move || {
            abusive
                .into_iter()
                .map(|(what, conns)| {
                    let n = conns.len();
                    let open = conns
                        .into_iter()
                        .filter_map(|mut s| (!closed_by_server(&mut s, deadline)).then_some(()))
                        .count();
                    (what, n, open)
                })
                .collect::<Vec<_>>()
        })
        .await
        .expect("check closed");
        for (what, n, open) in &report {
            println!(
                "{what} connections: {n} opened, {open} still open after {:.1?}",
                t.elapsed()
            );
            assert_eq!(*open, 0, "the node keeps {open} {what} connections open");
        }
        println!(
            "after: RSS {} MiB (baseline {rss_baseline} MiB)",
            rss_mib(pid)
        );
        if let Ok(secs) = std::env::var("KV_RESOURCES_PAUSE") {
            // For looking at the node by hand (gdb, /proc/PID/smaps) after the abuse.
            println!("pausing {secs} s; node 0 is pid {pid}");
            let secs: u64 = secs.parse().unwrap_or(60);
            tokio::time::sleep(Duration::from_secs(secs)).await;
        }
        let got = client.get(b"big", false).await.expect("get big");
        assert_eq!(got.value.map(|v| v.len()), Some(big.len()));
        assert!(c.is_running(VICTIM));
    });
}
