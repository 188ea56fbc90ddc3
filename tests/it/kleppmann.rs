//! Kleppmann's figure, for real: a coordinator, a fenced store and two
//! worker processes on loopback. Worker 1 is paused (SIGSTOP) between
//! checking its lease and writing, past its TTL; worker 2 takes the lease and
//! writes; worker 1 resumes and writes with its old token, and is rejected.
//! Run three times: with plain fences; with the store verifying the
//! coordinator's signed fences (`fenced_store --verify-key URL`); and over
//! the store's PostgreSQL back end, a throwaway server holding the data and
//! the fences.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use leasehold_guard::proto::{fenced_kv_client::FencedKvClient, GetRequest};

use crate::support::*;

fn worker(coordinator: &str, store: &str, value: &str, pause: &str) -> Child {
    Command::new(example("worker"))
        .args([
            "--coordinator",
            coordinator,
            "--store",
            store,
            "--resource",
            "orders",
        ])
        .args([
            "--key",
            "invoice-7",
            "--value",
            value,
            "--ttl",
            "500ms",
            "--pause-before-write",
            pause,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn worker")
}

fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    let stdout = child.stdout.as_mut().expect("stdout");
    BufReader::new(stdout).read_line(&mut line).expect("read");
    line.trim().to_owned()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok);
}

fn token_of(line: &str) -> u64 {
    line.rsplit(' ')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no token in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_cannot_overwrite_its_successor() {
    paused_worker_scenario(false, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_cannot_overwrite_its_successor_with_signed_fences() {
    paused_worker_scenario(true, None).await;
}

/// The same scene with the store's data and fences in PostgreSQL; then the
/// tables themselves are read, not only the store's answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_worker_cannot_overwrite_its_successor_in_postgres() {
    use leasehold_guard::pg::{self, PgGuard, TempPostgres};

    let postgres = TempPostgres::shared().unwrap_or_else(|e| panic!("{e}"));
    let url = postgres
        .create_database("kleppmann")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", postgres.log()));
    let n2 = paused_worker_scenario(false, Some(&url)).await;

    let pool = pg::pool(&url, 1).unwrap();
    let client = pool.get().await.unwrap();
    assert_eq!(
        PgGuard.highest(&**client, "orders").await.unwrap(),
        Some(n2)
    );
    let row = client
        .query_one(
            "SELECT token, value FROM fenced_kv_data WHERE key = 'invoice-7'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), n2 as i64);
    assert_eq!(row.get::<_, Vec<u8>>(1), b"from worker 2");
}

/// Kleppmann's figure against a fenced store over sled, or over the
/// PostgreSQL database `postgres` names; returns worker 2's token.
async fn paused_worker_scenario(signed: bool, postgres: Option<&str>) -> u64 {
    let coord_dir = tempfile::tempdir().unwrap();
    let store_dir = tempfile::tempdir().unwrap();
    let coordinator = ServerProcess::spawn(coord_dir.path(), &[]);
    let coordinator_url = coordinator.url();
    let mut store_args = vec!["--listen", "127.0.0.1:0"];
    match postgres {
        Some(url) => store_args.extend(["--postgres", url]),
        None => store_args.extend(["--data-dir", store_dir.path().to_str().unwrap()]),
    }
    if signed {
        // The store fetches the coordinator's public keys once, at start.
        store_args.extend(["--verify-key", coordinator_url.as_str()]);
    }
    let store = ServerProcess::spawn_program(&example("fenced_store"), &store_args);

    // Worker 1 acquires, checks its lease, and is paused before it writes.
    // The pause is long enough that the SIGSTOP below lands inside it even
    // on a loaded machine.
    let mut w1 = worker(&coordinator.url(), &store.url(), "from worker 1", "2s");
    let line = first_line(&mut w1);
    signal(&w1, "STOP");
    let n = token_of(&line);

    // Its lease expires; worker 2 acquires with a larger token and writes.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let w2 = worker(&coordinator.url(), &store.url(), "from worker 2", "0s")
        .wait_with_output()
        .unwrap();
    let out2 = String::from_utf8(w2.stdout).unwrap();
    assert!(w2.status.success(), "{out2}");
    let n2 = token_of(out2.lines().next().unwrap());
    assert!(n2 > n, "worker 2 got token {n2}, worker 1 had {n}");
    assert!(out2.contains("accepted"), "{out2}");

    // Worker 1 wakes up and writes with its old token: rejected.
    signal(&w1, "CONT");
    let out1 = w1.wait_with_output().unwrap();
    let text1 = String::from_utf8(out1.stdout).unwrap();
    assert_eq!(out1.status.code(), Some(2), "{text1}");
    assert!(text1.contains("rejected"), "{text1}");
    assert!(text1.contains(&format!("offered {n}")), "{text1}");
    assert!(text1.contains(&format!("highest accepted {n2}")), "{text1}");

    // The store holds worker 2's value.
    let mut kv = FencedKvClient::connect(store.url()).await.unwrap();
    let got = invoice(&mut kv).await;
    assert_eq!(got.value, b"from worker 2");
    assert_eq!(got.token, n2);

    if signed {
        // The store really verifies: a write carrying worker 2's token
        // without its signed fence is refused, and the value stays.
        let mut req = tonic::Request::new(leasehold_guard::proto::PutRequest {
            key: "invoice-7".into(),
            value: b"unsigned".to_vec(),
        });
        leasehold_guard::fencing::attach(&mut req, "orders", n2 + 1).unwrap();
        let status = kv.put(req).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
        let got = invoice(&mut kv).await;
        assert_eq!(got.token, n2);
    }
    n2
}

/// What the store holds under the scene's key.
async fn invoice(
    kv: &mut FencedKvClient<tonic::transport::Channel>,
) -> leasehold_guard::proto::GetResponse {
    kv.get(GetRequest {
        key: "invoice-7".into(),
    })
    .await
    .unwrap()
    .into_inner()
}
