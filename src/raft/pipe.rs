//! Raft messages to one peer on one long-lived gRPC stream (`kv.v1.Cluster/RaftStream`).
//!
//! A unary call per message costs an HTTP/2 stream each way: headers to encode and parse, a
//! task per request on the peer, and two or three socket writes. Under load that, not the
//! consensus work, was most of a write's CPU: with 64 clients writing, 8 shards on 3 nodes, the
//! box made 6 socket writes per client write. On a pipe, a message is one DATA frame of a stream
//! that stays open, and messages of several shards that leave together share one socket write.
//!
//! Each request carries an id; the peer answers every request on its reply stream with the same
//! id, in whatever order its handlers finish (see `ClusterService::raft_stream`), so a shard
//! whose follower is waiting for an fsync holds up nobody else's messages. What a caller sees is
//! what a unary call gave it: the peer's reply, or a gRPC status (`UNAVAILABLE` when the stream
//! broke, `DEADLINE_EXCEEDED` when the reply did not come in time).
//!
//! The stream is opened on first use and reopened on the first call after it broke (the peer
//! restarted, the connection dropped, the peer stopped serving). A broken stream fails every call
//! waiting on it at once. Messages over [`MAX_PIPED`] bytes take a unary call of their own:
//! one long message on the shared stream would hold up every shard's heartbeats behind it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::pb::cluster_client::ClusterClient;
use crate::pb::{RaftReply, RaftRequest, RaftStreamReply};
use crate::peers::cluster_client;
use crate::raft::NodeId;

/// Larger messages go as unary calls (see the module docs).
pub const MAX_PIPED: usize = 256 * 1024;
/// Messages queued for the stream before callers wait (HTTP/2 flow control is behind it).
const QUEUE: usize = 1024;

/// The pipe to one peer. Cheap to share: every shard's network uses the same one.
pub struct RaftPipe {
    target: NodeId,
    channel: Channel,
    next_id: AtomicU64,
    /// The open stream, if any. Opening happens under this lock, so concurrent callers share one.
    open: tokio::sync::Mutex<Option<Pipe>>,
}

/// One open stream: the sending half, and the calls waiting for replies (shared with the task
/// that reads them).
struct Pipe {
    tx: mpsc::Sender<RaftRequest>,
    waiting: Arc<Waiting>,
}

#[derive(Default)]
struct Waiting {
    inner: Mutex<WaitingInner>,
}

#[derive(Default)]
struct WaitingInner {
    /// Why the stream ended; no call may wait on it after that.
    broken: Option<String>,
    calls: HashMap<u64, oneshot::Sender<Result<RaftReply, Status>>>,
}

impl Waiting {
    fn lock(&self) -> MutexGuard<'_, WaitingInner> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the stream broken and fails every waiting call.
    fn fail_all(&self, why: String) {
        let calls = {
            let mut w = self.lock();
            w.broken.get_or_insert(why.clone());
            std::mem::take(&mut w.calls)
        };
        for (_, call) in calls {
            let _ = call.send(Err(Status::unavailable(why.clone())));
        }
    }

    fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }
}

/// Forgets a call that stopped waiting (timed out or was dropped), so its slot does not stay.
struct Registered<'a> {
    waiting: &'a Waiting,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.waiting.lock().calls.remove(&self.id);
    }
}

impl RaftPipe {
    pub fn new(target: NodeId, channel: Channel) -> RaftPipe {
        RaftPipe {
            target,
            channel,
            next_id: AtomicU64::new(1),
            open: tokio::sync::Mutex::new(None),
        }
    }

    fn client(&self) -> ClusterClient<Channel> {
        cluster_client(self.channel.clone())
    }

    fn closed(&self) -> String {
        format!("the raft stream to node {} closed", self.target)
    }

    /// Sends `req` and waits at most `timeout` for the peer's reply.
    pub async fn call(&self, req: RaftRequest, timeout: Duration) -> Result<RaftReply, Status> {
        if req.payload.len() > MAX_PIPED {
            let mut request = tonic::Request::new(req);
            request.set_timeout(timeout);
            return self.client().raft(request).await.map(|r| r.into_inner());
        }
        match tokio::time::timeout(timeout, self.piped(req)).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "node {} did not answer within {timeout:?}",
                self.target
            ))),
        }
    }

    async fn piped(&self, mut req: RaftRequest) -> Result<RaftReply, Status> {
        let (tx, waiting) = self.stream().await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        req.id = id;
        let (done, reply) = oneshot::channel();
        {
            let mut w = waiting.lock();
            if let Some(why) = &w.broken {
                return Err(Status::unavailable(why.clone()));
            }
            w.calls.insert(id, done);
        }
        let _registered = Registered {
            waiting: &waiting,
            id,
        };
        if tx.send(req).await.is_err() {
            // The request stream's receiver is gone: hyper dropped the stream.
            waiting.fail_all(self.closed());
        }
        reply
            .await
            .unwrap_or_else(|_| Err(Status::unavailable(self.closed())))
    }

    /// The open stream, opening one if there is none or the last one broke.
    async fn stream(&self) -> Result<(mpsc::Sender<RaftRequest>, Arc<Waiting>), Status> {
        let mut open = self.open.lock().await;
        if let Some(p) = open.as_ref() {
            if !p.waiting.is_broken() {
                return Ok((p.tx.clone(), p.waiting.clone()));
            }
        }
        // Dropping the broken pipe's sender ends its request stream.
        *open = None;
        let (tx, rx) = mpsc::channel(QUEUE);
        let replies = self
            .client()
            .raft_stream(ReceiverStream::new(rx))
            .await?
            .into_inner();
        let waiting = Arc::new(Waiting::default());
        tokio::spawn(read_replies(self.target, replies, waiting.clone()));
        *open = Some(Pipe {
            tx: tx.clone(),
            waiting: waiting.clone(),
        });
        Ok((tx, waiting))
    }
}

/// Hands each reply to the call waiting for it, until the stream ends.
async fn read_replies(
    target: NodeId,
    mut replies: Streaming<RaftStreamReply>,
    waiting: Arc<Waiting>,
) {
    let why = loop {
        match replies.message().await {
            Ok(Some(r)) => {
                let call = waiting.lock().calls.remove(&r.id);
                // No caller: it gave up waiting; the reply is dropped.
                if let Some(call) = call {
                    let _ = call.send(into_result(target, r));
                }
            }
            Ok(None) => break format!("node {target} ended the raft stream"),
            Err(s) => break format!("the raft stream to node {target} broke: {}", s.message()),
        }
    };
    waiting.fail_all(why);
}

/// A stream reply as the unary call's result.
fn into_result(target: NodeId, r: RaftStreamReply) -> Result<RaftReply, Status> {
    if r.code != 0 {
        return Err(Status::new(Code::from_i32(r.code), r.message));
    }
    r.reply
        .ok_or_else(|| Status::internal(format!("node {target} sent an empty raft reply")))
}

/// The stream form of a unary call's outcome (the serving side of `RaftStream`).
pub fn reply_for(id: u64, outcome: Result<RaftReply, Status>) -> RaftStreamReply {
    match outcome {
        Ok(reply) => RaftStreamReply {
            id,
            reply: Some(reply),
            code: 0,
            message: String::new(),
        },
        Err(s) => RaftStreamReply {
            id,
            reply: None,
            // A status can never be Ok here; map one defensively to a failure.
            code: match s.code() {
                Code::Ok => Code::Unknown as i32,
                c => c as i32,
            },
            message: s.message().to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_keeps_the_unary_outcome() {
        let ok = RaftReply {
            payload: vec![1, 2, 3],
            error: String::new(),
        };
        let r = into_result(2, reply_for(7, Ok(ok.clone()))).expect("ok");
        assert_eq!(r, ok);
        let e = into_result(2, reply_for(8, Err(Status::not_found("no shard 9")))).unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), "no shard 9");
        // A reply with neither a reply nor a code is refused, not taken as an empty payload.
        let empty = RaftStreamReply {
            id: 9,
            reply: None,
            code: 0,
            message: String::new(),
        };
        assert_eq!(into_result(2, empty).unwrap_err().code(), Code::Internal);
    }

    #[tokio::test]
    async fn a_broken_stream_fails_its_waiting_calls_and_takes_no_more() {
        let w = Waiting::default();
        let (tx, rx) = oneshot::channel();
        w.lock().calls.insert(1, tx);
        w.fail_all("gone".into());
        let e = rx.await.expect("answered").unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(w.is_broken());
        assert!(w.lock().calls.is_empty());
    }
}
