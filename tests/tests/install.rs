//! INSTALL.md's gateway steps, followed as a newcomer would, against the Proxmox stand-in:
//! configuration in an `/etc/zerospice`-like directory, state in a `/var/lib/zerospice`-like one,
//! the token secret pasted on standard input, a user, the preflight, and the exact command line
//! of the shipped systemd unit serving.
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use zerospice_tests::harness::{bin, free_udp_port, mode, run_bounded, Proc};
use zerospice_tests::pve::{PveConfig, PveStandin};

const UNIT: &str = include_str!("../../packaging/zerospice-gateway.service");
const INSTALL: &str = include_str!("../../INSTALL.md");

/// The arguments of the unit's `ExecStart=` after the binary, with the unit's directories moved
/// under `root`.
fn unit_args(root: &Path) -> Vec<String> {
    let line = UNIT
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart in the unit");
    let mut words = line.split_whitespace();
    assert_eq!(words.next(), Some("/usr/local/bin/zerospice-gateway"));
    words
        .map(|w| {
            w.replace(
                "/var/lib/zerospice",
                &root.join("var").display().to_string(),
            )
            .replace("/etc/zerospice", &root.join("etc").display().to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_install_steps_and_the_systemd_unit_work() {
    // The documented commands are the ones tested here.
    for needle in [
        "zerospice-gateway --dir /var/lib/zerospice --config /etc/zerospice/gateway.toml init",
        "--proxmox-token-secret-file -",
        "--proxmox-ca-file /etc/zerospice/pve-root-ca.pem",
        "zsg user add alice --vm 100 --vm 101",
        "zsg check",
    ] {
        assert!(
            INSTALL.contains(needle),
            "INSTALL.md no longer says {needle:?}"
        );
    }
    assert!(UNIT.contains("ReadWritePaths=/var/lib/zerospice"));

    let pve_config = PveConfig::example();
    let (token_id, secret) = (pve_config.token_id.clone(), pve_config.token_secret.clone());
    let pve = PveStandin::start(pve_config).await.unwrap();
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc");
    let var = root.path().join("var");
    std::fs::create_dir_all(&etc).unwrap();
    let ca = etc.join("pve-root-ca.pem");
    pve.write_ca_pem(&ca).unwrap();
    let config = etc.join("gateway.toml");
    let (access, enroll) = (free_udp_port(), free_udp_port());

    // init, with the secret pasted on standard input.
    let mut init = Command::new(bin("zerospice-gateway"));
    init.args(["--dir", var.to_str().unwrap()])
        .args(["--config", config.to_str().unwrap()])
        .arg("init")
        .args(["--listen", "127.0.0.1"])
        .args(["--access-port", &access.to_string()])
        .args(["--enroll-port", &enroll.to_string()])
        .args(["--proxmox-url", &pve.api_url()])
        .args(["--proxmox-token-id", &token_id])
        .args(["--proxmox-token-secret-file", "-"])
        .args(["--proxmox-ca-file", ca.to_str().unwrap()])
        .args(["--spiceproxy", &pve.spiceproxy_addr().to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = init.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{secret}\n").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("CA fingerprint:     SHA256:"), "{stdout}");
    assert!(!stdout.contains(&secret));
    assert_eq!(mode(&var), 0o700);
    assert_eq!(mode(&var.join("proxmox-token")), 0o600);
    assert_eq!(mode(&config), 0o600);
    assert_eq!(
        std::fs::read_to_string(var.join("proxmox-token"))
            .unwrap()
            .trim(),
        secret
    );
    let toml = std::fs::read_to_string(&config).unwrap();
    assert!(!toml.contains(&secret), "the secret stays in its own file");

    // The admin alias of INSTALL.md: --dir and --config on every command.
    let zsg = |args: &[&str]| {
        let mut c = Command::new(bin("zerospice-gateway"));
        c.args(["--dir", var.to_str().unwrap()])
            .args(["--config", config.to_str().unwrap()])
            .args(args);
        run_bounded(c, Duration::from_secs(60)).unwrap()
    };
    let out = zsg(&["user", "add", "alice", "--vm", "100", "--vm", "101"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("zerospice-invite:v1:alice@127.0.0.1:"));
    let out = zsg(&["check"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.ends_with("All checks passed.\n"), "{text}");

    // The systemd unit's ExecStart, verbatim but for the directories.
    let mut c = Command::new(bin("zerospice-gateway"));
    c.args(unit_args(root.path()));
    let mut gw = Proc::spawn("gateway", c).unwrap();
    gw.wait_for("gateway ready", Duration::from_secs(20))
        .unwrap();
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let status = gw
        .wait_exit(Duration::from_secs(15))
        .expect("stops on SIGTERM");
    assert!(status.success(), "{}", gw.log());
}
