//! The coordinator's rules, each over real gRPC.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use leasehold::coordinator::Config;
use leasehold::proto::{self, acquire_response::Outcome};
use tonic::Code;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_strictly_increase_across_concurrent_grants() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for w in 0..16 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..20 {
                let l = grant(&mut c, acquire_req(&format!("w{w}/{i}"), "h", 1000)).await;
                seen.push(l.token);
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let seen = t.await.unwrap();
        // Each worker's grants come one after another: strictly increasing.
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
        all.extend(seen);
    }
    let unique: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "a token was granted twice");
    assert!(all.iter().all(|&t| t > 0));
}

#[tokio::test]
async fn one_live_lease_per_resource_and_held_says_by_whom() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "alice", 5000)).await;
    assert_eq!(a.lease_id.len(), 32);
    let h = held(&mut c, acquire_req("r", "bob", 5000)).await;
    assert_eq!(h.holder, "alice");
    assert_eq!(h.token, a.token);
    assert!(h.expires_in_ms > 4000 && h.expires_in_ms <= 5000);
    let d = describe(&mut c, "r").await;
    assert!(d.held);
    assert_eq!((d.holder.as_str(), d.token), ("alice", a.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_acquires_of_one_resource_grant_exactly_one() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for w in 0..16 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            c.acquire(acquire_req("contended", &format!("w{w}"), 5000))
                .await
                .unwrap()
                .into_inner()
                .outcome
        }));
    }
    let mut granted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some(Outcome::Lease(_)) => granted += 1,
            Some(Outcome::Held(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(granted, 1, "{granted} leases on one resource at once");
}

#[tokio::test]
async fn expiry_frees_the_resource_at_once() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "alice", 100)).await;
    pass_time(Duration::from_millis(120)).await;
    assert!(!describe(&mut c, "r").await.held);
    let b = grant(&mut c, acquire_req("r", "bob", 100)).await;
    assert!(b.token > a.token);
    let err = renew(&mut c, &a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn renew_keeps_the_token_and_keepalive_renews_many() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("a", "h", 200)).await;
    let b = grant(&mut c, acquire_req("b", "h", 200)).await;
    let r = c
        .renew(proto::RenewRequest {
            lease_id: a.lease_id.clone(),
            token: a.token,
            ttl_ms: 300,
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!((r.token, r.ttl_ms), (a.token, 300));

    // Keep both alive for well past their TTLs over one stream.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut responses = c
        .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for _ in 0..6 {
        for l in [&a, &b] {
            tx.send(proto::KeepAliveRequest {
                lease_id: l.lease_id.clone(),
                token: l.token,
            })
            .await
            .unwrap();
            let resp = responses.message().await.unwrap().unwrap();
            assert!(resp.alive, "{resp:?}");
            assert_eq!(resp.token, l.token);
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(describe(&mut c, "a").await.held);
    assert!(describe(&mut c, "b").await.held);
    // A wrong token on the stream is answered, not fatal to the stream.
    tx.send(proto::KeepAliveRequest {
        lease_id: a.lease_id.clone(),
        token: a.token + 1,
    })
    .await
    .unwrap();
    assert!(!responses.message().await.unwrap().unwrap().alive);
}

#[tokio::test]
async fn renew_and_release_need_the_right_token() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "h", 5000)).await;
    let renew = |lease_id: &str, token| proto::RenewRequest {
        lease_id: lease_id.into(),
        token,
        ttl_ms: 0,
    };
    let err = c.renew(renew(&a.lease_id, a.token + 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let unknown = "0".repeat(32);
    let err = c.renew(renew(&unknown, a.token)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let release = |lease_id: &str, token| proto::ReleaseRequest {
        lease_id: lease_id.into(),
        token,
    };
    let err = c
        .release(release(&a.lease_id, a.token + 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        describe(&mut c, "r").await.held,
        "a refused release changed state"
    );
    assert!(
        c.release(release(&a.lease_id, a.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert!(
        !c.release(release(&a.lease_id, a.token))
            .await
            .unwrap()
            .into_inner()
            .released
    );
    assert!(!describe(&mut c, "r").await.held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_served_first_come_first_served() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "a", 5000)).await;
    let mut waiters = Vec::new();
    for (i, name) in ["w1", "w2", "w3"].into_iter().enumerate() {
        let mut wc = server.client().await;
        let mut req = acquire_req("r", name, 5000);
        req.wait_ms = 10_000;
        waiters.push(tokio::spawn(async move { grant(&mut wc, req).await }));
        wait_for_waiters(&mut c, "r", i as u32 + 1).await;
    }
    let mut last = a.clone();
    release(&mut c, &a).await.unwrap();
    // Handed over inside the release, in the same durable write: the
    // resource is never seen free in between.
    let d = describe(&mut c, "r").await;
    assert!(d.held && d.holder == "w1", "{d:?}");
    for (w, name) in waiters.into_iter().zip(["w1", "w2", "w3"]) {
        let l = w.await.unwrap();
        assert_eq!(l.holder, name, "served out of order");
        assert!(l.token > last.token);
        release(&mut c, &l).await.unwrap();
        last = l;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_handed_the_lease_when_it_expires() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "a", 150)).await;
    let mut req = acquire_req("r", "w", 5000);
    req.wait_ms = 5000;
    let started = Instant::now();
    let w = grant(&mut c, req).await;
    assert!(w.token > a.token);
    // Handed over by the expiry timer, not after the whole wait.
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_waiter_leaves_the_queue_and_is_never_granted() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "a", 5000)).await;
    let mut wc = server.client().await;
    let mut req = acquire_req("r", "gone", 5000);
    req.wait_ms = 60_000;
    let waiter = tokio::spawn(async move { wc.acquire(req).await });
    wait_for_waiters(&mut c, "r", 1).await;
    waiter.abort(); // the caller goes away: its call is cancelled
    wait_for_waiters(&mut c, "r", 0).await;
    release(&mut c, &a).await.unwrap();
    assert!(
        !describe(&mut c, "r").await.held,
        "a lease went to a waiter that left"
    );

    // A wait that runs out reports the holder.
    let b = grant(&mut c, acquire_req("r", "b", 5000)).await;
    let mut req = acquire_req("r", "late", 5000);
    req.wait_ms = 100;
    let h = held(&mut c, req).await;
    assert_eq!((h.holder.as_str(), h.token), ("b", b.token));
    assert_eq!(describe(&mut c, "r").await.waiters, 0);
}

#[tokio::test]
async fn idempotent_retries_return_the_same_lease() {
    let mut server = TestServer::start().await;
    let mut c = server.client().await;
    let mut req = acquire_req("r", "h", 5000);
    req.request_id = "job-42-attempt".into();
    let a = grant(&mut c, req.clone()).await;
    let b = grant(&mut c, req.clone()).await;
    assert_eq!(
        (a.lease_id.as_str(), a.token),
        (b.lease_id.as_str(), b.token)
    );

    let mut other = req.clone();
    other.ttl_ms = 6000;
    let err = c.acquire(other).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("request_id"), "{}", err.message());
    // The retries made no token: the next grant anywhere is the very next one.
    let next = grant(&mut c, acquire_req("elsewhere", "h", 5000)).await;
    assert_eq!(next.token, a.token + 1);

    // Keys survive a restart.
    server.restart().await;
    let mut c = server.client().await;
    let again = grant(&mut c, req.clone()).await;
    assert_eq!(
        (again.lease_id.as_str(), again.token),
        (a.lease_id.as_str(), a.token)
    );

    release(&mut c, &a).await.unwrap();
    let err = c.acquire(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        !describe(&mut c, "r").await.held,
        "an ended key made a fresh grant"
    );
    // ...also after a restart.
    server.restart().await;
    let mut c = server.client().await;
    let err = c.acquire(req).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn leases_and_tokens_survive_a_restart_with_a_full_ttl() {
    let mut server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("kept", "h", 2000)).await;
    let gone = grant(&mut c, acquire_req("gone", "h", 2000)).await;
    release(&mut c, &gone).await.unwrap();
    pass_time(Duration::from_millis(300)).await;
    server.restart().await;
    let mut c = server.client().await;
    let d = describe(&mut c, "kept").await;
    assert!(d.held);
    assert_eq!(d.token, a.token);
    // Full TTL again from the restart, never less.
    assert!(
        d.expires_in_ms > 1900,
        "restored with {} ms left",
        d.expires_in_ms
    );
    assert!(!describe(&mut c, "gone").await.held);
    // The holder keeps renewing the same lease after the restart.
    let r = renew(&mut c, &a).await.unwrap();
    assert_eq!(r.lease.unwrap().token, a.token);
    let next = grant(&mut c, acquire_req("new", "h", 2000)).await;
    assert!(next.token > gone.token);
}

#[tokio::test]
async fn bad_input_is_refused_with_the_field_named_and_changes_nothing() {
    let server = TestServer::start_with(Config::default()).await;
    let mut c = server.client().await;
    let base = acquire_req("r", "h", 1000);
    let long = |n| "x".repeat(n);
    let with = |f: &dyn Fn(&mut proto::AcquireRequest)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(proto::AcquireRequest, &str)> = vec![
        (with(&|r| r.resource = String::new()), "resource"),
        (with(&|r| r.resource = long(513)), "resource"),
        (with(&|r| r.resource = "a\u{7}b".into()), "resource"),
        (with(&|r| r.holder = String::new()), "holder"),
        (with(&|r| r.holder = long(257)), "holder"),
        (with(&|r| r.request_id = long(129)), "request_id"),
        (with(&|r| r.ttl_ms = 99), "ttl_ms"),
        (with(&|r| r.ttl_ms = 3_600_001), "ttl_ms"),
        (with(&|r| r.wait_ms = 300_001), "wait_ms"),
    ];
    for (req, field) in cases {
        let resource = req.resource.clone();
        let err = c.acquire(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
        if resource == "r" {
            assert!(!describe(&mut c, "r").await.held, "{field}: state changed");
        }
    }
    let err = c
        .renew(proto::RenewRequest {
            lease_id: "nothex".into(),
            token: 1,
            ttl_ms: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("lease_id"));
    let err = c
        .describe(proto::DescribeRequest {
            resource: long(600),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Nothing was granted by any of it: the first real grant gets token 1.
    let l = grant(&mut c, base).await;
    assert_eq!(l.token, 1);
}

#[tokio::test]
async fn describe_never_reveals_the_lease_id() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "h", 1000)).await;
    let d = describe(&mut c, "r").await;
    let encoded = format!("{d:?}");
    assert!(!encoded.contains(&a.lease_id));
    let h = held(&mut c, acquire_req("r", "other", 1000)).await;
    assert!(!format!("{h:?}").contains(&a.lease_id));
}

#[tokio::test]
async fn health_and_reflection_answer() {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let server = TestServer::start().await;
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel.clone());
    let resp = health
        .check(HealthCheckRequest {
            service: "leasehold.v1.LeaseService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status, 1, "not SERVING");

    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"leasehold.v1.LeaseService".to_string()),
        "{names:?}"
    );
}

#[tokio::test]
async fn held_outcome_is_not_an_error() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    grant(&mut c, acquire_req("r", "a", 1000)).await;
    let resp = c
        .acquire(acquire_req("r", "b", 1000))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(resp.outcome, Some(Outcome::Held(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_grants_share_flushes() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for w in 0..4 {
        let c = server.client().await;
        for i in 0..32 {
            let mut c = c.clone();
            tasks.push(tokio::spawn(async move {
                grant(&mut c, acquire_req(&format!("g{w}/{i}"), "h", 5000)).await
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = server
        .admin()
        .await
        .stats(proto::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.grants, 128);
    // One flush per grant would mean no group commit at all.
    assert!(
        stats.commit_batches < stats.grants / 2,
        "{} batches for {} grants",
        stats.commit_batches,
        stats.grants
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_waiters_and_keeps_what_was_granted() {
    let mut server = TestServer::start().await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("r", "a", 60_000)).await;
    let mut wc = server.client().await;
    let mut req = acquire_req("r", "w", 60_000);
    req.wait_ms = 60_000;
    let waiter = tokio::spawn(async move { wc.acquire(req).await });
    wait_for_waiters(&mut c, "r", 1).await;

    // A graceful stop answers the waiter at once instead of leaving it
    // hanging for its minute, and finishes well within the test's bound.
    let started = Instant::now();
    server.stop().await;
    let answer = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .expect("the waiter was left hanging")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let status = answer.expect_err("a waiter cannot be granted by a stopping server");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // Everything acknowledged before the stop is still there.
    server.restart().await;
    let mut c = server.client().await;
    let d = describe(&mut c, "r").await;
    assert_eq!((d.held, d.token, d.waiters), (true, a.token, 0));
}
