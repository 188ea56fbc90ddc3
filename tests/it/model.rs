//! Model-based tests of the pure state machine.
//!
//! proptest generates random sequences of commands — acquire (with and
//! without idempotency keys, with and without waiting), renew, release,
//! revoke, cancel a waiter, advance the clock, restart — and runs each
//! against [`LeaseTable`] and against a small reference model written for
//! clarity, not speed. After every step it checks that both agree on the
//! outcome and on every resource, and checks the invariants on the stream of
//! changes the table emits:
//!
//! - at most one live lease per resource, and no grant to a resource before
//!   its previous lease ended (released, revoked or expired);
//! - tokens strictly increase over grants;
//! - an idempotency key is granted at most once;
//! - a restart (rebuilding the table from exactly what the store would have
//!   persisted) loses no acknowledged lease and reuses no token.
//!
//! Commands print as plain Rust (`Acquire { resource: 1, holder: 0, .. }`),
//! so a shrunk counterexample reads as a script.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use leasehold::lease::{FencingToken, Holder, LeaseId, RequestId, Resource};
use leasehold::state::{
    AcquireCmd, Acquired, Change, Effects, LeaseRecord, LeaseTable, LeaseView, Now, RequestRecord,
    StateError, TableLimits, WaiterId,
};
use proptest::prelude::*;

const RESOURCES: u8 = 3;
const TTLS_MS: [u64; 3] = [100, 300, 1000];

#[derive(Debug, Clone)]
enum Op {
    Acquire {
        resource: u8,
        holder: u8,
        ttl: usize,
        key: Option<u8>,
        wait: bool,
    },
    /// Renews the `lease`-th lease ever granted (modulo the count).
    Renew {
        lease: u8,
        ttl: Option<usize>,
        wrong_token: bool,
    },
    Release {
        lease: u8,
        wrong_token: bool,
    },
    Revoke {
        resource: u8,
    },
    /// Cancels the `waiter`-th waiter ever queued (modulo the count).
    Cancel {
        waiter: u8,
    },
    Advance {
        ms: u16,
    },
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..RESOURCES, 0..3u8, 0..TTLS_MS.len(), prop::option::of(0..4u8), any::<bool>())
            .prop_map(|(resource, holder, ttl, key, wait)| Op::Acquire { resource, holder, ttl, key, wait }),
        3 => (any::<u8>(), prop::option::of(0..TTLS_MS.len()), prop::bool::weighted(0.1))
            .prop_map(|(lease, ttl, wrong_token)| Op::Renew { lease, ttl, wrong_token }),
        3 => (any::<u8>(), prop::bool::weighted(0.1)).prop_map(|(lease, wrong_token)| Op::Release { lease, wrong_token }),
        1 => (0..RESOURCES).prop_map(|resource| Op::Revoke { resource }),
        1 => any::<u8>().prop_map(|waiter| Op::Cancel { waiter }),
        4 => (0..1200u16).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Restart),
    ]
}

fn resource(r: u8) -> Resource {
    Resource::new(format!("r{r}")).expect("valid")
}

fn holder(h: u8) -> Holder {
    Holder::new(format!("h{h}")).expect("valid")
}

fn key(k: u8) -> RequestId {
    RequestId::new_optional(format!("k{k}"))
        .expect("valid")
        .expect("non-empty")
}

/// Lease ids come from a counter so runs are reproducible.
fn lease_id(n: u64) -> LeaseId {
    let mut b = [0u8; 16];
    b[8..].copy_from_slice(&n.to_be_bytes());
    LeaseId(b)
}

// ---------------------------------------------------------------- the model

#[derive(Debug, Clone)]
struct MLease {
    id: LeaseId,
    token: u64,
    holder: u8,
    ttl: Duration,
    expires: Duration,
}

#[derive(Debug, Clone)]
struct MWaiter {
    wid: WaiterId,
    holder: u8,
    ttl: Duration,
    key: Option<u8>,
    id: LeaseId,
}

#[derive(Debug, Clone, PartialEq)]
enum MOutcome {
    Granted {
        token: u64,
    },
    Existing {
        token: u64,
    },
    Held {
        holder: u8,
        token: u64,
        expires_in: Duration,
    },
    Queued(WaiterId),
    Err(StateError),
}

/// The reference model: plain maps, linear scans, no cleverness.
#[derive(Debug, Default)]
struct Model {
    leases: BTreeMap<u8, MLease>,
    queues: HashMap<u8, VecDeque<MWaiter>>,
    /// key → (resource, holder, ttl, lease id, token)
    keys: HashMap<u8, (u8, u8, Duration, LeaseId, u64)>,
    last_token: u64,
    next_waiter: u64,
    /// Grants to waiters in the last step: (waiter, token).
    handed: Vec<(WaiterId, u64)>,
    superseded: Vec<WaiterId>,
}

impl Model {
    fn grant(
        &mut self,
        r: u8,
        h: u8,
        ttl: Duration,
        k: Option<u8>,
        id: LeaseId,
        now: Duration,
    ) -> u64 {
        self.last_token += 1;
        let token = self.last_token;
        if let Some(k) = k {
            self.keys.insert(k, (r, h, ttl, id, token));
        }
        self.leases.insert(
            r,
            MLease {
                id,
                token,
                holder: h,
                ttl,
                expires: now + ttl,
            },
        );
        token
    }

    fn end(&mut self, r: u8, now: Duration) {
        self.leases.remove(&r);
        let Some(q) = self.queues.get_mut(&r) else {
            return;
        };
        if let Some(w) = q.pop_front() {
            if q.is_empty() {
                self.queues.remove(&r);
            }
            let token = self.grant(r, w.holder, w.ttl, w.key, w.id, now);
            self.handed.push((w.wid, token));
        }
    }

    fn expire(&mut self, now: Duration) {
        let mut due: Vec<(Duration, LeaseId, u8)> = self
            .leases
            .iter()
            .filter(|(_, l)| l.expires <= now)
            .map(|(r, l)| (l.expires, l.id, *r))
            .collect();
        due.sort();
        for (_, _, r) in due {
            self.end(r, now);
        }
    }

    fn find(&self, id: LeaseId) -> Option<u8> {
        self.leases
            .iter()
            .find(|(_, l)| l.id == id)
            .map(|(r, _)| *r)
    }

    #[allow(clippy::too_many_arguments)]
    fn acquire(
        &mut self,
        r: u8,
        h: u8,
        ttl: Duration,
        k: Option<u8>,
        wait: bool,
        id: LeaseId,
        now: Duration,
    ) -> MOutcome {
        self.expire(now);
        if let Some(k) = k {
            if let Some(&(kr, kh, kttl, kid, ktoken)) = self.keys.get(&k) {
                if (kr, kh, kttl) != (r, h, ttl) {
                    return MOutcome::Err(StateError::RequestMismatch(format!("k{k}")));
                }
                return match self.leases.get(&kr) {
                    Some(l) if l.id == kid => MOutcome::Existing { token: ktoken },
                    _ => MOutcome::Err(StateError::RequestEnded(format!("k{k}"))),
                };
            }
        }
        // An earlier attempt with the same key still in line must match,
        // and is replaced by this one.
        let mut earlier = None;
        if let Some(k) = k {
            for (qr, q) in &self.queues {
                if let Some(w) = q.iter().find(|w| w.key == Some(k)) {
                    if (*qr, w.holder, w.ttl) != (r, h, ttl) {
                        return MOutcome::Err(StateError::RequestMismatch(format!("k{k}")));
                    }
                    earlier = Some(w.wid);
                }
            }
        }
        let Some(l) = self.leases.get(&r).cloned() else {
            return MOutcome::Granted {
                token: self.grant(r, h, ttl, k, id, now),
            };
        };
        if !wait {
            if let Some(old) = earlier {
                self.cancel(old);
                self.superseded.push(old);
            }
            return MOutcome::Held {
                holder: l.holder,
                token: l.token,
                expires_in: l.expires - now,
            };
        }
        let wid = WaiterId(self.next_waiter);
        self.next_waiter += 1;
        let waiter = MWaiter {
            wid,
            holder: h,
            ttl,
            key: k,
            id,
        };
        let q = self.queues.entry(r).or_default();
        if let Some(slot) = k.and_then(|k| q.iter_mut().find(|w| w.key == Some(k))) {
            self.superseded.push(slot.wid);
            *slot = waiter;
        } else {
            q.push_back(waiter);
        }
        MOutcome::Queued(wid)
    }

    fn check_token(&self, id: LeaseId, token: u64) -> Result<u8, StateError> {
        let r = self.find(id).ok_or(StateError::NotFound(id))?;
        if self.leases[&r].token != token {
            return Err(StateError::WrongToken {
                lease_id: id,
                offered: FencingToken(token),
            });
        }
        Ok(r)
    }

    fn renew(
        &mut self,
        id: LeaseId,
        token: u64,
        ttl: Option<Duration>,
        now: Duration,
    ) -> Result<u64, StateError> {
        self.expire(now);
        let r = self.check_token(id, token)?;
        let l = self.leases.get_mut(&r).expect("found");
        if let Some(ttl) = ttl {
            l.ttl = ttl;
        }
        l.expires = now + l.ttl;
        Ok(l.token)
    }

    fn release(&mut self, id: LeaseId, token: u64, now: Duration) -> Result<bool, StateError> {
        self.expire(now);
        if self.find(id).is_none() {
            return Ok(false);
        }
        let r = self.check_token(id, token)?;
        self.end(r, now);
        Ok(true)
    }

    fn cancel(&mut self, wid: WaiterId) -> bool {
        for (r, q) in self.queues.iter_mut() {
            if let Some(pos) = q.iter().position(|w| w.wid == wid) {
                q.remove(pos);
                if q.is_empty() {
                    let r = *r;
                    self.queues.remove(&r);
                }
                return true;
            }
        }
        false
    }

    fn restart(&mut self, now: Duration) {
        for l in self.leases.values_mut() {
            l.expires = now + l.ttl;
        }
        self.queues.clear();
        // A restored table numbers its waiters afresh.
        self.next_waiter = 0;
    }
}

// ----------------------------------------------------- the system under test

/// What the store would hold: the changes applied as `Store::commit` does.
#[derive(Debug, Default)]
struct Persisted {
    leases: HashMap<Resource, LeaseRecord>,
    keys: HashMap<RequestId, RequestRecord>,
    max_token: u64,
}

impl Persisted {
    fn apply(&mut self, change: &Change) {
        match change {
            Change::Granted(r) => {
                self.max_token = self.max_token.max(r.token.0);
                if let Some(k) = &r.request_id {
                    self.keys.insert(
                        k.clone(),
                        RequestRecord {
                            resource: r.resource.clone(),
                            holder: r.holder.clone(),
                            ttl: r.ttl,
                            lease_id: r.lease_id,
                            token: r.token,
                            recorded_unix_ms: r.acquired_unix_ms,
                        },
                    );
                }
                self.leases.insert(r.resource.clone(), r.clone());
            }
            Change::Renewed {
                record,
                ttl_changed: true,
            } => {
                self.leases.insert(record.resource.clone(), record.clone());
            }
            Change::Renewed { .. } => {}
            Change::Ended { record, .. } => {
                self.leases.remove(&record.resource);
            }
            Change::RequestsCollected(keys) => {
                for k in keys {
                    self.keys.remove(k);
                }
            }
        }
    }
}

struct Harness {
    table: LeaseTable,
    model: Model,
    persisted: Persisted,
    now: Duration,
    next_id: u64,
    /// Every lease ever granted: (id, token).
    granted: Vec<(LeaseId, u64)>,
    waiters: Vec<WaiterId>,
    /// Invariant trackers fed by the change stream.
    live: HashMap<Resource, u64>,
    tokens: Vec<u64>,
    keys_granted: HashSet<RequestId>,
}

impl Harness {
    fn new() -> Self {
        Harness {
            table: LeaseTable::new(TableLimits::default(), 0),
            model: Model::default(),
            persisted: Persisted::default(),
            now: Duration::from_secs(1),
            next_id: 0,
            granted: Vec::new(),
            waiters: Vec::new(),
            live: HashMap::new(),
            tokens: Vec::new(),
            keys_granted: HashSet::new(),
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.now,
            unix_ms: 1_700_000_000_000 + self.now.as_millis() as u64,
        }
    }

    /// Checks the invariants on the changes, persists them, and compares
    /// the waiters the table handed leases to with the model's.
    fn absorb(&mut self, fx: Effects) -> Result<(), TestCaseError> {
        for change in &fx.changes {
            match change {
                Change::Granted(r) => {
                    prop_assert!(
                        !self.live.contains_key(&r.resource),
                        "{} granted (token {}) while token {:?} was live on it",
                        r.resource,
                        r.token.0,
                        self.live.get(&r.resource)
                    );
                    if let Some(&last) = self.tokens.last() {
                        prop_assert!(r.token.0 > last, "token {} after {last}", r.token.0);
                    }
                    if let Some(k) = &r.request_id {
                        prop_assert!(
                            self.keys_granted.insert(k.clone()),
                            "key {k:?} granted twice"
                        );
                    }
                    self.tokens.push(r.token.0);
                    self.live.insert(r.resource.clone(), r.token.0);
                    self.granted.push((r.lease_id, r.token.0));
                }
                Change::Ended { record, .. } => {
                    prop_assert_eq!(self.live.remove(&record.resource), Some(record.token.0));
                }
                _ => {}
            }
            self.persisted.apply(change);
        }
        let handed: Vec<(WaiterId, u64)> = fx
            .granted
            .iter()
            .map(|(w, v)| (*w, v.record.token.0))
            .collect();
        let expected = std::mem::take(&mut self.model.handed);
        prop_assert_eq!(handed, expected, "waiters handed a lease");
        let mut superseded = fx.superseded.clone();
        let mut expected = std::mem::take(&mut self.model.superseded);
        superseded.sort();
        expected.sort();
        prop_assert_eq!(superseded, expected, "superseded waiters");
        Ok(())
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        let now = self.now();
        let mut fx = Effects::default();
        match *op {
            Op::Acquire {
                resource: r,
                holder: h,
                ttl,
                key: k,
                wait,
            } => {
                let ttl = Duration::from_millis(TTLS_MS[ttl]);
                self.next_id += 1;
                let id = lease_id(self.next_id);
                let cmd = AcquireCmd {
                    resource: resource(r),
                    holder: holder(h),
                    ttl,
                    request_id: k.map(key),
                    wait,
                    lease_id: id,
                };
                let got = match self.table.acquire(cmd, now, &mut fx) {
                    Ok(Acquired::Granted(v)) => {
                        prop_assert_eq!(v.record.lease_id, id);
                        prop_assert_eq!(v.expires_in, ttl);
                        MOutcome::Granted {
                            token: v.record.token.0,
                        }
                    }
                    Ok(Acquired::Existing(v)) => MOutcome::Existing {
                        token: v.record.token.0,
                    },
                    Ok(Acquired::Held {
                        holder,
                        token,
                        expires_in,
                    }) => MOutcome::Held {
                        holder: holder.as_str()[1..].parse().expect("h<n>"),
                        token: token.0,
                        expires_in,
                    },
                    Ok(Acquired::Queued(w)) => {
                        self.waiters.push(w);
                        MOutcome::Queued(w)
                    }
                    Err(e) => MOutcome::Err(e),
                };
                let want = self.model.acquire(r, h, ttl, k, wait, id, self.now);
                prop_assert_eq!(got, want);
            }
            Op::Renew {
                lease,
                ttl,
                wrong_token,
            } => {
                let Some(&(id, token)) = self.pick(lease) else {
                    return Ok(());
                };
                let token = if wrong_token {
                    token + 1_000_000
                } else {
                    token
                };
                let ttl = ttl.map(|t| Duration::from_millis(TTLS_MS[t]));
                let got = self
                    .table
                    .renew(id, FencingToken(token), ttl, now, &mut fx)
                    .map(|v| v.record.token.0);
                let want = self.model.renew(id, token, ttl, self.now);
                prop_assert_eq!(got, want);
            }
            Op::Release { lease, wrong_token } => {
                let Some(&(id, token)) = self.pick(lease) else {
                    return Ok(());
                };
                let token = if wrong_token {
                    token + 1_000_000
                } else {
                    token
                };
                let got = self.table.release(id, FencingToken(token), now, &mut fx);
                let want = self.model.release(id, token, self.now);
                prop_assert_eq!(got, want);
            }
            Op::Revoke { resource: r } => {
                let got = self
                    .table
                    .revoke(&resource(r), None, now, &mut fx)
                    .map(|v| v.record.token.0);
                self.model.expire(self.now);
                let want = self.model.leases.get(&r).map(|l| l.token);
                if want.is_some() {
                    self.model.end(r, self.now);
                }
                prop_assert_eq!(got, want);
            }
            Op::Cancel { waiter } => {
                if self.waiters.is_empty() {
                    return Ok(());
                }
                let w = self.waiters[waiter as usize % self.waiters.len()];
                prop_assert_eq!(self.table.cancel_waiter(w), self.model.cancel(w));
            }
            Op::Advance { ms } => {
                self.now += Duration::from_millis(u64::from(ms));
                self.table.expire_due(self.now(), &mut fx);
                self.model.expire(self.now);
            }
            Op::Restart => return self.restart(),
        }
        self.absorb(fx)?;
        self.compare()
    }

    fn pick(&self, n: u8) -> Option<&(LeaseId, u64)> {
        if self.granted.is_empty() {
            return None;
        }
        self.granted.get(n as usize % self.granted.len())
    }

    /// Compares every resource as the table and the model see it.
    fn compare(&mut self) -> Result<(), TestCaseError> {
        let now = self.now();
        for r in 0..RESOURCES {
            let mut fx = Effects::default();
            let got: Option<LeaseView> = self.table.describe(&resource(r), now, &mut fx);
            prop_assert!(
                fx.changes.is_empty(),
                "describe changed state after expiry had run"
            );
            let got = got.map(|v| {
                (
                    v.record.token.0,
                    v.record.holder.to_string(),
                    v.expires_in,
                    v.waiters,
                )
            });
            let want = self.model.leases.get(&r).map(|l| {
                let waiters = self.model.queues.get(&r).map_or(0, |q| q.len() as u32);
                (
                    l.token,
                    format!("h{}", l.holder),
                    l.expires.saturating_sub(self.now),
                    waiters,
                )
            });
            prop_assert_eq!(got, want, "resource r{}", r);
        }
        prop_assert_eq!(self.table.last_token().0, self.model.last_token);
        Ok(())
    }

    /// Rebuilds the table from what the store would hold, as after a crash.
    fn restart(&mut self) -> Result<(), TestCaseError> {
        let before: BTreeMap<u8, (u64, LeaseId)> = self
            .model
            .leases
            .iter()
            .map(|(r, l)| (*r, (l.token, l.id)))
            .collect();
        let highest = self.tokens.last().copied().unwrap_or(0);
        self.table = LeaseTable::restore(
            TableLimits::default(),
            self.persisted.max_token,
            self.persisted.leases.values().cloned(),
            self.persisted
                .keys
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
            self.now(),
        );
        self.model.restart(self.now);
        self.waiters.clear();
        // No acknowledged lease is lost: the same id and token, a full TTL.
        for (r, (token, id)) in before {
            let mut fx = Effects::default();
            let v = self.table.describe(&resource(r), self.now(), &mut fx);
            prop_assert!(
                v.is_some(),
                "r{} lost its lease (token {}) in a restart",
                r,
                token
            );
            let v = v.expect("checked");
            prop_assert_eq!((v.record.token.0, v.record.lease_id), (token, id));
            prop_assert_eq!(v.expires_in, v.record.ttl);
        }
        // No token is reused.
        prop_assert!(self.table.last_token().0 >= highest);
        self.compare()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn the_table_agrees_with_the_model(ops in prop::collection::vec(op(), 1..80)) {
        let mut h = Harness::new();
        for op in &ops {
            h.step(op)?;
        }
    }
}

/// The harness can fail: a model that forgets to expire disagrees at once.
#[test]
fn the_harness_catches_a_wrong_model() {
    let mut h = Harness::new();
    h.step(&Op::Acquire {
        resource: 0,
        holder: 0,
        ttl: 0,
        key: None,
        wait: false,
    })
    .unwrap();
    // Move time only in the table: the model still thinks the lease lives.
    h.now += Duration::from_millis(150);
    let mut fx = Effects::default();
    h.table.expire_due(h.now(), &mut fx);
    assert!(h.absorb(fx).is_ok());
    assert!(h.compare().is_err(), "the comparison missed an expiry");
}
