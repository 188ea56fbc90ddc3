//! What the lease page and `/metrics` show of a cluster: one read-only
//! trait, [`ClusterView`], and the plain data it returns.
//!
//! A single coordinator has no cluster: [`SingleNode`] returns `None`, the
//! page hides its members panel and `/metrics` has no `leasehold_cluster_*`
//! series. A replicated coordinator implements [`ClusterView`] over its
//! consensus engine (role, term, indices, members and their lag) and hands
//! it to [`crate::http::HttpServer`]; nothing else needs to change, since
//! both the page's feed and the exposition already read from here.

use std::sync::Arc;

use serde::Serialize;

/// A member's role in its cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Accepts writes and replicates them.
    Leader,
    /// Replicates the leader's log.
    Follower,
    /// Asking for votes.
    Candidate,
    /// Replicates but does not vote.
    Learner,
}

impl Role {
    /// Every role, for the one-hot `leasehold_cluster_role` gauge.
    pub const ALL: [Role; 4] = [Role::Leader, Role::Follower, Role::Candidate, Role::Learner];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
        }
    }
}

/// One member as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    /// Its id in the cluster.
    pub id: String,
    /// Where it serves gRPC.
    pub addr: String,
    /// Its role, if known.
    pub role: Option<Role>,
    /// Entries it is behind the leader (known on the leader only).
    pub replication_lag: Option<u64>,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    /// This node's id.
    pub node_id: String,
    /// This node's role.
    pub role: Role,
    /// The current term.
    pub term: u64,
    /// The leader's id, if one is known.
    pub leader: Option<String>,
    /// The highest log index known committed.
    pub commit_index: u64,
    /// The highest log index applied to the lease table.
    pub applied_index: u64,
    /// Leader changes this node has seen.
    pub leader_changes: u64,
    /// Every member, this node included.
    pub members: Vec<Member>,
}

/// Where the page and `/metrics` read the cluster's status from.
pub trait ClusterView: Send + Sync + 'static {
    /// The cluster now; `None` on a single node.
    fn status(&self) -> Option<ClusterStatus>;
}

/// A coordinator without a cluster.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleNode;

impl ClusterView for SingleNode {
    fn status(&self) -> Option<ClusterStatus> {
        None
    }
}

/// The view a server uses when it is given none.
pub fn single_node() -> Arc<dyn ClusterView> {
    Arc::new(SingleNode)
}
