//! tdefs: transparent data encryption at rest for unmodified databases, as a FUSE filesystem.
//!
//! Module map (one concern each, mirroring the architecture):
//! - [`codec`]: the byte format every metadata file shares (header, bounds-checked codec).
//! - [`config`]: TOML configuration.
//! - [`crypto`]: per-file ciphers (XTS and CTR) and metadata sealing.
//! - [`keys`]: master-key backends and the data-key store.
//! - [`dictionary`]: the durable file dictionary (records, log, snapshot).
//! - [`metadir`]: the `.tdefs` metadata directory: initialisation, opening, locking.
//! - [`layout`]: the 4 KiB block layout of backing files (hole rule arithmetic).
//! - [`error`]: the I/O error with its operation and path, shared by every layer.
//! - [`fs`]: the FUSE adapter (inodes, handles, data path).
//! - [`control`]: the control socket of a running mount.
//! - [`convert`]: `tdefs encrypt` / `decrypt`: converting existing data, offline.
//! - [`metrics`]: Prometheus metrics of a running mount.
//! - [`hooks`]: named points where crash and interleaving tests step in.
//! - [`walk`]: the one walker of a backing tree (iterative, by descriptors).
//! - [`sys`]: the system calls (rustix; `openat2` confined to the backing root).
//! - [`cli`]: the command line.

pub mod cli;
pub mod codec;
pub mod config;
pub mod control;
pub mod convert;
pub mod crypto;
pub mod dictionary;
pub mod error;
pub mod fs;
pub mod hooks;
pub mod keys;
pub mod layout;
pub mod metadir;
pub mod metrics;
pub mod sys;
pub mod walk;
