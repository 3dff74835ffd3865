//! `kvctl bench`: a closed-loop load generator for kvstore, and for etcd, measured the same way.
//!
//! Each of `--clients` tasks sends one request, waits for the reply, and sends the next: the
//! offered load is whatever the cluster can absorb at that concurrency, so ops/s and latency are
//! two views of the same run (Little's law: clients ≈ ops/s × mean latency). The clients share
//! `--connections` gRPC channels (one HTTP/2 connection each), spread round-robin over the
//! endpoints, since every node serves every key. Against kvstore, writes and linearizable reads
//! go straight to the endpoint of the key's shard leader, as [`crate::client`] sends them (at
//! least one connection per endpoint then); `--no-routing` sends each to the client's own
//! connection and lets the node forward it, as before.
//!
//! Workloads follow YCSB's core mixes: `a` 50% get / 50% put, `b` 95/5, `c` read-only, and
//! `write` put-only. Keys are drawn uniformly or from a YCSB-style zipfian (θ = 0.99) whose hot
//! keys are scattered over the key space by a fixed permutation. `--preload` writes every key
//! once first, so reads find data.
//!
//! What is measured: the `--duration` window after `--warmup`. An operation counts when it
//! started inside the window and finished before its end; the one still in flight at the end is
//! abandoned. Latency is that of successful operations, from the client's send to its receipt of
//! the reply. Failed operations are counted as errors (the first few messages are kept), the
//! client pauses 10 ms so a dead cluster is not spun on, and the run goes on: the exit status is
//! 0 once the run completed, 2 when it could not start (bad arguments, endpoints unreachable).
//!
//! etcd is spoken through a minimal copy of its `etcdserverpb.KV` service (`proto/etcd_kv.proto`):
//! a get is `Range` of one key, linearizable unless `--stale` (then `serializable`, etcd's
//! member-local read); a put is `Put`. kvstore's gets are `Get` with `stale` as given.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde::Serialize;
use tonic::transport::Channel;

use crate::client::{RouteHint, Routes, Session};
use crate::pb;
use crate::peers::MAX_MESSAGE;

/// Generated client for the slice of etcd's v3 API in `proto/etcd_kv.proto`.
pub mod etcdpb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("etcdserverpb");
}

/// The skew of `--distribution zipfian`, as in YCSB.
pub const ZIPF_THETA: f64 = 0.99;

/// Pause after a failed operation, so an unreachable cluster is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(10);

/// Error messages kept for the report.
const ERROR_SAMPLES: usize = 5;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// What the endpoints are: a kvstore cluster, or etcd (v3 gRPC, e.g. 127.0.0.1:12379).
    #[arg(long, value_enum, default_value_t = Target::Kvstore)]
    pub target: Target,
    /// Operation mix. Aliases: write-only = write; mixed, update-heavy, ycsb-a = a;
    /// read-mostly, ycsb-b = b; read, read-only, ycsb-c = c.
    #[arg(long, short = 'w', value_enum, default_value_t = Workload::Write)]
    pub workload: Workload,
    /// Size of the key space: keys bench/0000000000 … bench/<keys-1>.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,
    /// Bytes per value (random, the same for every put of the run).
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Concurrent closed-loop clients.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pub clients: u64,
    /// gRPC connections the clients share [default: min(clients, 8)].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub connections: Option<u64>,
    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring (connections warm, leaders settled).
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// How keys are drawn: uniform, or zipfian (θ = 0.99, YCSB's skew).
    #[arg(long, value_enum, default_value_t = KeyDistribution::Uniform)]
    pub distribution: KeyDistribution,
    /// Stale reads (kvstore: the contacted node's replica; etcd: serializable) instead of
    /// linearizable ones.
    #[arg(long)]
    pub stale: bool,
    /// Write every key once before measuring.
    #[arg(long)]
    pub preload: bool,
    /// Concurrent writers during --preload.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub preload_clients: u64,
    /// Result format: a table for people, or one JSON object for scripts.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Seed of the key and operation choices [default: from the clock].
    #[arg(long)]
    pub seed: Option<u64>,
    /// kvstore: do not send requests to the shard's leader; each client uses its own connection
    /// and the contacted node forwards (the behaviour before shard-aware routing).
    #[arg(long)]
    pub no_routing: bool,
    /// kvstore: one unary gRPC call per request instead of the client library's session streams
    /// (`kv.v1.KeyValue/Session`, many requests multiplexed on one stream per connection).
    #[arg(long)]
    pub unary: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Kvstore,
    Etcd,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// 100% put.
    #[value(aliases = ["write-only", "put"])]
    Write,
    /// YCSB-A: 50% get, 50% put.
    #[value(name = "a", aliases = ["ycsb-a", "update-heavy", "mixed"])]
    A,
    /// YCSB-B: 95% get, 5% put.
    #[value(name = "b", aliases = ["ycsb-b", "read-mostly", "read-heavy"])]
    B,
    /// YCSB-C: 100% get.
    #[value(name = "c", aliases = ["ycsb-c", "read", "read-only"])]
    C,
}

impl Workload {
    /// Fraction of operations that are gets.
    pub fn read_fraction(self) -> f64 {
        match self {
            Workload::Write => 0.0,
            Workload::A => 0.5,
            Workload::B => 0.95,
            Workload::C => 1.0,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Workload::Write => "write",
            Workload::A => "a",
            Workload::B => "b",
            Workload::C => "c",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Workload::Write => "write: 100% put",
            Workload::A => "YCSB-A: 50% get, 50% put",
            Workload::B => "YCSB-B: 95% get, 5% put",
            Workload::C => "YCSB-C: 100% get",
        }
    }

    /// The operation for a uniform draw `u` in [0, 1).
    pub fn choose(self, u: f64) -> OpKind {
        if u < self.read_fraction() {
            OpKind::Get
        } else {
            OpKind::Put
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    Get,
    Put,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyDistribution {
    Uniform,
    Zipfian,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

// ---------------------------------------------------------------------------------------------
// Key choice

/// YCSB's zipfian generator (Gray et al., "Quickly generating billion-record synthetic
/// databases", SIGMOD 1994): rank 0 is the most popular, P(rank i) ∝ 1/(i+1)^θ. Set-up sums
/// n terms once; each draw is O(1).
#[derive(Debug, Clone)]
pub struct Zipfian {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipfian {
    pub fn new(n: u64, theta: f64) -> Zipfian {
        assert!(n >= 1 && theta > 0.0 && theta < 1.0);
        let zetan = zeta(n, theta);
        let zeta2 = zeta(2.min(n), theta);
        let eta = if n > 2 {
            (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan)
        } else {
            0.0
        };
        Zipfian {
            n,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta,
        }
    }

    /// The rank for a uniform draw `u` in [0, 1).
    pub fn rank(&self, u: f64) -> u64 {
        let uz = u * self.zetan;
        if uz < 1.0 || self.n == 1 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) || self.n == 2 {
            return 1;
        }
        let r = (self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        r.min(self.n - 1)
    }
}

fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

/// A Mersenne prime larger than any key space: multiplying by it modulo n is a bijection on
/// 0..n (gcd(P, n) = 1 since P is prime and P > n), which scatters the zipfian's hot ranks over
/// the key space instead of crowding them at its start.
const SCATTER: u128 = (1 << 61) - 1;

pub enum KeyChooser {
    Uniform(u64),
    Zipfian(Zipfian),
}

impl KeyChooser {
    pub fn new(dist: KeyDistribution, keys: u64) -> KeyChooser {
        match dist {
            KeyDistribution::Uniform => KeyChooser::Uniform(keys),
            KeyDistribution::Zipfian => KeyChooser::Zipfian(Zipfian::new(keys, ZIPF_THETA)),
        }
    }

    pub fn next(&self, rng: &mut impl Rng) -> u64 {
        match self {
            KeyChooser::Uniform(n) => rng.gen_range(0..*n),
            KeyChooser::Zipfian(z) => {
                let rank = z.rank(rng.gen::<f64>());
                ((rank as u128 * SCATTER) % z.n as u128) as u64
            }
        }
    }
}

pub fn key_name(index: u64) -> Vec<u8> {
    format!("bench/{index:010}").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Latency

/// Latencies in microseconds, 3 significant digits, up to an hour.
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds"))
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        self.0.saturating_record((d.as_micros() as u64).max(1));
    }

    pub fn add(&mut self, other: &Latency) {
        // Same bounds on both sides: cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The latency at quantile `q` (0.5 = median), in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            mean: self.0.mean().round() / 1000.0,
            p50: self.quantile_ms(0.50),
            p95: self.quantile_ms(0.95),
            p99: self.quantile_ms(0.99),
            p999: self.quantile_ms(0.999),
            max: self.0.max() as f64 / 1000.0,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct LatencySummary {
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct OpReport {
    pub ops: u64,
    pub ops_per_sec: f64,
    pub errors: u64,
    pub latency_ms: LatencySummary,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct PreloadReport {
    pub keys: u64,
    pub seconds: f64,
    pub keys_per_sec: f64,
    pub errors: u64,
}

/// The result of one run; `--output json` prints exactly this.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct Report {
    pub target: Target,
    pub workload: String,
    pub workload_description: String,
    pub read_fraction: f64,
    /// "linearizable" or "stale".
    pub reads: String,
    pub distribution: String,
    pub keys: u64,
    pub value_size: usize,
    pub clients: u64,
    pub connections: u64,
    /// kvstore: requests were sent to the key's shard leader (see `--no-routing`).
    pub routed: bool,
    pub endpoints: Vec<String>,
    pub warmup_s: f64,
    pub duration_s: f64,
    /// Successful operations in the measured window.
    pub ops: u64,
    pub ops_per_sec: f64,
    pub errors: u64,
    /// Gets that found no value (expected without --preload).
    pub not_found: u64,
    /// Latency of all successful operations.
    pub latency_ms: LatencySummary,
    pub get: Option<OpReport>,
    pub put: Option<OpReport>,
    pub preload: Option<PreloadReport>,
    pub error_samples: Vec<String>,
    pub seed: u64,
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report always serializes")
    }

    pub fn to_table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "{} bench, workload {} ({}); {} keys, {}, {}-byte values, {} reads\n",
            target_name(self.target),
            self.workload,
            self.workload_description,
            self.keys,
            self.distribution,
            self.value_size,
            self.reads
        ));
        s.push_str(&format!(
            "{} clients on {} connections to {}{}; {:.1} s measured after {:.1} s warm-up\n",
            self.clients,
            self.connections,
            self.endpoints.join(","),
            if self.routed {
                " (each request to its shard's leader)"
            } else {
                ""
            },
            self.duration_s,
            self.warmup_s
        ));
        if let Some(p) = &self.preload {
            s.push_str(&format!(
                "preload: {} keys in {:.1} s ({:.0} keys/s, {} errors)\n",
                p.keys, p.seconds, p.keys_per_sec, p.errors
            ));
        }
        if self.not_found > 0 {
            s.push_str(&format!(
                "note: {} gets found no value (use --preload to fill the key space)\n",
                self.not_found
            ));
        }
        s.push('\n');
        s.push_str(&format!(
            "{:<8} {:<8} {:<4} {:>7} {:>10} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7}\n",
            "TARGET",
            "WORKLOAD",
            "OP",
            "CLIENTS",
            "OPS",
            "OPS/S",
            "P50 MS",
            "P95 MS",
            "P99 MS",
            "P999 MS",
            "ERRORS"
        ));
        let row = |op: &str, ops: u64, rate: f64, l: &LatencySummary, errors: u64| {
            format!(
                "{:<8} {:<8} {:<4} {:>7} {:>10} {:>10.1} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>7}\n",
                target_name(self.target),
                self.workload,
                op,
                self.clients,
                ops,
                rate,
                l.p50,
                l.p95,
                l.p99,
                l.p999,
                errors
            )
        };
        s.push_str(&row(
            "all",
            self.ops,
            self.ops_per_sec,
            &self.latency_ms,
            self.errors,
        ));
        // Per-operation rows only say something new for a mix.
        if let (Some(g), Some(p)) = (&self.get, &self.put) {
            s.push_str(&row("get", g.ops, g.ops_per_sec, &g.latency_ms, g.errors));
            s.push_str(&row("put", p.ops, p.ops_per_sec, &p.latency_ms, p.errors));
        }
        if !self.error_samples.is_empty() {
            s.push_str("\nfirst errors:\n");
            for e in &self.error_samples {
                s.push_str(&format!("  {e}\n"));
            }
        }
        s
    }
}

fn target_name(t: Target) -> &'static str {
    match t {
        Target::Kvstore => "kvstore",
        Target::Etcd => "etcd",
    }
}

// ---------------------------------------------------------------------------------------------
// Connections

/// One gRPC connection, to kvstore's `kv.v1.KeyValue` (a session stream, or unary calls) or
/// etcd's `etcdserverpb.KV`.
#[derive(Clone)]
enum Conn {
    Session(Arc<Session>),
    Kv(pb::key_value_client::KeyValueClient<Channel>),
    Etcd(etcdpb::kv_client::KvClient<Channel>),
}

impl Conn {
    fn new(target: Target, endpoint: &str, unary: bool) -> Result<Conn, String> {
        let ch = crate::peers::channel(endpoint, Duration::from_secs(2))
            .map_err(|e| format!("bad endpoint {endpoint}: {e}"))?;
        Ok(match target {
            Target::Kvstore if !unary => Conn::Session(Arc::new(Session::new(endpoint, ch))),
            Target::Kvstore => Conn::Kv(
                pb::key_value_client::KeyValueClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            ),
            Target::Etcd => Conn::Etcd(
                etcdpb::kv_client::KvClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            ),
        })
    }

    /// Whether the key has a value. `routes`: learn the key's shard leader from the reply.
    async fn get(
        &mut self,
        key: Vec<u8>,
        stale: bool,
        timeout: Duration,
        routes: Option<&Routes>,
    ) -> Result<bool, tonic::Status> {
        match self {
            Conn::Session(s) => {
                let k = routes.map(|_| key.clone());
                let op = pb::session_request::Op::Get(pb::GetRequest { key, stale });
                let (result, hint) = s.call(op, timeout).await?;
                if let (Some(routes), Some(k)) = (routes, k) {
                    routes.learn(&k, &hint);
                }
                Ok(matches!(result, pb::session_reply::Result::Get(g) if g.found))
            }
            Conn::Kv(c) => {
                let k = routes.map(|_| key.clone());
                let mut r = tonic::Request::new(pb::GetRequest { key, stale });
                r.set_timeout(timeout);
                let resp = c.get(r).await?;
                if let (Some(routes), Some(k)) = (routes, k) {
                    routes.learn(&k, &RouteHint::from_headers(resp.metadata()));
                }
                Ok(resp.into_inner().found)
            }
            Conn::Etcd(c) => {
                let mut r = tonic::Request::new(etcdpb::RangeRequest {
                    key,
                    serializable: stale,
                    ..Default::default()
                });
                r.set_timeout(timeout);
                Ok(!c.range(r).await?.into_inner().kvs.is_empty())
            }
        }
    }

    async fn put(
        &mut self,
        key: Vec<u8>,
        value: Vec<u8>,
        timeout: Duration,
        routes: Option<&Routes>,
    ) -> Result<(), tonic::Status> {
        match self {
            Conn::Session(s) => {
                let k = routes.map(|_| key.clone());
                let op = pb::session_request::Op::Put(pb::PutRequest { key, value });
                let (_, hint) = s.call(op, timeout).await?;
                if let (Some(routes), Some(k)) = (routes, k) {
                    routes.learn(&k, &hint);
                }
            }
            Conn::Kv(c) => {
                let k = routes.map(|_| key.clone());
                let mut r = tonic::Request::new(pb::PutRequest { key, value });
                r.set_timeout(timeout);
                let resp = c.put(r).await?;
                if let (Some(routes), Some(k)) = (routes, k) {
                    routes.learn(&k, &RouteHint::from_headers(resp.metadata()));
                }
            }
            Conn::Etcd(c) => {
                let mut r = tonic::Request::new(etcdpb::PutRequest {
                    key,
                    value,
                    ..Default::default()
                });
                r.set_timeout(timeout);
                c.put(r).await?;
            }
        }
        Ok(())
    }
}

/// The connections one bench client uses: its own, and (when routing) one per endpoint, so each
/// request can go to the endpoint of its shard's leader.
#[derive(Clone)]
struct ClientConns {
    own: Conn,
    by_endpoint: Vec<Conn>,
    routes: Option<Arc<Routes>>,
}

impl ClientConns {
    /// `conns[i]` is connected to endpoint `i % endpoints`; client `n` gets `conns[n % len]` as
    /// its own and, per endpoint, one of that endpoint's connections.
    fn new(n: usize, conns: &[Conn], endpoints: usize, routes: Option<&Arc<Routes>>) -> Self {
        let own = conns[n % conns.len()].clone();
        let by_endpoint = match routes {
            Some(_) => (0..endpoints)
                .map(|e| {
                    let mine: Vec<&Conn> = conns.iter().skip(e).step_by(endpoints).collect();
                    mine.get(n % mine.len().max(1))
                        .map_or_else(|| own.clone(), |c| (*c).clone())
                })
                .collect(),
            None => Vec::new(),
        };
        ClientConns {
            own,
            by_endpoint,
            routes: routes.cloned(),
        }
    }

    /// The connection for a request on `key`; `routed`: to its shard's leader if known.
    fn pick(&mut self, key: &[u8], routed: bool) -> (&mut Conn, Option<&Routes>) {
        let routes = self.routes.as_deref();
        let idx = routes.filter(|_| routed).and_then(|r| r.endpoint_for(key));
        let conn = match idx.and_then(|i| self.by_endpoint.get_mut(i)) {
            Some(c) => c,
            None => &mut self.own,
        };
        (conn, routes)
    }
}

fn describe_status(s: &tonic::Status) -> String {
    let mut m = format!("{:?}: {}", s.code(), s.message());
    if m.len() > 200 {
        let mut cut = 200;
        while !m.is_char_boundary(cut) {
            cut -= 1;
        }
        m.truncate(cut);
        m.push('…');
    }
    m
}

// ---------------------------------------------------------------------------------------------
// Progress

/// Operation counts shared by the clients and the progress line.
#[derive(Default)]
struct Counters {
    ok: AtomicU64,
    errors: AtomicU64,
}

/// Redraws one line with \r on a terminal (every second); prints a plain line every 5 s
/// otherwise. Goes to stderr, so stdout holds only the result.
fn spawn_progress(
    label: String,
    counters: Arc<Counters>,
    total: Option<u64>,
    phases: Option<(Instant, Instant)>,
) -> tokio::task::JoinHandle<()> {
    let tty = std::io::stderr().is_terminal();
    let every = Duration::from_secs(if tty { 1 } else { 5 });
    tokio::spawn(async move {
        let start = Instant::now();
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        let mut last = (start, 0u64);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let ok = counters.ok.load(Ordering::Relaxed);
            let errors = counters.errors.load(Ordering::Relaxed);
            let rate = (ok - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
            last = (now, ok);
            let elapsed = now.duration_since(start).as_secs_f64();
            let mut line = format!("{label}: {elapsed:>5.1} s");
            if let Some((measure, end)) = phases {
                let total = end.duration_since(start).as_secs_f64();
                line.push_str(&format!(" of {total:.1}"));
                if now < measure {
                    line.push_str(" (warm-up)");
                }
            }
            match total {
                Some(t) => line.push_str(&format!(
                    "  {ok}/{t} ({:.0}%)",
                    ok as f64 * 100.0 / t.max(1) as f64
                )),
                None => line.push_str(&format!("  {ok} ops")),
            }
            line.push_str(&format!("  {rate:.0} ops/s now  {errors} errors"));
            let mut err = std::io::stderr().lock();
            if tty {
                let _ = write!(err, "\r{line}\x1b[K");
            } else {
                let _ = writeln!(err, "{line}");
            }
            let _ = err.flush();
        }
    })
}

fn stop_progress(h: tokio::task::JoinHandle<()>) {
    h.abort();
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[K");
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// What every client of a run shares.
struct Run {
    target: Target,
    workload: Workload,
    chooser: KeyChooser,
    value: Vec<u8>,
    stale: bool,
    timeout: Duration,
    measure_from: Instant,
    end: Instant,
    counters: Arc<Counters>,
    get: Mutex<(Latency, u64)>,
    put: Mutex<(Latency, u64)>,
    not_found: AtomicU64,
    error_samples: Mutex<Vec<String>>,
}

impl Run {
    fn error(&self, s: &tonic::Status) {
        let m = describe_status(s);
        let mut samples = self.error_samples.lock().unwrap_or_else(|e| e.into_inner());
        if samples.len() < ERROR_SAMPLES && !samples.contains(&m) {
            samples.push(m);
        }
    }
}

async fn client(run: Arc<Run>, mut conns: ClientConns, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let end = tokio::time::Instant::from_std(run.end);
    loop {
        let key = key_name(run.chooser.next(&mut rng));
        let op = run.workload.choose(rng.gen::<f64>());
        let t0 = Instant::now();
        if t0 >= run.end {
            return;
        }
        let res = match op {
            OpKind::Get => {
                // Stale reads are served by the replica reached: not routed.
                let (conn, routes) = conns.pick(&key, !run.stale);
                let routes = routes.filter(|_| !run.stale);
                let f = conn.get(key, run.stale, run.timeout, routes);
                tokio::time::timeout_at(end, f).await
            }
            OpKind::Put => {
                let (conn, routes) = conns.pick(&key, true);
                let f = conn.put(key, run.value.clone(), run.timeout, routes);
                tokio::time::timeout_at(end, async { f.await.map(|()| true) }).await
            }
        };
        // Still in flight at the end of the window: not counted.
        let Ok(res) = res else { return };
        let took = t0.elapsed();
        let measured = t0 >= run.measure_from;
        let stats = match op {
            OpKind::Get => &run.get,
            OpKind::Put => &run.put,
        };
        match res {
            Ok(found) => {
                run.counters.ok.fetch_add(1, Ordering::Relaxed);
                if measured {
                    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                    s.0.record(took);
                    if !found {
                        run.not_found.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(status) => {
                run.counters.errors.fetch_add(1, Ordering::Relaxed);
                if measured {
                    stats.lock().unwrap_or_else(|e| e.into_inner()).1 += 1;
                }
                run.error(&status);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }
}

/// Writes every key once, `--preload-clients` at a time; a failed put is retried twice.
async fn preload(
    args: &BenchArgs,
    conns: &[Conn],
    endpoints: usize,
    routes: Option<&Arc<Routes>>,
    value: &[u8],
    timeout: Duration,
) -> PreloadReport {
    let counters = Arc::new(Counters::default());
    let next = Arc::new(AtomicU64::new(0));
    let progress = spawn_progress(
        format!("preload {}", target_name(args.target)),
        counters.clone(),
        Some(args.keys),
        None,
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..args.preload_clients.min(args.keys) as usize {
        let (counters, next) = (counters.clone(), next.clone());
        let mut conns = ClientConns::new(i, conns, endpoints, routes);
        let (keys, value) = (args.keys, value.to_vec());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= keys {
                    return;
                }
                let mut ok = false;
                for _ in 0..3 {
                    let key = key_name(i);
                    let (conn, routes) = conns.pick(&key, true);
                    if conn.put(key, value.clone(), timeout, routes).await.is_ok() {
                        ok = true;
                        break;
                    }
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
                let c = if ok { &counters.ok } else { &counters.errors };
                c.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    stop_progress(progress);
    let seconds = start.elapsed().as_secs_f64();
    let errors = counters.errors.load(Ordering::Relaxed);
    PreloadReport {
        keys: args.keys,
        seconds: (seconds * 10.0).round() / 10.0,
        keys_per_sec: (args.keys - errors) as f64 / seconds,
        errors,
    }
}

/// Checks that every connection answers a read, retrying for a few seconds (a fresh cluster may
/// still be electing leaders).
async fn probe(conns: &[Conn], endpoints: &[String], timeout: Duration) -> Result<(), String> {
    for (i, conn) in conns.iter().enumerate() {
        let mut conn = conn.clone();
        let mut last = String::new();
        let mut ok = false;
        for attempt in 0..10 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            match conn.get(key_name(0), false, timeout, None).await {
                Ok(_) => {
                    ok = true;
                    break;
                }
                Err(s) => last = describe_status(&s),
            }
        }
        if !ok {
            return Err(format!(
                "{} does not answer: {last}",
                endpoints[i % endpoints.len()]
            ));
        }
    }
    Ok(())
}

fn op_report(l: &Latency, errors: u64, secs: f64) -> OpReport {
    OpReport {
        ops: l.count(),
        ops_per_sec: round1(l.count() as f64 / secs),
        errors,
        latency_ms: l.summary(),
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `kvctl bench`: runs the benchmark and prints its report. Exit status 0 when the run
/// completed (errors are in the report), 2 when it could not start.
pub async fn main(args: &BenchArgs, endpoints: &[String], timeout: Duration) -> ExitCode {
    match bench(args, endpoints, timeout).await {
        Ok(report) => {
            match args.output {
                Output::Json => println!("{}", report.to_json()),
                Output::Table => print!("{}", report.to_table()),
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("kvctl bench: {e}");
            ExitCode::from(2)
        }
    }
}

pub async fn bench(
    args: &BenchArgs,
    endpoints: &[String],
    timeout: Duration,
) -> Result<Report, String> {
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        return Err("--duration must be a positive number of seconds".into());
    }
    if !(args.warmup >= 0.0 && args.warmup.is_finite()) {
        return Err("--warmup must be zero or more seconds".into());
    }
    if args.value_size > crate::server::MAX_VALUE {
        return Err(format!(
            "--value-size is over kvstore's limit of {} bytes",
            crate::server::MAX_VALUE
        ));
    }
    let endpoints: Vec<String> = endpoints
        .iter()
        .map(|e| e.trim().trim_start_matches("http://").to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        return Err("no endpoints given".into());
    }
    let routed = args.target == Target::Kvstore && !args.no_routing;
    let mut connections = args.connections.unwrap_or(8).min(args.clients);
    if routed {
        // A connection to every endpoint, so each request can go to its shard's leader.
        connections = connections.max(endpoints.len() as u64);
    }
    let conns = (0..connections as usize)
        .map(|i| Conn::new(args.target, &endpoints[i % endpoints.len()], args.unary))
        .collect::<Result<Vec<_>, _>>()?;
    probe(&conns, &endpoints, timeout).await?;
    let routes = if routed {
        let routes = Arc::new(Routes::new(endpoints.len()));
        let channels = endpoints
            .iter()
            .map(|e| crate::peers::channel(e, Duration::from_secs(2)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad endpoint: {e}"))?;
        routes.discover(&channels).await;
        Some(routes)
    } else {
        None
    };

    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let mut value = vec![0u8; args.value_size];
    StdRng::seed_from_u64(seed).fill_bytes(&mut value);

    let preloaded = if args.preload {
        Some(
            preload(
                args,
                &conns,
                endpoints.len(),
                routes.as_ref(),
                &value,
                timeout,
            )
            .await,
        )
    } else {
        None
    };

    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let run = Arc::new(Run {
        target: args.target,
        workload: args.workload,
        chooser: KeyChooser::new(args.distribution, args.keys),
        value,
        stale: args.stale,
        timeout,
        measure_from,
        end: measure_from + Duration::from_secs_f64(args.duration),
        counters: Arc::new(Counters::default()),
        get: Mutex::new((Latency::default(), 0)),
        put: Mutex::new((Latency::default(), 0)),
        not_found: AtomicU64::new(0),
        error_samples: Mutex::new(Vec::new()),
    });
    let progress = spawn_progress(
        format!("{} {}", target_name(run.target), args.workload.name()),
        run.counters.clone(),
        None,
        Some((run.measure_from, run.end)),
    );
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            let conns = ClientConns::new(i as usize, &conns, endpoints.len(), routes.as_ref());
            tokio::spawn(client(
                run.clone(),
                conns,
                seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            ))
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
    stop_progress(progress);
    for (i, c) in conns.iter().enumerate() {
        if matches!(c, Conn::Session(s) if s.is_unary()) {
            eprintln!(
                "kvctl bench: {} does not serve Session (a kvnode before it): requests on that \
                 connection went as unary calls",
                endpoints[i % endpoints.len()]
            );
        }
    }

    let secs = args.duration;
    let (get, get_errors) = std::mem::take(&mut *run.get.lock().unwrap_or_else(|e| e.into_inner()));
    let (put, put_errors) = std::mem::take(&mut *run.put.lock().unwrap_or_else(|e| e.into_inner()));
    let mut all = Latency::default();
    all.add(&get);
    all.add(&put);
    let read_fraction = args.workload.read_fraction();
    let error_samples =
        std::mem::take(&mut *run.error_samples.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(Report {
        target: args.target,
        workload: args.workload.name().to_string(),
        workload_description: args.workload.describe().to_string(),
        read_fraction,
        reads: if args.stale { "stale" } else { "linearizable" }.to_string(),
        distribution: match args.distribution {
            KeyDistribution::Uniform => "uniform".to_string(),
            KeyDistribution::Zipfian => format!("zipfian θ={ZIPF_THETA}"),
        },
        keys: args.keys,
        value_size: args.value_size,
        clients: args.clients,
        connections,
        routed,
        endpoints,
        warmup_s: args.warmup,
        duration_s: secs,
        ops: all.count(),
        ops_per_sec: round1(all.count() as f64 / secs),
        errors: get_errors + put_errors,
        not_found: run.not_found.load(Ordering::Relaxed),
        latency_ms: all.summary(),
        get: (read_fraction > 0.0).then(|| op_report(&get, get_errors, secs)),
        put: (read_fraction < 1.0).then(|| op_report(&put, put_errors, secs)),
        preload: preloaded,
        error_samples,
        seed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipfian_is_skewed_and_in_range() {
        let n = 1000;
        let chooser = KeyChooser::new(KeyDistribution::Zipfian, n);
        let mut rng = StdRng::seed_from_u64(7);
        let mut hits = vec![0u64; n as usize];
        let draws = 200_000;
        for _ in 0..draws {
            let k = chooser.next(&mut rng);
            assert!(k < n, "key {k} outside 0..{n}");
            hits[k as usize] += 1;
        }
        let mut sorted = hits.clone();
        sorted.sort_unstable();
        let (top, median) = (sorted[sorted.len() - 1], sorted[sorted.len() / 2]);
        // With θ = 0.99 over 1000 keys the top key gets ~13% of draws, the median ~0.03%.
        assert!(top > 50 * median.max(1), "top {top}, median {median}");
        assert!(top as f64 / draws as f64 > 0.10);
        // The hot key is scattered away from index 0 (the permutation), and every key is
        // reachable: the permutation is a bijection.
        let hottest = hits.iter().position(|&h| h == top).unwrap() as u64;
        assert_eq!(hottest, 0, "rank 0 maps to 0·P mod n = 0");
        let second = (SCATTER % n as u128) as u64;
        assert!(hits[second as usize] > 20 * median.max(1));
    }

    #[test]
    fn zipfian_rank_distribution_matches_theory() {
        let z = Zipfian::new(100, ZIPF_THETA);
        let mut rng = StdRng::seed_from_u64(1);
        let mut hits = [0u64; 100];
        let draws = 500_000;
        for _ in 0..draws {
            let r = z.rank(rng.gen::<f64>());
            assert!(r < 100);
            hits[r as usize] += 1;
        }
        // P(rank 0) = 1/zeta(100) and P(rank 1) = 2^-θ/zeta(100).
        let zeta100 = zeta(100, ZIPF_THETA);
        let p0 = hits[0] as f64 / draws as f64;
        let p1 = hits[1] as f64 / draws as f64;
        assert!((p0 - 1.0 / zeta100).abs() < 0.01, "p0 {p0}");
        assert!(
            (p1 - 0.5f64.powf(ZIPF_THETA) / zeta100).abs() < 0.01,
            "p1 {p1}"
        );
        // Ranks fall off monotonically in bulk.
        assert!(hits[0] > hits[1] && hits[1] > hits[10] && hits[10] > hits[90]);
    }

    #[test]
    fn tiny_key_spaces_work() {
        let mut rng = StdRng::seed_from_u64(3);
        for n in 1..=3 {
            let c = KeyChooser::new(KeyDistribution::Zipfian, n);
            for _ in 0..1000 {
                assert!(c.next(&mut rng) < n);
            }
            let u = KeyChooser::new(KeyDistribution::Uniform, n);
            for _ in 0..1000 {
                assert!(u.next(&mut rng) < n);
            }
        }
    }

    #[test]
    fn uniform_covers_the_key_space_evenly() {
        let c = KeyChooser::new(KeyDistribution::Uniform, 10);
        let mut rng = StdRng::seed_from_u64(5);
        let mut hits = [0u64; 10];
        for _ in 0..100_000 {
            hits[c.next(&mut rng) as usize] += 1;
        }
        assert!(
            hits.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hits:?}"
        );
    }

    #[test]
    fn histogram_percentiles() {
        let mut l = Latency::default();
        for ms in 1..=1000u64 {
            l.record(Duration::from_millis(ms));
        }
        let within = |got: f64, want: f64| (got - want).abs() <= want * 0.002 + 0.001;
        assert!(within(l.quantile_ms(0.5), 500.0), "{}", l.quantile_ms(0.5));
        assert!(within(l.quantile_ms(0.95), 950.0));
        assert!(within(l.quantile_ms(0.99), 990.0));
        assert!(within(l.quantile_ms(0.999), 999.0));
        let s = l.summary();
        assert!(within(s.mean, 500.5), "{}", s.mean);
        assert!(within(s.max, 1000.0));
        assert!(s.p50 <= s.p95 && s.p95 <= s.p99 && s.p99 <= s.p999 && s.p999 <= s.max);

        // Sub-millisecond latencies keep microsecond resolution.
        let mut fast = Latency::default();
        for us in [300u64, 400, 500, 600, 700] {
            fast.record(Duration::from_micros(us));
        }
        assert_eq!(fast.quantile_ms(0.5), 0.5);

        // Merging adds counts.
        let mut both = Latency::default();
        both.add(&l);
        both.add(&fast);
        assert_eq!(both.count(), 1005);
    }

    #[test]
    fn workload_mixes() {
        let mut rng = StdRng::seed_from_u64(9);
        for (w, want) in [
            (Workload::Write, 0.0),
            (Workload::A, 0.5),
            (Workload::B, 0.95),
            (Workload::C, 1.0),
        ] {
            let n = 100_000;
            let gets = (0..n)
                .filter(|_| w.choose(rng.gen::<f64>()) == OpKind::Get)
                .count();
            let got = gets as f64 / n as f64;
            assert!((got - want).abs() < 0.01, "{w:?}: {got}");
        }
        assert_eq!(Workload::Write.choose(0.0), OpKind::Put);
        assert_eq!(Workload::C.choose(0.999_999), OpKind::Get);
    }

    #[test]
    fn workload_names_and_aliases_parse() {
        for (s, w) in [
            ("write", Workload::Write),
            ("a", Workload::A),
            ("mixed", Workload::A),
            ("update-heavy", Workload::A),
            ("b", Workload::B),
            ("read-mostly", Workload::B),
            ("c", Workload::C),
            ("read", Workload::C),
        ] {
            assert_eq!(Workload::from_str(s, false), Ok(w), "{s}");
        }
    }

    fn sample_report() -> Report {
        let mut l = Latency::default();
        l.record(Duration::from_micros(450));
        Report {
            target: Target::Etcd,
            workload: "a".into(),
            workload_description: Workload::A.describe().into(),
            read_fraction: 0.5,
            reads: "linearizable".into(),
            distribution: "uniform".into(),
            keys: 10,
            value_size: 256,
            clients: 4,
            connections: 2,
            routed: false,
            endpoints: vec!["127.0.0.1:12379".into()],
            warmup_s: 1.0,
            duration_s: 2.0,
            ops: 1,
            ops_per_sec: 0.5,
            errors: 0,
            not_found: 0,
            latency_ms: l.summary(),
            get: Some(op_report(&l, 0, 2.0)),
            put: None,
            preload: None,
            error_samples: vec![],
            seed: 1,
        }
    }

    #[test]
    fn json_shape() {
        let v: serde_json::Value = serde_json::from_str(&sample_report().to_json()).unwrap();
        assert_eq!(v["target"], "etcd");
        assert_eq!(v["workload"], "a");
        assert_eq!(v["reads"], "linearizable");
        for k in [
            "clients",
            "connections",
            "keys",
            "value_size",
            "ops",
            "ops_per_sec",
            "errors",
            "duration_s",
        ] {
            assert!(v[k].is_number(), "{k}: {}", v[k]);
        }
        for q in ["mean", "p50", "p95", "p99", "p999", "max"] {
            assert!(v["latency_ms"][q].is_number(), "latency_ms.{q}");
        }
        assert_eq!(v["latency_ms"]["p50"], 0.45);
        assert_eq!(v["get"]["ops"], 1);
        assert!(v["put"].is_null());
        assert!(v["preload"].is_null());
        assert!(v["error_samples"].is_array());
    }

    #[test]
    fn table_has_header_and_rows() {
        let mut r = sample_report();
        let t = r.to_table();
        assert!(t.contains("P999 MS"));
        assert_eq!(
            t.lines().filter(|l| l.starts_with("etcd     a ")).count(),
            1
        );
        r.put = r.get.clone();
        let t = r.to_table();
        assert_eq!(
            t.lines().filter(|l| l.starts_with("etcd     a ")).count(),
            3
        );
    }

    #[test]
    fn key_names_are_fixed_width() {
        assert_eq!(key_name(0), b"bench/0000000000");
        assert_eq!(key_name(999_999).len(), key_name(1).len());
    }
}
