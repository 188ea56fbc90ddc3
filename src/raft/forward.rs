//! A follower forwards LeaseService and AdminService calls to the leader.
//!
//! [`Forward`] wraps a gRPC service: on the node that decides it calls the
//! service; elsewhere it sends the whole HTTP/2 request (headers, the
//! admin token, streaming bodies) to the leader over the same channels Raft
//! uses, and relays the answer. One hop only: a forwarded request carries
//! `x-leasehold-forwarded`, and a node that receives one without deciding
//! answers UNAVAILABLE instead of forwarding again. With no leader known
//! within the wait, the answer is UNAVAILABLE. Some calls are answered by
//! every node ([`Forward::local`]: ClusterService's Status), or by every
//! node in a given state ([`Forward::local_when`]: PublicKeys once the node
//! holds the cluster's key set).

use std::convert::Infallible;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tonic::Status;
use tower::Service;

use super::node::{Node, Route};

/// Marks a request already forwarded once.
pub const FORWARDED: &str = "x-leasehold-forwarded";

/// How long a call waits for a leader before UNAVAILABLE (covers an
/// election with the default timeouts).
pub const ROUTE_WAIT: Duration = Duration::from_secs(2);

/// A service that runs on the leader (see the module docs).
#[derive(Clone)]
pub struct Forward<S> {
    inner: S,
    node: Node,
    local: &'static [&'static str],
    local_when: &'static [&'static str],
    when: fn(&Node) -> bool,
}

impl<S> Forward<S> {
    /// Wraps `inner` for `node`.
    pub fn new(inner: S, node: Node) -> Self {
        Forward {
            inner,
            node,
            local: &[],
            local_when: &[],
            when: |_| false,
        }
    }

    /// Serves these paths (`/package.Service/Method`) on every node.
    pub fn local(mut self, paths: &'static [&'static str]) -> Self {
        self.local = paths;
        self
    }

    /// Serves these paths on every node for which `when` holds (and
    /// forwards them from the others).
    pub fn local_when(mut self, paths: &'static [&'static str], when: fn(&Node) -> bool) -> Self {
        self.local_when = paths;
        self.when = when;
        self
    }
}

impl<S: NamedService> NamedService for Forward<S> {
    const NAME: &'static str = S::NAME;
}

fn unavailable(msg: String) -> http::Response<Body> {
    Status::unavailable(msg).into_http()
}

impl<S, B> Service<http::Request<Body>> for Forward<S>
where
    S: Service<http::Request<Body>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<Body>) -> Self::Future {
        let mut inner = self.inner.clone();
        let node = self.node.clone();
        let path = req.uri().path();
        if self.local.contains(&path) || (self.local_when.contains(&path) && (self.when)(&node)) {
            return Box::pin(async move { Ok(inner.call(req).await?.map(Body::new)) });
        }
        Box::pin(async move {
            let forwarded = req.headers().contains_key(FORWARDED);
            match node.route(ROUTE_WAIT).await {
                Route::Local => Ok(inner.call(req).await?.map(Body::new)),
                Route::Leader(_) if forwarded => Ok(unavailable(
                    "this node is not the leader and the call was already forwarded once; retry"
                        .into(),
                )),
                Route::Leader(addr) => {
                    let channel = match node.channels().get(&addr) {
                        Ok(c) => c,
                        Err(e) => {
                            return Ok(unavailable(format!(
                                "the leader's address {addr} is unusable: {e}"
                            )))
                        }
                    };
                    req.headers_mut()
                        .insert(FORWARDED, http::HeaderValue::from_static("1"));
                    // The leader's URI: same path, its authority and scheme.
                    let path = req
                        .uri()
                        .path_and_query()
                        .map(|p| p.as_str().to_owned())
                        .unwrap_or_default();
                    if let Ok(uri) = format!("{}{path}", addr.trim_end_matches('/')).parse() {
                        *req.uri_mut() = uri;
                    }
                    let mut channel = channel;
                    let ready = tower::ServiceExt::ready(&mut channel).await.map(|_| ());
                    let answer = match ready {
                        Ok(()) => channel.call(req).await,
                        Err(e) => Err(e),
                    };
                    match answer {
                        Ok(res) => {
                            node.leader_reachable(&addr);
                            Ok(res.map(Body::new))
                        }
                        Err(e) => {
                            // Later calls wait for the next leader rather
                            // than fail against this one again.
                            node.leader_unreachable(&addr);
                            Ok(unavailable(format!(
                                "forwarding to the leader at {addr} failed: {e}; retry"
                            )))
                        }
                    }
                }
                Route::Unknown => Ok(unavailable(format!(
                    "no leader is known after {ROUTE_WAIT:?} (an election is under way, or a majority of the cluster is down); retry"
                ))),
            }
        })
    }
}
