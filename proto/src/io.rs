//! Async framing over tokio streams: the only IO in this crate, kept to a thin wrapper.
use crate::frame::{self, FrameError, HEADER_LEN};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum IoFrameError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("stream closed before a complete frame")]
    Closed,
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one frame, checking its announced length against `max` before reading the body.
pub async fn read_frame<T, R>(r: &mut R, max: usize) -> Result<T, IoFrameError>
where
    T: DeserializeOwned,
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; HEADER_LEN];
    read_exact(r, &mut header).await?;
    let len = frame::body_len(header, max)?;
    let mut body = vec![0u8; len];
    read_exact(r, &mut body).await?;
    Ok(frame::decode_body(&body)?)
}

/// Writes one frame.
pub async fn write_frame<T, W>(w: &mut W, msg: &T, max: usize) -> Result<(), IoFrameError>
where
    T: Serialize,
    W: AsyncWrite + Unpin,
{
    let bytes = frame::encode(msg, max)?;
    w.write_all(&bytes).await?;
    Ok(())
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), IoFrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(IoFrameError::Closed),
        Err(e) => Err(IoFrameError::Io(e)),
    }
}

/// Bytes each way, and the error that ended the relay early, if any.
#[derive(Debug)]
pub struct RelayOutcome {
    pub a_to_b: u64,
    pub b_to_a: u64,
    pub error: Option<std::io::Error>,
}

/// Buffer size of each relay direction (one buffer per direction, reused for every read).
pub const RELAY_BUFFER: usize = 256 * 1024;

/// Copies `a -> b` and `b -> a` until both directions end. When one side's read ends, the other
/// side's write is shut down (half-close: a QUIC FIN, a TCP FIN). The first error ends both
/// directions. One buffer per direction, allocated once.
pub async fn relay<AR, AW, BR, BW>(ar: AR, aw: AW, br: BR, bw: BW) -> RelayOutcome
where
    AR: AsyncRead + Unpin,
    AW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let mut a_to_b = 0u64;
    let mut b_to_a = 0u64;
    let result = tokio::try_join!(pump(ar, bw, &mut a_to_b), pump(br, aw, &mut b_to_a));
    RelayOutcome {
        a_to_b,
        b_to_a,
        error: result.err(),
    }
}

async fn pump<R, W>(mut r: R, mut w: W, count: &mut u64) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn relay_copies_both_ways_with_half_close() {
        // client <-> (c1|c2) relay (s1|s2) <-> server
        let (client, c2) = tokio::io::duplex(64 * 1024);
        let (s1, server) = tokio::io::duplex(64 * 1024);
        let (c2r, c2w) = tokio::io::split(c2);
        let (s1r, s1w) = tokio::io::split(s1);
        let relay_task = tokio::spawn(relay(c2r, c2w, s1r, s1w));
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        let up: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let up2 = up.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&up2).await.unwrap();
            cw.shutdown().await.unwrap();
        });
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, up, "client -> server, then EOF (half-close)");
        // The other direction still works after the first one closed.
        sw.write_all(b"reply").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply");
        writer.await.unwrap();
        let out = relay_task.await.unwrap();
        assert_eq!((out.a_to_b, out.b_to_a), (1_000_000, 5));
        assert!(out.error.is_none());
    }

    #[tokio::test]
    async fn round_trip_and_limits() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        write_frame(&mut a, &vec![1u8, 2, 3], 100).await.unwrap();
        let got: Vec<u8> = read_frame(&mut b, 100).await.unwrap();
        assert_eq!(got, vec![1, 2, 3]);

        a.write_all(&[0xff, 0xff, 0xff, 0xff]).await.unwrap();
        let err = read_frame::<Vec<u8>, _>(&mut b, 100).await.unwrap_err();
        assert!(matches!(
            err,
            IoFrameError::Frame(FrameError::TooLarge { .. })
        ));

        a.write_all(&[0, 0, 0, 10, b'[']).await.unwrap();
        drop(a);
        let err = read_frame::<Vec<u8>, _>(&mut b, 100).await.unwrap_err();
        assert!(matches!(err, IoFrameError::Closed), "{err}");
    }
}
