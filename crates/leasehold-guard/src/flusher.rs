//! One thread that makes sled's writes durable for everyone (group commit).
//!
//! Not a guard concept: the sled guard and the idempotency store both use
//! it, and any sled user can.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use parking_lot::Mutex;

/// A flush requested through a [`GroupFlusher`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlushError {
    /// sled's `flush()` failed: the data is committed but may not survive a
    /// crash of the process.
    #[error("flushing sled failed: {0}; the write is committed but may not survive a crash: check the disk")]
    Storage(sled::Error),
    /// sled's log could not be synced to the device: the write survives a
    /// crash of the process but maybe not a power cut.
    #[error("syncing sled's log to the device failed: {0}; the write may not survive a power cut: check the disk")]
    Sync(Arc<std::io::Error>),
    /// The flusher thread is gone (it panicked or could not start).
    #[error(
        "the flusher thread has stopped, so writes cannot be made durable; restart the process"
    )]
    Stopped,
}

type FlushResult = Result<(), FlushError>;

enum Waiter {
    Blocking(mpsc::SyncSender<FlushResult>),
    Async(tokio::sync::oneshot::Sender<FlushResult>),
}

impl Waiter {
    fn complete(self, result: FlushResult) {
        // A waiter that gave up (its future was dropped) no longer listens.
        match self {
            Waiter::Blocking(tx) => drop(tx.send(result)),
            Waiter::Async(tx) => drop(tx.send(result)),
        }
    }
}

struct FlusherInner {
    tx: Mutex<Option<mpsc::Sender<Waiter>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// `flush()` calls made so far.
    flushes: Arc<AtomicU64>,
}

impl Drop for FlusherInner {
    fn drop(&mut self) {
        // Closing the queue stops the thread after a last flush; joining it
        // releases its handle on the database, so the directory can be
        // reopened as soon as the last clone is dropped.
        drop(self.tx.lock().take());
        if let Some(thread) = self.thread.lock().take() {
            if thread.join().is_err() {
                tracing::error!("the guard's flusher thread panicked");
            }
        }
    }
}

/// One thread that runs sled's `flush()` for everyone (group commit).
///
/// Callers enqueue a request and wait; the thread takes every request queued
/// so far, runs **one** `flush()`, and answers them all. Each caller's flush
/// therefore starts after its request, so it covers everything the caller
/// committed before asking, and a busy server shares one flush among many
/// writes. Any number of threads and tasks may call [`GroupFlusher::flush`]
/// and [`GroupFlusher::wait_flushed`] at once: there is only ever one flush
/// in progress, which also sidesteps sled 0.34's `flush_async()` hang.
///
/// Cloning is cheap and shares the thread. When the last clone is dropped,
/// the thread flushes once more and exits; the drop waits for it.
///
/// What a flush guarantees depends on how the flusher was started:
/// [`GroupFlusher::start_synced`] (the database's directory is known) also
/// `fdatasync`s sled's log after each `flush()`, so an acknowledged write
/// survives a power cut, as a granted token does on the coordinator;
/// [`GroupFlusher::start`] (a temporary database, or a caller that syncs
/// itself) only survives `kill -9` of the process, since sled 0.34's
/// `flush()` stops at `sync_file_range`.
#[derive(Clone)]
pub struct GroupFlusher {
    inner: Arc<FlusherInner>,
}

impl std::fmt::Debug for GroupFlusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupFlusher").finish_non_exhaustive()
    }
}

impl GroupFlusher {
    /// Starts the flusher thread for `db`: each flush is sled's `flush()`
    /// (survives `kill -9`, not a power cut; see [`GroupFlusher::start_synced`]).
    pub fn start(db: sled::Db) -> std::io::Result<Self> {
        Self::spawn(db, None, None)
    }

    /// Starts the flusher thread for `db`, opened from the directory `dir`:
    /// each flush is sled's `flush()` followed by an `fdatasync` of sled's
    /// log (`dir/db`, where sled 0.34 keeps every segment), so what it
    /// acknowledges survives a power cut or a kernel crash.
    pub fn start_synced(db: sled::Db, dir: impl AsRef<Path>) -> std::io::Result<Self> {
        let log = File::open(dir.as_ref().join("db"))?;
        Self::spawn(db, Some(log), None)
    }

    /// [`GroupFlusher::start_synced`], calling `on_synced` after each sync
    /// and before its waiters are answered: the tests' model of a power cut
    /// copies the database there (what the device is known to hold).
    #[cfg(test)]
    pub(crate) fn start_synced_observed(
        db: sled::Db,
        dir: impl AsRef<Path>,
        on_synced: impl Fn() + Send + 'static,
    ) -> std::io::Result<Self> {
        let log = File::open(dir.as_ref().join("db"))?;
        Self::spawn(db, Some(log), Some(Box::new(on_synced)))
    }

    fn spawn(
        db: sled::Db,
        log: Option<File>,
        on_synced: Option<OnSynced>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let flushes = Arc::new(AtomicU64::new(0));
        let counter = flushes.clone();
        let thread = std::thread::Builder::new()
            .name("leasehold-flush".into())
            .spawn(move || run_flusher(db, log, on_synced, rx, &counter))?;
        Ok(GroupFlusher {
            inner: Arc::new(FlusherInner {
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
                flushes,
            }),
        })
    }

    fn enqueue(&self, waiter: Waiter) {
        let rejected = match &*self.inner.tx.lock() {
            Some(tx) => tx.send(waiter).err().map(|e| e.0),
            None => Some(waiter),
        };
        if let Some(waiter) = rejected {
            waiter.complete(Err(FlushError::Stopped));
        }
    }

    /// `flush()` calls made so far: fewer than the callers waiting on them
    /// when flushes are shared.
    pub fn flushes(&self) -> u64 {
        self.inner
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Blocks until a `flush()` that started after this call has finished.
    ///
    /// Blocking: from async code use [`GroupFlusher::wait_flushed`].
    pub fn flush(&self) -> Result<(), FlushError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.enqueue(Waiter::Blocking(tx));
        rx.recv().unwrap_or(Err(FlushError::Stopped))
    }

    /// Waits, without blocking the executor, until a `flush()` that started
    /// after this call has finished. Safe with any number of concurrent
    /// callers (unlike sled's own `flush_async()`).
    pub async fn wait_flushed(&self) -> Result<(), FlushError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.enqueue(Waiter::Async(tx));
        rx.await.unwrap_or(Err(FlushError::Stopped))
    }
}

type OnSynced = Box<dyn Fn() + Send>;

fn run_flusher(
    db: sled::Db,
    log: Option<File>,
    on_synced: Option<OnSynced>,
    rx: mpsc::Receiver<Waiter>,
    flushes: &AtomicU64,
) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        // Everything queued before the flush starts is covered by it.
        batch.extend(rx.try_iter());
        flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = flush_once(&db, log.as_ref()).inspect_err(|e| {
            tracing::error!(error = %e, waiters = batch.len(), "sled flush failed");
        });
        if let (Ok(()), Some(observe)) = (&result, &on_synced) {
            observe();
        }
        for waiter in batch.drain(..) {
            waiter.complete(result.clone());
        }
    }
    if let Err(e) = flush_once(&db, log.as_ref()) {
        tracing::error!(error = %e, "final sled flush failed");
    }
}

/// sled's `flush()`, then (when the log file is known) an `fdatasync` of
/// it: sled's flush ends in `sync_file_range`, which does not reach the
/// device; this does.
fn flush_once(db: &sled::Db, log: Option<&File>) -> FlushResult {
    db.flush().map_err(FlushError::Storage)?;
    if let Some(log) = log {
        log.sync_data().map_err(|e| FlushError::Sync(Arc::new(e)))?;
    }
    Ok(())
}
