//! Real SPICE end to end: a disk-less QEMU VM (SeaBIOS "No bootable device") with SPICE over
//! TLS behind the Proxmox stand-in, the real gateway, an enrolled agent, and the real
//! `remote-viewer` under Xvfb, started by `zerospice-agent connect`.
//!
//! Needs the Debian packages qemu-system-x86, virt-viewer, xvfb, imagemagick and oathtool
//! (`scripts/install-deps`). Without them the test says so loudly and passes; under `CI=true` it
//! fails instead.
use std::path::PathBuf;
use std::time::{Duration, Instant};

use zerospice_tests::spice::{
    tools_or_skip, SpiceLab, SpiceLabOptions, FOREIGN_CA_VMID, OTHER_NODE_VMID, VMID,
};

/// Screenshots stay in the target directory for a look after the run.
fn shot_path(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("spice-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_viewer_shows_the_vm_through_the_tunnel_and_refuses_wrong_certificates() {
    let Some(tools) = tools_or_skip("spice_e2e") else {
        return;
    };
    let started = Instant::now();
    let lab = SpiceLab::start(
        &tools,
        &SpiceLabOptions {
            wrong_certificates: true,
            display: None,
        },
        &mut |step, took| eprintln!("[{:>5.1}s] {step}", took.as_secs_f64()),
    )
    .await
    .unwrap();

    // 1. The real viewer, started by the agent, shows the VM's screen.
    let png = shot_path("vm-100.png");
    let mut session = lab.connect(VMID).unwrap();
    let check = lab
        .wait_for_screen(VMID, &png, Duration::from_secs(30))
        .await
        .unwrap();
    let Some(at) = check.found else {
        panic!(
            "the VM screen ({}x{}, {} lit pixels) is not on the display; screenshot: {}\nagent:\n{}\nqemu:\n{}\ngateway:\n{}",
            check.guest.width,
            check.guest.height,
            check.guest.lit_pixels(),
            png.display(),
            session.agent.log(),
            lab.qemu(VMID).unwrap().proc.log(),
            lab.lab.gateway_log(),
        );
    };
    eprintln!(
        "VM screen found at {at:?} in {} after {:.1}s",
        png.display(),
        started.elapsed().as_secs_f64()
    );

    // Every channel the viewer opens (8 for a Proxmox-like VM) went through the agent, the QUIC
    // tunnel and the gateway to the spiceproxy.
    let t = Instant::now();
    while lab.channels_through_spiceproxy(VMID) < 8 && t.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A little longer, to see no ninth channel arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let through_proxy = lab.channels_through_spiceproxy(VMID);
    // QEMU's own view: 8 channels connected, every one over TLS.
    let channels = lab.qemu(VMID).unwrap().spice_channels().await.unwrap();
    assert_eq!(channels.len(), 8, "{channels:#?}");
    assert!(channels.iter().all(|c| c["tls"] == true), "{channels:#?}");
    session.stop();
    let mut agent_logs = vec![session.agent.log()];
    let ended =
        tokio::task::block_in_place(|| lab.wait_session_ended(VMID, Duration::from_secs(15)))
            .unwrap();
    eprintln!("session.ended: {ended}");
    assert_eq!(
        ended["detail"]["channels"],
        8,
        "main, display, inputs, cursor, playback, record, usbredir x2: {ended}\nspiceproxy: {:#?}",
        lab.lab.pve.connects()
    );
    assert_eq!(through_proxy, 8, "{:#?}", lab.lab.pve.connects());
    assert_eq!(ended["user"], "alice");
    assert_eq!(ended["device"], "laptop");
    // The screen travelled down the tunnel: each channel's record, far more bytes than handshakes.
    let session_id = ended["detail"]["session"].clone();
    let audit = lab.lab.audit().unwrap();
    let closed: Vec<&serde_json::Value> = audit
        .iter()
        .filter(|r| r["event"] == "channel.closed" && r["detail"]["session"] == session_id)
        .collect();
    assert_eq!(closed.len(), 8, "{audit:#?}");
    let down: u64 = closed
        .iter()
        .map(|r| r["detail"]["bytes_down"].as_u64().unwrap())
        .sum();
    assert!(down > 20_000, "only {down} bytes came down: {closed:#?}");
    // The session's record waited for its channels: it carries their bytes (the agent's
    // connection closes while the viewer's channels are still relaying).
    assert_eq!(ended["detail"]["bytes_down"], down, "{ended}\n{closed:#?}");

    // 2. The viewer checks the SPICE server's certificate end to end, through the tunnel, with
    // `ca` and `host-subject` from the Proxmox answer: a server with another cluster's
    // certificate (same subject, another CA) and one with another node's certificate (same CA,
    // another subject) are refused, and their screens never appear.
    for (vmid, what, viewer_says) in [
        (
            FOREIGN_CA_VMID,
            "another cluster's CA",
            "Error in certificate chain verification",
        ),
        (
            OTHER_NODE_VMID,
            "another node's subject",
            "CN=pve' verification failed",
        ),
    ] {
        let png = shot_path(&format!("refused-{vmid}.png"));
        let mut session = lab.connect(vmid).unwrap();
        let t = Instant::now();
        while !session.agent.log().contains("SSL_connect") && t.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let viewer_log = session.agent.log();
        assert!(
            viewer_log.contains(viewer_says),
            "VM {vmid} ({what}): the viewer did not refuse with {viewer_says:?}:\n{viewer_log}"
        );
        // The channel went through the whole chain to QEMU, which saw the handshake abort.
        assert!(
            lab.channels_through_spiceproxy(vmid) >= 1,
            "{:#?}",
            lab.lab.pve.connects()
        );
        let qemu_log = lab.qemu(vmid).unwrap().proc.log();
        assert!(
            qemu_log.contains("SSL_accept failed"),
            "VM {vmid}: {qemu_log}"
        );
        // Its screen (which QEMU does render) is not on the display, even after a while.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let check = lab.check_screen(vmid, &png).await.unwrap();
        assert!(
            check.guest.lit_pixels() >= 50,
            "VM {vmid} renders nothing, so its absence would prove nothing"
        );
        assert_eq!(
            check.found,
            None,
            "VM {vmid} ({what}) is visible: {}",
            png.display()
        );
        session.stop();
        agent_logs.push(session.agent.log());
    }

    // The one-time SPICE passwords never reached a log or a file: not the gateway's log (at
    // debug level), not the agent's or the viewer's output, not the gateway's state directory,
    // not the laptop's profile.
    let tickets = lab.lab.pve.tickets();
    assert_eq!(tickets.len(), 3, "one per session");
    let mut files = Vec::new();
    collect_files(lab.lab.home.path(), &mut files);
    collect_files(&lab.profile, &mut files);
    let contents: Vec<(PathBuf, Vec<u8>)> = files
        .into_iter()
        .filter_map(|f| std::fs::read(&f).ok().map(|c| (f, c)))
        .collect();
    let gateway_log = lab.lab.gateway_log();
    for t in &tickets {
        assert!(
            !gateway_log.contains(&t.password),
            "the gateway logged a password"
        );
        assert!(
            !agent_logs.iter().any(|l| l.contains(&t.password)),
            "the agent or viewer printed a password"
        );
        for (path, data) in &contents {
            assert!(
                !data
                    .windows(t.password.len())
                    .any(|w| w == t.password.as_bytes()),
                "{} holds a SPICE password",
                path.display()
            );
        }
    }

    let took = started.elapsed();
    eprintln!("spice_e2e took {:.1}s", took.as_secs_f64());
    assert!(took < Duration::from_secs(120), "took {took:?}");
}

/// Proxmox's one-time SPICE password expires 30 s after the spiceproxy call, and the gateway's
/// session window is 30 s too: a console already open must outlive both (channels keep the
/// session live), and nothing in the chain may cut an idle console (QUIC keep-alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_console_outlives_the_password_expiry_and_the_session_window() {
    let Some(tools) = tools_or_skip("spice_e2e") else {
        return;
    };
    let lab = SpiceLab::start(&tools, &SpiceLabOptions::default(), &mut |_, _| {})
        .await
        .unwrap();
    let png = shot_path("vm-100-after-40s.png");
    let mut session = lab.connect(VMID).unwrap();
    let check = lab
        .wait_for_screen(VMID, &png, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(check.found.is_some(), "{}", session.agent.log());
    let opened = Instant::now();
    tokio::time::sleep(Duration::from_secs(40)).await;
    assert!(
        session.agent.exited().is_none(),
        "the agent ended after {:?}:\n{}",
        opened.elapsed(),
        session.agent.log()
    );
    let channels = lab.qemu(VMID).unwrap().spice_channels().await.unwrap();
    assert_eq!(channels.len(), 8, "after 40 s: {channels:#?}");
    let audit = lab.lab.audit().unwrap();
    assert!(
        !audit
            .iter()
            .any(|r| r["event"] == "session.ended" || r["event"] == "channel.closed"),
        "{audit:#?}"
    );
    let check = lab.check_screen(VMID, &png).await.unwrap();
    assert!(check.found.is_some(), "{}", png.display());
    // A new session afterwards gets a fresh one-time password and shows the screen again.
    session.stop();
    let mut again = lab.connect(VMID).unwrap();
    let check = lab
        .wait_for_screen(VMID, &png, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(check.found.is_some(), "{}", again.agent.log());
    again.stop();
    assert_eq!(lab.lab.pve.tickets().len(), 2);
}

fn collect_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}
