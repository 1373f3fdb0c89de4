use std::fmt;

use ctr::cipher::{BlockCipher, BlockEncrypt, InnerIvInit, KeyInit, StreamCipher, StreamCipherSeek};
use ctr::cipher::consts::U16;
use zeroize::Zeroize;

use super::sm4::{Backend, Sm4};
use super::xts::Xts;
use super::{Iv, Method};

/// A file's cipher: method + expanded data key(s) + IV. Stateless between calls: every call
/// derives what it needs (CTR counter, XTS tweak) from the file offset, so any range can be
/// encrypted or decrypted independently, and a short write can never desynchronise anything.
///
/// - **Stream methods** (CTR, plaintext; `block_size() == 1`): keystream for byte `o` is byte
///   `o % 16` of `E(key, IV + o/16)` with a wrapping 128-bit big-endian add: the layout of
///   docs/design.md §3, identical to OpenSSL's `*-ctr`. Any byte range; encryption and
///   decryption are the same XOR (`apply`).
/// - **XTS methods** (`block_size() == 16`): IEEE 1619 over 4 KiB data units at file offsets,
///   the tweak of unit `n` derived from the IV and `n`; see `encrypt` and `crypto::xts`.
///
/// The data path can use `encrypt`/`decrypt`/`block_size` for every method.
#[derive(Clone)]
pub struct FileCipher {
    iv: Iv,
    inner: Inner,
}

#[derive(Clone)]
enum Inner {
    Plain,
    Aes128(aes::Aes128),
    Aes192(aes::Aes192),
    Aes256(aes::Aes256),
    Sm4(Sm4),
    // Boxed: two expanded keys each; a CTR or plaintext FileCipher stays its old size.
    Aes128Xts(Box<Xts<aes::Aes128>>),
    Aes256Xts(Box<Xts<aes::Aes256>>),
    Sm4Xts(Box<Xts<Sm4>>),
    /// A file in online conversion: one cipher below a 4 KiB-aligned offset, another from
    /// it on (see `FileCipher::split`).
    Split(Box<Split>),
}

#[derive(Clone)]
struct Split {
    below: FileCipher,
    above: FileCipher,
    at: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{method} needs a {expected}-byte key, got {got} bytes")]
pub struct BadKeyLength {
    pub method: Method,
    pub expected: usize,
    pub got: usize,
}

impl FileCipher {
    /// `key` is `method.key_len()` bytes; for XTS the pair K1 || K2 (data key, tweak key).
    pub fn new(method: Method, key: &[u8], iv: &Iv) -> Result<FileCipher, BadKeyLength> {
        let bad = || BadKeyLength { method, expected: method.key_len(), got: key.len() };
        if key.len() != method.key_len() {
            return Err(bad());
        }
        let inner = match method {
            Method::Plaintext => Inner::Plain,
            Method::Aes128Ctr => Inner::Aes128(aes::Aes128::new_from_slice(key).map_err(|_| bad())?),
            Method::Aes192Ctr => Inner::Aes192(aes::Aes192::new_from_slice(key).map_err(|_| bad())?),
            Method::Aes256Ctr => Inner::Aes256(aes::Aes256::new_from_slice(key).map_err(|_| bad())?),
            Method::Sm4Ctr => Inner::Sm4(Sm4::new(key.try_into().map_err(|_| bad())?)),
            Method::Aes128Xts => Inner::Aes128Xts(Box::new(Xts::from_key_pair(key).ok_or_else(bad)?)),
            Method::Aes256Xts => Inner::Aes256Xts(Box::new(Xts::from_key_pair(key).ok_or_else(bad)?)),
            Method::Sm4Xts => Inner::Sm4Xts(Box::new(Xts::sm4(key.try_into().map_err(|_| bad())?, Backend::detect()))),
        };
        Ok(FileCipher { iv: *iv, inner })
    }

    pub fn plaintext() -> FileCipher {
        FileCipher { iv: [0; 16], inner: Inner::Plain }
    }

    /// The cipher of a file being converted online (docs/design.md §10): bytes below `at`
    /// under `below`, the others under `above`. `at` is a multiple of 4 KiB, so a range
    /// split there splits no XTS data unit, and the file's tail (if any) stays with
    /// whichever cipher holds the end of the file.
    ///
    /// # Panics
    /// If `at` is not a multiple of 4096.
    pub fn split(below: FileCipher, above: FileCipher, at: u64) -> FileCipher {
        assert_eq!(at % super::XTS_DATA_UNIT, 0, "conversion watermark off a 4 KiB boundary");
        FileCipher { iv: [0; 16], inner: Inner::Split(Box::new(Split { below, above, at })) }
    }

    /// For a split cipher: the range `[offset, offset + buf.len())` cut at the watermark,
    /// each part handed to its cipher. `None` for any other cipher.
    fn split_apply(&self, offset: u64, buf: &mut [u8], f: impl Fn(&FileCipher, u64, &mut [u8])) -> Option<()> {
        let Inner::Split(s) = &self.inner else { return None };
        let cut = s.at.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (lo, hi) = buf.split_at_mut(cut);
        if !lo.is_empty() {
            f(&s.below, offset, lo);
        }
        if !hi.is_empty() {
            f(&s.above, offset + cut as u64, hi);
        }
        Some(())
    }

    /// The method; for a split cipher, the one the bytes above the watermark still use.
    pub fn method(&self) -> Method {
        match &self.inner {
            Inner::Split(s) => s.above.method(),
            Inner::Plain => Method::Plaintext,
            Inner::Aes128(_) => Method::Aes128Ctr,
            Inner::Aes192(_) => Method::Aes192Ctr,
            Inner::Aes256(_) => Method::Aes256Ctr,
            Inner::Sm4(_) => Method::Sm4Ctr,
            Inner::Aes128Xts(_) => Method::Aes128Xts,
            Inner::Aes256Xts(_) => Method::Aes256Xts,
            Inner::Sm4Xts(_) => Method::Sm4Xts,
        }
    }

    pub fn is_plaintext(&self) -> bool {
        match &self.inner {
            Inner::Split(s) => s.below.is_plaintext() && s.above.is_plaintext(),
            i => matches!(i, Inner::Plain),
        }
    }

    pub fn is_xts(&self) -> bool {
        match &self.inner {
            Inner::Split(s) => s.below.is_xts() || s.above.is_xts(),
            _ => self.method().is_xts(),
        }
    }

    /// 1 for stream methods, 16 for XTS: `encrypt`/`decrypt` ranges start at a multiple of
    /// this, and only a range that ends at the end of the file may end off it.
    pub fn block_size(&self) -> usize {
        match &self.inner {
            Inner::Split(s) => s.below.block_size().max(s.above.block_size()),
            _ => self.method().block_size(),
        }
    }

    /// Encrypt file bytes `[offset, offset + buf.len())` in place, for every method.
    ///
    /// For XTS: `offset` is a multiple of 16 (anywhere in a 4 KiB data unit; the range may
    /// span many units), and `buf.len()` is a multiple of 16 **unless the range ends at the
    /// end of the file**: the file's last `len % 16` bytes (its final partial block) are then
    /// encrypted in *tail mode*, XORed with `E_K1(T_j)` for their block position `j`
    /// (deterministic and size-preserving; see `crypto::xts`). Passing a partial block that
    /// is not the file's last makes those bytes unreadable once the file grows past them:
    /// the data path must re-encrypt a former tail as a full block.
    /// Splitting a range into 16-aligned pieces gives the same bytes as encrypting it whole.
    ///
    /// # Panics
    /// For XTS, if `offset` is not a multiple of 16.
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) {
        if self.split_apply(offset, buf, |c, o, b| c.encrypt(o, b)).is_some() {
            return;
        }
        match &self.inner {
            Inner::Aes128Xts(x) => x.encrypt(&self.iv, offset, buf),
            Inner::Aes256Xts(x) => x.encrypt(&self.iv, offset, buf),
            Inner::Sm4Xts(x) => x.encrypt(&self.iv, offset, buf),
            _ => self.apply(offset, buf),
        }
    }

    /// Decrypt file bytes `[offset, offset + buf.len())` in place: the inverse of `encrypt`
    /// for the same range, under the same rules.
    ///
    /// # Panics
    /// For XTS, if `offset` is not a multiple of 16.
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) {
        if self.split_apply(offset, buf, |c, o, b| c.decrypt(o, b)).is_some() {
            return;
        }
        match &self.inner {
            Inner::Aes128Xts(x) => x.decrypt(&self.iv, offset, buf),
            Inner::Aes256Xts(x) => x.decrypt(&self.iv, offset, buf),
            Inner::Sm4Xts(x) => x.decrypt(&self.iv, offset, buf),
            _ => self.apply(offset, buf),
        }
    }

    /// Stream methods only: XOR the keystream for file bytes `[offset, offset + buf.len())`
    /// into `buf`, which encrypts plaintext and decrypts ciphertext alike.
    ///
    /// # Panics
    /// For an XTS method, whose encryption and decryption differ and work on whole blocks:
    /// use `encrypt`/`decrypt`. (A silent fallback would write data that nothing can read.)
    pub fn apply(&self, offset: u64, buf: &mut [u8]) {
        match &self.inner {
            Inner::Plain => {}
            Inner::Aes128(c) => xor_keystream(c, &self.iv, offset, buf),
            Inner::Aes192(c) => xor_keystream(c, &self.iv, offset, buf),
            Inner::Aes256(c) => xor_keystream(c, &self.iv, offset, buf),
            Inner::Sm4(c) => sm4_keystream(c, &self.iv, offset, buf),
            Inner::Split(_) => {
                self.split_apply(offset, buf, |c, o, b| c.apply(o, b));
            }
            Inner::Aes128Xts(_) | Inner::Aes256Xts(_) | Inner::Sm4Xts(_) => {
                panic!("FileCipher::apply called for {}: XTS needs encrypt()/decrypt()", self.method())
            }
        }
    }
}

fn xor_keystream<C>(cipher: &C, iv: &Iv, offset: u64, buf: &mut [u8])
where
    C: BlockEncrypt + BlockCipher<BlockSize = U16>,
{
    // CTR over a *reference* to the expanded key (cipher 0.4 implements the block cipher
    // traits for `&C`): no copy of the key schedule per request, and no mutable state shared
    // between requests.
    let core = ctr::CtrCore::<&C, ctr::flavors::Ctr128BE>::inner_iv_init(cipher, iv.into());
    let mut stream = ctr::Ctr128BE::<&C>::from_core(core);
    stream.seek(offset);
    stream.apply_keystream(buf);
}

/// Keystream blocks per SM4 call: one full pass of the AVX2 backend (two of the SSE one),
/// small enough to stay in L1 beside the data.
const SM4_BATCH: usize = 32;

/// CTR over SM4: the same counter layout as `xor_keystream`, counter blocks encrypted in
/// batches.
fn sm4_keystream(c: &Sm4, iv: &Iv, offset: u64, buf: &mut [u8]) {
    let base = u128::from_be_bytes(*iv);
    let mut block = (offset / 16) as u128;
    let mut skip = (offset % 16) as usize;
    let mut ks = [[0u8; 16]; SM4_BATCH];
    let mut pos = 0;
    while pos < buf.len() {
        let n = (skip + buf.len() - pos).div_ceil(16).min(SM4_BATCH);
        for (i, b) in ks[..n].iter_mut().enumerate() {
            *b = base.wrapping_add(block + i as u128).to_be_bytes();
        }
        c.encrypt_blocks(&mut ks[..n]);
        let stream = &ks[..n].as_flattened()[skip..];
        let take = stream.len().min(buf.len() - pos);
        for (b, k) in buf[pos..pos + take].iter_mut().zip(stream) {
            *b ^= k;
        }
        pos += take;
        skip = 0;
        block += n as u128;
    }
    ks.zeroize();
}

impl fmt::Debug for FileCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key; the IV is not secret but has no business in logs either.
        write!(f, "FileCipher({})", self.method())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(char::is_whitespace, "")).unwrap()
    }

    const NIST_IV: &str = "f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff";
    const NIST_PT: &str = "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51
                           30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710";

    fn check(method: Method, key: &str, iv: &str, pt: &str, ct: &str) {
        let iv: Iv = h(iv).try_into().unwrap();
        let c = FileCipher::new(method, &h(key), &iv).unwrap();
        let mut buf = h(pt);
        c.apply(0, &mut buf);
        assert_eq!(hex::encode(&buf), hex::encode(h(ct)), "{method} whole buffer");
        // The same vector decrypted one byte at a time at its own offset.
        for (i, b) in buf.iter_mut().enumerate() {
            let mut one = [*b];
            c.apply(i as u64, &mut one);
            *b = one[0];
        }
        assert_eq!(buf, h(pt), "{method} byte-by-byte decrypt");
    }

    // NIST SP 800-38A, F.5.1 / F.5.3 / F.5.5 (CTR-AES128/192/256.Encrypt).
    #[test]
    fn nist_sp800_38a_aes128() {
        check(Method::Aes128Ctr, "2b7e151628aed2a6abf7158809cf4f3c", NIST_IV, NIST_PT,
            "874d6191b620e3261bef6864990db6ce 9806f66b7970fdff8617187bb9fffdff
             5ae4df3edbd5d35e5b4f09020db03eab 1e031dda2fbe03d1792170a0f3009cee");
    }

    #[test]
    fn nist_sp800_38a_aes192() {
        check(Method::Aes192Ctr, "8e73b0f7da0e6452c810f32b809079e562f8ead2522c6b7b", NIST_IV, NIST_PT,
            "1abc932417521ca24f2b0459fe7e6e0b 090339ec0aa6faefd5ccc2c6f4ce8e94
             1e36b26bd1ebc670d1bd1d665620abf7 4f78a7f6d29809585a97daec58c6b050");
    }

    #[test]
    fn nist_sp800_38a_aes256() {
        check(Method::Aes256Ctr, "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4",
            NIST_IV, NIST_PT,
            "601ec313775789a5b7a7f504bbf3d228 f443e3ca4d62b59aca84e990cacaf5c5
             2b0930daa23de94ce87017ba2d84988d dfc9c58db67aada613c2dd08457941a6");
    }

    // SM4: GB/T 32907-2016 example 1 as a CTR first block (keystream = E(IV)), and a
    // multi-block SM4-CTR vector cross-checked with `openssl enc -sm4-ctr`.
    #[test]
    fn sm4_known_answers() {
        check(Method::Sm4Ctr, "0123456789abcdeffedcba9876543210", "0123456789abcdeffedcba9876543210",
            "00000000000000000000000000000000", "681edf34d206965e86b3e94f536e4246");
        check(Method::Sm4Ctr, "0123456789abcdeffedcba9876543210", "000102030405060708090a0b0c0d0e0f",
            "aaaaaaaaaaaaaaaabbbbbbbbbbbbbbbbccccccccccccccccdddddddddddddddd
             eeeeeeeeeeeeeeeeffffffffffffffffaaaaaaaaaaaaaaaabbbbbbbbbbbbbbbb",
            "ac3236cb970cc20791364c395a1342d1a3cbc1878c6f30cd074cce385cdd70c7
             f234bc0e24c11980fd1286310ce37b926e02fcd0faa0baf38b2933851d824514");
    }

    // The counter is a full 128-bit big-endian integer that wraps (as OpenSSL's does).
    #[test]
    fn counter_wraps_at_128_bits() {
        check(Method::Aes128Ctr, "2b7e151628aed2a6abf7158809cf4f3c", "ffffffffffffffffffffffffffffffff",
            &"00".repeat(48),
            "8af2860142f786f409307c1a3f7eaaac7df76b0c1ab899b33e42f047b91b546f57127d4034b1bebfaef466b9c7726fc6");
    }

    #[test]
    fn wrong_key_length_is_refused() {
        let e = FileCipher::new(Method::Aes256Ctr, &[0; 16], &[0; 16]).unwrap_err();
        assert_eq!((e.expected, e.got), (32, 16));
        assert!(FileCipher::new(Method::Plaintext, &[], &[0; 16]).unwrap().is_plaintext());
    }

    #[test]
    fn debug_never_shows_key() {
        let c = FileCipher::new(Method::Aes128Ctr, &[0xAB; 16], &[0xCD; 16]).unwrap();
        let s = format!("{c:?}");
        assert!(!s.contains("ab") && !s.contains("AB") && !s.contains("171"), "{s}");
    }

    mod split_points {
        use super::*;
        use proptest::prelude::*;

        fn stream_methods() -> Vec<Method> {
            Method::ALL.into_iter().filter(|m| m.is_stream()).collect()
        }

        proptest! {
            // Encrypting a buffer in pieces at arbitrary offsets equals encrypting it whole.
            #[test]
            fn pieces_equal_whole(
                method in prop::sample::select(stream_methods()),
                key in proptest::collection::vec(any::<u8>(), 32),
                iv in any::<[u8; 16]>(),
                start in 0u64..(1 << 40),
                data in proptest::collection::vec(any::<u8>(), 0..3000),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let c = FileCipher::new(method, &key[..method.key_len()], &iv).unwrap();
                let mut whole = data.clone();
                c.apply(start, &mut whole);
                let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() + 1)).collect();
                points.extend([0, data.len()]);
                points.sort();
                let mut pieces = data.clone();
                for w in points.windows(2) {
                    c.apply(start + w[0] as u64, &mut pieces[w[0]..w[1]]);
                }
                prop_assert_eq!(&pieces, &whole);
                // encrypt/decrypt are apply for stream methods.
                let mut e = data.clone();
                c.encrypt(start, &mut e);
                prop_assert_eq!(&e, &whole);
                c.decrypt(start, &mut e);
                prop_assert_eq!(&e, &data);
                if method.is_plaintext() {
                    prop_assert_eq!(&whole, &data);
                } else if data.len() >= 16 {
                    prop_assert_ne!(&whole, &data);
                }
            }
        }
    }

    mod xts_files {
        use super::*;
        use proptest::prelude::*;

        const XTS: [Method; 3] = [Method::Aes128Xts, Method::Aes256Xts, Method::Sm4Xts];

        fn key(m: Method, seed: u8) -> Vec<u8> {
            (0..m.key_len()).map(|i| (i as u8).wrapping_mul(73) ^ seed).collect()
        }

        fn cipher(m: Method, iv: u8) -> FileCipher {
            FileCipher::new(m, &key(m, 0x5c), &[iv; 16]).unwrap()
        }

        fn page(seed: u8) -> Vec<u8> {
            (0..8192).map(|i| (i as u8).wrapping_mul(seed) ^ (i >> 8) as u8).collect()
        }

        /// The file layer: unit n = offset / 4096, tweak input = IV + n (little-endian,
        /// wrapping). With IV + n equal to the standard's data unit number, the first bytes
        /// of unit n are the standard's vector (its 512-byte units are the first 32 blocks
        /// of ours).
        #[test]
        fn file_offsets_map_to_ieee1619_units() {
            // Vector 2 (AES-128, unit 0x3333333333), reached as IV 0x3333333000 + unit 0x333.
            let iv = 0x3333333000u128.to_le_bytes();
            let c = FileCipher::new(Method::Aes128Xts, &h(&("11".repeat(16) + &"22".repeat(16))), &iv).unwrap();
            let mut buf = vec![0x44; 32];
            c.encrypt(0x333 * 4096, &mut buf);
            assert_eq!(hex::encode(&buf), "c454185e6a16936e39334038acef838bfb186fff7480adc4289382ecd6d394f0");
            // Vector 10 (AES-256, unit 0xff), first two blocks, IV 0 at offset 0xff * 4096;
            // then the same from IV u128::MAX (wrapping) at unit 0x100.
            let key = h("2718281828459045235360287471352662497757247093699959574966967627
                         3141592653589793238462643383279502884197169399375105820974944592");
            let want = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b";
            for (iv, unit) in [(0u128, 0xffu64), (u128::MAX, 0x100)] {
                let c = FileCipher::new(Method::Aes256Xts, &key, &iv.to_le_bytes()).unwrap();
                let mut buf: Vec<u8> = (0..32).collect();
                c.encrypt(unit * 4096, &mut buf);
                assert_eq!(hex::encode(&buf), want, "iv {iv:#x}");
                c.decrypt(unit * 4096, &mut buf);
                assert_eq!(buf, (0..32).collect::<Vec<u8>>());
            }
        }

        #[test]
        fn block_size_and_predicates() {
            for m in Method::ALL {
                let c = FileCipher::new(m, &key(m, 1), &[0; 16]).unwrap();
                assert_eq!(c.method(), m);
                assert_eq!(c.block_size(), if m.is_xts() { 16 } else { 1 }, "{m}");
                assert_eq!(c.is_xts(), m.is_xts(), "{m}");
            }
            let e = FileCipher::new(Method::Aes256Xts, &[0; 32], &[0; 16]).unwrap_err();
            assert_eq!((e.expected, e.got), (64, 32));
        }

        #[test]
        #[should_panic(expected = "XTS needs encrypt()/decrypt()")]
        fn apply_refuses_xts() {
            cipher(Method::Aes256Xts, 1).apply(0, &mut [0; 16]);
        }

        #[test]
        #[should_panic(expected = "16-byte boundary")]
        fn unaligned_offset_is_refused() {
            cipher(Method::Sm4Xts, 1).encrypt(4104, &mut [0; 16]);
        }

        #[test]
        fn different_files_encrypt_the_same_page_differently() {
            for m in XTS {
                let (a, b) = (cipher(m, 1), cipher(m, 2));
                let (mut x, mut y) = (page(3), page(3));
                a.encrypt(8192, &mut x);
                b.encrypt(8192, &mut y);
                for (cx, cy) in x.chunks(16).zip(y.chunks(16)) {
                    assert_ne!(cx, cy, "{m}: a 16-byte block equal across files");
                }
            }
        }

        #[test]
        fn same_page_same_place_is_deterministic() {
            for m in XTS {
                let c = cipher(m, 1);
                let (mut x, mut y, mut z) = (page(3), page(3), page(3));
                c.encrypt(1 << 20, &mut x);
                cipher(m, 1).encrypt(1 << 20, &mut y);
                assert_eq!(x, y, "{m}: same key, IV, offset and data");
                c.encrypt((1 << 20) + 4096, &mut z);
                assert_ne!(x, z, "{m}: another offset");
                // Within a unit every block position has its own tweak: equal plaintext
                // blocks encrypt differently.
                let mut same = vec![0x77u8; 4096];
                c.encrypt(0, &mut same);
                let mut blocks: Vec<&[u8]> = same.chunks(16).collect();
                blocks.sort();
                blocks.dedup();
                assert_eq!(blocks.len(), 256, "{m}");
            }
        }

        /// Under CTR, E(0) ^ E(P) = P at the same offset: a zero page is the keystream. Under
        /// XTS it is not.
        #[test]
        fn a_zero_page_reveals_no_keystream() {
            for m in XTS {
                let c = cipher(m, 9);
                let p = page(5);
                let (mut cz, mut cp) = (vec![0u8; p.len()], p.clone());
                c.encrypt(40960, &mut cz);
                c.encrypt(40960, &mut cp);
                let xored: Vec<u8> = cz.iter().zip(&cp).map(|(a, b)| a ^ b).collect();
                for (x, q) in xored.chunks(16).zip(p.chunks(16)) {
                    assert_ne!(x, q, "{m}: C(0) ^ C(P) gives a block of P");
                }
            }
            // The same check fails for CTR, as docs/design.md §3 says.
            let c = FileCipher::new(Method::Aes256Ctr, &[1; 32], &[9; 16]).unwrap();
            let p = page(5);
            let (mut cz, mut cp) = (vec![0u8; p.len()], p.clone());
            c.encrypt(40960, &mut cz);
            c.encrypt(40960, &mut cp);
            assert_eq!(cz.iter().zip(&cp).map(|(a, b)| a ^ b).collect::<Vec<u8>>(), p);
        }

        #[test]
        fn tail_mode_round_trips() {
            for m in XTS {
                let c = cipher(m, 4);
                for len in 1..16 {
                    for start in [0u64, 4080, 4096 * 7 + 160] {
                        let body = 32;
                        let pt: Vec<u8> = (0..body + len).map(|i| (i * 11 + len) as u8).collect();
                        let mut buf = pt.clone();
                        c.encrypt(start, &mut buf);
                        assert_ne!(&buf[body..], &pt[body..], "{m}: tail of {len} left as plaintext");
                        // Same as encrypting the body and the tail separately.
                        let mut split = pt.clone();
                        c.encrypt(start, &mut split[..body]);
                        c.encrypt(start + body as u64, &mut split[body..]);
                        assert_eq!(split, buf, "{m} len {len} at {start}");
                        c.decrypt(start, &mut buf);
                        assert_eq!(buf, pt, "{m} len {len} at {start}");
                    }
                }
                // A tail is the prefix of its position's pad: a shorter tail at the same place
                // encrypts to a prefix of a longer one.
                let (mut short, mut long) = ([0xabu8; 5], [0xabu8; 15]);
                c.encrypt(4096 * 3 + 48, &mut short);
                c.encrypt(4096 * 3 + 48, &mut long);
                assert_eq!(short, long[..5], "{m}");
            }
        }

        fn xts_case() -> impl Strategy<Value = (Method, u64, Vec<u8>, Vec<prop::sample::Index>, Vec<u8>, [u8; 16])> {
            (
                prop::sample::select(XTS.to_vec()),
                0u64..(1 << 36),
                proptest::collection::vec(any::<u8>(), 0..10_000),
                proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
                proptest::collection::vec(any::<u8>(), 64),
                any::<[u8; 16]>(),
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

            // Encrypting a range in 16-aligned pieces (across units, from mid-unit, with a
            // tail at the end) equals encrypting it whole; decrypting, in other pieces, gives
            // the plaintext back.
            #[test]
            fn xts_pieces_equal_whole((method, start_block, data, cuts, key, iv) in xts_case()) {
                let c = FileCipher::new(method, &key[..method.key_len()], &iv).unwrap();
                let start = start_block * 16;
                let mut whole = data.clone();
                c.encrypt(start, &mut whole);
                let mut points: Vec<usize> = cuts.iter().map(|i| i.index(data.len() / 16 + 1) * 16).collect();
                points.extend([0, data.len()]);
                points.sort();
                let mut pieces = data.clone();
                for w in points.windows(2) {
                    c.encrypt(start + w[0] as u64, &mut pieces[w[0]..w[1]]);
                }
                prop_assert_eq!(&pieces, &whole);
                if data.len() >= 16 {
                    prop_assert_ne!(&whole[..16], &data[..16]);
                }
                points.reverse();
                for w in points.windows(2) {
                    c.decrypt(start + w[1] as u64, &mut pieces[w[1]..w[0]]);
                }
                prop_assert_eq!(&pieces, &data);
            }
        }
    }

    /// A split cipher is its two ciphers side by side: every range, cut at the watermark,
    /// encrypts as the part below under one and the rest under the other, for every pair
    /// of methods (plaintext, CTR and XTS, with a tail at the end of the range).
    #[test]
    fn split_is_the_two_ciphers_side_by_side() {
        let methods = [Method::Plaintext, Method::Aes256Ctr, Method::Sm4Ctr, Method::Aes256Xts, Method::Sm4Xts];
        let make = |m: Method, seed: u8| {
            let key: Vec<u8> = (0..m.key_len()).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
            FileCipher::new(m, &key, &[seed; 16]).unwrap()
        };
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for &a in &methods {
            for &b in &methods {
                let (below, above) = (make(a, 1), make(b, 2));
                for at in [0u64, 4096, 8192, 16384, 1 << 20] {
                    let s = FileCipher::split(below.clone(), above.clone(), at);
                    assert_eq!(s.block_size(), a.block_size().max(b.block_size()));
                    assert_eq!(s.is_plaintext(), a.is_plaintext() && b.is_plaintext());
                    for (off, len) in [(0u64, 20_000usize), (4096, 8192), (6144, 3), (8192, 5000), (16, 9000)] {
                        let range = &data[..len];
                        let mut got = range.to_vec();
                        s.encrypt(off, &mut got);
                        let mut want = range.to_vec();
                        let cut = (at.saturating_sub(off) as usize).min(len);
                        let (lo, hi) = want.split_at_mut(cut);
                        if !lo.is_empty() {
                            below.encrypt(off, lo);
                        }
                        if !hi.is_empty() {
                            above.encrypt(off + cut as u64, hi);
                        }
                        assert_eq!(got, want, "{a} | {b} at {at}, range {off}+{len}");
                        s.decrypt(off, &mut got);
                        assert_eq!(got, range, "{a} | {b} at {at}, range {off}+{len}: round trip");
                    }
                }
            }
        }
    }
}
