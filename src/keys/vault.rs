//! HashiCorp Vault / OpenBao Transit master keys. The Transit key never leaves Vault: the
//! dictionary key is a Transit data key made inside Vault (`datakey/wrapped`) and opened
//! with `decrypt`, once when it is made and at every mount; master-key rotation onto Vault
//! wraps an existing dictionary key with `encrypt`. The key dictionary stores Vault's
//! ciphertext (`vault:vN:…`) with the mount and key it belongs to.
//!
//! When the Transit key has been rotated inside Vault (a newer version), every mount
//! re-wraps the stored ciphertext with `rewrap`, automatically: the plaintext does not
//! travel for it, and once every mount is done, old key versions can be retired with
//! `min_decryption_version`.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use parking_lot::Mutex;
use zeroize::{Zeroize, Zeroizing};

use super::{KeyError, MasterKeyBackend};
use crate::config::VaultConfig;
use crate::crypto::Secret;

/// What a stored blob starts with; then the mount, the key name and the ciphertext, one per line.
const BLOB_TAG: &str = "vault-transit";

pub struct VaultBackend {
    cfg: VaultConfig,
    agent: ureq::Agent,
    /// The token in use: from the config or environment, or from an AppRole login (made
    /// on first use).
    token: Mutex<Option<Zeroizing<String>>>,
}

impl fmt::Debug for VaultBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VaultBackend({}/{} at {})", self.cfg.mount, self.cfg.key_name, self.cfg.address)
    }
}

/// A failed Vault call: HTTP status (0 when Vault could not be reached) and message.
struct Failure {
    status: u16,
    message: String,
}

impl VaultBackend {
    pub fn new(cfg: &VaultConfig) -> Result<VaultBackend, KeyError> {
        let err = |message: String| KeyError::Vault { address: cfg.address.clone(), key: cfg.key_path(), message };
        // Vault's certificate is checked against ca-file, else the system's CA store (where
        // operators install their internal CA), never against a list compiled in.
        let roots = match &cfg.ca_file {
            Some(ca) => {
                let pem = read_file(ca, "ca-file").map_err(err)?;
                pem_certs(&pem).map_err(|e| err(format!("ca-file {}: {e}", ca.display())))?
            }
            None => rustls_native_certs::load_native_certs()
                .certs
                .iter()
                .map(|c| ureq::tls::Certificate::from_der(c.as_ref()).to_owned())
                .collect(),
        };
        let mut tls = ureq::tls::TlsConfig::builder()
            .unversioned_rustls_crypto_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .root_certs(ureq::tls::RootCerts::new_with_certs(&roots));
        if let (Some(cert), Some(key)) = (&cfg.client_cert, &cfg.client_key) {
            let chain = pem_certs(&read_file(cert, "client-cert").map_err(err)?)
                .map_err(|e| err(format!("client-cert {}: {e}", cert.display())))?;
            let key_pem = Zeroizing::new(read_file(key, "client-key").map_err(err)?);
            let key = ureq::tls::PrivateKey::from_pem(&key_pem)
                .map_err(|e| err(format!("client-key {}: {e}", key.display())))?;
            tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            // Fail fast when Vault cannot be reached: a mount should not hang.
            .timeout_connect(Some(Duration::from_secs(3)))
            .timeout_global(Some(Duration::from_secs(15)))
            .max_redirects(0)
            .build()
            .new_agent();
        let token = match (&cfg.token_file, &cfg.role_id) {
            (Some(path), _) => {
                let mut text = read_file(path, "token-file").map_err(err)?;
                let t = Zeroizing::new(String::from_utf8_lossy(&text).trim().to_string());
                text.zeroize();
                if t.is_empty() {
                    return Err(err(format!("token-file {} is empty", path.display())));
                }
                Some(t)
            }
            (None, Some(_)) => None, // AppRole: logged in on first use
            (None, None) => {
                let t = std::env::var("VAULT_TOKEN").or_else(|_| std::env::var("BAO_TOKEN")).map_err(|_| {
                    err("no Vault token: set token-file, or role-id and secret-id-file (AppRole), or VAULT_TOKEN / BAO_TOKEN \
                         in the daemon's environment"
                        .into())
                })?;
                Some(Zeroizing::new(t))
            }
        };
        Ok(VaultBackend { cfg: cfg.clone(), agent, token: Mutex::new(token) })
    }

    fn error(&self, what: &str, f: Failure) -> KeyError {
        let message = match f.status {
            0 => format!("{what}: {}", f.message),
            s => format!("{what}: HTTP {s}: {}", f.message),
        };
        KeyError::Vault { address: self.cfg.address.clone(), key: self.cfg.key_path(), message }
    }

    /// POST `body` to `/v1/{path}` and return the response's `data` object.
    fn post(&self, path: &str, token: Option<&str>, body: &[u8]) -> Result<serde_json::Value, Failure> {
        let url = format!("{}/v1/{path}", self.cfg.address.trim_end_matches('/'));
        let mut req = self.agent.post(&url).header("X-Vault-Request", "true").content_type("application/json");
        if let Some(t) = token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(ns) = &self.cfg.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        let mut resp = req.send(body).map_err(|e| Failure { status: 0, message: describe(&e) })?;
        let status = resp.status().as_u16();
        let bytes = Zeroizing::new(
            resp.body_mut()
                .with_config()
                .limit(1 << 20)
                .read_to_vec()
                .map_err(|e| Failure { status, message: describe(&e) })?,
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        if !(200..300).contains(&status) {
            let errors: Vec<String> = v["errors"].as_array().map(|a| a.iter().filter_map(|e| e.as_str().map(String::from)).collect()).unwrap_or_default();
            let message = if errors.is_empty() {
                format!("no error message (body: {})", String::from_utf8_lossy(&bytes[..bytes.len().min(200)]))
            } else {
                errors.join("; ")
            };
            let message = match status {
                503 if message.contains("sealed") => format!("{message} (unseal it: `vault operator unseal`)"),
                403 => format!("{message} (the token lacks the policy for {path}, or it expired or was revoked)"),
                _ => message,
            };
            return Err(Failure { status, message });
        }
        Ok(v)
    }

    /// A Transit call with the configured token, logging in with AppRole first if needed
    /// (and once more if the login's token has expired).
    fn transit(&self, op: &str, body: &[u8]) -> Result<serde_json::Value, KeyError> {
        let path = format!("{}/{op}/{}", self.cfg.mount, self.cfg.key_name);
        for attempt in 0..2 {
            let cached = self.token.lock().clone(); // not held across login()
            let token = match cached {
                Some(t) => t,
                None => self.login()?,
            };
            match self.post(&path, Some(&token), body) {
                Ok(v) => return Ok(v["data"].clone()),
                Err(f) if f.status == 403 && attempt == 0 && self.cfg.role_id.is_some() => {
                    *self.token.lock() = None; // a fresh login, once
                }
                Err(f) => return Err(self.error(&format!("{op} failed"), f)),
            }
        }
        unreachable!("the loop returns")
    }

    fn login(&self) -> Result<Zeroizing<String>, KeyError> {
        let (Some(role_id), Some(secret_file)) = (&self.cfg.role_id, &self.cfg.secret_id_file) else {
            return Err(self.error("login", Failure { status: 0, message: "no token and no AppRole configured".into() }));
        };
        let mut secret = read_file(secret_file, "secret-id-file").map_err(|m| self.error("AppRole login", Failure { status: 0, message: m }))?;
        let body = Zeroizing::new(
            serde_json::json!({ "role_id": role_id, "secret_id": String::from_utf8_lossy(&secret).trim() }).to_string(),
        );
        secret.zeroize();
        let v = self.post("auth/approle/login", None, body.as_bytes()).map_err(|f| self.error("AppRole login failed", f))?;
        let token = v["auth"]["client_token"]
            .as_str()
            .map(|t| Zeroizing::new(t.to_string()))
            .ok_or_else(|| self.error("AppRole login", Failure { status: 200, message: "no client_token in the answer".into() }))?;
        *self.token.lock() = Some(token.clone());
        Ok(token)
    }

    fn blob(&self, ciphertext: &str) -> Vec<u8> {
        format!("{BLOB_TAG}\n{}\n{}\n{ciphertext}", self.cfg.mount, self.cfg.key_name).into_bytes()
    }

    /// The ciphertext of a stored blob, if it belongs to this backend's mount and key.
    fn ciphertext<'a>(&self, blob: &'a [u8]) -> Option<&'a str> {
        let text = std::str::from_utf8(blob).ok()?;
        let mut parts = text.splitn(4, '\n');
        let ok = parts.next()? == BLOB_TAG && parts.next()? == self.cfg.mount && parts.next()? == self.cfg.key_name;
        ok.then(|| parts.next()).flatten()
    }

    fn decrypt(&self, ciphertext: &str) -> Result<Secret, KeyError> {
        let body = serde_json::json!({ "ciphertext": ciphertext }).to_string();
        let mut data = self.transit("decrypt", body.as_bytes())?;
        let mut b64 = match data.get_mut("plaintext").map(serde_json::Value::take) {
            Some(serde_json::Value::String(s)) => Zeroizing::new(s),
            _ => return Err(self.error("decrypt", Failure { status: 200, message: "no plaintext in the answer".into() })),
        };
        let key = base64::engine::general_purpose::STANDARD.decode(b64.as_bytes());
        b64.zeroize();
        match key {
            Ok(k) if k.len() == 32 => Ok(Secret::new(k)),
            Ok(mut k) => {
                let n = k.len();
                k.zeroize();
                Err(self.error("decrypt", Failure { status: 200, message: format!("the key is {n} bytes, not 32") }))
            }
            Err(e) => Err(self.error("decrypt", Failure { status: 200, message: format!("plaintext is not base64: {e}") })),
        }
    }
}

/// The key version of a Transit ciphertext ("vault:v3:…" → 3).
fn version(ciphertext: &str) -> Option<u64> {
    ciphertext.strip_prefix("vault:v")?.split(':').next()?.parse().ok()
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

fn pem_certs(pem: &[u8]) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(pem) {
        if let ureq::tls::PemItem::Certificate(c) = item.map_err(|e| e.to_string())? {
            certs.push(c);
        }
    }
    if certs.is_empty() {
        return Err("no PEM certificate in it".into());
    }
    Ok(certs)
}

/// ureq's error, shortened to what an operator needs.
fn describe(e: &ureq::Error) -> String {
    match e {
        ureq::Error::Timeout(t) => format!("timed out ({t})"),
        ureq::Error::Io(io) => format!("connection to Vault failed: {io}"),
        other => format!("{other}"),
    }
}

impl MasterKeyBackend for VaultBackend {
    fn kind(&self) -> &'static str {
        "vault"
    }

    fn describe(&self) -> String {
        format!("Vault Transit key {} at {}", self.cfg.key_path(), self.cfg.address)
    }

    fn generate(&self) -> Result<(Secret, Vec<u8>), KeyError> {
        let data = self.transit("datakey/wrapped", br#"{"bits":256}"#)?;
        let ciphertext = data["ciphertext"]
            .as_str()
            .ok_or_else(|| self.error("datakey/wrapped", Failure { status: 200, message: "no ciphertext in the answer".into() }))?;
        let key = self.decrypt(ciphertext)?;
        Ok((key, self.blob(ciphertext)))
    }

    fn wrap(&self, key: &Secret) -> Result<Vec<u8>, KeyError> {
        let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.expose()));
        let body = Zeroizing::new(format!("{{\"plaintext\":\"{}\"}}", b64.as_str()));
        let data = self.transit("encrypt", body.as_bytes())?;
        let ciphertext = data["ciphertext"]
            .as_str()
            .ok_or_else(|| self.error("encrypt", Failure { status: 200, message: "no ciphertext in the answer".into() }))?;
        Ok(self.blob(ciphertext))
    }

    fn unwrap(&self, blob: &[u8]) -> Result<Option<Secret>, KeyError> {
        // Another mount's or key's ciphertext: not ours to open (previous-master-key may be).
        let Some(ciphertext) = self.ciphertext(blob) else { return Ok(None) };
        self.decrypt(ciphertext).map(Some)
    }

    fn refresh(&self, blob: &[u8]) -> Result<Option<Vec<u8>>, KeyError> {
        let Some(old) = self.ciphertext(blob) else { return Ok(None) };
        let body = serde_json::json!({ "ciphertext": old }).to_string();
        let data = self.transit("rewrap", body.as_bytes())?;
        let Some(new) = data["ciphertext"].as_str() else { return Ok(None) };
        Ok((version(new) > version(old)).then(|| self.blob(new)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_versions() {
        assert_eq!(version("vault:v1:abc"), Some(1));
        assert_eq!(version("vault:v12:a:b"), Some(12));
        assert_eq!(version("vault:x:abc"), None);
        assert!(version("vault:v2:x") > version("vault:v1:y"));
    }

    #[test]
    fn blobs_name_their_mount_and_key_and_debug_hides_the_token() {
        let d = tempfile::tempdir().unwrap();
        let token = d.path().join("token");
        std::fs::write(&token, "hvs.s3cr3t-t0ken\n").unwrap();
        let cfg = |mount: &str, key: &str| VaultConfig {
            address: "http://127.0.0.1:1".into(),
            key_name: key.into(),
            mount: mount.into(),
            namespace: None,
            token_file: Some(token.clone()),
            role_id: None,
            secret_id_file: None,
            ca_file: None,
            client_cert: None,
            client_key: None,
        };
        let a = VaultBackend::new(&cfg("transit", "a")).unwrap();
        let b = VaultBackend::new(&cfg("transit", "b")).unwrap();
        let other_mount = VaultBackend::new(&cfg("kv-transit", "a")).unwrap();
        let blob = a.blob("vault:v1:xyz");
        assert_eq!(a.ciphertext(&blob), Some("vault:v1:xyz"));
        assert_eq!(b.ciphertext(&blob), None);
        assert_eq!(other_mount.ciphertext(&blob), None);
        // Another key's blob is refused without asking Vault (none listens at port 1).
        assert!(b.unwrap(&blob).unwrap().is_none());
        assert!(!format!("{a:?}").contains("s3cr3t"), "{a:?}");
        // Vault unreachable: an error naming the address, fast.
        let e = a.unwrap(&blob).unwrap_err().to_string();
        assert!(e.contains("http://127.0.0.1:1") && e.contains("transit/a"), "{e}");
    }
}
