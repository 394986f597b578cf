//! The enrollment flow, shared by the CLI and the (future) GUI wizard.
//!
//! The caller supplies the invitation, the code, the device name, where to store the profile and
//! a [`KeySource`] (software key now, YubiKey slot later); progress is reported through a
//! callback so a GUI can draw it. Order matters for safety: the gateway's CA is checked during the
//! handshake, before any key is generated or anything is sent.
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use zerospice_ca::{DeviceName, Fingerprint, Identity, NameError, Signer, UserName};
use zerospice_proto::enroll::{self as wire, EnrollRequest, KeyClaim};
use zerospice_proto::frame::{MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};
use zerospice_proto::invite::Invitation;
use zerospice_proto::io::{read_frame, write_frame, IoFrameError};
use zerospice_proto::{ErrorCode, Redacted, WireError};

use crate::profile::{KeyRef, Profile, ProfileDir, ProfileError, CA_FILE, CERT_FILE};
use crate::tls::{self, PinnedCaVerifier};

/// How long to wait for the gateway's handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for the gateway's answer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);

/// A freshly created key that will be enrolled.
pub trait NewKey: Send + Sync {
    /// Signs the CSR and the proof of possession.
    fn signer(&self) -> Arc<dyn Signer>;
    /// What the gateway is told about how the key is held (with its attestation, if hardware).
    fn claim(&self) -> KeyClaim;
    /// Stores the key (or a reference to it) in the profile directory.
    fn persist(&self, dir: &ProfileDir) -> Result<KeyRef, ProfileError>;
    /// For messages: "software key", "YubiKey 12345678 slot 9a".
    fn describe(&self) -> String;
    /// Warnings and one-time information for the user (default management key, ...).
    fn notices(&self) -> Vec<String> {
        Vec::new()
    }
    /// Keeps the issued certificate beside the key where that makes sense (a YubiKey slot).
    fn store_certificate(&self, _cert_der: &[u8]) -> Result<(), String> {
        Ok(())
    }
}

/// Creates the key to enroll. Called only after the gateway proved it holds the pinned CA.
pub trait KeySource: Send + Sync {
    fn create(&self) -> Result<Box<dyn NewKey>, String>;
}

/// A key generated in software and stored 0600 in the profile.
pub struct SoftwareKeySource {
    pub algorithm: zerospice_ca::KeyAlgorithm,
}

impl Default for SoftwareKeySource {
    fn default() -> Self {
        Self {
            algorithm: zerospice_ca::KeyAlgorithm::EcdsaP256,
        }
    }
}

struct SoftwareNewKey(Arc<zerospice_ca::SoftwareKey>);

impl KeySource for SoftwareKeySource {
    fn create(&self) -> Result<Box<dyn NewKey>, String> {
        let key = zerospice_ca::SoftwareKey::generate(self.algorithm).map_err(|e| e.to_string())?;
        Ok(Box::new(SoftwareNewKey(Arc::new(key))))
    }
}

impl NewKey for SoftwareNewKey {
    fn signer(&self) -> Arc<dyn Signer> {
        self.0.clone()
    }
    fn claim(&self) -> KeyClaim {
        KeyClaim::Software
    }
    fn persist(&self, dir: &ProfileDir) -> Result<KeyRef, ProfileError> {
        dir.write_private(crate::profile::KEY_FILE, self.0.to_pem().as_bytes())?;
        Ok(KeyRef::Software)
    }
    fn describe(&self) -> String {
        format!("software key ({})", self.0.algorithm())
    }
}

/// What the user asked for.
pub struct EnrollOptions {
    pub invitation: Invitation,
    pub code: String,
    pub device: DeviceName,
    pub profile: ProfileDir,
    /// Replace an existing profile.
    pub force: bool,
}

/// Steps, for progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    Connecting {
        gateway: String,
    },
    GatewayVerified {
        ca: String,
    },
    CreatingKey,
    KeyReady {
        key: String,
    },
    /// Something the user should read (a warning, or a secret shown once).
    Notice(String),
    Sending,
    Issued {
        serial: String,
    },
    Saved {
        dir: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Name(#[from] NameError),
    #[error("a profile already exists in {0}: pass --force to replace it (its certificate stays valid until revoked)")]
    ProfileExists(String),
    #[error("cannot resolve the gateway address {addr}: {detail}")]
    Resolve { addr: String, detail: String },
    #[error("no answer from the gateway at {addr} within {secs} s: check the address, that ZeroTier is connected, and that the gateway runs")]
    Timeout { addr: String, secs: u64 },
    #[error("the gateway at {addr} is not the one in your invitation: it presents CA {presented}, the invitation pins {pinned}. Nothing was sent. Ask your administrator for a new invitation, or check you are on the right network")]
    CaMismatch {
        addr: String,
        pinned: String,
        presented: String,
    },
    #[error("could not connect to the gateway at {addr}: {detail}")]
    Connect { addr: String, detail: String },
    #[error("{}", refusal_text(.0))]
    Refused(WireError),
    #[error("the gateway broke the protocol: {0}")]
    Protocol(String),
    /// Creating or using the key failed (YubiKey errors say what to do).
    #[error("{0}")]
    Key(String),
    #[error("the gateway's answer does not match the request: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

fn refusal_text(e: &WireError) -> String {
    match e.code {
        ErrorCode::WrongCode => format!(
            "{}: check the code in your authenticator app, that this computer's clock is right, and that you did not use this code already (wait for the next one)",
            e.message
        ),
        _ => e.message.clone(),
    }
}

impl From<IoFrameError> for EnrollError {
    fn from(e: IoFrameError) -> Self {
        EnrollError::Protocol(e.to_string())
    }
}

/// What was enrolled.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub profile: Profile,
    pub dir: ProfileDir,
    pub key: String,
}

/// Runs one enrollment.
pub async fn enroll(
    opts: EnrollOptions,
    keys: &dyn KeySource,
    mut progress: impl FnMut(Progress) + Send,
) -> Result<Enrolled, EnrollError> {
    let user = UserName::new(&opts.invitation.user)?;
    if opts.profile.exists() && !opts.force {
        return Err(EnrollError::ProfileExists(
            opts.profile.dir.display().to_string(),
        ));
    }
    let pin = Fingerprint::from_bytes(opts.invitation.ca_fingerprint);
    let addr_text = opts.invitation.gateway.clone();

    progress(Progress::Connecting {
        gateway: addr_text.clone(),
    });
    let addr = tls::resolve(&addr_text)
        .await
        .map_err(|e| EnrollError::Resolve {
            addr: addr_text.clone(),
            detail: e.to_string(),
        })?;
    let verifier = PinnedCaVerifier::new(pin);
    let endpoint = tls::client_endpoint(addr).map_err(|e| EnrollError::Connect {
        addr: addr_text.clone(),
        detail: e.to_string(),
    })?;
    let cfg = tls::enroll_client_config(verifier.clone()).map_err(|e| EnrollError::Connect {
        addr: addr_text.clone(),
        detail: e.to_string(),
    })?;
    let connecting = endpoint
        .connect_with(cfg, addr, zerospice_proto::GATEWAY_SERVER_NAME)
        .map_err(|e| EnrollError::Connect {
            addr: addr_text.clone(),
            detail: e.to_string(),
        })?;
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => {
            return Err(EnrollError::Timeout {
                addr: addr_text,
                secs: CONNECT_TIMEOUT.as_secs(),
            })
        }
        Ok(Err(e)) => {
            if let Some(presented) = verifier.mismatch() {
                return Err(EnrollError::CaMismatch {
                    addr: addr_text,
                    pinned: pin.to_string(),
                    presented: presented
                        .iter()
                        .map(|f| f.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            return Err(EnrollError::Connect {
                addr: addr_text,
                detail: e.to_string(),
            });
        }
        Ok(Ok(c)) => c,
    };
    progress(Progress::GatewayVerified {
        ca: pin.to_string(),
    });

    progress(Progress::CreatingKey);
    let new_key = keys.create().map_err(EnrollError::Key)?;
    let signer = new_key.signer();
    progress(Progress::KeyReady {
        key: new_key.describe(),
    });
    for notice in new_key.notices() {
        progress(Progress::Notice(notice));
    }
    let csr = zerospice_ca::csr::build_csr(signer.as_ref(), user.as_str())
        .map_err(|e| EnrollError::Key(e.to_string()))?;

    progress(Progress::Sending);
    let answer = tokio::time::timeout(
        ANSWER_TIMEOUT,
        exchange(&conn, &opts, &csr, new_key.as_ref()),
    )
    .await
    .map_err(|_| EnrollError::Timeout {
        addr: opts.invitation.gateway.clone(),
        secs: ANSWER_TIMEOUT.as_secs(),
    })??;
    conn.close(0u32.into(), b"done");
    endpoint.close(0u32.into(), b"done");

    // Check the answer before storing anything.
    let ca_der = zerospice_ca::pem::first_certificate(&answer.ca)
        .map_err(|e| EnrollError::BadAnswer(format!("CA certificate: {e}")))?;
    if !Fingerprint::of(&ca_der).matches(&pin) {
        return Err(EnrollError::BadAnswer(
            "the CA certificate does not match the pinned fingerprint".into(),
        ));
    }
    let cert_der = zerospice_ca::pem::first_certificate(&answer.certificate)
        .map_err(|e| EnrollError::BadAnswer(format!("certificate: {e}")))?;
    let id = Identity::from_der(&cert_der).map_err(|e| EnrollError::BadAnswer(e.to_string()))?;
    let (_, parsed) = x509_parser_spki(&cert_der)?;
    if parsed != signer.spki_der() {
        return Err(EnrollError::BadAnswer(
            "the certificate is for another key".into(),
        ));
    }
    if id.user != user || id.device != opts.device {
        return Err(EnrollError::BadAnswer(format!(
            "the certificate names {}@{}, not {}@{}",
            id.user, id.device, user, opts.device
        )));
    }
    progress(Progress::Issued {
        serial: answer.serial.clone(),
    });

    let dir = opts.profile.clone();
    dir.create()?;
    let key_ref = new_key.persist(&dir)?;
    if let Err(e) = new_key.store_certificate(&cert_der) {
        progress(Progress::Notice(format!(
            "the certificate could not be written to the key's slot ({e}); the profile has it, so this does not matter to ZeroSpice"
        )));
    }
    dir.write_public(CA_FILE, &answer.ca)?;
    dir.write_public(CERT_FILE, &answer.certificate)?;
    let profile = Profile {
        user: answer.user.clone(),
        device: answer.device.clone(),
        access: answer.access.clone(),
        enroll: opts.invitation.gateway.clone(),
        ca_fingerprint: pin.to_string(),
        key: key_ref,
        serial: answer.serial.clone(),
        not_after: answer.not_after,
        enrolled_at: OffsetDateTime::now_utc().unix_timestamp(),
    };
    dir.save(&profile)?;
    progress(Progress::Saved {
        dir: dir.dir.display().to_string(),
    });
    Ok(Enrolled {
        profile,
        dir,
        key: new_key.describe(),
    })
}

fn x509_parser_spki(der: &[u8]) -> Result<((), Vec<u8>), EnrollError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| EnrollError::BadAnswer(format!("certificate: {e}")))?;
    Ok(((), cert.public_key().raw.to_vec()))
}

async fn exchange(
    conn: &quinn::Connection,
    opts: &EnrollOptions,
    csr: &[u8],
    key: &dyn NewKey,
) -> Result<wire::Enrolled, EnrollError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| EnrollError::Protocol(e.to_string()))?;
    write_frame(
        &mut send,
        &wire::ClientMsg::Begin {
            version: zerospice_proto::PROTOCOL_VERSION,
        },
        MAX_REQUEST_FRAME,
    )
    .await?;
    let nonce = match read_frame::<wire::ServerMsg, _>(&mut recv, MAX_RESPONSE_FRAME).await? {
        wire::ServerMsg::Challenge { nonce } if nonce.len() == wire::NONCE_LEN => nonce,
        wire::ServerMsg::Error(e) => return Err(EnrollError::Refused(e)),
        _ => return Err(EnrollError::Protocol("expected a challenge".into())),
    };
    let proof = key
        .signer()
        .sign(&wire::proof_message(&nonce, csr))
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let req = wire::ClientMsg::Request(EnrollRequest {
        user: opts.invitation.user.clone(),
        code: Redacted::new(opts.code.trim().to_owned()),
        device: opts.device.to_string(),
        csr: csr.to_vec(),
        key: key.claim(),
        proof,
    });
    write_frame(&mut send, &req, MAX_REQUEST_FRAME).await?;
    let _ = send.finish();
    match read_frame::<wire::ServerMsg, _>(&mut recv, MAX_RESPONSE_FRAME).await? {
        wire::ServerMsg::Issued(e) => Ok(e),
        wire::ServerMsg::Error(e) => Err(EnrollError::Refused(e)),
        wire::ServerMsg::Challenge { .. } => {
            Err(EnrollError::Protocol("unexpected second challenge".into()))
        }
    }
}

/// This machine's host name as a device name.
pub fn default_device_name() -> DeviceName {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_else(|_| "device".into());
    DeviceName::sanitized(host.trim())
}
