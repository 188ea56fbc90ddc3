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
//! given its full TTL from the promotion, as a restart does.
//!
//! - [`log_store`]: the Raft log, an append-only file of our own (fsync per append).
//! - [`state_machine`]: the applied state, its snapshots (a file) and the epoch check.
//! - [`network`]: the Raft RPCs over tonic, both ends.
//! - [`node`]: starting a node, forming the cluster, promotion and demotion,
//!   the proposer that batches the coordinator's jobs into entries, and the
//!   linearizer that batches leadership checks.
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
pub mod state_machine;
pub mod view;
pub mod wire;

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub use node::{ClusterConfig, Node, NodeError};

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
}
