//! mtime and ctime of regular files across a remount, with the writeback cache (issue 16
//! item 2).
//!
//! With FUSE_WRITEBACK_CACHE the kernel owns a regular file's mtime and ctime from the
//! moment it first gets the inode: `fuse_get_cache_mask()` (fs/fuse/inode.c) returns
//! STATX_MTIME | STATX_CTIME | STATX_SIZE, so `fuse_change_attributes_i()` keeps its own
//! values over the ones tdefs reports later. It updates them itself (writes, truncates,
//! chmod, link, rename, xattrs) and tells tdefs only through SETATTRs that carry them
//! (`fuse_flush_times()`, FATTR_MTIME | FATTR_CTIME; and every SETATTR's FATTR_CTIME).
//! The backing file's times move on their own: every backing write sets its mtime, and
//! tdefs cannot set a ctime at all (utimensat sets it to now). After a remount the kernel
//! would read the backing times: different ones.
//!
//! So tdefs remembers, per inode, the (mtime, ctime) the kernel has: the ones reported when
//! the kernel got the inode, then every value a SETATTR brings. When the kernel forgets the
//! inode, and at unmount, tdefs sets the backing mtime to the kernel's and, if the backing
//! ctime is not the kernel's, writes both into `trusted.tdefs.times` on the backing file.
//! The next time the kernel gets the inode, tdefs reports that ctime while the backing
//! mtime is still the recorded one. A record is rewritten, never removed: removing it would
//! itself move the backing ctime. A crash skips the last step: the backing file's own,
//! newer times win (never older than its data); any later change of the backing file
//! moves its mtime and voids the record. The name is not visible through the mount.

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd};
use std::time::SystemTime;

use super::attr::timespec_from_request;
use super::volume::Volume;
use super::errno::{Error, Result};
use super::inode::{Inode, KernelTimes, Ts};
use crate::sys::{self, Stat};

/// Backing-file xattr holding (mtime, ctime) as the kernel had them: four little-endian i64.
pub const TIMES_XATTR: &str = "trusted.tdefs.times";

/// Whether `name` is tdefs' own xattr, hidden from the mount.
pub fn is_times_xattr(name: &OsStr) -> bool {
    name == TIMES_XATTR
}

fn mtime_of(st: &Stat) -> Ts {
    (st.st_mtime, st.st_mtime_nsec)
}

fn ctime_of(st: &Stat) -> Ts {
    (st.st_ctime, st.st_ctime_nsec)
}

fn encode(m: Ts, c: Ts) -> [u8; 32] {
    let mut b = [0u8; 32];
    for (i, v) in [m.0, m.1, c.0, c.1].into_iter().enumerate() {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

fn decode(b: &[u8; 32]) -> (Ts, Ts) {
    let g = |i: usize| i64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    ((g(0), g(1)), (g(2), g(3)))
}

/// A file's times before the online converter rewrites a chunk of it.
pub(super) struct RewriteTimes {
    atime: Ts,
    mtime: Ts,
    ctime: Ts,
    /// A valid `trusted.tdefs.times` record (its mtime is the backing mtime) exists.
    recorded: bool,
}

fn is_regular(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG
}

impl Volume {
    fn times_target(&self, inode: &Inode) -> Result<(sys::XattrTarget, std::sync::Arc<std::os::fd::OwnedFd>)> {
        let fd = self.parent_fd(inode)?;
        Ok((sys::XattrTarget { path: sys::proc_path(fd.as_raw_fd()), follow: true }, fd))
    }

    /// What `trusted.tdefs.times` of the backing file says, if anything.
    fn read_times_record(&self, inode: &Inode) -> Option<(Ts, Ts)> {
        let (t, _fd) = self.times_target(inode).ok()?;
        let mut b = [0u8; 32];
        match sys::getxattr(&t, OsStr::new(TIMES_XATTR), &mut b) {
            Ok(32) => Some(decode(&b)),
            _ => None,
        }
    }

    /// The times of regular file `inode` (backing stat `st`) as the kernel has or will have
    /// them: written into `st`. The first report for an inode is what the kernel keeps.
    pub(super) fn report_times(&self, inode: &Inode, st: &mut Stat) {
        if !is_regular(st) {
            return;
        }
        let mut kt = inode.ktimes.lock();
        let t = match *kt {
            Some(t) => t,
            None => {
                let recorded = self.read_times_record(inode);
                let mtime = mtime_of(st);
                let ctime = match recorded {
                    Some((m, c)) if m == mtime => c,
                    _ => ctime_of(st),
                };
                let t = KernelTimes { mtime, ctime, recorded };
                *kt = Some(t);
                t
            }
        };
        (st.st_mtime, st.st_mtime_nsec) = t.mtime;
        (st.st_ctime, st.st_ctime_nsec) = t.ctime;
    }

    /// After a SETATTR of `inode` (`st`: the backing stat after it): the kernel set its mtime
    /// to `mtime` (when it sent one) and its ctime to `ctime`.
    pub(super) fn setattr_times(&self, inode: &Inode, st: &mut Stat, mtime: Option<Ts>, ctime: Option<SystemTime>) {
        if !is_regular(st) {
            return;
        }
        {
            let mut kt = inode.ktimes.lock();
            let t = kt.get_or_insert(KernelTimes { mtime: mtime_of(st), ctime: ctime_of(st), recorded: None });
            if let Some(m) = mtime {
                t.mtime = m;
            }
            if let Some(c) = ctime {
                let c = timespec_from_request(c);
                t.ctime = (c.tv_sec, c.tv_nsec);
            }
        }
        self.report_times(inode, st);
    }

    /// A SETATTR with mtime `mtime`, a ctime and open file `fh`, and nothing else, is the
    /// kernel flushing the times it keeps before an fsync (`fuse_flush_times()`; a user's
    /// utimensat never names a file). Such times stay in memory (`setattr_times` records
    /// them; `persist_times` writes them at forget and unmount) instead of a utimensat per
    /// fsync; after a crash the backing file's own mtime, never older than its data, stands.
    /// For a regular file: its backing stat and the kernel's mtime, to answer with.
    pub(super) fn times_flush_stat(&self, fh: u64, mtime: SystemTime) -> Option<(Stat, Option<Ts>)> {
        let h = self.files.get(fh)?;
        let st = sys::fstat(h.fd()).ok().filter(is_regular)?;
        let m = timespec_from_request(mtime);
        Some((st, Some((m.tv_sec, m.tv_nsec))))
    }

    /// Make the backing file of `inode` carry the kernel's times (see the module comment):
    /// when the kernel forgets the inode and at unmount.
    pub(super) fn persist_times(&self, inode: &Inode) -> Result<()> {
        let Some(t) = *inode.ktimes.lock() else { return Ok(()) };
        let fd = match self.parent_fd(inode) {
            Ok(fd) => fd,
            // Its last name is gone and nobody has it open: nothing left to keep.
            Err(Error::Io(e)) if matches!(e.raw_os_error(), Some(libc::ESTALE | libc::ENOMEM)) && inode.loc().is_none() => {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        let mut st = sys::fstat(fd.as_fd())?;
        if !is_regular(&st) || st.st_nlink == 0 {
            return Ok(());
        }
        if mtime_of(&st) != t.mtime {
            let times = [
                libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                libc::timespec { tv_sec: t.mtime.0, tv_nsec: t.mtime.1 },
            ];
            sys::utimens(fd.as_fd(), None, &times, 0)?;
            st = sys::fstat(fd.as_fd())?;
        }
        // Never remove a record: removing an xattr sets the backing ctime to now, and it
        // is exactly when the backing ctime equals the kernel's (a chmod or rename: the
        // kernel and the backing file took the same coarse clock tick) that a record would
        // be dropped, so the next inode would get the ctime of the removal instead. What
        // the backing file holds is read here rather than taken from `t.recorded`: the
        // record may have been written under another `Inode` of this file.
        let on_disk = self.read_times_record(inode);
        let wanted = Some((t.mtime, t.ctime));
        // A record is read back only while its mtime is the backing mtime (`t.mtime` now).
        let misleading = on_disk.is_some_and(|(m, _)| m == t.mtime);
        let recorded = if on_disk == wanted || (ctime_of(&st) == t.ctime && !misleading) {
            on_disk
        } else {
            // Not as root (trusted.* needs CAP_SYS_ADMIN) or without xattrs on the backing
            // filesystem: the mtime is kept, the ctime is the backing file's.
            let (target, _fd) = self.times_target(inode)?;
            sys::setxattr(&target, OsStr::new(TIMES_XATTR), &encode(t.mtime, t.ctime), 0)?;
            wanted
        };
        if let Some(k) = inode.ktimes.lock().as_mut() {
            k.recorded = recorded;
        }
        Ok(())
    }

    /// Before the online converter rewrites a chunk of `inode` in place (`fd`, under the
    /// file's lock): the times to put back after it (see `restore_times`).
    pub(super) fn times_before_rewrite(&self, inode: &Inode, fd: std::os::fd::BorrowedFd<'_>) -> Result<RewriteTimes> {
        let st = sys::fstat(fd)?;
        let valid = self.read_times_record(inode).is_some_and(|(m, _)| m == mtime_of(&st));
        Ok(RewriteTimes { atime: (st.st_atime, st.st_atime_nsec), mtime: mtime_of(&st), ctime: ctime_of(&st), recorded: valid })
    }

    /// After the rewrite: the backing atime and mtime as they were, and a record of the
    /// ctime the file had (a rewrite that changes no byte of the plaintext is no change of
    /// the file: the mount keeps showing its times). Without a record (not root, no xattrs)
    /// the ctime shown is the rewrite's.
    pub(super) fn restore_times(&self, inode: &Inode, fd: std::os::fd::BorrowedFd<'_>, t: &RewriteTimes) -> Result<()> {
        let times = [
            libc::timespec { tv_sec: t.atime.0, tv_nsec: t.atime.1 },
            libc::timespec { tv_sec: t.mtime.0, tv_nsec: t.mtime.1 },
        ];
        sys::utimens(fd, None, &times, 0)?;
        if !t.recorded {
            if let Ok((target, _fd)) = self.times_target(inode) {
                if let Err(e) = sys::setxattr(&target, OsStr::new(TIMES_XATTR), &encode(t.mtime, t.ctime), 0) {
                    tracing::debug!(error = %e, "cannot record a converted file's ctime");
                }
            }
        }
        Ok(())
    }

    /// `persist_times`, logged instead of failing (FORGET and unmount have nobody to tell).
    pub(super) fn keep_times(&self, inode: &Inode) {
        if let Err(e) = self.persist_times(inode) {
            tracing::debug!(nodeid = inode.nodeid, error = %e, "cannot keep the kernel's mtime/ctime on the backing file");
        }
    }

    /// At unmount: every inode the kernel still had.
    pub(super) fn keep_all_times(&self) {
        let mut all = Vec::new();
        self.inodes.for_each(|i| all.push(i.clone()));
        for i in all {
            self.keep_times(&i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips() {
        let (m, c) = ((1_700_000_000, 123_456_789), (-5, 999_999_999));
        assert_eq!(decode(&encode(m, c)), (m, c));
    }
}
