//! `mount.fuse.tdefs`: the helper mount(8) runs for `mount -t fuse.tdefs` and fstab lines.
//!
//! mount(8) calls `/sbin/mount.fuse.tdefs SOURCE MOUNTPOINT [-sfnv] [-o OPTIONS] [-t TYPE]`,
//! where SOURCE is the config file. Installed as a symlink to the tdefs binary, which
//! recognises the name (argv[0]); `tdefs mount.fuse.tdefs ...` does the same.
//!
//! `-f` is mount(8)'s "fake" flag (check everything, mount nothing), not FUSE's
//! "foreground": `mount -f` passes it on, and a helper that then mounted and never
//! returned would hang it. `-o foreground` keeps the mount in the foreground instead.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::Context;

use super::mount::{self, MountArgs};

pub const NAME: &str = "mount.fuse.tdefs";

pub const HELP: &str = "\
mount.fuse.tdefs: mount a tdefs backing directory from /etc/fstab or `mount -t fuse.tdefs`.

Usage: mount.fuse.tdefs CONFIG MOUNTPOINT [-sfnv] [-o OPTIONS]
       tdefs mount.fuse.tdefs CONFIG MOUNTPOINT [-sfnv] [-o OPTIONS]

CONFIG is the tdefs config file (the fstab \"device\"). The mount returns once the
filesystem is ready; the daemon keeps serving it until `umount MOUNTPOINT`.

tdefs options (-o, comma-separated):
  backing=DIR   backing directory (default: backing-dir in CONFIG)
  log=FILE      append the daemon's log to FILE (default: the journal when run by
                systemd, else discarded; log-level in CONFIG sets the level)
  init          adopt a backing directory that holds files but no tdefs metadata
  foreground    do not detach (for debugging)
Kernel flags, applied to the mount as on any filesystem (they override [mount] in
CONFIG; tdefs' defaults are nosuid,nodev,exec,relatime):
  suid nosuid dev nodev exec noexec atime noatime relatime norelatime strictatime
  nostrictatime diratime nodiratime lazytime nolazytime sync async dirsync
Ignored (mount(8) and systemd act on them): defaults rw auto noauto user users nouser
  owner group _netdev nofail silent loud x-* comment=*
Refused: ro (tdefs writes its metadata while mounted). Anything else is an error.
Flags: -f fake mount (check CONFIG and options, mount nothing), -s -n -v ignored.

Install (once):
  ln -s /usr/local/bin/tdefs /sbin/mount.fuse.tdefs
  ln -s /usr/local/bin/tdefs /sbin/umount.fuse   # optional: `umount` then waits until the
                                                 # daemon has flushed and exited (umount(8)
                                                 # runs umount.fuse for every FUSE type; tdefs
                                                 # unmounts the others as umount would)

Examples:
  mount -t fuse.tdefs /etc/tdefs/tdefs.toml /srv/db
  mount -t fuse.tdefs /etc/tdefs/tdefs.toml /srv/db -o backing=/srv/backing,log=/var/log/tdefs.log
  # /etc/fstab:
  /etc/tdefs/tdefs.toml  /srv/db  fuse.tdefs  defaults,_netdev,nofail  0 0
";

/// What the helper was asked to do.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub config: PathBuf,
    pub mountpoint: PathBuf,
    pub backing: Option<PathBuf>,
    pub log: Option<PathBuf>,
    pub init: bool,
    pub foreground: bool,
    pub fake: bool,
    /// Kernel flags asked for (nosuid, noatime, ...), in order.
    pub flags: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HelperError {
    #[error("usage: {NAME} CONFIG MOUNTPOINT [-sfnv] [-o OPTIONS] ({0}); see `{NAME} --help`")]
    Usage(String),
    #[error("unknown mount option {0:?}; tdefs takes backing=DIR, log=FILE, init, foreground and the generic \
             options (defaults, rw, _netdev, nofail, ...); other settings belong in the config file")]
    UnknownOption(String),
    #[error("mount option {0}= needs a value, e.g. {0}=/path")]
    MissingValue(&'static str),
    #[error("mount option ro is not supported: tdefs writes its metadata (dictionary, key rotation) while \
             mounted; remove ro (make the database read-only instead)")]
    ReadOnly,
}

/// Generic mount options with no meaning for tdefs: mount(8) and systemd act on them.
const IGNORED: &[&str] =
    &["defaults", "rw", "auto", "noauto", "user", "users", "nouser", "owner", "group", "_netdev", "nofail", "silent", "loud"];

fn apply_options(req: &mut Request, opts: &str) -> Result<(), HelperError> {
    for opt in opts.split(',').filter(|o| !o.is_empty()) {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt, None),
        };
        let path = |name: &'static str| match value {
            Some(v) if !v.is_empty() => Ok(PathBuf::from(v)),
            _ => Err(HelperError::MissingValue(name)),
        };
        match key {
            "backing" => req.backing = Some(path("backing")?),
            "log" => req.log = Some(path("log")?),
            "init" if value.is_none() => req.init = true,
            "foreground" if value.is_none() => req.foreground = true,
            "ro" => return Err(HelperError::ReadOnly),
            "comment" => {}
            k if k.starts_with("x-") || k.starts_with("X-") => {}
            k if value.is_none() && IGNORED.contains(&k) => {}
            k if value.is_none() && crate::config::MountFlags::default().apply(k) => req.flags.push(k.to_string()),
            _ => return Err(HelperError::UnknownOption(opt.to_string())),
        }
    }
    Ok(())
}

/// Parse the helper's arguments (after argv[0]).
pub fn parse(args: &[OsString]) -> Result<Request, HelperError> {
    let mut req = Request::default();
    let mut positional = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "-o" || s == "-t" || s == "-N" {
            let v = it.next().ok_or_else(|| HelperError::Usage(format!("{s} needs a value")))?;
            if s == "-o" {
                apply_options(&mut req, &v.to_string_lossy())?;
            } // -t fuse.tdefs (the type) and -N (a mount namespace) need nothing from us
        } else if let Some(o) = s.strip_prefix("-o") {
            apply_options(&mut req, o)?;
        } else if s.starts_with('-') && s.len() > 1 {
            for c in s[1..].chars() {
                match c {
                    'f' => req.fake = true,
                    's' | 'n' | 'v' => {} // sloppy, no mtab, verbose: nothing to do
                    _ => return Err(HelperError::Usage(format!("unknown flag -{c}"))),
                }
            }
        } else {
            positional.push(PathBuf::from(a));
        }
    }
    match <[PathBuf; 2]>::try_from(positional) {
        Ok([config, mountpoint]) => {
            req.config = config;
            req.mountpoint = mountpoint;
            Ok(req)
        }
        Err(p) => Err(HelperError::Usage(format!("expected CONFIG and MOUNTPOINT, got {} arguments", p.len()))),
    }
}

pub fn wants_help(args: &[OsString]) -> bool {
    args.iter().any(|a| a == "-h" || a == "--help")
}

pub fn run(args: &[OsString]) -> anyhow::Result<()> {
    if wants_help(args) {
        print!("{HELP}");
        return Ok(());
    }
    let req = parse(args)?;
    // The config decides the backing directory when the options do not: resolve it here so
    // that the daemon gets explicit paths.
    let cfg = super::load_config(&req.config)?;
    let backing = req.backing.clone().or(cfg.backing_dir.clone()).with_context(|| {
        format!("no backing directory: add backing=DIR to the mount options or set backing-dir in {}", req.config.display())
    })?;
    if req.fake {
        eprintln!(
            "tdefs: fake mount (-f): would mount {} at {} with {}",
            backing.display(), req.mountpoint.display(), req.config.display()
        );
        return Ok(());
    }
    let source = std::fs::canonicalize(&req.config).unwrap_or(req.config.clone()).display().to_string();
    mount::run(MountArgs {
        config: req.config,
        daemon: !req.foreground,
        log_file: req.log,
        init: req.init,
        mount_flags: (!req.flags.is_empty()).then(|| req.flags.join(",")),
        // The fstab "device" is the config file: show it as the mount's source, so the mount
        // table matches the fstab line (findmnt, systemd, umount).
        source: Some(source),
        backing: Some(backing),
        mountpoint: Some(req.mountpoint),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Request, HelperError> {
        parse(&args.iter().map(OsString::from).collect::<Vec<_>>())
    }

    #[test]
    fn mount8_argument_shapes() {
        let r = p(&["/etc/tdefs/tdefs.toml", "/srv/db", "-o", "rw,backing=/srv/b,log=/var/log/t.log,init"]).unwrap();
        assert_eq!(
            r,
            Request {
                config: "/etc/tdefs/tdefs.toml".into(),
                mountpoint: "/srv/db".into(),
                backing: Some("/srv/b".into()),
                log: Some("/var/log/t.log".into()),
                init: true,
                ..Default::default()
            }
        );
        // fstab: generic options ignored; flags and -t anywhere.
        let r = p(&["c.toml", "/mnt", "-sn", "-v", "-o", "defaults,_netdev,nofail,noatime,x-systemd.requires=a,comment=b", "-t", "fuse.tdefs"])
            .unwrap();
        assert_eq!((r.backing, r.init, r.fake, r.foreground), (None, false, false, false));
        assert_eq!(r.flags, vec!["noatime".to_string()], "kernel flags are kept, in order");
        let r = p(&["c", "/m", "-o", "nosuid,nodev,noexec,strictatime,nodiratime,sync,dirsync,lazytime"]).unwrap();
        assert_eq!(r.flags.join(","), "nosuid,nodev,noexec,strictatime,nodiratime,sync,dirsync,lazytime");
        assert!(p(&["c", "/m", "-f"]).unwrap().fake);
        assert!(p(&["-oforeground", "c", "/m"]).unwrap().foreground);
    }

    #[test]
    fn bad_input_is_explained() {
        assert_eq!(p(&["c", "/m", "-o", "rw,bogus"]), Err(HelperError::UnknownOption("bogus".into())));
        assert_eq!(p(&["c", "/m", "-o", "init=1"]), Err(HelperError::UnknownOption("init=1".into())));
        assert_eq!(p(&["c", "/m", "-o", "backing="]), Err(HelperError::MissingValue("backing")));
        assert_eq!(p(&["c", "/m", "-o", "ro"]), Err(HelperError::ReadOnly));
        assert!(matches!(p(&["c"]), Err(HelperError::Usage(_))));
        assert!(matches!(p(&["c", "/m", "-o"]), Err(HelperError::Usage(_))));
        assert!(matches!(p(&["c", "/m", "-x"]), Err(HelperError::Usage(_))));
        let e = HelperError::UnknownOption("allow_other".into()).to_string();
        assert!(e.contains("backing=DIR") && e.contains("config file"), "{e}");
    }
}
