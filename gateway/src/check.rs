//! `zerospice-gateway check`: a preflight that tells the administrator what is wrong, and how to
//! fix it, before a user finds out.
//!
//! [`gather`] does the IO (files, database, addresses, Proxmox calls) into [`Observed`];
//! [`evaluate`] is pure and turns that into [`Finding`]s, so every message is unit-tested.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use zerospice_ca::identity::format_unix;
use zerospice_proto::VmId;

use crate::config::Config;
use crate::paths::Paths;
use crate::proxmox::{vga_is_spice, Guest, ProxmoxClient, ProxmoxError};
use crate::store::{Store, UserPolicy};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    /// Short name of what was checked.
    pub check: String,
    pub message: String,
    /// What to run or change, when there is something to do.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

fn ok(check: &str, message: impl Into<String>) -> Finding {
    Finding {
        level: Level::Ok,
        check: check.into(),
        message: message.into(),
        fix: None,
    }
}

fn bad(level: Level, check: &str, message: impl Into<String>, fix: Option<String>) -> Finding {
    Finding {
        level,
        check: check.into(),
        message: message.into(),
        fix,
    }
}

/// Whether an address can be bound on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrState {
    Present,
    /// Wildcard addresses are always present.
    Wildcard,
    Missing(String),
}

/// What Proxmox said, call by call.
#[derive(Debug, Clone, Default)]
pub struct ProxmoxObserved {
    pub url: String,
    pub token_id: String,
    pub pinning: String,
    pub version: Option<Result<String, ProxmoxError>>,
    pub guests: Option<Result<Vec<Guest>, ProxmoxError>>,
    /// `/vms/ID` or `/pool/NAME` -> privilege names.
    pub privileges: BTreeMap<String, Result<Vec<String>, ProxmoxError>>,
    /// vmid -> `vga` setting.
    pub vga: BTreeMap<u32, Result<Option<String>, ProxmoxError>>,
    pub spiceproxy: String,
    pub spiceproxy_reachable: Option<Result<(), String>>,
}

#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub permissions: Option<String>,
    pub integrity: Option<Result<String, String>>,
    pub ca_not_after: Option<i64>,
    pub now: i64,
    pub listen: Vec<(String, SocketAddr, AddrState)>,
    /// `net.core.rmem_max`, and whether we run as root (which can exceed it).
    pub rmem_max: Option<u64>,
    pub root: bool,
    pub users: Vec<(String, UserPolicy)>,
    pub proxmox: Option<ProxmoxObserved>,
}

/// The VMs some user's policy names, with the users who may use them and whether any of those
/// users may power them.
fn wanted_vms(
    users: &[(String, UserPolicy)],
    guests: &[Guest],
) -> BTreeMap<u32, (Vec<String>, bool)> {
    let mut out: BTreeMap<u32, (Vec<String>, bool)> = BTreeMap::new();
    for (name, p) in users {
        for g in crate::policy::visible(p, guests) {
            let e = out.entry(g.vmid.get()).or_default();
            e.0.push(name.clone());
            e.1 |= p.power;
        }
    }
    out
}

/// The privileges the gateway's token needs on each VM a user may use.
pub const NEEDED: [&str; 2] = ["VM.Audit", "VM.Console"];

fn acl_fix(path: &str, token_id: &str, power: bool) -> String {
    let role = if power { "ZeroSpicePower" } else { "ZeroSpice" };
    format!(
        "pveum acl modify {path} --tokens '{token_id}' --roles {role}   (role: pveum role add {role} --privs \"VM.Audit VM.Console{}\"). A token with privilege separation starts with no rights: grant them to the token itself, not only to its user",
        if power { " VM.PowerMgmt" } else { "" }
    )
}

pub fn evaluate(o: &Observed) -> Vec<Finding> {
    let mut f = Vec::new();
    match &o.permissions {
        None => f.push(ok("files", "state directory 0700, secrets 0600")),
        Some(e) => f.push(bad(
            Level::Fail,
            "files",
            e.clone(),
            Some("chmod 700 on the directory, 600 on ca.key, state.db and proxmox-token".into()),
        )),
    }
    match &o.integrity {
        Some(Ok(s)) if s == "ok" => f.push(ok("database", "integrity check passed")),
        Some(Ok(s)) => f.push(bad(
            Level::Fail,
            "database",
            format!("integrity check: {s}"),
            Some("restore state.db from a backup".into()),
        )),
        Some(Err(e)) => f.push(bad(Level::Fail, "database", e.clone(), None)),
        None => {}
    }
    if let Some(na) = o.ca_not_after {
        if na - o.now < 365 * 86_400 {
            f.push(bad(
                Level::Warn,
                "ca",
                format!("the ZeroSpice CA expires on {}", format_unix(na)),
                Some("plan a new CA and re-enrollment before then".into()),
            ));
        } else {
            f.push(ok("ca", format!("CA valid until {}", format_unix(na))));
        }
    }
    for (what, addr, state) in &o.listen {
        match state {
            AddrState::Present => f.push(ok("listen", format!("{what} address {addr} is on this host"))),
            AddrState::Wildcard => f.push(bad(Level::Warn, "listen", format!("{what} listens on {addr}, every interface"), Some("listen on this host's ZeroTier address only, unless a firewall protects the port".into()))),
            AddrState::Missing(e) => f.push(bad(
                Level::Fail,
                "listen",
                format!("{what} address {} is not assigned to this host ({e})", addr.ip()),
                Some("is ZeroTier running and this host authorized on the network? `zerotier-cli listnetworks` shows the assigned address".into()),
            )),
        }
    }
    if let Some(r) = o.rmem_max {
        let want = zerospice_proto::udp::WANT_BUFFER as u64;
        if r < want && !o.root {
            f.push(bad(Level::Warn, "udp", format!("net.core.rmem_max is {r} bytes: QUIC gets small socket buffers and drops packets under load"), Some(format!("sysctl -w net.core.rmem_max={want} net.core.wmem_max={want} (and in /etc/sysctl.d/)"))));
        }
    }
    if o.users.is_empty() {
        f.push(bad(
            Level::Warn,
            "users",
            "no users yet",
            Some("zerospice-gateway user add NAME --vm VMID".into()),
        ));
    }

    let Some(p) = &o.proxmox else {
        f.push(bad(
            Level::Fail,
            "proxmox",
            "no [proxmox] section in the configuration: users can enroll but not open VMs",
            Some("see INSTALL.md, section Proxmox".into()),
        ));
        return f;
    };
    match &p.version {
        Some(Ok(v)) => f.push(ok(
            "proxmox",
            format!(
                "Proxmox VE {v} at {} answers, certificate verified ({}), token accepted",
                p.url, p.pinning
            ),
        )),
        Some(Err(e)) => {
            let fix = match e {
                ProxmoxError::Tls(_) => "the certificate Proxmox presents is not the pinned one: compare `openssl x509 -noout -fingerprint -sha256 -in /etc/pve/local/pve-ssl.pem` on the node with proxmox.fingerprint, or copy /etc/pve/pve-root-ca.pem again",
                ProxmoxError::Unauthorized(_) => "check proxmox.token_id and the secret in the token file (pveum user token list USER)",
                ProxmoxError::Unreachable { .. } | ProxmoxError::Timeout(_) => "check proxmox.url, that pveproxy runs (systemctl status pveproxy) and that this host may reach port 8006",
                _ => "see the message",
            };
            f.push(bad(Level::Fail, "proxmox", e.to_string(), Some(fix.into())));
            return f;
        }
        None => {}
    }
    let guests = match &p.guests {
        Some(Ok(g)) => g.clone(),
        Some(Err(e)) => {
            f.push(bad(
                Level::Fail,
                "proxmox",
                format!("listing VMs: {e}"),
                None,
            ));
            return f;
        }
        None => Vec::new(),
    };
    // VMs named in a policy that the token cannot see: missing VM.Audit (or no such VM).
    for (name, policy) in &o.users {
        for vmid in &policy.vms {
            if !guests.iter().any(|g| g.vmid.get() == *vmid) {
                f.push(bad(
                    Level::Fail,
                    "vm",
                    format!("VM {vmid} is in {name}'s policy, but the token cannot see it: it does not exist, or the token lacks VM.Audit on /vms/{vmid}"),
                    Some(acl_fix(&format!("/vms/{vmid}"), &p.token_id, policy.power)),
                ));
            }
        }
        for pool in &policy.pools {
            if !guests.iter().any(|g| g.pool.as_deref() == Some(pool)) {
                f.push(bad(
                    Level::Warn,
                    "pool",
                    format!("pool {pool:?} is in {name}'s policy, but the token sees no VM in it"),
                    Some(acl_fix(&format!("/pool/{pool}"), &p.token_id, policy.power)),
                ));
            }
        }
    }
    let wanted = wanted_vms(&o.users, &guests);
    for (vmid, (users, power)) in &wanted {
        let path = format!("/vms/{vmid}");
        let name = guests
            .iter()
            .find(|g| g.vmid.get() == *vmid)
            .map(|g| g.name.clone())
            .unwrap_or_default();
        match p.privileges.get(&path) {
            Some(Ok(privs)) => {
                let mut needed: Vec<&str> = NEEDED.to_vec();
                if *power {
                    needed.push("VM.PowerMgmt");
                }
                let missing: Vec<&str> = needed
                    .into_iter()
                    .filter(|n| !privs.iter().any(|p| p == n))
                    .collect();
                if missing.is_empty() {
                    f.push(ok(
                        "privileges",
                        format!("VM {vmid} ({name}): token has {}", privs.join(", ")),
                    ));
                } else {
                    f.push(bad(
                        Level::Fail,
                        "privileges",
                        format!(
                            "VM {vmid} ({name}), used by {}: the token lacks {}",
                            users.join(", "),
                            missing.join(", ")
                        ),
                        Some(acl_fix(&path, &p.token_id, *power)),
                    ));
                }
            }
            Some(Err(e)) => f.push(bad(
                Level::Fail,
                "privileges",
                format!("VM {vmid}: reading privileges: {e}"),
                None,
            )),
            None => {}
        }
        match p.vga.get(vmid) {
            Some(Ok(vga)) if vga.as_deref().is_some_and(vga_is_spice) => {
                f.push(ok("display", format!("VM {vmid} ({name}) has a SPICE display")))
            }
            Some(Ok(vga)) => f.push(bad(
                Level::Fail,
                "display",
                format!("VM {vmid} ({name}) has no SPICE display (vga: {})", vga.as_deref().unwrap_or("default")),
                Some(format!("qm set {vmid} --vga qxl   (or Hardware > Display > SPICE in the web UI; takes effect after a restart of the VM)")),
            )),
            Some(Err(e)) => f.push(bad(Level::Fail, "display", format!("VM {vmid}: reading its configuration: {e}"), None)),
            None => {}
        }
    }
    match &p.spiceproxy_reachable {
        Some(Ok(())) => f.push(ok("spiceproxy", format!("spiceproxy at {} accepts connections", p.spiceproxy))),
        Some(Err(e)) => f.push(bad(
            Level::Fail,
            "spiceproxy",
            format!("spiceproxy at {} is not reachable: {e}", p.spiceproxy),
            Some("check proxmox.spiceproxy (a node's port 3128), that the spiceproxy service runs, and ALLOW_FROM in /etc/default/pveproxy".into()),
        )),
        None => {}
    }
    f
}

fn addr_state(addr: SocketAddr) -> AddrState {
    if addr.ip().is_unspecified() {
        return AddrState::Wildcard;
    }
    match std::net::UdpSocket::bind(SocketAddr::new(addr.ip(), 0)) {
        Ok(_) => AddrState::Present,
        Err(e) => AddrState::Missing(e.to_string()),
    }
}

fn is_root() -> bool {
    zerospice_ca::fsutil::current_uid()
        .map(|u| u == 0)
        .unwrap_or(false)
}

/// Gathers everything `evaluate` looks at.
pub async fn gather(paths: &Paths, config: &Config) -> Observed {
    let mut o = Observed {
        now: time::OffsetDateTime::now_utc().unix_timestamp(),
        root: is_root(),
        ..Default::default()
    };
    o.permissions = paths.check_permissions().err().map(|e| e.to_string());
    match Store::open(&paths.db()) {
        Ok(store) => {
            o.integrity = Some(store.integrity_check().map_err(|e| e.to_string()));
            o.users = store
                .users()
                .map(|us| us.into_iter().map(|u| (u.name, u.policy)).collect())
                .unwrap_or_default();
        }
        Err(e) => o.integrity = Some(Err(e.to_string())),
    }
    if let Ok(ca) = crate::server::load_ca(paths) {
        o.ca_not_after = Some(ca.not_after().unix_timestamp());
    }
    o.listen = vec![
        (
            "access".into(),
            config.listen.access,
            addr_state(config.listen.access),
        ),
        (
            "enrollment".into(),
            config.listen.enroll,
            addr_state(config.listen.enroll),
        ),
    ];
    o.rmem_max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
        .ok()
        .and_then(|s| s.trim().parse().ok());

    let Some(pc) = &config.proxmox else {
        return o;
    };
    let mut p = ProxmoxObserved {
        url: pc.url.clone(),
        token_id: pc.token_id.clone(),
        pinning: if pc.ca_file.is_some() {
            "cluster CA file".into()
        } else if pc.fingerprint.is_some() {
            "pinned fingerprint".into()
        } else {
            "NOT VERIFIED: danger_accept_invalid_certs".into()
        },
        ..Default::default()
    };
    let client = match ProxmoxClient::from_config(pc, &paths.config) {
        Ok(c) => c,
        Err(e) => {
            p.version = Some(Err(ProxmoxError::BadResponse(e.to_string())));
            o.proxmox = Some(p);
            return o;
        }
    };
    p.spiceproxy = client.spiceproxy.clone();
    let version = client.version().await;
    let failed = version.is_err();
    p.version = Some(version);
    if !failed {
        let guests = client.guests().await;
        if let Ok(gs) = &guests {
            for vmid in wanted_vms(&o.users, gs).keys() {
                let Some(g) = gs.iter().find(|g| g.vmid.get() == *vmid) else {
                    continue;
                };
                let path = format!("/vms/{vmid}");
                let privs = client.permissions_at(&path).await.map(|m| {
                    m.get(&path)
                        .map(|privs| privs.keys().cloned().collect())
                        .unwrap_or_default()
                });
                p.privileges.insert(path, privs);
                if let Ok(v) = VmId::new(*vmid) {
                    p.vga.insert(*vmid, client.vm_vga(&g.node, v).await);
                }
            }
        }
        p.guests = Some(guests);
        let reach = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::net::TcpStream::connect(&client.spiceproxy),
        )
        .await;
        p.spiceproxy_reachable = Some(match reach {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        });
    }
    o.proxmox = Some(p);
    o
}

/// Whether any finding fails.
pub fn failed(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.level == Level::Fail)
}

/// Text for a terminal.
pub fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let tag = match f.level {
            Level::Ok => "  ok  ",
            Level::Warn => " WARN ",
            Level::Fail => " FAIL ",
        };
        out.push_str(&format!("[{tag}] {}: {}\n", f.check, f.message));
        if let Some(fix) = &f.fix {
            out.push_str(&format!("         fix: {fix}\n"));
        }
    }
    let fails = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warns = findings.iter().filter(|f| f.level == Level::Warn).count();
    if fails == 0 && warns == 0 {
        out.push_str("All checks passed.\n");
    } else {
        out.push_str(&format!("{fails} problem(s), {warns} warning(s).\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest(vmid: u32, name: &str, pool: Option<&str>) -> Guest {
        Guest {
            vmid: VmId::new(vmid).unwrap(),
            kind: "qemu".into(),
            name: name.into(),
            node: "pve".into(),
            status: "running".into(),
            template: false,
            tags: vec![],
            pool: pool.map(str::to_owned),
        }
    }

    fn base() -> Observed {
        let alice = UserPolicy {
            vms: vec![100, 101, 109],
            ..Default::default()
        };
        let mut p = ProxmoxObserved {
            url: "https://pve:8006".into(),
            token_id: "zerospice@pve!gateway".into(),
            pinning: "cluster CA file".into(),
            version: Some(Ok("8.2.4".into())),
            guests: Some(Ok(vec![
                guest(100, "win11", None),
                guest(101, "debian", None),
            ])),
            spiceproxy: "pve:3128".into(),
            spiceproxy_reachable: Some(Ok(())),
            ..Default::default()
        };
        p.privileges.insert(
            "/vms/100".into(),
            Ok(vec!["VM.Audit".into(), "VM.Console".into()]),
        );
        p.privileges
            .insert("/vms/101".into(), Ok(vec!["VM.Audit".into()]));
        p.vga.insert(100, Ok(Some("qxl".into())));
        p.vga.insert(101, Ok(None));
        Observed {
            integrity: Some(Ok("ok".into())),
            ca_not_after: Some(10 * 365 * 86_400),
            now: 0,
            listen: vec![(
                "access".into(),
                "10.147.17.5:7443".parse().unwrap(),
                AddrState::Missing("Cannot assign requested address (os error 99)".into()),
            )],
            users: vec![("alice".into(), alice)],
            proxmox: Some(p),
            ..Default::default()
        }
    }

    fn find<'a>(f: &'a [Finding], check: &str, level: Level) -> Vec<&'a Finding> {
        f.iter()
            .filter(|x| x.check == check && x.level == level)
            .collect()
    }

    #[test]
    fn says_what_is_missing_and_how_to_fix_it() {
        let f = evaluate(&base());
        assert!(failed(&f));
        let listen = find(&f, "listen", Level::Fail);
        assert_eq!(
            listen[0].message,
            "access address 10.147.17.5 is not assigned to this host (Cannot assign requested address (os error 99))"
        );
        let privs = find(&f, "privileges", Level::Fail);
        assert_eq!(privs.len(), 1);
        assert_eq!(
            privs[0].message,
            "VM 101 (debian), used by alice: the token lacks VM.Console"
        );
        assert!(privs[0].fix.as_deref().unwrap().starts_with(
            "pveum acl modify /vms/101 --tokens 'zerospice@pve!gateway' --roles ZeroSpice"
        ));
        let vm = find(&f, "vm", Level::Fail);
        assert_eq!(
            vm[0].message,
            "VM 109 is in alice's policy, but the token cannot see it: it does not exist, or the token lacks VM.Audit on /vms/109"
        );
        let display = find(&f, "display", Level::Fail);
        assert_eq!(
            display[0].message,
            "VM 101 (debian) has no SPICE display (vga: default)"
        );
        assert!(display[0]
            .fix
            .as_deref()
            .unwrap()
            .starts_with("qm set 101 --vga qxl"));
        assert_eq!(find(&f, "display", Level::Ok).len(), 1);
        assert!(render(&f).ends_with("4 problem(s), 0 warning(s).\n"));
    }

    #[test]
    fn power_needs_power_management_and_a_good_setup_passes() {
        let mut o = base();
        o.listen.clear();
        o.users[0].1.vms = vec![100];
        o.users[0].1.power = true;
        let f = evaluate(&o);
        let privs = find(&f, "privileges", Level::Fail);
        assert_eq!(
            privs[0].message,
            "VM 100 (win11), used by alice: the token lacks VM.PowerMgmt"
        );
        assert!(privs[0]
            .fix
            .as_deref()
            .unwrap()
            .contains("--roles ZeroSpicePower"));
        o.users[0].1.power = false;
        let f = evaluate(&o);
        assert!(!failed(&f), "{f:#?}");
        assert!(render(&f).ends_with("All checks passed.\n"));
    }

    #[test]
    fn proxmox_failures_stop_the_proxmox_checks_with_a_hint() {
        let mut o = base();
        o.listen.clear();
        o.proxmox.as_mut().unwrap().version = Some(Err(ProxmoxError::Tls(
            "certificate pin mismatch: Proxmox presents SHA256:aa, the configuration pins SHA256:bb".into(),
        )));
        let f = evaluate(&o);
        let px = find(&f, "proxmox", Level::Fail);
        assert_eq!(px.len(), 1);
        assert_eq!(
            px[0].message,
            "TLS with Proxmox failed: certificate pin mismatch: Proxmox presents SHA256:aa, the configuration pins SHA256:bb"
        );
        assert!(px[0].fix.as_deref().unwrap().contains("not the pinned one"));
        assert!(find(&f, "privileges", Level::Fail).is_empty());
        o.proxmox = None;
        let f = evaluate(&o);
        assert!(find(&f, "proxmox", Level::Fail)[0]
            .message
            .starts_with("no [proxmox] section"));
    }
}
