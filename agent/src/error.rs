//! What can go wrong for an agent, in words a user can act on.
use zerospice_enroll::profile::ProfileError;
use zerospice_proto::error::close;
use zerospice_proto::{ErrorCode, WireError};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("{0}")]
    Key(String),
    #[error("your certificate expired on {0}: enroll again with a new code (zerospice-enroll)")]
    CertificateExpired(String),
    #[error("cannot resolve the gateway address {addr}: {detail}")]
    Resolve { addr: String, detail: String },
    #[error("no answer from the gateway at {addr} within {secs} s: check that ZeroTier is connected and that the gateway runs")]
    Timeout { addr: String, secs: u64 },
    /// The gateway closed the connection with a reason of its own (revoked, unknown, ...).
    #[error("the gateway refused this device: {message}")]
    Refused { code: u32, message: String },
    /// The TLS handshake failed on the gateway's side (it refused the certificate).
    #[error("the gateway refused your certificate ({alert}): {hint}")]
    CertificateRefused { alert: String, hint: String },
    /// The TLS handshake failed on our side (the gateway is not the one we enrolled with).
    #[error("the gateway at {addr} could not be verified: {detail}. It does not hold the CA you enrolled with: check the address, or enroll again")]
    GatewayUnverified { addr: String, detail: String },
    #[error("the connection to the gateway was lost: {0}")]
    Lost(String),
    /// The gateway answered a request with an error.
    #[error("{0}")]
    Gateway(WireError),
    #[error("the gateway broke the protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Local(String),
}

impl AgentError {
    /// The wire error code, if the gateway answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            AgentError::Gateway(e) => Some(e.code),
            _ => None,
        }
    }

    /// Maps a QUIC connection error; `addr` names the gateway in messages.
    pub fn from_connection(e: &quinn::ConnectionError, addr: &str) -> Self {
        use quinn::ConnectionError as C;
        match e {
            C::ApplicationClosed(a) => {
                let code = u32::try_from(a.error_code.into_inner()).unwrap_or(u32::MAX);
                let message = String::from_utf8_lossy(&a.reason)
                    .chars()
                    .filter(|c| !c.is_control())
                    .collect::<String>();
                let message = if message.is_empty() {
                    match code {
                        close::SHUTDOWN => "the gateway is shutting down".into(),
                        _ => format!("closed with code {code}"),
                    }
                } else {
                    message
                };
                AgentError::Refused { code, message }
            }
            C::ConnectionClosed(c) => {
                let raw = u64::from(c.error_code);
                match raw.checked_sub(0x100).filter(|a| *a < 0x100) {
                    Some(alert) => {
                        let (name, hint) = alert_text(alert as u8);
                        AgentError::CertificateRefused {
                            alert: name.to_owned(),
                            hint: hint.to_owned(),
                        }
                    }
                    None => AgentError::Lost(c.to_string()),
                }
            }
            C::TimedOut => AgentError::Timeout {
                addr: addr.to_owned(),
                secs: 10,
            },
            C::TransportError(t) => {
                let raw = u64::from(t.code);
                if (0x100..0x200).contains(&raw) {
                    AgentError::GatewayUnverified {
                        addr: addr.to_owned(),
                        detail: t.reason.clone(),
                    }
                } else {
                    AgentError::Lost(t.to_string())
                }
            }
            other => AgentError::Lost(other.to_string()),
        }
    }
}

/// TLS alert names (RFC 8446 section 6) with what the user can do.
pub fn alert_text(alert: u8) -> (&'static str, &'static str) {
    match alert {
        42 | 43 | 46 => (
            "bad certificate",
            "it is not a ZeroSpice client certificate of this gateway; enroll again",
        ),
        44 => (
            "certificate revoked",
            "ask your administrator for a new enrollment code",
        ),
        45 => (
            "certificate expired",
            "enroll again with a new code (zerospice-enroll)",
        ),
        48 => (
            "unknown CA",
            "your certificate was issued by another gateway's CA; enroll with this gateway",
        ),
        116 => (
            "certificate required",
            "this gateway accepts only enrolled devices: run zerospice-enroll first",
        ),
        120 => (
            "no application protocol",
            "the gateway speaks another ZeroSpice protocol version: update zerospice-agent",
        ),
        _ => (
            "handshake failure",
            "the gateway refused the connection; see its log",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_have_names_and_hints() {
        assert_eq!(alert_text(45).0, "certificate expired");
        assert_eq!(alert_text(48).0, "unknown CA");
        assert_eq!(alert_text(116).0, "certificate required");
        assert_eq!(alert_text(0).0, "handshake failure");
        let e = AgentError::CertificateRefused {
            alert: alert_text(42).0.into(),
            hint: alert_text(42).1.into(),
        };
        assert_eq!(
            e.to_string(),
            "the gateway refused your certificate (bad certificate): it is not a ZeroSpice client certificate of this gateway; enroll again"
        );
    }
}
