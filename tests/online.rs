//! Online conversion (issue 18): `tdefs convert` on a live mount while files are written,
//! renamed, truncated, linked and removed; kill -9 and crashes at every step of a chunk;
//! pause, resume, cancel, remount; the throttle; re-keying of files under old data keys.

mod common;

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const MARK: &[u8] = b"PLAINTEXT-MARKER-";
const PAGE: usize = 8192;

/// A write the kill cut short: file, offset, the bytes.
type Uncertain = Vec<(String, usize, Vec<u8>)>;

fn tdefs(args: &[&str]) -> (bool, String) {
    let out = Command::new(TDEFS).args(args).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn convert(m: &Mount, action: &str, extra: &[&str]) -> String {
    let mnt = m.mnt.to_str().unwrap();
    let mut args = vec!["convert", action, mnt];
    args.extend_from_slice(extra);
    let (ok, text) = tdefs(&args);
    assert!(ok, "tdefs convert {action} {extra:?}: {text}\n{}", m.log_text());
    text
}

/// The `conversion` object of `tdefs status --json` (null without a job).
fn progress(m: &Mount) -> serde_json::Value {
    let (ok, text) = tdefs(&["convert", "status", m.mnt.to_str().unwrap(), "--json"]);
    assert!(ok, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn wait_done(m: &Mount, within: Duration) {
    let t = Instant::now();
    while !progress(m).is_null() {
        assert!(t.elapsed() < within, "conversion not done after {within:?}: {}\n{}", progress(m), m.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < within, "{what}: not after {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Plaintext contents with a marker every 64 bytes, so any plaintext left on disk is found.
fn marked(len: usize, seed: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(MARK);
        v.extend(std::iter::repeat_n(seed, 64 - MARK.len()));
    }
    v.truncate(len);
    v
}

/// Files in the backing directory that still hold a marker (plaintext on disk).
fn files_with_plaintext(backing: &Path) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![backing.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(".tdefs")) {
                continue;
            }
            let md = fs::symlink_metadata(&p).unwrap();
            if md.is_dir() {
                stack.push(p);
            } else if md.is_file() && fs::read(&p).unwrap().windows(MARK.len()).any(|w| w == MARK) {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

/// A backing directory of plaintext files (a database from before tdefs), adopted by a
/// mount with `--init` under `method`.
fn adopted(method: &str, files: &[(&str, usize)]) -> (Mount, HashMap<String, Vec<u8>>) {
    let mut m = Mount::prepare(method);
    let mut model = HashMap::new();
    for (i, (name, len)) in files.iter().enumerate() {
        let p = m.bpath(name);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        let data = marked(*len, b'a' + i as u8);
        fs::write(&p, &data).unwrap();
        model.insert(name.to_string(), data);
    }
    m.start_with(&["--init"]);
    (m, model)
}

fn check_model(m: &Mount, model: &HashMap<String, Vec<u8>>, when: &str) {
    for (name, want) in model {
        let got = fs::read(m.path(name)).unwrap_or_else(|e| panic!("{when}: read {name}: {e}"));
        assert!(got.len() == want.len(), "{when}: {name} has {} bytes, want {}", got.len(), want.len());
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!("{when}: {name} differs at byte {i} (page {})\n{}", i / PAGE, m.log_text());
        }
    }
}

/// Pages written (and fsynced) by writer threads into the files of `model` while a
/// conversion runs: only fsynced writes enter the model.
struct Writers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<u64>>,
    model: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    /// Writes whose fsync did not return (the daemon was killed): each 4 KiB block of
    /// them may read old or new.
    uncertain: Arc<Mutex<Uncertain>>,
}

impl Writers {
    fn start(m: &Mount, model: &HashMap<String, Vec<u8>>, n: usize) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Mutex::new(model.clone()));
        let uncertain = Arc::new(Mutex::new(Vec::new()));
        let names: Vec<String> = model.keys().cloned().collect();
        let threads = (0..n)
            .map(|t| {
                let (stop, shared, names, mnt) = (stop.clone(), shared.clone(), names.clone(), m.mnt.clone());
                let uncertain = uncertain.clone();
                std::thread::spawn(move || {
                    let mut rng = t as u64 * 7919 + 17;
                    let mut next = || {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng
                    };
                    let mut writes = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let name = &names[next() as usize % names.len()];
                        let len = shared.lock().unwrap()[name].len();
                        if len < PAGE {
                            continue;
                        }
                        let page = next() as usize % (len / PAGE);
                        let data: Vec<u8> = (0..PAGE).map(|i| (next() as u8) ^ i as u8 | 1).collect();
                        let Ok(f) = OpenOptions::new().write(true).open(mnt.join(name)) else { break };
                        // The model lock orders writes to one page with their fsync.
                        let mut g = shared.lock().unwrap();
                        if f.write_all_at(&data, (page * PAGE) as u64).is_err() || f.sync_data().is_err() {
                            uncertain.lock().unwrap().push((name.clone(), page * PAGE, data));
                            break; // the daemon is gone (a kill test)
                        }
                        g.get_mut(name).unwrap()[page * PAGE..(page + 1) * PAGE].copy_from_slice(&data);
                        writes += 1;
                    }
                    writes
                })
            })
            .collect();
        Writers { stop, threads, model: shared, uncertain }
    }

    fn finish(self) -> (HashMap<String, Vec<u8>>, u64) {
        let (model, writes, uncertain) = self.finish_uncertain();
        assert!(uncertain.is_empty(), "writes failed: {:?}", uncertain.iter().map(|u| (&u.0, u.1)).collect::<Vec<_>>());
        (model, writes)
    }

    fn finish_uncertain(self) -> (HashMap<String, Vec<u8>>, u64, Uncertain) {
        self.stop.store(true, Ordering::Relaxed);
        let writes = self.threads.into_iter().map(|t| t.join().unwrap()).sum();
        let uncertain = std::mem::take(&mut *self.uncertain.lock().unwrap());
        (Arc::try_unwrap(self.model).unwrap().into_inner().unwrap(), writes, uncertain)
    }
}

/// The whole flow on a live mount, for each kind of conversion: plaintext files adopted
/// with --init (to XTS and to CTR), files under another method (CTR to XTS, SM4), XTS to
/// another XTS. Pages are written and fsynced all along;
/// at the end every file is under the target method, no plaintext is left on disk, every
/// fsynced page reads back, before and after a remount, and `tdefs check` is clean.
#[test]
fn converts_while_the_database_writes() {
    for (mount_method, target, from_plaintext) in [
        ("aes256-xts", None, true),
        ("aes256-ctr", Some("aes256-xts"), false),
        ("sm4-ctr", Some("sm4-xts"), false),
        ("sm4-xts", Some("aes128-xts"), true),
        ("aes256-ctr", None, true),
    ] {
        let files = [("db/base/1", 3 << 20), ("db/base/2", 2 << 20), ("db/wal", 1 << 20), ("db/odd", 123_457), ("db/empty", 0)];
        let (mut m, mut model) = if from_plaintext {
            adopted(mount_method, &files)
        } else {
            let mut m = Mount::new(mount_method);
            let mut model = HashMap::new();
            for (i, (name, len)) in files.iter().enumerate() {
                fs::create_dir_all(m.path(name).parent().unwrap()).unwrap();
                let data = marked(*len, b'k' + i as u8);
                fs::write(m.path(name), &data).unwrap();
                model.insert(name.to_string(), data);
            }
            m.remount();
            (m, model)
        };
        let when = format!("{mount_method} -> {target:?}");
        let w = Writers::start(&m, &model, 3);
        std::thread::sleep(Duration::from_millis(200));
        let mut args = vec!["--rate", "8M"];
        if let Some(t) = target {
            args.extend(["--method", t]);
        }
        convert(&m, "start", &args);
        wait_done(&m, Duration::from_secs(60));
        let (m2, writes) = w.finish();
        model = m2;
        assert!(writes > 20, "{when}: only {writes} writes during the conversion");
        check_model(&m, &model, &when);
        let (ok, st) = tdefs(&["status", "--json", m.mnt.to_str().unwrap()]);
        assert!(ok, "{st}");
        let st: serde_json::Value = serde_json::from_str(&st).unwrap();
        let want = target.unwrap_or(mount_method);
        assert_eq!(st["files_by_method"], serde_json::json!({ want: files.len() }), "{when}: {st}");
        m.remount();
        check_model(&m, &model, &format!("{when}, after a remount"));
        m.stop();
        assert_eq!(files_with_plaintext(&m.backing), Vec::<String>::new(), "{when}: plaintext left on disk");
        let (code, text) = m.check(&[]);
        assert_eq!(code, 0, "{when}: {text}");
    }
}

/// Renames, truncations, extensions, hole punching, hard links and unlinks while the files
/// are in conversion: every name reads what was written, and ends under the target.
#[test]
fn namespace_changes_during_conversion() {
    let files = [("a", 6 << 20), ("b", 6 << 20), ("c", 6 << 20), ("d", 6 << 20), ("e", 6 << 20), ("f", 6 << 20)];
    let (mut m, mut model) = adopted("aes256-xts", &files);
    convert(&m, "start", &["--rate", "12M"]);
    let in_conversion = |m: &Mount, name: &str| progress(m)["current_file"] == format!("/{name}");
    // Each change hits the file while it is the one being converted.
    wait_until("a in conversion", Duration::from_secs(20), || in_conversion(&m, "a"));
    fs::rename(m.path("a"), m.path("a-renamed")).unwrap();
    let a = model.remove("a").unwrap();
    model.insert("a-renamed".into(), a);
    wait_until("b in conversion", Duration::from_secs(20), || in_conversion(&m, "b"));
    let f = OpenOptions::new().write(true).open(m.path("b")).unwrap();
    f.set_len(1_000_001).unwrap(); // below the watermark or not: either way
    model.get_mut("b").unwrap().truncate(1_000_001);
    f.write_all_at(b"tail after truncate", 5 << 20).unwrap(); // extends, with a gap
    let b = model.get_mut("b").unwrap();
    b.resize(5 << 20, 0);
    b.extend_from_slice(b"tail after truncate");
    drop(f);
    wait_until("c in conversion", Duration::from_secs(20), || in_conversion(&m, "c"));
    let st = Command::new("fallocate").args(["-p", "-o", "1048576", "-l", "3145728"]).arg(m.path("c")).status().unwrap();
    assert!(st.success());
    model.get_mut("c").unwrap()[1 << 20..4 << 20].fill(0);
    wait_until("d in conversion", Duration::from_secs(20), || in_conversion(&m, "d"));
    fs::hard_link(m.path("d"), m.path("d-link")).unwrap();
    let d = model["d"].clone();
    model.insert("d-link".into(), d);
    wait_until("e in conversion", Duration::from_secs(20), || in_conversion(&m, "e"));
    fs::remove_file(m.path("e")).unwrap();
    model.remove("e");
    // f: emptied (re-keyed to the mount's method) and rewritten during its conversion.
    wait_until("f in conversion", Duration::from_secs(20), || in_conversion(&m, "f"));
    fs::write(m.path("f"), b"rewritten").unwrap();
    model.insert("f".into(), b"rewritten".to_vec());
    wait_done(&m, Duration::from_secs(60));
    check_model(&m, &model, "after the conversion");
    // A link made during the conversion is the same file, under the new entry too.
    OpenOptions::new().write(true).open(m.path("d-link")).unwrap().write_all_at(b"via the link", 0).unwrap();
    for n in ["d", "d-link"] {
        model.get_mut(n).unwrap()[..12].copy_from_slice(b"via the link");
    }
    m.remount();
    check_model(&m, &model, "after a remount");
    assert_eq!(fs::metadata(m.path("d")).unwrap().len(), 6 << 20);
    m.stop();
    assert_eq!(files_with_plaintext(&m.backing), Vec::<String>::new());
    let (code, text) = m.check(&[]);
    assert_eq!(code, 0, "{text}");
    // The punched range is still a hole on disk (the converter writes no zeros there).
    let blocks = fs::metadata(m.bpath("c")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(blocks.blocks() * 512 <= (3 << 20) + (64 << 10), "c allocates {} bytes", blocks.blocks() * 512);
}

/// kill -9 of the daemon at random moments during a conversion under load: after each
/// remount the conversion resumes, and every page whose fsync returned reads back.
#[test]
fn kill_nine_during_conversion_loses_nothing() {
    let files = [("t/1", 8 << 20), ("t/2", 8 << 20), ("t/3", 4 << 20)];
    let (mut m, mut model) = adopted("aes256-xts", &files);
    convert(&m, "start", &["--rate", "3M"]);
    for round in 0..4u64 {
        let w = Writers::start(&m, &model, 2);
        std::thread::sleep(Duration::from_millis(300 + round * 277));
        m.kill();
        let (m2, _, uncertain) = w.finish_uncertain();
        model = m2;
        m.start();
        // A write cut by the kill may have reached the disk in part: each of its blocks
        // reads old or new; the model takes what is there for them.
        for (name, off, data) in uncertain {
            let got = fs::read(m.path(&name)).unwrap();
            let cur = model.get_mut(&name).unwrap();
            for b in (0..data.len()).step_by(4096) {
                let (g, old, new) = (&got[off + b..off + b + 4096], &cur[off + b..off + b + 4096], &data[b..b + 4096]);
                assert!(g == old || g == new, "round {round}: {name} block at {} is neither old nor new", off + b);
                let g = g.to_vec();
                cur[off + b..off + b + 4096].copy_from_slice(&g);
            }
        }
        check_model(&m, &model, &format!("after kill {round}"));
        assert!(!progress(&m).is_null(), "round {round}: the job ended early: {}", m.log_text());
    }
    wait_done(&m, Duration::from_secs(60));
    check_model(&m, &model, "after the conversion");
    m.stop();
    assert_eq!(files_with_plaintext(&m.backing), Vec::<String>::new());
}

/// A crash at each step of a chunk (before the journal write, after it, mid-rewrite, after
/// the rewrite, after its fsync, after the watermark moved), on its own and followed by a
/// power cut that loses everything not fsynced: the remount restores or keeps the chunk,
/// the conversion completes, and every byte reads as written.
#[test]
fn crash_and_power_cut_at_every_step_of_a_chunk() {
    for point in ["convert:before-journal", "convert:journaled", "convert:half-written", "convert:overwritten", "convert:synced", "convert:marked"] {
        for cut in [false, true] {
            let mut c = CutMount::prepare("aes256-xts");
            let data = marked(3 << 20, b'q');
            // Adopted as plaintext, made durable in the lower directory before the mount.
            fs::write(c.m.bpath("f"), &data).unwrap();
            File::open(c.m.bpath("f")).unwrap().sync_all().unwrap();
            File::open(&c.m.backing).unwrap().sync_all().unwrap();
            c.m.start_with(&["--init"]);
            // Written through the mount and fsynced: must survive anything.
            let f = OpenOptions::new().write(true).open(c.m.path("f")).unwrap();
            f.write_all_at(b"fsynced before", (2 << 20) + 5).unwrap();
            f.sync_all().unwrap();
            drop(f);
            let mut want = data.clone();
            want[(2 << 20) + 5..(2 << 20) + 19].copy_from_slice(b"fsynced before");
            c.m.stop();
            c.pc.sync();
            // The crashing mount: the second chunk crashes at `point`.
            c.m.env = vec![("TDEFS_FAULT".into(), point.into()), ("TDEFS_FAULT_AFTER".into(), "1".into())];
            c.m.start();
            let mnt = c.m.mnt.to_str().unwrap().to_string();
            let _ = tdefs(&["convert", "start", &mnt]);
            wait_until(&format!("{point}: the crash"), Duration::from_secs(30), || {
                c.m.log_text().contains(&format!("crashing at {point}"))
            });
            if cut {
                c.power_cut();
            } else {
                c.m.kill();
            }
            c.m.env.clear();
            c.m.start();
            let when = format!("{point}{}", if cut { " + power cut" } else { "" });
            assert_eq!(fs::read(c.m.path("f")).unwrap(), want, "{when}\n{}", c.m.log_text());
            // Between a durable journal record and the watermark's advance, the chunk is
            // put back; before and after, there is nothing to put back.
            let restores = matches!(point, "convert:journaled" | "convert:half-written" | "convert:overwritten" | "convert:synced");
            assert_eq!(c.m.log_text().contains("put back the chunk"), restores, "{when}\n{}", c.m.log_text());
            wait_done(&c.m, Duration::from_secs(30));
            assert_eq!(fs::read(c.m.path("f")).unwrap(), want, "{when}: after the conversion");
            c.m.stop();
            assert_eq!(files_with_plaintext(&c.m.backing), Vec::<String>::new(), "{when}");
        }
    }
}

/// Pause stops the progress, resume continues it, an unmount keeps the job and the
/// remount continues it, and cancel finishes the file in progress and nothing more.
#[test]
fn pause_resume_remount_and_cancel() {
    let files = [("p/1", 4 << 20), ("p/2", 4 << 20), ("p/3", 4 << 20), ("p/4", 4 << 20)];
    let (mut m, model) = adopted("aes256-xts", &files);
    convert(&m, "start", &["--rate", "4M"]);
    wait_until("some progress", Duration::from_secs(20), || progress(&m)["bytes_done"].as_u64() > Some(0));
    convert(&m, "pause", &[]);
    let p = progress(&m);
    assert_eq!(p["state"], "paused", "{p}");
    std::thread::sleep(Duration::from_millis(1500));
    let done = progress(&m)["bytes_done"].clone();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(progress(&m)["bytes_done"], done, "progress while paused");
    check_model(&m, &model, "paused");
    // Unmounted with a file in conversion: offline tools refuse it (two ciphers in one
    // file), and say how to finish it.
    m.stop();
    let to = m.dir.path().join("export");
    let (ok, text) = tdefs(&["decrypt", "--config", m.config.to_str().unwrap(), m.backing.to_str().unwrap(), "--to", to.to_str().unwrap()]);
    assert!(!ok && text.contains("online conversion"), "{text}");
    assert!(!to.join("p").exists(), "{text}");
    let (ok, text) = tdefs(&["status", "--config", m.config.to_str().unwrap(), "--json", m.backing.to_str().unwrap()]);
    assert!(ok, "{text}");
    let st: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(st["conversion"]["state"], "paused", "offline status: {st}");
    assert_eq!(st["conversion"]["target_method"], "aes256-xts", "offline status: {st}");
    // Paused across a remount: still paused, then resumed.
    m.start();
    assert_eq!(progress(&m)["state"], "paused");
    check_model(&m, &model, "paused, remounted");
    convert(&m, "resume", &[]);
    wait_until("running again", Duration::from_secs(10), || progress(&m)["state"] == "running");
    // Unmounted while running: the remount continues the job by itself.
    std::thread::sleep(Duration::from_millis(500));
    m.remount();
    wait_until("continued after the remount", Duration::from_secs(10), || progress(&m)["bytes_done"].as_u64() > Some(0));
    let current = progress(&m)["current_file"].as_str().map(str::to_string);
    let text = convert(&m, "cancel", &[]);
    assert!(text.contains("cancelled"), "{text}");
    wait_done(&m, Duration::from_secs(30));
    check_model(&m, &model, "cancelled");
    m.stop();
    let (code, text) = m.check(&[]);
    assert_eq!(code, 0, "{text}");
    // Files finished: those before the cancel plus the one in progress; the others untouched.
    let plaintext = files_with_plaintext(&m.backing);
    assert!(!plaintext.is_empty(), "cancel converted everything");
    if let Some(cur) = current {
        assert!(!plaintext.iter().any(|p| p.ends_with(&cur)), "{cur} was left half done: {plaintext:?}");
    }
}

/// The rate limit holds: converting 24 MB at 8 MB/s takes 3 s, within 10 %, for one big
/// file and for many files of less than a chunk each (each of which is paid for too).
#[test]
fn the_rate_limit_holds_within_ten_percent() {
    let names: Vec<String> = (0..60).map(|i| format!("small/{i}")).collect();
    let mut files: Vec<(&str, usize)> = names.iter().map(|n| (n.as_str(), 200_000)).collect();
    files.push(("big", 12_000_000));
    let (m, model) = adopted("aes256-xts", &files);
    let t = Instant::now();
    convert(&m, "start", &["--rate", "8M"]);
    wait_done(&m, Duration::from_secs(60));
    let rate = 24_000_000.0 / t.elapsed().as_secs_f64();
    assert!((7_200_000.0..=8_800_000.0).contains(&rate), "converted at {rate:.0} bytes/s with an 8 MB/s limit");
    check_model(&m, &model, "after the conversion");
}

/// --rekey-older-than moves every file off data keys older than the age, and the old keys
/// are deleted once no file uses them.
#[test]
fn rekey_older_than_retires_old_keys() {
    let mut m = Mount::prepare("aes256-xts");
    m.set_encryption_extra("aes256-xts", "data-key-rotation-period = \"2s\"");
    m.start();
    let mut model = HashMap::new();
    for (i, n) in ["k1", "k2", "k3"].iter().enumerate() {
        let data = marked(300_000 + i, b'r');
        fs::write(m.path(n), &data).unwrap();
        model.insert(n.to_string(), data);
        std::thread::sleep(Duration::from_millis(1100)); // a key each, more or less
    }
    std::thread::sleep(Duration::from_secs(3));
    let keys = |m: &Mount| {
        let (ok, st) = tdefs(&["status", "--json", m.mnt.to_str().unwrap()]);
        assert!(ok, "{st}");
        serde_json::from_str::<serde_json::Value>(&st).unwrap()["data_keys"].as_u64().unwrap()
    };
    assert!(keys(&m) >= 2, "the files should span several data keys");
    convert(&m, "start", &["--rekey-older-than", "2s"]);
    wait_done(&m, Duration::from_secs(30));
    check_model(&m, &model, "re-keyed");
    assert_eq!(keys(&m), 1, "old data keys were not deleted:\n{}", m.log_text());
    m.remount();
    check_model(&m, &model, "re-keyed, remounted");
}

/// Refusals: a second job, an unknown method, and controls without a job, each with a
/// clear message and nothing changed.
#[test]
fn refusals_are_clear() {
    let (m, model) = adopted("aes256-xts", &[("x", 4 << 20)]);
    let mnt = m.mnt.to_str().unwrap();
    let (ok, text) = tdefs(&["convert", "pause", mnt]);
    assert!(!ok && text.contains("no online conversion job"), "{text}");
    let (ok, text) = tdefs(&["convert", "start", mnt, "--method", "rot13"]);
    assert!(!ok && text.contains("rot13"), "{text}");
    convert(&m, "start", &["--rate", "1M"]);
    let (ok, text) = tdefs(&["convert", "start", mnt]);
    assert!(!ok && text.contains("already running"), "{text}");
    convert(&m, "cancel", &[]);
    wait_done(&m, Duration::from_secs(30));
    check_model(&m, &model, "cancelled");
}

fn drop_caches() {
    Command::new("sync").status().unwrap();
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// A file converted online keeps its size, owner, mode, times and xattrs, as the mount
/// shows them (remounted, so they come from the backing file), and its holes.
#[test]
fn metadata_is_kept() {
    use std::os::unix::fs::MetadataExt;
    let (mut m, model) = adopted("aes256-xts", &[("k/f", 5 << 20), ("k/g", 100_000)]);
    let f = m.path("k/f");
    OpenOptions::new().write(true).open(&f).unwrap().set_len(9 << 20).unwrap(); // a hole at the end
    let st = Command::new("setfattr").args(["-n", "user.note", "-v", "kept"]).arg(&f).status().unwrap();
    assert!(st.success());
    std::os::unix::fs::chown(&f, Some(4242), Some(4343)).unwrap();
    fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    m.remount();
    std::thread::sleep(Duration::from_millis(1100)); // so a changed time could not look the same
    let shown = || {
        let md = fs::metadata(&f).unwrap();
        let x = Command::new("getfattr").args(["--only-values", "-n", "user.note"]).arg(&f).output().unwrap();
        (md.len(), md.uid(), md.gid(), md.mode(), md.mtime(), md.mtime_nsec(), md.ctime(), md.ctime_nsec(), x.stdout)
    };
    let before = shown();
    let allocated = fs::metadata(m.bpath("k/f")).unwrap().blocks();
    // The kernel forgets the file (else it shows the times it keeps itself): what the
    // mount shows next comes from the backing file, as the converter left it.
    drop_caches();
    convert(&m, "start", &[]);
    wait_done(&m, Duration::from_secs(30));
    drop_caches();
    wait_done(&m, Duration::from_secs(30));
    assert_eq!(shown(), before, "seen through the mount right after the conversion");
    m.remount();
    assert_eq!(shown(), before, "after a remount");
    assert!(fs::metadata(m.bpath("k/f")).unwrap().blocks() <= allocated, "the hole was filled");
    let mut want = model["k/f"].clone();
    want.resize(9 << 20, 0);
    assert_eq!(fs::read(&f).unwrap(), want);
    m.stop();
    assert_eq!(files_with_plaintext(&m.backing), Vec::<String>::new());
}
