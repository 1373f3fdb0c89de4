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
//! Rollback: the key dictionary keeps the dictionary's mark (`DictMark`: newest generation,
//! last record known durable, clean close), written through a [`MarkStore`] when a writer
//! opens, at every compaction, at checkpoints and at a clean close. `load` refuses a set of
//! files that ends before the mark.

mod log;
mod record;
mod snapshot;
mod tree;

use std::fs::File;
use crate::sys::Dir;
use std::os::fd::AsFd;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

pub use self::log::{log_file_name, LOG_HEADER_LEN};
pub use self::record::{valid_path, FileEntry, Intent, Record};
pub use self::snapshot::{SnapshotInfo, SNAPSHOT_FILE};
pub use self::tree::Tree;

use crate::crypto::{SealKey, SealKeys};
pub use crate::codec::DictMark;
use crate::codec::HeaderError;
use crate::sys;
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

#[derive(Debug, thiserror::Error)]
pub enum DictError {
    #[error(transparent)]
    Io(#[from] crate::error::IoError),

    #[error("{path} ({what}) is damaged at byte {offset}: {reason}. Nothing was modified. {}", repair_hint(.what))]
    Damaged { path: PathBuf, what: &'static str, offset: u64, reason: String },

    #[error("{path}: {err}. Nothing was modified. {}", header_hint(.err))]
    Header { path: PathBuf, err: HeaderError },

    #[error("{path} belongs to another tdefs instance (it was not written with this key dictionary); \
             was a .tdefs directory assembled from different backups?")]
    Foreign { path: PathBuf },

    #[error("the file dictionary in {dir} is incomplete: {what}. Nothing was modified; restore the \
             .tdefs directory from a backup")]
    Missing { dir: PathBuf, what: String },

    #[error("the file dictionary is read-only after an earlier write failure ({0}); unmount, fix the \
             disk, and mount again (the dictionary recovers to its last durable record)")]
    Failed(String),

    #[error("no space left on the backing filesystem for the dictionary log")]
    NoSpace,

    #[error("internal inconsistency in the file dictionary: {0}")]
    Inconsistent(String),

    #[error("the file dictionary in {dir} is older than the key dictionary records: {what}. The .tdefs \
             directory was partly restored from an older backup, a log file was deleted, or a log was cut. \
             Nothing was modified. Restore the whole .tdefs directory from one backup, the one that matches \
             the data; `tdefs check --repair` accepts the dictionary as it is and lists every file that then \
             has no record (those are refused, never read or written as plaintext)")]
    RolledBack { dir: PathBuf, what: String },

    #[error("cannot record the file dictionary's position in the key dictionary: {0}")]
    Mark(String),
}

fn repair_hint(what: &str) -> &'static str {
    if what == LOG_WHAT {
        "Restore the .tdefs directory from a backup, or run `tdefs check --repair` to keep every \
         record before the damage (a copy of the damaged log is kept; files created or renamed after \
         that point may read as noise)"
    } else {
        "Restore the .tdefs directory from a backup"
    }
}

fn header_hint(e: &HeaderError) -> &'static str {
    match e {
        HeaderError::NewerVersion(_) => "",
        _ => "The file is damaged or not tdefs' own: restore the .tdefs directory from a backup",
    }
}

const LOG_WHAT: &str = "file dictionary log";

impl DictError {
    /// errno for a FUSE reply.
    pub fn errno(&self) -> i32 {
        match self {
            DictError::NoSpace => libc::ENOSPC,
            DictError::Io(e) => e.errno(),
            _ => libc::EIO,
        }
    }
}

/// What `load` found; nothing on disk has been changed yet.
pub struct Loaded {
    dir: Arc<Dir>,
    pub tree: Tree,
    pub snapshot: SnapshotInfo,
    /// Log generations replayed, oldest first.
    pub log_gens: Vec<u64>,
    /// Records replayed from the logs.
    pub records: u64,
    next_seq: u64,
    last_valid_len: u64,
    /// Why the last log ends in a torn record, if it does (cut off by `open_writable`).
    pub torn_tail: Option<(u64, &'static str)>,
    /// Paths written by the replayed records: the only entries a crash can have left stale.
    pub touched: Vec<Vec<u8>>,
    stale_logs: Vec<String>,
    /// Format version of the newest log (appends continue in it).
    log_version: u16,
    /// Records in the newest log.
    newest_records: u64,
    /// The oldest format among the files read (1: upgrade due).
    pub format: u16,
}

impl Loaded {
    /// Sequence number of the last record.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The newest log generation.
    pub fn generation(&self) -> u64 {
        *self.log_gens.last().expect("load guarantees one log")
    }

    /// Refuse a set of files that ends before `mark` (see the module doc).
    pub fn check_mark(&self, mark: DictMark) -> Result<(), DictError> {
        let (newest, last) = (self.generation(), self.last_seq());
        let refuse = |what: String| Err(DictError::RolledBack { dir: self.dir.path().to_path_buf(), what });
        if newest < mark.gen {
            return refuse(format!("log generation {} is missing (the newest present is {newest})", mark.gen));
        }
        // Compaction creates the next log before it records the new generation, so an
        // empty log one generation ahead is an interrupted compaction; anything more means
        // the key dictionary is the older one.
        if newest > mark.gen && (newest > mark.gen + 1 || self.newest_records > 0) {
            return refuse(format!(
                "log generation {newest} is newer than the generation {} the key dictionary knows (was the key \
                 dictionary restored from an older backup?)",
                mark.gen
            ));
        }
        if last < mark.seq {
            return refuse(format!("the log ends at record {last}, but records up to {} were written", mark.seq));
        }
        if mark.clean && last > mark.seq {
            return refuse(format!(
                "the log holds records up to {last} after a clean close at record {} (was the key dictionary \
                 restored from an older backup?)",
                mark.seq
            ));
        }
        Ok(())
    }
}

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
    /// Create a dictionary in `dir` holding `initial` (durably): generation 1, mark
    /// `DictMark { gen: 1, seq: 0, clean: true }` for the caller to store.
    pub fn create(dir: &Dir, keys: &SealKeys, instance: &[u8; 16], initial: &Tree) -> Result<(), DictError> {
        let info = SnapshotInfo { covers_gen: 0, last_seq: 0 };
        let snap = snapshot::encode(initial, keys, instance, info);
        dir.write_durably(SNAPSHOT_FILE, &snap).map_err(io_err("write", &dir.join(SNAPSHOT_FILE)))?;
        let name = log_file_name(1);
        Ok(dir.write_durably(&name, &log::encode_header(1, instance)).map_err(io_err("write", &dir.join(&name)))?)
    }

    /// Read the snapshot and replay the logs, and check them against `mark` (none: a
    /// format 1 key dictionary, which kept no mark). Changes nothing on disk.
    pub fn load(dir: &Arc<Dir>, keys: &SealKeys, instance: &[u8; 16], mark: Option<DictMark>) -> Result<Loaded, DictError> {
        let started = Instant::now();
        let loaded = Self::replay(dir, keys, instance, None)?;
        if let Some(m) = mark {
            loaded.check_mark(m)?;
        }
        crate::metrics::dictionary_loaded(started.elapsed());
        Ok(loaded)
    }

    /// The snapshot plus the logs after it, up to generation `upto` (all of them: `None`).
    fn replay(dir: &Arc<Dir>, keys: &SealKeys, instance: &[u8; 16], upto: Option<u64>) -> Result<Loaded, DictError> {
        let snap_path = dir.join(SNAPSHOT_FILE);
        let f = dir.open(SNAPSHOT_FILE, libc::O_RDONLY).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => DictError::Missing { dir: dir.path().into(), what: format!("{SNAPSHOT_FILE} is missing") },
            _ => IoError::new("open", snap_path.clone(), e).into(),
        })?;
        let (mut tree, info, mut format) = snapshot::decode(&mut io::BufReader::with_capacity(1 << 20, f), keys, instance)
            .map_err(|e| match e {
                snapshot::SnapError::Header(err) => DictError::Header { path: snap_path.clone(), err },
                snapshot::SnapError::Damaged { offset, reason } => {
                    DictError::Damaged { path: snap_path.clone(), what: "file dictionary snapshot", offset, reason }
                }
                snapshot::SnapError::ForeignInstance => DictError::Foreign { path: snap_path.clone() },
                snapshot::SnapError::Io(err) => IoError::new("read", snap_path.clone(), err).into(),
            })?;

        let mut gens = Vec::new();
        for name in dir.list().map_err(io_err("list", dir.path()))? {
            if let Some(g) = name.to_str().and_then(log::parse_log_file_name) {
                gens.push(g);
            }
        }
        gens.sort_unstable();
        let stale_logs = gens.iter().filter(|&&g| g <= info.covers_gen).map(|&g| log_file_name(g)).collect();
        gens.retain(|&g| g > info.covers_gen && upto.is_none_or(|u| g <= u));
        if gens.is_empty() {
            return Err(DictError::Missing {
                dir: dir.path().into(),
                what: format!("no log after generation {} (the snapshot's)", info.covers_gen),
            });
        }
        for (i, g) in gens.iter().enumerate() {
            if *g != info.covers_gen + 1 + i as u64 {
                return Err(DictError::Missing {
                    dir: dir.path().into(),
                    what: format!("log generation {} is missing", info.covers_gen + 1 + i as u64),
                });
            }
        }

        let mut next_seq = info.last_seq + 1;
        let (mut records, mut touched, mut torn_tail, mut last_valid_len) = (0, Vec::new(), None, 0);
        let (mut log_version, mut newest_records) = (crate::codec::FORMAT_VERSION, 0);
        for (i, &gen) in gens.iter().enumerate() {
            let path = dir.join(&log_file_name(gen));
            let bytes = dir.read(&log_file_name(gen)).map_err(io_err("read", &path))?;
            let version = log::check_log_header(&bytes, gen, instance).map_err(|p| match p {
                log::HeaderProblem::Format(err) => DictError::Header { path: path.clone(), err },
                log::HeaderProblem::Instance => DictError::Foreign { path: path.clone() },
                log::HeaderProblem::Checksum => DictError::Damaged {
                    path: path.clone(),
                    what: LOG_WHAT,
                    offset: 0,
                    reason: "header checksum mismatch".into(),
                },
                log::HeaderProblem::Generation(g) => DictError::Damaged {
                    path: path.clone(),
                    what: LOG_WHAT,
                    offset: 0,
                    reason: format!("header says generation {g}"),
                },
            })?;
            format = format.min(version);
            // Only the live log may end in a torn record: a log that compaction will read
            // (`upto`) was closed whole.
            let is_last = i + 1 == gens.len() && upto.is_none();
            let seal = log::log_seal(keys, gen, version);
            let c = log::read_log(&bytes, &seal, instance, gen, version, next_seq, is_last).map_err(|d| DictError::Damaged {
                path: path.clone(),
                what: LOG_WHAT,
                offset: d.offset,
                reason: d.reason,
            })?;
            for (seq, rec) in &c.records {
                tree.apply(*seq, rec).map_err(|e| DictError::Damaged {
                    path: path.clone(),
                    what: LOG_WHAT,
                    offset: 0,
                    reason: format!("record {seq}: {}", e.0),
                })?;
                if let Record::Put { path, .. } = rec {
                    touched.push(path.clone());
                }
            }
            records += c.records.len() as u64;
            next_seq += c.records.len() as u64;
            if i + 1 == gens.len() {
                last_valid_len = c.valid_len;
                torn_tail = c.torn.map(|why| ((bytes.len() as u64 - c.valid_len), why));
                log_version = version;
                newest_records = c.records.len() as u64;
            }
        }
        Ok(Loaded {
            dir: dir.clone(),
            tree,
            snapshot: info,
            log_gens: gens,
            records,
            next_seq,
            last_valid_len,
            torn_tail,
            touched,
            stale_logs,
            log_version,
            newest_records,
            format,
        })
    }

    /// Cut a damaged log before its damage so the dictionary loads again, keeping a copy of
    /// every file changed (`<name>.damaged`). Later log generations are set aside the same
    /// way. Returns the files set aside.
    pub fn salvage(dir: &Dir, err: &DictError) -> Result<Vec<PathBuf>, DictError> {
        let DictError::Damaged { path, what, offset, .. } = err else {
            return Ok(Vec::new());
        };
        if *what != LOG_WHAT {
            return Ok(Vec::new());
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else { return Ok(Vec::new()) };
        let gen = log::parse_log_file_name(&name).unwrap_or(0);
        let mut kept = Vec::new();
        // Each copy is made durable before the log is cut or removed: the copy is what
        // keeps the records after the damage.
        let aside = |name: &str, kept: &mut Vec<PathBuf>| -> Result<(), DictError> {
            use std::io::Write;
            let copy = format!("{name}.damaged");
            let bytes = dir.read(name).map_err(io_err("read", &dir.join(name)))?;
            dir.remove_if_exists(&copy).map_err(io_err("remove", &dir.join(&copy)))?;
            let mut f = dir.create_new(&copy).map_err(io_err("create", &dir.join(&copy)))?;
            f.write_all(&bytes).and_then(|()| f.sync_all()).map_err(io_err("write", &dir.join(&copy)))?;
            dir.sync().map_err(io_err("fsync", dir.path()))?;
            kept.push(dir.join(&copy));
            Ok(())
        };
        aside(&name, &mut kept)?;
        let cut = (*offset).max(LOG_HEADER_LEN as u64);
        let f = dir.open(&name, libc::O_RDWR).map_err(io_err("open", path))?;
        sys::ftruncate(f.as_fd(), cut).map_err(io_err("truncate", path))?;
        sys::fsync(f.as_fd()).map_err(io_err("fsync", path))?;
        let mut g = gen + 1;
        loop {
            let later = log_file_name(g);
            if dir.open(&later, libc::O_RDONLY).is_err() {
                break;
            }
            aside(&later, &mut kept)?;
            dir.remove(&later).map_err(io_err("remove", &dir.join(&later)))?;
            g += 1;
        }
        dir.sync().map_err(io_err("fsync", dir.path()))?;
        Ok(kept)
    }

    /// Turn a loaded dictionary into a writable one: store a mark that says a writer has
    /// it open (before anything changes, so a crash from here on is never taken for a
    /// rollback), cut a torn tail off the last log and remove leftovers of an interrupted
    /// compaction.
    pub fn open_writable(
        loaded: Loaded,
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

    /// Whether enough records accumulated since the last snapshot to compact.
    pub fn compaction_due(&self) -> bool {
        self.log.lock().records_since_snapshot >= self.rewrite_threshold.min(MAX_RECORDS_PER_GENERATION)
    }

    /// Records queued but not yet written.
    pub fn has_pending(&self) -> bool {
        !self.log.lock().pending.is_empty()
    }

    pub fn last_compaction(&self) -> Option<Instant> {
        *self.last_compaction.lock()
    }

    /// Start a new log generation, write a snapshot covering the older ones, delete them.
    ///
    /// The snapshot is rebuilt from the files of the generations it covers (immutable once
    /// the new generation has started), not from the live tree: creates, lookups and
    /// renames never wait for it, however large the dictionary. It costs a second copy of
    /// the tree in memory while it runs.
    pub fn compact(&self) -> Result<(), DictError> {
        let _one = self.compact_lock.lock();
        let mut st = self.log.lock();
        // Everything queued goes into the old generation first.
        loop {
            if let Some(f) = &st.failed {
                return Err(DictError::Failed(f.clone()));
            }
            if st.syncing {
                self.log_cv.wait(&mut st);
            } else if !st.pending.is_empty() || st.durable_seq < st.next_seq - 1 {
                self.write_pending(&mut st);
                if st.batch_error.is_some() {
                    return Err(DictError::NoSpace);
                }
            } else {
                break;
            }
        }
        let info = SnapshotInfo { covers_gen: st.gen, last_seq: st.next_seq - 1 };
        let new_gen = st.gen + 1;
        let name = log_file_name(new_gen);
        let new_path = self.dir.join(&name);
        self.dir.write_durably(&name, &log::encode_header(new_gen, &self.instance)).map_err(io_err("create", &new_path))?;
        let file = self.dir.open(&name, libc::O_RDWR).map_err(io_err("open", &new_path))?;
        // The key dictionary learns the new generation before any record goes into it.
        self.store_mark(DictMark { gen: new_gen, seq: info.last_seq, clean: false })?;
        st.file = Arc::new(file);
        st.gen = new_gen;
        st.version = crate::codec::FORMAT_VERSION;
        st.seal = self.keys.log(new_gen);
        st.written = LOG_HEADER_LEN as u64;
        st.preallocated = 0;
        st.records_since_snapshot = 0;
        drop(st);
        crate::hooks::point("compact:building");
        let old = Self::replay(&self.dir, &self.keys, &self.instance, Some(info.covers_gen))?;
        if old.last_seq() != info.last_seq {
            return Err(DictError::Inconsistent(format!(
                "the logs up to generation {} end at record {}, expected {}",
                info.covers_gen,
                old.last_seq(),
                info.last_seq
            )));
        }
        let bytes = snapshot::encode(&old.tree, &self.keys, &self.instance, info);
        drop(old);
        let snap_path = self.dir.join(SNAPSHOT_FILE);
        self.dir.write_durably(SNAPSHOT_FILE, &bytes).map_err(io_err("write", &snap_path))?;
        for g in 1..=info.covers_gen {
            self.dir.remove_if_exists(&log_file_name(g)).map_err(io_err("remove", &self.log_path(g)))?;
        }
        self.dir.sync().map_err(io_err("fsync", self.dir.path()))?;
        *self.last_compaction.lock() = Some(Instant::now());
        crate::metrics::dictionary_compacted();
        tracing::info!(entries = self.tree.read().len(), generation = new_gen, "file dictionary compacted");
        Ok(())
    }

    /// Total bytes of the metadata files on disk.
    pub fn disk_size(&self) -> u64 {
        self.dir.files_size()
    }
}

#[cfg(test)]
mod tests;
