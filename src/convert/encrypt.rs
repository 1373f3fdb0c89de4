//! `tdefs encrypt`: files tracked as plaintext become encrypted, in place.
//!
//! A kill at any instant leaves each file either fully plaintext or fully encrypted, with
//! the dictionary saying which. Per file:
//! 1. a staged copy `.tdefs.convert/N` is created and its entry (current data key, fresh
//!    IV) made durable: before any ciphertext exists, as for a file created on the mount;
//! 2. the file is copied into it through the cipher, with owner, xattrs, mode and times,
//!    and fsynced;
//! 3. a rename intent (staged copy → file) is made durable, the rename done, the directory
//!    fsynced, the intent concluded.
//!
//! The next open of the metadata settles an interruption: a rename whose destination holds
//! the staged inode happened (the entry moves to the file, as for any rename on the
//! mount); otherwise the original is untouched and the staged copy and its entry are
//! dropped (`metadir::remove_staged_copies`). Running the command again does the rest.

use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::copy::{copy_attrs, set_times, transform, Ciphers};
use super::progress::{Display, Progress};
use super::{create_staging, remove_staging, select, show, ConvertError, Kind, Summary};
use crate::crypto::{random_iv, random_u64, Method};
use crate::dictionary::{FileEntry, Record};
use crate::metadir::{status, Metadata, STAGING_PREFIX};
use crate::sys::{self, Dir};
use crate::error::io_err;
use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::sync::Arc;

pub struct Options {
    pub method: Method,
    pub rotation: Duration,
    pub display: Display,
    /// Which encrypted files move to `method` as well (plaintext ones always do).
    pub reencrypt: Reencrypt,
}

/// Encrypted files that `tdefs encrypt` re-encrypts under the configured method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reencrypt {
    /// None: only plaintext files are encrypted.
    No,
    /// Files encrypted with this method (e.g. every aes256-ctr file to aes256-xts).
    From(Method),
    /// Every file encrypted with another method than the configured one.
    AllOther,
}

impl Reencrypt {
    fn covers(self, m: Method, target: Method) -> bool {
        m != target
            && match self {
                Reencrypt::No => false,
                Reencrypt::From(f) => f == m,
                Reencrypt::AllOther => true,
            }
    }
}

/// Why one file was not converted: the run goes on with the next file.
enum FileError {
    /// The file is left as it was (plaintext).
    Failed(String),
    /// The dictionary or the key store failed: nothing more can be done safely.
    Fatal(ConvertError),
}

impl<E: Into<ConvertError>> From<E> for FileError {
    fn from(e: E) -> FileError {
        FileError::Fatal(e.into())
    }
}

struct Ctx<'a> {
    meta: &'a Metadata,
    opts: &'a Options,
    staging: Arc<Dir>,
    buf: Vec<u8>,
}

pub fn run(meta: &Metadata, paths: &[PathBuf], opts: &Options) -> Result<Summary, ConvertError> {
    if opts.method.is_plaintext() {
        return Err(ConvertError::PlaintextMethod);
    }
    let backing = meta.backing();
    let mut summary = Summary::default();
    let mut todo = Vec::new();
    for item in select(backing, paths)? {
        if item.kind != Kind::File {
            continue;
        }
        match meta.dict.get(&item.rel) {
            Some(e) if !e.method.is_plaintext() && !opts.reencrypt.covers(e.method, opts.method) => summary.files_unchanged += 1,
            None => summary.skip(
                &item.rel,
                "has no record in the file dictionary, so whether it is plaintext is unknown; `tdefs check` explains \
                 (record it with `tdefs adopt` only if it really is plaintext)",
            ),
            _ if item.md.nlink() > 1 => summary.skip(
                &item.rel,
                format!(
                    "has {} hard links: encrypting in place would split them; remove the extra links (or copy the file through the mount) and run again",
                    item.md.nlink()
                ),
            ),
            Some(e) => todo.push((item, e.method)),
        }
    }
    let bytes_total = todo.iter().map(|(i, _)| i.md.len()).sum();
    let mut progress = Progress::new("encrypt", opts.display, todo.len() as u64, bytes_total);
    let staging = create_staging(meta)?;
    let snapshot = status::collect(backing, &meta.keys, meta.dict.as_ref(), opts.method, false);
    progress.publish_to(staging.clone(), snapshot);
    let mut ctx = Ctx { meta, opts, staging, buf: Vec::new() };
    for (item, was) in &todo {
        match encrypt_one(&mut ctx, &item.rel, &item.md, &mut progress) {
            Ok(()) => {
                summary.files_done += 1;
                summary.bytes_done += item.md.len();
                if let Some(st) = progress.status_mut() {
                    if was.is_plaintext() {
                        st.plaintext_files = st.plaintext_files.saturating_sub(1);
                        st.plaintext_bytes = st.plaintext_bytes.saturating_sub(item.md.len());
                        st.encrypted_bytes += item.md.len();
                    }
                    if let Some(n) = st.files_by_method.get_mut(was.name()) {
                        *n = n.saturating_sub(1);
                    }
                    *st.files_by_method.entry(opts.method.to_string()).or_default() += 1;
                }
            }
            Err(FileError::Failed(why)) => summary.fail(&item.rel, why),
            Err(FileError::Fatal(e)) => {
                progress.finish();
                return Err(e);
            }
        }
        progress.file_done();
    }
    if meta.dict.compaction_due() {
        meta.dict.compact()?;
    }
    meta.close()?;
    progress.finish();
    remove_staging(meta)?;
    Ok(summary)
}

fn failed(what: &str, e: impl std::fmt::Display) -> FileError {
    FileError::Failed(format!("{what}: {e}"))
}

fn encrypt_one(ctx: &mut Ctx<'_>, rel: &[u8], md: &std::fs::Metadata, progress: &mut Progress) -> Result<(), FileError> {
    let dict = &ctx.meta.dict;
    // The file's cipher now: None for plaintext, its data key for a re-encryption.
    let old = match dict.get(rel) {
        Some(e) if !e.method.is_plaintext() => match ctx.meta.keys.get(e.key_id) {
            Some(k) => Some(k.cipher(&e.iv)),
            None => return Err(failed("cannot re-encrypt it", format!("its data key {:#018x} is missing", e.key_id))),
        },
        _ => None,
    };
    let key = ctx.meta.keys.key_for_new_file(ctx.opts.method, ctx.opts.rotation)?.ok_or(ConvertError::PlaintextMethod)?;
    let iv = random_iv();
    let entry = FileEntry { method: key.method, key_id: key.id, iv };
    let cipher = key.cipher(&iv);
    let full = ctx.meta.backing().join(std::ffi::OsStr::from_bytes(&rel[1..]));
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&full)
        .map_err(|e| failed("cannot open it", e))?;
    let now = src.metadata().map_err(|e| failed("cannot stat it", e))?;
    if now.ino() != md.ino() || now.nlink() != 1 {
        return Err(FileError::Failed("it was replaced or linked while the run went on; run again".into()));
    }
    if md.len() == 0 {
        // No bytes to rewrite: the entry alone makes it an (empty) file of the new method.
        let seq = dict.submit(Record::Put { path: rel.to_vec(), entry })?;
        dict.sync(seq)?;
        return Ok(());
    }
    let name = format!("{:016x}", random_u64());
    let mut staged_rel = STAGING_PREFIX.to_vec();
    staged_rel.extend_from_slice(name.as_bytes());
    let dst = ctx.staging.create_new(&name).map_err(|e| failed("cannot create its staged copy", e))?;
    let seq = dict.submit(Record::Put { path: staged_rel.clone(), entry })?;
    dict.sync(seq)?;
    crate::hooks::crash("convert:after-put");
    let staging = ctx.staging.clone();
    let undo = |why: FileError| -> FileError {
        // Entry first, then the file (a crash in between leaves a file without entry in
        // the hidden staging directory, which the next open removes).
        if let Err(e) = dict.submit(Record::Delete { path: staged_rel.clone() }).and_then(|s| dict.sync(s)) {
            return FileError::Fatal(e.into());
        }
        let _ = staging.remove(&name);
        why
    };
    if let Err(why) = copy_verified(ctx, &src, md, &dst, Ciphers { from: old.as_ref(), to: Some(&cipher) }, &full, progress) {
        return Err(undo(why));
    }
    crate::hooks::crash("convert:after-copy");
    let staged_ino = match dst.metadata() {
        Ok(m) => m.ino(),
        Err(e) => return Err(undo(failed("cannot stat its staged copy", e))),
    };
    drop(dst);
    let intent = dict.submit(Record::RenameIntent { from: staged_rel.clone(), to: rel.to_vec(), from_ino: staged_ino, exchange: false })?;
    dict.sync(intent)?;
    crate::hooks::crash("convert:after-intent");
    let parent = full.parent().unwrap_or(Path::new("/"));
    let parent_md = std::fs::metadata(parent).ok();
    // By descriptors: from the verified staging directory into the file's directory.
    let slash = rel.iter().rposition(|&b| b == b'/').unwrap_or(0);
    let renamed = sys::open_dir_below(ctx.meta.backing_fd(), &rel[..slash]).and_then(|parent_fd| {
        sys::renameat2(ctx.staging.fd(), OsStr::new(&name), parent_fd.as_fd(), OsStr::from_bytes(&rel[slash + 1..]), 0).map(|()| parent_fd)
    });
    let parent_fd = match renamed {
        Ok(parent_fd) => parent_fd,
        Err(e) => {
            dict.submit(Record::RenameAbort { intent })?;
            return Err(undo(failed("cannot rename its encrypted copy into place", e)));
        }
    };
    crate::hooks::crash("convert:after-rename");
    if let Some(pm) = parent_md {
        // The rename is an implementation detail: keep the directory's times as they were.
        set_times(parent, &pm);
    }
    // The outcome may be recorded only once the rename is durable.
    sys::fsync(parent_fd.as_fd()).map_err(io_err("fsync", parent))?;
    dict.submit(Record::RenameDone { intent })?;
    Ok(())
}

/// Copy `src` into the staged `dst` through `cipher`, make it durable, and make sure the
/// original did not change meanwhile (a writer bypassing tdefs).
fn copy_verified(
    ctx: &mut Ctx<'_>,
    src: &File,
    md: &std::fs::Metadata,
    dst: &File,
    ciphers: Ciphers<'_>,
    full: &Path,
    progress: &mut Progress,
) -> Result<(), FileError> {
    transform(src, dst, md.len(), ciphers, &mut ctx.buf, &mut |n| progress.bytes(n))
        .map_err(|e| failed("cannot copy it", e))?;
    // The times as selected: reading the file may have moved its atime since.
    copy_attrs(src, md, dst, true).map_err(|e| failed("cannot copy its attributes", e))?;
    dst.sync_all().map_err(|e| failed("cannot fsync its staged copy", e))?;
    let after = std::fs::symlink_metadata(full).map_err(|e| failed("cannot stat it", e))?;
    let same = after.ino() == md.ino()
        && after.len() == md.len()
        && (after.mtime(), after.mtime_nsec()) == (md.mtime(), md.mtime_nsec())
        && (after.ctime(), after.ctime_nsec()) == (md.ctime(), md.ctime_nsec());
    if !same {
        return Err(FileError::Failed(format!(
            "{} changed while it was being encrypted (is something writing to the backing directory?); it was left as it is",
            show(full.as_os_str().as_bytes())
        )));
    }
    Ok(())
}

