//! The guards' tests: the rule, both backends, and the flusher.

use super::*;
use parking_lot::Mutex;
use sled::transaction::ConflictableTransactionError;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Barrier;
use std::sync::{mpsc, Arc};
use std::time::Duration;

#[test]
fn check_table() {
    let cases: &[(Option<u64>, u64, Result<Admitted, Stale>)] = &[
        (None, 0, Ok(Admitted::First)),
        (None, 7, Ok(Admitted::First)),
        (Some(7), 7, Ok(Admitted::Same)),
        (Some(7), 8, Ok(Admitted::Newer { previous: 7 })),
        (Some(0), u64::MAX, Ok(Admitted::Newer { previous: 0 })),
        (
            Some(7),
            6,
            Err(Stale {
                offered: 6,
                highest: 7,
            }),
        ),
        (
            Some(u64::MAX),
            0,
            Err(Stale {
                offered: 0,
                highest: u64::MAX,
            }),
        ),
    ];
    for &(highest, offered, expected) in cases {
        assert_eq!(check(highest, offered), expected, "{highest:?} / {offered}");
    }
}

/// A table `t(key, value, fence)` and the two statements of the module
/// docs, evaluated with `check`: the SQL's `fence <= $token` is exactly
/// "`check` accepts".
#[derive(Default)]
struct Table {
    rows: HashMap<&'static str, (&'static str, u64)>,
}

impl Table {
    /// `UPDATE t SET value = $v, fence = $token WHERE key = $k AND fence <= $token`
    fn update(&mut self, k: &'static str, v: &'static str, token: u64) -> usize {
        match self.rows.get_mut(k) {
            Some(row) if check(Some(row.1), token).is_ok() => {
                *row = (v, token);
                1
            }
            _ => 0,
        }
    }

    /// `INSERT .. ON CONFLICT (key) DO UPDATE .. WHERE t.fence <= excluded.fence`
    fn upsert(&mut self, k: &'static str, v: &'static str, token: u64) -> usize {
        let highest = self.rows.get(k).map(|row| row.1);
        match check(highest, token) {
            Ok(_) => {
                self.rows.insert(k, (v, token));
                1
            }
            Err(_) => 0,
        }
    }
}

#[test]
fn sql_conditional_write_pattern() {
    let mut t = Table::default();
    // (statement, key, value, token, rows affected, row afterwards)
    type Step = (
        &'static str,
        &'static str,
        &'static str,
        u64,
        usize,
        Option<(&'static str, u64)>,
    );
    let steps: &[Step] = &[
        ("update", "k", "a", 5, 0, None), // no row yet: UPDATE matches nothing
        ("upsert", "k", "a", 5, 1, Some(("a", 5))),
        ("update", "k", "b", 5, 1, Some(("b", 5))), // same lease writes again
        ("update", "k", "c", 7, 1, Some(("c", 7))), // newer lease
        ("update", "k", "zombie", 6, 0, Some(("c", 7))), // stale: 0 rows
        ("upsert", "k", "zombie", 6, 0, Some(("c", 7))),
        ("upsert", "k", "d", 8, 1, Some(("d", 8))),
    ];
    for &(stmt, k, v, token, affected, after) in steps {
        let n = match stmt {
            "update" => t.update(k, v, token),
            _ => t.upsert(k, v, token),
        };
        assert_eq!(n, affected, "{stmt} {k}={v} @{token}");
        assert_eq!(t.rows.get(k).copied(), after, "{stmt} {k}={v} @{token}");
    }
}

fn assert_stale<E: std::fmt::Debug>(
    result: Result<impl std::fmt::Debug, GuardError<E>>,
    resource: &str,
    offered: u64,
    highest: u64,
) {
    match result {
        Err(GuardError::StaleToken {
            resource: r,
            offered: o,
            highest: h,
        }) => assert_eq!((r.as_str(), o, h), (resource, offered, highest)),
        other => panic!("expected StaleToken, got {other:?}"),
    }
}

#[test]
fn memory_accepts_equal_and_higher_rejects_older() {
    let guard = MemoryGuard::new();
    assert_eq!(guard.check_and_record("r", 5).unwrap(), Admitted::First);
    assert_eq!(guard.check_and_record("r", 5).unwrap(), Admitted::Same);
    assert_eq!(
        guard.check_and_record("r", 9).unwrap(),
        Admitted::Newer { previous: 5 }
    );
    assert_stale(guard.check_and_record("r", 8), "r", 8, 9);
    assert_eq!(guard.highest("r"), Some(9));
    // Another resource has its own mark.
    assert_eq!(guard.check_and_record("other", 1).unwrap(), Admitted::First);

    let mut data = Vec::new();
    guard
        .write("r", 9, || {
            data.push(9);
            Ok::<_, Infallible>(())
        })
        .unwrap();
    let rejected = guard.write("r", 3, || {
        data.push(3);
        Ok::<_, Infallible>(())
    });
    assert_stale(rejected, "r", 3, 9);
    guard
        .write("r", 10, || {
            data.push(10);
            Ok::<_, Infallible>(())
        })
        .unwrap();
    assert_eq!(data, [9, 10], "a rejected closure never runs");
    assert_eq!(guard.highest("r"), Some(10));
    assert_eq!(guard.len(), 2);
}

#[test]
fn memory_failed_closure_does_not_move_the_mark() {
    let guard = MemoryGuard::new();
    let err = guard
        .write("r", 4, || Err::<(), _>("disk full"))
        .unwrap_err();
    assert!(matches!(err, GuardError::Aborted("disk full")));
    assert_eq!(guard.highest("r"), None);
    guard.write("r", 2, || Ok::<_, Infallible>(())).unwrap();
    assert_eq!(guard.highest("r"), Some(2));
}

#[test]
fn memory_forget_readmits_older_tokens() {
    let guard = MemoryGuard::new();
    guard.check_and_record("r", 9).unwrap();
    assert_eq!(guard.forget("r"), Some(9));
    assert_eq!(guard.forget("r"), None);
    assert!(guard.is_empty());
    assert_eq!(guard.check_and_record("r", 1).unwrap(), Admitted::First);
}

#[test]
fn error_message_says_what_to_do() {
    let err: GuardError = GuardError::StaleToken {
        resource: "r".into(),
        offered: 33,
        highest: 34,
    };
    assert_eq!(
        err.to_string(),
        "stale fencing token for resource \"r\": offered 33, highest accepted 34; the lease \
             that issued this token was superseded: stop writing and re-acquire"
    );
}

/// Rounds of two writers racing on one resource, per pair of threads:
/// in round `r` the older token is `2r+1` and the newer `2r+2`.
/// `write(pair, token)` performs the guarded write and returns
/// `Ok(token stored before it)` or `Err(())` if it was rejected as stale;
/// `data(pair)` reads the token stored in the pair's data.
fn race<W, D>(pairs: usize, rounds: u64, write: W, data: D)
where
    W: Fn(usize, u64) -> Result<Option<u64>, ()> + Sync,
    D: Fn(usize) -> Option<u64> + Sync,
{
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for pair in 0..pairs {
            let barrier = Arc::new(Barrier::new(2));
            for newer in [false, true] {
                let (write, data, barrier) = (&write, &data, barrier.clone());
                handles.push(s.spawn(move || {
                    let mut seen = Vec::new();
                    for round in 0..rounds {
                        let token = 2 * round + 1 + u64::from(newer);
                        barrier.wait();
                        seen.push(write(pair, token));
                        barrier.wait();
                        // Both wrote or were rejected: the newer write is what stays.
                        assert_eq!(data(pair), Some(2 * round + 2), "round {round}");
                        barrier.wait();
                    }
                    (pair, newer, seen)
                }));
            }
        }
        let mut results = HashMap::new();
        for handle in handles {
            let (pair, newer, seen) = handle.join().unwrap();
            results.insert((pair, newer), seen);
        }
        for pair in 0..pairs {
            let (older, newer) = (&results[&(pair, false)], &results[&(pair, true)]);
            for round in 0..rounds {
                let i = round as usize;
                let last = round.checked_sub(1).map(|r| 2 * r + 2);
                let newer_saw = newer[i].expect("the newer token is never rejected");
                match older[i] {
                    // 33 was accepted: then it ran before 34, which saw its write.
                    Ok(older_saw) => {
                        assert_eq!(older_saw, last, "pair {pair} round {round}");
                        assert_eq!(newer_saw, Some(2 * round + 1), "pair {pair} round {round}");
                    }
                    // 33 was rejected: it changed nothing, 34 saw the last round.
                    Err(()) => assert_eq!(newer_saw, last, "pair {pair} round {round}"),
                }
            }
        }
    });
}

#[test]
fn memory_racing_writers_never_let_the_older_overwrite() {
    let guard = MemoryGuard::new();
    let store: Vec<Mutex<Option<u64>>> = (0..4).map(|_| Mutex::new(None)).collect();
    let runs = [AtomicUsize::new(0), AtomicUsize::new(0)];
    let accepted = AtomicUsize::new(0);
    race(
        4,
        300,
        |pair, token| {
            let resource = format!("r{pair}");
            match guard.write(&resource, token, || {
                runs[(token % 2) as usize].fetch_add(1, Ordering::Relaxed);
                let mut cell = store[pair].lock();
                let previous = *cell;
                *cell = Some(token);
                Ok::<_, Infallible>(previous)
            }) {
                Ok(previous) => {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    Ok(previous)
                }
                Err(GuardError::StaleToken { .. }) => Err(()),
                Err(e) => panic!("{e}"),
            }
        },
        |pair| *store[pair].lock(),
    );
    // A closure ran exactly once per accepted write: rejected ones never ran.
    // Even tokens are the newer writers, accepted every round.
    let total_runs = runs[0].load(Ordering::Relaxed) + runs[1].load(Ordering::Relaxed);
    assert_eq!(total_runs, accepted.load(Ordering::Relaxed));
    assert_eq!(runs[0].load(Ordering::Relaxed), 4 * 300);
}

#[test]
fn memory_fast_path_races_keep_the_highest() {
    let guard = MemoryGuard::new();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let guard = &guard;
            s.spawn(move || {
                for i in 0..20_000u64 {
                    let token = i * 4 + t;
                    // Accepted or stale, never anything else.
                    match guard.check_and_record("hot", token) {
                        Ok(_) | Err(GuardError::StaleToken { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    assert_eq!(guard.highest("hot"), Some(19_999 * 4 + 3));
}

/// The abort type of closures that never abort.
type NoAbort = ConflictableTransactionError<Infallible>;

fn temp_db() -> (tempfile::TempDir, sled::Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path()).unwrap();
    (dir, db)
}

fn encode(token: u64, value: &[u8]) -> Vec<u8> {
    let mut out = token.to_be_bytes().to_vec();
    out.extend_from_slice(value);
    out
}

fn token_of(value: &[u8]) -> u64 {
    u64::from_be_bytes(value[..8].try_into().unwrap())
}

#[test]
fn sled_accepts_equal_and_higher_rejects_older() {
    let (_dir, db) = temp_db();
    let data = db.open_tree("data").unwrap();
    let guard = SledGuard::open(&db).unwrap();
    let put = |token: u64, value: &'static str| {
        guard.write("r", token, &data, |tx| -> TxResult {
            tx.insert("k", encode(token, value.as_bytes()))?;
            Ok(())
        })
    };
    put(5, "a").unwrap();
    put(5, "b").unwrap();
    put(9, "c").unwrap();
    assert_stale(put(8, "zombie"), "r", 8, 9);
    let stored = data.get("k").unwrap().unwrap();
    assert_eq!((token_of(&stored), &stored[8..]), (9, &b"c"[..]));
    assert_eq!(guard.highest("r").unwrap(), Some(9));
    assert_eq!(
        guard.check_and_record("r", 10).unwrap(),
        Admitted::Newer { previous: 9 }
    );
    assert_stale(guard.check_and_record("r", 9), "r", 9, 10);
}

#[test]
fn sled_aborted_write_changes_nothing_and_many_trees_commit_together() {
    let (_dir, db) = temp_db();
    let a = db.open_tree("a").unwrap();
    let b = db.open_tree("b").unwrap();
    let guard = SledGuard::open(&db).unwrap();

    let err = guard
        .write_many("r", 3, &[&a, &b], |trees| {
            trees[0].insert("k", "a3")?;
            sled::transaction::abort::<(), _>("validation failed")
        })
        .unwrap_err();
    assert!(matches!(err, GuardError::Aborted("validation failed")));
    assert_eq!(guard.highest("r").unwrap(), None);
    assert_eq!(a.get("k").unwrap(), None);

    let n = guard
        .write_many("r", 3, &[&a, &b], |trees| {
            trees[0].insert("k", "a3")?;
            trees[1].insert("k", "b3")?;
            Ok::<_, NoAbort>(2)
        })
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(a.get("k").unwrap().as_deref(), Some(&b"a3"[..]));
    assert_eq!(b.get("k").unwrap().as_deref(), Some(&b"b3"[..]));
    assert_eq!(guard.highest("r").unwrap(), Some(3));
}

#[test]
fn sled_racing_writers_never_let_the_older_overwrite() {
    let (_dir, db) = temp_db();
    let data = db.open_tree("data").unwrap();
    let guard = SledGuard::open(&db).unwrap();
    let runs = [AtomicUsize::new(0), AtomicUsize::new(0)];
    race(
        4,
        150,
        |pair, token| {
            let resource = format!("r{pair}");
            let key = format!("k{pair}");
            match guard.write(&resource, token, &data, |tx| {
                let previous = tx.get(key.as_bytes())?.map(|v| token_of(&v));
                tx.insert(key.as_bytes(), encode(token, b"v"))?;
                Ok::<_, NoAbort>(previous)
            }) {
                Ok(previous) => {
                    runs[(token % 2) as usize].fetch_add(1, Ordering::Relaxed);
                    Ok(previous)
                }
                Err(GuardError::StaleToken { .. }) => Err(()),
                Err(e) => panic!("{e}"),
            }
        },
        |pair| data.get(format!("k{pair}")).unwrap().map(|v| token_of(&v)),
    );
    assert_eq!(runs[0].load(Ordering::Relaxed), 4 * 150);
    for pair in 0..4 {
        assert_eq!(guard.highest(&format!("r{pair}")).unwrap(), Some(300));
    }
}

/// Which API a racing writer uses.
#[derive(Clone, Copy, Debug)]
enum Route {
    Insert,
    InsertDurable,
    Plain,
    Transaction,
    TransactionDurable,
}

/// One guarded write of `token` under `resource` into `key` by `path`;
/// returns the token stored before it, or `Err(())` if it was refused.
fn sled_put(
    guard: &SledGuard,
    data: &sled::Tree,
    route: Route,
    resource: &str,
    key: &str,
    token: u64,
) -> Result<Option<u64>, ()> {
    fn outcome<E: std::fmt::Debug>(
        result: Result<Option<u64>, GuardError<E>>,
    ) -> Result<Option<u64>, ()> {
        match result {
            Ok(previous) => Ok(previous),
            Err(GuardError::StaleToken { .. }) => Err(()),
            Err(e) => panic!("{e:?}"),
        }
    }
    match route {
        Route::Insert => outcome(
            guard
                .insert(resource, token, data, key, encode(token, b"v"))
                .map(|old| old.map(|v| token_of(&v))),
        ),
        Route::InsertDurable => outcome(
            guard
                .insert_durable(resource, token, data, key, encode(token, b"v"))
                .map(|old| old.map(|v| token_of(&v))),
        ),
        Route::Plain => outcome(guard.write_plain(resource, token, || {
            data.insert(key, encode(token, b"v"))
                .map(|old| old.map(|v| token_of(&v)))
        })),
        Route::Transaction => outcome(guard.write(resource, token, data, |tx| {
            let previous = tx.get(key)?.map(|v| token_of(&v));
            tx.insert(key, encode(token, b"v"))?;
            Ok::<_, NoAbort>(previous)
        })),
        Route::TransactionDurable => outcome(guard.write_durable(resource, token, data, |tx| {
            let previous = tx.get(key)?.map(|v| token_of(&v));
            tx.insert(key, encode(token, b"v"))?;
            Ok::<_, NoAbort>(previous)
        })),
    }
}

#[test]
fn sled_racing_writers_on_every_path_pair_never_let_the_older_overwrite() {
    use Route::*;
    // (older's path, newer's path): the fast paths against each other and
    // against the transactional path, in both roles.
    let pairs = [
        (Insert, Insert),
        (Plain, Insert),
        (Insert, Plain),
        (Plain, Plain),
        (Insert, Transaction),
        (Transaction, Insert),
        (Plain, Transaction),
        (Transaction, Plain),
        (InsertDurable, TransactionDurable),
        (TransactionDurable, InsertDurable),
    ];
    let (_dir, db) = temp_db();
    let data = db.open_tree("data").unwrap();
    let guard = SledGuard::open(&db).unwrap();
    race(
        pairs.len(),
        100,
        |pair, token| {
            let (older, newer) = pairs[pair];
            let route = if token % 2 == 1 { older } else { newer };
            sled_put(
                &guard,
                &data,
                route,
                &format!("r{pair}"),
                &format!("k{pair}"),
                token,
            )
        },
        |pair| data.get(format!("k{pair}")).unwrap().map(|v| token_of(&v)),
    );
    for pair in 0..pairs.len() {
        assert_eq!(guard.highest(&format!("r{pair}")).unwrap(), Some(200));
    }
}

#[test]
fn sled_two_guards_on_one_tree_exclude_each_other() {
    // Opened separately (not cloned): the locks are per process, so the
    // two guards still serialize the writers of a resource.
    let (_dir, db) = temp_db();
    let data = db.open_tree("data").unwrap();
    let guards = [SledGuard::open(&db).unwrap(), SledGuard::open(&db).unwrap()];
    race(
        2,
        150,
        |pair, token| {
            let guard = &guards[(token % 2) as usize];
            sled_put(
                guard,
                &data,
                Route::Insert,
                &format!("r{pair}"),
                &format!("k{pair}"),
                token,
            )
        },
        |pair| data.get(format!("k{pair}")).unwrap().map(|v| token_of(&v)),
    );
}

#[test]
fn sled_fast_path_data_never_goes_backwards_under_interleaved_tokens() {
    // Four threads take tokens from one counter and write one key under
    // one resource, so tokens arrive out of order. Every accepted write
    // must find an older (or equal) token in the data: the data never
    // goes backwards, whatever the interleaving. A refused write leaves
    // nothing: its closure never runs.
    let (_dir, db) = temp_db();
    let data = db.open_tree("data").unwrap();
    let guard = SledGuard::open(&db).unwrap();
    let counter = std::sync::atomic::AtomicU64::new(1);
    let (accepted, refused, runs) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    let landed = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for t in 0..4 {
            let (guard, data, counter) = (&guard, &data, &counter);
            let (accepted, refused, runs, landed) = (&accepted, &refused, &runs, &landed);
            s.spawn(move || {
                for _ in 0..2_000 {
                    let token = counter.fetch_add(1, Ordering::Relaxed);
                    let result = if t % 2 == 0 {
                        guard
                            .insert("hot", token, data, "k", encode(token, b"v"))
                            .map(|old| old.map(|v| token_of(&v)))
                    } else {
                        guard
                            .write_plain("hot", token, || {
                                runs.fetch_add(1, Ordering::Relaxed);
                                // Under the resource's lock: the order of this
                                // list is the order in which writes land.
                                landed.lock().push(token);
                                data.insert("k", encode(token, b"v"))
                                    .map(|old| old.map(|v| token_of(&v)))
                            })
                            .map_err(|e| match e {
                                GuardError::StaleToken {
                                    resource,
                                    offered,
                                    highest,
                                } => GuardError::StaleToken {
                                    resource,
                                    offered,
                                    highest,
                                },
                                other => panic!("{other}"),
                            })
                    };
                    match result {
                        Ok(previous) => {
                            assert!(
                                previous.is_none_or(|p| p <= token),
                                "token {token} overwrote newer token {previous:?}"
                            );
                            accepted.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(GuardError::StaleToken {
                            offered, highest, ..
                        }) => {
                            assert!(offered < highest);
                            refused.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
    });
    let landed = landed.into_inner();
    assert!(
        landed.windows(2).all(|w| w[0] < w[1]),
        "writes landed out of order"
    );
    assert_eq!(runs.load(Ordering::Relaxed), landed.len());
    assert_eq!(
        accepted.load(Ordering::Relaxed) + refused.load(Ordering::Relaxed),
        8_000
    );
    let last = token_of(&data.get("k").unwrap().unwrap());
    assert_eq!(guard.highest("hot").unwrap(), Some(last));
}

#[test]
fn sled_fast_path_refused_writes_change_nothing() {
    let (_dir, db) = temp_db();
    let data = db.open_tree("data").unwrap();
    let guard = SledGuard::open(&db).unwrap();
    assert_eq!(
        guard.insert("r", 5, &data, "k", encode(5, b"a")).unwrap(),
        None
    );
    assert_eq!(
        guard.insert("r", 5, &data, "k2", encode(5, b"b")).unwrap(),
        None
    );
    guard.insert("r", 9, &data, "k", encode(9, b"c")).unwrap();
    assert_stale(
        guard.insert("r", 8, &data, "k", encode(8, b"zombie")),
        "r",
        8,
        9,
    );
    assert_stale(
        guard.insert("r", 8, &data, "new", encode(8, b"zombie")),
        "r",
        8,
        9,
    );
    let ran = std::cell::Cell::new(false);
    let plain = guard.write_plain("r", 3, || {
        ran.set(true);
        Ok::<_, Infallible>(())
    });
    assert_stale(plain, "r", 3, 9);
    assert!(!ran.get(), "a refused closure never runs");
    assert_eq!(token_of(&data.get("k").unwrap().unwrap()), 9);
    assert_eq!(data.get("new").unwrap(), None);
    assert_eq!(guard.highest("r").unwrap(), Some(9));
    // The transactional path sees the fast path's marks, and back.
    let tx = guard.write("r", 8, &data, |tx| -> TxResult {
        tx.insert("k", encode(8, b"zombie"))?;
        Ok(())
    });
    assert_stale(tx, "r", 8, 9);
    guard
        .write("r", 12, &data, |tx| -> TxResult {
            tx.insert("k", encode(12, b"d"))?;
            Ok(())
        })
        .unwrap();
    assert_stale(
        guard.insert("r", 10, &data, "k", encode(10, b"z")),
        "r",
        10,
        12,
    );
    assert_eq!(token_of(&data.get("k").unwrap().unwrap()), 12);
}

#[test]
fn sled_plain_write_that_fails_keeps_the_raised_mark() {
    let (_dir, db) = temp_db();
    let guard = SledGuard::open(&db).unwrap();
    guard.check_and_record("r", 4).unwrap();
    let err = guard
        .write_plain("r", 6, || Err::<(), _>("disk full"))
        .unwrap_err();
    assert!(matches!(err, GuardError::Aborted("disk full")), "{err:?}");
    // Raised before the closure ran, and kept: 6 was a valid, newer token.
    assert_eq!(guard.highest("r").unwrap(), Some(6));
    assert_stale(guard.check_and_record("r", 5), "r", 5, 6);
    assert_eq!(guard.check_and_record("r", 6).unwrap(), Admitted::Same);
}

/// Power loss, modelled: the device holds what the last `fdatasync` of
/// sled's log covered, and nothing written after it. The flusher copies the
/// database directory right after each of its syncs (and before answering
/// its waiters); the machine then dies and comes back from the last copy.
/// sled's own background flusher is off, so only the guard's syncs count.
/// Every acknowledged durable write and its mark must come back, and the
/// stale tokens they superseded must stay refused.
#[test]
fn acknowledged_durable_writes_survive_a_modelled_power_cut() {
    let dir = tempfile::tempdir().unwrap();
    let device = tempfile::tempdir().unwrap();
    let synced = device.path().join("db");
    let acked = 40;
    {
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .unwrap();
        let data = db.open_tree("data").unwrap();
        let (from, to) = (dir.path().to_owned(), synced.clone());
        let flusher = GroupFlusher::start_synced_observed(db.clone(), dir.path(), move || {
            let _ = std::fs::remove_dir_all(&to);
            let copied = std::process::Command::new("cp")
                .arg("-a")
                .arg(&from)
                .arg(&to)
                .status();
            assert!(copied.is_ok_and(|s| s.success()), "cp -a failed");
        })
        .unwrap();
        let guard = SledGuard::with_flusher(&db, DEFAULT_TREE, flusher).unwrap();
        for token in 1..=acked {
            let key = format!("k{token}");
            guard
                .insert_durable("r", token, &data, key.as_bytes(), encode(token, b"v"))
                .unwrap();
        }
        // Written but never acknowledged as durable: may be lost.
        guard
            .insert("r", acked + 1, &data, "late", encode(acked + 1, b"v"))
            .unwrap();
    }
    let db = sled::open(&synced).unwrap();
    let data = db.open_tree("data").unwrap();
    let guard = SledGuard::open(&db).unwrap();
    for token in 1..=acked {
        let value = data.get(format!("k{token}")).unwrap();
        assert!(value.is_some(), "acknowledged write {token} lost");
    }
    let highest = guard.highest("r").unwrap().expect("the mark was lost");
    assert!(
        highest >= acked,
        "mark {highest} below acknowledged {acked}"
    );
    assert_stale(
        guard.insert("r", acked - 1, &data, "zombie", encode(acked - 1, b"z")),
        "r",
        acked - 1,
        highest,
    );
}

#[test]
fn sled_marks_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = sled::open(dir.path()).unwrap();
        let data = db.open_tree("data").unwrap();
        let guard = SledGuard::open(&db).unwrap();
        guard
            .write_durable("r", 7, &data, |tx| {
                tx.insert("k", encode(7, b"seven"))?;
                Ok::<_, NoAbort>(())
            })
            .unwrap();
    }
    let db = reopen(dir.path());
    let data = db.open_tree("data").unwrap();
    let guard = SledGuard::open(&db).unwrap();
    assert_eq!(guard.highest("r").unwrap(), Some(7));
    let result = guard.write("r", 6, &data, |tx| {
        tx.insert("k", encode(6, b"six"))?;
        Ok::<_, NoAbort>(())
    });
    assert_stale(result, "r", 6, 7);
    assert_eq!(token_of(&data.get("k").unwrap().unwrap()), 7);
}

#[test]
fn sled_corrupt_mark_is_reported() {
    let (_dir, db) = temp_db();
    let data = db.open_tree("data").unwrap();
    let guard = SledGuard::open(&db).unwrap();
    db.open_tree(DEFAULT_TREE)
        .unwrap()
        .insert("r", "xyz")
        .unwrap();
    let err = guard
        .write("r", 1, &data, |_| Ok::<_, NoAbort>(()))
        .unwrap_err();
    assert!(matches!(err, GuardError::Corrupt { len: 3, .. }), "{err:?}");
    assert!(matches!(
        guard.highest("r"),
        Err(GuardError::Corrupt { .. })
    ));
}

#[test]
fn sled_forget_readmits_older_tokens() {
    let (_dir, db) = temp_db();
    let guard = SledGuard::open(&db).unwrap();
    guard.check_and_record("r", 9).unwrap();
    assert_eq!(guard.forget("r").unwrap(), Some(9));
    assert_eq!(guard.check_and_record("r", 1).unwrap(), Admitted::First);
}

#[test]
fn many_concurrent_flushes_complete() {
    let (_dir, db) = temp_db();
    let data = db.open_tree("data").unwrap();
    let guard = SledGuard::open(&db).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::scope(|s| {
        for t in 0..16u64 {
            let (guard, data, done_tx) = (&guard, &data, done_tx.clone());
            s.spawn(move || {
                for i in 0..5 {
                    guard
                        .write_durable(&format!("r{t}"), i, data, |tx| {
                            tx.insert(format!("k{t}").as_bytes(), &i.to_be_bytes()[..])?;
                            Ok::<_, NoAbort>(())
                        })
                        .unwrap();
                }
                done_tx.send(()).unwrap();
            });
        }
        for _ in 0..16 {
            done_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("a flush hung");
        }
    });
    for t in 0..16u64 {
        let value = data
            .get(format!("k{t}"))
            .unwrap()
            .expect("a durable write is missing");
        assert_eq!(&value[..], &4u64.to_be_bytes()[..]);
    }
}

#[tokio::test]
async fn async_flush_waits_are_shared() {
    let (_dir, db) = temp_db();
    let guard = SledGuard::open(&db).unwrap();
    let waits = (0..32).map(|_| guard.wait_flushed());
    let all = futures_util::future::join_all(waits);
    let results = tokio::time::timeout(Duration::from_secs(10), all)
        .await
        .expect("flushes hung");
    assert!(results.iter().all(Result::is_ok));
    // All 32 were queued before the first flush could finish.
    let flushes = guard.flusher().flushes();
    assert!(
        (1..32).contains(&flushes),
        "{flushes} flushes for 32 waiters"
    );
}

#[test]
fn sled_refuses_to_write_the_guard_tree() {
    let (_dir, db) = temp_db();
    let guard = SledGuard::open(&db).unwrap();
    let own = db.open_tree(DEFAULT_TREE).unwrap();
    let err = guard
        .write("r", 1, &own, |_| -> TxResult { Ok(()) })
        .unwrap_err();
    assert!(
        matches!(err, GuardError::Storage(sled::Error::Unsupported(_))),
        "{err:?}"
    );
    let err = guard.insert("r", 1, &own, "r", "x").unwrap_err();
    assert!(
        matches!(err, GuardError::Storage(sled::Error::Unsupported(_))),
        "{err:?}"
    );
    assert_eq!(guard.highest("r").unwrap(), None);
}

/// Fast-path throughput on one thread over 1,000 resources. Run alone,
/// with optimizations for a meaningful figure:
/// `cargo test --release --lib guard::tests::fast_path_throughput -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run alone"]
fn fast_path_throughput() {
    let names: Vec<String> = (0..1000).map(|i| format!("res-{i:08}")).collect();
    let guard = MemoryGuard::new();
    let rounds = 2_000u64;
    let start = std::time::Instant::now();
    for token in 0..rounds {
        for name in &names {
            guard.check_and_record(name, token).unwrap();
        }
    }
    let elapsed = start.elapsed();
    let checks = rounds as f64 * names.len() as f64;
    println!("{:.1} M checks/s", checks / elapsed.as_secs_f64() / 1e6);
}

/// Resident memory per tracked resource. Run alone:
/// `cargo test --lib guard::tests::memory_per_resource -- --ignored --nocapture`.
#[test]
#[ignore = "measures RSS; run alone"]
fn memory_per_resource() {
    fn rss_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }
    const N: usize = 1_000_000;
    let names: Vec<String> = (0..N).map(|i| format!("res-{i:08}")).collect();
    let guard = MemoryGuard::new();
    let before = rss_bytes();
    for name in &names {
        guard.check_and_record(name, 1).unwrap();
    }
    let after = rss_bytes();
    println!(
        "{} bytes per resource ({}-byte names)",
        (after - before) / N,
        names[0].len()
    );
    assert_eq!(guard.len(), N);
}

/// Opens the sled database at `path` again after the test dropped its last
/// handle. sled's own background threads let go of the directory's lock a
/// moment after the drop, so on a busy machine the first attempts can find
/// it still held: retry for a bounded time.
pub(crate) fn reopen(path: &std::path::Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match sled::open(path) {
            Ok(db) => return db,
            Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("lock") => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(e) => panic!("cannot reopen {}: {e}", path.display()),
        }
    }
}
