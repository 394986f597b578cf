//! The local HTTP CONNECT proxy that remote-viewer is pointed at.
//!
//! It listens on 127.0.0.1 (an ephemeral port), serves one session, and turns every accepted
//! connection (one SPICE channel) into one QUIC stream to the gateway. Before anything is carried
//! it checks that the connecting socket belongs to this user (see [`crate::peer`]) and that the
//! CONNECT names exactly this session's ticket; anything else gets an HTTP error and nothing
//! reaches the gateway.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zerospice_proto::access::SessionGrant;
use zerospice_proto::connect::{head_len, parse_connect_head, SpiceTarget, MAX_CONNECT_HEAD};
use zerospice_proto::io::relay;
use zerospice_proto::SessionId;

use crate::client::Client;

/// How long a viewer has to send its CONNECT head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the proxy reports (the CLI prints it, the tray agent draws it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyEvent {
    ChannelOpened {
        channel: u64,
    },
    ChannelClosed {
        channel: u64,
        up: u64,
        down: u64,
        error: Option<String>,
    },
    /// A connection was refused before reaching the gateway, or the gateway refused it.
    Refused {
        reason: String,
    },
}

struct Ctx {
    client: Arc<Client>,
    session: SessionId,
    target: SpiceTarget,
    ours: SocketAddr,
    me: u32,
    events: mpsc::UnboundedSender<ProxyEvent>,
    next: AtomicU64,
}

/// A running local proxy; stops when dropped.
pub struct LocalProxy {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl LocalProxy {
    /// Binds 127.0.0.1 on an ephemeral port and serves `grant`'s channels over `client`.
    pub async fn start(
        client: Arc<Client>,
        grant: &SessionGrant,
        events: mpsc::UnboundedSender<ProxyEvent>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let ctx = Arc::new(Ctx {
            client,
            session: grant.session.clone(),
            target: SpiceTarget {
                ticket: grant.host.clone(),
                tls_port: grant.tls_port,
            },
            ours: addr,
            me: zerospice_ca::fsutil::current_uid()?,
            events,
            next: AtomicU64::new(1),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((sock, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let ctx = ctx.clone();
                tokio::spawn(async move { serve(ctx, sock, peer).await });
            }
        });
        Ok(Self { addr, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for LocalProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(sock: &mut TcpStream, status: &str, message: &str) {
    let body = format!("{message}\n");
    let text = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(text.as_bytes()).await;
    let _ = sock.shutdown().await;
    // Closing a socket with unread input makes Linux send RST, and a client that has not read
    // the answer yet then loses it (ECONNRESET). Read what the client sent until it closes, for
    // a bounded time and size, so the answer arrives.
    let drain = async {
        let mut chunk = [0u8; 1024];
        let mut left = 64 * 1024usize;
        while left > 0 {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

/// Reads the request head; returns it and any bytes that followed it.
async fn read_head(sock: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let read = async {
        loop {
            if let Some(n) = head_len(&buf) {
                let rest = buf.split_off(n);
                return Some((buf, rest));
            }
            if buf.len() > MAX_CONNECT_HEAD {
                return None;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

/// The owner uid of the peer socket. `/proc/net/tcp` is produced in pages, and a socket table
/// that changes between two pages can skip an entry: a busy machine (a viewer opening eight
/// channels, a browser) can miss a live socket once, so a miss is read again before refusing.
async fn owner_of(peer: SocketAddr, ours: SocketAddr) -> std::io::Result<Option<u32>> {
    for attempt in 0..OWNER_LOOKUPS {
        if let Some(uid) = crate::peer::peer_uid(peer, ours)? {
            return Ok(Some(uid));
        }
        if attempt + 1 < OWNER_LOOKUPS {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(None)
}

/// How many times the socket table is read before a connection's owner is called unknown.
const OWNER_LOOKUPS: u32 = 4;

async fn serve(ctx: Arc<Ctx>, mut sock: TcpStream, peer: SocketAddr) {
    let refuse = |reason: String| {
        tracing::warn!(%peer, %reason, "local proxy refused a connection");
        let _ = ctx.events.send(ProxyEvent::Refused { reason });
    };
    match owner_of(peer, ctx.ours).await {
        Ok(Some(uid)) if uid == ctx.me => {}
        Ok(Some(uid)) => {
            refuse(format!(
                "refused a connection from another local user (uid {uid}): this proxy serves only uid {}",
                ctx.me
            ));
            return answer(
                &mut sock,
                "403 Forbidden",
                "this ZeroSpice proxy serves only the user who started it",
            )
            .await;
        }
        Ok(None) | Err(_) => {
            refuse("could not find the owner of a local connection; refused".into());
            return answer(&mut sock, "403 Forbidden", "connection owner unknown").await;
        }
    }
    let _ = sock.set_nodelay(true);
    let Some((head, early)) = read_head(&mut sock).await else {
        refuse("a local connection sent no valid request head".into());
        return answer(
            &mut sock,
            "400 Bad Request",
            "expected an HTTP CONNECT request",
        )
        .await;
    };
    let req = match parse_connect_head(&head) {
        Ok(r) => r,
        Err(e) => {
            refuse(format!("bad request: {e}"));
            return answer(&mut sock, "400 Bad Request", &e.to_string()).await;
        }
    };
    if let Err(e) = ctx.target.check(&req) {
        refuse(format!("CONNECT to another target refused: {e}"));
        return answer(
            &mut sock,
            "403 Forbidden",
            "this ZeroSpice proxy only reaches its own SPICE session",
        )
        .await;
    }
    let head_text = String::from_utf8_lossy(&head).into_owned();
    let (mut qsend, mut qrecv) = match ctx.client.open_tunnel(&ctx.session, &head_text).await {
        Ok(s) => s,
        Err(e) => {
            let msg = e.to_string();
            refuse(format!("the gateway refused a channel: {msg}"));
            return answer(&mut sock, "502 Bad Gateway", &msg).await;
        }
    };
    if sock
        .write_all(b"HTTP/1.0 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        let _ = qsend.reset(zerospice_proto::error::stream::PEER_RESET.into());
        return;
    }
    if !early.is_empty() && qsend.write_all(&early).await.is_err() {
        return;
    }
    let channel = ctx.next.fetch_add(1, Ordering::Relaxed);
    let _ = ctx.events.send(ProxyEvent::ChannelOpened { channel });
    let (mut tr, mut tw) = sock.into_split();
    let out = relay(&mut tr, &mut tw, &mut qrecv, &mut qsend).await;
    if out.error.is_some() {
        let _ = qsend.reset(zerospice_proto::error::stream::PEER_RESET.into());
        let _ = qrecv.stop(zerospice_proto::error::stream::PEER_RESET.into());
    }
    let _ = ctx.events.send(ProxyEvent::ChannelClosed {
        channel,
        up: out.a_to_b + early.len() as u64,
        down: out.b_to_a,
        error: out.error.map(|e| e.to_string()),
    });
}
