//! `tdefs check`: offline consistency check (fsck) of a backing directory.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::DEFAULT_CONFIG_PATH;
use crate::dictionary::{DictError, FileDict, Record};
use crate::metadir::check::{check, CheckReport};
use crate::metadir::{MasterKeys, OpenOptions, OpenReport, LockedMetadata};

/// Check an unmounted backing directory against its dictionaries, with the master key.
#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 clean, 1 problems found, 2 could not check.\n\n\
Examples:\n  tdefs check --config /etc/tdefs/tdefs.toml\n  tdefs check --config tdefs.toml --repair /srv/backing")]
pub struct CheckArgs {
    /// Configuration file (for the master key and, unless given, the backing directory).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Drop stale entries (entries whose file no longer exists), after listing them.
    #[arg(long)]
    repair: bool,
    /// List every plaintext file, not only their number.
    #[arg(short, long)]
    verbose: bool,
    /// Backing directory (overrides `backing-dir` in the config).
    backing: Option<PathBuf>,
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn print_report(r: &CheckReport, verbose: bool) {
    println!("dictionary entries:     {}", r.entries);
    println!("data keys:              {}", r.data_keys);
    for (m, n) in &r.encrypted {
        println!("files {:<17} {n}", format!("{m}:"));
    }
    println!(
        "files plaintext:        {} (recorded as plaintext: adopted with --init, or written while the method was plaintext)",
        r.plaintext_files.len()
    );
    if verbose {
        for p in &r.plaintext_files {
            println!("  plaintext {}", show(p));
        }
    }
    if r.unrecorded_empty > 0 {
        println!("empty, no record:       {} (harmless: recorded when next opened)", r.unrecorded_empty);
    }
    if r.pending_renames > 0 {
        println!("pending renames:        {} (settled at the next mount)", r.pending_renames);
    }
    if r.staged_copies > 0 {
        println!("interrupted encrypt:    {} staged copies (originals intact; run `tdefs encrypt` again to finish)", r.staged_copies);
    }
    if let Some(b) = r.torn_tail {
        println!("torn log tail:          {b} bytes (an interrupted write; cut at the next mount)");
    }
    for p in &r.stale {
        println!("STALE   entry without a file: {}", show(p));
    }
    for (p, k) in &r.missing_keys {
        println!("MISSING data key {k:#018x} for {} (the file cannot be decrypted)", show(p));
    }
    for p in &r.unrecorded {
        println!(
            "UNRECORDED file without a record: {} (the mount refuses it: restore .tdefs from the backup that \
             matches the data, or `tdefs adopt` it if it really is plaintext)",
            show(p)
        );
    }
    for (a, b) in &r.link_mismatches {
        println!("MISMATCH hard links {} and {} have different entries (one reads as noise)", show(a), show(b));
    }
    println!("problems: {}", r.problems());
}

pub fn run(args: CheckArgs) -> ExitCode {
    match run_inner(args) {
        Ok(clean) => {
            if clean {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("tdefs: could not check: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_inner(args: CheckArgs) -> anyhow::Result<bool> {
    let cfg = super::load_config(&args.config)?;
    let backing = args.backing.or(cfg.backing_dir.clone()).ok_or_else(|| {
        anyhow::anyhow!("no backing directory: give it on the command line or set `backing-dir` in the config")
    })?;
    let enc = &cfg.security.encryption;
    // Only --repair writes: a plain check may inspect another user's metadata.
    let off = if args.repair {
        LockedMetadata::open(&backing, &MasterKeys::from_config(enc))?
    } else {
        LockedMetadata::open_read_only(&backing, &MasterKeys::from_config(enc))?
    };
    let loaded = match off.load() {
        Ok(l) => l,
        Err(e) if args.repair => {
            println!("the file dictionary does not load: {e}");
            let kept = FileDict::salvage(&off.meta, &e)?;
            if !kept.is_empty() {
                println!("repair: cut the damaged log before the damage; copies kept:");
                for k in &kept {
                    println!("  {}", k.display());
                }
                println!("repair: records after the damage are lost: files created, linked or renamed after that point are listed below as UNRECORDED (refused by the mount) or may read as noise; check them");
            } else if !matches!(e, DictError::RolledBack { .. }) {
                return Err(e.into());
            }
            let l = off.load_unchecked()?;
            off.accept(&l)?;
            println!(
                "repair: accepted the file dictionary as it is (generation {}, record {}); files whose records were lost \
                 are listed below as UNRECORDED",
                l.generation(),
                l.last_seq()
            );
            l
        }
        Err(e) => return Err(e.into()),
    };
    let report = check(&off, &loaded)?;
    print_report(&report, args.verbose);
    if report.problems() == 0 || !args.repair {
        return Ok(report.problems() == 0);
    }
    if !report.missing_keys.is_empty() || !report.link_mismatches.is_empty() || !report.unrecorded.is_empty() {
        println!(
            "repair can drop stale entries only; missing keys, mismatched links and files without a record need the \
             dictionaries or the files restored from a backup (or `tdefs adopt` for files that really are plaintext)"
        );
    }
    if report.stale.is_empty() {
        return Ok(false);
    }
    println!("repair: dropping {} stale entries:", report.stale.len());
    for p in &report.stale {
        println!("  drop {}", show(p));
    }
    let opts = OpenOptions { adopt: false, rewrite_threshold: enc.file_dictionary_rewrite_threshold };
    let meta = off.into_metadata(loaded, &opts, OpenReport::default())?;
    for p in &report.stale {
        if meta.dict.get(p).is_some() {
            meta.dict.submit(Record::Delete { path: p.clone() })?;
        }
    }
    meta.dict.compact()?;
    meta.close()?;
    let backing = meta.backing().to_path_buf();
    drop(meta);
    let off = LockedMetadata::open(&backing, &MasterKeys::from_config(enc))?;
    let after = check(&off, &off.load()?)?;
    println!("after repair: {} problems", after.problems());
    Ok(after.problems() == 0)
}
