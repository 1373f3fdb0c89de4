//! `tdefs status`: is encryption on and working, for an SRE or a script.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;

use crate::config::DEFAULT_CONFIG_PATH;
use crate::control::{self, Request};
use crate::crypto::Method;
use crate::metadir::status::{self, Status};
use crate::metadir::{MasterKeys, MetaError, LockedMetadata, META_DIR};

/// Show whether a backing directory is initialized and mounted, its keys and files.
#[derive(Args, Debug)]
#[command(after_help = "A running mount answers through its control socket; an unmounted backing \
directory is read with the config's master key. While `tdefs encrypt`/`decrypt` runs, its progress \
(percent_complete, bytes/s, ETA) is shown. Key material is never shown.\n\n\
Examples:\n  tdefs status --config /etc/tdefs/tdefs.toml\n  tdefs status /var/lib/postgresql/15/main --json\n  \
tdefs status --config tdefs.toml /srv/backing   # an unmounted backing directory")]
pub struct StatusArgs {
    /// Configuration file (backing directory, method, master key).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// A tdefs mountpoint (asked through its control socket), or an unmounted backing
    /// directory (read with the config's key). Default: the config's mountpoint if mounted,
    /// else its backing-dir.
    #[arg(value_name = "MOUNTPOINT|BACKING")]
    mountpoint: Option<PathBuf>,
    /// One JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let st = gather(&args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", render(&st));
    }
    Ok(())
}

fn gather(args: &StatusArgs) -> anyhow::Result<Status> {
    // A directory on the command line is a backing directory if it holds tdefs metadata,
    // else it must be a running tdefs mount.
    let given_backing = args.mountpoint.as_ref().filter(|d| d.join(META_DIR).is_dir());
    if let (Some(mp), None) = (&args.mountpoint, given_backing) {
        return ask(mp);
    }
    let cfg = super::load_config(&args.config)?;
    if given_backing.is_none() {
        if let Some(mp) = &cfg.mountpoint {
            if let Ok(st) = ask(mp) {
                return Ok(st);
            }
        }
    }
    let Some(backing) = given_backing.cloned().or_else(|| cfg.backing_dir.clone()) else {
        bail!("no backing directory: set `backing-dir` in {} or give a MOUNTPOINT or BACKING directory", args.config.display());
    };
    let enc = &cfg.security.encryption;
    if !backing.join(META_DIR).exists() {
        return Ok(status::uninitialized(&backing, enc.data_encryption_method));
    }
    let off = match LockedMetadata::open_read_only(&backing, &MasterKeys::from_config(enc)) {
        Ok(off) => off,
        Err(e) => {
            // Held by a running `tdefs encrypt`/`decrypt`: its progress file has the picture.
            if matches!(e, MetaError::Locked { .. }) {
                if let Some(st) = running_conversion(&backing) {
                    return Ok(st);
                }
            }
            return Err(anyhow::Error::from(e))
                .with_context(|| format!("cannot read {} (if it is mounted, give its MOUNTPOINT)", backing.display()));
        }
    };
    let loaded = off.load()?;
    let mut st = status::collect(&off.backing, &off.keys, &loaded.tree, enc.data_encryption_method, false);
    // An online conversion job (or a file in the middle of one) waits for the next mount.
    let files = loaded.tree.conversions().count() as u64;
    let job = loaded.tree.job().cloned();
    if job.is_some() || files > 0 {
        st.conversion = Some(status::Conversion {
            operation: "online".into(),
            state: if job.as_ref().is_some_and(|j| j.paused) { "paused".into() } else { "unmounted".into() },
            target_method: job.as_ref().map(|j| j.method.to_string()),
            files_total: files,
            ..Default::default()
        });
    }
    Ok(st)
}

fn running_conversion(backing: &std::path::Path) -> Option<Status> {
    status::read_progress(backing).filter(|s| s.conversion.as_ref().is_some_and(|c| c.state == "running"))
}

fn ask(mp: &std::path::Path) -> anyhow::Result<Status> {
    let resp = control::call(mp, &Request::Status)?;
    if !resp.ok {
        bail!("the tdefs daemon on {} could not report: {}", resp.mountpoint.display(), resp.message);
    }
    serde_json::from_str(&resp.message).context("unreadable status from the daemon")
}

/// The human table.
fn render(s: &Status) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<24}{v}\n"));
    line("backing directory", s.backing.clone());
    line("initialized", if s.initialized { "yes".into() } else { "no (no tdefs metadata)".into() });
    line("mounted", if s.mounted { "yes".into() } else { "no".into() });
    line("method for new files", s.method_for_new_files.clone());
    if !s.initialized {
        line("plaintext files", s.plaintext_files.to_string());
        return out;
    }
    line("master key", s.master_key.clone().unwrap_or_default());
    line("data keys", s.data_keys.to_string());
    match &s.current_key {
        Some(k) => line(
            "current data key",
            format!("{} ({}), created {}, age {}", k.id, k.method, k.created, humantime::format_duration(Duration::from_secs(k.age_seconds))),
        ),
        None => line("current data key", "none (plaintext method)".into()),
    }
    let encrypting = || s.files_by_method.iter().filter(|(m, _)| m.as_str() != Method::Plaintext.name());
    line("encrypted files", encrypting().map(|(_, n)| n).sum::<u64>().to_string());
    for (m, n) in encrypting() {
        let bytes = s.bytes_by_method.get(m).copied().unwrap_or(0);
        line(&format!("  {m}"), format!("{n} ({bytes} bytes)"));
    }
    line("plaintext files", s.plaintext_files.to_string());
    if s.unrecorded_files > 0 {
        line("files without record", format!("{} (refused by the mount; run `tdefs check`)", s.unrecorded_files));
    }
    line(
        "bytes encrypted",
        format!("{:.1}% ({} of {} bytes)", s.percent_encrypted(), s.encrypted_bytes, s.encrypted_bytes + s.plaintext_bytes),
    );
    line("dictionary size", format!("{} bytes", s.dictionary_bytes));
    line("last compaction", s.last_compaction.clone().unwrap_or_else(|| "never".into()));
    if let Some(c) = s.conversion.as_ref().filter(|c| c.operation == "online") {
        line("conversion", super::online::line(c));
    } else if let Some(c) = &s.conversion {
        let eta = c.eta_seconds.map(|e| format!(", ETA {}", humantime::format_duration(Duration::from_secs(e)))).unwrap_or_default();
        line(
            "conversion",
            format!(
                "tdefs {} (pid {}) {}: {:.1}% complete, {} of {} files, {} of {} bytes, {} bytes/s{eta}",
                c.operation, c.pid, c.state, c.percent_complete, c.files_done, c.files_total, c.bytes_done, c.bytes_total, c.bytes_per_second
            ),
        );
        if c.state == "interrupted" {
            line("", format!("run `tdefs {}` again to finish (files already done are kept)", c.operation));
        }
    }
    out
}
