//! Certificate renewal: a new certificate for the same key, before the current one expires.
//!
//! The agent asks at every start once less than the gateway's `renew_before` remains (48 h by
//! default, so a laptop used every other day never lapses). The key does not change, so a
//! YubiKey-held key stays on its YubiKey. The new certificate is checked (issued by the pinned
//! CA, for this key and this identity) before it replaces the old one on disk.
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use zerospice_ca::Identity;
use zerospice_enroll::profile::CERT_FILE;

use crate::client::{spki_of, Client, Credentials};
use crate::error::AgentError;

/// Whether a certificate valid until `not_after` should be renewed at `now`.
pub fn needs_renewal(not_after: i64, now: i64, renew_before_secs: u64) -> bool {
    not_after.saturating_sub(now) < i64::try_from(renew_before_secs).unwrap_or(i64::MAX)
}

/// What a renewal produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    pub serial: String,
    pub not_after: i64,
}

/// Checks that `der` is a client certificate of the pinned CA for the same key and identity.
pub fn check_renewed(creds: &Credentials, der: &[u8]) -> Result<Identity, AgentError> {
    let bad =
        |why: String| AgentError::Protocol(format!("the renewed certificate is unusable: {why}"));
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(creds.ca_der.clone()))
        .map_err(|e| bad(e.to_string()))?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        zerospice_enroll::tls::provider(),
    )
    .build()
    .map_err(|e| bad(e.to_string()))?;
    verifier
        .verify_client_cert(&CertificateDer::from(der.to_vec()), &[], UnixTime::now())
        .map_err(|e| bad(e.to_string()))?;
    let id = Identity::from_der(der).map_err(|e| bad(e.to_string()))?;
    if id.user != creds.identity.user
        || id.device != creds.identity.device
        || id.key != creds.identity.key
    {
        return Err(bad("it names another identity".into()));
    }
    if spki_of(der)? != creds.signer.spki_der() {
        return Err(bad("it is for another key".into()));
    }
    Ok(id)
}

/// Renews over `client` and stores the new certificate; `creds` is updated in place.
pub async fn renew(client: &Client, creds: &mut Credentials) -> Result<Renewed, AgentError> {
    let csr = zerospice_ca::csr::build_csr(creds.signer.as_ref(), &creds.profile.user)
        .map_err(|e| AgentError::Key(format!("cannot sign the renewal request: {e}")))?;
    let (pem, serial, not_after) = client.renew(csr).await?;
    let der = zerospice_ca::pem::first_certificate(&pem)
        .map_err(|e| AgentError::Protocol(format!("renewed certificate: {e}")))?;
    let id = check_renewed(creds, &der)?;
    // Certificate first, then the profile: a crash in between leaves a usable pair.
    creds.dir.write_public(CERT_FILE, &pem)?;
    creds.profile.serial = serial.clone();
    creds.profile.not_after = not_after;
    creds.dir.save(&creds.profile)?;
    creds.cert_der = der;
    creds.identity = id;
    Ok(Renewed { serial, not_after })
}

/// Renews if needed; returns what was renewed, if anything.
pub async fn renew_if_due(
    client: &Client,
    creds: &mut Credentials,
) -> Result<Option<Renewed>, AgentError> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    if !needs_renewal(
        creds.identity.not_after,
        now,
        client.hello.renew_before_secs,
    ) {
        return Ok(None);
    }
    renew(client, creds).await.map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renews_inside_the_window_only() {
        let day = 86_400;
        assert!(!needs_renewal(10 * day, 0, 2 * day as u64));
        assert!(needs_renewal(2 * day - 1, 0, 2 * day as u64));
        assert!(needs_renewal(0, 10, 1));
        assert!(!needs_renewal(100, 0, 0));
        assert!(needs_renewal(i64::MIN, i64::MAX, u64::MAX));
    }
}
