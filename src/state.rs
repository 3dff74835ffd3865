//! The shards' data: one sled tree per shard, holding the user's keys and the shard's applied
//! state.
//!
//! Promises:
//! - The tree's content is the result of applying the log up to the recorded applied log id, or a
//!   fuzzy state at or after it (see [`crate::raft`]): [`ShardData::apply`] writes the ops first
//!   and the record last, and sled recovers a prefix of its writes after a crash (its log is
//!   read back up to the first missing or torn message; the atomic batches used before relied on
//!   the same property from one batch to the next); right after a snapshot install too.
//! - sled flushes lazily (only when a snapshot is built), so after a crash the tree may be behind
//!   the WAL; the node then replays the WAL from the recorded applied index. Nothing is ever
//!   acknowledged on sled alone.
//! - A snapshot install is atomic: it fills a fresh tree (a new *generation*) and only then swaps
//!   the shard's generation pointer, so a crash mid-install leaves the old state intact.
//!
//! Layout: tree `shard-<id>-g<gen>` holds user key `k` as `b"d" + k` and the applied state under
//! `b"m/applied"`; the `meta` tree holds `gen/<id>` (the live generation) and `snap/<id>` (the
//! last snapshot's meta).

use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::raft::{LogId, ShardId, SnapshotMeta, StoredMembership};

const DATA_PREFIX: &[u8] = b"d";
const APPLIED_KEY: &[u8] = b"m/applied";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt state record {what}: {reason}")]
    Corrupt { what: String, reason: String },
}

/// What a shard's tree says about how far it has applied the log.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Applied {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    /// After a fuzzy snapshot install the tree may hold writes up to this index; stale reads wait
    /// until the shard has applied at least this far, so they never go back in time.
    pub consistent_from: u64,
}

/// How a node configures sled for its data in `dir` (public for tests/measure.rs).
pub fn sled_config(dir: &Path) -> sled::Config {
    sled::Config::new()
        .path(dir)
        .mode(sled::Mode::HighThroughput)
        // No timed flushes: the WAL holds everything since the last snapshot, and building a
        // snapshot flushes (a crash only means a longer replay).
        .flush_every_ms(None)
}

/// The node's sled database.
#[derive(Clone)]
pub struct StateDb {
    db: sled::Db,
    meta: sled::Tree,
}

impl StateDb {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let db = sled_config(dir).open()?;
        let meta = db.open_tree("meta")?;
        Ok(StateDb { db, meta })
    }

    /// Opens shard `shard`'s live tree and drops leftovers of an interrupted install.
    pub fn shard(&self, shard: ShardId) -> Result<Arc<ShardData>, StateError> {
        let gen = match self.meta.get(gen_key(shard))? {
            Some(v) => decode::<u64>(&v, "generation")?,
            None => 0,
        };
        let live = tree_name(shard, gen);
        let prefix = format!("shard-{shard}-g");
        for name in self.db.tree_names() {
            if name.starts_with(prefix.as_bytes()) && name.as_ref() != live.as_bytes() {
                self.db.drop_tree(&name)?;
            }
        }
        let tree = self.db.open_tree(&live)?;
        Ok(Arc::new(ShardData {
            shard,
            db: self.clone(),
            live: RwLock::new(Live {
                tree,
                gen,
                floor: None,
            }),
        }))
    }

    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush()?;
        Ok(())
    }

    /// Marks shard `shard` as rebuilt after a disk loss and not yet caught up (durably).
    pub fn set_recovering(&self, shard: ShardId, on: bool) -> Result<(), StateError> {
        let key = format!("recovering/{shard}").into_bytes();
        if on {
            self.meta.insert(key, &[1u8])?;
        } else {
            self.meta.remove(key)?;
        }
        self.meta.flush()?;
        Ok(())
    }

    pub fn is_recovering(&self, shard: ShardId) -> Result<bool, StateError> {
        Ok(self
            .meta
            .contains_key(format!("recovering/{shard}").into_bytes())?)
    }

    /// Whether any shard has state in this database.
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty() && self.db.tree_names().len() <= 2
    }
}

struct Live {
    tree: sled::Tree,
    gen: u64,
    /// What the tree's applied record says, for the read path; `None` until first needed.
    /// Updated after every write of the record (never ahead of the tree), and together with
    /// `tree` on an install.
    floor: Option<ReadFloor>,
}

/// The two numbers of a shard's [`Applied`] record that reads need, kept in memory so the read
/// path does not decode the record from sled on every request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadFloor {
    /// Index of the last applied entry (0: none).
    pub applied_index: u64,
    /// See [`Applied::consistent_from`].
    pub consistent_from: u64,
}

impl From<&Applied> for ReadFloor {
    fn from(a: &Applied) -> Self {
        ReadFloor {
            applied_index: a.last_applied.map_or(0, |l| l.index),
            consistent_from: a.consistent_from,
        }
    }
}

/// One shard's data, shared by its state machine (writer) and the read path.
pub struct ShardData {
    pub shard: ShardId,
    db: StateDb,
    live: RwLock<Live>,
}

/// A command's effect, as the state machine hands it to [`ShardData::apply`].
pub enum Op<'a> {
    Put(&'a [u8], &'a [u8]),
    Delete(&'a [u8]),
}

impl ShardData {
    fn tree(&self) -> sled::Tree {
        // A poisoned lock only means a panic elsewhere; the tree handle itself is still valid.
        match self.live.read() {
            Ok(l) => l.tree.clone(),
            Err(p) => p.into_inner().tree.clone(),
        }
    }

    /// The applied record, decoded from the tree.
    pub fn applied(&self) -> Result<Applied, StateError> {
        match self.tree().get(APPLIED_KEY)? {
            Some(v) => decode(&v, "applied"),
            None => Ok(Applied::default()),
        }
    }

    /// [`ReadFloor`] of the applied record, from memory (decoded once). It may lag the tree by
    /// the write in progress, never lead it.
    pub fn read_floor(&self) -> Result<ReadFloor, StateError> {
        if let Some(f) = self.live_read().floor {
            return Ok(f);
        }
        let floor = ReadFloor::from(&self.applied()?);
        let mut live = self.live_write();
        // Set by a write meanwhile: that one is newer (and may belong to a newly installed tree).
        Ok(*live.floor.get_or_insert(floor))
    }

    /// Sets what the read path sees of the applied record (the state machine, when it knows more
    /// than the record on disk says).
    pub fn set_floor(&self, applied: &Applied) {
        self.live_write().floor = Some(ReadFloor::from(applied));
    }

    fn live_read(&self) -> std::sync::RwLockReadGuard<'_, Live> {
        // A poisoned lock only means a panic elsewhere; the fields are still valid.
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    fn live_write(&self) -> std::sync::RwLockWriteGuard<'_, Live> {
        self.live.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self.tree().get(data_key(key))?.map(|v| v.to_vec()))
    }

    /// Applies `ops` in order, then records the new applied state (not atomically: see the
    /// module header). Returns, for each delete, whether the key existed (in op order, `None` for
    /// puts).
    pub fn apply(
        &self,
        ops: &[Op<'_>],
        applied: &Applied,
    ) -> Result<Vec<Option<bool>>, StateError> {
        let tree = self.tree();
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put(k, v) => {
                    tree.insert(data_key(k), *v)?;
                    out.push(None);
                }
                Op::Delete(k) => out.push(Some(tree.remove(data_key(k))?.is_some())),
            }
        }
        tree.insert(APPLIED_KEY, encode(applied))?;
        self.set_floor(applied);
        Ok(out)
    }

    /// Records a new applied state without data changes (blank and membership entries).
    pub fn set_applied(&self, applied: &Applied) -> Result<(), StateError> {
        self.tree().insert(APPLIED_KEY, encode(applied))?;
        self.set_floor(applied);
        Ok(())
    }

    /// Iterates the user data from `after` (exclusive), in key order. Not point-in-time: see the
    /// fuzzy-snapshot argument in [`crate::raft`].
    pub fn scan_from(
        &self,
        after: Option<&[u8]>,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StateError>> {
        let tree = self.tree();
        let start = match after {
            Some(k) => std::ops::Bound::Excluded(data_key(k)),
            None => std::ops::Bound::Included(DATA_PREFIX.to_vec()),
        };
        tree.range::<Vec<u8>, _>((start, std::ops::Bound::Excluded(b"e".to_vec())))
            .map(|r| {
                let (k, v) = r?;
                Ok((k[DATA_PREFIX.len()..].to_vec(), v.to_vec()))
            })
    }

    /// Number of user keys (a full scan; for logs and tests).
    pub fn key_count(&self) -> usize {
        self.tree().scan_prefix(DATA_PREFIX).count()
    }

    pub fn last_snapshot(&self) -> Result<Option<SnapshotMeta>, StateError> {
        match self.db.meta.get(snap_key(self.shard))? {
            Some(v) => Ok(Some(decode(&v, "snapshot meta")?)),
            None => Ok(None),
        }
    }

    /// Records the last snapshot's meta, durably: openraft purges the log up to (a little
    /// before) it right after, and after a crash the meta must not be older than that purge
    /// (openraft refuses such a state; the node's start-up cross-check would too).
    pub fn save_snapshot_meta(&self, meta: &SnapshotMeta) -> Result<(), StateError> {
        self.db.meta.insert(snap_key(self.shard), encode(meta))?;
        self.db.meta.flush()?;
        Ok(())
    }

    pub fn flush(&self) -> Result<(), StateError> {
        self.db.flush()
    }

    /// Starts an install: a new, empty generation tree that nobody reads yet.
    pub fn begin_install(&self) -> Result<Staging, StateError> {
        let gen = match self.live.read() {
            Ok(l) => l.gen,
            Err(p) => p.into_inner().gen,
        } + 1;
        let name = tree_name(self.shard, gen);
        self.db.db.drop_tree(name.as_bytes())?;
        let tree = self.db.db.open_tree(name.as_bytes())?;
        Ok(Staging {
            tree,
            gen,
            keys: 0,
            bytes: 0,
        })
    }

    /// Makes a filled staging tree the shard's live state, durably, then drops the old one.
    ///
    /// The snapshot meta (`applied`'s log id and membership) is recorded in the same flush as the
    /// generation switch: otherwise a crash right after could leave the shard applied beyond both
    /// its log and its last snapshot, which looks exactly like a WAL that lost entries. Callers
    /// may save a meta with their own snapshot id afterwards.
    pub fn finish_install(&self, staging: Staging, applied: &Applied) -> Result<(), StateError> {
        staging.tree.insert(APPLIED_KEY, encode(applied))?;
        staging.tree.flush()?;
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id: crate::raft::state_machine::snapshot_id(applied.last_applied),
        };
        self.db.meta.insert(snap_key(self.shard), encode(&meta))?;
        self.db
            .meta
            .insert(gen_key(self.shard), encode(&staging.gen))?;
        self.db.meta.flush()?;
        let old = {
            let mut live = match self.live.write() {
                Ok(l) => l,
                Err(p) => p.into_inner(),
            };
            let old = tree_name(self.shard, live.gen);
            live.tree = staging.tree;
            live.gen = staging.gen;
            live.floor = Some(ReadFloor::from(applied));
            old
        };
        self.db.db.drop_tree(old.as_bytes())?;
        Ok(())
    }
}

/// A snapshot being received into a fresh tree.
pub struct Staging {
    tree: sled::Tree,
    gen: u64,
    pub keys: u64,
    pub bytes: u64,
}

impl Staging {
    /// Adds received pairs. One insert each, not one sled batch: nobody reads this tree before
    /// the install swaps it in (a crash before that discards it), so atomicity buys nothing, and
    /// sled's batches cost a sorted copy and a sealed I/O buffer each (a wiped node's 1M-key
    /// rebuild: 58 MB/s with batches, 93 MB/s without).
    ///
    /// Pairs in ascending key order (what a peer's scan sends) are inserted in two passes, see
    /// [`fill_order`]; any other batch in its own order, so that a repeated key's last value wins.
    pub fn put_batch<K: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        pairs: &[(K, V)],
    ) -> Result<(), StateError> {
        let ascending = pairs.windows(2).all(|w| w[0].0.as_ref() < w[1].0.as_ref());
        let mut key = Vec::new();
        let mut put = |(k, v): &(K, V)| -> Result<(), StateError> {
            let (k, v) = (k.as_ref(), v.as_ref());
            key.clear();
            push_data_key(&mut key, k);
            self.tree.insert(key.as_slice(), v)?;
            self.keys += 1;
            self.bytes += (k.len() + v.len()) as u64;
            Ok(())
        };
        if ascending {
            fill_order(pairs.len()).try_for_each(|i| put(&pairs[i]))
        } else {
            pairs.iter().try_for_each(put)
        }
    }
}

/// Keys a sled 0.34 leaf holds before it splits: it splits once it holds more, keeping the
/// first `LEAF_KEYS / 2 + 1` on the left.
const LEAF_KEYS: usize = 16;

/// The order in which to insert `n` ascending keys into a fresh sled tree so that its leaves end
/// up full. (Public for the measurement in tests/measure.rs.)
///
/// Inserted in key order, every leaf splits as soon as it is full and keeps the lower 9 keys of
/// 17: the finished tree has leaves 9/16 full, and one split (sled's costliest step, 28 % of a
/// rebuilt node's CPU) per 9 keys. Instead, of every 16 consecutive keys the first pass inserts
/// 9 (the even offsets and the last), whose splits leave each leaf with 9 of them spanning one
/// such group, and the second pass adds the other 7 into the gaps, filling each leaf to exactly
/// 16 without a split: 16 keys per leaf and per split. (Wherever the leaf boundaries fall, 9
/// consecutive first-pass keys and the gaps after them span one whole period of the pattern.)
pub fn fill_order(n: usize) -> impl Iterator<Item = usize> {
    let first = |i: &usize| {
        let o = i % LEAF_KEYS;
        o % 2 == 0 || o == LEAF_KEYS - 1
    };
    (0..n)
        .filter(first)
        .chain((0..n).filter(move |i| !first(i)))
}

fn data_key(k: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(DATA_PREFIX.len() + k.len());
    push_data_key(&mut v, k);
    v
}

/// Appends the tree key under which user key `k` is stored.
fn push_data_key(buf: &mut Vec<u8>, k: &[u8]) {
    buf.extend_from_slice(DATA_PREFIX);
    buf.extend_from_slice(k);
}

fn tree_name(shard: ShardId, gen: u64) -> String {
    format!("shard-{shard}-g{gen}")
}

fn gen_key(shard: ShardId) -> Vec<u8> {
    format!("gen/{shard}").into_bytes()
}

fn snap_key(shard: ShardId) -> Vec<u8> {
    format!("snap/{shard}").into_bytes()
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing our own plain structs into a Vec cannot fail.
    bincode::serialize(v).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(b: &[u8], what: &str) -> Result<T, StateError> {
    bincode::deserialize(b).map_err(|e| StateError::Corrupt {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn applied(index: u64, consistent_from: u64) -> Applied {
        Applied {
            last_applied: Some(LogId::new(CommittedLeaderId::new(1, 0), index)),
            consistent_from,
            ..Default::default()
        }
    }

    /// The in-memory read floor follows every write of the applied record, an install swaps it
    /// with the tree, and a reopened shard reads the same floor back from sled.
    #[test]
    fn read_floor_follows_the_applied_record() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let data = db.shard(3).unwrap();
        assert_eq!(data.read_floor().unwrap(), ReadFloor::default());
        data.apply(&[Op::Put(b"k", b"v")], &applied(5, 0)).unwrap();
        let floor = |i, c| ReadFloor {
            applied_index: i,
            consistent_from: c,
        };
        assert_eq!(data.read_floor().unwrap(), floor(5, 0));
        data.set_applied(&applied(6, 0)).unwrap();
        assert_eq!(data.read_floor().unwrap(), floor(6, 0));
        let mut staging = data.begin_install().unwrap();
        staging
            .put_batch(&[(b"k".to_vec(), b"w".to_vec())])
            .unwrap();
        assert_eq!(data.read_floor().unwrap(), floor(6, 0), "not swapped yet");
        data.finish_install(staging, &applied(7, 9)).unwrap();
        assert_eq!(data.read_floor().unwrap(), floor(7, 9));
        assert_eq!(data.get(b"k").unwrap().as_deref(), Some(&b"w"[..]));
        drop(data);
        let reopened = db.shard(3).unwrap();
        assert_eq!(reopened.read_floor().unwrap(), floor(7, 9));
    }

    /// `fill_order` visits every index exactly once, whatever the batch's length.
    #[test]
    fn fill_order_is_a_permutation() {
        for n in [0, 1, 2, 15, 16, 17, 31, 33, 100, 3855, 4096] {
            let mut seen: Vec<usize> = fill_order(n).collect();
            assert_eq!(seen.len(), n, "n = {n}");
            seen.sort_unstable();
            assert!(seen.iter().copied().eq(0..n), "n = {n}");
        }
        // The first pass holds 9 of every 16: the even offsets and the last.
        let first: Vec<usize> = fill_order(32).take(18).collect();
        assert_eq!(first[..9], [0, 2, 4, 6, 8, 10, 12, 14, 15]);
    }

    /// Batches in key order (inserted in two passes) and in any other order (as given, so a
    /// repeated key keeps its last value) both install exactly what was sent.
    #[test]
    fn staging_installs_every_pair_in_either_order() {
        let dir = tempfile::tempdir().unwrap();
        let db = StateDb::open(dir.path()).unwrap();
        let data = db.shard(1).unwrap();
        let mut staging = data.begin_install().unwrap();
        let sorted: Vec<(Vec<u8>, Vec<u8>)> = (0..1000u32)
            .map(|i| (format!("k{i:05}").into_bytes(), i.to_be_bytes().to_vec()))
            .collect();
        staging.put_batch(&sorted[..500]).unwrap();
        staging.put_batch(&sorted[500..]).unwrap();
        // In fill order (indexes 0, 2, 1) the first "z2" would win.
        let unsorted = [
            (b"z1".to_vec(), b"one".to_vec()),
            (b"z2".to_vec(), b"first".to_vec()),
            (b"z2".to_vec(), b"last".to_vec()),
        ];
        staging.put_batch(&unsorted).unwrap();
        assert_eq!((staging.keys, staging.bytes), (1003, 1000 * 10 + 7 + 5 + 6));
        data.finish_install(staging, &applied(3, 3)).unwrap();
        let got: Vec<(Vec<u8>, Vec<u8>)> = data.scan_from(None).map(|kv| kv.unwrap()).collect();
        let mut want = sorted;
        want.push((b"z1".to_vec(), b"one".to_vec()));
        want.push((b"z2".to_vec(), b"last".to_vec()));
        assert_eq!(got, want);
    }
}
