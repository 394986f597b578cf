//! The audit trail: a stream of its own, with a stable format.
//!
//! Every record is written to the `audit` table of the state database (in the same transaction
//! as the change it describes) and emitted on the `zerospice::audit` tracing target as one line
//! with fixed fields: `event`, `user`, `device`, `serial`, `peer`, `detail` (JSON). Records never
//! hold secrets: no TOTP codes, keys, passwords, tickets or Proxmox tokens.
use crate::store::AuditEvent;

pub const TARGET: &str = "zerospice::audit";

pub fn emit(e: &AuditEvent) {
    tracing::info!(
        target: TARGET,
        event = e.event,
        user = e.user.as_deref().unwrap_or("-"),
        device = e.device.as_deref().unwrap_or("-"),
        serial = e.serial.as_deref().unwrap_or("-"),
        peer = e.peer.as_deref().unwrap_or("-"),
        detail = %e.detail,
        "audit"
    );
}
