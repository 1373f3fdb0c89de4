//! Test harness: a real `tdefs mount` in a temporary directory, driven through the kernel.
#![allow(dead_code)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TDEFS: &str = env!("CARGO_BIN_EXE_tdefs");

pub struct Mount {
    pub dir: tempfile::TempDir,
    pub backing: PathBuf,
    pub mnt: PathBuf,
    pub key: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Extra environment for the daemon (AWS credentials, TDEFS_FAULT, ...).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

pub fn config_text(backing: &Path, mnt: &Path, key: &Path, method: &str, extra: &str) -> String {
    config_text_enc(backing, mnt, key, method, extra, "")
}

/// `extra` goes before the [security] tables, `enc_extra` into [security.encryption].
pub fn config_text_enc(backing: &Path, mnt: &Path, key: &Path, method: &str, extra: &str, enc_extra: &str) -> String {
    format!(
        "backing-dir = {:?}\nmountpoint = {:?}\n{extra}\n[security.encryption]\ndata-encryption-method = {method:?}\n\
         {enc_extra}\n[security.encryption.master-key]\ntype = \"file\"\npath = {:?}\n",
        backing, mnt, key
    )
}

impl Mount {
    /// A fresh backing directory and key, not mounted yet.
    pub fn prepare(method: &str) -> Mount {
        Self::prepare_with(method, "")
    }

    /// `extra` is TOML placed before the [security] tables (e.g. a [mount] table).
    pub fn prepare_with(method: &str, extra: &str) -> Mount {
        let dir = tempfile::Builder::new().prefix("tdefs-test").tempdir_in("/tmp").unwrap();
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let backing = dir.path().join("backing");
        let mnt = dir.path().join("mnt");
        fs::create_dir(&backing).unwrap();
        fs::create_dir(&mnt).unwrap();
        let key = dir.path().join("master.key");
        let out = Command::new(TDEFS).arg("genkey").arg(&key).output().unwrap();
        assert!(out.status.success(), "genkey: {out:?}");
        let config = dir.path().join("tdefs.toml");
        fs::write(&config, config_text(&backing, &mnt, &key, method, extra)).unwrap();
        let log = dir.path().join("tdefs.log");
        Mount { dir, backing, mnt, key, config, log, env: Vec::new(), child: None }
    }

    /// Prepared and mounted.
    pub fn new(method: &str) -> Mount {
        let mut m = Self::prepare(method);
        m.start();
        m
    }

    /// Rewrite the config with extra keys in [security.encryption].
    pub fn set_encryption_extra(&self, method: &str, enc_extra: &str) {
        fs::write(&self.config, config_text_enc(&self.backing, &self.mnt, &self.key, method, "", enc_extra)).unwrap();
    }

    /// `tdefs check` with this config: (exit code, stdout + stderr).
    pub fn check(&self, extra_args: &[&str]) -> (i32, String) {
        let out = Command::new(TDEFS).arg("check").arg("--config").arg(&self.config).args(extra_args).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code().unwrap_or(-1), text)
    }

    pub fn set_method(&self, method: &str) {
        fs::write(&self.config, config_text(&self.backing, &self.mnt, &self.key, method, "")).unwrap();
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn bpath(&self, rel: &str) -> PathBuf {
        self.backing.join(rel)
    }

    /// Run `tdefs mount` in the foreground and wait until the mount is live.
    pub fn start_with(&mut self, extra_args: &[&str]) {
        self.start_limited(extra_args, None)
    }

    /// Like `start_with`, with the daemon's open-file limit lowered to `nofile` (soft and
    /// hard), as on hosts that cap descriptors.
    pub fn start_limited(&mut self, extra_args: &[&str], nofile: Option<u64>) {
        assert!(self.child.is_none(), "already mounted");
        let log = fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(TDEFS);
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            unsafe {
                cmd.pre_exec(move || {
                    let rl = libc::rlimit { rlim_cur: n, rlim_max: n };
                    libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
                    Ok(())
                });
            }
        }
        let child = cmd
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("mount")
            .arg("--config")
            .arg(&self.config)
            .args(extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&self.mnt) {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("tdefs mount exited ({st}) before mounting:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "mount did not appear:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start(&mut self) {
        self.start_with(&[]);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mounted").id()
    }

    /// Unmount as an operator would and require a clean exit.
    pub fn stop(&mut self) {
        // A child another test thread forks inherits this thread's open files until it
        // execs (close-on-exec), which briefly keeps the mount busy: retry EBUSY a little.
        let mut tries = 0;
        let st = loop {
            let out = Command::new("fusermount3").arg("-u").arg(&self.mnt).output().unwrap();
            tries += 1;
            if out.status.success() || tries == 20 || !String::from_utf8_lossy(&out.stderr).contains("busy") {
                break out;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert!(
            st.status.success(),
            "fusermount3 -u failed: {}\n{}",
            String::from_utf8_lossy(&st.stderr),
            self.log_text()
        );
        let status = wait_timeout(self.child.take().unwrap(), Duration::from_secs(30));
        assert!(status.success(), "tdefs exited with {status} after unmount:\n{}", self.log_text());
    }

    /// SIGKILL the daemon (a crash) and clean up the dead mount.
    pub fn kill(&mut self) {
        let mut c = self.child.take().expect("mounted");
        let _ = c.kill();
        let _ = c.wait();
        lazy_unmount(&self.mnt);
    }

    pub fn remount(&mut self) {
        self.stop();
        self.start();
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `tdefs mount` expected to fail: its output.
    pub fn mount_fails(&self, extra_args: &[&str]) -> Output {
        let out = Command::new(TDEFS)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("mount")
            .arg("--config")
            .arg(&self.config)
            .args(extra_args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if out.status.success() || is_mounted(&self.mnt) {
            lazy_unmount(&self.mnt);
            panic!("mount unexpectedly succeeded: {out:?}");
        }
        out
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.mnt).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
            lazy_unmount(&self.mnt);
        }
    }
}

pub fn lazy_unmount(mnt: &Path) {
    for _ in 0..50 {
        if !is_mounted(mnt) {
            return;
        }
        let _ = Command::new("fusermount3").arg("-u").arg("-z").arg(mnt).stderr(Stdio::null()).status();
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn is_mounted(mnt: &Path) -> bool {
    let mut s = String::new();
    fs::File::open("/proc/self/mountinfo").unwrap().read_to_string(&mut s).unwrap();
    let want = mnt.to_str().unwrap();
    s.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

pub fn wait_timeout(mut c: Child, t: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + t;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            panic!("process did not exit within {t:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every file below `dir` with its bytes (to prove "nothing on disk changed").
pub fn tree_digest(dir: &Path) -> Vec<(PathBuf, Vec<u8>, u32)> {
    let mut out = Vec::new();
    fn walk(d: &Path, out: &mut Vec<(PathBuf, Vec<u8>, u32)>) {
        let mut ents: Vec<_> = fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).collect();
        ents.sort();
        for p in ents {
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                out.push((p.clone(), Vec::new(), m.permissions().mode()));
                walk(&p, out);
            } else {
                out.push((p.clone(), fs::read(&p).unwrap_or_default(), m.permissions().mode()));
            }
        }
    }
    walk(dir, &mut out);
    out
}

pub fn errno_of(r: std::io::Result<impl Sized>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

pub const METHODS: [&str; 8] = ["aes128-ctr", "aes192-ctr", "aes256-ctr", "sm4-ctr", "aes128-xts", "aes256-xts", "sm4-xts", "plaintext"];

pub const POWERCUT: &str = env!("CARGO_BIN_EXE_tdefs-powercut");

/// The simulator binary: $TDEFS_POWERCUT_BIN (e.g. an older build, to show a test fails
/// on it) or this build's.
pub fn powercut_bin() -> String {
    std::env::var("TDEFS_POWERCUT_BIN").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| POWERCUT.to_string())
}

/// The power-cut simulator mounted at `mnt` over `lower`.
pub struct PowerCut {
    pub lower: PathBuf,
    pub mnt: PathBuf,
    control: PathBuf,
    child: Option<Child>,
}

/// What the last cut undid (`lastcut`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutReport {
    pub files: usize,
    pub namespace: usize,
    pub errors: usize,
}

impl PowerCut {
    /// In the simulator's default mode ($POWERCUT_MODE, else strict).
    pub fn start(lower: &Path, mnt: &Path, control: &Path, log: &Path) -> PowerCut {
        Self::start_in(lower, mnt, control, log, &[])
    }

    /// In `mode` ("strict" or "ext4"). The mode goes through the environment, which an older
    /// simulator ignores (it then runs, with its own semantics, instead of refusing a flag).
    pub fn start_mode(lower: &Path, mnt: &Path, control: &Path, log: &Path, mode: &str) -> PowerCut {
        Self::start_in(lower, mnt, control, log, &[("POWERCUT_MODE", mode)])
    }

    /// With the simulator's own inode numbers: a number that is gone goes to the next new
    /// inode, whatever the lower filesystem's allocator would do.
    pub fn start_reusing_numbers(lower: &Path, mnt: &Path, control: &Path, log: &Path) -> PowerCut {
        Self::start_in(lower, mnt, control, log, &[("POWERCUT_NUMBERS", "reuse")])
    }

    fn start_in(lower: &Path, mnt: &Path, control: &Path, log: &Path, env: &[(&str, &str)]) -> PowerCut {
        fs::create_dir_all(lower).unwrap();
        fs::create_dir_all(mnt).unwrap();
        let logf = fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        let mut cmd = Command::new(powercut_bin());
        cmd.envs(env.iter().copied());
        let child = cmd
            .arg("--lower").arg(lower)
            .arg("--mount").arg(mnt)
            .arg("--control").arg(control)
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !is_mounted(mnt) || !control.exists() {
            assert!(t.elapsed() < Duration::from_secs(20), "powercut did not mount");
            std::thread::sleep(Duration::from_millis(10));
        }
        PowerCut { lower: lower.to_path_buf(), mnt: mnt.to_path_buf(), control: control.to_path_buf(), child: Some(child) }
    }

    pub fn command(&self, cmd: &str) -> String {
        use std::io::{BufRead, Write};
        let mut s = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        writeln!(s, "{cmd}").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s).read_line(&mut line).unwrap();
        line.trim_end().to_string()
    }

    /// Drop everything not durable; returns how many files had data rolled back.
    pub fn cut(&self) -> usize {
        let r = self.command("cut");
        r.strip_prefix("ok ")
            .and_then(|n| n.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("cut failed: {r}"))
    }

    /// What the last cut did: files rolled back, namespace operations undone, undo errors.
    pub fn last_cut(&self) -> CutReport {
        let r = self.command("lastcut");
        let field = |k: &str| -> usize {
            r.split_whitespace()
                .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
                .unwrap_or_else(|| panic!("lastcut: no {k} in {r:?}"))
        };
        assert!(r.starts_with("ok "), "lastcut: {r}");
        CutReport { files: field("files"), namespace: field("namespace"), errors: field("errors") }
    }

    /// "strict" or "ext4".
    pub fn mode(&self) -> String {
        let r = self.command("mode");
        r.strip_prefix("ok ").unwrap_or_else(|| panic!("mode: {r}")).to_string()
    }

    /// Namespace operations not yet durable.
    pub fn pending(&self) -> usize {
        let r = self.command("pending");
        r.strip_prefix("ok ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("pending: {r}"))
    }

    /// Make everything durable now (data and namespace), as sync(2) would.
    pub fn sync(&self) {
        let r = self.command("sync");
        assert_eq!(r, "ok", "sync: {r}");
    }

    /// How often the directory `rel` (relative to the lower root) was fsynced.
    pub fn dir_syncs(&self, rel: &str) -> u64 {
        let r = self.command(&format!("dirsyncs {rel}"));
        r.strip_prefix("ok ").and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("dirsyncs: {r}"))
    }
}

impl Drop for PowerCut {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("fusermount3").arg("-u").arg(&self.mnt).stderr(Stdio::null()).status();
            let _ = wait_timeout_quiet(&mut c, Duration::from_secs(10));
            let _ = c.kill();
            let _ = c.wait();
            lazy_unmount(&self.mnt);
        }
    }
}

fn wait_timeout_quiet(c: &mut Child, t: Duration) -> bool {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = c.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A tdefs mount whose backing directory is the power-cut simulator (fields drop in order:
/// tdefs is unmounted before the simulator under it).
pub struct CutMount {
    pub m: Mount,
    pub pc: PowerCut,
}

impl CutMount {
    /// Over a simulator in its default mode ($POWERCUT_MODE, else strict).
    pub fn prepare(method: &str) -> CutMount {
        let m = Mount::prepare(method);
        let lower = m.dir.path().join("lower");
        let pc = PowerCut::start(&lower, &m.backing, &m.dir.path().join("powercut.sock"), &m.dir.path().join("powercut.log"));
        CutMount { m, pc }
    }

    /// Over a simulator in `mode` ("strict" or "ext4").
    pub fn prepare_mode(method: &str, mode: &str) -> CutMount {
        let m = Mount::prepare(method);
        let lower = m.dir.path().join("lower");
        let pc = PowerCut::start_mode(&lower, &m.backing, &m.dir.path().join("powercut.sock"), &m.dir.path().join("powercut.log"), mode);
        CutMount { m, pc }
    }

    /// Over a simulator that reuses inode numbers at once (`--numbers reuse`).
    pub fn prepare_reusing_numbers(method: &str) -> CutMount {
        let m = Mount::prepare(method);
        let lower = m.dir.path().join("lower");
        let pc = PowerCut::start_reusing_numbers(&lower, &m.backing, &m.dir.path().join("powercut.sock"), &m.dir.path().join("powercut.log"));
        CutMount { m, pc }
    }

    /// Power loss: the daemon dies, then everything not fsynced is lost.
    pub fn power_cut(&mut self) -> usize {
        self.m.kill();
        self.pc.cut()
    }
}

