//! What the stand-in serves: the node, the API token, the guests and the token's privileges.
//!
//! Deserialisable from TOML or JSON for the `zerospice-pve-standin` binary; durations are given in
//! milliseconds there (`power_delay_ms`, `auth_failure_delay_ms`).

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Configuration of one stand-in: a Proxmox node (or a small cluster seen through one node).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PveConfig {
    /// The node answering the API and running the spiceproxy (Proxmox's `nodename`).
    #[serde(default = "default_node")]
    pub node: String,
    /// Full API token id, `USER@REALM!TOKENID`.
    #[serde(default = "default_token_id")]
    pub token_id: String,
    /// The token secret (a UUID, as Proxmox generates). Random unless configured.
    #[serde(default = "random_uuid")]
    pub token_secret: String,
    /// Guests of the cluster. A guest whose `node` is another name makes that name a cluster node.
    #[serde(default)]
    pub vms: Vec<VmDef>,
    /// The token's effective privileges (already the intersection of user and token ACLs).
    #[serde(default)]
    pub privileges: Vec<Acl>,
    /// Where the HTTPS API listens; default `127.0.0.1:0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_listen: Option<SocketAddr>,
    /// Where the spiceproxy daemon listens; default `127.0.0.1:0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiceproxy_listen: Option<SocketAddr>,
    /// How long a start/shutdown/stop/reboot task runs before the VM changes state.
    #[serde(default, rename = "power_delay_ms", with = "duration_ms")]
    pub power_delay: Duration,
    /// Delay before a 401 is sent. Real Proxmox waits 3 s; the default here is 0 to keep tests fast.
    #[serde(default, rename = "auth_failure_delay_ms", with = "duration_ms")]
    pub auth_failure_delay: Duration,
}

impl fmt::Debug for PveConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PveConfig")
            .field("node", &self.node)
            .field("token_id", &self.token_id)
            .field("token_secret", &"<redacted>")
            .field("vms", &self.vms)
            .field("privileges", &self.privileges)
            .field("api_listen", &self.api_listen)
            .field("spiceproxy_listen", &self.spiceproxy_listen)
            .field("power_delay", &self.power_delay)
            .field("auth_failure_delay", &self.auth_failure_delay)
            .finish()
    }
}

impl Default for PveConfig {
    fn default() -> Self {
        PveConfig {
            node: default_node(),
            token_id: default_token_id(),
            token_secret: random_uuid(),
            vms: Vec::new(),
            privileges: Vec::new(),
            api_listen: None,
            spiceproxy_listen: None,
            power_delay: Duration::ZERO,
            auth_failure_delay: Duration::ZERO,
        }
    }
}

impl PveConfig {
    /// A small lab the tests adjust:
    ///
    /// | vmid | guest | state | display | pool | privileges of the token |
    /// |---|---|---|---|---|---|
    /// | 100 | qemu `win11` | running | qxl (SPICE), tls-port 61000 | - | Audit, Console, PowerMgmt on /vms/100 |
    /// | 101 | qemu `debian12` | stopped | qxl, 61001 | - | Audit, Console, PowerMgmt on /vms/101 |
    /// | 102 | qemu `legacy-std` | running | std (no SPICE), 61002 | lab | Audit, Console via /pool/lab |
    /// | 103 | qemu `hidden` | running | qxl, 61003 | - | none |
    /// | 104 | qemu `remote` on node `pve2` | running | qxl, 61004 | lab | Audit, Console via /pool/lab |
    /// | 105 | qemu `tmpl-debian` template | stopped | qxl, 61005 | lab | Audit, Console via /pool/lab |
    /// | 200 | lxc `ct-web` | running | - | lab | Audit via /pool/lab |
    ///
    /// No VM has a `spice_target`: tests point the ones they connect to at an echo server.
    pub fn example() -> Self {
        let mut win = VmDef::qemu(100, "win11");
        win.tags = vec!["lab".into(), "windows".into()];
        win.tls_port = 61000;
        let mut debian = VmDef::qemu(101, "debian12");
        debian.status = VmStatus::Stopped;
        debian.tags = vec!["lab".into()];
        debian.tls_port = 61001;
        let mut std_vga = VmDef::qemu(102, "legacy-std");
        std_vga.vga = "std".into();
        std_vga.pool = Some("lab".into());
        std_vga.tls_port = 61002;
        let mut hidden = VmDef::qemu(103, "hidden");
        hidden.tls_port = 61003;
        let mut remote = VmDef::qemu(104, "remote");
        remote.node = "pve2".into();
        remote.pool = Some("lab".into());
        remote.tls_port = 61004;
        let mut template = VmDef::qemu(105, "tmpl-debian");
        template.status = VmStatus::Stopped;
        template.template = true;
        template.pool = Some("lab".into());
        template.tls_port = 61005;
        let mut ct = VmDef::lxc(200, "ct-web");
        ct.pool = Some("lab".into());
        ct.tags = vec!["web".into()];

        PveConfig {
            vms: vec![win, debian, std_vga, hidden, remote, template, ct],
            privileges: vec![
                Acl::new("/vms/100", &["VM.Audit", "VM.Console", "VM.PowerMgmt"]),
                Acl::new("/vms/101", &["VM.Audit", "VM.Console", "VM.PowerMgmt"]),
                Acl::new("/pool/lab", &["VM.Audit", "VM.Console"]),
            ],
            ..PveConfig::default()
        }
    }

    /// The guest with this id, to adjust before starting.
    pub fn vm_mut(&mut self, vmid: u32) -> Option<&mut VmDef> {
        self.vms.iter_mut().find(|vm| vm.vmid == vmid)
    }

    /// `PVEAPIToken=USER@REALM!TOKENID=SECRET`, the `Authorization` header value.
    pub fn token_header_value(&self) -> String {
        format!("PVEAPIToken={}={}", self.token_id, self.token_secret)
    }
}

/// A guest (QEMU VM or LXC container).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDef {
    pub vmid: u32,
    pub name: String,
    /// The node the guest runs on; empty means the stand-in's own node.
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub kind: GuestKind,
    #[serde(default)]
    pub status: VmStatus,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The `vga` config value, e.g. `qxl`, `qxl2,memory=32`, `virtio`, `std`. `qxl*` and `virtio*`
    /// give the VM a SPICE display (as qemu-server decides); empty means Proxmox's default (std).
    #[serde(default = "default_vga")]
    pub vga: String,
    /// Where the spiceproxy daemon connects for this VM (an echo server, or a real QEMU SPICE
    /// TLS port). `None`: the daemon closes the connection, like Proxmox when nothing listens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spice_target: Option<SocketAddr>,
    /// The SPICE `tls-port` reported to clients and signed into tickets (61000-61999 on Proxmox).
    #[serde(default = "default_tls_port")]
    pub tls_port: u16,
    /// QMP socket of a real QEMU: the stand-in sets and expires the SPICE password there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp_socket: Option<PathBuf>,
    #[serde(default)]
    pub template: bool,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "default_cores")]
    pub cores: u32,
}

impl VmDef {
    /// A running QEMU VM with a qxl (SPICE) display on the stand-in's node.
    pub fn qemu(vmid: u32, name: &str) -> Self {
        VmDef {
            vmid,
            name: name.to_owned(),
            node: String::new(),
            kind: GuestKind::Qemu,
            status: VmStatus::Running,
            tags: Vec::new(),
            pool: None,
            vga: default_vga(),
            spice_target: None,
            tls_port: default_tls_port(),
            qmp_socket: None,
            template: false,
            memory_mib: default_memory_mib(),
            cores: default_cores(),
        }
    }

    /// A running LXC container on the stand-in's node.
    pub fn lxc(vmid: u32, name: &str) -> Self {
        VmDef {
            kind: GuestKind::Lxc,
            vga: String::new(),
            ..VmDef::qemu(vmid, name)
        }
    }

    /// Whether qemu-server would give this VM a SPICE display (`vga` of type `qxl*` or `virtio*`).
    pub fn has_spice(&self) -> bool {
        if self.kind != GuestKind::Qemu {
            return false;
        }
        let vga_type = self.vga.split(',').next().unwrap_or_default();
        let vga_type = vga_type.strip_prefix("type=").unwrap_or(vga_type);
        vga_type.starts_with("qxl") || vga_type.starts_with("virtio")
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    #[default]
    Qemu,
    Lxc,
}

impl GuestKind {
    /// The `type` Proxmox reports (`qemu` or `lxc`).
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Qemu => "qemu",
            GuestKind::Lxc => "lxc",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmStatus {
    #[default]
    Running,
    Stopped,
}

impl VmStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Running => "running",
            VmStatus::Stopped => "stopped",
        }
    }
}

/// An ACL entry of the token: `privs` granted on `path`.
///
/// Propagation is modelled simply: a propagating entry on `/` or `/vms` covers every `/vms/{id}`,
/// and an entry on `/pool/NAME` covers the guests of that pool. Entries are only ever added
/// (Proxmox's "deeper ACL replaces inherited roles" and `NoAccess` are not modelled).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Acl {
    pub path: String,
    pub privs: Vec<String>,
    #[serde(default = "yes")]
    pub propagate: bool,
}

impl Acl {
    /// A propagating entry, as `pveum acl modify PATH --roles ...` creates by default.
    pub fn new(path: &str, privs: &[&str]) -> Self {
        Acl {
            path: path.to_owned(),
            privs: privs.iter().map(|p| (*p).to_owned()).collect(),
            propagate: true,
        }
    }
}

fn default_node() -> String {
    "pve".to_owned()
}

fn default_token_id() -> String {
    "zerospice@pve!gateway".to_owned()
}

fn default_vga() -> String {
    "qxl".to_owned()
}

fn default_tls_port() -> u16 {
    61000
}

fn default_memory_mib() -> u64 {
    2048
}

fn default_cores() -> u32 {
    2
}

fn yes() -> bool {
    true
}

/// A random version-4 UUID, as Proxmox uses for token secrets and the CA's OU.
pub(crate) fn random_uuid() -> String {
    let mut b = super::random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

mod duration_ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_has_version_4_shape() {
        let u = random_uuid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert!(u.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
    }

    #[test]
    fn spice_display_follows_vga_type() {
        let mut vm = VmDef::qemu(1, "a");
        for (vga, spice) in [
            ("qxl", true),
            ("qxl2,memory=32", true),
            ("virtio", true),
            ("type=qxl", true),
            ("std", false),
            ("", false),
            ("serial0", false),
        ] {
            vm.vga = vga.into();
            assert_eq!(vm.has_spice(), spice, "{vga}");
        }
        assert!(!VmDef::lxc(2, "c").has_spice());
    }

    #[test]
    fn example_round_trips_through_toml_and_debug_hides_secret() {
        let cfg = PveConfig::example();
        let text = toml::to_string(&cfg).unwrap();
        let back: PveConfig = toml::from_str(&text).unwrap();
        assert_eq!(back.vms, cfg.vms);
        assert_eq!(back.privileges, cfg.privileges);
        assert_eq!(back.token_secret, cfg.token_secret);
        assert!(!format!("{cfg:?}").contains(&cfg.token_secret));
    }

    #[test]
    fn minimal_json_config_gets_defaults() {
        let cfg: PveConfig =
            serde_json::from_str(r#"{"vms":[{"vmid":100,"name":"a"}],"power_delay_ms":250}"#)
                .unwrap();
        assert_eq!(cfg.node, "pve");
        assert_eq!(cfg.token_id, "zerospice@pve!gateway");
        assert_eq!(cfg.vms[0].vga, "qxl");
        assert_eq!(cfg.vms[0].status, VmStatus::Running);
        assert_eq!(cfg.power_delay, Duration::from_millis(250));
        assert_eq!(cfg.token_secret.len(), 36);
    }
}
