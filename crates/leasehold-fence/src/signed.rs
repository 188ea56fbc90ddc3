//! Signed fences (feature `signed`): a fence the coordinator signs and
//! storage verifies offline, so no client can forge or move a token.
//!
//! A plain fence is two values the client chooses: a buggy or hostile
//! client that sends token `u64::MAX` raises the guard's mark to the top
//! and every honest writer is refused from then on; one that sends a real
//! token for another resource raises that resource's mark. A signed fence
//! closes both holes without a call to the coordinator: it carries the
//! token and a digest of the resource, signed with the coordinator's
//! Ed25519 key ([`FenceSigner`]); storage holds the coordinator's public
//! keys ([`FenceVerifier`]), checks the signature and the resource, and
//! uses the token inside.
//!
//! # Format, version 1 (117 bytes)
//!
//! | bytes    | field      | meaning |
//! |----------|------------|---------|
//! | 0        | version    | `0x01` |
//! | 1..5     | key id     | `u32`, big-endian: the first 4 bytes of SHA-256 of the signing key's 32-byte public key ([`KeyId`]) |
//! | 5..13    | token      | the fencing token, `u64` big-endian |
//! | 13..21   | issued at  | the lease's grant time, Unix milliseconds, `u64` big-endian (the coordinator's wall clock; informative, never checked against storage's clock) |
//! | 21..53   | resource   | SHA-256 of the resource name's UTF-8 bytes (the name itself travels as `leasehold-resource`; a digest keeps the fence small for 512-byte names) |
//! | 53..117  | signature  | Ed25519 (RFC 8032, pure) over the ASCII context `leasehold signed fence` and a zero byte (23 bytes), followed by bytes 0..53 |
//!
//! A fence of another length or version is refused before any
//! cryptography. A new version will get a new first byte; verifiers refuse
//! versions they do not know ([`SignedFenceError::UnknownVersion`]).
//! Verification uses `verify_strict` (no malleable signatures, no weak
//! keys).
//!
//! # On the wire
//!
//! | transport     | key | value |
//! |---------------|-----|-------|
//! | gRPC metadata | [`SIGNED_METADATA_KEY`] (`leasehold-fence-bin`) | the 117 bytes (binary metadata: gRPC base64-encodes it itself) |
//! | HTTP header   | [`SIGNED_HEADER`] (`Leasehold-Fence`) | the 117 bytes in standard base64 ([`SignedFence::to_base64`]; padding optional on receipt) |
//!
//! Both sit beside the plain `leasehold-resource` / `leasehold-token`
//! values, which stay: a guard without keys reads those, a guard with keys
//! needs the signed fence and checks that the plain token, if sent, agrees.
//!
//! ```
//! use leasehold_fence::signed::{FenceSigner, FenceVerifier, KeyStatus, SignedFenceError};
//!
//! // The coordinator's key (normally generated into its data directory).
//! let signer = FenceSigner::from_secret(&[7; 32]);
//! let fence = signer.sign("orders", 34, 1_700_000_000_000);
//! assert_eq!(fence.as_bytes().len(), 117);
//!
//! // Storage knows only the public key.
//! let verifier = FenceVerifier::new().with_key(signer.public_key(), KeyStatus::Active);
//! let verified = verifier.verify(fence.as_bytes(), "orders")?;
//! assert_eq!(verified.token, 34);
//!
//! // The same fence on another resource, or with one byte changed, is refused.
//! assert!(matches!(verifier.verify(fence.as_bytes(), "invoices"),
//!                  Err(SignedFenceError::WrongResource { .. })));
//! let mut forged = fence.as_bytes().to_vec();
//! forged[5..13].copy_from_slice(&u64::MAX.to_be_bytes());
//! assert!(matches!(verifier.verify(&forged, "orders"),
//!                  Err(SignedFenceError::BadSignature { .. })));
//! # Ok::<(), SignedFenceError>(())
//! ```

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
#[cfg(feature = "grpc")]
use tonic::metadata::MetadataMap;
#[cfg(feature = "grpc")]
use tonic::Request;

/// The format version this crate writes and reads.
pub const SIGNED_FENCE_VERSION: u8 = 1;
/// Length of a version-1 signed fence, in bytes.
pub const SIGNED_FENCE_LEN: usize = 117;
/// gRPC binary metadata key carrying the signed fence.
pub const SIGNED_METADATA_KEY: &str = "leasehold-fence-bin";
/// HTTP header carrying the signed fence, base64-encoded.
pub const SIGNED_HEADER: &str = "Leasehold-Fence";

/// Prefix of every signed message: a key that signs fences can never be
/// made to sign something else that reads as a fence, nor the reverse.
const CONTEXT: &[u8] = b"leasehold signed fence\0";
const KEY_AT: usize = 1;
const TOKEN_AT: usize = 5;
const ISSUED_AT: usize = 13;
const RESOURCE_AT: usize = 21;
/// Bytes 0..BODY are signed; the signature follows.
const BODY: usize = 53;

/// A signing key's id: the first 4 bytes of SHA-256 over its public key,
/// shown as 8 hex digits (`3f9a1c0e`). Verifiers compute it from the public
/// key, so a key file needs no ids and an id cannot name the wrong key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub u32);

impl KeyId {
    /// The id of a 32-byte Ed25519 public key.
    pub fn of(public_key: &[u8; 32]) -> KeyId {
        let digest = Sha256::digest(public_key);
        KeyId(u32::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3],
        ]))
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl FromStr for KeyId {
    type Err = KeyError;

    /// Parses the 8 hex digits [`Display`](fmt::Display) prints.
    fn from_str(s: &str) -> Result<Self, KeyError> {
        if s.len() != 8 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(KeyError::BadId(s.to_owned()));
        }
        u32::from_str_radix(s, 16)
            .map(KeyId)
            .map_err(|_| KeyError::BadId(s.to_owned()))
    }
}

/// A public key, or its text form, that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// Not 32 bytes, not a point on the curve, or a weak (small-order) key.
    #[error("not an Ed25519 public key ({0}): expect `ed25519:` and 32 bytes in base64, as `leasehold keys export` prints")]
    BadKey(String),
    /// A key id that is not 8 hex digits.
    #[error("{0:?} is not a key id: expect 8 hex digits, as `leasehold keys list` prints")]
    BadId(String),
    /// A line of a key file names an id that is not its key's.
    #[error("line {line}: the id {given} does not belong to this key (its id is {actual}); copy the line again from `leasehold keys export`")]
    IdMismatch {
        /// The line, counting from 1.
        line: usize,
        /// The id the line gives.
        given: KeyId,
        /// The key's own id.
        actual: KeyId,
    },
    /// A line of a key file that is not `[ID] ed25519:BASE64 [active|retired]`.
    #[error("line {line}: {problem}; expect `[ID] ed25519:BASE64 [active|retired]`, as `leasehold keys export` prints")]
    BadLine {
        /// The line, counting from 1.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
}

/// An Ed25519 public key that verifies signed fences, with its [`KeyId`].
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    id: KeyId,
    key: VerifyingKey,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({} {})", self.id, self.to_text())
    }
}

impl PublicKey {
    /// A key from its 32 bytes; refuses invalid and weak (small-order) keys.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyError> {
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| KeyError::BadKey(format!("{} bytes, not 32", bytes.len())))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::BadKey("not a point on the curve".into()))?;
        if key.is_weak() {
            return Err(KeyError::BadKey("a weak (small-order) key".into()));
        }
        Ok(PublicKey {
            id: KeyId::of(&bytes),
            key,
        })
    }

    /// The key's 32 bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The text form: `ed25519:` and the 32 bytes in standard base64.
    pub fn to_text(&self) -> String {
        format!(
            "ed25519:{}",
            base64::engine::general_purpose::STANDARD.encode(self.key.as_bytes())
        )
    }

    /// Parses [`PublicKey::to_text`]'s form.
    pub fn from_text(text: &str) -> Result<Self, KeyError> {
        let b64 = text
            .strip_prefix("ed25519:")
            .ok_or_else(|| KeyError::BadKey(format!("{text:?} does not start with `ed25519:`")))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| KeyError::BadKey(format!("bad base64: {e}")))?;
        Self::from_bytes(&bytes)
    }
}

/// The coordinator's side: an Ed25519 signing key that signs fences. Its
/// `Debug` form never shows the secret.
#[derive(Clone)]
pub struct FenceSigner {
    id: KeyId,
    key: SigningKey,
}

impl fmt::Debug for FenceSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FenceSigner({} <secret redacted>)", self.id)
    }
}

impl FenceSigner {
    /// The signer for a 32-byte Ed25519 secret key (RFC 8032 seed). Draw
    /// the secret from the operating system's CSPRNG.
    pub fn from_secret(secret: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(secret);
        FenceSigner {
            id: KeyId::of(key.verifying_key().as_bytes()),
            key,
        }
    }

    /// The secret key's 32 bytes, to persist it. Keep them secret.
    pub fn secret_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// The public key storage verifies with.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            id: self.id,
            key: self.key.verifying_key(),
        }
    }

    /// Signs the fence for `token` on `resource`, granted at
    /// `issued_at_unix_ms`. Deterministic: the same inputs and key give the
    /// same bytes.
    pub fn sign(&self, resource: &str, token: u64, issued_at_unix_ms: u64) -> SignedFence {
        let mut bytes = [0u8; SIGNED_FENCE_LEN];
        bytes[0] = SIGNED_FENCE_VERSION;
        bytes[KEY_AT..TOKEN_AT].copy_from_slice(&self.id.0.to_be_bytes());
        bytes[TOKEN_AT..ISSUED_AT].copy_from_slice(&token.to_be_bytes());
        bytes[ISSUED_AT..RESOURCE_AT].copy_from_slice(&issued_at_unix_ms.to_be_bytes());
        bytes[RESOURCE_AT..BODY].copy_from_slice(&resource_digest(resource));
        let signature = self.key.sign(&message(&bytes));
        bytes[BODY..].copy_from_slice(&signature.to_bytes());
        SignedFence(bytes)
    }
}

fn resource_digest(resource: &str) -> [u8; 32] {
    Sha256::digest(resource.as_bytes()).into()
}

/// What is signed: the context, then the fence's first 53 bytes.
fn message(fence: &[u8; SIGNED_FENCE_LEN]) -> [u8; CONTEXT.len() + BODY] {
    let mut m = [0u8; CONTEXT.len() + BODY];
    m[..CONTEXT.len()].copy_from_slice(CONTEXT);
    m[CONTEXT.len()..].copy_from_slice(&fence[..BODY]);
    m
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Why a signed fence was refused. Each kind of bad fence has its own
/// variant; none of them lets the write through or moves the mark.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignedFenceError {
    /// The guard verifies signed fences and the request carries none.
    #[error("missing `{SIGNED_METADATA_KEY}` (HTTP: `{SIGNED_HEADER}`): this storage accepts only signed fences; attach the lease's signed fence (the client library's `attach` does)")]
    Missing,
    /// The signed fence was sent more than once.
    #[error("`{SIGNED_METADATA_KEY}` sent more than once: send exactly one signed fence")]
    Repeated,
    /// The text form is not base64.
    #[error("the signed fence is not base64 ({0}): send the {SIGNED_FENCE_LEN} bytes in standard base64")]
    Encoding(String),
    /// Shorter than a fence: cut somewhere on the way.
    #[error("truncated signed fence: {len} bytes, a version-1 fence has {SIGNED_FENCE_LEN}; send the fence exactly as the coordinator gave it")]
    Truncated {
        /// Its length.
        len: usize,
    },
    /// Longer than a fence.
    #[error("oversized signed fence: {len} bytes, a version-1 fence has {SIGNED_FENCE_LEN}; send the fence exactly as the coordinator gave it")]
    Oversized {
        /// Its length.
        len: usize,
    },
    /// A format version this verifier does not know.
    #[error("signed fence of version {version}; this verifier reads version {SIGNED_FENCE_VERSION}: upgrade the storage service's leasehold libraries")]
    UnknownVersion {
        /// The fence's first byte.
        version: u8,
    },
    /// Signed by a key this verifier does not have.
    #[error("signed fence from unknown key {key_id}: give this storage service the coordinator's current public keys (`leasehold keys export`)")]
    UnknownKey {
        /// The key the fence names.
        key_id: KeyId,
    },
    /// Signed by a key the coordinator has retired.
    #[error("signed fence from retired key {key_id}: the lease predates the key's retirement; re-acquire to get a fence signed with the current key")]
    RetiredKey {
        /// The key the fence names.
        key_id: KeyId,
    },
    /// The signature does not match the fence's bytes: forged, or changed
    /// after signing.
    #[error("the signed fence's signature does not verify with key {key_id}: it was forged or altered; refuse the write")]
    BadSignature {
        /// The key the fence names.
        key_id: KeyId,
    },
    /// A genuine fence, for another resource.
    #[error("the signed fence is for another resource, not {resource:?}: a lease fences only its own resource")]
    WrongResource {
        /// The resource the write is for.
        resource: String,
    },
    /// The plain `leasehold-token` disagrees with the signed token.
    #[error("`leasehold-token` says {plain} but the signed fence says {signed}: send the lease's own token, or no plain token")]
    TokenMismatch {
        /// The plain token sent.
        plain: u64,
        /// The token inside the signed fence.
        signed: u64,
    },
}

/// A signed fence's bytes, checked for length and version only: nothing
/// in it is trusted until [`FenceVerifier::verify_fence`] says so.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SignedFence([u8; SIGNED_FENCE_LEN]);

impl fmt::Debug for SignedFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SignedFence(key {}, {})",
            self.key_id(),
            self.to_base64()
        )
    }
}

impl SignedFence {
    /// Takes `bytes` as a fence after checking its length and version.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SignedFenceError> {
        let len = bytes.len();
        if let Some(&version) = bytes.first() {
            if version != SIGNED_FENCE_VERSION {
                return Err(SignedFenceError::UnknownVersion { version });
            }
        }
        match <[u8; SIGNED_FENCE_LEN]>::try_from(bytes) {
            Ok(b) => Ok(SignedFence(b)),
            Err(_) if len < SIGNED_FENCE_LEN => Err(SignedFenceError::Truncated { len }),
            Err(_) => Err(SignedFenceError::Oversized { len }),
        }
    }

    /// Parses the base64 text form (HTTP header; padded or not).
    pub fn from_base64(text: &[u8]) -> Result<Self, SignedFenceError> {
        let text = text.strip_suffix(b"=").unwrap_or(text);
        let text = text.strip_suffix(b"=").unwrap_or(text);
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(text)
            .map_err(|e| SignedFenceError::Encoding(e.to_string()))?;
        Self::from_bytes(&bytes)
    }

    /// The fence's bytes, as sent in `leasehold-fence-bin`.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The standard base64 form (padded), as sent in `Leasehold-Fence`.
    pub fn to_base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.0)
    }

    /// The id of the key that (the fence claims) signed it. Unverified.
    pub fn key_id(&self) -> KeyId {
        KeyId(u32::from_be_bytes([
            self.0[KEY_AT],
            self.0[KEY_AT + 1],
            self.0[KEY_AT + 2],
            self.0[KEY_AT + 3],
        ]))
    }
}

#[cfg(feature = "grpc")]
impl SignedFence {
    /// The signed fence in `metadata` (`leasehold-fence-bin`), if any.
    pub fn from_metadata(metadata: &MetadataMap) -> Result<Option<Self>, SignedFenceError> {
        let mut values = metadata.get_all_bin(SIGNED_METADATA_KEY).iter();
        let Some(first) = values.next() else {
            return Ok(None);
        };
        if values.next().is_some() {
            return Err(SignedFenceError::Repeated);
        }
        let bytes = first
            .to_bytes()
            .map_err(|e| SignedFenceError::Encoding(e.to_string()))?;
        Self::from_bytes(&bytes).map(Some)
    }

    /// Adds this fence to `req` as `leasehold-fence-bin`, replacing any
    /// there. Send it beside the plain fence ([`crate::attach`]).
    pub fn attach_to<T>(&self, req: &mut Request<T>) {
        crate::attach_signed(req, self.as_bytes());
    }
}

/// The storage side of a gRPC request with keys: verifies the request's
/// signed fence for `resource` (the request's `leasehold-resource`), checks
/// that the plain token, if the request sent one, is the signed one, and
/// returns the verified values. Use `verified.token`, never the plain one.
#[cfg(feature = "grpc")]
pub fn verify_metadata(
    metadata: &MetadataMap,
    resource: &str,
    plain_token: Option<u64>,
    verifier: &FenceVerifier,
) -> Result<VerifiedFence, SignedFenceError> {
    let fence = SignedFence::from_metadata(metadata)?.ok_or(SignedFenceError::Missing)?;
    let verified = verifier.verify_fence(&fence, resource)?;
    match plain_token {
        Some(plain) if plain != verified.token => Err(SignedFenceError::TokenMismatch {
            plain,
            signed: verified.token,
        }),
        _ => Ok(verified),
    }
}

#[cfg(feature = "grpc")]
impl From<SignedFenceError> for tonic::Status {
    /// Malformed fences are INVALID_ARGUMENT; fences that are well-formed
    /// but not to be trusted (forged, altered, another resource, an unknown
    /// or retired key, a disagreeing plain token) are PERMISSION_DENIED.
    fn from(e: SignedFenceError) -> Self {
        use SignedFenceError as E;
        match e {
            E::Missing
            | E::Repeated
            | E::Encoding(_)
            | E::Truncated { .. }
            | E::Oversized { .. }
            | E::UnknownVersion { .. } => tonic::Status::invalid_argument(e.to_string()),
            E::UnknownKey { .. }
            | E::RetiredKey { .. }
            | E::BadSignature { .. }
            | E::WrongResource { .. }
            | E::TokenMismatch { .. } => tonic::Status::permission_denied(e.to_string()),
        }
    }
}

/// What a verified fence says: trustworthy, since the coordinator signed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifiedFence {
    /// The key that signed it.
    pub key_id: KeyId,
    /// The fencing token: use this one, not a plain token from the request.
    pub token: u64,
    /// When the lease was granted (the coordinator's wall clock, Unix ms).
    pub issued_at_unix_ms: u64,
}

/// Whether a key still verifies fences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    /// Fences it signed are accepted.
    Active,
    /// Fences it signed are refused ([`SignedFenceError::RetiredKey`]).
    Retired,
}

impl KeyStatus {
    /// `active` or `retired`, as in key files.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyStatus::Active => "active",
            KeyStatus::Retired => "retired",
        }
    }
}

/// Storage's side: the coordinator's public keys, and the check of a
/// signed fence against the resource a write is for. Entirely offline.
///
/// Look-up is a scan (a coordinator has one signing key and, during a
/// rotation, a few more). An Ed25519 verification costs tens of
/// microseconds, so fences that verified are remembered (exact bytes and
/// resource, up to [`CACHE_ENTRIES`]): a lease's later writes, which send
/// the same fence, cost a hash look-up. Only fences that passed every check
/// under this verifier's keys are remembered, and changing the keys
/// ([`FenceVerifier::insert`]) forgets them all, so a cached answer is the
/// answer a full check would give. A clone starts with an empty cache.
#[derive(Debug)]
pub struct FenceVerifier {
    keys: Vec<(PublicKey, KeyStatus)>,
    cache: Option<Cache>,
}

impl Default for FenceVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Clone for FenceVerifier {
    fn clone(&self) -> Self {
        FenceVerifier {
            keys: self.keys.clone(),
            cache: self.cache.as_ref().map(|_| Cache::new()),
        }
    }
}

/// Most verified fences a [`FenceVerifier`] remembers.
pub const CACHE_ENTRIES: usize = 8192;
const CACHE_SHARDS: usize = 16;

type Remembered = std::collections::HashMap<[u8; SIGNED_FENCE_LEN], (Box<str>, VerifiedFence)>;

/// Fences that verified, in shards; a full shard is emptied (bounded, and
/// a live lease's fence is back after its next write).
struct Cache {
    shards: Box<[std::sync::Mutex<Remembered>]>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cache")
    }
}

impl Cache {
    fn new() -> Self {
        Cache {
            shards: (0..CACHE_SHARDS).map(|_| Default::default()).collect(),
        }
    }

    fn shard(&self, fence: &SignedFence) -> std::sync::MutexGuard<'_, Remembered> {
        // The signature's last byte: uniformly spread for genuine fences.
        let i = fence.0[SIGNED_FENCE_LEN - 1] as usize % CACHE_SHARDS;
        // A panic while holding a shard cannot leave it inconsistent.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, fence: &SignedFence, resource: &str) -> Option<VerifiedFence> {
        match self.shard(fence).get(&fence.0) {
            Some((r, verified)) if **r == *resource => Some(*verified),
            _ => None,
        }
    }

    fn put(&self, fence: &SignedFence, resource: &str, verified: VerifiedFence) {
        let mut shard = self.shard(fence);
        if shard.len() >= CACHE_ENTRIES / CACHE_SHARDS {
            shard.clear();
        }
        shard.insert(fence.0, (resource.into(), verified));
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }
}

impl FenceVerifier {
    /// A verifier that knows no key yet (it refuses every fence), with a
    /// cache of verified fences.
    pub fn new() -> Self {
        FenceVerifier {
            keys: Vec::new(),
            cache: Some(Cache::new()),
        }
    }

    /// The same verifier without the cache: every fence pays the full
    /// Ed25519 check (to measure it, or to save the cache's memory).
    pub fn uncached(mut self) -> Self {
        self.cache = None;
        self
    }

    /// Adds `key` (replacing a key with the same id), builder style.
    pub fn with_key(mut self, key: PublicKey, status: KeyStatus) -> Self {
        self.insert(key, status);
        self
    }

    /// Adds `key`, replacing a key with the same id, and forgets every
    /// fence verified so far.
    pub fn insert(&mut self, key: PublicKey, status: KeyStatus) {
        self.keys.retain(|(k, _)| k.id != key.id);
        self.keys.push((key, status));
        if let Some(cache) = &self.cache {
            cache.clear();
        }
    }

    /// The keys, in the order they were added.
    pub fn keys(&self) -> impl Iterator<Item = (&PublicKey, KeyStatus)> {
        self.keys.iter().map(|(k, s)| (k, *s))
    }

    /// Whether the verifier knows no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Verifies the fence in `bytes` for a write to `resource`.
    pub fn verify(&self, bytes: &[u8], resource: &str) -> Result<VerifiedFence, SignedFenceError> {
        self.verify_fence(&SignedFence::from_bytes(bytes)?, resource)
    }

    /// Verifies `fence` for a write to `resource`: a known, unretired key,
    /// a valid signature, then the resource. Returns the signed values.
    pub fn verify_fence(
        &self,
        fence: &SignedFence,
        resource: &str,
    ) -> Result<VerifiedFence, SignedFenceError> {
        let Some(cache) = &self.cache else {
            return self.check(fence, resource);
        };
        if let Some(verified) = cache.get(fence, resource) {
            return Ok(verified);
        }
        let verified = self.check(fence, resource)?;
        cache.put(fence, resource, verified);
        Ok(verified)
    }

    /// The full check, without the cache.
    fn check(
        &self,
        fence: &SignedFence,
        resource: &str,
    ) -> Result<VerifiedFence, SignedFenceError> {
        let key_id = fence.key_id();
        let (key, status) = self
            .keys
            .iter()
            .find(|(k, _)| k.id == key_id)
            .ok_or(SignedFenceError::UnknownKey { key_id })?;
        if *status == KeyStatus::Retired {
            return Err(SignedFenceError::RetiredKey { key_id });
        }
        let signature = Signature::from_bytes(
            fence.0[BODY..]
                .try_into()
                .map_err(|_| SignedFenceError::BadSignature { key_id })?,
        );
        key.key
            .verify_strict(&message(&fence.0), &signature)
            .map_err(|_| SignedFenceError::BadSignature { key_id })?;
        if fence.0[RESOURCE_AT..BODY] != resource_digest(resource) {
            return Err(SignedFenceError::WrongResource {
                resource: resource.to_owned(),
            });
        }
        Ok(VerifiedFence {
            key_id,
            token: u64_at(&fence.0, TOKEN_AT),
            issued_at_unix_ms: u64_at(&fence.0, ISSUED_AT),
        })
    }

    /// Reads a public key file: one key per line, `[ID] ed25519:BASE64
    /// [active|retired]` (the status defaults to active); blank lines and
    /// lines starting with `#` are skipped. `leasehold keys export` prints
    /// this form.
    pub fn from_key_file(text: &str) -> Result<Self, KeyError> {
        let mut verifier = FenceVerifier::new();
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields: Vec<&str> = line.split_whitespace().collect();
            let given = match fields.first() {
                Some(f) if !f.starts_with("ed25519:") => Some(fields.remove(0)),
                _ => None,
            };
            let (key, status) = match fields.as_slice() {
                [key] => (*key, KeyStatus::Active),
                [key, "active"] => (*key, KeyStatus::Active),
                [key, "retired"] => (*key, KeyStatus::Retired),
                _ => {
                    return Err(KeyError::BadLine {
                        line: line_no,
                        problem: format!("{line:?} has an unexpected shape"),
                    })
                }
            };
            let key = PublicKey::from_text(key).map_err(|e| KeyError::BadLine {
                line: line_no,
                problem: e.to_string(),
            })?;
            if let Some(given) = given {
                let given: KeyId = given.parse().map_err(|e: KeyError| KeyError::BadLine {
                    line: line_no,
                    problem: e.to_string(),
                })?;
                if given != key.id {
                    return Err(KeyError::IdMismatch {
                        line: line_no,
                        given,
                        actual: key.id,
                    });
                }
            }
            verifier.insert(key, status);
        }
        Ok(verifier)
    }

    /// The key file form [`FenceVerifier::from_key_file`] reads.
    pub fn to_key_file(&self) -> String {
        let mut out = String::from("# leasehold public keys: ID KEY STATUS\n");
        for (key, status) in &self.keys {
            out.push_str(&format!(
                "{} {} {}\n",
                key.id,
                key.to_text(),
                status.as_str()
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signer(seed: u8) -> FenceSigner {
        FenceSigner::from_secret(&[seed; 32])
    }

    #[test]
    fn the_cache_answers_as_the_full_check_would() {
        let (a, b) = (signer(1), signer(2));
        let mut v = verifier(&[(&a, KeyStatus::Active)]);
        let fence = a.sign("r", 5, 9);
        for _ in 0..3 {
            assert_eq!(v.verify(fence.as_bytes(), "r").unwrap().token, 5);
            // A remembered fence is still refused on another resource.
            assert!(matches!(
                v.verify(fence.as_bytes(), "s"),
                Err(SignedFenceError::WrongResource { .. })
            ));
        }
        // A clone with the key retired does not see the original's cache.
        let retired = v.clone().with_key(a.public_key(), KeyStatus::Retired);
        assert_eq!(
            retired.verify(fence.as_bytes(), "r"),
            Err(SignedFenceError::RetiredKey { key_id: a.id() })
        );
        // Retiring in place forgets what was verified.
        v.insert(a.public_key(), KeyStatus::Retired);
        assert_eq!(
            v.verify(fence.as_bytes(), "r"),
            Err(SignedFenceError::RetiredKey { key_id: a.id() })
        );
        // The cache stays bounded.
        let v = verifier(&[(&b, KeyStatus::Active)]);
        for t in 0..(CACHE_ENTRIES as u64 + 100) / 8 {
            v.verify(b.sign("r", t, 0).as_bytes(), "r").unwrap();
        }
        let cached: usize = v
            .cache
            .as_ref()
            .unwrap()
            .shards
            .iter()
            .map(|s| s.lock().unwrap().len())
            .sum();
        assert!(cached <= CACHE_ENTRIES, "{cached}");
    }

    fn verifier(signers: &[(&FenceSigner, KeyStatus)]) -> FenceVerifier {
        signers.iter().fold(FenceVerifier::new(), |v, (s, status)| {
            v.with_key(s.public_key(), *status)
        })
    }

    #[test]
    fn layout_is_as_documented() {
        let s = signer(1);
        let f = s.sign("orders", 0x0102_0304_0506_0708, 0x1112_1314_1516_1718);
        let b = f.as_bytes();
        assert_eq!(b.len(), SIGNED_FENCE_LEN);
        assert!(b.len() < 200);
        assert_eq!(b[0], 1);
        assert_eq!(&b[1..5], &s.id().0.to_be_bytes());
        assert_eq!(&b[5..13], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            &b[13..21],
            &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
        );
        assert_eq!(&b[21..53], Sha256::digest(b"orders").as_slice());
        // The signature is plain Ed25519 over the context and bytes 0..53.
        let mut msg = b"leasehold signed fence\0".to_vec();
        msg.extend_from_slice(&b[..53]);
        let sig = Signature::from_bytes(b[53..].try_into().unwrap());
        s.public_key().key.verify_strict(&msg, &sig).unwrap();
        // Deterministic.
        assert_eq!(
            f,
            s.sign("orders", 0x0102_0304_0506_0708, 0x1112_1314_1516_1718)
        );
        // The id is SHA-256 of the public key, first four bytes.
        let pk = s.public_key().to_bytes();
        assert_eq!(s.id().0.to_be_bytes(), Sha256::digest(pk)[..4]);
    }

    #[test]
    fn every_kind_of_bad_fence_has_its_own_error() {
        let (a, b) = (signer(1), signer(2));
        let v = verifier(&[(&a, KeyStatus::Active)]);
        let good = a.sign("r", 5, 9);
        let mut max = good.as_bytes().to_vec();
        max[5..13].copy_from_slice(&u64::MAX.to_be_bytes());
        let mut v2 = good.as_bytes().to_vec();
        v2[0] = 2;
        let mut long = good.as_bytes().to_vec();
        long.push(0);
        let retired = verifier(&[(&a, KeyStatus::Retired)]);
        type Case<'a> = (&'a FenceVerifier, Vec<u8>, &'a str, SignedFenceError);
        let cases: Vec<Case> = vec![
            (
                &v,
                max,
                "r",
                SignedFenceError::BadSignature { key_id: a.id() },
            ),
            (
                &v,
                good.as_bytes()[..116].to_vec(),
                "r",
                SignedFenceError::Truncated { len: 116 },
            ),
            (&v, Vec::new(), "r", SignedFenceError::Truncated { len: 0 }),
            (&v, long, "r", SignedFenceError::Oversized { len: 118 }),
            (&v, v2, "r", SignedFenceError::UnknownVersion { version: 2 }),
            (
                &v,
                b.sign("r", 5, 9).as_bytes().to_vec(),
                "r",
                SignedFenceError::UnknownKey { key_id: b.id() },
            ),
            (
                &retired,
                good.as_bytes().to_vec(),
                "r",
                SignedFenceError::RetiredKey { key_id: a.id() },
            ),
            (
                &v,
                good.as_bytes().to_vec(),
                "s",
                SignedFenceError::WrongResource {
                    resource: "s".into(),
                },
            ),
        ];
        for (verifier, bytes, resource, want) in cases {
            assert_eq!(
                verifier.verify(&bytes, resource),
                Err(want.clone()),
                "{want:?}"
            );
        }
        assert_eq!(
            v.verify(good.as_bytes(), "r"),
            Ok(VerifiedFence {
                key_id: a.id(),
                token: 5,
                issued_at_unix_ms: 9
            })
        );
    }

    #[test]
    fn a_key_with_a_forged_id_cannot_sign_for_another() {
        // A forger's fence that claims the real key's id fails the signature.
        let (real, forger) = (signer(1), signer(2));
        let v = verifier(&[(&real, KeyStatus::Active)]);
        let mut bytes = forger.sign("r", u64::MAX, 0).as_bytes().to_vec();
        bytes[1..5].copy_from_slice(&real.id().0.to_be_bytes());
        assert_eq!(
            v.verify(&bytes, "r"),
            Err(SignedFenceError::BadSignature { key_id: real.id() })
        );
    }

    #[test]
    fn rotation_keeps_old_fences_until_retired() {
        let (old, new) = (signer(1), signer(2));
        let fence = old.sign("r", 3, 0);
        let both = verifier(&[(&old, KeyStatus::Active), (&new, KeyStatus::Active)]);
        assert_eq!(both.verify(fence.as_bytes(), "r").unwrap().token, 3);
        assert_eq!(
            both.verify(new.sign("r", 4, 0).as_bytes(), "r")
                .unwrap()
                .token,
            4
        );
        let retired = both.with_key(old.public_key(), KeyStatus::Retired);
        assert_eq!(
            retired.verify(fence.as_bytes(), "r"),
            Err(SignedFenceError::RetiredKey { key_id: old.id() })
        );
    }

    #[test]
    fn text_forms_round_trip() {
        let s = signer(3);
        let f = s.sign("café", 7, 8);
        let text = f.to_base64();
        assert_eq!(SignedFence::from_base64(text.as_bytes()).unwrap(), f);
        assert_eq!(
            SignedFence::from_base64(text.trim_end_matches('=').as_bytes()).unwrap(),
            f
        );
        assert!(matches!(
            SignedFence::from_base64(b"!!"),
            Err(SignedFenceError::Encoding(_))
        ));
        let pk = s.public_key();
        assert_eq!(PublicKey::from_text(&pk.to_text()).unwrap(), pk);
        assert_eq!(pk.id().to_string().parse::<KeyId>().unwrap(), pk.id());
        assert!("xyz".parse::<KeyId>().is_err());
    }

    #[test]
    fn key_files_round_trip_and_refuse_mistakes() {
        let (a, b) = (signer(1), signer(2));
        let v = verifier(&[(&a, KeyStatus::Retired), (&b, KeyStatus::Active)]);
        let text = v.to_key_file();
        let back = FenceVerifier::from_key_file(&text).unwrap();
        let keys: Vec<_> = back.keys().map(|(k, s)| (k.id(), s)).collect();
        assert_eq!(
            keys,
            vec![(a.id(), KeyStatus::Retired), (b.id(), KeyStatus::Active)]
        );
        // A bare key is active.
        let bare = FenceVerifier::from_key_file(&format!("\n# c\n{}\n", b.public_key().to_text()))
            .unwrap();
        assert_eq!(
            bare.keys().next().map(|(k, s)| (k.id(), s)),
            Some((b.id(), KeyStatus::Active))
        );
        let wrong_id = format!("{} {}", a.id(), b.public_key().to_text());
        assert!(matches!(
            FenceVerifier::from_key_file(&wrong_id),
            Err(KeyError::IdMismatch { line: 1, .. })
        ));
        for bad in [
            "ed25519:AAAA",
            "zz ed25519:AAAA",
            "ed25519:AAAA frozen",
            "nonsense",
        ] {
            assert!(
                matches!(
                    FenceVerifier::from_key_file(bad),
                    Err(KeyError::BadLine { line: 1, .. })
                ),
                "{bad}"
            );
        }
        // A small-order point is refused as a key.
        let mut weak = [0u8; 32];
        weak[0] = 1; // the identity point
        assert!(matches!(
            PublicKey::from_bytes(&weak),
            Err(KeyError::BadKey(_))
        ));
    }

    #[cfg(feature = "grpc")]
    use tonic::metadata::BinaryMetadataValue;

    #[cfg(feature = "grpc")]
    #[test]
    fn metadata_carries_the_fence_and_the_plain_token_must_agree() {
        let s = signer(4);
        let v = verifier(&[(&s, KeyStatus::Active)]);
        let fence = s.sign("r", 12, 0);
        let mut req = Request::new(());
        crate::attach(&mut req, "r", 12).unwrap();
        fence.attach_to(&mut req);
        let md = req.metadata();
        assert_eq!(verify_metadata(md, "r", Some(12), &v).unwrap().token, 12);
        assert_eq!(verify_metadata(md, "r", None, &v).unwrap().token, 12);
        assert_eq!(
            verify_metadata(md, "r", Some(13), &v),
            Err(SignedFenceError::TokenMismatch {
                plain: 13,
                signed: 12
            })
        );
        assert_eq!(
            verify_metadata(&MetadataMap::new(), "r", Some(12), &v),
            Err(SignedFenceError::Missing)
        );
        let mut twice = Request::new(());
        twice.metadata_mut().append_bin(
            SIGNED_METADATA_KEY,
            BinaryMetadataValue::from_bytes(fence.as_bytes()),
        );
        twice.metadata_mut().append_bin(
            SIGNED_METADATA_KEY,
            BinaryMetadataValue::from_bytes(fence.as_bytes()),
        );
        assert_eq!(
            verify_metadata(twice.metadata(), "r", None, &v),
            Err(SignedFenceError::Repeated)
        );
        let codes: Vec<tonic::Code> = [
            SignedFenceError::Truncated { len: 3 },
            SignedFenceError::BadSignature { key_id: s.id() },
        ]
        .into_iter()
        .map(|e| tonic::Status::from(e).code())
        .collect();
        assert_eq!(
            codes,
            vec![tonic::Code::InvalidArgument, tonic::Code::PermissionDenied]
        );
    }

    proptest! {
        /// Any single-byte change, anywhere in the fence, is refused.
        #[test]
        fn every_single_byte_change_is_refused(
            position in 0..SIGNED_FENCE_LEN,
            delta in 1u8..=255,
            token in any::<u64>(),
        ) {
            let s = signer(9);
            let v = verifier(&[(&s, KeyStatus::Active)]);
            let mut bytes = s.sign("orders/eu", token, 1_700_000_000_000).as_bytes().to_vec();
            prop_assert!(v.verify(&bytes, "orders/eu").is_ok());
            bytes[position] = bytes[position].wrapping_add(delta);
            prop_assert!(v.verify(&bytes, "orders/eu").is_err(), "byte {} + {} accepted", position, delta);
        }
    }
}
