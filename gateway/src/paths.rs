//! Where the gateway keeps its files.
//!
//! ```text
//! DIR/            0700  state directory (default /var/lib/zerospice)
//!   ca.key        0600  the CA private key (PKCS#8 PEM)
//!   ca.crt        0644  the CA certificate
//!   state.db      0600  users, certificates, revocations, counters, audit (SQLite, WAL)
//!   proxmox-token 0600  the Proxmox API token secret (if `init` was given one)
//! CONFIG          the configuration file (default DIR/gateway.toml if it exists,
//!                 else /etc/zerospice/gateway.toml)
//! ```
use std::path::{Path, PathBuf};
use zerospice_ca::fsutil::{self, PermError};

pub const DEFAULT_DIR: &str = "/var/lib/zerospice";
pub const ETC_CONFIG: &str = "/etc/zerospice/gateway.toml";

#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
    pub config: PathBuf,
}

impl Paths {
    /// Resolves the configuration path when none was given.
    pub fn new(dir: PathBuf, config: Option<PathBuf>) -> Self {
        let config = config.unwrap_or_else(|| {
            let local = dir.join(crate::config::CONFIG_FILE);
            if local.exists() || !Path::new(ETC_CONFIG).exists() {
                local
            } else {
                PathBuf::from(ETC_CONFIG)
            }
        });
        Self { dir, config }
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn db(&self) -> PathBuf {
        self.dir.join(crate::store::DB_FILE)
    }
    pub fn proxmox_token(&self) -> PathBuf {
        self.dir.join("proxmox-token")
    }

    /// The state directory must be 0700 and the secrets in it 0600.
    pub fn check_permissions(&self) -> Result<(), PermError> {
        fsutil::check_private_dir(&self.dir)?;
        for f in [self.ca_key(), self.db()] {
            fsutil::check_private_file(&f)?;
        }
        if self.proxmox_token().exists() {
            fsutil::check_private_file(&self.proxmox_token())?;
        }
        Ok(())
    }
}
