//! Short names from SHA-256: the keys in the names of databases, servers, images,
//! directories and records, which must stay the same from release to release (a
//! change renames what earlier runs left).

use sha2::{Digest, Sha256};

/// `bytes` in lowercase hex, two digits each.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(2 * bytes.len());
    for b in bytes {
        text.push(char::from(DIGITS[usize::from(b >> 4)]));
        text.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    text
}

/// The first `bytes` bytes (at most 32) of the SHA-256 of `input`, in hex.
pub(crate) fn sha256_hex(input: impl AsRef<[u8]>, bytes: usize) -> String {
    hex(&Sha256::digest(input)[..bytes])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_is_two_lowercase_digits() {
        let all: Vec<u8> = (0..=255).collect();
        let expected: String = all.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex(&all), expected);
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn names_keep_the_keys_of_earlier_releases() {
        // SHA-256("abc"), as FIPS 180-2 gives it: the keys are its first bytes.
        let full = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex("abc", 32), full);
        assert_eq!(sha256_hex(b"abc", 8), full[..16]);
        assert_eq!(sha256_hex(String::from("abc"), 3), "ba7816");
    }
}
