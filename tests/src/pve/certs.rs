//! A cluster CA and node certificate shaped like Proxmox's `/etc/pve/pve-root-ca.pem` and
//! `/etc/pve/local/pve-ssl.pem` (subjects as pve-cluster writes them), with ECDSA P-256 keys
//! (Proxmox uses RSA; ring cannot generate RSA keys and no client here cares).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

pub struct ClusterPki {
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    pub node_cert_pem: String,
    pub node_cert_der: CertificateDer<'static>,
    node_key_pem: String,
    node_key_der: PrivatePkcs8KeyDer<'static>,
    /// `OU=PVE Cluster Node,O=Proxmox Virtual Environment,CN=<node>`, as `read_x509_subject_spice`
    /// prints the node certificate's subject for remote-viewer's `host-subject`.
    pub host_subject: String,
    issuer: Issuer<'static, KeyPair>,
}

/// `host-subject` of a node's certificate.
pub fn host_subject(node: &str) -> String {
    format!("OU=PVE Cluster Node,O=Proxmox Virtual Environment,CN={node}")
}

/// A node certificate as pve-cluster makes it (`pve-ssl.pem`), signed by `issuer`.
fn node_certificate(
    issuer: &Issuer<'static, KeyPair>,
    node: &str,
    now: OffsetDateTime,
) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
    let node_key = KeyPair::generate().context("generating the node key")?;
    let mut leaf = CertificateParams::default();
    leaf.distinguished_name = name(&[
        (DnType::OrganizationalUnitName, "PVE Cluster Node"),
        (DnType::OrganizationName, "Proxmox Virtual Environment"),
        (DnType::CommonName, node),
    ]);
    leaf.subject_alt_names = vec![
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
        SanType::DnsName("localhost".try_into()?),
    ];
    if node != "localhost" {
        let dns = node
            .try_into()
            .with_context(|| format!("node name {node:?} is not a DNS name"))?;
        leaf.subject_alt_names.push(SanType::DnsName(dns));
    }
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.use_authority_key_identifier_extension = true;
    leaf.not_before = now - Duration::days(1);
    leaf.not_after = now + Duration::days(730);
    let leaf_cert = leaf
        .signed_by(&node_key, issuer)
        .context("signing the node certificate")?;

    Ok((leaf_cert, node_key))
}

impl ClusterPki {
    pub fn generate(node: &str) -> anyhow::Result<Self> {
        let now = OffsetDateTime::now_utc();

        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut ca = CertificateParams::default();
        ca.distinguished_name = name(&[
            (DnType::CommonName, "Proxmox Virtual Environment"),
            (
                DnType::OrganizationalUnitName,
                &super::config::random_uuid(),
            ),
            (DnType::OrganizationName, "PVE Cluster Manager CA"),
        ]);
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca.not_before = now - Duration::days(1);
        ca.not_after = now + Duration::days(3650);
        let ca_cert = ca.self_signed(&ca_key).context("self-signing the CA")?;
        let issuer = Issuer::new(ca, ca_key);
        let (leaf_cert, node_key) = node_certificate(&issuer, node, now)?;

        Ok(ClusterPki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            node_cert_pem: leaf_cert.pem(),
            node_cert_der: leaf_cert.der().clone(),
            node_key_pem: node_key.serialize_pem(),
            node_key_der: PrivatePkcs8KeyDer::from(node_key.serialize_der()),
            host_subject: host_subject(node),
            issuer,
        })
    }

    /// A certificate and key (PEM) for another node of this cluster, signed by the cluster CA.
    pub fn issue_node_certificate(&self, node: &str) -> anyhow::Result<(String, String)> {
        let (cert, key) = node_certificate(&self.issuer, node, OffsetDateTime::now_utc())?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    pub fn node_key_pem(&self) -> &str {
        &self.node_key_pem
    }

    pub fn node_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.node_key_der.clone_key())
    }

    /// SHA-256 of the node certificate's DER.
    pub fn node_cert_sha256(&self) -> [u8; 32] {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.node_cert_der);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        out
    }
}

/// `AB:CD:...`, the way Proxmox shows certificate fingerprints.
pub fn colon_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn name(parts: &[(DnType, &str)]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (ty, value) in parts {
        dn.push(ty.clone(), *value);
    }
    dn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colon_hex_is_uppercase_pairs() {
        assert_eq!(colon_hex(&[0x0a, 0xff, 0x10]), "0A:FF:10");
    }
}
