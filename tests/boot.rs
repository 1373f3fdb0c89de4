//! Boot integration: `mount -t fuse.tdefs` and fstab lines through the mount(8) helper,
//! `umount` (a kernel unmount) ending the daemon cleanly, systemd's sd_notify protocol,
//! and daemon logs kept on the journal.
//!
//! Tests that install /sbin/mount.fuse.tdefs hold `SBIN` so they never run concurrently.

mod common;

use std::fs;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;

const HELPER: &str = "/sbin/mount.fuse.tdefs";
static SBIN: Mutex<()> = Mutex::new(());

/// /sbin/mount.fuse.tdefs -> the tdefs under test, for the guard's life; whatever was
/// there before is put back.
struct HelperInstalled {
    backup: Option<PathBuf>,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl HelperInstalled {
    fn new() -> HelperInstalled {
        let lock = SBIN.lock().unwrap_or_else(|e| e.into_inner());
        let backup = fs::symlink_metadata(HELPER).is_ok().then(|| {
            let b = PathBuf::from(format!("{HELPER}.tdefs-test-backup-{}", std::process::id()));
            fs::rename(HELPER, &b).unwrap();
            b
        });
        std::os::unix::fs::symlink(TDEFS, HELPER).unwrap();
        HelperInstalled { backup, _one_at_a_time: lock }
    }
}

impl Drop for HelperInstalled {
    fn drop(&mut self) {
        let _ = fs::remove_file(HELPER);
        if let Some(b) = &self.backup {
            let _ = fs::rename(b, HELPER);
        }
    }
}

/// On a failed assertion: no mount and no daemon left behind (a leftover daemon holding
/// the test's output pipe would hang the test run).
struct Cleanup<'a> {
    mnt: &'a Path,
    pid: Option<u32>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.filter(|p| !exited(*p)) {
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        lazy_unmount(self.mnt);
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The daemon's pid from the `--daemon` parent's "mounted (daemon pid N)".
fn daemon_pid(out: &Output) -> u32 {
    let t = text(out);
    let n = t.split("daemon pid ").nth(1).unwrap_or_else(|| panic!("no daemon pid in: {t}"));
    n.trim_end_matches(|c: char| !c.is_ascii_digit()).split(')').next().unwrap().parse().unwrap()
}

/// Gone, or a zombie nobody reaps (the daemon is not our child).
fn exited(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
    }
}

fn wait_exit(pid: u32, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !exited(pid) {
        assert!(Instant::now() < deadline, "daemon {pid} still running after umount:\n{}", fs::read_to_string(log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `umount` as root, as systemd and fstab users do: the kernel ends the FUSE session and
/// the daemon must exit cleanly on its own, its dictionary flushed.
/// (source, type, per-mount options) of the mount at `mnt`, from /proc/self/mountinfo.
fn mount_entry(mnt: &Path) -> (String, String, String) {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info.lines().find(|l| l.split(' ').nth(4) == mnt.to_str()).expect("mounted");
    let fields: Vec<&str> = line.split(' ').collect();
    let dash = fields.iter().position(|f| *f == "-").unwrap();
    (fields[dash + 2].to_string(), fields[dash + 1].to_string(), fields[5].to_string())
}

/// Whether a shell script on the mount runs (noexec refuses it with EACCES).
fn script_runs(mnt: &Path) -> std::io::Result<std::process::ExitStatus> {
    let script = mnt.join("hello.sh");
    fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let r = Command::new(&script).status();
    fs::remove_file(&script).unwrap();
    r
}

fn umount_and_wait(mnt: &Path, pid: u32, log: &Path) {
    // By type, as an operator (or `umount -a -t fuse.tdefs` at shutdown) would.
    let out = run(Command::new("umount").args(["-t", "fuse.tdefs"]).arg(mnt));
    assert!(out.status.success(), "umount: {}", text(&out));
    wait_exit(pid, log);
    assert!(!is_mounted(mnt));
    let l = fs::read_to_string(log).unwrap();
    assert!(l.contains("unmounted cleanly"), "daemon log:\n{l}");
}

/// Written through the mount: same length, not the plaintext, in `backing`.
fn write_and_check_ciphertext(mnt: &Path, backing: &Path) -> Vec<u8> {
    let data = b"a database page that must not reach the disk in clear ".repeat(100);
    fs::create_dir(mnt.join("base")).unwrap();
    fs::write(mnt.join("base/16384"), &data).unwrap();
    fs::File::open(mnt.join("base/16384")).unwrap().sync_all().unwrap();
    let raw = fs::read(backing.join("base/16384")).unwrap();
    assert_eq!(raw.len(), data.len());
    assert!(raw != data && !raw.windows(8).any(|w| w == b"database"), "plaintext in the backing file");
    data
}

/// After the umount: `tdefs check` is clean and a fresh mount reads the data back.
fn check_and_reread(m: &mut Mount, backing: &Path, data: &[u8]) {
    let (code, t) = m.check(&[backing.to_str().unwrap()]);
    assert_eq!(code, 0, "{t}");
    m.start_with(&[backing.to_str().unwrap(), m.mnt.clone().to_str().unwrap()]);
    assert!(fs::read(m.path("base/16384")).unwrap() == data);
    m.stop();
}

#[test]
fn mount_t_fuse_tdefs_then_umount() {
    let _h = HelperInstalled::new();
    let mut m = Mount::prepare("aes256-ctr");
    // backing= overrides the config's backing-dir.
    let backing = m.dir.path().join("other-backing");
    fs::create_dir(&backing).unwrap();
    let log = m.dir.path().join("daemon.log");
    let opts = format!("backing={},log={}", backing.display(), log.display());
    let out = run(Command::new("mount").args(["-t", "fuse.tdefs"]).arg(&m.config).arg(&m.mnt).args(["-o", &opts]));
    assert!(out.status.success(), "mount -t fuse.tdefs: {}", text(&out));
    assert!(is_mounted(&m.mnt), "mount returned before the filesystem was ready");
    let pid = daemon_pid(&out);
    let mnt = m.mnt.clone();
    let _cleanup = Cleanup { mnt: &mnt, pid: Some(pid) };
    // The mount table names it: the config (the "device") as source, type fuse.tdefs, and
    // tdefs' default flags for a database directory.
    let (source, fstype, opts) = mount_entry(&m.mnt);
    assert_eq!((source.as_str(), fstype.as_str()), (fs::canonicalize(&m.config).unwrap().to_str().unwrap(), "fuse.tdefs"));
    assert!(opts.contains("nosuid") && opts.contains("nodev") && opts.contains("relatime") && !opts.contains("noexec"), "{opts}");
    assert!(script_runs(&m.mnt).unwrap().success());
    let data = write_and_check_ciphertext(&m.mnt, &backing);
    assert!(fs::read_dir(&m.backing).unwrap().next().is_none(), "the config's backing-dir was used");
    umount_and_wait(&m.mnt, pid, &log);
    check_and_reread(&mut m, &backing, &data);
}

#[test]
fn fstab_line_then_umount() {
    let _h = HelperInstalled::new();
    let mut m = Mount::prepare("sm4-ctr");
    let log = m.dir.path().join("daemon.log");
    let fstab = m.dir.path().join("fstab");
    let backing = m.backing.clone();
    fs::write(
        &fstab,
        format!(
            "# tdefs under test\n{}  {}  fuse.tdefs  defaults,_netdev,nofail,noexec,noatime,nodiratime,x-systemd.before=db.service,backing={},log={}  0 0\n",
            m.config.display(), m.mnt.display(), backing.display(), log.display()
        ),
    )
    .unwrap();
    let out = run(Command::new("mount").arg("-T").arg(&fstab).arg(&m.mnt));
    assert!(out.status.success(), "mount -T fstab: {}", text(&out));
    assert!(is_mounted(&m.mnt));
    let pid = daemon_pid(&out);
    let mnt = m.mnt.clone();
    let _cleanup = Cleanup { mnt: &mnt, pid: Some(pid) };
    // The fstab line's hardening reaches the kernel (mount(8) leaves it to the helper).
    let (_, fstype, opts) = mount_entry(&m.mnt);
    assert_eq!(fstype, "fuse.tdefs");
    for want in ["nosuid", "nodev", "noexec", "noatime", "nodiratime"] {
        assert!(opts.split(',').any(|o| o == want), "{want} missing from {opts}");
    }
    assert_eq!(script_runs(&m.mnt).map_err(|e| e.raw_os_error()).unwrap_err(), Some(libc::EACCES), "noexec");
    let data = write_and_check_ciphertext(&m.mnt, &backing);
    umount_and_wait(&m.mnt, pid, &log);
    check_and_reread(&mut m, &backing, &data);
}

#[test]
fn bad_options_fail_clearly_and_mount_nothing() {
    let _h = HelperInstalled::new();
    let m = Mount::prepare("aes256-ctr");
    let mount = |opts: &str, extra: &[&str]| {
        let out = run(Command::new("mount").args(["-t", "fuse.tdefs"]).args(extra).arg(&m.config).arg(&m.mnt).args(["-o", opts]));
        assert!(!is_mounted(&m.mnt), "{opts}: mounted: {}", text(&out));
        out
    };
    let out = mount("rw,allow_other,bogus=1", &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("unknown mount option \"allow_other\""), "{}", text(&out));
    let out = mount("ro", &[]);
    assert!(!out.status.success() && text(&out).contains("ro is not supported"), "{}", text(&out));
    let out = mount("backing=", &[]);
    assert!(!out.status.success() && text(&out).contains("backing= needs a value"), "{}", text(&out));
    // A config error reaches mount(8)'s caller too.
    let out = run(Command::new("mount").args(["-t", "fuse.tdefs", "/nonexistent/tdefs.toml"]).arg(&m.mnt));
    assert!(!out.status.success() && text(&out).contains("cannot read config file /nonexistent/tdefs.toml"), "{}", text(&out));
    // mount -f (fake): checked, nothing mounted, success.
    let out = mount("defaults", &["-f"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!m.bpath(".tdefs").exists(), "nothing was initialized");
}

/// systemd's side of sd_notify: a datagram socket in a temporary directory.
#[test]
fn sd_notify_ready_after_mount_and_stopping_on_sigterm() {
    let m = Mount::prepare("aes256-ctr");
    let sock_path = m.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let logf = fs::File::create(&m.log).unwrap();
    let child = Command::new(TDEFS)
        .args(["mount", "--config"])
        .arg(&m.config)
        .env("NOTIFY_SOCKET", &sock_path)
        .stdin(Stdio::null())
        .stderr(logf)
        .spawn()
        .unwrap();
    let _cleanup = Cleanup { mnt: &m.mnt, pid: Some(child.id()) };
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no READY=1 ({e}):\n{}", m.log_text()));
    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
    // Checked at once: systemd starts the database as soon as READY=1 arrives.
    let mounted = is_mounted(&m.mnt);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert!(mounted, "READY=1 arrived before the mount was live");
    fs::write(m.path("f"), b"x").unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).unwrap_or_else(|e| panic!("no STOPPING=1 ({e}):\n{}", m.log_text()));
    assert_eq!(&buf[..n], b"STOPPING=1");
    let st = wait_timeout(child, Duration::from_secs(30));
    assert!(st.success(), "exit {st}:\n{}", m.log_text());
    assert!(!is_mounted(&m.mnt));
    assert!(sock.set_nonblocking(true).is_ok() && sock.recv(&mut buf).is_err(), "STOPPING=1 is sent once");
    let (code, t) = m.check(&[]);
    assert_eq!(code, 0, "{t}");
}

/// Under systemd a daemon's stderr is the journal (JOURNAL_STREAM=DEV:INO names it): a
/// --daemon mount without a log file keeps logging there instead of discarding.
#[test]
fn daemon_keeps_logging_to_the_journal_stream() {
    use std::os::unix::fs::MetadataExt;
    let m = Mount::prepare("aes256-ctr");
    for journal in [true, false] {
        let stream = m.dir.path().join(format!("stream-{journal}"));
        let f = fs::File::create(&stream).unwrap();
        let md = f.metadata().unwrap();
        let mut cmd = Command::new(TDEFS);
        cmd.args(["mount", "--daemon", "--config"]).arg(&m.config).stdin(Stdio::null()).stderr(f);
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", md.dev(), md.ino()));
        } else {
            cmd.env_remove("JOURNAL_STREAM");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success() && is_mounted(&m.mnt), "{}", fs::read_to_string(&stream).unwrap());
        let pid = daemon_pid(&Output { stderr: fs::read(&stream).unwrap(), ..out });
        let _cleanup = Cleanup { mnt: &m.mnt, pid: Some(pid) };
        let out = run(Command::new("umount").arg(&m.mnt));
        assert!(out.status.success(), "{}", text(&out));
        wait_exit(pid, &stream);
        let logged = fs::read_to_string(&stream).unwrap().contains("unmounted cleanly");
        assert_eq!(logged, journal, "journal={journal}:\n{}", fs::read_to_string(&stream).unwrap());
    }
}
