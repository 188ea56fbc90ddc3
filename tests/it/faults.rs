//! Resource faults: a full disk, and damaged data directories at start.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use leasehold::proto::acquire_response::Outcome;
use tonic::Code;

use crate::support::*;

/// A small tmpfs, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().expect("temp dir").keep();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Fills the filesystem holding `dir` until it has no space left.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let block = vec![0u8; 64 * 1024];
    for _ in 0..100_000 {
        if f.write_all(&block).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_unavailable_and_the_server_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount("8m") else {
        // Mounting needs root (CI and the dev machines run as root).
        eprintln!("SKIPPED: cannot mount a tmpfs here");
        return;
    };
    let data = fs.0.join("data");
    let mut server = ServerProcess::spawn(&data, &[]);
    let mut c = connect(&server.url()).await;
    let mut acknowledged = Vec::new();
    for i in 0..3 {
        acknowledged.push(grant(&mut c, acquire_req(&format!("before/{i}"), "h", 60_000)).await);
    }

    let filler = fill(&fs.0);
    let mut unavailable = 0;
    let mut failed = Vec::new();
    for i in 0..40 {
        match c
            .acquire(acquire_req(&format!("full/{i}"), "h", 60_000))
            .await
        {
            Ok(r) => match r.into_inner().outcome {
                Some(Outcome::Lease(l)) => acknowledged.push(l),
                other => panic!("unexpected {other:?}"),
            },
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                failed.push(format!("full/{i}"));
                unavailable += 1;
            }
        }
    }
    assert!(unavailable > 0, "a full disk never made a grant fail");
    // A grant that failed was taken back: nobody holds it.
    for resource in &failed {
        assert!(
            !describe(&mut c, resource).await.held,
            "{resource} failed but is held"
        );
    }

    // Space returns: grants work again without a restart.
    std::fs::remove_file(filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let recovered = loop {
        match c.acquire(acquire_req("after", "h", 60_000)).await {
            Ok(r) => match r.into_inner().outcome {
                Some(Outcome::Lease(l)) => break l,
                other => panic!("unexpected {other:?}"),
            },
            Err(status) => assert_eq!(status.code(), Code::Unavailable),
        }
        assert!(Instant::now() < deadline, "the server did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    acknowledged.push(recovered);

    // Every acknowledged grant is on disk; no token was handed out twice.
    server.signal("TERM");
    assert!(server.child.wait().unwrap().success());
    let server = ServerProcess::spawn(&data, &[]);
    let mut c = connect(&server.url()).await;
    for resource in &failed {
        assert!(
            !describe(&mut c, resource).await.held,
            "{resource} failed but is held after a restart"
        );
    }
    let mut highest = 0;
    for l in &acknowledged {
        let d = describe(&mut c, &l.resource).await;
        assert!(d.held, "{} was acknowledged but lost", l.resource);
        assert_eq!(d.token, l.token);
        highest = highest.max(l.token);
    }
    let next = grant(&mut c, acquire_req("next", "h", 1000)).await;
    assert!(next.token > highest);
}

/// Starts `leasehold serve` on `data`; returns `Ok(())` if it came up (and
/// stops it), or its stderr if it exited.
fn try_start(data: &Path) -> Result<(), String> {
    let mut child = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut line);
    if line.starts_with("listening on") {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(());
    }
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    let status = child.wait().expect("wait");
    assert!(!status.success());
    assert!(
        !stderr.contains("panicked"),
        "a damaged data dir made it panic: {stderr}"
    );
    Err(stderr)
}

/// Runs a server on `data`, takes a few tokens, stops it; returns the highest.
async fn used_dir(data: &Path) -> u64 {
    let server = ServerProcess::spawn(data, &[]);
    let mut c = connect(&server.url()).await;
    let mut highest = 0;
    for i in 0..5 {
        highest = grant(&mut c, acquire_req(&format!("r{i}"), "h", 60_000))
            .await
            .token;
    }
    server.signal("TERM");
    let mut server = server;
    assert!(server.child.wait().unwrap().success());
    highest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_token_reservation_is_a_clear_error_not_a_reset() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    used_dir(&data).await;
    let tokens = data.join("tokens");

    std::fs::write(&tokens, b"garbage").unwrap(); // truncated
    let err = try_start(&data).expect_err("started on a truncated reservation");
    assert!(err.contains("damaged") && err.contains("tokens"), "{err}");

    std::fs::write(&tokens, [0xAB; 16]).unwrap(); // fails its check
    let err = try_start(&data).expect_err("started on a corrupt reservation");
    assert!(err.contains("check"), "{err}");

    std::fs::remove_file(&tokens).unwrap(); // missing next to a database
    let err = try_start(&data).expect_err("started without its reservation");
    assert!(err.contains("missing"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_database_never_resets_the_token_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let highest = used_dir(&data).await;

    // Scribble over the middle of sled's log. sled either refuses the
    // directory (a clear error) or recovers a prefix; either way the
    // reservation keeps tokens above everything handed out.
    let log = data.join("db").join("db");
    let mut bytes = std::fs::read(&log).unwrap();
    let mid = bytes.len() / 2;
    for b in bytes.iter_mut().skip(mid).take(256) {
        *b ^= 0x5A;
    }
    std::fs::write(&log, bytes).unwrap();
    match try_start(&data) {
        Err(stderr) => assert!(stderr.contains("db"), "{stderr}"),
        Ok(()) => {
            let server = ServerProcess::spawn(&data, &[]);
            let mut c = connect(&server.url()).await;
            let next = grant(&mut c, acquire_req("next", "h", 1000)).await;
            assert!(
                next.token > highest,
                "token {} after damage, {highest} before",
                next.token
            );
        }
    }

    // The whole database gone, and then the log too: the server starts, and
    // tokens still continue above the reservation.
    for gone in ["db", "wal"] {
        std::fs::remove_dir_all(data.join(gone)).unwrap();
        try_start(&data).unwrap_or_else(|e| panic!("no start without {gone}/: {e}"));
        let server = ServerProcess::spawn(&data, &[]);
        let mut c = connect(&server.url()).await;
        let next = grant(
            &mut c,
            acquire_req(&format!("next-without-{gone}"), "h", 1000),
        )
        .await;
        assert!(next.token > highest, "token {} without {gone}/", next.token);
    }

    // A data directory that is a file: a clear error.
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let err = try_start(&file).expect_err("started on a file");
    assert!(err.contains("not-a-dir"), "{err}");
}
