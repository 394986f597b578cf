#![forbid(unsafe_code)]

pub mod echo;
pub mod harness;
pub mod lab;
pub mod pve;
pub mod spice;
