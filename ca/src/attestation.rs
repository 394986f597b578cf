//! YubiKey PIV attestation, verified without IO.
//!
//! A YubiKey proves that a key was generated inside one of its PIV slots with an *attestation
//! certificate*: an X.509 certificate for the slot's public key, issued by the device's *f9* key
//! (slot `f9`, loaded at the factory), whose certificate chains to a Yubico root. Its extensions
//! state the firmware, the device serial and the key's PIN and touch policies. [`verify`] checks
//! all of that for the gateway before it certifies a key as hardware-bound.
//!
//! ```no_run
//! use zerospice_ca::attestation::{self, AttestationRoots, PinPolicy, TouchPolicy};
//! # fn demo(att: &[u8], f9: Vec<u8>, csr: &zerospice_ca::ValidatedCsr) -> Result<(), attestation::AttestationError> {
//! let roots = AttestationRoots::yubico(); // plus `add_pem` for test or private roots
//! let verified = attestation::verify(att, &[f9], csr.spki(), &roots, time::OffsetDateTime::now_utc())?;
//! if !verified.pin_policy.at_least(PinPolicy::Once) || !verified.touch_policy.at_least(TouchPolicy::Never) {
//!     // refuse by policy
//! }
//! println!("YubiKey {} (firmware {:?}), slot {:?}", verified.serial, verified.firmware, verified.slot);
//! # Ok(()) }
//! ```
//!
//! # What is checked (fail closed, each failure its own [`AttestationError`])
//! 1. The attestation certificate is DER X.509 with nothing trailing, and its
//!    SubjectPublicKeyInfo is byte for byte the key of the CSR.
//! 2. Its issuer name is the f9 certificate's subject (`chain[0]`) and its signature verifies with
//!    the f9 public key.
//! 3. From the f9 upwards, each certificate is issued (names link, signature verifies) by a
//!    certificate the client sent, a built-in Yubico intermediate, or a trust anchor in
//!    [`AttestationRoots`]; the walk ends at a trust anchor within [`MAX_ISSUERS`] certificates.
//!    Signatures are verified with ring: RSA PKCS#1 v1.5 with SHA-256/384/512 and a 2048 to 8192
//!    bit key (`RSA_PKCS1_2048_8192_*`: every Yubico attestation key is RSA-2048; ring's 1024-bit
//!    legacy verifiers are deliberately not used), ECDSA P-256/P-384 with SHA-256/384.
//! 4. Every certificate (attestation, f9, intermediates, anchor) is valid at `now`.
//! 5. Chain shape, *not* a strict RFC 5280 profile, because real chains fail one (no AKI/SKI,
//!    f9 certificates without basicConstraints or keyUsage):
//!    - the attestation certificate is not a CA (no basicConstraints CA:TRUE);
//!    - every issuer above the f9 (intermediates and the anchor) has basicConstraints CA:TRUE; any
//!      issuer with a keyUsage extension allows keyCertSign; the f9 may lack basicConstraints
//!      (Yubico's 4.3.x f9 certificates do, sample 5), but if it has one it must say CA:TRUE;
//!    - path length constraints are enforced wherever present (the 2018 PIV root has pathlen 1,
//!      real f9s pathlen 0);
//!    - **no issuer is a slot attestation certificate**: a certificate whose common name is
//!      `YubiKey PIV Attestation <slot>` or that carries the serial (`.3.7`) or policy (`.3.8`)
//!      extension was made by a YubiKey for one of *its* slot keys, and that key is a user key
//!      that signs anything the user's software asks for. Without this rule a YubiKey owner could
//!      make their slot key pose as an f9 and "attest" a software key with any serial and policy.
//!      The path length constraints of the f9 (0) and of the roots (1) stop the same forgery a
//!      second time;
//!    - no certificate has an unknown critical extension (only basicConstraints and keyUsage
//!      may be critical) or the same extension twice; the outer and inner signature algorithms
//!      agree.
//! 6. The Yubico extensions of the attestation certificate, whose values are the raw contents of
//!    the extension's OCTET STRING: `1.3.6.1.4.1.41482.3.3` firmware (3 bytes, required),
//!    `.3.7` serial (a DER INTEGER, required: the gateway names devices by serial, so an
//!    attestation without one, from early YubiKey 4 firmware, is refused), `.3.8` PIN and touch
//!    policy (2 bytes, required), `.3.9` form factor (1 byte, optional).
//!
//! 7. The attested key is not an RSA key made by firmware 4.2.6 to 4.3.4 ([`roca_affected`]):
//!    those keys can be factored from the public key (ROCA, CVE-2017-15361), whatever the chain
//!    says. ECDSA keys of that firmware are fine.
//!
//! A policy byte of 0 ("default") is never written by a YubiKey, which records the effective
//! policy of the key (1 to 3); should one appear, it proves nothing, so it counts as the weakest
//! value ([`PinPolicy::Never`], [`TouchPolicy::Never`]) and an "at least" policy check stays
//! fail-closed. Other values are refused.
//!
//! Path building is greedy (trust anchors first, then the first issuer whose signature verifies),
//! so the work is bounded by [`MAX_ISSUERS`] times the number of candidates.
//!
//! # Built-in trust
//! [`AttestationRoots::yubico`] trusts "Yubico PIV Root CA Serial 263751" (the 2018 issue,
//! pathlen 1) and "Yubico Attestation Root 1" (firmware 5.7.4 and later), and knows the Root 1
//! intermediates that 5.7.4+ devices do not carry, so a client only needs to send its f9
//! certificate. The U2F root that some early YubiKey 4 f9s chain to is not trusted (see
//! `ca/roots/README.md`).
use std::fmt;
use std::str::FromStr;

use ring::signature::{self, VerificationAlgorithm};
use time::OffsetDateTime;
use x509_parser::der_parser::oid::Oid;
use x509_parser::oid_registry::*;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Certificates above the attestation certificate, f9 and trust anchor included (the longest real
/// chain, firmware 5.7.4: f9, PIV Attestation B 1, Attestation Intermediate B 1, Root 1).
pub const MAX_ISSUERS: usize = 5;
/// Most certificates a client may send beside the attestation (f9 first).
pub const MAX_CHAIN_INPUT: usize = 8;
/// Largest certificate accepted (real ones are about 1 KiB).
pub const MAX_CERT_LEN: usize = 16 * 1024;

const YUBICO_FIRMWARE: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 3];
const YUBICO_SERIAL: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 7];
const YUBICO_POLICY: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 8];
const YUBICO_FORM_FACTOR: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 9];
const SLOT_CN_PREFIX: &str = "YubiKey PIV Attestation ";

const YUBICO_PIV_ROOT: &str = include_str!("../roots/yubico-piv-root-263751.pem");
const YUBICO_ATTESTATION_ROOT_1: &str = include_str!("../roots/yubico-attestation-root-1.pem");
const YUBICO_INTERMEDIATES: &str = include_str!("../roots/yubico-attestation-intermediates.pem");

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AttestationError {
    #[error("no trusted attestation roots are configured")]
    NoRoots,
    #[error("malformed attestation root PEM: {0}")]
    RootPem(String),
    #[error("attestation root or intermediate {0} is not a valid DER X.509 certificate")]
    BadRoot(usize),
    #[error("the attestation certificate is not a valid DER X.509 certificate")]
    Malformed,
    #[error("the attestation certificate has trailing data")]
    TrailingData,
    #[error("no f9 certificate was sent with the attestation")]
    MissingF9,
    #[error("too many certificates were sent with the attestation (at most {MAX_CHAIN_INPUT})")]
    TooManyCertificates,
    #[error("certificate {0} sent with the attestation (0 is the f9) is not a valid DER X.509 certificate without trailing data")]
    MalformedChain(usize),
    #[error("the attestation certificate's key is not the key in the CSR")]
    KeyMismatch,
    #[error("the attestation certificate was not issued by the f9 certificate (issuer and subject names differ)")]
    IssuerMismatch,
    #[error("the attestation is not signed by the f9 certificate")]
    BadSignature,
    #[error("the attestation certificate uses signature algorithm {0}, which is not supported (RSA PKCS#1 with SHA-256/384/512 and 2048 to 8192 bit keys, or ECDSA P-256/P-384)")]
    UnsupportedSignature(String),
    #[error("the f9 certificate does not chain to a trusted attestation root")]
    Untrusted,
    #[error(
        "the attestation chain is longer than {MAX_ISSUERS} certificates above the attestation"
    )]
    ChainTooLong,
    #[error("{0} is a slot attestation certificate and cannot issue attestations")]
    SlotCertificateAsIssuer(String),
    #[error("{0} is not a CA certificate and cannot issue certificates in the attestation chain")]
    NotCa(String),
    #[error("{0} has a path length constraint that the attestation chain exceeds")]
    PathLenExceeded(String),
    #[error("{cert} has an unknown critical extension {oid}")]
    UnknownCriticalExtension { cert: String, oid: String },
    #[error("{0} has the same extension twice")]
    DuplicateExtension(String),
    #[error("{0} has different inner and outer signature algorithms")]
    AlgorithmMismatch(String),
    #[error("the attestation certificate claims to be a CA")]
    AttestationIsCa,
    #[error("the attestation has expired")]
    Expired,
    #[error("the attestation is not yet valid")]
    NotYetValid,
    #[error("{0} in the attestation chain has expired or is not yet valid")]
    ChainCertificateNotValid(String),
    #[error("the attestation carries no device serial")]
    NoSerial,
    #[error("the attestation carries no firmware version")]
    NoFirmware,
    #[error("the attestation carries no PIN and touch policy")]
    NoPolicy,
    #[error("the attestation's {0} extension is malformed")]
    MalformedExtension(&'static str),
    #[error("the attested key is an RSA key generated by YubiKey firmware {0}, whose RSA keys can be factored (ROCA, CVE-2017-15361, Yubico YSA-2017-01: firmware 4.2.6 to 4.3.4): generate an ECDSA key (P-256 or P-384) instead")]
    RocaVulnerable(String),
}

/// Whether YubiKey firmware makes RSA keys weak to ROCA (CVE-2017-15361, Yubico YSA-2017-01):
/// 4.2.6 to 4.3.4 inclusive. Their ECDSA keys are not affected.
pub fn roca_affected(firmware: (u8, u8, u8)) -> bool {
    ((4, 2, 6)..=(4, 3, 4)).contains(&firmware)
}

/// The PIN policy of an attested key (extension `.3.8`, first byte). Ordered by strength:
/// `Never < Once < Always`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PinPolicy {
    /// No PIN is needed to use the key.
    Never,
    /// The PIN is needed once per card session.
    Once,
    /// The PIN is needed right before every use.
    Always,
}

/// The touch policy of an attested key (extension `.3.8`, second byte). Ordered by strength:
/// `Never < Cached < Always`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TouchPolicy {
    /// No touch is needed.
    Never,
    /// A touch is needed, and is remembered for 15 seconds.
    Cached,
    /// A touch is needed for every use.
    Always,
}

/// A policy name that is not one of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} policy '{value}': use {expected}")]
pub struct ParsePolicyError {
    kind: &'static str,
    value: String,
    expected: &'static str,
}

impl PinPolicy {
    pub const ALL: [PinPolicy; 3] = [PinPolicy::Never, PinPolicy::Once, PinPolicy::Always];

    pub fn as_str(&self) -> &'static str {
        match self {
            PinPolicy::Never => "never",
            PinPolicy::Once => "once",
            PinPolicy::Always => "always",
        }
    }
    /// 0 (weakest) to 2 (strongest), for "at least" comparisons.
    pub fn rank(&self) -> u8 {
        match self {
            PinPolicy::Never => 0,
            PinPolicy::Once => 1,
            PinPolicy::Always => 2,
        }
    }
    /// Whether this policy is as strict as `minimum` or stricter.
    pub fn at_least(&self, minimum: PinPolicy) -> bool {
        self.rank() >= minimum.rank()
    }
    /// The byte YubiKeys use (attestation `.3.8`, key generation tag `AA`): 1, 2 or 3.
    pub fn to_byte(self) -> u8 {
        match self {
            PinPolicy::Never => 1,
            PinPolicy::Once => 2,
            PinPolicy::Always => 3,
        }
    }
    /// Reads the attestation byte; 0 ("default", proves nothing) is the weakest policy.
    pub fn from_attestation_byte(b: u8) -> Option<Self> {
        match b {
            0 | 1 => Some(PinPolicy::Never),
            2 => Some(PinPolicy::Once),
            3 => Some(PinPolicy::Always),
            _ => None,
        }
    }
}

impl TouchPolicy {
    pub const ALL: [TouchPolicy; 3] =
        [TouchPolicy::Never, TouchPolicy::Cached, TouchPolicy::Always];

    pub fn as_str(&self) -> &'static str {
        match self {
            TouchPolicy::Never => "never",
            TouchPolicy::Always => "always",
            TouchPolicy::Cached => "cached",
        }
    }
    /// 0 (weakest) to 2 (strongest), for "at least" comparisons.
    pub fn rank(&self) -> u8 {
        match self {
            TouchPolicy::Never => 0,
            TouchPolicy::Cached => 1,
            TouchPolicy::Always => 2,
        }
    }
    /// Whether this policy is as strict as `minimum` or stricter.
    pub fn at_least(&self, minimum: TouchPolicy) -> bool {
        self.rank() >= minimum.rank()
    }
    /// The byte YubiKeys use (attestation `.3.8`, key generation tag `AB`): 1, 2 or 3.
    pub fn to_byte(self) -> u8 {
        match self {
            TouchPolicy::Never => 1,
            TouchPolicy::Always => 2,
            TouchPolicy::Cached => 3,
        }
    }
    /// Reads the attestation byte; 0 ("default", proves nothing) is the weakest policy.
    pub fn from_attestation_byte(b: u8) -> Option<Self> {
        match b {
            0 | 1 => Some(TouchPolicy::Never),
            2 => Some(TouchPolicy::Always),
            3 => Some(TouchPolicy::Cached),
            _ => None,
        }
    }
}

impl FromStr for PinPolicy {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PinPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParsePolicyError {
                kind: "PIN",
                value: s.to_owned(),
                expected: "never, once or always",
            })
    }
}

impl FromStr for TouchPolicy {
    type Err = ParsePolicyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TouchPolicy::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParsePolicyError {
                kind: "touch",
                value: s.to_owned(),
                expected: "never, cached or always",
            })
    }
}

impl fmt::Display for PinPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for TouchPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The trust anchors (and known intermediates) attestation chains must end at.
#[derive(Clone, Default)]
pub struct AttestationRoots {
    roots: Vec<Vec<u8>>,
    intermediates: Vec<Vec<u8>>,
}

impl fmt::Debug for AttestationRoots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = |certs: &[Vec<u8>]| -> Vec<String> {
            certs
                .iter()
                .map(|der| match X509Certificate::from_der(der) {
                    Ok((_, c)) => c.subject().to_string(),
                    Err(_) => "?".into(),
                })
                .collect()
        };
        f.debug_struct("AttestationRoots")
            .field("roots", &names(&self.roots))
            .field("intermediates", &names(&self.intermediates))
            .finish()
    }
}

impl AttestationRoots {
    /// Yubico's PIV attestation roots (built in from `ca/roots/`): PIV Root CA Serial 263751
    /// (2018 issue) and Attestation Root 1, with Root 1's intermediates for firmware 5.7.4+.
    pub fn yubico() -> Self {
        let mut roots = Self::empty();
        for (pem, anchor) in [
            (YUBICO_PIV_ROOT, true),
            (YUBICO_ATTESTATION_ROOT_1, true),
            (YUBICO_INTERMEDIATES, false),
        ] {
            let added = if anchor {
                roots.add_pem(pem)
            } else {
                roots.add_intermediate_pem(pem)
            };
            // Built-in constants, checked by the unit tests: cannot fail at run time.
            if let Err(e) = added {
                tracing::error!(error = %e, "built-in Yubico attestation certificate is broken");
            }
        }
        roots
    }

    /// No trust at all: [`verify`] refuses everything until roots are added.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Adds every certificate of a PEM text as a trust anchor; returns how many were added.
    pub fn add_pem(&mut self, pem: &str) -> Result<usize, AttestationError> {
        let certs = parse_pem_certs(pem)?;
        let n = certs.len();
        self.roots.extend(certs);
        Ok(n)
    }

    /// Adds every certificate of a PEM text as a known intermediate: used to build paths, never
    /// trusted by itself (it must chain to a trust anchor).
    pub fn add_intermediate_pem(&mut self, pem: &str) -> Result<usize, AttestationError> {
        let certs = parse_pem_certs(pem)?;
        let n = certs.len();
        self.intermediates.extend(certs);
        Ok(n)
    }

    /// The number of trust anchors.
    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// The number of known intermediates.
    pub fn intermediates_len(&self) -> usize {
        self.intermediates.len()
    }
}

fn parse_pem_certs(pem: &str) -> Result<Vec<Vec<u8>>, AttestationError> {
    let certs =
        crate::pem::certificates(pem).map_err(|e| AttestationError::RootPem(e.to_string()))?;
    for (i, der) in certs.iter().enumerate() {
        match X509Certificate::from_der(der) {
            Ok((&[], _)) => {}
            _ => return Err(AttestationError::BadRoot(i)),
        }
    }
    Ok(certs)
}

/// What a verified attestation says about the key and the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attestation {
    /// The YubiKey's serial number (`.3.7`).
    pub serial: u32,
    /// Firmware of the device when the key was generated (`.3.3`).
    pub firmware: (u8, u8, u8),
    pub pin_policy: PinPolicy,
    pub touch_policy: TouchPolicy,
    /// Form factor byte (`.3.9`: 1 USB-A keychain, 2 USB-A nano, 3 USB-C keychain, 4 USB-C nano,
    /// 5 USB-C+Lightning; bit 0x80 marks FIPS, 0x40 CSPN), absent on older firmware.
    pub form_factor: Option<u8>,
    /// The slot in lower-case hex (`9a`), from the subject `CN=YubiKey PIV Attestation 9a`.
    pub slot: Option<String>,
    /// The subject of the trust anchor the chain ended at.
    pub root_subject: String,
}

impl Attestation {
    /// The firmware as `5.4.3`.
    pub fn firmware_string(&self) -> String {
        let (a, b, c) = self.firmware;
        format!("{a}.{b}.{c}")
    }
}

/// Verifies a YubiKey PIV attestation for the key `expected_spki_der` (the CSR's
/// SubjectPublicKeyInfo). `chain` is the f9 certificate first, then any further intermediates
/// the client sent. See the module documentation for every rule.
pub fn verify(
    attestation_der: &[u8],
    chain: &[Vec<u8>],
    expected_spki_der: &[u8],
    roots: &AttestationRoots,
    now: OffsetDateTime,
) -> Result<Attestation, AttestationError> {
    if roots.roots.is_empty() {
        return Err(AttestationError::NoRoots);
    }
    if chain.is_empty() {
        return Err(AttestationError::MissingF9);
    }
    if chain.len() > MAX_CHAIN_INPUT {
        return Err(AttestationError::TooManyCertificates);
    }
    if attestation_der.len() > MAX_CERT_LEN {
        return Err(AttestationError::Malformed);
    }
    let (rest, att) =
        X509Certificate::from_der(attestation_der).map_err(|_| AttestationError::Malformed)?;
    if !rest.is_empty() {
        return Err(AttestationError::TrailingData);
    }
    let sent = chain
        .iter()
        .enumerate()
        .map(|(i, der)| parse_exact(der).ok_or(AttestationError::MalformedChain(i)))
        .collect::<Result<Vec<_>, _>>()?;

    // 1. the key
    if att.public_key().raw != expected_spki_der {
        return Err(AttestationError::KeyMismatch);
    }

    // 2. the attestation certificate itself, and its f9 signature
    let att_name = "the attestation certificate".to_owned();
    check_extensions_sane(&att, &att_name)?;
    if att.is_ca() {
        return Err(AttestationError::AttestationIsCa);
    }
    let f9 = &sent[0];
    if att.issuer().as_raw() != f9.subject().as_raw() {
        return Err(AttestationError::IssuerMismatch);
    }
    match verify_signed_by(&att, f9) {
        Ok(()) => {}
        Err(SigError::Invalid) => return Err(AttestationError::BadSignature),
        Err(SigError::Unsupported(alg)) => return Err(AttestationError::UnsupportedSignature(alg)),
    }

    // 3. from the f9 up to a trust anchor
    let anchors = parse_all(&roots.roots);
    let known = parse_all(&roots.intermediates);
    let mut path: Vec<&X509Certificate<'_>> = vec![f9];
    loop {
        let Some(current) = path.last().copied() else {
            return Err(AttestationError::Untrusted);
        };
        if let Some(anchor) = anchors.iter().find(|a| {
            a.as_raw() != current.as_raw()
                && a.subject().as_raw() == current.issuer().as_raw()
                && verify_signed_by(current, a).is_ok()
        }) {
            path.push(anchor);
            break;
        }
        if path.len() >= MAX_ISSUERS {
            return Err(AttestationError::ChainTooLong);
        }
        let next = sent[1..].iter().chain(known.iter()).find(|c| {
            !path.iter().any(|p| p.as_raw() == c.as_raw())
                && c.subject().as_raw() == current.issuer().as_raw()
                && verify_signed_by(current, c).is_ok()
        });
        match next {
            Some(c) => path.push(c),
            None => return Err(AttestationError::Untrusted),
        }
    }
    if path.len() > MAX_ISSUERS {
        return Err(AttestationError::ChainTooLong);
    }

    // 5. the shape of the path: issuers are CAs (the f9 may lack basicConstraints), never slot
    //    certificates, and path length constraints hold.
    for (i, cert) in path.iter().enumerate() {
        let name = describe(cert);
        check_extensions_sane(cert, &name)?;
        if is_slot_attestation(cert) {
            return Err(AttestationError::SlotCertificateAsIssuer(name));
        }
        let bc = cert
            .basic_constraints()
            .map_err(|_| AttestationError::NotCa(name.clone()))?;
        match bc {
            Some(bc) if !bc.value.ca => return Err(AttestationError::NotCa(name)),
            None if i > 0 => return Err(AttestationError::NotCa(name)),
            Some(bc) => {
                // `i` intermediates lie between this certificate and the attestation (the f9
                // included, for every issuer above it).
                if let Some(max) = bc.value.path_len_constraint {
                    if i as u64 > u64::from(max) {
                        return Err(AttestationError::PathLenExceeded(name));
                    }
                }
            }
            None => {}
        }
        if let Some(ku) = cert
            .key_usage()
            .map_err(|_| AttestationError::NotCa(name.clone()))?
        {
            if !ku.value.key_cert_sign() {
                return Err(AttestationError::NotCa(name));
            }
        }
    }

    // 4. validity at `now`
    let valid_at = |c: &X509Certificate<'_>| {
        let v = c.validity();
        (
            v.not_before.to_datetime() <= now,
            now <= v.not_after.to_datetime(),
        )
    };
    match valid_at(&att) {
        (false, _) => return Err(AttestationError::NotYetValid),
        (_, false) => return Err(AttestationError::Expired),
        _ => {}
    }
    for cert in &path {
        if valid_at(cert) != (true, true) {
            return Err(AttestationError::ChainCertificateNotValid(describe(cert)));
        }
    }

    // 6. what the attestation says
    let claims = YubicoExtensions::parse(&att)?;
    let serial = claims.serial.ok_or(AttestationError::NoSerial)?;
    let firmware = claims.firmware.ok_or(AttestationError::NoFirmware)?;
    // 7. the key itself: an RSA key from ROCA firmware is attested genuine but factorable.
    if att.public_key().algorithm.algorithm == OID_PKCS1_RSAENCRYPTION && roca_affected(firmware) {
        let (a, b, c) = firmware;
        return Err(AttestationError::RocaVulnerable(format!("{a}.{b}.{c}")));
    }
    let (pin_policy, touch_policy) = claims.policy.ok_or(AttestationError::NoPolicy)?;
    let root_subject = path
        .last()
        .map(|r| r.subject().to_string())
        .unwrap_or_default();
    Ok(Attestation {
        serial,
        firmware,
        pin_policy,
        touch_policy,
        form_factor: claims.form_factor,
        slot: slot_from_subject(&att),
        root_subject,
    })
}

fn parse_exact(der: &[u8]) -> Option<X509Certificate<'_>> {
    if der.len() > MAX_CERT_LEN {
        return None;
    }
    match X509Certificate::from_der(der) {
        Ok((&[], cert)) => Some(cert),
        _ => None,
    }
}

fn parse_all(certs: &[Vec<u8>]) -> Vec<X509Certificate<'_>> {
    certs.iter().filter_map(|d| parse_exact(d)).collect()
}

fn describe(cert: &X509Certificate<'_>) -> String {
    format!("the certificate '{}'", cert.subject())
}

fn oid(arcs: &[u64]) -> Oid<'static> {
    // The arcs are constants of this module; `from` fails only on an empty or invalid list.
    Oid::from(arcs).unwrap_or_else(|_| Oid::from(&[0u64][..]).unwrap_or(OID_EC_P256))
}

/// Refuses duplicate extensions and critical extensions this verifier does not understand.
fn check_extensions_sane(cert: &X509Certificate<'_>, name: &str) -> Result<(), AttestationError> {
    let exts = cert.extensions();
    for (i, e) in exts.iter().enumerate() {
        if exts[..i].iter().any(|o| o.oid == e.oid) {
            return Err(AttestationError::DuplicateExtension(name.to_owned()));
        }
        if e.critical && e.oid != OID_X509_EXT_BASIC_CONSTRAINTS && e.oid != OID_X509_EXT_KEY_USAGE
        {
            return Err(AttestationError::UnknownCriticalExtension {
                cert: name.to_owned(),
                oid: e.oid.to_id_string(),
            });
        }
    }
    if cert.signature_algorithm.algorithm != cert.tbs_certificate.signature.algorithm {
        return Err(AttestationError::AlgorithmMismatch(name.to_owned()));
    }
    Ok(())
}

/// A certificate a YubiKey made for one of its slot keys (never a legitimate issuer).
fn is_slot_attestation(cert: &X509Certificate<'_>) -> bool {
    slot_from_subject(cert).is_some()
        || cert
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .any(|cn| cn.starts_with(SLOT_CN_PREFIX))
        || cert
            .extensions()
            .iter()
            .any(|e| e.oid == oid(YUBICO_SERIAL) || e.oid == oid(YUBICO_POLICY))
}

/// `9a` from `CN=YubiKey PIV Attestation 9a`.
fn slot_from_subject(cert: &X509Certificate<'_>) -> Option<String> {
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let slot = cn.strip_prefix(SLOT_CN_PREFIX)?;
    (slot.len() == 2 && slot.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| slot.to_ascii_lowercase())
}

#[derive(Debug)]
enum SigError {
    Invalid,
    Unsupported(String),
}

/// Verifies `child`'s signature with `issuer`'s public key.
fn verify_signed_by(
    child: &X509Certificate<'_>,
    issuer: &X509Certificate<'_>,
) -> Result<(), SigError> {
    let spki = issuer.public_key();
    let sig_oid = &child.signature_algorithm.algorithm;
    let key_oid = &spki.algorithm.algorithm;
    // A signature algorithm we verify, but one the issuer's key type cannot have made (an ECDSA
    // signature "from" an RSA f9), is a bad signature, not an unsupported one.
    let known = [
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
        OID_PKCS1_SHA512WITHRSA,
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
    ]
    .contains(sig_oid);
    let unsupported = || {
        if known {
            SigError::Invalid
        } else {
            SigError::Unsupported(oid_name(sig_oid))
        }
    };
    let alg: &'static dyn VerificationAlgorithm = if *key_oid == OID_PKCS1_RSAENCRYPTION {
        if *sig_oid == OID_PKCS1_SHA256WITHRSA {
            &signature::RSA_PKCS1_2048_8192_SHA256
        } else if *sig_oid == OID_PKCS1_SHA384WITHRSA {
            &signature::RSA_PKCS1_2048_8192_SHA384
        } else if *sig_oid == OID_PKCS1_SHA512WITHRSA {
            &signature::RSA_PKCS1_2048_8192_SHA512
        } else {
            return Err(unsupported());
        }
    } else if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or_else(unsupported)?;
        let p256 = curve == OID_EC_P256;
        let p384 = curve == OID_NIST_EC_P384;
        let sha256 = *sig_oid == OID_SIG_ECDSA_WITH_SHA256;
        let sha384 = *sig_oid == OID_SIG_ECDSA_WITH_SHA384;
        match (p256, p384, sha256, sha384) {
            (true, _, true, _) => &signature::ECDSA_P256_SHA256_ASN1,
            (true, _, _, true) => &signature::ECDSA_P256_SHA384_ASN1,
            (_, true, true, _) => &signature::ECDSA_P384_SHA256_ASN1,
            (_, true, _, true) => &signature::ECDSA_P384_SHA384_ASN1,
            _ => return Err(unsupported()),
        }
    } else {
        return Err(unsupported());
    };
    signature::UnparsedPublicKey::new(alg, &spki.subject_public_key.data)
        .verify(child.tbs_certificate.as_ref(), &child.signature_value.data)
        .map_err(|_| SigError::Invalid)
}

fn oid_name(oid: &Oid<'_>) -> String {
    let registry = OidRegistry::default().with_all_crypto().with_x962();
    match registry.get(oid) {
        Some(entry) => format!("{} ({oid})", entry.sn()),
        None => oid.to_id_string(),
    }
}

/// The Yubico extensions of a slot attestation certificate, parsed but not trusted.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct YubicoExtensions {
    pub serial: Option<u32>,
    pub firmware: Option<(u8, u8, u8)>,
    pub policy: Option<(PinPolicy, TouchPolicy)>,
    pub form_factor: Option<u8>,
}

impl YubicoExtensions {
    pub(crate) fn parse(cert: &X509Certificate<'_>) -> Result<Self, AttestationError> {
        let value = |arcs: &[u64], what: &'static str| {
            cert.get_extension_unique(&oid(arcs))
                .map(|e| e.map(|e| e.value))
                .map_err(|_| AttestationError::MalformedExtension(what))
        };
        let firmware = match value(YUBICO_FIRMWARE, "firmware (1.3.6.1.4.1.41482.3.3)")? {
            None => None,
            Some(&[a, b, c]) => Some((a, b, c)),
            Some(_) => {
                return Err(AttestationError::MalformedExtension(
                    "firmware (1.3.6.1.4.1.41482.3.3)",
                ))
            }
        };
        let serial = match value(YUBICO_SERIAL, "serial (1.3.6.1.4.1.41482.3.7)")? {
            None => None,
            Some(v) => Some(parse_der_u32(v).ok_or(AttestationError::MalformedExtension(
                "serial (1.3.6.1.4.1.41482.3.7)",
            ))?),
        };
        let policy = match value(YUBICO_POLICY, "policy (1.3.6.1.4.1.41482.3.8)")? {
            None => None,
            Some(&[pin, touch]) => Some(
                PinPolicy::from_attestation_byte(pin)
                    .zip(TouchPolicy::from_attestation_byte(touch))
                    .ok_or(AttestationError::MalformedExtension(
                        "policy (1.3.6.1.4.1.41482.3.8)",
                    ))?,
            ),
            Some(_) => {
                return Err(AttestationError::MalformedExtension(
                    "policy (1.3.6.1.4.1.41482.3.8)",
                ))
            }
        };
        let form_factor = match value(YUBICO_FORM_FACTOR, "form factor (1.3.6.1.4.1.41482.3.9)")? {
            None => None,
            Some(&[f]) => Some(f),
            Some(_) => {
                return Err(AttestationError::MalformedExtension(
                    "form factor (1.3.6.1.4.1.41482.3.9)",
                ))
            }
        };
        Ok(Self {
            serial,
            firmware,
            policy,
            form_factor,
        })
    }

    /// Parses the extensions of a DER certificate (used by the key store to learn the policies
    /// of its own keys on firmware without GET METADATA; nothing is verified).
    #[allow(dead_code)]
    pub(crate) fn parse_der(der: &[u8]) -> Result<Self, AttestationError> {
        let cert = parse_exact(der).ok_or(AttestationError::Malformed)?;
        Self::parse(&cert)
    }
}

/// A DER INTEGER (minimal encoding) holding a positive value that fits in 32 bits.
fn parse_der_u32(v: &[u8]) -> Option<u32> {
    let (&tag, rest) = v.split_first()?;
    let (&len, content) = rest.split_first()?;
    if tag != 0x02 || len == 0 || usize::from(len) != content.len() || content.len() > 5 {
        return None;
    }
    let first = content[0];
    if first & 0x80 != 0 {
        return None; // negative
    }
    if content.len() > 1 && first == 0 && content[1] & 0x80 == 0 {
        return None; // not minimal
    }
    let mut n: u64 = 0;
    for &b in content {
        n = (n << 8) | u64::from(b);
    }
    u32::try_from(n).ok().filter(|&n| n != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa,
        Issuer, KeyPair, KeyUsagePurpose,
    };
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-01-01 00:00 UTC);

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!("{}/fixtures/yubico/{name}", env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(&path).unwrap();
        crate::pem::first_certificate(&text).unwrap()
    }

    fn fixture_pem(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/fixtures/yubico/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn spki_of(der: &[u8]) -> Vec<u8> {
        X509Certificate::from_der(der)
            .unwrap()
            .1
            .public_key()
            .raw
            .to_vec()
    }

    struct Sample {
        slot: Vec<u8>,
        f9: Vec<u8>,
    }

    fn sample(n: u8) -> Sample {
        let slot_file = match n {
            1 | 3 | 4 => format!("sample{n}-slot-9c.pem"),
            _ => format!("sample{n}-slot-9a.pem"),
        };
        Sample {
            slot: fixture(&slot_file),
            f9: fixture(&format!("sample{n}-f9.pem")),
        }
    }

    fn verify_sample(n: u8, roots: &AttestationRoots) -> Result<Attestation, AttestationError> {
        let s = sample(n);
        verify(&s.slot, &[s.f9], &spki_of(&s.slot), roots, NOW)
    }

    #[test]
    fn built_in_roots_parse() {
        let roots = AttestationRoots::yubico();
        assert_eq!(roots.len(), 2);
        assert_eq!(roots.intermediates_len(), 5);
        let dbg = format!("{roots:?}");
        assert!(dbg.contains("Yubico PIV Root CA Serial 263751"), "{dbg}");
        assert!(dbg.contains("Yubico Attestation Root 1"), "{dbg}");
        assert!(AttestationRoots::empty().is_empty());
    }

    #[test]
    fn real_samples_1_to_4_verify_against_the_piv_root() {
        let roots = AttestationRoots::yubico();
        // (sample, serial, firmware, PIN, touch, form factor, slot) as in SAMPLES.md
        let expected = [
            (
                1,
                25515003,
                (5, 4, 3),
                PinPolicy::Always,
                TouchPolicy::Never,
                Some(0x83),
                "9c",
            ),
            (
                2,
                15732500,
                (5, 4, 3),
                PinPolicy::Once,
                TouchPolicy::Never,
                Some(0x04),
                "9a",
            ),
            (
                3,
                10550341,
                (4, 4, 5),
                PinPolicy::Always,
                TouchPolicy::Always,
                None,
                "9c",
            ),
            (
                4,
                13078778,
                (5, 2, 6),
                PinPolicy::Always,
                TouchPolicy::Always,
                Some(0x03),
                "9c",
            ),
        ];
        for (n, serial, fw, pin, touch, ff, slot) in expected {
            let a = verify_sample(n, &roots).unwrap_or_else(|e| panic!("sample {n}: {e}"));
            assert_eq!(a.serial, serial, "sample {n}");
            assert_eq!(a.firmware, fw, "sample {n}");
            assert_eq!(a.pin_policy, pin, "sample {n}");
            assert_eq!(a.touch_policy, touch, "sample {n}");
            assert_eq!(a.form_factor, ff, "sample {n}");
            assert_eq!(a.slot.as_deref(), Some(slot), "sample {n}");
            assert_eq!(a.root_subject, "CN=Yubico PIV Root CA Serial 263751");
        }
        // Only the PIV root is needed for them.
        let mut piv_only = AttestationRoots::empty();
        assert_eq!(
            piv_only
                .add_pem(&fixture_pem("yubico-piv-root-263751.pem"))
                .unwrap(),
            1
        );
        for n in 1..=4 {
            verify_sample(n, &piv_only).unwrap();
        }
        assert_eq!(
            verify_sample(2, &AttestationRoots::yubico())
                .unwrap()
                .firmware_string(),
            "5.4.3"
        );
    }

    #[test]
    fn sample_7_firmware_5_7_4_verifies_against_root_1() {
        let roots = AttestationRoots::yubico();
        let a = verify_sample(7, &roots).unwrap();
        assert_eq!(a.serial, 32718477);
        assert_eq!(a.firmware, (5, 7, 4));
        assert_eq!(a.pin_policy, PinPolicy::Always);
        assert_eq!(a.touch_policy, TouchPolicy::Never);
        assert_eq!(a.form_factor, Some(0x04));
        assert_eq!(a.slot.as_deref(), Some("9a"));
        assert_eq!(a.root_subject, "CN=Yubico Attestation Root 1");

        // The same with the intermediates sent by the client instead of built in.
        let s = sample(7);
        let mut root1_only = AttestationRoots::empty();
        root1_only
            .add_pem(&fixture_pem("yubico-attestation-root-1.pem"))
            .unwrap();
        assert_eq!(
            verify(
                &s.slot,
                std::slice::from_ref(&s.f9),
                &spki_of(&s.slot),
                &root1_only,
                NOW
            ),
            Err(AttestationError::Untrusted)
        );
        let chain = vec![
            s.f9.clone(),
            fixture("yubico-piv-attestation-b1.pem"),
            fixture("yubico-attestation-intermediate-b1.pem"),
        ];
        assert_eq!(
            verify(&s.slot, &chain, &spki_of(&s.slot), &root1_only, NOW)
                .unwrap()
                .serial,
            32718477
        );
        // The PIV root does not cover 5.7.4 devices, Root 1 does not cover older ones.
        let mut piv_only = AttestationRoots::empty();
        piv_only
            .add_pem(&fixture_pem("yubico-piv-root-263751.pem"))
            .unwrap();
        assert_eq!(
            verify(&s.slot, &chain, &spki_of(&s.slot), &piv_only, NOW),
            Err(AttestationError::Untrusted)
        );
        assert_eq!(
            verify_sample(2, &root1_only),
            Err(AttestationError::Untrusted)
        );
    }

    #[test]
    fn sample_5_f9_without_basic_constraints_is_accepted() {
        // A real YubiKey 4.3.5 whose f9 (firmware 4.3.4) has neither basicConstraints nor
        // keyUsage; every signature is valid and the path is Yubico's. Accepted: see module docs.
        let a = verify_sample(5, &AttestationRoots::yubico()).unwrap();
        assert_eq!(a.serial, 5970478);
        assert_eq!(a.firmware, (4, 3, 5));
        assert_eq!(
            (a.pin_policy, a.touch_policy),
            (PinPolicy::Always, TouchPolicy::Never)
        );
        assert_eq!(a.form_factor, None);
        assert_eq!(a.slot.as_deref(), Some("9a"));
    }

    #[test]
    fn sample_6_is_refused() {
        // Its f9 chains to the U2F root, which is not trusted.
        assert_eq!(
            verify_sample(6, &AttestationRoots::yubico()),
            Err(AttestationError::Untrusted)
        );
        // Trusting the U2F root does not help: it has pathlen 0, the f9 is an intermediate.
        let mut with_u2f = AttestationRoots::yubico();
        with_u2f
            .add_pem(&fixture_pem("yubico-u2f-root-457200631.pem"))
            .unwrap();
        assert!(matches!(
            verify_sample(6, &with_u2f),
            Err(AttestationError::PathLenExceeded(n)) if n.contains("U2F Root")
        ));
        // And it has no serial anyway (checked without the chain).
        let ext = YubicoExtensions::parse_der(&sample(6).slot).unwrap();
        assert_eq!(ext.serial, None);
        assert_eq!(ext.firmware, Some((4, 3, 7)));
    }

    #[test]
    fn the_pre_2018_root_with_pathlen_0_fails_every_real_chain() {
        let mut old = AttestationRoots::empty();
        old.add_pem(&fixture_pem("yubico-piv-root-263751-pre2018-pathlen0.pem"))
            .unwrap();
        for n in 1..=4 {
            assert!(
                matches!(
                    verify_sample(n, &old),
                    Err(AttestationError::PathLenExceeded(_))
                ),
                "sample {n}"
            );
        }
    }

    #[test]
    fn mismatched_pairs_fail_the_signature_check() {
        let roots = AttestationRoots::yubico();
        for (slot_of, f9_of) in [(6, 2), (2, 5), (5, 2), (1, 7), (2, 3)] {
            let slot = sample(slot_of).slot;
            let f9 = sample(f9_of).f9;
            let err = verify(&slot, &[f9], &spki_of(&slot), &roots, NOW).unwrap_err();
            if slot_of == 1 && f9_of == 7 {
                // Different f9 names ("Yubico PIV Attestation" vs "YubiKey PIV Attestation").
                assert_eq!(err, AttestationError::IssuerMismatch);
            } else {
                assert_eq!(
                    err,
                    AttestationError::BadSignature,
                    "{slot_of} with f9 of {f9_of}"
                );
                assert_eq!(
                    err.to_string(),
                    "the attestation is not signed by the f9 certificate"
                );
            }
        }
    }

    #[test]
    fn the_csr_key_must_be_the_attested_key() {
        let roots = AttestationRoots::yubico();
        let s = sample(2);
        let other = spki_of(&sample(4).slot);
        let err = verify(&s.slot, std::slice::from_ref(&s.f9), &other, &roots, NOW).unwrap_err();
        assert_eq!(err, AttestationError::KeyMismatch);
        assert_eq!(
            err.to_string(),
            "the attestation certificate's key is not the key in the CSR"
        );
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        assert_eq!(
            verify(
                &s.slot,
                &[s.f9],
                &rcgen::PublicKeyData::subject_public_key_info(&key),
                &roots,
                NOW
            ),
            Err(AttestationError::KeyMismatch)
        );
    }

    #[test]
    fn validity_is_checked_for_every_certificate() {
        let roots = AttestationRoots::yubico();
        let s = sample(2);
        let spki = spki_of(&s.slot);
        let chain = [s.f9.clone()];
        let err = verify(
            &s.slot,
            &chain,
            &spki,
            &roots,
            datetime!(2052-04-18 00:00 UTC),
        )
        .unwrap_err();
        assert_eq!(err, AttestationError::Expired);
        assert_eq!(err.to_string(), "the attestation has expired");
        assert_eq!(
            verify(
                &s.slot,
                &chain,
                &spki,
                &roots,
                datetime!(2016-03-13 00:00 UTC)
            ),
            Err(AttestationError::NotYetValid)
        );
        // Sample 7: before the 5.7.4 PKI existed.
        let s7 = sample(7);
        assert_eq!(
            verify(
                &s7.slot,
                std::slice::from_ref(&s7.f9),
                &spki_of(&s7.slot),
                &roots,
                datetime!(2024-11-30 00:00 UTC)
            ),
            Err(AttestationError::NotYetValid)
        );
    }

    #[test]
    fn empty_roots_and_bad_input_are_refused() {
        let s = sample(2);
        let spki = spki_of(&s.slot);
        let err = verify(
            &s.slot,
            std::slice::from_ref(&s.f9),
            &spki,
            &AttestationRoots::empty(),
            NOW,
        )
        .unwrap_err();
        assert_eq!(err, AttestationError::NoRoots);
        let roots = AttestationRoots::yubico();
        assert_eq!(
            verify(&s.slot, &[], &spki, &roots, NOW),
            Err(AttestationError::MissingF9)
        );
        assert_eq!(
            verify(
                &s.slot,
                &vec![s.f9.clone(); MAX_CHAIN_INPUT + 1],
                &spki,
                &roots,
                NOW
            ),
            Err(AttestationError::TooManyCertificates)
        );
        let mut trailing = s.slot.clone();
        trailing.push(0);
        assert_eq!(
            verify(&trailing, std::slice::from_ref(&s.f9), &spki, &roots, NOW),
            Err(AttestationError::TrailingData)
        );
        assert_eq!(
            verify(
                &s.slot,
                &[s.f9.clone(), b"junk".to_vec()],
                &spki,
                &roots,
                NOW
            ),
            Err(AttestationError::MalformedChain(1))
        );
        // Every truncation and a flipped bit anywhere: an error, never a panic or a success.
        for n in 0..s.slot.len() {
            assert!(verify(
                &s.slot[..n],
                std::slice::from_ref(&s.f9),
                &spki,
                &roots,
                NOW
            )
            .is_err());
        }
        for n in 0..s.f9.len() {
            assert!(verify(&s.slot, &[s.f9[..n].to_vec()], &spki, &roots, NOW).is_err());
        }
        for i in (0..s.slot.len()).step_by(7) {
            let mut bad = s.slot.clone();
            bad[i] ^= 0x10;
            assert!(
                verify(&bad, std::slice::from_ref(&s.f9), &spki, &roots, NOW).is_err(),
                "byte {i}"
            );
        }
        for i in (0..s.f9.len()).step_by(7) {
            let mut bad = s.f9.clone();
            bad[i] ^= 0x10;
            assert!(
                verify(&s.slot, &[bad], &spki, &roots, NOW).is_err(),
                "f9 byte {i}"
            );
        }
        assert!(matches!(
            AttestationRoots::empty().add_pem("nothing here"),
            Err(AttestationError::RootPem(_))
        ));
        assert_eq!(
            AttestationRoots::empty().add_pem(&crate::pem::certificate(b"not a certificate")),
            Err(AttestationError::BadRoot(0))
        );
    }

    #[test]
    fn policies_parse_print_and_order() {
        for p in PinPolicy::ALL {
            assert_eq!(p.as_str().parse::<PinPolicy>().unwrap(), p);
            assert_eq!(p.to_string(), p.as_str());
            assert_eq!(PinPolicy::from_attestation_byte(p.to_byte()), Some(p));
        }
        for t in TouchPolicy::ALL {
            assert_eq!(t.as_str().parse::<TouchPolicy>().unwrap(), t);
            assert_eq!(TouchPolicy::from_attestation_byte(t.to_byte()), Some(t));
        }
        assert_eq!(
            "sometimes".parse::<PinPolicy>().unwrap_err().to_string(),
            "unknown PIN policy 'sometimes': use never, once or always"
        );
        assert!("Once".parse::<PinPolicy>().is_err());
        assert!(PinPolicy::Always.at_least(PinPolicy::Once));
        assert!(PinPolicy::Once.at_least(PinPolicy::Once));
        assert!(!PinPolicy::Never.at_least(PinPolicy::Once));
        assert!(TouchPolicy::Always.at_least(TouchPolicy::Cached));
        assert!(!TouchPolicy::Cached.at_least(TouchPolicy::Always));
        assert!(TouchPolicy::Cached > TouchPolicy::Never);
        assert_eq!(PinPolicy::from_attestation_byte(0), Some(PinPolicy::Never));
        assert_eq!(
            TouchPolicy::from_attestation_byte(0),
            Some(TouchPolicy::Never)
        );
        assert_eq!(PinPolicy::from_attestation_byte(4), None);
    }

    #[test]
    fn der_serials() {
        assert_eq!(parse_der_u32(&[2, 4, 0, 0xbc, 0x61, 0x4e]), Some(12345678));
        assert_eq!(parse_der_u32(&[2, 3, 0x5b, 0x1a, 0x2e]), Some(5970478));
        assert_eq!(
            parse_der_u32(&[2, 5, 0, 0xff, 0xff, 0xff, 0xff]),
            Some(u32::MAX)
        );
        assert_eq!(parse_der_u32(&[2, 5, 1, 0, 0, 0, 0]), None); // too large
        assert_eq!(parse_der_u32(&[2, 2, 0, 1]), None); // not minimal
        assert_eq!(parse_der_u32(&[2, 1, 0x80]), None); // negative
        assert_eq!(parse_der_u32(&[2, 1, 0]), None); // zero
        assert_eq!(parse_der_u32(&[4, 1, 1]), None); // not an INTEGER
        assert_eq!(parse_der_u32(&[2, 2, 1]), None); // short
        assert_eq!(parse_der_u32(&[0x01, 0x02, 0x03]), None); // raw bytes
        assert_eq!(parse_der_u32(&[]), None);
    }

    // ---- synthetic chains (rcgen) for the structural rules ----

    struct TestCa {
        params: CertificateParams,
        key: KeyPair,
        der: Vec<u8>,
    }

    fn name(cn: &str) -> DistinguishedName {
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        dn
    }

    fn ca_params(cn: &str, pathlen: Option<u8>) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = name(cn);
        p.is_ca = match pathlen {
            Some(n) => IsCa::Ca(BasicConstraints::Constrained(n)),
            None => IsCa::NoCa,
        };
        p.not_before = datetime!(2016-03-14 00:00 UTC);
        p.not_after = datetime!(2052-04-17 00:00 UTC);
        p
    }

    fn root(cn: &str) -> TestCa {
        let mut params = ca_params(cn, Some(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let der = params.self_signed(&key).unwrap().der().to_vec();
        TestCa { params, key, der }
    }

    fn issue(issuer: &TestCa, params: CertificateParams, key: KeyPair) -> TestCa {
        let der = params
            .signed_by(&key, &Issuer::from_params(&issuer.params, &issuer.key))
            .unwrap()
            .der()
            .to_vec();
        TestCa { params, key, der }
    }

    fn f9_under(root: &TestCa, pathlen: Option<u8>) -> TestCa {
        let mut p = ca_params("Yubico PIV Attestation", pathlen);
        p.custom_extensions = vec![CustomExtension::from_oid_content(
            YUBICO_FIRMWARE,
            vec![5, 4, 3],
        )];
        issue(
            root,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        )
    }

    fn yubico_exts(serial: Option<u32>, policy: [u8; 2]) -> Vec<CustomExtension> {
        let mut v = vec![CustomExtension::from_oid_content(
            YUBICO_FIRMWARE,
            vec![5, 4, 3],
        )];
        if let Some(s) = serial {
            let mut der = vec![2, 5, 0];
            der.extend_from_slice(&s.to_be_bytes());
            // minimal encoding
            while der.len() > 3 && der[2] == 0 && der[3] & 0x80 == 0 {
                der.remove(2);
                der[1] -= 1;
            }
            v.push(CustomExtension::from_oid_content(YUBICO_SERIAL, der));
        }
        v.push(CustomExtension::from_oid_content(
            YUBICO_POLICY,
            policy.to_vec(),
        ));
        v.push(CustomExtension::from_oid_content(
            YUBICO_FORM_FACTOR,
            vec![1],
        ));
        v
    }

    /// A slot attestation certificate for a fresh key, issued by `issuer`.
    fn slot_cert(issuer: &TestCa, slot: &str, exts: Vec<CustomExtension>) -> TestCa {
        let mut p = ca_params(&format!("YubiKey PIV Attestation {slot}"), None);
        p.is_ca = IsCa::NoCa;
        p.custom_extensions = exts;
        issue(
            issuer,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        )
    }

    /// `verify` of a test slot certificate issued by a test f9, for the slot certificate's key.
    fn verify_att(
        att: &TestCa,
        f9: &TestCa,
        roots: &AttestationRoots,
    ) -> Result<Attestation, AttestationError> {
        verify(
            &att.der,
            std::slice::from_ref(&f9.der),
            &spki_of(&att.der),
            roots,
            NOW,
        )
    }

    fn roots_with(ca: &TestCa) -> AttestationRoots {
        let mut r = AttestationRoots::empty();
        r.add_pem(&crate::pem::certificate(&ca.der)).unwrap();
        r
    }

    #[test]
    fn a_synthetic_chain_like_the_virtual_card_verifies() {
        let root = root("Test PIV Root");
        let f9 = f9_under(&root, Some(0));
        let att = slot_cert(&f9, "9a", yubico_exts(Some(12345678), [2, 1]));
        let a = verify_att(&att, &f9, &roots_with(&root)).unwrap();
        assert_eq!(a.serial, 12345678);
        assert_eq!(
            (a.pin_policy, a.touch_policy),
            (PinPolicy::Once, TouchPolicy::Never)
        );
        assert_eq!(a.root_subject, "CN=Test PIV Root");
        // Not against Yubico's roots.
        assert_eq!(
            verify_att(&att, &f9, &AttestationRoots::yubico()),
            Err(AttestationError::Untrusted)
        );
    }

    /// A slot attestation certificate for the public key `spki` (an RSA key, which rcgen cannot
    /// generate with ring), issued by `issuer`, stating `firmware`.
    fn slot_cert_for(issuer: &TestCa, spki: &[u8], firmware: [u8; 3]) -> Vec<u8> {
        let mut p = ca_params("YubiKey PIV Attestation 9a", None);
        p.is_ca = IsCa::NoCa;
        let mut exts = yubico_exts(Some(5970478), [3, 1]);
        exts[0] = CustomExtension::from_oid_content(YUBICO_FIRMWARE, firmware.to_vec());
        p.custom_extensions = exts;
        let key = rcgen::SubjectPublicKeyInfo::from_der(spki).unwrap();
        p.signed_by(&key, &Issuer::from_params(&issuer.params, &issuer.key))
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn rsa_keys_from_roca_firmware_are_refused() {
        assert!(!roca_affected((4, 2, 5)));
        assert!(roca_affected((4, 2, 6)));
        assert!(roca_affected((4, 3, 0)));
        assert!(roca_affected((4, 3, 4)));
        assert!(!roca_affected((4, 3, 5)));
        assert!(!roca_affected((5, 4, 3)));
        let rsa = crate::ValidatedCsr::parse(include_bytes!("../fixtures/rsa2048.csr.der"))
            .unwrap()
            .spki()
            .to_vec();
        let root = root("Test PIV Root");
        let f9 = f9_under(&root, Some(0));
        let roots = roots_with(&root);
        let check = |firmware| {
            let att = slot_cert_for(&f9, &rsa, firmware);
            verify(&att, std::slice::from_ref(&f9.der), &rsa, &roots, NOW)
        };
        let e = check([4, 3, 4]).unwrap_err();
        assert_eq!(e, AttestationError::RocaVulnerable("4.3.4".into()));
        assert_eq!(
            e.to_string(),
            "the attested key is an RSA key generated by YubiKey firmware 4.3.4, whose RSA keys can be factored (ROCA, CVE-2017-15361, Yubico YSA-2017-01: firmware 4.2.6 to 4.3.4): generate an ECDSA key (P-256 or P-384) instead"
        );
        assert_eq!(
            check([4, 2, 6]),
            Err(AttestationError::RocaVulnerable("4.2.6".into()))
        );
        // The same RSA key attested by fixed firmware, and an ECDSA key of ROCA firmware, pass.
        assert_eq!(check([4, 3, 5]).unwrap().firmware, (4, 3, 5));
        let ec = slot_cert(&f9, "9a", {
            let mut exts = yubico_exts(Some(5970478), [2, 1]);
            exts[0] = CustomExtension::from_oid_content(YUBICO_FIRMWARE, vec![4, 3, 4]);
            exts
        });
        let a = verify(
            &ec.der,
            std::slice::from_ref(&f9.der),
            &spki_of(&ec.der),
            &roots,
            NOW,
        )
        .unwrap();
        assert_eq!(a.firmware, (4, 3, 4));
    }

    #[test]
    fn no_serial_is_refused() {
        let root = root("Test PIV Root");
        let f9 = f9_under(&root, Some(0));
        let att = slot_cert(&f9, "9a", yubico_exts(None, [2, 1]));
        let err = verify_att(&att, &f9, &roots_with(&root)).unwrap_err();
        assert_eq!(err, AttestationError::NoSerial);
        assert_eq!(err.to_string(), "the attestation carries no device serial");
        // Malformed policy bytes.
        let att = slot_cert(&f9, "9a", yubico_exts(Some(7), [4, 1]));
        assert!(matches!(
            verify_att(&att, &f9, &roots_with(&root)),
            Err(AttestationError::MalformedExtension(_))
        ));
        // "Default" (0) bytes count as the weakest policies.
        let att = slot_cert(&f9, "9a", yubico_exts(Some(7), [0, 0]));
        let a = verify_att(&att, &f9, &roots_with(&root)).unwrap();
        assert_eq!(
            (a.pin_policy, a.touch_policy),
            (PinPolicy::Never, TouchPolicy::Never)
        );
    }

    #[test]
    fn a_self_made_attestation_presented_with_a_real_f9_is_refused() {
        // An attacker signs a "slot certificate" for their software key with another key of
        // their own, names the real f9 as issuer and claims the strictest policies.
        let fake_issuer = TestCa {
            params: ca_params("Yubico PIV Attestation", Some(0)),
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
            der: Vec::new(),
        };
        let forged = slot_cert(&fake_issuer, "9a", yubico_exts(Some(15732500), [3, 2]));
        let real_f9 = sample(2).f9;
        let err = verify(
            &forged.der,
            &[real_f9],
            &spki_of(&forged.der),
            &AttestationRoots::yubico(),
            NOW,
        )
        .unwrap_err();
        assert_eq!(err, AttestationError::BadSignature);
    }

    #[test]
    fn a_slot_key_cannot_pose_as_an_f9() {
        // Root -> f9 -> slot certificate of a (genuine) YubiKey key K. The owner of K makes K
        // sign an "attestation" of a software key, naming K's slot certificate as its f9.
        let root = root("Test PIV Root");
        let f9 = f9_under(&root, Some(0));
        let slot = slot_cert(&f9, "9a", yubico_exts(Some(12345678), [1, 1]));
        let software = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = ca_params("YubiKey PIV Attestation 9c", None);
        p.custom_extensions = yubico_exts(Some(99999999), [3, 2]);
        // The issuer name is taken from `slot.params` (its subject) by rcgen.
        let fake = issue(&slot, p, software);
        let roots = roots_with(&root);
        let chain = vec![slot.der.clone(), f9.der.clone()];
        let err = verify(&fake.der, &chain, &spki_of(&fake.der), &roots, NOW).unwrap_err();
        assert!(
            matches!(&err, AttestationError::SlotCertificateAsIssuer(n) if n.contains("YubiKey PIV Attestation 9a")),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "the certificate 'CN=YubiKey PIV Attestation 9a' is a slot attestation certificate and cannot issue attestations"
        );

        // Even a slot certificate without the markers (a real YubiKey never makes one) fails:
        // the f9's pathlen 0 forbids a CA below it...
        let mut p = ca_params("Some Key", None);
        p.custom_extensions = vec![];
        let unmarked = issue(
            &f9,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        let mut p = ca_params("YubiKey PIV Attestation 9c", None);
        p.distinguished_name = name("Attestation");
        p.custom_extensions = yubico_exts(Some(99999999), [3, 2]);
        let fake = issue(
            &unmarked,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        let chain = vec![unmarked.der.clone(), f9.der.clone()];
        assert!(matches!(
            verify(&fake.der, &chain, &spki_of(&fake.der), &roots, NOW),
            Err(AttestationError::PathLenExceeded(n)) if n.contains("Yubico PIV Attestation")
        ));
        // ...and under an f9 without basicConstraints (like sample 5) the root's pathlen 1 does.
        let f9_no_bc = f9_under(&root, None);
        let mut p = ca_params("Some Key", None);
        p.custom_extensions = vec![];
        let unmarked = issue(
            &f9_no_bc,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        let mut p = ca_params("x", None);
        p.custom_extensions = yubico_exts(Some(99999999), [3, 2]);
        let fake = issue(
            &unmarked,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        let chain = vec![unmarked.der.clone(), f9_no_bc.der.clone()];
        let err = verify(&fake.der, &chain, &spki_of(&fake.der), &roots, NOW).unwrap_err();
        // The f9 without basicConstraints is not in the f9 position here, so it is "not a CA".
        assert!(
            matches!(&err, AttestationError::NotCa(n) if n.contains("Yubico PIV Attestation")),
            "{err}"
        );
    }

    #[test]
    fn intermediates_must_be_cas_and_respect_key_usage() {
        let root = root("Test PIV Root");
        // An intermediate without basicConstraints between the root and the f9.
        let mut p = ca_params("Intermediate", None);
        p.custom_extensions = vec![];
        let inter = issue(
            &root,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        let f9 = f9_under(&inter, Some(0));
        let att = slot_cert(&f9, "9a", yubico_exts(Some(1), [2, 1]));
        let err = verify(
            &att.der,
            &[f9.der.clone(), inter.der.clone()],
            &spki_of(&att.der),
            &roots_with(&root),
            NOW,
        )
        .unwrap_err();
        assert!(
            matches!(&err, AttestationError::NotCa(n) if n.contains("Intermediate")),
            "{err}"
        );

        // An f9 whose keyUsage does not allow certificate signing.
        let mut p = ca_params("Yubico PIV Attestation", Some(0));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let f9 = issue(
            &root,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        let att = slot_cert(&f9, "9a", yubico_exts(Some(1), [2, 1]));
        assert!(matches!(
            verify_att(&att, &f9, &roots_with(&root)),
            Err(AttestationError::NotCa(_))
        ));
        // An f9 that says CA:FALSE.
        let mut p = ca_params("Yubico PIV Attestation", None);
        p.is_ca = IsCa::ExplicitNoCa;
        let f9 = issue(
            &root,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        let att = slot_cert(&f9, "9a", yubico_exts(Some(1), [2, 1]));
        assert!(matches!(
            verify_att(&att, &f9, &roots_with(&root)),
            Err(AttestationError::NotCa(_))
        ));
    }

    #[test]
    fn unknown_critical_extensions_and_odd_certificates_are_refused() {
        let root = root("Test PIV Root");
        let f9 = f9_under(&root, Some(0));
        let roots = roots_with(&root);
        let mut exts = yubico_exts(Some(5), [2, 1]);
        let mut crit = CustomExtension::from_oid_content(&[1, 2, 3, 4], vec![5, 0]);
        crit.set_criticality(true);
        exts.push(crit);
        let att = slot_cert(&f9, "9a", exts);
        let err = verify_att(&att, &f9, &roots).unwrap_err();
        assert_eq!(
            err,
            AttestationError::UnknownCriticalExtension {
                cert: "the attestation certificate".into(),
                oid: "1.2.3.4".into()
            }
        );
        // A CA certificate posing as an attestation.
        let mut p = ca_params("YubiKey PIV Attestation 9a", Some(0));
        p.custom_extensions = yubico_exts(Some(5), [2, 1]);
        let att = issue(
            &f9,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        assert_eq!(
            verify_att(&att, &f9, &roots),
            Err(AttestationError::AttestationIsCa)
        );
        // A duplicated Yubico extension.
        let mut exts = yubico_exts(Some(5), [2, 1]);
        exts.push(CustomExtension::from_oid_content(YUBICO_POLICY, vec![3, 2]));
        let att = slot_cert(&f9, "9a", exts);
        assert!(matches!(
            verify_att(&att, &f9, &roots),
            Err(AttestationError::DuplicateExtension(_))
        ));
    }

    #[test]
    fn chains_are_bounded_and_an_expired_intermediate_is_refused() {
        // root -> i1 -> i2 -> i3 -> i4 -> f9: more than MAX_ISSUERS above the attestation.
        let top = root("Test PIV Root");
        let mut prev = top;
        let mut inters = Vec::new();
        for i in 1..=4 {
            let mut p = ca_params(&format!("I{i}"), Some(9));
            p.custom_extensions = vec![];
            let next = issue(
                &prev,
                p,
                KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
            );
            inters.push(std::mem::replace(&mut prev, next));
        }
        let f9 = f9_under(&prev, Some(0));
        let att = slot_cert(&f9, "9a", yubico_exts(Some(1), [2, 1]));
        let roots = roots_with(&inters[0]);
        let mut chain = vec![f9.der.clone(), prev.der.clone()];
        chain.extend(inters[1..].iter().rev().map(|c| c.der.clone()));
        assert_eq!(
            verify(&att.der, &chain, &spki_of(&att.der), &roots, NOW),
            Err(AttestationError::ChainTooLong)
        );

        // An f9 that expired before `now`, under a valid root.
        let anchor = root("Test PIV Root");
        let mut p = ca_params("Yubico PIV Attestation", Some(0));
        p.not_after = datetime!(2020-01-01 00:00 UTC);
        let f9 = issue(
            &anchor,
            p,
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
        );
        let att = slot_cert(&f9, "9a", yubico_exts(Some(1), [2, 1]));
        let err = verify_att(&att, &f9, &roots_with(&anchor)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the certificate 'CN=Yubico PIV Attestation' in the attestation chain has expired or is not yet valid"
        );
    }
}
