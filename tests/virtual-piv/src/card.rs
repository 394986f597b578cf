//! The YubiKey face of the card: a wrapper around the applet's APDU handling.
//!
//! `piv-authenticator` implements standard PIV and some Yubico extensions. Where a YubiKey 5
//! (firmware 5.4.3) answers differently, or where the applet has no answer, this wrapper answers
//! itself; everything else is passed to the applet. Each deviation is listed in README.md.
//!
//! Transport, as a YubiKey over T=1 with short APDUs:
//! - command chaining (CLA bit 0x10) is reassembled here;
//! - a response longer than 256 bytes (or than Le) is cut into 256-byte parts: the first part ends
//!   in `61 xx` and GET RESPONSE (INS C0) fetches the rest.

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use iso7816::command::CommandView;
use piv_authenticator::Authenticator;
use rcgen::{PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384};

use crate::{
    attestation::{self, CardPublicKey, SlotAttestation, TestPki},
    dispatch::VirtClient,
};

/// Firmware version the card claims: 5.4.3 (5.7 would switch the default management key to AES-192).
pub const FIRMWARE: [u8; 3] = [5, 4, 3];
/// Form factor in the attestation extension 1.3.6.1.4.1.41482.3.9: 0x01 = USB-A keychain
/// (YubiKey 5 NFC).
pub const FORM_FACTOR: u8 = 0x01;
/// ATR of a YubiKey 5 NFC (T=1; historical bytes spell "YubiKey").
pub const YUBIKEY_5_ATR: &[u8] = &[
    0x3B, 0xFD, 0x13, 0x00, 0x00, 0x81, 0x31, 0xFE, 0x15, 0x80, 0x73, 0xC0, 0x21, 0xC0, 0x57, 0x59,
    0x75, 0x62, 0x69, 0x4B, 0x65, 0x79, 0x40,
];

/// The full PIV AID; the `yubikey` crate selects with its first 5 bytes.
const PIV_AID: [u8; 11] = [
    0xA0, 0x00, 0x00, 0x03, 0x08, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00,
];
/// What a YubiKey 5 answers to SELECT PIV: an application property template with the PIX and the
/// coexistent tag allocation authority (the 5-byte NIST RID).
const YUBIKEY_SELECT_RESPONSE: &[u8] = &[
    0x61, 0x11, 0x4F, 0x06, 0x00, 0x00, 0x10, 0x00, 0x01, 0x00, 0x79, 0x07, 0x4F, 0x05, 0xA0, 0x00,
    0x00, 0x03, 0x08,
];
/// GET DATA for the attestation certificate object 5FFF01.
const GET_DATA_F9: &[u8] = &[0x5C, 0x03, 0x5F, 0xFF, 0x01];

const ALG_3DES: u8 = 0x03;
const ALG_P256: u8 = 0x11;
const ALG_P384: u8 = 0x14;
const SLOT_MANAGEMENT: u8 = 0x9B;
const REF_PIN: u8 = 0x80;
const REF_PUK: u8 = 0x81;

/// Retry counters the applet sets (a YubiKey sets 3 and 3; piv-authenticator 3 for the PIN, 5 for
/// the PUK).
const PIN_RETRIES_TOTAL: u8 = 3;
const PUK_RETRIES_TOTAL: u8 = 5;
/// Factory PIN 123456 and PUK 12345678 as sent in APDUs (padded with FF to 8 bytes).
const DEFAULT_PIN: &[u8] = b"123456\xFF\xFF";
const DEFAULT_PUK: &[u8] = b"12345678";
/// Factory management key (3DES).
const DEFAULT_MGM_KEY: &[u8] = &[
    1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8,
];

const SW_OK: u16 = 0x9000;
const SW_WRONG_LENGTH: u16 = 0x6700;
const SW_SECURITY_STATUS: u16 = 0x6982;
const SW_AUTH_BLOCKED: u16 = 0x6983;
const SW_CONDITIONS: u16 = 0x6985;
const SW_INCORRECT_DATA: u16 = 0x6A80;
const SW_NOT_FOUND: u16 = 0x6A82;
const SW_REFERENCE_NOT_FOUND: u16 = 0x6A88;
const SW_INCORRECT_P1P2: u16 = 0x6B00;
const SW_CLA_NOT_SUPPORTED: u16 = 0x6E00;

/// Largest reply the applet can produce (certificate objects are at most ~3 KB).
const REPLY_CAPACITY: usize = 8192;
/// Largest chained command we accept (a YubiKey takes 3072-byte objects plus headers).
const CHAIN_CAPACITY: usize = 4096;

/// A key generated on the card, remembered for ATTEST and GET METADATA.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SlotKey {
    algorithm: u8,
    /// Uncompressed EC point (04 || X || Y).
    point: Vec<u8>,
    /// 1 never, 2 once, 3 always
    pin_policy: u8,
    /// 1 never, 2 always, 3 cached
    touch_policy: u8,
}

/// State the wrapper keeps beside the applet's (persisted with `--state-dir`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Emulation {
    slots: BTreeMap<u8, SlotKey>,
    pin_retries: u8,
    puk_retries: u8,
    pin_default: bool,
    puk_default: bool,
    mgm_default: bool,
}

impl Default for Emulation {
    fn default() -> Self {
        Self {
            slots: BTreeMap::new(),
            pin_retries: PIN_RETRIES_TOTAL,
            puk_retries: PUK_RETRIES_TOTAL,
            pin_default: true,
            puk_default: true,
            mgm_default: true,
        }
    }
}

struct Chain {
    ins: u8,
    p1: u8,
    p2: u8,
    data: Vec<u8>,
}

pub struct YubiKeyCard<'a> {
    piv: Authenticator<VirtClient<'a>>,
    pki: TestPki,
    serial: u32,
    emulation: Emulation,
    state_file: Option<PathBuf>,
    chain: Option<Chain>,
    /// Response bytes not yet fetched with GET RESPONSE.
    pending: Vec<u8>,
    /// Management key authenticated since the last reset / SELECT (the applet never forgets it,
    /// so the wrapper keeps its own flag and gates the commands that need it).
    admin_authenticated: bool,
    /// The previous APDU was a successful PIN VERIFY (for PIN policy "always").
    pin_just_verified: bool,
}

impl<'a> YubiKeyCard<'a> {
    pub fn new(
        piv: Authenticator<VirtClient<'a>>,
        pki: TestPki,
        serial: u32,
        state_file: Option<PathBuf>,
    ) -> Result<Self> {
        let emulation = match &state_file {
            Some(path) if path.exists() => Emulation::load(path)?,
            _ => Emulation::default(),
        };
        Ok(Self {
            piv,
            pki,
            serial,
            emulation,
            state_file,
            chain: None,
            pending: Vec::new(),
            admin_authenticated: false,
            pin_just_verified: false,
        })
    }

    /// Card reset / power cycle: the security status goes, as on a YubiKey.
    fn reset_security_status(&mut self) {
        self.chain = None;
        self.pending.clear();
        self.admin_authenticated = false;
        self.pin_just_verified = false;
        // VERIFY with P1=FF: the applet forgets the PIN.
        let (_, sw) = self.forward(0x00, 0x20, 0xFF, REF_PIN, &[]);
        if sw != SW_OK {
            log::warn!("clearing the PIN status failed: {sw:04X}");
        }
    }

    fn save(&self) {
        if let Some(path) = &self.state_file {
            if let Err(e) = self.emulation.save(path) {
                log::error!("saving {}: {e:#}", path.display());
            }
        }
    }

    /// Handles one command APDU (after chaining) and returns (data, status word).
    fn dispatch(
        &mut self,
        cla: u8,
        ins: u8,
        p1: u8,
        p2: u8,
        data: &[u8],
        pin_just_verified: bool,
    ) -> (Vec<u8>, u16) {
        match ins {
            0xA4 => self.select(cla, p1, p2, data),
            // GET VERSION
            0xFD => (FIRMWARE.to_vec(), SW_OK),
            // GET SERIAL
            0xF8 => (self.serial.to_be_bytes().to_vec(), SW_OK),
            // ATTEST
            0xF9 => self.attest(p1),
            // GET METADATA
            0xF7 => self.metadata(p2),
            // GET DATA of the attestation certificate
            0xCB if p1 == 0x3F && p2 == 0xFF && data == GET_DATA_F9 => {
                (attestation::tlv(0x53, &self.pki.f9_object()), SW_OK)
            }
            0x47 => self.generate(cla, p1, p2, data),
            0x87 => self.general_authenticate(cla, p1, p2, data, pin_just_verified),
            0x20 => self.verify(cla, p1, p2, data),
            0x24 | 0x2C => self.change_reference(cla, ins, p1, p2, data),
            // PIV reset
            0xFB => {
                let (out, sw) = self.forward(cla, ins, p1, p2, data);
                if sw == SW_OK {
                    self.emulation = Emulation::default();
                    self.admin_authenticated = false;
                    self.save();
                }
                (out, sw)
            }
            // IMPORT KEY: an imported key can never be attested
            0xFE => {
                if !self.admin_authenticated {
                    return (Vec::new(), SW_SECURITY_STATUS);
                }
                let (out, sw) = self.forward(cla, ins, p1, p2, data);
                if sw == SW_OK && self.emulation.slots.remove(&p2).is_some() {
                    self.save();
                }
                (out, sw)
            }
            // SET MANAGEMENT KEY
            0xFF => {
                if !self.admin_authenticated {
                    return (Vec::new(), SW_SECURITY_STATUS);
                }
                let (out, sw) = self.forward(cla, ins, p1, p2, data);
                if sw == SW_OK {
                    // data = algorithm, key reference 9B, length, key
                    self.emulation.mgm_default =
                        data.first() == Some(&ALG_3DES) && data.get(3..) == Some(DEFAULT_MGM_KEY);
                    self.save();
                }
                (out, sw)
            }
            // PUT DATA, SET PIN RETRIES: management key required
            0xDB | 0xFA if !self.admin_authenticated => (Vec::new(), SW_SECURITY_STATUS),
            _ => self.forward(cla, ins, p1, p2, data),
        }
    }

    /// Passes a command to the applet.
    fn forward(&mut self, cla: u8, ins: u8, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
        let mut apdu = vec![cla, ins, p1, p2];
        if !data.is_empty() {
            if data.len() <= 0xFF {
                apdu.push(data.len() as u8);
            } else {
                let len = data.len() as u16;
                apdu.push(0x00);
                apdu.extend_from_slice(&len.to_be_bytes());
            }
            apdu.extend_from_slice(data);
        }
        let command = match CommandView::try_from(apdu.as_slice()) {
            Ok(command) => command,
            Err(e) => {
                log::warn!("cannot rebuild the command for the applet: {e:?}");
                return (Vec::new(), SW_WRONG_LENGTH);
            }
        };
        let mut reply = heapless::Vec::<u8, REPLY_CAPACITY>::new();
        match self.piv.respond(command, reply.as_mut_view()) {
            Ok(()) => (reply.to_vec(), SW_OK),
            Err(status) => (Vec::new(), u16::from(status)),
        }
    }

    fn select(&mut self, cla: u8, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
        // The yubikey crate (like yubico-piv-tool) selects with the 5-byte RID only; the applet
        // wants at least 9 bytes of the AID.
        let is_piv = p1 == 0x04 && data.len() >= 5 && PIV_AID.starts_with(data);
        if !is_piv {
            // No OTP, management or other Yubico applications on this card.
            return (Vec::new(), SW_NOT_FOUND);
        }
        let (_, sw) = self.forward(cla, 0xA4, p1, p2, &PIV_AID);
        if sw != SW_OK {
            return (Vec::new(), sw);
        }
        // A YubiKey resets the PIV security status on SELECT (the yubikey crate relies on this
        // to read the PIN retry counter).
        self.reset_security_status();
        (YUBIKEY_SELECT_RESPONSE.to_vec(), SW_OK)
    }

    fn verify(&mut self, cla: u8, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
        let (out, sw) = self.forward(cla, 0x20, p1, p2, data);
        if p2 == REF_PIN && p1 == 0x00 {
            let before = self.emulation.pin_retries;
            match sw {
                SW_OK if !data.is_empty() => {
                    self.emulation.pin_retries = PIN_RETRIES_TOTAL;
                    self.pin_just_verified = true;
                }
                SW_AUTH_BLOCKED => self.emulation.pin_retries = 0,
                sw if sw & 0xFFF0 == 0x63C0 => self.emulation.pin_retries = (sw & 0x0F) as u8,
                _ => {}
            }
            if before != self.emulation.pin_retries {
                self.save();
            }
        }
        (out, sw)
    }

    /// CHANGE REFERENCE DATA (24) and RESET RETRY COUNTER (2C).
    fn change_reference(
        &mut self,
        cla: u8,
        ins: u8,
        p1: u8,
        p2: u8,
        data: &[u8],
    ) -> (Vec<u8>, u16) {
        let (out, mut sw) = self.forward(cla, ins, p1, p2, data);
        if ins == 0x24 && p2 != REF_PIN && p2 != REF_PUK {
            return (out, sw);
        }
        // Which counter the command spends: CHANGE REFERENCE on the PIN or PUK spends that one,
        // RESET RETRY COUNTER (unblock the PIN with the PUK) spends the PUK.
        let puk = ins == 0x2C || p2 == REF_PUK;
        let e = &mut self.emulation;
        let (total, current) = if puk {
            (PUK_RETRIES_TOTAL, e.puk_retries)
        } else {
            (PIN_RETRIES_TOTAL, e.pin_retries)
        };
        let remaining = match sw {
            SW_OK => total,
            // The applet answers a wrong old PIN/PUK with a bare 6300; a YubiKey says 63Cx.
            0x6300 => {
                let remaining = current.saturating_sub(1);
                sw = if remaining == 0 {
                    SW_AUTH_BLOCKED
                } else {
                    0x63C0 | u16::from(remaining)
                };
                remaining
            }
            SW_AUTH_BLOCKED => 0,
            sw if sw & 0xFFF0 == 0x63C0 => (sw & 0x0F) as u8,
            _ => return (out, sw),
        };
        if puk {
            e.puk_retries = remaining;
        } else {
            e.pin_retries = remaining;
        }
        if sw == SW_OK && data.len() == 16 {
            // data = old (or PUK) 8 bytes || new 8 bytes, padded with FF.
            let new_value = &data[8..];
            if ins == 0x2C {
                e.pin_retries = PIN_RETRIES_TOTAL;
                e.pin_default = new_value == DEFAULT_PIN;
            } else if puk {
                e.puk_default = new_value == DEFAULT_PUK;
            } else {
                e.pin_default = new_value == DEFAULT_PIN;
            }
        }
        self.save();
        (out, sw)
    }

    fn general_authenticate(
        &mut self,
        cla: u8,
        p1: u8,
        p2: u8,
        data: &[u8],
        pin_just_verified: bool,
    ) -> (Vec<u8>, u16) {
        if p2 == SLOT_MANAGEMENT {
            let (out, sw) = self.forward(cla, 0x87, p1, p2, data);
            // The second step of mutual (80 witness + 81 challenge) or of external (82 response)
            // authentication completes it.
            let template = find_tlv(data, 0x7C).unwrap_or_default();
            let final_step = find_tlv(template, 0x80).is_some_and(|v| !v.is_empty())
                || find_tlv(template, 0x82).is_some_and(|v| !v.is_empty());
            if final_step {
                self.admin_authenticated = sw == SW_OK;
            }
            return (out, sw);
        }
        if let Some(key) = self.emulation.slots.get(&p2) {
            if key.pin_policy == 3 && !pin_just_verified {
                // PIN policy "always": VERIFY must come right before every use.
                return (Vec::new(), SW_SECURITY_STATUS);
            }
        }
        self.forward(cla, 0x87, p1, p2, data)
    }

    fn generate(&mut self, cla: u8, p1: u8, p2: u8, data: &[u8]) -> (Vec<u8>, u16) {
        if !self.admin_authenticated {
            return (Vec::new(), SW_SECURITY_STATUS);
        }
        if p1 != 0x00 || !is_key_slot(p2) {
            return (Vec::new(), SW_INCORRECT_P1P2);
        }
        let Some(template) = find_tlv(data, 0xAC) else {
            return (Vec::new(), SW_INCORRECT_DATA);
        };
        let algorithm = match find_tlv(template, 0x80) {
            Some([alg @ (ALG_P256 | ALG_P384)]) => *alg,
            // RSA and the 5.7 algorithms are not offered by this card.
            _ => return (Vec::new(), SW_INCORRECT_DATA),
        };
        let pin_policy = match find_tlv(template, 0xAA) {
            None | Some([0]) => default_pin_policy(p2),
            Some([policy @ 1..=3]) => *policy,
            _ => return (Vec::new(), SW_INCORRECT_DATA),
        };
        let touch_policy = match find_tlv(template, 0xAB) {
            None | Some([0]) => 1,
            Some([policy @ 1..=3]) => *policy,
            _ => return (Vec::new(), SW_INCORRECT_DATA),
        };
        // The applet only reads tag 80; pass it the plain template.
        let request = attestation::tlv(0xAC, &attestation::tlv(0x80, &[algorithm]));
        let (out, sw) = self.forward(cla, 0x47, p1, p2, &request);
        if sw != SW_OK {
            return (out, sw);
        }
        let point = find_tlv(&out, 0x7F49).and_then(|t| find_tlv(t, 0x86));
        match point {
            Some(point) if point.first() == Some(&0x04) => {
                self.emulation.slots.insert(
                    p2,
                    SlotKey {
                        algorithm,
                        point: point.to_vec(),
                        pin_policy,
                        touch_policy,
                    },
                );
                self.save();
                log::info!(
                    "generated {} key in slot {p2:02x} (PIN policy {pin_policy}, touch policy {touch_policy})",
                    if algorithm == ALG_P256 { "P-256" } else { "P-384" }
                );
            }
            _ => log::error!("the applet returned no EC point for slot {p2:02x}"),
        }
        (out, sw)
    }

    fn attest(&mut self, slot: u8) -> (Vec<u8>, u16) {
        let Some(key) = self.emulation.slots.get(&slot) else {
            // A YubiKey answers 6A80 for an empty slot and for an imported key.
            return (Vec::new(), SW_INCORRECT_DATA);
        };
        let public_key = CardPublicKey {
            algorithm: if key.algorithm == ALG_P256 {
                &PKCS_ECDSA_P256_SHA256
            } else {
                &PKCS_ECDSA_P384_SHA384
            },
            point: key.point.clone(),
        };
        let statement = SlotAttestation {
            slot,
            public_key: &public_key,
            firmware: FIRMWARE,
            serial: self.serial,
            pin_policy: key.pin_policy,
            touch_policy: key.touch_policy,
            form_factor: FORM_FACTOR,
        };
        match self.pki.attest(&statement) {
            Ok(der) => (der, SW_OK),
            Err(e) => {
                log::error!("attestation of slot {slot:02x} failed: {e:#}");
                (Vec::new(), 0x6F00)
            }
        }
    }

    /// GET METADATA (YubiKey 5.3+): 01 algorithm, 02 policy, 03 origin, 04 public key,
    /// 05 default value, 06 retries (total, remaining).
    fn metadata(&mut self, slot: u8) -> (Vec<u8>, u16) {
        let e = &self.emulation;
        let mut out = Vec::new();
        match slot {
            REF_PIN | REF_PUK => {
                let (default, total, remaining) = if slot == REF_PIN {
                    (e.pin_default, PIN_RETRIES_TOTAL, e.pin_retries)
                } else {
                    (e.puk_default, PUK_RETRIES_TOTAL, e.puk_retries)
                };
                out.extend_from_slice(&[0x01, 0x01, 0xFF]);
                out.extend_from_slice(&[0x05, 0x01, u8::from(default)]);
                out.extend_from_slice(&[0x06, 0x02, total, remaining]);
            }
            SLOT_MANAGEMENT => {
                out.extend_from_slice(&[0x01, 0x01, ALG_3DES]);
                // PIN policy not applicable (0), touch never (1).
                out.extend_from_slice(&[0x02, 0x02, 0x00, 0x01]);
                out.extend_from_slice(&[0x05, 0x01, u8::from(e.mgm_default)]);
            }
            slot if is_key_slot(slot) => {
                let Some(key) = e.slots.get(&slot) else {
                    return (Vec::new(), SW_REFERENCE_NOT_FOUND);
                };
                out.extend_from_slice(&[0x01, 0x01, key.algorithm]);
                out.extend_from_slice(&[0x02, 0x02, key.pin_policy, key.touch_policy]);
                // Origin: 1 generated.
                out.extend_from_slice(&[0x03, 0x01, 0x01]);
                out.extend(attestation::tlv(0x04, &attestation::tlv(0x86, &key.point)));
            }
            _ => return (Vec::new(), SW_REFERENCE_NOT_FOUND),
        }
        (out, SW_OK)
    }

    /// Builds the response APDU: at most 256 bytes (or Le) of data, the rest for GET RESPONSE.
    fn respond(&mut self, mut data: Vec<u8>, sw: u16, le: usize) -> Vec<u8> {
        let max = if le == 0 || le > 256 { 256 } else { le };
        let sw = if data.len() > max {
            self.pending = data.split_off(max);
            0x6100 | u16::from(u8::try_from(self.pending.len()).unwrap_or(0))
        } else {
            sw
        };
        data.extend_from_slice(&sw.to_be_bytes());
        data
    }
}

impl vpicc::VSmartCard for YubiKeyCard<'_> {
    fn atr(&self) -> &[u8] {
        YUBIKEY_5_ATR
    }

    fn power_on(&mut self) {
        log::debug!("power on");
        self.reset_security_status();
    }

    fn power_off(&mut self) {
        log::debug!("power off");
        self.reset_security_status();
    }

    fn reset(&mut self) {
        log::debug!("reset");
        self.reset_security_status();
    }

    fn execute(&mut self, apdu: &[u8]) -> Vec<u8> {
        let response = self.execute_inner(apdu);
        if response.len() >= 2 {
            let sw = &response[response.len() - 2..];
            log::debug!(
                "APDU {:02X?} ({} bytes in) -> {:02X}{:02X} ({} bytes out)",
                &apdu[..apdu.len().min(4)],
                apdu.len(),
                sw[0],
                sw[1],
                response.len() - 2
            );
        }
        response
    }
}

impl YubiKeyCard<'_> {
    fn execute_inner(&mut self, apdu: &[u8]) -> Vec<u8> {
        let command = match CommandView::try_from(apdu) {
            Ok(command) => command,
            Err(iso7816::command::FromSliceError::InvalidClass) => {
                return SW_CLA_NOT_SUPPORTED.to_be_bytes().to_vec()
            }
            Err(_) => return SW_WRONG_LENGTH.to_be_bytes().to_vec(),
        };
        let (cla, ins, p1, p2) = (apdu[0], apdu[1], apdu[2], apdu[3]);
        let le = command.expected();

        // GET RESPONSE: the next part of the last long answer.
        if ins == 0xC0 && cla & 0x10 == 0 {
            if self.pending.is_empty() {
                return SW_CONDITIONS.to_be_bytes().to_vec();
            }
            let rest = std::mem::take(&mut self.pending);
            return self.respond(rest, SW_OK, le);
        }
        self.pending.clear();
        let pin_just_verified = std::mem::take(&mut self.pin_just_verified);

        if cla & 0x10 != 0 {
            // A chained part: keep it and wait for the last one.
            let chain = self.chain.get_or_insert_with(|| Chain {
                ins,
                p1,
                p2,
                data: Vec::new(),
            });
            if (chain.ins, chain.p1, chain.p2) != (ins, p1, p2)
                || chain.data.len() + command.data().len() > CHAIN_CAPACITY
            {
                self.chain = None;
                return SW_CONDITIONS.to_be_bytes().to_vec();
            }
            chain.data.extend_from_slice(command.data());
            // Chaining keeps "PIN just verified" for the command the chain forms.
            self.pin_just_verified = pin_just_verified;
            return SW_OK.to_be_bytes().to_vec();
        }
        let data = match self.chain.take() {
            Some(mut chain) if (chain.ins, chain.p1, chain.p2) == (ins, p1, p2) => {
                chain.data.extend_from_slice(command.data());
                chain.data
            }
            Some(_) => return SW_CONDITIONS.to_be_bytes().to_vec(),
            None => command.data().to_vec(),
        };
        let (out, sw) = self.dispatch(cla, ins, p1, p2, &data, pin_just_verified);
        self.respond(out, sw, le)
    }
}

fn is_key_slot(slot: u8) -> bool {
    matches!(slot, 0x9A | 0x9C | 0x9D | 0x9E | 0x82..=0x95)
}

/// A YubiKey's default PIN policy per slot: 9c always, 9e never, the others once.
fn default_pin_policy(slot: u8) -> u8 {
    match slot {
        0x9C => 3,
        0x9E => 1,
        _ => 2,
    }
}

/// Finds the value of `tag` (one or two bytes) among the BER-TLVs of `data` (one level only).
fn find_tlv(data: &[u8], tag: u16) -> Option<&[u8]> {
    let mut rest = data;
    while !rest.is_empty() {
        let (this_tag, after_tag) = if rest[0] & 0x1F == 0x1F {
            let tag = u16::from_be_bytes([rest[0], *rest.get(1)?]);
            (tag, &rest[2..])
        } else {
            (u16::from(rest[0]), &rest[1..])
        };
        let (len, after_len) = match *after_tag.first()? {
            len @ 0..=0x7F => (usize::from(len), &after_tag[1..]),
            0x81 => (usize::from(*after_tag.get(1)?), after_tag.get(2..)?),
            0x82 => (
                usize::from(u16::from_be_bytes([*after_tag.get(1)?, *after_tag.get(2)?])),
                after_tag.get(3..)?,
            ),
            _ => return None,
        };
        let value = after_len.get(..len)?;
        if this_tag == tag {
            return Some(value);
        }
        rest = &after_len[len..];
    }
    None
}

impl Emulation {
    /// Line format: `key value...`, slots as `slot <hex slot> <hex alg> <pin> <touch> <hex point>`.
    fn load(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut e = Self::default();
        for (n, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let bad = || anyhow::anyhow!("{}:{}: bad line {line:?}", path.display(), n + 1);
            let number = |i: usize| -> Result<u8> {
                fields.get(i).and_then(|s| s.parse().ok()).ok_or_else(bad)
            };
            match fields.first().copied() {
                None => {}
                Some("pin_retries") => e.pin_retries = number(1)?,
                Some("puk_retries") => e.puk_retries = number(1)?,
                Some("pin_default") => e.pin_default = number(1)? != 0,
                Some("puk_default") => e.puk_default = number(1)? != 0,
                Some("mgm_default") => e.mgm_default = number(1)? != 0,
                Some("slot") => {
                    let hex_byte = |i: usize| -> Result<u8> {
                        fields
                            .get(i)
                            .and_then(|s| u8::from_str_radix(s, 16).ok())
                            .ok_or_else(bad)
                    };
                    let point = fields.get(5).and_then(|s| from_hex(s)).ok_or_else(bad)?;
                    e.slots.insert(
                        hex_byte(1)?,
                        SlotKey {
                            algorithm: hex_byte(2)?,
                            pin_policy: number(3)?,
                            touch_policy: number(4)?,
                            point,
                        },
                    );
                }
                Some(_) => return Err(bad()),
            }
        }
        Ok(e)
    }

    fn save(&self, path: &Path) -> Result<()> {
        let mut text = format!(
            "pin_retries {}\npuk_retries {}\npin_default {}\npuk_default {}\nmgm_default {}\n",
            self.pin_retries,
            self.puk_retries,
            u8::from(self.pin_default),
            u8::from(self.puk_default),
            u8::from(self.mgm_default)
        );
        for (slot, key) in &self.slots {
            text.push_str(&format!(
                "slot {slot:02x} {:02x} {} {} {}\n",
                key.algorithm,
                key.pin_policy,
                key.touch_policy,
                to_hex(&key.point)
            ));
        }
        attestation::write_atomically(path, text.as_bytes(), 0o644)
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_tlvs() {
        let data = [
            0x7F, 0x49, 0x05, 0x86, 0x03, 0x04, 0x01, 0x02, 0xAA, 0x01, 0x02,
        ];
        let outer = find_tlv(&data, 0x7F49).expect("7F49");
        assert_eq!(find_tlv(outer, 0x86), Some(&[0x04, 0x01, 0x02][..]));
        assert_eq!(find_tlv(&data, 0xAA), Some(&[0x02][..]));
        assert_eq!(find_tlv(&data, 0xAB), None);
        assert_eq!(find_tlv(&[0x7C, 0x05, 0x80], 0x7C), None);
    }

    #[test]
    fn emulation_state_round_trips() {
        let dir = std::env::temp_dir().join(format!("vpiv-state-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("tmp dir");
        let path = dir.join("state");
        let mut e = Emulation {
            pin_retries: 2,
            mgm_default: false,
            ..Default::default()
        };
        e.slots.insert(
            0x9A,
            SlotKey {
                algorithm: ALG_P256,
                point: vec![4, 1, 2, 3],
                pin_policy: 2,
                touch_policy: 1,
            },
        );
        e.save(&path).expect("save");
        assert_eq!(Emulation::load(&path).expect("load"), e);
        fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn der_integer_encoding() {
        assert_eq!(
            attestation::der_integer_u32(15_732_500),
            [0x02, 0x04, 0x00, 0xF0, 0x0F, 0x14]
        );
        assert_eq!(attestation::der_integer_u32(0), [0x02, 0x01, 0x00]);
        assert_eq!(
            attestation::der_integer_u32(12_345_678),
            [0x02, 0x04, 0x00, 0xBC, 0x61, 0x4E]
        );
        assert_eq!(attestation::der_integer_u32(0x7F), [0x02, 0x01, 0x7F]);
    }
}
