//! Group commit: one thread writes every change, one `fdatasync` per batch.
//!
//! The coordinator decides under its lock and, still under the lock, hands
//! the resulting [`Job`] to the [`Committer`]; so jobs reach the disk in the
//! order the state machine produced them. The committer thread takes the
//! first job, drains every job that queued up meanwhile, writes them all with
//! one [`Store::commit`] (the changes in order as one log record, one
//! `fdatasync`, plus one of the token reservation when it must grow), and
//! only then runs each job's replies. A grant is therefore never answered
//! before it is durable, and concurrent grants share one sync: the busier
//! the server, the larger the batches.
//!
//! There is exactly one writer, so the log needs no locking of its own and
//! sled's `flush_async()` (which hangs with many concurrent callers, see
//! shared FACTS) is never called.
//!
//! A job with no changes is a barrier: its replies run once every job before
//! it is durable. The coordinator uses that before it shows anyone state that
//! might still be in flight (an idempotent replay, a Describe).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;
use tokio::sync::mpsc;

use crate::state::Change;
use crate::store::{Store, StoreError};

/// The result a reply sees: `Ok` once its job is durable.
pub type Durable = Result<(), Arc<StoreError>>;

/// Runs on the committer thread after the job's batch was written (or failed).
pub type Reply = Box<dyn FnOnce(Durable) + Send>;

/// Changes to persist, and what to do once they are.
pub struct Job {
    /// In the order they happened.
    pub changes: Vec<Change>,
    /// Run after the batch holding this job is durable (or failed).
    pub replies: Vec<Reply>,
}

/// Most jobs written in one batch; bounds the latency of the first one.
const MAX_BATCH: usize = 4096;

/// The handle to the committer thread.
pub struct Committer {
    tx: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    batches: Arc<AtomicU64>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Committer {
    /// Starts the committer thread over `store`.
    pub fn start(store: Arc<Store>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let batches = Arc::new(AtomicU64::new(0));
        let counter = batches.clone();
        let thread = std::thread::Builder::new()
            .name("leasehold-commit".into())
            .spawn(move || run(store, rx, &counter))?;
        Ok(Committer {
            tx: Mutex::new(Some(tx)),
            batches,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job. After [`Committer::close`], its replies see
    /// [`StoreError::Closed`] at once.
    pub fn submit(&self, job: Job) {
        let rejected = match &*self.tx.lock() {
            Some(tx) => tx.send(job).err().map(|e| e.0),
            None => Some(job),
        };
        if let Some(job) = rejected {
            let closed = Arc::new(StoreError::Closed);
            for reply in job.replies {
                reply(Err(closed.clone()));
            }
        }
    }

    /// Batches written so far that held changes (each cost one sync).
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    /// Writes what is queued and stops the thread.
    pub fn close(&self) {
        drop(self.tx.lock().take());
        if let Some(thread) = self.thread.lock().take() {
            if thread.join().is_err() {
                tracing::error!("the committer thread panicked");
            }
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.close();
    }
}

fn run(store: Arc<Store>, mut rx: mpsc::UnboundedReceiver<Job>, batches: &AtomicU64) {
    let mut jobs: Vec<Job> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        jobs.push(first);
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if jobs.iter().any(|j| !j.changes.is_empty()) {
            batches.fetch_add(1, Ordering::Relaxed);
        }
        let result = store
            .commit(jobs.iter().flat_map(|j| j.changes.iter()))
            .map_err(Arc::new);
        if let Err(e) = &result {
            tracing::error!(error = %e, jobs = jobs.len(), "commit failed; replying UNAVAILABLE");
        }
        for job in jobs.drain(..) {
            for reply in job.replies {
                reply(result.clone());
            }
        }
    }
}
