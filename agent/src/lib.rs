//! The ZeroSpice agent core, shared by the CLI and the tray agent.
//!
//! - [`client`]: the mutual-TLS QUIC connection to the gateway and its requests;
//! - [`proxy`]: the local HTTP CONNECT proxy on 127.0.0.1 that remote-viewer uses, one QUIC
//!   stream per SPICE channel, refusing other local users ([`peer`]) and other targets;
//! - [`vv`] and [`viewer`]: the remote-viewer file, handed over on standard input only;
//! - [`renew`]: certificate renewal before expiry.
//!
//! Nothing here writes the SPICE password to disk or listens beyond 127.0.0.1.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod error;
pub mod peer;
pub mod proxy;
pub mod renew;
pub mod viewer;
pub mod vv;

pub use client::{Client, Credentials};
pub use error::AgentError;
