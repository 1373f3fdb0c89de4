//! tdefs over the strict power-cut simulator (issue 21): power cuts that lose every
//! namespace operation whose directory was not fsynced, at each step of tdefs' own
//! metadata handling (first initialisation, compaction), around renames, unlinks and links
//! that the application did not make durable, and after tdefs decrypt and check --repair.
//! The decrypt-export and check --repair tests reproduced durability bugs this simulator
//! found in tdefs (fixed with them).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;

fn fsync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

/// Written, fsynced, and its name made durable (the file and its directory fsynced).
fn write_durable(path: &Path, data: &[u8]) {
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    fsync_dir(path.parent().unwrap());
}

/// `tdefs mount` with TDEFS_FAULT=point must crash there (within 30 s) instead of mounting.
fn mount_stops_at(c: &CutMount, point: &str) {
    let mut child = std::process::Command::new(TDEFS)
        .env("TDEFS_FAULT", point)
        .args(["mount", "--config"])
        .arg(&c.m.config)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            lazy_unmount(&c.m.mnt);
            panic!("{point}: tdefs mount never reached this fault point");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    lazy_unmount(&c.m.mnt);
    assert!(String::from_utf8_lossy(&out.stderr).contains("TDEFS_FAULT"), "{point}: {out:?}");
}

fn check_clean(c: &CutMount, when: &str) {
    let (code, text) = c.m.check(&[]);
    assert!(code == 0 || code == 1, "{when}: tdefs check exited {code}:\n{text}");
    assert!(!text.contains("MISSING") && !text.contains("MISMATCH"), "{when}:\n{text}");
}

/// A cut at each step of the first initialisation (each write_durably of keys, snapshot
/// and first log, before and after its rename): the next mount initialises or opens, and
/// what is then made durable survives the next cut.
#[test]
fn cuts_at_every_step_of_the_first_initialisation() {
    for point in ["keys", "files.snap", "files.log.0000000000000001"].iter().flat_map(|n| [format!("{n}:before-rename"), format!("{n}:after-rename")]) {
        let mut c = CutMount::prepare("aes256-ctr");
        mount_stops_at(&c, &point);
        c.pc.cut();
        c.m.start();
        write_durable(&c.m.path("f"), point.as_bytes());
        c.power_cut();
        c.m.start();
        assert_eq!(fs::read(c.m.path("f")).unwrap(), point.as_bytes(), "{point}");
        c.m.stop();
        check_clean(&c, &point);
    }
}

/// A cut at each step of a compaction (new log generation, snapshot), with the daemon
/// stopped there: every file made durable before reads back.
#[test]
fn cuts_at_every_step_of_a_compaction() {
    for point in ["files.log.0000000000000002:before-rename", "files.log.0000000000000002:after-rename", "files.snap:before-rename", "files.snap:after-rename"] {
        let mut c = CutMount::prepare("aes256-ctr");
        c.m.set_encryption_extra("aes256-ctr", "file-dictionary-rewrite-threshold = 4");
        c.m.start();
        c.m.stop(); // initialised without the fault point (files.snap is written there too)
        c.m.env = vec![("TDEFS_FAULT".into(), point.into())];
        c.m.start();
        let mut durable = Vec::new();
        for i in 0..40 {
            let name = format!("f{i}");
            let p = c.m.path(&name);
            let r = (|| -> std::io::Result<()> {
                let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&p)?;
                f.write_all(name.as_bytes())?;
                f.sync_all()?;
                File::open(c.m.path(""))?.sync_all()
            })();
            if r.is_err() {
                break; // the daemon stopped at the fault point
            }
            durable.push(name);
            std::thread::sleep(std::time::Duration::from_millis(150));
        }
        assert!(durable.len() < 40, "{point}: the compaction never reached its fault point");
        c.power_cut();
        c.m.env.clear();
        c.m.start();
        for name in &durable {
            assert_eq!(fs::read(c.m.path(name)).unwrap(), name.as_bytes(), "{point}: {name}");
        }
        c.m.stop();
        check_clean(&c, point);
    }
}

/// Renames of encrypted files and of a directory holding them, not made durable by the
/// application: after the cut the old names read as before (the rename intents are
/// aborted at mount); made durable, the new names do. Each rename's intent is made durable
/// after a barrier fsync of the directories of the rename before it, so of several renames
/// in a row only the last can be undone.
#[test]
fn renames_not_made_durable_are_undone_and_read_back() {
    let mut c = CutMount::prepare("aes256-ctr");
    c.m.start();
    fs::create_dir(c.m.path("d")).unwrap();
    fsync_dir(&c.m.path(""));
    for (n, d) in [("a", "AAAA"), ("b", "BBBB"), ("t", "old target"), ("d/x", "XXXX")] {
        write_durable(&c.m.path(n), d.as_bytes());
    }
    let cut = |c: &mut CutMount| {
        c.power_cut();
        c.m.start();
    };
    fs::rename(c.m.path("a"), c.m.path("a2")).unwrap();
    cut(&mut c);
    assert_eq!(fs::read(c.m.path("a")).unwrap(), b"AAAA");
    assert!(!c.m.path("a2").exists());
    fs::rename(c.m.path("b"), c.m.path("t")).unwrap(); // replaces an encrypted target
    cut(&mut c);
    assert_eq!(fs::read(c.m.path("b")).unwrap(), b"BBBB");
    assert_eq!(fs::read(c.m.path("t")).unwrap(), b"old target");
    fs::rename(c.m.path("d"), c.m.path("d2")).unwrap();
    cut(&mut c);
    assert_eq!(fs::read(c.m.path("d/x")).unwrap(), b"XXXX");
    assert!(!c.m.path("d2").exists());
    // In a row: the first two are made durable by the next rename's intent.
    fs::rename(c.m.path("a"), c.m.path("a2")).unwrap();
    fs::rename(c.m.path("b"), c.m.path("t")).unwrap();
    fs::rename(c.m.path("d"), c.m.path("d2")).unwrap();
    cut(&mut c);
    assert_eq!(fs::read(c.m.path("a2")).unwrap(), b"AAAA");
    assert_eq!(fs::read(c.m.path("t")).unwrap(), b"BBBB");
    assert!(!c.m.path("a").exists() && !c.m.path("b").exists());
    assert_eq!(fs::read(c.m.path("d/x")).unwrap(), b"XXXX", "the last rename was not made durable");
    // Made durable by the application: the new names.
    fs::rename(c.m.path("d"), c.m.path("d2")).unwrap();
    fsync_dir(&c.m.path(""));
    cut(&mut c);
    assert_eq!(fs::read(c.m.path("d2/x")).unwrap(), b"XXXX");
    c.m.stop();
    check_clean(&c, "after the renames");
}

/// An unlink not made durable comes back after the cut with its entry (readable, not
/// noise); a hard link not made durable is gone and leaves no stale entry behind. The
/// removal of an entry reaches the log only after a barrier fsync of the directory, which
/// makes the unlink durable: any later dictionary write (a create, link, rename) does that.
#[test]
fn unlinks_and_links_not_made_durable() {
    let mut c = CutMount::prepare("aes256-ctr");
    c.m.start();
    write_durable(&c.m.path("u"), b"unlinked, not durably");
    write_durable(&c.m.path("l"), b"linked, not durably");
    fs::hard_link(c.m.path("l"), c.m.path("l2")).unwrap();
    fs::remove_file(c.m.path("u")).unwrap();
    c.power_cut();
    c.m.start();
    assert_eq!(fs::read(c.m.path("u")).unwrap(), b"unlinked, not durably");
    assert!(!c.m.path("l2").exists());
    assert_eq!(fs::read(c.m.path("l")).unwrap(), b"linked, not durably");
    // The unlink made durable by the dictionary's barrier: the next creation's record
    // waits for an fsync of the directory.
    fs::remove_file(c.m.path("u")).unwrap();
    fs::write(c.m.path("v"), b"v").unwrap();
    c.power_cut();
    c.m.start();
    assert!(!c.m.path("u").exists());
    assert!(!c.m.path("v").exists(), "v's own name was never made durable");
    c.m.stop();
    check_clean(&c, "after the unlinks and links");
}

/// `tdefs decrypt --to DIR` into a directory it creates: once it returns, the export is
/// durable. It fsyncs every exported directory and DIR itself, but not DIR's parent, so
/// DIR's own name is not durable: a power cut loses the whole export.
#[test]
fn a_finished_decrypt_export_survives_a_power_cut() {
    let mut c = CutMount::prepare("aes256-ctr");
    c.m.start();
    fs::create_dir(c.m.path("db")).unwrap();
    fsync_dir(&c.m.path(""));
    write_durable(&c.m.path("db/data"), b"exported plaintext");
    c.m.stop();
    // The export goes to a second simulated disk.
    let d = c.m.dir.path();
    let exp = PowerCut::start_mode(&d.join("exp-lower"), &d.join("exp"), &d.join("exp.sock"), &d.join("exp.log"), "strict");
    let out = std::process::Command::new(TDEFS)
        .args(["decrypt", "--config"])
        .arg(&c.m.config)
        .arg("--to")
        .arg(exp.mnt.join("out"))
        .arg(&c.m.backing)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(exp.mnt.join("out/db/data")).unwrap(), b"exported plaintext");
    exp.cut();
    assert_eq!(fs::read(exp.mnt.join("out/db/data")).unwrap(), b"exported plaintext", "the finished export is lost");
}

/// `tdefs check --repair` keeps a copy of a damaged log (`.damaged`) before cutting the log
/// short. The copy must be durable before the log is cut: after a power cut, the records
/// after the damage must still be in the copy.
#[test]
fn the_copy_check_repair_keeps_survives_a_power_cut() {
    let mut c = CutMount::prepare("aes256-ctr");
    c.m.start();
    for i in 0..20 {
        write_durable(&c.m.path(&format!("f{i}")), b"x");
    }
    c.m.stop();
    // Damage a record in the middle of the log (in the lower directory: durable at once).
    let log = c.pc.lower.join(".tdefs/files.log.0000000000000001");
    let before = fs::read(&log).unwrap();
    let f = OpenOptions::new().write(true).open(&log).unwrap();
    f.write_all_at(&[0xff; 8], before.len() as u64 / 2).unwrap();
    drop(f);
    let damaged = fs::read(&log).unwrap();
    let (_, text) = c.m.check(&["--repair"]);
    assert!(text.contains("repair: cut the damaged log"), "{text}");
    c.pc.cut();
    let copy = fs::read(c.pc.lower.join(".tdefs/files.log.0000000000000001.damaged")).unwrap_or_default();
    assert_eq!(copy.len(), damaged.len(), "the kept copy of the damaged log lost its contents in the power cut");
}
