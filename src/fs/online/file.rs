//! One file's online conversion: start it, rewrite it chunk by chunk under its lock with
//! the journal protocol, finish it (docs/design.md §10).

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fuser::FileType;

use super::super::errno::{Error, Result};
use super::super::inode::{FileEncryption, Inode};
use super::super::volume::Volume;
use crate::crypto::{random_iv, FileCipher};
use crate::dictionary::{FileEntry, Job, Record};
use crate::hooks::crash;
use crate::layout::{align_up, all_zero, BLOCK};
use crate::metadir::journal::Journal;
use crate::sys;

/// Bytes rewritten per chunk: the time the database may wait on the file's lock is one
/// chunk's read, journal write, rewrite and three syncs.
pub const CHUNK: u64 = 1 << 20;

/// How one file's conversion ended.
#[derive(Debug)]
pub enum FileOutcome {
    /// Converted (or found converted: e.g. re-keyed by a truncation meanwhile).
    Done,
    /// Left as it was: the reason, for the log.
    Skipped(String),
    /// Its name changed or went away meanwhile (a database recycling files): whatever
    /// name it has now is selected again by the next pass.
    Gone,
    /// Stopped between chunks (pause, unmount): the file stays in conversion, consistent,
    /// and resumes from its watermark.
    Interrupted,
}

/// What the converter is asked between two chunks.
pub enum Between {
    Go,
    Stop,
}

/// The inode of a dictionary path, found as the kernel would (lookups from the root), with
/// the references those lookups counted: `forget` them when done.
pub struct Found {
    pub inode: Arc<Inode>,
    refs: Vec<u64>,
}

impl Volume {
    pub(super) fn find_path(&self, path: &[u8]) -> Result<Found> {
        let mut cur = self.root.clone();
        let mut refs = Vec::new();
        for name in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            match self.lookup(&cur, OsStr::from_bytes(name)) {
                Ok((i, _)) => {
                    refs.push(i.nodeid);
                    cur = i;
                }
                Err(e) => {
                    self.release_found(Found { inode: cur, refs });
                    return Err(e);
                }
            }
        }
        Ok(Found { inode: cur, refs })
    }

    pub(super) fn release_found(&self, f: Found) {
        for id in f.refs {
            self.forget(id, 1);
        }
    }

    /// Convert the file at `path` to `job`'s method (or finish the conversion it is in).
    /// `progress(bytes, held)` counts each chunk's bytes and how long it held the file's
    /// lock; `between()` is asked before each chunk (and may wait: the throttle).
    pub(super) fn convert_file(
        &self,
        journal: &Journal,
        path: &[u8],
        job: Option<&Job>,
        period: Duration,
        mut progress: impl FnMut(u64, Duration),
        mut between: impl FnMut() -> Between,
    ) -> Result<FileOutcome> {
        let found = match self.find_path(path) {
            Ok(f) => f,
            Err(Error::Io(e)) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                return Ok(FileOutcome::Gone)
            }
            Err(e) => return Err(e),
        };
        let r = self.convert_found(&found.inode, journal, path, job, period, &mut progress, &mut between);
        self.release_found(found);
        r
    }

    #[allow(clippy::too_many_arguments)]
    fn convert_found(
        &self,
        inode: &Arc<Inode>,
        journal: &Journal,
        path: &[u8],
        job: Option<&Job>,
        period: Duration,
        progress: &mut dyn FnMut(u64, Duration),
        between: &mut dyn FnMut() -> Between,
    ) -> Result<FileOutcome> {
        if inode.kind != FileType::RegularFile {
            return Ok(FileOutcome::Gone); // replaced by a directory or another kind of file
        }
        let fd = self.open_backing(inode, libc::O_RDWR)?;
        let links = match job.filter(|_| inode.data.read().conv.is_none()) {
            Some(_) => self.other_links(inode, fd.as_fd(), path)?,
            None => Vec::new(),
        };
        if let Some(outcome) = self.start(inode, path, job, period, &links)? {
            return Ok(outcome);
        }
        self.chunks(inode, fd.as_fd(), journal, progress, between)
    }

    /// The file's other recorded names (hard links made before its conversion): each must
    /// join it. Links record the same entry; IVs are random per file, so for an encrypted
    /// file they are the only candidates. Plaintext entries all look alike: stat decides.
    fn other_links(&self, inode: &Inode, fd: BorrowedFd<'_>, path: &[u8]) -> Result<Vec<Vec<u8>>> {
        let st = sys::fstat(fd)?;
        let Some(entry) = inode.data.read().entry else { return Ok(Vec::new()) };
        if st.st_nlink <= 1 {
            return Ok(Vec::new());
        }
        let mut candidates = Vec::new();
        self.dict.with_tree(|t| {
            t.for_each(|p, e| {
                if *e == entry && p != path {
                    candidates.push(p.to_vec());
                }
            })
        });
        Ok(candidates.into_iter().filter(|p| sys::stat_below(self.root_fd(), p).is_ok_and(|s| s.st_ino == st.st_ino)).collect())
    }

    /// Record the start of the conversion (durably) and put the inode in it; `links` are
    /// the file's other recorded names. `Some` when there is nothing to convert.
    fn start(&self, inode: &Arc<Inode>, path: &[u8], job: Option<&Job>, period: Duration, links: &[Vec<u8>]) -> Result<Option<FileOutcome>> {
        let mut st = inode.data.write();
        if st.conv.is_some() {
            return Ok(None); // in conversion already: resume
        }
        let recorded = {
            let _no_rename = self.rename_lock.read();
            self.recorded_state(Some(path))
        };
        if recorded.conv.is_some() {
            // In conversion in the dictionary (an earlier mount's): the inode was known before.
            *st = recorded;
            return Ok(None);
        }
        let Some(job) = job else { return Ok(Some(FileOutcome::Done)) };
        let Some(old) = st.entry else { return Ok(Some(FileOutcome::Skipped("no record".into()))) };
        if recorded.entry != Some(old) {
            return Ok(Some(FileOutcome::Gone)); // its record changed since it was selected
        }
        if !super::wanted(self, job, &old) {
            return Ok(Some(FileOutcome::Done)); // converted meanwhile (another link of it)
        }
        if st.cipher.is_none() {
            return Ok(Some(FileOutcome::Skipped(format!("its data key {:#018x} is missing", old.key_id))));
        }
        let key_use = self.key_use.read();
        // Converting to the mount's own method: the key is the one new files get too, so
        // the keys being retired stop being current.
        let key = if job.method == self.opts.method {
            self.keys.key_for_new_file(job.method, period)?
        } else {
            self.keys.key_for_conversion(job.method, period)?
        };
        let new = match &key {
            None => FileEntry::plaintext(),
            Some(k) => FileEntry { method: k.method, key_id: k.id, iv: random_iv() },
        };
        let seq = {
            let _no_rename = self.rename_lock.read();
            match inode.path() {
                Some(p) if p == path => {}
                _ => return Ok(Some(FileOutcome::Gone)), // renamed since it was selected
            }
            let id = self.dict.submit(Record::ConvertStart { path: path.to_vec(), new })?;
            let mut last = id;
            for l in links {
                last = self.dict.submit(Record::ConvertLink { id, path: l.clone() })?;
            }
            (id, last)
        };
        drop(key_use);
        self.dict.sync(seq.1)?;
        *st = self.converting_state(old, seq.0, new, 0);
        tracing::info!(
            file = %String::from_utf8_lossy(path), from = %old.method, to = %new.method, links = links.len() + 1,
            "online conversion of a file started"
        );
        Ok(None)
    }

    /// Rewrite the file chunk by chunk from its watermark to its end, then record it done.
    fn chunks(
        &self,
        inode: &Arc<Inode>,
        fd: BorrowedFd<'_>,
        journal: &Journal,
        progress: &mut dyn FnMut(u64, Duration),
        between: &mut dyn FnMut() -> Between,
    ) -> Result<FileOutcome> {
        let mut buf = Vec::with_capacity(CHUNK as usize);
        let mut old_bytes = Vec::with_capacity(CHUNK as usize);
        loop {
            if let Between::Stop = between() {
                return Ok(FileOutcome::Interrupted);
            }
            let took = Instant::now();
            let mut st = inode.data.write();
            let stat = sys::fstat(fd)?;
            if stat.st_nlink == 0 {
                return Ok(FileOutcome::Gone); // removed during its conversion
            }
            let Some(conv) = st.conv.clone() else {
                return Ok(FileOutcome::Done); // re-keyed meanwhile (emptied): nothing left to convert
            };
            let (Some(old_c), Some(new_c)) = (conv.old_cipher.clone(), conv.new_cipher.clone()) else {
                return Ok(FileOutcome::Skipped("a data key of its conversion is missing".into()));
            };
            let size = stat.st_size as u64;
            if conv.mark >= size {
                let seq = self.dict.submit(Record::ConvertDone { id: conv.id })?;
                self.sync_or_fail(seq)?;
                *st = FileEncryption::recorded(conv.new, new_c);
                return Ok(FileOutcome::Done);
            }
            let end = (conv.mark + CHUNK).min(size);
            buf.resize((end - conv.mark) as usize, 0);
            let n = sys::pread_full(fd, &mut buf, conv.mark)?;
            buf.truncate(n);
            old_bytes.clear();
            old_bytes.extend_from_slice(&buf);
            crash("convert:before-journal");
            journal.record(conv.id, conv.mark, &buf)?;
            crash("convert:journaled");
            let runs = reencrypt(&mut buf, conv.mark, &old_c, &new_c);
            let times = self.times_before_rewrite(inode, fd)?;
            write_runs(fd, &buf, conv.mark, &runs)?;
            self.restore_times(inode, fd, &times)?;
            crash("convert:overwritten");
            sys::fdatasync(fd)?;
            crash("convert:synced");
            let mark = align_up(conv.mark + buf.len() as u64);
            let done = mark >= size;
            let rec = if done { Record::ConvertDone { id: conv.id } } else { Record::ConvertMark { id: conv.id, mark } };
            let seq = self.dict.submit(rec)?;
            if let Err(e) = self.sync_or_fail(seq) {
                // The log failed for good: nothing more will be recorded, so the chunk must
                // match the watermark on disk again.
                sys::pwrite_all(fd, &old_bytes, conv.mark)?;
                sys::fdatasync(fd)?;
                return Err(e);
            }
            crash("convert:marked");
            progress(buf.len() as u64, took.elapsed());
            if done {
                *st = FileEncryption::recorded(conv.new, new_c);
                return Ok(FileOutcome::Done);
            }
            *st = self.converting_state(st.entry.expect("in conversion"), conv.id, conv.new, mark);
            drop(st);
        }
    }

    /// Wait until record `seq` is durable. A failed append is retried (its records stay
    /// queued and will be written): the chunk stays locked meanwhile, because the watermark
    /// in memory already moved. Only a log that failed for good returns an error.
    fn sync_or_fail(&self, seq: u64) -> Result<()> {
        let mut warned = false;
        loop {
            match self.dict.sync(seq) {
                Ok(()) => return Ok(()),
                Err(e) if self.dict.is_failed() => return Err(e.into()),
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "online conversion: recording a chunk failed; retrying every second");
                        warned = true;
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }
}

/// Re-encrypt a chunk read at `off` in place: each 4 KiB block from `old` to `new`, holes
/// (complete all-zero blocks) left alone. Returns the runs of blocks to write back.
fn reencrypt(buf: &mut [u8], off: u64, old: &FileCipher, new: &FileCipher) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in buf.chunks_mut(BLOCK as usize).enumerate() {
        if block.len() == BLOCK as usize && all_zero(block) {
            continue;
        }
        let at = off + (i as u64) * BLOCK;
        old.decrypt(at, block);
        new.encrypt(at, block);
        let start = i * BLOCK as usize;
        match runs.last_mut() {
            Some(r) if r.1 == start => r.1 += block.len(),
            _ => runs.push((start, start + block.len())),
        }
    }
    runs
}

/// Write the runs of `buf` (at file offset `off`), with a crash point once half the bytes are
/// written: a torn rewrite for the crash tests.
fn write_runs(fd: BorrowedFd<'_>, buf: &[u8], off: u64, runs: &[(usize, usize)]) -> std::io::Result<()> {
    let total: usize = runs.iter().map(|r| r.1 - r.0).sum();
    let half = total / 2;
    let mut written = 0;
    for &(a, b) in runs {
        let mut a = a;
        if written < half && written + (b - a) >= half {
            let mid = a + (half - written).div_ceil(BLOCK as usize) * BLOCK as usize;
            let mid = mid.min(b);
            sys::pwrite_all(fd, &buf[a..mid], off + a as u64)?;
            written += mid - a;
            crash("convert:half-written");
            a = mid;
        }
        if a < b {
            sys::pwrite_all(fd, &buf[a..b], off + a as u64)?;
            written += b - a;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Method;

    fn cipher(m: Method, seed: u8) -> FileCipher {
        let key: Vec<u8> = (0..m.key_len()).map(|i| i as u8 ^ seed).collect();
        FileCipher::new(m, &key, &[seed; 16]).unwrap()
    }

    /// Data blocks move from one cipher to the other, holes stay holes (not written), and a
    /// partial last block (a tail for XTS) converts too.
    #[test]
    fn reencrypt_keeps_holes_and_converts_the_rest() {
        for (a, b) in [(Method::Plaintext, Method::Aes256Xts), (Method::Aes256Ctr, Method::Sm4Xts), (Method::Sm4Xts, Method::Aes128Ctr)] {
            let (old, new) = (cipher(a, 1), cipher(b, 2));
            let off = 3 * CHUNK;
            let mut plain: Vec<u8> = (0..5 * BLOCK as usize + 1000).map(|i| (i % 251) as u8 + 1).collect();
            plain[BLOCK as usize..2 * BLOCK as usize].fill(0); // will be a hole
            let mut disk = plain.clone();
            old.encrypt(off, &mut disk);
            disk[BLOCK as usize..2 * BLOCK as usize].fill(0);
            let mut buf = disk.clone();
            let runs = reencrypt(&mut buf, off, &old, &new);
            assert_eq!(runs, vec![(0, BLOCK as usize), (2 * BLOCK as usize, buf.len())], "{a} -> {b}");
            assert!(all_zero(&buf[BLOCK as usize..2 * BLOCK as usize]));
            let mut back = buf.clone();
            new.decrypt(off, &mut back[..BLOCK as usize]);
            new.decrypt(off + 2 * BLOCK, &mut back[2 * BLOCK as usize..]);
            assert_eq!(back, plain, "{a} -> {b}");
        }
    }
}
