//! What can go wrong with the file dictionary, each error naming the file and what to do.

use std::path::PathBuf;


use crate::codec::HeaderError;

#[derive(Debug, thiserror::Error)]
pub enum DictError {
    #[error(transparent)]
    Io(#[from] crate::error::IoError),

    #[error("{path} ({what}) is damaged at byte {offset}: {reason}. Nothing was modified. {}", repair_hint(.what))]
    Damaged { path: PathBuf, what: &'static str, offset: u64, reason: String },

    #[error("{path}: {err}. Nothing was modified. {}", header_hint(.err))]
    Header { path: PathBuf, err: HeaderError },

    #[error("{path} belongs to another tdefs instance (it was not written with this key dictionary); \
             was a .tdefs directory assembled from different backups?")]
    Foreign { path: PathBuf },

    #[error("the file dictionary in {dir} is incomplete: {what}. Nothing was modified; restore the \
             .tdefs directory from a backup")]
    Missing { dir: PathBuf, what: String },

    #[error("the file dictionary is read-only after an earlier write failure ({0}); unmount, fix the \
             disk, and mount again (the dictionary recovers to its last durable record)")]
    Failed(String),

    #[error("no space left on the backing filesystem for the dictionary log")]
    NoSpace,

    #[error("internal inconsistency in the file dictionary: {0}")]
    Inconsistent(String),

    #[error("the file dictionary in {dir} is older than the key dictionary records: {what}. The .tdefs \
             directory was partly restored from an older backup, a log file was deleted, or a log was cut. \
             Nothing was modified. Restore the whole .tdefs directory from one backup, the one that matches \
             the data; `tdefs check --repair` accepts the dictionary as it is and lists every file that then \
             has no record (those are refused, never read or written as plaintext)")]
    RolledBack { dir: PathBuf, what: String },

    #[error("cannot record the file dictionary's position in the key dictionary: {0}")]
    Mark(String),
}

pub(super) fn repair_hint(what: &str) -> &'static str {
    if what == LOG_WHAT {
        "Restore the .tdefs directory from a backup, or run `tdefs check --repair` to keep every \
         record before the damage (a copy of the damaged log is kept; files created or renamed after \
         that point may read as noise)"
    } else {
        "Restore the .tdefs directory from a backup"
    }
}

pub(super) fn header_hint(e: &HeaderError) -> &'static str {
    match e {
        HeaderError::NewerVersion(_) => "",
        _ => "The file is damaged or not tdefs' own: restore the .tdefs directory from a backup",
    }
}

pub(super) const LOG_WHAT: &str = "file dictionary log";

impl DictError {
    /// errno for a FUSE reply.
    pub fn errno(&self) -> i32 {
        match self {
            DictError::NoSpace => libc::ENOSPC,
            DictError::Io(e) => e.errno(),
            _ => libc::EIO,
        }
    }
}
