//! Putting the mount in place and taking it away.
//!
//! As root, tdefs calls mount(2) itself, so that the mount says what it is: type
//! `fuse.tdefs` (so `umount -t fuse.tdefs` and `findmnt -t fuse.tdefs` find it), the backing
//! directory (or, from fstab, the config file) as its source, and the kernel flags asked for
//! (nosuid, nodev, noexec, noatime, ...). fuser's own mount(2) always says type `fuse` and
//! knows no atime flags. Without the privilege, fusermount3 (through fuser) mounts it, with
//! the same type and source from the `subtype` and `fsname` options.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::config::{Atime, MountFlags};

use super::MountSpec;

/// The mount(2) flags for `f`.
pub fn ms_flags(f: &MountFlags) -> libc::c_ulong {
    let mut ms = 0;
    let mut set = |on: bool, flag: libc::c_ulong| {
        if on {
            ms |= flag;
        }
    };
    set(!f.suid, libc::MS_NOSUID);
    set(!f.dev, libc::MS_NODEV);
    set(!f.exec, libc::MS_NOEXEC);
    set(f.atime == Atime::Noatime, libc::MS_NOATIME);
    set(f.atime == Atime::Strictatime, libc::MS_STRICTATIME);
    set(f.atime == Atime::Relatime, libc::MS_RELATIME);
    set(!f.diratime, libc::MS_NODIRATIME);
    set(f.lazytime, libc::MS_LAZYTIME);
    set(f.sync, libc::MS_SYNCHRONOUS);
    set(f.dirsync, libc::MS_DIRSYNC);
    ms
}

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Mount a FUSE filesystem at `spec.mountpoint` with mount(2): the /dev/fuse descriptor to
/// serve it, or `None` when the kernel says the caller may not (then use fusermount3).
pub fn mount_direct(spec: &MountSpec) -> io::Result<Option<OwnedFd>> {
    let dev = CString::new("/dev/fuse").expect("no NUL");
    let fd = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("cannot open /dev/fuse ({e}); load the fuse module (modprobe fuse)")));
    }
    let fuse = unsafe { OwnedFd::from_raw_fd(fd) };
    let mp = cstr(spec.mountpoint.as_os_str().as_bytes())?;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::stat(mp.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut data = format!(
        "fd={},rootmode={:o},user_id={},group_id={}",
        fuse.as_raw_fd(),
        st.st_mode & libc::S_IFMT,
        unsafe { libc::getuid() },
        unsafe { libc::getgid() }
    );
    if spec.default_permissions {
        data.push_str(",default_permissions");
    }
    if spec.allow_other {
        data.push_str(",allow_other");
    }
    let source = cstr(spec.source.as_bytes())?;
    let fstype = CString::new("fuse.tdefs").expect("no NUL");
    let data = CString::new(data).expect("no NUL");
    let r = unsafe {
        libc::mount(source.as_ptr(), mp.as_ptr(), fstype.as_ptr(), ms_flags(&spec.flags), data.as_ptr().cast())
    };
    if r == 0 {
        return Ok(Some(fuse));
    }
    match io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EPERM) => Ok(None),
        e => Err(io::Error::new(e.kind(), format!("mount(2) at {}: {e}", spec.mountpoint.display()))),
    }
}

/// Unmount `mountpoint`; if it is busy (files still open), detach it lazily: the kernel
/// keeps the connection, and tdefs keeps serving the open files, until they are closed.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    let mp = cstr(mountpoint.as_os_str().as_bytes())?;
    if unsafe { libc::umount2(mp.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EBUSY) {
        return Err(e);
    }
    tracing::warn!(mountpoint = %mountpoint.display(), "the mount is busy: unmounting lazily; tdefs exits once the last open file is closed");
    if unsafe { libc::umount2(mp.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_the_options() {
        let d = MountFlags::default();
        assert_eq!(ms_flags(&d), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_RELATIME);
        let mut f = d;
        for o in ["suid", "dev", "noexec", "noatime", "nodiratime", "lazytime", "sync", "dirsync"] {
            assert!(f.apply(o));
        }
        assert_eq!(
            ms_flags(&f),
            libc::MS_NOEXEC | libc::MS_NOATIME | libc::MS_NODIRATIME | libc::MS_LAZYTIME | libc::MS_SYNCHRONOUS | libc::MS_DIRSYNC
        );
        f.apply("strictatime");
        assert_eq!(ms_flags(&f) & (libc::MS_STRICTATIME | libc::MS_NOATIME | libc::MS_RELATIME), libc::MS_STRICTATIME);
    }
}

/// Where the kernel says whether FUSE over io_uring is allowed (Linux 6.14+).
pub const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

/// Whether to ask the kernel for FUSE over io_uring: `[mount] io-uring`, or the
/// `TDEFS_IO_URING` environment variable over it. `on` checks the kernel before anything
/// is mounted, so that a refusal changes nothing.
pub fn want_io_uring(configured: crate::config::IoUring) -> anyhow::Result<crate::config::IoUring> {
    use crate::config::IoUring;
    let mode = match std::env::var("TDEFS_IO_URING") {
        Ok(v) if !v.is_empty() => v.parse::<IoUring>().map_err(|e| anyhow::anyhow!("TDEFS_IO_URING: {e}"))?,
        _ => configured,
    };
    if mode == IoUring::On {
        match std::fs::read_to_string(ENABLE_URING) {
            Ok(v) if matches!(v.trim(), "Y" | "1") => {}
            Ok(_) => anyhow::bail!(
                "io-uring = \"on\", but the fuse module's enable_uring parameter is off: \
                 `echo 1 > {ENABLE_URING}` (or boot with fuse.enable_uring=1), or set io-uring = \"auto\""
            ),
            Err(e) => anyhow::bail!(
                "io-uring = \"on\", but this kernel has no FUSE over io_uring ({ENABLE_URING}: {e}; \
                 it needs Linux 6.14+ built with CONFIG_FUSE_IO_URING): set io-uring = \"auto\" or \"off\""
            ),
        }
    }
    Ok(mode)
}
