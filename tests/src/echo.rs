//! A TCP echo server on loopback, the usual stand-in for a VM's SPICE port.
//!
//! Each connection gets back what it sends, until the peer shuts down its write side; then the
//! server shuts down its own write side (half-close is echoed too) and closes.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    active: AtomicU64,
    bytes: AtomicU64,
    half_closed: AtomicU64,
}

/// The running server; dropping it stops the server and its connections.
pub struct EchoServer {
    addr: SocketAddr,
    counters: Arc<Counters>,
    task: JoinHandle<()>,
}

impl EchoServer {
    /// Listens on `127.0.0.1:0`.
    pub async fn start() -> std::io::Result<EchoServer> {
        EchoServer::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    pub async fn start_on(addr: SocketAddr) -> std::io::Result<EchoServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(accept_loop(listener, Arc::clone(&counters)));
        Ok(EchoServer {
            addr,
            counters,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    /// Connections still open.
    pub fn active_connections(&self) -> u64 {
        self.counters.active.load(Ordering::Relaxed)
    }

    /// Bytes echoed so far, over all connections.
    pub fn bytes_echoed(&self) -> u64 {
        self.counters.bytes.load(Ordering::Relaxed)
    }

    /// Connections whose peer shut down its write side (and got a shutdown back).
    pub fn half_closes(&self) -> u64 {
        self.counters.half_closed.load(Ordering::Relaxed)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, counters: Arc<Counters>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    counters.accepted.fetch_add(1, Ordering::Relaxed);
                    connections.spawn(echo(stream, Arc::clone(&counters)));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn echo(mut stream: TcpStream, counters: Arc<Counters>) {
    counters.active.fetch_add(1, Ordering::Relaxed);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => {
                counters.half_closed.fetch_add(1, Ordering::Relaxed);
                let _ = stream.shutdown().await;
                break;
            }
            Ok(n) => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => break,
        }
    }
    counters.active.fetch_sub(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn echoes_and_answers_half_close() {
        let server = EchoServer::start().await.unwrap();
        let mut c = TcpStream::connect(server.addr()).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"hello");
        assert_eq!(server.connections(), 1);
        assert_eq!(server.bytes_echoed(), 5);
        assert_eq!(server.half_closes(), 1);
    }
}
