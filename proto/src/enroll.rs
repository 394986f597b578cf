//! Enrollment messages (ALPN `zerospice-enroll/1`).
//!
//! One bidirectional stream per attempt:
//! 1. client -> `Begin { version }`
//! 2. gateway -> `Challenge { nonce }` (32 fresh random bytes)
//! 3. client -> `Request(EnrollRequest)`: user, TOTP code, device, CSR, key claim, and a proof:
//!    the new key's signature over [`proof_message`] (nonce + CSR), which binds the key to this
//!    exchange so an old CSR or an old hardware attestation cannot be replayed.
//! 4. gateway -> `Issued(Enrolled)` or `Error(WireError)`.
use crate::{Redacted, WireError};
use serde::{Deserialize, Serialize};

/// Length of the gateway's challenge nonce.
pub const NONCE_LEN: usize = 32;

const PROOF_DOMAIN: &[u8] = b"zerospice enrollment proof v1\0";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    Begin { version: u32 },
    Request(EnrollRequest),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Challenge {
        #[serde(with = "crate::b64")]
        nonce: Vec<u8>,
    },
    Issued(Enrolled),
    Error(WireError),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub user: String,
    pub code: Redacted<String>,
    pub device: String,
    /// PKCS#10 certificate signing request, DER.
    #[serde(with = "crate::b64")]
    pub csr: Vec<u8>,
    pub key: KeyClaim,
    /// Signature by the CSR's key over [`proof_message`], in the CSR's signature algorithm.
    #[serde(with = "crate::b64")]
    pub proof: Vec<u8>,
}

/// How the client says its key is held. A hardware claim must be backed by an attestation that
/// the gateway verifies; the gateway never takes the claim on trust.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KeyClaim {
    Software,
    Yubikey {
        /// Attestation certificate of the slot key (from PIV ATTEST), DER.
        #[serde(with = "crate::b64")]
        attestation: Vec<u8>,
        /// The device's f9 attestation certificate first, then any further intermediates, DER.
        #[serde(with = "crate::b64::list")]
        chain: Vec<Vec<u8>>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Enrolled {
    pub user: String,
    pub device: String,
    /// Certificate serial, lowercase hex.
    pub serial: String,
    /// The issued client certificate, PEM.
    pub certificate: String,
    /// The ZeroSpice CA certificate, PEM (its fingerprint is the one the client pinned).
    pub ca: String,
    /// Unix time after which the certificate is no longer valid.
    pub not_after: i64,
    /// `host:port` of the access endpoint.
    pub access: String,
}

/// The exact bytes a key signs to prove possession during enrollment.
pub fn proof_message(nonce: &[u8], csr_der: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(PROOF_DOMAIN.len() + 8 + nonce.len() + csr_der.len());
    m.extend_from_slice(PROOF_DOMAIN);
    m.extend_from_slice(&(nonce.len() as u32).to_be_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(&(csr_der.len() as u32).to_be_bytes());
    m.extend_from_slice(csr_der);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shapes() {
        assert_eq!(
            serde_json::to_string(&ClientMsg::Begin { version: 1 }).unwrap(),
            r#"{"type":"begin","version":1}"#
        );
        assert_eq!(
            serde_json::to_string(&ServerMsg::Challenge {
                nonce: vec![1, 2, 3]
            })
            .unwrap(),
            r#"{"type":"challenge","nonce":"AQID"}"#
        );
        let req = ClientMsg::Request(EnrollRequest {
            user: "alice".into(),
            code: "123456".into(),
            device: "laptop".into(),
            csr: vec![0x30],
            key: KeyClaim::Software,
            proof: vec![0xff],
        });
        let json = serde_json::to_string(&req).unwrap();
        assert_eq!(
            json,
            r#"{"type":"request","user":"alice","code":"123456","device":"laptop","csr":"MA==","key":{"kind":"software"},"proof":"/w=="}"#
        );
        assert_eq!(serde_json::from_str::<ClientMsg>(&json).unwrap(), req);
        // The code never shows in Debug output.
        assert!(!format!("{req:?}").contains("123456"));
    }

    #[test]
    fn yubikey_claim_round_trips() {
        let k = KeyClaim::Yubikey {
            attestation: vec![1],
            chain: vec![vec![2], vec![3, 4]],
        };
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"yubikey","attestation":"AQ==","chain":["Ag==","AwQ="]}"#
        );
        assert_eq!(serde_json::from_str::<KeyClaim>(&json).unwrap(), k);
        assert!(serde_json::from_str::<KeyClaim>(r#"{"kind":"tpm"}"#).is_err());
    }

    #[test]
    fn proof_message_is_length_delimited() {
        let m = proof_message(&[0xaa; 2], &[0x30, 0x01]);
        let mut want = PROOF_DOMAIN.to_vec();
        want.extend_from_slice(&[0, 0, 0, 2, 0xaa, 0xaa, 0, 0, 0, 2, 0x30, 0x01]);
        assert_eq!(m, want);
        assert_ne!(proof_message(&[1], &[2, 3]), proof_message(&[1, 2], &[3]));
    }
}
