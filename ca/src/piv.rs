//! YubiKey PIV keys behind the one signing trait.
//!
//! A [`PivKey`] is a key generated inside a PIV slot of a YubiKey (it never leaves it). It
//! implements [`Signer`], so the same object signs the enrollment CSR, the gateway's challenge
//! and the TLS 1.3 handshakes of the agent (through [`crate::keys::tls_signing_key`]).
//!
//! The PIN is asked through a [`PivPrompt`] (a terminal prompt in the CLIs, a dialog in a GUI),
//! and kept in memory (zeroed on drop) only for the life of the key object, because a key with
//! PIN policy `always` needs it again before every signature. A wrong PIN is never retried
//! automatically: the caller gets [`PivError::WrongPin`] with the tries left, so a script with a
//! wrong PIN cannot block the card. Before an operation that waits for a touch the prompt is told
//! to say "touch your key".
//!
//! Everything the card or PC/SC can refuse maps to a [`PivError`] whose text tells the user what
//! to do.
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use yubikey::piv::{self, AlgorithmId, RetiredSlotId, SlotId};
use yubikey::{Certificate, MgmKey, YubiKey};
use zeroize::Zeroizing;

use crate::attestation::{PinPolicy, TouchPolicy};
use crate::keys::{KeyAlgorithm, SignError, Signer};

/// The slot ZeroSpice uses unless told otherwise: 9a, PIV authentication.
pub const DEFAULT_SLOT: PivSlot = PivSlot(SlotId::Authentication);

/// How long a touch counts for a key with touch policy `cached` (YubiKey: 15 s).
const TOUCH_CACHE: Duration = Duration::from_secs(15);

/// A PIV slot that can hold a ZeroSpice key: 9a, 9c, 9d, 9e or a retired slot 82-95.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PivSlot(SlotId);

impl PivSlot {
    pub fn id(self) -> SlotId {
        self.0
    }
    pub fn byte(self) -> u8 {
        u8::from(self.0)
    }
}

/// A slot name that is not a usable key slot.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{0}' is not a PIV key slot: use 9a (authentication, the default), 9c, 9d, 9e or 82 to 95"
)]
pub struct ParseSlotError(String);

impl FromStr for PivSlot {
    type Err = ParseSlotError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        let lower = lower.strip_prefix("0x").unwrap_or(&lower);
        let err = || ParseSlotError(s.to_owned());
        if lower.len() != 2 {
            return Err(err());
        }
        let b = u8::from_str_radix(lower, 16).map_err(|_| err())?;
        let slot = match b {
            0x9a => SlotId::Authentication,
            0x9c => SlotId::Signature,
            0x9d => SlotId::KeyManagement,
            0x9e => SlotId::CardAuthentication,
            0x82..=0x95 => SlotId::Retired(RetiredSlotId::try_from(b).map_err(|_| err())?),
            _ => return Err(err()),
        };
        Ok(PivSlot(slot))
    }
}

impl fmt::Display for PivSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}", self.byte())
    }
}

/// Everything that can go wrong with a YubiKey, worded for the person holding it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PivError {
    #[error("the smart card service (pcscd) is not running: start it (for example `sudo systemctl start pcscd.socket`) and try again")]
    NoService,
    #[error("no YubiKey found: insert your YubiKey and try again")]
    NoKey,
    #[error("several YubiKeys are inserted (serials {}): choose one with --yubikey-serial SERIAL, or remove the others", join(.0))]
    SeveralKeys(Vec<u32>),
    #[error("YubiKey {wanted} is not inserted (found: {})", if .found.is_empty() { "none".to_string() } else { join(.found) })]
    NotInserted { wanted: u32, found: Vec<u32> },
    #[error("wrong PIN for YubiKey {serial}: {tries} {} left before the PIN is blocked", if *.tries == 1 { "try" } else { "tries" })]
    WrongPin { serial: u32, tries: u8 },
    #[error("the PIN of YubiKey {serial} is blocked (no tries left): unblock it with the PUK (`ykman piv access unblock-pin`), or reset the PIV application (`ykman piv reset`, which destroys its keys)")]
    PinBlocked { serial: u32 },
    #[error("no PIN was given for YubiKey {serial}")]
    NoPin { serial: u32 },
    #[error("slot {slot} of YubiKey {serial} already holds a key: pass --overwrite-slot to replace it (the old key is destroyed), or choose another slot with --key yubikey:SLOT")]
    SlotOccupied { serial: u32, slot: PivSlot },
    #[error("slot {slot} of YubiKey {serial} holds no key: enroll again")]
    EmptySlot { serial: u32, slot: PivSlot },
    #[error("slot {slot} of YubiKey {serial} holds another key than this profile's certificate: enroll again")]
    KeyMismatch { serial: u32, slot: PivSlot },
    #[error("YubiKey {serial} has firmware {firmware}, which cannot attest keys (PIV attestation needs firmware 4.3 or later): use a newer YubiKey")]
    NoAttestation { serial: u32, firmware: String },
    #[error("YubiKey {serial} refused the management key: give the right one with --management-key-file FILE (48 hex digits)")]
    ManagementKey { serial: u32 },
    #[error("the management key must be 48 hex digits (24 bytes, 3DES)")]
    BadManagementKey,
    #[error("YubiKey {serial}: {op} failed: {detail}")]
    Device {
        serial: u32,
        op: &'static str,
        detail: String,
    },
    #[error("smart card error: {0}")]
    Pcsc(String),
}

fn join(serials: &[u32]) -> String {
    serials
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<PivError> for SignError {
    fn from(e: PivError) -> Self {
        SignError::Device(e.to_string())
    }
}

/// How the PIN is asked and the touch announced (CLI prompt, GUI dialog).
pub trait PivPrompt: Send + Sync {
    /// The PIN of YubiKey `serial`; `None` if the user gave none (cancelled).
    fn pin(&self, serial: u32) -> Option<Zeroizing<String>>;
    /// Called right before an operation that waits until the key is touched.
    fn touch(&self, serial: u32);
}

fn pcsc_error(e: &yubikey::Error) -> Option<PivError> {
    match e {
        yubikey::Error::PcscError {
            inner: Some(pcsc::Error::NoService | pcsc::Error::ServiceStopped),
        } => Some(PivError::NoService),
        yubikey::Error::PcscError {
            inner:
                Some(
                    pcsc::Error::NoReadersAvailable
                    | pcsc::Error::NoSmartcard
                    | pcsc::Error::RemovedCard
                    | pcsc::Error::ReaderUnavailable,
                ),
        } => Some(PivError::NoKey),
        _ => None,
    }
}

/// Opens the YubiKey with `serial`, or the only one inserted.
pub fn open_device(serial: Option<u32>) -> Result<YubiKey, PivError> {
    let mut ctx = yubikey::Context::open()
        .map_err(|e| pcsc_error(&e).unwrap_or_else(|| PivError::Pcsc(e.to_string())))?;
    let readers = match ctx.iter() {
        Ok(r) => r,
        Err(e) => {
            return Err(pcsc_error(&e).unwrap_or_else(|| PivError::Pcsc(e.to_string())));
        }
    };
    let mut found: Vec<YubiKey> = Vec::new();
    for reader in readers {
        match reader.open() {
            Ok(yk) => found.push(yk),
            Err(e) => {
                if let Some(PivError::NoService) = pcsc_error(&e) {
                    return Err(PivError::NoService);
                }
                tracing::debug!(reader = %reader.name(), error = %e, "no YubiKey in reader");
            }
        }
    }
    let serials: Vec<u32> = found.iter().map(|y| y.serial().0).collect();
    let pick = match serial {
        Some(want) => {
            serials
                .iter()
                .position(|s| *s == want)
                .ok_or_else(|| PivError::NotInserted {
                    wanted: want,
                    found: serials.clone(),
                })
        }
        None => match serials.len() {
            0 => Err(PivError::NoKey),
            1 => Ok(0),
            _ => Err(PivError::SeveralKeys(serials.clone())),
        },
    };
    let mut chosen = None;
    for (i, yk) in found.into_iter().enumerate() {
        if pick.as_ref().ok() == Some(&i) {
            chosen = Some(yk);
        } else {
            // Not ours: leave it as it was (no reset).
            let _ = yk.disconnect(pcsc::Disposition::LeaveCard);
        }
    }
    let idx = pick?;
    chosen.ok_or(PivError::Pcsc(format!("YubiKey {} vanished", serials[idx])))
}

fn alg_id(alg: KeyAlgorithm) -> AlgorithmId {
    match alg {
        KeyAlgorithm::EcdsaP256 => AlgorithmId::EccP256,
        KeyAlgorithm::EcdsaP384 => AlgorithmId::EccP384,
    }
}

fn alg_of_point(point: &[u8]) -> Option<KeyAlgorithm> {
    match point.len() {
        65 if point[0] == 4 => Some(KeyAlgorithm::EcdsaP256),
        97 if point[0] == 4 => Some(KeyAlgorithm::EcdsaP384),
        _ => None,
    }
}

fn yk_pin_policy(p: PinPolicy) -> yubikey::PinPolicy {
    match p {
        PinPolicy::Never => yubikey::PinPolicy::Never,
        PinPolicy::Once => yubikey::PinPolicy::Once,
        PinPolicy::Always => yubikey::PinPolicy::Always,
    }
}

fn yk_touch_policy(t: TouchPolicy) -> yubikey::TouchPolicy {
    match t {
        TouchPolicy::Never => yubikey::TouchPolicy::Never,
        TouchPolicy::Cached => yubikey::TouchPolicy::Cached,
        TouchPolicy::Always => yubikey::TouchPolicy::Always,
    }
}

fn from_yk_policies(
    (pin, touch): (yubikey::PinPolicy, yubikey::TouchPolicy),
) -> (Option<PinPolicy>, Option<TouchPolicy>) {
    let pin = match pin {
        yubikey::PinPolicy::Never => Some(PinPolicy::Never),
        yubikey::PinPolicy::Once => Some(PinPolicy::Once),
        yubikey::PinPolicy::Always => Some(PinPolicy::Always),
        _ => None,
    };
    let touch = match touch {
        yubikey::TouchPolicy::Never => Some(TouchPolicy::Never),
        yubikey::TouchPolicy::Cached => Some(TouchPolicy::Cached),
        yubikey::TouchPolicy::Always => Some(TouchPolicy::Always),
        _ => None,
    };
    (pin, touch)
}

struct State {
    yk: YubiKey,
    /// The PIN that last verified (PIN policy `always` needs it before every signature).
    pin: Option<Zeroizing<Vec<u8>>>,
    verified: bool,
    last_touch: Option<Instant>,
}

/// A key in a YubiKey PIV slot.
pub struct PivKey {
    serial: u32,
    slot: PivSlot,
    alg: KeyAlgorithm,
    public_key: Vec<u8>,
    pin_policy: Option<PinPolicy>,
    touch_policy: Option<TouchPolicy>,
    prompt: Arc<dyn PivPrompt>,
    state: Mutex<State>,
}

impl fmt::Debug for PivKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PivKey")
            .field("serial", &self.serial)
            .field("slot", &self.slot.to_string())
            .field("alg", &self.alg)
            .field("pin_policy", &self.pin_policy)
            .field("touch_policy", &self.touch_policy)
            .finish_non_exhaustive()
    }
}

impl PivKey {
    /// Opens the key in `slot` of YubiKey `serial` for a profile whose certificate holds
    /// `expected_point` (the uncompressed EC point). Where the firmware can say (GET METADATA,
    /// 5.3+), checks the slot holds that very key and reads its PIN and touch policies.
    pub fn open(
        serial: u32,
        slot: PivSlot,
        expected_point: &[u8],
        prompt: Arc<dyn PivPrompt>,
    ) -> Result<Self, PivError> {
        let alg = alg_of_point(expected_point).ok_or(PivError::KeyMismatch { serial, slot })?;
        let mut yk = open_device(Some(serial))?;
        let (mut pin_policy, mut touch_policy) = (None, None);
        match piv::metadata(&mut yk, slot.id()) {
            Ok(meta) => {
                if let Some(public) = &meta.public {
                    if public.subject_public_key.raw_bytes() != expected_point {
                        return Err(PivError::KeyMismatch { serial, slot });
                    }
                }
                if let Some(p) = meta.policy {
                    (pin_policy, touch_policy) = from_yk_policies(p);
                }
            }
            Err(yubikey::Error::NotSupported) => {
                tracing::debug!(serial, "firmware without GET METADATA: key not checked");
            }
            Err(_) => return Err(PivError::EmptySlot { serial, slot }),
        }
        Ok(Self {
            serial,
            slot,
            alg,
            public_key: expected_point.to_vec(),
            pin_policy,
            touch_policy,
            prompt,
            state: Mutex::new(State {
                yk,
                pin: None,
                verified: false,
                last_touch: None,
            }),
        })
    }

    pub fn serial(&self) -> u32 {
        self.serial
    }
    pub fn slot(&self) -> PivSlot {
        self.slot
    }
    pub fn pin_policy(&self) -> Option<PinPolicy> {
        self.pin_policy
    }
    pub fn touch_policy(&self) -> Option<TouchPolicy> {
        self.touch_policy
    }

    /// "YubiKey 12345678 slot 9a (ECDSA P-256, PIN once, touch cached)".
    pub fn describe(&self) -> String {
        let p = |o: Option<&'static str>| o.unwrap_or("unknown");
        format!(
            "YubiKey {} slot {} ({}, PIN {}, touch {})",
            self.serial,
            self.slot,
            self.alg,
            p(self.pin_policy.map(|x| x.as_str())),
            p(self.touch_policy.map(|x| x.as_str()))
        )
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, PivError> {
        self.state.lock().map_err(|_| PivError::Device {
            serial: self.serial,
            op: "locking the card",
            detail: "an earlier operation panicked".into(),
        })
    }

    /// Asks for the PIN now and verifies it (so a wrong PIN is reported before any network
    /// exchange). Does nothing for a key with PIN policy `never`.
    pub fn unlock(&self) -> Result<(), PivError> {
        if self.pin_policy == Some(PinPolicy::Never) {
            return Ok(());
        }
        let mut st = self.lock()?;
        if st.verified {
            return Ok(());
        }
        verify_pin(&mut st, self.serial, self.prompt.as_ref())
    }

    fn sign_digest(&self, digest: &[u8]) -> Result<Vec<u8>, PivError> {
        let mut st = self.lock()?;
        let mut fresh_pin = false;
        let need_pin = match self.pin_policy {
            Some(PinPolicy::Never) => false,
            Some(PinPolicy::Always) => true,
            _ => !st.verified,
        };
        if need_pin {
            verify_pin(&mut st, self.serial, self.prompt.as_ref())?;
            fresh_pin = true;
        }
        let touch = match self.touch_policy {
            Some(TouchPolicy::Never) => false,
            Some(TouchPolicy::Cached) => st
                .last_touch
                .is_none_or(|t| t.elapsed() >= TOUCH_CACHE - Duration::from_secs(1)),
            Some(TouchPolicy::Always) | None => true,
        };
        if touch {
            self.prompt.touch(self.serial);
        }
        let mut result = piv::sign_data(&mut st.yk, digest, alg_id(self.alg), self.slot.id());
        if matches!(result, Err(yubikey::Error::AuthenticationError)) && !fresh_pin {
            // The card wants the PIN (session reset, or a policy the metadata did not tell):
            // verify once and try again.
            verify_pin(&mut st, self.serial, self.prompt.as_ref())?;
            result = piv::sign_data(&mut st.yk, digest, alg_id(self.alg), self.slot.id());
        }
        match result {
            Ok(sig) => {
                if touch {
                    st.last_touch = Some(Instant::now());
                }
                Ok(sig.to_vec())
            }
            Err(yubikey::Error::AuthenticationError) => Err(PivError::Device {
                serial: self.serial,
                op: "signing",
                detail: "the key refused to sign (PIN not accepted, or no touch in time)".into(),
            }),
            Err(e) => Err(pcsc_error(&e).unwrap_or_else(|| PivError::Device {
                serial: self.serial,
                op: "signing",
                detail: e.to_string(),
            })),
        }
    }

    /// Writes `cert_der` as the slot's certificate (so other PIV tools see it). Needs the
    /// management key authenticated in this session (true right after [`generate`]).
    pub fn write_certificate(&self, cert_der: &[u8]) -> Result<(), PivError> {
        let mut st = self.lock()?;
        let dev = |op, e: yubikey::Error| PivError::Device {
            serial: self.serial,
            op,
            detail: e.to_string(),
        };
        let cert = Certificate::from_bytes(cert_der.to_vec())
            .map_err(|e| dev("reading the certificate", e))?;
        cert.write(
            &mut st.yk,
            self.slot.id(),
            yubikey::certificate::CertInfo::Uncompressed,
        )
        .map_err(|e| dev("writing the slot certificate", e))
    }
}

fn verify_pin(st: &mut State, serial: u32, prompt: &dyn PivPrompt) -> Result<(), PivError> {
    let pin: Zeroizing<Vec<u8>> = match &st.pin {
        Some(p) => p.clone(),
        None => {
            let text = prompt.pin(serial).ok_or(PivError::NoPin { serial })?;
            Zeroizing::new(text.trim_end_matches(['\r', '\n']).as_bytes().to_vec())
        }
    };
    match st.yk.verify_pin(&pin) {
        Ok(()) => {
            st.pin = Some(pin);
            st.verified = true;
            Ok(())
        }
        Err(yubikey::Error::WrongPin { tries: 0 } | yubikey::Error::PinLocked) => {
            st.pin = None;
            st.verified = false;
            Err(PivError::PinBlocked { serial })
        }
        Err(yubikey::Error::WrongPin { tries }) => {
            st.pin = None;
            st.verified = false;
            Err(PivError::WrongPin { serial, tries })
        }
        Err(yubikey::Error::SizeError) => Err(PivError::Device {
            serial,
            op: "verifying the PIN",
            detail: "a PIV PIN has at most 8 characters".into(),
        }),
        Err(e) => Err(pcsc_error(&e).unwrap_or_else(|| PivError::Device {
            serial,
            op: "verifying the PIN",
            detail: e.to_string(),
        })),
    }
}

impl Signer for PivKey {
    fn algorithm(&self) -> KeyAlgorithm {
        self.alg
    }
    fn public_key(&self) -> &[u8] {
        &self.public_key
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let digest = self.alg.digest(message);
        self.sign_digest(&digest).map_err(|e| {
            tracing::warn!(serial = self.serial, slot = %self.slot, error = %e, "YubiKey signature failed");
            SignError::from(e)
        })
    }
}

/// A new management key to set while enrolling (when the default one is still set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewManagementKey {
    /// A random key, shown once to the user, who must store it.
    Random,
    /// A random key stored on the YubiKey itself, readable only after the PIN is verified.
    Protected,
}

/// What to generate, and where.
pub struct GenerateOptions {
    /// The YubiKey's serial, if several may be inserted.
    pub serial: Option<u32>,
    pub slot: PivSlot,
    pub algorithm: KeyAlgorithm,
    pub pin_policy: PinPolicy,
    pub touch_policy: TouchPolicy,
    /// Replace a key already in the slot without asking.
    pub overwrite: bool,
    /// The management key (24 bytes) if it is neither the default nor PIN-protected.
    pub management_key: Option<Zeroizing<Vec<u8>>>,
    pub new_management_key: Option<NewManagementKey>,
}

impl fmt::Debug for GenerateOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenerateOptions")
            .field("serial", &self.serial)
            .field("slot", &self.slot.to_string())
            .field("algorithm", &self.algorithm)
            .field("pin_policy", &self.pin_policy)
            .field("touch_policy", &self.touch_policy)
            .field("overwrite", &self.overwrite)
            .field(
                "management_key",
                &self.management_key.as_ref().map(|_| "<given>"),
            )
            .field("new_management_key", &self.new_management_key)
            .finish()
    }
}

/// A key just generated on a YubiKey, with the proof of where it was generated.
pub struct Generated {
    pub key: Arc<PivKey>,
    /// The slot's attestation certificate (DER), issued by the device's f9 key.
    pub attestation: Vec<u8>,
    /// The f9 attestation certificate (DER).
    pub f9: Vec<u8>,
    /// Things the user should know (default management key still set, ...).
    pub warnings: Vec<String>,
    /// A new random management key the user must store (hex), if one was set.
    pub new_management_key: Option<Zeroizing<String>>,
}

impl fmt::Debug for Generated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Generated")
            .field("key", &self.key)
            .field("warnings", &self.warnings)
            .finish_non_exhaustive()
    }
}

/// Parses a management key given as hex (whitespace and colons ignored).
pub fn parse_management_key(text: &str) -> Result<Zeroizing<Vec<u8>>, PivError> {
    let clean: Zeroizing<String> = Zeroizing::new(
        text.chars()
            .filter(|c| !c.is_whitespace() && *c != ':')
            .collect(),
    );
    let bytes =
        Zeroizing::new(hex::decode(clean.as_bytes()).map_err(|_| PivError::BadManagementKey)?);
    if bytes.len() != 24 {
        return Err(PivError::BadManagementKey);
    }
    Ok(bytes)
}

/// PIV attestation (INS F9) exists from firmware 4.3.
fn can_attest(serial: u32, (major, minor, patch): (u8, u8, u8)) -> Result<(), PivError> {
    if (major, minor) < (4, 3) {
        return Err(PivError::NoAttestation {
            serial,
            firmware: format!("{major}.{minor}.{patch}"),
        });
    }
    Ok(())
}

fn slot_occupied(yk: &mut YubiKey, slot: PivSlot) -> bool {
    match piv::metadata(yk, slot.id()) {
        Ok(_) => true,
        Err(yubikey::Error::NotSupported) => {
            piv::attest(yk, slot.id()).is_ok() || Certificate::read(yk, slot.id()).is_ok()
        }
        Err(_) => false,
    }
}

/// Questions [`generate`] may ask the user (a terminal prompt, a GUI dialog).
pub trait GenerateQuestions {
    /// The slot already holds a key: destroy it? Asked unless [`GenerateOptions::overwrite`].
    fn overwrite(&self, serial: u32, slot: PivSlot) -> bool;
    /// The factory default management key is still set: replace it, and how? Asked unless
    /// [`GenerateOptions::new_management_key`] is set; `None` keeps it (with a warning).
    fn replace_default_management_key(&self, serial: u32) -> Option<NewManagementKey>;
}

/// Asks nothing: never overwrites, keeps a default management key (non-interactive runs).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoQuestions;

impl GenerateQuestions for NoQuestions {
    fn overwrite(&self, _: u32, _: PivSlot) -> bool {
        false
    }
    fn replace_default_management_key(&self, _: u32) -> Option<NewManagementKey> {
        None
    }
}

/// Generates a key in a slot of a YubiKey and fetches its attestation. When the slot already
/// holds a key, `questions` is asked (unless `opts.overwrite`); no stops with
/// [`PivError::SlotOccupied`] before anything on the card changes. When the factory default
/// management key is still set, it is asked whether to replace it.
pub fn generate(
    opts: &GenerateOptions,
    prompt: Arc<dyn PivPrompt>,
    questions: &dyn GenerateQuestions,
) -> Result<Generated, PivError> {
    let mut yk = open_device(opts.serial)?;
    let serial = yk.serial().0;
    let v = yk.version();
    can_attest(serial, (v.major, v.minor, v.patch))?;
    let slot = opts.slot;
    if slot_occupied(&mut yk, slot) && !opts.overwrite && !questions.overwrite(serial, slot) {
        return Err(PivError::SlotOccupied { serial, slot });
    }
    let mut st = State {
        yk,
        pin: None,
        verified: false,
        last_touch: None,
    };
    verify_pin(&mut st, serial, prompt.as_ref())?;

    let mut warnings = Vec::new();
    let mut replace = opts.new_management_key;
    let yk = &mut st.yk;
    match &opts.management_key {
        Some(bytes) => {
            let key =
                MgmKey::from_bytes(bytes.as_slice()).map_err(|_| PivError::BadManagementKey)?;
            yk.authenticate(key)
                .map_err(|_| PivError::ManagementKey { serial })?;
        }
        None => {
            if yk.authenticate(MgmKey::default()).is_ok() {
                if replace.is_none() {
                    replace = questions.replace_default_management_key(serial);
                }
                if replace.is_none() {
                    warnings.push(format!(
                        "YubiKey {serial} still uses the factory default management key: anyone with the key in hand can replace its keys. Set a new one with --set-management-key protected (kept on the YubiKey behind your PIN) or --set-management-key random (shown once for you to store)"
                    ));
                }
            } else {
                let protected =
                    MgmKey::get_protected(yk).map_err(|_| PivError::ManagementKey { serial })?;
                yk.authenticate(protected)
                    .map_err(|_| PivError::ManagementKey { serial })?;
            }
        }
    }
    let done = provision(
        &mut Card {
            yk,
            serial,
            opts,
            firmware: v.to_string(),
        },
        replace,
        &mut warnings,
    )?;
    let key = PivKey {
        serial,
        slot,
        alg: opts.algorithm,
        public_key: done.point,
        pin_policy: Some(opts.pin_policy),
        touch_policy: Some(opts.touch_policy),
        prompt,
        state: Mutex::new(st),
    };
    Ok(Generated {
        key: Arc::new(key),
        attestation: done.attestation,
        f9: done.f9,
        warnings,
        new_management_key: done.new_management_key,
    })
}

/// The card steps of [`generate`] once authenticated with the current management key.
trait ProvisionSteps {
    /// Generates the key in the slot; returns its public point.
    fn generate_key(&mut self) -> Result<Vec<u8>, PivError>;
    /// The slot's attestation certificate (DER).
    fn attest(&mut self) -> Result<Vec<u8>, PivError>;
    /// The f9 attestation certificate (DER).
    fn read_f9(&mut self) -> Result<Vec<u8>, PivError>;
    /// Sets a new random management key; returns it (hex) for [`NewManagementKey::Random`].
    /// Once the card holds the new key, later trouble is a warning, never an error: the key must
    /// reach the caller.
    fn set_management_key(
        &mut self,
        kind: NewManagementKey,
        warnings: &mut Vec<String>,
    ) -> Result<Option<Zeroizing<String>>, PivError>;
}

/// What [`provision`] got from the card.
struct Provisioned {
    point: Vec<u8>,
    attestation: Vec<u8>,
    f9: Vec<u8>,
    new_management_key: Option<Zeroizing<String>>,
}

/// Key generation, attestation and the f9 read first; the management key is replaced last, so a
/// failure on the way leaves the card's management key as it was (a random key written earlier
/// and lost with the error would lock the user out of key management on their YubiKey).
fn provision(
    card: &mut impl ProvisionSteps,
    replace: Option<NewManagementKey>,
    warnings: &mut Vec<String>,
) -> Result<Provisioned, PivError> {
    let point = card.generate_key()?;
    let attestation = card.attest()?;
    let f9 = card.read_f9()?;
    let new_management_key = match replace {
        Some(kind) => card.set_management_key(kind, warnings)?,
        None => None,
    };
    Ok(Provisioned {
        point,
        attestation,
        f9,
        new_management_key,
    })
}

/// [`ProvisionSteps`] on a real (PC/SC) YubiKey.
struct Card<'a> {
    yk: &'a mut YubiKey,
    serial: u32,
    opts: &'a GenerateOptions,
    firmware: String,
}

impl Card<'_> {
    fn dev(&self, op: &'static str, e: yubikey::Error) -> PivError {
        pcsc_error(&e).unwrap_or(PivError::Device {
            serial: self.serial,
            op,
            detail: e.to_string(),
        })
    }
}

impl ProvisionSteps for Card<'_> {
    fn generate_key(&mut self) -> Result<Vec<u8>, PivError> {
        let opts = self.opts;
        let spki = piv::generate(
            self.yk,
            opts.slot.id(),
            alg_id(opts.algorithm),
            yk_pin_policy(opts.pin_policy),
            yk_touch_policy(opts.touch_policy),
        )
        .map_err(|e| self.dev("generating the key", e))?;
        let point = spki.subject_public_key.raw_bytes().to_vec();
        if alg_of_point(&point) != Some(opts.algorithm) {
            return Err(PivError::Device {
                serial: self.serial,
                op: "generating the key",
                detail: "the card returned a key of another type".into(),
            });
        }
        Ok(point)
    }

    fn attest(&mut self) -> Result<Vec<u8>, PivError> {
        match piv::attest(self.yk, self.opts.slot.id()) {
            Ok(a) => Ok(a.to_vec()),
            Err(yubikey::Error::NotSupported) => Err(PivError::NoAttestation {
                serial: self.serial,
                firmware: self.firmware.clone(),
            }),
            Err(e) => Err(self.dev("attesting the key", e)),
        }
    }

    fn read_f9(&mut self) -> Result<Vec<u8>, PivError> {
        let f9 = Certificate::read(self.yk, SlotId::Attestation)
            .map_err(|e| self.dev("reading the f9 attestation certificate", e))?;
        use der::Encode as _;
        f9.cert.to_der().map_err(|e| PivError::Device {
            serial: self.serial,
            op: "reading the f9 attestation certificate",
            detail: e.to_string(),
        })
    }

    fn set_management_key(
        &mut self,
        kind: NewManagementKey,
        warnings: &mut Vec<String>,
    ) -> Result<Option<Zeroizing<String>>, PivError> {
        let key = MgmKey::generate();
        let shown = match kind {
            NewManagementKey::Random => {
                key.set_manual(self.yk, false)
                    .map_err(|e| self.dev("setting the management key", e))?;
                Some(Zeroizing::new(hex::encode(key.as_ref())))
            }
            NewManagementKey::Protected => {
                key.set_protected(self.yk)
                    .map_err(|e| self.dev("setting the PIN-protected management key", e))?;
                None
            }
        };
        // The card holds the new key now: check it, but never lose it over the check.
        if let Err(e) = self.yk.authenticate(key) {
            warnings.push(format!(
                "YubiKey {}: the new management key was set, but authenticating with it failed ({e})",
                self.serial
            ));
        }
        Ok(shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A card that records the steps it is asked for and fails at `fail_at`.
    struct FakeCard {
        fail_at: Option<&'static str>,
        steps: Vec<&'static str>,
    }

    impl FakeCard {
        fn step<T>(&mut self, name: &'static str, ok: T) -> Result<T, PivError> {
            self.steps.push(name);
            if self.fail_at == Some(name) {
                return Err(PivError::Device {
                    serial: 7,
                    op: name,
                    detail: "card removed".into(),
                });
            }
            Ok(ok)
        }
    }

    impl ProvisionSteps for FakeCard {
        fn generate_key(&mut self) -> Result<Vec<u8>, PivError> {
            self.step("generate", vec![4])
        }
        fn attest(&mut self) -> Result<Vec<u8>, PivError> {
            self.step("attest", vec![0x30])
        }
        fn read_f9(&mut self) -> Result<Vec<u8>, PivError> {
            self.step("f9", vec![0x31])
        }
        fn set_management_key(
            &mut self,
            kind: NewManagementKey,
            _: &mut Vec<String>,
        ) -> Result<Option<Zeroizing<String>>, PivError> {
            let shown = (kind == NewManagementKey::Random).then(|| Zeroizing::new("ab".repeat(24)));
            self.step("management key", shown)
        }
    }

    #[test]
    fn the_management_key_changes_only_after_generation_attestation_and_f9() {
        // A failure before the end leaves the management key untouched (a random key written
        // first would be lost with the error).
        for fail_at in ["generate", "attest", "f9"] {
            for kind in [NewManagementKey::Random, NewManagementKey::Protected] {
                let mut card = FakeCard {
                    fail_at: Some(fail_at),
                    steps: Vec::new(),
                };
                let e = provision(&mut card, Some(kind), &mut Vec::new())
                    .err()
                    .expect("refused");
                assert!(matches!(e, PivError::Device { op, .. } if op == fail_at));
                assert!(!card.steps.contains(&"management key"), "{:?}", card.steps);
            }
        }
        // All good: the new key is set last and handed back.
        let mut card = FakeCard {
            fail_at: None,
            steps: Vec::new(),
        };
        let done = provision(&mut card, Some(NewManagementKey::Random), &mut Vec::new()).unwrap();
        assert_eq!(card.steps, ["generate", "attest", "f9", "management key"]);
        assert_eq!(
            done.new_management_key.as_deref().map(|k| k.len()),
            Some(48)
        );
        assert_eq!((done.attestation, done.f9), (vec![0x30], vec![0x31]));
        // No replacement asked: the management key is never touched.
        let mut card = FakeCard {
            fail_at: None,
            steps: Vec::new(),
        };
        let done = provision(&mut card, None, &mut Vec::new()).unwrap();
        assert_eq!(card.steps, ["generate", "attest", "f9"]);
        assert!(done.new_management_key.is_none());
    }

    #[test]
    fn slots_parse_and_print() {
        for s in ["9a", "9C", "0x9d", "9e", "82", "95"] {
            let slot: PivSlot = s.parse().unwrap();
            assert_eq!(
                slot.to_string(),
                s.to_ascii_lowercase().trim_start_matches("0x")
            );
        }
        for bad in ["f9", "9b", "81", "96", "", "9", "9aa", "zz"] {
            let e = bad.parse::<PivSlot>().unwrap_err();
            assert!(e.to_string().contains("is not a PIV key slot"), "{e}");
        }
        assert_eq!(DEFAULT_SLOT.to_string(), "9a");
    }

    #[test]
    fn error_texts_tell_what_to_do() {
        assert_eq!(
            PivError::WrongPin {
                serial: 7,
                tries: 1
            }
            .to_string(),
            "wrong PIN for YubiKey 7: 1 try left before the PIN is blocked"
        );
        assert_eq!(
            PivError::SeveralKeys(vec![1, 2]).to_string(),
            "several YubiKeys are inserted (serials 1, 2): choose one with --yubikey-serial SERIAL, or remove the others"
        );
        assert_eq!(
            PivError::NotInserted {
                wanted: 5,
                found: vec![]
            }
            .to_string(),
            "YubiKey 5 is not inserted (found: none)"
        );
    }

    #[test]
    fn attestation_needs_firmware_4_3() {
        assert_eq!(
            can_attest(9, (4, 2, 7)).unwrap_err().to_string(),
            "YubiKey 9 has firmware 4.2.7, which cannot attest keys (PIV attestation needs firmware 4.3 or later): use a newer YubiKey"
        );
        assert_eq!(
            can_attest(9, (3, 4, 0)),
            Err(PivError::NoAttestation {
                serial: 9,
                firmware: "3.4.0".into()
            })
        );
        for ok in [(4, 3, 1), (5, 4, 3), (5, 7, 4)] {
            assert!(can_attest(9, ok).is_ok());
        }
    }

    #[test]
    fn management_keys_parse() {
        let k = parse_management_key("010203040506070801020304050607080102030405060708").unwrap();
        assert_eq!(k.len(), 24);
        assert!(parse_management_key("01:02").is_err());
        assert!(parse_management_key("zz").is_err());
    }

    #[test]
    fn points_name_their_curve() {
        let mut p = vec![4u8; 65];
        assert_eq!(alg_of_point(&p), Some(KeyAlgorithm::EcdsaP256));
        p.resize(97, 4);
        assert_eq!(alg_of_point(&p), Some(KeyAlgorithm::EcdsaP384));
        p[0] = 2;
        assert_eq!(alg_of_point(&p), None);
    }
}
