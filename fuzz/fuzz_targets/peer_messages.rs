//! Arbitrary bytes as what peers send each other: the payload of a `Raft` call (bincode
//! append-entries or vote request), of `OfferSnapshot`, a `Recover` stream header, and the
//! replies the Raft network client decodes. Decoding returns Ok or Err, never panics.
#![no_main]

use kvstore::raft::{NodeId, TypeConfig};
use libfuzzer_sys::fuzz_target;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesResponse, InstallSnapshotResponse, VoteResponse};

fuzz_target!(|data: &[u8]| {
    let Some((&which, payload)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            if let Ok(kvstore::server::RaftMessage::Append(req)) =
                kvstore::server::decode_raft(1, payload)
            {
                // What the handler hands to openraft must survive a round trip.
                let again = bincode::serialize(&req).expect("re-encode");
                let _ = kvstore::server::decode_raft(1, &again).expect("decode re-encoded");
            }
        }
        1 => {
            let _ = kvstore::server::decode_raft(2, payload);
        }
        2 => {
            let kind = i32::from(payload.first().copied().unwrap_or(0)) - 1;
            let _ = kvstore::server::decode_raft(kind, payload);
        }
        3 => {
            let _ = kvstore::server::decode_snapshot_offer(payload);
        }
        4 => {
            let _ = bincode::deserialize::<kvstore::recover::Header>(payload);
        }
        5 => {
            let _ = bincode::deserialize::<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>>(
                payload,
            );
        }
        6 => {
            let _ =
                bincode::deserialize::<Result<VoteResponse<NodeId>, RaftError<NodeId>>>(payload);
        }
        _ => {
            let _ = bincode::deserialize::<
                Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
            >(payload);
            let _ = bincode::deserialize::<openraft::Entry<TypeConfig>>(payload);
        }
    }
});
