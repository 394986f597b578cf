//! The HTTP CONNECT request head that remote-viewer sends to its proxy, once per SPICE channel:
//!
//! ```text
//! CONNECT pvespiceproxy:<ticket>:<tls-port> HTTP/1.0
//! Host: pvespiceproxy:<ticket>:<tls-port>
//! Proxy-Connection: keep-alive
//! User-Agent: GLib/2.74
//! ```
//!
//! The agent parses it to refuse anything but its own session's target before a QUIC stream is
//! opened; the gateway parses it again (same code) and checks it against the session's ticket
//! before it dials spiceproxy. The parser is strict, bounded and total: any input gives a value
//! or an error, never a panic (it is fuzzed).

/// Largest request head accepted, terminator included.
pub const MAX_CONNECT_HEAD: usize = 8 * 1024;
/// Most header lines accepted.
pub const MAX_HEADERS: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The request target, `host:port` (authority form).
    pub target: String,
    /// The `Host:` header, if present.
    pub host: Option<String>,
    /// `HTTP/1.0` or `HTTP/1.1`.
    pub version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("request head larger than {MAX_CONNECT_HEAD} bytes")]
    TooLarge,
    #[error("incomplete request head")]
    Incomplete,
    #[error("request head is not valid text")]
    NotText,
    #[error("only CONNECT is supported, not {0:?}")]
    NotConnect(String),
    #[error("malformed request line")]
    BadRequestLine,
    #[error("unsupported HTTP version {0:?}")]
    BadVersion(String),
    #[error("malformed header line")]
    BadHeader,
    #[error("more than {MAX_HEADERS} header lines")]
    TooManyHeaders,
    #[error("duplicate Host header")]
    DuplicateHost,
}

/// Returns the length of the head (terminating blank line included) if `buf` holds a complete one.
pub fn head_len(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parses a complete request head (as delimited by [`head_len`]).
pub fn parse_connect_head(head: &[u8]) -> Result<ConnectRequest, ConnectError> {
    if head.len() > MAX_CONNECT_HEAD {
        return Err(ConnectError::TooLarge);
    }
    let text = std::str::from_utf8(head).map_err(|_| ConnectError::NotText)?;
    let text = text
        .strip_suffix("\r\n\r\n")
        .ok_or(ConnectError::Incomplete)?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().ok_or(ConnectError::BadRequestLine)?;

    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ConnectError::BadRequestLine);
    };
    if method != "CONNECT" {
        let shown: String = method.chars().take(16).collect();
        return Err(ConnectError::NotConnect(shown));
    }
    if version != "HTTP/1.0" && version != "HTTP/1.1" {
        return Err(ConnectError::BadVersion(version.chars().take(16).collect()));
    }
    if !is_authority(target) {
        return Err(ConnectError::BadRequestLine);
    }

    let mut host = None;
    for (i, line) in lines.enumerate() {
        if i >= MAX_HEADERS {
            return Err(ConnectError::TooManyHeaders);
        }
        let (name, value) = line.split_once(':').ok_or(ConnectError::BadHeader)?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err(ConnectError::BadHeader);
        }
        let value = value.trim_matches(|c| c == ' ' || c == '\t');
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(ConnectError::BadHeader);
        }
        if name.eq_ignore_ascii_case("host") {
            if host.is_some() {
                return Err(ConnectError::DuplicateHost);
            }
            host = Some(value.to_owned());
        }
    }
    Ok(ConnectRequest {
        target: target.to_owned(),
        host,
        version: version.to_owned(),
    })
}

/// `host:port` with a non-empty host of visible ASCII and a decimal port.
fn is_authority(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && host.bytes().all(|b| b.is_ascii_graphic())
        && port.parse::<u16>().is_ok()
        && port.bytes().all(|b| b.is_ascii_digit())
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Where a session's channels may go: the Proxmox proxy ticket and the VM's SPICE TLS port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpiceTarget {
    pub ticket: String,
    pub tls_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetMismatch {
    #[error("the CONNECT target is not this session's ticket")]
    RequestLine,
    #[error("the CONNECT request has no Host header")]
    MissingHost,
    #[error("the Host header is not this session's ticket")]
    Host,
}

impl SpiceTarget {
    /// `<ticket>:<tls-port>`, what remote-viewer puts in the request line and in `Host:`.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.ticket, self.tls_port)
    }

    /// Accepts the request only if both the request line and `Host:` name exactly this target.
    pub fn check(&self, req: &ConnectRequest) -> Result<(), TargetMismatch> {
        let authority = self.authority();
        if req.target != authority {
            return Err(TargetMismatch::RequestLine);
        }
        match &req.host {
            None => Err(TargetMismatch::MissingHost),
            Some(h) if *h != authority => Err(TargetMismatch::Host),
            Some(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICKET: &str =
        "pvespiceproxy:6566e0c1:100:pve:61000::0123456789abcdef0123456789abcdef01234567";

    fn viewer_head() -> String {
        format!(
            "CONNECT {TICKET}:61000 HTTP/1.0\r\nHost: {TICKET}:61000\r\nProxy-Connection: keep-alive\r\nUser-Agent: GLib/2.74\r\n\r\n"
        )
    }

    #[test]
    fn parses_what_remote_viewer_sends() {
        let head = viewer_head();
        assert_eq!(head_len(head.as_bytes()), Some(head.len()));
        let req = parse_connect_head(head.as_bytes()).unwrap();
        assert_eq!(req.target, format!("{TICKET}:61000"));
        assert_eq!(req.host.as_deref(), Some(req.target.as_str()));
        assert_eq!(req.version, "HTTP/1.0");
        let t = SpiceTarget {
            ticket: TICKET.into(),
            tls_port: 61000,
        };
        assert_eq!(t.check(&req), Ok(()));
    }

    #[test]
    fn head_len_needs_the_blank_line() {
        assert_eq!(head_len(b"CONNECT a:1 HTTP/1.0\r\n"), None);
        assert_eq!(head_len(b"CONNECT a:1 HTTP/1.0\r\n\r\nXYZ"), Some(24));
    }

    #[test]
    fn target_checks() {
        let t = SpiceTarget {
            ticket: TICKET.into(),
            tls_port: 61000,
        };
        let other_port = parse_connect_head(
            format!("CONNECT {TICKET}:61001 HTTP/1.0\r\nHost: {TICKET}:61001\r\n\r\n").as_bytes(),
        )
        .unwrap();
        assert_eq!(t.check(&other_port), Err(TargetMismatch::RequestLine));
        let host_differs = parse_connect_head(
            format!("CONNECT {TICKET}:61000 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n").as_bytes(),
        )
        .unwrap();
        assert_eq!(t.check(&host_differs), Err(TargetMismatch::Host));
        let no_host =
            parse_connect_head(format!("CONNECT {TICKET}:61000 HTTP/1.0\r\n\r\n").as_bytes())
                .unwrap();
        assert_eq!(t.check(&no_host), Err(TargetMismatch::MissingHost));
    }

    #[test]
    fn rejects_malformed_heads() {
        use ConnectError::*;
        let cases: &[(&[u8], ConnectError)] = &[
            (b"GET / HTTP/1.1\r\n\r\n", NotConnect("GET".into())),
            (b"CONNECT a:1 HTTP/2\r\n\r\n", BadVersion("HTTP/2".into())),
            (b"CONNECT a:1  HTTP/1.0\r\n\r\n", BadRequestLine),
            (b"CONNECT a HTTP/1.0\r\n\r\n", BadRequestLine),
            (b"CONNECT a:99999 HTTP/1.0\r\n\r\n", BadRequestLine),
            (b"CONNECT :1 HTTP/1.0\r\n\r\n", BadRequestLine),
            (b"CONNECT a:+1 HTTP/1.0\r\n\r\n", BadRequestLine),
            (b"CONNECT a:1 HTTP/1.0\r\nNoColon\r\n\r\n", BadHeader),
            (b"CONNECT a:1 HTTP/1.0\r\nBad Name: x\r\n\r\n", BadHeader),
            (b"CONNECT a:1 HTTP/1.0\r\nX: a\x00b\r\n\r\n", BadHeader),
            (
                b"CONNECT a:1 HTTP/1.0\r\nHost: a:1\r\nhost: b:1\r\n\r\n",
                DuplicateHost,
            ),
            (b"CONNECT a:1 HTTP/1.0\r\n", Incomplete),
            (b"\xff\xfe\r\n\r\n", NotText),
        ];
        for (input, want) in cases {
            assert_eq!(
                parse_connect_head(input).as_ref().unwrap_err(),
                want,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let many = format!("CONNECT a:1 HTTP/1.0\r\n{}\r\n", "X: y\r\n".repeat(40));
        assert_eq!(parse_connect_head(many.as_bytes()), Err(TooManyHeaders));
        let huge = format!("CONNECT a:1 HTTP/1.0\r\nX: {}\r\n\r\n", "y".repeat(9000));
        assert_eq!(parse_connect_head(huge.as_bytes()), Err(TooLarge));
    }

    #[test]
    fn never_panics_on_arbitrary_prefixes() {
        let head = viewer_head();
        for end in 0..head.len() {
            let _ = parse_connect_head(&head.as_bytes()[..end]);
        }
        for b in 0..=255u8 {
            let mut h = head.clone().into_bytes();
            h[10] = b;
            let _ = parse_connect_head(&h);
        }
    }
}
