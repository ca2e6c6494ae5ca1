//! Key material: [`Secret`] holds key bytes, keeps them out of `Debug` and
//! `Display`, and wipes them on drop; [`ct_eq`] compares MACs in constant
//! time.
//!
//! Reading secrets from files or the environment belongs to `config`, and the
//! key-file syntax to `spa::keyfile`; this module only owns the bytes.

use std::fmt;

use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Key bytes that never show up in logs and are zeroed when dropped.
///
/// The bytes live in a boxed slice that is never resized, so no stale copy is
/// left behind by a reallocation.
#[derive(Clone)]
pub struct Secret(Box<[u8]>);

impl Secret {
    /// Takes ownership of `bytes`, wiping the vector's whole buffer (spare
    /// capacity included) after copying it.
    pub fn new(mut bytes: Vec<u8>) -> Self {
        let secret = Self::from_slice(&bytes);
        // Vec::zeroize also clears the spare capacity, which
        // into_boxed_slice would have freed unwiped.
        bytes.zeroize();
        secret
    }

    /// Copies `bytes`; the caller still owns (and should wipe) the original.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self(bytes.into())
    }

    /// `len` fresh bytes from a cryptographic RNG.
    pub fn generate(len: usize, rng: &mut impl rand::CryptoRng) -> Self {
        let mut bytes = vec![0u8; len].into_boxed_slice();
        rng.fill_bytes(&mut bytes);
        Self(bytes)
    }

    /// The key bytes. Named so that every use stands out in review.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Vec<u8>> for Secret {
    fn from(bytes: Vec<u8>) -> Self {
        Self::new(bytes)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ZeroizeOnDrop for Secret {}

/// Constant-time, so comparing a configured key with a candidate leaks
/// nothing but the length.
impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        ct_eq(&self.0, &other.0)
    }
}

impl Eq for Secret {}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Compares two MACs (or any authenticators) in time that depends only on
/// their lengths, never on where they first differ.
///
/// Lengths are public (a MAC's length follows from its algorithm), so
/// slices of different lengths are simply unequal.
///
/// ```
/// use hmac::{Hmac, KeyInit, Mac};
/// use portcullis::secret::ct_eq;
/// use sha2::Sha256;
///
/// let mut mac = Hmac::<Sha256>::new_from_slice(b"hmac key").expect("hmac takes any key length");
/// mac.update(b"message");
/// let tag = mac.finalize().into_bytes();
///
/// let mut received = tag;
/// assert!(ct_eq(&tag, &received));
/// received[31] ^= 1;
/// assert!(!ct_eq(&tag, &received));
/// assert!(!ct_eq(&tag, &tag[..16]));
/// ```
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    // Lengths are public (tags have fixed sizes); contents are not: every
    // byte pair is folded in, with no early exit, and only the folded
    // difference meets a branch, through subtle's barrier (subtle's own
    // slice comparison puts a barrier on every byte).
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    diff.ct_eq(&0).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let secret = Secret::from_slice(b"hunter2");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        assert_eq!(format!("{secret}"), "Secret(<redacted>)");
        assert_eq!(format!("{:?}", Some(&secret)), "Some(Secret(<redacted>))");
    }

    #[test]
    fn constructors_keep_the_bytes() {
        assert_eq!(Secret::new(b"abc".to_vec()).expose(), b"abc");
        assert_eq!(Secret::from(b"abc".to_vec()).expose(), b"abc");
        assert_eq!(Secret::from_slice(b"abc").len(), 3);
        assert!(Secret::from_slice(b"").is_empty());
        let mut rng = rand::rng();
        let a = Secret::generate(32, &mut rng);
        let b = Secret::generate(32, &mut rng);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn equality_is_by_value() {
        assert_eq!(Secret::from_slice(b"k1"), Secret::from_slice(b"k1"));
        assert_ne!(Secret::from_slice(b"k1"), Secret::from_slice(b"k2"));
        assert_ne!(Secret::from_slice(b"k1"), Secret::from_slice(b"k10"));
    }

    #[test]
    fn ct_eq_compares_content_and_length() {
        assert!(ct_eq(b"", b""));
        assert!(ct_eq(b"tag", b"tag"));
        assert!(!ct_eq(b"tag", b"tab"));
        assert!(!ct_eq(b"tag", b"tags"));
    }
}
