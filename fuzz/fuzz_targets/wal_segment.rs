//! Arbitrary bytes as the WAL's only (or second) segment file: `Wal::open` must return Ok or Err,
//! never panic, and a WAL it opened must accept an append and reopen with that record last.
#![no_main]

use kvstore::wal::{Wal, WalOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let wal_dir = dir.path().join("wal");
    std::fs::create_dir(&wal_dir).expect("mkdir");
    let header = |n: u64| {
        let mut h = b"KVWAL001".to_vec();
        h.extend_from_slice(&n.to_le_bytes());
        h
    };
    // mode bit 0: the body follows a valid header (else it is the whole file, header included);
    // bit 1: a valid, empty segment 1 comes first, so the body is segment 2.
    let n = if mode & 2 != 0 {
        std::fs::write(wal_dir.join(format!("{:020}.wal", 1)), header(1)).expect("write");
        2
    } else {
        1
    };
    let mut file = if mode & 1 != 0 { header(n) } else { Vec::new() };
    file.extend_from_slice(body);
    std::fs::write(wal_dir.join(format!("{n:020}.wal")), &file).expect("write");

    let opts = WalOptions {
        dir: wal_dir,
        segment_bytes: 1 << 16,
        fsync: false,
        inline_flush: false,
    };
    let mut replayed = 0usize;
    let Ok(wal) = Wal::open(opts.clone(), |_, _| {
        replayed += 1;
        Ok(())
    }) else {
        return;
    };
    let pos = wal
        .append(&[b"after"])
        .expect("append to a WAL that opened")[0];
    wal.close();
    drop(wal);
    let mut last = None;
    let mut count = 0usize;
    Wal::open(opts, |p, payload| {
        count += 1;
        last = Some((p, payload.to_vec()));
        Ok(())
    })
    .expect("a WAL we just wrote reopens");
    assert_eq!(
        count,
        replayed + 1,
        "reopen replays what open did, plus the append"
    );
    assert_eq!(last, Some((pos, b"after".to_vec())));
});
