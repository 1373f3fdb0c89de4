//! Control socket of a running mount. `tdefs rotate-master-key` (and other commands that act
//! on a live mount) send one JSON request line and read one JSON reply line.
//!
//! The socket lives outside the backing directory and the mount, in a private runtime
//! directory (`/run/tdefs` for root, else `$XDG_RUNTIME_DIR/tdefs` or `/tmp/tdefs-UID`),
//! named after the mountpoint. It is mode 0600 and the daemon also checks the peer's uid
//! (root or the daemon's own user). Requests never carry key material: a rotation names a
//! config file, which the daemon reads itself.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Which mount is this?
    Ping,
    /// Re-wrap the key dictionary under the `master-key` of this config file.
    RotateMasterKey { config: PathBuf },
    /// `tdefs status`: the reply's message is a JSON `metadir::status::Status`.
    Status,
    /// Online conversion (`tdefs convert`): start a job, or pause, resume or cancel it.
    Convert { action: ConvertAction },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum ConvertAction {
    Start(ConvertJob),
    Pause,
    Resume,
    Cancel,
}

/// What `tdefs convert start` asks for.
#[derive(Debug, Serialize, Deserialize, Default)]
pub struct ConvertJob {
    /// Target method (default: the mount's method for new files).
    pub method: Option<String>,
    /// Also convert files whose data key is older than this many seconds.
    pub older_than_secs: Option<u64>,
    /// Paths below the mount root ("/base/16384"); all files when empty.
    pub paths: Vec<String>,
    /// Bytes per second (0: no limit).
    pub rate: u64,
    /// Percent of the time a file's lock may be held (1..=100).
    pub io_share: u8,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    pub message: String,
    pub mountpoint: PathBuf,
}

pub type Handler = dyn Fn(Request) -> Result<String, String> + Send + Sync;

fn runtime_dirs() -> Vec<PathBuf> {
    let uid = unsafe { libc::geteuid() };
    let mut v = Vec::new();
    if uid == 0 {
        v.push(PathBuf::from("/run/tdefs"));
    }
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        v.push(Path::new(&x).join("tdefs"));
    }
    v.push(PathBuf::from(format!("/tmp/tdefs-{uid}")));
    v
}

fn socket_name(mountpoint: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    format!("mount-{:08x}.sock", crc32fast::hash(mountpoint.as_os_str().as_bytes()))
}

/// Where a client looks for the daemon serving `mountpoint` (canonical), in order.
pub fn candidate_sockets(mountpoint: &Path) -> Vec<PathBuf> {
    let name = socket_name(mountpoint);
    let mut v: Vec<PathBuf> = runtime_dirs().into_iter().map(|d| d.join(&name)).collect();
    // A client run by root also finds a daemon run by another user.
    let root = PathBuf::from("/run/tdefs").join(&name);
    if !v.contains(&root) {
        v.push(root);
    }
    v
}

/// A listening control socket; removed when dropped.
pub struct Server {
    path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// `dir` must be this user's own private directory: a socket in a directory someone else
/// made (the `/tmp` fallback) could be swapped for theirs.
fn check_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(dir)?;
    let euid = unsafe { libc::geteuid() };
    if !md.is_dir() || md.uid() != euid || md.mode() & 0o077 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private directory of user {euid} (it is a {}, owner {}, mode {:04o}); remove it so tdefs \
                 can create its own",
                dir.display(),
                if md.file_type().is_symlink() { "symlink" } else if md.is_dir() { "directory" } else { "file" },
                md.uid(),
                md.mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// Serve requests for `mountpoint` (canonical) on a background thread.
pub fn serve(mountpoint: &Path, handler: Arc<Handler>) -> std::io::Result<Server> {
    let dir = runtime_dirs().into_iter().next().expect("at least one runtime dir");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    check_private(&dir)?;
    let path = dir.join(socket_name(mountpoint));
    if path.exists() {
        if UnixStream::connect(&path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is served by another running tdefs", path.display()),
            ));
        }
        std::fs::remove_file(&path)?; // left by a daemon that died
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    let mp = mountpoint.to_path_buf();
    std::thread::Builder::new().name("tdefs-control".into()).spawn(move || {
        for conn in listener.incoming() {
            match conn {
                Ok(s) => {
                    if let Err(e) = answer(s, &mp, handler.as_ref()) {
                        tracing::warn!(error = %e, "control socket: request failed");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "control socket: accept failed"),
            }
        }
    })?;
    Ok(Server { path })
}

/// The user at the other end of a Unix socket (SO_PEERCRED).
fn peer_uid(s: &UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    let r = unsafe {
        libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

fn answer(s: UnixStream, mountpoint: &Path, handler: &Handler) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let uid = peer_uid(&s)?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let result = if uid != 0 && uid != unsafe { libc::geteuid() } {
        Err(format!("user {uid} may not control this mount"))
    } else {
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => handler(req),
            Err(e) => Err(format!("bad request: {e}")),
        }
    };
    let (ok, message) = match result {
        Ok(m) => (true, m),
        Err(m) => (false, m),
    };
    let mut out = serde_json::to_string(&Response { ok, message, mountpoint: mountpoint.to_path_buf() })?;
    out.push('\n');
    (&s).write_all(out.as_bytes())
}

/// Send `req` to the daemon serving `mountpoint`.
pub fn call(mountpoint: &Path, req: &Request) -> anyhow::Result<Response> {
    use anyhow::Context;
    let mp = std::fs::canonicalize(mountpoint).with_context(|| format!("cannot resolve {}", mountpoint.display()))?;
    let candidates = candidate_sockets(&mp);
    let Some((path, s)) = candidates.iter().find_map(|p| UnixStream::connect(p).ok().map(|s| (p, s))) else {
        anyhow::bail!(
            "no running tdefs serves {} (looked for its control socket at {}); is it mounted by tdefs?",
            mp.display(),
            candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    };
    // An operator destroys the old master key on the word "rotated": only believe a
    // daemon run by root or by ourselves.
    let server = peer_uid(&s).context("cannot identify the process behind the control socket")?;
    let me = unsafe { libc::geteuid() };
    if server != 0 && server != me {
        anyhow::bail!(
            "the control socket {} is served by user {server}, not by root or by you (user {me}): not trusting it",
            path.display()
        );
    }
    // A master-key rotation may wait on KMS (seconds, with retries).
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    (&s).write_all(line.as_bytes())?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).context("no answer from the tdefs daemon")?;
    let resp: Response = serde_json::from_str(&reply).context("unreadable answer from the tdefs daemon")?;
    if resp.mountpoint != mp {
        anyhow::bail!("the control socket answered for {}, not {}", resp.mountpoint.display(), mp.display());
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// The daemon serves its socket only from a directory that is its user's alone.
    #[test]
    fn the_runtime_directory_must_be_private() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("rt");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_private(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check_private(&dir).unwrap_err().to_string().contains("mode 0755"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        if unsafe { libc::geteuid() } == 0 {
            let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(unsafe { libc::chown(c.as_ptr(), 65534, 65534) }, 0);
            assert!(check_private(&dir).unwrap_err().to_string().contains("owner 65534"));
        }
        let link = d.path().join("link");
        std::os::unix::fs::symlink(d.path(), &link).unwrap();
        assert!(check_private(&link).unwrap_err().to_string().contains("symlink"));
    }
}
