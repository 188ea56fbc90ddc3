//! Crash test of [`SledGuard`]'s fast path: the `guard_writer` example does
//! guarded plain inserts from two threads with interleaved tokens while a
//! third flushes, is killed with SIGKILL mid-stream, and the test reopens its
//! database and checks what survived: every acknowledged write, no refused
//! write, no data without its mark, and stale tokens still refused.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use leasehold_guard::{GuardError, SledGuard};

use crate::support::example;

/// What the writer promised before it died.
#[derive(Default)]
struct Promises {
    /// (resource, token) of writes acknowledged after a flush.
    acked: BTreeSet<(String, u64)>,
    /// (resource, token) of writes refused as stale.
    stale: BTreeSet<(String, u64)>,
}

/// Runs the writer on `dir` until it has acknowledged `acks` writes (or 10 s
/// have passed), kills it with SIGKILL, and returns every complete line it
/// printed before dying.
fn write_then_kill(dir: &Path, acks: usize) -> Promises {
    let mut child = Command::new(example("guard_writer"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--max-seconds", "20s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn guard_writer");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match stdout.read_line(&mut line) {
                // A line cut by the kill has no newline: it promised nothing.
                Ok(0) | Err(_) => return,
                Ok(_) if !line.ends_with('\n') => return,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });

    let mut promises = Promises::default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while promises.acked.len() < acks && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => record(&line, &mut promises),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("guard_writer exited early"),
        }
    }
    // SIGKILL mid-stream: no chance to flush or clean up.
    child.kill().expect("kill -9");
    let _ = child.wait();
    // Whatever it printed before dying was promised too.
    reader.join().expect("the reader thread");
    for line in rx.try_iter() {
        record(&line, &mut promises);
    }
    promises
}

/// Records one complete line of the writer's stdout.
fn record(line: &str, promises: &mut Promises) {
    let fields: Vec<&str> = line.split_whitespace().collect();
    match fields[..] {
        ["ready"] => {}
        ["ack", resource, token] => {
            promises
                .acked
                .insert((resource.to_owned(), token.parse().expect("token")));
        }
        ["stale", resource, token] => {
            promises
                .stale
                .insert((resource.to_owned(), token.parse().expect("token")));
        }
        _ => panic!("unexpected line from guard_writer: {line:?}"),
    }
}

fn token_of(value: &[u8]) -> u64 {
    u64::from_be_bytes(value.try_into().expect("8-byte token value"))
}

/// Reopens the killed writer's database and checks the fast path's promises.
fn check_after_crash(dir: &Path, promises: &Promises) {
    let db = sled::open(dir).expect("reopen after kill -9");
    let data = db.open_tree("data").expect("data tree");
    let guard = SledGuard::open(&db).expect("guard");

    // Every write acknowledged after a flush is there, with its value.
    for (resource, token) in &promises.acked {
        let key = format!("{resource}/{token:020}");
        let value = data.get(&key).expect("read");
        assert_eq!(
            value.as_deref().map(token_of),
            Some(*token),
            "acknowledged write {key} was lost"
        );
    }
    // No write refused as stale left anything behind.
    for (resource, token) in &promises.stale {
        let key = format!("{resource}/{token:020}");
        assert_eq!(
            data.get(&key).expect("read"),
            None,
            "refused write {key} is present"
        );
    }
    // No data without its mark: every surviving record's token is at most
    // its resource's mark (acknowledged or not).
    let mut newest: BTreeMap<String, u64> = BTreeMap::new();
    for entry in data.iter() {
        let (key, value) = entry.expect("scan");
        let key = std::str::from_utf8(&key).expect("utf-8 key");
        let (resource, token) = key.split_once('/').expect("RESOURCE/TOKEN");
        let token: u64 = token.parse().expect("numeric token");
        assert_eq!(token_of(&value), token, "{key}");
        let n = newest.entry(resource.to_owned()).or_default();
        *n = (*n).max(token);
    }
    assert!(!newest.is_empty(), "nothing survived");
    for (resource, &token) in &newest {
        let mark = guard.highest(resource).expect("mark");
        assert!(
            mark.is_some_and(|m| m >= token),
            "{resource}: data with token {token} survived but the mark is {mark:?}"
        );
    }
    // Stale tokens are still refused after the restart, and change nothing;
    // the mark's own token is still accepted (a retry of a cut write).
    for resource in newest.keys() {
        let mark = guard
            .highest(resource)
            .expect("mark")
            .expect("checked above");
        let key = format!("{resource}/{:020}", mark - 1);
        let before = data.get(&key).expect("read");
        match guard.insert(resource, mark - 1, &data, &key, &[9u8; 8][..]) {
            Err(GuardError::StaleToken {
                offered, highest, ..
            }) => assert_eq!((offered, highest), (mark - 1, mark)),
            other => panic!("{resource}: token {} after restart: {other:?}", mark - 1),
        }
        assert_eq!(data.get(&key).expect("read"), before, "{key} changed");
        let key = format!("{resource}/{mark:020}");
        guard
            .insert(resource, mark, &data, &key, &mark.to_be_bytes()[..])
            .expect("the mark's own token is accepted after restart");
        assert_eq!(guard.highest(resource).expect("mark"), Some(mark));
    }
}

/// Ten kills at different depths of the stream. The writer's flushes land
/// anywhere in its writers' streams, so in about half the rounds the last
/// flush cut a write between its mark and its data (the mark survives
/// alone, higher than the resource's newest data). With the two inserts in
/// the other order (data first) this test fails within a few rounds: the
/// data survives without its mark.
#[test]
fn fast_path_keeps_acked_writes_and_marks_through_kill_9() {
    for acks in [200, 300, 500, 700, 1_000, 1_500, 2_000, 3_000, 5_000, 8_000] {
        let dir = tempfile::tempdir().expect("temp dir");
        let promises = write_then_kill(dir.path(), acks);
        assert!(
            promises.acked.len() >= acks,
            "only {} writes acknowledged within 10 s",
            promises.acked.len()
        );
        check_after_crash(dir.path(), &promises);
    }
}
