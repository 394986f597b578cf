#![forbid(unsafe_code)]

pub mod echo;
pub mod pve;
