//! What `tdefs status` reports, gathered the same way from a running mount (through the
//! control socket) and from an unmounted backing directory. Never key material.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{is_hidden_name, META_DIR, PROGRESS_FILE, STAGING_DIR};
use crate::crypto::Method;
use crate::dictionary::{FileDict, FileEntry, Tree, SNAPSHOT_FILE};
use crate::keys::KeyStore;

/// What status reads from the file dictionary: an offline tree, or a live dictionary whose
/// lock is taken per lookup (never for a whole walk of the backing tree, which would stall
/// every create and lookup of the mount behind it).
pub trait DictView {
    fn entry(&self, path: &[u8]) -> Option<FileEntry>;
    fn files_by_method(&self) -> BTreeMap<String, u64>;
}

impl DictView for Tree {
    fn entry(&self, path: &[u8]) -> Option<FileEntry> {
        self.get(path)
    }
    fn files_by_method(&self) -> BTreeMap<String, u64> {
        files_by_method(self)
    }
}

impl DictView for FileDict {
    fn entry(&self, path: &[u8]) -> Option<FileEntry> {
        self.get(path)
    }
    fn files_by_method(&self) -> BTreeMap<String, u64> {
        self.with_tree(files_by_method)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub backing: String,
    pub initialized: bool,
    pub mounted: bool,
    /// Method the configuration (or the running mount) uses for new files.
    pub method_for_new_files: String,
    /// Type of the master key the metadata is wrapped with (`file`, `kms`, `plaintext`).
    pub master_key: Option<String>,
    pub data_keys: usize,
    pub current_key: Option<CurrentKey>,
    /// Files with a dictionary entry, per method.
    pub files_by_method: BTreeMap<String, u64>,
    /// Bytes (file sizes) per method of the files' records.
    #[serde(default)]
    pub bytes_by_method: BTreeMap<String, u64>,
    /// Regular files recorded as plaintext (stored as plaintext).
    pub plaintext_files: u64,
    /// Non-empty regular files without a record (refused by the mount; `tdefs check`
    /// lists them).
    #[serde(default)]
    pub unrecorded_files: u64,
    /// Bytes (file sizes) stored encrypted and stored as plaintext.
    #[serde(default)]
    pub encrypted_bytes: u64,
    #[serde(default)]
    pub plaintext_bytes: u64,
    /// A `tdefs encrypt`/`decrypt` that is running or was interrupted.
    #[serde(default)]
    pub conversion: Option<Conversion>,
    pub dictionary_bytes: u64,
    /// When the file dictionary was last compacted into a snapshot (RFC 3339).
    pub last_compaction: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CurrentKey {
    pub id: String,
    pub method: String,
    /// Creation of the current data key: the last rotation (RFC 3339).
    pub created: String,
    pub age_seconds: u64,
}

/// Progress of `tdefs encrypt` or `tdefs decrypt` (the converter writes it to
/// `.tdefs.convert/progress.json` as it goes), or of the online conversion of a running
/// mount (`tdefs convert`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Conversion {
    /// `encrypt`, `decrypt`, or `online`.
    pub operation: String,
    /// Offline: `running`, or `interrupted` (the converter is gone: run the same command
    /// again). Online: `running`, `paused`, `cancelling` (finishing the file in progress),
    /// `waiting` (retrying after an error).
    pub state: String,
    pub pid: u32,
    pub started: String,
    pub files_total: u64,
    pub files_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub percent_complete: f64,
    pub bytes_per_second: u64,
    pub eta_seconds: Option<u64>,
    /// Online: the method files are converted to.
    #[serde(default)]
    pub target_method: Option<String>,
    /// Online: the file being converted.
    #[serde(default)]
    pub current_file: Option<String>,
    /// Online: files left as they were (the log says why).
    #[serde(default)]
    pub files_skipped: u64,
    /// Online: the throttle (bytes per second, 0 for none; percent of the time a file's
    /// lock may be held).
    #[serde(default)]
    pub rate_limit: u64,
    #[serde(default)]
    pub io_share: u8,
    /// Online: the last error, if the converter is waiting to retry.
    #[serde(default)]
    pub last_error: Option<String>,
}

/// The staged progress file of `backing`, with its state decided by whether its writer is
/// still alive. `None` when no conversion ran or it finished.
pub fn read_progress(backing: &Path) -> Option<Status> {
    let bytes = std::fs::read(backing.join(STAGING_DIR).join(PROGRESS_FILE)).ok()?;
    let mut st: Status = serde_json::from_slice(&bytes).ok()?;
    if let Some(c) = &mut st.conversion {
        c.state = if process_alive(c.pid) { "running".into() } else { "interrupted".into() };
    }
    Some(st)
}

fn process_alive(pid: u32) -> bool {
    // A pid reused by another program would read as running; the converter's comm is "tdefs".
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim_end() == "tdefs")
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Files with a dictionary entry, per method name (kept counted by the tree: no walk).
pub fn files_by_method(tree: &Tree) -> BTreeMap<String, u64> {
    tree.by_method().iter().map(|(m, n)| (m.to_string(), *n)).collect()
}

/// Bytes of every metadata file in `meta_dir` (key and file dictionaries).
pub fn dictionary_bytes(meta_dir: &Path) -> u64 {
    std::fs::read_dir(meta_dir)
        .map(|d| d.flatten().filter_map(|e| e.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum())
        .unwrap_or(0)
}

/// Status of an initialized backing directory.
pub fn collect(backing: &Path, keys: &KeyStore, dict: &dyn DictView, method: Method, mounted: bool) -> Status {
    let now = SystemTime::now();
    let meta_dir = backing.join(META_DIR);
    let dictionary_bytes = dictionary_bytes(&meta_dir);
    let last_compaction = std::fs::metadata(meta_dir.join(SNAPSHOT_FILE)).and_then(|m| m.modified()).ok().map(rfc3339);
    let current_key = keys.current().map(|k| CurrentKey {
        id: format!("{:#018x}", k.id),
        method: k.method.to_string(),
        created: rfc3339(UNIX_EPOCH + Duration::from_secs(k.created)),
        age_seconds: k.age(now).as_secs(),
    });
    Status {
        backing: backing.display().to_string(),
        initialized: true,
        mounted,
        method_for_new_files: method.to_string(),
        master_key: Some(keys.backend_kind()),
        data_keys: keys.keys().len(),
        current_key,
        files_by_method: dict.files_by_method(),
        bytes_by_method: BTreeMap::new(),
        plaintext_files: 0,
        unrecorded_files: 0,
        encrypted_bytes: 0,
        plaintext_bytes: 0,
        conversion: read_progress(backing).and_then(|s| s.conversion),
        dictionary_bytes,
        last_compaction,
    }
    .with_file_counts(backing, dict)
}

/// Status of a backing directory without tdefs metadata.
pub fn uninitialized(backing: &Path, method: Method) -> Status {
    Status {
        backing: backing.display().to_string(),
        initialized: false,
        mounted: false,
        method_for_new_files: method.to_string(),
        master_key: None,
        data_keys: 0,
        current_key: None,
        files_by_method: BTreeMap::new(),
        bytes_by_method: BTreeMap::new(),
        plaintext_files: 0,
        unrecorded_files: 0,
        encrypted_bytes: 0,
        plaintext_bytes: 0,
        conversion: None,
        dictionary_bytes: 0,
        last_compaction: None,
    }
    .with_file_counts(backing, &Tree::default())
    .all_plaintext()
}

impl Status {
    fn with_file_counts(mut self, backing: &Path, dict: &dyn DictView) -> Status {
        let c = count_files(backing, dict);
        self.plaintext_files = c.plaintext_files;
        self.unrecorded_files = c.unrecorded_files;
        self.plaintext_bytes = c.plaintext_bytes;
        self.encrypted_bytes = c.encrypted_bytes;
        self.bytes_by_method = c.bytes_by_method;
        self
    }

    /// Before initialisation nothing was ever encrypted: every file is plaintext.
    fn all_plaintext(mut self) -> Status {
        self.plaintext_files += std::mem::take(&mut self.unrecorded_files);
        self
    }

    /// Share of file bytes stored encrypted, in percent (100 for no data at all).
    pub fn percent_encrypted(&self) -> f64 {
        let total = self.encrypted_bytes + self.plaintext_bytes;
        if total == 0 {
            100.0
        } else {
            self.encrypted_bytes as f64 * 100.0 / total as f64
        }
    }
}

#[derive(Default)]
struct FileCounts {
    bytes_by_method: BTreeMap<String, u64>,
    plaintext_files: u64,
    unrecorded_files: u64,
    plaintext_bytes: u64,
    encrypted_bytes: u64,
}

/// Regular files under `backing` (outside the metadata), by what the dictionary says of
/// them. Files without a record count as plaintext bytes (they are not known encrypted).
fn count_files(backing: &Path, dict: &dyn DictView) -> FileCounts {
    let mut n = FileCounts::default();
    let Ok(root) = std::fs::File::open(backing) else { return n };
    let _ = crate::walk::walk(std::os::fd::AsFd::as_fd(&root), is_hidden_name, |e| {
        if e.is_file() {
            crate::hooks::point("status:walking");
            let size = e.stat.st_size as u64;
            match dict.entry(e.path) {
                None if size > 0 => {
                    n.unrecorded_files += 1;
                    n.plaintext_bytes += size;
                }
                None => {}
                Some(en) if en.method.is_plaintext() => {
                    n.plaintext_files += 1;
                    n.plaintext_bytes += size;
                    *n.bytes_by_method.entry(en.method.to_string()).or_default() += size;
                }
                Some(en) => {
                    n.encrypted_bytes += size;
                    *n.bytes_by_method.entry(en.method.to_string()).or_default() += size;
                }
            }
        }
        Ok::<(), std::io::Error>(())
    });
    n
}

