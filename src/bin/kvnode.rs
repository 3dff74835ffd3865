//! `kvnode`: one node of a kvstore cluster.
//!
//! ```text
//! kvnode --id <N> [--config /etc/kvnode/cluster.toml] [--data-dir DIR]
//! ```
//! Exit status: 0 after a graceful stop (SIGTERM/SIGINT); 2 when it cannot start (bad config,
//! unknown id, address in use, unusable or foreign data dir), with one line on stderr saying why;
//! 1 when a storage failure (a WAL write or fsync error) stops it while serving: a restart then
//! recovers from the WAL.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// How long a stopping node refuses clients' new requests (safely: marked not executed) before
/// it closes its connections.
const DRAIN: Duration = Duration::from_millis(300);

use clap::Parser;
use kvstore::config::{self, Config};
use kvstore::node::Node;
use kvstore::pb::cluster_server::ClusterServer;
use kvstore::pb::key_value_server::KeyValueServer;
use kvstore::peers::{CONNECTION_WINDOW, MAX_MESSAGE, STREAM_WINDOW};
use kvstore::server::{self, ClusterService, KeyValueService};

/// mimalloc instead of glibc's malloc: allocation and free were 10 % of a node's CPU under
/// writes (keys, values and Raft messages move through several layers); see BENCHMARKS.md.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "kvnode", version, about = "A node of a kvstore cluster")]
struct Args {
    /// This node's id (an `id` of a `[[nodes]]` entry in the config).
    #[arg(long)]
    id: u64,
    /// Cluster config file.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    /// Data directory [default: $STATE_DIRECTORY, else /var/lib/kvnode/<id>].
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kvnode: {e}");
            return ExitCode::from(2);
        }
    };
    let data_dir = args
        .data_dir
        .or_else(|| {
            // systemd may pass several colon-separated dirs; ours is the first.
            std::env::var("STATE_DIRECTORY")
                .ok()
                .and_then(|s| s.split(':').next().map(PathBuf::from))
        })
        .unwrap_or_else(|| PathBuf::from(format!("/var/lib/kvnode/{}", args.id)));
    let sink = kvstore::telemetry::init(config.log_level.as_deref());
    for w in config.warnings() {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kvnode: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    tracing::info!(
        KV_NODE = args.id,
        "kvnode {} starting: config {}, data dir {}, logging to {sink}",
        env!("CARGO_PKG_VERSION"),
        args.config.display(),
        data_dir.display()
    );
    runtime.block_on(run(config, args.id, data_dir))
}

async fn run(config: Config, id: u64, data_dir: PathBuf) -> ExitCode {
    let (node, listener) = match Node::open(config, id, &data_dir).await {
        Ok(x) => x,
        Err(e) => {
            // stderr reaches the journal under systemd too: one line, said once.
            eprintln!("kvnode: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut stop = node.stop_signal();
    // Resource limits (see kvstore::server): connections, streams per connection, keepalive,
    // and a client message limit far below the peers' (a message is buffered whole).
    let max_connections = server::max_connections();
    tracing::info!(
        KV_NODE = id,
        "accepting at most {max_connections} connections"
    );
    let server = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(server::MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(server::KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(server::KEEPALIVE_TIMEOUT))
        .add_service(
            KeyValueServer::new(KeyValueService { node: node.clone() })
                .max_decoding_message_size(server::MAX_CLIENT_MESSAGE)
                .max_encoding_message_size(server::MAX_CLIENT_MESSAGE),
        )
        .add_service(
            ClusterServer::new(ClusterService { node: node.clone() })
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(server::incoming(listener, max_connections), async move {
            let _ = stop.changed().await;
        });
    let server = tokio::spawn(server);

    let start = node.start(&data_dir);
    tokio::select! {
        r = start => if let Err(e) = r {
            eprintln!("kvnode: {e}");
            node.shutdown().await;
            return ExitCode::from(2);
        },
        _ = shutdown_signal() => {
            tracing::info!(KV_NODE = id, "stopped while starting");
            node.shutdown().await;
            return ExitCode::SUCCESS;
        }
        reason = node.fatal() => fatal_exit(id, &reason),
    }
    tracing::info!(KV_NODE = id, "serving on {addr}");
    notify_ready();

    tokio::select! {
        _ = shutdown_signal() => {}
        reason = node.fatal() => fatal_exit(id, &reason),
    }
    tracing::info!(KV_NODE = id, "stopping");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    // Hand off leaderships while serving; then stop accepting and let in-flight requests finish
    // (their writes must not be cut off mid-commit); only then stop Raft and storage.
    node.prepare_stop().await;
    node.start_draining();
    // Clients that still send here learn to go elsewhere, while the connection stays open.
    tokio::time::sleep(DRAIN).await;
    node.stop_serving();
    if tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .is_err()
    {
        tracing::warn!(
            KV_NODE = id,
            "requests still running after 10 s; stopping anyway"
        );
    }
    node.shutdown().await;
    tracing::info!(KV_NODE = id, "stopped");
    ExitCode::SUCCESS
}

/// A shard's Raft group died of a storage error (e.g. a failed WAL fsync: the WAL refuses all
/// further writes) or a panic. Going on would leave a node that looks alive but cannot write, so
/// exit at once, like a crash (nothing is flushed: the WAL is the source of truth, and its
/// recovery on the next start decides what survived). Exit 1, so systemd restarts it; if the disk
/// is still broken, that start fails to open the WAL and exits 2, which systemd does not retry.
fn fatal_exit(id: u64, reason: &str) -> ! {
    tracing::error!(
        KV_NODE = id,
        "fatal: {reason}; exiting for a restart to recover"
    );
    eprintln!("kvnode: fatal: {reason}; exiting for a restart to recover");
    std::process::exit(1)
}

/// Tells systemd (Type=notify) we serve, and keeps its watchdog fed while the runtime runs.
fn notify_ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = Duration::from_micros(usec / 2);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! { _ = t.recv() => {}, _ = i.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
