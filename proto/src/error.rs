//! Error codes on the wire and QUIC close codes.
//!
//! A remote caller gets a code and a human message chosen by the gateway. Messages are precise
//! about what the caller can fix and silent about what would help an attacker: an unknown user
//! and a wrong code give the same answer (the gateway's audit log says which).
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message could not be decoded (bad frame, bad JSON, wrong field).
    BadRequest,
    /// The client speaks a protocol version the gateway does not.
    UnsupportedVersion,
    /// Wrong, expired or already used code, or unknown user (deliberately indistinguishable).
    WrongCode,
    /// Too many failures: `retry_after_secs` says when to try again.
    RateLimited,
    /// The CSR or proof of possession is unacceptable.
    BadCsr,
    /// A user or device name is not acceptable.
    BadName,
    /// The user's policy requires a hardware-held key.
    HardwareKeyRequired,
    /// The hardware attestation failed verification or a key policy rule.
    AttestationRejected,
    /// The VM does not exist or is not available to this user (deliberately indistinguishable).
    NotAllowed,
    /// The VM cannot be opened in its current state (stopped, no SPICE display).
    VmUnavailable,
    /// Another user or device has the VM's console open.
    VmInUse,
    /// No such session for this certificate (unknown, ended, or another certificate's).
    SessionUnknown,
    /// The session's window for opening channels has passed.
    SessionExpired,
    /// The CONNECT request does not target the session's ticket.
    ConnectMismatch,
    /// Proxmox could not be reached or did not answer in time.
    ProxmoxUnavailable,
    /// Proxmox refused or failed the request (details are in the gateway log).
    ProxmoxError,
    /// The Proxmox spiceproxy refused the channel.
    SpiceProxyRefused,
    /// The certificate has been revoked.
    CertificateRevoked,
    /// The gateway is at a limit (connections, sessions).
    Busy,
    /// Something failed inside the gateway (details are in its log).
    Internal,
    /// A code this build does not know (a newer gateway).
    #[serde(other)]
    Unknown,
}

/// An error as a remote caller sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self {
            code: ErrorCode::RateLimited,
            message: format!(
                "too many attempts, retry after {}",
                human_duration(retry_after_secs)
            ),
            retry_after_secs: Some(retry_after_secs),
        }
    }

    pub fn bad_request(detail: impl fmt::Display) -> Self {
        Self::new(ErrorCode::BadRequest, format!("bad request: {detail}"))
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for WireError {}

/// "45 s", "4 min", "2 h": rounded up so a user never retries too early.
pub fn human_duration(secs: u64) -> String {
    if secs < 60 {
        format!("{} s", secs.max(1))
    } else if secs < 3600 {
        format!("{} min", secs.div_ceil(60))
    } else {
        format!("{} h", secs.div_ceil(3600))
    }
}

/// QUIC application close codes of the access endpoint; the close reason carries a sentence.
pub mod close {
    /// Normal end (the client is done).
    pub const NORMAL: u32 = 0;
    /// The certificate is not known to the gateway (or its user is gone).
    pub const CERTIFICATE_UNKNOWN: u32 = 0x10;
    /// The certificate has been revoked.
    pub const CERTIFICATE_REVOKED: u32 = 0x11;
    /// The certificate has expired.
    pub const CERTIFICATE_EXPIRED: u32 = 0x12;
    /// Too many connections with this certificate.
    pub const TOO_MANY_CONNECTIONS: u32 = 0x13;
    /// The gateway is shutting down.
    pub const SHUTDOWN: u32 = 0x14;
    /// The peer broke the protocol.
    pub const PROTOCOL_ERROR: u32 = 0x20;
}

/// QUIC stream reset/stop codes.
pub mod stream {
    /// The stream was refused or broken by an error already reported in a frame.
    pub const ERROR: u32 = 1;
    /// The other side of a tunnelled channel closed with an error.
    pub const PEER_RESET: u32 = 2;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_snake_case_and_unknown_codes_do_not_break_old_clients() {
        let e = WireError::new(ErrorCode::WrongCode, "wrong or expired code");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"code":"wrong_code","message":"wrong or expired code"}"#
        );
        let future: WireError =
            serde_json::from_str(r#"{"code":"quantum_flux","message":"x"}"#).unwrap();
        assert_eq!(future.code, ErrorCode::Unknown);
    }

    #[test]
    fn rate_limit_message_rounds_up() {
        assert_eq!(
            WireError::rate_limited(181).message,
            "too many attempts, retry after 4 min"
        );
        assert_eq!(human_duration(0), "1 s");
        assert_eq!(human_duration(59), "59 s");
        assert_eq!(human_duration(60), "1 min");
        assert_eq!(human_duration(3601), "2 h");
    }
}
