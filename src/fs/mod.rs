//! The FUSE adapter. `FuseAdapter` only translates between fuser's calls and `Volume`, whose POSIX
//! semantics live in files named after the concern (`volume.rs`: lookup and open; `attr.rs`,
//! `dir.rs`, `xattr.rs`, `setid.rs`, `rotation.rs`), dictionary ordering in `namespace.rs`
//! and the data path in `io.rs` over the pure hole/crypto logic of `data.rs`.

mod attr;
mod volume;
pub mod data;
mod dio;
mod dir;
mod errno;
mod export;
mod handle;
mod housekeeping;
mod inode;
mod io;
pub mod mounting;
mod namespace;
mod online;
mod rotation;
mod setid;
#[cfg(test)]
mod tests;
mod times;
mod xattr;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo,
    InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, SessionACL, TimeOrNow, WriteFlags,
};

pub use self::attr::{kind_of, time as system_time};
pub use self::volume::{Volume, FsOptions};
use self::setid::KillPrivs;
pub use self::data::BLOCK;
pub use self::housekeeping::Housekeeping;
pub use self::online::{new_job, Converter};
use self::errno::errno;
use crate::metrics::{self, Op};
pub use self::namespace::Caller;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountSpec {
    pub mountpoint: PathBuf,
    /// What the mount table shows as the source: the backing directory, or the config
    /// file when mounted from fstab.
    pub source: String,
    pub allow_other: bool,
    pub default_permissions: bool,
    pub threads: usize,
    pub writeback_cache: bool,
    /// Ask the kernel for FUSE over io_uring (see `mounting::want_io_uring`).
    pub io_uring: bool,
    /// See `dio`: direct writes wait for the page cache to drop what they overwrote.
    pub direct_write_invalidation: bool,
    pub flags: crate::config::MountFlags,
}

pub struct FuseAdapter {
    volume: Arc<Volume>,
    writeback_cache: bool,
    /// Set once the session exists: tells the kernel when its cached attributes went stale.
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    /// The kernel enforces POSIX ACLs (FUSE_POSIX_ACL) and leaves the umask to us
    /// (FUSE_DONT_MASK): see `creation_mode`.
    acl: std::sync::atomic::AtomicBool,
    /// `mount.direct-write-invalidation`: replies to direct writes of files with cached
    /// pages go through this thread (see `dio`).
    invalidator: Option<dio::Invalidator>,
}

const GEN: Generation = Generation(0);

/// Run the handler of one request of kind `op`: counted, and a panic in it is caught,
/// logged and counted (`tdefs_request_panics_total`) instead of taking the request thread
/// with it (fuser does not replace a lost thread, so each panic would shrink the pool until
/// the mount hangs). The reply, moved into the handler, is dropped while unwinding, and
/// fuser answers a dropped reply with EIO.
fn serve(op: Op, handler: impl FnOnce()) {
    metrics::request(op);
    if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)) {
        let what = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_default();
        metrics::request_panicked(op);
        tracing::error!(op = op.name(), panic = %what, "a request handler panicked: the request was answered EIO (a bug: please report it with this log)");
    }
}

/// The errno for a failed request, counted in `tdefs_errors_total`; `RUST_LOG=tdefs=debug`
/// shows each one and where it was answered.
#[track_caller]
fn fail(e: &errno::Error) -> Errno {
    let n = errno(e);
    metrics::error(n);
    tracing::debug!(errno = n, error = %e, at = %std::panic::Location::caller(), "request failed");
    Errno::from_i32(n)
}

impl FuseAdapter {
    pub fn new(volume: Arc<Volume>, spec: &MountSpec) -> std::io::Result<FuseAdapter> {
        let notifier: Arc<std::sync::OnceLock<fuser::Notifier>> = Arc::default();
        let invalidator = match spec.direct_write_invalidation {
            true => Some(dio::Invalidator::start(notifier.clone())?),
            false => None,
        };
        Ok(FuseAdapter { volume, writeback_cache: spec.writeback_cache, notifier, acl: Default::default(), invalidator })
    }

    /// We changed attributes the kernel caches (set-id bits dropped on its behalf): without
    /// this it would show the old mode until the attribute timeout, since with the
    /// writeback cache it does not refetch them after a write.
    fn attrs_changed(&self, ino: INodeNo) {
        if let Some(n) = self.notifier.get() {
            let _ = n.inval_inode(ino, -1, 0);
        }
    }

    /// Mode for a new file: with ACLs on, the kernel no longer applies the umask (a default
    /// ACL in the parent replaces it, as on ext4, and the backing filesystem applies that
    /// ACL when tdefs creates the file); without one, the umask applies as usual.
    fn creation_mode(&self, parent: INodeNo, mode: u32, umask: u32) -> u32 {
        if !self.acl.load(std::sync::atomic::Ordering::Relaxed) || self.volume.has_default_acl(parent.0) {
            mode
        } else {
            mode & !umask
        }
    }

    /// Where the mount code puts the session's notifier.
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.notifier.clone()
    }

    fn ttl(&self) -> Duration {
        self.volume.opts.ttl
    }

    /// With the writeback cache, regular files' mtime and ctime as the kernel has them (see
    /// `times`); without it the kernel takes the backing file's every time.
    fn report_times(&self, inode: &inode::Inode, st: &mut crate::sys::Stat) {
        if self.writeback_cache {
            self.volume.report_times(inode, st);
        }
    }

    fn entry(&self, r: errno::Result<(Arc<inode::Inode>, crate::sys::Stat)>, reply: ReplyEntry) {
        match r {
            Ok((i, mut st)) => {
                self.report_times(&i, &mut st);
                reply.entry(&self.ttl(), &attr::to_attr(i.nodeid, &st), Generation(self.volume.generation(&i)))
            }
            Err(e) => reply.error(fail(&e)),
        }
    }

    fn empty(r: errno::Result<()>, reply: ReplyEmpty) {
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(fail(&e)),
        }
    }

    fn open_flags() -> FopenFlags {
        // Only tdefs writes the backing files, so cached pages stay valid across opens;
        // concurrent O_DIRECT writers are serialised per block range by the data path.
        FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
    }
}

/// Whether the caller may keep set-id bits when it modifies a file (CAP_FSETID). FUSE
/// does not pass capabilities; root stands for them, as in the kernel's default policy.
fn lacks_fsetid(req: &Request) -> Option<KillPrivs> {
    (req.uid() != 0).then(|| privs_to_kill(req))
}

/// O_DIRECT I/O whose offset or length is not a multiple of 512: ext4 refuses it with
/// EINVAL, and so does tdefs. (The buffer's alignment, which ext4 also checks, never
/// reaches a FUSE server: the kernel copies the data.)
fn misaligned_direct(flags: OpenFlags, offset: u64, len: usize) -> bool {
    flags.0 & libc::O_DIRECT != 0 && (offset % 512 != 0 || len % 512 != 0)
}

fn privs_to_kill(req: &Request) -> KillPrivs {
    KillPrivs { gid: req.gid(), pid: req.pid() }
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, cfg: &mut KernelConfig) -> std::io::Result<()> {
        let _ = cfg.set_max_write(1 << 20);
        let _ = cfg.set_max_readahead(1 << 20);
        // Direct-write invalidation holds replies back: room for them (see dio).
        let bg = if self.invalidator.is_some() { dio::MAX_BACKGROUND } else { 64 };
        let _ = cfg.set_max_background(bg);
        let _ = cfg.set_congestion_threshold((u32::from(bg) * 3 / 4) as u16);
        let mut wanted = vec![
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_ASYNC_DIO,
            // File handles that outlive the kernel's inode cache and the daemon (export).
            InitFlags::FUSE_EXPORT_SUPPORT,
        ];
        if self.writeback_cache {
            wanted.push(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        // We drop set-id bits on write/truncate ourselves (see setid::kill_suidgid); in
        // return the kernel marks the superblock SB_NOSEC and stops asking for
        // security.capability before every write: one round trip less per write.
        wanted.push(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
        for cap in wanted {
            if cfg.add_capabilities(cap).is_err() {
                tracing::debug!(?cap, "kernel lacks FUSE capability");
            }
        }
        // POSIX ACLs enforced by the kernel (stored as the backing files' own ACLs), with
        // the umask left to us so that a default ACL can replace it: both or neither.
        if cfg.add_capabilities(InitFlags::FUSE_POSIX_ACL | InitFlags::FUSE_DONT_MASK).is_ok() {
            self.acl.store(true, std::sync::atomic::Ordering::Relaxed);
        } else {
            tracing::warn!("the kernel lacks FUSE_POSIX_ACL: ACLs are stored but not enforced");
        }
        Ok(())
    }

    fn destroy(&mut self) {
        if self.writeback_cache {
            self.volume.keep_all_times();
        }
        if let Err(e) = self.volume.dict().flush() {
            tracing::error!(error = %e, "final dictionary flush failed");
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        serve(Op::Lookup, || {
            // "." and ".." come only from the kernel's export operations (file handles,
            // FUSE_EXPORT_SUPPORT): a node by id, a directory's parent. See `export`.
            let r = match name.as_encoded_bytes() {
                b"." => self.volume.lookup_dot(parent.0),
                b".." => self.volume.lookup_dotdot(parent.0),
                _ => self.volume.inode(parent.0).and_then(|p| self.volume.lookup(&p, name)),
            };
            self.entry(r, reply);
        })
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        serve(Op::Forget, || {
            // Before the inode can go: a lookup meanwhile finds it, times and all.
            if self.writeback_cache {
                if let Ok(i) = self.volume.inode(ino.0) {
                    self.volume.keep_times(&i);
                }
            }
            self.volume.forget(ino.0, nlookup);
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        serve(Op::Getattr, || {
            match self.volume.getattr(ino.0, fh.map(|f| f.0)) {
                Ok(mut st) => {
                    if let (true, Ok(i)) = (self.writeback_cache, self.volume.inode(ino.0)) {
                        self.volume.report_times(&i, &mut st);
                    }
                    reply.attr(&self.ttl(), &attr::to_attr(ino.0, &st))
                }
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        serve(Op::Setattr, || {
            let flush = match (mtime, fh) {
                (Some(TimeOrNow::SpecificTime(t)), Some(fh))
                    if self.writeback_cache && mode.is_none() && uid.is_none() && gid.is_none() && size.is_none() && atime.is_none() =>
                {
                    self.volume.times_flush_stat(fh.0, t)
                }
                _ => None,
            };
            let result = match flush {
                Some(flushed) => Ok(flushed),
                None => {
                    let kill = lacks_fsetid(req); // Volume::setattr decides which changes drop set-id bits
                    self.volume
                        .setattr(ino.0, mode, uid, gid, size, atime, mtime, fh.map(|f| f.0), kill)
                        .map(|st| (st, mtime.map(|_| (st.st_mtime, st.st_mtime_nsec))))
                }
            };
            match result {
                Ok((mut st, kernel_mtime)) => {
                    // The kernel's own mtime/ctime, as it sends them (writeback cache).
                    if let (true, Ok(i)) = (self.writeback_cache, self.volume.inode(ino.0)) {
                        self.volume.setattr_times(&i, &mut st, kernel_mtime, ctime);
                    }
                    reply.attr(&self.ttl(), &attr::to_attr(ino.0, &st))
                }
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        serve(Op::Readlink, || {
            match self.volume.readlink(ino.0) {
                Ok(t) => reply.data(std::os::unix::ffi::OsStrExt::as_bytes(t.as_os_str())),
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        serve(Op::Mknod, || {
            let mode = self.creation_mode(parent, mode, umask);
            self.entry(self.volume.mknod(parent.0, name, mode, rdev, caller(req)), reply);
        })
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        serve(Op::Mkdir, || {
            let mode = self.creation_mode(parent, mode, umask);
            self.entry(self.volume.mkdir(parent.0, name, mode, caller(req)), reply);
        })
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        serve(Op::Unlink, || {
            Self::empty(self.volume.unlink(parent.0, name), reply);
        })
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        serve(Op::Rmdir, || {
            Self::empty(self.volume.rmdir(parent.0, name), reply);
        })
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        serve(Op::Symlink, || {
            self.entry(self.volume.symlink(parent.0, link_name, target.as_os_str(), caller(req)), reply);
        })
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        serve(Op::Rename, || {
            Self::empty(self.volume.rename(parent.0, name, newparent.0, newname, flags.bits()), reply);
        })
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        serve(Op::Link, || {
            self.entry(self.volume.link(ino.0, newparent.0, newname), reply);
        })
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        serve(Op::Open, || {
            match self.volume.open(ino.0, flags.0, lacks_fsetid(req)) {
                Ok((fh, mode_changed)) => {
                    reply.opened(FileHandle(fh), Self::open_flags());
                    // O_TRUNC dropped set-id bits: the kernel would show the old mode until
                    // the attribute timeout (with the writeback cache it does not refetch).
                    if mode_changed {
                        self.attrs_changed(ino);
                    }
                }
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        serve(Op::Read, || {
            if misaligned_direct(flags, offset, size as usize) {
                return reply.error(fail(&errno::Error::Os(libc::EINVAL)));
            }
            if self.invalidator.is_some() && flags.0 & libc::O_DIRECT == 0 {
                self.volume.note_page_cache_read(fh.0);
            }
            self.volume.read(fh.0, offset, size, |r| match r {
                Ok(data) => {
                    metrics::read_bytes(data.len());
                    reply.data(data)
                }
                Err(e) => reply.error(fail(&e)),
            });
        })
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        serve(Op::Write, || {
            // Page-cache writeback through an O_DIRECT descriptor is not the caller's I/O.
            if !write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) && misaligned_direct(flags, offset, data.len()) {
                return reply.error(fail(&errno::Error::Os(libc::EINVAL)));
            }
            if write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
                match self.volume.kill_privs(fh.0, &privs_to_kill(req)) {
                    Ok(true) => self.attrs_changed(ino),
                    Ok(false) => {}
                    Err(e) => return reply.error(fail(&e)),
                }
            }
            match self.volume.write(fh.0, offset, data) {
                Ok(n) => {
                    metrics::written_bytes(n as usize);
                    if let Some(inv) = &self.invalidator {
                        if dio::is_direct_write(write_flags, flags) && self.volume.had_page_cache_reads(fh.0) {
                            return inv.reply_after_invalidation(ino, offset, n, reply);
                        }
                    }
                    reply.written(n)
                }
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        serve(Op::Flush, || {
            reply.ok(); // nothing is buffered in the daemon
        })
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        serve(Op::Release, || {
            self.volume.release(fh.0);
            reply.ok();
        })
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        serve(Op::Fsync, || {
            Self::empty(self.volume.fsync(fh.0, datasync), reply);
        })
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        serve(Op::Opendir, || {
            match self.volume.opendir(ino.0) {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        serve(Op::Readdir, || {
            let r = self.volume.readdir(fh.0, offset, |name, nodeid, kind, off| reply.add(INodeNo(nodeid), off, kind, name));
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        serve(Op::Readdirplus, || {
            let dir = match self.volume.inode(ino.0) {
                Ok(d) => d,
                Err(e) => return reply.error(fail(&e)),
            };
            let ttl = self.ttl();
            let volume = &self.volume;
            let r = volume.readdir(fh.0, offset, |name, nodeid, _kind, off| {
                if name == "." || name == ".." {
                    // The kernel takes no reference for these; attributes are not used.
                    let st = volume.parent_fd(&dir).and_then(|fd| Ok(crate::sys::fstat(std::os::fd::AsFd::as_fd(&*fd))?));
                    return match st {
                        Ok(st) => reply.add(INodeNo(nodeid), off, name, &ttl, &attr::to_attr(nodeid, &st), GEN),
                        Err(_) => false,
                    };
                }
                match volume.lookup(&dir, name) {
                    Ok((i, mut st)) => {
                        self.report_times(&i, &mut st);
                        let gen = Generation(volume.generation(&i));
                        let full = reply.add(INodeNo(i.nodeid), off, name, &ttl, &attr::to_attr(i.nodeid, &st), gen);
                        if full {
                            volume.forget(i.nodeid, 1); // not sent: give the reference back
                        }
                        full
                    }
                    Err(_) => false, // vanished meanwhile: skip it
                }
            });
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        serve(Op::Releasedir, || {
            self.volume.releasedir(fh.0);
            reply.ok();
        })
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        serve(Op::Fsyncdir, || {
            Self::empty(self.volume.fsyncdir(fh.0), reply);
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        serve(Op::Statfs, || {
            match self.volume.statfs() {
                Ok(s) => reply.statfs(
                    s.f_blocks,
                    s.f_bfree,
                    s.f_bavail,
                    s.f_files,
                    s.f_ffree,
                    s.f_bsize as u32,
                    s.f_namemax as u32,
                    s.f_frsize as u32,
                ),
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn setxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, value: &[u8], flags: i32, _position: u32, reply: ReplyEmpty) {
        serve(Op::Setxattr, || {
            // Tests make this handler panic (TDEFS_FAULT=panic:request:setxattr).
            crate::hooks::crash("request:setxattr");
            let mut r = self.volume.setxattr(ino.0, name, value, flags);
            if r.is_ok() && name == "system.posix_acl_access" {
                if let Some(who) = lacks_fsetid(req) {
                    match self.volume.acl_kill_sgid(ino.0, &who) {
                        Ok(true) => self.attrs_changed(ino),
                        Ok(false) => {}
                        Err(e) => r = Err(e),
                    }
                }
            }
            Self::empty(r, reply);
        })
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        serve(Op::Getxattr, || {
            let mut buf = vec![0u8; size as usize];
            match self.volume.getxattr(ino.0, name, &mut buf) {
                Ok(n) if size == 0 => reply.size(n as u32),
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        serve(Op::Listxattr, || {
            let mut buf = vec![0u8; size as usize];
            match self.volume.listxattr(ino.0, &mut buf, req.uid() != 0) {
                Ok(n) if size == 0 => reply.size(n as u32),
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        serve(Op::Removexattr, || {
            Self::empty(self.volume.removexattr(ino.0, name), reply);
        })
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        serve(Op::Access, || {
            // Only without default_permissions (then without allow_other: only the mounting
            // user gets here; the config refuses the other combination): answer as the kernel's
            // generic_permission would, from the mode bits.
            Self::empty(self.volume.access(ino.0, req.uid(), &privs_to_kill(req), mask.bits()), reply);
        })
    }

    fn create(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, flags: i32, reply: ReplyCreate) {
        serve(Op::Create, || {
            let mode = self.creation_mode(parent, mode, umask);
            match self.volume.create(parent.0, name, mode, flags, caller(req)) {
                Ok((i, mut st, fh)) => {
                    self.report_times(&i, &mut st);
                    let gen = Generation(self.volume.generation(&i));
                    reply.created(&self.ttl(), &attr::to_attr(i.nodeid, &st), gen, FileHandle(fh), Self::open_flags())
                }
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn fallocate(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        serve(Op::Fallocate, || {
            Self::empty(self.volume.fallocate(fh.0, offset, length, mode), reply);
        })
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        serve(Op::Lseek, || {
            match self.volume.lseek(fh.0, offset, whence) {
                Ok(o) => reply.offset(o),
                Err(e) => reply.error(fail(&e)),
            }
        })
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        serve(Op::CopyFileRange, || {
            match self.volume.copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len) {
                Ok(n) => {
                    // Read from one file and written to another inside the daemon.
                    metrics::read_bytes(n as usize);
                    metrics::written_bytes(n as usize);
                    reply.written(n)
                }
                Err(e) => reply.error(fail(&e)),
            }
        })
    }
}

/// fuser configuration for `spec`. Its mount options are used only where fuser mounts
/// (through fusermount3, without privilege); see `mounting`.
pub fn fuser_config(spec: &MountSpec) -> fuser::Config {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![MountOption::FSName(spec.source.clone()), MountOption::Subtype("tdefs".into())];
    if spec.default_permissions {
        cfg.mount_options.push(MountOption::DefaultPermissions);
    }
    let f = &spec.flags;
    cfg.mount_options.extend([
        if f.suid { MountOption::Suid } else { MountOption::NoSuid },
        if f.dev { MountOption::Dev } else { MountOption::NoDev },
        if f.exec { MountOption::Exec } else { MountOption::NoExec },
    ]);
    match f.atime {
        crate::config::Atime::Noatime => cfg.mount_options.push(MountOption::NoAtime),
        crate::config::Atime::Strictatime => cfg.mount_options.push(MountOption::CUSTOM("strictatime".into())),
        crate::config::Atime::Relatime => {}
    }
    for (on, opt) in [(!f.diratime, "nodiratime"), (f.lazytime, "lazytime")] {
        if on {
            cfg.mount_options.push(MountOption::CUSTOM(opt.into()));
        }
    }
    if f.sync {
        cfg.mount_options.push(MountOption::Sync);
    }
    if f.dirsync {
        cfg.mount_options.push(MountOption::DirSync);
    }
    cfg.acl = if spec.allow_other { SessionACL::All } else { SessionACL::Owner };
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    cfg.n_threads = Some(if spec.threads > 0 { spec.threads } else { cpus.max(2) * 2 });
    cfg.clone_fd = true;
    cfg.io_uring = spec.io_uring;
    cfg
}
