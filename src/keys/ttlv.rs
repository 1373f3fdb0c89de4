//! KMIP's TTLV encoding (KMIP 1.x §9.1), only what the KMIP master-key backend sends and
//! reads. Written here because no maintained Rust KMIP client offers Encrypt and Decrypt:
//! `kmip-protocol` covers the signing operations Krill needs, `cosmian_kmip` models its own
//! KMS server. Each item is a 3-byte tag, a type byte, a 4-byte big-endian length and the
//! value, padded with zeros to a multiple of 8 bytes.

use zeroize::Zeroizing;

pub mod tag {
    pub const ATTRIBUTE: u32 = 0x420008;
    pub const ATTRIBUTE_NAME: u32 = 0x42000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
    pub const BATCH_COUNT: u32 = 0x42000D;
    pub const BATCH_ITEM: u32 = 0x42000F;
    pub const BLOCK_CIPHER_MODE: u32 = 0x420011;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
    pub const IV_COUNTER_NONCE: u32 = 0x42003D;
    pub const NAME_TYPE: u32 = 0x420054;
    pub const NAME_VALUE: u32 = 0x420055;
    pub const OPERATION: u32 = 0x42005C;
    pub const PADDING_METHOD: u32 = 0x42005F;
    pub const PROTOCOL_VERSION: u32 = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
    pub const REQUEST_HEADER: u32 = 0x420077;
    pub const REQUEST_MESSAGE: u32 = 0x420078;
    pub const REQUEST_PAYLOAD: u32 = 0x420079;
    pub const RESPONSE_MESSAGE: u32 = 0x42007B;
    pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
    pub const RESULT_MESSAGE: u32 = 0x42007D;
    pub const RESULT_REASON: u32 = 0x42007E;
    pub const RESULT_STATUS: u32 = 0x42007F;
    pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
    pub const DATA: u32 = 0x4200C2;
    pub const RANDOM_IV: u32 = 0x4200C5;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Struct(Vec<Item>),
    Int(i32),
    Long(i64),
    /// Kept as its two's-complement bytes: nothing here reads one.
    BigInt(Vec<u8>),
    Enum(u32),
    Bool(bool),
    Text(String),
    /// Zeroized on drop: Encrypt requests and Decrypt responses carry key material.
    Bytes(Zeroizing<Vec<u8>>),
    /// Seconds since the epoch.
    DateTime(i64),
    /// Seconds.
    Interval(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub tag: u32,
    pub value: Value,
}

pub fn st(tag: u32, items: Vec<Item>) -> Item {
    Item { tag, value: Value::Struct(items) }
}
pub fn int(tag: u32, v: i32) -> Item {
    Item { tag, value: Value::Int(v) }
}
pub fn enumeration(tag: u32, v: u32) -> Item {
    Item { tag, value: Value::Enum(v) }
}
pub fn boolean(tag: u32, v: bool) -> Item {
    Item { tag, value: Value::Bool(v) }
}
pub fn text(tag: u32, v: &str) -> Item {
    Item { tag, value: Value::Text(v.to_string()) }
}
pub fn bytes(tag: u32, v: &[u8]) -> Item {
    Item { tag, value: Value::Bytes(Zeroizing::new(v.to_vec())) }
}

/// Bytes after the 8-byte tag/type/length header, before the value's padding.
pub const HEADER: usize = 8;

impl Item {
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&self.tag.to_be_bytes()[1..]);
        let ty: u8 = match &self.value {
            Value::Struct(_) => 0x01,
            Value::Int(_) => 0x02,
            Value::Long(_) => 0x03,
            Value::BigInt(_) => 0x04,
            Value::Enum(_) => 0x05,
            Value::Bool(_) => 0x06,
            Value::Text(_) => 0x07,
            Value::Bytes(_) => 0x08,
            Value::DateTime(_) => 0x09,
            Value::Interval(_) => 0x0A,
        };
        out.push(ty);
        out.extend_from_slice(&[0; 4]); // length, filled in below
        let body = out.len();
        match &self.value {
            Value::Struct(items) => items.iter().for_each(|i| i.encode(out)),
            Value::Int(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Long(v) | Value::DateTime(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Enum(v) | Value::Interval(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Bool(v) => out.extend_from_slice(&u64::from(*v).to_be_bytes()),
            Value::Text(s) => out.extend_from_slice(s.as_bytes()),
            Value::Bytes(b) => out.extend_from_slice(b),
            Value::BigInt(b) => out.extend_from_slice(b),
        }
        let len = (out.len() - body) as u32;
        out[start + 4..start + 8].copy_from_slice(&len.to_be_bytes());
        out.resize(out.len() + (8 - len as usize % 8) % 8, 0);
    }

    pub fn to_bytes(&self) -> Zeroizing<Vec<u8>> {
        let mut v = Zeroizing::new(Vec::new());
        self.encode(&mut v);
        v
    }

    /// The item at the start of `buf` and the bytes it takes (with its padding).
    pub fn decode(buf: &[u8]) -> Result<(Item, usize), String> {
        if buf.len() < HEADER {
            return Err(format!("truncated TTLV item ({} bytes)", buf.len()));
        }
        let tag = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]);
        let ty = buf[3];
        let len = u32::from_be_bytes(buf[4..8].try_into().unwrap()) as usize;
        let padded = len.div_ceil(8) * 8;
        let v = buf.get(HEADER..HEADER + len).ok_or_else(|| format!("TTLV item {tag:06X} of {len} bytes is truncated"))?;
        let fixed = |n: usize| -> Result<&[u8], String> {
            (len == n).then_some(v).ok_or_else(|| format!("TTLV item {tag:06X} of type {ty} has length {len}, not {n}"))
        };
        let value = match ty {
            0x01 => {
                let mut items = Vec::new();
                let mut at = 0;
                while at < len {
                    let (i, n) = Item::decode(&v[at..])?;
                    items.push(i);
                    at += n;
                }
                if at != len {
                    return Err(format!("TTLV structure {tag:06X} overruns its length"));
                }
                Value::Struct(items)
            }
            0x02 => Value::Int(i32::from_be_bytes(fixed(4)?.try_into().unwrap())),
            0x03 => Value::Long(i64::from_be_bytes(fixed(8)?.try_into().unwrap())),
            0x04 => Value::BigInt(v.to_vec()),
            0x05 => Value::Enum(u32::from_be_bytes(fixed(4)?.try_into().unwrap())),
            0x06 => Value::Bool(u64::from_be_bytes(fixed(8)?.try_into().unwrap()) != 0),
            0x07 => Value::Text(String::from_utf8(v.to_vec()).map_err(|_| format!("TTLV text {tag:06X} is not UTF-8"))?),
            0x08 => Value::Bytes(Zeroizing::new(v.to_vec())),
            0x09 => Value::DateTime(i64::from_be_bytes(fixed(8)?.try_into().unwrap())),
            0x0A => Value::Interval(u32::from_be_bytes(fixed(4)?.try_into().unwrap())),
            _ => return Err(format!("TTLV item {tag:06X} has unknown type {ty:#04x}")),
        };
        if padded > buf.len() - HEADER {
            return Err(format!("TTLV item {tag:06X} lacks its padding"));
        }
        Ok((Item { tag, value }, HEADER + padded))
    }

    /// The first child with `tag` of a structure.
    pub fn child(&self, tag: u32) -> Option<&Item> {
        match &self.value {
            Value::Struct(items) => items.iter().find(|i| i.tag == tag),
            _ => None,
        }
    }

    pub fn children(&self, tag: u32) -> impl Iterator<Item = &Item> {
        let items: &[Item] = match &self.value {
            Value::Struct(items) => items,
            _ => &[],
        };
        items.iter().filter(move |i| i.tag == tag)
    }

    pub fn as_enum(&self) -> Option<u32> {
        match self.value {
            Value::Enum(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match &self.value {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bytes(&self) -> Option<&[u8]> {
        match &self.value {
            Value::Bytes(b) => Some(b),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        hex::decode(s.replace([' ', '|'], "")).unwrap()
    }

    fn roundtrip(item: Item, expect: &str) {
        let want = hex(expect);
        assert_eq!(hex::encode(&*item.to_bytes()), hex::encode(&want), "{item:?}");
        let (back, n) = Item::decode(&want).unwrap();
        assert_eq!(n, want.len());
        assert_eq!(back, item);
    }

    /// The encoding examples of the KMIP 1.x specification, §9.1.2.
    #[test]
    fn kmip_spec_examples() {
        roundtrip(int(0x420020, 8), "42 00 20 | 02 | 00 00 00 04 | 00 00 00 08 00 00 00 00");
        roundtrip(
            Item { tag: 0x420020, value: Value::Long(123456789000000000) },
            "42 00 20 | 03 | 00 00 00 08 | 01 B6 9B 4B A5 74 92 00",
        );
        roundtrip(enumeration(0x420020, 255), "42 00 20 | 05 | 00 00 00 04 | 00 00 00 FF 00 00 00 00");
        roundtrip(boolean(0x420020, true), "42 00 20 | 06 | 00 00 00 08 | 00 00 00 00 00 00 00 01");
        roundtrip(
            text(0x420020, "Hello World"),
            "42 00 20 | 07 | 00 00 00 0B | 48 65 6C 6C 6F 20 57 6F 72 6C 64 00 00 00 00 00",
        );
        roundtrip(bytes(0x420020, &[1, 2, 3]), "42 00 20 | 08 | 00 00 00 03 | 01 02 03 00 00 00 00 00");
        // Friday, March 14, 2008, 11:56:40 GMT
        roundtrip(Item { tag: 0x420020, value: Value::DateTime(0x47DA67F8) }, "42 00 20 | 09 | 00 00 00 08 | 00 00 00 00 47 DA 67 F8");
        // 10 days
        roundtrip(Item { tag: 0x420020, value: Value::Interval(864000) }, "42 00 20 | 0A | 00 00 00 04 | 00 0D 2F 00 00 00 00 00");
        roundtrip(
            st(0x420020, vec![enumeration(0x420004, 254), int(0x420005, 255)]),
            "42 00 20 | 01 | 00 00 00 20 | 42 00 04 | 05 | 00 00 00 04 | 00 00 00 FE 00 00 00 00 | \
             42 00 05 | 02 | 00 00 00 04 | 00 00 00 FF 00 00 00 00",
        );
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let good = st(0x420020, vec![text(0x420055, "tdefs"), bytes(0x4200C2, &[9; 20])]).to_bytes();
        for cut in 0..good.len() {
            assert!(Item::decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = good.to_vec();
        bad[3] = 0x0F; // unknown type
        assert!(Item::decode(&bad).unwrap_err().contains("unknown type"));
        let mut bad = good.to_vec();
        bad[7] = 0xF8; // structure longer than the buffer
        assert!(Item::decode(&bad).is_err());
        assert!(Item::decode(&hex("42 00 20 | 02 | 00 00 00 05 | 00 00 00 08 00 00 00 00")).unwrap_err().contains("not 4"));
    }
}
