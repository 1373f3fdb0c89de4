//! Thin wrappers over the Linux system calls tdefs uses, returning `io::Result`.
//!
//! Everything works on file descriptors (`*at` calls), never on paths built from strings,
//! so renames elsewhere in the tree cannot redirect an operation. `/proc/self/fd/N` is used
//! where Linux offers no fd-based call for an `O_PATH` descriptor.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

pub type Stat = libc::stat;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Retry a call interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

const EMPTY: &CStr = c"";

/// `/proc/self/fd/N`: reopens or addresses the inode behind an `O_PATH` descriptor.
pub fn proc_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL")
}

pub fn fstatat(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int) -> io::Result<Stat> {
    let name = cstr(name)?;
    let mut st = MaybeUninit::<Stat>::uninit();
    cvt(unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), st.as_mut_ptr(), flags) })?;
    Ok(unsafe { st.assume_init() })
}

/// stat of the inode behind any descriptor, `O_PATH` ones included.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    cvt(unsafe {
        libc::fstatat(fd.as_raw_fd(), EMPTY.as_ptr(), st.as_mut_ptr(), libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW)
    })?;
    Ok(unsafe { st.assume_init() })
}

pub fn openat(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int, mode: libc::mode_t) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    retry(|| cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) }))
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Open the inode behind an `O_PATH` descriptor for real I/O.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    let p = proc_path(fd.as_raw_fd());
    retry(|| cvt(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC) }))
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    let name = cstr(name)?;
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::mode_t, rdev: libc::dev_t) -> io::Result<()> {
    let name = cstr(name)?;
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let (t, n) = (cstr(target)?, cstr(name)?);
    cvt(unsafe { libc::symlinkat(t.as_ptr(), dir.as_raw_fd(), n.as_ptr()) }).map(drop)
}

/// Target of the symlink an `O_PATH|O_NOFOLLOW` descriptor refers to.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<OsString> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    let n = cvt_size(unsafe {
        libc::readlinkat(fd.as_raw_fd(), EMPTY.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
    })?;
    buf.truncate(n);
    Ok(OsString::from_vec(buf))
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int) -> io::Result<()> {
    let name = cstr(name)?;
    cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
    flags: libc::c_uint,
) -> io::Result<()> {
    let (o, n) = (cstr(oldname)?, cstr(newname)?);
    cvt(unsafe { libc::renameat2(olddir.as_raw_fd(), o.as_ptr(), newdir.as_raw_fd(), n.as_ptr(), flags) }).map(drop)
}

/// Hard-link the inode behind `fd` as `newdir/newname` (works for `O_PATH` descriptors).
pub fn link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, newname: &OsStr) -> io::Result<()> {
    let (p, n) = (proc_path(fd.as_raw_fd()), cstr(newname)?);
    cvt(unsafe { libc::linkat(libc::AT_FDCWD, p.as_ptr(), newdir.as_raw_fd(), n.as_ptr(), libc::AT_SYMLINK_FOLLOW) })
        .map(drop)
}

/// chown of the inode behind `fd` itself (a symlink is not followed). `u32::MAX` keeps a value.
pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    cvt(unsafe { libc::fchownat(fd.as_raw_fd(), EMPTY.as_ptr(), uid, gid, libc::AT_EMPTY_PATH) }).map(drop)
}

/// chmod of the inode behind an `O_PATH` descriptor (not for symlinks).
pub fn fchmod_path(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    let p = proc_path(fd.as_raw_fd());
    cvt(unsafe { libc::chmod(p.as_ptr(), mode) }).map(drop)
}

/// utimensat on `dir/name` (flags may hold `AT_SYMLINK_NOFOLLOW`) or, with `name` empty,
/// on the inode behind an `O_PATH` descriptor.
pub fn utimens(fd: BorrowedFd<'_>, name: Option<&OsStr>, times: &[libc::timespec; 2], flags: libc::c_int) -> io::Result<()> {
    match name {
        Some(n) => {
            let n = cstr(n)?;
            cvt(unsafe { libc::utimensat(fd.as_raw_fd(), n.as_ptr(), times.as_ptr(), flags) }).map(drop)
        }
        None => {
            let p = proc_path(fd.as_raw_fd());
            cvt(unsafe { libc::utimensat(libc::AT_FDCWD, p.as_ptr(), times.as_ptr(), 0) }).map(drop)
        }
    }
}

/// Read up to `buf.len()` bytes at `off`, looping over short reads; fewer bytes mean EOF.
pub fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = retry(|| {
            cvt_size(unsafe {
                libc::pread(fd.as_raw_fd(), buf[done..].as_mut_ptr().cast(), buf.len() - done, (off + done as u64) as i64)
            })
        })?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

pub fn pwrite_all(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = retry(|| {
            cvt_size(unsafe {
                libc::pwrite(fd.as_raw_fd(), buf[done..].as_ptr().cast(), buf.len() - done, (off + done as u64) as i64)
            })
        })?;
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        done += n;
    }
    Ok(())
}

pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    retry(|| cvt(unsafe { libc::fsync(fd.as_raw_fd()) })).map(drop)
}

pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    retry(|| cvt(unsafe { libc::fdatasync(fd.as_raw_fd()) })).map(drop)
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    retry(|| cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len as i64) })).map(drop)
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    retry(|| cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off as i64, len as i64) })).map(drop)
}

pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: libc::c_int) -> io::Result<i64> {
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

/// One `getdents64` call into `buf`; returns bytes filled (0 at end of directory).
pub fn getdents(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let r = unsafe { libc::syscall(libc::SYS_getdents64, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Where an xattr call is aimed: a path (a `/proc/self/fd/N` alias of the inode) and
/// whether its last component is followed (not for symlinks, whose own xattrs are meant).
pub struct XattrTarget {
    pub path: CString,
    pub follow: bool,
}

pub fn getxattr(t: &XattrTarget, name: &OsStr, buf: &mut [u8]) -> io::Result<usize> {
    let n = cstr(name)?;
    let (p, len) = (buf.as_mut_ptr().cast(), buf.len());
    cvt_size(unsafe {
        if t.follow {
            libc::getxattr(t.path.as_ptr(), n.as_ptr(), p, len)
        } else {
            libc::lgetxattr(t.path.as_ptr(), n.as_ptr(), p, len)
        }
    })
}

pub fn setxattr(t: &XattrTarget, name: &OsStr, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let n = cstr(name)?;
    let (p, len) = (value.as_ptr().cast(), value.len());
    cvt(unsafe {
        if t.follow {
            libc::setxattr(t.path.as_ptr(), n.as_ptr(), p, len, flags)
        } else {
            libc::lsetxattr(t.path.as_ptr(), n.as_ptr(), p, len, flags)
        }
    })
    .map(drop)
}

pub fn listxattr(t: &XattrTarget, buf: &mut [u8]) -> io::Result<usize> {
    let (p, len) = (buf.as_mut_ptr().cast(), buf.len());
    cvt_size(unsafe {
        if t.follow {
            libc::listxattr(t.path.as_ptr(), p, len)
        } else {
            libc::llistxattr(t.path.as_ptr(), p, len)
        }
    })
}

pub fn removexattr(t: &XattrTarget, name: &OsStr) -> io::Result<()> {
    let n = cstr(name)?;
    cvt(unsafe {
        if t.follow {
            libc::removexattr(t.path.as_ptr(), n.as_ptr())
        } else {
            libc::lremovexattr(t.path.as_ptr(), n.as_ptr())
        }
    })
    .map(drop)
}

/// `flock(LOCK_EX | LOCK_NB)`; `Ok(false)` when another process holds it.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    match cvt(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// fsync a directory, making the names created, renamed or removed in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    let f = std::fs::File::open(dir)?;
    f.sync_all()
}

/// The current open-file limit.
pub fn nofile_limit() -> u64 {
    unsafe {
        let mut rl = MaybeUninit::<libc::rlimit>::uninit();
        if libc::getrlimit(libc::RLIMIT_NOFILE, rl.as_mut_ptr()) != 0 {
            return 1024;
        }
        rl.assume_init().rlim_cur
    }
}

/// Raise the open-file limit as far as allowed: to the kernel's `nr_open` when privileged,
/// else to the hard limit. The FUSE adapter keeps one `O_PATH` descriptor per inode the
/// kernel remembers. Returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    unsafe {
        let mut rl = MaybeUninit::<libc::rlimit>::uninit();
        if libc::getrlimit(libc::RLIMIT_NOFILE, rl.as_mut_ptr()) != 0 {
            return 1024;
        }
        let mut rl = rl.assume_init();
        let want = libc::rlimit { rlim_cur: nr_open.max(rl.rlim_max), rlim_max: nr_open.max(rl.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
            return want.rlim_cur;
        }
        rl.rlim_cur = rl.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        rl.rlim_cur
    }
}

/// Flush the whole filesystem holding `fd` (makes the state found after a crash durable
/// before recovery reasons about it).
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    cvt(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// stat of `rel` ("a/b/c") below `dir` without following any symlink on the way.
pub fn stat_below(dir: BorrowedFd<'_>, rel: &[u8]) -> io::Result<Stat> {
    let comps: Vec<&[u8]> = rel.split(|&b| b == b'/').filter(|c| !c.is_empty()).collect();
    let Some((last, parents)) = comps.split_last() else {
        return fstat(dir);
    };
    let mut cur: Option<OwnedFd> = None;
    for c in parents {
        let base = cur.as_ref().map(|f| f.as_fd()).unwrap_or(dir);
        let next = openat(base, OsStr::from_bytes(c), libc::O_PATH | libc::O_NOFOLLOW | libc::O_DIRECTORY, 0)?;
        cur = Some(next);
    }
    let base = cur.as_ref().map(|f| f.as_fd()).unwrap_or(dir);
    fstatat(base, OsStr::from_bytes(last), libc::AT_SYMLINK_NOFOLLOW)
}

/// Open directory `rel` ("a/b") below `dir` for reading, without following any symlink.
pub fn open_dir_below(dir: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    let mut cur = openat(dir, OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    for c in rel.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
        cur = openat(cur.as_fd(), OsStr::from_bytes(c), libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_DIRECTORY, 0)?;
    }
    Ok(cur)
}

/// A file handle (`name_to_handle_at`): names a backing inode, generation included,
/// without keeping it open.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Handle {
    ty: i32,
    bytes: Box<[u8]>,
}

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

const HANDLE_HEADER: usize = 8; // struct file_handle { u32 handle_bytes; i32 handle_type; }

/// FILEID_INO32_GEN and FILEID_INO32_GEN_PARENT (include/linux/exportfs.h): inode number
/// and generation as two u32, the handles of ext2/3/4 (and of xfs with 32-bit inodes).
const FILEID_INO32_GEN: i32 = 1;
const FILEID_INO32_GEN_PARENT: i32 = 2;

impl Handle {
    /// The inode generation, for handles that carry one where it is known to be
    /// (FILEID_INO32_GEN*).
    pub fn generation(&self) -> Option<u32> {
        match self.ty {
            FILEID_INO32_GEN | FILEID_INO32_GEN_PARENT if self.bytes.len() >= 8 => {
                Some(u32::from_ne_bytes(self.bytes[4..8].try_into().expect("4 bytes")))
            }
            _ => None,
        }
    }

    /// For a filesystem whose handles are FILEID_INO32_GEN* (as `like`'s): a handle of inode
    /// `ino` with generation 0, which ext4 takes as "any generation" (ext4_nfs_get_inode);
    /// the caller compares the real generation afterwards.
    pub fn any_generation(like: &Handle, ino: u64) -> Option<Handle> {
        if !matches!(like.ty, FILEID_INO32_GEN | FILEID_INO32_GEN_PARENT) || ino > u64::from(u32::MAX) {
            return None;
        }
        let mut b = Vec::with_capacity(8);
        b.extend_from_slice(&(ino as u32).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        Some(Handle { ty: FILEID_INO32_GEN, bytes: b.into() })
    }
}

/// The handle of `dir/name` (not following a final symlink); `name` empty means the inode
/// behind `dir` itself.
pub fn handle_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Handle> {
    let n = cstr(name)?;
    let mut buf = [0u32; (HANDLE_HEADER + libc::MAX_HANDLE_SZ as usize) / 4];
    let fh = buf.as_mut_ptr() as *mut libc::file_handle;
    let mut mount_id = 0;
    let flags = if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    unsafe {
        (*fh).handle_bytes = libc::MAX_HANDLE_SZ as u32;
        cvt(libc::name_to_handle_at(dir.as_raw_fd(), n.as_ptr(), fh, &mut mount_id, flags))?;
        let len = ((*fh).handle_bytes as usize).min(libc::MAX_HANDLE_SZ as usize);
        let bytes = std::slice::from_raw_parts((buf.as_ptr() as *const u8).add(HANDLE_HEADER), len);
        Ok(Handle { ty: (*fh).handle_type, bytes: bytes.into() })
    }
}

/// Open the inode a handle names (`mount` is any descriptor on the same filesystem).
pub fn open_handle(mount: BorrowedFd<'_>, h: &Handle, flags: libc::c_int) -> io::Result<OwnedFd> {
    let mut buf = [0u32; (HANDLE_HEADER + libc::MAX_HANDLE_SZ as usize) / 4];
    let fh = buf.as_mut_ptr() as *mut libc::file_handle;
    unsafe {
        (*fh).handle_bytes = h.bytes.len() as u32;
        (*fh).handle_type = h.ty;
        std::ptr::copy_nonoverlapping(h.bytes.as_ptr(), (buf.as_mut_ptr() as *mut u8).add(HANDLE_HEADER), h.bytes.len());
        retry(|| cvt(libc::open_by_handle_at(mount.as_raw_fd(), fh, flags | libc::O_CLOEXEC)))
            .map(|fd| OwnedFd::from_raw_fd(fd))
    }
}

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
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = getdents(d.as_fd(), &mut buf)?;
            if n == 0 {
                return Ok(names);
            }
            let mut pos = 0;
            while pos < n {
                let reclen = u16::from_ne_bytes([buf[pos + 16], buf[pos + 17]]) as usize;
                let raw = &buf[pos + 19..pos + reclen];
                let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                pos += reclen;
                if name != b"." && name != b".." {
                    names.push(OsStr::from_bytes(name).to_os_string());
                }
            }
        }
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
