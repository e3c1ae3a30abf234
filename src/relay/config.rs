//! The relay's configuration: what the operator renders into a relay's
//! config Secret(s) and the relay reads from its mounted directory.
//!
//! The directory holds `relay.json` (one [`RelaySettings`]) and any number of
//! `domains-*.json` shards (each a [`DomainShard`]); the relay merges all
//! shards. Sharding keeps each Secret under the API server's 1 MiB limit
//! however many domains a relay serves. Keys and hashes are secrets: this
//! file is only ever stored in Secrets, and its types never print them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::api::{KeyAlgorithm, RelayLimits, UpstreamTls};

/// File name of the settings in the config directory.
pub const SETTINGS_FILE: &str = "relay.json";
/// Prefix (and `.json` suffix) of the domain shards.
pub const SHARD_PREFIX: &str = "domains-";

/// Relay-wide settings, from the MailRelay spec.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RelaySettings {
    /// The name in the greeting and EHLO.
    pub hostname: String,
    /// Allow AUTH before STARTTLS (only for in-cluster plaintext).
    #[serde(default)]
    pub allow_plaintext_auth: bool,
    pub upstream: UpstreamSettings,
    pub limits: RelayLimits,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSettings {
    pub host: String,
    pub port: u16,
    pub tls: UpstreamTls,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<UpstreamAuth>,
    /// PEM CA certificates that sign the upstream's certificate; when set,
    /// only they are trusted (the relay talks to this one server). Without
    /// them, the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
}

/// Credentials for the upstream, copied from the MailRelay's auth Secret.
#[derive(Serialize, Deserialize, Clone, PartialEq)]
pub struct UpstreamAuth {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAuth")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// One shard of tenants and domains.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DomainShard {
    #[serde(default)]
    pub tenants: Vec<TenantEntry>,
    #[serde(default)]
    pub domains: Vec<DomainEntry>,
}

/// A tenant's SMTP credential and the domains it may send as.
#[derive(Serialize, Deserialize, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TenantEntry {
    /// The SMTP AUTH username.
    pub username: String,
    /// `sha256$<salt, base64>$<SHA-256(salt || password), base64>`. The
    /// password is 32 random bytes the operator generated, so a fast hash
    /// is enough; the relay never sees the password at rest.
    pub password_hash: String,
    /// Domains (exact) this tenant may use in MAIL FROM and header From.
    pub domains: Vec<String>,
}

impl fmt::Debug for TenantEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TenantEntry")
            .field("username", &self.username)
            .field("domains", &self.domains)
            .finish_non_exhaustive()
    }
}

/// A domain the relay signs for: only domains whose active selector is
/// verified and that are not in conflict are ever rendered.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DomainEntry {
    pub domain: String,
    /// Messages per minute (the relay default, or lower per MailDomain).
    pub messages_per_minute: u32,
    /// The Active key(s): one, or two for `Dual`.
    pub signing_keys: Vec<SigningKeyEntry>,
    /// The custom MAIL FROM domain, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub return_path: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SigningKeyEntry {
    pub selector: String,
    pub algorithm: KeyAlgorithm,
    /// PKCS#8 PEM.
    pub private_key_pem: String,
}

impl fmt::Debug for SigningKeyEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeyEntry")
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}
