//! Many calls on one long-lived gRPC stream: the client half of `kv.v1.Cluster/RaftStream`
//! ([`crate::raft::pipe`]) and `kv.v1.KeyValue/Session` ([`crate::client::Session`]).
//!
//! A unary call costs an HTTP/2 stream each way: headers to encode and parse, a task per request
//! on the server, and two or three socket writes. On an open stream a call is one DATA frame
//! each way, and calls that leave together share a socket write.
//!
//! Each request carries an id; the server answers every request with the same id, in whatever
//! order its handlers finish (see `server::serve_stream`), so a call that waits (an fsync, a
//! commit) holds up nobody else's. What a caller sees is what a unary call gave it: the reply,
//! or a gRPC status (`UNAVAILABLE` when the stream broke, `DEADLINE_EXCEEDED` when the reply did
//! not come in time).
//!
//! The stream is opened on first use and reopened on the first call after it broke (the server
//! restarted, the connection dropped, the server stopped serving). A broken stream fails every
//! call waiting on it at once; when the server ended it with the `kv-not-executed` marker (a
//! stopping node that answered every request it read, see `server::serve_stream`), those calls
//! fail marked the same way. A call that failed before its request was handed to a stream
//! (the stream could not be opened, or had already broken) carries the `kv-not-executed`
//! marker ([`crate::router::NOT_EXECUTED`]): the server never saw it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// A request that carries the id its reply will echo.
pub trait Tagged {
    fn set_id(&mut self, id: u64);
}

/// A reply naming the request it answers.
pub trait Echo {
    fn id(&self) -> u64;
}

/// Opens the stream: sends the requests it is given, returns the replies.
pub type Opener<Req, Rep> = Box<
    dyn Fn(ReceiverStream<Req>) -> BoxFuture<'static, Result<Streaming<Rep>, Status>> + Send + Sync,
>;

/// Requests queued for the stream before callers wait (HTTP/2 flow control is behind it).
const QUEUE: usize = 1024;

/// Calls on one stream to one server. Cheap to share between tasks.
pub struct Mux<Req, Rep> {
    /// Names the stream in errors: "the raft stream to node 2".
    what: String,
    /// Names the server in errors: "node 2".
    peer: String,
    opener: Opener<Req, Rep>,
    next_id: AtomicU64,
    /// The open stream, if any. Opening happens under this lock, so concurrent callers share one.
    open: tokio::sync::Mutex<Option<Pipe<Req, Rep>>>,
}

/// One open stream: the sending half, and the calls waiting for replies (shared with the task
/// that reads them).
struct Pipe<Req, Rep> {
    tx: mpsc::Sender<Req>,
    waiting: Arc<Waiting<Rep>>,
}

struct Waiting<Rep> {
    inner: Mutex<WaitingInner<Rep>>,
}

struct WaitingInner<Rep> {
    /// Why the stream ended; no call may wait on it after that.
    broken: Option<String>,
    calls: HashMap<u64, oneshot::Sender<Result<Rep, Status>>>,
}

impl<Rep> Default for Waiting<Rep> {
    fn default() -> Self {
        Waiting {
            inner: Mutex::new(WaitingInner {
                broken: None,
                calls: HashMap::new(),
            }),
        }
    }
}

impl<Rep> Waiting<Rep> {
    fn lock(&self) -> MutexGuard<'_, WaitingInner<Rep>> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Marks the stream broken and fails every waiting call: `UNAVAILABLE`, marked as not
    /// executed when `not_executed` (the server said it read none of them).
    fn fail_all(&self, why: String, not_executed: bool) {
        let calls = {
            let mut w = self.lock();
            w.broken.get_or_insert(why.clone());
            std::mem::take(&mut w.calls)
        };
        for (_, call) in calls {
            let s = Status::unavailable(why.clone());
            let _ = call.send(Err(if not_executed { not_sent(s) } else { s }));
        }
    }

    fn is_broken(&self) -> bool {
        self.lock().broken.is_some()
    }
}

/// Forgets a call that stopped waiting (timed out or was dropped), so its slot does not stay.
struct Registered<'a, Rep> {
    waiting: &'a Waiting<Rep>,
    id: u64,
}

impl<Rep> Drop for Registered<'_, Rep> {
    fn drop(&mut self) {
        self.waiting.lock().calls.remove(&self.id);
    }
}

/// `s`, marked as certainly not executed. A failure to connect already counts as that (see
/// [`crate::router::not_executed`]) and stays unmarked: a client takes an unmarked `UNAVAILABLE`
/// as a sign that the endpoint is down.
fn not_sent(mut s: Status) -> Status {
    if crate::router::not_executed(&s) {
        return s;
    }
    s.metadata_mut().insert(
        crate::router::NOT_EXECUTED,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    s
}

impl<Req, Rep> Mux<Req, Rep>
where
    Req: Tagged + Send + 'static,
    Rep: Echo + Send + 'static,
{
    pub fn new(what: String, peer: String, opener: Opener<Req, Rep>) -> Self {
        Mux {
            what,
            peer,
            opener,
            next_id: AtomicU64::new(1),
            open: tokio::sync::Mutex::new(None),
        }
    }

    /// Sends `req` and waits at most `timeout` for its reply.
    pub async fn call(&self, req: Req, timeout: Duration) -> Result<Rep, Status> {
        match tokio::time::timeout(timeout, self.send(req)).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{} did not answer within {timeout:?}",
                self.peer
            ))),
        }
    }

    fn closed(&self) -> String {
        format!("{} closed", self.what)
    }

    async fn send(&self, mut req: Req) -> Result<Rep, Status> {
        let (tx, waiting) = self.stream().await.map_err(not_sent)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        req.set_id(id);
        let (done, reply) = oneshot::channel();
        {
            let mut w = waiting.lock();
            if let Some(why) = &w.broken {
                return Err(not_sent(Status::unavailable(why.clone())));
            }
            w.calls.insert(id, done);
        }
        let _registered = Registered {
            waiting: &waiting,
            id,
        };
        if tx.send(req).await.is_err() {
            // The request stream's receiver is gone: hyper dropped the stream, and this request
            // never left. The calls already on it learn their fate from its replies' end.
            waiting.lock().broken.get_or_insert_with(|| self.closed());
            return Err(not_sent(Status::unavailable(self.closed())));
        }
        reply
            .await
            .unwrap_or_else(|_| Err(Status::unavailable(self.closed())))
    }

    /// The open stream, opening one if there is none or the last one broke.
    async fn stream(&self) -> Result<(mpsc::Sender<Req>, Arc<Waiting<Rep>>), Status> {
        let mut open = self.open.lock().await;
        if let Some(p) = open.as_ref() {
            if !p.waiting.is_broken() {
                return Ok((p.tx.clone(), p.waiting.clone()));
            }
        }
        // Dropping the broken pipe's sender ends its request stream.
        *open = None;
        let (tx, rx) = mpsc::channel(QUEUE);
        let replies = (self.opener)(ReceiverStream::new(rx)).await?;
        let waiting = Arc::new(Waiting::default());
        tokio::spawn(read_replies(self.what.clone(), replies, waiting.clone()));
        *open = Some(Pipe {
            tx: tx.clone(),
            waiting: waiting.clone(),
        });
        Ok((tx, waiting))
    }
}

/// Hands each reply to the call waiting for it, until the stream ends.
async fn read_replies<Rep: Echo>(
    what: String,
    mut replies: Streaming<Rep>,
    waiting: Arc<Waiting<Rep>>,
) {
    let (why, not_executed) = loop {
        match replies.message().await {
            Ok(Some(r)) => {
                let call = waiting.lock().calls.remove(&r.id());
                // No caller: it gave up waiting; the reply is dropped.
                if let Some(call) = call {
                    let _ = call.send(Ok(r));
                }
            }
            Ok(None) => break (format!("{what} ended"), false),
            // The server ended the stream saying it read none of the requests still waiting
            // (a stopping node, see server::serve_stream). Only its own marker counts: an error
            // of the transport says nothing about which requests were read.
            Err(s) if s.metadata().contains_key(crate::router::NOT_EXECUTED) => {
                break (format!("{what} ended: {}", s.message()), true)
            }
            Err(s) => break (format!("{what} broke: {}", s.message()), false),
        }
    };
    waiting.fail_all(why, not_executed);
}

impl Tagged for crate::pb::RaftRequest {
    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

impl Echo for crate::pb::RaftStreamReply {
    fn id(&self) -> u64 {
        self.id
    }
}

impl Tagged for crate::pb::SessionRequest {
    fn set_id(&mut self, id: u64) {
        self.id = id;
    }
}

impl Echo for crate::pb::SessionReply {
    fn id(&self) -> u64 {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[tokio::test]
    async fn a_broken_stream_fails_its_waiting_calls_and_takes_no_more() {
        let w = Waiting::<crate::pb::RaftStreamReply>::default();
        let (tx, rx) = oneshot::channel();
        w.lock().calls.insert(1, tx);
        w.fail_all("gone".into(), false);
        let e = rx.await.expect("answered").unwrap_err();
        assert_eq!(e.code(), Code::Unavailable);
        assert!(
            !crate::router::not_executed(&e),
            "a broken stream says nothing"
        );
        assert!(w.is_broken());
        assert!(w.lock().calls.is_empty());

        // A stream its server ended saying it read none of the waiting requests.
        let w = Waiting::<crate::pb::RaftStreamReply>::default();
        let (tx, rx) = oneshot::channel();
        w.lock().calls.insert(1, tx);
        w.fail_all("stopping".into(), true);
        let e = rx.await.expect("answered").unwrap_err();
        assert!(crate::router::not_executed(&e));
    }

    #[test]
    fn a_call_the_server_never_saw_is_marked_not_executed() {
        let s = not_sent(Status::unavailable("refused"));
        assert!(crate::router::not_executed(&s));
        assert!(!crate::router::not_executed(&Status::unavailable("broke")));
    }
}
