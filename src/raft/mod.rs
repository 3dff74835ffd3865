//! The consensus layer: one openraft group per shard.
//!
//! openraft (the stable 0.9 line, storage-v2 traits) does the protocol; this module adapts it to
//! our storage and transport:
//!
//! - [`log_store`]: the Raft log and vote of every shard, kept in the node's single [`crate::wal`].
//! - [`state_machine`]: applies committed commands to the shard's sled tree ([`crate::state`]);
//!   the applied index is written in the same atomic batch as the data.
//! - [`network`]: Raft messages to peers over the `kv.v1.Cluster` gRPC service, tagged with the
//!   shard id so one connection per peer carries every group.
//!
//! Snapshots are *fuzzy*: a snapshot is "the shard's sled tree, whose state is at or after log
//! index i". That is sound because every command is a blind write (put or delete of one key):
//! replaying entries i+1.. over any state between i and j yields the state at the end of the log,
//! exactly as ZooKeeper's fuzzy snapshots do. It lets a snapshot cost nothing to build (flush sled,
//! record i) and be streamed straight from the live tree in bounded memory (see [`crate::recover`]).
//! A command that reads before it writes (compare-and-swap) would break this and must not be added
//! without point-in-time snapshots.

pub mod log_store;
pub mod network;
pub mod pipe;
pub mod runtime;
pub mod state_machine;

use serde::{Deserialize, Serialize};

/// A replicated command. Every variant is a blind write (or a sequence of them): see the module
/// header for why that matters to snapshots. Variants are only ever added at the end: bincode
/// stores the variant's position, and logs on disk must stay readable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    // serde_bytes: encode as one length-prefixed run, not a sequence of u8 (50x faster for 1 MiB).
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Several clients' writes sharing one entry, applied in order (see [`crate::write_batch`]).
    Batch(Vec<Command>),
}

/// What applying one log entry produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// A blank or membership entry.
    #[default]
    None,
    Put,
    Delete {
        existed: bool,
    },
    /// One result per command of a [`Command::Batch`], in order.
    Batch(Vec<CommandResult>),
}

/// The snapshot object handed around inside openraft. A built snapshot carries no data: its data
/// is the live sled tree, pulled by the receiver over the `Recover` RPC (see [`crate::recover`]),
/// which hands the filled tree to openraft's `install_full_snapshot` through this box.
#[derive(Default)]
pub struct SnapshotData {
    pub received: Option<state_machine::Received>,
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotData")
            .field("received", &self.received.is_some())
            .finish()
    }
}

openraft::declare_raft_types!(
    /// openraft type configuration of every shard's group.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = SnapshotData,
        AsyncRuntime = runtime::KvRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, openraft::BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, openraft::BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Shard ids are small; a u32 keeps wire and disk formats compact.
pub type ShardId = u32;

/// Breaks elections that repeat forever in lockstep.
///
/// openraft 0.9 draws a node's election timeout once, at start, and checks it only on a tick
/// (every 1.5 heartbeat intervals). Two candidates whose ticks happen to be in phase (closer than
/// one message delay) and whose timeouts round to the same number of ticks start every election
/// at the same moment, each refusing the other's vote because it already voted for itself in
/// that term. When they are the only voters left (the third replica down or rebuilding) that
/// repeats forever (found by tests/sim.rs). This watcher notices a candidate that has gone
/// through several terms without a leader and starts one extra election at a random moment off
/// its tick, which the other candidate then grants.
///
/// Returns when the group stops. `may_campaign` is asked before each extra election (a replica
/// still rebuilding after a disk loss must not campaign).
pub async fn break_split_votes(
    raft: Raft,
    election_timeout_ms: u64,
    may_campaign: impl Fn() -> bool,
) {
    use openraft::AsyncRuntime;
    use rand::Rng;
    let timeout = election_timeout_ms.max(1);
    // The term of a candidate without a leader, or None; and whether the group stopped.
    let candidate = || {
        let m = raft.metrics();
        let m = m.borrow();
        let stuck = m.state == openraft::ServerState::Candidate && m.current_leader.is_none();
        (m.running_state.is_err(), stuck.then_some(m.current_term))
    };
    let mut stuck_since: Option<u64> = None;
    loop {
        let wait = runtime::KvRuntime::thread_rng().gen_range(timeout * 2..timeout * 4);
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        let (stopped, term) = candidate();
        if stopped {
            return;
        }
        let Some(term) = term else {
            stuck_since = None;
            continue;
        };
        match stuck_since {
            // Still a candidate, several terms later: campaign once, off the tick, unless
            // something changed meanwhile (a leader won, or this node moved to another term).
            Some(first) if term >= first.saturating_add(3) && may_campaign() => {
                let jitter = runtime::KvRuntime::thread_rng().gen_range(0..timeout);
                tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
                if candidate().1 == Some(term) && may_campaign() {
                    tracing::info!(
                        term,
                        "elections repeat without a leader; campaigning off-tick"
                    );
                    let _ = raft.trigger().elect().await;
                }
                stuck_since = None;
            }
            Some(_) => {}
            None => stuck_since = Some(term),
        }
    }
}

/// The answer of a replica that must not vote (a shard rebuilt after a disk loss, not caught
/// up yet): a refusal, carrying the higher of the two votes as Raft requires.
pub fn refused_vote(
    raft: &Raft,
    rpc: &openraft::raft::VoteRequest<NodeId>,
) -> openraft::raft::VoteResponse<NodeId> {
    let m = raft.metrics().borrow().clone();
    openraft::raft::VoteResponse {
        vote: if m.vote > rpc.vote { m.vote } else { rpc.vote },
        vote_granted: false,
        last_log_id: m.last_applied,
    }
}

/// openraft's storage errors carry an `AnyError`; build one from anything displayable.
pub(crate) fn storage_err(
    subject: openraft::ErrorSubject<NodeId>,
    verb: openraft::ErrorVerb,
    e: impl std::fmt::Display,
) -> StorageError {
    StorageError::from(openraft::StorageIOError::new(
        subject,
        verb,
        openraft::AnyError::error(e.to_string()),
    ))
}

/// openraft's own conformance suite for storage-v2 implementations, run against our WAL-backed
/// log store and sled state machine. (Its `transfer_snapshot` case copies snapshot bytes, which
/// our pull-based snapshots do not have; snapshot transfer is covered by the process tests.)
#[cfg(test)]
mod storage_suite {
    use std::sync::Arc;

    use openraft::testing::{StoreBuilder, Suite};

    use super::log_store::{LogManager, ShardLog};
    use super::state_machine::StateMachine;
    use super::{StorageError, TypeConfig};
    use crate::state::StateDb;
    use crate::wal::WalOptions;

    struct Builder;

    impl StoreBuilder<TypeConfig, ShardLog, StateMachine, tempfile::TempDir> for Builder {
        async fn build(&self) -> Result<(tempfile::TempDir, ShardLog, StateMachine), StorageError> {
            let dir = tempfile::tempdir().map_err(|e| {
                super::storage_err(openraft::ErrorSubject::Store, openraft::ErrorVerb::Write, e)
            })?;
            let logs: Arc<LogManager> = LogManager::open(WalOptions {
                dir: dir.path().join("wal"),
                fsync: false,
                ..Default::default()
            })
            .map_err(|e| {
                super::storage_err(openraft::ErrorSubject::Logs, openraft::ErrorVerb::Read, e)
            })?;
            let db = StateDb::open(&dir.path().join("state")).map_err(|e| {
                super::storage_err(
                    openraft::ErrorSubject::StateMachine,
                    openraft::ErrorVerb::Read,
                    e,
                )
            })?;
            let data = db.shard(0).map_err(|e| {
                super::storage_err(
                    openraft::ErrorSubject::StateMachine,
                    openraft::ErrorVerb::Read,
                    e,
                )
            })?;
            Ok((dir, logs.shard(0), StateMachine::new(data, logs.clone())))
        }
    }

    type S = Suite<TypeConfig, ShardLog, StateMachine, Builder, tempfile::TempDir>;

    macro_rules! suite_cases {
        ($($case:ident),* $(,)?) => {$(
            #[tokio::test]
            async fn $case() {
                let (_dir, log, sm) = Builder.build().await.expect("build store");
                S::$case(log, sm).await.expect(stringify!($case));
            }
        )*};
    }

    suite_cases!(
        last_membership_in_log_initial,
        last_membership_in_log,
        last_membership_in_log_multi_step,
        get_membership_initial,
        get_membership_from_log_and_empty_sm,
        get_membership_from_empty_log_and_sm,
        get_membership_from_log_le_sm_last_applied,
        get_membership_from_log_gt_sm_last_applied_1,
        get_membership_from_log_gt_sm_last_applied_2,
        get_initial_state_without_init,
        get_initial_state_membership_from_log_and_sm,
        get_initial_state_with_state,
        get_initial_state_last_log_gt_sm,
        get_initial_state_last_log_lt_sm,
        get_initial_state_log_ids,
        get_initial_state_re_apply_committed,
        save_vote,
        get_log_entries,
        limited_get_log_entries,
        try_get_log_entry,
        initial_logs,
        get_log_state,
        get_log_id,
        last_id_in_log,
        last_applied_state,
        purge_logs_upto_0,
        purge_logs_upto_5,
        purge_logs_upto_20,
        delete_logs_since_11,
        delete_logs_since_0,
        append_to_log,
        snapshot_meta,
        apply_single,
        apply_multiple,
    );
}
