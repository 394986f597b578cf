//! The Proxmox VE API client: only the calls the gateway needs, nothing generic.
//!
//! - Token auth: `Authorization: PVEAPIToken=USER@REALM!TOKENID=SECRET` on every call.
//! - TLS: verified against the configured cluster CA, or the API certificate's pinned SHA-256;
//!   `danger_accept_invalid_certs` exists for labs and warns loudly at every start.
//! - Every call has a timeout; bodies are size-limited; error bodies are redacted (the token and
//!   its header value are replaced) before they reach a log.
//! - Errors are precise for the administrator ([`ProxmoxError`]'s `Display`) and generic for the
//!   agent ([`ProxmoxError::wire`]).
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use zerospice_ca::Fingerprint;
use zerospice_proto::{ErrorCode, VmId, WireError};

use crate::config::ProxmoxConfig;

/// Largest response body read from Proxmox.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxmoxError {
    #[error("Proxmox at {url} is unreachable: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("Proxmox did not answer within {0} s")]
    Timeout(u64),
    #[error("TLS with Proxmox failed: {0}")]
    Tls(String),
    #[error("Proxmox refused the API token (401 {0}): check token_id and the token secret file")]
    Unauthorized(String),
    #[error("Proxmox denied the token a privilege (403 {0}): run `zerospice-gateway check`")]
    Forbidden(String),
    #[error("Proxmox answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("Proxmox sent an unexpected answer: {0}")]
    BadResponse(String),
    #[error("Proxmox's answer is larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("Proxmox task {upid} failed: {exit}")]
    TaskFailed { upid: String, exit: String },
}

impl ProxmoxError {
    /// What an agent is told: what happened and who can fix it, never Proxmox's details.
    pub fn wire(&self) -> WireError {
        match self {
            ProxmoxError::Unreachable { .. } | ProxmoxError::Tls(_) => WireError::new(
                ErrorCode::ProxmoxUnavailable,
                "the gateway cannot reach Proxmox; the administrator can run `zerospice-gateway check`",
            ),
            ProxmoxError::Timeout(s) => WireError::new(
                ErrorCode::ProxmoxUnavailable,
                format!("Proxmox did not answer the gateway within {s} s; try again later"),
            ),
            ProxmoxError::Unauthorized(_) => WireError::new(
                ErrorCode::ProxmoxError,
                "Proxmox refused the gateway's API token; the administrator can run `zerospice-gateway check`",
            ),
            ProxmoxError::Forbidden(_) => WireError::new(
                ErrorCode::ProxmoxError,
                "Proxmox denied the gateway a permission for this VM; the administrator can run `zerospice-gateway check`",
            ),
            ProxmoxError::Status { .. } | ProxmoxError::BadResponse(_) | ProxmoxError::TooLarge => {
                WireError::new(
                    ErrorCode::ProxmoxError,
                    "Proxmox failed the request; the details are in the gateway's log",
                )
            }
            ProxmoxError::TaskFailed { exit, .. } => WireError::new(
                ErrorCode::ProxmoxError,
                format!("Proxmox could not do it: {}", first_line(exit, 200)),
            ),
        }
    }
}

fn first_line(s: &str, max: usize) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    line.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// A guest as `/cluster/resources?type=vm` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    pub vmid: VmId,
    pub kind: String,
    pub name: String,
    pub node: String,
    pub status: String,
    pub template: bool,
    pub tags: Vec<String>,
    pub pool: Option<String>,
}

/// What `status/current` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    pub status: String,
    pub spice: bool,
    pub name: Option<String>,
}

/// The remote-viewer configuration `POST .../spiceproxy` returns, checked field by field.
#[derive(Clone)]
pub struct SpiceTicket {
    /// `pvespiceproxy:<hex time>:<vmid>:<node>:<port>::<40 hex>`
    pub host: String,
    pub tls_port: u16,
    pub password: SecretString,
    /// PEM with real newlines.
    pub ca: String,
    pub host_subject: String,
    pub title: String,
    pub secure_attention: Option<String>,
    pub toggle_fullscreen: Option<String>,
    pub release_cursor: Option<String>,
}

impl std::fmt::Debug for SpiceTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpiceTicket")
            .field("host", &self.host)
            .field("tls_port", &self.tls_port)
            .field("password", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// The effective privileges of the token: path -> privilege names.
pub type Permissions =
    std::collections::BTreeMap<String, std::collections::BTreeMap<String, Value>>;

pub struct ProxmoxClient {
    http: reqwest::Client,
    base: String,
    auth: SecretString,
    secret: SecretString,
    timeout: Duration,
    /// `host:port` of the spiceproxy the tunnel dials.
    pub spiceproxy: String,
    /// The host part of `spiceproxy` (sent as the `proxy` parameter of `spiceproxy` calls).
    pub spiceproxy_host: String,
}

impl std::fmt::Debug for ProxmoxClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxmoxClient")
            .field("base", &self.base)
            .field("spiceproxy", &self.spiceproxy)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot read the Proxmox token secret {path}: {detail}")]
    Secret { path: String, detail: String },
    #[error("cannot read the Proxmox CA file {path}: {detail}")]
    Ca { path: String, detail: String },
    #[error("proxmox.fingerprint: {0}")]
    Fingerprint(String),
    #[error("proxmox.url {0:?} is not a valid https URL")]
    Url(String),
    #[error("proxmox.token_id {0:?} is not USER@REALM!TOKENID")]
    TokenId(String),
    #[error("HTTP client: {0}")]
    Http(String),
}

impl ProxmoxClient {
    pub fn from_config(
        cfg: &ProxmoxConfig,
        config_path: &std::path::Path,
    ) -> Result<Self, SetupError> {
        let secret_path = crate::config::resolve(config_path, &cfg.token_secret_file);
        if let Err(e) = zerospice_ca::fsutil::check_private_file(&secret_path) {
            return Err(SetupError::Secret {
                path: secret_path.display().to_string(),
                detail: e.to_string(),
            });
        }
        let secret = std::fs::read_to_string(&secret_path).map_err(|e| SetupError::Secret {
            path: secret_path.display().to_string(),
            detail: e.to_string(),
        })?;
        let verifier: Arc<dyn ServerCertVerifier> = if let Some(ca) = &cfg.ca_file {
            let path = crate::config::resolve(config_path, ca);
            let pem = std::fs::read_to_string(&path).map_err(|e| SetupError::Ca {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
            let certs = zerospice_ca::pem::certificates(&pem).map_err(|e| SetupError::Ca {
                path: path.display().to_string(),
                detail: e.to_string(),
            })?;
            ca_verifier(&certs).map_err(|e| SetupError::Ca {
                path: path.display().to_string(),
                detail: e,
            })?
        } else if let Some(fp) = &cfg.fingerprint {
            let fp: Fingerprint =
                fp.parse()
                    .map_err(|e: zerospice_ca::fingerprint::InvalidFingerprint| {
                        SetupError::Fingerprint(e.to_string())
                    })?;
            Arc::new(PinnedCert::new(fp))
        } else if cfg.danger_accept_invalid_certs {
            tracing::warn!(
                "proxmox.danger_accept_invalid_certs is set: the Proxmox certificate is NOT verified; \
                 anyone on the network path can read the API token. Configure ca_file or fingerprint"
            );
            Arc::new(AcceptAnything::new())
        } else {
            return Err(SetupError::Ca {
                path: "(none)".into(),
                detail: "set proxmox.ca_file or proxmox.fingerprint".into(),
            });
        };
        Self::new(
            &cfg.url,
            &cfg.token_id,
            secret.trim(),
            verifier,
            Duration::from_secs(cfg.timeout_secs),
            cfg.spiceproxy.as_deref(),
        )
    }

    pub fn new(
        url: &str,
        token_id: &str,
        secret: &str,
        verifier: Arc<dyn ServerCertVerifier>,
        timeout: Duration,
        spiceproxy: Option<&str>,
    ) -> Result<Self, SetupError> {
        let base = url.trim_end_matches('/').to_owned();
        let host = base
            .strip_prefix("https://")
            .and_then(|rest| rest.split('/').next())
            .filter(|h| !h.is_empty())
            .ok_or_else(|| SetupError::Url(url.to_owned()))?;
        let api_host = split_host(host);
        let (user, token) = token_id
            .split_once('!')
            .ok_or_else(|| SetupError::TokenId(token_id.to_owned()))?;
        if !user.contains('@') || token.is_empty() || secret.is_empty() {
            return Err(SetupError::TokenId(token_id.to_owned()));
        }
        let spiceproxy = spiceproxy
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{api_host}:3128"));
        let spiceproxy_host = spiceproxy
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_owned())
            .unwrap_or_else(|| spiceproxy.clone());

        let mut tls = rustls::ClientConfig::builder_with_provider(crate::server::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| SetupError::Http(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| SetupError::Http(e.to_string()))?;
        Ok(Self {
            http,
            base,
            auth: SecretString::from(format!("PVEAPIToken={token_id}={secret}")),
            secret: SecretString::from(secret.to_owned()),
            timeout,
            spiceproxy,
            spiceproxy_host,
        })
    }

    /// Removes the token from text that may have echoed it.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.replace(self.auth.expose_secret(), "[redacted]");
        out = out.replace(self.secret.expose_secret(), "[redacted]");
        out
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        form: &[(&str, &str)],
    ) -> Result<Value, ProxmoxError> {
        let url = format!("{}/api2/json{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .header(reqwest::header::AUTHORIZATION, self.auth.expose_secret());
        if !form.is_empty() {
            req = req.form(form);
        }
        let resp = req.send().await.map_err(|e| self.transport_error(e))?;
        let status = resp.status();
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
            .or_else(|| status.canonical_reason().map(str::to_owned))
            .unwrap_or_default();
        let body = self.read_body(resp).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
                .filter(|m| !m.trim().is_empty())
                .unwrap_or(reason);
            let message = first_line(&self.redact(&message), 300);
            tracing::debug!(%method, path, status = status.as_u16(), %message, "proxmox error");
            return Err(match status.as_u16() {
                401 => ProxmoxError::Unauthorized(message),
                403 => ProxmoxError::Forbidden(message),
                s => ProxmoxError::Status { status: s, message },
            });
        }
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| ProxmoxError::BadResponse(format!("{path}: not JSON ({e})")))?;
        match v {
            Value::Object(mut m) => m
                .remove("data")
                .ok_or_else(|| ProxmoxError::BadResponse(format!("{path}: no data"))),
            _ => Err(ProxmoxError::BadResponse(format!("{path}: not an object"))),
        }
    }

    async fn read_body(&self, mut resp: reqwest::Response) -> Result<Vec<u8>, ProxmoxError> {
        if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(ProxmoxError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport_error(e))? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(ProxmoxError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    fn transport_error(&self, e: reqwest::Error) -> ProxmoxError {
        if e.is_timeout() {
            return ProxmoxError::Timeout(self.timeout.as_secs());
        }
        let mut detail = e.to_string();
        let mut src: Option<&dyn std::error::Error> = std::error::Error::source(&e);
        let mut tls = false;
        while let Some(s) = src {
            let text = s.to_string();
            if text.contains("certificate") || text.contains("tls") || text.contains("TLS") {
                tls = true;
            }
            detail = format!("{detail}: {text}");
            src = s.source();
        }
        let detail = self.redact(&detail);
        if tls {
            ProxmoxError::Tls(detail)
        } else {
            ProxmoxError::Unreachable {
                url: self.base.clone(),
                detail,
            }
        }
    }

    /// `GET /cluster/resources?type=vm`: the QEMU guests the token may audit (no LXC).
    pub async fn guests(&self) -> Result<Vec<Guest>, ProxmoxError> {
        let data = self
            .call(reqwest::Method::GET, "/cluster/resources?type=vm", &[])
            .await?;
        let list = data
            .as_array()
            .ok_or_else(|| ProxmoxError::BadResponse("/cluster/resources: not a list".into()))?;
        let mut out = Vec::new();
        for item in list {
            let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
            if kind != "qemu" {
                continue;
            }
            let Some(vmid) = item
                .get("vmid")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .and_then(|n| VmId::new(n).ok())
            else {
                return Err(ProxmoxError::BadResponse(
                    "/cluster/resources: guest without a valid vmid".into(),
                ));
            };
            let text = |k: &str| item.get(k).and_then(Value::as_str).map(str::to_owned);
            out.push(Guest {
                vmid,
                kind: kind.to_owned(),
                name: text("name").unwrap_or_else(|| format!("VM {vmid}")),
                node: text("node").ok_or_else(|| {
                    ProxmoxError::BadResponse(format!("/cluster/resources: VM {vmid} has no node"))
                })?,
                status: text("status").unwrap_or_else(|| "unknown".into()),
                template: item.get("template").and_then(Value::as_u64).unwrap_or(0) == 1,
                tags: text("tags")
                    .map(|t| {
                        t.split([';', ',', ' '])
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
                pool: text("pool"),
            });
        }
        out.sort_by_key(|g| g.vmid);
        Ok(out)
    }

    fn vm_path(node: &str, vmid: VmId, rest: &str) -> Result<String, ProxmoxError> {
        if node.is_empty()
            || !node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(ProxmoxError::BadResponse(format!("bad node name {node:?}")));
        }
        Ok(format!("/nodes/{node}/qemu/{vmid}{rest}"))
    }

    /// `GET .../status/current`.
    pub async fn vm_status(&self, node: &str, vmid: VmId) -> Result<VmStatus, ProxmoxError> {
        let path = Self::vm_path(node, vmid, "/status/current")?;
        let v = self.call(reqwest::Method::GET, &path, &[]).await?;
        let status = v
            .get("status")
            .and_then(Value::as_str)
            .ok_or_else(|| ProxmoxError::BadResponse(format!("{path}: no status")))?
            .to_owned();
        let spice = match v.get("spice") {
            Some(Value::Number(n)) => n.as_u64() == Some(1),
            Some(Value::Bool(b)) => *b,
            _ => false,
        };
        Ok(VmStatus {
            status,
            spice,
            name: v.get("name").and_then(Value::as_str).map(str::to_owned),
        })
    }

    /// Whether the VM's configured display is SPICE (`vga: qxl`, `qxl2`..`qxl4`).
    pub async fn vm_has_spice_display(&self, node: &str, vmid: VmId) -> Result<bool, ProxmoxError> {
        let path = Self::vm_path(node, vmid, "/config")?;
        let v = self.call(reqwest::Method::GET, &path, &[]).await?;
        Ok(v.get("vga")
            .and_then(Value::as_str)
            .map(vga_is_spice)
            .unwrap_or(false))
    }

    /// `POST .../spiceproxy` with `proxy` = the host the gateway reaches spiceproxy at.
    pub async fn spiceproxy(&self, node: &str, vmid: VmId) -> Result<SpiceTicket, ProxmoxError> {
        let path = Self::vm_path(node, vmid, "/spiceproxy")?;
        let v = self
            .call(
                reqwest::Method::POST,
                &path,
                &[("proxy", self.spiceproxy_host.as_str())],
            )
            .await?;
        parse_spice_ticket(&v, vmid).map_err(|e| ProxmoxError::BadResponse(format!("{path}: {e}")))
    }

    /// `POST .../status/{start|shutdown}`, then waits for the task (bounded).
    pub async fn power(
        &self,
        node: &str,
        vmid: VmId,
        action: zerospice_proto::access::PowerAction,
        wait: Duration,
    ) -> Result<(), ProxmoxError> {
        let path = Self::vm_path(node, vmid, &format!("/status/{}", action.as_str()))?;
        let v = self.call(reqwest::Method::POST, &path, &[]).await?;
        let upid = v
            .as_str()
            .filter(|u| u.starts_with("UPID:") && u.len() < 512)
            .ok_or_else(|| ProxmoxError::BadResponse(format!("{path}: no task id")))?
            .to_owned();
        let deadline = tokio::time::Instant::now() + wait;
        let enc: String = form_urlencode(&upid);
        loop {
            let st = self
                .call(
                    reqwest::Method::GET,
                    &format!("/nodes/{node}/tasks/{enc}/status"),
                    &[],
                )
                .await?;
            if st.get("status").and_then(Value::as_str) == Some("stopped") {
                let exit = st
                    .get("exitstatus")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown")
                    .to_owned();
                if exit == "OK" {
                    return Ok(());
                }
                return Err(ProxmoxError::TaskFailed { upid, exit });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProxmoxError::TaskFailed {
                    upid,
                    exit: format!("still running after {} s", wait.as_secs()),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `GET /access/permissions?path=PATH`: the token's effective privileges on one path.
    pub async fn permissions_at(&self, path: &str) -> Result<Permissions, ProxmoxError> {
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("/access/permissions?path={}", form_urlencode(path)),
                &[],
            )
            .await?;
        serde_json::from_value(v)
            .map_err(|e| ProxmoxError::BadResponse(format!("/access/permissions: {e}")))
    }

    /// The `vga` setting of a VM's configuration (`None`: Proxmox's default, std).
    pub async fn vm_vga(&self, node: &str, vmid: VmId) -> Result<Option<String>, ProxmoxError> {
        let path = Self::vm_path(node, vmid, "/config")?;
        let v = self.call(reqwest::Method::GET, &path, &[]).await?;
        Ok(v.get("vga").and_then(Value::as_str).map(str::to_owned))
    }

    /// `GET /access/permissions`: the token's effective privileges.
    pub async fn permissions(&self) -> Result<Permissions, ProxmoxError> {
        let v = self
            .call(reqwest::Method::GET, "/access/permissions", &[])
            .await?;
        serde_json::from_value(v)
            .map_err(|e| ProxmoxError::BadResponse(format!("/access/permissions: {e}")))
    }

    /// `GET /version`.
    pub async fn version(&self) -> Result<String, ProxmoxError> {
        let v = self.call(reqwest::Method::GET, "/version", &[]).await?;
        Ok(v.get("version")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }
}

/// The host of `host`, `host:port`, `[v6]` or `[v6]:port` (brackets kept for IPv6).
fn split_host(authority: &str) -> String {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => authority[..=end].to_owned(),
            None => authority.to_owned(),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h.to_owned(),
        _ => authority.to_owned(),
    }
}

fn form_urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// `qxl`, `qxl2`, `qxl3`, `qxl4`, optionally followed by `,memory=...`.
pub fn vga_is_spice(vga: &str) -> bool {
    let ty = vga.split(',').next().unwrap_or("");
    let ty = ty.strip_prefix("type=").unwrap_or(ty);
    matches!(ty, "qxl" | "qxl2" | "qxl3" | "qxl4")
}

/// Checks a spiceproxy answer against the documented shape. Every text field ends up in a .vv
/// (INI) file on the client, so control characters (a newline would inject keys) are refused.
pub fn parse_spice_ticket(v: &Value, vmid: VmId) -> Result<SpiceTicket, String> {
    let field = |k: &str| -> Result<String, String> {
        let s = v
            .get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| format!("field {k:?} missing or not a string"))?;
        if s.len() > 16 * 1024 {
            return Err(format!("field {k:?} too long"));
        }
        Ok(s.to_owned())
    };
    let line = |k: &str| -> Result<String, String> {
        let s = field(k)?;
        if s.is_empty() || s.chars().any(char::is_control) {
            return Err(format!("field {k:?} is empty or has control characters"));
        }
        Ok(s)
    };
    let opt_line = |k: &str| -> Result<Option<String>, String> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => line(k).map(Some),
        }
    };
    if field("type")? != "spice" {
        return Err("type is not \"spice\"".into());
    }
    let tls_port = v
        .get("tls-port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| (61000..=61999).contains(p))
        .ok_or("tls-port missing, not a number, or outside 61000-61999")?;
    let host = line("host")?;
    check_ticket(&host, vmid, tls_port)?;
    let password = line("password")?;
    if password.len() > 256 {
        return Err("password too long".into());
    }
    let ca = field("ca")?.replace("\\n", "\n");
    if ca.chars().any(|c| c.is_control() && c != '\n') {
        return Err("ca has control characters".into());
    }
    zerospice_ca::pem::certificates(&ca).map_err(|e| format!("ca: {e}"))?;
    Ok(SpiceTicket {
        host,
        tls_port,
        password: SecretString::from(password),
        ca,
        host_subject: line("host-subject")?,
        title: opt_line("title")?.unwrap_or_else(|| format!("VM {vmid}")),
        secure_attention: opt_line("secure-attention")?,
        toggle_fullscreen: opt_line("toggle-fullscreen")?,
        release_cursor: opt_line("release-cursor")?,
    })
}

/// `pvespiceproxy:<8 hex>:<vmid>:<node>:<port>::<40 hex>` for this VM and port.
pub fn check_ticket(host: &str, vmid: VmId, tls_port: u16) -> Result<(), String> {
    let bad = || format!("host is not a proxy ticket for VM {vmid} port {tls_port}");
    let rest = host.strip_prefix("pvespiceproxy:").ok_or_else(bad)?;
    let (head, sig) = rest.split_once("::").ok_or_else(bad)?;
    let parts: Vec<&str> = head.split(':').collect();
    let [time, id, node, port] = parts.as_slice() else {
        return Err(bad());
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !hex(time, 8)
        || !hex(sig, 40)
        || *id != vmid.to_string()
        || *port != tls_port.to_string()
        || node.is_empty()
        || !node.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad());
    }
    Ok(())
}

fn ca_verifier(certs: &[Vec<u8>]) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs {
        roots
            .add(CertificateDer::from(c.clone()))
            .map_err(|e| e.to_string())?;
    }
    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        crate::server::provider(),
    )
    .build()
    .map_err(|e| e.to_string())?;
    Ok(v)
}

/// Accepts exactly the server certificate with this SHA-256 (what the Proxmox UI shows as the
/// certificate fingerprint), whatever its name or chain.
#[derive(Debug)]
struct PinnedCert {
    pin: Fingerprint,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl PinnedCert {
    fn new(pin: Fingerprint) -> Self {
        Self {
            pin,
            provider: crate::server::provider(),
        }
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Fingerprint::of(end_entity).matches(&self.pin) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "certificate pin mismatch: Proxmox presents {}, the configuration pins {}",
                Fingerprint::of(end_entity),
                self.pin
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `danger_accept_invalid_certs`: verifies signatures, nothing else.
#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl AcceptAnything {
    fn new() -> Self {
        Self(crate::server::provider())
    }
}

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\\nMIIBATCBqKADAgECAgEBMAoGCCqGSM49BAMCMAAwHhcNMjQwMTAxMDAwMDAwWhcNMjUwMTAxMDAwMDAwWjAAMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAADAKBggqhkjOPQQDAgNIADBFAiEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\\n-----END CERTIFICATE-----\\n";

    fn good() -> Value {
        json!({
            "type": "spice",
            "title": "VM 100 - web",
            "host": "pvespiceproxy:6566e0c1:100:pve:61000::0123456789abcdef0123456789abcdef01234567",
            "proxy": "http://10.0.0.2:3128",
            "tls-port": 61000,
            "password": "feedfacefeedfacefeedfacefeedfacefeedface",
            "ca": PEM,
            "host-subject": "OU=PVE Cluster Node,O=Proxmox Virtual Environment,CN=pve",
            "delete-this-file": 1,
            "secure-attention": "Ctrl+Alt+Ins",
            "toggle-fullscreen": "Shift+F11",
            "release-cursor": "Ctrl+Alt+R",
        })
    }

    fn vm100() -> VmId {
        VmId::new(100).unwrap()
    }

    #[test]
    fn documented_shape_is_accepted() {
        let t = parse_spice_ticket(&good(), vm100()).unwrap();
        assert_eq!(t.tls_port, 61000);
        assert!(t.ca.starts_with("-----BEGIN CERTIFICATE-----\nMIIB"));
        assert_eq!(t.secure_attention.as_deref(), Some("Ctrl+Alt+Ins"));
        assert!(!format!("{t:?}").contains("feedface"));
    }

    #[test]
    fn wrong_shapes_are_refused() {
        let cases: &[(&str, Value, &str)] = &[
            ("tls-port", json!("61000"), "tls-port"),
            ("tls-port", json!(5900), "outside 61000-61999"),
            ("password", Value::Null, "password"),
            ("type", json!("vnc"), "type"),
            ("host", json!("pvespiceproxy:6566e0c1:101:pve:61000::0123456789abcdef0123456789abcdef01234567"), "not a proxy ticket"),
            ("host", json!("evil.example:443"), "not a proxy ticket"),
            ("host-subject", json!("CN=pve\n[virt-viewer]\nproxy=http://evil"), "control characters"),
            ("title", json!("x\r\nproxy=http://evil:1"), "control characters"),
            ("ca", json!("not a pem"), "ca"),
        ];
        for (k, val, want) in cases {
            let mut v = good();
            if val.is_null() {
                v.as_object_mut().unwrap().remove(*k);
            } else {
                v[*k] = val.clone();
            }
            let e = parse_spice_ticket(&v, vm100()).unwrap_err();
            assert!(e.contains(want), "{k}: {e}");
        }
    }

    #[test]
    fn hosts() {
        assert_eq!(split_host("pve.lan:8006"), "pve.lan");
        assert_eq!(split_host("pve.lan"), "pve.lan");
        assert_eq!(split_host("[fd00::2]:8006"), "[fd00::2]");
        assert_eq!(split_host("10.0.0.2:8006"), "10.0.0.2");
    }

    #[test]
    fn spice_displays() {
        assert!(vga_is_spice("qxl"));
        assert!(vga_is_spice("qxl2,memory=32"));
        assert!(vga_is_spice("type=qxl,memory=16"));
        assert!(!vga_is_spice("std"));
        assert!(!vga_is_spice("virtio"));
        assert!(!vga_is_spice("qxl5"));
    }

    #[test]
    fn agent_messages_leak_nothing() {
        let e = ProxmoxError::Status {
            status: 500,
            message: "internal: /etc/pve/priv/secret".into(),
        };
        assert!(!e.wire().message.contains("secret"));
        assert_eq!(e.wire().code, ErrorCode::ProxmoxError);
        assert_eq!(
            ProxmoxError::Timeout(10).wire().message,
            "Proxmox did not answer the gateway within 10 s; try again later"
        );
    }
}
