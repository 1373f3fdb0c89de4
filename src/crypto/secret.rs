use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::LazyLock;

use parking_lot::Mutex;

use zeroize::Zeroize;

/// Key material: locked in RAM where the system allows it (never swapped out), zeroized and
/// unlocked on drop, never printed.
#[derive(PartialEq, Eq)]
pub struct Secret(Vec<u8>);

static MLOCK_WARNED: AtomicBool = AtomicBool::new(false);

/// mlock and munlock work on whole pages and do not count: unlocking one secret's pages
/// would also unlock a neighbouring secret that shares a page. So pages are counted here
/// and a page is unlocked only when no secret uses it any more.
struct PageLocks {
    page: usize,
    count: BTreeMap<usize, usize>,
}

impl PageLocks {
    fn pages(&self, addr: usize, len: usize) -> std::ops::Range<usize> {
        let first = addr / self.page;
        let last = (addr + len.max(1) - 1) / self.page;
        first..last + 1
    }

    /// Count `[addr, addr + len)` in; returns whether some page was not locked yet.
    fn add(&mut self, addr: usize, len: usize) -> bool {
        let mut new = false;
        for p in self.pages(addr, len) {
            let c = self.count.entry(p).or_insert(0);
            new |= *c == 0;
            *c += 1;
        }
        new
    }

    /// Count `[addr, addr + len)` out; returns the pages no secret uses any more.
    fn remove(&mut self, addr: usize, len: usize) -> Vec<usize> {
        let mut free = Vec::new();
        for p in self.pages(addr, len) {
            if let Some(c) = self.count.get_mut(&p) {
                *c -= 1;
                if *c == 0 {
                    self.count.remove(&p);
                    free.push(p);
                }
            }
        }
        free
    }
}

static LOCKS: LazyLock<Mutex<PageLocks>> = LazyLock::new(|| {
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    Mutex::new(PageLocks { page, count: BTreeMap::new() })
});

fn lock(v: &[u8]) {
    if v.is_empty() {
        return;
    }
    let mut locks = LOCKS.lock();
    if !locks.add(v.as_ptr() as usize, v.len()) {
        return; // every page is locked already
    }
    if unsafe { libc::mlock(v.as_ptr().cast(), v.len()) } != 0 && !MLOCK_WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "cannot lock key material in memory (mlock); it may be swapped out. Raise RLIMIT_MEMLOCK (LimitMEMLOCK=) to avoid this"
        );
    }
}

fn unlock(addr: usize, len: usize) {
    let mut locks = LOCKS.lock();
    let page = locks.page;
    for p in locks.remove(addr, len) {
        unsafe { libc::munlock((p * page) as *const libc::c_void, page) };
    }
}

impl Secret {
    pub fn new(mut bytes: Vec<u8>) -> Secret {
        // shrink_to_fit would reallocate a buffer larger than its contents and free the old
        // one with the key still in it: copy into an exact buffer and wipe the original.
        let exact = if bytes.capacity() == bytes.len() {
            bytes
        } else {
            let mut v = Vec::with_capacity(bytes.len());
            v.extend_from_slice(&bytes);
            bytes.zeroize();
            v
        };
        lock(&exact);
        Secret(exact)
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
        let (addr, len) = (self.0.as_ptr() as usize, self.0.len());
        self.0.zeroize();
        if len > 0 {
            unlock(addr, len);
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
    fn a_page_is_unlocked_only_when_no_secret_uses_it() {
        let mut l = PageLocks { page: 4096, count: BTreeMap::new() };
        assert!(l.add(4096 + 100, 32), "first secret on the page locks it");
        assert!(!l.add(4096 + 200, 32), "second secret on the same page: already locked");
        assert!(l.add(4096 + 4000, 200), "crosses into the next page");
        assert_eq!(l.remove(4096 + 100, 32), Vec::<usize>::new(), "the page is still used");
        assert_eq!(l.remove(4096 + 4000, 200), vec![2], "only the page nobody uses any more");
        assert_eq!(l.remove(4096 + 200, 32), vec![1]);
        assert!(l.count.is_empty());
    }

    #[test]
    fn new_never_leaves_a_copy_in_a_reallocated_buffer() {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&[0xAB; 32]);
        let s = Secret::new(v);
        assert_eq!((s.len(), s.0.capacity()), (32, 32));
    }

    #[test]
    fn debug_is_redacted_and_clone_equal() {
        let s = Secret::new(vec![0xAB; 32]);
        assert_eq!(format!("{s:?}"), "Secret([REDACTED; 32])");
        assert_eq!(s.clone(), s);
    }
}
