//! Runs the Proxmox VE stand-in (HTTPS API + spiceproxy daemon) from a config file until
//! SIGINT or SIGTERM, for manual runs and the sandbox.
//!
//! Prints one JSON line on stdout once both servers listen: `api_url`, `spiceproxy`, `node`,
//! `token_id`, `token_header`, `ca_path`, `spice_x509_dir`, `node_cert_sha256_fingerprint`,
//! `host_subject`. The token header carries the secret: treat the line as a credential.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use serde_json::json;
use tracing_subscriber::EnvFilter;
use zerospice_tests::pve::{PveConfig, PveStandin};

#[derive(Parser)]
#[command(version, about = "Proxmox VE stand-in for ZeroSpice tests")]
struct Args {
    /// Config file: JSON if it ends in `.json`, TOML otherwise (see --print-example-config).
    #[arg(long, required_unless_present = "print_example_config")]
    config: Option<PathBuf>,
    /// Write the cluster CA (pve-root-ca.pem) to this file.
    #[arg(long)]
    write_ca: Option<PathBuf>,
    /// Write ca-cert.pem, server-cert.pem and server-key.pem for QEMU's `-spice x509-dir=`.
    #[arg(long)]
    spice_x509_dir: Option<PathBuf>,
    /// Print the example lab as a TOML config and exit.
    #[arg(long)]
    print_example_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.print_example_config {
        print!("{}", toml::to_string_pretty(&PveConfig::example())?);
        return Ok(());
    }
    let path = args.config.context("--config is required")?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let config: PveConfig = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    } else {
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
    };
    let pve = PveStandin::start(config).await?;
    if let Some(ca) = &args.write_ca {
        pve.write_ca_pem(ca)
            .with_context(|| format!("writing {}", ca.display()))?;
    }
    if let Some(dir) = &args.spice_x509_dir {
        pve.write_spice_x509_dir(dir)
            .with_context(|| format!("writing {}", dir.display()))?;
    }
    let line = json!({
        "api_url": pve.api_url(),
        "spiceproxy": pve.spiceproxy_addr().to_string(),
        "node": pve.node(),
        "token_id": pve.token_id(),
        "token_header": pve.token_header_value(),
        "ca_path": args.write_ca,
        "spice_x509_dir": args.spice_x509_dir,
        "node_cert_sha256_fingerprint": pve.node_cert_sha256_fingerprint(),
        "host_subject": pve.host_subject(),
    });
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()?;
    drop(stdout);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    pve.shutdown().await;
    Ok(())
}
