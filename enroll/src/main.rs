//! `zerospice-enroll`: the one-time enrollment of this device with a ZeroSpice gateway.
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use std::sync::Arc;
use zerospice_ca::identity::format_unix;
use zerospice_ca::piv::{self, PivSlot, DEFAULT_SLOT};
use zerospice_ca::DeviceName;
use zerospice_ca::KeyAlgorithm;
use zerospice_enroll::core::default_device_name;
use zerospice_enroll::hardware::{TerminalPrompt, YubikeySource};
use zerospice_enroll::profile::{default_dir, ProfileDir};
use zerospice_enroll::{enroll, EnrollOptions, KeySource, Progress, SoftwareKeySource};
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
/// With --key yubikey the key is generated inside your YubiKey instead (docs/YUBIKEY.md); its PIN
/// is asked on the terminal, or taken from the environment variable ZEROSPICE_PIV_PIN.
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
    /// Where the key is generated: `software` (stored 0600 in the profile) or `yubikey[:SLOT]`
    /// (generated inside a YubiKey PIV slot, default 9a, and never leaving it; the gateway
    /// checks the YubiKey's attestation).
    #[arg(
        long,
        default_value = "software",
        value_name = "software|yubikey[:SLOT]"
    )]
    key: String,
    /// Key type: p256 or p384.
    #[arg(long, default_value = "p256", value_parser = ["p256", "p384"])]
    algorithm: String,
    /// The YubiKey to use, by serial number (needed when several are inserted).
    #[arg(long, value_name = "SERIAL")]
    yubikey_serial: Option<u32>,
    /// YubiKey: when the PIN is needed: never, once (per session) or always (every signature).
    #[arg(long, default_value = "once")]
    pin_policy: zerospice_ca::attestation::PinPolicy,
    /// YubiKey: when a touch is needed: never, cached (once per 15 s) or always.
    #[arg(long, default_value = "cached")]
    touch_policy: zerospice_ca::attestation::TouchPolicy,
    /// YubiKey: replace a key already in the slot without asking (the old key is destroyed).
    #[arg(long)]
    overwrite_slot: bool,
    /// YubiKey: a file holding the management key (48 hex digits), if it is neither the factory
    /// default nor PIN-protected.
    #[arg(long, value_name = "FILE")]
    management_key_file: Option<PathBuf>,
    /// YubiKey: replace the factory default management key: `protected` (a random key kept on
    /// the YubiKey behind the PIN) or `random` (shown once, for you to store).
    #[arg(long, value_name = "protected|random", value_parser = ["protected", "random"])]
    set_management_key: Option<String>,
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

/// Asks on the terminal; without one, answers no (the errors then name the flags).
struct TerminalQuestions;

impl piv::GenerateQuestions for TerminalQuestions {
    fn overwrite(&self, serial: u32, slot: PivSlot) -> bool {
        if !std::io::stdin().is_terminal() {
            return false;
        }
        let answer = prompt(&format!(
            "Slot {slot} of YubiKey {serial} already holds a key. Replace it? The old key is destroyed. [y/N] "
        ))
        .unwrap_or_default();
        matches!(answer.as_str(), "y" | "Y" | "yes")
    }

    fn replace_default_management_key(&self, serial: u32) -> Option<piv::NewManagementKey> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        println!("YubiKey {serial} still uses the factory default management key: anyone with the key in hand can replace its keys.");
        let answer = prompt(
            "Replace it with [p]rotected (random, kept on the YubiKey behind your PIN), [r]andom (shown once for you to store), or [k]eep it? [p/r/K] ",
        )
        .unwrap_or_default();
        match answer.as_str() {
            "p" | "P" | "protected" => Some(piv::NewManagementKey::Protected),
            "r" | "R" | "random" => Some(piv::NewManagementKey::Random),
            _ => None,
        }
    }
}

fn yubikey_source(
    cli: &Cli,
    algorithm: KeyAlgorithm,
    slot: PivSlot,
) -> anyhow::Result<Box<dyn KeySource>> {
    let management_key = match &cli.management_key_file {
        Some(path) => {
            let text = zeroize::Zeroizing::new(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
            );
            Some(piv::parse_management_key(&text)?)
        }
        None => None,
    };
    let new_management_key = match cli.set_management_key.as_deref() {
        Some("random") => Some(piv::NewManagementKey::Random),
        Some(_) => Some(piv::NewManagementKey::Protected),
        None => None,
    };
    Ok(Box::new(YubikeySource {
        options: piv::GenerateOptions {
            serial: cli.yubikey_serial,
            slot,
            algorithm,
            pin_policy: cli.pin_policy,
            touch_policy: cli.touch_policy,
            overwrite: cli.overwrite_slot,
            management_key,
            new_management_key,
        },
        prompt: Arc::new(TerminalPrompt),
        questions: Box::new(TerminalQuestions),
    }))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let invite_text = match cli.invite.clone() {
        Some(i) => i,
        None => prompt("Invitation: ")?,
    };
    let invitation: Invitation = invite_text.parse()?;
    let device = match &cli.device {
        Some(d) => DeviceName::new(d)?,
        None => default_device_name(),
    };
    let algorithm = match cli.algorithm.as_str() {
        "p384" => KeyAlgorithm::EcdsaP384,
        _ => KeyAlgorithm::EcdsaP256,
    };
    let keys: Box<dyn KeySource> = match cli.key.split_once(':') {
        None if cli.key == "software" => Box::new(SoftwareKeySource { algorithm }),
        None if cli.key == "yubikey" => yubikey_source(&cli, algorithm, DEFAULT_SLOT)?,
        Some(("yubikey", slot)) => yubikey_source(&cli, algorithm, slot.parse()?)?,
        _ => anyhow::bail!(
            "unknown key kind {:?}: use software, yubikey or yubikey:SLOT (e.g. yubikey:9a)",
            cli.key
        ),
    };
    let profile = ProfileDir::new(cli.profile.clone().unwrap_or_else(default_dir));
    if !cli.json {
        println!(
            "Enrolling {}@{} with the gateway at {}",
            invitation.user, device, invitation.gateway
        );
        println!("  pinned CA: {}", invitation.fingerprint_text());
    }
    let code = match cli.code.clone() {
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
        keys.as_ref(),
        |p| {
            if let Progress::Notice(n) = &p {
                eprintln!("warning: {n}");
                return;
            }
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
                Progress::Notice(_) => {}
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
