//! What the coordinator counts and measures, in the Prometheus text format.
//!
//! [`Metrics`] owns one `metrics-exporter-prometheus` recorder per server
//! (not the process-wide one, so two servers in one process, as in the
//! tests, never mix their figures) and hands out pre-registered handles:
//! recording on the request path is an atomic add (counters) or a
//! lock-free push (histograms), never a lookup by name and never a lock.
//! Without `serve --http` the handles are no-ops ([`Metrics::disabled`]).
//!
//! Three kinds of figures:
//!
//! - **Measured on the way** (handles): per-call latency and outcome by
//!   method ([`rpc`]: a tower layer for unary calls, and the `Session`
//!   handler for each call on a stream), the commit batch size and commit
//!   latency (`commit.rs`), the log write latency (`store/mod.rs`).
//! - **Read at scrape time** from the coordinator's own counters (the
//!   table counts grants, renewals, … anyway, under its lock): copied into
//!   the recorder by [`Metrics::render`], so they cost nothing per request.
//! - **Cluster figures** from a [`ClusterView`](crate::cluster_view::ClusterView) (empty on a single node).
//!
//! Every name is listed in [`names`] and in the README.

pub mod rpc;

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::cluster_view::ClusterStatus;
use crate::coordinator::Stats;

pub use rpc::{Method, RpcLayer, Transport};

/// The metric names, in one place (the README lists them too).
pub mod names {
    /// Leases granted (counter).
    pub const GRANTS: &str = "leasehold_grants_total";
    /// Successful renewals, unary or keepalive (counter).
    pub const RENEWALS: &str = "leasehold_renewals_total";
    /// Leases released by their holder (counter).
    pub const RELEASES: &str = "leasehold_releases_total";
    /// Leases that expired (counter).
    pub const EXPIRIES: &str = "leasehold_expiries_total";
    /// Leases revoked by an operator (counter).
    pub const REVOCATIONS: &str = "leasehold_revocations_total";
    /// Retried Acquires answered with the lease their key already has (counter).
    pub const REPLAYS: &str = "leasehold_idempotent_replays_total";
    /// Acquires answered `held`: someone else had the resource (counter).
    pub const HELD: &str = "leasehold_acquires_held_total";
    /// Live leases (gauge).
    pub const LIVE_LEASES: &str = "leasehold_live_leases";
    /// Acquires waiting in line (gauge).
    pub const WAITERS: &str = "leasehold_waiters";
    /// The highest fencing token granted (gauge).
    pub const TOKEN_HIGH_WATER: &str = "leasehold_token_high_water";
    /// Bytes the data directory's database occupies (gauge).
    pub const DATA_SIZE: &str = "leasehold_data_size_bytes";
    /// Seconds since the coordinator started (gauge).
    pub const UPTIME: &str = "leasehold_uptime_seconds";
    /// Synchronous log writes (batches) so far (counter).
    pub const COMMIT_BATCHES: &str = "leasehold_commit_batches_total";
    /// Calls answered, by method, transport and gRPC code (counter).
    pub const RPC_CALLS: &str = "leasehold_rpc_calls_total";
    /// Time from a call's arrival to its answer, by method and transport (histogram).
    pub const RPC_DURATION: &str = "leasehold_rpc_duration_seconds";
    /// Jobs (requests' changes) written by one synchronous log write (histogram).
    pub const COMMIT_BATCH_SIZE: &str = "leasehold_commit_batch_size";
    /// Time to make one batch durable: plan, reservation, log write (histogram).
    pub const COMMIT_DURATION: &str = "leasehold_commit_duration_seconds";
    /// Time of one log record's write with `O_DSYNC` (histogram).
    pub const WAL_WRITE_DURATION: &str = "leasehold_wal_write_duration_seconds";
    /// 1, labelled with the version (gauge).
    pub const BUILD_INFO: &str = "leasehold_build_info";
    /// Cluster: this member's role, 1 on the role it has (gauge, label `role`).
    pub const CLUSTER_ROLE: &str = "leasehold_cluster_role";
    /// Cluster: the current term (gauge).
    pub const CLUSTER_TERM: &str = "leasehold_cluster_term";
    /// Cluster: the highest log index known committed (gauge).
    pub const CLUSTER_COMMIT_INDEX: &str = "leasehold_cluster_commit_index";
    /// Cluster: the highest log index applied to the table (gauge).
    pub const CLUSTER_APPLIED_INDEX: &str = "leasehold_cluster_applied_index";
    /// Cluster: leader changes seen by this member (counter).
    pub const CLUSTER_LEADER_CHANGES: &str = "leasehold_cluster_leader_changes_total";
    /// Cluster: entries a peer is behind the leader, by peer (gauge).
    pub const CLUSTER_REPLICATION_LAG: &str = "leasehold_cluster_replication_lag_entries";
}

/// Latency buckets, in seconds: 50 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Batch size buckets, in jobs.
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// How often histogram samples are folded into their buckets; between two
/// upkeeps they wait in a lock-free list.
pub const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// The server's metrics. Cheap to clone; [`Metrics::default`] is disabled.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    rpc: Arc<rpc::RpcMetrics>,
    store: StoreMetrics,
    scraped: Scraped,
}

/// The handles `render` copies the coordinator's figures into.
struct Scraped {
    grants: Counter,
    renewals: Counter,
    releases: Counter,
    expiries: Counter,
    revocations: Counter,
    replays: Counter,
    commit_batches: Counter,
    live_leases: Gauge,
    waiters: Gauge,
    token_high_water: Gauge,
    data_size: Gauge,
    uptime: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.inner.is_some() {
            "Metrics(enabled)"
        } else {
            "Metrics(disabled)"
        })
    }
}

/// Handles the store and the committer record into (no-ops when disabled).
#[derive(Clone)]
pub struct StoreMetrics {
    /// Jobs per batch.
    pub batch_size: Histogram,
    /// Seconds to make a batch durable.
    pub commit_duration: Histogram,
    /// Seconds per log write.
    pub wal_write: Histogram,
}

impl Default for StoreMetrics {
    fn default() -> Self {
        StoreMetrics {
            batch_size: Histogram::noop(),
            commit_duration: Histogram::noop(),
            wal_write: Histogram::noop(),
        }
    }
}

impl std::fmt::Debug for StoreMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreMetrics")
    }
}

impl Metrics {
    /// Records nothing and renders nothing: the default without `--http`.
    pub fn disabled() -> Self {
        Metrics { inner: None }
    }

    /// A fresh recorder with every handle registered.
    pub fn enabled() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(names::COMMIT_BATCH_SIZE.into()),
                    BATCH_BUCKETS,
                )
            })
            // Only non-empty bucket lists are refused; ours are constants.
            .expect("the bucket lists are not empty")
            .build_recorder();
        let recorder = Arc::new(recorder);
        let handle = recorder.handle();
        let r = &recorder;
        describe(r);
        version_gauge(r).set(1.0);
        let store = StoreMetrics {
            batch_size: histogram(r, names::COMMIT_BATCH_SIZE, vec![]),
            commit_duration: histogram(r, names::COMMIT_DURATION, vec![]),
            wal_write: histogram(r, names::WAL_WRITE_DURATION, vec![]),
        };
        let scraped = Scraped {
            grants: counter(r, names::GRANTS, vec![]),
            renewals: counter(r, names::RENEWALS, vec![]),
            releases: counter(r, names::RELEASES, vec![]),
            expiries: counter(r, names::EXPIRIES, vec![]),
            revocations: counter(r, names::REVOCATIONS, vec![]),
            replays: counter(r, names::REPLAYS, vec![]),
            commit_batches: counter(r, names::COMMIT_BATCHES, vec![]),
            live_leases: gauge(r, names::LIVE_LEASES, vec![]),
            waiters: gauge(r, names::WAITERS, vec![]),
            token_high_water: gauge(r, names::TOKEN_HIGH_WATER, vec![]),
            data_size: gauge(r, names::DATA_SIZE, vec![]),
            uptime: gauge(r, names::UPTIME, vec![]),
        };
        let rpc = Arc::new(rpc::RpcMetrics::register(recorder.clone()));
        Metrics {
            inner: Some(Arc::new(Inner {
                recorder,
                handle,
                rpc,
                store,
                scraped,
            })),
        }
    }

    /// Whether anything is recorded.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The handles for the store and the committer.
    pub fn store(&self) -> StoreMetrics {
        self.inner
            .as_ref()
            .map(|i| i.store.clone())
            .unwrap_or_default()
    }

    /// The tower layer that measures unary calls (a pass-through when disabled).
    pub fn rpc_layer(&self) -> RpcLayer {
        RpcLayer::new(self.rpc())
    }

    /// The per-call handles, for the `Session` handler.
    pub fn rpc(&self) -> Option<Arc<rpc::RpcMetrics>> {
        self.inner.as_ref().map(|i| i.rpc.clone())
    }

    /// Folds recent histogram samples into their buckets. The HTTP server
    /// calls it every [`UPKEEP_EVERY`], so samples never pile up unscraped.
    pub fn upkeep(&self) {
        if let Some(i) = &self.inner {
            i.handle.run_upkeep();
        }
    }

    /// The exposition: the coordinator's figures (`stats`), the cluster's
    /// (if any) and everything measured so far. Empty when disabled.
    pub fn render(&self, stats: &Stats, cluster: Option<&ClusterStatus>) -> String {
        let Some(i) = &self.inner else {
            return String::new();
        };
        let s = &i.scraped;
        let c = &stats.counters;
        s.grants.absolute(c.grants);
        s.renewals.absolute(c.renewals);
        s.releases.absolute(c.releases);
        s.expiries.absolute(c.expiries);
        s.revocations.absolute(c.revocations);
        s.replays.absolute(c.replays);
        s.commit_batches.absolute(stats.commit_batches);
        s.live_leases.set(stats.live_leases as f64);
        s.waiters.set(stats.waiters as f64);
        s.token_high_water.set(stats.last_token.0 as f64);
        s.data_size.set(stats.data_size as f64);
        s.uptime.set(stats.uptime.as_secs_f64());
        if let Some(cluster) = cluster {
            record_cluster(&i.recorder, cluster);
        }
        i.handle.render()
    }
}

/// Renders the metrics of a [`ClusterView`] into the recorder.
fn record_cluster(r: &PrometheusRecorder, c: &ClusterStatus) {
    for role in crate::cluster_view::Role::ALL {
        let on = if role == c.role { 1.0 } else { 0.0 };
        gauge(
            r,
            names::CLUSTER_ROLE,
            vec![Label::new("role", role.as_str())],
        )
        .set(on);
    }
    gauge(r, names::CLUSTER_TERM, vec![]).set(c.term as f64);
    gauge(r, names::CLUSTER_COMMIT_INDEX, vec![]).set(c.commit_index as f64);
    gauge(r, names::CLUSTER_APPLIED_INDEX, vec![]).set(c.applied_index as f64);
    counter(r, names::CLUSTER_LEADER_CHANGES, vec![]).absolute(c.leader_changes);
    for m in &c.members {
        if let Some(lag) = m.replication_lag {
            let peer = Label::new("peer", m.id.clone());
            gauge(r, names::CLUSTER_REPLICATION_LAG, vec![peer]).set(lag as f64);
        }
    }
}

fn metadata() -> Metadata<'static> {
    Metadata::new(module_path!(), Level::INFO, Some(module_path!()))
}

fn key(name: &'static str, labels: Vec<Label>) -> Key {
    Key::from_parts(name, labels)
}

pub(crate) fn counter(r: &PrometheusRecorder, name: &'static str, labels: Vec<Label>) -> Counter {
    r.register_counter(&key(name, labels), &metadata())
}

fn gauge(r: &PrometheusRecorder, name: &'static str, labels: Vec<Label>) -> Gauge {
    r.register_gauge(&key(name, labels), &metadata())
}

pub(crate) fn histogram(
    r: &PrometheusRecorder,
    name: &'static str,
    labels: Vec<Label>,
) -> Histogram {
    r.register_histogram(&key(name, labels), &metadata())
}

fn version_gauge(r: &PrometheusRecorder) -> Gauge {
    let version = Label::new("version", env!("CARGO_PKG_VERSION"));
    gauge(r, names::BUILD_INFO, vec![version])
}

/// The `# HELP` lines.
fn describe(r: &PrometheusRecorder) {
    use metrics::Unit;
    let help: &[(&'static str, Option<Unit>, &'static str)] = &[
        (names::GRANTS, None, "Leases granted."),
        (names::RENEWALS, None, "Successful renewals (unary, session or keepalive)."),
        (names::RELEASES, None, "Leases released by their holder."),
        (names::EXPIRIES, None, "Leases that expired."),
        (names::REVOCATIONS, None, "Leases revoked by an operator."),
        (names::REPLAYS, None, "Retried Acquires answered with the lease their request id already has."),
        (names::HELD, None, "Acquires answered `held`: another holder had the resource."),
        (names::LIVE_LEASES, None, "Live leases."),
        (names::WAITERS, None, "Acquires waiting in line."),
        (names::TOKEN_HIGH_WATER, None, "The highest fencing token granted."),
        (names::DATA_SIZE, Some(Unit::Bytes), "Bytes the database occupies on disk."),
        (names::UPTIME, Some(Unit::Seconds), "Seconds since the coordinator started."),
        (names::COMMIT_BATCHES, None, "Synchronous log writes (batches of changes)."),
        (names::RPC_CALLS, None, "Calls answered, by method, transport (unary or session) and gRPC code; refusals are code != OK."),
        (names::RPC_DURATION, Some(Unit::Seconds), "Time from a call's arrival to its answer, by method and transport."),
        (names::COMMIT_BATCH_SIZE, None, "Jobs (one per request that changed something) made durable by one log write."),
        (names::COMMIT_DURATION, Some(Unit::Seconds), "Time to make one batch durable: plan, token reservation, log write."),
        (names::WAL_WRITE_DURATION, Some(Unit::Seconds), "Time of one log record's synchronous (O_DSYNC) write."),
        (names::BUILD_INFO, None, "Always 1; the label says the version."),
        (names::CLUSTER_ROLE, None, "1 for this member's role, 0 for the others."),
        (names::CLUSTER_TERM, None, "The current term."),
        (names::CLUSTER_COMMIT_INDEX, None, "The highest log index known committed."),
        (names::CLUSTER_APPLIED_INDEX, None, "The highest log index applied to the lease table."),
        (names::CLUSTER_LEADER_CHANGES, None, "Leader changes seen by this member."),
        (names::CLUSTER_REPLICATION_LAG, None, "Log entries a peer is behind the leader."),
    ];
    for &(name, unit, text) in help {
        let name = metrics::KeyName::from_const_str(name);
        r.describe_gauge(name, unit, SharedString::const_str(text));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::FencingToken;
    use crate::state::Counters;

    fn stats(grants: u64) -> Stats {
        Stats {
            counters: Counters {
                grants,
                ..Counters::default()
            },
            live_leases: 3,
            waiters: 1,
            last_token: FencingToken(77),
            uptime: Duration::from_secs(5),
            data_size: 4096,
            commit_batches: 2,
        }
    }

    #[test]
    fn disabled_renders_nothing_and_enabled_renders_the_scraped_figures() {
        assert_eq!(Metrics::disabled().render(&stats(1), None), "");
        let m = Metrics::enabled();
        let text = m.render(&stats(41), None);
        for line in [
            "leasehold_grants_total 41",
            "leasehold_live_leases 3",
            "leasehold_waiters 1",
            "leasehold_token_high_water 77",
            "leasehold_commit_batches_total 2",
            "# TYPE leasehold_grants_total counter",
            "# HELP leasehold_grants_total Leases granted.",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        // Counters follow the table's, even across two scrapes.
        let text = m.render(&stats(42), None);
        assert!(
            text.lines().any(|l| l == "leasehold_grants_total 42"),
            "{text}"
        );
    }

    #[test]
    fn histograms_have_buckets_after_upkeep() {
        let m = Metrics::enabled();
        let s = m.store();
        s.batch_size.record(3.0);
        s.wal_write.record(0.000_2);
        m.upkeep();
        let text = m.render(&stats(0), None);
        for line in [
            "# TYPE leasehold_commit_batch_size histogram",
            "leasehold_commit_batch_size_bucket{le=\"2\"} 0",
            "leasehold_commit_batch_size_bucket{le=\"4\"} 1",
            "leasehold_commit_batch_size_count 1",
            "leasehold_wal_write_duration_seconds_bucket{le=\"0.00025\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
    }
}
