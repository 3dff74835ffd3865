//! The gRPC services of a node, on one port: `kv.v1.KeyValue` for clients and `kv.v1.Cluster`
//! for peers. Input is validated here and errors are mapped to gRPC status codes once.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::raft::{AppendEntriesRequest, VoteRequest, VoteResponse};
use openraft::Snapshot;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::node::Node;
use crate::pb;
use crate::raft::{NodeId, SnapshotData, SnapshotMeta, TypeConfig, Vote};
use crate::recover;
use crate::router::{Op, Outcome, FORWARDED};

/// Keys are at most 4 KiB; values at most 1 MiB (INTERFACE.md: may be raised, never lowered).
pub const MAX_KEY: usize = 4 * 1024;
pub const MAX_VALUE: usize = 1024 * 1024;

pub struct KeyValueService {
    pub node: Arc<Node>,
}

fn check_key(key: &[u8]) -> Result<(), Status> {
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

/// The client's deadline (grpc-timeout) when it sent one, capped by our own request timeout.
fn deadline<T>(node: &Node, req: &Request<T>) -> Instant {
    let ours = Duration::from_millis(node.config.request_timeout_ms);
    let theirs = req
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout);
    Instant::now() + theirs.map_or(ours, |t| t.min(ours))
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
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

#[tonic::async_trait]
impl pb::key_value_server::KeyValue for KeyValueService {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let (deadline, fwd) = (deadline(&self.node, &req), forwarded(&req));
        let r = req.into_inner();
        check_key(&r.key)?;
        if r.value.len() > MAX_VALUE {
            return Err(Status::invalid_argument(format!(
                "value is {} bytes; the limit is {MAX_VALUE}",
                r.value.len()
            )));
        }
        let op = Op::Put {
            key: r.key,
            value: r.value,
        };
        let (_, node_id) = self.node.execute(op, fwd, deadline).await?;
        Ok(Response::new(pb::PutResponse { node_id }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let (deadline, fwd) = (deadline(&self.node, &req), forwarded(&req));
        let r = req.into_inner();
        check_key(&r.key)?;
        let op = Op::Get {
            key: r.key,
            stale: r.stale,
        };
        match self.node.execute(op, fwd, deadline).await? {
            (Outcome::Get { value }, node_id) => Ok(Response::new(pb::GetResponse {
                found: value.is_some(),
                value: value.unwrap_or_default(),
                node_id,
            })),
            _ => Err(Status::internal("unexpected outcome for get")),
        }
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let (deadline, fwd) = (deadline(&self.node, &req), forwarded(&req));
        let r = req.into_inner();
        check_key(&r.key)?;
        match self
            .node
            .execute(Op::Delete { key: r.key }, fwd, deadline)
            .await?
        {
            (Outcome::Delete { existed }, node_id) => Ok(Response::new(pb::DeleteResponse {
                deleted: existed,
                node_id,
            })),
            _ => Err(Status::internal("unexpected outcome for delete")),
        }
    }
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
    fn shard(&self, id: u32) -> Result<Arc<crate::node::Shard>, Status> {
        self.node.shard(id).ok_or_else(|| {
            Status::not_found(format!("node {} does not serve shard {id}", self.node.id))
        })
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::RecoverChunk, Status>> + Send>>;

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
        }))
    }

    async fn raft(&self, req: Request<pb::RaftRequest>) -> Result<Response<pb::RaftReply>, Status> {
        let r = req.into_inner();
        let shard = self.shard(r.shard)?;
        let payload = match pb::RaftKind::try_from(r.kind) {
            Ok(pb::RaftKind::Append) => {
                let rpc: AppendEntriesRequest<TypeConfig> = decode(&r.payload)?;
                encode(&shard.raft.append_entries(rpc).await)?
            }
            Ok(pb::RaftKind::Vote) => {
                let rpc: VoteRequest<NodeId> = decode(&r.payload)?;
                if self.node.is_recovering(r.shard) {
                    // Lost its disk, not caught up: a vote from it could elect a leader missing
                    // committed entries. Refuse (always safe in Raft).
                    let m = shard.raft.metrics().borrow().clone();
                    let resp: Result<VoteResponse<NodeId>, openraft::error::RaftError<NodeId>> =
                        Ok(VoteResponse {
                            vote: if m.vote > rpc.vote { m.vote } else { rpc.vote },
                            vote_granted: false,
                            last_log_id: m.last_applied,
                        });
                    encode(&resp)?
                } else {
                    encode(&shard.raft.vote(rpc).await)?
                }
            }
            _ => {
                return Err(Status::invalid_argument(format!(
                    "bad raft message kind {}",
                    r.kind
                )))
            }
        };
        Ok(Response::new(pb::RaftReply {
            payload,
            error: String::new(),
        }))
    }

    async fn offer_snapshot(
        &self,
        req: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftReply>, Status> {
        let r = req.into_inner();
        let shard = self.shard(r.shard)?;
        let (vote, meta): (Vote, SnapshotMeta) = decode(&r.payload)?;
        let pulled = recover::pull(&self.node.peers, self.node.id, r.from, r.shard, &shard.data)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
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
