//! No way in for other users (issue 14): tdefs runs as root over a backing directory that
//! a database user may own, next to sockets and logs other users can reach.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;

fn chown_r(p: &Path, uid: u32) {
    let st = Command::new("chown").arg("-R").arg(format!("{uid}:{uid}")).arg(p).status().unwrap();
    assert!(st.success());
}

/// The owner of the backing root (a database user after `--init` of its data directory)
/// replaces `.tdefs` with a directory of links into the rest of the system. Root must not
/// follow them: the mount is refused, naming the directory, and nothing is written.
#[test]
fn a_metadata_directory_planted_by_another_user_is_refused() {
    let mut m = Mount::new("aes256-ctr");
    fs::write(m.path("f"), b"data").unwrap();
    m.stop();
    let victim = m.dir.path().join("victim");
    fs::write(&victim, b"must survive").unwrap();
    chown_r(&m.backing, NOBODY);
    // What the database user can do in a directory it owns.
    let planted = m.bpath(".tdefs");
    fs::rename(&planted, m.bpath(".tdefs-real")).unwrap();
    fs::create_dir(&planted).unwrap();
    for name in ["keys", "keys.tmp", "files.snap", "files.snap.tmp", "files.log.0000000000000001", "files.log.0000000000000002"] {
        std::os::unix::fs::symlink(&victim, planted.join(name)).unwrap();
    }
    chown_r(&planted, NOBODY);
    let out = m.mount_fails(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(".tdefs belongs to user 65534") && err.contains("chown"), "{err}");
    assert_eq!(fs::read(&victim).unwrap(), b"must survive");
    let (code, text) = m.check(&[]);
    assert_eq!(code, 2, "{text}");
    // A link in place of the directory itself.
    fs::remove_dir_all(&planted).unwrap();
    std::os::unix::fs::symlink(m.bpath(".tdefs-real"), &planted).unwrap();
    let err = String::from_utf8_lossy(&m.mount_fails(&[]).stderr).into_owned();
    assert!(err.contains("is not a directory (a symlink"), "{err}");
    // Its own directory back, but writable by others: refused too.
    fs::remove_file(&planted).unwrap();
    fs::rename(m.bpath(".tdefs-real"), &planted).unwrap();
    chown_r(&planted, 0);
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o770)).unwrap();
    let err = String::from_utf8_lossy(&m.mount_fails(&[]).stderr).into_owned();
    assert!(err.contains("writable by group or others") && err.contains("chmod 700"), "{err}");
    fs::set_permissions(&planted, fs::Permissions::from_mode(0o700)).unwrap();
    // A backing root owned by the database user is fine (PostgreSQL needs its data
    // directory to be its own); writable by everyone without the sticky bit it is not.
    m.start();
    assert_eq!(fs::read(m.path("f")).unwrap(), b"data");
    m.stop();
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o777)).unwrap();
    let err = String::from_utf8_lossy(&m.mount_fails(&[]).stderr).into_owned();
    assert!(err.contains("without the sticky bit"), "{err}");
    fs::set_permissions(&m.backing, fs::Permissions::from_mode(0o1777)).unwrap();
    m.start();
    m.stop();
}

/// The daemon sets umask 0 (FUSE passes exact modes); its log file must still be private,
/// and a link at the log's path must not be followed.
#[test]
fn the_daemon_log_is_private_and_no_link_is_followed() {
    let m = Mount::prepare("aes256-ctr");
    let log = m.dir.path().join("daemon.log");
    let out = Command::new(TDEFS)
        .args(["mount", "--config"])
        .arg(&m.config)
        .args(["--daemon", "--log-file"])
        .arg(&log)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(is_mounted(&m.mnt));
    assert_eq!(fs::metadata(&log).unwrap().mode() & 0o777, 0o600);
    let st = Command::new("fusermount3").arg("-u").arg(&m.mnt).status().unwrap();
    assert!(st.success());
    let t = Instant::now();
    while Command::new("pgrep").args(["-f", &m.config.display().to_string()]).stdout(Stdio::null()).status().unwrap().success() {
        assert!(t.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(50));
    }
    let target = m.dir.path().join("not-a-log");
    fs::write(&target, b"precious").unwrap();
    let link = m.dir.path().join("link.log");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let out = Command::new(TDEFS)
        .args(["mount", "--config"])
        .arg(&m.config)
        .args(["--daemon", "--log-file"])
        .arg(&link)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let _ = Command::new("fusermount3").arg("-u").arg(&m.mnt).status();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fs::read(&target).unwrap(), b"precious", "the log went through the link");
}

/// `tdefs rotate-master-key` trusts only a daemon run by root or by its own user: another
/// user who got a socket into one of the places the client looks (`$XDG_RUNTIME_DIR/tdefs`,
/// `/tmp/tdefs-UID`) cannot
/// make it report "rotated" (on which the operator destroys the old master key).
#[test]
fn the_control_client_refuses_an_impostor() {
    let d = tempfile::tempdir().unwrap();
    fs::set_permissions(d.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let mnt = d.path().join("mnt");
    fs::create_dir(&mnt).unwrap();
    let mnt = fs::canonicalize(&mnt).unwrap();
    let name = {
        use std::os::unix::ffi::OsStrExt;
        format!("mount-{:08x}.sock", crc32fast_hash(mnt.as_os_str().as_bytes()))
    };
    // One of the places the client looks: $XDG_RUNTIME_DIR/tdefs, here made by the other
    // user (as /tmp/tdefs-UID could be).
    let xdg = d.path().join("xdg");
    let tmpdir = xdg.join("tdefs");
    fs::create_dir_all(&tmpdir).unwrap();
    chown_r(&xdg, NOBODY);
    let sock = tmpdir.join(&name);
    let script = format!(
        "import socket,os\ns=socket.socket(socket.AF_UNIX)\ns.bind({sock:?})\ns.listen(1)\nc,_=s.accept()\nc.recv(4096)\n\
         c.sendall(b'{{\"ok\":true,\"message\":\"the key dictionary is now wrapped by nothing\",\"mountpoint\":{mnt:?}}}\\n')\n"
    );
    let mut server = unsafe {
        Command::new("python3")
            .arg("-c")
            .arg(&script)
            .stderr(Stdio::null())
            .pre_exec(|| {
                libc::setgid(NOBODY);
                libc::setuid(NOBODY);
                Ok(())
            })
            .spawn()
            .unwrap()
    };
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(10), "the impostor did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let key = d.path().join("k");
    assert!(Command::new(TDEFS).arg("genkey").arg(&key).output().unwrap().status.success());
    let cfg = d.path().join("new.toml");
    fs::write(&cfg, format!("[security.encryption.master-key]\ntype = \"file\"\npath = {key:?}\n")).unwrap();
    let out = Command::new(TDEFS).env("XDG_RUNTIME_DIR", &xdg).args(["rotate-master-key", "--config"]).arg(&cfg).arg(&mnt).output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("served by user 65534") && text.contains("not trusting it"), "{text}");
}

/// The same hash as the control socket's name (crc32 of the mountpoint).
fn crc32fast_hash(b: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &byte in b {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Every command that holds keys is non-dumpable (no core dump, no ptrace or
/// /proc/PID/mem by other users) and has a core limit of 0, not only `mount`. Each is
/// stopped right after hardening (TDEFS_FAULT=stop:hardened) and inspected: /proc/PID
/// belongs to root for a non-dumpable process run by another user.
#[test]
fn every_key_holding_command_is_hardened() {
    let mut m = Mount::new("aes256-ctr");
    fs::write(m.path("f"), b"x").unwrap();
    m.stop();
    // The commands run as nobody, with a config and key nobody can read.
    chown_r(m.dir.path(), NOBODY);
    let cfg = m.config.to_str().unwrap().to_string();
    let backing = m.backing.to_str().unwrap().to_string();
    let out_dir = m.dir.path().join("export").to_str().unwrap().to_string();
    let commands: Vec<Vec<String>> = vec![
        vec!["check".into(), "--config".into(), cfg.clone()],
        vec!["dump".into(), "--config".into(), cfg.clone(), "keys".into()],
        vec!["status".into(), "--config".into(), cfg.clone()],
        vec!["encrypt".into(), "--config".into(), cfg.clone(), backing.clone()],
        vec!["decrypt".into(), "--config".into(), cfg.clone(), "--to".into(), out_dir, backing.clone()],
        vec!["adopt".into(), "--config".into(), cfg.clone(), "f".into()],
        vec!["rotate-master-key".into(), "--config".into(), cfg.clone(), m.mnt.to_str().unwrap().into()],
    ];
    for args in commands {
        let mut child = unsafe {
            Command::new(TDEFS)
                .args(&args)
                .env("TDEFS_FAULT", "stop:hardened")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .pre_exec(|| {
                    libc::setgid(NOBODY);
                    libc::setuid(NOBODY);
                    Ok(())
                })
                .spawn()
                .unwrap()
        };
        let pid = child.id();
        let t = Instant::now();
        loop {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.split(") ").nth(1).is_some_and(|s| s.starts_with('T')) {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "{args:?} never stopped at the hardening point");
            std::thread::sleep(Duration::from_millis(10));
        }
        let owner = fs::metadata(format!("/proc/{pid}/environ")).unwrap().uid();
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let _ = child.wait();
        assert_eq!(owner, 0, "{args:?}: /proc/PID is not root's, so the process is dumpable");
        let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
        assert!(core.split_whitespace().nth(4) == Some("0"), "{args:?}: {core}");
    }
}

/// `tdefs decrypt --to DIR` runs as root into a directory others may reach: a link planted
/// where it writes its temporary file is removed, never written through.
#[test]
fn decrypt_never_writes_through_a_planted_link() {
    let mut m = Mount::new("aes256-ctr");
    fs::write(m.path("f"), b"exported plaintext").unwrap();
    m.stop();
    let export = m.dir.path().join("export");
    fs::create_dir(&export).unwrap();
    let victim = m.dir.path().join("victim");
    fs::write(&victim, b"must survive").unwrap();
    std::os::unix::fs::symlink(&victim, export.join(".f.tdefs-partial")).unwrap();
    let out = Command::new(TDEFS).args(["decrypt", "--config"]).arg(&m.config).arg("--to").arg(&export).arg(&m.backing).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fs::read(&victim).unwrap(), b"must survive");
    assert_eq!(fs::read(export.join("f")).unwrap(), b"exported plaintext");
    assert!(fs::symlink_metadata(export.join(".f.tdefs-partial")).is_err());
}
