//! The ZeroSpice PKI, shared by the gateway and its clients.
//!
//! - [`authority`]: the CA (ECDSA P-256 root) and the certificate profiles it issues.
//! - [`csr`]: CSR validation ("parse, don't validate": a [`csr::ValidatedCsr`] exists only once
//!   its algorithm, key and signature have been checked).
//! - [`identity`]: who a presented client certificate names, parsed back with x509-parser.
//! - [`keys`]: the one signing trait ([`keys::Signer`]) behind which software and hardware keys
//!   sit, with adapters for rcgen (CSR and certificate signing) and rustls (TLS handshakes).
//! - [`names`], [`serial`], [`fingerprint`]: the checked value types the rest of ZeroSpice uses.
//! - [`piv`] (feature `yubikey`, on by default): keys in a YubiKey PIV slot behind the same
//!   trait, with PIN prompt and touch notice callbacks, key generation and attestation.
//! - [`fsutil`]: writing secrets 0600 atomically and refusing loose permissions.
//!
//! This crate knows nothing of Proxmox, QUIC or GUIs.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod attestation;
pub mod authority;
pub mod csr;
pub mod fingerprint;
pub mod fsutil;
pub mod identity;
pub mod keys;
pub mod names;
pub mod pem;
#[cfg(feature = "yubikey")]
pub mod piv;
pub mod serial;

pub use authority::{CertificateAuthority, ClientCertRequest, IssuedCertificate, KeyProvenance};
pub use csr::{CsrError, ValidatedCsr};
pub use fingerprint::Fingerprint;
pub use identity::{Identity, IdentityError};
pub use keys::{KeyAlgorithm, SignError, Signer, SoftwareKey};
pub use names::{DeviceName, NameError, UserName};
pub use serial::Serial;

/// The URI scheme of ZeroSpice subject alternative names.
pub const URI_SCHEME: &str = "zerospice://";
