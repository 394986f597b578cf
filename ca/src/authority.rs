//! The ZeroSpice CA and the certificate profiles it issues.
//!
//! **Client certificate profile** (whatever the CSR asks for):
//! - random 128-bit serial; issuer = the ZeroSpice CA; AKI and SKI;
//! - subject `CN=<user>`;
//! - SAN URI `zerospice://user/<user>/device/<device>` (the identity the gateway acts on) and
//!   SAN URI `zerospice://key/software` or `zerospice://key/yubikey/<serial>` (how the key is held);
//! - basicConstraints CA:FALSE, keyUsage digitalSignature, extendedKeyUsage clientAuth only;
//! - validity from policy (default 7 days), starting 5 minutes in the past for clock skew, never
//!   beyond the CA's own notAfter.
//!
//! **Gateway server certificate**: `CN=zerospice-gateway`, SAN DNS `gateway.zerospice.invalid`,
//! EKU serverAuth, CA:FALSE, a fresh key held only in memory.
//!
//! **CA**: ECDSA P-256, `CN=ZeroSpice CA <id>, O=ZeroSpice`, CA:TRUE pathlen 0,
//! keyUsage keyCertSign + cRLSign, 20 years.
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::csr::ValidatedCsr;
use crate::identity::Identity;
use crate::keys::{KeyAlgorithm, RcgenKey, Signer, SoftwareKey};
use crate::names::{DeviceName, UserName};
use crate::{Fingerprint, Serial};

/// Default validity of client certificates.
pub const DEFAULT_CLIENT_VALIDITY: Duration = Duration::days(7);
/// Validity of the CA certificate.
pub const CA_VALIDITY: Duration = Duration::days(20 * 365 + 5);
/// Client certificates start this far in the past, for clients whose clock is a little behind.
pub const BACKDATE: Duration = Duration::minutes(5);

/// How a certificate's private key is held. Recorded in the certificate (SAN URI) and in the
/// gateway's database; a hardware claim is only ever written after attestation was verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyProvenance {
    Software,
    /// Generated inside a YubiKey PIV slot (attested); the device serial.
    Yubikey {
        serial: u32,
    },
}

impl KeyProvenance {
    pub fn uri(&self) -> String {
        match self {
            KeyProvenance::Software => format!("{}key/software", crate::URI_SCHEME),
            KeyProvenance::Yubikey { serial } => {
                format!("{}key/yubikey/{serial}", crate::URI_SCHEME)
            }
        }
    }
    /// `software` or `yubikey` (the database's `key_kind` column).
    pub fn kind(&self) -> &'static str {
        match self {
            KeyProvenance::Software => "software",
            KeyProvenance::Yubikey { .. } => "yubikey",
        }
    }
    pub fn hardware_serial(&self) -> Option<u32> {
        match self {
            KeyProvenance::Software => None,
            KeyProvenance::Yubikey { serial } => Some(*serial),
        }
    }
}

impl std::fmt::Display for KeyProvenance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeyProvenance::Software => f.write_str("software key"),
            KeyProvenance::Yubikey { serial } => write!(f, "YubiKey {serial}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the CA certificate is not valid: {0}")]
    BadCaCertificate(String),
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("the CA certificate expired or is not yet valid")]
    CaExpired,
    #[error("internal error: {0}")]
    Internal(String),
}

/// What the gateway has verified and wants certified.
#[derive(Debug)]
pub struct ClientCertRequest<'a> {
    pub csr: &'a ValidatedCsr,
    pub user: &'a UserName,
    pub device: &'a DeviceName,
    pub key: KeyProvenance,
    pub now: OffsetDateTime,
    pub validity: Duration,
}

/// A certificate just issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    pub der: Vec<u8>,
    pub serial: Serial,
    pub fingerprint: Fingerprint,
    /// SHA-256 of the SubjectPublicKeyInfo.
    pub key_fingerprint: Fingerprint,
    pub not_before: i64,
    pub not_after: i64,
}

impl IssuedCertificate {
    fn from_der(der: Vec<u8>) -> Result<Self, CaError> {
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| CaError::Internal(format!("issued certificate does not parse: {e}")))?;
        Ok(Self {
            serial: Serial::from_be_bytes(cert.raw_serial()),
            fingerprint: Fingerprint::of(&der),
            key_fingerprint: Fingerprint::of(cert.public_key().raw),
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            der,
        })
    }
    pub fn pem(&self) -> String {
        crate::pem::certificate(&self.der)
    }
}

/// The CA: its certificate and a signer for its key.
pub struct CertificateAuthority {
    cert_der: Vec<u8>,
    key: Box<dyn Signer>,
    fingerprint: Fingerprint,
    not_after: OffsetDateTime,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| CaError::Internal("random number generator failed".into()))?;
    Ok(SerialNumber::from_slice(&b))
}

impl CertificateAuthority {
    /// Creates a new CA with a fresh P-256 key. Returns the CA and its key as PKCS#8 PEM, which
    /// the caller must store 0600.
    pub fn generate(now: OffsetDateTime) -> Result<(Self, Zeroizing<String>), CaError> {
        let key = SoftwareKey::generate(KeyAlgorithm::EcdsaP256)
            .map_err(|e| CaError::Internal(e.to_string()))?;
        let id = &Fingerprint::of(&key.spki_der()).hex()[..8];
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("ZeroSpice CA {id}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "ZeroSpice");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + CA_VALIDITY;
        params.serial_number = Some(random_serial()?);
        let cert = params.self_signed(&RcgenKey(&key))?;
        let key_pem = key.to_pem();
        let ca = Self::from_parts(cert.der(), Box::new(key))?;
        Ok((ca, key_pem))
    }

    /// Loads a CA from its certificate (DER) and a signer for its key, checking they belong
    /// together and that the certificate is a CA.
    pub fn from_parts(cert_der: &[u8], key: Box<dyn Signer>) -> Result<Self, CaError> {
        let (rest, cert) = X509Certificate::from_der(cert_der)
            .map_err(|e| CaError::BadCaCertificate(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CaError::BadCaCertificate("trailing data".into()));
        }
        if !cert.is_ca() {
            return Err(CaError::BadCaCertificate(
                "basicConstraints does not say CA".into(),
            ));
        }
        if cert.public_key().raw != key.spki_der().as_slice() {
            return Err(CaError::KeyMismatch);
        }
        Ok(Self {
            fingerprint: Fingerprint::of(cert_der),
            not_after: cert.validity().not_after.to_datetime(),
            cert_der: cert_der.to_vec(),
            key,
        })
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }
    pub fn cert_pem(&self) -> String {
        crate::pem::certificate(&self.cert_der)
    }
    /// `SHA256:` + hex of the DER CA certificate: what enrolling clients pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    fn issuer(&self) -> Result<Issuer<'_, RcgenKey<'_, dyn Signer>>, CaError> {
        Ok(Issuer::from_ca_cert_der(
            &CertificateDer::from(self.cert_der.as_slice()),
            RcgenKey(self.key.as_ref()),
        )?)
    }

    fn validity(
        &self,
        params: &mut CertificateParams,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<(), CaError> {
        if now >= self.not_after {
            return Err(CaError::CaExpired);
        }
        params.not_before = now - BACKDATE;
        params.not_after = (now + validity).min(self.not_after);
        Ok(())
    }

    /// Issues a client certificate with the ZeroSpice profile. Nothing of the CSR but its public
    /// key is used.
    pub fn issue_client(&self, req: &ClientCertRequest<'_>) -> Result<IssuedCertificate, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, req.user.as_str());
        let identity_uri = crate::identity::identity_uri(req.user, req.device);
        params.subject_alt_names = vec![
            SanType::URI(identity_uri.try_into()?),
            SanType::URI(req.key.uri().try_into()?),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        self.validity(&mut params, req.now, req.validity)?;

        let cert = params.signed_by(&req.csr.rcgen_public_key(), &self.issuer()?)?;
        let issued = IssuedCertificate::from_der(cert.der().to_vec())?;

        // Belt and braces: read the certificate back as the gateway will and check it says
        // exactly what was verified.
        let id = Identity::from_der(&issued.der)
            .map_err(|e| CaError::Internal(format!("issued certificate fails its profile: {e}")))?;
        let (_, parsed) =
            X509Certificate::from_der(&issued.der).map_err(|e| CaError::Internal(e.to_string()))?;
        if id.user != *req.user
            || id.device != *req.device
            || id.key != req.key
            || parsed.public_key().raw != req.csr.spki()
        {
            return Err(CaError::Internal(
                "issued certificate does not match the request".into(),
            ));
        }
        Ok(issued)
    }

    /// Issues the gateway's TLS server certificate for `signer`'s key.
    pub fn issue_server(
        &self,
        signer: &dyn Signer,
        dns_name: &str,
        now: OffsetDateTime,
        validity: Duration,
    ) -> Result<IssuedCertificate, CaError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, "zerospice-gateway");
        params.subject_alt_names = vec![SanType::DnsName(dns_name.try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        self.validity(&mut params, now, validity)?;
        let cert = params.signed_by(&RcgenKey(signer), &self.issuer()?)?;
        IssuedCertificate::from_der(cert.der().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::build_csr;
    use crate::csr::tests::csr_with;
    use x509_parser::extensions::GeneralName;

    pub(crate) fn test_ca() -> CertificateAuthority {
        CertificateAuthority::generate(OffsetDateTime::now_utc())
            .unwrap()
            .0
    }

    fn issue(ca: &CertificateAuthority, csr_der: &[u8], key: KeyProvenance) -> IssuedCertificate {
        let csr = ValidatedCsr::parse(csr_der).unwrap();
        ca.issue_client(&ClientCertRequest {
            csr: &csr,
            user: &UserName::new("alice").unwrap(),
            device: &DeviceName::new("laptop").unwrap(),
            key,
            now: OffsetDateTime::now_utc(),
            validity: DEFAULT_CLIENT_VALIDITY,
        })
        .unwrap()
    }

    #[test]
    fn ca_certificate_profile() {
        let (ca, key_pem) = CertificateAuthority::generate(OffsetDateTime::now_utc()).unwrap();
        let (_, cert) = X509Certificate::from_der(ca.cert_der()).unwrap();
        assert!(cert.is_ca());
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let years = (cert.validity().not_after.timestamp()
            - cert.validity().not_before.timestamp())
            / (365 * 86400);
        assert_eq!(years, 20);
        assert!(ca.fingerprint().to_string().starts_with("SHA256:"));
        // Reload from parts.
        let key = SoftwareKey::from_pem(&key_pem).unwrap();
        let again = CertificateAuthority::from_parts(ca.cert_der(), Box::new(key)).unwrap();
        assert_eq!(again.fingerprint(), ca.fingerprint());
        // Another key does not fit.
        let other = SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        assert!(matches!(
            CertificateAuthority::from_parts(ca.cert_der(), Box::new(other)),
            Err(CaError::KeyMismatch)
        ));
    }

    #[test]
    fn client_certificate_profile() {
        let ca = test_ca();
        let key = SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let issued = issue(
            &ca,
            &build_csr(&key, "alice").unwrap(),
            KeyProvenance::Software,
        );
        let (_, cert) = X509Certificate::from_der(&issued.der).unwrap();

        assert_eq!(cert.subject().to_string(), "CN=alice");
        assert_eq!(
            cert.issuer(),
            X509Certificate::from_der(ca.cert_der())
                .unwrap()
                .1
                .subject()
        );
        assert!(cert.raw_serial().len() >= 15);
        assert!(!cert.is_ca());
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(!bc.ca);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth);
        assert!(!eku.server_auth && !eku.code_signing && !eku.any && eku.other.is_empty());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.digital_signature() && !ku.key_cert_sign());
        let sans: Vec<_> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| match g {
                GeneralName::URI(u) => u.to_string(),
                other => panic!("unexpected SAN {other:?}"),
            })
            .collect();
        assert_eq!(
            sans,
            [
                "zerospice://user/alice/device/laptop",
                "zerospice://key/software"
            ]
        );
        let days = (issued.not_after - issued.not_before) as f64 / 86400.0;
        assert!((days - 7.0).abs() < 0.01, "{days}");
        assert_eq!(cert.public_key().raw, key.spki_der().as_slice());
        assert!(has_aki(&cert));
    }

    fn has_aki(cert: &X509Certificate<'_>) -> bool {
        cert.extensions()
            .iter()
            .any(|e| e.oid == x509_parser::oid_registry::OID_X509_EXT_AUTHORITY_KEY_IDENTIFIER)
    }

    #[test]
    fn csr_requests_are_ignored() {
        // A CSR asking for CA:TRUE, another user's name, serverAuth and codeSigning.
        let ca = test_ca();
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "admin");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::CodeSigning,
        ];
        p.subject_alt_names = vec![SanType::URI(
            "zerospice://user/admin/device/x".try_into().unwrap(),
        )];
        let issued = issue(&ca, &csr_with(&p, &kp), KeyProvenance::Software);
        let id = Identity::from_der(&issued.der).unwrap();
        assert_eq!(id.user.as_str(), "alice");
        let (_, cert) = X509Certificate::from_der(&issued.der).unwrap();
        assert!(!cert.is_ca());
        assert_eq!(cert.subject().to_string(), "CN=alice");
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth && !eku.code_signing);
    }

    #[test]
    fn serials_are_random_and_validity_is_clamped_to_the_ca() {
        let ca = test_ca();
        let key = SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = build_csr(&key, "x").unwrap();
        let a = issue(&ca, &csr, KeyProvenance::Software);
        let b = issue(&ca, &csr, KeyProvenance::Yubikey { serial: 7 });
        assert_ne!(a.serial, b.serial);
        assert_eq!(
            Identity::from_der(&b.der).unwrap().key,
            KeyProvenance::Yubikey { serial: 7 }
        );
        let v = ValidatedCsr::parse(&csr).unwrap();
        let long = ca
            .issue_client(&ClientCertRequest {
                csr: &v,
                user: &UserName::new("a").unwrap(),
                device: &DeviceName::new("d").unwrap(),
                key: KeyProvenance::Software,
                now: OffsetDateTime::now_utc(),
                validity: Duration::days(365 * 100),
            })
            .unwrap();
        assert_eq!(long.not_after, ca.not_after().unix_timestamp());
    }

    #[test]
    fn server_certificate_profile() {
        let ca = test_ca();
        let key = SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let issued = ca
            .issue_server(
                &key,
                "gateway.zerospice.invalid",
                OffsetDateTime::now_utc(),
                Duration::days(30),
            )
            .unwrap();
        let (_, cert) = X509Certificate::from_der(&issued.der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        // A server certificate is not a ZeroSpice identity.
        assert!(Identity::from_der(&issued.der).is_err());
    }
}
