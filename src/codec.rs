//! Byte-level format shared by every metadata file: a versioned header and a small
//! bounds-checked binary codec. Decoding never panics on any input: it returns `None`
//! and the caller reports which file is damaged.

use std::fmt;

/// Format version this build writes and the newest it reads. Version 2: every regular file
/// has a record (plaintext ones too), the key dictionary carries the file dictionary's
/// mark (rollback detection), and log records and snapshot chunks are sealed with
/// per-generation subkeys. Version 1 is still read, and upgraded at the first writable
/// open.
pub const FORMAT_VERSION: u16 = 2;

/// Where the file dictionary stood when the key dictionary was last written: its newest
/// log generation and the last record known durable, and whether it was closed cleanly
/// (then the log must end exactly there). Kept, sealed, in the key dictionary, so that an
/// older snapshot/log set, a missing newest log or a log cut at a record boundary is
/// refused instead of mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DictMark {
    pub gen: u64,
    pub seq: u64,
    pub clean: bool,
}
/// Bytes of the common header: magic (8) + version (2) + reserved (2).
pub const HEADER_LEN: usize = 12;

/// The kinds of metadata file, each with its own magic so a misplaced file is named.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    Keys,
    Snapshot,
    Log,
    ConvertJournal,
}

impl FileKind {
    pub fn magic(self) -> &'static [u8; 8] {
        match self {
            FileKind::Keys => b"TDEFSKEY",
            FileKind::Snapshot => b"TDEFSSNP",
            FileKind::Log => b"TDEFSLOG",
            FileKind::ConvertJournal => b"TDEFSCVJ",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            FileKind::Keys => "key dictionary",
            FileKind::Snapshot => "file dictionary snapshot",
            FileKind::Log => "file dictionary log",
            FileKind::ConvertJournal => "online conversion journal",
        }
    }
}

/// Why a header was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    TooShort,
    BadMagic,
    NewerVersion(u16),
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::TooShort => f.write_str("file is shorter than its header"),
            HeaderError::BadMagic => f.write_str("not a tdefs metadata file of this kind (bad magic)"),
            HeaderError::NewerVersion(v) => write!(
                f,
                "has format version {v}, newer than this build reads (up to {FORMAT_VERSION}): written by a \
                 newer tdefs, so upgrade tdefs to open it; if no newer tdefs ever wrote it, the header is \
                 damaged: restore the .tdefs directory from a backup"
            ),
        }
    }
}

pub fn write_header(out: &mut Vec<u8>, kind: FileKind) {
    out.extend_from_slice(kind.magic());
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
}

pub fn check_header(bytes: &[u8], kind: FileKind) -> Result<u16, HeaderError> {
    if bytes.len() < HEADER_LEN {
        return Err(HeaderError::TooShort);
    }
    if &bytes[..8] != kind.magic() {
        return Err(HeaderError::BadMagic);
    }
    let v = u16::from_le_bytes([bytes[8], bytes[9]]);
    if v == 0 || v > FORMAT_VERSION {
        return Err(HeaderError::NewerVersion(v));
    }
    Ok(v)
}

/// Little-endian encoder.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    /// u32 length prefix + bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32).raw(b)
    }
}

/// Bounds-checked little-endian decoder.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Dec<'a> {
        Dec { buf, pos: 0 }
    }
    pub fn pos(&self) -> usize {
        self.pos
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }
    pub fn raw(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    pub fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.raw(N).map(|s| s.try_into().expect("length checked"))
    }
    pub fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|a| a[0])
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    /// u32 length prefix + bytes, refusing lengths over `max`.
    pub fn bytes(&mut self, max: usize) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > max {
            return None;
        }
        self.raw(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_checks() {
        let mut h = Vec::new();
        write_header(&mut h, FileKind::Log);
        assert_eq!(check_header(&h, FileKind::Log), Ok(FORMAT_VERSION));
        assert_eq!(check_header(&h, FileKind::Keys), Err(HeaderError::BadMagic));
        assert_eq!(check_header(&h[..5], FileKind::Log), Err(HeaderError::TooShort));
        h[8] = 9;
        assert_eq!(check_header(&h, FileKind::Log), Err(HeaderError::NewerVersion(9)));
        assert!(HeaderError::NewerVersion(9).to_string().contains("upgrade tdefs"));
        assert!(HeaderError::NewerVersion(9).to_string().contains("newer"));
    }

    #[test]
    fn dec_is_bounds_checked() {
        let mut e = Enc::default();
        e.u8(1).u32(2).u64(3).bytes(b"abc");
        let mut d = Dec::new(&e.0);
        assert_eq!((d.u8(), d.u32(), d.u64()), (Some(1), Some(2), Some(3)));
        assert_eq!(d.bytes(2), None, "over max");
        let mut d = Dec::new(&e.0[..e.0.len() - 1]);
        d.raw(13).unwrap();
        assert_eq!(d.bytes(10), None, "truncated");
        assert_eq!(Dec::new(&[]).u64(), None);
    }
}
