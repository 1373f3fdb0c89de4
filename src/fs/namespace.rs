//! Namespace operations, in the order that keeps the dictionary invariant of
//! docs/design.md §5: every file whose bytes are ciphertext has a durable entry under every
//! name it has.
//!
//! - create / mknod / link: the entry is durable before the name exists in the backing dir.
//! - unlink: the name goes first; its entry is dropped after, and that record may reach the
//!   disk only once the directory change is durable (a barrier fsync of the directory).
//! - rename: a durable intent, the backing rename, then its outcome (behind a barrier). A
//!   crash in between is settled at mount by checking which inode the destination holds.

use std::ffi::OsStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use fuser::FileType;

use super::volume::{Origin, Volume};
use super::rotation::KeyUse;
use super::errno::{err, Error, Result};
use super::handle::FileHandle;
use super::inode::{FileEncryption, Inode, Loc};
use crate::dictionary::{FileEntry, Record};
use crate::sys::{self, Stat};

/// Who asked: the kernel's caller uid/gid.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

fn exists(dir: BorrowedFd<'_>, name: &OsStr) -> Result<Option<Stat>> {
    match sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Volume {
    /// Descriptors that can fsync directories `dirs` (for dictionary barriers).
    fn dir_barriers(&self, dirs: &[&Inode]) -> Vec<OwnedFd> {
        let mut v: Vec<OwnedFd> = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            if dirs[..i].iter().any(|o| o.nodeid == d.nodeid) {
                continue;
            }
            let fd = self.parent_fd(d).ok().and_then(|p| sys::openat(p.as_fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0).ok());
            v.extend(fd);
        }
        v
    }
}

impl Volume {
    /// Record, durably, that `parent/name` will be encrypted as `entry` (or, for `None`,
    /// that it has no entry: needed only when a stale one exists), or, for a new link of a
    /// file in online conversion (`conv`), that it joins that conversion. Returns the path when a
    /// record was written, so a failed create can undo it. `key_use`, the guard under which
    /// `entry`'s key was chosen, is released once the record is queued (before the wait
    /// for the disk).
    fn record_new_name(
        &self,
        parent: &Arc<Inode>,
        name: &OsStr,
        entry: Option<FileEntry>,
        conv: Option<u64>,
        key_use: KeyUse<'_>,
    ) -> Result<Option<Vec<u8>>> {
        let seq = {
            let _no_rename = self.rename_lock.read();
            let path = parent.child_path(name).ok_or(Error::Os(libc::ENOENT))?;
            let rec = match (entry, conv) {
                (Some(_), Some(id)) => Record::ConvertLink { id, path: path.clone() },
                (Some(entry), None) => Record::Put { path: path.clone(), entry },
                (None, _) if self.dict.get(&path).is_some() => Record::Delete { path: path.clone() },
                (None, _) => return Ok(None),
            };
            (self.dict.submit(rec)?, path)
        };
        drop(key_use);
        self.dict.sync(seq.0)?;
        Ok(Some(seq.1))
    }

    /// Undo `record_new_name` after the backing operation failed (the name does not exist).
    fn forget_new_name(&self, path: Option<Vec<u8>>) {
        if let Some(path) = path {
            let _no_rename = self.rename_lock.read();
            if self.dict.get(&path).is_some() {
                let _ = self.dict.submit(Record::Delete { path });
            }
        }
    }

    /// New files belong to the caller (the daemon creates them as root): uid of the caller,
    /// gid of the caller or, in a set-group-ID directory, of the directory.
    fn set_owner(&self, fd: BorrowedFd<'_>, parent: &Inode, who: Caller, mode: u32, is_dir: bool) -> Result<()> {
        if !self.can_chown {
            return Ok(());
        }
        let pst = sys::fstat(self.parent_fd(parent)?.as_fd())?;
        let gid = if pst.st_mode & libc::S_ISGID != 0 { pst.st_gid } else { who.gid };
        sys::fchown(fd, who.uid, gid)?;
        if !is_dir && mode & (libc::S_ISUID | libc::S_ISGID) != 0 {
            sys::fchmod_path(fd, mode & 0o7777)?; // chown cleared them
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create(&self, parent_id: u64, name: &OsStr, mode: u32, flags: i32, who: Caller) -> Result<(Arc<Inode>, Stat, u64)> {
        let parent = self.inode(parent_id)?;
        self.refuse_reserved_name(&parent, name)?;
        let parent_fd = self.parent_fd(&parent)?;
        if exists(parent_fd.as_fd(), name)?.is_some() {
            return err(libc::EEXIST);
        }
        let (entry, cipher, key_use) = self.new_entry()?;
        let recorded = self.record_new_name(&parent, name, Some(entry), None, key_use)?;
        let open_flags =
            libc::O_CREAT | libc::O_EXCL | libc::O_RDWR | (flags & (libc::O_SYNC | libc::O_DSYNC)) | self.file_atime_flag();
        let fd = match sys::openat(parent_fd.as_fd(), name, open_flags, mode & 0o7777) {
            Ok(fd) => fd,
            Err(e) => {
                self.forget_new_name(recorded);
                return Err(e.into());
            }
        };
        self.set_owner(fd.as_fd(), &parent, who, mode, false)?;
        let st = sys::fstat(fd.as_fd())?;
        let (inode, st) = self.register(&parent, name, &st, Origin::Created(Some(FileEncryption::recorded(entry, cipher))))?;
        let fh = self.files.insert(FileHandle::new(inode.clone(), fd));
        Ok((inode, st, fh))
    }

    pub fn mknod(&self, parent_id: u64, name: &OsStr, mode: u32, rdev: u32, who: Caller) -> Result<(Arc<Inode>, Stat)> {
        let parent = self.inode(parent_id)?;
        self.refuse_reserved_name(&parent, name)?;
        let parent_fd = self.parent_fd(&parent)?;
        if exists(parent_fd.as_fd(), name)?.is_some() {
            return err(libc::EEXIST);
        }
        let regular = mode & libc::S_IFMT == libc::S_IFREG || mode & libc::S_IFMT == 0;
        let mut preset = None;
        let mut recorded = None;
        if regular {
            let (entry, cipher, key_use) = self.new_entry()?;
            recorded = self.record_new_name(&parent, name, Some(entry), None, key_use)?;
            preset = Some(FileEncryption::recorded(entry, cipher));
        }
        if let Err(e) = sys::mknodat(parent_fd.as_fd(), name, mode, rdev as libc::dev_t) {
            self.forget_new_name(recorded);
            return Err(e.into());
        }
        let fd = sys::openat(parent_fd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        self.set_owner(fd.as_fd(), &parent, who, mode, false)?;
        let st = sys::fstat(fd.as_fd())?;
        self.register(&parent, name, &st, Origin::Created(preset))
    }

    pub fn mkdir(&self, parent_id: u64, name: &OsStr, mode: u32, who: Caller) -> Result<(Arc<Inode>, Stat)> {
        let parent = self.inode(parent_id)?;
        self.refuse_reserved_name(&parent, name)?;
        let parent_fd = self.parent_fd(&parent)?;
        sys::mkdirat(parent_fd.as_fd(), name, mode & 0o7777)?;
        let fd = sys::openat(parent_fd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        self.set_owner(fd.as_fd(), &parent, who, mode, true)?;
        let st = sys::fstat(fd.as_fd())?;
        self.register(&parent, name, &st, Origin::Created(None))
    }

    pub fn symlink(&self, parent_id: u64, name: &OsStr, target: &OsStr, who: Caller) -> Result<(Arc<Inode>, Stat)> {
        let parent = self.inode(parent_id)?;
        self.refuse_reserved_name(&parent, name)?;
        let parent_fd = self.parent_fd(&parent)?;
        sys::symlinkat(target, parent_fd.as_fd(), name)?;
        let fd = sys::openat(parent_fd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        self.set_owner(fd.as_fd(), &parent, who, 0, true)?;
        let st = sys::fstat(fd.as_fd())?;
        self.register(&parent, name, &st, Origin::Created(None))
    }

    pub fn link(&self, nodeid: u64, newparent_id: u64, newname: &OsStr) -> Result<(Arc<Inode>, Stat)> {
        let inode = self.inode(nodeid)?;
        let newparent = self.inode(newparent_id)?;
        self.refuse_reserved_name(&newparent, newname)?;
        let npfd = self.parent_fd(&newparent)?;
        if exists(npfd.as_fd(), newname)?.is_some() {
            return err(libc::EEXIST);
        }
        // The file's data lock is held (shared) until the new name exists: a truncation to
        // zero cannot re-key the file in between (it would leave the new name recording
        // the old keystream), and once linked the file has two links and is never re-keyed.
        // The entry is read and recorded under `key_use`, so key GC cannot take its key
        // meanwhile either.
        let data_lock = inode.data.read();
        let key_use = self.key_use.read();
        let entry = if inode.kind == FileType::RegularFile { data_lock.entry } else { None };
        let conv = data_lock.conv.as_ref().map(|c| c.id);
        let recorded = self.record_new_name(&newparent, newname, entry, conv, key_use)?;
        let ifd = self.parent_fd(&inode)?;
        if let Err(e) = sys::link_fd(ifd.as_fd(), npfd.as_fd(), newname) {
            self.forget_new_name(recorded);
            return Err(e.into());
        }
        drop(data_lock);
        let st = sys::fstat(ifd.as_fd())?;
        self.register(&newparent, newname, &st, Origin::Found)
    }

    pub fn unlink(&self, parent_id: u64, name: &OsStr) -> Result<()> {
        let parent = self.inode(parent_id)?;
        let parent_fd = self.parent_fd(&parent)?;
        let st = sys::fstatat(parent_fd.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW)?;
        let known = self.known_inode(parent_fd.as_fd(), name, &st);
        sys::unlinkat(parent_fd.as_fd(), name, 0)?;
        if let Some(i) = known {
            i.clear_loc_if(&parent, name);
        }
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            let barriers = self.dir_barriers(&[&parent]);
            let _no_rename = self.rename_lock.read();
            if let Some(path) = parent.child_path(name).filter(|p| self.dict.get(p).is_some()) {
                // The name is gone; a stale entry would be harmless, so a failure here is
                // logged, not returned.
                if let Err(e) = self.dict.submit_after(Record::Delete { path }, barriers) {
                    tracing::warn!(error = %e, "could not record the removal of a file's entry");
                }
            }
        }
        Ok(())
    }

    pub fn rmdir(&self, parent_id: u64, name: &OsStr) -> Result<()> {
        let parent = self.inode(parent_id)?;
        let parent_fd = self.parent_fd(&parent)?;
        let st = sys::fstatat(parent_fd.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW)?;
        let known = self.known_inode(parent_fd.as_fd(), name, &st);
        sys::unlinkat(parent_fd.as_fd(), name, libc::AT_REMOVEDIR)?;
        if let Some(i) = known {
            i.clear_loc_if(&parent, name);
        }
        Ok(())
    }

    pub fn rename(&self, parent_id: u64, name: &OsStr, newparent_id: u64, newname: &OsStr, flags: u32) -> Result<()> {
        let parent = self.inode(parent_id)?;
        let newparent = self.inode(newparent_id)?;
        self.refuse_reserved_name(&parent, name)?;
        self.refuse_reserved_name(&newparent, newname)?;
        let (parent_fd, npfd) = (self.parent_fd(&parent)?, self.parent_fd(&newparent)?);
        let src = sys::fstatat(parent_fd.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW)?;
        let dst = exists(npfd.as_fd(), newname)?;
        let src_inode = self.known_inode(parent_fd.as_fd(), name, &src);
        let dst_inode = dst.as_ref().and_then(|d| self.known_inode(npfd.as_fd(), newname, d));
        let rename = || sys::renameat2(parent_fd.as_fd(), name, npfd.as_fd(), newname, flags);
        if dst.is_some_and(|d| d.st_ino == src.st_ino && d.st_dev == src.st_dev) {
            return Ok(rename()?); // two links to one file: the backing decides (a no-op)
        }
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let is_dir = |st: &Stat| st.st_mode & libc::S_IFMT == libc::S_IFDIR;
        let intent = {
            let _no_rename = self.rename_lock.read();
            let from = parent.child_path(name).ok_or(Error::Os(libc::ENOENT))?;
            let to = newparent.child_path(newname).ok_or(Error::Os(libc::ENOENT))?;
            // Directories always get an intent: files may be created inside one while it
            // moves (the kernel does not lock a directory being renamed).
            let needed = is_dir(&src)
                || dst.as_ref().is_some_and(is_dir)
                || self.dict.with_tree(|t| t.has_node(&from) || t.has_node(&to));
            if needed {
                Some(self.dict.submit(Record::RenameIntent { from, to, from_ino: src.st_ino, exchange })?)
            } else {
                None
            }
        };
        if let Some(seq) = intent {
            if let Err(e) = self.dict.sync(seq) {
                let _ = self.dict.submit(Record::RenameAbort { intent: seq });
                return Err(e.into());
            }
        }
        let res = rename();
        let barriers = if intent.is_some() && res.is_ok() { self.dir_barriers(&[&parent, &newparent]) } else { Vec::new() };
        {
            let _no_rename = self.rename_lock.write();
            if let Some(seq) = intent {
                let rec = if res.is_ok() { Record::RenameDone { intent: seq } } else { Record::RenameAbort { intent: seq } };
                if let Err(e) = self.dict.submit_after(rec, barriers) {
                    tracing::error!(error = %e, "could not record a rename's outcome; it is settled at the next mount");
                }
            }
            if res.is_ok() {
                if let Some(i) = &src_inode {
                    i.set_loc(Some(Loc { parent: newparent.clone(), name: newname.to_os_string() }));
                }
                if let Some(d) = &dst_inode {
                    if exchange {
                        d.set_loc(Some(Loc { parent: parent.clone(), name: name.to_os_string() }));
                    } else {
                        d.clear_loc_if(&newparent, newname);
                    }
                }
            }
        }
        Ok(res?)
    }
}
