//! First-time initialisation of the metadata directory, and the plaintext records of
//! files that exist before tdefs (adoption, the format 1 upgrade).

use super::*;

/// Create the metadata directory atomically: assemble it under a temporary name, make it
/// durable, rename it into place, make the rename durable. Adopted files (`--init`) are
/// recorded as plaintext in the first snapshot: from then on a file without a record is
/// an error, never silently plaintext. Returns how many entries of the backing root were
/// adopted.
pub(super) fn initialize(backing: &Path, backing_fd: &OwnedFd, backend: &dyn MasterKeyBackend, adopt: bool) -> Result<usize, MetaError> {
    let tmp_path = backing.join(INIT_DIR);
    let root = backing_fd.as_fd();
    match Dir::open_verified(root, OsStr::new(INIT_DIR), &tmp_path) {
        Ok(old) => {
            tracing::warn!(dir = %tmp_path.display(), "removing an interrupted initialisation");
            for name in old.list().map_err(io_err("list", &tmp_path))? {
                sys::unlinkat(old.fd(), &name, 0).map_err(io_err("remove", &tmp_path.join(&name)))?;
            }
            sys::unlinkat(root, OsStr::new(INIT_DIR), libc::AT_REMOVEDIR).map_err(io_err("remove", &tmp_path))?;
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        Err(e) => return Err(MetaError::Backing { path: backing.to_path_buf(), problem: e.to_string() }),
    }
    let mut count = 0;
    let mut example = String::new();
    for e in std::fs::read_dir(backing).map_err(io_err("list", backing))? {
        let e = e.map_err(io_err("list", backing))?;
        if e.file_name() == "lost+found" {
            continue;
        }
        if count == 0 {
            example = e.file_name().to_string_lossy().into_owned();
        }
        count += 1;
    }
    if count > 0 && !adopt {
        return Err(MetaError::NotEmpty { path: backing.to_path_buf(), count, example });
    }
    let adopted = plaintext_records(backing, &Tree::default())?;
    sys::mkdirat(root, OsStr::new(INIT_DIR), 0o700).map_err(io_err("create", &tmp_path))?;
    let tmp = Arc::new(
        Dir::open_verified(root, OsStr::new(INIT_DIR), &tmp_path)
            .map_err(|e| MetaError::Backing { path: backing.to_path_buf(), problem: e.to_string() })?,
    );
    let keys = KeyStore::create(&tmp, backend)?;
    FileDict::create(&tmp, keys.seal_keys(), &keys.instance(), &adopted)?;
    tmp.sync().map_err(io_err("fsync", &tmp_path))?;
    // Never over a metadata directory that appeared meanwhile.
    sys::renameat2(root, OsStr::new(INIT_DIR), root, OsStr::new(META_DIR), libc::RENAME_NOREPLACE)
        .map_err(io_err("rename", &tmp_path))?;
    sys::fsync(root).map_err(io_err("fsync", backing))?;
    tracing::info!(
        backing = %backing.display(), adopted = count, plaintext_files = adopted.len(),
        master_key = %backend.describe(), "initialised tdefs metadata"
    );
    Ok(count)
}

/// A plaintext record for every regular file below `backing` that has none in `known`.
pub(super) fn plaintext_records(backing: &Path, known: &Tree) -> Result<Tree, MetaError> {
    let root = File::open(backing).map_err(io_err("open", backing))?;
    let mut t = Tree::default();
    crate::walk::walk(root.as_fd(), is_hidden_name, |e| {
        if e.is_file() && known.get(e.path).is_none() {
            t.put(e.path, FileEntry::plaintext());
        }
        Ok::<(), std::io::Error>(())
    })
    .map_err(io_err("list", backing))?;
    Ok(t)
}
