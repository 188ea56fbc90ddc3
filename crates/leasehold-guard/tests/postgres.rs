//! The PostgreSQL guard and idempotency keys against a real server: a
//! throwaway PostgreSQL ([`TempPostgres::shared`]) with a database per
//! test. Runs with `--features postgres`; without PostgreSQL's binaries
//! installed every test here fails, saying how to install them.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Pool;
use leasehold_fence::NameError;
use leasehold_guard::idempotency::{Effect, IdempotencyError, Resolution, MAX_KEY_LEN};
use leasehold_guard::pg::{self, FencedRow, PgError, PgGuard, PgIdempotencyStore, TempPostgres};
use leasehold_guard::GuardError;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::IsolationLevel;

/// A database of its own on the shared throwaway server, migrated. Hold the
/// server for as long as the pool is used.
async fn database(name: &str) -> (Arc<TempPostgres>, Pool) {
    let server = TempPostgres::shared().unwrap_or_else(|e| panic!("{e}"));
    let url = server
        .create_database(name)
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}\n{}", server.log()));
    let pool = pg::pool(&url, 16).expect("pool");
    let mut client = pool.get().await.expect("connect");
    pg::migrate(&mut client).await.expect("migrate");
    client
        .batch_execute(
            "CREATE TABLE data (key text PRIMARY KEY, token bigint NOT NULL, value text NOT NULL)",
        )
        .await
        .expect("data table");
    (server, pool)
}

/// The fence and the data row of `key`, as committed.
async fn state(pool: &Pool, resource: &str) -> (Option<u64>, Option<(i64, String)>) {
    let client = pool.get().await.unwrap();
    let fence = PgGuard.highest(&**client, resource).await.unwrap();
    let row = client
        .query_opt("SELECT token, value FROM data WHERE key = $1", &[&resource])
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1)));
    (fence, row)
}

/// One guarded write of `value` under `resource` with `token`, committed.
async fn put(
    pool: &Pool,
    isolation: IsolationLevel,
    resource: &str,
    token: u64,
    value: &str,
    barrier: Option<&tokio::sync::Barrier>,
) -> Result<(), GuardError<tokio_postgres::Error>> {
    let mut client = pool.get().await.expect("connect");
    let tx = client
        .build_transaction()
        .isolation_level(isolation)
        .start()
        .await?;
    // Take the snapshot now, so both writers' transactions are open before
    // either raises the fence.
    tx.batch_execute("SELECT 1").await?;
    if let Some(barrier) = barrier {
        barrier.wait().await;
    }
    PgGuard
        .write(&tx, resource, token, |tx| async move {
            tx.execute(
                "INSERT INTO data (key, token, value) VALUES ($1, $2, $3) ON CONFLICT (key) \
                 DO UPDATE SET token = EXCLUDED.token, value = EXCLUDED.value",
                &[&resource, &(token as i64), &value],
            )
            .await
        })
        .await?;
    tx.commit().await?;
    Ok(())
}

/// `put`, retried while PostgreSQL reports a serialization conflict (at
/// most 20 times): what a caller at REPEATABLE READ or above must do.
async fn put_retrying(
    pool: &Pool,
    isolation: IsolationLevel,
    resource: &str,
    token: u64,
    value: &str,
    barrier: &tokio::sync::Barrier,
    conflicts: &AtomicUsize,
) -> Result<(), GuardError<tokio_postgres::Error>> {
    let mut result = put(pool, isolation, resource, token, value, Some(barrier)).await;
    for _ in 0..20 {
        if !matches!(&result, Err(e) if is_conflict(e)) {
            break;
        }
        conflicts.fetch_add(1, Ordering::Relaxed);
        result = put(pool, isolation, resource, token, value, None).await;
    }
    result
}

/// A serialization failure or deadlock, from the fence, the caller's
/// statements or the commit.
fn is_conflict(e: &GuardError<tokio_postgres::Error>) -> bool {
    match e {
        GuardError::Aborted(db) => db.code().is_some_and(|c| {
            *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
        }),
        other => other.is_conflict(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_the_higher_token_always_wins() {
    let (_server, pool) = database("racing").await;
    // (isolation, rounds): READ COMMITTED is what the guard needs; at
    // SERIALIZABLE PostgreSQL reports a concurrent update of the fence row
    // as a conflict, which the caller retries.
    let cases = [
        (IsolationLevel::ReadCommitted, 1_000),
        (IsolationLevel::Serializable, 200),
    ];
    for (isolation, rounds) in cases {
        let (mut low_won_first, mut low_refused) = (0, 0);
        let conflicts = AtomicUsize::new(0);
        let started = std::time::Instant::now();
        for round in 0..rounds {
            let resource = format!("race/{isolation:?}/{round}");
            let n = 2 * round as u64 + 1;
            let barrier = tokio::sync::Barrier::new(2);
            let (low, high) = tokio::time::timeout(Duration::from_secs(30), async {
                tokio::join!(
                    put_retrying(&pool, isolation, &resource, n, "low", &barrier, &conflicts),
                    put_retrying(
                        &pool,
                        isolation,
                        &resource,
                        n + 1,
                        "high",
                        &barrier,
                        &conflicts
                    ),
                )
            })
            .await
            .unwrap_or_else(|_| panic!("round {round} at {isolation:?} hung: a deadlock?"));
            high.unwrap_or_else(|e| {
                panic!(
                    "round {round} at {isolation:?}: token {} failed: {e}",
                    n + 1
                )
            });
            match low {
                Ok(()) => low_won_first += 1,
                Err(GuardError::StaleToken {
                    resource: r,
                    offered,
                    highest,
                }) => {
                    assert_eq!(
                        (r.as_str(), offered, highest),
                        (resource.as_str(), n, n + 1)
                    );
                    low_refused += 1;
                }
                Err(e) => {
                    panic!("round {round} at {isolation:?}: token {n} failed unexplained: {e}")
                }
            }
            let (fence, row) = state(&pool, &resource).await;
            assert_eq!(fence, Some(n + 1), "round {round} at {isolation:?}");
            assert_eq!(
                row,
                Some(((n + 1) as i64, "high".to_owned())),
                "round {round}"
            );
        }
        eprintln!(
            "{isolation:?}: {rounds} rounds in {:?}: the lower token committed first {low_won_first} \
             times, was refused {low_refused} times; {} conflicts retried",
            started.elapsed(),
            conflicts.load(Ordering::Relaxed)
        );
        assert_eq!(low_won_first + low_refused, rounds);
        if matches!(isolation, IsolationLevel::ReadCommitted) {
            assert_eq!(
                conflicts.load(Ordering::Relaxed),
                0,
                "READ COMMITTED never conflicts"
            );
        }
    }
}

/// Commits `token` → `value` for `resource`, to start a case from.
async fn committed(pool: &Pool, resource: &str, token: u64, value: &str) {
    put(
        pool,
        IsolationLevel::ReadCommitted,
        resource,
        token,
        value,
        None,
    )
    .await
    .expect("setup write");
}

#[tokio::test]
async fn a_transaction_that_fails_after_raising_the_fence_changes_nothing() {
    let (_server, pool) = database("failing").await;
    // How the transaction fails after `write` raised the fence to 9 and
    // wrote its row.
    #[derive(Debug, Clone, Copy)]
    enum Failure {
        /// The closure wrote, then returned an error.
        ClosureErrs,
        /// The write succeeded; a later statement of the transaction failed
        /// and the caller dropped it.
        LaterStatementFails,
        /// The write succeeded; the caller rolled back.
        RolledBack,
    }
    for failure in [
        Failure::ClosureErrs,
        Failure::LaterStatementFails,
        Failure::RolledBack,
    ] {
        let resource = format!("failing/{failure:?}");
        committed(&pool, &resource, 5, "v5").await;

        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let key = resource.as_str();
        let written = PgGuard
            .write(&tx, key, 9, |tx| async move {
                tx.execute(
                    "UPDATE data SET token = 9, value = 'v9' WHERE key = $1",
                    &[&key],
                )
                .await
                .map_err(|e| e.to_string())?;
                match failure {
                    Failure::ClosureErrs => Err("the closure failed after writing".to_owned()),
                    _ => Ok(()),
                }
            })
            .await;
        // Inside the transaction, the fence and the row moved.
        assert_eq!(PgGuard.highest(&*tx, &resource).await.unwrap(), Some(9));
        match failure {
            Failure::ClosureErrs => {
                assert!(
                    matches!(&written, Err(GuardError::Aborted(m)) if m.contains("after writing")),
                    "{written:?}"
                );
                drop(tx);
            }
            Failure::LaterStatementFails => {
                written.unwrap();
                let err = tx.batch_execute("SELECT 1 / 0").await.unwrap_err();
                assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
                drop(tx);
            }
            Failure::RolledBack => {
                written.unwrap();
                tx.rollback().await.unwrap();
            }
        }
        drop(client);
        let (fence, row) = state(&pool, &resource).await;
        assert_eq!(fence, Some(5), "{failure:?}: the fence moved");
        assert_eq!(
            row,
            Some((5, "v5".to_owned())),
            "{failure:?}: the data changed"
        );
    }
}

#[tokio::test]
async fn a_stale_token_writes_nothing_even_if_the_caller_commits() {
    let (_server, pool) = database("stale").await;
    committed(&pool, "orders", 10, "v10").await;
    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let ran = AtomicUsize::new(0);
    let err = PgGuard
        .write(&tx, "orders", 9, |tx| async {
            ran.fetch_add(1, Ordering::SeqCst);
            tx.execute("UPDATE data SET value = 'zombie'", &[]).await
        })
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(&err, GuardError::StaleToken { resource, offered: 9, highest: 10 } if resource == "orders"),
        "{err:?}"
    );
    // The sled guard's message, word for word.
    assert!(
        message.starts_with(
            r#"stale fencing token for resource "orders": offered 9, highest accepted 10"#
        ),
        "{message}"
    );
    assert_eq!(ran.load(Ordering::SeqCst), 0, "the closure ran");
    tx.commit().await.unwrap();
    drop(client);
    assert_eq!(
        state(&pool, "orders").await,
        (Some(10), Some((10, "v10".to_owned())))
    );
    // Equal is accepted (the same lease writing again), newer raises.
    committed(&pool, "orders", 10, "again").await;
    committed(&pool, "orders", 11, "v11").await;
    assert_eq!(
        state(&pool, "orders").await,
        (Some(11), Some((11, "v11".to_owned())))
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_a_clear_error_and_nothing_written() {
    let (_server, pool) = database("bad_input").await;
    let long = "r".repeat(513);
    let longest = "r".repeat(512);
    let too_big = i64::MAX as u64 + 1;
    // (resource, token, expected): None = accepted.
    type Expected = Option<fn(&PgError) -> bool>;
    let cases: Vec<(&str, u64, Expected)> = vec![
        (
            "",
            1,
            Some(|e| {
                matches!(
                    e,
                    PgError::InvalidResource {
                        reason: NameError::Empty { max: 512 },
                        ..
                    }
                )
            }),
        ),
        (
            &long,
            1,
            Some(|e| {
                matches!(
                    e,
                    PgError::InvalidResource {
                        reason: NameError::TooLong { len: 513, max: 512 },
                        ..
                    }
                )
            }),
        ),
        (
            "a\nb",
            1,
            Some(|e| {
                matches!(
                    e,
                    PgError::InvalidResource {
                        reason: NameError::Control,
                        ..
                    }
                )
            }),
        ),
        (
            "orders",
            too_big,
            Some(
                |e| matches!(e, PgError::TokenOutOfRange { token } if *token == i64::MAX as u64 + 1),
            ),
        ),
        (
            "orders",
            u64::MAX,
            Some(|e| matches!(e, PgError::TokenOutOfRange { token: u64::MAX })),
        ),
        (&longest, i64::MAX as u64, None),
        ("orders", 0, None),
    ];
    for (resource, token, expected) in cases {
        let mut client = pool.get().await.unwrap();
        let tx = client.transaction().await.unwrap();
        let ran = AtomicUsize::new(0);
        let result = PgGuard
            .write(&tx, resource, token, |_| async {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<_, Infallible>(())
            })
            .await;
        match (expected, result) {
            (None, Ok(())) => assert_eq!(ran.load(Ordering::SeqCst), 1),
            (Some(is_expected), Err(GuardError::Postgres(e))) => {
                assert!(is_expected(&e), "{resource:?} {token}: {e:?}");
                assert_eq!(ran.load(Ordering::SeqCst), 0);
                assert!(!e.to_string().is_empty());
            }
            (expected, result) => {
                panic!(
                    "{resource:?} {token}: expected refusal {}, got {result:?}",
                    expected.is_some()
                )
            }
        }
        tx.commit().await.unwrap();
    }
    let client = pool.get().await.unwrap();
    let rows: Vec<(String, i64)> = client
        .query(
            "SELECT resource, token FROM leasehold_fences ORDER BY token",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        rows,
        vec![("orders".to_owned(), 0), (longest.clone(), i64::MAX)],
        "only the accepted writes left fences"
    );
    assert!(PgError::TokenOutOfRange { token: too_big }
        .to_string()
        .contains("9223372036854775807"));
}

#[tokio::test]
async fn one_statement_form_for_a_row_with_its_own_fence() {
    let (_server, pool) = database("fenced_row").await;
    let client = pool.get().await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE invoices (id bigint PRIMARY KEY, fence bigint NOT NULL, state text NOT NULL)",
        )
        .await
        .unwrap();
    let invoices = FencedRow::new("invoices", "id", Type::INT8, "fence")
        .unwrap()
        .column("state", Type::TEXT)
        .unwrap();
    let read = || async {
        client
            .query_opt("SELECT fence, state FROM invoices WHERE id = 7", &[])
            .await
            .unwrap()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, String>(1)))
    };
    // No row yet: update finds nothing, upsert creates it.
    assert!(!invoices
        .update(&**client, &7_i64, 5, &[&"draft"])
        .await
        .unwrap());
    assert_eq!(read().await, None);
    invoices
        .upsert(&**client, &7_i64, 5, &[&"draft"])
        .await
        .unwrap();
    assert_eq!(read().await, Some((5, "draft".into())));
    // (operation, token, expected outcome, row after)
    let stale = |e: &GuardError| matches!(e, GuardError::StaleToken { resource, offered: 4, highest: 6 } if resource == "\"invoices\"[7]");
    assert!(invoices
        .update(&**client, &7_i64, 6, &[&"sent"])
        .await
        .unwrap());
    assert_eq!(read().await, Some((6, "sent".into())));
    let err = invoices
        .update(&**client, &7_i64, 4, &[&"zombie"])
        .await
        .unwrap_err();
    assert!(stale(&err), "{err:?}");
    let err = invoices
        .upsert(&**client, &7_i64, 4, &[&"zombie"])
        .await
        .unwrap_err();
    assert!(stale(&err), "{err:?}");
    assert_eq!(read().await, Some((6, "sent".into())));
    invoices
        .upsert(&**client, &7_i64, 6, &[&"paid"])
        .await
        .unwrap();
    assert_eq!(read().await, Some((6, "paid".into())));
    let err = invoices
        .upsert(&**client, &7_i64, u64::MAX, &[&"x"])
        .await
        .unwrap_err();
    assert!(
        matches!(err, GuardError::Postgres(PgError::TokenOutOfRange { .. })),
        "{err:?}"
    );
    assert_eq!(read().await, Some((6, "paid".into())));
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let (_server, pool) = database("migrate").await;
    let run = || async {
        let mut client = pool.get().await.unwrap();
        pg::migrate(&mut client).await
    };
    let (a, b, c) = tokio::join!(run(), run(), run());
    a.unwrap();
    b.unwrap();
    c.unwrap();
}

// -- Idempotency keys ------------------------------------------------------

const FP: &[u8] = b"fingerprint";
const T0: u64 = 1_700_000_000_000;

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A store over `pool` with a clock the test moves.
fn store(pool: &Pool) -> (PgIdempotencyStore, Arc<AtomicU64>) {
    let now = Arc::new(AtomicU64::new(T0));
    let clock = now.clone();
    let store = PgIdempotencyStore::new(pool.clone())
        .with_clock(Arc::new(move || at(clock.load(Ordering::SeqCst))));
    (store, now)
}

/// A side effect that counts its runs and returns `outcome`.
fn counted<'a>(
    runs: &'a AtomicUsize,
    outcome: &'static [u8],
) -> impl FnOnce() -> std::future::Ready<Effect<Infallible>> + 'a {
    move || {
        runs.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Effect::Final(outcome.to_vec()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_retried_concurrently_runs_once() {
    let (server, pool) = database("idem_concurrent").await;
    // Two stores over two pools: two processes, as far as the server can tell.
    let other = pg::pool(&server.url_of("idem_concurrent"), 16).unwrap();
    let stores = [store(&pool).0, store(&other).0];
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (store, runs) = (stores[i % 2].clone(), runs.clone());
            tokio::spawn(async move {
                store
                    .execute("charge-17", FP, || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Effect::<Infallible>::Final(b"once".to_vec())
                    })
                    .await
            })
        })
        .collect();
    let (mut fresh, mut replayed, mut in_progress) = (0, 0, 0);
    for task in tasks {
        match tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("an attempt hung")
            .unwrap()
        {
            Ok(executed) => {
                assert_eq!(executed.outcome, b"once");
                if executed.replayed {
                    replayed += 1;
                } else {
                    fresh += 1;
                }
            }
            Err(IdempotencyError::InProgress { key }) => {
                assert_eq!(key, "charge-17");
                in_progress += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    eprintln!("fresh {fresh}, replayed {replayed}, in progress {in_progress}");
    assert_eq!(fresh, 1);
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Afterwards every retry replays.
    let retry = stores[1]
        .execute("charge-17", FP, counted(&runs, b"again"))
        .await
        .unwrap();
    assert!(retry.replayed && retry.outcome == b"once");
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn idempotency_keys_have_the_sled_stores_semantics() {
    let (_server, pool) = database("idem_semantics").await;
    let (store, now) = store(&pool);
    let runs = AtomicUsize::new(0);

    // Recorded outcome, replayed with its time.
    let first = store.execute("k", FP, counted(&runs, b"ok")).await.unwrap();
    assert_eq!(
        (first.outcome.as_slice(), first.replayed, first.recorded_at),
        (&b"ok"[..], false, at(T0))
    );
    now.fetch_add(1_000, Ordering::SeqCst);
    let retry = store
        .execute("k", FP, counted(&runs, b"other"))
        .await
        .unwrap();
    assert_eq!(
        (retry.outcome.as_slice(), retry.replayed, retry.recorded_at),
        (&b"ok"[..], true, at(T0))
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    // Another fingerprint: mismatch.
    let err = store
        .execute("k", b"another request", counted(&runs, b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IdempotencyError::Mismatch { key } if key == "k"),
        "{err:?}"
    );

    // Retryable: nothing recorded, the next attempt runs.
    let err = store
        .execute("r", FP, || async {
            Effect::Retryable("connection refused")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdempotencyError::Failed("connection refused")),
        "{err:?}"
    );
    assert!(
        !store
            .execute("r", FP, counted(&runs, b"ran"))
            .await
            .unwrap()
            .replayed
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);

    // Unknown: interrupted until resolved; resolving records the outcome found.
    let err = store
        .execute("u", FP, || async {
            Effect::Unknown("timed out after sending")
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, IdempotencyError::OutcomeUnknown { .. }),
        "{err:?}"
    );
    let err = store
        .execute("u", FP, counted(&runs, b"x"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, IdempotencyError::Interrupted { key, started_at } if key == "u" && *started_at == at(T0 + 1_000)),
        "{err:?}"
    );
    assert!(err.to_string().contains("resolve"), "{err}");
    store
        .resolve("u", Resolution::Record(b"found".to_vec()))
        .await
        .unwrap();
    let found = store.execute("u", FP, counted(&runs, b"x")).await.unwrap();
    assert_eq!(
        (found.outcome.as_slice(), found.replayed),
        (&b"found"[..], true)
    );
    let err = store.resolve("u", Resolution::Release).await.unwrap_err();
    assert!(
        matches!(err, IdempotencyError::NotInterrupted { .. }),
        "{err:?}"
    );

    // Cancelled mid-way: interrupted (its connection was closed, so its
    // lock is gone); released, the next attempt runs.
    let pending = store.execute("c", FP, || async {
        std::future::pending::<Effect<Infallible>>().await
    });
    assert!(tokio::time::timeout(Duration::from_millis(200), pending)
        .await
        .is_err());
    let err = until_not_in_progress(|| store.execute("c", FP, counted(&runs, b"x"))).await;
    assert!(
        matches!(err, Err(IdempotencyError::Interrupted { .. })),
        "{err:?}"
    );
    store.resolve("c", Resolution::Release).await.unwrap();
    assert!(
        !store
            .execute("c", FP, counted(&runs, b"ran"))
            .await
            .unwrap()
            .replayed
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    // Typed outcomes as JSON, final failures included.
    type Outcome = Result<u32, String>;
    let declined = store
        .execute_json("j", FP, || async {
            Effect::<Infallible, Outcome>::Final(Err("declined".into()))
        })
        .await
        .unwrap();
    let again = store
        .execute_json("j", FP, || async {
            Effect::<Infallible, Outcome>::Final(Ok(5))
        })
        .await
        .unwrap();
    assert_eq!(
        (declined.outcome, again.outcome.clone(), again.replayed),
        (Err("declined".to_owned()), Err("declined".to_owned()), true)
    );

    // Invalid keys.
    for key in [String::new(), "k".repeat(MAX_KEY_LEN + 1)] {
        let err = store
            .execute(&key, FP, counted(&runs, b"x"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, IdempotencyError::InvalidKey { .. }),
            "{err:?}"
        );
    }
    assert_eq!(runs.load(Ordering::SeqCst), 3);
}

/// Runs `attempt` until it is not `InProgress` (a closed connection's lock
/// goes when the server notices; at most 5 s).
async fn until_not_in_progress<T, F, Fut>(attempt: F) -> Result<T, IdempotencyError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, IdempotencyError>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match attempt().await {
            Err(IdempotencyError::InProgress { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

#[tokio::test]
async fn keys_expire_and_collection_skips_keys_in_flight() {
    let (_server, pool) = database("idem_expiry").await;
    let (store, now) = store(&pool);
    let store = store.with_retention(Duration::from_secs(60));
    let runs = AtomicUsize::new(0);
    store
        .execute("old", FP, counted(&runs, b"1"))
        .await
        .unwrap();
    now.fetch_add(30_000, Ordering::SeqCst);
    store
        .execute("young", FP, counted(&runs, b"2"))
        .await
        .unwrap();

    assert_eq!(store.collect_expired(at(T0 + 59_999)).await.unwrap(), 0);
    assert_eq!(store.collect_expired(at(T0 + 60_000)).await.unwrap(), 1);
    assert_eq!(store.collect_expired(at(T0 + 60_000)).await.unwrap(), 0);

    // "young" expired but is not collected yet: it already counts as new,
    // even with another fingerprint.
    now.store(T0 + 90_000, Ordering::SeqCst);
    let again = store
        .execute("young", b"new request", counted(&runs, b"3"))
        .await
        .unwrap();
    assert!(!again.replayed);
    assert_eq!(runs.load(Ordering::SeqCst), 3);

    // A key whose attempt is running is not collected, however old.
    let (release, released) = tokio::sync::oneshot::channel::<()>();
    let (started_tx, started) = tokio::sync::oneshot::channel::<()>();
    let running = store.execute("busy", FP, || async {
        started_tx.send(()).unwrap();
        released.await.unwrap();
        Effect::<Infallible>::Final(b"done".to_vec())
    });
    let collect = async {
        started.await.unwrap();
        let removed = store.collect_expired(at(T0 + 3_600_000)).await.unwrap();
        release.send(()).unwrap();
        removed
    };
    let (executed, removed) = tokio::join!(running, collect);
    assert!(!executed.unwrap().replayed);
    // "young" (rewritten at T0 + 90 s) went; "busy" stayed.
    assert_eq!(removed, 1);
    let kept = store
        .execute("busy", FP, counted(&runs, b"x"))
        .await
        .unwrap();
    assert!(kept.replayed);
}

#[test]
fn a_throwaway_server_is_stopped_when_dropped_also_by_a_panic() {
    let port = std::sync::Mutex::new(0);
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let server = TempPostgres::start().unwrap_or_else(|e| panic!("{e}"));
        *port.lock().unwrap() = server.port();
        std::net::TcpStream::connect(("127.0.0.1", server.port())).expect("the server listens");
        panic!("a test fails while holding the server");
    }));
    assert!(panicked.is_err());
    let port = *port.lock().unwrap();
    assert_ne!(port, 0);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the server on port {port} outlived the panic"
    );
}
