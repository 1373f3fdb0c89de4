//! Cryptographic primitives: the per-file ciphers that encrypt user data (CTR stream ciphers
//! and XTS), and the AES-256-GCM sealing that protects metadata. Nothing here touches the filesystem.

mod ctr;
mod method;
mod seal;
mod secret;
mod sm4;
mod xts;

pub use self::ctr::FileCipher;
pub use self::method::{Method, UnknownMethod};
pub use self::seal::{AuthError, SealKey, SealKeys, SEAL_OVERHEAD};
pub use self::secret::{random_bytes, random_u64, Secret};
pub use self::xts::{XTS_BLOCK, XTS_DATA_UNIT};

/// Length of the per-file IV (one AES/SM4 block: the initial counter).
pub const IV_LEN: usize = 16;
/// Per-file random IV.
pub type Iv = [u8; IV_LEN];

/// A fresh random IV from the OS CSPRNG.
pub fn random_iv() -> Iv {
    let mut iv = [0u8; IV_LEN];
    random_bytes(&mut iv);
    iv
}

/// The crypto implementations this binary links and which of their code paths this CPU
/// runs, for `tdefs --version` (an auditor's first question, and a slow mount's).
pub fn backends() -> Vec<String> {
    #[cfg(target_arch = "x86_64")]
    let aes_ni = std::arch::is_x86_feature_detected!("aes");
    #[cfg(not(target_arch = "x86_64"))]
    let aes_ni = false;
    let aes_path = if aes_ni { "AES-NI" } else { "constant-time software (no AES instructions on this CPU)" };
    let sm4_path = match sm4::Backend::detect() {
        sm4::Backend::Portable => "portable bitsliced S-box",
        #[cfg(target_arch = "x86_64")]
        sm4::Backend::AesNi => "AES-NI S-box",
        #[cfg(target_arch = "x86_64")]
        sm4::Backend::Avx2 => "AVX2 + AES-NI S-box",
    };
    vec![
        format!("AES: RustCrypto aes {}, {aes_path}", env!("TDEFS_VERSION_AES")),
        format!("CTR: RustCrypto ctr {} (aes*-ctr), tdefs' SM4 (sm4-ctr)", env!("TDEFS_VERSION_CTR")),
        "XTS: tdefs' IEEE 1619 mode over those block ciphers, 4 KiB data units (*-xts)".to_string(),
        format!("SM4: tdefs' constant-time SM4, {sm4_path}"),
        format!(
            "metadata: AES-256-GCM (RustCrypto aes-gcm {}), HKDF-SHA256 (hkdf {})",
            env!("TDEFS_VERSION_AES_GCM"),
            env!("TDEFS_VERSION_HKDF")
        ),
    ]
}
