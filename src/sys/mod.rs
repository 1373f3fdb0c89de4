//! The Linux system calls tdefs uses, returning `io::Result`: rustix's safe calls where it
//! has them, with the flag conventions of the callers (libc's `O_*`, `AT_*` numbers);
//! `Dir` (`dir.rs`, a verified metadata directory), file handles (`handle.rs`) and the
//! no-atime mount tree (`mount.rs`) beside them.
//!
//! Everything works on file descriptors (`*at` calls), never on paths built from strings,
//! so renames elsewhere in the tree cannot redirect an operation. `/proc/self/fd/N` is used
//! where Linux offers no fd-based call for an `O_PATH` descriptor.
//!
//! Still libc, and why: `fstatat`/`fstat` fill `libc::stat`, the `Stat` every layer and
//! fuser's attribute conversion read (rustix's `Stat` is the kernel's struct, with other
//! field types); `name_to_handle_at`/`open_by_handle_at` and `mount_setattr` have no
//! rustix wrapper.

mod dir;
mod handle;
mod mount;

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};

pub use self::dir::Dir;
pub use self::handle::{handle_at, open_handle, Handle};
pub use self::mount::noatime_tree;

pub type Stat = libc::stat;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Retry a call interrupted by a signal.
fn retry<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(rustix::io::Errno::INTR) => continue,
            r => return r.map_err(io::Error::from),
        }
    }
}

pub fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

const EMPTY: &CStr = c"";

fn oflags(flags: libc::c_int) -> OFlags {
    OFlags::from_bits_retain(flags as u32) | OFlags::CLOEXEC
}

fn at_flags(flags: libc::c_int) -> AtFlags {
    AtFlags::from_bits_retain(flags as u32)
}

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
    retry(|| rustix::fs::openat(dir, name, oflags(flags), Mode::from_raw_mode(mode)))
}

/// Open the inode behind an `O_PATH` descriptor for real I/O.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    let p = proc_path(fd.as_raw_fd());
    retry(|| rustix::fs::open(p.as_c_str(), oflags(flags), Mode::empty()))
}

pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    Ok(rustix::fs::mkdirat(dir, name, Mode::from_raw_mode(mode))?)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: libc::mode_t, rdev: libc::dev_t) -> io::Result<()> {
    let kind = rustix::fs::FileType::from_raw_mode(mode);
    Ok(rustix::fs::mknodat(dir, name, kind, Mode::from_raw_mode(mode), rdev)?)
}

pub fn symlinkat(target: &OsStr, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    Ok(rustix::fs::symlinkat(target, dir, name)?)
}

/// Target of the symlink an `O_PATH|O_NOFOLLOW` descriptor refers to.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<OsString> {
    let target = rustix::fs::readlinkat(fd, EMPTY, Vec::new())?;
    Ok(OsString::from_vec(target.into_bytes()))
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, flags: libc::c_int) -> io::Result<()> {
    Ok(rustix::fs::unlinkat(dir, name, at_flags(flags))?)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &OsStr,
    newdir: BorrowedFd<'_>,
    newname: &OsStr,
    flags: libc::c_uint,
) -> io::Result<()> {
    let flags = rustix::fs::RenameFlags::from_bits_retain(flags);
    Ok(rustix::fs::renameat_with(olddir, oldname, newdir, newname, flags)?)
}

/// Hard-link the inode behind `fd` as `newdir/newname` (works for `O_PATH` descriptors).
pub fn link_fd(fd: BorrowedFd<'_>, newdir: BorrowedFd<'_>, newname: &OsStr) -> io::Result<()> {
    let p = proc_path(fd.as_raw_fd());
    Ok(rustix::fs::linkat(rustix::fs::CWD, p.as_c_str(), newdir, newname, AtFlags::SYMLINK_FOLLOW)?)
}

/// chown of the inode behind `fd` itself (a symlink is not followed). `u32::MAX` keeps a value.
pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    let uid = (uid != u32::MAX).then(|| rustix::fs::Uid::from_raw(uid));
    let gid = (gid != u32::MAX).then(|| rustix::fs::Gid::from_raw(gid));
    Ok(rustix::fs::chownat(fd, EMPTY, uid, gid, AtFlags::EMPTY_PATH)?)
}

/// chmod of the inode behind an `O_PATH` descriptor (not for symlinks).
pub fn fchmod_path(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    let p = proc_path(fd.as_raw_fd());
    Ok(rustix::fs::chmod(p.as_c_str(), Mode::from_raw_mode(mode))?)
}

/// utimensat on `dir/name` (flags may hold `AT_SYMLINK_NOFOLLOW`) or, with `name` empty,
/// on the inode behind an `O_PATH` descriptor. `UTIME_NOW`/`UTIME_OMIT` pass through.
pub fn utimens(fd: BorrowedFd<'_>, name: Option<&OsStr>, times: &[libc::timespec; 2], flags: libc::c_int) -> io::Result<()> {
    let ts = |t: &libc::timespec| rustix::fs::Timespec { tv_sec: t.tv_sec, tv_nsec: t.tv_nsec };
    let times = rustix::fs::Timestamps { last_access: ts(&times[0]), last_modification: ts(&times[1]) };
    match name {
        Some(n) => Ok(rustix::fs::utimensat(fd, n, &times, at_flags(flags))?),
        None => {
            let p = proc_path(fd.as_raw_fd());
            Ok(rustix::fs::utimensat(rustix::fs::CWD, p.as_c_str(), &times, AtFlags::empty())?)
        }
    }
}

/// Read up to `buf.len()` bytes at `off`, looping over short reads; fewer bytes mean EOF.
pub fn pread_full(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let n = retry(|| rustix::io::pread(fd, &mut buf[done..], off + done as u64))?;
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
        let n = retry(|| rustix::io::pwrite(fd, &buf[done..], off + done as u64))?;
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        done += n;
    }
    Ok(())
}

pub fn fsync(fd: BorrowedFd<'_>) -> io::Result<()> {
    retry(|| rustix::fs::fsync(fd))
}

pub fn fdatasync(fd: BorrowedFd<'_>) -> io::Result<()> {
    retry(|| rustix::fs::fdatasync(fd))
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> io::Result<()> {
    retry(|| rustix::fs::ftruncate(fd, len))
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    let mode = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
    retry(|| rustix::fs::fallocate(fd, mode, off, len))
}

/// lseek with libc's whence (`SEEK_SET`, `SEEK_DATA`, `SEEK_HOLE`; `off` from the start).
pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: libc::c_int) -> io::Result<i64> {
    use rustix::fs::SeekFrom;
    let from = match whence {
        libc::SEEK_SET => SeekFrom::Start(off as u64),
        libc::SEEK_CUR => SeekFrom::Current(off),
        libc::SEEK_END => SeekFrom::End(off),
        libc::SEEK_DATA => SeekFrom::Data(off as u64),
        libc::SEEK_HOLE => SeekFrom::Hole(off as u64),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    Ok(rustix::fs::seek(fd, from)? as i64)
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    cvt(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    Ok(unsafe { st.assume_init() })
}

/// One `getdents64` call into `buf`; returns bytes filled (0 at end of directory). Read
/// them with `dirents`.
fn getdents(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    let r = unsafe { libc::syscall(libc::SYS_getdents64, fd.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// One entry of a `getdents64` buffer.
pub struct Dirent<'a> {
    pub ino: u64,
    /// The offset (cookie) of the next entry: `lseek` there to continue after this one.
    pub next: u64,
    /// `d_type` (`DT_*`, 0 when the filesystem does not say).
    pub kind: u8,
    pub name: &'a OsStr,
}

impl Dirent<'_> {
    /// "." or "..", which every listing but readdir's leaves out.
    pub fn is_dot(&self) -> bool {
        self.name == "." || self.name == ".."
    }
}

/// Every entry of directory `fd` from its current offset ("." and ".." included), in
/// directory order, to `f` until it breaks; returns what it broke with.
pub fn for_each_dirent<B>(fd: BorrowedFd<'_>, mut f: impl FnMut(Dirent<'_>) -> ControlFlow<B>) -> io::Result<Option<B>> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = getdents(fd, &mut buf)?;
        if n == 0 {
            return Ok(None);
        }
        for e in dirents(&buf[..n]) {
            if let ControlFlow::Break(b) = f(e) {
                return Ok(Some(b));
            }
        }
    }
}

/// The entries in `filled`, the bytes one `getdents` call filled ("." and ".." included).
fn dirents(filled: &[u8]) -> impl Iterator<Item = Dirent<'_>> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= filled.len() {
            return None;
        }
        // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
        let b = &filled[pos..];
        let ino = u64::from_ne_bytes(b[0..8].try_into().expect("8 bytes"));
        let next = i64::from_ne_bytes(b[8..16].try_into().expect("8 bytes")) as u64;
        let reclen = u16::from_ne_bytes([b[16], b[17]]) as usize;
        let raw = &b[19..reclen];
        let name = OsStr::from_bytes(&raw[..raw.iter().position(|&c| c == 0).unwrap_or(raw.len())]);
        pos += reclen;
        Some(Dirent { ino, next, kind: b[18], name })
    })
}

/// Where an xattr call is aimed: a path (a `/proc/self/fd/N` alias of the inode) and
/// whether its last component is followed (not for symlinks, whose own xattrs are meant).
pub struct XattrTarget {
    pub path: CString,
    pub follow: bool,
}

/// The value of `name` into `buf`, or with an empty `buf` its size (as getxattr(2)).
pub fn getxattr(t: &XattrTarget, name: &OsStr, buf: &mut [u8]) -> io::Result<usize> {
    use rustix::fs::{getxattr, getxattr_query, lgetxattr, lgetxattr_query};
    let p = t.path.as_c_str();
    Ok(match (t.follow, buf.is_empty()) {
        (true, true) => getxattr_query(p, name)?,
        (true, false) => getxattr(p, name, buf)?,
        (false, true) => lgetxattr_query(p, name)?,
        (false, false) => lgetxattr(p, name, buf)?,
    })
}

pub fn setxattr(t: &XattrTarget, name: &OsStr, value: &[u8], flags: libc::c_int) -> io::Result<()> {
    let flags = rustix::fs::XattrFlags::from_bits_retain(flags as u32);
    let p = t.path.as_c_str();
    Ok(if t.follow { rustix::fs::setxattr(p, name, value, flags)? } else { rustix::fs::lsetxattr(p, name, value, flags)? })
}

/// The NUL-separated names into `buf`, or with an empty `buf` their size (as listxattr(2)).
pub fn listxattr(t: &XattrTarget, buf: &mut [u8]) -> io::Result<usize> {
    use rustix::fs::{listxattr, listxattr_query, llistxattr, llistxattr_query};
    let p = t.path.as_c_str();
    Ok(match (t.follow, buf.is_empty()) {
        (true, true) => listxattr_query(p)?,
        (true, false) => listxattr(p, buf)?,
        (false, true) => llistxattr_query(p)?,
        (false, false) => llistxattr(p, buf)?,
    })
}

pub fn removexattr(t: &XattrTarget, name: &OsStr) -> io::Result<()> {
    let p = t.path.as_c_str();
    Ok(if t.follow { rustix::fs::removexattr(p, name)? } else { rustix::fs::lremovexattr(p, name)? })
}

/// `flock(LOCK_EX | LOCK_NB)`; `Ok(false)` when another process holds it.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    match rustix::fs::flock(fd, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// fsync a directory, making the names created, renamed or removed in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    let f = std::fs::File::open(dir)?;
    f.sync_all()
}

/// The current open-file limit.
pub fn nofile_limit() -> u64 {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Raise the open-file limit as far as allowed: to the kernel's `nr_open` when privileged,
/// else to the hard limit. The FUSE adapter keeps one `O_PATH` descriptor per inode the
/// kernel remembers. Returns the limit now in force.
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let now = getrlimit(Resource::Nofile);
    let hard = now.maximum.unwrap_or(u64::MAX);
    let want = nr_open.max(hard);
    if setrlimit(Resource::Nofile, Rlimit { current: Some(want), maximum: Some(want) }).is_ok() {
        return want;
    }
    let _ = setrlimit(Resource::Nofile, Rlimit { current: now.maximum, maximum: now.maximum });
    nofile_limit()
}

/// Flush the whole filesystem holding `fd` (makes the state found after a crash durable
/// before recovery reasons about it).
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::fs::syncfs(fd)?)
}

/// openat2 confined to `dir`: no symlink followed anywhere on the way ("a/b/c" with a
/// symlinked "b" fails with ELOOP), no ".." or absolute path out of it (EXDEV). Paths
/// longer than PATH_MAX (any user can build a tree 100,000 directories deep) are resolved
/// a few thousand bytes at a time, each step confined to the directory the last one opened.
fn open_beneath(dir: BorrowedFd<'_>, rel: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    use rustix::fs::ResolveFlags;
    const STEP: usize = 3072; // < PATH_MAX (4096), > NAME_MAX (255)
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let open = |base: BorrowedFd<'_>, path: &[u8], flags: libc::c_int| {
        retry(|| rustix::fs::openat2(base, OsStr::from_bytes(path), oflags(flags), Mode::empty(), resolve))
    };
    let mut rest = rel.strip_prefix(b"/").unwrap_or(rel);
    if rest.is_empty() {
        rest = b".";
    }
    let mut base: Option<OwnedFd> = None;
    while rest.len() > STEP {
        let cut = rest[..STEP].iter().rposition(|&b| b == b'/').ok_or_else(|| io::Error::from_raw_os_error(libc::ENAMETOOLONG))?;
        let next = open(base.as_ref().map_or(dir, |b| b.as_fd()), &rest[..cut], libc::O_PATH | libc::O_DIRECTORY)?;
        base = Some(next);
        rest = &rest[cut + 1..];
    }
    open(base.as_ref().map_or(dir, |b| b.as_fd()), rest, flags)
}

/// stat of `rel` ("a/b/c") below `dir` without following any symlink on the way.
/// A symlink on the way is ENOTDIR, as for any other non-directory there.
pub fn stat_below(dir: BorrowedFd<'_>, rel: &[u8]) -> io::Result<Stat> {
    let fd = open_beneath(dir, rel, libc::O_PATH | libc::O_NOFOLLOW).map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) => io::Error::from_raw_os_error(libc::ENOTDIR),
        _ => e,
    })?;
    fstat(fd.as_fd())
}

/// Open regular file `rel` below `dir` with `flags`, without following any symlink.
pub fn open_file_below(dir: BorrowedFd<'_>, rel: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    open_beneath(dir, rel, flags | libc::O_NOFOLLOW)
}

/// Open directory `rel` ("a/b") below `dir` for reading, without following any symlink.
pub fn open_dir_below(dir: BorrowedFd<'_>, rel: &[u8]) -> io::Result<OwnedFd> {
    open_beneath(dir, rel, libc::O_RDONLY | libc::O_DIRECTORY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(d: &tempfile::TempDir) -> OwnedFd {
        std::fs::File::open(d.path()).unwrap().into()
    }

    #[test]
    fn paths_below_never_follow_a_symlink_nor_leave_the_root() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink("b", d.path().join("a/link")).unwrap();
        let r = root(&d);
        assert_eq!(stat_below(r.as_fd(), b"/a/b/f").unwrap().st_size, 1);
        assert_eq!(stat_below(r.as_fd(), b"").unwrap().st_ino, fstat(r.as_fd()).unwrap().st_ino);
        // The final symlink itself is stat'ed; one on the way is "not a directory".
        assert_eq!(stat_below(r.as_fd(), b"/a/link").unwrap().st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(stat_below(r.as_fd(), b"/a/link/f").unwrap_err().raw_os_error(), Some(libc::ENOTDIR));
        assert_eq!(open_dir_below(r.as_fd(), b"a/link").unwrap_err().raw_os_error(), Some(libc::ELOOP));
        assert_eq!(open_dir_below(r.as_fd(), b"a/../..").unwrap_err().raw_os_error(), Some(libc::EXDEV));
        assert!(open_dir_below(r.as_fd(), b"a/b").is_ok());
    }

    #[test]
    fn paths_below_longer_than_path_max() {
        let d = tempfile::tempdir().unwrap();
        let rel: Vec<u8> = std::iter::repeat(&b"/dddddddddd"[..]).take(1000).flatten().copied().collect(); // 11,000 bytes
        let r = root(&d);
        let mut cur: OwnedFd = r.try_clone().unwrap();
        for _ in 0..1000 {
            mkdirat(cur.as_fd(), OsStr::new("dddddddddd"), 0o755).unwrap();
            cur = openat(cur.as_fd(), OsStr::new("dddddddddd"), libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        }
        assert_eq!(stat_below(r.as_fd(), &rel).unwrap().st_ino, fstat(cur.as_fd()).unwrap().st_ino);
        assert!(open_dir_below(r.as_fd(), &rel).is_ok());
        std::process::Command::new("rm").arg("-rf").arg(d.path().join("dddddddddd")).status().unwrap();
    }

    #[test]
    fn dirents_lists_every_name_of_a_directory() {
        let d = tempfile::tempdir().unwrap();
        for i in 0..500 {
            std::fs::write(d.path().join(format!("file-{i:03}")), b"").unwrap();
        }
        let r = root(&d);
        let mut buf = vec![0u8; 4096]; // several getdents calls
        let mut names = Vec::new();
        loop {
            let n = getdents(r.as_fd(), &mut buf).unwrap();
            if n == 0 {
                break;
            }
            names.extend(dirents(&buf[..n]).map(|e| e.name.to_string_lossy().into_owned()));
        }
        names.sort();
        assert_eq!(names.len(), 502);
        assert_eq!((names[0].as_str(), names[1].as_str(), names[2].as_str(), names[501].as_str()), (".", "..", "file-000", "file-499"));
        // The same through for_each_dirent, and a break stops it with its value.
        lseek(r.as_fd(), 0, libc::SEEK_SET).unwrap();
        let mut n = 0;
        assert_eq!(for_each_dirent(r.as_fd(), |_| ControlFlow::<()>::Continue(n += 1)).unwrap(), None);
        assert_eq!(n, 502);
        lseek(r.as_fd(), 0, libc::SEEK_SET).unwrap();
        let hit = for_each_dirent(r.as_fd(), |e| match e.name == "file-250" {
            true => ControlFlow::Break(e.name.to_os_string()),
            false => ControlFlow::Continue(()),
        });
        assert_eq!(hit.unwrap().as_deref(), Some(OsStr::new("file-250")));
    }
}
