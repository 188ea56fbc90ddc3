//! The coordinator: state machine + store + clock.
//!
//! [`Coordinator`] is what the gRPC service calls. Each operation:
//!
//! 1. reads the clock ([`Now`]) and draws random lease ids: the only
//!    non-deterministic inputs, passed into the pure [`LeaseTable`];
//! 2. under one short lock, applies the command, and hands the resulting
//!    changes to the committer (`commit.rs`) (so the disk sees them in table order) along
//!    with the replies that must wait for them;
//! 3. outside the lock, awaits durability when the reply reveals a token or
//!    a state change, then answers.
//!
//! Waiting Acquires park on a oneshot channel. When a lease ends, the table
//! grants the resource to the first waiter in the same command, and the
//! waiter's reply is sent only once that grant is durable. If the waiter has
//! gone away by then (its call was cancelled), nobody will ever hold that
//! lease, so it is released straight away (`Orphan`).
//!
//! A background timer sleeps until the next deadline and expires leases, so
//! waiters are handed over on expiry even when no other call comes in.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::commit::{Committer, Durable, Job, Reply};
use crate::lease::{Bounds, FencingToken, Holder, InvalidField, LeaseId, RequestId, Resource};
use crate::state::{
    AcquireCmd, Acquired, Change, Counters, Effects, LeaseMatch, LeaseTable, LeaseView, Now,
    StateError, TableLimits, WaiterId,
};
use crate::store::{GrantRecord, Store, StoreError, StoreOptions};

/// Everything the coordinator can be configured with.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// TTL and wait bounds (validated at the edge).
    pub bounds: Bounds,
    /// The table's limits.
    pub limits: TableLimits,
    /// Store options.
    pub store: StoreOptions,
    /// Where the coordinator reads the time (tests hand it a paused one).
    pub clock: Clock,
}

/// Why an operation failed. The service maps each variant to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A request field is out of bounds.
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    /// The state machine refused the command.
    #[error(transparent)]
    State(#[from] StateError),
    /// The store failed; nothing was handed out.
    #[error("storage is unavailable: {0}")]
    Storage(Arc<StoreError>),
    /// The server is shutting down.
    #[error("the server is shutting down; retry against it once it is back")]
    ShuttingDown,
    /// In a cluster: this node does not lead (or has not finished taking over).
    #[error("this node is not the cluster's leader{}; retry against the leader (any node forwards to it once one is elected)", .leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader {
        /// The leader's address, when known.
        leader: Option<String>,
    },
}

/// The replicated log as the coordinator sees it (implemented by
/// [`crate::raft::Node`]). On a single node the committer and the store
/// take its place.
pub trait Replicated: Send + Sync + 'static {
    /// Queues a job (called under the coordinator's lock, so in table
    /// order); its replies run once its changes are committed and applied
    /// on a majority, or failed.
    fn submit(&self, job: Job);
    /// Resolves once this node has confirmed, after the call, that it still
    /// leads (many callers share one confirmation).
    fn linearize(&self) -> futures_util::future::BoxFuture<'static, Result<(), CoordinatorError>>;
    /// Entries written so far.
    fn batches(&self) -> u64;
    /// The leader's address, when known (for error messages).
    fn leader_hint(&self) -> Option<String>;
    /// The last grants on `resource` this node applied, newest first.
    fn history(&self, resource: &Resource, limit: usize) -> Vec<GrantRecord>;
}

/// Where decided changes go.
enum Backend {
    /// A single node: the committer writes them to the local store.
    Local {
        committer: Committer,
        store: Arc<Store>,
    },
    /// A cluster node: they go into the Raft log.
    Replicated(Arc<dyn Replicated>),
}

/// What an Acquire returns.
#[derive(Debug, Clone)]
pub enum AcquireOutcome {
    /// The caller holds this lease (new, or the same one again on a retry).
    Lease(LeaseView),
    /// Someone else holds it.
    Held {
        /// Who.
        holder: Holder,
        /// Their token.
        token: FencingToken,
        /// Time left on their lease.
        expires_in: Duration,
    },
}

/// A validated Acquire.
#[derive(Debug, Clone)]
pub struct AcquireRequest {
    /// What to lease.
    pub resource: Resource,
    /// Who asks.
    pub holder: Holder,
    /// The lease's TTL.
    pub ttl: Duration,
    /// Idempotency key.
    pub request_id: Option<RequestId>,
    /// How long to wait in line (zero: don't).
    pub wait: Duration,
}

/// One numbered change, for watchers.
#[derive(Debug, Clone)]
pub struct Event {
    /// Increases by one per event since the server started.
    pub sequence: u64,
    /// What happened.
    pub change: Change,
    /// Time left on the lease when it happened (zero once ended).
    pub expires_in: Duration,
}

/// Figures for operators.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    /// Counters since start.
    pub counters: Counters,
    /// Live leases.
    pub live_leases: usize,
    /// Queued waiters.
    pub waiters: usize,
    /// Highest token granted.
    pub last_token: FencingToken,
    /// Time since start.
    pub uptime: Duration,
    /// Bytes the database occupies.
    pub data_size: u64,
    /// Batches the committer has written (each one flush).
    pub commit_batches: u64,
}

type WaitReply = Result<LeaseView, CoordinatorError>;

/// One pass of Acquire: done, or parked in line.
enum Attempt {
    Done(AcquireOutcome),
    Queued(WaiterId, oneshot::Receiver<WaitReply>),
}

/// A grant whose waiter vanished, or whose write failed.
enum Orphan {
    /// Granted and durable, but its waiter is gone: release it.
    Release(LeaseId, FencingToken),
    /// Its write failed: take it back.
    Abort(LeaseId),
}

struct Inner {
    table: LeaseTable,
    waiters: HashMap<WaiterId, oneshot::Sender<WaitReply>>,
    sequence: u64,
    /// In a cluster, the epoch the table was rebuilt at (see `crate::raft`).
    epoch: u64,
}

struct Core {
    inner: Mutex<Inner>,
    backend: Backend,
    /// Whether this node decides: always on a single node; in a cluster,
    /// only on the leader once its table is rebuilt.
    ready: std::sync::atomic::AtomicBool,
    config: Config,
    clock: Clock,
    /// When the timer will next wake, in nanoseconds of the clock.
    timer_at: AtomicU64,
    timer: Notify,
    orphans: mpsc::UnboundedSender<Orphan>,
    events: broadcast::Sender<Event>,
    shutdown: CancellationToken,
}

/// The coordinator. Cheap to clone; all clones share one table.
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Core>,
}

/// How many events a slow watcher may fall behind before it is dropped.
pub const WATCH_BUFFER: usize = 4096;

/// The longest the expiry timer sleeps (it also collects idempotency keys).
const TIMER_MAX_SLEEP: Duration = Duration::from_secs(1);

impl Coordinator {
    /// Opens the store in `data_dir`, restores the table and starts the
    /// committer thread and the expiry timer. Must run inside a tokio runtime.
    pub fn open(data_dir: &std::path::Path, config: Config) -> Result<Self, StoreError> {
        let store = Arc::new(Store::open(data_dir, config.store.clone())?);
        let loaded = store.load()?;
        let clock = config.clock;
        let now = clock.now();
        let restored = loaded.leases.len();
        let table = LeaseTable::restore(
            config.limits,
            loaded.last_token,
            loaded.leases,
            loaded.requests,
            now,
        );
        tracing::info!(
            leases = restored,
            last_token = table.last_token().0,
            dir = %data_dir.display(),
            "store opened"
        );
        let committer = Committer::start(store.clone()).map_err(|source| StoreError::Io {
            what: "starting the committer thread for",
            path: data_dir.to_owned(),
            source,
        })?;
        Ok(Self::start(
            table,
            Backend::Local { committer, store },
            true,
            config,
        ))
    }

    /// Builds the coordinator around `table` and starts its timer and
    /// orphan tasks. `ready`: whether it decides from the start.
    fn start(table: LeaseTable, backend: Backend, ready: bool, config: Config) -> Self {
        let (orphans, orphan_rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        let clock = config.clock;
        let shared = Arc::new(Core {
            inner: Mutex::new(Inner {
                table,
                waiters: HashMap::new(),
                sequence: 0,
                epoch: 0,
            }),
            backend,
            ready: std::sync::atomic::AtomicBool::new(ready),
            config,
            clock,
            timer_at: AtomicU64::new(u64::MAX),
            timer: Notify::new(),
            orphans,
            events,
            shutdown: CancellationToken::new(),
        });
        let coordinator = Coordinator { shared };
        tokio::spawn(coordinator.clone().run_timer());
        tokio::spawn(coordinator.clone().run_orphans(orphan_rx));
        coordinator
    }

    /// The configured bounds (for validating requests at the edge).
    pub fn bounds(&self) -> Bounds {
        self.shared.config.bounds
    }

    /// Cancelled when the coordinator shuts down; streams end on it.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shared.shutdown.clone()
    }

    /// Subscribes to changes, numbered in order.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    fn now(&self) -> Now {
        self.shared.clock.now()
    }

    /// A cluster node's coordinator: its changes go to `log`. It decides
    /// nothing until [`Coordinator::promote`] (the node became leader and
    /// its `Promote` entry is applied). Must run inside a tokio runtime.
    pub fn open_replicated(log: Arc<dyn Replicated>, config: Config) -> Self {
        let table = LeaseTable::new(config.limits, 0);
        Self::start(table, Backend::Replicated(log), false, config)
    }

    /// Whether this node decides (always on a single node).
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst)
    }

    fn check_ready(&self) -> Result<(), CoordinatorError> {
        if self.is_ready() {
            return Ok(());
        }
        Err(CoordinatorError::NotLeader {
            leader: match &self.shared.backend {
                Backend::Replicated(log) => log.leader_hint(),
                Backend::Local { .. } => None,
            },
        })
    }

    /// In a cluster: waits until this node has confirmed it still leads,
    /// then checks it still decides. Nothing to do on a single node.
    async fn linearize(&self) -> Result<(), CoordinatorError> {
        if let Backend::Replicated(log) = &self.shared.backend {
            self.check_ready()?;
            log.linearize().await?;
        }
        self.check_ready()
    }

    /// In a cluster, when this node has become leader and its `Promote`
    /// entry (index `epoch`) is applied: rebuilds the table from the applied
    /// state `loaded`, every lease with its full TTL from now (as a restart
    /// does), and starts deciding.
    pub fn promote(&self, epoch: u64, loaded: crate::store::Loaded) {
        let now = self.now();
        let mut inner = self.shared.inner.lock();
        let leases = loaded.leases.len();
        inner.table = LeaseTable::restore(
            self.shared.config.limits,
            loaded.last_token,
            loaded.leases,
            loaded.requests,
            now,
        );
        inner.epoch = epoch;
        let waiters: Vec<_> = inner.waiters.drain().collect();
        self.shared.ready.store(true, Ordering::SeqCst);
        self.shared.timer_at.store(0, Ordering::Relaxed);
        self.shared.timer.notify_one();
        drop(inner);
        for (_, tx) in waiters {
            let _ = tx.send(Err(CoordinatorError::NotLeader { leader: None }));
        }
        tracing::info!(
            epoch,
            leases,
            "leading: table rebuilt from the replicated state"
        );
    }

    /// In a cluster, when this node stops leading (or doubts a write of its
    /// epoch): stops deciding and tells the waiters to retry elsewhere.
    pub fn demote(&self) {
        let mut inner = self.shared.inner.lock();
        let was = self.shared.ready.swap(false, Ordering::SeqCst);
        let waiters: Vec<_> = inner.waiters.drain().collect();
        drop(inner);
        for (_, tx) in waiters {
            let _ = tx.send(Err(CoordinatorError::NotLeader { leader: None }));
        }
        if was {
            tracing::info!("no longer deciding: not the leader");
        }
    }

    /// The epoch this node decides in, while it does.
    pub fn epoch(&self) -> Option<u64> {
        let inner = self.shared.inner.lock();
        self.is_ready().then_some(inner.epoch)
    }

    /// Applies one command under the lock and queues its effects.
    ///
    /// `f` returns the command's result and whether the caller must wait
    /// until everything queued so far (including this command's changes) is
    /// durable; if so, the returned receiver resolves then.
    fn apply<R>(
        &self,
        f: impl FnOnce(&mut Inner, Now, &mut Effects) -> (R, bool),
    ) -> (R, Option<oneshot::Receiver<Durable>>) {
        let now = self.now();
        let mut fx = Effects::default();
        let mut inner = self.shared.inner.lock();
        let (result, wait) = f(&mut inner, now, &mut fx);
        let mut replies: Vec<Reply> = Vec::with_capacity(fx.granted.len() + 1);
        for (waiter, view) in fx.granted.drain(..) {
            let Some(tx) = inner.waiters.remove(&waiter) else {
                // The waiter's caller is gone; nobody will hold this lease.
                let _ = self
                    .shared
                    .orphans
                    .send(Orphan::Release(view.record.lease_id, view.record.token));
                continue;
            };
            let orphans = self.shared.orphans.clone();
            replies.push(Box::new(move |durable: Durable| {
                let (id, token) = (view.record.lease_id, view.record.token);
                match durable {
                    Ok(()) => {
                        if tx.send(Ok(view)).is_err() {
                            let _ = orphans.send(Orphan::Release(id, token));
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(CoordinatorError::Storage(e)));
                        let _ = orphans.send(Orphan::Abort(id));
                    }
                }
            }));
        }
        for waiter in fx.superseded.drain(..) {
            if let Some(tx) = inner.waiters.remove(&waiter) {
                let _ = tx.send(Err(StateError::Superseded.into()));
            }
        }
        let receiver = wait.then(|| {
            let (tx, rx) = oneshot::channel();
            replies.push(Box::new(move |durable| {
                let _ = tx.send(durable);
            }));
            rx
        });
        if self.shared.events.receiver_count() > 0 {
            for change in &fx.changes {
                inner.sequence += 1;
                let expires_in = match change {
                    Change::Granted(r) | Change::Renewed { record: r, .. } => r.ttl,
                    _ => Duration::ZERO,
                };
                let _ = self.shared.events.send(Event {
                    sequence: inner.sequence,
                    change: change.clone(),
                    expires_in,
                });
            }
        }
        let needs_write = fx.needs_write();
        let submitted = needs_write || !replies.is_empty();
        if submitted {
            let changes = if needs_write { fx.changes } else { Vec::new() };
            let job = Job {
                changes,
                replies,
                epoch: inner.epoch,
            };
            match &self.shared.backend {
                Backend::Local { committer, .. } => committer.submit(job),
                Backend::Replicated(log) => log.submit(job),
            }
        }
        if let Some(next) = inner.table.next_deadline() {
            let next = next.as_nanos() as u64;
            if next < self.shared.timer_at.load(Ordering::Relaxed) {
                self.shared.timer_at.store(next, Ordering::Relaxed);
                self.shared.timer.notify_one();
            }
        }
        drop(inner);
        if let (true, Backend::Local { committer, .. }) = (submitted, &self.shared.backend) {
            // Outside the lock: this may write the batch on this thread.
            committer.help();
        }
        (result, receiver)
    }

    async fn durable(rx: Option<oneshot::Receiver<Durable>>) -> Result<(), CoordinatorError> {
        match rx {
            None => Ok(()),
            Some(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(CoordinatorError::Storage(e)),
                Err(_) => Err(CoordinatorError::ShuttingDown),
            },
        }
    }

    /// Acquire: grants, replays an idempotent retry, waits in line, or says
    /// who holds the resource.
    pub async fn acquire(&self, req: AcquireRequest) -> Result<AcquireOutcome, CoordinatorError> {
        match self.acquire_once(&req, !req.wait.is_zero()).await? {
            Attempt::Done(outcome) => Ok(outcome),
            Attempt::Queued(id, rx) => {
                match self.wait_in_line(id, rx, req.wait, &req.resource).await? {
                    Some(outcome) => Ok(outcome),
                    // The wait ended as the resource came free without being
                    // handed to us (it cannot happen while the table keeps its
                    // invariants); one more plain attempt settles it.
                    None => match self.acquire_once(&req, false).await? {
                        Attempt::Done(outcome) => Ok(outcome),
                        Attempt::Queued(..) => Err(CoordinatorError::ShuttingDown),
                    },
                }
            }
        }
    }

    async fn acquire_once(
        &self,
        req: &AcquireRequest,
        wait: bool,
    ) -> Result<Attempt, CoordinatorError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(CoordinatorError::ShuttingDown);
        }
        self.check_ready()?;
        let cmd = AcquireCmd {
            resource: req.resource.clone(),
            holder: req.holder.clone(),
            ttl: req.ttl,
            request_id: req.request_id.clone(),
            wait,
            lease_id: LeaseId::random(),
        };
        let ((result, waiting), durable) = self.apply(|inner, now, fx| {
            let result = inner.table.acquire(cmd, now, fx);
            let mut waiting = None;
            if let Ok(Acquired::Queued(id)) = &result {
                let (tx, rx) = oneshot::channel();
                inner.waiters.insert(*id, tx);
                waiting = Some(rx);
            }
            let wait = matches!(result, Ok(Acquired::Granted(_) | Acquired::Existing(_)));
            ((result, waiting), wait)
        });
        Ok(match result? {
            Acquired::Granted(view) => {
                if let Err(e) = Self::durable(durable).await {
                    let id = view.record.lease_id;
                    self.apply(|inner, now, fx| (inner.table.abort(id, now, fx), false));
                    return Err(e);
                }
                Attempt::Done(AcquireOutcome::Lease(view))
            }
            Acquired::Existing(view) => {
                Self::durable(durable).await?;
                Attempt::Done(AcquireOutcome::Lease(view))
            }
            Acquired::Held {
                holder,
                token,
                expires_in,
            } => Attempt::Done(AcquireOutcome::Held {
                holder,
                token,
                expires_in,
            }),
            Acquired::Queued(id) => match waiting {
                Some(rx) => Attempt::Queued(id, rx),
                None => return Err(CoordinatorError::ShuttingDown),
            },
        })
    }

    /// Waits for a queued Acquire's grant. `None`: the wait ran out while
    /// the resource was free (see `acquire`).
    async fn wait_in_line(
        &self,
        id: WaiterId,
        mut rx: oneshot::Receiver<WaitReply>,
        wait: Duration,
        resource: &Resource,
    ) -> Result<Option<AcquireOutcome>, CoordinatorError> {
        // If this future is dropped (the caller went away), the guard takes
        // the waiter out of line.
        let mut guard = WaitGuard {
            coordinator: self,
            id,
            armed: true,
        };
        let shutdown = self.shared.shutdown.clone();
        let outcome = tokio::select! {
            r = &mut rx => Some(r),
            _ = tokio::time::sleep(wait) => None,
            _ = shutdown.cancelled() => Some(Ok(Err(CoordinatorError::ShuttingDown))),
        };
        let reply = match outcome {
            Some(reply) => reply,
            None => {
                let (still_queued, _) = self.apply(|inner, now, fx| {
                    if inner.table.cancel_waiter(id) {
                        inner.waiters.remove(&id);
                        (Some(inner.table.describe(resource, now, fx)), false)
                    } else {
                        (None, false)
                    }
                });
                match still_queued {
                    Some(view) => {
                        guard.armed = false;
                        return Ok(view.map(|v| AcquireOutcome::Held {
                            holder: v.record.holder,
                            token: v.record.token,
                            expires_in: v.expires_in,
                        }));
                    }
                    // Granted just now: the reply is on its way.
                    None => rx.await,
                }
            }
        };
        guard.armed = false;
        match reply {
            Ok(r) => r.map(|v| Some(AcquireOutcome::Lease(v))),
            Err(_) => Err(CoordinatorError::ShuttingDown),
        }
    }

    /// Renew: extends a lease; `ttl` `None` keeps its TTL.
    pub async fn renew(
        &self,
        lease_id: LeaseId,
        token: FencingToken,
        ttl: Option<Duration>,
    ) -> Result<LeaseView, CoordinatorError> {
        self.linearize().await?;
        let (result, durable) = self.apply(|inner, now, fx| {
            let r = inner.table.renew(lease_id, token, ttl, now, fx);
            let wait = fx.needs_write();
            (r, wait)
        });
        let view = result?;
        Self::durable(durable).await?;
        Ok(view)
    }

    /// Renew for keepalive streams: [`Coordinator::renew_now`], after (in a
    /// cluster) the leadership check every renewal needs.
    pub async fn keepalive(
        &self,
        lease_id: LeaseId,
        token: FencingToken,
    ) -> Result<LeaseView, CoordinatorError> {
        self.linearize().await?;
        Ok(self.renew_now(lease_id, token)?)
    }

    /// Renew without waiting for the disk; for keepalive streams, whose
    /// renewals keep the TTL and so never need a write. In a cluster, call
    /// [`Coordinator::keepalive`] (this one does not check leadership).
    pub fn renew_now(
        &self,
        lease_id: LeaseId,
        token: FencingToken,
    ) -> Result<LeaseView, StateError> {
        self.apply(|inner, now, fx| (inner.table.renew(lease_id, token, None, now, fx), false))
            .0
    }

    /// Release: ends a lease; false when it had already ended.
    pub async fn release(
        &self,
        lease_id: LeaseId,
        token: FencingToken,
    ) -> Result<bool, CoordinatorError> {
        self.check_ready()?;
        let (result, durable) = self.apply(|inner, now, fx| {
            let r = inner.table.release(lease_id, token, now, fx);
            let wait = matches!(r, Ok(true));
            (r, wait)
        });
        let released = result?;
        Self::durable(durable).await?;
        Ok(released)
    }

    /// Describe: the live lease on a resource, once everything queued is durable.
    pub async fn describe(
        &self,
        resource: &Resource,
    ) -> Result<Option<LeaseView>, CoordinatorError> {
        self.linearize().await?;
        let (view, durable) =
            self.apply(|inner, now, fx| (inner.table.describe(resource, now, fx), true));
        Self::durable(durable).await?;
        Ok(view)
    }

    /// Revoke (operators): ends the lease on `resource` (only if it matches `only`).
    pub async fn revoke(
        &self,
        resource: &Resource,
        only: Option<LeaseMatch>,
    ) -> Result<Option<LeaseView>, CoordinatorError> {
        self.check_ready()?;
        let (view, durable) = self.apply(|inner, now, fx| {
            let v = inner.table.revoke(resource, only, now, fx);
            let wait = v.is_some();
            (v, wait)
        });
        Self::durable(durable).await?;
        Ok(view)
    }

    /// Live leases in resource order after `after`, with `prefix`; at most `limit`.
    pub fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Vec<LeaseView> {
        self.apply(|inner, now, fx| (inner.table.list(prefix, after, limit, now, fx), false))
            .0
    }

    /// The last grants on a resource, newest first.
    pub fn history(
        &self,
        resource: &Resource,
        limit: usize,
    ) -> Result<Vec<GrantRecord>, CoordinatorError> {
        match &self.shared.backend {
            Backend::Local { store, .. } => store
                .history(resource, limit)
                .map_err(|e| CoordinatorError::Storage(Arc::new(e))),
            Backend::Replicated(log) => Ok(log.history(resource, limit)),
        }
    }

    /// Figures for operators.
    pub fn stats(&self) -> Stats {
        let inner = self.shared.inner.lock();
        Stats {
            counters: inner.table.counters(),
            live_leases: inner.table.live_leases(),
            waiters: inner.table.waiters(),
            last_token: inner.table.last_token(),
            uptime: self.shared.clock.elapsed(),
            data_size: match &self.shared.backend {
                Backend::Local { store, .. } => store.size_on_disk(),
                Backend::Replicated(_) => 0,
            },
            commit_batches: match &self.shared.backend {
                Backend::Local { committer, .. } => committer.batches(),
                Backend::Replicated(log) => log.batches(),
            },
        }
    }

    /// Stops: ends streams and waits, refuses new work, writes what is
    /// queued, flushes and closes the store. Idempotent.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
        let waiters: Vec<_> = self.shared.inner.lock().waiters.drain().collect();
        for (_, tx) in waiters {
            let _ = tx.send(Err(CoordinatorError::ShuttingDown));
        }
        if let Backend::Local { committer, store } = &self.shared.backend {
            committer.close();
            // Other clones (a connection still winding down) may keep `Core`
            // alive a little longer; the database is released now regardless.
            if let Err(e) = store.close() {
                tracing::error!(error = %e, "closing the store failed");
            }
        }
    }

    async fn run_timer(self) {
        let shutdown = self.shared.shutdown.clone();
        loop {
            let next = {
                let inner = self.shared.inner.lock();
                let cap = self.shared.clock.elapsed() + TIMER_MAX_SLEEP;
                let next = inner.table.next_deadline().map_or(cap, |d| d.min(cap));
                self.shared
                    .timer_at
                    .store(next.as_nanos() as u64, Ordering::Relaxed);
                next
            };
            let at = self.shared.clock.instant_at(next);
            tokio::select! {
                _ = tokio::time::sleep_until(at) => {}
                _ = self.shared.timer.notified() => continue,
                _ = shutdown.cancelled() => return,
            }
            if self.is_ready() {
                // A node that does not lead expires nothing (etcd #12528).
                self.apply(|inner, now, fx| (inner.table.expire_due(now, fx), false));
            }
        }
    }

    async fn run_orphans(self, mut rx: mpsc::UnboundedReceiver<Orphan>) {
        let shutdown = self.shared.shutdown.clone();
        loop {
            let orphan = tokio::select! {
                o = rx.recv() => o,
                _ = shutdown.cancelled() => None,
            };
            let Some(orphan) = orphan else { return };
            match orphan {
                Orphan::Release(id, token) => {
                    tracing::debug!(
                        ?id,
                        token = token.0,
                        "releasing a grant whose waiter went away"
                    );
                    let _ = self
                        .apply(|inner, now, fx| (inner.table.release(id, token, now, fx), false));
                }
                Orphan::Abort(id) => {
                    self.apply(|inner, now, fx| (inner.table.abort(id, now, fx), false));
                }
            }
        }
    }
}

/// Takes a waiter out of line if its Acquire future is dropped.
struct WaitGuard<'a> {
    coordinator: &'a Coordinator,
    id: WaiterId,
    armed: bool,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let id = self.id;
            self.coordinator.apply(|inner, _, _| {
                if inner.table.cancel_waiter(id) {
                    inner.waiters.remove(&id);
                }
                ((), false)
            });
        }
    }
}
