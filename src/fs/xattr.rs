//! Extended attributes, passed through to the backing inode, with the names tdefs keeps for
//! itself (its times record) hidden and refused.

use std::ffi::OsStr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use fuser::FileType;

use super::volume::Volume;
use super::errno::{err, Error, Result};
use super::times::{is_times_xattr, TIMES_XATTR};
use crate::sys;

impl Volume {
    /// Where xattr calls for `nodeid` go, and the descriptor that path refers through (keep
    /// it alive for the call).
    pub(super) fn xattr_target(&self, nodeid: u64) -> Result<(sys::XattrTarget, Arc<OwnedFd>)> {
        let inode = self.inode(nodeid)?;
        if inode.kind == FileType::Symlink {
            // A symlink's own xattrs: address it through its parent, without following.
            let loc = inode.loc().ok_or(Error::Os(libc::ENOENT))?;
            let parent_fd = self.parent_fd(&loc.parent)?;
            let mut p = sys::proc_path(parent_fd.as_raw_fd()).into_bytes();
            p.push(b'/');
            p.extend_from_slice(loc.name.as_bytes());
            let path = std::ffi::CString::new(p).map_err(|_| Error::Os(libc::EINVAL))?;
            return Ok((sys::XattrTarget { path, follow: false }, parent_fd));
        }
        let fd = self.parent_fd(&inode)?;
        Ok((sys::XattrTarget { path: sys::proc_path(fd.as_raw_fd()), follow: true }, fd))
    }

    pub fn getxattr(&self, nodeid: u64, name: &OsStr, buf: &mut [u8]) -> Result<usize> {
        if is_times_xattr(name) {
            return err(libc::ENODATA); // tdefs' own (see times)
        }
        let caps = name.as_bytes() == CAPS_XATTR;
        let inode = if caps { Some(self.inode(nodeid)?) } else { None };
        if let Some(i) = &inode {
            if i.no_caps.load(Ordering::Relaxed) {
                return err(libc::ENODATA);
            }
        }
        let (t, _fd) = self.xattr_target(nodeid)?;
        let r = sys::getxattr(&t, name, buf);
        if let (Some(i), Err(e)) = (&inode, &r) {
            if e.raw_os_error() == Some(libc::ENODATA) {
                i.no_caps.store(true, Ordering::Relaxed);
            }
        }
        Ok(r?)
    }

    pub fn setxattr(&self, nodeid: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if is_times_xattr(name) {
            tracing::warn!("refusing to set tdefs' reserved xattr {TIMES_XATTR} through the mount");
            return err(libc::EPERM);
        }
        self.forget_no_caps(nodeid, name)?;
        let (t, _fd) = self.xattr_target(nodeid)?;
        Ok(sys::setxattr(&t, name, value, flags)?)
    }

    /// Before `name` may change: the cached absence of capabilities no longer holds.
    pub(super) fn forget_no_caps(&self, nodeid: u64, name: &OsStr) -> Result<()> {
        if name.as_bytes() == CAPS_XATTR {
            self.inode(nodeid)?.no_caps.store(false, Ordering::Relaxed);
        }
        Ok(())
    }

    /// `hide_trusted`: the caller lacks CAP_SYS_ADMIN, so `trusted.*` names are not shown
    /// (ext4 filters them; the kernel leaves it to FUSE servers, and tdefs lists as root).
    /// tdefs' own `trusted.tdefs.times` is never shown.
    pub fn listxattr(&self, nodeid: u64, buf: &mut [u8], hide_trusted: bool) -> Result<usize> {
        let (t, _fd) = self.xattr_target(nodeid)?;
        // The list can grow between the two calls: retry on ERANGE.
        let (all, n) = loop {
            let mut all = vec![0u8; sys::listxattr(&t, &mut [])?];
            match sys::listxattr(&t, &mut all) {
                Ok(n) => break (all, n),
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let shown: Vec<u8> = all[..n]
            .split_inclusive(|&b| b == 0)
            .filter(|name| !(hide_trusted && name.starts_with(b"trusted.")))
            .filter(|name| name.strip_suffix(b"\0").unwrap_or(name) != TIMES_XATTR.as_bytes())
            .flatten()
            .copied()
            .collect();
        if buf.is_empty() {
            return Ok(shown.len());
        }
        if buf.len() < shown.len() {
            return err(libc::ERANGE);
        }
        buf[..shown.len()].copy_from_slice(&shown);
        Ok(shown.len())
    }

    pub fn removexattr(&self, nodeid: u64, name: &OsStr) -> Result<()> {
        if is_times_xattr(name) {
            return err(libc::ENODATA);
        }
        self.forget_no_caps(nodeid, name)?;
        let (t, _fd) = self.xattr_target(nodeid)?;
        Ok(sys::removexattr(&t, name)?)
    }
}

pub(super) const CAPS_XATTR: &[u8] = b"security.capability";
