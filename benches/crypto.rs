//! Throughput of each method on one core, at the buffer sizes the data path sees (4 KiB
//! pages, 64 KiB, 1 MiB FUSE writes): the CTR keystream (`keystream/…`) and XTS encryption
//! (`xts/…`). `scripts/bench/crypto.sh` prints openssl's figures and the ratios beside these.
//!
//! Time is the benchmark thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time: on a
//! 2-core machine shared with builds and test mounts, wall time mostly measures the
//! scheduler (the same binary gave 0.6 to 6 GiB/s from one run to the next). For a CPU-bound
//! loop on an idle machine both agree. `TDEFS_BENCH_WALL=1` measures wall time instead.

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, Throughput};
use tdefs::crypto::{FileCipher, Method};

/// CPU time of the calling thread, in nanoseconds.
struct ThreadCpuTime;

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

static WALL: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_ns() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Nanoseconds, as wall time's: the same units and throughput formatting.
        WALL.formatter()
    }
}

const SIZES: [usize; 3] = [4096, 65536, 1 << 20];

fn keystream<M: Measurement>(c: &mut Criterion<M>) {
    let iv = [7u8; 16];
    let mut g = c.benchmark_group("keystream");
    for method in [Method::Aes128Ctr, Method::Aes256Ctr, Method::Sm4Ctr] {
        let key = vec![0x42u8; method.key_len()];
        let cipher = FileCipher::new(method, &key, &iv).unwrap();
        for size in SIZES {
            let mut buf = vec![0u8; size];
            g.throughput(Throughput::Bytes(size as u64));
            // An unaligned offset, as a database page inside a file: the counter is derived
            // from it on every call.
            g.bench_with_input(BenchmarkId::new(method.name(), size), &size, |b, _| {
                b.iter(|| cipher.apply(8192 * 1000 + 5, &mut buf))
            });
        }
    }
    g.finish();
}

fn xts<M: Measurement>(c: &mut Criterion<M>) {
    let iv = [7u8; 16];
    let mut g = c.benchmark_group("xts");
    for method in [Method::Aes128Xts, Method::Aes256Xts, Method::Sm4Xts] {
        let key: Vec<u8> = (0..method.key_len() as u8).collect();
        let cipher = FileCipher::new(method, &key, &iv).unwrap();
        for size in SIZES {
            let mut buf = vec![0u8; size];
            g.throughput(Throughput::Bytes(size as u64));
            // Page-aligned, as the data path writes whole pages; one tweak per 4 KiB unit.
            g.bench_with_input(BenchmarkId::new(method.name(), size), &size, |b, _| {
                b.iter(|| cipher.encrypt(8192 * 1000, &mut buf))
            });
        }
    }
    g.finish();
}

fn run<M: Measurement>(mut c: Criterion<M>) {
    keystream(&mut c);
    xts(&mut c);
    c.final_summary();
}

fn main() {
    if std::env::var_os("TDEFS_BENCH_WALL").is_some() {
        run(Criterion::default().configure_from_args());
    } else {
        run(Criterion::default().with_measurement(ThreadCpuTime).configure_from_args());
    }
}
