//! `tdefs umount MOUNTPOINT`, and the helper umount(8) runs for FUSE mounts: unmount, then
//! wait until the daemon has flushed its dictionary, recorded a clean close and exited, so
//! that `umount /srv/db && tdefs check` is always clean and a mount right after never
//! finds the directory busy.
//!
//! umount(8) (util-linux 2.38) looks for `/sbin/umount.fuse` for every `fuse.*` type and
//! passes `-t fuse.tdefs`; it never looks for `umount.fuse.tdefs`. So the helper is
//! installed as `umount.fuse` and unmounts other FUSE filesystems exactly as umount(8)
//! would without it.
//!
//! The kernel's unmount returns as soon as the mount is detached; the daemon learns of it
//! and finishes afterwards. Its control socket (found by mountpoint) gives its pid and
//! backing directory; its owner record (`.tdefs/owner`) says whether it closed cleanly.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::control::{self, Request};
use crate::metadir::owner::{Owner, State};
use crate::metadir::META_DIR;
use crate::sys::Dir;

/// The names umount(8) may run the helper under.
pub const HELPER_NAMES: [&str; 2] = ["umount.fuse", "umount.fuse.tdefs"];
const HELPER_NAME: &str = "umount.fuse";

/// Unmount a tdefs mount and wait until its daemon has flushed everything and exited.
#[derive(Args, Debug)]
#[command(after_help = "Unlike `umount`/`fusermount3 -u` alone (which return as soon as the kernel detaches \
the mount, while the daemon is still flushing its dictionary), this returns once the daemon has \
closed the backing directory cleanly: a `tdefs check` or a new mount right after finds it idle. \
Exit status 0: unmounted and closed cleanly; 1: unmounted, but the daemon did not close cleanly \
(run `tdefs check`); 2: not unmounted.\n\n\
For umount(8) to do the same, install the helper once:\n  ln -s /usr/local/bin/tdefs /sbin/umount.fuse.tdefs\n\n\
Examples:\n  tdefs umount /var/lib/postgresql/15/main\n  tdefs umount --lazy /srv/db   # detach now even if files are open")]
pub struct UmountArgs {
    /// Detach now even if files are still open (MNT_DETACH); the daemon exits once they
    /// are closed, and this waits for that too.
    #[arg(short, long)]
    lazy: bool,
    /// How long to wait for the daemon to finish.
    #[arg(long, value_name = "DURATION", default_value = "5min", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// The mountpoint.
    mountpoint: PathBuf,
}

/// What the daemon said about itself.
struct Daemon {
    pid: u32,
    backing: PathBuf,
}

fn ask_daemon(mp: &Path) -> Option<Daemon> {
    let resp = control::call(mp, &Request::Ping).ok()?;
    let v: serde_json::Value = serde_json::from_str(&resp.message).ok()?;
    Some(Daemon { pid: v["pid"].as_u64()? as u32, backing: PathBuf::from(v["backing"].as_str()?) })
}

pub fn run(args: UmountArgs) -> anyhow::Result<()> {
    unmount_and_wait(&args.mountpoint, args.lazy, false, args.timeout)
}

fn unmount_and_wait(mountpoint: &Path, lazy: bool, force: bool, timeout: Duration) -> anyhow::Result<()> {
    // A dead FUSE mount cannot be resolved (ENOTCONN): use the path as given.
    let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let daemon = ask_daemon(&mp);
    let flags = if lazy { libc::MNT_DETACH } else { 0 } | if force { libc::MNT_FORCE } else { 0 };
    let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()).context("mountpoint contains NUL")?;
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EBUSY) {
            bail!("{}: target is busy (files are open on it; stop the database, or use --lazy)", mp.display());
        }
        return Err(e).with_context(|| format!("cannot unmount {}", mp.display()));
    }
    let Some(d) = daemon else {
        eprintln!(
            "tdefs: unmounted {}, but no tdefs daemon answered on its control socket (it had died, or this \
             was not a tdefs mount), so a clean close cannot be confirmed: run `tdefs check`",
            mp.display()
        );
        std::process::exit(1);
    };
    let deadline = Instant::now() + timeout;
    while running(d.pid) {
        if Instant::now() > deadline {
            bail!(
                "unmounted {}, but its daemon (pid {}) is still running after {} (a lazy unmount waits for open files to close)",
                mp.display(),
                d.pid,
                humantime::format_duration(timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let parent = std::fs::File::open(&d.backing).with_context(|| format!("cannot open {}", d.backing.display()))?;
    let meta = Dir::open_nofollow(std::os::fd::AsFd::as_fd(&parent), std::ffi::OsStr::new(META_DIR), &d.backing.join(META_DIR))?;
    match Owner::read(&meta) {
        Some(o) if o.pid == d.pid && o.state == State::Closed => Ok(()),
        _ => {
            eprintln!(
                "tdefs: unmounted {}, but its daemon (pid {}) exited without closing {} cleanly: see its log, and run `tdefs check`",
                mp.display(),
                d.pid,
                d.backing.display()
            );
            std::process::exit(1);
        }
    }
}

/// Whether process `pid` still runs: any of its threads is neither a zombie nor dead. The
/// group leader alone is not enough: it turns zombie while the daemon's other threads are
/// still exiting, and until they are gone its parent cannot collect it (a caller that
/// waits for the daemon right after `tdefs umount` would find it still there).
fn running(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    tasks.flatten().any(|t| match std::fs::read_to_string(t.path().join("stat")) {
        Ok(stat) => !stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => false,
    })
}

/// The filesystem type of the mount at `mp`, from this process's mount table.
fn mount_type(mp: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let dash = f.iter().position(|x| *x == "-")?;
        (f.get(4)? == &mp.to_str()?).then(|| f.get(dash + 1).map(|t| t.to_string()))?
    })
}

/// As umount(8) runs it: `umount.fuse MOUNTPOINT [-flnrv] [-N NS] [-t TYPE]`.
pub fn run_helper(args: &[OsString]) -> anyhow::Result<()> {
    let mut mountpoint = None;
    let (mut lazy, mut force) = (false, false);
    let mut fstype = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "-t" {
            fstype = it.next().map(|t| t.to_string_lossy().into_owned());
        } else if s == "-N" {
            it.next();
        } else if let Some(flags) = s.strip_prefix('-').filter(|f| !f.is_empty()) {
            for c in flags.chars() {
                match c {
                    'l' => lazy = true,
                    'f' => force = true,
                    'n' | 'r' | 'v' | 'i' => {}
                    _ => bail!("usage: {HELPER_NAME} MOUNTPOINT [-flnrv]: unknown flag -{c}"),
                }
            }
        } else if mountpoint.is_none() {
            mountpoint = Some(PathBuf::from(a));
        } else {
            bail!("usage: {HELPER_NAME} MOUNTPOINT [-flnrv]: unexpected argument {s:?}");
        }
    }
    let Some(mp) = mountpoint else { bail!("usage: {HELPER_NAME} MOUNTPOINT [-flnrv]") };
    let resolved = std::fs::canonicalize(&mp).unwrap_or(mp.clone());
    let is_tdefs = fstype.or_else(|| mount_type(&resolved)).is_some_and(|t| t == "fuse.tdefs");
    if is_tdefs {
        return unmount_and_wait(&mp, lazy, force, Duration::from_secs(300));
    }
    // Another FUSE filesystem: what umount(8) does without a helper.
    if unsafe { libc::geteuid() } != 0 {
        let st = std::process::Command::new("fusermount3").args(if lazy { vec!["-u", "-z"] } else { vec!["-u"] }).arg(&mp).status()?;
        if !st.success() {
            bail!("fusermount3 -u {} failed", mp.display());
        }
        return Ok(());
    }
    let flags = if lazy { libc::MNT_DETACH } else { 0 } | if force { libc::MNT_FORCE } else { 0 };
    let c = std::ffi::CString::new(mp.as_os_str().as_encoded_bytes()).context("mountpoint contains NUL")?;
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("umount: {}", mp.display()));
    }
    Ok(())
}
