//! Open file and directory handles, by the `fh` number given to the kernel.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::inode::Inode;

/// An open regular file: the backing descriptor (opened read-write whenever possible:
/// hole fills read before they write, and the kernel's writeback cache reads through
/// write-only handles).
pub struct FileHandle {
    pub inode: Arc<Inode>,
    fd: OwnedFd,
}

impl FileHandle {
    pub fn new(inode: Arc<Inode>, fd: OwnedFd) -> FileHandle {
        FileHandle { inode, fd }
    }
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// An open directory: its descriptor, and a lock serialising seek + getdents.
pub struct DirHandle {
    pub inode: Arc<Inode>,
    pub fd: Mutex<OwnedFd>,
}

const SHARDS: usize = 16;

/// fh -> handle, sharded: the read/write path takes one shard's read lock, never a
/// global one.
pub struct HandleTable<T> {
    next: AtomicU64,
    shards: [RwLock<HashMap<u64, Arc<T>>>; SHARDS],
}

impl<T> Default for HandleTable<T> {
    fn default() -> Self {
        HandleTable { next: AtomicU64::new(1), shards: std::array::from_fn(|_| RwLock::new(HashMap::new())) }
    }
}

impl<T> HandleTable<T> {
    pub fn insert(&self, h: T) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.shards[fh as usize % SHARDS].write().insert(fh, Arc::new(h));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<T>> {
        self.shards[fh as usize % SHARDS].read().get(&fh).cloned()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<T>> {
        self.shards[fh as usize % SHARDS].write().remove(&fh)
    }
}
