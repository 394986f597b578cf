//! The remote-viewer connection file (`.vv`), built from a session grant.
//!
//! It is handed to `remote-viewer -` on standard input and never written to disk (it holds the
//! one-time SPICE password). `proxy` names the agent's local CONNECT proxy; `host` is Proxmox's
//! ticket, which the viewer repeats in every CONNECT; `ca` and `host-subject` make the viewer
//! verify the VM's SPICE TLS end to end, through the tunnel.
use std::fmt::Write as _;
use std::net::SocketAddr;

use zerospice_proto::access::SessionGrant;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the gateway sent a {0} that cannot go into a viewer file")]
pub struct UnsafeField(pub &'static str);

fn line(out: &mut String, key: &str, value: &str, what: &'static str) -> Result<(), UnsafeField> {
    if value.chars().any(char::is_control) {
        return Err(UnsafeField(what));
    }
    let _ = writeln!(out, "{key}={value}");
    Ok(())
}

/// The `.vv` text for `grant`, with the viewer sent through the proxy at `proxy`.
pub fn vv_file(grant: &SessionGrant, proxy: SocketAddr) -> Result<String, UnsafeField> {
    let mut out = String::from("[virt-viewer]\n");
    line(&mut out, "type", "spice", "type")?;
    line(&mut out, "host", &grant.host, "ticket")?;
    line(&mut out, "tls-port", &grant.tls_port.to_string(), "port")?;
    line(&mut out, "password", grant.password.expose(), "password")?;
    line(&mut out, "proxy", &format!("http://{proxy}"), "proxy")?;
    if grant.ca.chars().any(|c| c.is_control() && c != '\n') {
        return Err(UnsafeField("CA certificate"));
    }
    // remote-viewer reads the two characters `\n` as a newline in `ca`.
    line(
        &mut out,
        "ca",
        &grant.ca.trim_end().replace('\n', "\\n"),
        "CA",
    )?;
    line(
        &mut out,
        "host-subject",
        &grant.host_subject,
        "host subject",
    )?;
    line(&mut out, "title", &grant.title, "title")?;
    line(&mut out, "delete-this-file", "1", "flag")?;
    for (key, value) in [
        ("secure-attention", &grant.secure_attention),
        ("toggle-fullscreen", &grant.toggle_fullscreen),
        ("release-cursor", &grant.release_cursor),
    ] {
        if let Some(v) = value {
            line(&mut out, key, v, "hotkey")?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerospice_proto::{SessionId, VmId};

    fn grant() -> SessionGrant {
        SessionGrant {
            session: SessionId::from_bytes([1; 16]),
            vmid: VmId::new(100).unwrap(),
            title: "VM 100 - web".into(),
            host: "pvespiceproxy:6566e0c1:100:pve:61000::0123456789abcdef0123456789abcdef01234567"
                .into(),
            tls_port: 61000,
            password: "a1b2".into(),
            ca: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
            host_subject: "OU=PVE Cluster Node,O=Proxmox Virtual Environment,CN=pve".into(),
            secure_attention: Some("Ctrl+Alt+Ins".into()),
            toggle_fullscreen: Some("Shift+F11".into()),
            release_cursor: Some("Ctrl+Alt+R".into()),
            channels_until: 0,
        }
    }

    #[test]
    fn has_the_proxmox_shape_with_our_proxy() {
        let vv = vv_file(&grant(), "127.0.0.1:40000".parse().unwrap()).unwrap();
        assert_eq!(
            vv,
            "[virt-viewer]\n\
             type=spice\n\
             host=pvespiceproxy:6566e0c1:100:pve:61000::0123456789abcdef0123456789abcdef01234567\n\
             tls-port=61000\n\
             password=a1b2\n\
             proxy=http://127.0.0.1:40000\n\
             ca=-----BEGIN CERTIFICATE-----\\nMIIB\\n-----END CERTIFICATE-----\n\
             host-subject=OU=PVE Cluster Node,O=Proxmox Virtual Environment,CN=pve\n\
             title=VM 100 - web\n\
             delete-this-file=1\n\
             secure-attention=Ctrl+Alt+Ins\n\
             toggle-fullscreen=Shift+F11\n\
             release-cursor=Ctrl+Alt+R\n"
        );
    }

    #[test]
    fn a_newline_cannot_inject_keys() {
        let mut g = grant();
        g.title = "x\nproxy=http://evil:1".into();
        assert_eq!(
            vv_file(&g, "127.0.0.1:1".parse().unwrap()),
            Err(UnsafeField("title"))
        );
        let mut g = grant();
        g.ca = "x\r\ny".into();
        assert!(vv_file(&g, "127.0.0.1:1".parse().unwrap()).is_err());
    }
}
