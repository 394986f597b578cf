//! Enrollment: the decision (pure code on `now`, inside one write transaction) and the QUIC stream
//! handler around it.
//!
//! Order of checks, and why:
//! 1. Shape: names, CSR, proof of possession over the gateway's nonce, hardware attestation.
//!    Nothing here touches a code or a counter, and none of it reveals whether the user exists.
//! 2. In one `BEGIN IMMEDIATE` transaction: source-address lockout, user lockout, the TOTP code
//!    (unknown users are checked against a dummy secret and answered exactly like a wrong code),
//!    the user's key policy, then issuing: the code's time step is consumed and the certificate is
//!    recorded in the same commit, with `synchronous=FULL`, before the answer is sent. Two
//!    concurrent requests with one code serialise on the transaction: exactly one certificate.
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use zerospice_ca::attestation::{ParsePolicyError, PinPolicy, TouchPolicy};
use zerospice_ca::csr::{CsrError, CsrKeyKind};
use zerospice_ca::{
    CertificateAuthority, ClientCertRequest, DeviceName, IssuedCertificate, KeyProvenance,
    NameError, UserName, ValidatedCsr,
};
use zerospice_proto::enroll::{self as wire, EnrollRequest, KeyClaim};
use zerospice_proto::{ErrorCode, WireError};

use crate::store::{AuditEvent, NewCertificate, Scope, Store, StoreError, Tx, UserPolicy};
use crate::totp::{self, CodeRefusal, LockoutPolicy, TotpSecret};

/// What the gateway decided to refuse, with the reason the audit log records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    BadName(NameError),
    BadCsr(CsrError),
    Attestation(String),
    UnknownUser,
    WrongCode,
    ReusedCode,
    UserLocked(u64),
    AddressLocked(u64),
    HardwareRequired,
    KeyRule(String),
    Internal(String),
}

impl Refusal {
    /// The answer a remote caller gets. Unknown user, wrong code and reused code are the same.
    pub fn wire(&self) -> WireError {
        match self {
            Refusal::BadName(e) => WireError::new(ErrorCode::BadName, e.to_string()),
            Refusal::BadCsr(e) => WireError::new(ErrorCode::BadCsr, e.to_string()),
            Refusal::Attestation(m) => WireError::new(ErrorCode::AttestationRejected, m.clone()),
            Refusal::UnknownUser | Refusal::WrongCode | Refusal::ReusedCode => {
                WireError::new(ErrorCode::WrongCode, "wrong or expired code")
            }
            Refusal::UserLocked(s) | Refusal::AddressLocked(s) => WireError::rate_limited(*s),
            Refusal::HardwareRequired => WireError::new(
                ErrorCode::HardwareKeyRequired,
                "this user must enroll with a hardware key (YubiKey): use --key yubikey",
            ),
            Refusal::KeyRule(m) => WireError::new(ErrorCode::AttestationRejected, m.clone()),
            Refusal::Internal(_) => WireError::new(
                ErrorCode::Internal,
                "the gateway failed to issue a certificate (see its log)",
            ),
        }
    }

    /// The reason as the audit log records it.
    pub fn audit_reason(&self) -> String {
        match self {
            Refusal::BadName(e) => format!("bad_name: {e}"),
            Refusal::BadCsr(e) => format!("bad_csr: {e}"),
            Refusal::Attestation(m) => format!("attestation: {m}"),
            Refusal::UnknownUser => "unknown_user".into(),
            Refusal::WrongCode => "wrong_code".into(),
            Refusal::ReusedCode => "reused_code".into(),
            Refusal::UserLocked(s) => format!("user_locked ({s} s left)"),
            Refusal::AddressLocked(s) => format!("address_locked ({s} s left)"),
            Refusal::HardwareRequired => "hardware_key_required".into(),
            Refusal::KeyRule(m) => format!("key_rule: {m}"),
            Refusal::Internal(m) => format!("internal: {m}"),
        }
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal::Internal(e.to_string())
    }
}

/// A hardware key claim that attestation verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttestedKey {
    pub serial: u32,
    pub firmware: (u8, u8, u8),
    /// `never`, `once` or `always`.
    pub pin_policy: String,
    /// `never`, `always` or `cached`.
    pub touch_policy: String,
}

/// Verifies a hardware key claim against the CSR's public key.
pub trait AttestationCheck: Send + Sync {
    fn verify(
        &self,
        csr: &ValidatedCsr,
        attestation: &[u8],
        chain: &[Vec<u8>],
        now: OffsetDateTime,
    ) -> Result<AttestedKey, String>;
}

/// A request whose shape has been checked.
#[derive(Debug)]
pub struct Prepared {
    user: UserName,
    device: DeviceName,
    csr: ValidatedCsr,
    key: KeyProvenance,
    attested: Option<AttestedKey>,
}

pub struct Enrollment {
    pub store: Arc<Store>,
    pub ca: Arc<CertificateAuthority>,
    pub validity: time::Duration,
    pub user_policy: LockoutPolicy,
    pub address_policy: LockoutPolicy,
    pub access_addr: String,
    pub attestation: Arc<dyn AttestationCheck>,
    /// Compared against when the user does not exist, so the work done is the same.
    dummy_secret: TotpSecret,
}

impl Enrollment {
    pub fn new(
        store: Arc<Store>,
        ca: Arc<CertificateAuthority>,
        config: &crate::config::Config,
        access_addr: String,
        attestation: Arc<dyn AttestationCheck>,
    ) -> Result<Self, ring::error::Unspecified> {
        Ok(Self {
            store,
            ca,
            validity: time::Duration::days(config.certificates.validity_days.into()),
            user_policy: config.enrollment.user_policy(),
            address_policy: config.enrollment.address_policy(),
            access_addr,
            attestation,
            dummy_secret: TotpSecret::generate()?,
        })
    }

    /// Step 1: checks the request's shape against the nonce this stream was given.
    pub fn prepare(
        &self,
        req: &EnrollRequest,
        nonce: &[u8],
        now: OffsetDateTime,
    ) -> Result<Prepared, Refusal> {
        let user = UserName::new(&req.user).map_err(Refusal::BadName)?;
        let device = DeviceName::new(&req.device).map_err(Refusal::BadName)?;
        let csr = ValidatedCsr::parse(&req.csr).map_err(Refusal::BadCsr)?;
        csr.verify_proof(&wire::proof_message(nonce, &req.csr), &req.proof)
            .map_err(Refusal::BadCsr)?;
        let (key, attested) = match &req.key {
            KeyClaim::Software => (KeyProvenance::Software, None),
            KeyClaim::Yubikey { attestation, chain } => {
                let a = self
                    .attestation
                    .verify(&csr, attestation, chain, now)
                    .map_err(Refusal::Attestation)?;
                (KeyProvenance::Yubikey { serial: a.serial }, Some(a))
            }
        };
        Ok(Prepared {
            user,
            device,
            csr,
            key,
            attested,
        })
    }

    /// Step 2: the code, the counters, the policy and the certificate, in one transaction.
    /// Every outcome is audited in the same transaction.
    pub fn decide(
        &self,
        p: &Prepared,
        code: &str,
        peer: IpAddr,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, Refusal> {
        let t = now.unix_timestamp();
        let peer_key = peer.to_string();
        let result = self.store.write(|tx| {
            let outcome = self.decide_in(tx, p, code, &peer_key, now);
            let mut event = AuditEvent {
                user: Some(p.user.to_string()),
                device: Some(p.device.to_string()),
                peer: Some(peer_key.clone()),
                ..Default::default()
            };
            match &outcome {
                Ok(issued) => {
                    event.event = "enroll.issued";
                    event.serial = Some(issued.serial.to_string());
                    event.detail = serde_json::json!({
                        "key": p.key.kind(),
                        "hardware_serial": p.key.hardware_serial(),
                        "pin_policy": p.attested.as_ref().map(|a| a.pin_policy.clone()),
                        "touch_policy": p.attested.as_ref().map(|a| a.touch_policy.clone()),
                        "not_after": issued.not_after,
                    });
                }
                Err(Refusal::Internal(_)) => return Ok(outcome),
                Err(r) => {
                    event.event = "enroll.refused";
                    event.detail = serde_json::json!({ "reason": r.audit_reason() });
                }
            }
            tx.audit(t, &event)?;
            Ok::<_, StoreError>(outcome)
        });
        match result {
            Ok(outcome) => outcome,
            Err(e) => Err(Refusal::Internal(e.to_string())),
        }
    }

    fn decide_in(
        &self,
        tx: &Tx<'_>,
        p: &Prepared,
        code: &str,
        peer: &str,
        now: OffsetDateTime,
    ) -> Result<IssuedCertificate, Refusal> {
        let t = now.unix_timestamp();
        let addr_state = tx.failure(Scope::Address, peer)?;
        if let Some(left) = addr_state.locked_for(t) {
            return Err(Refusal::AddressLocked(left));
        }
        let user = tx.user(p.user.as_str())?;
        let user_state = match &user {
            Some(_) => {
                let st = tx.failure(Scope::User, p.user.as_str())?;
                if let Some(left) = st.locked_for(t) {
                    return Err(Refusal::UserLocked(left));
                }
                Some(st)
            }
            None => None,
        };

        let checked = match &user {
            Some(u) => totp::check_code(&u.totp_secret, code, t, u.last_totp_step),
            None => {
                let _ = totp::check_code(&self.dummy_secret, code, t, None);
                Err(CodeRefusal::Wrong)
            }
        };
        let (user, step) = match (user, checked) {
            (Some(u), Ok(step)) => (u, step),
            (user, Err(why)) => {
                tx.set_failure(
                    Scope::Address,
                    peer,
                    addr_state.after_failure(&self.address_policy, t),
                    t,
                )?;
                if let Some(st) = user_state {
                    tx.set_failure(
                        Scope::User,
                        p.user.as_str(),
                        st.after_failure(&self.user_policy, t),
                        t,
                    )?;
                }
                return Err(match (user.is_some(), why) {
                    (false, _) => Refusal::UnknownUser,
                    (true, CodeRefusal::Reused) => Refusal::ReusedCode,
                    (true, CodeRefusal::Wrong) => Refusal::WrongCode,
                });
            }
            (None, Ok(_)) => return Err(Refusal::UnknownUser),
        };

        let hardware = p.attested.as_ref().map(|a| HardwareKey {
            serial: a.serial,
            pin_policy: Some(&a.pin_policy),
            touch_policy: Some(&a.touch_policy),
        });
        check_key_rules(&user.policy, hardware, RuleCheck::Enrollment)?;

        let issued = self
            .ca
            .issue_client(&ClientCertRequest {
                csr: &p.csr,
                user: &p.user,
                device: &p.device,
                key: p.key,
                now,
                validity: self.validity,
            })
            .map_err(|e| Refusal::Internal(e.to_string()))?;
        tx.insert_certificate(&NewCertificate {
            serial: issued.serial.to_string(),
            user: p.user.to_string(),
            device: p.device.to_string(),
            fingerprint: issued.fingerprint.to_string(),
            key_fingerprint: issued.key_fingerprint.to_string(),
            key_kind: p.key.kind().to_string(),
            hardware_serial: p.key.hardware_serial(),
            pin_policy: p.attested.as_ref().map(|a| a.pin_policy.clone()),
            touch_policy: p.attested.as_ref().map(|a| a.touch_policy.clone()),
            not_before: issued.not_before,
            not_after: issued.not_after,
            issued_at: t,
            der: issued.der.clone(),
        })?;
        tx.consume_step(p.user.as_str(), step)?;
        tx.clear_failures(Scope::User, p.user.as_str())?;
        tx.clear_failures(Scope::Address, peer)?;
        Ok(issued)
    }

    /// Serves one enrollment stream: `Begin` -> `Challenge` -> `Request` -> answer.
    pub async fn handle_stream(
        self: &Arc<Self>,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        peer: IpAddr,
    ) {
        let outcome =
            tokio::time::timeout(STREAM_TIMEOUT, self.exchange(&mut send, &mut recv, peer))
                .await
                .unwrap_or_else(|_| {
                    Err(WireError::new(
                        ErrorCode::BadRequest,
                        "enrollment timed out: the request did not arrive in time",
                    ))
                });
        let reply = match outcome {
            Ok(enrolled) => wire::ServerMsg::Issued(enrolled),
            Err(e) => wire::ServerMsg::Error(e),
        };
        let _ = zerospice_proto::io::write_frame(
            &mut send,
            &reply,
            zerospice_proto::frame::MAX_RESPONSE_FRAME,
        )
        .await;
        let _ = send.finish();
        let _ = recv.stop(0u32.into());
        // Give the peer a moment to read the answer before the stream is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    }

    async fn exchange(
        self: &Arc<Self>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        peer: IpAddr,
    ) -> Result<wire::Enrolled, WireError> {
        use zerospice_proto::frame::{MAX_REQUEST_FRAME, MAX_RESPONSE_FRAME};
        use zerospice_proto::io::{read_frame, write_frame};
        let bad = |e: zerospice_proto::io::IoFrameError| WireError::bad_request(e);

        match read_frame::<wire::ClientMsg, _>(recv, MAX_REQUEST_FRAME)
            .await
            .map_err(bad)?
        {
            wire::ClientMsg::Begin { version } if version == zerospice_proto::PROTOCOL_VERSION => {}
            wire::ClientMsg::Begin { version } => {
                return Err(WireError::new(
                    ErrorCode::UnsupportedVersion,
                    format!(
                        "protocol version {version} is not supported (this gateway speaks {})",
                        zerospice_proto::PROTOCOL_VERSION
                    ),
                ))
            }
            wire::ClientMsg::Request(_) => {
                return Err(WireError::bad_request("expected begin"));
            }
        }
        let nonce = random_nonce().map_err(|_| Refusal::Internal("rng".into()).wire())?;
        write_frame(
            send,
            &wire::ServerMsg::Challenge {
                nonce: nonce.to_vec(),
            },
            MAX_RESPONSE_FRAME,
        )
        .await
        .map_err(bad)?;
        let req = match read_frame::<wire::ClientMsg, _>(recv, MAX_REQUEST_FRAME)
            .await
            .map_err(bad)?
        {
            wire::ClientMsg::Request(r) => r,
            wire::ClientMsg::Begin { .. } => {
                return Err(WireError::bad_request("expected request"));
            }
        };

        let this = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let now = OffsetDateTime::now_utc();
            let prepared = match this.prepare(&req, &nonce, now) {
                Ok(p) => p,
                Err(r) => {
                    // Shape failures are audited too (no counters move).
                    let _ = this.store.audit(
                        now.unix_timestamp(),
                        &AuditEvent {
                            event: "enroll.refused",
                            user: Some(req.user.chars().take(64).collect()),
                            peer: Some(peer.to_string()),
                            detail: serde_json::json!({ "reason": r.audit_reason() }),
                            ..Default::default()
                        },
                    );
                    return Err(r);
                }
            };
            let issued = this.decide(&prepared, req.code.expose(), peer, now)?;
            Ok(wire::Enrolled {
                user: prepared.user.to_string(),
                device: prepared.device.to_string(),
                serial: issued.serial.to_string(),
                certificate: issued.pem(),
                ca: this.ca.cert_pem(),
                not_after: issued.not_after,
                access: this.access_addr.clone(),
            })
        })
        .await
        .map_err(|e| Refusal::Internal(e.to_string()).wire())?
        .map_err(|r| {
            if let Refusal::Internal(m) = &r {
                tracing::error!(error = %m, "enrollment failed inside the gateway");
            }
            r.wire()
        })
    }
}

/// Bound on one enrollment exchange.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(20);

fn random_nonce() -> Result<[u8; wire::NONCE_LEN], ring::error::Unspecified> {
    let mut n = [0u8; wire::NONCE_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)?;
    Ok(n)
}

/// A hardware key as the key rules see it: the YubiKey's serial and the key's attested PIN and
/// touch policies (`None`: not recorded, for certificates issued before the gateway stored them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HardwareKey<'a> {
    pub serial: u32,
    pub pin_policy: Option<&'a str>,
    pub touch_policy: Option<&'a str>,
}

/// When the key rules are checked: the wording of the advice differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleCheck {
    Enrollment,
    Renewal,
}

/// The user's key policy against a key (`None`: a software key). Checked at enrollment once the
/// code is right, and again at each renewal (the rules may have changed since). Each refusal
/// names its rule, as the administrator set it (`user add --allow-serial/--min-pin-policy/
/// --min-touch-policy`). Fails closed: a rule or policy that does not parse, or a policy that was
/// not recorded while a rule asks for one, refuses.
pub fn check_key_rules(
    policy: &UserPolicy,
    key: Option<HardwareKey<'_>>,
    when: RuleCheck,
) -> Result<(), Refusal> {
    let rules = &policy.key_rules;
    let has_rules = !rules.allowed_serials.is_empty()
        || rules.min_pin_policy.is_some()
        || rules.min_touch_policy.is_some();
    let Some(key) = key else {
        // Rules about YubiKeys imply a YubiKey.
        if policy.require_hardware || has_rules {
            return Err(Refusal::HardwareRequired);
        }
        return Ok(());
    };
    if !rules.allowed_serials.is_empty() && !rules.allowed_serials.contains(&key.serial) {
        let allowed = rules
            .allowed_serials
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let advice = match when {
            RuleCheck::Enrollment => "",
            RuleCheck::Renewal => ": enroll again with one of them (--key yubikey)",
        };
        return Err(Refusal::KeyRule(format!(
            "key rule allow-serial failed: YubiKey {} is not one of the YubiKeys allowed for this user ({allowed}){advice}",
            key.serial
        )));
    }
    if let Some(min) = &rules.min_pin_policy {
        let want = parse_rule::<PinPolicy>("min-pin-policy", min)?;
        let Some(have) = key.pin_policy else {
            return Err(Refusal::KeyRule(format!(
                "key rule min-pin-policy failed: the key's PIN policy was not recorded when its certificate was issued, this user needs at least {want}: enroll again with --pin-policy {want}"
            )));
        };
        let have = parse_attested::<PinPolicy>("PIN", have)?;
        if !have.at_least(want) {
            return Err(Refusal::KeyRule(format!(
                "key rule min-pin-policy failed: the key's PIN policy is {have}, this user needs at least {want}: enroll again with --pin-policy {want}"
            )));
        }
    }
    if let Some(min) = &rules.min_touch_policy {
        let want = parse_rule::<TouchPolicy>("min-touch-policy", min)?;
        let Some(have) = key.touch_policy else {
            return Err(Refusal::KeyRule(format!(
                "key rule min-touch-policy failed: the key's touch policy was not recorded when its certificate was issued, this user needs at least {want}: enroll again with --touch-policy {want}"
            )));
        };
        let have = parse_attested::<TouchPolicy>("touch", have)?;
        if !have.at_least(want) {
            return Err(Refusal::KeyRule(format!(
                "key rule min-touch-policy failed: the key's touch policy is {have}, this user needs at least {want}: enroll again with --touch-policy {want}"
            )));
        }
    }
    Ok(())
}

/// A stored rule value; one that does not parse refuses (fail closed), it never means "any".
fn parse_rule<P>(rule: &str, value: &str) -> Result<P, Refusal>
where
    P: FromStr<Err = ParsePolicyError>,
{
    value.parse().map_err(|e: ParsePolicyError| {
        Refusal::KeyRule(format!(
            "key rule {rule} cannot be checked: the stored rule is not valid ({e}): the administrator must set it again (zerospice-gateway user set --{rule})"
        ))
    })
}

/// An attested policy value; one that does not parse refuses (fail closed).
fn parse_attested<P>(kind: &str, value: &str) -> Result<P, Refusal>
where
    P: FromStr<Err = ParsePolicyError>,
{
    value.parse().map_err(|e: ParsePolicyError| {
        Refusal::KeyRule(format!(
            "the key's {kind} policy cannot be checked against this user's key rules ({e})"
        ))
    })
}

/// Verifies YubiKey PIV attestations against the configured roots (Yubico's built in, plus
/// extra roots from `[attestation] extra_roots`).
pub struct YubikeyAttestation {
    pub roots: zerospice_ca::attestation::AttestationRoots,
}

impl AttestationCheck for YubikeyAttestation {
    fn verify(
        &self,
        csr: &ValidatedCsr,
        attestation: &[u8],
        chain: &[Vec<u8>],
        now: OffsetDateTime,
    ) -> Result<AttestedKey, String> {
        // zerospice-enroll only generates ECDSA keys on a YubiKey. An RSA key has no legitimate
        // source here, and those of firmware 4.2.6 to 4.3.4 can be factored (ROCA; the verifier
        // refuses them too): refuse every RSA hardware claim before looking at the attestation.
        if let CsrKeyKind::Rsa { bits } = csr.kind() {
            return Err(format!(
                "the YubiKey attestation was refused: the key is RSA-{bits}, and only ECDSA keys (P-256 or P-384) are accepted from a YubiKey (RSA keys of YubiKey firmware 4.2.6 to 4.3.4 can be factored, ROCA): enroll again with zerospice-enroll --key yubikey"
            ));
        }
        let a = zerospice_ca::attestation::verify(attestation, chain, csr.spki(), &self.roots, now)
            .map_err(|e| format!("the YubiKey attestation was refused: {e}"))?;
        Ok(AttestedKey {
            serial: a.serial,
            firmware: a.firmware,
            pin_policy: a.pin_policy.as_str().to_owned(),
            touch_policy: a.touch_policy.as_str().to_owned(),
        })
    }
}

/// An attestation check that refuses every hardware claim (no roots configured).
pub struct NoAttestation;

impl AttestationCheck for NoAttestation {
    fn verify(
        &self,
        _: &ValidatedCsr,
        _: &[u8],
        _: &[Vec<u8>],
        _: OffsetDateTime,
    ) -> Result<AttestedKey, String> {
        Err("this gateway trusts no attestation roots".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::UserPolicy;
    use zerospice_ca::keys::{KeyAlgorithm, Signer, SoftwareKey};
    use zerospice_proto::Redacted;

    struct Fixture {
        _dir: tempfile::TempDir,
        svc: Enrollment,
        secret_bytes: Vec<u8>,
    }

    fn fixture(policy: UserPolicy) -> Fixture {
        fixture_with(policy, Arc::new(NoAttestation))
    }

    /// Says every hardware claim is YubiKey 7, firmware 5.4.3, PIN once, touch never.
    const FAKE_YUBIKEY: FakeYubikeyWith = FakeYubikeyWith("once", "never");

    fn fixture_with(policy: UserPolicy, attestation: Arc<dyn AttestationCheck>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::create(&dir.path().join("state.db")).unwrap());
        let (ca, _) = CertificateAuthority::generate(OffsetDateTime::now_utc()).unwrap();
        let secret = TotpSecret::generate().unwrap();
        store.add_user("alice", &secret, &policy, 0).unwrap();
        let svc = Enrollment {
            store,
            ca: Arc::new(ca),
            validity: time::Duration::days(7),
            user_policy: LockoutPolicy::USER,
            address_policy: LockoutPolicy::ADDRESS,
            access_addr: "127.0.0.1:7443".into(),
            attestation,
            dummy_secret: TotpSecret::generate().unwrap(),
        };
        Fixture {
            _dir: dir,
            secret_bytes: secret.expose_bytes().to_vec(),
            svc,
        }
    }

    fn request(user: &str, nonce: &[u8]) -> EnrollRequest {
        let key = SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
        let csr = zerospice_ca::csr::build_csr(&key, user).unwrap();
        let proof = key.sign(&wire::proof_message(nonce, &csr)).unwrap();
        EnrollRequest {
            user: user.into(),
            code: Redacted::new(String::new()),
            device: "laptop".into(),
            csr,
            key: KeyClaim::Software,
            proof,
        }
    }

    fn at(t: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(t).unwrap()
    }

    const T0: i64 = 1_800_000_000;
    const PEER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9));

    impl Fixture {
        fn code(&self, t: i64) -> String {
            TotpSecret::from_bytes(self.secret_bytes.clone()).code_at_step(totp::step_of(t))
        }
        fn enroll(&self, user: &str, code: &str, t: i64) -> Result<IssuedCertificate, Refusal> {
            let nonce = [9u8; 32];
            let p = self.svc.prepare(&request(user, &nonce), &nonce, at(t))?;
            self.svc.decide(&p, code, PEER, at(t))
        }
    }

    #[test]
    fn right_code_issues_once() {
        let f = fixture(UserPolicy::default());
        let code = f.code(T0);
        let issued = f.enroll("alice", &code, T0).unwrap();
        let rec = f
            .svc
            .store
            .certificate(&issued.serial.to_string())
            .unwrap()
            .unwrap();
        assert_eq!(
            (rec.user.as_str(), rec.device.as_str()),
            ("alice", "laptop")
        );
        assert_eq!(f.enroll("alice", &code, T0 + 5), Err(Refusal::ReusedCode));
        assert_eq!(
            f.enroll("alice", &code, T0 + 5).unwrap_err().wire().message,
            "wrong or expired code"
        );
        // The next step's code works.
        f.enroll("alice", &f.code(T0 + 30), T0 + 30).unwrap();
    }

    #[test]
    fn unknown_user_looks_like_a_wrong_code() {
        let f = fixture(UserPolicy::default());
        let unknown = f.enroll("mallory", &f.code(T0), T0).unwrap_err();
        let wrong = f.enroll("alice", "000000", T0).unwrap_err();
        assert_eq!(unknown, Refusal::UnknownUser);
        assert_eq!(unknown.wire(), wrong.wire());
        let log = f.svc.store.audit_log(10, None).unwrap();
        let reasons: Vec<_> = log
            .iter()
            .map(|r| r.detail["reason"].as_str().unwrap_or("").to_string())
            .collect();
        assert!(reasons.contains(&"unknown_user".to_string()));
        assert!(reasons.contains(&"wrong_code".to_string()));
    }

    #[test]
    fn lockout_after_five_failures_even_for_the_right_code() {
        let f = fixture(UserPolicy::default());
        for i in 0..5 {
            assert_eq!(
                f.enroll("alice", "000000", T0 + i),
                Err(Refusal::WrongCode),
                "attempt {i}"
            );
        }
        let locked = f.enroll("alice", &f.code(T0 + 5), T0 + 5).unwrap_err();
        assert_eq!(locked, Refusal::UserLocked(60 - 1));
        assert_eq!(locked.wire().message, "too many attempts, retry after 59 s");
        // After the lockout, the right code works and resets the counter.
        f.enroll("alice", &f.code(T0 + 64), T0 + 64).unwrap();
    }

    #[test]
    fn address_lockout_covers_many_user_names() {
        let f = fixture(UserPolicy::default());
        for i in 0..10 {
            let _ = f.enroll(&format!("u{i}"), "123456", T0);
        }
        assert_eq!(
            f.enroll("alice", &f.code(T0), T0),
            Err(Refusal::AddressLocked(60))
        );
    }

    #[test]
    fn hardware_requirement_refuses_software_keys_without_burning_the_code() {
        let f = fixture(UserPolicy {
            require_hardware: true,
            ..Default::default()
        });
        let code = f.code(T0);
        let e = f.enroll("alice", &code, T0).unwrap_err();
        assert_eq!(e, Refusal::HardwareRequired);
        assert_eq!(e.wire().code, ErrorCode::HardwareKeyRequired);
        assert!(f.svc.store.certificates(None).unwrap().is_empty());
    }

    fn enroll_hardware(f: &Fixture, t: i64) -> Result<IssuedCertificate, Refusal> {
        let nonce = [9u8; 32];
        let mut req = request("alice", &nonce);
        req.key = KeyClaim::Yubikey {
            attestation: vec![0x30],
            chain: vec![vec![0x30]],
        };
        let p = f.svc.prepare(&req, &nonce, at(t))?;
        f.svc.decide(&p, &f.code(t), PEER, at(t))
    }

    #[test]
    fn key_rules_name_the_rule_that_failed() {
        let rules = |r: crate::store::KeyRules| UserPolicy {
            require_hardware: true,
            key_rules: r,
            ..Default::default()
        };
        let cases = [
            (
                crate::store::KeyRules {
                    allowed_serials: vec![8, 9],
                    ..Default::default()
                },
                "key rule allow-serial failed: YubiKey 7 is not one of the YubiKeys allowed for this user (8, 9)",
            ),
            (
                crate::store::KeyRules {
                    min_pin_policy: Some("always".into()),
                    ..Default::default()
                },
                "key rule min-pin-policy failed: the key's PIN policy is once, this user needs at least always: enroll again with --pin-policy always",
            ),
            (
                crate::store::KeyRules {
                    min_touch_policy: Some("cached".into()),
                    ..Default::default()
                },
                "key rule min-touch-policy failed: the key's touch policy is never, this user needs at least cached: enroll again with --touch-policy cached",
            ),
        ];
        for (r, want) in cases {
            let f = fixture_with(rules(r), Arc::new(FAKE_YUBIKEY));
            let e = enroll_hardware(&f, T0).unwrap_err();
            assert_eq!(e.wire().message, want);
            assert_eq!(e.wire().code, ErrorCode::AttestationRejected);
            assert!(f.svc.store.certificates(None).unwrap().is_empty());
        }
        // Rules that the key meets: issued, marked as held by YubiKey 7.
        let f = fixture_with(
            rules(crate::store::KeyRules {
                allowed_serials: vec![7],
                min_pin_policy: Some("once".into()),
                min_touch_policy: None,
            }),
            Arc::new(FAKE_YUBIKEY),
        );
        let issued = enroll_hardware(&f, T0).unwrap();
        let id = zerospice_ca::Identity::from_der(&issued.der).unwrap();
        assert_eq!(id.key, KeyProvenance::Yubikey { serial: 7 });
        let rec = f
            .svc
            .store
            .certificate(&issued.serial.to_string())
            .unwrap()
            .unwrap();
        assert_eq!(rec.hardware_serial, Some(7));
        assert_eq!(rec.pin_policy.as_deref(), Some("once"));
        assert_eq!(rec.touch_policy.as_deref(), Some("never"));
        // A rule about YubiKeys refuses software keys even without --require-hardware-key.
        let f = fixture(UserPolicy {
            key_rules: crate::store::KeyRules {
                min_touch_policy: Some("always".into()),
                ..Default::default()
            },
            ..Default::default()
        });
        assert_eq!(
            f.enroll("alice", &f.code(T0), T0),
            Err(Refusal::HardwareRequired)
        );
    }

    /// Says every hardware claim is YubiKey 7 with the given PIN and touch policies.
    struct FakeYubikeyWith(&'static str, &'static str);

    impl AttestationCheck for FakeYubikeyWith {
        fn verify(
            &self,
            _: &ValidatedCsr,
            _: &[u8],
            _: &[Vec<u8>],
            _: OffsetDateTime,
        ) -> Result<AttestedKey, String> {
            Ok(AttestedKey {
                serial: 7,
                firmware: (5, 4, 3),
                pin_policy: self.0.into(),
                touch_policy: self.1.into(),
            })
        }
    }

    #[test]
    fn unknown_rule_or_attested_policy_strings_refuse() {
        let rules = |pin: &str, touch: Option<&str>| UserPolicy {
            require_hardware: true,
            key_rules: crate::store::KeyRules {
                min_pin_policy: Some(pin.into()),
                min_touch_policy: touch.map(Into::into),
                ..Default::default()
            },
            ..Default::default()
        };
        // A stored rule that is not a policy name: refused, not "anything goes".
        let f = fixture_with(rules("sometimes", None), Arc::new(FAKE_YUBIKEY));
        let e = enroll_hardware(&f, T0).unwrap_err();
        assert_eq!(
            e.wire().message,
            "key rule min-pin-policy cannot be checked: the stored rule is not valid (unknown PIN policy 'sometimes': use never, once or always): the administrator must set it again (zerospice-gateway user set --min-pin-policy)"
        );
        assert!(f.svc.store.certificates(None).unwrap().is_empty());
        let f = fixture_with(rules("never", Some("")), Arc::new(FAKE_YUBIKEY));
        let e = enroll_hardware(&f, T0).unwrap_err();
        assert!(
            e.wire()
                .message
                .starts_with("key rule min-touch-policy cannot be checked"),
            "{e:?}"
        );
        // An attested value that is not a policy name: refused even against the weakest rule.
        for (pin, touch) in [("bogus", "never"), ("once", "sometimes")] {
            let f = fixture_with(
                rules("never", Some("never")),
                Arc::new(FakeYubikeyWith(pin, touch)),
            );
            let e = enroll_hardware(&f, T0).unwrap_err();
            assert!(
                e.wire()
                    .message
                    .contains("policy cannot be checked against this user's key rules"),
                "{e:?}"
            );
            assert!(f.svc.store.certificates(None).unwrap().is_empty());
        }
        // Valid names still compare by strength.
        let f = fixture_with(
            rules("never", Some("never")),
            Arc::new(FakeYubikeyWith("always", "always")),
        );
        enroll_hardware(&f, T0).unwrap();
    }

    #[test]
    fn key_rules_at_renewal_check_serials_and_recorded_policies() {
        let policy = |allowed: Vec<u32>, pin: Option<&str>, touch: Option<&str>| UserPolicy {
            key_rules: crate::store::KeyRules {
                allowed_serials: allowed,
                min_pin_policy: pin.map(Into::into),
                min_touch_policy: touch.map(Into::into),
            },
            ..Default::default()
        };
        let yk = |serial, pin, touch| {
            Some(HardwareKey {
                serial,
                pin_policy: pin,
                touch_policy: touch,
            })
        };
        let check = |p: &UserPolicy, k| check_key_rules(p, k, RuleCheck::Renewal);
        let msg = |r: Result<(), Refusal>| match r {
            Err(Refusal::KeyRule(m)) => m,
            other => panic!("not a key rule refusal: {other:?}"),
        };
        // No rules: anything, software keys included.
        assert_eq!(check(&UserPolicy::default(), None), Ok(()));
        assert_eq!(check(&UserPolicy::default(), yk(7, None, None)), Ok(()));
        // A serial no longer allowed.
        assert_eq!(
            msg(check(&policy(vec![8], None, None), yk(7, Some("once"), Some("never")))),
            "key rule allow-serial failed: YubiKey 7 is not one of the YubiKeys allowed for this user (8): enroll again with one of them (--key yubikey)"
        );
        assert_eq!(
            check(&policy(vec![7, 8], None, None), yk(7, None, None)),
            Ok(())
        );
        // Policies recorded at enrollment, compared with today's minimum.
        assert_eq!(
            msg(check(&policy(vec![], None, Some("always")), yk(7, Some("once"), Some("cached")))),
            "key rule min-touch-policy failed: the key's touch policy is cached, this user needs at least always: enroll again with --touch-policy always"
        );
        assert_eq!(
            msg(check(&policy(vec![], Some("always"), None), yk(7, Some("once"), Some("cached")))),
            "key rule min-pin-policy failed: the key's PIN policy is once, this user needs at least always: enroll again with --pin-policy always"
        );
        assert_eq!(
            check(
                &policy(vec![7], Some("once"), Some("cached")),
                yk(7, Some("always"), Some("always"))
            ),
            Ok(())
        );
        // Not recorded (issued before the gateway stored policies): refused while a minimum is set.
        assert_eq!(
            msg(check(&policy(vec![], Some("once"), None), yk(7, None, None))),
            "key rule min-pin-policy failed: the key's PIN policy was not recorded when its certificate was issued, this user needs at least once: enroll again with --pin-policy once"
        );
        assert_eq!(
            msg(check(&policy(vec![], None, Some("cached")), yk(7, Some("once"), None))),
            "key rule min-touch-policy failed: the key's touch policy was not recorded when its certificate was issued, this user needs at least cached: enroll again with --touch-policy cached"
        );
        // Rules about YubiKeys refuse a software key.
        for p in [
            policy(vec![7], None, None),
            policy(vec![], Some("once"), None),
            UserPolicy {
                require_hardware: true,
                ..Default::default()
            },
        ] {
            assert_eq!(check(&p, None), Err(Refusal::HardwareRequired));
        }
        // The wording at enrollment is unchanged.
        assert_eq!(
            msg(check_key_rules(
                &policy(vec![8], None, None),
                yk(7, Some("once"), Some("never")),
                RuleCheck::Enrollment
            )),
            "key rule allow-serial failed: YubiKey 7 is not one of the YubiKeys allowed for this user (8)"
        );
    }

    #[test]
    fn rsa_hardware_claims_are_refused() {
        let csr = ValidatedCsr::parse(include_bytes!("../../ca/fixtures/rsa2048.csr.der")).unwrap();
        let check = YubikeyAttestation {
            roots: zerospice_ca::attestation::AttestationRoots::yubico(),
        };
        let e = check
            .verify(&csr, &[0x30], &[vec![0x30]], at(T0))
            .unwrap_err();
        assert_eq!(
            e,
            "the YubiKey attestation was refused: the key is RSA-2048, and only ECDSA keys (P-256 or P-384) are accepted from a YubiKey (RSA keys of YubiKey firmware 4.2.6 to 4.3.4 can be factored, ROCA): enroll again with zerospice-enroll --key yubikey"
        );
    }

    #[test]
    fn proof_must_cover_this_nonce() {
        let f = fixture(UserPolicy::default());
        let req = request("alice", &[1u8; 32]);
        assert_eq!(
            f.svc.prepare(&req, &[2u8; 32], at(T0)).unwrap_err(),
            Refusal::BadCsr(CsrError::BadProof)
        );
        let mut bad = request("alice", &[1u8; 32]);
        bad.csr = b"junk".to_vec();
        assert_eq!(
            f.svc.prepare(&bad, &[1u8; 32], at(T0)).unwrap_err(),
            Refusal::BadCsr(CsrError::Malformed)
        );
        let mut name = request("alice", &[1u8; 32]);
        name.user = "alice,O=x".into();
        assert!(matches!(
            f.svc.prepare(&name, &[1u8; 32], at(T0)).unwrap_err(),
            Refusal::BadName(_)
        ));
        let mut hw = request("alice", &[1u8; 32]);
        hw.key = KeyClaim::Yubikey {
            attestation: vec![],
            chain: vec![],
        };
        assert!(matches!(
            f.svc.prepare(&hw, &[1u8; 32], at(T0)).unwrap_err(),
            Refusal::Attestation(_)
        ));
    }
}
