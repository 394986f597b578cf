//! The sandbox binary as a newcomer runs it: headless it shows the console, leaves a screenshot
//! and exits; with --keep it stays up until Ctrl-C; either way every process it started is gone
//! afterwards, and so is its temporary directory.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use zerospice_tests::harness::{bin, run_bounded, Proc};
use zerospice_tests::spice::tools_or_skip;

fn sandbox_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(bin("zerospice-sandbox"));
    c.args(["--headless"])
        .args(args)
        .env_remove("DISPLAY")
        .env_remove("ZEROSPICE_TEST_VERBOSE");
    c
}

/// The PIDs in the "what pid where" table the sandbox prints.
fn listed_pids(out: &str) -> Vec<(String, u32)> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let name = [
                "QEMU VM 100",
                "zerospice-gateway",
                "zerospice-agent",
                "remote-viewer",
                "Xvfb",
            ]
            .into_iter()
            .find(|n| l.starts_with(n))?;
            let pid = l[name.len()..].split_whitespace().next()?.parse().ok()?;
            Some((name.to_owned(), pid))
        })
        .collect()
}

/// The gateway state directory it prints (`--dir /tmp/.tmpXXXX`).
fn state_dir(out: &str) -> Option<PathBuf> {
    out.lines().find_map(|l| {
        l.split_once("--dir ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .map(PathBuf::from)
    })
}

fn assert_all_gone(out: &str) {
    let pids = listed_pids(out);
    assert_eq!(pids.len(), 5, "{out}");
    for (name, pid) in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie of a process that is itself gone (then reaped by init).
        let state = state
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned));
        assert!(
            state.is_none() || state.as_deref() == Some("Z"),
            "{name} (pid {pid}) is still running"
        );
    }
    let dir = state_dir(out).expect("the sandbox names its gateway directory");
    assert!(!dir.exists(), "{} was left behind", dir.display());
}

#[test]
fn headless_sandbox_shows_the_console_leaves_a_screenshot_and_cleans_up() {
    if tools_or_skip("sandbox").is_none() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let shot = work.path().join("console.png");
    let out = run_bounded(
        sandbox_cmd(&["--screenshot", shot.to_str().unwrap()]),
        Duration::from_secs(90),
    )
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for step in [
        "Proxmox stand-in (API + spiceproxy) started",
        "QEMU started",
        "gateway serving",
        "her laptop enrolled",
        "Xvfb started on display",
        "no DISPLAY (or --headless)",
        "remote-viewer connected",
        "the VM's screen (720x400, SeaBIOS) is on display",
        "8 SPICE channels closed",
        "session.ended: 8 channels",
        "done",
    ] {
        assert!(stdout.contains(step), "missing {step:?} in:\n{stdout}");
    }
    // Every step line carries its time.
    assert!(stdout
        .lines()
        .filter(|l| l.starts_with('['))
        .all(|l| l.contains("s] ")));
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    assert!(stdout.contains(&shot.display().to_string()));
    assert_all_gone(&stdout);
}

#[test]
fn ctrl_c_stops_a_kept_sandbox_and_everything_it_started() {
    if tools_or_skip("sandbox").is_none() {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let shot = work.path().join("console.png");
    let mut p = Proc::spawn(
        "sandbox",
        sandbox_cmd(&["--keep", "--screenshot", shot.to_str().unwrap()]),
    )
    .unwrap();
    p.wait_for("up until Ctrl-C", Duration::from_secs(60))
        .unwrap();
    // Only the sandbox gets the signal (a terminal would also signal its children).
    p.signal(Signal::SIGINT);
    let status = p.wait_exit(Duration::from_secs(20));
    let log = p.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{log}");
    assert!(log.contains("Ctrl-C"), "{log}");
    assert_all_gone(&log);
}
