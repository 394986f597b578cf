//! `zerospice-virtual-piv`: a test-only virtual YubiKey PIV card.
//!
//! Runs Nitrokey's `piv-authenticator` applet on the trussed software platform, wraps it so that
//! it answers like a YubiKey 5 (firmware 5.4.3) with test attestation, and plugs it into pcscd
//! through vsmartcard's vpcd reader. FOR TESTS ONLY: the trussed platform's RNG has a fixed seed.

mod attestation;
mod card;
mod dispatch;

use std::{
    io::Write as _,
    net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs as _},
    path::PathBuf,
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;
use piv_authenticator::{Authenticator, Options};
use signal_hook::consts::{SIGINT, SIGTERM};
use trussed::virt::{StorageConfig, StoreConfig};

/// How long to wait for vpcd (at start and after losing it).
const VPCD_WAIT: Duration = Duration::from_secs(10);
/// Size of trussed's virt file storage (fixed by trussed 0.2: 128 blocks of 512 bytes).
const TRUSSED_STORE_SIZE: u64 = 512 * 128;

/// Test-only virtual YubiKey (PIV) for pcscd + vsmartcard-vpcd.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Address of vpcd (the vsmartcard virtual reader loaded by pcscd).
    #[arg(long, default_value = "127.0.0.1:35963")]
    vpcd: String,

    /// Directory of the test attestation PKI: test-piv-root.pem, test-f9.pem, test-f9.key
    /// (generated when missing, reused otherwise).
    #[arg(long)]
    attestation_dir: PathBuf,

    /// Device serial the card reports (GET SERIAL and attestation extension .3.7).
    #[arg(long, default_value_t = 12_345_678)]
    serial: u32,

    /// Keep the card's contents in this directory across runs. Without it the card lives in RAM
    /// and every run starts factory-fresh (PIN 123456, PUK 12345678, default 3DES management key).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let default_filter = "warn,zerospice_virtual_piv=info,piv_authenticator=off";
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
        .target(env_logger::Target::Stderr)
        .init();
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zerospice-virtual-piv: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    let vpcd = resolve(&cli.vpcd)?;
    let pki = attestation::TestPki::load_or_create(&cli.attestation_dir, card::FIRMWARE)?;

    let shutdown = Arc::new(AtomicBool::new(false));
    let connection: Arc<Mutex<Option<TcpStream>>> = Arc::new(Mutex::new(None));
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    {
        let shutdown = Arc::clone(&shutdown);
        let connection = Arc::clone(&connection);
        thread::spawn(move || {
            if let Some(signal) = signals.forever().next() {
                log::info!("signal {signal}: shutting down");
                shutdown.store(true, Ordering::SeqCst);
                if let Ok(guard) = connection.lock() {
                    if let Some(stream) = guard.as_ref() {
                        let _ = stream.shutdown(Shutdown::Both);
                    }
                }
            }
        });
    }

    let (store, state_file) = match &cli.state_dir {
        None => (StoreConfig::ram(), None),
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let internal = store_file(dir, "trussed-internal.bin")?;
            let external = store_file(dir, "trussed-external.bin")?;
            let store = StoreConfig {
                internal: StorageConfig::filesystem(internal),
                external: StorageConfig::filesystem(external),
                volatile: StorageConfig::ram(),
            };
            (store, Some(dir.join("yubikey-emulation.txt")))
        }
    };

    trussed::virt::with_platform(store, |platform| {
        platform.run_client_with_backends(
            "piv",
            dispatch::Dispatch::default(),
            dispatch::BACKENDS,
            |client| {
                let piv = Authenticator::new(client, Options::default());
                let mut card = card::YubiKeyCard::new(piv, pki, cli.serial, state_file)?;
                serve(&mut card, vpcd, cli.serial, &shutdown, &connection)
            },
        )
    })
}

/// Connects the card to vpcd and serves it until a signal; reconnects when vpcd goes away.
fn serve(
    card: &mut card::YubiKeyCard<'_>,
    vpcd: SocketAddr,
    serial: u32,
    shutdown: &AtomicBool,
    connection: &Mutex<Option<TcpStream>>,
) -> Result<()> {
    let mut announced = false;
    loop {
        let Some(stream) = connect(vpcd, shutdown)? else {
            return Ok(());
        };
        let control = stream.try_clone().context("cloning the vpcd socket")?;
        *connection
            .lock()
            .map_err(|_| anyhow!("connection lock poisoned"))? = Some(control);
        if shutdown.load(Ordering::SeqCst) {
            return Ok(());
        }
        if announced {
            log::info!("reconnected to vpcd at {vpcd}");
        } else {
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout, "virtual PIV card ready serial={serial}")
                .and_then(|()| stdout.flush())
                .context("writing to stdout")?;
            announced = true;
        }
        let result = vpicc::Connection::from(stream).run(card);
        *connection
            .lock()
            .map_err(|_| anyhow!("connection lock poisoned"))? = None;
        if shutdown.load(Ordering::SeqCst) {
            return Ok(());
        }
        match result {
            Err(e) => log::warn!("connection to vpcd lost ({e}); reconnecting"),
            Ok(()) => log::warn!("connection to vpcd ended; reconnecting"),
        }
        // The card was "unplugged": its security status goes.
        vpicc::VSmartCard::power_off(card);
    }
}

/// Connects to vpcd, retrying for at most [`VPCD_WAIT`]. `None` when a signal came first.
fn connect(vpcd: SocketAddr, shutdown: &AtomicBool) -> Result<Option<TcpStream>> {
    let deadline = Instant::now() + VPCD_WAIT;
    loop {
        if shutdown.load(Ordering::SeqCst) {
            return Ok(None);
        }
        match TcpStream::connect_timeout(&vpcd, Duration::from_secs(1)) {
            Ok(stream) => {
                stream.set_nodelay(true).ok();
                log::info!("connected to vpcd at {vpcd}");
                return Ok(Some(stream));
            }
            Err(e) if Instant::now() >= deadline => bail!(
                "vpcd is not reachable at {vpcd} after {} s ({e}); is pcscd running with \
                 vsmartcard-vpcd installed?",
                VPCD_WAIT.as_secs()
            ),
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn resolve(address: &str) -> Result<SocketAddr> {
    address
        .to_socket_addrs()
        .with_context(|| format!("bad --vpcd address {address:?}"))?
        .next()
        .ok_or_else(|| anyhow!("--vpcd {address:?} resolves to nothing"))
}

/// A trussed storage file: trussed asserts on a wrong size, so check it first.
fn store_file(dir: &std::path::Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    if let Ok(meta) = std::fs::metadata(&path) {
        if meta.len() != TRUSSED_STORE_SIZE {
            bail!(
                "{} has {} bytes, not the {TRUSSED_STORE_SIZE} of a trussed store",
                path.display(),
                meta.len()
            );
        }
    }
    Ok(path)
}
