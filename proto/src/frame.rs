//! Length-prefixed JSON frames with a hard size limit.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of UTF-8 JSON. The length
//! is checked against the limit *before* anything is buffered, so a peer announcing 4 GiB costs
//! four bytes of memory. A frame of length 0 is malformed (there is no empty message).
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest request frame a gateway accepts (enrollment with a full attestation chain is ~8 KiB).
pub const MAX_REQUEST_FRAME: usize = 64 * 1024;
/// Largest response frame a client accepts (a VM list of a large cluster).
pub const MAX_RESPONSE_FRAME: usize = 4 * 1024 * 1024;
/// Size of the length prefix.
pub const HEADER_LEN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("empty frame")]
    Empty,
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message too large to encode ({0} bytes)")]
    EncodeTooLarge(usize),
}

/// Encodes one message as a frame.
pub fn encode<T: Serialize>(msg: &T, max: usize) -> Result<Vec<u8>, FrameError> {
    let body = serde_json::to_vec(msg).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if body.len() > max || body.len() > u32::MAX as usize {
        return Err(FrameError::EncodeTooLarge(body.len()));
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Reads the length prefix and checks it against `max`.
pub fn body_len(header: [u8; HEADER_LEN], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Decodes a frame body (without its prefix).
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Malformed(short(&e.to_string())))
}

/// Decodes exactly one complete frame from `buf` (prefix included). Trailing bytes are an error:
/// every stream carries one request frame before its payload, and callers split the payload off.
pub fn decode<T: DeserializeOwned>(buf: &[u8], max: usize) -> Result<(T, usize), FrameError> {
    let Some(header) = buf.get(..HEADER_LEN) else {
        return Err(FrameError::Truncated {
            expected: HEADER_LEN,
            got: buf.len(),
        });
    };
    let mut h = [0u8; HEADER_LEN];
    h.copy_from_slice(header);
    let len = body_len(h, max)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Err(FrameError::Truncated {
            expected: len,
            got: buf.len() - HEADER_LEN,
        });
    };
    Ok((decode_body(body)?, HEADER_LEN + len))
}

/// Keeps error text short: serde's messages can quote attacker-chosen input at length.
fn short(s: &str) -> String {
    let mut out: String = s.chars().take(160).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Ping {
        n: u32,
    }

    #[test]
    fn encodes_to_literal_bytes() {
        let f = encode(&Ping { n: 7 }, 100).unwrap();
        assert_eq!(f, b"\x00\x00\x00\x07{\"n\":7}".to_vec());
        let (p, used) = decode::<Ping>(&f, 100).unwrap();
        assert_eq!(p, Ping { n: 7 });
        assert_eq!(used, f.len());
    }

    #[test]
    fn limits_are_checked_before_buffering() {
        assert_eq!(
            body_len([0xff, 0xff, 0xff, 0xff], MAX_REQUEST_FRAME),
            Err(FrameError::TooLarge {
                len: u32::MAX as usize,
                max: MAX_REQUEST_FRAME
            })
        );
        assert_eq!(body_len([0, 0, 0, 0], 10), Err(FrameError::Empty));
        assert_eq!(body_len([0, 0, 0, 10], 10), Ok(10));
        assert_eq!(
            body_len([0, 0, 0, 11], 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        );
        assert!(matches!(
            encode(&"x".repeat(100), 50),
            Err(FrameError::EncodeTooLarge(_))
        ));
    }

    #[test]
    fn truncated_and_garbage_frames_are_errors() {
        assert_eq!(
            decode::<Ping>(b"\x00\x00", 100).unwrap_err(),
            FrameError::Truncated {
                expected: 4,
                got: 2
            }
        );
        assert_eq!(
            decode::<Ping>(b"\x00\x00\x00\x09{\"n\"", 100).unwrap_err(),
            FrameError::Truncated {
                expected: 9,
                got: 4
            }
        );
        assert!(matches!(
            decode::<Ping>(b"\x00\x00\x00\x03\xff\xfe\x00", 100),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Ping>(b"\x00\x00\x00\x08{\"n\":-1", 100),
            Err(FrameError::Truncated { .. })
        ));
        assert!(matches!(
            decode::<Ping>(b"\x00\x00\x00\x08{\"n\":-1}", 100),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn error_text_is_bounded() {
        let long = format!("\x00\x00\x01\x00\"{}\"", "a".repeat(254));
        let err = decode::<Ping>(long.as_bytes(), 1000).unwrap_err();
        assert!(err.to_string().len() < 200, "{err}");
    }
}
