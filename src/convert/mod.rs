//! Converting data that exists outside tdefs' encryption: `tdefs encrypt` turns files
//! tracked as plaintext into encrypted ones in place, `tdefs decrypt` exports plaintext
//! copies (for leaving tdefs). Both work on an unmounted backing directory, holding its
//! lock, and can be interrupted at any instant and run again.
//!
//! - [`select`]: which files a run covers.
//! - [`copy`]: the block copy both directions share (CTR is its own inverse) and the copy
//!   of owner, mode, xattrs and times.
//! - [`progress`]: the progress bar or lines, and the progress file `tdefs status` reads.
//! - [`encrypt`], [`decrypt`]: the two conversions.

mod copy;
pub mod decrypt;
pub mod encrypt;
pub mod progress;
mod select;

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub use self::select::{normalize, select, Item, Kind};
use std::ffi::OsStr;
use std::sync::Arc;

use crate::metadir::{Metadata, STAGING_DIR};
use crate::sys::{self, Dir};
use crate::error::io_err;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("{path}: {problem}")]
    Select { path: PathBuf, problem: String },
    #[error(transparent)]
    Io(#[from] crate::error::IoError),
    #[error(transparent)]
    Meta(#[from] crate::metadir::MetaError),
    #[error(transparent)]
    Dict(#[from] crate::dictionary::DictError),
    #[error(transparent)]
    Key(#[from] crate::keys::KeyError),
    #[error("data-encryption-method is plaintext in the config: there is nothing to encrypt to; set it to aes256-ctr (or another method) first")]
    PlaintextMethod,
}

/// What one run did. `skipped` and `failed` name each file with the reason.
#[derive(Debug, Default)]
pub struct Summary {
    pub files_done: u64,
    pub bytes_done: u64,
    /// Files that needed nothing (already encrypted; already exported).
    pub files_unchanged: u64,
    pub skipped: Vec<(String, String)>,
    pub failed: Vec<(String, String)>,
}

impl Summary {
    fn skip(&mut self, rel: &[u8], why: impl Into<String>) {
        self.skipped.push((show(rel), why.into()));
    }

    fn fail(&mut self, rel: &[u8], why: impl std::fmt::Display) {
        let path = show(rel);
        tracing::error!(path = %path, error = %why, "not converted");
        self.failed.push((path, why.to_string()));
    }
}

/// A dictionary path for messages.
pub fn show(rel: &[u8]) -> String {
    String::from_utf8_lossy(rel).into_owned()
}

/// Create directory `dir` (mode 0700: filled in, then given its final mode), or accept it
/// if it exists as a directory.
fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        r => r,
    }
}

/// The staging directory of the backing directory (staged copies, the progress file),
/// created if needed and held by descriptor, verified like `.tdefs`: root writes into it,
/// so nobody else may have made it or may write to it.
fn create_staging(meta: &Metadata) -> Result<Arc<Dir>, ConvertError> {
    let path = meta.backing().join(STAGING_DIR);
    match sys::mkdirat(meta.backing_fd(), OsStr::new(STAGING_DIR), 0o700) {
        Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(io_err("create", &path)(e).into()),
        _ => {}
    }
    let dir = Dir::open_verified(meta.backing_fd(), OsStr::new(STAGING_DIR), &path).map_err(io_err("open", &path))?;
    Ok(Arc::new(dir))
}

/// Remove the (empty) staging directory once a run is complete, durably.
fn remove_staging(meta: &Metadata) -> Result<(), ConvertError> {
    let path = meta.backing().join(STAGING_DIR);
    match sys::unlinkat(meta.backing_fd(), OsStr::new(STAGING_DIR), libc::AT_REMOVEDIR) {
        Ok(()) => Ok(sys::fsync(meta.backing_fd()).map_err(io_err("fsync", meta.backing()))?),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(io_err("remove", &path)(e).into()),
    }
}

