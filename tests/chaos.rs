//! The chaos run (`examples/chaos`) end to end. The checker's own tests, on
//! hand-written histories that break each property (so we know it can
//! fail), are unit tests of the example (`examples/chaos/check.rs`), which
//! `cargo test` runs because the example is declared with `test = true`.
//!
//! Two runs: one coordinator (32 s) and a three-node cluster (40 s), one
//! after the other. A test binary of its own: a run loads both cores, and
//! cargo runs test binaries one after another, so the timing-sensitive
//! tests in `tests/it` never share the machine with it.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The built `leasehold` binary.
fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_leasehold"))
}

// ---- the run itself -------------------------------------------------------

/// The chaos example's binary, built now. `cargo test` compiles the example
/// only as a test harness (it is declared `test = true` for the checker's unit
/// tests), so the runnable binary is built here; `--workspace` resolves
/// features the way `cargo test --workspace` did, so only the example links.
fn chaos_example() -> PathBuf {
    let status = Command::new(env!("CARGO"))
        .args(["build", "--workspace", "--example", "chaos"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo to build the chaos example");
    assert!(status.success(), "`cargo build --example chaos` failed");
    let path = binary()
        .parent()
        .expect("target dir")
        .join("examples")
        .join("chaos");
    assert!(
        path.exists(),
        "{} is missing after the build",
        path.display()
    );
    path
}

/// The chaos process and, through its process group, everything it started:
/// killed on drop, also when the test panics.
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        use rustix::process::{kill_process_group, Pid, Signal};
        if let Some(group) = Pid::from_raw(self.0.id() as i32) {
            let _ = kill_process_group(group, Signal::KILL);
        }
        let _ = self.0.wait();
    }
}

/// What a finished run left: its report and its files.
struct Run {
    seed: String,
    stdout: String,
    /// `summary.json`'s figures.
    figures: serde_json::Value,
    /// `faults.jsonl`, one JSON object per line.
    faults: String,
}

/// Both runs load both cores: one at a time, even though cargo runs the
/// tests of one binary in parallel.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the chaos example with `args` for `seconds`, and checks what every
/// run must show: exit 0, `violations: 0`, every fault kind of the mode
/// injected, grants made, writes accepted and stale writes rejected.
fn chaos_run(seconds: u64, args: &[&str]) -> Run {
    use std::os::unix::process::CommandExt;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("temp dir");
    let seed = std::env::var("LEASEHOLD_CHAOS_SEED").unwrap_or_else(|_| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        nanos.to_string()
    });
    let child = Command::new(chaos_example())
        .args([
            "--duration",
            &format!("{seconds}s"),
            "--workers",
            "4",
            "--resources",
            "2",
        ])
        .args(args)
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

    // Bounded: the run plus the wind-down, 60 s at most.
    let limit = Duration::from_secs(seconds + 60);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = group.0.try_wait().expect("wait for chaos") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the chaos run (seed {seed}) did not finish within {limit:?}"
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
    let figures = summary["figures"].clone();
    // The summary lists every fault kind of the mode, zeros included.
    let faults = figures["faults"].as_object().expect("figures.faults");
    assert!(faults.len() >= 6, "fault kinds missing: {faults:?}");
    for (kind, n) in faults {
        assert!(
            n.as_u64().unwrap_or(0) >= 1,
            "no {kind} injected (seed {seed}):\n{stdout}"
        );
    }
    let count = |name: &str| figures[name].as_u64().unwrap_or(0);
    assert!(count("grants") > 20, "too few grants:\n{stdout}");
    assert!(count("writes_accepted") > 0, "no write accepted:\n{stdout}");
    assert!(
        count("writes_rejected") > 0,
        "no stale write rejected, so the store's check went untested (seed {seed}):\n{stdout}"
    );
    let faults = std::fs::read_to_string(out.path().join("run/faults.jsonl")).expect("faults");
    Run {
        seed,
        stdout,
        figures,
        faults,
    }
}

#[test]
fn a_chaos_run_with_every_fault_keeps_every_property() {
    // 32 s: the first round of faults (seven, 1–3 s apart, a coordinator
    // pause of up to 2 s among them) always fits, so every kind is seen.
    let run = chaos_run(32, &[]);
    assert_eq!(
        run.figures["faults"].as_object().map(|f| f.len()),
        Some(6),
        "{}",
        run.stdout
    );
}

/// The cluster mode: three nodes, and kill -9, SIGSTOP and a
/// partition of any node, the leader first, with the same checker.
#[test]
fn a_chaos_run_against_a_cluster_keeps_every_property() {
    // 40 s: the first round (eight faults, 1–3 s apart, pauses of up to 2 s
    // and partitions of up to 3 s among them) always fits.
    let run = chaos_run(40, &["--cluster"]);
    let Run {
        seed,
        stdout,
        figures,
        faults,
    } = &run;
    assert!(
        figures["faults"].get("node partition").is_some(),
        "{stdout}"
    );
    // Each node-level fault struck the leader at least once: the harness
    // aims the first of each kind at it.
    for kind in ["coordinator_kill", "coordinator_pause", "partition"] {
        let at_leader = faults.lines().any(|line| {
            let f: serde_json::Value = serde_json::from_str(line).expect("a fault line");
            f["kind"] == kind && f["detail"].as_str().is_some_and(|d| d.contains("(leader)"))
        });
        assert!(
            at_leader,
            "no {kind} struck the leader (seed {seed}):\n{faults}"
        );
    }
}
