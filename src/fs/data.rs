//! Encrypted data path: every method at any offset, and the hole rule (docs/design.md §4).
//!
//! Invariant kept on every backing file: each complete, aligned 4 KiB block is either all
//! zero bytes (a hole: reads as zeros) or all ciphertext; the partial block at the end of the
//! file, if any, is all ciphertext. Operations that would leave a block mixed first fill the
//! rest of it with encrypted zeros. Aligned page writes therefore cost no extra I/O.
//!
//! CTR methods encrypt byte by byte. XTS methods encrypt 16-byte blocks (in 4 KiB data
//! units), the file's last < 16 bytes in tail mode (see `crypto::xts`): a write that covers
//! 16-byte blocks only in part reads, decrypts and rewrites its edge blocks (at most two,
//! 16 bytes each), with the same plaintext where it does not change, which XTS encrypts to
//! the same bytes. What the size decides: whether the block holding the end of the file is
//! a full block or a tail. A size change that moves the end to another 16-byte block
//! re-encrypts that block, and a crash in the middle of such a change can leave up to 15
//! bytes before the new end unreadable (XTS needs whole blocks; the backing file keeps the
//! plaintext's size). Files whose size is a multiple of 16 — database pages, WAL segments —
//! never have a tail.
//!
//! Crash safety: operations that take several backing calls are ordered so that the file is
//! valid after each of them (a process killed in between, or a torn page-granular write,
//! leaves every byte old or new, never keystream). The unit tests check this by cutting
//! every operation after each of its backing calls.
//!
//! Locking is the caller's: `write` needs the file's lock exclusively unless
//! `write_is_simple` says a shared one suffices; `read` needs it shared.

use std::io;

use crate::crypto::FileCipher;

pub use crate::layout::{align_down, align_up, all_zero, BLOCK};

pub const FALLOC_KEEP_SIZE: i32 = libc::FALLOC_FL_KEEP_SIZE;
pub const FALLOC_PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE;
pub const FALLOC_ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// Backing file access used by the data path.
pub trait Store {
    /// Read up to `buf.len()` bytes at `off`; fewer only at end of file.
    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize>;
    fn pwrite(&self, buf: &[u8], off: u64) -> io::Result<()>;
    fn size(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()>;
}

/// Down and up to the cipher's block (1 for CTR, 16 for XTS).
fn down_to(x: u64, bs: u64) -> u64 {
    x - x % bs
}

fn up_to(x: u64, bs: u64) -> u64 {
    down_to(x + bs - 1, bs)
}

/// Read `len` plaintext bytes at `off` into `out` (cleared first); short at end of file.
pub fn read(s: &dyn Store, c: &FileCipher, off: u64, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    out.clear();
    if c.is_plaintext() {
        out.resize(len, 0);
        let n = s.pread(out, off)?;
        out.truncate(n);
        return Ok(());
    }
    // Read whole blocks: a block is a hole only if all of its bytes are zero.
    let start = align_down(off);
    let end = off + len as u64;
    out.resize((align_up(end) - start) as usize, 0);
    let n = s.pread(out, start)?;
    out.truncate(n);
    for (i, block) in out.chunks_mut(BLOCK as usize).enumerate() {
        let bstart = start + i as u64 * BLOCK;
        if block.len() == BLOCK as usize && all_zero(block) {
            continue; // hole (never true of real ciphertext: 2^-32768)
        }
        // Decrypt only the part the caller asked for, in whole cipher blocks (a partial one
        // only at the end of the file, where `block` ends).
        let bs = c.block_size() as u64;
        let lo = off.saturating_sub(bstart).min(block.len() as u64);
        let hi = (end - bstart).min(block.len() as u64);
        if lo < hi {
            let (lo, hi) = (down_to(lo, bs) as usize, (up_to(hi, bs) as usize).min(block.len()));
            c.decrypt(bstart + lo as u64, &mut block[lo..hi]);
        }
    }
    let skip = (off - start) as usize;
    if out.len() <= skip {
        out.clear();
    } else {
        out.truncate(((end - start) as usize).min(out.len()));
        out.drain(..skip);
    }
    Ok(())
}

/// A write that needs no hole check and cannot leave a mixed block: whole aligned blocks,
/// not beyond a partial last block. Such writes may run concurrently (shared lock).
pub fn write_is_simple(c: &FileCipher, off: u64, len: u64, size: u64) -> bool {
    c.is_plaintext() || (off % BLOCK == 0 && len % BLOCK == 0 && (off <= size || size % BLOCK == 0))
}

/// Whether the complete block at `b` (inside the file) is a hole.
fn is_hole(s: &dyn Store, b: u64) -> io::Result<bool> {
    let mut buf = [0u8; BLOCK as usize];
    let n = s.pread(&mut buf, b)?;
    Ok(n == BLOCK as usize && all_zero(&buf))
}

/// Write encrypted zeros over `[from, to)`.
fn write_zeros(s: &dyn Store, c: &FileCipher, from: u64, to: u64) -> io::Result<()> {
    if from >= to {
        return Ok(());
    }
    let mut z = vec![0u8; (to - from) as usize];
    if c.block_size() > 1 {
        // Edge blocks need their other bytes: the write path reads them.
        return write(s, c, from, &z, &mut Vec::new());
    }
    c.encrypt(from, &mut z);
    s.pwrite(&z, from)
}

/// The plaintext of `[from, to)` as the file holds it now (zeros in holes).
fn old_plaintext(s: &dyn Store, c: &FileCipher, from: u64, to: u64, out: &mut Vec<u8>) -> io::Result<()> {
    let mut tmp = Vec::new();
    read(s, c, from, (to - from) as usize, &mut tmp)?;
    tmp.resize((to - from) as usize, 0);
    out.extend_from_slice(&tmp);
    Ok(())
}

/// Where a write of `[off, end)` must start and end so that no 4 KiB block is left mixed:
/// a new or hole block it touches in part is filled with zeros around the data.
fn fill_extent(s: &dyn Store, off: u64, end: u64, size: u64) -> io::Result<(u64, u64)> {
    let hb = align_down(off);
    let tb = align_down(end - 1);
    let mut wstart = off;
    let mut wend = end;
    let head_hole = off % BLOCK != 0 && hb + BLOCK <= size && is_hole(s, hb)?;
    if off % BLOCK != 0 {
        if hb >= size || head_hole {
            wstart = hb; // new block or hole: all of it before the data becomes zeros
        } else if off > size {
            wstart = size; // the old partial last block: fill the gap up to the data
        }
    }
    if end % BLOCK != 0 && end < size && tb + BLOCK <= size {
        let tail_hole = if tb == hb && off % BLOCK != 0 { head_hole } else { is_hole(s, tb)? };
        if tail_hole {
            wend = tb + BLOCK;
        }
    }
    Ok((wstart, wend))
}

/// Write plaintext `data` at `off`. `scratch` is reused between calls to avoid allocation.
pub fn write(s: &dyn Store, c: &FileCipher, off: u64, data: &[u8], scratch: &mut Vec<u8>) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    if c.is_plaintext() {
        return s.pwrite(data, off);
    }
    let mut size = s.size()?;
    let end = off + data.len() as u64;
    if write_is_simple(c, off, data.len() as u64, size) {
        scratch.clear();
        scratch.extend_from_slice(data);
        c.encrypt(off, scratch);
        return s.pwrite(scratch, off);
    }
    if size % BLOCK != 0 && off >= align_up(size) {
        // Writing past a partial last block: complete it first (it becomes a full block).
        write_zeros(s, c, size, align_up(size))?;
        size = align_up(size);
    }
    let (wstart, wend) = fill_extent(s, off, end, size)?;
    // Widened to whole cipher blocks; the bytes the widening adds keep their plaintext.
    let bs = c.block_size() as u64;
    let new_size = size.max(wend);
    let a = down_to(wstart, bs);
    let b = up_to(wend, bs).min(new_size.max(wend));
    scratch.clear();
    if a < wstart {
        old_plaintext(s, c, a, wstart, scratch)?;
    }
    scratch.resize((off - a) as usize, 0);
    scratch.extend_from_slice(data);
    scratch.resize((wend - a) as usize, 0);
    if wend < b {
        old_plaintext(s, c, wend, b, scratch)?;
    }
    c.encrypt(a, scratch);
    s.pwrite(scratch, a)
}

/// Fill what an extension from `size` to `new_len` exposes that is not a whole-block hole:
/// the rest of the old partial last block and the new partial last block. These writes
/// themselves extend the file, so every state between them is valid (see the module doc):
/// callers extend the size only after them.
fn fill_extension(s: &dyn Store, c: &FileCipher, size: u64, new_len: u64) -> io::Result<()> {
    if size % BLOCK != 0 {
        write_zeros(s, c, size, align_up(size).min(new_len))?;
    }
    if new_len % BLOCK != 0 && align_down(new_len) >= align_up(size) {
        write_zeros(s, c, align_down(new_len), new_len)?;
    }
    Ok(())
}

/// Change the file length to `new_len`.
///
/// Every operation here is ordered so that a crash between any two backing calls leaves
/// the file valid (each byte old or new, never keystream): fills are written before the
/// size changes to expose them.
pub fn truncate(s: &dyn Store, c: &FileCipher, new_len: u64) -> io::Result<()> {
    if c.is_plaintext() {
        return s.set_len(new_len);
    }
    let size = s.size()?;
    if new_len < size {
        let tb = align_down(new_len);
        let bs = c.block_size() as u64;
        let hole = new_len % BLOCK != 0 && tb + BLOCK <= size && is_hole(s, tb)?;
        // A hole block that becomes the partial last block must turn into ciphertext: the
        // whole block, so it is valid both before and after the size drops.
        if hole {
            write_zeros(s, c, tb, tb + BLOCK)?;
        }
        if new_len % bs == 0 {
            return s.set_len(new_len);
        }
        // XTS: the block that now holds the end becomes a tail. Its plaintext is read as the
        // file is now, the size dropped, then the block written in tail mode.
        let t = down_to(new_len, bs);
        let mut p = Vec::new();
        old_plaintext(s, c, t, new_len, &mut p)?;
        s.set_len(new_len)?;
        c.encrypt(t, &mut p);
        s.pwrite(&p, t)
    } else {
        fill_extension(s, c, size, new_len)?;
        // Always set it: ftruncate updates mtime/ctime even when the size does not change.
        s.set_len(new_len)
    }
}

/// Encrypted zeros over `[from, to)`, which lies inside one block of the file (size `size`),
/// unless that block is a hole already.
fn zero_partial(s: &dyn Store, c: &FileCipher, from: u64, to: u64, size: u64) -> io::Result<()> {
    if from >= to {
        return Ok(());
    }
    let b = align_down(from);
    if b + BLOCK <= size && is_hole(s, b)? {
        return Ok(());
    }
    write_zeros(s, c, from, to)
}

/// SEEK_DATA (`data`) or SEEK_HOLE from `off`, given the backing file's own answers
/// (`backing(off, whence)`). The hole rule makes tdefs write encrypted zeros of its own:
/// the rest of a partial last block. On the backing file such a block is data where ext4
/// has a hole, so a data extent of the backing file that lies within one block and
/// decrypts to zeros is reported as a hole. (So is a lone block of zeros the application
/// wrote: it reads as zeros either way.) Longer extents are data, as ext4 reports written
/// zeros.
pub fn seek(s: &dyn Store, c: &FileCipher, off: u64, data: bool, backing: &dyn Fn(u64, i32) -> io::Result<u64>) -> io::Result<u64> {
    let whence = if data { libc::SEEK_DATA } else { libc::SEEK_HOLE };
    if c.is_plaintext() {
        return backing(off, whence);
    }
    let size = s.size()?;
    // The backing data extent containing `p` is a zero fill: returns its end if so.
    let fill_end = |p: u64| -> io::Result<Option<u64>> {
        let b = align_down(p);
        let end = backing(p, libc::SEEK_HOLE)?;
        if end > b + BLOCK {
            return Ok(None); // more than one block of data
        }
        if b > 0 && backing(b - BLOCK, libc::SEEK_HOLE)? != b - BLOCK {
            return Ok(None); // the extent began in the block before
        }
        let mut buf = Vec::new();
        read(s, c, b, (end - b) as usize, &mut buf)?;
        Ok(all_zero(&buf).then_some(end))
    };
    let mut off = off;
    loop {
        if off >= size {
            return Err(io::Error::from_raw_os_error(libc::ENXIO));
        }
        if data {
            let p = backing(off, libc::SEEK_DATA)?;
            match fill_end(p)? {
                Some(end) => off = end, // a hole to ext4: look further
                None => return Ok(p),
            }
        } else {
            let h = backing(off, libc::SEEK_HOLE)?;
            if h == off || fill_end(off)?.is_some() {
                return Ok(off);
            }
            // Data up to `h`; a fill extent cannot end it early (it would be one extent
            // with the data before it), so `h` is the answer.
            return Ok(h);
        }
    }
}

/// fallocate: default mode and KEEP_SIZE allocate (zeros, i.e. holes); PUNCH_HOLE and
/// ZERO_RANGE make a range read as zeros. Other modes (collapse, insert) would move
/// ciphertext to other offsets and are refused by the kernel's FUSE module anyway.
pub fn fallocate(s: &dyn Store, c: &FileCipher, mode: i32, off: u64, len: u64) -> io::Result<()> {
    let known = FALLOC_KEEP_SIZE | FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE;
    if mode & !known != 0 || (mode & FALLOC_PUNCH_HOLE != 0 && mode & FALLOC_ZERO_RANGE != 0) {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    if mode & FALLOC_PUNCH_HOLE != 0 && mode & FALLOC_KEEP_SIZE == 0 {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    if c.is_plaintext() || len == 0 {
        return s.fallocate(mode, off, len);
    }
    let size = s.size()?;
    let end = off.checked_add(len).ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
    if mode & (FALLOC_PUNCH_HOLE | FALLOC_ZERO_RANGE) != 0 {
        // Inside the file: partial blocks at the edges get encrypted zeros, whole blocks
        // become holes through the backing filesystem.
        let zend = end.min(size);
        if off < zend {
            let (mid_lo, mid_hi) = (align_up(off), align_down(zend));
            if mid_lo > mid_hi {
                zero_partial(s, c, off, zend, size)?; // within one block
            } else {
                zero_partial(s, c, off, mid_lo, size)?;
                zero_partial(s, c, mid_hi, zend, size)?;
                if mid_hi > mid_lo {
                    s.fallocate(mode | FALLOC_KEEP_SIZE, mid_lo, mid_hi - mid_lo)?;
                }
            }
        }
        if end <= size {
            return Ok(());
        }
        // Past the end of the file only allocation (or its release) is visible.
        if mode & FALLOC_KEEP_SIZE != 0 {
            let from = align_up(size).max(off);
            return if end > from { s.fallocate(mode, from, end - from) } else { Ok(()) };
        }
    }
    // Allocation, possibly extending: fills first, then the backing call (which never
    // changes bytes already written).
    let extends = mode & FALLOC_KEEP_SIZE == 0 && end > size;
    if extends {
        fill_extension(s, c, size, end)?;
    }
    let alloc_mode = mode & FALLOC_KEEP_SIZE;
    let from = if mode & FALLOC_ZERO_RANGE != 0 { align_up(size).max(off) } else { off };
    if end > from {
        s.fallocate(alloc_mode, from, end - from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
