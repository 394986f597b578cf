//! Administrator commands. Each prints text for a person, or JSON with `--json` for a script.
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use serde::Serialize;
use time::OffsetDateTime;
use zerospice_ca::fsutil;
use zerospice_ca::identity::format_unix;
use zerospice_ca::{CertificateAuthority, Serial, UserName};
use zerospice_proto::invite::Invitation;

use crate::config::{self, Config, ListenConfig, ProxmoxConfig};
use crate::paths::Paths;
use crate::server::Loaded;
use crate::store::{Store, UserPolicy};
use crate::totp::TotpSecret;

/// Where command output goes.
pub struct Out<'a> {
    pub json: bool,
    pub w: &'a mut dyn Write,
}

impl Out<'_> {
    fn emit<T: Serialize>(
        &mut self,
        value: &T,
        text: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
    ) -> anyhow::Result<()> {
        if self.json {
            serde_json::to_writer_pretty(&mut *self.w, value)?;
            writeln!(self.w)?;
        } else {
            text(self.w)?;
        }
        Ok(())
    }
}

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

#[derive(Debug, Clone)]
pub struct InitOptions {
    /// IP address to listen on (ports from `access_port`/`enroll_port`).
    pub listen: IpAddr,
    pub access_port: u16,
    pub enroll_port: u16,
    pub allow_wildcard: bool,
    pub public_host: Option<String>,
    pub validity_days: u32,
    pub proxmox: Option<ProxmoxInit>,
}

#[derive(Debug, Clone)]
pub struct ProxmoxInit {
    pub url: String,
    pub token_id: String,
    /// The token secret, read from a file or standard input by the caller.
    pub token_secret: Option<zeroize::Zeroizing<String>>,
    pub ca_file: Option<PathBuf>,
    pub fingerprint: Option<String>,
    pub spiceproxy: Option<String>,
    pub danger_accept_invalid_certs: bool,
}

#[derive(Serialize)]
struct InitReport {
    dir: String,
    config: String,
    ca_fingerprint: String,
    enroll: String,
    access: String,
}

/// Creates the state directory, configuration, CA and database. Never overwrites a CA.
pub fn init(paths: &Paths, opts: &InitOptions, out: &mut Out<'_>) -> anyhow::Result<()> {
    if paths.ca_key().exists() || paths.db().exists() {
        bail!(
            "{} already holds a ZeroSpice gateway; refusing to overwrite its CA \
             (every enrolled device would have to enroll again). Remove the directory first if you really mean to start over",
            paths.dir.display()
        );
    }
    if paths.config.exists() {
        bail!(
            "{} already exists; refusing to overwrite it",
            paths.config.display()
        );
    }
    let mut config = Config {
        listen: ListenConfig {
            access: SocketAddr::new(opts.listen, opts.access_port),
            enroll: SocketAddr::new(opts.listen, opts.enroll_port),
            allow_wildcard: opts.allow_wildcard,
            public_host: opts.public_host.clone(),
        },
        certificates: config::CertificateConfig {
            validity_days: opts.validity_days,
            ..Default::default()
        },
        enrollment: Default::default(),
        sessions: Default::default(),
        proxmox: None,
        attestation: Default::default(),
    };
    let mut token_to_write = None;
    if let Some(p) = &opts.proxmox {
        // The configuration resolves relative paths against its own directory, but these were
        // given relative to the current one (`--dir gw`, `--proxmox-ca-file ca.pem`): store
        // them absolute.
        let absolute =
            |p: &Path| std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
        config.proxmox = Some(ProxmoxConfig {
            url: p.url.clone(),
            token_id: p.token_id.clone(),
            token_secret_file: absolute(&paths.proxmox_token())?,
            ca_file: p.ca_file.as_deref().map(absolute).transpose()?,
            fingerprint: p.fingerprint.clone(),
            danger_accept_invalid_certs: p.danger_accept_invalid_certs,
            spiceproxy: p.spiceproxy.clone(),
            timeout_secs: 10,
        });
        token_to_write = p.token_secret.clone();
    }
    config.validate()?;

    fsutil::create_private_dir(&paths.dir)
        .with_context(|| format!("creating {}", paths.dir.display()))?;
    if let Some(parent) = paths.config.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let (ca, key_pem) = CertificateAuthority::generate(OffsetDateTime::now_utc())?;
    fsutil::write_private(&paths.ca_key(), key_pem.as_bytes())?;
    fsutil::write_public(&paths.ca_cert(), ca.cert_pem().as_bytes())?;
    if let Some(secret) = token_to_write {
        fsutil::write_private(&paths.proxmox_token(), secret.trim().as_bytes())?;
    }
    Store::create(&paths.db())?;
    fsutil::write_private(&paths.config, config.to_toml().as_bytes())?;

    let report = InitReport {
        dir: paths.dir.display().to_string(),
        config: paths.config.display().to_string(),
        ca_fingerprint: ca.fingerprint().to_string(),
        enroll: config.public_enroll_addr(),
        access: config.public_access_addr(),
    };
    out.emit(&report, |w| {
        writeln!(w, "Initialised a ZeroSpice gateway in {}", report.dir)?;
        writeln!(w, "  configuration:      {}", report.config)?;
        writeln!(w, "  CA fingerprint:     {}", report.ca_fingerprint)?;
        writeln!(w, "  enrollment address: {} (UDP)", report.enroll)?;
        writeln!(w, "  access address:     {} (UDP)", report.access)?;
        if opts.proxmox.is_none() {
            writeln!(w, "Proxmox is not configured yet: add a [proxmox] section to the configuration (see INSTALL.md).")?;
        }
        writeln!(w, "Next: zerospice-gateway user add NAME --vm VMID, then zerospice-gateway serve")
    })
}

#[derive(Serialize)]
struct NewUserReport {
    user: String,
    otpauth_uri: String,
    invitation: String,
}

fn invitation(loaded: &Loaded, user: &str) -> Invitation {
    Invitation {
        user: user.to_owned(),
        gateway: loaded.config.public_enroll_addr(),
        ca_fingerprint: *loaded.ca.fingerprint().as_bytes(),
    }
}

fn print_enrollment_material(
    out: &mut Out<'_>,
    report: &NewUserReport,
    headline: &str,
) -> anyhow::Result<()> {
    let qr = qr_text(&report.otpauth_uri);
    out.emit(report, |w| {
        writeln!(w, "{headline}")?;
        writeln!(w)?;
        writeln!(w, "1. The user scans this code with an authenticator app (or enters the URI):")?;
        writeln!(w, "{qr}")?;
        writeln!(w, "   {}", report.otpauth_uri)?;
        writeln!(w)?;
        writeln!(w, "2. The user runs zerospice-enroll with this invitation:")?;
        writeln!(w, "   {}", report.invitation)?;
        writeln!(w)?;
        writeln!(w, "Hand both over in person or over a channel you trust: the QR code is the user's second factor.")
    })
}

/// Renders a QR code with Unicode half blocks for a terminal.
pub fn qr_text(data: &str) -> String {
    match qrcode::QrCode::new(data.as_bytes()) {
        Ok(code) => code
            .render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .quiet_zone(true)
            .build(),
        Err(_) => "(QR code unavailable: use the URI below)".into(),
    }
}

pub fn user_add(
    paths: &Paths,
    name: &str,
    policy: &UserPolicy,
    out: &mut Out<'_>,
) -> anyhow::Result<()> {
    let user = UserName::new(name)?;
    let loaded = Loaded::load(paths)?;
    let secret = TotpSecret::generate().map_err(|_| anyhow::anyhow!("random generator failed"))?;
    loaded
        .store
        .add_user(user.as_str(), &secret, policy, now())?;
    let report = NewUserReport {
        user: user.to_string(),
        otpauth_uri: secret.otpauth_uri(user.as_str()),
        invitation: invitation(&loaded, user.as_str()).to_string(),
    };
    print_enrollment_material(out, &report, &format!("Added user {user}."))
}

pub fn user_reset_totp(paths: &Paths, name: &str, out: &mut Out<'_>) -> anyhow::Result<()> {
    let loaded = Loaded::load(paths)?;
    let secret = TotpSecret::generate().map_err(|_| anyhow::anyhow!("random generator failed"))?;
    loaded.store.reset_totp(name, &secret, now())?;
    let report = NewUserReport {
        user: name.to_owned(),
        otpauth_uri: secret.otpauth_uri(name),
        invitation: invitation(&loaded, name).to_string(),
    };
    print_enrollment_material(
        out,
        &report,
        &format!("New TOTP secret for {name}: the old authenticator entry no longer works."),
    )
}

pub fn user_invite(paths: &Paths, name: &str, out: &mut Out<'_>) -> anyhow::Result<()> {
    let loaded = Loaded::load(paths)?;
    if loaded.store.user(name)?.is_none() {
        bail!("no user named {name:?}");
    }
    let inv = invitation(&loaded, name).to_string();
    out.emit(
        &serde_json::json!({ "user": name, "invitation": inv }),
        |w| writeln!(w, "{inv}"),
    )
}

#[derive(Serialize)]
struct UserRow {
    name: String,
    vms: Vec<u32>,
    pools: Vec<String>,
    tags: Vec<String>,
    power: bool,
    require_hardware_key: bool,
    key_rules: crate::store::KeyRules,
    certificates: usize,
    created_at: i64,
}

pub fn user_list(paths: &Paths, out: &mut Out<'_>) -> anyhow::Result<()> {
    let loaded = Loaded::load(paths)?;
    let certs = loaded.store.certificates(None)?;
    let t = now();
    let rows: Vec<UserRow> = loaded
        .store
        .users()?
        .into_iter()
        .map(|u| UserRow {
            certificates: certs
                .iter()
                .filter(|c| c.user == u.name && c.revoked_at.is_none() && c.not_after > t)
                .count(),
            name: u.name,
            vms: u.policy.vms,
            pools: u.policy.pools,
            tags: u.policy.tags,
            power: u.policy.power,
            require_hardware_key: u.policy.require_hardware,
            key_rules: u.policy.key_rules,
            created_at: u.created_at,
        })
        .collect();
    out.emit(&rows, |w| {
        if rows.is_empty() {
            return writeln!(w, "No users yet: zerospice-gateway user add NAME --vm VMID");
        }
        writeln!(
            w,
            "{:<20} {:<24} {:<6} {:<9} VALID CERTS",
            "USER", "ALLOWED", "POWER", "HARDWARE"
        )?;
        for r in &rows {
            let mut allowed: Vec<String> = r.vms.iter().map(|v| v.to_string()).collect();
            allowed.extend(r.pools.iter().map(|p| format!("pool:{p}")));
            allowed.extend(r.tags.iter().map(|t| format!("tag:{t}")));
            let allowed = if allowed.is_empty() {
                "-".into()
            } else {
                allowed.join(",")
            };
            writeln!(
                w,
                "{:<20} {:<24} {:<6} {:<9} {}",
                r.name,
                allowed,
                if r.power { "yes" } else { "no" },
                if r.require_hardware_key {
                    "required"
                } else {
                    "-"
                },
                r.certificates
            )?;
        }
        Ok(())
    })
}

pub fn user_remove(paths: &Paths, name: &str, out: &mut Out<'_>) -> anyhow::Result<()> {
    let loaded = Loaded::load(paths)?;
    let revoked = loaded.store.remove_user(name, now())?;
    out.emit(
        &serde_json::json!({ "user": name, "revoked": revoked }),
        |w| {
            writeln!(
                w,
                "Removed user {name}; revoked {} certificate(s). Their open connections close within seconds.",
                revoked.len()
            )
        },
    )
}

pub fn user_set(
    paths: &Paths,
    name: &str,
    change: impl FnOnce(&mut UserPolicy),
    out: &mut Out<'_>,
) -> anyhow::Result<()> {
    let loaded = Loaded::load(paths)?;
    let Some(user) = loaded.store.user(name)? else {
        bail!("no user named {name:?}");
    };
    let mut policy = user.policy;
    change(&mut policy);
    loaded.store.set_policy(name, &policy, now())?;
    out.emit(&policy, |w| writeln!(w, "Updated user {name}."))
}

pub fn cert_list(
    paths: &Paths,
    user: Option<&str>,
    all: bool,
    out: &mut Out<'_>,
) -> anyhow::Result<()> {
    let loaded = Loaded::load(paths)?;
    let t = now();
    let certs: Vec<_> = loaded
        .store
        .certificates(user)?
        .into_iter()
        .filter(|c| all || (c.revoked_at.is_none() && c.not_after > t))
        .collect();
    out.emit(&certs, |w| {
        if certs.is_empty() {
            return writeln!(
                w,
                "No certificates{}.",
                if all {
                    ""
                } else {
                    " in force (use --all to see revoked and expired ones)"
                }
            );
        }
        writeln!(
            w,
            "{:<34} {:<14} {:<18} {:<20} {:<18} STATE",
            "SERIAL", "USER", "DEVICE", "KEY", "NOT AFTER"
        )?;
        for c in &certs {
            let key = match c.hardware_serial {
                Some(s) => format!("{} {s}", c.key_kind),
                None => c.key_kind.clone(),
            };
            let state = match (&c.revoked_at, &c.revoke_reason) {
                (Some(at), Some(r)) => format!("revoked {} ({r})", format_unix(*at)),
                _ if c.not_after <= t => "expired".into(),
                _ => "valid".into(),
            };
            writeln!(
                w,
                "{:<34} {:<14} {:<18} {:<20} {:<18} {}",
                c.serial,
                c.user,
                c.device,
                key,
                format_unix(c.not_after),
                state
            )?;
        }
        Ok(())
    })
}

pub enum RevokeTarget {
    Serial(String),
    User(String),
}

pub fn cert_revoke(
    paths: &Paths,
    target: RevokeTarget,
    reason: &str,
    out: &mut Out<'_>,
) -> anyhow::Result<()> {
    let loaded = Loaded::load(paths)?;
    match target {
        RevokeTarget::Serial(s) => {
            let serial: Serial = s.parse()?;
            let key = serial.to_string();
            let newly = loaded.store.revoke(&key, reason, now())?;
            out.emit(
                &serde_json::json!({ "serial": key, "revoked": newly }),
                |w| {
                    if newly {
                        writeln!(
                            w,
                            "Revoked {key}. Connections using it close within seconds."
                        )
                    } else {
                        writeln!(w, "{key} was already revoked.")
                    }
                },
            )
        }
        RevokeTarget::User(u) => {
            if loaded.store.user(&u)?.is_none() && loaded.store.certificates(Some(&u))?.is_empty() {
                bail!("no user named {u:?}");
            }
            let serials = loaded.store.revoke_user(&u, reason, now())?;
            out.emit(&serde_json::json!({ "user": u, "revoked": serials }), |w| {
                writeln!(w, "Revoked {} certificate(s) of {u}.", serials.len())
            })
        }
    }
}

pub fn audit(
    paths: &Paths,
    limit: u32,
    user: Option<&str>,
    out: &mut Out<'_>,
) -> anyhow::Result<()> {
    let loaded = Loaded::load(paths)?;
    let records = loaded.store.audit_log(limit, user)?;
    out.emit(&records, |w| {
        for r in &records {
            writeln!(
                w,
                "{} {:<16} user={} device={} serial={} peer={} {}",
                format_unix(r.at),
                r.event,
                r.user.as_deref().unwrap_or("-"),
                r.device.as_deref().unwrap_or("-"),
                r.serial.as_deref().unwrap_or("-"),
                r.peer.as_deref().unwrap_or("-"),
                r.detail
            )?;
        }
        Ok(())
    })
}
