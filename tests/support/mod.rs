//! The one shared helper for integration tests: the real local control plane
//! (`cluster`) and the real authoritative DNS server (`dns`).
#![allow(dead_code)]

pub mod cluster;
pub mod dns;
pub mod mail;
pub mod operator;
