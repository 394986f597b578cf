//! `zerospice-sandbox`: ZeroSpice end to end on this machine, without a Proxmox server.
//! Run it through `scripts/sandbox`, which installs the Debian packages and builds first.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use zerospice_tests::harness::find_bin;
use zerospice_tests::spice::{Display, SpiceLab, SpiceLabOptions, Tools, ViewerSession, VMID};

/// ZeroSpice sandbox: see a VM console through the whole ZeroSpice chain in a minute, on this
/// machine, without a Proxmox server.
///
/// It starts, all on loopback and in a fresh temporary directory:
///
///   1. a Proxmox VE stand-in (HTTPS API with token auth + the spiceproxy daemon on a CONNECT
///      port) with its own cluster CA, in this process;
///   2. a tiny disk-less QEMU VM (VM 100) with a qxl display and SPICE over TLS, its certificate
///      signed by that cluster CA, no SPICE password until the stand-in sets a one-time one over
///      QMP (valid 30 s), exactly as Proxmox does;
///   3. zerospice-gateway with a fresh CA, configured with the stand-in's API token and pinned CA;
///   4. a user `alice` allowed VM 100, and her `laptop` enrolled with zerospice-enroll using a
///      real TOTP code (software key);
///   5. zerospice-agent connect 100, which opens a local proxy on 127.0.0.1 and starts
///      remote-viewer with the connection file on its standard input.
///
/// Every SPICE channel then goes remote-viewer -> agent proxy -> QUIC stream (mutual TLS) ->
/// gateway -> spiceproxy -> QEMU, and the viewer verifies QEMU's TLS certificate end to end.
///
/// With a DISPLAY, the console opens on your screen; close the viewer or press Ctrl-C to stop.
/// Without one (or with --headless), it starts its own Xvfb, says so, leaves a screenshot of
/// the console and exits (--keep stays up). Ctrl-C stops every process it started and removes
/// the temporary directory.
///
/// Examples:
///   scripts/sandbox                      console on your screen
///   scripts/sandbox --headless           screenshot in /tmp/zerospice-sandbox.png, then exit
///   scripts/sandbox --headless --keep    stay up; poke at it from another terminal
#[derive(Parser)]
#[command(name = "zerospice-sandbox", version, verbatim_doc_comment)]
struct Args {
    /// Use a private Xvfb even if DISPLAY is set.
    #[arg(long)]
    headless: bool,
    /// Stay up until Ctrl-C (or the viewer is closed), also when headless.
    #[arg(long)]
    keep: bool,
    /// Where to leave the screenshot of the console.
    #[arg(long, value_name = "PATH", default_value_os_t = default_screenshot())]
    screenshot: PathBuf,
    /// How long to wait for the console to appear, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    timeout: u64,
}

fn default_screenshot() -> PathBuf {
    std::env::temp_dir().join("zerospice-sandbox.png")
}

/// Prints `[  1.2s] text` with the time since the start.
struct Clock(Instant);

impl Clock {
    fn say(&self, text: &str) {
        println!("[{:>5.1}s] {text}", self.0.elapsed().as_secs_f64());
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(args));
    // Everything was dropped (processes stopped, temporary directory removed) inside `run`.
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves once SIGINT, SIGTERM or SIGHUP arrives; sets `flag` too.
async fn stop_signal(flag: Arc<AtomicBool>) {
    let mut streams = Vec::new();
    for kind in [
        SignalKind::interrupt(),
        SignalKind::terminate(),
        SignalKind::hangup(),
    ] {
        if let Ok(s) = signal(kind) {
            streams.push(s);
        }
    }
    if streams.is_empty() {
        return std::future::pending().await;
    }
    let waits = streams.iter_mut().map(|s| Box::pin(s.recv()));
    futures_select_all(waits).await;
    flag.store(true, Ordering::SeqCst);
}

/// The first of several futures to finish (without pulling in the futures crate).
async fn futures_select_all<F: std::future::Future + Unpin>(futs: impl Iterator<Item = F>) {
    let mut futs: Vec<F> = futs.collect();
    std::future::poll_fn(|cx| {
        for f in futs.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

async fn run(args: Args) -> anyhow::Result<()> {
    let clock = Clock(Instant::now());
    let stopped = Arc::new(AtomicBool::new(false));
    let stop = stop_signal(stopped.clone());
    tokio::pin!(stop);

    clock.say(
        "ZeroSpice sandbox: everything on loopback, in a temporary directory; Ctrl-C stops it all",
    );
    let tools = Tools::find().map_err(|missing| {
        anyhow::anyhow!(
            "missing Debian packages: {} (scripts/sandbox installs them: run it rather than this binary)",
            missing.join(" ")
        )
    })?;
    for name in ["zerospice-gateway", "zerospice-agent", "zerospice-enroll"] {
        find_bin(name)?;
    }

    let display = choose_display(&tools, args.headless, &clock);
    let options = SpiceLabOptions {
        wrong_certificates: false,
        display: display.clone(),
    };
    let mut progress = |step: &str, took: Duration| {
        clock.say(&format!("{step} (+{:.1}s)", took.as_secs_f64()));
    };
    let lab = tokio::select! {
        lab = SpiceLab::start(&tools, &options, &mut progress) => lab?,
        () = &mut stop => {
            clock.say("interrupted while starting; stopping what was started");
            return Ok(());
        }
    };
    if display.is_none() {
        clock.say(&format!(
            "no DISPLAY (or --headless): the viewer runs on a private Xvfb, display {}",
            lab.display.name
        ));
    }

    let mut session = lab.connect(VMID)?;
    clock.say("zerospice-agent connect 100: session requested, remote-viewer starting");
    let outcome = watch(&lab, &mut session, &args, &clock, &mut stop).await;
    let interrupted = stopped.load(Ordering::SeqCst);
    session.stop();
    if outcome.is_ok() || interrupted {
        summary(&lab, &clock);
    }
    clock.say(
        "stopping: viewer, agent, gateway, QEMU, Xvfb, stand-in; removing the temporary directory",
    );
    drop(session);
    drop(lab);
    clock.say("done");
    if interrupted {
        return Ok(());
    }
    outcome
}

/// `Some(name)` to use the user's display, `None` for a private Xvfb.
fn choose_display(tools: &Tools, headless: bool, clock: &Clock) -> Option<String> {
    if headless {
        return None;
    }
    let name = std::env::var("DISPLAY").ok().filter(|d| !d.is_empty())?;
    // A display we cannot reach (an SSH session without X forwarding, a stale DISPLAY) is no use.
    let probe = tempfile::Builder::new()
        .prefix("zerospice-display-probe")
        .suffix(".png")
        .tempfile()
        .ok()?;
    match Display::existing(tools, &name).screenshot(probe.path()) {
        Ok(_) => {
            clock.say(&format!("using your display {name}"));
            Some(name)
        }
        Err(e) => {
            clock.say(&format!(
                "DISPLAY={name} cannot be reached ({}); using a private Xvfb instead",
                first_line(&format!("{e:#}"))
            ));
            None
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// Waits for the console, reports it, then stays up as asked.
async fn watch(
    lab: &SpiceLab,
    session: &mut ViewerSession,
    args: &Args,
    clock: &Clock,
    stop: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(args.timeout);
    let start = Instant::now();

    // 1. The viewer's channels arrive at the spiceproxy through the tunnel.
    let mut reported = 0;
    loop {
        let n = lab.channels_through_spiceproxy(VMID);
        if n > reported {
            reported = n;
        }
        if n >= 4 {
            break;
        }
        if let Some(status) = session.agent.exited() {
            bail!(
                "the agent exited ({status}) before the console opened:\n{}",
                session.agent.log()
            );
        }
        if start.elapsed() > timeout {
            bail!(
                "only {n} SPICE channel(s) reached the VM within {timeout:?}; agent and viewer said:\n{}",
                session.agent.log()
            );
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = &mut *stop => {
                clock.say("interrupted");
                return Ok(());
            }
        }
    }
    clock.say(&format!(
        "remote-viewer connected: {reported} SPICE channels so far through agent -> QUIC -> gateway -> spiceproxy -> QEMU (TLS verified by the viewer)"
    ));

    // 2. The VM's screen is on the display.
    let headless = lab.display.xvfb.is_some();
    if let Some(dir) = args
        .screenshot
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let left = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_secs(5));
    let check = tokio::select! {
        c = lab.wait_for_screen(VMID, &args.screenshot, left) => c?,
        () = &mut *stop => {
            clock.say("interrupted");
            return Ok(());
        }
    };
    match (check.found, headless) {
        (Some((x, y)), _) => clock.say(&format!(
            "the VM's screen ({}x{}, SeaBIOS) is on display {} at {x},{y}; screenshot: {}",
            check.guest.width,
            check.guest.height,
            lab.display.name,
            args.screenshot.display()
        )),
        (None, true) => bail!(
            "the VM's screen did not appear on the private display within {left:?}; last screenshot: {}\nagent and viewer said:\n{}",
            args.screenshot.display(),
            session.agent.log()
        ),
        // On a real desktop the window may be covered, moved or scaled: not an error.
        (None, false) => clock.say(&format!(
            "remote-viewer is open on {}; (the VM's screen was not found in a screenshot of the whole desktop, {}: covered or scaled?)",
            lab.display.name,
            args.screenshot.display()
        )),
    }
    print_running(lab, session);

    if headless && !args.keep {
        clock.say("headless: leaving the screenshot above and stopping (use --keep to stay up)");
        return Ok(());
    }
    clock.say(if headless {
        "up until Ctrl-C (--keep)"
    } else {
        "the console is open: close remote-viewer or press Ctrl-C to stop everything"
    });
    loop {
        if let Some(status) = session.agent.exited() {
            clock.say(&format!(
                "the viewer was closed; the agent ended ({status})"
            ));
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            () = &mut *stop => {
                clock.say("Ctrl-C");
                return Ok(());
            }
        }
    }
}

fn print_running(lab: &SpiceLab, session: &ViewerSession) {
    let pid = |p: Option<u32>| p.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
    let vm = &lab.vms[&VMID];
    let home = &lab.lab.home;
    let proxy = session
        .agent
        .log()
        .lines()
        .find_map(|l| {
            l.split_once("local proxy ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into());
    let viewer = session
        .agent
        .pid()
        .and_then(|p| zerospice_tests::spice::descendants(p).first().copied());
    println!();
    println!("  what                  pid       where");
    println!(
        "  Proxmox stand-in      {:<9} API {}, spiceproxy {} (in this process)",
        std::process::id(),
        lab.lab.pve.api_url(),
        lab.lab.pve.spiceproxy_addr()
    );
    println!(
        "  QEMU VM 100           {:<9} SPICE TLS {} (Proxmox tells viewers tls-port 61000)",
        pid(vm.proc.pid()),
        vm.spice
    );
    println!(
        "  zerospice-gateway     {:<9} enrollment udp/127.0.0.1:{}, access udp/127.0.0.1:{}",
        pid(lab.lab.gateway.as_ref().and_then(|g| g.pid())),
        home.enroll_port,
        home.access_port
    );
    println!(
        "  zerospice-agent       {:<9} local CONNECT proxy {proxy} (this session only)",
        pid(session.agent.pid())
    );
    println!(
        "  remote-viewer         {:<9} display {}",
        pid(viewer),
        lab.display.name
    );
    if let Some(x) = &lab.display.xvfb {
        println!(
            "  Xvfb                  {:<9} display {}",
            pid(x.pid()),
            lab.display.name
        );
    }
    println!();
    println!("  Try, from another terminal while it runs:");
    println!(
        "    {} --dir {} audit",
        bin_path("zerospice-gateway").display(),
        home.path().display()
    );
    println!(
        "    {} --profile {} list",
        bin_path("zerospice-agent").display(),
        lab.profile.display()
    );
    println!(
        "    import -display {} -window root /tmp/now.png",
        lab.display.name
    );
    println!();
}

fn bin_path(name: &str) -> PathBuf {
    find_bin(name).unwrap_or_else(|_| Path::new(name).to_path_buf())
}

/// What the gateway recorded about the session.
fn summary(lab: &SpiceLab, clock: &Clock) {
    // The gateway writes the session's record once the agent's connection is gone.
    let _ = tokio::task::block_in_place(|| lab.wait_session_ended(VMID, Duration::from_secs(5)));
    let Ok(audit) = lab.lab.audit() else {
        return;
    };
    let events: Vec<String> = audit
        .iter()
        .filter_map(|r| r["event"].as_str().map(str::to_owned))
        .collect();
    let ended = audit
        .iter()
        .rev()
        .find(|r| r["event"] == "session.ended" && r["detail"]["vmid"] == VMID);
    let closed = audit
        .iter()
        .filter(|r| r["event"] == "channel.closed" && r["detail"]["vmid"] == VMID);
    let (count, down) = closed.fold((0, 0), |(n, b), r| {
        (n + 1, b + r["detail"]["bytes_down"].as_u64().unwrap_or(0))
    });
    clock.say(&format!(
        "gateway audit trail: {} records ({}); {count} SPICE channels closed, {down} bytes of console down the tunnel{}",
        events.len(),
        dedup(&events).join(", "),
        ended
            .map(|r| format!("; session.ended: {} channels", r["detail"]["channels"]))
            .unwrap_or_default()
    ));
}

fn dedup(v: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in v {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    out
}
