//! The one shared helper for integration tests: the real local control plane
//! (`cluster`) and a fault-injecting proxy in front of it
//! (`apiserver_proxy`), the real authoritative DNS server (`dns`), the real
//! mail peers (`mail`), a real Postfix smarthost (`postfix`), the operator
//! in-process (`operator`), a real node for pods (`node`), `/metrics` read
//! as values (`metrics`) and the one way to wait for a condition (`wait`).
#![allow(dead_code)]

pub mod apiserver_proxy;
pub mod cluster;
pub mod dns;
pub mod mail;
pub mod metrics;
pub mod node;
pub mod operator;
pub mod postfix;
pub mod wait;
