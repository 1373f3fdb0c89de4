//! The I/O error every layer reports: what was being done, to which path, and the OS error
//! ("append to /srv/backing/.tdefs/log.000003: No space left on device"). The dictionary,
//! key store, metadata and converter errors each wrap it (`Io(IoError)`); `io_err` builds it
//! in a `map_err`.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{op} {path}: {err}")]
pub struct IoError {
    pub op: &'static str,
    pub path: PathBuf,
    // Not a `#[source]`: the message already ends with it, and anyhow's `{:#}` would repeat it.
    pub err: io::Error,
}

impl IoError {
    pub fn new(op: &'static str, path: impl Into<PathBuf>, err: io::Error) -> IoError {
        IoError { op, path: path.into(), err }
    }

    /// The errno, EIO if the error has none.
    pub fn errno(&self) -> i32 {
        self.err.raw_os_error().unwrap_or(libc::EIO)
    }
}

/// `.map_err(io_err("fsync", &dir))?`: the path is copied only when there is an error.
pub fn io_err<'a>(op: &'static str, path: &'a (impl AsRef<Path> + ?Sized)) -> impl FnOnce(io::Error) -> IoError + 'a {
    move |err| IoError { op, path: path.as_ref().to_path_buf(), err }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_operation_the_path_and_the_os_error() {
        let e = Err::<(), _>(io::Error::from_raw_os_error(libc::ENOSPC)).map_err(io_err("append to", "/b/log")).unwrap_err();
        assert_eq!(e.to_string(), format!("append to /b/log: {}", io::Error::from_raw_os_error(libc::ENOSPC)));
        assert_eq!(e.errno(), libc::ENOSPC);
        assert!(std::error::Error::source(&e).is_none(), "the OS error is in the message, not repeated as a source");
    }
}
