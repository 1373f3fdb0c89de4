//! systemd readiness notification (`Type=notify`): one datagram to `$NOTIFY_SOCKET`.
//! The protocol is a single sendto, so std's UnixDatagram does it without a dependency.
//! Hand-written rather than the `sd-notify` crate on purpose: sd-notify 0.5 `connect`s to
//! `$NOTIFY_SOCKET` as a path, so the abstract-namespace form `@name` that sd_notify(3)
//! allows (service managers in containers use it) fails with ENOENT; this handles both.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};

/// Send `state` (e.g. "READY=1") if systemd (or a test) asked for notifications.
/// Returns whether a message was sent.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(false) };
    notify_to(&path, state).map(|()| true)
}

fn notify_to(path: &std::ffi::OsStr, state: &str) -> io::Result<()> {
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path);
    let addr = match bytes.first() {
        // "@name": a socket in the abstract namespace.
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])?
        }
        Some(b'/') => SocketAddr::from_pathname(path)?,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("NOTIFY_SOCKET={path:?} is not a socket path"))),
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

/// Log instead of failing: the mount works without the notification.
fn send(state: &str) {
    match notify(state) {
        Ok(true) => tracing::debug!(state, "notified systemd"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, state, "cannot notify systemd (NOTIFY_SOCKET)"),
    }
}

pub fn ready(mountpoint: &std::path::Path) {
    send(&format!("READY=1\nSTATUS=serving {}", mountpoint.display()));
}

/// Once per process, whichever way the unmount starts (signal or kernel unmount).
pub fn stopping() {
    static SENT: AtomicBool = AtomicBool::new(false);
    if !SENT.swap(true, Ordering::Relaxed) {
        send("STOPPING=1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn abstract_and_path_sockets() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tdefs-sdnotify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
        notify_to(format!("@{name}").as_ref(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("n.sock");
        let rx = UnixDatagram::bind(&p).unwrap();
        notify_to(p.as_os_str(), "STOPPING=1").unwrap();
        let n = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
        assert!(notify_to("relative.sock".as_ref(), "READY=1").is_err());
    }
}
