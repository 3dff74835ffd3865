//! The client library used by `kvctl`, the tests and the benchmark: a list of endpoints tried in
//! turn, a deadline per request, and errors a person can act on.
//!
//! Any node serves any key, so the client only needs *a* live node: it sticks to the last one
//! that answered and moves to the next endpoint when one is unreachable. Reads move on after any
//! failure; a write moves on only when the failed attempt surely did not execute (connection
//! refused, or the node said so): re-sending a write that may have committed could apply it a
//! second time, after a newer write.
//!
//! **Shard-aware routing.** A node that does not lead the key's shard forwards the request to the
//! leader: one extra hop. To save it, the client sends writes and linearizable reads straight to
//! the endpoint of the shard's leader when it knows it ([`Routes`]): it learns each endpoint's
//! node id and the shard count from `Status` (asked once, in the background, on first use), and
//! each shard's leader from the `kv-shard`/`kv-shards`/`kv-leader` headers of the replies to
//! writes and linearizable reads. Nothing
//! needs configuring. The routing is only a guess: a stale or wrong one costs the forwarding hop
//! it was meant to save, never correctness (the node still routes every request), and the retry
//! rules above are the same whichever endpoint is tried first. Stale reads are not routed: they
//! read the replica of the node the client sticks to.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::FutureExt;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::Code;

use crate::mux::Mux;
use crate::pb::cluster_client::ClusterClient;
use crate::pb::key_value_client::KeyValueClient;
use crate::pb::{
    session_reply, session_request, DeleteRequest, GetRequest, PutRequest, SessionReply,
    SessionRequest, StatusReply, StatusRequest,
};
use crate::peers::{channel, MAX_MESSAGE};
use crate::placement::shard_for_key;
use crate::router::{FORWARDED, LEADER_HINT, NOT_EXECUTED, SHARDS_HEADER, SHARD_HEADER};

/// After an endpoint failed to answer, requests are not routed to it for this long.
const AVOID_FAILED: Duration = Duration::from_secs(1);
/// While some endpoint's node id or the shard count is unknown, `Status` is asked again at most
/// this often.
const REDISCOVER: Duration = Duration::from_secs(5);
// Times use tokio's clock, so a simulation with a paused clock sees the same routing decisions.

/// Bound on each `Status` call of a discovery round.
const DISCOVER_TIMEOUT: Duration = Duration::from_secs(1);

/// Which endpoint leads which shard, as far as a client knows: a routing guess (see the module
/// docs). Shared by [`Client`] and `kvctl bench`.
pub struct Routes {
    inner: RwLock<RoutesInner>,
}

struct RoutesInner {
    /// The cluster's shard count; 0 while unknown.
    shards: u32,
    /// Per shard, the leader last heard of.
    leaders: Vec<Option<u64>>,
    /// Node id -> index of the endpoint that is that node.
    endpoint_of: HashMap<u64, usize>,
    /// Per endpoint: do not route to it before this instant (it just failed).
    avoid_until: Vec<Option<Instant>>,
    /// The placement function disagreed with a node's `kv-shard`: routing is off for good.
    disabled: bool,
    discovering: bool,
    last_discovery: Option<Instant>,
}

impl Routes {
    pub fn new(endpoints: usize) -> Routes {
        Routes {
            inner: RwLock::new(RoutesInner {
                shards: 0,
                leaders: Vec::new(),
                endpoint_of: HashMap::new(),
                avoid_until: vec![None; endpoints],
                disabled: false,
                discovering: false,
                last_discovery: None,
            }),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, RoutesInner> {
        // Plain fields only; a panic elsewhere cannot leave them inconsistent.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, RoutesInner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The endpoint (index) of the leader of `key`'s shard, if known and not recently failed.
    pub fn endpoint_for(&self, key: &[u8]) -> Option<usize> {
        let r = self.read();
        if r.disabled || r.shards == 0 {
            return None;
        }
        let leader = (*r.leaders.get(shard_for_key(key, r.shards) as usize)?)?;
        let idx = *r.endpoint_of.get(&leader)?;
        match r.avoid_until.get(idx) {
            Some(Some(t)) if Instant::now() < *t => None,
            _ => Some(idx),
        }
    }

    /// Learns from a successful reply about `key`: the shard count, and the leader of its shard
    /// (forgotten when the reply names none).
    pub fn learn(&self, key: &[u8], hint: &RouteHint) {
        let shards = hint.shards;
        if shards == 0 {
            return;
        }
        let shard = shard_for_key(key, shards);
        let leader = hint.leader;
        let agrees = hint.shard == Some(shard);
        {
            let r = self.read();
            if r.disabled
                || (agrees && r.shards == shards && r.leaders.get(shard as usize) == Some(&leader))
            {
                return;
            }
        }
        let mut w = self.write();
        if !agrees {
            // The node places keys differently (another version?): stop guessing.
            w.disabled = true;
            return;
        }
        w.set_shards(shards);
        if let Some(l) = w.leaders.get_mut(shard as usize) {
            *l = leader;
        }
    }

    /// Learns from endpoint `idx`'s `Status` reply: its node id, the shard count, and the
    /// leaders it knows of (kept where a reply already told us better).
    pub fn learn_status(&self, idx: usize, reply: &StatusReply) {
        let mut w = self.write();
        w.endpoint_of.retain(|_, i| *i != idx);
        w.endpoint_of.insert(reply.node_id, idx);
        if reply.shard_count > 0 {
            w.set_shards(reply.shard_count);
        }
        for s in &reply.shards {
            if let Some(l) = w.leaders.get_mut(s.shard as usize) {
                if s.has_leader && l.is_none() {
                    *l = Some(s.leader);
                }
            }
        }
    }

    /// Endpoint `idx` did not answer: route elsewhere for a while.
    pub fn endpoint_failed(&self, idx: usize) {
        if let Some(t) = self.write().avoid_until.get_mut(idx) {
            *t = Some(Instant::now() + AVOID_FAILED);
        }
    }

    /// Whether a discovery round should run now; if so, marks one as running.
    fn claim_discovery(&self) -> bool {
        {
            let r = self.read();
            let complete = r.shards > 0 && r.endpoint_of.len() >= r.avoid_until.len();
            let due = match r.last_discovery {
                None => true,
                Some(t) => !complete && t.elapsed() >= REDISCOVER,
            };
            if r.discovering || r.disabled || !due {
                return false;
            }
        }
        let mut w = self.write();
        if w.discovering {
            return false;
        }
        w.discovering = true;
        w.last_discovery = Some(Instant::now());
        true
    }

    /// Asks every endpoint's `Status` at once (each bounded by one second) and learns from the
    /// answers. Endpoints are given in the same order as to [`Routes::new`].
    pub async fn discover(&self, endpoints: &[Channel]) {
        let asks = endpoints.iter().enumerate().map(|(idx, ch)| async move {
            let mut cl = ClusterClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE);
            let mut req = tonic::Request::new(StatusRequest {});
            req.set_timeout(DISCOVER_TIMEOUT);
            let answer = tokio::time::timeout(DISCOVER_TIMEOUT, cl.status(req)).await;
            if let Ok(Ok(r)) = answer {
                self.learn_status(idx, r.get_ref());
            }
        });
        futures::future::join_all(asks).await;
        let mut w = self.write();
        w.discovering = false;
        w.last_discovery = Some(Instant::now());
    }
}

/// What a successful reply says about routing: the key's shard, the shard count (0: not said)
/// and the node that executed it as the shard's leader. A unary reply says it in its headers, a
/// session reply in its fields.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RouteHint {
    pub shard: Option<u32>,
    pub shards: u32,
    pub leader: Option<u64>,
}

impl RouteHint {
    pub fn from_headers(md: &MetadataMap) -> RouteHint {
        let header = |name: &str| md.get(name).and_then(|v| v.to_str().ok());
        RouteHint {
            shard: header(SHARD_HEADER).and_then(|v| v.parse().ok()),
            shards: header(SHARDS_HEADER)
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            leader: header(LEADER_HINT).and_then(|v| v.parse().ok()),
        }
    }

    fn of_reply(r: &SessionReply) -> RouteHint {
        RouteHint {
            shard: r.shard,
            shards: r.shards,
            leader: r.leader,
        }
    }
}

/// Requests to one node on one `kv.v1.KeyValue/Session` stream (see [`crate::mux`]): each
/// behaves as its unary call, without the call's HTTP/2 stream and headers.
///
/// A node of a release before `Session` answers the stream with `UNIMPLEMENTED` (before it
/// reads any request). The session then sends its requests as unary calls instead, and tries
/// the stream again after [`REPROBE_STREAM`] (the node may have been upgraded): a new client
/// works against an older cluster, and a node forwards to an older peer.
pub struct Session {
    mux: Mux<SessionRequest, SessionReply>,
    channel: Channel,
    forwarded: bool,
    mode: std::sync::Mutex<Mode>,
    /// `mode` is `Stream`: read without the lock on every call.
    streaming: std::sync::atomic::AtomicBool,
}

/// How a [`Session`] sends its requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Not known yet whether the node serves the stream: a request is kept until it is, in case
    /// it has to go as a unary call.
    Probing,
    /// A stream has answered: requests go on it.
    Stream,
    /// The node does not serve the stream: unary calls until then.
    UnaryUntil(Instant),
}

/// How long a [`Session`] sends unary calls to a node that refused the stream, before it tries
/// the stream again.
pub const REPROBE_STREAM: Duration = Duration::from_secs(30);

impl Session {
    /// A client's session with the node at `endpoint`.
    pub fn new(endpoint: &str, channel: Channel) -> Session {
        Session::open(
            format!("the session with {endpoint}"),
            endpoint.to_string(),
            channel,
            false,
        )
    }

    /// The session on which a node forwards its clients' requests to peer `peer`: opened with
    /// the `kv-forwarded` header, so the peer serves each request as the shard's leader or
    /// answers "not leader", never forwarding it again (see [`crate::router`]).
    pub fn forwarding(peer: u64, channel: Channel) -> Session {
        Session::open(
            format!("the forwarding session to node {peer}"),
            format!("node {peer}"),
            channel,
            true,
        )
    }

    fn open(what: String, peer: String, channel: Channel, forwarded: bool) -> Session {
        let stream_channel = channel.clone();
        let mux = Mux::new(
            what,
            peer,
            Box::new(move |requests| {
                let mut kv = kv_client(stream_channel.clone());
                let req = with_forwarded(tonic::Request::new(requests), forwarded);
                async move { Ok(kv.session(req).await?.into_inner()) }.boxed()
            }),
        );
        Session {
            mux,
            channel,
            forwarded,
            mode: std::sync::Mutex::new(Mode::Probing),
            streaming: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn mode(&self) -> Mode {
        if self.streaming.load(Ordering::Relaxed) {
            return Mode::Stream;
        }
        let mut m = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(*m, Mode::UnaryUntil(t) if Instant::now() >= t) {
            *m = Mode::Probing;
        }
        *m
    }

    fn set_mode(&self, mode: Mode) {
        let mut m = self.mode.lock().unwrap_or_else(|p| p.into_inner());
        *m = mode;
        self.streaming
            .store(mode == Mode::Stream, Ordering::Relaxed);
    }

    /// Whether requests go as unary calls for now (the node refused the stream).
    pub fn is_unary(&self) -> bool {
        matches!(self.mode(), Mode::UnaryUntil(_))
    }

    /// Sends `op` and waits at most `timeout` for its outcome: the reply, or the status its
    /// unary call would have failed with (with the `kv-not-executed` and `kv-leader` markers).
    pub async fn call(
        &self,
        op: session_request::Op,
        timeout: Duration,
    ) -> Result<(session_reply::Result, RouteHint), tonic::Status> {
        let started = Instant::now();
        let kept = match self.mode() {
            Mode::UnaryUntil(_) => return self.call_unary(op, timeout).await,
            Mode::Stream => None,
            Mode::Probing => Some(op.clone()),
        };
        match (self.call_stream(op, timeout).await, kept) {
            (Err(s), kept) if refused_stream(&s) => {
                self.set_mode(Mode::UnaryUntil(Instant::now() + REPROBE_STREAM));
                match kept {
                    Some(op) => {
                        let left = timeout.saturating_sub(started.elapsed());
                        self.call_unary(op, left).await
                    }
                    // Not executed: the caller may send it again, and it will go unary.
                    None => Err(s),
                }
            }
            (r, _) => r,
        }
    }

    async fn call_stream(
        &self,
        op: session_request::Op,
        timeout: Duration,
    ) -> Result<(session_reply::Result, RouteHint), tonic::Status> {
        let req = SessionRequest {
            id: 0,
            timeout_ms: u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX),
            op: Some(op),
        };
        let r = self.mux.call(req, timeout).await?;
        if !self.streaming.load(Ordering::Relaxed) {
            self.set_mode(Mode::Stream);
        }
        if r.code != 0 {
            let mut s = tonic::Status::new(Code::from_i32(r.code), r.message);
            if r.not_executed {
                s.metadata_mut().insert(
                    NOT_EXECUTED,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
            }
            if let Some(l) = r.leader {
                s.metadata_mut().insert(LEADER_HINT, l.into());
            }
            return Err(s);
        }
        let hint = RouteHint::of_reply(&r);
        match r.result {
            Some(result) => Ok((result, hint)),
            None => Err(tonic::Status::internal(
                "the node sent a session reply with neither a result nor an error",
            )),
        }
    }

    /// `op` as its unary call: the same request, deadline and `kv-forwarded` header; the
    /// routing fields from the reply's headers.
    async fn call_unary(
        &self,
        op: session_request::Op,
        timeout: Duration,
    ) -> Result<(session_reply::Result, RouteHint), tonic::Status> {
        use session_reply::Result as R;
        use session_request::Op as O;
        let mut kv = kv_client(self.channel.clone());
        let fwd = self.forwarded;
        fn req<T>(msg: T, timeout: Duration, forwarded: bool) -> tonic::Request<T> {
            let mut r = with_forwarded(tonic::Request::new(msg), forwarded);
            r.set_timeout(timeout);
            r
        }
        fn split<T>(r: tonic::Response<T>, f: fn(T) -> R) -> (R, RouteHint) {
            let hint = RouteHint::from_headers(r.metadata());
            (f(r.into_inner()), hint)
        }
        Ok(match op {
            O::Put(m) => split(kv.put(req(m, timeout, fwd)).await?, R::Put),
            O::Get(m) => split(kv.get(req(m, timeout, fwd)).await?, R::Get),
            O::Delete(m) => split(kv.delete(req(m, timeout, fwd)).await?, R::Delete),
        })
    }
}

/// A `kv.v1.KeyValue` client over `channel`, with the peers' message size limits.
fn kv_client(channel: Channel) -> KeyValueClient<Channel> {
    KeyValueClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

fn with_forwarded<T>(mut req: tonic::Request<T>, forwarded: bool) -> tonic::Request<T> {
    if forwarded {
        req.metadata_mut()
            .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    }
    req
}

/// The node does not serve `Session` (an older release): it refused the stream before reading
/// any request.
fn refused_stream(s: &tonic::Status) -> bool {
    s.code() == Code::Unimplemented && crate::router::not_executed(s)
}

impl RoutesInner {
    fn set_shards(&mut self, shards: u32) {
        if self.shards != shards {
            self.shards = shards;
            self.leaders = vec![None; shards as usize];
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// A write that may or may not have been applied (timed out after it was sent).
    #[error("outcome unknown (the write may or may not have been applied): {0}")]
    Unknown(String),
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {0}: {1}")]
    BadEndpoint(String, String),
}

/// A reply and which node produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served<T> {
    pub value: T,
    /// The node that executed the request (the shard's leader, or the replica for stale reads).
    pub node_id: u64,
    /// The endpoint the client talked to.
    pub endpoint: String,
}

pub struct Client {
    endpoints: Vec<(String, Channel)>,
    /// Per endpoint, the session its puts, gets and deletes go on.
    sessions: Vec<Session>,
    timeout: Duration,
    current: AtomicUsize,
    routes: Arc<Routes>,
}

impl Client {
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Client, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let e = e.trim().trim_start_matches("http://").to_string();
                channel(&e, Duration::from_millis(500))
                    .map(|c| (e.clone(), c))
                    .map_err(|err| ClientError::BadEndpoint(e, err.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Client {
            routes: Arc::new(Routes::new(endpoints.len())),
            sessions: endpoints
                .iter()
                .map(|(e, c)| Session::new(e, c.clone()))
                .collect(),
            endpoints,
            timeout,
            current: AtomicUsize::new(0),
        })
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|(e, _)| e.clone()).collect()
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    /// Where a request for `key` goes first: the endpoint of its shard's leader when known
    /// (`key` is `None` for requests that are not routed), else the last one that answered.
    /// Starts learning the routes, in the background, on first use.
    fn first_endpoint(&self, key: Option<&[u8]>) -> usize {
        let runtime = tokio::runtime::Handle::try_current().ok();
        if let Some(rt) = runtime.filter(|_| self.routes.claim_discovery()) {
            let (routes, channels) = (
                self.routes.clone(),
                self.endpoints
                    .iter()
                    .map(|(_, c)| c.clone())
                    .collect::<Vec<_>>(),
            );
            rt.spawn(async move { routes.discover(&channels).await });
        }
        key.and_then(|k| self.routes.endpoint_for(k))
            .unwrap_or_else(|| self.current.load(Ordering::Relaxed))
    }

    /// Runs `f` against endpoints, starting with `start`, until one answers. `key`: learn its
    /// shard's leader from the reply's headers.
    async fn with_failover<'a, T, F, Fut>(
        &'a self,
        write: bool,
        start: usize,
        key: Option<&[u8]>,
        f: F,
    ) -> Result<Served<T>, ClientError>
    where
        F: Fn(&'a Session, ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<((T, u64), RouteHint), tonic::Status>>,
    {
        let mut errors = Vec::new();
        for i in 0..self.endpoints.len() {
            let idx = (start + i) % self.endpoints.len();
            let (endpoint, ch) = &self.endpoints[idx];
            let cl = ClusterClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE);
            match f(&self.sessions[idx], cl).await {
                Ok(((value, node_id), hint)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    if let Some(k) = key {
                        self.routes.learn(k, &hint);
                    }
                    return Ok(Served {
                        value,
                        node_id,
                        endpoint: endpoint.clone(),
                    });
                }
                Err(s) if matches!(s.code(), Code::InvalidArgument | Code::ResourceExhausted) => {
                    return Err(ClientError::InvalidArgument(s.message().to_string()))
                }
                Err(s) => {
                    if endpoint_down(&s) {
                        self.routes.endpoint_failed(idx);
                    }
                    if write && !crate::router::not_executed(&s) {
                        return Err(ClientError::Unknown(format!(
                            "{endpoint}: {}",
                            describe(&s)
                        )));
                    }
                    errors.push(format!("{endpoint}: {}", describe(&s)));
                }
            }
        }
        Err(ClientError::Unavailable(errors.join("; ")))
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<Served<()>, ClientError> {
        let start = self.first_endpoint(Some(key));
        self.with_failover(true, start, Some(key), |session, _| {
            let op = session_request::Op::Put(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
            });
            async move {
                match session.call(op, self.timeout).await? {
                    (session_reply::Result::Put(r), hint) => Ok((((), r.node_id), hint)),
                    (other, _) => Err(unexpected("put", &other)),
                }
            }
        })
        .await
    }

    pub async fn get(
        &self,
        key: &[u8],
        stale: bool,
    ) -> Result<Served<Option<Vec<u8>>>, ClientError> {
        // A stale read is served by the replica it reaches: not routed to the leader (and its
        // reply has no routing fields).
        let routed = (!stale).then_some(key);
        let start = self.first_endpoint(routed);
        self.with_failover(false, start, routed, |session, _| {
            let op = session_request::Op::Get(GetRequest {
                key: key.to_vec(),
                stale,
            });
            async move {
                match session.call(op, self.timeout).await? {
                    (session_reply::Result::Get(r), hint) => {
                        Ok(((r.found.then_some(r.value), r.node_id), hint))
                    }
                    (other, _) => Err(unexpected("get", &other)),
                }
            }
        })
        .await
    }

    /// Returns whether the key existed.
    pub async fn delete(&self, key: &[u8]) -> Result<Served<bool>, ClientError> {
        let start = self.first_endpoint(Some(key));
        self.with_failover(true, start, Some(key), |session, _| {
            let op = session_request::Op::Delete(DeleteRequest { key: key.to_vec() });
            async move {
                match session.call(op, self.timeout).await? {
                    (session_reply::Result::Delete(r), hint) => Ok(((r.deleted, r.node_id), hint)),
                    (other, _) => Err(unexpected("delete", &other)),
                }
            }
        })
        .await
    }

    /// The view of the first node that answers.
    pub async fn status(&self) -> Result<Served<StatusReply>, ClientError> {
        let start = self.current.load(Ordering::Relaxed);
        self.with_failover(false, start, None, |_, mut cl| {
            let req = self.request(StatusRequest {});
            async move {
                cl.status(req).await.map(|r| {
                    let r = r.into_inner();
                    let id = r.node_id;
                    ((r, id), RouteHint::default())
                })
            }
        })
        .await
    }
}

/// A reply of the wrong kind: the node broke the protocol, and what it did is not known.
fn unexpected(what: &str, got: &session_reply::Result) -> tonic::Status {
    let got = match got {
        session_reply::Result::Put(_) => "put",
        session_reply::Result::Get(_) => "get",
        session_reply::Result::Delete(_) => "delete",
    };
    tonic::Status::internal(format!("the node answered a {what} with a {got} reply"))
}

/// Whether a failed call suggests the endpoint itself is unreachable (as opposed to the node
/// answering with an error of its own, which carries the `kv-not-executed` marker or another
/// code).
fn endpoint_down(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Cancelled | Code::Unknown
    ) && !s.metadata().contains_key(NOT_EXECUTED)
}

fn describe(s: &tonic::Status) -> String {
    match s.code() {
        Code::Unavailable if s.message().contains("transport") || s.message().is_empty() => {
            "unreachable".to_string()
        }
        Code::DeadlineExceeded => "timed out".to_string(),
        _ => s.message().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::ShardStatus;

    /// A node of a release before `Session`: unary calls only, counted.
    #[derive(Default)]
    struct OldNode {
        data: std::sync::Mutex<HashMap<Vec<u8>, Vec<u8>>>,
        streams: std::sync::atomic::AtomicUsize,
        unary: std::sync::atomic::AtomicUsize,
        forwarded: std::sync::atomic::AtomicUsize,
    }

    impl OldNode {
        fn count<T>(&self, req: &tonic::Request<T>) {
            self.unary.fetch_add(1, Ordering::Relaxed);
            if req.metadata().contains_key(FORWARDED) {
                self.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
        fn routed<T>(msg: T) -> tonic::Response<T> {
            let mut r = tonic::Response::new(msg);
            r.metadata_mut().insert(SHARD_HEADER, 3.into());
            r.metadata_mut().insert(SHARDS_HEADER, 8.into());
            r.metadata_mut().insert(LEADER_HINT, 1.into());
            r
        }
    }

    type Replies =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<SessionReply, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl crate::pb::key_value_server::KeyValue for OldNode {
        async fn put(
            &self,
            req: tonic::Request<PutRequest>,
        ) -> Result<tonic::Response<crate::pb::PutResponse>, tonic::Status> {
            self.count(&req);
            let r = req.into_inner();
            if r.key == b"refuse" {
                let mut s = crate::router::unavailable("node 1 is not the leader".into());
                s.metadata_mut().insert(LEADER_HINT, 2.into());
                return Err(s);
            }
            self.data.lock().unwrap().insert(r.key, r.value);
            Ok(OldNode::routed(crate::pb::PutResponse { node_id: 1 }))
        }
        async fn get(
            &self,
            req: tonic::Request<GetRequest>,
        ) -> Result<tonic::Response<crate::pb::GetResponse>, tonic::Status> {
            self.count(&req);
            let v = self
                .data
                .lock()
                .unwrap()
                .get(&req.into_inner().key)
                .cloned();
            Ok(OldNode::routed(crate::pb::GetResponse {
                found: v.is_some(),
                value: v.unwrap_or_default(),
                node_id: 1,
            }))
        }
        async fn delete(
            &self,
            req: tonic::Request<DeleteRequest>,
        ) -> Result<tonic::Response<crate::pb::DeleteResponse>, tonic::Status> {
            self.count(&req);
            let existed = self.data.lock().unwrap().remove(&req.into_inner().key);
            Ok(OldNode::routed(crate::pb::DeleteResponse {
                deleted: existed.is_some(),
                node_id: 1,
            }))
        }
        type SessionStream = Replies;
        async fn session(
            &self,
            _: tonic::Request<tonic::Streaming<SessionRequest>>,
        ) -> Result<tonic::Response<Replies>, tonic::Status> {
            self.streams.fetch_add(1, Ordering::Relaxed);
            // What tonic answers for a method the server does not have.
            Err(tonic::Status::unimplemented("unknown method Session"))
        }
    }

    /// Against a node that does not serve `Session`, a session sends its requests as unary
    /// calls (results, routing headers, error markers and `kv-forwarded` as the stream would
    /// carry them), stops asking for the stream, and asks again once `REPROBE_STREAM` is up.
    #[tokio::test]
    async fn a_session_falls_back_to_unary_calls_on_an_older_node() {
        use session_reply::Result as R;
        use session_request::Op;
        let node = Arc::new(OldNode::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(crate::pb::key_value_server::KeyValueServer::from_arc(
                    node.clone(),
                ))
                .serve_with_incoming(crate::server::incoming(listener, 16)),
        );
        let t = Duration::from_secs(10);
        let ch = channel(&addr, t).unwrap();
        let put = |k: &str, v: &str| {
            Op::Put(PutRequest {
                key: k.into(),
                value: v.into(),
            })
        };
        let counts = || {
            (
                node.streams.load(Ordering::Relaxed),
                node.unary.load(Ordering::Relaxed),
                node.forwarded.load(Ordering::Relaxed),
            )
        };

        let session = Session::new(&addr, ch.clone());
        assert!(!session.is_unary());
        let (r, hint) = session.call(put("a", "1"), t).await.expect("put");
        assert!(matches!(r, R::Put(ref p) if p.node_id == 1), "{r:?}");
        assert_eq!(
            (hint.shard, hint.shards, hint.leader),
            (Some(3), 8, Some(1))
        );
        assert!(session.is_unary());
        assert_eq!(
            counts(),
            (1, 1, 0),
            "one stream refused, then the unary put"
        );

        let get = Op::Get(GetRequest {
            key: b"a".to_vec(),
            stale: false,
        });
        match session.call(get.clone(), t).await.expect("get") {
            (R::Get(g), _) => assert!(g.found && g.value == b"1", "{g:?}"),
            r => panic!("{r:?}"),
        }
        let del = Op::Delete(DeleteRequest { key: b"a".to_vec() });
        match session.call(del, t).await.expect("delete") {
            (R::Delete(d), _) => assert!(d.deleted),
            r => panic!("{r:?}"),
        }
        assert_eq!(counts(), (1, 3, 0), "no stream asked for again");

        let e = session
            .call(put("refuse", "x"), t)
            .await
            .expect_err("refused put");
        assert_eq!(e.code(), Code::Unavailable);
        assert!(crate::router::not_executed(&e), "{e:?}");
        assert_eq!(RouteHint::from_headers(e.metadata()).leader, Some(2));

        // The time is up: the stream is asked for again (refused again), the call still served.
        session.set_mode(Mode::UnaryUntil(Instant::now()));
        session.call(get, t).await.expect("get after the re-probe");
        assert_eq!(counts(), (2, 5, 0));

        let forwarding = Session::forwarding(1, ch);
        forwarding
            .call(put("b", "2"), t)
            .await
            .expect("forwarded put");
        assert_eq!(counts(), (3, 6, 1), "the unary call carries kv-forwarded");
        server.abort();
    }

    /// What a unary reply's headers say, parsed as the client parses them.
    fn reply_headers(shard: u32, shards: u32, leader: Option<u64>) -> RouteHint {
        let mut md = MetadataMap::new();
        md.insert(SHARD_HEADER, shard.into());
        md.insert(SHARDS_HEADER, shards.into());
        if let Some(l) = leader {
            md.insert(LEADER_HINT, l.into());
        }
        RouteHint::from_headers(&md)
    }

    /// Routes come from Status (endpoint -> node, shard count, leaders) and reply headers; a
    /// failed endpoint is avoided for a while; a reply that places keys differently turns
    /// routing off instead of routing wrongly.
    #[test]
    fn routes_learn_from_status_and_replies() {
        let routes = Routes::new(3);
        let key = b"some-key";
        assert_eq!(routes.endpoint_for(key), None, "nothing known yet");
        let shard = shard_for_key(key, 8);
        // Endpoint 2 is node 7; it says node 5 leads the key's shard.
        routes.learn_status(
            2,
            &StatusReply {
                node_id: 7,
                shard_count: 8,
                shards: vec![ShardStatus {
                    shard,
                    leader: 5,
                    has_leader: true,
                    ..Default::default()
                }],
                ..Default::default()
            },
        );
        assert_eq!(
            routes.endpoint_for(key),
            None,
            "node 5's endpoint is unknown"
        );
        routes.learn(key, &reply_headers(shard, 8, Some(7)));
        assert_eq!(routes.endpoint_for(key), Some(2));
        routes.endpoint_failed(2);
        assert_eq!(routes.endpoint_for(key), None, "just failed");
        routes.write().avoid_until[2] = None;
        assert_eq!(routes.endpoint_for(key), Some(2));
        // A reply naming no leader forgets it.
        routes.learn(key, &reply_headers(shard, 8, None));
        assert_eq!(routes.endpoint_for(key), None);
        routes.learn(key, &reply_headers(shard, 8, Some(7)));
        // A node whose kv-shard disagrees with our placement: stop routing altogether.
        routes.learn(key, &reply_headers((shard + 1) % 8, 8, Some(7)));
        assert_eq!(routes.endpoint_for(key), None);
        routes.learn(key, &reply_headers(shard, 8, Some(7)));
        assert_eq!(routes.endpoint_for(key), None, "stays off");
    }
}
