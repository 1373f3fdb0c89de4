//! The `/metrics` endpoint: a minimal HTTP/1.x server on one thread.
//!
//! Scrapers send one small GET every few seconds, so one request per connection
//! (`Connection: close`), answered in turn, is plenty. Each client gets `CLIENT_TIMEOUT` in
//! total to send its request and take the answer: a stuck or slow scraper delays the others
//! by at most that much and cannot hold the endpoint.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::Gauges;

const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest request head read; a scraper's is a few hundred bytes.
const MAX_HEAD: usize = 8192;

#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {reason}; {hint}")]
pub struct MetricsError {
    addr: SocketAddr,
    reason: String,
    hint: &'static str,
}

/// A bound but not yet serving endpoint: binding comes first so that a taken port stops
/// the mount before anything is mounted.
pub struct Endpoint {
    listener: TcpListener,
}

pub fn bind(addr: SocketAddr) -> Result<Endpoint, MetricsError> {
    TcpListener::bind(addr).map(|listener| Endpoint { listener }).map_err(|e| {
        let (reason, hint) = match e.kind() {
            io::ErrorKind::AddrInUse => ("address in use".to_string(), "change metrics-addr or stop the other process"),
            io::ErrorKind::AddrNotAvailable => {
                ("no such address on this host".to_string(), "change metrics-addr to a local address (e.g. 127.0.0.1)")
            }
            io::ErrorKind::PermissionDenied => (
                "permission denied".to_string(),
                "ports below 1024 need root or CAP_NET_BIND_SERVICE; change metrics-addr",
            ),
            _ => (e.to_string(), "change metrics-addr"),
        };
        MetricsError { addr, reason, hint }
    })
}

impl Endpoint {
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve on a background thread for the rest of the process; `gauges` is called at
    /// each scrape.
    pub fn serve(self, gauges: impl Fn() -> Gauges + Send + 'static) -> io::Result<()> {
        let addr = self.listener.local_addr()?;
        std::thread::Builder::new().name("tdefs-metrics".into()).spawn(move || {
            for conn in self.listener.incoming() {
                match conn {
                    Ok(s) => {
                        if let Err(e) = answer(s, &gauges) {
                            tracing::debug!(error = %e, "metrics: request failed");
                        }
                    }
                    Err(e) => {
                        // EMFILE and the like: do not spin on a listener that keeps failing.
                        tracing::warn!(error = %e, "metrics: accept failed");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        })?;
        tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
        Ok(())
    }
}

/// Read the request head (up to the blank line) within the client's deadline.
fn read_head(s: &mut TcpStream, deadline: Instant) -> io::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "client too slow"));
        }
        s.set_read_timeout(Some(left))?;
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(head); // the client closed early: answer what we have
        }
        head.extend_from_slice(&buf[..n]);
        if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
            return Ok(head);
        }
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too long"));
        }
    }
}

fn answer(mut s: TcpStream, gauges: &impl Fn() -> Gauges) -> io::Result<()> {
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let head = read_head(&mut s, deadline)?;
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body, extra) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", super::CONTENT_TYPE, super::render(&gauges()), ""),
        (_, "/metrics") => ("405 Method Not Allowed", "text/plain", "use GET\n".to_string(), "Allow: GET, HEAD\r\n"),
        _ => ("404 Not Found", "text/plain", "not found; tdefs serves its metrics at /metrics\n".to_string(), ""),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    s.write_all(&out)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_404_otherwise_and_survives_a_stuck_client() {
        let ep = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep.local_addr().unwrap();
        ep.serve(Gauges::default).unwrap();
        // A client that connects and sends nothing must not block the others for long.
        let _stuck = TcpStream::connect(addr).unwrap();
        let t = Instant::now();
        let r = get(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(t.elapsed() < CLIENT_TIMEOUT + Duration::from_secs(2), "{:?}", t.elapsed());
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.contains("Connection: close"), "{r}");
        assert!(r.contains("\ntdefs_encryption_initialized 1\n"), "{r}");
        let r = get(addr, "GET /other HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 404"), "{r}");
        let r = get(addr, "POST /metrics HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    }

    #[test]
    fn taken_port_is_a_clear_error() {
        let first = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = first.local_addr().unwrap();
        let e = bind(addr).err().expect("second bind fails").to_string();
        assert_eq!(e, format!("cannot serve metrics on {addr}: address in use; change metrics-addr or stop the other process"));
    }
}
