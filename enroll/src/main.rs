//! `zerospice-enroll`: the one-time enrollment of this device with a ZeroSpice gateway.
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use zerospice_ca::identity::format_unix;
use zerospice_ca::DeviceName;
use zerospice_enroll::core::default_device_name;
use zerospice_enroll::profile::{default_dir, ProfileDir};
use zerospice_enroll::{enroll, EnrollOptions, Progress, SoftwareKeySource};
use zerospice_proto::invite::Invitation;

/// Enroll this device with a ZeroSpice gateway.
///
/// Your administrator gives you two things: a QR code for your authenticator app, and an
/// invitation (one line starting with zerospice-invite:). Run this with the invitation and the
/// current 6-digit code from the app. A key is generated on this device (it never leaves it),
/// the gateway checks the code and issues a certificate, and both are stored in your profile
/// directory for zerospice-agent.
///
/// The invitation pins the gateway's CA: if the gateway you reach presents another one, nothing
/// is sent.
///
/// Example:
///   zerospice-enroll --invite 'zerospice-invite:v1:alice@10.147.17.5:7444/SHA256:6d03...'
#[derive(Parser)]
#[command(name = "zerospice-enroll", version, verbatim_doc_comment)]
struct Cli {
    /// The invitation from your administrator (prompted for if missing).
    #[arg(long, env = "ZEROSPICE_INVITE")]
    invite: Option<String>,
    /// The current 6-digit code from your authenticator app (prompted for if missing).
    #[arg(long)]
    code: Option<String>,
    /// A name for this device, shown to the administrator [default: the host name].
    #[arg(long)]
    device: Option<String>,
    /// Where to store the profile [default: $XDG_CONFIG_HOME/zerospice or ~/.config/zerospice].
    #[arg(long, env = "ZEROSPICE_PROFILE")]
    profile: Option<PathBuf>,
    /// Where the key is generated: software (stored 0600 in the profile).
    #[arg(long, default_value = "software")]
    key: String,
    /// Replace an existing profile.
    #[arg(long)]
    force: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

fn prompt(question: &str) -> anyhow::Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        eprint!("{question}");
    } else {
        print!("{question}");
        std::io::stdout().flush()?;
    }
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let invite_text = match cli.invite {
        Some(i) => i,
        None => prompt("Invitation: ")?,
    };
    let invitation: Invitation = invite_text.parse()?;
    let device = match &cli.device {
        Some(d) => DeviceName::new(d)?,
        None => default_device_name(),
    };
    if cli.key != "software" {
        anyhow::bail!("unknown key kind {:?}: use software", cli.key);
    }
    let profile = ProfileDir::new(cli.profile.clone().unwrap_or_else(default_dir));
    if !cli.json {
        println!(
            "Enrolling {}@{} with the gateway at {}",
            invitation.user, device, invitation.gateway
        );
        println!("  pinned CA: {}", invitation.fingerprint_text());
    }
    let code = match cli.code {
        Some(c) => c,
        None => prompt("Code from your authenticator app: ")?,
    };
    let json = cli.json;
    let enrolled = enroll(
        EnrollOptions {
            invitation,
            code,
            device,
            profile,
            force: cli.force,
        },
        &SoftwareKeySource,
        |p| {
            if json {
                return;
            }
            match p {
                Progress::Connecting { gateway } => println!("  connecting to {gateway} ..."),
                Progress::GatewayVerified { .. } => println!("  gateway CA verified"),
                Progress::CreatingKey => println!("  generating a key ..."),
                Progress::KeyReady { key } => println!("  key ready: {key}"),
                Progress::Sending => println!("  sending the request ..."),
                Progress::Issued { serial } => println!("  certificate issued (serial {serial})"),
                Progress::Saved { dir } => println!("  saved to {dir}"),
            }
        },
    )
    .await
    .context("enrollment failed")?;
    let p = &enrolled.profile;
    if json {
        println!("{}", serde_json::to_string_pretty(p)?);
    } else {
        println!(
            "Enrolled {}@{} ({}); certificate valid until {}. The agent renews it before then.",
            p.user,
            p.device,
            enrolled.key,
            format_unix(p.not_after)
        );
        println!("Next: zerospice-agent list");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ZEROSPICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
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
