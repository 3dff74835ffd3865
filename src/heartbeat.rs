//! Heartbeat: every node pings every peer (`kv.v1.Cluster/Ping`) each `heartbeat_interval_ms`
//! and keeps an UP/DOWN view. A peer is DOWN once no ping has succeeded for
//! `failure_timeout_ms`. Each change is logged once as a structured event
//! (`KV_EVENT=peer_down|peer_up`, `KV_NODE`, `KV_PEER`) so `journalctl KV_EVENT=peer_down` finds it.
//!
//! Raft does its own failure detection per shard; this view feeds `kvctl status`, the router's
//! choice of forwarding target, and the operator's log.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::pb::PingRequest;
use crate::peers::Peers;
use crate::raft::NodeId;

#[derive(Clone, Copy, Debug)]
struct PeerView {
    /// None until the first verdict.
    up: Option<bool>,
    last_ok: Option<Instant>,
}

pub struct Health {
    me: NodeId,
    started: Instant,
    failure_timeout: Duration,
    peers: Mutex<BTreeMap<NodeId, PeerView>>,
}

/// One peer as `kvctl status` shows it.
pub struct PeerHealth {
    pub id: NodeId,
    pub up: bool,
    pub last_seen: Option<Duration>,
}

impl Health {
    pub fn new(me: NodeId, peers: &Peers, failure_timeout: Duration) -> Health {
        let map = peers
            .iter()
            .map(|p| {
                (
                    p.id,
                    PeerView {
                        up: None,
                        last_ok: None,
                    },
                )
            })
            .collect();
        Health {
            me,
            started: Instant::now(),
            failure_timeout,
            peers: Mutex::new(map),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<NodeId, PeerView>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `id` is believed up (unknown peers count as up until proven down).
    pub fn is_up(&self, id: NodeId) -> bool {
        self.lock().get(&id).map_or(true, |v| v.up != Some(false))
    }

    pub fn snapshot(&self) -> Vec<PeerHealth> {
        let now = Instant::now();
        self.lock()
            .iter()
            .map(|(id, v)| PeerHealth {
                id: *id,
                up: v.up == Some(true),
                last_seen: v.last_ok.map(|t| now - t),
            })
            .collect()
    }

    /// Records one round of ping results and logs transitions.
    fn record(&self, results: &[(NodeId, Result<(), String>)]) {
        let now = Instant::now();
        let mut peers = self.lock();
        for (id, res) in results {
            let Some(v) = peers.get_mut(id) else { continue };
            if res.is_ok() {
                v.last_ok = Some(now);
            }
            let reference = v.last_ok.unwrap_or(self.started);
            let up = now.duration_since(reference) < self.failure_timeout;
            if v.up == Some(up) {
                continue;
            }
            // Do not call a peer down before it had a chance to answer after our own start.
            if !up && v.up.is_none() && now.duration_since(self.started) < self.failure_timeout {
                continue;
            }
            v.up = Some(up);
            if up {
                tracing::info!(
                    KV_EVENT = "peer_up",
                    KV_NODE = self.me,
                    KV_PEER = *id,
                    "peer {id} is up"
                );
            } else {
                let reason = res.as_ref().err().cloned().unwrap_or_default();
                tracing::warn!(
                    KV_EVENT = "peer_down",
                    KV_NODE = self.me,
                    KV_PEER = *id,
                    reason = %reason,
                    "peer {id} is down: {reason}"
                );
            }
        }
    }
}

/// Pings every peer forever, until `stop` flips to true.
pub async fn run(
    health: Arc<Health>,
    peers: Arc<Peers>,
    cluster_name: String,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let pings = peers.iter().map(|p| {
            let client = peers.cluster(p.id);
            let req = PingRequest {
                from: health.me,
                cluster_name: cluster_name.clone(),
            };
            let id = p.id;
            async move {
                let Some(mut client) = client else {
                    return (id, Err("not configured".to_string()));
                };
                let mut req = tonic::Request::new(req);
                req.set_timeout(interval.max(Duration::from_millis(200)));
                let res = match client.ping(req).await {
                    Ok(_) => Ok(()),
                    Err(s) => Err(s.message().to_string()),
                };
                (id, res)
            }
        });
        let results = futures::future::join_all(pings).await;
        health.record(&results);
    }
}
