//! ZeroSpice enrollment: turn an invitation and a TOTP code into a client profile.
//!
//! [`core::enroll`] is the whole flow, reporting [`core::Progress`] so a GUI can draw it;
//! [`core::KeySource`] is where a hardware key plugs in; [`profile`] is what an enrolled device
//! keeps and what the agent loads; [`tls`] holds the QUIC/TLS client configurations shared with
//! the agent.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod core;
pub mod hardware;
pub mod profile;
pub mod tls;

pub use crate::core::{
    enroll, EnrollError, EnrollOptions, Enrolled, KeySource, Progress, SoftwareKeySource,
};
