//! The node's write-ahead log (WAL).
//!
//! # What this module owns
//!
//! One WAL per node, shared by every Raft group (shard) hosted on the node. It owns a
//! directory of segment files and nothing else. Records are opaque byte strings: the caller
//! encodes shard id, record kind and openraft entries (bincode) and decides what a record
//! means. The WAL only promises order and durability, and it is the source of truth for the
//! latter: a write is acknowledged to a client only after the WAL says it is durable.
//!
//! # The promise
//!
//! **A record whose flush completed survives kill -9 and power loss; a torn tail left by a
//! crash is truncated on open; any other damage refuses to open rather than silently
//! dropping data.**
//!
//! Records whose flush did *not* complete (or whose append/flush returned an error) may or may
//! not be present after a crash. That is normal for a WAL and Raft copes with it.
//!
//! # On-disk format
//!
//! Segment files are named `{segment:020}.wal`, numbered from 1 without gaps, so lexical order
//! is log order. Each starts with a 16-byte header, `b"KVWAL001"` followed by the segment number
//! as `u64` LE; the number in the header must match the file name, which catches renamed or
//! foreign files. After the header come records, back to back:
//!
//! ```text
//! len: u32 LE | crc: u32 LE = crc32(len bytes ++ payload) | payload (len bytes)
//! ```
//!
//! The checksum covers the length so that a damaged length is detected rather than trusted.
//! Because the length is covered, no valid record header is ever all zero bytes, which lets
//! zero-filled garbage (what file systems show for unwritten blocks) be rejected cheaply.
//! A record never spans two segments. A segment is "full" once it holds `segment_bytes` bytes
//! or more; the WAL then rotates right after the record that filled it, so
//! [`Wal::next_pos`] is exact and a segment is at most `segment_bytes` plus one record long.
//! Payloads are limited to [`MAX_RECORD`] bytes.
//!
//! # Rotation is a durability barrier
//!
//! Before segment N+1 is created, segment N is fdatasync'd (and the directory too, if N's own
//! directory entry might not be durable yet). Segment N+1 existing on disk therefore proves
//! that N is complete and durable, which is what makes the strict recovery rule below sound:
//! damage in a non-last segment can never be the harmless leftover of a crash.
//! Removing old segments ([`Wal::remove_segments_before`]) unlinks them oldest first and syncs
//! the directory after each unlink, so what is left after a crash is always a contiguous
//! range; a gap in the numbering is reported as corruption.
//!
//! # Recovery rule (torn tails)
//!
//! [`Wal::open`] replays every segment in order and stops at the first record that fails:
//! incomplete header, length above [`MAX_RECORD`] or past end of file, or checksum mismatch.
//!
//! * In a **non-last** segment any failure is [`WalError::Corrupt`] (see the barrier above).
//! * In the **last** segment the bytes from the failure point to end of file are scanned for
//!   an intact record starting at *any* later byte offset. If there is none, the failure is a
//!   torn tail: the file is truncated there (`set_len` + fsync) and a `warn!` reports how many
//!   bytes were dropped. If an intact record follows, the damage is in the middle of the log
//!   and open fails with [`WalError::Corrupt`]: acknowledged records after the damage must
//!   not be discarded silently. (A damaged *final* record in the last segment is therefore
//!   indistinguishable from a torn write and is truncated; it was the newest record and, if
//!   its flush had completed, only media damage could have broken it.)
//! * A last segment whose header is incomplete or all zeros is what a crash while creating
//!   the segment leaves behind; the same rule applies (no intact record after it => the file
//!   is reset to a fresh header). Empty and header-only last segments are normal.
//!
//! Open also fdatasyncs the last segment and the directory, so everything replayed is durable
//! even if the previous process died (kill -9) before its flush reached the disk.
//!
//! # Group commit
//!
//! [`Wal::append`] encodes the records and `pwrite`s them into the active segment under one
//! mutex (a page-cache copy, cheap) and returns their positions; nothing is durable yet.
//! [`Wal::flush`] only enqueues a callback. A dedicated thread, `wal-flusher`, takes *all*
//! queued callbacks at once, remembers the current end of the log, releases the mutex, issues
//! ONE fdatasync (plus a directory fsync if a segment was created since the last one), then
//! calls every callback, in the order they were queued. Appends continue during the fsync;
//! callers that arrive during it are served together by the next round. So N concurrent
//! writers cost roughly one fsync per round instead of N. Since data always reaches the file
//! inside `append`, [`Wal::read`] can always `pread` from the file; there is no unwritten
//! buffer to consult.
//!
//! The hand-offs cost a lone writer: its request wakes the flusher, and the flusher's callback
//! wakes the writer's task again, two thread wake-ups per flush on a path that waits for
//! nothing else. [`Wal::flush_here_when_idle`] skips them when the WAL is idle (no round
//! running or queued, the last round answered a single request, and no flush was asked for in
//! the last [`IDLE_GAP`]): the caller's thread runs
//! the round itself, callbacks included, before it returns. A round running there keeps the
//! flusher waiting, and a caller never starts one beside the flusher's, so callbacks still come
//! in request order. A follower's Raft appends use it (the fsync a leader waits for before it
//! acknowledges); a leader's must not, as openraft sends the entries to its followers only after
//! `append` returns. Measured on 3 nodes (fresh clusters alternated; BENCHMARKS.md): one client
//! writing, p50 lower in 3 of 4 pairs with this rule and in 14 of 18 with earlier forms of it,
//! by about 4 %; with 64 clients 2 of 4 pairs faster, within the noise. (Earlier forms also ran
//! rounds on runtime workers under load: with no gap rule, 64 clients were faster in 2 of 7
//! pairs, and with the gap counted from the end of the last round, 1 of 4.)
//!
//! # Zeros ahead of the tail
//!
//! An fdatasync after an append that grew the file must also commit the new file size: on ext4
//! a journal commit, which made each flush of a small record about a quarter slower on this
//! project's machine (300-byte records, write + fdatasync: 105-118 µs growing the file, 84-90 µs
//! overwriting). So with `fsync` on, whenever a write reaches the end of the active segment's
//! file, [`FILL_AHEAD`] (1 MiB) of zeros is written after it; the next fdatasync makes them and
//! the new size durable once, and the flushes of the records written over them change no size.
//! The zeros are never records (no record header is all zeros): open cuts them off the last
//! segment like a torn tail (quietly, as they are all zeros), rotation cuts them off a segment
//! before syncing it, so a non-last segment still ends at its last record, and a clean close
//! cuts them too. The price: the log's bytes reach the disk twice (as zeros, then as records),
//! and one flush per MiB of log carries the MiB of zeros.
//!
//! # Failure handling (fsyncgate)
//!
//! After a failed write or fsync the kernel may have dropped dirty pages and a retried fsync
//! can falsely succeed, so the WAL never retries: the first such error is reported to the
//! affected callers and the WAL turns permanently unusable ([`WalError::Failed`] for every later
//! append/flush). The node must restart, and recovery on open decides what survived.
//!
//! # Limits
//!
//! * Unix only (positional I/O via `FileExt`).
//! * A single process must own the directory; nothing here locks it.
//! * After a power loss on a device that persists unsynced writes out of order, an intact but
//!   never-acknowledged record could survive behind a hole in the unsynced tail. The rule
//!   above then refuses to open (it cannot tell that hole from damage to acknowledged data);
//!   the operator has to discard this node's data and let it catch up from its peers. That is
//!   the safe direction for Raft, where forgetting acknowledged entries breaks safety.
//! * A crash that tears a record whose payload itself contains a byte-exact, intact WAL
//!   record looks like damage followed by an intact record, and open refuses.
//! * `done` callbacks run on the flusher thread; they must be quick and must not block on
//!   another flush. A panicking callback is caught and logged.
//!
//! # Testing hook: `KV_WAL_FAULT` (never set it in production)
//!
//! [`Wal::open`] reads the environment variable `KV_WAL_FAULT` once. Unset (the normal case), it
//! costs nothing. Set, it injects one fault, so that process tests can check what the node does
//! when its disk misbehaves. `N` counts from 1 and only counts I/O issued *after* open returned
//! (the syncs of open itself and of its replay are not counted); syncs are only issued, and so
//! only counted, with `fsync = true`.
//!
//! | value | effect |
//! |---|---|
//! | `fsync:N` | the N-th fsync/fdatasync (segment or directory) fails with an I/O error |
//! | `write:N` | the N-th write of records into a segment fails with an I/O error, writing nothing |
//! | `crash_before_fsync:N` | the process aborts (`std::process::abort`) just before the N-th fsync |
//! | `crash_after_write:N` | the process aborts right after the N-th write, before any fsync covers it |
//! | `lose_unsynced:N` | right after the N-th write, the active segment is cut back to what is known durable (as a power loss may leave it), then the process aborts |
//!
//! Anything else refuses to open. The hook logs a warning at open, and aborts print one line
//! on stderr first, so a fault injected by mistake is visible.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::mem;
use std::os::unix::fs::FileExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tracing::{debug, error, info, warn};

/// Zeros written ahead of the active segment's tail (module docs: "Zeros ahead of the tail").
const FILL_AHEAD: u64 = 1 << 20;

/// [`Wal::flush_here_when_idle`] runs a round on its caller's thread only when no flush was
/// asked for in this long: a lone writer's flushes come a whole write apart (about 0.6 ms on
/// this project's machine), while under load they come tens of microseconds apart, and a round
/// there would block a runtime worker that has other work.
const IDLE_GAP: Duration = Duration::from_micros(200);

/// Largest accepted payload. Also the sanity bound on lengths read back from disk.
pub const MAX_RECORD: usize = 64 << 20;

const MAGIC: &[u8; 8] = b"KVWAL001";
const SEGMENT_HEADER_LEN: u64 = 16;
const RECORD_HEADER_LEN: u64 = 8;
/// Upper bound on bytes checksummed while looking for intact records after damage in the last
/// segment. Crafted payloads could otherwise make that scan quadratic; when the budget runs out
/// we cannot prove the damage is a tail, so open refuses.
const TAIL_SCAN_BUDGET: u64 = 1 << 30;
/// The append scratch buffer is kept between calls unless a huge batch inflated it.
const SCRATCH_KEEP: usize = 1 << 20;

/// The `replay` callback of [`Wal::open`], as replay's helpers see it.
type ReplayFn<'a> = dyn FnMut(WalPos, &[u8]) -> Result<(), String> + 'a;

/// Callback handed to [`Wal::flush`].
pub type FlushCallback = Box<dyn FnOnce(Result<(), WalError>) + Send + 'static>;

/// Configuration for [`Wal::open`].
#[derive(Clone, Debug)]
pub struct WalOptions {
    /// Directory holding the segment files; created if missing.
    pub dir: PathBuf,
    /// Rotate to a new segment once the active one holds at least this many bytes.
    pub segment_bytes: u64,
    /// `false` skips every fsync (tests and benchmarks only: nothing is durable then).
    pub fsync: bool,
    /// `true` runs each flush on the caller's thread before [`Wal::flush`] returns, with no
    /// flusher thread and no group commit. For the deterministic simulation (tests/sim.rs):
    /// a single-threaded runtime with a virtual clock must never wait on another OS thread.
    pub inline_flush: bool,
}

impl Default for WalOptions {
    fn default() -> Self {
        WalOptions {
            dir: PathBuf::from("wal"),
            segment_bytes: 64 << 20,
            fsync: true,
            inline_flush: false,
        }
    }
}

/// Where a record starts. The derived ordering is log order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WalPos {
    pub segment: u64,
    pub offset: u64,
}

impl fmt::Display for WalPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.segment, self.offset)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL I/O error on {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
    /// Damage that is not a torn tail; see the module docs for the rule.
    #[error("WAL corrupt: {} at byte {offset}: {reason}", .path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("WAL record of {0} bytes exceeds the maximum of {MAX_RECORD} bytes")]
    TooLarge(usize),
    #[error("WAL is closed")]
    Closed,
    /// The `replay` callback of [`Wal::open`] rejected the record at `pos`.
    #[error("WAL replay callback failed at {pos}: {reason}")]
    Replay { pos: WalPos, reason: String },
    /// An earlier write or fsync failed; the WAL refuses all further work (fsyncgate).
    #[error("WAL unusable after an earlier write/fsync failure: {0}")]
    Failed(String),
    /// [`Wal::read`] of a position outside every live segment (never written, or removed).
    #[error("no WAL record at {0}")]
    NoRecord(WalPos),
}

impl WalError {
    /// One flush round may have to report the same error to many callers; `io::Error` is not
    /// `Clone`, so rebuild it from kind and message.
    fn duplicate(&self) -> WalError {
        match self {
            WalError::Io { path, source } => WalError::Io {
                path: path.clone(),
                source: io::Error::new(source.kind(), source.to_string()),
            },
            WalError::Corrupt {
                path,
                offset,
                reason,
            } => WalError::Corrupt {
                path: path.clone(),
                offset: *offset,
                reason: reason.clone(),
            },
            WalError::TooLarge(n) => WalError::TooLarge(*n),
            WalError::Closed => WalError::Closed,
            WalError::Replay { pos, reason } => WalError::Replay {
                pos: *pos,
                reason: reason.clone(),
            },
            WalError::Failed(reason) => WalError::Failed(reason.clone()),
            WalError::NoRecord(pos) => WalError::NoRecord(*pos),
        }
    }
}

fn io_err(path: &Path, source: io::Error) -> WalError {
    WalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Counters since open, for benchmarks and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// fsync/fdatasync calls issued (segment files and directory), including those of open.
    pub fsyncs: u64,
    /// Records appended.
    pub records: u64,
    /// Payload bytes appended (without headers).
    pub bytes: u64,
    /// Calls to [`Wal::flush`] (and [`Wal::sync`]).
    pub flush_requests: u64,
    /// Flusher rounds that completed at least one request.
    pub flush_rounds: u64,
}

#[derive(Default)]
struct Counters {
    fsyncs: AtomicU64,
    records: AtomicU64,
    bytes: AtomicU64,
    flush_requests: AtomicU64,
    flush_rounds: AtomicU64,
}

/// The environment variable of the fault-injection testing hook (module docs).
pub const ENV_FAULT: &str = "KV_WAL_FAULT";

/// Which fault the `KV_WAL_FAULT` testing hook injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    Fsync,
    Write,
    CrashBeforeFsync,
    CrashAfterWrite,
    LoseUnsynced,
}

/// A fault of the testing hook: `kind` hits the `nth` (from 1) sync or write after open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub nth: u64,
}

impl Fault {
    /// Parses `fsync:N`, `write:N`, `crash_before_fsync:N`, `crash_after_write:N` or
    /// `lose_unsynced:N` (N >= 1).
    pub fn parse(text: &str) -> Result<Fault, String> {
        let bad = || {
            format!(
                "{ENV_FAULT}={text:?}: expected fsync:N, write:N, crash_before_fsync:N, \
                 crash_after_write:N or lose_unsynced:N with N >= 1"
            )
        };
        let (kind, n) = text.trim().split_once(':').ok_or_else(bad)?;
        let kind = match kind {
            "fsync" => FaultKind::Fsync,
            "write" => FaultKind::Write,
            "crash_before_fsync" => FaultKind::CrashBeforeFsync,
            "crash_after_write" => FaultKind::CrashAfterWrite,
            "lose_unsynced" => FaultKind::LoseUnsynced,
            _ => return Err(bad()),
        };
        let nth: u64 = n.parse().map_err(|_| bad())?;
        if nth == 0 {
            return Err(bad());
        }
        Ok(Fault { kind, nth })
    }

    /// The fault named by `KV_WAL_FAULT`, if it is set.
    fn from_env() -> Result<Option<Fault>, String> {
        match std::env::var(ENV_FAULT) {
            Ok(v) if v.trim().is_empty() => Ok(None),
            Ok(v) => Fault::parse(&v).map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("{ENV_FAULT} is not valid UTF-8"))
            }
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            FaultKind::Fsync => "fsync",
            FaultKind::Write => "write",
            FaultKind::CrashBeforeFsync => "crash_before_fsync",
            FaultKind::CrashAfterWrite => "crash_after_write",
            FaultKind::LoseUnsynced => "lose_unsynced",
        };
        write!(f, "{kind}:{}", self.nth)
    }
}

/// The crash faults: one line on stderr, then abort (as a kill -9 would, no cleanup at all).
fn crash(fault: Fault, path: &Path) -> ! {
    eprintln!(
        "kvnode: {ENV_FAULT}={fault}: aborting at the injected fault point ({})",
        path.display()
    );
    std::process::abort()
}

/// Immutable after open.
struct Config {
    dir: PathBuf,
    segment_bytes: u64,
    fsync: bool,
    inline_flush: bool,
    counters: Counters,
    /// Fault injection: makes every sync fail, to test the fsyncgate path.
    #[cfg(test)]
    fail_syncs: std::sync::atomic::AtomicBool,
    /// The `KV_WAL_FAULT` testing hook (module docs), if set.
    fault: Option<Fault>,
    /// Counts syncs and writes once open has finished, for `fault`.
    fault_armed: std::sync::atomic::AtomicBool,
    fault_syncs: AtomicU64,
    fault_writes: AtomicU64,
}

impl Config {
    fn segment_path(&self, segment: u64) -> PathBuf {
        self.dir.join(format!("{segment:020}.wal"))
    }

    fn sync_file(&self, file: &File, path: &Path) -> Result<(), WalError> {
        if !self.fsync {
            return Ok(());
        }
        #[cfg(test)]
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Err(io_err(path, io::Error::other("injected fsync failure")));
        }
        self.inject_before_sync(path)?;
        file.sync_data().map_err(|e| io_err(path, e))?;
        self.counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The `fsync:N` and `crash_before_fsync:N` faults.
    fn inject_before_sync(&self, path: &Path) -> Result<(), WalError> {
        let Some(fault) = self.fault else {
            return Ok(());
        };
        if !self.fault_armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        let n = self.fault_syncs.fetch_add(1, Ordering::SeqCst) + 1;
        match fault.kind {
            FaultKind::Fsync if n == fault.nth => Err(io_err(
                path,
                io::Error::other(format!("injected fsync failure ({ENV_FAULT}={fault})")),
            )),
            FaultKind::CrashBeforeFsync if n == fault.nth => crash(fault, path),
            _ => Ok(()),
        }
    }

    /// The `write:N` fault (before the write) and `crash_after_write:N` (after it).
    fn inject_write(&self, path: &Path, written: bool) -> Result<(), WalError> {
        let Some(fault) = self.fault else {
            return Ok(());
        };
        if !self.fault_armed.load(Ordering::SeqCst) {
            return Ok(());
        }
        match (fault.kind, written) {
            (FaultKind::Write, false) => {
                let n = self.fault_writes.fetch_add(1, Ordering::SeqCst) + 1;
                if n == fault.nth {
                    return Err(io_err(
                        path,
                        io::Error::other(format!("injected write failure ({ENV_FAULT}={fault})")),
                    ));
                }
                Ok(())
            }
            (FaultKind::CrashAfterWrite, true) => {
                let n = self.fault_writes.fetch_add(1, Ordering::SeqCst) + 1;
                if n == fault.nth {
                    crash(fault, path);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The `lose_unsynced:N` fault, if the write just made is the N-th.
    fn lose_unsynced_due(&self) -> Option<Fault> {
        let fault = self.fault.filter(|f| f.kind == FaultKind::LoseUnsynced)?;
        if !self.fault_armed.load(Ordering::SeqCst) {
            return None;
        }
        (self.fault_writes.fetch_add(1, Ordering::SeqCst) + 1 == fault.nth).then_some(fault)
    }

    /// Makes file creations and removals in the WAL directory durable.
    fn sync_dir(&self) -> Result<(), WalError> {
        if !self.fsync {
            return Ok(());
        }
        let dir = File::open(&self.dir).map_err(|e| io_err(&self.dir, e))?;
        self.sync_file(&dir, &self.dir)
    }
}

struct Segment {
    /// Bytes of intact data (header + whole records); reads beyond are refused.
    len: u64,
    /// Opened lazily for reads of older segments; always set for the active one.
    file: Option<Arc<File>>,
}

/// Everything behind the append mutex.
struct State {
    segment: u64,
    file: Arc<File>,
    path: PathBuf,
    /// Write offset in the active segment == where the next record goes.
    offset: u64,
    /// The active segment's file length: `offset` plus the zeros written ahead of it (see
    /// "Zeros ahead of the tail" in the module docs).
    filled: u64,
    segments: BTreeMap<u64, Segment>,
    /// Everything before this position is known to be on stable storage.
    durable: WalPos,
    /// Bumped whenever a segment file is created; the directory needs an fsync while
    /// `dir_synced_gen < dir_gen`. Generations (not a flag) so that a rotation never mistakes
    /// a directory sync that is still in flight on the flusher for a finished one.
    dir_gen: u64,
    dir_synced_gen: u64,
    pending: Vec<FlushCallback>,
    /// The position the flusher's current round makes durable, while one runs.
    inflight: Option<WalPos>,
    /// Callbacks of [`Wal::flush_upto`] whose position the current round covers: called when it
    /// ends, without a round of their own.
    riders: Vec<FlushCallback>,
    /// A round is running, from taking its requests until its callbacks have returned: on the
    /// flusher, or on the thread of a [`Wal::flush_here_when_idle`] caller. One at a time keeps
    /// callbacks in request order (the flusher waits for a caller's round, a caller never starts
    /// one beside the flusher's).
    round_running: bool,
    /// Flush requests the last round answered (1 in a lone writer's rounds).
    last_round_requests: usize,
    /// When the last flush was asked for (by [`Wal::flush`] or [`Wal::flush_here_when_idle`]).
    last_request: Option<Instant>,
    /// Inline flushing only: flushes wait in `pending` for [`Wal::run_deferred_flushes`].
    defer: bool,
    closing: bool,
    failed: Option<String>,
    scratch: Vec<u8>,
}

/// What one flusher round has to make durable, captured under the lock.
struct SyncSnapshot {
    target: WalPos,
    file: Option<(Arc<File>, PathBuf)>,
    dir_gen: Option<u64>,
}

impl State {
    fn next_pos(&self) -> WalPos {
        WalPos {
            segment: self.segment,
            offset: self.offset,
        }
    }

    fn check_usable(&self) -> Result<(), WalError> {
        if self.closing {
            return Err(WalError::Closed);
        }
        if let Some(reason) = &self.failed {
            return Err(WalError::Failed(reason.clone()));
        }
        Ok(())
    }

    fn poison(&mut self, err: &WalError) {
        if self.failed.is_none() {
            error!(error = %err, "WAL write/fsync failed; refusing all further appends");
            self.failed = Some(err.to_string());
        }
    }

    fn append(&mut self, cfg: &Config, payloads: &[&[u8]]) -> Result<Vec<WalPos>, WalError> {
        let mut buf = mem::take(&mut self.scratch);
        buf.clear();
        let result = self.append_into(cfg, payloads, &mut buf);
        if buf.capacity() <= SCRATCH_KEEP {
            self.scratch = buf;
        }
        match result {
            Ok(positions) => Ok(positions),
            Err(err) => {
                // Part of the batch may be in the file; only a reopen can sort out what is
                // intact, so stop accepting work.
                self.poison(&err);
                Err(err)
            }
        }
    }

    fn append_into(
        &mut self,
        cfg: &Config,
        payloads: &[&[u8]],
        buf: &mut Vec<u8>,
    ) -> Result<Vec<WalPos>, WalError> {
        let mut positions = Vec::with_capacity(payloads.len());
        for payload in payloads {
            positions.push(WalPos {
                segment: self.segment,
                offset: self.offset + buf.len() as u64,
            });
            encode_record(buf, payload);
            if self.offset + buf.len() as u64 >= cfg.segment_bytes {
                self.write_buf(cfg, buf)?;
                self.rotate(cfg)?;
            }
        }
        self.write_buf(cfg, buf)?;
        Ok(positions)
    }

    fn write_buf(&mut self, cfg: &Config, buf: &mut Vec<u8>) -> Result<(), WalError> {
        if buf.is_empty() {
            return Ok(());
        }
        cfg.inject_write(&self.path, false)?;
        self.file
            .write_all_at(buf, self.offset)
            .map_err(|e| io_err(&self.path, e))?;
        cfg.inject_write(&self.path, true)?;
        if let Some(fault) = cfg.lose_unsynced_due() {
            self.lose_unsynced(fault, buf.len() as u64);
        }
        self.offset += buf.len() as u64;
        if cfg.fsync && self.offset > self.filled {
            self.fill_ahead()?;
        }
        if let Some(seg) = self.segments.get_mut(&self.segment) {
            seg.len = self.offset;
        }
        buf.clear();
        Ok(())
    }

    /// The `lose_unsynced:N` fault: cuts the active segment back to what is known durable (older
    /// segments were synced when the next was started), as a power loss may leave it, and aborts.
    /// Called with the state lock held, so no sync can be under way on the bytes just written.
    fn lose_unsynced(&self, fault: Fault, just_written: u64) -> ! {
        let end = self.offset + just_written;
        let (keep, cut) = self.cut_to_durable();
        eprintln!(
            "kvnode: {ENV_FAULT}: cut {} back to {keep} bytes (dropping {} unsynced bytes): {cut:?}",
            self.path.display(),
            end.saturating_sub(keep)
        );
        crash(fault, &self.path)
    }

    /// Cuts the active segment back to what is known durable (older segments were synced when
    /// the next one began), as a power loss may leave it; returns the length kept.
    fn cut_to_durable(&self) -> (u64, io::Result<()>) {
        let keep = if self.durable.segment == self.segment {
            self.durable.offset
        } else {
            SEGMENT_HEADER_LEN
        };
        (keep, self.file.set_len(keep))
    }

    /// Writes [`FILL_AHEAD`] bytes of zeros after the tail, so that the fdatasyncs of the
    /// records written there need not change the file's size (module docs).
    fn fill_ahead(&mut self) -> Result<(), WalError> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let end = self.offset + FILL_AHEAD;
        let mut at = self.offset;
        while at < end {
            let n = (end - at).min(ZEROS.len() as u64) as usize;
            self.file
                .write_all_at(&ZEROS[..n], at)
                .map_err(|e| io_err(&self.path, e))?;
            at += n as u64;
        }
        self.filled = end;
        Ok(())
    }

    /// Cuts the zeros after the last record of the active segment off its file.
    fn trim_fill(&mut self) -> Result<(), WalError> {
        if self.filled > self.offset {
            self.file
                .set_len(self.offset)
                .map_err(|e| io_err(&self.path, e))?;
            self.filled = self.offset;
        }
        Ok(())
    }

    /// Starts the next segment. The old one is made durable first (module docs: rotation is a
    /// durability barrier), and ends at its last record: damage anywhere in a non-last segment,
    /// zeros included, is corruption. This blocks appends for one fsync per `segment_bytes`.
    fn rotate(&mut self, cfg: &Config) -> Result<(), WalError> {
        self.trim_fill()?;
        cfg.sync_file(&self.file, &self.path)?;
        if self.dir_synced_gen < self.dir_gen {
            cfg.sync_dir()?;
            self.dir_synced_gen = self.dir_gen;
        }
        let segment = self.segment + 1;
        let path = cfg.segment_path(segment);
        let file = Arc::new(create_segment(&path, segment)?);
        self.segments.insert(
            segment,
            Segment {
                len: SEGMENT_HEADER_LEN,
                file: Some(Arc::clone(&file)),
            },
        );
        self.dir_gen += 1;
        self.segment = segment;
        self.file = file;
        self.path = path;
        self.offset = SEGMENT_HEADER_LEN;
        self.filled = SEGMENT_HEADER_LEN;
        debug!(segment, "WAL rotated to a new segment");
        Ok(())
    }

    fn sync_snapshot(&self) -> Result<SyncSnapshot, WalError> {
        if let Some(reason) = &self.failed {
            return Err(WalError::Failed(reason.clone()));
        }
        let target = self.next_pos();
        // Records in older segments were synced by `rotate`, so syncing the active file
        // covers everything written before `target`.
        let file = (target > self.durable).then(|| (Arc::clone(&self.file), self.path.clone()));
        let dir_gen = (self.dir_synced_gen < self.dir_gen).then_some(self.dir_gen);
        Ok(SyncSnapshot {
            target,
            file,
            dir_gen,
        })
    }
}

struct Shared {
    cfg: Config,
    state: Mutex<State>,
    /// Wakes the flusher when callbacks are queued or the WAL is closing.
    wake: Condvar,
    /// Serialises `remove_segments_before` so removals stay oldest-first on disk.
    remove_lock: Mutex<()>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // No code path panics while holding the lock, so a poisoned mutex still guards
        // consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn sync_round(&self, snap: SyncSnapshot) -> Result<(), WalError> {
        let synced = (|| {
            if let Some((file, path)) = &snap.file {
                self.cfg.sync_file(file, path)?;
            }
            if snap.dir_gen.is_some() {
                self.cfg.sync_dir()?;
            }
            Ok(())
        })();
        let mut st = self.lock();
        match synced {
            Ok(()) => {
                st.durable = st.durable.max(snap.target);
                if let Some(gen) = snap.dir_gen {
                    st.dir_synced_gen = st.dir_synced_gen.max(gen);
                }
                Ok(())
            }
            Err(err) => {
                st.poison(&err);
                Err(err)
            }
        }
    }
}

fn run_flusher(shared: &Shared) {
    loop {
        let (batch, snapshot, exit) = {
            let mut st = shared.lock();
            // This thread's previous round (if any) has answered all its callbacks. The flag
            // can only be its own here: no caller starts a round while it is set, and a round
            // that ran beside a caller's (on close) ended the loop.
            st.round_running = false;
            // On close the flusher goes ahead beside a caller's round: that caller's callback
            // may then come after the last ones (a callback that closes the WAL cannot wait
            // for the round that runs it).
            while !st.closing && (st.round_running || st.pending.is_empty()) {
                st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
            }
            let snapshot = st.sync_snapshot();
            // Beside a caller's round (on close only), `inflight` stays that round's: riders
            // joined it knowing only its target, and this round's covers it too.
            if !st.round_running {
                st.inflight = snapshot.as_ref().ok().map(|s| s.target);
            }
            st.round_running = true;
            (mem::take(&mut st.pending), snapshot, st.closing)
        };
        // The lock is released here: appends proceed while we fsync.
        let result = snapshot.and_then(|snap| shared.sync_round(snap));
        let riders = {
            let mut st = shared.lock();
            st.inflight = None;
            st.last_round_requests = batch.len() + st.riders.len();
            mem::take(&mut st.riders)
        };
        if !batch.is_empty() {
            shared
                .cfg
                .counters
                .flush_rounds
                .fetch_add(1, Ordering::Relaxed);
        }
        answer(batch.into_iter().chain(riders), &result);
        if exit {
            return;
        }
    }
}

/// Calls each callback of a round with its outcome.
fn answer(callbacks: impl Iterator<Item = FlushCallback>, result: &Result<(), WalError>) {
    for done in callbacks {
        let outcome = shared_outcome(result);
        if panic::catch_unwind(AssertUnwindSafe(move || done(outcome))).is_err() {
            error!("WAL flush callback panicked");
        }
    }
}

/// One round's outcome, for each of the callbacks it answers.
fn shared_outcome(result: &Result<(), WalError>) -> Result<(), WalError> {
    result.as_ref().map(|_| ()).map_err(WalError::duplicate)
}

/// Hands `start` a flush callback and waits for it to be called.
async fn completion(start: impl FnOnce(FlushCallback)) -> Result<(), WalError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    start(Box::new(move |result| {
        // The receiver may have been dropped (caller cancelled); nothing to do then.
        let _ = tx.send(result);
    }));
    rx.await.unwrap_or(Err(WalError::Closed))
}

/// The node's write-ahead log. Cheap to share as `Arc<Wal>`; all methods take `&self`.
pub struct Wal {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for Wal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wal")
            .field("dir", &self.shared.cfg.dir)
            .field("next_pos", &self.next_pos())
            .finish_non_exhaustive()
    }
}

impl Wal {
    /// Opens (creating `dir` if needed) and replays every intact record in order, calling
    /// `replay(pos, payload)` for each. A torn tail of the last segment is truncated (with a
    /// `warn!`); any other damage is [`WalError::Corrupt`] (module docs give the exact rule).
    /// An error from `replay` aborts open as [`WalError::Replay`].
    ///
    /// Also reads the `KV_WAL_FAULT` testing hook (module docs); a malformed value refuses to
    /// open.
    pub fn open(
        opts: WalOptions,
        replay: impl FnMut(WalPos, &[u8]) -> Result<(), String>,
    ) -> Result<Wal, WalError> {
        let fault = Fault::from_env().map_err(|reason| {
            io_err(
                &opts.dir,
                io::Error::new(io::ErrorKind::InvalidInput, reason),
            )
        })?;
        Wal::open_with_fault(opts, fault, replay)
    }

    fn open_with_fault(
        opts: WalOptions,
        fault: Option<Fault>,
        mut replay: impl FnMut(WalPos, &[u8]) -> Result<(), String>,
    ) -> Result<Wal, WalError> {
        let cfg = Config {
            dir: opts.dir,
            segment_bytes: opts.segment_bytes,
            fsync: opts.fsync,
            inline_flush: opts.inline_flush,
            counters: Counters::default(),
            #[cfg(test)]
            fail_syncs: std::sync::atomic::AtomicBool::new(false),
            fault,
            fault_armed: std::sync::atomic::AtomicBool::new(false),
            fault_syncs: AtomicU64::new(0),
            fault_writes: AtomicU64::new(0),
        };
        prepare_dir(&cfg)?;
        let numbers = list_segments(&cfg.dir)?;
        check_contiguous(&cfg, &numbers)?;

        let mut segments = BTreeMap::new();
        let mut records = 0u64;
        let mut last = None;
        for (i, &segment) in numbers.iter().enumerate() {
            let mut seg = OpenSegment::open(&cfg, segment, i + 1 == numbers.len())?;
            seg.recover(&cfg, &mut replay, &mut records)?;
            segments.insert(
                segment,
                Segment {
                    len: seg.len,
                    file: None,
                },
            );
            last = Some(seg);
        }

        let mut dir_gen = 0;
        let (segment, file, path, offset) = match last {
            Some(seg) => (seg.segment, seg.file, seg.path, seg.len),
            None => {
                let path = cfg.segment_path(1);
                let file = create_segment(&path, 1)?;
                segments.insert(
                    1,
                    Segment {
                        len: SEGMENT_HEADER_LEN,
                        file: None,
                    },
                );
                dir_gen += 1;
                (1, file, path, SEGMENT_HEADER_LEN)
            }
        };
        // What we just replayed may still sit only in the page cache of a process that died
        // before flushing; our caller will treat it as durable, so make it so.
        cfg.sync_file(&file, &path)?;
        cfg.sync_dir()?;

        let file = Arc::new(file);
        if let Some(seg) = segments.get_mut(&segment) {
            seg.file = Some(Arc::clone(&file));
        }
        let next = WalPos { segment, offset };
        let mut state = State {
            segment,
            file,
            path,
            offset,
            filled: offset,
            segments,
            durable: next,
            dir_gen,
            dir_synced_gen: dir_gen,
            pending: Vec::new(),
            inflight: None,
            riders: Vec::new(),
            defer: false,
            closing: false,
            failed: None,
            scratch: Vec::new(),
            round_running: false,
            last_round_requests: 0,
            last_request: None,
        };
        // The last segment may be full already (e.g. segment_bytes was lowered).
        if offset >= cfg.segment_bytes && offset > SEGMENT_HEADER_LEN {
            state.rotate(&cfg)?;
        }
        let next = state.next_pos();

        let shared = Arc::new(Shared {
            cfg,
            state: Mutex::new(state),
            wake: Condvar::new(),
            remove_lock: Mutex::new(()),
        });
        let handle = if shared.cfg.inline_flush {
            None
        } else {
            let worker = Arc::clone(&shared);
            let handle = thread::Builder::new()
                .name("wal-flusher".into())
                .spawn(move || run_flusher(&worker))
                .map_err(|e| io_err(&shared.cfg.dir, e))?;
            Some(handle)
        };
        info!(
            dir = %shared.cfg.dir.display(),
            segments = numbers.len().max(1),
            records,
            next = %next,
            "WAL opened"
        );
        if let Some(fault) = shared.cfg.fault {
            warn!(
                dir = %shared.cfg.dir.display(),
                "testing hook {ENV_FAULT}={fault} is set: this WAL will fail on purpose"
            );
            shared.cfg.fault_armed.store(true, Ordering::SeqCst);
        }
        Ok(Wal {
            shared,
            flusher: Mutex::new(handle),
        })
    }

    /// Writes the records (to the page cache, not yet durable) and returns their positions,
    /// in order. Rotates segments as needed; a record never spans two segments. The whole
    /// batch is rejected with [`WalError::TooLarge`] before anything is written if any payload
    /// exceeds [`MAX_RECORD`].
    pub fn append(&self, payloads: &[&[u8]]) -> Result<Vec<WalPos>, WalError> {
        if let Some(p) = payloads.iter().find(|p| p.len() > MAX_RECORD) {
            return Err(WalError::TooLarge(p.len()));
        }
        let positions = {
            let mut st = self.shared.lock();
            st.check_usable()?;
            st.append(&self.shared.cfg, payloads)?
        };
        let counters = &self.shared.cfg.counters;
        counters
            .records
            .fetch_add(payloads.len() as u64, Ordering::Relaxed);
        let bytes: usize = payloads.iter().map(|p| p.len()).sum();
        counters.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        Ok(positions)
    }

    /// Calls `done` exactly once, after every record appended before this call is durable,
    /// or with the error that prevented it. Completions happen in request order, on the
    /// `wal-flusher` thread (or on the thread of a [`Wal::flush_here_when_idle`] caller whose
    /// round covers them as riders); concurrent requests share one fsync (group commit). If the
    /// WAL is closed or has failed, `done` is called immediately on the calling thread.
    pub fn flush(&self, done: Box<dyn FnOnce(Result<(), WalError>) + Send + 'static>) {
        self.shared
            .cfg
            .counters
            .flush_requests
            .fetch_add(1, Ordering::Relaxed);
        if self.shared.cfg.inline_flush {
            let snapshot = {
                let mut st = self.shared.lock();
                if st.defer && st.check_usable().is_ok() {
                    st.pending.push(done);
                    return;
                }
                st.check_usable().and_then(|()| st.sync_snapshot())
            };
            done(snapshot.and_then(|snap| self.shared.sync_round(snap)));
            return;
        }
        let rejected = {
            let mut st = self.shared.lock();
            match st.check_usable() {
                Ok(()) => {
                    st.pending.push(done);
                    st.last_request = Some(Instant::now());
                    None
                }
                Err(err) => Some((done, err)),
            }
        };
        match rejected {
            None => self.shared.wake.notify_one(),
            Some((done, err)) => done(Err(err)),
        }
    }

    /// As [`Wal::flush`], but when the WAL is idle (no round running or queued, and the last
    /// round answered a single request, and no flush was asked for in the last [`IDLE_GAP`])
    /// the round runs on the calling thread, `done` included,
    /// before this returns: no hand-offs to and from the flusher thread (see "Group commit" in
    /// the module docs). The caller then blocks for an fsync, so an async caller should be one
    /// that has nothing else to do until it is done.
    pub fn flush_here_when_idle(&self, done: FlushCallback) {
        if self.shared.cfg.inline_flush {
            return self.flush(done);
        }
        let snap = {
            let mut st = self.shared.lock();
            if st.round_running
                || !st.pending.is_empty()
                || st.last_round_requests > 1
                || st.last_request.is_some_and(|t| t.elapsed() < IDLE_GAP)
                || st.check_usable().is_err()
            {
                drop(st);
                return self.flush(done);
            }
            match st.sync_snapshot() {
                Ok(snap) => {
                    st.inflight = Some(snap.target);
                    st.round_running = true;
                    st.last_request = Some(Instant::now());
                    snap
                }
                Err(err) => {
                    drop(st);
                    return done(Err(err));
                }
            }
        };
        let counters = &self.shared.cfg.counters;
        counters.flush_requests.fetch_add(1, Ordering::Relaxed);
        counters.flush_rounds.fetch_add(1, Ordering::Relaxed);
        let result = self.shared.sync_round(snap);
        let riders = {
            let mut st = self.shared.lock();
            st.inflight = None;
            st.last_round_requests = 1 + st.riders.len();
            mem::take(&mut st.riders)
        };
        answer(std::iter::once(done).chain(riders), &result);
        let queued = {
            let mut st = self.shared.lock();
            st.round_running = false;
            !st.pending.is_empty()
        };
        // Flushes asked for meanwhile wait in `pending` for the flusher (which their callers
        // woke, and which found this round running); nothing else needs it woken.
        if queued {
            self.shared.wake.notify_one();
        }
    }

    /// Calls `done` once the record at `pos` (and with it every record before) is durable, or
    /// with the error that prevented it. Unlike [`Wal::flush`] it asks for no round of its own
    /// when it need not: at once if `pos` is already durable, at the end of the flusher's current
    /// round if that round covers `pos`, otherwise as [`Wal::flush`] does.
    pub fn flush_upto(&self, pos: WalPos, done: FlushCallback) {
        if !self.shared.cfg.inline_flush {
            let mut st = self.shared.lock();
            if st.check_usable().is_ok() {
                if pos < st.durable {
                    drop(st);
                    done(Ok(()));
                    return;
                }
                if st.inflight.is_some_and(|target| pos < target) {
                    st.riders.push(done);
                    return;
                }
            }
        }
        self.flush(done);
    }

    /// For a deterministic simulation, which runs a whole cluster on one thread (inline
    /// flushing only): from now on a flush waits until [`Wal::run_deferred_flushes`] runs it,
    /// the way a flusher thread's fsync takes time, so records can be written and not yet
    /// durable, and [`Wal::lose_power`] can lose them.
    pub fn defer_flushes(&self) {
        if self.shared.cfg.inline_flush {
            self.shared.lock().defer = true;
        }
    }

    /// Runs the flushes [`Wal::defer_flushes`] held back: one round for all of them.
    pub fn run_deferred_flushes(&self) {
        let (batch, snapshot) = {
            let mut st = self.shared.lock();
            if st.pending.is_empty() {
                return;
            }
            let snapshot = st.check_usable().and_then(|()| st.sync_snapshot());
            (mem::take(&mut st.pending), snapshot)
        };
        let result = snapshot.and_then(|snap| self.shared.sync_round(snap));
        for done in batch {
            done(shared_outcome(&result));
        }
    }

    /// A simulated power loss: the active segment is cut back to what is known durable (older
    /// segments were synced when the next one began), as the disk may be left, and the WAL
    /// takes no more work. Waiting flushes fail with [`WalError::Closed`].
    pub fn lose_power(&self) {
        let pending = {
            let mut st = self.shared.lock();
            if st.closing {
                return;
            }
            st.closing = true;
            let (keep, cut) = st.cut_to_durable();
            if let Err(e) = cut {
                error!(error = %e, "simulated power loss: cutting the WAL failed");
            }
            st.offset = keep;
            mem::take(&mut st.pending)
        };
        for done in pending {
            done(Err(WalError::Closed));
        }
    }

    /// Async form of [`Wal::flush_upto`].
    pub async fn sync_upto(&self, pos: WalPos) -> Result<(), WalError> {
        completion(|done| self.flush_upto(pos, done)).await
    }

    /// Async form of [`Wal::flush`].
    pub async fn sync(&self) -> Result<(), WalError> {
        completion(|done| self.flush(done)).await
    }

    /// Reads back the payload of the record at `pos` (checksum verified).
    /// [`WalError::NoRecord`] if `pos` lies outside every live segment; a position inside a
    /// segment that is not a record start normally yields [`WalError::Corrupt`].
    pub fn read(&self, pos: WalPos) -> Result<Vec<u8>, WalError> {
        let (file, seg_len) = {
            let st = self.shared.lock();
            if st.closing {
                return Err(WalError::Closed);
            }
            let seg = st
                .segments
                .get(&pos.segment)
                .ok_or(WalError::NoRecord(pos))?;
            (seg.file.clone(), seg.len)
        };
        if pos.offset < SEGMENT_HEADER_LEN || pos.offset.saturating_add(RECORD_HEADER_LEN) > seg_len
        {
            return Err(WalError::NoRecord(pos));
        }
        let path = self.shared.cfg.segment_path(pos.segment);
        let file = match file {
            Some(file) => file,
            None => self.open_for_read(pos, &path)?,
        };
        let mut header = [0u8; RECORD_HEADER_LEN as usize];
        file.read_exact_at(&mut header, pos.offset)
            .map_err(|e| io_err(&path, e))?;
        let len = le_u32(&header, 0);
        let crc = le_u32(&header, 4);
        let end = pos.offset + RECORD_HEADER_LEN + u64::from(len);
        if len as usize > MAX_RECORD || end > seg_len {
            return Err(WalError::Corrupt {
                path,
                offset: pos.offset,
                reason: format!("length {len} runs past the intact data; is {pos} a record start?"),
            });
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact_at(&mut payload, pos.offset + RECORD_HEADER_LEN)
            .map_err(|e| io_err(&path, e))?;
        if record_crc(&header[..4], &payload) != crc {
            return Err(WalError::Corrupt {
                path,
                offset: pos.offset,
                reason: "checksum mismatch on read".into(),
            });
        }
        Ok(payload)
    }

    /// Opens an older segment for reading and caches the handle. Opening happens outside
    /// the lock so appends are not held up by it.
    fn open_for_read(&self, pos: WalPos, path: &Path) -> Result<Arc<File>, WalError> {
        let opened = Arc::new(File::open(path).map_err(|e| io_err(path, e))?);
        let mut st = self.shared.lock();
        match st.segments.get_mut(&pos.segment) {
            Some(seg) => Ok(Arc::clone(seg.file.get_or_insert(opened))),
            None => Err(WalError::NoRecord(pos)),
        }
    }

    /// Deletes every segment numbered below `pos.segment`, except the active one, oldest
    /// first. Returns how many files were removed.
    pub fn remove_segments_before(&self, pos: WalPos) -> Result<usize, WalError> {
        let _serial = self
            .shared
            .remove_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let victims: Vec<u64> = {
            let st = self.shared.lock();
            if st.closing {
                return Err(WalError::Closed);
            }
            let limit = pos.segment.min(st.segment);
            st.segments.range(..limit).map(|(&n, _)| n).collect()
        };
        let cfg = &self.shared.cfg;
        let mut removed = 0;
        for segment in victims {
            let path = cfg.segment_path(segment);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
            // One directory sync per unlink: otherwise a crash could persist a later unlink
            // but not an earlier one, and open would see a gap (reported as corruption).
            cfg.sync_dir()?;
            self.shared.lock().segments.remove(&segment);
            removed += 1;
        }
        if removed > 0 {
            debug!(removed, before = %pos, "WAL segments removed");
        }
        Ok(removed)
    }

    /// Position the next appended record will get.
    pub fn next_pos(&self) -> WalPos {
        self.shared.lock().next_pos()
    }

    /// Whether the record at `pos` (and so every record before it) is known to be on stable
    /// storage: a completed flush covered it. Cheap (one lock, no I/O), for callers that would
    /// otherwise wait for a flush that is already done. `false` only means "not known durable".
    pub fn is_durable(&self, pos: WalPos) -> bool {
        pos < self.shared.lock().durable
    }

    /// Rejects new work, lets the flusher complete every queued flush plus a final sync, and
    /// waits for it to stop. Idempotent; also run on drop. Later calls return
    /// [`WalError::Closed`].
    pub fn close(&self) {
        if self.shared.cfg.inline_flush {
            let (snapshot, deferred) = {
                let mut st = self.shared.lock();
                if st.closing {
                    return;
                }
                st.closing = true;
                (st.sync_snapshot(), mem::take(&mut st.pending))
            };
            let result = snapshot.and_then(|snap| self.shared.sync_round(snap));
            if let Err(e) = &result {
                error!(error = %e, "final WAL sync on close failed");
            }
            // Flushes held back by `defer_flushes`: the final sync covered them.
            for done in deferred {
                done(shared_outcome(&result));
            }
            self.trim_fill_on_close();
            return;
        }
        self.shared.lock().closing = true;
        self.shared.wake.notify_all();
        // Take the handle in its own statement: holding this mutex while joining would
        // deadlock against a flush callback that calls `close` too.
        let handle = self
            .flusher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            if handle.thread().id() == thread::current().id() {
                // Called from a flush callback (or the last Arc dropped there): the flusher
                // notices `closing` after this round and exits on its own.
                return;
            }
            if handle.join().is_err() {
                error!("WAL flusher thread panicked");
            }
        }
        self.trim_fill_on_close();
    }

    /// A closed WAL's last segment ends at its last record, as a clean stop leaves it. (Left
    /// there, the zeros would only be cut off by the next open.)
    fn trim_fill_on_close(&self) {
        let mut st = self.shared.lock();
        if st.failed.is_none() {
            if let Err(e) = st.trim_fill() {
                warn!(error = %e, "cannot trim the WAL's zero tail on close");
            }
        }
    }

    /// Counters since open.
    pub fn stats(&self) -> WalStats {
        let c = &self.shared.cfg.counters;
        WalStats {
            fsyncs: c.fsyncs.load(Ordering::Relaxed),
            records: c.records.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            flush_requests: c.flush_requests.load(Ordering::Relaxed),
            flush_rounds: c.flush_rounds.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.close();
    }
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn record_crc(len_bytes: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len_bytes);
    hasher.update(payload);
    hasher.finalize()
}

/// Callers have checked `payload.len() <= MAX_RECORD`, so the length fits in a u32.
fn encode_record(buf: &mut Vec<u8>, payload: &[u8]) {
    let len = (payload.len() as u32).to_le_bytes();
    buf.extend_from_slice(&len);
    buf.extend_from_slice(&record_crc(&len, payload).to_le_bytes());
    buf.extend_from_slice(payload);
}

fn segment_header(segment: u64) -> [u8; SEGMENT_HEADER_LEN as usize] {
    let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..].copy_from_slice(&segment.to_le_bytes());
    header
}

/// Creates a new segment with its header. The header and the directory entry become durable
/// with the next flush round (or the next rotation), before any record in it is acknowledged.
fn create_segment(path: &Path, segment: u64) -> Result<File, WalError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    file.write_all_at(&segment_header(segment), 0)
        .map_err(|e| io_err(path, e))?;
    Ok(file)
}

fn prepare_dir(cfg: &Config) -> Result<(), WalError> {
    let dir = &cfg.dir;
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(io_err(
            dir,
            io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists but is not a directory",
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            // The new directory's own entry must survive too, or the whole WAL could vanish.
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if cfg.fsync {
                let handle = File::open(parent).map_err(|e| io_err(parent, e))?;
                cfg.sync_file(&handle, parent)?;
            }
            Ok(())
        }
        Err(e) => Err(io_err(dir, e)),
    }
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let stem = name.strip_suffix(".wal")?;
    if stem.len() == 20 && stem.bytes().all(|b| b.is_ascii_digit()) {
        stem.parse().ok()
    } else {
        None
    }
}

fn list_segments(dir: &Path) -> Result<Vec<u64>, WalError> {
    let mut numbers = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        match parse_segment_name(name) {
            Some(n) => numbers.push(n),
            None if name.ends_with(".wal") => {
                warn!(file = name, dir = %dir.display(), "ignoring unexpected file in WAL directory");
            }
            None => {}
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Segments are only ever removed from the front, so a hole means a lost file.
fn check_contiguous(cfg: &Config, numbers: &[u64]) -> Result<(), WalError> {
    if numbers.first() == Some(&0) {
        return Err(WalError::Corrupt {
            path: cfg.segment_path(0),
            offset: 0,
            reason: "segment numbers start at 1".into(),
        });
    }
    for pair in numbers.windows(2) {
        if pair[1] != pair[0] + 1 {
            return Err(WalError::Corrupt {
                path: cfg.segment_path(pair[1]),
                offset: 0,
                reason: format!(
                    "segment {} is missing (found {} then {})",
                    pair[0] + 1,
                    pair[0],
                    pair[1]
                ),
            });
        }
    }
    Ok(())
}

enum TailScan {
    NoIntactRecord,
    IntactRecordAt(u64),
    Inconclusive,
}

/// Looks for an intact record starting at any offset after the first byte of `tail`
/// (`tail` holds the file from `base` to EOF, `base` being where replay failed).
fn scan_tail(tail: &[u8], base: u64) -> TailScan {
    let header = RECORD_HEADER_LEN as usize;
    let mut budget = TAIL_SCAN_BUDGET;
    let mut i = 1;
    while i + header <= tail.len() {
        let len = le_u32(tail, i) as usize;
        if len <= MAX_RECORD && len <= tail.len() - i - header {
            let cost = 4 + len as u64;
            if cost > budget {
                return TailScan::Inconclusive;
            }
            budget -= cost;
            let payload = &tail[i + header..i + header + len];
            if record_crc(&tail[i..i + 4], payload) == le_u32(tail, i + 4) {
                return TailScan::IntactRecordAt(base + i as u64);
            }
        }
        i += 1;
    }
    TailScan::NoIntactRecord
}

/// A segment being replayed by `open`.
struct OpenSegment {
    segment: u64,
    path: PathBuf,
    file: File,
    /// File length; after `recover`, the length of the intact prefix.
    len: u64,
    is_last: bool,
}

impl OpenSegment {
    fn open(cfg: &Config, segment: u64, is_last: bool) -> Result<OpenSegment, WalError> {
        let path = cfg.segment_path(segment);
        let file = OpenOptions::new()
            .read(true)
            .write(is_last)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        let len = file.metadata().map_err(|e| io_err(&path, e))?.len();
        Ok(OpenSegment {
            segment,
            path,
            file,
            len,
            is_last,
        })
    }

    fn corrupt(&self, offset: u64, reason: String) -> WalError {
        WalError::Corrupt {
            path: self.path.clone(),
            offset,
            reason,
        }
    }

    /// Validates the header, replays the records and applies the torn-tail rule.
    fn recover(
        &mut self,
        cfg: &Config,
        replay: &mut ReplayFn<'_>,
        records: &mut u64,
    ) -> Result<(), WalError> {
        if let Some(reason) = self.check_header()? {
            return self.handle_damage(cfg, 0, reason);
        }
        match self.replay_records(replay, records)? {
            Some((offset, reason)) => self.handle_damage(cfg, offset, reason),
            None => Ok(()),
        }
    }

    /// `Ok(Some(reason))` for a header that a crash during creation could have left behind
    /// (incomplete or all zeros); anything else that is wrong is corruption outright.
    fn check_header(&self) -> Result<Option<String>, WalError> {
        let mut header = [0u8; SEGMENT_HEADER_LEN as usize];
        let have = self.len.min(SEGMENT_HEADER_LEN) as usize;
        self.file
            .read_exact_at(&mut header[..have], 0)
            .map_err(|e| io_err(&self.path, e))?;
        if header == segment_header(self.segment) {
            return Ok(None);
        }
        if have < header.len() {
            return Ok(Some(format!("segment header is incomplete ({have} bytes)")));
        }
        if header.iter().all(|&b| b == 0) {
            return Ok(Some("segment header is all zeros".into()));
        }
        let reason = if &header[..8] != MAGIC {
            "bad magic: not a kvstore WAL segment".to_string()
        } else {
            let mut number = [0u8; 8];
            number.copy_from_slice(&header[8..]);
            format!(
                "header says segment {}, file name says {}",
                u64::from_le_bytes(number),
                self.segment
            )
        };
        Err(self.corrupt(0, reason))
    }

    /// Replays records until EOF or the first failure, returned as `(offset, reason)`.
    fn replay_records(
        &self,
        replay: &mut ReplayFn<'_>,
        records: &mut u64,
    ) -> Result<Option<(u64, String)>, WalError> {
        let io = |e| io_err(&self.path, e);
        let mut reader = BufReader::with_capacity(1 << 20, &self.file);
        reader
            .seek(SeekFrom::Start(SEGMENT_HEADER_LEN))
            .map_err(io)?;
        let mut offset = SEGMENT_HEADER_LEN;
        let mut payload = Vec::new();
        loop {
            let remaining = self.len - offset;
            if remaining == 0 {
                return Ok(None);
            }
            if remaining < RECORD_HEADER_LEN {
                let reason = format!("incomplete record header ({remaining} bytes before EOF)");
                return Ok(Some((offset, reason)));
            }
            let mut header = [0u8; RECORD_HEADER_LEN as usize];
            reader.read_exact(&mut header).map_err(io)?;
            let len = le_u32(&header, 0);
            if len as usize > MAX_RECORD {
                let reason = format!("record length {len} exceeds the maximum {MAX_RECORD}");
                return Ok(Some((offset, reason)));
            }
            if u64::from(len) > remaining - RECORD_HEADER_LEN {
                let reason = format!("record of {len} bytes extends past EOF");
                return Ok(Some((offset, reason)));
            }
            payload.resize(len as usize, 0);
            reader.read_exact(&mut payload).map_err(io)?;
            if record_crc(&header[..4], &payload) != le_u32(&header, 4) {
                return Ok(Some((offset, "checksum mismatch".into())));
            }
            let pos = WalPos {
                segment: self.segment,
                offset,
            };
            replay(pos, &payload).map_err(|reason| WalError::Replay { pos, reason })?;
            *records += 1;
            offset += RECORD_HEADER_LEN + u64::from(len);
        }
    }

    /// The torn-tail rule from the module docs.
    fn handle_damage(&mut self, cfg: &Config, at: u64, reason: String) -> Result<(), WalError> {
        if !self.is_last {
            return Err(self.corrupt(at, reason));
        }
        let tail_len = usize::try_from(self.len - at)
            .map_err(|_| self.corrupt(at, format!("{reason}; tail too large to scan")))?;
        let mut tail = vec![0u8; tail_len];
        self.file
            .read_exact_at(&mut tail, at)
            .map_err(|e| io_err(&self.path, e))?;
        match scan_tail(&tail, at) {
            TailScan::IntactRecordAt(next) => Err(self.corrupt(
                at,
                format!("{reason}, but an intact record follows at offset {next}: not a torn tail"),
            )),
            TailScan::Inconclusive => Err(self.corrupt(
                at,
                format!("{reason}; cannot rule out intact records after it (scan budget spent)"),
            )),
            TailScan::NoIntactRecord => {
                if at >= SEGMENT_HEADER_LEN && tail.iter().all(|&b| b == 0) {
                    // The zeros written ahead of the tail (or blocks a crash left unwritten).
                    debug!(
                        path = %self.path.display(),
                        offset = at,
                        zero_bytes = self.len - at,
                        "cutting the zeros after the WAL's last record"
                    );
                } else {
                    warn!(
                        path = %self.path.display(),
                        offset = at,
                        dropped_bytes = self.len - at,
                        %reason,
                        "truncating torn tail of the WAL"
                    );
                }
                let keep = if at < SEGMENT_HEADER_LEN {
                    // Crash while creating the segment: start it over.
                    self.file.set_len(0).map_err(|e| io_err(&self.path, e))?;
                    self.file
                        .write_all_at(&segment_header(self.segment), 0)
                        .map_err(|e| io_err(&self.path, e))?;
                    SEGMENT_HEADER_LEN
                } else {
                    self.file.set_len(at).map_err(|e| io_err(&self.path, e))?;
                    at
                };
                // Durable before anything is appended behind it.
                cfg.sync_file(&self.file, &self.path)?;
                self.len = keep;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::future::Future;
    use std::io::Write;
    use std::sync::mpsc;
    use std::task::{Context, Poll, Wake, Waker};
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(30);

    type Replayed = Vec<(WalPos, Vec<u8>)>;

    fn opts(dir: &Path) -> WalOptions {
        WalOptions {
            dir: dir.to_path_buf(),
            segment_bytes: 1 << 20,
            fsync: true,
            inline_flush: false,
        }
    }

    fn open_collect(opts: WalOptions) -> Result<(Wal, Replayed), WalError> {
        let mut seen = Vec::new();
        let wal = Wal::open(opts, |pos, payload| {
            seen.push((pos, payload.to_vec()));
            Ok(())
        })?;
        Ok((wal, seen))
    }

    fn replay_all(opts: WalOptions) -> Result<Replayed, WalError> {
        open_collect(opts).map(|(wal, seen)| {
            wal.close();
            seen
        })
    }

    fn flush_wait(wal: &Wal) -> Result<(), WalError> {
        let (tx, rx) = mpsc::channel();
        wal.flush(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv_timeout(WAIT).expect("flush callback never ran")
    }

    fn payload(i: usize) -> Vec<u8> {
        format!("record-{i}-{}", "x".repeat(i % 37)).into_bytes()
    }

    /// Appends `n` records one by one, flushes, closes; returns their positions.
    fn write_records(opts: WalOptions, n: usize) -> Vec<WalPos> {
        let (wal, _) = open_collect(opts).unwrap();
        let positions: Vec<WalPos> = (0..n)
            .map(|i| wal.append(&[&payload(i)]).unwrap()[0])
            .collect();
        flush_wait(&wal).unwrap();
        wal.close();
        positions
    }

    fn expected(positions: &[WalPos], range: std::ops::Range<usize>) -> Replayed {
        range.map(|i| (positions[i], payload(i))).collect()
    }

    fn seg_path(dir: &Path, segment: u64) -> PathBuf {
        dir.join(format!("{segment:020}.wal"))
    }

    fn file_len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    fn flip_byte(path: &Path, at: u64) {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at).unwrap();
        b[0] ^= 0x40;
        file.write_all_at(&b, at).unwrap();
    }

    fn append_bytes(path: &Path, bytes: &[u8]) {
        let mut file = OpenOptions::new().append(true).open(path).unwrap();
        file.write_all(bytes).unwrap();
    }

    fn wal_files(dir: &Path) -> Vec<u64> {
        let mut v: Vec<u64> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| parse_segment_name(e.unwrap().file_name().to_str()?))
            .collect();
        v.sort_unstable();
        v
    }

    fn assert_corrupt(err: WalError, want_path: &Path, want_offset: u64) -> String {
        let msg = err.to_string();
        match err {
            WalError::Corrupt { path, offset, .. } => {
                assert_eq!(path, want_path);
                assert_eq!(offset, want_offset);
                let name = want_path.file_name().unwrap().to_str().unwrap();
                assert!(msg.contains(name), "message must name the file: {msg}");
                msg
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    /// Minimal executor so the async API can be tested without a tokio runtime.
    fn block_on<F: Future>(fut: F) -> F::Output {
        struct Unpark(thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut fut = std::pin::pin!(fut);
        loop {
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(v) => return v,
                Poll::Pending => thread::park(),
            }
        }
    }

    #[test]
    fn wal_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Wal>();
        check::<Arc<Wal>>();
    }

    #[test]
    fn fresh_open_creates_dir_and_first_segment() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/wal");
        let (wal, seen) = open_collect(opts(&dir)).unwrap();
        assert!(seen.is_empty());
        let first = WalPos {
            segment: 1,
            offset: SEGMENT_HEADER_LEN,
        };
        assert_eq!(wal.next_pos(), first);
        drop(wal);
        assert_eq!(file_len(&seg_path(&dir, 1)), SEGMENT_HEADER_LEN);
        let (wal, seen) = open_collect(opts(&dir)).unwrap();
        assert!(seen.is_empty());
        assert_eq!(wal.next_pos(), first);
    }

    #[test]
    fn open_makes_replayed_data_durable() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(opts(tmp.path()), 3);
        let (wal, seen) = open_collect(opts(tmp.path())).unwrap();
        assert_eq!(seen.len(), 3);
        // The previous process may have died before its flush: last segment + directory.
        assert!(wal.stats().fsyncs >= 2, "{:?}", wal.stats());
    }

    #[test]
    fn roundtrip_replays_in_order_with_same_positions() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let batches: Vec<Vec<Vec<u8>>> = vec![
            vec![b"one".to_vec()],
            vec![Vec::new(), b"three".to_vec(), vec![7u8; 5000]],
            vec![b"five".to_vec()],
        ];
        let mut written = Vec::new();
        for batch in &batches {
            let refs: Vec<&[u8]> = batch.iter().map(|p| p.as_slice()).collect();
            let before = wal.next_pos();
            let positions = wal.append(&refs).unwrap();
            assert_eq!(positions[0], before, "next_pos must predict the position");
            written.extend(positions.into_iter().zip(batch.iter().cloned()));
        }
        assert!(written.windows(2).all(|w| w[0].0 < w[1].0));
        // Readable before the flush, too: data reaches the file inside append.
        for (pos, data) in &written {
            assert_eq!(&wal.read(*pos).unwrap(), data);
        }
        flush_wait(&wal).unwrap();
        let stats = wal.stats();
        assert_eq!(stats.records, 5);
        assert_eq!(stats.bytes, 3 + 5 + 5000 + 4);
        drop(wal);

        let (wal, seen) = open_collect(opts(tmp.path())).unwrap();
        assert_eq!(seen, written);
        for (pos, data) in &written {
            assert_eq!(&wal.read(*pos).unwrap(), data);
        }
    }

    #[test]
    fn async_sync_completes() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let pos = wal.append(&[b"hello"]).unwrap()[0];
        block_on(wal.sync()).unwrap();
        wal.close();
        assert!(matches!(block_on(wal.sync()), Err(WalError::Closed)));
        drop(wal);
        let seen = replay_all(opts(tmp.path())).unwrap();
        assert_eq!(seen, vec![(pos, b"hello".to_vec())]);
    }

    /// `flush_upto` completes only once its position is durable, at once (without a round) when
    /// it already is, and never hangs, also while other threads append and flush around it.
    #[test]
    fn flush_upto_waits_for_its_position_and_no_longer() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let wal = Arc::new(wal);
        let pos = wal.append(&[b"first"]).unwrap()[0];
        block_on(wal.sync_upto(pos)).unwrap();
        assert!(wal.is_durable(pos));
        let before = wal.stats();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&done);
        wal.flush_upto(
            pos,
            Box::new(move |r| {
                r.unwrap();
                flag.store(true, Ordering::SeqCst);
            }),
        );
        assert!(
            done.load(Ordering::SeqCst),
            "already durable: answered at once"
        );
        assert_eq!(
            wal.stats().flush_requests,
            before.flush_requests,
            "no round asked"
        );

        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..4u8 {
            let (wal, tx) = (Arc::clone(&wal), tx.clone());
            thread::spawn(move || {
                for i in 0..200u32 {
                    let pos = wal.append(&[&[t; 40]]).unwrap()[0];
                    if i % 3 == 0 {
                        // Some plain flushes, so rounds are often in flight.
                        wal.flush(Box::new(|_| {}));
                    }
                    block_on(wal.sync_upto(pos)).unwrap();
                    assert!(wal.is_durable(pos), "completed before {pos} was durable");
                }
                tx.send(()).unwrap();
            });
        }
        for _ in 0..4 {
            rx.recv_timeout(Duration::from_secs(60))
                .expect("a flush_upto never completed (or its thread panicked)");
        }
        let s = wal.stats();
        eprintln!(
            "flush_upto: {} flush requests, {} rounds",
            s.flush_requests - before.flush_requests,
            s.flush_rounds - before.flush_rounds
        );
    }

    #[test]
    fn deferred_flushes_wait_for_their_round_and_a_power_loss_keeps_only_what_was_durable() {
        let tmp = tempfile::tempdir().unwrap();
        let o = WalOptions {
            inline_flush: true,
            ..opts(tmp.path())
        };
        let (wal, _) = open_collect(o.clone()).unwrap();
        wal.defer_flushes();
        let one = wal.append(&[b"one"]).unwrap()[0];
        let done = Arc::new(AtomicU64::new(0));
        let count = |done: &Arc<AtomicU64>| {
            let done = Arc::clone(done);
            Box::new(move |r: Result<(), WalError>| {
                r.unwrap();
                done.fetch_add(1, Ordering::SeqCst);
            })
        };
        wal.flush(count(&done));
        wal.flush_upto(one, count(&done));
        assert_eq!(
            done.load(Ordering::SeqCst),
            0,
            "held back until their round"
        );
        assert!(!wal.is_durable(one));
        wal.run_deferred_flushes();
        assert_eq!(done.load(Ordering::SeqCst), 2, "one round answers both");
        assert!(wal.is_durable(one));
        let two = wal.append(&[b"two"]).unwrap()[0];
        let lost = Arc::new(std::sync::Mutex::new(None));
        let seen = Arc::clone(&lost);
        wal.flush(Box::new(move |r| *seen.lock().unwrap() = Some(r.is_err())));
        wal.lose_power();
        assert_eq!(*lost.lock().unwrap(), Some(true), "a waiting flush fails");
        assert!(!wal.is_durable(two));
        assert!(matches!(wal.append(&[b"three"]), Err(WalError::Closed)));
        drop(wal);
        assert_eq!(
            replay_all(o.clone()).unwrap(),
            vec![(one, b"one".to_vec())],
            "only the durable record survives the power loss"
        );

        // A close (a process crash keeps what was written) runs what was held back.
        let (wal, _) = open_collect(o).unwrap();
        wal.defer_flushes();
        let before = done.load(Ordering::SeqCst);
        wal.append(&[b"four"]).unwrap();
        wal.flush(count(&done));
        wal.close();
        assert_eq!(done.load(Ordering::SeqCst), before + 1, "close answers it");
    }

    #[test]
    fn inline_flush_completes_before_returning_without_a_thread() {
        let tmp = tempfile::tempdir().unwrap();
        let o = WalOptions {
            inline_flush: true,
            ..opts(tmp.path())
        };
        let (wal, _) = open_collect(o.clone()).unwrap();
        assert!(wal.flusher.lock().unwrap().is_none());
        let opened = wal.stats().fsyncs;
        let pos = wal.append(&[b"one"]).unwrap()[0];
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Arc::clone(&done);
        wal.flush(Box::new(move |r| {
            r.unwrap();
            flag.store(true, Ordering::SeqCst);
        }));
        assert!(
            done.load(Ordering::SeqCst),
            "inline flush returned before its callback"
        );
        assert_eq!(wal.stats().fsyncs, opened + 1);
        // Nothing new: no second fsync.
        block_on(wal.sync()).unwrap();
        assert_eq!(wal.stats().fsyncs, opened + 1);
        let pos2 = wal.append(&[b"two"]).unwrap()[0];
        wal.close();
        assert!(matches!(block_on(wal.sync()), Err(WalError::Closed)));
        drop(wal);
        let seen = replay_all(o).unwrap();
        assert_eq!(
            seen,
            vec![(pos, b"one".to_vec()), (pos2, b"two".to_vec())],
            "close syncs what was appended"
        );
    }
    #[test]
    fn torn_tail_chopped_is_truncated_and_log_continues() {
        let tmp = tempfile::tempdir().unwrap();
        let positions = write_records(opts(tmp.path()), 3);
        let path = seg_path(tmp.path(), 1);
        let full = file_len(&path);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(full - 3)
            .unwrap();

        let (wal, seen) = open_collect(opts(tmp.path())).unwrap();
        assert_eq!(seen, expected(&positions, 0..2));
        assert_eq!(file_len(&path), positions[2].offset, "tail cut off");
        assert_eq!(wal.next_pos(), positions[2]);
        let new = wal.append(&[b"after-repair"]).unwrap()[0];
        assert_eq!(new, positions[2]);
        flush_wait(&wal).unwrap();
        drop(wal);

        let mut want = expected(&positions, 0..2);
        want.push((new, b"after-repair".to_vec()));
        assert_eq!(replay_all(opts(tmp.path())).unwrap(), want);
    }

    #[test]
    fn torn_tail_partial_record_header_is_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let positions = write_records(opts(tmp.path()), 3);
        let path = seg_path(tmp.path(), 1);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(positions[2].offset + 5)
            .unwrap();
        let seen = replay_all(opts(tmp.path())).unwrap();
        assert_eq!(seen, expected(&positions, 0..2));
        assert_eq!(file_len(&path), positions[2].offset);
    }

    #[test]
    fn zeros_ahead_of_the_tail_keep_the_size_and_are_cut_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let path = seg_path(tmp.path(), 1);
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let first = wal.append(&[&payload(0)]).unwrap()[0];
        flush_wait(&wal).unwrap();
        let filled = wal.next_pos().offset + FILL_AHEAD;
        assert_eq!(
            file_len(&path),
            filled,
            "zeros written after the first record"
        );
        let mut positions = vec![first];
        for i in 1..50 {
            positions.push(wal.append(&[&payload(i)]).unwrap()[0]);
            flush_wait(&wal).unwrap();
            assert_eq!(
                file_len(&path),
                filled,
                "record {i} changed the file's size"
            );
        }
        let end = wal.next_pos();
        // A crash: no close, the zeros stay.
        std::mem::forget(wal);

        let (wal, seen) = open_collect(opts(tmp.path())).unwrap();
        assert_eq!(seen, expected(&positions, 0..50));
        assert_eq!(file_len(&path), end.offset, "zeros cut on open");
        assert_eq!(wal.append(&[b"after"]).unwrap()[0], end);
        flush_wait(&wal).unwrap();
        wal.close();
        assert_eq!(
            file_len(&path),
            wal.next_pos().offset,
            "a clean close cuts the zeros"
        );
    }

    #[test]
    fn rotation_cuts_the_zeros_off_the_segment_it_ends() {
        let tmp = tempfile::tempdir().unwrap();
        let small = WalOptions {
            segment_bytes: 200,
            ..opts(tmp.path())
        };
        let (wal, _) = open_collect(small.clone()).unwrap();
        let positions: Vec<WalPos> = (0..30)
            .map(|i| {
                let p = wal.append(&[&payload(i)]).unwrap()[0];
                flush_wait(&wal).unwrap();
                p
            })
            .collect();
        let last = wal.next_pos().segment;
        assert!(last > 3, "expected several segments, got {last}");
        std::mem::forget(wal);
        // Every segment but the last ends at its last record: zeros there would be corruption.
        for seg in 1..last {
            let end = positions
                .iter()
                .zip(0..)
                .filter(|(p, _)| p.segment == seg)
                .map(|(p, i)| p.offset + RECORD_HEADER_LEN + payload(i).len() as u64)
                .max()
                .unwrap();
            assert_eq!(file_len(&seg_path(tmp.path(), seg)), end, "segment {seg}");
        }
        let (_, seen) = open_collect(small).unwrap();
        assert_eq!(seen, expected(&positions, 0..30));
    }

    #[test]
    fn zero_filled_tail_is_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let positions = write_records(opts(tmp.path()), 3);
        let path = seg_path(tmp.path(), 1);
        let good = file_len(&path);
        append_bytes(&path, &[0u8; 4096]);

        let (wal, seen) = open_collect(opts(tmp.path())).unwrap();
        assert_eq!(seen, expected(&positions, 0..3));
        assert_eq!(file_len(&path), good);
        let new = wal.append(&[b"next"]).unwrap()[0];
        assert_eq!(new.offset, good);
        flush_wait(&wal).unwrap();
        drop(wal);

        let mut want = expected(&positions, 0..3);
        want.push((new, b"next".to_vec()));
        assert_eq!(replay_all(opts(tmp.path())).unwrap(), want);
    }

    #[test]
    fn garbage_tail_is_truncated() {
        let tmp = tempfile::tempdir().unwrap();
        let positions = write_records(opts(tmp.path()), 3);
        let path = seg_path(tmp.path(), 1);
        let good = file_len(&path);
        // Deterministic pseudo-random bytes (xorshift64).
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let garbage: Vec<u8> = (0..3000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        append_bytes(&path, &garbage);
        let seen = replay_all(opts(tmp.path())).unwrap();
        assert_eq!(seen, expected(&positions, 0..3));
        assert_eq!(file_len(&path), good);
    }

    #[test]
    fn torn_tail_of_last_segment_with_older_segments() {
        let tmp = tempfile::tempdir().unwrap();
        let o = WalOptions {
            segment_bytes: 200,
            ..opts(tmp.path())
        };
        let positions = write_records(o.clone(), 10);
        let last = positions[9].segment;
        assert!(last > 1);
        let path = seg_path(tmp.path(), last);
        let full = file_len(&path);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(full - 1)
            .unwrap();
        assert_eq!(replay_all(o).unwrap(), expected(&positions, 0..9));
    }

    #[test]
    fn damage_in_non_last_segment_refuses_to_open() {
        let tmp = tempfile::tempdir().unwrap();
        let o = WalOptions {
            segment_bytes: 200,
            ..opts(tmp.path())
        };
        let positions = write_records(o.clone(), 12);
        assert_eq!(positions[1].segment, 1);
        assert!(positions[11].segment >= 2, "need a later segment");
        let path = seg_path(tmp.path(), 1);
        flip_byte(&path, positions[1].offset + RECORD_HEADER_LEN + 2);
        assert_corrupt(replay_all(o).unwrap_err(), &path, positions[1].offset);
    }

    #[test]
    fn torn_looking_end_of_non_last_segment_refuses_to_open() {
        let tmp = tempfile::tempdir().unwrap();
        let o = WalOptions {
            segment_bytes: 200,
            ..opts(tmp.path())
        };
        let positions = write_records(o.clone(), 12);
        let path = seg_path(tmp.path(), 1);
        let len = file_len(&path);
        let last_in_seg1 = positions.iter().filter(|p| p.segment == 1).max().unwrap();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 2)
            .unwrap();
        assert_corrupt(replay_all(o).unwrap_err(), &path, last_in_seg1.offset);
    }

    #[test]
    fn bad_checksum_followed_by_intact_records_in_last_segment_refuses_to_open() {
        let tmp = tempfile::tempdir().unwrap();
        let positions = write_records(opts(tmp.path()), 3);
        let path = seg_path(tmp.path(), 1);
        flip_byte(&path, positions[1].offset + RECORD_HEADER_LEN + 2);
        let msg = assert_corrupt(
            replay_all(opts(tmp.path())).unwrap_err(),
            &path,
            positions[1].offset,
        );
        assert!(msg.contains("intact record follows"), "{msg}");
        // Refusing must not have modified the file.
        flip_byte(&path, positions[1].offset + RECORD_HEADER_LEN + 2);
        assert_eq!(
            replay_all(opts(tmp.path())).unwrap(),
            expected(&positions, 0..3)
        );
    }

    #[test]
    fn bad_length_followed_by_intact_records_in_last_segment_refuses_to_open() {
        let tmp = tempfile::tempdir().unwrap();
        let positions = write_records(opts(tmp.path()), 3);
        let path = seg_path(tmp.path(), 1);
        // Length now points past EOF; the scan must still find record 2 byte by byte.
        flip_byte(&path, positions[1].offset + 2);
        let msg = assert_corrupt(
            replay_all(opts(tmp.path())).unwrap_err(),
            &path,
            positions[1].offset,
        );
        assert!(msg.contains("intact record follows"), "{msg}");
    }

    #[test]
    fn damaged_final_record_of_last_segment_is_treated_as_torn() {
        let tmp = tempfile::tempdir().unwrap();
        let positions = write_records(opts(tmp.path()), 3);
        let path = seg_path(tmp.path(), 1);
        flip_byte(&path, positions[2].offset + RECORD_HEADER_LEN + 1);
        let seen = replay_all(opts(tmp.path())).unwrap();
        assert_eq!(seen, expected(&positions, 0..2));
        assert_eq!(file_len(&path), positions[2].offset);
    }

    #[test]
    fn missing_middle_segment_refuses_to_open() {
        let tmp = tempfile::tempdir().unwrap();
        let o = WalOptions {
            segment_bytes: 200,
            ..opts(tmp.path())
        };
        let positions = write_records(o.clone(), 20);
        assert!(positions[19].segment >= 3);
        fs::remove_file(seg_path(tmp.path(), 2)).unwrap();
        assert_corrupt(replay_all(o).unwrap_err(), &seg_path(tmp.path(), 3), 0);
    }

    #[test]
    fn foreign_or_misnumbered_header_refuses_to_open() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(opts(tmp.path()), 2);
        let path = seg_path(tmp.path(), 1);
        // Wrong segment number in the header (even in the last segment: not a crash artefact).
        flip_byte(&path, 8);
        assert_corrupt(replay_all(opts(tmp.path())).unwrap_err(), &path, 0);
        flip_byte(&path, 8);
        flip_byte(&path, 0);
        let msg = assert_corrupt(replay_all(opts(tmp.path())).unwrap_err(), &path, 0);
        assert!(msg.contains("magic"), "{msg}");
    }

    #[test]
    fn crash_while_creating_segment_is_repaired() {
        for leftover in [&b""[..], &b"KVWAL"[..], &[0u8; 64][..]] {
            let tmp = tempfile::tempdir().unwrap();
            let positions = write_records(opts(tmp.path()), 3);
            let path = seg_path(tmp.path(), 2);
            fs::write(&path, leftover).unwrap();

            let (wal, seen) = open_collect(opts(tmp.path())).unwrap();
            assert_eq!(seen, expected(&positions, 0..3));
            assert_eq!(file_len(&path), SEGMENT_HEADER_LEN);
            let new = wal.append(&[b"in-two"]).unwrap()[0];
            assert_eq!(
                new,
                WalPos {
                    segment: 2,
                    offset: SEGMENT_HEADER_LEN
                }
            );
            flush_wait(&wal).unwrap();
            drop(wal);

            let mut want = expected(&positions, 0..3);
            want.push((new, b"in-two".to_vec()));
            assert_eq!(replay_all(opts(tmp.path())).unwrap(), want);
        }
    }

    #[test]
    fn zeroed_last_header_with_intact_records_behind_refuses_to_open() {
        let tmp = tempfile::tempdir().unwrap();
        write_records(opts(tmp.path()), 3);
        let path = seg_path(tmp.path(), 1);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0u8; 16], 0).unwrap();
        assert_corrupt(replay_all(opts(tmp.path())).unwrap_err(), &path, 0);
    }

    #[test]
    fn rotation_and_segment_removal() {
        let tmp = tempfile::tempdir().unwrap();
        let o = WalOptions {
            segment_bytes: 200,
            ..opts(tmp.path())
        };
        let (wal, _) = open_collect(o.clone()).unwrap();
        let mut positions = Vec::new();
        for i in 0..40 {
            let before = wal.next_pos();
            let pos = wal.append(&[&payload(i)]).unwrap()[0];
            assert_eq!(pos, before, "next_pos must be exact across rotations");
            positions.push(pos);
        }
        flush_wait(&wal).unwrap();
        let segs: Vec<u64> = wal_files(tmp.path());
        let used: HashSet<u64> = positions.iter().map(|p| p.segment).collect();
        assert!(segs.len() >= 4, "expected several segments, got {segs:?}");
        assert_eq!(segs, (1..=segs.len() as u64).collect::<Vec<_>>());
        assert!(used.iter().all(|s| segs.contains(s)));
        for &s in &segs[..segs.len() - 1] {
            let len = file_len(&seg_path(tmp.path(), s));
            assert!(len <= 200 + 8 + 60, "segment {s} is {len} bytes");
        }

        let cut = positions
            .iter()
            .position(|p| p.segment == 3)
            .expect("a record in segment 3");
        assert_eq!(wal.remove_segments_before(positions[cut]).unwrap(), 2);
        assert_eq!(wal_files(tmp.path())[0], 3);
        assert!(matches!(wal.read(positions[0]), Err(WalError::NoRecord(_))));
        assert_eq!(wal.read(positions[cut]).unwrap(), payload(cut));
        assert_eq!(wal.remove_segments_before(positions[cut]).unwrap(), 0);
        drop(wal);

        let (wal, seen) = open_collect(o.clone()).unwrap();
        assert_eq!(seen, expected(&positions, cut..40));
        // Reads from older segments after reopen go through lazily opened handles.
        for (i, pos) in positions.iter().enumerate().skip(cut) {
            assert_eq!(wal.read(*pos).unwrap(), payload(i));
        }
        let active = wal.next_pos().segment;
        let far = WalPos {
            segment: u64::MAX,
            offset: 0,
        };
        let removed = wal.remove_segments_before(far).unwrap();
        assert_eq!(removed as u64, active - 3);
        assert_eq!(wal_files(tmp.path()), vec![active], "active segment kept");
        drop(wal);

        let first_kept = positions
            .iter()
            .position(|p| p.segment == active)
            .unwrap_or(40);
        assert_eq!(replay_all(o).unwrap(), expected(&positions, first_kept..40));
    }

    #[test]
    fn full_last_segment_rotates_on_open() {
        let tmp = tempfile::tempdir().unwrap();
        let positions = write_records(opts(tmp.path()), 5);
        let small = WalOptions {
            segment_bytes: 64,
            ..opts(tmp.path())
        };
        let (wal, seen) = open_collect(small.clone()).unwrap();
        assert_eq!(seen, expected(&positions, 0..5));
        let pos = wal.append(&[b"x"]).unwrap()[0];
        assert_eq!(pos.segment, 2);
        flush_wait(&wal).unwrap();
        drop(wal);
        assert_eq!(replay_all(small).unwrap().len(), 6);
    }

    #[test]
    fn concurrent_writers_share_fsyncs() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 200;
        let tmp = tempfile::tempdir().unwrap();
        let o = WalOptions {
            segment_bytes: 16 << 10,
            ..opts(tmp.path())
        };
        let (wal, _) = open_collect(o.clone()).unwrap();
        let wal = Arc::new(wal);
        let before = wal.stats();
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let wal = Arc::clone(&wal);
                thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        let data = format!("t{t}-r{i}");
                        wal.append(&[data.as_bytes()]).unwrap();
                        flush_wait(&wal).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let stats = wal.stats();
        let flushes = stats.flush_requests - before.flush_requests;
        let fsyncs = stats.fsyncs - before.fsyncs;
        println!(
            "group commit: {flushes} flushes, {} rounds, {fsyncs} fsyncs ({:.2} fsyncs/flush)",
            stats.flush_rounds - before.flush_rounds,
            fsyncs as f64 / flushes as f64
        );
        assert_eq!(flushes, (THREADS * PER_THREAD) as u64);
        assert!(
            fsyncs < flushes,
            "no batching: {fsyncs} fsyncs for {flushes} flushes"
        );
        drop(wal);

        let seen: HashSet<Vec<u8>> = replay_all(o).unwrap().into_iter().map(|r| r.1).collect();
        assert_eq!(seen.len(), THREADS * PER_THREAD);
        for t in 0..THREADS {
            for i in 0..PER_THREAD {
                assert!(seen.contains(format!("t{t}-r{i}").as_bytes()));
            }
        }
    }

    #[test]
    fn queued_flushes_complete_with_one_fsync_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        wal.append(&[b"first"]).unwrap();
        // Park the flusher inside the first callback so the next requests pile up.
        let (entered_tx, entered_rx) = mpsc::channel();
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        wal.flush(Box::new(move |r| {
            let _ = entered_tx.send(r);
            let _ = gate_rx.recv();
        }));
        entered_rx.recv_timeout(WAIT).unwrap().unwrap();
        let before = wal.stats();

        let order = Arc::new(Mutex::new(Vec::new()));
        let (done_tx, done_rx) = mpsc::channel();
        for i in 0..50 {
            wal.append(&[format!("r{i}").as_bytes()]).unwrap();
            let order = Arc::clone(&order);
            let done_tx = done_tx.clone();
            wal.flush(Box::new(move |r| {
                order.lock().unwrap().push(i);
                let _ = done_tx.send(r);
            }));
        }
        gate_tx.send(()).unwrap();
        for _ in 0..50 {
            done_rx.recv_timeout(WAIT).unwrap().unwrap();
        }
        let after = wal.stats();
        assert_eq!(after.fsyncs - before.fsyncs, 1, "one fsync for 50 flushes");
        assert_eq!(after.flush_rounds - before.flush_rounds, 1);
        assert_eq!(*order.lock().unwrap(), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn flush_with_nothing_new_skips_fsync() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        wal.append(&[b"a"]).unwrap();
        flush_wait(&wal).unwrap();
        let before = wal.stats().fsyncs;
        flush_wait(&wal).unwrap();
        flush_wait(&wal).unwrap();
        assert_eq!(wal.stats().fsyncs, before);
    }

    #[test]
    fn fsync_failure_poisons_the_wal_for_good() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        wal.append(&[b"a"]).unwrap();
        wal.shared.cfg.fail_syncs.store(true, Ordering::SeqCst);
        assert!(matches!(flush_wait(&wal), Err(WalError::Io { .. })));
        wal.shared.cfg.fail_syncs.store(false, Ordering::SeqCst);
        // Never retry: a second fsync could "succeed" after the kernel dropped the pages.
        assert!(matches!(wal.append(&[b"b"]), Err(WalError::Failed(_))));
        assert!(matches!(flush_wait(&wal), Err(WalError::Failed(_))));
        assert!(matches!(wal.append(&[b"c"]), Err(WalError::Failed(_))));
    }

    #[test]
    fn fsync_failure_during_rotation_poisons_the_wal() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(WalOptions {
            segment_bytes: 100,
            ..opts(tmp.path())
        })
        .unwrap();
        wal.shared.cfg.fail_syncs.store(true, Ordering::SeqCst);
        assert!(matches!(
            wal.append(&[&[1u8; 200]]),
            Err(WalError::Io { .. })
        ));
        wal.shared.cfg.fail_syncs.store(false, Ordering::SeqCst);
        assert!(matches!(wal.append(&[b"x"]), Err(WalError::Failed(_))));
        assert_eq!(
            wal_files(tmp.path()),
            vec![1],
            "no segment after failed sync"
        );
    }

    #[test]
    fn close_rejects_further_calls_but_completes_queued_flushes() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let pos = wal.append(&[b"before-close"]).unwrap()[0];
        let (tx, rx) = mpsc::channel();
        wal.flush(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        wal.close();
        // close() waited for the flusher, so the queued flush has completed.
        rx.try_recv().unwrap().unwrap();

        assert!(matches!(wal.append(&[b"x"]), Err(WalError::Closed)));
        assert!(matches!(flush_wait(&wal), Err(WalError::Closed)));
        assert!(matches!(wal.read(pos), Err(WalError::Closed)));
        assert!(matches!(
            wal.remove_segments_before(pos),
            Err(WalError::Closed)
        ));
        wal.close();
        drop(wal);
        assert_eq!(
            replay_all(opts(tmp.path())).unwrap(),
            vec![(pos, b"before-close".to_vec())]
        );
    }

    /// A flush's outcome and the name of the thread its callback ran on.
    type Witnessed = (Result<(), WalError>, Option<String>);

    /// Records the outcome of a flush callback and the thread it ran on.
    fn witness() -> (FlushCallback, mpsc::Receiver<Witnessed>) {
        let (tx, rx) = mpsc::channel();
        let done: FlushCallback = Box::new(move |r| {
            let _ = tx.send((r, thread::current().name().map(str::to_owned)));
        });
        (done, rx)
    }

    #[test]
    fn an_idle_wal_flushes_on_the_callers_thread() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let here = thread::current().name().map(str::to_owned);
        for i in 0..3 {
            // Idle means no flush was asked for a moment ago.
            thread::sleep(IDLE_GAP);
            let pos = wal.append(&[&payload(i)]).unwrap()[0];
            let before = wal.stats();
            let (done, rx) = witness();
            wal.flush_here_when_idle(done);
            // Already answered when the call returns, on this thread, with the record durable.
            let (result, ran_on) = rx.try_recv().expect("answered before returning");
            result.unwrap();
            assert_eq!(ran_on, here);
            assert!(wal.is_durable(pos));
            let after = wal.stats();
            assert_eq!(after.flush_rounds - before.flush_rounds, 1);
            assert!(after.fsyncs > before.fsyncs, "{before:?} -> {after:?}");
        }
        drop(wal);
        assert_eq!(replay_all(opts(tmp.path())).unwrap().len(), 3);
    }

    #[test]
    fn a_busy_wal_leaves_the_round_to_the_flusher() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let flusher = Some("wal-flusher".to_owned());
        // As if the last round had answered two requests: the load is not a lone writer's.
        wal.shared.lock().last_round_requests = 2;
        let pos = wal.append(&[b"busy"]).unwrap()[0];
        let (done, rx) = witness();
        wal.flush_here_when_idle(done);
        let (result, ran_on) = rx.recv_timeout(WAIT).expect("flushed");
        result.unwrap();
        assert_eq!(ran_on, flusher, "a busy WAL's round runs on the flusher");
        assert!(wal.is_durable(pos));
        // A flush asked for right after another is the flusher's too. (A time ahead stands
        // for "just now" however slowly this test runs: its elapsed time is zero.)
        wal.shared.lock().last_request = Some(Instant::now() + Duration::from_secs(3600));
        wal.append(&[b"soon"]).unwrap();
        let (done, rx) = witness();
        wal.flush_here_when_idle(done);
        let (result, ran_on) = rx.recv_timeout(WAIT).expect("flushed");
        result.unwrap();
        assert_eq!(
            ran_on, flusher,
            "a flush right after another runs on the flusher"
        );
        // That round answered one request: once it has ended (its callback runs just before
        // the end) and the last request is a while ago, the next flush is the caller's again.
        let deadline = Instant::now() + WAIT;
        while wal.shared.lock().round_running {
            assert!(Instant::now() < deadline, "the flusher's round never ended");
            thread::yield_now();
        }
        wal.shared.lock().last_request = None;
        wal.append(&[b"idle"]).unwrap();
        let (done, rx) = witness();
        wal.flush_here_when_idle(done);
        let (result, ran_on) = rx.try_recv().expect("answered before returning");
        result.unwrap();
        assert_eq!(ran_on, thread::current().name().map(str::to_owned));
        // A round already running (or queued) is never joined by one beside it.
        {
            let mut st = wal.shared.lock();
            st.last_request = None;
            st.round_running = true;
        }
        wal.append(&[b"queued"]).unwrap();
        let (done, rx) = witness();
        wal.flush_here_when_idle(done);
        assert!(rx.try_recv().is_err(), "queued behind the running round");
        wal.shared.lock().round_running = false;
        wal.shared.wake.notify_one();
        let (result, ran_on) = rx.recv_timeout(WAIT).expect("flushed once the round ended");
        result.unwrap();
        assert_eq!(ran_on, flusher);
    }

    #[test]
    fn a_failed_fsync_on_the_callers_thread_poisons_the_wal() {
        let tmp = tempfile::tempdir().unwrap();
        let fault = Fault {
            kind: FaultKind::Fsync,
            nth: 2,
        };
        let wal = Wal::open_with_fault(opts(tmp.path()), Some(fault), |_, _| Ok(())).unwrap();
        let mut failed = None;
        for i in 0..4 {
            thread::sleep(IDLE_GAP);
            wal.append(&[&payload(i)]).unwrap();
            let (done, rx) = witness();
            wal.flush_here_when_idle(done);
            let (result, _) = rx.try_recv().expect("answered before returning");
            if let Err(e) = result {
                assert!(e.to_string().contains("injected fsync failure"), "{e}");
                failed = Some(i);
                break;
            }
        }
        assert!(failed.is_some(), "the injected fault never fired");
        assert!(matches!(wal.append(&[b"late"]), Err(WalError::Failed(_))));
        let (done, rx) = witness();
        wal.flush_here_when_idle(done);
        assert!(matches!(rx.try_recv(), Ok((Err(WalError::Failed(_)), _))));
    }

    /// Rounds on callers' threads and on the flusher interleave: every callback comes once,
    /// after its record is durable, and a thread's callbacks come in the order it asked.
    #[test]
    fn callers_rounds_and_the_flushers_interleave_safely() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let wal = Arc::new(wal);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let wal = Arc::clone(&wal);
                thread::spawn(move || {
                    let (tx, rx) = mpsc::channel();
                    for i in 0..500 {
                        // Every other request after a pause: the flusher's, then at once one
                        // that may find the WAL idle while the flusher still answers it.
                        let here = i % 2 == 1;
                        if !here {
                            thread::sleep(IDLE_GAP);
                        }
                        let pos = wal.append(&[&payload(t * 1000 + i)]).unwrap()[0];
                        let (w, tx) = (Arc::clone(&wal), tx.clone());
                        let done: FlushCallback = Box::new(move |r| {
                            let _ = tx.send((i, r.is_ok() && w.is_durable(pos)));
                        });
                        if here {
                            wal.flush_here_when_idle(done);
                        } else {
                            wal.flush(done);
                        }
                    }
                    (0..500)
                        .map(|_| rx.recv_timeout(WAIT).expect("every flush answered"))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for t in threads {
            let answers = t.join().unwrap();
            assert!(answers.iter().all(|(_, durable)| *durable), "{answers:?}");
            let order: Vec<_> = answers.iter().map(|(i, _)| *i).collect();
            assert_eq!(order, (0..500).collect::<Vec<_>>(), "out of request order");
        }
        let s = wal.stats();
        assert_eq!(s.flush_requests, 2000);
        assert!(s.flush_rounds <= 2000);
    }

    #[test]
    fn close_from_flush_callback_does_not_deadlock() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let wal = Arc::new(wal);
        wal.append(&[b"a"]).unwrap();
        let (tx, rx) = mpsc::channel();
        let inner = Arc::clone(&wal);
        wal.flush(Box::new(move |r| {
            inner.close();
            let _ = tx.send((r, inner.append(&[b"b"]).is_err()));
            // `inner` may be the last handle: dropping it here runs Drop on the flusher.
            drop(inner);
        }));
        drop(wal);
        let (result, rejected) = rx.recv_timeout(WAIT).unwrap();
        result.unwrap();
        assert!(rejected);
    }

    #[test]
    fn too_large_records_are_rejected_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let o = WalOptions {
            fsync: false,
            ..opts(tmp.path())
        };
        let (wal, _) = open_collect(o.clone()).unwrap();
        let huge = vec![1u8; MAX_RECORD + 1];
        let start = wal.next_pos();
        assert!(matches!(
            wal.append(&[b"small", &huge]),
            Err(WalError::TooLarge(n)) if n == MAX_RECORD + 1
        ));
        assert_eq!(wal.next_pos(), start, "nothing of the batch was written");
        // Exactly the limit is fine, and usable afterwards.
        let max = vec![2u8; MAX_RECORD];
        let pos = wal.append(&[&max]).unwrap()[0];
        assert_eq!(wal.read(pos).unwrap().len(), MAX_RECORD);
        flush_wait(&wal).unwrap();
        drop(wal);
        let seen = replay_all(o).unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, pos);
        assert!(seen[0].1 == max);
    }

    #[test]
    fn replay_error_aborts_open() {
        let tmp = tempfile::tempdir().unwrap();
        let positions = write_records(opts(tmp.path()), 3);
        let mut calls = 0;
        let err = Wal::open(opts(tmp.path()), |_, _| {
            calls += 1;
            if calls == 2 {
                Err("boom".into())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        match err {
            WalError::Replay { pos, reason } => {
                assert_eq!(pos, positions[1]);
                assert_eq!(reason, "boom");
            }
            other => panic!("expected Replay, got {other:?}"),
        }
    }

    #[test]
    fn read_rejects_positions_that_are_not_records() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open_collect(opts(tmp.path())).unwrap();
        let pos = wal.append(&[b"hello world, this is a record"]).unwrap()[0];
        let unknown_segment = WalPos {
            segment: 9,
            offset: SEGMENT_HEADER_LEN,
        };
        assert!(matches!(
            wal.read(unknown_segment),
            Err(WalError::NoRecord(_))
        ));
        assert!(matches!(
            wal.read(wal.next_pos()),
            Err(WalError::NoRecord(_))
        ));
        let inside_header = WalPos {
            segment: 1,
            offset: 3,
        };
        assert!(matches!(
            wal.read(inside_header),
            Err(WalError::NoRecord(_))
        ));
        let misaligned = WalPos {
            segment: 1,
            offset: pos.offset + 1,
        };
        assert!(matches!(
            wal.read(misaligned),
            Err(WalError::Corrupt { .. })
        ));
    }

    #[test]
    fn tail_scan_finds_records_at_any_offset() {
        let mut buf = vec![0u8; 11];
        encode_record(&mut buf, b"payload");
        buf.extend_from_slice(&[0xff; 5]);
        assert!(matches!(
            scan_tail(&buf, 100),
            TailScan::IntactRecordAt(111)
        ));
        assert!(matches!(
            scan_tail(&[0u8; 4096], 0),
            TailScan::NoIntactRecord
        ));
        // Offset 0 is the failure point itself and is not considered.
        let mut only = Vec::new();
        encode_record(&mut only, b"p");
        assert!(matches!(scan_tail(&only, 0), TailScan::NoIntactRecord));
    }
    #[test]
    fn fault_hook_parses_only_what_it_documents() {
        assert_eq!(
            Fault::parse("fsync:3"),
            Ok(Fault {
                kind: FaultKind::Fsync,
                nth: 3
            })
        );
        for (text, kind) in [
            ("write:1", FaultKind::Write),
            ("crash_before_fsync:7", FaultKind::CrashBeforeFsync),
            (" crash_after_write:2 ", FaultKind::CrashAfterWrite),
            ("lose_unsynced:4", FaultKind::LoseUnsynced),
        ] {
            let f = Fault::parse(text).unwrap();
            assert_eq!(f.kind, kind);
            assert_eq!(Fault::parse(&f.to_string()), Ok(f), "Display round-trips");
        }
        for bad in [
            "", "fsync", "fsync:", "fsync:0", "fsync:-1", "fsync:x", "boom:1", ":3",
        ] {
            let err = Fault::parse(bad).unwrap_err();
            assert!(err.contains(ENV_FAULT), "{err}");
        }
    }

    #[test]
    fn fault_hook_fsync_fails_exactly_the_nth_sync_after_open() {
        let tmp = tempfile::tempdir().unwrap();
        let fault = Fault {
            kind: FaultKind::Fsync,
            nth: 3,
        };
        let wal = Wal::open_with_fault(opts(tmp.path()), Some(fault), |_, _| Ok(())).unwrap();
        let mut acked = Vec::new();
        let mut failed_at = None;
        for i in 0..5 {
            let pos = match wal.append(&[&payload(i)]) {
                Ok(p) => p[0],
                Err(e) => {
                    assert!(matches!(e, WalError::Failed(_)), "{e}");
                    break;
                }
            };
            match flush_wait(&wal) {
                Ok(()) => acked.push((pos, payload(i))),
                Err(e) => {
                    assert!(e.to_string().contains("injected fsync failure"), "{e}");
                    failed_at = Some(i);
                    break;
                }
            }
        }
        // Open's own syncs are not counted; the first flush also syncs the directory.
        assert!(failed_at.is_some(), "the injected fault never fired");
        assert!(matches!(wal.append(&[b"late"]), Err(WalError::Failed(_))));
        drop(wal);
        // The acknowledged records survive a reopen (without the fault).
        let seen = replay_all(opts(tmp.path())).unwrap();
        for rec in &acked {
            assert!(seen.contains(rec), "acknowledged {rec:?} lost");
        }
    }

    #[test]
    fn fault_hook_write_failure_poisons_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let fault = Fault {
            kind: FaultKind::Write,
            nth: 2,
        };
        let wal = Wal::open_with_fault(opts(tmp.path()), Some(fault), |_, _| Ok(())).unwrap();
        let first = wal.append(&[b"one"]).unwrap()[0];
        flush_wait(&wal).unwrap();
        let err = wal.append(&[b"two"]).unwrap_err();
        assert!(err.to_string().contains("injected write failure"), "{err}");
        assert!(matches!(wal.append(&[b"three"]), Err(WalError::Failed(_))));
        assert!(matches!(flush_wait(&wal), Err(WalError::Failed(_))));
        drop(wal);
        assert_eq!(
            replay_all(opts(tmp.path())).unwrap(),
            vec![(first, b"one".to_vec())]
        );
    }
}
