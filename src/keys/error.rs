use std::path::PathBuf;

use crate::codec::HeaderError;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("master key file {path}: {problem}")]
    KeyFile { path: PathBuf, problem: String },

    #[error(
        "the configured master key ({configured}) cannot open {path}: wrong key, or the file was changed. \
         Nothing was modified. Check [security.encryption.master-key] in the config; if you are rotating \
         master keys, put the old one under [security.encryption.previous-master-key]"
    )]
    WrongMasterKey { path: PathBuf, configured: String },

    #[error(
        "{path} was sealed with a master key of type \"{stored}\" but the config has type \"{configured}\"; \
         configure the original master key (as master-key, or as previous-master-key to rotate)"
    )]
    BackendMismatch { path: PathBuf, stored: String, configured: String },

    #[error("key dictionary {path} is damaged: {reason}. Nothing was modified; restore {path} from a backup")]
    Corrupt { path: PathBuf, reason: String },

    #[error("key dictionary {path}: {err}. Nothing was modified.{}", if matches!(.err, HeaderError::NewerVersion(_)) { "" } else { " Restore it from a backup" })]
    Header { path: PathBuf, err: HeaderError },

    #[error(transparent)]
    Io(#[from] crate::error::IoError),

    #[error("data key {0:#018x} is referenced by the file dictionary but missing from the key dictionary")]
    MissingDataKey(u64),

    #[error(
        "AWS KMS key {key_id} in {region}{}: {message}. Nothing was modified; tdefs does not mount \
         without its master key (check the network, the endpoint, the credentials and the key policy: \
         the daemon needs kms:GenerateDataKey, kms:Encrypt and kms:Decrypt)",
        .endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default()
    )]
    Kms { key_id: String, region: String, endpoint: Option<String>, message: String },

    #[error(
        "Vault Transit key {key} at {address}: {message}. Nothing was modified; tdefs does not mount without \
         its master key (the daemon's token needs a policy allowing update on {key_datakey}, {key_decrypt}, \
         {key_encrypt} and {key_rewrap})",
        key_datakey = transit_path(.key, "datakey/wrapped"), key_decrypt = transit_path(.key, "decrypt"),
        key_encrypt = transit_path(.key, "encrypt"), key_rewrap = transit_path(.key, "rewrap")
    )]
    Vault { address: String, key: String, message: String },

    #[error(
        "KMIP key {key} at {endpoint}: {message}. Nothing was modified; tdefs does not mount without its \
         master key (check the server, the client certificate and the key's state: it must be an active \
         AES-256 key this client may Encrypt and Decrypt with)"
    )]
    Kmip { endpoint: String, key: String, message: String },

    #[error("neither master key opens {path}: the configured master key: {new}; the previous master key: {previous}")]
    NeitherKey { path: PathBuf, new: String, previous: String },
}

impl KeyError {
    /// The service's answer without the advice for a mount that failed, for a failure that
    /// does not stop the mount (a refused rewrap at mount time).
    pub fn brief(&self) -> String {
        match self {
            KeyError::Kms { key_id, region, message, .. } => format!("AWS KMS key {key_id} in {region}: {message}"),
            KeyError::Vault { address, key, message } => format!(
                "Vault Transit key {key} at {address}: {message} (the daemon's token needs a policy allowing update on {})",
                transit_path(key, "rewrap")
            ),
            KeyError::Kmip { endpoint, key, message } => format!("KMIP key {key} at {endpoint}: {message}"),
            other => other.to_string(),
        }
    }
}

impl std::error::Error for HeaderError {}

/// "transit/datakey/wrapped/tdefs" from "transit/tdefs".
fn transit_path(key: &str, op: &str) -> String {
    match key.rsplit_once('/') {
        Some((mount, name)) => format!("{mount}/{op}/{name}"),
        None => format!("{op}/{key}"),
    }
}
