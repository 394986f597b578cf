//! Attacks on the access endpoint and the tunnel, each refused with a clear error and logged.
//! Real gateway binary, Proxmox stand-in, real agent binary or raw QUIC clients on loopback.
use std::os::unix::process::CommandExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use zerospice_agent::client::{Client, Credentials};
use zerospice_ca::{KeyAlgorithm, Signer, SoftwareKey};
use zerospice_enroll::profile::ProfileDir;
use zerospice_proto::access::{Request, Response};
use zerospice_proto::{ErrorCode, SessionId, VmId};
use zerospice_tests::harness::run_bounded;
use zerospice_tests::lab::{
    agent_err, client_cert, decode, echo_round_trip, new_key, raw_connect, raw_request, Connected,
    Lab, WAIT,
};

async fn client(profile: &std::path::Path) -> Client {
    let creds = Credentials::load(ProfileDir::new(profile)).unwrap();
    Client::connect(&creds).await.unwrap()
}

fn ca_der(lab: &Lab) -> Vec<u8> {
    lab.ca().unwrap().cert_der().to_vec()
}

fn refused_in_audit(lab: &Lab, needle: &str) -> bool {
    lab.audit().unwrap().iter().any(|r| {
        (r["event"] == "access.refused" || r["event"] == "channel.refused")
            && r["detail"]["reason"]
                .as_str()
                .is_some_and(|s| s.contains(needle))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handshakes_without_a_proper_client_certificate_are_refused() {
    let lab = Lab::start().await.unwrap();
    let alice = lab.user("alice", &["--vm", "100"]).unwrap();
    let ca = ca_der(&lab);

    // 1. No client certificate at all.
    let result = match raw_connect(lab.access_addr(), &ca, None).await {
        Err(e) => Err(e),
        Ok(c) => raw_request(&c, &Request::Hello).await,
    };
    let e = result.unwrap_err();
    assert_eq!(
        e,
        "aborted by peer: the cryptographic handshake failed: error 116: peer sent no certificates"
    );

    // 2. A certificate with the right profile from another CA.
    let (other_ca, _) =
        zerospice_ca::CertificateAuthority::generate(OffsetDateTime::now_utc()).unwrap();
    let key = new_key();
    let foreign = client_cert(
        &other_ca,
        &key,
        "alice",
        "laptop",
        OffsetDateTime::now_utc(),
        time::Duration::days(1),
    )
    .unwrap();
    let forged = lab.profile_with(&alice, "forged", &foreign, &key).unwrap();
    let e = agent_err(&forged, &["list"]).unwrap();
    assert!(
        e.contains("error: the gateway refused your certificate (unknown CA): your certificate was issued by another gateway's CA; enroll with this gateway"),
        "{e}"
    );

    // 3. The gateway's own kind of server certificate, presented as a client certificate.
    let server_key = SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap();
    let server = lab
        .ca()
        .unwrap()
        .issue_server(
            &server_key,
            zerospice_proto::GATEWAY_SERVER_NAME,
            OffsetDateTime::now_utc(),
            time::Duration::days(1),
        )
        .unwrap();
    let signer: Arc<dyn Signer> = Arc::new(server_key);
    let result = match raw_connect(lab.access_addr(), &ca, Some((server.der.clone(), signer))).await
    {
        Err(e) => Err(e),
        Ok(c) => raw_request(&c, &Request::Hello).await,
    };
    let e = result.unwrap_err();
    assert_eq!(
        e,
        "aborted by peer: the cryptographic handshake failed: error 43: invalid peer certificate: certificate does not allow extended key usage for client authentication, allows server authentication"
    );

    // 4. An expired certificate of this CA (the agent refuses it before connecting; a raw
    //    client is refused by the gateway's TLS).
    let key = new_key();
    let old = client_cert(
        &lab.ca().unwrap(),
        &key,
        "alice",
        "laptop",
        OffsetDateTime::now_utc() - time::Duration::days(10),
        time::Duration::days(1),
    )
    .unwrap();
    lab.record(&old, "alice", "laptop").unwrap();
    let expired = lab.profile_with(&alice, "expired", &old, &key).unwrap();
    let e = agent_err(&expired, &["list"]).unwrap();
    assert!(e.contains("error: your certificate expired on "), "{e}");
    assert!(
        e.contains("enroll again with a new code (zerospice-enroll)"),
        "{e}"
    );
    let signer: Arc<dyn Signer> = Arc::new(key);
    let result = match raw_connect(lab.access_addr(), &ca, Some((old.der.clone(), signer))).await {
        Err(e) => Err(e),
        Ok(c) => raw_request(&c, &Request::Hello).await,
    };
    let e = result.unwrap_err();
    assert!(
        e.starts_with("aborted by peer: the cryptographic handshake failed: error 45: invalid peer certificate: certificate expired"),
        "{e}"
    );

    // 5. A certificate of this CA that the database does not know (a CA key restored without
    //    its database, say).
    let key = new_key();
    let unknown = client_cert(
        &lab.ca().unwrap(),
        &key,
        "alice",
        "ghost",
        OffsetDateTime::now_utc(),
        time::Duration::days(1),
    )
    .unwrap();
    let ghost = lab.profile_with(&alice, "ghost", &unknown, &key).unwrap();
    let e = agent_err(&ghost, &["list"]).unwrap();
    assert!(
        e.contains("error: the gateway refused this device: this gateway does not know your certificate: enroll again"),
        "{e}"
    );

    // Each refusal is in the audit trail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let audit = lab.audit().unwrap();
    let refused: Vec<_> = audit
        .iter()
        .filter(|r| r["event"] == "access.refused")
        .collect();
    assert!(refused.len() >= 5, "{refused:#?}");
    assert!(refused_in_audit(&lab, "unknown_certificate"));
    assert!(refused_in_audit(&lab, "handshake"));
    // The gateway still serves the enrolled agent.
    let c = client(&alice).await;
    assert_eq!(c.hello.user, "alice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_while_connected_refuses_new_streams_and_closes_within_3_seconds() {
    let lab = Lab::start().await.unwrap();
    let alice = lab.user("alice", &["--vm", "100"]).unwrap();
    let mut conn = Connected::start(&alice, 100).unwrap();
    let open = conn.channel().await.unwrap();

    let c = client(&alice).await;
    lab.admin(&[
        "cert",
        "revoke",
        "--user",
        "alice",
        "--reason",
        "laptop stolen",
    ])
    .unwrap();
    let revoked_at = Instant::now();
    // A new stream is refused at once, with the reason.
    let err = c.list_vms().await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("your certificate was revoked on ") && text.contains("(laptop stolen)"),
        "{text}"
    );
    // Existing connections close within 3 s: the agent running the session exits with the
    // reason, and its open channel is cut.
    let status = tokio::task::block_in_place(|| conn.proc.wait_exit(Duration::from_secs(5)));
    let elapsed = revoked_at.elapsed();
    assert!(status.is_some_and(|s| !s.success()), "{}", conn.proc.log());
    assert!(elapsed < Duration::from_secs(3), "closed after {elapsed:?}");
    assert!(
        conn.proc.log().contains("your certificate was revoked on "),
        "{}",
        conn.proc.log()
    );
    let cut = tokio::time::timeout(WAIT, echo_round_trip(open, b"after revoke")).await;
    assert!(
        !matches!(cut, Ok(Ok(ref b)) if b == b"after revoke"),
        "{cut:?}"
    );
    // A new agent start is refused.
    let e = agent_err(&alice, &["list"]).unwrap();
    assert!(
        e.contains("error: the gateway refused this device: your certificate was revoked"),
        "{e}"
    );
    assert!(lab
        .audit()
        .unwrap()
        .iter()
        .any(|r| r["event"] == "session.ended" && r["detail"]["reason"] == "revoked"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sessions_are_bound_to_their_certificate_ticket_and_window() {
    let mut lab = Lab::init(PveLab::config().await, &[]).await.unwrap();
    // A short opening window so that expiry is testable.
    let cfg_path = lab.home.path().join("gateway.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg = cfg.replace("channel_window_secs = 30", "channel_window_secs = 2");
    assert!(cfg.contains("channel_window_secs = 2"), "{cfg}");
    std::fs::write(&cfg_path, cfg).unwrap();
    lab.serve().unwrap();
    let alice = lab.user("alice", &["--vm", "100", "--vm", "101"]).unwrap();
    let bob = lab.user("bob", &["--vm", "100", "--vm", "104"]).unwrap();
    let a = client(&alice).await;
    let b = client(&bob).await;

    let grant_b = b.open_session(VmId::new(104).unwrap()).await.unwrap();
    let head_b = format!(
        "CONNECT {0}:{1} HTTP/1.0\r\nHost: {0}:{1}\r\n\r\n",
        grant_b.host, grant_b.tls_port
    );
    // Alice's certificate on Bob's session: refused like an unknown session.
    let e = a.open_tunnel(&grant_b.session, &head_b).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SessionUnknown));
    assert_eq!(
        e.to_string(),
        "no such session for this certificate: open a new one"
    );
    // An unknown session id.
    let e = a
        .open_tunnel(&SessionId::from_bytes([7; 16]), &head_b)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SessionUnknown));

    // Alice's own session, with a CONNECT for Bob's ticket, for another host, with a Host
    // header that differs from the request line.
    let grant_a = a.open_session(VmId::new(100).unwrap()).await.unwrap();
    let mine = format!("{}:{}", grant_a.host, grant_a.tls_port);
    for (target, host, want) in [
        (
            format!("{}:{}", grant_b.host, grant_b.tls_port),
            format!("{}:{}", grant_b.host, grant_b.tls_port),
            "CONNECT refused: the CONNECT target is not this session's ticket",
        ),
        (
            "10.0.0.1:8006".to_string(),
            "10.0.0.1:8006".to_string(),
            "CONNECT refused: the CONNECT target is not this session's ticket",
        ),
        (
            mine.clone(),
            "10.0.0.1:8006".to_string(),
            "CONNECT refused: the Host header is not this session's ticket",
        ),
    ] {
        let head = format!("CONNECT {target} HTTP/1.0\r\nHost: {host}\r\n\r\n");
        let e = a.open_tunnel(&grant_a.session, &head).await.unwrap_err();
        assert_eq!(e.code(), Some(ErrorCode::ConnectMismatch), "{e}");
        assert_eq!(e.to_string(), want);
    }
    // Garbage instead of a CONNECT head.
    let e = a
        .open_tunnel(&grant_a.session, "GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "CONNECT refused: only CONNECT is supported, not \"GET\""
    );
    assert_eq!(lab.pve.connects().len(), 0, "nothing reached spiceproxy");

    // The right CONNECT works, and keeps the session usable past its window while open.
    let head_a = format!("CONNECT {mine} HTTP/1.0\r\nHost: {mine}\r\n\r\n");
    let (mut s, mut r) = a.open_tunnel(&grant_a.session, &head_a).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    r.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (s2, _r2) = a.open_tunnel(&grant_a.session, &head_a).await.unwrap();
    drop((s, r, s2));

    // Bob's session had no channel: its window has passed.
    let e = b.open_tunnel(&grant_b.session, &head_b).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SessionExpired));
    assert_eq!(
        e.to_string(),
        "the session expired before the viewer connected: open a new one"
    );
    assert!(refused_in_audit(&lab, "session_of_other_user (bob)"));
    assert!(refused_in_audit(&lab, "connect_mismatch"));
}

/// The stand-in's example cluster pointed at a fresh echo server.
struct PveLab;
impl PveLab {
    async fn config() -> zerospice_tests::pve::PveConfig {
        // The echo server must outlive the stand-in: leak it for the test's duration.
        let echo = Box::leak(Box::new(
            zerospice_tests::echo::EchoServer::start().await.unwrap(),
        ));
        Lab::example_config(echo).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_console_per_vm_and_limits_per_certificate() {
    let lab = Lab::start().await.unwrap();
    let alice = lab.user("alice", &["--vm", "100"]).unwrap();
    let bob = lab.user("bob", &["--vm", "100"]).unwrap();
    let conn = Connected::start(&alice, 100).unwrap();
    let _open = conn.channel().await.unwrap();

    // Bob is told the VM is in use, not by whom.
    let e = agent_err(&bob, &["connect", "100", "--no-viewer"]).unwrap();
    assert!(
        e.contains("error: VM 100 is in use by another user since ")
            && e.contains("Try again when they have closed their viewer"),
        "{e}"
    );
    assert!(!e.contains("alice"), "{e}");
    // Alice's second device is told it is her own other device.
    let key = new_key();
    let second = client_cert(
        &lab.ca().unwrap(),
        &key,
        "alice",
        "desktop",
        OffsetDateTime::now_utc(),
        time::Duration::days(1),
    )
    .unwrap();
    lab.record(&second, "alice", "desktop").unwrap();
    let desktop = lab.profile_with(&alice, "desktop", &second, &key).unwrap();
    let e = agent_err(&desktop, &["connect", "100", "--no-viewer"]).unwrap();
    assert!(
        e.contains("error: VM 100 is already open from your device laptop since ")
            && e.contains("close that viewer first (opening it here would disconnect it)"),
        "{e}"
    );
    let audit = lab.audit().unwrap();
    assert!(audit.iter().any(|r| r["event"] == "session.refused"
        && r["user"] == "bob"
        && r["detail"]["holder_user"] == "alice"));

    // At most 4 connections per certificate (the default).
    let creds = Credentials::load(ProfileDir::new(&bob)).unwrap();
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(Client::connect(&creds).await.unwrap());
    }
    let e = Client::connect(&creds).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "the gateway refused this device: too many connections with your certificate (at most 4): close other ZeroSpice agents on this device"
    );
    for c in &held {
        c.close().await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    Client::connect(&creds).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_certificate_expiring_while_connected_is_cut_at_not_after() {
    let lab = Lab::start().await.unwrap();
    let alice = lab.user("alice", &["--vm", "100"]).unwrap();
    let key = new_key();
    // Valid until about 3 s from now (issued "a day ago minus 3 s", for one day).
    let issued = client_cert(
        &lab.ca().unwrap(),
        &key,
        "alice",
        "laptop",
        OffsetDateTime::now_utc() - time::Duration::days(1) + time::Duration::seconds(3),
        time::Duration::days(1),
    )
    .unwrap();
    lab.record(&issued, "alice", "laptop").unwrap();
    let short = lab.profile_with(&alice, "short", &issued, &key).unwrap();
    let c = client(&short).await;
    let start = Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(10), c.closed())
        .await
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    assert!(
        e.to_string()
            .starts_with("the gateway refused this device: your certificate expired on "),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_local_user_cannot_use_the_agents_proxy() {
    let lab = Lab::start().await.unwrap();
    let alice = lab.user("alice", &["--vm", "100"]).unwrap();
    let mut conn = Connected::start(&alice, 100).unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'CONNECT {a} HTTP/1.0\\r\\nHost: {a}\\r\\n\\r\\n' >&3; timeout 5 cat <&3",
        port = conn.proxy.port(),
        a = conn.authority()
    );
    let mut cmd = std::process::Command::new("bash");
    cmd.args(["-c", &script]).uid(65534).gid(65534);
    let out = tokio::task::block_in_place(|| run_bounded(cmd, Duration::from_secs(15))).unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.starts_with("HTTP/1.0 403 Forbidden"),
        "{answer:?} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(answer.contains("this ZeroSpice proxy serves only the user who started it"));
    assert_eq!(lab.pve.connects().len(), 0, "nothing reached spiceproxy");
    // The agent logs the refusal; under load the line can lag the answer a little.
    let logged = tokio::task::block_in_place(|| {
        conn.proc.wait_for(
            "refused: refused a connection from another local user (uid 65534)",
            Duration::from_secs(10),
        )
    });
    assert!(logged.is_ok(), "{}", conn.proc.log());
    // Its own user still gets through.
    let got = echo_round_trip(conn.channel().await.unwrap(), b"mine")
        .await
        .unwrap();
    assert_eq!(got, b"mine");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_proxmox_token_never_reaches_an_agent() {
    let lab = Lab::start().await.unwrap();
    let alice = lab
        .user("alice", &["--vm", "100", "--vm", "101", "--power"])
        .unwrap();
    let secret = {
        let t = std::fs::read_to_string(lab.files.path().join("token")).unwrap();
        t.trim().to_owned()
    };
    let token_id = lab.pve.token_id().to_owned();
    let creds = Credentials::load(ProfileDir::new(&alice)).unwrap();
    let c = Client::connect(&creds).await.unwrap();
    let conn = c.connection().clone();
    let vm = VmId::new(100).unwrap();
    let mut seen: Vec<u8> = Vec::new();
    let requests = [
        Request::Hello,
        Request::ListVms,
        Request::VmStatus { vmid: vm },
        Request::OpenSession { vmid: vm },
        Request::Power {
            vmid: VmId::new(101).unwrap(),
            action: zerospice_proto::access::PowerAction::Start,
        },
    ];
    for r in &requests {
        seen.extend(raw_request(&conn, r).await.unwrap());
    }
    // The same with Proxmox answering errors that echo the request's Authorization header.
    lab.pve.set_fault(zerospice_tests::pve::Fault::ServerError {
        message: "internal error".into(),
    });
    for r in &requests[1..] {
        let bytes = raw_request(&conn, r).await.unwrap();
        match decode(&bytes).unwrap() {
            Response::Error(e) => assert_eq!(e.code, ErrorCode::ProxmoxError, "{e:?}"),
            other => panic!("{other:?}"),
        }
        seen.extend(bytes);
    }
    let text = String::from_utf8_lossy(&seen);
    assert!(
        !text.contains(&secret),
        "the token secret reached the agent"
    );
    assert!(!text.contains("PVEAPIToken"), "{text}");
    assert!(
        !text.contains(&token_id),
        "the token id reached the agent: {text}"
    );
    // Nor the real spiceproxy address.
    assert!(
        !text.contains(&lab.pve.spiceproxy_addr().to_string()),
        "{text}"
    );
    assert!(!text.contains(":3128"), "{text}");
    // And the gateway's own log redacted what Proxmox echoed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = lab.gateway_log();
    assert!(log.contains("Proxmox call failed"), "{log}");
    assert!(
        !log.contains(&secret),
        "the token secret is in the gateway log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxmox_faults_give_precise_messages_and_others_keep_being_served() {
    let mut lab = Lab::init(PveLab::config().await, &[]).await.unwrap();
    let cfg_path = lab.home.path().join("gateway.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    let cfg = cfg.replace("timeout_secs = 10", "timeout_secs = 2");
    assert!(cfg.contains("timeout_secs = 2"), "{cfg}");
    std::fs::write(&cfg_path, cfg).unwrap();
    lab.serve().unwrap();
    let alice = lab.user("alice", &["--vm", "100"]).unwrap();
    let bob = lab.user("bob", &["--vm", "104"]).unwrap();
    use zerospice_tests::pve::Fault;

    let cases = [
        (
            Fault::Unauthorized,
            "error: Proxmox refused the gateway's API token; the administrator can run `zerospice-gateway check`",
        ),
        (
            Fault::ServerError { message: "storage failure".into() },
            "error: Proxmox failed the request; the details are in the gateway's log",
        ),
        (
            Fault::Slow(Duration::from_secs(4)),
            "error: Proxmox did not answer the gateway within 2 s; try again later",
        ),
    ];
    for (fault, want) in cases {
        // Only alice's VM misbehaves; the VM list (cluster/resources) too for the first cases.
        lab.pve.set_fault_for("/nodes/pve/qemu/100", fault.clone());
        let e = agent_err(&alice, &["connect", "100", "--no-viewer"]).unwrap();
        assert!(e.contains(want), "{fault:?}: {e}");
        // Bob's VM on the other node is served meanwhile.
        let conn = Connected::start(&bob, 104).unwrap();
        let got = echo_round_trip(conn.channel().await.unwrap(), b"bob")
            .await
            .unwrap();
        assert_eq!(got, b"bob");
        drop(conn);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    lab.pve.clear_fault();

    // The spiceproxy refuses the ticket: the viewer's channel gets 502 with the reason.
    lab.pve.set_fault(Fault::SpiceproxyUnauthorized);
    let conn = Connected::start(&alice, 100).unwrap();
    let (_, answer) =
        zerospice_tests::lab::connect_through(conn.proxy, &conn.authority(), &conn.authority())
            .await
            .unwrap();
    assert!(answer.starts_with("HTTP/1.0 502 Bad Gateway"), "{answer}");
    assert!(
        answer.contains("the Proxmox spiceproxy refused the channel (401 invalid ticket): the session's ticket is no longer valid (tickets live 40 s); open a new session"),
        "{answer}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(conn.proc.log().contains("refused: the gateway refused a channel: the Proxmox spiceproxy refused the channel (401"), "{}", conn.proc.log());
    // The administrator's log says precisely what happened.
    let log = lab.gateway_log();
    assert!(log.contains("Proxmox refused the API token (401"), "{log}");
    assert!(log.contains("Proxmox did not answer within 2 s"), "{log}");
    assert!(log.contains("spiceproxy answered 401"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_access_streams_get_errors_and_the_gateway_keeps_serving() {
    let lab = Lab::start().await.unwrap();
    let alice = lab.user("alice", &["--vm", "100"]).unwrap();
    let c = client(&alice).await;
    let conn = c.connection().clone();
    for bad in [
        b"\xff\xff\xff\xff".to_vec(),
        b"\x00\x00\x00\x00".to_vec(),
        b"\x00\x00\x00\x05{\"op\"".to_vec(),
        b"\x00\x00\x00\x11{\"op\":\"proxy_me\"}".to_vec(),
        b"garbage".to_vec(),
    ] {
        let (mut s, mut r) = conn.open_bi().await.unwrap();
        s.write_all(&bad).await.unwrap();
        let _ = s.finish();
        let bytes = tokio::time::timeout(WAIT, r.read_to_end(1 << 20))
            .await
            .unwrap()
            .unwrap();
        match decode(&bytes).unwrap() {
            Response::Error(e) => {
                assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
                assert!(e.message.starts_with("bad request: "), "{e:?}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(c.list_vms().await.unwrap().len(), 1);
}
