//! Enrollment, end to end with the real binaries on loopback: `zerospice-gateway init`,
//! `user add`, `serve`, and `zerospice-enroll`, checked with independent tools (openssl, oathtool).
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use zerospice_ca::Fingerprint;
use zerospice_proto::enroll::{self as wire, ClientMsg, EnrollRequest, KeyClaim, ServerMsg};
use zerospice_proto::invite::Invitation;
use zerospice_tests::harness::{
    self, enroll, mode, oathtool, run_bounded, wrong_code, GatewayHome,
};

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn openssl(args: &[&str]) -> String {
    let mut c = Command::new("openssl");
    c.args(args);
    let out = run_bounded(c, Duration::from_secs(20)).unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn enroll_end_to_end_with_an_oathtool_code_and_openssl_checks() {
    let home = GatewayHome::init(&[]).unwrap();
    let alice = home.add_user("alice", &["--vm", "100"]).unwrap();
    assert!(alice
        .otpauth_uri
        .starts_with("otpauth://totp/ZeroSpice:alice?secret="));
    assert!(alice.otpauth_uri.ends_with("&issuer=ZeroSpice"));
    let _gw = home.serve().unwrap();

    let profile = home.path().join("profile-alice");
    let code = oathtool(&alice.secret_base32).unwrap();
    let out = enroll(&alice.invitation, &code, "laptop", &profile).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Enrolled alice@laptop"), "{stdout}");
    assert!(stdout.contains("certificate valid until"), "{stdout}");

    // An independent verifier agrees with the chain and the profile.
    let ca = home.path().join("ca.crt");
    let crt = profile.join("client.crt");
    let verify = openssl(&[
        "verify",
        "-CAfile",
        ca.to_str().unwrap(),
        "-purpose",
        "sslclient",
        crt.to_str().unwrap(),
    ]);
    assert!(verify.trim().ends_with(": OK"), "{verify}");
    let text = openssl(&["x509", "-in", crt.to_str().unwrap(), "-noout", "-text"]);
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    assert!(!text.contains("TLS Web Server Authentication"), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(text.contains("Subject: CN = alice"), "{text}");
    assert!(
        text.contains("URI:zerospice://user/alice/device/laptop, URI:zerospice://key/software"),
        "{text}"
    );
    assert!(text.contains("Digital Signature"), "{text}");

    // The same code a second time is refused.
    let again = enroll(&alice.invitation, &code, "laptop2", &home.path().join("p2")).unwrap();
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("error: enrollment failed: wrong or expired code"),
        "{}",
        stderr(&again)
    );
    let audit = home.run_ok(&["--json", "audit"]).unwrap();
    assert!(audit.contains("\"reused_code\""), "{audit}");

    // State files: secrets 0600, directories 0700.
    assert_eq!(mode(home.path()), 0o700);
    for f in ["ca.key", "state.db", "state.db-wal", "gateway.toml"] {
        assert_eq!(mode(&home.path().join(f)), 0o600, "{f}");
    }
    if home.path().join("state.db-shm").exists() {
        assert_eq!(mode(&home.path().join("state.db-shm")), 0o600);
    }
    assert_eq!(mode(&profile), 0o700);
    for f in ["client.key", "profile.toml"] {
        assert_eq!(mode(&profile.join(f)), 0o600, "{f}");
    }

    // The admin sees the certificate.
    let certs: serde_json::Value =
        serde_json::from_str(&home.run_ok(&["--json", "cert", "list"]).unwrap()).unwrap();
    assert_eq!(certs.as_array().unwrap().len(), 1);
    assert_eq!(certs[0]["user"], "alice");
    assert_eq!(certs[0]["device"], "laptop");
    assert_eq!(certs[0]["key_kind"], "software");
}

#[test]
fn six_wrong_codes_lock_the_user_out_and_unknown_users_look_the_same() {
    let home = GatewayHome::init(&[]).unwrap();
    let bob = home.add_user("bob", &[]).unwrap();
    let _gw = home.serve().unwrap();
    let wrong = wrong_code(&bob.secret_base32).unwrap();

    for i in 0..5 {
        let out = enroll(
            &bob.invitation,
            &wrong,
            "d",
            &home.path().join(format!("p{i}")),
        )
        .unwrap();
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("wrong or expired code"),
            "attempt {i}: {}",
            stderr(&out)
        );
    }
    // The sixth attempt is refused by the lockout, and so is the right code now.
    let sixth = enroll(&bob.invitation, &wrong, "d", &home.path().join("p5")).unwrap();
    assert!(
        stderr(&sixth).contains("too many attempts, retry after 1 min"),
        "{}",
        stderr(&sixth)
    );
    let right = oathtool(&bob.secret_base32).unwrap();
    let locked = enroll(&bob.invitation, &right, "d", &home.path().join("p6")).unwrap();
    assert!(!locked.status.success());
    assert!(
        stderr(&locked).contains("too many attempts, retry after"),
        "{}",
        stderr(&locked)
    );

    // A user that does not exist gets exactly the wrong-code answer.
    let mut inv: Invitation = bob.invitation.parse().unwrap();
    inv.user = "mallory".into();
    let ghost = enroll(&inv.to_string(), &right, "d", &home.path().join("p7")).unwrap();
    let expected = "error: enrollment failed: wrong or expired code: check the code";
    assert!(stderr(&ghost).starts_with(expected), "{}", stderr(&ghost));

    // The counters live on the server and survive a restart.
    drop(_gw);
    let _gw2 = home.serve().unwrap();
    let after = enroll(&bob.invitation, &right, "d", &home.path().join("p8")).unwrap();
    assert!(
        stderr(&after).contains("too many attempts"),
        "{}",
        stderr(&after)
    );

    // The audit trail says which was which.
    let audit = home.run_ok(&["--json", "audit"]).unwrap();
    assert!(audit.contains("\"wrong_code\""));
    assert!(audit.contains("\"unknown_user\""));
    assert!(audit.contains("user_locked"));
}

#[test]
fn a_gateway_with_another_ca_is_refused_before_anything_is_sent() {
    let real = GatewayHome::init(&[]).unwrap();
    let alice = real.add_user("alice", &[]).unwrap();
    let impostor = GatewayHome::init(&[]).unwrap();
    impostor.add_user("alice", &[]).unwrap();
    let _gw = impostor.serve().unwrap();

    // The invitation pins the real CA but the address leads to the impostor.
    let mut inv: Invitation = alice.invitation.parse().unwrap();
    inv.gateway = format!("127.0.0.1:{}", impostor.enroll_port);
    let code = oathtool(&alice.secret_base32).unwrap();
    let profile = real.path().join("p");
    let out = enroll(&inv.to_string(), &code, "d", &profile).unwrap();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("is not the one in your invitation"), "{err}");
    assert!(err.contains("Nothing was sent"), "{err}");
    assert!(err.contains(&inv.fingerprint_text()), "{err}");
    let impostor_fp = impostor.run_ok(&["user", "invite", "alice"]).unwrap();
    let impostor_fp = impostor_fp.trim().rsplit('/').next().unwrap().to_owned();
    assert!(err.contains(&impostor_fp), "{err}");
    // Nothing reached the impostor's enrollment logic, and nothing was stored locally.
    let audit = impostor.run_ok(&["--json", "audit"]).unwrap();
    assert!(!audit.contains("enroll."), "{audit}");
    assert!(!profile.join("client.key").exists());
}

/// A raw enrollment client speaking the wire protocol directly.
struct Raw {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
}

impl Raw {
    async fn connect(port: u16, pin: Fingerprint) -> Raw {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let endpoint = zerospice_enroll::tls::client_endpoint(addr).unwrap();
        let cfg = zerospice_enroll::tls::enroll_client_config(
            zerospice_enroll::tls::PinnedCaVerifier::new(pin),
        )
        .unwrap();
        let conn = endpoint
            .connect_with(cfg, addr, zerospice_proto::GATEWAY_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        Raw {
            _endpoint: endpoint,
            conn,
        }
    }

    /// Sends raw bytes (then finishes the stream) and returns the gateway's one answer.
    async fn send_raw(&self, bytes: &[u8]) -> ServerMsg {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        let _ = send.finish();
        tokio::time::timeout(
            Duration::from_secs(10),
            zerospice_proto::io::read_frame::<ServerMsg, _>(&mut recv, 1 << 20),
        )
        .await
        .expect("answer in time")
        .expect("an error frame, not a dropped stream")
    }

    async fn challenge(&self) -> (quinn::SendStream, quinn::RecvStream, Vec<u8>) {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        zerospice_proto::io::write_frame(&mut send, &ClientMsg::Begin { version: 1 }, 1 << 16)
            .await
            .unwrap();
        match zerospice_proto::io::read_frame::<ServerMsg, _>(&mut recv, 1 << 20)
            .await
            .unwrap()
        {
            ServerMsg::Challenge { nonce } => (send, recv, nonce),
            other => panic!("{other:?}"),
        }
    }
}

fn pin_of(home: &GatewayHome) -> Fingerprint {
    let pem = std::fs::read_to_string(home.path().join("ca.crt")).unwrap();
    Fingerprint::of(&zerospice_ca::pem::first_certificate(&pem).unwrap())
}

fn error_message(m: ServerMsg) -> String {
    match m {
        ServerMsg::Error(e) => e.message,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_frames_get_errors_and_the_gateway_keeps_serving() {
    let home = GatewayHome::init(&[]).unwrap();
    let carol = home.add_user("carol", &[]).unwrap();
    let _gw = home.serve().unwrap();
    let raw = Raw::connect(home.enroll_port, pin_of(&home)).await;

    let garbage = error_message(raw.send_raw(b"\x00\x00\x00\x05\xff\xfe\xfd\xfc\xfb").await);
    assert!(
        garbage.starts_with("bad request: malformed message"),
        "{garbage}"
    );
    let oversized = error_message(raw.send_raw(b"\xff\xff\xff\xff").await);
    assert_eq!(
        oversized,
        "bad request: frame of 4294967295 bytes exceeds the limit of 65536 bytes"
    );
    let truncated = error_message(raw.send_raw(b"\x00\x00\x00\x64{\"type\":").await);
    assert_eq!(
        truncated,
        "bad request: stream closed before a complete frame"
    );
    let empty = error_message(raw.send_raw(b"").await);
    assert_eq!(empty, "bad request: stream closed before a complete frame");
    let text = error_message(raw.send_raw(b"GET / HTTP/1.1\r\n\r\n").await);
    assert!(text.contains("exceeds the limit"), "{text}");
    let out_of_order = zerospice_proto::frame::encode(
        &ClientMsg::Request(EnrollRequest {
            user: "carol".into(),
            code: "000000".into(),
            device: "d".into(),
            csr: vec![],
            key: KeyClaim::Software,
            proof: vec![],
        }),
        1 << 16,
    )
    .unwrap();
    assert_eq!(
        error_message(raw.send_raw(&out_of_order).await),
        "bad request: expected begin"
    );
    let version =
        zerospice_proto::frame::encode(&ClientMsg::Begin { version: 99 }, 1 << 16).unwrap();
    assert_eq!(
        error_message(raw.send_raw(&version).await),
        "protocol version 99 is not supported (this gateway speaks 1)"
    );
    // A CSR that is not one, after a proper challenge.
    let (mut send, mut recv, _nonce) = raw.challenge().await;
    let req = ClientMsg::Request(EnrollRequest {
        user: "carol".into(),
        code: "123456".into(),
        device: "d".into(),
        csr: b"not a csr".to_vec(),
        key: KeyClaim::Software,
        proof: vec![1],
    });
    zerospice_proto::io::write_frame(&mut send, &req, 1 << 16)
        .await
        .unwrap();
    let answer = zerospice_proto::io::read_frame::<ServerMsg, _>(&mut recv, 1 << 20)
        .await
        .unwrap();
    assert_eq!(
        error_message(answer),
        "the CSR is not a valid DER PKCS#10 request"
    );

    // Still serving: a real enrollment succeeds.
    let code = oathtool(&carol.secret_base32).unwrap();
    let out = enroll(&carol.invitation, &code, "d", &home.path().join("p")).unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn csr_asking_for_ca_another_name_and_extra_ekus_gets_the_fixed_profile() {
    let home = GatewayHome::init(&[]).unwrap();
    let dave = home.add_user("dave", &[]).unwrap();
    let _gw = home.serve().unwrap();
    let raw = Raw::connect(home.enroll_port, pin_of(&home)).await;
    let (mut send, mut recv, nonce) = raw.challenge().await;

    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::CodeSigning,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.subject_alt_names = vec![
        rcgen::SanType::URI("zerospice://user/admin/device/x".try_into().unwrap()),
        rcgen::SanType::DnsName("*.example.com".try_into().unwrap()),
    ];
    let csr = p.serialize_request(&key).unwrap().der().to_vec();
    let proof = rcgen::SigningKey::sign(&key, &wire::proof_message(&nonce, &csr)).unwrap();
    let req = ClientMsg::Request(EnrollRequest {
        user: "dave".into(),
        code: zerospice_proto::Redacted::new(oathtool(&dave.secret_base32).unwrap()),
        device: "box".into(),
        csr,
        key: KeyClaim::Software,
        proof,
    });
    zerospice_proto::io::write_frame(&mut send, &req, 1 << 16)
        .await
        .unwrap();
    let enrolled = match zerospice_proto::io::read_frame::<ServerMsg, _>(&mut recv, 1 << 20)
        .await
        .unwrap()
    {
        ServerMsg::Issued(e) => e,
        other => panic!("{other:?}"),
    };
    let crt = home.path().join("dave.crt");
    std::fs::write(&crt, &enrolled.certificate).unwrap();
    let text = openssl(&["x509", "-in", crt.to_str().unwrap(), "-noout", "-text"]);
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("Subject: CN = dave"), "{text}");
    assert!(!text.contains("admin"), "{text}");
    assert!(!text.contains("example.com"), "{text}");
    assert!(!text.contains("Code Signing"), "{text}");
    assert!(!text.contains("Server Authentication"), "{text}");
    let eku_line = text
        .lines()
        .skip_while(|l| !l.contains("Extended Key Usage"))
        .nth(1)
        .unwrap()
        .trim()
        .to_owned();
    assert_eq!(eku_line, "TLS Web Client Authentication");
    assert!(
        text.contains("URI:zerospice://user/dave/device/box"),
        "{text}"
    );
}

#[test]
fn twenty_concurrent_enrollments_with_one_code_yield_exactly_one_certificate() {
    let home = GatewayHome::init(&[]).unwrap();
    let erin = home.add_user("erin", &[]).unwrap();
    let _gw = home.serve().unwrap();
    let code = oathtool(&erin.secret_base32).unwrap();
    let mut children = Vec::new();
    for i in 0..20 {
        let profile = home.path().join(format!("p{i}"));
        let mut c = harness::enroll_cmd(&erin.invitation, &code, &format!("d{i}"), &profile);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        children.push((profile, c.spawn().unwrap()));
    }
    let mut ok = 0;
    for (profile, child) in children {
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            ok += 1;
            assert!(profile.join("client.crt").exists());
        } else {
            let e = stderr(&out);
            assert!(
                e.contains("wrong or expired code") || e.contains("too many attempts"),
                "{e}"
            );
        }
    }
    assert_eq!(ok, 1, "exactly one enrollment may succeed");
    let certs: serde_json::Value =
        serde_json::from_str(&home.run_ok(&["--json", "cert", "list", "--all"]).unwrap()).unwrap();
    assert_eq!(certs.as_array().unwrap().len(), 1);
}

#[test]
fn sigkill_during_a_burst_keeps_every_certificate_a_client_received() {
    const N: usize = 48;
    let home = GatewayHome::init(&[]).unwrap();
    let users: Vec<_> = (0..N)
        .map(|i| home.add_user(&format!("u{i}"), &[]).unwrap())
        .collect();
    let codes: Vec<_> = users
        .iter()
        .map(|u| oathtool(&u.secret_base32).unwrap())
        .collect();
    let mut gw = home.serve().unwrap();
    let mut children = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let profile = home.path().join(format!("p{i}"));
        let mut c = harness::enroll_cmd(&u.invitation, &codes[i], "d", &profile);
        c.stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        children.push((profile, c.spawn().unwrap()));
    }
    // Kill the gateway as soon as the first client holds a certificate.
    let start = Instant::now();
    while !children
        .iter()
        .any(|(p, _)| p.join("profile.toml").exists())
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no enrollment completed"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    gw.kill9();
    // Clients still talking to the dead gateway give up; bound the wait.
    std::thread::sleep(Duration::from_millis(500));
    for (_, c) in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }

    let received: Vec<String> = children
        .iter()
        .filter(|(p, _)| p.join("profile.toml").exists())
        .map(|(p, _)| {
            let pem = std::fs::read_to_string(p.join("client.crt")).unwrap();
            let der = zerospice_ca::pem::first_certificate(&pem).unwrap();
            zerospice_ca::Identity::from_der(&der)
                .unwrap()
                .serial
                .to_string()
        })
        .collect();
    assert!(!received.is_empty());
    assert!(
        received.len() < N,
        "the kill came after the whole burst ({N} enrollments): not a test of a crash mid-burst"
    );

    // The database opens, is intact, and holds every certificate a client received.
    let store = zerospice_gateway::store::Store::open(&home.db()).unwrap();
    assert_eq!(store.integrity_check().unwrap(), "ok");
    for serial in &received {
        assert!(
            store.certificate(serial).unwrap().is_some(),
            "certificate {serial} was received by a client but is not in the database"
        );
    }
    eprintln!(
        "{} of {N} enrollments completed before SIGKILL; all are in the database",
        received.len()
    );
    // And the gateway starts again on it.
    drop(store);
    let _gw = home.serve().unwrap();
}

#[test]
fn loose_permissions_are_refused_with_a_clear_message() {
    use std::os::unix::fs::PermissionsExt;
    let home = GatewayHome::init(&[]).unwrap();
    let key = home.path().join("ca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = home.run_err(&["serve"]).unwrap();
    assert!(
        err.contains(&format!(
            "{} has mode 0644: it holds secrets and must not be accessible by other users (run: chmod 600 {})",
            key.display(),
            key.display()
        )),
        "{err}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = home.run_err(&["user", "list"]).unwrap();
    assert!(err.contains("has mode 0755"), "{err}");
    assert!(err.contains("chmod 700"), "{err}");
}

#[test]
fn init_refuses_to_overwrite_a_ca() {
    let home = GatewayHome::init(&[]).unwrap();
    let err = home.run_err(&["init"]).unwrap();
    assert!(err.contains("refusing to overwrite its CA"), "{err}");
    let wildcard = tempfile::tempdir().unwrap();
    let mut c = Command::new(harness::bin("zerospice-gateway"));
    c.arg("--dir")
        .arg(wildcard.path().join("g"))
        .args(["init", "--listen", "0.0.0.0"]);
    let out = run_bounded(c, Duration::from_secs(10)).unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("is a wildcard address"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn revoke_takes_any_serial_spelling_and_user_removal_revokes() {
    let home = GatewayHome::init(&[]).unwrap();
    let f = home.add_user("frank", &[]).unwrap();
    let _gw = home.serve().unwrap();
    let profile = home.path().join("p");
    let out = enroll(
        &f.invitation,
        &oathtool(&f.secret_base32).unwrap(),
        "d",
        &profile,
    )
    .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let certs: serde_json::Value =
        serde_json::from_str(&home.run_ok(&["--json", "cert", "list"]).unwrap()).unwrap();
    let serial = certs[0]["serial"].as_str().unwrap().to_owned();
    // openssl's spelling: uppercase with colons.
    let spelled: Vec<String> = serial
        .as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_uppercase())
        .collect();
    let colon = spelled.join(":");
    let out = home
        .run_ok(&["cert", "revoke", &colon, "--reason", "lost laptop"])
        .unwrap();
    assert!(out.contains(&format!("Revoked {serial}")), "{out}");
    let out = home
        .run_ok(&["cert", "revoke", &format!("0x{serial}")])
        .unwrap();
    assert!(out.contains("was already revoked"), "{out}");
    let err = home.run_err(&["cert", "revoke", "zz:top"]).unwrap();
    assert!(err.contains("is not a certificate serial"), "{err}");
    let err = home.run_err(&["cert", "revoke", "abcdef"]).unwrap();
    assert!(err.contains("no certificate with serial abcdef"), "{err}");
    let all = home.run_ok(&["cert", "list", "--all"]).unwrap();
    assert!(
        all.contains("revoked") && all.contains("lost laptop"),
        "{all}"
    );
    // Removing a user revokes what remains and they can no longer enroll.
    home.run_ok(&["user", "remove", "frank"]).unwrap();
    let users = home.run_ok(&["user", "list"]).unwrap();
    assert!(!users.contains("frank"), "{users}");
}
