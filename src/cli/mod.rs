//! Command line: `tdefs mount`, `tdefs check`, `tdefs dump`, `tdefs rotate-master-key`, `tdefs status`,
//! `tdefs encrypt`, `tdefs decrypt`, `tdefs convert` (online), `tdefs genkey`, and `mount.fuse.tdefs` (the mount(8) helper: the
//! same binary under that name).

mod adopt;
mod assets;
mod check;
mod convert;
mod daemon;
mod dump;
mod helper;
mod mount;
mod online;
mod rotate;
mod sdnotify;
mod status;
mod umount;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{Config, ConfigError, LogLevel};

#[derive(Parser)]
#[command(
    name = "tdefs",
    version,
    about = "Transparent data encryption at rest for unmodified databases (a FUSE filesystem)",
    long_about = "tdefs mounts a backing directory that holds ciphertext and shows its plaintext at a \
mountpoint. Point the database at the mountpoint; every byte that reaches the backing disk is \
encrypted (AES or SM4, in XTS or CTR mode, same length and offset), while names, sizes and layout stay as \
they are.",
    after_help = "Examples:\n  tdefs genkey /run/keys/tdefs.key\n  tdefs mount --config /etc/tdefs/tdefs.toml\n  \
tdefs mount --config tdefs.toml /var/lib/tdefs/backing /var/lib/postgresql/15/main\n  \
mount -t fuse.tdefs /etc/tdefs/tdefs.toml /srv/db   # after: ln -s /usr/local/bin/tdefs /sbin/mount.fuse.tdefs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    Mount(mount::MountArgs),
    Check(check::CheckArgs),
    Dump(dump::DumpArgs),
    RotateMasterKey(rotate::RotateArgs),
    Status(status::StatusArgs),
    Encrypt(convert::EncryptArgs),
    Decrypt(convert::DecryptArgs),
    Convert(online::ConvertArgs),
    Adopt(adopt::AdoptArgs),
    Umount(umount::UmountArgs),
    /// Write a new random 256-bit master key (64 hex characters + newline, mode 0600).
    #[command(after_help = "Example:\n  tdefs genkey /run/keys/tdefs.key   # keep it on tmpfs or in a secrets manager")]
    Genkey {
        /// Where to write the key; an existing file is never overwritten.
        path: PathBuf,
    },
    /// The mount(8) helper for `mount -t fuse.tdefs` and /etc/fstab (see its --help).
    #[command(
        name = "mount.fuse.tdefs",
        hide = true,
        disable_help_flag = true,
        after_help = "Examples:\n  tdefs mount.fuse.tdefs --help\n  tdefs mount.fuse.tdefs /etc/tdefs/tdefs.toml /srv/db -o backing=/srv/backing"
    )]
    MountHelper {
        /// CONFIG MOUNTPOINT [-sfnv] [-o OPTIONS], as mount(8) passes them.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
    /// Write the man pages and shell completions (for packagers: scripts/package.sh).
    #[command(hide = true)]
    GenerateAssets(assets::AssetsArgs),
}

/// Logs go to stderr; RUST_LOG filters them (default: `level` for tdefs, warnings elsewhere).
/// fuser's own noise is filtered: it warns when its unmount finds the mount already gone,
/// and it logs an error whenever the kernel drops its (ENOSYS) answer to a FUSE_INTERRUPT
/// for a request already answered, which databases that signal their workers cause often.
/// A second call (the mount, once its config is read) is a no-op.
pub(crate) fn init_logging(level: LogLevel) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(format!("warn,fuser=error,fuser::reply=off,tdefs={}", level.as_str()))
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}

/// Process hygiene for every command that holds keys: no core dumps, no ptrace or
/// /proc/PID/mem by other users (PR_SET_DUMPABLE=0 also makes /proc/PID/* root-owned).
pub(crate) fn harden_process() {
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        libc::setrlimit(libc::RLIMIT_CORE, &zero);
    }
    // Crash tests stop the process here to inspect it (TDEFS_FAULT=stop:hardened).
    crate::hooks::crash("hardened");
}

pub fn main() -> ExitCode {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name() == Some(helper::NAME.as_ref()) {
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        return report(helper::run(&args));
    }
    if umount::HELPER_NAMES.iter().any(|n| std::path::Path::new(&argv0).file_name() == Some(n.as_ref())) {
        init_logging(LogLevel::default());
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        return report(umount::run_helper(&args));
    }
    let matches = Cli::command().long_version(long_version()).get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // The mount sets up logging once it has read its config (log-level).
    if !matches!(cli.cmd, Command::Mount(_) | Command::MountHelper { .. }) {
        init_logging(LogLevel::default());
    }
    // Every command that may hold key material; `genkey` too (it writes one).
    if !matches!(cli.cmd, Command::MountHelper { .. }) {
        harden_process();
    }
    let r = match cli.cmd {
        Command::Check(args) => return check::run(args),
        Command::Encrypt(args) => return convert::run_encrypt(args),
        Command::Decrypt(args) => return convert::run_decrypt(args),
        Command::Convert(args) => {
            return online::run(args).unwrap_or_else(|e| {
                eprintln!("tdefs: error: {e:#}");
                ExitCode::from(2)
            })
        }
        Command::Mount(args) => mount::run(args),
        Command::MountHelper { args } => helper::run(&args),
        Command::Dump(args) => dump::run(args),
        Command::Adopt(args) => adopt::run(args),
        Command::Umount(args) => umount::run(args),
        Command::RotateMasterKey(args) => rotate::run(args),
        Command::Status(args) => status::run(args),
        Command::GenerateAssets(args) => assets::run(args),
        Command::Genkey { path } => crate::keys::generate_key_file(&path)
            .map(|()| eprintln!("wrote a new master key to {} (mode 0600)", path.display()))
            .map_err(anyhow::Error::from),
    };
    report(r)
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tdefs: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Load a config file and apply its process-wide settings: how long opening a backing
/// directory waits for a daemon that is still unmounting it (`[mount] unmount-wait`).
fn load_config(path: &Path) -> Result<Config, ConfigError> {
    let cfg = Config::load(path)?;
    crate::metadir::set_unmount_wait(cfg.mount.unmount_wait);
    Ok(cfg)
}

/// `tdefs --version`: the version, the commit it was built from, the FUSE crate, and the
/// crypto implementations with the code path this CPU runs (`-V` prints the version only).
fn long_version() -> &'static str {
    let mut v = format!(
        "{}\ncommit: {}\nfuse: fuser {}",
        env!("CARGO_PKG_VERSION"),
        env!("TDEFS_GIT_COMMIT"),
        env!("TDEFS_VERSION_FUSER")
    );
    for line in crate::crypto::backends() {
        v.push_str("\ncrypto: ");
        v.push_str(&line);
    }
    // Printed once by a process that then exits: leaking it is what clap's &'static wants.
    Box::leak(v.into_boxed_str())
}
