//! Rewrite-safe encryption (issue 15): what two copies of a backing file taken around an
//! in-place rewrite reveal, under CTR and under XTS.

mod common;

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;

use common::*;

const PAGE: usize = 8192;

/// A database page as PostgreSQL would rewrite it: mostly text, and the marker.
fn page_plaintext() -> Vec<u8> {
    let mut p = Vec::with_capacity(PAGE);
    while p.len() < PAGE {
        p.extend_from_slice(b"customer 4711 | account 0042-1337 | balance 1,000,000.00 | TDEFS-MARKER-page | ");
    }
    p.truncate(PAGE);
    p
}

/// A relation extended with zero pages (fsynced: a backup copies it), then one page filled
/// in place (another backup). XORing the two copies of that page gives back its plaintext
/// under CTR (the zero page's ciphertext *is* the keystream), and nothing under XTS.
fn two_backups_of_a_rewritten_zero_page(method: &str) -> (Vec<u8>, Vec<u8>) {
    let mut m = Mount::new(method);
    let f = OpenOptions::new().read(true).write(true).create(true).open(m.path("16384")).unwrap();
    f.write_all_at(&vec![0u8; 8 * PAGE], 0).unwrap(); // extended with zero-filled pages
    f.sync_all().unwrap();
    let backup1 = fs::read(m.bpath("16384")).unwrap();
    let secret = page_plaintext();
    f.write_all_at(&secret, 3 * PAGE as u64).unwrap(); // the page filled in place
    f.sync_all().unwrap();
    let backup2 = fs::read(m.bpath("16384")).unwrap();
    assert_eq!(fs::read(m.path("16384")).unwrap()[3 * PAGE..4 * PAGE], secret[..]);
    drop(f);
    m.stop();
    let page = 3 * PAGE..4 * PAGE;
    let xor: Vec<u8> = backup1[page.clone()].iter().zip(&backup2[page]).map(|(a, b)| a ^ b).collect();
    (xor, secret)
}

fn recovered(xor: &[u8], secret: &[u8]) -> usize {
    xor.iter().zip(secret).filter(|(a, b)| a == b).count()
}

#[test]
fn ctr_gives_the_page_away_to_two_backups_and_xts_does_not() {
    for method in ["aes256-ctr", "sm4-ctr"] {
        let (xor, secret) = two_backups_of_a_rewritten_zero_page(method);
        assert_eq!(recovered(&xor, &secret), PAGE, "{method}: every byte of the page is recovered");
        assert_eq!(xor, secret);
    }
    for method in ["aes128-xts", "aes256-xts", "sm4-xts"] {
        let (xor, secret) = two_backups_of_a_rewritten_zero_page(method);
        // Chance agreement only: about 1 in 256 bytes.
        let n = recovered(&xor, &secret);
        assert!(n < 128, "{method}: {n} of {PAGE} bytes recovered");
        assert!(!xor.windows(12).any(|w| w == b"TDEFS-MARKER"), "{method}: the marker is readable");
    }
}

/// XTS is deterministic per (file, position): the same page in two files encrypts
/// differently (the tweak includes each file's IV), the same page written twice at the
/// same place of one file encrypts the same (a rewrite reveals only that it did not change,
/// block by block), and a zero page is not stored as zeros (no keystream either).
#[test]
fn xts_per_file_tweaks_and_block_granular_changes() {
    let mut m = Mount::new("aes256-xts");
    let p = page_plaintext();
    fs::write(m.path("a"), &p).unwrap();
    fs::write(m.path("b"), &p).unwrap();
    let (ca, cb) = (fs::read(m.bpath("a")).unwrap(), fs::read(m.bpath("b")).unwrap());
    assert_ne!(ca, cb, "equal pages of two files look different");
    assert!(ca.chunks(16).zip(cb.chunks(16)).all(|(x, y)| x != y), "not even one 16-byte block is equal");
    // One byte changed in place: only its 16-byte block changes on disk.
    let f = OpenOptions::new().write(true).open(m.path("a")).unwrap();
    f.write_all_at(b"#", 1000).unwrap();
    f.sync_all().unwrap();
    let ca2 = fs::read(m.bpath("a")).unwrap();
    let changed: Vec<usize> = ca.chunks(16).zip(ca2.chunks(16)).enumerate().filter(|(_, (x, y))| x != y).map(|(i, _)| i).collect();
    assert_eq!(changed, vec![1000 / 16]);
    // Rewritten with the same bytes: the same ciphertext.
    f.write_all_at(&p[1000..1001], 1000).unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::read(m.bpath("a")).unwrap(), ca);
    // Zero pages: ciphertext, not zeros.
    fs::write(m.path("z"), vec![0u8; PAGE]).unwrap();
    let cz = fs::read(m.bpath("z")).unwrap();
    assert!(cz.iter().filter(|&&b| b == 0).count() < 256);
    drop(f);
    m.stop();
}

/// Sizes that are not multiples of 16 (the tail rule) through a real mount: growing by
/// small appends, shrinking, and reads at every offset, across a remount.
#[test]
fn xts_tails_grow_and_shrink() {
    for method in ["aes256-xts", "sm4-xts"] {
        let mut m = Mount::new(method);
        let path = m.path("log");
        let mut model = Vec::new();
        let f = OpenOptions::new().read(true).write(true).create(true).open(&path).unwrap();
        for i in 0..200u32 {
            let rec = format!("record {i} {}\n", "x".repeat((i % 37) as usize));
            f.write_all_at(rec.as_bytes(), model.len() as u64).unwrap();
            model.extend_from_slice(rec.as_bytes());
            if i % 50 == 7 {
                let n = model.len() - 23;
                f.set_len(n as u64).unwrap();
                model.truncate(n);
            }
        }
        f.sync_all().unwrap();
        drop(f);
        assert_eq!(fs::read(&path).unwrap(), model, "{method}");
        m.remount();
        assert_eq!(fs::read(&path).unwrap(), model, "{method} after a remount");
        assert_eq!(fs::metadata(m.bpath("log")).unwrap().len(), model.len() as u64, "same size on disk");
        let f = fs::File::open(&path).unwrap();
        for off in (0..model.len()).step_by(7) {
            let mut b = [0u8; 21];
            let n = f.read_at(&mut b, off as u64).unwrap();
            assert_eq!(&b[..n], &model[off..(off + 21).min(model.len())], "{method} at {off}");
        }
        drop(f);
        m.stop();
    }
}
