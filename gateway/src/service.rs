//! The requests of an authenticated agent (everything but tunnels): VM list and status, opening a
//! SPICE session, power actions, certificate renewal.
//!
//! Every answer is computed from the user's policy (read from the database on each request, so
//! `user set` acts at once) intersected with what the Proxmox token can see. Nothing else of
//! Proxmox is reachable: there is no generic API passthrough. Proxmox failures are logged
//! precisely (redacted) for the administrator and answered generically to the agent.
use std::sync::Arc;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::task::JoinSet;
use tracing::{info, warn};
use zerospice_ca::{ClientCertRequest, Fingerprint, KeyProvenance, ValidatedCsr};
use zerospice_proto::access::{HelloInfo, PowerAction, Request, Response, SessionGrant, VmInfo};
use zerospice_proto::connect::SpiceTarget;
use zerospice_proto::{ErrorCode, SessionId, VmId, WireError};

use crate::access::{unix_now, AccessState, Peer};
use crate::enrollment::{check_key_rules, HardwareKey, Refusal, RuleCheck};
use crate::policy;
use crate::proxmox::{Guest, ProxmoxClient, ProxmoxError};
use crate::sessions::Owner;
use crate::store::{NewCertificate, StoreError, UserPolicy};

/// A renewal within this many seconds of the previous issue is refused (a looping agent must not
/// fill the database).
pub const MIN_RENEW_INTERVAL_SECS: i64 = 600;
/// How long a power action may take before the gateway answers that it is still running.
pub const POWER_WAIT: Duration = Duration::from_secs(30);

pub async fn handle(state: &Arc<AccessState>, peer: &Peer, req: Request) -> Response {
    let result = match req {
        Request::Hello => Ok(hello(state, peer)),
        Request::ListVms => list_vms(state, peer).await,
        Request::VmStatus { vmid } => vm_status(state, peer, vmid).await,
        Request::OpenSession { vmid } => open_session(state, peer, vmid).await,
        Request::Power { vmid, action } => power(state, peer, vmid, action).await,
        Request::Renew { csr } => renew(state, peer, csr).await,
        Request::Tunnel { .. } => Err(WireError::bad_request("unexpected tunnel request")),
    };
    result.unwrap_or_else(Response::Error)
}

fn hello(state: &AccessState, peer: &Peer) -> Response {
    Response::Hello(HelloInfo {
        user: peer.identity.user.to_string(),
        device: peer.identity.device.to_string(),
        serial: peer.serial.clone(),
        not_after: peer.identity.not_after,
        gateway_version: env!("CARGO_PKG_VERSION").to_owned(),
        renew_before_secs: u64::from(state.config.certificates.renew_before_hours) * 3600,
    })
}

fn internal(e: impl std::fmt::Display) -> WireError {
    warn!(error = %e, "request failed inside the gateway");
    WireError::new(
        ErrorCode::Internal,
        "the gateway failed to answer (see its log)",
    )
}

async fn user_policy(state: &AccessState, peer: &Peer) -> Result<UserPolicy, WireError> {
    let name = peer.identity.user.to_string();
    match state.store.run(move |s| s.user(&name)).await {
        Ok(Some(u)) => Ok(u.policy),
        Ok(None) => Err(WireError::new(
            ErrorCode::CertificateRevoked,
            "your user no longer exists on this gateway: ask your administrator",
        )),
        Err(e) => Err(internal(e)),
    }
}

fn proxmox(state: &AccessState) -> Result<Arc<ProxmoxClient>, WireError> {
    state.proxmox.clone().ok_or_else(|| {
        WireError::new(
            ErrorCode::ProxmoxUnavailable,
            "this gateway has no Proxmox connection configured; the administrator must add a [proxmox] section (see INSTALL.md)",
        )
    })
}

/// Logs a Proxmox failure for the administrator and turns it into the agent's message.
fn proxmox_failed(what: &str, vmid: Option<VmId>, e: &ProxmoxError) -> WireError {
    warn!(call = what, vmid = vmid.map(VmId::get), error = %e, "Proxmox call failed");
    e.wire()
}

async fn guests(px: &ProxmoxClient) -> Result<Vec<Guest>, WireError> {
    px.guests()
        .await
        .map_err(|e| proxmox_failed("cluster/resources", None, &e))
}

fn info(g: &Guest, status: String, spice: Option<bool>, policy: &UserPolicy) -> VmInfo {
    VmInfo {
        vmid: g.vmid,
        name: g.name.clone(),
        node: g.node.clone(),
        status,
        spice,
        power: policy.power,
    }
}

async fn list_vms(state: &AccessState, peer: &Peer) -> Result<Response, WireError> {
    let policy = user_policy(state, peer).await?;
    let px = proxmox(state)?;
    let all = guests(&px).await?;
    let visible: Vec<Guest> = policy::visible(&policy, &all)
        .into_iter()
        .cloned()
        .collect();
    // Whether each VM has a SPICE display comes from its status; ask for all at once.
    let mut calls = JoinSet::new();
    for (i, g) in visible.iter().enumerate() {
        let px = px.clone();
        let (node, vmid) = (g.node.clone(), g.vmid);
        calls.spawn(async move { (i, px.vm_status(&node, vmid).await) });
    }
    let mut statuses = vec![None; visible.len()];
    while let Some(done) = calls.join_next().await {
        match done {
            Ok((i, Ok(st))) => statuses[i] = Some(st),
            Ok((i, Err(e))) => {
                proxmox_failed("status/current", Some(visible[i].vmid), &e);
            }
            Err(e) => warn!(error = %e, "status task failed"),
        }
    }
    let vms = visible
        .iter()
        .zip(statuses)
        .map(|(g, st)| match st {
            Some(st) => info(g, st.status, Some(st.spice), &policy),
            None => info(g, g.status.clone(), None, &policy),
        })
        .collect();
    Ok(Response::Vms { vms })
}

async fn vm_status(state: &AccessState, peer: &Peer, vmid: VmId) -> Result<Response, WireError> {
    let policy = user_policy(state, peer).await?;
    let px = proxmox(state)?;
    let all = guests(&px).await?;
    let g = policy::find(&policy, &all, vmid)?;
    let st = px
        .vm_status(&g.node, vmid)
        .await
        .map_err(|e| proxmox_failed("status/current", Some(vmid), &e))?;
    Ok(Response::Vm {
        vm: info(g, st.status, Some(st.spice), &policy),
    })
}

fn random_session_id() -> Result<SessionId, WireError> {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).map_err(internal)?;
    Ok(SessionId::from_bytes(b))
}

async fn open_session(
    state: &Arc<AccessState>,
    peer: &Peer,
    vmid: VmId,
) -> Result<Response, WireError> {
    let policy = user_policy(state, peer).await?;
    let px = proxmox(state)?;
    let all = guests(&px).await?;
    let g = policy::find(&policy, &all, vmid)?.clone();
    let st = px
        .vm_status(&g.node, vmid)
        .await
        .map_err(|e| proxmox_failed("status/current", Some(vmid), &e))?;
    if st.status != "running" {
        let hint = if policy.power {
            format!(": start it first (zerospice-agent start {vmid})")
        } else {
            ": ask your administrator to start it".to_owned()
        };
        return Err(WireError::new(
            ErrorCode::VmUnavailable,
            format!("VM {vmid} ({}) is {}{hint}", g.name, st.status),
        ));
    }
    if !st.spice {
        return Err(WireError::new(
            ErrorCode::VmUnavailable,
            format!(
                "VM {vmid} ({}) has no SPICE display: the administrator must set its display to SPICE (qxl) in Proxmox",
                g.name
            ),
        ));
    }

    let id = random_session_id()?;
    let window = Duration::from_secs(state.config.sessions.channel_window_secs);
    let owner = Owner {
        conn: peer.conn_id,
        serial: peer.serial.clone(),
        key_fingerprint: peer.key_fingerprint.clone(),
        user: peer.identity.user.to_string(),
        device: peer.identity.device.to_string(),
    };
    let reserved =
        state
            .sessions()
            .reserve(id.clone(), vmid, owner, Instant::now(), unix_now(), window);
    let ended = match reserved {
        Ok(ended) => ended,
        Err(in_use) => {
            state
                .audit(peer.audit(
                    "session.refused",
                    serde_json::json!({
                        "vmid": vmid.get(),
                        "reason": "vm_in_use",
                        "holder_user": in_use.user,
                        "holder_device": in_use.device,
                    }),
                ))
                .await;
            return Err(in_use.wire(vmid, peer.identity.user.as_str()));
        }
    };
    state.sessions_ended(ended).await;

    let ticket = match px.spiceproxy(&g.node, vmid).await {
        Ok(t) => t,
        Err(e) => {
            state.sessions().remove(&id);
            state
                .audit(peer.audit(
                    "session.refused",
                    serde_json::json!({ "vmid": vmid.get(), "reason": format!("proxmox: {e}") }),
                ))
                .await;
            return Err(proxmox_failed("spiceproxy", Some(vmid), &e));
        }
    };
    let target = SpiceTarget {
        ticket: ticket.host.clone(),
        tls_port: ticket.tls_port,
    };
    if !state
        .sessions()
        .activate(&id, target, Instant::now(), window)
    {
        // Replaced meanwhile by a newer request of the same certificate.
        return Err(WireError::new(
            ErrorCode::SessionUnknown,
            "the session was replaced by a newer one",
        ));
    }
    info!(session = %id, vmid = vmid.get(), "session opened");
    state
        .audit(peer.audit(
            "session.opened",
            serde_json::json!({ "session": id.as_str(), "vmid": vmid.get(), "node": g.node }),
        ))
        .await;
    use secrecy::ExposeSecret;
    Ok(Response::Session(SessionGrant {
        session: id,
        vmid,
        title: ticket.title.clone(),
        host: ticket.host.clone(),
        tls_port: ticket.tls_port,
        password: ticket.password.expose_secret().into(),
        ca: ticket.ca.clone(),
        host_subject: ticket.host_subject.clone(),
        secure_attention: ticket.secure_attention.clone(),
        toggle_fullscreen: ticket.toggle_fullscreen.clone(),
        release_cursor: ticket.release_cursor.clone(),
        channels_until: unix_now() + window.as_secs() as i64,
    }))
}

async fn power(
    state: &AccessState,
    peer: &Peer,
    vmid: VmId,
    action: PowerAction,
) -> Result<Response, WireError> {
    let policy = user_policy(state, peer).await?;
    let px = proxmox(state)?;
    let all = guests(&px).await?;
    // A VM the user may not see is "not available", whatever the power grant.
    let g = policy::find(&policy, &all, vmid)?.clone();
    if let Err(e) = policy::may_power(&policy, vmid) {
        state
            .audit(peer.audit(
                "vm.power_refused",
                serde_json::json!({ "vmid": vmid.get(), "action": action.as_str() }),
            ))
            .await;
        return Err(e);
    }
    let result = px.power(&g.node, vmid, action, POWER_WAIT).await;
    state
        .audit(peer.audit(
            "vm.power",
            serde_json::json!({
                "vmid": vmid.get(),
                "action": action.as_str(),
                "ok": result.is_ok(),
            }),
        ))
        .await;
    result.map_err(|e| proxmox_failed(action.as_str(), Some(vmid), &e))?;
    Ok(Response::PowerDone { vmid, action })
}

/// The answer to a renewal the key rules refuse: the key stays what it is, so the way out is a new
/// enrollment.
fn renewal_refused(refusal: Refusal) -> WireError {
    match refusal {
        Refusal::HardwareRequired => WireError::new(
            ErrorCode::HardwareKeyRequired,
            "this user must now use a hardware key (YubiKey): enroll again with --key yubikey",
        ),
        Refusal::KeyRule(m) => WireError::new(ErrorCode::HardwareKeyRequired, m),
        other => internal(other.audit_reason()),
    }
}

async fn renew(state: &Arc<AccessState>, peer: &Peer, csr: Vec<u8>) -> Result<Response, WireError> {
    let csr =
        ValidatedCsr::parse(&csr).map_err(|e| WireError::new(ErrorCode::BadCsr, e.to_string()))?;
    if Fingerprint::of(csr.spki()).to_string() != peer.key_fingerprint {
        return Err(WireError::new(
            ErrorCode::BadCsr,
            "a renewal must keep the key of the current certificate (enroll again for a new key)",
        ));
    }
    let now = unix_now();
    if now - peer.issued_at < MIN_RENEW_INTERVAL_SECS {
        return Err(WireError::new(
            ErrorCode::Busy,
            "your certificate was issued less than 10 minutes ago; renew later",
        ));
    }
    let policy = user_policy(state, peer).await?;
    // The key rules as they are now (they may have changed since the key was enrolled), against
    // the key and the policies recorded with the current certificate.
    let serial = peer.serial.clone();
    let current = state
        .store
        .run(move |s| s.certificate(&serial))
        .await
        .map_err(internal)?
        .ok_or_else(|| {
            internal(format!(
                "certificate {} is not in the database",
                peer.serial
            ))
        })?;
    let hardware = match peer.identity.key {
        KeyProvenance::Software => None,
        KeyProvenance::Yubikey { serial } => Some(HardwareKey {
            serial,
            pin_policy: current.pin_policy.as_deref(),
            touch_policy: current.touch_policy.as_deref(),
        }),
    };
    if let Err(refusal) = check_key_rules(&policy, hardware, RuleCheck::Renewal) {
        state
            .audit(peer.audit(
                "cert.renew_refused",
                serde_json::json!({ "reason": refusal.audit_reason() }),
            ))
            .await;
        return Err(renewal_refused(refusal));
    }
    let state2 = state.clone();
    let peer2 = peer.clone();
    let issued = tokio::task::spawn_blocking(move || {
        let state = state2;
        let peer = peer2;
        let validity = time::Duration::days(state.config.certificates.validity_days.into());
        state.store.write(|tx| {
            let issued = state
                .ca
                .issue_client(&ClientCertRequest {
                    csr: &csr,
                    user: &peer.identity.user,
                    device: &peer.identity.device,
                    key: peer.identity.key,
                    now: OffsetDateTime::now_utc(),
                    validity,
                })
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            tx.insert_certificate(&NewCertificate {
                serial: issued.serial.to_string(),
                user: peer.identity.user.to_string(),
                device: peer.identity.device.to_string(),
                fingerprint: issued.fingerprint.to_string(),
                key_fingerprint: issued.key_fingerprint.to_string(),
                key_kind: peer.identity.key.kind().to_string(),
                hardware_serial: peer.identity.key.hardware_serial(),
                // Same key: the policies attested at enrollment still hold.
                pin_policy: current.pin_policy.clone(),
                touch_policy: current.touch_policy.clone(),
                not_before: issued.not_before,
                not_after: issued.not_after,
                issued_at: now,
                der: issued.der.clone(),
            })?;
            let mut event = peer.audit(
                "cert.renewed",
                serde_json::json!({ "previous": peer.serial, "not_after": issued.not_after }),
            );
            event.serial = Some(issued.serial.to_string());
            tx.audit(now, &event)?;
            Ok::<_, StoreError>(issued)
        })
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    info!(new_serial = %issued.serial, "certificate renewed");
    Ok(Response::Renewed {
        certificate: issued.pem(),
        serial: issued.serial.to_string(),
        not_after: issued.not_after,
    })
}
