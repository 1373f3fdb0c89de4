//! AWS KMS master keys: the dictionary key is a KMS data key (GenerateDataKey AES_256); its
//! KMS ciphertext blob is what the key dictionary stores, and each mount asks KMS to
//! decrypt it. Works with any KMS-compatible service through `endpoint`.

use std::fmt;
use std::time::Duration;

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::DataKeySpec;

use super::{KeyError, MasterKeyBackend};
use crate::crypto::Secret;

pub struct KmsBackend {
    key_id: String,
    region: String,
    endpoint: Option<String>,
    rt: tokio::runtime::Runtime,
    client: aws_sdk_kms::Client,
}

impl fmt::Debug for KmsBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KmsBackend({}@{})", self.key_id, self.region)
    }
}

impl KmsBackend {
    pub fn new(key_id: &str, region: &str, endpoint: Option<&str>) -> Result<KmsBackend, KeyError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| KeyError::Kms {
            key_id: key_id.into(),
            region: region.into(),
            endpoint: endpoint.map(Into::into),
            message: format!("cannot start the AWS client runtime: {e}"),
        })?;
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            // Fail fast when KMS cannot be reached: a mount should not hang for minutes.
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .operation_timeout(Duration::from_secs(20))
                    .build(),
            )
            .retry_config(aws_config::retry::RetryConfig::standard().with_max_attempts(3));
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let conf = rt.block_on(loader.load());
        Ok(KmsBackend {
            key_id: key_id.into(),
            region: region.into(),
            endpoint: endpoint.map(Into::into),
            client: aws_sdk_kms::Client::new(&conf),
            rt,
        })
    }

    fn error(&self, message: String) -> KeyError {
        KeyError::Kms { key_id: self.key_id.clone(), region: self.region.clone(), endpoint: self.endpoint.clone(), message }
    }
}

/// The message of an SDK error, with the service's error code when there is one.
fn describe<E: std::error::Error + aws_sdk_kms::error::ProvideErrorMetadata>(e: &aws_sdk_kms::error::SdkError<E>) -> String {
    use aws_sdk_kms::error::SdkError;
    match e {
        SdkError::ServiceError(s) => {
            let inner = s.err();
            format!("{}: {}", inner.code().unwrap_or("error"), inner.message().unwrap_or("no message"))
        }
        SdkError::TimeoutError(_) => "timed out".into(),
        SdkError::DispatchFailure(d) => format!("cannot reach KMS ({d:?})").chars().take(300).collect(),
        other => format!("{other}"),
    }
}

impl MasterKeyBackend for KmsBackend {
    fn kind(&self) -> &'static str {
        "kms"
    }

    fn describe(&self) -> String {
        format!("AWS KMS key {} in {}", self.key_id, self.region)
    }

    fn generate(&self) -> Result<(Secret, Vec<u8>), KeyError> {
        let out = self
            .rt
            .block_on(self.client.generate_data_key().key_id(&self.key_id).key_spec(DataKeySpec::Aes256).send())
            .map_err(|e| self.error(format!("GenerateDataKey failed: {}", describe(&e))))?;
        let key = out.plaintext().ok_or_else(|| self.error("GenerateDataKey returned no key".into()))?;
        let blob = out.ciphertext_blob().ok_or_else(|| self.error("GenerateDataKey returned no ciphertext".into()))?;
        if key.as_ref().len() != 32 {
            return Err(self.error(format!("GenerateDataKey returned a {}-byte key", key.as_ref().len())));
        }
        Ok((Secret::new(key.as_ref().to_vec()), blob.as_ref().to_vec()))
    }

    fn wrap(&self, key: &Secret) -> Result<Vec<u8>, KeyError> {
        let out = self
            .rt
            .block_on(self.client.encrypt().key_id(&self.key_id).plaintext(Blob::new(key.expose().to_vec())).send())
            .map_err(|e| self.error(format!("Encrypt failed: {}", describe(&e))))?;
        Ok(out.ciphertext_blob().ok_or_else(|| self.error("Encrypt returned no ciphertext".into()))?.as_ref().to_vec())
    }

    fn unwrap(&self, blob: &[u8]) -> Result<Option<Secret>, KeyError> {
        let r = self.rt.block_on(self.client.decrypt().key_id(&self.key_id).ciphertext_blob(Blob::new(blob.to_vec())).send());
        match r {
            Ok(out) => {
                let key = out.plaintext().ok_or_else(|| self.error("Decrypt returned no key".into()))?;
                Ok(Some(Secret::new(key.as_ref().to_vec())))
            }
            Err(e) => {
                let msg = describe(&e);
                // Another key's ciphertext: this backend cannot open it (rotation may help).
                if msg.starts_with("IncorrectKeyException") || msg.starts_with("InvalidCiphertextException") {
                    Ok(None)
                } else {
                    Err(self.error(format!("Decrypt failed: {msg}")))
                }
            }
        }
    }
}
