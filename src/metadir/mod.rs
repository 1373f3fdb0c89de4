//! The `.tdefs` metadata directory in the backing root: opening with the configured master
//! key and exclusive use (here), first-time initialisation (`init.rs`), recovery after a
//! crash (`recover.rs`), `tdefs check` and `tdefs status` (`check.rs`, `status.rs`), the
//! online conversion's chunk journal (`journal.rs`).

pub mod check;
mod init;
pub mod journal;
pub mod owner;
mod recover;
pub mod status;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::MasterKeyConfig;
use crate::dictionary::{DictError, DictMark, FileDict, FileEntry, LoadedDictionary, MarkStore, Record, Tree};
use crate::keys::{backend_for, KeyError, KeyStore, MasterKeyBackend};
use crate::sys::{self, Dir};
use crate::error::{io_err, IoError};

use self::init::initialize;
use self::recover::recover;

/// Metadata directory, hidden and inaccessible through the mount.
pub const META_DIR: &str = ".tdefs";
/// Where a first initialisation is assembled before it is renamed into place.
const INIT_DIR: &str = ".tdefs.init";
/// Where `tdefs encrypt` writes the encrypted copy of a file before renaming it over the
/// original (same filesystem, so the rename is atomic), and its progress file.
pub const STAGING_DIR: &str = ".tdefs.convert";
/// Dictionary path prefix of staged copies.
pub const STAGING_PREFIX: &[u8] = b"/.tdefs.convert/";
/// Progress of a running (or interrupted) conversion, in the staging directory: what
/// `tdefs status` shows while the converter holds the lock.
pub const PROGRESS_FILE: &str = "progress.json";

/// How long opening a backing directory waits for a previous tdefs that is finishing its
/// unmount of it (`[mount] unmount-wait`), in milliseconds.
static UNMOUNT_WAIT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(30_000);

/// Set the wait above (the CLI does, from the config it loaded).
pub fn set_unmount_wait(wait: std::time::Duration) {
    UNMOUNT_WAIT_MS.store(wait.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
}

/// Names in the backing root that tdefs reserves.
pub fn is_hidden_name(name: &OsStr) -> bool {
    name == META_DIR || name == INIT_DIR || name == STAGING_DIR
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("backing directory {path}: {problem}")]
    Backing { path: PathBuf, problem: String },

    #[error(
        "backing directory {path} already holds files ({count} entries, e.g. {example:?}) but no tdefs \
         metadata. To adopt them (they stay readable, tracked as plaintext; new files are encrypted) \
         mount once with --init. If this directory held tdefs-encrypted files, its {META_DIR} directory \
         is missing: restore it from a backup instead"
    )]
    NotEmpty { path: PathBuf, count: usize, example: String },

    #[error("{path} is {who}")]
    Locked { path: PathBuf, who: String },

    #[error(transparent)]
    Key(#[from] KeyError),

    #[error(transparent)]
    Dict(#[from] DictError),

    #[error(transparent)]
    Io(#[from] crate::error::IoError),
}


/// What opening found and did, for the log.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    pub initialized: bool,
    pub adopted_entries: usize,
    pub entries: usize,
    pub records_replayed: u64,
    pub torn_tail_bytes: Option<u64>,
    pub renames_completed: usize,
    pub renames_dropped: usize,
    pub stale_entries_dropped: usize,
    /// Staged copies of an interrupted `tdefs encrypt` that were removed (their originals
    /// are intact and still plaintext).
    pub staged_copies_removed: usize,
    /// The chunk an online conversion was rewriting at a crash was put back from the
    /// journal.
    pub conversion_chunk_restored: bool,
    /// A format 1 backing directory was upgraded: this many files without a record (format
    /// 1's plaintext files) were recorded as plaintext.
    pub upgraded_plaintext: Option<usize>,
}

pub struct Metadata {
    backing: PathBuf,
    backing_fd: OwnedFd,
    /// The metadata directory, verified and held by descriptor (its flock is this
    /// process's claim on the backing directory).
    pub meta: Arc<Dir>,
    pub keys: Arc<KeyStore>,
    pub dict: Arc<FileDict>,
    pub report: OpenReport,
}

/// Options for opening.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Adopt a non-empty backing directory without metadata (`--init`).
    pub adopt: bool,
    pub rewrite_threshold: u64,
}

impl Metadata {
    pub fn backing(&self) -> &Path {
        &self.backing
    }

    /// Descriptor of the backing root.
    pub fn backing_fd(&self) -> BorrowedFd<'_> {
        self.backing_fd.as_fd()
    }

    /// Flush the file dictionary and record a clean close in the key dictionary (the next
    /// open then requires the log to end exactly here).
    pub fn close(&self) -> Result<(), DictError> {
        self.dict.close()
    }

    /// Open the metadata of `backing`, initialising it first if the directory is empty
    /// (or `adopt` is set). Every check that can fail (key file, master key, dictionary
    /// integrity) happens before anything on disk is changed.
    pub fn open_or_init(backing: &Path, master: &MasterKeys<'_>, opts: &OpenOptions) -> Result<Metadata, MetaError> {
        let (backing, backing_fd) = check_backing(backing)?;
        let mut report = OpenReport::default();
        match sys::fstatat(backing_fd.as_fd(), OsStr::new(META_DIR), libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
            Ok(_) => {
                return Err(MetaError::Backing {
                    path: backing,
                    problem: format!("{META_DIR} exists but is not a directory (a symlink, or a file); tdefs never follows it"),
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let backend = backend_for(master.current)?;
                report.adopted_entries = initialize(&backing, &backing_fd, backend.as_ref(), opts.adopt)?;
                report.initialized = true;
            }
            Err(e) => return Err(io_err("stat", &backing.join(META_DIR))(e).into()),
        }
        let off = LockedMetadata::open_existing(backing, backing_fd, master, true)?;
        let loaded = off.load()?;
        off.into_metadata(loaded, opts, report)
    }
}

/// Metadata opened for inspection: locked against a concurrent mount, keys unwrapped,
/// nothing written.
pub struct LockedMetadata {
    pub backing: PathBuf,
    backing_fd: OwnedFd,
    pub meta: Arc<Dir>,
    pub keys: Arc<KeyStore>,
}

impl LockedMetadata {
    /// Open the existing metadata of `backing` (never initialises, never rewrites: with a
    /// previous master key it opens, but re-wrapping is left to the next mount).
    pub fn open(backing: &Path, master: &MasterKeys<'_>) -> Result<LockedMetadata, MetaError> {
        let (backing, backing_fd) = check_backing(backing)?;
        Self::open_existing(backing, backing_fd, master, false)
    }

    /// Like `open`, for commands that only read (dump, status, check): root may inspect
    /// metadata that another user's daemon owns. Nothing is written unless it is turned
    /// into `Metadata`, which checks the directory first.
    pub fn open_read_only(backing: &Path, master: &MasterKeys<'_>) -> Result<LockedMetadata, MetaError> {
        let (backing, backing_fd) = check_backing(backing)?;
        Self::open_dir(backing, backing_fd, master, false, false)
    }

    fn open_existing(backing: PathBuf, backing_fd: OwnedFd, master: &MasterKeys<'_>, rotate: bool) -> Result<LockedMetadata, MetaError> {
        Self::open_dir(backing, backing_fd, master, rotate, true)
    }

    fn open_dir(backing: PathBuf, backing_fd: OwnedFd, master: &MasterKeys<'_>, rotate: bool, write: bool) -> Result<LockedMetadata, MetaError> {
        let meta_path = backing.join(META_DIR);
        let open = if write { Dir::open_verified } else { Dir::open_nofollow };
        let meta = open(backing_fd.as_fd(), OsStr::new(META_DIR), &meta_path).map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT) => MetaError::Backing {
                path: backing.clone(),
                problem: format!("has no {META_DIR} directory (not a tdefs backing directory)"),
            },
            _ => MetaError::Backing { path: backing.clone(), problem: e.to_string() },
        })?;
        let patience = std::time::Duration::from_millis(UNMOUNT_WAIT_MS.load(std::sync::atomic::Ordering::Relaxed));
        if let Err(who) = owner::lock_or_wait(&meta, patience).map_err(io_err("lock", &meta_path))? {
            return Err(MetaError::Locked { path: backing.clone(), who });
        }
        let meta = Arc::new(meta);
        let keys = Arc::new(open_keys(&meta, master, rotate)?);
        Ok(LockedMetadata { backing, backing_fd, meta, keys })
    }

    /// Only a metadata directory that nobody else controls is written to.
    fn writable(&self) -> Result<(), MetaError> {
        self.meta.check_private().map_err(|e| MetaError::Backing { path: self.backing.clone(), problem: e.to_string() })
    }

    /// Read the file dictionary and check it against the mark the key dictionary keeps
    /// (changes nothing).
    pub fn load(&self) -> Result<LoadedDictionary, DictError> {
        FileDict::load(&self.meta, self.keys.seal_keys(), &self.keys.instance(), self.keys.dictionary_mark())
    }

    /// Read the file dictionary without checking it against the key dictionary's mark
    /// (`tdefs check --repair`, which then accepts it as it is).
    pub fn load_unchecked(&self) -> Result<LoadedDictionary, DictError> {
        FileDict::load(&self.meta, self.keys.seal_keys(), &self.keys.instance(), None)
    }

    /// Accept the file dictionary as loaded: make the key dictionary's mark match it.
    pub fn accept(&self, loaded: &LoadedDictionary) -> Result<(), MetaError> {
        self.writable()?;
        let mark = DictMark { gen: loaded.generation(), seq: loaded.last_seq(), clean: true };
        self.keys.set_dictionary_mark(mark)?;
        Ok(())
    }

    /// Recover what a crash left and make the dictionary writable.
    pub fn into_metadata(self, loaded: LoadedDictionary, opts: &OpenOptions, mut report: OpenReport) -> Result<Metadata, MetaError> {
        self.writable()?;
        // Only now, when it is going to write: a refused open changes nothing on disk.
        owner::Owner::me(owner::State::Open, None).publish(&self.meta);
        let dict = recover(loaded, &self.keys, opts, &self.backing, &self.backing_fd, &mut report)?;
        report.entries = dict.with_tree(|t| t.len());
        Ok(Metadata { backing: self.backing, backing_fd: self.backing_fd, meta: self.meta, keys: self.keys, dict: Arc::new(dict), report })
    }
}

/// The configured master key and, during a rotation, the previous one.
#[derive(Debug, Clone, Copy)]
pub struct MasterKeys<'a> {
    pub current: &'a MasterKeyConfig,
    pub previous: Option<&'a MasterKeyConfig>,
}

impl<'a> MasterKeys<'a> {
    pub fn from_config(enc: &'a crate::config::Encryption) -> MasterKeys<'a> {
        MasterKeys { current: &enc.master_key, previous: enc.previous_master_key.as_ref() }
    }
}

/// Open the key dictionary with the configured master key or, failing that, with the
/// previous one; `rotate` then re-wraps it under the configured key (durably: a crash at
/// any instant leaves it openable by one of the two).
fn open_keys(meta_dir: &Arc<Dir>, master: &MasterKeys<'_>, rotate: bool) -> Result<KeyStore, MetaError> {
    let backend = backend_for(master.current)?;
    match KeyStore::open(meta_dir, backend.as_ref()) {
        Ok(keys) => {
            if rotate {
                // Maintenance, not access: the key opened, so a refusal here (a policy
                // without rewrap, say) is reported and the mount goes on.
                if let Err(e) = keys.refresh(backend.as_ref()) {
                    tracing::warn!(
                        error = %e.brief(),
                        "could not move the dictionary key to the master key's newest version; it stays wrapped \
                         by the version that opened it, so do not retire that version yet"
                    );
                }
            }
            if master.previous.is_some() {
                tracing::info!(
                    "the key dictionary opens with master-key: the rotation is complete and \
                     previous-master-key can be removed from the config"
                );
            }
            Ok(keys)
        }
        // KMS counts too: Decrypt of another key's blob is IncorrectKey on AWS but
        // AccessDenied on some KMS-compatible services; the previous key then decides.
        Err(
            e @ (KeyError::WrongMasterKey { .. }
            | KeyError::BackendMismatch { .. }
            | KeyError::Kms { .. }
            | KeyError::Vault { .. }
            | KeyError::Kmip { .. }),
        ) => {
            let Some(prev) = master.previous else { return Err(e.into()) };
            let prev_backend = backend_for(prev)?;
            let keys = KeyStore::open(meta_dir, prev_backend.as_ref()).map_err(|e2| KeyError::NeitherKey {
                path: meta_dir.join(crate::keys::KEYS_FILE),
                new: e.to_string(),
                previous: e2.to_string(),
            })?;
            if rotate {
                keys.rewrap(backend.as_ref())?;
                tracing::warn!(
                    from = %prev_backend.describe(), to = %backend.describe(),
                    "master key rotated: the key dictionary is now wrapped by master-key; \
                     previous-master-key is no longer needed and can be removed from the config"
                );
            }
            Ok(keys)
        }
        Err(e) => Err(e.into()),
    }
}

/// Online master-key rotation: re-wrap the open key dictionary under `new` (durably; a
/// crash leaves it openable by the old or the new key). Returns a description of `new`.
pub fn rotate_master_key(keys: &KeyStore, new: &MasterKeyConfig) -> Result<String, MetaError> {
    let backend = backend_for(new)?;
    let from = keys.backend_kind();
    keys.rewrap(backend.as_ref())?;
    tracing::warn!(
        from = %from, to = %backend.describe(),
        "master key rotated online: the key dictionary is now wrapped by the new master key; \
         mount with it from now on (the old one is no longer needed)"
    );
    Ok(backend.describe())
}

/// The backing directory's canonical path and a descriptor of it. A backing root that
/// others may write to without the sticky bit is refused: any user could rename tdefs'
/// metadata directory away.
fn check_backing(backing: &Path) -> Result<(PathBuf, OwnedFd), MetaError> {
    let problem = |p: String| MetaError::Backing { path: backing.to_path_buf(), problem: p };
    let m = std::fs::metadata(backing).map_err(|e| problem(format!("cannot access it: {e}")))?;
    if !m.is_dir() {
        return Err(problem("is not a directory".into()));
    }
    let path = std::fs::canonicalize(backing).map_err(|e| problem(format!("cannot resolve it: {e}")))?;
    let fd: OwnedFd = File::open(&path).map_err(|e| problem(format!("cannot open it: {e}")))?.into();
    let st = sys::fstat(fd.as_fd()).map_err(|e| problem(format!("cannot stat it: {e}")))?;
    if st.st_mode & 0o022 != 0 && st.st_mode & libc::S_ISVTX == 0 {
        return Err(problem(format!(
            "is writable by group or others (mode {:04o}) without the sticky bit, so any of them could rename \
             tdefs' metadata away: `chmod go-w {}` (or add the sticky bit, `chmod +t`)",
            st.st_mode & 0o7777,
            path.display()
        )));
    }
    Ok((path, fd))
}
