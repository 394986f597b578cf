//! Enrolling a key generated in a YubiKey PIV slot, and the terminal PIN prompt that the
//! enroll and agent CLIs share.
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::sync::Arc;

use zeroize::Zeroizing;
use zerospice_ca::piv::{self, GenerateOptions, PivKey, PivPrompt, PivSlot};
use zerospice_ca::Signer;
use zerospice_proto::enroll::KeyClaim;

use crate::core::{KeySource, NewKey};
use crate::profile::{KeyRef, ProfileDir, ProfileError};

/// Environment variable a script can set to give the YubiKey PIN without a prompt.
pub const PIN_ENV: &str = "ZEROSPICE_PIV_PIN";

/// Asks for the PIN on the terminal (no echo), or reads one line from standard input when it is
/// not a terminal; `ZEROSPICE_PIV_PIN` overrides both. Says "touch your YubiKey" on stderr.
#[derive(Debug, Default)]
pub struct TerminalPrompt;

impl PivPrompt for TerminalPrompt {
    fn pin(&self, serial: u32) -> Option<Zeroizing<String>> {
        if let Some(pin) = std::env::var_os(PIN_ENV) {
            return pin.into_string().ok().map(Zeroizing::new);
        }
        let question = format!("PIN of YubiKey {serial}: ");
        if std::io::stdin().is_terminal() {
            return rpassword::prompt_password(question)
                .ok()
                .map(Zeroizing::new)
                .filter(|p| !p.is_empty());
        }
        eprint!("{question}");
        let _ = std::io::stderr().flush();
        let mut line = Zeroizing::new(String::new());
        match std::io::stdin().lock().read_line(&mut line) {
            Ok(n) if n > 0 => {
                let pin = Zeroizing::new(line.trim_end_matches(['\r', '\n']).to_owned());
                (!pin.is_empty()).then_some(pin)
            }
            _ => None,
        }
    }

    fn touch(&self, serial: u32) {
        eprintln!("Touch your YubiKey {serial} now (its light is flashing)");
    }
}

/// Generates the key on a YubiKey when the enrollment asks for it.
pub struct YubikeySource {
    pub options: GenerateOptions,
    pub prompt: Arc<dyn PivPrompt>,
    /// Asked when the slot already holds a key, or the default management key is still set.
    pub questions: Box<dyn piv::GenerateQuestions + Send + Sync>,
}

struct YubikeyNewKey(piv::Generated);

impl KeySource for YubikeySource {
    fn create(&self) -> Result<Box<dyn NewKey>, String> {
        let generated = piv::generate(
            &self.options,
            Arc::clone(&self.prompt),
            self.questions.as_ref(),
        )
        .map_err(|e| e.to_string())?;
        Ok(Box::new(YubikeyNewKey(generated)))
    }
}

impl NewKey for YubikeyNewKey {
    fn signer(&self) -> Arc<dyn Signer> {
        self.0.key.clone()
    }
    fn claim(&self) -> KeyClaim {
        KeyClaim::Yubikey {
            attestation: self.0.attestation.clone(),
            chain: vec![self.0.f9.clone()],
        }
    }
    fn persist(&self, _dir: &ProfileDir) -> Result<KeyRef, ProfileError> {
        Ok(KeyRef::Yubikey {
            serial: self.0.key.serial(),
            slot: self.0.key.slot().to_string(),
        })
    }
    fn describe(&self) -> String {
        self.0.key.describe()
    }
    fn notices(&self) -> Vec<String> {
        let mut n = self.0.warnings.clone();
        if let Some(mgm) = &self.0.new_management_key {
            n.push(format!(
                "the new management key of YubiKey {} is {} : store it somewhere safe now, it is shown only this once (it is needed to generate or replace keys on the YubiKey)",
                self.0.key.serial(),
                mgm.as_str()
            ));
        }
        n
    }
    fn store_certificate(&self, cert_der: &[u8]) -> Result<(), String> {
        self.0
            .key
            .write_certificate(cert_der)
            .map_err(|e| e.to_string())
    }
}

/// Opens the key a profile names, checking it is the key of the profile's certificate, and
/// verifies the PIN (asked through `prompt`) unless the key needs none.
pub fn open_profile_key(
    serial: u32,
    slot: &str,
    cert_point: &[u8],
    prompt: Arc<dyn PivPrompt>,
) -> Result<Arc<PivKey>, String> {
    let slot: PivSlot = slot
        .parse()
        .map_err(|e: piv::ParseSlotError| e.to_string())?;
    let key = PivKey::open(serial, slot, cert_point, prompt).map_err(|e| e.to_string())?;
    key.unlock().map_err(|e| e.to_string())?;
    Ok(Arc::new(key))
}
