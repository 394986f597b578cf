//! PEM in and out.
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// Encodes DER as PEM with 64-column lines.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Encodes a certificate as PEM.
pub fn certificate(der: &[u8]) -> String {
    encode("CERTIFICATE", der)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    #[error("no certificate found in PEM text")]
    NoCertificate,
    #[error("malformed PEM: {0}")]
    Malformed(String),
}

/// All certificates in a PEM text, in order.
pub fn certificates(text: &str) -> Result<Vec<Vec<u8>>, PemError> {
    let certs = CertificateDer::pem_slice_iter(text.as_bytes())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PemError::Malformed(e.to_string()))?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(certs)
}

/// The first certificate in a PEM text.
pub fn first_certificate(text: &str) -> Result<Vec<u8>, PemError> {
    certificates(text)?
        .into_iter()
        .next()
        .ok_or(PemError::NoCertificate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let der: Vec<u8> = (0..100u8).collect();
        let pem = certificate(&der);
        assert!(pem.lines().all(|l| l.len() <= 64));
        assert_eq!(first_certificate(&pem).unwrap(), der);
        let two = format!("{pem}{}", certificate(&[1, 2, 3]));
        assert_eq!(certificates(&two).unwrap().len(), 2);
        assert_eq!(certificates("nothing"), Err(PemError::NoCertificate));
    }
}
