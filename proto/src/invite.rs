//! Enrollment invitations: one line an administrator hands to a user.
//!
//! ```text
//! zerospice-invite:v1:alice@10.147.17.5:7444/SHA256:<64 hex digits>
//! ```
//! It names the user, the gateway's enrollment address, and the SHA-256 fingerprint of the
//! gateway's CA certificate, which the enrolling client pins: a gateway presenting any other CA
//! is refused before anything is sent. It carries no secret (the TOTP code is the secret), and
//! is readable, so a user can compare the fingerprint with what the administrator says.
use std::fmt;
use std::str::FromStr;

pub const PREFIX: &str = "zerospice-invite:v1:";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invitation {
    pub user: String,
    /// `host:port` of the enrollment endpoint (IPv6 hosts in brackets).
    pub gateway: String,
    /// SHA-256 of the gateway CA certificate (DER).
    pub ca_fingerprint: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InviteError {
    #[error("not a ZeroSpice invitation (it should start with {PREFIX})")]
    Prefix,
    #[error("the invitation is damaged: {0} (copy it again, in one piece)")]
    Damaged(&'static str),
}

impl Invitation {
    /// The CA fingerprint as `SHA256:<hex>`.
    pub fn fingerprint_text(&self) -> String {
        format!("SHA256:{}", hex::encode(self.ca_fingerprint))
    }
}

impl fmt::Display for Invitation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{PREFIX}{}@{}/{}",
            self.user,
            self.gateway,
            self.fingerprint_text()
        )
    }
}

impl FromStr for Invitation {
    type Err = InviteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let rest = s.strip_prefix(PREFIX).ok_or(InviteError::Prefix)?;
        let (left, fp) = rest
            .rsplit_once('/')
            .ok_or(InviteError::Damaged("no CA fingerprint"))?;
        let hex_part = fp.strip_prefix("SHA256:").ok_or(InviteError::Damaged(
            "the CA fingerprint must start with SHA256:",
        ))?;
        let bytes =
            hex::decode(hex_part).map_err(|_| InviteError::Damaged("bad CA fingerprint"))?;
        let ca_fingerprint: [u8; 32] = bytes
            .try_into()
            .map_err(|_| InviteError::Damaged("the CA fingerprint has the wrong length"))?;
        let (user, gateway) = left
            .split_once('@')
            .ok_or(InviteError::Damaged("no user name"))?;
        if user.is_empty() {
            return Err(InviteError::Damaged("no user name"));
        }
        if !is_host_port(gateway) {
            return Err(InviteError::Damaged("bad gateway address"));
        }
        Ok(Self {
            user: user.to_owned(),
            gateway: gateway.to_owned(),
            ca_fingerprint,
        })
    }
}

fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    };
    host_ok && port.parse::<u16>().is_ok_and(|p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let inv = Invitation {
            user: "alice".into(),
            gateway: "10.147.17.5:7444".into(),
            ca_fingerprint: [0xab; 32],
        };
        let s = inv.to_string();
        assert_eq!(
            s,
            format!(
                "zerospice-invite:v1:alice@10.147.17.5:7444/SHA256:{}",
                "ab".repeat(32)
            )
        );
        assert_eq!(s.parse::<Invitation>().unwrap(), inv);
        assert_eq!(format!("  {s}\n").parse::<Invitation>().unwrap(), inv);
        let v6 = Invitation {
            gateway: "[fd00::5]:7444".into(),
            ..inv
        };
        assert_eq!(v6.to_string().parse::<Invitation>().unwrap(), v6);
    }

    #[test]
    fn damaged_invitations_say_so() {
        let good = format!(
            "zerospice-invite:v1:alice@gw.lan:7444/SHA256:{}",
            "ab".repeat(32)
        );
        assert!(good.parse::<Invitation>().is_ok());
        let e = |s: &str| s.parse::<Invitation>().unwrap_err().to_string();
        assert_eq!(
            e("https://x"),
            "not a ZeroSpice invitation (it should start with zerospice-invite:v1:)"
        );
        assert!(e(&good[..good.len() - 2]).contains("wrong length"));
        assert!(e(&good.replace("@", "")).contains("no user name"));
        assert!(e(&good.replace(":7444", "")).contains("bad gateway address"));
        assert!(e(&good.replace(":7444", ":0")).contains("bad gateway address"));
        assert!(e(&good.replace("gw.lan", "gw lan")).contains("bad gateway address"));
        assert!(e(&good.replace("SHA256:", "MD5:")).contains("SHA256"));
    }
}
