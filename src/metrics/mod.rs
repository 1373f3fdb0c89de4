//! Prometheus metrics of a running mount (served when the config sets `metrics-addr`).
//!
//! One process-wide set, so that the FUSE adapter, the dictionary and the key store each
//! record with a one-line hook and no handle to pass around. The hooks touch only atomics:
//! per-op request counters are resolved once (no label hashing per request), and an errno's
//! counter the first time that errno is seen. What describes the dictionary and the keys as
//! a whole (file counts, key age, sizes) is computed when Prometheus scrapes ([`Gauges`]).

mod http;

use std::collections::BTreeMap;
use std::sync::{LazyLock, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub use self::http::{bind, Endpoint, MetricsError};
use crate::crypto::Method;

macro_rules! ops {
    ($($v:ident = $n:literal),* $(,)?) => {
        /// A FUSE request kind: the `op` label of `tdefs_requests_total`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Op { $($v),* }
        impl Op {
            pub const ALL: &'static [Op] = &[$(Op::$v),*];
            pub fn name(self) -> &'static str {
                match self { $(Op::$v => $n),* }
            }
        }
    };
}

ops!(
    Lookup = "lookup", Forget = "forget", Getattr = "getattr", Setattr = "setattr", Readlink = "readlink",
    Mknod = "mknod", Mkdir = "mkdir", Unlink = "unlink", Rmdir = "rmdir", Symlink = "symlink", Rename = "rename",
    Link = "link", Open = "open", Read = "read", Write = "write", Flush = "flush", Release = "release",
    Fsync = "fsync", Opendir = "opendir", Readdir = "readdir", Readdirplus = "readdirplus",
    Releasedir = "releasedir", Fsyncdir = "fsyncdir", Statfs = "statfs", Setxattr = "setxattr",
    Getxattr = "getxattr", Listxattr = "listxattr", Removexattr = "removexattr", Access = "access",
    Create = "create", Fallocate = "fallocate", Lseek = "lseek", CopyFileRange = "copy_file_range",
);

/// errno values with a pre-sized counter slot (Linux numbers them below 134).
const ERRNO_SLOTS: usize = 256;

/// Durable dictionary appends: one write + fdatasync (plus directory fsyncs before it),
/// from a fast NVMe flush to a struggling disk.
const WRITE_BUCKETS: &[f64] =
    &[0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];
/// In-memory dictionary lookups: microseconds, longer only when they wait for a lock.
const READ_BUCKETS: &[f64] =
    &[0.000_001, 0.000_002_5, 0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.001, 0.01, 0.1];

pub struct Metrics {
    registry: Registry,
    /// Indexed by `Op as usize`.
    requests: Vec<IntCounter>,
    panics: Vec<IntCounter>,
    errors: IntCounterVec,
    errors_by_errno: Vec<OnceLock<IntCounter>>,
    read_bytes: IntCounter,
    written_bytes: IntCounter,
    dict_write: Histogram,
    dict_read: Histogram,
    dict_load: Gauge,
    compactions: IntCounter,
    rotations: IntCounter,
    initialized: IntGauge,
    method: IntGaugeVec,
    data_keys: IntGauge,
    key_age: IntGauge,
    files: IntGaugeVec,
    dict_size: IntGauge,
    conversion_bytes: IntCounter,
    conversion_remaining: IntGauge,
    conversion_state: IntGauge,
}

/// State of the mount, read at scrape time: gathered by the caller of `Endpoint::serve`
/// (this module sees no filesystem, so every layer may call its hooks).
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    /// Method for new files.
    pub method: Option<Method>,
    pub data_keys: usize,
    pub current_key_age: Option<Duration>,
    /// Files with a dictionary entry, per method name.
    pub files_by_method: BTreeMap<String, u64>,
    pub dictionary_bytes: u64,
    /// Online conversion: bytes left to convert, and its state (0 none, 1 running, 2
    /// paused, 3 cancelling, 4 waiting after an error).
    pub conversion_remaining_bytes: u64,
    pub conversion_state: i64,
}

/// The errno's name for the `errno` label ("ENOENT" reads better on a dashboard than 2),
/// from nix's table (already linked through fuser; right on every architecture).
fn errno_name(n: i32) -> Option<String> {
    match nix::errno::Errno::from_raw(n) {
        nix::errno::Errno::UnknownErrno => None,
        e => Some(format!("{e:?}")),
    }
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let counter = |name: &str, help: &str| reg(&r, IntCounter::new(name, help).unwrap());
        let gauge = |name: &str, help: &str| reg(&r, IntGauge::new(name, help).unwrap());
        let requests_vec = reg(
            &r,
            IntCounterVec::new(Opts::new("tdefs_requests_total", "FUSE requests received, by operation"), &["op"]).unwrap(),
        );
        let hist = |name: &str, help: &str, b: &[f64]| {
            reg(&r, Histogram::with_opts(HistogramOpts::new(name, help).buckets(b.to_vec())).unwrap())
        };
        let panics_vec = reg(
            &r,
            IntCounterVec::new(
                Opts::new("tdefs_request_panics_total", "Request handlers that panicked (answered EIO; a bug), by operation"),
                &["op"],
            )
            .unwrap(),
        );
        Metrics {
            requests: Op::ALL.iter().map(|op| requests_vec.with_label_values(&[op.name()])).collect(),
            panics: Op::ALL.iter().map(|op| panics_vec.with_label_values(&[op.name()])).collect(),
            errors: reg(
                &r,
                IntCounterVec::new(Opts::new("tdefs_errors_total", "FUSE requests answered with an error, by errno"), &["errno"])
                    .unwrap(),
            ),
            errors_by_errno: (0..ERRNO_SLOTS).map(|_| OnceLock::new()).collect(),
            read_bytes: counter("tdefs_read_bytes_total", "Plaintext bytes returned by read requests"),
            written_bytes: counter("tdefs_written_bytes_total", "Plaintext bytes accepted by write requests"),
            dict_write: hist(
                "tdefs_dictionary_write_duration_seconds",
                "Durable file dictionary appends (write + fdatasync of a group of records)",
                WRITE_BUCKETS,
            ),
            dict_read: hist(
                "tdefs_dictionary_read_duration_seconds",
                "File dictionary lookups (path to method, key and IV; in memory, under its lock)",
                READ_BUCKETS,
            ),
            dict_load: reg(
                &r,
                Gauge::new("tdefs_dictionary_load_seconds", "Time the mount took to load the file dictionary from disk").unwrap(),
            ),
            compactions: counter("tdefs_dictionary_compactions_total", "File dictionary compactions into a new snapshot"),
            rotations: counter("tdefs_data_key_rotations_total", "New data keys made by this process"),
            initialized: gauge("tdefs_encryption_initialized", "1 once the key and file dictionaries are open"),
            method: reg(
                &r,
                IntGaugeVec::new(Opts::new("tdefs_new_file_method", "1 for the method new files are created with"), &["method"])
                    .unwrap(),
            ),
            data_keys: gauge("tdefs_data_keys", "Data keys in the key dictionary"),
            key_age: gauge("tdefs_current_data_key_age_seconds", "Age of the data key new files get (0: none)"),
            files: reg(
                &r,
                IntGaugeVec::new(Opts::new("tdefs_encrypted_files", "Files with a dictionary entry, by method"), &["method"])
                    .unwrap(),
            ),
            dict_size: gauge("tdefs_dictionary_size_bytes", "Size of the .tdefs metadata files on disk"),
            conversion_bytes: counter("tdefs_conversion_bytes_total", "Bytes the online conversion rewrote under their new encryption"),
            conversion_remaining: gauge("tdefs_conversion_remaining_bytes", "Bytes the online conversion job has left (0: no job)"),
            conversion_state: gauge(
                "tdefs_conversion_state",
                "Online conversion: 0 no job, 1 running, 2 paused, 3 cancelling (finishing its file), 4 waiting to retry after an error",
            ),
            registry: r,
        }
    }

    fn error_counter(&self, errno: i32) -> IntCounter {
        let label = || errno_name(errno).unwrap_or_else(|| format!("E{errno}"));
        match self.errors_by_errno.get(errno as usize) {
            Some(slot) => slot.get_or_init(|| self.errors.with_label_values(&[&label()])).clone(),
            None => self.errors.with_label_values(&[&label()]), // never on Linux
        }
    }

    fn set_gauges(&self, g: &Gauges) {
        self.initialized.set(1);
        for m in Method::ALL {
            self.method.with_label_values(&[&m.to_string()]).set((g.method == Some(m)) as i64);
            self.files.with_label_values(&[&m.to_string()]).set(0);
        }
        for (m, n) in &g.files_by_method {
            self.files.with_label_values(&[m]).set(*n as i64);
        }
        self.data_keys.set(g.data_keys as i64);
        self.key_age.set(g.current_key_age.map_or(0, |a| a.as_secs() as i64));
        self.dict_size.set(g.dictionary_bytes as i64);
        self.conversion_remaining.set(g.conversion_remaining_bytes as i64);
        self.conversion_state.set(g.conversion_state);
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// One FUSE request of kind `op` arrived.
#[inline]
pub fn request(op: Op) {
    METRICS.requests[op as usize].inc();
}

/// The handler of a request of kind `op` panicked.
pub fn request_panicked(op: Op) {
    METRICS.panics[op as usize].inc();
}

/// A FUSE request was answered with `errno`.
pub fn error(errno: i32) {
    let m = &*METRICS;
    match m.errors_by_errno.get(errno as usize).and_then(OnceLock::get) {
        Some(c) => c.inc(),
        None => m.error_counter(errno).inc(),
    }
}

#[inline]
pub fn read_bytes(n: usize) {
    METRICS.read_bytes.inc_by(n as u64);
}

#[inline]
pub fn written_bytes(n: usize) {
    METRICS.written_bytes.inc_by(n as u64);
}

/// A durable dictionary append that started at `start` finished.
pub fn dictionary_write(start: Instant) {
    METRICS.dict_write.observe(start.elapsed().as_secs_f64());
}

/// A dictionary lookup that started at `start` finished.
#[inline]
pub fn dictionary_read(start: Instant) {
    METRICS.dict_read.observe(start.elapsed().as_secs_f64());
}

pub fn dictionary_loaded(took: Duration) {
    METRICS.dict_load.set(took.as_secs_f64());
}

pub fn dictionary_compacted() {
    METRICS.compactions.inc();
}

/// The online conversion rewrote `n` bytes.
pub fn conversion_bytes(n: u64) {
    METRICS.conversion_bytes.inc_by(n);
}

pub fn data_key_rotated() {
    METRICS.rotations.inc();
}

/// Everything in Prometheus text format, with the gauges set from `g`.
pub fn render(g: &Gauges) -> String {
    let m = &*METRICS;
    m.set_gauges(g);
    let mut out = Vec::new();
    // Encoding into a Vec only fails on an invalid metric, which `new` rules out.
    TextEncoder::new().encode(&m.registry.gather(), &mut out).expect("text encoding");
    String::from_utf8(out).expect("text format is UTF-8")
}

/// Content-Type of `render`'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn hooks_show_up_in_the_text() {
        let before = render(&Gauges::default());
        let w0 = value(&before, "tdefs_requests_total{op=\"write\"}").expect("every op is present from the start");
        request(Op::Write);
        request(Op::Write);
        error(libc::ENOENT);
        error(libc::EOWNERDEAD);
        error(999);
        written_bytes(10);
        dictionary_write(Instant::now());
        let mut files = BTreeMap::new();
        files.insert("sm4-ctr".to_string(), 3);
        let g = Gauges {
            method: Some(Method::Sm4Ctr),
            data_keys: 2,
            current_key_age: Some(Duration::from_secs(90)),
            files_by_method: files,
            dictionary_bytes: 4096,
            conversion_remaining_bytes: 5 << 20,
            conversion_state: 2,
        };
        conversion_bytes(7);
        let t = render(&g);
        assert_eq!(value(&t, "tdefs_conversion_remaining_bytes"), Some((5 << 20) as f64));
        assert_eq!(value(&t, "tdefs_conversion_state"), Some(2.0));
        assert!(value(&t, "tdefs_conversion_bytes_total").unwrap() >= 7.0);
        assert_eq!(value(&t, "tdefs_requests_total{op=\"write\"}"), Some(w0 + 2.0));
        assert!(value(&t, "tdefs_errors_total{errno=\"ENOENT\"}").unwrap() >= 1.0, "{t}");
        assert!(value(&t, "tdefs_errors_total{errno=\"EOWNERDEAD\"}").unwrap() >= 1.0, "{t}");
        assert!(value(&t, "tdefs_errors_total{errno=\"E999\"}").unwrap() >= 1.0, "{t}");
        assert!(value(&t, "tdefs_written_bytes_total").unwrap() >= 10.0);
        assert!(value(&t, "tdefs_dictionary_write_duration_seconds_count").unwrap() >= 1.0);
        assert_eq!(value(&t, "tdefs_encrypted_files{method=\"sm4-ctr\"}"), Some(3.0));
        assert_eq!(value(&t, "tdefs_encrypted_files{method=\"aes256-ctr\"}"), Some(0.0));
        assert_eq!(value(&t, "tdefs_new_file_method{method=\"sm4-ctr\"}"), Some(1.0));
        assert_eq!(value(&t, "tdefs_new_file_method{method=\"aes256-ctr\"}"), Some(0.0));
        assert_eq!(value(&t, "tdefs_current_data_key_age_seconds"), Some(90.0));
        assert_eq!(value(&t, "tdefs_data_keys"), Some(2.0));
        assert_eq!(value(&t, "tdefs_dictionary_size_bytes"), Some(4096.0));
        assert_eq!(value(&t, "tdefs_encryption_initialized"), Some(1.0));
    }

    #[test]
    fn every_linux_errno_has_a_name() {
        for n in 1..=133 {
            if n != 41 && n != 58 {
                assert!(errno_name(n).is_some_and(|s| s.starts_with('E')), "errno {n}");
            }
        }
        for (n, name) in [(libc::ENOENT, "ENOENT"), (libc::EAGAIN, "EAGAIN"), (libc::EOPNOTSUPP, "EOPNOTSUPP"),
            (libc::EDEADLK, "EDEADLK"), (libc::EHWPOISON, "EHWPOISON"), (libc::ESTALE, "ESTALE")]
        {
            assert_eq!(errno_name(n).as_deref(), Some(name));
        }
        assert_eq!(errno_name(4000), None);
    }
}
