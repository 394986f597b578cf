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

#[cfg(test)]
mod tests {
    use super::*;

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
