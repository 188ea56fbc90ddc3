//! The worker's library and `leasehold acquire`, against real servers.

use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_client::{AcquireError, Client, LostReason, WithLeaseError};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_acquire_whose_reply_was_lost_yields_one_lease_and_one_token() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let client = Client::connect(proxy.url()).unwrap();
    client.describe("warm-up").await.unwrap();
    assert_eq!(proxy.connections.load(Ordering::SeqCst), 1);

    // The server grants, the reply never arrives, the connection drops.
    proxy.lose_replies_then_cut(Duration::from_millis(300));
    let lease = client
        .acquire("r")
        .ttl(Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        proxy.connections.load(Ordering::SeqCst) >= 2,
        "the acquire was never retried"
    );

    let mut direct = server.client().await;
    let d = describe(&mut direct, "r").await;
    assert_eq!(d.token, lease.token(), "the retry got a different lease");
    // Exactly one token was consumed by the two attempts.
    let next = grant(&mut direct, acquire_req("other", "h", 1000)).await;
    assert_eq!(next.token, lease.token() + 1);
    lease.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_renews_the_same_lease_across_a_server_restart() {
    let mut server = TestServer::start().await;
    let client = Client::connect(server.url()).unwrap();
    let lease = client
        .acquire("r")
        .ttl(Duration::from_millis(900))
        .await
        .unwrap();
    server.restart_same_port().await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(lease.is_valid(), "the lease was lost across the restart");
    let mut direct = server.client().await;
    let d = describe(&mut direct, "r").await;
    assert!(d.held);
    assert_eq!(d.token, lease.token());
    assert!(lease.release().await.unwrap());
    assert!(!describe(&mut direct, "r").await.held);
}

/// Every lease of a client is renewed over one KeepAlive stream, also
/// leases released and taken again meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_keepalive_stream_renews_every_lease_of_a_client() {
    let server = TestServer::start().await;
    let client = Client::connect(server.url()).unwrap();
    let mut leases = Vec::new();
    for i in 0..8 {
        let lease = client
            .acquire(format!("r{i}"))
            .ttl(Duration::from_millis(300))
            .await
            .unwrap();
        leases.push(lease);
    }
    // One released early: the others go on over the same stream.
    assert!(leases.remove(0).release().await.unwrap());
    // Three TTLs: every lease needed several renewals to live this long.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let mut direct = server.client().await;
    for lease in &leases {
        assert!(lease.is_valid(), "{} was lost", lease.resource());
        let d = describe(&mut direct, lease.resource()).await;
        assert!(d.held && d.token == lease.token(), "{d:?}");
    }
    assert!(!describe(&mut direct, "r0").await.held);
    assert_eq!(client.keepalive_streams_opened(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_server_makes_lost_fire_before_anyone_else_can_acquire() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(dir.path(), &[]);
    let client = Client::connect(server.url()).unwrap();
    let lease = client
        .acquire("r")
        .ttl(Duration::from_millis(1000))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await; // a renewal or two
    server.signal("STOP");
    let reason = tokio::time::timeout(Duration::from_secs(3), lease.lost()).await;
    server.signal("CONT");
    assert_eq!(reason.expect("lost() never fired"), LostReason::TimedOut);
    assert!(!lease.is_valid());
    // The moment the holder learned of the loss, the server still counted
    // the lease as live: nobody else could have been granted it yet.
    let mut direct = connect(&server.url()).await;
    let d = describe(&mut direct, "r").await;
    assert!(
        d.held,
        "the server expired the lease before the holder knew"
    );
    assert_eq!(d.token, lease.token());
    // Later the server expires it and the next holder gets a larger token.
    let mut req = acquire_req("r", "next", 1000);
    req.wait_ms = 3000;
    let next = grant(&mut direct, req).await;
    assert!(next.token > lease.token());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lease_cancels_the_work_when_the_lease_is_lost() {
    let mut server = TestServer::start().await;
    let client = Client::connect(server.url()).unwrap();
    let finished = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let done = finished.clone();
    let work = tokio::spawn(async move {
        client
            .acquire("r")
            .ttl(Duration::from_millis(500))
            .run(|lease| async move {
                let _ = started_tx.send(lease.token());
                tokio::time::sleep(Duration::from_secs(10)).await;
                done.store(true, Ordering::SeqCst);
            })
            .await
    });
    started_rx.await.unwrap();
    let started = Instant::now();
    server.stop().await; // no more renewals can be confirmed
    let result = tokio::time::timeout(Duration::from_secs(5), work)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            result,
            Err(WithLeaseError::Lost {
                reason: LostReason::TimedOut,
                ..
            })
        ),
        "{result:?}"
    );
    assert!(
        !finished.load(Ordering::SeqCst),
        "the work ran on after the loss"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_is_a_distinct_error_naming_the_holder() {
    let server = TestServer::start().await;
    let client = Client::connect(server.url()).unwrap();
    let a = client.acquire("r").holder("alice").await.unwrap();
    let err = client
        .acquire("r")
        .holder("bob")
        .wait(Duration::from_millis(100))
        .await
        .err()
        .expect("bob must not get the lease");
    match err {
        AcquireError::Held { holder, token, .. } => {
            assert_eq!((holder.as_str(), token), ("alice", a.token()));
        }
        other => panic!("{other:?}"),
    }
    drop(a); // released in the background
    let deadline = Instant::now() + Duration::from_secs(3);
    while client.describe("r").await.unwrap().held {
        assert!(Instant::now() < deadline, "drop did not release");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn leasehold(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run leasehold")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_acquire_exports_the_token_and_passes_the_exit_status_through() {
    let server = TestServer::start().await;
    let url = server.url();
    let out = tokio::task::spawn_blocking(move || {
        leasehold(&[
            "acquire",
            "job",
            "--server",
            &url,
            "--",
            "sh",
            "-c",
            "echo $LEASEHOLD_TOKEN $LEASEHOLD_RESOURCE ${#LEASEHOLD_LEASE_ID}; exit 7",
        ])
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 3, "{stdout:?}");
    assert!(fields[0].parse::<u64>().unwrap() > 0);
    assert_eq!(fields[1], "job");
    assert_eq!(fields[2], "32");
    let mut c = server.client().await;
    assert!(
        !describe(&mut c, "job").await.held,
        "the lease was not released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_cli_acquires_on_one_resource_never_overlap() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let script = format!(
        "echo S $(date +%s%N) >> {0}; sleep 0.3; echo E $(date +%s%N) >> {0}",
        log.display()
    );
    let mut runs = Vec::new();
    for _ in 0..2 {
        let (url, script) = (server.url(), script.clone());
        runs.push(tokio::task::spawn_blocking(move || {
            leasehold(&[
                "acquire", "shared", "--server", &url, "--wait", "10s", "--", "sh", "-c", &script,
            ])
        }));
    }
    for r in runs {
        let out = r.await.unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let events: Vec<(String, u128)> = text
        .lines()
        .map(|l| {
            let (kind, t) = l.split_once(' ').unwrap();
            (kind.to_owned(), t.parse().unwrap())
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["S", "E", "S", "E"],
        "the commands overlapped: {text}"
    );
    assert!(events.windows(2).all(|w| w[0].1 <= w[1].1), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_acquire_exit_codes_for_busy_unreachable_and_print_mode() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    grant(&mut c, acquire_req("taken", "someone", 5000)).await;
    let url = server.url();
    let (busy, unreachable, printed) = tokio::task::spawn_blocking(move || {
        (
            leasehold(&["acquire", "taken", "--server", &url, "--", "true"]),
            leasehold(&[
                "acquire",
                "x",
                "--server",
                "http://127.0.0.1:1",
                "--retry-for",
                "300ms",
                "--",
                "true",
            ]),
            leasehold(&["acquire", "free", "--server", &url, "--ttl", "5s", "--json"]),
        )
    })
    .await
    .unwrap();
    assert_eq!(busy.status.code(), Some(75));
    assert!(String::from_utf8_lossy(&busy.stderr).contains("someone"));
    assert_eq!(unreachable.status.code(), Some(69));
    assert_eq!(printed.status.code(), Some(0));
    let json: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(json["resource"], "free");
    assert_eq!(json["lease_id"].as_str().unwrap().len(), 32);
    // Print mode leaves the lease to run out its TTL.
    let d = describe(&mut c, "free").await;
    assert!(d.held);
    assert_eq!(Some(d.token), json["token"].as_u64());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_acquire_stops_the_command_when_the_lease_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::spawn(dir.path(), &[]);
    let url = server.url();
    let mut child = std::process::Command::new(binary())
        .args([
            "acquire",
            "job",
            "--server",
            &url,
            "--ttl",
            "600ms",
            "--kill-after",
            "1s",
            "--",
            "sleep",
            "30",
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let mut c = connect(&url).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !describe(&mut c, "job").await.held {
        assert!(Instant::now() < deadline, "never acquired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.signal("STOP");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "leasehold acquire did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    server.signal("CONT");
    assert_eq!(status.code(), Some(71));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_not_retried() {
    use leasehold_client::ClientError;
    let server = TestServer::start().await;
    let client = Client::connect(server.url()).unwrap();
    let started = Instant::now();
    let err = client
        .acquire("r")
        .ttl(Duration::from_millis(1)) // below the server's minimum TTL
        .await
        .err()
        .expect("a 1 ms TTL must be refused");
    match err {
        AcquireError::Client(ClientError::Refused(status)) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains("ttl_ms"));
        }
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a refusal was retried"
    );
}

/// Found by the chaos run: validity counts from when the Acquire was sent,
/// so a grant that waited in line longer than its TTL arrived already
/// invalid and was reported lost at once. The client now confirms such a
/// grant with one Renew before returning it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_granted_after_waiting_longer_than_its_ttl_is_valid() {
    let server = TestServer::start().await;
    let mut direct = server.client().await;
    // Someone holds the resource for 1 s and never renews.
    grant(&mut direct, acquire_req("r", "other", 1000)).await;

    let client = Client::connect(server.url()).unwrap();
    let started = Instant::now();
    let lease = client
        .acquire("r")
        .ttl(Duration::from_millis(300))
        .wait(Duration::from_secs(5))
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800),
        "granted after {waited:?}"
    );
    assert!(
        lease.is_valid(),
        "granted after waiting {waited:?}, but already invalid"
    );
    // And it stays valid: the keepalive renews it.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(lease.is_valid(), "lost after the wait");
    assert_eq!(describe(&mut direct, "r").await.token, lease.token());
    assert!(lease.release().await.unwrap());
}
