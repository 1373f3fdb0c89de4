use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};

use zeroize::Zeroize;

/// Key material: locked in RAM where the system allows it (never swapped out), zeroized and
/// unlocked on drop, never printed.
#[derive(PartialEq, Eq)]
pub struct Secret(Vec<u8>);

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

fn lock(v: &[u8]) {
    if v.is_empty() {
        return;
    }
    if unsafe { libc::mlock(v.as_ptr().cast(), v.len()) } != 0 && !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lock key material in memory (mlock); it may be swapped out. Raise RLIMIT_MEMLOCK (LimitMEMLOCK=) to avoid this"
        );
    }
}

impl Secret {
    pub fn new(mut bytes: Vec<u8>) -> Secret {
        bytes.shrink_to_fit();
        lock(&bytes);
        Secret(bytes)
    }

    /// `len` random bytes from the OS CSPRNG.
    pub fn random(len: usize) -> Secret {
        let mut v = vec![0u8; len];
        random_bytes(&mut v);
        Secret::new(v)
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

impl Clone for Secret {
    fn clone(&self) -> Secret {
        Secret::new(self.0.clone())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
        if !self.0.is_empty() || self.0.capacity() > 0 {
            unsafe { libc::munlock(self.0.as_ptr().cast(), self.0.capacity().max(1)) };
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted_and_clone_equal() {
        let s = Secret::new(vec![0xAB; 32]);
        assert_eq!(format!("{s:?}"), "Secret([REDACTED; 32])");
        assert_eq!(s.clone(), s);
    }
}
