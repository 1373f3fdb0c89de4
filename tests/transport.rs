//! The FUSE transport (issue 19): `[mount] io-uring = auto|on|off` and `TDEFS_IO_URING`.
//! Requests must really travel over the rings when io_uring is chosen (the daemon's rings
//! count their completions in /proc/PID/fdinfo), and `on` must refuse a kernel whose
//! `enable_uring` is off before it touches the backing directory.
//!
//! One test: it flips the fuse module's global `enable_uring` parameter (and restores it),
//! which no other test in this binary may see half-way.

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::Mount;

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// Puts `enable_uring` back as it was, also when an assertion fails.
struct Restore(String);

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = fs::write(PARAM, &self.0);
    }
}

fn set_param(on: bool) {
    fs::write(PARAM, if on { "Y" } else { "N" }).expect("set enable_uring (run as root)");
}

/// (io_uring instances, completions they have seen) of process `pid`.
fn rings(pid: u32) -> (usize, u64) {
    let (mut n, mut cq) = (0, 0);
    for e in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let Ok(target) = fs::read_link(e.path()) else { continue };
        if target.to_string_lossy() != "anon_inode:[io_uring]" {
            continue;
        }
        n += 1;
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", e.file_name().to_string_lossy())).unwrap();
        let head = info.lines().find_map(|l| l.strip_prefix("CqHead:")).expect("CqHead in fdinfo");
        cq += head.trim().parse::<u64>().unwrap();
    }
    (n, cq)
}

fn possible_cpus() -> usize {
    let s = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    s.trim().split(',').map(|p| p.rsplit('-').next().unwrap().parse::<usize>().unwrap() + 1).max().unwrap()
}

/// Write, fsync, drop the page cache and read back through the mount: requests of every
/// common kind (CREATE, WRITE, SETATTR, FSYNC, READ, GETATTR, LOOKUP).
fn exercise(m: &Mount) {
    let path = m.path("t/data.bin");
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let block: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut expect = Vec::new();
    let mut f = fs::File::create(&path).unwrap();
    for _ in 0..64 {
        f.write_all(&block).unwrap();
        expect.extend_from_slice(&block);
    }
    for i in 0..32u64 {
        let at = (i * 8192 * 3) as usize;
        f.write_all_at(&[i as u8 + 1; 8192], at as u64).unwrap();
        expect[at..at + 8192].fill(i as u8 + 1);
        f.sync_data().unwrap();
    }
    drop(f);
    fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let back = fs::read(&path).unwrap();
    assert_eq!(back.len(), expect.len());
    if let Some(at) = back.iter().zip(&expect).position(|(a, b)| a != b) {
        panic!("read back differs from what was written at byte {at}");
    }
    assert!(fs::read(m.bpath("t/data.bin")).unwrap() != back, "the backing file holds ciphertext");
}

/// A prepared mount whose daemon gets TDEFS_IO_URING=`env` ("" leaves it to the config,
/// whatever the CI's environment says) and `config` before the [security] tables.
fn prepared(env: &str, config: &str) -> Mount {
    let mut m = Mount::prepare_with("aes256-ctr", config);
    m.env.push(("TDEFS_IO_URING".into(), env.into()));
    m
}

fn transport_logged(m: &Mount) -> String {
    let log = m.log_text();
    let line = log.lines().find(|l| l.contains("mounted")).unwrap_or_else(|| panic!("no mounted line:\n{log}")).to_string();
    line.split("transport=").nth(1).map(|t| t.trim_matches('"').to_string()).unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn io_uring_transport_on_auto_off() {
    let was = fs::read_to_string(PARAM).unwrap_or_else(|e| {
        panic!("{PARAM}: {e}: this kernel has no FUSE over io_uring (Linux 6.14+ with CONFIG_FUSE_IO_URING)")
    });
    let _restore = Restore(was.trim().to_string());
    set_param(true);

    // on: every request but FORGET and INTERRUPT over the rings, one set per possible CPU.
    let mut m = prepared("on", "");
    m.start();
    assert_eq!(transport_logged(&m), "io_uring");
    let (n, before) = rings(m.pid());
    assert!(n >= possible_cpus(), "{n} rings for {} possible CPUs", possible_cpus());
    exercise(&m);
    let (_, after) = rings(m.pid());
    // At least a WRITE and an FSYNC for each of the 32 fdatasyncs came over the rings.
    assert!(after - before >= 64, "only {} ring completions", after - before);
    m.remount();
    assert_eq!(fs::read(m.path("t/data.bin")).unwrap().len(), 64 * 65536, "data across a remount over io_uring");
    m.stop();

    // The config's default, auto, takes io_uring where the kernel offers it.
    let mut m = prepared("", "");
    m.start();
    assert_eq!(transport_logged(&m), "io_uring");
    m.stop();

    // io-uring = "off": /dev/fuse only, no ring at all.
    let mut m = prepared("", "[mount]\nio-uring = \"off\"\n");
    m.start();
    assert_eq!(transport_logged(&m), "/dev/fuse");
    exercise(&m);
    assert_eq!(rings(m.pid()).0, 0, "io-uring = off opened a ring");
    m.stop();

    set_param(false);
    // auto on a kernel with enable_uring off: /dev/fuse, cleanly.
    let mut m = prepared("", "");
    m.start();
    assert_eq!(transport_logged(&m), "/dev/fuse");
    exercise(&m);
    assert_eq!(rings(m.pid()).0, 0);
    m.stop();

    // on, from the config or the environment, on that kernel: refused, naming the
    // parameter, before anything is written.
    for (env, config) in [("", "[mount]\nio-uring = \"on\"\n"), ("on", "")] {
        let m = prepared(env, config);
        let out = m.mount_fails(&[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("enable_uring") && err.contains(PARAM), "the error names the parameter: {err}");
        assert!(is_empty(&m.backing), "a refused mount left files in the backing directory");
    }
}

fn is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).unwrap().next().is_none()
}
