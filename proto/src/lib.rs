//! The ZeroSpice wire protocol, owned in one place.
//!
//! Every message, ALPN string, version, frame limit and error code that crosses the network lives
//! here. The crate performs no IO (the optional `tokio` feature adds two thin async helpers over
//! the pure codec), so everything is unit-tested against literal bytes and JSON.
//!
//! Two QUIC endpoints speak it:
//! - **enrollment** (ALPN [`ALPN_ENROLL`]): no client certificate; one bidirectional stream
//!   carries `Begin` -> `Challenge` -> `Request` -> `Issued | Error`.
//! - **access** (ALPN [`ALPN_ACCESS`]): mutual TLS; every bidirectional stream starts with one
//!   [`access::Request`] frame and gets one [`access::Response`] frame. A `Tunnel` request that is
//!   answered `TunnelReady` turns the stream into a raw byte pipe for one SPICE channel.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod access;
pub mod b64;
pub mod connect;
pub mod enroll;
pub mod error;
pub mod frame;
pub mod invite;
pub mod secret;
pub mod types;
#[cfg(feature = "net")]
pub mod udp;

#[cfg(feature = "tokio")]
pub mod io;

pub use error::{ErrorCode, WireError};
pub use secret::Redacted;
pub use types::{SessionId, VmId};

/// ALPN of the enrollment endpoint (no client certificate required).
pub const ALPN_ENROLL: &[u8] = b"zerospice-enroll/1";
/// ALPN of the access endpoint (client certificate required).
pub const ALPN_ACCESS: &[u8] = b"zerospice/1";
/// The TLS server name every client verifies in the gateway's certificate. The gateway's address
/// (a ZeroTier IP) is not in its certificate: the pinned ZeroSpice CA is what identifies it.
pub const GATEWAY_SERVER_NAME: &str = "gateway.zerospice.invalid";
/// Protocol version carried in the enrollment `Begin` message.
pub const PROTOCOL_VERSION: u32 = 1;
/// Default UDP port of the access endpoint.
pub const DEFAULT_ACCESS_PORT: u16 = 7443;
/// Default UDP port of the enrollment endpoint.
pub const DEFAULT_ENROLL_PORT: u16 = 7444;
