//! The cluster as the lease page and `/metrics` show it: [`ClusterView`]
//! over a Raft node, read from openraft's metrics at the moment of asking
//! (a scrape or the page's feed), so nothing is recorded on the write path.

use std::collections::BTreeSet;

use openraft::ServerState;

use super::Node;
use crate::cluster_view::{ClusterStatus, ClusterView, Member, Role};

impl ClusterView for Node {
    fn status(&self) -> Option<ClusterStatus> {
        let m = self.raft().metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let role = match m.state {
            ServerState::Leader => Role::Leader,
            ServerState::Candidate => Role::Candidate,
            ServerState::Learner => Role::Learner,
            // A node shutting down shows the role it is leaving.
            ServerState::Follower | ServerState::Shutdown => Role::Follower,
        };
        let last = m.last_log_index.unwrap_or(0);
        let applied = m.last_applied.map_or(0, |l| l.index);
        // Only the leader knows what each member has: the others report no lag.
        let matched = m.replication.clone().unwrap_or_default();
        let matched_of = |id: &u64| -> Option<u64> {
            if *id == m.id {
                return Some(last);
            }
            matched.get(id).map(|l| l.map_or(0, |l| l.index))
        };
        // The leader's commit index is the highest index a majority of the
        // voters hold; elsewhere, what this node has applied (it applies
        // whatever it learns is committed).
        let commit_index = if role == Role::Leader && !voters.is_empty() {
            let mut held: Vec<u64> = voters
                .iter()
                .map(|id| matched_of(id).unwrap_or(0))
                .collect();
            held.sort_unstable_by(|a, b| b.cmp(a));
            held[voters.len() / 2].max(applied)
        } else {
            applied
        };
        let members = membership
            .nodes()
            .map(|(id, node)| Member {
                id: id.to_string(),
                addr: node.addr.clone(),
                role: Some(if Some(*id) == m.current_leader {
                    Role::Leader
                } else if *id == m.id {
                    role
                } else if voters.contains(id) {
                    Role::Follower
                } else {
                    Role::Learner
                }),
                replication_lag: (role == Role::Leader)
                    .then(|| matched_of(id).map(|at| last.saturating_sub(at)))
                    .flatten(),
            })
            .collect();
        Some(ClusterStatus {
            node_id: m.id.to_string(),
            role,
            term: m.current_term,
            leader: m.current_leader.map(|l| l.to_string()),
            commit_index,
            applied_index: applied,
            leader_changes: self.leader_changes(),
            members,
        })
    }
}
