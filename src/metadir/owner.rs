//! Who holds a backing directory, and what it is doing.
//!
//! The flock on `.tdefs` says only *that* a process uses the directory. Next to it, the
//! holder keeps `.tdefs/owner` (a small JSON file, replaced by rename, not fsynced: it is
//! read only while its writer still holds the lock): its pid, its command, and for a mount
//! the mountpoint and whether it still serves it. A second `tdefs mount` (or check,
//! status...) that finds the lock taken reads it to tell a live mount, which it refuses at
//! once naming the mountpoint, from a daemon that has been unmounted and is still flushing
//! its dictionary, which it waits for (`umount /srv/db && mount /srv/db` must work).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sys::Dir;

pub const OWNER_FILE: &str = "owner";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    /// Holds the directory (an offline command, or a mount not yet serving).
    Open,
    /// A mount serving `mountpoint`.
    Serving,
    /// Unmounted: flushing the dictionary before it exits.
    Stopping,
    /// Closed cleanly (the dictionary is flushed and marked clean); about to exit.
    Closed,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Owner {
    pub pid: u32,
    /// `mount`, `check`, `encrypt`, ...
    pub command: String,
    pub mountpoint: Option<PathBuf>,
    pub state: State,
}

/// The command this process runs (for other processes' messages).
fn command() -> String {
    let args: Vec<String> = std::env::args().collect();
    let sub = args.iter().skip(1).find(|a| !a.starts_with('-')).cloned();
    match (args.first().map(|a| Path::new(a).file_name().unwrap_or_default().to_string_lossy().into_owned()), sub) {
        (Some(n), _) if n.starts_with("mount.fuse") => "mount".into(),
        (_, Some(s)) => s,
        _ => "tdefs".into(),
    }
}

impl Owner {
    pub fn me(state: State, mountpoint: Option<&Path>) -> Owner {
        Owner { pid: std::process::id(), command: command(), mountpoint: mountpoint.map(Path::to_path_buf), state }
    }

    /// Record it in the (locked) metadata directory. A failure is logged, not fatal: the
    /// file is a courtesy to the next process.
    pub fn publish(&self, meta: &Dir) {
        let json = serde_json::to_vec(self).expect("serializes");
        if let Err(e) = meta.write(OWNER_FILE, &json) {
            tracing::debug!(error = %e, "cannot record this process as the backing directory's user");
        }
    }

    pub fn read(meta: &Dir) -> Option<Owner> {
        serde_json::from_slice(&meta.read(OWNER_FILE).ok()?).ok()
    }

    fn alive(&self) -> bool {
        std::fs::metadata(format!("/proc/{}", self.pid)).is_ok()
    }

    /// Whether its mount is still in this process's mount table.
    fn still_mounted(&self) -> bool {
        let Some(mp) = &self.mountpoint else { return false };
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        info.lines().any(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|x| *x == "-");
            f.get(4).map(|p| unescape(p)) == Some(mp.to_string_lossy().into_owned())
                && dash.and_then(|d| f.get(d + 1)).is_some_and(|t| t.starts_with("fuse"))
        })
    }
}

/// mountinfo escapes spaces, tabs, newlines and backslashes as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What to do about a holder of the lock.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It is finishing an unmount (or just closed): wait for it.
    Wait(String),
    /// It is in use: refuse now, with this description.
    Busy(String),
}

pub fn judge(owner: Option<&Owner>) -> Verdict {
    let Some(o) = owner.filter(|o| o.alive()) else {
        // No record (a tdefs that predates it) or its writer is gone: the lock is being
        // released or will be; waiting is bounded.
        return Verdict::Wait("a tdefs process that is exiting".into());
    };
    let who = format!("tdefs {} (pid {})", o.command, o.pid);
    match (&o.state, &o.mountpoint) {
        (State::Stopping | State::Closed, mp) => Verdict::Wait(match mp {
            Some(mp) => format!("{who}, which is finishing the unmount of {}", mp.display()),
            None => who,
        }),
        (State::Serving, Some(mp)) if !o.still_mounted() => {
            Verdict::Wait(format!("{who}, whose mount at {} is gone (unmounted, or still serving files opened before a lazy unmount)", mp.display()))
        }
        (State::Serving, Some(mp)) => Verdict::Busy(format!("mounted at {} by {who}", mp.display())),
        (_, _) if o.command == "mount" => Verdict::Busy(format!("being mounted by {who}")),
        _ => Verdict::Busy(format!("in use by {who}")),
    }
}

/// Take the lock on `meta`, waiting up to `patience` for a previous tdefs that is finishing
/// an unmount; `Err(description)` when it is in use by something that is not going away.
pub fn lock_or_wait(meta: &Dir, patience: Duration) -> std::io::Result<Result<(), String>> {
    let start = Instant::now();
    let mut told = false;
    loop {
        if crate::sys::try_lock_exclusive(meta.fd())? {
            if told {
                tracing::info!(waited = ?start.elapsed(), "the previous tdefs released the backing directory");
            }
            return Ok(Ok(()));
        }
        match judge(Owner::read(meta).as_ref()) {
            Verdict::Busy(who) => return Ok(Err(who)),
            Verdict::Wait(who) => {
                if start.elapsed() >= patience {
                    return Ok(Err(format!("{who}; still not released after {}", humantime::format_duration(patience))));
                }
                if !told {
                    tracing::info!("waiting up to {} for {who} to release {}", humantime::format_duration(patience), meta.path().display());
                    told = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let me = |state, mp: Option<&str>, cmd: &str| Owner {
            pid: std::process::id(),
            command: cmd.into(),
            mountpoint: mp.map(PathBuf::from),
            state,
        };
        assert!(matches!(judge(None), Verdict::Wait(_)));
        let gone = Owner { pid: u32::MAX - 1, ..me(State::Serving, Some("/x"), "mount") };
        assert!(matches!(judge(Some(&gone)), Verdict::Wait(_)), "dead writer");
        assert!(matches!(judge(Some(&me(State::Stopping, Some("/x"), "mount"))), Verdict::Wait(_)));
        // Serving a mountpoint that is not mounted (here: /nonexistent): its unmount happened.
        assert!(matches!(judge(Some(&me(State::Serving, Some("/nonexistent-tdefs-mp"), "mount"))), Verdict::Wait(_)));
        // Serving a mountpoint that is mounted: busy. / is mounted, but not by FUSE here, so
        // use a check instead: an offline command is busy.
        let v = judge(Some(&me(State::Open, None, "encrypt")));
        assert!(matches!(&v, Verdict::Busy(w) if w.contains("tdefs encrypt")), "{v:?}");
        assert_eq!(unescape("/a\\040b"), "/a b");
    }
}
