//! The recent grants per resource a cluster node has applied: what `leases
//! history` answers on a cluster.
//!
//! A single node keeps its history in sled next to the leases. A cluster
//! node derives it from the committed log as it applies it, in memory, and
//! does not replicate it: it is an operator's view, not state a decision
//! depends on, so it stays out of the log's entries and the snapshots (which
//! every node writes and sends) and costs nothing to replicate. What that
//! means for an operator:
//!
//! - The history covers the entries this node applied since it started
//!   (the log after its snapshot is applied again at a start). A node that
//!   installed a snapshot keeps what it had, with a gap where the snapshot
//!   covered.
//! - It is bounded: [`PER_RESOURCE`] grants per resource (a single node's
//!   default too), for the [`RESOURCES`] most recently granted resources.
//!
//! A follower forwards `History` to the leader, like every admin call.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::wire::{end_kind, WireRecord};
use crate::lease::FencingToken;
use crate::store::GrantRecord;

/// Grants kept per resource, newest last.
pub const PER_RESOURCE: usize = 16;

/// Resources whose grants are kept: beyond it, the one granted least
/// recently is forgotten.
pub const RESOURCES: usize = 100_000;

/// The recent grants of the most recently granted resources.
#[derive(Debug, Clone, Default)]
pub struct RecentGrants {
    /// Per resource, its last grants, oldest first.
    grants: HashMap<String, VecDeque<GrantRecord>>,
    /// Resources by the token of their last grant (tokens are unique and
    /// only grow), so the least recently granted is the first.
    by_last: BTreeMap<u64, String>,
}

impl RecentGrants {
    /// Records a grant.
    pub fn granted(&mut self, r: &WireRecord) {
        let list = self.grants.entry(r.resource.clone()).or_default();
        if let Some(last) = list.back() {
            if last.token.0 >= r.token {
                return; // applied again (a restart replays the log): known
            }
            self.by_last.remove(&last.token.0);
        }
        list.push_back(GrantRecord {
            token: FencingToken(r.token),
            holder: r.holder.clone(),
            ttl: r.ttl,
            acquired_unix_ms: r.acquired_unix_ms,
            ended: None,
        });
        if list.len() > PER_RESOURCE {
            list.pop_front();
        }
        self.by_last.insert(r.token, r.resource.clone());
        if self.grants.len() > RESOURCES {
            if let Some((_, oldest)) = self.by_last.pop_first() {
                self.grants.remove(&oldest);
            }
        }
    }

    /// Records how and when a grant ended.
    pub fn ended(&mut self, r: &WireRecord, how: u8, at_unix_ms: u64) {
        let Some(how) = end_kind(how) else { return };
        if let Some(g) = self
            .grants
            .get_mut(&r.resource)
            .and_then(|list| list.iter_mut().rev().find(|g| g.token.0 == r.token))
        {
            g.ended = Some((how, at_unix_ms));
        }
    }

    /// The last grants on `resource`, newest first, at most `limit`.
    pub fn history(&self, resource: &str, limit: usize) -> Vec<GrantRecord> {
        self.grants.get(resource).map_or_else(Vec::new, |list| {
            list.iter().rev().take(limit).cloned().collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::lease::EndKind;

    fn record(resource: &str, token: u64) -> WireRecord {
        WireRecord {
            resource: resource.into(),
            lease_id: [0; 16],
            token,
            holder: "h".into(),
            ttl: Duration::from_secs(1),
            acquired_unix_ms: token,
            request_id: None,
        }
    }

    #[test]
    fn history_is_newest_first_bounded_and_marks_ends() {
        let mut h = RecentGrants::default();
        for t in 1..=20 {
            h.granted(&record("r", t));
        }
        h.granted(&record("r", 20)); // a replay changes nothing
        h.ended(&record("r", 19), 2, 99);
        let got = h.history("r", 100);
        let tokens: Vec<u64> = got.iter().map(|g| g.token.0).collect();
        assert_eq!(tokens, (5..=20).rev().collect::<Vec<_>>());
        assert_eq!(got[1].ended, Some((EndKind::Revoked, 99)));
        assert_eq!(got[0].ended, None);
        assert_eq!(h.history("r", 2).len(), 2);
        assert!(h.history("other", 10).is_empty());
    }

    #[test]
    fn the_least_recently_granted_resource_is_forgotten_first() {
        let mut h = RecentGrants::default();
        for i in 0..=RESOURCES as u64 {
            h.granted(&record(&format!("r{i}"), i + 1));
        }
        assert!(h.history("r0", 1).is_empty());
        assert_eq!(h.history("r1", 1).len(), 1);
        assert_eq!(h.grants.len(), RESOURCES);
        assert_eq!(h.by_last.len(), RESOURCES);
    }
}
