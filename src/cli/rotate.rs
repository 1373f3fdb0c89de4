//! `tdefs rotate-master-key`: online master-key rotation through the control socket.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use crate::control::{self, Request};

/// Re-wrap a running mount's keys under a new master key, while the database keeps running.
#[derive(Args, Debug)]
#[command(after_help = "The running daemon reads NEW.toml itself and re-wraps its key dictionary under that \
config's [security.encryption.master-key]; file data is not rewritten. Afterwards mount with NEW.toml \
(the old master key is no longer needed). An unmounted backing directory is rotated at its next mount \
instead: put the old key in [security.encryption.previous-master-key].\n\n\
Examples:\n  tdefs rotate-master-key --config /etc/tdefs/tdefs-new.toml /var/lib/postgresql\n  \
tdefs rotate-master-key --config /etc/tdefs/kms.toml   # mountpoint taken from the config")]
pub struct RotateArgs {
    /// Config whose master-key the mount should use from now on.
    #[arg(short, long, value_name = "NEW.toml")]
    config: PathBuf,
    /// The mountpoint (default: `mountpoint` in the config).
    mountpoint: Option<PathBuf>,
}

pub fn run(args: RotateArgs) -> anyhow::Result<()> {
    // Validate here too, so a typo is reported before anything is sent.
    let cfg = super::load_config(&args.config)?;
    let Some(mp) = args.mountpoint.or(cfg.mountpoint) else {
        bail!("no mountpoint: give it on the command line or set `mountpoint` in {}", args.config.display());
    };
    let config = std::fs::canonicalize(&args.config).with_context(|| format!("cannot resolve {}", args.config.display()))?;
    let resp = control::call(&mp, &Request::RotateMasterKey { config })?;
    if !resp.ok {
        bail!("master-key rotation on {} failed, nothing changed: {}", resp.mountpoint.display(), resp.message);
    }
    println!("{}: master key rotated: {}", resp.mountpoint.display(), resp.message);
    println!("From now on mount with {}; the old master key is no longer needed.", args.config.display());
    Ok(())
}
