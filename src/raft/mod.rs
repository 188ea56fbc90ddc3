//! The replicated coordinator: openraft's storage, state machine and
//! network traits, and the node that ties them to the [`Coordinator`].
//!
//! With `--peers`, the leader's [`Coordinator`] decides exactly as a single
//! node does (its [`LeaseTable`](crate::state::LeaseTable) is the only one
//! that decides grants, tokens and expiry), but the changes it decides go
//! into the Raft log instead of the local write-ahead log, and every reply
//! that reveals one waits until that entry is committed (on a majority's
//! disk) and applied. Every node applies the committed changes to
//! [`Applied`](state_machine::Applied), the same records a single node
//! keeps on disk; a node that becomes leader appends a `Promote` entry and,
//! once it is applied, rebuilds its table from that state with every lease
//! given its full TTL from the promotion, as a restart does. The signing
//! keys are cluster state too (`Keys` entries): a new leader takes on the
//! applied key set (or, if there is none yet, proposes its own) before it
//! decides, so whichever node leads signs with the same keys.
//!
//! - [`log_store`]: the Raft log, a preallocated file of our own (fsync per append).
//! - [`state_machine`]: the applied state (the signing keys included), its
//!   snapshots (a file) and the epoch check.
//! - [`network`]: the Raft RPCs over tonic, both ends.
//! - [`node`]: starting a node, forming the cluster, promotion and demotion,
//!   the proposer that batches the coordinator's jobs into entries, and the
//!   linearizer that batches leadership checks.
//! - [`recent`]: the recent grants per resource, what `leases history` answers.
//! - [`forward`]: a follower forwards LeaseService and AdminService calls to the leader.
//! - [`view`]: the cluster as the lease page and `/metrics` show it.
//! - [`wire`]: the serde form of the table's changes.
//!
//! [`Coordinator`]: crate::coordinator::Coordinator

pub mod cluster_api;
pub mod forward;
pub mod log_store;
pub mod network;
pub mod node;
pub mod recent;
pub mod state_machine;
pub mod view;
pub mod wire;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use node::{ClusterConfig, Node, NodeError};

/// Whether the Raft data in `dir` holds a key set of the cluster's (in its
/// snapshot, or a `Keys` entry of its log). A node that lost its key file
/// may then start and rewrite the file from it (`server::open`); without
/// one, a new key would be a key storage does not know.
pub fn holds_key_set(dir: &std::path::Path) -> std::io::Result<bool> {
    let snapshot = state_machine::StateMachine::open(dir, None)?;
    if snapshot.applied().lock().keys.is_some() {
        return Ok(true);
    }
    // Opening creates the file, which would make the node look not fresh.
    if !dir.join("raft-log").exists() {
        return Ok(false);
    }
    let log = log_store::LogStore::open(dir, metrics::Histogram::noop())?;
    Ok(log.any_request(|r| matches!(r, Request::Keys { .. })))
}

/// A node's id in the cluster (`--node-id`).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// openraft's types for Leasehold.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft instance of a Leasehold node.
pub type Raft = openraft::Raft<TypeConfig>;

/// What an entry of the log asks the state machine to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// A node became leader: from this entry on, only changes decided by
    /// its table (tagged with this entry's index, the new epoch) apply.
    Promote {
        /// The new leader.
        node: NodeId,
    },
    /// Changes the leader's table decided in `epoch`.
    Changes {
        /// The index of the `Promote` entry the deciding table was rebuilt at.
        epoch: u64,
        /// In the order the table made them.
        changes: Vec<wire::WireChange>,
    },
    /// The cluster's signing keys from now on: every node takes them on
    /// when the entry is applied. Applies only if the key set in force is
    /// still the one this set was made from, so two changes proposed at
    /// once never lose a key.
    Keys {
        /// The whole set ([`KeySet::encode`](crate::keys::KeySet::encode)),
        /// the signing key's secret included.
        text: KeyText,
        /// The index of the entry that set the keys this set was made from;
        /// 0: the cluster has none yet (a new leader's own keys).
        base: u64,
    },
}

/// Creates (or truncates) `path` for writing, readable by its owner only:
/// the Raft log and snapshots hold the signing key's secret.
/// Meant for temporary files that are renamed into place: one left over
/// from an older version is removed first, as it would keep its mode.
pub(crate) fn private_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o.open(path)
}

/// A key set's text form in the log and the applied state. It holds a
/// secret, so its `Debug` shows only its length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyText(pub String);

impl std::fmt::Debug for KeyText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyText({} bytes, secret)", self.0.len())
    }
}

/// What applying an entry gave.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// A membership change or a blank entry.
    Noop,
    /// The changes are applied.
    Applied,
    /// A new epoch starts here.
    Promoted {
        /// The epoch (this entry's log index).
        epoch: u64,
    },
    /// The changes were decided by a table of an earlier epoch: ignored.
    Stale {
        /// The epoch the changes carried.
        epoch: u64,
        /// The epoch in force.
        current: u64,
    },
    /// The key set is in force from here (this entry's log index).
    KeysSet {
        /// The entry's index, the base of the next change.
        index: u64,
    },
    /// The key set was made from one no longer in force: ignored.
    KeysStale {
        /// The base the entry carried.
        base: u64,
        /// The index of the entry that set the keys in force.
        current: u64,
    },
    /// The key set's text is not a key set: ignored.
    KeysRefused {
        /// Why.
        why: String,
    },
}
