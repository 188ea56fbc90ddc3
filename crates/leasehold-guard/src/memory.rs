//! The guard whose marks live in memory.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::{check, Admitted, GuardError, Stale};

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
    counters: crate::metrics::GuardCounters,
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
            counters: crate::metrics::GuardCounters::new(),
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
        let result = self.check_and_record_uncounted(resource, token);
        self.counters.observe(&result);
        result
    }

    #[inline]
    fn check_and_record_uncounted(
        &self,
        resource: &str,
        token: u64,
    ) -> Result<Admitted, GuardError> {
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
        let result = self.write_uncounted(resource, token, f);
        self.counters.observe(&result);
        result
    }

    fn write_uncounted<T, E, F>(&self, resource: &str, token: u64, f: F) -> Result<T, GuardError<E>>
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
