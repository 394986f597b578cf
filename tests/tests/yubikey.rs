//! YubiKey-bound laptops, end to end through the real PC/SC stack:
//! `zerospice-enroll`/`zerospice-agent` -> `yubikey` crate -> libpcsclite -> `pcscd` -> vsmartcard's
//! `vpcd` reader -> `zerospice-virtual-piv` (a test-only YubiKey 5.4.3 whose attestation chains to
//! a test root, see tests/virtual-piv/README.md).
//!
//! Each test starts `pcscd --foreground` (unless one already runs: then it is used and left
//! alone) and the virtual card, and stops what it started. The card is single-client and its RNG
//! has a fixed seed, so the tests take a lock and run one at a time. Every wait is bounded.
//!
//! Needs root (pcscd writes /run/pcscd), the Debian packages `pcscd vsmartcard-vpcd`
//! (scripts/install-deps) and the card binary, built by scripts/test-all with
//! `cargo build --manifest-path tests/virtual-piv/Cargo.toml`. Anything missing fails the test
//! with what to do: nothing here passes without having run.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zerospice_ca::attestation::{PinPolicy, TouchPolicy};
use zerospice_ca::piv::{self, GenerateOptions, PivPrompt, DEFAULT_SLOT};
use zerospice_ca::{KeyAlgorithm, Signer, SoftwareKey};
use zerospice_enroll::core::{KeySource, NewKey};
use zerospice_enroll::profile::{KeyRef, ProfileDir, ProfileError};
use zerospice_enroll::{EnrollError, EnrollOptions};
use zerospice_proto::enroll::KeyClaim;
use zerospice_tests::harness::{enroll_cmd, oathtool, run_bounded, NewUser, Proc};
use zerospice_tests::lab::{agent_cmd, echo_round_trip, Connected, Lab};

const SERIAL: u32 = 31_415_926;
const SECOND_SERIAL: u32 = 27_182_818;
const VPCD: &str = "127.0.0.1:35963";
const VPCD_SECOND: &str = "127.0.0.1:35964";
const PIN: &str = "123456";
const PIN_ENV: &str = "ZEROSPICE_PIV_PIN";
const PCSCD_SOCKET: &str = "/run/pcscd/pcscd.comm";
const PCSCD_PID_FILE: &str = "/run/pcscd/pcscd.pid";
const VPCD_DRIVER: &str = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so";
const WAIT: Duration = Duration::from_secs(20);

/// One test at a time: one pcscd, one card. (A tokio mutex: it is held across awaits, and a
/// failed test does not poison it for the others.)
static CARD_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn serialised() -> tokio::sync::MutexGuard<'static, ()> {
    CARD_LOCK.lock().await
}

fn virtual_piv_bin() -> PathBuf {
    let path = std::env::var_os("ZEROSPICE_VIRTUAL_PIV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("virtual-piv/target/debug/zerospice-virtual-piv")
        });
    assert!(
        path.exists(),
        "{} is missing: build the virtual card with `cargo build --manifest-path tests/virtual-piv/Cargo.toml` (scripts/test-all does)",
        path.display()
    );
    path
}

/// The pid of a pcscd that already runs (pid file naming a live pcscd), if any.
fn running_pcscd() -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(PCSCD_PID_FILE)
        .ok()?
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .parse()
        .ok()?;
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "pcscd").then_some(pid)
}

fn wait_until(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `pcscd --foreground`, stopped (SIGTERM) on drop; `None` inside when one already ran.
struct Pcscd(Option<Proc>);

impl Pcscd {
    fn start() -> Pcscd {
        assert!(
            Path::new(VPCD_DRIVER).exists(),
            "{VPCD_DRIVER} is missing: install the Debian packages pcscd and vsmartcard-vpcd (scripts/install-deps)"
        );
        if let Some(pid) = running_pcscd() {
            eprintln!("using the pcscd that already runs (pid {pid}); it is left running");
            return Pcscd(None);
        }
        let mut c = Command::new("pcscd");
        c.arg("--foreground");
        let mut p = Proc::spawn("pcscd", c).unwrap_or_else(|e| {
            panic!("cannot start pcscd ({e:#}): install the Debian package pcscd (scripts/install-deps)")
        });
        let pid = p.pid();
        wait_until("pcscd to start", Duration::from_secs(10), || {
            if let Some(status) = p.exited() {
                panic!("pcscd exited at start ({status}):\n{}", p.log());
            }
            running_pcscd() == pid && Path::new(PCSCD_SOCKET).exists()
        });
        Pcscd(Some(p))
    }

    fn ours(&self) -> bool {
        self.0.is_some()
    }
}

/// The virtual card, connected to vpcd; stopped (SIGTERM) on drop.
struct Card {
    proc: Proc,
    att_dir: PathBuf,
}

impl Card {
    fn start(dir: &Path, serial: u32, vpcd: &str) -> Card {
        let att_dir = dir.join("attestation");
        let mut c = Command::new(virtual_piv_bin());
        c.args(["--vpcd", vpcd, "--serial", &serial.to_string()])
            .arg("--attestation-dir")
            .arg(&att_dir)
            // debug: one line per APDU (header and status only), which tells who signed.
            .env(
                "RUST_LOG",
                "info,zerospice_virtual_piv=debug,piv_authenticator=off",
            );
        let mut proc = Proc::spawn("virtual-piv", c).expect("start the virtual card");
        proc.wait_for(
            &format!("virtual PIV card ready serial={serial}"),
            Duration::from_secs(30),
        )
        .expect("virtual card ready");
        // pcscd polls its readers: wait until the card is visible through PC/SC.
        wait_until("pcscd to see the card", WAIT, || {
            piv::open_device(Some(serial)).is_ok()
        });
        Card { proc, att_dir }
    }

    fn root_pem(&self) -> PathBuf {
        self.att_dir.join("test-piv-root.pem")
    }

    /// ECDSA P-256 signatures made with slot 9a so far (GENERAL AUTHENTICATE `00 87 11 9A`
    /// answered 9000), from the card's own APDU log.
    fn signatures_9a(&self) -> usize {
        self.proc
            .log()
            .lines()
            .filter(|l| l.contains("APDU [00, 87, 11, 9A]") && l.contains("-> 9000"))
            .count()
    }
}

/// The environment of one test: pcscd, the card and a gateway against the Proxmox stand-in.
struct YkLab {
    lab: Lab,
    card: Option<Card>,
    _pcscd: Pcscd,
    _lock: tokio::sync::MutexGuard<'static, ()>,
}

impl YkLab {
    /// Starts everything; the gateway trusts the card's test root when `trust_test_root`.
    async fn start(trust_test_root: bool) -> YkLab {
        let lock = serialised().await;
        std::env::set_var(PIN_ENV, PIN);
        let pcscd = Pcscd::start();
        let echo = zerospice_tests::echo::EchoServer::start().await.unwrap();
        let config = Lab::example_config(&echo).await;
        let mut lab = Lab::init_with(echo, config, &[]).await.unwrap();
        let card = Card::start(lab.files.path(), SERIAL, VPCD);
        if trust_test_root {
            let cfg = lab.home.path().join("gateway.toml");
            let mut doc: toml::Table =
                toml::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
            let att = doc
                .entry("attestation")
                .or_insert_with(|| toml::Value::Table(Default::default()));
            att.as_table_mut().unwrap().insert(
                "extra_roots".into(),
                toml::Value::Array(vec![toml::Value::String(
                    card.root_pem().to_str().unwrap().into(),
                )]),
            );
            std::fs::write(&cfg, toml::to_string(&doc).unwrap()).unwrap();
        }
        lab.serve().unwrap();
        YkLab {
            lab,
            card: Some(card),
            _pcscd: pcscd,
            _lock: lock,
        }
    }

    fn card(&self) -> &Card {
        self.card.as_ref().expect("card running")
    }

    fn profile(&self, name: &str) -> PathBuf {
        self.lab.home.path().join(format!("profile-{name}"))
    }

    /// Runs `zerospice-enroll` for `user` with `extra` arguments.
    fn enroll(&self, user: &NewUser, profile: &Path, extra: &[&str]) -> Output {
        let code = oathtool(&user.secret_base32).unwrap();
        let mut c = enroll_cmd(&user.invitation, &code, "laptop", profile);
        c.args(extra);
        tokio::task::block_in_place(|| run_bounded(c, Duration::from_secs(60))).unwrap()
    }

    fn enroll_ok(&self, user: &NewUser, profile: &Path, extra: &[&str]) -> (String, String) {
        let out = self.enroll(user, profile, extra);
        let (stdout, stderr) = texts(&out);
        assert!(
            out.status.success(),
            "enroll {extra:?} failed:\n{stdout}\n{stderr}\ngateway:\n{}\ncard:\n{}",
            self.lab.gateway_log(),
            self.card().proc.log()
        );
        (stdout, stderr)
    }

    /// Runs `zerospice-enroll` expecting failure; returns its stderr.
    fn enroll_err(&self, user: &NewUser, profile: &Path, extra: &[&str]) -> String {
        let out = self.enroll(user, profile, extra);
        let (stdout, stderr) = texts(&out);
        assert!(
            !out.status.success(),
            "enroll {extra:?} succeeded unexpectedly:\n{stdout}"
        );
        stderr
    }
}

fn texts(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn agent_with_pin(profile: &Path, pin: &str, args: &[&str]) -> Output {
    let mut c = agent_cmd(profile, args);
    c.env(PIN_ENV, pin);
    tokio::task::block_in_place(|| run_bounded(c, Duration::from_secs(60))).unwrap()
}

fn last_line(text: &str) -> &str {
    text.lines().last().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enroll_with_a_yubikey_then_tunnel_with_the_handshake_signed_on_the_card() {
    let yk = YkLab::start(true).await;
    let alice = yk.lab.add_user("alice", &["--vm", "100"]).unwrap();
    let profile = yk.profile("alice");

    let (stdout, stderr) = yk.enroll_ok(&alice, &profile, &["--key", "yubikey"]);
    assert!(
        stdout.contains(&format!(
            "  key ready: YubiKey {SERIAL} slot 9a (ECDSA P-256, PIN once, touch cached)\n"
        )),
        "{stdout}"
    );
    assert!(
        stderr.contains(&format!("warning: YubiKey {SERIAL} still uses the factory default management key: anyone with the key in hand can replace its keys. Set a new one with --set-management-key protected (kept on the YubiKey behind your PIN) or --set-management-key random (shown once for you to store)\n")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("Touch your YubiKey {SERIAL} now")),
        "touch policy cached: the user is told to touch\n{stderr}"
    );
    assert!(
        stdout.contains(&format!(
            "(YubiKey {SERIAL} slot 9a (ECDSA P-256, PIN once, touch cached))"
        )),
        "{stdout}"
    );

    // The profile names the slot; no private key is on disk.
    let text = std::fs::read_to_string(profile.join("profile.toml")).unwrap();
    let p: zerospice_enroll::profile::Profile = toml::from_str(&text).unwrap();
    assert_eq!(
        p.key,
        KeyRef::Yubikey {
            serial: SERIAL,
            slot: "9a".into()
        }
    );
    assert!(!profile.join("client.key").exists());

    // The certificate says the key is hardware-held, with the serial; the gateway recorded it.
    let cert_pem = std::fs::read_to_string(profile.join("client.crt")).unwrap();
    let cert_der = zerospice_ca::pem::first_certificate(&cert_pem).unwrap();
    let id = zerospice_ca::Identity::from_der(&cert_der).unwrap();
    assert_eq!(
        id.key,
        zerospice_ca::KeyProvenance::Yubikey { serial: SERIAL }
    );
    {
        use x509_parser::prelude::{FromDer, X509Certificate};
        let (_, cert) = X509Certificate::from_der(&cert_der).unwrap();
        let sans: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert!(
            sans.contains(&format!("URI(zerospice://key/yubikey/{SERIAL})")),
            "{sans:?}"
        );
    }
    let certs: serde_json::Value =
        serde_json::from_str(&yk.lab.admin(&["--json", "cert", "list"]).unwrap()).unwrap();
    let rec = &certs.as_array().unwrap()[0];
    assert_eq!(rec["key_kind"], "yubikey", "{rec}");
    assert_eq!(rec["hardware_serial"], SERIAL, "{rec}");
    let audit = yk.lab.audit().unwrap();
    let issued = audit
        .iter()
        .find(|r| r["event"] == "enroll.issued")
        .expect("enroll.issued audited");
    assert_eq!(issued["detail"]["hardware_serial"], SERIAL, "{issued}");
    assert_eq!(issued["detail"]["pin_policy"], "once");
    assert_eq!(issued["detail"]["touch_policy"], "cached");

    // The slot certificate on the card is now the issued certificate.
    let mut dev = piv::open_device(Some(SERIAL)).unwrap();
    let on_card = yubikey::Certificate::read(&mut dev, yubikey::piv::SlotId::Authentication)
        .expect("slot 9a certificate");
    {
        use der::Encode as _;
        assert_eq!(on_card.cert.to_der().unwrap(), cert_der);
    }
    drop(dev);

    // Connect and tunnel bytes: the TLS handshake is signed on the card.
    let before = yk.card().signatures_9a();
    let conn = tokio::task::block_in_place(|| Connected::start(&profile, 100)).unwrap();
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let got = echo_round_trip(conn.channel().await.unwrap(), &data)
        .await
        .unwrap();
    assert!(got == data, "tunnel not byte-exact: {} bytes", got.len());
    let after = yk.card().signatures_9a();
    assert!(
        after > before,
        "the card made no 9a signature during connect ({before} -> {after})"
    );
    assert!(
        conn.proc
            .log()
            .contains(&format!("Touch your YubiKey {SERIAL} now")),
        "{}",
        conn.proc.log()
    );
    drop(conn);

    // A wrong PIN is refused by the card, and the agent says how many tries are left.
    let out = agent_with_pin(&profile, "000000", &["list"]);
    let (_, stderr) = texts(&out);
    assert!(!out.status.success());
    assert_eq!(
        last_line(&stderr),
        format!("error: wrong PIN for YubiKey {SERIAL}: 2 tries left before the PIN is blocked")
    );
    let out = agent_with_pin(&profile, "000000", &["list"]);
    assert_eq!(
        last_line(&texts(&out).1),
        format!("error: wrong PIN for YubiKey {SERIAL}: 1 try left before the PIN is blocked")
    );
    // The right PIN works (and resets the counter on the card).
    let out = agent_with_pin(&profile, PIN, &["--json", "list"]);
    assert!(out.status.success(), "{}", texts(&out).1);
    for left in [2, 1] {
        let out = agent_with_pin(&profile, "999999", &["list"]);
        let want = format!(
            "error: wrong PIN for YubiKey {SERIAL}: {left} {} left before the PIN is blocked",
            if left == 1 { "try" } else { "tries" }
        );
        assert_eq!(last_line(&texts(&out).1), want);
    }
    let out = agent_with_pin(&profile, "999999", &["list"]);
    assert_eq!(
        last_line(&texts(&out).1),
        format!("error: the PIN of YubiKey {SERIAL} is blocked (no tries left): unblock it with the PUK (`ykman piv access unblock-pin`), or reset the PIV application (`ykman piv reset`, which destroys its keys)")
    );
    // Blocked is blocked, even with the right PIN.
    let out = agent_with_pin(&profile, PIN, &["list"]);
    assert!(
        last_line(&texts(&out).1).contains("is blocked"),
        "{:?}",
        texts(&out)
    );

    // Without the card, the agent cannot connect at all.
    let mut yk = yk;
    drop(yk.card.take());
    wait_until("pcscd to notice the card is gone", WAIT, || {
        piv::open_device(Some(SERIAL)).is_err()
    });
    let out = agent_with_pin(&profile, PIN, &["list"]);
    assert_eq!(
        last_line(&texts(&out).1),
        format!("error: YubiKey {SERIAL} is not inserted (found: none)")
    );
}

/// A key source that sends the card's attestation with a CSR and proof of a software key.
struct ForeignAttestation {
    software: Arc<SoftwareKey>,
    attestation: Vec<u8>,
    f9: Vec<u8>,
}

impl KeySource for ForeignAttestation {
    fn create(&self) -> Result<Box<dyn NewKey>, String> {
        Ok(Box::new(ForeignKey(
            self.software.clone(),
            KeyClaim::Yubikey {
                attestation: self.attestation.clone(),
                chain: vec![self.f9.clone()],
            },
        )))
    }
}

struct ForeignKey(Arc<SoftwareKey>, KeyClaim);

impl NewKey for ForeignKey {
    fn signer(&self) -> Arc<dyn Signer> {
        self.0.clone()
    }
    fn claim(&self) -> KeyClaim {
        self.1.clone()
    }
    fn persist(&self, _: &ProfileDir) -> Result<KeyRef, ProfileError> {
        Ok(KeyRef::Software)
    }
    fn describe(&self) -> String {
        "software key posing as a YubiKey key".into()
    }
}

struct FixedPin;

impl PivPrompt for FixedPin {
    fn pin(&self, _: u32) -> Option<zeroize::Zeroizing<String>> {
        Some(zeroize::Zeroizing::new(PIN.into()))
    }
    fn touch(&self, _: u32) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attestation_of_another_key_is_refused() {
    let yk = YkLab::start(true).await;
    let mallory = yk
        .lab
        .add_user("mallory", &["--vm", "100", "--require-hardware-key"])
        .unwrap();

    // A real attestation from the card (through pcscd), for the card's key...
    let generated = tokio::task::block_in_place(|| {
        piv::generate(
            &GenerateOptions {
                serial: Some(SERIAL),
                slot: DEFAULT_SLOT,
                algorithm: KeyAlgorithm::EcdsaP256,
                pin_policy: PinPolicy::Once,
                touch_policy: TouchPolicy::Always,
                overwrite: false,
                management_key: None,
                new_management_key: None,
            },
            Arc::new(FixedPin),
            &piv::NoQuestions,
        )
    })
    .unwrap();
    let attestation = generated.attestation.clone();
    let f9 = generated.f9.clone();
    drop(generated);

    // ... sent with the CSR of a software key (whose proof over the challenge is valid).
    let source = ForeignAttestation {
        software: Arc::new(SoftwareKey::generate(KeyAlgorithm::EcdsaP256).unwrap()),
        attestation,
        f9,
    };
    let code = oathtool(&mallory.secret_base32).unwrap();
    let err = zerospice_enroll::enroll(
        EnrollOptions {
            invitation: mallory.invitation.parse().unwrap(),
            code,
            device: zerospice_ca::DeviceName::new("laptop").unwrap(),
            profile: ProfileDir::new(yk.profile("mallory")),
            force: false,
        },
        &source,
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, EnrollError::Refused(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the YubiKey attestation was refused: the attestation certificate's key is not the key in the CSR"
    );
    assert!(!yk.profile("mallory").exists());
    let certs: serde_json::Value =
        serde_json::from_str(&yk.lab.admin(&["--json", "cert", "list"]).unwrap()).unwrap();
    assert_eq!(certs.as_array().unwrap().len(), 0, "{certs}");
    let audit = yk.lab.audit().unwrap();
    assert!(
        audit.iter().any(|r| r["event"] == "enroll.refused"
            && r["detail"]["reason"]
                == "attestation: the YubiKey attestation was refused: the attestation certificate's key is not the key in the CSR"),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attestation_under_an_unknown_root_is_refused() {
    // The gateway trusts only Yubico's roots; the card's attestation chains to a test root.
    let yk = YkLab::start(false).await;
    let bob = yk.lab.add_user("bob", &["--vm", "100"]).unwrap();
    let stderr = yk.enroll_err(&bob, &yk.profile("bob"), &["--key", "yubikey"]);
    assert_eq!(
        last_line(&stderr),
        "error: enrollment failed: the YubiKey attestation was refused: the f9 certificate does not chain to a trusted attestation root"
    );
    assert!(!yk.profile("bob").join("profile.toml").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_who_must_use_a_hardware_key_cannot_enroll_a_software_key() {
    let yk = YkLab::start(true).await;
    let carol = yk
        .lab
        .add_user("carol", &["--vm", "100", "--require-hardware-key"])
        .unwrap();
    let profile = yk.profile("carol");
    let stderr = yk.enroll_err(&carol, &profile, &[]);
    assert_eq!(
        last_line(&stderr),
        "error: enrollment failed: this user must enroll with a hardware key (YubiKey): use --key yubikey"
    );
    assert!(!profile.join("profile.toml").exists());
    // The code was not used up by the refusal: the same user enrolls with the YubiKey.
    // (P-384 this time: the handshake is then signed with ECDSA P-384 on the card.)
    let (stdout, _) = yk.enroll_ok(
        &carol,
        &profile,
        &[
            "--key",
            "yubikey:9a",
            "--algorithm",
            "p384",
            "--touch-policy",
            "never",
        ],
    );
    assert!(
        stdout.contains(&format!(
            "key ready: YubiKey {SERIAL} slot 9a (ECDSA P-384, PIN once, touch never)"
        )),
        "{stdout}"
    );
    let before = yk
        .card()
        .proc
        .log()
        .matches("APDU [00, 87, 14, 9A]")
        .count();
    let out = agent_with_pin(&profile, PIN, &["--json", "whoami"]);
    let (stdout, stderr) = texts(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains(&format!("YubiKey {SERIAL}")), "{stdout}");
    assert!(
        !stderr.contains("Touch your YubiKey"),
        "touch never: {stderr}"
    );
    let after = yk
        .card()
        .proc
        .log()
        .matches("APDU [00, 87, 14, 9A]")
        .count();
    assert!(
        after > before,
        "no P-384 signature on the card ({before} -> {after})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_touch_policy_requirement_refuses_a_key_generated_with_touch_never() {
    let yk = YkLab::start(true).await;
    let dave = yk
        .lab
        .add_user("dave", &["--vm", "100", "--min-touch-policy", "cached"])
        .unwrap();
    let profile = yk.profile("dave");
    let stderr = yk.enroll_err(
        &dave,
        &profile,
        &["--key", "yubikey", "--touch-policy", "never"],
    );
    assert_eq!(
        last_line(&stderr),
        "error: enrollment failed: key rule min-touch-policy failed: the key's touch policy is never, this user needs at least cached: enroll again with --touch-policy cached"
    );
    // A software key is refused too: a touch rule implies a hardware key.
    let stderr = yk.enroll_err(&dave, &yk.profile("dave-soft"), &[]);
    assert_eq!(
        last_line(&stderr),
        "error: enrollment failed: this user must enroll with a hardware key (YubiKey): use --key yubikey"
    );
    // The slot now holds that key: a second attempt must not destroy it silently.
    let stderr = yk.enroll_err(
        &dave,
        &profile,
        &["--key", "yubikey", "--touch-policy", "cached"],
    );
    assert_eq!(
        last_line(&stderr),
        format!("error: enrollment failed: slot 9a of YubiKey {SERIAL} already holds a key: pass --overwrite-slot to replace it (the old key is destroyed), or choose another slot with --key yubikey:SLOT")
    );
    let (stdout, _) = yk.enroll_ok(
        &dave,
        &profile,
        &[
            "--key",
            "yubikey",
            "--touch-policy",
            "cached",
            "--overwrite-slot",
        ],
    );
    assert!(stdout.contains("touch cached"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clear_errors_without_pcscd_without_a_card_and_with_two_cards() {
    let lock = serialised().await;
    std::env::set_var(PIN_ENV, PIN);
    let echo = zerospice_tests::echo::EchoServer::start().await.unwrap();
    let config = Lab::example_config(&echo).await;
    let mut lab = Lab::init_with(echo, config, &[]).await.unwrap();
    lab.serve().unwrap();
    let erin = lab.add_user("erin", &["--vm", "100"]).unwrap();
    let try_enroll = |extra: &[&str]| {
        let code = oathtool(&erin.secret_base32).unwrap();
        let mut c = enroll_cmd(
            &erin.invitation,
            &code,
            "laptop",
            &lab.home.path().join("profile-erin"),
        );
        c.args(extra);
        let out = tokio::task::block_in_place(|| run_bounded(c, Duration::from_secs(60))).unwrap();
        assert!(!out.status.success());
        last_line(&String::from_utf8_lossy(&out.stderr)).to_owned()
    };

    let pcscd_before = running_pcscd();
    if pcscd_before.is_none() {
        assert_eq!(
            try_enroll(&["--key", "yubikey"]),
            "error: enrollment failed: the smart card service (pcscd) is not running: start it (for example `sudo systemctl start pcscd.socket`) and try again"
        );
    } else {
        eprintln!("a pcscd runs already: the 'no PC/SC service' error is not checked here");
    }
    let pcscd = Pcscd::start();
    assert_eq!(pcscd.ours(), pcscd_before.is_none());
    assert_eq!(
        try_enroll(&["--key", "yubikey"]),
        "error: enrollment failed: no YubiKey found: insert your YubiKey and try again"
    );
    let work = tempfile::tempdir().unwrap();
    let first = Card::start(&work.path().join("one"), SERIAL, VPCD);
    let second = Card::start(&work.path().join("two"), SECOND_SERIAL, VPCD_SECOND);
    let (a, b) = if SERIAL < SECOND_SERIAL {
        (SERIAL, SECOND_SERIAL)
    } else {
        (SECOND_SERIAL, SERIAL)
    };
    let several = try_enroll(&["--key", "yubikey"]);
    assert!(
        several == format!("error: enrollment failed: several YubiKeys are inserted (serials {a}, {b}): choose one with --yubikey-serial SERIAL, or remove the others")
            || several == format!("error: enrollment failed: several YubiKeys are inserted (serials {b}, {a}): choose one with --yubikey-serial SERIAL, or remove the others"),
        "{several}"
    );
    assert_eq!(
        try_enroll(&["--key", "yubikey", "--yubikey-serial", "1234"]),
        format!(
            "error: enrollment failed: YubiKey 1234 is not inserted (found: {}, {})",
            SERIAL, SECOND_SERIAL
        )
    );
    assert_eq!(
        try_enroll(&["--key", "yubikey:9b"]),
        "error: '9b' is not a PIV key slot: use 9a (authentication, the default), 9c, 9d, 9e or 82 to 95"
    );
    // A wrong PIN while enrolling: reported with the tries left, nothing generated.
    let code = oathtool(&erin.secret_base32).unwrap();
    let mut c = enroll_cmd(
        &erin.invitation,
        &code,
        "laptop",
        &lab.home.path().join("profile-erin"),
    );
    c.args([
        "--key",
        "yubikey",
        "--yubikey-serial",
        &SECOND_SERIAL.to_string(),
    ])
    .env(PIN_ENV, "000000");
    let out = tokio::task::block_in_place(|| run_bounded(c, Duration::from_secs(60))).unwrap();
    assert_eq!(
        last_line(&String::from_utf8_lossy(&out.stderr)),
        format!("error: enrollment failed: wrong PIN for YubiKey {SECOND_SERIAL}: 2 tries left before the PIN is blocked")
    );
    assert!(
        !second.proc.log().contains("generated"),
        "{}",
        second.proc.log()
    );
    drop(first);
    drop(second);
    drop(pcscd);
    drop(lab);
    drop(lock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_default_management_key_can_be_replaced() {
    let yk = YkLab::start(true).await;
    let users: Vec<NewUser> = ["frank", "grace", "heidi", "ivan"]
        .iter()
        .map(|n| yk.lab.add_user(n, &["--vm", "100"]).unwrap())
        .collect();

    // A random management key, shown once.
    let (_, stderr) = yk.enroll_ok(
        &users[0],
        &yk.profile("frank"),
        &["--key", "yubikey", "--set-management-key", "random"],
    );
    assert!(!stderr.contains("factory default"), "{stderr}");
    let prefix = format!("warning: the new management key of YubiKey {SERIAL} is ");
    let line = stderr
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no new management key shown:\n{stderr}"));
    let key = line[prefix.len()..].split(' ').next().unwrap().to_owned();
    assert_eq!(key.len(), 48, "{line}");
    assert!(key.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
    assert_ne!(key, "010203040506070801020304050607080102030405060708");
    assert!(line.ends_with(": store it somewhere safe now, it is shown only this once (it is needed to generate or replace keys on the YubiKey)"), "{line}");

    // Without it, the card refuses to generate; nothing changes.
    let stderr = yk.enroll_err(
        &users[1],
        &yk.profile("grace"),
        &["--key", "yubikey", "--overwrite-slot"],
    );
    assert_eq!(
        last_line(&stderr),
        format!("error: enrollment failed: YubiKey {SERIAL} refused the management key: give the right one with --management-key-file FILE (48 hex digits)")
    );
    // With it, it works, and the key can be moved behind the PIN.
    let key_file = yk.lab.home.path().join("mgm.key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    yk.enroll_ok(
        &users[1],
        &yk.profile("grace"),
        &[
            "--key",
            "yubikey",
            "--overwrite-slot",
            "--management-key-file",
            key_file.to_str().unwrap(),
            "--set-management-key",
            "protected",
        ],
    );
    // PIN-protected: the PIN alone is enough from now on.
    let (stdout, stderr) = yk.enroll_ok(
        &users[2],
        &yk.profile("heidi"),
        &["--key", "yubikey:9c", "--pin-policy", "always"],
    );
    assert!(!stderr.contains("management key"), "{stderr}");
    assert!(
        stdout.contains("slot 9c (ECDSA P-256, PIN always, touch cached)"),
        "{stdout}"
    );
    // The old random key no longer works.
    let stderr = yk.enroll_err(
        &users[3],
        &yk.profile("ivan"),
        &[
            "--key",
            "yubikey:9d",
            "--management-key-file",
            key_file.to_str().unwrap(),
        ],
    );
    assert_eq!(
        last_line(&stderr),
        format!("error: enrollment failed: YubiKey {SERIAL} refused the management key: give the right one with --management-key-file FILE (48 hex digits)")
    );
    // heidi's key has PIN policy always: every signature re-verifies the PIN, and the agent works.
    let out = agent_with_pin(&yk.profile("heidi"), PIN, &["--json", "list"]);
    assert!(out.status.success(), "{}", texts(&out).1);
}

/// Runs `zerospice-enroll` on a pseudo-terminal (util-linux `script`), typing `answers`.
fn enroll_on_a_terminal(user: &NewUser, profile: &Path, extra: &[&str], answers: &str) -> Output {
    let code = oathtool(&user.secret_base32).unwrap();
    let enroll = enroll_cmd(&user.invitation, &code, "laptop", profile);
    let mut line = vec![enroll.get_program().to_string_lossy().into_owned()];
    line.extend(enroll.get_args().map(|a| a.to_string_lossy().into_owned()));
    line.extend(extra.iter().map(|s| s.to_string()));
    let quoted: Vec<String> = line
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', "'\\''")))
        .collect();
    let script = format!(
        "printf '{answers}' | script -qec \"{}\" /dev/null",
        quoted.join(" ").replace('"', "\\\"")
    );
    let mut c = Command::new("bash");
    c.args(["-c", &script]);
    tokio::task::block_in_place(|| run_bounded(c, Duration::from_secs(60))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_a_terminal_the_user_is_asked_before_overwriting_and_offered_a_new_management_key() {
    let yk = YkLab::start(true).await;
    let judy = yk.lab.add_user("judy", &["--vm", "100"]).unwrap();
    let ken = yk.lab.add_user("ken", &["--vm", "100"]).unwrap();
    // A key in 9a already, generated directly through PC/SC; the default management key stays.
    let earlier = piv::generate(
        &GenerateOptions {
            serial: Some(SERIAL),
            slot: DEFAULT_SLOT,
            algorithm: KeyAlgorithm::EcdsaP256,
            pin_policy: PinPolicy::Once,
            touch_policy: TouchPolicy::Never,
            overwrite: false,
            management_key: None,
            new_management_key: None,
        },
        Arc::new(FixedPin),
        &piv::NoQuestions,
    )
    .unwrap();
    assert_eq!(earlier.warnings.len(), 1, "{:?}", earlier.warnings);
    drop(earlier);

    // "n" to overwriting: nothing changes.
    let out = enroll_on_a_terminal(&judy, &yk.profile("judy"), &["--key", "yubikey"], "n\\n");
    let (stdout, _) = texts(&out);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!("Slot 9a of YubiKey {SERIAL} already holds a key. Replace it? The old key is destroyed. [y/N] ")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "error: enrollment failed: slot 9a of YubiKey {SERIAL} already holds a key"
        )),
        "{stdout}"
    );
    // "y", then "p" for a PIN-protected management key.
    let out = enroll_on_a_terminal(
        &judy,
        &yk.profile("judy"),
        &["--key", "yubikey"],
        "y\\np\\n",
    );
    let (stdout, _) = texts(&out);
    assert!(out.status.success(), "{stdout}\n{}", yk.lab.gateway_log());
    assert!(
        stdout.contains(&format!("YubiKey {SERIAL} still uses the factory default management key: anyone with the key in hand can replace its keys.")),
        "{stdout}"
    );
    assert!(!stdout.contains("warning: YubiKey"), "{stdout}");
    // From now on the default key is gone and the PIN unlocks the stored one: no question.
    let (_, stderr) = yk.enroll_ok(
        &ken,
        &yk.profile("ken"),
        &["--key", "yubikey:9d", "--touch-policy", "never"],
    );
    assert!(!stderr.contains("management key"), "{stderr}");
}
