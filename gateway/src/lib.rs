//! The ZeroSpice gateway.
//!
//! Decisions are pure code that takes `now` (the TOTP guard in [`totp`], the enrollment decision
//! in [`enrollment`]); IO lives at the edges (SQLite in [`store`], QUIC in [`server`]).
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod access;
pub mod admin;
pub mod audit;
pub mod check;
pub mod config;
pub mod enrollment;
pub mod paths;
pub mod policy;
pub mod proxmox;
pub mod server;
pub mod service;
pub mod sessions;
pub mod store;
pub mod totp;
pub mod tunnel;
