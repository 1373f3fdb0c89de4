use std::fmt;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use zeroize::Zeroize;

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

/// The sealing keys of the file dictionary, derived from the dictionary key with
/// HKDF-SHA256: one per log generation and one per snapshot. Each seal picks a random
/// 96-bit nonce, which is safe for up to 2^32 seals per key (NIST SP 800-38D); a
/// generation seals at most `file-dictionary-rewrite-threshold` records (at most 2^30,
/// and compaction starts a new generation), so no key comes near that bound however long
/// a mount runs. The key dictionary itself is sealed with the dictionary key directly,
/// once per rewrite of that small file.
pub struct SealKeys {
    root: Secret,
    salt: [u8; 16],
}

impl SealKeys {
    /// `salt`: the instance id, so two instances never share a derived key.
    pub fn new(root: &Secret, salt: [u8; 16]) -> SealKeys {
        SealKeys { root: root.clone(), salt }
    }

    fn derive(&self, label: &[u8], gen: u64) -> SealKey {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(&self.salt), self.root.expose());
        let mut okm = [0u8; 32];
        let info = [label, &gen.to_le_bytes()].concat();
        hk.expand(&info, &mut okm).expect("32 bytes is a valid HKDF-SHA256 length");
        let key = Secret::new(okm.to_vec());
        okm.zeroize();
        SealKey::new(&key)
    }

    /// Seals the records of log generation `gen`.
    pub fn log(&self, gen: u64) -> SealKey {
        self.derive(b"tdefs file dictionary log", gen)
    }

    /// Seals the chunks of the snapshot that covers the logs up to generation `gen`.
    pub fn snapshot(&self, gen: u64) -> SealKey {
        self.derive(b"tdefs file dictionary snapshot", gen)
    }

    /// Format 1 sealed every log record and snapshot chunk with the dictionary key itself.
    pub fn legacy(&self) -> SealKey {
        SealKey::new(&self.root)
    }
}

impl fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SealKeys([REDACTED])")
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

    #[test]
    fn derived_keys_differ_per_generation_kind_and_instance() {
        let root = Secret::random(32);
        let ks = SealKeys::new(&root, [1; 16]);
        let blob = ks.log(7).seal(b"", b"record");
        assert!(ks.log(7).open(b"", &blob).is_ok(), "deterministic derivation");
        assert_eq!(ks.log(8).open(b"", &blob), Err(AuthError));
        assert_eq!(ks.snapshot(7).open(b"", &blob), Err(AuthError));
        assert_eq!(ks.legacy().open(b"", &blob), Err(AuthError));
        assert_eq!(SealKeys::new(&root, [2; 16]).log(7).open(b"", &blob), Err(AuthError));
        assert_eq!(format!("{ks:?}"), "SealKeys([REDACTED])");
    }
}
