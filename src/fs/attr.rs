//! Backing `stat` -> FUSE attributes, and time conversions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use crate::sys::Stat;

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
