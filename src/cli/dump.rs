//! `tdefs dump files|keys`: the metadata, as `tikv-ctl encryption-meta dump-file/dump-key`
//! shows TiKV's. Offline (the backing directory must not be mounted).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::config::DEFAULT_CONFIG_PATH;
use crate::metadir::{MasterKeys, LockedMetadata};

/// Show the file or key dictionary of an unmounted backing directory.
#[derive(Args, Debug)]
#[command(after_help = "Examples:\n  tdefs dump files --config /etc/tdefs/tdefs.toml /base/16384\n  \
tdefs dump keys --config /etc/tdefs/tdefs.toml --json")]
pub struct DumpArgs {
    #[command(subcommand)]
    what: What,
    /// Configuration file (master key and backing directory).
    #[arg(short, long, global = true, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    /// Backing directory (overrides `backing-dir` in the config).
    #[arg(long, global = true, value_name = "DIR")]
    backing: Option<PathBuf>,
    /// One JSON object per line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Also print IVs (files) or key material (keys). Anyone who sees them can decrypt.
    #[arg(long, global = true)]
    show_secrets: bool,
}

#[derive(Subcommand, Debug)]
enum What {
    /// Every file with an entry: path, method, data key id (IVs with --show-secrets).
    Files {
        /// Only paths starting with this prefix (e.g. /base).
        prefix: Option<String>,
    },
    /// Every data key: id, method, creation time, files referencing it.
    Keys,
}

#[derive(Serialize)]
struct FileRow {
    path: String,
    method: String,
    key_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    iv: Option<String>,
}

#[derive(Serialize)]
struct KeyRow {
    id: String,
    method: String,
    created: String,
    files: u64,
    current: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
}

fn time(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

pub fn run(args: DumpArgs) -> anyhow::Result<()> {
    let cfg = super::load_config(&args.config)?;
    let backing = args.backing.clone().or(cfg.backing_dir.clone()).ok_or_else(|| {
        anyhow::anyhow!("no backing directory: give --backing or set `backing-dir` in the config")
    })?;
    let off = LockedMetadata::open_read_only(&backing, &MasterKeys::from_config(&cfg.security.encryption))?;
    if args.show_secrets {
        eprintln!("tdefs: WARNING: printing secrets; anyone who sees this output can decrypt the files");
    }
    match &args.what {
        What::Files { prefix } => {
            let loaded = off.load()?;
            let mut rows = Vec::new();
            loaded.tree.for_each(|p, e| {
                let path = String::from_utf8_lossy(p).into_owned();
                if prefix.as_deref().is_none_or(|pre| path.starts_with(pre)) {
                    rows.push(FileRow {
                        path,
                        method: e.method.to_string(),
                        key_id: format!("{:#018x}", e.key_id),
                        iv: args.show_secrets.then(|| hex::encode(e.iv)),
                    });
                }
            });
            rows.sort_by(|a, b| a.path.cmp(&b.path));
            for r in rows {
                if args.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    let iv = r.iv.map(|v| format!("\tiv {v}")).unwrap_or_default();
                    println!("{}\t{}\tkey {}{iv}", r.path, r.method, r.key_id);
                }
            }
        }
        What::Keys => {
            let refs: HashMap<u64, u64> = match off.load() {
                Ok(l) => l.tree.key_refs().clone(),
                Err(e) => {
                    eprintln!("tdefs: the file dictionary does not load ({e}); reference counts unknown");
                    HashMap::new()
                }
            };
            let current = off.keys.current().map(|k| k.id);
            for k in off.keys.keys() {
                let r = KeyRow {
                    id: format!("{:#018x}", k.id),
                    method: k.method.to_string(),
                    created: time(k.created),
                    files: refs.get(&k.id).copied().unwrap_or(0),
                    current: current == Some(k.id),
                    key: args.show_secrets.then(|| hex::encode(off.keys.expose_key(k.id).unwrap_or_default())),
                };
                if args.json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    let key = r.key.map(|v| format!("\tkey {v}")).unwrap_or_default();
                    let cur = if r.current { "\tcurrent" } else { "" };
                    println!("{}\t{}\tcreated {}\tfiles {}{cur}{key}", r.id, r.method, r.created, r.files);
                }
            }
        }
    }
    Ok(())
}
