//! Operations commands against real mounts: `tdefs status` (online through the control
//! socket, offline with the key) and `tdefs dump`, human and JSON output.

mod common;

use std::fs;
use std::process::Command;

use common::*;

fn tdefs(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(TDEFS).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn status_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["status", "--json"];
    a.extend_from_slice(args);
    let (ok, out, err) = tdefs(&a);
    assert!(ok, "status {args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn status_before_init_online_and_offline() {
    let mut m = Mount::prepare("aes256-ctr");
    let cfg = m.config.to_str().unwrap().to_string();
    fs::write(m.bpath("legacy.txt"), b"old data").unwrap();
    // Not initialized: says so, counts the plaintext file, needs no key.
    let s = status_json(&["--config", &cfg]);
    assert_eq!(s["initialized"], false);
    assert_eq!(s["mounted"], false);
    assert_eq!(s["plaintext_files"], 1);
    m.start_with(&["--init"]);
    fs::write(m.path("a"), b"a").unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::write(m.path("d/b"), b"b").unwrap();
    // Online, by mountpoint and through the config's mountpoint.
    let mnt = m.mnt.to_str().unwrap().to_string();
    let s = status_json(&[&mnt]);
    assert_eq!(s["initialized"], true);
    assert_eq!(s["mounted"], true);
    assert_eq!(s["master_key"], "file");
    assert_eq!(s["data_keys"], 1);
    assert_eq!(s["files_by_method"]["aes256-ctr"], 2);
    assert_eq!(s["plaintext_files"], 1);
    assert_eq!(s["method_for_new_files"], "aes256-ctr");
    assert!(s["dictionary_bytes"].as_u64().unwrap() > 0);
    assert_eq!(status_json(&["--config", &cfg]), s);
    let (ok, human, _) = tdefs(&["status", &mnt]);
    assert!(ok);
    for want in ["initialized             yes", "mounted                 yes", "encrypted files         2", "plaintext files         1"] {
        assert!(human.contains(want), "missing {want:?} in:\n{human}");
    }
    let key_hex = fs::read_to_string(&m.key).unwrap();
    assert!(!human.contains(key_hex.trim()));
    m.stop();
    // Offline: the same picture, not mounted.
    let mut off = status_json(&["--config", &cfg]);
    assert_eq!(off["mounted"], false);
    off["mounted"] = true.into();
    off["current_key"]["age_seconds"] = s["current_key"]["age_seconds"].clone();
    off["dictionary_bytes"] = s["dictionary_bytes"].clone(); // the unmount flushed/compacted
    off["last_compaction"] = s["last_compaction"].clone();
    assert_eq!(off, s);
    // A mountpoint that is not a tdefs mount: a clear error.
    let (ok, _, err) = tdefs(&["status", "/tmp"]);
    assert!(!ok && err.contains("no running tdefs"), "{err}");
}

#[test]
fn dump_files_and_keys_human_and_json() {
    let mut m = Mount::new("sm4-ctr");
    fs::write(m.path("x"), b"x").unwrap();
    fs::create_dir(m.path("sub")).unwrap();
    fs::write(m.path("sub/y"), b"y").unwrap();
    m.stop();
    let cfg = m.config.to_str().unwrap().to_string();
    let (ok, human, _) = tdefs(&["dump", "files", "--config", &cfg]);
    assert!(ok);
    let lines: Vec<&str> = human.lines().collect();
    assert_eq!(lines.len(), 2, "{human}");
    assert!(lines[0].starts_with("/sub/y\tsm4-ctr\tkey 0x") && lines[1].starts_with("/x\tsm4-ctr\tkey 0x"), "{human}");
    let (_, prefixed, _) = tdefs(&["dump", "files", "--config", &cfg, "/sub"]);
    assert_eq!(prefixed.lines().count(), 1);
    let (_, json, _) = tdefs(&["dump", "files", "--json", "--config", &cfg]);
    for l in json.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["method"], "sm4-ctr");
        assert!(v.get("iv").is_none(), "IV shown without --show-secrets: {l}");
    }
    let (_, keys, _) = tdefs(&["dump", "keys", "--json", "--config", &cfg]);
    let k: serde_json::Value = serde_json::from_str(keys.lines().next().unwrap()).unwrap();
    assert_eq!((k["method"].as_str(), k["files"].as_u64(), k["current"].as_bool()), (Some("sm4-ctr"), Some(2), Some(true)));
    assert!(k.get("key").is_none());
    let (_, secret, err) = tdefs(&["dump", "keys", "--json", "--show-secrets", "--config", &cfg]);
    assert!(err.contains("WARNING"));
    let k: serde_json::Value = serde_json::from_str(secret.lines().next().unwrap()).unwrap();
    assert_eq!(k["key"].as_str().unwrap().len(), 32, "an SM4 key is 16 bytes");
}
