//! Plaintext scanner (issues 4 and 21): reads every regular file of the backing directory
//! (outside tdefs' own `.tdefs*` directories) that is not recorded as plaintext — encrypted
//! ones, and files with no record at all (whose bytes nobody vouches for) — and searches it
//! for known plaintext (markers a workload wrote, database file signatures). Any hit is a
//! leak. Files recorded as plaintext (adopted with --init, or written under the plaintext
//! method) are listed separately: they are expected to hold plaintext, unless
//! `--no-plaintext` says none may exist. Works on an unmounted backing directory, with the
//! master key.
//!
//! A scan that found nothing to read (no file, or only empty ones) proves nothing (a workload that wrote nothing, a wrong
//! directory): it fails (exit 2) unless `--allow-empty` says so is expected.
//!
//!   tdefs-scan --config FILE [--pattern TEXT]... [--pattern-file FILE] [--no-builtin]
//!              [--allow-empty] [--no-plaintext]
//! Output: one `LEAK`, `PLAINTEXT` or `UNRECORDED` line per finding, then the summary lines
//! `scanned N files not recorded as plaintext (...): L leaks`, `N files recorded as
//! plaintext[: PATH...]` and `N non-empty files without a record[: PATH...]`.
//! Exit status: 0 no leak, 1 leak found (or, with --no-plaintext, a file recorded as
//! plaintext or a non-empty file without a record), 2 could not scan or scanned nothing.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tdefs::config::Config;
use tdefs::metadir::{is_hidden_name, MasterKeys, LockedMetadata};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    config: PathBuf,
    /// Plaintext to look for (repeatable).
    #[arg(long)]
    pattern: Vec<String>,
    /// A file with one pattern per line.
    #[arg(long)]
    pattern_file: Option<PathBuf>,
    /// Do not include the built-in database signatures.
    #[arg(long)]
    no_builtin: bool,
    /// Scanning no file is expected (the workload leaves no file that should be encrypted);
    /// without it, a scan of nothing fails (exit 2).
    #[arg(long)]
    allow_empty: bool,
    /// No file may be recorded as plaintext and no non-empty file may lack a record: each
    /// one found is a failure (exit 1). For workloads that never adopted a file and never
    /// used the plaintext method.
    #[arg(long)]
    no_plaintext: bool,
}

/// Plaintext every database page or header of these formats contains.
const BUILTIN: &[&str] = &["SQLite format 3", "TDEFS-MARKER-"];

fn run(a: Args) -> Result<bool, String> {
    let cfg = Config::load(&a.config).map_err(|e| e.to_string())?;
    let backing = cfg.backing_dir.clone().ok_or("no backing-dir in the config")?;
    let off = LockedMetadata::open_read_only(&backing, &MasterKeys::from_config(&cfg.security.encryption)).map_err(|e| e.to_string())?;
    let loaded = off.load().map_err(|e| e.to_string())?;
    let mut patterns: Vec<Vec<u8>> = a.pattern.iter().map(|p| p.as_bytes().to_vec()).collect();
    if let Some(f) = &a.pattern_file {
        let text = std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?;
        patterns.extend(text.lines().filter(|l| !l.is_empty()).map(|l| l.as_bytes().to_vec()));
    }
    if !a.no_builtin {
        patterns.extend(BUILTIN.iter().map(|p| p.as_bytes().to_vec()));
    }
    let mut files = Vec::new();
    let root = std::fs::File::open(&backing).map_err(|e| format!("{}: {e}", backing.display()))?;
    tdefs::walk::walk(std::os::fd::AsFd::as_fd(&root), is_hidden_name, |e| {
        if e.is_file() {
            files.push((e.path.to_vec(), backing.join(std::ffi::OsStr::from_bytes(&e.path[1..]))));
        }
        Ok::<(), std::io::Error>(())
    })
    .map_err(|e| e.to_string())?;
    let (mut scanned, mut bytes, mut leaks) = (0u64, 0u64, 0u64);
    let mut plaintext = Vec::new();
    let mut unrecorded = Vec::new();
    let mut hits: HashMap<String, u64> = HashMap::new();
    for (rel, path) in &files {
        let entry = loaded.tree.get(rel);
        match entry {
            Some(e) if e.method.is_plaintext() => plaintext.push(String::from_utf8_lossy(rel).into_owned()),
            _ => {
                let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
                scanned += 1;
                bytes += data.len() as u64;
                if entry.is_none() && !data.is_empty() {
                    unrecorded.push(String::from_utf8_lossy(rel).into_owned());
                }
                let what = entry.map_or_else(|| "no record".to_string(), |e| e.method.to_string());
                for p in &patterns {
                    if !p.is_empty() && data.windows(p.len()).any(|w| w == &p[..]) {
                        leaks += 1;
                        *hits.entry(String::from_utf8_lossy(p).into_owned()).or_default() += 1;
                        println!("LEAK {} contains {:?} ({what})", String::from_utf8_lossy(rel), String::from_utf8_lossy(p));
                    }
                }
            }
        }
    }
    let list = |v: &[String]| if v.is_empty() { String::new() } else { format!(": {}", v.join(" ")) };
    if a.no_plaintext {
        for p in &plaintext {
            println!("PLAINTEXT {p} is recorded as plaintext (--no-plaintext: none may be)");
        }
        for p in &unrecorded {
            println!("UNRECORDED {p} has no record (the mount refuses it)");
        }
    }
    println!("scanned {scanned} files not recorded as plaintext ({:.1} MiB) for {} patterns: {leaks} leaks", bytes as f64 / 1048576.0, patterns.len());
    println!("{} files recorded as plaintext{}", plaintext.len(), list(&plaintext));
    println!("{} non-empty files without a record{}", unrecorded.len(), list(&unrecorded));
    if bytes == 0 && !a.allow_empty {
        return Err(format!(
            "scanned no byte in {} ({scanned} files, all empty; {} files recorded as plaintext): nothing was proven; \
             pass --allow-empty if the workload is meant to leave no file to encrypt",
            backing.display(),
            plaintext.len()
        ));
    }
    Ok(leaks == 0 && (!a.no_plaintext || (plaintext.is_empty() && unrecorded.is_empty())))
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tdefs-scan: {e}");
            ExitCode::from(2)
        }
    }
}
