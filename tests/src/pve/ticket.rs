//! SPICE proxy tickets, issued by `POST .../spiceproxy` and checked by the spiceproxy daemon. No IO.
//!
//! Shape (as in the reference, the current Proxmox format that signs the port as well):
//! `pvespiceproxy:<8 lowercase hex unix time>:<vmid>:<node lowercase>:<port>::<40 lowercase hex>`.
//! A client CONNECTs to `<ticket>:<tls-port>` and sends the same string as `Host:`.
//!
//! Proxmox signs with SHA-1 over the plain part and a cluster secret (pve-common `PVE/Ticket.pm`);
//! the stand-in uses HMAC-SHA1 with a random per-instance key: same length, not forgeable.

use std::ops::RangeInclusive;

use ring::hmac;

/// The SPICE port range Proxmox allocates and its spiceproxy accepts.
pub const SPICE_PORTS: RangeInclusive<u16> = 61000..=61999;

/// A ticket is accepted while `MIN_AGE < age < MAX_AGE` (seconds), as in `verify_spice_connect_url`.
pub const MIN_AGE: i64 = -20;
pub const MAX_AGE: i64 = 40;

const PREFIX: &str = "pvespiceproxy:";

/// Why a connect string was refused (all answered with `401 invalid ticket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TicketError {
    /// Does not match `^pvespiceproxy:([a-z0-9]{8}):(\d+):(\S+):(\d+)::([a-z0-9]{40}):(\d+)$`.
    Format,
    /// The signature does not verify.
    Signature,
    /// Issued too long ago (or too far in the future).
    Age(i64),
    /// The port signed into the ticket is not the port being connected to.
    PortMismatch { ticket: u16, connect: u16 },
    /// The port is outside 61000-61999.
    PortRange(u16),
}

impl std::fmt::Display for TicketError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TicketError::Format => write!(f, "malformed ticket"),
            TicketError::Signature => write!(f, "bad ticket signature"),
            TicketError::Age(age) => write!(f, "ticket age {age}s outside ({MIN_AGE}, {MAX_AGE})"),
            TicketError::PortMismatch { ticket, connect } => {
                write!(f, "ticket port {ticket} but connecting to {connect}")
            }
            TicketError::PortRange(port) => write!(f, "port {port} outside 61000-61999"),
        }
    }
}

/// What a valid connect string grants: a connection to this VM's SPICE port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectGrant {
    pub vmid: u32,
    pub node: String,
    pub port: u16,
    pub age: i64,
}

/// The per-instance signing key.
pub struct TicketKey(hmac::Key);

impl TicketKey {
    pub fn generate() -> Self {
        TicketKey::from_secret(&super::random_bytes::<32>())
    }

    pub fn from_secret(secret: &[u8]) -> Self {
        TicketKey(hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret))
    }

    /// The proxy ticket for `vmid` on `node` (lowercased, as virt-viewer needs) and SPICE `port`.
    pub fn issue(&self, unix_time: u64, vmid: u32, node: &str, port: u16) -> String {
        let plain = format!(
            "{PREFIX}{unix_time:08x}:{vmid}:{}:{port}",
            node.to_lowercase()
        );
        let tag = hmac::sign(&self.0, plain.as_bytes());
        format!("{plain}::{}", hex::encode(tag.as_ref()))
    }

    /// Checks a connect string (`<ticket>:<port>`, the CONNECT `Host:`) at `now` (unix seconds).
    pub fn verify(&self, connect: &str, now: u64) -> Result<ConnectGrant, TicketError> {
        let parsed = parse(connect).ok_or(TicketError::Format)?;
        let tag = hex::decode(parsed.sig).map_err(|_| TicketError::Signature)?;
        hmac::verify(&self.0, parsed.plain.as_bytes(), &tag).map_err(|_| TicketError::Signature)?;
        let issued = u64::from_str_radix(parsed.time, 16).map_err(|_| TicketError::Format)?;
        let age = i64::try_from(now)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(issued).unwrap_or(i64::MAX));
        if !(age > MIN_AGE && age < MAX_AGE) {
            return Err(TicketError::Age(age));
        }
        let ticket_port: u16 = parsed
            .ticket_port
            .parse()
            .map_err(|_| TicketError::Format)?;
        let connect_port: u16 = parsed
            .connect_port
            .parse()
            .map_err(|_| TicketError::Format)?;
        if ticket_port != connect_port {
            return Err(TicketError::PortMismatch {
                ticket: ticket_port,
                connect: connect_port,
            });
        }
        if !SPICE_PORTS.contains(&connect_port) {
            return Err(TicketError::PortRange(connect_port));
        }
        let vmid = parsed.vmid.parse().map_err(|_| TicketError::Format)?;
        Ok(ConnectGrant {
            vmid,
            node: parsed.node.to_owned(),
            port: connect_port,
            age,
        })
    }
}

struct Parsed<'a> {
    /// `pvespiceproxy:<time>:<vmid>:<node>:<port>`, the signed part.
    plain: &'a str,
    time: &'a str,
    vmid: &'a str,
    node: &'a str,
    ticket_port: &'a str,
    sig: &'a str,
    connect_port: &'a str,
}

/// The regex above, by hand: the suffix `::<sig>:<port>` is fixed from the right (no `:` inside),
/// so the greedy `(\S+)` node is everything between the vmid and the last `:` before `::`.
fn parse(connect: &str) -> Option<Parsed<'_>> {
    let (plain, signed_tail) = connect.rsplit_once("::")?;
    let (sig, connect_port) = signed_tail.split_once(':')?;
    let rest = plain.strip_prefix(PREFIX)?;
    let time = rest.get(..8)?;
    let rest = rest.get(8..)?.strip_prefix(':')?;
    let (vmid, rest) = rest.split_once(':')?;
    let (node, ticket_port) = rest.rsplit_once(':')?;
    let lower_alnum = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let ok = lower_alnum(time)
        && digits(vmid)
        && !node.is_empty()
        && !node.chars().any(char::is_whitespace)
        && digits(ticket_port)
        && sig.len() == 40
        && lower_alnum(sig)
        && digits(connect_port);
    ok.then_some(Parsed {
        plain,
        time,
        vmid,
        node,
        ticket_port,
        sig,
        connect_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000;

    fn key() -> TicketKey {
        TicketKey::from_secret(b"test secret")
    }

    #[test]
    fn issued_ticket_has_proxmox_shape() {
        let t = key().issue(NOW, 100, "PVE", 61000);
        let (plain, sig) = t.split_once("::").unwrap();
        assert_eq!(plain, format!("pvespiceproxy:{NOW:08x}:100:pve:61000"));
        assert_eq!(sig.len(), 40);
        assert!(sig
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }

    #[test]
    fn valid_ticket_is_accepted_inside_the_age_window() {
        let k = key();
        let t = k.issue(NOW, 100, "pve", 61000);
        for now in [NOW - 19, NOW, NOW + 39] {
            let g = k.verify(&format!("{t}:61000"), now).unwrap();
            assert_eq!(
                g,
                ConnectGrant {
                    vmid: 100,
                    node: "pve".into(),
                    port: 61000,
                    age: i64::try_from(now).unwrap() - i64::try_from(NOW).unwrap(),
                }
            );
        }
        assert_eq!(
            k.verify(&format!("{t}:61000"), NOW + 40),
            Err(TicketError::Age(40))
        );
        assert_eq!(
            k.verify(&format!("{t}:61000"), NOW - 20),
            Err(TicketError::Age(-20))
        );
    }

    #[test]
    fn node_names_with_colons_parse_like_the_regex() {
        let k = key();
        let t = k.issue(NOW, 7, "a:b", 61001);
        let g = k.verify(&format!("{t}:61001"), NOW).unwrap();
        assert_eq!(g.node, "a:b");
    }

    #[test]
    fn tampering_is_refused() {
        let k = key();
        let t = k.issue(NOW, 100, "pve", 61000);
        let other_vm = t.replacen(":100:", ":101:", 1);
        assert_eq!(
            k.verify(&format!("{other_vm}:61000"), NOW),
            Err(TicketError::Signature)
        );
        let other_port = t.replacen(":61000::", ":61001::", 1);
        assert_eq!(
            k.verify(&format!("{other_port}:61001"), NOW),
            Err(TicketError::Signature)
        );
        let foreign = TicketKey::from_secret(b"other").issue(NOW, 100, "pve", 61000);
        assert_eq!(
            k.verify(&format!("{foreign}:61000"), NOW),
            Err(TicketError::Signature)
        );
        assert_eq!(
            k.verify(&format!("{t}:61001"), NOW),
            Err(TicketError::PortMismatch {
                ticket: 61000,
                connect: 61001
            })
        );
    }

    #[test]
    fn ports_outside_the_spice_range_are_refused() {
        let k = key();
        let t = k.issue(NOW, 100, "pve", 5900);
        assert_eq!(
            k.verify(&format!("{t}:5900"), NOW),
            Err(TicketError::PortRange(5900))
        );
    }

    #[test]
    fn malformed_strings_are_refused_without_panicking() {
        let k = key();
        let t = k.issue(NOW, 100, "pve", 61000);
        let upper = t.to_uppercase();
        for s in [
            String::new(),
            "pvespiceproxy:".into(),
            "::".into(),
            ":::::::".into(),
            t.clone(),
            format!("{t}:"),
            format!("{t}:x"),
            format!("{t}:61000:61000"),
            format!("{upper}:61000"),
            format!("{t}:99999999999999999999"),
            format!("x{t}:61000"),
            t.replacen("pve", "p e", 1) + ":61000",
            "pvespiceproxy:0000000é:1:n:61000::0000000000000000000000000000000000000000:61000"
                .into(),
            "pvespiceproxy:00000000:1::61000::0000000000000000000000000000000000000000:61000"
                .into(),
        ] {
            assert!(k.verify(&s, NOW).is_err(), "{s}");
        }
    }
}
