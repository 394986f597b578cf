//! The agent's connection to its gateway: mutual TLS with the enrolled certificate, one QUIC
//! stream per request, one per SPICE channel.
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use zerospice_ca::identity::format_unix;
use zerospice_ca::{Identity, Signer};
use zerospice_enroll::profile::{KeyRef, Profile, ProfileDir};
use zerospice_enroll::tls;
use zerospice_proto::access::{HelloInfo, PowerAction, Request, Response, SessionGrant, VmInfo};
use zerospice_proto::frame::{MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};
use zerospice_proto::io::{read_frame, write_frame, IoFrameError};
use zerospice_proto::{SessionId, VmId};

use crate::error::AgentError;

/// How long to wait for the gateway's handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The same with a YubiKey-held key: the handshake may wait for a touch (a YubiKey waits 15 s).
pub const HARDWARE_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for an answer (a power action waits for Proxmox's task, up to 30 s).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(45);

/// What an enrolled device holds: its profile, CA, certificate and key.
#[derive(Clone)]
pub struct Credentials {
    pub dir: ProfileDir,
    pub profile: Profile,
    pub ca_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub identity: Identity,
    pub signer: Arc<dyn Signer>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("dir", &self.dir.dir)
            .field("user", &self.profile.user)
            .field("device", &self.profile.device)
            .field("serial", &self.profile.serial)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// Loads the profile in `dir`, with the key it names; a YubiKey PIN is asked on the
    /// terminal (or taken from `ZEROSPICE_PIV_PIN`).
    pub fn load(dir: ProfileDir) -> Result<Self, AgentError> {
        Self::load_with(dir, Arc::new(zerospice_enroll::hardware::TerminalPrompt))
    }

    /// Loads the profile in `dir`; a YubiKey-held key asks its PIN through `prompt` (now, so a
    /// wrong PIN is reported before anything is sent) and announces touches through it.
    pub fn load_with(
        dir: ProfileDir,
        prompt: Arc<dyn zerospice_ca::piv::PivPrompt>,
    ) -> Result<Self, AgentError> {
        let profile = dir.load()?;
        let ca_der = dir.ca_der(&profile)?;
        let (cert_der, identity) = dir.certificate()?;
        let signer: Arc<dyn Signer> = match &profile.key {
            KeyRef::Software => dir.software_key()?,
            KeyRef::Yubikey { serial, slot } => zerospice_enroll::hardware::open_profile_key(
                *serial,
                slot,
                &point_of(&cert_der)?,
                prompt,
            )
            .map_err(AgentError::Key)?,
        };
        if signer.spki_der() != spki_of(&cert_der)? {
            return Err(AgentError::Key(format!(
                "the key in {} does not belong to the certificate {}: enroll again",
                dir.dir.display(),
                dir.file(zerospice_enroll::profile::CERT_FILE).display()
            )));
        }
        Ok(Self {
            dir,
            profile,
            ca_der,
            cert_der,
            identity,
            signer,
        })
    }

    /// Refuses locally a certificate that has expired (the gateway would refuse it too).
    pub fn check_not_expired(&self, now: i64) -> Result<(), AgentError> {
        if now > self.identity.not_after {
            return Err(AgentError::CertificateExpired(format_unix(
                self.identity.not_after,
            )));
        }
        Ok(())
    }
}

fn point_of(cert_der: &[u8]) -> Result<Vec<u8>, AgentError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| AgentError::Local(format!("the profile certificate does not parse: {e}")))?;
    Ok(cert.public_key().subject_public_key.data.to_vec())
}

pub(crate) fn spki_of(cert_der: &[u8]) -> Result<Vec<u8>, AgentError> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(cert_der)
        .map_err(|e| AgentError::Local(format!("the profile certificate does not parse: {e}")))?;
    Ok(cert.public_key().raw.to_vec())
}

/// A connection to the gateway.
pub struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    addr: String,
    pub hello: HelloInfo,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("user", &self.hello.user)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects with the enrolled certificate and asks the gateway who it thinks we are (which
    /// also surfaces a refusal of the certificate, sent after the handshake).
    pub async fn connect(creds: &Credentials) -> Result<Self, AgentError> {
        creds.check_not_expired(OffsetDateTime::now_utc().unix_timestamp())?;
        let addr_text = creds.profile.access.clone();
        let addr = tls::resolve(&addr_text)
            .await
            .map_err(|e| AgentError::Resolve {
                addr: addr_text.clone(),
                detail: e.to_string(),
            })?;
        let endpoint = tls::client_endpoint(addr)
            .map_err(|e| AgentError::Local(format!("cannot open a UDP socket: {e}")))?;
        let cfg =
            tls::access_client_config(&creds.ca_der, creds.cert_der.clone(), creds.signer.clone())
                .map_err(|e| AgentError::Local(format!("TLS configuration: {e}")))?;
        let connecting = endpoint
            .connect_with(cfg, addr, zerospice_proto::GATEWAY_SERVER_NAME)
            .map_err(|e| AgentError::Local(format!("cannot connect to {addr_text}: {e}")))?;
        let timeout = match creds.profile.key {
            KeyRef::Software => CONNECT_TIMEOUT,
            KeyRef::Yubikey { .. } => HARDWARE_CONNECT_TIMEOUT,
        };
        let conn = match tokio::time::timeout(timeout, connecting).await {
            Err(_) => {
                return Err(AgentError::Timeout {
                    addr: addr_text,
                    secs: timeout.as_secs(),
                })
            }
            Ok(Err(e)) => return Err(AgentError::from_connection(&e, &addr_text)),
            Ok(Ok(c)) => c,
        };
        let mut client = Self {
            endpoint,
            conn,
            addr: addr_text,
            hello: HelloInfo {
                user: String::new(),
                device: String::new(),
                serial: String::new(),
                not_after: 0,
                gateway_version: String::new(),
                renew_before_secs: 0,
            },
        };
        match client.request(&Request::Hello).await? {
            Response::Hello(h) => client.hello = h,
            other => return Err(unexpected(&other)),
        }
        Ok(client)
    }

    /// The QUIC connection (the local proxy opens its channels on it).
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// `host:port` of the gateway.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The error that ended the connection, or a stream error as it stands.
    fn stream_error(&self, e: impl std::fmt::Display) -> AgentError {
        match self.conn.close_reason() {
            Some(reason) => AgentError::from_connection(&reason, &self.addr),
            None => AgentError::Lost(e.to_string()),
        }
    }

    fn frame_error(&self, e: IoFrameError) -> AgentError {
        match e {
            IoFrameError::Frame(f) => AgentError::Protocol(f.to_string()),
            other => self.stream_error(other),
        }
    }

    async fn open(
        &self,
        req: &Request,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Response), AgentError> {
        let (mut send, mut recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| AgentError::from_connection(&e, &self.addr))?;
        write_frame(&mut send, req, MAX_REQUEST_FRAME)
            .await
            .map_err(|e| self.frame_error(e))?;
        let resp = tokio::time::timeout(
            ANSWER_TIMEOUT,
            read_frame::<Response, _>(&mut recv, MAX_RESPONSE_FRAME),
        )
        .await
        .map_err(|_| AgentError::Timeout {
            addr: self.addr.clone(),
            secs: ANSWER_TIMEOUT.as_secs(),
        })?
        .map_err(|e| self.frame_error(e))?;
        Ok((send, recv, resp))
    }

    /// Sends one request and returns the answer (an error answer becomes `Err`).
    pub async fn request(&self, req: &Request) -> Result<Response, AgentError> {
        let (mut send, _recv, resp) = self.open(req).await?;
        let _ = send.finish();
        match resp {
            Response::Error(e) => Err(AgentError::Gateway(e)),
            r => Ok(r),
        }
    }

    pub async fn list_vms(&self) -> Result<Vec<VmInfo>, AgentError> {
        match self.request(&Request::ListVms).await? {
            Response::Vms { vms } => Ok(vms),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn vm_status(&self, vmid: VmId) -> Result<VmInfo, AgentError> {
        match self.request(&Request::VmStatus { vmid }).await? {
            Response::Vm { vm } => Ok(vm),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn open_session(&self, vmid: VmId) -> Result<SessionGrant, AgentError> {
        match self.request(&Request::OpenSession { vmid }).await? {
            Response::Session(g) => Ok(g),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn power(&self, vmid: VmId, action: PowerAction) -> Result<(), AgentError> {
        match self.request(&Request::Power { vmid, action }).await? {
            Response::PowerDone { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks for a new certificate for the same key; returns (PEM, serial, not_after).
    pub async fn renew(&self, csr: Vec<u8>) -> Result<(String, String, i64), AgentError> {
        match self.request(&Request::Renew { csr }).await? {
            Response::Renewed {
                certificate,
                serial,
                not_after,
            } => Ok((certificate, serial, not_after)),
            other => Err(unexpected(&other)),
        }
    }

    /// Opens one SPICE channel of `session`: the stream is a raw byte pipe once this returns.
    pub async fn open_tunnel(
        &self,
        session: &SessionId,
        connect: &str,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), AgentError> {
        let req = Request::Tunnel {
            session: session.clone(),
            connect: connect.to_owned(),
        };
        let (send, recv, resp) = self.open(&req).await?;
        match resp {
            Response::TunnelReady => Ok((send, recv)),
            Response::Error(e) => Err(AgentError::Gateway(e)),
            other => Err(unexpected(&other)),
        }
    }

    /// Closes the connection (the gateway ends this connection's sessions).
    pub async fn close(&self) {
        self.conn
            .close(zerospice_proto::error::close::NORMAL.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }

    /// Resolves when the gateway closes the connection, with the reason.
    pub async fn closed(&self) -> AgentError {
        let e = self.conn.closed().await;
        AgentError::from_connection(&e, &self.addr)
    }
}

fn unexpected(r: &Response) -> AgentError {
    let what = serde_json::to_value(r)
        .ok()
        .and_then(|v| v.get("result").and_then(|x| x.as_str()).map(str::to_owned))
        .unwrap_or_default();
    AgentError::Protocol(format!("unexpected answer {what:?}"))
}

/// The action names users type.
pub fn parse_power(s: &str) -> Option<PowerAction> {
    match s {
        "start" => Some(PowerAction::Start),
        "shutdown" => Some(PowerAction::Shutdown),
        _ => None,
    }
}
