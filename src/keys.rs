//! The coordinator's signing keys: the key set (a pure value), its file,
//! and the handle the services sign with.
//!
//! Every granted lease carries a signed fence (`leasehold_fence::signed`):
//! its resource and token, signed with the coordinator's current Ed25519
//! key, which storage verifies offline with the public keys. This module
//! keeps those keys.
//!
//! - [`KeySet`] is a plain value: the keys, each with its id, creation
//!   time and status (one `signing`, older ones `active` until retired,
//!   then `retired` with the secret wiped). Its operations ([`KeySet::rotate`],
//!   [`KeySet::retire`]) take the new secret and the time as arguments and
//!   do no I/O, so a replicated log could carry them as cluster state.
//! - The key file (`DATA_DIR/signing-keys`, or `serve --signing-key PATH`)
//!   is the set in text with a CRC-32 at the end ([`KeySet::encode`]),
//!   replaced atomically: a temporary file, `fsync`, `rename`, `fsync` of
//!   the directory. A damaged file refuses to start; a missing one is
//!   created only for a new data directory (or with
//!   `--create-signing-key`), never silently: a new key is one storage does
//!   not know. A cluster node with Raft data is the exception: that data
//!   holds the cluster's set, which replaces the new key as the node
//!   replays it (`server::open`, `raft::state_machine`).
//! - [`Keys`] is the running handle: `sign` on the grant path (a read
//!   lock and an Ed25519 signature), `rotate` / `retire` for the admin API
//!   of a single node.
//! - In a cluster the set is replicated state (`raft::Request::Keys`, in
//!   the applied state and its snapshots): [`rotated`] and [`retired`]
//!   compute the next set, the leader proposes it, and every node takes it
//!   on with [`Keys::adopt`] when the entry is applied. The key file is then
//!   each node's copy of the last set it applied.

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use leasehold_fence::signed::{
    FenceSigner, FenceVerifier, KeyId, KeyStatus, PublicKey, SignedFence,
};
use parking_lot::{Mutex, RwLock};

/// The key file's name inside the data directory.
pub const KEY_FILE: &str = "signing-keys";
const HEADER: &str = "leasehold-signing-keys 1";

/// What a key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// Signs every new fence (exactly one key).
    Signing,
    /// No longer signs; fences it signed still verify.
    Active,
    /// Fences it signed are refused; its secret is gone.
    Retired,
}

impl KeyState {
    /// The word in the key file and in `keys list`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Signing => "signing",
            KeyState::Active => "active",
            KeyState::Retired => "retired",
        }
    }

    /// How a verifier treats fences signed with it.
    pub fn verifies(self) -> KeyStatus {
        match self {
            KeyState::Signing | KeyState::Active => KeyStatus::Active,
            KeyState::Retired => KeyStatus::Retired,
        }
    }
}

/// One key of the set.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// The public half (and its id).
    pub public: PublicKey,
    /// The secret, only while the key signs.
    secret: Option<[u8; 32]>,
    /// What it is for.
    pub state: KeyState,
    /// When it was made (Unix ms).
    pub created_unix_ms: u64,
    /// When it was retired (Unix ms).
    pub retired_unix_ms: Option<u64>,
}

impl fmt::Debug for KeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyEntry")
            .field("id", &self.public.id())
            .field("state", &self.state)
            .field("created_unix_ms", &self.created_unix_ms)
            .field("retired_unix_ms", &self.retired_unix_ms)
            .finish_non_exhaustive()
    }
}

/// Why the key set refused a change, or its encoding is unreadable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeySetError {
    /// No key has this id.
    #[error("no signing key has the id {0}; `leasehold keys list` shows the ids")]
    UnknownKey(KeyId),
    /// The signing key cannot be retired: nothing would sign.
    #[error("key {0} is the signing key; run `leasehold keys rotate` first, then retire it")]
    RetireSigning(KeyId),
    /// A freshly drawn key has the id of a key in the set (1 in 2^32 per key).
    #[error("the new key's id {0} is taken; try again")]
    DuplicateId(KeyId),
    /// The encoded set is damaged or not a key set.
    #[error("{0}")]
    Damaged(String),
}

/// The coordinator's keys: exactly one signing key, any number of active
/// and retired ones, oldest first. A pure value: see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySet {
    entries: Vec<KeyEntry>,
}

impl KeySet {
    /// A set with one signing key made from `secret` at `now_unix_ms`.
    pub fn new(secret: [u8; 32], now_unix_ms: u64) -> Self {
        KeySet {
            entries: vec![KeyEntry {
                public: FenceSigner::from_secret(&secret).public_key(),
                secret: Some(secret),
                state: KeyState::Signing,
                created_unix_ms: now_unix_ms,
                retired_unix_ms: None,
            }],
        }
    }

    /// The keys, oldest first.
    pub fn entries(&self) -> &[KeyEntry] {
        &self.entries
    }

    /// The key that signs.
    pub fn signer(&self) -> FenceSigner {
        let secret = self
            .entries
            .iter()
            .find_map(|e| (e.state == KeyState::Signing).then_some(e.secret).flatten())
            .expect("a KeySet always has one signing key with its secret");
        FenceSigner::from_secret(&secret)
    }

    /// What storage needs to verify: every key, retired ones marked so.
    pub fn verifier(&self) -> FenceVerifier {
        self.entries.iter().fold(FenceVerifier::new(), |v, e| {
            v.with_key(e.public.clone(), e.state.verifies())
        })
    }

    /// Makes a new key from `secret` the signing key; the old one stays
    /// verifiable (active) and its secret is wiped.
    pub fn rotate(&mut self, secret: [u8; 32], now_unix_ms: u64) -> Result<KeyId, KeySetError> {
        let public = FenceSigner::from_secret(&secret).public_key();
        let id = public.id();
        if self.entries.iter().any(|e| e.public.id() == id) {
            return Err(KeySetError::DuplicateId(id));
        }
        for e in &mut self.entries {
            if e.state == KeyState::Signing {
                e.state = KeyState::Active;
                e.secret = None;
            }
        }
        self.entries.push(KeyEntry {
            public,
            secret: Some(secret),
            state: KeyState::Signing,
            created_unix_ms: now_unix_ms,
            retired_unix_ms: None,
        });
        Ok(id)
    }

    /// Retires key `id`: fences it signed are refused from now on.
    /// `Ok(false)`: it was already retired.
    pub fn retire(&mut self, id: KeyId, now_unix_ms: u64) -> Result<bool, KeySetError> {
        let entry = self
            .entries
            .iter_mut()
            .find(|e| e.public.id() == id)
            .ok_or(KeySetError::UnknownKey(id))?;
        match entry.state {
            KeyState::Signing => Err(KeySetError::RetireSigning(id)),
            KeyState::Retired => Ok(false),
            KeyState::Active => {
                entry.state = KeyState::Retired;
                entry.retired_unix_ms = Some(now_unix_ms);
                entry.secret = None;
                Ok(true)
            }
        }
    }

    /// The file form: a header line, one line per key
    /// (`key ID STATE CREATED RETIRED|- ed25519:PUBLIC secret:BASE64|-`),
    /// and `checksum` with the CRC-32 of everything before it.
    pub fn encode(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut out = format!(
            "# Leasehold signing keys: keep this file secret and backed up.\n\
             # Storage services need only the public keys (`leasehold keys export`).\n\
             {HEADER}\n"
        );
        for e in &self.entries {
            let retired = e
                .retired_unix_ms
                .map_or_else(|| "-".to_owned(), |t| t.to_string());
            let secret = e
                .secret
                .map_or_else(|| "-".to_owned(), |s| format!("secret:{}", b64.encode(s)));
            out.push_str(&format!(
                "key {} {} {} {retired} {} {secret}\n",
                e.public.id(),
                e.state.as_str(),
                e.created_unix_ms,
                e.public.to_text(),
            ));
        }
        let crc = crc32fast::hash(out.as_bytes());
        out.push_str(&format!("checksum {crc:08x}\n"));
        out
    }

    /// Reads [`KeySet::encode`]'s form, checking everything: the checksum,
    /// each key's id and secret against its public key, one signing key.
    pub fn decode(text: &str) -> Result<Self, KeySetError> {
        let damaged = |s: String| KeySetError::Damaged(s);
        let at = text
            .rfind("checksum ")
            .ok_or_else(|| damaged("no checksum line (the file is cut short?)".into()))?;
        let (body, tail) = text.split_at(at);
        let line = tail
            .strip_suffix('\n')
            .filter(|l| !l.contains('\n'))
            .ok_or_else(|| damaged("something follows the checksum line".into()))?;
        let want = line
            .strip_prefix("checksum ")
            .filter(|c| c.len() == 8)
            .and_then(|c| u32::from_str_radix(c, 16).ok())
            .ok_or_else(|| damaged("the checksum line is malformed".into()))?;
        if crc32fast::hash(body.as_bytes()) != want {
            return Err(damaged("the checksum does not match the contents".into()));
        }
        let mut lines = body.lines().filter(|l| !l.starts_with('#'));
        if lines.next() != Some(HEADER) {
            return Err(damaged(format!("the first line is not {HEADER:?}")));
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut entries: Vec<KeyEntry> = Vec::new();
        for (n, line) in lines.enumerate() {
            let bad = |what: &str| damaged(format!("key line {}: {what}", n + 1));
            let f: Vec<&str> = line.split(' ').collect();
            let [tag, id, state, created, retired, public, secret] = f[..] else {
                return Err(bad("expected 7 fields"));
            };
            if tag != "key" {
                return Err(bad("does not start with `key`"));
            }
            let public = PublicKey::from_text(public).map_err(|e| bad(&e.to_string()))?;
            let id: KeyId = id.parse().map_err(|_| bad("bad key id"))?;
            if id != public.id() {
                return Err(bad("the id is not the public key's"));
            }
            let state = match state {
                "signing" => KeyState::Signing,
                "active" => KeyState::Active,
                "retired" => KeyState::Retired,
                _ => return Err(bad("unknown state")),
            };
            let created_unix_ms = created.parse().map_err(|_| bad("bad creation time"))?;
            let retired_unix_ms = match retired {
                "-" => None,
                t => Some(t.parse().map_err(|_| bad("bad retirement time"))?),
            };
            let secret = match secret {
                "-" => None,
                s => {
                    let bytes = s
                        .strip_prefix("secret:")
                        .and_then(|s| b64.decode(s).ok())
                        .and_then(|b| <[u8; 32]>::try_from(b).ok())
                        .ok_or_else(|| bad("the secret is not 32 bytes of base64"))?;
                    if FenceSigner::from_secret(&bytes).public_key() != public {
                        return Err(bad("the secret does not belong to the public key"));
                    }
                    Some(bytes)
                }
            };
            if (state == KeyState::Signing) != secret.is_some() {
                return Err(bad("only the signing key has a secret, and it must"));
            }
            if (state == KeyState::Retired) != retired_unix_ms.is_some() {
                return Err(bad("only a retired key has a retirement time, and it must"));
            }
            if entries.iter().any(|e| e.public.id() == id) {
                return Err(bad("a second key with the same id"));
            }
            entries.push(KeyEntry {
                public,
                secret,
                state,
                created_unix_ms,
                retired_unix_ms,
            });
        }
        let signing = entries
            .iter()
            .filter(|e| e.state == KeyState::Signing)
            .count();
        if signing != 1 {
            return Err(damaged(format!(
                "{signing} signing keys; a key set has exactly one"
            )));
        }
        Ok(KeySet { entries })
    }
}

/// Where the keys live and whether a missing file may be created.
#[derive(Debug, Clone, Default)]
pub struct KeyOptions {
    /// The key file; `None`: `DATA_DIR/signing-keys`.
    pub path: Option<PathBuf>,
    /// Create the file if it is missing even though the data directory is
    /// not new (`serve --create-signing-key`).
    pub create: bool,
    /// Send leases without a signed fence (`serve --no-signed-fences`): saves
    /// one Ed25519 signature per grant, for deployments whose storage does
    /// not verify. The keys are still loaded and served.
    pub no_signed_fences: bool,
}

impl KeyOptions {
    /// The key file: `path`, or `DATA_DIR/signing-keys`.
    pub fn file(&self, data_dir: &Path) -> PathBuf {
        self.path.clone().unwrap_or_else(|| data_dir.join(KEY_FILE))
    }
}

/// Why the keys cannot be loaded, saved or changed.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// The file exists but is not a key set.
    #[error(
        "the signing key file {} is damaged ({source}); restore it from a backup. \
         The coordinator will not start with a new key on its own: storage services \
         would refuse every fence it signs. To start over knowingly, move the file away, \
         start with --create-signing-key and give storage the new public keys \
         (`leasehold keys export`)",
        .path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: KeySetError,
    },
    /// The file is missing and the data directory is not new.
    #[error(
        "no signing key file at {}, but the data directory {} is not new: the coordinator \
         signed fences with a key storage services know. Restore the file from a backup; \
         or, if this data directory predates signed fences or you mean to replace the key, \
         start once with --create-signing-key and give storage the new public keys \
         (`leasehold keys export`)",
        .path.display(), .data_dir.display()
    )]
    Missing {
        /// The file.
        path: PathBuf,
        /// The data directory.
        data_dir: PathBuf,
    },
    /// A file system call failed.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The operating system's random generator failed.
    #[error("cannot draw a new key from the operating system's random generator: {0}")]
    Random(String),
    /// The set refused the change.
    #[error(transparent)]
    Set(#[from] KeySetError),
    /// A cluster's key change was not committed (or its outcome is unknown).
    #[error(
        "the key change was not committed by the cluster: {0}; retry \
         (`leasehold keys list` shows whether it took effect)"
    )]
    NotReplicated(String),
    /// Another change of the cluster's key set came first.
    #[error(
        "the cluster's key set changed while this change was proposed (another rotate or \
         retire, or a new leader); nothing changed: look at `leasehold keys list` and retry"
    )]
    Raced,
}

/// Whether `data_dir` is new: missing, or an empty directory. Call it
/// before anything creates files there.
pub fn data_dir_is_new(data_dir: &Path) -> bool {
    match std::fs::read_dir(data_dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// A description of one key, for the services.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The public key (and its id).
    pub public: PublicKey,
    /// What it is for.
    pub state: KeyState,
    /// When it was made (Unix ms).
    pub created_unix_ms: u64,
    /// When it was retired (Unix ms).
    pub retired_unix_ms: Option<u64>,
}

impl From<&KeyEntry> for KeyInfo {
    fn from(e: &KeyEntry) -> Self {
        KeyInfo {
            public: e.public.clone(),
            state: e.state,
            created_unix_ms: e.created_unix_ms,
            retired_unix_ms: e.retired_unix_ms,
        }
    }
}

struct Current {
    set: KeySet,
    signer: FenceSigner,
}

struct KeysInner {
    path: PathBuf,
    current: RwLock<Arc<Current>>,
    /// Serialises rotate/retire: one file write at a time.
    change: Mutex<()>,
}

/// The running key set: signs fences, rotates and retires. Cheap to clone.
#[derive(Clone)]
pub struct Keys {
    inner: Arc<KeysInner>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("path", &self.inner.path)
            .field("signing", &self.inner.current.read().signer.id())
            .finish()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn random_secret() -> Result<[u8; 32], KeysError> {
    use rand::TryRngCore;
    let mut secret = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut secret)
        .map_err(|e| KeysError::Random(e.to_string()))?;
    Ok(secret)
}

/// `set` with a new signing key drawn from the operating system's random
/// generator (the old one stays verifiable), and the new key's id.
pub fn rotated(set: &KeySet) -> Result<(KeySet, KeyId), KeysError> {
    let mut set = set.clone();
    // A clash of 32-bit ids is a 1-in-2^32 event per key: draw again.
    let mut tries = 0;
    loop {
        match set.rotate(random_secret()?, unix_ms()) {
            Err(KeySetError::DuplicateId(_)) if tries < 8 => tries += 1,
            r => return Ok((set, r?)),
        }
    }
}

/// `set` with key `id` retired now; `false`: it was already retired.
pub fn retired(set: &KeySet, id: KeyId) -> Result<(KeySet, bool), KeysError> {
    let mut set = set.clone();
    let retired = set.retire(id, unix_ms())?;
    Ok((set, retired))
}

impl Keys {
    /// Loads the key file, or creates it with a new key when it is
    /// missing and `data_dir_was_new` (or `options.create`). See the
    /// module docs for why a missing file is otherwise an error.
    pub fn open(
        data_dir: &Path,
        options: &KeyOptions,
        data_dir_was_new: bool,
    ) -> Result<Keys, KeysError> {
        let path = options.file(data_dir);
        let set = match std::fs::read(&path) {
            Ok(bytes) => {
                let text = String::from_utf8(bytes).map_err(|_| KeysError::Damaged {
                    path: path.clone(),
                    source: KeySetError::Damaged("not UTF-8 text".into()),
                })?;
                KeySet::decode(&text).map_err(|source| KeysError::Damaged {
                    path: path.clone(),
                    source,
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !(data_dir_was_new || options.create) {
                    return Err(KeysError::Missing {
                        path,
                        data_dir: data_dir.to_owned(),
                    });
                }
                let set = KeySet::new(random_secret()?, unix_ms());
                save(&path, &set)?;
                tracing::info!(path = %path.display(), key = %set.signer().id(), "created a signing key");
                set
            }
            Err(source) => {
                return Err(KeysError::Io {
                    what: "cannot read the signing key file",
                    path,
                    source,
                })
            }
        };
        let signer = set.signer();
        tracing::info!(path = %path.display(), signing = %signer.id(), keys = set.entries().len(), "signing keys loaded");
        Ok(Keys {
            inner: Arc::new(KeysInner {
                path,
                current: RwLock::new(Arc::new(Current { set, signer })),
                change: Mutex::new(()),
            }),
        })
    }

    /// The key file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Signs the fence of a grant. The caller knows the lease record.
    pub fn sign(&self, resource: &str, token: u64, issued_at_unix_ms: u64) -> SignedFence {
        let current = self.inner.current.read().clone();
        current.signer.sign(resource, token, issued_at_unix_ms)
    }

    /// Every key, oldest first.
    pub fn list(&self) -> Vec<KeyInfo> {
        let current = self.inner.current.read().clone();
        current.set.entries().iter().map(KeyInfo::from).collect()
    }

    /// A verifier for the current set (what storage would hold).
    pub fn verifier(&self) -> FenceVerifier {
        self.inner.current.read().set.verifier()
    }

    /// The current set.
    pub fn set(&self) -> KeySet {
        self.inner.current.read().set.clone()
    }

    /// Describes key `id` of the current set, if it has one.
    pub fn find(&self, id: KeyId) -> Option<KeyInfo> {
        let current = self.inner.current.read().clone();
        current
            .set
            .entries()
            .iter()
            .find(|e| e.public.id() == id)
            .map(KeyInfo::from)
    }

    /// Takes on `set`, the cluster's key set, as applied from the
    /// replicated log: from now on it signs and is served, and the key file
    /// holds it (so a restart keeps it). `Ok(false)`: it was already the
    /// current set. Unlike [`Keys::rotate`], the set becomes current even
    /// if the file cannot be written (the error says so): the cluster has
    /// decided, and the log still holds the set for the next start.
    /// Blocking (writes and syncs the key file).
    pub fn adopt(&self, set: KeySet) -> Result<bool, KeysError> {
        let _one_at_a_time = self.inner.change.lock();
        if self.inner.current.read().set == set {
            return Ok(false);
        }
        let signer = set.signer();
        let id = signer.id();
        *self.inner.current.write() = Arc::new(Current {
            set: set.clone(),
            signer,
        });
        save(&self.inner.path, &set)?;
        tracing::info!(signing = %id, keys = set.entries().len(), "took on the cluster's key set");
        Ok(true)
    }

    /// Applies `change` to a copy of the set, writes it, then makes it
    /// current: a failed write changes nothing. Blocking (file I/O).
    fn change<T>(
        &self,
        change: impl FnOnce(&mut KeySet) -> Result<T, KeysError>,
    ) -> Result<T, KeysError> {
        let _one_at_a_time = self.inner.change.lock();
        let mut set = self.inner.current.read().set.clone();
        let out = change(&mut set)?;
        save(&self.inner.path, &set)?;
        let signer = set.signer();
        *self.inner.current.write() = Arc::new(Current { set, signer });
        Ok(out)
    }

    /// Adds a new signing key; the previous one stays verifiable until
    /// retired. Blocking (writes and syncs the key file).
    pub fn rotate(&self) -> Result<KeyInfo, KeysError> {
        let id = self.change(|set| {
            let (next, id) = rotated(set)?;
            *set = next;
            Ok(id)
        })?;
        tracing::info!(key = %id, "rotated the signing key");
        Ok(self.info(id))
    }

    /// Retires key `id`; `(info, false)` if it was already retired.
    /// Blocking (writes and syncs the key file).
    pub fn retire(&self, id: KeyId) -> Result<(KeyInfo, bool), KeysError> {
        let retired = self.change(|set| {
            let (next, retired) = retired(set, id)?;
            *set = next;
            Ok(retired)
        })?;
        if retired {
            tracing::info!(key = %id, "retired a signing key");
        }
        Ok((self.info(id), retired))
    }

    fn info(&self, id: KeyId) -> KeyInfo {
        self.find(id).expect("the key was just added or found")
    }
}

/// Replaces the key file atomically: write a temporary file (mode 0600)
/// beside it, `fsync` it, rename it over the file, `fsync` the directory.
fn save(path: &Path, set: &KeySet) -> Result<(), KeysError> {
    let io = |what, path: &Path| {
        let path = path.to_owned();
        move |source| KeysError::Io { what, path, source }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(io("cannot create the directory", &dir))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_owned();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let mut file = {
        let mut o = std::fs::OpenOptions::new();
        o.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            o.mode(0o600);
        }
        o.open(&tmp)
            .map_err(io("cannot create the temporary key file", &tmp))?
    };
    file.write_all(set.encode().as_bytes())
        .map_err(io("cannot write the temporary key file", &tmp))?;
    file.sync_all()
        .map_err(io("cannot sync the temporary key file", &tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io("cannot rename the temporary key file to", path))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("cannot sync the directory", &dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_fence::signed::SignedFenceError;

    #[test]
    fn rotate_and_retire_keep_exactly_one_signer() {
        let mut set = KeySet::new([1; 32], 10);
        let first = set.signer().id();
        let fence = set.signer().sign("r", 1, 0);
        let second = set.rotate([2; 32], 20).unwrap();
        assert_eq!(set.signer().id(), second);
        // Before retirement the old fence verifies; after, it is refused.
        assert!(set.verifier().verify(fence.as_bytes(), "r").is_ok());
        assert_eq!(
            set.retire(second, 30),
            Err(KeySetError::RetireSigning(second))
        );
        assert_eq!(set.retire(first, 30), Ok(true));
        assert_eq!(set.retire(first, 40), Ok(false));
        assert_eq!(
            set.verifier().verify(fence.as_bytes(), "r"),
            Err(SignedFenceError::RetiredKey { key_id: first })
        );
        assert_eq!(
            set.retire(KeyId(7), 40),
            Err(KeySetError::UnknownKey(KeyId(7)))
        );
        assert_eq!(
            set.rotate([2; 32], 50),
            Err(KeySetError::DuplicateId(second))
        );
        let states: Vec<_> = set
            .entries()
            .iter()
            .map(|e| (e.state, e.secret.is_some()))
            .collect();
        assert_eq!(
            states,
            vec![(KeyState::Retired, false), (KeyState::Signing, true)]
        );
    }

    #[test]
    fn encoding_round_trips() {
        let mut set = KeySet::new([1; 32], 10);
        set.rotate([2; 32], 20).unwrap();
        set.rotate([3; 32], 30).unwrap();
        let first = set.entries()[0].public.id();
        set.retire(first, 40).unwrap();
        let text = set.encode();
        assert_eq!(KeySet::decode(&text), Ok(set));
        assert!(text.contains(" retired 10 40 "), "{text}");
    }

    #[test]
    fn damage_is_detected() {
        let mut set = KeySet::new([1; 32], 10);
        set.rotate([2; 32], 20).unwrap();
        let text = set.encode();
        let recrc =
            |body: &str| format!("{body}checksum {:08x}\n", crc32fast::hash(body.as_bytes()));
        let body = &text[..text.rfind("checksum ").unwrap()];
        let other_secret = base64::engine::general_purpose::STANDARD.encode([9u8; 32]);
        let cases: Vec<(String, &str)> = vec![
            (String::new(), "no checksum"),
            (text[..text.len() - 20].to_owned(), "no checksum"),
            (
                text.replacen(" signing 20", " signinG 20", 1),
                "checksum does not match",
            ),
            (format!("{text}x"), "follows the checksum"),
            (
                recrc(&body.replacen(HEADER, "leasehold-signing-keys 2", 1)),
                "first line",
            ),
            (
                recrc(&body.replacen(" signing 20 ", " active 20 ", 1)),
                "only the signing key",
            ),
            (
                recrc(&body.replacen(" active 10 ", " signing 10 ", 1).replacen(
                    " -\n",
                    " secret:AAAA\n",
                    1,
                )),
                "secret is not 32 bytes",
            ),
            (
                recrc(&body.replacen(
                    &body[body.rfind("secret:").unwrap()..body.len() - 1],
                    &format!("secret:{other_secret}"),
                    1,
                )),
                "does not belong",
            ),
            (
                recrc(&body.replacen("key ", "kex ", 1)),
                "does not start with `key`",
            ),
        ];
        for (text, want) in cases {
            let err = KeySet::decode(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn the_file_is_created_only_for_a_new_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        assert!(data_dir_is_new(&data));
        // A missing file beside an existing store is an error, not a new key.
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(data.join("tokens"), b"x").unwrap();
        assert!(!data_dir_is_new(&data));
        let err = Keys::open(&data, &KeyOptions::default(), false).unwrap_err();
        assert!(matches!(err, KeysError::Missing { .. }), "{err}");
        assert!(!data.join(KEY_FILE).exists());
        // New data directory: created, then loaded again with the same key.
        let keys = Keys::open(&data, &KeyOptions::default(), true).unwrap();
        let id = keys.list()[0].public.id();
        let again = Keys::open(&data, &KeyOptions::default(), false).unwrap();
        assert_eq!(again.list()[0].public.id(), id);
        // Rotate and retire persist.
        let new = keys.rotate().unwrap();
        keys.retire(id).unwrap();
        let again = Keys::open(&data, &KeyOptions::default(), false).unwrap();
        let states: Vec<_> = again
            .list()
            .iter()
            .map(|k| (k.public.id(), k.state))
            .collect();
        assert_eq!(
            states,
            vec![
                (id, KeyState::Retired),
                (new.public.id(), KeyState::Signing)
            ]
        );
        // --create-signing-key makes one knowingly.
        let elsewhere = dir.path().join("elsewhere/keys");
        let options = KeyOptions {
            path: Some(elsewhere.clone()),
            create: true,
            ..KeyOptions::default()
        };
        Keys::open(&data, &options, false).unwrap();
        assert!(elsewhere.exists());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&elsewhere).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
