//! Smoke runs of every `leasehold bench` workload against an in-process
//! server: a second or so each, asserting only the correctness checks and
//! that some ops happened. Benchmarks are never timed assertions here.

use std::time::Duration;

use leasehold::bench::{self, contended::ContendedOptions, keepalive::KeepaliveOptions, Options};

use crate::support::*;

fn options(server: &TestServer, concurrency: usize) -> Options {
    Options {
        server: server.url(),
        concurrency,
        connections: 2,
        ttl: Duration::from_secs(5),
        duration: Duration::from_millis(1000),
        warmup: Duration::from_millis(200),
        ..Options::default()
    }
}

fn assert_passed(report: &bench::Report) {
    assert!(report.ops > 0, "no ops counted:\n{report}");
    assert!(report.passed(), "checks failed:\n{report}");
    assert!(report.to_string().contains(" ops/s"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cycle_smoke() {
    let server = TestServer::start().await;
    let opts = options(&server, 8);
    assert_passed(&bench::cycle::run(&opts, false).await.unwrap());
    assert_passed(&bench::cycle::run(&opts, true).await.unwrap());
    let session = Options {
        session: true,
        ..opts
    };
    let report = bench::cycle::run(&session, false).await.unwrap();
    assert_eq!(report.workload, "cycle-session");
    assert_passed(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_smoke() {
    let server = TestServer::start().await;
    let report = bench::contended::run(&options(&server, 8), &ContendedOptions::default())
        .await
        .unwrap();
    assert_passed(&report);
    assert_eq!(report.checks.len(), 2);
    let session = Options {
        session: true,
        ..options(&server, 8)
    };
    let report = bench::contended::run(&session, &ContendedOptions::default())
        .await
        .unwrap();
    assert_eq!(report.workload, "contended-session");
    assert_passed(&report);
    assert_eq!(report.checks.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_smoke() {
    let server = TestServer::start().await;
    let opts = Options {
        ttl: Duration::from_millis(600),
        warmup: Duration::ZERO,
        ..options(&server, 2)
    };
    let k = KeepaliveOptions {
        leases: 300,
        renew_every: None,
    };
    let report = bench::keepalive::run(&opts, &k).await.unwrap();
    assert_passed(&report);
    assert_eq!(report.extra["leases"], 300.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fill_then_ready_after_restart() {
    let mut server = TestServer::start().await;
    let opts = Options {
        ttl: Duration::from_secs(60),
        ..options(&server, 8)
    };
    let filled = bench::scale::fill(&opts, 200).await.unwrap();
    assert_passed(&filled.report);
    server.restart().await;
    let opts = Options {
        server: server.url(),
        ..opts
    };
    let resource = format!("{}/199", filled.prefix);
    let ready = bench::scale::ready(&opts, &resource, true, Duration::from_secs(10))
        .await
        .unwrap();
    assert_passed(&ready);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_smoke() {
    let g = bench::guard::GuardOptions {
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(50),
        resources: 64,
        threads: 2,
        writers: 8,
        max_ops: 1_000_000,
        signed: false,
    };
    let reports = bench::guard::run(&g).await.unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r.workload.as_str()).collect();
    assert_eq!(names, ["guard-memory", "guard-sled", "guard-sled-durable"]);
    for r in &reports {
        assert_passed(r);
    }
    // --signed: the two signed-fence runs, with their checks (forged
    // u64::MAX refused, the mark unchanged).
    let signed = bench::guard::GuardOptions { signed: true, ..g };
    let reports = bench::guard::run(&signed).await.unwrap();
    let names: Vec<&str> = reports.iter().map(|r| r.workload.as_str()).collect();
    assert_eq!(names, ["guard-signed", "guard-signed-cached"]);
    for r in &reports {
        assert_passed(r);
    }
}
