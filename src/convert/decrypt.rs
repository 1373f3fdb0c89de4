//! `tdefs decrypt --to DIR`: plaintext copies of the files, for leaving tdefs (or for a
//! plaintext backup). The backing directory is only read.
//!
//! The tree is recreated below DIR: directories, files (sparse where the source has holes),
//! symlinks, FIFOs and device nodes, hard links as hard links, with owner, xattrs, mode and
//! times. Each file is written as `.NAME.tdefs-partial`, fsynced and renamed into place,
//! so a kill leaves it absent or complete; a run again skips the files already exported
//! (same size and modification time) and redoes the rest.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::copy::{copy_attrs, set_times, transform, Ciphers};
use super::progress::{Display, Progress};
use super::{create_staging, ensure_dir, remove_staging, select, show, ConvertError, Item, Kind, Summary};
use crate::crypto::{FileCipher, Method};
use crate::metadir::{status, Metadata};
use crate::sys;
use crate::error::io_err;

pub struct Options {
    pub to: PathBuf,
    pub display: Display,
    /// Method shown in the published status (the config's).
    pub method: Method,
}

struct Ctx<'a> {
    meta: &'a Metadata,
    buf: Vec<u8>,
    /// Every selected name of each multiply-linked source inode, as exported paths: a
    /// name exported by an earlier (interrupted) run is linked to, not copied again.
    links: HashMap<(u64, u64), Vec<PathBuf>>,
    warnings: Vec<String>,
}

pub fn run(meta: &Metadata, paths: &[PathBuf], opts: &Options) -> Result<Summary, ConvertError> {
    let backing = meta.backing();
    let to = resolve(&opts.to).map_err(io_err("resolve", &opts.to))?;
    if to.starts_with(backing) || backing.starts_with(&to) {
        return Err(ConvertError::Select {
            path: opts.to.clone(),
            problem: format!("overlaps the backing directory {}: export to a directory outside it", backing.display()),
        });
    }
    // The directories made for the export: their names become durable once their parents
    // are fsynced, at the end (else a power cut after a finished export could lose it).
    let created: Vec<PathBuf> = to.ancestors().take_while(|a| !a.exists()).map(Path::to_path_buf).collect();
    std::fs::create_dir_all(&to).map_err(io_err("create", &opts.to))?;
    let items = select(backing, paths)?;
    let files: Vec<&Item> = items.iter().filter(|i| i.kind == Kind::File).collect();
    let bytes_total = files.iter().map(|i| i.md.len()).sum();
    let mut progress = Progress::new("decrypt", opts.display, files.len() as u64, bytes_total);
    // Progress for `tdefs status` is a convenience: an export goes on without it.
    let published = create_staging(meta).ok();
    if let Some(staging) = &published {
        let snapshot = status::collect(backing, &meta.keys, meta.dict.as_ref(), opts.method, false);
        progress.publish_to(staging.clone(), snapshot);
    }
    let mut links: HashMap<(u64, u64), Vec<PathBuf>> = HashMap::new();
    for i in files.iter().filter(|i| i.md.nlink() > 1) {
        links.entry((i.md.dev(), i.md.ino())).or_default().push(i.path_in(&to));
    }
    let mut ctx = Ctx { meta, buf: Vec::new(), links, warnings: Vec::new() };
    let mut summary = Summary::default();
    let mut dirs = Vec::new();
    for item in &items {
        let dest = item.path_in(&to);
        let r = match item.kind {
            Kind::Dir => export_dir(&dest).map(|()| dirs.push(item)),
            Kind::File => {
                let r = export_file(&mut ctx, item, &dest, &mut progress, &mut summary);
                progress.file_done();
                r
            }
            Kind::Symlink => export_symlink(&mut ctx, item, &dest, &mut summary),
            Kind::Other => export_special(item, &dest, &mut summary),
        };
        if let Err(why) = r {
            summary.fail(&item.rel, why);
        }
    }
    // Directories last, deepest first: adding entries would change their times again.
    for item in dirs.iter().rev() {
        let dest = item.path_in(&to);
        let r = File::open(item.path_in(backing))
            .and_then(|src| File::open(&dest).and_then(|dst| copy_attrs(&src, &item.md, &dst, false)));
        match r {
            Ok(w) => ctx.warnings.extend(w.into_iter().map(|w| format!("{}: {w}", show(&item.rel)))),
            Err(e) => summary.fail(&item.rel, format!("cannot copy the directory's attributes: {e}")),
        }
        // The names exported into it are durable once it is fsynced.
        if let Err(e) = sys::fsync_dir(&dest) {
            summary.fail(&item.rel, format!("cannot fsync the exported directory: {e}"));
        }
    }
    sys::fsync_dir(&to).map_err(io_err("fsync", &to))?;
    for dir in &created {
        if let Some(parent) = dir.parent() {
            sys::fsync_dir(parent).map_err(io_err("fsync", parent))?;
        }
    }
    progress.finish();
    if published.is_some() {
        let _ = remove_staging(meta);
    }
    for w in ctx.warnings.iter().take(20) {
        tracing::warn!("{w}");
    }
    if ctx.warnings.len() > 20 {
        tracing::warn!("... and {} more attribute warnings", ctx.warnings.len() - 20);
    }
    Ok(summary)
}

/// `p` made absolute with symlinks resolved, even if its last components do not exist yet.
fn resolve(p: &Path) -> std::io::Result<PathBuf> {
    let abs = std::env::current_dir()?.join(p);
    let mut existing = abs.as_path();
    let mut rest = Vec::new();
    while std::fs::symlink_metadata(existing).is_err() {
        rest.push(existing.file_name().unwrap_or_default().to_owned());
        existing = existing.parent().unwrap_or(Path::new("/"));
    }
    let mut out = std::fs::canonicalize(existing)?;
    for c in rest.iter().rev() {
        out.push(c);
    }
    Ok(out)
}

fn export_dir(dest: &Path) -> Result<(), String> {
    ensure_dir(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))
}

/// Whether `dest` already holds the export of a file with metadata `md` (a resumed run).
fn already_exported(dest: &Path, md: &std::fs::Metadata) -> Result<bool, String> {
    match std::fs::symlink_metadata(dest) {
        Ok(d) if d.is_file() && d.len() == md.len() && (d.mtime(), d.mtime_nsec()) == (md.mtime(), md.mtime_nsec()) => Ok(true),
        Ok(_) => Err(format!(
            "{} already exists and differs from the source: remove it or export to another directory",
            dest.display()
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(format!("cannot stat {}: {e}", dest.display())),
    }
}

fn cipher_for(ctx: &Ctx<'_>, rel: &[u8]) -> Result<Option<FileCipher>, String> {
    match ctx.meta.dict.get(rel) {
        None => Err("it has no record in the file dictionary, so whether it is ciphertext is unknown: it is not \
                     exported (`tdefs check` lists such files)"
            .into()),
        Some(e) if e.method.is_plaintext() => Ok(None),
        Some(e) => match ctx.meta.keys.get(e.key_id) {
            Some(k) => Ok(Some(k.cipher(&e.iv))),
            None => Err(format!(
                "its data key {:#018x} is missing from the key dictionary: it cannot be decrypted (restore .tdefs from a backup)",
                e.key_id
            )),
        },
    }
}

fn export_file(ctx: &mut Ctx<'_>, item: &Item, dest: &Path, progress: &mut Progress, summary: &mut Summary) -> Result<(), String> {
    let md = &item.md;
    if already_exported(dest, md)? {
        summary.files_unchanged += 1;
        progress.bytes(md.len());
        return Ok(());
    }
    if md.nlink() > 1 {
        let names = ctx.links.get(&(md.dev(), md.ino())).map(Vec::as_slice).unwrap_or_default();
        if let Some(done) = names.iter().find(|n| *n != dest && already_exported(n, md) == Ok(true)) {
            std::fs::hard_link(done, dest).map_err(|e| format!("cannot link {} to {}: {e}", dest.display(), done.display()))?;
            summary.files_done += 1;
            progress.bytes(md.len());
            return Ok(());
        }
    }
    let cipher = cipher_for(ctx, &item.rel)?;
    let src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(item.path_in(ctx.meta.backing()))
        .map_err(|e| format!("cannot open it: {e}"))?;
    let name = dest.file_name().unwrap_or(OsStr::new("file"));
    let mut tmp_name = b".".to_vec();
    tmp_name.extend_from_slice(name.as_bytes());
    tmp_name.extend_from_slice(b".tdefs-partial");
    let tmp = dest.with_file_name(OsStr::from_bytes(&tmp_name));
    // A new file, never one that exists or a link planted there (decrypt runs as root and
    // the export directory may be shared): a leftover of an interrupted run is removed.
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(format!("cannot remove {}: {e}", tmp.display())),
        _ => {}
    }
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
    let r = (|| {
        transform(&src, &dst, md.len(), Ciphers { from: cipher.as_ref(), to: None }, &mut ctx.buf, &mut |n| progress.bytes(n))
            .map_err(|e| format!("cannot copy it: {e}"))?;
        let w = copy_attrs(&src, md, &dst, false).map_err(|e| format!("cannot copy its attributes: {e}"))?;
        ctx.warnings.extend(w.into_iter().map(|w| format!("{}: {w}", show(&item.rel))));
        dst.sync_all().map_err(|e| format!("cannot fsync {}: {e}", tmp.display()))?;
        crate::hooks::crash("decrypt:before-rename");
        std::fs::rename(&tmp, dest).map_err(|e| format!("cannot rename {} into place: {e}", tmp.display()))
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r?;
    summary.files_done += 1;
    summary.bytes_done += md.len();
    Ok(())
}

fn export_symlink(ctx: &mut Ctx<'_>, item: &Item, dest: &Path, summary: &mut Summary) -> Result<(), String> {
    let target = std::fs::read_link(item.path_in(ctx.meta.backing())).map_err(|e| format!("cannot read the link: {e}"))?;
    match std::fs::read_link(dest) {
        Ok(t) if t == target => {
            // Made by a run stopped before it set owner and times: set them (idempotent).
            set_link_attrs(dest, &item.md, &mut ctx.warnings);
            summary.files_unchanged += 1;
            return Ok(());
        }
        Ok(_) => return Err(format!("{} already exists and points elsewhere", dest.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{} already exists and is not a symlink ({e})", dest.display())),
    }
    std::os::unix::fs::symlink(&target, dest).map_err(|e| format!("cannot create the symlink: {e}"))?;
    set_link_attrs(dest, &item.md, &mut ctx.warnings);
    summary.files_done += 1;
    Ok(())
}

/// Owner and times of a symlink or special file (a symlink's mode means nothing).
fn set_link_attrs(dest: &Path, md: &std::fs::Metadata, warnings: &mut Vec<String>) {
    let c = match sys::cstr(dest.as_os_str()) {
        Ok(c) => c,
        Err(_) => return,
    };
    if unsafe { libc::lchown(c.as_ptr(), md.uid(), md.gid()) } != 0 {
        warnings.push(format!("{}: cannot set owner: {}", dest.display(), std::io::Error::last_os_error()));
    }
    set_times(dest, md);
}

fn export_special(item: &Item, dest: &Path, summary: &mut Summary) -> Result<(), String> {
    let t = item.md.file_type();
    if t.is_socket() {
        summary.skip(&item.rel, "a socket: its server creates it again");
        return Ok(());
    }
    let attrs = || {
        let mut w = Vec::new();
        set_link_attrs(dest, &item.md, &mut w);
        let _ = std::fs::set_permissions(dest, std::os::unix::fs::PermissionsExt::from_mode(item.md.mode() & 0o7777));
    };
    if let Ok(have) = std::fs::symlink_metadata(dest) {
        if have.file_type() != t || have.rdev() != item.md.rdev() {
            return Err(format!("{} already exists and is not the same special file", dest.display()));
        }
        // Made by a run stopped before it set owner, times and mode: set them (idempotent;
        // found by the kill -9 test, which left a FIFO with the time of its creation).
        attrs();
        summary.files_unchanged += 1;
        return Ok(());
    }
    let c = sys::cstr(dest.as_os_str()).map_err(|e| e.to_string())?;
    if unsafe { libc::mknod(c.as_ptr(), item.md.mode(), item.md.rdev()) } != 0 {
        return Err(format!("cannot create the special file: {}", std::io::Error::last_os_error()));
    }
    attrs();
    summary.files_done += 1;
    Ok(())
}
