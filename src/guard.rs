//! The storage-side guard: rejects writes that carry a stale fencing token.
//!
//! A lease can end while its holder still believes it holds it (a long GC
//! pause, a partition, a stopped VM). The coordinator then grants the
//! resource to someone else with a larger fencing token. The only place that
//! can stop the old holder's late writes is the storage itself: it remembers,
//! per resource, the highest token it has accepted, and refuses anything
//! older. This module is that memory.
//!
//! # The rule
//!
//! For each resource the guard keeps a *high-water mark*: the highest token
//! it has accepted. A write offering token `t`:
//!
//! | mark        | offered          | result                                        |
//! |-------------|------------------|-----------------------------------------------|
//! | none        | any `t`          | accepted; the mark becomes `t`                |
//! | `h`         | `t == h`         | accepted (the same lease writing again)       |
//! | `h`         | `t > h`          | accepted; the mark becomes `t`                |
//! | `h`         | `t < h`          | rejected: [`GuardError::StaleToken`]          |
//!
//! The rule alone is the pure function [`check`]; adapters for storage this
//! crate does not own (SQL, object stores) use it or its conditional-write
//! equivalent (see [below](#storage-you-do-not-own-conditional-writes)).
//!
//! # Atomic with the write
//!
//! Checking and then writing in two steps leaves a window: token 33 passes
//! its check, token 34 checks and writes, then 33's write lands on top of
//! 34's. So both backends run the caller's write *inside* the check:
//!
//! - [`SledGuard`] runs the mark check, the caller's write and the mark
//!   update in **one sled transaction** over the guard's tree and the
//!   caller's trees ([`SledGuard::write`], [`SledGuard::write_many`]). They
//!   commit together or not at all, and are recovered together after a crash.
//! - [`MemoryGuard`] holds the resource's lock while the caller's closure
//!   runs ([`MemoryGuard::write`]), so check, write and update are one step
//!   for every other writer of that resource. Writers of other resources do
//!   not wait. [`MemoryGuard::check_and_record`] is the fast path without a
//!   closure, for callers whose write is already ordered some other way.
//!
//! One resource protects everything written under it: the guard does not
//! know or care which keys the closure touches.
//!
//! # Durability ([`SledGuard`])
//!
//! The marks live in their own sled tree and survive restarts. Three levels:
//!
//! - [`SledGuard::write`] returns once the transaction is committed in
//!   sled's memory. A `kill -9` right after may lose it (sled writes its
//!   buffers out every `flush_every_ms`, 500 ms by default).
//! - [`SledGuard::write_durable`] (or [`SledGuard::write`] followed by
//!   [`SledGuard::flush`] / [`SledGuard::wait_flushed`]) returns once sled's
//!   `flush()` has handed the write to the kernel: it survives `kill -9` of
//!   the process. Concurrent callers share flushes through one
//!   [`GroupFlusher`] thread (one `flush()` per batch; never sled's
//!   `flush_async()`, which hangs with 7 or more concurrent callers).
//! - Nothing here survives **power loss or a kernel crash** for certain:
//!   sled 0.34's `flush()` does not `fsync`; sled's background thread does,
//!   every `flush_every_ms`. A machine crash can therefore lose up to that
//!   long (~500 ms) of acknowledged writes **and their marks, together**:
//!   they were one transaction, so recovery never shows a mark without its
//!   write or a write without its mark.
//!
//!   Plainly: that is safe only in the sense that the store and its marks
//!   roll back *together*, so the store stays consistent with itself. It is
//!   **not** safe for the lease protocol: the lost writes were acknowledged,
//!   and the mark is back at an older token, so a zombie writer still holding
//!   that older token would be admitted again. If that matters, the storage
//!   must `fsync` before acknowledging (sled 0.34 cannot on demand), or
//!   clients must treat a store restart after a machine crash as "re-check
//!   what you wrote".
//!
//! # Memory
//!
//! - [`MemoryGuard`]: about **150 bytes per tracked resource** with short
//!   names, measured as resident memory over 1,000,000 resources with
//!   12-byte names (the ignored `memory_per_resource` test:
//!   `cargo test --lib guard -- --ignored --nocapture memory_per_resource`).
//!   Where it goes: a hash-map slot (24 bytes and a control byte, at most
//!   7/8 full and up to half empty right after growing), the boxed name
//!   (rounded up to the allocator's 32-byte minimum chunk), and one 48-byte
//!   `Arc<Mutex<Slot>>` (64 with the allocator's header). Expect roughly
//!   110 to 190 bytes depending on where the tables are in their growth,
//!   plus the name's length beyond 24 bytes.
//! - [`SledGuard`]: one key (the resource name) and an 8-byte value per
//!   resource in sled, plus sled's per-entry overhead; its cache is sled's.
//!
//! Resources are never forgotten silently: a guard that dropped a mark would
//! admit the stale tokens it exists to reject. Only an explicit
//! [`MemoryGuard::forget`] / [`SledGuard::forget`] removes one.
//!
//! # Storage you do not own: conditional writes
//!
//! When the data lives in a database this process does not embed, make the
//! database do the check in the same statement as the write. The fence is a
//! column next to the value, and the update only matches rows whose fence is
//! not newer than the offered token; the same rule as [`check`]:
//!
//! ```sql
//! -- $k key, $v value, $token the writer's fencing token.
//! UPDATE t SET value = $v, fence = $token
//!  WHERE key = $k AND fence <= $token;
//! -- 0 rows updated: the row's fence is newer. The lease that issued $token
//! -- was superseded; stop writing and re-acquire.
//!
//! -- With a first write (PostgreSQL / SQLite upsert):
//! INSERT INTO t (key, value, fence) VALUES ($k, $v, $token)
//! ON CONFLICT (key) DO UPDATE SET value = excluded.value, fence = excluded.fence
//!  WHERE t.fence <= excluded.fence;
//! ```
//!
//! Here the fence is per row rather than per resource; use one resource per
//! row, or put the fence on a row that every write of the resource updates in
//! the same transaction. The tests model these statements with [`check`].
//!
//! # Example
//!
//! ```
//! use leasehold::guard::{GuardError, SledGuard, TxResult};
//!
//! let db = sled::Config::new().temporary(true).open()?;
//! let data = db.open_tree("orders")?;
//! let guard = SledGuard::open(&db)?;
//!
//! // Token 34 writes: accepted, the mark becomes 34.
//! guard.write_durable("orders", 34, &data, |tx| -> TxResult {
//!     tx.insert("order-1", "shipped")?;
//!     Ok(())
//! })?;
//!
//! // A zombie with token 33 tries to write: rejected, nothing changes.
//! let err = guard
//!     .write("orders", 33, &data, |tx| -> TxResult {
//!         tx.insert("order-1", "cancelled")?;
//!         Ok(())
//!     })
//!     .unwrap_err();
//! assert!(matches!(err, GuardError::StaleToken { offered: 33, highest: 34, .. }));
//! assert_eq!(data.get("order-1")?.as_deref(), Some(&b"shipped"[..]));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError, Transactional,
    TransactionalTree,
};

/// The result type of a guarded write's closure ([`SledGuard::write`]).
///
/// With the defaults, a closure that never aborts: `|tx| -> TxResult { tx.insert(k, v)?; Ok(()) }`
/// (the annotation spares you naming the abort type). A closure that may abort
/// with its own error `E` returns `TxResult<T, E>` and aborts with
/// [`sled::transaction::abort`]`(e)`.
pub type TxResult<T = (), E = Infallible> = ConflictableTransactionResult<T, E>;

/// A token older than the resource's high-water mark: the pure form of
/// [`GuardError::StaleToken`], returned by [`check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "stale fencing token: offered {offered}, highest accepted {highest}; the lease that \
     issued this token was superseded: stop writing and re-acquire"
)]
pub struct Stale {
    /// The token the writer offered.
    pub offered: u64,
    /// The highest token accepted so far.
    pub highest: u64,
}

/// Why [`check`] accepted a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// No token was accepted for the resource before; the mark becomes this one.
    First,
    /// The token equals the mark: the same lease writing again.
    Same,
    /// The token is newer than the mark, which becomes this token.
    Newer {
        /// The mark before this write.
        previous: u64,
    },
}

impl Admitted {
    /// Whether the mark must be updated to the offered token.
    pub fn raises_mark(self) -> bool {
        !matches!(self, Admitted::Same)
    }
}

/// The guard's rule as a pure function: may a write offering `offered` go
/// ahead when the highest token accepted so far is `highest`?
///
/// Equal tokens are accepted (one lease may write many times); older ones
/// are [`Stale`]. The caller must update the mark to `offered` when the
/// result [raises the mark](Admitted::raises_mark), atomically with the
/// write.
///
/// ```
/// use leasehold::guard::{check, Admitted, Stale};
///
/// assert_eq!(check(None, 7), Ok(Admitted::First));
/// assert_eq!(check(Some(7), 7), Ok(Admitted::Same));
/// assert_eq!(check(Some(7), 9), Ok(Admitted::Newer { previous: 7 }));
/// assert_eq!(check(Some(9), 7), Err(Stale { offered: 7, highest: 9 }));
/// ```
#[inline]
pub fn check(highest: Option<u64>, offered: u64) -> Result<Admitted, Stale> {
    match highest {
        None => Ok(Admitted::First),
        Some(h) if offered == h => Ok(Admitted::Same),
        Some(h) if offered > h => Ok(Admitted::Newer { previous: h }),
        Some(h) => Err(Stale {
            offered,
            highest: h,
        }),
    }
}

/// What can go wrong with a guarded write. `E` is the error type with which
/// the caller's own closure may abort the write ([`Infallible`] if it cannot).
#[derive(Debug, thiserror::Error)]
pub enum GuardError<E = Infallible> {
    /// The offered token is older than one already accepted for the resource;
    /// nothing was written.
    #[error(
        "stale fencing token for resource {resource:?}: offered {offered}, highest accepted \
         {highest}; the lease that issued this token was superseded: stop writing and re-acquire"
    )]
    StaleToken {
        /// The resource the write was fenced by.
        resource: String,
        /// The token the writer offered.
        offered: u64,
        /// The highest token accepted for the resource so far.
        highest: u64,
    },
    /// The caller's closure aborted the write; nothing was written and the
    /// mark did not move.
    #[error("the guarded write was aborted by its closure: {0}")]
    Aborted(E),
    /// The stored mark of a resource is not 8 bytes: the guard's tree was
    /// written by something else.
    #[error(
        "corrupt high-water mark for resource {resource:?}: expected 8 bytes, found {len}; \
         the guard's tree must only be written by the guard: restore it from a backup"
    )]
    Corrupt {
        /// The resource whose mark is unreadable.
        resource: String,
        /// The length of the stored value.
        len: usize,
    },
    /// sled failed (I/O error, corruption, trees from two databases in one
    /// transaction).
    #[error("storage error in the fencing guard: {0}; check the disk and the data directory")]
    Storage(#[from] sled::Error),
    /// The write committed but could not be flushed.
    #[error(transparent)]
    Flush(#[from] FlushError),
}

/// A flush requested through a [`GroupFlusher`] failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FlushError {
    /// sled's `flush()` failed: the data is committed but may not survive a
    /// crash of the process.
    #[error("flushing sled failed: {0}; the write is committed but may not survive a crash: check the disk")]
    Storage(sled::Error),
    /// The flusher thread is gone (it panicked or could not start).
    #[error(
        "the flusher thread has stopped, so writes cannot be made durable; restart the process"
    )]
    Stopped,
}

// ---------------------------------------------------------------------------
// Group flusher

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
/// What a flush guarantees: see the [module docs](self#durability-sledguard)
/// (survives `kill -9`, not power loss).
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
    /// Starts the flusher thread for `db`.
    pub fn start(db: sled::Db) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("leasehold-flush".into())
            .spawn(move || run_flusher(db, rx))?;
        Ok(GroupFlusher {
            inner: Arc::new(FlusherInner {
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(Some(thread)),
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

fn run_flusher(db: sled::Db, rx: mpsc::Receiver<Waiter>) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        // Everything queued before the flush starts is covered by it.
        batch.extend(rx.try_iter());
        let result = db.flush().map(drop).map_err(|e| {
            tracing::error!(error = %e, waiters = batch.len(), "sled flush failed");
            FlushError::Storage(e)
        });
        for waiter in batch.drain(..) {
            waiter.complete(result.clone());
        }
    }
    if let Err(e) = db.flush() {
        tracing::error!(error = %e, "final sled flush failed");
    }
}

// ---------------------------------------------------------------------------
// sled backend

/// The default name of the tree holding the high-water marks.
pub const DEFAULT_TREE: &str = "leasehold.guard.high_water";

/// Why a guarded transaction aborted, inside the transaction.
enum Abort<E> {
    Stale(Stale),
    Corrupt(usize),
    User(E),
}

fn decode_mark(value: Option<&[u8]>) -> Result<Option<u64>, usize> {
    match value {
        None => Ok(None),
        Some(bytes) => <[u8; 8]>::try_from(bytes)
            .map(|b| Some(u64::from_be_bytes(b)))
            .map_err(|_| bytes.len()),
    }
}

/// A guard whose high-water marks live in a sled tree, so they survive
/// restarts, and whose check runs in the same transaction as the caller's
/// write.
///
/// Cheap to clone (sled trees and the flusher are shared handles).
///
/// # The closure
///
/// [`SledGuard::write`] and [`SledGuard::write_many`] take the caller's
/// write as a closure over sled's transactional trees. sled may run a
/// transaction closure **more than once** (it retries on conflicts), so the
/// closure is `Fn` and must do nothing but read and write the trees it is
/// given: no I/O, no channel sends, no counters that must count once. Return
/// a value to learn what it did. Abort with
/// [`sled::transaction::abort`]`(e)`, which becomes [`GuardError::Aborted`].
///
/// sled 0.34 runs transactions one at a time per process (a global lock), so
/// keep the closure short, and never start another transaction or guarded
/// write inside it: that would deadlock.
///
/// All trees must belong to the guard's database, and none of them may be
/// the guard's own tree.
#[derive(Clone, Debug)]
pub struct SledGuard {
    marks: sled::Tree,
    flusher: GroupFlusher,
}

impl SledGuard {
    /// Opens the guard in `db`'s [`DEFAULT_TREE`], with its own flusher.
    pub fn open(db: &sled::Db) -> Result<Self, GuardError> {
        let flusher =
            GroupFlusher::start(db.clone()).map_err(|e| GuardError::Storage(sled::Error::Io(e)))?;
        Self::with_flusher(db, DEFAULT_TREE, flusher)
    }

    /// Opens the guard in the tree `tree_name`, sharing `flusher` (which
    /// must flush the same database) with other users of the database.
    pub fn with_flusher(
        db: &sled::Db,
        tree_name: &str,
        flusher: GroupFlusher,
    ) -> Result<Self, GuardError> {
        Ok(SledGuard {
            marks: db.open_tree(tree_name)?,
            flusher,
        })
    }

    /// The flusher this guard uses, to share with other users of the database.
    pub fn flusher(&self) -> &GroupFlusher {
        &self.flusher
    }

    /// The highest token accepted for `resource`, if any.
    pub fn highest(&self, resource: &str) -> Result<Option<u64>, GuardError> {
        let value = self.marks.get(resource.as_bytes())?;
        decode_mark(value.as_deref()).map_err(|len| GuardError::Corrupt {
            resource: resource.to_owned(),
            len,
        })
    }

    /// Checks `token` and writes through `f` into `data`, all in one
    /// transaction with the mark update. Returns what `f` returned.
    ///
    /// If the token is stale, `f` does not run and nothing changes. If `f`
    /// aborts, nothing changes either (the mark does not move). `f` may run
    /// more than once: see [the closure](SledGuard#the-closure). The write is
    /// committed, not yet flushed: see [`SledGuard::write_durable`].
    pub fn write<T, E, F>(
        &self,
        resource: &str,
        token: u64,
        data: &sled::Tree,
        f: F,
    ) -> Result<T, GuardError<E>>
    where
        F: Fn(&TransactionalTree) -> ConflictableTransactionResult<T, E>,
    {
        self.write_many(resource, token, &[data], |trees| f(&trees[0]))
    }

    /// Like [`SledGuard::write`], over several trees: `f` receives their
    /// transactional views in the order of `data`.
    pub fn write_many<T, E, F>(
        &self,
        resource: &str,
        token: u64,
        data: &[&sled::Tree],
        f: F,
    ) -> Result<T, GuardError<E>>
    where
        F: Fn(&[TransactionalTree]) -> ConflictableTransactionResult<T, E>,
    {
        if data.iter().any(|tree| tree.name() == self.marks.name()) {
            return Err(GuardError::Storage(sled::Error::Unsupported(
                "a guarded write cannot write the guard's own tree: pass only data trees".into(),
            )));
        }
        self.transact(resource, token, data, f)
            .map(|(value, _)| value)
    }

    /// The guarded transaction: the mark's check, `f` over `data`, and the
    /// mark's update, all in one sled transaction.
    fn transact<T, E, F>(
        &self,
        resource: &str,
        token: u64,
        data: &[&sled::Tree],
        f: F,
    ) -> Result<(T, Admitted), GuardError<E>>
    where
        F: Fn(&[TransactionalTree]) -> ConflictableTransactionResult<T, E>,
    {
        let mut trees: Vec<&sled::Tree> = Vec::with_capacity(1 + data.len());
        trees.push(&self.marks);
        trees.extend_from_slice(data);
        let key = resource.as_bytes();
        let result = trees[..].transaction(|views: &Vec<TransactionalTree>| {
            let marks = &views[0];
            let stored = marks.get(key)?;
            let highest = decode_mark(stored.as_deref())
                .map_err(|len| ConflictableTransactionError::Abort(Abort::Corrupt(len)))?;
            let admitted = check(highest, token)
                .map_err(|stale| ConflictableTransactionError::Abort(Abort::Stale(stale)))?;
            let value = f(&views[1..]).map_err(|e| match e {
                ConflictableTransactionError::Abort(e) => {
                    ConflictableTransactionError::Abort(Abort::User(e))
                }
                ConflictableTransactionError::Storage(e) => {
                    ConflictableTransactionError::Storage(e)
                }
                // sled's (hidden) retry signal, passed through.
                ConflictableTransactionError::Conflict => ConflictableTransactionError::Conflict,
            })?;
            if admitted.raises_mark() {
                marks.insert(key, &token.to_be_bytes()[..])?;
            }
            Ok((value, admitted))
        });
        result.map_err(|e| match e {
            TransactionError::Abort(Abort::Stale(stale)) => GuardError::StaleToken {
                resource: resource.to_owned(),
                offered: stale.offered,
                highest: stale.highest,
            },
            TransactionError::Abort(Abort::Corrupt(len)) => GuardError::Corrupt {
                resource: resource.to_owned(),
                len,
            },
            TransactionError::Abort(Abort::User(e)) => GuardError::Aborted(e),
            TransactionError::Storage(e) => GuardError::Storage(e),
        })
    }

    /// [`SledGuard::write`], then waits for a shared flush: when this
    /// returns, the write and its mark survive `kill -9` (not power loss).
    /// Blocking; from async code run [`SledGuard::write`] on a blocking
    /// thread and then await [`SledGuard::wait_flushed`].
    pub fn write_durable<T, E, F>(
        &self,
        resource: &str,
        token: u64,
        data: &sled::Tree,
        f: F,
    ) -> Result<T, GuardError<E>>
    where
        F: Fn(&TransactionalTree) -> ConflictableTransactionResult<T, E>,
    {
        let value = self.write(resource, token, data, f)?;
        self.flusher.flush()?;
        Ok(value)
    }

    /// Checks `token` against the mark and records it, with no data write:
    /// for callers whose write happens elsewhere. Mind the window between
    /// this check and that write (see the [module docs](self)).
    pub fn check_and_record(&self, resource: &str, token: u64) -> Result<Admitted, GuardError> {
        self.transact(resource, token, &[], |_| Ok(()))
            .map(|((), admitted)| admitted)
    }

    /// Blocks until everything committed before this call is flushed
    /// (survives `kill -9`). Concurrent callers share one sled `flush()`.
    pub fn flush(&self) -> Result<(), FlushError> {
        self.flusher.flush()
    }

    /// The async form of [`SledGuard::flush`]; any number of tasks may wait
    /// at once.
    pub async fn wait_flushed(&self) -> Result<(), FlushError> {
        self.flusher.wait_flushed().await
    }

    /// Removes the mark of `resource` and returns it.
    ///
    /// **Dangerous**: afterwards the guard accepts *any* token for the
    /// resource again, including the stale tokens of superseded leases. Only
    /// forget a resource that no one will ever write again (or whose data is
    /// being deleted with it).
    pub fn forget(&self, resource: &str) -> Result<Option<u64>, GuardError> {
        let old = self.marks.remove(resource.as_bytes())?;
        decode_mark(old.as_deref()).map_err(|len| GuardError::Corrupt {
            resource: resource.to_owned(),
            len,
        })
    }
}

// ---------------------------------------------------------------------------
// In-memory backend

const SHARDS: usize = 64;

struct Slot {
    highest: Option<u64>,
    /// Set by `forget` after removing the slot from its shard, so that a
    /// writer that was waiting for this slot retries with the live one.
    forgotten: bool,
}

type Shard = Mutex<HashMap<Box<str>, Arc<Mutex<Slot>>>>;

/// An in-memory guard: per-resource marks in a sharded map, lost when the
/// process exits.
///
/// Use it where the protected state is itself in memory (or rebuilt, with
/// its marks, on start). Each resource has its own lock: [`MemoryGuard::write`]
/// holds it while the caller's closure runs, so writers of one resource are
/// serialized and writers of different resources are not. The closure must
/// not call back into the same guard for the same resource (deadlock).
pub struct MemoryGuard {
    hasher: RandomState,
    shards: Box<[Shard]>,
}

impl Default for MemoryGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGuard")
            .field("resources", &self.len())
            .finish()
    }
}

impl MemoryGuard {
    /// An empty guard.
    pub fn new() -> Self {
        MemoryGuard {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    #[inline]
    fn shard(&self, resource: &str) -> &Shard {
        // The shard index uses the hash's high bits; the map inside hashes
        // with its own seed.
        let hash = self.hasher.hash_one(resource);
        &self.shards[(hash >> 58) as usize % SHARDS]
    }

    /// The resource's slot, created empty if missing.
    fn slot(&self, resource: &str) -> Arc<Mutex<Slot>> {
        let mut map = self.shard(resource).lock();
        if let Some(slot) = map.get(resource) {
            return slot.clone();
        }
        let slot = Arc::new(Mutex::new(Slot {
            highest: None,
            forgotten: false,
        }));
        map.insert(resource.into(), slot.clone());
        slot
    }

    fn stale(resource: &str, stale: Stale) -> GuardError {
        GuardError::StaleToken {
            resource: resource.to_owned(),
            offered: stale.offered,
            highest: stale.highest,
        }
    }

    /// The fast path: checks `token` and records it, with no closure.
    ///
    /// No allocation for a resource already tracked; the shard lock is held
    /// only for the lookup. The caller's own write is *not* covered: use
    /// [`MemoryGuard::write`] when the write must be ordered with the check.
    #[inline]
    pub fn check_and_record(&self, resource: &str, token: u64) -> Result<Admitted, GuardError> {
        loop {
            let mut map = self.shard(resource).lock();
            let Some(entry) = map.get(resource) else {
                map.insert(
                    resource.into(),
                    Arc::new(Mutex::new(Slot {
                        highest: Some(token),
                        forgotten: false,
                    })),
                );
                return Ok(Admitted::First);
            };
            // Usual case: the slot is free, decide under both locks. A slot
            // still in its shard has not been forgotten.
            if let Some(mut slot) = entry.try_lock() {
                let admitted = check(slot.highest, token).map_err(|s| Self::stale(resource, s))?;
                slot.highest = Some(token);
                return Ok(admitted);
            }
            // A writer holds the slot (its closure is running): wait for it
            // without blocking the whole shard.
            let entry = entry.clone();
            drop(map);
            let mut slot = entry.lock();
            if slot.forgotten {
                continue;
            }
            let admitted = check(slot.highest, token).map_err(|s| Self::stale(resource, s))?;
            slot.highest = Some(token);
            return Ok(admitted);
        }
    }

    /// Checks `token` and, if it may write, runs `f` while holding the
    /// resource's lock, then records the token. Returns what `f` returned.
    ///
    /// If the token is stale, `f` does not run. If `f` fails, the mark does
    /// not move, so `f` should leave nothing behind when it fails.
    pub fn write<T, E, F>(&self, resource: &str, token: u64, f: F) -> Result<T, GuardError<E>>
    where
        F: FnOnce() -> Result<T, E>,
    {
        loop {
            let entry = self.slot(resource);
            let mut slot = entry.lock();
            if slot.forgotten {
                continue;
            }
            let admitted = check(slot.highest, token).map_err(|s| GuardError::StaleToken {
                resource: resource.to_owned(),
                offered: s.offered,
                highest: s.highest,
            })?;
            let value = f().map_err(GuardError::Aborted)?;
            if admitted.raises_mark() {
                slot.highest = Some(token);
            }
            return Ok(value);
        }
    }

    /// The highest token accepted for `resource`, if any.
    pub fn highest(&self, resource: &str) -> Option<u64> {
        let entry = self.shard(resource).lock().get(resource).cloned()?;
        let highest = entry.lock().highest;
        highest
    }

    /// Removes the mark of `resource` and returns it.
    ///
    /// **Dangerous**: afterwards the guard accepts *any* token for the
    /// resource again, including the stale tokens of superseded leases. Only
    /// forget a resource that no one will ever write again.
    pub fn forget(&self, resource: &str) -> Option<u64> {
        let entry = self.shard(resource).lock().remove(resource)?;
        let mut slot = entry.lock();
        slot.forgotten = true;
        slot.highest
    }

    /// How many resources the guard tracks.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// Whether the guard tracks no resource.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Barrier;
    use std::time::Duration;

    #[test]
    fn check_table() {
        let cases: &[(Option<u64>, u64, Result<Admitted, Stale>)] = &[
            (None, 0, Ok(Admitted::First)),
            (None, 7, Ok(Admitted::First)),
            (Some(7), 7, Ok(Admitted::Same)),
            (Some(7), 8, Ok(Admitted::Newer { previous: 7 })),
            (Some(0), u64::MAX, Ok(Admitted::Newer { previous: 0 })),
            (
                Some(7),
                6,
                Err(Stale {
                    offered: 6,
                    highest: 7,
                }),
            ),
            (
                Some(u64::MAX),
                0,
                Err(Stale {
                    offered: 0,
                    highest: u64::MAX,
                }),
            ),
        ];
        for &(highest, offered, expected) in cases {
            assert_eq!(check(highest, offered), expected, "{highest:?} / {offered}");
        }
    }

    /// A table `t(key, value, fence)` and the two statements of the module
    /// docs, evaluated with `check`: the SQL's `fence <= $token` is exactly
    /// "`check` accepts".
    #[derive(Default)]
    struct Table {
        rows: HashMap<&'static str, (&'static str, u64)>,
    }

    impl Table {
        /// `UPDATE t SET value = $v, fence = $token WHERE key = $k AND fence <= $token`
        fn update(&mut self, k: &'static str, v: &'static str, token: u64) -> usize {
            match self.rows.get_mut(k) {
                Some(row) if check(Some(row.1), token).is_ok() => {
                    *row = (v, token);
                    1
                }
                _ => 0,
            }
        }

        /// `INSERT .. ON CONFLICT (key) DO UPDATE .. WHERE t.fence <= excluded.fence`
        fn upsert(&mut self, k: &'static str, v: &'static str, token: u64) -> usize {
            let highest = self.rows.get(k).map(|row| row.1);
            match check(highest, token) {
                Ok(_) => {
                    self.rows.insert(k, (v, token));
                    1
                }
                Err(_) => 0,
            }
        }
    }

    #[test]
    fn sql_conditional_write_pattern() {
        let mut t = Table::default();
        // (statement, key, value, token, rows affected, row afterwards)
        type Step = (
            &'static str,
            &'static str,
            &'static str,
            u64,
            usize,
            Option<(&'static str, u64)>,
        );
        let steps: &[Step] = &[
            ("update", "k", "a", 5, 0, None), // no row yet: UPDATE matches nothing
            ("upsert", "k", "a", 5, 1, Some(("a", 5))),
            ("update", "k", "b", 5, 1, Some(("b", 5))), // same lease writes again
            ("update", "k", "c", 7, 1, Some(("c", 7))), // newer lease
            ("update", "k", "zombie", 6, 0, Some(("c", 7))), // stale: 0 rows
            ("upsert", "k", "zombie", 6, 0, Some(("c", 7))),
            ("upsert", "k", "d", 8, 1, Some(("d", 8))),
        ];
        for &(stmt, k, v, token, affected, after) in steps {
            let n = match stmt {
                "update" => t.update(k, v, token),
                _ => t.upsert(k, v, token),
            };
            assert_eq!(n, affected, "{stmt} {k}={v} @{token}");
            assert_eq!(t.rows.get(k).copied(), after, "{stmt} {k}={v} @{token}");
        }
    }

    fn assert_stale<E: std::fmt::Debug>(
        result: Result<impl std::fmt::Debug, GuardError<E>>,
        resource: &str,
        offered: u64,
        highest: u64,
    ) {
        match result {
            Err(GuardError::StaleToken {
                resource: r,
                offered: o,
                highest: h,
            }) => assert_eq!((r.as_str(), o, h), (resource, offered, highest)),
            other => panic!("expected StaleToken, got {other:?}"),
        }
    }

    #[test]
    fn memory_accepts_equal_and_higher_rejects_older() {
        let guard = MemoryGuard::new();
        assert_eq!(guard.check_and_record("r", 5).unwrap(), Admitted::First);
        assert_eq!(guard.check_and_record("r", 5).unwrap(), Admitted::Same);
        assert_eq!(
            guard.check_and_record("r", 9).unwrap(),
            Admitted::Newer { previous: 5 }
        );
        assert_stale(guard.check_and_record("r", 8), "r", 8, 9);
        assert_eq!(guard.highest("r"), Some(9));
        // Another resource has its own mark.
        assert_eq!(guard.check_and_record("other", 1).unwrap(), Admitted::First);

        let mut data = Vec::new();
        guard
            .write("r", 9, || {
                data.push(9);
                Ok::<_, Infallible>(())
            })
            .unwrap();
        let rejected = guard.write("r", 3, || {
            data.push(3);
            Ok::<_, Infallible>(())
        });
        assert_stale(rejected, "r", 3, 9);
        guard
            .write("r", 10, || {
                data.push(10);
                Ok::<_, Infallible>(())
            })
            .unwrap();
        assert_eq!(data, [9, 10], "a rejected closure never runs");
        assert_eq!(guard.highest("r"), Some(10));
        assert_eq!(guard.len(), 2);
    }

    #[test]
    fn memory_failed_closure_does_not_move_the_mark() {
        let guard = MemoryGuard::new();
        let err = guard
            .write("r", 4, || Err::<(), _>("disk full"))
            .unwrap_err();
        assert!(matches!(err, GuardError::Aborted("disk full")));
        assert_eq!(guard.highest("r"), None);
        guard.write("r", 2, || Ok::<_, Infallible>(())).unwrap();
        assert_eq!(guard.highest("r"), Some(2));
    }

    #[test]
    fn memory_forget_readmits_older_tokens() {
        let guard = MemoryGuard::new();
        guard.check_and_record("r", 9).unwrap();
        assert_eq!(guard.forget("r"), Some(9));
        assert_eq!(guard.forget("r"), None);
        assert!(guard.is_empty());
        assert_eq!(guard.check_and_record("r", 1).unwrap(), Admitted::First);
    }

    #[test]
    fn error_message_says_what_to_do() {
        let err: GuardError = GuardError::StaleToken {
            resource: "r".into(),
            offered: 33,
            highest: 34,
        };
        assert_eq!(
            err.to_string(),
            "stale fencing token for resource \"r\": offered 33, highest accepted 34; the lease \
             that issued this token was superseded: stop writing and re-acquire"
        );
    }

    /// Rounds of two writers racing on one resource, per pair of threads:
    /// in round `r` the older token is `2r+1` and the newer `2r+2`.
    /// `write(pair, token)` performs the guarded write and returns
    /// `Ok(token stored before it)` or `Err(())` if it was rejected as stale;
    /// `data(pair)` reads the token stored in the pair's data.
    fn race<W, D>(pairs: usize, rounds: u64, write: W, data: D)
    where
        W: Fn(usize, u64) -> Result<Option<u64>, ()> + Sync,
        D: Fn(usize) -> Option<u64> + Sync,
    {
        std::thread::scope(|s| {
            let mut handles = Vec::new();
            for pair in 0..pairs {
                let barrier = Arc::new(Barrier::new(2));
                for newer in [false, true] {
                    let (write, data, barrier) = (&write, &data, barrier.clone());
                    handles.push(s.spawn(move || {
                        let mut seen = Vec::new();
                        for round in 0..rounds {
                            let token = 2 * round + 1 + u64::from(newer);
                            barrier.wait();
                            seen.push(write(pair, token));
                            barrier.wait();
                            // Both wrote or were rejected: the newer write is what stays.
                            assert_eq!(data(pair), Some(2 * round + 2), "round {round}");
                            barrier.wait();
                        }
                        (pair, newer, seen)
                    }));
                }
            }
            let mut results = HashMap::new();
            for handle in handles {
                let (pair, newer, seen) = handle.join().unwrap();
                results.insert((pair, newer), seen);
            }
            for pair in 0..pairs {
                let (older, newer) = (&results[&(pair, false)], &results[&(pair, true)]);
                for round in 0..rounds {
                    let i = round as usize;
                    let last = round.checked_sub(1).map(|r| 2 * r + 2);
                    let newer_saw = newer[i].expect("the newer token is never rejected");
                    match older[i] {
                        // 33 was accepted: then it ran before 34, which saw its write.
                        Ok(older_saw) => {
                            assert_eq!(older_saw, last, "pair {pair} round {round}");
                            assert_eq!(newer_saw, Some(2 * round + 1), "pair {pair} round {round}");
                        }
                        // 33 was rejected: it changed nothing, 34 saw the last round.
                        Err(()) => assert_eq!(newer_saw, last, "pair {pair} round {round}"),
                    }
                }
            }
        });
    }

    #[test]
    fn memory_racing_writers_never_let_the_older_overwrite() {
        let guard = MemoryGuard::new();
        let store: Vec<Mutex<Option<u64>>> = (0..4).map(|_| Mutex::new(None)).collect();
        let runs = [AtomicUsize::new(0), AtomicUsize::new(0)];
        let accepted = AtomicUsize::new(0);
        race(
            4,
            300,
            |pair, token| {
                let resource = format!("r{pair}");
                match guard.write(&resource, token, || {
                    runs[(token % 2) as usize].fetch_add(1, Ordering::Relaxed);
                    let mut cell = store[pair].lock();
                    let previous = *cell;
                    *cell = Some(token);
                    Ok::<_, Infallible>(previous)
                }) {
                    Ok(previous) => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                        Ok(previous)
                    }
                    Err(GuardError::StaleToken { .. }) => Err(()),
                    Err(e) => panic!("{e}"),
                }
            },
            |pair| *store[pair].lock(),
        );
        // A closure ran exactly once per accepted write: rejected ones never ran.
        // Even tokens are the newer writers, accepted every round.
        let total_runs = runs[0].load(Ordering::Relaxed) + runs[1].load(Ordering::Relaxed);
        assert_eq!(total_runs, accepted.load(Ordering::Relaxed));
        assert_eq!(runs[0].load(Ordering::Relaxed), 4 * 300);
    }

    #[test]
    fn memory_fast_path_races_keep_the_highest() {
        let guard = MemoryGuard::new();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let guard = &guard;
                s.spawn(move || {
                    for i in 0..20_000u64 {
                        let token = i * 4 + t;
                        // Accepted or stale, never anything else.
                        match guard.check_and_record("hot", token) {
                            Ok(_) | Err(GuardError::StaleToken { .. }) => {}
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
        });
        assert_eq!(guard.highest("hot"), Some(19_999 * 4 + 3));
    }

    /// The abort type of closures that never abort.
    type NoAbort = ConflictableTransactionError<Infallible>;

    fn temp_db() -> (tempfile::TempDir, sled::Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        (dir, db)
    }

    fn encode(token: u64, value: &[u8]) -> Vec<u8> {
        let mut out = token.to_be_bytes().to_vec();
        out.extend_from_slice(value);
        out
    }

    fn token_of(value: &[u8]) -> u64 {
        u64::from_be_bytes(value[..8].try_into().unwrap())
    }

    #[test]
    fn sled_accepts_equal_and_higher_rejects_older() {
        let (_dir, db) = temp_db();
        let data = db.open_tree("data").unwrap();
        let guard = SledGuard::open(&db).unwrap();
        let put = |token: u64, value: &'static str| {
            guard.write("r", token, &data, |tx| -> TxResult {
                tx.insert("k", encode(token, value.as_bytes()))?;
                Ok(())
            })
        };
        put(5, "a").unwrap();
        put(5, "b").unwrap();
        put(9, "c").unwrap();
        assert_stale(put(8, "zombie"), "r", 8, 9);
        let stored = data.get("k").unwrap().unwrap();
        assert_eq!((token_of(&stored), &stored[8..]), (9, &b"c"[..]));
        assert_eq!(guard.highest("r").unwrap(), Some(9));
        assert_eq!(
            guard.check_and_record("r", 10).unwrap(),
            Admitted::Newer { previous: 9 }
        );
        assert_stale(guard.check_and_record("r", 9), "r", 9, 10);
    }

    #[test]
    fn sled_aborted_write_changes_nothing_and_many_trees_commit_together() {
        let (_dir, db) = temp_db();
        let a = db.open_tree("a").unwrap();
        let b = db.open_tree("b").unwrap();
        let guard = SledGuard::open(&db).unwrap();

        let err = guard
            .write_many("r", 3, &[&a, &b], |trees| {
                trees[0].insert("k", "a3")?;
                sled::transaction::abort::<(), _>("validation failed")
            })
            .unwrap_err();
        assert!(matches!(err, GuardError::Aborted("validation failed")));
        assert_eq!(guard.highest("r").unwrap(), None);
        assert_eq!(a.get("k").unwrap(), None);

        let n = guard
            .write_many("r", 3, &[&a, &b], |trees| {
                trees[0].insert("k", "a3")?;
                trees[1].insert("k", "b3")?;
                Ok::<_, NoAbort>(2)
            })
            .unwrap();
        assert_eq!(n, 2);
        assert_eq!(a.get("k").unwrap().as_deref(), Some(&b"a3"[..]));
        assert_eq!(b.get("k").unwrap().as_deref(), Some(&b"b3"[..]));
        assert_eq!(guard.highest("r").unwrap(), Some(3));
    }

    #[test]
    fn sled_racing_writers_never_let_the_older_overwrite() {
        let (_dir, db) = temp_db();
        let data = db.open_tree("data").unwrap();
        let guard = SledGuard::open(&db).unwrap();
        let runs = [AtomicUsize::new(0), AtomicUsize::new(0)];
        race(
            4,
            150,
            |pair, token| {
                let resource = format!("r{pair}");
                let key = format!("k{pair}");
                match guard.write(&resource, token, &data, |tx| {
                    let previous = tx.get(key.as_bytes())?.map(|v| token_of(&v));
                    tx.insert(key.as_bytes(), encode(token, b"v"))?;
                    Ok::<_, NoAbort>(previous)
                }) {
                    Ok(previous) => {
                        runs[(token % 2) as usize].fetch_add(1, Ordering::Relaxed);
                        Ok(previous)
                    }
                    Err(GuardError::StaleToken { .. }) => Err(()),
                    Err(e) => panic!("{e}"),
                }
            },
            |pair| data.get(format!("k{pair}")).unwrap().map(|v| token_of(&v)),
        );
        assert_eq!(runs[0].load(Ordering::Relaxed), 4 * 150);
        for pair in 0..4 {
            assert_eq!(guard.highest(&format!("r{pair}")).unwrap(), Some(300));
        }
    }

    #[test]
    fn sled_marks_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            let data = db.open_tree("data").unwrap();
            let guard = SledGuard::open(&db).unwrap();
            guard
                .write_durable("r", 7, &data, |tx| {
                    tx.insert("k", encode(7, b"seven"))?;
                    Ok::<_, NoAbort>(())
                })
                .unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let data = db.open_tree("data").unwrap();
        let guard = SledGuard::open(&db).unwrap();
        assert_eq!(guard.highest("r").unwrap(), Some(7));
        let result = guard.write("r", 6, &data, |tx| {
            tx.insert("k", encode(6, b"six"))?;
            Ok::<_, NoAbort>(())
        });
        assert_stale(result, "r", 6, 7);
        assert_eq!(token_of(&data.get("k").unwrap().unwrap()), 7);
    }

    #[test]
    fn sled_corrupt_mark_is_reported() {
        let (_dir, db) = temp_db();
        let data = db.open_tree("data").unwrap();
        let guard = SledGuard::open(&db).unwrap();
        db.open_tree(DEFAULT_TREE)
            .unwrap()
            .insert("r", "xyz")
            .unwrap();
        let err = guard
            .write("r", 1, &data, |_| Ok::<_, NoAbort>(()))
            .unwrap_err();
        assert!(matches!(err, GuardError::Corrupt { len: 3, .. }), "{err:?}");
        assert!(matches!(
            guard.highest("r"),
            Err(GuardError::Corrupt { .. })
        ));
    }

    #[test]
    fn sled_forget_readmits_older_tokens() {
        let (_dir, db) = temp_db();
        let guard = SledGuard::open(&db).unwrap();
        guard.check_and_record("r", 9).unwrap();
        assert_eq!(guard.forget("r").unwrap(), Some(9));
        assert_eq!(guard.check_and_record("r", 1).unwrap(), Admitted::First);
    }

    #[test]
    fn many_concurrent_flushes_complete() {
        let (_dir, db) = temp_db();
        let data = db.open_tree("data").unwrap();
        let guard = SledGuard::open(&db).unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::scope(|s| {
            for t in 0..16u64 {
                let (guard, data, done_tx) = (&guard, &data, done_tx.clone());
                s.spawn(move || {
                    for i in 0..5 {
                        guard
                            .write_durable(&format!("r{t}"), i, data, |tx| {
                                tx.insert(format!("k{t}").as_bytes(), &i.to_be_bytes()[..])?;
                                Ok::<_, NoAbort>(())
                            })
                            .unwrap();
                    }
                    done_tx.send(()).unwrap();
                });
            }
            for _ in 0..16 {
                done_rx
                    .recv_timeout(Duration::from_secs(10))
                    .expect("a flush hung");
            }
        });
    }

    #[tokio::test]
    async fn async_flush_waits_are_shared() {
        let (_dir, db) = temp_db();
        let guard = SledGuard::open(&db).unwrap();
        let waits = (0..32).map(|_| guard.wait_flushed());
        let all = futures_util::future::join_all(waits);
        let results = tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .expect("flushes hung");
        assert!(results.iter().all(Result::is_ok));
    }

    #[test]
    fn sled_refuses_to_write_the_guard_tree() {
        let (_dir, db) = temp_db();
        let guard = SledGuard::open(&db).unwrap();
        let own = db.open_tree(DEFAULT_TREE).unwrap();
        let err = guard
            .write("r", 1, &own, |_| -> TxResult { Ok(()) })
            .unwrap_err();
        assert!(
            matches!(err, GuardError::Storage(sled::Error::Unsupported(_))),
            "{err:?}"
        );
        assert_eq!(guard.highest("r").unwrap(), None);
    }

    /// Fast-path throughput on one thread over 1,000 resources. Run alone,
    /// with optimizations for a meaningful figure:
    /// `cargo test --release --lib guard::tests::fast_path_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "timing; run alone"]
    fn fast_path_throughput() {
        let names: Vec<String> = (0..1000).map(|i| format!("res-{i:08}")).collect();
        let guard = MemoryGuard::new();
        let rounds = 2_000u64;
        let start = std::time::Instant::now();
        for token in 0..rounds {
            for name in &names {
                guard.check_and_record(name, token).unwrap();
            }
        }
        let elapsed = start.elapsed();
        let checks = rounds as f64 * names.len() as f64;
        println!("{:.1} M checks/s", checks / elapsed.as_secs_f64() / 1e6);
    }

    /// Resident memory per tracked resource. Run alone:
    /// `cargo test --lib guard::tests::memory_per_resource -- --ignored --nocapture`.
    #[test]
    #[ignore = "measures RSS; run alone"]
    fn memory_per_resource() {
        fn rss_bytes() -> usize {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        }
        const N: usize = 1_000_000;
        let names: Vec<String> = (0..N).map(|i| format!("res-{i:08}")).collect();
        let guard = MemoryGuard::new();
        let before = rss_bytes();
        for name in &names {
            guard.check_and_record(name, 1).unwrap();
        }
        let after = rss_bytes();
        println!(
            "{} bytes per resource ({}-byte names)",
            (after - before) / N,
            names[0].len()
        );
        assert_eq!(guard.len(), N);
    }
}
