//! A whole ZeroSpice installation on loopback: the Proxmox stand-in (API + spiceproxy) in this
//! process, an echo server (or a real QEMU) behind its spiceproxy, and the real
//! `zerospice-gateway` configured against the stand-in (pinned cluster CA, token secret file).
//! Agents are the real `zerospice-agent` binary with enrolled profiles.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::echo::EchoServer;
use crate::harness::{bin, enroll, oathtool, run_bounded, GatewayHome, NewUser, Proc};
use crate::pve::{PveConfig, PveStandin};

/// Bound on every wait of the lab.
pub const WAIT: Duration = Duration::from_secs(20);

pub struct Lab {
    pub echo: EchoServer,
    pub pve: PveStandin,
    pub home: GatewayHome,
    pub gateway: Option<Proc>,
    /// Holds the copies of the cluster CA and the token secret given to `init`.
    pub files: tempfile::TempDir,
}

impl Lab {
    /// The stand-in's example cluster with every SPICE VM pointed at an echo server.
    pub async fn example_config(echo: &EchoServer) -> PveConfig {
        let mut config = PveConfig::example();
        for vm in &mut config.vms {
            vm.spice_target = Some(echo.addr());
        }
        config
    }

    /// Starts the stand-in and initialises (but does not start) a gateway configured for it.
    pub async fn init(config: PveConfig, extra_init: &[&str]) -> anyhow::Result<Lab> {
        let echo = EchoServer::start().await?;
        Self::init_with(echo, config, extra_init).await
    }

    pub async fn init_with(
        echo: EchoServer,
        config: PveConfig,
        extra_init: &[&str],
    ) -> anyhow::Result<Lab> {
        let secret = config.token_secret.clone();
        let token_id = config.token_id.clone();
        let pve = PveStandin::start(config).await?;
        let files = tempfile::tempdir()?;
        let ca = files.path().join("pve-root-ca.pem");
        pve.write_ca_pem(&ca)?;
        let token = files.path().join("token");
        std::fs::write(&token, format!("{secret}\n"))?;
        let spiceproxy = pve.spiceproxy_addr().to_string();
        let api = pve.api_url();
        let mut args = vec![
            "--proxmox-url",
            &api,
            "--proxmox-token-id",
            &token_id,
            "--proxmox-token-secret-file",
            token.to_str().context("path")?,
            "--proxmox-ca-file",
            ca.to_str().context("path")?,
            "--spiceproxy",
            &spiceproxy,
        ];
        args.extend_from_slice(extra_init);
        let home = tokio::task::block_in_place(|| GatewayHome::init(&args))?;
        Ok(Lab {
            echo,
            pve,
            home,
            gateway: None,
            files,
        })
    }

    /// `init` + `serve` on the example cluster.
    pub async fn start() -> anyhow::Result<Lab> {
        let echo = EchoServer::start().await?;
        let config = Self::example_config(&echo).await;
        let mut lab = Self::init_with(echo, config, &[]).await?;
        lab.serve()?;
        Ok(lab)
    }

    pub fn serve(&mut self) -> anyhow::Result<()> {
        let gw = tokio::task::block_in_place(|| self.home.serve())?;
        self.gateway = Some(gw);
        Ok(())
    }

    pub fn gateway_log(&self) -> String {
        self.gateway.as_ref().map(Proc::log).unwrap_or_default()
    }

    pub fn add_user(&self, name: &str, extra: &[&str]) -> anyhow::Result<NewUser> {
        tokio::task::block_in_place(|| self.home.add_user(name, extra))
    }

    /// Enrolls `user` as `device` into a fresh profile directory; returns the directory.
    pub fn enroll(&self, user: &NewUser, device: &str) -> anyhow::Result<PathBuf> {
        tokio::task::block_in_place(|| {
            let profile = self
                .home
                .path()
                .join(format!("profile-{}-{device}", user.name));
            let code = oathtool(&user.secret_base32)?;
            let out = enroll(&user.invitation, &code, device, &profile)?;
            if !out.status.success() {
                bail!(
                    "enrolling {}: {}",
                    user.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(profile)
        })
    }

    /// `add_user` + `enroll`.
    pub fn user(&self, name: &str, extra: &[&str]) -> anyhow::Result<PathBuf> {
        let u = self.add_user(name, extra)?;
        self.enroll(&u, "laptop")
    }

    /// Runs a gateway admin command.
    pub fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        tokio::task::block_in_place(|| self.home.run_ok(args))
    }

    /// The audit trail as JSON records.
    pub fn audit(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let out = self.admin(&["--json", "audit", "--limit", "1000"])?;
        Ok(serde_json::from_str(&out)?)
    }
}

/// `zerospice-agent --profile DIR ...` as a command.
pub fn agent_cmd(profile: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin("zerospice-agent"));
    c.arg("--profile")
        .arg(profile)
        .args(args)
        .env_remove("ZEROSPICE_PROFILE")
        .env_remove("ZEROSPICE_LOG")
        .env_remove("ZEROSPICE_VIEWER");
    c
}

/// Runs the agent to completion (bounded).
pub fn agent(profile: &Path, args: &[&str]) -> anyhow::Result<Output> {
    let c = agent_cmd(profile, args);
    tokio::task::block_in_place(|| run_bounded(c, Duration::from_secs(60)))
}

/// Runs the agent and returns stdout, failing with its stderr if it fails.
pub fn agent_ok(profile: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = agent(profile, args)?;
    if !out.status.success() {
        bail!(
            "zerospice-agent {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs the agent expecting failure; returns stderr.
pub fn agent_err(profile: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = agent(profile, args)?;
    if out.status.success() {
        bail!(
            "zerospice-agent {args:?} succeeded unexpectedly: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A running `zerospice-agent connect VMID --no-viewer --json`.
pub struct Connected {
    pub proc: Proc,
    pub proxy: std::net::SocketAddr,
    pub host: String,
    pub tls_port: u16,
    pub session: String,
}

impl Connected {
    pub fn start(profile: &Path, vmid: u32) -> anyhow::Result<Connected> {
        let vmid = vmid.to_string();
        let c = agent_cmd(profile, &["--json", "connect", &vmid, "--no-viewer"]);
        let mut proc = tokio::task::block_in_place(|| Proc::spawn("agent", c))?;
        let start = Instant::now();
        let line = loop {
            if let Some(l) = proc.log().lines().find(|l| l.starts_with("{\"proxy\"")) {
                break l.to_owned();
            }
            if start.elapsed() > WAIT {
                bail!("the agent did not open a session:\n{}", proc.log());
            }
            if let Some(code) = proc.exited() {
                bail!("the agent exited ({code}):\n{}", proc.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let v: serde_json::Value = serde_json::from_str(&line)?;
        let proxy = v["proxy"]
            .as_str()
            .and_then(|p| p.strip_prefix("http://"))
            .context("proxy")?
            .parse()?;
        Ok(Connected {
            proxy,
            host: v["host"].as_str().context("host")?.to_owned(),
            tls_port: v["tls_port"].as_u64().context("tls_port")? as u16,
            session: v["session"].as_str().context("session")?.to_owned(),
            proc,
        })
    }

    /// `<ticket>:<port>`, what a viewer names in CONNECT.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.tls_port)
    }

    /// Opens one channel through the proxy as remote-viewer does; returns the stream after `200`.
    pub async fn channel(&self) -> anyhow::Result<TcpStream> {
        let (s, head) = connect_through(self.proxy, &self.authority(), &self.authority()).await?;
        if !head.starts_with("HTTP/1.0 200") {
            bail!("proxy answered {head:?}");
        }
        Ok(s)
    }
}

/// Sends `CONNECT target` with `Host: host` as remote-viewer does, returns the stream and the
/// answer head (or the whole answer if the proxy closed).
pub async fn connect_through(
    proxy: std::net::SocketAddr,
    target: &str,
    host: &str,
) -> anyhow::Result<(TcpStream, String)> {
    let mut s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!(
            "CONNECT {target} HTTP/1.0\r\nHost: {host}\r\nProxy-Connection: keep-alive\r\nUser-Agent: GLib/2.74\r\n\r\n"
        )
        .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    let read = async {
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
            if s.read(&mut b).await? == 0 {
                break;
            }
            head.push(b[0]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(WAIT, read)
        .await
        .context("no answer from the proxy")??;
    let mut text = String::from_utf8_lossy(&head).into_owned();
    if !text.starts_with("HTTP/1.0 200") {
        // Error answers carry a body: read it too.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        text.push_str(&String::from_utf8_lossy(&rest));
    }
    Ok((s, text))
}

/// Writes `data` and reads back as many bytes, concurrently (an echo round trip).
pub async fn echo_round_trip(s: TcpStream, data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let (mut r, mut w) = s.into_split();
    let data = data.to_vec();
    let n = data.len();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await?;
        w.shutdown().await?;
        Ok::<_, std::io::Error>(w)
    });
    let mut got = Vec::with_capacity(n);
    tokio::time::timeout(Duration::from_secs(60), r.read_to_end(&mut got))
        .await
        .context("echo timed out")??;
    writer.await??;
    Ok(got)
}

/// Reads lines of a child's output until one matches (used for progress lines).
pub fn first_line_matching(text: &str, pred: impl Fn(&str) -> bool) -> Option<String> {
    BufReader::new(text.as_bytes())
        .lines()
        .map_while(Result::ok)
        .find(|l| pred(l))
}

// ---- crafted certificates and raw clients, for the attack tests ----

use std::net::SocketAddr;
use std::sync::Arc;

use zerospice_ca::{
    CertificateAuthority, ClientCertRequest, DeviceName, IssuedCertificate, KeyProvenance, Signer,
    SoftwareKey, UserName, ValidatedCsr,
};
use zerospice_proto::access::{Request, Response};
use zerospice_proto::frame::{MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};

impl Lab {
    /// The gateway's CA (loaded from its state directory, as the gateway does).
    pub fn ca(&self) -> anyhow::Result<CertificateAuthority> {
        let paths = zerospice_gateway::paths::Paths::new(self.home.path().to_path_buf(), None);
        zerospice_gateway::server::load_ca(&paths)
    }

    /// The access endpoint's address.
    pub fn access_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.home.access_port))
    }

    /// Records a certificate in the gateway's database, as enrollment would.
    pub fn record(
        &self,
        issued: &IssuedCertificate,
        user: &str,
        device: &str,
    ) -> anyhow::Result<()> {
        self.record_key(issued, user, device, KeyProvenance::Software, None, None)
    }

    /// [`Lab::record`] for a key of the given provenance and recorded PIN/touch policies.
    pub fn record_key(
        &self,
        issued: &IssuedCertificate,
        user: &str,
        device: &str,
        key: KeyProvenance,
        pin_policy: Option<&str>,
        touch_policy: Option<&str>,
    ) -> anyhow::Result<()> {
        let store = zerospice_gateway::store::Store::open(&self.home.db())?;
        store.write(|tx| {
            tx.insert_certificate(&zerospice_gateway::store::NewCertificate {
                serial: issued.serial.to_string(),
                user: user.into(),
                device: device.into(),
                fingerprint: issued.fingerprint.to_string(),
                key_fingerprint: issued.key_fingerprint.to_string(),
                key_kind: key.kind().into(),
                hardware_serial: key.hardware_serial(),
                pin_policy: pin_policy.map(Into::into),
                touch_policy: touch_policy.map(Into::into),
                not_before: issued.not_before,
                not_after: issued.not_after,
                issued_at: issued.not_before,
                der: issued.der.clone(),
            })
        })?;
        Ok(())
    }

    /// A copy of profile `base` whose certificate and key are replaced by `issued` and `key`.
    pub fn profile_with(
        &self,
        base: &Path,
        name: &str,
        issued: &IssuedCertificate,
        key: &SoftwareKey,
    ) -> anyhow::Result<PathBuf> {
        use zerospice_enroll::profile::{ProfileDir, CA_FILE, CERT_FILE, KEY_FILE};
        let src = ProfileDir::new(base);
        let mut profile = src.load()?;
        let dst = ProfileDir::new(self.home.path().join(name));
        dst.create()?;
        dst.write_public(CA_FILE, &std::fs::read_to_string(src.file(CA_FILE))?)?;
        dst.write_public(CERT_FILE, &issued.pem())?;
        dst.write_private(KEY_FILE, key.to_pem().as_bytes())?;
        profile.serial = issued.serial.to_string();
        profile.not_after = issued.not_after;
        dst.save(&profile)?;
        Ok(dst.dir)
    }
}

/// Issues a client certificate for `user@device` from `ca`, valid from `now` for `validity`.
pub fn client_cert(
    ca: &CertificateAuthority,
    key: &SoftwareKey,
    user: &str,
    device: &str,
    now: time::OffsetDateTime,
    validity: time::Duration,
) -> anyhow::Result<IssuedCertificate> {
    client_cert_as(
        ca,
        key,
        KeyProvenance::Software,
        user,
        device,
        now,
        validity,
    )
}

/// [`client_cert`] with the key provenance the certificate states (a test may claim a YubiKey
/// for a software key: the CA certifies what it is told).
pub fn client_cert_as(
    ca: &CertificateAuthority,
    key: &SoftwareKey,
    provenance: KeyProvenance,
    user: &str,
    device: &str,
    now: time::OffsetDateTime,
    validity: time::Duration,
) -> anyhow::Result<IssuedCertificate> {
    let csr = zerospice_ca::csr::build_csr(key, user)?;
    let csr = ValidatedCsr::parse(&csr)?;
    Ok(ca.issue_client(&ClientCertRequest {
        csr: &csr,
        user: &UserName::new(user)?,
        device: &DeviceName::new(device)?,
        key: provenance,
        now,
        validity,
    })?)
}

/// A fresh P-256 software key.
pub fn new_key() -> SoftwareKey {
    SoftwareKey::generate(zerospice_ca::KeyAlgorithm::EcdsaP256).expect("key")
}

/// A QUIC connection to the access endpoint with any (or no) client certificate. The result of
/// the handshake as the client saw it; refusals of the certificate usually arrive with the first
/// request.
pub async fn raw_connect(
    addr: SocketAddr,
    ca_der: &[u8],
    client: Option<(Vec<u8>, Arc<dyn Signer>)>,
) -> Result<quinn::Connection, String> {
    let cfg = match client {
        Some((cert, signer)) => zerospice_enroll::tls::access_client_config(ca_der, cert, signer)
            .map_err(|e| e.to_string())?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(rustls_pki_types::CertificateDer::from(ca_der.to_vec()))
                .map_err(|e| e.to_string())?;
            let mut tls =
                rustls::ClientConfig::builder_with_provider(zerospice_enroll::tls::provider())
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .map_err(|e| e.to_string())?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
            tls.alpn_protocols = vec![zerospice_proto::ALPN_ACCESS.to_vec()];
            quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(tls)
                    .map_err(|e| e.to_string())?,
            ))
        }
    };
    let endpoint = zerospice_enroll::tls::client_endpoint(addr).map_err(|e| e.to_string())?;
    let connecting = endpoint
        .connect_with(cfg, addr, zerospice_proto::GATEWAY_SERVER_NAME)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(WAIT, connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}

/// Sends one request on a new stream and returns the raw answer bytes (frame included), or
/// the connection error.
pub async fn raw_request(conn: &quinn::Connection, req: &Request) -> Result<Vec<u8>, String> {
    let io = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let frame =
            zerospice_proto::frame::encode(req, MAX_REQUEST_FRAME).map_err(|e| e.to_string())?;
        send.write_all(&frame).await.map_err(|e| e.to_string())?;
        let _ = send.finish();
        recv.read_to_end(MAX_RESPONSE_FRAME + 4)
            .await
            .map_err(|e| e.to_string())
    };
    match tokio::time::timeout(WAIT, io).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(conn.close_reason().map(|r| r.to_string()).unwrap_or(e)),
        Err(_) => Err("no answer".into()),
    }
}

/// Decodes a raw answer.
pub fn decode(bytes: &[u8]) -> anyhow::Result<Response> {
    Ok(zerospice_proto::frame::decode::<Response>(bytes, MAX_RESPONSE_FRAME)?.0)
}
