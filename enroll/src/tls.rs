//! TLS and QUIC client configuration for talking to a gateway.
//!
//! Enrollment pins the CA by fingerprint: the gateway sends `[server cert, CA cert]`; the client
//! refuses the handshake unless the CA's SHA-256 equals the pinned one, then verifies the server
//! certificate against that CA like any WebPKI chain (name `gateway.zerospice.invalid`). Nothing
//! is sent to a gateway with another CA. Access uses the stored CA as the only root and presents
//! the client certificate, signed by whatever [`Signer`] holds the key.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use zerospice_ca::{Fingerprint, Signer};

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Accepts the server only if its chain carries the pinned CA and verifies under it.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    pin: Fingerprint,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The CA fingerprint(s) the server presented when the pin did not match.
    seen: Mutex<Option<Vec<Fingerprint>>>,
}

impl PinnedCaVerifier {
    pub fn new(pin: Fingerprint) -> Arc<Self> {
        Arc::new(Self {
            pin,
            provider: provider(),
            seen: Mutex::new(None),
        })
    }

    /// What the server presented instead of the pinned CA, if the handshake failed on the pin.
    pub fn mismatch(&self) -> Option<Vec<Fingerprint>> {
        self.seen.lock().ok().and_then(|g| g.clone())
    }
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| Fingerprint::of(c).matches(&self.pin))
        else {
            if let Ok(mut seen) = self.seen.lock() {
                *seen = Some(intermediates.iter().map(|c| Fingerprint::of(c)).collect());
            }
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn transport(keep_alive: bool) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((8u32 * 1024 * 1024).into())
        .receive_window((32u32 * 1024 * 1024).into())
        .send_window(32 * 1024 * 1024)
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(30))
                .unwrap_or(quinn::VarInt::from_u32(30_000).into()),
        ));
    if keep_alive {
        t.keep_alive_interval(Some(Duration::from_secs(5)));
    }
    Arc::new(t)
}

fn quic_client(tls: rustls::ClientConfig, keep_alive: bool) -> anyhow::Result<quinn::ClientConfig> {
    let mut cfg = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls)?));
    cfg.transport_config(transport(keep_alive));
    Ok(cfg)
}

/// Client configuration for the enrollment endpoint, pinning the CA.
pub fn enroll_client_config(
    verifier: Arc<PinnedCaVerifier>,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![zerospice_proto::ALPN_ENROLL.to_vec()];
    quic_client(tls, false)
}

#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.key.choose_scheme(sigschemes).map(|_| self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Client configuration for the access endpoint: the ZeroSpice CA as the only root, and the
/// client certificate with its key behind `signer` (software or hardware).
pub fn access_client_config(
    ca_der: &[u8],
    cert_der: Vec<u8>,
    signer: Arc<dyn Signer>,
) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca_der.to_vec()))?;
    let key = rustls::sign::CertifiedKey::new(
        vec![CertificateDer::from(cert_der)],
        zerospice_ca::keys::tls_signing_key(signer),
    );
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_cert_resolver(Arc::new(ClientCert(Arc::new(key))));
    tls.alpn_protocols = vec![zerospice_proto::ALPN_ACCESS.to_vec()];
    quic_client(tls, true)
}

/// A client endpoint on an ephemeral port of the right address family, with large buffers.
pub fn client_endpoint(remote: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let local: SocketAddr = if remote.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let (socket, _) = zerospice_proto::udp::bind(local, zerospice_proto::udp::WANT_BUFFER)?;
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// Resolves `host:port` (an IP literal or a name).
pub async fn resolve(addr: &str) -> std::io::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address found"))
}
