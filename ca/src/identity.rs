//! Who a client certificate names.
//!
//! Called on certificates that already chained to the ZeroSpice CA (the TLS verifier did that);
//! this checks the profile on top, because a chain alone is not enough: rustls accepts a leaf
//! without any EKU, and the gateway's own server certificate chains to the same CA.
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authority::KeyProvenance;
use crate::names::{DeviceName, NameError, UserName};
use crate::{Fingerprint, Serial, URI_SCHEME};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: UserName,
    pub device: DeviceName,
    pub key: KeyProvenance,
    pub serial: Serial,
    /// SHA-256 of the DER certificate.
    pub fingerprint: Fingerprint,
    /// SHA-256 of the SubjectPublicKeyInfo: sessions are bound to the key, not only the serial.
    pub key_fingerprint: Fingerprint,
    pub not_before: i64,
    pub not_after: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    #[error("the certificate does not parse")]
    Malformed,
    #[error("the certificate is not for client authentication (no clientAuth extended key usage)")]
    NotClientAuth,
    #[error("a CA certificate cannot be used as a client certificate")]
    IsCa,
    #[error("the certificate names no ZeroSpice user and device")]
    NoIdentity,
    #[error("the certificate names more than one ZeroSpice identity")]
    Ambiguous,
    #[error("the certificate says nothing about how its key is held")]
    NoKeyProvenance,
    #[error("the certificate's identity is malformed: {0}")]
    BadName(#[from] NameError),
    #[error("the certificate's common name does not match its user")]
    CommonNameMismatch,
    #[error("the certificate expired at {0}")]
    Expired(String),
    #[error("the certificate is not valid before {0}")]
    NotYetValid(String),
}

/// `zerospice://user/<user>/device/<device>`
pub fn identity_uri(user: &UserName, device: &DeviceName) -> String {
    format!("{URI_SCHEME}user/{user}/device/{device}")
}

fn parse_identity_uri(uri: &str) -> Option<Result<(UserName, DeviceName), NameError>> {
    let rest = uri.strip_prefix(URI_SCHEME)?.strip_prefix("user/")?;
    let (user, device) = rest.split_once("/device/")?;
    Some(UserName::new(user).and_then(|u| Ok((u, DeviceName::new(device)?))))
}

fn parse_key_uri(uri: &str) -> Option<KeyProvenance> {
    let rest = uri.strip_prefix(URI_SCHEME)?.strip_prefix("key/")?;
    if rest == "software" {
        return Some(KeyProvenance::Software);
    }
    let serial = rest.strip_prefix("yubikey/")?;
    if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(KeyProvenance::Yubikey {
        serial: serial.parse().ok()?,
    })
}

impl Identity {
    pub fn from_der(der: &[u8]) -> Result<Self, IdentityError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::Malformed)?;
        if !rest.is_empty() {
            return Err(IdentityError::Malformed);
        }
        match cert.extended_key_usage() {
            Ok(Some(eku)) if eku.value.client_auth => {}
            Ok(_) => return Err(IdentityError::NotClientAuth),
            Err(_) => return Err(IdentityError::Malformed),
        }
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => return Err(IdentityError::IsCa),
            Ok(_) => {}
            Err(_) => return Err(IdentityError::Malformed),
        }
        let san = cert
            .subject_alternative_name()
            .map_err(|_| IdentityError::Malformed)?
            .ok_or(IdentityError::NoIdentity)?;
        let mut identity = None;
        let mut key = None;
        for name in &san.value.general_names {
            let GeneralName::URI(uri) = name else {
                continue;
            };
            if let Some(parsed) = parse_identity_uri(uri) {
                if identity.replace(parsed?).is_some() {
                    return Err(IdentityError::Ambiguous);
                }
            } else if let Some(k) = parse_key_uri(uri) {
                if key.replace(k).is_some() {
                    return Err(IdentityError::Ambiguous);
                }
            }
        }
        let (user, device) = identity.ok_or(IdentityError::NoIdentity)?;
        let key = key.ok_or(IdentityError::NoKeyProvenance)?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok());
        if cn != Some(user.as_str()) {
            return Err(IdentityError::CommonNameMismatch);
        }
        Ok(Self {
            user,
            device,
            key,
            serial: Serial::from_be_bytes(cert.raw_serial()),
            fingerprint: Fingerprint::of(der),
            key_fingerprint: Fingerprint::of(cert.public_key().raw),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// Checks the validity window at `now` (unix seconds).
    pub fn check_time(&self, now: i64) -> Result<(), IdentityError> {
        if now > self.not_after {
            return Err(IdentityError::Expired(format_unix(self.not_after)));
        }
        if now < self.not_before {
            return Err(IdentityError::NotYetValid(format_unix(self.not_before)));
        }
        Ok(())
    }
}

/// `2026-12-10 14:03 UTC`
pub fn format_unix(t: i64) -> String {
    let Ok(dt) = time::OffsetDateTime::from_unix_timestamp(t) else {
        return t.to_string();
    };
    let fmt = time::macros::format_description!("[year]-[month]-[day] [hour]:[minute] UTC");
    dt.format(&fmt).unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_parsing() {
        let (u, d) = parse_identity_uri("zerospice://user/alice/device/lap-1")
            .unwrap()
            .unwrap();
        assert_eq!((u.as_str(), d.as_str()), ("alice", "lap-1"));
        assert!(parse_identity_uri("zerospice://user/al,ice/device/x")
            .unwrap()
            .is_err());
        assert!(parse_identity_uri("zerospice://user/alice/device/a/b")
            .unwrap()
            .is_err());
        assert!(parse_identity_uri("https://user/alice/device/x").is_none());
        assert_eq!(
            parse_key_uri("zerospice://key/yubikey/12345678"),
            Some(KeyProvenance::Yubikey { serial: 12345678 })
        );
        assert_eq!(
            parse_key_uri("zerospice://key/software"),
            Some(KeyProvenance::Software)
        );
        assert_eq!(parse_key_uri("zerospice://key/yubikey/-1"), None);
        assert_eq!(parse_key_uri("zerospice://key/yubikey/99999999999"), None);
    }

    #[test]
    fn time_window() {
        assert_eq!(format_unix(0), "1970-01-01 00:00 UTC");
    }
}
