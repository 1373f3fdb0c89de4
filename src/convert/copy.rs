//! The block copy both conversions share, and the copy of a file's owner, xattrs, mode and
//! times.
//!
//! The copy keeps the hole rule of docs/design.md §4 in both directions: a complete, aligned
//! 4 KiB block of zeros is a hole (on the backing file it reads as zeros; in plaintext it
//! is zeros) and is not written, so sparse and preallocated files stay sparse; every other
//! block, and the partial last block always, goes through the ciphers: decrypted with the
//! source's (`from`), encrypted with the destination's (`to`), so one loop encrypts,
//! decrypts, and moves a file from one method or key to another. Runs are whole 4 KiB
//! blocks (a partial one only at the end of the file), which suits XTS's data units.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;

use crate::crypto::FileCipher;
use crate::layout::{align_down, align_up, all_zero, BLOCK};
use crate::sys;

const CHUNK: usize = 1 << 20;

/// How a block changes on its way from `src` to `dst`.
#[derive(Clone, Copy)]
pub struct Ciphers<'a> {
    /// Decrypts the source (`None`: it is plaintext).
    pub from: Option<&'a FileCipher>,
    /// Encrypts the destination (`None`: it is plaintext).
    pub to: Option<&'a FileCipher>,
}

/// Copy the first `size` bytes of `src` to `dst` through `ciphers`, skipping holes.
/// `progress` is told how many bytes of the file were covered as it goes.
pub fn transform(
    src: &File,
    dst: &File,
    size: u64,
    ciphers: Ciphers<'_>,
    buf: &mut Vec<u8>,
    progress: &mut dyn FnMut(u64),
) -> io::Result<()> {
    buf.resize(CHUNK, 0);
    let mut pos = 0u64;
    let mut reported = 0u64;
    while pos < size {
        let data = match sys::lseek(src.as_fd(), pos as i64, libc::SEEK_DATA) {
            Ok(o) => align_down(o as u64),
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) => return Err(e),
        };
        if data >= size {
            break;
        }
        let hole = sys::lseek(src.as_fd(), data as i64, libc::SEEK_HOLE).map(|o| o as u64)?;
        let end = align_up(hole).min(size);
        let mut off = data.max(pos);
        while off < end {
            let n = (CHUNK as u64).min(end - off) as usize;
            let got = sys::pread_full(src.as_fd(), &mut buf[..n], off)?;
            if got < n {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the file shrank while it was being converted"));
            }
            write_blocks(dst, ciphers, off, &mut buf[..n], size)?;
            off += n as u64;
            progress(off - reported);
            reported = off;
        }
        pos = end.max(pos + 1);
    }
    if reported < size {
        progress(size - reported);
    }
    dst.set_len(size)
}

/// Write `data` (read at `off`, a block boundary) to `dst`, leaving out complete zero blocks.
fn write_blocks(dst: &File, ciphers: Ciphers<'_>, off: u64, data: &mut [u8], size: u64) -> io::Result<()> {
    let mut run: Option<usize> = None; // start of the run of blocks to write
    let flush = |from: usize, to: usize, data: &mut [u8]| -> io::Result<()> {
        if let Some(c) = ciphers.from {
            c.decrypt(off + from as u64, &mut data[from..to]);
        }
        if let Some(c) = ciphers.to {
            c.encrypt(off + from as u64, &mut data[from..to]);
        }
        sys::pwrite_all(dst.as_fd(), &data[from..to], off + from as u64)
    };
    let mut i = 0;
    while i < data.len() {
        let end = (i + BLOCK as usize).min(data.len());
        let complete = off + i as u64 + BLOCK <= size && end - i == BLOCK as usize;
        let hole = complete && all_zero(&data[i..end]);
        match (hole, run) {
            (true, Some(s)) => {
                flush(s, i, data)?;
                run = None;
            }
            (false, None) => run = Some(i),
            _ => {}
        }
        i = end;
    }
    if let Some(s) = run {
        flush(s, data.len(), data)?;
    }
    Ok(())
}

/// Give `dst` the owner, extended attributes (ACLs, capabilities, user.*), mode and times
/// of `src`. `strict`: any attribute that cannot be copied is an error (encrypting in place
/// must not lose one); otherwise it is returned as a warning (exporting to a filesystem
/// without xattrs, or as a user who cannot chown).
pub fn copy_attrs(src: &File, md: &std::fs::Metadata, dst: &File, strict: bool) -> io::Result<Vec<String>> {
    let mut warnings = Vec::new();
    let mut soft = |what: String, e: io::Error| -> io::Result<()> {
        if strict {
            Err(io::Error::new(e.kind(), format!("{what}: {e}")))
        } else {
            warnings.push(format!("{what}: {e}"));
            Ok(())
        }
    };
    let dst_md = dst.metadata()?;
    if (dst_md.uid(), dst_md.gid()) != (md.uid(), md.gid()) {
        // Before the xattrs and the mode: chown clears set-id bits and capabilities.
        if let Err(e) = sys::fchown(dst.as_fd(), md.uid(), md.gid()) {
            soft(format!("cannot set owner {}:{}", md.uid(), md.gid()), e)?;
        }
    }
    match list_xattrs(src) {
        Ok(names) => {
            for name in names {
                if let Err(e) = get_xattr(src, &name).and_then(|v| set_xattr(dst, &name, &v)) {
                    soft(format!("cannot copy xattr {}", name.to_string_lossy()), e)?;
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => {}
        Err(e) => soft("cannot list xattrs".into(), e)?,
    }
    if let Err(e) = cvt(unsafe { libc::fchmod(dst.as_raw_fd(), md.mode() & 0o7777) }) {
        soft(format!("cannot set mode {:o}", md.mode() & 0o7777), e)?;
    }
    let times = times_of(md);
    cvt(unsafe { libc::futimens(dst.as_raw_fd(), times.as_ptr()) })?;
    Ok(warnings)
}

/// atime and mtime of `md`, as utimensat/futimens take them.
pub fn times_of(md: &std::fs::Metadata) -> [libc::timespec; 2] {
    [
        libc::timespec { tv_sec: md.atime(), tv_nsec: md.atime_nsec() },
        libc::timespec { tv_sec: md.mtime(), tv_nsec: md.mtime_nsec() },
    ]
}

/// Set the times of `path` itself (a symlink is not followed).
pub fn set_times(path: &std::path::Path, md: &std::fs::Metadata) {
    let Ok(c) = sys::cstr(path.as_os_str()) else { return };
    unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times_of(md).as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
}

fn cvt(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn list_xattrs(f: &File) -> io::Result<Vec<CString>> {
    let buf = grow_until_fits(4096, |buf| rustix::fs::flistxattr(f, buf))?;
    Ok(buf.split(|&b| b == 0).filter(|n| !n.is_empty()).map(|n| CString::new(n).expect("split at NUL")).collect())
}

fn get_xattr(f: &File, name: &CString) -> io::Result<Vec<u8>> {
    grow_until_fits(256, |buf| rustix::fs::fgetxattr(f, name.as_c_str(), buf))
}

/// Call `read` with ever larger buffers while it answers ERANGE (the value grew, or is
/// larger than the first guess); the bytes it filled.
fn grow_until_fits(first: usize, mut read: impl FnMut(&mut [u8]) -> rustix::io::Result<usize>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; first];
    loop {
        match read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e.into()),
        }
    }
}

fn set_xattr(f: &File, name: &CString, value: &[u8]) -> io::Result<()> {
    Ok(rustix::fs::fsetxattr(f, name.as_c_str(), value, rustix::fs::XattrFlags::empty())?)
}
