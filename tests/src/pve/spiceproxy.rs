//! The spiceproxy daemon (Proxmox's port 3128): plain TCP, one HTTP `CONNECT` per SPICE channel,
//! the ticket in `Host:`, then raw bytes both ways.
//!
//! Head parsing is pure ([`parse_head`]); the daemon bounds the head's size and the time to read it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, Instrument as _};

use super::config::VmStatus;
use super::state::{unix_secs, Shared};
use super::{Fault, ProxyConnect};

/// pve-http-server's `$limit_max_header_size`, plus the request line.
pub const MAX_HEAD: usize = 8 * 1024 + 1024;
/// `$limit_max_headers`.
const MAX_HEADERS: usize = 64;
const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const LINGER: Duration = Duration::from_millis(500);

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectHead {
    pub request_line: String,
    pub method: String,
    pub target: String,
    /// `HTTP/1.0` or `HTTP/1.1`, echoed in the answer as Proxmox does.
    pub version: String,
    /// All `Host` headers joined with `, ` (as `HTTP::Headers` would).
    pub host: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadError {
    NotText,
    BadRequestLine,
    Version(String),
    TooManyHeaders,
    BadHeader,
}

impl HeadError {
    /// Status and reason of the answer.
    fn answer(&self) -> (u16, String) {
        match self {
            HeadError::Version(v) => (506, format!("http protocol version {v} not supported")),
            HeadError::TooManyHeaders => (400, "too many http header lines".into()),
            HeadError::NotText | HeadError::BadRequestLine | HeadError::BadHeader => {
                (400, "bad request".into())
            }
        }
    }
}

/// Index just past the blank line ending the head (`\r\n\r\n` or `\n\n`).
pub fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

pub fn parse_head(head: &[u8]) -> Result<ConnectHead, HeadError> {
    let text = std::str::from_utf8(head).map_err(|_| HeadError::NotText)?;
    let mut lines = text
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .skip_while(|l| l.is_empty());
    let request_line = lines.next().ok_or(HeadError::BadRequestLine)?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HeadError::BadRequestLine);
    };
    let token = |s: &str| !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control());
    if !token(method) || !token(target) {
        return Err(HeadError::BadRequestLine);
    }
    let Some((major, minor)) = version
        .strip_prefix("HTTP/")
        .and_then(|v| v.split_once('.'))
        .filter(|(a, b)| {
            [a, b]
                .iter()
                .all(|s| !s.is_empty() && s.len() <= 3 && s.bytes().all(|c| c.is_ascii_digit()))
        })
    else {
        return Err(HeadError::BadRequestLine);
    };
    if major != "1" {
        return Err(HeadError::Version(format!("{major}.{minor}")));
    }

    let mut headers: Vec<(String, String)> = Vec::new();
    for line in lines {
        if line.is_empty() {
            break;
        }
        if line.starts_with([' ', '\t']) {
            // Obsolete line folding, as pve-http-server still accepts it.
            let last = headers.last_mut().ok_or(HeadError::BadHeader)?;
            last.1.push(' ');
            last.1.push_str(line.trim());
            continue;
        }
        let (name, value) = line.split_once(':').ok_or(HeadError::BadHeader)?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(HeadError::BadHeader);
        }
        headers.push((name.to_owned(), value.trim().to_owned()));
        if headers.len() >= MAX_HEADERS {
            return Err(HeadError::TooManyHeaders);
        }
    }
    let hosts: Vec<&str> = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
        .map(|(_, v)| v.as_str())
        .collect();
    Ok(ConnectHead {
        request_line: request_line.to_owned(),
        method: method.to_owned(),
        target: target.to_owned(),
        version: format!("HTTP/{major}.{minor}"),
        host: (!hosts.is_empty()).then(|| hosts.join(", ")),
    })
}

pub async fn run(listener: TcpListener, shared: Arc<Shared>, head_timeout: Duration) {
    super::accept_loop(listener, move |tcp, peer| {
        let shared = Arc::clone(&shared);
        let span = tracing::debug_span!("spiceproxy_conn", %peer);
        async move { handle(shared, tcp, peer, head_timeout).await }.instrument(span)
    })
    .await;
}

enum HeadRead {
    Eof,
    TooLarge,
    Io(std::io::Error),
}

/// Reads up to the end of the head; returns the head and any bytes after it.
async fn read_head(client: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), HeadRead> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = client.read(&mut chunk).await.map_err(HeadRead::Io)?;
        if n == 0 {
            return Err(HeadRead::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf) {
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(HeadRead::TooLarge);
        }
    }
}

struct Record<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Record<'_> {
    fn update(&self, f: impl FnOnce(&mut ProxyConnect)) {
        let mut st = self.shared.lock();
        if let Some(c) = st.connects.iter_mut().find(|c| c.id == self.id) {
            f(c);
        }
    }

    fn finish(&self, status: Option<u16>, error: Option<String>) {
        self.update(|c| {
            c.status = status;
            c.error = error;
            c.closed = true;
        });
    }

    /// Records the refusal, answers it, then marks the connection closed.
    async fn refuse(
        &self,
        client: &mut TcpStream,
        proto: &str,
        status: u16,
        reason: &str,
        error: String,
    ) {
        self.update(|c| {
            c.status = Some(status);
            c.error = Some(error);
        });
        answer(client, proto, status, reason).await;
        self.update(|c| c.closed = true);
    }
}

async fn handle(
    shared: Arc<Shared>,
    mut client: TcpStream,
    peer: SocketAddr,
    head_timeout: Duration,
) {
    let id = {
        let mut st = shared.lock();
        let id = st.next_connect_id;
        st.next_connect_id += 1;
        st.connects.push(ProxyConnect {
            id,
            at: SystemTime::now(),
            peer,
            request_line: None,
            host: None,
            status: None,
            vmid: None,
            target: None,
            error: None,
            bytes_to_target: 0,
            bytes_to_client: 0,
            closed: false,
        });
        id
    };
    let record = Record {
        shared: &shared,
        id,
    };

    let (head, leftover) = match tokio::time::timeout(head_timeout, read_head(&mut client)).await {
        Ok(Ok(read)) => read,
        Ok(Err(HeadRead::TooLarge)) => {
            let reason = "http header too large";
            record
                .refuse(&mut client, "HTTP/1.0", 400, reason, reason.into())
                .await;
            return;
        }
        Ok(Err(HeadRead::Eof)) => {
            record.finish(
                None,
                Some("closed before the end of the request head".into()),
            );
            return;
        }
        Ok(Err(HeadRead::Io(e))) => {
            record.finish(None, Some(format!("reading the request head: {e}")));
            return;
        }
        Err(_) => {
            record.finish(None, Some("timed out reading the request head".into()));
            return;
        }
    };
    let head = match parse_head(&head) {
        Ok(head) => head,
        Err(e) => {
            let (status, reason) = e.answer();
            let line = String::from_utf8_lossy(head.split(|b| *b == b'\n').next().unwrap_or(&[]))
                .chars()
                .take(256)
                .collect::<String>();
            record.update(|c| c.request_line = Some(line.trim_end().to_owned()));
            record
                .refuse(&mut client, "HTTP/1.0", status, &reason, format!("{e:?}"))
                .await;
            return;
        }
    };
    record.update(|c| {
        c.request_line = Some(head.request_line.clone());
        c.host = head.host.clone();
    });
    let proto = head.version.as_str();

    if head.method != "CONNECT" {
        let reason = format!("method '{}' not available", head.method);
        record
            .refuse(&mut client, proto, 501, &reason, reason.clone())
            .await;
        return;
    }
    let refused = shared
        .lock()
        .has_fault(|f| matches!(f, Fault::SpiceproxyUnauthorized));
    let grant = if refused {
        Err("fault: SpiceproxyUnauthorized".to_owned())
    } else {
        match &head.host {
            None => Err("no Host header".to_owned()),
            Some(host) => shared
                .ticket_key
                .verify(host, unix_secs(SystemTime::now()))
                .map_err(|e| e.to_string()),
        }
    };
    let grant = match grant {
        Ok(grant) => grant,
        Err(why) => {
            debug!(%why, "refusing CONNECT");
            record
                .refuse(&mut client, proto, 401, "invalid ticket", why)
                .await;
            return;
        }
    };
    record.update(|c| c.vmid = Some(grant.vmid));

    // One daemon reaches every node's guests (Proxmox relays to the other node's 3128).
    let target = {
        let st = shared.lock();
        st.vms
            .get(&grant.vmid)
            .filter(|vm| vm.def.status == VmStatus::Running)
            .and_then(|vm| vm.def.spice_target)
    };
    let Some(target) = target else {
        // Nothing listens on that port: Proxmox's connect fails and it drops the client.
        record.finish(
            None,
            Some(format!("VM {} has no SPICE listener", grant.vmid)),
        );
        return;
    };
    record.update(|c| c.target = Some(target));
    let mut upstream =
        match tokio::time::timeout(TARGET_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                record.finish(None, Some(format!("connect to '{target}' failed: {e}")));
                return;
            }
            Err(_) => {
                record.finish(None, Some(format!("connect to '{target}' timed out")));
                return;
            }
        };
    if let Err(e) = client
        .write_all(format!("{proto} 200 OK\r\n\r\n").as_bytes())
        .await
    {
        record.finish(Some(200), Some(format!("writing the answer: {e}")));
        return;
    }
    record.update(|c| c.status = Some(200));
    let to_target = Arc::new(AtomicU64::new(0));
    let to_client = Arc::new(AtomicU64::new(0));
    let mut error = None;
    if !leftover.is_empty() {
        match upstream.write_all(&leftover).await {
            Ok(()) => {
                to_target.fetch_add(leftover.len() as u64, Ordering::Relaxed);
            }
            Err(e) => error = Some(format!("forwarding early bytes: {e}")),
        }
    }
    if error.is_none() {
        let mut client = Counted {
            inner: client,
            read: Arc::clone(&to_target),
        };
        let mut upstream = Counted {
            inner: upstream,
            read: Arc::clone(&to_client),
        };
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            error = Some(format!("relay: {e}"));
        }
    }
    record.update(|c| {
        c.bytes_to_target = to_target.load(Ordering::Relaxed);
        c.bytes_to_client = to_client.load(Ordering::Relaxed);
        c.error = error;
        c.closed = true;
    });
}

/// Writes a bodiless answer like pve-http-server's `error()`, then closes without resetting.
async fn answer(client: &mut TcpStream, proto: &str, status: u16, reason: &str) {
    let date = super::http_date(SystemTime::now());
    let text = format!(
        "{proto} {status} {reason}\r\nCache-Control: max-age=0\r\nConnection: close\r\nDate: {date}\r\nPragma: no-cache\r\nServer: pve-api-daemon/3.0\r\nExpires: {date}\r\n\r\n"
    );
    let _ = client.write_all(text.as_bytes()).await;
    let _ = client.shutdown().await;
    // Drain what the client still sends so closing does not reset the answer away.
    let mut sink = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        let mut total = 0usize;
        while let Ok(n) = client.read(&mut sink).await {
            total += n;
            if n == 0 || total > 1 << 20 {
                break;
            }
        }
    })
    .await;
}

/// Counts the bytes read through a stream.
struct Counted<S> {
    inner: S,
    read: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REMOTE_VIEWER: &[u8] = b"CONNECT pvespiceproxy:abc:61000 HTTP/1.0\r\nHost: pvespiceproxy:abc:61000\r\nProxy-Connection: keep-alive\r\nUser-Agent: GLib/2.74\r\n\r\n";

    #[test]
    fn remote_viewer_head_parses() {
        let end = head_end(REMOTE_VIEWER).unwrap();
        assert_eq!(end, REMOTE_VIEWER.len());
        let h = parse_head(&REMOTE_VIEWER[..end]).unwrap();
        assert_eq!(h.method, "CONNECT");
        assert_eq!(h.target, "pvespiceproxy:abc:61000");
        assert_eq!(h.version, "HTTP/1.0");
        assert_eq!(h.host.as_deref(), Some("pvespiceproxy:abc:61000"));
    }

    #[test]
    fn head_end_finds_first_blank_line_and_leaves_the_rest() {
        let mut data = REMOTE_VIEWER.to_vec();
        data.extend_from_slice(b"\x16\x03\x01");
        assert_eq!(head_end(&data), Some(REMOTE_VIEWER.len()));
        assert_eq!(head_end(b"CONNECT x HTTP/1.1\nHost: y\n\nrest"), Some(28));
        assert_eq!(head_end(b"CONNECT x HTTP/1.1\r\nHost: y\r\n"), None);
    }

    #[test]
    fn headers_are_case_insensitive_and_joined() {
        let h = parse_head(b"CONNECT a HTTP/1.1\r\nhOsT: one\r\nHost: two\r\n\r\n").unwrap();
        assert_eq!(h.host.as_deref(), Some("one, two"));
        assert_eq!(h.version, "HTTP/1.1");
        let folded = parse_head(b"CONNECT a HTTP/1.1\r\nHost: one\r\n two\r\n\r\n").unwrap();
        assert_eq!(folded.host.as_deref(), Some("one two"));
    }

    #[test]
    fn garbage_is_refused_without_panicking() {
        let cases: Vec<(&[u8], HeadError)> = vec![
            (b"\xff\xfe\r\n\r\n", HeadError::NotText),
            (b"\r\n\r\n", HeadError::BadRequestLine),
            (b"CONNECT\r\n\r\n", HeadError::BadRequestLine),
            (b"CONNECT a  HTTP/1.1\r\n\r\n", HeadError::BadRequestLine),
            (b"CONNECT a HTTP/1.1 x\r\n\r\n", HeadError::BadRequestLine),
            (b"CONNECT a HTTPS/1.1\r\n\r\n", HeadError::BadRequestLine),
            (b"CONNECT a HTTP/1\r\n\r\n", HeadError::BadRequestLine),
            (
                b"CONNECT a HTTP/2.0\r\n\r\n",
                HeadError::Version("2.0".into()),
            ),
            (
                b"CONNECT a HTTP/1.1\r\nno colon\r\n\r\n",
                HeadError::BadHeader,
            ),
            (
                b"CONNECT a HTTP/1.1\r\n folded first\r\n\r\n",
                HeadError::BadHeader,
            ),
            (
                b"CONNECT a HTTP/1.1\r\n: empty\r\n\r\n",
                HeadError::BadHeader,
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_head(input),
                Err(want),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let many: String = std::iter::once("CONNECT a HTTP/1.1\r\n".to_owned())
            .chain((0..70).map(|i| format!("X-{i}: y\r\n")))
            .chain(std::iter::once("\r\n".to_owned()))
            .collect();
        assert_eq!(parse_head(many.as_bytes()), Err(HeadError::TooManyHeaders));
    }
}
