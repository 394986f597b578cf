//! The access endpoint: mutual-TLS QUIC (ALPN `zerospice/1`).
//!
//! Who may connect is decided in three layers, each refusing with its own clear reason:
//! 1. **TLS** ([`AccessClientVerifier`]): the leaf must chain to the ZeroSpice CA, be inside its
//!    validity, and carry the ZeroSpice client profile (clientAuth EKU, not a CA, one identity
//!    URI). rustls' WebPKI verifier alone accepts a leaf without any EKU, and the gateway's own
//!    server certificate chains to the same CA: the profile check refuses both.
//! 2. **Database** ([`check_certificate`], pure): the serial must be one this gateway issued, with
//!    the same fingerprint, not revoked, and its user must still exist. Refusals close the
//!    connection with a [`close`] code and a sentence the agent shows.
//! 3. **Per stream**: the certificate is looked up again before every request, so a revocation
//!    refuses new streams at once; [`watch_revocations`] closes connections within a second of a
//!    revocation made by the admin CLI (another process), and each connection closes itself at
//!    its certificate's notAfter.
//!
//! QUIC limits are explicit: finite stream and connection windows, a bounded number of concurrent
//! streams, an idle timeout (agents send keep-alives) and a bounded number of connections per
//! certificate.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quinn::crypto::rustls::QuicServerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use tracing::{debug, info, warn, Instrument};
use zerospice_ca::identity::format_unix;
use zerospice_ca::{CertificateAuthority, Identity};
use zerospice_proto::access::{Request, Response};
use zerospice_proto::error::close;
use zerospice_proto::frame::{MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};
use zerospice_proto::io::{read_frame, write_frame};
use zerospice_proto::{ErrorCode, WireError};

use crate::config::{Config, SessionConfig};
use crate::proxmox::ProxmoxClient;
use crate::sessions::{EndReason, Session, SessionTable};
use crate::store::{AuditEvent, CertRecord, Store};

/// How long a client has to send its request frame on a new stream.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the revocation watcher looks at the database.
pub const REVOCATION_POLL: Duration = Duration::from_millis(500);
/// Longest close reason sent (QUIC carries it in one packet).
const MAX_REASON: usize = 400;

/// Verifies client certificates: the ZeroSpice CA's WebPKI chain, then the client profile.
#[derive(Debug)]
pub struct AccessClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl AccessClientVerifier {
    pub fn new(ca_der: &[u8]) -> anyhow::Result<Arc<Self>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(ca_der.to_vec()))?;
        let inner =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crate::server::provider())
                .build()?;
        Ok(Arc::new(Self { inner }))
    }
}

impl ClientCertVerifier for AccessClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        // Only leaves issued directly by the CA: the gateway never issues intermediates.
        if !intermediates.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        self.inner.verify_client_cert(end_entity, &[], now)?;
        Identity::from_der(end_entity).map_err(|e| {
            debug!(error = %e, "client certificate refused by profile");
            rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurpose)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// Transport limits of the access endpoint (quinn's defaults leave the connection window
/// unlimited).
pub fn access_transport(s: &SessionConfig) -> anyhow::Result<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(s.max_streams_per_connection.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((8u32 * 1024 * 1024).into())
        .receive_window((32u32 * 1024 * 1024).into())
        .send_window(32 * 1024 * 1024)
        .max_idle_timeout(Some(
            Duration::from_secs(s.idle_timeout_secs.max(5)).try_into()?,
        ))
        .keep_alive_interval(Some(Duration::from_secs(10)))
        .datagram_receive_buffer_size(None);
    Ok(t)
}

/// The access endpoint's QUIC server configuration.
pub fn access_server_config(
    identity: Arc<CertifiedKey>,
    ca: &CertificateAuthority,
    sessions: &SessionConfig,
) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = crate::server::tls13_server()?
        .with_client_cert_verifier(AccessClientVerifier::new(ca.cert_der())?)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(identity)));
    tls.alpn_protocols = vec![zerospice_proto::ALPN_ACCESS.to_vec()];
    tls.max_early_data_size = 0;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    cfg.transport_config(Arc::new(access_transport(sessions)?));
    cfg.max_incoming(1024);
    Ok(cfg)
}

/// Why a verified certificate may not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessRefusal {
    /// Not in this gateway's database (or a record with another fingerprint).
    Unknown,
    Revoked {
        at: i64,
        reason: String,
    },
    UserRemoved,
    Expired {
        not_after: i64,
    },
    NotYetValid {
        not_before: i64,
    },
    TooManyConnections {
        max: u32,
    },
}

impl AccessRefusal {
    pub fn close_code(&self) -> u32 {
        match self {
            AccessRefusal::Unknown | AccessRefusal::UserRemoved => close::CERTIFICATE_UNKNOWN,
            AccessRefusal::Revoked { .. } => close::CERTIFICATE_REVOKED,
            AccessRefusal::Expired { .. } | AccessRefusal::NotYetValid { .. } => {
                close::CERTIFICATE_EXPIRED
            }
            AccessRefusal::TooManyConnections { .. } => close::TOO_MANY_CONNECTIONS,
        }
    }

    /// What the agent shows.
    pub fn message(&self) -> String {
        match self {
            AccessRefusal::Unknown => {
                "this gateway does not know your certificate: enroll again".into()
            }
            AccessRefusal::Revoked { at, reason } => format!(
                "your certificate was revoked on {} ({}): ask your administrator for a new enrollment code",
                format_unix(*at),
                reason.chars().take(120).collect::<String>()
            ),
            AccessRefusal::UserRemoved => {
                "your user no longer exists on this gateway: ask your administrator".into()
            }
            AccessRefusal::Expired { not_after } => format!(
                "your certificate expired on {}: enroll again with a new code",
                format_unix(*not_after)
            ),
            AccessRefusal::NotYetValid { not_before } => format!(
                "your certificate is not valid before {}: check this computer's clock",
                format_unix(*not_before)
            ),
            AccessRefusal::TooManyConnections { max } => format!(
                "too many connections with your certificate (at most {max}): close other ZeroSpice agents on this device"
            ),
        }
    }

    pub fn audit_reason(&self) -> String {
        match self {
            AccessRefusal::Unknown => "unknown_certificate".into(),
            AccessRefusal::Revoked { reason, .. } => format!("revoked ({reason})"),
            AccessRefusal::UserRemoved => "user_removed".into(),
            AccessRefusal::Expired { .. } => "expired".into(),
            AccessRefusal::NotYetValid { .. } => "not_yet_valid".into(),
            AccessRefusal::TooManyConnections { max } => format!("too_many_connections ({max})"),
        }
    }

    /// The error a stream gets when its connection's certificate stopped being good.
    pub fn wire(&self) -> WireError {
        let code = match self {
            AccessRefusal::Revoked { .. } => ErrorCode::CertificateRevoked,
            AccessRefusal::TooManyConnections { .. } => ErrorCode::Busy,
            _ => ErrorCode::CertificateRevoked,
        };
        WireError::new(code, self.message())
    }
}

/// Decides whether a presented (TLS-verified) certificate may be used at `now`.
pub fn check_certificate(
    record: Option<&CertRecord>,
    id: &Identity,
    now: i64,
) -> Result<(), AccessRefusal> {
    let Some(r) = record else {
        return Err(AccessRefusal::Unknown);
    };
    if r.fingerprint != id.fingerprint.to_string() || r.user != id.user.as_str() {
        return Err(AccessRefusal::Unknown);
    }
    if let (Some(at), Some(reason)) = (r.revoked_at, &r.revoke_reason) {
        return Err(AccessRefusal::Revoked {
            at,
            reason: reason.clone(),
        });
    }
    if !r.user_exists {
        return Err(AccessRefusal::UserRemoved);
    }
    if now > id.not_after {
        return Err(AccessRefusal::Expired {
            not_after: id.not_after,
        });
    }
    if now < id.not_before {
        return Err(AccessRefusal::NotYetValid {
            not_before: id.not_before,
        });
    }
    Ok(())
}

/// Live connections per certificate serial. Generic over the connection handle so the limits are
/// tested without sockets.
#[derive(Debug)]
pub struct Registry<C> {
    by_serial: BTreeMap<String, BTreeMap<u64, C>>,
}

impl<C> Default for Registry<C> {
    fn default() -> Self {
        Self {
            by_serial: BTreeMap::new(),
        }
    }
}

impl<C: Clone> Registry<C> {
    /// Adds a connection unless the certificate already has `max`.
    pub fn admit(&mut self, serial: &str, id: u64, conn: C, max: u32) -> Result<(), AccessRefusal> {
        let entry = self.by_serial.entry(serial.to_owned()).or_default();
        if entry.len() >= max as usize {
            return Err(AccessRefusal::TooManyConnections { max });
        }
        entry.insert(id, conn);
        Ok(())
    }

    pub fn remove(&mut self, serial: &str, id: u64) {
        if let Some(m) = self.by_serial.get_mut(serial) {
            m.remove(&id);
            if m.is_empty() {
                self.by_serial.remove(serial);
            }
        }
    }

    /// The connections of `serial` (they stay registered until they end).
    pub fn connections(&self, serial: &str) -> Vec<C> {
        self.by_serial
            .get(serial)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.by_serial.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_serial.is_empty()
    }
}

/// An authenticated agent connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub conn_id: u64,
    pub identity: Identity,
    pub serial: String,
    pub key_fingerprint: String,
    pub addr: SocketAddr,
    /// When the certificate was issued (renewals are refused too soon after).
    pub issued_at: i64,
}

impl Peer {
    pub fn audit(&self, event: &'static str, detail: serde_json::Value) -> AuditEvent {
        AuditEvent {
            event,
            user: Some(self.identity.user.to_string()),
            device: Some(self.identity.device.to_string()),
            serial: Some(self.serial.clone()),
            peer: Some(self.addr.to_string()),
            detail,
        }
    }
}

/// Everything the access endpoint shares between connections.
pub struct AccessState {
    pub store: Arc<Store>,
    pub ca: Arc<CertificateAuthority>,
    pub config: Config,
    pub proxmox: Option<Arc<ProxmoxClient>>,
    pub sessions: Mutex<SessionTable>,
    pub registry: Mutex<Registry<quinn::Connection>>,
    next_conn: AtomicU64,
}

impl AccessState {
    pub fn new(
        store: Arc<Store>,
        ca: Arc<CertificateAuthority>,
        config: Config,
        proxmox: Option<Arc<ProxmoxClient>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            ca,
            config,
            proxmox,
            sessions: Mutex::new(SessionTable::default()),
            registry: Mutex::new(Registry::default()),
            next_conn: AtomicU64::new(1),
        })
    }

    pub fn sessions(&self) -> std::sync::MutexGuard<'_, SessionTable> {
        // The table's methods do not panic halfway through a change; a poisoned lock still
        // holds a consistent table.
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn registry(&self) -> std::sync::MutexGuard<'_, Registry<quinn::Connection>> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes an audit record; a failure to write is logged, never fatal to the caller.
    pub async fn audit(&self, event: AuditEvent) {
        let store = self.store.clone();
        let now = unix_now();
        let result = tokio::task::spawn_blocking(move || store.audit(now, &event)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "cannot write the audit trail"),
            Err(e) => warn!(error = %e, "audit writer failed"),
        }
    }

    /// Looks the peer's certificate up again (every stream does, so revocations act at once).
    pub async fn recheck(&self, peer: &Peer) -> Result<(), AccessRefusal> {
        let store = self.store.clone();
        let serial = peer.serial.clone();
        let record = tokio::task::spawn_blocking(move || store.certificate(&serial))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        check_certificate(record.as_ref(), &peer.identity, unix_now())
    }

    /// Ends sessions and writes their audit records.
    pub async fn sessions_ended(&self, ended: Vec<(Session, EndReason)>) {
        for (s, reason) in ended {
            info!(session = %s.id, vmid = %s.vmid, reason = reason.as_str(), "session ended");
            self.audit(AuditEvent {
                event: "session.ended",
                user: Some(s.owner.user.clone()),
                device: Some(s.owner.device.clone()),
                serial: Some(s.owner.serial.clone()),
                peer: None,
                detail: serde_json::json!({
                    "session": s.id.as_str(),
                    "vmid": s.vmid.get(),
                    "reason": reason.as_str(),
                    "channels": s.channels_total,
                    "bytes_up": s.bytes_up,
                    "bytes_down": s.bytes_down,
                    "duration_ms": s.opened.elapsed().as_millis() as u64,
                }),
            })
            .await;
        }
    }
}

pub fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn reason_bytes(text: &str) -> Vec<u8> {
    let mut s: String = text.chars().take(MAX_REASON).collect();
    while s.len() > MAX_REASON {
        s.pop();
    }
    s.into_bytes()
}

/// Accepts access connections until the endpoint is closed.
pub async fn run_access(endpoint: quinn::Endpoint, state: Arc<AccessState>) {
    while let Some(incoming) = endpoint.accept().await {
        let state = state.clone();
        tokio::spawn(async move { handle_connection(state, incoming).await });
    }
}

/// Closes the connections of certificates revoked by another process (the admin CLI), within
/// [`REVOCATION_POLL`] of the revocation, and ends their sessions.
pub async fn watch_revocations(state: Arc<AccessState>) {
    let mut since = unix_now() - 1;
    let mut interval = tokio::time::interval(REVOCATION_POLL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let store = state.store.clone();
        let from = since;
        let Ok(Ok(serials)) = tokio::task::spawn_blocking(move || store.revoked_since(from)).await
        else {
            continue;
        };
        // Revocation times have one-second resolution: look back one second each time
        // (closing an already closed connection does nothing).
        since = unix_now() - 1;
        for serial in serials {
            let conns = state.registry().connections(&serial);
            if conns.is_empty() {
                continue;
            }
            let refusal = match state.recheck_serial(&serial).await {
                Some(r) => r,
                None => continue,
            };
            state.end_revoked(&serial).await;
            for c in conns {
                c.close(
                    refusal.close_code().into(),
                    &reason_bytes(&refusal.message()),
                );
            }
            info!(%serial, "revoked certificate: connections closed");
        }
    }
}

impl AccessState {
    /// Ends (and audits) every session of a revoked certificate.
    async fn end_revoked(&self, serial: &str) {
        let ended = self.sessions().end_serial(serial);
        self.sessions_ended(ended.into_iter().map(|s| (s, EndReason::Revoked)).collect())
            .await;
    }

    async fn recheck_serial(&self, serial: &str) -> Option<AccessRefusal> {
        let store = self.store.clone();
        let s = serial.to_owned();
        let record = tokio::task::spawn_blocking(move || store.certificate(&s))
            .await
            .ok()?
            .ok()??;
        match (record.revoked_at, record.revoke_reason) {
            (Some(at), Some(reason)) => Some(AccessRefusal::Revoked { at, reason }),
            _ => None,
        }
    }
}

async fn handle_connection(state: Arc<AccessState>, incoming: quinn::Incoming) {
    let addr = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // No client certificate, another CA, expired, wrong profile: TLS refused it.
            info!(peer = %addr, error = %e, "access handshake refused");
            state
                .audit(AuditEvent {
                    event: "access.refused",
                    peer: Some(addr.to_string()),
                    detail: serde_json::json!({ "reason": format!("handshake: {e}") }),
                    ..Default::default()
                })
                .await;
            return;
        }
    };
    let Some(identity) = peer_identity(&conn) else {
        conn.close(close::PROTOCOL_ERROR.into(), b"no client certificate");
        return;
    };
    let serial = identity.serial.to_string();
    let store = state.store.clone();
    let s = serial.clone();
    let record = match tokio::task::spawn_blocking(move || store.certificate(&s)).await {
        Ok(Ok(r)) => r,
        _ => {
            warn!(peer = %addr, "cannot read the certificate database");
            conn.close(
                close::SHUTDOWN.into(),
                b"the gateway cannot read its database",
            );
            return;
        }
    };
    let now = unix_now();
    let conn_id = state.next_conn.fetch_add(1, Ordering::Relaxed);
    let peer = Peer {
        conn_id,
        serial: serial.clone(),
        key_fingerprint: identity.key_fingerprint.to_string(),
        addr,
        issued_at: record.as_ref().map(|r| r.issued_at).unwrap_or(0),
        identity,
    };
    let admitted = check_certificate(record.as_ref(), &peer.identity, now).and_then(|()| {
        state.registry().admit(
            &serial,
            conn_id,
            conn.clone(),
            state.config.sessions.max_connections_per_certificate,
        )
    });
    if let Err(refusal) = admitted {
        info!(peer = %addr, user = %peer.identity.user, %serial, reason = %refusal.audit_reason(), "access refused");
        conn.close(
            refusal.close_code().into(),
            &reason_bytes(&refusal.message()),
        );
        state
            .audit(peer.audit(
                "access.refused",
                serde_json::json!({ "reason": refusal.audit_reason() }),
            ))
            .await;
        return;
    }

    let span = tracing::info_span!(
        "access",
        conn = conn_id,
        user = %peer.identity.user,
        device = %peer.identity.device,
        serial = %serial,
        peer = %addr,
    );
    let peer = Arc::new(peer);
    serve_connection(state.clone(), conn, peer.clone())
        .instrument(span)
        .await;
    state.registry().remove(&serial, conn_id);
    let ended = state.sessions().end_connection(conn_id);
    state
        .sessions_ended(
            ended
                .into_iter()
                .map(|s| (s, EndReason::ConnectionClosed))
                .collect(),
        )
        .await;
}

fn peer_identity(conn: &quinn::Connection) -> Option<Identity> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    Identity::from_der(certs.first()?).ok()
}

async fn serve_connection(state: Arc<AccessState>, conn: quinn::Connection, peer: Arc<Peer>) {
    debug!("connected");
    let started = Instant::now();
    let until_expiry = u64::try_from(peer.identity.not_after - unix_now()).unwrap_or(0);
    let expiry = tokio::time::sleep(Duration::from_secs(until_expiry));
    tokio::pin!(expiry);
    let why = loop {
        tokio::select! {
            s = conn.accept_bi() => match s {
                Ok((send, recv)) => {
                    let state = state.clone();
                    let peer = peer.clone();
                    let conn = conn.clone();
                    tokio::spawn(
                        async move { handle_stream(state, conn, peer, send, recv).await }
                            .in_current_span(),
                    );
                }
                Err(e) => break e.to_string(),
            },
            () = &mut expiry => {
                let r = AccessRefusal::Expired { not_after: peer.identity.not_after };
                conn.close(r.close_code().into(), &reason_bytes(&r.message()));
                break "certificate expired".to_string();
            }
        }
    };
    debug!(reason = %why, secs = started.elapsed().as_secs(), "disconnected");
}

async fn handle_stream(
    state: Arc<AccessState>,
    conn: quinn::Connection,
    peer: Arc<Peer>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let req = match tokio::time::timeout(
        REQUEST_TIMEOUT,
        read_frame::<Request, _>(&mut recv, MAX_REQUEST_FRAME),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!(error = %e, "bad request frame");
            return refuse(send, recv, WireError::bad_request(e)).await;
        }
        Err(_) => {
            return refuse(
                send,
                recv,
                WireError::bad_request("the request did not arrive in time"),
            )
            .await
        }
    };
    if let Err(r) = state.recheck(&peer).await {
        let code = r.close_code();
        let message = r.message();
        state.end_revoked(&peer.serial).await;
        refuse(send, recv, r.wire()).await;
        conn.close(code.into(), &reason_bytes(&message));
        return;
    }
    match req {
        Request::Tunnel { session, connect } => {
            crate::tunnel::run(state, peer, send, recv, session, connect).await
        }
        other => {
            let resp = crate::service::handle(&state, &peer, other).await;
            let _ = write_frame(&mut send, &resp, MAX_RESPONSE_FRAME).await;
            let _ = send.finish();
            let _ = recv.stop(0u32.into());
        }
    }
}

/// Answers a stream with an error and closes it.
pub async fn refuse(mut send: quinn::SendStream, mut recv: quinn::RecvStream, e: WireError) {
    let _ = write_frame(&mut send, &Response::Error(e), MAX_RESPONSE_FRAME).await;
    let _ = send.finish();
    let _ = recv.stop(zerospice_proto::error::stream::ERROR.into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerospice_ca::{DeviceName, Fingerprint, KeyProvenance, Serial, UserName};

    fn identity(not_before: i64, not_after: i64) -> Identity {
        Identity {
            user: UserName::new("alice").unwrap(),
            device: DeviceName::new("laptop").unwrap(),
            key: KeyProvenance::Software,
            serial: Serial::from_be_bytes(&[0xab]),
            fingerprint: Fingerprint::of(b"cert"),
            key_fingerprint: Fingerprint::of(b"key"),
            not_before,
            not_after,
        }
    }

    fn record(id: &Identity) -> CertRecord {
        CertRecord {
            serial: id.serial.to_string(),
            user: id.user.to_string(),
            device: id.device.to_string(),
            fingerprint: id.fingerprint.to_string(),
            key_fingerprint: id.key_fingerprint.to_string(),
            key_kind: "software".into(),
            hardware_serial: None,
            pin_policy: None,
            touch_policy: None,
            not_before: id.not_before,
            not_after: id.not_after,
            issued_at: id.not_before,
            revoked_at: None,
            revoke_reason: None,
            user_exists: true,
        }
    }

    #[test]
    fn a_known_active_certificate_in_its_window_is_admitted() {
        let id = identity(1_000, 2_000);
        assert_eq!(check_certificate(Some(&record(&id)), &id, 1_500), Ok(()));
    }

    #[test]
    fn unknown_revoked_removed_and_out_of_window_are_refused() {
        let id = identity(1_000, 2_000);
        assert_eq!(
            check_certificate(None, &id, 1_500),
            Err(AccessRefusal::Unknown)
        );
        let mut other = record(&id);
        other.fingerprint = Fingerprint::of(b"another cert").to_string();
        assert_eq!(
            check_certificate(Some(&other), &id, 1_500),
            Err(AccessRefusal::Unknown)
        );
        let mut revoked = record(&id);
        revoked.revoked_at = Some(1_400);
        revoked.revoke_reason = Some("lost laptop".into());
        let r = check_certificate(Some(&revoked), &id, 1_500).unwrap_err();
        assert_eq!(r.close_code(), close::CERTIFICATE_REVOKED);
        assert_eq!(
            r.message(),
            "your certificate was revoked on 1970-01-01 00:23 UTC (lost laptop): ask your administrator for a new enrollment code"
        );
        let mut removed = record(&id);
        removed.user_exists = false;
        assert_eq!(
            check_certificate(Some(&removed), &id, 1_500),
            Err(AccessRefusal::UserRemoved)
        );
        let r = check_certificate(Some(&record(&id)), &id, 2_001).unwrap_err();
        assert_eq!(
            r.message(),
            "your certificate expired on 1970-01-01 00:33 UTC: enroll again with a new code"
        );
        assert_eq!(r.close_code(), close::CERTIFICATE_EXPIRED);
        assert!(matches!(
            check_certificate(Some(&record(&id)), &id, 999),
            Err(AccessRefusal::NotYetValid { .. })
        ));
    }

    #[test]
    fn connections_per_certificate_are_bounded() {
        let mut r: Registry<u32> = Registry::default();
        r.admit("aa", 1, 10, 2).unwrap();
        r.admit("aa", 2, 20, 2).unwrap();
        assert_eq!(
            r.admit("aa", 3, 30, 2),
            Err(AccessRefusal::TooManyConnections { max: 2 })
        );
        r.admit("bb", 4, 40, 2).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r.connections("aa"), vec![10, 20]);
        r.remove("aa", 1);
        r.admit("aa", 5, 50, 2).unwrap();
        r.remove("aa", 2);
        r.remove("aa", 5);
        r.remove("bb", 4);
        assert!(r.is_empty());
    }

    /// A leaf signed by the ZeroSpice CA key but without any EKU: WebPKI alone accepts it for
    /// client auth; the profile check must not. The CA certificate itself is refused too.
    #[test]
    fn the_verifier_refuses_leaves_without_client_auth_and_the_ca_itself() {
        use rcgen::{CertificateParams, Issuer, KeyPair, SanType};
        let now = OffsetDateTime::now_utc();
        let (ca, ca_key_pem) = CertificateAuthority::generate(now).unwrap();
        let ca_key = KeyPair::from_pem(&ca_key_pem).unwrap();
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(ca.cert_der()), ca_key).unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        p.subject_alt_names = vec![
            SanType::URI("zerospice://user/alice/device/laptop".try_into().unwrap()),
            SanType::URI("zerospice://key/software".try_into().unwrap()),
        ];
        let leaf_key = KeyPair::generate().unwrap();
        let no_eku = p.signed_by(&leaf_key, &issuer).unwrap();
        let v = AccessClientVerifier::new(ca.cert_der()).unwrap();
        let t = UnixTime::now();
        let e = v.verify_client_cert(no_eku.der(), &[], t).unwrap_err();
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurpose)
        );
        // The same leaf with clientAuth passes: the check above is the EKU, nothing else.
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let good = p.signed_by(&leaf_key, &issuer).unwrap();
        assert!(v.verify_client_cert(good.der(), &[], t).is_ok());
        // The CA certificate presented as a client certificate.
        assert!(v
            .verify_client_cert(&CertificateDer::from(ca.cert_der()), &[], t)
            .is_err());
        // Intermediates are never accepted.
        assert!(v
            .verify_client_cert(good.der(), &[CertificateDer::from(ca.cert_der())], t)
            .is_err());
    }

    #[test]
    fn close_reasons_fit_one_packet() {
        let long = AccessRefusal::Revoked {
            at: 0,
            reason: "é".repeat(1000),
        };
        assert!(reason_bytes(&long.message()).len() <= MAX_REASON);
    }
}
