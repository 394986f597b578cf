//! `zerospice-bench`: the SPICE tunnel's speed, side by side with `ssh -L` and a direct TCP
//! connection, on loopback. Run it through `scripts/bench` (release build, installs sshd).
//!
//! Each path ends at the same target server (in this process): bulk upload (the client writes
//! N bytes, the server counts them), bulk download (the server writes N bytes) and request/response
//! round trips of 64 bytes (an interactive SPICE input/cursor exchange is about that size).
//!
//! Paths:
//! - `direct`: TCP to the target (the machine's ceiling).
//! - `ssh -L`: what an administrator would do instead: a real OpenSSH client and server on
//!   loopback forwarding a local port to the Proxmox (stand-in) spiceproxy, which the client
//!   CONNECTs through with the session's ticket, as remote-viewer would.
//! - `zerospice`: the real `zerospice-agent connect --no-viewer` proxy -> QUIC -> the real
//!   `zerospice-gateway` -> the same spiceproxy -> the target.
//!
//! Both tunnels cross the stand-in's spiceproxy relay, which runs in this process on the same
//! two cores (on a real installation it runs on the Proxmox node).
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use zerospice_tests::echo::EchoServer;
use zerospice_tests::harness::Proc;
use zerospice_tests::lab::{connect_through, Connected, Lab};
use zerospice_tests::pve::PveConfig;

/// Measure the ZeroSpice tunnel against ssh -L and direct TCP on loopback.
#[derive(Parser)]
struct Opts {
    /// Bytes per bulk transfer (each direction).
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
    /// Round trips of 64 bytes.
    #[arg(long, default_value_t = 5000)]
    pings: usize,
    /// Repetitions of each bulk transfer (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Skip the ssh -L comparison (no sshd on this machine).
    #[arg(long)]
    no_ssh: bool,
}

const CHUNK: usize = 256 * 1024;
const PING: usize = 64;

/// The target server: `U` upload (count until EOF, answer the count), `D<u64>` download,
/// `P` ping-pong (echo 64-byte messages).
async fn target() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = serve(s).await;
            });
        }
    });
    Ok(addr)
}

/// Reads until EOF; returns the byte count.
async fn drain(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0u64;
    loop {
        let r = s.read(&mut buf).await?;
        if r == 0 {
            return Ok(n);
        }
        n += r as u64;
    }
}

async fn serve(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut kind = [0u8; 1];
    s.read_exact(&mut kind).await?;
    match kind[0] {
        b'U' => {
            let n = drain(&mut s).await?;
            s.write_all(&n.to_be_bytes()).await?;
            s.shutdown().await?;
        }
        b'D' => {
            let mut len = [0u8; 8];
            s.read_exact(&mut len).await?;
            let mut left = u64::from_be_bytes(len);
            let buf = vec![0x5au8; CHUNK];
            while left > 0 {
                let k = left.min(CHUNK as u64) as usize;
                s.write_all(&buf[..k]).await?;
                left -= k as u64;
            }
            s.shutdown().await?;
        }
        b'P' => {
            let mut buf = [0u8; PING];
            loop {
                if s.read_exact(&mut buf).await.is_err() {
                    break;
                }
                s.write_all(&buf).await?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// How to open a connection to the target along one path.
enum Route {
    Direct(SocketAddr),
    /// The local end of `ssh -L` to the spiceproxy, and the ticket authority to CONNECT to.
    Ssh(SocketAddr, String),
    Tunnel(Box<Connected>),
}

impl Route {
    fn name(&self) -> &'static str {
        match self {
            Route::Direct(_) => "direct TCP",
            Route::Ssh(..) => "ssh -L",
            Route::Tunnel(_) => "zerospice",
        }
    }

    async fn open(&self) -> anyhow::Result<TcpStream> {
        let s = match self {
            Route::Direct(a) => TcpStream::connect(a).await?,
            Route::Ssh(local, authority) => proxied(*local, authority, "spiceproxy").await?,
            Route::Tunnel(c) => proxied(c.proxy, &c.authority(), "the agent").await?,
        };
        s.set_nodelay(true)?;
        Ok(s)
    }
}

/// An HTTP CONNECT through `proxy` to the SPICE ticket `authority`, as remote-viewer does.
async fn proxied(proxy: SocketAddr, authority: &str, who: &str) -> anyhow::Result<TcpStream> {
    let (s, head) = connect_through(proxy, authority, authority).await?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{who} answered {head:?}");
    }
    Ok(s)
}

async fn upload(p: &Route, bytes: u64) -> anyhow::Result<Duration> {
    let mut s = p.open().await?;
    let buf = vec![0xa5u8; CHUNK];
    let start = Instant::now();
    s.write_all(b"U").await?;
    let mut left = bytes;
    while left > 0 {
        let k = left.min(CHUNK as u64) as usize;
        s.write_all(&buf[..k]).await?;
        left -= k as u64;
    }
    s.shutdown().await?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n).await?;
    let took = start.elapsed();
    if u64::from_be_bytes(n) != bytes {
        bail!(
            "target counted {} bytes, sent {bytes}",
            u64::from_be_bytes(n)
        );
    }
    Ok(took)
}

async fn download(p: &Route, bytes: u64) -> anyhow::Result<Duration> {
    let mut s = p.open().await?;
    let start = Instant::now();
    s.write_all(b"D").await?;
    s.write_all(&bytes.to_be_bytes()).await?;
    let n = drain(&mut s).await?;
    let took = start.elapsed();
    if n != bytes {
        bail!("received {n} bytes, expected {bytes}");
    }
    Ok(took)
}

async fn pings(p: &Route, count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut s = p.open().await?;
    s.write_all(b"P").await?;
    let mut msg = [7u8; PING];
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        msg[0] = i as u8;
        let t = Instant::now();
        s.write_all(&msg).await?;
        let mut back = [0u8; PING];
        s.read_exact(&mut back).await?;
        out.push(t.elapsed());
        if back != msg {
            bail!("ping {i} came back altered");
        }
    }
    Ok(out)
}

struct Row {
    path: &'static str,
    up_gbit: f64,
    down_gbit: f64,
    median_us: f64,
    p99_us: f64,
    max_ms: f64,
}

fn gbit(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / d.as_secs_f64() / 1e9
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn measure(p: &Route, o: &Opts) -> anyhow::Result<Row> {
    let mut ups = Vec::new();
    let mut downs = Vec::new();
    for _ in 0..o.runs.max(1) {
        ups.push(
            tokio::time::timeout(Duration::from_secs(300), upload(p, o.bytes))
                .await
                .context("upload timed out")??,
        );
        downs.push(
            tokio::time::timeout(Duration::from_secs(300), download(p, o.bytes))
                .await
                .context("download timed out")??,
        );
    }
    let mut rtt = tokio::time::timeout(Duration::from_secs(300), pings(p, o.pings))
        .await
        .context("round trips timed out")??;
    rtt.sort();
    let pct = |q: f64| rtt[((rtt.len() as f64 - 1.0) * q) as usize];
    Ok(Row {
        path: p.name(),
        up_gbit: gbit(o.bytes, median(ups)),
        down_gbit: gbit(o.bytes, median(downs)),
        median_us: pct(0.5).as_secs_f64() * 1e6,
        p99_us: pct(0.99).as_secs_f64() * 1e6,
        max_ms: rtt.last().map_or(0.0, |d| d.as_secs_f64() * 1e3),
    })
}

/// A throwaway OpenSSH server on loopback and `ssh -N -L` through it to `target`.
struct SshForward {
    _dir: tempfile::TempDir,
    _sshd: Proc,
    _ssh: Proc,
    local: SocketAddr,
}

fn free_tcp_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_port(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            bail!("{what} did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

impl SshForward {
    fn start(target: SocketAddr) -> anyhow::Result<SshForward> {
        let sshd = which("sshd").context("sshd not found: apt-get install openssh-server")?;
        let dir = tempfile::tempdir()?;
        let d = dir.path();
        for (key, comment) in [("host", "host"), ("user", "user")] {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
                .arg(d.join(key))
                .status()?;
            if !st.success() {
                bail!("ssh-keygen failed");
            }
        }
        std::fs::copy(d.join("user.pub"), d.join("authorized_keys"))?;
        std::fs::create_dir_all("/run/sshd")?;
        let port = free_tcp_port()?;
        let config = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {h}\nAuthorizedKeysFile {a}\nPidFile {p}\n\
             StrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\nAllowTcpForwarding yes\nPrintMotd no\n",
            h = d.join("host").display(),
            a = d.join("authorized_keys").display(),
            p = d.join("sshd.pid").display(),
        );
        std::fs::write(d.join("sshd_config"), config)?;
        let mut c = Command::new(sshd);
        c.args(["-D", "-e", "-f"]).arg(d.join("sshd_config"));
        let sshd = Proc::spawn("sshd", c)?;
        wait_port(SocketAddr::from(([127, 0, 0, 1], port)), "sshd")?;
        let local = SocketAddr::from(([127, 0, 0, 1], free_tcp_port()?));
        let mut c = Command::new("ssh");
        c.args(["-N", "-T", "-i"])
            .arg(d.join("user"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ExitOnForwardFailure=yes",
                "-p",
                &port.to_string(),
                "-L",
                &format!("{local}:{target}"),
                "root@127.0.0.1",
            ])
            .stdin(Stdio::null());
        let ssh = Proc::spawn("ssh", c)?;
        wait_port(local, "ssh -L")?;
        Ok(SshForward {
            _dir: dir,
            _sshd: sshd,
            _ssh: ssh,
            local,
        })
    }
}

fn version(cmd: &str, arg: &str) -> String {
    Command::new(cmd)
        .arg(arg)
        .output()
        .map(|o| {
            let s = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&s)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = Opts::parse();
    let target = target().await?;
    eprintln!("target server on {target}");

    let echo = EchoServer::start().await?;
    let mut config = PveConfig::example();
    config.vm_mut(100).context("vm 100")?.spice_target = Some(target);
    let mut lab = Lab::init_with(echo, config, &[]).await?;
    lab.serve()?;
    let profile = lab.user("bench", &["--vm", "100"])?;

    let mut rows = Vec::new();
    let direct = Route::Direct(target);
    eprintln!("measuring {} ...", direct.name());
    rows.push(measure(&direct, &o).await?);

    // One session for both tunnels: its ticket is what an admin's `ssh -L` to spiceproxy would
    // use too. One idle channel keeps the session alive, as a viewer keeps its main channel (a
    // session with no channel ends when its 30 s opening window passes).
    let conn = tokio::task::block_in_place(|| Connected::start(&profile, 100))?;
    let authority = conn.authority();
    let tunnel = Route::Tunnel(Box::new(conn));
    let mut keeper = tunnel.open().await?;
    keeper.write_all(b"P").await?;
    let mut ssh = None;
    if !o.no_ssh {
        let spiceproxy = lab.pve.spiceproxy_addr();
        let fwd = tokio::task::block_in_place(|| SshForward::start(spiceproxy))?;
        let route = Route::Ssh(fwd.local, authority);
        ssh = Some(fwd);
        eprintln!("measuring {} ...", route.name());
        rows.push(measure(&route, &o).await?);
    }
    eprintln!("measuring {} ...", tunnel.name());
    rows.push(measure(&tunnel, &o).await?);
    drop(keeper);

    println!(
        "{} bytes per transfer, median of {} runs; {} round trips of {PING} bytes",
        o.bytes, o.runs, o.pings
    );
    println!(
        "machine: {} cores, {}; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        version("uname", "-r"),
        version("ssh", "-V")
    );
    println!();
    println!(
        "| path | upload Gbit/s | download Gbit/s | RTT median µs | RTT p99 µs | RTT max ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.0} | {:.0} | {:.1} |",
            r.path, r.up_gbit, r.down_gbit, r.median_us, r.p99_us, r.max_ms
        );
    }
    drop(ssh);
    Ok(())
}
