//! The files a conversion covers: the named paths (relative to the backing root, as seen at
//! the mountpoint), directories recursively, parents before children.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};

use super::ConvertError;
use crate::metadir::is_hidden_name;
use crate::error::IoError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    /// FIFO, socket or device node.
    Other,
}

#[derive(Debug)]
pub struct Item {
    /// Dictionary path: "/db/base/1".
    pub rel: Vec<u8>,
    pub kind: Kind,
    pub md: std::fs::Metadata,
}

impl Item {
    pub fn path_in(&self, root: &Path) -> PathBuf {
        root.join(std::ffi::OsStr::from_bytes(&self.rel[1..]))
    }
}

/// Everything below `backing` named by `paths` (all of it when empty), without tdefs' own
/// metadata. Symlinks are never followed.
pub fn select(backing: &Path, paths: &[PathBuf]) -> Result<Vec<Item>, ConvertError> {
    let mut out = BTreeMap::new();
    if paths.is_empty() {
        walk(backing, b"", true, &mut out)?;
    }
    for p in paths {
        let rel = normalize(p)?;
        let full = backing.join(std::ffi::OsStr::from_bytes(&rel[1..]));
        let md = std::fs::symlink_metadata(&full).map_err(|e| ConvertError::Select {
            path: p.clone(),
            problem: format!(
                "not found in the backing directory {} ({e}); paths are relative to the backing directory, as seen at the mountpoint",
                backing.display()
            ),
        })?;
        let is_dir = md.is_dir();
        out.insert(rel.clone(), Item { kind: kind_of(&md), rel: rel.clone(), md });
        if is_dir {
            walk(&full, &rel, false, &mut out)?;
        }
    }
    Ok(out.into_values().collect())
}

/// A command-line path ("db/x", "/db/x/" or "./db/x") as a dictionary path "/db/x"; refuses "..",
/// tdefs' own directories and the root.
pub fn normalize(p: &Path) -> Result<Vec<u8>, ConvertError> {
    let bad = |problem: &str| ConvertError::Select { path: p.to_path_buf(), problem: problem.into() };
    let mut rel = Vec::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => {
                if rel.is_empty() && is_hidden_name(n) {
                    return Err(bad("is tdefs' own metadata"));
                }
                rel.push(b'/');
                rel.extend_from_slice(n.as_bytes());
            }
            Component::ParentDir => return Err(bad("'..' is not allowed: name paths inside the backing directory")),
            Component::Prefix(_) => return Err(bad("not a Unix path")),
        }
    }
    if rel.is_empty() {
        return Err(bad("names the whole backing directory: give no PATH to convert everything"));
    }
    Ok(rel)
}

fn kind_of(md: &std::fs::Metadata) -> Kind {
    let t = md.file_type();
    if t.is_file() {
        Kind::File
    } else if t.is_dir() {
        Kind::Dir
    } else if t.is_symlink() {
        Kind::Symlink
    } else {
        Kind::Other
    }
}

/// Everything below `dir` (whose dictionary path is `rel`), listed by the one walker of
/// backing trees (`crate::walk`: iterative, symlinks never followed). The items carry
/// `std::fs::Metadata` because the conversion works on paths (std::fs) from here on, so each
/// entry is stat'ed again by path: one more stat per file of a run that reads every byte.
fn walk(dir: &Path, rel: &[u8], top: bool, out: &mut BTreeMap<Vec<u8>, Item>) -> Result<(), ConvertError> {
    let list_err = |e| ConvertError::from(IoError::new("list", dir.to_path_buf(), e));
    let fd = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir)
        .map_err(list_err)?;
    let skip_top = |name: &std::ffi::OsStr| top && is_hidden_name(name);
    crate::walk::walk(fd.as_fd(), skip_top, |e| {
        let full = dir.join(std::ffi::OsStr::from_bytes(&e.path[1..]));
        let md = std::fs::symlink_metadata(&full).map_err(|err| Stop::Stat(IoError::new("stat", full, err).into()))?;
        let child = [rel, e.path].concat();
        out.insert(child.clone(), Item { rel: child, kind: kind_of(&md), md });
        Ok(())
    })
    .map_err(|e| match e {
        Stop::Walk(e) => list_err(e),
        Stop::Stat(e) => e,
    })
}

/// Why `walk` stopped: the walker's own error (about `dir`), or one of an entry.
enum Stop {
    Walk(std::io::Error),
    Stat(ConvertError),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Walk(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_and_checked() {
        assert_eq!(normalize(Path::new("db/x")).unwrap(), b"/db/x");
        assert_eq!(normalize(Path::new("/db/x/")).unwrap(), b"/db/x");
        assert_eq!(normalize(Path::new("./db")).unwrap(), b"/db");
        assert!(normalize(Path::new("../etc")).is_err());
        assert!(normalize(Path::new("/")).is_err());
        assert!(normalize(Path::new(".tdefs/keys")).is_err());
        assert!(normalize(Path::new(".tdefs.convert")).is_err());
    }
}
