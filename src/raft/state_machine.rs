//! Applies committed commands to the shard's sled tree, and builds/installs snapshots.
//!
//! `apply` writes the data and the applied log id in one atomic sled batch, so the tree always
//! knows exactly how far it got; after a crash openraft re-applies from there using the WAL.
//! A snapshot is fuzzy (see [`crate::raft`]): building one flushes sled and records the applied
//! log id; installing one swaps in a tree filled by [`crate::recover`].

use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder, StoredMembership};

use super::log_store::LogManager;
use super::{
    storage_err, Command, CommandResult, Entry, LogId, SnapshotData, SnapshotMeta, StorageError,
    TypeConfig,
};
use crate::state::{Applied, Op, ShardData, Staging};

/// Data a follower pulled over `Recover` and hands to openraft's `install_full_snapshot`.
pub struct Received {
    pub staging: Staging,
    /// The sender's applied index when its stream ended.
    pub consistent_from: u64,
}

pub struct StateMachine {
    data: Arc<ShardData>,
    logs: Arc<LogManager>,
    /// The tree's applied record as last written by this state machine (the record's only
    /// writer while the group runs), so `apply` need not decode it from sled each time. `None`:
    /// read it from sled (at start, and after a failed write).
    applied: Option<Applied>,
}

impl StateMachine {
    pub fn new(data: Arc<ShardData>, logs: Arc<LogManager>) -> Self {
        StateMachine {
            data,
            logs,
            applied: None,
        }
    }

    /// The applied record: from memory, else from sled.
    fn take_applied(&mut self) -> Result<Applied, StorageError> {
        match self.applied.take() {
            Some(a) => Ok(a),
            None => self.data.applied().map_err(|e| sm_err(ErrorVerb::Read, e)),
        }
    }
}

fn sm_err(verb: ErrorVerb, e: impl std::fmt::Display) -> StorageError {
    storage_err(ErrorSubject::StateMachine, verb, e)
}

pub struct SnapshotBuilder {
    data: Arc<ShardData>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        // Read the applied id first: the flush below then covers at least that state, which is
        // what lets openraft purge the log up to it.
        let applied = self
            .data
            .applied()
            .map_err(|e| sm_err(ErrorVerb::Read, e))?;
        self.data.flush().map_err(|e| sm_err(ErrorVerb::Write, e))?;
        let meta = SnapshotMeta {
            last_log_id: applied.last_applied,
            last_membership: applied.membership.clone(),
            snapshot_id: snapshot_id(applied.last_applied),
        };
        self.data
            .save_snapshot_meta(&meta)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::default(),
        })
    }
}

pub fn snapshot_id(last: Option<LogId>) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    match last {
        Some(l) => format!("{}-{}-{nanos}", l.leader_id.term, l.index),
        None => format!("none-{nanos}"),
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<u64, openraft::BasicNode>), StorageError> {
        let a = self.take_applied()?;
        let state = (a.last_applied, a.membership.clone());
        self.applied = Some(a);
        Ok(state)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResult>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        // Taken out: on any error below it stays `None` and is re-read from sled next time.
        let mut applied = self.take_applied()?;
        let mut ops = Vec::with_capacity(entries.len());
        // Which op (if any) each entry produced, to map results back.
        let mut op_of = Vec::with_capacity(entries.len());
        for e in &entries {
            applied.last_applied = Some(e.log_id);
            match &e.payload {
                EntryPayload::Blank => op_of.push(None),
                EntryPayload::Membership(m) => {
                    applied.membership = StoredMembership::new(Some(e.log_id), m.clone());
                    op_of.push(None);
                }
                EntryPayload::Normal(Command::Put { key, value }) => {
                    op_of.push(Some(ops.len()));
                    ops.push(Op::Put(key, value));
                }
                EntryPayload::Normal(Command::Delete { key }) => {
                    op_of.push(Some(ops.len()));
                    ops.push(Op::Delete(key));
                }
            }
        }
        // openraft lets a node apply committed entries before its own WAL has flushed them (a
        // leader commits on a quorum that need not include itself). sled may persist what we
        // apply at any moment, so the WAL must hold them durably first: sled's applied index
        // must never be ahead of what this node's WAL holds durably (start-up checks rely on
        // it). Usually the flush that covers them is already done: then there is nothing to
        // wait for; otherwise wait for the WAL (group commit: a flush is usually under way).
        let last = entries.last().map(|e| e.log_id);
        if !last.is_some_and(|l| self.logs.is_durable(self.data.shard, l)) {
            self.logs
                .wal()
                .sync()
                .await
                .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        }
        let results = self
            .data
            .apply(&ops, &applied)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        self.applied = Some(applied);
        Ok(op_of
            .into_iter()
            .map(|i| match i.and_then(|i| results.get(i).copied()) {
                None => CommandResult::None,
                Some(None) => CommandResult::Put,
                Some(Some(existed)) => CommandResult::Delete { existed },
            })
            .collect())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            data: self.data.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, StorageError> {
        Ok(Box::default())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), StorageError> {
        let Some(received) = snapshot.received else {
            return Err(sm_err(
                ErrorVerb::Write,
                "snapshot install without received data",
            ));
        };
        let applied = Applied {
            last_applied: meta.last_log_id,
            membership: meta.last_membership.clone(),
            consistent_from: received.consistent_from,
        };
        self.applied = None;
        self.data
            .finish_install(received.staging, &applied)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        self.applied = Some(applied);
        self.data
            .save_snapshot_meta(meta)
            .map_err(|e| sm_err(ErrorVerb::Write, e))?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let meta = self
            .data
            .last_snapshot()
            .map_err(|e| sm_err(ErrorVerb::Read, e))?;
        Ok(meta.map(|meta| Snapshot {
            meta,
            snapshot: Box::default(),
        }))
    }
}
