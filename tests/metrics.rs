//! The Prometheus endpoint (`metrics-addr`) of a real mount, scraped while I/O runs
//! through it, and the refusal to mount when its port is taken.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// A port nobody listens on right now (the OS picks it; the race is negligible).
fn free_addr() -> String {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string()
}

/// GET `path` with a plain HTTP/1.0 request: (status line, body).
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("a complete HTTP answer");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

fn scrape(addr: &str) -> String {
    let (status, body) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    body
}

/// Value of one series (`name` or `name{labels}`), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

fn must(text: &str, series: &str) -> f64 {
    value(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
}

#[test]
fn counters_move_while_io_runs() {
    const FILES: usize = 4;
    const LEN: usize = 256 * 1024 + 4096;
    let addr = free_addr();
    let mut m = Mount::prepare_with("aes256-ctr", &format!("metrics-addr = {addr:?}"));
    m.start();
    let first = scrape(&addr);
    assert_eq!(must(&first, "tdefs_encryption_initialized"), 1.0);
    assert_eq!(must(&first, "tdefs_new_file_method{method=\"aes256-ctr\"}"), 1.0);

    // A scraper runs the whole time; counters may only grow between its scrapes.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, addr) = (stop.clone(), addr.clone());
        std::thread::spawn(move || {
            let (mut n, mut last_writes) = (0, 0.0);
            while !stop.load(Ordering::Relaxed) {
                let t = scrape(&addr);
                let w = must(&t, "tdefs_requests_total{op=\"write\"}");
                assert!(w >= last_writes, "write requests went from {last_writes} to {w}");
                last_writes = w;
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 % 251) as u8).collect();
    for i in 0..FILES {
        let mut f = fs::File::create(m.path(&format!("f{i}"))).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
    }
    // O_DIRECT: the reads reach the daemon instead of being served from the page cache.
    for i in 0..FILES {
        let mut f = fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(m.path(&format!("f{i}"))).unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert!(back == data, "f{i} reads back differently");
    }
    assert_eq!(errno_of(fs::File::open(m.path("no-such-file"))), libc::ENOENT);
    // A removed file (a recycled WAL segment): its dictionary entry is looked up and dropped.
    fs::write(m.path("wal.old"), b"x").unwrap();
    fs::remove_file(m.path("wal.old")).unwrap();
    std::thread::sleep(Duration::from_millis(50)); // let the scraper see some of it
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraper.join().unwrap();
    assert!(scrapes >= 2, "only {scrapes} scrapes during the I/O");

    let t = scrape(&addr);
    let written = must(&t, "tdefs_written_bytes_total");
    assert!(written >= (FILES * LEN) as f64, "written {written} < {}", FILES * LEN);
    let read = must(&t, "tdefs_read_bytes_total");
    assert!(read >= (FILES * LEN) as f64, "read {read} < {}", FILES * LEN);
    for op in ["write", "read", "create", "fsync", "lookup"] {
        assert!(must(&t, &format!("tdefs_requests_total{{op=\"{op}\"}}")) > 0.0, "no {op} requests:\n{t}");
    }
    assert!(must(&t, "tdefs_errors_total{errno=\"ENOENT\"}") >= 1.0);
    assert_eq!(must(&t, "tdefs_encrypted_files{method=\"aes256-ctr\"}"), FILES as f64);
    assert_eq!(must(&t, "tdefs_encrypted_files{method=\"sm4-ctr\"}"), 0.0);
    assert_eq!(must(&t, "tdefs_encryption_initialized"), 1.0);
    assert_eq!(must(&t, "tdefs_data_keys"), 1.0);
    assert!(must(&t, "tdefs_current_data_key_age_seconds") < 3600.0);
    assert!(must(&t, "tdefs_dictionary_size_bytes") > 0.0);
    // Each create made its dictionary entry durable: at least one group commit.
    assert!(must(&t, "tdefs_dictionary_write_duration_seconds_count") > 0.0);
    assert!(must(&t, "tdefs_dictionary_write_duration_seconds_bucket{le=\"+Inf\"}") > 0.0);
    assert!(must(&t, "tdefs_dictionary_read_duration_seconds_count") > 0.0);
    assert_eq!(must(&t, "tdefs_data_key_rotations_total"), 1.0, "the first key of a new backing directory");
    assert!(t.contains("# TYPE tdefs_dictionary_write_duration_seconds histogram"), "{t}");

    // Only /metrics is served.
    let (status, _) = get(&addr, "/");
    assert!(status.starts_with("HTTP/1.1 404"), "{status}");
    m.stop();
    assert!(TcpStream::connect(&addr).is_err(), "the endpoint goes away with the mount");
}

#[test]
fn a_taken_port_stops_the_mount_with_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let m = Mount::prepare_with("aes256-ctr", &format!("metrics-addr = {addr:?}"));
    let want = format!("cannot serve metrics on {addr}: address in use; change metrics-addr or stop the other process");
    for args in [&[][..], &["--daemon"][..]] {
        let out = m.mount_fails(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&want), "{args:?}: {err}");
        assert!(!is_mounted(&m.mnt));
        assert!(!m.bpath(".tdefs").exists(), "{args:?}: stopped before touching the backing directory");
    }
}

/// A panic in a request handler is answered EIO, logged and counted, and takes no request
/// thread with it: after more panics than the mount has threads, every thread still
/// serves (before, each panic killed a fuser thread until the mount hung).
#[test]
fn a_panicking_request_handler_answers_eio_and_keeps_its_thread() {
    let addr = free_addr();
    let mut m = Mount::prepare_with("aes256-ctr", &format!("metrics-addr = {addr:?}\n[mount]\nthreads = 2"));
    m.env.push(("TDEFS_FAULT".into(), "panic:request:setxattr".into()));
    m.start();
    fs::write(m.path("f"), b"x").unwrap();
    let path = std::ffi::CString::new(m.path("f").to_str().unwrap()).unwrap();
    for _ in 0..10 {
        let r = unsafe { libc::setxattr(path.as_ptr(), c"user.x".as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        assert_eq!(r, -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EIO));
    }
    // Both threads still answer, concurrently.
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let p = m.path(&format!("w{i}"));
            std::thread::spawn(move || {
                for j in 0..50 {
                    fs::write(&p, format!("{j}")).unwrap();
                    assert_eq!(fs::read_to_string(&p).unwrap(), format!("{j}"));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let text = scrape(&addr);
    assert_eq!(must(&text, "tdefs_request_panics_total{op=\"setxattr\"}"), 10.0);
    assert_eq!(must(&text, "tdefs_request_panics_total{op=\"write\"}"), 0.0);
    m.stop();
    assert_eq!(m.log_text().matches("a request handler panicked").count(), 10, "{}", m.log_text());
}

/// The online conversion's metrics follow its job: state, bytes left, bytes rewritten.
#[test]
fn conversion_metrics_follow_the_job() {
    let addr = free_addr();
    let mut m = Mount::prepare_with("aes256-xts", &format!("metrics-addr = {addr:?}"));
    for i in 0..3 {
        fs::write(m.bpath(&format!("f{i}")), vec![b'p'; 2 << 20]).unwrap();
    }
    m.start_with(&["--init"]);
    let t = scrape(&addr);
    assert_eq!((must(&t, "tdefs_conversion_state"), must(&t, "tdefs_conversion_remaining_bytes")), (0.0, 0.0));
    let convert = |args: &[&str]| {
        let out = std::process::Command::new(TDEFS).arg("convert").args(args).output().unwrap();
        assert!(out.status.success(), "{out:?}");
    };
    let mnt = m.mnt.to_str().unwrap().to_string();
    convert(&["start", &mnt, "--rate", "2M"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while must(&scrape(&addr), "tdefs_conversion_bytes_total") == 0.0 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    convert(&["pause", &mnt]);
    let t = scrape(&addr);
    assert_eq!(must(&t, "tdefs_conversion_state"), 2.0, "paused");
    let left = must(&t, "tdefs_conversion_remaining_bytes");
    assert!(left > 0.0 && left < (6 << 20) as f64, "{left}");
    convert(&["resume", &mnt]);
    assert_eq!(must(&scrape(&addr), "tdefs_conversion_state"), 1.0, "running");
    convert(&["status", &mnt, "--wait"]);
    let t = scrape(&addr);
    assert_eq!((must(&t, "tdefs_conversion_state"), must(&t, "tdefs_conversion_remaining_bytes")), (0.0, 0.0));
    assert_eq!(must(&t, "tdefs_conversion_bytes_total"), (6 << 20) as f64);
    assert_eq!(must(&t, "tdefs_encrypted_files{method=\"aes256-xts\"}"), 3.0);
    m.stop();
}
