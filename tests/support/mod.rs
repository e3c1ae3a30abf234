//! The one shared helper for integration tests: the real local control plane
//! (`cluster`), the real authoritative DNS server (`dns`), the real mail
//! peers (`mail`), the operator in-process (`operator`), `/metrics` read as
//! values (`metrics`) and the one way to wait for a condition (`wait`).
#![allow(dead_code)]

pub mod cluster;
pub mod dns;
pub mod mail;
pub mod metrics;
pub mod operator;
pub mod wait;
