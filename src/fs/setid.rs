//! Permission checks and the set-id policy: which set-uid/set-gid bits a caller without
//! CAP_FSETID loses when it writes, truncates or changes a file's ACL.

use std::ffi::OsStr;
use std::os::fd::AsFd;

use fuser::FileType;

use super::volume::Volume;
use super::errno::{err, Result};
use crate::sys;

impl Volume {
    /// access(2) from the mode bits (as the kernel's generic_permission, without ACLs).
    /// Root may read and write anything, and execute what has an execute bit (or is a
    /// directory).
    pub fn access(&self, nodeid: u64, uid: u32, who: &KillPrivs, mask: i32) -> Result<()> {
        let st = sys::fstat(self.parent_fd(&*self.inode(nodeid)?)?.as_fd())?;
        let mode = st.st_mode;
        let is_dir = mode & libc::S_IFMT == libc::S_IFDIR;
        let want = mask & (libc::R_OK | libc::W_OK | libc::X_OK);
        let allowed = if uid == 0 {
            libc::R_OK | libc::W_OK | if is_dir || mode & 0o111 != 0 { libc::X_OK } else { 0 }
        } else {
            let bits = if uid == st.st_uid {
                mode >> 6
            } else if who.in_group(st.st_gid) {
                mode >> 3
            } else {
                mode
            };
            (bits & 0o7) as i32
        };
        if want & !allowed != 0 {
            return err(libc::EACCES);
        }
        Ok(())
    }

    /// After a caller without CAP_FSETID set `system.posix_acl_access`: as the kernel's
    /// posix_acl_update_mode() on ext4, the set-gid bit goes unless the caller is in the
    /// file's group (FUSE says so only with FUSE_SETXATTR_EXT, which fuser 0.18 cannot
    /// parse). Returns whether the mode changed.
    pub fn acl_kill_sgid(&self, nodeid: u64, who: &KillPrivs) -> Result<bool> {
        let inode = self.inode(nodeid)?;
        if inode.kind == FileType::Symlink {
            return Ok(false);
        }
        let fd = self.parent_fd(&inode)?;
        let st = sys::fstat(fd.as_fd())?;
        if st.st_mode & libc::S_ISGID == 0 || who.in_group(st.st_gid) {
            return Ok(false);
        }
        sys::fchmod_path(fd.as_fd(), st.st_mode & 0o7777 & !libc::S_ISGID)?;
        Ok(true)
    }

    /// Whether directory `nodeid` has a default ACL (new entries inherit it).
    pub fn has_default_acl(&self, nodeid: u64) -> bool {
        match self.xattr_target(nodeid) {
            Ok((t, _fd)) => matches!(sys::getxattr(&t, OsStr::new("system.posix_acl_default"), &mut []), Ok(n) if n > 0),
            Err(_) => false,
        }
    }
}

/// A caller without CAP_FSETID modifying a file: its set-id bits may have to go.
#[derive(Debug, Clone, Copy)]
pub struct KillPrivs {
    pub gid: u32,
    pub pid: u32,
}

impl KillPrivs {
    /// In the group `gid`: primary group from the request, supplementary ones from /proc
    /// (FUSE passes only the former).
    pub(super) fn in_group(&self, gid: u32) -> bool {
        if self.gid == gid {
            return true;
        }
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Groups:")).map(|l| l[7..].split_whitespace().any(|g| g.parse() == Ok(gid))))
            .unwrap_or(false)
    }
}

/// With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves dropping set-id bits to us when a caller
/// without CAP_FSETID writes or truncates (tdefs itself has it, so the backing filesystem
/// would not). The kernel's rule (setattr_should_drop_suidgid): set-uid always; set-gid
/// with group execute, or when the caller is not in the file's group. Capabilities need
/// nothing here: the backing write/truncate/chown removes them. Returns whether the mode
/// changed.
pub(super) fn kill_suidgid(fd: std::os::fd::BorrowedFd<'_>, who: &KillPrivs) -> Result<bool> {
    let st = sys::fstat(fd)?;
    let mut mode = st.st_mode & 0o7777;
    mode &= !libc::S_ISUID;
    if mode & libc::S_ISGID != 0 && (mode & libc::S_IXGRP != 0 || !who.in_group(st.st_gid)) {
        mode &= !libc::S_ISGID;
    }
    if mode == st.st_mode & 0o7777 {
        return Ok(false);
    }
    sys::fchmod_path(fd, mode)?;
    Ok(true)
}
