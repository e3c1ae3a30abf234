//! The relay's configuration: what the operator renders into a relay's
//! config Secret(s) and the relay reads from its mounted directory.
//!
//! The config is `relay.json` (one [`RelaySettings`]) and any number of
//! `domains-*.json` shards (each a [`DomainShard`]); the relay merges all
//! shards. In a cluster they are the data of the relay's config Secrets in
//! its own namespace, which the relay watches (see `docs/relay-config.md`):
//! the settings in [`settings_secret_name`], each shard in its own Secret
//! ([`shard_secret_name`]), a domain always in the shard of its
//! [`shard_of`] bucket, so a change rewrites one small Secret and every
//! Secret stays far under the API server's 1 MiB limit. Outside a cluster
//! they are files of one directory. Keys and hashes are secrets: this config
//! is only ever stored in Secrets, and its types never print them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::api::{KeyAlgorithm, RelayLimits, UpstreamTls};

/// File name of the settings in the config directory.
pub const SETTINGS_FILE: &str = "relay.json";
/// Prefix (and `.json` suffix) of the domain shards.
pub const SHARD_PREFIX: &str = "domains-";

/// The label on every config Secret of a relay: its value is the MailRelay's
/// name. The relay watches the Secrets of its namespace with this label.
pub const RELAY_CONFIG_LABEL: &str = "mailauth.dev/relay-config";

/// The label on a relay's shard Secret: its bucket, two hex digits.
pub const RELAY_CONFIG_SHARD_LABEL: &str = "mailauth.dev/relay-config-shard";

/// How many shard buckets a relay's domains are spread over. 256 Secrets of
/// at most ~900 KiB hold about 90,000 RSA-4096 domains.
pub const SHARD_BUCKETS: usize = 256;

/// The Secret holding a relay's `relay.json`.
pub fn settings_secret_name(relay: &str) -> String {
    format!("{relay}-relay-config")
}

/// The Secret holding one shard bucket of a relay's domains.
pub fn shard_secret_name(relay: &str, bucket: u8) -> String {
    format!("{relay}-relay-config-{bucket:02x}")
}

/// The data key (or file name) of a shard bucket.
pub fn shard_file_name(bucket: u8) -> String {
    format!("{SHARD_PREFIX}{bucket:02x}.json")
}

/// The bucket a domain lives in: the first byte of the SHA-256 of its name,
/// so it never moves between shards and a shard holds about 1/256 of them.
pub fn shard_of(domain: &str) -> u8 {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, domain.as_bytes()).as_ref()[0]
}

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
    /// The custom MAIL FROM domain, when set, relative to `domain`
    /// (`bounce` for `bounce.acme.example`), as `spec.returnPath` says it.
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
