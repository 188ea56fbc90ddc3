//! `serve --http`: `/metrics` scraped during real traffic (exact deltas,
//! strict exposition), health and access rules. (The trace id test is
//! `tests/trace.rs`, a binary of its own: it installs a subscriber.)

use std::time::Duration;

use leasehold::auth::AdminToken;
use leasehold::proto;
use leasehold::server::ServerConfig;

use crate::observe_support::{Observed, Samples};
use crate::support::{acquire_req, admin_client, connect, grant, held, release, renew};

fn calls(method: &str, transport: &str, code: &str) -> String {
    format!("leasehold_rpc_calls_total{{code=\"{code}\",method=\"{method}\",transport=\"{transport}\"}}")
}

fn duration_count(method: &str, transport: &str) -> String {
    format!("leasehold_rpc_duration_seconds_count{{method=\"{method}\",transport=\"{transport}\"}}")
}

/// Counters and histograms move by exactly what the traffic did: unary
/// calls (granted, held, replayed, refused), Session calls counted one by
/// one, a revoke; the gauges say what is live; the exposition is strict.
#[tokio::test]
async fn metrics_move_by_exactly_the_traffic_sent() {
    let mut s = Observed::start(ServerConfig::default()).await;
    let before = s.scrape(None).await;
    assert_eq!(
        before
            .types
            .get("leasehold_rpc_duration_seconds")
            .map(String::as_str),
        Some("histogram")
    );
    assert_eq!(
        before
            .types
            .get("leasehold_grants_total")
            .map(String::as_str),
        Some("counter")
    );
    assert_eq!(
        before
            .types
            .get("leasehold_live_leases")
            .map(String::as_str),
        Some("gauge")
    );

    let mut c = connect(&s.url()).await;
    // Unary: 5 grants, one of them then asked for again by its key (a replay).
    let mut leases = Vec::new();
    for i in 0..5 {
        let mut req = acquire_req(&format!("m/{i}"), "worker-m", 10_000);
        req.request_id = format!("key-{i}");
        leases.push(grant(&mut c, req).await);
    }
    let mut again = acquire_req("m/0", "worker-m", 10_000);
    again.request_id = "key-0".into();
    assert_eq!(grant(&mut c, again).await.token, leases[0].token);
    // One held, one refused (INVALID_ARGUMENT), two renewals, three
    // releases, one release with a wrong token (PERMISSION_DENIED).
    held(&mut c, acquire_req("m/1", "worker-other", 10_000)).await;
    let bad = c
        .acquire(acquire_req("", "worker-m", 10_000))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    renew(&mut c, &leases[3]).await.unwrap();
    renew(&mut c, &leases[4]).await.unwrap();
    for l in &leases[..3] {
        assert!(release(&mut c, l).await.unwrap());
    }
    let mut wrong = leases[3].clone();
    wrong.token += 1;
    assert_eq!(
        release(&mut c, &wrong).await.unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    // Session: four acquire + release cycles on one stream = 8 calls.
    let client = leasehold_client::Client::connect(s.url()).unwrap();
    let mut session = client.session().await.unwrap();
    for i in 0..4 {
        let g = session
            .acquire(format!("s/{i}"), Duration::from_secs(10), Duration::ZERO)
            .await
            .unwrap();
        assert!(session.release(g).await.unwrap());
    }
    // An operator revokes one of the two live leases.
    let mut admin = admin_client(&s.url(), None).await;
    let revoked = admin
        .revoke(proto::RevokeRequest {
            resource: "m/4".into(),
            lease_id: String::new(),
            token: leases[4].token,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);

    let after = s.scrape(None).await;
    let d = |series: &str| after.delta(&before, series);
    let cases: &[(&str, f64)] = &[
        ("leasehold_grants_total", 9.0),
        ("leasehold_idempotent_replays_total", 1.0),
        ("leasehold_acquires_held_total", 1.0),
        ("leasehold_renewals_total", 2.0),
        ("leasehold_releases_total", 7.0),
        ("leasehold_revocations_total", 1.0),
        ("leasehold_expiries_total", 0.0),
        ("leasehold_live_leases", 1.0),
        ("leasehold_waiters", 0.0),
        (&calls("Acquire", "unary", "OK"), 7.0),
        (&calls("Acquire", "unary", "INVALID_ARGUMENT"), 1.0),
        (&calls("Renew", "unary", "OK"), 2.0),
        (&calls("Release", "unary", "OK"), 3.0),
        (&calls("Release", "unary", "PERMISSION_DENIED"), 1.0),
        (&calls("Acquire", "session", "OK"), 4.0),
        (&calls("Release", "session", "OK"), 4.0),
        (&calls("Revoke", "unary", "OK"), 1.0),
        (&duration_count("Acquire", "unary"), 8.0),
        (&duration_count("Release", "unary"), 4.0),
        (&duration_count("Acquire", "session"), 4.0),
        (&duration_count("Release", "session"), 4.0),
        (&duration_count("Describe", "unary"), 0.0),
    ];
    for (series, want) in cases {
        assert_eq!(d(series), *want, "{series}");
    }
    assert_eq!(
        after.get("leasehold_token_high_water"),
        leases[4].token.max(leases[0].token) as f64 + 4.0,
        "the four session grants came last"
    );
    // Every batch that changed something was measured once; the log writes
    // are those batches that wrote (renewals keeping their TTL write nothing).
    let batches = d("leasehold_commit_batches_total");
    assert!((1.0..=25.0).contains(&batches), "{batches} batches");
    assert_eq!(d("leasehold_commit_duration_seconds_count"), batches);
    assert_eq!(d("leasehold_commit_batch_size_count"), batches);
    let jobs = d("leasehold_commit_batch_size_sum");
    assert!(jobs >= batches, "{jobs} jobs in {batches} batches");
    let writes = d("leasehold_wal_write_duration_seconds_count");
    assert!(
        writes >= 1.0 && writes <= batches,
        "{writes} log writes, {batches} batches"
    );
    // Latencies are plausible: positive, and under the test's own bound.
    let sum = d("leasehold_rpc_duration_seconds_sum{method=\"Acquire\",transport=\"unary\"}");
    assert!(sum > 0.0 && sum < 8.0 * 5.0, "{sum}");
    // The exposition names nothing it should not: no lease ids, no holders.
    let text = s.get("/metrics", None).await.body;
    assert!(
        !text.contains(&leases[0].lease_id) && !text.contains("worker-"),
        "{text}"
    );
    s.stop().await;
}

/// Health and readiness; with an admin token, `/metrics` and the API need
/// it and revoke is refused without it; without one, reads are open on
/// loopback (to loopback Host names only) and revoke is refused.
#[tokio::test]
async fn health_and_access_rules() {
    let token = AdminToken::new("t0ken-for-http", "test").unwrap();
    let s = Observed::start(ServerConfig {
        admin_token: Some(token),
        ..ServerConfig::default()
    })
    .await;
    assert_eq!(s.get("/healthz", None).await.status, 200);
    assert_eq!(s.get("/readyz", None).await.status, 200);
    let page = s.get("/", None).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<title>Leasehold"), "{}", page.body);
    assert_eq!(page.header("x-frame-options"), Some("DENY"));
    assert!(page
        .header("content-security-policy")
        .is_some_and(|c| c.contains("script-src 'self'")));
    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("GET", "/metrics", None, 401),
        ("GET", "/metrics", Some("wrong"), 401),
        ("GET", "/metrics", Some("t0ken-for-http"), 200),
        ("GET", "/api/leases", None, 401),
        ("GET", "/api/leases", Some("t0ken-for-http"), 200),
        (
            "GET",
            "/api/history?resource=r",
            Some("t0ken-for-http"),
            200,
        ),
        ("GET", "/api/history?resource=", Some("t0ken-for-http"), 400),
        ("GET", "/api/session", None, 200),
        ("POST", "/api/revoke", None, 401),
        ("POST", "/api/revoke", Some("t0ken-for-http"), 409),
        ("GET", "/nothing-here", None, 404),
    ];
    for (method, path, bearer, want) in cases {
        let a = if *method == "GET" {
            s.get(path, *bearer).await
        } else {
            s.post(path, *bearer, r#"{"resource":"r","token":"7"}"#)
                .await
        };
        assert_eq!(a.status, *want, "{method} {path} {bearer:?}: {}", a.body);
    }
    let who = s.get("/api/session", Some("t0ken-for-http")).await.json();
    assert_eq!(who["auth"], "token");
    assert_eq!(who["can_revoke"], true);
    let anon = s.get("/api/session", None).await.json();
    assert_eq!(anon["can_read"], false);

    // No token configured: reads open on loopback, revoke refused.
    let open = Observed::start(ServerConfig::default()).await;
    assert_eq!(open.get("/metrics", None).await.status, 200);
    assert_eq!(
        open.post("/api/revoke", None, r#"{"resource":"r","token":"7"}"#)
            .await
            .status,
        403
    );
    let session = open.get("/api/session", None).await.json();
    assert_eq!(
        (
            session["can_read"].as_bool(),
            session["can_revoke"].as_bool()
        ),
        (Some(true), Some(false))
    );
}

/// Counters of a Samples for a series that is absent read as zero.
#[test]
fn absent_series_read_as_zero() {
    assert_eq!(Samples::default().get("leasehold_nothing_total"), 0.0);
}

/// The strict reader itself refuses what Prometheus would misread.
#[test]
fn the_strict_reader_refuses_loose_expositions() {
    let good = "# HELP leasehold_x_total X.\n# TYPE leasehold_x_total counter\nleasehold_x_total{a=\"1\"} 3\n";
    assert_eq!(
        crate::observe_support::strict_parse(good).get("leasehold_x_total{a=\"1\"}"),
        3.0
    );
    for bad in [
        "leasehold_x_total 1\n",                                                   // no TYPE
        "# TYPE leasehold_x counter\nleasehold_x 1\n",                             // counter without _total
        "# TYPE leasehold_x gauge\nleasehold_x one\n",                             // not a number
        "# TYPE leasehold_x gauge\nleasehold_x{a=1} 1\n",                          // unquoted label
        "# TYPE leasehold_x gauge\nleasehold_x 1\nleasehold_x 2\n",                // series twice
        "# TYPE leasehold_h histogram\nleasehold_h_bucket{le=\"1\"} 2\nleasehold_h_bucket{le=\"+Inf\"} 1\nleasehold_h_count 1\n",
        "# TYPE other_x gauge\nother_x 1\n",                                       // not ours
    ] {
        let refused = std::panic::catch_unwind(|| crate::observe_support::strict_parse(bad)).is_err();
        assert!(refused, "accepted {bad:?}");
    }
}
