//! The guard whose marks live in sled, beside the data they protect.

use std::convert::Infallible;
use std::hash::{BuildHasher, RandomState};

use parking_lot::Mutex;
use sled::transaction::{
    ConflictableTransactionError, ConflictableTransactionResult, TransactionError, Transactional,
    TransactionalTree,
};

use crate::{check, Admitted, FlushError, GroupFlusher, GuardError, Stale};

/// The result type of a guarded write's closure ([`SledGuard::write`]).
///
/// With the defaults, a closure that never aborts: `|tx| -> TxResult { tx.insert(k, v)?; Ok(()) }`
/// (the annotation spares you naming the abort type). A closure that may abort
/// with its own error `E` returns `TxResult<T, E>` and aborts with
/// [`sled::transaction::abort`]`(e)`.
pub type TxResult<T = (), E = Infallible> = ConflictableTransactionResult<T, E>;

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
/// see the [module docs](crate#atomic-with-the-write) for the reasoning and
/// [Durability](crate#durability-sledguard) for what `kill -9` and power loss
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
    /// [module docs](crate#atomic-with-the-write).
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
    /// use leasehold_guard::{GuardError, SledGuard};
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
    /// this check and that write (see the [crate docs](crate)).
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
