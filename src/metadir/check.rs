//! Offline consistency check of a backing directory against its dictionaries (`tdefs check`).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsFd;

use crate::crypto::Method;
use crate::dictionary::{FileEntry, LoadedDictionary};

use super::{is_hidden_name, LockedMetadata, STAGING_PREFIX};

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub entries: usize,
    /// Regular files with a record, by method (plaintext included).
    pub encrypted: BTreeMap<Method, usize>,
    /// Regular files recorded as plaintext (adopted with --init, or written under the
    /// plaintext method).
    pub plaintext_files: Vec<Vec<u8>>,
    /// Non-empty regular files without a record: the mount refuses them (their bytes may be
    /// ciphertext whose record was lost).
    pub unrecorded: Vec<Vec<u8>>,
    /// Empty regular files without a record: harmless (recorded when next opened).
    pub unrecorded_empty: usize,
    /// Entries whose file is gone or is not a regular file.
    pub stale: Vec<Vec<u8>>,
    /// Entries naming a data key the key dictionary does not hold: those files are
    /// unreadable.
    pub missing_keys: Vec<(Vec<u8>, u64)>,
    /// Hard links of one file whose entries disagree: some name reads as noise.
    pub link_mismatches: Vec<(Vec<u8>, Vec<u8>)>,
    /// Renames announced but not concluded (settled at the next mount).
    pub pending_renames: usize,
    /// Staged copies of an interrupted `tdefs encrypt` (dropped at the next open; the
    /// originals are intact).
    pub staged_copies: usize,
    /// Bytes of a torn record at the end of the log (cut at the next mount).
    pub torn_tail: Option<u64>,
    pub data_keys: usize,
}

impl CheckReport {
    /// Problems that need attention (stale entries are harmless but reported).
    pub fn problems(&self) -> usize {
        self.stale.len() + self.missing_keys.len() + self.link_mismatches.len() + self.unrecorded.len()
    }
}

/// A regular file of the backing tree.
struct Found {
    ino: u64,
    nlink: u64,
    size: u64,
}

/// Compare the dictionary with the files in the backing directory.
pub fn check(off: &LockedMetadata, loaded: &LoadedDictionary) -> std::io::Result<CheckReport> {
    let mut files: HashMap<Vec<u8>, Found> = HashMap::new();
    let root = std::fs::File::open(&off.backing)?;
    crate::walk::walk(root.as_fd(), is_hidden_name, |e| {
        if e.is_file() {
            let st = e.stat;
            files.insert(e.path.to_vec(), Found { ino: st.st_ino, nlink: st.st_nlink, size: st.st_size as u64 });
        }
        Ok::<(), std::io::Error>(())
    })?;
    let mut r = CheckReport {
        entries: loaded.tree.len(),
        pending_renames: loaded.tree.intents().count(),
        torn_tail: loaded.torn_tail.map(|t| t.0),
        data_keys: off.keys.keys().len(),
        ..Default::default()
    };
    let mut by_inode: HashMap<(u64, u64), (Vec<u8>, Option<FileEntry>)> = HashMap::new();
    loaded.tree.for_each(|path, e| {
        if path.starts_with(STAGING_PREFIX) {
            r.staged_copies += 1;
            return;
        }
        match files.get(path) {
            None => r.stale.push(path.to_vec()),
            Some(_) => {
                *r.encrypted.entry(e.method).or_default() += 1;
                if e.method.is_plaintext() {
                    r.plaintext_files.push(path.to_vec());
                } else if off.keys.get(e.key_id).is_none() {
                    r.missing_keys.push((path.to_vec(), e.key_id));
                }
            }
        }
    });
    r.plaintext_files.sort();
    let mut paths: Vec<_> = files.iter().collect();
    paths.sort_by(|a, b| a.0.cmp(b.0));
    for (path, f) in paths {
        let entry = loaded.tree.get(path);
        if entry.is_none() {
            if f.size > 0 {
                r.unrecorded.push(path.clone());
            } else {
                r.unrecorded_empty += 1;
            }
        }
        if f.nlink > 1 {
            match by_inode.get(&(f.ino, f.nlink)) {
                Some((other, e)) if *e != entry => r.link_mismatches.push((other.clone(), path.clone())),
                Some(_) => {}
                None => {
                    by_inode.insert((f.ino, f.nlink), (path.clone(), entry));
                }
            }
        }
    }
    Ok(r)
}
