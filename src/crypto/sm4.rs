//! SM4 (GB/T 32907-2016) block cipher for the CTR and XTS data paths, in constant time: no
//! memory access and no branch depends on a key or data byte.
//!
//! The SM4 S-box is affine-equivalent to the AES S-box: `S_sm4(x) = A2(S_aes(A1(x)))` for two
//! affine maps over GF(2)^8 (Saarinen, "sm4ni", 2018; the technique of the Linux kernel's
//! `arch/x86/crypto/sm4-aesni-avx-asm_64.S` and of libgcrypt). Three backends, the best the CPU
//! runs picked once per key:
//! - **x86_64 with AES-NI and SSSE3**: four blocks per 128-bit register with their words
//!   transposed, four registers (sixteen blocks) in flight. Each affine map is two 16-entry
//!   `PSHUFB` nibble lookups (the tables live in registers: the secret is the *shuffle
//!   control*, not a memory address) and `S_aes` is `AESENCLAST` with a zero round key, whose
//!   ShiftRows is undone by the `PSHUFB` that also does the round function's byte rotations.
//! - **x86_64 with AES-NI and AVX2**: the same on 256-bit registers, eight blocks each, four
//!   in flight (32 blocks); `AESENCLAST` runs on each 128-bit half. About 1.7x the SSE path.
//! - **portable**: the same composition computed arithmetically in 64-bit SWAR lanes (eight
//!   bytes at once): the affine maps as masked XORs of matrix columns, the GF(2^8) inversion
//!   inside `S_aes` as `x^254` by shift-and-add multiplications. Slow (a few MB/s) and only
//!   used where AES-NI is missing.
//!
//! Decryption is the same 32 rounds with the round keys in reverse order. The round keys are
//! zeroized on drop.

use zeroize::Zeroize;

// ---- The affine maps, from public sources; `tests::affine_constants_give_the_sm4_sbox`
// proves them for all 256 inputs. ----

/// Bytes of two little-endian quadwords: the layout of the kernel's `.quad a, b` tables.
const fn quads(a: u64, b: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        t[i] = (a >> (8 * i)) as u8;
        t[8 + i] = (b >> (8 * i)) as u8;
        i += 1;
    }
    t
}

/// `A1` (SM4 field to AES field) as nibble tables: `A1(x) = PRE_LO[x & 15] ^ PRE_HI[x >> 4]`.
/// Linux `sm4-aesni-avx-asm_64.S`, `.Lpre_tf_lo_s` / `.Lpre_tf_hi_s`.
const PRE_LO: [u8; 16] = quads(0x9197E2E474720701, 0xC7C1B4B222245157);
const PRE_HI: [u8; 16] = quads(0xE240AB09EB49A200, 0xF052B91BF95BB012);
/// `A2` (AES field to SM4 field), `.Lpost_tf_lo_s` / `.Lpost_tf_hi_s`. (The kernel runs
/// AESENCLAST with a 0x0f round key and complements the low nibble back with `vpandn`; with a
/// zero round key and a plain AND, as here, the same tables apply.)
const POST_LO: [u8; 16] = quads(0x5B67F2CEA19D0834, 0xEDD14478172BBE82);
const POST_HI: [u8; 16] = quads(0xAE7201DD73AFDC00, 0x11CDBE62CC1063BF);

const fn nib(lo: &[u8; 16], hi: &[u8; 16], x: u8) -> u8 {
    lo[(x & 15) as usize] ^ hi[(x >> 4) as usize]
}

/// An affine map over GF(2)^8 as columns: `f(x) = c ^ XOR{cols[i] : bit i of x set}`.
#[derive(Clone, Copy)]
struct Affine {
    cols: [u8; 8],
    c: u8,
}

/// The affine map that a pair of nibble tables computes.
const fn affine_of_nibbles(lo: &[u8; 16], hi: &[u8; 16]) -> Affine {
    let c = nib(lo, hi, 0);
    let mut cols = [0u8; 8];
    let mut i = 0;
    while i < 8 {
        cols[i] = nib(lo, hi, 1 << i) ^ c;
        i += 1;
    }
    Affine { cols, c }
}

/// GF(2^8) product modulo the AES polynomial x^8 + x^4 + x^3 + x + 1 (compile time only).
const fn gf_mul(mut a: u8, mut b: u8) -> u8 {
    let mut r = 0u8;
    while b != 0 {
        if b & 1 != 0 {
            r ^= a;
        }
        a = (a << 1) ^ if a & 0x80 != 0 { 0x1b } else { 0 };
        b >>= 1;
    }
    r
}

const fn gf_pow(a: u8, mut e: u32) -> u8 {
    let mut r = 1u8;
    let mut base = a;
    while e != 0 {
        if e & 1 != 0 {
            r = gf_mul(r, base);
        }
        base = gf_mul(base, base);
        e >>= 1;
    }
    r
}

/// The (linear) map `x -> x^(2^k)`: squaring is GF(2)-linear in characteristic 2.
const fn frobenius(k: u32) -> Affine {
    let mut cols = [0u8; 8];
    let mut i = 0;
    while i < 8 {
        cols[i] = gf_pow(1 << i, 1 << k);
        i += 1;
    }
    Affine { cols, c: 0 }
}

/// The AES S-box's affine output map (FIPS 197 §5.1.1).
const fn aes_affine(v: u8) -> u8 {
    v ^ v.rotate_left(1) ^ v.rotate_left(2) ^ v.rotate_left(3) ^ v.rotate_left(4) ^ 0x63
}

/// `A2 ∘ aes_affine`: what follows the GF(2^8) inversion in the portable S-box.
const fn post_with_aes_affine() -> Affine {
    let c = nib(&POST_LO, &POST_HI, aes_affine(0));
    let mut cols = [0u8; 8];
    let mut i = 0;
    while i < 8 {
        cols[i] = nib(&POST_LO, &POST_HI, aes_affine(1 << i)) ^ c;
        i += 1;
    }
    Affine { cols, c }
}

const A1: Affine = affine_of_nibbles(&PRE_LO, &PRE_HI);
const B: Affine = post_with_aes_affine();
const SQ: Affine = frobenius(1);
const P4: Affine = frobenius(2);
const P16: Affine = frobenius(4);

// ---- Portable backend: eight S-box lanes in a u64, no table lookups. ----

const LANES: u64 = 0x0101_0101_0101_0101;

#[inline(always)]
fn swar_affine(x: u64, f: &Affine) -> u64 {
    let mut r = f.c as u64 * LANES;
    let mut i = 0;
    while i < 8 {
        // Bit i of each lane (0 or 1) times the column: no carries between lanes.
        r ^= ((x >> i) & LANES) * f.cols[i] as u64;
        i += 1;
    }
    r
}

#[inline(always)]
fn swar_mul(mut a: u64, b: u64) -> u64 {
    let mut r = 0;
    let mut i = 0;
    while i < 8 {
        r ^= a & (((b >> i) & LANES) * 0xff);
        a = ((a & 0x7f7f_7f7f_7f7f_7f7f) << 1) ^ (((a >> 7) & LANES) * 0x1b);
        i += 1;
    }
    r
}

/// The SM4 S-box on each byte of `x`.
#[inline(always)]
fn swar_sbox(x: u64) -> u64 {
    let a = swar_affine(x, &A1);
    // a^254 = a^-1 (0 for 0): a^2, a^3, a^12, a^15, a^240, a^252, a^254.
    let a2 = swar_affine(a, &SQ);
    let a3 = swar_mul(a2, a);
    let a12 = swar_affine(a3, &P4);
    let a15 = swar_mul(a12, a3);
    let a240 = swar_affine(a15, &P16);
    let a252 = swar_mul(a240, a12);
    let inv = swar_mul(a252, a2);
    swar_affine(inv, &B)
}

/// The round function's linear transform L.
#[inline(always)]
fn l(b: u32) -> u32 {
    b ^ b.rotate_left(2) ^ b.rotate_left(10) ^ b.rotate_left(18) ^ b.rotate_left(24)
}

/// Round transform T = L(tau(x)) on two words at once (high and low halves).
#[inline(always)]
fn t2(x: u64) -> u64 {
    let s = swar_sbox(x);
    ((l((s >> 32) as u32) as u64) << 32) | l(s as u32) as u64
}

fn crypt_portable(rk: &[u32; 32], blocks: &mut [[u8; 16]]) {
    // Two blocks per pass, one in each half of the u64 lanes.
    for pair in blocks.chunks_mut(2) {
        let second = pair.get(1).copied().unwrap_or([0; 16]);
        let w = |b: &[u8; 16], i: usize| u32::from_be_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]) as u64;
        let mut x = [0u64; 4];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (w(&pair[0], i) << 32) | w(&second, i);
        }
        let [mut x0, mut x1, mut x2, mut x3] = x;
        for r in rk.chunks_exact(4) {
            let k = |i: usize| r[i] as u64 * 0x1_0000_0001;
            x0 ^= t2(x1 ^ x2 ^ x3 ^ k(0));
            x1 ^= t2(x2 ^ x3 ^ x0 ^ k(1));
            x2 ^= t2(x3 ^ x0 ^ x1 ^ k(2));
            x3 ^= t2(x0 ^ x1 ^ x2 ^ k(3));
        }
        let out = [x3, x2, x1, x0];
        for (j, block) in pair.iter_mut().enumerate() {
            let shift = if j == 0 { 32 } else { 0 };
            for (i, v) in out.iter().enumerate() {
                block[4 * i..4 * i + 4].copy_from_slice(&((v >> shift) as u32).to_be_bytes());
            }
        }
    }
}

// ---- AES-NI backend. ----

#[cfg(target_arch = "x86_64")]
mod ni {
    use core::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("aes") && is_x86_feature_detected!("ssse3")
    }

    /// ShiftRows moves byte `r + 4c` of the AES state to `r + 4(c - r)`; this `PSHUFB`
    /// control undoes it, then rotates each 32-bit little-endian word left by `rot` bits.
    const fn inv_shift_rows_rol(rot: usize) -> [u8; 16] {
        let mut m = [0u8; 16];
        let mut i = 0;
        while i < 16 {
            let (c, k) = (i / 4, i % 4);
            // Rotating a little-endian word left by 8n bits takes byte k from byte k - n.
            let src = 4 * c + (k + 4 - rot / 8) % 4;
            let (r, c2) = (src % 4, src / 4);
            m[i] = (r + 4 * ((c2 + 4 - r) % 4)) as u8;
            i += 1;
        }
        m
    }
    pub(super) const ISR: [u8; 16] = inv_shift_rows_rol(0);
    pub(super) const ISR8: [u8; 16] = inv_shift_rows_rol(8);
    pub(super) const ISR16: [u8; 16] = inv_shift_rows_rol(16);
    pub(super) const ISR24: [u8; 16] = inv_shift_rows_rol(24);
    /// Big-endian words of a block to little-endian lanes (and back).
    pub(super) const BSWAP32: [u8; 16] = [3, 2, 1, 0, 7, 6, 5, 4, 11, 10, 9, 8, 15, 14, 13, 12];

    #[derive(Clone, Copy)]
    struct K {
        pre_lo: __m128i,
        pre_hi: __m128i,
        post_lo: __m128i,
        post_hi: __m128i,
        m0f: __m128i,
        isr: __m128i,
        isr8: __m128i,
        isr16: __m128i,
        isr24: __m128i,
        bswap: __m128i,
    }

    #[inline]
    #[target_feature(enable = "aes,ssse3")]
    unsafe fn ld(t: &[u8; 16]) -> __m128i {
        _mm_loadu_si128(t.as_ptr().cast())
    }

    #[inline]
    #[target_feature(enable = "aes,ssse3")]
    unsafe fn consts() -> K {
        K {
            pre_lo: ld(&super::PRE_LO),
            pre_hi: ld(&super::PRE_HI),
            post_lo: ld(&super::POST_LO),
            post_hi: ld(&super::POST_HI),
            m0f: _mm_set1_epi8(0x0f),
            isr: ld(&ISR),
            isr8: ld(&ISR8),
            isr16: ld(&ISR16),
            isr24: ld(&ISR24),
            bswap: ld(&BSWAP32),
        }
    }

    /// `lo[x & 15] ^ hi[x >> 4]` on each byte, tables in registers.
    #[inline]
    #[target_feature(enable = "aes,ssse3")]
    unsafe fn nibble_map(k: &K, lo: __m128i, hi: __m128i, x: __m128i) -> __m128i {
        let l = _mm_and_si128(x, k.m0f);
        let h = _mm_and_si128(_mm_srli_epi32(x, 4), k.m0f);
        _mm_xor_si128(_mm_shuffle_epi8(lo, l), _mm_shuffle_epi8(hi, h))
    }

    /// ShiftRows(S_sm4(x)) on each byte: A2(SubBytes(A1(x))) with AESENCLAST's ShiftRows left
    /// for the caller's `PSHUFB` to undo (bytewise maps commute with byte permutations).
    #[inline]
    #[target_feature(enable = "aes,ssse3")]
    unsafe fn sbox_shifted(k: &K, x: __m128i) -> __m128i {
        let y = nibble_map(k, k.pre_lo, k.pre_hi, x);
        let y = _mm_aesenclast_si128(y, _mm_setzero_si128());
        nibble_map(k, k.post_lo, k.post_hi, y)
    }

    /// The round transform T(x) = L(tau(x)) on four words.
    #[inline]
    #[target_feature(enable = "aes,ssse3")]
    unsafe fn t(k: &K, x: __m128i) -> __m128i {
        let z = sbox_shifted(k, x);
        let s = _mm_shuffle_epi8(z, k.isr);
        let r8 = _mm_shuffle_epi8(z, k.isr8);
        let r16 = _mm_shuffle_epi8(z, k.isr16);
        let r24 = _mm_shuffle_epi8(z, k.isr24);
        // s ^ (s <<< 2) ^ (s <<< 10) ^ (s <<< 18) ^ (s <<< 24)
        let u = _mm_xor_si128(_mm_xor_si128(s, r8), r16);
        let rot2 = _mm_or_si128(_mm_slli_epi32(u, 2), _mm_srli_epi32(u, 30));
        _mm_xor_si128(_mm_xor_si128(s, r24), rot2)
    }

    /// tau (the S-box on each byte) of one word, for the key schedule.
    #[target_feature(enable = "aes,ssse3")]
    pub unsafe fn tau(x: u32) -> u32 {
        let k = consts();
        let z = sbox_shifted(&k, _mm_set1_epi32(x as i32));
        _mm_cvtsi128_si32(_mm_shuffle_epi8(z, k.isr)) as u32
    }

    /// 4x4 transpose of 32-bit lanes (its own inverse).
    #[inline]
    #[target_feature(enable = "aes,ssse3")]
    unsafe fn transpose(x: [__m128i; 4]) -> [__m128i; 4] {
        let t0 = _mm_unpacklo_epi32(x[0], x[1]);
        let t1 = _mm_unpacklo_epi32(x[2], x[3]);
        let t2 = _mm_unpackhi_epi32(x[0], x[1]);
        let t3 = _mm_unpackhi_epi32(x[2], x[3]);
        [_mm_unpacklo_epi64(t0, t1), _mm_unpackhi_epi64(t0, t1), _mm_unpacklo_epi64(t2, t3), _mm_unpackhi_epi64(t2, t3)]
    }

    /// 4·N blocks at `p`: N groups of four, interleaved so the AESENCLAST latencies overlap.
    #[inline]
    #[target_feature(enable = "aes,ssse3")]
    unsafe fn crypt_groups<const N: usize>(k: &K, rk: &[u32; 32], p: *mut [u8; 16]) {
        let mut x = [[_mm_setzero_si128(); 4]; N];
        for (g, xg) in x.iter_mut().enumerate() {
            let mut b = [_mm_setzero_si128(); 4];
            for (i, bi) in b.iter_mut().enumerate() {
                *bi = _mm_shuffle_epi8(_mm_loadu_si128(p.add(4 * g + i).cast()), k.bswap);
            }
            *xg = transpose(b);
        }
        for r in rk.chunks_exact(4) {
            for i in 0..4 {
                let key = _mm_set1_epi32(r[i] as i32);
                for xg in x.iter_mut() {
                    let a = _mm_xor_si128(_mm_xor_si128(xg[(i + 1) % 4], xg[(i + 2) % 4]), _mm_xor_si128(xg[(i + 3) % 4], key));
                    xg[i] = _mm_xor_si128(xg[i], t(k, a));
                }
            }
        }
        for (g, xg) in x.iter().enumerate() {
            let b = transpose([xg[3], xg[2], xg[1], xg[0]]);
            for (i, bi) in b.iter().enumerate() {
                _mm_storeu_si128(p.add(4 * g + i).cast(), _mm_shuffle_epi8(*bi, k.bswap));
            }
        }
    }

    /// Blocks per pass: four groups of four. With fewer groups the round function's
    /// dependency chain (two PSHUFB maps around AESENCLAST, then L) leaves the ports idle:
    /// measured, 16 blocks in flight run about twice as fast as 8.
    const PASS: usize = 16;

    #[target_feature(enable = "aes,ssse3")]
    pub unsafe fn crypt(rk: &[u32; 32], blocks: &mut [[u8; 16]]) {
        let k = consts();
        let mut chunks = blocks.chunks_exact_mut(PASS);
        for c in &mut chunks {
            crypt_groups::<4>(&k, rk, c.as_mut_ptr());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let mut tmp = [[0u8; 16]; PASS];
            tmp[..rest.len()].copy_from_slice(rest);
            match rest.len() {
                1..=4 => crypt_groups::<1>(&k, rk, tmp.as_mut_ptr()),
                5..=8 => crypt_groups::<2>(&k, rk, tmp.as_mut_ptr()),
                _ => crypt_groups::<4>(&k, rk, tmp.as_mut_ptr()),
            }
            rest.copy_from_slice(&tmp[..rest.len()]);
            zeroize::Zeroize::zeroize(&mut tmp);
        }
    }
}

// ---- AVX2 + AES-NI backend: the same rounds on 256-bit registers (eight blocks each). ----

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use core::arch::x86_64::*;

    pub fn available() -> bool {
        super::ni::available() && is_x86_feature_detected!("avx2")
    }

    #[derive(Clone, Copy)]
    struct K {
        pre_lo: __m256i,
        pre_hi: __m256i,
        post_lo: __m256i,
        post_hi: __m256i,
        m0f: __m256i,
        isr: __m256i,
        isr8: __m256i,
        isr16: __m256i,
        isr24: __m256i,
        bswap: __m256i,
    }

    #[inline]
    #[target_feature(enable = "aes,avx2")]
    unsafe fn bcast(t: &[u8; 16]) -> __m256i {
        _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr().cast()))
    }

    #[inline]
    #[target_feature(enable = "aes,avx2")]
    unsafe fn consts() -> K {
        K {
            pre_lo: bcast(&super::PRE_LO),
            pre_hi: bcast(&super::PRE_HI),
            post_lo: bcast(&super::POST_LO),
            post_hi: bcast(&super::POST_HI),
            m0f: _mm256_set1_epi8(0x0f),
            isr: bcast(&super::ni::ISR),
            isr8: bcast(&super::ni::ISR8),
            isr16: bcast(&super::ni::ISR16),
            isr24: bcast(&super::ni::ISR24),
            bswap: bcast(&super::ni::BSWAP32),
        }
    }

    #[inline]
    #[target_feature(enable = "aes,avx2")]
    unsafe fn nibble_map(k: &K, lo: __m256i, hi: __m256i, x: __m256i) -> __m256i {
        let l = _mm256_and_si256(x, k.m0f);
        let h = _mm256_and_si256(_mm256_srli_epi32(x, 4), k.m0f);
        _mm256_xor_si256(_mm256_shuffle_epi8(lo, l), _mm256_shuffle_epi8(hi, h))
    }

    /// As `ni::t`; AESENCLAST on each 128-bit half (VAES would do both at once, but its
    /// intrinsics need a newer Rust than this crate's minimum).
    #[inline]
    #[target_feature(enable = "aes,avx2")]
    unsafe fn t(k: &K, x: __m256i) -> __m256i {
        let y = nibble_map(k, k.pre_lo, k.pre_hi, x);
        let zero = _mm_setzero_si128();
        let lo = _mm_aesenclast_si128(_mm256_castsi256_si128(y), zero);
        let hi = _mm_aesenclast_si128(_mm256_extracti128_si256(y, 1), zero);
        let y = _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
        let z = nibble_map(k, k.post_lo, k.post_hi, y);
        let s = _mm256_shuffle_epi8(z, k.isr);
        let r8 = _mm256_shuffle_epi8(z, k.isr8);
        let r16 = _mm256_shuffle_epi8(z, k.isr16);
        let r24 = _mm256_shuffle_epi8(z, k.isr24);
        let u = _mm256_xor_si256(_mm256_xor_si256(s, r8), r16);
        let rot2 = _mm256_or_si256(_mm256_slli_epi32(u, 2), _mm256_srli_epi32(u, 30));
        _mm256_xor_si256(_mm256_xor_si256(s, r24), rot2)
    }

    #[inline]
    #[target_feature(enable = "aes,avx2")]
    unsafe fn transpose(x: [__m256i; 4]) -> [__m256i; 4] {
        let t0 = _mm256_unpacklo_epi32(x[0], x[1]);
        let t1 = _mm256_unpacklo_epi32(x[2], x[3]);
        let t2 = _mm256_unpackhi_epi32(x[0], x[1]);
        let t3 = _mm256_unpackhi_epi32(x[2], x[3]);
        [
            _mm256_unpacklo_epi64(t0, t1),
            _mm256_unpackhi_epi64(t0, t1),
            _mm256_unpacklo_epi64(t2, t3),
            _mm256_unpackhi_epi64(t2, t3),
        ]
    }

    /// 8·N blocks at `p`; group g holds blocks 8g..8g+3 in its low halves and 8g+4..8g+7 in
    /// its high halves.
    #[inline]
    #[target_feature(enable = "aes,avx2")]
    unsafe fn crypt_groups<const N: usize>(k: &K, rk: &[u32; 32], p: *mut [u8; 16]) {
        let mut x = [[_mm256_setzero_si256(); 4]; N];
        for (g, xg) in x.iter_mut().enumerate() {
            let mut b = [_mm256_setzero_si256(); 4];
            for (i, bi) in b.iter_mut().enumerate() {
                let lo = _mm_loadu_si128(p.add(8 * g + i).cast());
                let hi = _mm_loadu_si128(p.add(8 * g + 4 + i).cast());
                *bi = _mm256_shuffle_epi8(_mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1), k.bswap);
            }
            *xg = transpose(b);
        }
        for r in rk.chunks_exact(4) {
            for i in 0..4 {
                let key = _mm256_set1_epi32(r[i] as i32);
                for xg in x.iter_mut() {
                    let a = _mm256_xor_si256(
                        _mm256_xor_si256(xg[(i + 1) % 4], xg[(i + 2) % 4]),
                        _mm256_xor_si256(xg[(i + 3) % 4], key),
                    );
                    xg[i] = _mm256_xor_si256(xg[i], t(k, a));
                }
            }
        }
        for (g, xg) in x.iter().enumerate() {
            let b = transpose([xg[3], xg[2], xg[1], xg[0]]);
            for (i, bi) in b.iter().enumerate() {
                let v = _mm256_shuffle_epi8(*bi, k.bswap);
                _mm_storeu_si128(p.add(8 * g + i).cast(), _mm256_castsi256_si128(v));
                _mm_storeu_si128(p.add(8 * g + 4 + i).cast(), _mm256_extracti128_si256(v, 1));
            }
        }
    }

    /// Blocks per pass: GROUPS registers of eight. Measured at 64 KiB: 2 groups run no faster
    /// than the SSE path, 4 groups 1.7x; the CTR and XTS batches are 32 blocks to match.
    const GROUPS: usize = 4;
    const PASS: usize = 8 * GROUPS;

    #[target_feature(enable = "aes,avx2")]
    pub unsafe fn crypt(rk: &[u32; 32], blocks: &mut [[u8; 16]]) {
        let k = consts();
        let mut chunks = blocks.chunks_exact_mut(PASS);
        for c in &mut chunks {
            crypt_groups::<GROUPS>(&k, rk, c.as_mut_ptr());
        }
        // The rest (fewer than PASS blocks) on 128-bit registers.
        super::ni::crypt(rk, chunks.into_remainder());
    }
}

// ---- The cipher. ----

/// Which implementation runs the rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backend {
    Portable,
    #[cfg(target_arch = "x86_64")]
    AesNi,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Backend {
    /// The fastest constant-time backend this CPU supports.
    pub(crate) fn detect() -> Backend {
        #[cfg(target_arch = "x86_64")]
        if avx2::available() {
            return Backend::Avx2;
        }
        #[cfg(target_arch = "x86_64")]
        if ni::available() {
            return Backend::AesNi;
        }
        Backend::Portable
    }

    /// Whether this CPU can run the backend (the precondition of its `unsafe` calls).
    fn available(self) -> bool {
        match self {
            Backend::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi => ni::available(),
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => avx2::available(),
        }
    }

    /// Every backend this CPU can run (the tests check each against the reference).
    #[cfg(test)]
    pub(crate) fn all() -> Vec<Backend> {
        let mut v = vec![Backend::Portable];
        #[cfg(target_arch = "x86_64")]
        v.extend([Backend::AesNi, Backend::Avx2]);
        v.retain(|b| b.available());
        v
    }

    fn tau(self, x: u32) -> u32 {
        match self {
            Backend::Portable => swar_sbox(x as u64) as u32,
            // SAFETY: only called with available backends (`with_backend` asserts it, the tests
            // take theirs from `all()`); `avx2::available()` implies `ni::available()`.
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi | Backend::Avx2 => unsafe { ni::tau(x) },
        }
    }
}

const FK: [u32; 4] = [0xa3b1bac6, 0x56aa3350, 0x677d9197, 0xb27022dc];

/// CK[i] = bytes (4i + j) * 7 mod 256, j = 0..3, big-endian.
const fn ck(i: usize) -> u32 {
    let mut v = 0u32;
    let mut j = 0;
    while j < 4 {
        v = (v << 8) | (((4 * i + j) * 7) % 256) as u32;
        j += 1;
    }
    v
}

/// An expanded SM4 key: 32 round keys in encryption order and in decryption order, zeroized
/// on drop.
#[derive(Clone)]
pub struct Sm4 {
    enc: [u32; 32],
    dec: [u32; 32],
    backend: Backend,
}

impl Drop for Sm4 {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.dec.zeroize();
    }
}

impl Sm4 {
    pub fn new(key: &[u8; 16]) -> Sm4 {
        Sm4::with_backend(key, Backend::detect())
    }

    /// # Panics
    /// If this CPU cannot run `backend`.
    pub(crate) fn with_backend(key: &[u8; 16], backend: Backend) -> Sm4 {
        assert!(backend.available(), "SM4 backend {backend:?} needs CPU features this machine lacks");
        let mut k = [0u32; 4];
        for (i, w) in k.iter_mut().enumerate() {
            *w = u32::from_be_bytes([key[4 * i], key[4 * i + 1], key[4 * i + 2], key[4 * i + 3]]) ^ FK[i];
        }
        let mut enc = [0u32; 32];
        for (i, r) in enc.iter_mut().enumerate() {
            // T': the S-box, then L'(B) = B ^ (B <<< 13) ^ (B <<< 23).
            let b = backend.tau(k[1] ^ k[2] ^ k[3] ^ ck(i));
            let next = k[0] ^ b ^ b.rotate_left(13) ^ b.rotate_left(23);
            k = [k[1], k[2], k[3], next];
            *r = next;
        }
        k.zeroize();
        let mut dec = enc;
        dec.reverse();
        Sm4 { enc, dec, backend }
    }

    #[cfg(test)]
    pub(crate) fn backend(&self) -> Backend {
        self.backend
    }

    /// Encrypt blocks in place; batches of 32 (AVX2) or 16 (SSE) run at full speed.
    pub fn encrypt_blocks(&self, blocks: &mut [[u8; 16]]) {
        self.crypt(&self.enc, blocks);
    }

    /// Decrypt blocks in place.
    pub fn decrypt_blocks(&self, blocks: &mut [[u8; 16]]) {
        self.crypt(&self.dec, blocks);
    }

    /// Encrypt one block.
    #[cfg(test)]
    pub fn encrypt(&self, block: [u8; 16]) -> [u8; 16] {
        let mut b = [block];
        self.encrypt_blocks(&mut b);
        b[0]
    }

    fn crypt(&self, rk: &[u32; 32], blocks: &mut [[u8; 16]]) {
        match self.backend {
            Backend::Portable => crypt_portable(rk, blocks),
            // SAFETY: as in `Backend::tau`: `self.backend` passed `available()` in `with_backend`.
            #[cfg(target_arch = "x86_64")]
            Backend::AesNi => unsafe { ni::crypt(rk, blocks) },
            #[cfg(target_arch = "x86_64")]
            Backend::Avx2 => unsafe { avx2::crypt(rk, blocks) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::sm4::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
    use proptest::prelude::*;

    /// GB/T 32907-2016 §6.2.1: the S-box as the standard prints it.
    const SBOX: [u8; 256] = [
        0xd6, 0x90, 0xe9, 0xfe, 0xcc, 0xe1, 0x3d, 0xb7, 0x16, 0xb6, 0x14, 0xc2, 0x28, 0xfb, 0x2c, 0x05,
        0x2b, 0x67, 0x9a, 0x76, 0x2a, 0xbe, 0x04, 0xc3, 0xaa, 0x44, 0x13, 0x26, 0x49, 0x86, 0x06, 0x99,
        0x9c, 0x42, 0x50, 0xf4, 0x91, 0xef, 0x98, 0x7a, 0x33, 0x54, 0x0b, 0x43, 0xed, 0xcf, 0xac, 0x62,
        0xe4, 0xb3, 0x1c, 0xa9, 0xc9, 0x08, 0xe8, 0x95, 0x80, 0xdf, 0x94, 0xfa, 0x75, 0x8f, 0x3f, 0xa6,
        0x47, 0x07, 0xa7, 0xfc, 0xf3, 0x73, 0x17, 0xba, 0x83, 0x59, 0x3c, 0x19, 0xe6, 0x85, 0x4f, 0xa8,
        0x68, 0x6b, 0x81, 0xb2, 0x71, 0x64, 0xda, 0x8b, 0xf8, 0xeb, 0x0f, 0x4b, 0x70, 0x56, 0x9d, 0x35,
        0x1e, 0x24, 0x0e, 0x5e, 0x63, 0x58, 0xd1, 0xa2, 0x25, 0x22, 0x7c, 0x3b, 0x01, 0x21, 0x78, 0x87,
        0xd4, 0x00, 0x46, 0x57, 0x9f, 0xd3, 0x27, 0x52, 0x4c, 0x36, 0x02, 0xe7, 0xa0, 0xc4, 0xc8, 0x9e,
        0xea, 0xbf, 0x8a, 0xd2, 0x40, 0xc7, 0x38, 0xb5, 0xa3, 0xf7, 0xf2, 0xce, 0xf9, 0x61, 0x15, 0xa1,
        0xe0, 0xae, 0x5d, 0xa4, 0x9b, 0x34, 0x1a, 0x55, 0xad, 0x93, 0x32, 0x30, 0xf5, 0x8c, 0xb1, 0xe3,
        0x1d, 0xf6, 0xe2, 0x2e, 0x82, 0x66, 0xca, 0x60, 0xc0, 0x29, 0x23, 0xab, 0x0d, 0x53, 0x4e, 0x6f,
        0xd5, 0xdb, 0x37, 0x45, 0xde, 0xfd, 0x8e, 0x2f, 0x03, 0xff, 0x6a, 0x72, 0x6d, 0x6c, 0x5b, 0x51,
        0x8d, 0x1b, 0xaf, 0x92, 0xbb, 0xdd, 0xbc, 0x7f, 0x11, 0xd9, 0x5c, 0x41, 0x1f, 0x10, 0x5a, 0xd8,
        0x0a, 0xc1, 0x31, 0x88, 0xa5, 0xcd, 0x7b, 0xbd, 0x2d, 0x74, 0xd0, 0x12, 0xb8, 0xe5, 0xb4, 0xb0,
        0x89, 0x69, 0x97, 0x4a, 0x0c, 0x96, 0x77, 0x7e, 0x65, 0xb9, 0xf1, 0x09, 0xc5, 0x6e, 0xc6, 0x84,
        0x18, 0xf0, 0x7d, 0xec, 0x3a, 0xdc, 0x4d, 0x20, 0x79, 0xee, 0x5f, 0x3e, 0xd7, 0xcb, 0x39, 0x48,
    ];

    /// The AES S-box from its definition (FIPS 197 §5.1.1): inversion in GF(2^8), found by
    /// search, then the affine map. Independent of the nibble tables under test.
    fn aes_sbox(x: u8) -> u8 {
        let inv = (1..=255u8).find(|&y| gf_mul(x, y) == 1).unwrap_or(0);
        aes_affine(inv)
    }

    #[test]
    fn aes_sbox_reference_is_right() {
        // FIPS 197 figure 7, a few entries.
        assert_eq!([aes_sbox(0x00), aes_sbox(0x01), aes_sbox(0x53), aes_sbox(0xff)], [0x63, 0x7c, 0xed, 0x16]);
    }

    /// The proof of the constants: A2(S_aes(A1(x))) = S_sm4(x) for every byte, through the
    /// nibble tables exactly as the AES-NI path uses them, and through the matrices the portable
    /// path derives from them.
    #[test]
    fn affine_constants_give_the_sm4_sbox() {
        for x in 0..=255u8 {
            let via_tables = nib(&POST_LO, &POST_HI, aes_sbox(nib(&PRE_LO, &PRE_HI, x)));
            assert_eq!(via_tables, SBOX[x as usize], "nibble tables at {x:#04x}");
            assert_eq!(swar_sbox(x as u64) as u8, SBOX[x as usize], "portable S-box at {x:#04x}");
        }
        // Eight lanes at once, each lane independent.
        let lanes = u64::from_le_bytes([0x00, 0x01, 0x7f, 0x80, 0xaa, 0x55, 0xfe, 0xff]);
        let want = u64::from_le_bytes([0x00, 0x01, 0x7f, 0x80, 0xaa, 0x55, 0xfe, 0xff].map(|b| SBOX[b as usize]));
        assert_eq!(swar_sbox(lanes), want);
    }

    /// The same through the real AESENCLAST instruction, all 256 inputs, for every backend.
    #[test]
    fn every_backend_computes_the_sbox() {
        for backend in Backend::all() {
            for x in 0..=255u32 {
                let word = (x * 0x0101_0101) ^ 0x0003_0201; // four different bytes per call
                let want = u32::from_be_bytes(word.to_be_bytes().map(|b| SBOX[b as usize]));
                assert_eq!(backend.tau(word), want, "{backend:?} at {word:#010x}");
            }
        }
    }

    #[test]
    fn aesni_backend_is_used_where_available() {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("aes") && is_x86_feature_detected!("ssse3") {
            let want = if is_x86_feature_detected!("avx2") { Backend::Avx2 } else { Backend::AesNi };
            assert_eq!(Sm4::new(&[0; 16]).backend(), want);
        }
        assert_eq!(Sm4::with_backend(&[0; 16], Backend::Portable).backend(), Backend::Portable);
    }

    #[test]
    fn standard_vector_and_its_million_iterations() {
        // GB/T 32907-2016 appendix A, examples 1 and 2.
        let key: [u8; 16] = hex::decode("0123456789abcdeffedcba9876543210").unwrap().try_into().unwrap();
        for backend in Backend::all() {
            let c = Sm4::with_backend(&key, backend);
            assert_eq!(hex::encode(c.encrypt(key)), "681edf34d206965e86b3e94f536e4246", "{backend:?}");
            let mut b = [key];
            c.decrypt_blocks(&mut b);
            let mut back = [b[0]];
            c.encrypt_blocks(&mut back);
            assert_eq!(back[0], key, "{backend:?}");
            let mut b = key;
            for _ in 0..1_000_000 {
                b = c.encrypt(b);
            }
            assert_eq!(hex::encode(b), "595298c7c6fd271f0402f804c33d3f66", "{backend:?}");
            for _ in 0..1_000_000 {
                let mut one = [b];
                c.decrypt_blocks(&mut one);
                b = one[0];
            }
            assert_eq!(b, key, "{backend:?} decrypting the million iterations back");
        }
    }

    fn reference(key: &[u8; 16], blocks: &[[u8; 16]], decrypt: bool) -> Vec<[u8; 16]> {
        let r = ::sm4::Sm4::new(key.into());
        blocks
            .iter()
            .map(|b| {
                let mut g = (*b).into();
                if decrypt {
                    r.decrypt_block(&mut g);
                } else {
                    r.encrypt_block(&mut g);
                }
                g.into()
            })
            .collect()
    }

    #[test]
    fn odd_batch_sizes() {
        let key = [0x5a; 16];
        let blocks: Vec<[u8; 16]> = (0..17u8).map(|i| [i.wrapping_mul(37); 16].map(|b| b ^ i)).collect();
        for backend in Backend::all() {
            let c = Sm4::with_backend(&key, backend);
            for n in 1..=17 {
                let mut got = blocks[..n].to_vec();
                c.encrypt_blocks(&mut got);
                assert_eq!(got, reference(&key, &blocks[..n], false), "{backend:?} encrypt {n}");
                c.decrypt_blocks(&mut got);
                assert_eq!(got, &blocks[..n], "{backend:?} decrypt {n}");
            }
        }
    }

    proptest! {
        #[test]
        fn matches_the_sm4_crate(
            key in any::<[u8; 16]>(),
            blocks in proptest::collection::vec(any::<[u8; 16]>(), 1..40),
        ) {
            for backend in Backend::all() {
                let c = Sm4::with_backend(&key, backend);
                let mut got = blocks.clone();
                c.encrypt_blocks(&mut got);
                prop_assert_eq!(&got, &reference(&key, &blocks, false), "{:?} encrypt", backend);
                let mut got = blocks.clone();
                c.decrypt_blocks(&mut got);
                prop_assert_eq!(&got, &reference(&key, &blocks, true), "{:?} decrypt", backend);
            }
        }
    }
}
