//! Build facts for `tdefs --version`: the git commit of the source tree (when built from a
//! checkout) and the versions of the crypto crates the binary links, read from Cargo.lock.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn locked_version(lock: &str, name: &str) -> String {
    let needle = format!("name = \"{name}\"\nversion = \"");
    lock.find(&needle)
        .and_then(|i| lock[i + needle.len()..].split('"').next())
        .unwrap_or("?")
        .to_string()
}

fn main() {
    let commit = match git(&["rev-parse", "--short=12", "HEAD"]) {
        Some(c) => {
            // --no-optional-locks: a plain `git status` refreshes and rewrites .git/index,
            // which this script watches, so every later cargo command would run it again
            // and rebuild the crate (70 s of CI's test stage did).
            let dirty = git(&["--no-optional-locks", "status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty { format!("{c}-modified") } else { c }
        }
        None => "unknown (not built from a git checkout)".to_string(),
    };
    println!("cargo:rustc-env=TDEFS_GIT_COMMIT={commit}");
    let lock = std::fs::read_to_string("Cargo.lock").unwrap_or_default();
    for name in ["aes", "ctr", "aes-gcm", "hkdf", "fuser"] {
        let var = format!("TDEFS_VERSION_{}", name.to_uppercase().replace('-', "_"));
        println!("cargo:rustc-env={var}={}", locked_version(&lock, name));
    }
    println!("cargo:rerun-if-changed=Cargo.lock");
    for p in [".git/HEAD", ".git/index", ".git/refs"] {
        if std::path::Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
}
