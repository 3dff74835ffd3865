//! Leadership hand-off and balancing.
//!
//! Each shard has a *preferred leader* ([`crate::placement`]), chosen so every node leads about
//! 1/N of the shards. Leadership drifts away from it after failures; the balancer moves it back,
//! and a node being stopped hands all its leaderships to peers first.
//!
//! openraft 0.9 has no leader-transfer call, and its followers refuse to vote while their leader
//! lease (`election_timeout_max`) runs. A hand-off therefore goes:
//! 1. the leader checks the target has every entry it has, and pauses the shard's requests
//!    (the router retries them, so clients see a short delay, not an error);
//! 2. it stops sending heartbeats, so every lease in the group runs out;
//! 3. it asks the target to campaign just after the lease has expired; the target, fully caught
//!    up, wins, and the old leader steps down when it hears of the new term;
//! 4. heartbeats and requests resume; if the target did not win within a bound, they resume
//!    anyway and the balancer tries again later.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::ServerState;

use crate::node::{Node, Shard};
use crate::pb::CampaignRequest;
use crate::raft::{NodeId, ShardId};

/// How often the balancer looks at the shards this node leads.
const BALANCE_EVERY: Duration = Duration::from_secs(5);
/// A node must have been up this long before leadership is moved to it.
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("not the leader of shard {0}")]
    NotLeader(ShardId),
    #[error("node {0} is not caught up on shard {1}")]
    Behind(NodeId, ShardId),
    #[error("node {target} did not take over shard {shard} in time")]
    Timeout { target: NodeId, shard: ShardId },
    #[error("asking node {0} to campaign: {1}")]
    Rpc(NodeId, String),
}

impl Node {
    /// Whether requests for `shard` are paused for a hand-off.
    pub fn handing_off(&self, shard: ShardId) -> bool {
        self.handoffs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&shard)
    }

    /// Moves leadership of `shard` from this node to `target`.
    pub async fn handoff(&self, shard: &Shard, target: NodeId) -> Result<(), HandoffError> {
        let m = shard.raft.metrics().borrow().clone();
        if m.state != ServerState::Leader {
            return Err(HandoffError::NotLeader(shard.id));
        }
        let mut client = self
            .peers
            .cluster(target)
            .ok_or_else(|| HandoffError::Rpc(target, "not in the config".into()))?;
        self.handoffs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(shard.id);
        let result = self.handoff_paused(shard, target, &mut client).await;
        shard.raft.runtime_config().heartbeat(true);
        self.handoffs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&shard.id);
        result
    }

    async fn handoff_paused(
        &self,
        shard: &Shard,
        target: NodeId,
        client: &mut crate::pb::cluster_client::ClusterClient<tonic::transport::Channel>,
    ) -> Result<(), HandoffError> {
        // In-flight writes finish replicating; the target must hold all of them.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let m = shard.raft.metrics().borrow().clone();
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&target).cloned().flatten())
                .map(|l| l.index);
            if matched.is_some() && matched == m.last_log_index {
                break;
            }
            if Instant::now() > deadline {
                return Err(HandoffError::Behind(target, shard.id));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shard.raft.runtime_config().heartbeat(false);
        let lease = Duration::from_millis(self.config.election_timeout_ms * 2);
        let after = lease + Duration::from_millis(50);
        client
            .campaign(CampaignRequest {
                shard: shard.id,
                after_ms: after.as_millis() as u64,
            })
            .await
            .map_err(|s| HandoffError::Rpc(target, s.message().to_string()))?;
        let deadline = Instant::now() + after + lease * 2;
        let mut rx = shard.raft.metrics();
        loop {
            {
                let m = rx.borrow_and_update();
                if m.current_leader != Some(self.id) && m.state != ServerState::Leader {
                    return Ok(());
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                return Err(HandoffError::Timeout {
                    target,
                    shard: shard.id,
                });
            }
        }
    }

    /// Before a graceful stop: hand every shard this node leads to another live replica.
    pub async fn handoff_all(&self) {
        let led: Vec<Arc<Shard>> = self
            .shards()
            .into_iter()
            .filter(|s| s.raft.metrics().borrow().state == ServerState::Leader)
            .collect();
        let moves = led.iter().filter_map(|s| {
            // The preferred leader if it is someone else and up, else any live replica.
            let preferred = self.placement.preferred_leader(s.id);
            let target = std::iter::once(preferred)
                .chain(s.replicas.iter().copied())
                .find(|r| *r != self.id && self.health.is_up(*r))?;
            Some(async move {
                let t = Instant::now();
                match self.handoff(s, target).await {
                    Ok(()) => tracing::info!(
                        KV_NODE = self.id,
                        KV_SHARD = s.id,
                        KV_PEER = target,
                        "handed shard {} to node {target} in {:?}",
                        s.id,
                        t.elapsed()
                    ),
                    Err(e) => {
                        tracing::warn!(KV_NODE = self.id, KV_SHARD = s.id, "hand-off failed: {e}")
                    }
                }
            })
        });
        futures::future::join_all(moves).await;
    }
}

/// Moves leadership back to preferred leaders that are up and settled, one shard at a time.
pub async fn run(node: Arc<Node>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut up_since: std::collections::HashMap<NodeId, Instant> = Default::default();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(BALANCE_EVERY) => {}
            _ = stop.changed() => return,
        }
        let now = Instant::now();
        for p in node.health.snapshot() {
            if p.up {
                up_since.entry(p.id).or_insert(now);
            } else {
                up_since.remove(&p.id);
            }
        }
        for shard in node.shards() {
            let preferred = node.placement.preferred_leader(shard.id);
            let leading = shard.raft.metrics().borrow().state == ServerState::Leader;
            let settled = up_since
                .get(&preferred)
                .is_some_and(|t| now.duration_since(*t) >= SETTLE);
            if !leading || preferred == node.id || !settled || *stop.borrow() {
                continue;
            }
            match node.handoff(&shard, preferred).await {
                Ok(()) => tracing::info!(
                    KV_NODE = node.id,
                    KV_SHARD = shard.id,
                    KV_PEER = preferred,
                    "rebalanced: shard {} back to its preferred leader {preferred}",
                    shard.id
                ),
                Err(e) => tracing::debug!(KV_SHARD = shard.id, "rebalance skipped: {e}"),
            }
        }
    }
}
