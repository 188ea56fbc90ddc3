//! Signed fences end to end: the coordinator signs every grant, a fenced
//! store holding its public keys verifies offline, and no forged, altered,
//! wrong-resource or retired-key fence moves the store's mark. Also the
//! keys' life: restart, damage, rotation and retirement, and the CLI.

use std::net::SocketAddr;
use std::time::Duration;

use leasehold::cli::common::ConnectArgs;
use leasehold::cli::keys as cli_keys;
use leasehold::keys::KEY_FILE;
use leasehold::proto;
use leasehold::server::{self, ServerConfig, ServerError};
use leasehold_client::Client as LeaseClient;
use leasehold_fence::signed::{FenceVerifier, KeyStatus, SIGNED_FENCE_LEN};
use leasehold_fence::SIGNED_METADATA_KEY;
use leasehold_guard::fenced_kv::FencedKvService;
use leasehold_guard::fencing;
use leasehold_guard::proto::fenced_kv_client::FencedKvClient;
use leasehold_guard::proto::{GetRequest, PutRequest};
use tonic::metadata::BinaryMetadataValue;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(10);

/// The coordinator's keys, as a store fetches them at start.
async fn fetch_verifier(url: &str) -> FenceVerifier {
    let connect = ConnectArgs {
        server: url.to_owned(),
        ca_cert: None,
        client_cert: None,
        client_key: None,
    };
    let keys = cli_keys::fetch(&connect).await.expect("PublicKeys");
    cli_keys::verifier(&keys).expect("valid keys")
}

/// A fenced store in this process, verifying with `verifier`.
struct Store {
    client: FencedKvClient<Channel>,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Store {
    async fn start(verifier: FenceVerifier) -> Store {
        let dir = tempfile::tempdir().unwrap();
        let service = FencedKvService::open(dir.path())
            .unwrap()
            .with_verifier(verifier);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(leasehold_guard::fenced_kv::serve_service(
            listener,
            service,
            async {
                let _ = stopped.await;
            },
        ));
        let client = tokio::time::timeout(WAIT, FencedKvClient::connect(format!("http://{addr}")))
            .await
            .expect("connect in time")
            .expect("connect");
        Store {
            client,
            _dir: dir,
            stop: Some(stop),
        }
    }

    /// Put with exactly this metadata: plain fence and signed bytes.
    async fn put(
        &mut self,
        key: &str,
        plain: Option<(&str, u64)>,
        signed: Option<&[u8]>,
    ) -> Result<u64, Status> {
        let mut req = Request::new(PutRequest {
            key: key.into(),
            value: b"v".to_vec(),
        });
        if let Some((resource, token)) = plain {
            fencing::attach(&mut req, resource, token).unwrap();
        }
        if let Some(bytes) = signed {
            req.metadata_mut()
                .insert_bin(SIGNED_METADATA_KEY, BinaryMetadataValue::from_bytes(bytes));
        }
        tokio::time::timeout(WAIT, self.client.put(req))
            .await
            .expect("put in time")
            .map(|r| r.into_inner().highest_token)
    }

    async fn token_of(&mut self, key: &str) -> u64 {
        self.client
            .get(GetRequest { key: key.into() })
            .await
            .unwrap()
            .into_inner()
            .token
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn refused(result: Result<u64, Status>, code: Code, text: &str) {
    let status = result.expect_err("the write must be refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(text), "{text}: {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_misused_fences_are_refused_and_the_mark_stays() {
    let server = TestServer::start().await;
    let mut store = Store::start(fetch_verifier(&server.url()).await).await;
    let client = LeaseClient::connect(server.url()).unwrap();
    let a = client
        .acquire("a")
        .ttl(Duration::from_secs(30))
        .await
        .unwrap();
    let b = client
        .acquire("b")
        .ttl(Duration::from_secs(30))
        .await
        .unwrap();
    let fence_a = a.signed_fence().expect("the coordinator signs").to_vec();
    assert_eq!(fence_a.len(), SIGNED_FENCE_LEN);

    // The honest write, through the library's attach: accepted.
    let mut req = Request::new(PutRequest {
        key: "k".into(),
        value: b"honest".to_vec(),
    });
    a.attach(&mut req).unwrap();
    let highest = store
        .client
        .put(req)
        .await
        .unwrap()
        .into_inner()
        .highest_token;
    assert_eq!(highest, a.token());

    // A forged fence claiming u64::MAX (token bytes changed): refused.
    let mut forged = fence_a.clone();
    forged[5..13].copy_from_slice(&u64::MAX.to_be_bytes());
    refused(
        store.put("k", Some(("a", u64::MAX)), Some(&forged)).await,
        Code::PermissionDenied,
        "forged or altered",
    );
    // The real fence with a plain token of u64::MAX: refused.
    refused(
        store.put("k", Some(("a", u64::MAX)), Some(&fence_a)).await,
        Code::PermissionDenied,
        "signed fence says",
    );
    // No signed fence at all: refused.
    refused(
        store.put("k", Some(("a", u64::MAX)), None).await,
        Code::InvalidArgument,
        SIGNED_METADATA_KEY,
    );
    // Truncated: refused.
    refused(
        store
            .put("k", Some(("a", a.token())), Some(&fence_a[..100]))
            .await,
        Code::InvalidArgument,
        "truncated",
    );
    // A's genuine fence presented for resource B: refused.
    refused(
        store
            .put("kb", Some(("b", a.token())), Some(&fence_a))
            .await,
        Code::PermissionDenied,
        "another resource",
    );

    // Nothing moved: A's honest writer still writes with its own token, and
    // B's mark was never raised by A's fence (B's own, smaller-or-larger
    // token is accepted as the first write on B).
    assert_eq!(store.token_of("k").await, a.token());
    assert_eq!(
        store
            .put("k", Some(("a", a.token())), Some(&fence_a))
            .await
            .unwrap(),
        a.token()
    );
    let mut req = Request::new(PutRequest {
        key: "kb".into(),
        value: b"b".to_vec(),
    });
    b.attach(&mut req).unwrap();
    assert_eq!(
        store
            .client
            .put(req)
            .await
            .unwrap()
            .into_inner()
            .highest_token,
        b.token()
    );
    a.release().await.unwrap();
    b.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_out_key_verifies_until_it_is_retired() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut admin = server.admin().await;
    let old = grant(&mut c, acquire_req("r", "w1", 30_000)).await;
    let old_key = &old.signed_fence[1..5];

    let rotated = admin
        .rotate_key(proto::RotateKeyRequest {})
        .await
        .unwrap()
        .into_inner()
        .key
        .unwrap();
    assert_eq!(rotated.status, proto::KeyStatus::Signing as i32);
    // New grants are signed with the new key; the old fence still verifies.
    let new = grant(&mut c, acquire_req("s", "w2", 30_000)).await;
    assert_ne!(&new.signed_fence[1..5], old_key);
    assert_eq!(hex::encode(&new.signed_fence[1..5]), rotated.key_id);
    let mut store = Store::start(fetch_verifier(&server.url()).await).await;
    assert_eq!(
        store
            .put("k", Some(("r", old.token)), Some(&old.signed_fence))
            .await
            .unwrap(),
        old.token
    );

    // The signing key cannot be retired; the old one can, once.
    let old_id = hex::encode(old_key);
    let err = admin
        .retire_key(proto::RetireKeyRequest {
            key_id: rotated.key_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let retired = admin
        .retire_key(proto::RetireKeyRequest {
            key_id: old_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(retired.retired);
    let again = admin
        .retire_key(proto::RetireKeyRequest { key_id: old_id })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.retired);

    // A store that learns of the retirement refuses the old fence, and the
    // mark stays where the new key's fence puts it.
    let mut store = Store::start(fetch_verifier(&server.url()).await).await;
    refused(
        store
            .put("k", Some(("r", old.token)), Some(&old.signed_fence))
            .await,
        Code::PermissionDenied,
        "retired key",
    );
    // Renewing the old lease gives it a fence signed with the current key.
    let renewed = renew(&mut c, &old).await.unwrap().lease.unwrap();
    assert_eq!(hex::encode(&renewed.signed_fence[1..5]), rotated.key_id);
    assert_eq!(
        store
            .put("k", Some(("r", old.token)), Some(&renewed.signed_fence))
            .await
            .unwrap(),
        old.token
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_signed_fences_sends_leases_without_one_and_still_serves_the_keys() {
    let options = ServerConfig {
        keys: leasehold::keys::KeyOptions {
            no_signed_fences: true,
            ..Default::default()
        },
        ..ServerConfig::default()
    };
    let server = TestServer::start_with_options(Default::default(), options).await;
    let mut c = server.client().await;
    let lease = grant(&mut c, acquire_req("r", "w", 30_000)).await;
    assert!(lease.signed_fence.is_empty());
    assert_eq!(fetch_verifier(&server.url()).await.keys().count(), 1);
    // A store that verifies refuses its writes: unsigned mode is opt-in.
    let mut store = Store::start(fetch_verifier(&server.url()).await).await;
    refused(
        store.put("k", Some(("r", lease.token)), None).await,
        Code::InvalidArgument,
        SIGNED_METADATA_KEY,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_keys() {
    let mut server = TestServer::start().await;
    let mut c = server.client().await;
    let lease = grant(&mut c, acquire_req("r", "w", 60_000)).await;
    let before = fetch_verifier(&server.url()).await;
    server.restart().await;
    let after = fetch_verifier(&server.url()).await;
    let ids = |v: &FenceVerifier| v.keys().map(|(k, s)| (k.id(), s)).collect::<Vec<_>>();
    assert_eq!(ids(&before), ids(&after));
    assert_eq!(ids(&after).len(), 1);
    // A fence from before the restart verifies with the keys after it, and
    // the restored lease's fence is byte for byte the same.
    assert_eq!(
        after.verify(&lease.signed_fence, "r").unwrap().token,
        lease.token
    );
    let mut c = server.client().await;
    let again = renew(&mut c, &lease).await.unwrap().lease.unwrap();
    assert_eq!(again.signed_fence, lease.signed_fence);
    assert!(server.dir.path().join(KEY_FILE).exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_missing_key_file_refuses_to_start() {
    let mut server = TestServer::start().await;
    // Once it answers, it has opened its data directory and made its key.
    let mut c = server.client().await;
    describe(&mut c, "r").await;
    let key_file = server.dir.path().join(KEY_FILE);
    let original = std::fs::read(&key_file).unwrap();
    server.stop().await;
    let config = ServerConfig {
        data_dir: server.dir.path().to_owned(),
        ..ServerConfig::default()
    };

    // Damaged: one byte flipped, then cut short.
    let mut flipped = original.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x20;
    for damaged in [flipped, original[..original.len() / 2].to_vec()] {
        std::fs::write(&key_file, &damaged).unwrap();
        let err = server::open(&config)
            .await
            .err()
            .expect("must refuse to start");
        let text = err.to_string();
        assert!(matches!(err, ServerError::Keys(_)), "{text}");
        assert!(text.contains("is damaged"), "{text}");
        assert!(text.contains(&key_file.display().to_string()), "{text}");
        assert!(text.contains("restore it from a backup"), "{text}");
        // No new key was made in its place.
        assert_eq!(std::fs::read(&key_file).unwrap(), damaged);
    }

    // Missing beside an existing store: refused, and nothing is created.
    std::fs::remove_file(&key_file).unwrap();
    let err = server::open(&config)
        .await
        .err()
        .expect("must refuse to start");
    assert!(err.to_string().contains("--create-signing-key"), "{err}");
    assert!(!key_file.exists());

    // The binary says so and exits non-zero, before listening.
    let out = run_cli(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            server.dir.path().to_str().unwrap(),
        ],
        &[],
    )
    .await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("no signing key file"), "{out:?}");
    assert!(!out.stdout.contains("listening"), "{out:?}");

    // Restoring the file brings the same key back.
    std::fs::write(&key_file, &original).unwrap();
    let opened = server::open(&config)
        .await
        .expect("starts with the restored file");
    let id = opened.keys.list()[0].public.id();
    opened.coordinator.shutdown();
    assert_eq!(
        Some(id.to_string()),
        String::from_utf8(original)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("key ").map(|l| l[..8].to_owned()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_cli_lists_exports_rotates_and_retires() {
    let server = TestServer::start().await;
    let url = server.url();
    let out = run_cli(&["keys", "list", "--server", &url, "--json"], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let first: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(first["status"], "signing");
    let first_id = first["id"].as_str().unwrap().to_owned();

    let out = run_cli(&["keys", "rotate", "--server", &url], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = run_cli(&["keys", "list", "--server", &url], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out:?}");
    assert!(lines[0].starts_with("ID"), "{out:?}");
    assert!(
        lines[1].starts_with(&format!("{first_id}  active")),
        "{out:?}"
    );
    assert!(lines[2].contains("signing"), "{out:?}");

    // Retire needs --yes without a terminal; an unknown id is exit 3.
    let out = run_cli(&["keys", "retire", &first_id, "--server", &url], &[]).await;
    assert_eq!(out.code, 1, "{out:?}");
    let out = run_cli(
        &["keys", "retire", "00000000", "--yes", "--server", &url],
        &[],
    )
    .await;
    assert_eq!(out.code, 3, "{out:?}");
    let out = run_cli(
        &["keys", "retire", &first_id, "--yes", "--server", &url],
        &[],
    )
    .await;
    assert_eq!(out.code, 0, "{out:?}");

    // The export is a key file a store reads back, retired key included.
    let out = run_cli(&["keys", "export", "--server", &url], &[]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let verifier = FenceVerifier::from_key_file(&out.stdout).unwrap();
    let states: Vec<_> = verifier
        .keys()
        .map(|(k, s)| (k.id().to_string(), s))
        .collect();
    assert_eq!(states.len(), 2);
    assert_eq!(states[0], (first_id, KeyStatus::Retired));
    assert_eq!(states[1].1, KeyStatus::Active);
}
