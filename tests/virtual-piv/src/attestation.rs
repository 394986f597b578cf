//! Test attestation PKI and YubiKey-style attestation certificates.
//!
//! A real YubiKey carries a factory key in slot f9 with a certificate ("CN=Yubico PIV Attestation")
//! issued by Yubico's PIV root ("CN=Yubico PIV Root CA Serial 263751"). Both are RSA-2048 and sign
//! with sha256WithRSAEncryption. ATTEST (INS F9) returns a certificate for a key generated in a
//! slot, issued by the f9 key, carrying Yubico's extensions. This module makes a test stand-in of
//! that PKI with the same shape:
//!
//! - `test-piv-root.pem`: "CN=ZeroSpice Test PIV Root CA", self-signed, RSA-2048, CA (pathlen 1),
//!   keyCertSign + cRLSign. Its private key is not kept: nothing but the f9 certificate is issued.
//! - `test-f9.pem` + `test-f9.key` (PKCS#8 PEM, mode 0600): "CN=Yubico PIV Attestation", RSA-2048,
//!   issued by the test root, with the extensions of a real f9 certificate and nothing else:
//!   1.3.6.1.4.1.41482.3.3 (firmware, 3 raw bytes) then basicConstraints critical CA:TRUE pathlen:0.
//!   Validity 2016-03-14 to 2052-04-17 like Yubico's.
//! - slot attestation certificates: "CN=YubiKey PIV Attestation 9a" (slot in lower-case hex), issuer
//!   = the f9 subject, a random positive 16-byte serial, the f9's validity, and the extensions
//!   .3.3 firmware, .3.7 serial (DER INTEGER), .3.8 PIN/touch policy (2 raw bytes), .3.9 form factor
//!   (1 raw byte), none critical, in that order, as firmware 5.4.3 writes them.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber, SignatureAlgorithm, PKCS_RSA_SHA256,
};
use ring::rand::{SecureRandom as _, SystemRandom};
use rsa::pkcs8::{EncodePrivateKey as _, LineEnding};
use time::OffsetDateTime;

pub const ROOT_FILE: &str = "test-piv-root.pem";
pub const F9_CERT_FILE: &str = "test-f9.pem";
pub const F9_KEY_FILE: &str = "test-f9.key";

pub const ROOT_CN: &str = "ZeroSpice Test PIV Root CA";
pub const F9_CN: &str = "Yubico PIV Attestation";

/// Yubico's private enterprise arc for PIV attestation extensions: 1.3.6.1.4.1.41482.3.x
const OID_FIRMWARE: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 3];
const OID_SERIAL: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 7];
const OID_POLICY: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 8];
const OID_FORM_FACTOR: &[u64] = &[1, 3, 6, 1, 4, 1, 41482, 3, 9];
const OID_BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];

/// Everything the card needs to issue attestation certificates.
pub struct TestPki {
    /// DER of the f9 certificate (served by GET DATA 5FFF01).
    pub f9_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

/// What a slot attestation certificate states.
pub struct SlotAttestation<'a> {
    pub slot: u8,
    /// The slot's public key as the card holds it.
    pub public_key: &'a CardPublicKey,
    pub firmware: [u8; 3],
    pub serial: u32,
    /// 1 never, 2 once, 3 always
    pub pin_policy: u8,
    /// 1 never, 2 always, 3 cached
    pub touch_policy: u8,
    pub form_factor: u8,
}

/// An EC public key generated on the card (uncompressed SEC1 point).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardPublicKey {
    pub algorithm: &'static SignatureAlgorithm,
    pub point: Vec<u8>,
}

impl PublicKeyData for CardPublicKey {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.algorithm
    }
}

impl TestPki {
    /// Reuses `DIR/test-piv-root.pem`, `DIR/test-f9.pem` and `DIR/test-f9.key` when all three
    /// exist (and check out), otherwise generates a new root and f9 and writes all three.
    pub fn load_or_create(dir: &Path, firmware: [u8; 3]) -> Result<Self> {
        let root_path = dir.join(ROOT_FILE);
        let cert_path = dir.join(F9_CERT_FILE);
        let key_path = dir.join(F9_KEY_FILE);
        if root_path.exists() && cert_path.exists() && key_path.exists() {
            log::info!("reusing test attestation PKI in {}", dir.display());
            return Self::load(&root_path, &cert_path, &key_path);
        }
        log::info!(
            "generating test attestation PKI (RSA-2048 root and f9) in {}",
            dir.display()
        );
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (root_pem, f9_pem, f9_key_pem) = generate(firmware)?;
        // The key first, so that a crash never leaves a certificate without its key.
        write_atomically(&key_path, f9_key_pem.as_bytes(), 0o600)?;
        write_atomically(&cert_path, f9_pem.as_bytes(), 0o644)?;
        write_atomically(&root_path, root_pem.as_bytes(), 0o644)?;
        Self::load(&root_path, &cert_path, &key_path)
    }

    fn load(root_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Self> {
        let root_der = read_pem_cert(root_path)?;
        let f9_der = read_pem_cert(cert_path)?;
        let key_pem = fs::read_to_string(key_path)
            .with_context(|| format!("reading {}", key_path.display()))?;
        let key = KeyPair::from_pkcs8_pem_and_sign_algo(&key_pem, &PKCS_RSA_SHA256)
            .map_err(|e| anyhow!("{}: not an RSA PKCS#8 key: {e}", key_path.display()))?;

        let (_, root) = x509_parser::parse_x509_certificate(&root_der)
            .map_err(|e| anyhow!("{}: {e}", root_path.display()))?;
        let (_, f9) = x509_parser::parse_x509_certificate(&f9_der)
            .map_err(|e| anyhow!("{}: {e}", cert_path.display()))?;
        if f9.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            bail!(
                "{} does not belong to {}",
                key_path.display(),
                cert_path.display()
            );
        }
        f9.verify_signature(Some(root.public_key())).map_err(|e| {
            anyhow!(
                "{} is not signed by {}: {e}",
                cert_path.display(),
                root_path.display()
            )
        })?;
        let not_before = f9.validity().not_before.to_datetime();
        let not_after = f9.validity().not_after.to_datetime();

        let issuer = Issuer::from_ca_cert_der(&f9_der.clone().into(), key)
            .map_err(|e| anyhow!("{}: {e}", cert_path.display()))?;
        Ok(Self {
            f9_der,
            issuer,
            not_before,
            not_after,
        })
    }

    /// The f9 certificate as a PIV certificate object (what GET DATA 5FFF01 returns inside tag 53):
    /// `70 <cert> 71 01 00 FE 00`, like every certificate object a YubiKey stores.
    pub fn f9_object(&self) -> Vec<u8> {
        let mut object = tlv(0x70, &self.f9_der);
        object.extend_from_slice(&[0x71, 0x01, 0x00, 0xFE, 0x00]);
        object
    }

    /// Issues an attestation certificate for a slot key, like a YubiKey 5 does on ATTEST.
    pub fn attest(&self, what: &SlotAttestation<'_>) -> Result<Vec<u8>> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("YubiKey PIV Attestation {:02x}", what.slot),
        );
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial(16)?);
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params.is_ca = IsCa::NoCa;
        params.custom_extensions = vec![
            CustomExtension::from_oid_content(OID_FIRMWARE, what.firmware.to_vec()),
            CustomExtension::from_oid_content(OID_SERIAL, der_integer_u32(what.serial)),
            CustomExtension::from_oid_content(OID_POLICY, vec![what.pin_policy, what.touch_policy]),
            CustomExtension::from_oid_content(OID_FORM_FACTOR, vec![what.form_factor]),
        ];
        let cert = params
            .signed_by(what.public_key, &self.issuer)
            .map_err(|e| anyhow!("signing the attestation certificate: {e}"))?;
        Ok(cert.der().to_vec())
    }
}

/// Generates the root and the f9: returns (root PEM, f9 PEM, f9 key PKCS#8 PEM).
fn generate(firmware: [u8; 3]) -> Result<(String, String, String)> {
    let not_before = rcgen::date_time_ymd(2016, 3, 14);
    let not_after = rcgen::date_time_ymd(2052, 4, 17);

    let root_key = generate_rsa_2048()?.0;
    let mut root_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, ROOT_CN);
    root_params.distinguished_name = dn;
    root_params.serial_number = Some(random_serial(8)?);
    root_params.not_before = not_before;
    root_params.not_after = not_after;
    root_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    root_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root_params
        .self_signed(&root_key)
        .map_err(|e| anyhow!("self-signing the test root: {e}"))?;
    let root_issuer = Issuer::new(root_params, root_key);

    let (f9_key, f9_key_pem) = generate_rsa_2048()?;
    let mut f9_params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, F9_CN);
    f9_params.distinguished_name = dn;
    f9_params.serial_number = Some(random_serial(8)?);
    f9_params.not_before = not_before;
    f9_params.not_after = not_after;
    // Like Yubico's f9 certificates: no key identifiers, no keyUsage; the firmware extension, then
    // basicConstraints written by hand so that the order and encoding match the real ones.
    f9_params.is_ca = IsCa::NoCa;
    let mut basic_constraints = CustomExtension::from_oid_content(
        OID_BASIC_CONSTRAINTS,
        vec![0x30, 0x06, 0x01, 0x01, 0xFF, 0x02, 0x01, 0x00],
    );
    basic_constraints.set_criticality(true);
    f9_params.custom_extensions = vec![
        CustomExtension::from_oid_content(OID_FIRMWARE, firmware.to_vec()),
        basic_constraints,
    ];
    let f9_cert = f9_params
        .signed_by(&f9_key, &root_issuer)
        .map_err(|e| anyhow!("issuing the test f9 certificate: {e}"))?;

    Ok((root_cert.pem(), f9_cert.pem(), f9_key_pem))
}

fn generate_rsa_2048() -> Result<(KeyPair, String)> {
    let private = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048)
        .context("generating an RSA-2048 key")?;
    let pem = private
        .to_pkcs8_pem(LineEnding::LF)
        .context("encoding the RSA key as PKCS#8")?;
    let key = KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &PKCS_RSA_SHA256)
        .map_err(|e| anyhow!("loading the generated RSA key: {e}"))?;
    Ok((key, pem.to_string()))
}

/// A random positive serial of `len` bytes (top bit cleared so that DER needs no padding byte).
fn random_serial(len: usize) -> Result<SerialNumber> {
    let mut bytes = vec![0u8; len];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow!("system RNG failed"))?;
    bytes[0] &= 0x7F;
    if bytes[0] == 0 {
        bytes[0] = 0x01;
    }
    Ok(SerialNumber::from_slice(&bytes))
}

/// DER INTEGER for an unsigned value (minimal length, leading 00 when the top bit is set).
pub fn der_integer_u32(value: u32) -> Vec<u8> {
    let bytes = value.to_be_bytes();
    let first = bytes.iter().position(|&b| b != 0).unwrap_or(3);
    let mut content = bytes[first..].to_vec();
    if content[0] & 0x80 != 0 {
        content.insert(0, 0);
    }
    let mut out = vec![0x02, content.len() as u8];
    out.extend_from_slice(&content);
    out
}

/// BER-TLV with a one-byte tag and a definite length (short, 81 or 82 form).
pub fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else if len < 0x100 {
        out.extend_from_slice(&[0x81, len as u8]);
    } else {
        out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]);
    }
    out.extend_from_slice(value);
    out
}

fn read_pem_cert(path: &Path) -> Result<Vec<u8>> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text)
        .map_err(|e| anyhow!("{}: not a PEM certificate: {e}", path.display()))?;
    Ok(pem.contents)
}

/// Writes `path` through a temporary file in the same directory and a rename.
pub fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp: PathBuf = path.with_file_name(tmp_name);
    // A stale temporary file would keep its old mode: start from scratch.
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}
