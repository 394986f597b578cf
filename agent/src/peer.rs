//! Who owns the other end of a loopback TCP connection (Linux).
//!
//! The local CONNECT proxy listens on 127.0.0.1, which every local user can reach. Before it
//! carries a byte it finds the peer socket in `/proc/net/tcp` (the entry whose local address is
//! the peer's and whose remote address is ours) and compares that socket's owner with its own
//! uid: another user on the same laptop cannot ride the session.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The owner uid of the socket `local -> remote` in a `/proc/net/tcp{,6}` table.
pub fn socket_owner(table: &str, local: SocketAddr, remote: SocketAddr) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (l, r, uid) = (f.get(1)?, f.get(2)?, f.get(7)?);
        (parse_addr(l)? == local && parse_addr(r)? == remote)
            .then(|| uid.parse().ok())
            .flatten()
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits + port (IPv6), as the kernel prints them: each 32-bit
/// word of the address in host byte order, the port as a number.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Finds the owner of the peer socket of an accepted connection (`peer` connected to `ours`).
pub fn peer_uid(peer: SocketAddr, ours: SocketAddr) -> std::io::Result<Option<u32>> {
    let files: &[&str] = if peer.is_ipv4() {
        &["/proc/net/tcp", "/proc/net/tcp6"]
    } else {
        &["/proc/net/tcp6"]
    };
    for f in files {
        let table = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        if let Some(uid) = socket_owner(&table, peer, ours) {
            return Ok(Some(uid));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded from /proc/net/tcp on x86_64: a listener on 127.0.0.1:40000 (uid 1000), the
    // client socket 127.0.0.1:51234 -> 40000 (uid 65534) and the accepted socket (uid 1000).
    const TABLE: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:9C40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:C822 0100007F:9C40 01 00000000:00000000 00:00000000 00000000 65534        0 31338 1 0000000000000000 20 4 30 10 -1
   2: 0100007F:9C40 0100007F:C822 01 00000000:00000000 00:00000000 00000000  1000        0 31339 1 0000000000000000 20 4 30 10 -1
";

    #[test]
    #[cfg(target_endian = "little")]
    fn finds_the_peer_socket_owner() {
        let listener: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let client: SocketAddr = "127.0.0.1:51234".parse().unwrap();
        assert_eq!(socket_owner(TABLE, client, listener), Some(65534));
        assert_eq!(socket_owner(TABLE, listener, client), Some(1000));
        let other: SocketAddr = "127.0.0.1:51235".parse().unwrap();
        assert_eq!(socket_owner(TABLE, other, listener), None);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn parses_ipv6_and_refuses_garbage() {
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0016"),
            Some("[::1]:22".parse().unwrap())
        );
        assert_eq!(parse_addr("zz:1"), None);
        assert_eq!(parse_addr("0100007F"), None);
        assert_eq!(
            socket_owner(
                "header only\n",
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ),
            None
        );
        assert_eq!(
            socket_owner(
                "h\n 0: short\n",
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap()
            ),
            None
        );
    }

    #[test]
    fn finds_a_real_connection_of_this_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(ours).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        let me = zerospice_ca::fsutil::current_uid().unwrap();
        assert_eq!(peer_uid(peer, ours).unwrap(), Some(me));
    }
}
