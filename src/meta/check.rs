//! Offline consistency check of a backing directory against its dictionaries (`tdefs check`).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::crypto::Method;
use crate::dictionary::{FileEntry, Loaded};

use super::{is_hidden_name, Offline, STAGING_PREFIX};

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    pub entries: usize,
    /// Regular files with an entry, by method.
    pub encrypted: BTreeMap<Method, usize>,
    /// Regular files without an entry (tracked as plaintext).
    pub plaintext_files: Vec<Vec<u8>>,
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
        self.stale.len() + self.missing_keys.len() + self.link_mismatches.len()
    }
}

/// Compare the dictionary with the files in the backing directory.
pub fn check(off: &Offline, loaded: &Loaded) -> std::io::Result<CheckReport> {
    let mut files: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
    walk(&off.backing, b"", true, &mut files)?;
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
                if e.key_id != 0 && off.keys.get(e.key_id).is_none() {
                    r.missing_keys.push((path.to_vec(), e.key_id));
                }
            }
        }
    });
    let mut paths: Vec<_> = files.iter().collect();
    paths.sort();
    for (path, &(ino, nlink)) in paths {
        let entry = loaded.tree.get(path);
        if entry.is_none() {
            r.plaintext_files.push(path.clone());
        }
        if nlink > 1 {
            match by_inode.get(&(ino, nlink)) {
                Some((other, e)) if *e != entry => r.link_mismatches.push((other.clone(), path.clone())),
                Some(_) => {}
                None => {
                    by_inode.insert((ino, nlink), (path.clone(), entry));
                }
            }
        }
    }
    Ok(r)
}

/// Regular files below `dir` as dictionary paths ("/a/b") -> (inode, link count).
fn walk(dir: &Path, prefix: &[u8], root: bool, out: &mut HashMap<Vec<u8>, (u64, u64)>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name: OsString = e.file_name();
        if root && is_hidden_name(&name) {
            continue;
        }
        let mut path = prefix.to_vec();
        path.push(b'/');
        path.extend_from_slice(name.as_bytes());
        let md = e.metadata()?; // does not follow symlinks
        if md.is_dir() {
            walk(&e.path(), &path, false, out)?;
        } else if md.is_file() {
            out.insert(path, (md.ino(), md.nlink()));
        }
    }
    Ok(())
}
