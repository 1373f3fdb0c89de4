//! The read/write path with its locking, truncation, fallocate, copy_file_range, and
//! re-keying of files that are emptied.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Arc;

use super::volume::Volume;
use super::data::{self, Store};
use super::errno::{err, Error, Result};
use super::handle::FileHandle;
use super::inode::{FileEncryption, Inode};
use crate::dictionary::Record;
use crate::sys;

/// The backing file through one descriptor.
struct Fd<'a>(BorrowedFd<'a>);

impl Store for Fd<'_> {
    fn pread(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        sys::pread_full(self.0, buf, off)
    }
    fn pwrite(&self, buf: &[u8], off: u64) -> io::Result<()> {
        sys::pwrite_all(self.0, buf, off)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(sys::fstat(self.0)?.st_size as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        sys::ftruncate(self.0, len)
    }
    fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()> {
        sys::fallocate(self.0, mode, off, len)
    }
}

thread_local! {
    /// Per-thread buffers: no allocation per request on the read/write path.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static WRITE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

fn cipher(st: &FileEncryption) -> Result<&crate::crypto::FileCipher> {
    st.cipher.as_ref().ok_or(Error::Os(libc::EIO))
}

impl Volume {
    fn handle(&self, fh: u64) -> Result<Arc<FileHandle>> {
        self.files.get(fh).ok_or(Error::Os(libc::EBADF))
    }

    /// Read and hand the plaintext to `reply` (borrowed from a per-thread buffer).
    pub fn read<R>(&self, fh: u64, off: u64, size: u32, reply: impl FnOnce(Result<&[u8]>) -> R) -> R {
        let h = match self.handle(fh) {
            Ok(h) => h,
            Err(e) => return reply(Err(e)),
        };
        READ_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            let st = h.inode.data.read();
            let r = cipher(&st).and_then(|c| Ok(data::read(&Fd(h.fd()), c, off, size as usize, &mut buf)?));
            drop(st);
            match r {
                Ok(()) => reply(Ok(&buf)),
                Err(e) => reply(Err(e)),
            }
        })
    }

    /// Before a write the kernel flagged FUSE_WRITE_KILL_SUIDGID: drop the set-id bits
    /// the writer may not keep. Returns whether the mode changed.
    pub fn kill_privs(&self, fh: u64, who: &super::setid::KillPrivs) -> Result<bool> {
        super::setid::kill_suidgid(self.handle(fh)?.fd(), who)
    }

    pub fn write(&self, fh: u64, off: u64, bytes: &[u8]) -> Result<u32> {
        let h = self.handle(fh)?;
        let store = Fd(h.fd());
        WRITE_BUF.with(|b| {
            let mut scratch = b.borrow_mut();
            {
                // Whole aligned blocks (database pages, writeback of full pages) and all
                // plaintext writes run concurrently under the shared lock.
                let st = h.inode.data.read();
                let c = cipher(&st)?;
                if c.is_plaintext() || (off % data::BLOCK == 0 && bytes.len() as u64 % data::BLOCK == 0) {
                    let size = if c.is_plaintext() { 0 } else { store.size()? };
                    if data::write_is_simple(c, off, bytes.len() as u64, size) {
                        data::write(&store, c, off, bytes, &mut scratch)?;
                        return Ok(bytes.len() as u32);
                    }
                }
            }
            let st = h.inode.data.write();
            data::write(&store, cipher(&st)?, off, bytes, &mut scratch)?;
            Ok(bytes.len() as u32)
        })
    }

    /// Truncate to `size`. Emptying a file with a single link gives it a fresh IV and the
    /// current data key, so its new contents never reuse the old keystream.
    pub(super) fn truncate(&self, inode: &Arc<Inode>, h: Option<Arc<FileHandle>>, size: u64) -> Result<()> {
        let owned;
        let fd = match &h {
            Some(h) => h.fd(),
            None => {
                owned = self.open_backing(inode, libc::O_RDWR)?;
                owned.as_fd()
            }
        };
        let store = Fd(fd);
        let mut st = inode.data.write();
        let stat = sys::fstat(fd)?;
        if st.entry.is_none() && stat.st_size > 0 {
            // Not even truncation: the bytes may be recoverable with the right dictionary.
            return Err(self.refuse_unrecorded(inode));
        }
        if size == 0 && stat.st_nlink == 1 {
            return self.rekey(inode, &mut st, fd);
        }
        data::truncate(&store, cipher(&st)?, size)?;
        Ok(())
    }

    /// Empty the file and record a fresh entry for it. Order: the backing file is emptied
    /// and that made durable first, so a crash leaves an empty file, whichever entry wins.
    ///
    /// Needs the file's current name: when it is unknown (the name the kernel last used was
    /// unlinked, another link remains) the file keeps its entry and is simply emptied. A new
    /// keystream that only memory knows would turn its next contents into noise at the next
    /// mount.
    pub(super) fn rekey(&self, inode: &Arc<Inode>, st: &mut FileEncryption, fd: BorrowedFd<'_>) -> Result<()> {
        let named = {
            let _no_rename = self.rename_lock.read();
            inode.path().is_some()
        };
        if !named {
            return Ok(data::truncate(&Fd(fd), cipher(st)?, 0)?);
        }
        sys::ftruncate(fd, 0)?;
        let (entry, cipher, key_use) = self.new_entry()?;
        // (A file in online conversion is recorded as converting: the new entry must replace that.)
        if entry.method.is_plaintext() && st.entry.is_some_and(|e| e.method.is_plaintext()) && st.conv.is_none() {
            *st = FileEncryption::recorded(entry, cipher);
            return Ok(()); // recorded plaintext stays plaintext: nothing to record
        }
        sys::fdatasync(fd)?;
        let seq = {
            let _no_rename = self.rename_lock.read();
            let Some(path) = inode.path() else {
                // Its last name was unlinked meanwhile (no link left): nothing to record;
                // the new keystream lives in memory for as long as the file is open.
                *st = FileEncryption::recorded(entry, cipher);
                return Ok(());
            };
            self.dict.submit(Record::Put { path, entry })?
        };
        drop(key_use);
        self.dict.sync(seq)?;
        *st = FileEncryption::recorded(entry, cipher);
        Ok(())
    }

    /// A writer opened an empty file that is recorded as plaintext while the configured
    /// method encrypts: it has no bytes to keep readable, so encrypt it from now on.
    pub(super) fn adopt_if_empty(&self, inode: &Arc<Inode>, h: &FileHandle) -> Result<()> {
        let plaintext = |st: &FileEncryption| st.entry.is_some_and(|e| e.method.is_plaintext());
        if self.opts.method.is_plaintext() || !plaintext(&inode.data.read()) {
            return Ok(());
        }
        let mut st = inode.data.write();
        let stat = sys::fstat(h.fd())?;
        if !plaintext(&st) || stat.st_size != 0 || stat.st_nlink != 1 {
            return Ok(());
        }
        self.rekey(inode, &mut st, h.fd())
    }

    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        let h = self.handle(fh)?;
        let st = h.inode.data.write();
        Ok(data::fallocate(&Fd(h.fd()), cipher(&st)?, mode, off, len)?)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.handle(fh)?;
        Ok(if datasync { sys::fdatasync(h.fd())? } else { sys::fsync(h.fd())? })
    }

    /// SEEK_DATA / SEEK_HOLE (the kernel answers the other whences itself).
    pub fn lseek(&self, fh: u64, off: i64, whence: i32) -> Result<i64> {
        let h = self.handle(fh)?;
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return err(libc::EINVAL);
        }
        if off < 0 {
            return err(libc::ENXIO);
        }
        let fd = h.fd();
        let backing = |o: u64, w: i32| sys::lseek(fd, o as i64, w).map(|r| r as u64);
        let st = h.inode.data.read();
        let c = cipher(&st)?;
        Ok(data::seek(&Fd(fd), c, off as u64, whence == libc::SEEK_DATA, &backing)? as i64)
    }

    /// Copy through the ciphers (the two files have different keys and IVs).
    pub fn copy_file_range(&self, fh_in: u64, off_in: u64, fh_out: u64, off_out: u64, len: u64) -> Result<u32> {
        const CHUNK: u64 = 1 << 20;
        let len = len.min(u32::MAX as u64 & !(CHUNK - 1));
        let mut done = 0u64;
        let mut buf = Vec::new();
        while done < len {
            let want = (len - done).min(CHUNK) as u32;
            let n = self.read(fh_in, off_in + done, want, |r| {
                r.map(|d| {
                    buf.clear();
                    buf.extend_from_slice(d);
                    d.len()
                })
            })?;
            if n == 0 {
                break;
            }
            self.write(fh_out, off_out + done, &buf[..n])?;
            done += n as u64;
            if n < want as usize {
                break;
            }
        }
        Ok(done as u32)
    }
}
