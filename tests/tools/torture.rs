//! Crash torture for tdefs (issues 3 and 21).
//!
//! `tdefs-torture run` mounts tdefs over a scratch backing directory and, cycle after cycle,
//! starts a workload process that performs careful operations (each made durable with
//! fsync of the file and of the directories it changed, except scribbles: writes never
//! synced, rewrites: O_TRUNC + write + fsync of the file only, and loose creates: a new
//! file fsynced but not its directory) and journals every operation before it starts (`B`)
//! and the moment the syscall that completes it returns (`D`, before the workload sends the
//! mount anything else). At a random moment the tdefs daemon is killed with SIGKILL (and,
//! in `kill-both` mode, the workload too); with `--powercut` the power-cut simulator under
//! the backing directory then throws away what was not durable. tdefs is mounted again and
//! the tree is checked against the journal: every durable operation must be reflected
//! exactly, the single operation in flight may have happened or not — each of its bytes old
//! or new, never noise (XTS: but see `XTS_WINDOWS_EXCUSED`) — and loose names may be
//! missing until a later operation fsynced their directory. Every earlier cycle's directory is re-checked after each remount. At
//! the end: a clean `tdefs umount`, `tdefs check` clean, no `panicked` in the daemon's log,
//! and the plaintext scan (`tdefs-scan --no-plaintext`; every buffer the workload writes
//! carries `TDEFS-MARKER-torture`) must find nothing.
//!
//! What makes a run fail besides a wrong tree (so that a run which proves nothing cannot
//! pass):
//! - a workload that exits, or makes no operation durable within 20 s, before its first
//!   durable operation (the mkdir of its directory; the kill comes at a random moment after
//!   it), that dies before the kill, or that does not stop on the dead mount's error
//!   (kill-fs); its stderr (kept in the work directory) is shown;
//! - the floor: fewer durable operations than `--min-durable-per-cycle` (default 20) per
//!   cycle on average. A cycle runs 30 to 30 + max-run-ms (default 730) ms after its first
//!   durable operation, 380 ms on average; an operation (a few fsyncs through FUSE) takes
//!   1 to 4 ms here, and runs of 24 cycles verify 150 to 300 per cycle on average (the
//!   shortest cycles 8 to 50): the floor leaves a factor of 7 for a loaded machine and
//!   still fails a workload that stalls after its first operation;
//! - with `--powercut`: no cut that rolled back any file's data, or no cut that undid any
//!   namespace operation (read with `lastcut`), over the run; an undo the simulator failed.
//!
//! kill-both: see `kill_both` — the workload is SIGKILLed only while it is asleep in a
//! request of the mount with the daemon stopped, so an operation whose completing syscall
//! returned has always been journalled, and is never taken for one in flight.
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(about = "Crash torture for tdefs: kill -9 the daemon mid-workload, remount, verify")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug)]
enum Mode {
    /// SIGKILL the tdefs daemon; the workload sees its mount die.
    KillFs,
    /// SIGKILL the workload and the daemon together.
    KillBoth,
    /// Alternate between the two.
    Mixed,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run crash cycles and report.
    Run {
        /// The tdefs binary.
        #[arg(long)]
        tdefs: PathBuf,
        #[arg(long, default_value_t = 20)]
        cycles: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, value_enum, default_value_t = Mode::Mixed)]
        mode: Mode,
        #[arg(long, default_value = "aes256-ctr")]
        method: String,
        /// Scratch directory (default: a new one under /tmp, removed on success).
        #[arg(long)]
        workdir: Option<PathBuf>,
        /// Longest time a workload runs before the kill, in milliseconds.
        #[arg(long, default_value_t = 700)]
        max_run_ms: u64,
        /// Put the power-cut simulator (this binary) under the backing directory and cut
        /// power after every kill: only what was fsynced survives.
        #[arg(long)]
        powercut: Option<PathBuf>,
        /// Floor: the run fails unless it verified at least this many durable operations
        /// per cycle on average (see the module documentation for the choice).
        #[arg(long, default_value_t = DEFAULT_MIN_DURABLE_PER_CYCLE)]
        min_durable_per_cycle: u64,
        /// The plaintext scanner (default: tdefs-scan beside this binary).
        #[arg(long)]
        scan: Option<PathBuf>,
        /// Send the simulator `sync` before every cut, so that no cut rolls anything back
        /// (as a simulator that failed to model power loss would): only to prove that the
        /// floor on rolled-back operations fails such a run.
        #[arg(long)]
        sync_before_cut: bool,
    },
    /// Mount a kept work directory and check one cycle's journal again.
    Verify {
        #[arg(long)]
        tdefs: PathBuf,
        #[arg(long)]
        workdir: PathBuf,
        #[arg(long)]
        cycle: u32,
    },
    /// The workload (started by `run`).
    Work {
        #[arg(long)]
        mnt: PathBuf,
        #[arg(long)]
        dir: String,
        #[arg(long)]
        journal: PathBuf,
        #[arg(long)]
        seed: u64,
        /// Stop after this many operations (default: run until killed).
        #[arg(long)]
        ops: Option<u64>,
    },
    /// Concurrent stress: several workload processes on one mounted tdefs, each in its own
    /// directory, then every tree checked exactly against its journal.
    Stress {
        #[arg(long)]
        mnt: PathBuf,
        #[arg(long, default_value_t = 4)]
        workers: u32,
        #[arg(long, default_value_t = 2000)]
        ops: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Where the journals go (outside the mount).
        #[arg(long)]
        journals: PathBuf,
    },
}

/// Default floor of durable operations per cycle, on average over a run (see the module
/// documentation).
const DEFAULT_MIN_DURABLE_PER_CYCLE: u64 = 20;

// ---------------------------------------------------------------- model

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Mkdir(String),
    Create(String, u64, u64),             // path, len, seed
    Write(String, u64, u64, u64, bool),   // path, off, len, seed, datasync
    /// A write with no fsync after it: may or may not survive until the file is next synced.
    Scribble(String, u64, u64, u64),      // path, off, len, seed
    Truncate(String, u64),                // path, len
    Falloc(String, i32, u64, u64),        // path, mode, off, len
    Rename(String, String),
    Link(String, String),
    Unlink(String),
    Rmdir(String),
    /// Open with O_TRUNC, write, fsync the file and nothing else: the name was durable
    /// before, and the file's fresh IV must be made durable by the file's own fsync.
    Rewrite(String, u64, u64), // path, len, seed
    /// Create, write and fsync a new file, but not its directory: the data is durable, the
    /// name only once a later operation fsyncs the directory (strict power cuts undo it).
    Loose(String, u64, u64), // path, len, seed
}

impl Op {
    fn encode(&self) -> String {
        match self {
            Op::Mkdir(p) => format!("mkdir {p}"),
            Op::Create(p, l, s) => format!("create {p} {l} {s}"),
            Op::Write(p, o, l, s, d) => format!("write {p} {o} {l} {s} {}", *d as u8),
            Op::Scribble(p, o, l, s) => format!("scribble {p} {o} {l} {s}"),
            Op::Truncate(p, l) => format!("truncate {p} {l}"),
            Op::Falloc(p, m, o, l) => format!("falloc {p} {m} {o} {l}"),
            Op::Rename(a, b) => format!("rename {a} {b}"),
            Op::Link(a, b) => format!("link {a} {b}"),
            Op::Unlink(p) => format!("unlink {p}"),
            Op::Rmdir(p) => format!("rmdir {p}"),
            Op::Rewrite(p, l, s) => format!("rewrite {p} {l} {s}"),
            Op::Loose(p, l, s) => format!("loose {p} {l} {s}"),
        }
    }

    fn decode(s: &str) -> Option<Op> {
        let f: Vec<&str> = s.split(' ').collect();
        let n = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok());
        let p = |i: usize| f.get(i).map(|x| x.to_string());
        Some(match *f.first()? {
            "mkdir" => Op::Mkdir(p(1)?),
            "create" => Op::Create(p(1)?, n(2)?, n(3)?),
            "write" => Op::Write(p(1)?, n(2)?, n(3)?, n(4)?, n(5)? == 1),
            "scribble" => Op::Scribble(p(1)?, n(2)?, n(3)?, n(4)?),
            "truncate" => Op::Truncate(p(1)?, n(2)?),
            "falloc" => Op::Falloc(p(1)?, f.get(2)?.parse().ok()?, n(3)?, n(4)?),
            "rename" => Op::Rename(p(1)?, p(2)?),
            "link" => Op::Link(p(1)?, p(2)?),
            "unlink" => Op::Unlink(p(1)?),
            "rmdir" => Op::Rmdir(p(1)?),
            "rewrite" => Op::Rewrite(p(1)?, n(2)?, n(3)?),
            "loose" => Op::Loose(p(1)?, n(2)?, n(3)?),
            _ => return None,
        })
    }

    fn is_data_op(&self) -> bool {
        self.data_path().is_some()
    }

    /// The file a data operation changes.
    fn data_path(&self) -> Option<&str> {
        match self {
            Op::Write(p, ..) | Op::Scribble(p, ..) | Op::Truncate(p, ..) | Op::Falloc(p, ..) | Op::Rewrite(p, ..) => Some(p),
            _ => None,
        }
    }

    /// The directories whose fsync ends this operation (every earlier change of their
    /// entries is durable afterwards).
    fn synced_dirs(&self) -> Vec<&str> {
        match self {
            Op::Mkdir(p) | Op::Create(p, ..) | Op::Unlink(p) | Op::Rmdir(p) => vec![parent(p)],
            Op::Rename(a, b) => vec![parent(a), parent(b)],
            Op::Link(_, b) => vec![parent(b)],
            _ => vec![],
        }
    }
}

/// Every generated buffer carries this text every `MARKER_EVERY` bytes, so that the
/// plaintext scan at the end of a run has something to look for (tdefs-scan knows the
/// prefix `TDEFS-MARKER-`).
const MARKER: &[u8] = b"TDEFS-MARKER-torture ";
const MARKER_EVERY: usize = 1024;

/// Deterministic bytes for (seed, len), with the marker text every MARKER_EVERY bytes.
fn data(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    for at in (0..v.len()).step_by(MARKER_EVERY) {
        let n = MARKER.len().min(v.len() - at);
        v[at..at + n].copy_from_slice(&MARKER[..n]);
    }
    v
}

/// Names -> file ids (hard links share an id), contents by id (current, and as of the
/// file's last fsync), directories. `loose` names (Op::Loose) may be absent after a power
/// cut until their directory is fsynced; then they join `names`. Until then no other
/// operation touches them.
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    names: BTreeMap<String, usize>,
    loose: BTreeMap<String, usize>,
    contents: Vec<Vec<u8>>,
    synced: Vec<Vec<u8>>,
    /// Contents after each unsynced write but the last (which is `contents`): a crash may
    /// leave any of them, since the kernel flushes each write's pages when its file is
    /// closed, and a later write's flush may be the one the kill interrupts.
    between: Vec<Vec<Vec<u8>>>,
    dirs: BTreeSet<String>,
}

fn parent(p: &str) -> &str {
    p.rsplit_once('/').map(|(a, _)| a).unwrap_or("")
}

impl Model {
    fn content(&self, path: &str) -> Option<&Vec<u8>> {
        self.names.get(path).or_else(|| self.loose.get(path)).map(|&i| &self.contents[i])
    }

    fn apply(&mut self, op: &Op) {
        // Every op but a scribble ends with an fsync of the file it changed.
        let touched = match op {
            Op::Write(p, ..) | Op::Truncate(p, ..) | Op::Falloc(p, ..) | Op::Rewrite(p, ..) => self.names.get(p).copied(),
            _ => None,
        };
        match op {
            Op::Mkdir(d) => {
                self.dirs.insert(d.clone());
            }
            Op::Create(p, l, s) => {
                self.contents.push(data(*s, *l));
                self.synced.push(data(*s, *l));
                self.between.push(Vec::new());
                self.names.insert(p.clone(), self.contents.len() - 1);
            }
            Op::Loose(p, l, s) => {
                self.contents.push(data(*s, *l));
                self.synced.push(data(*s, *l));
                self.between.push(Vec::new());
                self.loose.insert(p.clone(), self.contents.len() - 1);
            }
            Op::Rewrite(p, l, s) => self.contents[self.names[p]] = data(*s, *l),
            Op::Write(p, o, l, s, _) | Op::Scribble(p, o, l, s) => {
                let id = self.names[p];
                if matches!(op, Op::Scribble(..)) && self.contents[id] != self.synced[id] {
                    let earlier = self.contents[id].clone();
                    self.between[id].push(earlier);
                }
                let c = &mut self.contents[id];
                let end = (*o + *l) as usize;
                if c.len() < end {
                    c.resize(end, 0);
                }
                c[*o as usize..end].copy_from_slice(&data(*s, *l));
            }
            Op::Truncate(p, l) => self.contents[self.names[p]].resize(*l as usize, 0),
            Op::Falloc(p, mode, o, l) => {
                let c = &mut self.contents[self.names[p]];
                let end = (*o + *l) as usize;
                if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                    let z = end.min(c.len());
                    if (*o as usize) < z {
                        c[*o as usize..z].fill(0);
                    }
                }
                if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && c.len() < end {
                    c.resize(end, 0);
                }
            }
            Op::Rename(a, b) => {
                if self.dirs.contains(a) {
                    let pre = format!("{a}/");
                    let moved_dirs: Vec<String> = self.dirs.iter().filter(|d| *d == a || d.starts_with(&pre)).cloned().collect();
                    for d in moved_dirs {
                        self.dirs.remove(&d);
                        self.dirs.insert(format!("{b}{}", &d[a.len()..]));
                    }
                    for map in [&mut self.names, &mut self.loose] {
                        let moved: Vec<(String, usize)> = map.iter().filter(|(n, _)| n.starts_with(&pre)).map(|(n, i)| (n.clone(), *i)).collect();
                        for (n, i) in moved {
                            map.remove(&n);
                            map.insert(format!("{b}{}", &n[a.len()..]), i);
                        }
                    }
                } else if self.names.get(a).is_some() && self.names.get(a) == self.names.get(b) {
                    // Two links of one file: rename(2) does nothing (POSIX).
                } else if let Some(i) = self.names.remove(a) {
                    self.names.insert(b.clone(), i);
                }
            }
            Op::Link(a, b) => {
                let i = self.names[a];
                self.names.insert(b.clone(), i);
            }
            Op::Unlink(p) => {
                self.names.remove(p);
            }
            Op::Rmdir(d) => {
                self.dirs.remove(d);
            }
        }
        if let Some(id) = touched {
            self.synced[id] = self.contents[id].clone();
            self.between[id].clear();
        }
        // A directory fsync makes the loose names in it durable.
        for d in op.synced_dirs() {
            let now: Vec<String> = self.loose.keys().filter(|n| parent(n) == d).cloned().collect();
            for n in now {
                let id = self.loose.remove(&n).unwrap();
                self.names.insert(n, id);
            }
        }
    }

    fn children_of(&self, d: &str) -> usize {
        let pre = format!("{d}/");
        self.names.keys().chain(self.loose.keys()).filter(|n| n.starts_with(&pre)).count() + self.dirs.iter().filter(|x| x.starts_with(&pre)).count()
    }
}

// ---------------------------------------------------------------- workload

#[path = "rng.rs"]
mod rng;
use rng::Rng;

fn gen_op(m: &Model, root: &str, rng: &mut Rng, counter: &mut u64) -> Op {
    *counter += 1;
    let dirs: Vec<String> = m.dirs.iter().filter(|d| d.starts_with(root)).cloned().collect();
    let files: Vec<String> = m.names.keys().cloned().collect();
    let fresh = |rng: &mut Rng, dirs: &[String], c: u64| format!("{}/f{c}", rng.pick(dirs).unwrap());
    loop {
        let op = match rng.below(22) {
            0 | 1 if dirs.len() < 12 => Op::Mkdir(format!("{}/d{counter}", rng.pick(&dirs).unwrap())),
            2..=4 => Op::Create(fresh(rng, &dirs, *counter), rng.below(150_000), rng.next()),
            5..=8 if !files.is_empty() => {
                let p = rng.pick(&files).unwrap().clone();
                let len = m.content(&p).map(|c| c.len() as u64).unwrap_or(0);
                let off = match rng.below(3) { 0 => rng.below(len + 1), 1 => rng.below(40) * 4096, _ => len + rng.below(30_000) };
                let l = if rng.below(3) == 0 { 4096 * (1 + rng.below(8)) } else { 1 + rng.below(60_000) };
                Op::Write(p, off, l, rng.next(), rng.below(2) == 0)
            }
            9 if !files.is_empty() => {
                let p = rng.pick(&files).unwrap().clone();
                let l = if rng.below(3) == 0 { 0 } else { rng.below(200_000) };
                Op::Truncate(p, l)
            }
            18 | 19 if !files.is_empty() => {
                let p = rng.pick(&files).unwrap().clone();
                let len = m.content(&p).map(|c| c.len() as u64).unwrap_or(0);
                Op::Scribble(p, rng.below(len + 20_000), 1 + rng.below(30_000), rng.next())
            }
            10 if !files.is_empty() => {
                let modes = [0, libc::FALLOC_FL_KEEP_SIZE, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, libc::FALLOC_FL_ZERO_RANGE];
                let p = rng.pick(&files).unwrap().clone();
                Op::Falloc(p, *rng.pick(&modes).unwrap(), rng.below(150_000), 1 + rng.below(50_000))
            }
            11 | 12 if !files.is_empty() => {
                let a = rng.pick(&files).unwrap().clone();
                let b = if rng.below(3) == 0 && files.len() > 1 { rng.pick(&files).unwrap().clone() } else { fresh(rng, &dirs, *counter) };
                if a == b { continue; }
                Op::Rename(a, b)
            }
            13 if dirs.len() > 1 => {
                // Move a whole directory (not the cycle root, not into itself).
                let a = rng.pick(&dirs[1..]).unwrap().clone();
                let target = rng.pick(&dirs).unwrap().clone();
                if target == a || target.starts_with(&format!("{a}/")) { continue; }
                Op::Rename(a, format!("{target}/m{counter}"))
            }
            14 if !files.is_empty() => Op::Link(rng.pick(&files).unwrap().clone(), fresh(rng, &dirs, *counter)),
            15 | 16 if !files.is_empty() => Op::Unlink(rng.pick(&files).unwrap().clone()),
            17 if dirs.len() > 1 => {
                let d = rng.pick(&dirs[1..]).unwrap().clone();
                if m.children_of(&d) > 0 { continue; }
                Op::Rmdir(d)
            }
            20 if !files.is_empty() => Op::Rewrite(rng.pick(&files).unwrap().clone(), rng.below(80_000), rng.next()),
            21 => Op::Loose(format!("{}/l{counter}", rng.pick(&dirs).unwrap()), rng.below(60_000), rng.next()),
            _ => continue,
        };
        return op;
    }
}

/// fsync a directory; the open handle is returned so that its close (a FUSE request)
/// comes after the caller journalled the operation's completion.
fn fsync_dir(mnt: &Path, d: &str) -> std::io::Result<File> {
    let f = File::open(mnt.join(d))?;
    f.sync_all()?;
    Ok(f)
}

/// Run `op`; `done` is called the moment the syscall that completes it returns (the last
/// fsync, or the write of a scribble), before any other request reaches the mount: open
/// files are closed only afterwards (a close is a FUSE FLUSH, which can block). So a
/// workload that is blocked in a request of the mount has journalled every operation
/// that completed (see kill-both in `run`).
fn execute(mnt: &Path, op: &Op, done: &mut dyn FnMut()) -> std::io::Result<()> {
    let p = |x: &str| mnt.join(x);
    let mut keep: Vec<File> = Vec::new();
    match op {
        Op::Mkdir(d) => {
            fs::create_dir(p(d))?;
            keep.push(fsync_dir(mnt, parent(d))?);
        }
        Op::Create(f, l, s) => {
            let file = OpenOptions::new().write(true).create_new(true).open(p(f))?;
            file.write_all_at(&data(*s, *l), 0)?;
            file.sync_all()?;
            keep.push(file);
            keep.push(fsync_dir(mnt, parent(f))?);
        }
        Op::Loose(f, l, s) => {
            let file = OpenOptions::new().write(true).create_new(true).open(p(f))?;
            file.write_all_at(&data(*s, *l), 0)?;
            file.sync_all()?;
            keep.push(file);
        }
        Op::Rewrite(f, l, s) => {
            let file = OpenOptions::new().write(true).truncate(true).open(p(f))?;
            file.write_all_at(&data(*s, *l), 0)?;
            file.sync_all()?;
            keep.push(file);
        }
        Op::Write(f, o, l, s, datasync) => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            file.write_all_at(&data(*s, *l), *o)?;
            if *datasync { file.sync_data()? } else { file.sync_all()? }
            keep.push(file);
        }
        Op::Scribble(f, o, l, s) => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            file.write_all_at(&data(*s, *l), *o)?;
            keep.push(file);
        }
        Op::Truncate(f, l) => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            file.set_len(*l)?;
            file.sync_all()?;
            keep.push(file);
        }
        Op::Falloc(f, mode, o, l) => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            if unsafe { libc::fallocate(file.as_raw_fd(), *mode, *o as i64, *l as i64) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            file.sync_all()?;
            keep.push(file);
        }
        Op::Rename(a, b) => {
            fs::rename(p(a), p(b))?;
            keep.push(fsync_dir(mnt, parent(a))?);
            keep.push(fsync_dir(mnt, parent(b))?);
        }
        Op::Link(a, b) => {
            fs::hard_link(p(a), p(b))?;
            keep.push(fsync_dir(mnt, parent(b))?);
        }
        Op::Unlink(f) => {
            fs::remove_file(p(f))?;
            keep.push(fsync_dir(mnt, parent(f))?);
        }
        Op::Rmdir(d) => {
            fs::remove_dir(p(d))?;
            keep.push(fsync_dir(mnt, parent(d))?);
        }
    }
    done();
    drop(keep);
    Ok(())
}

/// Faults of the workload, to prove that `run` catches them (TDEFS_TORTURE_FAULT):
/// `die-at-start` exits before its first operation; `stall` makes its first operation
/// durable, then only reads its directory (alive on the mount, but making nothing durable);
/// `unjournalled` completes its third operation without journalling it, then sleeps
/// outside the mount (the kill-both hole: an operation completed but not journalled must
/// never be taken for one in flight).
fn fault() -> String {
    std::env::var("TDEFS_TORTURE_FAULT").unwrap_or_default()
}

fn work(mnt: &Path, dir: &str, journal: &Path, seed: u64, limit: Option<u64>) -> ExitCode {
    let mut j = OpenOptions::new().create(true).append(true).open(journal).expect("journal");
    let mut m = Model::default();
    let mut rng = Rng(seed);
    let mut counter = 0;
    let mut seq = 0u64;
    let mut ops = vec![Op::Mkdir(dir.to_string())];
    let fault = fault();
    if fault == "die-at-start" {
        eprintln!("workload: fault die-at-start");
        return ExitCode::from(4);
    }
    loop {
        if limit.is_some_and(|l| seq >= l) {
            return ExitCode::SUCCESS;
        }
        let op = ops.pop().unwrap_or_else(|| gen_op(&m, dir, &mut rng, &mut counter));
        seq += 1;
        // One write(2) per line: a kill leaves whole lines (or a torn last one).
        j.write_all(format!("B {seq} {}\n", op.encode()).as_bytes()).unwrap();
        let unjournalled = fault == "unjournalled" && seq == 3;
        let r = execute(mnt, &op, &mut || {
            if !unjournalled {
                j.write_all(format!("D {seq}\n").as_bytes()).unwrap();
            }
        });
        if let Err(e) = r {
            // The mount died (the daemon was killed): stop; this op stays in flight.
            eprintln!("workload stops at op {seq} ({}): {e}", op.encode());
            return ExitCode::from(3);
        }
        m.apply(&op);
        if fault == "stall" && seq == 1 {
            eprintln!("workload: fault stall: only reading after op {seq}");
            loop {
                if let Err(e) = fs::read_dir(mnt.join(dir)).and_then(|mut d| d.next().transpose()) {
                    eprintln!("workload stops while stalling: {e}");
                    return ExitCode::from(3);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if unjournalled {
            eprintln!("workload: fault unjournalled: op {seq} completed, not journalled; sleeping");
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

// ---------------------------------------------------------------- verification

/// Durable state, and the one operation that may or may not have happened.
fn replay(journal: &Path) -> (Model, Option<Op>, u64) {
    let mut m = Model::default();
    let mut begun: BTreeMap<u64, Op> = BTreeMap::new();
    let mut done = 0;
    for line in BufReader::new(File::open(journal).unwrap()).lines() {
        let Ok(line) = line else { break };
        let (kind, rest) = line.split_once(' ').unwrap_or((&line, ""));
        let (seq, body) = rest.split_once(' ').unwrap_or((rest, ""));
        let Ok(seq) = seq.parse::<u64>() else { break }; // a torn last line
        match kind {
            "B" => {
                if let Some(op) = Op::decode(body) {
                    begun.insert(seq, op);
                }
            }
            "D" => {
                if let Some(op) = begun.remove(&seq) {
                    m.apply(&op);
                    done += 1;
                }
            }
            _ => break,
        }
    }
    assert!(begun.len() <= 1, "the workload is sequential: at most one op in flight");
    (m, begun.into_values().next(), done)
}

/// What the mount shows below `root`.
#[derive(Debug, Default)]
struct Actual {
    files: BTreeMap<String, (Vec<u8>, u64)>, // path -> (contents, inode)
    dirs: BTreeSet<String>,
}

fn read_actual(mnt: &Path, root: &str) -> std::io::Result<Actual> {
    fn walk(mnt: &Path, rel: &str, a: &mut Actual) -> std::io::Result<()> {
        a.dirs.insert(rel.to_string());
        for e in fs::read_dir(mnt.join(rel))? {
            let e = e?;
            let name = format!("{rel}/{}", e.file_name().to_string_lossy());
            let md = fs::symlink_metadata(e.path())?;
            if md.is_dir() {
                walk(mnt, &name, a)?;
            } else {
                a.files.insert(name, (fs::read(e.path())?, md.ino()));
            }
        }
        Ok(())
    }
    let mut a = Actual::default();
    if mnt.join(root).exists() {
        walk(mnt, root, &mut a)?;
    }
    Ok(a)
}

/// Compare `actual` with `model` (restricted to `root`). A file may show, at each byte,
/// any of its candidate versions (size anywhere between theirs): its current contents, its
/// contents at its last fsync and after each write since (if it has unsynced changes), and
/// its contents in each of
/// `alts` (states the op in flight may have left). Anything else is noise. Loose names
/// (not yet durable) may be missing; if there, they are checked like the others.
/// XTS methods (docs/design.md §3, "Size changes"): a crash inside a size change that
/// turns a full 16-byte block into the file's tail, or its tail into a full block, can
/// leave that block's bytes before the end unreadable; no order of the backing calls
/// avoids it. The torture excuses exactly those bytes (before the old and the new end, in
/// their 16-byte block) of the file a data operation in flight resized, and counts it.
static XTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static XTS_WINDOWS_EXCUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn compare(actual: &Actual, model: &Model, root: &str, alts: &[&Model]) -> Result<(), String> {
    compare_excusing(actual, model, root, alts, &[])
}

/// `compare`, where the bytes `w.1` of the file with id `w.0` may be anything, for each
/// `w` in `windows`.
fn compare_excusing(actual: &Actual, model: &Model, root: &str, alts: &[&Model], windows: &[(usize, std::ops::Range<usize>)]) -> Result<(), String> {
    let pre = format!("{root}/");
    let want_dirs: BTreeSet<String> = model.dirs.iter().filter(|d| *d == root || d.starts_with(&pre)).cloned().collect();
    if actual.dirs != want_dirs {
        return Err(format!("directories differ: have {:?}, want {:?}", actual.dirs, want_dirs));
    }
    let want: BTreeSet<&String> = model.names.keys().filter(|n| n.starts_with(&pre)).collect();
    let optional: BTreeSet<&String> = model.loose.keys().filter(|n| n.starts_with(&pre)).collect();
    let have: BTreeSet<&String> = actual.files.keys().collect();
    let extra: Vec<&&String> = have.difference(&want).filter(|n| !optional.contains(**n)).collect();
    let missing: Vec<&&String> = want.difference(&have).collect();
    if !extra.is_empty() || !missing.is_empty() {
        return Err(format!("names differ: extra {extra:?}, missing {missing:?}"));
    }
    for name in have {
        let (got, _) = &actual.files[name];
        let id = model.names.get(name).or_else(|| model.loose.get(name)).copied().unwrap();
        let mut cands: Vec<&Vec<u8>> = vec![&model.contents[id]];
        let others = std::iter::once(Some(&model.synced[id]))
            .chain(model.between[id].iter().map(Some))
            .chain(alts.iter().map(|a| a.content(name)));
        for c in others.flatten() {
            if !cands.contains(&c) {
                cands.push(c);
            }
        }
        if cands.len() == 1 {
            if got != cands[0] {
                let exp = cands[0];
                let at = got.iter().zip(exp.iter()).position(|(a, b)| a != b).unwrap_or(got.len().min(exp.len()));
                return Err(format!("{name}: contents differ at byte {at} (size {} vs {})", got.len(), exp.len()));
            }
            continue;
        }
        let lo = cands.iter().map(|c| c.len()).min().unwrap();
        let hi = cands.iter().map(|c| c.len()).max().unwrap();
        if got.len() < lo || got.len() > hi {
            return Err(format!("{name}: size {} outside [{lo}, {hi}]", got.len()));
        }
        let excused = |i: usize| windows.iter().any(|(w, r)| *w == id && r.contains(&i));
        let mut excused_here = false;
        for (i, b) in got.iter().enumerate() {
            if !cands.iter().any(|c| c.get(i).copied().unwrap_or(0) == *b) {
                if excused(i) {
                    excused_here = true;
                    continue;
                }
                return Err(format!("{name}: byte {i} is {b:#04x}, matching no version of the file (noise)"));
            }
        }
        if excused_here {
            XTS_WINDOWS_EXCUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    // Hard links: names of one model file share an inode.
    let mut ino_of: BTreeMap<usize, u64> = BTreeMap::new();
    for (n, id) in model.names.iter().filter(|(n, _)| n.starts_with(&pre)) {
        let ino = actual.files[n].1;
        if *ino_of.entry(*id).or_insert(ino) != ino {
            return Err(format!("{n}: should be a hard link of another name but has its own inode"));
        }
    }
    Ok(())
}

/// Verify a crashed cycle; on success return (the state that matched, durable
/// operations, whether one was in flight).
fn verify_cycle(mnt: &Path, root: &str, journal: &Path) -> Result<(Actual, u64, bool), String> {
    let (before, inflight, done) = replay(journal);
    let actual = read_actual(mnt, root).map_err(|e| format!("reading the tree: {e}"))?;
    let Some(op) = inflight else {
        compare(&actual, &before, root, &[])?;
        return Ok((actual, done, false));
    };
    let mut after = before.clone();
    after.apply(&op);
    let r = match &op {
        Op::Rewrite(path, ..) => {
            // Truncated and not (fully) rewritten yet: also empty, or a prefix of the new data.
            let mut empty = before.clone();
            empty.apply(&Op::Rewrite(path.clone(), 0, 0));
            compare(&actual, &before, root, &[&after, &empty])
        }
        _ if op.is_data_op() => {
            let mut windows = Vec::new();
            if let Some(&id) = op.data_path().and_then(|p| before.names.get(p)) {
                let (old, new) = (before.contents[id].len(), after.contents[id].len());
                if XTS.load(std::sync::atomic::Ordering::Relaxed) && old != new {
                    windows.extend([old, new].into_iter().filter(|e| e % 16 != 0).map(|e| (id, e - e % 16..e)));
                }
            }
            compare_excusing(&actual, &before, root, &[&after], &windows)
        }
        Op::Create(path, ..) | Op::Loose(path, ..) => {
            // Created but not yet fully written: absent, or a prefix of its data in any pages.
            let is_loose = matches!(op, Op::Loose(..));
            compare(&actual, &before, root, &[]).or_else(|e1| {
                let mut empty = before.clone();
                empty.apply(&if is_loose { Op::Loose(path.clone(), 0, 0) } else { Op::Create(path.clone(), 0, 0) });
                compare(&actual, &empty, root, &[&after]).map_err(|e2| format!("neither absent ({e1}) nor partly written ({e2})"))
            })
        }
        _ => compare(&actual, &before, root, &[]).or_else(|e1| {
            compare(&actual, &after, root, &[]).map_err(|e2| format!("neither before ({e1}) nor after ({e2}) the op in flight: {}", op.encode()))
        }),
    };
    r.map(|()| (actual, done, true)).map_err(|e| format!("{e} [op in flight: {}]", op.encode()))
}

// ---------------------------------------------------------------- runner

fn is_mounted(mnt: &Path) -> bool {
    let want = mnt.to_str().unwrap();
    fs::read_to_string("/proc/self/mountinfo").unwrap_or_default().lines().any(|l| l.split(' ').nth(4) == Some(want))
}

fn lazy_unmount(mnt: &Path) {
    while is_mounted(mnt) {
        let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(mnt).stderr(Stdio::null()).status();
        std::thread::sleep(Duration::from_millis(10));
    }
}

struct Rig {
    tdefs: PathBuf,
    mnt: PathBuf,
    config: PathBuf,
    log: PathBuf,
    fs: Option<Child>,
}

impl Rig {
    fn mount(&mut self) -> Result<(), String> {
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(&self.tdefs)
            .args(["mount", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        self.fs = Some(child);
        let t = Instant::now();
        while !is_mounted(&self.mnt) {
            if let Ok(Some(st)) = self.fs.as_mut().unwrap().try_wait() {
                self.fs = None;
                return Err(format!("tdefs exited ({st}) instead of mounting; see {}", self.log.display()));
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err("mount did not appear within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn kill_fs(&mut self) {
        if let Some(mut c) = self.fs.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        lazy_unmount(&self.mnt);
    }

    /// `tdefs umount` (which fails unless the daemon closed the backing directory cleanly),
    /// then the daemon must have exited 0.
    fn unmount(&mut self) -> Result<(), String> {
        let out = Command::new(&self.tdefs).arg("umount").arg(&self.mnt).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("tdefs umount: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)));
        }
        let st = self.fs.take().unwrap().wait().map_err(|e| e.to_string())?;
        if !st.success() {
            return Err(format!("tdefs exited with {st} on unmount"));
        }
        Ok(())
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.kill_fs();
    }
}

#[allow(clippy::too_many_arguments)]
/// The power-cut simulator under the backing directory.
struct Sim {
    child: Child,
    mnt: PathBuf,
    control: PathBuf,
}

impl Sim {
    fn start(bin: &Path, work: &Path, backing: &Path) -> Result<Sim, String> {
        let lower = work.join("lower");
        fs::create_dir_all(&lower).unwrap();
        let control = work.join("powercut.sock");
        let log = OpenOptions::new().create(true).append(true).open(work.join("powercut.log")).unwrap();
        let child = Command::new(bin)
            .arg("--lower").arg(&lower)
            .arg("--mount").arg(backing)
            .arg("--control").arg(&control)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        while !is_mounted(backing) || !control.exists() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err("the power-cut simulator did not mount".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Sim { child, mnt: backing.to_path_buf(), control })
    }

    fn command(&self, cmd: &str) -> Result<String, String> {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).map_err(|e| e.to_string())?;
        writeln!(s, "{cmd}").map_err(|e| e.to_string())?;
        s.shutdown(std::net::Shutdown::Write).ok();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        Ok(out.trim().to_string())
    }

    /// Cut the power: (files whose unsynced data was rolled back, namespace operations
    /// undone). An undo the simulator could not do is an error.
    fn cut(&self) -> Result<(u64, u64), String> {
        let out = self.command("cut")?;
        if !out.starts_with("ok") {
            return Err(format!("cut failed: {out}"));
        }
        let last = self.command("lastcut")?;
        let field = |k: &str| last.split_whitespace().find_map(|f| f.strip_prefix(k)).and_then(|v| v.parse::<u64>().ok());
        match (field("files="), field("namespace="), field("errors=")) {
            (Some(f), Some(n), Some(0)) => Ok((f, n)),
            (Some(_), Some(_), Some(e)) => Err(format!("the simulator failed {e} undos at the cut (see powercut.log): {last}")),
            _ => Err(format!("lastcut: unexpected answer {last:?}")),
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3").arg("-u").arg(&self.mnt).stderr(Stdio::null()).status();
        std::thread::sleep(Duration::from_millis(50));
        let _ = self.child.kill();
        let _ = self.child.wait();
        lazy_unmount(&self.mnt);
    }
}

/// The first line of a file, for messages.
fn tail_of(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    let from = v.len().saturating_sub(lines);
    if v.is_empty() {
        "(empty)".into()
    } else {
        v[from..].join("\n    ")
    }
}

/// Whether the journal holds a completed (durable) operation.
fn journal_has_durable(journal: &Path) -> bool {
    fs::read_to_string(journal).map(|t| t.lines().any(|l| l.starts_with("D "))).unwrap_or(false)
}

/// Names of the syscalls a workload can be blocked in (x86_64; others show their number).
fn syscall_name(nr: &str) -> String {
    let name = match nr {
        "0" => "read", "1" => "write", "3" => "close", "4" => "stat", "5" => "fstat", "6" => "lstat", "17" => "pread64",
        "18" => "pwrite64", "74" => "fsync", "75" => "fdatasync", "76" => "truncate", "77" => "ftruncate", "82" => "rename",
        "83" => "mkdir", "84" => "rmdir", "86" => "link", "87" => "unlink", "217" => "getdents64", "257" => "openat",
        "258" => "mkdirat", "262" => "newfstatat", "263" => "unlinkat", "264" => "renameat", "265" => "linkat",
        "285" => "fallocate", "316" => "renameat2", "332" => "statx",
        _ => return format!("syscall {nr}"),
    };
    name.to_string()
}

/// If process `pid` is asleep inside a request of a FUSE mount, the syscall it is in.
fn blocked_in_fuse(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.rsplit_once(") ")?.1.chars().next()?;
    if state != 'S' && state != 'D' {
        return None;
    }
    let stack = fs::read_to_string(format!("/proc/{pid}/stack")).unwrap_or_default();
    let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    if !stack.contains("fuse") && !wchan.contains("fuse") && !wchan.contains("request_wait_answer") {
        return None;
    }
    let sc = fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    Some(syscall_name(sc.split_whitespace().next()?))
}

fn signal(pid: u32, sig: i32) {
    unsafe { libc::kill(pid as i32, sig) };
}

/// How a cycle ended for its workload.
enum Kill {
    /// kill-fs: the workload saw the mount die and stopped.
    Stopped,
    /// kill-both: SIGKILLed while blocked in this syscall on the mount.
    Blocked(String),
}

/// kill-both. Killing the workload at an arbitrary instant could land between the return
/// of the syscall that completed an operation and the journal line that records it: the
/// operation would then be taken for one in flight, and losing it accepted. So: stop the
/// daemon (SIGSTOP: no request of the mount can complete any more), wait until the
/// workload is asleep in a request of the mount (it journals each completion before it
/// sends the mount anything else: see `execute`), SIGKILL it there, then SIGKILL the
/// daemon. Every operation whose completing syscall returned is then journalled, and the
/// one in flight really is in flight.
fn kill_both(rig: &mut Rig, w: &mut Child) -> Result<String, String> {
    let daemon = rig.fs.as_ref().map(|c| c.id()).ok_or("no daemon")?;
    signal(daemon, libc::SIGSTOP);
    let t = Instant::now();
    let mut last: Option<String> = None;
    let syscall = loop {
        if let Ok(Some(st)) = w.try_wait() {
            signal(daemon, libc::SIGCONT);
            return Err(format!("the workload exited ({st}) before the kill"));
        }
        let now = blocked_in_fuse(w.id());
        if now.is_some() && now == last {
            break now.unwrap();
        }
        last = now;
        if t.elapsed() > Duration::from_secs(10) {
            let stack = fs::read_to_string(format!("/proc/{}/stack", w.id())).unwrap_or_default();
            let _ = w.kill();
            signal(daemon, libc::SIGCONT);
            return Err(format!(
                "the workload never blocked in a request of the mount within 10 s of stopping the daemon, so whether its \
                 last operation completed is unknown (kernel stack: {})",
                stack.trim().replace('\n', " | ")
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = w.kill();
    rig.kill_fs(); // SIGKILL ends a stopped process too
    let _ = w.wait();
    Ok(syscall)
}

/// What a run must show at least (see `--min-durable-per-cycle`).
struct Totals {
    durable: u64,
    min_in_cycle: u64,
    inflight: u32,
    files_rolled_back: u64,
    ns_undone: u64,
    cycles_with_file_rollback: u32,
    cycles_with_ns_undo: u32,
    blocked_in: BTreeMap<String, u32>,
}

#[allow(clippy::too_many_arguments)]
fn run(tdefs: PathBuf, cycles: u32, seed: u64, mode: Mode, method: &str, workdir: Option<PathBuf>, max_run_ms: u64, powercut: Option<PathBuf>, min_per_cycle: u64, scan: Option<PathBuf>, sync_before_cut: bool) -> ExitCode {
    XTS.store(method.ends_with("-xts"), std::sync::atomic::Ordering::Relaxed);
    let keep = workdir.is_some();
    let work = workdir.unwrap_or_else(|| std::env::temp_dir().join(format!("tdefs-torture-{}-{seed}", std::process::id())));
    let _ = fs::remove_dir_all(&work);
    let (backing, mnt) = (work.join("backing"), work.join("mnt"));
    fs::create_dir_all(&backing).unwrap();
    fs::create_dir_all(&mnt).unwrap();
    let key = work.join("master.key");
    assert!(Command::new(&tdefs).arg("genkey").arg(&key).status().unwrap().success());
    let config = work.join("tdefs.toml");
    // Small thresholds so that compaction and data-key rotation happen under the knife.
    fs::write(
        &config,
        format!(
            "backing-dir = {backing:?}\nmountpoint = {mnt:?}\n[security.encryption]\ndata-encryption-method = {method:?}\n\
             data-key-rotation-period = \"2s\"\nfile-dictionary-rewrite-threshold = 40\n\
             [security.encryption.master-key]\ntype = \"file\"\npath = {key:?}\n"
        ),
    )
    .unwrap();
    let sim = match powercut.as_deref().map(|b| Sim::start(b, &work, &backing)) {
        Some(Ok(s)) => Some(s),
        Some(Err(e)) => {
            eprintln!("FAIL: {e}");
            return ExitCode::FAILURE;
        }
        None => None,
    };
    let sim_mode = sim.as_ref().and_then(|s| s.command("mode").ok()).map(|m| m.trim_start_matches("ok ").to_string());
    let mut rig = Rig { tdefs, mnt: mnt.clone(), config, log: work.join("tdefs.log"), fs: None };
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(seed ^ 0xDEAD_BEEF);
    let mut history: Vec<(String, Actual)> = Vec::new();
    let mut failures = 0u32;
    let mut tot = Totals { durable: 0, min_in_cycle: u64::MAX, inflight: 0, files_rolled_back: 0, ns_undone: 0, cycles_with_file_rollback: 0, cycles_with_ns_undo: 0, blocked_in: BTreeMap::new() };
    let started = Instant::now();
    if let Err(e) = rig.mount() {
        eprintln!("FAIL: {e}");
        return ExitCode::FAILURE;
    }
    for cycle in 0..cycles {
        let both = match mode { Mode::KillFs => false, Mode::KillBoth => true, Mode::Mixed => cycle % 2 == 1 };
        let kind = if both { "kill-both" } else { "kill-fs" };
        let root = format!("c{cycle}");
        let journal = work.join(format!("journal-{cycle}"));
        let errfile = work.join(format!("workload-{cycle}.err"));
        let mut w = Command::new(&exe)
            .args(["work", "--dir", &root, "--seed", &(seed * 1_000_003 + cycle as u64).to_string()])
            .arg("--mnt").arg(&mnt)
            .arg("--journal").arg(&journal)
            .stdout(Stdio::null())
            .stderr(File::create(&errfile).unwrap())
            .spawn()
            .unwrap();
        let fail = |what: String| {
            eprintln!("cycle {cycle}: FAIL ({kind}): {what}\n  workload stderr ({}):\n    {}", errfile.display(), tail_of(&errfile, 20));
        };
        // The kill comes at a random moment after the workload's first durable operation
        // (the mkdir of its directory): a workload that cannot even do that is broken.
        let t = Instant::now();
        let mut early = None;
        while !journal_has_durable(&journal) {
            if let Ok(Some(st)) = w.try_wait() {
                early = Some(format!("the workload exited ({st}) before its first durable operation"));
                break;
            }
            if t.elapsed() > Duration::from_secs(20) {
                early = Some("the workload made no operation durable within 20 s".into());
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(e) = early {
            fail(e);
            failures += 1;
            let _ = w.kill();
            let _ = w.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(30 + rng.below(max_run_ms)));
        if let Ok(Some(st)) = w.try_wait() {
            fail(format!("the workload died ({st}) before the kill"));
            failures += 1;
            break;
        }
        let how = if both {
            match kill_both(&mut rig, &mut w) {
                Ok(sc) => Kill::Blocked(sc),
                Err(e) => {
                    fail(e);
                    failures += 1;
                    break;
                }
            }
        } else {
            rig.kill_fs();
            let t = Instant::now();
            let st = loop {
                if let Some(st) = w.try_wait().unwrap() {
                    break Some(st);
                }
                if t.elapsed() > Duration::from_secs(20) {
                    let _ = w.kill();
                    let _ = w.wait();
                    break None;
                }
                std::thread::sleep(Duration::from_millis(5));
            };
            // It must have stopped on the mount's error (exit 3), not crashed or hung.
            if st.and_then(|s| s.code()) != Some(3) {
                fail(format!("the workload did not stop on the dead mount's error as it should: {st:?}"));
                failures += 1;
                break;
            }
            Kill::Stopped
        };
        let (mut files_back, mut ns_back) = (0, 0);
        if let Some(sim) = &sim {
            if sync_before_cut && sim.command("sync").ok().as_deref() != Some("ok") {
                fail("the simulator did not answer sync".into());
                failures += 1;
                break;
            }
            match sim.cut() {
                Ok((f, n)) => (files_back, ns_back) = (f, n),
                Err(e) => {
                    fail(format!("power cut: {e}"));
                    failures += 1;
                    break;
                }
            }
        }
        if let Err(e) = rig.mount() {
            fail(format!("remount after the crash: {e}"));
            failures += 1;
            break;
        }
        match verify_cycle(&mnt, &root, &journal) {
            Ok((_, 0, _)) => {
                fail("the journal holds no durable operation, though the workload had journalled one".into());
                failures += 1;
            }
            Ok((actual, done, inflight)) => {
                tot.durable += done;
                tot.min_in_cycle = tot.min_in_cycle.min(done);
                tot.inflight += inflight as u32;
                tot.files_rolled_back += files_back;
                tot.ns_undone += ns_back;
                tot.cycles_with_file_rollback += (files_back > 0) as u32;
                tot.cycles_with_ns_undo += (ns_back > 0) as u32;
                let at = match &how {
                    Kill::Blocked(sc) => {
                        *tot.blocked_in.entry(sc.clone()).or_default() += 1;
                        format!("killed in {sc}")
                    }
                    Kill::Stopped => "stopped on the dead mount".into(),
                };
                let cut = if sim.is_some() { format!(", rolled back: {files_back} files' data, {ns_back} namespace ops") } else { String::new() };
                println!("cycle {cycle} ({kind}, workload {at}): {done} durable ops{}{cut}", if inflight { ", 1 in flight" } else { "" });
                history.push((root.clone(), actual));
            }
            Err(e) => {
                fail(e);
                failures += 1;
            }
        }
        for (r, snap) in &history {
            let now = read_actual(&mnt, r).unwrap_or_default();
            let same = now.dirs == snap.dirs && now.files.len() == snap.files.len()
                && now.files.iter().all(|(k, v)| snap.files.get(k).map(|s| s.0 == v.0) == Some(true));
            if !same {
                eprintln!("cycle {cycle}: FAIL: directory {r} of an earlier cycle changed after the remount");
                failures += 1;
            }
        }
        if failures > 0 {
            break;
        }
    }
    // Clean unmount, then the offline check and the plaintext scan must be clean.
    let mut end_ok = true;
    let mut scan_line = String::new();
    if rig.fs.is_some() {
        if let Err(e) = rig.unmount() {
            eprintln!("FAIL: clean unmount: {e}");
            end_ok = false;
        } else {
            let out = Command::new(&rig.tdefs).args(["check", "--config"]).arg(&rig.config).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if !out.status.success() {
                eprintln!("FAIL: tdefs check after the run ({}):\n{text}{}", out.status, String::from_utf8_lossy(&out.stderr));
                end_ok = false;
            }
            let scanner = scan.clone().unwrap_or_else(|| exe.with_file_name("tdefs-scan"));
            match Command::new(&scanner).args(["--no-plaintext", "--config"]).arg(&rig.config).output() {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    scan_line = text.lines().find(|l| l.starts_with("scanned ")).unwrap_or("").to_string();
                    if !out.status.success() {
                        eprintln!("FAIL: plaintext scan after the run ({}):\n{text}{}", out.status, String::from_utf8_lossy(&out.stderr));
                        end_ok = false;
                    }
                }
                Err(e) => {
                    eprintln!("FAIL: cannot run the plaintext scan {}: {e}", scanner.display());
                    end_ok = false;
                }
            }
        }
    } else {
        end_ok = false;
    }
    let log = fs::read_to_string(&rig.log).unwrap_or_default();
    if let Some(l) = log.lines().find(|l| l.contains("panicked")) {
        eprintln!("FAIL: the daemon panicked: {l}");
        end_ok = false;
    }
    // Floors: a run that verified next to nothing proves nothing.
    let n = history.len() as u64;
    let mut floors_ok = true;
    if failures == 0 && n > 0 {
        if tot.durable < min_per_cycle * n {
            eprintln!(
                "FAIL: {} durable operations in {n} cycles, below the floor of {min_per_cycle} per cycle ({}): the workload did next to nothing",
                tot.durable,
                min_per_cycle * n
            );
            floors_ok = false;
        }
        if sim.is_some() && tot.files_rolled_back == 0 {
            eprintln!("FAIL: no power cut rolled back any file's data: the cuts proved nothing about unsynced data");
            floors_ok = false;
        }
        if sim.is_some() && tot.ns_undone == 0 {
            eprintln!("FAIL: no power cut undid any namespace operation: the cuts proved nothing about names");
            floors_ok = false;
        }
    }
    // How often a gone inode's number went to a new one (with `--numbers reuse`).
    if let Some(stats) = sim.as_ref().and_then(|s| s.command("stats").ok()) {
        let reused = stats.split_whitespace().find_map(|kv| kv.strip_prefix("numbers_reused=")).unwrap_or("0");
        println!("simulator: {reused} inode numbers reused");
    }
    let secs = started.elapsed().as_secs_f64();
    let cut = match &sim_mode {
        Some(m) => format!(
            ", power cut after each kill ({m}); rolled back: {} files' unsynced data in {} cycles, {} namespace operations in {} cycles",
            tot.files_rolled_back, tot.cycles_with_file_rollback, tot.ns_undone, tot.cycles_with_ns_undo
        ),
        None => String::new(),
    };
    let blocked = if tot.blocked_in.is_empty() {
        String::new()
    } else {
        format!("; kill-both killed the workload in {}", tot.blocked_in.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "))
    };
    println!(
        "torture ({mode:?}, {method}{cut}): {n} cycles, {} durable ops verified (at least {} in a cycle; floor {min_per_cycle} per cycle), {} ops in flight at a kill{blocked}{}; {}; {:.0} s",
        tot.durable,
        if n > 0 { tot.min_in_cycle } else { 0 },
        tot.inflight,
        match XTS_WINDOWS_EXCUSED.load(std::sync::atomic::Ordering::Relaxed) {
            0 => String::new(),
            w => format!("; {w} XTS size-change windows hit (bytes before the end, in the 16-byte block a data operation in flight moved it across, excused)"),
        },
        if scan_line.is_empty() { "no scan".to_string() } else { scan_line },
        secs
    );
    let total_failures = failures + (!end_ok) as u32 + (!floors_ok) as u32;
    println!("torture: {} passed, {} failed", (n as u32 + end_ok as u32 + floors_ok as u32).saturating_sub(failures), total_failures);
    if total_failures == 0 && !keep {
        drop(rig);
        drop(sim);
        let _ = fs::remove_dir_all(&work);
    } else if total_failures > 0 {
        eprintln!("kept {} for inspection (tdefs log: {})", work.display(), work.join("tdefs.log").display());
    }
    if total_failures == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

fn stress(mnt: &Path, workers: u32, ops: u64, seed: u64, journals: &Path) -> ExitCode {
    let exe = std::env::current_exe().unwrap();
    fs::create_dir_all(journals).unwrap();
    let started = Instant::now();
    let children: Vec<(String, PathBuf, Child)> = (0..workers)
        .map(|w| {
            let dir = format!("stress-{w}");
            let journal = journals.join(format!("stress-{w}.journal"));
            let _ = fs::remove_file(&journal);
            let c = Command::new(&exe)
                .args(["work", "--dir", &dir, "--seed", &(seed * 7919 + w as u64).to_string(), "--ops", &ops.to_string()])
                .arg("--mnt").arg(mnt)
                .arg("--journal").arg(&journal)
                .spawn()
                .unwrap();
            (dir, journal, c)
        })
        .collect();
    let mut failed = 0;
    let mut total = 0;
    for (dir, journal, mut c) in children {
        let st = c.wait().unwrap();
        if !st.success() {
            eprintln!("stress: worker {dir} exited with {st}");
            failed += 1;
            continue;
        }
        match verify_cycle(mnt, &dir, &journal) {
            Ok((_, done, false)) => total += done,
            Ok((_, _, true)) => {
                eprintln!("stress: worker {dir} left an operation in flight");
                failed += 1;
            }
            Err(e) => {
                eprintln!("stress: {dir}: {e}");
                failed += 1;
            }
        }
    }
    eprintln!("stress: {total} operations in {:.1} s", started.elapsed().as_secs_f64());
    if failed == 0 {
        println!("stress: {workers} workers x {ops} operations: every tree matches its journal");
        ExitCode::SUCCESS
    } else {
        println!("stress: {failed} of {workers} workers failed");
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Run { tdefs, cycles, seed, mode, method, workdir, max_run_ms, powercut, min_durable_per_cycle, scan, sync_before_cut } => {
            run(tdefs, cycles, seed, mode, &method, workdir, max_run_ms, powercut, min_durable_per_cycle, scan, sync_before_cut)
        }
        Cmd::Work { mnt, dir, journal, seed, ops } => work(&mnt, &dir, &journal, seed, ops),
        Cmd::Stress { mnt, workers, ops, seed, journals } => stress(&mnt, workers, ops, seed, &journals),
        Cmd::Verify { tdefs, workdir, cycle } => {
            let mnt = workdir.join("mnt");
            // The same rules as the run that wrote the journal: its method is in its config.
            let config = std::fs::read_to_string(workdir.join("tdefs.toml")).unwrap_or_default();
            let xts = config.lines().any(|l| l.starts_with("data-encryption-method") && l.contains("-xts\""));
            XTS.store(xts, std::sync::atomic::Ordering::Relaxed);
            let mut rig = Rig { tdefs, mnt: mnt.clone(), config: workdir.join("tdefs.toml"), log: workdir.join("tdefs.log"), fs: None };
            if let Err(e) = rig.mount() {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
            let r = verify_cycle(&mnt, &format!("c{cycle}"), &workdir.join(format!("journal-{cycle}")));
            let _ = rig.unmount();
            match r {
                Ok((_, done, inflight)) => {
                    println!("cycle {cycle}: ok ({done} durable ops, op in flight: {inflight})");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("cycle {cycle}: FAIL: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
