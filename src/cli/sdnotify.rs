//! systemd readiness notification (`Type=notify`): one datagram to `$NOTIFY_SOCKET`.
//! The protocol is a single sendto, so std's UnixDatagram does it without a dependency.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};

/// Send `state` (e.g. "READY=1") if systemd (or a test) asked for notifications.
/// Returns whether a message was sent.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return Ok(false) };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.first() {
        // "@name": a socket in the abstract namespace.
        Some(b'@') => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(&bytes[1..])?
        }
        Some(b'/') => SocketAddr::from_pathname(&path)?,
        _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("NOTIFY_SOCKET={path:?} is not a socket path"))),
    };
    let sock = UnixDatagram::unbound()?;
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
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
