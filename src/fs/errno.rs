//! The one place where internal errors become errno values for the kernel.

use std::io;

use crate::dictionary::DictError;
use crate::keys::KeyError;

/// Error of a FUSE operation.
#[derive(Debug)]
pub enum Error {
    Os(i32),
    Io(io::Error),
    Dict(DictError),
    Key(KeyError),
}

pub type Result<T> = std::result::Result<T, Error>;

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Os(n) => write!(f, "{}", io::Error::from_raw_os_error(*n)),
            Error::Io(e) => e.fmt(f),
            Error::Dict(e) => e.fmt(f),
            Error::Key(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}
impl From<DictError> for Error {
    fn from(e: DictError) -> Self {
        Error::Dict(e)
    }
}
impl From<KeyError> for Error {
    fn from(e: KeyError) -> Self {
        Error::Key(e)
    }
}

pub fn err<T>(errno: i32) -> Result<T> {
    Err(Error::Os(errno))
}

/// errno for the kernel. Metadata failures are logged here, once, since the application
/// only sees a bare EIO/ENOSPC.
pub fn errno(e: &Error) -> i32 {
    match e {
        Error::Os(n) => *n,
        Error::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        Error::Dict(d) => {
            tracing::error!(error = %d, "file dictionary operation failed");
            d.errno()
        }
        Error::Key(k) => {
            tracing::error!(error = %k, "key operation failed");
            libc::EIO
        }
    }
}
