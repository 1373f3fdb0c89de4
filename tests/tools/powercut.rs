//! Power-cut simulator (issues 9 and 21): a passthrough FUSE filesystem that keeps, for every
//! file, the bytes and size it had at its last fsync/fdatasync, and for every directory the
//! namespace operations not yet made durable; on command (`cut` on the control socket) it
//! throws away everything a power loss would.
//!
//! # Data
//!
//! Data reaches the lower directory at once, and an undo log records the original contents
//! of each 4 KiB page the first time it changes after a sync (and the size at the last
//! sync). fsync and fdatasync of a file make its data and size durable (the undo log is
//! dropped); writes through an O_SYNC/O_DSYNC handle are durable when they return;
//! sync_file_range never reaches a FUSE filesystem, and neither do sync(2) and syncfs(2)
//! (the kernel sends FUSE_SYNCFS to virtiofs only, and fuser has no such operation): they
//! make nothing durable. Attributes (mode, owner, times) and xattrs are not modelled: they
//! are durable at once.
//!
//! # Namespace
//!
//! Namespace operations (create, mkdir, mknod, symlink, link, unlink, rmdir, rename) reach
//! the lower directory at once too, and each is appended, with a sequence number, to a log
//! of operations not yet durable, against the directories whose entries it changes (a
//! rename: the source and the destination directory). At a cut the operations still in the
//! log are undone, newest first, so every directory falls back to its state at the point
//! its durable history ends:
//!
//! - undoing a create/mknod/symlink/link removes the name; undoing a mkdir removes the
//!   directory with whatever it holds (a name in a directory whose own name was never made
//!   durable is lost with it, however often that directory was fsynced);
//! - unlink and rmdir do not delete: the name is moved into a hidden stash directory in the
//!   lower root (`.powercut-stash`, invisible through the mount); undoing moves it back,
//!   same inode, with its data as of its last durable state (the data undo log of a file is
//!   kept until its removal is durable) and its attributes as they are;
//! - undoing a rename moves the name back, and brings back from the stash a target it
//!   replaced; undoing RENAME_EXCHANGE exchanges again.
//!
//! When an operation becomes durable it leaves the log (a durable unlink/rmdir, or a rename
//! that replaced a target, drops the stashed name for good). Which operations are durable
//! depends on the mode (`--mode`, or the environment variable POWERCUT_MODE; default
//! strict):
//!
//! **strict** (POSIX; what ALICE and CrashMonkey assume): fsync (or fdatasync, or an
//! O_SYNC/O_DSYNC write) of a file makes its data and size durable, never its name: a new
//! file is durable only once its directory is fsynced too, and a new directory only once
//! its parent is (fsync of a directory does not make the directory's own name durable).
//! fsync of a directory D makes every earlier operation that changed D's entries durable.
//! Durability is closed under "earlier in the same directory": an operation that becomes
//! durable makes durable every earlier operation on each directory it changed, so every
//! directory's durable history stays a prefix of its history. For a rename that means it is
//! atomic: durable as a whole once either its source or its destination directory is
//! fsynced, never half (a file under both names, or under none). POSIX requires rename to be
//! atomic, and every journalling filesystem commits both directory changes in one
//! transaction; splitting it would show states no filesystem produces, and an application
//! that fsyncs only one of the two directories is then treated as a real filesystem treats
//! it. (An rmdir also makes durable every earlier operation inside the removed directory.)
//!
//! **ext4** (ext4 data=ordered as it behaves in practice): every fsync or fdatasync (of a
//! file or a directory) and every O_SYNC/O_DSYNC write commits the running journal
//! transaction, which holds every namespace operation of the whole filesystem: all of them
//! that happened before it become durable. Data is as in strict mode (other files' data is
//! not written by a commit: delayed allocation). Not modelled: fast commits, an fdatasync
//! of an overwrite that needs no journal commit (here it always commits: more lenient than
//! ext4), the periodic commit every 5 s, auto_da_alloc.
//!
//! It serves every file with direct I/O and zero cache lifetimes, so the kernel above holds
//! nothing a cut would make stale. The control socket also reports how often each directory
//! was fsynced, to show that directory fsyncs reach the layer below.
//!
//! Limits. A cut is meant to follow the death of whatever runs above (it waits until no
//! file is open). A crash without power loss (kill -9, then a remount) leaves everything in
//! the page cache of a real disk, where it reaches the disk sooner or later (and tdefs'
//! recovery calls syncfs, which this simulator never sees): to model that, send `sync`
//! before the remount, or the simulator stays stricter than a disk. Names are the lower
//! directory's: the stash's name is reserved in the root (ENOENT on lookup, EPERM on
//! create). Names in the stash are left out of st_nlink, so an unlinked file still open
//! shows 0 as on a disk; not so for directories: an rmdir'd directory still open shows its
//! old count.
//!
//! Inode numbers (`--numbers`, or POWERCUT_NUMBERS): `lower` (default) shows the lower
//! filesystem's; `reuse` numbers inodes itself and gives the number of an inode that is
//! gone to the very next new one, whatever the lower filesystem, as ext4 often does. Node
//! ids are the numbers and generations are 0, so a reused number is a reused file handle.
//!
//!   tdefs-powercut --lower DIR --mount DIR --control SOCKET [--mode strict|ext4] [--numbers lower|reuse]
//!   control commands (one line each, one line answered):
//!     cut         -> `ok <files rolled back>` (unchanged since issue 9; see `lastcut`)
//!     lastcut     -> `ok files=<n> namespace=<ops undone> errors=<undo errors>` of the last cut
//!     mode        -> `ok strict` | `ok ext4`
//!     pending     -> `ok <namespace operations not yet durable>`
//!     sync        -> `ok`: make everything durable now (data and namespace), as sync(2)
//!                    would on a real disk
//!     stats       -> `dirty_files=N pending_namespace=N mode=M key=value...`
//!     dirsyncs DIR -> `ok <fsyncs of the lower directory DIR>`

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};
use tdefs::fs::{kind_of, system_time};
use tdefs::sys;

const PAGE: u64 = 4096;
const TTL: Duration = Duration::ZERO;
/// Where removed names wait until their removal is durable (in the lower root, hidden).
const STASH: &str = ".powercut-stash";

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Mode {
    /// POSIX: a name is durable once its directory is fsynced.
    Strict,
    /// ext4's journal: any fsync commits every earlier namespace operation.
    Ext4,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Strict => "strict",
            Mode::Ext4 => "ext4",
        }
    }
}

#[derive(Parser)]
#[command(about = "Power-cut simulator: a FUSE passthrough that can drop every write and namespace change not yet durable")]
struct Args {
    #[arg(long)]
    lower: PathBuf,
    #[arg(long)]
    mount: PathBuf,
    #[arg(long)]
    control: PathBuf,
    /// Which namespace operations an fsync makes durable (default: $POWERCUT_MODE, else strict).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Inode numbers shown through the mount (default: $POWERCUT_NUMBERS, else lower).
    #[arg(long, value_enum)]
    numbers: Option<Numbering>,
}

/// Where the inode numbers (FUSE node ids, and so the file handles, whose generation is
/// always 0) shown through the mount come from.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Numbering {
    /// The lower filesystem's: reused or not as its allocator decides (ext4 often reuses a
    /// freed number at once, tmpfs never does).
    Lower,
    /// The simulator's own: the number of an inode that is gone (forgotten by the kernel,
    /// no name left, none in the stash) goes to the very next new inode, on any lower
    /// filesystem. The worst case of ext4's allocator, every time.
    Reuse,
}

/// The simulator's own inode numbers (`--numbers reuse`).
#[derive(Default)]
struct Numbers {
    by_lower: HashMap<u64, u64>,
    lower_of: HashMap<u64, u64>,
    /// Freed numbers, the latest last: given out first.
    free: Vec<u64>,
    next: u64,
}

/// What a file looked like at its last sync.
struct Undo {
    file: File,
    size: u64,
    /// Original bytes of each page changed since (shorter than a page at the end of file).
    pages: BTreeMap<u64, Vec<u8>>,
}

struct Node {
    fd: OwnedFd,
    /// Inode number in the lower filesystem.
    ino: u64,
    kind: FileType,
    lookups: AtomicU64,
}

struct Open {
    ino: u64,
    file: File,
    sync: bool,
}

/// A name moved into the stash.
struct Stashed {
    name: OsString,
    ino: u64,
    is_dir: bool,
}

/// A namespace change not yet durable. Directories are held by their `O_PATH` node, which
/// follows them wherever they are renamed.
enum Change {
    /// `name` was added to `dir` (create, mknod, mkdir, symlink, link).
    Added { dir: Arc<Node>, name: OsString, ino: u64, is_dir: bool },
    /// `name` was removed from `dir` (unlink, rmdir) and waits in the stash.
    Removed { dir: Arc<Node>, name: OsString, gone: Stashed },
    /// `from/name` became `to/newname`, replacing what is now `replaced` in the stash.
    Renamed { from: Arc<Node>, name: OsString, to: Arc<Node>, newname: OsString, ino: u64, replaced: Option<Stashed> },
    /// RENAME_EXCHANGE of `a/an` and `b/bn`.
    Exchanged { a: Arc<Node>, an: OsString, b: Arc<Node>, bn: OsString },
}

struct NsOp {
    seq: u64,
    what: &'static str,
    change: Change,
}

impl NsOp {
    /// Directories whose entries it changes: an fsync of any of them makes it durable.
    fn dirs(&self) -> [Option<u64>; 2] {
        match &self.change {
            Change::Added { dir, .. } | Change::Removed { dir, .. } => [Some(dir.ino), None],
            Change::Renamed { from, to, .. } => [Some(from.ino), Some(to.ino)],
            Change::Exchanged { a, b, .. } => [Some(a.ino), Some(b.ino)],
        }
    }

    /// Directories whose earlier operations are durable once it is: those it changes and a
    /// directory it removes (an rmdir'd directory was empty: its removals happened).
    fn deps(&self) -> [Option<u64>; 3] {
        let [a, b] = self.dirs();
        let removed = match &self.change {
            Change::Removed { gone, .. } if gone.is_dir => Some(gone.ino),
            Change::Renamed { replaced: Some(r), .. } if r.is_dir => Some(r.ino),
            _ => None,
        };
        [a, b, removed]
    }

    fn describe(&self) -> String {
        let n = |d: &Arc<Node>, name: &OsStr| format!("dir#{}/{}", d.ino, name.to_string_lossy());
        match &self.change {
            Change::Added { dir, name, .. } => format!("#{} {} {}", self.seq, self.what, n(dir, name)),
            Change::Removed { dir, name, .. } => format!("#{} {} {}", self.seq, self.what, n(dir, name)),
            Change::Renamed { from, name, to, newname, .. } => format!("#{} {} {} -> {}", self.seq, self.what, n(from, name), n(to, newname)),
            Change::Exchanged { a, an, b, bn } => format!("#{} {} {} <-> {}", self.seq, self.what, n(a, an), n(b, bn)),
        }
    }
}

/// The namespace log and the stash.
struct Ns {
    seq: u64,
    /// Operations not yet durable, oldest first.
    pending: Vec<NsOp>,
    stash: OwnedFd,
    next_stash: u64,
}

#[derive(Default, Clone, Copy)]
struct CutReport {
    files: usize,
    namespace: usize,
    errors: usize,
}

struct Sim {
    mode: Mode,
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    opens: Mutex<HashMap<u64, Arc<Open>>>,
    next_fh: AtomicU64,
    dirty: Mutex<HashMap<u64, Undo>>,
    /// Writers and namespace operations hold it shared; a cut holds it exclusively.
    cut_lock: RwLock<()>,
    /// Lock order: cut_lock, ns, nodes, stashed, dirty.
    ns: Mutex<Ns>,
    /// Names each (non-directory) inode has in the stash: not counted in st_nlink.
    stashed: Mutex<HashMap<u64, u64>>,
    dir_syncs: Mutex<HashMap<u64, u64>>,
    stats: Mutex<BTreeMap<&'static str, u64>>,
    last_cut: Mutex<CutReport>,
    root_ino: u64,
    /// `Some` with `--numbers reuse`. Lock order: after `nodes`.
    numbers: Option<Mutex<Numbers>>,
}

fn errno(e: std::io::Error) -> Errno {
    Errno::from_i32(e.raw_os_error().unwrap_or(libc::EIO))
}

fn is_dir(st: &sys::Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// `dir/name` as a path (through `/proc/self/fd`), for std's recursive removal.
fn path_in(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(sys::proc_path(dir.as_raw_fd()).as_bytes())).join(name)
}

fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<()> {
    std::fs::remove_dir_all(path_in(dir, name))
}

/// Whether the directory `dir/name` has no entries.
fn dir_is_empty(dir: BorrowedFd<'_>, name: &OsStr) -> std::io::Result<bool> {
    let fd = sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)?;
    let other = sys::for_each_dirent(fd.as_fd(), |e| if e.is_dot() { ControlFlow::Continue(()) } else { ControlFlow::Break(()) })?;
    Ok(other.is_none())
}

impl Sim {
    fn count(&self, what: &'static str) {
        self.count_n(what, 1);
    }

    fn count_n(&self, what: &'static str, n: u64) {
        if n > 0 {
            *self.stats.lock().entry(what).or_default() += n;
        }
    }

    /// The number shown for lower inode `ino` (given one now if it has none).
    fn nodeid(&self, ino: u64) -> u64 {
        if ino == self.root_ino {
            return 1;
        }
        let Some(numbers) = &self.numbers else { return ino };
        let mut n = numbers.lock();
        if let Some(&id) = n.by_lower.get(&ino) {
            return id;
        }
        let id = match n.free.pop() {
            Some(id) => {
                self.count("numbers_reused");
                id
            }
            None => {
                n.next = n.next.max(2);
                n.next += 1;
                n.next - 1
            }
        };
        n.by_lower.insert(ino, id);
        n.lower_of.insert(id, ino);
        self.count("numbers_given");
        id
    }

    /// The lower inode number behind node id `id`.
    fn lower_ino(&self, id: u64) -> u64 {
        if id == 1 {
            return self.root_ino;
        }
        match &self.numbers {
            Some(numbers) => numbers.lock().lower_of.get(&id).copied().unwrap_or(id),
            None => id,
        }
    }

    /// Lower inode `ino` is gone for good and the kernel holds no node for number `id`
    /// (the caller holds `nodes`): `id` goes to the next new inode.
    fn free_number(&self, id: u64, ino: u64) {
        let Some(numbers) = &self.numbers else { return };
        let mut n = numbers.lock();
        if n.lower_of.get(&id) == Some(&ino) {
            n.lower_of.remove(&id);
            n.by_lower.remove(&ino);
            n.free.push(id);
            drop(n);
            self.count("numbers_freed");
        }
    }

    fn attr(&self, st: &sys::Stat) -> FileAttr {
        // Names in the stash are removed names: the link count the mount shows leaves them out
        // (and the root's leaves out the stash directory itself).
        let hidden = if st.st_ino == self.root_ino {
            1
        } else if is_dir(st) {
            0
        } else {
            self.stashed.lock().get(&st.st_ino).copied().unwrap_or(0)
        };
        FileAttr {
            ino: INodeNo(self.nodeid(st.st_ino)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: kind_of(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink: (st.st_nlink as u64).saturating_sub(hidden) as u32,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: 4096,
            flags: 0,
        }
    }

    fn node(&self, nodeid: INodeNo) -> Result<Arc<Node>, Errno> {
        self.nodes.read().get(&nodeid.0).cloned().ok_or(Errno::ESTALE)
    }

    /// The stash's name in the root is reserved: it does not exist through the mount.
    fn reserved(&self, parent: &Node, name: &OsStr) -> bool {
        parent.ino == self.root_ino && name == STASH
    }

    fn lookup_in(&self, parent: &Node, name: &OsStr) -> Result<FileAttr, Errno> {
        if self.reserved(parent, name) {
            return Err(Errno::ENOENT);
        }
        let fd = sys::openat(parent.fd.as_fd(), name, libc::O_PATH | libc::O_NOFOLLOW, 0).map_err(errno)?;
        let st = sys::fstat(fd.as_fd()).map_err(errno)?;
        let mut nodes = self.nodes.write();
        let id = self.nodeid(st.st_ino);
        let fresh = |lookups| Arc::new(Node { fd, ino: st.st_ino, kind: kind_of(st.st_mode), lookups: AtomicU64::new(lookups) });
        match nodes.get(&id) {
            // The kernel still knows an inode whose number the lower filesystem gave to a new
            // file (the old one is deleted, e.g. by a cut): serve the new one from now on.
            Some(n) if sys::fstat(n.fd.as_fd()).map(|o| o.st_nlink == 0 || o.st_mode & libc::S_IFMT != st.st_mode & libc::S_IFMT).unwrap_or(true) => {
                let l = n.lookups.load(Ordering::Relaxed);
                nodes.insert(id, fresh(l + 1));
            }
            Some(n) => {
                n.lookups.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                nodes.insert(id, fresh(1));
            }
        }
        Ok(self.attr(&st))
    }

    /// Record the original bytes of every page of `[off, end)` not recorded since the last
    /// sync (the caller holds the cut lock shared and is about to change them).
    fn save(&self, ino: u64, file: &File, off: u64, end: u64) -> std::io::Result<()> {
        let mut dirty = self.dirty.lock();
        let size = sys::fstat(file.as_fd())?.st_size as u64;
        let u = match dirty.entry(ino) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Undo { file: file.try_clone()?, size, pages: BTreeMap::new() }),
        };
        if end <= off {
            return Ok(());
        }
        for p in off / PAGE..=(end - 1) / PAGE {
            if let std::collections::btree_map::Entry::Vacant(v) = u.pages.entry(p) {
                let mut buf = vec![0u8; PAGE as usize];
                let n = sys::pread_full(file.as_fd(), &mut buf, p * PAGE)?;
                buf.truncate(n);
                v.insert(buf);
            }
        }
        Ok(())
    }

    /// A size change from `cur` to `new`: the pages that vanish or gain zeros change.
    fn save_resize(&self, ino: u64, file: &File, new: u64) -> std::io::Result<()> {
        let cur = sys::fstat(file.as_fd())?.st_size as u64;
        if new < cur {
            self.save(ino, file, new, cur)
        } else {
            self.save(ino, file, cur, cur.max(new.min(cur.div_ceil(PAGE) * PAGE)))
        }
    }

    /// Data written through an O_SYNC/O_DSYNC handle is durable: fold it into the undo record.
    fn synced_write(&self, ino: u64, data: &[u8], off: u64) {
        let mut dirty = self.dirty.lock();
        if let Some(u) = dirty.get_mut(&ino) {
            let end = off + data.len() as u64;
            for (&p, orig) in u.pages.range_mut(off / PAGE..=(end - 1) / PAGE) {
                let (ps, pe) = (p * PAGE, p * PAGE + PAGE);
                let (lo, hi) = (off.max(ps), end.min(pe));
                let need = (hi - ps) as usize;
                if orig.len() < need {
                    orig.resize(need, 0);
                }
                orig[(lo - ps) as usize..need].copy_from_slice(&data[(lo - off) as usize..(hi - off) as usize]);
            }
            u.size = u.size.max(end);
        }
    }

    fn synced(&self, ino: u64) {
        self.dirty.lock().remove(&ino);
    }

    // ------------------------------------------------------------ namespace log

    /// Append a namespace change to the log (the caller holds `ns` since before the change).
    fn record(&self, ns: &mut Ns, what: &'static str, change: Change) {
        ns.seq += 1;
        let seq = ns.seq;
        ns.pending.push(NsOp { seq, what, change });
        self.count("namespace_ops");
    }

    /// Move `dir/name` into the stash instead of deleting it.
    fn stash_away(&self, ns: &mut Ns, dir: &Node, name: &OsStr, st: &sys::Stat) -> std::io::Result<Stashed> {
        ns.next_stash += 1;
        let s = OsString::from(ns.next_stash.to_string());
        sys::renameat2(dir.fd.as_fd(), name, ns.stash.as_fd(), &s, libc::RENAME_NOREPLACE)?;
        if !is_dir(st) {
            *self.stashed.lock().entry(st.st_ino).or_default() += 1;
        }
        Ok(Stashed { name: s, ino: st.st_ino, is_dir: is_dir(st) })
    }

    fn unstash_count(&self, g: &Stashed) {
        if !g.is_dir {
            let mut s = self.stashed.lock();
            if let Some(n) = s.get_mut(&g.ino) {
                *n -= 1;
                if *n == 0 {
                    s.remove(&g.ino);
                }
            }
        }
    }

    /// Put a stashed name back as `dir/name`.
    fn unstash(&self, ns: &Ns, g: &Stashed, dir: &Node, name: &OsStr) -> std::io::Result<()> {
        sys::renameat2(ns.stash.as_fd(), &g.name, dir.fd.as_fd(), name, libc::RENAME_NOREPLACE)?;
        self.unstash_count(g);
        Ok(())
    }

    /// The removal of a stashed name is durable: delete it for good, with the undo log of a
    /// file no other name keeps.
    fn purge(&self, ns: &Ns, g: &Stashed) {
        let (r, gone) = if g.is_dir {
            let r = remove_tree(ns.stash.as_fd(), &g.name);
            let ok = r.is_ok();
            (r, ok)
        } else {
            let last = sys::fstatat(ns.stash.as_fd(), &g.name, libc::AT_SYMLINK_NOFOLLOW).map(|st| st.st_nlink <= 1);
            let r = sys::unlinkat(ns.stash.as_fd(), &g.name, 0);
            let gone = r.is_ok() && last.unwrap_or(false);
            if gone {
                self.synced(g.ino);
            }
            (r, gone)
        };
        self.unstash_count(g);
        if gone && self.numbers.is_some() {
            // Its last name is gone: its number is free unless the kernel still holds it
            // (then the forget frees it).
            let nodes = self.nodes.read();
            let id = self.numbers.as_ref().and_then(|n| n.lock().by_lower.get(&g.ino).copied());
            if let Some(id) = id.filter(|id| !nodes.contains_key(id)) {
                self.free_number(id, g.ino);
            }
        }
        if let Err(e) = r {
            eprintln!("powercut: cannot drop stashed {}: {e}", g.name.to_string_lossy());
            self.count("purge_errors");
        }
    }

    /// `op` is durable: it leaves the log.
    fn commit(&self, ns: &Ns, op: NsOp) {
        match op.change {
            Change::Removed { gone, .. } => self.purge(ns, &gone),
            Change::Renamed { replaced: Some(r), .. } => self.purge(ns, &r),
            _ => {}
        }
        self.count("namespace_made_durable");
    }

    /// Every logged operation is durable (an ext4 journal commit; `sync`).
    fn commit_all(&self) {
        let mut ns = self.ns.lock();
        let ops = std::mem::take(&mut ns.pending);
        for op in ops {
            self.commit(&ns, op);
        }
    }

    /// fsync of directory `dir` (lower inode number).
    fn dir_synced(&self, dir: u64) {
        if self.mode == Mode::Ext4 {
            return self.commit_all();
        }
        let mut ns = self.ns.lock();
        // Newest first: an op is durable when a directory it changed was fsynced after it
        // (the frontier of that directory reaches its seq); a durable op moves the frontier
        // of every directory it depends on to its own seq.
        let mut frontier: HashMap<u64, u64> = HashMap::from([(dir, u64::MAX)]);
        let ops = std::mem::take(&mut ns.pending);
        let (mut keep, mut durable) = (Vec::new(), Vec::new());
        for op in ops.into_iter().rev() {
            let hit = op.dirs().iter().flatten().any(|d| frontier.get(d).is_some_and(|&f| f >= op.seq));
            if hit {
                for d in op.deps().into_iter().flatten() {
                    let f = frontier.entry(d).or_insert(0);
                    *f = (*f).max(op.seq);
                }
                durable.push(op);
            } else {
                keep.push(op);
            }
        }
        keep.reverse();
        ns.pending = keep;
        for op in durable.into_iter().rev() {
            self.commit(&ns, op);
        }
    }

    /// fsync/fdatasync of a file, or a write through an O_SYNC/O_DSYNC handle.
    fn file_synced(&self, ino: u64) {
        self.synced(ino);
        if self.mode == Mode::Ext4 {
            self.commit_all();
        }
    }

    /// Undo one logged operation (all later ones on its directories are undone already).
    fn undo(&self, ns: &Ns, op: &NsOp) -> std::io::Result<()> {
        let check = |dir: &Node, name: &OsStr, ino: u64| -> std::io::Result<()> {
            let st = sys::fstatat(dir.fd.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW)?;
            if st.st_ino != ino {
                return Err(std::io::Error::other(format!("holds inode {} instead of {ino}", st.st_ino)));
            }
            Ok(())
        };
        match &op.change {
            Change::Added { dir, name, ino, is_dir } => {
                check(dir, name, *ino)?;
                if *is_dir {
                    remove_tree(dir.fd.as_fd(), name)
                } else {
                    sys::unlinkat(dir.fd.as_fd(), name, 0)
                }
            }
            Change::Removed { dir, name, gone } => self.unstash(ns, gone, dir, name),
            Change::Renamed { from, name, to, newname, ino, replaced } => {
                check(to, newname, *ino)?;
                sys::renameat2(to.fd.as_fd(), newname, from.fd.as_fd(), name, libc::RENAME_NOREPLACE)?;
                match replaced {
                    Some(r) => self.unstash(ns, r, to, newname),
                    None => Ok(()),
                }
            }
            Change::Exchanged { a, an, b, bn } => sys::renameat2(a.fd.as_fd(), an, b.fd.as_fd(), bn, libc::RENAME_EXCHANGE),
        }
    }

    /// Drop every write since each file's last sync, and undo every namespace operation not
    /// yet durable.
    fn cut(&self) -> Result<usize, String> {
        let t = Instant::now();
        while !self.opens.lock().is_empty() {
            if t.elapsed() > Duration::from_secs(20) {
                return Err(format!("{} files still open; stop the filesystem above first", self.opens.lock().len()));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _all = self.cut_lock.write();
        let mut ns = self.ns.lock();
        let n = {
            let mut dirty = self.dirty.lock();
            let n = dirty.len();
            for (_, u) in dirty.drain() {
                let fd = u.file.as_fd();
                sys::ftruncate(fd, u.size).map_err(|e| e.to_string())?;
                for (p, orig) in &u.pages {
                    if p * PAGE < u.size {
                        let keep = ((u.size - p * PAGE) as usize).min(orig.len());
                        sys::pwrite_all(fd, &orig[..keep], p * PAGE).map_err(|e| e.to_string())?;
                    }
                }
                sys::fsync(fd).map_err(|e| e.to_string())?;
            }
            n
        };
        let ops = std::mem::take(&mut ns.pending);
        let mut errors = 0;
        for op in ops.iter().rev() {
            if let Err(e) = self.undo(&ns, op) {
                eprintln!("powercut: cut: cannot undo {}: {e}", op.describe());
                errors += 1;
            }
        }
        // Whatever is still stashed belonged to removals undone above or made durable: the
        // stash starts empty again.
        let mut leftover = Vec::new();
        if let Ok(rd) = std::fs::read_dir(path_in(ns.stash.as_fd(), OsStr::new("."))) {
            leftover.extend(rd.flatten().map(|e| e.file_name()));
        }
        for name in leftover {
            let r = match sys::fstatat(ns.stash.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW) {
                Ok(st) if is_dir(&st) => remove_tree(ns.stash.as_fd(), &name),
                _ => sys::unlinkat(ns.stash.as_fd(), &name, 0),
            };
            if let Err(e) = r {
                eprintln!("powercut: cut: cannot empty the stash ({}): {e}", name.to_string_lossy());
                errors += 1;
            }
        }
        self.stashed.lock().clear();
        drop(ns);
        self.count("cuts");
        self.count_n("namespace_undone", ops.len() as u64);
        self.count_n("undo_errors", errors as u64);
        *self.last_cut.lock() = CutReport { files: n, namespace: ops.len(), errors };
        eprintln!("powercut: cut ({}): {n} files rolled back, {} namespace operations undone, {errors} errors", self.mode.name(), ops.len());
        Ok(n)
    }

    fn control(&self, line: &str, lower: &Path) -> String {
        let mut it = line.split_whitespace();
        match it.next() {
            Some("cut") => match self.cut() {
                Ok(n) => format!("ok {n}"),
                Err(e) => format!("error {e}"),
            },
            Some("lastcut") => {
                let r = *self.last_cut.lock();
                format!("ok files={} namespace={} errors={}", r.files, r.namespace, r.errors)
            }
            Some("mode") => format!("ok {}", self.mode.name()),
            Some("pending") => format!("ok {}", self.ns.lock().pending.len()),
            Some("sync") => {
                let _w = self.cut_lock.write();
                self.commit_all();
                self.dirty.lock().clear();
                "ok".into()
            }
            Some("stats") => {
                let pending = self.ns.lock().pending.len();
                let s = self.stats.lock();
                let mut out = format!("dirty_files={} pending_namespace={pending} mode={}", self.dirty.lock().len(), self.mode.name());
                for (k, v) in s.iter() {
                    out.push_str(&format!(" {k}={v}"));
                }
                out
            }
            Some("dirsyncs") => {
                let rel = it.next().unwrap_or("");
                match std::fs::metadata(lower.join(rel)) {
                    Ok(m) => {
                        use std::os::unix::fs::MetadataExt;
                        format!("ok {}", self.dir_syncs.lock().get(&m.ino()).copied().unwrap_or(0))
                    }
                    Err(e) => format!("error {e}"),
                }
            }
            _ => "error unknown command (cut | lastcut | mode | pending | sync | stats | dirsyncs DIR)".into(),
        }
    }

    /// Run a namespace operation on `parent` with the cut excluded and the log locked.
    fn ns_op<T>(&self, parent: INodeNo, name: &OsStr, f: impl FnOnce(&mut Ns, &Arc<Node>) -> Result<T, Errno>) -> Result<T, Errno> {
        let p = self.node(parent)?;
        if self.reserved(&p, name) {
            return Err(Errno::EPERM);
        }
        let _c = self.cut_lock.read();
        let mut ns = self.ns.lock();
        f(&mut ns, &p)
    }
}

struct Fs(Arc<Sim>);

impl Filesystem for Fs {
    fn init(&mut self, _req: &Request, cfg: &mut KernelConfig) -> std::io::Result<()> {
        let _ = cfg.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.0.node(parent).and_then(|p| self.0.lookup_in(&p, name)) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, n: u64) {
        if ino.0 == 1 {
            return;
        }
        let mut nodes = self.0.nodes.write();
        if let Some(node) = nodes.get(&ino.0) {
            if node.lookups.fetch_sub(n, Ordering::Relaxed) <= n {
                if sys::fstat(node.fd.as_fd()).map(|st| st.st_nlink == 0).unwrap_or(false) {
                    self.0.free_number(ino.0, node.ino);
                }
                nodes.remove(&ino.0);
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.0.node(ino).and_then(|n| sys::fstat(n.fd.as_fd()).map_err(errno)) {
            Ok(st) => reply.attr(&TTL, &self.0.attr(&st)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = (|| -> Result<sys::Stat, Errno> {
            let n = self.0.node(ino)?;
            if let Some(size) = size {
                let _w = self.0.cut_lock.read();
                let f = File::from(sys::reopen(n.fd.as_fd(), libc::O_RDWR).map_err(errno)?);
                self.0.save_resize(n.ino, &f, size).map_err(errno)?;
                sys::ftruncate(f.as_fd(), size).map_err(errno)?;
            }
            if uid.is_some() || gid.is_some() {
                sys::fchown(n.fd.as_fd(), uid.unwrap_or(u32::MAX), gid.unwrap_or(u32::MAX)).map_err(errno)?;
            }
            if let Some(m) = mode {
                if n.kind != FileType::Symlink {
                    sys::fchmod_path(n.fd.as_fd(), m & 0o7777).map_err(errno)?;
                }
            }
            if (atime.is_some() || mtime.is_some()) && n.kind != FileType::Symlink {
                let c = |t: Option<TimeOrNow>| match t {
                    None => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT },
                    Some(TimeOrNow::Now) => libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_NOW },
                    Some(TimeOrNow::SpecificTime(t)) => {
                        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                        libc::timespec { tv_sec: d.as_secs() as i64, tv_nsec: d.subsec_nanos() as i64 }
                    }
                };
                sys::utimens(n.fd.as_fd(), None, &[c(atime), c(mtime)], 0).map_err(errno)?;
            }
            sys::fstat(n.fd.as_fd()).map_err(errno)
        })();
        match r {
            Ok(st) => reply.attr(&TTL, &self.0.attr(&st)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.0.node(ino).and_then(|n| sys::readlink_fd(n.fd.as_fd()).map_err(errno)) {
            Ok(t) => reply.data(t.as_bytes()),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, rdev: u32, reply: ReplyEntry) {
        let r = self.0.ns_op(parent, name, |ns, p| {
            sys::mknodat(p.fd.as_fd(), name, mode, rdev as libc::dev_t).map_err(errno)?;
            let a = self.0.lookup_in(p, name)?;
            self.0.record(ns, "mknod", Change::Added { dir: p.clone(), name: name.into(), ino: ino_of(&self.0, &a), is_dir: false });
            Ok(a)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, reply: ReplyEntry) {
        let r = self.0.ns_op(parent, name, |ns, p| {
            sys::mkdirat(p.fd.as_fd(), name, mode).map_err(errno)?;
            let a = self.0.lookup_in(p, name)?;
            self.0.record(ns, "mkdir", Change::Added { dir: p.clone(), name: name.into(), ino: ino_of(&self.0, &a), is_dir: true });
            Ok(a)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.0.ns_op(parent, name, |ns, p| {
            let st = sys::fstatat(p.fd.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW).map_err(errno)?;
            if is_dir(&st) {
                return Err(Errno::EISDIR);
            }
            // Not deleted: kept (data undo log included) until the removal is durable.
            let gone = self.0.stash_away(ns, p, name, &st).map_err(errno)?;
            self.0.record(ns, "unlink", Change::Removed { dir: p.clone(), name: name.into(), gone });
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let r = self.0.ns_op(parent, name, |ns, p| {
            let st = sys::fstatat(p.fd.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW).map_err(errno)?;
            if !is_dir(&st) {
                return Err(Errno::ENOTDIR);
            }
            if !dir_is_empty(p.fd.as_fd(), name).map_err(errno)? {
                return Err(Errno::ENOTEMPTY);
            }
            let gone = self.0.stash_away(ns, p, name, &st).map_err(errno)?;
            self.0.record(ns, "rmdir", Change::Removed { dir: p.clone(), name: name.into(), gone });
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, target: &Path, reply: ReplyEntry) {
        let r = self.0.ns_op(parent, name, |ns, p| {
            sys::symlinkat(target.as_os_str(), p.fd.as_fd(), name).map_err(errno)?;
            let a = self.0.lookup_in(p, name)?;
            self.0.record(ns, "symlink", Change::Added { dir: p.clone(), name: name.into(), ino: ino_of(&self.0, &a), is_dir: false });
            Ok(a)
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn rename(&self, _req: &Request, parent: INodeNo, name: &OsStr, np: INodeNo, nn: &OsStr, flags: RenameFlags, reply: ReplyEmpty) {
        let r = (|| -> Result<(), Errno> {
            let q = self.0.node(np)?;
            if self.0.reserved(&q, nn) {
                return Err(Errno::EPERM);
            }
            let flags = flags.bits();
            if flags & libc::RENAME_WHITEOUT != 0 {
                return Err(Errno::EINVAL);
            }
            self.0.ns_op(parent, name, |ns, p| {
                let src = sys::fstatat(p.fd.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW).map_err(errno)?;
                let over = match sys::fstatat(q.fd.as_fd(), nn, libc::AT_SYMLINK_NOFOLLOW) {
                    Ok(st) => Some(st),
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
                    Err(e) => return Err(errno(e)),
                };
                if flags & libc::RENAME_EXCHANGE != 0 {
                    sys::renameat2(p.fd.as_fd(), name, q.fd.as_fd(), nn, flags).map_err(errno)?;
                    self.0.record(ns, "rename", Change::Exchanged { a: p.clone(), an: name.into(), b: q.clone(), bn: nn.into() });
                    return Ok(());
                }
                let replaced = match over {
                    // Two names of one inode: rename(2) does nothing.
                    Some(o) if o.st_ino == src.st_ino => return sys::renameat2(p.fd.as_fd(), name, q.fd.as_fd(), nn, flags).map_err(errno),
                    Some(_) if flags & libc::RENAME_NOREPLACE != 0 => return Err(Errno::EEXIST),
                    Some(o) => {
                        match (is_dir(&src), is_dir(&o)) {
                            (true, false) => return Err(Errno::ENOTDIR),
                            (false, true) => return Err(Errno::EISDIR),
                            (true, true) if !dir_is_empty(q.fd.as_fd(), nn).map_err(errno)? => return Err(Errno::ENOTEMPTY),
                            _ => {}
                        }
                        // The replaced target goes to the stash first; back if the rename fails.
                        Some(self.0.stash_away(ns, &q, nn, &o).map_err(errno)?)
                    }
                    None => None,
                };
                if let Err(e) = sys::renameat2(p.fd.as_fd(), name, q.fd.as_fd(), nn, flags) {
                    if let Some(r) = &replaced {
                        if let Err(e2) = self.0.unstash(ns, r, &q, nn) {
                            eprintln!("powercut: rename failed ({e}) and the target could not be put back: {e2}");
                        }
                    }
                    return Err(errno(e));
                }
                self.0.record(ns, "rename", Change::Renamed { from: p.clone(), name: name.into(), to: q.clone(), newname: nn.into(), ino: src.st_ino, replaced });
                Ok(())
            })
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(&self, _req: &Request, ino: INodeNo, np: INodeNo, nn: &OsStr, reply: ReplyEntry) {
        let r = self.0.node(ino).and_then(|n| {
            self.0.ns_op(np, nn, |ns, q| {
                sys::link_fd(n.fd.as_fd(), q.fd.as_fd(), nn).map_err(errno)?;
                let a = self.0.lookup_in(q, nn)?;
                self.0.record(ns, "link", Change::Added { dir: q.clone(), name: nn.into(), ino: n.ino, is_dir: false });
                Ok(a)
            })
        });
        match r {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let r = self.0.node(ino).and_then(|n| {
            let keep = flags.0 & (libc::O_SYNC | libc::O_DSYNC);
            // Read access even for writers: the original bytes are read before a write.
            let fd = sys::reopen(n.fd.as_fd(), libc::O_RDWR | keep)
                .or_else(|_| sys::reopen(n.fd.as_fd(), (flags.0 & libc::O_ACCMODE) | keep))
                .map_err(errno)?;
            Ok(self.open_handle(n.ino, fd, keep != 0, flags.0 & libc::O_TRUNC != 0)?)
        });
        match r {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn create(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, _umask: u32, flags: i32, reply: ReplyCreate) {
        let r = self.0.ns_op(parent, name, |ns, p| {
            let keep = flags & (libc::O_SYNC | libc::O_DSYNC);
            let (fd, created) = match sys::openat(p.fd.as_fd(), name, libc::O_EXCL | libc::O_RDWR | libc::O_CREAT | keep, mode) {
                Ok(fd) => (fd, true),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL == 0 => {
                    (sys::openat(p.fd.as_fd(), name, libc::O_RDWR | keep, 0).map_err(errno)?, false)
                }
                Err(e) => return Err(errno(e)),
            };
            let a = self.0.lookup_in(p, name)?;
            if created {
                self.0.record(ns, "create", Change::Added { dir: p.clone(), name: name.into(), ino: ino_of(&self.0, &a), is_dir: false });
            }
            Ok((a, fd))
        });
        let r = r.and_then(|(a, fd)| Ok((a, self.open_handle(ino_of(&self.0, &a), fd, flags & (libc::O_SYNC | libc::O_DSYNC) != 0, false)?)));
        match r {
            Ok((a, fh)) => reply.created(&TTL, &a, Generation(0), FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e),
        }
    }

    fn read(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, off: u64, size: u32, _f: OpenFlags, _l: Option<LockOwner>, reply: ReplyData) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        let mut buf = vec![0u8; size as usize];
        match sys::pread_full(h.file.as_fd(), &mut buf, off) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, off: u64, data: &[u8], _wf: WriteFlags, _f: OpenFlags, _l: Option<LockOwner>, reply: ReplyWrite) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        let _w = self.0.cut_lock.read();
        let end = off + data.len() as u64;
        let r = (|| {
            let size = sys::fstat(h.file.as_fd())?.st_size as u64;
            if off > size {
                self.0.save_resize(h.ino, &h.file, off)?;
            }
            self.0.save(h.ino, &h.file, off, end)?;
            sys::pwrite_all(h.file.as_fd(), data, off)
        })();
        match r {
            Ok(()) => {
                self.0.count("writes");
                if h.sync {
                    self.0.synced_write(h.ino, data, off);
                    if self.0.mode == Mode::Ext4 {
                        self.0.commit_all();
                    }
                }
                reply.written(data.len() as u32)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _l: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _f: OpenFlags, _l: Option<LockOwner>, _flush: bool, reply: ReplyEmpty) {
        self.0.opens.lock().remove(&fh.0);
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        let r = if datasync { sys::fdatasync(h.file.as_fd()) } else { sys::fsync(h.file.as_fd()) };
        match r {
            Ok(()) => {
                self.0.file_synced(h.ino);
                self.0.count("fsyncs");
                reply.ok()
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _f: OpenFlags, reply: ReplyOpen) {
        match self.0.node(ino) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let r = (|| -> Result<(), Errno> {
            let n = self.0.node(ino)?;
            let fd = sys::openat(n.fd.as_fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(errno)?;
            sys::lseek(fd.as_fd(), offset as i64, libc::SEEK_SET).map_err(errno)?;
            sys::for_each_dirent(fd.as_fd(), |e| {
                let full = !self.0.reserved(&n, e.name) && reply.add(INodeNo(self.0.nodeid(e.ino)), e.next, kind_of(u32::from(e.kind) << 12), e.name);
                if full { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
            })
            .map_err(errno)?;
            Ok(())
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fsyncdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _ds: bool, reply: ReplyEmpty) {
        let r = self.0.node(ino).and_then(|n| {
            let d = sys::openat(n.fd.as_fd(), OsStr::new("."), libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(errno)?;
            sys::fsync(d.as_fd()).map_err(errno)?;
            *self.0.dir_syncs.lock().entry(n.ino).or_default() += 1;
            self.0.dir_synced(n.ino);
            Ok(())
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.0.node(INodeNo(1)).and_then(|n| sys::fstatvfs(n.fd.as_fd()).map_err(errno)) {
            Ok(s) => reply.statfs(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize as u32, s.f_namemax as u32, s.f_frsize as u32),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, off: u64, len: u64, mode: i32, reply: ReplyEmpty) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        let _w = self.0.cut_lock.read();
        let r = (|| {
            if mode & libc::FALLOC_FL_KEEP_SIZE == 0 {
                self.0.save_resize(h.ino, &h.file, off + len)?;
            }
            if mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
                self.0.save(h.ino, &h.file, off, off + len)?;
            }
            sys::fallocate(h.file.as_fd(), mode, off, len)
        })();
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn lseek(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, off: i64, whence: i32, reply: ReplyLseek) {
        let Some(h) = self.0.opens.lock().get(&fh.0).cloned() else { return reply.error(Errno::EBADF) };
        match sys::lseek(h.file.as_fd(), off, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 { reply.size(0) } else { reply.data(&[]) }
    }
}

/// Lower inode number of an entry just looked up.
fn ino_of(sim: &Sim, a: &FileAttr) -> u64 {
    sim.lower_ino(a.ino.0)
}

impl Fs {
    fn open_handle(&self, ino: u64, fd: OwnedFd, sync: bool, trunc: bool) -> Result<u64, Errno> {
        let file = File::from(fd);
        if trunc {
            let _w = self.0.cut_lock.read();
            self.0.save_resize(ino, &file, 0).map_err(errno)?;
            sys::ftruncate(file.as_fd(), 0).map_err(errno)?;
        }
        let fh = self.0.next_fh.fetch_add(1, Ordering::Relaxed);
        self.0.opens.lock().insert(fh, Arc::new(Open { ino, file, sync }));
        Ok(fh)
    }
}

/// An option's value: given on the command line, else from the environment variable `var`,
/// else `default`.
fn choice<T: ValueEnum>(arg: Option<T>, var: &str, default: T) -> T {
    match (arg, std::env::var(var)) {
        (Some(v), _) => v,
        (None, Ok(v)) if !v.is_empty() => T::from_str(&v, true).unwrap_or_else(|e| {
            eprintln!("powercut: {var}={v}: {e}");
            std::process::exit(2)
        }),
        _ => default,
    }
}

fn main() {
    let args = Args::parse();
    let mode = choice(args.mode, "POWERCUT_MODE", Mode::Strict);
    let numbering = choice(args.numbers, "POWERCUT_NUMBERS", Numbering::Lower);
    unsafe { libc::umask(0) };
    let root = sys::openat(
        unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) },
        args.lower.as_os_str(),
        libc::O_PATH | libc::O_DIRECTORY,
        0,
    )
    .expect("open --lower");
    let root_ino = sys::fstat(root.as_fd()).unwrap().st_ino;
    // Everything in the lower directory is durable when the simulator starts: a stash left
    // by an earlier run held removals that happened.
    let stash_path = args.lower.join(STASH);
    match std::fs::symlink_metadata(&stash_path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&stash_path).expect("remove an old stash"),
        Ok(_) => std::fs::remove_file(&stash_path).expect("remove an old stash"),
        Err(_) => {}
    }
    sys::mkdirat(root.as_fd(), OsStr::new(STASH), 0o700).expect("create the stash");
    let stash = sys::openat(root.as_fd(), OsStr::new(STASH), libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0).expect("open the stash");
    let sim = Arc::new(Sim {
        mode,
        nodes: RwLock::new(HashMap::new()),
        opens: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        dirty: Mutex::new(HashMap::new()),
        cut_lock: RwLock::new(()),
        ns: Mutex::new(Ns { seq: 0, pending: Vec::new(), stash, next_stash: 0 }),
        stashed: Mutex::new(HashMap::new()),
        dir_syncs: Mutex::new(HashMap::new()),
        stats: Mutex::new(BTreeMap::new()),
        last_cut: Mutex::new(CutReport::default()),
        root_ino,
        numbers: (numbering == Numbering::Reuse).then(|| Mutex::new(Numbers::default())),
    });
    sim.nodes.write().insert(1, Arc::new(Node { fd: root, ino: root_ino, kind: FileType::Directory, lookups: AtomicU64::new(1) }));
    let _ = std::fs::remove_file(&args.control);
    let listener = UnixListener::bind(&args.control).expect("bind control socket");
    let s = sim.clone();
    let lower = args.lower.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut w = conn.try_clone().unwrap();
            for line in BufReader::new(conn).lines().map_while(Result::ok) {
                let _ = writeln!(w, "{}", s.control(&line, &lower));
            }
        }
    });
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![MountOption::FSName("powercut".into()), MountOption::CUSTOM("allow_other".into())];
    cfg.acl = fuser::SessionACL::All;
    cfg.n_threads = Some(4);
    let mut session = fuser::Session::new(Fs(sim.clone()), &args.mount, &cfg).expect("mount");
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM]).unwrap();
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            let _ = unmounter.unmount();
        }
    });
    let numbers = if numbering == Numbering::Reuse { "reused" } else { "lower" };
    eprintln!("powercut: serving {} at {} (mode {}, inode numbers {numbers})", args.lower.display(), args.mount.display(), mode.name());
    session.run().expect("session");
    // Unmounted: a clean shutdown, after which everything is durable; removed names go.
    let _ = std::fs::remove_dir_all(&stash_path);
}
