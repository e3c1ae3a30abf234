//! mailauth-operator: DKIM keys, verified DNS records and a signing relay for
//! every client domain a Kubernetes platform hosts.

pub mod api;
pub mod cli;
pub mod controller;
