//! `zerospice-gateway`: thin shell over the library.
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use zerospice_gateway::admin::{self, InitOptions, Out, ProxmoxInit, RevokeTarget};
use zerospice_gateway::check;
use zerospice_gateway::paths::{Paths, DEFAULT_DIR};
use zerospice_gateway::store::UserPolicy;

/// ZeroSpice gateway: SPICE consoles of Proxmox VMs over mutual-TLS QUIC, without exposing Proxmox.
///
/// The gateway holds the Proxmox API token and the ZeroSpice CA. Users enroll once with a TOTP
/// code and get a client certificate; every later request is authenticated by that certificate.
///
/// Typical first run:
///   zerospice-gateway init --listen 10.147.17.5 --proxmox-url https://pve.lan:8006 ...
///   zerospice-gateway user add alice --vm 100
///   zerospice-gateway serve
#[derive(Parser)]
#[command(name = "zerospice-gateway", version, verbatim_doc_comment)]
struct Cli {
    /// State directory (CA, database). Created 0700 by `init`.
    #[arg(long, global = true, env = "ZEROSPICE_DIR", default_value = DEFAULT_DIR)]
    dir: PathBuf,
    /// Configuration file [default: DIR/gateway.toml, or /etc/zerospice/gateway.toml if that exists and DIR/gateway.toml does not]
    #[arg(long, global = true, env = "ZEROSPICE_CONFIG")]
    config: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true, env = "ZEROSPICE_JSON")]
    json: bool,
    /// Log filter (e.g. `info`, `debug`, `zerospice_gateway=trace`) [default: info for serve, warn otherwise]
    #[arg(long, global = true, env = "ZEROSPICE_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the state directory, the configuration, the CA and the database.
    ///
    /// Prints the CA fingerprint (which every enrolling client pins) and the enrollment address.
    #[command(verbatim_doc_comment)]
    Init(InitArgs),
    /// Manage users: who may enroll, and which VMs they may use.
    #[command(subcommand)]
    User(UserCmd),
    /// List and revoke client certificates.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Show the audit trail (enrollments, revocations, sessions).
    Audit {
        /// How many records, newest last.
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only this user's records.
        #[arg(long)]
        user: Option<String>,
    },
    /// Run the gateway (enrollment and access endpoints) until SIGINT/SIGTERM.
    Serve,
    /// Preflight: check files, database, listening addresses and Proxmox (token, certificate pin,
    /// privileges of the token on every VM a user may use, SPICE displays, spiceproxy).
    ///
    /// Every problem comes with the command that fixes it. Exits 1 when a check fails, so it
    /// fits a deployment script or a systemd ExecStartPre=.
    #[command(verbatim_doc_comment)]
    Check,
}

#[derive(Args)]
struct InitArgs {
    /// IP address to listen on: this host's ZeroTier address in production. Wildcards (0.0.0.0, ::) need --allow-wildcard.
    #[arg(long, env = "ZEROSPICE_LISTEN", default_value = "127.0.0.1")]
    listen: IpAddr,
    /// UDP port of the access endpoint (mutual TLS).
    #[arg(long, default_value_t = zerospice_proto::DEFAULT_ACCESS_PORT)]
    access_port: u16,
    /// UDP port of the enrollment endpoint (TOTP).
    #[arg(long, default_value_t = zerospice_proto::DEFAULT_ENROLL_PORT)]
    enroll_port: u16,
    /// Allow a wildcard listen address (every interface). Needs --public-host.
    #[arg(long)]
    allow_wildcard: bool,
    /// Host name or address clients use to reach the gateway, if not the listen address.
    #[arg(long)]
    public_host: Option<String>,
    /// Validity of issued client certificates, in days.
    #[arg(long, default_value_t = 7)]
    validity_days: u32,
    /// Proxmox API base URL, e.g. https://pve.lan:8006
    #[arg(long, env = "ZEROSPICE_PROXMOX_URL", requires = "proxmox_token_id")]
    proxmox_url: Option<String>,
    /// Proxmox API token id, e.g. zerospice@pve!gateway
    #[arg(long, env = "ZEROSPICE_PROXMOX_TOKEN_ID", requires = "proxmox_url")]
    proxmox_token_id: Option<String>,
    /// File holding the token secret (copied into DIR/proxmox-token, 0600). Use - for standard input.
    #[arg(long)]
    proxmox_token_secret_file: Option<PathBuf>,
    /// Proxmox cluster CA to verify the API (a copy of /etc/pve/pve-root-ca.pem).
    #[arg(long, conflicts_with = "proxmox_fingerprint")]
    proxmox_ca_file: Option<PathBuf>,
    /// Or the SHA-256 fingerprint of the Proxmox API certificate.
    #[arg(long)]
    proxmox_fingerprint: Option<String>,
    /// host:port of the Proxmox spiceproxy [default: the API host, port 3128]
    #[arg(long)]
    spiceproxy: Option<String>,
}

#[derive(Subcommand)]
enum UserCmd {
    /// Add a user: prints a TOTP QR code and an enrollment invitation.
    Add {
        name: String,
        #[command(flatten)]
        access: AccessArgs,
    },
    /// List users and what they may use.
    List,
    /// Remove a user and revoke all their certificates.
    Remove { name: String },
    /// Give a user a new TOTP secret (the old authenticator entry stops working).
    ResetTotp { name: String },
    /// Print a user's enrollment invitation again.
    Invite { name: String },
    /// Change what a user may use (the options given replace the current values).
    Set {
        name: String,
        #[command(flatten)]
        access: AccessArgs,
    },
}

#[derive(Args, Default)]
struct AccessArgs {
    /// A VM id the user may use (repeatable).
    #[arg(long = "vm", value_name = "VMID")]
    vms: Vec<zerospice_proto::VmId>,
    /// Every VM of this Proxmox pool (repeatable).
    #[arg(long = "pool", value_name = "POOL")]
    pools: Vec<String>,
    /// Every VM with this Proxmox tag (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    tags: Vec<String>,
    /// Allow start and shutdown of those VMs.
    #[arg(long)]
    power: bool,
    /// Only accept keys generated on a YubiKey whose attestation the gateway verified.
    #[arg(long)]
    require_hardware_key: bool,
    /// Minimum YubiKey PIN policy: once or always (implies --require-hardware-key).
    #[arg(long, value_parser = ["once", "always"])]
    min_pin_policy: Option<String>,
    /// Minimum YubiKey touch policy: cached or always (implies --require-hardware-key).
    #[arg(long, value_parser = ["cached", "always"])]
    min_touch_policy: Option<String>,
    /// Only this YubiKey serial (repeatable; implies --require-hardware-key).
    #[arg(long = "allow-serial", value_name = "SERIAL")]
    allowed_serials: Vec<u32>,
}

impl AccessArgs {
    fn policy(&self) -> UserPolicy {
        UserPolicy {
            vms: self.vms.iter().map(|v| v.get()).collect(),
            pools: self.pools.clone(),
            tags: self.tags.clone(),
            power: self.power,
            // Rules about YubiKeys imply a YubiKey.
            require_hardware: self.require_hardware_key
                || self.min_pin_policy.is_some()
                || self.min_touch_policy.is_some()
                || !self.allowed_serials.is_empty(),
            key_rules: zerospice_gateway::store::KeyRules {
                min_pin_policy: self.min_pin_policy.clone(),
                min_touch_policy: self.min_touch_policy.clone(),
                allowed_serials: self.allowed_serials.clone(),
            },
        }
    }
}

#[derive(Subcommand)]
enum CertCmd {
    /// List certificates in force (--all: also revoked and expired).
    List {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        all: bool,
    },
    /// Revoke one certificate by serial (any spelling: 0A1B.., 0a:1b:.., 0x0a1b..) or all of a user's.
    Revoke {
        #[arg(required_unless_present = "user", conflicts_with = "user")]
        serial: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Why (recorded in the audit trail).
        #[arg(long, default_value = "revoked by administrator")]
        reason: String,
    },
}

fn read_secret(path: &std::path::Path) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let text = if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_line(&mut s)?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let text = zeroize::Zeroizing::new(text.trim().to_owned());
    if text.is_empty() {
        anyhow::bail!("the Proxmox token secret is empty");
    }
    Ok(text)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let paths = Paths::new(cli.dir.clone(), cli.config.clone());
    let mut stdout = std::io::stdout();
    let mut out = Out {
        json: cli.json,
        w: &mut stdout,
    };
    match cli.command {
        Command::Init(a) => {
            let proxmox = match (&a.proxmox_url, &a.proxmox_token_id) {
                (Some(url), Some(id)) => Some(ProxmoxInit {
                    url: url.clone(),
                    token_id: id.clone(),
                    token_secret: a
                        .proxmox_token_secret_file
                        .as_deref()
                        .map(read_secret)
                        .transpose()?,
                    ca_file: a.proxmox_ca_file.clone(),
                    fingerprint: a.proxmox_fingerprint.clone(),
                    spiceproxy: a.spiceproxy.clone(),
                    danger_accept_invalid_certs: false,
                }),
                _ => None,
            };
            admin::init(
                &paths,
                &InitOptions {
                    listen: a.listen,
                    access_port: a.access_port,
                    enroll_port: a.enroll_port,
                    allow_wildcard: a.allow_wildcard,
                    public_host: a.public_host,
                    validity_days: a.validity_days,
                    proxmox,
                },
                &mut out,
            )
        }
        Command::User(UserCmd::Add { name, access }) => {
            admin::user_add(&paths, &name, &access.policy(), &mut out)
        }
        Command::User(UserCmd::List) => admin::user_list(&paths, &mut out),
        Command::User(UserCmd::Remove { name }) => admin::user_remove(&paths, &name, &mut out),
        Command::User(UserCmd::ResetTotp { name }) => {
            admin::user_reset_totp(&paths, &name, &mut out)
        }
        Command::User(UserCmd::Invite { name }) => admin::user_invite(&paths, &name, &mut out),
        Command::User(UserCmd::Set { name, access }) => {
            admin::user_set(&paths, &name, |p| *p = access.policy(), &mut out)
        }
        Command::Cert(CertCmd::List { user, all }) => {
            admin::cert_list(&paths, user.as_deref(), all, &mut out)
        }
        Command::Cert(CertCmd::Revoke {
            serial,
            user,
            reason,
        }) => {
            let target = match (serial, user) {
                (Some(s), None) => RevokeTarget::Serial(s),
                (None, Some(u)) => RevokeTarget::User(u),
                _ => anyhow::bail!("give a serial or --user NAME"),
            };
            admin::cert_revoke(&paths, target, &reason, &mut out)
        }
        Command::Audit { limit, user } => admin::audit(&paths, limit, user.as_deref(), &mut out),
        Command::Serve => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(zerospice_gateway::server::serve(&paths))
        }
        Command::Check => {
            let config = zerospice_gateway::config::Config::load(&paths.config)
                .with_context(|| format!("reading {}", paths.config.display()))?;
            let rt = tokio::runtime::Runtime::new()?;
            let findings = rt.block_on(check::gather(&paths, &config));
            let findings = check::evaluate(&findings);
            if out.json {
                serde_json::to_writer_pretty(&mut *out.w, &findings)?;
                writeln!(out.w)?;
            } else {
                write!(out.w, "{}", check::render(&findings))?;
            }
            if check::failed(&findings) {
                anyhow::bail!("preflight failed: fix the problems above");
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default = if matches!(cli.command, Command::Serve) {
        "info"
    } else {
        "warn"
    };
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(default))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
