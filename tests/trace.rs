//! The trace id a worker's acquire carries is the one the coordinator's
//! span records. A test binary of its own: it installs a tracing
//! subscriber, and tracing's interest cache is process-wide, so tests
//! running beside it in one process could turn its DEBUG spans off.

#[path = "it/observe_support.rs"]
mod observe_support;

use std::sync::Arc;
use std::time::Duration;

use leasehold::server::ServerConfig;
use leasehold_client::TraceParent;
use parking_lot::Mutex;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

use observe_support::Observed;

/// Collects the `trace_id` field of every span, by span name.
#[derive(Clone, Default)]
struct TraceIds(Arc<Mutex<Vec<(String, String)>>>);

struct Find<'a>(&'a mut Option<String>);

impl Visit for Find<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "trace_id" {
            *self.0 = Some(format!("{value:?}").trim_matches('"').to_owned());
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "trace_id" {
            *self.0 = Some(value.to_owned());
        }
    }
}

impl<S> Layer<S> for TraceIds
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, _: &Id, _: Context<'_, S>) {
        let mut found = None;
        attrs.record(&mut Find(&mut found));
        if let Some(t) = found {
            self.0.lock().push((attrs.metadata().name().to_owned(), t));
        }
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let mut found = None;
        values.record(&mut Find(&mut found));
        if let (Some(t), Some(span)) = (found, ctx.span(id)) {
            self.0.lock().push((span.name().to_owned(), t));
        }
    }
}

impl TraceIds {
    fn of(&self, name: &str) -> Vec<String> {
        self.0
            .lock()
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .collect()
    }
}

/// The worker's `leasehold.acquire` span and the coordinator's `rpc` span
/// for that Acquire record the same trace id: the one the worker was given,
/// or a fresh one the library drew.
#[tokio::test(flavor = "current_thread")]
async fn the_trace_id_a_client_sends_is_the_one_the_server_records() {
    let ids = TraceIds::default();
    let subscriber = tracing_subscriber::registry().with(ids.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let s = Observed::start(ServerConfig::default()).await;
    let client = leasehold_client::Client::connect(s.url()).unwrap();

    let given =
        TraceParent::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
    let lease = client
        .acquire("traced")
        .ttl(Duration::from_secs(10))
        .trace_parent(given)
        .await
        .unwrap();
    let want = "0af7651916cd43dd8448eb211c80319c".to_owned();
    assert_eq!(ids.of("leasehold.acquire"), vec![want.clone()]);
    assert_eq!(
        ids.of("rpc"),
        vec![want],
        "the server's span for the Acquire"
    );
    lease.release().await.unwrap();

    // Without a trace of its own, the library starts one; both sides agree.
    ids.0.lock().clear();
    let lease = client
        .acquire("traced-2")
        .ttl(Duration::from_secs(10))
        .await
        .unwrap();
    let client_ids = ids.of("leasehold.acquire");
    assert_eq!(client_ids.len(), 1);
    assert_eq!(client_ids[0].len(), 32);
    assert_ne!(client_ids[0], "0af7651916cd43dd8448eb211c80319c");
    assert_eq!(ids.of("rpc").first(), client_ids.first());
    lease.release().await.unwrap();
}
