//! The files a conversion covers: the named paths (relative to the backing root, as seen at
//! the mountpoint), directories recursively, parents before children.

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use super::ConvertError;
use crate::meta::is_hidden_name;
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
        walk(backing, &mut Vec::new(), true, &mut out)?;
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
            let mut r = rel;
            walk(&full, &mut r, false, &mut out)?;
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

/// Everything below `dir` (whose dictionary path is `rel`). Iterative: a tree of any depth
/// is listed (or refused with an error, where its paths exceed PATH_MAX), never a stack
/// overflow.
fn walk(dir: &Path, rel: &mut Vec<u8>, top: bool, out: &mut BTreeMap<Vec<u8>, Item>) -> Result<(), ConvertError> {
    let mut todo: Vec<(PathBuf, Vec<u8>, bool)> = vec![(dir.to_path_buf(), rel.clone(), top)];
    while let Some((dir, rel, top)) = todo.pop() {
        let list_err = |e| ConvertError::from(IoError::new("list", dir.clone(), e));
        for e in std::fs::read_dir(&dir).map_err(list_err)? {
            let e = e.map_err(list_err)?;
            let name = e.file_name();
            if top && is_hidden_name(&name) {
                continue;
            }
            let md = e.metadata().map_err(|err| ConvertError::from(IoError::new("stat", e.path(), err)))?;
            let child = [&rel[..], b"/", name.as_bytes()].concat();
            let kind = kind_of(&md);
            out.insert(child.clone(), Item { rel: child.clone(), kind, md });
            if kind == Kind::Dir {
                todo.push((e.path(), child, false));
            }
        }
    }
    Ok(())
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
