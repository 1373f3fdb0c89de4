//! Directory handles: opendir, readdir (getdents of the backing directory, the metadata
//! directory hidden at the root), fsyncdir, and statfs.

use std::ffi::OsStr;
use std::ops::ControlFlow;
use std::os::fd::AsFd;

use fuser::{FileType, INodeNo};
use parking_lot::Mutex;

use super::attr::kind_of;
use super::volume::Volume;
use super::errno::{Error, Result};
use super::handle::DirHandle;
use crate::metadir::is_hidden_name;
use crate::sys;

impl Volume {
    pub fn opendir(&self, nodeid: u64) -> Result<u64> {
        let inode = self.inode(nodeid)?;
        let parent_fd = self.parent_fd(&inode)?;
        let open = |extra: i32| sys::openat(parent_fd.as_fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY | extra, 0);
        let fd = match open(self.dir_atime_flag()) {
            // O_NOATIME on a directory the daemon does not own, without CAP_FOWNER.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
            r => r?,
        };
        Ok(self.dirs.insert(DirHandle { inode, fd: Mutex::new(fd) }))
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(fh);
    }

    pub fn fsyncdir(&self, fh: u64) -> Result<()> {
        let d = self.dirs.get(fh).ok_or(Error::Os(libc::EBADF))?;
        let fd = d.fd.lock();
        Ok(sys::fsync(fd.as_fd())?)
    }

    /// List the directory from `offset` (a cookie from a previous entry), calling `add`
    /// (name, node id, type, next offset) until it returns true (reply full).
    pub fn readdir(&self, fh: u64, offset: u64, mut add: impl FnMut(&OsStr, u64, FileType, u64) -> bool) -> Result<()> {
        let d = self.dirs.get(fh).ok_or(Error::Os(libc::EBADF))?;
        let is_root = d.inode.nodeid == INodeNo::ROOT.0;
        let dev = { sys::fstat(d.fd.lock().as_fd())?.st_dev };
        let fd = d.fd.lock();
        let fd = fd.as_fd();
        sys::lseek(fd, offset as i64, libc::SEEK_SET)?;
        sys::for_each_dirent(fd, |e| {
            let full = !(is_root && is_hidden_name(e.name)) && add(e.name, self.nodeid(dev, e.ino), kind_of(u32::from(e.kind) << 12), e.next);
            if full { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        })?;
        Ok(())
    }

    pub fn statfs(&self) -> Result<libc::statvfs> {
        Ok(sys::fstatvfs(self.root_fd())?)
    }
}
