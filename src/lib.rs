//! kvstore: a sharded, Raft-replicated, durable key-value store.
//!
//! The data flow of one write, top to bottom, is the module list:
//!
//! - [`server`]: gRPC handlers (`kv.v1.KeyValue` for clients, `kv.v1.Cluster` for peers);
//!   input validation; errors mapped to status codes.
//! - [`router`]: key → shard → the shard's leader; local execution or one forwarding hop;
//!   retries across a leader change until the deadline.
//! - [`write_batch`]: a shard's concurrent writes share one Raft entry.
//! - [`raft`]: one openraft group per shard; commit on a majority.
//! - [`wal`]: the node's write-ahead log (Raft entries and votes of every shard), group-committed.
//! - [`state`]: sled, one tree per shard: the data, then the applied index.
//!
//! Around them: [`config`] (the cluster file), [`placement`] (shards and their replicas),
//! [`peers`] (connections), [`heartbeat`] (who is up), [`recover`] (streaming a shard's state to a
//! node that lost it), [`node`] (start-up and shutdown), [`read_index`] and [`lease`]
//! (linearizable reads: shared quorum rounds, or the leader's lease), [`client`] (what `kvctl`
//! and the tests use), [`mux`] (many calls on one gRPC stream: client sessions, the Raft
//! stream), [`telemetry`] (journald or stderr).

// tonic::Status and openraft::StorageError are the errors these layers speak; boxing them at every
// boundary would add allocations for no reader's benefit.
#![allow(clippy::result_large_err)]

pub mod balance;
pub mod bench;
pub mod client;
pub mod config;
pub mod heartbeat;
pub mod lease;
pub mod mux;
pub mod node;
pub mod peers;
pub mod placement;
pub mod raft;
pub mod read_index;
pub mod recover;
pub mod router;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod wal;
pub mod write_batch;

/// Generated gRPC code for `proto/kv.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("kv.v1");
}
