//! mailauth-operator: DKIM keys, verified DNS records and a signing relay for
//! every client domain a Kubernetes platform hosts.
//!
//! The domain logic lives in pure modules (`dkim`, `dns`) that know nothing
//! of the cluster; `controller` and `cli` are thin shells around them.

pub mod admin;
pub mod api;
pub mod cli;
pub mod controller;
pub mod dkim;
pub mod dns;
pub mod feedback;
pub mod relay;
pub mod telemetry;
