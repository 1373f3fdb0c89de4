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

/// A file in online conversion (docs/design.md §10): bytes below `mark` are under `new`,
/// the others under `old`, for the file at every one of `paths` (its hard links). Named by
/// `id`, the sequence number of its `ConvertStart` record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversion {
    pub id: u64,
    pub old: FileEntry,
    pub new: FileEntry,
    pub mark: u64,
    pub paths: Vec<Vec<u8>>,
}

/// The online conversion job of a mount: what it converts and how fast. Durable, so a
/// remount continues it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    /// Target method of every converted file.
    pub method: Method,
    /// Also convert files whose data key is older than this (seconds).
    pub older_than: Option<u64>,
    /// Only files at or below these paths (none: every file).
    pub paths: Vec<Vec<u8>>,
    /// Bytes per second (0: no limit).
    pub rate: u64,
    /// Percent of the time the converter may hold a file's lock (1..=100).
    pub share: u8,
    pub paused: bool,
    /// When the job was started (unix seconds).
    pub started: u64,
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
    /// The file at `path` starts its conversion to `new` (watermark 0).
    ConvertStart { path: Vec<u8>, new: FileEntry },
    /// Conversion `id` is done below `mark`.
    ConvertMark { id: u64, mark: u64 },
    /// `path`, a new hard link of the file in conversion `id`, joins it.
    ConvertLink { id: u64, path: Vec<u8> },
    /// Conversion `id` is complete: its paths are under the new entry.
    ConvertDone { id: u64 },
    /// The conversion job, or none (finished or cancelled).
    SetJob { job: Option<Job> },
}

const PUT: u8 = 1;
const DELETE: u8 = 2;
const INTENT: u8 = 3;
const DONE: u8 = 4;
const ABORT: u8 = 5;
const CONVERT_START: u8 = 6;
const CONVERT_MARK: u8 = 7;
const CONVERT_LINK: u8 = 8;
const CONVERT_DONE: u8 = 9;
const SET_JOB: u8 = 10;

pub fn encode_entry(e: &mut Enc, entry: &FileEntry) {
    e.u8(entry.method.code()).u64(entry.key_id).raw(&entry.iv);
}

pub fn decode_entry(d: &mut Dec<'_>) -> Option<FileEntry> {
    let method = Method::from_code(d.u8()?)?;
    Some(FileEntry { method, key_id: d.u64()?, iv: d.array()? })
}

pub fn encode_job(e: &mut Enc, j: &Job) {
    e.u8(j.method.code()).u64(j.older_than.unwrap_or(u64::MAX)).u64(j.rate).u8(j.share).u8(j.paused as u8).u64(j.started);
    e.u32(j.paths.len() as u32);
    for p in &j.paths {
        e.bytes(p);
    }
}

pub fn decode_job(d: &mut Dec<'_>) -> Option<Job> {
    let method = Method::from_code(d.u8()?)?;
    let older_than = Some(d.u64()?).filter(|&s| s != u64::MAX);
    let (rate, share) = (d.u64()?, d.u8()?);
    let paused = decode_bool(d)?;
    let started = d.u64()?;
    let n = d.u32()? as usize;
    let mut paths = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        paths.push(d.bytes(MAX_PATH).filter(|p| valid_path(p))?.to_vec());
    }
    (1..=100).contains(&share).then_some(Job { method, older_than, paths, rate, share, paused, started })
}

pub fn encode_conversion(e: &mut Enc, c: &Conversion) {
    e.u64(c.id);
    encode_entry(e, &c.old);
    encode_entry(e, &c.new);
    e.u64(c.mark).u32(c.paths.len() as u32);
    for p in &c.paths {
        e.bytes(p);
    }
}

pub fn decode_conversion(d: &mut Dec<'_>) -> Option<Conversion> {
    let id = d.u64()?;
    let (old, new) = (decode_entry(d)?, decode_entry(d)?);
    let mark = d.u64()?;
    let n = d.u32()? as usize;
    let mut paths = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        paths.push(d.bytes(MAX_PATH).filter(|p| valid_path(p))?.to_vec());
    }
    (mark % crate::layout::BLOCK == 0 && !paths.is_empty()).then_some(Conversion { id, old, new, mark, paths })
}

fn decode_bool(d: &mut Dec<'_>) -> Option<bool> {
    match d.u8()? {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
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
            Record::ConvertStart { path, new } => {
                e.u8(CONVERT_START).bytes(path);
                encode_entry(&mut e, new);
            }
            Record::ConvertMark { id, mark } => {
                e.u8(CONVERT_MARK).u64(*id).u64(*mark);
            }
            Record::ConvertLink { id, path } => {
                e.u8(CONVERT_LINK).u64(*id).bytes(path);
            }
            Record::ConvertDone { id } => {
                e.u8(CONVERT_DONE).u64(*id);
            }
            Record::SetJob { job } => {
                e.u8(SET_JOB);
                match job {
                    None => e.u8(0),
                    Some(j) => {
                        e.u8(1);
                        encode_job(&mut e, j);
                        &mut e
                    }
                };
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
                exchange: decode_bool(&mut d)?,
            },
            DONE => Record::RenameDone { intent: d.u64()? },
            ABORT => Record::RenameAbort { intent: d.u64()? },
            CONVERT_START => Record::ConvertStart { path: path(&mut d)?, new: decode_entry(&mut d)? },
            CONVERT_MARK => {
                let (id, mark) = (d.u64()?, d.u64()?);
                if mark % crate::layout::BLOCK != 0 {
                    return None;
                }
                Record::ConvertMark { id, mark }
            }
            CONVERT_LINK => Record::ConvertLink { id: d.u64()?, path: path(&mut d)? },
            CONVERT_DONE => Record::ConvertDone { id: d.u64()? },
            SET_JOB => Record::SetJob {
                job: match d.u8()? {
                    0 => None,
                    1 => Some(decode_job(&mut d)?),
                    _ => return None,
                },
            },
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
            Record::ConvertStart { path: b"/db/x".to_vec(), new: e },
            Record::ConvertMark { id: 7, mark: 1 << 20 },
            Record::ConvertLink { id: 7, path: b"/db/y".to_vec() },
            Record::ConvertDone { id: 7 },
            Record::SetJob { job: None },
            Record::SetJob {
                job: Some(Job {
                    method: Method::Aes256Xts,
                    older_than: Some(86400),
                    paths: vec![b"/db".to_vec(), b"/w".to_vec()],
                    rate: 50 << 20,
                    share: 30,
                    paused: true,
                    started: 1_700_000_000,
                }),
            },
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
