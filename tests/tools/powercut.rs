//! Power-cut simulator (issue 9): a passthrough FUSE filesystem that keeps, for every file,
//! the bytes and size it had at its last fsync/fdatasync, and on command (`cut` on the
//! control socket) throws away everything written since, as a power loss would.
//!
//! Model: data reaches the lower directory at once, and an undo log records the original
//! contents of each 4 KiB page the first time it changes after a sync (and the size at the
//! last sync). fsync and fdatasync of a file make its data durable (the undo log is
//! dropped); writes through an O_SYNC/O_DSYNC handle are durable when they return;
//! sync_file_range never reaches a FUSE filesystem and makes nothing durable, as on a
//! power cut. Namespace operations (create, mkdir, rename, link, unlink, rmdir, symlink,
//! mknod) reach the lower directory at once and are durable. The control socket also
//! reports how often each directory was fsynced, to show that directory fsyncs reach the
//! layer below.
//!
//! It serves every file with direct I/O and zero cache lifetimes, so the kernel above
//! holds nothing a cut would make stale.
//!
//!   tdefs-powercut --lower DIR --mount DIR --control SOCKET
//!   control commands: `cut` -> `ok <files rolled back>`; `stats`; `dirsyncs <relative dir>`

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};
use tdefs::fs::{kind_of, system_time};
use tdefs::sys;

const PAGE: u64 = 4096;
const TTL: Duration = Duration::ZERO;

#[derive(Parser)]
#[command(about = "Power-cut simulator: a FUSE passthrough that can drop every write not yet fsynced")]
struct Args {
    #[arg(long)]
    lower: PathBuf,
    #[arg(long)]
    mount: PathBuf,
    #[arg(long)]
    control: PathBuf,
}

/// What a file looked like at its last sync.
struct Undo {
    file: File,
    size: u64,
    /// Original bytes of each page changed since (shorter than a page at the end of file).
    pages: BTreeMap<u64, Vec<u8>>,
}

struct Node {
    fd: OwnedFd,
    kind: FileType,
    lookups: AtomicU64,
}

struct Open {
    ino: u64,
    file: File,
    sync: bool,
}

struct Sim {
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    opens: Mutex<HashMap<u64, Arc<Open>>>,
    next_fh: AtomicU64,
    dirty: Mutex<HashMap<u64, Undo>>,
    /// Writers hold it shared; a cut holds it exclusively.
    cut_lock: RwLock<()>,
    dir_syncs: Mutex<HashMap<u64, u64>>,
    stats: Mutex<BTreeMap<&'static str, u64>>,
    root_ino: u64,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

impl Sim {
    fn count(&self, what: &'static str) {
        *self.stats.lock().entry(what).or_default() += 1;
    }

    fn nodeid(&self, ino: u64) -> u64 {
        if ino == self.root_ino { 1 } else { ino }
    }

    fn attr(&self, st: &sys::Stat) -> FileAttr {
        FileAttr {
            ino: INodeNo(self.nodeid(st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind_of(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: st.st_nlink as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    fn node(&self, nodeid: INodeNo) -> Result<Arc<Node>, Errno> {
        self.nodes.read().get(&nodeid.0).cloned().ok_or(Errno::ESTALE)
    }

    fn lookup_in(&self, parent: &Node, name: &OsStr) -> Result<FileAttr, Errno> {
        let fd = sys::openat(parent.fd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(errno)?;
        let st = sys::fstat(fd.as_fd()).map_err(errno)?;
        let id = self.nodeid(st.st_ino);
        let mut nodes = self.nodes.write();
        let n = nodes.entry(id).or_insert_with(|| Arc::new(Node { fd, kind: kind_of(st.st_mode), lookups: AtomicU64::new(0) }));
        n.lookups.fetch_add(1, Ordering::Relaxed);
        Ok(self.attr(&st))
    }

    /// Record the original bytes of every page of `[off, end)` not recorded since the last
    /// sync (the caller holds the cut lock shared and is about to change them).
    fn save(&self, ino: u64, file: &File, off: u64, end: u64) -> std::io::Result<()> {
        let mut dirty = self.dirty.lock();
        let size = sys::fstat(file.as_fd())?.st_size as u64;
        let u = match dirty.entry(ino) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Undo { file: file.try_clone()?, size, pages: BTreeMap::new() }),
        };
        if end <= off {
            return Ok(());
        }
        for p in off / PAGE..=(end - 1) / PAGE {
            if let std::collections::btree_map::Entry::Vacant(v) = u.pages.entry(p) {
                let mut buf = vec![0u8; PAGE as usize];
                let n = sys::pread_full(file.as_fd(), &mut buf, p * PAGE)?;
                buf.truncate(n);
                v.insert(buf);
            }
        }
        Ok(())
    }

    /// A size change from `cur` to `new`: the pages that vanish or gain zeros change.
    fn save_resize(&self, ino: u64, file: &File, new: u64) -> std::io::Result<()> {
        let cur = sys::fstat(file.as_fd())?.st_size as u64;
        if new < cur {
            self.save(ino, file, new, cur)
        } else {
            self.save(ino, file, cur, cur.max(new.min(cur.div_ceil(PAGE) * PAGE)))
        }
    }

    /// Data written through an O_SYNC/O_DSYNC handle is durable: fold it into the undo record.
    fn synced_write(&self, ino: u64, data: &[u8], off: u64) {
        let mut dirty = self.dirty.lock();
        if let Some(u) = dirty.get_mut(&ino) {
            let end = off + data.len() as u64;
            for (&p, orig) in u.pages.range_mut(off / PAGE..=(end - 1) / PAGE) {
                let (ps, pe) = (p * PAGE, p * PAGE + PAGE);
                let (lo, hi) = (off.max(ps), end.min(pe));
                let need = (hi - ps) as usize;
                if orig.len() < need {
                    orig.resize(need, 0);
                }
                orig[(lo - ps) as usize..need].copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
            }
            u.size = u.size.max(end);
        }
    }

    fn synced(&self, ino: u64) {
        self.dirty.lock().remove(&ino);
    }

    /// Drop every write since each file's last sync.
    fn cut(&self) -> Result<usize, String> {
        let t = Instant::now();
        while !self.opens.lock().is_empty() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err(format!("{} files still open; stop the filesystem above first", self.opens.lock().len()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _all = self.cut_lock.write();
        let mut dirty = self.dirty.lock();
        let n = dirty.len();
        for (_, u) in dirty.drain() {
            let fd = u.file.as_fd();
            sys::ftruncate(fd, u.size).map_err(|e| e.to_string())?;
            for (p, orig) in &u.pages {
                if p * PAGE < u.size {
                    let keep = ((u.size - p * PAGE) as usize).min(orig.len());
                    sys::pwrite_all(fd, &orig[..keep], p * PAGE).map_err(|e| e.to_string())?;
                }
            }
            sys::fsync(fd).map_err(|e| e.to_string())?;
        }
        self.count("cuts");
        Ok(n)
    }

    fn control(&self, line: &str, lower: &Path) -> String {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("cut") => match self.cut() {
                Ok(n) => format!("ok {n}"),
                Err(e) => format!("error {e}"),
            },
            Some("stats") => {
                let s = self.stats.lock();
                let mut out = format!("dirty_files={}", self.dirty.lock().len());
                for (k, v) in s.iter() {
                    out.push_str(&format!(" {k}={v}"));
                }
                out
            }
            Some("dirsyncs") => {
                let rel = it.next().unwrap_or("");
                match std::fs::metadata(lower.join(rel)) {
                    Ok(m) => {
                        use std::os::unix::fs::MetadataExt;
                        format!("ok {}", self.dir_syncs.lock().get(&m.ino()).copied().unwrap_or(0))
                    }
                    Err(e) => format!("error {e}"),
                }
            }
            _ => "error unknown command (cut | stats | dirsyncs DIR)".into(),
        }
    }
}

struct Fs(Arc<Sim>);

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, cfg: &mut KernelConfig) -> std::io::Result<()> {
        let _ = cfg.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.node(parent).and_then(|p| self.0.lookup_in(&p, name)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, n: u64) {
        if ino.0 == 1 {
            return;
        }
        let mut nodes = self.0.nodes.write();
        if let Some(node) = nodes.get(&ino.0) {
            if node.lookups.fetch_sub(n, Ordering::Relaxed) <= n {
                nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.node(ino).and_then(|n| sys::fstat(n.fd.as_fd()).map_err(errno)) {
            Ok(st) => reply.attr(&TTL, &self.0.attr(&st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| -> Result<sys::Stat, Errno> {
            let n = self.0.node(ino)?;
            if let Some(size) = size {
                let _w = self.0.cut_lock.read();
                let f = File::from(sys::reopen(n.fd.as_fd(), libc::O_RDWR).map_err(errno)?);
                self.0.save_resize(ino.0, &f, size).map_err(errno)?;
                sys::ftruncate(f.as_fd(), size).map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                sys::fchown(n.fd.as_fd(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)).map_err(errno)?;
            }
            if let Some(m) = mode {
                if n.kind != FileType::Symlink {
                    sys::fchmod_path(n.fd.as_fd(), m & 0o7777).map_err(errno)?;
                }
            }
            if (atime.is_some() || mtime.is_some()) && n.kind != FileType::Symlink {
                let c = |t: Option<TimeOrNow>| match t {
                    None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                    Some(TimeOrNow::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        libc::timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 }
                    }
                };
                sys::utimens(n.fd.as_fd(), None, &[c(atime), c(mtime)], 0).map_err(errno)?;
            }
            sys::fstat(n.fd.as_fd()).map_err(errno)
        })();
        match r {
            Ok(st) => reply.attr(&TTL, &self.0.attr(&st)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.node(ino).and_then(|n| sys::readlink_fd(n.fd.as_fd()).map_err(errno)) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, rdev: u32, reply: ReplyEntry) {
        let r = self.0.node(parent).and_then(|p| {
            sys::mknodat(p.fd.as_fd(), name, mode, rdev as libc::dev_t).map_err(errno)?;
            self.0.lookup_in(&p, name)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let r = self.0.node(parent).and_then(|p| {
            sys::mkdirat(p.fd.as_fd(), name, mode).map_err(errno)?;
            self.0.lookup_in(&p, name)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.0.node(parent).and_then(|p| {
            let st = sys::fstatat(p.fd.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW).map_err(errno)?;
            sys::unlinkat(p.fd.as_fd(), name, 0).map_err(errno)?;
            if st.st_nlink <= 1 {
                self.0.synced(st.st_ino); // gone for good: nothing to roll back
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.0.node(parent).and_then(|p| sys::unlinkat(p.fd.as_fd(), name, libc::AT_REMOVEDIR).map_err(errno)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, target: &Path, reply: ReplyEntry) {
        let r = self.0.node(parent).and_then(|p| {
            sys::symlinkat(target.as_os_str(), p.fd.as_fd(), name).map_err(errno)?;
            self.0.lookup_in(&p, name)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, np: INodeNo, nn: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        let r = self.0.node(parent).and_then(|p| {
            let q = self.0.node(np)?;
            let over = sys::fstatat(q.fd.as_fd(), nn, libc::AT_SYMLINK_NOFOLLOW).ok();
            sys::renameat2(p.fd.as_fd(), name, q.fd.as_fd(), nn, flags.bits()).map_err(errno)?;
            if let Some(st) = over.filter(|st| st.st_nlink <= 1 && flags.bits() & libc::RENAME_EXCHANGE == 0) {
                self.0.synced(st.st_ino);
            }
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, np: INodeNo, nn: &OsStr, reply: ReplyEntry) {
        let r = self.0.node(ino).and_then(|n| {
            let q = self.0.node(np)?;
            sys::link_fd(n.fd.as_fd(), q.fd.as_fd(), nn).map_err(errno)?;
            self.0.lookup_in(&q, nn)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.0.node(ino).and_then(|n| {
            let keep = flags.0 & (libc::O_SYNC | libc::O_DSYNC);
            // Read access even for writers: the original bytes are read before a write.
            let fd = sys::reopen(n.fd.as_fd(), libc::O_RDWR | keep)
                .or_else(|_| sys::reopen(n.fd.as_fd(), (flags.0 & libc::O_ACCMODE) | keep))
                .map_err(errno)?;
            Ok(self.open_handle(ino.0, fd, keep != 0, flags.0 & libc::O_TRUNC != 0)?)
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, flags: i32, reply: ReplyCreate) {
        let r = self.0.node(parent).and_then(|p| {
            let keep = flags & (libc::O_SYNC | libc::O_DSYNC);
            let fd = sys::openat(p.fd.as_fd(), name, (flags & libc::O_EXCL) | libc::O_RDWR | libc::O_CREAT | keep, mode).map_err(errno)?;
            let a = self.0.lookup_in(&p, name)?;
            Ok((a, self.open_handle(a.ino.0, fd, keep != 0, false)?))
        });
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, off: u64, size: u32, _f: OpenFlags, _l: Option<LockOwner>, reply: ReplyData) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        let mut buf = vec![0u8; size as usize];
        match sys::pread_full(h.file.as_fd(), &mut buf, off) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, off: u64, data: &[u8], _wf: WriteFlags, _f: OpenFlags, _l: Option<LockOwner>, reply: ReplyWrite) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        let _w = self.0.cut_lock.read();
        let end = off + data.len() as u64;
        let r = (|| {
            let size = sys::fstat(h.file.as_fd())?.st_size as u64;
            if off > size {
                self.0.save_resize(h.ino, &h.file, off)?;
            }
            self.0.save(h.ino, &h.file, off, end)?;
            sys::pwrite_all(h.file.as_fd(), data, off)
        })();
        match r {
            Ok(()) => {
                self.0.count("writes");
                if h.sync {
                    self.0.synced_write(h.ino, data, off);
                }
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _l: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _f: OpenFlags, _l: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        self.0.opens.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        let r = if datasync { sys::fdatasync(h.file.as_fd()) } else { sys::fsync(h.file.as_fd()) };
        match r {
            Ok(()) => {
                self.0.synced(ino.0);
                self.0.count("fsyncs");
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _f: OpenFlags, reply: ReplyOpen) {
        match self.0.node(ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let r = (|| -> Result<(), Errno> {
            let n = self.0.node(ino)?;
            let fd = sys::openat(n.fd.as_fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(errno)?;
            sys::lseek(fd.as_fd(), offset as i64, libc::SEEK_SET).map_err(errno)?;
            let mut buf = vec![0u8; 32768];
            loop {
                let len = sys::getdents(fd.as_fd(), &mut buf).map_err(errno)?;
                if len == 0 {
                    return Ok(());
                }
                let mut pos = 0;
                while pos < len {
                    let d_ino = u64::from_ne_bytes(buf[pos..pos + 8].try_into().unwrap());
                    let off = i64::from_ne_bytes(buf[pos + 8..pos + 16].try_into().unwrap());
                    let reclen = u16::from_ne_bytes(buf[pos + 16..pos + 18].try_into().unwrap()) as usize;
                    let raw = &buf[pos + 19..pos + reclen];
                    let name = OsStr::from_bytes(&raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())]);
                    let k = kind_of(u32::from(buf[pos + 18]) << 12);
                    pos += reclen;
                    if reply.add(INodeNo(self.0.nodeid(d_ino)), off as u64, k, name) {
                        return Ok(());
                    }
                }
            }
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        let r = self.0.node(ino).and_then(|n| {
            let d = sys::openat(n.fd.as_fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(errno)?;
            sys::fsync(d.as_fd()).map_err(errno)?;
            let st = sys::fstat(n.fd.as_fd()).map_err(errno)?;
            *self.0.dir_syncs.lock().entry(st.st_ino).or_default() += 1;
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.0.node(INodeNo(1)).and_then(|n| sys::fstatvfs(n.fd.as_fd()).map_err(errno)) {
            Ok(s) => reply.statfs(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize as u32, s.f_namemax as u32, s.f_frsize as u32),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, off: u64, len: u64, mode: i32, reply: ReplyEmpty) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        let _w = self.0.cut_lock.read();
        let r = (|| {
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                self.0.save_resize(h.ino, &h.file, off + len)?;
            }
            if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                self.0.save(h.ino, &h.file, off, off + len)?;
            }
            sys::fallocate(h.file.as_fd(), mode, off, len)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, off: i64, whence: i32, reply: ReplyLseek) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        match sys::lseek(h.file.as_fd(), off, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 { reply.size(0) } else { reply.data(&[]) }
    }
}

impl Fs {
    fn open_handle(&self, ino: u64, fd: OwnedFd, sync: bool, trunc: bool) -> Result<u64, Errno> {
        let file = File::from(fd);
        if trunc {
            let _w = self.0.cut_lock.read();
            self.0.save_resize(ino, &file, 0).map_err(errno)?;
            sys::ftruncate(file.as_fd(), 0).map_err(errno)?;
        }
        let fh = self.0.next_fh.fetch_add(1, Ordering::Relaxed);
        self.0.opens.lock().insert(fh, Arc::new(Open { ino, file, sync }));
        Ok(fh)
    }
}

fn main() {
    let args = Args::parse();
    unsafe { libc::umask(0) };
    let root = sys::openat(
        unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) },
        args.lower.as_os_str(),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .expect("open --lower");
    let root_ino = sys::fstat(root.as_fd()).unwrap().st_ino;
    let sim = Arc::new(Sim {
        nodes: RwLock::new(HashMap::new()),
        opens: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        dirty: Mutex::new(HashMap::new()),
        cut_lock: RwLock::new(()),
        dir_syncs: Mutex::new(HashMap::new()),
        stats: Mutex::new(BTreeMap::new()),
        root_ino,
    });
    sim.nodes.write().insert(1, Arc::new(Node { fd: root, kind: FileType::Directory, lookups: AtomicU64::new(1) }));
    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control).expect("bind control socket");
    let s = sim.clone();
    let lower = args.lower.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut w = conn.try_clone().unwrap();
            for line in BufReader::new(conn).lines().map_while(Result::ok) {
                let _ = writeln!(w, "{}", s.control(&line, &lower));
            }
        }
    });
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![MountOption::FSName("powercut".into()), MountOption::CUSTOM("allow_other".into())];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(4);
    let mut session = fuser::Session::new(Fs(sim), &args.mount, &cfg).expect("mount");
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM]).unwrap();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = unmounter.unmount();
        }
    });
    eprintln!("powercut: serving {} at {}", args.lower.display(), args.mount.display());
    session.run().expect("session");
}
