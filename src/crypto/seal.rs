use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

use super::{random_bytes, Secret};

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Bytes a sealed blob adds to its plaintext: random nonce + GCM tag.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// AES-256-GCM key that seals metadata. Every seal uses a fresh random nonce, so the same
/// record sealed twice never repeats; `aad` binds a blob to its place (file, sequence number).
#[derive(Clone)]
pub struct SealKey {
    cipher: Aes256Gcm,
}

/// The tag did not verify: wrong key, or the bytes were changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("authentication failed (wrong key or corrupted data)")]
pub struct AuthError;

impl SealKey {
    pub fn new(key: &Secret) -> SealKey {
        assert_eq!(key.len(), 32, "seal keys are 256-bit");
        SealKey { cipher: Aes256Gcm::new_from_slice(key.expose()).expect("32-byte key") }
    }

    /// nonce || ciphertext || tag
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        random_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .expect("AES-GCM encryption cannot fail for in-range lengths");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Secret, AuthError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad })
            .map(Secret::new)
            .map_err(|_| AuthError)
    }
}

impl fmt::Debug for SealKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKey([REDACTED])")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper_detection() {
        let k = SealKey::new(&Secret::random(32));
        let a = k.seal(b"aad", b"hello");
        let b = k.seal(b"aad", b"hello");
        assert_ne!(a, b, "fresh nonce per seal");
        assert_eq!(k.open(b"aad", &a).unwrap().expose(), b"hello");
        assert_eq!(k.open(b"other", &a), Err(AuthError));
        for i in 0..a.len() {
            let mut t = a.clone();
            t[i] ^= 0x01;
            assert_eq!(k.open(b"aad", &t), Err(AuthError), "bit flip at {i}");
        }
        let other = SealKey::new(&Secret::random(32));
        assert_eq!(other.open(b"aad", &a), Err(AuthError));
        assert_eq!(k.open(b"aad", &a[..10]), Err(AuthError));
    }
}
