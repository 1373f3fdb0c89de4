//! The append-only dictionary log: framing, sealing and reading back.
//!
//! File: common header | generation u64 | instance (16) | crc32 of the preceding bytes.
//! Record frame: magic u32 | len u32 | seq u64 | sealed[len] | crc32 of all preceding frame
//! bytes. The CRC covers the whole frame (lengths, sequence and payload), so a torn or
//! garbled frame is recognised before decryption; the GCM tag (associated data: instance,
//! generation, sequence) then proves the record is ours and unaltered. Format 2 seals each
//! generation's records with its own subkey (`SealKeys::log`); format 1 used the
//! dictionary key for all of them.

use crate::crypto::{SealKey, SealKeys};
use crate::codec::{check_header, write_header, Dec, Enc, FileKind, HeaderError, HEADER_LEN};

use super::record::Record;

pub const LOG_HEADER_LEN: usize = HEADER_LEN + 8 + 16 + 4;
const FRAME_MAGIC: u32 = 0x6345_5274; // bytes "tREc"
const FRAME_FIXED: usize = 4 + 4 + 8 + 4;
/// Largest sealed record accepted (paths up to 1 MiB, twice, plus overhead).
const MAX_SEALED: usize = (2 << 20) + 4096;

pub fn log_file_name(gen: u64) -> String {
    format!("files.log.{gen:016x}")
}

pub fn parse_log_file_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("files.log.")?;
    (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok()).flatten()
}

pub fn encode_header(gen: u64, instance: &[u8; 16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(LOG_HEADER_LEN);
    write_header(&mut out, FileKind::Log);
    let mut e = Enc(out);
    e.u64(gen).raw(instance);
    let crc = crc32fast::hash(&e.0);
    e.u32(crc);
    e.0
}

#[derive(Debug, PartialEq, Eq)]
pub enum HeaderProblem {
    Format(HeaderError),
    Checksum,
    Generation(u64),
    Instance,
}

/// Check the header of log `gen`; returns its format version.
pub fn check_log_header(bytes: &[u8], gen: u64, instance: &[u8; 16]) -> Result<u16, HeaderProblem> {
    let version = check_header(bytes, FileKind::Log).map_err(HeaderProblem::Format)?;
    if bytes.len() < LOG_HEADER_LEN {
        return Err(HeaderProblem::Format(HeaderError::TooShort));
    }
    let mut d = Dec::new(&bytes[HEADER_LEN..LOG_HEADER_LEN]);
    let (g, inst, crc) = (d.u64().unwrap(), d.array::<16>().unwrap(), d.u32().unwrap());
    if crc32fast::hash(&bytes[..LOG_HEADER_LEN - 4]) != crc {
        return Err(HeaderProblem::Checksum);
    }
    if g != gen {
        return Err(HeaderProblem::Generation(g));
    }
    if &inst != instance {
        return Err(HeaderProblem::Instance);
    }
    Ok(version)
}

/// The key that seals the records of log `gen`, written in format `version`.
pub fn log_seal(keys: &SealKeys, gen: u64, version: u16) -> SealKey {
    if version == 1 {
        keys.legacy()
    } else {
        keys.log(gen)
    }
}

fn aad(instance: &[u8; 16], gen: u64, seq: u64, version: u16) -> Vec<u8> {
    let mut e = Enc::default();
    e.raw(if version == 1 { b"tdefs log v1" } else { b"tdefs log v2" }).raw(instance).u64(gen).u64(seq);
    e.0
}

/// Seal and frame one record of log `gen` (format `version`, sealed with `seal`).
pub fn frame(seal: &SealKey, instance: &[u8; 16], gen: u64, version: u16, seq: u64, rec: &Record) -> Vec<u8> {
    let sealed = seal.seal(&aad(instance, gen, seq, version), &rec.encode());
    let mut e = Enc(Vec::with_capacity(FRAME_FIXED + sealed.len()));
    e.u32(FRAME_MAGIC).u32(sealed.len() as u32).u64(seq).raw(&sealed);
    let crc = crc32fast::hash(&e.0);
    e.u32(crc);
    e.0
}

/// Outcome of parsing one frame at some offset.
enum Frame {
    /// Intact frame (CRC verified): seq, sealed bytes, total length.
    Intact(u64, usize, usize),
    /// Not an intact frame here.
    Broken(&'static str),
}

fn parse_frame(b: &[u8]) -> Frame {
    let mut d = Dec::new(b);
    let (Some(magic), Some(len), Some(seq)) = (d.u32(), d.u32(), d.u64()) else {
        return Frame::Broken("incomplete frame header");
    };
    if magic != FRAME_MAGIC {
        return Frame::Broken("bad frame magic");
    }
    let len = len as usize;
    if len > MAX_SEALED {
        return Frame::Broken("frame length out of range");
    }
    let total = FRAME_FIXED + len;
    if b.len() < total {
        return Frame::Broken("frame extends past the end of the file");
    }
    let crc = u32::from_le_bytes(b[total - 4..total].try_into().unwrap());
    if crc32fast::hash(&b[..total - 4]) != crc {
        return Frame::Broken("frame checksum mismatch");
    }
    Frame::Intact(seq, len, total)
}

/// What reading a log yielded.
#[derive(Debug)]
pub struct LogContents {
    /// Records in order with their sequence numbers.
    pub records: Vec<(u64, Record)>,
    /// Length of the intact prefix (header + whole records).
    pub valid_len: u64,
    /// A torn tail was found at `valid_len` (why), to be cut off before appending.
    pub torn: Option<&'static str>,
}

/// Where and why a log is damaged beyond a torn tail.
#[derive(Debug, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub reason: String,
}

/// Parse a whole log file. `next_seq` is the sequence number the first record must carry.
/// Only the last log (`is_last`) may end in a torn record; a damaged frame followed by any
/// intact frame is corruption, not a torn write.
pub fn read_log(
    bytes: &[u8],
    seal: &SealKey,
    instance: &[u8; 16],
    gen: u64,
    version: u16,
    mut next_seq: u64,
    is_last: bool,
) -> Result<LogContents, Damage> {
    let mut records = Vec::new();
    let mut off = LOG_HEADER_LEN;
    while off < bytes.len() {
        let rest = &bytes[off..];
        match parse_frame(rest) {
            Frame::Intact(seq, len, total) => {
                if seq != next_seq {
                    return Err(Damage {
                        offset: off as u64,
                        reason: format!("record sequence {seq} where {next_seq} was expected"),
                    });
                }
                let sealed = &rest[FRAME_FIXED - 4..FRAME_FIXED - 4 + len];
                let plain = seal.open(&aad(instance, gen, seq, version), sealed).map_err(|_| Damage {
                    offset: off as u64,
                    reason: "record fails authentication (altered, or sealed with another key)".into(),
                })?;
                let rec = Record::decode(plain.expose())
                    .ok_or_else(|| Damage { offset: off as u64, reason: "record is malformed".into() })?;
                records.push((seq, rec));
                next_seq += 1;
                off += total;
            }
            Frame::Broken(why) => {
                if !is_last {
                    return Err(Damage { offset: off as u64, reason: why.into() });
                }
                if let Some(later) = find_intact_frame(bytes, off + 1) {
                    return Err(Damage {
                        offset: off as u64,
                        reason: format!("{why}, yet an intact record follows at byte {later}"),
                    });
                }
                return Ok(LogContents { records, valid_len: off as u64, torn: Some(why) });
            }
        }
    }
    Ok(LogContents { records, valid_len: off as u64, torn: None })
}

/// First offset at or after `from` where an intact frame starts.
fn find_intact_frame(bytes: &[u8], from: usize) -> Option<usize> {
    let magic = FRAME_MAGIC.to_le_bytes();
    let mut i = from;
    while i + FRAME_FIXED <= bytes.len() {
        let pos = bytes[i..].windows(4).position(|w| w == magic)?;
        i += pos;
        if let Frame::Intact(..) = parse_frame(&bytes[i..]) {
            return Some(i);
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Secret;

    fn setup(n: u64) -> (SealKey, [u8; 16], Vec<u8>, Vec<usize>) {
        let seal = SealKey::new(&Secret::random(32));
        let inst = [3u8; 16];
        let mut b = encode_header(7, &inst);
        let mut ends = vec![b.len()];
        for seq in 1..=n {
            b.extend(frame(&seal, &inst, 7, 2, seq, &Record::Delete { path: format!("/f{seq}").into_bytes() }));
            ends.push(b.len());
        }
        (seal, inst, b, ends)
    }

    #[test]
    fn reads_back_and_checks_sequence() {
        let (seal, inst, b, _) = setup(5);
        let c = read_log(&b, &seal, &inst, 7, 2, 1, true).unwrap();
        assert_eq!(c.records.len(), 5);
        assert_eq!((c.valid_len, c.torn), (b.len() as u64, None));
        assert!(read_log(&b, &seal, &inst, 7, 2, 2, true).is_err(), "wrong first seq");
        assert!(read_log(&b, &seal, &inst, 8, 2, 1, true).is_err(), "wrong generation in AAD");
        assert!(read_log(&b, &seal, &inst, 7, 1, 1, true).is_err(), "format 1 framing differs");
    }

    #[test]
    fn every_cut_of_the_last_record_is_a_torn_tail() {
        let (seal, inst, b, ends) = setup(4);
        let (start, end) = (ends[3], ends[4]);
        for cut in start..end {
            let c = read_log(&b[..cut], &seal, &inst, 7, 2, 1, true).unwrap();
            assert_eq!((c.records.len(), c.valid_len), (3, start as u64), "cut at {cut}");
            assert_eq!(c.torn.is_some(), cut > start);
            assert!(read_log(&b[..cut], &seal, &inst, 7, 2, 1, false).is_err() || cut == start);
        }
        // Zeros after the last record (a preallocated or power-cut tail) are a torn tail too.
        let mut z = b.clone();
        z.extend([0u8; 4096]);
        let c = read_log(&z, &seal, &inst, 7, 2, 1, true).unwrap();
        assert_eq!((c.records.len(), c.valid_len), (4, b.len() as u64));
    }

    #[test]
    fn a_flip_in_a_middle_record_is_corruption() {
        let (seal, inst, b, ends) = setup(4);
        for i in ends[1]..ends[2] {
            let mut t = b.clone();
            t[i] ^= 0x10;
            let e = read_log(&t, &seal, &inst, 7, 2, 1, true).unwrap_err();
            assert_eq!(e.offset, ends[1] as u64, "flip at {i}: {e:?}");
        }
    }

    #[test]
    fn header_checks() {
        let inst = [1u8; 16];
        let h = encode_header(5, &inst);
        assert_eq!(check_log_header(&h, 5, &inst), Ok(2));
        assert_eq!(check_log_header(&h, 6, &inst), Err(HeaderProblem::Generation(5)));
        assert_eq!(check_log_header(&h, 5, &[2; 16]), Err(HeaderProblem::Instance));
        let mut t = h.clone();
        t[13] ^= 1;
        assert_eq!(check_log_header(&t, 5, &inst), Err(HeaderProblem::Checksum));
        assert!(matches!(check_log_header(&h[..20], 5, &inst), Err(HeaderProblem::Format(_))));
        assert_eq!(parse_log_file_name(&log_file_name(0xabc)), Some(0xabc));
        assert_eq!(parse_log_file_name("files.log.12"), None);
    }
}
