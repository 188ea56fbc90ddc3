//! The Raft log: an append-only file of our own, every append `fdatasync`ed
//! before openraft is told it is durable.
//!
//! An append writes its record, `fdatasync`s the file and only then tells
//! openraft the entries are durable, all within the call. openraft 0.9
//! waits for that report inside its core loop before it does anything else
//! (replicating the entries included), so appends never overlap and a sync
//! thread to gather them would only add two thread switches to every
//! commit. The lock is not held during the sync: readers (replication, the
//! snapshot policy) go on meanwhile. The vote is synced before `save_vote`
//! returns.
//!
//! The file is preallocated: it is grown [`PREALLOCATE`] bytes at a time
//! with zeros written and synced, and records overwrite those zeros. An
//! `fdatasync` then has only the data to flush, not the file's size too (an
//! extra metadata write on every sync of an appended file, and a journal
//! commit on a journaling filesystem): about a quarter less per sync here,
//! and there are two syncs in series in every commit. etcd preallocates its
//! WAL segments for the same reason.
//!
//! The records, each `[len u32][crc32 u32][JSON]` of one [`LogOp`]
//! (entries appended, a suffix truncated, a prefix purged, the vote, the
//! committed id), are replayed in order into memory on open; replay stops
//! at a zero length (the preallocated space after the last record) or at a
//! record that is short or fails its CRC (a write torn by a crash: it was
//! never acknowledged), and the file is cut there. When most of the file
//! describes purged entries, it is rewritten
//! (a temporary file, synced, renamed over the old one, directory synced)
//! holding only the live state, so the file stays proportional to the
//! entries since the last snapshot.
//!
//! Entries are kept in memory between snapshots: openraft purges them once
//! a snapshot covers them (see [`node`](super::node) for the policy).
//!
//! The file is created with mode 0600: a `Keys` entry carries the signing
//! key's secret.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{
    AnyError, Entry, LogId, OptionalSend, RaftLogReader, StorageError, StorageIOError, Vote,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{NodeId, TypeConfig};

/// One record of the log file.
#[derive(Debug, Serialize, Deserialize)]
enum LogOp {
    Append(Vec<Entry<TypeConfig>>),
    /// Delete entries at and after this index.
    Truncate(u64),
    /// Delete entries up to and including this id.
    Purge(LogId<NodeId>),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
}

/// How much the log file grows at a time, zero-filled (see the module doc).
const PREALLOCATE: u64 = 4 << 20;

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// Where the next record goes: the end of the last one.
    end: u64,
    /// The file's size; bytes from `end` to here are zeros.
    size: u64,
    /// Shared with `append`, which syncs without the lock.
    file: Arc<File>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
    /// Records in the file, to decide when to rewrite it.
    records: u64,
}

/// The log store (cheap to clone: clones share the file).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
    /// Bytes of entries appended since the store opened (the snapshot
    /// policy compares them with the snapshot's size).
    appended: Arc<AtomicU64>,
    /// Seconds per append, its write and `fdatasync` together
    /// (`leasehold_wal_write_duration_seconds`).
    write_duration: metrics::Histogram,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

fn io_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::write_logs(AnyError::new(&e)),
    }
}

fn frame(op: &LogOp, out: &mut Vec<u8>) -> std::io::Result<()> {
    let body = serde_json::to_vec(op).map_err(std::io::Error::other)?;
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

impl LogStore {
    /// Whether an entry in the log carries a request that `matches`.
    pub fn any_request(&self, matches: impl Fn(&super::Request) -> bool) -> bool {
        self.inner
            .lock()
            .entries
            .values()
            .any(|e| match &e.payload {
                openraft::EntryPayload::Normal(r) => matches(r),
                _ => false,
            })
    }

    /// Bytes of entries appended since the store opened, kept current.
    pub fn appended_bytes(&self) -> Arc<AtomicU64> {
        self.appended.clone()
    }

    /// Opens (or creates) `dir/raft-log`, replaying what it holds; each
    /// append's duration goes to `write_duration`.
    pub fn open(dir: &Path, write_duration: metrics::Histogram) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("raft-log");
        let mut bytes = Vec::new();
        if path.exists() {
            File::open(&path)?.read_to_end(&mut bytes)?;
        }
        let mut inner = Inner {
            path: path.clone(),
            file: {
                let mut o = OpenOptions::new();
                o.create(true).write(true);
                // Entries may carry the signing key's secret (`Request::Keys`).
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    o.mode(0o600);
                }
                Arc::new(o.open(&path)?)
            },
            end: 0,
            size: bytes.len() as u64,
            entries: BTreeMap::new(),
            vote: None,
            committed: None,
            purged: None,
            records: 0,
        };
        let mut at = 0usize;
        while bytes.len() - at >= 8 {
            let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or_default()) as usize;
            if len == 0 {
                break; // The preallocated zeros.
            }
            let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap_or_default());
            let Some(body) = bytes.get(at + 8..at + 8 + len) else {
                break;
            };
            if crc32fast::hash(body) != crc {
                break;
            }
            let Ok(op) = serde_json::from_slice::<LogOp>(body) else {
                break;
            };
            inner.replay(op);
            inner.records += 1;
            at += 8 + len;
        }
        inner.end = at as u64;
        if bytes[at..].iter().any(|&b| b != 0) {
            tracing::warn!(
                path = %path.display(),
                kept = at,
                dropped = bytes.len() - at,
                "the Raft log ends in a torn record (a crash mid-write); cutting it there"
            );
            inner.file.set_len(at as u64)?;
            inner.file.sync_all()?;
            inner.size = at as u64;
        }
        Ok(LogStore {
            inner: Arc::new(Mutex::new(inner)),
            appended: Arc::default(),
            write_duration,
        })
    }

    fn write(&self, op: &LogOp) -> Result<(), std::io::Error> {
        let mut inner = self.inner.lock();
        inner.write(op)
    }
}

impl Inner {
    fn replay(&mut self, op: LogOp) {
        match op {
            LogOp::Append(entries) => {
                for e in entries {
                    self.entries.insert(e.log_id.index, e);
                }
            }
            LogOp::Truncate(index) => {
                self.entries.split_off(&index);
            }
            LogOp::Purge(log_id) => {
                let keep = self.entries.split_off(&(log_id.index + 1));
                self.entries = keep;
                self.purged = Some(log_id);
            }
            LogOp::Vote(v) => self.vote = Some(v),
            LogOp::Committed(c) => self.committed = c,
        }
    }

    fn write(&mut self, op: &LogOp) -> std::io::Result<()> {
        self.write_unsynced(op)?;
        self.file.sync_data()
    }

    /// Writes one record; its size in bytes.
    fn write_unsynced(&mut self, op: &LogOp) -> std::io::Result<u64> {
        let mut buf = Vec::new();
        frame(op, &mut buf)?;
        let len = buf.len() as u64;
        if self.end + len > self.size {
            self.preallocate(self.end + len);
        }
        self.file.write_all_at(&buf, self.end)?;
        self.end += len;
        self.size = self.size.max(self.end);
        self.records += 1;
        Ok(len)
    }

    /// Grows the file past `needed` with zeros, synced: the records that
    /// overwrite them later sync without changing the file's size. On a
    /// disk too full for that, records go on extending the file instead.
    fn preallocate(&mut self, needed: u64) {
        let size = needed.max(self.size) + PREALLOCATE;
        let grown = crate::wal::write_zeros(&self.file, self.size, size - self.size)
            .and_then(|()| self.file.sync_data());
        match grown {
            Ok(()) => self.size = size,
            Err(e) => {
                tracing::warn!(error = %e, "cannot preallocate the Raft log; appending without");
                // Zeros that did land are harmless, but keep `size` exact.
                let _ = self.file.set_len(self.size);
            }
        }
    }

    /// Rewrites the file with only the live state, when most of it is dead.
    fn maybe_rewrite(&mut self) -> std::io::Result<()> {
        if self.records < 1024 || self.records < 4 * (self.entries.len() as u64 / 64 + 1) {
            return Ok(());
        }
        let tmp = self.path.with_extension("tmp");
        let mut buf = Vec::new();
        if let Some(v) = self.vote {
            frame(&LogOp::Vote(v), &mut buf)?;
        }
        if let Some(p) = self.purged {
            frame(&LogOp::Purge(p), &mut buf)?;
        }
        frame(&LogOp::Committed(self.committed), &mut buf)?;
        let mut records = 3;
        let entries: Vec<_> = self.entries.values().cloned().collect();
        for chunk in entries.chunks(64) {
            frame(&LogOp::Append(chunk.to_vec()), &mut buf)?;
            records += 1;
        }
        let mut f = super::private_file(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = Arc::new(OpenOptions::new().write(true).open(&self.path)?);
        self.end = buf.len() as u64;
        self.size = self.end;
        self.records = records;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let inner = self.inner.lock();
        Ok(inner.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let inner = self.inner.lock();
        let last = inner
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(inner.purged);
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.write(&LogOp::Vote(*vote)).map_err(io_err)?;
        self.inner.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not synced: a lost committed id is learnt again from the leader.
        let mut inner = self.inner.lock();
        inner
            .write_unsynced(&LogOp::Committed(committed))
            .map_err(io_err)?;
        inner.committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let started = std::time::Instant::now();
        let mut inner = self.inner.lock();
        let op = LogOp::Append(entries);
        match inner.write_unsynced(&op) {
            Ok(n) => {
                self.appended.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                drop(inner);
                let failed = io_err(std::io::Error::new(e.kind(), e.to_string()));
                callback.log_io_completed(Err(e));
                return Err(failed);
            }
        }
        inner.replay(op);
        let file = inner.file.clone();
        drop(inner);
        let synced = file.sync_data();
        self.write_duration.record(started.elapsed());
        callback.log_io_completed(synced);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // Synced with the next append: the file keeps its order, so a crash
        // before that sync loses the truncation and the appends together.
        let mut inner = self.inner.lock();
        inner
            .write_unsynced(&LogOp::Truncate(log_id.index))
            .map_err(io_err)?;
        inner.replay(LogOp::Truncate(log_id.index));
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // A purge lost in a crash only keeps entries a snapshot covers.
        let mut inner = self.inner.lock();
        inner
            .write_unsynced(&LogOp::Purge(log_id))
            .map_err(io_err)?;
        inner.replay(LogOp::Purge(log_id));
        inner.maybe_rewrite().map_err(io_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    /// `holds_key_set` finds a `Keys` entry in the log, and looking at a
    /// directory with no log creates none (the node would no longer look
    /// fresh).
    #[test]
    fn a_key_set_in_the_log_is_found_and_nothing_is_created() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!crate::raft::holds_key_set(dir.path()).unwrap());
        assert!(!dir.path().join("raft-log").exists());
        let store = LogStore::open(dir.path(), metrics::Histogram::noop()).unwrap();
        let promote = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(crate::raft::Request::Promote { node: 1 }),
        };
        store
            .inner
            .lock()
            .write_unsynced(&LogOp::Append(vec![promote]))
            .unwrap();
        assert!(!crate::raft::holds_key_set(dir.path()).unwrap());
        let set = crate::keys::KeySet::new([7; 32], 10);
        let keys = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
            payload: EntryPayload::Normal(crate::raft::Request::Keys {
                text: crate::raft::KeyText(set.encode()),
                base: 0,
            }),
        };
        store
            .inner
            .lock()
            .write_unsynced(&LogOp::Append(vec![keys]))
            .unwrap();
        assert!(crate::raft::holds_key_set(dir.path()).unwrap());
    }

    fn indexes(store: &LogStore) -> Vec<u64> {
        store.inner.lock().entries.keys().copied().collect()
    }

    /// Appends, a truncation, a purge and the vote survive a reopen; a torn
    /// tail is cut and the rest kept.
    #[tokio::test]
    async fn the_log_survives_a_reopen_and_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut store = LogStore::open(dir.path(), metrics::Histogram::noop()).unwrap();
            for i in 1..=10 {
                let mut inner = store.inner.lock();
                inner
                    .write_unsynced(&LogOp::Append(vec![entry(1, i)]))
                    .unwrap();
                inner.replay(LogOp::Append(vec![entry(1, i)]));
            }
            store
                .truncate(LogId::new(CommittedLeaderId::new(1, 1), 8))
                .await
                .unwrap();
            store
                .purge(LogId::new(CommittedLeaderId::new(1, 1), 3))
                .await
                .unwrap();
            store.save_vote(&Vote::new(2, 3)).await.unwrap();
        }
        // A torn record after the last, in the preallocated zeros.
        let path = dir.path().join("raft-log");
        let size = std::fs::metadata(&path).unwrap().len();
        let end = {
            let store = LogStore::open(dir.path(), metrics::Histogram::noop()).unwrap();
            let end = store.inner.lock().end;
            end
        };
        assert!(
            size > PREALLOCATE && size > end,
            "preallocated: {size} for {end}"
        );
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[200, 0, 0, 0, 1, 2, 3], end).unwrap();
        drop(f);
        {
            let mut store = LogStore::open(dir.path(), metrics::Histogram::noop()).unwrap();
            assert_eq!(indexes(&store), vec![4, 5, 6, 7]);
            // Appends go on where the torn record was cut off.
            store
                .inner
                .lock()
                .write_unsynced(&LogOp::Append(vec![entry(2, 8)]))
                .unwrap();
            // A committed id, then an append after it: both kept.
            let committed = LogId::new(CommittedLeaderId::new(2, 1), 8);
            store.save_committed(Some(committed)).await.unwrap();
            store
                .inner
                .lock()
                .write_unsynced(&LogOp::Append(vec![entry(2, 9)]))
                .unwrap();
            store.save_vote(&Vote::new(2, 3)).await.unwrap();
        }
        let mut store = LogStore::open(dir.path(), metrics::Histogram::noop()).unwrap();
        assert_eq!(indexes(&store), vec![4, 5, 6, 7, 8, 9]);
        assert_eq!(
            store.read_committed().await.unwrap().map(|l| l.index),
            Some(8)
        );
        assert_eq!(store.read_vote().await.unwrap(), Some(Vote::new(2, 3)));
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(3));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(9));
        let got = store.try_get_log_entries(5..7).await.unwrap();
        assert_eq!(
            got.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            vec![5, 6]
        );
    }
}
