//! Raft messages between nodes, over `kv.v1.Cluster/Raft`.
//!
//! Every shard's group has its own [`ShardNetwork`], but all of them share the node's
//! [`Peers`] channels: a message is a bincode-encoded openraft request tagged with the shard id.
//! Snapshots are not pushed: the leader sends `OfferSnapshot` with the snapshot's meta, and the
//! follower pulls the data with `Recover` before it answers (see [`crate::recover`]).

use std::future::Future;
use std::sync::Arc;
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
use super::{NodeId, ShardId, TypeConfig, Vote};
use crate::lease::LeaderLease;
use crate::pb::{RaftKind, RaftRequest};
use crate::peers::Peers;

/// How long a follower may take to pull and install a snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(1800);

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
            net: self.clone(),
            target,
        }
    }
}

pub struct PeerLink {
    net: ShardNetwork,
    target: NodeId,
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

impl PeerLink {
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
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // This leader reports its own appends before their fsync (see crate::raft::log_store):
        // a follower must not apply what the leader might still lose.
        rpc.leader_commit = self
            .net
            .logs
            .durable_commit(self.net.shard, rpc.leader_commit);
        let sent = tokio::time::Instant::now();
        match self.call(RaftKind::Append, &rpc, option.hard_ttl()).await {
            Ok(Ok(resp)) => {
                self.net.lease.answered(&rpc.vote, self.target, sent, &resp);
                Ok(resp)
            }
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e) => Err(self.rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(RaftKind::Vote, &rpc, option.hard_ttl()).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e) => Err(self.rpc_error(e)),
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
        let call = self.call::<_, SnapshotResponse<NodeId>, Fatal<NodeId>>(
            RaftKind::Snapshot,
            &offer,
            SNAPSHOT_TIMEOUT,
        );
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = call => match r {
                Ok(Ok(resp)) => Ok(resp),
                Ok(Err(fatal)) => Err(StreamingError::RemoteError(RemoteError::new(self.target, fatal))),
                Err(e) if e.is_unreachable() => Err(StreamingError::Unreachable(Unreachable::new(&e))),
                Err(e) => Err(StreamingError::Network(NetworkError::new(&e))),
            }
        }
    }
}
