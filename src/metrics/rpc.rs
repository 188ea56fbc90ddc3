//! Per-call figures: how many calls each method answered with each gRPC
//! code, and how long they took.
//!
//! Unary calls are measured by [`RpcLayer`], a tower layer around the whole
//! gRPC server: it starts a clock when the request arrives and stops it when
//! the response's headers are ready, which for a unary gRPC call is when
//! the handler has answered. A refusal travels as a trailers-only response,
//! so its `grpc-status` is in those headers; a success has none there (its
//! status follows in the trailers) and counts as OK.
//!
//! A `Session` stream carries many calls on one HTTP/2 stream, which the
//! layer sees as a single long request; the service's session handler
//! measures each call instead ([`RpcMetrics::record`] with
//! [`Transport::Session`]). Streams themselves (KeepAlive, Session, Watch)
//! are not timed: their length says nothing about the server.
//!
//! Recording costs two clock reads, one atomic add and one lock-free push;
//! the counter for a (method, code) pair is registered the first time the
//! pair occurs (so the exposition lists only codes that happened) and then
//! kept in a `OnceLock`.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use metrics::{Counter, Histogram, Label};
use metrics_exporter_prometheus::PrometheusRecorder;
use tonic::Code;

use super::names;

/// The calls that are measured: every unary method of the two services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `LeaseService/Acquire`.
    Acquire,
    /// `LeaseService/Renew`.
    Renew,
    /// `LeaseService/Release`.
    Release,
    /// `LeaseService/Describe`.
    Describe,
    /// `AdminService/ListLeases`.
    ListLeases,
    /// `AdminService/Revoke`.
    Revoke,
    /// `AdminService/History`.
    History,
    /// `AdminService/Stats`.
    Stats,
}

impl Method {
    /// Every method, in label order.
    pub const ALL: [Method; 8] = [
        Method::Acquire,
        Method::Renew,
        Method::Release,
        Method::Describe,
        Method::ListLeases,
        Method::Revoke,
        Method::History,
        Method::Stats,
    ];

    /// The label value (the RPC's name in the proto).
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Acquire => "Acquire",
            Method::Renew => "Renew",
            Method::Release => "Release",
            Method::Describe => "Describe",
            Method::ListLeases => "ListLeases",
            Method::Revoke => "Revoke",
            Method::History => "History",
            Method::Stats => "Stats",
        }
    }

    /// The method a request path names, if it is a measured one.
    pub fn from_path(path: &str) -> Option<Method> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        let m = match (service, method) {
            ("leasehold.v1.LeaseService", "Acquire") => Method::Acquire,
            ("leasehold.v1.LeaseService", "Renew") => Method::Renew,
            ("leasehold.v1.LeaseService", "Release") => Method::Release,
            ("leasehold.v1.LeaseService", "Describe") => Method::Describe,
            ("leasehold.v1.AdminService", "ListLeases") => Method::ListLeases,
            ("leasehold.v1.AdminService", "Revoke") => Method::Revoke,
            ("leasehold.v1.AdminService", "History") => Method::History,
            ("leasehold.v1.AdminService", "Stats") => Method::Stats,
            _ => return None,
        };
        Some(m)
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// How a call arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Its own HTTP/2 stream.
    Unary,
    /// A message on a `Session` stream.
    Session,
}

impl Transport {
    fn as_str(self) -> &'static str {
        match self {
            Transport::Unary => "unary",
            Transport::Session => "session",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The name gRPC gives a code, as in the spec (`INVALID_ARGUMENT`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

const CODES: usize = 17;
const SLOTS: usize = Method::ALL.len() * 2;

/// The handles per method and transport.
pub struct RpcMetrics {
    recorder: Arc<PrometheusRecorder>,
    durations: Vec<Histogram>,
    calls: Vec<[OnceLock<Counter>; CODES]>,
    held: Counter,
}

impl RpcMetrics {
    pub(super) fn register(recorder: Arc<PrometheusRecorder>) -> Self {
        let mut durations = Vec::with_capacity(SLOTS);
        for t in [Transport::Unary, Transport::Session] {
            for m in Method::ALL {
                durations.push(super::histogram(
                    &recorder,
                    names::RPC_DURATION,
                    labels(m, t),
                ));
            }
        }
        let calls = (0..SLOTS).map(|_| Default::default()).collect();
        let held = super::counter(&recorder, names::HELD, vec![]);
        RpcMetrics {
            recorder,
            durations,
            calls,
            held,
        }
    }

    /// Records one answered call.
    pub fn record(&self, method: Method, transport: Transport, code: Code, took: Duration) {
        let slot = transport.index() * Method::ALL.len() + method.index();
        self.durations[slot].record(took.as_secs_f64());
        let code_index = (code as usize).min(CODES - 1);
        self.calls[slot][code_index]
            .get_or_init(|| {
                let mut l = labels(method, transport);
                l.push(Label::new("code", code_name(code)));
                super::counter(&self.recorder, names::RPC_CALLS, l)
            })
            .increment(1);
    }

    /// Counts an Acquire answered `held`.
    pub fn held(&self) {
        self.held.increment(1);
    }
}

fn labels(m: Method, t: Transport) -> Vec<Label> {
    vec![
        Label::new("method", m.as_str()),
        Label::new("transport", t.as_str()),
    ]
}

/// Measures unary calls; see the module docs.
#[derive(Clone)]
pub struct RpcLayer {
    metrics: Option<Arc<RpcMetrics>>,
}

impl RpcLayer {
    /// A layer recording into `metrics` (nothing when `None`).
    pub fn new(metrics: Option<Arc<RpcMetrics>>) -> Self {
        RpcLayer { metrics }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service [`RpcLayer`] wraps around the server.
#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    metrics: Option<Arc<RpcMetrics>>,
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = RpcFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let measure = self.metrics.as_ref().and_then(|m| {
            let method = Method::from_path(req.uri().path())?;
            Some((m.clone(), method, Instant::now()))
        });
        RpcFuture {
            inner: self.inner.call(req),
            measure,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of [`RpcService`].
    pub struct RpcFuture<F> {
        #[pin]
        inner: F,
        measure: Option<(Arc<RpcMetrics>, Method, Instant)>,
    }
}

impl<F, R, E> std::future::Future for RpcFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<R>, E>>,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Some((metrics, method, started)) = this.measure.take() {
            let code = match &out {
                Ok(res) => res
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or(Code::Ok, Code::from_i32),
                // The transport failed before any answer.
                Err(_) => Code::Unavailable,
            };
            metrics.record(method, Transport::Unary, code, started.elapsed());
        }
        Poll::Ready(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_methods_and_unknown_paths_are_not_measured() {
        let cases = [
            ("/leasehold.v1.LeaseService/Acquire", Some(Method::Acquire)),
            ("/leasehold.v1.LeaseService/Release", Some(Method::Release)),
            ("/leasehold.v1.AdminService/Revoke", Some(Method::Revoke)),
            ("/leasehold.v1.AdminService/Stats", Some(Method::Stats)),
            ("/leasehold.v1.LeaseService/Session", None),
            ("/leasehold.v1.LeaseService/KeepAlive", None),
            ("/leasehold.v1.AdminService/Watch", None),
            ("/grpc.health.v1.Health/Check", None),
            ("/leasehold.v1.LeaseService/Acquire/x", None),
            ("leasehold.v1.LeaseService/Acquire", None),
            ("/", None),
        ];
        for (path, want) in cases {
            assert_eq!(Method::from_path(path), want, "{path}");
        }
    }

    #[test]
    fn every_code_has_its_spec_name() {
        for (i, want) in [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(code_name(Code::from_i32(i as i32)), want);
        }
    }
}
