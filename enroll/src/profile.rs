//! The client profile: what an enrolled device keeps.
//!
//! ```text
//! ~/.config/zerospice/      0700  ($XDG_CONFIG_HOME/zerospice)
//!   profile.toml            0600  user, device, gateway addresses, CA fingerprint, key reference
//!   ca.crt                  0644  the ZeroSpice CA (its fingerprint is the pinned one)
//!   client.crt              0644  the client certificate
//!   client.key              0600  the private key (software keys only; a YubiKey keeps its own)
//! ```
//! `profile.toml` is written last, so its presence means a complete profile.
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zerospice_ca::fsutil;
use zerospice_ca::{Fingerprint, Identity, Signer, SoftwareKey};

pub const PROFILE_FILE: &str = "profile.toml";
pub const CA_FILE: &str = "ca.crt";
pub const CERT_FILE: &str = "client.crt";
pub const KEY_FILE: &str = "client.key";

/// How the profile's private key is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum KeyRef {
    /// PKCS#8 PEM in `client.key`.
    Software,
    /// In a YubiKey PIV slot.
    Yubikey { serial: u32, slot: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub user: String,
    pub device: String,
    /// `host:port` of the gateway's access endpoint.
    pub access: String,
    /// `host:port` of the gateway's enrollment endpoint (used to re-enroll).
    pub enroll: String,
    /// `SHA256:...` of the CA certificate.
    pub ca_fingerprint: String,
    pub key: KeyRef,
    pub serial: String,
    pub not_after: i64,
    pub enrolled_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("no ZeroSpice profile in {0}: enroll first with zerospice-enroll")]
    Missing(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {message}")]
    Damaged { path: String, message: String },
    #[error(transparent)]
    Perm(#[from] fsutil::PermError),
    #[error("the CA certificate in {path} does not match the pinned fingerprint {pinned}")]
    CaMismatch { path: String, pinned: String },
    #[error("{0}")]
    Key(String),
}

/// A profile directory.
#[derive(Debug, Clone)]
pub struct ProfileDir {
    pub dir: PathBuf,
}

/// `$XDG_CONFIG_HOME/zerospice`, else `~/.config/zerospice`.
pub fn default_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("zerospice");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".config").join("zerospice")
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Io {
        path: path.display().to_string(),
        source,
    }
}

impl ProfileDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn exists(&self) -> bool {
        self.file(PROFILE_FILE).exists()
    }

    pub fn create(&self) -> Result<(), ProfileError> {
        fsutil::create_private_dir(&self.dir).map_err(io_err(&self.dir))
    }

    pub fn load(&self) -> Result<Profile, ProfileError> {
        let path = self.file(PROFILE_FILE);
        if !path.exists() {
            return Err(ProfileError::Missing(self.dir.display().to_string()));
        }
        fsutil::check_private_dir(&self.dir)?;
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        toml::from_str(&text).map_err(|e| ProfileError::Damaged {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    pub fn save(&self, profile: &Profile) -> Result<(), ProfileError> {
        let path = self.file(PROFILE_FILE);
        let text = toml::to_string_pretty(profile).map_err(|e| ProfileError::Damaged {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        fsutil::write_private(&path, text.as_bytes()).map_err(io_err(&path))
    }

    pub fn write_public(&self, name: &str, contents: &str) -> Result<(), ProfileError> {
        let path = self.file(name);
        fsutil::write_public(&path, contents.as_bytes()).map_err(io_err(&path))
    }

    pub fn write_private(&self, name: &str, contents: &[u8]) -> Result<(), ProfileError> {
        let path = self.file(name);
        fsutil::write_private(&path, contents).map_err(io_err(&path))
    }

    fn read_cert(&self, name: &str) -> Result<Vec<u8>, ProfileError> {
        let path = self.file(name);
        let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
        zerospice_ca::pem::first_certificate(&text).map_err(|e| ProfileError::Damaged {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The CA certificate (DER), checked against the pinned fingerprint in the profile.
    pub fn ca_der(&self, profile: &Profile) -> Result<Vec<u8>, ProfileError> {
        let der = self.read_cert(CA_FILE)?;
        let pinned: Fingerprint =
            profile
                .ca_fingerprint
                .parse()
                .map_err(|_| ProfileError::Damaged {
                    path: self.file(PROFILE_FILE).display().to_string(),
                    message: "bad ca_fingerprint".into(),
                })?;
        if !Fingerprint::of(&der).matches(&pinned) {
            return Err(ProfileError::CaMismatch {
                path: self.file(CA_FILE).display().to_string(),
                pinned: profile.ca_fingerprint.clone(),
            });
        }
        Ok(der)
    }

    /// The client certificate (DER) and the identity it names.
    pub fn certificate(&self) -> Result<(Vec<u8>, Identity), ProfileError> {
        let der = self.read_cert(CERT_FILE)?;
        let id = Identity::from_der(&der).map_err(|e| ProfileError::Damaged {
            path: self.file(CERT_FILE).display().to_string(),
            message: e.to_string(),
        })?;
        Ok((der, id))
    }

    /// The software key of this profile.
    pub fn software_key(&self) -> Result<Arc<dyn Signer>, ProfileError> {
        let path = self.file(KEY_FILE);
        fsutil::check_private_file(&path)?;
        let pem = zeroize::Zeroizing::new(std::fs::read_to_string(&path).map_err(io_err(&path))?);
        let key = SoftwareKey::from_pem(&pem).map_err(|e| ProfileError::Damaged {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Arc::new(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_round_trip_and_missing() {
        let d = tempfile::tempdir().unwrap();
        let pd = ProfileDir::new(d.path().join("zs"));
        assert!(matches!(pd.load(), Err(ProfileError::Missing(_))));
        pd.create().unwrap();
        let p = Profile {
            user: "alice".into(),
            device: "laptop".into(),
            access: "10.0.0.1:7443".into(),
            enroll: "10.0.0.1:7444".into(),
            ca_fingerprint: format!("SHA256:{}", "00".repeat(32)),
            key: KeyRef::Yubikey {
                serial: 5,
                slot: "9a".into(),
            },
            serial: "ab".into(),
            not_after: 10,
            enrolled_at: 1,
        };
        pd.save(&p).unwrap();
        assert_eq!(pd.load().unwrap(), p);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(pd.file(PROFILE_FILE)).unwrap().mode() & 0o777,
            0o600
        );
    }
}
