//! Master-key backends. A backend only wraps and unwraps the dictionary key; it never sees
//! file data, so a slow backend (a KMS round trip) costs one call per mount.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use zeroize::Zeroize;

use super::KeyError;
use crate::config::MasterKeyConfig;
use crate::crypto::{SealKey, Secret};
use crate::error::IoError;

/// Associated data binding a wrapped dictionary key to its purpose.
const WRAP_AAD: &[u8] = b"tdefs dictionary key v1";

pub trait MasterKeyBackend: Send + Sync + fmt::Debug {
    /// Backend type as written in the config (`file`, `kms`, `plaintext`).
    fn kind(&self) -> &'static str;
    /// Human description for messages; never contains key material.
    fn describe(&self) -> String;
    /// A new 256-bit dictionary key and its wrapped form.
    fn generate(&self) -> Result<(Secret, Vec<u8>), KeyError> {
        let key = Secret::random(32);
        let blob = self.wrap(&key)?;
        Ok((key, blob))
    }
    /// Wrap an existing dictionary key (master-key rotation) into a blob that only this
    /// backend can unwrap.
    fn wrap(&self, key: &Secret) -> Result<Vec<u8>, KeyError>;
    /// Unwrap a blob made by this backend; `Ok(None)` when this key cannot open it (another
    /// key), an error when the backend cannot be asked (KMS unreachable, access denied).
    fn unwrap(&self, blob: &[u8]) -> Result<Option<Secret>, KeyError>;
    /// A newer wrapping of the same key when the master key has a newer version inside its
    /// service (Vault Transit key rotation); `None` when the blob is current. Asked at mount.
    fn refresh(&self, _blob: &[u8]) -> Result<Option<Vec<u8>>, KeyError> {
        Ok(None)
    }
}

/// Build the backend a config section names; loading a key file validates it here, before
/// anything on disk is touched.
pub fn backend_for(cfg: &MasterKeyConfig) -> Result<Box<dyn MasterKeyBackend>, KeyError> {
    Ok(match cfg {
        MasterKeyConfig::File { path } => Box::new(FileBackend::load(path)?),
        MasterKeyConfig::Kms { key_id, region, endpoint, .. } => {
            Box::new(super::kms::KmsBackend::new(key_id, region, endpoint.as_deref())?)
        }
        MasterKeyConfig::Vault(v) => Box::new(super::vault::VaultBackend::new(v)?),
        MasterKeyConfig::Kmip(k) => Box::new(super::kmip::KmipBackend::new(k)?),
        MasterKeyConfig::Plaintext => Box::new(PlaintextBackend::new()),
    })
}

/// A 256-bit key kept in a file as 64 hex characters and a newline.
pub struct FileBackend {
    path: PathBuf,
    seal: SealKey,
}

impl FileBackend {
    pub fn load(path: &Path) -> Result<FileBackend, KeyError> {
        let key = load_key_file(path)?;
        Ok(FileBackend { path: path.to_path_buf(), seal: SealKey::new(&key) })
    }
}

impl fmt::Debug for FileBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FileBackend({})", self.path.display())
    }
}

impl MasterKeyBackend for FileBackend {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn describe(&self) -> String {
        format!("key file {}", self.path.display())
    }
    fn wrap(&self, key: &Secret) -> Result<Vec<u8>, KeyError> {
        Ok(self.seal.seal(WRAP_AAD, key.expose()))
    }
    fn unwrap(&self, blob: &[u8]) -> Result<Option<Secret>, KeyError> {
        Ok(self.seal.open(WRAP_AAD, blob).ok())
    }
}

/// No master key at all: the dictionary key is stored as is. Only for tests and demos.
#[derive(Debug, Default)]
pub struct PlaintextBackend;

impl PlaintextBackend {
    pub fn new() -> PlaintextBackend {
        tracing::warn!(
            "master key type \"plaintext\": the metadata keys are stored UNPROTECTED in the backing \
             directory, so anyone with a copy of it can decrypt everything. Use only for tests."
        );
        PlaintextBackend
    }
}

impl MasterKeyBackend for PlaintextBackend {
    fn kind(&self) -> &'static str {
        "plaintext"
    }
    fn describe(&self) -> String {
        "plaintext (no master key)".into()
    }
    fn wrap(&self, key: &Secret) -> Result<Vec<u8>, KeyError> {
        Ok(key.expose().to_vec())
    }
    fn unwrap(&self, blob: &[u8]) -> Result<Option<Secret>, KeyError> {
        Ok((blob.len() == 32).then(|| Secret::new(blob.to_vec())))
    }
}

/// Read and validate a master key file: mode 0600 or stricter, exactly 64 hex characters
/// followed by a newline.
pub fn load_key_file(path: &Path) -> Result<Secret, KeyError> {
    let err = |problem: String| KeyError::KeyFile { path: path.to_path_buf(), problem };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(err("is not a regular file".into()));
    }
    let mode = meta.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(err(format!(
            "is readable or writable by group or others (mode {mode:04o}); a master key must be private: \
             run `chmod 600 {}`",
            path.display()
        )));
    }
    let mut text = std::fs::read(path).map_err(|e| err(format!("cannot read it: {e}")))?;
    let result = parse_key_text(&text).map_err(err);
    text.zeroize();
    result
}

fn parse_key_text(text: &[u8]) -> Result<Secret, String> {
    const WANT: &str = "must hold exactly 64 hexadecimal characters (a 256-bit key) followed by one newline; \
                        `tdefs genkey PATH` writes one";
    if text.len() != 65 || text[64] != b'\n' {
        return Err(format!("{WANT}, but it is {} bytes long", text.len()));
    }
    if let Some(i) = text[..64].iter().position(|c| !c.is_ascii_hexdigit()) {
        return Err(format!("{WANT}, but byte {} is not a hex digit", i + 1));
    }
    let mut key = hex::decode(&text[..64]).map_err(|e| format!("{WANT} ({e})"))?;
    let secret = Secret::new(key.clone());
    key.zeroize();
    Ok(secret)
}

/// Write a new random master key to `path` (mode 0600), refusing to overwrite anything.
pub fn generate_key_file(path: &Path) -> Result<(), KeyError> {
    let io = |op, e| KeyError::from(IoError::new(op, path, e));
    let key = Secret::random(32);
    let mut text = hex::encode(key.expose()).into_bytes();
    text.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io("create", e))?;
    let r = f.write_all(&text).and_then(|_| f.sync_all());
    text.zeroize();
    r.map_err(|e| io("write", e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::sys::fsync_dir(dir).map_err(|e| io("fsync directory of", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn key_file_validation() {
        let d = tempfile::tempdir().unwrap();
        let good = format!("{}\n", "ab".repeat(32));
        let p = write(d.path(), "good", good.as_bytes(), 0o600);
        assert_eq!(load_key_file(&p).unwrap().expose(), &[0xab; 32]);
        let p = write(d.path(), "upper", good.to_uppercase().as_bytes(), 0o400);
        assert!(load_key_file(&p).is_ok());
        let crlf = format!("{}\r\n", "ab".repeat(32));
        let nothex = format!("{}zz\n", "ab".repeat(31));

        let cases: &[(&str, &[u8], u32, &str)] = &[
            ("world", good.as_bytes(), 0o644, "chmod 600"),
            ("group", good.as_bytes(), 0o640, "mode 0640"),
            ("nonl", &good.as_bytes()[..64], 0o600, "64 bytes long"),
            ("short", b"abcd\n", 0o600, "5 bytes long"),
            ("crlf", crlf.as_bytes(), 0o600, "66 bytes"),
            ("nothex", nothex.as_bytes(), 0o600, "byte 63"),
        ];
        for (name, text, mode, expect) in cases {
            let p = write(d.path(), name, text, *mode);
            let e = load_key_file(&p).unwrap_err().to_string();
            assert!(e.contains(expect) && e.contains(&*p.to_string_lossy()), "{name}: {e}");
        }
        let e = load_key_file(&d.path().join("missing")).unwrap_err().to_string();
        assert!(e.contains("missing") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn genkey_writes_private_valid_key_and_refuses_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        generate_key_file(&p).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        let k1 = load_key_file(&p).unwrap();
        assert!(generate_key_file(&p).is_err());
        assert_eq!(load_key_file(&p).unwrap(), k1, "not overwritten");
    }

    #[test]
    fn wrap_unwrap() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a");
        let b = d.path().join("b");
        generate_key_file(&a).unwrap();
        generate_key_file(&b).unwrap();
        let (fa, fb) = (FileBackend::load(&a).unwrap(), FileBackend::load(&b).unwrap());
        let k = Secret::random(32);
        let blob = fa.wrap(&k).unwrap();
        assert_eq!(fa.unwrap(&blob).unwrap().unwrap(), k);
        assert!(fb.unwrap(&blob).unwrap().is_none(), "other key cannot unwrap");
        assert!(!format!("{fa:?}").contains(&hex::encode(k.expose())));
    }
}
