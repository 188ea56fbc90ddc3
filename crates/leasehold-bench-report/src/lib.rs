//! What every benchmark shares: the measuring window, the latency histogram
//! and the report (text and JSON).
//!
//! Both `leasehold bench` and the peer load generators in `bench/peers` (a
//! separate crate, for etcd and ZooKeeper) depend on this crate, so they
//! print exactly the same report; that is what lets `bench/compare.sh` put
//! all three systems in one table. It depends on `std`, `serde`,
//! `serde_json` and `tokio` only.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

/// Sub-buckets per power of two: 64 gives a relative error under 1.6 %.
const SUB_BITS: u32 = 6;
const SUB: usize = 1 << SUB_BITS;
const BUCKETS: usize = (64 - SUB_BITS as usize + 1) * SUB;

/// A log-linear latency histogram over nanoseconds: values below 64 ns are
/// exact, larger ones fall in one of 64 buckets per power of two. Recording
/// is a shift and an add; merging adds the counts.
#[derive(Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max: 0,
        }
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("total", &self.total)
            .field("max", &self.max)
            .finish()
    }
}

fn bucket_of(v: u64) -> usize {
    if v < SUB as u64 {
        return v as usize;
    }
    let exp = 63 - v.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let sub = ((v >> shift) as usize) & (SUB - 1);
    (shift as usize + 1) * SUB + sub
}

/// The largest value that falls in bucket `i`.
fn bucket_high(i: usize) -> u64 {
    if i < SUB {
        return i as u64;
    }
    let shift = (i / SUB - 1) as u32;
    let sub = (i % SUB) as u64;
    let low = (SUB as u64 + sub) << shift;
    low + ((1u64 << shift) - 1)
}

impl Histogram {
    /// Records one latency.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[bucket_of(ns)] += 1;
        self.total += 1;
        self.max = self.max.max(ns);
    }

    /// Adds another histogram's counts to this one.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// How many values were recorded.
    pub fn len(&self) -> u64 {
        self.total
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The value at quantile `q` (0.0..=1.0), within the bucket precision;
    /// never above the largest value recorded.
    pub fn quantile(&self, q: f64) -> Duration {
        if self.total == 0 {
            return Duration::ZERO;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Duration::from_nanos(bucket_high(i).min(self.max));
            }
        }
        Duration::from_nanos(self.max)
    }

    /// The largest value recorded.
    pub fn max(&self) -> Duration {
        Duration::from_nanos(self.max)
    }
}

/// When a run measures: ops that start after the warm-up and finish before
/// the end count; the run stops at the end, or earlier once `max_ops` ops
/// were counted. Shared by every worker of a run.
#[derive(Debug)]
pub struct Window {
    /// When the workers started.
    pub started: Instant,
    /// Start of the measured interval (after the warm-up).
    pub from: Instant,
    /// End of the measured interval.
    pub to: Instant,
    max_ops: u64,
    counted: AtomicU64,
    stopped_at: AtomicU64,
}

impl Window {
    /// A window that opens after `warmup` and lasts `duration`, counting at most `max_ops`.
    pub fn new(warmup: Duration, duration: Duration, max_ops: u64) -> Self {
        let started = Instant::now();
        Window {
            started,
            from: started + warmup,
            to: started + warmup + duration,
            max_ops: max_ops.max(1),
            counted: AtomicU64::new(0),
            stopped_at: AtomicU64::new(0),
        }
    }

    /// Whether workers should start another op.
    pub fn running(&self) -> bool {
        Instant::now() < self.to && self.counted.load(Ordering::Relaxed) < self.max_ops
    }

    /// Whether the measured interval has begun.
    pub fn measuring(&self, at: Instant) -> bool {
        at >= self.from && at < self.to
    }

    /// Counts an op that ran from `t0` to `t1` if it lies inside the window;
    /// returns whether it counted.
    pub fn record(&self, tally: &mut Tally, t0: Instant, t1: Instant) -> bool {
        if t0 < self.from || t1 > self.to {
            return false;
        }
        let n = self.counted.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= self.max_ops {
            // Ended by count: remember when, for the rate.
            let at = t1.duration_since(self.started).as_nanos() as u64;
            let _ = self
                .stopped_at
                .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
        }
        tally.hist.record(t1 - t0);
        tally.ops += 1;
        true
    }

    /// The length of the measured interval (shorter if `max_ops` ended it).
    pub fn measured(&self) -> Duration {
        let full = self.to - self.from;
        match self.stopped_at.load(Ordering::Relaxed) {
            0 => full,
            at => {
                let end = self.started + Duration::from_nanos(at);
                end.saturating_duration_since(self.from).min(full)
            }
        }
    }
}

/// What one worker counted; merged into the report.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    /// Latencies of the counted ops.
    pub hist: Histogram,
    /// Ops counted inside the window.
    pub ops: u64,
    /// Failed ops (anywhere in the run).
    pub errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
}

impl Tally {
    /// Counts a failed op.
    pub fn error(&mut self, e: impl fmt::Display) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    /// Adds another worker's tally.
    pub fn merge(&mut self, other: &Tally) {
        self.hist.merge(&other.hist);
        self.ops += other.ops;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
    }
}

/// One correctness check of a run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Check {
    /// Stable name (`no-overlap`, `tokens-increase`, ...).
    pub name: String,
    /// Whether it held.
    pub ok: bool,
    /// What was checked, with the figures.
    pub detail: String,
}

impl Check {
    /// A check named `name` that holds when `ok`.
    pub fn new(name: &str, ok: bool, detail: impl Into<String>) -> Self {
        Check {
            name: name.to_owned(),
            ok,
            detail: detail.into(),
        }
    }
}

/// What the workers of a contended run share: a "current holder" slot and
/// the highest token seen, for the `no-overlap` and `tokens-increase`
/// checks (used by `bench contended` and by the peers' load generators).
#[derive(Debug, Default)]
pub struct Contention {
    /// Token of the current holder, 0 when nobody holds.
    holder: AtomicU64,
    /// Highest token seen granted.
    highest: AtomicU64,
    overlaps: AtomicU64,
    backwards: AtomicU64,
    grants: AtomicU64,
}

impl Contention {
    /// A worker was granted the lock with `token`.
    pub fn granted(&self, token: u64) {
        self.grants.fetch_add(1, Ordering::Relaxed);
        if self
            .holder
            .compare_exchange(0, token, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            self.overlaps.fetch_add(1, Ordering::Relaxed);
        }
        if self.highest.fetch_max(token, Ordering::SeqCst) >= token {
            self.backwards.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The holder of `token` is about to release: call before the release
    /// is sent, so the next grant can only come after it.
    pub fn releasing(&self, token: u64) {
        let _ = self
            .holder
            .compare_exchange(token, 0, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The two checks, with the figures.
    pub fn checks(&self) -> Vec<Check> {
        let grants = self.grants.load(Ordering::Relaxed);
        let overlaps = self.overlaps.load(Ordering::Relaxed);
        let backwards = self.backwards.load(Ordering::Relaxed);
        vec![
            Check::new(
                "no-overlap",
                overlaps == 0 && grants > 0,
                format!("{grants} grants; {overlaps} while another holder held"),
            ),
            Check::new(
                "tokens-increase",
                backwards == 0,
                format!("{backwards} grants not above every earlier token"),
            ),
        ]
    }
}

/// The `tokens-unique` check of a cycle run: no token in `tokens` (every
/// grant of the run) twice, and `backwards` grants whose token was not above
/// their worker's previous one.
pub fn tokens_unique(mut tokens: Vec<u64>, backwards: u64) -> Check {
    tokens.sort_unstable();
    let duplicates = tokens.windows(2).filter(|p| p[0] == p[1]).count();
    Check::new(
        "tokens-unique",
        duplicates == 0 && backwards == 0,
        format!("{duplicates} tokens granted twice; {backwards} went backwards within a worker"),
    )
}

/// Latency quantiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest.
    pub max_us: f64,
}

impl Latency {
    /// The quantiles of `h`.
    pub fn of(h: &Histogram) -> Self {
        let us = |d: Duration| (d.as_nanos() as f64 / 1000.0 * 1000.0).round() / 1000.0;
        Latency {
            p50_us: us(h.quantile(0.50)),
            p90_us: us(h.quantile(0.90)),
            p99_us: us(h.quantile(0.99)),
            max_us: us(h.max()),
        }
    }
}

/// The result of one run; `--json` prints exactly this (stable field names).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Which system ran it: `leasehold`, `etcd` or `zookeeper`.
    pub system: String,
    /// The workload (`cycle`, `cycle-fresh`, `contended`, `keepalive`, ...).
    pub workload: String,
    /// What one op is (`cycle`, `handoff`, `renewal`, ...).
    pub op: String,
    /// Concurrent workers (or streams).
    pub concurrency: usize,
    /// Connections (channels or sessions) used.
    pub connections: usize,
    /// Seconds measured.
    pub seconds: f64,
    /// Ops counted in the window.
    pub ops: u64,
    /// Ops per second.
    pub rate: f64,
    /// Latency of one op.
    pub latency: Latency,
    /// Failed ops.
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Correctness checks; the run passes when all hold and errors is 0.
    pub checks: Vec<Check>,
    /// Workload-specific figures (`server_cpu_cores`, `server_rss_mib`, ...).
    pub extra: BTreeMap<String, f64>,
}

impl Report {
    /// A report from the merged tally of a run.
    pub fn new(
        system: &str,
        workload: &str,
        op: &str,
        concurrency: usize,
        connections: usize,
        measured: Duration,
        tally: &Tally,
    ) -> Self {
        let seconds = measured.as_secs_f64();
        let rate = if seconds > 0.0 {
            tally.ops as f64 / seconds
        } else {
            0.0
        };
        Report {
            system: system.to_owned(),
            workload: workload.to_owned(),
            op: op.to_owned(),
            concurrency,
            connections,
            seconds: (seconds * 1000.0).round() / 1000.0,
            ops: tally.ops,
            rate: rate.round(),
            latency: Latency::of(&tally.hist),
            errors: tally.errors,
            first_error: tally.first_error.clone(),
            checks: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Whether every check held and nothing failed.
    pub fn passed(&self) -> bool {
        self.errors == 0 && self.checks.iter().all(|c| c.ok)
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

/// `1234567.0` → `1,234,567`.
pub fn thousands(v: f64) -> String {
    let n = v.round() as i128;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// Microseconds as a short human figure: `0.08 µs`, `850 µs`, `1.25 ms`, `3.10 s`.
pub fn human_us(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2} µs")
    } else if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} {}: {} ops/s ({} {}s in {:.1} s, concurrency {}, connections {})",
            self.system,
            self.workload,
            thousands(self.rate),
            thousands(self.ops as f64),
            self.op,
            self.seconds,
            self.concurrency,
            self.connections,
        )?;
        let l = &self.latency;
        writeln!(
            f,
            "  latency  p50 {}  p90 {}  p99 {}  max {}",
            human_us(l.p50_us),
            human_us(l.p90_us),
            human_us(l.p99_us),
            human_us(l.max_us)
        )?;
        match &self.first_error {
            Some(e) => writeln!(f, "  errors   {} (first: {e})", self.errors)?,
            None => writeln!(f, "  errors   {}", self.errors)?,
        }
        for (k, v) in &self.extra {
            writeln!(f, "  {k:<24} {}", trim_float(*v))?;
        }
        for c in &self.checks {
            let mark = if c.ok { "ok" } else { "FAILED" };
            writeln!(f, "  check {:<18} {mark:<6} {}", c.name, c.detail)?;
        }
        Ok(())
    }
}

fn trim_float(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        thousands(v)
    } else {
        format!("{v:.3}")
    }
}

/// The CPU time (user + system) a process has used so far, from
/// `/proc/<pid>/stat`. Linux reports it in ticks of `USER_HZ`, which is 100
/// on every Linux architecture, whatever the kernel's own tick rate.
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after `)`.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// A process's resident memory in bytes, from `/proc/<pid>/status` (`VmRSS`).
pub fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Waits for every worker until `deadline`; aborts the ones still running
/// then and counts each as an error in the returned tally.
pub async fn join_bounded<T: Send + 'static>(
    handles: Vec<JoinHandle<T>>,
    deadline: Instant,
) -> (Vec<T>, Tally) {
    let mut out = Vec::with_capacity(handles.len());
    let mut lost = Tally::default();
    let deadline = tokio::time::Instant::from_std(deadline);
    for mut h in handles {
        match tokio::time::timeout_at(deadline, &mut h).await {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => lost.error(format!("a worker failed: {e}")),
            Err(_) => {
                h.abort();
                lost.error("a worker was still waiting on the server at the hard stop");
            }
        }
    }
    (out, lost)
}

/// Server CPU and memory over the measured window, when its pid is known.
#[derive(Debug, Default)]
pub struct ServerUsage {
    pid: Option<u32>,
    cpu_at_start: Option<Duration>,
}

impl ServerUsage {
    /// Samples at the window's start (call it then).
    pub fn start(pid: Option<u32>) -> Self {
        ServerUsage {
            pid,
            cpu_at_start: pid.and_then(process_cpu),
        }
    }

    /// Adds `server_cpu_cores` (CPU seconds per second over `measured`) and
    /// `server_rss_mib` to the report.
    pub fn finish(&self, measured: Duration, report: &mut Report) {
        let Some(pid) = self.pid else { return };
        if let (Some(a), Some(b)) = (self.cpu_at_start, process_cpu(pid)) {
            let cores = (b - a).as_secs_f64() / measured.as_secs_f64().max(1e-9);
            report
                .extra
                .insert("server_cpu_cores".into(), (cores * 1000.0).round() / 1000.0);
        }
        if let Some(rss) = process_rss(pid) {
            report.extra.insert(
                "server_rss_mib".into(),
                (rss as f64 / 1048576.0 * 10.0).round() / 10.0,
            );
        }
    }
}

/// Waits until the window's measured interval begins, then samples the
/// server; spawn it beside the workers.
pub async fn usage_at_window_start_arc(window: Arc<Window>, pid: Option<u32>) -> ServerUsage {
    tokio::time::sleep_until(tokio::time::Instant::from_std(window.from)).await;
    ServerUsage::start(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_tight() {
        let mut last = 0;
        for v in (0..2_000_000u64).step_by(7).chain([u64::MAX / 2, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b >= last, "bucket of {v} went backwards");
            assert!(bucket_high(b) >= v, "{v} above its bucket's top");
            // Relative error of the reported value stays under 1/64.
            assert!(bucket_high(b) - v <= v / 64 + 1, "{v}: {}", bucket_high(b));
            last = b;
        }
        assert!(bucket_of(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles_of_a_known_spread() {
        let mut h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let q = |q| h.quantile(q).as_secs_f64() * 1e6;
        assert!((q(0.5) - 500.0).abs() < 10.0, "{}", q(0.5));
        assert!((q(0.99) - 990.0).abs() < 16.0, "{}", q(0.99));
        assert_eq!(h.max(), Duration::from_micros(1000));
        assert_eq!(h.len(), 1000);
    }

    #[test]
    fn thousands_groups_digits() {
        for (v, s) in [
            (0.0, "0"),
            (999.0, "999"),
            (1000.0, "1,000"),
            (1234567.4, "1,234,567"),
        ] {
            assert_eq!(thousands(v), s);
        }
    }

    #[test]
    fn report_round_trips_through_json() {
        let mut t = Tally::default();
        t.hist.record(Duration::from_micros(100));
        t.ops = 1;
        let mut r = Report::new(
            "leasehold",
            "cycle",
            "cycle",
            1,
            1,
            Duration::from_secs(1),
            &t,
        );
        r.checks.push(Check::new("x", true, "fine"));
        let back: Report = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(back, r);
        assert!(r.to_string().contains("1 ops/s"));
    }
}
