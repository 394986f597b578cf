//! Certificate serial numbers, written one way and read in any usual spelling.
use std::fmt;
use std::str::FromStr;

/// A certificate serial as its minimal big-endian magnitude (no leading zero bytes).
/// Displays as lowercase hex without separators, the form stored in the database.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// From the raw DER INTEGER content (a leading 0x00 sign byte is dropped).
    pub fn from_be_bytes(bytes: &[u8]) -> Self {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        Self(bytes[start..].to_vec())
    }
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// `ab:cd:...`, as `openssl x509 -serial` and most tools print it.
    pub fn colon_hex(&self) -> String {
        self.0
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("00");
        }
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a certificate serial: expected hex digits, optionally with ':' or spaces between bytes")]
pub struct InvalidSerial(pub String);

impl FromStr for Serial {
    type Err = InvalidSerial;
    /// Accepts `0A1B2C`, `0a:1b:2c`, `0x0a1b2c`, `serial=0A1B2C` (openssl), any case, and an odd
    /// number of digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || InvalidSerial(s.chars().take(80).collect());
        let t = s.trim();
        let t = t.strip_prefix("serial=").unwrap_or(t);
        let t = t
            .strip_prefix("0x")
            .or_else(|| t.strip_prefix("0X"))
            .unwrap_or(t);
        let digits: String = t
            .chars()
            .filter(|c| !matches!(c, ':' | ' ' | '-'))
            .collect();
        if digits.is_empty() || digits.len() > 128 || !digits.chars().all(|c| c.is_ascii_hexdigit())
        {
            return Err(err());
        }
        let padded = if digits.len() % 2 == 1 {
            format!("0{digits}")
        } else {
            digits
        };
        let bytes = hex::decode(padded).map_err(|_| err())?;
        Ok(Serial::from_be_bytes(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_usual_spelling_parses_to_the_same_serial() {
        let want = Serial::from_be_bytes(&[0x00, 0x8a, 0x01, 0xff]);
        for s in [
            "8a01ff",
            "8A01FF",
            "8a:01:ff",
            "8A:01:FF",
            "008a01ff",
            "00:8a:01:ff",
            "0x8a01ff",
            "serial=8A01FF",
            " 8a 01 ff ",
        ] {
            assert_eq!(s.parse::<Serial>().unwrap(), want, "{s}");
        }
        assert_eq!(want.to_string(), "8a01ff");
        assert_eq!(want.colon_hex(), "8a:01:ff");
        assert_eq!("abc".parse::<Serial>().unwrap().to_string(), "0abc");
    }

    #[test]
    fn garbage_is_refused() {
        for s in ["", "xyz", "12g4", "::", &"a".repeat(200)] {
            assert!(s.parse::<Serial>().is_err(), "{s}");
        }
    }
}
