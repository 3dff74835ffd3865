//! Raft messages to one peer on one long-lived gRPC stream (`kv.v1.Cluster/RaftStream`).
//!
//! A unary call per message costs an HTTP/2 stream each way: headers to encode and parse, a
//! task per request on the peer, and two or three socket writes. Under load that, not the
//! consensus work, was most of a write's CPU: with 64 clients writing, 8 shards on 3 nodes, the
//! box made 6 socket writes per client write. On a pipe, a message is one DATA frame of a stream
//! that stays open, and messages of several shards that leave together share one socket write.
//!
//! The calls on the stream are [`crate::mux`]'s: each carries an id its reply echoes, so a shard
//! whose follower is waiting for an fsync holds up nobody else's messages, and a broken stream
//! is reopened by the next call. Messages over [`MAX_PIPED`] bytes take a unary call of their
//! own: one long message on the shared stream would hold up every shard's heartbeats behind it.

use std::time::Duration;

use futures::FutureExt;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::mux::Mux;
use crate::pb::{RaftReply, RaftRequest, RaftStreamReply};
use crate::peers::cluster_client;
use crate::raft::NodeId;

/// Larger messages go as unary calls (see the module docs).
pub const MAX_PIPED: usize = 256 * 1024;

/// The pipe to one peer. Cheap to share: every shard's network uses the same one.
pub struct RaftPipe {
    target: NodeId,
    channel: Channel,
    mux: Mux<RaftRequest, RaftStreamReply>,
}

impl RaftPipe {
    pub fn new(target: NodeId, channel: Channel) -> RaftPipe {
        let ch = channel.clone();
        let mux = Mux::new(
            format!("the raft stream to node {target}"),
            format!("node {target}"),
            Box::new(move |requests| {
                let mut client = cluster_client(ch.clone());
                async move { Ok(client.raft_stream(requests).await?.into_inner()) }.boxed()
            }),
        );
        RaftPipe {
            target,
            channel,
            mux,
        }
    }

    /// Sends `req` and waits at most `timeout` for the peer's reply.
    pub async fn call(&self, req: RaftRequest, timeout: Duration) -> Result<RaftReply, Status> {
        if req.payload.len() > MAX_PIPED {
            let mut request = tonic::Request::new(req);
            request.set_timeout(timeout);
            return cluster_client(self.channel.clone())
                .raft(request)
                .await
                .map(|r| r.into_inner());
        }
        into_result(self.target, self.mux.call(req, timeout).await?)
    }
}

/// A stream reply as the unary call's result.
fn into_result(target: NodeId, r: RaftStreamReply) -> Result<RaftReply, Status> {
    if r.code != 0 {
        return Err(Status::new(Code::from_i32(r.code), r.message));
    }
    r.reply
        .ok_or_else(|| Status::internal(format!("node {target} sent an empty raft reply")))
}

/// The stream form of a unary call's outcome (the serving side of `RaftStream`).
pub fn reply_for(id: u64, outcome: Result<RaftReply, Status>) -> RaftStreamReply {
    match outcome {
        Ok(reply) => RaftStreamReply {
            id,
            reply: Some(reply),
            code: 0,
            message: String::new(),
        },
        Err(s) => RaftStreamReply {
            id,
            reply: None,
            // A status can never be Ok here; map one defensively to a failure.
            code: match s.code() {
                Code::Ok => Code::Unknown as i32,
                c => c as i32,
            },
            message: s.message().to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_keeps_the_unary_outcome() {
        let ok = RaftReply {
            payload: vec![1, 2, 3],
            error: String::new(),
        };
        let r = into_result(2, reply_for(7, Ok(ok.clone()))).expect("ok");
        assert_eq!(r, ok);
        let e = into_result(2, reply_for(8, Err(Status::not_found("no shard 9")))).unwrap_err();
        assert_eq!(e.code(), Code::NotFound);
        assert_eq!(e.message(), "no shard 9");
        // A reply with neither a reply nor a code is refused, not taken as an empty payload.
        let empty = RaftStreamReply {
            id: 9,
            reply: None,
            code: 0,
            message: String::new(),
        };
        assert_eq!(into_result(2, empty).unwrap_err().code(), Code::Internal);
    }
}
