//! The applied state: what every node learns from the committed log, and
//! its snapshots.
//!
//! [`Applied`] holds the same things a single node keeps on disk (live lease
//! records, idempotency keys, the highest token) plus the epoch: the index
//! of the last `Promote` entry. Changes decided by a table of an earlier
//! epoch (a deposed leader's, or one whose write came back in doubt) are
//! ignored, so a table rebuilt at a promotion and the applied state never
//! part ways. Applying is deterministic: it reads no clock and draws
//! nothing.
//!
//! The applied state also holds the cluster's signing keys (the last
//! `Keys` entry, or a snapshot's). [`StateMachine`] hands each new set to
//! the node's [`Keys`] once the entries of a batch are applied (and after
//! installing a snapshot), so every node signs and serves the set the log
//! says, and its key file holds it for the next start. A restart takes on
//! the snapshot's set before the log after it, so a node rebuilds a lost
//! key file from its own Raft data.
//!
//! The applied state lives in memory; a snapshot is its JSON in one file
//! (`DATA_DIR/raft/raft-snapshot`, mode 0600 as it holds the signing key's
//! secret, written to a temporary file, synced and renamed). A restart
//! loads the snapshot and openraft re-applies the log after it.

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::recent::RecentGrants;
use super::wire::{WireChange, WireRecord, WireRequest};
use super::{KeyText, NodeId, Request, Response, TypeConfig};
use crate::keys::{KeySet, Keys};
use crate::store::Loaded;

/// Everything the committed log says, up to `last_applied`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    /// The last entry applied.
    pub last_applied: Option<LogId<NodeId>>,
    /// The last membership applied.
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// The index of the last `Promote` entry: only changes of this epoch apply.
    pub epoch: u64,
    /// Every token ever granted is at or below this.
    pub last_token: u64,
    /// Live leases by resource. Persistent maps (`imbl`): a snapshot takes
    /// a copy in O(1) under the lock and encodes it without holding it.
    pub leases: imbl::OrdMap<String, WireRecord>,
    /// Idempotency keys.
    pub requests: imbl::HashMap<String, WireRequest>,
    /// The cluster's signing keys; `None` until the first leader proposes
    /// its own (snapshots from before replicated keys have none).
    #[serde(default)]
    pub keys: Option<KeyText>,
    /// The index of the entry that set `keys` (0: none yet).
    #[serde(default)]
    pub keys_index: u64,
    /// The recent grants this node applied (not in snapshots: see [`recent`](super::recent)).
    #[serde(skip)]
    pub recent: RecentGrants,
}

impl Applied {
    /// Applies one entry's request; `index` is the entry's log index.
    pub fn apply(&mut self, index: u64, request: &Request) -> Response {
        match request {
            Request::Promote { .. } => {
                self.epoch = index;
                Response::Promoted { epoch: index }
            }
            Request::Changes { epoch, .. } if *epoch != self.epoch => Response::Stale {
                epoch: *epoch,
                current: self.epoch,
            },
            Request::Changes { changes, .. } => {
                for change in changes {
                    self.apply_change(change);
                }
                Response::Applied
            }
            Request::Keys { base, .. } if *base != self.keys_index => Response::KeysStale {
                base: *base,
                current: self.keys_index,
            },
            Request::Keys { text, .. } => match KeySet::decode(&text.0) {
                Ok(_) => {
                    self.keys = Some(text.clone());
                    self.keys_index = index;
                    Response::KeysSet { index }
                }
                Err(e) => Response::KeysRefused { why: e.to_string() },
            },
        }
    }

    /// What a snapshot holds: everything but this node's own history (a
    /// cheap copy: the maps share their nodes).
    fn to_snapshot(&self) -> Applied {
        Applied {
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            epoch: self.epoch,
            last_token: self.last_token,
            leases: self.leases.clone(),
            requests: self.requests.clone(),
            keys: self.keys.clone(),
            keys_index: self.keys_index,
            recent: RecentGrants::default(),
        }
    }

    /// The cluster's key set and the index of the entry that set it.
    pub fn key_set(&self) -> Option<(KeySet, u64)> {
        let text = self.keys.as_ref()?;
        match KeySet::decode(&text.0) {
            Ok(set) => Some((set, self.keys_index)),
            Err(e) => {
                // Checked when applied: only a damaged snapshot gets here.
                tracing::error!(error = %e, "the applied key set is unreadable");
                None
            }
        }
    }

    fn apply_change(&mut self, change: &WireChange) {
        match change {
            WireChange::Granted(r) => {
                self.last_token = self.last_token.max(r.token);
                if let Some(key) = &r.request_id {
                    self.requests.insert(
                        key.clone(),
                        WireRequest {
                            resource: r.resource.clone(),
                            holder: r.holder.clone(),
                            ttl: r.ttl,
                            lease_id: r.lease_id,
                            token: r.token,
                            recorded_unix_ms: r.acquired_unix_ms,
                        },
                    );
                }
                let newer = self
                    .leases
                    .get(&r.resource)
                    .is_none_or(|old| old.token < r.token);
                if newer {
                    self.leases.insert(r.resource.clone(), r.clone());
                }
                self.recent.granted(r);
            }
            WireChange::TtlChanged(r) => {
                if let Some(live) = self.leases.get_mut(&r.resource) {
                    if live.lease_id == r.lease_id {
                        live.ttl = r.ttl;
                    }
                }
            }
            WireChange::Ended {
                record,
                how,
                at_unix_ms,
            } => {
                self.recent.ended(record, *how, *at_unix_ms);
                let same = self
                    .leases
                    .get(&record.resource)
                    .is_some_and(|live| live.lease_id == record.lease_id);
                if same {
                    self.leases.remove(&record.resource);
                }
            }
            WireChange::RequestsCollected(keys) => {
                for key in keys {
                    self.requests.remove(key);
                }
            }
        }
    }

    /// The state of a single node's store (`serve` without `--peers`), for
    /// a node that starts a cluster from it.
    pub fn import(&mut self, loaded: &Loaded) {
        self.last_token = self.last_token.max(loaded.last_token);
        for r in &loaded.leases {
            self.leases
                .insert(r.resource.as_str().to_owned(), WireRecord::from_record(r));
        }
        for (key, r) in &loaded.requests {
            self.requests.insert(
                key.as_str().to_owned(),
                WireRequest {
                    resource: r.resource.as_str().to_owned(),
                    holder: r.holder.as_str().to_owned(),
                    ttl: r.ttl,
                    lease_id: r.lease_id.0,
                    token: r.token.0,
                    recorded_unix_ms: r.recorded_unix_ms,
                },
            );
        }
    }

    /// What a new leader rebuilds its table from (as a restart reads its store).
    pub fn to_loaded(&self) -> Loaded {
        let mut loaded = Loaded {
            last_token: self.last_token,
            ..Loaded::default()
        };
        for r in self.leases.values() {
            match r.to_record() {
                Ok(r) => loaded.leases.push(r),
                Err(e) => tracing::error!(error = %e, "skipping a lease record"),
            }
        }
        for (key, r) in &self.requests {
            match r.to_record(key) {
                Ok(r) => loaded.requests.push(r),
                Err(e) => tracing::error!(error = %e, "skipping an idempotency key"),
            }
        }
        loaded
    }
}

#[derive(Debug, Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    data: Vec<u8>,
}

/// openraft's state machine over [`Applied`] (cheap to clone).
#[derive(Debug, Clone)]
pub struct StateMachine {
    applied: Arc<Mutex<Applied>>,
    path: PathBuf,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    built: Arc<AtomicU64>,
    /// The node's signing keys, which take on every applied key set.
    keys: Option<Keys>,
}

fn sm_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageError::IO {
        source: StorageIOError::write_state_machine(AnyError::new(&e)),
    }
}

impl StateMachine {
    /// The current snapshot's size in bytes (0: none yet).
    pub fn snapshot_len(&self) -> u64 {
        self.current
            .lock()
            .as_ref()
            .map_or(0, |s| s.data.len() as u64)
    }

    /// Opens the state machine in `dir`, starting from its snapshot if any.
    /// Each key set applied from then on is handed to `keys`.
    pub fn open(dir: &Path, keys: Option<Keys>) -> std::io::Result<Self> {
        let path = dir.join("raft-snapshot");
        let mut applied = Applied::default();
        let mut current = None;
        if path.exists() {
            let bytes = std::fs::read(&path)?;
            let (meta, data) = split_snapshot_file(&bytes).ok_or_else(|| {
                std::io::Error::other(format!(
                    "the snapshot {} is damaged; move it aside (the node then catches up from the leader)",
                    path.display()
                ))
            })?;
            applied = serde_json::from_slice(data).map_err(std::io::Error::other)?;
            current = Some(StoredSnapshot {
                meta,
                data: data.to_vec(),
            });
        }
        let keys_text = applied.keys.clone();
        let sm = StateMachine {
            applied: Arc::new(Mutex::new(applied)),
            path,
            current: Arc::new(Mutex::new(current)),
            built: Arc::default(),
            keys,
        };
        // The snapshot's set is the cluster's as of the snapshot (later
        // ones follow as openraft re-applies the log): a key file that was
        // lost, or is behind, is rewritten from it.
        if let Some(text) = keys_text {
            sm.adopt(&text);
        }
        Ok(sm)
    }

    /// Hands the applied key set to the node's keys (file I/O when it is new).
    fn adopt(&self, text: &KeyText) {
        let Some(keys) = &self.keys else { return };
        match KeySet::decode(&text.0) {
            Ok(set) => {
                if let Err(e) = keys.adopt(set) {
                    tracing::error!(error = %e, "the cluster's key set is in force but not in the key file; it is taken on again at the next start");
                }
            }
            Err(e) => tracing::error!(error = %e, "the applied key set is unreadable"),
        }
    }

    /// The applied state, shared with the node (it reads it at promotion).
    pub fn applied(&self) -> Arc<Mutex<Applied>> {
        self.applied.clone()
    }

    fn save(&self, snapshot: &StoredSnapshot) -> std::io::Result<()> {
        let meta = serde_json::to_vec(&snapshot.meta).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("tmp");
        let mut f = super::private_file(&tmp)?;
        f.write_all(&(meta.len() as u32).to_le_bytes())?;
        f.write_all(&meta)?;
        f.write_all(&snapshot.data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

fn split_snapshot_file(bytes: &[u8]) -> Option<(SnapshotMeta<NodeId, BasicNode>, &[u8])> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let meta = serde_json::from_slice(bytes.get(4..4 + len)?).ok()?;
    Some((meta, bytes.get(4 + len..)?))
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // The lock is held only for the copy (O(1) for the maps), so
        // entries keep applying while a large state is encoded and written,
        // on a blocking thread, off the runtime's two workers.
        let state = self.applied.lock().to_snapshot();
        let n = self.built.fetch_add(1, Ordering::Relaxed);
        let last = state.last_applied;
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: state.membership.clone(),
            snapshot_id: format!("{}-{n}", last.map_or(0, |l| l.index)),
        };
        let this = self.clone();
        let stored = tokio::task::spawn_blocking(move || {
            let data = serde_json::to_vec(&state).map_err(std::io::Error::other)?;
            let stored = StoredSnapshot { meta, data };
            this.save(&stored)?;
            Ok::<_, std::io::Error>(stored)
        })
        .await
        .map_err(|e| sm_err(std::io::Error::other(e)))?
        .map_err(sm_err)?;
        *self.current.lock() = Some(stored.clone());
        Ok(Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError<NodeId>>
    {
        let applied = self.applied.lock();
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut new_keys = None;
        {
            let mut applied = self.applied.lock();
            for entry in entries {
                applied.last_applied = Some(entry.log_id);
                out.push(match &entry.payload {
                    EntryPayload::Blank => Response::Noop,
                    EntryPayload::Normal(request) => applied.apply(entry.log_id.index, request),
                    EntryPayload::Membership(m) => {
                        applied.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        Response::Noop
                    }
                });
                if matches!(out.last(), Some(Response::KeysSet { .. })) {
                    new_keys = applied.keys.clone();
                }
            }
        }
        // Before openraft answers the proposer: a rotation is answered once
        // the leader signs with the new key.
        if let Some(text) = new_keys {
            self.adopt(&text);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let mut state: Applied = serde_json::from_slice(&data).map_err(sm_err)?;
        state.last_applied = meta.last_log_id;
        state.membership = meta.last_membership.clone();
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data,
        };
        self.save(&stored).map_err(sm_err)?;
        let keys = state.keys.clone();
        {
            let mut applied = self.applied.lock();
            // The history this node saw stays; the snapshot carries none.
            state.recent = std::mem::take(&mut applied.recent);
            *applied = state;
        }
        *self.current.lock() = Some(stored);
        if let Some(text) = keys {
            self.adopt(&text);
        }
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(self.current.lock().clone().map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn record(resource: &str, token: u64, id: u8) -> WireRecord {
        WireRecord {
            resource: resource.into(),
            lease_id: [id; 16],
            token,
            holder: "h".into(),
            ttl: Duration::from_secs(1),
            acquired_unix_ms: 5,
            request_id: Some(format!("k{token}")),
        }
    }

    fn changes(epoch: u64, changes: Vec<WireChange>) -> Request {
        Request::Changes { epoch, changes }
    }

    /// Table of entries and what the applied state holds after each.
    #[test]
    fn changes_apply_only_in_their_epoch() {
        let mut s = Applied::default();
        let cases: Vec<(u64, Request, &str, Vec<&str>, u64)> = vec![
            // (index, request, response, live resources, last token)
            (1, Request::Promote { node: 1 }, "Promoted", vec![], 0),
            (
                2,
                changes(1, vec![WireChange::Granted(record("a", 1, 1))]),
                "Applied",
                vec!["a"],
                1,
            ),
            (
                3,
                changes(1, vec![WireChange::Granted(record("b", 2, 2))]),
                "Applied",
                vec!["a", "b"],
                2,
            ),
            (
                4,
                Request::Promote { node: 2 },
                "Promoted",
                vec!["a", "b"],
                2,
            ),
            // A deposed leader's change (epoch 1) is ignored.
            (
                5,
                changes(1, vec![WireChange::Granted(record("c", 3, 3))]),
                "Stale",
                vec!["a", "b"],
                2,
            ),
            // Ending a lease by another id does nothing; by its own id, it ends.
            (
                6,
                changes(
                    4,
                    vec![WireChange::Ended {
                        record: record("a", 9, 9),
                        how: 0,
                        at_unix_ms: 0,
                    }],
                ),
                "Applied",
                vec!["a", "b"],
                2,
            ),
            (
                7,
                changes(
                    4,
                    vec![WireChange::Ended {
                        record: record("a", 1, 1),
                        how: 1,
                        at_unix_ms: 0,
                    }],
                ),
                "Applied",
                vec!["b"],
                2,
            ),
            (
                8,
                changes(4, vec![WireChange::Granted(record("a", 3, 4))]),
                "Applied",
                vec!["a", "b"],
                3,
            ),
        ];
        for (index, request, want, live, last_token) in cases {
            let got = s.apply(index, &request);
            assert!(format!("{got:?}").starts_with(want), "{index}: {got:?}");
            assert_eq!(s.leases.keys().collect::<Vec<_>>(), live, "{index}");
            assert_eq!(s.last_token, last_token, "{index}");
        }
        let loaded = s.to_loaded();
        assert_eq!(loaded.leases.len(), 2);
        assert_eq!(loaded.requests.len(), 3);
        assert_eq!(loaded.last_token, 3);
    }

    fn keys_entry(set: &KeySet, base: u64) -> Request {
        Request::Keys {
            text: KeyText(set.encode()),
            base,
        }
    }

    /// A key set applies only on the base it was made from.
    #[test]
    fn a_key_set_applies_only_on_its_base() {
        let first = KeySet::new([1; 32], 10);
        let mut second = first.clone();
        second.rotate([2; 32], 20).unwrap();
        let mut third = first.clone();
        third.rotate([3; 32], 30).unwrap();
        let garbage = Request::Keys {
            text: KeyText("not a key set".into()),
            base: 4,
        };
        let mut s = Applied::default();
        let cases: Vec<(u64, Request, &str, Option<&KeySet>, u64)> = vec![
            // (index, request, response, key set in force, its index)
            (1, Request::Promote { node: 1 }, "Promoted", None, 0),
            (2, keys_entry(&first, 0), "KeysSet", Some(&first), 2),
            // A second leader's own keys: the cluster has a set already.
            (3, keys_entry(&third, 0), "KeysStale", Some(&first), 2),
            (4, keys_entry(&second, 2), "KeysSet", Some(&second), 4),
            // Made from the first set, which is no longer in force.
            (5, keys_entry(&third, 2), "KeysStale", Some(&second), 4),
            (6, garbage, "KeysRefused", Some(&second), 4),
        ];
        for (index, request, want, set, at) in cases {
            let got = s.apply(index, &request);
            assert!(format!("{got:?}").starts_with(want), "{index}: {got:?}");
            assert_eq!(s.key_set(), set.map(|set| (set.clone(), at)), "{index}");
        }
        // The secret never shows in a debug print.
        let secret_free = format!("{:?} {:?}", s, keys_entry(&second, 4));
        assert!(!secret_free.contains("secret:"), "{secret_free}");
    }

    /// Applying a key set (from the log or a snapshot) hands it to the
    /// node's keys, which write it to the key file.
    #[tokio::test]
    async fn applied_keys_are_taken_on_and_written() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let options = crate::keys::KeyOptions::default();
        let keys = Keys::open(&data, &options, true).unwrap();
        let mut cluster = KeySet::new([7; 32], 10);
        std::fs::create_dir_all(dir.path().join("raft")).unwrap();
        let mut sm = StateMachine::open(&dir.path().join("raft"), Some(keys.clone())).unwrap();
        let entry = |index, request| Entry::<TypeConfig> {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(request),
        };
        let out = sm
            .apply(vec![
                entry(1, Request::Promote { node: 1 }),
                entry(2, keys_entry(&cluster, 0)),
            ])
            .await
            .unwrap();
        assert!(matches!(out[1], Response::KeysSet { index: 2 }), "{out:?}");
        assert_eq!(keys.set(), cluster);
        let reopened = Keys::open(&data, &options, false).unwrap();
        assert_eq!(reopened.set(), cluster);

        // A node that catches up from a snapshot gets the keys in it.
        cluster.rotate([8; 32], 20).unwrap();
        sm.applied.lock().apply(3, &keys_entry(&cluster, 2));
        let snap = sm.build_snapshot().await.unwrap();
        let other_dir = tempfile::tempdir().unwrap();
        let other_keys = Keys::open(&other_dir.path().join("data"), &options, true).unwrap();
        std::fs::create_dir_all(other_dir.path().join("raft")).unwrap();
        let mut other =
            StateMachine::open(&other_dir.path().join("raft"), Some(other_keys.clone())).unwrap();
        other
            .install_snapshot(&snap.meta, snap.snapshot)
            .await
            .unwrap();
        assert_eq!(other_keys.set(), cluster);
        assert_eq!(other.applied.lock().key_set(), Some((cluster.clone(), 3)));

        // Its key file lost, the node restarts with a new key (as `serve`
        // does for a cluster node with Raft data) and the snapshot's set
        // replaces it, in memory and in the file.
        let other_data = other_dir.path().join("data");
        std::fs::remove_file(other_data.join(crate::keys::KEY_FILE)).unwrap();
        let fresh = Keys::open(&other_data, &options, true).unwrap();
        assert_ne!(fresh.set(), cluster);
        StateMachine::open(&other_dir.path().join("raft"), Some(fresh.clone())).unwrap();
        assert_eq!(fresh.set(), cluster);
        assert_eq!(
            Keys::open(&other_data, &options, false).unwrap().set(),
            cluster
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let snapshot = other_dir.path().join("raft/raft-snapshot");
            let mode = std::fs::metadata(snapshot).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    /// A snapshot written before key sets were replicated still loads.
    #[test]
    fn a_snapshot_without_keys_still_loads() {
        let mut old = serde_json::to_value(Applied::default()).unwrap();
        let map = old.as_object_mut().unwrap();
        map.remove("keys");
        map.remove("keys_index");
        let applied: Applied = serde_json::from_value(old).unwrap();
        assert_eq!(applied.key_set(), None);
        assert_eq!(applied.keys_index, 0);
    }

    #[tokio::test]
    async fn a_snapshot_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), None).unwrap();
        sm.applied.lock().apply(1, &Request::Promote { node: 1 });
        sm.applied
            .lock()
            .apply(2, &changes(1, vec![WireChange::Granted(record("a", 7, 1))]));
        let snap = sm.build_snapshot().await.unwrap();
        let mut again = StateMachine::open(dir.path(), None).unwrap();
        assert_eq!(again.applied.lock().last_token, 7);
        let current = again.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);
    }
}
