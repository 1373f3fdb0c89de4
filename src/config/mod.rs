//! Configuration: a TOML file whose `[security.encryption]` section reads like TiKV's.
//!
//! Parsing is strict (unknown keys are errors) because a typo in an encryption setting must
//! not silently fall back to a default.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::crypto::Method;

/// Where a config is read from when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/tdefs/tdefs.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Directory holding the ciphertext (and the `.tdefs` metadata directory).
    pub backing_dir: Option<PathBuf>,
    /// Where the plaintext view is mounted.
    pub mountpoint: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. "127.0.0.1:9184"); absent: none.
    #[serde(default, deserialize_with = "de_metrics_addr")]
    pub metrics_addr: Option<SocketAddr>,
    /// Log level of tdefs' own messages; RUST_LOG, when set, overrides it.
    #[serde(default)]
    pub log_level: LogLevel,
    #[serde(default)]
    pub mount: MountConfig,
    pub security: Security,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MountConfig {
    /// Let users other than the one who mounted use the mount (the `postgres` or `mysql`
    /// user with a mount started by root). Needs root or `user_allow_other` in fuse.conf.
    #[serde(default = "yes")]
    pub allow_other: bool,
    /// The kernel checks permissions against the files' modes (as on ext4).
    #[serde(default = "yes")]
    pub default_permissions: bool,
    /// Threads serving FUSE requests; 0 picks one per CPU (at least 2).
    #[serde(default)]
    pub threads: usize,
    /// Let the kernel cache writes and send them in large batches.
    #[serde(default = "yes")]
    pub writeback_cache: bool,
    /// FUSE over io_uring (Linux 6.14+ with the fuse module's `enable_uring` parameter):
    /// `auto` (default) uses it where the kernel offers it, `on` refuses to mount without
    /// it, `off` keeps requests on `/dev/fuse`. The environment variable `TDEFS_IO_URING`
    /// overrides this (the test suite runs once per transport).
    #[serde(default)]
    pub io_uring: IoUring,
    /// After an O_DIRECT write to a file that also had page-cache reads, drop the written
    /// range from the kernel's page cache before answering the write. Kernels without
    /// "fuse: invalidate the page cache after direct write" (4c4c472d25f5) otherwise let a
    /// buffered read racing an AIO O_DIRECT write cache the old bytes for good. Set to
    /// false only on kernels that have that fix.
    #[serde(default = "yes")]
    pub direct_write_invalidation: bool,
    /// How long the kernel may cache attributes and names.
    #[serde(default = "one_second", deserialize_with = "de_duration")]
    pub attr_timeout: Duration,
    /// How long a mount (or check, status, ...) waits for a tdefs that was just unmounted
    /// from the same backing directory and is still flushing its dictionary.
    #[serde(default = "thirty_seconds", deserialize_with = "de_duration")]
    pub unmount_wait: Duration,
    /// Honour set-user-id and set-group-id bits (`suid`); false (default): `nosuid`.
    #[serde(default)]
    pub suid: bool,
    /// Honour device nodes (`dev`); false (default): `nodev`.
    #[serde(default)]
    pub dev: bool,
    /// Allow executing programs (`exec`, default); false: `noexec`.
    #[serde(default = "yes")]
    pub exec: bool,
    /// Access times: `relatime` (default), `noatime` or `strictatime`.
    #[serde(default)]
    pub atime: Atime,
    /// Access times of directories too (`diratime`, default); false: `nodiratime`.
    #[serde(default = "yes")]
    pub diratime: bool,
    /// Keep timestamp updates in memory longer (`lazytime`).
    #[serde(default)]
    pub lazytime: bool,
    /// Every write synchronous (`sync`).
    #[serde(default)]
    pub sync: bool,
    /// Directory changes synchronous (`dirsync`).
    #[serde(default)]
    pub dirsync: bool,
}

impl MountConfig {
    /// The kernel mount flags the config asks for (fstab options override them for
    /// `mount -t fuse.tdefs`).
    pub fn flags(&self) -> MountFlags {
        MountFlags {
            suid: self.suid,
            dev: self.dev,
            exec: self.exec,
            atime: self.atime,
            diratime: self.diratime,
            lazytime: self.lazytime,
            sync: self.sync,
            dirsync: self.dirsync,
        }
    }
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            allow_other: true,
            default_permissions: true,
            threads: 0,
            writeback_cache: true,
            io_uring: IoUring::Auto,
            direct_write_invalidation: true,
            attr_timeout: one_second(),
            unmount_wait: thirty_seconds(),
            suid: false,
            dev: false,
            exec: true,
            atime: Atime::Relatime,
            diratime: true,
            lazytime: false,
            sync: false,
            dirsync: false,
        }
    }
}

/// The kernel's per-mount flags, as any filesystem has them. Defaults suit a database data
/// directory: no set-id programs and no device nodes honoured (`nosuid`, `nodev`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MountFlags {
    pub suid: bool,
    pub dev: bool,
    pub exec: bool,
    pub atime: Atime,
    pub diratime: bool,
    pub lazytime: bool,
    pub sync: bool,
    pub dirsync: bool,
}

impl Default for MountFlags {
    fn default() -> Self {
        MountFlags { suid: false, dev: false, exec: true, atime: Atime::Relatime, diratime: true, lazytime: false, sync: false, dirsync: false }
    }
}

/// `[mount] io-uring`: which FUSE transport serves requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoUring {
    #[default]
    Auto,
    On,
    Off,
}

/// The same names as in the config file (for `TDEFS_IO_URING`).
impl std::str::FromStr for IoUring {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        use serde::de::IntoDeserializer;
        IoUring::deserialize(s.into_deserializer()).map_err(|e: serde::de::value::Error| e.to_string())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Atime {
    #[default]
    Relatime,
    Noatime,
    Strictatime,
}

impl MountFlags {
    /// Apply one fstab-style option (`nosuid`, `noatime`, ...); false if it is not a flag.
    pub fn apply(&mut self, opt: &str) -> bool {
        match opt {
            "suid" => self.suid = true,
            "nosuid" => self.suid = false,
            "dev" => self.dev = true,
            "nodev" => self.dev = false,
            "exec" => self.exec = true,
            "noexec" => self.exec = false,
            "atime" | "norelatime" | "nostrictatime" | "relatime" => {
                // atime: the kernel's default is relatime unless strictatime is asked for.
                self.atime = if opt == "norelatime" { Atime::Strictatime } else { Atime::Relatime }
            }
            "noatime" => self.atime = Atime::Noatime,
            "strictatime" => self.atime = Atime::Strictatime,
            "diratime" => self.diratime = true,
            "nodiratime" => self.diratime = false,
            "lazytime" => self.lazytime = true,
            "nolazytime" => self.lazytime = false,
            "sync" => self.sync = true,
            "async" => self.sync = false,
            "dirsync" => self.dirsync = true,
            _ => return false,
        }
        true
    }

    /// The flags as fstab options, e.g. "nosuid,nodev,relatime".
    pub fn to_options(&self) -> String {
        let mut v = vec![
            if self.suid { "suid" } else { "nosuid" },
            if self.dev { "dev" } else { "nodev" },
            if self.exec { "exec" } else { "noexec" },
            match self.atime {
                Atime::Relatime => "relatime",
                Atime::Noatime => "noatime",
                Atime::Strictatime => "strictatime",
            },
        ];
        if !self.diratime {
            v.push("nodiratime");
        }
        if self.lazytime {
            v.push("lazytime");
        }
        if self.sync {
            v.push("sync");
        }
        if self.dirsync {
            v.push("dirsync");
        }
        v.join(",")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Security {
    pub encryption: Encryption,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Encryption {
    /// Method for files created from now on. Existing files keep theirs.
    #[serde(default = "default_method", deserialize_with = "de_method")]
    pub data_encryption_method: Method,
    /// A new data key is made when the current one is older than this.
    #[serde(default = "default_rotation", deserialize_with = "de_duration")]
    pub data_key_rotation_period: Duration,
    /// Accepted for TiKV compatibility; the dictionary log is always on (it is what keeps
    /// per-operation cost independent of the number of files).
    #[serde(default = "yes")]
    pub enable_file_dictionary_log: bool,
    /// Log records after which the file dictionary is compacted into a new snapshot.
    #[serde(default = "default_rewrite_threshold")]
    pub file_dictionary_rewrite_threshold: u64,
    pub master_key: MasterKeyConfig,
    pub previous_master_key: Option<MasterKeyConfig>,
}

/// Where the master key comes from.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum MasterKeyConfig {
    /// A file holding the key as 64 hex characters and a newline, mode 0600 or stricter.
    File { path: PathBuf },
    /// An AWS KMS key (or a KMS-compatible service at `endpoint`). Credentials come from the
    /// standard AWS chain: environment, profile, instance role.
    #[serde(rename_all = "kebab-case")]
    Kms {
        key_id: String,
        region: String,
        endpoint: Option<String>,
        /// Accepted for TiKV compatibility; only "aws".
        #[serde(default = "aws")]
        vendor: String,
    },
    /// A HashiCorp Vault or OpenBao Transit key.
    Vault(VaultConfig),
    /// A symmetric AES-256 key on a KMIP 1.x server.
    Kmip(KmipConfig),
    /// No master key: metadata keys are stored unwrapped. For tests only.
    Plaintext,
}

/// `type = "vault"`: the dictionary key is a Transit data key of `key-name`.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VaultConfig {
    /// `https://vault.example.com:8200`
    pub address: String,
    pub key_name: String,
    /// Where the Transit engine is mounted.
    #[serde(default = "transit")]
    pub mount: String,
    /// Vault Enterprise / OpenBao namespace, sent as X-Vault-Namespace.
    pub namespace: Option<String>,
    /// A file holding the token; else AppRole (`role-id` + `secret-id-file`); else the
    /// daemon's VAULT_TOKEN or BAO_TOKEN.
    pub token_file: Option<PathBuf>,
    pub role_id: Option<String>,
    pub secret_id_file: Option<PathBuf>,
    /// CA certificates (PEM) to trust for Vault's TLS certificate instead of the public roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for TLS client authentication.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
}

impl VaultConfig {
    /// "transit/tdefs": the mount and key, as Vault's paths name them.
    pub fn key_path(&self) -> String {
        format!("{}/{}", self.mount, self.key_name)
    }
}

/// `type = "kmip"`: a symmetric AES-256 key on a KMIP server, used with Encrypt and
/// Decrypt (the key never leaves the server).
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct KmipConfig {
    /// `host:port` (5696 is KMIP's port).
    pub endpoint: String,
    /// The key's Unique Identifier; or `key-name`, its Name attribute (located at mount).
    pub key_id: Option<String>,
    pub key_name: Option<String>,
    /// Client certificate and key (PEM): KMIP servers authenticate clients by TLS.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// CA certificates (PEM) that sign the server's certificate.
    pub ca_file: PathBuf,
    /// Name to check the server's certificate against; default: the endpoint's host.
    pub server_name: Option<String>,
}

impl KmipConfig {
    /// "id 42" or "name tdefs-master", for messages.
    pub fn key_label(&self) -> String {
        match (&self.key_id, &self.key_name) {
            (Some(id), _) => format!("id {id}"),
            (None, Some(n)) => format!("name {n:?}"),
            (None, None) => "(none)".into(),
        }
    }
}

fn transit() -> String {
    "transit".into()
}

fn aws() -> String {
    "aws".into()
}

impl MasterKeyConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            MasterKeyConfig::File { .. } => "file",
            MasterKeyConfig::Kms { .. } => "kms",
            MasterKeyConfig::Vault(_) => "vault",
            MasterKeyConfig::Kmip(_) => "kmip",
            MasterKeyConfig::Plaintext => "plaintext",
        }
    }
}

impl fmt::Debug for MasterKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterKeyConfig::File { path } => write!(f, "file:{}", path.display()),
            MasterKeyConfig::Kms { key_id, region, endpoint, .. } => {
                write!(f, "kms:{key_id}@{region}")?;
                if let Some(e) = endpoint {
                    write!(f, " ({e})")?;
                }
                Ok(())
            }
            MasterKeyConfig::Vault(v) => write!(f, "vault:{}@{}", v.key_path(), v.address),
            MasterKeyConfig::Kmip(k) => write!(f, "kmip:{}@{}", k.key_label(), k.endpoint),
            MasterKeyConfig::Plaintext => f.write_str("plaintext"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("invalid config file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|err| ConfigError::Read { path: path.to_path_buf(), err })?;
        let cfg = Config::parse(&text).map_err(|message| ConfigError::Invalid { path: path.to_path_buf(), message })?;
        Ok(cfg)
    }

    /// Parse TOML text; the error is toml's message (it names the key, line and column).
    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        let enc = &self.security.encryption;
        if enc.data_key_rotation_period < Duration::from_secs(1) {
            return Err("security.encryption.data-key-rotation-period must be at least 1s".into());
        }
        if enc.file_dictionary_rewrite_threshold == 0 {
            return Err("security.encryption.file-dictionary-rewrite-threshold must be at least 1".into());
        }
        for (name, mk) in [("master-key", Some(&enc.master_key)), ("previous-master-key", enc.previous_master_key.as_ref())] {
            if let Some(MasterKeyConfig::Vault(v)) = mk {
                let bad = |what: &str| Err(format!("security.encryption.{name} (type \"vault\"): {what}"));
                if !(v.address.starts_with("https://") || v.address.starts_with("http://")) {
                    return bad(&format!("address {:?} must start with https:// (or http:// for a local test server)", v.address));
                }
                if v.key_name.is_empty() || v.key_name.contains('/') || v.mount.is_empty() {
                    return bad("key-name (without slashes) and mount must not be empty");
                }
                if v.token_file.is_some() && v.role_id.is_some() {
                    return bad("token-file and role-id are two ways to log in: give one");
                }
                if v.role_id.is_some() != v.secret_id_file.is_some() {
                    return bad("AppRole needs both role-id and secret-id-file");
                }
                if v.client_cert.is_some() != v.client_key.is_some() {
                    return bad("client-cert and client-key go together");
                }
            }
            if let Some(MasterKeyConfig::Kmip(k)) = mk {
                if k.key_id.is_some() == k.key_name.is_some() {
                    return Err(format!("security.encryption.{name} (type \"kmip\"): give exactly one of key-id and key-name"));
                }
                if !k.endpoint.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) {
                    return Err(format!("security.encryption.{name} (type \"kmip\"): endpoint {:?} must be host:port (KMIP's port is 5696)", k.endpoint));
                }
            }
            if let Some(MasterKeyConfig::Kms { vendor, key_id, region, .. }) = mk {
                if vendor != "aws" {
                    return Err(format!("security.encryption.{name}.vendor = {vendor:?} is not supported; allowed: \"aws\" (or any KMS-compatible service through `endpoint`)"));
                }
                if key_id.is_empty() || region.is_empty() {
                    return Err(format!("security.encryption.{name}: type \"kms\" needs key-id and region"));
                }
            }
        }
        if enc.previous_master_key.as_ref() == Some(&enc.master_key) {
            return Err("security.encryption.previous-master-key is the same as master-key".into());
        }
        if self.mount.allow_other && !self.mount.default_permissions {
            return Err("mount.allow-other = true with mount.default-permissions = false would let every user who can \
                        reach the mount read and write every file (tdefs does not check permissions itself; as \
                        gocryptfs does, it leaves that to the kernel): set default-permissions = true, or \
                        allow-other = false for a mount only its owner uses"
                .into());
        }
        if enc.file_dictionary_rewrite_threshold > crate::dictionary::MAX_RECORDS_PER_GENERATION {
            return Err(format!(
                "security.encryption.file-dictionary-rewrite-threshold must be at most {} (each log generation's \
                 sealing key stays far below the AES-GCM limit)",
                crate::dictionary::MAX_RECORDS_PER_GENERATION
            ));
        }
        if !enc.enable_file_dictionary_log {
            return Err("security.encryption.enable-file-dictionary-log = false is not supported: \
                        tdefs always keeps a dictionary log (remove the key or set it to true)"
                .into());
        }
        Ok(())
    }
}

fn yes() -> bool {
    true
}
fn one_second() -> Duration {
    Duration::from_secs(1)
}
fn thirty_seconds() -> Duration {
    Duration::from_secs(30)
}
/// XTS: databases rewrite pages in place (see the README's threat model).
fn default_method() -> Method {
    Method::Aes256Xts
}
fn default_rotation() -> Duration {
    Duration::from_secs(168 * 3600)
}
fn default_rewrite_threshold() -> u64 {
    1_000_000
}

fn de_method<'de, D: Deserializer<'de>>(d: D) -> Result<Method, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

fn de_metrics_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map(Some).map_err(|_| {
        serde::de::Error::custom(format!(
            "invalid address {s:?}; write IP:PORT, e.g. \"127.0.0.1:9184\" (or \"0.0.0.0:9184\" for every interface)"
        ))
    })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "invalid duration {s:?} ({e}); write a number with a unit, e.g. \"168h\", \"30m\", \"2s\""
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
backing-dir = "/var/lib/tdefs/backing"
mountpoint  = "/var/opt/mssql/data"
[security.encryption]
data-encryption-method = "aes128-ctr"
data-key-rotation-period = "7d"
[security.encryption.master-key]
type = "file"
path = "/run/keys/tdefs.key"
"#;

    #[test]
    fn parses_tikv_style_section() {
        let c = Config::parse(GOOD).unwrap();
        let e = &c.security.encryption;
        assert_eq!(e.data_encryption_method, Method::Aes128Ctr);
        assert_eq!(e.data_key_rotation_period, Duration::from_secs(7 * 86400));
        assert_eq!(e.master_key, MasterKeyConfig::File { path: "/run/keys/tdefs.key".into() });
        assert!(e.previous_master_key.is_none());
        assert!(c.mount.allow_other && c.mount.default_permissions);
    }

    #[test]
    fn defaults() {
        let c = Config::parse("[security.encryption.master-key]\ntype = \"plaintext\"\n").unwrap();
        let e = &c.security.encryption;
        assert_eq!(e.data_encryption_method, Method::Aes256Xts);
        assert_eq!(e.data_key_rotation_period, Duration::from_secs(168 * 3600));
        assert_eq!(e.master_key, MasterKeyConfig::Plaintext);
        assert!(c.backing_dir.is_none());
    }

    fn err(text: &str) -> String {
        Config::parse(text).unwrap_err()
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err(&GOOD.replace("data-key-rotation-period", "data-key-rotaton-period"));
        assert!(e.contains("data-key-rotaton-period"), "{e}");
        let e = err(&format!("{GOOD}\nbogus = 1\n"));
        assert!(e.contains("bogus"), "{e}");
        let e = err(&GOOD.replace("path =", "file =").replace("type = \"file\"", "type = \"file\"\npath = \"/x\""));
        assert!(e.contains("file"), "{e}");
    }

    #[test]
    fn bad_method_lists_allowed() {
        let e = err(&GOOD.replace("aes128-ctr", "aes256-gcm"));
        assert!(e.contains("aes256-gcm") && e.contains("sm4-ctr") && e.contains("plaintext"), "{e}");
        assert!(e.contains("data-encryption-method"), "{e}");
    }

    #[test]
    fn bad_duration_explains_format() {
        let e = err(&GOOD.replace("7d", "soon"));
        assert!(e.contains("soon") && e.contains("168h") && e.contains("data-key-rotation-period"), "{e}");
        let e = err(&GOOD.replace("7d", "0s"));
        assert!(e.contains("at least 1s"), "{e}");
    }

    #[test]
    fn bad_master_key_type_lists_allowed() {
        let e = err(&GOOD.replace("type = \"file\"", "type = \"hsm\""));
        assert!(e.contains("hsm") && e.contains("file") && e.contains("plaintext") && e.contains("kms"), "{e}");
        assert!(e.contains("vault") && e.contains("kmip"), "{e}");
        let e = err(&GOOD.replace("[security.encryption.master-key]\ntype = \"file\"\npath = \"/run/keys/tdefs.key\"\n", ""));
        assert!(e.contains("master-key"), "{e}");
    }

    #[test]
    fn kms_and_previous_master_key() {
        let text = GOOD.replace(
            "type = \"file\"\npath = \"/run/keys/tdefs.key\"",
            "type = \"kms\"\nkey-id = \"alias/tdefs\"\nregion = \"us-west-2\"\nendpoint = \"http://127.0.0.1:5000\"\n\
             [security.encryption.previous-master-key]\ntype = \"file\"\npath = \"/old.key\"",
        );
        let c = Config::parse(&text).unwrap();
        let e = &c.security.encryption;
        assert_eq!(format!("{:?}", e.master_key), "kms:alias/tdefs@us-west-2 (http://127.0.0.1:5000)");
        assert_eq!(e.previous_master_key, Some(MasterKeyConfig::File { path: "/old.key".into() }));
        let e = err(&text.replace("region = \"us-west-2\"", "region = \"us-west-2\"\nvendor = \"gcp\""));
        assert!(e.contains("vendor") && e.contains("aws"), "{e}");
        let e = err(&text.replace("key-id = \"alias/tdefs\"\n", ""));
        assert!(e.contains("key-id"), "{e}");
    }

    #[test]
    fn shipped_example_configs_parse() {
        for (name, text) in [
            ("tdefs.toml", include_str!("../../config/tdefs.toml")),
            ("kms.toml", include_str!("../../config/kms.toml")),
            ("vault.toml", include_str!("../../config/vault.toml")),
            ("kmip.toml", include_str!("../../config/kmip.toml")),
        ] {
            Config::parse(text).unwrap_or_else(|e| panic!("config/{name}: {e}"));
        }
    }

    #[test]
    fn vault_and_kmip_master_keys() {
        let with = |mk: &str| GOOD.replace("type = \"file\"\npath = \"/run/keys/tdefs.key\"", mk);
        let vault = "type = \"vault\"\naddress = \"https://vault.example:8200\"\nkey-name = \"tdefs\"\n\
                     token-file = \"/etc/tdefs/vault-token\"\nca-file = \"/etc/tdefs/vault-ca.pem\"";
        let c = Config::parse(&with(vault)).unwrap();
        let MasterKeyConfig::Vault(v) = &c.security.encryption.master_key else { panic!("not vault") };
        assert_eq!((v.mount.as_str(), v.key_path()), ("transit", "transit/tdefs".to_string()), "mount defaults to transit");
        assert_eq!(format!("{:?}", c.security.encryption.master_key), "vault:transit/tdefs@https://vault.example:8200");
        let approle = "type = \"vault\"\naddress = \"https://v:8200\"\nkey-name = \"k\"\nmount = \"kms\"\n\
                       namespace = \"team\"\nrole-id = \"r\"\nsecret-id-file = \"/s\"";
        assert!(Config::parse(&with(approle)).is_ok());
        for (bad, want) in [
            (vault.replace("https://", "ftp://"), "https://"),
            (vault.replace("token-file = \"/etc/tdefs/vault-token\"", "token-file = \"/t\"\nrole-id = \"r\"\nsecret-id-file = \"/s\""), "give one"),
            (approle.replace("secret-id-file = \"/s\"", ""), "secret-id-file"),
            (format!("{vault}\nclient-cert = \"/c.pem\""), "client-key"),
            (vault.replace("key-name = \"tdefs\"", "key-name = \"a/b\""), "slashes"),
            (format!("{vault}\ntoken = \"inline\""), "unknown field"),
        ] {
            let e = err(&with(&bad));
            assert!(e.contains(want), "{want}: {e}");
        }
        let kmip = "type = \"kmip\"\nendpoint = \"kmip.example:5696\"\nkey-id = \"42\"\nclient-cert = \"/c.pem\"\n\
                    client-key = \"/c.key\"\nca-file = \"/ca.pem\"";
        let c = Config::parse(&with(kmip)).unwrap();
        assert_eq!(format!("{:?}", c.security.encryption.master_key), "kmip:id 42@kmip.example:5696");
        assert!(Config::parse(&with(&kmip.replace("key-id = \"42\"", "key-name = \"tdefs\""))).is_ok());
        for (bad, want) in [
            (kmip.replace("key-id = \"42\"\n", ""), "exactly one of key-id and key-name"),
            (kmip.replace("key-id = \"42\"", "key-id = \"42\"\nkey-name = \"x\""), "exactly one"),
            (kmip.replace(":5696", ""), "host:port"),
            (kmip.replace("ca-file = \"/ca.pem\"", ""), "ca-file"),
        ] {
            let e = err(&with(&bad));
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn metrics_addr_and_log_level() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!((c.metrics_addr, c.log_level), (None, LogLevel::Info));
        let c = Config::parse(&format!("metrics-addr = \"127.0.0.1:9184\"\nlog-level = \"debug\"\n{GOOD}")).unwrap();
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9184".parse().unwrap()));
        assert_eq!(c.log_level, LogLevel::Debug);
        let e = err(&format!("metrics-addr = \"localhost\"\n{GOOD}"));
        assert!(e.contains("metrics-addr") && e.contains("127.0.0.1:9184"), "{e}");
        let e = err(&format!("log-level = \"loud\"\n{GOOD}"));
        assert!(e.contains("log-level") && e.contains("debug") && e.contains("warn"), "{e}");
        let e = err(&format!("metrics_addr = \"127.0.0.1:1\"\n{GOOD}"));
        assert!(e.contains("metrics_addr"), "strict parsing names the misspelt key: {e}");
    }

    #[test]
    fn mount_flags_and_permissions() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.mount.flags(), MountFlags::default());
        assert_eq!(c.mount.flags().to_options(), "nosuid,nodev,exec,relatime");
        assert!(c.mount.direct_write_invalidation, "on by default (kernels before 4c4c472d25f5)");
        assert_eq!(c.mount.io_uring, IoUring::Auto, "io_uring where the kernel offers it");
        let c = Config::parse(&format!("{GOOD}[mount]\nio-uring = \"on\"\n")).unwrap();
        assert_eq!(c.mount.io_uring, IoUring::On);
        let e = Config::parse(&format!("{GOOD}[mount]\nio-uring = \"yes\"\n")).unwrap_err();
        assert!(format!("{e:#}").contains("io-uring"), "{e:#}");
        assert_eq!("off".parse::<IoUring>(), Ok(IoUring::Off), "TDEFS_IO_URING takes the config's names");
        let e = "yes".parse::<IoUring>().unwrap_err();
        assert!(e.contains("auto") && e.contains("on") && e.contains("off"), "{e}");
        let c = Config::parse(&format!("{GOOD}[mount]\ndirect-write-invalidation = false\n")).unwrap();
        assert!(!c.mount.direct_write_invalidation);
        let c = Config::parse(&format!("{GOOD}[mount]\nsuid = true\natime = \"noatime\"\ndiratime = false\n")).unwrap();
        assert_eq!(c.mount.flags().to_options(), "suid,nodev,exec,noatime,nodiratime");
        let e = err(&format!("{GOOD}[mount]\natime = \"sometimes\"\n"));
        assert!(e.contains("sometimes") && e.contains("relatime") && e.contains("noatime"), "{e}");
        let e = err(&format!("{GOOD}[mount]\nnoatime = true\n"));
        assert!(e.contains("noatime"), "strict: {e}");
        let e = err(&format!("{GOOD}[mount]\ndefault-permissions = false\n"));
        assert!(e.contains("allow-other") && e.contains("default-permissions = true"), "{e}");
        Config::parse(&format!("{GOOD}[mount]\ndefault-permissions = false\nallow-other = false\n")).unwrap();
        let e = err(&GOOD.replace("data-key-rotation-period = \"7d\"", "file-dictionary-rewrite-threshold = 9999999999"));
        assert!(e.contains("at most"), "{e}");
        let mut f = MountFlags::default();
        for o in ["suid", "noexec", "strictatime", "lazytime", "sync", "dirsync"] {
            assert!(f.apply(o), "{o}");
        }
        assert!(!f.apply("ro") && !f.apply("bogus"));
        assert_eq!(f.to_options(), "suid,nodev,noexec,strictatime,lazytime,sync,dirsync");
    }

    #[test]
    fn shipped_configs_parse() {
        for (name, text) in [
            ("quickstart.toml", include_str!("../../config/quickstart.toml")),
            ("tdefs.toml", include_str!("../../config/tdefs.toml")),
        ] {
            let c = Config::parse(text).unwrap_or_else(|e| panic!("config/{name}: {e}"));
            assert!(c.backing_dir.is_some() && c.mountpoint.is_some(), "{name}");
        }
    }

    #[test]
    fn debug_of_master_key_has_no_material() {
        let c = Config::parse(GOOD).unwrap();
        let s = format!("{c:?}");
        assert!(s.contains("file:/run/keys/tdefs.key"), "{s}");
    }
}
