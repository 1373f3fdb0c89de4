//! The test harness must be able to fail (issue 21): the plaintext scan (`tdefs-scan`) and
//! the suite runner (`scripts/check`) are run on deliberately broken cases, and each must
//! be caught — a marker written behind tdefs' back, a scan of nothing, a plaintext record
//! where none is expected, a daemon that died or panicked, an unclean unmount, unexpected
//! stderr, a failure hidden in a pipeline, a skip that is not allowed, `tdefs check` exit 1.

mod common;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const SCAN: &str = env!("CARGO_BIN_EXE_tdefs-scan");

fn scan(m: &Mount, args: &[&str]) -> (i32, String) {
    let out = Command::new(SCAN).arg("--config").arg(&m.config).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn scan_catches_a_marker_in_a_file_written_behind_tdefs_back() {
    let mut m = Mount::new("aes256-ctr");
    fs::write(m.path("through-tdefs"), "TDEFS-MARKER-good ".repeat(100)).unwrap();
    m.stop();
    let (code, text) = scan(&m, &["--no-plaintext"]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("scanned 1 files") && text.contains(": 0 leaks"), "{text}");

    // A file the mount never saw: no record, plaintext marker inside.
    fs::create_dir(m.bpath("sub")).unwrap();
    fs::write(m.bpath("sub/behind"), "some bytes TDEFS-MARKER-behind more bytes").unwrap();
    let (code, text) = scan(&m, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("LEAK /sub/behind contains \"TDEFS-MARKER-\" (no record)"), "{text}");
    // Without a marker it is still a file nobody vouches for: --no-plaintext fails on it.
    fs::write(m.bpath("sub/behind"), "no marker here").unwrap();
    let (code, text) = scan(&m, &[]);
    assert_eq!(code, 0, "{text}");
    let (code, text) = scan(&m, &["--no-plaintext"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("UNRECORDED /sub/behind") && text.contains("1 non-empty files without a record"), "{text}");
    fs::remove_file(m.bpath("sub/behind")).unwrap();

    // A recorded, encrypted file whose bytes are plaintext (a write that bypassed the cipher).
    let len = fs::metadata(m.bpath("through-tdefs")).unwrap().len() as usize;
    let mut plain = "TDEFS-MARKER-good ".repeat(100).into_bytes();
    plain.truncate(len);
    fs::write(m.bpath("through-tdefs"), plain).unwrap();
    let (code, text) = scan(&m, &[]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("LEAK /through-tdefs contains \"TDEFS-MARKER-\" (aes256-ctr)"), "{text}");
}

#[test]
fn scan_of_nothing_fails_unless_allowed() {
    let mut m = Mount::new("aes256-ctr");
    fs::write(m.path("empty"), "").unwrap();
    m.stop();
    let (code, text) = scan(&m, &[]);
    assert_eq!(code, 2, "{text}");
    assert!(text.contains("scanned no byte") && text.contains("--allow-empty"), "{text}");
    let (code, text) = scan(&m, &["--allow-empty"]);
    assert_eq!(code, 0, "{text}");
}

#[test]
fn scan_lists_adopted_plaintext_and_refuses_it_with_no_plaintext() {
    let mut m = Mount::new("aes256-ctr");
    fs::write(m.path("enc"), "TDEFS-MARKER-enc ".repeat(10)).unwrap();
    m.stop();
    fs::write(m.bpath("adopted"), "TDEFS-MARKER-plain is plaintext on purpose").unwrap();
    let out = Command::new(TDEFS).args(["adopt", "--config"]).arg(&m.config).arg("adopted").output().unwrap();
    assert!(out.status.success(), "{out:?}");
    // Recorded as plaintext: not scanned, listed.
    let (code, text) = scan(&m, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("1 files recorded as plaintext: /adopted"), "{text}");
    let (code, text) = scan(&m, &["--no-plaintext"]);
    assert_eq!(code, 1, "{text}");
    assert!(text.contains("PLAINTEXT /adopted"), "{text}");
}

// ------------------------------------------------------------------ scripts/check

/// A suite of one-line tests run by scripts/check: (name, header lines, body, expected output).
struct Case {
    name: &'static str,
    headers: &'static str,
    body: &'static str,
    out: &'static str,
}

const CLEAN: &str = "m=$(_marker ok); printf '%s\\n' \"$m$m$m\" > \"$TEST_DIR/f\"; echo ok";

fn cases() -> Vec<Case> {
    vec![
        Case { name: "001", headers: "", body: CLEAN, out: "ok" },
        // The daemon dies and nobody notices: the mount is dead at the end.
        Case { name: "002", headers: "", body: "echo x > \"$TEST_DIR/f\"; kill -9 \"$(_tdefs_pid)\"; sleep 0.3; echo ok", out: "ok" },
        // The daemon dies, the test cleans up and remounts as if nothing happened.
        Case {
            name: "003",
            headers: "",
            body: "kill -9 \"$(_tdefs_pid)\"; sleep 0.3; while _is_mounted; do fusermount3 -u -z \"$TEST_DIR\"; done; _mount; echo TDEFS-MARKER-x > \"$TEST_DIR/f\"; echo ok",
            out: "ok",
        },
        // A panic in the daemon's log.
        Case { name: "004", headers: "", body: concat!("echo \"thread 'fuse-3' panicked at src/fs/mod.rs:1:1\" >> \"$SCRATCH/tdefs.log\"; ", "echo TDEFS-MARKER-x > \"$TEST_DIR/f\"; echo ok"), out: "ok" },
        // Unexpected stderr; the same, declared.
        Case { name: "005", headers: "", body: "echo TDEFS-MARKER-x > \"$TEST_DIR/f\"; echo oops >&2; echo ok", out: "ok" },
        Case { name: "006", headers: "# stderr: ^oops$\n", body: "echo TDEFS-MARKER-x > \"$TEST_DIR/f\"; echo oops >&2; echo ok", out: "ok" },
        // A failure inside a pipeline (pipefail).
        Case { name: "007", headers: "", body: "echo TDEFS-MARKER-x > \"$TEST_DIR/f\"; echo ok; false | cat", out: "ok" },
        // Skips: not allowed, allowed (tests/allowed-skips lists 009).
        Case { name: "008", headers: "", body: "_notrun \"something is missing\"", out: "" },
        Case { name: "009", headers: "", body: "_notrun \"something is missing\"", out: "" },
        // A file written behind tdefs' back: tdefs check exits 1 (unrecorded).
        Case { name: "010", headers: "", body: "echo TDEFS-MARKER-x > \"$TEST_DIR/f\"; echo plain > \"$BACKING/behind\"; echo ok", out: "ok" },
        // A file adopted as plaintext in a test that does not say it adopts; the same, said.
        Case {
            name: "011",
            headers: "",
            body: "echo TDEFS-MARKER-x > \"$TEST_DIR/f\"; _unmount; echo plain > \"$BACKING/p\"; \"$TDEFS\" adopt --config \"$TDEFS_CONFIG\" p >/dev/null 2>&1; _mount; echo ok",
            out: "ok",
        },
        Case {
            name: "012",
            headers: "# adopts: yes\n",
            body: "echo TDEFS-MARKER-x > \"$TEST_DIR/f\"; _unmount; echo plain > \"$BACKING/p\"; \"$TDEFS\" adopt --config \"$TDEFS_CONFIG\" p >/dev/null 2>&1; _mount; echo ok",
            out: "ok",
        },
        // Nothing left to scan; the same, declared.
        Case { name: "013", headers: "", body: "echo x > \"$TEST_DIR/f\"; rm \"$TEST_DIR/f\"; echo ok", out: "ok" },
        Case { name: "014", headers: "# files: none\n", body: "echo x > \"$TEST_DIR/f\"; rm \"$TEST_DIR/f\"; echo ok", out: "ok" },
        // A process keeps the mount busy: the clean unmount fails.
        Case {
            name: "015",
            headers: "",
            body: "echo TDEFS-MARKER-x > \"$TEST_DIR/f\"; (cd \"$TEST_DIR\" && exec sleep 60) & echo $! > \"$TMPDIR/busy.pid\"; echo ok",
            out: "ok",
        },
        // A marker in an encrypted file's backing bytes: the scan fails.
        Case { name: "016", headers: "", body: "m=$(_marker leak); echo \"$m\" > \"$TEST_DIR/f\"; _unmount; echo \"$m\" > \"$BACKING/f\"; _mount; echo ok", out: "ok" },
    ]
}

fn write_suite(dir: &Path) {
    let g = dir.join("generic");
    fs::create_dir_all(&g).unwrap();
    for c in cases() {
        let script = format!("#!/usr/bin/env bash\n# groups: selftest\n# harness self-test {}\n{}{}\n", c.name, c.headers, c.body);
        fs::write(g.join(c.name), script).unwrap();
        fs::set_permissions(g.join(c.name), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(g.join(format!("{}.out", c.name)), if c.out.is_empty() { String::new() } else { format!("{}\n", c.out) }).unwrap();
    }
    fs::write(dir.join("allowed-skips"), "# self-test\ngeneric/009  allowed on purpose\n").unwrap();
}

#[test]
fn scripts_check_fails_every_broken_test() {
    check_broken_suite("1");
}

/// The same verdicts with four tests at once (-j 4: workers sharing one queue), and the
/// results table still lists every test once, in order.
#[test]
fn scripts_check_fails_every_broken_test_four_at_once() {
    check_broken_suite("4");
}

fn check_broken_suite(jobs: &str) {
    let tmp = tempfile::Builder::new().prefix("tdefs-harness").tempdir_in("/var/tmp").unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let suite = tmp.path().join("suite");
    write_suite(&suite);
    let work = tmp.path().join("work");
    fs::create_dir(&work).unwrap();
    fs::set_permissions(&work, fs::Permissions::from_mode(0o755)).unwrap();
    let bin: PathBuf = Path::new(TDEFS).parent().unwrap().to_path_buf();
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check"))
        .args(["-g", "selftest", "-j", jobs, "--results"])
        .arg(tmp.path().join("results.md"))
        .env("CHECK_SUITE_DIR", &suite)
        .env("CHECK_BIN_DIR", &bin)
        .env("TMPDIR", &work)
        .output()
        .unwrap();
    if let Ok(pid) = fs::read_to_string(work.join("busy.pid")) {
        let _ = Command::new("kill").arg(pid.trim()).status();
    }
    // Whatever scripts/check left mounted (it must leave nothing).
    let left: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(tmp.path().to_str().unwrap()))
        .collect();
    for m in &left {
        lazy_unmount(Path::new(m));
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(left.is_empty(), "scripts/check left mounts behind: {left:?}\n{text}");
    assert!(!out.status.success(), "{text}");
    let line = |t: &str| text.lines().find(|l| l.starts_with(&format!("generic/{t} "))).unwrap_or_else(|| panic!("no result for {t}:\n{text}")).to_string();
    let expect = [
        ("001", "pass"),
        ("002", "fail (the tdefs daemon (pid"),
        ("003", "fail (tdefs daemon"),
        ("004", "fail (panic in the daemon's log"),
        ("005", "fail (unexpected stderr: oops"),
        ("006", "pass"),
        ("007", "fail (exit status 1"),
        ("008", "fail (skipped, and not in"),
        ("009", "notrun (something is missing) [allowed: allowed on purpose]"),
        ("010", "fail (tdefs check exit 1: UNRECORDED"),
        ("011", "fail (tdefs check counts 1 plaintext files"),
        ("012", "pass"),
        ("013", "fail (plaintext scan: tdefs-scan: scanned no byte"),
        ("014", "pass"),
        ("015", "fail (unclean unmount"),
        ("016", "fail (plaintext scan: LEAK /f"),
    ];
    for (t, want) in expect {
        let l = line(t);
        assert!(l.starts_with(&format!("generic/{t} {want}")), "generic/{t}: want {want:?}, got {l:?}\n{text}");
    }
    assert!(text.contains("allowed skips: generic/009 (allowed on purpose)"), "{text}");
    assert!(text.contains("check: 4 passed, 11 failed, 1 skipped"), "{text}");
    let table = fs::read_to_string(tmp.path().join("results.md")).unwrap();
    let names: Vec<&str> = table.lines().skip(2).filter_map(|l| l.split(" | ").next()).map(|c| c.trim_start_matches("| ")).collect();
    let want: Vec<String> = expect.iter().map(|(t, _)| format!("generic/{t}")).collect();
    assert_eq!(names, want, "{table}");
    for (t, want) in expect {
        let row = table.lines().find(|l| l.starts_with(&format!("| generic/{t} |"))).unwrap();
        assert!(row.contains(&format!("| {}", want.split(" (").next().unwrap())), "generic/{t}: {row}");
    }
}
