use std::fmt;

use ctr::cipher::{BlockCipher, BlockEncrypt, InnerIvInit, KeyInit, StreamCipher, StreamCipherSeek};
use ctr::cipher::consts::U16;
use zeroize::Zeroize;

use super::{Iv, Method};

/// A file's stream cipher: method + expanded data key + IV. Stateless between calls: the
/// counter is derived from the byte offset on every call (a short write can never
/// desynchronise it), so any offset can be encrypted or decrypted independently.
///
/// Keystream for byte `o` is byte `o % 16` of `E(key, IV + o/16)` with a wrapping 128-bit
/// big-endian add: the layout of DESIGN.md §3, identical to OpenSSL's `*-ctr`.
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
    Sm4(super::sm4::Sm4),
}

#[derive(Debug, thiserror::Error)]
#[error("{method} needs a {expected}-byte key, got {got} bytes")]
pub struct BadKeyLength {
    pub method: Method,
    pub expected: usize,
    pub got: usize,
}

impl FileCipher {
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
            Method::Sm4Ctr => Inner::Sm4(super::sm4::Sm4::new(key.try_into().map_err(|_| bad())?)),
        };
        Ok(FileCipher { iv: *iv, inner })
    }

    pub fn plaintext() -> FileCipher {
        FileCipher { iv: [0; 16], inner: Inner::Plain }
    }

    pub fn method(&self) -> Method {
        match self.inner {
            Inner::Plain => Method::Plaintext,
            Inner::Aes128(_) => Method::Aes128Ctr,
            Inner::Aes192(_) => Method::Aes192Ctr,
            Inner::Aes256(_) => Method::Aes256Ctr,
            Inner::Sm4(_) => Method::Sm4Ctr,
        }
    }

    pub fn is_plaintext(&self) -> bool {
        matches!(self.inner, Inner::Plain)
    }

    /// XOR the keystream for file bytes `[offset, offset + buf.len())` into `buf`:
    /// encrypts plaintext and decrypts ciphertext alike.
    pub fn apply(&self, offset: u64, buf: &mut [u8]) {
        match &self.inner {
            Inner::Plain => {}
            Inner::Aes128(c) => xor_keystream(c, &self.iv, offset, buf),
            Inner::Aes192(c) => xor_keystream(c, &self.iv, offset, buf),
            Inner::Aes256(c) => xor_keystream(c, &self.iv, offset, buf),
            Inner::Sm4(c) => sm4_keystream(c, &self.iv, offset, buf),
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

/// Keystream blocks per SM4 call: two full 16-block passes of the AES-NI backend; small
/// enough to stay in L1 beside the data.
const SM4_BATCH: usize = 32;

/// CTR over SM4: the same counter layout as `xor_keystream`, counter blocks encrypted in
/// batches.
fn sm4_keystream(c: &super::sm4::Sm4, iv: &Iv, offset: u64, buf: &mut [u8]) {
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

        proptest! {
            // Encrypting a buffer in pieces at arbitrary offsets equals encrypting it whole.
            #[test]
            fn pieces_equal_whole(
                method_idx in 0usize..5,
                key in proptest::collection::vec(any::<u8>(), 32),
                iv in any::<[u8; 16]>(),
                start in 0u64..(1 << 40),
                data in proptest::collection::vec(any::<u8>(), 0..3000),
                cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
            ) {
                let method = Method::ALL[method_idx];
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
                if method.is_plaintext() {
                    prop_assert_eq!(&whole, &data);
                } else if data.len() >= 16 {
                    prop_assert_ne!(&whole, &data);
                }
            }
        }
    }
}
