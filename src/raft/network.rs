//! Raft messages between nodes, over `kv.v1.Cluster/Raft`.
//!
//! Every shard's group has its own [`ShardNetwork`], but all of them share the node's
//! [`Peers`] channels: a message is a bincode-encoded openraft request tagged with the shard id.
//! Snapshots are not pushed: the leader sends `OfferSnapshot` with the snapshot's meta, and the
//! follower pulls the data with `Recover` before it answers (see [`crate::recover`]).

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Snapshot};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::log_store::LogManager;
use super::{LogId, NodeId, ShardId, TypeConfig, Vote};
use crate::lease::LeaderLease;
use crate::pb::{RaftKind, RaftRequest};
use crate::peers::Peers;

/// How long a follower may take to pull and install a snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1800);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Holds a plain Option; a poisoned one is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Clone)]
pub struct ShardNetwork {
    pub shard: ShardId,
    pub me: NodeId,
    pub peers: Arc<Peers>,
    /// Told which AppendEntries requests the peers accepted, and when they were sent.
    pub lease: Arc<LeaderLease>,
    /// This node's log: followers are told no commit index beyond what it holds durably.
    pub logs: Arc<LogManager>,
}

impl RaftNetworkFactory<TypeConfig> for ShardNetwork {
    type Network = PeerLink;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> PeerLink {
        PeerLink {
            link: Link {
                net: self.clone(),
                target,
            },
            hold: Hold::default(),
            held: Arc::default(),
        }
    }
}

/// How long a commit-only message may wait for the next message to the same peer to carry its
/// commit index instead (see [`PeerLink`]). Alternated fresh clusters, 64 clients writing:
/// 14.5k/14.7k/14.7k writes/s sending each at once, 15.1k/16.6k/17.2k holding 2 ms,
/// 15.6k/16.3k/17.3k holding 10 ms; one client, p50 0.614/0.592/0.595 ms at once,
/// 0.649/0.606/0.633 holding 2 ms, 0.592/0.585/0.599 holding 10 ms.
pub const COMMIT_HOLD: Duration = Duration::from_millis(10);

/// Where one shard's messages to one peer go.
#[derive(Clone)]
struct Link {
    net: ShardNetwork,
    target: NodeId,
}

/// One shard's messages to one peer, as openraft sends them: one at a time, each awaited.
///
/// openraft 0.9 follows every commit with an AppendEntries that carries nothing but the new
/// commit index, and awaits its answer before it sends the next entries. Under load that is
/// half of all Raft messages, sent just when the leader answers its client. Such a message is
/// held here for up to [`COMMIT_HOLD`] and answered `Success` at once; the next message on the
/// link (entries or a heartbeat) carries a commit index at least as new and replaces it, and if
/// none comes in time the held one is sent as it was. So a follower may learn of a commit up to
/// [`COMMIT_HOLD`] later; nothing else changes:
///
/// - Only messages that would tell the peer nothing but the commit index are held: no entries,
///   a commit index the link has not given yet, a `prev_log_id` that is the entry the peer last
///   acknowledged on this link under the same vote. The `Success` answered for it is what the
///   peer answered then, and openraft uses an answer to a message without entries only to note
///   the time (for its metrics).
/// - A heartbeat that brings no new commit index always goes out, and so do the messages of a
///   read-index round (openraft's `ensure_linearizable`): it opens a new link per message, one
///   that has acknowledged nothing.
/// - The lease ([`LeaderLease`]) hears only answers that came from the peer.
/// - A held message that goes out late, after a newer one, is harmless: a follower takes a
///   commit index only forward, and an empty AppendEntries whose `prev_log_id` it holds changes
///   nothing else (openraft's own read-index messages arrive out of order in the same way).
pub struct PeerLink {
    link: Link,
    hold: Hold,
    /// The commit-only message held back; shared with the timer that sends it if nothing
    /// replaces it.
    held: Arc<Slot>,
}

/// What a link knows of its peer, to tell which messages may be held (see [`PeerLink`]).
#[derive(Default)]
struct Hold {
    /// The vote and the log id of the last entry the peer acknowledged on this link.
    acked: Option<(Vote, Option<LogId>)>,
    /// The newest commit index given to the peer, or held to be given.
    commit_sent: Option<LogId>,
}

impl Hold {
    /// Whether `rpc` may be held; if so, its commit index counts as given.
    fn hold(&mut self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        let news = rpc.leader_commit.is_some() && rpc.leader_commit != self.commit_sent;
        let may = news
            && rpc.entries.is_empty()
            && self.acked.as_ref() == Some(&(rpc.vote, rpc.prev_log_id));
        if may {
            self.commit_sent = rpc.leader_commit;
        }
        may
    }

    /// `rpc` goes to the peer now; returns what a `Success` answer to it acknowledges.
    fn sending(&mut self, rpc: &AppendEntriesRequest<TypeConfig>) -> (Vote, Option<LogId>) {
        self.commit_sent = self.commit_sent.max(rpc.leader_commit);
        let last = rpc.entries.last().map(|e| e.log_id).or(rpc.prev_log_id);
        (rpc.vote, last)
    }

    /// The peer's answer to the message `sending` was told of (`None`: no answer came).
    fn answered(
        &mut self,
        sent: (Vote, Option<LogId>),
        resp: Option<&AppendEntriesResponse<NodeId>>,
    ) {
        self.acked = match resp {
            Some(AppendEntriesResponse::Success) => Some(sent),
            Some(AppendEntriesResponse::PartialSuccess(matching)) => Some((sent.0, *matching)),
            _ => None,
        };
    }
}

/// One held message and the number it was held under, so that a timer sends only its own.
#[derive(Default)]
struct Slot(Mutex<(u64, Option<AppendEntriesRequest<TypeConfig>>)>);

impl Slot {
    /// Holds `rpc` in place of anything held before; returns its number.
    fn put(&self, rpc: AppendEntriesRequest<TypeConfig>) -> u64 {
        let mut s = lock(&self.0);
        s.0 += 1;
        s.1 = Some(rpc);
        s.0
    }

    /// Takes what is held, whatever it is.
    fn take(&self) -> Option<AppendEntriesRequest<TypeConfig>> {
        lock(&self.0).1.take()
    }

    /// Takes what is held if it is still the message numbered `seq`.
    fn take_if(&self, seq: u64) -> Option<AppendEntriesRequest<TypeConfig>> {
        let mut s = lock(&self.0);
        if s.0 == seq {
            s.1.take()
        } else {
            None
        }
    }
}

/// Why one RPC to a peer failed before a Raft-level answer came back.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("peer {0} is not in the config")]
    UnknownPeer(NodeId),
    #[error("{0}")]
    Status(#[from] tonic::Status),
    #[error("bad reply: {0}")]
    Decode(String),
}

impl CallError {
    fn is_unreachable(&self) -> bool {
        match self {
            CallError::UnknownPeer(_) => true,
            // NotFound: the peer is up but has not started this shard yet (still recovering it).
            // Unreachable makes openraft back off instead of retrying in a tight loop.
            CallError::Status(s) => matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled
                    | tonic::Code::NotFound
            ),
            CallError::Decode(_) => false,
        }
    }
}

impl Link {
    /// Sends one message and decodes the peer's `Result<Resp, E>`.
    async fn call<Req: Serialize, Resp: DeserializeOwned, E: DeserializeOwned>(
        &self,
        kind: RaftKind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Result<Resp, E>, CallError> {
        let payload = bincode::serialize(req).map_err(|e| CallError::Decode(e.to_string()))?;
        let request = RaftRequest {
            shard: self.net.shard,
            kind: kind as i32,
            payload,
            from: self.net.me,
            id: 0,
        };
        let reply = if kind == RaftKind::Snapshot {
            // Answered only once the follower pulled and installed the snapshot: its own call.
            let mut client = self
                .net
                .peers
                .cluster(self.target)
                .ok_or(CallError::UnknownPeer(self.target))?;
            let mut request = tonic::Request::new(request);
            request.set_timeout(timeout);
            client.offer_snapshot(request).await?.into_inner()
        } else {
            let pipe = self
                .net
                .peers
                .raft(self.target)
                .ok_or(CallError::UnknownPeer(self.target))?;
            pipe.call(request, timeout).await?
        };
        if !reply.error.is_empty() {
            return Err(CallError::Decode(reply.error));
        }
        bincode::deserialize(&reply.payload).map_err(|e| CallError::Decode(e.to_string()))
    }

    /// Sends an AppendEntries and tells the lease what the peer answered.
    async fn append(
        &self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        timeout: Duration,
    ) -> Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>, CallError> {
        // This leader reports its own appends before their fsync (see crate::raft::log_store):
        // a follower must not apply what the leader might still lose.
        rpc.leader_commit = self
            .net
            .logs
            .durable_commit(self.net.shard, rpc.leader_commit);
        let sent = tokio::time::Instant::now();
        let resp = self.call(RaftKind::Append, &rpc, timeout).await;
        if let Ok(Ok(resp)) = &resp {
            self.net.lease.answered(&rpc.vote, self.target, sent, resp);
        }
        resp
    }

    fn rpc_error<E: std::error::Error>(&self, e: CallError) -> RPCError<NodeId, BasicNode, E> {
        if e.is_unreachable() {
            RPCError::Unreachable(Unreachable::new(&e))
        } else {
            RPCError::Network(NetworkError::new(&e))
        }
    }
}

impl RaftNetwork<TypeConfig> for PeerLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // Whatever was held is replaced: this message's commit index is at least as new.
        self.held.take();
        if self.hold.hold(&rpc) {
            let seq = self.held.put(rpc);
            let (held, link) = (self.held.clone(), self.link.clone());
            tokio::spawn(async move {
                tokio::time::sleep(COMMIT_HOLD).await;
                if let Some(rpc) = held.take_if(seq) {
                    // Its answer is the lease's to hear; a failure shows on the next message.
                    let _ = link.append(rpc, option.hard_ttl()).await;
                }
            });
            return Ok(AppendEntriesResponse::Success);
        }
        let sent = self.hold.sending(&rpc);
        let resp = self.link.append(rpc, option.hard_ttl()).await;
        self.hold
            .answered(sent, resp.as_ref().ok().and_then(|r| r.as_ref().ok()));
        match resp {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.link.target, e))),
            Err(e) => Err(self.link.rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self
            .link
            .call(RaftKind::Vote, &rpc, option.hard_ttl())
            .await
        {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.link.target, e))),
            Err(e) => Err(self.link.rpc_error(e)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot<TypeConfig>,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let offer = (vote, snapshot.meta);
        let call = self
            .link
            .call::<_, SnapshotResponse<NodeId>, Fatal<NodeId>>(
                RaftKind::Snapshot,
                &offer,
                SNAPSHOT_TIMEOUT,
            );
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = call => match r {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(fatal)) => Err(StreamingError::RemoteError(RemoteError::new(self.link.target, fatal))),
                Err(e) if e.is_unreachable() => Err(StreamingError::Unreachable(Unreachable::new(&e))),
                Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, Entry, EntryPayload};

    use super::*;

    fn id(index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(1, 0), index))
    }

    fn vote() -> Vote {
        Vote::new_committed(1, 0)
    }

    /// An AppendEntries from the leader of term 1: after `prev`, entries up to `last`.
    fn append(prev: u64, last: u64, commit: u64) -> AppendEntriesRequest<TypeConfig> {
        let entries = (prev + 1..=last)
            .map(|i| Entry {
                log_id: LogId::new(CommittedLeaderId::new(1, 0), i),
                payload: EntryPayload::Blank,
            })
            .collect();
        AppendEntriesRequest {
            vote: vote(),
            prev_log_id: id(prev),
            entries,
            leader_commit: id(commit),
        }
    }

    /// Sends `rpc` on `h` and has the peer answer `resp`.
    fn exchange(
        h: &mut Hold,
        rpc: &AppendEntriesRequest<TypeConfig>,
        resp: Option<AppendEntriesResponse<NodeId>>,
    ) {
        assert!(!h.hold(rpc), "a message with news for the peer was held");
        let sent = h.sending(rpc);
        h.answered(sent, resp.as_ref());
    }

    #[test]
    fn only_a_new_commit_index_after_acknowledged_entries_is_held() {
        let mut h = Hold::default();
        // A fresh link (a read-index round's) holds nothing, even a commit-only message.
        assert!(!h.hold(&append(3, 3, 3)));
        exchange(
            &mut h,
            &append(3, 5, 3),
            Some(AppendEntriesResponse::Success),
        );
        // The commit of 4 and 5, with nothing to append: held.
        assert!(h.hold(&append(5, 5, 5)));
        // A heartbeat that brings no newer commit index goes out, whether a commit-only message
        // was held before it or not.
        assert!(!h.hold(&append(5, 5, 5)));
        assert!(!h.hold(&append(5, 5, 5)));
        // Entries always go out.
        exchange(
            &mut h,
            &append(5, 6, 5),
            Some(AppendEntriesResponse::Success),
        );
        // A commit-only message whose prev_log_id is not what the peer acknowledged goes out.
        assert!(!h.hold(&append(5, 5, 6)));
        // Under another vote it goes out too.
        let mut other = append(6, 6, 6);
        other.vote = Vote::new_committed(2, 1);
        assert!(!h.hold(&other));
        assert!(h.hold(&append(6, 6, 6)));
    }

    #[test]
    fn nothing_is_held_after_an_answer_that_did_not_acknowledge_entries() {
        let refusals = || {
            [
                None,
                Some(AppendEntriesResponse::Conflict),
                Some(AppendEntriesResponse::HigherVote(Vote::new(2, 1))),
            ]
        };
        for (i, resp) in refusals().into_iter().enumerate() {
            let mut h = Hold::default();
            exchange(
                &mut h,
                &append(3, 5, 3),
                Some(AppendEntriesResponse::Success),
            );
            exchange(&mut h, &append(5, 7, 5), resp);
            assert!(!h.hold(&append(5, 5, 7)), "held after refusal {i}");
            assert!(!h.hold(&append(7, 7, 7)), "held after refusal {i}");
        }
        // A partial success acknowledges what it names.
        let mut h = Hold::default();
        exchange(
            &mut h,
            &append(3, 7, 3),
            Some(AppendEntriesResponse::PartialSuccess(id(5))),
        );
        assert!(!h.hold(&append(7, 7, 5)));
        assert!(h.hold(&append(5, 5, 5)));
    }

    #[test]
    fn a_timer_sends_only_the_message_it_was_started_for() {
        let slot = Slot::default();
        let first = slot.put(append(5, 5, 5));
        // Replaced by a newer held message: the first timer finds nothing of its own.
        let second = slot.put(append(5, 5, 6));
        assert_eq!(slot.take_if(first).map(|r| r.leader_commit), None);
        assert_eq!(slot.take_if(second).map(|r| r.leader_commit), Some(id(6)));
        assert!(slot.take_if(second).is_none(), "sent twice");
        // Replaced by a message that went out: nothing is left for its timer.
        let third = slot.put(append(6, 6, 7));
        assert_eq!(slot.take().map(|r| r.leader_commit), Some(id(7)));
        assert!(slot.take_if(third).is_none());
    }
}
