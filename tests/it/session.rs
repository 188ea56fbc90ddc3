//! The Session stream: on the wire, and through the client library.

use std::sync::atomic::Ordering;
use std::time::Duration;

use leasehold::proto::{self, session_request::Call, session_response::Result as Answer};
use leasehold_client::{AcquireError, Client, ClientError};
use tokio::sync::mpsc;
use tonic::Code;

use crate::support::*;

/// A raw session: requests in, answers out.
struct Raw {
    tx: mpsc::Sender<proto::SessionRequest>,
    rx: tonic::Streaming<proto::SessionResponse>,
}

impl Raw {
    async fn open(c: &mut crate::support::Client) -> Raw {
        let (tx, rx) = mpsc::channel(4);
        let rx = c
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Raw { tx, rx }
    }

    async fn send(&self, call: Option<Call>) {
        self.tx.send(proto::SessionRequest { call }).await.unwrap();
    }

    async fn answer(&mut self) -> Answer {
        let next = tokio::time::timeout(Duration::from_secs(5), self.rx.message());
        next.await.unwrap().unwrap().unwrap().result.unwrap()
    }
}

fn lease_of(a: Answer) -> proto::Lease {
    match a {
        Answer::Acquire(proto::AcquireResponse {
            outcome: Some(proto::acquire_response::Outcome::Lease(l)),
        }) => l,
        other => panic!("expected a lease, got {other:?}"),
    }
}

fn error_of(a: Answer) -> proto::CallError {
    match a {
        Answer::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Calls pipelined on one stream are answered one each, in order; a failed
/// call answers with its unary RPC's status and changes nothing, and the
/// stream carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_answered_in_order_and_a_failed_call_leaves_the_stream_open() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut s = Raw::open(&mut c).await;
    let release_of = |l: &proto::Lease, token| {
        Some(Call::Release(proto::ReleaseRequest {
            lease_id: l.lease_id.clone(),
            token,
        }))
    };

    s.send(Some(Call::Acquire(acquire_req("a", "w", 5000))))
        .await;
    s.send(Some(Call::Acquire(acquire_req("", "w", 5000))))
        .await;
    s.send(Some(Call::Acquire(acquire_req("b", "w", 5000))))
        .await;
    s.send(None).await;
    let a = lease_of(s.answer().await);
    let bad = error_of(s.answer().await);
    assert_eq!(Code::from(bad.code), Code::InvalidArgument);
    assert!(bad.message.contains("resource"), "{}", bad.message);
    let b = lease_of(s.answer().await);
    assert_eq!((a.resource.as_str(), b.resource.as_str()), ("a", "b"));
    assert_eq!(b.token, a.token + 1, "the refused call took a token");
    let empty = error_of(s.answer().await);
    assert_eq!(Code::from(empty.code), Code::InvalidArgument);
    assert!(empty.message.contains("call"), "{}", empty.message);

    s.send(Some(Call::Renew(proto::RenewRequest {
        lease_id: a.lease_id.clone(),
        token: a.token,
        ttl_ms: 0,
    })))
    .await;
    match s.answer().await {
        Answer::Renew(r) => assert_eq!(r.lease.unwrap().token, a.token),
        other => panic!("expected a renewal, got {other:?}"),
    }
    s.send(release_of(&a, a.token + 7)).await;
    let wrong = error_of(s.answer().await);
    assert_eq!(Code::from(wrong.code), Code::PermissionDenied);
    assert!(
        describe(&mut c, "a").await.held,
        "a refused release ended it"
    );
    s.send(release_of(&a, a.token)).await;
    s.send(release_of(&a, a.token)).await;
    assert!(matches!(s.answer().await, Answer::Release(r) if r.released));
    assert!(matches!(s.answer().await, Answer::Release(r) if !r.released));
    assert!(!describe(&mut c, "a").await.held);
    assert!(describe(&mut c, "b").await.held);
}

/// Closing the stream cancels the call in progress: a waiter leaves the
/// line and is never granted the resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_session_takes_its_waiting_acquire_out_of_line() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let held_by_a = grant(&mut c, acquire_req("r", "a", 5000)).await;
    let s = Raw::open(&mut c).await;
    s.send(Some(Call::Acquire(proto::AcquireRequest {
        wait_ms: 10_000,
        ..acquire_req("r", "b", 5000)
    })))
    .await;
    // The session's acquire queues; closing the stream takes it out.
    wait_for_waiters(&mut c, "r", 1).await;
    drop(s);
    wait_for_waiters(&mut c, "r", 0).await;
    assert!(release(&mut c, &held_by_a).await.unwrap());
    assert!(
        !describe(&mut c, "r").await.held,
        "granted to a closed session"
    );
}

/// The library's session: grants, a held resource, renewals, releases and
/// refusals, with the same outcomes as the unary calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_session_acquires_renews_and_releases() {
    let server = TestServer::start().await;
    let client = Client::connect(server.url()).unwrap();
    let mut s = client.session().await.unwrap();
    let ttl = Duration::from_secs(5);
    let g = s.acquire("r", ttl, Duration::ZERO).await.unwrap();
    assert!(g.is_valid() && g.valid_for() <= ttl);
    let mut direct = server.client().await;
    assert_eq!(describe(&mut direct, "r").await.token, g.token());

    let mut other = client.session().await.unwrap();
    match other.acquire("r", ttl, Duration::ZERO).await {
        Err(AcquireError::Held { token, .. }) => assert_eq!(token, g.token()),
        other => panic!("expected Held, got {other:?}"),
    }
    match other.acquire("", ttl, Duration::ZERO).await {
        Err(AcquireError::Client(ClientError::Refused(status))) => {
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(status.message().contains("resource"), "{status}");
        }
        other => panic!("expected INVALID_ARGUMENT, got {other:?}"),
    }

    let renewed = s.renew(&g).await.unwrap();
    assert_eq!(
        (renewed.token(), renewed.lease_id()),
        (g.token(), g.lease_id())
    );
    assert!(s.release(g.clone()).await.unwrap());
    assert!(!s.release(g.clone()).await.unwrap(), "released twice");
    match s.renew(&g).await {
        Err(ClientError::Refused(status)) => assert_eq!(status.code(), Code::NotFound),
        other => panic!("expected NOT_FOUND, got {other:?}"),
    }
    // Waiting in line on a session: granted when the holder lets go.
    let first = s.acquire("q", ttl, Duration::ZERO).await.unwrap();
    let waiting = tokio::spawn(async move {
        other
            .acquire("q", ttl, Duration::from_secs(5))
            .await
            .map(|g| g.token())
    });
    wait_for_waiters(&mut direct, "q", 1).await;
    assert!(s.release(first.clone()).await.unwrap());
    assert!(waiting.await.unwrap().unwrap() > first.token());
}

/// The grant is made, its answer is lost and the connection cut: the
/// session retries on a new stream with the same request id and gets the
/// same lease; exactly one token is used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_acquire_whose_answer_was_lost_yields_one_lease_and_one_token() {
    let server = TestServer::start().await;
    let proxy = Proxy::start(server.addr).await;
    let client = Client::connect(proxy.url()).unwrap();
    let mut s = client.session().await.unwrap();
    assert_eq!(proxy.connections.load(Ordering::SeqCst), 1);

    proxy.lose_replies_then_cut(Duration::from_millis(300));
    let g = s
        .acquire("r", Duration::from_secs(5), Duration::ZERO)
        .await
        .unwrap();
    assert!(
        proxy.connections.load(Ordering::SeqCst) >= 2,
        "the acquire was never retried"
    );
    let mut direct = server.client().await;
    assert_eq!(describe(&mut direct, "r").await.token, g.token());
    let next = grant(&mut direct, acquire_req("other", "h", 1000)).await;
    assert_eq!(next.token, g.token() + 1);
    assert!(s.release(g).await.unwrap());
}

/// A message over `--max-message-bytes` cannot be read as a call: it ends
/// the stream with RESOURCE_EXHAUSTED naming the limit, after the calls
/// before it were answered, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_ends_the_session_with_resource_exhausted() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut s = Raw::open(&mut c).await;
    s.send(Some(Call::Acquire(acquire_req("a", "w", 5000))))
        .await;
    let huge = "x".repeat(5 * 1024 * 1024);
    s.send(Some(Call::Acquire(acquire_req("b", &huge, 5000))))
        .await;
    let a = lease_of(s.answer().await);
    let next = tokio::time::timeout(Duration::from_secs(5), s.rx.message());
    let status = next.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("limit"), "{status:?}");
    assert!(describe(&mut c, "a").await.held);
    assert!(!describe(&mut c, "b").await.held);
    assert_eq!(
        grant(&mut c, acquire_req("c", "w", 1000)).await.token,
        a.token + 1
    );
}
