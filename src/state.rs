//! The lease state machine: pure, deterministic, no I/O.
//!
//! [`LeaseTable`] holds every live lease, the queues of waiters, the
//! idempotency keys and the token counter. Each method is one command: it
//! takes the current time as an argument ([`Now`]), changes the table, and
//! appends what happened to an [`Effects`] buffer: the [`Change`]s the store
//! must persist (and watchers may see) and the waiters that were granted a
//! lease. It never reads a clock, never touches a disk or a socket, and never
//! draws random numbers (lease ids arrive inside the commands), so the same
//! commands at the same times always give the same table. Tests drive it with
//! a fake clock; a replicated log could drive it later.
//!
//! # Invariants (enforced here)
//! - At most one live lease per resource (`held` maps a resource to one id).
//! - Tokens strictly increase over all grants: every grant takes
//!   `last_token + 1`, and [`LeaseTable::restore`] starts above the highest
//!   token the store has seen.
//! - A queued waiter exists only while its resource is held: when a lease
//!   ends, the first waiter in line is granted in the same command.
//! - An idempotency key names at most one grant, ever.
//!
//! # Time
//! `Now::mono` is a monotonic duration since the coordinator started; it
//! decides expiry. `Now::unix_ms` is wall-clock time, used only for what
//! operators read (acquired-at, history) and for keeping idempotency keys
//! across restarts. Expiry is lazy as well as timed: every command first
//! expires what is due, so a lease is seen free the instant its TTL runs out,
//! whether or not the expiry timer has fired yet.
//!
//! # Expiry queue
//! `deadlines` is a min-heap with at most one entry per live lease. A renewal
//! that pushes the deadline later does not touch the heap; when the old entry
//! comes due, [`LeaseTable::expire_due`] sees the lease's later deadline and
//! re-queues it. So renewals are O(1) and an expiry tick costs work
//! proportional to the entries that are due, not to the leases held.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use crate::lease::{EndKind, FencingToken, Holder, LeaseId, RequestId, Resource};

/// The current time, as the coordinator read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time since the coordinator started: decides expiry.
    pub mono: Duration,
    /// Wall-clock milliseconds since the Unix epoch: only for display and
    /// for idempotency-key retention across restarts.
    pub unix_ms: u64,
}

/// Identifies a queued Acquire; issued by the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WaiterId(pub u64);

/// The table's own limits (the edge validates TTLs and waits).
#[derive(Debug, Clone, Copy)]
pub struct TableLimits {
    /// How long an idempotency key is kept at least.
    pub request_retention: Duration,
    /// Most live leases at once.
    pub max_leases: usize,
    /// Most waiters queued on one resource.
    pub max_waiters_per_resource: usize,
    /// Most waiters queued in all.
    pub max_waiters: usize,
}

impl Default for TableLimits {
    fn default() -> Self {
        TableLimits {
            request_retention: Duration::from_secs(24 * 3600),
            max_leases: 10_000_000,
            max_waiters_per_resource: 10_000,
            max_waiters: 100_000,
        }
    }
}

/// What the store keeps of a lease: enough to restore it after a restart.
/// The expiry time is deliberately not here: a restored lease gets its full
/// TTL again, counted from the restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// The leased resource.
    pub resource: Resource,
    /// The holder's secret id.
    pub lease_id: LeaseId,
    /// The fencing token of this grant.
    pub token: FencingToken,
    /// Who holds it.
    pub holder: Holder,
    /// Its TTL.
    pub ttl: Duration,
    /// Wall-clock time of the grant.
    pub acquired_unix_ms: u64,
    /// The idempotency key that asked for it, if any.
    pub request_id: Option<RequestId>,
}

/// What the store keeps of an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// The parameters of the Acquire that used the key: a retry must match.
    pub resource: Resource,
    /// See `resource`.
    pub holder: Holder,
    /// See `resource`.
    pub ttl: Duration,
    /// The lease the key was granted.
    pub lease_id: LeaseId,
    /// Its token.
    pub token: FencingToken,
    /// When the key was recorded (wall clock), for retention.
    pub recorded_unix_ms: u64,
}

/// A live lease as the table holds it.
#[derive(Debug, Clone)]
struct Live {
    record: LeaseRecord,
    expires_at: Duration,
    /// The deadline of this lease's entry in the expiry heap.
    queued_at: Duration,
    renewals: u64,
}

/// A snapshot of a live lease, for replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// The persisted part.
    pub record: LeaseRecord,
    /// Time left when the snapshot was taken.
    pub expires_in: Duration,
    /// Renewals since the grant (or since the restart that restored it).
    pub renewals: u64,
    /// Waiters in line behind it.
    pub waiters: u32,
}

/// An Acquire command. The lease id is drawn by the caller, so the table
/// stays deterministic.
#[derive(Debug, Clone)]
pub struct AcquireCmd {
    /// What to lease.
    pub resource: Resource,
    /// Who asks.
    pub holder: Holder,
    /// Validated TTL.
    pub ttl: Duration,
    /// Idempotency key, if any.
    pub request_id: Option<RequestId>,
    /// Whether to queue when held (the wait's length is the caller's timer).
    pub wait: bool,
    /// The id the lease will have if granted.
    pub lease_id: LeaseId,
}

/// What an Acquire did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// A new grant; it is durable once its effects are.
    Granted(LeaseView),
    /// A retry of a key whose lease still lives: the same lease again.
    Existing(LeaseView),
    /// Someone else holds it and the caller does not wait.
    Held {
        /// Who holds it.
        holder: Holder,
        /// Their token.
        token: FencingToken,
        /// Time left on their lease.
        expires_in: Duration,
    },
    /// Queued; the grant will arrive in [`Effects::granted`] of a later command.
    Queued(WaiterId),
}

/// One thing that happened to the table, in order. The store persists these;
/// watchers are told of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A lease was granted (to the caller or to a waiter).
    Granted(LeaseRecord),
    /// A lease was renewed. Persisted only when `ttl_changed`: restarts give
    /// every lease a full TTL anyway.
    Renewed {
        /// The lease after renewal.
        record: LeaseRecord,
        /// Whether the TTL differs from the one persisted.
        ttl_changed: bool,
    },
    /// A lease ended.
    Ended {
        /// The lease that ended.
        record: LeaseRecord,
        /// How.
        how: EndKind,
        /// Wall-clock time it ended.
        at_unix_ms: u64,
    },
    /// Idempotency keys past their retention were dropped.
    RequestsCollected(Vec<RequestId>),
}

impl Change {
    /// Whether the store has to write something for this change.
    pub fn needs_write(&self) -> bool {
        !matches!(
            self,
            Change::Renewed {
                ttl_changed: false,
                ..
            }
        )
    }
}

/// The output of commands: appended to, never cleared by the table.
#[derive(Debug, Default)]
pub struct Effects {
    /// Changes, in the order they happened.
    pub changes: Vec<Change>,
    /// Waiters granted a lease, with the lease.
    pub granted: Vec<(WaiterId, LeaseView)>,
    /// Waiters whose place a retry with the same request_id took.
    pub superseded: Vec<WaiterId>,
}

impl Effects {
    /// Whether any change must be written before replying.
    pub fn needs_write(&self) -> bool {
        self.changes.iter().any(Change::needs_write)
    }
}

/// Why a command was refused. A refused command changes nothing (beyond
/// expiring leases that were due anyway).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// No live lease has this id: it expired, was released or revoked, or never existed.
    #[error("lease {0} is not live (it expired, was released or was revoked); acquire the resource again")]
    NotFound(LeaseId),
    /// The lease exists but the token does not match it.
    #[error("lease {lease_id} does not carry token {offered}; use the token the grant returned")]
    WrongToken {
        /// The lease.
        lease_id: LeaseId,
        /// The token the caller sent.
        offered: FencingToken,
    },
    /// An idempotency key was reused with other parameters.
    #[error("request_id {0:?} was already used for a different acquire (resource, holder or ttl differ); use a fresh request_id per logical acquire")]
    RequestMismatch(String),
    /// An idempotency key's lease has ended; it will not be granted again.
    #[error("request_id {0:?} was already granted a lease that has since ended; use a fresh request_id to acquire again")]
    RequestEnded(String),
    /// A retry with the same key replaced this waiter.
    #[error("a retry with the same request_id took this waiter's place in line")]
    Superseded,
    /// A limit was reached.
    #[error("too many {what} (limit {limit}); retry later or raise the server's limit")]
    Exhausted {
        /// What ran out.
        what: &'static str,
        /// The configured limit.
        limit: usize,
    },
}

#[derive(Debug, Clone)]
struct Waiter {
    id: WaiterId,
    holder: Holder,
    ttl: Duration,
    request_id: Option<RequestId>,
    lease_id: LeaseId,
}

/// Counters since the table was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Leases granted.
    pub grants: u64,
    /// Successful renewals.
    pub renewals: u64,
    /// Leases released by their holder.
    pub releases: u64,
    /// Leases expired.
    pub expiries: u64,
    /// Leases revoked.
    pub revocations: u64,
    /// Retried Acquires answered with the lease their key already has.
    pub replays: u64,
}

/// The state machine. See the module docs.
#[derive(Debug)]
pub struct LeaseTable {
    limits: TableLimits,
    /// Boxed: the map's buckets stay small (a hash map of a million leases
    /// keeps about two million buckets), and each lease is one allocation.
    leases: HashMap<LeaseId, Box<Live>>,
    held: BTreeMap<Resource, LeaseId>,
    queues: HashMap<Resource, VecDeque<Waiter>>,
    waiting: HashMap<WaiterId, Resource>,
    waiting_requests: HashMap<RequestId, WaiterId>,
    waiter_count: usize,
    requests: HashMap<RequestId, RequestRecord>,
    /// Keys in the order they were recorded, with the time they may go.
    request_expiry: VecDeque<(Duration, RequestId)>,
    deadlines: BinaryHeap<Reverse<(Duration, LeaseId)>>,
    last_token: u64,
    next_waiter: u64,
    counters: Counters,
}

impl LeaseTable {
    /// An empty table whose first token will be `last_token + 1`.
    pub fn new(limits: TableLimits, last_token: u64) -> Self {
        LeaseTable {
            limits,
            leases: HashMap::new(),
            held: BTreeMap::new(),
            queues: HashMap::new(),
            waiting: HashMap::new(),
            waiting_requests: HashMap::new(),
            waiter_count: 0,
            requests: HashMap::new(),
            request_expiry: VecDeque::new(),
            deadlines: BinaryHeap::new(),
            last_token: 0,
            next_waiter: 0,
            counters: Counters::default(),
        }
        .with_last_token(last_token)
    }

    fn with_last_token(mut self, last_token: u64) -> Self {
        self.last_token = last_token;
        self
    }

    /// Rebuilds a table from what the store kept. Every lease gets its full
    /// TTL counted from `now`; keys keep what is left of their retention by
    /// the wall clock (never more than the full retention). Tokens continue
    /// above `last_token` and above every restored lease's token.
    pub fn restore(
        limits: TableLimits,
        last_token: u64,
        leases: impl IntoIterator<Item = LeaseRecord>,
        requests: impl IntoIterator<Item = (RequestId, RequestRecord)>,
        now: Now,
    ) -> Self {
        let mut table = LeaseTable::new(limits, last_token);
        for record in leases {
            table.last_token = table.last_token.max(record.token.0);
            if let Some(old) = table.held.get(&record.resource).copied() {
                // Two records for one resource cannot come from a healthy
                // store; keep the newer grant, which is the one that counts.
                let keep_old = table.leases[&old].record.token > record.token;
                if keep_old {
                    continue;
                }
                table.leases.remove(&old);
            }
            table.insert_live(record, now);
        }
        let mut requests: Vec<_> = requests.into_iter().collect();
        requests.sort_by_key(|(_, r)| r.recorded_unix_ms);
        let retention = limits.request_retention;
        for (id, record) in requests {
            table.last_token = table.last_token.max(record.token.0);
            let age = Duration::from_millis(now.unix_ms.saturating_sub(record.recorded_unix_ms));
            let left = retention.saturating_sub(age);
            table
                .request_expiry
                .push_back((now.mono + left, id.clone()));
            table.requests.insert(id, record);
        }
        // Keys were pushed in recording order; their expiries are therefore
        // sorted, which `collect_requests` relies on.
        table
    }

    /// The highest token granted so far.
    pub fn last_token(&self) -> FencingToken {
        FencingToken(self.last_token)
    }

    /// Counters since the table was created.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Number of live leases.
    pub fn live_leases(&self) -> usize {
        self.leases.len()
    }

    /// Number of queued waiters.
    pub fn waiters(&self) -> usize {
        self.waiter_count
    }

    /// The earliest time at which [`LeaseTable::expire_due`] may have work.
    pub fn next_deadline(&self) -> Option<Duration> {
        self.deadlines.peek().map(|Reverse((at, _))| *at)
    }

    /// Acquire: grant, replay an idempotent retry, report the holder, or queue.
    pub fn acquire(
        &mut self,
        cmd: AcquireCmd,
        now: Now,
        fx: &mut Effects,
    ) -> Result<Acquired, StateError> {
        self.expire_due(now, fx);
        if let Some(key) = &cmd.request_id {
            if let Some(rec) = self.requests.get(key) {
                if rec.resource != cmd.resource || rec.holder != cmd.holder || rec.ttl != cmd.ttl {
                    return Err(StateError::RequestMismatch(key.as_str().to_owned()));
                }
                return match self.leases.get(&rec.lease_id) {
                    Some(live) if live.record.token == rec.token => {
                        self.counters.replays += 1;
                        Ok(Acquired::Existing(self.view(live, now)))
                    }
                    _ => Err(StateError::RequestEnded(key.as_str().to_owned())),
                };
            }
        }
        // A key still waiting in line belongs to an earlier attempt of the
        // same logical acquire: it must match, and this attempt replaces it.
        let mut earlier_attempt = None;
        if let Some(key) = &cmd.request_id {
            if let Some(&old) = self.waiting_requests.get(key) {
                let same = self
                    .queues
                    .get(&cmd.resource)
                    .and_then(|q| q.iter().find(|w| w.id == old))
                    .is_some_and(|w| w.holder == cmd.holder && w.ttl == cmd.ttl);
                if !same {
                    return Err(StateError::RequestMismatch(key.as_str().to_owned()));
                }
                earlier_attempt = Some(old);
            }
        }
        let Some(current) = self.held.get(&cmd.resource).copied() else {
            if self.leases.len() >= self.limits.max_leases {
                return Err(StateError::Exhausted {
                    what: "live leases",
                    limit: self.limits.max_leases,
                });
            }
            let record = self.grant(
                cmd.resource,
                cmd.holder,
                cmd.ttl,
                cmd.request_id,
                cmd.lease_id,
                now,
                fx,
            );
            let view = self.view(&self.leases[&record], now);
            return Ok(Acquired::Granted(view));
        };
        if !cmd.wait {
            if let Some(old) = earlier_attempt {
                self.cancel_waiter(old);
                fx.superseded.push(old);
            }
            let live = &self.leases[&current];
            return Ok(Acquired::Held {
                holder: live.record.holder.clone(),
                token: live.record.token,
                expires_in: live.expires_at.saturating_sub(now.mono),
            });
        }
        self.enqueue(cmd, fx)
    }

    fn enqueue(&mut self, cmd: AcquireCmd, fx: &mut Effects) -> Result<Acquired, StateError> {
        let id = WaiterId(self.next_waiter);
        let waiter = Waiter {
            id,
            holder: cmd.holder,
            ttl: cmd.ttl,
            request_id: cmd.request_id.clone(),
            lease_id: cmd.lease_id,
        };
        // A retry of a queued Acquire takes over its place in line: the
        // first attempt's caller has given up (or will be told it was superseded).
        if let Some(key) = &cmd.request_id {
            if let Some(old) = self.waiting_requests.get(key).copied() {
                if let Some(slot) = self
                    .queues
                    .get_mut(&cmd.resource)
                    .and_then(|q| q.iter_mut().find(|w| w.id == old))
                {
                    *slot = waiter;
                    self.next_waiter += 1;
                    self.waiting.remove(&old);
                    fx.superseded.push(old);
                    self.waiting.insert(id, cmd.resource);
                    self.waiting_requests.insert(key.clone(), id);
                    return Ok(Acquired::Queued(id));
                }
            }
        }
        if self.waiter_count >= self.limits.max_waiters {
            return Err(StateError::Exhausted {
                what: "waiters",
                limit: self.limits.max_waiters,
            });
        }
        let queue = self.queues.entry(cmd.resource.clone()).or_default();
        if queue.len() >= self.limits.max_waiters_per_resource {
            return Err(StateError::Exhausted {
                what: "waiters on this resource",
                limit: self.limits.max_waiters_per_resource,
            });
        }
        queue.push_back(waiter);
        self.next_waiter += 1;
        self.waiter_count += 1;
        self.waiting.insert(id, cmd.resource);
        if let Some(key) = cmd.request_id {
            self.waiting_requests.insert(key, id);
        }
        Ok(Acquired::Queued(id))
    }

    /// Takes a waiter out of line (its wait ran out or its caller went away).
    /// Returns false when it is no longer queued: it was granted (the grant is
    /// in some command's effects) or superseded.
    pub fn cancel_waiter(&mut self, id: WaiterId) -> bool {
        let Some(resource) = self.waiting.remove(&id) else {
            return false;
        };
        if let Some(queue) = self.queues.get_mut(&resource) {
            if let Some(pos) = queue.iter().position(|w| w.id == id) {
                if let Some(w) = queue.remove(pos) {
                    if let Some(key) = w.request_id {
                        self.waiting_requests.remove(&key);
                    }
                }
                self.waiter_count -= 1;
            }
            if queue.is_empty() {
                self.queues.remove(&resource);
            }
        }
        true
    }

    /// Whether a waiter is still in line.
    pub fn is_waiting(&self, id: WaiterId) -> bool {
        self.waiting.contains_key(&id)
    }

    /// Renew: extends the lease to `now + ttl` (`None` keeps its TTL).
    pub fn renew(
        &mut self,
        lease_id: LeaseId,
        token: FencingToken,
        ttl: Option<Duration>,
        now: Now,
        fx: &mut Effects,
    ) -> Result<LeaseView, StateError> {
        self.expire_due(now, fx);
        let live = self
            .leases
            .get_mut(&lease_id)
            .ok_or(StateError::NotFound(lease_id))?;
        if live.record.token != token {
            return Err(StateError::WrongToken {
                lease_id,
                offered: token,
            });
        }
        let ttl_changed = ttl.is_some_and(|t| t != live.record.ttl);
        if let Some(ttl) = ttl {
            live.record.ttl = ttl;
        }
        live.expires_at = now.mono + live.record.ttl;
        live.renewals += 1;
        if live.expires_at < live.queued_at {
            // A shorter TTL: the heap entry would fire too late.
            live.queued_at = live.expires_at;
            self.deadlines.push(Reverse((live.expires_at, lease_id)));
        }
        self.counters.renewals += 1;
        fx.changes.push(Change::Renewed {
            record: live.record.clone(),
            ttl_changed,
        });
        let live = &self.leases[&lease_id];
        Ok(self.view(live, now))
    }

    /// Release: ends the lease and grants the resource to the next waiter.
    /// Returns false when the lease had already ended (releasing twice is harmless).
    pub fn release(
        &mut self,
        lease_id: LeaseId,
        token: FencingToken,
        now: Now,
        fx: &mut Effects,
    ) -> Result<bool, StateError> {
        self.expire_due(now, fx);
        let Some(live) = self.leases.get(&lease_id) else {
            return Ok(false);
        };
        if live.record.token != token {
            return Err(StateError::WrongToken {
                lease_id,
                offered: token,
            });
        }
        self.end(lease_id, EndKind::Released, now, fx);
        Ok(true)
    }

    /// Revoke (operators): ends the live lease on `resource`, if it is still
    /// the one named by `only` (when given). Returns the revoked lease.
    pub fn revoke(
        &mut self,
        resource: &Resource,
        only: Option<LeaseMatch>,
        now: Now,
        fx: &mut Effects,
    ) -> Option<LeaseView> {
        self.expire_due(now, fx);
        let id = *self.held.get(resource)?;
        let live = &self.leases[&id];
        let matches = match only {
            None => true,
            Some(LeaseMatch::Id(want)) => want == id,
            Some(LeaseMatch::Token(want)) => want == live.record.token,
        };
        if !matches {
            return None;
        }
        let view = self.view(live, now);
        self.end(id, EndKind::Revoked, now, fx);
        Some(view)
    }

    /// Ends a grant whose write failed: nobody ever saw it, so it is
    /// removed as if released (no waiter is owed it).
    pub fn abort(&mut self, lease_id: LeaseId, now: Now, fx: &mut Effects) {
        if self.leases.contains_key(&lease_id) {
            if let Some(key) = self.leases[&lease_id].record.request_id.clone() {
                self.requests.remove(&key);
            }
            self.end(lease_id, EndKind::Released, now, fx);
        }
    }

    /// Describes the live lease on `resource`, if any.
    pub fn describe(
        &mut self,
        resource: &Resource,
        now: Now,
        fx: &mut Effects,
    ) -> Option<LeaseView> {
        self.expire_due(now, fx);
        let id = self.held.get(resource)?;
        Some(self.view(&self.leases[id], now))
    }

    /// Live leases in resource order, starting after `after`, whose resource
    /// starts with `prefix`; at most `limit`.
    pub fn list(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
        now: Now,
        fx: &mut Effects,
    ) -> Vec<LeaseView> {
        use std::ops::Bound;
        self.expire_due(now, fx);
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        self.held
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|(r, _)| r.as_str().starts_with(prefix))
            .take(limit)
            .map(|(_, id)| self.view(&self.leases[id], now))
            .collect()
    }

    /// Expires every lease whose deadline has passed, handing each resource
    /// to its next waiter, and drops idempotency keys past retention.
    pub fn expire_due(&mut self, now: Now, fx: &mut Effects) {
        while let Some(Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now.mono {
                break;
            }
            self.deadlines.pop();
            let Some(live) = self.leases.get_mut(&id) else {
                continue; // ended already; a stale entry
            };
            if live.queued_at != at {
                continue; // superseded by an earlier entry for the same lease
            }
            if live.expires_at > at {
                // Renewed since this entry was queued: queue its real
                // deadline. If that has passed too, it comes round again in
                // this loop, so leases always end in deadline order.
                live.queued_at = live.expires_at;
                self.deadlines.push(Reverse((live.expires_at, id)));
                continue;
            }
            self.end(id, EndKind::Expired, now, fx);
        }
        self.collect_requests(now, fx);
    }

    fn collect_requests(&mut self, now: Now, fx: &mut Effects) {
        let mut gone = Vec::new();
        while let Some((at, _)) = self.request_expiry.front() {
            if *at > now.mono {
                break;
            }
            let Some((_, key)) = self.request_expiry.pop_front() else {
                break;
            };
            let Some(rec) = self.requests.get(&key) else {
                continue;
            };
            if self.leases.contains_key(&rec.lease_id) {
                // Still in use: keep it while its lease lives.
                self.request_expiry
                    .push_back((now.mono + self.limits.request_retention, key));
                continue;
            }
            self.requests.remove(&key);
            gone.push(key);
        }
        if !gone.is_empty() {
            fx.changes.push(Change::RequestsCollected(gone));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn grant(
        &mut self,
        resource: Resource,
        holder: Holder,
        ttl: Duration,
        request_id: Option<RequestId>,
        lease_id: LeaseId,
        now: Now,
        fx: &mut Effects,
    ) -> LeaseId {
        self.last_token += 1;
        let token = FencingToken(self.last_token);
        let record = LeaseRecord {
            resource,
            lease_id,
            token,
            holder,
            ttl,
            acquired_unix_ms: now.unix_ms,
            request_id,
        };
        if let Some(key) = &record.request_id {
            self.requests.insert(
                key.clone(),
                RequestRecord {
                    resource: record.resource.clone(),
                    holder: record.holder.clone(),
                    ttl,
                    lease_id,
                    token,
                    recorded_unix_ms: now.unix_ms,
                },
            );
            self.request_expiry
                .push_back((now.mono + self.limits.request_retention, key.clone()));
        }
        self.counters.grants += 1;
        fx.changes.push(Change::Granted(record.clone()));
        self.insert_live(record, now);
        lease_id
    }

    fn insert_live(&mut self, record: LeaseRecord, now: Now) {
        let id = record.lease_id;
        let expires_at = now.mono + record.ttl;
        self.held.insert(record.resource.clone(), id);
        self.deadlines.push(Reverse((expires_at, id)));
        self.leases.insert(
            id,
            Box::new(Live {
                record,
                expires_at,
                queued_at: expires_at,
                renewals: 0,
            }),
        );
    }

    fn end(&mut self, id: LeaseId, how: EndKind, now: Now, fx: &mut Effects) {
        let Some(live) = self.leases.remove(&id) else {
            return;
        };
        let resource = live.record.resource.clone();
        self.held.remove(&resource);
        match how {
            EndKind::Released => self.counters.releases += 1,
            EndKind::Expired => self.counters.expiries += 1,
            EndKind::Revoked => self.counters.revocations += 1,
        }
        fx.changes.push(Change::Ended {
            record: live.record,
            how,
            at_unix_ms: now.unix_ms,
        });
        self.hand_over(resource, now, fx);
    }

    /// Grants `resource`, just freed, to the first waiter in line.
    fn hand_over(&mut self, resource: Resource, now: Now, fx: &mut Effects) {
        let Some(queue) = self.queues.get_mut(&resource) else {
            return;
        };
        let Some(w) = queue.pop_front() else {
            return;
        };
        if queue.is_empty() {
            self.queues.remove(&resource);
        }
        self.waiter_count -= 1;
        self.waiting.remove(&w.id);
        if let Some(key) = &w.request_id {
            self.waiting_requests.remove(key);
        }
        let id = self.grant(resource, w.holder, w.ttl, w.request_id, w.lease_id, now, fx);
        let view = self.view(&self.leases[&id], now);
        fx.granted.push((w.id, view));
    }

    fn view(&self, live: &Live, now: Now) -> LeaseView {
        let waiters = self
            .queues
            .get(&live.record.resource)
            .map_or(0, |q| q.len() as u32);
        LeaseView {
            record: live.record.clone(),
            expires_in: live.expires_at.saturating_sub(now.mono),
            renewals: live.renewals,
            waiters,
        }
    }
}

/// Which lease a revoke is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseMatch {
    /// Only this lease id.
    Id(LeaseId),
    /// Only the lease with this token.
    Token(FencingToken),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake clock: tests move time by hand.
    struct Clock(Duration);

    impl Clock {
        fn now(&self) -> Now {
            Now {
                mono: self.0,
                unix_ms: 1_700_000_000_000 + self.0.as_millis() as u64,
            }
        }
        fn advance(&mut self, ms: u64) {
            self.0 += Duration::from_millis(ms);
        }
    }

    fn cmd(resource: &str, holder: &str, ttl_ms: u64, key: Option<&str>, wait: bool) -> AcquireCmd {
        AcquireCmd {
            resource: Resource::new(resource).unwrap(),
            holder: Holder::new(holder).unwrap(),
            ttl: Duration::from_millis(ttl_ms),
            request_id: key.map(|k| RequestId::new_optional(k).unwrap().unwrap()),
            wait,
            lease_id: LeaseId::random(),
        }
    }

    fn granted(a: Acquired) -> LeaseView {
        match a {
            Acquired::Granted(v) => v,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    fn setup() -> (LeaseTable, Clock, Effects) {
        (
            LeaseTable::new(TableLimits::default(), 0),
            Clock(Duration::from_secs(1)),
            Effects::default(),
        )
    }

    #[test]
    fn tokens_increase_and_resource_is_exclusive() {
        let (mut t, clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 1000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        let b = t
            .acquire(cmd("r", "b", 1000, None, false), clock.now(), &mut fx)
            .unwrap();
        assert!(
            matches!(b, Acquired::Held { ref holder, token, .. } if holder.as_str() == "a" && token == a.record.token)
        );
        let c = granted(
            t.acquire(cmd("s", "b", 1000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        assert_eq!(a.record.token, FencingToken(1));
        assert_eq!(c.record.token, FencingToken(2));
    }

    #[test]
    fn expiry_frees_at_once_without_a_timer() {
        let (mut t, mut clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 100, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        clock.advance(99);
        assert!(t
            .describe(&a.record.resource, clock.now(), &mut fx)
            .is_some());
        clock.advance(1);
        assert!(t
            .describe(&a.record.resource, clock.now(), &mut fx)
            .is_none());
        assert!(fx.changes.iter().any(|c| matches!(
            c,
            Change::Ended {
                how: EndKind::Expired,
                ..
            }
        )));
        let b = granted(
            t.acquire(cmd("r", "b", 100, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        assert!(b.record.token > a.record.token);
    }

    #[test]
    fn renewal_moves_expiry_and_keeps_token() {
        let (mut t, mut clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 100, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        let (id, tok) = (a.record.lease_id, a.record.token);
        for _ in 0..10 {
            clock.advance(60);
            let v = t.renew(id, tok, None, clock.now(), &mut fx).unwrap();
            assert_eq!(v.record.token, tok);
            assert_eq!(v.expires_in, Duration::from_millis(100));
        }
        // The heap holds one entry per lease, however often it is renewed.
        assert_eq!(t.deadlines.len(), 1);
        clock.advance(100);
        assert_eq!(
            t.renew(id, tok, None, clock.now(), &mut fx),
            Err(StateError::NotFound(id))
        );
    }

    #[test]
    fn shorter_ttl_on_renew_expires_earlier() {
        let (mut t, mut clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 10_000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        t.renew(
            a.record.lease_id,
            a.record.token,
            Some(Duration::from_millis(100)),
            clock.now(),
            &mut fx,
        )
        .unwrap();
        assert!(fx.changes.iter().any(|c| matches!(
            c,
            Change::Renewed {
                ttl_changed: true,
                ..
            }
        )));
        clock.advance(100);
        assert!(t
            .describe(&a.record.resource, clock.now(), &mut fx)
            .is_none());
    }

    #[test]
    fn renew_and_release_check_the_token() {
        let (mut t, clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 1000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        let id = a.record.lease_id;
        let wrong = FencingToken(99);
        assert!(matches!(
            t.renew(id, wrong, None, clock.now(), &mut fx),
            Err(StateError::WrongToken { .. })
        ));
        assert!(matches!(
            t.release(id, wrong, clock.now(), &mut fx),
            Err(StateError::WrongToken { .. })
        ));
        assert_eq!(
            t.release(id, a.record.token, clock.now(), &mut fx),
            Ok(true)
        );
        assert_eq!(
            t.release(id, a.record.token, clock.now(), &mut fx),
            Ok(false)
        );
        let unknown = LeaseId::random();
        assert_eq!(
            t.renew(unknown, a.record.token, None, clock.now(), &mut fx),
            Err(StateError::NotFound(unknown))
        );
    }

    #[test]
    fn waiters_are_served_first_come_first_served() {
        let (mut t, clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 1000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        let w1 = t
            .acquire(cmd("r", "w1", 1000, None, true), clock.now(), &mut fx)
            .unwrap();
        let w2 = t
            .acquire(cmd("r", "w2", 1000, None, true), clock.now(), &mut fx)
            .unwrap();
        let (Acquired::Queued(w1), Acquired::Queued(w2)) = (w1, w2) else {
            panic!("both should queue");
        };
        assert_eq!(t.waiters(), 2);
        let mut fx = Effects::default();
        t.release(a.record.lease_id, a.record.token, clock.now(), &mut fx)
            .unwrap();
        assert_eq!(fx.granted.len(), 1);
        assert_eq!(fx.granted[0].0, w1);
        let first = fx.granted[0].1.clone();
        assert_eq!(first.record.holder.as_str(), "w1");
        assert!(first.record.token > a.record.token);
        let mut fx = Effects::default();
        t.release(
            first.record.lease_id,
            first.record.token,
            clock.now(),
            &mut fx,
        )
        .unwrap();
        assert_eq!(fx.granted[0].0, w2);
        assert_eq!(t.waiters(), 0);
    }

    #[test]
    fn cancelled_waiter_is_never_granted() {
        let (mut t, mut clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 100, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        let Acquired::Queued(w) = t
            .acquire(cmd("r", "w", 100, None, true), clock.now(), &mut fx)
            .unwrap()
        else {
            panic!("should queue");
        };
        assert!(t.cancel_waiter(w));
        assert!(!t.cancel_waiter(w));
        clock.advance(100);
        let mut fx = Effects::default();
        t.expire_due(clock.now(), &mut fx);
        assert!(fx.granted.is_empty());
        assert!(t
            .describe(&a.record.resource, clock.now(), &mut fx)
            .is_none());
    }

    #[test]
    fn expiry_hands_over_to_waiter() {
        let (mut t, mut clock, mut fx) = setup();
        granted(
            t.acquire(cmd("r", "a", 100, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        let Acquired::Queued(w) = t
            .acquire(cmd("r", "w", 100, None, true), clock.now(), &mut fx)
            .unwrap()
        else {
            panic!("should queue");
        };
        assert_eq!(
            t.next_deadline(),
            Some(clock.now().mono + Duration::from_millis(100))
        );
        clock.advance(100);
        let mut fx = Effects::default();
        t.expire_due(clock.now(), &mut fx);
        assert_eq!(fx.granted.len(), 1);
        assert_eq!(fx.granted[0].0, w);
    }

    #[test]
    fn idempotent_retry_returns_the_same_lease() {
        let (mut t, mut clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 1000, Some("k"), false), clock.now(), &mut fx)
                .unwrap(),
        );
        let again = t
            .acquire(cmd("r", "a", 1000, Some("k"), false), clock.now(), &mut fx)
            .unwrap();
        let Acquired::Existing(b) = again else {
            panic!("expected replay, got {again:?}")
        };
        assert_eq!(
            (b.record.lease_id, b.record.token),
            (a.record.lease_id, a.record.token)
        );
        assert_eq!(t.last_token(), a.record.token);
        let other = t.acquire(cmd("r", "a", 2000, Some("k"), false), clock.now(), &mut fx);
        assert_eq!(other, Err(StateError::RequestMismatch("k".into())));
        t.release(a.record.lease_id, a.record.token, clock.now(), &mut fx)
            .unwrap();
        let late = t.acquire(cmd("r", "a", 1000, Some("k"), false), clock.now(), &mut fx);
        assert_eq!(late, Err(StateError::RequestEnded("k".into())));
        // Past retention the key is collected.
        clock.advance(24 * 3600 * 1000);
        let mut fx = Effects::default();
        t.expire_due(clock.now(), &mut fx);
        assert!(matches!(&fx.changes[..], [Change::RequestsCollected(k)] if k.len() == 1));
    }

    #[test]
    fn retry_of_a_waiter_keeps_its_place() {
        let (mut t, clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 1000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        let Acquired::Queued(first) = t
            .acquire(cmd("r", "w", 1000, Some("k"), true), clock.now(), &mut fx)
            .unwrap()
        else {
            panic!()
        };
        t.acquire(cmd("r", "x", 1000, None, true), clock.now(), &mut fx)
            .unwrap();
        let Acquired::Queued(retry) = t
            .acquire(cmd("r", "w", 1000, Some("k"), true), clock.now(), &mut fx)
            .unwrap()
        else {
            panic!()
        };
        assert_ne!(first, retry);
        assert!(!t.is_waiting(first));
        assert_eq!(t.waiters(), 2);
        let mut fx = Effects::default();
        t.release(a.record.lease_id, a.record.token, clock.now(), &mut fx)
            .unwrap();
        assert_eq!(fx.granted[0].0, retry);
    }

    #[test]
    fn a_key_waiting_in_line_cannot_be_granted_elsewhere() {
        // Found by the model test: the key of a queued waiter, reused on
        // another resource, used to be granted there too, and then again
        // when the waiter's turn came.
        let (mut t, clock, mut fx) = setup();
        granted(
            t.acquire(cmd("r", "a", 1000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        t.acquire(cmd("r", "w", 1000, Some("k"), true), clock.now(), &mut fx)
            .unwrap();
        let other = t.acquire(cmd("s", "w", 1000, Some("k"), false), clock.now(), &mut fx);
        assert_eq!(other, Err(StateError::RequestMismatch("k".into())));
        // The same attempt without waiting replaces the queued one.
        let again = t
            .acquire(cmd("r", "w", 1000, Some("k"), false), clock.now(), &mut fx)
            .unwrap();
        assert!(matches!(again, Acquired::Held { .. }));
        assert_eq!(t.waiters(), 0);
        assert_eq!(fx.superseded.len(), 1);
    }

    #[test]
    fn restore_gives_full_ttl_and_continues_tokens() {
        let (mut t, mut clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 1000, Some("k"), false), clock.now(), &mut fx)
                .unwrap(),
        );
        clock.advance(900);
        let records = vec![a.record.clone()];
        let req = t.requests.clone();
        let mut r = LeaseTable::restore(TableLimits::default(), 0, records, req, clock.now());
        let v = r
            .describe(&a.record.resource, clock.now(), &mut fx)
            .unwrap();
        assert_eq!(v.expires_in, Duration::from_millis(1000));
        assert_eq!(v.record.token, a.record.token);
        let again = r
            .acquire(cmd("r", "a", 1000, Some("k"), false), clock.now(), &mut fx)
            .unwrap();
        assert!(matches!(again, Acquired::Existing(_)));
        let b = granted(
            r.acquire(cmd("s", "b", 1000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        assert!(b.record.token > a.record.token);
    }

    #[test]
    fn revoke_ends_and_checks_match() {
        let (mut t, clock, mut fx) = setup();
        let a = granted(
            t.acquire(cmd("r", "a", 1000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        let r = a.record.resource.clone();
        assert!(t
            .revoke(
                &r,
                Some(LeaseMatch::Token(FencingToken(42))),
                clock.now(),
                &mut fx
            )
            .is_none());
        assert!(t
            .revoke(
                &r,
                Some(LeaseMatch::Id(a.record.lease_id)),
                clock.now(),
                &mut fx
            )
            .is_some());
        assert_eq!(
            t.renew(
                a.record.lease_id,
                a.record.token,
                None,
                clock.now(),
                &mut fx
            ),
            Err(StateError::NotFound(a.record.lease_id))
        );
        assert_eq!(t.counters().revocations, 1);
    }

    #[test]
    fn limits_refuse_without_changing_anything() {
        let limits = TableLimits {
            max_leases: 1,
            max_waiters_per_resource: 1,
            max_waiters: 1,
            ..TableLimits::default()
        };
        let mut t = LeaseTable::new(limits, 0);
        let clock = Clock(Duration::ZERO);
        let mut fx = Effects::default();
        granted(
            t.acquire(cmd("r", "a", 1000, None, false), clock.now(), &mut fx)
                .unwrap(),
        );
        assert!(matches!(
            t.acquire(cmd("s", "a", 1000, None, false), clock.now(), &mut fx),
            Err(StateError::Exhausted {
                what: "live leases",
                ..
            })
        ));
        t.acquire(cmd("r", "w", 1000, None, true), clock.now(), &mut fx)
            .unwrap();
        assert!(matches!(
            t.acquire(cmd("r", "x", 1000, None, true), clock.now(), &mut fx),
            Err(StateError::Exhausted { .. })
        ));
        assert_eq!(
            (t.live_leases(), t.waiters(), t.last_token()),
            (1, 1, FencingToken(1))
        );
    }

    #[test]
    fn list_pages_in_resource_order() {
        let (mut t, clock, mut fx) = setup();
        for r in ["b/2", "a/1", "b/1", "b/3", "c"] {
            granted(
                t.acquire(cmd(r, "h", 1000, None, false), clock.now(), &mut fx)
                    .unwrap(),
            );
        }
        let names = |v: Vec<LeaseView>| {
            v.into_iter()
                .map(|l| l.record.resource.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(t.list("b/", None, 2, clock.now(), &mut fx)),
            ["b/1", "b/2"]
        );
        assert_eq!(
            names(t.list("b/", Some("b/2"), 2, clock.now(), &mut fx)),
            ["b/3"]
        );
        assert_eq!(
            names(t.list("", Some("b/3"), 10, clock.now(), &mut fx)),
            ["c"]
        );
    }
}
