//! Recovery at every writable open: settle what a crash left (renames announced but not
//! concluded, stale entries, staged copies of an interrupted `tdefs encrypt`) and upgrade
//! format 1 metadata.

use super::init::plaintext_records;
use super::journal::{Journal, JOURNAL_FILE};
use super::*;

/// The key dictionary keeps the file dictionary's mark.
struct KeyMarks(Arc<KeyStore>);

impl MarkStore for KeyMarks {
    fn store_mark(&self, mark: DictMark) -> Result<(), String> {
        self.0.set_dictionary_mark(mark).map_err(|e| e.to_string())
    }
}

/// Make the loaded dictionary writable and settle what a crash may have left: renames
/// announced but not concluded, entries of files that no longer exist.
pub(super) fn recover(
    loaded: LoadedDictionary,
    keys: &Arc<KeyStore>,
    opts: &OpenOptions,
    backing_path: &Path,
    backing: &OwnedFd,
    report: &mut OpenReport,
) -> Result<FileDict, MetaError> {
    report.records_replayed = loaded.records;
    report.torn_tail_bytes = loaded.torn_tail.map(|t| t.0);
    let intents: Vec<_> = loaded.tree.intents().cloned().collect();
    // After a crash, an entry the log never touched can be stale too: its file was
    // unlinked (or its creation undone by a power cut) under a directory renamed since, or
    // before a compaction, and the Delete record never became durable. So an unclean
    // shutdown checks every entry (one stat each, after the renames below settled where
    // each entry lives); a clean one only what the log wrote.
    let unclean = keys.dictionary_mark().is_some_and(|m| !m.clean);
    let touched: Vec<Vec<u8>> = if unclean {
        Vec::new() // every entry is listed below, once the renames settled
    } else {
        let unique: HashSet<&Vec<u8>> = loaded.touched.iter().collect();
        unique.into_iter().cloned().collect()
    };
    if unclean || !intents.is_empty() || !touched.is_empty() {
        // What a crash left in the page cache must be on disk before we reason about it.
        sys::syncfs(backing.as_fd()).map_err(io_err("syncfs", Path::new("backing directory")))?;
    }
    let format = loaded.format.min(keys.format());
    let marks: Arc<dyn MarkStore> = Arc::new(KeyMarks(keys.clone()));
    let dict = FileDict::open_writable(loaded, keys.seal_keys().clone(), &keys.instance(), opts.rewrite_threshold, marks)?;
    for i in intents {
        // Earlier outcomes may have moved this intent's paths: read them fresh.
        let Some(cur) = dict.pending_intents().into_iter().find(|p| p.seq == i.seq) else { continue };
        let happened = match lookup(backing, &cur.to)? {
            Some(st) => st.st_ino == cur.from_ino,
            None => false,
        };
        let rec = if happened { Record::RenameDone { intent: cur.seq } } else { Record::RenameAbort { intent: cur.seq } };
        dict.submit(rec)?;
        if happened {
            report.renames_completed += 1;
        } else {
            report.renames_dropped += 1;
        }
    }
    let touched: Vec<Vec<u8>> = if unclean {
        let mut all = Vec::new();
        dict.with_tree(|t| t.for_each(|p, _| all.push(p.to_vec())));
        all
    } else {
        touched
    };
    for path in touched {
        if dict.get(&path).is_none() {
            continue;
        }
        let regular = lookup(backing, &path)?.is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFREG);
        if !regular {
            dict.submit(Record::Delete { path })?;
            report.stale_entries_dropped += 1;
        }
    }
    report.conversion_chunk_restored = restore_conversion_chunk(&dict, &keys.instance(), backing)?;
    report.staged_copies_removed = remove_staged_copies(&dict, backing_path, backing)?;
    dict.flush()?;
    if format < 2 {
        report.upgraded_plaintext = Some(upgrade_format_1(&dict, backing_path)?);
    }
    Ok(dict)
}

/// Format 1 served a file without a record as plaintext. Record each such file as
/// plaintext (what format 1 made of it), then compact: the new snapshot and log are format
/// 2, and the key dictionary was rewritten as format 2 when the dictionary was opened.
fn upgrade_format_1(dict: &FileDict, backing: &Path) -> Result<usize, MetaError> {
    let adopted = dict.with_tree(|t| plaintext_records(backing, t))?;
    let mut n = 0;
    let mut paths = Vec::new();
    adopted.for_each(|p, _| paths.push(p.to_vec()));
    for path in paths {
        dict.submit(Record::Put { path, entry: FileEntry::plaintext() })?;
        n += 1;
    }
    dict.flush()?;
    dict.compact()?;
    tracing::warn!(
        plaintext_files = n,
        "upgraded the metadata from format 1 to format 2: every file that had no record (format 1 read \
         them as plaintext) is now recorded as plaintext; from now on a file without a record is refused"
    );
    Ok(n)
}

/// A crash while the online converter rewrote a chunk (after its journal record was durable,
/// before the watermark moved past it) leaves that chunk old, new or torn, block by block:
/// the journal's copy, its old bytes, goes back over it, which matches the watermark. Any
/// other journal record is stale (its chunk's watermark advance is durable) or was never
/// complete (its rewrite never began). Idempotent, so a crash in here only repeats it.
fn restore_conversion_chunk(dict: &FileDict, instance: &[u8; 16], backing: &OwnedFd) -> Result<bool, MetaError> {
    let convs = dict.conversions();
    let jpath = dict.dir().join(JOURNAL_FILE);
    let journal = match Journal::open(dict.dir(), *instance) {
        Ok(j) => j,
        Err(e) if convs.is_empty() => {
            tracing::warn!(error = %e, journal = %jpath.display(), "cannot open the conversion journal (no conversion is in progress)");
            return Ok(false);
        }
        Err(e) => return Err(io_err("open", &jpath)(e).into()),
    };
    let Some(chunk) = journal.read().map_err(io_err("read", &jpath))? else { return Ok(false) };
    let Some(c) = convs.iter().find(|c| c.id == chunk.id && c.mark == chunk.offset) else {
        journal.clear().map_err(io_err("clear", &jpath))?;
        return Ok(false);
    };
    let path = &c.paths[0];
    let shown = String::from_utf8_lossy(path).into_owned();
    let fd = sys::open_file_below(backing.as_fd(), path, libc::O_RDWR).map_err(|e| IoError::new("open", shown.clone(), e))?;
    sys::pwrite_all(fd.as_fd(), &chunk.bytes, chunk.offset).map_err(|e| IoError::new("restore a chunk of", shown.clone(), e))?;
    sys::fdatasync(fd.as_fd()).map_err(|e| IoError::new("fsync", shown.clone(), e))?;
    journal.clear().map_err(io_err("clear", &jpath))?;
    tracing::warn!(
        file = %shown, offset = chunk.offset, bytes = chunk.bytes.len(),
        "put back the chunk an online conversion was rewriting when it was interrupted; the conversion resumes from there"
    );
    Ok(true)
}

/// An interrupted `tdefs encrypt` leaves staged copies whose rename did not happen (the
/// renames that did were completed above). The originals are intact: drop the copies.
/// The entry goes first (durably), then the file: a crash in between leaves a file without
/// entry in the hidden staging directory, which the next open removes.
fn remove_staged_copies(dict: &FileDict, backing_path: &Path, backing: &OwnedFd) -> Result<usize, MetaError> {
    let mut staged = Vec::new();
    dict.with_tree(|t| t.for_each(|p, _| {
        if p.starts_with(STAGING_PREFIX) {
            staged.push(p.to_vec());
        }
    }));
    let dir_path = backing_path.join(STAGING_DIR);
    let dir = match Dir::open_verified(backing.as_fd(), OsStr::new(STAGING_DIR), &dir_path) {
        Ok(d) => Some(d),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
        Err(e) => return Err(MetaError::Backing { path: backing_path.to_path_buf(), problem: e.to_string() }),
    };
    if staged.is_empty() && dir.is_none() {
        return Ok(0);
    }
    for path in &staged {
        dict.submit(Record::Delete { path: path.clone() })?;
    }
    dict.flush()?;
    let Some(dir) = dir else { return Ok(staged.len()) };
    let mut removed = 0;
    for name in dir.list().map_err(io_err("list", &dir_path))? {
        match sys::unlinkat(dir.fd(), &name, 0) {
            Ok(()) => removed += (name != PROGRESS_FILE) as usize,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(io_err("remove", &dir_path.join(&name))(e).into()),
        }
    }
    drop(dir);
    match sys::unlinkat(backing.as_fd(), OsStr::new(STAGING_DIR), libc::AT_REMOVEDIR) {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTEMPTY)) => {}
        Err(e) => return Err(io_err("remove", &dir_path)(e).into()),
    }
    if removed > 0 || !staged.is_empty() {
        tracing::warn!(
            copies = staged.len().max(removed),
            "removed the staged copies of an interrupted `tdefs encrypt` (their originals are intact, still plaintext; run it again to finish)"
        );
    }
    Ok(staged.len().max(removed))
}

/// stat of a dictionary path in the backing directory; `None` if it does not exist. Any
/// other error stops recovery rather than guess.
fn lookup(backing: &OwnedFd, path: &[u8]) -> Result<Option<sys::Stat>, MetaError> {
    match sys::stat_below(backing.as_fd(), path) {
        Ok(st) => Ok(Some(st)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(None),
        Err(e) => Err(IoError::new("stat", String::from_utf8_lossy(path).into_owned(), e).into()),
    }
}
