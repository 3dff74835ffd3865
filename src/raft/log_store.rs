//! The Raft log and vote of every shard, kept in the node's one write-ahead log.
//!
//! Each shard's group gets a [`ShardLog`] (openraft's `RaftLogStorage`) backed by the shared
//! [`Wal`]: entries, votes, truncations and purges of all shards are records in one sequential
//! log, so one fsync (group commit) makes many shards' appends durable at once.
//!
//! Promises:
//! - `save_vote` returns only once the vote is on disk; on a follower, `append` reports
//!   completion to openraft only after the fsync that covers it. Because the WAL is sequential,
//!   a record that survives a crash implies every record before it survived too.
//! - On a shard's leader (a [`ShardLog`] made with [`ShardLog::leading_as`], whose vote is its
//!   own committed one), `append` reports completion at once and the fsync follows.
//! - Memory is bounded: positions of live entries are indexed, but only the newest
//!   [`CACHED_ENTRIES`] per shard are kept decoded; older ones are read back from the WAL.
//! - Segment files are removed once every shard has purged the entries in them; before that, a
//!   checkpoint record per shard restates its vote, committed and purged ids, so removal never
//!   loses them.
//!
//! # Why a leader reports its own append early
//!
//! openraft 0.9's core waits for `append` to complete before it sends the entries to the
//! followers, so a leader that waited for its fsync would put its disk and theirs in series (a
//! single-client write: 0.14 ms of leader fsync, then the followers' round trip with theirs).
//! Raft allows the leader's write to overlap replication (the Raft thesis, §10.2.1) provided
//! nothing *acts* on an entry before a majority holds it durably. Reporting early lets openraft
//! count the leader in the quorum that commits an entry before the leader's copy is durable, so
//! every effect of that commit waits for it instead:
//! - the leader applies an entry (and so answers its client, and serves reads of it) only once
//!   its own copy is durable ([`crate::raft::state_machine`] waits for it);
//! - followers are never told a commit index beyond the leader's durable log
//!   ([`LogManager::durable_commit`], applied to every AppendEntries by the network layer), so
//!   they cannot apply an entry that the leader might still lose;
//! - the `Committed` record follows the entries in the WAL, so a commit index that survives a
//!   crash implies the entries it covers did.
//!
//! If the leader loses power before its fsync, what it lost was neither applied anywhere nor
//! acknowledged, so the entries are merely uncommitted ones that a later leader may overwrite.
//! Followers keep the plain rule: their acknowledgement is what makes an entry durable on a
//! majority.
//!
//! That later leader must not be the same one in the same term. openraft restores a node whose
//! stored vote is its own committed one as leader of that term straight away; after a power
//! loss its log may end before entries it had already sent, and it would write new, different
//! entries under the same log ids. Followers holding the old ones take a matching log id for a
//! matching entry and keep them (Raft's log matching property broken): found by
//! `tests/crash.rs`, a follower that never applied acknowledged writes, and since found by
//! `tests/sim.rs` too (power losses after disk stalls). So a node's own log
//! ([`ShardLog::leading_as`]) reads back its own committed vote as the uncommitted vote of the
//! same term: the node starts as a follower, still bound by the vote it cast, and leads again
//! only by winning a later term, whose entries conflict with the lost ones and replace them.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, RaftLogReader};
use serde::{Deserialize, Serialize};

use super::{storage_err, Entry, LogId, NodeId, ShardId, StorageError, TypeConfig, Vote};
use crate::wal::{Wal, WalError, WalOptions, WalPos};

/// Decoded entries kept in memory per shard; older ones are re-read from disk on demand.
pub const CACHED_ENTRIES: usize = 4096;

#[derive(Serialize, Deserialize)]
enum Record {
    Entry {
        shard: ShardId,
        entry: Entry,
    },
    Vote {
        shard: ShardId,
        vote: Vote,
    },
    Committed {
        shard: ShardId,
        log_id: Option<LogId>,
    },
    /// Deletes entries with index >= since.
    Truncate {
        shard: ShardId,
        since: u64,
    },
    /// Deletes entries up to and including `upto`.
    Purge {
        shard: ShardId,
        upto: LogId,
    },
    /// Restates a shard's small state so older segments can be removed.
    Checkpoint {
        shard: ShardId,
        vote: Option<Vote>,
        committed: Option<LogId>,
        last_purged: Option<LogId>,
    },
}

struct Slot {
    pos: WalPos,
    log_id: LogId,
    cached: Option<Entry>,
}

#[derive(Default)]
struct ShardState {
    vote: Option<Vote>,
    committed: Option<LogId>,
    last_purged: Option<LogId>,
    entries: BTreeMap<u64, Slot>,
}

impl ShardState {
    fn insert(&mut self, pos: WalPos, entry: Entry) {
        let index = entry.log_id.index;
        // A new entry at `index` replaces any conflicting suffix (openraft truncates first, but
        // replay must be robust to either order).
        let _ = self.entries.split_off(&index);
        self.entries.insert(
            index,
            Slot {
                pos,
                log_id: entry.log_id,
                cached: Some(entry),
            },
        );
        if let Some(old) = index.checked_sub(CACHED_ENTRIES as u64) {
            if let Some(slot) = self.entries.get_mut(&old) {
                slot.cached = None;
            }
        }
    }

    fn purge(&mut self, upto: LogId) {
        let keep = self.entries.split_off(&(upto.index + 1));
        self.entries = keep;
        if self.last_purged.map_or(true, |p| p.index < upto.index) {
            self.last_purged = Some(upto);
        }
    }

    /// The index of the last log entry, or of the last purged one; 0 when there is neither.
    fn last_index(&self) -> u64 {
        let last = self.entries.last_key_value().map(|(i, _)| *i);
        last.or(self.last_purged.map(|l| l.index)).unwrap_or(0)
    }

    fn has_state(&self) -> bool {
        self.vote.is_some() || self.last_purged.is_some() || !self.entries.is_empty()
    }
}

/// All shards' logs over one WAL.
pub struct LogManager {
    wal: Wal,
    shards: Mutex<HashMap<ShardId, Arc<Mutex<ShardState>>>>,
    /// Segments before this one are already removed.
    gc_floor: Mutex<u64>,
}

impl LogManager {
    /// Opens the WAL and rebuilds every shard's log from it.
    pub fn open(opts: WalOptions) -> Result<Arc<LogManager>, WalError> {
        let mut states: HashMap<ShardId, ShardState> = HashMap::new();
        let wal = Wal::open(opts, |pos, bytes| {
            let rec: Record = bincode::deserialize(bytes)
                .map_err(|e| format!("undecodable record at {pos:?}: {e}"))?;
            match rec {
                Record::Entry { shard, entry } => {
                    states.entry(shard).or_default().insert(pos, entry)
                }
                Record::Vote { shard, vote } => states.entry(shard).or_default().vote = Some(vote),
                Record::Committed { shard, log_id } => {
                    states.entry(shard).or_default().committed = log_id
                }
                Record::Truncate { shard, since } => {
                    let _ = states.entry(shard).or_default().entries.split_off(&since);
                }
                Record::Purge { shard, upto } => states.entry(shard).or_default().purge(upto),
                Record::Checkpoint {
                    shard,
                    vote,
                    committed,
                    last_purged,
                } => {
                    let s = states.entry(shard).or_default();
                    s.vote = vote;
                    s.committed = committed;
                    if let Some(p) = last_purged {
                        s.purge(p);
                    }
                }
            }
            Ok(())
        })?;
        let shards = states
            .into_iter()
            .map(|(k, v)| (k, Arc::new(Mutex::new(v))))
            .collect();
        Ok(Arc::new(LogManager {
            wal,
            shards: Mutex::new(shards),
            gc_floor: Mutex::new(0),
        }))
    }

    /// The log store of one shard (created empty if the WAL has nothing for it).
    pub fn shard(self: &Arc<Self>, shard: ShardId) -> ShardLog {
        let state = lock(&self.shards).entry(shard).or_default().clone();
        ShardLog {
            shard,
            state,
            mgr: self.clone(),
            me: None,
        }
    }

    /// Shards that have any Raft state on this node, each with the index of its last log entry
    /// (or of the last purged one; 0 when it holds only a vote).
    pub fn shard_log_states(&self) -> Vec<(ShardId, u64)> {
        let mut v: Vec<(ShardId, u64)> = lock(&self.shards)
            .iter()
            .filter_map(|(k, s)| {
                let s = lock(s);
                s.has_state().then(|| (*k, s.last_index()))
            })
            .collect();
        v.sort_unstable();
        v
    }

    /// The index of `shard`'s last log entry on this node (or of the last purged one; 0 if none).
    pub fn last_index(&self, shard: ShardId) -> u64 {
        let state = lock(&self.shards).get(&shard).cloned();
        state.map_or(0, |s| lock(&s).last_index())
    }

    /// Shards that have any Raft state on this node.
    pub fn shards_with_state(&self) -> Vec<ShardId> {
        let states = self.shard_log_states().into_iter();
        states.map(|(shard, _)| shard).collect()
    }

    /// Seeds an empty shard log as "purged up to `upto`" with `vote`: the log half of installing
    /// a recovered snapshot before the shard's Raft group starts.
    pub async fn seed(
        self: &Arc<Self>,
        shard: ShardId,
        vote: Option<Vote>,
        upto: LogId,
    ) -> Result<(), WalError> {
        let log = self.shard(shard);
        let rec = {
            let mut s = lock(&log.state);
            s.entries.clear();
            s.purge(upto);
            s.vote = vote;
            s.committed = Some(upto);
            Record::Checkpoint {
                shard,
                vote: s.vote,
                committed: s.committed,
                last_purged: s.last_purged,
            }
        };
        self.wal.append(&[&encode(&rec)])?;
        self.wal.sync().await
    }

    pub fn wal(&self) -> &Wal {
        &self.wal
    }

    /// Whether `shard`'s log entry `log_id` is known to be durable in the WAL, and with it every
    /// record logged before it (the WAL is sequential). `false` when not known: the flush that
    /// covers it has not completed, or the entry is not (or no longer) in the index.
    pub fn is_durable(&self, shard: ShardId, log_id: LogId) -> bool {
        self.position(shard, log_id)
            .is_some_and(|pos| self.wal.is_durable(pos))
    }

    /// Where `shard`'s entry `log_id` is in the WAL, if it is in the index.
    fn position(&self, shard: ShardId, log_id: LogId) -> Option<WalPos> {
        let state = lock(&self.shards).get(&shard).cloned()?;
        let s = lock(&state);
        s.entries
            .get(&log_id.index)
            .filter(|slot| slot.log_id == log_id)
            .map(|slot| slot.pos)
    }

    /// The commit index a leader may tell its followers: `committed` if this node holds that
    /// entry durably, else the last entry before it that it does (purged entries are durable:
    /// they were applied first). See the module docs for why followers must not learn more.
    pub fn durable_commit(&self, shard: ShardId, committed: Option<LogId>) -> Option<LogId> {
        let committed = committed?;
        let state = lock(&self.shards).get(&shard).cloned()?;
        let s = lock(&state);
        for (_, slot) in s.entries.range(..=committed.index).rev() {
            if self.wal.is_durable(slot.pos) {
                // Entries up to `committed` in this log are the committed ones, and a durable
                // one's predecessors are durable too.
                return Some(slot.log_id);
            }
        }
        s.last_purged.filter(|p| p.index <= committed.index)
    }

    /// Waits until `shard`'s entry `log_id` (and everything logged before it) is durable,
    /// riding on a flush already under way when there is one.
    pub async fn sync_entry(&self, shard: ShardId, log_id: LogId) -> Result<(), WalError> {
        match self.position(shard, log_id) {
            Some(pos) => self.wal.sync_upto(pos).await,
            None => self.wal.sync().await,
        }
    }

    /// Removes WAL segments no shard needs any more.
    async fn gc(&self) -> Result<(), WalError> {
        let shards: Vec<(ShardId, Arc<Mutex<ShardState>>)> = lock(&self.shards)
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        let mut oldest_needed = self.wal.next_pos();
        for (_, s) in &shards {
            if let Some((_, slot)) = lock(s).entries.first_key_value() {
                oldest_needed = oldest_needed.min(slot.pos);
            }
        }
        if oldest_needed.segment <= *lock(&self.gc_floor) {
            return Ok(());
        }
        // Restate every shard's small state after the segments we are about to drop.
        let recs: Vec<Vec<u8>> = shards
            .iter()
            .map(|(shard, s)| {
                let s = lock(s);
                encode(&Record::Checkpoint {
                    shard: *shard,
                    vote: s.vote,
                    committed: s.committed,
                    last_purged: s.last_purged,
                })
            })
            .collect();
        let refs: Vec<&[u8]> = recs.iter().map(|r| r.as_slice()).collect();
        self.wal.append(&refs)?;
        self.wal.sync().await?;
        let removed = self.wal.remove_segments_before(oldest_needed)?;
        *lock(&self.gc_floor) = oldest_needed.segment;
        if removed > 0 {
            tracing::debug!(
                removed,
                before = oldest_needed.segment,
                "removed WAL segments"
            );
        }
        Ok(())
    }
}

/// One shard's view of the log: openraft's log storage and log reader.
#[derive(Clone)]
pub struct ShardLog {
    shard: ShardId,
    state: Arc<Mutex<ShardState>>,
    mgr: Arc<LogManager>,
    /// This node, if appends made while it leads may be reported before their fsync.
    me: Option<NodeId>,
}

impl ShardLog {
    /// Lets appends made while `me` leads the shard report completion before their fsync (module
    /// docs). Only for a node whose network layer clamps commit indexes with
    /// [`LogManager::durable_commit`] and whose state machine waits for durability to apply.
    ///
    /// Made when the shard's Raft group starts: a stored vote that is `me`'s own committed one
    /// is read back uncommitted, so the group does not resume leading the term whose unsynced
    /// entries a power loss may have cut off (module docs).
    pub fn leading_as(mut self, me: NodeId) -> Self {
        {
            let mut s = lock(&self.state);
            if let Some(v) = s.vote.filter(|v| own_committed(v, me)) {
                s.vote = Some(Vote::new(v.leader_id().term, me));
            }
        }
        self.me = Some(me);
        self
    }

    /// Whether the stored vote is `me`'s own committed one: entries appended now are its own
    /// as leader (a follower stores its leader's vote before appending what it sends).
    fn leading(&self) -> bool {
        let Some(me) = self.me else {
            return false;
        };
        lock(&self.state)
            .vote
            .is_some_and(|v| own_committed(&v, me))
    }
}

/// Whether `vote` is `me`'s own as an elected leader.
fn own_committed(vote: &Vote, me: NodeId) -> bool {
    vote.is_committed() && vote.leader_id().voted_for() == Some(me)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic while holding it; the data is plain state, keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn encode(rec: &Record) -> Vec<u8> {
    // Our own serde types always serialize into a Vec.
    bincode::serialize(rec).unwrap_or_default()
}

fn write_err(e: impl std::fmt::Display) -> StorageError {
    storage_err(ErrorSubject::Logs, ErrorVerb::Write, e)
}

fn read_err(e: impl std::fmt::Display) -> StorageError {
    storage_err(ErrorSubject::Logs, ErrorVerb::Read, e)
}

impl ShardLog {
    /// Buffers entries in the WAL and the index; durable only after the next WAL flush.
    pub(crate) fn append_entries(
        &self,
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<(), StorageError> {
        let mut encoded = Vec::new();
        for entry in entries {
            let rec = Record::Entry {
                shard: self.shard,
                entry,
            };
            let buf = encode(&rec);
            if let Record::Entry { entry, .. } = rec {
                encoded.push((buf, entry));
            }
        }
        let refs: Vec<&[u8]> = encoded.iter().map(|(b, _)| b.as_slice()).collect();
        // Hold the shard's lock across the WAL append so index order is log order.
        let mut s = lock(&self.state);
        let positions = self.mgr.wal.append(&refs).map_err(write_err)?;
        if positions.len() != encoded.len() {
            return Err(write_err("WAL returned fewer positions than records"));
        }
        for ((_, entry), pos) in encoded.into_iter().zip(positions) {
            s.insert(pos, entry);
        }
        Ok(())
    }

    fn append_records(&self, recs: &[Record]) -> Result<Vec<WalPos>, StorageError> {
        let bufs: Vec<Vec<u8>> = recs.iter().map(encode).collect();
        let refs: Vec<&[u8]> = bufs.iter().map(|b| b.as_slice()).collect();
        self.mgr.wal.append(&refs).map_err(write_err)
    }
}

impl RaftLogReader<TypeConfig> for ShardLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let s = lock(&self.state);
        let mut out = Vec::new();
        for (_, slot) in s.entries.range(range) {
            match &slot.cached {
                Some(e) => out.push(e.clone()),
                None => {
                    let bytes = self.mgr.wal.read(slot.pos).map_err(read_err)?;
                    match bincode::deserialize::<Record>(&bytes) {
                        Ok(Record::Entry { entry, .. }) if entry.log_id == slot.log_id => {
                            out.push(entry)
                        }
                        Ok(_) => {
                            return Err(read_err(format!(
                                "WAL record at {:?} is not entry {}",
                                slot.pos, slot.log_id
                            )))
                        }
                        Err(e) => return Err(read_err(e)),
                    }
                }
            }
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for ShardLog {
    type LogReader = ShardLog;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let s = lock(&self.state);
        let last = s.entries.last_key_value().map(|(_, slot)| slot.log_id);
        Ok(LogState {
            last_purged_log_id: s.last_purged,
            last_log_id: last.or(s.last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.append_records(&[Record::Vote {
            shard: self.shard,
            vote: *vote,
        }])?;
        lock(&self.state).vote = Some(*vote);
        self.mgr
            .wal
            .sync()
            .await
            .map_err(|e| storage_err(ErrorSubject::Vote, ErrorVerb::Write, e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(lock(&self.state).vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        // No fsync: losing it only means re-learning the commit index from the leader.
        self.append_records(&[Record::Committed {
            shard: self.shard,
            log_id: committed,
        }])?;
        lock(&self.state).committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(lock(&self.state).committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        self.append_entries(entries)?;
        if self.leading() {
            // Reported before the fsync: see "Why a leader reports its own append early".
            callback.log_io_completed(Ok(()));
            // The round that makes them durable; a failure poisons the WAL, and whoever waits
            // for these entries (the state machine) gets the error.
            self.mgr.wal.flush(Box::new(|_| {}));
        } else {
            // A follower's core has nothing to do for this shard until the entries are durable:
            // when the WAL is idle it syncs them here, without the flusher's two hand-offs.
            self.mgr.wal.flush_here_when_idle(Box::new(move |r| {
                callback.log_io_completed(r.map_err(|e| std::io::Error::other(e.to_string())))
            }));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.append_records(&[Record::Truncate {
            shard: self.shard,
            since: log_id.index,
        }])?;
        let _ = lock(&self.state).entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.append_records(&[Record::Purge {
            shard: self.shard,
            upto: log_id,
        }])?;
        lock(&self.state).purge(log_id);
        self.mgr.gc().await.map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};

    use super::*;
    use crate::raft::Command;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(Command::Put {
                key: format!("k{index}").into_bytes(),
                value: vec![7u8; 100],
            }),
        }
    }

    fn opts(dir: &std::path::Path) -> WalOptions {
        WalOptions {
            dir: dir.join("wal"),
            segment_bytes: 16 * 1024,
            fsync: false,
            inline_flush: false,
        }
    }

    fn segments(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("wal"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// An entry is known durable once a flush covering it completed, and only the entry that
    /// was logged: not a later one, not another entry at the same index, not another shard's.
    #[tokio::test]
    async fn entries_are_known_durable_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = LogManager::open(opts(dir.path())).unwrap();
        let log = mgr.shard(0);
        log.append_entries([entry(1), entry(2)]).unwrap();
        assert!(!mgr.is_durable(0, entry(2).log_id), "not flushed yet");
        mgr.wal().sync().await.unwrap();
        assert!(mgr.is_durable(0, entry(1).log_id));
        assert!(mgr.is_durable(0, entry(2).log_id));
        log.append_entries([entry(3)]).unwrap();
        assert!(
            !mgr.is_durable(0, entry(3).log_id),
            "appended after the flush"
        );
        assert!(mgr.is_durable(0, entry(2).log_id));
        let other_leader = LogId::new(CommittedLeaderId::new(2, 1), 2);
        assert!(!mgr.is_durable(0, other_leader), "not the entry at index 2");
        assert!(!mgr.is_durable(1, entry(1).log_id), "no such shard");
        assert!(!mgr.is_durable(0, entry(9).log_id), "no such entry");
        mgr.wal().sync().await.unwrap();
        assert!(mgr.is_durable(0, entry(3).log_id));
    }

    /// Followers are told no commit index beyond what the leader holds durably: the committed
    /// entry if it is durable, else the last durable one before it, else the purge mark.
    #[tokio::test]
    async fn followers_learn_only_a_durable_commit() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = LogManager::open(opts(dir.path())).unwrap();
        let id = |i| entry(i).log_id;
        // A shard rebuilt from a snapshot up to 10 (its entries up to there are purged).
        mgr.seed(0, None, id(10)).await.unwrap();
        let log = mgr.shard(0);
        log.append_entries([entry(11), entry(12)]).unwrap();
        assert_eq!(mgr.durable_commit(0, Some(id(12))), Some(id(10)));
        assert_eq!(mgr.durable_commit(0, None), None);
        mgr.wal().sync().await.unwrap();
        assert_eq!(mgr.durable_commit(0, Some(id(12))), Some(id(12)));
        log.append_entries([entry(13), entry(14)]).unwrap();
        assert_eq!(mgr.durable_commit(0, Some(id(14))), Some(id(12)));
        assert_eq!(mgr.durable_commit(0, Some(id(11))), Some(id(11)));
        assert_eq!(mgr.durable_commit(1, Some(id(14))), None, "no such shard");
        mgr.sync_entry(0, id(14)).await.unwrap();
        assert_eq!(mgr.durable_commit(0, Some(id(14))), Some(id(14)));
    }

    /// Only appends made under this node's own committed vote may be reported before the fsync.
    #[tokio::test]
    async fn a_log_leads_only_under_its_own_committed_vote() {
        let dir = tempfile::tempdir().unwrap();
        let mgr = LogManager::open(opts(dir.path())).unwrap();
        let mut plain = mgr.shard(0);
        let mut mine = mgr.shard(1).leading_as(1);
        assert!(!mine.leading(), "no vote yet");
        mine.save_vote(&Vote::new(3, 1)).await.unwrap();
        assert!(!mine.leading(), "a candidate's vote is not a leader's");
        mine.save_vote(&Vote::new_committed(4, 2)).await.unwrap();
        assert!(!mine.leading(), "following node 2");
        mine.save_vote(&Vote::new_committed(5, 1)).await.unwrap();
        assert!(mine.leading());
        plain.save_vote(&Vote::new_committed(5, 1)).await.unwrap();
        assert!(!plain.leading(), "not made with leading_as");
    }

    /// A leader's own committed vote comes back from disk uncommitted (same term, same
    /// candidate), so a restarted leader must win a later term before it leads again; anyone
    /// else's committed vote, and the vote as other readers see it, come back as stored.
    #[tokio::test]
    async fn a_restarted_leader_reads_its_own_vote_back_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mgr = LogManager::open(opts(dir.path())).unwrap();
            let mut mine = mgr.shard(0).leading_as(1);
            mine.save_vote(&Vote::new_committed(7, 1)).await.unwrap();
            mine.append_entries(vec![entry(1)]).unwrap();
            assert!(mine.leading());
            mgr.shard(1)
                .leading_as(1)
                .save_vote(&Vote::new_committed(4, 2))
                .await
                .unwrap();
            mgr.wal().close();
        }
        let mgr = LogManager::open(opts(dir.path())).unwrap();
        let mut mine = mgr.shard(0).leading_as(1);
        assert_eq!(mine.read_vote().await.unwrap(), Some(Vote::new(7, 1)));
        assert!(!mine.leading(), "leads only after winning a later term");
        assert_eq!(
            mine.get_log_state().await.unwrap().last_log_id,
            Some(entry(1).log_id)
        );
        mine.save_vote(&Vote::new_committed(8, 1)).await.unwrap();
        assert!(mine.leading());
        let mut following = mgr.shard(1).leading_as(1);
        assert_eq!(
            following.read_vote().await.unwrap(),
            Some(Vote::new_committed(4, 2))
        );

        let dir = tempfile::tempdir().unwrap();
        {
            let mgr = LogManager::open(opts(dir.path())).unwrap();
            let mut log = mgr.shard(0).leading_as(1);
            log.save_vote(&Vote::new_committed(7, 1)).await.unwrap();
            mgr.wal().close();
        }
        let mgr = LogManager::open(opts(dir.path())).unwrap();
        assert_eq!(
            mgr.shard(0).read_vote().await.unwrap(),
            Some(Vote::new_committed(7, 1)),
            "stored as it was; only the leader's own Raft group reads it demoted"
        );
    }

    /// Several shards interleaved in one WAL: after purges, old segments go away, yet votes,
    /// purge marks and the remaining entries (including ones only on disk) survive a reopen.
    #[tokio::test]
    async fn shards_share_the_wal_and_gc_keeps_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let n = (CACHED_ENTRIES + 1000) as u64;
        {
            let mgr = LogManager::open(opts(dir.path())).unwrap();
            let (mut a, mut b) = (mgr.shard(0), mgr.shard(1));
            a.save_vote(&Vote::new(3, 0)).await.unwrap();
            b.save_vote(&Vote::new(5, 2)).await.unwrap();
            for i in 1..=n {
                a.append_entries([entry(i)]).unwrap();
                b.append_entries([entry(i)]).unwrap();
            }
            mgr.wal().sync().await.unwrap();
            let before = segments(dir.path());
            assert!(before > 20, "small segments: {before}");
            a.purge(LogId::new(CommittedLeaderId::new(1, 0), n - 100))
                .await
                .unwrap();
            // Shard 1 still needs everything: nothing can be removed yet.
            assert_eq!(segments(dir.path()), before);
            b.purge(LogId::new(CommittedLeaderId::new(1, 0), n - 2000))
                .await
                .unwrap();
            let after = segments(dir.path());
            assert!(after < before / 2, "segments {before} -> {after}");
            a.truncate(LogId::new(CommittedLeaderId::new(1, 0), n - 10))
                .await
                .unwrap();
            mgr.wal().sync().await.unwrap();
        }
        let mgr = LogManager::open(opts(dir.path())).unwrap();
        let (mut a, mut b) = (mgr.shard(0), mgr.shard(1));
        assert_eq!(a.read_vote().await.unwrap(), Some(Vote::new(3, 0)));
        assert_eq!(b.read_vote().await.unwrap(), Some(Vote::new(5, 2)));
        let sa = a.get_log_state().await.unwrap();
        assert_eq!(sa.last_purged_log_id.map(|l| l.index), Some(n - 100));
        assert_eq!(sa.last_log_id.map(|l| l.index), Some(n - 11));
        let sb = b.get_log_state().await.unwrap();
        assert_eq!(sb.last_purged_log_id.map(|l| l.index), Some(n - 2000));
        assert_eq!(sb.last_log_id.map(|l| l.index), Some(n));
        // Older than the cache window: read back from the WAL files.
        let got = b.try_get_log_entries(n - 1999..n - 1995).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            (n - 1999..n - 1995).collect::<Vec<_>>()
        );
        assert_eq!(got[0], entry(n - 1999));
        assert_eq!(mgr.shards_with_state(), vec![0, 1]);
    }
}
