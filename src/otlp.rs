//! Logging set-up for the binary, and the optional OpenTelemetry exporter.
//!
//! [`init`] installs the stderr log (filtered by `RUST_LOG`, INFO by
//! default). Built with `--features otlp`, it also exports spans over OTLP
//! (gRPC) when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (e.g.
//! `http://127.0.0.1:4317`), filtered by `LEASEHOLD_OTLP_FILTER`
//! (`leasehold=debug` by default, so the per-call spans are exported: they
//! cost a few microseconds each when enabled). The `rpc` span of each call
//! is then a child of the caller's span ([`set_remote_parent`], from the
//! `traceparent` the worker library sends), so a trace shows the worker's
//! acquire and the coordinator's handling of it as one tree.
//!
//! Without the feature the exporter and its dependencies are not built,
//! and [`set_remote_parent`] does nothing.

use leasehold_fence::trace::TraceParent;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes the exporter when dropped (keep it until the process ends).
#[must_use = "dropping it flushes and stops the span exporter"]
pub struct Guard {
    #[cfg(feature = "otlp")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        #[cfg(feature = "otlp")]
        if let Some(p) = self.provider.take() {
            if let Err(e) = p.shutdown() {
                eprintln!("leasehold: flushing the OTLP exporter failed: {e}");
            }
        }
    }
}

/// Installs the global subscriber: logs to stderr, and spans to OTLP when
/// built with `otlp` and `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
pub fn init() -> Guard {
    let log = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    #[allow(unused_mut)]
    let mut layers: Vec<BoxedLayer> = vec![log.boxed()];
    #[cfg(feature = "otlp")]
    let provider = match exporter() {
        Ok(Some((layer, provider))) => {
            layers.push(layer);
            Some(provider)
        }
        Ok(None) => None,
        Err(e) => {
            eprintln!(
                "leasehold: the OTLP exporter could not be set up, spans are not exported: {e}"
            );
            None
        }
    };
    tracing_subscriber::registry().with(layers).init();
    Guard {
        #[cfg(feature = "otlp")]
        provider,
    }
}

type BoxedLayer = Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync>;

#[cfg(feature = "otlp")]
fn exporter() -> Result<
    Option<(BoxedLayer, opentelemetry_sdk::trace::SdkTracerProvider)>,
    Box<dyn std::error::Error>,
> {
    use opentelemetry::trace::TracerProvider as _;
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_none() {
        return Ok(None);
    }
    // The endpoint and headers come from the standard OTEL_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("leasehold")
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("leasehold");
    let filter =
        std::env::var("LEASEHOLD_OTLP_FILTER").unwrap_or_else(|_| "leasehold=debug".into());
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(EnvFilter::try_new(filter)?);
    Ok(Some((Box::new(layer), provider)))
}

/// Makes `span` a child of the caller's span `tp` in OpenTelemetry (with
/// the `otlp` feature; a no-op without it).
pub fn set_remote_parent(span: &tracing::Span, tp: &TraceParent) {
    #[cfg(feature = "otlp")]
    {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
        };
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        let remote = SpanContext::new(
            TraceId::from_bytes(tp.trace_id),
            SpanId::from_bytes(tp.parent_id),
            TraceFlags::new(tp.flags),
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    #[cfg(not(feature = "otlp"))]
    let _ = (span, tp);
}
