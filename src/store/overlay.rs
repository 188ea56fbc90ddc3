//! The overlay: logged changes that sled does not hold yet, which every
//! read of the table consults on top of sled.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

/// Key → value (`None`: deleted), the table's changes not yet in sled.
pub(super) type Overlay = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Logged changes that sled does not hold yet.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Changes since the last freeze, coalesced per key.
    pub(super) active: Overlay,
    /// Keys of `active` first written by an [`Op::Insert`] (a grant's new
    /// history entry): a delete in the same window drops them from the
    /// overlay instead of leaving a tombstone, so a history entry born and
    /// trimmed within one checkpoint never costs sled anything. Under a
    /// steady cycle load that is nearly every history entry.
    pub(super) born: HashSet<Vec<u8>>,
    /// Changes being written to sled by the checkpointer.
    pub(super) frozen: Option<Arc<Overlay>>,
    /// The log's [`Wal::written`] at the last freeze.
    pub(super) logged_at_freeze: u64,
}
