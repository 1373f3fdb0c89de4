//! The adapter's state and the POSIX calls that need all of it: lookup, inode numbering and
//! registration, open and release, the choice of a new file's key and cipher. The other
//! POSIX concerns have their own files: attributes (`attr.rs`), directories (`dir.rs`),
//! xattrs (`xattr.rs`), permissions and set-id bits (`setid.rs`), data-key rotation and GC
//! (`rotation.rs`), namespace changes that touch the dictionary (`namespace.rs`), the data
//! path (`io.rs`).

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fuser::{FileType, INodeNo};
use parking_lot::{Mutex, RwLock};

use super::attr::kind_of;
use super::errno::{err, Error, Result};
use super::handle::{DirHandle, FileHandle, HandleTable};
use super::inode::{FileEncryption, Inode, InodeTable, Loc};
use super::rotation::KeyUse;
use super::setid::{kill_suidgid, KillPrivs};
use crate::crypto::{random_iv, FileCipher, Method};
use crate::dictionary::{FileDict, FileEntry};
use crate::keys::KeyStore;
use crate::metadir::{is_hidden_name, Metadata};
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

/// How `Volume::register` came by a backing file.
pub(super) enum Origin {
    /// Looked up (or linked): it may be a file the kernel knows already.
    Found,
    /// Just created by this request, so it is new to the kernel whatever its number; with
    /// the encryption state of a regular file.
    Created(Option<FileEncryption>),
}

/// The mounted volume: its inodes, handles, dictionary and keys, and the POSIX semantics
/// over them (this file and its siblings); `FuseAdapter` (mod.rs) only translates fuser's
/// calls into calls of this.
pub struct Volume {
    pub(super) root: Arc<Inode>,
    pub(super) root_dev: u64,
    pub(super) inodes: InodeTable,
    pub(super) files: HandleTable<FileHandle>,
    pub(super) dirs: HandleTable<DirHandle>,
    pub(super) dict: Arc<FileDict>,
    pub(super) keys: Arc<KeyStore>,
    pub(super) opts: FsOptions,
    /// Namespace lock: pairs "compute a path from the inode tree" with "read or queue a
    /// dictionary record for it" (shared), against "a rename's outcome moves entries and
    /// inode locations" (exclusive). Never held across I/O waits.
    pub(super) rename_lock: RwLock<()>,
    /// Held shared from the moment a data key is chosen for a file until the file's record
    /// is queued (create, mknod, re-keying, link), and exclusively while key GC decides
    /// which keys no file uses: a key taken as "current" and rotated away meanwhile cannot
    /// be collected before the record that references it exists. Lock order: an inode's
    /// data lock, then this, then `rename_lock`.
    pub(super) key_use: RwLock<()>,
    /// Whether the daemon may chown (runs as root): new files then belong to the caller.
    pub(super) can_chown: bool,
    /// Whether inodes are named by file handles (else every inode keeps its descriptor).
    handles: bool,
    /// A plain descriptor of the backing root: `open_by_handle_at` refuses `O_PATH` ones.
    pub(super) mount_fd: OwnedFd,
    other_devs: Mutex<HashMap<u64, u64>>,
    /// With `noatime`/`nodiratime`: the private copy of the backing mount tree, with those
    /// flags, that every backing inode is reached through (see `Volume::new`).
    _atime_tree: Option<OwnedFd>,
    /// The backing root's file handle (its kind tells whether inodes can be opened by
    /// number alone: see `export`).
    pub(super) root_handle: Option<sys::Handle>,
    /// Where recently forgotten files were (see `export`).
    pub(super) departed: super::export::DepartedFiles,
}

impl Volume {
    pub fn new(meta: &Metadata, opts: FsOptions) -> Result<Volume> {
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
        let root = Arc::new(Inode::new(INodeNo::ROOT.0, FileType::Directory, None, Some(fd), None, FileEncryption::none()));
        Ok(Volume {
            root,
            root_dev: st.st_dev,
            // Half the descriptors for cached inodes, the rest for open files and metadata.
            inodes: InodeTable::new((limit / 2) as usize),
            files: HandleTable::default(),
            dirs: HandleTable::default(),
            dict: meta.dict.clone(),
            keys: meta.keys.clone(),
            opts,
            rename_lock: RwLock::new(()),
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
    pub(super) fn parent_fd(&self, inode: &Inode) -> Result<Arc<OwnedFd>> {
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
        match self.inodes.get(nodeid) {
            Some(i) if !i.stale.load(Ordering::Relaxed) => Ok(i),
            _ => err(libc::ESTALE),
        }
    }

    fn is_hidden(&self, parent: &Inode, name: &OsStr) -> bool {
        parent.nodeid == INodeNo::ROOT.0 && is_hidden_name(name)
    }

    /// Refuse to create or rename onto the metadata directory's name.
    pub(super) fn refuse_reserved_name(&self, parent: &Inode, name: &OsStr) -> Result<()> {
        if self.is_hidden(parent, name) {
            tracing::warn!(name = %name.to_string_lossy(), "refusing to create tdefs' reserved name in the mount root");
            return err(libc::EPERM);
        }
        Ok(())
    }

    /// The cipher of `entry`; `None` (I/O fails with EIO) when its data key is missing.
    pub(super) fn cipher_of(&self, e: &FileEntry) -> Option<FileCipher> {
        if e.method.is_plaintext() {
            return Some(FileCipher::plaintext());
        }
        let cipher = self.keys.get(e.key_id).map(|k| k.cipher(&e.iv));
        if cipher.is_none() {
            tracing::error!(key_id = format_args!("{:#018x}", e.key_id), "a file's data key is missing; its I/O fails with EIO");
        }
        cipher
    }

    /// Encryption state of the regular file recorded at `path` (none: no record). Call
    /// under `rename_lock` (shared), so the path and its records belong together.
    pub(super) fn recorded_state(&self, path: Option<&[u8]>) -> FileEncryption {
        let Some(path) = path else { return FileEncryption::unrecorded() };
        let Some(e) = self.dict.get(path) else { return FileEncryption::unrecorded() };
        match self.dict.conversion(path) {
            None => FileEncryption { entry: Some(e), cipher: self.cipher_of(&e), conv: None },
            Some(c) => self.converting_state(e, c.id, c.new, c.mark),
        }
    }

    /// The state of a file in conversion `id` from `old` to `new`, done below `mark`.
    pub(super) fn converting_state(&self, old: FileEntry, id: u64, new: FileEntry, mark: u64) -> FileEncryption {
        let conv = super::inode::Converting { id, new, mark, old_cipher: self.cipher_of(&old), new_cipher: self.cipher_of(&new) };
        FileEncryption { entry: Some(old), cipher: conv.cipher(), conv: Some(conv) }
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
                let _no_rename = self.rename_lock.read();
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
        let st = sys::fstatat(self.parent_fd(parent)?.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW)?;
        self.register(parent, name, &st, Origin::Found)
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
    pub(super) fn register(&self, parent: &Arc<Inode>, name: &OsStr, st: &Stat, origin: Origin) -> Result<(Arc<Inode>, Stat)> {
        let loc = || Some(Loc { parent: parent.clone(), name: name.to_os_string() });
        let parent_fd = self.parent_fd(parent)?;
        let handle = self.handle_of(parent_fd.as_fd(), name, st)?;
        let primary = self.nodeid(st.st_dev, st.st_ino);
        let (created, preset) = match origin {
            Origin::Found => (false, None),
            Origin::Created(preset) => (true, preset),
        };
        let nodeid = match self.inodes.find_and_ref(primary, handle.as_ref(), kind_of(st.st_mode), created) {
            Ok(i) => {
                i.set_loc(loc());
                return Ok((i, *st));
            }
            // The backing filesystem reused the number of a file the kernel still knows.
            Err(true) => self.inodes.alt_nodeid(handle.as_ref()),
            Err(false) => primary,
        };
        // Without handles, the descriptor pins the inode (and its number) for its life.
        let (fd, st) = match handle {
            Some(_) => (None, *st),
            None => {
                let fd = sys::openat(parent_fd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
                let st = sys::fstat(fd.as_fd())?; // authoritative if the name changed meanwhile
                (Some(fd), st)
            }
        };
        let kind = kind_of(st.st_mode);
        let state = match preset {
            Some(s) => s,
            None if kind == FileType::RegularFile => {
                let _no_rename = self.rename_lock.read();
                self.recorded_state(parent.child_path(name).as_deref())
            }
            None => FileEncryption::none(),
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

    pub fn readlink(&self, nodeid: u64) -> Result<OsString> {
        Ok(sys::readlink_fd(self.parent_fd(&*self.inode(nodeid)?)?.as_fd())?)
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
                None => Ok(sys::reopen(self.parent_fd(inode)?.as_fd(), fl)?),
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

