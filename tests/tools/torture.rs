//! Crash torture for tdefs (issue 3).
//!
//! `tdefs-torture run` mounts tdefs over a scratch backing directory and, cycle after cycle,
//! starts a workload process that performs careful operations (each made durable with
//! fsync of the file and of the directories it changed) and journals every operation
//! before it starts (`B`) and once it is durable (`D`). At a random moment the tdefs
//! daemon is killed with SIGKILL (and, in `kill-both` mode, the workload too); the dead
//! mount is cleaned up, tdefs is mounted again and the tree is checked against the
//! journal: every durable operation must be reflected exactly, and the single operation in
//! flight may have happened or not — each of its bytes old or new, never noise. Every
//! earlier cycle's directory is re-checked after each remount.

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
            _ => return None,
        })
    }

    fn is_data_op(&self) -> bool {
        matches!(self, Op::Write(..) | Op::Scribble(..) | Op::Truncate(..) | Op::Falloc(..))
    }
}

/// Deterministic bytes for (seed, len).
fn data(seed: u64, len: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Names -> file ids (hard links share an id), contents by id (current, and as of the
/// file's last fsync), directories.
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    names: BTreeMap<String, usize>,
    contents: Vec<Vec<u8>>,
    synced: Vec<Vec<u8>>,
    dirs: BTreeSet<String>,
}

fn parent(p: &str) -> &str {
    p.rsplit_once('/').map(|(a, _)| a).unwrap_or("")
}

impl Model {
    fn content(&self, path: &str) -> Option<&Vec<u8>> {
        self.names.get(path).map(|&i| &self.contents[i])
    }

    fn apply(&mut self, op: &Op) {
        // Every op but a scribble ends with an fsync of the file it changed.
        let touched = match op {
            Op::Write(p, ..) | Op::Truncate(p, ..) | Op::Falloc(p, ..) => self.names.get(p).copied(),
            _ => None,
        };
        match op {
            Op::Mkdir(d) => {
                self.dirs.insert(d.clone());
            }
            Op::Create(p, l, s) => {
                self.contents.push(data(*s, *l));
                self.synced.push(data(*s, *l));
                self.names.insert(p.clone(), self.contents.len() - 1);
            }
            Op::Write(p, o, l, s, _) | Op::Scribble(p, o, l, s) => {
                let c = &mut self.contents[self.names[p]];
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
                    let moved: Vec<(String, usize)> = self.names.iter().filter(|(n, _)| n.starts_with(&pre)).map(|(n, i)| (n.clone(), *i)).collect();
                    for (n, i) in moved {
                        self.names.remove(&n);
                        self.names.insert(format!("{b}{}", &n[a.len()..]), i);
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
        }
    }

    fn children_of(&self, d: &str) -> usize {
        let pre = format!("{d}/");
        self.names.keys().filter(|n| n.starts_with(&pre)).count() + self.dirs.iter().filter(|x| x.starts_with(&pre)).count()
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
            _ => continue,
        };
        return op;
    }
}

fn fsync_dir(mnt: &Path, d: &str) -> std::io::Result<()> {
    File::open(mnt.join(d))?.sync_all()
}

fn execute(mnt: &Path, op: &Op) -> std::io::Result<()> {
    let p = |x: &str| mnt.join(x);
    match op {
        Op::Mkdir(d) => {
            fs::create_dir(p(d))?;
            fsync_dir(mnt, parent(d))
        }
        Op::Create(f, l, s) => {
            let file = OpenOptions::new().write(true).create_new(true).open(p(f))?;
            file.write_all_at(&data(*s, *l), 0)?;
            file.sync_all()?;
            fsync_dir(mnt, parent(f))
        }
        Op::Write(f, o, l, s, datasync) => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            file.write_all_at(&data(*s, *l), *o)?;
            if *datasync { file.sync_data() } else { file.sync_all() }
        }
        Op::Scribble(f, o, l, s) => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            file.write_all_at(&data(*s, *l), *o)
        }
        Op::Truncate(f, l) => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            file.set_len(*l)?;
            file.sync_all()
        }
        Op::Falloc(f, mode, o, l) => {
            let file = OpenOptions::new().write(true).open(p(f))?;
            if unsafe { libc::fallocate(file.as_raw_fd(), *mode, *o as i64, *l as i64) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            file.sync_all()
        }
        Op::Rename(a, b) => {
            fs::rename(p(a), p(b))?;
            fsync_dir(mnt, parent(a))?;
            fsync_dir(mnt, parent(b))
        }
        Op::Link(a, b) => {
            fs::hard_link(p(a), p(b))?;
            fsync_dir(mnt, parent(b))
        }
        Op::Unlink(f) => {
            fs::remove_file(p(f))?;
            fsync_dir(mnt, parent(f))
        }
        Op::Rmdir(d) => {
            fs::remove_dir(p(d))?;
            fsync_dir(mnt, parent(d))
        }
    }
}

fn work(mnt: &Path, dir: &str, journal: &Path, seed: u64, limit: Option<u64>) -> ExitCode {
    let mut j = OpenOptions::new().create(true).append(true).open(journal).expect("journal");
    let mut m = Model::default();
    let mut rng = Rng(seed);
    let mut counter = 0;
    let mut seq = 0u64;
    let mut ops = vec![Op::Mkdir(dir.to_string())];
    loop {
        if limit.is_some_and(|l| seq >= l) {
            return ExitCode::SUCCESS;
        }
        let op = ops.pop().unwrap_or_else(|| gen_op(&m, dir, &mut rng, &mut counter));
        seq += 1;
        writeln!(j, "B {seq} {}", op.encode()).unwrap();
        if let Err(e) = execute(mnt, &op) {
            // The mount died (the daemon was killed): stop; this op stays in flight.
            eprintln!("workload stops at op {seq} ({}): {e}", op.encode());
            return ExitCode::from(3);
        }
        writeln!(j, "D {seq}").unwrap();
        m.apply(&op);
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
/// contents at its last fsync if it has unsynced changes, and its contents in `alt` (the
/// state after the op in flight). Anything else is noise.
fn compare(actual: &Actual, model: &Model, root: &str, alt: Option<&Model>) -> Result<(), String> {
    let pre = format!("{root}/");
    let want_dirs: BTreeSet<String> = model.dirs.iter().filter(|d| *d == root || d.starts_with(&pre)).cloned().collect();
    if actual.dirs != want_dirs {
        return Err(format!("directories differ: have {:?}, want {:?}", actual.dirs, want_dirs));
    }
    let want: BTreeSet<&String> = model.names.keys().filter(|n| n.starts_with(&pre)).collect();
    let have: BTreeSet<&String> = actual.files.keys().collect();
    if want != have {
        return Err(format!("names differ: extra {:?}, missing {:?}", have.difference(&want).collect::<Vec<_>>(), want.difference(&have).collect::<Vec<_>>()));
    }
    for name in want {
        let (got, _) = &actual.files[name];
        let id = model.names[name];
        let mut cands: Vec<&Vec<u8>> = vec![&model.contents[id]];
        for c in [Some(&model.synced[id]), alt.and_then(|a| a.content(name))].into_iter().flatten() {
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
        for (i, b) in got.iter().enumerate() {
            if !cands.iter().any(|c| c.get(i).copied().unwrap_or(0) == *b) {
                return Err(format!("{name}: byte {i} is {b:#04x}, matching no version of the file (noise)"));
            }
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

/// Verify a crashed cycle; on success return the state that matched.
fn verify_cycle(mnt: &Path, root: &str, journal: &Path) -> Result<(Actual, u64, bool), String> {
    let (before, inflight, done) = replay(journal);
    let actual = read_actual(mnt, root).map_err(|e| format!("reading the tree: {e}"))?;
    let Some(op) = inflight else {
        compare(&actual, &before, root, None)?;
        return Ok((actual, done, false));
    };
    let mut after = before.clone();
    after.apply(&op);
    let r = if op.is_data_op() {
        compare(&actual, &before, root, Some(&after))
    } else if let Op::Create(path, ..) = &op {
        // Created but not yet fully written: absent, or a prefix of its data in any pages.
        compare(&actual, &before, root, None).or_else(|e1| {
            let mut empty = before.clone();
            empty.apply(&Op::Create(path.clone(), 0, 0));
            compare(&actual, &empty, root, Some(&after)).map_err(|e2| format!("neither absent ({e1}) nor partly written ({e2})"))
        })
    } else {
        compare(&actual, &before, root, None).or_else(|e1| compare(&actual, &after, root, None).map_err(|e2| format!("neither before ({e1}) nor after ({e2}) the op in flight: {}", op.encode())))
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

    fn unmount(&mut self) -> Result<(), String> {
        let st = Command::new("fusermount3").arg("-u").arg(&self.mnt).status().map_err(|e| e.to_string())?;
        if !st.success() {
            return Err("fusermount3 -u failed".into());
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

    fn cut(&self) -> Result<u64, String> {
        use std::io::Read;
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).map_err(|e| e.to_string())?;
        writeln!(s, "cut").map_err(|e| e.to_string())?;
        s.shutdown(std::net::Shutdown::Write).ok();
        let mut out = String::new();
        s.read_to_string(&mut out).map_err(|e| e.to_string())?;
        out.trim().strip_prefix("ok ").and_then(|n| n.parse().ok()).ok_or(format!("cut failed: {out}"))
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

#[allow(clippy::too_many_arguments)]
fn run(tdefs: PathBuf, cycles: u32, seed: u64, mode: Mode, method: &str, workdir: Option<PathBuf>, max_run_ms: u64, powercut: Option<PathBuf>) -> ExitCode {
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
    let mut rig = Rig { tdefs, mnt: mnt.clone(), config, log: work.join("tdefs.log"), fs: None };
    let exe = std::env::current_exe().unwrap();
    let mut rng = Rng(seed ^ 0xDEAD_BEEF);
    let mut history: Vec<(String, Actual)> = Vec::new();
    let (mut failures, mut durable_ops, mut inflight_ops, mut rolled_back) = (0u32, 0u64, 0u32, 0u64);
    let started = Instant::now();
    if let Err(e) = rig.mount() {
        eprintln!("FAIL: {e}");
        return ExitCode::FAILURE;
    }
    for cycle in 0..cycles {
        let both = match mode { Mode::KillFs => false, Mode::KillBoth => true, Mode::Mixed => cycle % 2 == 1 };
        let root = format!("c{cycle}");
        let journal = work.join(format!("journal-{cycle}"));
        let mut w = Command::new(&exe)
            .args(["work", "--dir", &root, "--seed", &(seed * 1_000_003 + cycle as u64).to_string()])
            .arg("--mnt").arg(&mnt)
            .arg("--journal").arg(&journal)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30 + rng.below(max_run_ms)));
        if both {
            let _ = w.kill();
        }
        rig.kill_fs();
        let t = Instant::now();
        while w.try_wait().unwrap().is_none() {
            if t.elapsed() > Duration::from_secs(20) {
                let _ = w.kill();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(sim) = &sim {
            match sim.cut() {
                Ok(n) => rolled_back += n,
                Err(e) => {
                    eprintln!("cycle {cycle}: FAIL: power cut: {e}");
                    failures += 1;
                    break;
                }
            }
        }
        if let Err(e) = rig.mount() {
            eprintln!("cycle {cycle}: FAIL: remount after the crash: {e}");
            failures += 1;
            break;
        }
        match verify_cycle(&mnt, &root, &journal) {
            Ok((actual, done, inflight)) => {
                durable_ops += done;
                inflight_ops += inflight as u32;
                history.push((root.clone(), actual));
            }
            Err(e) => {
                eprintln!("cycle {cycle}: FAIL ({}): {e}", if both { "kill-both" } else { "kill-fs" });
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
    // Clean unmount, then an offline check: no missing keys, no mismatched links.
    let mut check_ok = true;
    if rig.fs.is_some() {
        if let Err(e) = rig.unmount() {
            eprintln!("FAIL: clean unmount: {e}");
            failures += 1;
        } else {
            let out = Command::new(&rig.tdefs).args(["check", "--config"]).arg(&rig.config).output().unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            check_ok = matches!(out.status.code(), Some(0) | Some(1)) && !text.contains("MISSING") && !text.contains("MISMATCH");
            if !check_ok {
                eprintln!("FAIL: tdefs check after the run:\n{text}{}", String::from_utf8_lossy(&out.stderr));
                failures += 1;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let cut = if sim.is_some() { format!(", power cut after each kill ({rolled_back} files rolled back)") } else { String::new() };
    println!(
        "torture ({mode:?}, {method}{cut}): {} cycles, {durable_ops} durable ops verified, {inflight_ops} ops in flight at a kill, {:.0} s",
        history.len(), secs
    );
    println!("torture: {} passed, {} failed", history.len() as u32 + check_ok as u32 - failures.min(history.len() as u32 + 1), failures);
    if failures == 0 && !keep {
        drop(rig);
        drop(sim);
        let _ = fs::remove_dir_all(&work);
    } else if failures > 0 {
        eprintln!("kept {} for inspection (tdefs log: {})", work.display(), work.join("tdefs.log").display());
    }
    if failures == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE }
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
        Cmd::Run { tdefs, cycles, seed, mode, method, workdir, max_run_ms, powercut } => run(tdefs, cycles, seed, mode, &method, workdir, max_run_ms, powercut),
        Cmd::Work { mnt, dir, journal, seed, ops } => work(&mnt, &dir, &journal, seed, ops),
        Cmd::Stress { mnt, workers, ops, seed, journals } => stress(&mnt, workers, ops, seed, &journals),
        Cmd::Verify { tdefs, workdir, cycle } => {
            let mnt = workdir.join("mnt");
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
