//! The signing relay: SMTP submission, tenant AUTH, sender policy, DKIM signing, forwarding.

pub mod config;
