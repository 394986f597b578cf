//! Running the real ZeroSpice binaries in temporary directories (ripgrep's `tests/util.rs` idea).
//!
//! Every process is started by the test, its output captured, and killed when the handle drops;
//! every wait is bounded.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Path of a workspace binary (built by `cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    find_bin(name).unwrap_or_else(|e| panic!("{e}"))
}

/// Path of a workspace binary next to the running executable, or why it is not there.
pub fn find_bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running executable")?;
    // target/debug/deps/test-xxxx -> target/debug; target/debug/zerospice-sandbox -> target/debug
    let dir = exe
        .parent()
        .and_then(|d| {
            if d.ends_with("deps") {
                d.parent()
            } else {
                Some(d)
            }
        })
        .context("no target directory")?;
    let p = dir.join(name);
    if !p.exists() {
        bail!(
            "{} is missing: run `cargo build --workspace --bins` first (the README test command and scripts/sandbox do)",
            p.display()
        );
    }
    Ok(p)
}

/// A UDP port free on loopback right now.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free udp port")
}

/// A background process with captured output, killed on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            let tag = name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("ZEROSPICE_TEST_VERBOSE").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    let mut l = log.lock().unwrap_or_else(|p| p.into_inner());
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits until the output contains `needle`, or fails after `timeout` (or if the process died).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if self.log().contains(needle) {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    std::thread::sleep(Duration::from_millis(50));
                    bail!(
                        "{} exited ({status}) before printing {needle:?}:\n{}",
                        self.name,
                        self.log()
                    );
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}:\n{}",
                    self.name,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) {
        if let Some(pid) = self.pid() {
            let _ = kill(Pid::from_raw(pid as i32), sig);
        }
    }

    /// Waits for exit at most `timeout`; kills it if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, now.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs a command to completion with a time limit.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let start = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            return Ok(child.wait_with_output()?);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            bail!(
                "command timed out after {timeout:?}: {cmd:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A user just added, with what the administrator hands over.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub name: String,
    pub otpauth_uri: String,
    pub secret_base32: String,
    pub invitation: String,
}

/// A gateway state directory made by `zerospice-gateway init`.
pub struct GatewayHome {
    pub dir: tempfile::TempDir,
    pub enroll_port: u16,
    pub access_port: u16,
}

impl GatewayHome {
    /// `init` on loopback with fresh ports; `extra` is appended to the init arguments.
    pub fn init(extra: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let enroll_port = free_udp_port();
        let mut access_port = free_udp_port();
        while access_port == enroll_port {
            access_port = free_udp_port();
        }
        let home = Self {
            dir,
            enroll_port,
            access_port,
        };
        let mut args = vec![
            "init".to_string(),
            "--listen".into(),
            "127.0.0.1".into(),
            "--enroll-port".into(),
            enroll_port.to_string(),
            "--access-port".into(),
            access_port.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        home.run_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(home)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(bin("zerospice-gateway"));
        c.arg("--dir").arg(self.path());
        c.env_remove("ZEROSPICE_CONFIG").env_remove("ZEROSPICE_LOG");
        c
    }

    /// Runs an admin command; fails with its output if it fails.
    pub fn run_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut c = self.cmd();
        c.args(args);
        let out = run_bounded(c, Duration::from_secs(30))?;
        if !out.status.success() {
            bail!(
                "zerospice-gateway {args:?} failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs an admin command expected to fail; returns its stderr.
    pub fn run_err(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut c = self.cmd();
        c.args(args);
        let out = run_bounded(c, Duration::from_secs(30))?;
        if out.status.success() {
            bail!("zerospice-gateway {args:?} succeeded unexpectedly");
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    pub fn add_user(&self, name: &str, extra: &[&str]) -> anyhow::Result<NewUser> {
        let mut args = vec!["--json", "user", "add", name];
        args.extend_from_slice(extra);
        let out = self.run_ok(&args)?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let uri = v["otpauth_uri"].as_str().context("otpauth_uri")?.to_owned();
        let secret = uri
            .split(['?', '&'])
            .find_map(|p| p.strip_prefix("secret="))
            .context("secret in otpauth uri")?
            .to_owned();
        Ok(NewUser {
            name: name.into(),
            otpauth_uri: uri,
            secret_base32: secret,
            invitation: v["invitation"].as_str().context("invitation")?.to_owned(),
        })
    }

    /// Starts `serve` and waits for it to be ready.
    pub fn serve(&self) -> anyhow::Result<Proc> {
        let mut c = self.cmd();
        c.arg("serve")
            .env("ZEROSPICE_LOG", "info,zerospice_gateway=debug");
        let mut p = Proc::spawn("gateway", c)?;
        p.wait_for("gateway ready", Duration::from_secs(20))?;
        Ok(p)
    }

    pub fn db(&self) -> PathBuf {
        self.path().join("state.db")
    }
}

/// The current TOTP code computed independently by `oathtool`.
pub fn oathtool(secret_base32: &str) -> anyhow::Result<String> {
    oathtool_at(secret_base32, None)
}

/// The TOTP code at a unix time (`oathtool --now`).
pub fn oathtool_at(secret_base32: &str, unix: Option<i64>) -> anyhow::Result<String> {
    let mut c = Command::new("oathtool");
    c.args(["--totp", "-b", secret_base32]);
    if let Some(t) = unix {
        c.arg("--now").arg(format!("@{t}"));
    }
    let out = run_bounded(c, Duration::from_secs(10))
        .context("running oathtool (Debian package oathtool)")?;
    if !out.status.success() {
        bail!("oathtool failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A 6-digit code that is none of the codes valid around now.
pub fn wrong_code(secret_base32: &str) -> anyhow::Result<String> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let valid: Vec<String> = [-60, -30, 0, 30, 60]
        .iter()
        .map(|d| oathtool_at(secret_base32, Some(now + d)))
        .collect::<Result<_, _>>()?;
    let mut n: u32 = valid[2].parse()?;
    loop {
        n = (n + 1) % 1_000_000;
        let c = format!("{n:06}");
        if !valid.contains(&c) {
            return Ok(c);
        }
    }
}

/// `zerospice-enroll` as a command (not yet run).
pub fn enroll_cmd(invitation: &str, code: &str, device: &str, profile: &Path) -> Command {
    let mut c = Command::new(bin("zerospice-enroll"));
    c.args(["--invite", invitation, "--code", code, "--device", device])
        .arg("--profile")
        .arg(profile)
        .env_remove("ZEROSPICE_PROFILE");
    c
}

/// Runs `zerospice-enroll` to completion.
pub fn enroll(
    invitation: &str,
    code: &str,
    device: &str,
    profile: &Path,
) -> anyhow::Result<Output> {
    run_bounded(
        enroll_cmd(invitation, code, device, profile),
        Duration::from_secs(60),
    )
}

/// File mode bits.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.mode() & 0o7777)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
