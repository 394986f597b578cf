//! `zerospice-gateway init` with paths relative to the current directory (as an administrator
//! types them, and as docs/SANDBOX.md does by hand): the gateway must find its files when it
//! serves, although its configuration resolves relative paths against its own directory.
use std::process::Command;
use std::time::Duration;

use zerospice_tests::harness::{bin, run_bounded, Proc};
use zerospice_tests::pve::{PveConfig, PveStandin};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_with_relative_dir_and_proxmox_ca_file_serves() {
    let pve = PveStandin::start(PveConfig::example()).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    pve.write_ca_pem(&work.path().join("pve-root-ca.pem"))
        .unwrap();
    std::fs::write(work.path().join("token"), "secret\n").unwrap();
    let gateway = |args: &[&str]| {
        let mut c = Command::new(bin("zerospice-gateway"));
        c.current_dir(work.path())
            .args(["--dir", "gw"])
            .args(args)
            .env_remove("ZEROSPICE_CONFIG")
            .env_remove("ZEROSPICE_DIR")
            .env_remove("ZEROSPICE_LOG");
        c
    };
    let api = pve.api_url();
    let spiceproxy = pve.spiceproxy_addr().to_string();
    let enroll_port = zerospice_tests::harness::free_udp_port().to_string();
    let access_port = zerospice_tests::harness::free_udp_port().to_string();
    let out = tokio::task::block_in_place(|| {
        run_bounded(
            gateway(&[
                "init",
                "--listen",
                "127.0.0.1",
                "--enroll-port",
                &enroll_port,
                "--access-port",
                &access_port,
                "--proxmox-url",
                &api,
                "--proxmox-token-id",
                "zerospice@pve!gateway",
                "--proxmox-token-secret-file",
                "token",
                "--proxmox-ca-file",
                "pve-root-ca.pem",
                "--spiceproxy",
                &spiceproxy,
            ]),
            Duration::from_secs(30),
        )
    })
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = std::fs::read_to_string(work.path().join("gw/gateway.toml")).unwrap();
    let value: toml::Value = toml::from_str(&config).unwrap();
    for key in ["token_secret_file", "ca_file"] {
        let p = value["proxmox"][key].as_str().unwrap();
        assert!(
            std::path::Path::new(p).is_absolute() && std::path::Path::new(p).exists(),
            "{key} = {p:?}"
        );
    }
    let mut serve = gateway(&["serve"]);
    serve.env("ZEROSPICE_LOG", "info");
    let mut p = tokio::task::block_in_place(|| Proc::spawn("gateway", serve)).unwrap();
    tokio::task::block_in_place(|| p.wait_for("gateway ready", Duration::from_secs(20))).unwrap();
}
