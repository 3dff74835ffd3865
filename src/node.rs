//! A running `kvnode`: opens the data dir, decides how each shard starts, runs one Raft group
//! per shard it replicates, serves gRPC, heartbeats, and stops cleanly.
//!
//! Start-up, in order (any failure before serving is a [`StartError`]; the binary exits 2):
//! 1. The data dir's `IDENTITY` file (node id, cluster name, shard count) must match the config;
//!    a dir of another node or cluster is refused, never reused.
//! 2. The WAL is opened and replayed (a torn tail is cut; damage elsewhere refuses to start), and
//!    sled is opened.
//! 3. The listener is bound, so "address in use" is reported before anything else happens.
//! 4. A node with no `IDENTITY` is *fresh*. It asks the shard's other replicas what they hold:
//!    if one has state, the shard is recovered from it over `Recover` (the node lost its disk);
//!    if all answer empty, the shard's preferred leader bootstraps the group. `IDENTITY` is
//!    written before any of that, so an acknowledged write can never sit in a dir without one.
//! 5. Raft groups start; a group restarted from disk catches up from its leader by itself.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::BasicNode;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::Config;
use crate::heartbeat::{self, Health};
use crate::lease::LeaderLease;
use crate::pb::PingRequest;
use crate::peers::Peers;
use crate::placement::Placement;
use crate::raft::log_store::LogManager;
use crate::raft::network::ShardNetwork;
use crate::raft::state_machine::StateMachine;
use crate::raft::{NodeId, Raft, ShardId};
use crate::read_index::Coalescer;
use crate::recover;
use crate::state::{ShardData, StateDb};
use crate::wal::WalOptions;
use crate::write_batch::WriteBatcher;

const IDENTITY_FILE: &str = "IDENTITY";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("node id {0} is not in the config")]
    UnknownNode(NodeId),
    #[error("data dir {path}: {reason}")]
    DataDir { path: PathBuf, reason: String },
    #[error("data dir {path} belongs to {found}, but this is {expected}; refusing to use it")]
    Identity {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("write-ahead log: {0}")]
    Wal(#[from] crate::wal::WalError),
    #[error("state: {0}")]
    State(#[from] crate::state::StateError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("{0}")]
    Other(String),
}

/// What a data dir says about whose it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub node_id: NodeId,
    pub cluster_name: String,
    pub shards: u32,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {} of cluster \"{}\" with {} shards",
            self.node_id, self.cluster_name, self.shards
        )
    }
}

fn read_identity(dir: &Path) -> Result<Option<Identity>, StartError> {
    let path = dir.join(IDENTITY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .map(Some)
            .map_err(|e| StartError::DataDir {
                path: path.clone(),
                reason: format!("unreadable IDENTITY: {}", e.message()),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StartError::DataDir {
            path,
            reason: e.to_string(),
        }),
    }
}

fn write_identity(dir: &Path, id: &Identity) -> Result<(), StartError> {
    let err = |e: std::io::Error| StartError::DataDir {
        path: dir.to_path_buf(),
        reason: format!("cannot write IDENTITY: {e}"),
    };
    let text = toml::to_string(id).map_err(|e| StartError::Other(e.to_string()))?;
    let tmp = dir.join("IDENTITY.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(text.as_bytes()).map_err(err)?;
        f.sync_all().map_err(err)?;
    }
    std::fs::rename(&tmp, dir.join(IDENTITY_FILE)).map_err(err)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err)?;
    Ok(())
}

/// The outcome of one read-index round, shared by every read that waited for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadIndexError {
    /// This node does not lead the shard (the leader, if known).
    NotLeader(Option<NodeId>),
    /// No quorum confirmed the leadership in time, or the group is shutting down.
    Unavailable(String),
}

pub type ReadIndexResult = Result<(), ReadIndexError>;

/// Read-index rounds of one shard: `ensure_linearizable`, bounded by `timeout` (each read also
/// has its own deadline; this only keeps a stuck round from blocking the shard's reads forever).
/// A successful round also confirms the shard's leader lease for its term.
fn read_rounds(
    raft: Raft,
    lease: Arc<LeaderLease>,
    timeout: Duration,
) -> Coalescer<ReadIndexResult> {
    use openraft::error::{CheckIsLeaderError, RaftError};
    Coalescer::new(Arc::new(move || {
        let (raft, lease) = (raft.clone(), lease.clone());
        Box::pin(async move {
            match tokio::time::timeout(timeout, raft.ensure_linearizable()).await {
                Ok(Ok(read_log_id)) => {
                    lease.confirmed(read_log_id);
                    Ok(())
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    Err(ReadIndexError::NotLeader(f.leader_id))
                }
                Ok(Err(e)) => Err(ReadIndexError::Unavailable(e.to_string())),
                Err(_) => Err(ReadIndexError::Unavailable(
                    "timed out waiting for a quorum".to_string(),
                )),
            }
        })
    }))
}

/// One shard this node replicates.
pub struct Shard {
    pub id: ShardId,
    pub raft: Raft,
    pub data: Arc<ShardData>,
    pub replicas: Vec<NodeId>,
    /// Linearizable reads of this shard share read-index rounds (see [`crate::read_index`]).
    pub reads: Coalescer<ReadIndexResult>,
    /// Lets the leader serve linearizable reads without a round (see [`crate::lease`]).
    pub lease: Arc<LeaderLease>,
    /// Concurrent writes to this shard share Raft entries (see [`crate::write_batch`]).
    pub writes: WriteBatcher,
}

pub struct Node {
    pub id: NodeId,
    pub config: Arc<Config>,
    pub placement: Placement,
    pub peers: Arc<Peers>,
    pub health: Arc<Health>,
    logs: Arc<LogManager>,
    state: StateDb,
    shards: RwLock<HashMap<ShardId, Arc<Shard>>>,
    initialized: std::sync::atomic::AtomicBool,
    stop_tx: watch::Sender<bool>,
    /// Stopping: leaderships handed off, client requests refused as not executed.
    draining: std::sync::atomic::AtomicBool,
    /// Set once a shard's Raft group died of a storage error or a panic (see [`Node::fatal`]).
    fatal_tx: watch::Sender<Option<String>>,
    /// Shards rebuilt after this node lost its disk and not yet caught up with a leader: they
    /// must not vote or campaign (see [`Node::is_recovering`]).
    recovering: std::sync::Mutex<std::collections::HashSet<ShardId>>,
    /// Shards whose requests are paused while leadership is handed to another node.
    pub(crate) handoffs: std::sync::Mutex<std::collections::HashSet<ShardId>>,
    /// Last known leader of shards this node forwards for.
    pub(crate) leader_cache: RwLock<HashMap<ShardId, NodeId>>,
}

/// How a fresh node starts one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// A replica has state: pull it.
    Recover(NodeId),
    /// Nobody has state and this node is the preferred leader: create the group.
    Bootstrap,
    /// Nobody has state; another replica bootstraps it.
    Join,
}

impl Node {
    pub fn shard(&self, id: ShardId) -> Option<Arc<Shard>> {
        self.shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }

    pub fn shards(&self) -> Vec<Arc<Shard>> {
        let mut v: Vec<Arc<Shard>> = self
            .shards
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|s| s.id);
        v
    }

    /// Whether this node lost shard `shard`'s data and has not caught up with a leader since.
    ///
    /// Raft's safety rests on every voter keeping what it acknowledged. A node that lost its disk
    /// no longer has entries it once acknowledged, so if it voted, it and one peer lacking a
    /// committed entry could elect a leader without it — the chaos test saw exactly that lose a
    /// write. Until its log holds everything the current leader had when it came back, it refuses
    /// every vote and never campaigns.
    pub fn is_recovering(&self, shard: ShardId) -> bool {
        lock(&self.recovering).contains(&shard)
    }

    pub fn is_initialized(&self) -> bool {
        self.initialized.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn shards_with_state(&self) -> Vec<ShardId> {
        self.logs.shards_with_state()
    }

    /// [`LogManager::shard_log_states`] of this node.
    pub fn shard_log_states(&self) -> Vec<(ShardId, u64)> {
        self.logs.shard_log_states()
    }

    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    /// Resolves once a shard's Raft group has died of a storage error (a failed WAL write or
    /// fsync, which poisons the WAL for good, or a sled error) or a panic, with a description.
    ///
    /// Such a node must not go on: its dead groups would neither serve nor step aside (a dead
    /// leader still looks like the leader to this node's router), and every later WAL write
    /// fails anyway. The caller exits non-zero, so the supervisor restarts the node and WAL
    /// recovery decides what survived (a restart is what the WAL's fsyncgate rule asks for).
    pub async fn fatal(&self) -> String {
        let mut rx = self.fatal_tx.subscribe();
        loop {
            if let Some(reason) = rx.borrow_and_update().clone() {
                return reason;
            }
            if rx.changed().await.is_err() {
                // Unreachable while `self` lives (it owns the sender); never resolve then.
                std::future::pending::<()>().await;
            }
        }
    }

    fn raft_config(&self) -> Result<Arc<openraft::Config>, StartError> {
        raft_config(&self.config)
            .map(Arc::new)
            .map_err(StartError::Raft)
    }

    /// Opens the data dir and binds the listener; nothing runs yet.
    pub async fn open(
        config: Config,
        id: NodeId,
        data_dir: &Path,
    ) -> Result<(Arc<Node>, tokio::net::TcpListener), StartError> {
        let me = config.node(id).ok_or(StartError::UnknownNode(id))?.clone();
        std::fs::create_dir_all(data_dir).map_err(|e| StartError::DataDir {
            path: data_dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        let expected = Identity {
            node_id: id,
            cluster_name: config.cluster_name.clone(),
            shards: config.shards,
        };
        let identity = read_identity(data_dir)?;
        if let Some(found) = &identity {
            if *found != expected {
                return Err(StartError::Identity {
                    path: data_dir.to_path_buf(),
                    found: found.to_string(),
                    expected: expected.to_string(),
                });
            }
        }
        let logs = LogManager::open(WalOptions {
            dir: data_dir.join("wal"),
            fsync: config.fsync,
            ..Default::default()
        })?;
        let state_dir = data_dir.join("state");
        let state = StateDb::open(&state_dir).map_err(|e| StartError::DataDir {
            path: state_dir.clone(),
            reason: format!(
                "cannot open the state database: {}; if it is damaged, remove the data dir {} to \
                 rebuild the node from its peers",
                describe_state_error(&e),
                data_dir.display()
            ),
        })?;
        if identity.is_none() && (!logs.shards_with_state().is_empty() || !state.is_empty()) {
            return Err(StartError::DataDir {
                path: data_dir.to_path_buf(),
                reason: "holds data but no IDENTITY file; refusing to guess whose it is".into(),
            });
        }
        let placement =
            Placement::new(&config.node_ids(), config.shards, config.replication_factor);
        if identity.is_some() {
            for shard in placement.shards_of(id) {
                check_wal_against_state(&logs, &state, shard)
                    .await
                    .map_err(|reason| StartError::DataDir {
                        path: data_dir.to_path_buf(),
                        reason: format!(
                            "shard {shard}: {reason}; remove this data dir to rebuild the node \
                             from its peers"
                        ),
                    })?;
            }
        }
        let listener = bind(&me.addr).await.map_err(|source| StartError::Bind {
            addr: me.addr.clone(),
            source,
        })?;
        let peers =
            Arc::new(Peers::new(&config, id).map_err(|e| StartError::Other(e.to_string()))?);
        let health = Arc::new(Health::new(
            id,
            &peers,
            Duration::from_millis(config.failure_timeout_ms),
        ));
        let (stop_tx, _) = watch::channel(false);
        let (fatal_tx, _) = watch::channel(None);
        let node = Arc::new(Node {
            id,
            config: Arc::new(config),
            placement,
            peers,
            health,
            logs,
            state,
            shards: RwLock::new(HashMap::new()),
            initialized: std::sync::atomic::AtomicBool::new(identity.is_some()),
            stop_tx,
            draining: Default::default(),
            fatal_tx,
            leader_cache: RwLock::new(HashMap::new()),
            handoffs: Default::default(),
            recovering: Default::default(),
        });
        Ok((node, listener))
    }

    /// Starts every shard (recovering or bootstrapping a fresh node) and the heartbeat. The gRPC
    /// server must already be serving: fresh peers ask each other questions during this.
    pub async fn start(self: &Arc<Self>, data_dir: &Path) -> Result<(), StartError> {
        let fresh = !self.is_initialized();
        let mine = self.placement.shards_of(self.id);
        let plans = if fresh {
            write_identity(
                data_dir,
                &Identity {
                    node_id: self.id,
                    cluster_name: self.config.cluster_name.clone(),
                    shards: self.config.shards,
                },
            )?;
            let plans = self.plan_fresh(&mine).await;
            self.initialized
                .store(true, std::sync::atomic::Ordering::Release);
            plans
        } else {
            mine.iter().map(|s| (*s, Plan::Join)).collect()
        };

        tokio::spawn(heartbeat::run(
            self.health.clone(),
            self.peers.clone(),
            self.config.cluster_name.clone(),
            Duration::from_millis(self.config.heartbeat_interval_ms),
            self.stop_signal(),
        ));

        tokio::spawn(crate::balance::run(self.clone(), self.stop_signal()));

        // A node that lost its disk pulls all its shards at once, each on its own task: the
        // streams come from different peers, and the receiving side's sled inserts (its main
        // cost) can use every core. (On the 2-core development box this measured the same as
        // one shard after another, both cores being busy either way.)
        let mut pulls = Vec::new();
        for (shard, plan) in &plans {
            if let Plan::Recover(peer) = *plan {
                // Persisted first: a crash in the middle must not let this shard vote later.
                self.state.set_recovering(*shard, true)?;
                let data = self.state.shard(*shard)?;
                let (me, shard) = (self.clone(), *shard);
                pulls.push(tokio::spawn(async move {
                    me.recover_before_start(shard, peer, &data).await
                }));
            }
        }
        for pull in pulls {
            pull.await
                .map_err(|e| StartError::Other(format!("recovering a shard: {e}")))??;
        }

        let raft_config = self.raft_config()?;
        for (shard, plan) in plans {
            let data = self.state.shard(shard)?;
            let recovering = self.state.is_recovering(shard)?;
            let replicas = self.placement.replicas(shard).to_vec();
            let lease = Arc::new(LeaderLease::new(self.id, &replicas, &raft_config));
            let network = ShardNetwork {
                shard,
                me: self.id,
                peers: self.peers.clone(),
                lease: lease.clone(),
                logs: self.logs.clone(),
            };
            let raft = Raft::new(
                self.id,
                raft_config.clone(),
                network,
                self.logs.shard(shard).leading_as(self.id),
                StateMachine::new(data.clone(), self.logs.clone()),
            )
            .await
            .map_err(|e| StartError::Raft(format!("shard {shard}: {e}")))?;
            if plan == Plan::Bootstrap {
                let members: BTreeMap<NodeId, BasicNode> = replicas
                    .iter()
                    .map(|id| {
                        let addr = if *id == self.id {
                            self.config.node(*id).map(|n| n.addr.clone())
                        } else {
                            self.peers.addr(*id).map(str::to_string)
                        };
                        (*id, BasicNode::new(addr.unwrap_or_default()))
                    })
                    .collect();
                if let Err(e) = raft.initialize(members).await {
                    // Already initialized (e.g. a restart raced us): harmless.
                    tracing::info!(shard, "bootstrap skipped: {e}");
                } else {
                    tracing::info!(
                        KV_NODE = self.id,
                        KV_SHARD = shard,
                        "bootstrapped shard {shard}"
                    );
                }
            }
            if recovering {
                raft.runtime_config().elect(false);
                lock(&self.recovering).insert(shard);
                tokio::spawn(catch_up(self.clone(), shard, raft.clone()));
            }
            tokio::spawn(watch_leadership(self.id, shard, raft.clone()));
            let me = self.clone();
            tokio::spawn(crate::raft::break_split_votes(
                raft.clone(),
                self.config.election_timeout_ms,
                move || !me.is_recovering(shard),
            ));
            tokio::spawn(watch_fatal(self.clone(), shard, raft.clone()));
            let reads = read_rounds(
                raft.clone(),
                lease.clone(),
                Duration::from_millis(self.config.request_timeout_ms),
            );
            let writes = WriteBatcher::start(raft.clone());
            let entry = Arc::new(Shard {
                id: shard,
                raft,
                data,
                replicas,
                reads,
                lease,
                writes,
            });
            self.shards
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(shard, entry);
        }
        Ok(())
    }

    /// The replicas of `shard` other than this node.
    fn other_replicas(&self, shard: ShardId) -> Vec<NodeId> {
        let replicas = self.placement.replicas(shard).iter().copied();
        replicas.filter(|r| *r != self.id).collect()
    }

    /// Asks the other replicas of each shard what they hold, until every shard has a plan.
    async fn plan_fresh(&self, mine: &[ShardId]) -> Vec<(ShardId, Plan)> {
        let mut waited = 0u32;
        loop {
            let mut answers: HashMap<NodeId, Vec<(ShardId, u64)>> = HashMap::new();
            for p in self.peers.iter() {
                let Some(mut client) = self.peers.cluster(p.id) else {
                    continue;
                };
                let mut req = tonic::Request::new(PingRequest {
                    from: self.id,
                    cluster_name: self.config.cluster_name.clone(),
                });
                req.set_timeout(Duration::from_millis(500));
                if let Ok(r) = client.ping(req).await {
                    let r = r.into_inner();
                    if r.cluster_name != self.config.cluster_name {
                        tracing::error!(
                            peer = p.id,
                            "peer belongs to cluster \"{}\", not \"{}\"; ignoring it",
                            r.cluster_name,
                            self.config.cluster_name
                        );
                        continue;
                    }
                    let logs = r.shard_logs.iter().map(|l| (l.shard, l.last_log_index));
                    answers.insert(p.id, logs.collect());
                }
            }
            let plans: Vec<(ShardId, Plan)> = mine
                .iter()
                .filter_map(|&shard| {
                    let others = self.other_replicas(shard);
                    let preferred = self.placement.preferred_leader(shard) == self.id;
                    plan_shard(shard, &others, &answers, preferred).map(|p| (shard, p))
                })
                .collect();
            if plans.len() == mine.len() {
                return plans;
            }
            if waited % 20 == 0 {
                tracing::info!(
                    answered = answers.len(),
                    "fresh data dir: waiting for the other replicas to answer before joining"
                );
            }
            waited += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Fills an empty shard from `peer` before its Raft group starts (a node that lost its disk).
    async fn recover_before_start(
        &self,
        shard: ShardId,
        mut peer: NodeId,
        data: &ShardData,
    ) -> Result<(), StartError> {
        let mut attempt = 0u32;
        loop {
            match recover::pull(&self.peers, self.id, peer, shard, data).await {
                Ok(p) => {
                    let (keys, bytes, started) = (p.keys, p.bytes, p.started);
                    install_recovered(&self.logs, shard, data, p).await?;
                    recover::log_done(self.id, peer, shard, keys, bytes, started);
                    return Ok(());
                }
                Err(e) => {
                    attempt += 1;
                    tracing::warn!(shard, peer, attempt, "recover failed, retrying: {e}");
                    // Try the shard's other replicas in turn.
                    let others = self.other_replicas(shard);
                    if !others.is_empty() {
                        peer = others[attempt as usize % others.len()];
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// First step of a graceful stop, while still serving: hand every leadership to a peer, so
    /// clients are served by the new leaders (the new leaders' messages must still reach us).
    pub async fn prepare_stop(&self) {
        self.handoff_all().await;
    }

    /// Second step of a graceful stop: clients' new requests are refused with `UNAVAILABLE`
    /// marked not executed, so they go to another node at once and safely, instead of meeting
    /// a connection that closes under them. Requests already running, and those forwarded by
    /// peers, are still served.
    pub fn start_draining(&self) {
        self.draining
            .store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Stops the gRPC server (it finishes the requests it has) and every background task.
    pub fn stop_serving(&self) {
        let _ = self.stop_tx.send(true);
    }

    /// Last step: Raft groups shut down, sled flushed, WAL closed. Call once no request runs.
    pub async fn shutdown(&self) {
        self.stop_serving();
        for shard in self.shards() {
            if let Err(e) = shard.raft.shutdown().await {
                tracing::warn!(shard = shard.id, "raft shutdown: {e}");
            }
        }
        if let Err(e) = self.state.flush() {
            tracing::error!("flushing state on shutdown: {e}");
        }
        self.logs.wal().close();
    }
}

/// The openraft config of every shard's group, from the cluster config. Pure (fuzzed with
/// arbitrary configs): any config that passed validation gives a config or an error, never a
/// panic.
pub fn raft_config(c: &Config) -> Result<openraft::Config, String> {
    let cfg = openraft::Config {
        cluster_name: c.cluster_name.clone(),
        heartbeat_interval: c.raft_heartbeat_ms,
        election_timeout_min: c.election_timeout_ms,
        election_timeout_max: c.election_timeout_ms.saturating_mul(2),
        install_snapshot_timeout: 60_000,
        // openraft gives one append-entries RPC a raft heartbeat interval to complete; with values
        // up to 1 MiB, a batch must stay small enough to cross in that time.
        max_payload_entries: 16,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_logs),
        // Entries kept past a snapshot, so a follower that is only a little behind catches up
        // from the log instead of a whole snapshot.
        max_in_snapshot_log_to_keep: c.snapshot_logs.min(1000),
        ..Default::default()
    };
    cfg.validate().map_err(|e| e.to_string())
}

/// Pending connections the kernel queues for us (it caps this at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` ("host:port"; each resolved address in turn, like `TcpListener::bind`) with a
/// deep listen backlog. The default of 128 overflows when many clients connect at once (say,
/// all reconnecting after a restart), and each overflow costs a client a 1 s SYN retransmit.
async fn bind(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        };
        let bound = socket.and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(a)?;
            s.listen(LISTEN_BACKLOG)
        });
        match bound {
            Ok(listener) => return Ok(listener),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the address resolves to nothing",
        )
    }))
}

/// sled's own text for corruption ends in an empty backtrace; say it plainly.
fn describe_state_error(e: &crate::state::StateError) -> String {
    match e {
        crate::state::StateError::Sled(sled::Error::Corruption { at, .. }) => match at {
            Some(at) => format!("sled found corrupted data (checksum mismatch at {at:?})"),
            None => "sled found corrupted data (checksum mismatch)".to_string(),
        },
        other => other.to_string(),
    }
}

/// Cross-checks a shard's WAL (its Raft log and vote) against its sled state before anything
/// starts, on a node that has run before. Either can be damaged on its own: a WAL cut by the
/// torn-tail rule or lost, a sled file that lost its recent updates or the whole state dir. Some
/// combinations cannot be repaired from this node's own disk, and starting anyway would break
/// Raft's promises (openraft also panics on some of them):
///
/// - the WAL has no vote for a shard that sled has applied entries of: the log was lost, and
///   with it the vote, so the node could vote twice in one term;
/// - sled applied entries beyond the end of the WAL, and not through a snapshot install (whose
///   log purge may legitimately lag): the WAL lost entries it had made durable;
/// - the WAL was trimmed past what sled has applied: sled lost entries that only it held.
///
/// A shard rebuilt after a disk loss and not caught up yet (`recovering`) is exempt: its log is
/// seeded after its state, so a crash in between leaves exactly the first case.
async fn check_wal_against_state(
    logs: &Arc<LogManager>,
    state: &StateDb,
    shard: ShardId,
) -> Result<(), String> {
    use openraft::storage::RaftLogStorage;
    if state.is_recovering(shard).map_err(|e| e.to_string())? {
        return Ok(());
    }
    let data = state.shard(shard).map_err(|e| e.to_string())?;
    let applied = data.applied().map_err(|e| e.to_string())?.last_applied;
    let snapshot = data
        .last_snapshot()
        .map_err(|e| e.to_string())?
        .and_then(|m| m.last_log_id);
    let mut log = logs.shard(shard);
    let vote = log.read_vote().await.map_err(|e| e.to_string())?;
    let log_state = log.get_log_state().await.map_err(|e| e.to_string())?;
    let index = |l: Option<crate::raft::LogId>| l.map_or(0, |l| l.index);
    let (applied_i, last_i) = (index(applied), index(log_state.last_log_id));
    let purged_i = index(log_state.last_purged_log_id);
    if vote.is_none() && applied.is_some() {
        return Err(format!(
            "the state dir has applied the log up to index {applied_i}, but the write-ahead log \
             has no record of this shard (no vote): the WAL was lost or cut"
        ));
    }
    if applied_i > last_i && index(snapshot) < applied_i {
        return Err(format!(
            "the state dir has applied the log up to index {applied_i}, but the write-ahead log \
             ends at index {last_i}: the WAL lost entries it had made durable"
        ));
    }
    if purged_i > 0 && purged_i > index(snapshot) {
        // The log is trimmed only after the snapshot covering it is durable in the state dir.
        return Err(format!(
            "the write-ahead log was trimmed up to index {purged_i}, past the state dir's last \
             snapshot (index {}): the state dir lost data",
            index(snapshot)
        ));
    }
    if purged_i > applied_i {
        return Err(format!(
            "the write-ahead log was trimmed up to index {purged_i}, but the state dir has only \
             applied up to index {applied_i}: the state dir lost data"
        ));
    }
    Ok(())
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The plan for one shard of a fresh node, from what the shard's `others` replicas answered
/// (`answers`: peer → (shard, last log index) for each shard it holds state for), or `None`
/// while it cannot be decided yet.
///
/// A fresh data dir is either a new node of a cluster being created or a node that lost its
/// disk, and it cannot tell which. What decides is whether anything can have been committed in
/// the group: an entry past index 0 (the initial membership) is committed only once a majority
/// holds it, which includes another replica (one lost disk at a time is the fault model). So if
/// some replica's log goes past 0, the shard is rebuilt from the replica with the longest log
/// and must not vote until caught up ([`Plan::Recover`]); if every other replica has answered
/// and none goes past 0, nothing was ever acknowledged and the node joins as a fresh member
/// (the preferred leader creates the group). Anything else waits for more answers.
pub fn plan_shard(
    shard: ShardId,
    others: &[NodeId],
    answers: &HashMap<NodeId, Vec<(ShardId, u64)>>,
    preferred: bool,
) -> Option<Plan> {
    let longest = others
        .iter()
        .filter_map(|r| {
            let held = answers.get(r)?.iter().find(|(s, _)| *s == shard)?;
            Some((*r, held.1))
        })
        .max_by_key(|(_, last)| *last);
    if let Some((holder, last)) = longest {
        if last > 0 {
            return Some(Plan::Recover(holder));
        }
    }
    if others.iter().all(|r| answers.contains_key(r)) {
        Some(if preferred {
            Plan::Bootstrap
        } else {
            Plan::Join
        })
    } else {
        None
    }
}

/// Installs a shard pulled from a peer into the empty `data` and seeds its log, before its Raft
/// group starts (a node that lost its disk). Returns `false`, installing nothing, when the
/// sender had applied nothing yet: the entries then come by replication, and the shard stays
/// marked recovering all the same.
pub async fn install_recovered(
    logs: &Arc<LogManager>,
    shard: ShardId,
    data: &ShardData,
    p: recover::Pulled,
) -> Result<bool, StartError> {
    let Some(upto) = p.header.last_applied.filter(|l| l.index > 0) else {
        return Ok(false);
    };
    let applied = crate::state::Applied {
        last_applied: Some(upto),
        membership: p.header.membership.clone(),
        consistent_from: p.received.consistent_from,
    };
    data.finish_install(p.received.staging, &applied)?;
    data.save_snapshot_meta(&crate::raft::SnapshotMeta {
        last_log_id: Some(upto),
        last_membership: p.header.membership,
        snapshot_id: crate::raft::state_machine::snapshot_id(Some(upto)),
    })?;
    data.flush()?;
    // Adopt the sender's vote (not committed), so this node does not vote twice in a term it
    // may have voted in before it lost its disk.
    let vote = p.header.vote.map(|v| openraft::Vote {
        committed: false,
        ..v
    });
    logs.seed(shard, vote, upto).await?;
    Ok(true)
}

/// Ends a shard's recovery once its log holds every entry its leader had when asked.
async fn catch_up(node: Arc<Node>, shard: ShardId, raft: Raft) {
    let mut stop = node.stop_signal();
    let mut target: Option<(NodeId, u64)> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = stop.changed() => return,
        }
        let m = raft.metrics().borrow().clone();
        let Some(leader) = m.current_leader.filter(|l| *l != node.id) else {
            continue;
        };
        if target.is_none_or_different(leader) {
            // Ask the leader how far its log goes; everything committed so far is in there.
            let Some(mut client) = node.peers.cluster(leader) else {
                continue;
            };
            let mut req = tonic::Request::new(crate::pb::StatusRequest {});
            req.set_timeout(Duration::from_secs(1));
            let Ok(reply) = client.status(req).await else {
                continue;
            };
            let reply = reply.into_inner();
            let Some(s) = reply
                .shards
                .iter()
                .find(|s| s.shard == shard && s.role == "Leader")
            else {
                continue;
            };
            target = Some((leader, s.last_log_index));
        }
        let Some((_, want)) = target else { continue };
        if m.last_log_index.unwrap_or(0) >= want {
            if let Err(e) = node.state.set_recovering(shard, false) {
                tracing::error!(KV_SHARD = shard, "cannot clear the recovering mark: {e}");
                continue;
            }
            lock(&node.recovering).remove(&shard);
            raft.runtime_config().elect(true);
            tracing::info!(
                KV_EVENT = "recover_caught_up",
                KV_NODE = node.id,
                KV_SHARD = shard,
                KV_PEER = leader,
                "shard {shard} caught up with leader {leader} (log index {want}); voting again"
            );
            return;
        }
    }
}

trait TargetExt {
    fn is_none_or_different(&self, leader: NodeId) -> bool;
}

impl TargetExt for Option<(NodeId, u64)> {
    fn is_none_or_different(&self, leader: NodeId) -> bool {
        self.map_or(true, |(l, _)| l != leader)
    }
}

/// Reports (once per node) a shard's Raft group that died of anything but a normal shutdown.
///
/// Both watchers below wait on openraft's *server* metrics (vote, role, leader, membership),
/// which change only with those, never on the full metrics, which the group's core sends after
/// every pass of its loop: several times per Raft entry on every replica. A task waiting on the
/// full metrics is woken each time; with 8 shards that was 16 tasks per node woken several times
/// per entry for nothing.
async fn watch_fatal(node: Arc<Node>, shard: ShardId, raft: Raft) {
    let mut rx = raft.server_metrics();
    // The core task holds the sender: this resolves once that task is gone, whatever ended it.
    while rx.changed().await.is_ok() {}
    // The core reports why it stopped in the full metrics before it goes.
    let died = match &raft.metrics().borrow().running_state {
        Err(openraft::error::Fatal::Stopped) => None,
        Err(fatal) => Some(format!("raft stopped: {fatal}")),
        // Gone without saying why: it panicked, unless this node is stopping.
        Ok(()) => {
            (!*node.stop_tx.borrow()).then(|| "raft task ended unexpectedly (panicked)".to_string())
        }
    };
    if let Some(what) = died {
        node.report_fatal(shard, what);
    }
}

impl Node {
    fn report_fatal(&self, shard: ShardId, what: String) {
        let reason = format!("shard {shard}: {what}");
        tracing::error!(KV_NODE = self.id, KV_SHARD = shard, "{reason}");
        self.fatal_tx.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }
}

/// Logs `leader_elected` each time this node becomes a shard's leader.
async fn watch_leadership(me: NodeId, shard: ShardId, raft: Raft) {
    let mut rx = raft.server_metrics();
    let mut logged_term = None;
    loop {
        {
            let m = rx.borrow_and_update();
            let term = m.vote.leader_id().term;
            if m.current_leader == Some(me) && logged_term != Some(term) {
                logged_term = Some(term);
                tracing::info!(
                    KV_EVENT = "leader_elected",
                    KV_NODE = me,
                    KV_SHARD = shard,
                    term,
                    "became leader of shard {shard} in term {term}"
                );
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(list: &[(NodeId, &[(ShardId, u64)])]) -> HashMap<NodeId, Vec<(ShardId, u64)>> {
        list.iter().map(|(n, s)| (*n, s.to_vec())).collect()
    }

    #[test]
    fn a_replica_with_entries_past_the_membership_means_rebuild_from_the_longest_log() {
        let a = answers(&[(2, &[(7, 40)]), (3, &[(7, 55)])]);
        assert_eq!(plan_shard(7, &[2, 3], &a, true), Some(Plan::Recover(3)));
        // One such replica is enough, even while another has not answered.
        let a = answers(&[(2, &[(7, 1)])]);
        assert_eq!(plan_shard(7, &[2, 3], &a, false), Some(Plan::Recover(2)));
    }

    #[test]
    fn a_group_nobody_wrote_to_is_joined_fresh_once_everyone_answered() {
        // A peer that only bootstrapped (membership at index 0) or voted as a candidate holds
        // state, but nothing can have been committed: no reason to refuse votes.
        let a = answers(&[(2, &[(7, 0)]), (3, &[])]);
        assert_eq!(plan_shard(7, &[2, 3], &a, false), Some(Plan::Join));
        assert_eq!(plan_shard(7, &[2, 3], &a, true), Some(Plan::Bootstrap));
        let a = answers(&[(2, &[]), (3, &[(8, 90)])]);
        assert_eq!(plan_shard(7, &[2, 3], &a, true), Some(Plan::Bootstrap));
    }

    #[test]
    fn a_silent_replica_blocks_the_decision_unless_another_has_entries() {
        let a = answers(&[(2, &[(7, 0)])]);
        assert_eq!(plan_shard(7, &[2, 3], &a, true), None);
        assert_eq!(plan_shard(7, &[2, 3], &HashMap::new(), true), None);
    }
}
