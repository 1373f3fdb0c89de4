//! Throughput of each method on one core, at the buffer sizes the data path sees (4 KiB
//! pages, 64 KiB, 1 MiB FUSE writes): the CTR keystream (`keystream/…`) and XTS encryption
//! (`xts/…`). `scripts/bench/crypto.sh` prints openssl's figures and the ratios beside these.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tdefs::crypto::{FileCipher, Method};

const SIZES: [usize; 3] = [4096, 65536, 1 << 20];

fn keystream(c: &mut Criterion) {
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

fn xts(c: &mut Criterion) {
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

criterion_group!(benches, keystream, xts);
criterion_main!(benches);
