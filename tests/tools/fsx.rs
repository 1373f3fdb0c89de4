//! fsx-style exerciser (issue 4): random operations on one file, every read checked against
//! an in-memory model; on a mismatch the log of recent operations is printed.
//!
//!   tdefs-fsx --file PATH [--seed S] [--ops N] [--max-size BYTES] [--no-mmap]
//! Operations: write, read, truncate, fallocate (default, KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE
//! with and without KEEP_SIZE), mmap read, mmap write, copy_file_range from a second file,
//! fsync, close and reopen. Exit status 0 when every read matched.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    file: PathBuf,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 10_000)]
    ops: u64,
    #[arg(long, default_value_t = 1 << 18)]
    max_size: u64,
    /// Leave out the mmap operations.
    #[arg(long)]
    no_mmap: bool,
}

#[path = "rng.rs"]
mod rng;
use rng::Rng;

struct Fsx {
    path: PathBuf,
    f: File,
    src: File,
    src_model: Vec<u8>,
    model: Vec<u8>,
    log: VecDeque<String>,
    rng: Rng,
    max: u64,
}

fn errno() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Fsx {
    fn note(&mut self, op: String) {
        if self.log.len() == 40 {
            self.log.pop_front();
        }
        self.log.push_back(op);
    }

    fn fail(&self, what: String) -> String {
        let mut s = format!("fsx FAILED: {what}\nlast operations (oldest first):\n");
        for l in &self.log {
            s.push_str(&format!("  {l}\n"));
        }
        s
    }

    fn check(&self, off: u64, got: &[u8], how: &str) -> Result<(), String> {
        let lo = (off as usize).min(self.model.len());
        let want = &self.model[lo..(lo + got.len()).min(self.model.len())];
        if got.len() != want.len() || got != want {
            let at = got.iter().zip(want.iter()).position(|(a, b)| a != b).unwrap_or(got.len().min(want.len()));
            return Err(self.fail(format!(
                "{how} at {off}+{}: byte {} is {:?}, model has {:?} (file size {}, read {} bytes, expected {})",
                got.len(), off + at as u64, got.get(at), want.get(at), self.model.len(), got.len(), want.len()
            )));
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.model.len() as u64
    }

    fn step(&mut self, mmap: bool) -> Result<(), String> {
        let size = self.size();
        let off = match self.rng.below(4) {
            0 => self.rng.below(self.max),
            1 => self.rng.below(self.max / 4096) * 4096,
            _ => self.rng.below(size + 1),
        };
        let len = if self.rng.below(4) == 0 { 4096 * (1 + self.rng.below(16)) } else { 1 + self.rng.below(64 * 1024) };
        let len = len.min(self.max.saturating_sub(off)).max(1);
        match self.rng.below(16) {
            0..=3 => {
                let data = self.rng.bytes(len as usize);
                self.note(format!("write {off} {len}"));
                self.f.write_all_at(&data, off).map_err(|e| self.fail(format!("write: {e}")))?;
                let end = (off + len) as usize;
                if self.model.len() < end {
                    self.model.resize(end, 0);
                }
                self.model[off as usize..end].copy_from_slice(&data);
            }
            4..=6 => {
                self.note(format!("read {off} {len}"));
                let mut buf = vec![0u8; len as usize];
                let mut n = 0;
                while n < buf.len() {
                    match self.f.read_at(&mut buf[n..], off + n as u64).map_err(|e| self.fail(format!("read: {e}")))? {
                        0 => break,
                        k => n += k,
                    }
                }
                self.check(off, &buf[..n], "read")?;
            }
            7 => {
                let n = self.rng.below(self.max);
                self.note(format!("truncate {n}"));
                self.f.set_len(n).map_err(|e| self.fail(format!("truncate: {e}")))?;
                self.model.resize(n as usize, 0);
            }
            8 | 9 => {
                let modes = [0, libc::FALLOC_FL_KEEP_SIZE, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                             libc::FALLOC_FL_ZERO_RANGE, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE];
                let mode = modes[self.rng.below(modes.len() as u64) as usize];
                self.note(format!("fallocate mode={mode:#x} {off} {len}"));
                if unsafe { libc::fallocate(self.f.as_raw_fd(), mode, off as i64, len as i64) } != 0 {
                    return Err(self.fail(format!("fallocate: {}", errno())));
                }
                let end = (off + len) as usize;
                if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                    let z = end.min(self.model.len());
                    if (off as usize) < z {
                        self.model[off as usize..z].fill(0);
                    }
                }
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && self.model.len() < end {
                    self.model.resize(end, 0);
                }
            }
            10 | 11 if mmap && size > 0 => {
                let o = self.rng.below(size);
                let l = (1 + self.rng.below(32 * 1024)).min(size - o);
                let write = self.rng.below(2) == 0;
                let data = self.rng.bytes(l as usize);
                self.note(format!("{} {o} {l}", if write { "mapwrite" } else { "mapread" }));
                let page = o & !4095;
                let maplen = (o + l - page) as usize;
                unsafe {
                    let p = libc::mmap(std::ptr::null_mut(), maplen, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, self.f.as_raw_fd(), page as i64);
                    if p == libc::MAP_FAILED {
                        return Err(self.fail(format!("mmap: {}", errno())));
                    }
                    let s = std::slice::from_raw_parts_mut((p as *mut u8).add((o - page) as usize), l as usize);
                    if write {
                        s.copy_from_slice(&data);
                        self.model[o as usize..(o + l) as usize].copy_from_slice(&data);
                        if libc::msync(p, maplen, libc::MS_SYNC) != 0 {
                            let e = errno();
                            libc::munmap(p, maplen);
                            return Err(self.fail(format!("msync: {e}")));
                        }
                        libc::munmap(p, maplen);
                    } else {
                        let got = s.to_vec();
                        libc::munmap(p, maplen);
                        self.check(o, &got, "mmap read")?;
                    }
                }
            }
            12 => {
                let so = self.rng.below(self.src_model.len() as u64);
                let l = len.min(self.src_model.len() as u64 - so);
                self.note(format!("copy_range src+{so} -> {off} {l}"));
                let (mut oi, mut oo) = (so as i64, off as i64);
                let mut left = l as usize;
                while left > 0 {
                    let n = unsafe { libc::copy_file_range(self.src.as_raw_fd(), &mut oi, self.f.as_raw_fd(), &mut oo, left, 0) };
                    if n < 0 {
                        return Err(self.fail(format!("copy_file_range: {}", errno())));
                    }
                    if n == 0 {
                        break;
                    }
                    left -= n as usize;
                }
                let end = (off + l) as usize;
                if self.model.len() < end {
                    self.model.resize(end, 0);
                }
                self.model[off as usize..end].copy_from_slice(&self.src_model[so as usize..(so + l) as usize]);
            }
            13 => {
                self.note("fsync".into());
                self.f.sync_all().map_err(|e| self.fail(format!("fsync: {e}")))?;
            }
            14 => {
                self.note("close+reopen".into());
                self.f = OpenOptions::new().read(true).write(true).open(&self.path).map_err(|e| self.fail(format!("reopen: {e}")))?;
            }
            _ => {
                // Whole-file check now and then.
                self.note("check file".into());
                let got = std::fs::read(&self.path).map_err(|e| self.fail(format!("read file: {e}")))?;
                if got.len() != self.model.len() {
                    return Err(self.fail(format!("file size {} but model has {}", got.len(), self.model.len())));
                }
                self.check(0, &got, "whole-file read")?;
            }
        }
        Ok(())
    }
}

fn main() -> ExitCode {
    let a = Args::parse();
    let mut rng = Rng(a.seed);
    let src_path = a.file.with_extension("fsx-src");
    let src_model = rng.bytes(200_000);
    std::fs::write(&src_path, &src_model).expect("write the copy source");
    let open = |p: &PathBuf| OpenOptions::new().read(true).write(true).create(true).truncate(true).open(p);
    let mut fsx = Fsx {
        path: a.file.clone(),
        f: open(&a.file).expect("open the test file"),
        src: File::open(&src_path).expect("open the copy source"),
        src_model,
        model: Vec::new(),
        log: VecDeque::new(),
        rng,
        max: a.max_size,
    };
    for i in 0..a.ops {
        if let Err(e) = fsx.step(!a.no_mmap) {
            eprintln!("{e}");
            eprintln!("seed {} failed at op {i}", a.seed);
            return ExitCode::FAILURE;
        }
    }
    let got = std::fs::read(&a.file).unwrap_or_default();
    if got != fsx.model {
        eprintln!("{}", fsx.fail("final contents differ from the model".into()));
        return ExitCode::FAILURE;
    }
    let _ = std::fs::remove_file(&src_path);
    println!("fsx: {} ops, seed {}: all reads matched", a.ops, a.seed);
    ExitCode::SUCCESS
}
