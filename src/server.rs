//! The gRPC services of a node, on one port: `kv.v1.KeyValue` for clients and `kv.v1.Cluster`
//! for peers. Input is validated here and errors are mapped to gRPC status codes once.
//!
//! Also the server's resource limits ([`incoming`] and the constants below): a bounded number of
//! connections, each of which must send its HTTP/2 preface promptly, so that idle or abusive
//! connections can neither use up the file descriptors the WAL and sled need nor pile up.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::raft::{AppendEntriesRequest, VoteRequest, VoteResponse};
use openraft::Snapshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::pb;
use crate::raft::pipe;
use crate::raft::{NodeId, SnapshotData, SnapshotMeta, TypeConfig, Vote};
use crate::recover;
use crate::router::{
    unavailable, Op, Outcome, FORWARDED, LEADER_HINT, SHARDS_HEADER, SHARD_HEADER,
};

/// Keys are at most 4 KiB; values at most 1 MiB (INTERFACE.md: may be raised, never lowered).
pub const MAX_KEY: usize = 4 * 1024;
pub const MAX_VALUE: usize = 1024 * 1024;

/// Largest `kv.v1.KeyValue` message decoded or encoded: room for the largest key and value with
/// headroom to raise the value limit, yet far below the peer service's limit
/// ([`crate::peers::MAX_MESSAGE`], 256 MiB), since the server buffers a whole message before
/// decoding it. A larger message is refused with `RESOURCE_EXHAUSTED` without being buffered.
pub const MAX_CLIENT_MESSAGE: usize = 8 * 1024 * 1024;
const _: () = assert!(MAX_KEY + MAX_VALUE + 1024 < MAX_CLIENT_MESSAGE);

/// HTTP/2 streams (requests in flight) per connection. A peer multiplexes every shard's Raft
/// traffic and its forwarded requests over one connection, so this is generous; beyond it a
/// client's requests queue on its side. It bounds what one connection can make the node hold.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// HTTP/2 keepalive: a connection whose peer does not answer a PING within the timeout is
/// closed, dropping whatever responses it was not reading.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection must send the 24-byte HTTP/2 client preface within this time, or is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const PREFACE_LEN: usize = 24;

/// File descriptors kept free for the WAL, sled and outgoing peer connections.
const FD_RESERVE: usize = 256;
const MAX_CONNECTIONS_CAP: usize = 16_384;

/// How many client and peer connections the node accepts at once: its soft open-files limit
/// (from `/proc/self/limits`, else 1024) minus [`FD_RESERVE`], at least 64 and at most 16,384.
/// Running out of descriptors would make the next WAL segment or sled file fail to open.
pub fn max_connections() -> usize {
    let soft = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    soft.saturating_sub(FD_RESERVE)
        .clamp(64, MAX_CONNECTIONS_CAP)
}

/// An accepted connection: holds one of the [`incoming`] permits until it closes, and fails its
/// reads if the HTTP/2 preface has not arrived within [`HANDSHAKE_TIMEOUT`].
pub struct Conn {
    io: tokio::net::TcpStream,
    _permit: tokio::sync::OwnedSemaphorePermit,
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
    received: usize,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::future::Future;
        use std::task::Poll;
        let before = buf.filled().len();
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.received += buf.filled().len() - before;
                if this.received >= PREFACE_LEN {
                    this.handshake = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = match this.handshake.as_mut() {
                    Some(deadline) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if expired {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no HTTP/2 preface within the handshake timeout",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The server's accepted connections, for `serve_with_incoming`: at most `max_connections` open
/// at once (beyond that, new ones wait in the listen backlog until one closes), `TCP_NODELAY` on
/// each, and accept errors such as "too many open files" answered with a short pause instead of
/// a busy loop.
pub fn incoming(
    listener: tokio::net::TcpListener,
    max_connections: usize,
) -> impl Stream<Item = std::io::Result<Conn>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let state = (listener, permits, None::<Instant>);
    futures::stream::unfold(state, move |(listener, permits, mut warned)| async move {
        loop {
            if permits.available_permits() == 0
                && warned.map_or(true, |t| t.elapsed() > Duration::from_secs(10))
            {
                tracing::warn!(
                    max_connections,
                    "connection limit reached; new connections wait until one closes"
                );
                warned = Some(Instant::now());
            }
            let permit = permits.clone().acquire_owned().await.ok()?;
            match listener.accept().await {
                Ok((io, _)) => {
                    let _ = io.set_nodelay(true);
                    let conn = Conn {
                        io,
                        _permit: permit,
                        handshake: Some(Box::pin(tokio::time::sleep(HANDSHAKE_TIMEOUT))),
                        received: 0,
                    };
                    return Some((Ok(conn), (listener, permits, warned)));
                }
                Err(e) => {
                    drop(permit);
                    // Out of descriptors or memory: pause rather than spin on the error.
                    let starved = matches!(e.raw_os_error(), Some(23 | 24 | 12 | 105));
                    if starved && warned.map_or(true, |t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!("accepting a connection failed: {e}; pausing accepts");
                        warned = Some(Instant::now());
                    }
                    if starved {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    })
}

pub struct KeyValueService {
    pub node: Arc<Node>,
}

/// Validates a client's key: 1 to [`MAX_KEY`] bytes. Pure, so fuzz targets call it too.
pub fn check_key(key: &[u8]) -> Result<(), Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("key must not be empty"));
    }
    if key.len() > MAX_KEY {
        return Err(Status::invalid_argument(format!(
            "key is {} bytes; the limit is {MAX_KEY}",
            key.len()
        )));
    }
    Ok(())
}

/// Validates a client's put: [`check_key`], and a value of at most [`MAX_VALUE`] bytes.
pub fn check_put(key: &[u8], value: &[u8]) -> Result<(), Status> {
    check_key(key)?;
    if value.len() > MAX_VALUE {
        return Err(Status::invalid_argument(format!(
            "value is {} bytes; the limit is {MAX_VALUE}",
            value.len()
        )));
    }
    Ok(())
}

/// A decoded `kv.v1.Cluster/Raft` message.
pub enum RaftMessage {
    Append(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
}

/// Decodes the payload of a peer's `Raft` call (bincode openraft types) by its kind. Anything
/// malformed is `INVALID_ARGUMENT`; nothing a peer sends may panic here.
pub fn decode_raft(kind: i32, payload: &[u8]) -> Result<RaftMessage, Status> {
    match pb::RaftKind::try_from(kind) {
        Ok(pb::RaftKind::Append) => decode(payload).map(RaftMessage::Append),
        Ok(pb::RaftKind::Vote) => decode(payload).map(RaftMessage::Vote),
        _ => Err(Status::invalid_argument(format!(
            "bad raft message kind {kind}"
        ))),
    }
}

/// Decodes the payload of a peer's `OfferSnapshot` call.
pub fn decode_snapshot_offer(payload: &[u8]) -> Result<(Vote, SnapshotMeta), Status> {
    decode(payload)
}

/// The client's deadline (grpc-timeout) when it sent one, capped by our own request timeout.
fn deadline<T>(node: &Node, req: &Request<T>) -> Instant {
    let theirs = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    within(node, theirs)
}

/// The deadline of a request whose caller waits `theirs` (if it said), capped by the node's
/// `request_timeout_ms`.
fn within(node: &Node, theirs: Option<Duration>) -> Instant {
    let ours = Duration::from_millis(node.config.request_timeout_ms);
    let now = Instant::now();
    // A configured timeout too large to add (years) means "no deadline" in practice.
    let within = theirs.map_or(ours, |t| t.min(ours));
    now.checked_add(within)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// Parses a `grpc-timeout` header value ("100m", "5S", ...); `None` if malformed.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    // The unit is one ASCII letter; splitting a multi-byte last character would panic.
    if !v.is_ascii() {
        return None;
    }
    let (num, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED)
}

/// A successful reply with the routing headers: the key's shard, the shard count and, when
/// known, the shard's leader (see [`crate::router::LEADER_HINT`]): the node that executed a write
/// or a linearizable read. Stale reads carry none.
fn routed<T>(node: &Node, shard: u32, leader: Option<u64>, msg: T) -> Response<T> {
    let mut r = Response::new(msg);
    let md = r.metadata_mut();
    md.insert(SHARD_HEADER, shard.into());
    md.insert(SHARDS_HEADER, node.placement.shards.into());
    if let Some(l) = leader {
        md.insert(LEADER_HINT, l.into());
    }
    r
}

/// A stopping node refuses clients' requests before executing them (see
/// [`Node::start_draining`]); peers' forwarded ones it still serves.
fn refuse_if_draining(node: &Node, forwarded: bool) -> Result<(), Status> {
    if node.is_draining() && !forwarded {
        return Err(unavailable(format!(
            "node {} is stopping; ask another node",
            node.id
        )));
    }
    Ok(())
}

/// What a successful reply's routing headers say (see [`routed`]); stale reads carry none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Route {
    shard: u32,
    leader: u64,
}

impl KeyValueService {
    /// A put, as the unary call and a session both serve it.
    async fn do_put(
        &self,
        r: pb::PutRequest,
        deadline: Instant,
        fwd: bool,
    ) -> Result<(pb::PutResponse, Option<Route>), Status> {
        refuse_if_draining(&self.node, fwd)?;
        check_put(&r.key, &r.value)?;
        let shard = self.node.placement.shard_for_key(&r.key);
        let op = Op::Put {
            key: r.key,
            value: r.value,
        };
        let (_, node_id) = self.node.execute(op, fwd, deadline).await?;
        let route = Route {
            shard,
            leader: node_id,
        };
        Ok((pb::PutResponse { node_id }, Some(route)))
    }

    async fn do_get(
        &self,
        r: pb::GetRequest,
        deadline: Instant,
        fwd: bool,
    ) -> Result<(pb::GetResponse, Option<Route>), Status> {
        refuse_if_draining(&self.node, fwd)?;
        check_key(&r.key)?;
        let (shard, stale) = (self.node.placement.shard_for_key(&r.key), r.stale);
        let op = Op::Get {
            key: r.key,
            stale: r.stale,
        };
        match self.node.execute(op, fwd, deadline).await? {
            (Outcome::Get { value }, node_id) => {
                let reply = pb::GetResponse {
                    found: value.is_some(),
                    value: value.unwrap_or_default(),
                    node_id,
                };
                // A stale read is served by the replica reached, not routed: no headers (they
                // cost measurably at stale-read rates).
                let route = (!stale).then_some(Route {
                    shard,
                    leader: node_id,
                });
                Ok((reply, route))
            }
            _ => Err(Status::internal("unexpected outcome for get")),
        }
    }

    async fn do_delete(
        &self,
        r: pb::DeleteRequest,
        deadline: Instant,
        fwd: bool,
    ) -> Result<(pb::DeleteResponse, Option<Route>), Status> {
        refuse_if_draining(&self.node, fwd)?;
        check_key(&r.key)?;
        let shard = self.node.placement.shard_for_key(&r.key);
        match self
            .node
            .execute(Op::Delete { key: r.key }, fwd, deadline)
            .await?
        {
            (Outcome::Delete { existed }, node_id) => {
                let reply = pb::DeleteResponse {
                    deleted: existed,
                    node_id,
                };
                let route = Route {
                    shard,
                    leader: node_id,
                };
                Ok((reply, Some(route)))
            }
            _ => Err(Status::internal("unexpected outcome for delete")),
        }
    }

    /// Serves one request of a session and tags the reply with its id.
    /// `forwarded`: the session is a peer's forwarding session (opened with `kv-forwarded`).
    async fn session_one(&self, req: pb::SessionRequest, forwarded: bool) -> pb::SessionReply {
        use pb::session_reply::Result as R;
        use pb::session_request::Op as O;
        let deadline = within(
            &self.node,
            (req.timeout_ms > 0).then(|| Duration::from_millis(u64::from(req.timeout_ms))),
        );
        let outcome = match req.op {
            Some(O::Put(r)) => self
                .do_put(r, deadline, forwarded)
                .await
                .map(|(m, route)| (R::Put(m), route)),
            Some(O::Get(r)) => self
                .do_get(r, deadline, forwarded)
                .await
                .map(|(m, route)| (R::Get(m), route)),
            Some(O::Delete(r)) => self
                .do_delete(r, deadline, forwarded)
                .await
                .map(|(m, route)| (R::Delete(m), route)),
            None => Err(Status::invalid_argument(
                "a session request needs one of put, get or delete",
            )),
        };
        session_reply(req.id, self.node.placement.shards, outcome)
    }
}

/// The session form of a request's outcome: what the unary reply says in its message and
/// headers.
fn session_reply(
    id: u64,
    shards: u32,
    outcome: Result<(pb::session_reply::Result, Option<Route>), Status>,
) -> pb::SessionReply {
    match outcome {
        Ok((result, route)) => pb::SessionReply {
            id,
            result: Some(result),
            shard: route.map(|r| r.shard),
            shards: if route.is_some() { shards } else { 0 },
            leader: route.map(|r| r.leader),
            ..Default::default()
        },
        Err(s) => pb::SessionReply {
            id,
            code: match s.code() {
                // A status can never be Ok here; map one defensively to a failure.
                tonic::Code::Ok => tonic::Code::Unknown as i32,
                c => c as i32,
            },
            message: s.message().to_string(),
            leader: s
                .metadata()
                .get(LEADER_HINT)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
            not_executed: crate::router::not_executed(&s),
            ..Default::default()
        },
    }
}

/// `msg` with the routing headers of `route`, if any.
fn with_route<T>(node: &Node, route: Option<Route>, msg: T) -> Response<T> {
    match route {
        Some(r) => routed(node, r.shard, Some(r.leader), msg),
        None => Response::new(msg),
    }
}

/// The replies of a stream served by [`serve_stream`].
type Replies<Rep> = Pin<Box<dyn Stream<Item = Result<Rep, Status>> + Send>>;
type SessionStream = Replies<pb::SessionReply>;

#[tonic::async_trait]
impl pb::key_value_server::KeyValue for KeyValueService {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let (deadline, fwd) = (deadline(&self.node, &req), forwarded(&req));
        let (msg, route) = self.do_put(req.into_inner(), deadline, fwd).await?;
        Ok(with_route(&self.node, route, msg))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let (deadline, fwd) = (deadline(&self.node, &req), forwarded(&req));
        let (msg, route) = self.do_get(req.into_inner(), deadline, fwd).await?;
        Ok(with_route(&self.node, route, msg))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let (deadline, fwd) = (deadline(&self.node, &req), forwarded(&req));
        let (msg, route) = self.do_delete(req.into_inner(), deadline, fwd).await?;
        Ok(with_route(&self.node, route, msg))
    }

    type SessionStream = SessionStream;

    /// A client's many requests on one stream: served like `RaftStream` (see [`serve_stream`]),
    /// each exactly as its unary call. A session opened with `kv-forwarded` is a peer's
    /// forwarding session: each of its requests is served as a forwarded unary call is.
    async fn session(
        &self,
        req: Request<tonic::Streaming<pb::SessionRequest>>,
    ) -> Result<Response<SessionStream>, Status> {
        let fwd = forwarded(&req);
        refuse_if_draining(&self.node, fwd)?;
        let service = Arc::new(KeyValueService {
            node: self.node.clone(),
        });
        serve_stream(&self.node, req.into_inner(), move |r| {
            let service = service.clone();
            async move { service.session_one(r, fwd).await }
        })
        .map(Response::new)
    }
}

/// Serves a stream of requests (a peer's [`crate::raft::pipe`], a client's session): each
/// request in a task of its own, so one that waits (an append waiting for its fsync, a write
/// waiting for its commit) holds up none of the others; `handle` tags each reply with its
/// request's id. At most [`MAX_STREAMS_PER_CONNECTION`] requests are in progress (handled, or
/// with their reply waiting to be queued), as many as unary calls could be on one connection;
/// beyond that the stream is not read, and HTTP/2 flow control holds the sender back. Ends when
/// the sender closes its side or this node stops serving (an open stream would otherwise keep
/// the server's graceful shutdown waiting).
fn serve_stream<Req, Rep, F, Fut>(
    node: &Node,
    mut requests: tonic::Streaming<Req>,
    handle: F,
) -> Result<Replies<Rep>, Status>
where
    Req: Send + 'static,
    Rep: Send + 'static,
    F: Fn(Req) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Rep> + Send + 'static,
{
    let mut stop = node.stop_signal();
    if *stop.borrow() {
        return Err(Status::unavailable(format!("node {} is stopping", node.id)));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_REPLIES);
    let permits = Arc::new(tokio::sync::Semaphore::new(
        MAX_STREAMS_PER_CONNECTION as usize,
    ));
    let me = node.id;
    tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                m = requests.message() => m,
                _ = stop.changed() => break,
            };
            // A transport error ends the stream like its end does: the sender opens another.
            let Ok(Some(msg)) = msg else { return };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (reply, tx) = (handle(msg), tx.clone());
            tokio::spawn(async move {
                // The sender stopped reading: nobody waits for this reply.
                let _ = tx.send(Ok(reply.await)).await;
                // Held until the reply is queued: a sender that reads no replies gets no more
                // of its requests read either.
                drop(permit);
            });
        }
        // Stopping: no more requests are read. Once every permit is back, every request that
        // was read has its reply queued; the stream then ends with a status that says the
        // requests still without a reply were never read, so never executed (their senders may
        // send them elsewhere, see crate::mux).
        if let Ok(_every_permit) = permits.acquire_many(MAX_STREAMS_PER_CONNECTION).await {
            let _ = tx
                .send(Err(unavailable(format!(
                    "node {me} is stopping: it answered every request of this stream it read, \
                     and read no other"
                ))))
                .await;
        }
    });
    Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

pub struct ClusterService {
    pub node: Arc<Node>,
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, Status> {
    bincode::deserialize(b)
        .map_err(|e| Status::invalid_argument(format!("undecodable message: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Status> {
    bincode::serialize(v).map_err(|e| Status::internal(e.to_string()))
}

impl ClusterService {
    /// One Raft message of a peer, from a unary `Raft` call or a `RaftStream`.
    async fn handle_raft(&self, r: pb::RaftRequest) -> Result<pb::RaftReply, Status> {
        let shard = self.shard(r.shard)?;
        let payload = match decode_raft(r.kind, &r.payload)? {
            RaftMessage::Append(rpc) => encode(&shard.raft.append_entries(rpc).await)?,
            RaftMessage::Vote(rpc) => {
                // Noted before openraft sees it: a vote request for a later term ends this node's
                // leader lease (see crate::lease).
                shard.lease.vote_requested(&rpc.vote);
                if self.node.is_recovering(r.shard) {
                    // Lost its disk, not caught up: a vote from it could elect a leader missing
                    // committed entries. Refuse (always safe in Raft).
                    let resp: Result<VoteResponse<NodeId>, openraft::error::RaftError<NodeId>> =
                        Ok(crate::raft::refused_vote(&shard.raft, &rpc));
                    encode(&resp)?
                } else {
                    encode(&shard.raft.vote(rpc).await)?
                }
            }
        };
        Ok(pb::RaftReply {
            payload,
            error: String::new(),
        })
    }

    fn shard(&self, id: u32) -> Result<Arc<crate::node::Shard>, Status> {
        self.node.shard(id).ok_or_else(|| {
            Status::not_found(format!("node {} does not serve shard {id}", self.node.id))
        })
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::RecoverChunk, Status>> + Send>>;
type ReplyStream = Replies<pb::RaftStreamReply>;

/// Replies queued on a `RaftStream` or a `Session` before its handlers wait (HTTP/2 flow control
/// is behind it).
const STREAM_REPLIES: usize = 1024;

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn ping(
        &self,
        req: Request<pb::PingRequest>,
    ) -> Result<Response<pb::PingResponse>, Status> {
        let _ = req;
        Ok(Response::new(pb::PingResponse {
            node_id: self.node.id,
            cluster_name: self.node.config.cluster_name.clone(),
            initialized: self.node.is_initialized(),
            shard_count: self.node.config.shards,
            shards_with_state: self.node.shards_with_state(),
            shard_logs: self
                .node
                .shard_log_states()
                .into_iter()
                .map(|(shard, last_log_index)| pb::ShardLogState {
                    shard,
                    last_log_index,
                })
                .collect(),
        }))
    }

    async fn raft(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        self.handle_raft(req.into_inner()).await.map(Response::new)
    }

    type RaftStreamStream = ReplyStream;

    /// Serves a peer's [`crate::raft::pipe`] (see [`serve_stream`]).
    async fn raft_stream(
        &self,
        req: Request<tonic::Streaming<pb::RaftRequest>>,
    ) -> Result<Response<Self::RaftStreamStream>, Status> {
        let service = Arc::new(ClusterService {
            node: self.node.clone(),
        });
        serve_stream(&self.node, req.into_inner(), move |msg| {
            let service = service.clone();
            async move {
                let id = msg.id;
                pipe::reply_for(id, service.handle_raft(msg).await)
            }
        })
        .map(Response::new)
    }

    async fn offer_snapshot(
        &self,
        req: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let r = req.into_inner();
        let shard = self.shard(r.shard)?;
        let (vote, meta) = decode_snapshot_offer(&r.payload)?;
        // The leader sends no heartbeats to us until we answer, and pulling a big shard takes
        // a while: do not campaign meanwhile, or the leader would find us in a higher term
        // and step down for nothing (found by tests/sim.rs).
        shard.raft.runtime_config().elect(false);
        let pulled =
            recover::pull(&self.node.peers, self.node.id, r.from, r.shard, &shard.data).await;
        if !self.node.is_recovering(r.shard) {
            shard.raft.runtime_config().elect(true);
        }
        let pulled = pulled.map_err(|e| Status::unavailable(e.to_string()))?;
        let (keys, bytes, started) = (pulled.keys, pulled.bytes, pulled.started);
        let snapshot = Snapshot {
            meta,
            snapshot: Box::new(SnapshotData {
                received: Some(pulled.received),
            }),
        };
        let res = shard.raft.install_full_snapshot(vote, snapshot).await;
        if res.is_ok() {
            recover::log_done(self.node.id, r.from, r.shard, keys, bytes, started);
        }
        Ok(Response::new(pb::RaftReply {
            payload: encode(&res)?,
            error: String::new(),
        }))
    }

    type RecoverStream = ChunkStream;

    async fn recover(
        &self,
        req: Request<pb::RecoverRequest>,
    ) -> Result<Response<Self::RecoverStream>, Status> {
        let r = req.into_inner();
        let shard = self.shard(r.shard)?;
        let vote = shard.raft.metrics().borrow().vote;
        tracing::info!(
            KV_NODE = self.node.id,
            KV_SHARD = r.shard,
            KV_PEER = r.from,
            "streaming shard {} to node {}",
            r.shard,
            r.from
        );
        let stream = recover::stream(shard.data.clone(), Some(vote))?;
        Ok(Response::new(Box::pin(stream)))
    }

    async fn campaign(
        &self,
        req: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::CampaignReply>, Status> {
        let r = req.into_inner();
        let shard = self.shard(r.shard)?;
        if self.node.is_recovering(r.shard) {
            return Ok(Response::new(pb::CampaignReply { started: false }));
        }
        // Campaign once the old leader's lease has run out; answer at once.
        let after = Duration::from_millis(r.after_ms.min(10_000));
        let raft = shard.raft.clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            let _ = raft.trigger().elect().await;
        });
        Ok(Response::new(pb::CampaignReply { started: true }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let node = &self.node;
        let peers = node
            .health
            .snapshot()
            .into_iter()
            .map(|p| pb::PeerStatus {
                id: p.id,
                addr: node.peers.addr(p.id).unwrap_or_default().to_string(),
                up: p.up,
                last_seen_ms_ago: p.last_seen.map_or(u64::MAX, |d| d.as_millis() as u64),
            })
            .collect();
        let shards = node
            .shards()
            .into_iter()
            .map(|s| {
                let m = s.raft.metrics().borrow().clone();
                pb::ShardStatus {
                    shard: s.id,
                    replicas: s.replicas.clone(),
                    leader: m.current_leader.unwrap_or_default(),
                    has_leader: m.current_leader.is_some(),
                    term: m.current_term,
                    applied_index: m.last_applied.map_or(0, |l| l.index),
                    role: format!("{:?}", m.state),
                    preferred_leader: node.placement.preferred_leader(s.id),
                    last_log_index: m.last_log_index.unwrap_or(0),
                    recovering: node.is_recovering(s.id),
                }
            })
            .collect();
        Ok(Response::new(pb::StatusReply {
            node_id: node.id,
            peers,
            shards,
            shard_count: node.config.shards,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    /// Found by the `kv_requests` fuzz target: a value ending in a multi-byte character made
    /// `split_at` panic. (Header values reach it only as ASCII today, but the function is pub.)
    #[test]
    fn grpc_timeout_parsing_never_panics() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(
            parse_grpc_timeout("99999999999999999999H"),
            None,
            "does not fit a u64"
        );
        assert!(parse_grpc_timeout(&format!("{}H", u64::MAX)).is_some());
        for bad in ["", "m", "1é", "é", "1x", "-1m", "1 m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn put_validation_matches_the_documented_limits() {
        assert!(check_put(b"k", &[0u8; MAX_VALUE]).is_ok());
        assert!(check_put(&[b'k'; MAX_KEY], b"").is_ok());
        for (k, v) in [
            (&b""[..], &b"v"[..]),
            (&[b'k'; MAX_KEY + 1][..], &b"v"[..]),
            (&b"k"[..], &[0u8; MAX_VALUE + 1][..]),
        ] {
            let err = check_put(k, v).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
        }
        assert!(decode_raft(99, b"").is_err());
        assert!(decode_raft(1, &[0xff; 17]).is_err());
        assert!(decode_snapshot_offer(&[0xff; 3]).is_err());
    }

    #[test]
    fn connection_limit_follows_the_fd_limit() {
        let n = max_connections();
        assert!((64..=MAX_CONNECTIONS_CAP).contains(&n), "{n}");
    }

    /// At most `max` connections are accepted at once; the next waits until one closes. A
    /// connection that sends no preface is closed after the handshake timeout.
    #[tokio::test]
    async fn incoming_caps_connections_and_times_out_silent_ones() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Box::pin(incoming(listener, 2));
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let first = conns.next().await.unwrap().unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        let second = conns.next().await.unwrap().unwrap();
        let _c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let third = tokio::time::timeout(Duration::from_millis(300), conns.next()).await;
        assert!(
            third.is_err(),
            "a third connection was accepted over the limit of 2"
        );
        drop(first);
        let third = tokio::time::timeout(Duration::from_secs(5), conns.next())
            .await
            .expect("accepted once a permit is free")
            .unwrap()
            .unwrap();
        drop(second);

        // A connection that sends its preface is left alone; reads go through.
        let mut talker = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut served = tokio::time::timeout(Duration::from_secs(5), conns.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        talker.write_all(&[b'x'; PREFACE_LEN]).await.unwrap();
        let mut buf = [0u8; PREFACE_LEN];
        served.read_exact(&mut buf).await.unwrap();
        assert_eq!(buf, [b'x'; PREFACE_LEN]);

        // The silent one errors out once the handshake timeout has passed.
        let mut silent = third;
        silent.handshake = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
        let err = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("the handshake deadline fires")
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
