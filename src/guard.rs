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
//! 34's. So every backend runs the caller's write *inside* the check, under
//! a per-resource lock:
//!
//! - [`MemoryGuard`] holds the resource's lock while the caller's closure
//!   runs ([`MemoryGuard::write`]), so check, write and update are one step
//!   for every other writer of that resource. Writers of other resources do
//!   not wait. [`MemoryGuard::check_and_record`] is the fast path without a
//!   closure, for callers whose write is already ordered some other way.
//! - [`SledGuard`] has two paths, and **every** method that reads a mark to
//!   write under it (fast or transactional, including
//!   [`check_and_record`](SledGuard::check_and_record) and
//!   [`forget`](SledGuard::forget)) holds the resource's lock from the check
//!   to the end of the write. The locks are process-wide (512 of them, a
//!   resource hashes to one), so two guards opened separately on one tree
//!   exclude each other too; sled's file lock keeps other processes out.
//!   - **The fast path** ([`SledGuard::insert`], [`SledGuard::insert_durable`],
//!     [`SledGuard::write_plain`]): under the lock, read the mark, check the
//!     token, insert the new mark **first**, then the caller's data, as plain
//!     sled inserts. No transaction, so writers of different resources run
//!     in parallel. `leasehold bench guard` on 2 cores: ≈ 190,000–250,000
//!     guarded writes/s without flush and ≈ 80,000–100,000/s group-flushed
//!     (64 writers), against ≈ 52,000 and ≈ 7,400/s for the transactional
//!     path, which sled runs one transaction at a time.
//!
//!     Why the order makes a crash safe: the mark's insert has returned
//!     before the data's begins, so it has the lower position (LSN) in sled's
//!     log, and sled 0.34 recovers a contiguous prefix of its log: every
//!     message carries a checksum, and recovery stops at the first torn or
//!     missing one. A crash between the two inserts therefore keeps the mark
//!     without the data, never the data without its mark. A mark without its
//!     data is harmless: it is the token of a writer that passed its check,
//!     so every older token would have been refused from then on anyway, and
//!     the writer's retry with the same token passes (`t == mark` is
//!     accepted). The same argument is why a failed
//!     [`write_plain`](SledGuard::write_plain) closure leaves the mark raised.
//!     `tests/it/guard_crash.rs` kills a writer with SIGKILL mid-stream and
//!     checks exactly this; with the two inserts swapped it fails.
//!   - **The transactional path** ([`SledGuard::write`],
//!     [`SledGuard::write_durable`], [`SledGuard::write_many`]): the mark
//!     check, the caller's write and the mark update in **one sled
//!     transaction** over the guard's tree and the caller's trees, still
//!     under the resource's lock. They commit together or not at all, and
//!     are recovered together after a crash. Use it when several writes
//!     (keys or trees) must survive a crash all together; the fast path's
//!     separate inserts can be cut between any two of them (or put them in
//!     one [`sled::Batch`] inside [`write_plain`](SledGuard::write_plain)).
//!
//! One resource protects everything written under it: the guard does not
//! know or care which keys the closure touches. Both paths check against the
//! same marks, so they can be mixed on one resource.
//!
//! # Durability ([`SledGuard`])
//!
//! The marks live in their own sled tree and survive restarts. Three levels,
//! the same for both paths:
//!
//! - [`insert`](SledGuard::insert) / [`write_plain`](SledGuard::write_plain)
//!   / [`write`](SledGuard::write) return once the write is in sled's memory.
//!   A `kill -9` right after may lose it (sled writes its buffers out every
//!   `flush_every_ms`, 500 ms by default).
//! - [`insert_durable`](SledGuard::insert_durable) /
//!   [`write_durable`](SledGuard::write_durable) (or any write followed by
//!   [`SledGuard::flush`] / [`SledGuard::wait_flushed`]) return once sled's
//!   `flush()` has handed the write to the kernel: it survives `kill -9` of
//!   the process. Concurrent callers share flushes through one
//!   [`GroupFlusher`] thread (one `flush()` per batch; never sled's
//!   `flush_async()`, which hangs with 7 or more concurrent callers).
//! - Nothing here survives **power loss or a kernel crash** for certain:
//!   sled 0.34's `flush()` does not `fsync`; sled's background thread does,
//!   every `flush_every_ms`.
//!
//! What a crash leaves behind, per path:
//!
//! | | `kill -9` | power loss, kernel crash |
//! |---|---|---|
//! | fast path | flushed writes all there; of the rest, a prefix in log order: mark and data, or the mark alone, never data without its mark | up to ~`flush_every_ms` of acknowledged writes lost, with their marks; the rest as for `kill -9` (see below) |
//! | transactional | flushed writes all there; each unflushed one whole or absent | up to ~`flush_every_ms` of acknowledged writes lost, each whole or absent (see below) |
//!
//! After power loss both paths rest on the same property of sled's
//! recovery: the transaction's all-or-nothing and the fast path's
//! mark-before-data both hold only if what sled recovers is a prefix of its
//! log. sled checks that with checksums in the part of the log it has not
//! yet declared stable, but it declares a buffer stable after
//! `sync_file_range`, which does not flush a volatile disk cache. A device
//! that loses or reorders such writes in a power cut can defeat both paths
//! equally; the fast path is not weaker there.
//!
//! Plainly, for both paths: losing acknowledged writes *and their marks*
//! together keeps the store consistent with itself, but it is **not** safe
//! for the lease protocol: the lost writes were acknowledged, and the mark
//! is back at an older token, so a zombie writer still holding that older
//! token would be admitted again. If that matters, the storage must `fsync`
//! before acknowledging (sled 0.34 cannot on demand), or clients must treat
//! a store restart after a machine crash as "re-check what you wrote".
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
//!   The resource locks are a fixed 32 KiB table shared by every guard in
//!   the process, whatever the number of resources: there is no per-resource
//!   memory outside sled, and the mark is read from sled under the lock (a
//!   cached read, well under a microsecond), so there is no second copy to
//!   keep coherent.
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
//! // Token 34 writes (fast path), and waits for a shared flush: accepted,
//! // the mark becomes 34, and both survive kill -9.
//! guard.insert_durable("orders", 34, &data, "order-1", "shipped")?;
//!
//! // A zombie with token 33 tries to write: rejected, nothing changes.
//! let err = guard.insert("orders", 33, &data, "order-1", "cancelled").unwrap_err();
//! assert!(matches!(err, GuardError::StaleToken { offered: 33, highest: 34, .. }));
//! assert_eq!(data.get("order-1")?.as_deref(), Some(&b"shipped"[..]));
//!
//! // Two trees that must commit together: the transactional path, which
//! // checks the same marks under the same lock.
//! let by_state = db.open_tree("orders-by-state")?;
//! guard.write_many("orders", 35, &[&data, &by_state], |trees| -> TxResult {
//!     trees[0].insert("order-1", "delivered")?;
//!     trees[1].insert("delivered/order-1", "")?;
//!     Ok(())
//! })?;
//! assert_eq!(guard.highest("orders")?, Some(35));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::AtomicU64;
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
        let flushes = Arc::new(AtomicU64::new(0));
        let counter = flushes.clone();
        let thread = std::thread::Builder::new()
            .name("leasehold-flush".into())
            .spawn(move || run_flusher(db, rx, &counter))?;
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

fn run_flusher(db: sled::Db, rx: mpsc::Receiver<Waiter>, flushes: &AtomicU64) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.push(first);
        // Everything queued before the flush starts is covered by it.
        batch.extend(rx.try_iter());
        flushes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

/// How many resource locks every [`SledGuard`] in the process shares.
const STRIPES: usize = 512;

/// One resource lock, alone on its cache line so that two threads taking
/// neighbouring locks do not slow each other down.
#[repr(align(64))]
struct Stripe(Mutex<()>);

/// The resource locks of every [`SledGuard`] in the process: a resource maps
/// to one of them by a hash of (mark tree, resource). Process-wide rather
/// than per guard, so that two guards opened separately on the same tree
/// still exclude each other; sled's file lock keeps other processes out of
/// the database altogether. 32 KiB, whatever the number of resources.
static LOCKS: [Stripe; STRIPES] = [const { Stripe(Mutex::new(())) }; STRIPES];

/// The seed of the lock hash: random per process, so that no one can choose
/// resource names that all land on one lock.
fn lock_hasher() -> &'static RandomState {
    static HASHER: std::sync::OnceLock<RandomState> = std::sync::OnceLock::new();
    HASHER.get_or_init(RandomState::new)
}

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
/// restarts. Two ways to write under it, both checked against the same marks
/// under the same per-resource lock, so they can be mixed freely:
///
/// | path | methods | cost (2 cores) | a crash keeps |
/// |---|---|---|---|
/// | fast: plain inserts | [`insert`](SledGuard::insert), [`insert_durable`](SledGuard::insert_durable), [`write_plain`](SledGuard::write_plain) | p50 ≈ 3–4 µs; writers of different resources in parallel | the mark without the data, or both, never the data without the mark |
/// | transactional | [`write`](SledGuard::write), [`write_durable`](SledGuard::write_durable), [`write_many`](SledGuard::write_many) | p50 ≈ 10 µs; one transaction at a time in the whole process | mark and data (over any number of trees) together or not at all |
///
/// Use the fast path unless several writes must survive a crash together;
/// see the [module docs](self#atomic-with-the-write) for the reasoning and
/// [Durability](self#durability-sledguard) for what `kill -9` and power loss
/// leave behind.
///
/// Cheap to clone (sled trees and the flusher are shared handles).
///
/// # The closures
///
/// [`SledGuard::write`] and [`SledGuard::write_many`] take the caller's
/// write as a closure over sled's transactional trees. sled may run a
/// transaction closure **more than once** (it retries on conflicts), so the
/// closure is `Fn` and must do nothing but read and write the trees it is
/// given: no I/O, no channel sends, no counters that must count once. Return
/// a value to learn what it did. Abort with
/// [`sled::transaction::abort`]`(e)`, which becomes [`GuardError::Aborted`].
/// All trees must belong to the guard's database, and none of them may be
/// the guard's own tree.
///
/// [`SledGuard::write_plain`] runs its closure exactly once, with plain sled
/// operations on any trees of the database except the guard's.
///
/// Every closure runs while the resource's lock is held, and the locks are
/// shared by all guards in the process (a resource hashes to one of 512).
/// So a closure must never start another guarded write or check, nor wait
/// for a thread that might: that can deadlock. sled 0.34 also runs
/// transactions one at a time per process (a global lock), so keep
/// transactional closures short.
#[derive(Clone, Debug)]
pub struct SledGuard {
    marks: sled::Tree,
    /// The mark tree's share of the lock hash, so that guards over different
    /// trees spread over the locks independently.
    tree_hash: u64,
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
            tree_hash: lock_hasher().hash_one(tree_name),
            flusher,
        })
    }

    /// The flusher this guard uses, to share with other users of the database.
    pub fn flusher(&self) -> &GroupFlusher {
        &self.flusher
    }

    /// Takes the lock of `resource`. Every path that reads a mark in order to
    /// write it, or writes under the resource, holds this lock throughout.
    fn lock(&self, resource: &str) -> parking_lot::MutexGuard<'static, ()> {
        let hash = lock_hasher().hash_one((self.tree_hash, resource));
        LOCKS[(hash >> 32) as usize % STRIPES].0.lock()
    }

    /// The stored mark of `resource`.
    fn mark<E>(&self, resource: &str) -> Result<Option<u64>, GuardError<E>> {
        let value = self.marks.get(resource.as_bytes())?;
        decode_mark(value.as_deref()).map_err(|len| GuardError::Corrupt {
            resource: resource.to_owned(),
            len,
        })
    }

    /// The highest token accepted for `resource`, if any.
    pub fn highest(&self, resource: &str) -> Result<Option<u64>, GuardError> {
        self.mark(resource)
    }

    fn refuse_own_tree<E>(&self, tree: &sled::Tree) -> Result<(), GuardError<E>> {
        if tree.name() == self.marks.name() {
            return Err(GuardError::Storage(sled::Error::Unsupported(
                "a guarded write cannot write the guard's own tree: pass only data trees".into(),
            )));
        }
        Ok(())
    }

    // -- The fast path ------------------------------------------------------

    /// The fast path's core: under the resource's lock, check `token`
    /// against the stored mark, store the new mark **first**, then run `f`.
    ///
    /// The order is what makes a crash safe without a transaction: the mark's
    /// insert has returned before `f`'s writes begin, so it comes earlier in
    /// sled's log, and sled recovers a prefix of its log. See the
    /// [module docs](self#atomic-with-the-write).
    fn fenced<T, E>(
        &self,
        resource: &str,
        token: u64,
        f: impl FnOnce() -> Result<T, GuardError<E>>,
    ) -> Result<(T, Admitted), GuardError<E>> {
        let _held = self.lock(resource);
        let admitted = check(self.mark(resource)?, token).map_err(|s| GuardError::StaleToken {
            resource: resource.to_owned(),
            offered: s.offered,
            highest: s.highest,
        })?;
        if admitted.raises_mark() {
            self.marks
                .insert(resource.as_bytes(), &token.to_be_bytes()[..])?;
        }
        Ok((f()?, admitted))
    }

    /// The fast path for one write: checks `token` and inserts `key` →
    /// `value` into `data` as a plain sled insert (no transaction). Returns
    /// the key's previous value, as [`sled::Tree::insert`] does.
    ///
    /// If the token is stale, nothing is written. Otherwise the mark is
    /// raised to `token` first and the value inserted second, both under the
    /// resource's lock, so no older token's write can land after this one.
    /// Returns once the write is in sled's memory; to survive `kill -9`,
    /// follow with [`SledGuard::flush`] / [`SledGuard::wait_flushed`] (shared
    /// by concurrent writers) or call [`SledGuard::insert_durable`].
    ///
    /// ```
    /// use leasehold::guard::{GuardError, SledGuard};
    ///
    /// let db = sled::Config::new().temporary(true).open()?;
    /// let data = db.open_tree("orders")?;
    /// let guard = SledGuard::open(&db)?;
    ///
    /// guard.insert("orders", 34, &data, "order-1", "shipped")?;
    /// let err = guard.insert("orders", 33, &data, "order-1", "cancelled").unwrap_err();
    /// assert!(matches!(err, GuardError::StaleToken { offered: 33, highest: 34, .. }));
    /// assert_eq!(data.get("order-1")?.as_deref(), Some(&b"shipped"[..]));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn insert<K, V>(
        &self,
        resource: &str,
        token: u64,
        data: &sled::Tree,
        key: K,
        value: V,
    ) -> Result<Option<sled::IVec>, GuardError>
    where
        K: AsRef<[u8]>,
        V: Into<sled::IVec>,
    {
        self.refuse_own_tree(data)?;
        self.fenced(resource, token, || Ok(data.insert(key, value)?))
            .map(|(previous, _)| previous)
    }

    /// [`SledGuard::insert`], then waits for a shared flush: when this
    /// returns, the write and its mark survive `kill -9` (not power loss).
    /// Blocking; from async code run [`SledGuard::insert`] on a blocking
    /// thread and then await [`SledGuard::wait_flushed`]. The flush happens
    /// after the resource's lock is released, so other writers of the
    /// resource do not wait for it.
    pub fn insert_durable<K, V>(
        &self,
        resource: &str,
        token: u64,
        data: &sled::Tree,
        key: K,
        value: V,
    ) -> Result<Option<sled::IVec>, GuardError>
    where
        K: AsRef<[u8]>,
        V: Into<sled::IVec>,
    {
        let previous = self.insert(resource, token, data, key, value)?;
        self.flusher.flush()?;
        Ok(previous)
    }

    /// The fast path for any plain sled writes: checks `token`, raises the
    /// mark, then runs `f` once, all under the resource's lock. Returns what
    /// `f` returned.
    ///
    /// `f` does plain sled operations (`insert`, `remove`,
    /// `compare_and_swap`, `apply_batch`, …) on trees of the guard's database,
    /// never on the guard's own tree. If the token is stale, `f` does not run
    /// and nothing changes. Unlike [`SledGuard::write`]:
    ///
    /// - `f`'s writes are separate sled operations: a crash can keep the
    ///   first of them and lose the rest. Put writes that must survive
    ///   together into one [`sled::Batch`] on one tree, or use
    ///   [`SledGuard::write_many`].
    /// - If `f` fails ([`GuardError::Aborted`]), the mark **stays raised** to
    ///   `token` and whatever `f` wrote before failing stays. Raising the
    ///   mark is harmless: `token` was newer than every accepted one, so the
    ///   guard refusing older tokens from now on is what the lease protocol
    ///   wants anyway. Lowering it again could leave `f`'s partial writes
    ///   without their mark.
    pub fn write_plain<T, E, F>(&self, resource: &str, token: u64, f: F) -> Result<T, GuardError<E>>
    where
        F: FnOnce() -> Result<T, E>,
    {
        self.fenced(resource, token, || f().map_err(GuardError::Aborted))
            .map(|(value, _)| value)
    }

    /// Checks `token` against the mark and records it, with no data write:
    /// for callers whose write happens elsewhere. Mind the window between
    /// this check and that write (see the [module docs](self)).
    pub fn check_and_record(&self, resource: &str, token: u64) -> Result<Admitted, GuardError> {
        self.fenced(resource, token, || Ok(()))
            .map(|((), admitted)| admitted)
    }

    // -- The transactional path ---------------------------------------------

    /// Checks `token` and writes through `f` into `data`, all in one
    /// transaction with the mark update. Returns what `f` returned.
    ///
    /// If the token is stale, `f` does not run and nothing changes. If `f`
    /// aborts, nothing changes either (the mark does not move). `f` may run
    /// more than once: see [the closures](SledGuard#the-closures). The write
    /// is committed, not yet flushed: see [`SledGuard::write_durable`].
    ///
    /// About 4× slower than [`SledGuard::insert`] and serialized with every
    /// other sled transaction in the process: use it when the write must
    /// commit atomically with itself (several keys, or with
    /// [`write_many`](SledGuard::write_many) several trees).
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
        for tree in data {
            self.refuse_own_tree(tree)?;
        }
        // The lock orders this write with the fast path's writers of the
        // resource, which do not take part in sled's transactions.
        let _held = self.lock(resource);
        self.transact(resource, token, data, f)
    }

    /// The guarded transaction: the mark's check, `f` over `data`, and the
    /// mark's update, all in one sled transaction. The caller holds the
    /// resource's lock.
    fn transact<T, E, F>(
        &self,
        resource: &str,
        token: u64,
        data: &[&sled::Tree],
        f: F,
    ) -> Result<T, GuardError<E>>
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
            Ok(value)
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

    // -- Flushing and forgetting ---------------------------------------------

    /// Blocks until everything written before this call is flushed
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
        let _held = self.lock(resource);
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

    /// Which API a racing writer uses.
    #[derive(Clone, Copy, Debug)]
    enum Route {
        Insert,
        InsertDurable,
        Plain,
        Transaction,
        TransactionDurable,
    }

    /// One guarded write of `token` under `resource` into `key` by `path`;
    /// returns the token stored before it, or `Err(())` if it was refused.
    fn sled_put(
        guard: &SledGuard,
        data: &sled::Tree,
        route: Route,
        resource: &str,
        key: &str,
        token: u64,
    ) -> Result<Option<u64>, ()> {
        fn outcome<E: std::fmt::Debug>(
            result: Result<Option<u64>, GuardError<E>>,
        ) -> Result<Option<u64>, ()> {
            match result {
                Ok(previous) => Ok(previous),
                Err(GuardError::StaleToken { .. }) => Err(()),
                Err(e) => panic!("{e:?}"),
            }
        }
        match route {
            Route::Insert => outcome(
                guard
                    .insert(resource, token, data, key, encode(token, b"v"))
                    .map(|old| old.map(|v| token_of(&v))),
            ),
            Route::InsertDurable => outcome(
                guard
                    .insert_durable(resource, token, data, key, encode(token, b"v"))
                    .map(|old| old.map(|v| token_of(&v))),
            ),
            Route::Plain => outcome(guard.write_plain(resource, token, || {
                data.insert(key, encode(token, b"v"))
                    .map(|old| old.map(|v| token_of(&v)))
            })),
            Route::Transaction => outcome(guard.write(resource, token, data, |tx| {
                let previous = tx.get(key)?.map(|v| token_of(&v));
                tx.insert(key, encode(token, b"v"))?;
                Ok::<_, NoAbort>(previous)
            })),
            Route::TransactionDurable => {
                outcome(guard.write_durable(resource, token, data, |tx| {
                    let previous = tx.get(key)?.map(|v| token_of(&v));
                    tx.insert(key, encode(token, b"v"))?;
                    Ok::<_, NoAbort>(previous)
                }))
            }
        }
    }

    #[test]
    fn sled_racing_writers_on_every_path_pair_never_let_the_older_overwrite() {
        use Route::*;
        // (older's path, newer's path): the fast paths against each other and
        // against the transactional path, in both roles.
        let pairs = [
            (Insert, Insert),
            (Plain, Insert),
            (Insert, Plain),
            (Plain, Plain),
            (Insert, Transaction),
            (Transaction, Insert),
            (Plain, Transaction),
            (Transaction, Plain),
            (InsertDurable, TransactionDurable),
            (TransactionDurable, InsertDurable),
        ];
        let (_dir, db) = temp_db();
        let data = db.open_tree("data").unwrap();
        let guard = SledGuard::open(&db).unwrap();
        race(
            pairs.len(),
            100,
            |pair, token| {
                let (older, newer) = pairs[pair];
                let route = if token % 2 == 1 { older } else { newer };
                sled_put(
                    &guard,
                    &data,
                    route,
                    &format!("r{pair}"),
                    &format!("k{pair}"),
                    token,
                )
            },
            |pair| data.get(format!("k{pair}")).unwrap().map(|v| token_of(&v)),
        );
        for pair in 0..pairs.len() {
            assert_eq!(guard.highest(&format!("r{pair}")).unwrap(), Some(200));
        }
    }

    #[test]
    fn sled_two_guards_on_one_tree_exclude_each_other() {
        // Opened separately (not cloned): the locks are per process, so the
        // two guards still serialize the writers of a resource.
        let (_dir, db) = temp_db();
        let data = db.open_tree("data").unwrap();
        let guards = [SledGuard::open(&db).unwrap(), SledGuard::open(&db).unwrap()];
        race(
            2,
            150,
            |pair, token| {
                let guard = &guards[(token % 2) as usize];
                sled_put(
                    guard,
                    &data,
                    Route::Insert,
                    &format!("r{pair}"),
                    &format!("k{pair}"),
                    token,
                )
            },
            |pair| data.get(format!("k{pair}")).unwrap().map(|v| token_of(&v)),
        );
    }

    #[test]
    fn sled_fast_path_data_never_goes_backwards_under_interleaved_tokens() {
        // Four threads take tokens from one counter and write one key under
        // one resource, so tokens arrive out of order. Every accepted write
        // must find an older (or equal) token in the data: the data never
        // goes backwards, whatever the interleaving. A refused write leaves
        // nothing: its closure never runs.
        let (_dir, db) = temp_db();
        let data = db.open_tree("data").unwrap();
        let guard = SledGuard::open(&db).unwrap();
        let counter = std::sync::atomic::AtomicU64::new(1);
        let (accepted, refused, runs) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let landed = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for t in 0..4 {
                let (guard, data, counter) = (&guard, &data, &counter);
                let (accepted, refused, runs, landed) = (&accepted, &refused, &runs, &landed);
                s.spawn(move || {
                    for _ in 0..2_000 {
                        let token = counter.fetch_add(1, Ordering::Relaxed);
                        let result = if t % 2 == 0 {
                            guard
                                .insert("hot", token, data, "k", encode(token, b"v"))
                                .map(|old| old.map(|v| token_of(&v)))
                        } else {
                            guard
                                .write_plain("hot", token, || {
                                    runs.fetch_add(1, Ordering::Relaxed);
                                    // Under the resource's lock: the order of this
                                    // list is the order in which writes land.
                                    landed.lock().push(token);
                                    data.insert("k", encode(token, b"v"))
                                        .map(|old| old.map(|v| token_of(&v)))
                                })
                                .map_err(|e| match e {
                                    GuardError::StaleToken {
                                        resource,
                                        offered,
                                        highest,
                                    } => GuardError::StaleToken {
                                        resource,
                                        offered,
                                        highest,
                                    },
                                    other => panic!("{other}"),
                                })
                        };
                        match result {
                            Ok(previous) => {
                                assert!(
                                    previous.is_none_or(|p| p <= token),
                                    "token {token} overwrote newer token {previous:?}"
                                );
                                accepted.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(GuardError::StaleToken {
                                offered, highest, ..
                            }) => {
                                assert!(offered < highest);
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
        });
        let landed = landed.into_inner();
        assert!(
            landed.windows(2).all(|w| w[0] < w[1]),
            "writes landed out of order"
        );
        assert_eq!(runs.load(Ordering::Relaxed), landed.len());
        assert_eq!(
            accepted.load(Ordering::Relaxed) + refused.load(Ordering::Relaxed),
            8_000
        );
        let last = token_of(&data.get("k").unwrap().unwrap());
        assert_eq!(guard.highest("hot").unwrap(), Some(last));
    }

    #[test]
    fn sled_fast_path_refused_writes_change_nothing() {
        let (_dir, db) = temp_db();
        let data = db.open_tree("data").unwrap();
        let guard = SledGuard::open(&db).unwrap();
        assert_eq!(
            guard.insert("r", 5, &data, "k", encode(5, b"a")).unwrap(),
            None
        );
        assert_eq!(
            guard.insert("r", 5, &data, "k2", encode(5, b"b")).unwrap(),
            None
        );
        guard.insert("r", 9, &data, "k", encode(9, b"c")).unwrap();
        assert_stale(
            guard.insert("r", 8, &data, "k", encode(8, b"zombie")),
            "r",
            8,
            9,
        );
        assert_stale(
            guard.insert("r", 8, &data, "new", encode(8, b"zombie")),
            "r",
            8,
            9,
        );
        let ran = std::cell::Cell::new(false);
        let plain = guard.write_plain("r", 3, || {
            ran.set(true);
            Ok::<_, Infallible>(())
        });
        assert_stale(plain, "r", 3, 9);
        assert!(!ran.get(), "a refused closure never runs");
        assert_eq!(token_of(&data.get("k").unwrap().unwrap()), 9);
        assert_eq!(data.get("new").unwrap(), None);
        assert_eq!(guard.highest("r").unwrap(), Some(9));
        // The transactional path sees the fast path's marks, and back.
        let tx = guard.write("r", 8, &data, |tx| -> TxResult {
            tx.insert("k", encode(8, b"zombie"))?;
            Ok(())
        });
        assert_stale(tx, "r", 8, 9);
        guard
            .write("r", 12, &data, |tx| -> TxResult {
                tx.insert("k", encode(12, b"d"))?;
                Ok(())
            })
            .unwrap();
        assert_stale(
            guard.insert("r", 10, &data, "k", encode(10, b"z")),
            "r",
            10,
            12,
        );
        assert_eq!(token_of(&data.get("k").unwrap().unwrap()), 12);
    }

    #[test]
    fn sled_plain_write_that_fails_keeps_the_raised_mark() {
        let (_dir, db) = temp_db();
        let guard = SledGuard::open(&db).unwrap();
        guard.check_and_record("r", 4).unwrap();
        let err = guard
            .write_plain("r", 6, || Err::<(), _>("disk full"))
            .unwrap_err();
        assert!(matches!(err, GuardError::Aborted("disk full")), "{err:?}");
        // Raised before the closure ran, and kept: 6 was a valid, newer token.
        assert_eq!(guard.highest("r").unwrap(), Some(6));
        assert_stale(guard.check_and_record("r", 5), "r", 5, 6);
        assert_eq!(guard.check_and_record("r", 6).unwrap(), Admitted::Same);
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
        for t in 0..16u64 {
            let value = data
                .get(format!("k{t}"))
                .unwrap()
                .expect("a durable write is missing");
            assert_eq!(&value[..], &4u64.to_be_bytes()[..]);
        }
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
        // All 32 were queued before the first flush could finish.
        let flushes = guard.flusher().flushes();
        assert!(
            (1..32).contains(&flushes),
            "{flushes} flushes for 32 waiters"
        );
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
        let err = guard.insert("r", 1, &own, "r", "x").unwrap_err();
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
