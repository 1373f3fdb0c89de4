use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Key material: zeroized on drop and never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(bytes)
    }

    /// `len` random bytes from the OS CSPRNG.
    pub fn random(len: usize) -> Secret {
        let mut v = vec![0u8; len];
        random_bytes(&mut v);
        Secret(v)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret([REDACTED; {}])", self.0.len())
    }
}

/// Fill `buf` from the OS CSPRNG. There is no sensible fallback if the kernel cannot give
/// randomness, so failure aborts rather than produce a weak key or IV.
pub fn random_bytes(buf: &mut [u8]) {
    getrandom::getrandom(buf).expect("the OS random number generator failed");
}

pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    random_bytes(&mut b);
    u64::from_le_bytes(b)
}
