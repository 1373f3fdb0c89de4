//! The block layout of a backing file, shared by the FUSE data path (`fs::data`) and the
//! offline converter (`convert`): 4 KiB blocks, each all zero bytes (a hole) or all
//! ciphertext (docs/design.md §4).

/// Bytes per block of the hole rule.
pub const BLOCK: u64 = 4096;

/// `x` rounded down to a block boundary.
pub fn align_down(x: u64) -> u64 {
    x & !(BLOCK - 1)
}

/// `x` rounded up to a block boundary.
pub fn align_up(x: u64) -> u64 {
    align_down(x + BLOCK - 1)
}

/// Whether every byte is zero (a block that reads as a hole), a word at a time.
pub fn all_zero(b: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only splits the slice.
    let (head, words, tail) = unsafe { b.align_to::<u128>() };
    head.iter().all(|&x| x == 0) && words.iter().all(|&x| x == 0) && tail.iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_and_zero_test() {
        assert_eq!((align_down(4095), align_up(4095), align_down(4096), align_up(4096), align_up(4097)), (0, 4096, 4096, 4096, 8192));
        let mut b = vec![0u8; 9000];
        assert!(all_zero(&b[3..]));
        b[8999] = 1;
        assert!(!all_zero(&b[3..]) && all_zero(&b[..8999]));
    }
}
