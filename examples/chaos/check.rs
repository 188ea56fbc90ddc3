//! The chaos run's history and its checker.
//!
//! Every worker appends one JSON line per operation to its own file
//! (`history/worker-N.jsonl`); the harness appends one line per injected
//! fault to `faults.jsonl`. Times are `CLOCK_REALTIME` nanoseconds, a clock
//! every process on the machine shares. An operation is the interval
//! `[start_ns, end_ns]`: it took effect somewhere inside it, so the checker
//! only orders two operations when one *ended* before the other *started*.
//!
//! [`check`] verifies the five properties of [`Property`] and counts what it
//! saw. Its tests below feed it hand-written histories that break each
//! property, proving it can fail (the example is declared with `test =
//! true`, so `cargo test` runs them).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt::{self, Write as _};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// What a worker did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// One logical acquire (one `request_id`, however many retries).
    Acquire,
    /// One fenced Put to the store (or a write the worker skipped).
    Write,
    /// One release.
    Release,
    /// The client library reported the lease lost (not by release).
    Lost,
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Acquire: a lease with `token`.
    Granted,
    /// Acquire: someone else held the resource for the whole wait.
    Held,
    /// Write: the store accepted it.
    Accepted,
    /// Write: the store refused the token as stale (`highest` = the token it named).
    Rejected,
    /// Write: not sent, because the lease was no longer valid at the check.
    Skipped,
    /// Acquire, write or release: the call failed (unreachable, timed out,
    /// refused); a failed write may or may not have been applied.
    Failed,
    /// Release: the coordinator released it.
    Released,
    /// Release: the lease had already ended.
    NotHeld,
    /// Lost: the coordinator answered that the lease is gone.
    Gone,
    /// Lost: no renewal was confirmed before the conservative validity ran out.
    TimedOut,
}

/// One line of a worker's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    /// The worker's number.
    pub worker: u32,
    /// What it did.
    pub op: OpKind,
    /// The resource.
    pub resource: String,
    /// The lease's fencing token (none for an acquire that got no lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// When the operation started (CLOCK_REALTIME, ns).
    pub start_ns: u64,
    /// When it ended.
    pub end_ns: u64,
    /// How it ended.
    pub result: Outcome,
    /// Write: the highest token the store reported (accepted: the write's
    /// own; rejected: the one it named). Held acquire: the holder's token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest: Option<u64>,
    /// Write: when the worker checked its lease before writing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_ns: Option<u64>,
    /// Write: the lease's conservative validity at `check_ns`, in ms. Lost:
    /// a lower bound of the validity left when the loss was reported (from
    /// the last sample before it; negative once it had run out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_ms: Option<f64>,
    /// Free text: an error message, a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The kinds of fault the harness injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// `kill -9` of the coordinator, restarted on the same port and data.
    CoordinatorKill,
    /// SIGSTOP of the coordinator for a while, then SIGCONT.
    CoordinatorPause,
    /// SIGSTOP of a worker for longer than its TTL (a GC pause), then SIGCONT.
    WorkerPause,
    /// SIGTERM or `kill -9` of the fenced store, restarted on the same port and data.
    StoreRestart,
    /// The proxy between workers and coordinator cuts every link (sometimes
    /// after swallowing replies for a while).
    ConnectionsCut,
    /// An operator revokes the live lease on a resource (AdminService).
    Revoke,
    /// Cluster only: one node's links to the other nodes are refused, or
    /// drop every packet, for a while (the workers still reach it).
    Partition,
}

impl FaultKind {
    /// Every kind, in the order the summary lists them.
    pub const ALL: [FaultKind; 7] = [
        FaultKind::CoordinatorKill,
        FaultKind::CoordinatorPause,
        FaultKind::WorkerPause,
        FaultKind::StoreRestart,
        FaultKind::ConnectionsCut,
        FaultKind::Revoke,
        FaultKind::Partition,
    ];

    /// The kinds a run injects: partitions need a cluster.
    pub fn kinds(cluster: bool) -> &'static [FaultKind] {
        if cluster {
            &Self::ALL
        } else {
            &Self::ALL[..6]
        }
    }

    /// The name in the summary.
    pub fn label(self) -> &'static str {
        match self {
            FaultKind::CoordinatorKill => "coordinator kill -9",
            FaultKind::CoordinatorPause => "coordinator pause",
            FaultKind::WorkerPause => "worker pause",
            FaultKind::StoreRestart => "store restart",
            FaultKind::ConnectionsCut => "connections cut",
            FaultKind::Revoke => "revoke",
            FaultKind::Partition => "node partition",
        }
    }
}

/// One line of `faults.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fault {
    /// What was done.
    pub kind: FaultKind,
    /// When it started.
    pub start_ns: u64,
    /// When it was over (the process restarted or resumed).
    pub end_ns: u64,
    /// Which process, for how long, which signal.
    pub detail: String,
    /// For a revoke that freed a lease: its resource and token. That lease
    /// is gone while its holder may still count it valid, by design.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<(String, u64)>,
}

/// Everything the run recorded.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Every worker's operations.
    pub ops: Vec<Op>,
    /// The faults.
    pub faults: Vec<Fault>,
}

impl History {
    /// Reads `DIR/history/*.jsonl` and `DIR/faults.jsonl`.
    pub fn load(dir: &Path) -> Result<History, String> {
        let mut history = History::default();
        let hist_dir = dir.join("history");
        let mut files: Vec<_> = std::fs::read_dir(&hist_dir)
            .map_err(|e| format!("cannot list {}: {e}", hist_dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        for file in files {
            history.ops.extend(read_lines::<Op>(&file)?);
        }
        let faults = dir.join("faults.jsonl");
        if faults.exists() {
            history.faults = read_lines(&faults)?;
        }
        Ok(history)
    }
}

fn read_lines<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Vec<T>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let item = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: {e}: {line}", path.display(), i + 1))?;
        out.push(item);
    }
    Ok(out)
}

/// The properties the checker verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Property {
    /// 1. Every token was granted at most once.
    UniqueTokens,
    /// 2. Per resource, a grant acknowledged before another acquire started
    ///    has the smaller token.
    GrantOrder,
    /// 3. The store never accepted a write whose token was lower than that
    ///    of a write it had accepted (and acknowledged) before this one started.
    StoreOrder,
    /// 4. Every write by a superseded holder was rejected. Superseded: a
    ///    write with a higher token on the resource had been accepted before
    ///    this write started (the store cannot know of a newer lease that has
    ///    not written yet). Every rejection named a higher token that some
    ///    worker had actually offered.
    SupersededRejected,
    /// 5. No acknowledged grant was lost, across crashes too: no lease was
    ///    reported gone while its holder's conservative validity had not run
    ///    out, and no holder found its lease valid after a newer lease on the
    ///    resource had been granted.
    NoGrantLost,
}

impl Property {
    /// The property in one line.
    pub fn statement(self) -> &'static str {
        match self {
            Property::UniqueTokens => "1. every token was granted at most once",
            Property::GrantOrder => {
                "2. per resource, tokens were granted in strictly increasing order"
            }
            Property::StoreOrder => {
                "3. the store never accepted a write whose token was lower than one it had already accepted"
            }
            Property::SupersededRejected => {
                "4. every write by a holder whose lease had been superseded was rejected"
            }
            Property::NoGrantLost => "5. no acknowledged grant was lost across a crash",
        }
    }
}

/// A broken property and the operations that show it.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Which property.
    pub property: Property,
    /// What happened, in a sentence.
    pub message: String,
    /// The operations involved.
    pub ops: Vec<Op>,
}

/// What the checker found: the figures and the violations.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// Acquire operations.
    pub acquires: usize,
    /// Write operations (sent or skipped).
    pub writes: usize,
    /// Release operations.
    pub releases: usize,
    /// Leases reported lost (not by release).
    pub lost: usize,
    /// Acquires that got a lease.
    pub grants: usize,
    /// Distinct tokens among the grants.
    pub distinct_tokens: usize,
    /// Acquires that found the resource held for their whole wait.
    pub held: usize,
    /// Acquires that failed.
    pub acquires_failed: usize,
    /// Pairs of grants on one resource ordered in real time (checked for order).
    pub ordered_grant_pairs_checked: usize,
    /// Writes the store accepted.
    pub writes_accepted: usize,
    /// Writes the store rejected as stale.
    pub writes_rejected: usize,
    /// Writes whose call failed (store down or restarting): outcome unknown.
    pub writes_failed: usize,
    /// Writes not sent because the lease was no longer valid at the check.
    pub writes_skipped: usize,
    /// Writes by superseded holders (see [`Property::SupersededRejected`]).
    pub superseded: usize,
    /// Of those, rejected by the store.
    pub superseded_rejected: usize,
    /// Of those, failed in transport (not applied as far as anyone knows).
    pub superseded_failed: usize,
    /// Rejections explained by a write accepted before the rejected one started.
    pub rejections_after_accepted: usize,
    /// Rejections explained only by a concurrent or unacknowledged write.
    pub rejections_concurrent: usize,
    /// Losses reported as `Gone`.
    pub lost_gone: usize,
    /// Losses reported as `TimedOut`.
    pub lost_timed_out: usize,
    /// The largest lower bound of validity left at a `Gone` (ms; ≤ 0 is fine).
    pub gone_max_valid_ms: Option<f64>,
    /// Writes whose holder had checked its lease valid (checked against newer grants).
    pub valid_checks: usize,
    /// Faults by kind.
    pub faults: BTreeMap<String, usize>,
}

/// The checker's verdict.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// What it counted.
    pub figures: Figures,
    /// What it found broken (empty: the run passed).
    pub violations: Vec<Violation>,
}

/// Verifies the five properties over `history`; counts the faults of each
/// of `kinds` (the run's), zeros included.
pub fn check(history: &History, kinds: &[FaultKind]) -> Report {
    let mut report = Report::default();
    let f = &mut report.figures;
    for op in &history.ops {
        match op.op {
            OpKind::Acquire => f.acquires += 1,
            OpKind::Write => f.writes += 1,
            OpKind::Release => f.releases += 1,
            OpKind::Lost => f.lost += 1,
        }
        match (op.op, op.result) {
            (OpKind::Acquire, Outcome::Held) => f.held += 1,
            (OpKind::Acquire, Outcome::Failed) => f.acquires_failed += 1,
            (OpKind::Write, Outcome::Accepted) => f.writes_accepted += 1,
            (OpKind::Write, Outcome::Rejected) => f.writes_rejected += 1,
            (OpKind::Write, Outcome::Failed) => f.writes_failed += 1,
            (OpKind::Write, Outcome::Skipped) => f.writes_skipped += 1,
            (OpKind::Lost, Outcome::Gone) => f.lost_gone += 1,
            (OpKind::Lost, Outcome::TimedOut) => f.lost_timed_out += 1,
            _ => {}
        }
    }
    for &kind in kinds {
        let n = history.faults.iter().filter(|x| x.kind == kind).count();
        f.faults.insert(kind.label().to_owned(), n);
    }

    // Operations that must carry a token but do not are a broken history,
    // not something to guess about: report them under the property they feed.
    let mut v = Vec::new();
    for op in &history.ops {
        let needs_token = matches!(
            (op.op, op.result),
            (OpKind::Acquire, Outcome::Granted)
                | (OpKind::Write, _)
                | (OpKind::Release, _)
                | (OpKind::Lost, _)
        );
        if (needs_token && op.token.is_none()) || op.end_ns < op.start_ns {
            v.push(Violation {
                property: Property::UniqueTokens,
                message: "malformed history line: missing token or end before start".into(),
                ops: vec![op.clone()],
            });
        }
    }
    let tok = |op: &Op| op.token.unwrap_or(0);

    let grants: Vec<&Op> = history
        .ops
        .iter()
        .filter(|o| o.op == OpKind::Acquire && o.result == Outcome::Granted && o.token.is_some())
        .collect();
    f.grants = grants.len();

    // 1. Each token granted at most once (tokens are one global sequence).
    let mut by_token: BTreeMap<u64, Vec<&Op>> = BTreeMap::new();
    for g in &grants {
        by_token.entry(tok(g)).or_default().push(g);
    }
    f.distinct_tokens = by_token.len();
    for (token, ops) in &by_token {
        if ops.len() > 1 {
            v.push(Violation {
                property: Property::UniqueTokens,
                message: format!("token {token} was granted {} times", ops.len()),
                ops: ops.iter().map(|o| (*o).clone()).collect(),
            });
        }
    }

    let per_resource = |pred: &dyn Fn(&Op) -> bool| {
        let mut m: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        for op in history.ops.iter().filter(|o| o.token.is_some() && pred(o)) {
            m.entry(op.resource.as_str()).or_default().push(op);
        }
        m
    };
    let grants_by_res = per_resource(&|o| o.op == OpKind::Acquire && o.result == Outcome::Granted);
    let accepted_by_res = per_resource(&|o| o.op == OpKind::Write && o.result == Outcome::Accepted);
    let sent_by_res = per_resource(&|o| {
        o.op == OpKind::Write
            && matches!(
                o.result,
                Outcome::Accepted | Outcome::Rejected | Outcome::Failed
            )
    });

    // 2. Per resource, real-time order of grants ⇒ token order.
    for ops in grants_by_res.values() {
        let mut sweep = Sweep::new(ops);
        let mut probes = ops.clone();
        probes.sort_by_key(|o| o.start_ns);
        for b in probes {
            let (best, n) = sweep.before(b.start_ns);
            f.ordered_grant_pairs_checked += n;
            if let Some(a) = best {
                if tok(a) >= tok(b) {
                    v.push(Violation {
                        property: Property::GrantOrder,
                        message: format!(
                            "on {}: token {} was granted after token {} had been acknowledged",
                            b.resource,
                            tok(b),
                            tok(a)
                        ),
                        ops: vec![a.clone(), b.clone()],
                    });
                }
            }
        }
    }

    // 3. and 4. The store's order, and superseded writers.
    let mut offered: HashMap<(&str, u64), u64> = HashMap::new();
    for ops in sent_by_res.values() {
        for w in ops {
            let e = offered
                .entry((w.resource.as_str(), tok(w)))
                .or_insert(u64::MAX);
            *e = (*e).min(w.start_ns);
        }
    }
    for (res, sent) in &sent_by_res {
        let accepted = accepted_by_res.get(res).cloned().unwrap_or_default();
        let mut sweep = Sweep::new(&accepted);
        let mut probes = sent.clone();
        probes.sort_by_key(|o| o.start_ns);
        for w in probes {
            let (best, _) = sweep.before(w.start_ns);
            let superseded = best.filter(|a| tok(a) > tok(w));
            if let Some(a) = superseded {
                f.superseded += 1;
                match w.result {
                    Outcome::Rejected => f.superseded_rejected += 1,
                    Outcome::Failed => f.superseded_failed += 1,
                    _ => {
                        v.push(Violation {
                            property: Property::StoreOrder,
                            message: format!(
                                "on {res}: the store accepted token {} after it had acknowledged token {}",
                                tok(w),
                                tok(a)
                            ),
                            ops: vec![a.clone(), w.clone()],
                        });
                        v.push(Violation {
                            property: Property::SupersededRejected,
                            message: format!(
                                "on {res}: the holder of token {} was superseded (token {} had written) but its write was accepted",
                                tok(w),
                                tok(a)
                            ),
                            ops: vec![a.clone(), w.clone()],
                        });
                    }
                }
            }
            if w.result != Outcome::Rejected {
                continue;
            }
            if superseded.is_some() {
                f.rejections_after_accepted += 1;
            } else {
                f.rejections_concurrent += 1;
            }
            match w.highest {
                Some(h) if h > tok(w) => {
                    let first_offer = offered.get(&(res, h)).copied();
                    if first_offer.is_none_or(|start| start > w.end_ns) {
                        let mut ops = vec![w.clone()];
                        ops.extend(
                            sent.iter()
                                .filter(|o| o.token == Some(h))
                                .map(|o| (*o).clone()),
                        );
                        v.push(Violation {
                            property: Property::SupersededRejected,
                            message: format!(
                                "on {res}: a write with token {} was rejected naming token {h}, which no worker had offered by then",
                                tok(w)
                            ),
                            ops,
                        });
                    }
                }
                named => v.push(Violation {
                    property: Property::SupersededRejected,
                    message: format!(
                        "on {res}: a write with token {} was rejected naming {named:?}, not a higher token",
                        tok(w)
                    ),
                    ops: vec![w.clone()],
                }),
            }
        }
    }

    // An operator's revoke ends a lease under its holder on purpose: 5a and
    // 5b do not apply to the leases the harness revoked.
    let revoked: HashSet<(&str, u64)> = history
        .faults
        .iter()
        .filter_map(|f| f.revoked.as_ref().map(|(r, t)| (r.as_str(), *t)))
        .collect();

    // 5a. A lease reported gone while its holder's validity had not run out.
    for op in &history.ops {
        if op.op != OpKind::Lost || op.result != Outcome::Gone {
            continue;
        }
        if revoked.contains(&(op.resource.as_str(), tok(op))) {
            continue;
        }
        let left = op.valid_ms.unwrap_or(f64::INFINITY);
        f.gone_max_valid_ms = Some(f.gone_max_valid_ms.map_or(left, |m: f64| m.max(left)));
        if left > 0.0 {
            v.push(Violation {
                property: Property::NoGrantLost,
                message: format!(
                    "on {}: the coordinator said the lease with token {} was gone while its holder's conservative validity still had at least {left:.1} ms",
                    op.resource,
                    tok(op)
                ),
                ops: vec![op.clone()],
            });
        }
    }

    // 5b. A holder found its lease valid after a newer grant was acknowledged.
    let writes_by_res = per_resource(&|o| {
        o.op == OpKind::Write && o.check_ns.is_some() && o.valid_ms.is_some_and(|v| v > 0.0)
    });
    for (res, checks) in &writes_by_res {
        let grants = grants_by_res.get(res).cloned().unwrap_or_default();
        let mut sweep = Sweep::new(&grants);
        let mut probes = checks.clone();
        probes.sort_by_key(|o| o.check_ns);
        for w in probes {
            if revoked.contains(&(&**res, tok(w))) {
                continue;
            }
            f.valid_checks += 1;
            let at = w.check_ns.unwrap_or(w.start_ns);
            let (best, _) = sweep.before(at);
            if let Some(g) = best.filter(|g| tok(g) > tok(w)) {
                v.push(Violation {
                    property: Property::NoGrantLost,
                    message: format!(
                        "on {res}: the holder of token {} found its lease valid ({:.1} ms left) after token {} had been granted",
                        tok(w),
                        w.valid_ms.unwrap_or(0.0),
                        tok(g)
                    ),
                    ops: vec![g.clone(), w.clone()],
                });
            }
        }
    }

    v.sort_by_key(|x| x.property);
    report.violations = v;
    report
}

/// Answers, for probe times in increasing order, "which op with the highest
/// token had ended before time t?" in O(n log n) overall.
struct Sweep<'a> {
    by_end: Vec<&'a Op>,
    next: usize,
    best: Option<&'a Op>,
}

impl<'a> Sweep<'a> {
    fn new(ops: &[&'a Op]) -> Self {
        let mut by_end = ops.to_vec();
        by_end.sort_by_key(|o| o.end_ns);
        Sweep {
            by_end,
            next: 0,
            best: None,
        }
    }

    /// The highest-token op that ended strictly before `t`, and how many ops
    /// ended before `t`. Calls must come with nondecreasing `t`.
    fn before(&mut self, t: u64) -> (Option<&'a Op>, usize) {
        while let Some(op) = self.by_end.get(self.next).copied() {
            if op.end_ns >= t {
                break;
            }
            if self.best.is_none_or(|b| op.token > b.token) {
                self.best = Some(op);
            }
            self.next += 1;
        }
        (self.best, self.next)
    }
}

/// The run's parameters, for the summary's first line (`run.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunInfo {
    /// Seconds the run lasted.
    pub seconds: f64,
    /// Worker processes.
    pub workers: u32,
    /// Resources they contend for.
    pub resources: u32,
    /// The seed.
    pub seed: u64,
    /// Three coordinator nodes instead of one.
    #[serde(default)]
    pub cluster: bool,
}

impl Report {
    /// The short summary printed at the end of a run.
    pub fn summary(&self, run: &RunInfo) -> String {
        let f = &self.figures;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "chaos: {:.1}s, {} workers, {} resources, {}, seed {}",
            run.seconds,
            run.workers,
            run.resources,
            if run.cluster {
                "3-node cluster"
            } else {
                "one coordinator"
            },
            run.seed
        );
        let _ = writeln!(
            s,
            "operations: {} (acquire {}, write {}, release {}); leases lost {} (gone {}, timed out {})",
            f.acquires + f.writes + f.releases,
            f.acquires,
            f.writes,
            f.releases,
            f.lost,
            f.lost_gone,
            f.lost_timed_out
        );
        let faults: Vec<String> = FaultKind::kinds(run.cluster)
            .iter()
            .map(|k| format!("{} ×{}", k.label(), f.faults.get(k.label()).unwrap_or(&0)))
            .collect();
        let _ = writeln!(s, "faults: {}", faults.join(", "));
        let bad = |p: Property| self.violations.iter().any(|v| v.property == p);
        let yes = |p: Property| if bad(p) { "NO" } else { "yes" };
        let _ = writeln!(
            s,
            "grants: {} (tokens unique: {}; increasing per resource: {}, {} ordered pairs); held {}, failed {}",
            f.grants,
            yes(Property::UniqueTokens),
            yes(Property::GrantOrder),
            f.ordered_grant_pairs_checked,
            f.held,
            f.acquires_failed
        );
        let _ = writeln!(
            s,
            "writes: accepted {}, rejected {} (stale), failed {} (store unreachable), skipped {} (lease no longer valid)",
            f.writes_accepted, f.writes_rejected, f.writes_failed, f.writes_skipped
        );
        let _ = writeln!(
            s,
            "superseded writes: {} (rejected {}, failed {}, accepted {}); rejections after an accepted newer write {}, after a concurrent one {}",
            f.superseded,
            f.superseded_rejected,
            f.superseded_failed,
            f.superseded - f.superseded_rejected - f.superseded_failed,
            f.rejections_after_accepted,
            f.rejections_concurrent
        );
        let gone = f
            .gone_max_valid_ms
            .map_or("none".to_owned(), |m| format!("{m:.1} ms"));
        let _ = writeln!(
            s,
            "no grant lost: {} (valid-lease checks {}, most validity left at a gone {})",
            yes(Property::NoGrantLost),
            f.valid_checks,
            gone
        );
        let _ = write!(s, "violations: {}", self.violations.len());
        s
    }

    /// Each violation with its slice of history: the operations involved,
    /// the other operations on the same resource around them, and the faults
    /// in that window, sorted by time.
    pub fn explain(&self, history: &History) -> String {
        let t0 = history.ops.iter().map(|o| o.start_ns).min().unwrap_or(0);
        let mut s = String::new();
        for v in &self.violations {
            let _ = writeln!(s, "VIOLATION of {}", v.property.statement());
            let _ = writeln!(s, "  {}", v.message);
            let lo = v.ops.iter().map(|o| o.start_ns).min().unwrap_or(0);
            let hi = v.ops.iter().map(|o| o.end_ns).max().unwrap_or(0);
            let resources: BTreeSet<&str> = v.ops.iter().map(|o| o.resource.as_str()).collect();
            let mut slice: Vec<(bool, &Op)> = history
                .ops
                .iter()
                .filter(|o| {
                    resources.contains(o.resource.as_str()) && o.end_ns >= lo && o.start_ns <= hi
                })
                .map(|o| (v.ops.contains(o), o))
                .collect();
            for o in &v.ops {
                if !slice.iter().any(|(_, x)| *x == o) {
                    slice.push((true, o));
                }
            }
            slice.sort_by_key(|(_, o)| (o.start_ns, o.end_ns));
            let _ = writeln!(
                s,
                "  history on {:?} from {} to {} (* = involved):",
                resources,
                Rel(lo, t0),
                Rel(hi, t0)
            );
            const MAX: usize = 40;
            for (involved, o) in slice.iter().take(MAX) {
                let mark = if *involved { '*' } else { ' ' };
                let _ = writeln!(s, "  {mark} {}", Line(o, t0));
            }
            if slice.len() > MAX {
                let _ = writeln!(s, "    … {} more", slice.len() - MAX);
            }
            for fault in history
                .faults
                .iter()
                .filter(|x| x.end_ns >= lo && x.start_ns <= hi)
            {
                let _ = writeln!(
                    s,
                    "    fault {}..{} {}: {}",
                    Rel(fault.start_ns, t0),
                    Rel(fault.end_ns, t0),
                    fault.kind.label(),
                    fault.detail
                );
            }
        }
        s
    }
}

/// A time relative to the start of the history, in seconds.
struct Rel(u64, u64);

impl fmt::Display for Rel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0 as i128 - self.1 as i128;
        write!(f, "{:+.3}s", d as f64 / 1e9)
    }
}

/// One operation, on one line.
struct Line<'a>(&'a Op, u64);

impl fmt::Display for Line<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (o, t0) = (self.0, self.1);
        write!(
            f,
            "{}..{} w{} {:?} {} token {} -> {:?}",
            Rel(o.start_ns, t0),
            Rel(o.end_ns, t0),
            o.worker,
            o.op,
            o.resource,
            o.token.map_or("-".to_owned(), |t| t.to_string()),
            o.result
        )?;
        if let Some(h) = o.highest {
            write!(f, " highest {h}")?;
        }
        if let Some(c) = o.check_ns {
            write!(f, " checked at {}", Rel(c, t0))?;
        }
        if let Some(v) = o.valid_ms {
            write!(f, " valid {v:.1} ms")?;
        }
        if let Some(d) = &o.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- the checker on hand-written histories -------------------------------

    /// An operation from `start` to `end` (ms), the other fields empty.
    fn op(
        worker: u32,
        kind: OpKind,
        token: Option<u64>,
        start: u64,
        end: u64,
        result: Outcome,
    ) -> Op {
        Op {
            worker,
            op: kind,
            resource: "r".into(),
            token,
            start_ns: start * 1_000_000,
            end_ns: end * 1_000_000,
            result,
            highest: None,
            check_ns: None,
            valid_ms: None,
            detail: None,
        }
    }

    fn grant(worker: u32, token: u64, start: u64, end: u64) -> Op {
        op(
            worker,
            OpKind::Acquire,
            Some(token),
            start,
            end,
            Outcome::Granted,
        )
    }

    /// A write checked valid (100 ms left) at `start`, sent at once.
    fn write(worker: u32, token: u64, start: u64, end: u64, result: Outcome) -> Op {
        let highest = match result {
            Outcome::Accepted => Some(token),
            _ => None,
        };
        Op {
            highest,
            check_ns: Some(start * 1_000_000),
            valid_ms: Some(100.0),
            ..op(worker, OpKind::Write, Some(token), start, end, result)
        }
    }

    /// A write the store rejected naming `named`; the worker had checked its
    /// lease at 40 ms, then paused.
    fn rejected(worker: u32, token: u64, start: u64, end: u64, named: Option<u64>) -> Op {
        Op {
            highest: named,
            check_ns: Some(40 * 1_000_000),
            ..write(worker, token, start, end, Outcome::Rejected)
        }
    }

    fn lost(worker: u32, token: u64, at: u64, result: Outcome, valid_ms: f64) -> Op {
        Op {
            valid_ms: Some(valid_ms),
            ..op(worker, OpKind::Lost, Some(token), at, at, result)
        }
    }

    /// Checks `ops` and asserts exactly the `expected` properties are violated
    /// (each at least once), and that the explanation shows the slice.
    fn check_case(name: &str, ops: Vec<Op>, expected: &[Property]) {
        let history = History {
            ops,
            faults: Vec::new(),
        };
        let report = check(&history, &FaultKind::ALL);
        let mut found: Vec<Property> = report.violations.iter().map(|v| v.property).collect();
        found.dedup();
        assert_eq!(found, expected, "{name}: {}", report.explain(&history));
        if !expected.is_empty() {
            let text = report.explain(&history);
            assert!(text.contains("VIOLATION of"), "{name}: {text}");
            assert!(text.contains("* "), "{name}: no involved ops shown: {text}");
        }
    }

    #[test]
    fn the_checker_reports_each_broken_property_and_accepts_sound_histories() {
        use Outcome::*;
        use Property::*;
        let cases: Vec<(&str, Vec<Op>, Vec<Property>)> = vec![
            (
                "a sound history: handover, fenced write, stale write rejected",
                vec![
                    grant(1, 5, 0, 10),
                    write(1, 5, 20, 30, Accepted),
                    grant(2, 6, 15, 2000),
                    write(2, 6, 2010, 2020, Accepted),
                    rejected(1, 5, 2100, 2110, Some(6)),
                    lost(1, 5, 1500, TimedOut, -12.0),
                ],
                vec![],
            ),
            (
                "overlapping operations are not ordered",
                vec![
                    grant(1, 9, 0, 100),
                    grant(2, 8, 50, 150),
                    write(1, 9, 120, 300, Accepted),
                    write(2, 8, 95, 310, Accepted),
                ],
                vec![],
            ),
            (
                "a token granted twice",
                vec![grant(1, 7, 0, 10), grant(2, 7, 5, 15)],
                vec![UniqueTokens],
            ),
            (
                "a grant acknowledged, then a lower token granted",
                vec![grant(1, 7, 0, 10), grant(2, 6, 20, 30)],
                vec![GrantOrder],
            ),
            (
                "the store accepted a lower token after a higher one",
                vec![write(1, 7, 0, 10, Accepted), write(2, 6, 20, 30, Accepted)],
                vec![StoreOrder, SupersededRejected],
            ),
            (
                "a rejection that names no higher token",
                vec![
                    write(1, 7, 0, 10, Accepted),
                    rejected(2, 6, 20, 30, Some(5)),
                ],
                vec![SupersededRejected],
            ),
            (
                "a rejection naming a token nobody offered",
                vec![rejected(2, 6, 20, 30, Some(9))],
                vec![SupersededRejected],
            ),
            (
                "a lease reported gone while still valid",
                vec![grant(1, 7, 0, 10), lost(1, 7, 500, Gone, 240.0)],
                vec![NoGrantLost],
            ),
            (
                "a holder found its lease valid after a newer grant",
                vec![
                    grant(1, 7, 0, 10),
                    grant(2, 8, 100, 200),
                    write(1, 7, 300, 310, Failed),
                ],
                vec![NoGrantLost],
            ),
        ];
        for (name, ops, expected) in cases {
            check_case(name, ops, &expected);
        }
    }

    #[test]
    fn the_summary_reports_the_figures() {
        use Outcome::*;
        let history = History {
            ops: vec![
                grant(1, 5, 0, 10),
                write(1, 5, 20, 30, Accepted),
                grant(2, 6, 15, 2000),
                write(2, 6, 2010, 2020, Accepted),
                rejected(1, 5, 2100, 2110, Some(6)),
            ],
            faults: Vec::new(),
        };
        let report = check(&history, &FaultKind::ALL);
        let run = RunInfo {
            seconds: 2.0,
            workers: 2,
            resources: 1,
            seed: 1,
            cluster: false,
        };
        let summary = report.summary(&run);
        assert!(
            summary.contains("grants: 2 (tokens unique: yes"),
            "{summary}"
        );
        assert!(
            summary.contains("writes: accepted 2, rejected 1"),
            "{summary}"
        );
        assert!(
            summary.contains("superseded writes: 1 (rejected 1"),
            "{summary}"
        );
        assert!(summary.ends_with("violations: 0"), "{summary}");
    }

    /// A revoke ends a lease under its holder on purpose: the same history that
    /// breaks "no grant lost" passes once the harness logged the revoke.
    #[test]
    fn a_revoked_lease_may_be_gone_while_valid() {
        use Outcome::*;
        let ops = vec![
            grant(1, 7, 0, 10),
            lost(1, 7, 500, Gone, 240.0),
            grant(2, 8, 100, 200),
            write(1, 7, 300, 310, Failed),
        ];
        let revoke = Fault {
            kind: FaultKind::Revoke,
            start_ns: 90 * 1_000_000,
            end_ns: 95 * 1_000_000,
            detail: "revoked r (token 7)".into(),
            revoked: Some(("r".into(), 7)),
        };
        let without = check(
            &History {
                ops: ops.clone(),
                faults: Vec::new(),
            },
            &FaultKind::ALL,
        );
        assert!(!without.violations.is_empty());
        let with = check(
            &History {
                ops,
                faults: vec![revoke],
            },
            &FaultKind::ALL,
        );
        assert!(with.violations.is_empty(), "{:?}", with.violations);
    }
}
