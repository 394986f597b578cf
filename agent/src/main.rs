//! `zerospice-agent`: thin command-line shell over the agent core.
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use serde::Serialize;
use tokio::sync::mpsc;
use zerospice_agent::client::{Client, Credentials};
use zerospice_agent::proxy::{LocalProxy, ProxyEvent};
use zerospice_agent::{renew, viewer, vv};
use zerospice_ca::identity::format_unix;
use zerospice_enroll::profile::{default_dir, ProfileDir};
use zerospice_proto::access::{PowerAction, VmInfo};
use zerospice_proto::VmId;

/// ZeroSpice agent: open the SPICE console of your Proxmox VMs through your ZeroSpice gateway.
///
/// Enroll this device once with zerospice-enroll. Then every request is authenticated by the
/// certificate in your profile; Proxmox itself is never reached directly.
///
///   zerospice-agent list              the VMs you may use
///   zerospice-agent connect 100       open VM 100's console in remote-viewer
///
/// `connect` starts a proxy on 127.0.0.1 for this one session (other local users and other
/// targets are refused) and hands remote-viewer its connection file on standard input, so the
/// one-time SPICE password never touches the disk. Close the viewer or press Ctrl-C to end.
///
/// If your key is on a YubiKey, its PIN is asked when the agent starts (or taken from the
/// environment variable ZEROSPICE_PIV_PIN), and the agent says when to touch the key.
#[derive(Parser)]
#[command(name = "zerospice-agent", version, verbatim_doc_comment)]
struct Cli {
    /// Profile directory [default: $XDG_CONFIG_HOME/zerospice or ~/.config/zerospice].
    #[arg(long, global = true, env = "ZEROSPICE_PROFILE")]
    profile: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Log filter (e.g. `info`, `zerospice_agent=debug`) [default: warn].
    #[arg(long, global = true, env = "ZEROSPICE_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Who this device is to the gateway, and until when its certificate is valid.
    Whoami,
    /// The VMs you may use, with their status.
    List,
    /// One VM's status.
    Status { vmid: VmId },
    /// Open a VM's console in remote-viewer (the VM must be running and have a SPICE display).
    Connect {
        vmid: VmId,
        /// The viewer program [default: $ZEROSPICE_VIEWER or remote-viewer].
        #[arg(long, value_name = "PATH")]
        viewer: Option<PathBuf>,
        /// Do not start a viewer: print the proxy address and wait for Ctrl-C.
        #[arg(long, conflicts_with = "viewer")]
        no_viewer: bool,
        /// Also print the remote-viewer connection file (it holds the one-time password).
        #[arg(long)]
        print_vv: bool,
    },
    /// Start a VM (if your administrator granted you power actions).
    Start { vmid: VmId },
    /// Shut a VM down through ACPI (if granted).
    Shutdown { vmid: VmId },
    /// Renew this device's certificate now (it is renewed automatically when it nears expiry).
    Renew,
}

fn load(cli: &Cli) -> anyhow::Result<Credentials> {
    let dir = ProfileDir::new(cli.profile.clone().unwrap_or_else(default_dir));
    Ok(Credentials::load(dir)?)
}

/// Connects, renewing the certificate first if it nears expiry (a failed renewal is reported,
/// not fatal: the current certificate still works).
async fn connect(creds: &mut Credentials) -> anyhow::Result<Client> {
    let client = Client::connect(creds).await?;
    match renew::renew_if_due(&client, creds).await {
        Ok(Some(r)) => eprintln!(
            "Renewed this device's certificate: valid until {} (serial {}).",
            format_unix(r.not_after),
            r.serial
        ),
        Ok(None) => {}
        Err(e) => eprintln!("warning: the certificate could not be renewed: {e}"),
    }
    Ok(client)
}

fn spice_text(vm: &VmInfo) -> &'static str {
    match vm.spice {
        Some(true) => "yes",
        Some(false) => "no",
        None => "?",
    }
}

fn print_vms(vms: &[VmInfo]) {
    if vms.is_empty() {
        println!("No VMs are available to you: ask your administrator to grant you some.");
        return;
    }
    let w = vms.iter().map(|v| v.name.len()).max().unwrap_or(4).max(4);
    println!(
        "{:>6}  {:<w$}  {:<10}  {:<8}  SPICE",
        "VMID", "NAME", "NODE", "STATUS"
    );
    for v in vms {
        println!(
            "{:>6}  {:<w$}  {:<10}  {:<8}  {}",
            v.vmid.get(),
            v.name,
            v.node,
            v.status,
            spice_text(v)
        );
    }
}

fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

#[derive(Serialize)]
struct Whoami<'a> {
    user: &'a str,
    device: &'a str,
    serial: &'a str,
    not_after: i64,
    gateway: &'a str,
    gateway_version: &'a str,
    key: String,
}

#[derive(Serialize)]
struct ProxyInfo<'a> {
    proxy: String,
    session: &'a str,
    vmid: u32,
    host: &'a str,
    tls_port: u16,
    channels_until: i64,
}

fn print_event(e: &ProxyEvent) {
    match e {
        ProxyEvent::ChannelOpened { channel } => {
            tracing::info!(channel, "SPICE channel opened")
        }
        ProxyEvent::ChannelClosed {
            channel,
            up,
            down,
            error,
        } => match error {
            None => tracing::info!(channel, up, down, "SPICE channel closed"),
            Some(e) => eprintln!("SPICE channel {channel} ended with an error: {e}"),
        },
        ProxyEvent::Refused { reason } => eprintln!("refused: {reason}"),
    }
}

async fn connect_cmd(
    cli: &Cli,
    vmid: VmId,
    viewer_path: Option<PathBuf>,
    no_viewer: bool,
    print_vv: bool,
) -> anyhow::Result<()> {
    let mut creds = load(cli)?;
    let client = Arc::new(connect(&mut creds).await?);
    let outcome = session(cli, &client, vmid, viewer_path, no_viewer, print_vv).await;
    client.close().await;
    outcome
}

async fn session(
    cli: &Cli,
    client: &Arc<Client>,
    vmid: VmId,
    viewer_path: Option<PathBuf>,
    no_viewer: bool,
    print_vv: bool,
) -> anyhow::Result<()> {
    let grant = client.open_session(vmid).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let proxy = LocalProxy::start(client.clone(), &grant, tx)
        .await
        .context("starting the local proxy on 127.0.0.1")?;
    let vv = vv::vv_file(&grant, proxy.addr())?;
    eprintln!(
        "Session open on VM {} ({}); local proxy {} serves this session only.",
        grant.vmid,
        grant.title,
        proxy.addr()
    );
    if print_vv {
        eprintln!("warning: the connection file below holds the one-time SPICE password (valid about 30 s)");
        print!("{vv}");
    }
    let mut child = if no_viewer {
        if cli.json {
            println!(
                "{}",
                serde_json::to_string(&ProxyInfo {
                    proxy: format!("http://{}", proxy.addr()),
                    session: grant.session.as_str(),
                    vmid: grant.vmid.get(),
                    host: &grant.host,
                    tls_port: grant.tls_port,
                    channels_until: grant.channels_until,
                })?
            );
        } else {
            println!("proxy=http://{}", proxy.addr());
        }
        eprintln!("No viewer started (--no-viewer). Press Ctrl-C to end the session.");
        None
    } else {
        let path = viewer_path.unwrap_or_else(viewer::default_viewer);
        eprintln!("Starting {} ...", path.display());
        Some(viewer::launch(&path, &vv).await?)
    };
    drop(vv);

    let outcome: anyhow::Result<()> = {
        let viewer_done = async {
            match child.as_mut() {
                Some(c) => c.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(viewer_done);
        loop {
            tokio::select! {
                status = &mut viewer_done => {
                    break match status {
                        Ok(s) if s.success() => {
                            eprintln!("The viewer closed; session ended.");
                            Ok(())
                        }
                        Ok(s) => Err(anyhow::anyhow!("the viewer exited with {s}; session ended")),
                        Err(e) => Err(anyhow::anyhow!("waiting for the viewer: {e}")),
                    };
                }
                () = interrupted() => {
                    eprintln!("Interrupted; session ended.");
                    break Ok(());
                }
                e = client.closed() => break Err(anyhow::anyhow!("{e}")),
                Some(ev) = rx.recv() => print_event(&ev),
            }
        }
    };
    if let Some(c) = child.as_mut() {
        let _ = c.start_kill();
        let _ = c.wait().await;
    }
    drop(proxy);
    outcome
}

/// SIGINT (Ctrl-C) or SIGTERM.
async fn interrupted() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    if let Cmd::Connect {
        vmid,
        viewer,
        no_viewer,
        print_vv,
    } = &cli.command
    {
        return connect_cmd(&cli, *vmid, viewer.clone(), *no_viewer, *print_vv).await;
    }
    let mut creds = load(&cli)?;
    let client = match cli.command {
        // An explicit renewal does not first renew automatically.
        Cmd::Renew => Client::connect(&creds).await?,
        _ => connect(&mut creds).await?,
    };
    // Whatever happens, close the connection so the gateway releases it at once.
    let result = one_shot(&cli, &client, &mut creds).await;
    client.close().await;
    result
}

async fn one_shot(cli: &Cli, client: &Client, creds: &mut Credentials) -> anyhow::Result<()> {
    match &cli.command {
        Cmd::Whoami => {
            let h = &client.hello;
            let info = Whoami {
                user: &h.user,
                device: &h.device,
                serial: &h.serial,
                not_after: creds.identity.not_after,
                gateway: client.addr(),
                gateway_version: &h.gateway_version,
                key: creds.identity.key.to_string(),
            };
            if cli.json {
                print_json(&info)?;
            } else {
                println!(
                    "{}@{} at gateway {} (version {})",
                    info.user, info.device, info.gateway, info.gateway_version
                );
                println!("  key: {}", info.key);
                println!(
                    "  certificate serial {}, valid until {}",
                    creds.profile.serial,
                    format_unix(info.not_after)
                );
            }
        }
        Cmd::List => {
            let vms = client.list_vms().await?;
            if cli.json {
                print_json(&vms)?;
            } else {
                print_vms(&vms);
            }
        }
        Cmd::Status { vmid } => {
            let vm = client.vm_status(*vmid).await?;
            if cli.json {
                print_json(&vm)?;
            } else {
                print_vms(std::slice::from_ref(&vm));
            }
        }
        Cmd::Start { vmid } | Cmd::Shutdown { vmid } => {
            let action = if matches!(cli.command, Cmd::Start { .. }) {
                PowerAction::Start
            } else {
                PowerAction::Shutdown
            };
            client.power(*vmid, action).await?;
            println!("VM {vmid}: {} done.", action.as_str());
        }
        Cmd::Renew => {
            let r = renew::renew(client, creds).await?;
            println!(
                "Renewed: serial {}, valid until {}.",
                r.serial,
                format_unix(r.not_after)
            );
        }
        Cmd::Connect { .. } => unreachable!("handled in run"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or("warn"))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
