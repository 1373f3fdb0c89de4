//! Inodes the kernel knows about. Node id = backing inode number (fuser reports `attr.ino`
//! as the node id), so hard links share one node and `stat` shows the backing numbers.
//!
//! An inode is named by its backing *file handle* (inode number + generation) and keeps an
//! `O_PATH` descriptor only in a bounded cache: a database with more files than the
//! process may hold descriptors still works. Because an uncached inode does not pin its
//! number, the backing filesystem may reuse it for a new file while the kernel still
//! remembers the old one; a lookup that finds a different handle under a remembered node
//! id gives the new file a node id of its own. Without file handles (some filesystems)
//! every inode keeps its descriptor for its whole life, which also pins its number.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use fuser::FileType;
use parking_lot::{Mutex, RwLock};

use crate::crypto::FileCipher;
use crate::dictionary::FileEntry;
use crate::sys::Handle;

/// Encryption state of a regular file. Lives inside the inode's I/O lock: reads and
/// writes hold it shared, operations that change the layout (hole fills, truncate,
/// re-keying) hold it exclusively.
pub struct FileEncryption {
    /// The dictionary entry (plaintext files have one too); `None`: the file has no record,
    /// so its encryption is unknown and its contents are refused (fail closed).
    pub entry: Option<FileEntry>,
    /// The cipher; `None` when there is no record or the record names a data key that is
    /// missing (I/O fails with EIO). For a file in conversion, the split of the two.
    pub cipher: Option<FileCipher>,
    /// The file is being converted online: `entry` is its old entry, this the new one and
    /// the watermark (docs/design.md §10).
    pub conv: Option<Converting>,
}

/// The state of a file in online conversion, as the dictionary records it.
#[derive(Clone)]
pub struct Converting {
    pub id: u64,
    pub new: FileEntry,
    pub mark: u64,
    /// `None` when a data key is missing.
    pub old_cipher: Option<FileCipher>,
    pub new_cipher: Option<FileCipher>,
}

impl Converting {
    /// The cipher of the whole file: new below the mark, old from it on.
    pub fn cipher(&self) -> Option<FileCipher> {
        Some(FileCipher::split(self.new_cipher.clone()?, self.old_cipher.clone()?, self.mark))
    }
}

impl FileEncryption {
    /// Directories, symlinks and other inodes without contents of their own: no cipher, so
    /// should such an inode ever be taken for a regular file its I/O fails (EIO) rather than
    /// going to disk in the clear.
    pub fn none() -> FileEncryption {
        FileEncryption { entry: None, cipher: None, conv: None }
    }

    /// A regular file without a record.
    pub fn unrecorded() -> FileEncryption {
        FileEncryption { entry: None, cipher: None, conv: None }
    }

    /// A regular file recorded as `entry`, not in conversion.
    pub fn recorded(entry: FileEntry, cipher: FileCipher) -> FileEncryption {
        FileEncryption { entry: Some(entry), cipher: Some(cipher), conv: None }
    }
}

impl Drop for Inode {
    fn drop(&mut self) {
        // Dropping the last reference to a deep directory's inode drops its parent's, and
        // so on up the chain: one frame per level by default, and any user can make the
        // chain 100,000 levels long. Unlink it iteratively instead.
        let mut next = self.loc.get_mut().take();
        while let Some(loc) = next {
            next = match Arc::try_unwrap(loc.parent) {
                Ok(mut parent) => parent.loc.get_mut().take(), // `parent` then drops shallow
                Err(_) => None,                                // still referenced elsewhere
            };
        }
    }
}

/// A time as stat gives it: seconds, nanoseconds.
pub type Ts = (i64, i64);

/// A regular file's mtime and ctime as the kernel keeps them with the writeback cache (see
/// `times`), and what the backing file's `trusted.tdefs.times` is known to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelTimes {
    pub mtime: Ts,
    pub ctime: Ts,
    pub recorded: Option<(Ts, Ts)>,
}

/// Where the kernel last saw this inode: parent and name.
#[derive(Clone)]
pub struct Loc {
    pub parent: Arc<Inode>,
    pub name: OsString,
}

pub struct Inode {
    pub nodeid: u64,
    pub kind: FileType,
    /// The backing inode's file handle; `None` where the backing filesystem has none (then
    /// `fd` is held for the inode's whole life).
    pub handle: Option<Handle>,
    fd: Mutex<Option<Arc<OwnedFd>>>,
    /// Clock bit for the descriptor cache.
    used: AtomicBool,
    lookups: AtomicU64,
    loc: Mutex<Option<Loc>>,
    pub data: RwLock<FileEncryption>,
    /// The refusal of this file (no record) was logged already: one line per file.
    pub refusal_logged: AtomicBool,
    /// Known to have no `security.capability` xattr. The kernel asks for it before every
    /// write (to drop capabilities), a round trip per write; once the answer is known
    /// absent it is given from memory. Only tdefs changes the backing files' xattrs, and
    /// every setxattr/removexattr of that name through tdefs clears this.
    pub no_caps: AtomicBool,
    /// The kernel has cached pages of this file: a READ without O_DIRECT reached it (noted
    /// before its backing read). Direct writes to such a file wait for the written range
    /// to leave the page cache (see `dio`).
    pub page_cache_reads: AtomicBool,
    /// With the writeback cache: the mtime and ctime the kernel has for this regular file,
    /// once reported (see `times`).
    pub ktimes: Mutex<Option<KernelTimes>>,
    /// Directories this inode holds a reference on: an inode found by file handle alone
    /// (open_by_handle_at, NFS) is reached through a chain of directories the kernel does
    /// not hold; they stay known (and their locations kept current by renames) until this
    /// inode is forgotten. See `export`.
    pub pins: Mutex<Vec<u64>>,
    /// The backing filesystem gave this inode's identity (its number, and on a backing whose
    /// file handles carry no generation, such as a FUSE filesystem, its very handle) to
    /// another file while the kernel still held this one: lookups never find it again and
    /// requests on it fail with ESTALE (see `InodeTable::find_and_ref`).
    pub stale: AtomicBool,
}

impl Inode {
    pub fn new(nodeid: u64, kind: FileType, handle: Option<Handle>, fd: Option<OwnedFd>, loc: Option<Loc>, state: FileEncryption) -> Inode {
        Inode {
            nodeid,
            kind,
            handle,
            fd: Mutex::new(fd.map(Arc::new)),
            used: AtomicBool::new(true),
            lookups: AtomicU64::new(0),
            loc: Mutex::new(loc),
            data: RwLock::new(state),
            refusal_logged: AtomicBool::new(false),
            no_caps: AtomicBool::new(false),
            page_cache_reads: AtomicBool::new(false),
            ktimes: Mutex::new(None),
            pins: Mutex::new(Vec::new()),
            stale: AtomicBool::new(false),
        }
    }

    /// The cached `O_PATH` descriptor, if any.
    pub fn cached_fd(&self) -> Option<Arc<OwnedFd>> {
        let f = self.fd.lock().clone();
        if f.is_some() {
            self.used.store(true, Ordering::Relaxed);
        }
        f
    }

    /// Cache `fd` unless a descriptor is cached already; returns the one to use and
    /// whether `fd` was stored.
    pub fn cache_fd(&self, fd: OwnedFd) -> (Arc<OwnedFd>, bool) {
        let mut g = self.fd.lock();
        self.used.store(true, Ordering::Relaxed);
        match &*g {
            Some(f) => (f.clone(), false),
            None => {
                let f = Arc::new(fd);
                *g = Some(f.clone());
                (f, true)
            }
        }
    }

    /// One clock step: drop the cached descriptor if it was not used since the last step.
    /// Inodes without a handle keep theirs. Returns whether a descriptor was dropped.
    fn sweep(&self) -> bool {
        if self.handle.is_none() || self.used.swap(false, Ordering::Relaxed) {
            return false;
        }
        self.fd.lock().take().is_some()
    }

    fn holds_cached_fd(&self) -> bool {
        self.handle.is_some() && self.fd.lock().is_some()
    }

    pub fn loc(&self) -> Option<Loc> {
        self.loc.lock().clone()
    }

    pub fn set_loc(&self, loc: Option<Loc>) {
        *self.loc.lock() = loc;
    }

    /// Forget the location if it is `parent/name` (that name was removed).
    pub fn clear_loc_if(&self, parent: &Inode, name: &OsStr) {
        let mut l = self.loc.lock();
        if l.as_ref().is_some_and(|l| l.parent.nodeid == parent.nodeid && l.name == name) {
            *l = None;
        }
    }

    /// Absolute path below the mount root ("/a/b"), from the chain of locations; `None` if
    /// some link of the chain is unknown (an unlinked file or directory). Callers that pair
    /// the path with a dictionary record hold the namespace lock.
    pub fn path(self: &Arc<Self>) -> Option<Vec<u8>> {
        let mut parts: Vec<OsString> = Vec::new();
        let mut cur = self.clone();
        while cur.nodeid != fuser::INodeNo::ROOT.0 {
            let loc = cur.loc()?;
            parts.push(loc.name);
            cur = loc.parent;
            if parts.len() > 1 << 24 {
                return None; // a cycle would be a bug; never loop forever
            }
        }
        if parts.is_empty() {
            return Some(b"/".to_vec());
        }
        let mut p = Vec::new();
        for name in parts.iter().rev() {
            p.push(b'/');
            p.extend_from_slice(name.as_bytes());
        }
        Some(p)
    }

    /// Path of `name` inside this directory.
    pub fn child_path(self: &Arc<Self>, name: &OsStr) -> Option<Vec<u8>> {
        let mut p = self.path()?;
        if p != b"/" {
            p.push(b'/');
        }
        p.extend_from_slice(name.as_bytes());
        Some(p)
    }
}

const SHARDS: usize = 16;
/// Node ids given to a file whose inode number is still remembered for another file.
const ALT_BASE: u64 = 1 << 62;

/// Node id -> inode, sharded so concurrent lookups rarely meet on one lock; plus the
/// descriptor cache accounting and the node ids of displaced files.
pub struct InodeTable {
    shards: [RwLock<HashMap<u64, Arc<Inode>>>; SHARDS],
    cached: AtomicUsize,
    budget: usize,
    alt: RwLock<HashMap<Handle, u64>>,
    next_alt: AtomicU64,
}

impl InodeTable {
    /// `budget`: how many `O_PATH` descriptors the cache may hold.
    pub fn new(budget: usize) -> InodeTable {
        InodeTable {
            shards: std::array::from_fn(|_| RwLock::new(HashMap::new())),
            cached: AtomicUsize::new(0),
            budget: budget.max(64),
            alt: RwLock::new(HashMap::new()),
            next_alt: AtomicU64::new(1),
        }
    }

    fn shard(&self, nodeid: u64) -> &RwLock<HashMap<u64, Arc<Inode>>> {
        &self.shards[(nodeid as usize) % SHARDS]
    }

    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        self.shard(nodeid).read().get(&nodeid).cloned()
    }

    /// The known inode for backing file `handle` (primary node id `nodeid`, type `kind`),
    /// counting one more kernel reference. `Err(true)` when `nodeid` is remembered for
    /// another file, `Err(false)` when it is free. `created`: the backing file was just
    /// created, so any inode found with its identity belongs to a removed file whose number
    /// (even handle) the backing filesystem reused; so does one of another type. Such an
    /// inode is marked stale, and the caller gives the new file a node id of its own.
    pub fn find_and_ref(&self, nodeid: u64, handle: Option<&Handle>, kind: FileType, created: bool) -> Result<Arc<Inode>, bool> {
        let take = |i: &Arc<Inode>| -> bool {
            if i.stale.load(Ordering::Relaxed) {
                return false;
            }
            if created || i.kind != kind {
                i.stale.store(true, Ordering::Relaxed);
                return false;
            }
            i.lookups.fetch_add(1, Ordering::Relaxed);
            true
        };
        if let Some(h) = handle {
            let alt = self.alt.read();
            if let Some(&a) = alt.get(h) {
                if let Some(i) = self.shard(a).read().get(&a) {
                    return if take(i) { Ok(i.clone()) } else { Err(true) };
                }
            }
        }
        let shard = self.shard(nodeid).read();
        match shard.get(&nodeid) {
            Some(i) if handle.is_none() || i.handle.as_ref() == handle => if take(i) { Ok(i.clone()) } else { Err(true) },
            Some(_) => Err(true),
            None => Err(false),
        }
    }

    /// The known inode for backing file `handle` (primary node id `nodeid`), if any and not
    /// stale; no reference is counted.
    pub fn find(&self, nodeid: u64, handle: Option<&Handle>) -> Option<Arc<Inode>> {
        let live = |i: Arc<Inode>| (!i.stale.load(Ordering::Relaxed)).then_some(i);
        if let Some(h) = handle {
            if let Some(&a) = self.alt.read().get(h) {
                return self.get(a).and_then(live);
            }
        }
        self.get(nodeid).filter(|i| handle.is_none() || i.handle.as_ref() == handle).and_then(live)
    }

    /// Run `f` on every inode (no kernel reference is counted).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<Inode>)) {
        for shard in &self.shards {
            let inodes: Vec<Arc<Inode>> = shard.read().values().cloned().collect();
            for i in &inodes {
                f(i);
            }
        }
    }

    /// A node id for a file whose primary one is remembered for another file; found again by
    /// its handle (the newest file with a handle owns it). Without handles the descriptor
    /// each inode holds keeps the backing filesystem from reusing its number, short of a
    /// backing that replaces files under the kernel's feet: such a file gets a new node id
    /// at each lookup, which is correct, if wasteful.
    pub fn alt_nodeid(&self, handle: Option<&Handle>) -> u64 {
        let id = ALT_BASE | self.next_alt.fetch_add(1, Ordering::Relaxed);
        if let Some(h) = handle {
            self.alt.write().insert(h.clone(), id);
        }
        id
    }

    /// Insert `inode` with one kernel reference; if another thread inserted the same node
    /// meanwhile, count the reference on that one and return it instead.
    pub fn insert_or_ref(&self, inode: Inode) -> Arc<Inode> {
        let cached = inode.holds_cached_fd();
        let mut shard = self.shard(inode.nodeid).write();
        let mut inserted = false;
        let i = shard.entry(inode.nodeid).or_insert_with(|| {
            inserted = true;
            Arc::new(inode)
        });
        i.lookups.fetch_add(1, Ordering::Relaxed);
        let i = i.clone();
        drop(shard);
        if inserted && cached {
            self.note_cached();
        }
        i
    }

    /// One more kernel reference on `inode`, if it is still the known inode for its node
    /// id (false: it was released meanwhile).
    pub fn add_ref(&self, inode: &Arc<Inode>) -> bool {
        let shard = self.shard(inode.nodeid).read();
        match shard.get(&inode.nodeid) {
            Some(i) if Arc::ptr_eq(i, inode) => {
                i.lookups.fetch_add(1, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Drop `n` kernel references; the inode is released when none remain, and returned.
    pub fn forget(&self, nodeid: u64, n: u64) -> Option<Arc<Inode>> {
        if nodeid == fuser::INodeNo::ROOT.0 {
            return None;
        }
        let mut shard = self.shard(nodeid).write();
        let i = shard.get(&nodeid)?;
        let prev = i.lookups.fetch_sub(n.min(i.lookups.load(Ordering::Relaxed)), Ordering::Relaxed);
        if prev > n {
            return None;
        }
        let i = shard.remove(&nodeid).expect("present");
        drop(shard);
        if i.holds_cached_fd() {
            self.cached.fetch_sub(1, Ordering::Relaxed);
        }
        if nodeid & ALT_BASE != 0 {
            if let Some(h) = &i.handle {
                let mut alt = self.alt.write();
                // Unless a newer file with the same handle took it over.
                if alt.get(h) == Some(&nodeid) {
                    alt.remove(h);
                }
            }
        }
        Some(i)
    }

    /// Account for one more cached descriptor; over budget, sweep the clock until a
    /// quarter of the budget is free again.
    pub fn note_cached(&self) {
        if self.cached.fetch_add(1, Ordering::Relaxed) + 1 <= self.budget {
            return;
        }
        let target = self.budget * 3 / 4;
        for _pass in 0..2 {
            for shard in &self.shards {
                for i in shard.read().values() {
                    if i.sweep() {
                        self.cached.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                if self.cached.load(Ordering::Relaxed) <= target {
                    return;
                }
            }
        }
    }
}
