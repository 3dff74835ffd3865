//! The cluster config file, `/etc/kvnode/cluster.toml` by default.
//!
//! This module owns the on-disk shape of that file, the default of every
//! optional setting, and the rules a config must satisfy before a node may
//! start with it. It promises:
//!
//! * The only required content is one or more `[[nodes]]` tables, each with
//!   an `id` (u64) and an `addr` (`host:port`). Every other setting is an
//!   optional top-level key whose default is defined exactly once, below
//!   (`DEFAULT_*` constants, wired into serde via `#[serde(default = ...)]`).
//! * [`Config::load`] / [`Config::parse`] either return a config that has
//!   passed [`Config::validate`], or a [`ConfigError`]. Unknown keys are
//!   errors, not silently ignored: a typo such as `shard = 16` must not
//!   quietly give a cluster the default 8 shards forever.
//! * Every [`ConfigError`] displays as a single line that names the file (when
//!   known) and says what to fix, e.g.
//!   `/etc/kvnode/cluster.toml: duplicate node id 1`. It is meant to be shown
//!   to an operator as-is, on a terminal or in the journal.
//! * No network access: addresses are checked for shape only, never resolved,
//!   so validation is fast, deterministic and works before DNS is up.
//!
//! Settings that are legal but dangerous (e.g. `fsync = false`) are not
//! errors; [`Config::warnings`] lists them so the node can log them loudly.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where `kvnode` and `kvctl` look for the cluster config unless told otherwise.
pub const DEFAULT_PATH: &str = "/etc/kvnode/cluster.toml";

/// Default for [`Config::cluster_name`].
pub const DEFAULT_CLUSTER_NAME: &str = "kvstore";
/// Default for [`Config::shards`].
pub const DEFAULT_SHARDS: u32 = 8;
/// Default for [`Config::replication_factor`].
pub const DEFAULT_REPLICATION_FACTOR: usize = 3;
/// Default for [`Config::heartbeat_interval_ms`].
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 500;
/// Default for [`Config::failure_timeout_ms`].
pub const DEFAULT_FAILURE_TIMEOUT_MS: u64 = 1500;
/// Default for [`Config::raft_heartbeat_ms`].
pub const DEFAULT_RAFT_HEARTBEAT_MS: u64 = 100;
/// Default for [`Config::election_timeout_ms`].
pub const DEFAULT_ELECTION_TIMEOUT_MS: u64 = 300;
/// Default for [`Config::request_timeout_ms`].
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5000;
/// Default for [`Config::snapshot_logs`].
pub const DEFAULT_SNAPSHOT_LOGS: u64 = 20_000;
/// Default for [`Config::fsync`].
pub const DEFAULT_FSYNC: bool = true;

/// Largest accepted [`Config::shards`]. Each shard is its own Raft group, so
/// this bounds per-node memory, file handles and heartbeat traffic.
pub const MAX_SHARDS: u32 = 1024;
/// Largest accepted [`Config::replication_factor`]. Beyond 7 replicas, every
/// write waits on more acknowledgements for no practical durability gain.
pub const MAX_REPLICATION_FACTOR: usize = 7;

// serde's `default = "path"` needs functions; they only forward to the
// constants above so that each default lives in exactly one place.
fn default_cluster_name() -> String {
    DEFAULT_CLUSTER_NAME.to_string()
}
fn default_shards() -> u32 {
    DEFAULT_SHARDS
}
fn default_replication_factor() -> usize {
    DEFAULT_REPLICATION_FACTOR
}
fn default_heartbeat_interval_ms() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_MS
}
fn default_failure_timeout_ms() -> u64 {
    DEFAULT_FAILURE_TIMEOUT_MS
}
fn default_raft_heartbeat_ms() -> u64 {
    DEFAULT_RAFT_HEARTBEAT_MS
}
fn default_election_timeout_ms() -> u64 {
    DEFAULT_ELECTION_TIMEOUT_MS
}
fn default_request_timeout_ms() -> u64 {
    DEFAULT_REQUEST_TIMEOUT_MS
}
fn default_snapshot_logs() -> u64 {
    DEFAULT_SNAPSHOT_LOGS
}
fn default_fsync() -> bool {
    DEFAULT_FSYNC
}

/// One `[[nodes]]` entry: a cluster member and where its peers and clients
/// reach it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Stable identity of the node (also its Raft node id). Never reuse an id
    /// for a different machine's data.
    pub id: u64,
    /// `host:port` to listen on and to be dialled at: an IPv4 address, a
    /// bracketed IPv6 address (`[::1]:5000`) or a hostname.
    pub addr: String,
}

impl NodeConfig {
    /// Convenience constructor, mostly for tests and tools.
    pub fn new(id: u64, addr: impl Into<String>) -> Self {
        NodeConfig {
            id,
            addr: addr.into(),
        }
    }
}

/// The whole cluster config. See the module docs and
/// `etc/kvnode/cluster.toml` for the file format.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name stored in each node's data directory when it is first created; a
    /// node refuses to start on a data directory with a different name, which
    /// catches pointing a node at another cluster's data. Default `"kvstore"`.
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// Number of shards (Raft groups) keys are hashed into. Fixed when the
    /// cluster is created: changing it remaps almost every key. 1..=1024,
    /// default 8.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// Replicas per shard. 1..=7 and at most the number of nodes, default 3.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: usize,
    /// Interval of node-to-node Ping health checks, default 500 ms.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A peer that has not answered a Ping for this long is marked DOWN.
    /// Must exceed `heartbeat_interval_ms`; default 1500 ms.
    #[serde(default = "default_failure_timeout_ms")]
    pub failure_timeout_ms: u64,
    /// Raft leader heartbeat interval, default 100 ms.
    #[serde(default = "default_raft_heartbeat_ms")]
    pub raft_heartbeat_ms: u64,
    /// Lower bound of the randomized Raft election timeout (the upper bound is
    /// twice this). Must exceed `2 * raft_heartbeat_ms`; default 300 ms (measured: a dead leader is
    /// replaced in about 1.2 s, see the README).
    #[serde(default = "default_election_timeout_ms")]
    pub election_timeout_ms: u64,
    /// Default deadline for one client request, including retries across a
    /// leader change. Default 5000 ms.
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Build a snapshot every this many applied log entries per shard, which
    /// bounds log size and restart time. Default 20000.
    #[serde(default = "default_snapshot_logs")]
    pub snapshot_logs: u64,
    /// fsync the log and state before acknowledging writes. Default true;
    /// `false` is for benchmarks and tests only (see [`Config::warnings`]).
    #[serde(default = "default_fsync")]
    pub fsync: bool,
    /// `tracing` filter such as `"info"` or `"kvstore=debug,info"`. The
    /// `RUST_LOG` environment variable, when set, takes precedence. Absent
    /// means the binary's built-in default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// The cluster members. Required, at least one.
    pub nodes: Vec<NodeConfig>,
}

impl Config {
    /// A config with the given nodes and every other setting at its default.
    /// Not validated: call [`Config::validate`] if the nodes are untrusted.
    pub fn with_nodes(nodes: Vec<NodeConfig>) -> Self {
        Config {
            cluster_name: default_cluster_name(),
            shards: default_shards(),
            replication_factor: default_replication_factor(),
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            failure_timeout_ms: default_failure_timeout_ms(),
            raft_heartbeat_ms: default_raft_heartbeat_ms(),
            election_timeout_ms: default_election_timeout_ms(),
            request_timeout_ms: default_request_timeout_ms(),
            snapshot_logs: default_snapshot_logs(),
            fsync: default_fsync(),
            log_level: None,
            nodes,
        }
    }

    /// Reads, parses and validates the config file at `path`. Errors name
    /// `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse_inner(&text, Some(path))
    }

    /// Parses and validates config text that did not come from a known file
    /// (errors say "cluster config" instead of a path).
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        Self::parse_inner(text, None)
    }

    fn parse_inner(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = file.map(Path::to_path_buf);
        let config: Config =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(&e, text, file.clone()))?;
        config.validate().map_err(|e| e.with_file(file))?;
        Ok(config)
    }

    /// Checks everything serde cannot: node list sanity, address shape,
    /// numeric bounds and the relations between timeouts. Returns the first
    /// problem found; the error has no file name (see [`ConfigError::with_file`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check().map_err(|problem| ConfigError::Invalid {
            file: None,
            problem,
        })
    }

    fn check(&self) -> Result<(), Problem> {
        if self.nodes.is_empty() {
            return Err(Problem::NoNodes);
        }
        // BTreeMaps rather than HashMaps so that, with several problems, the
        // one reported does not depend on hash seeds.
        let mut ids = BTreeMap::new();
        let mut addrs: BTreeMap<String, u64> = BTreeMap::new();
        for node in &self.nodes {
            if ids.insert(node.id, ()).is_some() {
                return Err(Problem::DuplicateId(node.id));
            }
            let key = check_addr(&node.addr).map_err(|reason| Problem::BadAddr {
                id: node.id,
                addr: node.addr.clone(),
                reason,
            })?;
            if let Some(&first) = addrs.get(&key) {
                return Err(Problem::DuplicateAddr {
                    first,
                    second: node.id,
                    addr: node.addr.clone(),
                });
            }
            addrs.insert(key, node.id);
        }

        if self.cluster_name.trim().is_empty() {
            return Err(Problem::EmptyClusterName);
        }
        if !(1..=MAX_SHARDS).contains(&self.shards) {
            return Err(Problem::Shards(self.shards));
        }
        if !(1..=MAX_REPLICATION_FACTOR).contains(&self.replication_factor) {
            return Err(Problem::ReplicationFactor(self.replication_factor));
        }
        if self.replication_factor > self.nodes.len() {
            return Err(Problem::ReplicationExceedsNodes {
                rf: self.replication_factor,
                nodes: self.nodes.len(),
            });
        }

        // Zero intervals would mean busy loops or instant timeouts; reject
        // them rather than guess what was meant.
        for (key, value) in [
            ("heartbeat_interval_ms", self.heartbeat_interval_ms),
            ("failure_timeout_ms", self.failure_timeout_ms),
            ("raft_heartbeat_ms", self.raft_heartbeat_ms),
            ("election_timeout_ms", self.election_timeout_ms),
            ("request_timeout_ms", self.request_timeout_ms),
            ("snapshot_logs", self.snapshot_logs),
        ] {
            if value == 0 {
                return Err(Problem::Zero(key));
            }
        }
        // A timeout at or below the heartbeat interval declares a healthy peer
        // DOWN between two Pings.
        if self.failure_timeout_ms <= self.heartbeat_interval_ms {
            return Err(Problem::FailureTimeout {
                failure_timeout_ms: self.failure_timeout_ms,
                heartbeat_interval_ms: self.heartbeat_interval_ms,
            });
        }
        // Followers must be able to miss one leader heartbeat without
        // starting an election, or leadership flaps on ordinary jitter.
        if self.election_timeout_ms <= self.raft_heartbeat_ms.saturating_mul(2) {
            return Err(Problem::ElectionTimeout {
                election_timeout_ms: self.election_timeout_ms,
                raft_heartbeat_ms: self.raft_heartbeat_ms,
            });
        }
        Ok(())
    }

    /// Legal but risky settings, one line each, for the node to log at WARN
    /// on startup. Empty for a sane production config.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.fsync {
            out.push(
                "fsync = false: acknowledged writes can be lost on power failure or \
                 kernel crash; use only for benchmarks and tests"
                    .to_string(),
            );
        }
        if self.replication_factor < 3 && self.nodes.len() >= 3 {
            out.push(format!(
                "replication_factor = {}: a shard cannot survive losing a node while \
                 staying writable; 3 or more is recommended",
                self.replication_factor
            ));
        }
        // Raft needs up to 2x election_timeout_ms to elect a new leader; a
        // shorter client deadline makes every leader change visible as errors.
        if self.request_timeout_ms <= self.election_timeout_ms.saturating_mul(2) {
            out.push(format!(
                "request_timeout_ms = {} is not above 2 * election_timeout_ms ({}): \
                 client requests will fail during leader elections instead of retrying",
                self.request_timeout_ms,
                self.election_timeout_ms.saturating_mul(2)
            ));
        }
        out
    }

    /// The node with this id, if it is a member.
    pub fn node(&self, id: u64) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// All member ids, sorted ascending (the order the file lists them in is
    /// not meaningful).
    pub fn node_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.nodes.iter().map(|n| n.id).collect();
        ids.sort_unstable();
        ids
    }

    /// [`Config::heartbeat_interval_ms`] as a `Duration`.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    /// [`Config::failure_timeout_ms`] as a `Duration`.
    pub fn failure_timeout(&self) -> Duration {
        Duration::from_millis(self.failure_timeout_ms)
    }
    /// [`Config::raft_heartbeat_ms`] as a `Duration`.
    pub fn raft_heartbeat(&self) -> Duration {
        Duration::from_millis(self.raft_heartbeat_ms)
    }
    /// [`Config::election_timeout_ms`] as a `Duration` (the lower bound).
    pub fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.election_timeout_ms)
    }
    /// [`Config::request_timeout_ms`] as a `Duration`.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// Same as [`Config::load`].
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    Config::load(path)
}

/// Same as [`Config::parse`].
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text)
}

/// Checks that `addr` is `host:port` without resolving it, returning a
/// normalized form used to detect two nodes configured with the same address
/// written differently (`[::1]:5000` vs `[0:0::1]:5000`, or hostname case).
/// On failure returns the rest of the sentence `addr "<addr>" ...`.
fn check_addr(addr: &str) -> Result<String, String> {
    let must_be = || "must be host:port".to_string();
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        // Bracketed IPv6: "[v6]:port".
        let (host, after) = rest.split_once(']').ok_or_else(must_be)?;
        let port = after.strip_prefix(':').ok_or_else(must_be)?;
        if host.parse::<Ipv6Addr>().is_err() {
            return Err(format!("has invalid IPv6 address {host:?}"));
        }
        (host, port)
    } else {
        if addr.contains("://") {
            return Err("must be host:port, without a scheme like http://".into());
        }
        let (host, port) = addr.rsplit_once(':').ok_or_else(must_be)?;
        if host.contains(':') {
            if host.parse::<Ipv6Addr>().is_ok() || addr.parse::<Ipv6Addr>().is_ok() {
                return Err(
                    "looks like an IPv6 address without brackets; write [address]:port".into(),
                );
            }
            return Err(must_be());
        }
        (host, port)
    };
    if host.is_empty() {
        return Err("must be host:port (the host is empty)".into());
    }
    // u16::from_str also accepts "+80"; insist on plain digits.
    let port_ok = !port.is_empty()
        && port.bytes().all(|b| b.is_ascii_digit())
        && matches!(port.parse::<u16>(), Ok(p) if p != 0);
    if !port_ok {
        return Err(format!("has invalid port {port:?} (expected 1-65535)"));
    }
    if !addr.starts_with('[') && !valid_host(host) {
        return Err(format!("has invalid host {host:?}"));
    }
    Ok(match addr.parse::<SocketAddr>() {
        Ok(sa) => sa.to_string(),
        Err(_) => addr.to_ascii_lowercase(),
    })
}

/// IPv4 literal or a DNS-style hostname (letters, digits, '-', '_' in
/// dot-separated labels). All-numeric dotted names must be real IPv4
/// addresses, so a typo like `127.0.0.256` is caught here rather than turning
/// into a baffling DNS failure at startup.
fn valid_host(host: &str) -> bool {
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host.parse::<Ipv4Addr>().is_ok();
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A semantic problem found by [`Config::validate`]. Displays as the part of
/// a [`ConfigError`] line after the file name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    /// `nodes` is empty.
    #[error("no nodes configured; add at least one [[nodes]] table with id and addr")]
    NoNodes,
    /// Two `[[nodes]]` share an id.
    #[error("duplicate node id {0}")]
    DuplicateId(u64),
    /// Two `[[nodes]]` share an address (after normalization).
    #[error("nodes {first} and {second} have the same addr {addr:?}")]
    DuplicateAddr {
        first: u64,
        second: u64,
        addr: String,
    },
    /// An `addr` is not a usable `host:port`; `reason` says why.
    #[error("node {id}: addr {addr:?} {reason}")]
    BadAddr {
        id: u64,
        addr: String,
        reason: String,
    },
    /// `cluster_name` is empty or blank.
    #[error("cluster_name must not be empty")]
    EmptyClusterName,
    /// `shards` outside `1..=MAX_SHARDS`.
    #[error("shards = {0} is out of range; it must be 1..={MAX_SHARDS} (and cannot change after the cluster is created)")]
    Shards(u32),
    /// `replication_factor` outside `1..=MAX_REPLICATION_FACTOR`.
    #[error("replication_factor = {0} is out of range; it must be 1..={MAX_REPLICATION_FACTOR}")]
    ReplicationFactor(usize),
    /// More replicas requested than there are nodes.
    #[error("replication_factor = {rf} but only {nodes} node(s) are configured; set it to at most {nodes} or add nodes")]
    ReplicationExceedsNodes { rf: usize, nodes: usize },
    /// A duration or count that must be positive is 0; holds the key.
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    /// `failure_timeout_ms <= heartbeat_interval_ms`.
    #[error("failure_timeout_ms ({failure_timeout_ms}) must be greater than heartbeat_interval_ms ({heartbeat_interval_ms}); several heartbeats is typical")]
    FailureTimeout {
        failure_timeout_ms: u64,
        heartbeat_interval_ms: u64,
    },
    /// `election_timeout_ms <= 2 * raft_heartbeat_ms`.
    #[error("election_timeout_ms ({election_timeout_ms}) must be greater than 2 * raft_heartbeat_ms ({raft_heartbeat_ms})")]
    ElectionTimeout {
        election_timeout_ms: u64,
        raft_heartbeat_ms: u64,
    },
}

/// Why a config could not be loaded. `Display` is always one line, prefixed
/// by the file path when known (otherwise "cluster config").
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not UTF-8, ...).
    #[error("cannot read {}: {}", path.display(), io_message(source))]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A key the format does not define (usually a typo).
    #[error("{}: unknown key {key:?}{}{}", Origin(file), AtLine(*line), DidYouMean(hint))]
    UnknownKey {
        file: Option<PathBuf>,
        key: String,
        line: Option<usize>,
        /// The closest valid key, if one is close.
        hint: Option<String>,
    },
    /// A required key is absent (`nodes`, or `id`/`addr` in a node).
    #[error("{}: {}", Origin(file), MissingKeyMsg(key, *line))]
    MissingKey {
        file: Option<PathBuf>,
        key: String,
        line: Option<usize>,
    },
    /// Not valid TOML, or a value of the wrong type.
    #[error("{}: {message}{}", Origin(file), AtLineCol(*line, *column))]
    Syntax {
        file: Option<PathBuf>,
        message: String,
        line: Option<usize>,
        column: Option<usize>,
    },
    /// Well-formed but unusable; see [`Problem`].
    #[error("{}: {problem}", Origin(file))]
    Invalid {
        file: Option<PathBuf>,
        problem: Problem,
    },
}

impl ConfigError {
    /// Attaches the file the config came from, so the message names it.
    pub fn with_file(mut self, path: Option<PathBuf>) -> Self {
        match &mut self {
            ConfigError::Io { .. } => {}
            ConfigError::UnknownKey { file, .. }
            | ConfigError::MissingKey { file, .. }
            | ConfigError::Syntax { file, .. }
            | ConfigError::Invalid { file, .. } => *file = path,
        }
        self
    }

    /// The validation problem, if this is a validation error.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            ConfigError::Invalid { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// Condenses toml's multi-line, source-quoting error into one line. toml
    /// only exposes a message and a byte span, so the key name and the
    /// suggestions are recovered from serde's stable message wording; if that
    /// wording ever changes we degrade to a `Syntax` error with the message.
    fn from_toml(err: &toml::de::Error, text: &str, file: Option<PathBuf>) -> Self {
        let message = err.message();
        let (line, column) = match err.span() {
            Some(span) => {
                let (l, c) = line_col(text, span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        let quoted = backticked(message);

        if message.starts_with("unknown field `") {
            if let Some((key, expected)) = quoted.split_first() {
                return ConfigError::UnknownKey {
                    file,
                    key: key.clone(),
                    line,
                    hint: closest(key, expected),
                };
            }
        }
        if message.starts_with("missing field `") {
            if let Some(key) = quoted.first() {
                // "nodes" missing is reported against the whole document, so
                // its span (line 1) would only mislead.
                let line = if key == "nodes" { None } else { line };
                return ConfigError::MissingKey {
                    file,
                    key: key.clone(),
                    line,
                };
            }
        }
        let message = if message == "invalid type: map, expected a sequence" {
            // The classic mistake of writing [nodes] instead of [[nodes]].
            "nodes must be an array of tables: write [[nodes]], not [nodes]".to_string()
        } else {
            message
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; ")
        };
        ConfigError::Syntax {
            file,
            message,
            line,
            column,
        }
    }
}

/// io::Error's Display appends " (os error N)", which is noise for an
/// operator; keep just the OS's sentence.
fn io_message(err: &io::Error) -> String {
    let full = err.to_string();
    match full.rfind(" (os error ") {
        Some(i) if full.ends_with(')') => full[..i].to_string(),
        _ => full,
    }
}

/// 1-based line and column (in chars) of byte offset `pos` in `text`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let pos = pos.min(text.len());
    let before = &text.as_bytes()[..pos];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let column = match text.get(line_start..pos) {
        Some(s) => s.chars().count() + 1,
        None => pos - line_start + 1,
    };
    (line, column)
}

/// The `backticked` words of a serde message, in order.
fn backticked(message: &str) -> Vec<String> {
    message
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// The candidate within edit distance 2 of `key` (the nearest, first on ties),
/// to turn "unknown key" into "did you mean".
fn closest(key: &str, candidates: &[String]) -> Option<String> {
    candidates
        .iter()
        .map(|c| (edit_distance(key, c), c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let subst = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = subst.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

struct Origin<'a>(&'a Option<PathBuf>);
impl fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(p) => write!(f, "{}", p.display()),
            None => f.write_str("cluster config"),
        }
    }
}

struct AtLine(Option<usize>);
impl fmt::Display for AtLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(l) => write!(f, " (line {l})"),
            None => Ok(()),
        }
    }
}

struct AtLineCol(Option<usize>, Option<usize>);
impl fmt::Display for AtLineCol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(l), Some(c)) => write!(f, " (line {l}, column {c})"),
            (Some(l), None) => write!(f, " (line {l})"),
            _ => Ok(()),
        }
    }
}

struct DidYouMean<'a>(&'a Option<String>);
impl fmt::Display for DidYouMean<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(h) => write!(f, "; did you mean {h:?}?"),
            None => Ok(()),
        }
    }
}

struct MissingKeyMsg<'a>(&'a str, Option<usize>);
impl fmt::Display for MissingKeyMsg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            ("nodes", _) => f.write_str(
                "no [[nodes]] tables; at least one [[nodes]] with id and addr is required",
            ),
            (key, Some(line)) => write!(
                f,
                "the table starting at line {line} is missing required key {key:?}"
            ),
            (key, None) => write!(f, "missing required key {key:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("../etc/kvnode/cluster.toml");

    fn three_nodes() -> Vec<NodeConfig> {
        (0..3)
            .map(|i| NodeConfig::new(i, format!("127.0.0.1:{}", 5000 + i)))
            .collect()
    }

    fn base() -> Config {
        Config::with_nodes(three_nodes())
    }

    #[test]
    fn defaults_match_documented_values() {
        let c = base();
        assert_eq!(c.cluster_name, "kvstore");
        assert_eq!(c.shards, 8);
        assert_eq!(c.replication_factor, 3);
        assert_eq!(c.heartbeat_interval_ms, 500);
        assert_eq!(c.failure_timeout_ms, 1500);
        assert_eq!(c.raft_heartbeat_ms, 100);
        assert_eq!(c.election_timeout_ms, 300);
        assert_eq!(c.request_timeout_ms, 5000);
        assert_eq!(c.snapshot_logs, 20_000);
        assert!(c.fsync);
        assert_eq!(c.log_level, None);
        assert!(c.validate().is_ok());
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        assert_eq!(c.heartbeat_interval(), Duration::from_millis(500));
        assert_eq!(c.failure_timeout(), Duration::from_millis(1500));
        assert_eq!(c.raft_heartbeat(), Duration::from_millis(100));
        assert_eq!(c.election_timeout(), Duration::from_millis(300));
        assert_eq!(c.request_timeout(), Duration::from_millis(5000));
    }

    #[test]
    fn serde_defaults_equal_with_nodes() {
        let text = r#"
[[nodes]]
id = 0
addr = "127.0.0.1:5000"
[[nodes]]
id = 1
addr = "127.0.0.1:5001"
[[nodes]]
id = 2
addr = "127.0.0.1:5002"
"#;
        assert_eq!(Config::parse(text).unwrap(), base());
    }

    #[test]
    fn sample_config_parses() {
        let c = Config::parse(SAMPLE).unwrap();
        assert_eq!(c, base(), "the sample must only document defaults");
        assert_eq!(c.node_ids(), vec![0, 1, 2]);
    }

    #[test]
    fn sample_documents_every_key_with_its_default() {
        // Uncommenting every "# key = value" line of the sample must give a
        // valid config equal to the defaults: keeps the sample honest.
        let uncommented: String = SAMPLE
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.contains(" = ") && !rest.starts_with(' ') => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&uncommented).unwrap();
        assert_eq!(c.log_level.as_deref(), Some("info"));
        assert_eq!(
            Config {
                log_level: None,
                ..c
            },
            base()
        );
        for key in [
            "cluster_name",
            "shards",
            "replication_factor",
            "heartbeat_interval_ms",
            "failure_timeout_ms",
            "raft_heartbeat_ms",
            "election_timeout_ms",
            "request_timeout_ms",
            "snapshot_logs",
            "fsync",
            "log_level",
        ] {
            assert!(
                uncommented.contains(&format!("\n{key} = ")),
                "sample does not document {key}"
            );
        }
    }

    #[test]
    fn full_file_overrides_every_default() {
        let text = r#"
cluster_name = "prod-eu"
shards = 64
replication_factor = 5
heartbeat_interval_ms = 250
failure_timeout_ms = 1000
raft_heartbeat_ms = 50
election_timeout_ms = 300
request_timeout_ms = 2000
snapshot_logs = 1000
fsync = false
log_level = "kvstore=debug,info"

[[nodes]]
id = 10
addr = "db1.example.com:7000"
[[nodes]]
id = 3
addr = "[::1]:7000"
[[nodes]]
id = 7
addr = "10.0.0.3:7000"
[[nodes]]
id = 1
addr = "db-4:7000"
[[nodes]]
id = 2
addr = "[fe80::1]:7001"
"#;
        let c = Config::parse(text).unwrap();
        assert_eq!(c.cluster_name, "prod-eu");
        assert_eq!(c.shards, 64);
        assert_eq!(c.replication_factor, 5);
        assert_eq!(c.heartbeat_interval_ms, 250);
        assert_eq!(c.failure_timeout_ms, 1000);
        assert_eq!(c.raft_heartbeat_ms, 50);
        assert_eq!(c.election_timeout_ms, 300);
        assert_eq!(c.request_timeout_ms, 2000);
        assert_eq!(c.snapshot_logs, 1000);
        assert!(!c.fsync);
        assert_eq!(c.log_level.as_deref(), Some("kvstore=debug,info"));
        assert_eq!(c.node_ids(), vec![1, 2, 3, 7, 10]);
        assert_eq!(c.node(3).map(|n| n.addr.as_str()), Some("[::1]:7000"));
        assert_eq!(c.node(4), None);
        let warnings = c.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("fsync = false"));
    }

    #[test]
    fn serialize_round_trips() {
        let mut c = base();
        c.log_level = Some("debug".into());
        c.shards = 16;
        let text = toml::to_string(&c).unwrap();
        assert_eq!(Config::parse(&text).unwrap(), c);
        let text = toml::to_string(&base()).unwrap();
        assert!(!text.contains("log_level"), "{text}");
        assert_eq!(Config::parse(&text).unwrap(), base());
    }

    /// Applies `edit` to a valid 3-node config and returns the error line.
    fn invalid(edit: impl FnOnce(&mut Config)) -> (Problem, String) {
        let mut c = base();
        edit(&mut c);
        let err = c.validate().unwrap_err();
        let problem = err.problem().unwrap().clone();
        (problem, err.to_string())
    }

    #[test]
    fn validation_failures() {
        type Edit = Box<dyn FnOnce(&mut Config)>;
        let cases: Vec<(Edit, &str)> = vec![
            (
                Box::new(|c| c.nodes.clear()),
                "cluster config: no nodes configured; add at least one [[nodes]] table with id and addr",
            ),
            (
                Box::new(|c| c.nodes[2].id = 1),
                "cluster config: duplicate node id 1",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "127.0.0.1:5000".into()),
                "cluster config: nodes 0 and 2 have the same addr \"127.0.0.1:5000\"",
            ),
            (
                Box::new(|c| {
                    c.nodes[0].addr = "[::1]:5000".into();
                    c.nodes[1].addr = "[0:0::1]:5000".into();
                }),
                "cluster config: nodes 0 and 1 have the same addr \"[0:0::1]:5000\"",
            ),
            (
                Box::new(|c| {
                    c.nodes[0].addr = "db1.example:5000".into();
                    c.nodes[1].addr = "DB1.Example:5000".into();
                }),
                "cluster config: nodes 0 and 1 have the same addr \"DB1.Example:5000\"",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "127.0.0.1".into()),
                "cluster config: node 2: addr \"127.0.0.1\" must be host:port",
            ),
            (
                Box::new(|c| c.nodes[2].addr = ":5000".into()),
                "cluster config: node 2: addr \":5000\" must be host:port (the host is empty)",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "host:0".into()),
                "cluster config: node 2: addr \"host:0\" has invalid port \"0\" (expected 1-65535)",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "host:65536".into()),
                "cluster config: node 2: addr \"host:65536\" has invalid port \"65536\" (expected 1-65535)",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "host:+80".into()),
                "cluster config: node 2: addr \"host:+80\" has invalid port \"+80\" (expected 1-65535)",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "host:".into()),
                "cluster config: node 2: addr \"host:\" has invalid port \"\" (expected 1-65535)",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "127.0.0.256:5000".into()),
                "cluster config: node 2: addr \"127.0.0.256:5000\" has invalid host \"127.0.0.256\"",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "my host:5000".into()),
                "cluster config: node 2: addr \"my host:5000\" has invalid host \"my host\"",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "-bad.example:5000".into()),
                "cluster config: node 2: addr \"-bad.example:5000\" has invalid host \"-bad.example\"",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "a..b:5000".into()),
                "cluster config: node 2: addr \"a..b:5000\" has invalid host \"a..b\"",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "::1:5000".into()),
                "cluster config: node 2: addr \"::1:5000\" looks like an IPv6 address without brackets; write [address]:port",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "[::g]:5000".into()),
                "cluster config: node 2: addr \"[::g]:5000\" has invalid IPv6 address \"::g\"",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "[::1]5000".into()),
                "cluster config: node 2: addr \"[::1]5000\" must be host:port",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "[::1:5000".into()),
                "cluster config: node 2: addr \"[::1:5000\" must be host:port",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "http://h:5000".into()),
                "cluster config: node 2: addr \"http://h:5000\" must be host:port, without a scheme like http://",
            ),
            (
                Box::new(|c| c.nodes[2].addr = "a:b:5000".into()),
                "cluster config: node 2: addr \"a:b:5000\" must be host:port",
            ),
            (
                Box::new(|c| c.cluster_name = " ".into()),
                "cluster config: cluster_name must not be empty",
            ),
            (
                Box::new(|c| c.shards = 0),
                "cluster config: shards = 0 is out of range; it must be 1..=1024 (and cannot change after the cluster is created)",
            ),
            (
                Box::new(|c| c.shards = 1025),
                "cluster config: shards = 1025 is out of range; it must be 1..=1024 (and cannot change after the cluster is created)",
            ),
            (
                Box::new(|c| c.replication_factor = 0),
                "cluster config: replication_factor = 0 is out of range; it must be 1..=7",
            ),
            (
                Box::new(|c| {
                    c.nodes = (0..8)
                        .map(|i| NodeConfig::new(i, format!("n{i}:1")))
                        .collect();
                    c.replication_factor = 8;
                }),
                "cluster config: replication_factor = 8 is out of range; it must be 1..=7",
            ),
            (
                Box::new(|c| c.replication_factor = 4),
                "cluster config: replication_factor = 4 but only 3 node(s) are configured; set it to at most 3 or add nodes",
            ),
            (
                Box::new(|c| c.heartbeat_interval_ms = 0),
                "cluster config: heartbeat_interval_ms must be at least 1",
            ),
            (
                Box::new(|c| c.request_timeout_ms = 0),
                "cluster config: request_timeout_ms must be at least 1",
            ),
            (
                Box::new(|c| c.snapshot_logs = 0),
                "cluster config: snapshot_logs must be at least 1",
            ),
            (
                Box::new(|c| c.raft_heartbeat_ms = 0),
                "cluster config: raft_heartbeat_ms must be at least 1",
            ),
            (
                Box::new(|c| c.failure_timeout_ms = 500),
                "cluster config: failure_timeout_ms (500) must be greater than heartbeat_interval_ms (500); several heartbeats is typical",
            ),
            (
                Box::new(|c| c.election_timeout_ms = 200),
                "cluster config: election_timeout_ms (200) must be greater than 2 * raft_heartbeat_ms (100)",
            ),
        ];
        for (edit, want) in cases {
            let mut c = base();
            edit(&mut c);
            assert_eq!(
                c.validate().map_err(|e| e.to_string()),
                Err(want.to_string())
            );
        }
    }

    #[test]
    fn validation_returns_structured_problems() {
        assert_eq!(invalid(|c| c.nodes[1].id = 0).0, Problem::DuplicateId(0));
        assert_eq!(
            invalid(|c| c.replication_factor = 5).0,
            Problem::ReplicationExceedsNodes { rf: 5, nodes: 3 }
        );
        let (p, line) = invalid(|c| c.nodes[0].addr = "nohost".into());
        assert!(matches!(p, Problem::BadAddr { id: 0, .. }), "{p:?}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn accepted_addresses() {
        for addr in [
            "127.0.0.1:5000",
            "0.0.0.0:1",
            "localhost:65535",
            "db-1.example.com:5000",
            "db-1.example.com.:5000",
            "my_host:5000",
            "[::1]:5000",
            "[2001:db8::7]:443",
        ] {
            assert!(check_addr(addr).is_ok(), "{addr} should be accepted");
        }
    }

    #[test]
    fn boundary_values_are_accepted() {
        let mut c = base();
        c.shards = 1;
        c.replication_factor = 1;
        c.failure_timeout_ms = c.heartbeat_interval_ms + 1;
        c.election_timeout_ms = 2 * c.raft_heartbeat_ms + 1;
        assert!(c.validate().is_ok());
        c.shards = MAX_SHARDS;
        c.nodes = (0..7)
            .map(|i| NodeConfig::new(i, format!("n{i}:1")))
            .collect();
        c.replication_factor = MAX_REPLICATION_FACTOR;
        assert!(c.validate().is_ok());
        // rf 1 of 3 nodes is legal but warned about; so is a short deadline.
        c.replication_factor = 1;
        c.request_timeout_ms = 100;
        assert_eq!(c.warnings().len(), 2, "{:?}", c.warnings());
    }

    /// The interface doc's minimal file: one node and nothing else. It parses,
    /// but the default replication_factor (3) needs three nodes, so it is
    /// rejected with a message saying exactly what to change.
    #[test]
    fn single_node_cluster_needs_rf_1() {
        let err = Config::parse(MINIMAL_SINGLE).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cluster config: replication_factor = 3 but only 1 node(s) are configured; set it to at most 1 or add nodes"
        );
        let ok = format!("replication_factor = 1\n{MINIMAL_SINGLE}");
        assert_eq!(Config::parse(&ok).unwrap().replication_factor, 1);
    }

    const MINIMAL_SINGLE: &str = "[[nodes]]\nid = 0\naddr = \"127.0.0.1:5000\"\n";

    fn parse_err(text: &str) -> String {
        let msg = Config::parse(text).unwrap_err().to_string();
        assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
        msg
    }

    const NODES: &str = "[[nodes]]\nid = 0\naddr = \"a:1\"\n";

    #[test]
    fn unknown_top_level_key() {
        let text = format!("replication_factor = 1\nshard = 16\n{NODES}");
        assert_eq!(
            parse_err(&text),
            "cluster config: unknown key \"shard\" (line 2); did you mean \"shards\"?"
        );
        let text = format!("replication_factor = 1\n\nbogus = 1\n{NODES}");
        assert_eq!(
            parse_err(&text),
            "cluster config: unknown key \"bogus\" (line 3)"
        );
    }

    #[test]
    fn unknown_node_key() {
        let text = format!("replication_factor = 1\n{NODES}port = 5000\n");
        assert_eq!(
            parse_err(&text),
            "cluster config: unknown key \"port\" (line 5)"
        );
        let text = "replication_factor = 1\n[[nodes]]\nid = 0\nadr = \"a:1\"\n";
        let err = Config::parse(text).unwrap_err();
        assert!(
            matches!(&err, ConfigError::UnknownKey { key, line: Some(4), hint: Some(h), .. }
            if key == "adr" && h == "addr"),
            "{err:?}"
        );
    }

    #[test]
    fn missing_keys() {
        assert_eq!(
            parse_err("shards = 4\n"),
            "cluster config: no [[nodes]] tables; at least one [[nodes]] with id and addr is required"
        );
        assert_eq!(
            parse_err(""),
            "cluster config: no [[nodes]] tables; at least one [[nodes]] with id and addr is required"
        );
        assert_eq!(
            parse_err("replication_factor = 1\n[[nodes]]\nid = 0\n"),
            "cluster config: the table starting at line 2 is missing required key \"addr\""
        );
        assert_eq!(
            parse_err("nodes = []\n"),
            "cluster config: no nodes configured; add at least one [[nodes]] table with id and addr"
        );
    }

    #[test]
    fn bad_toml_and_bad_types() {
        assert_eq!(
            parse_err("shards = = 3\n"),
            "cluster config: invalid string; expected `\"`, `'` (line 1, column 10)"
        );
        assert_eq!(
            parse_err("shards = 3\n[[nodes]\nid = 0\n"),
            "cluster config: invalid table header; expected `.`, `]]` (line 2, column 8)"
        );
        assert_eq!(
            parse_err(&format!("shards = \"8\"\n{NODES}")),
            "cluster config: invalid type: string \"8\", expected u32 (line 1, column 10)"
        );
        assert_eq!(
            parse_err(&format!("shards = -1\n{NODES}")),
            "cluster config: invalid value: integer `-1`, expected u32 (line 1, column 10)"
        );
        assert_eq!(
            parse_err("shards = 3\nshards = 4\n"),
            "cluster config: duplicate key `shards` in document root (line 2, column 1)"
        );
        assert_eq!(
            parse_err("[nodes]\nid = 0\naddr = \"a:1\"\n"),
            "cluster config: nodes must be an array of tables: write [[nodes]], not [nodes] (line 1, column 1)"
        );
        assert!(matches!(
            Config::parse("x = \"é\" = 1"),
            Err(ConfigError::Syntax { line: Some(1), .. })
        ));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.toml");

        let err = Config::load(&path).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("cannot read {}: No such file or directory", path.display())
        );
        assert!(std::error::Error::source(&err).is_some());

        std::fs::write(&path, format!("shard = 1\n{NODES}")).unwrap();
        assert_eq!(
            Config::load(&path).unwrap_err().to_string(),
            format!(
                "{}: unknown key \"shard\" (line 1); did you mean \"shards\"?",
                path.display()
            )
        );

        let text = SAMPLE.replace("id = 2", "id = 1");
        std::fs::write(&path, text).unwrap();
        assert_eq!(
            load(&path).unwrap_err().to_string(),
            format!("{}: duplicate node id 1", path.display())
        );

        std::fs::write(&path, SAMPLE).unwrap();
        assert_eq!(load(&path).unwrap(), base());
        assert_eq!(parse(SAMPLE).unwrap(), base());
    }

    #[test]
    fn helpers() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("ab", 99), (1, 3));
        assert_eq!(line_col("é\nx", 1), (1, 2)); // not a char boundary
        assert_eq!(edit_distance("shard", "shards"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        let e = io::Error::from_raw_os_error(13);
        assert_eq!(io_message(&e), "Permission denied");
        let e = io::Error::other("custom");
        assert_eq!(io_message(&e), "custom");
    }

    #[test]
    fn node_ids_sorted_and_lookup() {
        let c = Config::with_nodes(vec![
            NodeConfig::new(9, "c:1"),
            NodeConfig::new(2, "a:1"),
            NodeConfig::new(5, "b:1"),
        ]);
        assert_eq!(c.node_ids(), vec![2, 5, 9]);
        assert_eq!(c.node(5), Some(&NodeConfig::new(5, "b:1")));
        assert_eq!(c.node(6), None);
    }
}
