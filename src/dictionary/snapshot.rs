//! Dictionary snapshots: the whole tree at one point of the log, in sealed chunks.
//!
//! File: common header | instance (16) | covered log generation u64 | last sequence u64 |
//! chunk count u32 | crc32 of the preceding bytes | chunks. Chunk: u32 len + sealed bytes,
//! associated data binding it to its instance, generation, index and count (so chunks
//! cannot be dropped, duplicated or reordered unnoticed).
//! Chunk plaintext: items, each u8 kind (1 entry, 2 pending rename intent, 3 file in online
//! conversion, 4 the conversion job) + fields. Conversions and the job come after every
//! entry: a conversion's paths hold their old entries.
//! Format 2 seals the chunks with the snapshot's own subkey (`SealKeys::snapshot` of the
//! generation it covers); format 1 used the dictionary key.

use std::io::Read;

use crate::crypto::{SealKey, SealKeys};
use crate::codec::{check_header, write_header, Dec, Enc, FileKind, HeaderError, HEADER_LEN};

use super::record::{decode_conversion, decode_entry, decode_job, encode_conversion, encode_entry, encode_job, valid_path, FileEntry, Intent, MAX_PATH};
use super::tree::Tree;

pub const SNAPSHOT_FILE: &str = "files.snap";
/// Common header + instance + generation + sequence + chunk count + crc.
const SNAP_HEADER_LEN: usize = HEADER_LEN + 16 + 8 + 8 + 4 + 4;
const CHUNK_TARGET: usize = 1 << 20;
const MAX_CHUNK: usize = 64 << 20;
const ITEM_ENTRY: u8 = 1;
const ITEM_INTENT: u8 = 2;
const ITEM_CONVERSION: u8 = 3;
const ITEM_JOB: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Logs up to this generation are included.
    pub covers_gen: u64,
    /// Sequence number of the last record included.
    pub last_seq: u64,
}

fn chunk_aad(instance: &[u8; 16], info: &SnapshotInfo, idx: u32, count: u32, version: u16) -> Vec<u8> {
    let mut e = Enc::default();
    e.raw(if version == 1 { b"tdefs snapshot v1" } else { b"tdefs snapshot v2" });
    e.raw(instance).u64(info.covers_gen).u64(info.last_seq).u32(idx).u32(count);
    e.0
}

fn chunk_seal(keys: &SealKeys, info: &SnapshotInfo, version: u16) -> SealKey {
    if version == 1 {
        keys.legacy()
    } else {
        keys.snapshot(info.covers_gen)
    }
}

/// Serialise `tree` as a complete snapshot file (current format).
pub fn encode(tree: &Tree, keys: &SealKeys, instance: &[u8; 16], info: SnapshotInfo) -> Vec<u8> {
    let version = crate::codec::FORMAT_VERSION;
    let seal = chunk_seal(keys, &info, version);
    let mut plains: Vec<Vec<u8>> = Vec::new();
    let mut cur = Enc::default();
    let mut flush = |cur: &mut Enc, force: bool| {
        if !cur.0.is_empty() && (force || cur.0.len() >= CHUNK_TARGET) {
            plains.push(std::mem::take(&mut cur.0));
        }
    };
    tree.for_each(|path, entry| {
        cur.u8(ITEM_ENTRY).bytes(path);
        encode_entry(&mut cur, entry);
        flush(&mut cur, false);
    });
    for i in tree.intents() {
        cur.u8(ITEM_INTENT).u64(i.seq).bytes(&i.from).bytes(&i.to).u64(i.from_ino).u8(i.exchange as u8);
        flush(&mut cur, false);
    }
    for c in tree.conversions() {
        cur.u8(ITEM_CONVERSION);
        encode_conversion(&mut cur, c);
        flush(&mut cur, false);
    }
    if let Some(j) = tree.job() {
        cur.u8(ITEM_JOB);
        encode_job(&mut cur, j);
    }
    flush(&mut cur, true);

    let count = plains.len() as u32;
    let mut out = Vec::new();
    write_header(&mut out, FileKind::Snapshot);
    let mut e = Enc(out);
    e.raw(instance).u64(info.covers_gen).u64(info.last_seq).u32(count);
    let crc = crc32fast::hash(&e.0);
    e.u32(crc);
    for (idx, p) in plains.iter().enumerate() {
        let sealed = seal.seal(&chunk_aad(instance, &info, idx as u32, count, version), p);
        e.bytes(&sealed);
    }
    e.0
}

#[derive(Debug)]
pub enum SnapError {
    Header(HeaderError),
    Damaged { offset: u64, reason: String },
    ForeignInstance,
    Io(std::io::Error),
}

/// Read a snapshot into a fresh tree; also returns its format version.
pub fn decode(r: &mut impl Read, keys: &SealKeys, instance: &[u8; 16]) -> Result<(Tree, SnapshotInfo, u16), SnapError> {
    let mut head = [0u8; SNAP_HEADER_LEN];
    read_exact_or(r, &mut head, 0)?;
    let version = check_header(&head, FileKind::Snapshot).map_err(SnapError::Header)?;
    let mut d = Dec::new(&head[HEADER_LEN..]);
    let inst: [u8; 16] = d.array().unwrap();
    let info = SnapshotInfo { covers_gen: d.u64().unwrap(), last_seq: d.u64().unwrap() };
    let count = d.u32().unwrap();
    let crc = d.u32().unwrap();
    if crc32fast::hash(&head[..SNAP_HEADER_LEN - 4]) != crc {
        return Err(SnapError::Damaged { offset: 0, reason: "header checksum mismatch".into() });
    }
    if &inst != instance {
        return Err(SnapError::ForeignInstance);
    }
    let seal = chunk_seal(keys, &info, version);
    let mut tree = Tree::default();
    let mut offset = SNAP_HEADER_LEN as u64;
    for idx in 0..count {
        let damaged = |reason: &str| SnapError::Damaged { offset, reason: format!("chunk {idx} of {count}: {reason}") };
        let mut len = [0u8; 4];
        read_exact_or(r, &mut len, offset)?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_CHUNK {
            return Err(damaged("length out of range"));
        }
        let mut sealed = vec![0u8; len];
        read_exact_or(r, &mut sealed, offset)?;
        let plain = seal
            .open(&chunk_aad(instance, &info, idx, count, version), &sealed)
            .map_err(|_| damaged("fails authentication (altered, or sealed with another key)"))?;
        decode_items(plain.expose(), &mut tree).ok_or_else(|| damaged("malformed items"))?;
        offset += 4 + len as u64;
    }
    let mut extra = [0u8; 1];
    match r.read(&mut extra) {
        Ok(0) => Ok((tree, info, version)),
        Ok(_) => Err(SnapError::Damaged { offset, reason: "trailing bytes after the last chunk".into() }),
        Err(e) => Err(SnapError::Io(e)),
    }
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], offset: u64) -> Result<(), SnapError> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => SnapError::Damaged { offset, reason: "file is truncated".into() },
        _ => SnapError::Io(e),
    })
}

fn decode_items(b: &[u8], tree: &mut Tree) -> Option<()> {
    let mut d = Dec::new(b);
    let path = |d: &mut Dec<'_>| d.bytes(MAX_PATH).filter(|p| valid_path(p)).map(<[u8]>::to_vec);
    while !d.is_empty() {
        match d.u8()? {
            ITEM_ENTRY => {
                let p = path(&mut d)?;
                let e: FileEntry = decode_entry(&mut d)?;
                tree.put(&p, e);
            }
            ITEM_INTENT => {
                let seq = d.u64()?;
                let (from, to) = (path(&mut d)?, path(&mut d)?);
                let from_ino = d.u64()?;
                let exchange = match d.u8()? {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                tree.add_intent(Intent { seq, from, to, from_ino, exchange });
            }
            ITEM_CONVERSION => {
                let c = decode_conversion(&mut d)?;
                if c.paths.iter().any(|p| tree.get(p) != Some(c.old)) {
                    return None; // its paths must hold the old entry
                }
                tree.add_conversion(c);
            }
            ITEM_JOB => tree.set_job(Some(decode_job(&mut d)?)),
            _ => return None,
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Method, Secret};

    #[test]
    fn round_trip_and_damage() {
        let seal = SealKeys::new(&Secret::random(32), [4; 16]);
        let inst = [4u8; 16];
        let mut t = Tree::default();
        for i in 0..30_000u64 {
            t.put(format!("/dir{}/file{i}", i % 7).as_bytes(), FileEntry { method: Method::Aes128Ctr, key_id: i % 3 + 1, iv: [i as u8; 16] });
        }
        t.add_intent(Intent { seq: 9, from: b"/a".to_vec(), to: b"/b".to_vec(), from_ino: 3, exchange: false });
        let new = FileEntry { method: Method::Aes256Xts, key_id: 77, iv: [1; 16] };
        t.apply(100, &crate::dictionary::Record::ConvertStart { path: b"/dir3/file10".to_vec(), new }).unwrap();
        t.apply(101, &crate::dictionary::Record::ConvertMark { id: 100, mark: 8192 }).unwrap();
        let job = crate::dictionary::Job {
            method: Method::Aes256Xts,
            older_than: None,
            paths: vec![],
            rate: 0,
            share: 100,
            paused: false,
            started: 5,
        };
        t.set_job(Some(job.clone()));
        let info = SnapshotInfo { covers_gen: 2, last_seq: 99 };
        let b = encode(&t, &seal, &inst, info);
        let (r, i, v) = decode(&mut &b[..], &seal, &inst).unwrap();
        assert_eq!(v, crate::codec::FORMAT_VERSION);
        assert_eq!(i, info);
        assert_eq!(r.len(), 30_000);
        assert_eq!(r.get(b"/dir3/file10"), t.get(b"/dir3/file10"));
        assert_eq!(r.intents().count(), 1);
        assert_eq!(r.conversions().collect::<Vec<_>>(), t.conversions().collect::<Vec<_>>());
        assert_eq!(r.key_refs().get(&77), Some(&1));
        assert_eq!(r.job(), Some(&job));
        assert!(matches!(decode(&mut &b[..], &seal, &[5; 16]), Err(SnapError::ForeignInstance)));
        assert!(matches!(decode(&mut &b[..b.len() - 1], &seal, &inst), Err(SnapError::Damaged { .. })));
        let mut extra = b.clone();
        extra.push(0);
        assert!(decode(&mut &extra[..], &seal, &inst).is_err());
        // Bit flips anywhere are detected (sampled: every 97th byte, plus the header).
        for i in (0..SNAP_HEADER_LEN).chain((SNAP_HEADER_LEN..b.len()).step_by(97)) {
            let mut t = b.clone();
            t[i] ^= 0x08;
            assert!(decode(&mut &t[..], &seal, &inst).is_err(), "flip at {i} accepted");
        }
    }
}
