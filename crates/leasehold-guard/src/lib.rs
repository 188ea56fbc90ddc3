//! Leasehold's storage side: rejects writes that carry a stale fencing token,
//! and records idempotency keys.
//!
//! A lease can end while its holder still believes it holds it (a long GC
//! pause, a partition, a stopped VM). The coordinator then grants the
//! resource to someone else with a larger fencing token. The only place that
//! can stop the old holder's late writes is the storage itself: it remembers,
//! per resource, the highest token it has accepted, and refuses anything
//! older. This crate is that memory, and the other tools a storage service
//! needs around it:
//!
//! | module | what | feature |
//! |---|---|---|
//! | [`check`], [`GuardError`] | the rule, as a pure function, and its errors | always |
//! | [`MemoryGuard`] | marks in memory | always |
//! | [`SledGuard`], [`GroupFlusher`] | marks in sled beside the data; one thread that makes sled's writes durable for everyone | `sled` (default) |
//! | [`idempotency`] | Stripe-style idempotency keys on sled | `sled` (default) |
//! | [`pg`]: [`PgGuard`], [`pg::PgIdempotencyStore`] | the fence and idempotency keys inside PostgreSQL transactions | `postgres` |
//! | [`fencing`] | reading the fence from gRPC metadata or HTTP headers (the `leasehold-fence` crate) | `grpc` for metadata |
//! | `fenced_kv` | a small fenced key-value gRPC service built from the above | `grpc` |
//! | `SignedWriteError`, `check_signed`, `write_signed`, `insert_signed` | writes whose token comes from a fence the coordinator signed, verified offline with its public keys | `signed` |
//! | [`metrics`] | counters (writes accepted, refused stale, refused malformed) through the `metrics` facade; names always, counting with the feature | `metrics` |
//!
//! With `default-features = false` the crate needs neither sled nor gRPC:
//! [`check`] and [`MemoryGuard`] are enough for storage you own in memory,
//! and [`check`]'s conditional-write form for a database you do not embed.
//!
//! # What the guard trusts
//!
//! Without keys, the guard trusts the client to present the token its lease
//! was given: the rule below stops a *superseded* holder, not a *lying*
//! one. A buggy or hostile client that sends token `u64::MAX` raises the
//! mark to the top, and from then on every honest writer of that resource
//! is refused; one that sends another resource's real token is believed.
//! With the `signed` feature and the coordinator's public keys, the guard
//! takes the token from the coordinator's signed fence instead and refuses
//! forged, altered, truncated and wrong-resource fences before the rule
//! runs (`MemoryGuard::check_signed`, `SledGuard::insert_signed`, …; the
//! format is in `leasehold_fence::signed`).
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
//!   [`SledGuard::flush`] / [`SledGuard::wait_flushed`]) return once the
//!   guard's [`GroupFlusher`] has flushed. Concurrent callers share flushes
//!   through its one thread (one flush per batch; never sled's
//!   `flush_async()`, which hangs with 7 or more concurrent callers). With a
//!   flusher from [`GroupFlusher::start_synced`] (give
//!   [`SledGuard::with_flusher`] one; the fenced KV service does) a flush is
//!   sled's `flush()` **and an `fdatasync` of sled's log**: an acknowledged
//!   write and its mark survive a power cut or kernel crash, as a granted
//!   token does on the coordinator. With [`GroupFlusher::start`] (what
//!   [`SledGuard::open`] uses, since a `sled::Db` does not know its
//!   directory) a flush survives `kill -9` of the process only: sled 0.34's
//!   `flush()` stops at `sync_file_range`, and sled's own thread `fsync`s
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
//! token would be admitted again. That is why a storage service should
//! acknowledge only after a synced flush ([`GroupFlusher::start_synced`]).
//!
//! # Memory
//!
//! - [`MemoryGuard`]: about **150 bytes per tracked resource** with short
//!   names, measured as resident memory over 1,000,000 resources with
//!   12-byte names (the ignored `memory_per_resource` test:
//!   `cargo test -p leasehold-guard --lib -- --ignored --nocapture memory_per_resource`).
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
//! For PostgreSQL, the `postgres` feature's `pg` module sends exactly these
//! statements (`pg::FencedRow`), and the per-resource form (`PgGuard`: the
//! fence row raised first in the caller's transaction), tested against a
//! real server.
//!
//! # Example
//!
#![cfg_attr(feature = "sled", doc = "```")]
#![cfg_attr(not(feature = "sled"), doc = "```ignore")]
//! use leasehold_guard::{GuardError, SledGuard, TxResult};
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

mod memory;
pub mod metrics;
mod rule;

#[cfg(feature = "sled")]
mod flusher;
#[cfg(any(feature = "sled", feature = "postgres"))]
pub mod idempotency;
#[cfg(feature = "postgres")]
pub mod pg;
#[cfg(feature = "sled")]
mod sled_guard;

#[cfg(feature = "grpc")]
pub mod fenced_kv;
#[cfg(feature = "signed")]
mod signed;

/// The fence on the wire: reading it from gRPC metadata (`grpc` feature) or
/// HTTP headers. The `leasehold-fence` crate, re-exported.
pub use leasehold_fence as fencing;

pub use memory::MemoryGuard;
pub use rule::{check, Admitted, GuardError, Stale};
#[cfg(feature = "signed")]
pub use signed::SignedWriteError;

#[cfg(feature = "sled")]
pub use flusher::{FlushError, GroupFlusher};
#[cfg(feature = "postgres")]
pub use pg::PgGuard;
#[cfg(feature = "sled")]
pub use sled_guard::{SledGuard, TxResult, DEFAULT_TREE};

#[cfg(all(feature = "grpc", feature = "sled"))]
/// Generated gRPC types for `leasehold.v1.FencedKv`.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    tonic::include_proto!("leasehold.v1");
}

#[cfg(all(test, feature = "sled"))]
mod tests;
