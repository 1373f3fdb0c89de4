//! O_DIRECT writes and the kernel's page cache (issue 16 item 1).
//!
//! For an AIO O_DIRECT write, `generic_file_direct_write()` (mm/filemap.c) drops the range
//! from the page cache *before* `->direct_IO` and again afterwards only `if (written > 0)`,
//! which an AIO write never is: with FUSE_ASYNC_DIO `fuse_direct_IO()` (fs/fuse/file.c)
//! returns -EIOCBQUEUED, and `fuse_aio_complete()` does not invalidate. A buffered READ
//! answered between the first invalidation and the write reaching the backing file puts the
//! old bytes back into the page cache, where they stay (xfstests generic/451). The fix in
//! the kernel is "fuse: invalidate the page cache after direct write" (4c4c472d25f5, not in
//! 6.18). Until then tdefs does it: the reply to a direct WRITE of a file that has had
//! page-cache READs waits until the written range is out of the page cache
//! (FUSE_NOTIFY_INVAL_INODE), so the write completes only once no stale copy is left.
//!
//! The notification must not come from a request thread: invalidating locks the range's
//! folios, and a folio under readahead stays locked until a request thread answers its
//! READ (with every request thread invalidating, nobody answers). One dedicated thread
//! sends the notifications and then the replies, in order. A readahead that holds locked
//! folios can also wait for a background-request slot that the held-back replies occupy,
//! so tdefs raises `max_background` (see `MAX_BACKGROUND`).

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use fuser::{INodeNo, Notifier, OpenFlags, ReplyWrite, WriteFlags};

/// Background requests (async direct I/O, readahead) the kernel may have in flight at once
/// while direct-write invalidation is on: the most it allows (FUSE keeps it in a u16; root
/// may raise it freely, other users up to the `max_user_bgreq` module parameter). A
/// deadlock would need that many async O_DIRECT writes whose replies are held back at once.
pub const MAX_BACKGROUND: u16 = u16::MAX;

/// Whether a WRITE is the caller's own O_DIRECT write (not writeback of cached pages).
pub fn is_direct_write(write_flags: WriteFlags, flags: OpenFlags) -> bool {
    !write_flags.contains(WriteFlags::FUSE_WRITE_CACHE) && flags.0 & libc::O_DIRECT != 0
}

struct Job {
    ino: INodeNo,
    offset: u64,
    written: u32,
    reply: ReplyWrite,
}

/// The thread that invalidates, then replies.
pub struct Invalidator {
    tx: mpsc::Sender<Job>,
}

impl Invalidator {
    /// Start the thread; it stops when the `Invalidator` is dropped (after the queue).
    pub fn start(notifier: Arc<OnceLock<Notifier>>) -> std::io::Result<Invalidator> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new().name("tdefs-inval".into()).spawn(move || {
            for job in rx {
                if let Some(n) = notifier.get() {
                    // ENOENT: the kernel no longer has the inode, nor its pages.
                    if let Err(e) = n.inval_inode(job.ino, job.offset as i64, i64::from(job.written)) {
                        tracing::debug!(ino = job.ino.0, error = %e, "page-cache invalidation after a direct write");
                    }
                }
                job.reply.written(job.written);
            }
        })?;
        Ok(Invalidator { tx })
    }

    /// Reply `written` to a direct write at `offset` once that range is out of the page cache.
    pub fn reply_after_invalidation(&self, ino: INodeNo, offset: u64, written: u32, reply: ReplyWrite) {
        if let Err(mpsc::SendError(job)) = self.tx.send(Job { ino, offset, written, reply }) {
            job.reply.written(job.written); // the thread is gone (never while mounted)
        }
    }
}
