//! `Recover`: streaming a shard's state from a peer, in bounded memory.
//!
//! The sender streams a header (its applied log id, membership and vote), then its live sled
//! tree in batches, then a trailer (keys, bytes, and its applied index at the end). The stream
//! is fuzzy — see [`crate::raft`] for why that is correct for blind writes — and the receiver
//! refuses stale reads until it has applied up to the trailer's index, so nobody sees a mix.
//!
//! The receiver writes batches into a fresh sled generation ([`crate::state::Staging`]) and
//! never holds more than one batch in memory; the install becomes visible atomically.
//! Two paths use it: a node that starts with a wiped data dir pulls every shard it replicates
//! before its Raft groups start, and a follower offered a snapshot by its leader (its log was
//! purged past what the follower has) pulls it before answering.

use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::pb::{
    recover_chunk::Part, KvBatch, KvPair, RecoverChunk, RecoverRequest, RecoverTrailer,
};
use crate::peers::Peers;
use crate::raft::state_machine::Received;
use crate::raft::{LogId, NodeId, ShardId, StoredMembership, Vote};
use crate::state::ShardData;

/// A batch is sent once it holds this many bytes (or [`BATCH_PAIRS`] pairs).
const BATCH_BYTES: usize = 1024 * 1024;
const BATCH_PAIRS: usize = 4096;
/// Batches in flight between the tree scan and the network: bounds the sender's memory.
const IN_FLIGHT: usize = 4;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Header {
    pub last_applied: Option<LogId>,
    pub membership: StoredMembership,
    pub vote: Option<Vote>,
}

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("peer {0} is not in the config")]
    UnknownPeer(NodeId),
    #[error("recover from node {peer}: {status}")]
    Rpc { peer: NodeId, status: tonic::Status },
    #[error("recover from node {peer}: {reason}")]
    Protocol { peer: NodeId, reason: String },
    #[error("recover: local state: {0}")]
    State(#[from] crate::state::StateError),
}

/// Sender side: a stream of chunks for shard `data`.
pub fn stream(
    data: Arc<ShardData>,
    vote: Option<Vote>,
) -> Result<ReceiverStream<Result<RecoverChunk, tonic::Status>>, tonic::Status> {
    let applied = data
        .applied()
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let header = Header {
        last_applied: applied.last_applied,
        membership: applied.membership,
        vote,
    };
    let header = bincode::serialize(&header).map_err(|e| tonic::Status::internal(e.to_string()))?;
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let send = |part: Part| {
            tx.blocking_send(Ok(RecoverChunk { part: Some(part) }))
                .is_ok()
        };
        if !send(Part::Header(header)) {
            return;
        }
        let (mut keys, mut bytes) = (0u64, 0u64);
        let mut batch = Vec::new();
        let mut batch_bytes = 0;
        for kv in data.scan_from(None) {
            let (key, value) = match kv {
                Ok(kv) => kv,
                Err(e) => {
                    let _ = tx.blocking_send(Err(tonic::Status::internal(e.to_string())));
                    return;
                }
            };
            keys += 1;
            bytes += (key.len() + value.len()) as u64;
            batch_bytes += key.len() + value.len();
            batch.push(KvPair {
                key: key.into(),
                value: value.into(),
            });
            if batch_bytes >= BATCH_BYTES || batch.len() >= BATCH_PAIRS {
                batch_bytes = 0;
                if !send(Part::Batch(KvBatch {
                    pairs: std::mem::take(&mut batch),
                })) {
                    return;
                }
            }
        }
        if !batch.is_empty() && !send(Part::Batch(KvBatch { pairs: batch })) {
            return;
        }
        let applied_at_end = match data.applied() {
            Ok(a) => a.last_applied.map_or(0, |l| l.index),
            Err(e) => {
                let _ = tx.blocking_send(Err(tonic::Status::internal(e.to_string())));
                return;
            }
        };
        send(Part::Trailer(RecoverTrailer {
            keys,
            bytes,
            applied_at_end,
        }));
    });
    Ok(ReceiverStream::new(rx))
}

/// What a finished pull brought.
pub struct Pulled {
    pub header: Header,
    pub received: Received,
    pub keys: u64,
    pub bytes: u64,
    pub started: Instant,
}

/// Receiver side: pulls shard `shard` from `peer` into a staging tree of `data`.
pub async fn pull(
    peers: &Peers,
    me: NodeId,
    peer: NodeId,
    shard: ShardId,
    data: &ShardData,
) -> Result<Pulled, RecoverError> {
    let started = Instant::now();
    tracing::info!(
        KV_EVENT = "recover_start",
        KV_NODE = me,
        KV_SHARD = shard,
        KV_PEER = peer,
        "recovering shard {shard} from node {peer}"
    );
    let mut client = peers.cluster(peer).ok_or(RecoverError::UnknownPeer(peer))?;
    let rpc = |status| RecoverError::Rpc { peer, status };
    let proto = |reason: &str| RecoverError::Protocol {
        peer,
        reason: reason.to_string(),
    };
    let mut stream = client
        .recover(RecoverRequest { shard, from: me })
        .await
        .map_err(rpc)?
        .into_inner();
    let header: Header = match stream.next().await {
        Some(Ok(RecoverChunk {
            part: Some(Part::Header(h)),
        })) => bincode::deserialize(&h).map_err(|e| proto(&format!("bad header: {e}")))?,
        Some(Err(s)) => return Err(rpc(s)),
        _ => return Err(proto("stream did not start with a header")),
    };
    let mut staging = data.begin_install()?;
    let trailer = loop {
        match stream.next().await {
            Some(Ok(RecoverChunk {
                part: Some(Part::Batch(b)),
            })) => {
                let pairs: Vec<_> = b.pairs.into_iter().map(|p| (p.key, p.value)).collect();
                staging.put_batch(&pairs)?;
            }
            Some(Ok(RecoverChunk {
                part: Some(Part::Trailer(t)),
            })) => break t,
            Some(Ok(_)) => return Err(proto("unexpected chunk")),
            Some(Err(s)) => return Err(rpc(s)),
            None => return Err(proto("stream ended before its trailer")),
        }
    };
    if trailer.keys != staging.keys || trailer.bytes != staging.bytes {
        return Err(proto(&format!(
            "received {} keys / {} bytes, sender counted {} / {}",
            staging.keys, staging.bytes, trailer.keys, trailer.bytes
        )));
    }
    let (keys, bytes) = (staging.keys, staging.bytes);
    Ok(Pulled {
        header,
        received: Received {
            staging,
            consistent_from: trailer.applied_at_end,
        },
        keys,
        bytes,
        started,
    })
}

/// The in-process equivalent of [`stream`] + [`pull`]: copies `src` (a peer's replica of the
/// shard, whose vote is `vote`) into a staging tree of `dst`. For the deterministic simulation
/// (tests/sim.rs), whose nodes share one process and must not wait on other threads.
pub fn copy_local(
    src: &ShardData,
    vote: Option<Vote>,
    dst: &ShardData,
) -> Result<Pulled, RecoverError> {
    let started = Instant::now();
    let applied = src.applied()?;
    let header = Header {
        last_applied: applied.last_applied,
        membership: applied.membership,
        vote,
    };
    let mut staging = dst.begin_install()?;
    let mut batch = Vec::new();
    for kv in src.scan_from(None) {
        batch.push(kv?);
        if batch.len() >= BATCH_PAIRS {
            staging.put_batch(&batch)?;
            batch.clear();
        }
    }
    staging.put_batch(&batch)?;
    let consistent_from = src.applied()?.last_applied.map_or(0, |l| l.index);
    let (keys, bytes) = (staging.keys, staging.bytes);
    Ok(Pulled {
        header,
        received: Received {
            staging,
            consistent_from,
        },
        keys,
        bytes,
        started,
    })
}

/// Logs the end of a recovery, once the pulled state is installed.
pub fn log_done(me: NodeId, peer: NodeId, shard: ShardId, keys: u64, bytes: u64, started: Instant) {
    let duration_ms = started.elapsed().as_millis() as u64;
    tracing::info!(
        KV_EVENT = "recover_done",
        KV_NODE = me,
        KV_SHARD = shard,
        KV_PEER = peer,
        keys,
        bytes,
        duration_ms,
        "recovered shard {shard} from node {peer}: {keys} keys, {bytes} bytes in {duration_ms} ms"
    );
}
