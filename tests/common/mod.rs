//! Shared fixtures for the process tests: a cluster of real `kvnode` processes on loopback with
//! free ports and temporary data dirs. Every wait is bounded; every process is killed on drop,
//! and dies with the test process if that is killed before it can drop anything ([`kvnode`]).
#![allow(dead_code)]

pub mod linearizability;
pub mod proxy;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kvstore::client::Client;

pub const KVNODE: &str = env!("CARGO_BIN_EXE_kvnode");
pub const KVCTL: &str = env!("CARGO_BIN_EXE_kvctl");

/// A `kvnode` command whose process the kernel kills (SIGKILL) when the thread that started it
/// ends: a test process killed outright (once, the OOM killer) runs no `Drop`, and its nodes
/// would otherwise live on. Nodes are started only from test threads and tokio worker threads,
/// which live until their test ends.
pub fn kvnode() -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(KVNODE);
    // SAFETY: the closure runs in the forked child before exec and only makes one system call,
    // which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Free loopback ports (bound then released; the kernel does not hand them out again at once).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Polls `f` until it returns Some, or panics with `what` after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub addrs: Vec<String>,
    pub config: PathBuf,
    /// Per-node config files, when nodes must see each other at different addresses (proxies).
    pub node_configs: Vec<Option<PathBuf>>,
    children: Vec<Option<Child>>,
}

impl Cluster {
    /// Writes a config for `n` nodes (plus `extra` TOML lines) without starting anything.
    pub fn configure(n: usize, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let addrs: Vec<String> = free_ports(n)
            .into_iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let mut toml = format!("{extra}\n");
        for (i, a) in addrs.iter().enumerate() {
            toml.push_str(&format!("[[nodes]]\nid = {i}\naddr = \"{a}\"\n"));
        }
        let config = dir.path().join("cluster.toml");
        std::fs::write(&config, toml).expect("write config");
        Cluster {
            dir,
            addrs,
            config,
            node_configs: vec![None; n],
            children: (0..n).map(|_| None).collect(),
        }
    }

    /// Starts `n` nodes and waits until every shard has a leader.
    pub async fn start(n: usize, extra: &str) -> Cluster {
        let mut c = Cluster::configure(n, extra);
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_ready(Duration::from_secs(30)).await;
        c
    }

    pub fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}"))
    }

    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("node{i}.log"))
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    /// Starts node `i` (appending to its log file).
    pub fn spawn(&mut self, i: usize) {
        self.spawn_env(i, &[]);
    }

    /// Starts node `i` with extra environment variables (e.g. the WAL's `KV_WAL_FAULT` hook).
    pub fn spawn_env(&mut self, i: usize, env: &[(&str, &str)]) {
        assert!(self.children[i].is_none(), "node {i} is already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))
            .expect("open log");
        let config = self.node_configs[i].as_ref().unwrap_or(&self.config);
        let child = kvnode()
            .args(["--id", &i.to_string(), "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn kvnode");
        self.children[i] = Some(child);
    }

    fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.children[i] {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (bounded) for the exit status.
    pub fn stop(&mut self, i: usize) -> ExitStatus {
        self.signal(i, "-TERM");
        let mut c = self.children[i].take().expect("node is running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("node {i} did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pause(&self, i: usize) {
        self.signal(i, "-STOP");
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    pub fn wipe(&self, i: usize) {
        let d = self.data_dir(i);
        if d.exists() {
            std::fs::remove_dir_all(&d).expect("wipe data dir");
        }
    }

    /// The process id of node `i`, if it was started and not yet reaped.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.children[i].as_ref().map(|c| c.id())
    }

    /// Waits (bounded) for node `i` to exit on its own; reaps it and returns its status, or None
    /// if it is still running after `timeout` (it is left running then).
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = match &mut self.children[i] {
                Some(c) => c.try_wait().ok().flatten(),
                None => return None,
            };
            if let Some(s) = status {
                self.children[i] = None;
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().flatten().map(|c| c.id()).collect()
    }

    pub fn is_running(&mut self, i: usize) -> bool {
        match &mut self.children[i] {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn client(&self, nodes: &[usize]) -> Client {
        let eps: Vec<String> = nodes.iter().map(|i| self.addrs[*i].clone()).collect();
        Client::new(&eps, Duration::from_secs(10)).expect("client")
    }

    pub fn client_all(&self) -> Client {
        let all: Vec<usize> = (0..self.addrs.len()).collect();
        self.client(&all)
    }

    /// Waits until every running node reports a leader for each of its shards.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let running: Vec<usize> = (0..self.children.len())
            .filter(|i| self.children[*i].is_some())
            .collect();
        for &i in &running {
            let client =
                Client::new(&[self.addrs[i].clone()], Duration::from_secs(2)).expect("client");
            let what = format!("node {i} to serve with a leader for every shard");
            wait_for(&what, timeout, || {
                let client = &client;
                async move {
                    let s = client.status().await.ok()?;
                    let ok =
                        !s.value.shards.is_empty() && s.value.shards.iter().all(|sh| sh.has_leader);
                    ok.then_some(())
                }
            })
            .await;
            // A replica that pulled a shard from a peer at start-up does not vote until it has
            // caught up: give that a moment too, so tests start from a settled cluster. It is
            // liveness, not safety: if it takes longer, say so and go on.
            let settled = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let Ok(s) = client.status().await {
                        if s.value.shards.iter().all(|sh| !sh.recovering) {
                            return;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
            .await;
            if settled.is_err() {
                eprintln!("warning: node {i} still has a shard catching up after start-up");
            }
        }
    }

    /// The node currently leading the shard of `key`, as `node` sees it.
    pub async fn leader_of(&self, key: &[u8]) -> u64 {
        let client = self.client_all();
        let served = client.put(key, b"probe-leader").await.expect("probe put");
        served.node_id
    }

    /// Runs `kvctl` with `args` against the given nodes; returns (exit code, stdout, stderr).
    pub fn kvctl(&self, nodes: &[usize], args: &[&str]) -> (i32, String, String) {
        let eps: Vec<String> = nodes.iter().map(|i| self.addrs[*i].clone()).collect();
        kvctl_with(&["--endpoints", &eps.join(",")], args)
    }
}

pub fn kvctl_with(pre: &[&str], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(KVCTL)
        .args(pre)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run kvctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `kvnode` to completion (for start-up failures), bounded.
pub fn kvnode_exit(args: &[&str], data_dir: &Path) -> (i32, String) {
    let mut child = kvnode()
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kvnode");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            return (status.code().unwrap_or(-1), err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kvnode {args:?} did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.children.len() {
            if let Some(c) = &self.children[i] {
                // A paused node must be resumed before it can die cleanly.
                let _ = Command::new("kill")
                    .args(["-CONT", &c.id().to_string()])
                    .status();
            }
            self.kill9(i);
        }
        if std::thread::panicking() {
            for i in 0..self.children.len() {
                eprintln!("===== node {i} log =====\n{}", self.log(i));
            }
        }
    }
}
