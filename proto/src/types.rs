//! Identifiers that exist only once checked ("parse, don't validate").
use serde::{Deserialize, Deserializer, Serialize};
use std::fmt;
use std::str::FromStr;

/// A Proxmox VM id: an integer 100..=999_999_999, as Proxmox allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct VmId(u32);

impl VmId {
    pub const MIN: u32 = 100;
    pub const MAX: u32 = 999_999_999;

    pub fn new(id: u32) -> Result<Self, InvalidVmId> {
        if (Self::MIN..=Self::MAX).contains(&id) {
            Ok(Self(id))
        } else {
            Err(InvalidVmId(id.to_string()))
        }
    }
    pub fn get(self) -> u32 {
        self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM id {0:?}: a Proxmox VM id is a number from 100 to 999999999")]
pub struct InvalidVmId(pub String);

impl FromStr for VmId {
    type Err = InvalidVmId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n: u32 = s.trim().parse().map_err(|_| InvalidVmId(s.to_owned()))?;
        Self::new(n).map_err(|_| InvalidVmId(s.to_owned()))
    }
}

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<'de> Deserialize<'de> for VmId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        VmId::new(n).map_err(serde::de::Error::custom)
    }
}

/// A session id chosen by the gateway: 16 random bytes, written as 32 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct SessionId(String);

impl SessionId {
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(hex::encode(bytes))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.0)
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid session id: expected 32 lowercase hex digits")]
pub struct InvalidSessionId;

impl FromStr for SessionId {
    type Err = InvalidSessionId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidSessionId)
        }
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmid_bounds() {
        assert!(VmId::new(99).is_err());
        assert_eq!(VmId::new(100).unwrap().get(), 100);
        assert!(VmId::new(1_000_000_000).is_err());
        assert_eq!("  101 ".parse::<VmId>().unwrap().get(), 101);
        assert!("abc".parse::<VmId>().is_err());
        assert!(serde_json::from_str::<VmId>("5").is_err());
        assert_eq!(serde_json::from_str::<VmId>("100").unwrap().get(), 100);
    }

    #[test]
    fn session_id_shape() {
        let id = SessionId::from_bytes([0xab; 16]);
        assert_eq!(id.as_str(), "abababababababababababababababab");
        assert_eq!(id.as_str().parse::<SessionId>().unwrap(), id);
        assert!("ABABABABABABABABABABABABABABABAB"
            .parse::<SessionId>()
            .is_err());
        assert!("abab".parse::<SessionId>().is_err());
        assert!(serde_json::from_str::<SessionId>("\"../../etc/passwd\"").is_err());
    }
}
