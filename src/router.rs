//! Routing a client request to the shard's leader: any node accepts any key.
//!
//! The node that receives a request executes it locally when it leads the key's shard; otherwise
//! it forwards it to the leader it knows of — exactly one hop, on a stream opened with the
//! `kv-forwarded` header (one per peer, [`crate::client::Session::forwarding`]) so the receiver
//! never forwards again but answers "not leader" with a hint (`kv-leader`). The origin retries
//! with the hint, or with backoff while a new leader is being elected, until the request's
//! deadline: a client sees success, not an error, when an owner dies.
//!
//! A write is retried only when the failed attempt surely did not execute: the node was not the
//! leader (openraft refuses before proposing, or reports a proposal truncated unapplied), or the
//! connection was refused. A write whose attempt may have committed (a timeout, a connection lost
//! mid-request) is never re-sent: re-applying it later could undo a newer write and break
//! linearizability (the chaos test found exactly that). Its client gets `DEADLINE_EXCEEDED`,
//! "outcome unknown". `UNAVAILABLE` always means "not executed"; such replies also carry the
//! `kv-not-executed` header. Reads are retried freely.

use std::time::{Duration, Instant};

use tonic::Status;

use crate::node::{Node, ReadIndexError, Shard};
use crate::pb::{DeleteRequest, GetRequest, PutRequest};
use crate::raft::{Command, CommandResult, NodeId, ShardId};
use crate::write_batch::WriteError;

pub const FORWARDED: &str = "kv-forwarded";
/// On a "not leader" error: the leader to try. On a successful write or linearizable read: the
/// node that executed it as the leader of the key's shard. Clients use it to send the shard's
/// next requests straight there.
pub const LEADER_HINT: &str = "kv-leader";
/// On a successful write or linearizable read: the key's shard (`0..kv-shards`).
pub const SHARD_HEADER: &str = "kv-shard";
/// On a successful write or linearizable read: the cluster's shard count, so a client can compute a key's shard with
/// [`crate::placement::shard_for_key`] before sending it.
pub const SHARDS_HEADER: &str = "kv-shards";
/// Set on error replies whose request certainly did not execute (safe to send again).
pub const NOT_EXECUTED: &str = "kv-not-executed";

/// Whether a failed request certainly did not execute, so sending it again cannot apply it twice.
pub fn not_executed(s: &Status) -> bool {
    s.metadata().contains_key(NOT_EXECUTED)
        // Refused by the size limit before it was decoded.
        || s.code() == tonic::Code::ResourceExhausted
        || (s.code() == tonic::Code::Unavailable
            && (s.message().contains("tcp connect error")
                || s.message().contains("error trying to connect")
                || s.message().contains("Connection refused")))
}

/// `UNAVAILABLE`, marked as not executed.
pub fn unavailable(msg: String) -> Status {
    let mut s = Status::unavailable(msg);
    s.metadata_mut().insert(
        NOT_EXECUTED,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    s
}

#[derive(Clone, Debug)]
pub enum Op {
    Put { key: Vec<u8>, value: Vec<u8> },
    Delete { key: Vec<u8> },
    Get { key: Vec<u8>, stale: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Put,
    Delete { existed: bool },
    Get { value: Option<Vec<u8>> },
}

impl Op {
    fn key(&self) -> &[u8] {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key, .. } => key,
        }
    }
    fn is_stale_read(&self) -> bool {
        matches!(self, Op::Get { stale: true, .. })
    }
    fn is_write(&self) -> bool {
        !matches!(self, Op::Get { .. })
    }
}

/// Why a local attempt did not produce an outcome.
enum LocalError {
    /// Not executed: another node leads (if known).
    NotLeader(Option<NodeId>),
    /// Not executed.
    Unavailable(String),
    /// A write that may or may not commit.
    Unknown(String),
}

impl Node {
    /// Executes `op` on behalf of a client, from any node.
    pub async fn execute(
        &self,
        op: Op,
        forwarded: bool,
        deadline: Instant,
    ) -> Result<(Outcome, NodeId), Status> {
        let shard_id = self.placement.shard_for_key(op.key());
        let local = self.shard(shard_id);
        if forwarded {
            // The origin chose us as the leader; answer or say who is.
            let Some(shard) = local else {
                return Err(not_leader(self.id, shard_id, None));
            };
            return match self.exec_local(&shard, &op, deadline).await {
                Ok(o) => Ok((o, self.id)),
                Err(LocalError::NotLeader(hint)) => Err(not_leader(self.id, shard_id, hint)),
                Err(LocalError::Unavailable(m)) => Err(unavailable(m)),
                Err(LocalError::Unknown(m)) => Err(outcome_unknown(&m)),
            };
        }

        let replicas = self.placement.replicas(shard_id).to_vec();
        let mut hint: Option<NodeId> = None;
        let mut last_error = String::from("no attempt made");
        for attempt in 0u32.. {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let target = match (&local, op.is_stale_read()) {
                (Some(_), true) => self.id,
                _ => hint
                    .or_else(|| {
                        local
                            .as_ref()
                            .and_then(|s| s.raft.metrics().borrow().current_leader)
                    })
                    .or_else(|| self.cached_leader(shard_id))
                    .unwrap_or_else(|| {
                        let up: Vec<NodeId> = replicas
                            .iter()
                            .copied()
                            .filter(|r| self.health.is_up(*r) || *r == self.id)
                            .collect();
                        let pool = if up.is_empty() { &replicas } else { &up };
                        pool[attempt as usize % pool.len()]
                    }),
            };
            hint = None;
            if target == self.id {
                if let Some(shard) = &local {
                    match self.exec_local(shard, &op, deadline).await {
                        Ok(o) => return Ok((o, self.id)),
                        Err(LocalError::NotLeader(h)) => {
                            hint = h.filter(|h| *h != self.id);
                            last_error =
                                format!("node {} is not the leader of shard {shard_id}", self.id);
                        }
                        Err(LocalError::Unavailable(m)) => last_error = m,
                        Err(LocalError::Unknown(m)) => return Err(outcome_unknown(&m)),
                    }
                }
            } else {
                match self.exec_remote(target, &op, deadline).await {
                    Ok(r) => {
                        self.remember_leader(shard_id, target);
                        return Ok(r);
                    }
                    Err(s) if s.code() == tonic::Code::InvalidArgument => return Err(s),
                    Err(s) if op.is_write() && !not_executed(&s) => {
                        return Err(outcome_unknown(&format!("node {target}: {}", s.message())));
                    }
                    Err(s) => {
                        self.forget_leader(shard_id, target);
                        hint = s
                            .metadata()
                            .get(LEADER_HINT)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok())
                            .filter(|h| *h != target);
                        last_error = format!("node {target}: {}", s.message());
                    }
                }
            }
            if hint.is_none() {
                // A leader is being elected, or the target is down: back off a little.
                let backoff = Duration::from_millis((20u64 << attempt.min(4)).min(300));
                tokio::time::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())))
                    .await;
            }
        }
        // Every attempt was refused before executing.
        Err(unavailable(format!(
            "shard {shard_id}: no leader answered before the deadline (last error: {last_error})"
        )))
    }

    async fn exec_local(
        &self,
        shard: &Shard,
        op: &Op,
        deadline: Instant,
    ) -> Result<Outcome, LocalError> {
        if self.handing_off(shard.id) && !matches!(op, Op::Get { stale: true, .. }) {
            return Err(LocalError::NotLeader(None));
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let timed_out_write = || {
            LocalError::Unknown(format!(
                "shard {}: timed out waiting for a quorum",
                shard.id
            ))
        };
        match op {
            Op::Put { .. } | Op::Delete { .. } => {
                let cmd = match op {
                    Op::Put { key, value } => Command::Put {
                        key: key.clone(),
                        value: value.clone(),
                    },
                    Op::Delete { key } | Op::Get { key, .. } => {
                        Command::Delete { key: key.clone() }
                    }
                };
                let res = tokio::time::timeout(remaining, shard.writes.write(cmd))
                    .await
                    .map_err(|_| timed_out_write())?;
                match res {
                    Ok(CommandResult::Delete { existed }) => Ok(Outcome::Delete { existed }),
                    Ok(_) => Ok(Outcome::Put),
                    Err(WriteError::NotLeader(leader)) => Err(LocalError::NotLeader(leader)),
                    Err(WriteError::Stopped) => Err(LocalError::Unavailable(format!(
                        "shard {} is stopping",
                        shard.id
                    ))),
                    // Proposed, then the group failed: it may still commit elsewhere.
                    Err(WriteError::Unknown(e)) => {
                        Err(LocalError::Unknown(format!("shard {}: {e}", shard.id)))
                    }
                }
            }
            Op::Get { key, stale } => {
                let read = || {
                    shard
                        .data
                        .get(key)
                        .map_err(|e| LocalError::Unavailable(e.to_string()))
                };
                if *stale {
                    let floor = shard
                        .data
                        .read_floor()
                        .map_err(|e| LocalError::Unavailable(e.to_string()))?;
                    let at = floor.applied_index;
                    if at < floor.consistent_from {
                        return Err(LocalError::Unavailable(format!(
                            "shard {} is still catching up after recovery ({at} < {})",
                            shard.id, floor.consistent_from
                        )));
                    }
                } else if let Some(value) = shard.lease.read(&shard.raft, read) {
                    // Served under the leader's lease (see crate::lease).
                    return Ok(Outcome::Get { value: value? });
                } else {
                    self.read_round(shard, remaining).await?;
                }
                Ok(Outcome::Get { value: read()? })
            }
        }
    }

    /// One read-index round, shared with the shard's other reads that arrived before it started
    /// (never one that started before this read arrived).
    async fn read_round(&self, shard: &Shard, remaining: Duration) -> Result<(), LocalError> {
        let res = tokio::time::timeout(remaining, shard.reads.wait())
            .await
            .map_err(|_| {
                LocalError::Unavailable(format!(
                    "shard {}: timed out waiting for a quorum",
                    shard.id
                ))
            })?;
        match res {
            Some(Ok(())) => Ok(()),
            Some(Err(ReadIndexError::NotLeader(leader))) => Err(LocalError::NotLeader(leader)),
            Some(Err(ReadIndexError::Unavailable(m))) => {
                Err(LocalError::Unavailable(format!("shard {}: {m}", shard.id)))
            }
            None => Err(LocalError::Unavailable(format!(
                "shard {}: read-index round abandoned",
                shard.id
            ))),
        }
    }

    /// Forwards `op` to `target` on this node's forwarding session with it (one long-lived
    /// stream per peer, see [`crate::client::Session::forwarding`]); the peer answers as the
    /// shard's leader or refuses with "not leader" and a hint. Errors are the statuses the unary
    /// call would have failed with, with the same markers.
    async fn exec_remote(
        &self,
        target: NodeId,
        op: &Op,
        deadline: Instant,
    ) -> Result<(Outcome, NodeId), Status> {
        use crate::pb::session_reply::Result as R;
        use crate::pb::session_request::Op as O;
        let session = self
            .peers
            .forward(target)
            .ok_or_else(|| unavailable(format!("node {target} is not in the config")))?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let req = match op {
            Op::Put { key, value } => O::Put(PutRequest {
                key: key.clone(),
                value: value.clone(),
            }),
            Op::Delete { key } => O::Delete(DeleteRequest { key: key.clone() }),
            Op::Get { key, stale } => O::Get(GetRequest {
                key: key.clone(),
                stale: *stale,
            }),
        };
        let (result, _) = session.call(req, remaining).await?;
        match (op, result) {
            (Op::Put { .. }, R::Put(r)) => Ok((Outcome::Put, r.node_id)),
            (Op::Delete { .. }, R::Delete(r)) => {
                Ok((Outcome::Delete { existed: r.deleted }, r.node_id))
            }
            (Op::Get { .. }, R::Get(r)) => {
                let value = r.found.then_some(r.value);
                Ok((Outcome::Get { value }, r.node_id))
            }
            _ => Err(Status::internal(format!(
                "node {target} answered a forwarded request with a reply of another kind"
            ))),
        }
    }

    fn cached_leader(&self, shard: ShardId) -> Option<NodeId> {
        self.leader_cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&shard)
            .copied()
    }

    fn remember_leader(&self, shard: ShardId, leader: NodeId) {
        self.leader_cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(shard, leader);
    }

    fn forget_leader(&self, shard: ShardId, leader: NodeId) {
        let mut c = self.leader_cache.write().unwrap_or_else(|p| p.into_inner());
        if c.get(&shard) == Some(&leader) {
            c.remove(&shard);
        }
    }
}

fn outcome_unknown(msg: &str) -> Status {
    Status::deadline_exceeded(format!(
        "outcome unknown (the write may or may not have been applied): {msg}"
    ))
}

fn not_leader(me: NodeId, shard: ShardId, hint: Option<NodeId>) -> Status {
    let mut s = unavailable(format!("node {me} is not the leader of shard {shard}"));
    if let Some(h) = hint {
        if let Ok(v) = h.to_string().parse() {
            s.metadata_mut().insert(LEADER_HINT, v);
        }
    }
    s
}
