//! Logging: natively to journald when systemd started us (so `journalctl KV_EVENT=peer_down`
//! works on the structured fields), human-readable lines on stderr otherwise.
//!
//! Events that operators query carry `KV_EVENT` and `KV_NODE`, and where they apply `KV_PEER`
//! and `KV_SHARD`. The level comes from `RUST_LOG`, else the config's `log_level`, else `info`.
//!
//! In the journal, field names are the tracing field names upper-cased with no prefix
//! (`KV_EVENT=peer_down`, `KV_PEER=1`, `SHARD=3`), and `PRIORITY` follows syslog's meaning of
//! the level: error 3, warn 4, info 6, debug and trace 7, so `journalctl -p warning` shows warnings
//! and errors only. (tracing-journald's own default puts info at 5, "notice", and debug at 6.)

use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

fn filter(config_level: Option<&str>) -> EnvFilter {
    let default = config_level.unwrap_or("info");
    // openraft is chatty at info; its warnings still come through.
    let base = format!("{default},openraft=warn,sled=warn,h2=warn,tower=warn,hyper=warn");
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&base))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Whether stderr is connected to the journal (systemd sets `JOURNAL_STREAM` for the service).
fn under_journald() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some()
        || std::env::var_os("INVOCATION_ID")
            .is_some_and(|_| std::env::var_os("NOTIFY_SOCKET").is_some())
}

/// Installs the global subscriber. Returns where logs go, for the first log line.
pub fn init(config_level: Option<&str>) -> &'static str {
    let registry = tracing_subscriber::registry().with(filter(config_level));
    if under_journald() {
        if let Ok(layer) = tracing_journald::layer() {
            let layer = layer
                .with_field_prefix(None)
                .with_priority_mappings(PriorityMappings {
                    error: Priority::Error,
                    warn: Priority::Warning,
                    info: Priority::Informational,
                    debug: Priority::Debug,
                    trace: Priority::Debug,
                })
                .with_syslog_identifier("kvnode".into());
            if registry.with(layer).try_init().is_ok() {
                return "journald";
            }
            return "already initialized";
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = registry.with(fmt).try_init();
    "stderr"
}

/// Logs for tests and tools: stderr only, quiet unless RUST_LOG says otherwise.
pub fn init_for_tools() {
    let _ = tracing_subscriber::registry()
        .with(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")))
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .try_init();
}
