//! `zerospice-gateway check` against the Proxmox stand-in: the real binary, the real API calls
//! (`/version`, `/cluster/resources`, `/access/permissions?path=`, `/nodes/N/qemu/ID/config`), and
//! the exact findings an administrator reads.
use std::time::Duration;

use zerospice_tests::harness::run_bounded;
use zerospice_tests::lab::Lab;
use zerospice_tests::pve::PveConfig;

/// Runs `check` (text, then JSON); returns (succeeded, text output, JSON findings).
fn check(lab: &Lab) -> (bool, String, Vec<serde_json::Value>) {
    let mut c = lab.home.cmd();
    c.arg("check");
    let out = run_bounded(c, Duration::from_secs(60)).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut c = lab.home.cmd();
    c.args(["--json", "check"]);
    let json_out = run_bounded(c, Duration::from_secs(60)).unwrap();
    assert_eq!(out.status.success(), json_out.status.success());
    if !out.status.success() {
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("error: preflight failed: fix the problems above"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let findings: Vec<serde_json::Value> = serde_json::from_slice(&json_out.stdout).unwrap();
    (out.status.success(), text, findings)
}

/// Runs `check`, expects it to fail with exactly one Proxmox finding; returns its message and fix.
fn proxmox_failure(lab: &Lab) -> (String, String, String) {
    let (ok, text, findings) = check(lab);
    assert!(!ok, "{text}");
    let px: Vec<_> = findings
        .iter()
        .filter(|f| f["check"] == "proxmox")
        .collect();
    assert_eq!(px.len(), 1, "{text}");
    let field = |k: &str| px[0][k].as_str().unwrap_or_default().to_owned();
    (field("message"), field("fix"), text)
}

fn fails(findings: &[serde_json::Value]) -> Vec<String> {
    findings
        .iter()
        .filter(|f| f["level"] == "fail")
        .map(|f| f["message"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn check_names_missing_privileges_displays_and_vms() {
    let lab = Lab::init(PveConfig::example(), &[]).await.unwrap();
    // 102 has a std display, 103 is invisible to the token; bob wants power on the pool "lab",
    // where the token has Audit and Console but not PowerMgmt.
    lab.add_user("alice", &["--vm", "100", "--vm", "102", "--vm", "103"])
        .unwrap();
    lab.add_user("bob", &["--pool", "lab", "--power"]).unwrap();
    let (ok, text, findings) = check(&lab);
    assert!(!ok, "{text}");
    let fails = fails(&findings);
    assert!(
        fails.contains(
            &"VM 103 is in alice's policy, but the token cannot see it: it does not exist, or the token lacks VM.Audit on /vms/103".to_owned()
        ),
        "{fails:#?}"
    );
    assert!(
        fails.contains(&"VM 102 (legacy-std) has no SPICE display (vga: std)".to_owned()),
        "{fails:#?}"
    );
    assert!(
        fails.contains(&"VM 104 (remote), used by bob: the token lacks VM.PowerMgmt".to_owned()),
        "{fails:#?}"
    );
    // VM 100 is fine: privileges and display reported as ok.
    assert!(
        text.contains("[  ok  ] display: VM 100 (win11) has a SPICE display"),
        "{text}"
    );
    assert!(
        text.contains("fix: qm set 102 --vga qxl"),
        "the fix is printed beside the problem: {text}"
    );
    assert!(
        text.contains("fix: pveum acl modify /vms/104 --tokens 'zerospice@pve!gateway' --roles ZeroSpicePower"),
        "{text}"
    );
    // The check asked Proxmox only read-only questions: no spiceproxy ticket, no power action.
    let calls = lab.pve.calls();
    assert!(
        calls.iter().all(|c| c.method == "GET"),
        "check must only read: {calls:#?}"
    );
    assert!(calls
        .iter()
        .any(|c| c.path.starts_with("/api2/json/access/permissions")));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_good_setup_passes_and_the_token_never_shows() {
    let lab = Lab::init(PveConfig::example(), &[]).await.unwrap();
    lab.add_user("alice", &["--vm", "100", "--vm", "101"])
        .unwrap();
    let (ok, text, findings) = check(&lab);
    assert!(ok, "{text}");
    assert!(text.ends_with("All checks passed.\n"), "{text}");
    assert!(fails(&findings).is_empty());
    let secret = std::fs::read_to_string(lab.files.path().join("token")).unwrap();
    assert!(!text.contains(secret.trim()));
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_token_wrong_pin_unreachable_and_missing_address_are_explained() {
    let lab = Lab::init(PveConfig::example(), &[]).await.unwrap();
    lab.add_user("alice", &["--vm", "100"]).unwrap();
    let config_path = lab.home.path().join("gateway.toml");
    let original = std::fs::read_to_string(&config_path).unwrap();

    // A wrong token secret: Proxmox answers 401.
    std::fs::write(
        lab.home.path().join("proxmox-token"),
        "00000000-0000-0000-0000-000000000000\n",
    )
    .unwrap();
    let (_, fix, text) = proxmox_failure(&lab);
    assert!(
        fix.starts_with("check proxmox.token_id and the secret in the token file"),
        "{text}"
    );
    assert!(!text.contains("00000000-0000-0000-0000-000000000000"));
    let secret = std::fs::read_to_string(lab.files.path().join("token")).unwrap();
    std::fs::write(lab.home.path().join("proxmox-token"), secret).unwrap();

    // A pinned fingerprint that is not the certificate Proxmox presents.
    let mut pinned = String::new();
    for line in original.lines() {
        if line.starts_with("ca_file") {
            pinned.push_str(&format!("fingerprint = \"SHA256:{}\"\n", "ab".repeat(32)));
        } else {
            pinned.push_str(line);
            pinned.push('\n');
        }
    }
    std::fs::write(&config_path, &pinned).unwrap();
    let (message, fix, text) = proxmox_failure(&lab);
    assert!(message.starts_with("TLS with Proxmox failed"), "{text}");
    assert!(fix.contains("not the pinned one"), "{text}");

    // Proxmox not listening at all.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let api = lab.pve.api_url();
    std::fs::write(
        &config_path,
        original.replace(&api, &format!("https://127.0.0.1:{port}")),
    )
    .unwrap();
    let (_, fix, text) = proxmox_failure(&lab);
    assert!(
        fix.starts_with("check proxmox.url, that pveproxy runs"),
        "{text}"
    );

    // A listening address this host does not have (TEST-NET-1; nothing is sent, bind fails).
    let access = format!("127.0.0.1:{}", lab.home.access_port);
    assert!(original.contains(&access), "{original}");
    std::fs::write(
        &config_path,
        original.replace(&access, &format!("192.0.2.10:{}", lab.home.access_port)),
    )
    .unwrap();
    let (ok, text, findings) = check(&lab);
    assert!(!ok);
    let listen = fails(&findings);
    assert!(
        listen
            .iter()
            .any(|m| m.starts_with("access address 192.0.2.10 is not assigned to this host")),
        "{text}"
    );
}
