//! A private copy of a mount tree with access times off (`open_tree` + `mount_setattr`):
//! raw syscalls, which neither libc nor rustix wraps.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use super::EMPTY;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const OPEN_TREE_CLONE: libc::c_uint = 1;
const AT_RECURSIVE: libc::c_uint = 0x8000;
const MOUNT_ATTR_NOATIME: u64 = 0x10;
const MOUNT_ATTR_ATIME_MASK: u64 = 0x70; // MOUNT_ATTR__ATIME
const MOUNT_ATTR_NODIRATIME: u64 = 0x80;

/// A private, unattached copy of the mount tree at `dir` (`open_tree(OPEN_TREE_CLONE |
/// AT_RECURSIVE)`) with `noatime` and/or `nodiratime` set on it (`mount_setattr`): what is
/// opened through it never updates access times, whatever the original mount says. Needs
/// CAP_SYS_ADMIN and Linux 5.12.
pub fn noatime_tree(dir: BorrowedFd<'_>, noatime: bool, nodiratime: bool) -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            dir.as_raw_fd(),
            EMPTY.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let tree = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let mut attr = MountAttr { attr_set: 0, attr_clr: 0, propagation: 0, userns_fd: 0 };
    if noatime {
        attr.attr_set |= MOUNT_ATTR_NOATIME;
        attr.attr_clr |= MOUNT_ATTR_ATIME_MASK;
    }
    if nodiratime {
        attr.attr_set |= MOUNT_ATTR_NODIRATIME;
    }
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            EMPTY.as_ptr(),
            libc::AT_EMPTY_PATH as libc::c_uint | AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(tree)
}
