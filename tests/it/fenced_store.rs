//! The fenced key-value store (`leasehold_guard::fenced_kv`) over real gRPC: in
//! process, and as the `fenced_store` example binary killed with SIGKILL.
//!
//! Every wait has a timeout, so a hung server fails the test instead of
//! hanging it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use leasehold_guard::fenced_kv;
use leasehold_guard::fencing;
use leasehold_guard::proto::fenced_kv_client::FencedKvClient;
use leasehold_guard::proto::{GetRequest, GetResponse, PutRequest};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::support::{example, ServerProcess};

const WAIT: Duration = Duration::from_secs(10);

async fn within<F: std::future::IntoFuture>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {WAIT:?}: {what}"))
}

async fn connect(addr: SocketAddr) -> FencedKvClient<Channel> {
    within("connect", FencedKvClient::connect(format!("http://{addr}")))
        .await
        .expect("connect to the fenced store")
}

/// Put `value` at `key`, fenced by (`resource`, `token`) if given.
async fn put(
    client: &mut FencedKvClient<Channel>,
    key: &str,
    value: &str,
    fence: Option<(&str, u64)>,
) -> Result<u64, Status> {
    let mut req = Request::new(PutRequest {
        key: key.into(),
        value: value.as_bytes().to_vec(),
    });
    if let Some((resource, token)) = fence {
        fencing::attach(&mut req, resource, token).expect("valid fence");
    }
    within("put", client.put(req))
        .await
        .map(|r| r.into_inner().highest_token)
}

async fn get(client: &mut FencedKvClient<Channel>, key: &str) -> GetResponse {
    within("get", client.get(GetRequest { key: key.into() }))
        .await
        .expect("get")
        .into_inner()
}

fn assert_stale(status: &Status, resource: &str, offered: u64, highest: u64) {
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let expected = format!(
        "stale fencing token for resource {resource:?}: offered {offered}, highest accepted {highest}"
    );
    assert!(status.message().contains(&expected), "{status:?}");
}

#[tokio::test]
async fn in_process_store_rejects_stale_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let data_dir = dir.path().to_owned();
    let server = tokio::spawn(async move {
        fenced_kv::serve(listener, &data_dir, async {
            let _ = stopped.await;
        })
        .await
    });
    let mut client = connect(addr).await;

    assert_eq!(
        put(&mut client, "k", "five", Some(("r", 5))).await.unwrap(),
        5
    );
    // The same lease writes again.
    assert_eq!(
        put(&mut client, "k2", "five-b", Some(("r", 5)))
            .await
            .unwrap(),
        5
    );

    let status = put(&mut client, "k", "four", Some(("r", 4)))
        .await
        .unwrap_err();
    assert_stale(&status, "r", 4, 5);
    // One resource protects every key written under it.
    let status = put(&mut client, "elsewhere", "four", Some(("r", 4)))
        .await
        .unwrap_err();
    assert_stale(&status, "r", 4, 5);
    assert!(!get(&mut client, "elsewhere").await.found);

    let got = get(&mut client, "k").await;
    assert_eq!(
        (got.found, got.value.as_slice(), got.token),
        (true, &b"five"[..], 5)
    );

    // A write without a fence is refused, naming what is missing.
    let status = put(&mut client, "k", "unfenced", None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("leasehold-"), "{status:?}");
    // A malformed token is refused by the interceptor, for any method.
    let mut req = Request::new(GetRequest { key: "k".into() });
    req.metadata_mut()
        .insert(fencing::RESOURCE_METADATA_KEY, "r".parse().unwrap());
    req.metadata_mut()
        .insert(fencing::TOKEN_METADATA_KEY, "five".parse().unwrap());
    let status = within("get", client.get(req)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("leasehold-token"), "{status:?}");
    assert_eq!(get(&mut client, "k").await.token, 5);

    stop.send(()).unwrap();
    within("shutdown", server).await.unwrap().unwrap();
}

/// Starts `fenced_store` on `data_dir` and reads the port from its one line
/// Starts `fenced_store` on `data_dir`.
fn spawn_store(data_dir: &Path) -> ServerProcess {
    let dir = data_dir.to_str().expect("utf-8 temp dir");
    ServerProcess::spawn_program(
        &example("fenced_store"),
        &["--listen", "127.0.0.1:0", "--data-dir", dir],
    )
}

#[tokio::test]
async fn acknowledged_writes_and_marks_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();

    let mut first = spawn_store(dir.path());
    let mut client = connect(first.addr).await;
    assert_eq!(
        put(&mut client, "k", "nine", Some(("r", 9))).await.unwrap(),
        9
    );
    // SIGKILL, then reap: no chance to flush or clean up.
    first.kill9();
    drop(client);

    let second = spawn_store(dir.path());
    let mut client = connect(second.addr).await;
    let status = put(&mut client, "k", "eight", Some(("r", 8)))
        .await
        .unwrap_err();
    assert_stale(&status, "r", 8, 9);
    let got = get(&mut client, "k").await;
    assert_eq!(
        (got.found, got.value.as_slice(), got.token),
        (true, &b"nine"[..], 9)
    );
    drop(second); // killed and reaped
}

/// `fenced_store --http`: the guard's counters, through the `metrics`
/// facade, in the store's own `/metrics`: accepted, refused stale, refused
/// malformed (a fence whose token is not a number; a Put with no fence).
#[tokio::test]
async fn the_store_exports_the_guards_counters() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = std::process::Command::new(example("fenced_store"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start fenced_store");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut addr = |prefix: &str| -> SocketAddr {
        let mut line = String::new();
        out.read_line(&mut line).expect("read a line");
        line.trim()
            .strip_prefix(prefix)
            .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
            .parse()
            .expect("address")
    };
    let (grpc, http) = (addr("listening on "), addr("http on "));
    let mut c = connect(grpc).await;
    put(&mut c, "k", "v9", Some(("orders", 9)))
        .await
        .expect("token 9");
    put(&mut c, "k", "v10", Some(("orders", 10)))
        .await
        .expect("token 10");
    let stale = put(&mut c, "k", "v8", Some(("orders", 8)))
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let mut malformed = Request::new(PutRequest {
        key: "k".into(),
        value: b"x".to_vec(),
    });
    malformed
        .metadata_mut()
        .insert(fencing::TOKEN_METADATA_KEY, "nine".parse().unwrap());
    malformed
        .metadata_mut()
        .insert(fencing::RESOURCE_METADATA_KEY, "orders".parse().unwrap());
    let refused = within("put", c.put(malformed)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    let unfenced = put(&mut c, "k", "x", None).await.unwrap_err();
    assert_eq!(unfenced.code(), Code::InvalidArgument);

    let metrics = crate::observe_support::request(http, "GET", "/metrics", None, None).await;
    assert_eq!(metrics.status, 200);
    for line in [
        "leasehold_guard_writes_accepted_total 2",
        "leasehold_guard_writes_refused_stale_total 1",
        "leasehold_guard_writes_refused_malformed_total 2",
    ] {
        assert!(
            metrics.body.lines().any(|l| l == line),
            "{line:?} missing in\n{}",
            metrics.body
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}
