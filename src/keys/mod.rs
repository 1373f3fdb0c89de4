//! Key hierarchy (envelope encryption, as in TiKV):
//!
//! master key (file / AWS KMS / Vault Transit / KMIP / plaintext backend)
//!   └─ wraps the *dictionary key* (AES-256), stored in `.tdefs/keys`
//!        ├─ seals the data keys (in the same file)
//!        └─ seals every file-dictionary record and snapshot chunk
//!
//! Rotating the master key therefore rewrites one small file; rotating data keys adds a key.

mod error;
mod kmip;
mod kms;
mod master;
mod store;
mod ttlv;
mod vault;

pub use error::KeyError;
pub use master::{backend_for, generate_key_file, load_key_file, FileBackend, MasterKeyBackend, PlaintextBackend};
pub use store::{DataKey, KeyStore, KEYS_FILE};
