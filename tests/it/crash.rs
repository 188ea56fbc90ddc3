//! Crash tests: the built binary, `kill -9`, and a modelled machine crash.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use leasehold::proto::acquire_response::Outcome;

use crate::support::*;

/// Takes tokens on many connections until the server dies; returns the
/// highest token any client saw and every resource granted.
async fn take_tokens_until_killed(server: &mut ServerProcess, prefix: &str) -> (u64, Vec<String>) {
    let seen = Arc::new(AtomicU64::new(0));
    let granted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..8 {
        let mut c = connect(&server.url()).await;
        let seen = seen.clone();
        let granted = granted.clone();
        let prefix = prefix.to_owned();
        tasks.push(tokio::spawn(async move {
            // Bounded: at most 10,000 acquires per worker, or until the server dies.
            for i in 0..10_000 {
                match c
                    .acquire(acquire_req(&format!("{prefix}/{w}/{i}"), "h", 60_000))
                    .await
                {
                    Ok(r) => {
                        if let Some(Outcome::Lease(l)) = r.into_inner().outcome {
                            seen.fetch_max(l.token, Ordering::SeqCst);
                            granted.lock().unwrap().push(l.resource);
                        }
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    // Let grants flow, then kill mid-stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.load(Ordering::SeqCst) < 300 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill9();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let granted = std::mem::take(&mut *granted.lock().unwrap());
    (seen.load(Ordering::SeqCst), granted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_never_go_backwards_after_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::spawn(dir.path(), &[]);
    let (max_seen, granted) = take_tokens_until_killed(&mut server, "a").await;
    assert!(max_seen >= 300, "only {max_seen} tokens before the kill");

    let server = ServerProcess::spawn(dir.path(), &[]);
    let mut c = connect(&server.url()).await;
    let l = grant(&mut c, acquire_req("after", "h", 1000)).await;
    assert!(
        l.token > max_seen,
        "token {} after a crash, but {max_seen} was seen before",
        l.token
    );
    // The restart skips at most one reservation block (plus the few grants
    // that were in flight, never acknowledged, when it died).
    assert!(
        l.token <= max_seen + leasehold::store::RESERVATION_BLOCK + 64,
        "token {} after a crash skipped too far past {max_seen}",
        l.token
    );
    // Every acknowledged lease was restored.
    for resource in &granted {
        assert!(describe(&mut c, resource).await.held, "lost {resource}");
    }
}

/// A machine crash keeps only what was fsynced: the token reservation, the
/// write-ahead log, and sled as of its last checkpoint (sled's `flush()`
/// alone does not fsync). Model the worst case: the database rolls back to
/// its state at the last checkpoint (the clean stop). Every acknowledged
/// grant, release and revoke must come back from the log, and tokens
/// continue above every token handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_leases_and_tokens_survive_a_modelled_machine_crash() {
    let dir = tempfile::tempdir().unwrap();
    let old = tempfile::tempdir().unwrap();
    {
        let server = ServerProcess::spawn(dir.path(), &[]);
        let mut c = connect(&server.url()).await;
        grant(&mut c, acquire_req("first", "h", 60_000)).await;
        server.signal("TERM");
        let mut server = server;
        let status = server.child.wait().unwrap();
        assert!(status.success(), "SIGTERM should exit 0, got {status}");
    }
    copy_dir(&dir.path().join("db"), &old.path().join("db"));

    let mut server = ServerProcess::spawn(dir.path(), &[]);
    {
        // Ends that only the log knows of: "first" is held in the old
        // database copy.
        let mut c = connect(&server.url()).await;
        let first = describe(&mut c, "first").await;
        assert!(first.held);
        let mut admin = admin_client(&server.url(), None).await;
        admin
            .revoke(leasehold::proto::RevokeRequest {
                resource: "first".into(),
                lease_id: String::new(),
                token: first.token,
            })
            .await
            .unwrap();
        let released = grant(&mut c, acquire_req("released", "h", 60_000)).await;
        assert!(release(&mut c, &released).await.unwrap());
    }
    let (max_seen, granted) = take_tokens_until_killed(&mut server, "b").await;
    assert!(max_seen >= 300);

    // The "machine crash": every database write since the checkpoint is lost.
    std::fs::remove_dir_all(dir.path().join("db")).unwrap();
    copy_dir(&old.path().join("db"), &dir.path().join("db"));

    let server = ServerProcess::spawn(dir.path(), &[]);
    let mut c = connect(&server.url()).await;
    let l = grant(&mut c, acquire_req("after", "h", 1000)).await;
    assert!(
        l.token > max_seen,
        "token {} after a machine crash, but {max_seen} was seen",
        l.token
    );
    // Every acknowledged revoke, release and grant came back from the log.
    assert!(!describe(&mut c, "first").await.held, "a revoke was lost");
    assert!(
        !describe(&mut c, "released").await.held,
        "a release was lost"
    );
    for resource in &granted {
        assert!(describe(&mut c, resource).await.held, "lost {resource}");
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
