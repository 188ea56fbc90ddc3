//! The store: the only module that knows sled and the disk.
//!
//! A data directory holds two things:
//!
//! - `db/`: a sled database with one tree. Keys start with a one-byte tag:
//!   `L` + resource → the live lease on it ([`LeaseRecord`]);
//!   `R` + request id → an idempotency key ([`RequestRecord`]);
//!   `H` + resource + `\0` + token → one past grant, for operators' history;
//!   `Mtoken` → the highest token granted.
//! - `tokens`: the token reservation, 16 bytes, overwritten in place and
//!   `fdatasync`ed. Every token handed out is at or below it.
//!
//! # Durability
//! [`Store::commit`] writes a whole batch of changes in order and calls one
//! `flush()` (see [`Store::write`] for why not one atomic sled batch);
//! before that, if the batch holds a token above the reservation, it raises
//! the reservation by [`RESERVATION_BLOCK`] and `fdatasync`s the file. So:
//!
//! - After `commit` returns, the batch survives a crash of the process
//!   (`kill -9`): sled's `flush()` has handed it to the kernel.
//! - The token sequence survives a crash of the machine (power loss): the
//!   reservation was synced to the device before any token under it was
//!   returned, and a restart continues above it. sled's `flush()` does not
//!   `fsync` (see shared FACTS), so the last ~500 ms of lease records
//!   (sled's `flush_every_ms`) may be lost in a machine crash; the fencing
//!   tokens still never go backwards, which is what keeps storage safe.
//!
//! Renewals that keep the TTL are not written: a restart gives every lease a
//! full TTL anyway.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::lease::{EndKind, FencingToken, Holder, LeaseId, RequestId, Resource};
use crate::state::{Change, LeaseRecord, RequestRecord};

/// How far ahead of the highest token a reservation reaches. A restart after
/// a crash skips at most this many tokens; one `fdatasync` covers this many grants.
pub const RESERVATION_BLOCK: u64 = 65_536;

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
    /// `fdatasync` sled's log after every batch, so acknowledged lease
    /// records (not only tokens) survive a machine crash. Costs one device
    /// flush per batch.
    pub sync_every_batch: bool,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history_per_resource: 16,
            cache_bytes: 128 * 1024 * 1024,
            sync_every_batch: false,
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
#[derive(Debug)]
pub struct Store {
    /// `None` only while being reopened after an I/O error.
    db: parking_lot::Mutex<Option<sled::Db>>,
    /// Set by an I/O error; the next commit reopens the database.
    broken: std::sync::atomic::AtomicBool,
    /// Set by [`Store::close`]: the database is gone for good.
    closed: std::sync::atomic::AtomicBool,
    last_reopen: parking_lot::Mutex<Option<std::time::Instant>>,
    /// sled's log file, for `fdatasync` when `sync_every_batch` is on.
    log: parking_lot::Mutex<Option<File>>,
    db_path: PathBuf,
    /// Only the committer thread writes; the lock keeps `&self` methods safe.
    reservation: parking_lot::Mutex<Reservation>,
    /// History entries per recently granted resource (see `trim_history`).
    trims: parking_lot::Mutex<HashMap<Resource, usize>>,
    options: StoreOptions,
}

/// Most resources whose history size the store remembers at once.
const TRIM_CACHE: usize = 65_536;

impl Store {
    /// Opens (or creates) the data directory.
    pub fn open(dir: &Path, options: StoreOptions) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            what: "creating",
            path: dir.to_owned(),
            source,
        })?;
        let db_path = dir.join("db");
        let db_existed = db_path.exists();
        let reservation = Reservation::open(dir.join("tokens"), db_existed)?;
        let db = open_sled(&db_path, &options)?;
        let log = open_log(&db_path, &options)?;
        Ok(Store {
            log: parking_lot::Mutex::new(log),
            db: parking_lot::Mutex::new(Some(db)),
            broken: std::sync::atomic::AtomicBool::new(false),
            closed: std::sync::atomic::AtomicBool::new(false),
            last_reopen: parking_lot::Mutex::new(None),
            db_path,
            reservation: parking_lot::Mutex::new(reservation),
            trims: parking_lot::Mutex::new(HashMap::new()),
            options,
        })
    }

    fn sled_err(&self) -> impl Fn(sled::Error) -> StoreError + '_ {
        move |source| {
            // sled 0.34 keeps failing after an I/O error (its error is
            // sticky), so the next commit reopens the database.
            if matches!(source, sled::Error::Io(_)) {
                self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            StoreError::Sled {
                path: self.db_path.clone(),
                source,
            }
        }
    }

    /// A handle to the open database.
    fn db(&self) -> Result<sled::Db, StoreError> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Closed);
        }
        self.db.lock().clone().ok_or_else(|| StoreError::Sled {
            path: self.db_path.clone(),
            source: sled::Error::Unsupported(
                "the database is being reopened after an I/O error".into(),
            ),
        })
    }

    /// Flushes and closes the database now, even while other parts of the
    /// server still hold the `Store`: sled locks its directory until its
    /// last handle is gone, and a server restarted in the same process (or a
    /// quick restart by a supervisor) must be able to open it at once.
    /// Every later call fails with [`StoreError::Closed`].
    pub fn close(&self) -> Result<(), StoreError> {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let db = self.db.lock().take();
        *self.log.lock() = None;
        match db {
            Some(db) => db.flush().map(drop).map_err(self.sled_err()),
            None => Ok(()),
        }
    }

    /// Reopens the database after an I/O error, so the server recovers by
    /// itself once the disk has room again. sled's recovery drops whatever
    /// the failed writes left half-done; nothing that failed was acknowledged.
    fn reopen(&self) -> Result<(), StoreError> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
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
            *last = Some(std::time::Instant::now());
        }
        // sled locks its directory until the last handle is gone.
        drop(slot.take());
        let db = open_sled(&self.db_path, &self.options)?;
        *self.log.lock() = open_log(&self.db_path, &self.options)?;
        *slot = Some(db);
        self.broken
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tracing::warn!(path = %self.db_path.display(), "reopened the database after an I/O error");
        Ok(())
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

    /// Persists a batch of changes: reservation first (synced), then the
    /// changes in order and one flush. Nothing of the batch may be
    /// acknowledged before this returns `Ok`.
    pub fn commit<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> Result<(), StoreError> {
        if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
            self.reopen()?;
        }
        if !self.write(changes)? {
            return Ok(());
        }
        self.flush()?;
        if let Some(log) = &*self.log.lock() {
            // sled's flush() ends in sync_file_range, which does not reach
            // the device; this does.
            log.sync_data().map_err(|source| {
                self.broken.store(true, std::sync::atomic::Ordering::SeqCst);
                StoreError::Io {
                    what: "syncing",
                    path: self.db_path.join("db"),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// The first half of [`Store::commit`]: raises (and syncs) the token
    /// reservation when the batch needs it, then writes the changes to sled
    /// in order, without flushing. Returns whether anything was written.
    /// The changes are durable only once a [`Store::flush`] that started
    /// after this returned has returned.
    ///
    /// Changes are written as plain inserts, not one atomic `sled::Batch`:
    /// sled 0.34 rolls its I/O buffer and writes a separate batch manifest
    /// for every `apply_batch`, so an atomic batch costs two or three disk
    /// writes per flush instead of one (about half the flush's time here).
    /// Atomicity is not needed for safety: sled recovers a contiguous prefix
    /// of its log, nothing in a batch is answered before its flush, and a
    /// prefix of the table's changes is a state the table could have been in
    /// had the server stopped earlier. Within one change the writes are
    /// ordered so a cut inside it is harmless too (history first, the lease
    /// record last), and a grant with an idempotency key, whose key and lease
    /// must appear together, is still one atomic batch.
    pub fn write<'a>(
        &self,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> Result<bool, StoreError> {
        let changes: Vec<&Change> = changes.into_iter().filter(|c| c.needs_write()).collect();
        if changes.is_empty() {
            return Ok(false);
        }
        let max_token = changes
            .iter()
            .filter_map(|c| match c {
                Change::Granted(r) => Some(r.token.0),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        if max_token > 0 {
            let mut reservation = self.reservation.lock();
            if max_token > reservation.reserved {
                reservation.write(max_token + RESERVATION_BLOCK)?;
            }
        }
        let db = self.db()?;
        let mut trims = self.trims.lock();
        for change in changes {
            match change {
                Change::Granted(record) => {
                    let mut out = Out::new(&db, record.request_id.is_some());
                    for old in self.trim_history(&db, &mut trims, &record.resource)? {
                        out.remove(old);
                    }
                    out.insert(
                        history_key(&record.resource, record.token),
                        encode_history(record, None),
                    );
                    if let Some(key) = &record.request_id {
                        out.insert(request_key(key), encode_request(record));
                    }
                    out.insert(lease_key(&record.resource), encode_lease(record));
                    out.finish().map_err(self.sled_err())?;
                }
                Change::Renewed { record, .. } => {
                    db.insert(lease_key(&record.resource), encode_lease(record))
                        .map_err(self.sled_err())?;
                }
                Change::Ended {
                    record,
                    how,
                    at_unix_ms,
                } => {
                    db.insert(
                        history_key(&record.resource, record.token),
                        encode_history(record, Some((*how, *at_unix_ms))),
                    )
                    .map_err(self.sled_err())?;
                    db.remove(lease_key(&record.resource))
                        .map_err(self.sled_err())?;
                }
                Change::RequestsCollected(keys) => {
                    for key in keys {
                        db.remove(request_key(key)).map_err(self.sled_err())?;
                    }
                }
            }
        }
        drop(trims);
        if max_token > 0 {
            db.insert(TOKEN_KEY, max_token.to_be_bytes().to_vec())
                .map_err(self.sled_err())?;
        }
        Ok(true)
    }

    /// Makes room for one more history entry on `resource`.
    ///
    /// History may hold up to twice `history_per_resource` entries on disk
    /// ([`Store::history`] shows only the newest `history_per_resource`):
    /// trimming takes a range scan, so it runs once every
    /// `history_per_resource` grants on a busy resource rather than on every
    /// grant. `trims` remembers how many entries a resource has (bounded: it
    /// is cleared when it grows past [`TRIM_CACHE`] resources, and a resource
    /// it does not know costs one scan).
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

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db().map_or(0, |db| db.size_on_disk().unwrap_or(0))
    }

    /// Flushes sled's buffers (used at shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db()?.flush().map(drop).map_err(self.sled_err())
    }
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
fn open_log(db_path: &Path, options: &StoreOptions) -> Result<Option<File>, StoreError> {
    if !options.sync_every_batch {
        return Ok(None);
    }
    let path = db_path.join("db");
    File::open(&path)
        .map(Some)
        .map_err(|source| StoreError::Io {
            what: "opening",
            path,
            source,
        })
}

/// Where one change's writes go: straight into the tree, or into one atomic
/// batch when its writes must appear together.
struct Out<'a> {
    db: &'a sled::Db,
    batch: Option<sled::Batch>,
    failed: Option<sled::Error>,
}

impl<'a> Out<'a> {
    fn new(db: &'a sled::Db, atomic: bool) -> Self {
        Out {
            db,
            batch: atomic.then(sled::Batch::default),
            failed: None,
        }
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        match &mut self.batch {
            Some(b) => b.insert(key, value),
            None if self.failed.is_none() => {
                if let Err(e) = self.db.insert(key, value) {
                    self.failed = Some(e);
                }
            }
            None => {}
        }
    }

    fn remove(&mut self, key: sled::IVec) {
        match &mut self.batch {
            Some(b) => b.remove(key),
            None if self.failed.is_none() => {
                if let Err(e) = self.db.remove(key) {
                    self.failed = Some(e);
                }
            }
            None => {}
        }
    }

    fn finish(self) -> Result<(), sled::Error> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        match self.batch {
            Some(b) => self.db.apply_batch(b),
            None => Ok(()),
        }
    }
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
