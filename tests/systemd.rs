//! kvstore as systemd services.
//!
//! `walkthrough_under_systemd` runs `tests/systemd_e2e.sh`: it boots a throwaway systemd
//! (`../shared/systemd-sandbox.sh`), installs this build with the project's own `make install`,
//! and walks through the original scenario with `systemctl`, `journalctl` and `kvctl` only —
//! start 3 nodes, put b, stop node 1 (it hands off its leaderships and exits 0), peer_down in the
//! peers' journals, wipe node 1 and start it (recover_done), kill -9 node 0 and watch systemd
//! restart it — plus the hardening score, the watchdog, kvnode.target and `make uninstall`.
//!
//! That needs root, cgroups and overlayfs, and the sample config's fixed ports 5000-5002, so it
//! runs only when asked: `CI` set, or `KV_SYSTEMD_TEST=1`; otherwise it prints
//! "skipped: <reason>". Under `CI=true` a missing prerequisite fails instead of skipping. The
//! script holds a lock for its whole run, so concurrent runs (two `cargo test`, two checkouts)
//! take turns; the other tests use free ephemeral ports, never 5000-5002.
//!
//! `make_install_into_a_destdir` checks the install command's layout on every run (no root).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kvstore::config::Config;
use kvstore::placement::Placement;

const KVNODE: &str = env!("CARGO_BIN_EXE_kvnode");
const KVCTL: &str = env!("CARGO_BIN_EXE_kvctl");
const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// `CI=true` (or 1): a test that cannot run is a failure, not a skip.
fn strict_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1"))
}

/// Prints "skipped: <reason>" — or fails, under `CI=true`.
fn skip(reason: &str) {
    assert!(!strict_ci(), "CI=true, but this test cannot run: {reason}");
    println!("skipped: {reason}");
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The effective uid, from /proc (no libc binding needed for one number).
fn euid() -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Why the booted-systemd test cannot run here, if it cannot.
fn missing_for_systemd() -> Option<String> {
    if euid() != Some(0) {
        return Some("needs root (it boots systemd-nspawn)".into());
    }
    if !Path::new("/sys/fs/cgroup").is_dir() {
        return Some("no /sys/fs/cgroup".into());
    }
    let overlay = std::fs::read_to_string("/proc/filesystems").is_ok_and(|f| {
        f.lines()
            .any(|l| l.split_whitespace().last() == Some("overlay"))
    });
    if !overlay {
        return Some("no overlayfs in /proc/filesystems".into());
    }
    if !["/lib/systemd/systemd", "/usr/lib/systemd/systemd"]
        .iter()
        .any(|p| Path::new(p).is_file())
    {
        return Some("systemd is not installed (no /lib/systemd/systemd)".into());
    }
    for tool in ["bash", "make", "timeout", "flock", "nsenter"] {
        if !on_path(tool) {
            return Some(format!("`{tool}` is not on PATH"));
        }
    }
    None
}

/// Keys for the script's measurements: b's shard, and a key whose shard node 1 leads (its
/// preferred leader, which leader balancing makes the actual one), to time reads across
/// `systemctl stop kvnode@1`.
fn keys_to_measure() -> Vec<(&'static str, String)> {
    let config = Config::load(&Path::new(MANIFEST_DIR).join("etc/kvnode/cluster.toml"))
        .expect("the sample config loads");
    let placement = Placement::new(&config.node_ids(), config.shards, config.replication_factor);
    let mut env = vec![("KV_E2E_B_SHARD", placement.shard_for_key(b"b").to_string())];
    let led_by_1 = (0..10_000)
        .map(|i| format!("k{i}"))
        .find(|k| placement.preferred_leader(placement.shard_for_key(k.as_bytes())) == 1);
    if let Some(k) = led_by_1 {
        let shard = placement.shard_for_key(k.as_bytes());
        env.push(("KV_E2E_NODE1_KEY", k));
        env.push(("KV_E2E_NODE1_SHARD", shard.to_string()));
    }
    env
}

#[test]
fn walkthrough_under_systemd() {
    let asked = std::env::var_os("CI").is_some()
        || std::env::var("KV_SYSTEMD_TEST").is_ok_and(|v| v == "1");
    if !asked {
        println!(
            "skipped: set KV_SYSTEMD_TEST=1 to run it (root, cgroups, overlayfs, \
             ports 5000-5002 free)"
        );
        return;
    }
    if let Some(reason) = missing_for_systemd() {
        return skip(&reason);
    }
    let script = Path::new(MANIFEST_DIR).join("tests/systemd_e2e.sh");
    // `timeout` bounds the whole run (up to 10 min of it waiting for another run's lock); its
    // SIGTERM lets the script's trap take the sandbox down.
    let out = Command::new("timeout")
        .args([
            "--kill-after=30",
            "900",
            "bash",
            "-c",
            "exec bash \"$0\" 2>&1",
        ])
        .arg(&script)
        .current_dir(MANIFEST_DIR)
        .env("KVNODE_BIN", KVNODE)
        .env("KVCTL_BIN", KVCTL)
        .envs(keys_to_measure())
        .output()
        .expect("run tests/systemd_e2e.sh");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "tests/systemd_e2e.sh failed ({}); its output is above",
        out.status
    );
}

fn make(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new("make")
        .arg("-C")
        .arg(MANIFEST_DIR)
        .args(args)
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .output()
        .expect("run make");
    assert!(
        out.status.success(),
        "make {args:?} into {} failed: {}\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `make install DESTDIR=…` lays out a package: binaries under PREFIX, the unit with PREFIX in
/// its ExecStart, the enablement links for NODES, the sample config — kept when already there;
/// `make uninstall` removes all but the config. No root and no systemd involved.
#[test]
fn make_install_into_a_destdir() {
    if !on_path("make") {
        return skip("`make` is not on PATH");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path();
    let destdir = format!("DESTDIR={}", root.display());
    let bins = [
        destdir.as_str(),
        "PREFIX=/opt/kvstore",
        &format!("KVNODE_BIN={KVNODE}"),
        &format!("KVCTL_BIN={KVCTL}"),
    ]
    .map(String::from);
    let with = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        v.extend(bins.iter().cloned());
        v
    };
    let run = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        make(root, &refs)
    };
    let at = |p: &str| -> PathBuf { root.join(p.trim_start_matches('/')) };

    run(with(&["install", "NODES=0 2"]));
    for bin in ["/opt/kvstore/bin/kvnode", "/opt/kvstore/bin/kvctl"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(at(bin)).expect(bin).permissions(),
        );
        assert_eq!(mode & 0o777, 0o755, "{bin}");
    }
    let unit = std::fs::read_to_string(at("/etc/systemd/system/kvnode@.service")).expect("unit");
    assert!(
        unit.lines()
            .any(|l| l
                == "ExecStart=/opt/kvstore/bin/kvnode --id %i --config /etc/kvnode/cluster.toml"),
        "ExecStart does not use PREFIX:\n{unit}"
    );
    assert!(at("/etc/systemd/system/kvnode.target").is_file());
    for n in [0, 2] {
        let link = at(&format!(
            "/etc/systemd/system/kvnode.target.wants/kvnode@{n}.service"
        ));
        assert_eq!(
            std::fs::read_link(&link).expect("wants link"),
            Path::new("../kvnode@.service")
        );
    }
    assert!(!at("/etc/systemd/system/kvnode.target.wants/kvnode@1.service").exists());
    let sample = std::fs::read_to_string(Path::new(MANIFEST_DIR).join("etc/kvnode/cluster.toml"))
        .expect("sample config");
    let config = at("/etc/kvnode/cluster.toml");
    assert_eq!(std::fs::read_to_string(&config).expect("config"), sample);

    // An operator's config survives a reinstall, and an uninstall.
    let edited = format!("{sample}\n# edited by the operator\n");
    std::fs::write(&config, &edited).expect("edit config");
    let out = run(with(&["install"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("kept the existing"));
    assert_eq!(std::fs::read_to_string(&config).expect("config"), edited);

    run(with(&["uninstall"]));
    for gone in [
        "/opt/kvstore/bin/kvnode",
        "/opt/kvstore/bin/kvctl",
        "/etc/systemd/system/kvnode@.service",
        "/etc/systemd/system/kvnode.target",
        "/etc/systemd/system/kvnode.target.wants",
        "/etc/systemd/system/multi-user.target.wants/kvnode.target",
    ] {
        // symlink_metadata: a dangling link counts as still there.
        assert!(
            std::fs::symlink_metadata(at(gone)).is_err(),
            "{gone} is still there after uninstall"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&config).expect("config kept"),
        edited
    );
}
