//! Trace context in: every gRPC call runs inside an `rpc` span that carries
//! the caller's W3C trace id, so the coordinator's spans for a worker's
//! acquire share the worker's trace id.
//!
//! [`TraceLayer`] wraps the whole gRPC server. For each request it opens a
//! DEBUG-level span `rpc{path, trace_id, parent_id}` from the `traceparent`
//! header ([`leasehold_fence::trace`]) and runs the call inside it; the
//! handlers' own spans (`Acquire{resource, holder, token}`, …) are its
//! children. At the default INFO filter the span is disabled: the header is
//! not even read, and the layer costs one check of a cached flag per call.
//! A missing or malformed header leaves `trace_id` empty; it never fails a
//! call.
//!
//! With the `otlp` feature the span is also made a child of the caller's
//! span in OpenTelemetry (see [`crate::otlp`]), so an exported trace shows
//! the worker's acquire and the coordinator's handling as one tree.

use std::task::{Context, Poll};

use leasehold_fence::trace::{TraceParent, TRACEPARENT};
use tracing::instrument::Instrumented;
use tracing::{field, Instrument};

/// Opens the `rpc` span of each call; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl<S> tower::Layer<S> for TraceLayer {
    type Service = TraceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceService { inner }
    }
}

/// The service [`TraceLayer`] wraps around the server.
#[derive(Debug, Clone)]
pub struct TraceService<S> {
    inner: S,
}

/// The trace context of a request's headers, if valid.
pub fn trace_parent(headers: &http::HeaderMap) -> Option<TraceParent> {
    let value = headers.get(TRACEPARENT)?.to_str().ok()?;
    TraceParent::parse(value).ok()
}

impl<S, B> tower::Service<http::Request<B>> for TraceService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let span = tracing::debug_span!(
            "rpc",
            path = field::Empty,
            trace_id = field::Empty,
            parent_id = field::Empty
        );
        if !span.is_disabled() {
            span.record("path", req.uri().path());
            if let Some(tp) = trace_parent(req.headers()) {
                span.record("trace_id", tp.trace_id_hex().as_str());
                span.record("parent_id", tp.parent_id_hex().as_str());
                crate::otlp::set_remote_parent(&span, &tp);
            }
        }
        self.inner.call(req).instrument(span)
    }
}
