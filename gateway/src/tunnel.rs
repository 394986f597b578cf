//! One SPICE channel: a QUIC stream of an authenticated connection, relayed to the Proxmox
//! spiceproxy.
//!
//! The decision is made once, in [`SessionTable::authorize`](crate::sessions::SessionTable):
//! the session exists, belongs to the certificate (serial and key) of *this* connection, is live,
//! and the CONNECT head the viewer sent names exactly the session's ticket. Then the gateway dials
//! spiceproxy (port 3128 of the configured node), sends its own CONNECT with the ticket, waits
//! for `200`, answers `TunnelReady`, and copies bytes both ways until both sides have closed
//! (half-close propagates as QUIC FIN / TCP FIN; an error resets the other side). The relay
//! itself decides nothing.
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, info, Instrument};
use zerospice_proto::access::Response;
use zerospice_proto::connect::{head_len, parse_connect_head, SpiceTarget, MAX_CONNECT_HEAD};
use zerospice_proto::error::stream;
use zerospice_proto::frame::MAX_RESPONSE_FRAME;
use zerospice_proto::io::{relay, write_frame};
use zerospice_proto::{ErrorCode, SessionId, WireError};

use crate::access::{refuse, AccessState, Peer};

/// Bound on dialing spiceproxy and on its answer to CONNECT.
pub const SPICEPROXY_TIMEOUT: Duration = Duration::from_secs(10);

/// The spiceproxy's answer to CONNECT, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyAnswer {
    Established,
    Refused { status: u16, reason: String },
}

/// Parses the status line of spiceproxy's answer head (`HTTP/1.x 200 OK`).
pub fn parse_proxy_answer(head: &[u8]) -> Result<ProxyAnswer, String> {
    let text = std::str::from_utf8(head).map_err(|_| "answer is not text".to_owned())?;
    let line = text.split("\r\n").next().unwrap_or("");
    let mut parts = line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err("malformed status line".into());
    };
    if version != "HTTP/1.0" && version != "HTTP/1.1" {
        return Err("not an HTTP answer".into());
    }
    let status: u16 = code
        .parse()
        .ok()
        .filter(|c| (100..=599).contains(c))
        .ok_or_else(|| "malformed status code".to_owned())?;
    let reason: String = parts
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    Ok(if status == 200 {
        ProxyAnswer::Established
    } else {
        ProxyAnswer::Refused { status, reason }
    })
}

/// The CONNECT head the gateway sends to spiceproxy for `target`.
pub fn connect_head(target: &SpiceTarget) -> String {
    let a = target.authority();
    format!("CONNECT {a} HTTP/1.0\r\nHost: {a}\r\n\r\n")
}

enum Dialed {
    Ready(TcpStream, Vec<u8>),
    Failed(WireError, String),
}

async fn dial(addr: &str, target: &SpiceTarget) -> Dialed {
    let unreachable = |detail: String| {
        Dialed::Failed(
            WireError::new(
                ErrorCode::ProxmoxUnavailable,
                "the gateway cannot reach the Proxmox spiceproxy; the administrator can run `zerospice-gateway check`",
            ),
            detail,
        )
    };
    let tcp = match tokio::time::timeout(SPICEPROXY_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return unreachable(format!("connect {addr}: {e}")),
        Err(_) => return unreachable(format!("connect {addr}: timed out")),
    };
    let _ = tcp.set_nodelay(true);
    let mut tcp = tcp;
    let exchange = async {
        tcp.write_all(connect_head(target).as_bytes()).await?;
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(n) = head_len(&buf) {
                return Ok::<_, std::io::Error>(Some((buf, n)));
            }
            if buf.len() > MAX_CONNECT_HEAD {
                return Ok(None);
            }
            let n = tcp.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let (buf, n) = match tokio::time::timeout(SPICEPROXY_TIMEOUT, exchange).await {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return unreachable("spiceproxy closed without a valid answer".into()),
        Ok(Err(e)) => return unreachable(format!("spiceproxy: {e}")),
        Err(_) => return unreachable("spiceproxy did not answer in time".into()),
    };
    match parse_proxy_answer(&buf[..n]) {
        Ok(ProxyAnswer::Established) => Dialed::Ready(tcp, buf[n..].to_vec()),
        Ok(ProxyAnswer::Refused { status, reason }) => {
            let hint = if status == 401 {
                ": the session's ticket is no longer valid (tickets live 40 s); open a new session"
            } else {
                ""
            };
            Dialed::Failed(
                WireError::new(
                    ErrorCode::SpiceProxyRefused,
                    format!("the Proxmox spiceproxy refused the channel ({status} {reason}){hint}"),
                ),
                format!("spiceproxy answered {status} {reason}"),
            )
        }
        Err(e) => unreachable(format!("spiceproxy answer: {e}")),
    }
}

/// Serves one `Tunnel` stream.
pub async fn run(
    state: Arc<AccessState>,
    peer: Arc<Peer>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    session: SessionId,
    connect: String,
) {
    let span = tracing::debug_span!("channel", session = %session, stream = %send.id());
    async move {
        let refused = |reason: String, vmid: Option<u32>| {
            peer.audit(
                "channel.refused",
                serde_json::json!({ "session": session.as_str(), "vmid": vmid, "reason": reason }),
            )
        };
        let req = match parse_connect_head(connect.as_bytes()) {
            Ok(r) => r,
            Err(e) => {
                state
                    .audit(refused(format!("bad_connect: {e}"), None))
                    .await;
                return refuse(
                    send,
                    recv,
                    WireError::new(ErrorCode::ConnectMismatch, format!("CONNECT refused: {e}")),
                )
                .await;
            }
        };
        // Authorize and count the channel in one step, so the session cannot end in between.
        let authorized = {
            let mut table = state.sessions();
            table
                .authorize(
                    &session,
                    &peer.serial,
                    &peer.key_fingerprint,
                    &req,
                    Instant::now(),
                )
                .map(|target| {
                    table.channel_opened(&session);
                    let vmid = table.get(&session).map(|s| s.vmid);
                    (target, vmid)
                })
        };
        let (target, vmid) = match authorized {
            Ok(x) => x,
            Err(r) => {
                info!(reason = %r.audit_reason(), "channel refused");
                state.audit(refused(r.audit_reason(), None)).await;
                return refuse(send, recv, r.wire()).await;
            }
        };
        let vmid_num = vmid.map(|v| v.get());
        let spiceproxy = state
            .proxmox
            .as_ref()
            .map(|p| p.spiceproxy.clone())
            .unwrap_or_default();
        let started = Instant::now();
        let (tcp, leftover) = match dial(&spiceproxy, &target).await {
            Dialed::Ready(tcp, leftover) => (tcp, leftover),
            Dialed::Failed(wire, detail) => {
                tracing::warn!(vmid = vmid_num, %detail, "spiceproxy refused a channel");
                state.audit(refused(detail, vmid_num)).await;
                close_channel(&state, &session, 0, 0).await;
                return refuse(send, recv, wire).await;
            }
        };
        if write_frame(&mut send, &Response::TunnelReady, MAX_RESPONSE_FRAME)
            .await
            .is_err()
        {
            close_channel(&state, &session, 0, 0).await;
            return;
        }
        let mut down_extra = 0u64;
        if !leftover.is_empty() {
            if send.write_all(&leftover).await.is_err() {
                close_channel(&state, &session, 0, 0).await;
                return;
            }
            down_extra = leftover.len() as u64;
        }
        debug!(vmid = vmid_num, "channel open");
        let (mut tr, mut tw) = tcp.into_split();
        let out = relay(&mut recv, &mut send, &mut tr, &mut tw).await;
        let up = out.a_to_b;
        let down = out.b_to_a + down_extra;
        if let Some(e) = &out.error {
            debug!(error = %e, "channel ended with an error");
            let _ = send.reset(stream::PEER_RESET.into());
            let _ = recv.stop(stream::PEER_RESET.into());
            // Drop the TCP side with a reset rather than a clean FIN.
            if let Ok(tcp) = tr.reunite(tw) {
                let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
            }
        }
        let duration_ms = started.elapsed().as_millis() as u64;
        debug!(up, down, duration_ms, "channel closed");
        state
            .audit(peer.audit(
                "channel.closed",
                serde_json::json!({
                    "session": session.as_str(),
                    "vmid": vmid_num,
                    "bytes_up": up,
                    "bytes_down": down,
                    "duration_ms": duration_ms,
                    "error": out.error.as_ref().map(|e| e.to_string()),
                }),
            ))
            .await;
        close_channel(&state, &session, up, down).await;
    }
    .instrument(span)
    .await
}

async fn close_channel(state: &AccessState, session: &SessionId, up: u64, down: u64) {
    let ended = state
        .sessions()
        .channel_closed(session, up, down, Instant::now());
    if let Some(ended) = ended {
        state.sessions_ended(vec![ended]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_answers() {
        assert_eq!(
            parse_proxy_answer(b"HTTP/1.0 200 OK\r\n\r\n"),
            Ok(ProxyAnswer::Established)
        );
        assert_eq!(
            parse_proxy_answer(
                b"HTTP/1.1 401 invalid ticket\r\nServer: pve-api-daemon/3.0\r\n\r\n"
            ),
            Ok(ProxyAnswer::Refused {
                status: 401,
                reason: "invalid ticket".into()
            })
        );
        assert!(parse_proxy_answer(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(parse_proxy_answer(b"HTTP/1.0 abc\r\n\r\n").is_err());
        assert!(parse_proxy_answer(b"HTTP/1.0 999 x\r\n\r\n").is_err());
        assert!(parse_proxy_answer(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn the_gateway_sends_exactly_the_ticket() {
        let t = SpiceTarget {
            ticket: "pvespiceproxy:00000000:100:pve:61000::abc".into(),
            tls_port: 61000,
        };
        assert_eq!(
            connect_head(&t),
            "CONNECT pvespiceproxy:00000000:100:pve:61000::abc:61000 HTTP/1.0\r\nHost: pvespiceproxy:00000000:100:pve:61000::abc:61000\r\n\r\n"
        );
    }
}
