//! Group commit: one thread writes every change, one thread flushes, one
//! flush per batch.
//!
//! The coordinator decides under its lock and, still under the lock, hands
//! the resulting [`Job`] to the [`Committer`]; so jobs reach the disk in the
//! order the state machine produced them. The writer thread takes the first
//! job, drains every job that queued up meanwhile, and writes them all with
//! one [`Store::write`] (one atomic sled batch, and an `fdatasync` of the
//! token reservation when it must grow). It hands the batch to the flusher
//! thread and goes on with the next one. The flusher takes every batch
//! written so far, calls [`Store::flush`] once for all of them, and only then
//! runs each job's replies. A grant is therefore never answered before it is
//! durable, concurrent grants share one flush (the busier the server, the
//! larger the batches), and the CPU work of writing one batch overlaps the
//! disk wait of flushing the previous one: under load flushes run back to
//! back.
//!
//! There is exactly one flusher, which also sidesteps sled 0.34's
//! `flush_async()` hang with many concurrent callers (see shared FACTS).
//!
//! A job with no changes is a barrier: its replies run once every job before
//! it is durable. The coordinator uses that before it shows anyone state that
//! might still be in flight (an idempotent replay, a Describe).

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
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Committer {
    /// Starts the writer and flusher threads over `store`.
    pub fn start(store: Arc<Store>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let (written_tx, written_rx) = std::sync::mpsc::channel();
        let flusher = {
            let store = store.clone();
            std::thread::Builder::new()
                .name("leasehold-flush".into())
                .spawn(move || flush_loop(store, written_rx))?
        };
        let writer = std::thread::Builder::new()
            .name("leasehold-commit".into())
            .spawn(move || write_loop(store, rx, written_tx))?;
        Ok(Committer {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(vec![writer, flusher]),
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

    /// Writes what is queued, flushes, and stops the threads.
    pub fn close(&self) {
        drop(self.tx.lock().take());
        // The writer first: when it ends, the flusher's channel closes.
        for thread in self.threads.lock().drain(..) {
            if thread.join().is_err() {
                tracing::error!("a committer thread panicked");
            }
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.close();
    }
}

/// A batch the writer has applied (or failed to), on its way to a flush.
struct Written {
    result: Durable,
    /// Whether the batch wrote anything (an all-barrier batch does not).
    wrote: bool,
    jobs: Vec<Job>,
}

fn write_loop(
    store: Arc<Store>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    flusher: std::sync::mpsc::Sender<Written>,
) {
    while let Some(first) = rx.blocking_recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let (result, wrote) = match store.write(jobs.iter().flat_map(|j| j.changes.iter())) {
            Ok(wrote) => (Ok(()), wrote),
            Err(e) => {
                tracing::error!(error = %e, jobs = jobs.len(), "commit failed; replying UNAVAILABLE");
                (Err(Arc::new(e)), false)
            }
        };
        let written = Written {
            result,
            wrote,
            jobs,
        };
        if let Err(lost) = flusher.send(written) {
            // The flusher is gone (it panicked): nothing can become durable.
            let closed = Arc::new(StoreError::Closed);
            for job in lost.0.jobs {
                for reply in job.replies {
                    reply(Err(closed.clone()));
                }
            }
        }
    }
}

fn flush_loop(store: Arc<Store>, rx: std::sync::mpsc::Receiver<Written>) {
    let mut batches: Vec<Written> = Vec::new();
    while let Ok(first) = rx.recv() {
        batches.push(first);
        batches.extend(rx.try_iter());
        // One flush covers every batch written before it starts. Batches
        // that wrote nothing (barriers) need none: everything before them
        // was covered by an earlier flush, since batches arrive in order.
        let flushed = if batches.iter().any(|b| b.wrote) {
            store.flush().map_err(|e| {
                tracing::error!(error = %e, "flush failed; replying UNAVAILABLE");
                Arc::new(e)
            })
        } else {
            Ok(())
        };
        for batch in batches.drain(..) {
            let result = batch.result.clone().and(flushed.clone());
            for job in batch.jobs {
                for reply in job.replies {
                    reply(result.clone());
                }
            }
        }
    }
    if let Err(e) = store.flush() {
        tracing::error!(error = %e, "final flush failed");
    }
}
