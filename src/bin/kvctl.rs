//! `kvctl`: the kvstore command-line client.
//!
//! ```text
//! kvctl [--endpoints HOST:PORT[,HOST:PORT…]] <command>
//!   put <key> <value> | get <key> [--stale] | delete <key> | status | demo
//!   (no command: interactive prompt, `>> put a 123`)
//! ```
//! Exit status: 0 success; 1 `get` of an absent key; 2 any error (message on stderr).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use kvstore::client::{Client, ClientError};
use kvstore::config::{self, Config};

#[derive(Parser, Debug)]
#[command(name = "kvctl", version, about = "Client for a kvstore cluster")]
struct Args {
    /// Nodes to talk to [default: $KV_ENDPOINTS, else every addr in /etc/kvnode/cluster.toml].
    #[arg(long, value_delimiter = ',', global = true)]
    endpoints: Vec<String>,
    /// Cluster config to read endpoints from when none are given.
    #[arg(long, default_value = config::DEFAULT_PATH, global = true)]
    config: PathBuf,
    /// Per-request deadline, in milliseconds.
    #[arg(long, default_value_t = 5000, global = true)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Store a value (exit 0 once it is durable on a majority).
    Put { key: String, value: String },
    /// Print a key's value (exit 1 when absent).
    Get {
        key: String,
        /// Read the contacted node's replica instead of a linearizable read.
        #[arg(long)]
        stale: bool,
    },
    /// Delete a key (exit 0 whether or not it existed).
    Delete { key: String },
    /// Nodes (up/down), shards and their leaders, as one node sees them.
    Status,
    /// Start a local 3-node cluster on 127.0.0.1:5000-5002 and open the prompt.
    Demo {
        /// Where the nodes keep their data and logs.
        #[arg(long, default_value = "kvstore-demo")]
        dir: PathBuf,
        /// First port; the nodes listen on port, port+1, port+2.
        #[arg(long, default_value_t = 5000)]
        port: u16,
    },
    /// Closed-loop load generator: workloads, clients, duration; --target etcd too.
    Bench(kvstore::bench::BenchArgs),
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvctl: {e}");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(run(args))
}

fn endpoints(args: &Args) -> Result<Vec<String>, String> {
    if !args.endpoints.is_empty() {
        return Ok(args.endpoints.clone());
    }
    if let Ok(e) = std::env::var("KV_ENDPOINTS") {
        let v: Vec<String> = e
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if !v.is_empty() {
            return Ok(v);
        }
    }
    match Config::load(&args.config) {
        Ok(c) => Ok(c.nodes.iter().map(|n| n.addr.clone()).collect()),
        Err(e) => Err(format!(
            "no endpoints: pass --endpoints or set KV_ENDPOINTS ({e})"
        )),
    }
}

async fn run(args: Args) -> ExitCode {
    let timeout = Duration::from_millis(args.timeout_ms);
    if let Some(Cmd::Demo { dir, port }) = &args.command {
        return demo(dir, *port, timeout).await;
    }
    if let Some(Cmd::Bench(b)) = &args.command {
        return match endpoints(&args) {
            Ok(e) => kvstore::bench::main(b, &e, timeout).await,
            Err(e) => {
                eprintln!("kvctl: {e}");
                ExitCode::from(2)
            }
        };
    }
    let client =
        match endpoints(&args).and_then(|e| Client::new(&e, timeout).map_err(|e| e.to_string())) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("kvctl: {e}");
                return ExitCode::from(2);
            }
        };
    match args.command {
        None => {
            prompt(&client).await;
            ExitCode::SUCCESS
        }
        Some(Cmd::Put { key, value }) => finish(
            client
                .put(key.as_bytes(), value.as_bytes())
                .await
                .map(|_| 0),
        ),
        Some(Cmd::Get { key, stale }) => {
            finish(
                client
                    .get(key.as_bytes(), stale)
                    .await
                    .map(|r| match r.value {
                        Some(v) => {
                            let mut out = std::io::stdout().lock();
                            let _ = out.write_all(&v);
                            let _ = out.write_all(b"\n");
                            0
                        }
                        None => {
                            eprintln!("kvctl: key not found");
                            1
                        }
                    }),
            )
        }
        Some(Cmd::Delete { key }) => finish(client.delete(key.as_bytes()).await.map(|_| 0)),
        Some(Cmd::Status) => finish(client.status().await.map(|s| {
            print_status(&s.value);
            0
        })),
        Some(Cmd::Demo { .. }) | Some(Cmd::Bench(_)) => ExitCode::SUCCESS,
    }
}

fn finish(r: Result<u8, ClientError>) -> ExitCode {
    match r {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("kvctl: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_status(s: &kvstore::pb::StatusReply) {
    println!("as seen by node {} ({} shards)", s.node_id, s.shard_count);
    println!();
    println!("NODE   ADDR                   STATE  LAST SEEN");
    println!("{:<6} {:<22} {:<6} -", s.node_id, "(this node)", "up");
    for p in &s.peers {
        let seen = if p.last_seen_ms_ago == u64::MAX {
            "never".to_string()
        } else {
            format!("{} ms ago", p.last_seen_ms_ago)
        };
        let state = if p.up { "up" } else { "down" };
        println!("{:<6} {:<22} {:<6} {}", p.id, p.addr, state, seen);
    }
    println!();
    println!("SHARD  REPLICAS   LEADER  PREFERRED  TERM   APPLIED   ROLE HERE");
    for sh in &s.shards {
        let replicas: Vec<String> = sh.replicas.iter().map(|r| r.to_string()).collect();
        let leader = if sh.has_leader {
            sh.leader.to_string()
        } else {
            "none".to_string()
        };
        println!(
            "{:<6} {:<10} {:<7} {:<10} {:<6} {:<9} {}",
            sh.shard,
            replicas.join(","),
            leader,
            sh.preferred_leader,
            sh.term,
            sh.applied_index,
            sh.role
        );
    }
}

/// One prompt command, as the original client: `put k v`, `get k`, `delete k`.
async fn prompt_line(client: &Client, line: &str) -> Option<String> {
    let mut parts = line.split_whitespace();
    let cmd = parts.next()?;
    let tag = |node: u64| format!("[Node {node}]");
    Some(match (cmd, parts.next(), parts.next()) {
        ("put", Some(k), Some(_)) => {
            // The value is the rest of the line, spaces included.
            let value = line.trim_start()[3..].trim_start()[k.len()..].trim();
            match client.put(k.as_bytes(), value.as_bytes()).await {
                Ok(r) => format!("{} OK", tag(r.node_id)),
                Err(e) => format!("error: {e}"),
            }
        }
        ("get", Some(k), None) => match client.get(k.as_bytes(), false).await {
            Ok(r) => match r.value {
                Some(v) => format!(
                    "{} FOUND value={}",
                    tag(r.node_id),
                    String::from_utf8_lossy(&v)
                ),
                None => format!("{} NOT FOUND", tag(r.node_id)),
            },
            Err(e) => format!("error: {e}"),
        },
        ("delete", Some(k), None) => match client.delete(k.as_bytes()).await {
            Ok(r) if r.value => format!("{} DELETED", tag(r.node_id)),
            Ok(r) => format!("{} NOT FOUND", tag(r.node_id)),
            Err(e) => format!("error: {e}"),
        },
        ("status", None, None) => match client.status().await {
            Ok(s) => {
                print_status(&s.value);
                String::new()
            }
            Err(e) => format!("error: {e}"),
        },
        ("help", _, _) => {
            "Commands: put <k> <v> | get <k> | delete <k> | status | quit".to_string()
        }
        _ => "Commands: put <k> <v> | get <k> | delete <k> | status | quit".to_string(),
    })
}

async fn prompt(client: &Client) {
    println!("Commands: put <k> <v> | get <k> | delete <k> | status | quit");
    // The prompt is for people; piped input gets only the answers.
    let interactive = std::io::IsTerminal::is_terminal(&std::io::stdin());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(1);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    // stdin is blocking: read it on its own thread, one line per answered command, so the next
    // ">> " comes after the previous answer.
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            if interactive {
                print!(">> ");
                let _ = std::io::stdout().flush();
            }
            match lines.next() {
                Some(Ok(l)) => {
                    if tx.blocking_send(l).is_err() || ready_rx.recv().is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    });
    loop {
        let line = tokio::select! {
            l = rx.recv() => match l { Some(l) => l, None => { println!(); return; } },
            _ = tokio::signal::ctrl_c() => { println!(); return; }
        };
        let line = line.trim();
        if line == "quit" || line == "exit" {
            return;
        }
        if !line.is_empty() {
            if let Some(out) = prompt_line(client, line).await {
                if !out.is_empty() {
                    println!("{out}");
                }
            }
        }
        let _ = ready_tx.send(());
    }
}

/// `kvctl demo`: three local nodes, the prompt, and a clean stop.
async fn demo(dir: &Path, port: u16, timeout: Duration) -> ExitCode {
    match demo_inner(dir, port, timeout).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvctl demo: {e}");
            ExitCode::from(2)
        }
    }
}

struct Children(Vec<std::process::Child>);

impl Children {
    /// SIGTERM every node, wait for each (bounded), SIGKILL what is left.
    fn stop(&mut self) {
        for c in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for c in &mut self.0 {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.0.clear();
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn demo_inner(dir: &Path, port: u16, timeout: Duration) -> Result<(), String> {
    let kvnode = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("kvnode")))
        .filter(|p| p.exists())
        .ok_or("cannot find the kvnode binary next to kvctl")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let addrs: Vec<String> = (0..3u16)
        .map(|i| format!("127.0.0.1:{}", port + i))
        .collect();
    let mut toml = String::from("# written by kvctl demo\n");
    for (i, a) in addrs.iter().enumerate() {
        toml.push_str(&format!("[[nodes]]\nid = {i}\naddr = \"{a}\"\n\n"));
    }
    let cfg = dir.join("cluster.toml");
    std::fs::write(&cfg, toml).map_err(|e| format!("{}: {e}", cfg.display()))?;
    let mut children = Children(Vec::new());
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("node{i}.log")))
            .map_err(|e| format!("log file: {e}"))?;
        let child = std::process::Command::new(&kvnode)
            .arg("--id")
            .arg(i.to_string())
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.join(format!("node{i}")))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", kvnode.display()))?;
        children.0.push(child);
    }
    let client = Client::new(&addrs, timeout).map_err(|e| e.to_string())?;
    println!(
        "started 3 nodes on {} (data and logs in {})",
        addrs.join(", "),
        dir.display()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for c in &mut children.0 {
            if let Ok(Some(status)) = c.try_wait() {
                return Err(format!(
                    "a node exited during start-up ({status}); see {}/node*.log",
                    dir.display()
                ));
            }
        }
        if let Ok(s) = client.status().await {
            let ready = !s.value.shards.is_empty()
                && s.value.shards.iter().all(|sh| sh.has_leader)
                && s.value.peers.iter().all(|p| p.up);
            if ready {
                break;
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "cluster not ready after 30 s; see {}/node*.log",
                dir.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "cluster ready. Stop a node from another shell to see fail-over; quit or Ctrl-D stops all."
    );
    prompt(&client).await;
    println!("stopping the nodes...");
    children.stop();
    Ok(())
}
