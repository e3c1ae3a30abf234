//! The one shared helper for integration tests: the real local control plane
//! (`cluster`), the real authoritative DNS server (`dns`), mail peers
//! (`mail`) and a real Postfix smarthost (`postfix`).
#![allow(dead_code)]

pub mod cluster;
pub mod dns;
pub mod mail;
pub mod operator;
pub mod postfix;
