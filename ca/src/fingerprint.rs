//! SHA-256 fingerprints, written `SHA256:` + lowercase hex.
use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    pub fn of(der: &[u8]) -> Self {
        let d = ring::digest::digest(&ring::digest::SHA256, der);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        Self(out)
    }
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
    /// Constant-time comparison (fingerprints are compared against pinned values).
    pub fn matches(&self, other: &Fingerprint) -> bool {
        ring_ct_eq(&self.0, &other.0)
    }
}

fn ring_ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SHA256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a SHA-256 fingerprint: expected `SHA256:` followed by 64 hex digits (colons allowed)")]
pub struct InvalidFingerprint;

impl FromStr for Fingerprint {
    type Err = InvalidFingerprint;
    /// Accepts `SHA256:abcd...`, `sha256:AB:CD:...` and bare hex, any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let t = match t.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("sha256:") => &t[7..],
            _ => t,
        };
        let digits: String = t.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(digits).map_err(|_| InvalidFingerprint)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| InvalidFingerprint)?;
        Ok(Self(arr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        let f = Fingerprint::of(b"abc");
        let s = f.to_string();
        assert_eq!(
            s,
            "SHA256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(s.parse::<Fingerprint>().unwrap(), f);
        let colons = "BA:78:16:BF:8F:01:CF:EA:41:41:40:DE:5D:AE:22:23:B0:03:61:A3:96:17:7A:9C:B4:10:FF:61:F2:00:15:AD";
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(
            format!("sha256:{}", f.hex())
                .parse::<Fingerprint>()
                .unwrap(),
            f
        );
        assert!("SHA256:abcd".parse::<Fingerprint>().is_err());
        assert!(f.matches(&f));
        assert!(!f.matches(&Fingerprint::of(b"abd")));
    }
}
