//! The one walker of a backing tree, for everything that looks at all of it: adoption at
//! `--init`, the format upgrade, `tdefs check`, `tdefs status`, the plaintext scanner.
//!
//! Depth costs nothing: the walk is iterative (an explicit stack of directory listings),
//! works through directory descriptors (`openat`, `fstatat`) so no path ever exceeds
//! PATH_MAX, and holds one directory descriptor at a time, climbing back with `..` (checked
//! against the inode it left, so a directory moved meanwhile stops the walk with an error
//! instead of walking somewhere else). Symlinks are never followed. `walkdir` would hand
//! out full paths, which fail beyond PATH_MAX on the trees any user of a mount can build.

use std::ffi::OsStr;
use std::io;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use crate::sys::{self, Stat};

/// One entry: its path below the root ("/a/b", as the dictionary names files) and its
/// stat (not following a symlink).
pub struct Entry<'a> {
    pub path: &'a [u8],
    pub stat: &'a Stat,
}

impl Entry<'_> {
    pub fn is_dir(&self) -> bool {
        self.stat.st_mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub fn is_file(&self) -> bool {
        self.stat.st_mode & libc::S_IFMT == libc::S_IFREG
    }
}

/// A directory being listed: the names still to visit.
struct Frame {
    names: Vec<Vec<u8>>,
    /// Length of `path` for this directory.
    path_len: usize,
    /// (dev, ino) of the directory, to check the climb back.
    id: (u64, u64),
}

/// Every entry below `root`, parents before their children, except names at the top level
/// for which `skip_top` is true (tdefs' own metadata). Returns early with the first error
/// of `visit`.
pub fn walk<E: From<io::Error>>(
    root: BorrowedFd<'_>,
    skip_top: impl Fn(&OsStr) -> bool,
    mut visit: impl FnMut(Entry<'_>) -> Result<(), E>,
) -> Result<(), E> {
    let open_dir = |dir: BorrowedFd<'_>, name: &OsStr| {
        sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW, 0)
    };
    let mut cur: OwnedFd = open_dir(root, OsStr::new("."))?;
    let st = sys::fstat(cur.as_fd())?;
    let mut path: Vec<u8> = Vec::new();
    let mut stack = vec![Frame {
        names: list(cur.as_fd(), true, &skip_top)?,
        path_len: 0,
        id: (st.st_dev, st.st_ino),
    }];
    loop {
        let Some(top) = stack.last_mut() else { return Ok(()) };
        let Some(name) = top.names.pop() else {
            let done = stack.pop().expect("not empty");
            if let Some(parent) = stack.last() {
                // Climb back with "..", and make sure it is where we came from.
                let up = open_dir(cur.as_fd(), OsStr::new(".."))?;
                let st = sys::fstat(up.as_fd())?;
                if (st.st_dev, st.st_ino) != parent.id {
                    return Err(io::Error::other(format!(
                        "{} moved while it was being walked",
                        String::from_utf8_lossy(&path[..done.path_len])
                    ))
                    .into());
                }
                cur = up;
                path.truncate(parent.path_len);
            }
            continue;
        };
        let path_len = top.path_len;
        path.truncate(path_len);
        path.push(b'/');
        path.extend_from_slice(&name);
        let name = OsStr::from_bytes(&name);
        let st = match sys::fstatat(cur.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue, // removed meanwhile
            Err(e) => return Err(e.into()),
        };
        visit(Entry { path: &path, stat: &st })?;
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let child = open_dir(cur.as_fd(), name)?;
            let names = list(child.as_fd(), false, &skip_top)?;
            stack.push(Frame { names, path_len: path.len(), id: (st.st_dev, st.st_ino) });
            cur = child;
        }
    }
}

/// The names in directory `dir` (without "." and ".."), in reverse order so that popping
/// visits them in directory order.
fn list(dir: BorrowedFd<'_>, top: bool, skip_top: &impl Fn(&OsStr) -> bool) -> io::Result<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    sys::for_each_dirent(dir, |e| {
        if !e.is_dot() && !(top && skip_top(e.name)) {
            names.push(e.name.as_bytes().to_vec());
        }
        ControlFlow::<()>::Continue(())
    })?;
    names.reverse();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn all(root: &std::path::Path) -> Vec<(String, bool)> {
        let dir = std::fs::File::open(root).unwrap();
        let mut v = Vec::new();
        walk::<io::Error>(dir.as_fd(), |n| n == ".hidden", |e| {
            v.push((String::from_utf8_lossy(e.path).into_owned(), e.is_dir()));
            Ok(())
        })
        .unwrap();
        v.sort();
        v
    }

    #[test]
    fn lists_everything_below_skipping_hidden_top_names_and_symlinks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("a/b")).unwrap();
        std::fs::create_dir_all(p.join(".hidden/x")).unwrap();
        std::fs::write(p.join("a/b/f"), b"1").unwrap();
        std::fs::write(p.join("a/.hidden"), b"2").unwrap(); // hidden only at the top
        std::os::unix::fs::symlink("/etc", p.join("link")).unwrap();
        assert_eq!(
            all(p),
            vec![
                ("/a".into(), true),
                ("/a/.hidden".into(), false),
                ("/a/b".into(), true),
                ("/a/b/f".into(), false),
                ("/link".into(), false),
            ]
        );
    }

    /// Deeper than PATH_MAX allows to name: the walk never builds a path for a syscall.
    #[test]
    fn five_thousand_levels() {
        let d = tempfile::tempdir().unwrap();
        let mut fd = sys::openat(std::fs::File::open(d.path()).unwrap().as_fd(), OsStr::new("."), libc::O_RDONLY, 0).unwrap();
        for _ in 0..5000 {
            sys::mkdirat(fd.as_fd(), OsStr::new("dd"), 0o755).unwrap();
            fd = sys::openat(fd.as_fd(), OsStr::new("dd"), libc::O_RDONLY | libc::O_DIRECTORY, 0).unwrap();
        }
        sys::openat(fd.as_fd(), OsStr::new("file"), libc::O_CREAT | libc::O_WRONLY, 0o644).unwrap();
        let v = all(d.path());
        assert_eq!(v.len(), 5001);
        assert!(v.iter().any(|(p, dir)| !dir && p.len() == 5000 * 3 + 5));
        std::process::Command::new("rm").arg("-rf").arg(d.path()).status().unwrap();
    }
}
