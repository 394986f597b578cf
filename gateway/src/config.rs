//! The gateway configuration file (`gateway.toml`).
//!
//! Everything has a sane default except the listening address (a ZeroTier address in
//! production) and the Proxmox connection. Unknown keys are refused, so a typo is an error and not
//! a silently ignored setting.
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "gateway.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: ListenConfig,
    #[serde(default)]
    pub certificates: CertificateConfig,
    #[serde(default)]
    pub enrollment: EnrollmentConfig,
    #[serde(default)]
    pub sessions: SessionConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxmox: Option<ProxmoxConfig>,
    #[serde(default)]
    pub attestation: AttestationConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// UDP address of the access endpoint (mutual TLS).
    pub access: SocketAddr,
    /// UDP address of the enrollment endpoint (TOTP-gated).
    pub enroll: SocketAddr,
    /// Listening on 0.0.0.0 or :: exposes the gateway on every interface; refused unless true.
    #[serde(default)]
    pub allow_wildcard: bool,
    /// Host name or address that clients use to reach this gateway, if not the listening
    /// address (needed with a wildcard listen address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_host: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// Validity of issued client certificates, in days.
    pub validity_days: u32,
    /// Agents renew when less than this many hours remain.
    pub renew_before_hours: u32,
}

impl Default for CertificateConfig {
    fn default() -> Self {
        Self {
            validity_days: 7,
            renew_before_hours: 48,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollmentConfig {
    /// Failures per user before a lockout (then 1 min, doubling, up to `max_lockout_secs`).
    pub user_failures: u32,
    /// Failures per source address before a lockout.
    pub address_failures: u32,
    pub base_lockout_secs: u64,
    pub max_lockout_secs: u64,
}

impl Default for EnrollmentConfig {
    fn default() -> Self {
        Self {
            user_failures: crate::totp::LockoutPolicy::USER.free_failures,
            address_failures: crate::totp::LockoutPolicy::ADDRESS.free_failures,
            base_lockout_secs: crate::totp::LockoutPolicy::USER.base_secs,
            max_lockout_secs: crate::totp::LockoutPolicy::USER.max_secs,
        }
    }
}

impl EnrollmentConfig {
    pub fn user_policy(&self) -> crate::totp::LockoutPolicy {
        crate::totp::LockoutPolicy {
            free_failures: self.user_failures.max(1),
            base_secs: self.base_lockout_secs,
            max_secs: self.max_lockout_secs,
        }
    }
    pub fn address_policy(&self) -> crate::totp::LockoutPolicy {
        crate::totp::LockoutPolicy {
            free_failures: self.address_failures.max(1),
            base_secs: self.base_lockout_secs,
            max_secs: self.max_lockout_secs,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Seconds after a session is granted during which its first channels must open (Proxmox's
    /// one-time SPICE password lives 30 s).
    pub channel_window_secs: u64,
    /// Simultaneous access connections per certificate.
    pub max_connections_per_certificate: u32,
    /// Concurrent streams (requests and SPICE channels) per connection.
    pub max_streams_per_connection: u32,
    /// Seconds without traffic after which a connection is dropped (agents send keep-alives).
    pub idle_timeout_secs: u64,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            channel_window_secs: 30,
            max_connections_per_certificate: 4,
            max_streams_per_connection: 64,
            idle_timeout_secs: 30,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxmoxConfig {
    /// `https://pve.lan:8006`
    pub url: String,
    /// `zerospice@pve!gateway`
    pub token_id: String,
    /// File holding the token secret (a UUID), mode 0600. Relative to the config file.
    pub token_secret_file: PathBuf,
    /// Proxmox cluster CA (`/etc/pve/pve-root-ca.pem`) to verify the API certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Or: the SHA-256 fingerprint of the API certificate (`SHA256:...` or colon hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// Skip certificate verification. Never in production: anyone on the path sees the token.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub danger_accept_invalid_certs: bool,
    /// `host:port` of a node's spiceproxy (port 3128); it relays to every node of the cluster.
    /// Defaults to the API host on port 3128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spiceproxy: Option<String>,
    /// Seconds for every API call.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

fn default_timeout() -> u64 {
    10
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// Extra PEM files of YubiKey attestation roots trusted besides Yubico's, which are built in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_roots: Vec<PathBuf>,
    /// Do not trust the built-in Yubico roots (tests with a virtual card use this).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disable_builtin_roots: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        let body = toml::to_string_pretty(self).unwrap_or_default();
        format!(
            "# ZeroSpice gateway configuration. See INSTALL.md for every setting.\n\
             # Relative paths are relative to this file's directory.\n\n{body}"
        )
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (what, addr) in [
            ("access", self.listen.access),
            ("enroll", self.listen.enroll),
        ] {
            if addr.ip().is_unspecified() && !self.listen.allow_wildcard {
                return Err(ConfigError::Invalid(format!(
                    "listen.{what} = {addr} is a wildcard address: the gateway would be reachable on every interface. \
                     Use the ZeroTier address of this host, or set listen.allow_wildcard = true if a firewall protects it"
                )));
            }
        }
        if self.listen.access == self.listen.enroll {
            return Err(ConfigError::Invalid(
                "listen.access and listen.enroll must be different ports".into(),
            ));
        }
        if self.listen.allow_wildcard
            && self.listen.access.ip().is_unspecified()
            && self.listen.public_host.is_none()
        {
            return Err(ConfigError::Invalid(
                "with a wildcard listen address, set listen.public_host to the address clients use"
                    .into(),
            ));
        }
        if self.certificates.validity_days == 0 || self.certificates.validity_days > 397 {
            return Err(ConfigError::Invalid(
                "certificates.validity_days must be between 1 and 397".into(),
            ));
        }
        if let Some(p) = &self.proxmox {
            if !p.url.starts_with("https://") {
                return Err(ConfigError::Invalid(
                    "proxmox.url must start with https://".into(),
                ));
            }
            let pinned = p.ca_file.is_some() as u8 + p.fingerprint.is_some() as u8;
            if pinned == 0 && !p.danger_accept_invalid_certs {
                return Err(ConfigError::Invalid(
                    "proxmox: set ca_file (e.g. a copy of /etc/pve/pve-root-ca.pem) or fingerprint \
                     (the API certificate's SHA-256) so the gateway can verify Proxmox"
                        .into(),
                ));
            }
            if pinned == 2 {
                return Err(ConfigError::Invalid(
                    "proxmox: set either ca_file or fingerprint, not both".into(),
                ));
            }
            if p.timeout_secs == 0 || p.timeout_secs > 300 {
                return Err(ConfigError::Invalid(
                    "proxmox.timeout_secs must be between 1 and 300".into(),
                ));
            }
        }
        if self.sessions.channel_window_secs == 0 {
            return Err(ConfigError::Invalid(
                "sessions.channel_window_secs must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The host clients use to reach this gateway.
    pub fn public_host(&self) -> String {
        match &self.listen.public_host {
            Some(h) => h.clone(),
            None => host_text(self.listen.enroll.ip()),
        }
    }

    /// `host:port` of the enrollment endpoint as clients see it.
    pub fn public_enroll_addr(&self) -> String {
        format!("{}:{}", self.public_host(), self.listen.enroll.port())
    }

    /// `host:port` of the access endpoint as clients see it.
    pub fn public_access_addr(&self) -> String {
        let host = match &self.listen.public_host {
            Some(h) => h.clone(),
            None => host_text(self.listen.access.ip()),
        };
        format!("{host}:{}", self.listen.access.port())
    }
}

fn host_text(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Resolves a path from the config file relative to the file's directory.
pub fn resolve(config_path: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        config_path.parent().unwrap_or(Path::new(".")).join(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config {
            listen: ListenConfig {
                access: "10.147.17.5:7443".parse().unwrap(),
                enroll: "10.147.17.5:7444".parse().unwrap(),
                allow_wildcard: false,
                public_host: None,
            },
            certificates: Default::default(),
            enrollment: Default::default(),
            sessions: Default::default(),
            proxmox: None,
            attestation: Default::default(),
        }
    }

    #[test]
    fn round_trips_through_toml() {
        let c = base();
        let text = c.to_toml();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.public_enroll_addr(), "10.147.17.5:7444");
        assert_eq!(c.public_access_addr(), "10.147.17.5:7443");
    }

    #[test]
    fn wildcard_needs_explicit_consent() {
        let mut c = base();
        c.listen.access = "0.0.0.0:7443".parse().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("wildcard"), "{e}");
        c.listen.allow_wildcard = true;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("public_host"));
        c.listen.public_host = Some("gw.example".into());
        c.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_unpinned_proxmox_are_refused() {
        let text = base()
            .to_toml()
            .replace("[listen]", "[listen]\nacess = \"x\"");
        assert!(toml::from_str::<Config>(&text).is_err());
        let mut c = base();
        c.proxmox = Some(ProxmoxConfig {
            url: "https://pve:8006".into(),
            token_id: "a@pve!b".into(),
            token_secret_file: "t".into(),
            ca_file: None,
            fingerprint: None,
            danger_accept_invalid_certs: false,
            spiceproxy: None,
            timeout_secs: 10,
        });
        assert!(c.validate().unwrap_err().to_string().contains("ca_file"));
    }

    #[test]
    fn ipv6_hosts_are_bracketed() {
        let mut c = base();
        c.listen.enroll = "[fd00::5]:7444".parse().unwrap();
        assert_eq!(c.public_enroll_addr(), "[fd00::5]:7444");
    }
}
