//! Concurrent writes to one shard share Raft entries.
//!
//! openraft handles each `client_write` as its own log entry: its own WAL record, its own trip
//! through the engine, replication messages and apply. Under load that per-entry work, not the
//! disk, is what limits writes. So a shard's writes go through a batcher: a write waits in a
//! queue while the shard's previous proposal is in flight ([`SLOTS`]), then leaves as part of
//! one entry holding every write queued at that moment ([`Command::Batch`]). With one client
//! nothing waits: a write that finds no proposal in flight and nothing queued is proposed by its
//! caller at once, without the two task hops through the batcher (about 4% of a lone write's
//! latency, measured). Under load a batch holds the writes that arrived while the previous
//! proposals were in flight.
//!
//! Under load a shard's batches also *gather* ([`Round::gather`]). Without it, a shard's
//! writers split into two halves that take turns: when a proposal commits, the writes queued
//! behind it leave at once, and the writers just answered come back a moment later to wait a
//! whole round for the next one (64 clients on 8 shards: 4.2 writes per entry, though each shard
//! has about 8 writes outstanding). So after a proposal of several writes whose round took long
//! enough for tokio's millisecond timer ([`GATHER_MIN_ROUND`]), the next one waits until it
//! holds a quarter more writes than that one, or until [`GATHER_WINDOW`] of that round has
//! passed since it ended, whichever comes first; and for that window a lone write does not take
//! the direct path. The wait is bounded by a fraction of a round that was already that long, so
//! it costs a write at most that much, and a shard whose load falls stops gathering after one
//! round (a proposal of one write, or one that ended longer ago than the window, asks for
//! nothing). Measured on 3 nodes, 8 shards, 2 cores, fresh clusters alternated (BENCHMARKS.md):
//! 64 clients writing, 11 of 13 pairs faster, median +5 %, at 5.0 writes per entry instead of
//! 4.1; the 50/50 mix 4 of 6, median +14 %; 8 clients writing and a single client unchanged.
//!
//! What a caller sees does not change: a batch is one entry, so its writes commit (in queue
//! order) or fail together, and each write gets its own result. A batch refused before it was
//! proposed (this node is not the leader) is refused for each of its writes, which the router may
//! then retry elsewhere; a batch whose proposal failed afterwards leaves each write's outcome
//! unknown, exactly as a single proposal would.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::raft::{Command, CommandResult, NodeId, Raft};

/// Proposals of one shard in flight at once. Measured with 64 clients writing (3 nodes, 8 shards,
/// 2 cores): 1 slot 9.0k writes/s, 2 slots 8.3k, unlimited (no batching) 6.4k; the node is
/// CPU-bound, so fewer, larger entries beat overlapping round trips.
pub const SLOTS: usize = 1;
/// A batch closes at this many writes or this many key and value bytes, whichever comes first
/// (a single larger write travels alone). Bounds an entry's size in the WAL and on the wire.
pub const MAX_WRITES: usize = 512;
pub const MAX_BYTES: usize = 1 << 20;
/// Writes queued per shard before callers wait to enqueue (back-pressure on clients).
const QUEUE: usize = 4096;
/// A proposal's round must take at least this long for the next one to gather: a shorter wait
/// is below what tokio's timer (millisecond ticks) can bound.
pub const GATHER_MIN_ROUND: Duration = Duration::from_millis(2);
/// How long after a round ended the next proposal may wait to gather, as a share of that round.
pub const GATHER_WINDOW: f64 = 0.75;
/// How many writes the next proposal waits for, as a multiple of the last one's.
pub const GATHER_GROWTH: f64 = 1.25;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteError {
    /// Refused before it was proposed: this node does not lead the shard (the leader, if known).
    NotLeader(Option<NodeId>),
    /// Not proposed: the shard is shutting down.
    Stopped,
    /// Proposed, then the group failed: the write may or may not commit.
    Unknown(String),
}

struct Pending {
    cmd: Command,
    done: oneshot::Sender<Result<CommandResult, WriteError>>,
}

/// The write queue of one shard. Dropping it stops its task once queued writes are proposed.
pub struct WriteBatcher {
    tx: mpsc::Sender<Pending>,
    slots: Arc<Semaphore>,
    raft: Raft,
    counts: Arc<Counts>,
    last: Arc<LastRound>,
}

/// The shard's last batched proposal (shared by the batching task and the direct path).
type LastRound = Mutex<Option<Round>>;

/// A batched proposal that completed: what the next one gathers toward.
#[derive(Clone, Copy, Debug)]
pub struct Round {
    /// Writes it carried.
    pub writes: usize,
    /// From its proposal to its result.
    pub took: Duration,
    /// When its result came.
    pub ended: Instant,
}

impl Round {
    /// What the next proposal waits for at `now`: this many writes, until this deadline, or
    /// `None` to leave with whatever is queued (see the module docs).
    pub fn gather(&self, now: Instant) -> Option<(usize, Instant)> {
        if self.writes < 2 || self.took < GATHER_MIN_ROUND {
            return None;
        }
        let deadline = self.ended + self.took.mul_f64(GATHER_WINDOW);
        let writes = ((self.writes as f64 * GATHER_GROWTH).ceil() as usize).min(MAX_WRITES);
        (now < deadline).then_some((writes, deadline))
    }
}

fn last_round(last: &LastRound) -> Option<Round> {
    *last.lock().unwrap_or_else(|p| p.into_inner())
}

fn set_round(last: &LastRound, round: Round) {
    *last.lock().unwrap_or_else(|p| p.into_inner()) = Some(round);
}

/// Proposals made and the writes they carried, since the batcher started.
#[derive(Default)]
struct Counts {
    proposals: AtomicU64,
    writes: AtomicU64,
}

impl WriteBatcher {
    /// Starts the shard's batching task on the current tokio runtime.
    pub fn start(raft: Raft) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let counts = Arc::new(Counts::default());
        let slots = Arc::new(Semaphore::new(SLOTS));
        let last = Arc::new(LastRound::default());
        tokio::spawn(run(
            raft.clone(),
            rx,
            slots.clone(),
            counts.clone(),
            last.clone(),
        ));
        WriteBatcher {
            tx,
            slots,
            raft,
            counts,
            last,
        }
    }

    /// Pretends the shard's last batched proposal was `round` (tests of gathering).
    #[cfg(test)]
    fn set_last_round(&self, round: Round) {
        set_round(&self.last, round);
    }

    /// (proposals made, writes they carried) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.counts.proposals.load(Ordering::Relaxed),
            self.counts.writes.load(Ordering::Relaxed),
        )
    }

    /// Proposes `cmd` (alone when the shard is idle, else as part of a batch) and waits for its
    /// result.
    pub async fn write(&self, cmd: Command) -> Result<CommandResult, WriteError> {
        // Nothing in flight and nothing queued: nothing to share an entry with, so the caller
        // proposes its write itself, without the hops through the batching task. A free slot
        // with writes queued belongs to the task (it holds the first of them and waits for the
        // slot; the semaphore hands a released permit to a waiter before any `try_acquire`).
        // While the shard gathers, a write joins the queue instead.
        let gathering =
            || last_round(&self.last).is_some_and(|r| r.gather(Instant::now()).is_some());
        if self.tx.capacity() == self.tx.max_capacity() && !gathering() {
            if let Ok(slot) = self.slots.clone().try_acquire_owned() {
                self.counts.proposals.fetch_add(1, Ordering::Relaxed);
                self.counts.writes.fetch_add(1, Ordering::Relaxed);
                let r = propose_one(&self.raft, cmd).await;
                drop(slot);
                return r;
            }
        }
        let (done, rx) = oneshot::channel();
        self.tx
            .send(Pending { cmd, done })
            .await
            .map_err(|_| WriteError::Stopped)?;
        // The task dropped the write without answering: it ended (runtime shutdown) with the
        // proposal possibly made.
        rx.await.unwrap_or_else(|_| {
            Err(WriteError::Unknown(
                "the shard's write task ended while the write was in flight".into(),
            ))
        })
    }
}

fn cost(cmd: &Command) -> usize {
    match cmd {
        Command::Put { key, value } => key.len() + value.len(),
        Command::Delete { key } => key.len(),
        Command::Batch(cmds) => cmds.iter().map(cost).sum(),
    }
}

/// Adds `p` to `batch`, counting its bytes.
fn add(batch: &mut Vec<Pending>, bytes: &mut usize, p: Pending) {
    *bytes += cost(&p.cmd);
    batch.push(p);
}

/// Moves what is queued into `batch`, up to a batch's limits.
fn take_queued(rx: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>, bytes: &mut usize) {
    while batch.len() < MAX_WRITES && *bytes < MAX_BYTES {
        match rx.try_recv() {
            Ok(p) => add(batch, bytes, p),
            Err(_) => break,
        }
    }
}

async fn run(
    raft: Raft,
    mut rx: mpsc::Receiver<Pending>,
    slots: Arc<Semaphore>,
    counts: Arc<Counts>,
    last: Arc<LastRound>,
) {
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        // Then wait for a free slot: while every slot is busy, writes pile up in the queue and
        // leave together. (Holding a slot only while writes are queued leaves it free when the
        // shard is idle, for `WriteBatcher::write`'s direct path.)
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = cost(&first.cmd);
        let mut batch = vec![first];
        take_queued(&mut rx, &mut batch, &mut bytes);
        if let Some((writes, deadline)) = last_round(&last).and_then(|r| r.gather(Instant::now())) {
            while batch.len() < writes && bytes < MAX_BYTES {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(p)) => {
                        add(&mut batch, &mut bytes, p);
                        take_queued(&mut rx, &mut batch, &mut bytes);
                    }
                    // The deadline passed, or every sender is gone (the next `recv` ends the
                    // task once this batch is proposed).
                    Ok(None) | Err(_) => break,
                }
            }
        }
        // A caller that gave up meanwhile (its deadline passed) was told the outcome is
        // unknown; not proposing its write is one of the outcomes it allowed, and the cheaper one.
        batch.retain(|p| !p.done.is_closed());
        if batch.is_empty() {
            continue;
        }
        counts.proposals.fetch_add(1, Ordering::Relaxed);
        counts
            .writes
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        let raft = raft.clone();
        let last = last.clone();
        tokio::spawn(async move {
            propose(&raft, batch, &last).await;
            drop(slot);
        });
    }
}

/// Proposes one write on its own (the direct path of [`WriteBatcher::write`]).
async fn propose_one(raft: &Raft, cmd: Command) -> Result<CommandResult, WriteError> {
    raft.client_write(cmd)
        .await
        .map(|resp| resp.data)
        .map_err(write_error)
}

/// A refused or failed proposal, as its writes see it.
fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, openraft::BasicNode>>) -> WriteError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            WriteError::NotLeader(f.leader_id)
        }
        e => WriteError::Unknown(e.to_string()),
    }
}

/// Proposes one batch, records its round in `last`, and answers each of its writes. The round is
/// recorded first, so a caller that writes again once answered sees it.
async fn propose(raft: &Raft, batch: Vec<Pending>, last: &LastRound) {
    let (writes, started) = (batch.len(), Instant::now());
    let single = writes == 1;
    let (mut cmds, dones): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.done)).unzip();
    // A lone write is proposed as itself: no batch wrapper on disk or on the wire.
    let cmd = if single {
        cmds.remove(0)
    } else {
        Command::Batch(cmds)
    };
    let r = raft.client_write(cmd).await;
    let results: Vec<Result<CommandResult, WriteError>> = match r {
        Ok(resp) if single => vec![Ok(resp.data)],
        Ok(resp) => match resp.data {
            CommandResult::Batch(rs) if rs.len() == dones.len() => rs.into_iter().map(Ok).collect(),
            other => {
                let e = WriteError::Unknown(format!(
                    "a batch of {} writes applied with result {other:?}",
                    dones.len()
                ));
                vec![Err(e); dones.len()]
            }
        },
        Err(e) => vec![Err(write_error(e)); dones.len()],
    };
    let round = Round {
        writes,
        took: started.elapsed(),
        ended: Instant::now(),
    };
    set_round(last, round);
    for (done, r) in dones.into_iter().zip(results) {
        // A caller that gave up (deadline) no longer listens; that is fine.
        let _ = done.send(r);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use openraft::error::{
        Fatal, RPCError, RaftError, ReplicationClosed, StreamingError, Unreachable,
    };
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::{
        AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
    };
    use openraft::BasicNode;

    use super::*;
    use crate::raft::log_store::LogManager;
    use crate::raft::state_machine::StateMachine;
    use crate::raft::TypeConfig;
    use crate::state::StateDb;
    use crate::wal::WalOptions;

    /// A one-member group never sends a message; any attempt is a test failure.
    struct NoPeers;
    struct NoLink;

    fn nobody<E: std::error::Error>() -> RPCError<NodeId, BasicNode, E> {
        RPCError::Unreachable(Unreachable::new(&std::io::Error::other(
            "no peers in this test",
        )))
    }

    impl RaftNetworkFactory<TypeConfig> for NoPeers {
        type Network = NoLink;
        async fn new_client(&mut self, _: NodeId, _: &BasicNode) -> NoLink {
            NoLink
        }
    }

    impl RaftNetwork<TypeConfig> for NoLink {
        async fn append_entries(
            &mut self,
            _: AppendEntriesRequest<TypeConfig>,
            _: RPCOption,
        ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>>
        {
            Err(nobody())
        }
        async fn full_snapshot(
            &mut self,
            _: crate::raft::Vote,
            _: openraft::Snapshot<TypeConfig>,
            _: impl std::future::Future<Output = ReplicationClosed> + Send + 'static,
            _: RPCOption,
        ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
            Err(StreamingError::Unreachable(Unreachable::new(
                &std::io::Error::other("no peers in this test"),
            )))
        }
        async fn vote(
            &mut self,
            _: VoteRequest<NodeId>,
            _: RPCOption,
        ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
            Err(nobody())
        }
    }

    /// A single-node group on a temporary directory, leading once this returns.
    async fn group(dir: &std::path::Path) -> (Raft, Arc<crate::state::ShardData>) {
        let logs = LogManager::open(WalOptions {
            dir: dir.join("wal"),
            fsync: false,
            ..Default::default()
        })
        .expect("open wal");
        let db = StateDb::open(&dir.join("state")).expect("open state");
        let data = db.shard(0).expect("open shard");
        let config = openraft::Config {
            heartbeat_interval: 50,
            election_timeout_min: 150,
            election_timeout_max: 300,
            ..Default::default()
        };
        let raft = Raft::new(
            1,
            Arc::new(config.validate().expect("valid config")),
            NoPeers,
            logs.shard(0),
            StateMachine::new(data.clone(), logs.clone()),
        )
        .await
        .expect("start raft");
        raft.initialize(BTreeMap::from([(1, BasicNode::default())]))
            .await
            .expect("initialize");
        raft.wait(Some(std::time::Duration::from_secs(10)))
            .current_leader(1, "leads")
            .await
            .expect("becomes leader");
        (raft, data)
    }

    fn put(i: usize) -> Command {
        Command::Put {
            key: format!("k{i:03}").into_bytes(),
            value: format!("v{i}").into_bytes(),
        }
    }

    /// Writes `put(i)` for every `i` in `keys` at once, and checks that each succeeds.
    async fn put_all(writes: &Arc<WriteBatcher>, keys: std::ops::Range<usize>) {
        let tasks: Vec<_> = keys
            .map(|i| {
                let w = writes.clone();
                tokio::spawn(async move { w.write(put(i)).await })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.expect("join"), Ok(CommandResult::Put));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lone_writes_go_direct_and_concurrent_ones_share_entries() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (raft, data) = group(dir.path()).await;
        let writes = Arc::new(WriteBatcher::start(raft.clone()));

        // One write at a time: each is its own proposal.
        for i in 0..3 {
            assert_eq!(writes.write(put(i)).await, Ok(CommandResult::Put));
        }
        assert_eq!(writes.counts(), (3, 3));

        // Many at once: all answered, and (while a proposal is in flight) queued ones share.
        put_all(&writes, 3..259).await;
        let (proposals, carried) = writes.counts();
        assert_eq!(carried, 259);
        assert!(
            proposals < carried,
            "{proposals} proposals for {carried} writes: nothing was batched"
        );

        // Idle again: the next write goes alone, and everything is applied.
        assert_eq!(
            writes
                .write(Command::Delete {
                    key: b"k000".to_vec()
                })
                .await,
            Ok(CommandResult::Delete { existed: true })
        );
        assert_eq!(writes.counts(), (proposals + 1, carried + 1));
        assert_eq!(data.get(b"k000").expect("read"), None);
        assert_eq!(data.get(b"k258").expect("read"), Some(b"v258".to_vec()));
        raft.shutdown().await.expect("shutdown");
    }

    #[test]
    fn gathering_follows_long_rounds_of_several_writes_for_a_window() {
        let ended = Instant::now();
        let round = |writes, took_ms| Round {
            writes,
            took: Duration::from_millis(took_ms),
            ended,
        };
        let ms = Duration::from_millis;
        // Four writes over 8 ms: the next waits for 5 writes, until 6 ms after the round ended.
        assert_eq!(round(4, 8).gather(ended), Some((5, ended + ms(6))));
        assert_eq!(round(4, 8).gather(ended + ms(5)), Some((5, ended + ms(6))));
        assert_eq!(
            round(4, 8).gather(ended + ms(6)),
            None,
            "the window is over"
        );
        assert_eq!(
            round(1, 8).gather(ended),
            None,
            "a lone write asks for nothing"
        );
        assert_eq!(
            round(4, 1).gather(ended),
            None,
            "a short round asks for nothing"
        );
        assert_eq!(
            round(MAX_WRITES, 8).gather(ended).map(|(w, _)| w),
            Some(MAX_WRITES),
            "never more than a batch holds"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn while_gathering_writes_wait_for_company_until_the_window_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (raft, data) = group(dir.path()).await;
        let writes = Arc::new(WriteBatcher::start(raft.clone()));
        let window = Duration::from_secs(1);
        let long_round = || Round {
            writes: 4,
            took: window.div_f64(GATHER_WINDOW),
            ended: Instant::now(),
        };

        // Five writes at once after a long round of four: none goes direct, and they leave
        // together as soon as the fifth is there.
        writes.set_last_round(long_round());
        let started = Instant::now();
        put_all(&writes, 0..5).await;
        assert_eq!(writes.counts(), (1, 5), "one proposal for the five writes");
        assert!(started.elapsed() < window, "it did not wait for the window");

        // Two writes: they wait for company until the window ends, then leave together.
        writes.set_last_round(long_round());
        let started = Instant::now();
        put_all(&writes, 5..7).await;
        assert_eq!(writes.counts(), (2, 7));
        assert!(
            started.elapsed() >= window - Duration::from_millis(20),
            "they left after {:?}, before the window ended",
            started.elapsed()
        );
        assert_eq!(data.get(b"k006").expect("read"), Some(b"v6".to_vec()));

        // That round was short (no fsync here): the next write leaves at once (or, on a slow
        // machine, after gathering for a fraction of that round).
        let started = Instant::now();
        assert_eq!(writes.write(put(7)).await, Ok(CommandResult::Put));
        assert_eq!(writes.counts(), (3, 8));
        assert!(started.elapsed() < window);
        raft.shutdown().await.expect("shutdown");
    }
}
