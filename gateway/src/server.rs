//! The QUIC endpoints and the `serve` loop.
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use quinn::crypto::rustls::QuicServerConfig;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tracing::{info, warn, Instrument};
use zerospice_ca::keys::{tls_signing_key, KeyAlgorithm, SoftwareKey};
use zerospice_ca::{CertificateAuthority, Signer};
use zerospice_proto::error::close;

use crate::config::Config;
use crate::enrollment::{Enrollment, YubikeyAttestation};
use crate::paths::Paths;
use crate::store::Store;

/// Concurrent enrollment connections (beyond this, new ones are refused).
pub const MAX_ENROLL_CONNECTIONS: usize = 64;

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Everything `serve` and the admin commands load from disk.
pub struct Loaded {
    pub paths: Paths,
    pub config: Config,
    pub store: Arc<Store>,
    pub ca: Arc<CertificateAuthority>,
}

impl Loaded {
    pub fn load(paths: &Paths) -> anyhow::Result<Self> {
        if !paths.ca_key().exists() {
            anyhow::bail!(
                "{} holds no ZeroSpice gateway (no ca.key): run `zerospice-gateway init --dir {}` first",
                paths.dir.display(),
                paths.dir.display()
            );
        }
        paths.check_permissions()?;
        let config = Config::load(&paths.config)?;
        let store = Arc::new(Store::open(&paths.db())?);
        let ca = load_ca(paths)?;
        Ok(Self {
            paths: paths.clone(),
            config,
            store,
            ca: Arc::new(ca),
        })
    }
}

pub fn load_ca(paths: &Paths) -> anyhow::Result<CertificateAuthority> {
    let key_pem = zeroize::Zeroizing::new(
        std::fs::read_to_string(paths.ca_key())
            .with_context(|| format!("reading {}", paths.ca_key().display()))?,
    );
    let key = SoftwareKey::from_pem(&key_pem)
        .with_context(|| format!("parsing {}", paths.ca_key().display()))?;
    let cert_pem = std::fs::read_to_string(paths.ca_cert())
        .with_context(|| format!("reading {}", paths.ca_cert().display()))?;
    let cert = zerospice_ca::pem::first_certificate(&cert_pem)
        .with_context(|| format!("parsing {}", paths.ca_cert().display()))?;
    Ok(CertificateAuthority::from_parts(&cert, Box::new(key))?)
}

/// The gateway's TLS identity: a fresh key (memory only) and a certificate from its CA, sent
/// with the CA certificate so that enrolling clients can check the pinned fingerprint.
pub fn server_identity(ca: &CertificateAuthority) -> anyhow::Result<Arc<CertifiedKey>> {
    let key = SoftwareKey::generate(KeyAlgorithm::EcdsaP256)?;
    let cert = ca.issue_server(
        &key,
        zerospice_proto::GATEWAY_SERVER_NAME,
        OffsetDateTime::now_utc(),
        time::Duration::days(397),
    )?;
    let chain = vec![
        CertificateDer::from(cert.der),
        CertificateDer::from(ca.cert_der().to_vec()),
    ];
    let signer: Arc<dyn Signer> = Arc::new(key);
    Ok(Arc::new(CertifiedKey::new(chain, tls_signing_key(signer))))
}

pub fn tls13_server(
) -> anyhow::Result<rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier>> {
    Ok(rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?)
}

/// Enrollment endpoint: no client certificate, tiny windows, one stream per connection.
pub fn enroll_server_config(identity: Arc<CertifiedKey>) -> anyhow::Result<quinn::ServerConfig> {
    let mut tls = tls13_server()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(identity)));
    tls.alpn_protocols = vec![zerospice_proto::ALPN_ENROLL.to_vec()];
    tls.max_early_data_size = 0;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(2u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window((64u32 * 1024).into())
        .receive_window((128u32 * 1024).into())
        .send_window(128 * 1024)
        .max_idle_timeout(Some(Duration::from_secs(20).try_into()?))
        .datagram_receive_buffer_size(None);
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls)?));
    cfg.transport_config(Arc::new(transport));
    cfg.max_incoming(256);
    Ok(cfg)
}

/// Binds a QUIC endpoint with large UDP buffers.
pub fn bind_endpoint(
    addr: SocketAddr,
    server: quinn::ServerConfig,
) -> anyhow::Result<quinn::Endpoint> {
    let (socket, buffers) = zerospice_proto::udp::bind(addr, zerospice_proto::udp::WANT_BUFFER)
        .with_context(|| format!("binding UDP {addr}"))?;
    if buffers.is_short() {
        warn!(
            %addr,
            recv = buffers.recv,
            send = buffers.send,
            wanted = buffers.requested,
            "UDP socket buffers are smaller than requested; raise net.core.rmem_max and net.core.wmem_max (see INSTALL.md)"
        );
    }
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// Accepts enrollment connections until the endpoint is closed.
pub async fn run_enrollment(endpoint: quinn::Endpoint, svc: Arc<Enrollment>) {
    let slots = Arc::new(Semaphore::new(MAX_ENROLL_CONNECTIONS));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!(peer = %incoming.remote_address(), "enrollment connection refused: too many at once");
            incoming.refuse();
            continue;
        };
        let svc = svc.clone();
        let peer = incoming.remote_address();
        let span = tracing::info_span!("enroll", %peer);
        tokio::spawn(
            async move {
                let _permit = permit;
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "enrollment handshake failed");
                        return;
                    }
                };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let svc = svc.clone();
                    tokio::spawn(
                        async move { svc.handle_stream(send, recv, peer.ip()).await }
                            .in_current_span(),
                    );
                }
            }
            .instrument(span),
        );
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Ends sessions whose window passed without a channel, so they are audited promptly.
pub async fn sweep_sessions(state: Arc<crate::access::AccessState>) {
    let mut interval = tokio::time::interval(Duration::from_secs(5));
    loop {
        interval.tick().await;
        let ended = state.sessions().sweep(std::time::Instant::now());
        if !ended.is_empty() {
            state.sessions_ended(ended).await;
        }
    }
}

/// The Proxmox client of the configuration, if one is configured.
pub fn proxmox_client(
    cfg: &Config,
    config_path: &std::path::Path,
) -> anyhow::Result<Option<Arc<crate::proxmox::ProxmoxClient>>> {
    let Some(p) = &cfg.proxmox else {
        warn!(
            "no [proxmox] section in the configuration: agents can enroll but not list or open VMs"
        );
        return Ok(None);
    };
    let client = crate::proxmox::ProxmoxClient::from_config(p, config_path)
        .context("setting up the Proxmox client")?;
    Ok(Some(Arc::new(client)))
}

/// The YubiKey attestation roots of the configuration: Yubico's (built in, from `ca/roots/`)
/// unless `disable_builtin_roots`, plus every certificate of every `extra_roots` file.
pub fn attestation_roots(
    cfg: &Config,
    config_path: &std::path::Path,
) -> anyhow::Result<zerospice_ca::attestation::AttestationRoots> {
    use zerospice_ca::attestation::AttestationRoots;
    let mut roots = if cfg.attestation.disable_builtin_roots {
        AttestationRoots::empty()
    } else {
        AttestationRoots::yubico()
    };
    for file in &cfg.attestation.extra_roots {
        let path = crate::config::resolve(config_path, file);
        let pem = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the attestation root file {}", path.display()))?;
        let n = roots
            .add_pem(&pem)
            .with_context(|| format!("attestation root file {}", path.display()))?;
        info!(file = %path.display(), certificates = n, "extra attestation roots trusted");
    }
    if roots.is_empty() {
        warn!("no YubiKey attestation roots are trusted: every hardware key enrollment will be refused");
    }
    Ok(roots)
}

/// Runs the gateway until SIGINT/SIGTERM.
pub async fn serve(paths: &Paths) -> anyhow::Result<()> {
    let loaded = Loaded::load(paths)?;
    let cfg = &loaded.config;
    let identity = server_identity(&loaded.ca)?;
    let proxmox = proxmox_client(cfg, &paths.config)?;

    let enrollment = Arc::new(
        Enrollment::new(
            loaded.store.clone(),
            loaded.ca.clone(),
            cfg,
            cfg.public_access_addr(),
            Arc::new(YubikeyAttestation {
                roots: attestation_roots(cfg, &paths.config)?,
            }),
        )
        .map_err(|_| anyhow::anyhow!("random number generator failed"))?,
    );
    let enroll_ep = bind_endpoint(cfg.listen.enroll, enroll_server_config(identity.clone())?)?;
    info!(
        addr = %enroll_ep.local_addr()?,
        ca = %loaded.ca.fingerprint(),
        "enrollment endpoint listening"
    );
    let access_ep = bind_endpoint(
        cfg.listen.access,
        crate::access::access_server_config(identity, &loaded.ca, &cfg.sessions)?,
    )?;
    info!(addr = %access_ep.local_addr()?, "access endpoint listening");
    let state = crate::access::AccessState::new(
        loaded.store.clone(),
        loaded.ca.clone(),
        cfg.clone(),
        proxmox,
    );
    let tasks = [
        tokio::spawn(run_enrollment(enroll_ep.clone(), enrollment)),
        tokio::spawn(crate::access::run_access(access_ep.clone(), state.clone())),
        tokio::spawn(crate::access::watch_revocations(state.clone())),
        tokio::spawn(sweep_sessions(state.clone())),
    ];
    info!(
        enroll = %cfg.public_enroll_addr(),
        access = %cfg.public_access_addr(),
        "gateway ready"
    );

    shutdown_signal().await;
    info!("shutting down");
    for ep in [&enroll_ep, &access_ep] {
        ep.close(close::SHUTDOWN.into(), b"gateway shutting down");
    }
    let _ = tokio::time::timeout(Duration::from_secs(3), async {
        enroll_ep.wait_idle().await;
        access_ep.wait_idle().await;
    })
    .await;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra_roots: Vec<std::path::PathBuf>, disable_builtin_roots: bool) -> Config {
        let mut c: Config =
            toml::from_str("[listen]\naccess = \"127.0.0.1:7443\"\nenroll = \"127.0.0.1:7444\"\n")
                .unwrap();
        c.attestation.extra_roots = extra_roots;
        c.attestation.disable_builtin_roots = disable_builtin_roots;
        c
    }

    #[test]
    fn attestation_roots_come_from_the_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("gateway.toml");
        // Built in: Yubico's PIV root and Attestation Root 1.
        let builtin = attestation_roots(&config(vec![], false), &cfg_path).unwrap();
        assert_eq!(builtin.len(), 2);
        // An extra root file, relative to the configuration file, with the built-in ones off.
        let (ca, _) =
            zerospice_ca::CertificateAuthority::generate(OffsetDateTime::now_utc()).unwrap();
        std::fs::write(dir.path().join("test-root.pem"), ca.cert_pem()).unwrap();
        let only =
            attestation_roots(&config(vec!["test-root.pem".into()], true), &cfg_path).unwrap();
        assert_eq!(only.len(), 1);
        let both =
            attestation_roots(&config(vec!["test-root.pem".into()], false), &cfg_path).unwrap();
        assert_eq!(both.len(), 3);
        // Missing and empty files are errors that name the file.
        let e =
            attestation_roots(&config(vec!["missing.pem".into()], false), &cfg_path).unwrap_err();
        assert!(format!("{e:#}").contains("missing.pem"), "{e:#}");
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let e = attestation_roots(&config(vec!["empty.pem".into()], false), &cfg_path).unwrap_err();
        assert!(
            format!("{e:#}")
                .contains("empty.pem: malformed attestation root PEM: no certificate found"),
            "{e:#}"
        );
    }
}
