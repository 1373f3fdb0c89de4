//! Attributes: getattr and setattr (mode, owner, size, times) over the backing inode,
//! backing `stat` -> FUSE attributes, and time conversions.

use std::os::fd::AsFd;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

use super::volume::Volume;
use super::errno::{err, Error, Result};
use super::inode::Inode;
use super::setid::{kill_suidgid, KillPrivs};
use crate::sys::{self, Stat};

pub fn kind_of(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// A stat time (seconds, nanoseconds) as a `SystemTime`, also before 1970.
pub fn time(secs: i64, nsecs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsecs as u32)
    } else {
        UNIX_EPOCH - Duration::new((-secs) as u64, 0) + Duration::from_nanos(nsecs as u64)
    }
}

#[cfg(test)]
pub fn timespec(t: SystemTime) -> libc::timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => libc::timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 },
        Err(e) => {
            let d = e.duration();
            let (mut s, mut n) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
            if n < 0 {
                s -= 1;
                n += 1_000_000_000;
            }
            libc::timespec { tv_sec: s, tv_nsec: n }
        }
    }
}

/// A time from a setattr request. fuser 0.18.0 turns the kernel's (secs < 0, nsecs) into
/// `UNIX_EPOCH - Duration::new(-secs, nsecs)`, one second early for any pre-1970 time
/// with a fraction (it should subtract `1e9 - nsecs` from `-secs + 1`). That is undone
/// exactly here; fuser is pinned to 0.18.0 in Cargo.toml so the two cannot drift apart.
pub fn timespec_from_request(t: SystemTime) -> libc::timespec {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => libc::timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 },
        Err(e) => {
            let d = e.duration();
            libc::timespec { tv_sec: -(d.as_secs() as i64), tv_nsec: d.subsec_nanos() as i64 }
        }
    }
}

/// FUSE attributes; `nodeid` doubles as st_ino (fuser sends attr.ino as the node id).
pub fn to_attr(nodeid: u64, st: &Stat) -> FileAttr {
    // The root's link count includes the hidden metadata directory's "..": not shown.
    let nlink = if nodeid == INodeNo::ROOT.0 { st.st_nlink.saturating_sub(1) } else { st.st_nlink };
    FileAttr {
        ino: INodeNo(nodeid),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind_of(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_times_before_1970_undo_fusers_conversion() {
        // What fuser 0.18.0 hands us for the kernel's (-1, 500_000_000), i.e. -0.5 s.
        let t = UNIX_EPOCH - std::time::Duration::new(1, 500_000_000);
        let ts = timespec_from_request(t);
        assert_eq!((ts.tv_sec, ts.tv_nsec), (-1, 500_000_000));
        let ts = timespec_from_request(UNIX_EPOCH - std::time::Duration::new(86400, 0));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (-86400, 0));
        let ts = timespec_from_request(UNIX_EPOCH + std::time::Duration::new(5, 7));
        assert_eq!((ts.tv_sec, ts.tv_nsec), (5, 7));
    }

    #[test]
    fn timespec_round_trips_before_and_after_epoch() {
        for (s, n) in [(0i64, 0i64), (1_700_000_000, 123), (-1, 500_000_000), (-86400, 1)] {
            let ts = timespec(time(s, n));
            assert_eq!((ts.tv_sec, ts.tv_nsec), (s, n));
        }
    }
}

impl Volume {
    pub fn getattr(&self, nodeid: u64, fh: Option<u64>) -> Result<Stat> {
        if let Some(h) = fh.and_then(|fh| self.files.get(fh)) {
            return Ok(sys::fstat(h.fd())?);
        }
        Ok(sys::fstat(self.parent_fd(&*self.inode(nodeid)?)?.as_fd())?)
    }

    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &self,
        nodeid: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        fh: Option<u64>,
        kill_privs: Option<KillPrivs>,
    ) -> Result<Stat> {
        let inode = self.inode(nodeid)?;
        if let Some(size) = size {
            if inode.kind != FileType::RegularFile {
                return err(if inode.kind == FileType::Directory { libc::EISDIR } else { libc::EINVAL });
            }
            self.truncate(&inode, fh.and_then(|fh| self.files.get(fh)), size)?;
        }
        // Through the open file when the kernel names one (it may be unlinked), else by the
        // inode's own descriptor.
        let handle = fh.and_then(|fh| self.files.get(fh));
        let parent_fd = match &handle {
            Some(_) => None,
            None => match self.parent_fd(&inode) {
                Ok(fd) => Some(fd),
                // The kernel flushing cached times (writeback cache) of a file whose last
                // name was removed and that nobody has open: the backing inode is gone,
                // as it would be on ext4 by now, so there is nothing left to change.
                // (open_by_handle_at says ESTALE, or ENOMEM while the inode is being freed.)
                Err(Error::Io(e))
                    if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOMEM)) && inode.loc().is_none() =>
                {
                    return Ok(gone_stat(&inode));
                }
                Err(e) => return Err(e),
            },
        };
        let fd = match (&handle, &parent_fd) {
            (Some(h), _) => h.fd(),
            (None, Some(p)) => p.as_fd(),
            (None, None) => unreachable!("one of them is set"),
        };
        // A caller without CAP_FSETID drops set-id bits (kernel rule, see kill_suidgid) when
        // it truncates, when it chowns (judged against the group the file has before the
        // change, as setattr_should_drop_sgid does), and on an empty SETATTR: with
        // FUSE_HANDLE_KILLPRIV_V2 that is how the kernel's file_remove_privs() (fallocate,
        // copy_file_range) asks for it, fuse_setattr() having stripped ATTR_KILL_SUID/SGID
        // and ATTR_MODE. The backing fchown runs as root and keeps 02666's set-gid bit.
        // Directories keep theirs (chown_common() asks for no kill on a directory).
        let empty = mode.is_none() && uid.is_none() && gid.is_none() && size.is_none() && atime.is_none() && mtime.is_none();
        if let Some(who) = &kill_privs {
            if inode.kind != FileType::Directory && (size.is_some() || uid.is_some() || gid.is_some() || empty) {
                kill_suidgid(fd, who)?;
            }
        }
        // The backing chown drops set-id bits and capabilities itself, as on ext4.
        if uid.is_some() || gid.is_some() {
            sys::fchown(fd, uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX))?;
        }
        if let Some(mode) = mode {
            if inode.kind != FileType::Symlink {
                sys::fchmod_path(fd, mode & 0o7777)?;
            }
        }
        if empty {
            // chown(f, -1, -1), or only a ctime from the kernel's writeback cache: ext4
            // updates ctime, and an ownership "change" to the same owner does just that.
            sys::fchown(fd, u32::MAX, u32::MAX)?;
        }
        if atime.is_some() || mtime.is_some() {
            let conv = |t: Option<TimeOrNow>| match t {
                None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                Some(TimeOrNow::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
                Some(TimeOrNow::SpecificTime(t)) => timespec_from_request(t),
            };
            let times = [conv(atime), conv(mtime)];
            if inode.kind == FileType::Symlink {
                let loc = inode.loc().ok_or(Error::Os(libc::ENOENT))?;
                sys::utimens(self.parent_fd(&loc.parent)?.as_fd(), Some(&loc.name), &times, libc::AT_SYMLINK_NOFOLLOW)?;
            } else {
                sys::utimens(fd, None, &times, 0)?;
            }
        }
        Ok(sys::fstat(fd)?)
    }
}

/// Attributes of a file that no longer exists anywhere (no name, nobody has it open).
pub(super) fn gone_stat(inode: &Inode) -> Stat {
    let mut st: Stat = unsafe { std::mem::zeroed() };
    st.st_mode = match inode.kind {
        FileType::Directory => libc::S_IFDIR,
        FileType::Symlink => libc::S_IFLNK,
        _ => libc::S_IFREG,
    };
    st.st_nlink = 0;
    st
}
