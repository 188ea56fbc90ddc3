//! The store: the only module that knows sled and the disk.
//!
//! A data directory holds three things:
//!
//! - `wal/`: the write-ahead log ([`crate::wal`]). Every batch of changes is
//!   appended there as one record and `fdatasync`ed before any of it is
//!   answered.
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
//! it, appends the operations to the log as one record and syncs it, and
//! only then applies them to sled (plain inserts, no flush). So once
//! `commit` returns, the whole batch survives a crash of the process
//! (`kill -9`) **and of the machine** (power loss): it is on the device, in
//! the log. sled is only the table the log is replayed into.
//!
//! Every [`CHECKPOINT_BYTES`] of log (and at start-up and shutdown) the store
//! checkpoints: sled's `flush()`, an `fdatasync` of sled's log file (sled's
//! `flush()` alone does not reach the device; see shared FACTS), then the
//! log's older segments are deleted. A start-up opens sled, replays what is
//! left of the log over it (idempotent, see [`crate::wal`]) and checkpoints.
//!
//! The reservation is separate from the log so that one `fdatasync` covers
//! [`RESERVATION_BLOCK`] grants and a damaged or deleted database can never
//! reset the token sequence.
//!
//! Renewals that keep the TTL are not written: a restart gives every lease a
//! full TTL anyway.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::lease::{EndKind, FencingToken, Holder, LeaseId, RequestId, Resource};
use crate::state::{Change, LeaseRecord, RequestRecord};
use crate::wal::{Op, Wal};

/// How far ahead of the highest token a reservation reaches. A restart after
/// a crash skips at most this many tokens; one `fdatasync` covers this many grants.
pub const RESERVATION_BLOCK: u64 = 65_536;

/// The log is checkpointed into sled once its current segment holds this
/// many bytes, which bounds both the log's size and the replay at start-up.
pub const CHECKPOINT_BYTES: u64 = 8 * 1024 * 1024;

/// How often a failed database is reopened, at most.
const REOPEN_INTERVAL: Duration = Duration::from_millis(200);

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
    /// Checkpoint once the log's current segment holds this many bytes
    /// ([`CHECKPOINT_BYTES`] by default; tests make it small).
    pub checkpoint_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history_per_resource: 16,
            cache_bytes: 128 * 1024 * 1024,
            checkpoint_bytes: CHECKPOINT_BYTES,
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

/// The token reservation file.
#[derive(Debug)]
struct Reservation {
    file: File,
    path: PathBuf,
    reserved: u64,
}

impl Reservation {
    fn open(path: PathBuf, db_existed: bool) -> Result<Self, StoreError> {
        let io = |what| {
            let path = path.clone();
            move |source| StoreError::Io { what, path, source }
        };
        let existed = path.exists();
        if !existed && db_existed {
            return Err(StoreError::Corrupt {
                path,
                what: "the token reservation file is missing but the database exists".into(),
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("opening"))?;
        let mut buf = [0u8; 16];
        let len = file.metadata().map_err(io("reading"))?.len();
        // An empty file with no database is a first start that stopped
        // before its first write: nothing was ever handed out.
        let fresh = len == 0 && !db_existed;
        let reserved = if fresh {
            0
        } else if len < 16 {
            return Err(StoreError::Corrupt {
                path,
                what: format!("the token reservation file is {len} bytes, expected 16"),
            });
        } else {
            file.read_exact_at(&mut buf, 0).map_err(io("reading"))?;
            let value = u64::from_le_bytes(buf[..8].try_into().unwrap_or_default());
            let check = u64::from_le_bytes(buf[8..].try_into().unwrap_or_default());
            if value ^ RESERVATION_CHECK != check {
                return Err(StoreError::Corrupt {
                    path,
                    what: "the token reservation file fails its check".into(),
                });
            }
            value
        };
        let mut r = Reservation {
            file,
            path,
            reserved,
        };
        if fresh {
            r.write(0)?;
            if let Some(dir) = r.path.parent() {
                sync_dir(dir)?;
            }
        }
        Ok(r)
    }

    /// Raises the reservation to `upto` and waits for the device.
    fn write(&mut self, upto: u64) -> Result<(), StoreError> {
        let mut buf = [0u8; 16];
        buf[..8].copy_from_slice(&upto.to_le_bytes());
        buf[8..].copy_from_slice(&(upto ^ RESERVATION_CHECK).to_le_bytes());
        let io = |what| {
            let path = self.path.clone();
            move |source| StoreError::Io { what, path, source }
        };
        self.file.write_all_at(&buf, 0).map_err(io("writing"))?;
        self.file.sync_data().map_err(io("syncing"))?;
        self.reserved = upto;
        Ok(())
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StoreError::Io {
            what: "syncing directory",
            path: dir.to_owned(),
            source,
        })
}

/// The persistent side of the coordinator. See the module docs.
///
/// Only one thread (the committer) calls [`Store::commit`]; the readers
/// ([`Store::history`], [`Store::size_on_disk`]) may run on any thread.
#[derive(Debug)]
pub struct Store {
    /// `None` while being reopened after an I/O error, and once closed.
    db: Mutex<Option<sled::Db>>,
    /// sled's log file, synced at checkpoints.
    sled_log: Mutex<Option<File>>,
    wal: Mutex<Wal>,
    /// Set when sled failed: it may miss operations the log has, so the next
    /// commit reopens it and replays the log.
    broken: AtomicBool,
    /// Set by [`Store::close`]: the database is gone for good.
    closed: AtomicBool,
    last_reopen: Mutex<Option<Instant>>,
    db_path: PathBuf,
    wal_path: PathBuf,
    reservation: Mutex<Reservation>,
    /// History entries per recently granted resource (see `trim_history`).
    trims: Mutex<HashMap<Resource, usize>>,
    options: StoreOptions,
}

/// Most resources whose history size the store remembers at once.
const TRIM_CACHE: usize = 65_536;

impl Store {
    /// Opens (or creates) the data directory, replays the log into the
    /// database and checkpoints.
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
        let (wal, batches) = Wal::open(&wal_path).map_err(|source| StoreError::Io {
            what: "reading the log in",
            path: wal_path.clone(),
            source,
        })?;
        let store = Store {
            db: Mutex::new(Some(db.clone())),
            sled_log: Mutex::new(Some(sled_log)),
            wal: Mutex::new(wal),
            broken: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            last_reopen: Mutex::new(None),
            db_path,
            wal_path,
            reservation: Mutex::new(reservation),
            trims: Mutex::new(HashMap::new()),
            options,
        };
        store.replay(&db, &batches)?;
        Ok(store)
    }

    /// Applies the log's batches to `db` and checkpoints, so the log
    /// starts empty.
    fn replay(&self, db: &sled::Db, batches: &[Vec<Op>]) -> Result<(), StoreError> {
        let mut wal = self.wal.lock();
        if batches.is_empty() {
            return wal
                .remove_retired()
                .map_err(self.wal_err("removing old segments from"));
        }
        for ops in batches {
            apply(db, ops).map_err(self.sled_err())?;
        }
        tracing::info!(
            batches = batches.len(),
            "replayed the log into the database"
        );
        self.checkpoint(db, &mut wal)
    }

    fn sled_err(&self) -> impl Fn(sled::Error) -> StoreError + '_ {
        move |source| {
            // sled 0.34 keeps failing after an I/O error (its error is
            // sticky), so the next commit reopens the database.
            if matches!(source, sled::Error::Io(_)) {
                self.broken.store(true, Ordering::SeqCst);
            }
            StoreError::Sled {
                path: self.db_path.clone(),
                source,
            }
        }
    }

    fn wal_err(&self, what: &'static str) -> impl Fn(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            what,
            path: self.wal_path.clone(),
            source,
        }
    }

    /// A handle to the open database.
    fn db(&self) -> Result<sled::Db, StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        self.db.lock().clone().ok_or_else(|| StoreError::Sled {
            path: self.db_path.clone(),
            source: sled::Error::Unsupported(
                "the database is being reopened after an I/O error".into(),
            ),
        })
    }

    /// Checkpoints and closes the database now, even while other parts of
    /// the server still hold the `Store`: sled locks its directory until its
    /// last handle is gone, and a server restarted in the same process (or a
    /// quick restart by a supervisor) must be able to open it at once.
    /// Every later call fails with [`StoreError::Closed`].
    pub fn close(&self) -> Result<(), StoreError> {
        self.closed.store(true, Ordering::SeqCst);
        let db = self.db.lock().take();
        let result = match &db {
            Some(db) if !self.broken.load(Ordering::SeqCst) => {
                self.checkpoint(db, &mut self.wal.lock())
            }
            // A broken database is replayed from the log at the next start.
            _ => Ok(()),
        };
        *self.sled_log.lock() = None;
        result
    }

    /// Reopens the database after an I/O error and replays the whole log
    /// into it, so the server recovers by itself once the disk has room
    /// again. sled's recovery keeps a prefix of what it was given; the log
    /// holds everything acknowledged.
    fn reopen(&self) -> Result<(), StoreError> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        let mut slot = self.db.lock();
        {
            // At most one attempt per interval: a full disk stays full for a while.
            let mut last = self.last_reopen.lock();
            if last.is_some_and(|t| t.elapsed() < REOPEN_INTERVAL) {
                return Err(StoreError::Sled {
                    path: self.db_path.clone(),
                    source: sled::Error::Unsupported(
                        "the database failed with an I/O error and will be reopened shortly".into(),
                    ),
                });
            }
            *last = Some(Instant::now());
        }
        // sled locks its directory until the last handle is gone.
        drop(slot.take());
        *self.sled_log.lock() = None;
        let db = open_sled(&self.db_path, &self.options)?;
        *self.sled_log.lock() = Some(open_sled_log(&self.db_path)?);
        let batches = self
            .wal
            .lock()
            .read_all()
            .map_err(self.wal_err("reading the log in"))?;
        self.broken.store(false, Ordering::SeqCst);
        self.replay(&db, &batches)?;
        *slot = Some(db);
        tracing::warn!(path = %self.db_path.display(), "reopened the database after an I/O error");
        Ok(())
    }

    /// Makes everything applied to sled durable there, then drops the log
    /// segments that held it. The caller holds the log's lock, so nothing is
    /// appended meanwhile.
    fn checkpoint(&self, db: &sled::Db, wal: &mut Wal) -> Result<(), StoreError> {
        db.flush().map_err(self.sled_err())?;
        if let Some(log) = &*self.sled_log.lock() {
            // sled's flush() ends in sync_file_range, which does not reach
            // the device; this does.
            log.sync_data().map_err(|source| {
                self.broken.store(true, Ordering::SeqCst);
                StoreError::Io {
                    what: "syncing",
                    path: self.db_path.join("db"),
                    source,
                }
            })?;
        }
        wal.rotate()
            .map_err(self.wal_err("starting a new segment in"))?;
        wal.remove_retired()
            .map_err(self.wal_err("removing old segments from"))
    }

    fn corrupt(&self, what: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            path: self.db_path.clone(),
            what: what.into(),
        }
    }

    /// Reads everything needed to rebuild the lease table.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let mut loaded = Loaded {
            last_token: self.reserved(),
            ..Loaded::default()
        };
        let db = self.db()?;
        if let Some(v) = db.get(TOKEN_KEY).map_err(self.sled_err())? {
            let token = Decoder::new(&v)
                .u64()
                .ok_or_else(|| self.corrupt("bad token key"))?;
            loaded.last_token = loaded.last_token.max(token);
        }
        for item in db.scan_prefix(b"L") {
            let (k, v) = item.map_err(self.sled_err())?;
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
            let (k, v) = item.map_err(self.sled_err())?;
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

    /// The highest token the reservation covers.
    pub fn reserved(&self) -> u64 {
        self.reservation.lock().reserved
    }

    /// Persists a batch of changes: the reservation first (synced) when the
    /// batch needs it, then one log record (synced), then the same
    /// operations applied to sled. Nothing of the batch may be acknowledged
    /// before this returns `Ok`; once it has, the batch survives power loss.
    pub fn commit<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> Result<(), StoreError> {
        if self.broken.load(Ordering::SeqCst) {
            self.reopen()?;
        }
        let db = self.db()?;
        let ops = self.plan(&db, changes)?;
        if ops.is_empty() {
            return Ok(());
        }
        let mut wal = self.wal.lock();
        wal.append(&ops).map_err(self.wal_err("appending to"))?;
        // Durable from here on. If sled fails now, the log still has the
        // batch; sled is reopened and the log replayed before the next one.
        if let Err(e) = apply(&db, &ops) {
            self.broken.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, "the database failed after the batch was logged; it will be reopened and the log replayed");
            return Ok(());
        }
        if wal.segment_len() >= self.options.checkpoint_bytes {
            if let Err(e) = self.checkpoint(&db, &mut wal) {
                tracing::warn!(error = %e, "checkpoint failed; the log grows until one succeeds");
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
        db: &sled::Db,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> Result<Vec<Op>, StoreError> {
        let mut ops = Vec::new();
        let mut max_token = 0;
        let mut trims = self.trims.lock();
        for change in changes.into_iter().filter(|c| c.needs_write()) {
            match change {
                Change::Granted(record) => {
                    max_token = max_token.max(record.token.0);
                    for old in self.trim_history(db, &mut trims, &record.resource)? {
                        ops.push(Op::Delete(old.to_vec()));
                    }
                    ops.push(Op::Put(
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
            ops.push(Op::Put(
                TOKEN_KEY.to_vec(),
                max_token.to_be_bytes().to_vec(),
            ));
            let mut reservation = self.reservation.lock();
            if max_token > reservation.reserved {
                reservation.write(max_token + RESERVATION_BLOCK)?;
            }
        }
        Ok(ops)
    }

    /// Makes room for one more history entry on `resource`.
    ///
    /// History may hold up to twice `history_per_resource` entries on disk
    /// ([`Store::history`] shows only the newest `history_per_resource`):
    /// trimming takes a range scan, so it runs once every
    /// `history_per_resource` grants on a busy resource rather than on every
    /// grant. `trims` remembers how many entries a resource has (bounded: it
    /// is cleared when it grows past [`TRIM_CACHE`] resources, and a resource
    /// it does not know costs one scan). The scan reads the table as of the
    /// previous batch, so entries added earlier in the same batch may stay
    /// until the next trim.
    fn trim_history(
        &self,
        db: &sled::Db,
        trims: &mut HashMap<Resource, usize>,
        resource: &Resource,
    ) -> Result<Vec<sled::IVec>, StoreError> {
        let keep = self.options.history_per_resource.max(1);
        if let Some(count) = trims.get_mut(resource) {
            if *count < 2 * keep {
                *count += 1;
                return Ok(Vec::new());
            }
        }
        // Unknown or full: scan, and trim to `keep` entries counting the new one.
        let mut keys = Vec::new();
        for item in db.scan_prefix(history_prefix(resource)).keys() {
            keys.push(item.map_err(self.sled_err())?);
        }
        let remove = (keys.len() + 1).saturating_sub(keep);
        let after = keys.len() + 1 - remove;
        if trims.len() >= TRIM_CACHE {
            trims.clear();
        }
        trims.insert(resource.clone(), after);
        // Keys sort by token: the oldest come first.
        keys.truncate(remove);
        Ok(keys)
    }

    /// The last grants on a resource, newest first.
    pub fn history(
        &self,
        resource: &Resource,
        limit: usize,
    ) -> Result<Vec<GrantRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self
            .db()?
            .scan_prefix(history_prefix(resource))
            .rev()
            .take(limit.min(self.options.history_per_resource))
        {
            let (k, v) = item.map_err(self.sled_err())?;
            let token = k
                .len()
                .checked_sub(8)
                .and_then(|at| Decoder::new(&k[at..]).u64())
                .ok_or_else(|| self.corrupt("bad history key"))?;
            let grant = decode_history(FencingToken(token), &v)
                .ok_or_else(|| self.corrupt("bad history record"))?;
            out.push(grant);
        }
        Ok(out)
    }

    /// Bytes the database and the log occupy on disk.
    pub fn size_on_disk(&self) -> u64 {
        let sled = self.db().map_or(0, |db| db.size_on_disk().unwrap_or(0));
        sled + self.wal.lock().segment_len()
    }
}

/// Applies logged operations to the table, in order.
fn apply(db: &sled::Db, ops: &[Op]) -> Result<(), sled::Error> {
    for op in ops {
        match op {
            Op::Put(k, v) => drop(db.insert(k.as_slice(), v.as_slice())?),
            Op::Delete(k) => drop(db.remove(k.as_slice())?),
        }
    }
    Ok(())
}

fn open_sled(path: &Path, options: &StoreOptions) -> Result<sled::Db, StoreError> {
    sled::Config::new()
        .path(path)
        .cache_capacity(options.cache_bytes)
        .flush_every_ms(Some(500))
        .open()
        .map_err(|source| StoreError::Sled {
            path: path.to_owned(),
            source,
        })
}

/// sled 0.34 keeps its log (every segment) in `db/db`; snapshots are
/// written and synced by sled itself.
fn open_sled_log(db_path: &Path) -> Result<File, StoreError> {
    let path = db_path.join("db");
    File::open(&path).map_err(|source| StoreError::Io {
        what: "opening",
        path,
        source,
    })
}

fn lease_key(resource: &Resource) -> Vec<u8> {
    tagged(b'L', resource.as_str().as_bytes())
}

fn request_key(key: &RequestId) -> Vec<u8> {
    tagged(b'R', key.as_str().as_bytes())
}

fn history_prefix(resource: &Resource) -> Vec<u8> {
    // Resources never contain `\0` (no control characters), so the separator
    // keeps "a" from matching the history of "ab".
    let mut k = tagged(b'H', resource.as_str().as_bytes());
    k.push(0);
    k
}

fn history_key(resource: &Resource, token: FencingToken) -> Vec<u8> {
    let mut k = history_prefix(resource);
    k.extend_from_slice(&token.0.to_be_bytes());
    k
}

fn tagged(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(rest.len() + 1);
    k.push(tag);
    k.extend_from_slice(rest);
    k
}

// ---- record encoding: version byte, then fixed fields, then length-prefixed strings ----

const VERSION: u8 = 1;

struct Encoder(Vec<u8>);

impl Encoder {
    fn new() -> Self {
        Encoder(vec![VERSION])
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        // Every string is validated to at most 512 bytes, so u16 suffices.
        self.0.extend_from_slice(&(b.len() as u16).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }
}

struct Decoder<'a>(&'a [u8]);

impl<'a> Decoder<'a> {
    fn new(b: &'a [u8]) -> Self {
        Decoder(b)
    }
    fn versioned(b: &'a [u8]) -> Option<Self> {
        match b.split_first() {
            Some((&VERSION, rest)) => Some(Decoder(rest)),
            _ => None,
        }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = u16::from_be_bytes(self.take(2)?.try_into().ok()?) as usize;
        self.take(len)
    }
    fn text(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.bytes()?).ok()
    }
    fn lease_id(&mut self) -> Option<LeaseId> {
        Some(LeaseId(self.take(16)?.try_into().ok()?))
    }
}

fn encode_lease(r: &LeaseRecord) -> Vec<u8> {
    let mut e = Encoder::new();
    e.0.extend_from_slice(&r.lease_id.0);
    e.u64(r.token.0)
        .u64(r.ttl.as_millis() as u64)
        .u64(r.acquired_unix_ms)
        .bytes(r.holder.as_str().as_bytes())
        .bytes(
            r.request_id
                .as_ref()
                .map_or(&b""[..], |k| k.as_str().as_bytes()),
        )
        .0
}

fn decode_lease(resource: &[u8], v: &[u8]) -> Option<LeaseRecord> {
    let mut d = Decoder::versioned(v)?;
    let lease_id = d.lease_id()?;
    let token = FencingToken(d.u64()?);
    let ttl = Duration::from_millis(d.u64()?);
    let acquired_unix_ms = d.u64()?;
    let holder = Holder::new(d.text()?).ok()?;
    let request_id = RequestId::new_optional(d.text()?).ok()?;
    let resource = Resource::new(std::str::from_utf8(resource).ok()?).ok()?;
    Some(LeaseRecord {
        resource,
        lease_id,
        token,
        holder,
        ttl,
        acquired_unix_ms,
        request_id,
    })
}

fn encode_request(r: &LeaseRecord) -> Vec<u8> {
    let mut e = Encoder::new()
        .bytes(r.resource.as_str().as_bytes())
        .bytes(r.holder.as_str().as_bytes())
        .u64(r.ttl.as_millis() as u64);
    e.0.extend_from_slice(&r.lease_id.0);
    e.u64(r.token.0).u64(r.acquired_unix_ms).0
}

fn decode_request(v: &[u8]) -> Option<RequestRecord> {
    let mut d = Decoder::versioned(v)?;
    Some(RequestRecord {
        resource: Resource::new(d.text()?).ok()?,
        holder: Holder::new(d.text()?).ok()?,
        ttl: Duration::from_millis(d.u64()?),
        lease_id: d.lease_id()?,
        token: FencingToken(d.u64()?),
        recorded_unix_ms: d.u64()?,
    })
}

fn end_code(how: Option<EndKind>) -> u64 {
    match how {
        None => 0,
        Some(EndKind::Released) => 1,
        Some(EndKind::Expired) => 2,
        Some(EndKind::Revoked) => 3,
    }
}

fn encode_history(r: &LeaseRecord, ended: Option<(EndKind, u64)>) -> Vec<u8> {
    Encoder::new()
        .u64(r.ttl.as_millis() as u64)
        .u64(r.acquired_unix_ms)
        .u64(end_code(ended.map(|e| e.0)))
        .u64(ended.map_or(0, |e| e.1))
        .bytes(r.holder.as_str().as_bytes())
        .0
}

fn decode_history(token: FencingToken, v: &[u8]) -> Option<GrantRecord> {
    let mut d = Decoder::versioned(v)?;
    let ttl = Duration::from_millis(d.u64()?);
    let acquired_unix_ms = d.u64()?;
    let how = match d.u64()? {
        0 => None,
        1 => Some(EndKind::Released),
        2 => Some(EndKind::Expired),
        3 => Some(EndKind::Revoked),
        _ => return None,
    };
    let at = d.u64()?;
    Some(GrantRecord {
        token,
        holder: d.text()?.to_owned(),
        ttl,
        acquired_unix_ms,
        ended: how.map(|h| (h, at)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(resource: &str, token: u64, key: Option<&str>) -> LeaseRecord {
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
        let opts = StoreOptions {
            history_per_resource: 3,
            ..StoreOptions::default()
        };
        let s = Store::open(dir.path(), opts).unwrap();
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
        // Trimming is amortized: the disk holds at most twice the limit.
        let r = Resource::new("r").unwrap();
        for t in 7..=60 {
            s.commit(&[Change::Granted(record("r", t, None))]).unwrap();
            let on_disk = s.db().unwrap().scan_prefix(history_prefix(&r)).count();
            assert!(on_disk <= 6, "{on_disk} history entries after token {t}");
        }
        let tokens: Vec<u64> = s
            .history(&r, 100)
            .unwrap()
            .iter()
            .map(|g| g.token.0)
            .collect();
        assert_eq!(tokens, [60, 59, 58]);
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

        let s = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let loaded = s.load().unwrap();
        assert_eq!(loaded.leases, vec![b.clone()]);
        assert_eq!(loaded.requests.len(), 1);
        assert_eq!(loaded.requests[0].1.lease_id, b.lease_id);
        let h = s.history(&a.resource, 10).unwrap();
        assert_eq!(h[0].ended, Some((EndKind::Released, 7)));
        // Replayed and checkpointed: the log is down to one empty segment.
        assert_eq!(
            std::fs::read_dir(dir.path().join("wal")).unwrap().count(),
            1
        );
    }

    #[test]
    fn checkpoints_keep_the_log_short_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let opts = StoreOptions {
            checkpoint_bytes: 4096,
            ..StoreOptions::default()
        };
        let records: Vec<LeaseRecord> = (1..=200)
            .map(|t| record(&format!("r{t}"), t, None))
            .collect();
        {
            let s = Store::open(dir.path(), opts.clone()).unwrap();
            for r in &records {
                s.commit(&[Change::Granted(r.clone())]).unwrap();
                let segments = std::fs::read_dir(dir.path().join("wal")).unwrap().count();
                assert!(
                    segments <= 1,
                    "{segments} log segments after token {}",
                    r.token.0
                );
                assert!(s.wal.lock().segment_len() < 4096 + 1024);
            }
        }
        let s = Store::open(dir.path(), opts).unwrap();
        let mut loaded = s.load().unwrap().leases;
        loaded.sort_by_key(|r| r.token);
        assert_eq!(loaded, records);
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
