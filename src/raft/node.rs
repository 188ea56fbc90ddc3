//! A cluster node: starts openraft over our log, state machine and network,
//! forms the cluster, and connects it to the [`Coordinator`].
//!
//! - **Forming.** A fresh node started with `--peers` (and without
//!   `--join`) calls openraft's `initialize` with the same members as every
//!   other node; openraft allows that on every node with the same
//!   configuration, and a node that already holds a log answers
//!   `NotAllowed`, which is ignored. So three processes with the same
//!   `--peers` form the cluster by themselves, in any order.
//! - **Promotion.** When openraft makes this node leader, the leadership
//!   task appends a `Promote` entry; once it is applied, the coordinator's
//!   table is rebuilt from the applied state ([`Coordinator::promote`]) and
//!   the node starts deciding. When it stops leading, or a write of its
//!   epoch fails or times out (its outcome is then unknown), the coordinator
//!   is demoted and, if still leader, promoted again from the log.
//! - **Keys.** Before a promoted node decides anything, it takes on the
//!   cluster's key set from the applied state; if the cluster has none yet
//!   (its first leader), it proposes its own first. So whichever node leads
//!   signs with the replicated set. [`Node::change_keys`] runs `keys
//!   rotate` / `retire` through the log.
//! - **Proposer.** The coordinator's jobs (queued in table order) are
//!   batched into entries, one per epoch run, sent with `client_write_ff`
//!   without waiting (so entries pipeline), and answered in log order by the
//!   replier once applied, or failed after the commit timeout.
//! - **Linearizer.** Renewals and describes write nothing; each waits for one
//!   `ensure_linearizable` that *started* after it arrived, which every
//!   caller arriving meanwhile shares.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::future::BoxFuture;
use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState, SnapshotPolicy};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::ClientTlsConfig;

use super::log_store::LogStore;
use super::network::{Channels, Network};
use super::state_machine::{Applied, StateMachine};
use super::wire::to_wire;
use super::KeyText;
use super::{NodeId, Raft, Request, Response, TypeConfig};
use crate::commit::{Durable, Job, Reply};
use crate::coordinator::{Config, Coordinator, CoordinatorError, Replicated};
use crate::keys::{KeySet, Keys, KeysError};
use crate::lease::Resource;
use crate::metrics::StoreMetrics;
use crate::store::{GrantRecord, StoreError};

/// How a node joins and paces the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This node's id.
    pub node_id: NodeId,
    /// The initial members and their addresses (`--peers`); every node of
    /// a new cluster is started with the same list.
    pub peers: BTreeMap<NodeId, String>,
    /// Wait to be added (`cluster add`) instead of forming a cluster.
    pub join: bool,
    /// `T`: a follower that hears nothing from the leader for openraft's
    /// leader lease (2 T) plus a random time between T and 2 T starts an
    /// election, so a dead leader is replaced 3 T to 4 T after its last
    /// heartbeat, plus one round trip to take over.
    pub election_timeout: Duration,
    /// How often the leader sends heartbeats. openraft 0.9 also gives
    /// every AppendEntries this long to be answered (its timeout is the
    /// heartbeat interval), so it must cover a batch's transfer and fsync
    /// on a busy follower: at 50 ms a follower catching up after a million
    /// grants never did, and kept calling elections.
    pub heartbeat: Duration,
    /// Longest a write or a leadership check may take before the call is
    /// answered UNAVAILABLE.
    pub commit_timeout: Duration,
    /// A snapshot is taken (and the log before it purged) once this many
    /// entries were applied since the last one and the log written since is
    /// at least as large as that snapshot (see `run_snapshots`).
    pub snapshot_every: u64,
    /// TLS for `https://` peers (the node's client identity under mTLS).
    pub peer_tls: Option<ClientTlsConfig>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_id: 1,
            peers: BTreeMap::new(),
            join: false,
            election_timeout: Duration::from_millis(250),
            heartbeat: Duration::from_millis(125),
            commit_timeout: Duration::from_secs(3),
            snapshot_every: 20_000,
            peer_tls: None,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The Raft log or snapshot could not be opened.
    #[error(
        "the Raft data in {path} could not be opened: {source}; check the disk and permissions"
    )]
    Storage {
        /// The directory.
        path: std::path::PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// openraft refused the configuration or stopped.
    #[error("the Raft node could not start: {0}; check --node-id, --peers and the timeouts")]
    Raft(String),
    /// This node is not among `--peers`.
    #[error("--node-id {0} is not in --peers; list every initial member, this node included (or pass --join)")]
    NotAMember(NodeId),
}

/// The snapshot policy: at least `every` entries since the last snapshot,
/// and at least as many bytes of log written since as the snapshot holds.
fn snapshot_due(entries: u64, every: u64, log_bytes: u64, snapshot_bytes: u64) -> bool {
    entries >= every && log_bytes >= snapshot_bytes
}

/// What the snapshot policy weighs: bytes of log appended since the node
/// started, and the current snapshot (its size).
struct Sizes {
    log: Arc<AtomicU64>,
    snapshot: StateMachine,
}

/// The log as the coordinator sees it.
struct Log {
    raft: Raft,
    proposals: mpsc::UnboundedSender<Job>,
    batches: AtomicU64,
    linearizer: Linearizer,
    commit_timeout: Duration,
    /// The applied state (the node reads the epoch and key set in it,
    /// `history` the recent grants).
    applied: Arc<Mutex<Applied>>,
}

/// One leadership check's outcome, for every caller that joined it.
type Round = watch::Sender<Option<Result<(), String>>>;

/// Shares one leadership check among the callers that arrived before it started.
#[derive(Default)]
struct Linearizer {
    next: Mutex<Option<Round>>,
    wake: Notify,
}

impl Log {
    fn leader_addr(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
    }
}

impl Replicated for Log {
    fn submit(&self, job: Job) {
        if let Err(mpsc::error::SendError(job)) = self.proposals.send(job) {
            let closed = Arc::new(StoreError::Closed);
            for reply in job.replies {
                reply(Err(closed.clone()));
            }
        }
    }

    fn linearize(&self) -> BoxFuture<'static, Result<(), CoordinatorError>> {
        let mut rx = {
            let mut next = self.linearizer.next.lock();
            match &*next {
                Some(tx) => tx.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(None);
                    *next = Some(tx);
                    self.linearizer.wake.notify_one();
                    rx
                }
            }
        };
        let hint = self.leader_addr();
        Box::pin(async move {
            let result = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().unwrap_or(Ok(())),
                Err(_) => Err("the node is stopping".to_owned()),
            };
            result.map_err(|why| {
                tracing::debug!(%why, "leadership check failed");
                CoordinatorError::NotLeader { leader: hint }
            })
        })
    }

    fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }

    fn leader_hint(&self) -> Option<String> {
        self.leader_addr()
    }

    fn history(&self, resource: &Resource, limit: usize) -> Vec<GrantRecord> {
        self.applied.lock().recent.history(resource.as_str(), limit)
    }
}

/// A running cluster node (cheap to clone).
#[derive(Clone)]
pub struct Node {
    shared: Arc<Shared>,
}

struct Shared {
    id: NodeId,
    raft: Raft,
    log: Arc<Log>,
    coordinator: OnceLock<Coordinator>,
    channels: Channels,
    kick: Notify,
    stop: CancellationToken,
    config: ClusterConfig,
    /// Set while the state imported from a single node's store is in no
    /// snapshot yet: members are not added meanwhile (they would miss it).
    import_pending: std::sync::atomic::AtomicBool,
    /// A leader address a forwarded call could not reach, and when: calls
    /// wait for the next leader instead of failing against it again.
    unreachable: Mutex<Option<(String, Instant)>>,
    /// Times this node has seen a new leader (for `/metrics`).
    leader_changes: std::sync::atomic::AtomicU64,
    /// The node's signing keys (the state machine keeps them in step with the log).
    keys: Keys,
    /// Serialises key changes on this node.
    key_change: tokio::sync::Mutex<()>,
    /// Jobs per entry and time to commit, as the single node's committer
    /// records them per batch.
    metrics: StoreMetrics,
}

/// Where a call for LeaseService or AdminService should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node decides: serve it here.
    Local,
    /// Forward to the leader at this address.
    Leader(String),
    /// No leader is known (an election is under way, or no majority).
    Unknown,
}

/// A pending entry: its replies run once it is applied.
struct Pending {
    rx: Option<tokio::sync::oneshot::Receiver<openraft::raft::ClientWriteResult<TypeConfig>>>,
    replies: Vec<Reply>,
    epoch: u64,
    /// When it was proposed.
    proposed: Instant,
    deadline: Instant,
    /// The entry's place among those in flight, given back once answered.
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Entries the proposer keeps in flight (proposed, not yet applied).
///
/// openraft 0.9 appends each proposed entry to the leader's log and waits
/// for its fsync inside its core loop before it replicates it, so every
/// entry costs one fsync in series, however small. Keeping only a few in
/// flight lets the jobs that arrive meanwhile gather into the next entry:
/// more changes per fsync. Two keep the pipeline busy: one syncing on the
/// leader while the one before it replicates.
const ENTRIES_IN_FLIGHT: usize = 2;

impl Node {
    /// Opens the node's Raft data in `data_dir`, starts openraft and the
    /// coordinator, and (unless joining) initializes the cluster with
    /// `--peers` when the node is fresh. `keys` take on every key set the
    /// log applies, and are the cluster's first if it has none. Must run
    /// inside a tokio runtime.
    pub async fn start(
        data_dir: &Path,
        config: ClusterConfig,
        coordinator: Config,
        keys: Keys,
    ) -> Result<(Node, Coordinator), NodeError> {
        if !config.join && !config.peers.contains_key(&config.node_id) {
            return Err(NodeError::NotAMember(config.node_id));
        }
        let metrics = coordinator.store.metrics.clone();
        let dir = data_dir.join("raft");
        let storage = |source| NodeError::Storage {
            path: dir.clone(),
            source,
        };
        // A fresh Raft directory next to a single node's store: this node
        // starts a cluster from that store (its leases, keys and tokens).
        let fresh = !dir.join("raft-log").exists() && !dir.join("raft-snapshot").exists();
        let imported = if fresh && data_dir.join("db").exists() && !config.join {
            if config.peers.len() != 1 {
                return Err(NodeError::Raft(format!(
                    "{} holds a single node's store: start the cluster from it with --peers naming only this node, then add the others with `leasehold cluster add`",
                    data_dir.display()
                )));
            }
            Some(import_single_node(data_dir, &coordinator)?)
        } else {
            None
        };
        let log_store = LogStore::open(&dir, metrics.wal_write.clone()).map_err(storage)?;
        let sm = StateMachine::open(&dir, Some(keys.clone())).map_err(storage)?;
        let sizes = Sizes {
            log: log_store.appended_bytes(),
            snapshot: sm.clone(),
        };
        let applied = sm.applied();
        if let Some(loaded) = &imported {
            applied.lock().import(loaded);
            tracing::info!(
                leases = loaded.leases.len(),
                last_token = loaded.last_token,
                "starting the cluster from this node's single-node store"
            );
        }
        let timeout = config.election_timeout.as_millis().max(2) as u64;
        let raft_config = openraft::Config {
            cluster_name: "leasehold".into(),
            election_timeout_min: timeout,
            // openraft waits its leader lease (= the maximum) and then a
            // random timeout in [min, max]: a dead leader is replaced within
            // 4 T, and the range is wide enough that two candidates rarely
            // split the vote.
            election_timeout_max: timeout * 2,
            heartbeat_interval: (config.heartbeat.as_millis() as u64).clamp(1, timeout / 2),
            // Per chunk; the last one waits while the follower decodes and
            // installs the whole state (a million leases: seconds).
            install_snapshot_timeout: 60_000,
            // Our own policy decides when (`run_snapshots`).
            snapshot_policy: SnapshotPolicy::Never,
            // Keep some entries after a snapshot so a follower a little
            // behind catches up from the log, not a whole snapshot.
            max_in_snapshot_log_to_keep: (config.snapshot_every / 2).min(1000),
            // Entries carry up to a few hundred changes each: 64 of them
            // keep one AppendEntries near a megabyte.
            max_payload_entries: 64,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let channels = Channels::new(config.peer_tls.clone());
        let network = Network {
            channels: channels.clone(),
        };
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            network,
            log_store,
            sm,
        )
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
        let (proposals, proposal_rx) = mpsc::unbounded_channel();
        let log = Arc::new(Log {
            raft: raft.clone(),
            proposals,
            batches: AtomicU64::new(0),
            linearizer: Linearizer::default(),
            commit_timeout: config.commit_timeout,
            applied,
        });
        let coordinator = Coordinator::open_replicated(log.clone(), coordinator);
        let shared = Arc::new(Shared {
            id: config.node_id,
            raft: raft.clone(),
            log,
            coordinator: OnceLock::new(),
            channels,
            kick: Notify::new(),
            stop: CancellationToken::new(),
            config: config.clone(),
            import_pending: std::sync::atomic::AtomicBool::new(imported.is_some()),
            unreachable: Mutex::new(None),
            leader_changes: std::sync::atomic::AtomicU64::new(0),
            keys,
            key_change: tokio::sync::Mutex::new(()),
            metrics,
        });
        let _ = shared.coordinator.set(coordinator.clone());
        let node = Node { shared };
        let (pending_tx, pending_rx) = mpsc::unbounded_channel();
        tokio::spawn(node.clone().run_proposer(proposal_rx, pending_tx));
        tokio::spawn(node.clone().run_replier(pending_rx));
        tokio::spawn(node.clone().run_linearizer());
        tokio::spawn(node.clone().run_leadership());
        tokio::spawn(node.clone().run_snapshots(sizes));

        if imported.is_some() {
            // New members must receive the imported state: it is in no
            // entry, so it reaches them only in a snapshot. Take one as soon
            // as this node leads, and purge the log it covers.
            tokio::spawn(node.clone().snapshot_imported());
        }
        if !config.join {
            let members: BTreeMap<NodeId, BasicNode> = config
                .peers
                .iter()
                .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
                .collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(node = config.node_id, "cluster initialized"),
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                    tracing::info!(node = config.node_id, "rejoining the cluster in the log")
                }
                Err(e) => return Err(NodeError::Raft(e.to_string())),
            }
        }
        Ok((node, coordinator))
    }

    /// Takes a snapshot once `snapshot_every` entries were applied since
    /// the last one *and* the log written since is at least as large as
    /// that snapshot. A snapshot rewrites the whole state, so a fixed entry
    /// count would rewrite a large state (a million live leases: hundreds
    /// of MB) over and over; this way each byte of log costs at most one
    /// byte of snapshot, and the log stays bounded by the state's size.
    async fn run_snapshots(self, sizes: Sizes) {
        let raft = self.shared.raft.clone();
        let every = self.shared.config.snapshot_every;
        let metrics = raft.metrics();
        let mut last = metrics.borrow().snapshot.map(|s| s.index);
        let mut log_at_last = sizes.log.load(Ordering::Relaxed);
        let mut asked: Option<Instant> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shared.stop.cancelled() => return,
            }
            let (applied, snapshot) = {
                let m = metrics.borrow();
                (
                    m.last_applied.map_or(0, |l| l.index),
                    m.snapshot.map(|s| s.index),
                )
            };
            if snapshot != last {
                // Taken (or installed from the leader): count from here.
                last = snapshot;
                log_at_last = sizes.log.load(Ordering::Relaxed);
                asked = None;
            }
            // One request at a time; asked again if nothing came of it.
            if asked.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
                continue;
            }
            let entries = applied.saturating_sub(last.unwrap_or(0));
            let log = sizes
                .log
                .load(Ordering::Relaxed)
                .saturating_sub(log_at_last);
            if snapshot_due(entries, every, log, sizes.snapshot.snapshot_len()) {
                tracing::debug!(entries, log, "taking a snapshot");
                if raft.trigger().snapshot().await.is_err() {
                    return; // the node is stopping
                }
                asked = Some(Instant::now());
            }
        }
    }

    async fn snapshot_imported(self) {
        let raft = self.shared.raft.clone();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && self.coordinator().epoch().is_none() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        let mut metrics = raft.metrics();
        while Instant::now() < deadline {
            let (snapshot, purged) = {
                let m = metrics.borrow();
                (m.snapshot, m.purged)
            };
            match (snapshot, purged) {
                (Some(at), Some(p)) if p.index >= at.index => {
                    tracing::info!(index = at.index, "snapshot of the imported store taken");
                    self.shared.import_pending.store(false, Ordering::SeqCst);
                    return;
                }
                (Some(at), _) => {
                    let _ = raft.trigger().purge_log(at.index).await;
                }
                _ => {}
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), metrics.changed()).await;
        }
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.id
    }

    /// The Raft instance (for the RaftService and the cluster API).
    pub fn raft(&self) -> &Raft {
        &self.shared.raft
    }

    /// The channels to peers (the forwarder reuses them).
    pub fn channels(&self) -> &Channels {
        &self.shared.channels
    }

    fn coordinator(&self) -> &Coordinator {
        self.shared
            .coordinator
            .get()
            .expect("set in Node::start before any task runs")
    }

    /// The leader's id and address, when one is known.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.shared.raft.metrics().borrow().clone();
        let leader = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&leader)?
            .addr
            .clone();
        Some((leader, addr))
    }

    /// Where a call should go, waiting up to `wait` for a leader to be
    /// elected or to finish taking over.
    pub async fn route(&self, wait: Duration) -> Route {
        let deadline = Instant::now() + wait;
        let mut metrics = self.shared.raft.metrics();
        loop {
            if self.coordinator().is_ready() {
                return Route::Local;
            }
            if let Some((id, addr)) = self.leader() {
                let dead = matches!(
                    &*self.shared.unreachable.lock(),
                    Some((a, at)) if *a == addr && at.elapsed() < Duration::from_secs(5)
                );
                if id != self.shared.id && !dead {
                    return Route::Leader(addr);
                }
            }
            // No leader, or this node is taking over: wait a little.
            let step = tokio::time::sleep(Duration::from_millis(10));
            tokio::select! {
                _ = metrics.changed() => {}
                _ = step => {}
            }
            if Instant::now() >= deadline {
                // Still the leader that could not be reached: it may well be
                // alive (no election happened); try it again.
                return match self.leader() {
                    Some((id, addr)) if id != self.shared.id => Route::Leader(addr),
                    _ => Route::Unknown,
                };
            }
        }
    }

    /// A forwarded call could not reach the leader at `addr` (it may have
    /// died): for a few seconds, calls wait for another leader instead.
    pub fn leader_unreachable(&self, addr: &str) {
        *self.shared.unreachable.lock() = Some((addr.to_owned(), Instant::now()));
    }

    /// A forwarded call reached the leader at `addr`.
    pub fn leader_reachable(&self, addr: &str) {
        let mut unreachable = self.shared.unreachable.lock();
        if unreachable.as_ref().is_some_and(|(a, _)| a == addr) {
            *unreachable = None;
        }
    }

    /// Stops the node's tasks and openraft.
    pub async fn shutdown(&self) {
        self.shared.stop.cancel();
        if let Err(e) = self.shared.raft.shutdown().await {
            tracing::warn!(error = %e, "stopping Raft");
        }
    }

    async fn run_proposer(
        self,
        mut jobs_rx: mpsc::UnboundedReceiver<Job>,
        pending: mpsc::UnboundedSender<Pending>,
    ) {
        const MAX_BATCH: usize = 1024;
        let log = self.shared.log.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(ENTRIES_IN_FLIGHT));
        while let Some(first) = jobs_rx.recv().await {
            // Wait for a slot before gathering: what arrives meanwhile
            // joins this entry.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let mut slot = Some(slot);
            let mut jobs = vec![first];
            while jobs.len() < MAX_BATCH {
                match jobs_rx.try_recv() {
                    Ok(job) => jobs.push(job),
                    Err(_) => break,
                }
            }
            // One entry per run of jobs decided in the same epoch.
            let mut groups: Vec<(u64, Vec<Job>)> = Vec::new();
            for job in jobs {
                match groups.last_mut() {
                    Some((epoch, group)) if *epoch == job.epoch => group.push(job),
                    _ => groups.push((job.epoch, vec![job])),
                }
            }
            for (epoch, group) in groups {
                let changes: Vec<_> = group
                    .iter()
                    .flat_map(|j| j.changes.iter())
                    .filter_map(to_wire)
                    .collect();
                let jobs = group.len();
                let replies: Vec<Reply> = group.into_iter().flat_map(|j| j.replies).collect();
                let deadline = Instant::now() + log.commit_timeout;
                if changes.is_empty() {
                    // A barrier: answered once everything before it is.
                    let _ = pending.send(Pending {
                        rx: None,
                        replies,
                        epoch,
                        proposed: Instant::now(),
                        deadline,
                        _slot: None,
                    });
                    continue;
                }
                log.batches.fetch_add(1, Ordering::Relaxed);
                self.shared.metrics.batch_size.record(jobs as f64);
                match log
                    .raft
                    .client_write_ff(Request::Changes { epoch, changes })
                    .await
                {
                    Ok(rx) => {
                        // A second epoch group in one gathering (rare: a
                        // promotion) goes without a slot.
                        let _ = pending.send(Pending {
                            rx: Some(rx),
                            replies,
                            epoch,
                            proposed: Instant::now(),
                            deadline,
                            _slot: slot.take(),
                        });
                    }
                    Err(e) => {
                        let failed: Durable = Err(Arc::new(StoreError::Replication(e.to_string())));
                        for reply in replies {
                            reply(failed.clone());
                        }
                    }
                }
            }
        }
    }

    async fn run_replier(self, mut pending: mpsc::UnboundedReceiver<Pending>) {
        let timeout = self.shared.config.commit_timeout;
        while let Some(p) = pending.recv().await {
            let entry = p.rx.is_some();
            let result: Result<(), String> = match p.rx {
                None => Ok(()),
                Some(rx) => match tokio::time::timeout_at(p.deadline, rx).await {
                    Err(_) => Err(format!(
                        "not committed within {timeout:?}: the cluster may have lost its majority"
                    )),
                    Ok(Err(_)) => Err("the Raft node stopped".into()),
                    Ok(Ok(Err(e))) => Err(e.to_string()),
                    Ok(Ok(Ok(resp))) => match resp.data {
                        Response::Stale { .. } => {
                            Err("decided by a table of an earlier leadership".into())
                        }
                        _ => Ok(()),
                    },
                },
            };
            match &result {
                Err(why) => self.doubt(p.epoch, why),
                Ok(()) if entry => self
                    .shared
                    .metrics
                    .commit_duration
                    .record(p.proposed.elapsed()),
                Ok(()) => {}
            }
            let durable: Durable = result.map_err(|why| Arc::new(StoreError::Replication(why)));
            for reply in p.replies {
                reply(durable.clone());
            }
        }
    }

    /// A write of `epoch` failed or timed out: its outcome is unknown, so
    /// the table of that epoch may differ from the log. Stop deciding; the
    /// leadership task rebuilds the table from the log if still leader.
    fn doubt(&self, epoch: u64, why: &str) {
        let coordinator = self.coordinator();
        if coordinator.epoch() == Some(epoch) {
            tracing::warn!(epoch, %why, "a write failed; rebuilding the table from the log");
            coordinator.demote();
            self.shared.kick.notify_one();
        }
    }

    async fn run_linearizer(self) {
        let log = self.shared.log.clone();
        loop {
            tokio::select! {
                _ = log.linearizer.wake.notified() => {}
                _ = self.shared.stop.cancelled() => return,
            }
            // Everyone who joined this round arrived before the check starts.
            let Some(round) = log.linearizer.next.lock().take() else {
                continue;
            };
            let result = match tokio::time::timeout(
                log.commit_timeout,
                log.raft.ensure_linearizable(),
            )
            .await
            {
                Err(_) => Err("no majority confirmed the leadership in time".to_owned()),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(_)) => Ok(()),
            };
            let _ = round.send(Some(result));
        }
    }

    async fn run_leadership(self) {
        let mut metrics = self.shared.raft.metrics();
        let coordinator = self.coordinator().clone();
        loop {
            let leading = {
                let m = metrics.borrow_and_update();
                m.state == ServerState::Leader && m.current_leader == Some(self.shared.id)
            };
            let mut retry = false;
            if leading && !coordinator.is_ready() {
                if let Err(why) = self.promote(&coordinator).await {
                    tracing::warn!(%why, "taking over as leader failed; retrying");
                    retry = true;
                }
            } else if !leading && coordinator.is_ready() {
                coordinator.demote();
            }
            let pause = if retry {
                self.shared.config.heartbeat
            } else {
                Duration::from_secs(1)
            };
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = self.shared.kick.notified() => {}
                _ = tokio::time::sleep(pause) => {}
                _ = self.shared.stop.cancelled() => return,
            }
        }
    }

    /// Appends `request` and waits (up to the commit timeout) until it is
    /// applied here.
    async fn write(&self, request: Request) -> Result<Response, String> {
        let write = self.shared.raft.client_write(request);
        let resp = tokio::time::timeout(self.shared.config.commit_timeout, write)
            .await
            .map_err(|_| {
                format!(
                    "not committed within {:?}: the cluster may have lost its majority",
                    self.shared.config.commit_timeout
                )
            })?
            .map_err(|e| e.to_string())?;
        Ok(resp.data)
    }

    /// The applied key set, if the epoch is still `epoch`.
    fn applied_keys(&self, epoch: u64) -> Result<Option<KeySet>, String> {
        let applied = self.shared.log.applied.lock();
        if applied.epoch != epoch {
            return Err("another leader took over meanwhile".into());
        }
        Ok(applied.key_set().map(|(set, _)| set))
    }

    async fn promote(&self, coordinator: &Coordinator) -> Result<(), String> {
        let resp = self
            .write(Request::Promote {
                node: self.shared.id,
            })
            .await
            .map_err(|e| format!("the Promote entry failed: {e}"))?;
        let Response::Promoted { epoch } = resp else {
            return Err(format!("unexpected answer to Promote: {resp:?}"));
        };
        // Whichever node leads signs with the cluster's key set: a cluster
        // without one yet (its first leader) takes this node's own.
        let set = match self.applied_keys(epoch)? {
            Some(set) => set,
            None => {
                let text = KeyText(self.shared.keys.set().encode());
                let resp = self
                    .write(Request::Keys { text, base: 0 })
                    .await
                    .map_err(|e| format!("proposing this node's keys failed: {e}"))?;
                if !matches!(resp, Response::KeysSet { .. } | Response::KeysStale { .. }) {
                    return Err(format!("unexpected answer to Keys: {resp:?}"));
                }
                tracing::info!(signing = %self.shared.keys.set().signer().id(), "this node's keys are the cluster's key set");
                self.applied_keys(epoch)?
                    .ok_or("the cluster's key set is unreadable")?
            }
        };
        // The state machine took it on when it was applied; this covers a
        // key file that differs from the log (restored from a backup).
        let keys = self.shared.keys.clone();
        let adopted = tokio::task::spawn_blocking(move || keys.adopt(set))
            .await
            .map_err(|e| format!("taking on the key set failed: {e}"))?;
        if let Err(e) = adopted {
            tracing::error!(error = %e, "the cluster's key set signs but is not in the key file");
        }
        let loaded = {
            let applied = self.shared.log.applied.lock();
            if applied.epoch != epoch {
                return Err("another leader took over meanwhile".into());
            }
            applied.to_loaded()
        };
        coordinator.promote(epoch, loaded);
        Ok(())
    }

    /// Whether this node's keys are the cluster's key set as it has applied
    /// it. Not yet on a fresh or joining node (its keys are its own), nor
    /// on a restarted one whose key file is newer than its snapshot until it
    /// has applied the log again.
    pub fn has_key_set(&self) -> bool {
        let applied = self.shared.log.applied.lock().keys.clone();
        applied.is_some_and(|text| text.0 == self.shared.keys.set().encode())
    }

    /// Changes the cluster's signing keys (`keys rotate` / `retire`):
    /// `change` makes the next set from the one in force, the set goes
    /// through the log, and the answer comes once it is applied here, so
    /// this node (the leader) already signs with it. One change at a time;
    /// a change that raced another one (on another leader) is refused as
    /// [`KeysError::Raced`]. Leader only.
    pub async fn change_keys<T>(
        &self,
        change: impl FnOnce(&KeySet) -> Result<(KeySet, T), KeysError>,
    ) -> Result<T, KeysError> {
        let _one_at_a_time = self.shared.key_change.lock().await;
        if !self.coordinator().is_ready() {
            return Err(KeysError::NotReplicated(
                "this node is not the leader, or is still taking over".into(),
            ));
        }
        let Some((current, base)) = self.shared.log.applied.lock().key_set() else {
            return Err(KeysError::NotReplicated(
                "the cluster has no key set yet".into(),
            ));
        };
        let (next, out) = change(&current)?;
        if next == current {
            // Retiring a retired key: nothing to replicate.
            return Ok(out);
        }
        let text = KeyText(next.encode());
        match self
            .write(Request::Keys { text, base })
            .await
            .map_err(KeysError::NotReplicated)?
        {
            Response::KeysSet { .. } => Ok(out),
            Response::KeysStale { .. } => Err(KeysError::Raced),
            other => Err(KeysError::NotReplicated(format!(
                "unexpected answer: {other:?}"
            ))),
        }
    }

    /// Times this node has seen a new leader since it started.
    pub fn leader_changes(&self) -> u64 {
        self.shared.leader_changes.load(Ordering::Relaxed)
    }

    /// This node's view of the cluster.
    pub fn status(&self) -> crate::proto::ClusterStatusResponse {
        let m = self.shared.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let matched = m.replication.clone().unwrap_or_default();
        let members = membership
            .nodes()
            .map(|(id, node)| {
                let at = matched.get(id).cloned().flatten();
                crate::proto::Member {
                    node_id: *id,
                    address: node.addr.clone(),
                    voter: voters.contains(id),
                    matched_index: at.map_or(0, |l| l.index),
                    matched_known: matched.contains_key(id),
                }
            })
            .collect();
        let leader = m.current_leader;
        crate::proto::ClusterStatusResponse {
            node_id: self.shared.id,
            state: format!("{:?}", m.state),
            term: m.current_term,
            leader_id: leader.unwrap_or(0),
            leader_address: leader
                .and_then(|l| membership.get_node(&l))
                .map(|n| n.addr.clone())
                .unwrap_or_default(),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            members,
            serving: self.coordinator().is_ready(),
        }
    }

    /// Adds `id` at `addr` as a learner, waits until it has caught up, then
    /// makes it a voter. Leader only (the cluster API forwards to it).
    pub async fn add_member(&self, id: NodeId, addr: String) -> Result<(), MembershipError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.shared.import_pending.load(Ordering::SeqCst) {
            if Instant::now() > deadline {
                return Err(MembershipError::ImportPending);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let raft = &self.shared.raft;
        raft.add_learner(id, BasicNode { addr }, true).await?;
        raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await?;
        Ok(())
    }

    /// Removes `id` from the voters and the learners. Leader only.
    pub async fn remove_member(&self, id: NodeId) -> Result<(), MembershipError> {
        let raft = &self.shared.raft;
        raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await?;
        Ok(())
    }

    /// The voters and learners now.
    pub fn membership(&self) -> (Vec<NodeId>, Vec<NodeId>) {
        let m = self.shared.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        (
            membership.voter_ids().collect(),
            membership.learner_ids().collect(),
        )
    }
}

/// A membership change failed.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// openraft refused or could not commit it.
    #[error("the membership change failed: {0}")]
    Raft(Box<RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>>),
    /// The state imported from a single node is not in a snapshot yet.
    #[error("the store this node imported is not in a snapshot yet (a new member would miss it); retry in a few seconds")]
    ImportPending,
}

impl From<RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>> for MembershipError {
    fn from(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> Self {
        MembershipError::Raft(Box::new(e))
    }
}

/// Keeps `grpc.health.v1` in step with the cluster: LeaseService is
/// SERVING only while this node knows a leader. Also counts leader changes.
/// Ends on `stop`.
pub async fn report_health(
    node: Node,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    use crate::proto::lease_service_server::LeaseServiceServer;
    use crate::service::LeaseApi;
    let mut metrics = node.raft().metrics();
    let mut serving = None;
    let mut last_leader = None;
    loop {
        let leader = metrics.borrow().current_leader;
        if leader.is_some() && leader != last_leader {
            node.shared.leader_changes.fetch_add(1, Ordering::Relaxed);
            last_leader = leader;
        }
        let known = node.leader().is_some();
        if serving != Some(known) {
            if known {
                health.set_serving::<LeaseServiceServer<LeaseApi>>().await;
            } else {
                health
                    .set_not_serving::<LeaseServiceServer<LeaseApi>>()
                    .await;
            }
            serving = Some(known);
        }
        tokio::select! {
            changed = metrics.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Reads a single node's store in `data_dir` (and closes it), for a node
/// that starts a cluster from it.
fn import_single_node(
    data_dir: &Path,
    coordinator: &Config,
) -> Result<crate::store::Loaded, NodeError> {
    let failed = |e: StoreError| NodeError::Raft(format!("reading the single-node store: {e}"));
    let store = crate::store::Store::open(data_dir, coordinator.store.clone()).map_err(failed)?;
    let loaded = store.load().map_err(failed)?;
    store.close().map_err(failed)?;
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_state_is_snapshotted_only_after_as_much_log() {
        // A small state: the entry count decides.
        assert!(!snapshot_due(19_999, 20_000, 10 << 20, 1 << 20));
        assert!(snapshot_due(20_000, 20_000, 10 << 20, 1 << 20));
        // A 200 MB state: 20,000 entries of 30 MB are not enough.
        assert!(!snapshot_due(20_000, 20_000, 30 << 20, 200 << 20));
        assert!(snapshot_due(150_000, 20_000, 200 << 20, 200 << 20));
        // No snapshot yet: the entry count alone.
        assert!(snapshot_due(20_000, 20_000, 0, 0));
    }
}
