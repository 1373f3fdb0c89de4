//! The power-cut simulator's namespace model (issue 21), on its own: a real
//! `tdefs-powercut` mount driven with std::fs and libc, no tdefs above it. Strict mode (the
//! default) loses every namespace operation whose directory was not fsynced after it;
//! ext4 mode loses those after the last fsync of anything.
//!
//! Every test also checks something the simulator of issue 9 (every namespace operation
//! durable at once) gets wrong, so each fails against it: run them on an older build with
//! TDEFS_POWERCUT_BIN=path/to/tdefs-powercut.

mod common;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;

struct Sim {
    _dir: tempfile::TempDir,
    pc: PowerCut,
}

impl Sim {
    fn new(mode: &str) -> Sim {
        let d = tempfile::Builder::new().prefix("tdefs-pcns").tempdir_in("/tmp").unwrap();
        let pc = PowerCut::start_mode(&d.path().join("lower"), &d.path().join("mnt"), &d.path().join("ctl"), &d.path().join("log"), mode);
        Sim { _dir: d, pc }
    }

    fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() { self.pc.mnt.clone() } else { self.pc.mnt.join(rel) }
    }

    /// A cut that undid nothing it could not undo.
    fn cut(&self) -> usize {
        let n = self.pc.cut();
        if self.knows("lastcut") {
            let r = self.pc.last_cut();
            assert_eq!(r.errors, 0, "the cut could not undo everything: {r:?}");
        }
        n
    }

    /// Whether the simulator has this control command. The helpers skip a command an older
    /// simulator lacks, so that a test run on it fails on what it gets wrong, not on that.
    fn knows(&self, cmd: &str) -> bool {
        !self.pc.command(cmd).starts_with("error unknown command")
    }

    /// Namespace operations not yet durable (`None` on a simulator without the command).
    fn pending(&self) -> Option<usize> {
        self.knows("mode").then(|| self.pc.pending())
    }

    fn fsync_dir(&self, rel: &str) {
        File::open(self.p(rel)).unwrap().sync_all().unwrap();
    }

    /// Create `rel` with `data` and fsync the file (not its directory).
    fn create_synced(&self, rel: &str, data: &[u8]) {
        let mut f = OpenOptions::new().write(true).create_new(true).open(self.p(rel)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
    }

    /// Create `rel` with `data`, durable: the file and its directory fsynced.
    fn create_durable(&self, rel: &str, data: &[u8]) {
        self.create_synced(rel, data);
        self.fsync_dir(parent(rel));
    }

    fn mkdir_durable(&self, rel: &str) {
        fs::create_dir(self.p(rel)).unwrap();
        self.fsync_dir(parent(rel));
    }

    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.p(rel)).is_ok()
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        fs::read(self.p(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    fn ino(&self, rel: &str) -> u64 {
        fs::symlink_metadata(self.p(rel)).unwrap().ino()
    }
}

fn parent(rel: &str) -> &str {
    rel.rsplit_once('/').map(|(a, _)| a).unwrap_or("")
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

#[test]
fn rename_is_undone_unless_its_directory_is_fsynced() {
    let s = Sim::new("strict");
    s.mkdir_durable("d");
    s.create_durable("d/a", b"A");
    s.create_durable("d/b", b"B");
    fs::rename(s.p("d/a"), s.p("d/a2")).unwrap();
    s.fsync_dir("d");
    fs::rename(s.p("d/b"), s.p("d/b2")).unwrap(); // never made durable
    assert!(matches!(s.pending(), None | Some(1)), "{:?}", s.pending());
    s.cut();
    assert_eq!(s.read("d/a2"), b"A", "a rename followed by an fsync of its directory stays");
    assert!(!s.exists("d/a"));
    assert_eq!(s.read("d/b"), b"B", "a rename without an fsync of its directory is undone");
    assert!(!s.exists("d/b2"), "the new name is gone");
}

#[test]
fn a_new_file_needs_its_directory_fsynced_in_strict_mode() {
    let s = Sim::new("strict");
    s.create_durable("fsynced-file-and-dir", b"kept");
    s.create_synced("fsynced-file-only", b"data and size durable, name not");
    s.cut();
    assert!(!s.exists("fsynced-file-only"), "strict: a new file whose directory was not fsynced is gone, data and all");
    assert_eq!(s.read("fsynced-file-and-dir"), b"kept");
}

#[test]
fn ext4_mode_any_fsync_commits_every_earlier_namespace_operation() {
    let s = Sim::new("ext4");
    s.create_synced("file", b"kept with its name: the fsync committed the journal");
    // Namespace operations in other directories, then an fsync of an unrelated file.
    s.mkdir_durable("d");
    s.create_durable("d/old", b"old");
    fs::create_dir(s.p("e")).unwrap();
    fs::write(s.p("e/new"), b"unsynced data").unwrap();
    fs::rename(s.p("d/old"), s.p("e/renamed")).unwrap();
    s.create_synced("other", b"o"); // commits everything above
    // After the last fsync: lost.
    fs::write(s.p("late"), b"x").unwrap();
    fs::remove_file(s.p("other")).unwrap();
    s.cut();
    assert_eq!(s.read("file"), b"kept with its name: the fsync committed the journal");
    assert!(s.exists("e/new") && s.read("e/new").is_empty(), "the name is durable, its unsynced data is not");
    assert_eq!(s.read("e/renamed"), b"old");
    assert!(!s.exists("d/old"));
    assert!(!s.exists("late"), "created after the last fsync: gone");
    assert_eq!(s.read("other"), b"o", "unlinked after the last fsync: back");
}

#[test]
fn a_durable_name_keeps_only_the_data_that_was_fsynced() {
    let s = Sim::new("strict");
    let f = OpenOptions::new().write(true).create_new(true).open(s.p("named")).unwrap();
    s.fsync_dir("");
    f.write_all_at(b"never fsynced", 0).unwrap();
    drop(f);
    fs::write(s.p("after-the-dir-fsync"), b"y").unwrap();
    s.cut();
    assert!(s.exists("named"), "created, then its directory fsynced: the name is durable");
    assert_eq!(s.read("named"), b"", "its data was never fsynced");
    assert!(!s.exists("after-the-dir-fsync"), "created after the directory fsync: gone");
}

#[test]
fn an_unlink_is_undone_and_the_file_returns_with_its_durable_contents() {
    let s = Sim::new("strict");
    s.create_durable("f", b"version 1");
    s.create_durable("a", b"linked");
    fs::hard_link(s.p("a"), s.p("b")).unwrap();
    s.fsync_dir("");
    let ino = s.ino("f");
    let f = OpenOptions::new().write(true).open(s.p("f")).unwrap();
    f.write_all_at(b"VERSION 2, never fsynced", 0).unwrap();
    drop(f);
    let open = File::open(s.p("f")).unwrap();
    fs::remove_file(s.p("f")).unwrap();
    assert_eq!(open.metadata().unwrap().nlink(), 0, "unlinked and open: no name left, as on a disk");
    drop(open);
    // Two names of one file: removing one leaves the link count the mount shows at 1 (the
    // stashed name does not count), and the stash is invisible.
    assert_eq!(fs::metadata(s.p("a")).unwrap().nlink(), 2);
    fs::remove_file(s.p("b")).unwrap();
    assert_eq!(fs::metadata(s.p("a")).unwrap().nlink(), 1);
    let names: Vec<_> = fs::read_dir(s.p("")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.iter().all(|n| n != ".powercut-stash") && !s.exists(".powercut-stash"), "{names:?}");
    s.cut();
    assert!(s.exists("f"), "an unlink without an fsync of the directory is undone");
    assert_eq!(s.read("f"), b"version 1", "with the contents it had at its last fsync");
    assert_eq!(s.ino("f"), ino, "the same file, not a copy");
    assert!(s.exists("b"));
    assert_eq!(s.ino("b"), s.ino("a"));
    assert_eq!(fs::metadata(s.p("a")).unwrap().nlink(), 2);
}

#[test]
fn an_unlink_made_durable_stays() {
    let s = Sim::new("strict");
    s.mkdir_durable("d");
    s.create_durable("d/gone", b"1");
    s.create_durable("d/back", b"2");
    fs::remove_file(s.p("d/gone")).unwrap();
    s.fsync_dir("d");
    fs::remove_file(s.p("d/back")).unwrap();
    s.cut();
    assert!(!s.exists("d/gone"), "unlink, then fsync of the directory: durable");
    assert_eq!(s.read("d/back"), b"2", "unlinked after the fsync: back");
    // Nothing is left in the stash after a cut.
    let stash: Vec<_> = fs::read_dir(s.pc.lower.join(".powercut-stash")).unwrap().collect();
    assert!(stash.is_empty(), "{stash:?}");
}

#[test]
fn mkdir_and_rmdir() {
    let s = Sim::new("strict");
    s.mkdir_durable("kept");
    s.mkdir_durable("removed");
    s.mkdir_durable("restored");
    fs::remove_dir(s.p("removed")).unwrap();
    s.fsync_dir("");
    fs::create_dir(s.p("kept/sub")).unwrap();
    s.fsync_dir("kept");
    fs::create_dir(s.p("lost")).unwrap();
    // Everything inside the new directory is fsynced, but its own name never is.
    s.create_durable("lost/f", b"fsynced, in a directory whose name is not durable");
    s.fsync_dir("lost");
    fs::remove_dir(s.p("restored")).unwrap();
    s.cut();
    assert!(s.p("kept/sub").is_dir());
    assert!(!s.exists("lost"), "a directory whose parent was not fsynced is gone with its contents");
    assert!(!s.exists("removed"), "rmdir, then fsync of the parent: durable");
    assert!(s.p("restored").is_dir(), "rmdir without an fsync of the parent: undone");
}

#[test]
fn link_symlink_and_mknod() {
    let s = Sim::new("strict");
    s.mkdir_durable("d");
    s.create_durable("d/file", b"contents");
    fs::hard_link(s.p("d/file"), s.p("d/link-kept")).unwrap();
    std::os::unix::fs::symlink("file", s.p("d/sym-kept")).unwrap();
    assert_eq!(unsafe { libc::mkfifo(cstr(&s.p("d/fifo-kept")).as_ptr(), 0o644) }, 0);
    s.fsync_dir("d");
    fs::hard_link(s.p("d/file"), s.p("d/link-lost")).unwrap();
    std::os::unix::fs::symlink("file", s.p("d/sym-lost")).unwrap();
    assert_eq!(unsafe { libc::mkfifo(cstr(&s.p("d/fifo-lost")).as_ptr(), 0o644) }, 0);
    s.cut();
    assert_eq!(s.ino("d/link-kept"), s.ino("d/file"));
    assert_eq!(fs::read_link(s.p("d/sym-kept")).unwrap(), Path::new("file"));
    assert!(fs::symlink_metadata(s.p("d/fifo-kept")).unwrap().file_type().is_fifo_like());
    assert!(!s.exists("d/link-lost") && !s.exists("d/sym-lost") && !s.exists("d/fifo-lost"), "made after the last fsync of d");
    assert_eq!(fs::metadata(s.p("d/file")).unwrap().nlink(), 2);
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}

impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[test]
fn a_directory_rename_moves_its_subtree_back() {
    let s = Sim::new("strict");
    s.mkdir_durable("d");
    s.mkdir_durable("d/sub");
    s.create_durable("d/sub/deep", b"deep");
    s.create_durable("d/top", b"top");
    s.mkdir_durable("e");
    fs::rename(s.p("d"), s.p("e/moved")).unwrap();
    s.create_durable("e/moved/sub/new", b"fsynced with its directory, inside the moved tree");
    s.cut();
    assert!(!s.exists("e/moved"), "the rename was never made durable");
    assert_eq!(s.read("d/sub/deep"), b"deep");
    assert_eq!(s.read("d/top"), b"top");
    assert_eq!(s.read("d/sub/new"), b"fsynced with its directory, inside the moved tree", "durable inside the tree, which moved back");
    // Made durable by an fsync of the destination alone: atomic, the source loses it too.
    fs::rename(s.p("d"), s.p("e/moved")).unwrap();
    s.fsync_dir("e");
    s.cut();
    assert!(!s.exists("d"));
    assert_eq!(s.read("e/moved/sub/deep"), b"deep");
}

#[test]
fn a_rename_over_an_existing_target_brings_the_target_back() {
    let s = Sim::new("strict");
    s.create_durable("target", b"old contents");
    let old_ino = s.ino("target");
    s.create_durable("tmp", b"new contents");
    fs::rename(s.p("tmp"), s.p("target")).unwrap();
    assert_eq!(fs::metadata(s.p("target")).unwrap().nlink(), 1);
    s.cut();
    assert_eq!(s.read("target"), b"old contents", "replacing rename without a directory fsync: undone");
    assert_eq!(s.ino("target"), old_ino);
    assert_eq!(s.read("tmp"), b"new contents");
    // The write-fsync-rename-fsync(dir) pattern: durable. And a temporary file whose own
    // creation was never durable: after an undone rename it is gone, the target is back.
    fs::rename(s.p("tmp"), s.p("target")).unwrap();
    s.fsync_dir("");
    s.create_synced("tmp2", b"newer");
    fs::rename(s.p("tmp2"), s.p("target")).unwrap();
    s.cut();
    assert_eq!(s.read("target"), b"new contents");
    assert!(!s.exists("tmp") && !s.exists("tmp2"));
}

#[test]
fn only_the_fsynced_directory_keeps_its_operations() {
    let s = Sim::new("strict");
    s.mkdir_durable("d1");
    s.mkdir_durable("d2");
    s.create_synced("d1/x", b"x");
    s.create_synced("d2/y", b"y");
    fs::create_dir(s.p("d1/sub")).unwrap();
    fs::create_dir(s.p("d2/sub")).unwrap();
    s.fsync_dir("d1");
    s.cut();
    assert_eq!(s.read("d1/x"), b"x");
    assert!(s.p("d1/sub").is_dir());
    assert!(!s.exists("d2/y") && !s.exists("d2/sub"), "d2 was not fsynced");
}

#[test]
fn a_rename_between_directories_is_atomic() {
    let s = Sim::new("strict");
    s.mkdir_durable("d1");
    s.mkdir_durable("d2");
    s.create_durable("d1/a", b"a");
    // fsync of the destination only: the file is in one place after the cut, not two.
    fs::rename(s.p("d1/a"), s.p("d2/a")).unwrap();
    s.fsync_dir("d2");
    // fsync of the source only: likewise.
    fs::rename(s.p("d2/a"), s.p("d1/b")).unwrap();
    s.fsync_dir("d2");
    // No fsync: undone.
    fs::rename(s.p("d1/b"), s.p("d2/c")).unwrap();
    s.cut();
    assert_eq!(s.read("d1/b"), b"a");
    assert!(!s.exists("d1/a") && !s.exists("d2/a") && !s.exists("d2/c"));
    // A rename made durable carries the earlier operations of both directories with it: the
    // file it moved was created in d1, which was never fsynced after.
    s.create_synced("d1/fresh", b"f");
    fs::rename(s.p("d1/fresh"), s.p("d2/fresh")).unwrap();
    s.fsync_dir("d2");
    s.cut();
    assert_eq!(s.read("d2/fresh"), b"f");
    assert!(!s.exists("d1/fresh"));
}

#[test]
fn a_new_file_in_a_new_directory_needs_every_new_ancestor_fsynced() {
    let s = Sim::new("strict");
    fs::create_dir_all(s.p("n/m")).unwrap();
    s.create_durable("n/m/f", b"f");
    s.fsync_dir("n");
    s.cut();
    assert!(!s.exists("n"), "the root was never fsynced: n is not durable, nor anything in it");
    fs::create_dir_all(s.p("n/m")).unwrap();
    s.create_durable("n/m/f", b"f");
    s.fsync_dir("n");
    s.fsync_dir("");
    s.cut();
    assert_eq!(s.read("n/m/f"), b"f");
}

#[test]
fn rename_exchange_is_undone() {
    let s = Sim::new("strict");
    s.create_durable("a", b"A");
    s.create_durable("b", b"B");
    let (a, b) = (cstr(&s.p("a")), cstr(&s.p("b")));
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(s.read("a"), b"B");
    s.cut();
    assert_eq!(s.read("a"), b"A");
    assert_eq!(s.read("b"), b"B");
}

#[test]
fn the_control_socket_reports_the_mode_and_what_is_pending() {
    let s = Sim::new("strict");
    assert_eq!(s.pc.mode(), "strict");
    let e = Sim::new("ext4");
    assert_eq!(e.pc.mode(), "ext4");
    fs::write(s.p("f"), b"1").unwrap();
    fs::create_dir(s.p("d")).unwrap();
    fs::rename(s.p("f"), s.p("d/f")).unwrap();
    assert_eq!(s.pc.pending(), 3);
    let stats = s.pc.command("stats");
    assert!(stats.starts_with("dirty_files=1 pending_namespace=3 mode=strict"), "{stats}");
    // `cut` still answers `ok <files rolled back>` (tdefs-torture parses exactly that).
    assert_eq!(s.pc.command("cut"), "ok 1");
    assert_eq!(s.pc.last_cut(), CutReport { files: 1, namespace: 3, errors: 0 });
    assert_eq!(s.pc.pending(), 0);
    assert!(!s.exists("d"));
    // `sync` makes everything durable, as sync(2) would.
    fs::write(s.p("g"), b"2").unwrap();
    s.pc.sync();
    assert_eq!(s.pc.pending(), 0);
    s.cut();
    assert_eq!(s.read("g"), b"2");
}

/// A random history of namespace and data operations after a point where everything was
/// made durable (each file and each directory fsynced; in ext4 mode one fsync), none of
/// them made durable: the cut must bring back exactly the tree of that point, inode for
/// inode, whatever the order of renames, replacements, unlinks and directory moves.
#[test]
fn a_cut_undoes_a_random_history_back_to_the_last_durable_point() {
    // TDEFS_PCNS_SEEDS=N runs N seeds per mode (default 1).
    let seeds: u64 = std::env::var("TDEFS_PCNS_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    for (mode, seed) in ["strict", "ext4"].into_iter().flat_map(|m| (0..seeds).map(move |i| (m, i))) {
        let s = Sim::new(mode);
        let mut rng = Rng(0x5eed_0021 ^ mode.len() as u64 ^ (seed << 32));
        let root = "t";
        s.mkdir_durable(root);
        for round in 0..6 {
            // Random operations, some of them made durable at the end of the round.
            for i in 0..60 {
                random_op(&s, root, &mut rng, &format!("r{round}i{i}"));
            }
            make_everything_durable(&s, root, mode);
            let before = snapshot(&s.p(root));
            for i in 0..60 {
                random_op(&s, root, &mut rng, &format!("r{round}u{i}"));
            }
            assert_ne!(s.pending(), Some(0));
            s.cut();
            let after = snapshot(&s.p(root));
            assert_eq!(after, before, "{mode}, seed {seed}, round {round}: the tree after the cut is not the tree at the last durable point");
        }
    }
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n.max(1)
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() { None } else { Some(&v[self.below(v.len() as u64) as usize]) }
    }
}

fn walk(dir: &Path, dirs: &mut Vec<PathBuf>, files: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            dirs.push(p.clone());
            walk(&p, dirs, files);
        } else {
            files.push(p);
        }
    }
}

fn random_op(s: &Sim, root: &str, rng: &mut Rng, tag: &str) {
    let (mut dirs, mut files) = (vec![s.p(root)], Vec::new());
    walk(&s.p(root), &mut dirs, &mut files);
    let dir = rng.pick(&dirs).unwrap().clone();
    let fresh = dir.join(tag);
    let _ = match rng.below(12) {
        0 | 1 => fs::write(&fresh, tag.repeat(1 + rng.below(300) as usize)),
        2 if dirs.len() < 10 => fs::create_dir(&fresh),
        3 => match rng.pick(&files) {
            Some(f) => OpenOptions::new().write(true).open(f).and_then(|h| h.write_all_at(tag.as_bytes(), rng.below(5000))),
            None => Ok(()),
        },
        4 | 5 => match rng.pick(&files) {
            Some(f) => {
                // To a fresh name or over another file.
                let to = if rng.below(2) == 0 { rng.pick(&files).unwrap().clone() } else { fresh };
                fs::rename(f, to)
            }
            None => Ok(()),
        },
        6 => match rng.pick(&dirs[1..]) {
            // A directory moves (not into itself).
            Some(d) if !dir.starts_with(d) => fs::rename(d, &fresh),
            _ => Ok(()),
        },
        7 => match rng.pick(&files) {
            Some(f) => fs::hard_link(f, &fresh),
            None => Ok(()),
        },
        8 | 9 => match rng.pick(&files) {
            Some(f) => fs::remove_file(f),
            None => Ok(()),
        },
        10 => match rng.pick(&dirs[1..]) {
            Some(d) => fs::remove_dir(d), // fails unless empty: fine
            None => Ok(()),
        },
        _ => std::os::unix::fs::symlink(tag, &fresh),
    };
}

fn make_everything_durable(s: &Sim, root: &str, mode: &str) {
    let (mut dirs, mut files) = (vec![s.p(root)], Vec::new());
    walk(&s.p(root), &mut dirs, &mut files);
    for f in &files {
        if !fs::symlink_metadata(f).unwrap().is_symlink() {
            File::open(f).unwrap().sync_all().unwrap();
        }
    }
    if mode == "ext4" {
        // Any fsync commits the journal: every namespace operation before it.
        File::open(s.p(root)).unwrap().sync_all().unwrap();
    } else {
        for d in &dirs {
            File::open(d).unwrap().sync_all().unwrap();
        }
    }
    assert!(matches!(s.pending(), None | Some(0)), "{mode}: everything is durable");
}

/// Names -> (kind, contents or link target, inode): a cut must restore the very inodes.
fn snapshot(root: &Path) -> Vec<(String, String, Vec<u8>, u64)> {
    let (mut dirs, mut files) = (Vec::new(), Vec::new());
    walk(root, &mut dirs, &mut files);
    let mut all: Vec<PathBuf> = dirs.into_iter().chain(files).collect();
    all.sort();
    all.iter()
        .map(|p| {
            let m = fs::symlink_metadata(p).unwrap();
            let (kind, data) = if m.is_dir() {
                ("dir", Vec::new())
            } else if m.is_symlink() {
                ("symlink", fs::read_link(p).unwrap().into_os_string().into_vec())
            } else {
                ("file", fs::read(p).unwrap())
            };
            (p.strip_prefix(root).unwrap().display().to_string(), kind.to_string(), data, m.ino())
        })
        .collect()
}
