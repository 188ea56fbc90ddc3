//! The chaos run (`examples/chaos`) end to end. The checker's own tests, on
//! hand-written histories that break each property (so we know it can
//! fail), are unit tests of the example (`examples/chaos/check.rs`), which
//! `cargo test` runs because the example is declared with `test = true`.
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
        use rustix::process::{kill_process_group, Pid, Signal};
        if let Some(group) = Pid::from_raw(self.0.id() as i32) {
            let _ = kill_process_group(group, Signal::KILL);
        }
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
    // The summary lists every fault kind the harness knows, zeros included.
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
}
