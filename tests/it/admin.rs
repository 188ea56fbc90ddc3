//! The admin API over real gRPC: each RPC, pagination under change, revoke,
//! watch, history, the admin token, and each abuse limit.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use leasehold::auth::AdminToken;
use leasehold::coordinator::Config;
use leasehold::proto::{self, EndKind, EventKind};
use leasehold::server::{ServerConfig, TransportLimits};
use leasehold::state;
use leasehold::store::StoreOptions;
use tonic::Code;

use crate::support::*;

fn list_req(prefix: &str, page_size: u32, page_token: &str) -> proto::ListLeasesRequest {
    proto::ListLeasesRequest {
        prefix: prefix.into(),
        page_size,
        page_token: page_token.into(),
    }
}

fn revoke_req(resource: &str, token: u64) -> proto::RevokeRequest {
    proto::RevokeRequest {
        resource: resource.into(),
        lease_id: String::new(),
        token,
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn list_shows_the_details_of_live_leases() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut admin = server.admin().await;
    let before = now_ms();
    let a = grant(&mut c, acquire_req("jobs/a", "alice", 5000)).await;
    grant(&mut c, acquire_req("other", "bob", 5000)).await;
    renew(&mut c, &a).await.unwrap();
    // A waiter in line shows up in the count.
    let mut w = server.client().await;
    let mut waiting = acquire_req("jobs/a", "carol", 5000);
    waiting.wait_ms = 2000;
    let waiter = tokio::spawn(async move { w.acquire(waiting).await });
    for _ in 0..100 {
        if describe(&mut c, "jobs/a").await.waiters == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let page = admin
        .list_leases(list_req("jobs/", 0, ""))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.next_page_token, "");
    let [l] = &page.leases[..] else {
        panic!("expected one lease, got {:?}", page.leases)
    };
    assert_eq!(
        (l.resource.as_str(), l.holder.as_str(), l.token, l.ttl_ms),
        ("jobs/a", "alice", a.token, 5000)
    );
    assert!(l.expires_in_ms > 4000 && l.expires_in_ms <= 5000);
    assert!(l.acquired_at_unix_ms >= before && l.acquired_at_unix_ms <= now_ms());
    assert_eq!((l.renew_count, l.waiters), (1, 1));
    // Operators never see lease ids.
    assert!(!format!("{page:?}").contains(&a.lease_id));
    let all = admin.list_leases(list_req("", 0, "")).await.unwrap();
    assert_eq!(all.into_inner().leases.len(), 2);
    waiter.abort();
}

#[tokio::test]
async fn pagination_is_stable_while_leases_change() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut admin = server.admin().await;
    let mut ids = std::collections::HashMap::new();
    for i in 0..25 {
        let name = format!("p/{i:02}");
        let l = grant(&mut c, acquire_req(&name, "h", 10_000)).await;
        ids.insert(name, l);
    }
    grant(&mut c, acquire_req("q/outside", "h", 10_000)).await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_leases(list_req("p/", 10, &token))
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(pages <= 5, "pagination does not end");
        seen.extend(page.leases.iter().map(|l| l.resource.clone()));
        if pages == 1 {
            // Between pages: release one already listed, one not yet listed,
            // and add one behind the cursor and one ahead of it.
            for name in ["p/03", "p/17"] {
                let l = &ids[name];
                release(&mut c, l).await.unwrap();
            }
            grant(&mut c, acquire_req("p/00a", "h", 10_000)).await;
            grant(&mut c, acquire_req("p/20a", "h", 10_000)).await;
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    // Strictly increasing: nothing listed twice, nothing out of order.
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    // Every lease live throughout was listed; the one released ahead of the
    // cursor was not, and the one added ahead of it was.
    for i in 0..25 {
        let name = format!("p/{i:02}");
        assert_eq!(seen.contains(&name), name != "p/17", "{name}: {seen:?}");
    }
    assert!(seen.contains(&"p/20a".to_owned()));
    assert!(!seen.contains(&"p/00a".to_owned()));
    assert!(!seen.iter().any(|r| r.starts_with("q/")));
    assert_eq!(pages, 3);
}

#[tokio::test]
async fn revoke_frees_at_once_and_the_holder_gets_not_found() {
    let mut server = TestServer::start().await;
    let mut c = server.client().await;
    let mut admin = server.admin().await;
    let a = grant(&mut c, acquire_req("r", "alice", 10_000)).await;
    // A guard that does not match revokes nothing.
    let wrong = admin
        .revoke(revoke_req("r", a.token + 100))
        .await
        .unwrap()
        .into_inner();
    assert!(!wrong.revoked);
    assert!(describe(&mut c, "r").await.held);
    let done = admin
        .revoke(revoke_req("r", a.token))
        .await
        .unwrap()
        .into_inner();
    assert!(done.revoked);
    let info = done.lease.unwrap();
    assert_eq!((info.holder.as_str(), info.token), ("alice", a.token));
    assert!(!describe(&mut c, "r").await.held);
    let err = renew(&mut c, &a).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // Revoking a free resource is harmless.
    assert!(
        !admin
            .revoke(revoke_req("r", 0))
            .await
            .unwrap()
            .into_inner()
            .revoked
    );
    let b = grant(&mut c, acquire_req("r", "bob", 10_000)).await;
    assert!(b.token > a.token);
    // The revoke is durable: history says so after a restart.
    server.restart().await;
    let mut admin = server.admin().await;
    let grants = admin
        .history(proto::HistoryRequest {
            resource: "r".into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .grants;
    assert_eq!(grants.len(), 2);
    assert_eq!(grants[1].token, a.token);
    assert_eq!(grants[1].ended(), EndKind::Revoked);
    // Revoke by lease id works too; a malformed one is refused.
    let mut c = server.client().await;
    let err = admin
        .revoke(proto::RevokeRequest {
            resource: "r".into(),
            lease_id: "not-an-id".into(),
            token: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let by_id = admin
        .revoke(proto::RevokeRequest {
            resource: "r".into(),
            lease_id: b.lease_id.clone(),
            token: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(by_id.revoked);
    assert!(!describe(&mut c, "r").await.held);
}

async fn next_event(stream: &mut tonic::Streaming<proto::LeaseEvent>) -> proto::LeaseEvent {
    tokio::time::timeout(Duration::from_secs(2), stream.message())
        .await
        .expect("no event within 2 s")
        .expect("watch failed")
        .expect("watch ended")
}

#[tokio::test]
async fn watch_sees_acquire_release_expire_revoke_in_order() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut admin = server.admin().await;
    let mut watch = admin
        .watch(proto::WatchRequest {
            prefix: "w/".into(),
            include_renewals: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut renewals = admin
        .watch(proto::WatchRequest {
            prefix: "w/".into(),
            include_renewals: true,
        })
        .await
        .unwrap()
        .into_inner();
    grant(&mut c, acquire_req("elsewhere", "x", 10_000)).await;
    let a = grant(&mut c, acquire_req("w/a", "alice", 10_000)).await;
    renew(&mut c, &a).await.unwrap();
    release(&mut c, &a).await.unwrap();
    let b = grant(&mut c, acquire_req("w/b", "bob", 10_000)).await;
    admin.revoke(revoke_req("w/b", b.token)).await.unwrap();
    let e = grant(&mut c, acquire_req("w/e", "eve", 100)).await;
    let want = [
        (EventKind::Acquired, "w/a", a.token),
        (EventKind::Released, "w/a", a.token),
        (EventKind::Acquired, "w/b", b.token),
        (EventKind::Revoked, "w/b", b.token),
        (EventKind::Acquired, "w/e", e.token),
        (EventKind::Expired, "w/e", e.token),
    ];
    let mut last = 0;
    for (kind, resource, token) in want {
        let ev = next_event(&mut watch).await;
        let lease = ev.lease.clone().unwrap();
        assert_eq!(
            (ev.kind(), lease.resource.as_str(), lease.token),
            (kind, resource, token),
            "{ev:?}"
        );
        assert!(
            ev.sequence > last,
            "sequence went from {last} to {}",
            ev.sequence
        );
        last = ev.sequence;
    }
    let first = next_event(&mut renewals).await;
    let second = next_event(&mut renewals).await;
    assert_eq!(
        (first.kind(), second.kind()),
        (EventKind::Acquired, EventKind::Renewed)
    );
    assert!(!format!("{first:?}{second:?}").contains(&a.lease_id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_is_dropped_and_never_stalls_the_coordinator() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // Long names make big events, so the transport's buffers fill sooner.
    let hot = "hot/".repeat(100);
    let l = grant(&mut c, acquire_req(&hot, "h", 60_000)).await;
    // This watcher never reads until the end, on a connection with a small window.
    let conn = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(16 * 1024)
        .initial_connection_window_size(16 * 1024)
        .connect()
        .await
        .unwrap();
    let mut slow = admin_over(conn, None)
        .watch(proto::WatchRequest {
            prefix: String::new(),
            include_renewals: true,
        })
        .await
        .unwrap()
        .into_inner();
    // Renewals over one keepalive stream: fast, and each one is an event.
    let n = 12_000;
    let msg = proto::KeepAliveRequest {
        lease_id: l.lease_id.clone(),
        token: l.token,
    };
    let requests = tokio_stream::iter(std::iter::repeat_n(msg, n));
    let mut replies = c.keep_alive(requests).await.unwrap().into_inner();
    let mut alive = 0;
    while let Some(r) = replies.next().await {
        if r.unwrap().alive {
            alive += 1;
        }
    }
    assert_eq!(alive, n);
    // The coordinator is not held up by the watcher.
    let started = Instant::now();
    grant(&mut c, acquire_req("after", "h", 1000)).await;
    assert!(started.elapsed() < Duration::from_millis(500));
    // The watcher gets what was buffered, then a clear status.
    let mut received = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(2), slow.message())
            .await
            .expect("watcher stuck")
        {
            Ok(Some(_)) => received += 1,
            Ok(None) => panic!("watch ended without a status after {received} events"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("fell behind by"), "{status:?}");
    assert!(status.message().contains("watch again"), "{status:?}");
    assert!(received < n, "received {received}");
}

#[tokio::test]
async fn history_is_kept_per_resource_bounded_and_durable() {
    let config = Config {
        store: StoreOptions {
            history_per_resource: 3,
            ..StoreOptions::default()
        },
        ..Config::default()
    };
    let mut server = TestServer::start_with(config).await;
    let mut c = server.client().await;
    let mut tokens = Vec::new();
    for i in 0..5 {
        let ttl = if i == 3 { 100 } else { 10_000 };
        let l = grant(&mut c, acquire_req("h", &format!("w{i}"), ttl)).await;
        tokens.push(l.token);
        if i < 3 {
            release(&mut c, &l).await.unwrap();
        } else if i == 3 {
            pass_time(Duration::from_millis(120)).await;
        }
    }
    server.restart().await;
    let mut admin = server.admin().await;
    let history = |limit| proto::HistoryRequest {
        resource: "h".into(),
        limit,
    };
    let grants = admin.history(history(0)).await.unwrap().into_inner().grants;
    let got: Vec<_> = grants
        .iter()
        .map(|g| (g.token, g.holder.as_str(), g.ended()))
        .collect();
    // Newest first; the restart gave the live one a fresh TTL.
    assert_eq!(
        got,
        [
            (tokens[4], "w4", EndKind::Live),
            (tokens[3], "w3", EndKind::Expired),
            (tokens[2], "w2", EndKind::Released),
        ]
    );
    assert_eq!(grants[0].ended_at_unix_ms, 0);
    assert!(grants[1].ended_at_unix_ms >= grants[1].acquired_at_unix_ms);
    assert_eq!(grants[1].ttl_ms, 100);
    let one = admin.history(history(1)).await.unwrap().into_inner().grants;
    assert_eq!(one.len(), 1);
    let err = admin
        .history(proto::HistoryRequest {
            resource: String::new(),
            limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn stats_count_what_happened() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut admin = server.admin().await;
    let a = grant(&mut c, acquire_req("a", "h", 10_000)).await;
    let b = grant(&mut c, acquire_req("b", "h", 100)).await;
    grant(&mut c, acquire_req("c", "h", 10_000)).await;
    renew(&mut c, &a).await.unwrap();
    release(&mut c, &a).await.unwrap();
    admin.revoke(revoke_req("c", 0)).await.unwrap();
    pass_time(Duration::from_millis(120)).await;
    assert!(!describe(&mut c, "b").await.held);
    let s = admin
        .stats(proto::StatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (
            s.live_leases,
            s.waiters,
            s.grants,
            s.renewals,
            s.releases,
            s.expiries,
            s.revocations
        ),
        (0, 0, 3, 1, 1, 1, 1)
    );
    assert_eq!(s.token_high_water, b.token + 1);
    assert!(s.uptime_ms > 0);
    assert!(s.data_size_bytes > 0);
}

fn with_token(token: &str) -> ServerConfig {
    ServerConfig {
        admin_token: Some(AdminToken::new(token, "test").unwrap()),
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn admin_calls_need_the_right_token() {
    let server = TestServer::start_with_options(Config::default(), with_token("right-token")).await;
    let mut none = server.admin().await;
    let err = none.stats(proto::StatsRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("Bearer"), "{err:?}");
    let mut wrong = server.admin_with("wrong-token").await;
    for err in [
        wrong.stats(proto::StatsRequest {}).await.unwrap_err(),
        wrong.list_leases(list_req("", 0, "")).await.unwrap_err(),
        wrong.revoke(revoke_req("r", 0)).await.unwrap_err(),
        wrong
            .watch(proto::WatchRequest::default())
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    }
    let mut right = server.admin_with("right-token").await;
    right.stats(proto::StatsRequest {}).await.unwrap();
    right.list_leases(list_req("", 0, "")).await.unwrap();
    // The worker API needs no admin token.
    let mut c = server.client().await;
    grant(&mut c, acquire_req("r", "h", 1000)).await;
}

#[tokio::test]
async fn live_lease_limit_refuses_only_the_excess() {
    let config = Config {
        limits: state::TableLimits {
            max_leases: 2,
            ..state::TableLimits::default()
        },
        ..Config::default()
    };
    let server = TestServer::start_with(config).await;
    let mut c = server.client().await;
    let a = grant(&mut c, acquire_req("a", "h", 10_000)).await;
    grant(&mut c, acquire_req("b", "h", 10_000)).await;
    let err = c.acquire(acquire_req("c", "h", 10_000)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("live leases (limit 2)"), "{err:?}");
    // Nothing else is affected: renewals work, and a freed slot is usable.
    renew(&mut c, &a).await.unwrap();
    release(&mut c, &a).await.unwrap();
    grant(&mut c, acquire_req("c", "h", 10_000)).await;
}

#[tokio::test]
async fn waiter_limits_per_resource_and_in_total() {
    let config = Config {
        limits: state::TableLimits {
            max_waiters_per_resource: 1,
            max_waiters: 2,
            ..state::TableLimits::default()
        },
        ..Config::default()
    };
    let server = TestServer::start_with(config).await;
    let mut c = server.client().await;
    for r in ["a", "b", "c"] {
        grant(&mut c, acquire_req(r, "owner", 10_000)).await;
    }
    let wait = |resource: &str| {
        let mut req = acquire_req(resource, "waiter", 1000);
        req.wait_ms = 1500;
        req
    };
    let mut tasks = Vec::new();
    let mut queue = |resource: &'static str| {
        let server_url = server.url();
        let req = wait(resource);
        tasks.push(tokio::spawn(async move {
            let mut w = connect(&server_url).await;
            w.acquire(req).await
        }));
    };
    let queued = |c: &mut Client, resource: &'static str| {
        let mut c = c.clone();
        async move {
            for _ in 0..200 {
                if describe(&mut c, resource).await.waiters == 1 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            panic!("no waiter queued on {resource}");
        }
    };
    queue("a");
    queued(&mut c, "a").await;
    let per_resource = c.acquire(wait("a")).await.unwrap_err();
    assert_eq!(per_resource.code(), Code::ResourceExhausted);
    assert!(
        per_resource.message().contains("waiters on this resource"),
        "{per_resource:?}"
    );
    queue("b");
    queued(&mut c, "b").await;
    let total = c.acquire(wait("c")).await.unwrap_err();
    assert_eq!(total.code(), Code::ResourceExhausted);
    assert!(
        total.message().contains("too many waiters (limit 2)"),
        "{total:?}"
    );
    // Not waiting is still fine, and the queued waiters are unharmed.
    assert_eq!(
        held(&mut c, acquire_req("c", "x", 1000)).await.holder,
        "owner"
    );
    assert_eq!(describe(&mut c, "a").await.waiters, 1);
    for t in tasks {
        t.abort();
    }
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_connection_survives() {
    let options = ServerConfig {
        limits: TransportLimits {
            max_message_bytes: 2048,
            ..TransportLimits::default()
        },
        ..ServerConfig::default()
    };
    let server = TestServer::start_with_options(Config::default(), options).await;
    let mut c = server.client().await;
    let err = c
        .acquire(acquire_req(&"x".repeat(4000), "h", 1000))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("limit of 2048 bytes"), "{err:?}");
    let mut admin = server.admin().await;
    let err = admin
        .list_leases(list_req(&"p".repeat(4000), 0, ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    // The same connection goes on working.
    grant(&mut c, acquire_req("small", "h", 1000)).await;
}

#[tokio::test]
async fn streams_per_connection_are_capped_and_other_connections_unaffected() {
    let options = ServerConfig {
        limits: TransportLimits {
            max_streams_per_connection: 2,
            ..TransportLimits::default()
        },
        ..ServerConfig::default()
    };
    let server = TestServer::start_with_options(Config::default(), options).await;
    let conn = channel(&server.url()).await;
    let mut admin = admin_over(conn.clone(), None);
    let w1 = admin.watch(proto::WatchRequest::default()).await.unwrap();
    let w2 = admin.watch(proto::WatchRequest::default()).await.unwrap();
    // A third call on this connection waits for a free stream...
    let mut third = admin_over(conn, None);
    let pending = tokio::spawn(async move { third.stats(proto::StatsRequest {}).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "the third stream was not held back");
    // ...while another connection is served at once.
    let mut other = server.admin().await;
    tokio::time::timeout(
        Duration::from_millis(500),
        other.stats(proto::StatsRequest {}),
    )
    .await
    .expect("another connection was held up")
    .unwrap();
    // Ending a stream lets the waiting call through.
    drop(w1);
    tokio::time::timeout(Duration::from_secs(1), pending)
        .await
        .expect("the waiting call never ran")
        .unwrap()
        .unwrap();
    drop(w2);
}
