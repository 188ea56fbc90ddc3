//! The Raft RPCs over tonic: [`Network`] (openraft's client side, one
//! lazily connected channel per peer address) and [`RaftApi`] (the
//! `RaftService` a node serves on its one port).
//!
//! Each message is the JSON of openraft's own request (a snapshot chunk's
//! bytes travel raw beside it), and the answer the JSON of openraft's
//! `Result`: a refusal by the remote Raft (a higher
//! vote, say) arrives as `RemoteError`, a transport failure as a
//! `NetworkError`, which openraft retries on its next heartbeat.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status};

use super::{NodeId, Raft, TypeConfig};
use crate::proto::raft_service_client::RaftServiceClient;
use crate::proto::raft_service_server::RaftService;
use crate::proto::RaftMessage;

/// Channels to peers, by address; shared by every client openraft makes.
#[derive(Clone, Default)]
pub struct Channels {
    tls: Option<ClientTlsConfig>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Channels {
    /// Channels that use `tls` (for `https://` peers).
    pub fn new(tls: Option<ClientTlsConfig>) -> Self {
        Channels {
            tls,
            channels: Arc::default(),
        }
    }

    /// The channel to `addr` (connected on first use, reconnected by tonic).
    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        if let Some(c) = self.channels.lock().get(addr) {
            return Ok(c.clone());
        }
        let mut endpoint = Endpoint::from_shared(addr.to_owned())?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(tls) = &self.tls {
            if addr.starts_with("https://") {
                endpoint = endpoint.tls_config(tls.clone())?;
            }
        }
        let channel = endpoint.connect_lazy();
        self.channels
            .lock()
            .insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// openraft's network factory.
#[derive(Clone)]
pub struct Network {
    /// The channels.
    pub channels: Channels,
}

/// A connection to one peer.
pub struct Peer {
    target: NodeId,
    addr: String,
    channels: Channels,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

impl Peer {
    async fn call<Q, A, E>(
        &self,
        which: u8,
        rpc: &Q,
        blob: Vec<u8>,
        timeout: Duration,
    ) -> Result<A, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Q: Serialize,
        A: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let net = |e: &dyn std::fmt::Display| {
            RPCError::Network(NetworkError::new(&Failed(format!(
                "node {} at {}: {e}",
                self.target, self.addr
            ))))
        };
        let data = serde_json::to_vec(rpc).map_err(|e| net(&e))?;
        let channel = self.channels.get(&self.addr).map_err(|e| net(&e))?;
        let mut client = RaftServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);
        let mut request = Request::new(RaftMessage { data, blob });
        request.set_timeout(timeout);
        let call = async {
            match which {
                0 => client.append_entries(request).await,
                1 => client.vote(request).await,
                _ => client.install_snapshot(request).await,
            }
        };
        let reply = match tokio::time::timeout(timeout, call).await {
            Err(_) => return Err(net(&"timed out")),
            // The transport found nobody there (the RaftService itself never
            // answers UNAVAILABLE): openraft then waits `backoff()` before
            // trying again, instead of retrying at once in a loop that kept
            // a leader 75 % busy while a follower was down.
            Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&Failed(format!(
                    "node {} at {}: {status}",
                    self.target, self.addr
                )))))
            }
            Ok(Err(status)) => return Err(net(&status)),
            Ok(Ok(reply)) => reply.into_inner(),
        };
        let answer: Result<A, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.data).map_err(|e| net(&e))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    /// After an unreachable peer: 50 ms, doubling up to 500 ms, so a node
    /// that comes back is caught up soon and a dead one costs little.
    fn backoff(&self) -> Backoff {
        Backoff::new(
            (0u32..)
                .map(|i| Duration::from_millis(50u64 << i.min(4)).min(Duration::from_millis(500))),
        )
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        // openraft 0.9 also cuts it off after one heartbeat interval (see
        // `--heartbeat`).
        self.call(0, &rpc, Vec::new(), option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        let mut rpc = rpc;
        let blob = std::mem::take(&mut rpc.data);
        self.call(2, &rpc, blob, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(1, &rpc, Vec::new(), option.hard_ttl()).await
    }
}

/// The `RaftService` a node serves: hands each message to its Raft.
#[derive(Clone)]
pub struct RaftApi {
    raft: Raft,
}

impl RaftApi {
    /// Serves `raft`.
    pub fn new(raft: Raft) -> Self {
        RaftApi { raft }
    }
}

fn decode<T: DeserializeOwned>(request: Request<RaftMessage>) -> Result<T, Status> {
    parse(&request.into_inner().data)
}

fn parse<T: DeserializeOwned>(data: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(data)
        .map_err(|e| Status::invalid_argument(format!("not an openraft message: {e}")))
}

fn encode<T: Serialize>(answer: &T) -> Result<Response<RaftMessage>, Status> {
    serde_json::to_vec(answer)
        .map(|data| {
            Response::new(RaftMessage {
                data,
                blob: Vec::new(),
            })
        })
        .map_err(|e| Status::internal(format!("encoding the answer failed: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = decode(request)?;
        encode(&self.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let message = request.into_inner();
        let mut rpc: InstallSnapshotRequest<TypeConfig> = parse(&message.data)?;
        rpc.data = message.blob;
        encode(&self.raft.install_snapshot(rpc).await)
    }
}

#[cfg(test)]
mod tests {
    use openraft::Vote;

    use super::*;

    /// Nobody listening is `Unreachable`, the one error after which
    /// openraft backs off rather than retrying at once.
    #[tokio::test]
    async fn a_peer_nobody_listens_for_is_unreachable() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = format!("http://{}", closed.local_addr().expect("addr"));
        drop(closed);
        let mut peer = Peer {
            target: 2,
            addr,
            channels: Channels::default(),
        };
        let option = RPCOption::new(Duration::from_secs(2));
        let got = peer
            .vote(VoteRequest::new(Vote::new(1, 1), None), option)
            .await;
        assert!(matches!(got, Err(RPCError::Unreachable(_))), "{got:?}");
        let mut backoff = peer.backoff();
        let first: Vec<Duration> = (0..6).filter_map(|_| backoff.next()).collect();
        let ms: Vec<u128> = first.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [50, 100, 200, 400, 500, 500]);
    }
}
