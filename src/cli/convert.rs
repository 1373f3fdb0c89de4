//! `tdefs encrypt` and `tdefs decrypt`: convert the data of an unmounted backing directory.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::HumanBytes;

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::convert::progress::Display;
use crate::convert::{decrypt, encrypt, Summary};
use crate::metadir::{MasterKeys, Metadata, OpenOptions, OpenReport, LockedMetadata, META_DIR};

/// Encrypt, in place, the files of an unmounted backing directory that are stored as
/// plaintext (files from before tdefs was enabled).
#[derive(Args, Debug)]
#[command(after_help = "Files go to the config's data-encryption-method with the current data key. A kill, \
crash or power cut at any moment leaves each file fully plaintext or fully encrypted, with the dictionary \
matching; run the same command again to finish. `tdefs status` shows percent_complete while it runs. \
Hard-linked files are skipped (listed). Exit status: 0 all done, 1 some files not converted, 2 error. \
To convert while the database runs, without unmounting: `tdefs convert start MOUNTPOINT`.\n\n\
Examples:\n  tdefs encrypt --config /etc/tdefs/tdefs.toml /srv/backing\n  \
tdefs encrypt --config tdefs.toml /srv/backing base/16384 pg_wal   # only these paths\n  \
tdefs encrypt --config tdefs.toml --init /srv/old-datadir            # a directory never used with tdefs")]
pub struct EncryptArgs {
    /// Configuration file (master key, method, rotation period).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// The backing directory has no tdefs metadata yet: create it (adopting its files as
    /// plaintext) and encrypt them.
    #[arg(long)]
    init: bool,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = Display::Auto)]
    progress: Display,
    /// Also re-encrypt files already encrypted with METHOD (e.g. aes256-ctr), or with any
    /// other method than the configured one (`all`), under the configured method and the
    /// current data key.
    #[arg(long, value_name = "METHOD|all")]
    reencrypt: Option<String>,
    /// Backing directory (unmounted).
    backing: PathBuf,
    /// Files or directories to encrypt, relative to the backing directory (as seen at the
    /// mountpoint); all of it when none is given.
    paths: Vec<PathBuf>,
}

/// Export plaintext copies of the files of an unmounted backing directory (to leave
/// tdefs, or for a plaintext backup). The backing directory is only read.
#[derive(Args, Debug)]
#[command(after_help = "Directories, symlinks, special files, hard links, owners, modes, xattrs and times are \
recreated; holes stay holes. Each file appears complete or not at all; run the same command again after an \
interruption and it skips what is done. Exit status: 0 all done, 1 some files not exported, 2 error.\n\n\
Examples:\n  tdefs decrypt --config /etc/tdefs/tdefs.toml /srv/backing --to /srv/plain\n  \
tdefs decrypt --config tdefs.toml /srv/backing base/16384 --to /tmp/one-db")]
pub struct DecryptArgs {
    /// Configuration file (master key).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Where the plaintext tree is written (created if missing; outside the backing directory).
    #[arg(long, value_name = "DIR")]
    to: PathBuf,
    /// Progress display.
    #[arg(long, value_enum, default_value_t = Display::Auto)]
    progress: Display,
    /// Backing directory (unmounted).
    backing: PathBuf,
    /// Files or directories to export, relative to the backing directory; all when none.
    paths: Vec<PathBuf>,
}

fn open(cfg: &Config, backing: &Path, init: bool) -> anyhow::Result<Metadata> {
    let enc = &cfg.security.encryption;
    let opts = OpenOptions { adopt: init, rewrite_threshold: enc.file_dictionary_rewrite_threshold };
    let master = MasterKeys::from_config(enc);
    let meta = if init {
        Metadata::open_or_init(backing, &master, &opts)
    } else {
        if !backing.join(META_DIR).is_dir() && backing.is_dir() {
            bail!(
                "{} has no tdefs metadata ({META_DIR}): to encrypt a directory never used with tdefs, add --init",
                backing.display()
            );
        }
        LockedMetadata::open(backing, &master).and_then(|off| {
            let loaded = off.load()?;
            off.into_metadata(loaded, &opts, OpenReport::default())
        })
    };
    let meta = meta.with_context(|| format!("cannot open backing directory {}", backing.display()))?;
    // A file in online conversion is under two ciphers, which only the mount reads.
    let converting = meta.dict.conversions();
    if !converting.is_empty() {
        bail!(
            "{} file(s) of {} are in the middle of an online conversion (e.g. {}): mount it to let the conversion \
             finish (or run `tdefs convert cancel MOUNTPOINT`, which finishes them), then run this again",
            converting.len(),
            backing.display(),
            String::from_utf8_lossy(&converting[0].paths[0])
        );
    }
    if meta.report.staged_copies_removed > 0 || meta.report.renames_completed > 0 {
        eprintln!(
            "tdefs: an interrupted run was settled: {} files had been converted, {} staged copies were dropped (their originals are intact)",
            meta.report.renames_completed, meta.report.staged_copies_removed
        );
    }
    Ok(meta)
}

fn report(verb: &str, s: &Summary, skipped_fail: bool) -> ExitCode {
    eprintln!(
        "tdefs: {verb} {} files ({}); {} needed nothing",
        s.files_done,
        HumanBytes(s.bytes_done),
        s.files_unchanged
    );
    for (p, why) in &s.skipped {
        eprintln!("  skipped {p}: {why}");
    }
    for (p, why) in &s.failed {
        eprintln!("  FAILED  {p}: {why}");
    }
    if !s.failed.is_empty() || (skipped_fail && !s.skipped.is_empty()) {
        eprintln!(
            "tdefs: {} files were not {verb}; fix the cause above and run the same command again",
            s.failed.len() + if skipped_fail { s.skipped.len() } else { 0 }
        );
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn finish(r: anyhow::Result<ExitCode>) -> ExitCode {
    r.unwrap_or_else(|e| {
        eprintln!("tdefs: error: {e:#}");
        ExitCode::from(2)
    })
}

pub fn run_encrypt(args: EncryptArgs) -> ExitCode {
    finish((|| {
        let cfg = super::load_config(&args.config)?;
        let enc = &cfg.security.encryption;
        if enc.data_encryption_method.is_plaintext() {
            return Err(crate::convert::ConvertError::PlaintextMethod.into());
        }
        let meta = open(&cfg, &args.backing, args.init)?;
        let reencrypt = match args.reencrypt.as_deref() {
            None => encrypt::Reencrypt::No,
            Some("all") => encrypt::Reencrypt::AllOther,
            Some(m) => encrypt::Reencrypt::From(m.parse()?),
        };
        let opts = encrypt::Options {
            method: enc.data_encryption_method,
            rotation: enc.data_key_rotation_period,
            display: args.progress,
            reencrypt,
        };
        let s = encrypt::run(&meta, &args.paths, &opts)?;
        Ok(report("encrypted", &s, true))
    })())
}

pub fn run_decrypt(args: DecryptArgs) -> ExitCode {
    finish((|| {
        let cfg = super::load_config(&args.config)?;
        let meta = open(&cfg, &args.backing, false)?;
        let opts = decrypt::Options {
            to: args.to.clone(),
            display: args.progress,
            method: cfg.security.encryption.data_encryption_method,
        };
        let s = decrypt::run(&meta, &args.paths, &opts)?;
        meta.close()?;
        Ok(report("decrypted", &s, false))
    })())
}
