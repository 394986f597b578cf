//! CSR validation.
//!
//! A [`ValidatedCsr`] exists only once the request parsed as DER PKCS#10 with nothing trailing,
//! its key is of a supported type and size, its signature algorithm fits that key, and the
//! signature verifies. Everything else the CSR says (subject, requested extensions such as
//! CA:TRUE, extra EKUs, other names) is ignored: the CA sets the whole profile itself.
use ring::signature::{self, VerificationAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::der_parser::oid::Oid;
use x509_parser::oid_registry::*;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::keys::{KeyAlgorithm, RcgenKey, Signer};

/// Largest CSR accepted (an RSA-8192 CSR is about 1.5 KiB).
pub const MAX_CSR_LEN: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CsrError {
    #[error("the CSR is larger than {MAX_CSR_LEN} bytes")]
    TooLarge,
    #[error("the CSR is not a valid DER PKCS#10 request")]
    Malformed,
    #[error("the CSR has trailing data after the request")]
    TrailingData,
    #[error("the CSR has version {0}; only version 1 (0) exists")]
    BadVersion(u32),
    #[error("key type {0} is not supported: use ECDSA P-256 or P-384, RSA (2048 bits or more) or Ed25519")]
    UnsupportedKey(String),
    #[error("elliptic curve {0} is not supported: use P-256 or P-384")]
    UnsupportedCurve(String),
    #[error("RSA key of {0} bits is too small: at least 2048 bits are required")]
    RsaTooSmall(usize),
    #[error("RSA key of {0} bits is too large: at most 8192 bits are accepted")]
    RsaTooLarge(usize),
    #[error("signature algorithm {0} is not supported for this key type")]
    UnsupportedSignature(String),
    #[error("the CSR's signature does not verify with its own public key")]
    BadSignature,
    #[error("the proof of possession does not verify with the CSR's public key")]
    BadProof,
}

/// The kind of key a CSR carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsrKeyKind {
    Ec(KeyAlgorithm),
    Rsa { bits: usize },
    Ed25519,
}

/// A CSR whose key and self-signature have been checked.
#[derive(Debug, Clone)]
pub struct ValidatedCsr {
    der: Vec<u8>,
    spki: Vec<u8>,
    public_key: Vec<u8>,
    kind: CsrKeyKind,
    verify_alg: &'static dyn VerificationAlgorithm,
    rcgen_alg: &'static rcgen::SignatureAlgorithm,
}

impl ValidatedCsr {
    pub fn parse(der: &[u8]) -> Result<Self, CsrError> {
        if der.len() > MAX_CSR_LEN {
            return Err(CsrError::TooLarge);
        }
        let (rest, csr) =
            X509CertificationRequest::from_der(der).map_err(|_| CsrError::Malformed)?;
        if !rest.is_empty() {
            return Err(CsrError::TrailingData);
        }
        let info = &csr.certification_request_info;
        if info.version.0 != 0 {
            return Err(CsrError::BadVersion(info.version.0));
        }
        let spki = &info.subject_pki;
        let key_oid = &spki.algorithm.algorithm;
        let sig_oid = &csr.signature_algorithm.algorithm;

        let (kind, rcgen_alg) = if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or(CsrError::UnsupportedCurve("(unnamed)".into()))?;
            let alg = if curve == OID_EC_P256 {
                KeyAlgorithm::EcdsaP256
            } else if curve == OID_NIST_EC_P384 {
                KeyAlgorithm::EcdsaP384
            } else {
                return Err(CsrError::UnsupportedCurve(oid_name(&curve)));
            };
            (CsrKeyKind::Ec(alg), alg.rcgen())
        } else if *key_oid == OID_PKCS1_RSAENCRYPTION {
            let bits = match spki.parsed() {
                Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
                _ => return Err(CsrError::Malformed),
            };
            if bits < 2048 {
                return Err(CsrError::RsaTooSmall(bits));
            }
            if bits > 8192 {
                return Err(CsrError::RsaTooLarge(bits));
            }
            (CsrKeyKind::Rsa { bits }, &rcgen::PKCS_RSA_SHA256)
        } else if *key_oid == OID_SIG_ED25519 {
            (CsrKeyKind::Ed25519, &rcgen::PKCS_ED25519)
        } else {
            return Err(CsrError::UnsupportedKey(oid_name(key_oid)));
        };

        let verify_alg: &'static dyn VerificationAlgorithm = match (kind, sig_oid) {
            (CsrKeyKind::Ec(KeyAlgorithm::EcdsaP256), o) if *o == OID_SIG_ECDSA_WITH_SHA256 => {
                &signature::ECDSA_P256_SHA256_ASN1
            }
            (CsrKeyKind::Ec(KeyAlgorithm::EcdsaP384), o) if *o == OID_SIG_ECDSA_WITH_SHA384 => {
                &signature::ECDSA_P384_SHA384_ASN1
            }
            (CsrKeyKind::Rsa { .. }, o) if *o == OID_PKCS1_SHA256WITHRSA => {
                &signature::RSA_PKCS1_2048_8192_SHA256
            }
            (CsrKeyKind::Rsa { .. }, o) if *o == OID_PKCS1_SHA384WITHRSA => {
                &signature::RSA_PKCS1_2048_8192_SHA384
            }
            (CsrKeyKind::Rsa { .. }, o) if *o == OID_PKCS1_SHA512WITHRSA => {
                &signature::RSA_PKCS1_2048_8192_SHA512
            }
            (CsrKeyKind::Ed25519, o) if *o == OID_SIG_ED25519 => &signature::ED25519,
            (_, o) => return Err(CsrError::UnsupportedSignature(oid_name(o))),
        };

        let public_key = spki.subject_public_key.data.to_vec();
        signature::UnparsedPublicKey::new(verify_alg, &public_key)
            .verify(info.raw, &csr.signature_value.data)
            .map_err(|_| CsrError::BadSignature)?;

        Ok(Self {
            der: der.to_vec(),
            spki: spki.raw.to_vec(),
            public_key,
            kind,
            verify_alg,
            rcgen_alg,
        })
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }
    /// The DER SubjectPublicKeyInfo of the requested key.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }
    /// The public key bits (EC point, RSAPublicKey DER or Ed25519 key).
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }
    pub fn kind(&self) -> CsrKeyKind {
        self.kind
    }

    /// Checks a signature by this CSR's key (the enrollment proof of possession).
    pub fn verify_proof(&self, message: &[u8], sig: &[u8]) -> Result<(), CsrError> {
        signature::UnparsedPublicKey::new(self.verify_alg, &self.public_key)
            .verify(message, sig)
            .map_err(|_| CsrError::BadProof)
    }

    /// The key as rcgen needs it to issue a certificate for it.
    pub(crate) fn rcgen_public_key(&self) -> CsrPublicKey<'_> {
        CsrPublicKey {
            bits: &self.public_key,
            alg: self.rcgen_alg,
        }
    }
}

pub(crate) struct CsrPublicKey<'a> {
    bits: &'a [u8],
    alg: &'static rcgen::SignatureAlgorithm,
}

impl rcgen::PublicKeyData for CsrPublicKey<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.bits
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.alg
    }
}

fn oid_name(oid: &Oid<'_>) -> String {
    let registry = OidRegistry::default().with_all_crypto().with_x962();
    match registry.get(oid) {
        Some(entry) => format!("{} ({oid})", entry.sn()),
        None => oid.to_id_string(),
    }
}

/// Builds a CSR for `signer` (client side). The subject is informative only: the gateway sets
/// the certificate's identity from what it verified.
pub fn build_csr(signer: &dyn Signer, common_name: &str) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let csr = params.serialize_request(&RcgenKey(signer))?;
    Ok(csr.der().to_vec())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::SoftwareKey;
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };

    pub fn csr_with(params: &CertificateParams, key: &KeyPair) -> Vec<u8> {
        params.serialize_request(key).unwrap().der().to_vec()
    }

    fn cn_params(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p
    }

    #[test]
    fn accepts_supported_keys() {
        for alg in [
            &rcgen::PKCS_ECDSA_P256_SHA256,
            &rcgen::PKCS_ECDSA_P384_SHA384,
            &rcgen::PKCS_ED25519,
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let csr = ValidatedCsr::parse(&csr_with(&cn_params("x"), &key)).unwrap();
            assert_eq!(
                csr.spki(),
                rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
            );
        }
        let sw = SoftwareKey::generate(KeyAlgorithm::EcdsaP384).unwrap();
        let csr = ValidatedCsr::parse(&build_csr(&sw, "alice").unwrap()).unwrap();
        assert_eq!(csr.kind(), CsrKeyKind::Ec(KeyAlgorithm::EcdsaP384));
        assert_eq!(csr.public_key(), sw.public_key());
    }

    #[test]
    fn rsa_size_limits() {
        // 1024-bit RSA CSR made by openssl (see ca/fixtures/README.md).
        let small = include_bytes!("../fixtures/rsa1024.csr.der");
        assert_eq!(
            ValidatedCsr::parse(small).unwrap_err(),
            CsrError::RsaTooSmall(1024)
        );
        let ok = include_bytes!("../fixtures/rsa2048.csr.der");
        assert_eq!(
            ValidatedCsr::parse(ok).unwrap().kind(),
            CsrKeyKind::Rsa { bits: 2048 }
        );
    }

    #[test]
    fn unsupported_curves_are_refused() {
        let p521 = include_bytes!("../fixtures/p521.csr.der");
        assert_eq!(
            ValidatedCsr::parse(p521).unwrap_err().to_string(),
            "elliptic curve secp521r1 (1.3.132.0.35) is not supported: use P-256 or P-384"
        );
        let k1 = include_bytes!("../fixtures/secp256k1.csr.der");
        assert!(matches!(
            ValidatedCsr::parse(k1).unwrap_err(),
            CsrError::UnsupportedCurve(_)
        ));
    }

    #[test]
    fn bad_signature_is_refused() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr_with(&cn_params("alice"), &key);
        // Flip a bit inside the subject (covered by the signature).
        let pos = der.windows(5).position(|w| w == b"alice").unwrap();
        der[pos] ^= 0x01;
        assert_eq!(
            ValidatedCsr::parse(&der).unwrap_err(),
            CsrError::BadSignature
        );
        // A CSR signed by another key than the one it carries.
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let good = csr_with(&cn_params("alice"), &key);
        let forged = csr_with(&cn_params("alice"), &other);
        let spliced = splice_spki(&good, &forged);
        assert_eq!(
            ValidatedCsr::parse(&spliced).unwrap_err(),
            CsrError::BadSignature
        );
    }

    /// Replaces the SPKI in `target` with the one from `source` (same length for P-256).
    fn splice_spki(source: &[u8], target: &[u8]) -> Vec<u8> {
        let (_, s) = X509CertificationRequest::from_der(source).unwrap();
        let (_, t) = X509CertificationRequest::from_der(target).unwrap();
        let s_spki = s.certification_request_info.subject_pki.raw;
        let t_spki = t.certification_request_info.subject_pki.raw;
        assert_eq!(s_spki.len(), t_spki.len());
        let pos = target
            .windows(t_spki.len())
            .position(|w| w == t_spki)
            .unwrap();
        let mut out = target.to_vec();
        out[pos..pos + s_spki.len()].copy_from_slice(s_spki);
        out
    }

    #[test]
    fn wrong_algorithm_for_key_is_refused() {
        // P-256 key signing with SHA-384 (a mismatched pair), made by openssl.
        let mismatched = include_bytes!("../fixtures/p256-sha384.csr.der");
        assert_eq!(
            ValidatedCsr::parse(mismatched).unwrap_err(),
            CsrError::UnsupportedSignature("ecdsa-with-SHA384 (1.2.840.10045.4.3.3)".into())
        );
    }

    #[test]
    fn garbage_and_trailing_data() {
        assert_eq!(
            ValidatedCsr::parse(b"hello").unwrap_err(),
            CsrError::Malformed
        );
        assert_eq!(ValidatedCsr::parse(&[]).unwrap_err(), CsrError::Malformed);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut der = csr_with(&cn_params("a"), &key);
        der.push(0);
        assert_eq!(
            ValidatedCsr::parse(&der).unwrap_err(),
            CsrError::TrailingData
        );
        assert_eq!(
            ValidatedCsr::parse(&vec![0x30; MAX_CSR_LEN + 1]).unwrap_err(),
            CsrError::TooLarge
        );
        // Every truncation is an error, never a panic.
        let good = csr_with(&cn_params("a"), &key);
        for n in 0..good.len() {
            assert!(ValidatedCsr::parse(&good[..n]).is_err());
        }
    }

    #[test]
    fn extensions_requested_by_the_client_do_not_stop_validation() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = cn_params("mallory");
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::CodeSigning,
        ];
        p.subject_alt_names = vec![rcgen::SanType::DnsName("*.example.com".try_into().unwrap())];
        assert!(ValidatedCsr::parse(&csr_with(&p, &key)).is_ok());
    }

    #[test]
    fn proof_of_possession() {
        let k = SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = ValidatedCsr::parse(&build_csr(&k, "a").unwrap()).unwrap();
        let sig = k.sign(b"challenge").unwrap();
        csr.verify_proof(b"challenge", &sig).unwrap();
        assert_eq!(
            csr.verify_proof(b"challengf", &sig).unwrap_err(),
            CsrError::BadProof
        );
    }
}
