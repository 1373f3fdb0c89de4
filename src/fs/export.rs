//! File handles of the mount: `open_by_handle_at(2)` and NFS re-export (issue 16 item 5).
//!
//! The kernel encodes a FUSE file handle as node id + generation (`fuse_encode_fh()`,
//! fs/fuse/inode.c). Decoding one whose inode it no longer has (after `drop_caches`, after
//! a remount) it asks the server, with FUSE_EXPORT_SUPPORT: LOOKUP of "." in that node id
//! (`fuse_get_dentry()`, which then wants the generation of the handle), and LOOKUP of
//! ".." in a directory's node id to reconnect it to the root (`fuse_get_parent()`).
//!
//! Node ids are backing inode numbers, so tdefs can open the backing inode from the node id
//! alone on filesystems with FILEID_INO32_GEN handles (ext4): a handle with generation 0
//! matches any generation, and tdefs reports the real one (the backing i_generation, also
//! in every other entry reply), so the kernel refuses a handle of a deleted file whose
//! number was reused (ESTALE). But the file dictionary is keyed by path: the inode also
//! needs its name under the backing root. Directories have "..": tdefs walks up and finds
//! each name in its parent, as the kernel's exportfs does. A file has no way up; tdefs
//! tries, in order, the location it had when the kernel last forgot it (kept in memory for
//! the last `DEPARTED_MAX` files), the path of its backing dentry if that is still
//! connected (`/proc/self/fd`), and a search of the backing tree bounded by
//! `SEARCH_MAX_ENTRIES`. Every candidate is checked against the file's own backing handle;
//! nothing is guessed. What stays ESTALE: files with more than one link (which name's
//! dictionary record would be a guess), files found by none of the three, anything outside
//! the backing directory or in tdefs' metadata directory, node ids of other filesystems
//! mounted inside the backing directory and of displaced files (top bits set), and
//! everything when the backing filesystem's handles are not FILEID_INO32_GEN or tdefs may
//! not open by handle (not root).

use std::collections::{HashMap, VecDeque};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::ops::ControlFlow;
use std::sync::Arc;

use fuser::{FileType, INodeNo};
use parking_lot::Mutex;

use super::volume::Volume;
use super::errno::{Error, Result};
use super::inode::Inode;
use crate::metadir::is_hidden_name;
use crate::sys::{self, Handle, Stat};

/// How many forgotten files' locations are remembered.
const DEPARTED_MAX: usize = 65_536;
/// How many directory entries a search for a file's name may read.
pub const SEARCH_MAX_ENTRIES: usize = 200_000;
/// Deepest directory chain followed up to the root.
const MAX_DEPTH: usize = 4096;

fn stale() -> Error {
    Error::Os(libc::ESTALE)
}

/// Where a forgotten file was: its handle, its directory's handle (`None`: the root) and
/// its name there.
struct Departed {
    handle: Handle,
    dir: Option<Handle>,
    name: OsString,
}

/// The last `DEPARTED_MAX` locations of forgotten files, by node id.
#[derive(Default)]
pub struct DepartedFiles {
    inner: Mutex<(HashMap<u64, Departed>, VecDeque<u64>)>,
}

impl DepartedFiles {
    fn remember(&self, nodeid: u64, d: Departed) {
        let mut g = self.inner.lock();
        let (map, order) = &mut *g;
        if map.insert(nodeid, d).is_none() {
            order.push_back(nodeid);
            while order.len() > DEPARTED_MAX {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
    }

    fn get(&self, nodeid: u64) -> Option<(Handle, Option<Handle>, OsString)> {
        self.inner.lock().0.get(&nodeid).map(|d| (d.handle.clone(), d.dir.clone(), d.name.clone()))
    }
}

fn same_inode(a: &Stat, b: &Stat) -> bool {
    a.st_dev == b.st_dev && a.st_ino == b.st_ino
}

/// The name of the entry with inode number `ino` in directory `dir` (read from the start).
fn name_of(dir: BorrowedFd<'_>, ino: u64) -> Result<Option<OsString>> {
    sys::lseek(dir, 0, libc::SEEK_SET)?;
    let found = sys::for_each_dirent(dir, |e| match e.ino == ino && !e.is_dot() {
        true => ControlFlow::Break(e.name.to_os_string()),
        false => ControlFlow::Continue(()),
    })?;
    Ok(found)
}

impl Volume {
    /// The FUSE generation of `inode`: its backing i_generation where the handle carries
    /// it; 0 for the root (the kernel made the root inode with generation 0 and would take
    /// any other for a reused node id) and where unknown.
    pub(super) fn generation(&self, inode: &Inode) -> u64 {
        if inode.nodeid == INodeNo::ROOT.0 {
            return 0;
        }
        inode.handle.as_ref().and_then(Handle::generation).map_or(0, u64::from)
    }

    /// LOOKUP of "." in `nodeid`: the inode itself, with one more kernel reference.
    pub fn lookup_dot(&self, nodeid: u64) -> Result<(Arc<Inode>, Stat)> {
        if nodeid == INodeNo::ROOT.0 {
            return Ok((self.root.clone(), sys::fstat(self.root_fd())?));
        }
        if let Ok(i) = self.inode(nodeid) {
            let st = sys::fstat(self.parent_fd(&i)?.as_fd())?;
            if self.inodes.add_ref(&i) {
                return Ok((i, st));
            }
        }
        self.find_unknown(nodeid).map_err(|e| {
            tracing::debug!(nodeid, error = %e, "a file handle of the mount could not be resolved (ESTALE)");
            stale()
        })
    }

    /// LOOKUP of ".." in directory `nodeid`: its parent, with one more kernel reference.
    pub fn lookup_dotdot(&self, nodeid: u64) -> Result<(Arc<Inode>, Stat)> {
        let dir = self.inode(nodeid)?;
        if dir.nodeid == INodeNo::ROOT.0 {
            return self.lookup_dot(nodeid);
        }
        let loc = dir.loc().ok_or_else(stale)?;
        let parent = loc.parent;
        if parent.nodeid == INodeNo::ROOT.0 {
            return Ok((parent, sys::fstat(self.root_fd())?));
        }
        let st = sys::fstat(self.parent_fd(&parent)?.as_fd())?;
        if !self.inodes.add_ref(&parent) {
            return Err(stale()); // released meanwhile: the kernel will ask again
        }
        Ok((parent, st))
    }

    /// Remember where a file the kernel forgot was (see `DepartedFiles`).
    pub(super) fn remember_departed(&self, inode: &Inode) {
        if inode.kind == FileType::Directory {
            return; // directories are found again through ".."
        }
        let (Some(handle), Some(loc)) = (inode.handle.clone(), inode.loc()) else { return };
        let dir = if loc.parent.nodeid == INodeNo::ROOT.0 {
            None
        } else {
            match loc.parent.handle.clone() {
                Some(h) => Some(h),
                None => return,
            }
        };
        self.departed.remember(inode.nodeid, Departed { handle, dir, name: loc.name });
    }

    /// An inode the kernel asks for by node id alone: open the backing inode, find its
    /// path, register it and the directories above it (held by it: `Inode::pins`).
    fn find_unknown(&self, nodeid: u64) -> Result<(Arc<Inode>, Stat)> {
        if nodeid >= 1 << 62 {
            return Err(stale()); // other filesystems, displaced files: not stable
        }
        let like = self.root_handle.as_ref().ok_or_else(stale)?;
        let h = Handle::any_generation(like, nodeid).ok_or_else(stale)?;
        let fd = sys::open_handle(self.mount_fd.as_fd(), &h, libc::O_PATH).map_err(|_| stale())?;
        let st = sys::fstat(fd.as_fd())?;
        if st.st_dev != self.root_dev {
            return Err(stale());
        }
        let handle = sys::handle_at(fd.as_fd(), OsStr::new(""))?;
        let path = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            self.dir_components(fd.as_fd(), &st)?
        } else {
            if st.st_nlink != 1 {
                return Err(stale()); // which name's record applies would be a guess
            }
            self.file_components(nodeid, fd.as_fd(), &st, &handle)?
        };
        if path.first().is_some_and(|c| is_hidden_name(c)) {
            return Err(stale());
        }
        let (i, st) = self.register_components(&path)?;
        if i.handle.as_ref() != Some(&handle) {
            self.forget(i.nodeid, 1);
            return Err(stale());
        }
        Ok((i, st))
    }

    /// Names from the backing root down to directory `fd` (stat `st`), walking "..".
    fn dir_components(&self, fd: BorrowedFd<'_>, st: &Stat) -> Result<Vec<OsString>> {
        let root = sys::fstat(self.root_fd())?;
        let mut names = Vec::new();
        let mut cur_st = *st;
        let mut cur: Option<OwnedFd> = None;
        for _ in 0..MAX_DEPTH {
            if same_inode(&cur_st, &root) {
                names.reverse();
                return Ok(names);
            }
            let here = cur.as_ref().map_or(fd, |f| f.as_fd());
            let up = sys::openat(here, OsStr::new(".."), libc::O_RDONLY | libc::O_DIRECTORY | self.dir_atime_flag(), 0)?;
            let up_st = sys::fstat(up.as_fd())?;
            if same_inode(&up_st, &cur_st) || up_st.st_dev != self.root_dev {
                return Err(stale()); // the filesystem's root: not below the backing root
            }
            let name = name_of(up.as_fd(), cur_st.st_ino)?.ok_or_else(stale)?;
            if !same_inode(&sys::fstatat(up.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW)?, &cur_st) {
                return Err(stale()); // renamed meanwhile
            }
            names.push(name);
            cur_st = up_st;
            cur = Some(up);
        }
        Err(stale())
    }

    /// Names from the backing root down to file `fd` (one link; stat `st`, handle `handle`).
    fn file_components(&self, nodeid: u64, fd: BorrowedFd<'_>, st: &Stat, handle: &Handle) -> Result<Vec<OsString>> {
        // Is `dir_fd/name` this very file?
        let is_it = |dir: BorrowedFd<'_>, name: &OsStr| -> bool {
            matches!(sys::fstatat(dir, name, libc::AT_SYMLINK_NOFOLLOW), Ok(s) if same_inode(&s, st))
                && sys::handle_at(dir, name).is_ok_and(|h| &h == handle)
        };
        // 1. Where it was when the kernel forgot it.
        if let Some((h, dir, name)) = self.departed.get(nodeid) {
            if &h == handle {
                let found = match &dir {
                    None => is_it(self.root_fd(), &name).then(Vec::new),
                    Some(dh) => match sys::open_handle(self.mount_fd.as_fd(), dh, libc::O_PATH | libc::O_DIRECTORY) {
                        Ok(d) if is_it(d.as_fd(), &name) => {
                            let dst = sys::fstat(d.as_fd())?;
                            self.dir_components(d.as_fd(), &dst).ok()
                        }
                        _ => None,
                    },
                };
                if let Some(mut comps) = found {
                    comps.push(name);
                    tracing::debug!(nodeid, "file handle resolved where the file was when forgotten");
                    return Ok(comps);
                }
            }
        }
        // 2. The path of its backing dentry, if connected.
        if let Some(comps) = self.proc_components(fd) {
            if let Some((name, dirs)) = comps.split_last() {
                if let Ok(d) = sys::open_dir_below(self.root_fd(), &join(dirs)) {
                    if is_it(d.as_fd(), name) {
                        tracing::debug!(nodeid, "file handle resolved by its backing dentry's path");
                        return Ok(comps);
                    }
                }
            }
        }
        // 3. A bounded search.
        let found = self.search(st, &is_it).ok_or_else(stale)?;
        tracing::debug!(nodeid, "file handle resolved by searching the backing directory");
        Ok(found)
    }

    /// Components of `fd`'s /proc/self/fd path below the backing root's, if it is there.
    fn proc_components(&self, fd: BorrowedFd<'_>) -> Option<Vec<OsString>> {
        let path = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok();
        let root = path(self.root_fd().as_raw_fd())?;
        let p = path(fd.as_raw_fd())?;
        let rel = p.strip_prefix(&root).ok()?;
        let comps: Vec<OsString> = rel.iter().map(|c| c.to_os_string()).collect();
        (!comps.is_empty() && comps.iter().all(|c| c != "." && c != "..")).then_some(comps)
    }

    /// Breadth-first search of the backing tree for the file `st`, reading at most
    /// `SEARCH_MAX_ENTRIES` entries.
    fn search(&self, st: &Stat, is_it: &dyn Fn(BorrowedFd<'_>, &OsStr) -> bool) -> Option<Vec<OsString>> {
        let mut queue: VecDeque<Vec<OsString>> = VecDeque::from([Vec::new()]);
        let mut seen = 0usize;
        while let Some(dir) = queue.pop_front() {
            let Ok(d) = sys::open_dir_below(self.root_fd(), &join(&dir)) else { continue };
            let Ok(dst) = sys::fstat(d.as_fd()) else { continue };
            if dst.st_dev != self.root_dev {
                continue;
            }
            let d = match sys::reopen(d.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY | self.dir_atime_flag()) {
                Ok(d) => d,
                Err(_) => continue,
            };
            // Some(answer) ends the search; a directory that cannot be read is skipped.
            let found = sys::for_each_dirent(d.as_fd(), |e| {
                seen += 1;
                if seen > SEARCH_MAX_ENTRIES {
                    tracing::info!(entries = SEARCH_MAX_ENTRIES, "gave up searching the backing directory for a file known only by its handle (ESTALE)");
                    return ControlFlow::Break(None);
                }
                if e.is_dot() || (dir.is_empty() && is_hidden_name(e.name)) {
                    return ControlFlow::Continue(());
                }
                let path = || {
                    let mut p = dir.clone();
                    p.push(e.name.to_os_string());
                    p
                };
                if e.ino == st.st_ino && is_it(d.as_fd(), e.name) {
                    return ControlFlow::Break(Some(path()));
                }
                if e.kind == libc::DT_DIR || e.kind == libc::DT_UNKNOWN {
                    queue.push_back(path());
                }
                ControlFlow::Continue(())
            });
            if let Ok(Some(answer)) = found {
                return answer;
            }
        }
        None
    }

    /// Look up `comps` from the root: the last one with the reference for the kernel, the
    /// directories above it held by it (`Inode::pins`).
    fn register_components(&self, comps: &[OsString]) -> Result<(Arc<Inode>, Stat)> {
        let mut cur = self.root.clone();
        let mut held = Vec::new();
        let release = |held: &[u64]| held.iter().for_each(|&n| self.forget(n, 1));
        for (k, c) in comps.iter().enumerate() {
            let (i, st) = match self.lookup(&cur, c) {
                Ok(r) => r,
                Err(e) => {
                    release(&held);
                    return Err(e);
                }
            };
            if k + 1 == comps.len() {
                i.pins.lock().extend_from_slice(&held);
                return Ok((i, st));
            }
            if i.kind != FileType::Directory {
                held.push(i.nodeid);
                release(&held);
                return Err(stale());
            }
            held.push(i.nodeid);
            cur = i;
        }
        release(&held);
        Err(stale()) // no components: the root, handled by the caller
    }
}

fn join(comps: &[OsString]) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, c) in comps.iter().enumerate() {
        if k > 0 {
            v.push(b'/');
        }
        v.extend_from_slice(c.as_bytes());
    }
    v
}
