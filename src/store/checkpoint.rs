//! What the store shares with its checkpoint thread, and that thread: it
//! writes frozen overlays into sled, makes them durable, and drops the log
//! segments they cover.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::overlay::{Overlay, Pending};
use super::{StoreError, StoreOptions, REOPEN_INTERVAL, SPARE_RETRY};
use crate::wal::{Named, Wal};

/// What the store and its checkpointer thread share.
#[derive(Debug)]
pub(super) struct StoreState {
    /// `None` while being reopened after an I/O error, and once closed.
    pub(super) db: Mutex<Option<sled::Db>>,
    /// sled's log file, synced at checkpoints.
    pub(super) sled_log: Mutex<Option<File>>,
    pub(super) wal: Mutex<Wal>,
    pub(super) pending: Mutex<Pending>,
    /// Set by an I/O error in sled; the checkpointer reopens it.
    pub(super) broken: AtomicBool,
    pub(super) db_path: PathBuf,
    pub(super) wal_path: PathBuf,
    pub(super) options: StoreOptions,
}

/// A checkpoint for the checkpointer thread: write `frozen` into sled, make
/// it durable, then delete the log segments numbered below `upto`.
pub(super) struct Checkpoint {
    pub(super) frozen: Arc<Overlay>,
    pub(super) upto: u64,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("keys", &self.frozen.len())
            .field("upto", &self.upto)
            .finish()
    }
}

impl StoreState {
    pub(super) fn sled_err(&self) -> impl Fn(sled::Error) -> StoreError + '_ {
        move |source| {
            // sled 0.34 keeps failing after an I/O error (its error is
            // sticky), so the checkpointer reopens the database.
            if matches!(source, sled::Error::Io(_)) {
                self.broken.store(true, Ordering::SeqCst);
            }
            StoreError::Sled {
                path: self.db_path.clone(),
                source,
            }
        }
    }

    pub(super) fn wal_err(&self, what: &'static str) -> impl Fn(std::io::Error) -> StoreError + '_ {
        move |source| StoreError::Io {
            what,
            path: self.wal_path.clone(),
            source,
        }
    }

    /// A handle to the open database.
    pub(super) fn db(&self) -> Result<sled::Db, StoreError> {
        self.db.lock().clone().ok_or_else(|| StoreError::Sled {
            path: self.db_path.clone(),
            source: sled::Error::Unsupported(
                "the database is being reopened after an I/O error".into(),
            ),
        })
    }

    /// The table's entries under `prefix`: sled, overlaid by the frozen and
    /// the active changes. The pending lock is held throughout, so a
    /// checkpoint finishing meanwhile cannot hide its changes from the scan.
    pub(super) fn scan(&self, prefix: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, StoreError> {
        let pending = self.pending.lock();
        let mut out = BTreeMap::new();
        for item in self.db()?.scan_prefix(prefix) {
            let (k, v) = item.map_err(self.sled_err())?;
            out.insert(k.to_vec(), v.to_vec());
        }
        for layer in pending
            .frozen
            .as_deref()
            .into_iter()
            .chain([&pending.active])
        {
            let under = layer
                .range::<[u8], _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(prefix));
            for (k, v) in under {
                match v {
                    Some(v) => out.insert(k.clone(), v.clone()),
                    None => out.remove(k),
                };
            }
        }
        Ok(out)
    }

    /// Writes `overlays` into sled, in order, makes sled durable, then
    /// deletes (or recycles) the log segments numbered below `upto`, whose
    /// every change sled now holds. The one sequence behind start-up, each
    /// checkpoint and close.
    pub(super) fn checkpoint_into(
        &self,
        db: &sled::Db,
        overlays: &[&Overlay],
        upto: u64,
    ) -> Result<(), StoreError> {
        for overlay in overlays {
            apply(db, overlay.iter().map(|(k, v)| (k, v.as_ref()))).map_err(self.sled_err())?;
        }
        self.make_durable(db)?;
        let named = self
            .wal
            .lock()
            .remove_retired_before(upto)
            .map_err(self.wal_err("removing old segments from"))?;
        self.finish_naming(named)
            .map_err(self.wal_err("syncing the directory of"))
    }

    /// Syncs the log's directory without holding the log's lock (commits
    /// go on meanwhile), then tells the log which segment is named ahead.
    pub(super) fn finish_naming(&self, named: Named) -> std::io::Result<()> {
        let next = named.sync()?;
        self.wal.lock().named(next)
    }

    /// sled's `flush()` plus an `fdatasync` of its log: everything applied
    /// to `db` so far is on the device.
    pub(super) fn make_durable(&self, db: &sled::Db) -> Result<(), StoreError> {
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
        Ok(())
    }

    /// The checkpointer thread: writes frozen changes into sled, makes them
    /// durable, deletes the log segments they came from. A failed checkpoint
    /// is retried (reopening sled first if it broke) every [`REOPEN_INTERVAL`]
    /// until it succeeds; the log keeps everything meanwhile.
    pub(super) fn run_checkpoints(&self, rx: std::sync::mpsc::Receiver<Checkpoint>) {
        use std::sync::mpsc::RecvTimeoutError;
        lower_this_threads_priority();
        let mut todo: Option<Checkpoint> = None;
        let mut spare_retry = std::time::Instant::now();
        loop {
            if std::time::Instant::now() >= spare_retry && !self.ensure_spare() {
                spare_retry = std::time::Instant::now() + SPARE_RETRY;
            }
            match rx.recv_timeout(REOPEN_INTERVAL) {
                Ok(next) => todo = Some(next),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let Some(job) = &todo else { continue };
            if self.broken.load(Ordering::SeqCst) {
                if let Err(e) = self.reopen() {
                    tracing::warn!(error = %e, "could not reopen the database; will retry");
                    continue;
                }
            }
            match self.checkpoint(job) {
                Ok(()) => todo = None,
                Err(e) => {
                    tracing::error!(error = %e, "checkpoint failed; the log keeps everything; will retry")
                }
            }
        }
    }

    /// Prepares a preallocated spare segment for the log if it has none.
    /// Returns false if that failed (try again later).
    pub(super) fn ensure_spare(&self) -> bool {
        if !self.wal.lock().wants_spare() {
            return true;
        }
        // Filling the spare takes a while: not under the log's lock.
        let result =
            Wal::prepare_spare(&self.wal_path, self.options.segment_bytes).and_then(|prepared| {
                match prepared {
                    true => {
                        let named = self.wal.lock().install_spare()?;
                        self.finish_naming(named).map(|()| true)
                    }
                    false => Ok(false),
                }
            });
        match result {
            Ok(prepared) => prepared,
            Err(e) => {
                tracing::warn!(error = %e, path = %self.wal_path.display(), "could not preallocate a log segment; writes stay slower until one is ready");
                false
            }
        }
    }

    pub(super) fn checkpoint(&self, job: &Checkpoint) -> Result<(), StoreError> {
        let db = self.db()?;
        self.checkpoint_into(&db, &[&job.frozen], job.upto)?;
        self.pending.lock().frozen = None;
        Ok(())
    }

    /// Reopens sled after an I/O error. sled recovers the last checkpoint
    /// plus a prefix of what was written since, and the checkpoint being
    /// retried writes every key it covers again, so nothing is lost.
    pub(super) fn reopen(&self) -> Result<(), StoreError> {
        let mut slot = self.db.lock();
        // sled locks its directory until the last handle is gone.
        drop(slot.take());
        *self.sled_log.lock() = None;
        let db = open_sled(&self.db_path, &self.options)?;
        *self.sled_log.lock() = Some(open_sled_log(&self.db_path)?);
        *slot = Some(db);
        self.broken.store(false, Ordering::SeqCst);
        tracing::warn!(path = %self.db_path.display(), "reopened the database after an I/O error");
        Ok(())
    }
}

/// Checkpoints and spare segments are background work: a checkpoint writes
/// a second's worth of changes into sled in one burst (≈ 17 ms of CPU at
/// 20k cycles/s), and on two cores that burst took a core from the threads
/// answering requests, which showed as a latency spike every second. At
/// nice 10 the scheduler gives it about a tenth of a busy core and all of an
/// idle one (measured: cycle p99 down 0.1–0.9 ms in six of six interleaved
/// runs, throughput +3–6 %). It still finishes long before the next freeze,
/// and if it ever fell behind the log would only grow until it caught up.
pub(super) const CHECKPOINT_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`CHECKPOINT_NICE`]. On Linux a
/// thread's nice value is its own, so only this thread is affected.
pub(super) fn lower_this_threads_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) =
        rustix::process::setpriority_process(Some(rustix::thread::gettid()), CHECKPOINT_NICE)
    {
        tracing::debug!(error = %e, "could not lower the checkpoint thread's priority");
    }
}

/// Writes changes into sled, in order.
pub(super) fn apply<'a>(
    db: &sled::Db,
    changes: impl Iterator<Item = (&'a Vec<u8>, Option<&'a Vec<u8>>)>,
) -> Result<(), sled::Error> {
    for (k, v) in changes {
        match v {
            Some(v) => drop(db.insert(k.as_slice(), v.as_slice())?),
            None => drop(db.remove(k.as_slice())?),
        }
    }
    Ok(())
}

pub(super) fn open_sled(path: &Path, options: &StoreOptions) -> Result<sled::Db, StoreError> {
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
pub(super) fn open_sled_log(db_path: &Path) -> Result<File, StoreError> {
    let path = db_path.join("db");
    File::open(&path).map_err(|source| StoreError::Io {
        what: "opening",
        path,
        source,
    })
}
