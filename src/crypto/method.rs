use std::fmt;
use std::str::FromStr;

/// Data encryption method of one file. The CTR names and on-disk codes 1-5 follow TiKV's
/// `EncryptionMethod`, so operators who know TiKV read the same words here; the XTS methods
/// (IEEE 1619 over 4 KiB data units, docs/design.md §3) are tdefs' own, codes 6-8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Plaintext,
    Aes128Ctr,
    Aes192Ctr,
    Aes256Ctr,
    Sm4Ctr,
    Aes128Xts,
    Aes256Xts,
    Sm4Xts,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown encryption method {0:?}; allowed: {allowed}", allowed = Method::allowed_names())]
pub struct UnknownMethod(pub String);

impl Method {
    pub const ALL: [Method; 8] = [
        Method::Plaintext,
        Method::Aes128Ctr,
        Method::Aes192Ctr,
        Method::Aes256Ctr,
        Method::Sm4Ctr,
        Method::Aes128Xts,
        Method::Aes256Xts,
        Method::Sm4Xts,
    ];

    /// Key length in bytes (0 for plaintext). For XTS, the key pair K1 || K2 (data key, then
    /// tweak key), each the block cipher's key length.
    pub fn key_len(self) -> usize {
        match self {
            Method::Plaintext => 0,
            Method::Aes128Ctr | Method::Sm4Ctr => 16,
            Method::Aes192Ctr => 24,
            Method::Aes256Ctr | Method::Aes128Xts | Method::Sm4Xts => 32,
            Method::Aes256Xts => 64,
        }
    }

    pub fn is_plaintext(self) -> bool {
        self == Method::Plaintext
    }

    /// An XTS method: ranges are encrypted in 16-byte blocks (see `FileCipher::encrypt`).
    pub fn is_xts(self) -> bool {
        matches!(self, Method::Aes128Xts | Method::Aes256Xts | Method::Sm4Xts)
    }

    /// A stream method (CTR or plaintext): any byte range encrypts on its own, and
    /// encryption and decryption are the same XOR (`FileCipher::apply`).
    pub fn is_stream(self) -> bool {
        !self.is_xts()
    }

    /// The granularity of encryption: ranges passed to `FileCipher::encrypt`/`decrypt` start
    /// at a multiple of this and are a multiple of it long, except for a file's last bytes.
    /// 1 for stream methods, 16 for XTS.
    pub fn block_size(self) -> usize {
        if self.is_xts() {
            super::XTS_BLOCK
        } else {
            1
        }
    }

    /// The name used in configuration files and in output.
    pub fn name(self) -> &'static str {
        match self {
            Method::Plaintext => "plaintext",
            Method::Aes128Ctr => "aes128-ctr",
            Method::Aes192Ctr => "aes192-ctr",
            Method::Aes256Ctr => "aes256-ctr",
            Method::Sm4Ctr => "sm4-ctr",
            Method::Aes128Xts => "aes128-xts",
            Method::Aes256Xts => "aes256-xts",
            Method::Sm4Xts => "sm4-xts",
        }
    }

    /// Stable on-disk code (TiKV's numbering for 1-5; 0 is reserved for "unknown").
    pub fn code(self) -> u8 {
        match self {
            Method::Plaintext => 1,
            Method::Aes128Ctr => 2,
            Method::Aes192Ctr => 3,
            Method::Aes256Ctr => 4,
            Method::Sm4Ctr => 5,
            Method::Aes128Xts => 6,
            Method::Aes256Xts => 7,
            Method::Sm4Xts => 8,
        }
    }

    pub fn from_code(code: u8) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.code() == code)
    }

    /// Every method's name, for error messages: the encrypting ones, then plaintext.
    fn allowed_names() -> String {
        let mut names: Vec<&str> = Method::ALL.iter().filter(|m| !m.is_plaintext()).map(|m| m.name()).collect();
        names.push(Method::Plaintext.name());
        names.join(", ")
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = UnknownMethod;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // TiKV accepts these spellings too; keep an operator's existing config working.
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Method::ALL
            .into_iter()
            .find(|m| m.name() == norm)
            .ok_or_else(|| UnknownMethod(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>().unwrap(), m);
            assert_eq!(Method::from_code(m.code()), Some(m));
        }
        assert_eq!("AES256_CTR".parse::<Method>().unwrap(), Method::Aes256Ctr);
        assert_eq!("SM4_XTS".parse::<Method>().unwrap(), Method::Sm4Xts);
        assert!("aes256-gcm".parse::<Method>().is_err());
        assert_eq!(Method::from_code(0), None);
        assert_eq!(Method::from_code(9), None);
    }

    /// Codes are written to disk: TiKV's 1-5 never move, the XTS methods are 6, 7, 8.
    #[test]
    fn on_disk_codes_are_stable() {
        let codes: Vec<(&str, u8)> = Method::ALL.iter().map(|m| (m.name(), m.code())).collect();
        assert_eq!(codes, [
            ("plaintext", 1), ("aes128-ctr", 2), ("aes192-ctr", 3), ("aes256-ctr", 4), ("sm4-ctr", 5),
            ("aes128-xts", 6), ("aes256-xts", 7), ("sm4-xts", 8),
        ]);
    }

    #[test]
    fn xts_key_pairs_and_predicates() {
        assert_eq!(Method::Aes128Xts.key_len(), 32);
        assert_eq!(Method::Aes256Xts.key_len(), 64);
        assert_eq!(Method::Sm4Xts.key_len(), 32);
        for m in Method::ALL {
            let xts = m.name().ends_with("-xts");
            assert_eq!(m.is_xts(), xts, "{m}");
            assert_eq!(m.is_stream(), !xts, "{m}");
            assert_eq!(m.block_size(), if xts { 16 } else { 1 }, "{m}");
        }
    }

    #[test]
    fn unknown_name_lists_every_method() {
        let e = "aes256-gcm".parse::<Method>().unwrap_err().to_string();
        for m in Method::ALL {
            assert!(e.contains(m.name()), "{e}");
        }
        assert!(e.starts_with("unknown encryption method \"aes256-gcm\"; allowed: aes128-ctr,"), "{e}");
        assert!(e.ends_with(", sm4-xts, plaintext"), "{e}");
    }
}
