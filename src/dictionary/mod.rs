//! The file dictionary: path -> (method, data key id, IV) for every encrypted file.
//!
//! Durable as a sealed snapshot plus an append-only log of records (`files.snap`,
//! `files.log.<generation>`). Appends are group-committed: concurrent callers share one
//! write + fdatasync. Compaction starts a new log generation, writes a snapshot covering the
//! older ones, and deletes them; a crash at any step leaves a loadable set of files.
//!
//! Ordering with the FUSE adapter (docs/design.md §5): `submit` applies a record to
//! the in-memory tree and queues it; `sync` waits until it is durable. Callers submit under
//! their namespace lock (so log order matches memory order) and wait outside it.
//!
//! Files: errors (`error.rs`), loading, replay and salvage (`load.rs`), the group-commit
//! writer (here), compaction (`compact.rs`), the record format (`record.rs`), the sealed
//! log and snapshot (`log.rs`, `snapshot.rs`), the in-memory trie (`tree.rs`).
//!
//! Rollback: the key dictionary keeps the dictionary's mark (`DictMark`: newest generation,
//! last record known durable, clean close), written through a [`MarkStore`] when a writer
//! opens, at every compaction, at checkpoints and at a clean close. `load` refuses a set of
//! files that ends before the mark.

mod compact;
mod error;
mod load;
mod log;
mod record;
mod snapshot;
mod tree;

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

pub use self::log::{log_file_name, LOG_HEADER_LEN};
pub use self::record::{valid_path, Conversion, FileEntry, Intent, Job, Record};
pub use self::snapshot::{SnapshotInfo, SNAPSHOT_FILE};
pub use self::error::DictError;
pub use self::load::LoadedDictionary;
pub use self::tree::Tree;
use self::error::LOG_WHAT;

use crate::crypto::{SealKey, SealKeys};
pub use crate::codec::DictMark;
use crate::sys::{self, Dir};
use crate::error::{io_err, IoError};

/// Where the dictionary's mark is kept (the key dictionary). Writing it must be durable on
/// return.
pub trait MarkStore: Send + Sync {
    fn store_mark(&self, mark: DictMark) -> Result<(), String>;
}

/// Seals in one log generation after which compaction is due whatever the configured
/// threshold (the config refuses thresholds above it): keeps every subkey far below the
/// 2^32 random-nonce seals GCM allows.
pub const MAX_RECORDS_PER_GENERATION: u64 = 1 << 30;

/// Preallocate the log this far ahead so that appends keep working on a nearly full disk.
const PREALLOC: u64 = 1 << 20;

struct LogState {
    file: Arc<File>,
    gen: u64,
    /// Format of the current log and the key its records are sealed with.
    version: u16,
    seal: SealKey,
    next_seq: u64,
    /// Framed records not yet written.
    pending: Vec<u8>,
    /// Directories to fsync before `pending` may be written (see `submit_after`).
    barriers: Vec<std::os::fd::OwnedFd>,
    /// File length covered by completed writes.
    written: u64,
    preallocated: u64,
    durable_seq: u64,
    syncing: bool,
    /// A write failed with this error for records up to this seq (they stay queued).
    batch_error: Option<(u64, i32)>,
    /// A failure after which nothing more is written.
    failed: Option<String>,
    records_since_snapshot: u64,
}

pub struct FileDict {
    dir: Arc<Dir>,
    keys: Arc<SealKeys>,
    instance: [u8; 16],
    marks: Arc<dyn MarkStore>,
    /// The last mark stored (checkpoints skip unchanged ones).
    mark: Mutex<DictMark>,
    tree: RwLock<Tree>,
    log: Mutex<LogState>,
    log_cv: Condvar,
    compact_lock: Mutex<()>,
    rewrite_threshold: u64,
    last_compaction: Mutex<Option<Instant>>,
}

impl FileDict {
    /// Turn a loaded dictionary into a writable one: store a mark that says a writer has
    /// it open (before anything changes, so a crash from here on is never taken for a
    /// rollback), cut a torn tail off the last log and remove leftovers of an interrupted
    /// compaction.
    pub fn open_writable(
        loaded: LoadedDictionary,
        keys: Arc<SealKeys>,
        instance: &[u8; 16],
        rewrite_threshold: u64,
        marks: Arc<dyn MarkStore>,
    ) -> Result<FileDict, DictError> {
        let dir = loaded.dir.clone();
        let gen = loaded.generation();
        let mark = DictMark { gen, seq: loaded.last_seq(), clean: false };
        marks.store_mark(mark).map_err(DictError::Mark)?;
        let path = dir.join(&log_file_name(gen));
        let file = dir.open(&log_file_name(gen), libc::O_RDWR).map_err(io_err("open", &path))?;
        if let Some((bytes, why)) = loaded.torn_tail {
            tracing::warn!(
                log = %path.display(), offset = loaded.last_valid_len, bytes, reason = why,
                "cutting a torn record off the end of the dictionary log (an interrupted write; \
                 it was never acknowledged)"
            );
            sys::ftruncate(file.as_fd(), loaded.last_valid_len).map_err(io_err("truncate", &path))?;
            sys::fdatasync(file.as_fd()).map_err(io_err("fsync", &path))?;
        }
        for name in &loaded.stale_logs {
            dir.remove(name).map_err(io_err("remove", &dir.join(name)))?;
        }
        let _ = dir.remove_if_exists(&format!("{SNAPSHOT_FILE}.tmp"));
        let records_since_snapshot = loaded.records;
        let durable_seq = loaded.next_seq - 1;
        let seal = log::log_seal(&keys, gen, loaded.log_version);
        Ok(FileDict {
            dir,
            keys,
            instance: *instance,
            marks,
            mark: Mutex::new(mark),
            tree: RwLock::new(loaded.tree),
            log: Mutex::new(LogState {
                file: Arc::new(file),
                gen,
                version: loaded.log_version,
                seal,
                next_seq: loaded.next_seq,
                pending: Vec::new(),
                barriers: Vec::new(),
                written: loaded.last_valid_len,
                preallocated: 0,
                durable_seq,
                syncing: false,
                batch_error: None,
                failed: None,
                records_since_snapshot,
            }),
            log_cv: Condvar::new(),
            compact_lock: Mutex::new(()),
            rewrite_threshold,
            last_compaction: Mutex::new(None),
        })
    }

    fn store_mark(&self, mark: DictMark) -> Result<(), DictError> {
        self.marks.store_mark(mark).map_err(DictError::Mark)?;
        *self.mark.lock() = mark;
        Ok(())
    }

    /// Record in the key dictionary how far the log is durable, if it moved since the last
    /// mark: bounds what a log cut at a record boundary can take unnoticed after a crash.
    /// Returns whether a mark was written.
    pub fn checkpoint(&self) -> Result<bool, DictError> {
        let _one = self.compact_lock.lock(); // marks never go back: one writer at a time
        let (gen, seq) = {
            let st = self.log.lock();
            (st.gen, st.durable_seq)
        };
        let m = *self.mark.lock();
        if (m.gen, m.seq) == (gen, seq) {
            return Ok(false);
        }
        self.store_mark(DictMark { gen, seq, clean: false })?;
        Ok(true)
    }

    /// Flush everything and record a clean close: the next open then requires the log to
    /// end exactly here.
    pub fn close(&self) -> Result<(), DictError> {
        let _one = self.compact_lock.lock();
        self.flush()?;
        let (gen, seq) = {
            let st = self.log.lock();
            (st.gen, st.durable_seq)
        };
        self.store_mark(DictMark { gen, seq, clean: true })
    }

    /// The metadata directory (for messages and sizes).
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    pub fn get(&self, path: &[u8]) -> Option<FileEntry> {
        let started = Instant::now();
        let e = self.tree.read().get(path);
        crate::metrics::dictionary_read(started);
        e
    }

    /// Run `f` with read access to the whole tree (status, dumps, key reference counts).
    pub fn with_tree<T>(&self, f: impl FnOnce(&Tree) -> T) -> T {
        f(&self.tree.read())
    }

    /// The conversion the file at `path` is in, if any.
    pub fn conversion(&self, path: &[u8]) -> Option<Conversion> {
        self.tree.read().conversion_at(path).cloned()
    }

    pub fn conversions(&self) -> Vec<Conversion> {
        self.tree.read().conversions().cloned().collect()
    }

    pub fn job(&self) -> Option<Job> {
        self.tree.read().job().cloned()
    }

    pub fn pending_intents(&self) -> Vec<Intent> {
        self.tree.read().intents().cloned().collect()
    }

    /// Apply `rec` in memory and queue it for the log; returns its sequence number.
    pub fn submit(&self, rec: Record) -> Result<u64, DictError> {
        self.submit_after(rec, Vec::new())
    }

    /// Like `submit`, but the record may reach the disk only after `barriers` (directories)
    /// have been fsynced. Used for records that follow a namespace change in the backing
    /// directory (unlink, rename): the record must never be durable while the change it
    /// describes is not, or a power cut could leave a file whose entry is already gone.
    pub fn submit_after(&self, rec: Record, barriers: Vec<std::os::fd::OwnedFd>) -> Result<u64, DictError> {
        let mut st = self.log.lock();
        st.barriers.extend(barriers);
        if let Some(f) = &st.failed {
            return Err(DictError::Failed(f.clone()));
        }
        let seq = st.next_seq;
        self.tree.write().apply(seq, &rec).map_err(|e| DictError::Inconsistent(e.0))?;
        let framed = log::frame(&st.seal, &self.instance, st.gen, st.version, seq, &rec);
        st.pending.extend_from_slice(&framed);
        st.next_seq += 1;
        st.records_since_snapshot += 1;
        Ok(seq)
    }

    /// Wait until record `seq` (and all before it) is durable. Concurrent callers share one
    /// write + fdatasync: whoever finds no write in flight writes everything queued.
    pub fn sync(&self, seq: u64) -> Result<(), DictError> {
        let mut st = self.log.lock();
        loop {
            if st.durable_seq >= seq {
                return Ok(());
            }
            if let Some(f) = &st.failed {
                return Err(DictError::Failed(f.clone()));
            }
            if let Some((upto, errno)) = st.batch_error {
                if seq <= upto {
                    st.batch_error = None;
                    return Err(if errno == libc::ENOSPC || errno == libc::EDQUOT {
                        DictError::NoSpace
                    } else {
                        IoError::new("append to", self.log_path(st.gen), io::Error::from_raw_os_error(errno)).into()
                    });
                }
            }
            if st.syncing {
                self.log_cv.wait(&mut st);
            } else {
                self.write_pending(&mut st);
            }
        }
    }

    /// Make every queued record durable.
    pub fn flush(&self) -> Result<(), DictError> {
        let last = self.log.lock().next_seq - 1;
        self.sync(last)
    }

    fn log_path(&self, gen: u64) -> PathBuf {
        self.dir.join(&log_file_name(gen))
    }

    /// Write and fdatasync everything queued, with the lock released during the I/O.
    fn write_pending(&self, st: &mut MutexGuard<'_, LogState>) {
        debug_assert!(!st.syncing);
        let upto = st.next_seq - 1;
        let buf = std::mem::take(&mut st.pending);
        let barriers = std::mem::take(&mut st.barriers);
        let (file, off, prealloc) = (st.file.clone(), st.written, st.preallocated);
        st.syncing = true;
        let started = Instant::now();
        let (write_res, sync_res, new_prealloc) = MutexGuard::unlocked(st, || {
            for dir in &barriers {
                // A directory that cannot be synced (EIO) fails the batch like the log would.
                if let Err(e) = sys::fsync(std::os::fd::AsFd::as_fd(dir)) {
                    return (Ok(()), Err(e), prealloc);
                }
            }
            let fd = file.as_fd();
            let end = off + buf.len() as u64;
            let mut new_prealloc = prealloc;
            if end > prealloc {
                // Best effort: reserve space so a full disk cannot tear the next records.
                if sys::fallocate(fd, libc::FALLOC_FL_KEEP_SIZE, off, (end - off).max(PREALLOC)).is_ok() {
                    new_prealloc = off + (end - off).max(PREALLOC);
                }
            }
            let w = if buf.is_empty() { Ok(()) } else { sys::pwrite_all(fd, &buf, off) };
            let s = if w.is_ok() { sys::fdatasync(fd) } else { Ok(()) };
            (w, s, new_prealloc)
        });
        crate::metrics::dictionary_write(started);
        st.syncing = false;
        st.preallocated = new_prealloc;
        match (write_res, sync_res) {
            (Ok(()), Ok(())) => {
                st.written += buf.len() as u64;
                st.durable_seq = upto;
                st.batch_error = None;
            }
            (Err(e), _) => {
                // Cut the partial write off so the log stays a clean sequence of records,
                // and keep the records queued: they are already applied in memory.
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                if sys::ftruncate(st.file.as_fd(), off).is_ok() {
                    let newer = std::mem::take(&mut st.pending);
                    st.pending = buf;
                    st.pending.extend_from_slice(&newer);
                    st.batch_error = Some((upto, errno));
                    tracing::warn!(error = %e, "dictionary log append failed; will retry");
                } else {
                    st.failed = Some(format!("append to {}: {e}", self.log_path(st.gen).display()));
                    tracing::error!(error = %e, "dictionary log append failed and could not be undone");
                }
            }
            (Ok(()), Err(e)) => {
                // After a failed fdatasync the kernel may have dropped the data: nothing
                // written since the last good sync can be trusted (fsyncgate).
                st.failed = Some(format!("fdatasync {}: {e}", self.log_path(st.gen).display()));
                tracing::error!(error = %e, "dictionary log fdatasync failed; dictionary is now read-only");
            }
        }
        self.log_cv.notify_all();
    }

    /// Whether the log failed for good (nothing more will be written).
    pub fn is_failed(&self) -> bool {
        self.log.lock().failed.is_some()
    }

    /// Records queued but not yet written.
    pub fn has_pending(&self) -> bool {
        !self.log.lock().pending.is_empty()
    }

    /// Total bytes of the metadata files on disk.
    pub fn disk_size(&self) -> u64 {
        self.dir.files_size()
    }
}

#[cfg(test)]
mod tests;
