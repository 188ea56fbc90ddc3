//! Guarded writes with signed fences (feature `signed`): the guard takes
//! the token from a fence the coordinator signed, never from the client.
//!
//! Without keys a guard trusts the token the client sends: a client that
//! sends `u64::MAX` raises the mark to the top and every honest writer of
//! that resource is refused from then on, and a client can present a real
//! token of one resource on another. Given the coordinator's public keys
//! ([`FenceVerifier`]), the methods here first verify the request's signed
//! fence for the very resource written (offline: no call to the
//! coordinator), then apply the usual rule with the token inside it. A
//! fence that is forged, altered, truncated, for another resource, or
//! signed by an unknown or retired key is refused with its own
//! [`SignedFenceError`] variant, before the guard is consulted: the mark
//! does not move and nothing is written.
//!
//! ```
//! use leasehold_fence::signed::{FenceSigner, FenceVerifier, KeyStatus, SignedFenceError};
//! use leasehold_guard::{MemoryGuard, SignedWriteError};
//!
//! let coordinator = FenceSigner::from_secret(&[7; 32]);
//! let verifier = FenceVerifier::new().with_key(coordinator.public_key(), KeyStatus::Active);
//! let guard = MemoryGuard::new();
//!
//! let fence = coordinator.sign("orders", 34, 0);
//! guard.check_signed(&verifier, "orders", fence.as_bytes())?;
//! assert_eq!(guard.highest("orders"), Some(34));
//!
//! // A forged fence claiming u64::MAX is refused; the mark stays at 34.
//! let mut forged = fence.as_bytes().to_vec();
//! forged[5..13].copy_from_slice(&u64::MAX.to_be_bytes());
//! let err = guard.check_signed(&verifier, "orders", &forged).unwrap_err();
//! assert!(matches!(err, SignedWriteError::Fence(SignedFenceError::BadSignature { .. })));
//! assert_eq!(guard.highest("orders"), Some(34));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::convert::Infallible;

use leasehold_fence::signed::{FenceVerifier, SignedFenceError};

use crate::{Admitted, GuardError, MemoryGuard};

/// Why a write with a signed fence was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SignedWriteError<E = Infallible> {
    /// The signed fence did not verify; the guard was not consulted, the
    /// mark did not move and nothing was written.
    #[error(transparent)]
    Fence(#[from] SignedFenceError),
    /// The fence verified; the guard refused or failed as for a plain token.
    #[error(transparent)]
    Guard(#[from] GuardError<E>),
}

impl MemoryGuard {
    /// [`MemoryGuard::check_and_record`] with the token of a verified
    /// signed fence: `fence` must be the coordinator's signed fence for
    /// `resource`.
    pub fn check_signed(
        &self,
        verifier: &FenceVerifier,
        resource: &str,
        fence: &[u8],
    ) -> Result<Admitted, SignedWriteError> {
        let verified = verifier.verify(fence, resource)?;
        Ok(self.check_and_record(resource, verified.token)?)
    }

    /// [`MemoryGuard::write`] with the token of a verified signed fence.
    pub fn write_signed<T, E, F>(
        &self,
        verifier: &FenceVerifier,
        resource: &str,
        fence: &[u8],
        f: F,
    ) -> Result<T, SignedWriteError<E>>
    where
        F: FnOnce() -> Result<T, E>,
    {
        let verified = verifier.verify(fence, resource)?;
        Ok(self.write(resource, verified.token, f)?)
    }
}

#[cfg(feature = "sled")]
impl crate::SledGuard {
    /// [`SledGuard::insert`](crate::SledGuard::insert) with the token of a
    /// verified signed fence for `resource`.
    pub fn insert_signed<K, V>(
        &self,
        verifier: &FenceVerifier,
        resource: &str,
        fence: &[u8],
        data: &sled::Tree,
        key: K,
        value: V,
    ) -> Result<Option<sled::IVec>, SignedWriteError>
    where
        K: AsRef<[u8]>,
        V: Into<sled::IVec>,
    {
        let verified = verifier.verify(fence, resource)?;
        Ok(self.insert(resource, verified.token, data, key, value)?)
    }

    /// [`SledGuard::write`](crate::SledGuard::write) with the token of a
    /// verified signed fence for `resource`.
    pub fn write_signed<T, E, F>(
        &self,
        verifier: &FenceVerifier,
        resource: &str,
        fence: &[u8],
        data: &sled::Tree,
        f: F,
    ) -> Result<T, SignedWriteError<E>>
    where
        F: Fn(&sled::transaction::TransactionalTree) -> crate::TxResult<T, E>,
    {
        let verified = verifier.verify(fence, resource)?;
        Ok(self.write(resource, verified.token, data, f)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_fence::signed::{FenceSigner, KeyStatus, SIGNED_FENCE_LEN};
    use proptest::prelude::*;

    fn setup() -> (FenceSigner, FenceVerifier, MemoryGuard) {
        let signer = FenceSigner::from_secret(&[3; 32]);
        let verifier = FenceVerifier::new().with_key(signer.public_key(), KeyStatus::Active);
        (signer, verifier, MemoryGuard::new())
    }

    #[test]
    fn every_refusal_leaves_the_mark_where_it_was() {
        let (signer, verifier, guard) = setup();
        let stranger = FenceSigner::from_secret(&[4; 32]);
        guard
            .check_signed(&verifier, "a", signer.sign("a", 10, 0).as_bytes())
            .unwrap();
        let mut forged_max = signer.sign("a", 10, 0).as_bytes().to_vec();
        forged_max[5..13].copy_from_slice(&u64::MAX.to_be_bytes());
        let retired = verifier
            .clone()
            .with_key(signer.public_key(), KeyStatus::Retired);
        let b_fence = signer.sign("b", 50, 0);
        let cases: Vec<(&FenceVerifier, Vec<u8>, SignedFenceError)> = vec![
            (
                &verifier,
                forged_max,
                SignedFenceError::BadSignature {
                    key_id: signer.id(),
                },
            ),
            (
                &verifier,
                b_fence.as_bytes().to_vec(),
                SignedFenceError::WrongResource {
                    resource: "a".into(),
                },
            ),
            (
                &verifier,
                b_fence.as_bytes()[..60].to_vec(),
                SignedFenceError::Truncated { len: 60 },
            ),
            (
                &verifier,
                stranger.sign("a", 99, 0).as_bytes().to_vec(),
                SignedFenceError::UnknownKey {
                    key_id: stranger.id(),
                },
            ),
            (
                &retired,
                signer.sign("a", 11, 0).as_bytes().to_vec(),
                SignedFenceError::RetiredKey {
                    key_id: signer.id(),
                },
            ),
        ];
        for (v, fence, want) in cases {
            let err = guard.check_signed(v, "a", &fence).unwrap_err();
            assert!(
                matches!(&err, SignedWriteError::Fence(e) if *e == want),
                "{want:?}: {err:?}"
            );
            assert_eq!(guard.highest("a"), Some(10), "{want:?}");
            let ran = guard.write_signed(v, "a", &fence, || Ok::<_, Infallible>(()));
            assert!(ran.is_err());
            assert_eq!(guard.highest("a"), Some(10), "{want:?}");
        }
        // Resource b was never written by the fence presented on a.
        assert_eq!(guard.highest("b"), None);
        // A genuine newer fence moves the mark; the stale one is refused by the rule.
        guard
            .check_signed(&verifier, "a", signer.sign("a", 12, 0).as_bytes())
            .unwrap();
        let stale = guard.check_signed(&verifier, "a", signer.sign("a", 11, 0).as_bytes());
        assert!(matches!(
            stale,
            Err(SignedWriteError::Guard(GuardError::StaleToken {
                offered: 11,
                highest: 12,
                ..
            }))
        ));
    }

    #[cfg(feature = "sled")]
    #[test]
    fn sled_paths_use_the_signed_token() {
        let (signer, verifier, _) = setup();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let data = db.open_tree("d").unwrap();
        let guard = crate::SledGuard::open(&db).unwrap();
        guard
            .insert_signed(
                &verifier,
                "r",
                signer.sign("r", 5, 0).as_bytes(),
                &data,
                "k",
                "v",
            )
            .unwrap();
        let mut forged = signer.sign("r", 5, 0).as_bytes().to_vec();
        forged[12] ^= 1;
        assert!(guard
            .insert_signed(&verifier, "r", &forged, &data, "k", "evil")
            .is_err());
        let err = guard
            .write_signed(&verifier, "r", &forged, &data, |tx| -> crate::TxResult {
                tx.insert("k", "evil")?;
                Ok(())
            })
            .unwrap_err();
        assert!(matches!(
            err,
            SignedWriteError::Fence(SignedFenceError::BadSignature { .. })
        ));
        assert_eq!(guard.highest("r").unwrap(), Some(5));
        assert_eq!(data.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    proptest! {
        /// Any single-byte change of a genuine fence is refused by the
        /// guard, and the mark stays where the genuine fence put it.
        #[test]
        fn a_changed_byte_never_moves_the_mark(position in 0..SIGNED_FENCE_LEN, delta in 1u8..=255) {
            let (signer, verifier, guard) = setup();
            let fence = signer.sign("r", 1000, 1);
            guard.check_signed(&verifier, "r", fence.as_bytes()).unwrap();
            let mut bytes = fence.as_bytes().to_vec();
            bytes[position] = bytes[position].wrapping_add(delta);
            prop_assert!(guard.check_signed(&verifier, "r", &bytes).is_err());
            prop_assert_eq!(guard.highest("r"), Some(1000));
        }
    }
}
