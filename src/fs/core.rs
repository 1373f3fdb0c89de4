//! POSIX semantics over the backing directory: lookup, attributes, directories, xattrs,
//! open. Every call works on descriptors of the backing inodes. Namespace changes that touch
//! the dictionary live in `namespace.rs`, the data path in `io.rs`.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fuser::{FileType, INodeNo, TimeOrNow};
use parking_lot::{Mutex, RwLock};

use super::attr::{kind_of, timespec_from_request};
use super::errno::{err, Error, Result};
use super::handle::{DirHandle, FileHandle, HandleTable};
use super::inode::{FileState, Inode, InodeTable, Loc};
use super::times::{is_times_xattr, TIMES_XATTR};
use crate::crypto::{random_iv, FileCipher, Method};
use crate::dictionary::{FileDict, FileEntry};
use crate::keys::KeyStore;
use crate::meta::{is_hidden_name, Metadata};
use crate::sys::{self, Stat};

/// What the adapter needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct FsOptions {
    pub method: Method,
    pub rotation: Duration,
    pub ttl: Duration,
    /// The mount is `noatime`: no access to the backing files updates their atime.
    pub noatime: bool,
    /// The mount is `nodiratime`: no directory listing updates a backing directory's atime.
    pub nodiratime: bool,
}

pub struct Core {
    pub(super) root: Arc<Inode>,
    pub(super) root_dev: u64,
    pub(super) inodes: InodeTable,
    pub(super) files: HandleTable<FileHandle>,
    pub(super) dirs: HandleTable<DirHandle>,
    pub(super) dict: Arc<FileDict>,
    keys: Arc<KeyStore>,
    pub(super) opts: FsOptions,
    /// Namespace lock: pairs "compute a path from the inode tree" with "read or queue a
    /// dictionary record for it" (shared), against "a rename's outcome moves entries and
    /// inode locations" (exclusive). Never held across I/O waits.
    pub(super) ns: RwLock<()>,
    /// Held shared from the moment a data key is chosen for a file until the file's record
    /// is queued (create, mknod, re-keying, link), and exclusively while key GC decides
    /// which keys no file uses: a key taken as "current" and rotated away meanwhile cannot
    /// be collected before the record that references it exists. Lock order: an inode's
    /// data lock, then this, then `ns`.
    pub(super) key_use: RwLock<()>,
    /// Whether the daemon may chown (runs as root): new files then belong to the caller.
    pub(super) can_chown: bool,
    /// Whether inodes are named by file handles (else every inode keeps its descriptor).
    handles: bool,
    /// A plain descriptor of the backing root: `open_by_handle_at` refuses `O_PATH` ones.
    pub(super) mount_fd: OwnedFd,
    other_devs: Mutex<HashMap<u64, u64>>,
    /// With `noatime`/`nodiratime`: the private copy of the backing mount tree, with those
    /// flags, that every backing inode is reached through (see `Core::new`).
    _atime_tree: Option<OwnedFd>,
    /// The backing root's file handle (its kind tells whether inodes can be opened by
    /// number alone: see `export`).
    pub(super) root_handle: Option<sys::Handle>,
    /// Where recently forgotten files were (see `export`).
    pub(super) departed: super::export::DepartedFiles,
}

impl Core {
    pub fn new(meta: &Metadata, opts: FsOptions) -> Result<Core> {
        // noatime / nodiratime, exactly: the kernel never updates atime of a FUSE inode
        // itself (fuse_iget sets S_NOATIME), only tdefs' backing accesses can. Reached
        // through a private copy of the backing mount with the same flags, no backing
        // access (reads, listings, readlink) moves an atime; without the privilege for
        // that copy, backing files and directories are opened O_NOATIME (see
        // `file_atime_flag`), which leaves symlinks' atimes to the backing mount's rule.
        let atime_tree = if opts.noatime || opts.nodiratime {
            match sys::noatime_tree(meta.backing_fd(), opts.noatime, opts.nodiratime) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::info!(error = %e, "no private noatime copy of the backing mount: opening backing files O_NOATIME instead");
                    None
                }
            }
        } else {
            None
        };
        let base = atime_tree.as_ref().map_or(meta.backing_fd(), |t| t.as_fd());
        let fd = sys::openat(base, OsStr::new("."), libc::O_PATH | libc::O_DIRECTORY, 0)?;
        let st = sys::fstat(fd.as_fd())?;
        let mount_fd = sys::openat(fd.as_fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        // File handles let the descriptor cache stay bounded; opening by handle needs
        // CAP_DAC_READ_SEARCH, so probe the whole round trip.
        let root_handle = sys::handle_at(fd.as_fd(), OsStr::new("")).ok();
        let handles = root_handle.as_ref().is_some_and(|h| sys::open_handle(mount_fd.as_fd(), h, libc::O_PATH).is_ok());
        let limit = sys::nofile_limit();
        if !handles {
            tracing::warn!(
                limit,
                "the backing filesystem offers no usable file handles: tdefs keeps one descriptor per \
                 cached inode, so the open-file limit bounds how many files the kernel may cache"
            );
        }
        let root = Arc::new(Inode::new(INodeNo::ROOT.0, FileType::Directory, None, Some(fd), None, FileState::none()));
        Ok(Core {
            root,
            root_dev: st.st_dev,
            // Half the descriptors for cached inodes, the rest for open files and metadata.
            inodes: InodeTable::new((limit / 2) as usize),
            files: HandleTable::default(),
            dirs: HandleTable::default(),
            dict: meta.dict.clone(),
            keys: meta.keys.clone(),
            opts,
            ns: RwLock::new(()),
            key_use: RwLock::new(()),
            can_chown: unsafe { libc::geteuid() } == 0,
            handles,
            mount_fd,
            other_devs: Mutex::new(HashMap::new()),
            _atime_tree: atime_tree,
            root_handle: if handles { root_handle } else { None },
            departed: Default::default(),
        })
    }

    /// An `O_PATH` descriptor of the inode: the cached one, or reopened by its handle.
    pub(super) fn pfd(&self, inode: &Inode) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = inode.cached_fd() {
            return Ok(fd);
        }
        let h = inode.handle.as_ref().ok_or(Error::Os(libc::ESTALE))?;
        let fd = sys::open_handle(self.mount_fd.as_fd(), h, libc::O_PATH)?;
        let (fd, stored) = inode.cache_fd(fd);
        if stored {
            self.inodes.note_cached();
        }
        Ok(fd)
    }

    pub(super) fn root_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // The root keeps its descriptor for the whole mount.
        let fd = self.root.cached_fd().expect("root descriptor");
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) }
    }

    pub fn dict(&self) -> &Arc<FileDict> {
        &self.dict
    }

    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// Make a new data key if the current one is older than the rotation period or has
    /// another method than the configured one (no-op for the plaintext method).
    pub fn rotate_data_key_if_due(&self) -> Result<()> {
        self.keys.key_for_new_file(self.opts.method, self.opts.rotation)?;
        Ok(())
    }

    /// Delete data keys that no dictionary entry and no file in use references (never the
    /// current key). Returns how many were deleted.
    ///
    /// The decision is taken under `key_use` (exclusive): no file is then between "took
    /// the current key" and "its record is queued", so every key a file will ever record is
    /// either referenced already or the current one, which is never deleted. Keys not
    /// current at that moment can never be handed out again, so the deletion itself (a
    /// durable rewrite of the key dictionary) runs after the lock is released. Entries of
    /// staged copies (`.tdefs.convert/`) and of renames not yet concluded are in the tree
    /// like any other, so their keys count as used.
    pub fn collect_unused_keys(&self) -> Result<usize> {
        // Keys of files in memory first, before `key_use` (an inode's data lock comes
        // before it). A file's key changes only to a key taken under `key_use`.
        let mut used = std::collections::HashSet::new();
        self.inodes.for_each(|i| {
            if let Some(e) = i.data.read().entry {
                used.insert(e.key_id);
            }
        });
        let unused = {
            let _decide = self.key_use.write();
            crate::hooks::point("gc:deciding");
            let current = self.keys.current().map(|k| k.id);
            used.extend(self.dict.with_tree(|t| t.key_refs().keys().copied().collect::<Vec<_>>()));
            unused_keys(&self.keys.keys().iter().map(|k| k.id).collect::<Vec<_>>(), &used, current)
        };
        if unused.is_empty() {
            return Ok(0);
        }
        let n = self.keys.remove_keys(&unused)?;
        if n > 0 {
            tracing::info!(removed = n, "deleted data keys that no file uses any more");
        }
        Ok(n)
    }

    /// Node id of a backing inode: its inode number on the backing filesystem (1 is FUSE's
    /// root id, so a backing inode 1 and inodes on other filesystems mounted inside the
    /// backing directory get ids with the top bit set).
    pub(super) fn nodeid(&self, dev: u64, ino: u64) -> u64 {
        if dev == self.root_dev && ino != INodeNo::ROOT.0 && ino < (1 << 63) {
            return ino;
        }
        let mut devs = self.other_devs.lock();
        let n = devs.len() as u64;
        let idx = if dev == self.root_dev { 0 } else { *devs.entry(dev).or_insert(n + 1) };
        (1 << 63) | (idx << 48) | (ino & ((1 << 48) - 1))
    }

    pub(super) fn inode(&self, nodeid: u64) -> Result<Arc<Inode>> {
        if nodeid == INodeNo::ROOT.0 {
            return Ok(self.root.clone());
        }
        self.inodes.get(nodeid).ok_or(Error::Os(libc::ESTALE))
    }

    fn is_hidden(&self, parent: &Inode, name: &OsStr) -> bool {
        parent.nodeid == INodeNo::ROOT.0 && is_hidden_name(name)
    }

    /// Refuse to create or rename onto the metadata directory's name.
    pub(super) fn check_new_name(&self, parent: &Inode, name: &OsStr) -> Result<()> {
        if self.is_hidden(parent, name) {
            tracing::warn!(name = %name.to_string_lossy(), "refusing to create tdefs' reserved name in the mount root");
            return err(libc::EPERM);
        }
        Ok(())
    }

    /// Encryption state for a regular file whose dictionary entry is `entry`.
    pub(super) fn state_for(&self, entry: Option<FileEntry>) -> FileState {
        match entry {
            None => FileState::unrecorded(),
            Some(e) if e.method.is_plaintext() => FileState { entry: Some(e), cipher: Some(FileCipher::plaintext()) },
            Some(e) => {
                let cipher = self.keys.get(e.key_id).map(|k| k.cipher(&e.iv));
                if cipher.is_none() {
                    tracing::error!(key_id = format_args!("{:#018x}", e.key_id), "a file's data key is missing; its I/O fails with EIO");
                }
                FileState { entry: Some(e), cipher }
            }
        }
    }

    /// A fresh entry for a new (or re-keyed) file under the configured method: current data
    /// key, random IV; a plaintext entry for the plaintext method (plaintext is recorded
    /// too: a file without a record is refused, never taken for plaintext). Keep the
    /// returned guard until the entry's record is queued (see `key_use`).
    pub(super) fn new_entry(&self) -> Result<(FileEntry, FileCipher, KeyUse<'_>)> {
        let guard = self.key_use.read();
        let r = match self.keys.key_for_new_file(self.opts.method, self.opts.rotation)? {
            None => (FileEntry::plaintext(), FileCipher::plaintext(), guard),
            Some(k) => {
                let iv = random_iv();
                (FileEntry { method: k.method, key_id: k.id, iv }, k.cipher(&iv), guard)
            }
        };
        crate::hooks::point("entry:key-taken");
        Ok(r)
    }

    /// A non-empty file without a record: its bytes may be ciphertext whose record was lost
    /// (a dictionary restored from an older backup, a log cut by `check --repair`) or
    /// plaintext put into the backing directory behind tdefs' back. Either way tdefs cannot
    /// know, so it refuses the file's contents (EIO), with one log line per file.
    pub(super) fn refuse_unrecorded(&self, inode: &Arc<Inode>) -> Error {
        if !inode.refusal_logged.swap(true, Ordering::Relaxed) {
            let path = {
                let _ns = self.ns.read();
                inode.path()
            };
            let path = path.map(|p| String::from_utf8_lossy(&p).into_owned()).unwrap_or_else(|| format!("(inode {})", inode.nodeid));
            tracing::error!(
                file = %path,
                "this file has no record in the file dictionary, so whether its bytes are ciphertext is unknown: \
                 refusing to read or write it (EIO). Run `tdefs check` (unmounted) to list every such file; if \
                 .tdefs was restored from a backup, restore the one that matches the data; if the file really is \
                 plaintext placed in the backing directory, record it with `tdefs adopt`"
            );
        }
        Error::Os(libc::EIO)
    }

    pub fn lookup(&self, parent: &Arc<Inode>, name: &OsStr) -> Result<(Arc<Inode>, Stat)> {
        if self.is_hidden(parent, name) {
            return err(libc::ENOENT);
        }
        let st = sys::fstatat(self.pfd(parent)?.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW)?;
        self.register(parent, name, &st, None)
    }

    /// The handle of `dir/name` (stat `st`) when inodes are named by handles.
    pub(super) fn handle_of(&self, dir: std::os::fd::BorrowedFd<'_>, name: &OsStr, st: &Stat) -> Result<Option<sys::Handle>> {
        Ok(if self.handles && st.st_dev == self.root_dev { Some(sys::handle_at(dir, name)?) } else { None })
    }

    /// The inode the kernel knows for `dir/name` (stat `st`), if any. Matching by handle:
    /// the inode number alone may belong to another, still remembered, file.
    pub(super) fn known_inode(&self, dir: std::os::fd::BorrowedFd<'_>, name: &OsStr, st: &Stat) -> Option<Arc<Inode>> {
        let handle = self.handle_of(dir, name, st).ok()?;
        self.inodes.find(self.nodeid(st.st_dev, st.st_ino), handle.as_ref())
    }

    /// The inode for `parent/name` (whose stat is `st`), counting one kernel reference.
    /// `preset` is the encryption state of a file just created.
    pub(super) fn register(&self, parent: &Arc<Inode>, name: &OsStr, st: &Stat, preset: Option<FileState>) -> Result<(Arc<Inode>, Stat)> {
        let loc = || Some(Loc { parent: parent.clone(), name: name.to_os_string() });
        let pfd = self.pfd(parent)?;
        let handle = self.handle_of(pfd.as_fd(), name, st)?;
        let primary = self.nodeid(st.st_dev, st.st_ino);
        let nodeid = match self.inodes.find_and_ref(primary, handle.as_ref()) {
            Ok(i) => {
                i.set_loc(loc());
                return Ok((i, *st));
            }
            // The backing filesystem reused the number of a file the kernel still knows.
            Err(true) => self.inodes.alt_nodeid(handle.as_ref().expect("only handles can differ")),
            Err(false) => primary,
        };
        // Without handles, the descriptor pins the inode (and its number) for its life.
        let (fd, st) = match handle {
            Some(_) => (None, *st),
            None => {
                let fd = sys::openat(pfd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                let st = sys::fstat(fd.as_fd())?; // authoritative if the name changed meanwhile
                (Some(fd), st)
            }
        };
        let kind = kind_of(st.st_mode);
        let state = match preset {
            Some(s) => s,
            None if kind == FileType::RegularFile => {
                let _ns = self.ns.read();
                self.state_for(parent.child_path(name).and_then(|p| self.dict.get(&p)))
            }
            None => FileState::none(),
        };
        let inode = Inode::new(nodeid, kind, handle, fd, loc(), state);
        Ok((self.inodes.insert_or_ref(inode), st))
    }

    pub fn forget(&self, nodeid: u64, n: u64) {
        // Released inodes give back the references they held (`Inode::pins`), iteratively.
        let mut todo = vec![(nodeid, n)];
        while let Some((id, n)) = todo.pop() {
            if let Some(gone) = self.inodes.forget(id, n) {
                self.remember_departed(&gone);
                todo.extend(std::mem::take(&mut *gone.pins.lock()).into_iter().map(|p| (p, 1)));
            }
        }
    }

    pub fn getattr(&self, nodeid: u64, fh: Option<u64>) -> Result<Stat> {
        if let Some(h) = fh.and_then(|fh| self.files.get(fh)) {
            return Ok(sys::fstat(h.fd())?);
        }
        Ok(sys::fstat(self.pfd(&*self.inode(nodeid)?)?.as_fd())?)
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
        let pfd = match &handle {
            Some(_) => None,
            None => match self.pfd(&inode) {
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
        let fd = match (&handle, &pfd) {
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
                sys::utimens(self.pfd(&loc.parent)?.as_fd(), Some(&loc.name), &times, libc::AT_SYMLINK_NOFOLLOW)?;
            } else {
                sys::utimens(fd, None, &times, 0)?;
            }
        }
        Ok(sys::fstat(fd)?)
    }

    /// access(2) from the mode bits (as the kernel's generic_permission, without ACLs).
    /// Root may read and write anything, and execute what has an execute bit (or is a
    /// directory).
    pub fn access(&self, nodeid: u64, uid: u32, who: &KillPrivs, mask: i32) -> Result<()> {
        let st = sys::fstat(self.pfd(&*self.inode(nodeid)?)?.as_fd())?;
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

    pub fn readlink(&self, nodeid: u64) -> Result<OsString> {
        Ok(sys::readlink_fd(self.pfd(&*self.inode(nodeid)?)?.as_fd())?)
    }

    pub fn opendir(&self, nodeid: u64) -> Result<u64> {
        let inode = self.inode(nodeid)?;
        let pfd = self.pfd(&inode)?;
        let open = |extra: i32| sys::openat(pfd.as_fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY | extra, 0);
        let fd = match open(self.dir_atime_flag()) {
            // O_NOATIME on a directory the daemon does not own, without CAP_FOWNER.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => open(0)?,
            r => r?,
        };
        Ok(self.dirs.insert(DirHandle { inode, fd: Mutex::new(fd) }))
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(fh);
    }

    pub fn fsyncdir(&self, fh: u64) -> Result<()> {
        let d = self.dirs.get(fh).ok_or(Error::Os(libc::EBADF))?;
        let fd = d.fd.lock();
        Ok(sys::fsync(fd.as_fd())?)
    }

    /// List the directory from `offset` (a cookie from a previous entry), calling `add`
    /// (name, node id, type, next offset) until it returns true (reply full).
    pub fn readdir(&self, fh: u64, offset: u64, mut add: impl FnMut(&OsStr, u64, FileType, u64) -> bool) -> Result<()> {
        let d = self.dirs.get(fh).ok_or(Error::Os(libc::EBADF))?;
        let is_root = d.inode.nodeid == INodeNo::ROOT.0;
        let dev = { sys::fstat(d.fd.lock().as_fd())?.st_dev };
        let fd = d.fd.lock();
        let fd = fd.as_fd();
        sys::lseek(fd, offset as i64, libc::SEEK_SET)?;
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = sys::getdents(fd, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            let mut pos = 0;
            while pos < n {
                // struct linux_dirent64 { u64 d_ino; i64 d_off; u16 d_reclen; u8 d_type; char d_name[]; }
                let ino = u64::from_ne_bytes(buf[pos..pos + 8].try_into().unwrap());
                let off = i64::from_ne_bytes(buf[pos + 8..pos + 16].try_into().unwrap());
                let reclen = u16::from_ne_bytes(buf[pos + 16..pos + 18].try_into().unwrap()) as usize;
                let dtype = buf[pos + 18];
                let raw = &buf[pos + 19..pos + reclen];
                let name = OsStr::from_bytes(&raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())]);
                pos += reclen;
                if is_root && is_hidden_name(name) {
                    continue;
                }
                if add(name, self.nodeid(dev, ino), kind_of(u32::from(dtype) << 12), off as u64) {
                    return Ok(());
                }
            }
        }
    }

    pub fn statfs(&self) -> Result<libc::statvfs> {
        Ok(sys::fstatvfs(self.root_fd())?)
    }

    /// Where xattr calls for `nodeid` go, and the descriptor that path refers through (keep
    /// it alive for the call).
    fn xattr_target(&self, nodeid: u64) -> Result<(sys::XattrTarget, Arc<OwnedFd>)> {
        let inode = self.inode(nodeid)?;
        if inode.kind == FileType::Symlink {
            // A symlink's own xattrs: address it through its parent, without following.
            let loc = inode.loc().ok_or(Error::Os(libc::ENOENT))?;
            let pfd = self.pfd(&loc.parent)?;
            let mut p = sys::proc_path(pfd.as_raw_fd()).into_bytes();
            p.push(b'/');
            p.extend_from_slice(loc.name.as_bytes());
            let path = std::ffi::CString::new(p).map_err(|_| Error::Os(libc::EINVAL))?;
            return Ok((sys::XattrTarget { path, follow: false }, pfd));
        }
        let fd = self.pfd(&inode)?;
        Ok((sys::XattrTarget { path: sys::proc_path(fd.as_raw_fd()), follow: true }, fd))
    }

    pub fn getxattr(&self, nodeid: u64, name: &OsStr, buf: &mut [u8]) -> Result<usize> {
        if is_times_xattr(name) {
            return err(libc::ENODATA); // tdefs' own (see times)
        }
        let caps = name.as_bytes() == CAPS_XATTR;
        let inode = if caps { Some(self.inode(nodeid)?) } else { None };
        if let Some(i) = &inode {
            if i.no_caps.load(Ordering::Relaxed) {
                return err(libc::ENODATA);
            }
        }
        let (t, _fd) = self.xattr_target(nodeid)?;
        let r = sys::getxattr(&t, name, buf);
        if let (Some(i), Err(e)) = (&inode, &r) {
            if e.raw_os_error() == Some(libc::ENODATA) {
                i.no_caps.store(true, Ordering::Relaxed);
            }
        }
        Ok(r?)
    }

    pub fn setxattr(&self, nodeid: u64, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if is_times_xattr(name) {
            tracing::warn!("refusing to set tdefs' reserved xattr {TIMES_XATTR} through the mount");
            return err(libc::EPERM);
        }
        self.forget_no_caps(nodeid, name)?;
        let (t, _fd) = self.xattr_target(nodeid)?;
        Ok(sys::setxattr(&t, name, value, flags)?)
    }

    /// Before `name` may change: the cached absence of capabilities no longer holds.
    fn forget_no_caps(&self, nodeid: u64, name: &OsStr) -> Result<()> {
        if name.as_bytes() == CAPS_XATTR {
            self.inode(nodeid)?.no_caps.store(false, Ordering::Relaxed);
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
        let fd = self.pfd(&inode)?;
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

    /// `hide_trusted`: the caller lacks CAP_SYS_ADMIN, so `trusted.*` names are not shown
    /// (ext4 filters them; the kernel leaves it to FUSE servers, and tdefs lists as root).
    /// tdefs' own `trusted.tdefs.times` is never shown.
    pub fn listxattr(&self, nodeid: u64, buf: &mut [u8], hide_trusted: bool) -> Result<usize> {
        let (t, _fd) = self.xattr_target(nodeid)?;
        // The list can grow between the two calls: retry on ERANGE.
        let (all, n) = loop {
            let mut all = vec![0u8; sys::listxattr(&t, &mut [])?];
            match sys::listxattr(&t, &mut all) {
                Ok(n) => break (all, n),
                Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let shown: Vec<u8> = all[..n]
            .split_inclusive(|&b| b == 0)
            .filter(|name| !(hide_trusted && name.starts_with(b"trusted.")))
            .filter(|name| name.strip_suffix(b"\0").unwrap_or(name) != TIMES_XATTR.as_bytes())
            .flatten()
            .copied()
            .collect();
        if buf.is_empty() {
            return Ok(shown.len());
        }
        if buf.len() < shown.len() {
            return err(libc::ERANGE);
        }
        buf[..shown.len()].copy_from_slice(&shown);
        Ok(shown.len())
    }

    pub fn removexattr(&self, nodeid: u64, name: &OsStr) -> Result<()> {
        if is_times_xattr(name) {
            return err(libc::ENODATA);
        }
        self.forget_no_caps(nodeid, name)?;
        let (t, _fd) = self.xattr_target(nodeid)?;
        Ok(sys::removexattr(&t, name)?)
    }

    /// Open the backing file read-write where possible (hole fills read before they write;
    /// the kernel's writeback cache reads through write-only handles), else as asked.
    pub(super) fn open_backing(&self, inode: &Inode, flags: i32) -> Result<OwnedFd> {
        // O_APPEND is dropped: the kernel gives every write its offset, and pwrite on an
        // O_APPEND descriptor would ignore it. O_DIRECT is the kernel's business (the
        // page cache above us); O_SYNC/O_DSYNC pass through to the backing file.
        let keep = flags & (libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME) | self.file_atime_flag();
        // By handle when there is one: a single call, and no descriptor cached for it.
        let open_as = |fl: i32| -> Result<OwnedFd> {
            match &inode.handle {
                Some(h) => Ok(sys::open_handle(self.mount_fd.as_fd(), h, fl)?),
                None => Ok(sys::reopen(self.pfd(inode)?.as_fd(), fl)?),
            }
        };
        let open = |fl: i32| -> Result<OwnedFd> {
            match open_as(fl) {
                // O_NOATIME on a file the daemon does not own, without CAP_FOWNER.
                Err(Error::Io(e)) if e.raw_os_error() == Some(libc::EPERM) && fl & libc::O_NOATIME != 0 => {
                    open_as(fl & !libc::O_NOATIME)
                }
                r => r,
            }
        };
        match open(libc::O_RDWR | keep) {
            Ok(fd) => Ok(fd),
            Err(Error::Io(e)) if matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::ETXTBSY)) => {
                open((flags & libc::O_ACCMODE) | keep)
            }
            Err(e) => Err(e),
        }
    }

    /// O_NOATIME for opening backing files when the mount is `noatime` (harmless, and
    /// redundant, when they are reached through the private noatime mount).
    pub(super) fn file_atime_flag(&self) -> i32 {
        if self.opts.noatime {
            libc::O_NOATIME
        } else {
            0
        }
    }

    /// O_NOATIME for opening backing directories when the mount is `noatime` or `nodiratime`.
    pub(super) fn dir_atime_flag(&self) -> i32 {
        if self.opts.noatime || self.opts.nodiratime {
            libc::O_NOATIME
        } else {
            0
        }
    }

    /// `kill_privs`: the opener lacks CAP_FSETID, so O_TRUNC drops set-id bits (as ext4).
    /// Returns the handle and whether the mode changed (the kernel's cached one is stale).
    pub fn open(&self, nodeid: u64, flags: i32, kill_privs: Option<KillPrivs>) -> Result<(u64, bool)> {
        let inode = self.inode(nodeid)?;
        if inode.kind != FileType::RegularFile {
            return err(if inode.kind == FileType::Directory { libc::EISDIR } else { libc::EINVAL });
        }
        let fd = self.open_backing(&inode, flags)?;
        let h = Arc::new(FileHandle::new(inode.clone(), fd));
        let mut mode_changed = false;
        if inode.data.read().entry.is_none() {
            // No record: an empty file has no bytes to misread, so it is recorded now under
            // the configured method; any other is refused.
            let mut st = inode.data.write();
            if st.entry.is_none() {
                let stat = sys::fstat(h.fd())?;
                if stat.st_size != 0 {
                    return Err(self.refuse_unrecorded(&inode));
                }
                self.rekey(&inode, &mut st, h.fd())?;
            }
        }
        if flags & libc::O_TRUNC != 0 {
            self.truncate(&inode, Some(h.clone()), 0)?;
            if let Some(who) = &kill_privs {
                mode_changed = kill_suidgid(h.fd(), who)?;
            }
        } else if flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.adopt_if_empty(&inode, &h)?;
        }
        let h = Arc::try_unwrap(h).map_err(|_| Error::Os(libc::EIO))?;
        Ok((self.files.insert(h), mode_changed))
    }

    pub fn release(&self, fh: u64) {
        self.files.remove(fh);
    }

    /// A READ that fills the kernel's page cache (not O_DIRECT) is about to read file `fh`:
    /// called before the backing read, so that a direct write that reaches the backing file
    /// after that read sees the mark (`had_page_cache_reads`, checked after the write).
    pub fn note_page_cache_read(&self, fh: u64) {
        if let Some(h) = self.files.get(fh) {
            if !h.inode.page_cache_reads.load(Ordering::Relaxed) {
                h.inode.page_cache_reads.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Whether the file behind `fh` has had page-cache READs (see `note_page_cache_read`).
    pub fn had_page_cache_reads(&self, fh: u64) -> bool {
        self.files.get(fh).is_some_and(|h| h.inode.page_cache_reads.load(Ordering::SeqCst))
    }
}

/// Proof that `key_use` is held shared (see `new_entry`).
pub(super) type KeyUse<'a> = parking_lot::RwLockReadGuard<'a, ()>;

/// The keys among `all` that key GC may delete: not in `used`, not the current one.
pub(super) fn unused_keys(all: &[u64], used: &std::collections::HashSet<u64>, current: Option<u64>) -> Vec<u64> {
    all.iter().copied().filter(|id| !used.contains(id) && Some(*id) != current).collect()
}

const CAPS_XATTR: &[u8] = b"security.capability";

/// A caller without CAP_FSETID modifying a file: its set-id bits may have to go.
#[derive(Debug, Clone, Copy)]
pub struct KillPrivs {
    pub gid: u32,
    pub pid: u32,
}

impl KillPrivs {
    /// In the group `gid`: primary group from the request, supplementary ones from /proc
    /// (FUSE passes only the former).
    fn in_group(&self, gid: u32) -> bool {
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

/// Attributes of a file that no longer exists anywhere (no name, nobody has it open).
fn gone_stat(inode: &Inode) -> Stat {
    let mut st: Stat = unsafe { std::mem::zeroed() };
    st.st_mode = match inode.kind {
        FileType::Directory => libc::S_IFDIR,
        FileType::Symlink => libc::S_IFLNK,
        _ => libc::S_IFREG,
    };
    st.st_nlink = 0;
    st
}
