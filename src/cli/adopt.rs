//! `tdefs adopt`: record files that have no record as plaintext.
//!
//! A file without a record is refused by the mount (fail closed): its bytes may be
//! ciphertext whose record was lost. When the operator knows better — the file really is
//! plaintext, copied into the backing directory while it was unmounted — this says so.

use std::ffi::OsStr;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use crate::config::DEFAULT_CONFIG_PATH;
use crate::dictionary::{FileEntry, Record};
use crate::metadir::{is_hidden_name, MasterKeys, OpenOptions, OpenReport, LockedMetadata};
use crate::sys;

/// Record files that have no record (refused by the mount) as plaintext.
#[derive(Args, Debug)]
#[command(after_help = "Only for files you know to be plaintext, e.g. copied into the backing directory \
while it was unmounted. A file whose record was lost because .tdefs was restored from an older backup is \
ciphertext: restore the .tdefs that matches the data instead. Files that have a record are left alone. \
`tdefs check` lists the files without a record; `tdefs encrypt` then encrypts adopted files.\n\n\
Examples:\n  tdefs adopt --config /etc/tdefs/tdefs.toml db/restored_table.ibd\n  \
tdefs adopt --config tdefs.toml --backing /srv/backing import/   # every file below import/")]
pub struct AdoptArgs {
    /// Configuration file (master key; backing directory unless --backing).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Backing directory (unmounted; overrides `backing-dir` in the config).
    #[arg(long, value_name = "DIR")]
    backing: Option<PathBuf>,
    /// Files or directories, relative to the backing directory (as seen at the mountpoint).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
}

pub fn run(args: AdoptArgs) -> anyhow::Result<()> {
    let cfg = super::load_config(&args.config)?;
    let enc = &cfg.security.encryption;
    let Some(backing) = args.backing.or(cfg.backing_dir.clone()) else {
        bail!("no backing directory: give --backing or set `backing-dir` in the config");
    };
    let off = LockedMetadata::open(&backing, &MasterKeys::from_config(enc))
        .with_context(|| format!("cannot open backing directory {}", backing.display()))?;
    let loaded = off.load()?;
    let opts = OpenOptions { adopt: false, rewrite_threshold: enc.file_dictionary_rewrite_threshold };
    let meta = off.into_metadata(loaded, &opts, OpenReport::default())?;
    let mut adopted = 0;
    let mut recorded = 0;
    for p in &args.paths {
        let rel = crate::convert::normalize(p)?;
        let st = sys::stat_below(meta.backing_fd(), &rel).with_context(|| format!("{}: not found in {}", p.display(), backing.display()))?;
        let mut candidates = Vec::new();
        match st.st_mode & libc::S_IFMT {
            libc::S_IFREG => candidates.push(rel.clone()),
            libc::S_IFDIR => {
                let dir = sys::open_dir_below(meta.backing_fd(), &rel)?;
                crate::walk::walk(dir.as_fd(), |_: &OsStr| false, |e| {
                    if e.is_file() {
                        candidates.push([&rel[..], e.path].concat());
                    }
                    Ok::<(), std::io::Error>(())
                })?;
            }
            _ => bail!("{}: not a regular file or a directory", p.display()),
        }
        for path in candidates {
            if meta.dict.get(&path).is_some() {
                recorded += 1;
                continue;
            }
            let first = path.split(|&b| b == b'/').nth(1).unwrap_or_default();
            if is_hidden_name(OsStr::from_bytes(first)) {
                continue;
            }
            meta.dict.submit(Record::Put { path: path.clone(), entry: FileEntry::plaintext() })?;
            println!("adopted {}", String::from_utf8_lossy(&path));
            adopted += 1;
        }
    }
    meta.close()?;
    eprintln!("tdefs: {adopted} files recorded as plaintext; {recorded} already had a record and were left alone");
    Ok(())
}
