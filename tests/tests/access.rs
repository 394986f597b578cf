//! Mutual-TLS access and the certificate-bound tunnel, end to end with the real binaries:
//! `zerospice-gateway serve` against the Proxmox stand-in, `zerospice-agent` with enrolled
//! profiles, and clients speaking CONNECT to the agent's local proxy as remote-viewer does.
use std::time::Duration;

use zerospice_tests::lab::{agent_err, agent_ok, connect_through, echo_round_trip, Connected, Lab};

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_lists_its_vms_and_tunnels_several_channels_byte_exact() {
    let lab = Lab::start().await.unwrap();
    // alice may use 100 by id, the `lab` pool (102, 104, template 105, container 200) and the
    // `windows` tag (100 again); 101 and 103 are not hers.
    let alice = lab
        .user(
            "alice",
            &["--vm", "100", "--pool", "lab", "--tag", "windows"],
        )
        .unwrap();

    let out = agent_ok(&alice, &["--json", "list"]).unwrap();
    let vms: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ids: Vec<u64> = vms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["vmid"].as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [100, 102, 104],
        "templates, containers and other VMs are hidden"
    );
    assert_eq!(vms[0]["name"], "win11");
    assert_eq!(vms[0]["status"], "running");
    assert_eq!(vms[0]["spice"], true);
    assert_eq!(vms[1]["spice"], false, "102 has a std display");
    assert_eq!(vms[2]["node"], "pve2");
    assert_eq!(vms[0]["power"], false);
    let text = agent_ok(&alice, &["list"]).unwrap();
    assert!(text.contains("win11"), "{text}");

    // Four channels at once (as remote-viewer opens main, display, inputs, cursor), 1 MiB each
    // way, through agent -> QUIC -> gateway -> spiceproxy -> echo.
    let conn = Connected::start(&alice, 100).unwrap();
    let mut tasks = Vec::new();
    for seed in 0..4u8 {
        let s = conn.channel().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let data = pattern(1 << 20, seed);
            let got = echo_round_trip(s, &data).await.unwrap();
            assert!(
                got == data,
                "channel {seed}: {} bytes back, not byte-exact",
                got.len()
            );
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(lab.echo.connections(), 4);
    // The gateway dialled the stand-in's spiceproxy with the session's ticket, once per channel.
    let connects = lab.pve.connects();
    assert_eq!(connects.len(), 4, "{connects:?}");

    // A VM on another node goes through the same spiceproxy (it relays in the cluster).
    drop(conn);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let conn = Connected::start(&alice, 104).unwrap();
    assert!(conn.host.contains(":104:pve2:"), "{}", conn.host);
    let got = echo_round_trip(conn.channel().await.unwrap(), b"hello 104")
        .await
        .unwrap();
    assert_eq!(got, b"hello 104");
    drop(conn);

    // Each channel is in the audit trail with its byte counts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let audit = lab.audit().unwrap();
    let closed: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|r| r["event"] == "channel.closed" && r["detail"]["vmid"] == 100)
        .collect();
    assert_eq!(closed.len(), 4, "{audit:#?}");
    for r in closed {
        assert_eq!(r["user"], "alice");
        assert_eq!(r["device"], "laptop");
        assert_eq!(r["detail"]["bytes_up"], 1 << 20);
        assert_eq!(r["detail"]["bytes_down"], 1 << 20);
        assert!(r["detail"]["duration_ms"].is_u64());
    }
    assert!(audit.iter().any(|r| r["event"] == "session.ended"
        && r["detail"]["vmid"] == 100
        && r["detail"]["channels"] == 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_outside_the_policy_are_refused_with_clear_errors() {
    let lab = Lab::start().await.unwrap();
    let bob = lab.user("bob", &["--vm", "100", "--vm", "101"]).unwrap();

    // A VM outside the policy and a VM that does not exist look the same.
    let e = agent_err(&bob, &["connect", "103", "--no-viewer"]).unwrap();
    assert!(
        e.contains("error: VM 103 does not exist or is not available to you"),
        "{e}"
    );
    let e = agent_err(&bob, &["status", "999"]).unwrap();
    assert!(
        e.contains("error: VM 999 does not exist or is not available to you"),
        "{e}"
    );
    // A stopped VM, and power actions without the grant.
    let e = agent_err(&bob, &["connect", "101", "--no-viewer"]).unwrap();
    assert!(
        e.contains("error: VM 101 (debian12) is stopped: ask your administrator to start it"),
        "{e}"
    );
    let e = agent_err(&bob, &["start", "101"]).unwrap();
    assert!(
        e.contains(
            "error: you may not start or shut down VM 101: ask your administrator for power rights"
        ),
        "{e}"
    );
    assert!(
        !lab.pve
            .calls()
            .iter()
            .any(|c| c.method == "POST" && c.path.contains("/status/")),
        "no power call reached Proxmox"
    );
    // With the grant, start works and the VM can then be opened.
    lab.admin(&[
        "user", "set", "bob", "--vm", "100", "--vm", "101", "--power",
    ])
    .unwrap();
    let out = agent_ok(&bob, &["start", "101"]).unwrap();
    assert!(out.contains("VM 101: start done."), "{out}");
    let conn = Connected::start(&bob, 101).unwrap();
    assert!(conn.host.contains(":101:"));
    drop(conn);

    let audit = lab.audit().unwrap();
    assert!(audit
        .iter()
        .any(|r| r["event"] == "vm.power_refused" && r["user"] == "bob"));
    assert!(audit
        .iter()
        .any(|r| r["event"] == "vm.power" && r["detail"]["ok"] == true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_local_proxy_serves_only_its_own_session() {
    let lab = Lab::start().await.unwrap();
    let alice = lab.user("alice", &["--vm", "100", "--vm", "101"]).unwrap();
    let conn = Connected::start(&alice, 100).unwrap();

    // Another target entirely, and another VM's ticket shape: refused by the agent itself.
    let (_, answer) = connect_through(conn.proxy, "192.168.1.10:22", "192.168.1.10:22")
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.0 403 Forbidden"), "{answer}");
    assert!(answer.contains("this ZeroSpice proxy only reaches its own SPICE session"));
    let other = conn.authority().replace(":100:", ":101:");
    let (_, answer) = connect_through(conn.proxy, &other, &other).await.unwrap();
    assert!(answer.starts_with("HTTP/1.0 403"), "{answer}");
    // The right request line with another Host.
    let (_, answer) = connect_through(conn.proxy, &conn.authority(), "evil:1")
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.0 403"), "{answer}");
    assert_eq!(lab.pve.connects().len(), 0, "nothing reached spiceproxy");

    // The real channel still works.
    let got = echo_round_trip(conn.channel().await.unwrap(), b"ok")
        .await
        .unwrap();
    assert_eq!(got, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agent_renews_its_certificate_before_it_expires() {
    use time::OffsetDateTime;
    use zerospice_tests::lab::{client_cert, new_key};
    let lab = Lab::start().await.unwrap();
    let alice = lab.user("alice", &["--vm", "100"]).unwrap();
    // A certificate issued 6 days ago for 7 days: one day left, inside the 48 h window.
    let key = new_key();
    let old = client_cert(
        &lab.ca().unwrap(),
        &key,
        "alice",
        "laptop",
        OffsetDateTime::now_utc() - time::Duration::days(6),
        time::Duration::days(7),
    )
    .unwrap();
    lab.record(&old, "alice", "laptop").unwrap();
    let profile = lab.profile_with(&alice, "aging", &old, &key).unwrap();

    let out = zerospice_tests::lab::agent(&profile, &["list"]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Renewed this device's certificate: valid until "),
        "{err}"
    );

    // The profile now holds a new certificate for the same key, valid 7 days, that an
    // independent verifier accepts.
    let dir = zerospice_enroll::profile::ProfileDir::new(&profile);
    let p = dir.load().unwrap();
    assert_ne!(p.serial, old.serial.to_string());
    let (der, id) = dir.certificate().unwrap();
    assert_eq!(id.key_fingerprint, old.key_fingerprint);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    assert!(id.not_after - now > 6 * 86_400, "{}", id.not_after - now);
    assert_eq!(p.not_after, id.not_after);
    let crt = dir.file("client.crt");
    let ca = lab.home.path().join("ca.crt");
    let verify = std::process::Command::new("openssl")
        .args([
            "verify",
            "-CAfile",
            ca.to_str().unwrap(),
            "-purpose",
            "sslclient",
        ])
        .arg(&crt)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    assert_ne!(der, old.der);
    let audit = lab.audit().unwrap();
    assert!(audit.iter().any(|r| r["event"] == "cert.renewed"
        && r["serial"] == p.serial.as_str()
        && r["detail"]["previous"] == old.serial.to_string().as_str()));

    // The renewed certificate works, and is not renewed again.
    let out = zerospice_tests::lab::agent(&profile, &["list"]).unwrap();
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("Renewed"));
    // A renewal right after an issue is refused (a looping agent cannot fill the database).
    let e = agent_err(&profile, &["renew"]).unwrap();
    assert!(
        e.contains("error: your certificate was issued less than 10 minutes ago; renew later"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn renewal_checks_the_users_current_yubikey_rules() {
    use time::OffsetDateTime;
    use zerospice_ca::KeyProvenance;
    use zerospice_tests::lab::{client_cert_as, new_key};
    let lab = Lab::start().await.unwrap();
    let alice = lab.user("alice", &["--vm", "100"]).unwrap();
    let ca = lab.ca().unwrap();
    let yubikey = KeyProvenance::Yubikey { serial: 7 };
    // Aging certificates (one day left) for keys on YubiKey 7: one with the policies recorded at
    // enrollment (PIN once, touch cached), one from before the gateway recorded them.
    let aging = |name: &str, pin: Option<&str>, touch: Option<&str>| {
        let key = new_key();
        let old = client_cert_as(
            &ca,
            &key,
            yubikey,
            "alice",
            "laptop",
            OffsetDateTime::now_utc() - time::Duration::days(6),
            time::Duration::days(7),
        )
        .unwrap();
        lab.record_key(&old, "alice", "laptop", yubikey, pin, touch)
            .unwrap();
        lab.profile_with(&alice, name, &old, &key).unwrap()
    };
    let recorded = aging("recorded", Some("once"), Some("cached"));
    let unrecorded = aging("unrecorded", None, None);
    let set = |extra: &[&str]| {
        let mut args = vec!["user", "set", "alice", "--vm", "100"];
        args.extend_from_slice(extra);
        lab.admin(&args).unwrap();
    };

    // The administrator now allows another YubiKey only.
    set(&["--allow-serial", "8"]);
    let e = agent_err(&recorded, &["renew"]).unwrap();
    assert!(
        e.contains("error: key rule allow-serial failed: YubiKey 7 is not one of the YubiKeys allowed for this user (8): enroll again with one of them (--key yubikey)"),
        "{e}"
    );
    // ... or a stronger touch policy than the key was generated with.
    set(&["--allow-serial", "7", "--min-touch-policy", "always"]);
    let e = agent_err(&recorded, &["renew"]).unwrap();
    assert!(
        e.contains("error: key rule min-touch-policy failed: the key's touch policy is cached, this user needs at least always: enroll again with --touch-policy always"),
        "{e}"
    );
    // A policy that was never recorded does not pass a minimum (fail closed).
    set(&["--allow-serial", "7", "--min-pin-policy", "once"]);
    let e = agent_err(&unrecorded, &["renew"]).unwrap();
    assert!(
        e.contains("error: key rule min-pin-policy failed: the key's PIN policy was not recorded when its certificate was issued, this user needs at least once: enroll again with --pin-policy once"),
        "{e}"
    );
    let audit = lab.audit().unwrap();
    let refused = audit
        .iter()
        .filter(|r| r["event"] == "cert.renew_refused")
        .count();
    assert_eq!(refused, 3, "{audit:?}");

    // Rules the key meets: renewed, and the new certificate keeps the recorded policies.
    agent_ok(&recorded, &["renew"]).unwrap();
    let p = zerospice_enroll::profile::ProfileDir::new(&recorded)
        .load()
        .unwrap();
    let store = zerospice_gateway::store::Store::open(&lab.home.db()).unwrap();
    let rec = store.certificate(&p.serial).unwrap().unwrap();
    assert_eq!(rec.hardware_serial, Some(7));
    assert_eq!(rec.pin_policy.as_deref(), Some("once"));
    assert_eq!(rec.touch_policy.as_deref(), Some("cached"));
}
