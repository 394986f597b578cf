//! Real SPICE end to end: a disk-less QEMU VM with SPICE over TLS behind the Proxmox stand-in,
//! the real gateway, an enrolled agent, Xvfb, and the real `remote-viewer`. Shared by the
//! end-to-end test (`tests/tests/spice_e2e.rs`) and the sandbox (`zerospice-sandbox`).
//!
//! The VM is started the way qemu-server starts a Proxmox VM with a SPICE display, reduced to
//! what matters here: `-vga qxl`, `-spice tls-port=...,x509-dir=...` with the cluster's node
//! certificate, **no password** on the command line (every SPICE login fails until the
//! stand-in's `spiceproxy` call sets a one-time password over QMP and expires it 30 s later),
//! and, as Proxmox adds them, an audio device, two USB redirection chardevs and the vdagent port
//! (so a viewer opens 8 channels: main, display, inputs, cursor, playback, record, usbredir x2).
//!
//! Every process is a [`Proc`]: started here, its output captured, stopped by PID on drop with a
//! bounded wait. The viewer is a child of the agent; [`ViewerSession`] also stops whatever the
//! agent left behind.

pub mod image;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

pub use image::Rgb;

use crate::echo::EchoServer;
use crate::harness::{run_bounded, Proc};
use crate::lab::{agent_cmd, Lab};
use crate::pve::{Acl, PveConfig, PveStandin, VmDef};

/// Bound on starting one process or seeing one thing happen.
pub const STEP: Duration = Duration::from_secs(20);

/// The programs found on `PATH`.
#[derive(Clone, Debug)]
pub struct Tools {
    pub qemu: PathBuf,
    pub remote_viewer: PathBuf,
    pub xvfb: PathBuf,
    pub import: PathBuf,
    pub convert: PathBuf,
}

impl Tools {
    /// Finds every program, or says which Debian packages are missing (`oathtool` is checked
    /// too: enrollment needs a real TOTP code).
    pub fn find() -> Result<Tools, Vec<&'static str>> {
        let mut missing: Vec<&'static str> = Vec::new();
        let mut find = |program: &str, package: &'static str| {
            which(program).unwrap_or_else(|| {
                if !missing.contains(&package) {
                    missing.push(package);
                }
                PathBuf::new()
            })
        };
        let tools = Tools {
            qemu: find("qemu-system-x86_64", "qemu-system-x86"),
            remote_viewer: find("remote-viewer", "virt-viewer"),
            xvfb: find("Xvfb", "xvfb"),
            import: find("import", "imagemagick"),
            convert: find("convert", "imagemagick"),
        };
        find("oathtool", "oathtool");
        if missing.is_empty() {
            Ok(tools)
        } else {
            Err(missing)
        }
    }
}

/// For tests: the tools, or `None` after a loud message on stderr when they are missing (the
/// test then passes without running). Under `CI=true` a missing package panics instead.
pub fn tools_or_skip(test: &str) -> Option<Tools> {
    use std::io::Write as _;
    match Tools::find() {
        Ok(t) => Some(t),
        Err(missing) => {
            let msg = format!(
                "{test}: the SPICE end-to-end tests need the Debian packages {}: run scripts/install-deps",
                missing.join(" ")
            );
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg} (CI=true: a missing package is a failure)");
            }
            // Straight to stderr: libtest captures `eprintln!` of passing tests.
            let bar = "!".repeat(100);
            let _ = writeln!(std::io::stderr(), "\n{bar}\nSKIPPED: {msg}\n{bar}\n");
            None
        }
    }
}

/// `program` on `PATH`, if it is there.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// A free TCP port on loopback right now.
pub fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port())
}

// ---------------------------------------------------------------------------------------------
// Processes

/// The PIDs of every process below `pid` (children, grandchildren, ...), from `/proc`.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            if let Some(ppid) = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()) {
                parent_of.push((child, ppid));
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for &(child, ppid) in &parent_of {
            if ppid == p && !out.contains(&child) {
                out.push(child);
                frontier.push(child);
            }
        }
    }
    out
}

fn alive(pid: u32) -> bool {
    // A zombie still answers signal 0; read its state instead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// SIGTERM to each PID, then SIGKILL to those still alive after `grace`.
pub fn terminate_pids(pids: &[u32], grace: Duration) {
    for &p in pids {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGTERM);
    }
    let start = Instant::now();
    while pids.iter().any(|&p| alive(p)) && start.elapsed() < grace {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &p in pids {
        if alive(p) {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// X display

/// An X display to show the viewer on: our own Xvfb, or the user's display (sandbox only).
pub struct Display {
    /// `:N`.
    pub name: String,
    /// The Xvfb we started, if any.
    pub xvfb: Option<Proc>,
    tools: Tools,
}

impl Display {
    /// Starts `Xvfb` on a free display number (Xvfb picks it and reports it with `-displayfd`).
    pub fn start_xvfb(tools: &Tools) -> anyhow::Result<Display> {
        let mut cmd = Command::new(&tools.xvfb);
        cmd.args([
            "-displayfd",
            "1",
            "-screen",
            "0",
            "1024x768x24",
            "-nolisten",
            "tcp",
            "-wr",
            "-noreset",
        ]);
        let mut proc = Proc::spawn("xvfb", cmd)?;
        let start = Instant::now();
        let display = loop {
            if let Some(n) = proc
                .log()
                .lines()
                .find_map(|l| l.trim().parse::<u32>().ok())
            {
                break n;
            }
            if let Some(status) = proc.exited() {
                bail!("Xvfb exited ({status}):\n{}", proc.log());
            }
            if start.elapsed() > STEP {
                bail!(
                    "Xvfb did not report a display within {STEP:?}:\n{}",
                    proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Display {
            name: format!(":{display}"),
            xvfb: Some(proc),
            tools: tools.clone(),
        })
    }

    /// The display named by `$DISPLAY`.
    pub fn existing(tools: &Tools, name: &str) -> Display {
        Display {
            name: name.to_owned(),
            xvfb: None,
            tools: tools.clone(),
        }
    }

    /// Takes a screenshot of the whole screen into `png` and returns its pixels.
    pub fn screenshot(&self, png: &Path) -> anyhow::Result<Rgb> {
        let mut import = Command::new(&self.tools.import);
        import
            .args(["-display", &self.name, "-window", "root"])
            .arg(png);
        let out = run_bounded(import, STEP)?;
        if !out.status.success() {
            bail!(
                "import (screenshot) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Through a file: a 2 MB pipe would fill up while `run_bounded` waits for the exit.
        let ppm = png.with_extension("ppm");
        let mut convert = Command::new(&self.tools.convert);
        convert.arg(png).arg(format!("ppm:{}", path_str(&ppm)?));
        let out = run_bounded(convert, STEP)?;
        if !out.status.success() {
            bail!(
                "convert (screenshot to PPM) failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let data = std::fs::read(&ppm).context("reading the screenshot")?;
        let _ = std::fs::remove_file(&ppm);
        Rgb::from_ppm(&data).context("reading the screenshot")
    }
}

// ---------------------------------------------------------------------------------------------
// QEMU

/// A running disk-less QEMU VM with a SPICE TLS port on loopback.
pub struct QemuVm {
    pub proc: Proc,
    /// The SPICE TLS port (what the stand-in's spiceproxy connects to).
    pub spice: SocketAddr,
    /// QMP socket handed to the stand-in (it sets the one-time password there).
    pub qmp: PathBuf,
    /// A second QMP socket for the harness (screen dumps), so the two never wait on each other.
    pub harness_qmp: PathBuf,
    dir: PathBuf,
}

impl QemuVm {
    /// Starts QEMU with `x509_dir` (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`) and
    /// sockets in `dir`. Returns once QEMU runs; [`wait_ready`](Self::wait_ready) waits for SPICE.
    pub fn start(tools: &Tools, name: &str, x509_dir: &Path, dir: &Path) -> anyhow::Result<QemuVm> {
        std::fs::create_dir_all(dir)?;
        let port = free_tcp_port()?;
        let qmp = dir.join("qmp.sock");
        let harness_qmp = dir.join("harness-qmp.sock");
        let x509 = x509_dir.to_str().context("x509 dir path is not UTF-8")?;
        let mut cmd = Command::new(&tools.qemu);
        cmd.args([
            "-name",
            name,
            "-no-user-config",
            "-machine",
            "pc",
            "-m",
            "64",
        ])
        .args(["-vga", "qxl", "-nic", "none", "-display", "none"])
        .args(["-serial", "none", "-parallel", "none", "-monitor", "none"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", harness_qmp.display()))
        // As qemu-server: TLS only, no password until the spiceproxy call sets one.
        .arg("-spice")
        .arg(format!(
            "tls-port={port},addr=127.0.0.1,x509-dir={x509},tls-ciphers=HIGH,seamless-migration=on"
        ))
        // Audio (playback + record channels), as a Proxmox VM with `audio0: device=ich9-intel-hda,driver=spice`.
        .args(["-audiodev", "spice,id=snd0"])
        .args(["-device", "ich9-intel-hda,id=sound0"])
        .args([
            "-device",
            "hda-duplex,id=sound0-codec0,bus=sound0.0,cad=0,audiodev=snd0",
        ])
        // The vdagent port (clipboard, resolution; carried on the main channel).
        .args(["-device", "virtio-serial,id=spice"])
        .args(["-chardev", "spicevmc,id=vdagent,name=vdagent"])
        .args([
            "-device",
            "virtserialport,chardev=vdagent,name=com.redhat.spice.0",
        ])
        // USB redirection (two usbredir channels), as qemu-server adds for SPICE USB.
        .args(["-device", "qemu-xhci,p2=15,p3=15,id=xhci"]);
        for i in 0..2 {
            cmd.arg("-chardev")
                .arg(format!("spicevmc,id=usbredirchardev{i},name=usbredir"))
                .arg("-device")
                .arg(format!(
                    "usb-redir,chardev=usbredirchardev{i},id=usbredirdev{i},bus=xhci.0"
                ));
        }
        let proc = Proc::spawn(&format!("qemu-{name}"), cmd)?;
        Ok(QemuVm {
            proc,
            spice: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            qmp,
            harness_qmp,
            dir: dir.to_path_buf(),
        })
    }

    /// Waits until QEMU answers `query-spice` with SPICE enabled. QMP is served from QEMU's main
    /// loop, which starts after the SPICE server listens; probing the TLS port itself would
    /// show up in QEMU's log as a failed channel.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            if let Some(status) = self.proc.exited() {
                bail!("{} exited ({status}):\n{}", self.proc.name, self.proc.log());
            }
            if self.qmp.exists() && self.harness_qmp.exists() {
                let q = tokio::time::timeout(
                    Duration::from_secs(2),
                    crate::pve::qmp::command(&self.harness_qmp, "query-spice", None),
                )
                .await;
                match q {
                    Ok(Ok(v)) if v["enabled"] == true => return Ok(()),
                    Ok(Ok(v)) => last = format!("query-spice: {v}"),
                    Ok(Err(e)) => last = format!("QMP {}: {}", e.command, e.message),
                    Err(_) => last = "QMP timed out".into(),
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "{}: SPICE not up within {timeout:?} ({last}):\n{}",
                    self.proc.name,
                    self.proc.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The SPICE channels QEMU has connected right now (QMP `query-spice`: `channel-type`,
    /// `tls`, ...).
    pub async fn spice_channels(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let r = tokio::time::timeout(
            STEP,
            crate::pve::qmp::command(&self.harness_qmp, "query-spice", None),
        )
        .await
        .context("QMP query-spice timed out")?;
        let v = match r {
            Ok(v) => v,
            Err(e) => bail!("QMP {} failed: {}", e.command, e.message),
        };
        Ok(v["channels"].as_array().cloned().unwrap_or_default())
    }

    /// The guest's screen as QEMU renders it (QMP `screendump`).
    pub async fn screendump(&self) -> anyhow::Result<Rgb> {
        let file = self.dir.join("screendump.ppm");
        let _ = std::fs::remove_file(&file);
        let args = serde_json::json!({ "filename": file.to_str().context("path")? });
        let r = tokio::time::timeout(
            STEP,
            crate::pve::qmp::command(&self.harness_qmp, "screendump", Some(args)),
        )
        .await
        .context("QMP screendump timed out")?;
        if let Err(e) = r {
            bail!("QMP {} failed: {}", e.command, e.message);
        }
        let data = std::fs::read(&file).context("reading the screen dump")?;
        Rgb::from_ppm(&data)
    }
}

// ---------------------------------------------------------------------------------------------
// The viewer

/// `zerospice-agent connect VMID --viewer remote-viewer` on a display; stops the agent and
/// anything it started (the viewer) on drop.
pub struct ViewerSession {
    pub agent: Proc,
    home: tempfile::TempDir,
}

impl ViewerSession {
    pub fn start(
        tools: &Tools,
        profile: &Path,
        vmid: u32,
        display: &Display,
    ) -> anyhow::Result<ViewerSession> {
        // The viewer writes its settings under $HOME/.config: keep them out of the user's home.
        let home = tempfile::Builder::new()
            .prefix("zerospice-viewer-home")
            .tempdir()?;
        let vmid = vmid.to_string();
        let mut cmd = agent_cmd(
            profile,
            &[
                "connect",
                &vmid,
                "--viewer",
                path_str(&tools.remote_viewer)?,
            ],
        );
        cmd.env("DISPLAY", &display.name)
            .env("HOME", home.path())
            .env("XDG_CONFIG_HOME", home.path().join("config"))
            .env("XDG_CACHE_HOME", home.path().join("cache"))
            .env("XDG_RUNTIME_DIR", home.path())
            .env("GDK_BACKEND", "x11")
            .env("NO_AT_BRIDGE", "1")
            .env("ZEROSPICE_LOG", "info")
            .env_remove("DBUS_SESSION_BUS_ADDRESS")
            .env_remove("WAYLAND_DISPLAY");
        let agent = Proc::spawn("agent", cmd)?;
        Ok(ViewerSession { agent, home })
    }

    /// Where the viewer's settings and runtime files go.
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// Stops the agent (it stops its viewer), then anything left below it.
    pub fn stop(&mut self) {
        let Some(pid) = self.agent.pid() else {
            return;
        };
        let below = descendants(pid);
        self.agent.signal(Signal::SIGTERM);
        let _ = self.agent.wait_exit(Duration::from_secs(5));
        terminate_pids(&below, Duration::from_secs(3));
    }
}

impl Drop for ViewerSession {
    fn drop(&mut self) {
        self.stop();
    }
}

fn path_str(p: &Path) -> anyhow::Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

// ---------------------------------------------------------------------------------------------
// The whole chain

/// The VM everything connects to.
pub const VMID: u32 = 100;
/// A VM whose SPICE server holds a certificate of another cluster (same node name, so the same
/// subject; another CA): a viewer must refuse it because of `ca`.
pub const FOREIGN_CA_VMID: u32 = 101;
/// A VM whose SPICE server holds the certificate of another node of the same cluster (the right
/// CA, subject `CN=pve2`): a viewer must refuse it because of `host-subject`.
pub const OTHER_NODE_VMID: u32 = 102;

/// Options of [`SpiceLab::start`].
#[derive(Clone, Debug, Default)]
pub struct SpiceLabOptions {
    /// Also start the VMs with wrong certificates ([`FOREIGN_CA_VMID`], [`OTHER_NODE_VMID`]).
    pub wrong_certificates: bool,
    /// Show the viewer on this existing display instead of a new Xvfb.
    pub display: Option<String>,
}

/// What [`SpiceLab::start`] reports as it goes: a step name and how long it took.
pub type Progress<'a> = &'a mut dyn FnMut(&str, Duration);

/// The stand-in, its QEMU VM(s), the gateway serving, an enrolled user, and a display.
pub struct SpiceLab {
    pub tools: Tools,
    pub lab: Lab,
    /// The QEMU of each VM id.
    pub vms: BTreeMap<u32, QemuVm>,
    pub display: Display,
    /// The enrolled profile of user `alice`, device `laptop`.
    pub profile: PathBuf,
    /// Sockets, certificates and screenshots.
    pub dir: tempfile::TempDir,
}

impl SpiceLab {
    /// Starts everything; `progress` is called after each step.
    ///
    /// Needs a multi-threaded tokio runtime (the stand-in runs in this process).
    pub async fn start(
        tools: &Tools,
        options: &SpiceLabOptions,
        progress: Progress<'_>,
    ) -> anyhow::Result<SpiceLab> {
        let mut t = Instant::now();
        let mut step = |name: &str| {
            progress(name, t.elapsed());
            t = Instant::now();
        };
        let dir = tempfile::Builder::new()
            .prefix("zerospice-spice")
            .tempdir()?;

        let mut defs = vec![VmDef::qemu(VMID, "zerospice-demo")];
        if options.wrong_certificates {
            defs.push(VmDef::qemu(FOREIGN_CA_VMID, "foreign-ca"));
            defs.push(VmDef::qemu(OTHER_NODE_VMID, "other-node-cert"));
        }
        let mut privileges = Vec::new();
        for (i, def) in defs.iter_mut().enumerate() {
            def.tls_port = 61000 + i as u16;
            privileges.push(Acl::new(
                &format!("/vms/{}", def.vmid),
                &["VM.Audit", "VM.Console"],
            ));
        }
        let vmids: Vec<u32> = defs.iter().map(|d| d.vmid).collect();
        let config = PveConfig {
            vms: defs,
            privileges,
            ..PveConfig::default()
        };
        let echo = EchoServer::start().await?;
        let mut lab = Lab::init_with(echo, config, &[]).await?;
        step("Proxmox stand-in (API + spiceproxy) started with a fresh cluster CA; gateway initialised with its own fresh CA");

        // Each VM's SPICE server presents a certificate, as on Proxmox the node's.
        let mut vms = BTreeMap::new();
        for &vmid in &vmids {
            let x509 = dir.path().join(format!("x509-{vmid}"));
            match vmid {
                FOREIGN_CA_VMID => {
                    // Another cluster: same node name, so the same subject; another CA.
                    let other = PveStandin::start(PveConfig::default()).await?;
                    other.write_spice_x509_dir(&x509)?;
                    other.shutdown().await;
                }
                OTHER_NODE_VMID => lab.pve.write_spice_x509_dir_for_node(&x509, "pve2")?,
                _ => lab.pve.write_spice_x509_dir(&x509)?,
            }
            let name = format!("vm{vmid}");
            let vm = QemuVm::start(tools, &name, &x509, &dir.path().join(&name))?;
            vms.insert(vmid, vm);
        }
        step("QEMU started (disk-less, qxl, SPICE TLS on loopback, audio + usbredir)");

        lab.serve()?;
        step("gateway serving (enrollment + access over QUIC on loopback)");

        let mut policy = Vec::new();
        for vmid in &vmids {
            policy.push("--vm".to_owned());
            policy.push(vmid.to_string());
        }
        let policy: Vec<&str> = policy.iter().map(String::as_str).collect();
        let profile = lab.user("alice", &policy)?;
        step("user alice added and her laptop enrolled (TOTP code from oathtool, software key)");

        let display = match &options.display {
            Some(name) => Display::existing(tools, name),
            None => tokio::task::block_in_place(|| Display::start_xvfb(tools))?,
        };
        if display.xvfb.is_some() {
            step(&format!("Xvfb started on display {}", display.name));
        }

        for (vmid, vm) in vms.iter_mut() {
            vm.wait_ready(STEP).await?;
            let (spice, qmp) = (vm.spice, vm.qmp.clone());
            lab.pve.update_vm(*vmid, |def| {
                def.spice_target = Some(spice);
                def.qmp_socket = Some(qmp);
            });
        }
        let main = &vms[&VMID];
        step(&format!(
            "SPICE TLS port {} up; the stand-in's spiceproxy points at it",
            main.spice
        ));
        Ok(SpiceLab {
            tools: tools.clone(),
            lab,
            vms,
            display,
            profile,
            dir,
        })
    }

    /// `zerospice-agent connect VMID` with the real remote-viewer on this lab's display.
    pub fn connect(&self, vmid: u32) -> anyhow::Result<ViewerSession> {
        ViewerSession::start(&self.tools, &self.profile, vmid, &self.display)
    }

    pub fn qemu(&self, vmid: u32) -> anyhow::Result<&QemuVm> {
        self.vms.get(&vmid).with_context(|| format!("no VM {vmid}"))
    }

    /// Takes screenshots until `vmid`'s screen (as QEMU renders it) appears on the display,
    /// or `timeout` passes. The last screenshot is left in `png` either way.
    pub async fn wait_for_screen(
        &self,
        vmid: u32,
        png: &Path,
        timeout: Duration,
    ) -> anyhow::Result<ScreenCheck> {
        let start = Instant::now();
        loop {
            let check = self.check_screen(vmid, png).await?;
            if check.found.is_some() || start.elapsed() > timeout {
                return Ok(check);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// One screenshot, searched for `vmid`'s current screen.
    pub async fn check_screen(&self, vmid: u32, png: &Path) -> anyhow::Result<ScreenCheck> {
        let guest = self.qemu(vmid)?.screendump().await?;
        let shot = tokio::task::block_in_place(|| self.display.screenshot(png))?;
        // An error means the guest has not drawn anything yet: nothing can be seen.
        let found = shot.find(&guest).unwrap_or_default();
        Ok(ScreenCheck { guest, shot, found })
    }

    /// Successful spiceproxy CONNECTs for `vmid` so far (one per SPICE channel).
    pub fn channels_through_spiceproxy(&self, vmid: u32) -> usize {
        self.lab
            .pve
            .connects()
            .iter()
            .filter(|c| c.vmid == Some(vmid) && c.status == Some(200))
            .count()
    }

    /// Waits until the gateway's audit trail has the `session.ended` record of `vmid` and
    /// returns it.
    pub fn wait_session_ended(
        &self,
        vmid: u32,
        timeout: Duration,
    ) -> anyhow::Result<serde_json::Value> {
        let start = Instant::now();
        loop {
            let audit = self.lab.audit()?;
            if let Some(r) = audit
                .iter()
                .rev()
                .find(|r| r["event"] == "session.ended" && r["detail"]["vmid"] == vmid)
            {
                return Ok(r.clone());
            }
            if start.elapsed() > timeout {
                bail!("no session.ended record for VM {vmid} within {timeout:?}: {audit:#?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// One look at the display.
pub struct ScreenCheck {
    /// The guest screen QEMU rendered.
    pub guest: Rgb,
    /// The whole X screen.
    pub shot: Rgb,
    /// Where the guest screen was found in the screenshot.
    pub found: Option<(usize, usize)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descendants_are_found_and_terminated_by_pid() {
        // sh -> sleep (a grandchild of this test once sh forks it).
        let mut sh = Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .spawn()
            .unwrap();
        let start = Instant::now();
        let below = loop {
            let d = descendants(sh.id());
            if !d.is_empty() || start.elapsed() > Duration::from_secs(5) {
                break d;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(below.len(), 1, "{below:?}");
        assert!(alive(below[0]));
        terminate_pids(&below, Duration::from_secs(3));
        assert!(!alive(below[0]), "the sleep survived");
        // sh's `wait` returns once its child is gone.
        let status = sh.wait().unwrap();
        assert!(status.success());
        assert!(descendants(sh.id()).is_empty());
    }
}
