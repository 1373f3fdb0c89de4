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
