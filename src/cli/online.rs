//! `tdefs convert`: the online conversion of a running mount, through its control socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use crate::control::{self, ConvertAction, ConvertJob, Request};
use crate::crypto::Method;
use crate::dictionary::{valid_path, Job};
use crate::metadir::status::{Conversion, Status};

/// Encrypt, re-key or change the method of a running mount's files while the database keeps
/// using them.
#[derive(Args, Debug)]
#[command(after_help = "The daemon rewrites each file in place, 1 MiB at a time under the file's lock, \
journaling each chunk first: a kill or power cut at any instant resumes where it stopped, and every byte \
the database wrote reads back. The job is recorded in the dictionary, so it continues after a remount \
until done. `tdefs status MOUNTPOINT` shows it too. (Offline, on an unmounted backing directory: \
`tdefs encrypt`.)\n\n\
Examples:\n  tdefs convert start /var/lib/postgresql --rate 50M --io-share 50   # encrypt what is plaintext\n  \
tdefs convert start /srv/db --method aes256-xts                     # move CTR files to XTS\n  \
tdefs convert start /srv/db --rekey-older-than 90d                  # re-key files under old data keys\n  \
tdefs convert status /srv/db\n  tdefs convert pause /srv/db\n  tdefs convert resume /srv/db\n  \
tdefs convert cancel /srv/db   # finishes the file in progress, starts no other")]
pub struct ConvertArgs {
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand, Debug)]
enum Action {
    /// Start converting every file that is plaintext, under another method than the
    /// target, or (with --rekey-older-than) under a data key older than the age.
    Start(StartArgs),
    /// Pause the job between two chunks (files in progress stay consistent).
    Pause(Mp),
    /// Resume a paused job.
    Resume(Mp),
    /// Stop the job: the file in progress is finished, no other is started.
    Cancel(Mp),
    /// Show the job's progress.
    Status(StatusArgs),
}

#[derive(Args, Debug)]
struct Mp {
    /// The mountpoint.
    mountpoint: PathBuf,
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// The mountpoint of a running tdefs.
    mountpoint: PathBuf,
    /// Only these files or directories (below the mountpoint, or relative to it).
    paths: Vec<PathBuf>,
    /// Target method (default: the mount's data-encryption-method).
    #[arg(long, value_name = "METHOD")]
    method: Option<Method>,
    /// Also re-encrypt files whose data key is older than this (e.g. 90d), under a key
    /// younger than it; unused old keys are then deleted.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    rekey_older_than: Option<Duration>,
    /// Bytes per second at most (e.g. 50M = 50,000,000; 64Mi = 64 MiB); default: no limit.
    #[arg(long, value_name = "RATE", value_parser = parse_rate, default_value = "0")]
    rate: u64,
    /// Percent of the time the converter may hold a file's lock (the database waits while
    /// it does): 100 = no pause between chunks.
    #[arg(long, value_name = "PERCENT", default_value_t = 100, value_parser = clap::value_parser!(u8).range(1..=100))]
    io_share: u8,
    /// Wait until the job is done, printing its progress.
    #[arg(long)]
    wait: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    mountpoint: PathBuf,
    /// Machine-readable output (the `conversion` object of `tdefs status --json`).
    #[arg(long)]
    json: bool,
    /// Keep printing until the job is done.
    #[arg(long)]
    wait: bool,
}

/// "50M", "50MB/s", "64Mi", "1G", "1000000": bytes per second.
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s");
    let t = t.strip_suffix('B').unwrap_or(t);
    let (num, mult) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        None => (t, 1u64),
        Some((i, _)) => (
            &t[..i],
            match &t[i..] {
                "k" | "K" => 1_000,
                "M" => 1_000_000,
                "G" => 1_000_000_000,
                "Ki" => 1 << 10,
                "Mi" => 1 << 20,
                "Gi" => 1 << 30,
                u => return Err(format!("unknown unit {u:?} in rate {s:?} (use K, M, G, Ki, Mi or Gi)")),
            },
        ),
    };
    let n: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a rate (e.g. 50M, 64Mi)"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("{s:?} is not a rate"));
    }
    Ok((n * mult as f64) as u64)
}

/// The daemon's side of `start`: the request checked and made a job.
pub fn job_from_request(j: ConvertJob, default_method: Method) -> Result<Job, String> {
    let method = match &j.method {
        None => default_method,
        Some(m) => m.parse::<Method>().map_err(|e| e.to_string())?,
    };
    let mut paths = Vec::new();
    for p in j.paths {
        let b = p.into_bytes();
        if !valid_path(&b) {
            return Err(format!("{:?} is not a path below the mount root", String::from_utf8_lossy(&b)));
        }
        paths.push(b);
    }
    Ok(crate::fs::new_job(method, j.older_than_secs.map(Duration::from_secs), paths, j.rate, j.io_share))
}

/// `path` as the dictionary names it ("/a/b"), given below or relative to `mp`.
fn mount_path(mp: &Path, path: &Path) -> anyhow::Result<String> {
    let rel = if path.is_absolute() {
        path.strip_prefix(mp).with_context(|| format!("{} is not below the mountpoint {}", path.display(), mp.display()))?
    } else {
        path
    };
    let s = rel.to_str().with_context(|| format!("{} is not UTF-8", rel.display()))?;
    let s = format!("/{}", s.trim_matches('/'));
    if s == "/" {
        bail!("give paths below the mountpoint, or none for every file");
    }
    Ok(s)
}

fn send(mp: &Path, action: ConvertAction) -> anyhow::Result<String> {
    let resp = control::call(mp, &Request::Convert { action })?;
    if !resp.ok {
        bail!("{}: {}", resp.mountpoint.display(), resp.message);
    }
    Ok(resp.message)
}

fn status(mp: &Path) -> anyhow::Result<Option<Conversion>> {
    let resp = control::call(mp, &Request::Status)?;
    if !resp.ok {
        bail!("the tdefs daemon on {} could not report: {}", resp.mountpoint.display(), resp.message);
    }
    let st: Status = serde_json::from_str(&resp.message).context("unreadable status from the daemon")?;
    Ok(st.conversion.filter(|c| c.operation == "online"))
}

pub fn line(c: &Conversion) -> String {
    if c.state == "unmounted" || (c.state == "paused" && c.pid == 0) {
        return format!(
            "online conversion to {} {}: continues at the next mount{}",
            c.target_method.as_deref().unwrap_or("(cancelled: finishing the files in progress)"),
            if c.state == "paused" { "paused (resume it once mounted)" } else { "pending" },
            if c.files_total > 0 { format!(" ({} file(s) half converted)", c.files_total) } else { String::new() }
        );
    }
    let eta = c.eta_seconds.map(|e| format!(", ETA {}", humantime::format_duration(Duration::from_secs(e)))).unwrap_or_default();
    let target = c.target_method.as_deref().unwrap_or("?");
    let mut s = format!(
        "online conversion to {target} {}: {:.1}% complete, {} of {} files, {} of {} bytes, {} bytes/s{eta}",
        c.state, c.percent_complete, c.files_done, c.files_total, c.bytes_done, c.bytes_total, c.bytes_per_second
    );
    if c.files_skipped > 0 {
        s.push_str(&format!(", {} skipped (see the log)", c.files_skipped));
    }
    if let Some(f) = &c.current_file {
        s.push_str(&format!(", now {f}"));
    }
    if let Some(e) = &c.last_error {
        s.push_str(&format!(", last error: {e}"));
    }
    s
}

/// Print progress until the job is gone. Exit 1 if files were skipped.
fn wait(mp: &Path) -> anyhow::Result<ExitCode> {
    let mut last: Option<Conversion> = None;
    let mut printed = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        match status(mp)? {
            None => break,
            Some(c) => {
                if printed.elapsed() >= Duration::from_secs(5) {
                    eprintln!("{}", line(&c));
                    printed = std::time::Instant::now();
                }
                last = Some(c);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let skipped = last.as_ref().map_or(0, |c| c.files_skipped);
    println!("online conversion finished{}", if skipped > 0 { format!("; {skipped} file(s) skipped (see the log)") } else { String::new() });
    Ok(if skipped > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    match args.action {
        Action::Start(a) => start(a),
        Action::Pause(m) => ok(send(&m.mountpoint, ConvertAction::Pause)?),
        Action::Resume(m) => ok(send(&m.mountpoint, ConvertAction::Resume)?),
        Action::Cancel(m) => ok(send(&m.mountpoint, ConvertAction::Cancel)?),
        Action::Status(a) => {
            if a.wait {
                return wait(&a.mountpoint);
            }
            match status(&a.mountpoint)? {
                Some(c) if a.json => println!("{}", serde_json::to_string_pretty(&c)?),
                Some(c) => println!("{}", line(&c)),
                None if a.json => println!("null"),
                None => println!("no online conversion on {}", a.mountpoint.display()),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn ok(msg: String) -> anyhow::Result<ExitCode> {
    println!("{msg}");
    Ok(ExitCode::SUCCESS)
}

pub fn start(a: StartArgs) -> anyhow::Result<ExitCode> {
    let mp = std::fs::canonicalize(&a.mountpoint).with_context(|| format!("cannot resolve {}", a.mountpoint.display()))?;
    let paths = a.paths.iter().map(|p| mount_path(&mp, p)).collect::<anyhow::Result<Vec<_>>>()?;
    let job = ConvertJob {
        method: a.method.map(|m| m.to_string()),
        older_than_secs: a.rekey_older_than.map(|d| d.as_secs()),
        paths,
        rate: a.rate,
        io_share: a.io_share,
    };
    println!("{}", send(&mp, ConvertAction::Start(job))?);
    if a.wait {
        return wait(&mp);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn rates() {
        assert_eq!(super::parse_rate("50M"), Ok(50_000_000));
        assert_eq!(super::parse_rate("50MB/s"), Ok(50_000_000));
        assert_eq!(super::parse_rate("64Mi"), Ok(64 << 20));
        assert_eq!(super::parse_rate("1.5G"), Ok(1_500_000_000));
        assert_eq!(super::parse_rate("1000"), Ok(1000));
        assert!(super::parse_rate("5X").is_err());
        assert!(super::parse_rate("fast").is_err());
    }
}
