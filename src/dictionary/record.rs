//! Dictionary records: what one log entry says, and its byte encoding.

use crate::crypto::{Iv, Method};
use crate::codec::{Dec, Enc};

/// Longest path a record may carry. Paths inside a deep tree can exceed PATH_MAX.
pub const MAX_PATH: usize = 1 << 20;

/// How one file's bytes are encrypted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileEntry {
    pub method: Method,
    /// Data key id (0 for plaintext).
    pub key_id: u64,
    pub iv: Iv,
}

impl FileEntry {
    pub fn plaintext() -> FileEntry {
        FileEntry { method: Method::Plaintext, key_id: 0, iv: [0; 16] }
    }
}

/// A rename that was announced (durably) but whose outcome is not yet recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intent {
    /// Sequence number of the intent record; `RenameDone`/`RenameAbort` name it.
    pub seq: u64,
    pub from: Vec<u8>,
    pub to: Vec<u8>,
    /// Backing inode number of the source: after a crash, the rename happened iff the
    /// destination now has this inode.
    pub from_ino: u64,
    pub exchange: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// `path` is encrypted as `entry` (create, link, re-key after truncate).
    Put { path: Vec<u8>, entry: FileEntry },
    /// `path` has no entry any more (after unlink).
    Delete { path: Vec<u8> },
    /// A rename of `from` (file or whole directory) to `to` is about to happen.
    RenameIntent { from: Vec<u8>, to: Vec<u8>, from_ino: u64, exchange: bool },
    /// The rename announced by record `intent` happened: move the entries.
    RenameDone { intent: u64 },
    /// The rename announced by record `intent` failed: forget it.
    RenameAbort { intent: u64 },
}

const PUT: u8 = 1;
const DELETE: u8 = 2;
const INTENT: u8 = 3;
const DONE: u8 = 4;
const ABORT: u8 = 5;

pub fn encode_entry(e: &mut Enc, entry: &FileEntry) {
    e.u8(entry.method.code()).u64(entry.key_id).raw(&entry.iv);
}

pub fn decode_entry(d: &mut Dec<'_>) -> Option<FileEntry> {
    let method = Method::from_code(d.u8()?)?;
    Some(FileEntry { method, key_id: d.u64()?, iv: d.array()? })
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        let mut e = Enc::default();
        match self {
            Record::Put { path, entry } => {
                e.u8(PUT).bytes(path);
                encode_entry(&mut e, entry);
            }
            Record::Delete { path } => {
                e.u8(DELETE).bytes(path);
            }
            Record::RenameIntent { from, to, from_ino, exchange } => {
                e.u8(INTENT).bytes(from).bytes(to).u64(*from_ino).u8(*exchange as u8);
            }
            Record::RenameDone { intent } => {
                e.u8(DONE).u64(*intent);
            }
            Record::RenameAbort { intent } => {
                e.u8(ABORT).u64(*intent);
            }
        }
        e.0
    }

    pub fn decode(b: &[u8]) -> Option<Record> {
        let mut d = Dec::new(b);
        let path = |d: &mut Dec<'_>| d.bytes(MAX_PATH).filter(|p| valid_path(p)).map(<[u8]>::to_vec);
        let r = match d.u8()? {
            PUT => Record::Put { path: path(&mut d)?, entry: decode_entry(&mut d)? },
            DELETE => Record::Delete { path: path(&mut d)? },
            INTENT => Record::RenameIntent {
                from: path(&mut d)?,
                to: path(&mut d)?,
                from_ino: d.u64()?,
                exchange: match d.u8()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                },
            },
            DONE => Record::RenameDone { intent: d.u64()? },
            ABORT => Record::RenameAbort { intent: d.u64()? },
            _ => return None,
        };
        d.is_empty().then_some(r)
    }
}

/// An absolute path below the mount root: starts with '/', is not the root itself.
pub fn valid_path(p: &[u8]) -> bool {
    p.len() > 1 && p[0] == b'/' && !p.contains(&0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let e = FileEntry { method: Method::Sm4Ctr, key_id: 42, iv: [9; 16] };
        for r in [
            Record::Put { path: b"/a/b".to_vec(), entry: e },
            Record::Delete { path: b"/x".to_vec() },
            Record::RenameIntent { from: b"/a".to_vec(), to: b"/b/c".to_vec(), from_ino: 77, exchange: true },
            Record::RenameDone { intent: 5 },
            Record::RenameAbort { intent: 6 },
        ] {
            let b = r.encode();
            assert_eq!(Record::decode(&b), Some(r.clone()));
            for cut in 0..b.len() {
                assert_eq!(Record::decode(&b[..cut]), None, "truncated {r:?} at {cut}");
            }
        }
        assert_eq!(Record::decode(&Record::Delete { path: b"/".to_vec() }.encode()), None);
        assert_eq!(Record::decode(&Record::Delete { path: b"rel".to_vec() }.encode()), None);
    }
}
