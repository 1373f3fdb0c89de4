//! Inodes the kernel knows about. Node id = backing inode number (fuser reports `attr.ino`
//! as the node id), so hard links share one node and `stat` shows the backing numbers.
//! Each inode pins its backing inode with an `O_PATH` descriptor, so the backing
//! filesystem cannot reuse that number while the kernel may still send it.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fuser::FileType;
use parking_lot::{Mutex, RwLock};

use crate::crypto::FileCipher;
use crate::dictionary::FileEntry;

/// Encryption state of a regular file. Lives inside the inode's I/O lock: reads and
/// writes hold it shared, operations that change the layout (hole fills, truncate,
/// re-keying) hold it exclusively.
pub struct FileState {
    /// The dictionary entry, `None` for a file tracked as plaintext.
    pub entry: Option<FileEntry>,
    /// The cipher, `None` when the entry names a data key that is missing (I/O fails).
    pub cipher: Option<FileCipher>,
}

impl FileState {
    pub fn plaintext() -> FileState {
        FileState { entry: None, cipher: Some(FileCipher::plaintext()) }
    }
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
    fd: OwnedFd,
    lookups: AtomicU64,
    loc: Mutex<Option<Loc>>,
    pub data: RwLock<FileState>,
}

impl Inode {
    pub fn new(nodeid: u64, kind: FileType, fd: OwnedFd, loc: Option<Loc>, state: FileState) -> Inode {
        Inode { nodeid, kind, fd, lookups: AtomicU64::new(0), loc: Mutex::new(loc), data: RwLock::new(state) }
    }

    /// The `O_PATH` descriptor of the backing inode.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
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
            if parts.len() > 100_000 {
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

/// Node id -> inode, sharded so concurrent lookups rarely meet on one lock.
pub struct InodeTable {
    shards: [RwLock<HashMap<u64, Arc<Inode>>>; SHARDS],
}

impl Default for InodeTable {
    fn default() -> Self {
        InodeTable { shards: std::array::from_fn(|_| RwLock::new(HashMap::new())) }
    }
}

impl InodeTable {
    fn shard(&self, nodeid: u64) -> &RwLock<HashMap<u64, Arc<Inode>>> {
        &self.shards[(nodeid as usize) % SHARDS]
    }

    pub fn get(&self, nodeid: u64) -> Option<Arc<Inode>> {
        self.shard(nodeid).read().get(&nodeid).cloned()
    }

    /// The inode with `nodeid`, counting one more kernel reference, if it is known.
    pub fn get_and_ref(&self, nodeid: u64) -> Option<Arc<Inode>> {
        let shard = self.shard(nodeid).read();
        let i = shard.get(&nodeid)?;
        i.lookups.fetch_add(1, Ordering::Relaxed);
        Some(i.clone())
    }

    /// Insert `inode` with one kernel reference; if another thread inserted the same node
    /// meanwhile, count the reference on that one and return it instead.
    pub fn insert_or_ref(&self, inode: Inode) -> Arc<Inode> {
        let mut shard = self.shard(inode.nodeid).write();
        let i = shard.entry(inode.nodeid).or_insert_with(|| Arc::new(inode));
        i.lookups.fetch_add(1, Ordering::Relaxed);
        i.clone()
    }

    /// Drop `n` kernel references; the inode is released when none remain.
    pub fn forget(&self, nodeid: u64, n: u64) {
        if nodeid == fuser::INodeNo::ROOT.0 {
            return;
        }
        let mut shard = self.shard(nodeid).write();
        if let Some(i) = shard.get(&nodeid) {
            let prev = i.lookups.fetch_sub(n.min(i.lookups.load(Ordering::Relaxed)), Ordering::Relaxed);
            if prev <= n {
                shard.remove(&nodeid);
            }
        }
    }
}
