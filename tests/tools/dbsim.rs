//! An SQL Server-style data-file workload (issue 4).
//!
//! `db.mdf` and `db_2.ndf` are preallocated with fallocate (instant file initialization),
//! `db_log.ldf` is zero-filled. Each transaction appends a log record (512 B to 60 KiB,
//! sector aligned, O_DIRECT|O_DSYNC: acknowledged when the write returns) naming the pages
//! it changes and their new versions, then writes those 8 KiB pages at 8 KiB-aligned offsets
//! with O_DIRECT. A checkpoint fdatasyncs the data files and appends a checkpoint record.
//! Acknowledgements go to a file outside the database directory.
//!
//! `verify` proves: every acknowledged log record is intact, in order; every page written
//! before the last acknowledged checkpoint holds that version or a later logged one, with a
//! valid checksum; every page never written reads as zeros.
//!
//!   tdefs-dbsim init --dir D [--data-mib N]
//!   tdefs-dbsim run --dir D --ack FILE [--seed S] [--txns N]
//!   tdefs-dbsim verify --dir D --ack FILE

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

const PAGE: usize = 8192;
const SECTOR: usize = 512;
const LOG_MAGIC: u32 = 0x4c4f_4752; // "RGOL"
const FILES: [&str; 2] = ["db.mdf", "db_2.ndf"];
const LOG: &str = "db_log.ldf";

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Init {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value_t = 48)]
        data_mib: u64,
    },
    Run {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        ack: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Stop after this many transactions (default: run until killed).
        #[arg(long)]
        txns: Option<u64>,
    },
    Verify {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        ack: PathBuf,
    },
}

/// 8 KiB-aligned buffer for O_DIRECT.
struct Buf {
    ptr: *mut u8,
    len: usize,
}
impl Buf {
    fn new(len: usize) -> Buf {
        let l = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        Buf { ptr: unsafe { std::alloc::alloc_zeroed(l) }, len }
    }
    fn bytes(&mut self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}
impl Drop for Buf {
    fn drop(&mut self) {
        unsafe { std::alloc::dealloc(self.ptr, std::alloc::Layout::from_size_align(self.len, 4096).unwrap()) }
    }
}

fn sum(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

/// Contents of page (file, page) at `version`, written by log record `lsn`.
fn page_image(file: u8, page: u32, version: u32, lsn: u64, out: &mut [u8]) {
    out[0] = file;
    out[4..8].copy_from_slice(&page.to_le_bytes());
    out[8..12].copy_from_slice(&version.to_le_bytes());
    out[12..20].copy_from_slice(&lsn.to_le_bytes());
    let mut x = (file as u64) << 40 ^ (page as u64) << 8 ^ version as u64 ^ 0x9E37_79B9_7F4A_7C15;
    for b in out[24..].iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let c = sum(&out[24..]);
    out[20..24].copy_from_slice(&c.to_le_bytes());
}

fn page_valid(b: &[u8]) -> Option<(u8, u32, u32, u64)> {
    let c = u32::from_le_bytes(b[20..24].try_into().unwrap());
    (sum(&b[24..]) == c).then(|| {
        (b[0], u32::from_le_bytes(b[4..8].try_into().unwrap()), u32::from_le_bytes(b[8..12].try_into().unwrap()), u64::from_le_bytes(b[12..20].try_into().unwrap()))
    })
}

#[derive(Clone, Debug)]
enum Rec {
    /// Pages changed (file, page, version), and how many bytes of row images the record
    /// carries (what makes real log records 512 B to 60 KiB).
    Update(Vec<(u8, u32, u32)>, u32),
    Checkpoint,
}

/// Log record: magic u32 | lsn u64 | len u32 (total, sector multiple) | kind u8 | n u32 |
/// entries (file u8, page u32, version u32)* | zero padding | crc32 of all but the last 4 bytes.
fn encode(lsn: u64, rec: &Rec, buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend(LOG_MAGIC.to_le_bytes());
    buf.extend(lsn.to_le_bytes());
    buf.extend(0u32.to_le_bytes());
    match rec {
        Rec::Update(e, payload) => {
            buf.push(1);
            buf.extend((e.len() as u32).to_le_bytes());
            for (f, p, v) in e {
                buf.push(*f);
                buf.extend(p.to_le_bytes());
                buf.extend(v.to_le_bytes());
            }
            buf.extend(payload.to_le_bytes());
            let mut x = lsn | 1;
            buf.extend((0..*payload).map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            }));
        }
        Rec::Checkpoint => {
            buf.push(2);
            buf.extend(0u32.to_le_bytes());
        }
    }
    let len = (buf.len() + 4).div_ceil(SECTOR) * SECTOR;
    buf.resize(len - 4, 0);
    buf[12..16].copy_from_slice(&(len as u32).to_le_bytes());
    let c = sum(buf);
    buf.extend(c.to_le_bytes());
}

/// Parse the log: records in order until the first invalid one; returns them with their
/// offsets and the end of the valid part.
fn read_log(log: &[u8]) -> (Vec<(u64, u64, Rec)>, u64) {
    let mut out = Vec::new();
    let mut off = 0usize;
    let mut next_lsn = 1;
    while off + SECTOR <= log.len() {
        let b = &log[off..];
        if u32::from_le_bytes(b[0..4].try_into().unwrap()) != LOG_MAGIC {
            break;
        }
        let lsn = u64::from_le_bytes(b[4..12].try_into().unwrap());
        let len = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
        if lsn != next_lsn || len < SECTOR || len % SECTOR != 0 || off + len > log.len() {
            break;
        }
        let c = u32::from_le_bytes(b[len - 4..len].try_into().unwrap());
        if sum(&b[..len - 4]) != c {
            break;
        }
        let rec = match b[16] {
            1 => {
                let n = u32::from_le_bytes(b[17..21].try_into().unwrap()) as usize;
                if 25 + n * 9 > len {
                    break;
                }
                let e = (0..n)
                    .map(|i| {
                        let q = &b[21 + i * 9..30 + i * 9];
                        (q[0], u32::from_le_bytes(q[1..5].try_into().unwrap()), u32::from_le_bytes(q[5..9].try_into().unwrap()))
                    })
                    .collect();
                let payload = u32::from_le_bytes(b[21 + n * 9..25 + n * 9].try_into().unwrap());
                Rec::Update(e, payload)
            }
            _ => Rec::Checkpoint,
        };
        out.push((lsn, off as u64, rec));
        off += len;
        next_lsn += 1;
    }
    (out, off as u64)
}

fn open_direct(p: &Path, sync: bool) -> std::io::Result<File> {
    let flags = libc::O_DIRECT | if sync { libc::O_DSYNC } else { 0 };
    OpenOptions::new().read(true).write(true).custom_flags(flags).open(p)
}

fn init(dir: &Path, data_mib: u64) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, f) in FILES.iter().enumerate() {
        let file = OpenOptions::new().write(true).create_new(true).open(dir.join(f))?;
        let size = (data_mib << 20) / (i as u64 + 1);
        // Instant file initialization: allocated, never written, reads as zeros.
        if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as i64) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        file.sync_all()?;
    }
    let log = OpenOptions::new().write(true).create_new(true).open(dir.join(LOG))?;
    let zeros = vec![0u8; 1 << 20];
    for i in 0..16 {
        log.write_all_at(&zeros, i << 20)?;
    }
    log.sync_all()?;
    File::open(dir)?.sync_all()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn run(dir: &Path, ack: &Path, seed: u64, txns: Option<u64>) -> std::io::Result<()> {
    let log_bytes = std::fs::read(dir.join(LOG))?;
    let (recs, mut end) = read_log(&log_bytes);
    let log_size = log_bytes.len() as u64;
    let mut versions: BTreeMap<(u8, u32), u32> = BTreeMap::new();
    for (_, _, r) in &recs {
        if let Rec::Update(e, _) = r {
            for (f, p, v) in e {
                versions.insert((*f, *p), *v);
            }
        }
    }
    let mut lsn = recs.last().map(|r| r.0).unwrap_or(0) + 1;
    let data: Vec<File> = FILES.iter().map(|f| open_direct(&dir.join(f), false)).collect::<Result<_, _>>()?;
    let pages: Vec<u32> = data.iter().map(|f| (f.metadata().unwrap().len() / PAGE as u64) as u32).collect();
    let log = open_direct(&dir.join(LOG), true)?;
    // Crash recovery, as a database does on start: redo every update logged after the last
    // checkpoint (its pages may never have been written), then make the pages durable.
    let last_ckpt = recs.iter().rposition(|r| matches!(r.2, Rec::Checkpoint)).map(|i| i + 1).unwrap_or(0);
    let mut pagebuf = Buf::new(PAGE);
    for (lsn, _, r) in &recs[last_ckpt..] {
        if let Rec::Update(e, _) = r {
            for (f, p, v) in e {
                page_image(*f, *p, *v, *lsn, pagebuf.bytes());
                data[*f as usize].write_all_at(pagebuf.bytes(), *p as u64 * PAGE as u64)?;
            }
        }
    }
    for f in &data {
        f.sync_data()?;
    }
    let mut acks = OpenOptions::new().create(true).append(true).open(ack)?;
    let mut rng = Rng(seed ^ lsn);
    let mut logbuf = Buf::new(64 * 1024);
    let mut enc = Vec::new();
    let mut done = 0;
    loop {
        if txns.is_some_and(|t| done >= t) {
            return Ok(());
        }
        let rec = if done % 25 == 24 {
            for f in &data {
                f.sync_data()?;
            }
            Rec::Checkpoint
        } else {
            // 1 to 8 pages; row images from a few bytes to ~58 KiB (records 512 B-60 KiB).
            let n = 1 + rng.below(8) as usize;
            let payload = if rng.below(5) == 0 { rng.below(58 * 1024) } else { rng.below(3000) } as u32;
            let e: Vec<(u8, u32, u32)> = (0..n)
                .map(|_| {
                    let f = rng.below(2) as u8;
                    let p = rng.below(pages[f as usize] as u64) as u32;
                    let v = versions.get(&(f, p)).copied().unwrap_or(0) + 1;
                    versions.insert((f, p), v);
                    (f, p, v)
                })
                .collect();
            Rec::Update(e, payload)
        };
        encode(lsn, &rec, &mut enc);
        if end + enc.len() as u64 > log_size {
            return Ok(()); // log full: this run is over
        }
        logbuf.bytes()[..enc.len()].copy_from_slice(&enc);
        let lb = &logbuf.bytes()[..enc.len()];
        log.write_all_at(lb, end)?; // O_DSYNC: durable when it returns
        writeln!(acks, "{} {lsn}", if matches!(rec, Rec::Checkpoint) { "C" } else { "L" })?;
        end += enc.len() as u64;
        if let Rec::Update(e, _) = &rec {
            for (f, p, v) in e {
                page_image(*f, *p, *v, lsn, pagebuf.bytes());
                data[*f as usize].write_all_at(pagebuf.bytes(), *p as u64 * PAGE as u64)?;
            }
        }
        lsn += 1;
        done += 1;
    }
}

fn verify(dir: &Path, ack: &Path) -> Result<String, String> {
    let log_bytes = std::fs::read(dir.join(LOG)).map_err(|e| e.to_string())?;
    let (recs, _) = read_log(&log_bytes);
    let ack_text = std::fs::read_to_string(ack).unwrap_or_default();
    let mut last_acked = 0;
    let mut last_ckpt = 0;
    for l in ack_text.lines() {
        let mut it = l.split(' ');
        let (Some(k), Some(n)) = (it.next(), it.next().and_then(|n| n.parse::<u64>().ok())) else { continue };
        last_acked = last_acked.max(n);
        if k == "C" {
            last_ckpt = last_ckpt.max(n);
        }
    }
    let have = recs.last().map(|r| r.0).unwrap_or(0);
    if have < last_acked {
        return Err(format!("log holds records up to LSN {have}, but LSN {last_acked} was acknowledged"));
    }
    // Every logged version of each page, and the version due at the last checkpoint.
    let mut logged: BTreeMap<(u8, u32), Vec<(u32, u64)>> = BTreeMap::new();
    let mut due: BTreeMap<(u8, u32), u32> = BTreeMap::new();
    for (lsn, _, r) in &recs {
        if let Rec::Update(e, _) = r {
            for (f, p, v) in e {
                logged.entry((*f, *p)).or_default().push((*v, *lsn));
                if *lsn < last_ckpt {
                    due.insert((*f, *p), *v);
                }
            }
        }
    }
    let mut checked = 0;
    for (i, name) in FILES.iter().enumerate() {
        let bytes = std::fs::read(dir.join(name)).map_err(|e| e.to_string())?;
        for (p, page) in bytes.chunks(PAGE).enumerate() {
            let key = (i as u8, p as u32);
            match logged.get(&key) {
                None => {
                    if page.iter().any(|&b| b != 0) {
                        return Err(format!("{name} page {p} was never written but is not zeros"));
                    }
                }
                Some(vs) => {
                    let want = due.get(&key).copied();
                    match page_valid(page) {
                        Some((f, pg, v, lsn)) if f as usize == i && pg as usize == p && vs.contains(&(v, lsn)) => {
                            if want.is_some_and(|w| v < w) {
                                return Err(format!("{name} page {p}: version {v} older than {} written before the checkpoint", want.unwrap()));
                            }
                            checked += 1;
                        }
                        _ if want.is_none() => {} // written after the last checkpoint: may be torn; the log redoes it
                        _ => return Err(format!("{name} page {p}: damaged or unknown contents though due at version {}", want.unwrap())),
                    }
                }
            }
        }
    }
    Ok(format!("log intact up to acknowledged LSN {last_acked}; {checked} pages verified, never-written pages are zeros"))
}

fn main() -> ExitCode {
    let r = match Cli::parse().cmd {
        Cmd::Init { dir, data_mib } => init(&dir, data_mib).map(|()| "initialized".to_string()).map_err(|e| e.to_string()),
        Cmd::Run { dir, ack, seed, txns } => run(&dir, &ack, seed, txns).map(|()| "done".to_string()).map_err(|e| e.to_string()),
        Cmd::Verify { dir, ack } => verify(&dir, &ack),
    };
    match r {
        Ok(s) => {
            eprintln!("dbsim: {s}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dbsim FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
