use std::fmt;
use std::str::FromStr;

/// Data encryption method of one file. Names and on-disk codes follow TiKV's
/// `EncryptionMethod`, so operators who know TiKV read the same words here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Method {
    Plaintext,
    Aes128Ctr,
    Aes192Ctr,
    Aes256Ctr,
    Sm4Ctr,
}

#[derive(Debug, thiserror::Error)]
#[error("unknown encryption method {0:?}; allowed: aes128-ctr, aes192-ctr, aes256-ctr, sm4-ctr, plaintext")]
pub struct UnknownMethod(pub String);

impl Method {
    pub const ALL: [Method; 5] = [
        Method::Plaintext,
        Method::Aes128Ctr,
        Method::Aes192Ctr,
        Method::Aes256Ctr,
        Method::Sm4Ctr,
    ];

    /// Key length in bytes (0 for plaintext).
    pub fn key_len(self) -> usize {
        match self {
            Method::Plaintext => 0,
            Method::Aes128Ctr | Method::Sm4Ctr => 16,
            Method::Aes192Ctr => 24,
            Method::Aes256Ctr => 32,
        }
    }

    pub fn is_plaintext(self) -> bool {
        self == Method::Plaintext
    }

    /// The name used in configuration files and in output.
    pub fn name(self) -> &'static str {
        match self {
            Method::Plaintext => "plaintext",
            Method::Aes128Ctr => "aes128-ctr",
            Method::Aes192Ctr => "aes192-ctr",
            Method::Aes256Ctr => "aes256-ctr",
            Method::Sm4Ctr => "sm4-ctr",
        }
    }

    /// Stable on-disk code (TiKV's numbering; 0 is reserved for "unknown").
    pub fn code(self) -> u8 {
        match self {
            Method::Plaintext => 1,
            Method::Aes128Ctr => 2,
            Method::Aes192Ctr => 3,
            Method::Aes256Ctr => 4,
            Method::Sm4Ctr => 5,
        }
    }

    pub fn from_code(code: u8) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.code() == code)
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
        assert!("aes256-gcm".parse::<Method>().is_err());
        assert_eq!(Method::from_code(0), None);
        assert_eq!(Method::from_code(6), None);
    }
}
