//! Group commit: one writer at a time, one synchronous log write per batch.
//!
//! The coordinator decides under its lock and, still under the lock, queues
//! the resulting [`Job`] with [`Committer::submit`]; so jobs reach the disk
//! in the order the state machine produced them. Whoever writes takes every
//! job queued so far, writes them all with one [`Store::commit`] (one log
//! record and one synchronous write, plus an `fdatasync` of the token
//! reservation when it must grow), and only then runs each job's replies. A
//! grant is therefore never answered before it is durable, and concurrent
//! grants share one write: the busier the server, the larger the batches.
//!
//! # Who writes
//!
//! After releasing its lock the coordinator calls [`Committer::help`]. If
//! no batch is being written, the calling task writes the queue itself, on
//! its own thread: when the server is not saturated (a single hot resource,
//! say) that saves two thread wake-ups per request, the committer's and the
//! reply's, which cost more than the write itself on a small VM. If a batch
//! is being written, `help` returns at once and the writer picks the job up
//! when it finishes. A task writes at most one batch: if more queued up
//! meanwhile it hands over to the committer thread, so under load the
//! thread does the writing and the runtime's workers keep serving the
//! network. The only worker of a runtime never writes: blocking it would
//! stop the network, and batches could never grow.
//!
//! There is exactly one writer at a time (the `writer` lock), so the log
//! needs no locking of its own.
//!
//! A job with no changes is a barrier: its replies run once every job before
//! it is durable. The coordinator uses that before it shows anyone state that
//! might still be in flight (an idempotent replay, a Describe).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::state::Change;
use crate::store::{Store, StoreError};

/// The result a reply sees: `Ok` once its job is durable.
pub type Durable = Result<(), Arc<StoreError>>;

/// Runs after the job's batch was written (or failed).
pub type Reply = Box<dyn FnOnce(Durable) + Send>;

/// Changes to persist, and what to do once they are.
pub struct Job {
    /// In the order they happened.
    pub changes: Vec<Change>,
    /// Run after the batch holding this job is durable (or failed).
    pub replies: Vec<Reply>,
    /// In a cluster, the epoch of the table that decided the changes (see
    /// `crate::raft`); 0 on a single node.
    pub epoch: u64,
}

/// Most jobs written in one batch; bounds the latency of the first one.
const MAX_BATCH: usize = 4096;

/// Callers write batches themselves only while batches stay this small.
const INLINE_BATCH: usize = 2;

/// The handle to the committer.
pub struct Committer {
    shared: Arc<CommitQueue>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct CommitQueue {
    store: Arc<Store>,
    /// Jobs not yet written, oldest first; `None` once closed.
    queue: Mutex<Option<Vec<Job>>>,
    /// Held while a batch is written and answered.
    writer: Mutex<()>,
    batches: AtomicU64,
    /// Jobs in the last batch written: large batches mean a busy server.
    last_batch: AtomicUsize,
    stopping: AtomicBool,
    /// The committer thread, to wake it.
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl Committer {
    /// Starts the committer thread over `store`.
    pub fn start(store: Arc<Store>) -> std::io::Result<Self> {
        let shared = Arc::new(CommitQueue {
            store,
            queue: Mutex::new(Some(Vec::new())),
            writer: Mutex::new(()),
            batches: AtomicU64::new(0),
            last_batch: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            thread: std::sync::OnceLock::new(),
        });
        let thread = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("leasehold-commit".into())
                .spawn(move || shared.run())?
        };
        let _ = shared.thread.set(thread.thread().clone());
        Ok(Committer {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job; call [`Committer::help`] once the caller's own locks
    /// are released. After [`Committer::close`], its replies see
    /// [`StoreError::Closed`] at once.
    pub fn submit(&self, job: Job) {
        let rejected = match &mut *self.shared.queue.lock() {
            Some(queue) => {
                queue.push(job);
                None
            }
            None => Some(job),
        };
        if let Some(job) = rejected {
            let closed = Arc::new(StoreError::Closed);
            for reply in job.replies {
                reply(Err(closed.clone()));
            }
        }
    }

    /// Writes the queue on the calling thread if nobody is writing (see the
    /// module docs); returns at once otherwise.
    pub fn help(&self) {
        if self.shared.last_batch.load(Ordering::Relaxed) > INLINE_BATCH || !may_block_caller() {
            // Busy (batches are large) or the caller is the runtime's only
            // worker: the thread writes.
            self.shared.wake_thread();
        } else {
            self.shared.lead(false);
        }
    }

    /// Batches written so far that held changes (each cost one sync).
    pub fn batches(&self) -> u64 {
        self.shared.batches.load(Ordering::Relaxed)
    }

    /// Writes what is queued and stops the thread; later jobs are refused.
    pub fn close(&self) {
        let Some(thread) = self.thread.lock().take() else {
            return;
        };
        self.shared.stopping.store(true, Ordering::SeqCst);
        thread.thread().unpark();
        if thread.join().is_err() {
            tracing::error!("the committer thread panicked");
        }
    }
}

/// Whether the calling thread may spend a synchronous write on a batch.
///
/// Not when it is the only worker of a Tokio runtime: while it writes,
/// nothing reads the network, so the next batch again holds only the one or
/// two requests that arrived in between, and the server settles at one
/// write per request (measured: 2.9k cycles/s instead of 18k with one
/// worker thread). With two or more workers the others keep serving.
fn may_block_caller() -> bool {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Err(_) => true,
        Ok(h) => h.runtime_flavor() == RuntimeFlavor::MultiThread && h.metrics().num_workers() > 1,
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.close();
    }
}

impl CommitQueue {
    fn run(&self) {
        while !self.stopping.load(Ordering::SeqCst) {
            std::thread::park();
            self.lead(true);
        }
        // Write what is left and refuse the rest, under the writer lock so
        // no helper is halfway through a batch.
        let _writer = self.writer.lock();
        let rest = self.queue.lock().take().unwrap_or_default();
        self.write(rest);
    }

    /// Writes batches while this thread holds the writer lock. A helper
    /// (`thread == false`) writes one batch and hands the rest to the thread.
    fn lead(&self, thread: bool) {
        loop {
            {
                let Some(_writer) = self.writer.try_lock() else {
                    // The writer re-checks the queue after it lets go.
                    return;
                };
                let jobs = match &mut *self.queue.lock() {
                    Some(queue) if !queue.is_empty() => {
                        let n = queue.len().min(MAX_BATCH);
                        queue.drain(..n).collect()
                    }
                    _ => return,
                };
                self.write(jobs);
            }
            // Jobs queued while this batch was written found the writer lock
            // taken; someone must pick them up.
            if self.queue.lock().as_ref().is_none_or(|q| q.is_empty()) {
                return;
            }
            if !thread {
                self.wake_thread();
                return;
            }
        }
    }

    fn wake_thread(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }

    fn write(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        self.last_batch.store(jobs.len(), Ordering::Relaxed);
        let writes = jobs.iter().any(|j| !j.changes.is_empty());
        if writes {
            self.batches.fetch_add(1, Ordering::Relaxed);
        }
        let started = std::time::Instant::now();
        let result = self
            .store
            .commit(jobs.iter().flat_map(|j| j.changes.iter()))
            .map_err(Arc::new);
        if writes {
            // Barriers alone (no changes) write nothing and are not measured.
            let metrics = self.store.metrics();
            metrics.commit_duration.record(started.elapsed());
            metrics.batch_size.record(jobs.len() as f64);
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, jobs = jobs.len(), "commit failed; replying UNAVAILABLE");
        }
        for job in jobs {
            for reply in job.replies {
                reply(result.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::lease::Resource;
    use crate::store::StoreOptions;

    fn grant(resource: &str, token: u64) -> Change {
        Change::Granted(crate::store::tests::record(resource, token, None))
    }

    /// Many threads submit (in one order, as the coordinator's lock makes
    /// them) and help: every job is answered exactly once, only once its
    /// grant is in the table, and everything is there after a restart.
    #[test]
    fn helpers_and_the_thread_answer_every_job_once_and_durably() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
        let committer = Arc::new(Committer::start(store.clone()).unwrap());
        let order = Arc::new(Mutex::new(0u64));
        let replies = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (committer, order, replies, store) = (
                    committer.clone(),
                    order.clone(),
                    replies.clone(),
                    store.clone(),
                );
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let (tx, rx) = std::sync::mpsc::channel();
                        let resource = format!("r/{t}/{i}");
                        let token = {
                            // The coordinator's lock: tokens in submission order.
                            let mut next = order.lock();
                            *next += 1;
                            let (token, replies, store) = (*next, replies.clone(), store.clone());
                            let name = Resource::new(&resource).unwrap();
                            committer.submit(Job {
                                changes: vec![grant(&resource, token)],
                                epoch: 0,
                                replies: vec![Box::new(move |d| {
                                    replies.fetch_add(1, Ordering::SeqCst);
                                    // Answered only once the grant is in the table.
                                    let seen = store.history(&name, 1).unwrap();
                                    tx.send((d, seen.first().map(|g| g.token.0))).unwrap();
                                })],
                            });
                            token
                        };
                        committer.help();
                        let (durable, seen) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
                        assert!(durable.is_ok(), "{durable:?}");
                        assert_eq!(seen, Some(token));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        committer.close();
        // Exactly one reply per job, none twice (a second call would count).
        assert_eq!(replies.load(Ordering::SeqCst), 1600);

        // After close, jobs are refused at once.
        let (tx, rx) = std::sync::mpsc::channel();
        committer.submit(Job {
            changes: vec![grant("late", 9999)],
            epoch: 0,
            replies: vec![Box::new(move |d| tx.send(d).unwrap())],
        });
        assert!(matches!(
            rx.recv().unwrap().unwrap_err().as_ref(),
            StoreError::Closed
        ));
        store.close().unwrap();
        drop(store);
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.leases.len(), 1600);
        // The reservation was raised once, at the first grant.
        assert_eq!(loaded.last_token, 1 + crate::store::RESERVATION_BLOCK);
    }

    /// On a runtime with one worker, a helper never writes: the thread does.
    #[test]
    fn the_only_worker_of_a_runtime_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
        let committer = Committer::start(store.clone()).unwrap();
        for runtime in [
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .build()
                .unwrap(),
        ] {
            let (tx, rx) = std::sync::mpsc::channel();
            runtime.block_on(async {
                committer.submit(Job {
                    changes: vec![grant("r", 1)],
                    epoch: 0,
                    replies: vec![Box::new(move |_| {
                        tx.send(std::thread::current().name().map(str::to_owned))
                            .unwrap()
                    })],
                });
                committer.help();
            });
            let writer = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(writer.as_deref(), Some("leasehold-commit"));
        }
    }

    /// Jobs that queued up while nobody was writing go out as one batch:
    /// one log record, one synchronous write.
    #[test]
    fn queued_jobs_are_written_as_one_batch() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path(), StoreOptions::default()).unwrap());
        let committer = Committer::start(store.clone()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        for token in 1..=50 {
            let tx = tx.clone();
            committer.submit(Job {
                changes: vec![grant(&format!("r{token}"), token)],
                epoch: 0,
                replies: vec![Box::new(move |d| tx.send(d).unwrap())],
            });
        }
        committer.help();
        for _ in 0..50 {
            assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap().is_ok());
        }
        assert_eq!(committer.batches(), 1);
    }
}
