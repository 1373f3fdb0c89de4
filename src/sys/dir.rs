//! `Dir`: a metadata directory held open by descriptor and verified private.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use std::ops::ControlFlow;

use super::{for_each_dirent, fstat, fstatat, fsync, openat, renameat2, unlinkat};

/// A directory held open by descriptor, with every file operation inside it done relative
/// to that descriptor (`openat` and friends, `O_NOFOLLOW`, new files `O_EXCL`). Used for
/// tdefs' metadata directories: once verified, renaming the directory away or planting a
/// symlink in its place cannot redirect a write (the owner of a backing root can rename
/// `.tdefs`; root following a link there would clobber any file). `path` is only for
/// messages.
pub struct Dir {
    fd: OwnedFd,
    path: std::path::PathBuf,
}

const NOFOLLOW: libc::c_int = libc::O_NOFOLLOW | libc::O_CLOEXEC;

impl Dir {
    /// Open `parent/name` as a directory, without following a symlink, and check that it
    /// belongs to root or to this process's user and that nobody else may write to it.
    pub fn open_verified(parent: BorrowedFd<'_>, name: &OsStr, path: &Path) -> io::Result<Dir> {
        let d = Self::open_nofollow(parent, name, path)?;
        d.check_private()?;
        Ok(d)
    }

    /// Open `parent/name` as a directory without following a symlink, whoever owns it: for
    /// reading only (inspecting another user's metadata as root). Check it with
    /// `check_private` before writing into it.
    pub fn open_nofollow(parent: BorrowedFd<'_>, name: &OsStr, path: &Path) -> io::Result<Dir> {
        let fd = openat(parent, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0).map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::ENOTDIR) {
                io::Error::new(e.kind(), format!("{} is a symlink or not a directory; tdefs' metadata directory must be a real directory", path.display()))
            } else {
                e
            }
        })?;
        Ok(Dir { fd, path: path.to_path_buf() })
    }

    /// The directory belongs to root or to this process's user, and nobody else may write
    /// to it: only then does this process write into it.
    pub fn check_private(&self) -> io::Result<()> {
        let path = &self.path;
        let st = fstat(self.fd())?;
        let euid = unsafe { libc::geteuid() };
        if st.st_uid != 0 && st.st_uid != euid {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{} belongs to user {}, not to root or the user running tdefs ({euid}): another user could have \
                     put links there to make tdefs overwrite other files. Check it, then `chown -R {euid} {}`",
                    path.display(),
                    st.st_uid,
                    path.display()
                ),
            ));
        }
        if st.st_mode & 0o022 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("{} is writable by group or others (mode {:04o}): run `chmod 700 {}`", path.display(), st.st_mode & 0o7777, path.display()),
            ));
        }
        Ok(())
    }

    /// For messages: the directory's path, or a file's path in it.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.path.join(name)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Open an existing file in the directory (`flags`: O_RDONLY or O_RDWR).
    pub fn open(&self, name: &str, flags: libc::c_int) -> io::Result<std::fs::File> {
        openat(self.fd(), OsStr::new(name), flags | NOFOLLOW, 0).map(std::fs::File::from)
    }

    /// Create a new file (mode 0600), refusing one that exists.
    pub fn create_new(&self, name: &str) -> io::Result<std::fs::File> {
        openat(self.fd(), OsStr::new(name), libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | NOFOLLOW, 0o600).map(std::fs::File::from)
    }

    /// A file's whole contents.
    pub fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut v = Vec::new();
        self.open(name, libc::O_RDONLY)?.read_to_end(&mut v)?;
        Ok(v)
    }

    /// Replace `name` with `bytes`, mode 0600, not durably (hints such as a progress file).
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let tmp = format!("{name}.tmp");
        self.remove_if_exists(&tmp)?;
        let mut f = self.create_new(&tmp)?;
        f.write_all(bytes)?;
        drop(f);
        self.rename(&tmp, name)
    }

    /// Replace `name` with `bytes` so that a crash at any instant leaves the old or the new
    /// contents, and the new ones are durable on return: a new temporary file (never an
    /// existing one or a link), fsync, rename over the target, fsync of the directory.
    pub fn write_durably(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let tmp = format!("{name}.tmp");
        self.remove_if_exists(&tmp)?;
        let mut f = self.create_new(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        crate::hooks::crash(&format!("{name}:before-rename"));
        self.rename(&tmp, name)?;
        crate::hooks::crash(&format!("{name}:after-rename"));
        self.sync()
    }

    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        renameat2(self.fd(), OsStr::new(from), self.fd(), OsStr::new(to), 0)
    }

    pub fn remove(&self, name: &str) -> io::Result<()> {
        unlinkat(self.fd(), OsStr::new(name), 0)
    }

    pub fn remove_if_exists(&self, name: &str) -> io::Result<()> {
        match self.remove(name) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            r => r,
        }
    }

    /// Names in the directory (without "." and "..").
    pub fn list(&self) -> io::Result<Vec<std::ffi::OsString>> {
        let d = openat(self.fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        let mut names = Vec::new();
        for_each_dirent(d.as_fd(), |e| {
            if !e.is_dot() {
                names.push(e.name.to_os_string());
            }
            ControlFlow::<()>::Continue(())
        })?;
        Ok(names)
    }

    /// fsync the directory: names created, renamed or removed in it become durable.
    pub fn sync(&self) -> io::Result<()> {
        fsync(self.fd())
    }

    /// Size of every regular file in the directory.
    pub fn files_size(&self) -> u64 {
        self.list()
            .map(|names| {
                names.iter().filter_map(|n| fstatat(self.fd(), n, libc::AT_SYMLINK_NOFOLLOW).ok()).filter(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG).map(|st| st.st_size as u64).sum()
            })
            .unwrap_or(0)
    }
}

impl std::fmt::Debug for Dir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Dir({})", self.path.display())
    }
}
