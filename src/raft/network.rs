//! The Raft RPCs over tonic: [`Network`] (openraft's client side, one
//! lazily connected channel per peer address) and [`RaftApi`] (the
//! `RaftService` a node serves on its one port).
//!
//! Each message is the JSON of openraft's own request (a snapshot chunk's
//! bytes travel raw beside it), and the answer the JSON of openraft's
//! `Result`: a refusal by the remote Raft (a higher
//! vote, say) arrives as `RemoteError`, a transport failure as a
//! `NetworkError`, which openraft retries on its next heartbeat.
//!
//! AppendEntries, heartbeats included, goes over one long-lived
//! `Replicate` stream per leader and follower rather than a call each: a
//! unary call costs a HEADERS frame, the message and a separate empty
//! END_STREAM frame, each its own write and wake-up on both sides, and the
//! follower can only start once the last has arrived. On the stream a
//! message is one DATA frame. openraft sends one AppendEntries at a time
//! per follower, so the answers come back in order; a stream that fails or
//! times out is dropped and the next call opens a new one. A peer that
//! does not know `Replicate` (an older version) is called unary.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
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
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Response, Status, Streaming};

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
    /// The open `Replicate` stream, if any.
    stream: Option<Replication>,
    /// The peer answered `Replicate` with UNIMPLEMENTED: call it unary.
    unary: bool,
}

/// One `Replicate` stream: requests in, answers out, in order.
struct Replication {
    requests: mpsc::Sender<RaftMessage>,
    answers: Streaming<RaftMessage>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            stream: None,
            unary: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failed(String);

type PeerError<E> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

impl Peer {
    /// A transport failure talking to this peer.
    fn failed<E: std::error::Error>(&self, e: &dyn std::fmt::Display) -> PeerError<E> {
        RPCError::Network(NetworkError::new(&Failed(format!(
            "node {} at {}: {e}",
            self.target, self.addr
        ))))
    }

    /// The error for a call that ended with `status`.
    fn status_error<E: std::error::Error>(&self, status: Status) -> PeerError<E> {
        // The transport found nobody there (the RaftService itself never
        // answers UNAVAILABLE): openraft then waits `backoff()` before
        // trying again, instead of retrying at once in a loop that kept a
        // leader 75 % busy while a follower was down.
        if status.code() == tonic::Code::Unavailable {
            return RPCError::Unreachable(Unreachable::new(&Failed(format!(
                "node {} at {}: {status}",
                self.target, self.addr
            ))));
        }
        self.failed(&status)
    }

    fn client(&self) -> Result<RaftServiceClient<Channel>, tonic::transport::Error> {
        Ok(RaftServiceClient::new(self.channels.get(&self.addr)?)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// The remote Raft's answer, decoded.
    // The error is openraft's, as `RaftNetwork` returns it.
    #[allow(clippy::result_large_err)]
    fn answer<A, E>(&self, reply: &RaftMessage) -> Result<A, PeerError<E>>
    where
        A: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let answer: Result<A, RaftError<NodeId, E>> =
            serde_json::from_slice(&reply.data).map_err(|e| self.failed(&e))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    async fn call<Q, A, E>(
        &self,
        which: u8,
        rpc: &Q,
        blob: Vec<u8>,
        timeout: Duration,
    ) -> Result<A, PeerError<E>>
    where
        Q: Serialize,
        A: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let data = serde_json::to_vec(rpc).map_err(|e| self.failed(&e))?;
        let mut client = self.client().map_err(|e| self.failed(&e))?;
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
            Err(_) => return Err(self.failed(&"timed out")),
            Ok(Err(status)) => return Err(self.status_error(status)),
            Ok(Ok(reply)) => reply.into_inner(),
        };
        self.answer(&reply)
    }

    /// Sends `message` on the `Replicate` stream (opened first if none is)
    /// and waits for its answer. `Ok(None)`: the peer does not know
    /// `Replicate`.
    async fn exchange(
        &mut self,
        message: RaftMessage,
    ) -> Result<Option<RaftMessage>, PeerError<openraft::error::Infallible>> {
        let stream = match &mut self.stream {
            Some(stream) => {
                if stream.requests.send(message).await.is_err() {
                    return Err(self.failed(&"the replication stream closed"));
                }
                stream
            }
            None => {
                // Queued before the stream opens: it leaves with the headers.
                let (requests, queue) = mpsc::channel(1);
                let _ = requests.send(message).await;
                let mut client = self.client().map_err(|e| self.failed(&e))?;
                let queue = tokio_stream::wrappers::ReceiverStream::new(queue);
                let answers = match client.replicate(queue).await {
                    Ok(answers) => answers.into_inner(),
                    Err(status) if status.code() == tonic::Code::Unimplemented => return Ok(None),
                    Err(status) => return Err(self.status_error(status)),
                };
                self.stream.insert(Replication { requests, answers })
            }
        };
        match stream.answers.message().await {
            Ok(Some(reply)) => Ok(Some(reply)),
            Ok(None) => Err(self.failed(&"the replication stream ended")),
            Err(status) => Err(self.status_error(status)),
        }
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
        let timeout = option.hard_ttl();
        if self.unary {
            return self.call(0, &rpc, Vec::new(), timeout).await;
        }
        let data = serde_json::to_vec(&rpc).map_err(|e| self.failed(&e))?;
        let message = RaftMessage {
            data,
            blob: Vec::new(),
        };
        match tokio::time::timeout(timeout, self.exchange(message)).await {
            Ok(Ok(Some(reply))) => self.answer(&reply),
            Ok(Ok(None)) => {
                self.unary = true;
                self.call(0, &rpc, Vec::new(), timeout).await
            }
            // An answer still owed would be taken for the next request's:
            // the stream goes, and the next call opens a new one.
            Ok(Err(e)) => {
                self.stream = None;
                Err(e)
            }
            Err(_) => {
                self.stream = None;
                Err(self.failed(&"timed out"))
            }
        }
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
    /// Ends the `Replicate` streams, which would otherwise hold a graceful
    /// shutdown open for as long as the leader keeps them.
    stopping: CancellationToken,
}

impl RaftApi {
    /// Serves `raft` until `stopping`.
    pub fn new(raft: Raft, stopping: CancellationToken) -> Self {
        RaftApi { raft, stopping }
    }
}

fn decode<T: DeserializeOwned>(request: Request<RaftMessage>) -> Result<T, Status> {
    parse(&request.into_inner().data)
}

fn parse<T: DeserializeOwned>(data: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(data)
        .map_err(|e| Status::invalid_argument(format!("not an openraft message: {e}")))
}

fn encode<T: Serialize>(answer: &T) -> Result<RaftMessage, Status> {
    serde_json::to_vec(answer)
        .map(|data| RaftMessage {
            data,
            blob: Vec::new(),
        })
        .map_err(|e| Status::internal(format!("encoding the answer failed: {e}")))
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    type ReplicateStream =
        std::pin::Pin<Box<dyn Stream<Item = Result<RaftMessage, Status>> + Send + 'static>>;

    /// Answers each AppendEntries of the stream in turn.
    async fn replicate(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let raft = self.raft.clone();
        let stopping = self.stopping.clone();
        let answers = request
            .into_inner()
            .then(move |message| {
                let raft = raft.clone();
                async move {
                    let rpc: AppendEntriesRequest<TypeConfig> = parse(&message?.data)?;
                    encode(&raft.append_entries(rpc).await)
                }
            })
            .take_until(async move { stopping.cancelled().await });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn append_entries(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> = decode(request)?;
        encode(&self.raft.append_entries(rpc).await).map(Response::new)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let rpc: VoteRequest<NodeId> = decode(request)?;
        encode(&self.raft.vote(rpc).await).map(Response::new)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let message = request.into_inner();
        let mut rpc: InstallSnapshotRequest<TypeConfig> = parse(&message.data)?;
        rpc.data = message.blob;
        encode(&self.raft.install_snapshot(rpc).await).map(Response::new)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use openraft::Vote;

    use super::*;
    use crate::proto::raft_service_server::RaftServiceServer;

    /// A peer that answers every AppendEntries `Success` and counts what it
    /// saw; `streams: false` plays a node from before `Replicate`.
    #[derive(Clone, Default)]
    struct Counting {
        streams: bool,
        opened: Arc<AtomicUsize>,
        streamed: Arc<AtomicUsize>,
        unary: Arc<AtomicUsize>,
    }

    fn success() -> Result<RaftMessage, Status> {
        encode(&Ok::<_, RaftError<NodeId>>(
            AppendEntriesResponse::<NodeId>::Success,
        ))
    }

    #[tonic::async_trait]
    impl RaftService for Counting {
        type ReplicateStream = <RaftApi as RaftService>::ReplicateStream;

        async fn replicate(
            &self,
            request: Request<Streaming<RaftMessage>>,
        ) -> Result<Response<Self::ReplicateStream>, Status> {
            if !self.streams {
                return Err(Status::unimplemented("no Replicate here"));
            }
            self.opened.fetch_add(1, Ordering::SeqCst);
            let streamed = self.streamed.clone();
            let answers = request.into_inner().map(move |message| {
                message?;
                streamed.fetch_add(1, Ordering::SeqCst);
                success()
            });
            Ok(Response::new(Box::pin(answers)))
        }

        async fn append_entries(
            &self,
            _: Request<RaftMessage>,
        ) -> Result<Response<RaftMessage>, Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            success().map(Response::new)
        }

        async fn vote(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        async fn install_snapshot(
            &self,
            _: Request<RaftMessage>,
        ) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not in this test"))
        }
    }

    /// Serves `peer` on 127.0.0.1:0; a `Peer` that calls it.
    async fn serve(peer: Counting) -> Peer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = format!("http://{}", listener.local_addr().expect("addr"));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftServiceServer::new(peer))
                .serve_with_incoming(incoming),
        );
        Peer {
            target: 2,
            addr,
            channels: Channels::default(),
            stream: None,
            unary: false,
        }
    }

    async fn heartbeat(peer: &mut Peer) -> AppendEntriesResponse<NodeId> {
        let rpc = AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        let option = RPCOption::new(Duration::from_secs(5));
        peer.append_entries(rpc, option).await.expect("answered")
    }

    /// Successive AppendEntries share one `Replicate` stream; once it is
    /// gone (here: dropped, as after a timeout) the next call opens another.
    #[tokio::test]
    async fn append_entries_share_one_stream_and_reopen_it() {
        let counts = Counting {
            streams: true,
            ..Counting::default()
        };
        let mut peer = serve(counts.clone()).await;
        for _ in 0..3 {
            assert_eq!(heartbeat(&mut peer).await, AppendEntriesResponse::Success);
        }
        assert_eq!(counts.opened.load(Ordering::SeqCst), 1);
        assert_eq!(counts.streamed.load(Ordering::SeqCst), 3);
        peer.stream = None;
        assert_eq!(heartbeat(&mut peer).await, AppendEntriesResponse::Success);
        assert_eq!(counts.opened.load(Ordering::SeqCst), 2);
        assert_eq!(counts.unary.load(Ordering::SeqCst), 0);
    }

    /// A node of an older version, without `Replicate`, is called unary,
    /// and not asked for the stream again.
    #[tokio::test]
    async fn a_peer_without_replicate_is_called_unary() {
        let counts = Counting::default();
        let mut peer = serve(counts.clone()).await;
        for _ in 0..2 {
            assert_eq!(heartbeat(&mut peer).await, AppendEntriesResponse::Success);
        }
        assert_eq!(counts.unary.load(Ordering::SeqCst), 2);
        assert!(peer.unary);
    }

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
            stream: None,
            unary: false,
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
