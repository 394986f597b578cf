//! UDP sockets for the QUIC endpoints, with buffers large enough for bulk SPICE traffic.
//!
//! quinn does not raise socket buffers, and Linux's default (208 KiB, `net.core.rmem_max`) drops
//! datagrams under load even on loopback. We ask for [`WANT_BUFFER`]; as root (or with
//! CAP_NET_ADMIN) the `*BUFFORCE` options get it regardless of `rmem_max`, otherwise the kernel
//! caps the request and [`UdpBuffers::is_short`] tells the caller to warn.
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;

/// Buffer size requested for each direction.
pub const WANT_BUFFER: usize = 4 * 1024 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpBuffers {
    pub requested: usize,
    /// What the kernel granted (Linux reports twice the usable size).
    pub recv: usize,
    pub send: usize,
}

impl UdpBuffers {
    /// Whether the kernel granted less than half the request (Linux reports a doubled value).
    pub fn is_short(&self) -> bool {
        self.recv < self.requested || self.send < self.requested
    }
}

/// Binds a non-blocking UDP socket at `addr` with large buffers.
pub fn bind(addr: SocketAddr, want: usize) -> io::Result<(std::net::UdpSocket, UdpBuffers)> {
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Leave dual-stack as the system configures it; only an explicit v6 address is bound.
        let _ = sock.set_only_v6(!addr.ip().is_unspecified());
    }
    let want_i = i32::try_from(want).unwrap_or(i32::MAX);
    if sock.set_recv_buffer_size(want).is_err() || sock.recv_buffer_size()? < want {
        let _ = nix::sys::socket::setsockopt(
            &sock.as_fd(),
            nix::sys::socket::sockopt::RcvBufForce,
            &(want_i as usize),
        );
    }
    if sock.set_send_buffer_size(want).is_err() || sock.send_buffer_size()? < want {
        let _ = nix::sys::socket::setsockopt(
            &sock.as_fd(),
            nix::sys::socket::sockopt::SndBufForce,
            &(want_i as usize),
        );
    }
    sock.bind(&addr.into())?;
    sock.set_nonblocking(true)?;
    let buffers = UdpBuffers {
        requested: want,
        recv: sock.recv_buffer_size()?,
        send: sock.send_buffer_size()?,
    };
    Ok((sock.into(), buffers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_loopback_with_buffers() {
        let (s, b) = bind("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        assert!(s.local_addr().unwrap().port() != 0);
        assert!(b.recv > 0 && b.send > 0);
        // As root (CI), the forced size is granted.
        if crate::udp::tests::is_root() {
            assert!(!b.is_short(), "{b:?}");
        }
    }

    pub(crate) fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .map(|s| {
                s.lines()
                    .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
    }
}
