//! File handles (`name_to_handle_at`, `open_by_handle_at`): how NFS export names a backing
//! inode without holding it open. libc, because rustix has no wrapper for them.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use super::{cstr, cvt};

/// A file handle (`name_to_handle_at`): names a backing inode, generation included,
/// without keeping it open.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Handle {
    ty: i32,
    bytes: Box<[u8]>,
}

const HANDLE_HEADER: usize = 8; // struct file_handle { u32 handle_bytes; i32 handle_type; }

/// FILEID_INO32_GEN and FILEID_INO32_GEN_PARENT (include/linux/exportfs.h): inode number
/// and generation as two u32, the handles of ext2/3/4 (and of xfs with 32-bit inodes).
const FILEID_INO32_GEN: i32 = 1;
const FILEID_INO32_GEN_PARENT: i32 = 2;

impl Handle {
    /// The inode generation, for handles that carry one where it is known to be
    /// (FILEID_INO32_GEN*).
    pub fn generation(&self) -> Option<u32> {
        match self.ty {
            FILEID_INO32_GEN | FILEID_INO32_GEN_PARENT if self.bytes.len() >= 8 => {
                Some(u32::from_ne_bytes(self.bytes[4..8].try_into().expect("4 bytes")))
            }
            _ => None,
        }
    }

    /// For a filesystem whose handles are FILEID_INO32_GEN* (as `like`'s): a handle of inode
    /// `ino` with generation 0, which ext4 takes as "any generation" (ext4_nfs_get_inode);
    /// the caller compares the real generation afterwards.
    pub fn any_generation(like: &Handle, ino: u64) -> Option<Handle> {
        if !matches!(like.ty, FILEID_INO32_GEN | FILEID_INO32_GEN_PARENT) || ino > u64::from(u32::MAX) {
            return None;
        }
        let mut b = Vec::with_capacity(8);
        b.extend_from_slice(&(ino as u32).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        Some(Handle { ty: FILEID_INO32_GEN, bytes: b.into() })
    }
}

/// The handle of `dir/name` (not following a final symlink); `name` empty means the inode
/// behind `dir` itself.
pub fn handle_at(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<Handle> {
    let n = cstr(name)?;
    let mut buf = [0u32; (HANDLE_HEADER + libc::MAX_HANDLE_SZ as usize) / 4];
    let fh = buf.as_mut_ptr() as *mut libc::file_handle;
    let mut mount_id = 0;
    let flags = if name.is_empty() { libc::AT_EMPTY_PATH } else { 0 };
    unsafe {
        (*fh).handle_bytes = libc::MAX_HANDLE_SZ as u32;
        cvt(libc::name_to_handle_at(dir.as_raw_fd(), n.as_ptr(), fh, &mut mount_id, flags))?;
        let len = ((*fh).handle_bytes as usize).min(libc::MAX_HANDLE_SZ as usize);
        let bytes = std::slice::from_raw_parts((buf.as_ptr() as *const u8).add(HANDLE_HEADER), len);
        Ok(Handle { ty: (*fh).handle_type, bytes: bytes.into() })
    }
}

/// Open the inode a handle names (`mount` is any descriptor on the same filesystem).
pub fn open_handle(mount: BorrowedFd<'_>, h: &Handle, flags: libc::c_int) -> io::Result<OwnedFd> {
    let mut buf = [0u32; (HANDLE_HEADER + libc::MAX_HANDLE_SZ as usize) / 4];
    let fh = buf.as_mut_ptr() as *mut libc::file_handle;
    unsafe {
        (*fh).handle_bytes = h.bytes.len() as u32;
        (*fh).handle_type = h.ty;
        std::ptr::copy_nonoverlapping(h.bytes.as_ptr(), (buf.as_mut_ptr() as *mut u8).add(HANDLE_HEADER), h.bytes.len());
        loop {
            match cvt(libc::open_by_handle_at(mount.as_raw_fd(), fh, flags | libc::O_CLOEXEC)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                r => return r.map(|fd| OwnedFd::from_raw_fd(fd)),
            }
        }
    }
}
