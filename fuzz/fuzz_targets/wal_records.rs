//! Records with valid framing (length and CRC) but arbitrary payloads, replayed by the node's log
//! store (`LogManager::open`, which decodes each as a bincode Raft record and rebuilds every
//! shard's log): Ok or Err, never a panic; then each shard's log state must be readable.
#![no_main]

use kvstore::raft::log_store::LogManager;
use kvstore::wal::WalOptions;
use libfuzzer_sys::fuzz_target;

fn record(out: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    let mut h = crc32fast::Hasher::new();
    h.update(&len);
    h.update(payload);
    out.extend_from_slice(&len);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(payload);
}

fuzz_target!(|data: &[u8]| {
    // Input: (u16 LE length, payload)*; a length past the end makes the rest a raw, torn tail.
    let mut segment = b"KVWAL001".to_vec();
    segment.extend_from_slice(&1u64.to_le_bytes());
    let mut rest = data;
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        if len > rest.len() - 2 {
            segment.extend_from_slice(&rest[2..]);
            break;
        }
        record(&mut segment, &rest[2..2 + len]);
        rest = &rest[2 + len..];
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir(&wal_dir).expect("mkdir");
    std::fs::write(wal_dir.join(format!("{:020}.wal", 1)), &segment).expect("write");
    let opts = WalOptions {
        dir: wal_dir,
        segment_bytes: 1 << 20,
        fsync: false,
        inline_flush: false,
    };
    if let Ok(mgr) = LogManager::open(opts) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(async {
            for shard in mgr.shards_with_state() {
                use openraft::storage::RaftLogStorage;
                use openraft::RaftLogReader;
                let mut log = mgr.shard(shard);
                let _ = log.read_vote().await;
                let _ = log.read_committed().await;
                if let Ok(state) = log.get_log_state().await {
                    let from = state.last_purged_log_id.map_or(0, |l| l.index + 1);
                    let to = state.last_log_id.map_or(0, |l| l.index + 1);
                    let _ = log.try_get_log_entries(from..to.min(from + 64)).await;
                }
            }
        });
        mgr.wal().close();
    }
});
