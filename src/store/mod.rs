//! The store: the only module that knows sled and the disk.
//!
//! A data directory holds three things:
//!
//! - `wal/`: the write-ahead log (`wal.rs`). Every batch of changes is
//!   written there as one record, synchronously (`O_DIRECT | O_DSYNC`),
//!   before any of it is answered.
//! - `db/`: a sled database with one tree, the checkpointed table. Keys
//!   start with a one-byte tag:
//!   `L` + resource → the live lease on it ([`LeaseRecord`]);
//!   `R` + request id → an idempotency key ([`RequestRecord`]);
//!   `H` + resource + `\0` + token → one past grant, for operators' history;
//!   `Mtoken` → the highest token granted.
//! - `tokens`: the token reservation, 16 bytes, overwritten in place and
//!   `fdatasync`ed. Every token handed out is at or below it.
//!
//! # Durability
//!
//! [`Store::commit`] turns a batch of changes into key/value operations,
//! raises the token reservation (synced) if the batch holds a token above
//! it, and writes the operations to the log as one record with a
//! synchronous write. So once `commit` returns, the whole batch survives a
//! crash of the process (`kill -9`) **and of the machine** (power loss): it
//! is on the device, in the log.
//!
//! The same operations go into an in-memory *overlay* (coalesced per key),
//! which every read of the table consults on top of sled. Once a segment's
//! worth ([`SEGMENT_BYTES`]) has been logged, the overlay is frozen and the
//! checkpoint thread writes it into sled (one insert per key however often
//! it changed), calls sled's `flush()` and `fdatasync`s sled's log file
//! (`flush()` alone does not reach the device; see shared FACTS), and only
//! then deletes the log segments the checkpoint covers. So sled is off the
//! request path. A start-up opens sled, replays what is left of the log
//! over it (idempotent, see `wal.rs`) and checkpoints; so does a
//! graceful [`Store::close`].
//!
//! The reservation is separate from the log so that one `fdatasync` covers
//! [`RESERVATION_BLOCK`] grants and a damaged or deleted database can never
//! reset the token sequence.
//!
//! Renewals that keep the TTL are not written: a restart gives every lease a
//! full TTL anyway.
//!
//! # Files
//!
//! - `mod.rs`: [`Store`]: open and load, plan and commit a batch, history.
//! - `reservation.rs`: the token reservation file.
//! - `codec.rs`: the keys and record encodings above.
//! - `overlay.rs`: the changes logged but not yet in sled.
//! - `checkpoint.rs`: what the store shares with its checkpoint thread, and
//!   that thread.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::lease::{EndKind, FencingToken, RequestId, Resource};
use crate::state::{Change, LeaseRecord, RequestRecord};
use crate::wal::{Op, Wal};

mod checkpoint;
mod codec;
mod overlay;
mod reservation;

use checkpoint::{apply, open_sled, open_sled_log, Checkpoint, StoreState};
use codec::*;
use overlay::Overlay;
use reservation::Reservation;

/// How far ahead of the highest token a reservation reaches. A restart after
/// a crash skips at most this many tokens; one `fdatasync` covers this many grants.
pub const RESERVATION_BLOCK: u64 = 65_536;

/// The size of a log segment. The store checkpoints into sled once this much
/// has been logged since the last checkpoint, which bounds both the log's
/// size and the replay at start-up (to about two segments).
pub const SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// How often a failed database is reopened, at most.
const REOPEN_INTERVAL: Duration = Duration::from_millis(200);

/// How long to wait before trying again to preallocate a log segment after
/// a failure or on a nearly full disk.
const SPARE_RETRY: Duration = Duration::from_secs(5);

const RESERVATION_CHECK: u64 = 0x4c45_4153_4548_4f4c; // "LEASEHOL"
const TOKEN_KEY: &[u8] = b"Mtoken";

/// A storage failure. The coordinator answers UNAVAILABLE and hands out nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (disk full, I/O error, corruption).
    #[error("the database at {path} failed: {source}; check the disk (space, permissions) and the server log")]
    Sled {
        /// The database directory.
        path: PathBuf,
        /// sled's error.
        #[source]
        source: sled::Error,
    },
    /// A file operation failed.
    #[error("{what} {path} failed: {source}; check the disk (space, permissions)")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The store was closed (the server is shutting down).
    #[error("the store is closed because the server is shutting down; retry once it is back")]
    Closed,
    /// In a cluster: the change was not committed (no majority in time, or
    /// this node stopped leading); it may or may not take effect.
    #[error("the cluster did not commit the change: {0}; retry (the client moves to the leader)")]
    Replication(String),
    /// The data directory holds something this version cannot read.
    #[error("the data directory {path} is damaged: {what}; restore it from a backup or move it aside (starting empty would reuse tokens)")]
    Corrupt {
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Options for opening a store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How many past grants to keep per resource.
    pub history_per_resource: usize,
    /// sled's page cache, in bytes.
    pub cache_bytes: u64,
    /// The log's segment size, and how much is logged between checkpoints
    /// ([`SEGMENT_BYTES`] by default; tests make it small).
    pub segment_bytes: u64,
    /// Where commit and log-write latencies go (no-ops by default).
    pub metrics: crate::metrics::StoreMetrics,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history_per_resource: 16,
            cache_bytes: 128 * 1024 * 1024,
            segment_bytes: SEGMENT_BYTES,
            metrics: Default::default(),
        }
    }
}

/// Everything needed to rebuild the lease table after a restart.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Leases that were live.
    pub leases: Vec<LeaseRecord>,
    /// Idempotency keys.
    pub requests: Vec<(RequestId, RequestRecord)>,
    /// Every token ever handed out is at or below this.
    pub last_token: u64,
}

/// One past (or current) grant on a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantRecord {
    /// The grant's token.
    pub token: FencingToken,
    /// Who held it.
    pub holder: String,
    /// Its TTL.
    pub ttl: Duration,
    /// When it was granted (Unix ms).
    pub acquired_unix_ms: u64,
    /// How and when (Unix ms) it ended; `None` while live.
    pub ended: Option<(EndKind, u64)>,
}

/// The persistent side of the coordinator. See the module docs.
///
/// Only one thread (the committer) calls [`Store::commit`]; the readers
/// ([`Store::history`], [`Store::size_on_disk`]) may run on any thread.
#[derive(Debug)]
pub struct Store {
    shared: Arc<StoreState>,
    /// Set by [`Store::close`]: the database is gone for good.
    closed: AtomicBool,
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<Checkpoint>, JoinHandle<()>)>>,
    reservation: Mutex<Reservation>,
    /// History entries per recently granted resource (see `trim_history`).
    trims: Mutex<HashMap<Resource, VecDeque<u64>>>,
}

/// Most resources whose history size the store remembers at once.
const TRIM_CACHE: usize = 65_536;

impl Store {
    /// Opens (or creates) the data directory, replays the log into the
    /// database, checkpoints, and starts the checkpointer thread.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            what: "creating",
            path: dir.to_owned(),
            source,
        })?;
        let db_path = dir.join("db");
        let wal_path = dir.join("wal");
        let db_existed = db_path.exists();
        let reservation = Reservation::open(dir.join("tokens"), db_existed)?;
        let db = open_sled(&db_path, &options)?;
        let sled_log = open_sled_log(&db_path)?;
        let (wal, batches) =
            Wal::open(&wal_path, options.segment_bytes).map_err(|source| StoreError::Io {
                what: "reading the log in",
                path: wal_path.clone(),
                source,
            })?;
        let shared = Arc::new(StoreState {
            db: Mutex::new(Some(db.clone())),
            sled_log: Mutex::new(Some(sled_log)),
            wal: Mutex::new(wal),
            pending: Mutex::default(),
            broken: AtomicBool::new(false),
            db_path,
            wal_path,
            options,
        });
        // Replay: straight into sled (idempotent, see `wal`), then a
        // checkpoint, so the log starts empty.
        if !batches.is_empty() {
            for ops in &batches {
                apply(
                    &db,
                    ops.iter().map(|op| match op {
                        Op::Put(k, v) | Op::Insert(k, v) => (k, Some(v)),
                        Op::Delete(k) => (k, None),
                    }),
                )
                .map_err(shared.sled_err())?;
            }
            tracing::info!(
                batches = batches.len(),
                "replayed the log into the database"
            );
        }
        let upto = shared.wal.lock().segment();
        shared.checkpoint_into(&db, &[], upto)?;
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("leasehold-checkpoint".into())
                .spawn(move || shared.run_checkpoints(rx))
                .map_err(|source| StoreError::Io {
                    what: "starting the checkpoint thread for",
                    path: dir.to_owned(),
                    source,
                })?
        };
        Ok(Store {
            shared,
            closed: AtomicBool::new(false),
            checkpointer: Mutex::new(Some((tx, thread))),
            reservation: Mutex::new(reservation),
            trims: Mutex::new(HashMap::new()),
        })
    }

    /// Stops the checkpointer, writes everything logged into sled,
    /// checkpoints and closes the database now, even while other parts of
    /// the server still hold the `Store`: sled locks its directory until its
    /// last handle is gone, and a server restarted in the same process (or a
    /// quick restart by a supervisor) must be able to open it at once.
    /// Every later call fails with [`StoreError::Closed`]. If this fails,
    /// nothing is lost: the next start replays the log.
    pub fn close(&self) -> Result<(), StoreError> {
        self.closed.store(true, Ordering::SeqCst);
        if let Some((tx, thread)) = self.checkpointer.lock().take() {
            drop(tx);
            if thread.join().is_err() {
                tracing::error!("the checkpoint thread panicked");
            }
        }
        let shared = &self.shared;
        let result = (|| {
            let db = shared.db()?;
            let (frozen, active) = {
                let mut pending = shared.pending.lock();
                pending.born.clear();
                (pending.frozen.take(), std::mem::take(&mut pending.active))
            };
            let upto = {
                let mut wal = shared.wal.lock();
                wal.rotate()
                    .map_err(shared.wal_err("starting a new segment in"))?;
                wal.segment()
            };
            let overlays: Vec<&Overlay> = frozen.as_deref().into_iter().chain([&active]).collect();
            shared.checkpoint_into(&db, &overlays, upto)
        })();
        drop(shared.db.lock().take());
        *shared.sled_log.lock() = None;
        result
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.shared.db_path.clone(),
            what: what.into(),
        }
    }

    fn db(&self) -> Result<sled::Db, StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        self.shared.db()
    }

    /// Reads everything needed to rebuild the lease table. Call right after
    /// [`Store::open`], before any commit.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded {
            last_token: self.reserved(),
            ..Loaded::default()
        };
        let db = self.db()?;
        let sled_err = self.shared.sled_err();
        if let Some(v) = db.get(TOKEN_KEY).map_err(&sled_err)? {
            let token = Decoder::new(&v)
                .u64()
                .ok_or_else(|| self.corrupt("bad token key"))?;
            loaded.last_token = loaded.last_token.max(token);
        }
        for item in db.scan_prefix(b"L") {
            let (k, v) = item.map_err(&sled_err)?;
            let record = decode_lease(&k[1..], &v).ok_or_else(|| {
                self.corrupt(format!(
                    "unreadable lease record {:?}",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            loaded.last_token = loaded.last_token.max(record.token.0);
            loaded.leases.push(record);
        }
        for item in db.scan_prefix(b"R") {
            let (k, v) = item.map_err(&sled_err)?;
            let parsed = std::str::from_utf8(&k[1..])
                .ok()
                .and_then(|s| RequestId::new_optional(s).ok().flatten())
                .zip(decode_request(&v));
            let (id, record) =
                parsed.ok_or_else(|| self.corrupt("unreadable idempotency key record"))?;
            loaded.last_token = loaded.last_token.max(record.token.0);
            loaded.requests.push((id, record));
        }
        Ok(loaded)
    }

    /// Where this store's latencies are recorded.
    pub fn metrics(&self) -> &crate::metrics::StoreMetrics {
        &self.shared.options.metrics
    }

    /// The highest token the reservation covers.
    pub fn reserved(&self) -> u64 {
        self.reservation.lock().reserved
    }

    /// Persists a batch of changes: the reservation first (synced) when the
    /// batch needs it, then one log record (synced). Nothing of the batch
    /// may be acknowledged before this returns `Ok`; once it has, the batch
    /// survives power loss. The changes reach sled later, coalesced, through
    /// the checkpointer; reads see them at once through the overlay.
    pub fn commit<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> Result<(), StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        let forget_trims = |e| {
            // `plan` already moved the history lists on as if the batch were
            // written; it was not, so they must be learnt again from the table.
            self.trims.lock().clear();
            e
        };
        let ops = self.plan(changes).map_err(forget_trims)?;
        if ops.is_empty() {
            return Ok(());
        }
        let shared = &self.shared;
        let mut wal = shared.wal.lock();
        let started = std::time::Instant::now();
        let appended = wal.append(&ops);
        shared.options.metrics.wal_write.record(started.elapsed());
        appended
            .map_err(shared.wal_err("appending to"))
            .map_err(forget_trims)?;
        // Durable from here on.
        let mut pending = shared.pending.lock();
        for op in ops {
            match op {
                Op::Insert(k, v) => {
                    pending.born.insert(k.clone());
                    pending.active.insert(k, Some(v));
                }
                Op::Put(k, v) => drop(pending.active.insert(k, Some(v))),
                // Born in this window: sled never had it, nothing to delete.
                Op::Delete(k) if pending.born.remove(&k) => drop(pending.active.remove(&k)),
                Op::Delete(k) => drop(pending.active.insert(k, None)),
            };
        }
        if wal.written() - pending.logged_at_freeze >= shared.options.segment_bytes
            && pending.frozen.is_none()
        {
            // Freeze what is logged so far and let the checkpointer write it
            // into sled; it then deletes (or recycles) every segment before
            // the current one.
            let frozen = Arc::new(std::mem::take(&mut pending.active));
            // Frozen keys reach sled: a later delete must be written.
            pending.born.clear();
            pending.frozen = Some(frozen.clone());
            pending.logged_at_freeze = wal.written();
            let upto = wal.segment();
            if let Some((tx, _)) = &*self.checkpointer.lock() {
                let _ = tx.send(Checkpoint { frozen, upto });
            }
        }
        Ok(())
    }

    /// Turns changes into the operations that record them, and raises (and
    /// syncs) the token reservation when the batch needs it. Within one
    /// change the operations are ordered history first, the lease record
    /// last, so a reader of the table never sees a lease without its history.
    fn plan<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> Result<Vec<Op>, StoreError> {
        let mut ops = Vec::new();
        let mut max_token = 0;
        let mut trims = self.trims.lock();
        for change in changes.into_iter().filter(|c| c.needs_write()) {
            match change {
                Change::Granted(record) => {
                    max_token = max_token.max(record.token.0);
                    for old in self.trim_history(&mut trims, &record.resource, record.token)? {
                        ops.push(Op::Delete(old));
                    }
                    // The token is new, so is the key.
                    ops.push(Op::Insert(
                        history_key(&record.resource, record.token),
                        encode_history(record, None),
                    ));
                    if let Some(key) = &record.request_id {
                        ops.push(Op::Put(request_key(key), encode_request(record)));
                    }
                    ops.push(Op::Put(lease_key(&record.resource), encode_lease(record)));
                }
                Change::Renewed { record, .. } => {
                    ops.push(Op::Put(lease_key(&record.resource), encode_lease(record)));
                }
                Change::Ended {
                    record,
                    how,
                    at_unix_ms,
                } => {
                    ops.push(Op::Put(
                        history_key(&record.resource, record.token),
                        encode_history(record, Some((*how, *at_unix_ms))),
                    ));
                    ops.push(Op::Delete(lease_key(&record.resource)));
                }
                Change::RequestsCollected(keys) => {
                    ops.extend(keys.iter().map(|key| Op::Delete(request_key(key))));
                }
            }
        }
        if max_token > 0 {
            let mut reservation = self.reservation.lock();
            if max_token > reservation.reserved {
                reservation.write(max_token + RESERVATION_BLOCK)?;
            }
        }
        Ok(ops)
    }

    /// Records a new history entry (`token`) on `resource` and returns the
    /// keys of the entries that fall out of the newest
    /// `history_per_resource`.
    ///
    /// `trims` remembers, per recently granted resource, the tokens of its
    /// history entries, oldest first, so a busy resource is trimmed exactly
    /// and without reading the table. It is bounded: cleared when it grows
    /// past [`TRIM_CACHE`] resources; a resource it does not know costs one
    /// scan of the table (sled plus overlay).
    fn trim_history(
        &self,
        trims: &mut HashMap<Resource, VecDeque<u64>>,
        resource: &Resource,
        token: FencingToken,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let keep = self.shared.options.history_per_resource.max(1);
        if !trims.contains_key(resource) {
            self.db()?;
            let known: VecDeque<u64> = self
                .shared
                .scan(&history_prefix(resource))?
                .into_keys()
                .filter_map(|k| history_token(&k))
                .collect();
            if trims.len() >= TRIM_CACHE {
                trims.clear();
            }
            trims.insert(resource.clone(), known);
        }
        let Some(tokens) = trims.get_mut(resource) else {
            return Ok(Vec::new());
        };
        tokens.push_back(token.0);
        let mut old = Vec::new();
        while tokens.len() > keep {
            if let Some(t) = tokens.pop_front() {
                old.push(history_key(resource, FencingToken(t)));
            }
        }
        Ok(old)
    }

    /// The last grants on a resource, newest first.
    pub fn history(
        &self,
        resource: &Resource,
        limit: usize,
    ) -> Result<Vec<GrantRecord>, StoreError> {
        self.db()?;
        let entries = self.shared.scan(&history_prefix(resource))?;
        let mut out = Vec::new();
        for (k, v) in entries
            .iter()
            .rev()
            .take(limit.min(self.shared.options.history_per_resource))
        {
            let token = history_token(k).ok_or_else(|| self.corrupt("bad history key"))?;
            let grant = decode_history(FencingToken(token), v)
                .ok_or_else(|| self.corrupt("bad history record"))?;
            out.push(grant);
        }
        Ok(out)
    }

    /// Bytes the database and the log occupy on disk (about).
    pub fn size_on_disk(&self) -> u64 {
        let sled = self.db().map_or(0, |db| db.size_on_disk().unwrap_or(0));
        sled + self.shared.wal.lock().segment_len()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Stop the checkpointer; what it had not written is still in the log.
        if let Some((tx, thread)) = self.checkpointer.get_mut().take() {
            drop(tx);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::lease::{Holder, LeaseId};
    use checkpoint::CHECKPOINT_NICE;

    /// A lease record for tests (here and in `commit`).
    pub(crate) fn record(resource: &str, token: u64, key: Option<&str>) -> LeaseRecord {
        LeaseRecord {
            resource: Resource::new(resource).unwrap(),
            lease_id: LeaseId::random(),
            token: FencingToken(token),
            holder: Holder::new("h").unwrap(),
            ttl: Duration::from_millis(1500),
            acquired_unix_ms: 42,
            request_id: key.map(|k| RequestId::new_optional(k).unwrap().unwrap()),
        }
    }

    #[test]
    fn commit_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let a = record("a", 1, Some("k"));
        let b = record("b", 2, None);
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            s.commit(&[Change::Granted(a.clone()), Change::Granted(b.clone())])
                .unwrap();
            s.commit(&[Change::Ended {
                record: b.clone(),
                how: EndKind::Released,
                at_unix_ms: 50,
            }])
            .unwrap();
            assert_eq!(s.reserved(), 2 + RESERVATION_BLOCK);
        }
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.leases, vec![a.clone()]);
        assert_eq!(loaded.requests.len(), 1);
        assert_eq!(loaded.requests[0].1.lease_id, a.lease_id);
        assert_eq!(loaded.last_token, 2 + RESERVATION_BLOCK);
        let h = s.history(&b.resource, 10).unwrap();
        assert_eq!(h[0].ended, Some((EndKind::Released, 50)));
    }

    #[test]
    fn history_is_bounded_and_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), opts_3()).unwrap();
        for t in 1..=5 {
            s.commit(&[Change::Granted(record("r", t, None))]).unwrap();
        }
        s.commit(&[Change::Granted(record("r2", 6, None))]).unwrap();
        let tokens: Vec<u64> = s
            .history(&Resource::new("r").unwrap(), 10)
            .unwrap()
            .iter()
            .map(|g| g.token.0)
            .collect();
        assert_eq!(tokens, [5, 4, 3]);
        // Trimming is exact: the table holds the limit, also when one batch
        // grants the same resource several times.
        let r = Resource::new("r").unwrap();
        for t in (7..=60).step_by(2) {
            s.commit(&[
                Change::Granted(record("r", t, None)),
                Change::Granted(record("r", t + 1, None)),
            ])
            .unwrap();
            let on_disk = s.shared.scan(&history_prefix(&r)).unwrap().len();
            assert_eq!(on_disk, 3, "history entries after token {}", t + 1);
        }
        assert_eq!(history_tokens(&s, &r), [60, 59, 58]);
        // After a restart the store learns the history again from the table.
        s.close().unwrap();
        drop(s);
        let s = Store::open(dir.path(), opts_3()).unwrap();
        s.commit(&[Change::Granted(record("r", 61, None))]).unwrap();
        assert_eq!(history_tokens(&s, &r), [61, 60, 59]);
        assert_eq!(s.shared.scan(&history_prefix(&r)).unwrap().len(), 3);
    }

    /// A history entry born and trimmed between two checkpoints leaves
    /// nothing in the overlay for sled; one that reached a checkpoint is
    /// still deleted from sled when it is trimmed.
    #[test]
    fn history_born_and_trimmed_in_one_window_never_reaches_sled() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), opts_3()).unwrap();
        let r = Resource::new("r").unwrap();
        for t in 1..=3 {
            s.commit(&[Change::Granted(record("r", t, None))]).unwrap();
        }
        // Tokens 1–3 reach sled.
        s.close().unwrap();
        drop(s);
        let s = Store::open(dir.path(), opts_3()).unwrap();
        for t in 4..=200 {
            s.commit(&[Change::Granted(record("r", t, None))]).unwrap();
        }
        {
            let pending = s.shared.pending.lock();
            // Per key: 3 live entries, 3 tombstones for 1–3 (in sled), the lease.
            assert_eq!(pending.active.len(), 7, "{:?}", pending.active.keys());
            assert_eq!(pending.born.len(), 3);
        }
        assert_eq!(history_tokens(&s, &r), [200, 199, 198]);
        s.close().unwrap();
        drop(s);
        let s = Store::open(dir.path(), opts_3()).unwrap();
        assert_eq!(history_tokens(&s, &r), [200, 199, 198]);
        assert_eq!(s.shared.scan(&history_prefix(&r)).unwrap().len(), 3);
    }

    /// The tokens of `r`'s history, newest first.
    fn history_tokens(s: &Store, r: &Resource) -> Vec<u64> {
        s.history(r, 100)
            .unwrap()
            .iter()
            .map(|g| g.token.0)
            .collect()
    }

    fn opts_3() -> StoreOptions {
        StoreOptions {
            history_per_resource: 3,
            ..StoreOptions::default()
        }
    }

    /// The log segments up to the one being written: what a restart would
    /// replay (a spare named ahead, past it, holds nothing).
    fn log_segments(s: &Store) -> usize {
        let current = s.shared.wal.lock().segment();
        segment_files(&s.shared.wal_path)
            .into_iter()
            .filter(|&seq| seq <= current)
            .count()
    }

    /// The numbers of the segment files in the log directory `wal`.
    fn segment_files(wal: &Path) -> Vec<u64> {
        std::fs::read_dir(wal)
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().into_string().unwrap();
                let seq = name.strip_suffix(".log")?;
                u64::from_str_radix(seq, 16).ok()
            })
            .collect()
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }

    /// A machine crash keeps what was synced: the log, the reservation and
    /// sled as of its last checkpoint. Model the worst case by putting back
    /// the database as it was at the last checkpoint: every committed batch
    /// must come back from the log.
    #[test]
    fn committed_batches_survive_losing_every_database_write_since_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let checkpointed = tempfile::tempdir().unwrap();
        let a = record("a", 1, None);
        let b = record("b", 2, Some("key-b"));
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            s.commit(&[Change::Granted(a.clone())]).unwrap();
            s.close().unwrap();
        }
        copy_dir(&dir.path().join("db"), checkpointed.path());
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            s.commit(&[Change::Granted(b.clone())]).unwrap();
            s.commit(&[Change::Ended {
                record: a.clone(),
                how: EndKind::Released,
                at_unix_ms: 7,
            }])
            .unwrap();
            // No close: the process dies with the batches only in the log.
        }
        std::fs::remove_dir_all(dir.path().join("db")).unwrap();
        copy_dir(checkpointed.path(), &dir.path().join("db"));

        let replayed = segment_files(&dir.path().join("wal"));
        assert!(!replayed.is_empty());
        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.leases, vec![b.clone()]);
        assert_eq!(loaded.requests.len(), 1);
        assert_eq!(loaded.requests[0].1.lease_id, b.lease_id);
        let h = s.history(&a.resource, 10).unwrap();
        assert_eq!(h[0].ended, Some((EndKind::Released, 7)));
        // Replayed and checkpointed: every segment it read is gone (or
        // recycled under a new name).
        let left = segment_files(&s.shared.wal_path);
        assert!(
            replayed.iter().all(|seq| !left.contains(seq)),
            "{replayed:?} {left:?}"
        );
    }

    /// The checkpoint thread runs at [`CHECKPOINT_NICE`]; nothing else does.
    #[cfg(target_os = "linux")]
    #[test]
    fn only_the_checkpoint_thread_is_niced() {
        let dir = tempfile::tempdir().unwrap();
        let _store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        // (name, nice) of every thread of this process: stat's second field
        // and its 19th, the 17th after the name's closing parenthesis.
        let threads = || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
                .filter_map(|stat| {
                    let (head, tail) = stat.rsplit_once(')')?;
                    let name = head.split_once('(')?.1.to_owned();
                    let nice = tail.split_whitespace().nth(16)?.parse::<i32>().ok()?;
                    Some((name, nice))
                })
                .collect::<Vec<_>>()
        };
        // The kernel keeps 15 bytes of a thread's name. The thread lowers its
        // own priority once it runs: wait for that, boundedly. (Other tests'
        // stores have checkpoint threads too, hence "some".)
        let checkpointer = "leasehold-check";
        let niced = || {
            threads()
                .iter()
                .any(|(name, nice)| name == checkpointer && *nice == CHECKPOINT_NICE)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !niced() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(niced(), "{:?}", threads());
        // Every other thread (this test's, other tests', sled's) is untouched.
        let others: Vec<_> = threads()
            .into_iter()
            .filter(|(name, _)| name != checkpointer)
            .collect();
        assert!(!others.is_empty());
        assert!(others.iter().all(|(_, nice)| *nice == 0), "{others:?}");
    }

    #[test]
    fn checkpoints_keep_the_log_short_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            segment_bytes: 64 * 1024,
            history_per_resource: 2,
            ..StoreOptions::default()
        };
        let records: Vec<LeaseRecord> = (1..=400)
            .map(|t| record(&format!("r{}", t % 40), t, None))
            .collect();
        {
            let s = Store::open(dir.path(), opts.clone()).unwrap();
            let caught_up = || {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while s.shared.pending.lock().frozen.is_some() {
                    assert!(std::time::Instant::now() < deadline, "checkpoint stuck");
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            let (last, rest) = records.split_last().unwrap();
            for r in rest {
                s.commit(&[Change::Granted(r.clone())]).unwrap();
            }
            // Writes reach sled in the background, reads see them at once.
            let h = s.history(&Resource::new("r0").unwrap(), 10).unwrap();
            assert_eq!(h.iter().map(|g| g.token.0).collect::<Vec<_>>(), [360, 320]);
            // Once the checkpoint running now and the one the next commit
            // starts are done, the log is down to the segments since then.
            caught_up();
            s.commit(&[Change::Granted(last.clone())]).unwrap();
            caught_up();
            assert!(s.db().unwrap().scan_prefix(b"H").count() > 0);
            assert!(log_segments(&s) <= 3, "{} log segments", log_segments(&s));
            s.close().unwrap();
        }
        // Closing checkpointed everything: the log has nothing to replay.
        let (_, batches) = Wal::open(&dir.path().join("wal"), opts.segment_bytes).unwrap();
        assert!(batches.is_empty());
        let s = Store::open(dir.path(), opts).unwrap();
        let mut loaded = s.load().unwrap().leases;
        loaded.sort_by_key(|r| r.token);
        assert_eq!(loaded, records[records.len() - 40..]);
    }

    #[test]
    fn missing_or_damaged_reservation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
            s.commit(&[Change::Granted(record("a", 1, None))]).unwrap();
        }
        std::fs::write(dir.path().join("tokens"), [7u8; 16]).unwrap();
        let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        std::fs::remove_file(dir.path().join("tokens")).unwrap();
        let err = Store::open(dir.path(), StoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
