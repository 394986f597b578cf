//! The session table: pure state transitions on an injected clock.
//!
//! A session binds one VM's SPICE ticket to the certificate (serial and key) and the connection
//! that asked for it. It is *live* while its connection lives and either a channel is open or its
//! opening window (Proxmox's one-time password lives 30 s) has not passed. A live session on a VM
//! refuses sessions from any other certificate: QEMU's SPICE server would silently disconnect the
//! current viewer otherwise. The same certificate may reopen (its old session is replaced).
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use zerospice_proto::connect::{ConnectRequest, SpiceTarget, TargetMismatch};
use zerospice_proto::{ErrorCode, SessionId, VmId, WireError};

/// Who owns a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub conn: u64,
    pub serial: String,
    pub key_fingerprint: String,
    pub user: String,
    pub device: String,
}

#[derive(Debug, Clone)]
pub struct Session {
    pub id: SessionId,
    pub vmid: VmId,
    pub owner: Owner,
    /// `None` while the ticket is being fetched from Proxmox.
    pub target: Option<SpiceTarget>,
    pub opened: Instant,
    pub opened_unix: i64,
    pub window_until: Instant,
    pub channels_open: u32,
    pub channels_total: u32,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

impl Session {
    pub fn is_live(&self, now: Instant) -> bool {
        self.channels_open > 0 || now <= self.window_until
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// No channel open and the opening window passed.
    Idle,
    /// The owner's connection closed.
    ConnectionClosed,
    /// The same certificate opened a new session on the VM.
    Replaced,
    /// The certificate was revoked or expired.
    Revoked,
    /// Proxmox refused to issue the ticket.
    Failed,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Idle => "idle",
            EndReason::ConnectionClosed => "connection_closed",
            EndReason::Replaced => "replaced",
            EndReason::Revoked => "revoked",
            EndReason::Failed => "failed",
        }
    }
}

/// Why a channel is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelRefusal {
    Unknown,
    /// Another certificate's session (reported to the caller exactly like `Unknown`).
    NotYours {
        owner_user: String,
    },
    Pending,
    Expired,
    Mismatch(TargetMismatch),
}

impl ChannelRefusal {
    pub fn wire(&self) -> WireError {
        match self {
            ChannelRefusal::Unknown | ChannelRefusal::NotYours { .. } => WireError::new(
                ErrorCode::SessionUnknown,
                "no such session for this certificate: open a new one",
            ),
            ChannelRefusal::Pending => {
                WireError::new(ErrorCode::SessionUnknown, "the session is not ready yet")
            }
            ChannelRefusal::Expired => WireError::new(
                ErrorCode::SessionExpired,
                "the session expired before the viewer connected: open a new one",
            ),
            ChannelRefusal::Mismatch(m) => {
                WireError::new(ErrorCode::ConnectMismatch, format!("CONNECT refused: {m}"))
            }
        }
    }
    pub fn audit_reason(&self) -> String {
        match self {
            ChannelRefusal::Unknown => "unknown_session".into(),
            ChannelRefusal::NotYours { owner_user } => {
                format!("session_of_other_user ({owner_user})")
            }
            ChannelRefusal::Pending => "pending".into(),
            ChannelRefusal::Expired => "expired".into(),
            ChannelRefusal::Mismatch(m) => format!("connect_mismatch: {m}"),
        }
    }
}

/// A VM in use by someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InUse {
    pub user: String,
    pub device: String,
    pub since_unix: i64,
}

impl InUse {
    /// What the asking user sees. Another user's name and device are not theirs to know (the
    /// audit trail records them); the user's own other device is named.
    pub fn wire(&self, vmid: VmId, asker: &str) -> WireError {
        let since = zerospice_ca::identity::format_unix(self.since_unix);
        let message = if asker == self.user {
            format!(
                "VM {vmid} is already open from your device {} since {since}: close that viewer first (opening it here would disconnect it)",
                self.device
            )
        } else {
            format!(
                "VM {vmid} is in use by another user since {since}: it has one console, and opening it would disconnect them. Try again when they have closed their viewer"
            )
        };
        WireError::new(ErrorCode::VmInUse, message)
    }
}

/// How long a session ended with channels still open waits for them to report their byte
/// counts before its record is written anyway (counted from the first sweep that sees it).
pub const ENDING_GRACE: Duration = Duration::from_secs(10);

/// A session that ended while channels were still open. The channels notice the end a moment
/// later (their streams fail); the session's record waits for their byte counts.
#[derive(Debug)]
struct Ending {
    session: Session,
    reason: EndReason,
    /// When a sweep first saw it (sweeps give the clock; ending calls need none).
    seen: Option<Instant>,
}

#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: BTreeMap<SessionId, Session>,
    /// Ended sessions waiting for their open channels to close: invisible to everything but
    /// [`channel_closed`](Self::channel_closed) and [`sweep`](Self::sweep).
    ending: BTreeMap<SessionId, Ending>,
}

impl SessionTable {
    pub fn get(&self, id: &SessionId) -> Option<&Session> {
        self.sessions.get(id)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Removes sessions that are no longer live, and ended sessions whose channels did not
    /// report within [`ENDING_GRACE`].
    pub fn sweep(&mut self, now: Instant) -> Vec<(Session, EndReason)> {
        let dead: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| !s.is_live(now))
            .map(|s| s.id.clone())
            .collect();
        let mut ended: Vec<(Session, EndReason)> = dead
            .into_iter()
            .filter_map(|id| self.sessions.remove(&id))
            .map(|s| (s, EndReason::Idle))
            .collect();
        let mut overdue = Vec::new();
        for (id, e) in &mut self.ending {
            match e.seen {
                None => e.seen = Some(now),
                Some(seen) if now.saturating_duration_since(seen) >= ENDING_GRACE => {
                    overdue.push(id.clone())
                }
                Some(_) => {}
            }
        }
        for id in overdue {
            if let Some(e) = self.ending.remove(&id) {
                ended.push((e.session, e.reason));
            }
        }
        ended
    }

    /// Takes a session out of the table for `reason`. Returns it if it can be recorded now;
    /// with channels still open it waits in `ending` for their byte counts.
    fn retire(&mut self, id: &SessionId, reason: EndReason) -> Option<Session> {
        let s = self.sessions.remove(id)?;
        if s.channels_open == 0 {
            return Some(s);
        }
        self.ending.insert(
            s.id.clone(),
            Ending {
                session: s,
                reason,
                seen: None,
            },
        );
        None
    }

    /// Reserves `vmid` for `owner`: fails if another certificate holds a live session on it;
    /// replaces the owner's own live session. Returns what ended.
    #[allow(clippy::too_many_arguments)]
    pub fn reserve(
        &mut self,
        id: SessionId,
        vmid: VmId,
        owner: Owner,
        now: Instant,
        now_unix: i64,
        window: Duration,
    ) -> Result<Vec<(Session, EndReason)>, InUse> {
        let mut ended = self.sweep(now);
        if let Some(holder) = self
            .sessions
            .values()
            .find(|s| s.vmid == vmid && s.owner.serial != owner.serial)
        {
            return Err(InUse {
                user: holder.owner.user.clone(),
                device: holder.owner.device.clone(),
                since_unix: holder.opened_unix,
            });
        }
        let mine: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| s.vmid == vmid)
            .map(|s| s.id.clone())
            .collect();
        for old in mine {
            if let Some(s) = self.retire(&old, EndReason::Replaced) {
                ended.push((s, EndReason::Replaced));
            }
        }
        self.sessions.insert(
            id.clone(),
            Session {
                id,
                vmid,
                owner,
                target: None,
                opened: now,
                opened_unix: now_unix,
                window_until: now + window,
                channels_open: 0,
                channels_total: 0,
                bytes_up: 0,
                bytes_down: 0,
            },
        );
        Ok(ended)
    }

    /// Fills in the ticket of a reserved session; its window starts now.
    pub fn activate(
        &mut self,
        id: &SessionId,
        target: SpiceTarget,
        now: Instant,
        window: Duration,
    ) -> bool {
        match self.sessions.get_mut(id) {
            Some(s) => {
                s.target = Some(target);
                s.window_until = now + window;
                true
            }
            None => false,
        }
    }

    pub fn remove(&mut self, id: &SessionId) -> Option<Session> {
        self.sessions.remove(id)
    }

    /// Whether a new channel may open: the session exists, belongs to this certificate and key,
    /// is live, and the viewer's CONNECT targets exactly its ticket.
    pub fn authorize(
        &self,
        id: &SessionId,
        serial: &str,
        key_fingerprint: &str,
        req: &ConnectRequest,
        now: Instant,
    ) -> Result<SpiceTarget, ChannelRefusal> {
        let s = self.sessions.get(id).ok_or(ChannelRefusal::Unknown)?;
        if s.owner.serial != serial || s.owner.key_fingerprint != key_fingerprint {
            return Err(ChannelRefusal::NotYours {
                owner_user: s.owner.user.clone(),
            });
        }
        let target = s.target.clone().ok_or(ChannelRefusal::Pending)?;
        if !s.is_live(now) {
            return Err(ChannelRefusal::Expired);
        }
        target.check(req).map_err(ChannelRefusal::Mismatch)?;
        Ok(target)
    }

    pub fn channel_opened(&mut self, id: &SessionId) {
        if let Some(s) = self.sessions.get_mut(id) {
            s.channels_open += 1;
            s.channels_total += 1;
        }
    }

    /// Records a closed channel; returns the session and why it ended if that was its last
    /// channel and its window passed, or if it had already ended (its record was waiting for
    /// this channel's byte counts).
    pub fn channel_closed(
        &mut self,
        id: &SessionId,
        up: u64,
        down: u64,
        now: Instant,
    ) -> Option<(Session, EndReason)> {
        if let Some(s) = self.sessions.get_mut(id) {
            s.channels_open = s.channels_open.saturating_sub(1);
            s.bytes_up += up;
            s.bytes_down += down;
            if !s.is_live(now) {
                return self.sessions.remove(id).map(|s| (s, EndReason::Idle));
            }
            return None;
        }
        let e = self.ending.get_mut(id)?;
        let s = &mut e.session;
        s.channels_open = s.channels_open.saturating_sub(1);
        s.bytes_up += up;
        s.bytes_down += down;
        if s.channels_open == 0 {
            return self.ending.remove(id).map(|e| (e.session, e.reason));
        }
        None
    }

    /// Ends every session of a connection. Sessions with channels still open are returned by
    /// [`channel_closed`](Self::channel_closed) once their last channel closed.
    pub fn end_connection(&mut self, conn: u64) -> Vec<Session> {
        self.drain(|s| s.owner.conn == conn, EndReason::ConnectionClosed)
    }

    /// Ends every session of a certificate (as [`end_connection`](Self::end_connection)).
    pub fn end_serial(&mut self, serial: &str) -> Vec<Session> {
        self.drain(|s| s.owner.serial == serial, EndReason::Revoked)
    }

    fn drain(&mut self, pred: impl Fn(&Session) -> bool, reason: EndReason) -> Vec<Session> {
        let ids: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| pred(s))
            .map(|s| s.id.clone())
            .collect();
        ids.into_iter()
            .filter_map(|id| self.retire(&id, reason))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerospice_proto::connect::parse_connect_head;

    const W: Duration = Duration::from_secs(30);

    fn owner(conn: u64, serial: &str, user: &str) -> Owner {
        Owner {
            conn,
            serial: serial.into(),
            key_fingerprint: format!("k-{serial}"),
            user: user.into(),
            device: "d".into(),
        }
    }
    fn sid(n: u8) -> SessionId {
        SessionId::from_bytes([n; 16])
    }
    fn vm(n: u32) -> VmId {
        VmId::new(n).unwrap()
    }
    fn target(vmid: u32) -> SpiceTarget {
        SpiceTarget {
            ticket: format!(
                "pvespiceproxy:00000000:{vmid}:pve:61000::{}",
                "a".repeat(40)
            ),
            tls_port: 61000,
        }
    }
    fn connect(t: &SpiceTarget) -> ConnectRequest {
        let a = t.authority();
        parse_connect_head(format!("CONNECT {a} HTTP/1.0\r\nHost: {a}\r\n\r\n").as_bytes()).unwrap()
    }

    fn open(
        t: &mut SessionTable,
        id: u8,
        vmid: u32,
        o: Owner,
        now: Instant,
    ) -> Result<Vec<(Session, EndReason)>, InUse> {
        let ended = t.reserve(sid(id), vm(vmid), o, now, 1_800_000_000, W)?;
        assert!(t.activate(&sid(id), target(vmid), now, W));
        Ok(ended)
    }

    #[test]
    fn a_second_user_is_refused_while_the_vm_is_in_use() {
        let t0 = Instant::now();
        let mut t = SessionTable::default();
        open(&mut t, 1, 100, owner(1, "aa", "alice"), t0).unwrap();
        let e = open(&mut t, 2, 100, owner(2, "bb", "bob"), t0).unwrap_err();
        assert_eq!(e.user, "alice");
        let msg = e.wire(vm(100), "bob").message;
        assert_eq!(
            msg,
            "VM 100 is in use by another user since 2027-01-15 08:00 UTC: it has one console, and opening it would disconnect them. Try again when they have closed their viewer"
        );
        assert!(!msg.contains("alice"));
        assert_eq!(
            e.wire(vm(100), "alice").message,
            "VM 100 is already open from your device d since 2027-01-15 08:00 UTC: close that viewer first (opening it here would disconnect it)"
        );
        // Another VM is fine.
        open(&mut t, 3, 101, owner(2, "bb", "bob"), t0).unwrap();
        // After alice's window passes without a channel, bob may open.
        let later = t0 + W + Duration::from_secs(1);
        let ended = open(&mut t, 4, 100, owner(2, "bb", "bob"), later).unwrap();
        assert!(ended
            .iter()
            .any(|(s, r)| s.id == sid(1) && *r == EndReason::Idle));
    }

    #[test]
    fn an_open_channel_keeps_the_vm_in_use_past_the_window() {
        let t0 = Instant::now();
        let mut t = SessionTable::default();
        open(&mut t, 1, 100, owner(1, "aa", "alice"), t0).unwrap();
        t.channel_opened(&sid(1));
        let later = t0 + Duration::from_secs(600);
        assert!(open(&mut t, 2, 100, owner(2, "bb", "bob"), later).is_err());
        // A new channel (USB redirection opened later) is still allowed while in use.
        assert!(t
            .authorize(&sid(1), "aa", "k-aa", &connect(&target(100)), later)
            .is_ok());
        // The last channel closing after the window ends the session.
        let (s, why) = t.channel_closed(&sid(1), 10, 20, later).unwrap();
        assert_eq!(why, EndReason::Idle);
        assert_eq!((s.bytes_up, s.bytes_down, s.channels_total), (10, 20, 1));
        assert!(t.get(&sid(1)).is_none());
        open(&mut t, 2, 100, owner(2, "bb", "bob"), later).unwrap();
    }

    #[test]
    fn the_same_certificate_replaces_its_own_session() {
        let t0 = Instant::now();
        let mut t = SessionTable::default();
        open(&mut t, 1, 100, owner(1, "aa", "alice"), t0).unwrap();
        let ended = open(&mut t, 2, 100, owner(5, "aa", "alice"), t0).unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].1, EndReason::Replaced);
        assert!(t.get(&sid(1)).is_none());
    }

    #[test]
    fn channels_are_bound_to_certificate_key_window_and_ticket() {
        let t0 = Instant::now();
        let mut t = SessionTable::default();
        open(&mut t, 1, 100, owner(1, "aa", "alice"), t0).unwrap();
        open(&mut t, 2, 101, owner(2, "bb", "bob"), t0).unwrap();
        let c100 = connect(&target(100));
        assert!(t.authorize(&sid(1), "aa", "k-aa", &c100, t0).is_ok());
        // Bob's certificate on Alice's session: refused, and indistinguishable from unknown.
        let e = t.authorize(&sid(1), "bb", "k-bb", &c100, t0).unwrap_err();
        assert_eq!(
            e,
            ChannelRefusal::NotYours {
                owner_user: "alice".into()
            }
        );
        assert_eq!(e.wire(), ChannelRefusal::Unknown.wire());
        // Same serial, other key: refused.
        assert!(t.authorize(&sid(1), "aa", "k-other", &c100, t0).is_err());
        // Another VM's ticket on Alice's session.
        assert!(matches!(
            t.authorize(&sid(1), "aa", "k-aa", &connect(&target(101)), t0),
            Err(ChannelRefusal::Mismatch(_))
        ));
        // Unknown session id.
        assert_eq!(
            t.authorize(&sid(9), "aa", "k-aa", &c100, t0).unwrap_err(),
            ChannelRefusal::Unknown
        );
        // Past the window with no channel: expired.
        assert_eq!(
            t.authorize(
                &sid(1),
                "aa",
                "k-aa",
                &c100,
                t0 + W + Duration::from_millis(1)
            )
            .unwrap_err(),
            ChannelRefusal::Expired
        );
    }

    #[test]
    fn a_pending_session_reserves_the_vm_but_takes_no_channel() {
        let t0 = Instant::now();
        let mut t = SessionTable::default();
        t.reserve(sid(1), vm(100), owner(1, "aa", "alice"), t0, 0, W)
            .unwrap();
        assert_eq!(
            t.authorize(&sid(1), "aa", "k-aa", &connect(&target(100)), t0)
                .unwrap_err(),
            ChannelRefusal::Pending
        );
        assert!(t
            .reserve(sid(2), vm(100), owner(2, "bb", "bob"), t0, 0, W)
            .is_err());
    }

    #[test]
    fn connection_and_revocation_end_sessions() {
        let t0 = Instant::now();
        let mut t = SessionTable::default();
        open(&mut t, 1, 100, owner(1, "aa", "alice"), t0).unwrap();
        open(&mut t, 2, 101, owner(1, "aa", "alice"), t0).unwrap();
        open(&mut t, 3, 102, owner(2, "bb", "bob"), t0).unwrap();
        assert_eq!(t.end_connection(1).len(), 2);
        assert_eq!(t.end_serial("bb").len(), 1);
        assert!(t.is_empty());
    }

    /// A viewer's channels are still relaying when the agent's connection closes (remote-viewer
    /// closed, Ctrl-C): the session's record must wait for their byte counts, not say 0 bytes.
    #[test]
    fn a_session_ended_with_open_channels_is_recorded_with_their_bytes() {
        let t0 = Instant::now();
        let mut t = SessionTable::default();
        open(&mut t, 1, 100, owner(1, "aa", "alice"), t0).unwrap();
        t.channel_opened(&sid(1));
        t.channel_opened(&sid(1));
        assert!(t.end_connection(1).is_empty(), "waits for its channels");
        // Gone for everything else: no new channel, and the VM is free.
        assert!(t.get(&sid(1)).is_none());
        assert_eq!(
            t.authorize(&sid(1), "aa", "k-aa", &connect(&target(100)), t0)
                .unwrap_err(),
            ChannelRefusal::Unknown
        );
        open(&mut t, 2, 100, owner(2, "bb", "bob"), t0).unwrap();
        assert!(t.channel_closed(&sid(1), 5, 1000, t0).is_none());
        let (s, why) = t.channel_closed(&sid(1), 7, 2000, t0).unwrap();
        assert_eq!(why, EndReason::ConnectionClosed);
        assert_eq!(
            (s.bytes_up, s.bytes_down, s.channels_total, s.channels_open),
            (12, 3000, 2, 0)
        );
        assert!(
            t.channel_closed(&sid(1), 1, 1, t0).is_none(),
            "recorded once"
        );

        // A revoked session whose channel never reports is recorded by a sweep after the grace.
        t.channel_opened(&sid(2));
        assert!(t.end_serial("bb").is_empty());
        assert!(t.sweep(t0).is_empty(), "first seen");
        assert!(t.sweep(t0 + ENDING_GRACE / 2).is_empty());
        let swept = t.sweep(t0 + ENDING_GRACE);
        assert_eq!(swept.len(), 1);
        assert_eq!(swept[0].0.id, sid(2));
        assert_eq!(swept[0].1, EndReason::Revoked);
        assert!(t.channel_closed(&sid(2), 1, 1, t0).is_none());
    }

    #[test]
    fn a_replaced_session_with_open_channels_is_recorded_when_they_close() {
        let t0 = Instant::now();
        let mut t = SessionTable::default();
        open(&mut t, 1, 100, owner(1, "aa", "alice"), t0).unwrap();
        t.channel_opened(&sid(1));
        assert!(open(&mut t, 2, 100, owner(1, "aa", "alice"), t0)
            .unwrap()
            .is_empty());
        let (s, why) = t.channel_closed(&sid(1), 1, 2, t0).unwrap();
        assert_eq!((s.id, why, s.bytes_down), (sid(1), EndReason::Replaced, 2));
    }
}
