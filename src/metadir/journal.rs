//! The online conversion's journal, `.tdefs/convert.journal` (docs/design.md §10): the old
//! ciphertext of the one chunk the converter is rewriting, durable before the rewrite
//! starts, so that recovery can put the chunk back whatever a crash left of it.
//!
//! One record, rewritten in place for every chunk: common header | instance (16) |
//! conversion id u64 | offset u64 | length u32 | bytes | crc32 of all before. A torn or
//! foreign record reads as none: it was never complete, so its rewrite never began.
//! The bytes are ciphertext (or plaintext for a file that was plaintext): the journal holds
//! nothing the backing file did not.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;

use crate::codec::{check_header, write_header, Dec, Enc, FileKind, HEADER_LEN};
use crate::sys::{self, Dir};

pub const JOURNAL_FILE: &str = "convert.journal";

/// A chunk as the journal holds it.
#[derive(Debug, PartialEq, Eq)]
pub struct JournalChunk {
    pub id: u64,
    pub offset: u64,
    pub bytes: Vec<u8>,
}

pub struct Journal {
    file: File,
    instance: [u8; 16],
}

impl Journal {
    /// Open the journal, creating it (and making its name durable) if it does not exist.
    pub fn open(dir: &Dir, instance: [u8; 16]) -> io::Result<Journal> {
        let file = match dir.open(JOURNAL_FILE, libc::O_RDWR) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let f = dir.create_new(JOURNAL_FILE)?;
                dir.sync()?;
                f
            }
            Err(e) => return Err(e),
        };
        Ok(Journal { file, instance })
    }

    /// Make `bytes`, the chunk of conversion `id` at `offset`, durable.
    pub fn record(&self, id: u64, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut out = Vec::with_capacity(HEADER_LEN + 48 + bytes.len());
        write_header(&mut out, FileKind::ConvertJournal);
        let mut e = Enc(out);
        e.raw(&self.instance).u64(id).u64(offset).u32(bytes.len() as u32).raw(bytes);
        let crc = crc32fast::hash(&e.0);
        e.u32(crc);
        sys::pwrite_all(self.file.as_fd(), &e.0, 0)?;
        sys::fdatasync(self.file.as_fd())
    }

    /// Forget the record (durably): its chunk was put back, or is stale.
    pub fn clear(&self) -> io::Result<()> {
        sys::ftruncate(self.file.as_fd(), 0)?;
        sys::fdatasync(self.file.as_fd())
    }

    /// The record, if a complete one of this dictionary is there.
    pub fn read(&self) -> io::Result<Option<JournalChunk>> {
        let len = sys::fstat(self.file.as_fd())?.st_size as usize;
        let mut buf = vec![0u8; len];
        let n = sys::pread_full(self.file.as_fd(), &mut buf, 0)?;
        buf.truncate(n);
        Ok(parse(&buf, &self.instance))
    }
}

fn parse(b: &[u8], instance: &[u8; 16]) -> Option<JournalChunk> {
    check_header(b, FileKind::ConvertJournal).ok()?;
    let mut d = Dec::new(&b[HEADER_LEN..]);
    let inst: [u8; 16] = d.array()?;
    let (id, offset, len) = (d.u64()?, d.u64()?, d.u32()? as usize);
    let bytes = d.raw(len)?.to_vec();
    let end = HEADER_LEN + d.pos();
    let crc = d.u32()?;
    (crc32fast::hash(&b[..end]) == crc && &inst == instance).then_some(JournalChunk { id, offset, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_and_a_torn_or_foreign_one_reads_as_none() {
        let d = tempfile::tempdir().unwrap();
        let root: std::os::fd::OwnedFd = File::open(d.path()).unwrap().into();
        std::fs::create_dir(d.path().join("m")).unwrap();
        let dir = Dir::open_nofollow(root.as_fd(), std::ffi::OsStr::new("m"), &d.path().join("m")).unwrap();
        let j = Journal::open(&dir, [7; 16]).unwrap();
        assert_eq!(j.read().unwrap(), None, "a new journal holds nothing");
        let big: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        j.record(5, 1 << 20, &big).unwrap();
        j.record(5, 2 << 20, b"shorter").unwrap(); // over a longer one: the length decides
        let want = JournalChunk { id: 5, offset: 2 << 20, bytes: b"shorter".to_vec() };
        assert_eq!(j.read().unwrap(), Some(want));
        let whole = std::fs::read(d.path().join("m").join(JOURNAL_FILE)).unwrap();
        let rec_len = HEADER_LEN + 16 + 8 + 8 + 4 + 7 + 4;
        for cut in 0..rec_len {
            assert_eq!(parse(&whole[..cut], &[7; 16]), None, "cut at {cut}");
        }
        for i in 0..rec_len {
            let mut t = whole[..rec_len].to_vec();
            t[i] ^= 1;
            assert_eq!(parse(&t, &[7; 16]), None, "flip at {i}");
        }
        assert_eq!(parse(&whole, &[8; 16]), None, "another dictionary's journal");
        drop(j);
        let j = Journal::open(&dir, [7; 16]).unwrap();
        assert!(j.read().unwrap().is_some(), "reopened");
        j.clear().unwrap();
        assert_eq!(j.read().unwrap(), None);
    }
}
