//! Crash torture in CI (issues 3 and 21): tdefs killed with SIGKILL mid-workload (alone,
//! and with the workload), remounted, every durable operation verified, with floors (durable
//! operations per cycle), the plaintext scan at the end, and the workload's faults caught.
//! `scripts/crash-torture.sh` runs the same tool for hundreds of cycles.

use std::process::Command;

/// Run the torture: (success, stdout + stderr). A run meant to pass works under
/// /var/tmp/tdefs-crash-tests (the torture removes its work directory on success and keeps
/// it on failure, for inspection); a run with a workload fault, meant to fail, in a
/// temporary directory removed afterwards.
fn run_torture(args: &[&str], fault: Option<&str>) -> (bool, String) {
    let tmp = tempfile::Builder::new().prefix("tdefs-torture-test").tempdir_in("/var/tmp").unwrap();
    let kept = std::path::Path::new("/var/tmp/tdefs-crash-tests");
    std::fs::create_dir_all(kept).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tdefs-torture"));
    cmd.args(["run", "--tdefs", env!("CARGO_BIN_EXE_tdefs")]).args(args);
    match fault {
        Some(f) => cmd.env("TDEFS_TORTURE_FAULT", f).arg("--workdir").arg(tmp.path().join("work")),
        None => cmd.env("TMPDIR", kept),
    };
    let out = cmd.output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn torture(mode: &str, method: &str, cycles: u32, seed: u64) {
    let (ok, text) = run_torture(&["--mode", mode, "--method", method, "--cycles", &cycles.to_string(), "--seed", &seed.to_string()], None);
    println!("{text}");
    assert!(ok, "crash torture failed:\n{text}");
    assert!(text.contains(&format!("{cycles} cycles")) && text.contains("durable ops verified"), "{text}");
    // The plaintext scan ran at the end and read the run's files.
    assert!(text.contains(": 0 leaks") && !text.contains("scanned 0 files"), "{text}");
}

/// A workload that dies before its first durable operation fails the cycle, and its stderr
/// is shown.
#[test]
fn torture_fails_a_workload_that_dies_at_once() {
    let (ok, text) = run_torture(&["--mode", "kill-fs", "--cycles", "2", "--seed", "3"], Some("die-at-start"));
    assert!(!ok, "{text}");
    assert!(text.contains("before its first durable operation") && text.contains("workload: fault die-at-start"), "{text}");
}

/// A workload that stays alive but makes nothing durable after its first operation is below
/// the floor of durable operations per cycle.
#[test]
fn torture_floor_fails_a_workload_that_does_nothing() {
    let (ok, text) = run_torture(&["--mode", "kill-fs", "--cycles", "2", "--seed", "3", "--max-run-ms", "100"], Some("stall"));
    assert!(!ok, "{text}");
    assert!(text.contains("below the floor of 20 per cycle"), "{text}");
}

/// kill-both: an operation that completed but was not journalled must never be taken for
/// one in flight. The workload here completes one and sleeps without journalling it: the
/// torture refuses to kill it anywhere but inside a request of the mount, and fails.
#[test]
fn kill_both_never_counts_a_completed_operation_as_in_flight() {
    let (ok, text) = run_torture(&["--mode", "kill-both", "--cycles", "1", "--seed", "3", "--max-run-ms", "100"], Some("unjournalled"));
    assert!(!ok, "{text}");
    assert!(text.contains("never blocked in a request of the mount") && text.contains("fault unjournalled"), "{text}");
}

#[test]
fn kill_dash_nine_of_the_daemon_mixed_modes() {
    torture("mixed", "aes256-ctr", 24, 11);
}

#[test]
fn kill_dash_nine_with_sm4() {
    torture("kill-fs", "sm4-ctr", 8, 12);
}

/// XTS: its read-modify-write of partial blocks and its ciphertext-stealing tail, killed
/// at any instant in every mode.
#[test]
fn kill_dash_nine_mixed_modes_aes256_xts() {
    torture("mixed", "aes256-xts", 16, 13);
}

mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};

/// The backing tree but `.tdefs/owner`: that file is lock state (who holds the directory,
/// written by every command that takes the lock, refused mounts included, since issue 22),
/// not data or metadata, so "nothing on disk changed" leaves it out.
fn digest_but_owner(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
    tree_digest(dir).into_iter().filter(|(p, ..)| !p.ends_with(".tdefs/owner")).collect()
}

fn meta(m: &Mount, name: &str) -> PathBuf {
    m.bpath(".tdefs").join(name)
}

fn log_file(m: &Mount) -> PathBuf {
    let mut logs: Vec<PathBuf> = fs::read_dir(m.bpath(".tdefs")).unwrap().map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("files.log.")).collect();
    logs.sort();
    logs.pop().expect("a log file")
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = fs::remove_dir_all(to);
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Two sessions: ten files compacted into the snapshot, then a few logged records. With
/// `crash`, the second session ends with kill -9 once its records are on disk (a clean
/// unmount records where the log ends, and then any cut of it is a rollback).
fn dictionary_with_snapshot_and_log_ending(crash: bool) -> Mount {
    let mut m = Mount::prepare("aes256-ctr");
    m.set_encryption_extra("aes256-ctr", "file-dictionary-rewrite-threshold = 8");
    m.start();
    for i in 0..10 {
        fs::write(m.path(&format!("s{i}")), format!("snapshot file {i}")).unwrap();
    }
    m.stop(); // compaction is due at unmount
    m.set_encryption_extra("aes256-ctr", "file-dictionary-rewrite-threshold = 1000");
    m.start();
    for i in 0..3 {
        fs::write(m.path(&format!("l{i}")), format!("log file {i}")).unwrap();
    }
    fs::remove_file(m.path("l2")).unwrap();
    if crash {
        std::thread::sleep(std::time::Duration::from_millis(2500)); // the unlink's record is flushed within a second
        m.kill();
    } else {
        m.stop();
    }
    m
}

fn dictionary_with_snapshot_and_log() -> Mount {
    dictionary_with_snapshot_and_log_ending(false)
}

#[test]
fn torn_last_log_record_at_every_offset_still_mounts() {
    let mut m = dictionary_with_snapshot_and_log_ending(true);
    let log = log_file(&m);
    let full = fs::read(&log).unwrap();
    // The last record is the Delete of l2 (its file is already gone): find where it starts
    // by cutting until the mount sees one record fewer.
    let pristine = m.dir.path().join("pristine");
    copy_dir(&m.bpath(".tdefs"), &pristine);
    let mut cuts = 0;
    for cut in (full.len() - 120).max(40)..full.len() {
        copy_dir(&pristine, &m.bpath(".tdefs"));
        fs::write(&log, &full[..cut]).unwrap();
        m.start();
        for i in 0..10 {
            assert_eq!(fs::read_to_string(m.path(&format!("s{i}"))).unwrap(), format!("snapshot file {i}"), "cut {cut}");
        }
        for i in 0..2 {
            assert_eq!(fs::read_to_string(m.path(&format!("l{i}"))).unwrap(), format!("log file {i}"), "cut {cut}");
        }
        assert!(!m.path("l2").exists());
        m.stop();
        let (code, text) = m.check(&[]);
        assert_eq!(code, 0, "cut {cut}: {text}");
        cuts += 1;
    }
    assert!(cuts >= 60);
    assert!(m.log_text().contains("torn record"), "the cut is logged");
}

#[test]
fn interrupted_compaction_leftovers_are_ignored() {
    let mut m = dictionary_with_snapshot_and_log();
    fs::write(meta(&m, "files.snap.tmp"), b"half a snapshot").unwrap();
    m.start();
    assert_eq!(fs::read_to_string(m.path("s3")).unwrap(), "snapshot file 3");
    assert_eq!(fs::read_to_string(m.path("l1")).unwrap(), "log file 1");
    m.stop();
    assert!(!meta(&m, "files.snap.tmp").exists());
}

#[test]
fn damaged_metadata_is_refused_clearly_and_left_unchanged() {
    let mut m = dictionary_with_snapshot_and_log();
    let pristine = m.dir.path().join("pristine");
    copy_dir(&m.bpath(".tdefs"), &pristine);
    let log = log_file(&m);
    let snap = meta(&m, "files.snap");
    let keys = meta(&m, "keys");
    let snap_len = fs::metadata(&snap).unwrap().len() as usize;
    let mut cases: Vec<(String, Box<dyn Fn()>, Vec<&str>)> = Vec::new();
    for pos in [0usize, 9, 20, 60, snap_len / 2, snap_len - 1] {
        let snap = snap.clone();
        cases.push((format!("snapshot bit flip at {pos}"), Box::new(move || flip(&snap, pos)), vec!["files.snap", "Restore"]));
    }
    let l = log.clone();
    cases.push(("bit flip in the first log record".into(), Box::new(move || flip(&l, 60)), vec!["files.log", "damaged at byte", "tdefs check --repair"]));
    let k = keys.clone();
    cases.push(("truncated key dictionary".into(), Box::new(move || {
        let b = fs::read(&k).unwrap();
        fs::write(&k, &b[..b.len() / 2]).unwrap();
    }), vec!["keys", "damaged", "backup"]));
    for f in [keys.clone(), snap.clone(), log.clone()] {
        cases.push((format!("newer format in {}", f.display()), Box::new(move || {
            let mut b = fs::read(&f).unwrap();
            b[8] = 9;
            fs::write(&f, b).unwrap();
        }), vec!["newer than this build", "upgrade tdefs"]));
    }
    for (name, damage, expect) in cases {
        copy_dir(&pristine, &m.bpath(".tdefs"));
        damage();
        let before = digest_but_owner(&m.backing);
        let out = m.mount_fails(&[]);
        let err = String::from_utf8_lossy(&out.stderr);
        for x in expect {
            assert!(err.to_lowercase().contains(&x.to_lowercase()), "{name}: expected {x:?} in:\n{err}");
        }
        assert_eq!(digest_but_owner(&m.backing), before, "{name}: nothing on disk changed");
        let (code, text) = m.check(&[]);
        assert_eq!(code, 2, "{name}: check cannot check: {text}");
    }
    // Damage in the second of four log records (Put l0, Put l1, Put l2, Delete l2):
    // `check --repair` keeps the snapshot and the first record.
    copy_dir(&pristine, &m.bpath(".tdefs"));
    let bytes = fs::read(&log).unwrap();
    let frames: Vec<usize> = bytes.windows(4).enumerate().filter(|(_, w)| *w == b"tREc").map(|(i, _)| i).collect();
    assert_eq!(frames.len(), 4, "records in the log");
    flip(&log, frames[1] + 30);
    let out = m.mount_fails(&[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("tdefs check --repair"));
    let (code, text) = m.check(&["--repair"]);
    assert!(text.contains("copies kept") && text.contains(".damaged"), "{text}");
    assert!(code == 0 || code == 1, "{text}");
    m.start();
    assert_eq!(fs::read_to_string(m.path("s5")).unwrap(), "snapshot file 5");
    assert_eq!(fs::read_to_string(m.path("l0")).unwrap(), "log file 0");
    assert!(!m.path("l2").exists());
}

fn flip(p: &Path, pos: usize) {
    let mut b = fs::read(p).unwrap();
    b[pos] ^= 0x10;
    fs::write(p, b).unwrap();
}

#[test]
fn check_reports_stale_entries_repairs_them_and_refuses_a_mounted_directory() {
    let mut m = Mount::new("aes128-ctr");
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/a"), b"a").unwrap();
    fs::write(m.path("d/b"), b"b").unwrap();
    fs::hard_link(m.path("d/a"), m.path("a2")).unwrap();
    let (code, text) = m.check(&[]);
    assert_eq!(code, 2, "mounted: {text}");
    // (since issue 22 the refusal names the mountpoint and the daemon's pid)
    assert!(text.contains("in use") || text.contains("is mounted at"), "{text}");
    m.stop();
    // A file put into the backing directory behind tdefs' back has no record: a problem
    // (the mount refuses it) until someone who knows it is plaintext adopts it.
    fs::write(m.bpath("plain.txt"), b"legacy").unwrap();
    let (code, text) = m.check(&[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("UNRECORDED") && text.contains("/plain.txt") && text.contains("files plaintext:        0"), "{text}");
    let out = Command::new(TDEFS).args(["adopt", "--config"]).arg(&m.config).arg("plain.txt").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (code, text) = m.check(&[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("files aes128-ctr:       3") && text.contains("files plaintext:        1"), "{text}");
    fs::remove_file(m.bpath("d/b")).unwrap(); // behind tdefs' back
    let (code, text) = m.check(&[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("STALE") && text.contains("/d/b"), "{text}");
    let (code, text) = m.check(&["--repair"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("drop /d/b"), "{text}");
    let (code, _) = m.check(&[]);
    assert_eq!(code, 0);
    m.start();
    assert_eq!(fs::read(m.path("a2")).unwrap(), b"a");
}

/// A backing directory written by tdefs 0.1 (format 1: files without a record were
/// plaintext, no dictionary mark, one sealing key) mounts with this build: every file reads
/// as before, the file that had no record is recorded as plaintext, and the metadata is
/// format 2 from then on.
#[test]
fn format_1_backing_directory_is_upgraded() {
    let mut m = Mount::prepare("aes256-ctr");
    fs::remove_dir(&m.backing).unwrap();
    let tar = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1-backing.tar.gz");
    let st = Command::new("tar").arg("-xzf").arg(&tar).arg("-C").arg(m.dir.path()).status().unwrap();
    assert!(st.success());
    // The fixture was made with the plaintext master key type.
    let cfg = fs::read_to_string(&m.config).unwrap();
    let cfg = cfg[..cfg.find("[security.encryption.master-key]").unwrap()].to_string()
        + "[security.encryption.master-key]\ntype = \"plaintext\"\n";
    fs::write(&m.config, cfg).unwrap();
    let metadir = m.bpath(".tdefs");
    let version = |name: &str| fs::read(metadir.join(name)).unwrap()[8];
    assert_eq!(version("keys"), 1);
    m.start();
    assert_eq!(fs::read_to_string(m.path("adopted.txt")).unwrap(), "hello adopted plaintext\n");
    assert_eq!(fs::read_to_string(m.path("enc.txt")).unwrap(), "secret aes256 contents TDEFS-MARKER-v1enc\n");
    let sm4 = Command::new("sha256sum").arg(m.path("dir/sm4.bin")).output().unwrap();
    assert!(String::from_utf8_lossy(&sm4.stdout).starts_with("ad51b2b00b0da530a9ef72e51f7df443a8e897c2f2532d8a56f83d9998f60b12"));
    assert_eq!(fs::read(m.path("empty")).unwrap(), b"");
    m.stop();
    assert!(m.log_text().contains("upgraded the metadata from format 1 to format 2"), "{}", m.log_text());
    assert_eq!(version("keys"), 2);
    assert_eq!(version("files.snap"), 2);
    assert_eq!(version(log_file(&m).file_name().unwrap().to_str().unwrap()), 2);
    let (code, text) = m.check(&["-v"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("plaintext /adopted.txt") && text.contains("files plaintext:        1"), "{text}");
    // The encrypted file is still ciphertext on disk; a second mount upgrades nothing.
    assert!(!fs::read_to_string(m.bpath("enc.txt")).unwrap_or_default().contains("TDEFS-MARKER"));
    m.start();
    assert_eq!(fs::read_to_string(m.path("enc.txt")).unwrap(), "secret aes256 contents TDEFS-MARKER-v1enc\n");
    m.stop();
    assert_eq!(m.log_text().matches("upgraded the metadata").count(), 1);
}

/// `.tdefs` put back from an older backup: a file created since then has no record, and
/// the mount refuses its bytes instead of serving (and writing) them as plaintext. Put back
/// only in part (the file dictionary older than the key dictionary), the mount is refused.
#[test]
fn restored_older_dictionary_never_means_plaintext() {
    let mut m = Mount::new("aes256-ctr");
    fs::write(m.path("old"), b"from before the backup").unwrap();
    m.stop();
    let backup = m.dir.path().join("backup");
    copy_dir(&m.bpath(".tdefs"), &backup);
    m.start();
    let marker = "TDEFS-MARKER-after-backup";
    fs::write(m.path("new"), format!("written after the backup {marker}")).unwrap();
    fs::write(m.path("new-empty"), b"").unwrap();
    m.stop();
    let newest = fs::read(m.bpath(".tdefs/keys")).unwrap();

    // Only the file dictionary put back: refused, nothing changed.
    for f in fs::read_dir(m.bpath(".tdefs")).unwrap() {
        let f = f.unwrap().path();
        if f.file_name().unwrap() != "keys" {
            fs::remove_file(f).unwrap();
        }
    }
    for f in fs::read_dir(&backup).unwrap() {
        let f = f.unwrap().path();
        if f.file_name().unwrap() != "keys" {
            fs::copy(&f, m.bpath(".tdefs").join(f.file_name().unwrap())).unwrap();
        }
    }
    let before = digest_but_owner(&m.backing);
    let out = m.mount_fails(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("older than the key dictionary records") && err.contains("Restore the whole .tdefs"), "{err}");
    assert_eq!(digest_but_owner(&m.backing), before, "nothing on disk changed");
    assert_eq!(m.check(&[]).0, 2);

    // The whole .tdefs put back: it mounts, and the file made since has no record.
    copy_dir(&backup, &m.bpath(".tdefs"));
    m.start();
    assert_eq!(fs::read(m.path("old")).unwrap(), b"from before the backup");
    let ciphertext = fs::read(m.bpath("new")).unwrap();
    assert_eq!(errno_of(fs::read(m.path("new"))), libc::EIO);
    assert_eq!(errno_of(fs::OpenOptions::new().write(true).open(m.path("new"))), libc::EIO);
    assert_eq!(errno_of(fs::OpenOptions::new().append(true).open(m.path("new"))), libc::EIO);
    assert_eq!(errno_of(fs::OpenOptions::new().write(true).truncate(true).open(m.path("new"))), libc::EIO);
    assert_eq!(errno_of(fs::File::options().write(true).open(m.path("new")).and_then(|f| f.set_len(0))), libc::EIO);
    // An empty file has no bytes to misread: it is recorded (encrypted) when opened.
    fs::write(m.path("new-empty"), b"now encrypted").unwrap();
    m.stop();
    assert_eq!(fs::read(m.bpath("new")).unwrap(), ciphertext, "never written, never truncated");
    assert_ne!(fs::read(m.bpath("new-empty")).unwrap(), b"now encrypted");
    let log = m.log_text();
    assert_eq!(log.matches("this file has no record").count(), 1, "one line per file:\n{log}");
    assert!(log.contains("file=/new") && log.contains("tdefs check"), "{log}");
    let (code, text) = m.check(&[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("UNRECORDED") && text.contains("/new "), "{text}");
    // The newest key dictionary and file dictionary together are consistent again.
    let _ = newest;
}

/// A newest log deleted, or the log cut at a record boundary, after a clean unmount: the
/// mount is refused (before, it mounted and the lost files read as plaintext).
#[test]
fn deleted_or_cut_logs_are_refused() {
    let mut m = Mount::prepare("aes256-ctr");
    m.set_encryption_extra("aes256-ctr", "file-dictionary-rewrite-threshold = 5");
    m.start();
    for i in 0..8 {
        fs::write(m.path(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    m.stop(); // compacts: a new log generation
    m.set_encryption_extra("aes256-ctr", "file-dictionary-rewrite-threshold = 1000");
    m.start();
    fs::write(m.path("g"), b"after the compaction").unwrap();
    m.stop();
    let log = log_file(&m);
    let full = fs::read(&log).unwrap();
    let frames: Vec<usize> = full.windows(4).enumerate().filter(|(_, w)| *w == b"tREc").map(|(i, _)| i).collect();
    assert!(!frames.is_empty());
    fs::write(&log, &full[..*frames.last().unwrap()]).unwrap();
    let err = String::from_utf8_lossy(&m.mount_fails(&[]).stderr).into_owned();
    assert!(err.contains("but records up to"), "{err}");
    fs::remove_file(&log).unwrap();
    let err = String::from_utf8_lossy(&m.mount_fails(&[]).stderr).into_owned();
    assert!(err.contains("incomplete") || err.contains("is missing"), "{err}");
    // `check --repair` accepts the dictionary as it is, and names what it cannot vouch for.
    fs::write(&log, &full[..*frames.last().unwrap()]).unwrap();
    let (code, text) = m.check(&["--repair"]);
    assert!(text.contains("accepted the file dictionary as it is") && text.contains("UNRECORDED") && text.contains("/g"), "{text}");
    assert_eq!(code, 1, "{text}");
    m.start();
    assert_eq!(fs::read(m.path("f3")).unwrap(), b"file 3");
    assert_eq!(errno_of(fs::read(m.path("g"))), libc::EIO);
}

/// A file unlinked under a directory renamed since it was created, with the unlink's
/// Delete record lost to a kill -9: recovery must drop the entry (it is not in the log's
/// Put records), or `tdefs check` reports it STALE after a clean remount.
#[test]
fn recovery_drops_an_entry_whose_unlink_record_was_lost_under_a_renamed_directory() {
    let fsync = |p: PathBuf| fs::File::open(p).unwrap().sync_all().unwrap();
    let mut stale_runs = 0;
    for round in 0..5 {
        let mut m = Mount::new("aes256-ctr");
        fs::create_dir(m.path("d")).unwrap();
        fsync(m.path(""));
        fs::write(m.path("d/f"), b"TDEFS-MARKER contents").unwrap();
        fsync(m.path("d/f"));
        fsync(m.path("d"));
        // Move the Put out of the live log too, as a compaction would, on odd rounds.
        if round % 2 == 1 {
            m.remount();
        }
        fs::rename(m.path("d"), m.path("e")).unwrap();
        fsync(m.path(""));
        fs::remove_file(m.path("e/f")).unwrap();
        fsync(m.path("e"));
        m.kill();
        m.start();
        m.stop();
        let (code, text) = m.check(&[]);
        if text.contains("STALE") {
            stale_runs += 1;
        }
        assert_eq!(code, 0, "round {round}: {text}\n{}", m.log_text());
    }
    assert_eq!(stale_runs, 0);
}
