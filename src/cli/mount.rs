//! `tdefs mount`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;

use super::{daemon, sdnotify};
use crate::config::DEFAULT_CONFIG_PATH;
use crate::fs::{fuser_config, mounting, Converter, Volume, FsOptions, Housekeeping, MountSpec, FuseAdapter};
use crate::control;
use crate::crypto::Method;
use crate::metadir::owner::{Owner, State};
use crate::metadir::{rotate_master_key, status, MasterKeys, Metadata, OpenOptions};
use crate::metrics;

/// Mount a backing directory (ciphertext) at a mountpoint (plaintext view).
#[derive(Args, Debug)]
#[command(after_help = "Runs in the foreground until unmounted (SIGINT/SIGTERM, `umount MOUNTPOINT` or \
`fusermount3 -u MOUNTPOINT`). Under systemd (Type=notify) it reports READY=1 once the mount is live. \
`metrics-addr` in the config serves Prometheus metrics; `log-level` sets the log level (RUST_LOG overrides it). \
For /etc/fstab and `mount -t fuse.tdefs`, see `tdefs mount.fuse.tdefs --help`.\n\n\
Examples:\n  tdefs mount --config /etc/tdefs/tdefs.toml\n  tdefs mount --config tdefs.toml --daemon /srv/backing /srv/db\n  \
tdefs mount --config tdefs.toml --init /srv/existing-data /srv/db   # adopt existing files as plaintext\n  \
RUST_LOG=tdefs=debug tdefs mount --config tdefs.toml               # every failed request, with its errno")]
pub struct MountArgs {
    /// Configuration file (TOML).
    #[arg(short, long, value_name = "FILE", default_value = DEFAULT_CONFIG_PATH)]
    pub(super) config: PathBuf,
    /// Return once the mount is ready and keep serving it in the background. Start-up
    /// errors still print here; later logs go to --log-file (else to the journal when
    /// started by systemd, else they are discarded).
    #[arg(long)]
    pub(super) daemon: bool,
    /// With --daemon: append the daemon's log to this file.
    #[arg(long, value_name = "FILE")]
    pub(super) log_file: Option<PathBuf>,
    /// Adopt a backing directory that already holds files but no tdefs metadata: its files
    /// stay readable (tracked as plaintext), new files are encrypted.
    #[arg(long)]
    pub(super) init: bool,
    /// Kernel mount flags overriding the config's (`nosuid,noatime,...`: what an fstab line
    /// asks for; set by mount.fuse.tdefs).
    #[arg(long, hide = true, value_name = "OPTIONS")]
    pub(super) mount_flags: Option<String>,
    /// What the mount table shows as the source (default: the backing directory; the fstab
    /// helper passes the config file, the fstab "device").
    #[arg(long, hide = true, value_name = "SOURCE")]
    pub(super) source: Option<String>,
    /// Backing directory (overrides `backing-dir` in the config).
    pub(super) backing: Option<PathBuf>,
    /// Mountpoint (overrides `mountpoint` in the config).
    pub(super) mountpoint: Option<PathBuf>,
}


/// The control socket (`tdefs rotate-master-key`). A mount without one still works, so a
/// failure here is a warning.
fn start_control(
    mountpoint: &Path,
    backing: &Path,
    volume: Arc<Volume>,
    converter: Arc<Converter>,
    method: Method,
) -> Option<control::Server> {
    let mp = match std::fs::canonicalize(mountpoint) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "no control socket: cannot resolve the mountpoint");
            return None;
        }
    };
    let backing = backing.to_path_buf();
    let handler = move |req: control::Request| -> Result<String, String> {
        match req {
            control::Request::Status => {
                let mut st = status::collect(&backing, volume.keys(), volume.dict().as_ref(), method, true);
                if let Some(c) = converter.status() {
                    st.conversion = Some(c);
                }
                serde_json::to_string(&st).map_err(|e| e.to_string())
            }
            control::Request::Convert { action } => match action {
                control::ConvertAction::Start(j) => converter.submit(super::online::job_from_request(j, method)?),
                control::ConvertAction::Pause => converter.pause(),
                control::ConvertAction::Resume => converter.resume(),
                control::ConvertAction::Cancel => converter.cancel(),
            },
            control::Request::Ping => Ok(serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "backing": backing,
            })
            .to_string()),
            control::Request::RotateMasterKey { config } => {
                let cfg = super::load_config(&config).map_err(|e| format!("{e:#}"))?;
                if let Some(b) = &cfg.backing_dir {
                    if std::fs::canonicalize(b).ok().as_deref() != Some(backing.as_path()) {
                        return Err(format!(
                            "{} is for backing directory {}, but this mount serves {}",
                            config.display(), b.display(), backing.display()
                        ));
                    }
                }
                let to = rotate_master_key(volume.keys(), &cfg.security.encryption.master_key).map_err(|e| format!("{e:#}"))?;
                Ok(format!("the key dictionary is now wrapped by {to}"))
            }
        }
    };
    match control::serve(&mp, Arc::new(handler)) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no control socket: online master-key rotation is unavailable for this mount");
            None
        }
    }
}

fn pick(arg: Option<PathBuf>, cfg: &Option<PathBuf>, what: &str, key: &str) -> anyhow::Result<PathBuf> {
    match arg.or_else(|| cfg.clone()) {
        Some(p) => Ok(p),
        None => bail!("no {what}: give it on the command line or set `{key}` in the config"),
    }
}

/// The daemon's command line: this mount in the foreground, everything resolved.
fn foreground_args(args: &MountArgs, backing: &Path, mountpoint: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<std::ffi::OsString> = vec!["mount".into(), "--config".into(), args.config.clone().into()];
    if let Some(l) = &args.log_file {
        v.extend(["--log-file".into(), l.clone().into()]);
    }
    if args.init {
        v.push("--init".into());
    }
    if let Some(f) = &args.mount_flags {
        v.extend(["--mount-flags".into(), f.into()]);
    }
    if let Some(s) = &args.source {
        v.extend(["--source".into(), s.into()]);
    }
    v.extend([backing.into(), mountpoint.into()]);
    v
}

pub fn run(args: MountArgs) -> anyhow::Result<()> {
    let cfg = super::load_config(&args.config)?;
    super::init_logging(cfg.log_level);
    let backing = pick(args.backing.clone(), &cfg.backing_dir, "backing directory", "backing-dir")?;
    let mountpoint = pick(args.mountpoint.clone(), &cfg.mountpoint, "mountpoint", "mountpoint")?;
    if !Path::new(&mountpoint).is_dir() {
        bail!("mountpoint {} is not an existing directory", mountpoint.display());
    }
    if args.daemon {
        return daemon::spawn_and_wait(foreground_args(&args, &backing, &mountpoint));
    }
    let io_uring = mounting::want_io_uring(cfg.mount.io_uring)?;
    // (Hardened in cli::main; the helper path reaches here through `run` too.)
    super::harden_process();
    // New files get exactly the modes the kernel asks for; one descriptor per cached inode.
    unsafe { libc::umask(0) };
    crate::sys::raise_nofile_limit();
    // Bound before anything is opened or mounted: the operator asked for metrics, so a
    // taken port stops the mount.
    let metrics_endpoint = cfg.metrics_addr.map(metrics::bind).transpose()?;
    let enc = &cfg.security.encryption;
    let opts = OpenOptions { adopt: args.init, rewrite_threshold: enc.file_dictionary_rewrite_threshold };
    let meta = Metadata::open_or_init(&backing, &MasterKeys::from_config(enc), &opts)
        .with_context(|| format!("cannot open backing directory {}", backing.display()))?;
    let r = &meta.report;
    tracing::info!(
        backing = %meta.backing().display(), entries = r.entries, replayed = r.records_replayed,
        torn_tail_bytes = ?r.torn_tail_bytes, renames_completed = r.renames_completed,
        renames_dropped = r.renames_dropped, stale_dropped = r.stale_entries_dropped,
        "metadata open"
    );
    if !cfg.mount.default_permissions {
        // (allow-other is then false: the config refuses the combination.)
        tracing::warn!("default-permissions = false: the kernel does not check file modes; only the user who mounted can use the mount, with every access allowed");
    }
    let mut flags = cfg.mount.flags();
    for o in args.mount_flags.iter().flat_map(|f| f.split(',')).filter(|o| !o.is_empty()) {
        if !flags.apply(o) {
            bail!("unknown mount flag {o:?}");
        }
    }
    let fs_opts = FsOptions {
        method: enc.data_encryption_method,
        rotation: enc.data_key_rotation_period,
        ttl: cfg.mount.attr_timeout,
        noatime: flags.atime == crate::config::Atime::Noatime,
        nodiratime: !flags.diratime,
    };
    let volume = Arc::new(Volume::new(&meta, fs_opts).context("cannot open the backing root")?);
    let spec = MountSpec {
        mountpoint: mountpoint.clone(),
        source: args.source.clone().unwrap_or_else(|| meta.backing().display().to_string()),
        flags,
        allow_other: cfg.mount.allow_other,
        default_permissions: cfg.mount.default_permissions,
        threads: cfg.mount.threads,
        writeback_cache: cfg.mount.writeback_cache,
        io_uring: io_uring != crate::config::IoUring::Off,
        direct_write_invalidation: cfg.mount.direct_write_invalidation,
    };
    // Rotate a data key that expired while unmounted; drop keys no file uses any more.
    volume.rotate_data_key_if_due().context("data key rotation")?;
    volume.collect_unused_keys().context("deleting unused data keys")?;
    let maintenance = Housekeeping::start(volume.clone());
    // Continues a job an earlier mount recorded.
    let converter = Arc::new(Converter::start(volume.clone()));
    let fs = FuseAdapter::new(volume.clone(), &spec).context("cannot start the page-cache invalidation thread")?;
    let notifier = fs.notifier_slot();
    let config = fuser_config(&spec);
    let direct = if unsafe { libc::geteuid() } == 0 {
        mounting::mount_direct(&spec).with_context(|| format!("cannot mount at {}", mountpoint.display()))?
    } else {
        None
    };
    let (mut session, direct) = match direct {
        Some(fd) => {
            let s = fuser::Session::from_fd(fs, fd, config.acl, config).map_err(|e| {
                let _ = mounting::unmount(&mountpoint);
                e
            });
            (s.with_context(|| format!("cannot start serving the mount at {}", mountpoint.display()))?, true)
        }
        None => (
            fuser::Session::new(fs, &mountpoint, &config).with_context(|| format!("cannot mount at {}", mountpoint.display()))?,
            false,
        ),
    };
    if io_uring == crate::config::IoUring::On && !session.io_uring() {
        let _ = if direct { mounting::unmount(&mountpoint) } else { session.unmount() };
        bail!("io-uring = \"on\", but the kernel did not offer FUSE over io_uring at INIT; set io-uring = \"auto\" or \"off\"");
    }
    let transport = if session.io_uring() { "io_uring" } else { "/dev/fuse" };
    let _ = notifier.set(session.notifier());
    let control = start_control(&mountpoint, meta.backing(), volume.clone(), converter.clone(), enc.data_encryption_method);
    if let Some(ep) = metrics_endpoint {
        let (volume, converter, method) = (volume.clone(), converter.clone(), enc.data_encryption_method);
        ep.serve(move || gauges(&volume, &converter, method)).context("cannot start the metrics thread")?;
    }
    let mut unmounter = session.unmount_callable();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])?;
    let signal_handle = signals.handle();
    let mp = mountpoint.clone();
    let sig_thread = std::thread::Builder::new().name("tdefs-signals".into()).spawn(move || {
        if let Some(sig) = signals.forever().next() {
            tracing::info!(signal = sig, mountpoint = %mp.display(), "unmounting");
            sdnotify::stopping();
            let r = if direct { mounting::unmount(&mp) } else { unmounter.unmount() };
            if let Err(e) = r {
                tracing::error!(error = %e, "unmount failed");
            }
        }
    })?;
    let served = std::fs::canonicalize(&mountpoint).unwrap_or(mountpoint.clone());
    Owner::me(State::Serving, Some(&served)).publish(&meta.meta);
    tracing::info!(mountpoint = %mountpoint.display(), method = %enc.data_encryption_method, transport, "mounted");
    sdnotify::ready(&mountpoint);
    if daemon::is_daemon_child() {
        daemon::notify_ready(args.log_file.as_deref());
    }
    // Returns after an unmount by signal, by fusermount3 -u or by the kernel (`umount`).
    let result = session.run();
    // Unmounted: a mount of the same directory started now waits for us (see metadir::owner).
    Owner::me(State::Stopping, Some(&served)).publish(&meta.meta);
    sdnotify::stopping();
    signal_handle.close();
    let _ = sig_thread.join();
    drop(control);
    // The chunk in flight completes; the job continues at the next mount.
    converter.shutdown();
    drop(maintenance);
    if meta.dict.compaction_due() {
        meta.dict.compact().context("final dictionary compaction")?;
    }
    meta.close().context("final dictionary flush")?;
    Owner::me(State::Closed, Some(&served)).publish(&meta.meta);
    result.context("FUSE session ended with an error")?;
    tracing::info!("unmounted cleanly");
    Ok(())
}

/// The state of a running mount for the metrics endpoint: what `tdefs status` reports, less
/// the count of plaintext files (a walk over the whole backing tree, too slow for every
/// scrape).
fn gauges(volume: &crate::fs::Volume, converter: &Converter, method: crate::crypto::Method) -> metrics::Gauges {
    let keys = volume.keys();
    let (conversion_remaining_bytes, conversion_state) = converter.gauges();
    metrics::Gauges {
        method: Some(method),
        data_keys: keys.keys().len(),
        current_key_age: keys.current().map(|k| k.age(std::time::SystemTime::now())),
        files_by_method: volume.dict().with_tree(crate::metadir::status::files_by_method),
        // Every metadata file, as `tdefs status` counts it (key dictionary included).
        dictionary_bytes: volume.dict().disk_size(),
        conversion_remaining_bytes,
        conversion_state,
    }
}
