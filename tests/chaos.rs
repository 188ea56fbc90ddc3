//! The chaos run (`examples/chaos`) end to end, and its checker on
//! hand-written histories that break each property, so we know the checker
//! can fail.
//!
//! A test binary of its own: the run loads both cores for ~25 s, and cargo
//! runs test binaries one after another, so the timing-sensitive tests in
//! `tests/it` never share the machine with it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The built `leasehold` binary.
fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_leasehold"))
}

#[path = "../examples/chaos/check.rs"]
#[allow(dead_code)]
mod check;

use check::{History, Op, OpKind, Outcome, Property};

// ---- the checker on hand-written histories -------------------------------

/// An operation from `start` to `end` (ms), the other fields empty.
fn op(worker: u32, kind: OpKind, token: Option<u64>, start: u64, end: u64, result: Outcome) -> Op {
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
    let report = check::check(&history);
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
    let report = check::check(&history);
    let run = check::RunInfo {
        seconds: 2.0,
        workers: 2,
        resources: 1,
        seed: 1,
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

// ---- the run itself -------------------------------------------------------

fn chaos_example() -> PathBuf {
    let path = binary()
        .parent()
        .expect("target dir")
        .join("examples")
        .join("chaos");
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --examples`",
        path.display()
    );
    path
}

/// The chaos process and, through its process group, everything it started:
/// killed on drop, also when the test panics.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        use nix::sys::signal::{killpg, Signal};
        use nix::unistd::Pid;
        let _ = killpg(Pid::from_raw(self.0.id() as i32), Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

#[test]
fn a_chaos_run_with_every_fault_keeps_every_property() {
    use std::os::unix::process::CommandExt;
    let out = tempfile::tempdir().expect("temp dir");
    let seed = std::env::var("LEASEHOLD_CHAOS_SEED").unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        nanos.to_string()
    });
    let child = Command::new(chaos_example())
        // 32 s: the first round of faults (seven, 1–3 s apart, a coordinator
        // pause of up to 2 s among them) always fits, so every kind is seen.
        .args(["--duration", "32s", "--workers", "4", "--resources", "2"])
        .args(["--seed", &seed])
        .arg("--out")
        .arg(out.path().join("run"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn the chaos example");
    let mut group = Group(child);
    // Read stdout while the run goes on: a long report must not block it.
    let mut pipe = group.0.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut pipe, &mut text);
        text
    });

    // Bounded: 32 s of run plus the wind-down; 90 s at most.
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = group.0.try_wait().expect("wait for chaos") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the chaos run (seed {seed}) did not finish within 90 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let stdout = reader.join().expect("the stdout reader panicked");
    println!("{stdout}");
    assert!(
        status.success(),
        "chaos run failed (seed {seed}):\n{stdout}"
    );
    assert!(stdout.contains("\nviolations: 0\n"), "{stdout}");

    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("run/summary.json")).expect("summary.json"),
    )
    .expect("summary.json is JSON");
    let figures = &summary["figures"];
    for kind in check::FaultKind::ALL {
        let n = figures["faults"][kind.label()].as_u64().unwrap_or(0);
        assert!(
            n >= 1,
            "no {} injected (seed {seed}):\n{stdout}",
            kind.label()
        );
    }
    let count = |name: &str| figures[name].as_u64().unwrap_or(0);
    assert!(count("grants") > 20, "too few grants:\n{stdout}");
    assert!(count("writes_accepted") > 0, "no write accepted:\n{stdout}");
    assert!(
        count("writes_rejected") > 0,
        "no stale write rejected, so the store's check went untested (seed {seed}):\n{stdout}"
    );
}

/// A revoke ends a lease under its holder on purpose: the same history that
/// breaks "no grant lost" passes once the harness logged the revoke.
#[test]
fn a_revoked_lease_may_be_gone_while_valid() {
    use check::{Fault, FaultKind};
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
    let without = check::check(&History {
        ops: ops.clone(),
        faults: Vec::new(),
    });
    assert!(!without.violations.is_empty());
    let with = check::check(&History {
        ops,
        faults: vec![revoke],
    });
    assert!(with.violations.is_empty(), "{:?}", with.violations);
}
