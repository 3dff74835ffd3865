//! The client library used by `kvctl`, the tests and the benchmark: a list of endpoints tried in
//! turn, a deadline per request, and errors a person can act on.
//!
//! Any node serves any key, so the client only needs *a* live node: it sticks to the last one
//! that answered and moves to the next endpoint when one is unreachable. Reads move on after any
//! failure; a write moves on only when the failed attempt surely did not execute (connection
//! refused, or the node said so): re-sending a write that may have committed could apply it a
//! second time, after a newer write.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Code;

use crate::pb::cluster_client::ClusterClient;
use crate::pb::key_value_client::KeyValueClient;
use crate::pb::{DeleteRequest, GetRequest, PutRequest, StatusReply, StatusRequest};
use crate::peers::{channel, MAX_MESSAGE};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// A write that may or may not have been applied (timed out after it was sent).
    #[error("outcome unknown (the write may or may not have been applied): {0}")]
    Unknown(String),
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {0}: {1}")]
    BadEndpoint(String, String),
}

/// A reply and which node produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served<T> {
    pub value: T,
    /// The node that executed the request (the shard's leader, or the replica for stale reads).
    pub node_id: u64,
    /// The endpoint the client talked to.
    pub endpoint: String,
}

pub struct Client {
    endpoints: Vec<(String, Channel)>,
    timeout: Duration,
    current: AtomicUsize,
}

impl Client {
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Client, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let endpoints = endpoints
            .iter()
            .map(|e| {
                let e = e.trim().trim_start_matches("http://").to_string();
                channel(&e, Duration::from_millis(500))
                    .map(|c| (e.clone(), c))
                    .map_err(|err| ClientError::BadEndpoint(e, err.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Client {
            endpoints,
            timeout,
            current: AtomicUsize::new(0),
        })
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|(e, _)| e.clone()).collect()
    }

    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    /// Runs `f` against endpoints, starting with the last good one, until one answers.
    async fn with_failover<T, F, Fut>(&self, write: bool, f: F) -> Result<Served<T>, ClientError>
    where
        F: Fn(KeyValueClient<Channel>, ClusterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<(T, u64), tonic::Status>>,
    {
        let start = self.current.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..self.endpoints.len() {
            let idx = (start + i) % self.endpoints.len();
            let (endpoint, ch) = &self.endpoints[idx];
            let kv = KeyValueClient::new(ch.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            let cl = ClusterClient::new(ch.clone()).max_decoding_message_size(MAX_MESSAGE);
            match f(kv, cl).await {
                Ok((value, node_id)) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(Served {
                        value,
                        node_id,
                        endpoint: endpoint.clone(),
                    });
                }
                Err(s) if matches!(s.code(), Code::InvalidArgument | Code::ResourceExhausted) => {
                    return Err(ClientError::InvalidArgument(s.message().to_string()))
                }
                Err(s) if write && !crate::router::not_executed(&s) => {
                    return Err(ClientError::Unknown(format!(
                        "{endpoint}: {}",
                        describe(&s)
                    )))
                }
                Err(s) => errors.push(format!("{endpoint}: {}", describe(&s))),
            }
        }
        Err(ClientError::Unavailable(errors.join("; ")))
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<Served<()>, ClientError> {
        self.with_failover(true, |mut kv, _| {
            let req = self.request(PutRequest {
                key: key.to_vec(),
                value: value.to_vec(),
            });
            async move { kv.put(req).await.map(|r| ((), r.into_inner().node_id)) }
        })
        .await
    }

    pub async fn get(
        &self,
        key: &[u8],
        stale: bool,
    ) -> Result<Served<Option<Vec<u8>>>, ClientError> {
        self.with_failover(false, |mut kv, _| {
            let req = self.request(GetRequest {
                key: key.to_vec(),
                stale,
            });
            async move {
                kv.get(req).await.map(|r| {
                    let r = r.into_inner();
                    (r.found.then_some(r.value), r.node_id)
                })
            }
        })
        .await
    }

    /// Returns whether the key existed.
    pub async fn delete(&self, key: &[u8]) -> Result<Served<bool>, ClientError> {
        self.with_failover(true, |mut kv, _| {
            let req = self.request(DeleteRequest { key: key.to_vec() });
            async move {
                kv.delete(req).await.map(|r| {
                    let r = r.into_inner();
                    (r.deleted, r.node_id)
                })
            }
        })
        .await
    }

    /// The view of the first node that answers.
    pub async fn status(&self) -> Result<Served<StatusReply>, ClientError> {
        self.with_failover(false, |_, mut cl| {
            let req = self.request(StatusRequest {});
            async move {
                cl.status(req).await.map(|r| {
                    let r = r.into_inner();
                    let id = r.node_id;
                    (r, id)
                })
            }
        })
        .await
    }
}

fn describe(s: &tonic::Status) -> String {
    match s.code() {
        Code::Unavailable if s.message().contains("transport") || s.message().is_empty() => {
            "unreachable".to_string()
        }
        Code::DeadlineExceeded => "timed out".to_string(),
        _ => s.message().to_string(),
    }
}
