//! Damaged data dirs: a node must refuse to start with one clear line (exit 2), or start and
//! catch up from its peers; it must never serve a wrong value.
//!
//! One cluster is loaded with known keys; node 0 is stopped and a pristine copy of its data dir
//! is kept. Each case restores that copy, damages it (bytes flipped or cut in WAL segments or in
//! sled's files, files or whole directories removed), starts node 0 and then reads every key with
//! stale reads from node 0 alone. A value it serves itself must be the right one; an error is
//! fine; an absent key is a *lost* key, allowed only where it says so below (and only until it
//! has caught up from its peers, which it must do in bounded time).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{rt, Cluster};
use rand::{Rng, SeedableRng};

const VICTIM: usize = 0;
const KEYS_BEFORE: usize = 300;
const KEYS_AFTER: usize = 150;
/// A sled snapshot is written at start-up; a small `snapshot_logs` makes the WAL trim itself, so
/// sled's data is then the only copy of older entries on this node.
const CONFIG: &str = "shards = 2\nsnapshot_logs = 100";

fn value_of(key: &str) -> String {
    format!("value of {key} {}", "x".repeat(80))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn files(dir: &Path, filter: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .filter(|p| filter(&p.file_name().unwrap_or_default().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn flip(path: &Path, offset: u64) {
    let mut bytes = std::fs::read(path).expect("read");
    let at = (offset as usize).min(bytes.len().saturating_sub(1));
    bytes[at] ^= 0x5a;
    std::fs::write(path, bytes).expect("write");
}

fn truncate(path: &Path, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.set_len(len).expect("set_len");
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// What a case is allowed to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Must refuse to start (exit 2, one clear line).
    Refuse,
    /// Must start and serve every key from its own replica at once (no key lost).
    Serve,
    /// Either; if it serves, keys may be missing at first but must come back from the peers.
    Either,
}

struct Case {
    name: String,
    expect: Expect,
    damage: Box<dyn Fn(&Path)>,
}

fn case(name: impl Into<String>, expect: Expect, damage: impl Fn(&Path) + 'static) -> Case {
    Case {
        name: name.into(),
        expect,
        damage: Box::new(damage),
    }
}

#[derive(Debug)]
enum Outcome {
    Refused { code: i32, line: String },
    Served(Reads),
}

#[derive(Debug, Default)]
struct Reads {
    right: usize,
    lost: usize,
    errors: usize,
    forwarded: usize,
    caught_up_in: Option<Duration>,
}

/// Starts node 0 and waits until it exits or serves every shard.
async fn start_victim(c: &mut Cluster) -> Option<(i32, String)> {
    start_node(c, VICTIM).await
}

/// Starts node `victim` and waits until it exits or serves every shard.
async fn start_node(c: &mut Cluster, victim: usize) -> Option<(i32, String)> {
    let before = c.log(victim).len();
    c.spawn(victim);
    let client = c.client(&[victim]);
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(status) = c.wait_exit(victim, Duration::ZERO) {
            let log = c.log(victim);
            let new = log.get(before..).unwrap_or_default();
            let line = new.trim().lines().last().unwrap_or_default().to_string();
            return Some((status.code().unwrap_or(-1), line));
        }
        if let Ok(s) = client.status().await {
            if s.node_id == victim as u64
                && !s.value.shards.is_empty()
                && s.value.shards.iter().all(|sh| sh.has_leader)
            {
                return None;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {victim} neither served nor exited within 40 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stale reads of every key from node 0 alone. Panics on a wrong value.
async fn read_all(c: &Cluster, keys: &[String], reads: &mut Reads) -> Vec<String> {
    read_all_from(c, VICTIM, keys, reads).await
}

/// Stale reads of every key from node `victim` alone. Panics on a wrong value.
async fn read_all_from(
    c: &Cluster,
    victim: usize,
    keys: &[String],
    reads: &mut Reads,
) -> Vec<String> {
    let client = c.client(&[victim]);
    let mut missing = Vec::new();
    for key in keys {
        match client.get(key.as_bytes(), true).await {
            Ok(s) if s.node_id != victim as u64 => {
                reads.forwarded += 1;
                missing.push(key.clone());
            }
            Ok(s) => match s.value {
                Some(v) => {
                    assert_eq!(
                        String::from_utf8_lossy(&v),
                        value_of(key),
                        "node {victim} serves a WRONG value for {key}"
                    );
                    reads.right += 1;
                }
                None => {
                    reads.lost += 1;
                    missing.push(key.clone());
                }
            },
            Err(_) => {
                reads.errors += 1;
                missing.push(key.clone());
            }
        }
    }
    missing
}

async fn run_case(c: &mut Cluster, pristine: &Path, keys: &[String], case: &Case) -> Outcome {
    let dir = c.data_dir(VICTIM);
    std::fs::remove_dir_all(&dir).expect("clear data dir");
    copy_dir(pristine, &dir);
    (case.damage)(&dir);
    let started = Instant::now();
    if let Some((code, line)) = start_victim(c).await {
        return Outcome::Refused { code, line };
    }
    let mut reads = Reads::default();
    let mut missing = read_all(c, keys, &mut reads).await;
    // Whatever it lacked must come back from the peers, in bounded time, and never be wrong.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{}: node {VICTIM} still lacks {} keys 30 s after starting, e.g. {}",
            case.name,
            missing.len(),
            missing[0]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut again = Reads::default();
        missing = read_all(c, &missing, &mut again).await;
    }
    reads.caught_up_in = Some(started.elapsed());
    c.kill9(VICTIM);
    Outcome::Served(reads)
}

fn wal_segments(dir: &Path) -> Vec<PathBuf> {
    files(&dir.join("wal"), |n| n.ends_with(".wal"))
}

fn last_segment(dir: &Path) -> PathBuf {
    wal_segments(dir).pop().expect("a WAL segment")
}

fn sled_file(dir: &Path, prefix: &str) -> PathBuf {
    files(&dir.join("state"), |n| n.starts_with(prefix))
        .pop()
        .unwrap_or_else(|| panic!("no {prefix}* file in the state dir"))
}

/// Appends an empty, valid next segment, as a rotation would have: the last one becomes a
/// non-last segment, whose damage can no longer be a torn tail.
fn add_next_segment(dir: &Path) {
    let last = last_segment(dir);
    let name = last.file_name().unwrap_or_default().to_string_lossy();
    let n: u64 = name
        .trim_end_matches(".wal")
        .parse()
        .expect("segment number");
    let mut header = b"KVWAL001".to_vec();
    header.extend_from_slice(&(n + 1).to_le_bytes());
    std::fs::write(dir.join("wal").join(format!("{:020}.wal", n + 1)), header).expect("write");
}

fn cases(seed: u64) -> Vec<Case> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![
        // --- WAL ---
        case(
            "WAL: last segment cut inside its last record (torn tail)",
            Expect::Serve,
            |d| {
                let p = last_segment(d);
                truncate(&p, len(&p) - 3);
            },
        ),
        case(
            "WAL: byte flipped in the last record (looks torn)",
            Expect::Serve,
            |d| {
                let p = last_segment(d);
                flip(&p, len(&p) - 2);
            },
        ),
        case("WAL: 4 KiB of zeros after the end", Expect::Serve, |d| {
            let p = last_segment(d);
            let mut b = std::fs::read(&p).expect("read");
            b.extend_from_slice(&[0u8; 4096]);
            std::fs::write(&p, b).expect("write");
        }),
        case("WAL: garbage after the end", Expect::Serve, |d| {
            let p = last_segment(d);
            let mut b = std::fs::read(&p).expect("read");
            b.extend((0..777u32).map(|i| (i * 31 % 251) as u8));
            std::fs::write(&p, b).expect("write");
        }),
        case("WAL: a non-last segment cut short", Expect::Refuse, |d| {
            let p = last_segment(d);
            add_next_segment(d);
            truncate(&p, len(&p) - 100);
        }),
        case(
            "WAL: byte flipped in the middle of a non-last segment",
            Expect::Refuse,
            |d| {
                let p = last_segment(d);
                add_next_segment(d);
                flip(&p, len(&p) / 2);
            },
        ),
        case("WAL: segment header damaged", Expect::Refuse, |d| {
            flip(&last_segment(d), 3);
        }),
        case(
            "WAL: a segment missing from the middle",
            Expect::Refuse,
            |d| {
                add_next_segment(d);
                add_next_segment(d);
                let segs = wal_segments(d);
                std::fs::remove_file(&segs[segs.len() - 2]).expect("rm");
            },
        ),
        // Everything after the header cut: every record of this node's log is gone, its vote too.
        case("WAL: last segment cut to its header", Expect::Refuse, |d| {
            truncate(&last_segment(d), 16);
        }),
        // --- sled ---
        case("state: conf damaged", Expect::Refuse, |d| {
            flip(&d.join("state").join("conf"), 5);
        }),
        case("state: snapshot file damaged", Expect::Refuse, |d| {
            let p = sled_file(d, "snap.");
            flip(&p, len(&p) / 2);
        }),
        case("state: snapshot file removed", Expect::Either, |d| {
            std::fs::remove_file(sled_file(d, "snap.")).expect("rm");
        }),
        case("state: db cut in half", Expect::Either, |d| {
            let p = d.join("state").join("db");
            truncate(&p, len(&p) / 2);
        }),
        case("state: db emptied", Expect::Refuse, |d| {
            truncate(&d.join("state").join("db"), 0);
        }),
        // --- whole directories ---
        // The WAL was trimmed (snapshot_logs = 100): sled held the only copy of older entries.
        case("state/ missing, WAL trimmed", Expect::Refuse, |d| {
            std::fs::remove_dir_all(d.join("state")).expect("rm");
        }),
        case("wal/ missing, state intact", Expect::Refuse, |d| {
            std::fs::remove_dir_all(d.join("wal")).expect("rm");
        }),
    ];
    // Bytes flipped in sled's data file at several offsets: its start, its end, and random ones.
    let mut offsets = vec![0u64, 20, 512, 4096];
    for _ in 0..6 {
        offsets.push(rng.gen_range(0..1_000_000));
    }
    for off in offsets {
        v.push(case(
            format!("state: db byte flipped at {off} (clamped to size)"),
            Expect::Either,
            move |d| {
                let p = d.join("state").join("db");
                let l = len(&p);
                flip(&p, if off >= l { off % l.max(1) } else { off });
            },
        ));
    }
    v
}

#[test]
fn damaged_data_dirs_never_serve_wrong_data() {
    let seed: u64 = std::env::var("KV_CORRUPTION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("seed {seed} (KV_CORRUPTION_SEED={seed} repeats these offsets)");
    rt().block_on(async {
        let mut c = Cluster::start(3, CONFIG).await;
        let client = c.client_all();
        let mut keys = Vec::new();
        for i in 0..KEYS_BEFORE {
            let k = format!("a{i:04}");
            client
                .put(k.as_bytes(), value_of(&k).as_bytes())
                .await
                .expect("put");
            keys.push(k);
        }
        // Restart node 0 once so sled writes a snapshot, then write more behind it.
        assert!(c.stop(VICTIM).success());
        c.spawn(VICTIM);
        c.wait_ready(Duration::from_secs(30)).await;
        for i in 0..KEYS_AFTER {
            let k = format!("b{i:04}");
            client
                .put(k.as_bytes(), value_of(&k).as_bytes())
                .await
                .expect("put");
            keys.push(k);
        }
        // Every key on node 0's own replica before it stops.
        let mut reads = Reads::default();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !read_all(&c, &keys, &mut reads).await.is_empty() {
            assert!(Instant::now() < deadline, "node 0 never caught up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(c.stop(VICTIM).success());
        let pristine = c.dir.path().join("pristine");
        copy_dir(&c.data_dir(VICTIM), &pristine);
        println!(
            "pristine node 0: WAL segments {:?}, state files {:?}",
            wal_segments(&pristine)
                .iter()
                .map(|p| len(p))
                .collect::<Vec<_>>(),
            files(&pristine.join("state"), |_| true)
                .iter()
                .map(|p| format!(
                    "{}={}",
                    p.file_name().unwrap_or_default().to_string_lossy(),
                    len(p)
                ))
                .collect::<Vec<_>>()
        );

        let mut failures = Vec::new();
        for case in cases(seed) {
            let outcome = run_case(&mut c, &pristine, &keys, &case).await;
            let verdict = match (&outcome, case.expect) {
                (Outcome::Refused { code, line }, Expect::Refuse | Expect::Either) => {
                    if *code == 2 && line.starts_with("kvnode: ") {
                        Ok(())
                    } else {
                        Err(format!(
                            "refused, but with exit {code} and last line {line:?}"
                        ))
                    }
                }
                (Outcome::Refused { .. }, Expect::Serve) => Err("refused to start".into()),
                (Outcome::Served(_), Expect::Refuse) => Err("started".into()),
                (Outcome::Served(r), Expect::Serve) if r.lost > 0 || r.forwarded > 0 => {
                    Err(format!(
                        "{} keys lost, {} not served from its replica",
                        r.lost, r.forwarded
                    ))
                }
                (Outcome::Served(_), _) => Ok(()),
            };
            let shown = match &outcome {
                Outcome::Refused { code, line } => format!("exit {code}: {line}"),
                Outcome::Served(r) => format!(
                    "served: {} right, {} lost, {} errors, {} not yet local; all {} keys right \
                     after {:.1?}",
                    r.right,
                    r.lost,
                    r.errors,
                    r.forwarded,
                    keys.len(),
                    r.caught_up_in.unwrap_or_default()
                ),
            };
            println!(
                "{:<60} {}{shown}",
                case.name,
                if verdict.is_ok() { "" } else { "FAIL " }
            );
            if let Err(e) = verdict {
                failures.push(format!("{}: {e}", case.name));
            }
        }
        assert!(
            failures.is_empty(),
            "cases failed:\n{}",
            failures.join("\n")
        );
    });
}

/// With the WAL untrimmed (the default `snapshot_logs` is far away), a lost state dir is rebuilt
/// from the node's own WAL before it serves: every key is there at once, from its own replica.
/// The victim is the node that bootstrapped the only shard: its log starts at index 1 (a node
/// that joined a new group may have had its log seeded past it, and then refuses, rightly).
#[test]
fn lost_state_dir_is_rebuilt_from_an_untrimmed_wal() {
    rt().block_on(async {
        let mut c = Cluster::start(3, "shards = 1").await;
        let client = c.client_all();
        let status = client.status().await.expect("status");
        let victim = status.value.shards[0].preferred_leader as usize;
        let keys: Vec<String> = (0..100).map(|i| format!("s{i:03}")).collect();
        for k in &keys {
            client
                .put(k.as_bytes(), value_of(k).as_bytes())
                .await
                .expect("put");
        }
        c.kill9(victim);
        std::fs::remove_dir_all(c.data_dir(victim).join("state")).expect("rm state");
        if let Some((code, line)) = start_node(&mut c, victim).await {
            panic!("node {victim} refused to start (exit {code}): {line}");
        }
        let mut reads = Reads::default();
        let missing = read_all_from(&c, victim, &keys, &mut reads).await;
        assert!(
            missing.is_empty(),
            "rebuilt from its WAL, yet {} keys missing ({reads:?})",
            missing.len()
        );
        println!(
            "node {victim}: state dir lost, WAL intact: all {} keys served at once",
            keys.len()
        );
    });
}
