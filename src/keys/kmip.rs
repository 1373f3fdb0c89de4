//! KMIP master keys: a symmetric AES-256 key on a KMIP 1.x server (an HSM, a key manager),
//! used with the server's Encrypt and Decrypt operations, so the key never leaves it (Get
//! would copy it into the daemon's memory, and many servers' policies refuse it anyway).
//! The dictionary key is made here and wrapped by the server (AES-CBC, PKCS#5 padding, an
//! IV the server picks: what every KMIP server supports; the wrapped form carries its own
//! check value, so a wrong key is told apart from a damaged blob). One TLS connection, with
//! a client certificate, per call: a mount makes one or two.

use std::fmt;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::ttlv::{self, tag, Item};
use super::{KeyError, MasterKeyBackend};
use crate::config::KmipConfig;
use crate::crypto::Secret;

const OP_LOCATE: u32 = 0x08;
const OP_ENCRYPT: u32 = 0x1F;
const OP_DECRYPT: u32 = 0x20;
const ALG_AES: u32 = 0x03;
const MODE_CBC: u32 = 0x01;
const PAD_PKCS5: u32 = 0x03;
const NAME_UNINTERPRETED_TEXT: u32 = 0x01;
const BLOB_TAG: &[u8] = b"tdefs-kmip1\0";
/// Bytes of the check value wrapped with the key.
const CHECK: usize = 16;

pub struct KmipBackend {
    cfg: KmipConfig,
    tls: Arc<rustls::ClientConfig>,
    server_name: ServerName<'static>,
    /// The key's Unique Identifier (configured, or located by name on first use).
    uid: OnceLock<String>,
}

impl fmt::Debug for KmipBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KmipBackend({} at {})", self.cfg.key_label(), self.cfg.endpoint)
    }
}

impl KmipBackend {
    pub fn new(cfg: &KmipConfig) -> Result<KmipBackend, KeyError> {
        let err = |message: String| KeyError::Kmip { endpoint: cfg.endpoint.clone(), key: cfg.key_label(), message };
        let read = |p: &std::path::Path, what: &str| {
            std::fs::read(p).map(Zeroizing::new).map_err(|e| err(format!("cannot read {what} {}: {e}", p.display())))
        };
        let certs = |p: &std::path::Path, what: &str| -> Result<Vec<CertificateDer<'static>>, KeyError> {
            let pem = read(p, what)?;
            let v: Vec<_> = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<_, _>>()
                .map_err(|e| err(format!("{what} {}: {e}", p.display())))?;
            if v.is_empty() {
                return Err(err(format!("{what} {}: no PEM certificate in it", p.display())));
            }
            Ok(v)
        };
        let mut roots = rustls::RootCertStore::empty();
        for c in certs(&cfg.ca_file, "ca-file")? {
            roots.add(c).map_err(|e| err(format!("ca-file {}: {e}", cfg.ca_file.display())))?;
        }
        let chain = certs(&cfg.client_cert, "client-cert")?;
        let key = PrivateKeyDer::from_pem_slice(&read(&cfg.client_key, "client-key")?)
            .map_err(|e| err(format!("client-key {}: {e}", cfg.client_key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| err(format!("TLS setup: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| err(format!("client-cert and client-key: {e}")))?;
        let host = match &cfg.server_name {
            Some(n) => n.clone(),
            None => cfg.endpoint.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']']).to_string()).unwrap_or_default(),
        };
        let server_name = ServerName::try_from(host.clone()).map_err(|e| err(format!("server name {host:?}: {e}")))?;
        let uid = OnceLock::new();
        if let Some(id) = &cfg.key_id {
            let _ = uid.set(id.clone());
        }
        Ok(KmipBackend { cfg: cfg.clone(), tls: Arc::new(tls), server_name, uid })
    }

    fn error(&self, message: String) -> KeyError {
        KeyError::Kmip { endpoint: self.cfg.endpoint.clone(), key: self.cfg.key_label(), message }
    }

    /// One request with one batch item; the response payload, or the server's refusal.
    fn call(&self, op: u32, what: &str, payload: Vec<Item>) -> Result<Item, KeyError> {
        let req = ttlv::st(
            tag::REQUEST_MESSAGE,
            vec![
                ttlv::st(
                    tag::REQUEST_HEADER,
                    vec![
                        ttlv::st(tag::PROTOCOL_VERSION, vec![ttlv::int(tag::PROTOCOL_VERSION_MAJOR, 1), ttlv::int(tag::PROTOCOL_VERSION_MINOR, 2)]),
                        ttlv::int(tag::BATCH_COUNT, 1),
                    ],
                ),
                ttlv::st(tag::BATCH_ITEM, vec![ttlv::enumeration(tag::OPERATION, op), ttlv::st(tag::REQUEST_PAYLOAD, payload)]),
            ],
        )
        .to_bytes();
        let resp = self.exchange(&req).map_err(|e| self.error(format!("{what}: {e}")))?;
        let (msg, _) = Item::decode(&resp).map_err(|e| self.error(format!("{what}: malformed response: {e}")))?;
        let item = (msg.tag == tag::RESPONSE_MESSAGE)
            .then(|| msg.child(tag::BATCH_ITEM))
            .flatten()
            .ok_or_else(|| self.error(format!("{what}: the response has no batch item")))?;
        let status = item.child(tag::RESULT_STATUS).and_then(Item::as_enum);
        if status != Some(0) {
            let reason = item.child(tag::RESULT_REASON).and_then(Item::as_enum).map(reason_name).unwrap_or("no reason given");
            let message = item.child(tag::RESULT_MESSAGE).and_then(Item::as_text).unwrap_or("");
            return Err(self.error(format!("{what} refused by the server: {reason}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })));
        }
        item.child(tag::RESPONSE_PAYLOAD).cloned().ok_or_else(|| self.error(format!("{what}: the response has no payload")))
    }

    fn exchange(&self, req: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
        let addrs: Vec<_> = self.cfg.endpoint.to_socket_addrs().map_err(|e| format!("cannot resolve {}: {e}", self.cfg.endpoint))?.collect();
        let mut last = String::from("no address");
        let mut tcp = None;
        for a in addrs {
            // Fail fast when the server cannot be reached: a mount should not hang.
            match TcpStream::connect_timeout(&a, Duration::from_secs(3)) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = format!("cannot connect to {a}: {e}"),
            }
        }
        let tcp = tcp.ok_or(last)?;
        tcp.set_read_timeout(Some(Duration::from_secs(15))).map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(Duration::from_secs(15))).map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), self.server_name.clone()).map_err(|e| format!("TLS: {e}"))?;
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let tls_err = |e: std::io::Error| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(t @ rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure)) => format!(
                "TLS handshake failed: {t} (no cipher suite in common: tdefs offers TLS 1.3, and TLS 1.2 with \
                 ECDHE and AES-GCM or ChaCha20, never CBC; a server with an RSA certificate may offer only CBC \
                 suites for TLS 1.2, as PyKMIP does: give it an ECDSA certificate or enable TLS 1.3)"
            ),
            Some(t) => format!("TLS handshake failed: {t}"),
            None => format!("connection failed: {e}"),
        };
        s.write_all(req).map_err(tls_err)?;
        s.flush().map_err(tls_err)?;
        let mut head = [0u8; ttlv::HEADER];
        s.read_exact(&mut head).map_err(tls_err)?;
        let len = u32::from_be_bytes(head[4..8].try_into().unwrap()) as usize;
        if len > 1 << 20 {
            return Err(format!("response of {len} bytes is too large"));
        }
        let mut buf = Zeroizing::new(vec![0u8; ttlv::HEADER + len]);
        buf[..ttlv::HEADER].copy_from_slice(&head);
        s.read_exact(&mut buf[ttlv::HEADER..]).map_err(tls_err)?;
        Ok(buf)
    }

    /// The key's Unique Identifier: configured, or the one key with the configured name.
    fn uid(&self) -> Result<&str, KeyError> {
        if let Some(u) = self.uid.get() {
            return Ok(u);
        }
        let name = self.cfg.key_name.as_deref().unwrap_or_default();
        let attr = ttlv::st(
            tag::ATTRIBUTE,
            vec![
                ttlv::text(tag::ATTRIBUTE_NAME, "Name"),
                ttlv::st(tag::ATTRIBUTE_VALUE, vec![ttlv::text(tag::NAME_VALUE, name), ttlv::enumeration(tag::NAME_TYPE, NAME_UNINTERPRETED_TEXT)]),
            ],
        );
        let p = self.call(OP_LOCATE, "Locate", vec![attr])?;
        let ids: Vec<&str> = p.children(tag::UNIQUE_IDENTIFIER).filter_map(Item::as_text).collect();
        match ids.as_slice() {
            [one] => Ok(self.uid.get_or_init(|| one.to_string())),
            [] => Err(self.error(format!("no key is named {name:?} (or this client may not see it)"))),
            many => Err(self.error(format!("{} keys are named {name:?} ({}): configure key-id instead", many.len(), many.join(", ")))),
        }
    }

    /// AES-CBC with PKCS#5 padding; `random_iv` asks the server to pick the IV (Encrypt).
    fn params(random_iv: bool) -> Item {
        let mut p = vec![
            ttlv::enumeration(tag::BLOCK_CIPHER_MODE, MODE_CBC),
            ttlv::enumeration(tag::PADDING_METHOD, PAD_PKCS5),
            ttlv::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, ALG_AES),
        ];
        if random_iv {
            p.push(ttlv::boolean(tag::RANDOM_IV, true));
        }
        ttlv::st(tag::CRYPTOGRAPHIC_PARAMETERS, p)
    }
}

/// The check value wrapped with the dictionary key.
fn check(key: &[u8]) -> [u8; CHECK] {
    let d = Sha256::new().chain_update(b"tdefs kmip check v1").chain_update(key).finalize();
    d[..CHECK].try_into().unwrap()
}

/// Blob: tag, then u16 length + Unique Identifier, u8 length + IV, the ciphertext.
fn encode_blob(uid: &str, iv: &[u8], ct: &[u8]) -> Vec<u8> {
    let mut b = BLOB_TAG.to_vec();
    b.extend_from_slice(&(uid.len() as u16).to_be_bytes());
    b.extend_from_slice(uid.as_bytes());
    b.push(iv.len() as u8);
    b.extend_from_slice(iv);
    b.extend_from_slice(ct);
    b
}

fn decode_blob(b: &[u8]) -> Option<(&str, &[u8], &[u8])> {
    let b = b.strip_prefix(BLOB_TAG)?;
    let n = u16::from_be_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let uid = std::str::from_utf8(b.get(2..2 + n)?).ok()?;
    let b = &b[2 + n..];
    let m = *b.first()? as usize;
    Some((uid, b.get(1..1 + m)?, b.get(1 + m..)?))
}

/// KMIP 1.x Result Reason names (the ones a client meets).
fn reason_name(r: u32) -> &'static str {
    match r {
        0x01 => "Item Not Found",
        0x02 => "Response Too Large",
        0x03 => "Authentication Not Successful",
        0x04 => "Invalid Message",
        0x05 => "Operation Not Supported",
        0x06 => "Missing Data",
        0x07 => "Invalid Field",
        0x08 => "Feature Not Supported",
        0x09 => "Operation Canceled By Requester",
        0x0A => "Cryptographic Failure",
        0x0B => "Illegal Operation",
        0x0C => "Permission Denied",
        0x0D => "Object Archived",
        0x0E => "Index Out of Bounds",
        0x0F => "Application Namespace Not Supported",
        0x10 => "Key Format Type Not Supported",
        0x11 => "Key Compression Type Not Supported",
        0x12 => "Encoding Option Error",
        0x13 => "Key Value Not Present",
        0x14 => "Attestation Required",
        0x15 => "Attestation Failed",
        0x16 => "Sensitive",
        0x17 => "Not Extractable",
        0x18 => "Object Already Exists",
        0x100 => "General Failure",
        _ => "unknown reason",
    }
}

impl MasterKeyBackend for KmipBackend {
    fn kind(&self) -> &'static str {
        "kmip"
    }

    fn describe(&self) -> String {
        format!("KMIP key {} at {}", self.cfg.key_label(), self.cfg.endpoint)
    }

    fn wrap(&self, key: &Secret) -> Result<Vec<u8>, KeyError> {
        let uid = self.uid()?.to_string();
        let mut plain = Zeroizing::new(key.expose().to_vec());
        plain.extend_from_slice(&check(key.expose()));
        let p = self.call(OP_ENCRYPT, "Encrypt", vec![ttlv::text(tag::UNIQUE_IDENTIFIER, &uid), Self::params(true), ttlv::bytes(tag::DATA, &plain)])?;
        let ct = p.child(tag::DATA).and_then(Item::as_bytes).ok_or_else(|| self.error("Encrypt returned no data".into()))?;
        let iv = p
            .child(tag::IV_COUNTER_NONCE)
            .and_then(Item::as_bytes)
            .ok_or_else(|| self.error("Encrypt returned no IV (the server must support Random IV, KMIP 1.2)".into()))?;
        Ok(encode_blob(&uid, iv, ct))
    }

    fn unwrap(&self, blob: &[u8]) -> Result<Option<Secret>, KeyError> {
        let Some((blob_uid, iv, ct)) = decode_blob(blob) else { return Ok(None) };
        if blob_uid != self.uid()? {
            return Ok(None); // another key's: previous-master-key may open it
        }
        let p = self.call(
            OP_DECRYPT,
            "Decrypt",
            vec![ttlv::text(tag::UNIQUE_IDENTIFIER, blob_uid), Self::params(false), ttlv::bytes(tag::DATA, ct), ttlv::bytes(tag::IV_COUNTER_NONCE, iv)],
        )?;
        let plain = p.child(tag::DATA).and_then(Item::as_bytes).ok_or_else(|| self.error("Decrypt returned no data".into()))?;
        if plain.len() != 32 + CHECK || check(&plain[..32]) != plain[32..] {
            return Err(self.error(format!(
                "Decrypt of the stored dictionary key gave {} bytes that fail its check value: the key dictionary's \
                 wrapped key is damaged, or the server's key {blob_uid} is not the one that wrapped it",
                plain.len()
            )));
        }
        Ok(Some(Secret::new(plain[..32].to_vec())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_roundtrip_and_garbage() {
        let b = encode_blob("42", &[7; 16], &[9; 48]);
        assert_eq!(decode_blob(&b), Some(("42", &[7u8; 16][..], &[9u8; 48][..])));
        assert_eq!(decode_blob(b"vault-transit\nx"), None);
        for cut in 0..BLOB_TAG.len() + 3 {
            assert_eq!(decode_blob(&b[..cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn check_value_depends_on_the_key() {
        assert_ne!(check(&[1; 32]), check(&[2; 32]));
        assert_eq!(check(&[1; 32]), check(&[1; 32]));
    }
}
