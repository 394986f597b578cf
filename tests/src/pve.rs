//! A Proxmox VE stand-in for tests: the HTTPS API (token auth, privileges, the guest endpoints the
//! gateway uses, `spiceproxy` tickets) and the spiceproxy daemon (HTTP CONNECT with a ticket),
//! on loopback, recording what it is asked and able to misbehave on demand.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use zerospice_tests::{echo::EchoServer, pve::{PveConfig, PveStandin}};
//! let echo = EchoServer::start().await?;
//! let mut config = PveConfig::example();
//! config.vm_mut(100).unwrap().spice_target = Some(echo.addr());
//! let pve = PveStandin::start(config).await?;
//! println!("{} {}", pve.api_url(), pve.token_header_value());
//! # Ok(()) }
//! ```
//!
//! Faithful to Proxmox (pve-http-server, pve-access-control, qemu-server, pve-common) where the
//! gateway could notice: status codes and reason phrases, `{"data": ...}` bodies, the token header
//! parsing, permission errors, the ticket format and age window, the daemon's `401 invalid ticket`.
//! Simplified: one token, privileges given directly (no roles, users or privsep intersection),
//! tasks that only change a guest's state, ECDSA instead of RSA keys.
//!
//! # API (`https://127.0.0.1:PORT/api2/json`)
//!
//! | call | needs | answer |
//! |---|---|---|
//! | `GET /version` | token | `{version, release, repoid}` |
//! | `GET /cluster/resources[?type=vm\|node]` | token | guests with `VM.Audit` (qemu and lxc), nodes with `Sys.Audit` |
//! | `GET /access/permissions[?path=][&userid=]` | token | `{"/vms/100": {"VM.Audit": 1, ...}, ...}` |
//! | `GET /nodes`, `GET /nodes/{node}/qemu` | token | node list; the node's VMs with `VM.Audit` |
//! | `GET /nodes/{node}/qemu/{vmid}/status/current` | `VM.Audit` | `status`, `qmpstatus` (running only), `spice: 1` if qxl/virtio, ... |
//! | `GET /nodes/{node}/qemu/{vmid}/config` | `VM.Audit` | `vga`, `name`, `memory`, `digest`, ... |
//! | `POST /nodes/{node}/qemu/{vmid}/spiceproxy [proxy=]` | `VM.Console` | the remote-viewer config |
//! | `POST /nodes/{node}/qemu/{vmid}/status/{start,shutdown,stop,reboot}` | `VM.PowerMgmt` | a UPID |
//! | `GET /nodes/{node}/tasks/{upid}/status` | own task, or `Sys.Audit` | `status` running/stopped, `exitstatus` |
//!
//! Errors, as Proxmox sends them:
//! - token missing/wrong: `401` with the reason Proxmox gives (`No ticket`, `invalid token value!`,
//!   `no such token 'x' for user 'u@r'`, `no such user ('u@r')`) and **no body** (pve-http-server
//!   answers authentication failures without content). A 401 can be delayed like Proxmox's 3 s with
//!   [`PveConfig::auth_failure_delay`].
//! - other errors: status, reason = first line of the message, body
//!   `{"data": null, "message": "...\n"}` (plus `errors` for `400 Parameter verification failed.`).
//! - `403 Permission check failed (/vms/100, VM.Console)`; checked before the node and the guest,
//!   so an unknown VM without privileges is a 403, with privileges a
//!   `500 Configuration file 'nodes/pve/qemu-server/999.conf' does not exist`.
//! - a node outside the cluster: `596 no such cluster node 'x'`.
//! - unknown API path: `501 Method 'GET /x' not implemented`; outside `/api2/json`:
//!   `501 no such file '/x'`; other methods: `501 method 'PATCH' not available`.
//! - `spiceproxy` on a stopped VM: `500 VM 101 not running`; without SPICE display:
//!   `500 no spice port`; unknown parameters: `400` with `errors`.
//!
//! `/access/permissions` has pve-access-control's shape: path -> privilege -> propagate flag (1/0),
//! over the default top-level paths, the ACL paths and the pooled guests' `/vms/{id}`, listing only
//! paths where the token holds something.
//!
//! `spiceproxy` answers `delete-this-file` as the number `1` and `tls-port` as a number, as real
//! Proxmox does (`'delete-this-file' => 1` in `PVE::AccessControl::remote_viewer_config`, and a
//! captured Proxmox 8 answer shows `"delete-this-file": 1`); everything else is a string.
//!
//! # spiceproxy daemon (`127.0.0.1:PORT`, Proxmox's 3128)
//!
//! `CONNECT <ticket>:<tls-port> HTTP/1.x` with the same string in `Host:`. Valid ticket: connects
//! to the VM's `spice_target`, answers `HTTP/1.x 200 OK\r\n\r\n` and relays with half-close.
//! Bad ticket (format, signature, age outside (-20, 40) s, port mismatch or outside 61000-61999):
//! `HTTP/1.x 401 invalid ticket` with pve-http-server's headers, then close. Non-CONNECT: `501`;
//! garbage or an oversized head: `400`; stopped VM or no `spice_target`: closed without an answer.

mod api;
mod certs;
mod config;
mod perms;
pub(crate) mod qmp;
mod server;
mod spiceproxy;
mod state;
mod ticket;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use rustls_pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tracing::warn;

pub use config::{Acl, GuestKind, PveConfig, VmDef, VmStatus};
pub use spiceproxy::{head_end, parse_head, ConnectHead, HeadError};
pub use ticket::{TicketError, SPICE_PORTS};

use state::{ScopedFault, Shared};

/// How long the spiceproxy daemon waits for a complete request head.
pub const SPICEPROXY_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// A way to misbehave, set at run time with [`PveStandin::set_fault`] and friends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every API call gets `401 invalid token value!`, even with the right token.
    Unauthorized,
    /// Every API call gets a 500 with this reason; the JSON `message` also echoes the request's
    /// `Authorization` header, as a badly behaved proxy would (to test that the gateway redacts).
    ServerError { message: String },
    /// Every API call is answered only after this delay.
    Slow(Duration),
    /// `spiceproxy` tickets are issued 60 s in the past, so the daemon refuses them.
    ExpiredTickets,
    /// The spiceproxy daemon answers `401 invalid ticket` to every CONNECT.
    SpiceproxyUnauthorized,
    /// `POST .../spiceproxy` answers `tls-port` as a string and no `password`.
    Malformed,
}

/// How the `Authorization` header of a call looked to the stand-in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenCheck {
    /// No `Authorization` header.
    Missing,
    /// A header that is not `PVEAPIToken=` with the configured token id and secret.
    Invalid,
    Valid,
}

/// One API request as received.
#[derive(Clone, Debug)]
pub struct ApiCall {
    pub at: SystemTime,
    pub method: String,
    /// The percent-decoded path, e.g. `/api2/json/nodes/pve/qemu/100/spiceproxy`.
    pub path: String,
    pub query: Option<String>,
    /// Query and body parameters (form-encoded or JSON).
    pub params: BTreeMap<String, String>,
    pub token: TokenCheck,
    pub status: u16,
}

impl ApiCall {
    /// The path below `/api2/json`, e.g. `/cluster/resources`.
    pub fn api_path(&self) -> Option<&str> {
        self.path.strip_prefix("/api2/json")
    }

    /// `call.is("POST", "/nodes/pve/qemu/100/spiceproxy")`.
    pub fn is(&self, method: &str, api_path: &str) -> bool {
        self.method == method && self.api_path() == Some(api_path)
    }
}

/// One connection to the spiceproxy daemon.
#[derive(Clone, Debug)]
pub struct ProxyConnect {
    pub id: u64,
    pub at: SystemTime,
    pub peer: SocketAddr,
    pub request_line: Option<String>,
    pub host: Option<String>,
    /// The status answered; `None` when the daemon closed without answering.
    pub status: Option<u16>,
    /// The VM of a valid ticket.
    pub vmid: Option<u32>,
    pub target: Option<SocketAddr>,
    /// Why it was refused or how the relay ended, if not cleanly.
    pub error: Option<String>,
    pub bytes_to_target: u64,
    pub bytes_to_client: u64,
    /// The daemon is done with the connection (refused, or both directions finished).
    pub closed: bool,
}

/// A ticket and one-time password handed out by `POST .../spiceproxy`.
#[derive(Clone, Debug)]
pub struct IssuedTicket {
    pub vmid: u32,
    pub node: String,
    /// The proxy ticket (`host` of the answer).
    pub host: String,
    pub password: String,
    pub tls_port: u16,
    pub proxy: String,
    pub issued_at: SystemTime,
    /// When QEMU forgets the password (`expire_password +30`).
    pub expires_at: SystemTime,
}

/// The running stand-in. Dropping it stops both servers.
pub struct PveStandin {
    shared: Arc<Shared>,
    api_addr: SocketAddr,
    spiceproxy_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl PveStandin {
    /// Generates the cluster CA and node certificate and starts the API and spiceproxy servers.
    pub async fn start(config: PveConfig) -> anyhow::Result<PveStandin> {
        validate(&config)?;
        let pki = certs::ClusterPki::generate(&config.node)?;
        let acceptor = server::tls_acceptor(&pki)?;
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let api_listener = TcpListener::bind(config.api_listen.unwrap_or(loopback))
            .await
            .context("binding the API listener")?;
        let proxy_listener = TcpListener::bind(config.spiceproxy_listen.unwrap_or(loopback))
            .await
            .context("binding the spiceproxy listener")?;
        let api_addr = api_listener.local_addr()?;
        let spiceproxy_addr = proxy_listener.local_addr()?;
        let shared = Arc::new(Shared::new(&config, pki, SystemTime::now()));
        let tasks = vec![
            tokio::spawn(server::run(api_listener, acceptor, Arc::clone(&shared))),
            tokio::spawn(spiceproxy::run(
                proxy_listener,
                Arc::clone(&shared),
                SPICEPROXY_HEAD_TIMEOUT,
            )),
        ];
        Ok(PveStandin {
            shared,
            api_addr,
            spiceproxy_addr,
            tasks,
        })
    }

    /// Stops both servers and every open connection.
    pub async fn shutdown(mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// `https://127.0.0.1:PORT` (a wildcard listen address is reached through loopback).
    pub fn api_url(&self) -> String {
        let mut addr = self.api_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(Ipv4Addr::LOCALHOST.into());
        }
        format!("https://{addr}")
    }

    pub fn spiceproxy_addr(&self) -> SocketAddr {
        self.spiceproxy_addr
    }

    pub fn node(&self) -> &str {
        &self.shared.node
    }

    pub fn token_id(&self) -> &str {
        &self.shared.token_id
    }

    /// `PVEAPIToken=USER@REALM!TOKENID=SECRET`.
    pub fn token_header_value(&self) -> String {
        format!(
            "PVEAPIToken={}={}",
            self.shared.token_id, self.shared.token_secret
        )
    }

    /// The cluster CA (`pve-root-ca.pem`).
    pub fn ca_pem(&self) -> &str {
        &self.shared.pki.ca_pem
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.shared.pki.ca_der.clone()
    }

    /// The node certificate (`pve-ssl.pem`) served by the API.
    pub fn node_cert_pem(&self) -> &str {
        &self.shared.pki.node_cert_pem
    }

    pub fn node_cert_der(&self) -> CertificateDer<'static> {
        self.shared.pki.node_cert_der.clone()
    }

    /// SHA-256 of the node certificate as Proxmox shows it: `AB:CD:...` (uppercase).
    pub fn node_cert_sha256_fingerprint(&self) -> String {
        certs::colon_hex(&self.shared.pki.node_cert_sha256())
    }

    pub fn node_cert_sha256(&self) -> [u8; 32] {
        self.shared.pki.node_cert_sha256()
    }

    /// `OU=PVE Cluster Node,O=Proxmox Virtual Environment,CN=<node>`.
    pub fn host_subject(&self) -> &str {
        &self.shared.pki.host_subject
    }

    /// A rustls (ring) client config trusting only the cluster CA.
    pub fn rustls_client_config(&self) -> anyhow::Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der())?;
        Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
    }

    /// Writes `ca-cert.pem`, `server-cert.pem` and `server-key.pem` (QEMU's `x509-dir` layout)
    /// so a QEMU SPICE TLS server presents the node certificate, as on Proxmox.
    pub fn write_spice_x509_dir(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca-cert.pem"), self.ca_pem())?;
        std::fs::write(dir.join("server-cert.pem"), self.node_cert_pem())?;
        write_private(&dir.join("server-key.pem"), self.shared.pki.node_key_pem())
    }

    /// Like [`write_spice_x509_dir`](Self::write_spice_x509_dir), with a certificate for
    /// another node (`CN=<node>`) signed by this cluster's CA: what another node of the cluster
    /// presents.
    pub fn write_spice_x509_dir_for_node(&self, dir: &Path, node: &str) -> anyhow::Result<()> {
        let (cert, key) = self.shared.pki.issue_node_certificate(node)?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca-cert.pem"), self.ca_pem())?;
        std::fs::write(dir.join("server-cert.pem"), cert)?;
        write_private(&dir.join("server-key.pem"), &key)?;
        Ok(())
    }

    /// Writes the cluster CA PEM to `path`.
    pub fn write_ca_pem(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.ca_pem())
    }

    /// Every API call since the start (or the last [`clear_calls`](Self::clear_calls)).
    pub fn calls(&self) -> Vec<ApiCall> {
        self.shared.lock().calls.clone()
    }

    /// Every spiceproxy connection since the start (or the last `clear_calls`).
    pub fn connects(&self) -> Vec<ProxyConnect> {
        self.shared.lock().connects.clone()
    }

    /// Every ticket handed out since the start (or the last `clear_calls`).
    pub fn tickets(&self) -> Vec<IssuedTicket> {
        self.shared.lock().tickets.clone()
    }

    /// Forgets recorded calls, connects and tickets.
    pub fn clear_calls(&self) {
        let mut st = self.shared.lock();
        st.calls.clear();
        st.connects.clear();
        st.tickets.clear();
    }

    /// Replaces all faults with `fault`, for every path.
    pub fn set_fault(&self, fault: Fault) {
        self.shared.lock().faults = vec![ScopedFault { fault, scope: None }];
    }

    /// Replaces all faults with `fault` on API paths starting with `prefix` (with or without
    /// `/api2/json`, e.g. `/nodes/pve/qemu/100/spiceproxy`). `ExpiredTickets` and
    /// `SpiceproxyUnauthorized` ignore the scope.
    pub fn set_fault_for(&self, prefix: &str, fault: Fault) {
        self.shared.lock().faults = vec![ScopedFault {
            fault,
            scope: Some(prefix.to_owned()),
        }];
    }

    /// Adds a fault to those already set (`scope`: as in [`set_fault_for`](Self::set_fault_for)).
    pub fn add_fault(&self, fault: Fault, scope: Option<&str>) {
        self.shared.lock().faults.push(ScopedFault {
            fault,
            scope: scope.map(str::to_owned),
        });
    }

    pub fn clear_fault(&self) {
        self.shared.lock().faults.clear();
    }

    /// Replaces the token's privileges.
    pub fn set_privileges(&self, privileges: Vec<Acl>) {
        self.shared.lock().acls = privileges;
    }

    /// The guest as it is now (status follows finished power tasks).
    pub fn vm(&self, vmid: u32) -> Option<VmDef> {
        let mut st = self.shared.lock();
        st.advance(SystemTime::now());
        st.vms.get(&vmid).map(|vm| vm.def.clone())
    }

    /// Changes a guest at run time (status, spice_target, vga, ...). `false` if there is none.
    pub fn update_vm(&self, vmid: u32, change: impl FnOnce(&mut VmDef)) -> bool {
        let now = SystemTime::now();
        let mut st = self.shared.lock();
        st.advance(now);
        let Some(vm) = st.vms.get_mut(&vmid) else {
            return false;
        };
        let was_running = vm.def.status == VmStatus::Running;
        change(&mut vm.def);
        match (was_running, vm.def.status) {
            (false, VmStatus::Running) => vm.running_since = Some(now),
            (true, VmStatus::Stopped) => vm.running_since = None,
            _ => {}
        }
        true
    }
}

impl Drop for PveStandin {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn validate(config: &PveConfig) -> anyhow::Result<()> {
    anyhow::ensure!(!config.node.is_empty(), "node name is empty");
    anyhow::ensure!(
        config.token_id.contains('@') && config.token_id.contains('!'),
        "token_id {:?} is not USER@REALM!TOKENID",
        config.token_id
    );
    anyhow::ensure!(!config.token_secret.is_empty(), "token secret is empty");
    let mut seen = std::collections::BTreeSet::new();
    for vm in &config.vms {
        anyhow::ensure!(seen.insert(vm.vmid), "vmid {} appears twice", vm.vmid);
    }
    Ok(())
}

#[cfg(unix)]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(path, contents)
}

/// Accepts connections until aborted; dropping the loop (abort) aborts every connection task.
pub(crate) async fn accept_loop<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(handler(stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// `Mon, 02 Jan 2006 15:04:05 GMT`.
pub(crate) fn http_date(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let fmt = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    t.format(&fmt).unwrap_or_default()
}

pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use ring::rand::SecureRandom as _;
    let mut out = [0u8; N];
    if ring::rand::SystemRandom::new().fill(&mut out).is_err() {
        // The OS RNG failing is not something a test double can work around.
        warn!("system RNG failed; using time-derived bytes");
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, b) in out.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8 ^ (i as u8);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_date_format() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_136_214_245);
        assert_eq!(http_date(t), "Mon, 02 Jan 2006 15:04:05 GMT");
    }
}
