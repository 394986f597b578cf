//! End to end: the `yubikey` 0.8 crate -> libpcsclite -> pcscd -> vpcd -> zerospice-virtual-piv.
//!
//! Starts `pcscd --foreground` (unless one already runs: then it is used and left alone), starts
//! the harness binary with a fresh attestation directory, and drives the card with the `yubikey`
//! crate exactly as product code would drive a real YubiKey. Every wait is bounded, and a watchdog
//! kills everything this test started if the whole run exceeds [`OVERALL_TIMEOUT`].
//!
//! Needs root (pcscd writes /run/pcscd) and the Debian packages pcscd + vsmartcard-vpcd.
//! `VIRTUAL_PIV_RUST_LOG=debug` makes the harness log every APDU and prints that log at the end.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{mpsc, Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use der::Encode as _;
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use ring::{
    digest,
    signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1},
};
use x509_parser::prelude::{FromDer as _, X509Certificate};
use yubikey::{
    piv::{self, AlgorithmId, ManagementAlgorithmId, Origin, SlotId},
    Certificate, Error as YkError, MgmKey, PinPolicy, TouchPolicy, YubiKey,
};

const OVERALL_TIMEOUT: Duration = Duration::from_secs(180);
const SERIAL: u32 = 31_415_926;
const VPCD: &str = "127.0.0.1:35963";
const PCSCD_SOCKET: &str = "/run/pcscd/pcscd.comm";
const PCSCD_PID_FILE: &str = "/run/pcscd/pcscd.pid";
const VPCD_DRIVER: &str = "/usr/lib/pcsc/drivers/serial/libifdvpcd.so";

/// Pids of the processes this test started, for the watchdog.
type Started = Arc<Mutex<Vec<u32>>>;

/// A child process that is stopped (SIGTERM, then SIGKILL after 5 s) when dropped.
struct Guarded {
    name: &'static str,
    child: Child,
    started: Started,
}

impl Guarded {
    fn spawn(name: &'static str, command: &mut Command, started: &Started) -> Self {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        started.lock().expect("lock").push(child.id());
        Self {
            name,
            child,
            started: Arc::clone(started),
        }
    }

    /// SIGTERM, then wait at most `timeout`; SIGKILL if still running. Returns the exit status.
    fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(status);
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.started
                    .lock()
                    .expect("lock")
                    .retain(|&p| p != self.child.id());
                return Some(status);
            }
            thread::sleep(Duration::from_millis(50));
        }
        eprintln!("{} did not stop within {timeout:?}: killing it", self.name);
        let _ = self.child.kill();
        self.child.wait().ok()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Kills what the test started and exits if the test runs too long.
fn start_watchdog(started: &Started) {
    let started = Arc::clone(started);
    thread::spawn(move || {
        thread::sleep(OVERALL_TIMEOUT);
        eprintln!(
            "yubikey_crate: overall timeout of {OVERALL_TIMEOUT:?} exceeded, killing children"
        );
        for &pid in started.lock().expect("lock").iter() {
            let _ = kill(
                Pid::from_raw(i32::try_from(pid).expect("pid")),
                Signal::SIGKILL,
            );
        }
        std::process::exit(101);
    });
}

/// The pid of a pcscd that already runs (pid file naming a live process), if any.
fn running_pcscd() -> Option<u32> {
    let pid = read_pid_file()?;
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    (comm.trim() == "pcscd").then_some(pid)
}

/// pcscd writes its pid as "1234\n\0".
fn read_pid_file() -> Option<u32> {
    fs::read_to_string(PCSCD_PID_FILE)
        .ok()?
        .trim_matches(|c: char| c.is_whitespace() || c == '\0')
        .parse()
        .ok()
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a short command with a time limit; `None` if the program does not exist.
fn run_bounded(program: &str, args: &[&str], timeout: Duration) -> Option<(ExitStatus, String)> {
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("cannot run {program}: {e}"),
    };
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut output = String::new();
    if let Some(mut out) = child.stdout.take() {
        out.read_to_string(&mut output).ok();
    }
    if let Some(mut err) = child.stderr.take() {
        err.read_to_string(&mut output).ok();
    }
    Some((status, output))
}

fn pem_to_der(path: &Path) -> Vec<u8> {
    let text = fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let (_, pem) = x509_parser::pem::parse_x509_pem(&text).expect("PEM certificate");
    pem.contents
}

fn extension<'a>(cert: &'a X509Certificate<'_>, oid: &str) -> &'a [u8] {
    cert.extensions()
        .iter()
        .find(|e| e.oid.to_id_string() == oid)
        .unwrap_or_else(|| panic!("extension {oid} missing"))
        .value
}

fn open_yubikey(timeout: Duration) -> YubiKey {
    let deadline = Instant::now() + timeout;
    loop {
        match YubiKey::open() {
            Ok(yk) => return yk,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "YubiKey::open() failed for {timeout:?}: {e}"
                );
                thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

fn dump_log(path: &Path) {
    if let Ok(text) = fs::read_to_string(path) {
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        eprintln!("--- last lines of {} ---", path.display());
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
    }
}

#[test]
fn yubikey_crate_against_virtual_card() {
    let t0 = Instant::now();
    let started: Started = Arc::new(Mutex::new(Vec::new()));
    start_watchdog(&started);

    assert!(
        Path::new(VPCD_DRIVER).exists(),
        "{VPCD_DRIVER} missing: install the Debian package vsmartcard-vpcd"
    );
    let work = tempfile::tempdir().expect("tempdir");
    let att_dir = work.path().join("attestation");
    let pcscd_log = work.path().join("pcscd.log");
    let harness_log = work.path().join("harness.log");

    // 1. pcscd
    let _pcscd = match running_pcscd() {
        Some(pid) => {
            eprintln!("using the pcscd that already runs (pid {pid}); it is left running");
            None
        }
        None => {
            let log = fs::File::create(&pcscd_log).expect("pcscd log");
            let mut command = Command::new("pcscd");
            command
                .arg("--foreground")
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log);
            let mut pcscd = Guarded::spawn("pcscd", &mut command, &started);
            let pid = pcscd.child.id();
            wait_for("pcscd to start", Duration::from_secs(10), || {
                if let Ok(Some(status)) = pcscd.child.try_wait() {
                    dump_log(&pcscd_log);
                    panic!("pcscd exited at start: {status}");
                }
                read_pid_file() == Some(pid) && Path::new(PCSCD_SOCKET).exists()
            });
            Some(pcscd)
        }
    };

    // 2. the virtual card
    let mut command = Command::new(env!("CARGO_BIN_EXE_zerospice-virtual-piv"));
    command
        .args(["--vpcd", VPCD, "--serial", &SERIAL.to_string()])
        .arg("--attestation-dir")
        .arg(&att_dir)
        // VIRTUAL_PIV_RUST_LOG=debug logs every APDU (header, lengths, status word; never data).
        .env(
            "RUST_LOG",
            std::env::var("VIRTUAL_PIV_RUST_LOG")
                .unwrap_or_else(|_| "info,piv_authenticator=off".to_owned()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&harness_log).expect("harness log"));
    let mut harness = Guarded::spawn("zerospice-virtual-piv", &mut command, &started);
    let stdout = harness.child.stdout.take().expect("stdout");
    let (lines_tx, lines_rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let ready = lines_rx.recv_timeout(Duration::from_secs(30));
    if ready.is_err() {
        dump_log(&harness_log);
    }
    let ready = ready.expect("no 'ready' line from the harness within 30 s");
    assert_eq!(ready, format!("virtual PIV card ready serial={SERIAL}"));
    eprintln!("[{:?}] harness ready", t0.elapsed());

    let root_pem = att_dir.join("test-piv-root.pem");
    let f9_pem = att_dir.join("test-f9.pem");
    let f9_key = att_dir.join("test-f9.key");
    for path in [&root_pem, &f9_pem, &f9_key] {
        assert!(path.exists(), "{} not written", path.display());
    }
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&f9_key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "test-f9.key must be 0600");
    }

    // 3. the yubikey crate, as product code uses it
    let mut yk = open_yubikey(Duration::from_secs(20));
    eprintln!("[{:?}] opened {}", t0.elapsed(), yk.name());
    assert_eq!(yk.version().to_string(), "5.4.3");
    assert_eq!(yk.serial().0, SERIAL);

    yk.verify_pin(b"123456").expect("verify default PIN");
    yk.authenticate(MgmKey::default())
        .expect("authenticate with the default 3DES management key");

    let spki_9a = piv::generate(
        &mut yk,
        SlotId::Authentication,
        AlgorithmId::EccP256,
        PinPolicy::Once,
        TouchPolicy::Never,
    )
    .expect("generate P-256 in 9a");
    let point_9a = spki_9a.subject_public_key.raw_bytes().to_vec();
    assert_eq!(point_9a.len(), 65);
    let spki_9c = piv::generate(
        &mut yk,
        SlotId::Signature,
        AlgorithmId::EccP384,
        PinPolicy::Default,
        TouchPolicy::Default,
    )
    .expect("generate P-384 in 9c");
    let point_9c = spki_9c.subject_public_key.raw_bytes().to_vec();
    assert_eq!(point_9c.len(), 97);
    eprintln!("[{:?}] keys generated", t0.elapsed());

    // sign with 9a (PIN once: the earlier VERIFY still counts) and check with ring
    let message = b"ZeroSpice virtual PIV test message";
    let digest_256 = digest::digest(&digest::SHA256, message);
    let signature = piv::sign_data(
        &mut yk,
        digest_256.as_ref(),
        AlgorithmId::EccP256,
        SlotId::Authentication,
    )
    .expect("sign with 9a");
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &point_9a)
        .verify(message, &signature)
        .expect("ECDSA P-256 signature from 9a verifies");

    // 9c took the YubiKey default PIN policy "always": VERIFY must come right before each use
    let digest_384 = digest::digest(&digest::SHA384, message);
    let err = piv::sign_data(
        &mut yk,
        digest_384.as_ref(),
        AlgorithmId::EccP384,
        SlotId::Signature,
    )
    .expect_err("9c without a fresh VERIFY");
    assert_eq!(err, YkError::AuthenticationError);
    yk.verify_pin(b"123456").expect("verify PIN");
    let signature = piv::sign_data(
        &mut yk,
        digest_384.as_ref(),
        AlgorithmId::EccP384,
        SlotId::Signature,
    )
    .expect("sign with 9c");
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_ASN1, &point_9c)
        .verify(message, &signature)
        .expect("ECDSA P-384 signature from 9c verifies");

    // attestation of 9a
    let att_der = piv::attest(&mut yk, SlotId::Authentication)
        .expect("attest 9a")
        .to_vec();
    let root_der = pem_to_der(&root_pem);
    let f9_der = pem_to_der(&f9_pem);
    let (_, att) = X509Certificate::from_der(&att_der).expect("attestation certificate parses");
    let (_, f9) = X509Certificate::from_der(&f9_der).expect("f9 parses");
    let (_, root) = X509Certificate::from_der(&root_der).expect("root parses");
    assert_eq!(
        att.public_key().subject_public_key.data.as_ref(),
        point_9a.as_slice(),
        "attested key = generated key"
    );
    assert_eq!(att.subject().to_string(), "CN=YubiKey PIV Attestation 9a");
    assert_eq!(att.issuer(), f9.subject());
    assert_eq!(f9.subject().to_string(), "CN=Yubico PIV Attestation");
    assert_eq!(f9.issuer(), root.subject());
    assert_eq!(root.subject().to_string(), "CN=ZeroSpice Test PIV Root CA");
    assert_eq!(att.validity().not_before, f9.validity().not_before);
    assert_eq!(att.validity().not_after, f9.validity().not_after);
    assert_eq!(extension(&att, "1.3.6.1.4.1.41482.3.3"), [5, 4, 3]);
    let serial_der = {
        let mut d = vec![0x02, 0x04];
        d.extend_from_slice(&SERIAL.to_be_bytes());
        d
    };
    assert_eq!(extension(&att, "1.3.6.1.4.1.41482.3.7"), serial_der);
    assert_eq!(
        extension(&att, "1.3.6.1.4.1.41482.3.8"),
        [2, 1],
        "PIN once, touch never"
    );
    assert_eq!(extension(&att, "1.3.6.1.4.1.41482.3.9").len(), 1);
    att.verify_signature(Some(f9.public_key()))
        .expect("attestation certificate signed by test-f9.pem");
    f9.verify_signature(Some(root.public_key()))
        .expect("test-f9.pem signed by test-piv-root.pem");
    let att_der_path = work.path().join("attestation-9a.der");
    let att_pem_path = work.path().join("attestation-9a.pem");
    fs::write(&att_der_path, &att_der).expect("write attestation");
    let path = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
    let converted = run_bounded(
        "openssl",
        &[
            "x509",
            "-inform",
            "DER",
            "-in",
            &path(&att_der_path),
            "-out",
            &path(&att_pem_path),
        ],
        Duration::from_secs(20),
    );
    match converted {
        Some((status, output)) => {
            assert!(status.success(), "openssl x509 failed: {output}");
            let (status, output) = run_bounded(
                "openssl",
                &[
                    "verify",
                    "-CAfile",
                    &path(&root_pem),
                    "-untrusted",
                    &path(&f9_pem),
                    &path(&att_pem_path),
                ],
                Duration::from_secs(20),
            )
            .expect("openssl");
            eprintln!("openssl verify: {}", output.trim());
            assert!(status.success(), "openssl verify failed: {output}");
        }
        None => eprintln!("openssl not installed: openssl verify skipped"),
    }

    // attestation of 9c states its policies (PIN always, touch never)
    let att_9c = piv::attest(&mut yk, SlotId::Signature).expect("attest 9c");
    let (_, att_9c) = X509Certificate::from_der(&att_9c).expect("parses");
    assert_eq!(
        att_9c.public_key().subject_public_key.data.as_ref(),
        point_9c.as_slice()
    );
    assert_eq!(
        att_9c.subject().to_string(),
        "CN=YubiKey PIV Attestation 9c"
    );
    assert_eq!(extension(&att_9c, "1.3.6.1.4.1.41482.3.8"), [3, 1]);

    // no key, no attestation
    assert!(piv::attest(&mut yk, SlotId::KeyManagement).is_err());

    // GET METADATA for a generated key
    let meta = piv::metadata(&mut yk, SlotId::Authentication).expect("metadata 9a");
    assert_eq!(
        meta.algorithm,
        ManagementAlgorithmId::Asymmetric(AlgorithmId::EccP256)
    );
    assert_eq!(meta.policy, Some((PinPolicy::Once, TouchPolicy::Never)));
    assert_eq!(meta.origin, Some(Origin::Generated));
    assert_eq!(meta.public.as_ref(), Some(&spki_9a));

    // the f9 certificate, read the way the crate reads slot certificates (GET DATA 5FFF01)
    let f9_read = Certificate::read(&mut yk, SlotId::Attestation).expect("read f9 certificate");
    assert_eq!(f9_read.subject(), "CN=Yubico PIV Attestation");
    assert_eq!(f9_read.cert.to_der().expect("DER"), f9_der);

    // a wrong PIN reports the retries left
    let err = yk.verify_pin(b"000000").expect_err("wrong PIN");
    assert_eq!(err, YkError::WrongPin { tries: 2 });
    assert_eq!(yk.get_pin_retries().expect("retries"), 2);
    yk.verify_pin(b"123456")
        .expect("right PIN resets the counter");
    assert_eq!(yk.get_pin_retries().expect("retries"), 3);

    // a new session starts unauthenticated (card reset), the keys stay
    drop(yk);
    let mut yk = open_yubikey(Duration::from_secs(10));
    let err = piv::generate(
        &mut yk,
        SlotId::KeyManagement,
        AlgorithmId::EccP256,
        PinPolicy::Default,
        TouchPolicy::Default,
    )
    .expect_err("generate without the management key");
    assert_eq!(err, YkError::AuthenticationError);
    let err = piv::sign_data(
        &mut yk,
        digest_256.as_ref(),
        AlgorithmId::EccP256,
        SlotId::Authentication,
    )
    .expect_err("sign without PIN");
    assert_eq!(err, YkError::AuthenticationError);
    let again = piv::attest(&mut yk, SlotId::Authentication).expect("attest 9a again");
    let (_, again) = X509Certificate::from_der(&again).expect("parses");
    assert_eq!(
        again.public_key().subject_public_key.data.as_ref(),
        point_9a.as_slice()
    );
    drop(yk);
    eprintln!("[{:?}] yubikey checks done", t0.elapsed());

    // 4. sanity: OpenSC sees the reader with a card in it
    match run_bounded("opensc-tool", &["-l"], Duration::from_secs(20)) {
        Some((status, output)) => {
            eprintln!("opensc-tool -l:\n{output}");
            assert!(status.success(), "opensc-tool -l failed");
            assert!(
                output
                    .lines()
                    .any(|l| l.contains("Virtual PCD") && l.contains("Yes")),
                "no vpcd reader with a card listed"
            );
        }
        None => eprintln!("opensc-tool not installed: reader listing skipped"),
    }

    // 5. clean shutdown on SIGTERM
    let status = harness
        .stop(Duration::from_secs(10))
        .expect("harness exit status");
    if !status.success() {
        dump_log(&harness_log);
    }
    assert!(status.success(), "harness exited with {status}");
    if std::env::var_os("VIRTUAL_PIV_RUST_LOG").is_some() {
        eprintln!(
            "--- harness log ---\n{}",
            fs::read_to_string(&harness_log).unwrap_or_default()
        );
    }
    eprintln!("[{:?}] done", t0.elapsed());
}
