//! `--daemon`: the parent starts a detached copy of itself and returns once that copy
//! reports the mount ready (or exits with its error).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

const READY_ENV: &str = "TDEFS_READY_FD";
const READY: &str = "READY";

/// In the parent: run `tdefs ARGS` (a foreground mount) in a new session; wait for it.
pub fn spawn_and_wait(args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let mut fds = [0; 2];
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let exe = std::env::current_exe().context("cannot find the tdefs executable")?;
    let wr_fd = wr.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(args).env(READY_ENV, wr_fd.to_string()).stdin(Stdio::null());
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::setsid();
            let flags = libc::fcntl(wr_fd, libc::F_GETFD);
            libc::fcntl(wr_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC);
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the tdefs daemon")?;
    drop(wr);
    let mut line = String::new();
    BufReader::new(std::fs::File::from(rd)).read_line(&mut line).ok();
    if line.trim_end() == READY {
        eprintln!("tdefs: mounted (daemon pid {})", child.id());
        return Ok(());
    }
    let status = child.wait()?;
    bail!("the daemon exited ({status}) before the mount was ready; see its error above")
}

/// In the daemon: tell the waiting parent the mount is ready, then detach from the
/// parent's output: stdout to /dev/null, stderr (the log) to `log_file`, else kept when
/// it is the journal (started by systemd, e.g. from an fstab mount unit), else /dev/null.
pub fn notify_ready(log_file: Option<&std::path::Path>) {
    let Some(fd) = std::env::var(READY_ENV).ok().and_then(|v| v.parse::<i32>().ok()) else { return };
    std::env::remove_var(READY_ENV);
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let _ = writeln!(f, "{READY}");
    drop(f);
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        // The daemon runs with umask 0 (FUSE asks for exact modes): the log is created 0600,
        // and a symlink planted at its path is not followed.
        let log = log_file.and_then(|p| {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().create(true).append(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(p).ok()
        });
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
            match &log {
                Some(f) => libc::dup2(f.as_raw_fd(), 2),
                None if stderr_is_journal() => 2,
                None => libc::dup2(null.as_raw_fd(), 2),
            };
        }
    }
}

pub fn is_daemon_child() -> bool {
    std::env::var_os(READY_ENV).is_some()
}

/// systemd sets JOURNAL_STREAM=DEV:INODE for the stream it connected to stdout/stderr;
/// stderr is the journal only if it is still that very stream.
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else { return false };
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    dev.parse() == Ok(st.st_dev as u64) && ino.parse() == Ok(st.st_ino as u64)
}
