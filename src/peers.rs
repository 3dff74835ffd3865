//! Connections to the other nodes: one lazily-connected HTTP/2 channel per peer, shared by every
//! shard's Raft traffic, heartbeats, recovery streams and forwarded client requests (the Raft
//! messages and the forwarded requests each on one long-lived stream, see [`crate::mux`]).

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::client::Session;
use crate::config::Config;
use crate::pb::cluster_client::ClusterClient;
use crate::raft::pipe::RaftPipe;
use crate::raft::NodeId;

/// Largest gRPC message we send or accept: a Raft batch of large values, or a recovery chunk.
pub const MAX_MESSAGE: usize = 256 * 1024 * 1024;

/// HTTP/2 flow-control windows: the 64 KiB default throttles megabyte-sized Raft batches.
pub const STREAM_WINDOW: u32 = 8 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

pub struct Peer {
    pub id: NodeId,
    pub addr: String,
    channel: Channel,
    /// Every shard's Raft messages to this peer, on one stream over `channel`.
    raft: RaftPipe,
    /// Clients' requests this node forwards to this peer, on one stream over `channel`.
    forward: Session,
}

pub struct Peers {
    map: BTreeMap<NodeId, Peer>,
}

/// Builds a lazily-connecting channel to `addr` ("host:port").
pub fn channel(addr: &str, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// A `kv.v1.Cluster` client over `channel`, with the peers' message size limits.
pub fn cluster_client(channel: Channel) -> ClusterClient<Channel> {
    ClusterClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

impl Peers {
    pub fn new(config: &Config, me: NodeId) -> Result<Peers, tonic::transport::Error> {
        let mut map = BTreeMap::new();
        for n in &config.nodes {
            if n.id == me {
                continue;
            }
            let channel = channel(&n.addr, Duration::from_millis(500))?;
            map.insert(
                n.id,
                Peer {
                    id: n.id,
                    addr: n.addr.clone(),
                    raft: RaftPipe::new(n.id, channel.clone()),
                    forward: Session::forwarding(n.id, channel.clone()),
                    channel,
                },
            );
        }
        Ok(Peers { map })
    }

    pub fn cluster(&self, id: NodeId) -> Option<ClusterClient<Channel>> {
        self.map.get(&id).map(|p| cluster_client(p.channel.clone()))
    }

    pub fn raft(&self, id: NodeId) -> Option<&RaftPipe> {
        self.map.get(&id).map(|p| &p.raft)
    }

    /// The session on which clients' requests are forwarded to `id`.
    pub fn forward(&self, id: NodeId) -> Option<&Session> {
        self.map.get(&id).map(|p| &p.forward)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Peer> {
        self.map.values()
    }

    pub fn addr(&self, id: NodeId) -> Option<&str> {
        self.map.get(&id).map(|p| p.addr.as_str())
    }
}
