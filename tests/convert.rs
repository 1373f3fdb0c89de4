//! `tdefs encrypt` / `tdefs decrypt` on real backing directories: kill -9 at random points
//! and at every named fault point, then `tdefs check`, the view through a real mount and
//! the exported tree must match the original data exactly; `tdefs status` shows the
//! conversion's progress.

mod common;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rand::{Rng, SeedableRng};

#[derive(Debug, PartialEq, Clone)]
struct Node {
    kind: char,
    /// File contents or symlink target.
    data: Vec<u8>,
    mode: u32,
    owner: (u32, u32),
    /// Modification time (not compared for directories: see `snapshot`).
    mtime: Option<(i64, i64)>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut names = vec![0u8; 65536];
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    assert!(n >= 0, "llistxattr {}: {}", p.display(), std::io::Error::last_os_error());
    let mut out = Vec::new();
    for name in names[..n as usize].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let cn = CString::new(name).unwrap();
        let mut v = vec![0u8; 65536];
        let m = unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        assert!(m >= 0);
        v.truncate(m as usize);
        out.push((name.to_vec(), v));
    }
    out.sort();
    out
}

/// Everything below `root` (tdefs' own directories excluded) by relative path.
fn snapshot(root: &Path, dir_times: bool) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, d: &Path, dir_times: bool, out: &mut BTreeMap<String, Node>) {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            if rel.starts_with(".tdefs") {
                continue;
            }
            let m = fs::symlink_metadata(&p).unwrap();
            let t = m.file_type();
            let (kind, data) = if t.is_dir() {
                ('d', Vec::new())
            } else if t.is_symlink() {
                ('l', fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec())
            } else if t.is_file() {
                ('f', fs::read(&p).unwrap())
            } else {
                ('p', Vec::new())
            };
            let mtime = (kind != 'd' || dir_times).then(|| (m.mtime(), m.mtime_nsec()));
            let node = Node { kind, data, mode: m.mode(), owner: (m.uid(), m.gid()), mtime, xattrs: if kind == 'l' { vec![] } else { xattrs(&p) } };
            out.insert(rel, node);
            if kind == 'd' {
                walk(root, &p, dir_times, out);
            }
        }
    }
    walk(root, root, dir_times, &mut out);
    out
}

const MARK: &[u8] = b"PLAINTEXT-MARKER";

/// A plaintext data directory as it was before tdefs: files of many sizes (empty, under a
/// block, partial last blocks, megabytes), sparse and preallocated files, xattrs, odd
/// modes and owners, old times, a symlink, hard links and a FIFO.
fn populate(dir: &Path, files: usize, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for d in ["db/base/1", "db/base/2", "db/pg_wal", "logs"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let dirs = ["db/base/1", "db/base/2", "db/pg_wal", "logs", ""];
    for i in 0..files {
        let p = dir.join(dirs[i % dirs.len()]).join(format!("f{i}.dat"));
        let size = match i % 6 {
            0 => 0,
            1 => rng.gen_range(1..4096),
            2 => 4096 * rng.gen_range(1..64) + rng.gen_range(1..4096),
            3 => rng.gen_range(1..3 << 20),
            _ => 4096 * rng.gen_range(64..512),
        };
        let mut data = vec![0u8; size];
        rng.fill(&mut data[..]);
        // Runs of zeros: whole zero blocks become holes, partial ones stay data.
        if size > 20000 {
            let z = rng.gen_range(0..size - 9000);
            data[z..z + 9000].fill(0);
        }
        if size >= MARK.len() {
            data[..MARK.len()].copy_from_slice(MARK);
        }
        fs::write(&p, &data).unwrap();
    }
    // Sparse: 64 MiB with a few written pages; preallocated; zeros ending in a partial block.
    let sparse = dir.join("db/base/1/sparse");
    let f = fs::File::create(&sparse).unwrap();
    f.set_len(64 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    for off in [0u64, 8192, 5 << 20, (64 << 20) - 100] {
        f.write_at(MARK, off).unwrap();
    }
    drop(f);
    let pre = dir.join("db/base/2/prealloc");
    let f = fs::File::create(&pre).unwrap();
    assert_eq!(unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 1 << 20) }, 0);
    f.write_at(MARK, 4096).unwrap();
    drop(f);
    fs::write(dir.join("logs/zeros"), vec![0u8; 3 * 4096 + 17]).unwrap();
    let x = dir.join("db/base/1/f0.dat");
    let c = CString::new(x.as_os_str().as_bytes()).unwrap();
    for (n, v) in [("user.origin", "legacy"), ("user.empty", "")] {
        let cn = CString::new(n).unwrap();
        assert_eq!(unsafe { libc::setxattr(c.as_ptr(), cn.as_ptr(), v.as_ptr().cast(), v.len(), 0) }, 0);
    }
    fs::set_permissions(dir.join("db/base/2/f1.dat"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::chown(dir.join("db/base/2/f1.dat"), Some(999), Some(998)).unwrap();
    fs::set_permissions(dir.join("logs/f3.dat"), fs::Permissions::from_mode(0o4755)).unwrap();
    Command::new("touch").args(["-h", "-d", "2001-02-03 04:05:06.789"]).arg(dir.join("db/pg_wal/f2.dat")).status().unwrap();
    std::os::unix::fs::symlink("base/1/f0.dat", dir.join("db/link")).unwrap();
    fs::write(dir.join("logs/linked"), b"PLAINTEXT-MARKER hard-linked").unwrap();
    fs::hard_link(dir.join("logs/linked"), dir.join("db/linked-too")).unwrap();
    let fifo = CString::new(dir.join("db/fifo").as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
}

/// Files of the backing directory that still hold the plaintext marker.
fn plaintext_in(backing: &Path) -> Vec<String> {
    snapshot(backing, false)
        .into_iter()
        .filter(|(_, n)| n.kind == 'f' && n.data.windows(MARK.len()).any(|w| w == MARK))
        .map(|(p, _)| p)
        .collect()
}

fn tdefs(args: &[&str]) -> (i32, String) {
    let out = Command::new(TDEFS).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Through a real mount, every file reads as in `want` (and `tdefs check` is clean).
fn assert_mount_shows(m: &mut Mount, want: &BTreeMap<String, Node>, when: &str) {
    let (code, out) = m.check(&[]);
    assert_eq!(code, 0, "tdefs check after {when}:\n{out}");
    m.start();
    let got = snapshot(&m.mnt, false);
    m.stop();
    for (p, w) in want {
        let g = got.get(p).unwrap_or_else(|| panic!("{p} missing through the mount after {when}"));
        if g != w {
            panic!("{p} differs through the mount after {when}: kind {} vs {}, {} vs {} bytes, first diff at {:?}, mode {:o}/{:o}, mtime {:?}/{:?}, xattrs {:?}/{:?}",
                g.kind, w.kind, g.data.len(), w.data.len(), g.data.iter().zip(&w.data).position(|(a, b)| a != b),
                g.mode, w.mode, g.mtime, w.mtime, g.xattrs, w.xattrs);
        }
    }
    assert_eq!(got.len(), want.len(), "after {when}: {:?}", got.keys().filter(|k| !want.contains_key(*k)).collect::<Vec<_>>());
}

/// Run `args` repeatedly, killing it with SIGKILL after a random delay, until a run
/// finishes by itself. `between` runs after every kill. Returns (kills that hit a running
/// conversion, exit code and output of the run that finished).
fn kill_until_done(args: &[&str], seed: u64, mut between: impl FnMut(usize)) -> (usize, i32, String) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut kills = 0;
    for round in 0..60 {
        let log = std::env::temp_dir().join(format!("tdefs-convert-{}-{round}.log", std::process::id()));
        let mut child = Command::new(TDEFS)
            .args(args)
            .arg("--progress")
            .arg("lines")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // A whole run takes a few hundred milliseconds here; later rounds wait longer, so
        // the run always ends.
        let delay = Duration::from_millis(rng.gen_range(1..30) + 2 * round as u64);
        let deadline = Instant::now() + delay;
        while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(2));
        }
        if let Some(st) = child.try_wait().unwrap() {
            let out = fs::read_to_string(&log).unwrap();
            let _ = fs::remove_file(&log);
            return (kills, st.code().unwrap_or(-1), out);
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = fs::remove_file(&log);
        kills += 1;
        between(kills);
    }
    panic!("{args:?} never finished");
}

#[test]
fn encrypt_and_decrypt_survive_kill_9_at_random_points() {
    let mut m = Mount::prepare("aes256-ctr");
    populate(&m.backing, 40, 7);
    let orig = snapshot(&m.backing, false);
    assert!(plaintext_in(&m.backing).len() > 20);
    let cfg = m.config.to_str().unwrap().to_string();
    let backing = m.backing.to_str().unwrap().to_string();
    // A directory never used with tdefs needs --init, and nothing is changed without it.
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, &backing]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--init"), "{out}");
    assert_eq!(snapshot(&m.backing, false), orig);
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, "--init", &backing, "db/pg_wal/f2.dat"]);
    assert_eq!(code, 0, "{out}");
    assert!(!plaintext_in(&m.backing).contains(&"db/pg_wal/f2.dat".to_string()));

    let mut checked = 0;
    let (kills, code, out) = kill_until_done(&["encrypt", "--config", &cfg, &backing], 11, |k| {
        // Every few kills: the dictionary is consistent and every file reads as before.
        if k % 3 == 1 {
            assert_mount_shows(&mut m, &orig, &format!("kill {k} of encrypt"));
            checked += 1;
        }
    });
    eprintln!("encrypt: {kills} kills, {checked} checked through a mount");
    assert!(kills >= 3, "only {kills} kills hit a running encrypt: the test proves nothing");
    assert!(checked >= 1);
    // Hard-linked files are skipped, and say so; that makes the exit status 1.
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("skipped /db/linked-too: has 2 hard links") && out.contains("skipped /logs/linked"), "{out}");
    assert!(out.contains("tdefs encrypt: 100.0%"), "no final progress line: {out}");
    let left = plaintext_in(&m.backing);
    assert_eq!(left, vec!["db/linked-too".to_string(), "logs/linked".to_string()], "plaintext left in the backing directory");
    assert_mount_shows(&mut m, &orig, "the finished encrypt");
    // Sparse files stayed sparse (64 MiB with four written pages).
    let sparse = fs::metadata(m.bpath("db/base/1/sparse")).unwrap();
    assert!(sparse.blocks() * 512 < 1 << 20, "sparse file now uses {} bytes", sparse.blocks() * 512);
    let (_, st) = tdefs(&["status", "--json", "--config", &cfg]);
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert_eq!(st["plaintext_files"], 2, "{st}");
    assert!(st["conversion"].is_null(), "{st}");
    assert!(!m.bpath(".tdefs.convert").exists());
    // A second run has nothing left to do.
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, &backing, "db/base"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("encrypted 0 files"), "{out}");

    // Export: killed at random points too, then identical to the original, hard links
    // included; directories keep their times.
    let to = m.dir.path().join("export");
    let to_s = to.to_str().unwrap().to_string();
    let (kills, code, out) = kill_until_done(&["decrypt", "--config", &cfg, &backing, "--to", &to_s], 13, |_| {});
    assert_eq!(code, 0, "{out}");
    eprintln!("decrypt: {kills} kills");
    assert!(kills >= 2, "only {kills} kills hit a running decrypt");
    let exported = snapshot(&to, true);
    let backing_now = snapshot(&m.backing, true);
    for (p, w) in &orig {
        let g = exported.get(p).unwrap_or_else(|| panic!("{p} not exported"));
        assert_eq!(g.data, w.data, "{p}: contents");
        assert_eq!((g.kind, g.mode, g.owner, &g.xattrs), (w.kind, w.mode, w.owner, &w.xattrs), "{p}: attributes");
        let want_mtime = if w.kind == 'd' { backing_now[p].mtime } else { w.mtime };
        assert_eq!(g.mtime, want_mtime, "{p}: modification time");
    }
    assert_eq!(exported.len(), orig.len());
    let (a, b) = (fs::metadata(to.join("logs/linked")).unwrap(), fs::metadata(to.join("db/linked-too")).unwrap());
    assert_eq!(a.ino(), b.ino(), "hard links exported as one file");
    assert!(fs::metadata(to.join("db/base/1/sparse")).unwrap().blocks() * 512 < 1 << 20, "the export is sparse");
    // No partial files left behind; a rerun exports nothing again.
    assert!(!snapshot(&to, false).keys().any(|k| k.contains("tdefs-partial")));
    let (code, out) = tdefs(&["decrypt", "--config", &cfg, &backing, "--to", &to_s]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("decrypted 0 files"), "{out}");
    // A run stopped between creating a FIFO or symlink and setting its attributes: the
    // next run sets them (it used to count the file as done and keep the wrong time).
    for p in ["db/fifo", "db/link"] {
        let out = Command::new("touch").args(["-h", "-d", "2001-02-03 04:05:06"]).arg(to.join(p)).output().unwrap();
        assert!(out.status.success());
    }
    fs::set_permissions(to.join("db/fifo"), fs::Permissions::from_mode(0o666)).unwrap();
    let (code, out) = tdefs(&["decrypt", "--config", &cfg, &backing, "--to", &to_s, "db"]);
    assert_eq!(code, 0, "{out}");
    let again = snapshot(&to, true);
    for p in ["db/fifo", "db/link"] {
        assert_eq!((again[p].mtime, again[p].mode), (orig[p].mtime, orig[p].mode), "{p}: attributes after a resumed export");
    }
    // Exporting over different data is refused per file.
    fs::write(to.join("logs/zeros"), b"something else").unwrap();
    let (code, out) = tdefs(&["decrypt", "--config", &cfg, &backing, "--to", &to_s, "logs"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("already exists and differs"), "{out}");
    assert_eq!(fs::read(to.join("logs/zeros")).unwrap(), b"something else");
}

#[test]
fn every_crash_point_of_encrypt_leaves_files_old_or_new() {
    for point in ["convert:after-put", "convert:after-copy", "convert:after-intent", "convert:after-rename"] {
        let mut m = Mount::prepare("sm4-ctr");
        populate(&m.backing, 6, 3);
        fs::remove_file(m.bpath("db/linked-too")).unwrap();
        let orig = snapshot(&m.backing, false);
        let cfg = m.config.to_str().unwrap().to_string();
        let backing = m.backing.to_str().unwrap().to_string();
        let out = Command::new(TDEFS).args(["encrypt", "--init", "--config", &cfg, &backing]).env("TDEFS_FAULT", point).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(&format!("crashing at {point}")), "{point}: {err}");
        let (code, text) = m.check(&[]);
        assert_eq!(code, 0, "{point}: {text}");
        if point != "convert:after-rename" {
            assert!(text.contains("interrupted encrypt:    1 staged copies"), "{point}: {text}");
        }
        // Status reads the interrupted run's progress and says what to do.
        let (_, st) = tdefs(&["status", "--config", &cfg]);
        assert!(st.contains("interrupted") && st.contains("run `tdefs encrypt` again"), "{point}: {st}");
        assert_mount_shows(&mut m, &orig, point);
        assert!(!m.bpath(".tdefs.convert").exists(), "{point}: the mount left the staging directory");
        let (code, out) = tdefs(&["encrypt", "--config", &cfg, &backing]);
        assert_eq!(code, 0, "{point}: {out}");
        assert!(plaintext_in(&m.backing).is_empty(), "{point}: {:?}", plaintext_in(&m.backing));
        assert_mount_shows(&mut m, &orig, &format!("{point} and a second run"));
    }
}

#[test]
fn status_shows_progress_of_a_running_encrypt() {
    let mut m = Mount::prepare("aes128-ctr");
    populate(&m.backing, 30, 5);
    let orig = snapshot(&m.backing, false);
    let cfg = m.config.to_str().unwrap().to_string();
    let backing = m.backing.to_str().unwrap().to_string();
    let mut child = Command::new(TDEFS)
        .args(["encrypt", "--init", "--progress", "none", "--config", &cfg, &backing])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let progress = m.bpath(".tdefs.convert/progress.json");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !progress.exists() {
        assert!(Instant::now() < deadline && child.try_wait().unwrap().is_none(), "no progress file appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Freeze it mid-run: it holds the lock, so status reads its progress file.
    unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) };
    let (code, json) = tdefs(&["status", "--json", "--config", &cfg]);
    assert_eq!(code, 0, "{json}");
    let st: serde_json::Value = serde_json::from_str(&json).unwrap();
    let c = &st["conversion"];
    assert_eq!((c["operation"].as_str(), c["state"].as_str(), c["pid"].as_u64()), (Some("encrypt"), Some("running"), Some(child.id() as u64)), "{st}");
    assert_eq!(c["files_total"], 33, "{st}");
    let pct = c["percent_complete"].as_f64().unwrap();
    assert!((0.0..100.0).contains(&pct), "{st}");
    assert!(c["bytes_total"].as_u64().unwrap() > 20 << 20);
    let (_, human) = tdefs(&["status", "--config", &cfg]);
    assert!(human.contains("tdefs encrypt (pid") && human.contains("% complete"), "{human}");
    // Killed while frozen: interrupted, the data as it was.
    child.kill().unwrap();
    child.wait().unwrap();
    let (_, human) = tdefs(&["status", "--config", &cfg]);
    assert!(human.contains("interrupted"), "{human}");
    assert_mount_shows(&mut m, &orig, "a kill while status was read");
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, &backing]);
    assert_eq!(code, 1, "{out}"); // the hard-linked pair
    let (_, json) = tdefs(&["status", "--json", "--config", &cfg]);
    let st: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(st["conversion"].is_null(), "{st}");
    assert_eq!(st["plaintext_files"], 2, "{st}");
    assert_eq!(st["files_by_method"]["aes128-ctr"], 33, "{st}");
}

#[test]
fn encrypt_refuses_a_mounted_directory_and_a_plaintext_method() {
    let mut m = Mount::prepare("aes256-ctr");
    populate(&m.backing, 6, 1);
    let cfg = m.config.to_str().unwrap().to_string();
    let backing = m.backing.to_str().unwrap().to_string();
    m.start_with(&["--init"]);
    let before = snapshot(&m.backing, true);
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, &backing]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&format!("is mounted at {} by tdefs mount", m.mnt.display())), "{out}");
    assert_eq!(snapshot(&m.backing, true), before);
    m.stop();
    m.set_method("plaintext");
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, &backing]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("data-encryption-method is plaintext"), "{out}");
    let (code, out) = tdefs(&["decrypt", "--config", &cfg, &backing, "--to", &format!("{backing}/db/out/x")]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("overlaps the backing directory"), "{out}");
    assert!(!m.bpath("db/out").exists());
}

#[test]
fn a_crash_before_an_exported_file_is_renamed_leaves_it_absent_then_resumes() {
    let m = Mount::prepare("aes256-ctr");
    populate(&m.backing, 6, 9);
    let orig = snapshot(&m.backing, false);
    let cfg = m.config.to_str().unwrap().to_string();
    let backing = m.backing.to_str().unwrap().to_string();
    let (code, out) = tdefs(&["encrypt", "--init", "--config", &cfg, &backing, "db"]);
    assert_eq!(code, 1, "{out}"); // db/linked-too is hard-linked
    let to = m.dir.path().join("plain");
    let out = Command::new(TDEFS)
        .args(["decrypt", "--config", &cfg, &backing, "--to", to.to_str().unwrap()])
        .env("TDEFS_FAULT", "decrypt:before-rename")
        .output()
        .unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("crashing at decrypt:before-rename"));
    // The first file with bytes is complete under its temporary name only.
    let exported = snapshot(&to, false);
    assert!(exported.keys().any(|k| k.ends_with(".tdefs-partial")), "{:?}", exported.keys());
    assert!(!exported.values().any(|n| n.kind == 'f' && !n.data.is_empty()), "a file with bytes appeared before its rename");
    let (code, out) = tdefs(&["decrypt", "--config", &cfg, &backing, "--to", to.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    let exported = snapshot(&to, false);
    assert!(!exported.keys().any(|k| k.contains("tdefs-partial")), "{:?}", exported.keys());
    for (p, w) in &orig {
        assert_eq!(exported.get(p).map(|n| &n.data), Some(&w.data), "{p}");
    }
}

/// `--reencrypt aes256-ctr` moves CTR files to XTS (killed at random points), leaves files of
/// other methods alone, and a second run has nothing left to do.
#[test]
fn reencrypt_moves_ctr_files_to_xts_through_kill_9() {
    let mut m = Mount::prepare("aes256-ctr");
    populate(&m.backing, 30, 21);
    fs::remove_file(m.bpath("db/linked-too")).unwrap();
    let orig = snapshot(&m.backing, false);
    let cfg = m.config.to_str().unwrap().to_string();
    let backing = m.backing.to_str().unwrap().to_string();
    // The logs are encrypted with sm4-ctr: --reencrypt aes256-ctr must not touch them.
    m.set_method("sm4-ctr");
    let (code, out) = tdefs(&["encrypt", "--init", "--config", &cfg, &backing, "logs"]);
    assert_eq!(code, 0, "{out}");
    m.set_method("aes256-ctr");
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, &backing]);
    assert_eq!(code, 0, "{out}");
    assert!(plaintext_in(&m.backing).is_empty(), "{:?}", plaintext_in(&m.backing));
    let logs_before = snapshot(&m.backing.join("logs"), false);
    let methods = |m: &Mount| -> BTreeMap<String, String> {
        let out = Command::new(TDEFS).args(["dump", "files", "--json", "--config", m.config.to_str().unwrap()]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap().lines().map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["path"].as_str().unwrap().to_string(), v["method"].as_str().unwrap().to_string())
        }).collect()
    };
    let before = methods(&m);
    assert!(before.iter().any(|(k, v)| k.starts_with("/db/") && v == "aes256-ctr"), "{before:?}");
    assert!(before.iter().any(|(k, v)| k.starts_with("/logs/") && v == "sm4-ctr"), "{before:?}");

    m.set_method("aes256-xts");
    let (kills, code, out) = kill_until_done(&["encrypt", "--config", &cfg, "--reencrypt", "aes256-ctr", &backing], 23, |k| {
        if k % 3 == 1 {
            assert_mount_shows(&mut m, &orig, &format!("kill {k} of encrypt --reencrypt"));
        }
    });
    eprintln!("reencrypt: {kills} kills");
    assert!(kills >= 3, "only {kills} kills hit a running re-encryption: the test proves nothing");
    assert_eq!(code, 0, "{out}");
    let after = methods(&m);
    for (path, method) in &after {
        let want = if path.starts_with("/logs/") { "sm4-ctr" } else if before[path] == "aes256-ctr" { "aes256-xts" } else { before[path].as_str() };
        assert_eq!(method, want, "{path}: was {}", before[path]);
    }
    assert_eq!(after.len(), before.len());
    // The sm4-ctr files were not rewritten at all.
    assert_eq!(snapshot(&m.backing.join("logs"), false), logs_before);
    assert!(plaintext_in(&m.backing).is_empty());
    assert_mount_shows(&mut m, &orig, "the finished re-encryption");
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, "--reencrypt", "aes256-ctr", &backing]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("encrypted 0 files"), "{out}");
    // `all` then takes the sm4-ctr files too.
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, "--reencrypt", "all", &backing]);
    assert_eq!(code, 0, "{out}");
    assert!(methods(&m).values().all(|v| v == "aes256-xts" || v == "plaintext"), "{:?}", methods(&m));
    assert_mount_shows(&mut m, &orig, "re-encrypting all");
    // An unknown method is a usage error that changes nothing.
    let (code, out) = tdefs(&["encrypt", "--config", &cfg, "--reencrypt", "aes512-ctr", &backing]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("aes512-ctr"), "{out}");
}
