//! Access messages (ALPN `zerospice/1`): one request frame and one response frame per stream.
use crate::{Redacted, SessionId, VmId, WireError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Who am I to the gateway, and until when.
    Hello,
    /// The VMs this certificate's user may use.
    ListVms,
    /// One VM's status.
    VmStatus { vmid: VmId },
    /// Ask for a SPICE session on a VM.
    OpenSession { vmid: VmId },
    /// Start or shut down a VM (only if the user is granted power actions).
    Power { vmid: VmId, action: PowerAction },
    /// Renew the certificate of this connection. The CSR must carry the same public key.
    Renew {
        #[serde(with = "crate::b64")]
        csr: Vec<u8>,
    },
    /// Turn this stream into one SPICE channel of `session`. `connect` is the HTTP CONNECT
    /// request head the viewer sent, verbatim (at most `connect::MAX_CONNECT_HEAD` bytes).
    Tunnel { session: SessionId, connect: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    Start,
    Shutdown,
}

impl PowerAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerAction::Start => "start",
            PowerAction::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Hello(HelloInfo),
    Vms {
        vms: Vec<VmInfo>,
    },
    Vm {
        vm: VmInfo,
    },
    Session(SessionGrant),
    PowerDone {
        vmid: VmId,
        action: PowerAction,
    },
    Renewed {
        certificate: String,
        serial: String,
        not_after: i64,
    },
    TunnelReady,
    Error(WireError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloInfo {
    pub user: String,
    pub device: String,
    pub serial: String,
    pub not_after: i64,
    pub gateway_version: String,
    /// The agent renews its certificate once less than this many seconds of it remain.
    #[serde(default)]
    pub renew_before_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub vmid: VmId,
    pub name: String,
    pub node: String,
    /// Proxmox's status string: `running`, `stopped`, `paused`, ...
    pub status: String,
    /// Whether the VM has a SPICE display (`vga: qxl`); `None` if Proxmox did not say.
    pub spice: Option<bool>,
    /// Whether this user may start and shut down the VM.
    pub power: bool,
}

/// What remote-viewer needs for one session, and nothing more: never the Proxmox token, never
/// the address of the Proxmox spiceproxy (the agent's local proxy stands in for it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionGrant {
    pub session: SessionId,
    pub vmid: VmId,
    pub title: String,
    /// The Proxmox proxy ticket (`pvespiceproxy:...`), the .vv `host`.
    pub host: String,
    pub tls_port: u16,
    /// One-time SPICE password (valid about 30 s).
    pub password: Redacted<String>,
    /// The Proxmox cluster CA (PEM, real newlines) that SPICE TLS is verified against.
    pub ca: String,
    pub host_subject: String,
    pub secure_attention: Option<String>,
    pub toggle_fullscreen: Option<String>,
    pub release_cursor: Option<String>,
    /// Unix time until which new channels may be opened (the viewer must start before).
    pub channels_until: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn request_json_shapes() {
        let vmid = VmId::new(100).unwrap();
        let cases = [
            (Request::ListVms, r#"{"op":"list_vms"}"#),
            (
                Request::VmStatus { vmid },
                r#"{"op":"vm_status","vmid":100}"#,
            ),
            (
                Request::Power {
                    vmid,
                    action: PowerAction::Shutdown,
                },
                r#"{"op":"power","vmid":100,"action":"shutdown"}"#,
            ),
            (
                Request::Tunnel {
                    session: SessionId::from_bytes([0; 16]),
                    connect: "CONNECT a:1 HTTP/1.0\r\n\r\n".into(),
                },
                r#"{"op":"tunnel","session":"00000000000000000000000000000000","connect":"CONNECT a:1 HTTP/1.0\r\n\r\n"}"#,
            ),
        ];
        for (req, json) in cases {
            assert_eq!(serde_json::to_string(&req).unwrap(), json);
            assert_eq!(serde_json::from_str::<Request>(json).unwrap(), req);
        }
        assert!(serde_json::from_str::<Request>(r#"{"op":"proxy","path":"/nodes"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"vm_status","vmid":7}"#).is_err());
    }

    #[test]
    fn response_json_shapes() {
        assert_eq!(
            serde_json::to_string(&Response::TunnelReady).unwrap(),
            r#"{"result":"tunnel_ready"}"#
        );
        let err = Response::Error(WireError::new(ErrorCode::VmInUse, "in use"));
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"result":"error","code":"vm_in_use","message":"in use"}"#
        );
        let grant = SessionGrant {
            session: SessionId::from_bytes([1; 16]),
            vmid: VmId::new(100).unwrap(),
            title: "VM 100 - web".into(),
            host: "pvespiceproxy:x".into(),
            tls_port: 61000,
            password: "s3cret".into(),
            ca: "-----BEGIN CERTIFICATE-----\n".into(),
            host_subject: "CN=pve".into(),
            secure_attention: None,
            toggle_fullscreen: None,
            release_cursor: None,
            channels_until: 0,
        };
        let json = serde_json::to_string(&Response::Session(grant.clone())).unwrap();
        assert!(json.contains(r#""password":"s3cret""#));
        assert!(!format!("{grant:?}").contains("s3cret"));
        assert_eq!(
            serde_json::from_str::<Response>(&json).unwrap(),
            Response::Session(grant)
        );
    }
}
