//! The relay's in-memory view of its config: tenants by username, domains by
//! name with parsed signing keys. Built once per config change and then
//! shared read-only by every session (see [`super::reload`]).
//!
//! The config arrives as named parts (files of a config directory, or data
//! keys of the relay's config Secrets): one settings part and any number of
//! domain shards. Loading is strict about the settings (without them the
//! relay cannot work, so a bad settings part keeps the previous config) and
//! lenient about entries: a bad domain or tenant entry is left out *alone*,
//! reported as a [`Rejection`], and every other entry is served. One
//! tenant's broken key must never stop the relay serving everyone else.
//!
//! [`validate_domain`] and [`validate_tenant`] are the checks the relay loads
//! entries with; the operator runs the same functions before it renders an
//! entry, so what it renders is exactly what the relay will take.
//!
//! Nothing here ever echoes a config value in an error: values hold private
//! keys and password hashes (serde's "invalid type: string ..." would quote
//! them), so errors name where and what kind, never what.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::RelayError;
use super::auth::PasswordHash;
use super::config::{DomainEntry, RelaySettings, SETTINGS_FILE, SHARD_PREFIX, TenantEntry};
use super::policy::Grant;
use super::signing::DomainSigner;
use crate::dkim::{KeyError, PrivateKeyPem};

/// A tenant as the relay sees it: how to check its password and what it
/// may send as.
#[derive(Debug)]
pub struct Tenant {
    pub username: String,
    password_hash: PasswordHash,
    pub grant: Grant,
}

impl Tenant {
    pub fn password_matches(&self, password: &[u8]) -> bool {
        self.password_hash.matches(password)
    }

    /// The stored credential: a session compares it with the one it logged
    /// in with, so a re-issued password ends sessions opened with the old.
    pub fn credential(&self) -> &PasswordHash {
        &self.password_hash
    }
}

/// A domain the relay signs for.
#[derive(Debug)]
pub struct SigningDomain {
    pub domain: String,
    pub messages_per_minute: u32,
    pub signers: Vec<DomainSigner>,
    /// The full return-path (MAIL FROM) domain, when one is configured.
    pub return_path: Option<String>,
}

/// One consistent config: what a session uses from start to end.
#[derive(Debug)]
pub struct RelaySnapshot {
    pub settings: RelaySettings,
    tenants: HashMap<String, Tenant>,
    domains: HashMap<String, Arc<SigningDomain>>,
}

impl RelaySnapshot {
    pub fn tenant(&self, username: &str) -> Option<&Tenant> {
        self.tenants.get(username)
    }

    pub fn domain(&self, domain: &str) -> Option<&SigningDomain> {
        self.domains.get(domain).map(Arc::as_ref)
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }

    pub fn tenant_count(&self) -> usize {
        self.tenants.len()
    }
}

/// Why one entry of the config is not served. Never carries a value of the
/// entry, only where it is and what kind of problem it has.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EntryProblem {
    #[error("the entry does not match the config schema ({0})")]
    Malformed(JsonProblem),
    #[error("the domain has no signing key")]
    NoSigningKey,
    #[error("the domain name is empty or not lowercase")]
    BadDomainName,
    /// `problem` is the key error's text, which never quotes the key.
    #[error("signing key {selector} cannot be used: {problem}")]
    SigningKey { selector: String, problem: String },
    #[error("the password hash is malformed")]
    PasswordHash,
    #[error("the domain appears more than once in the config")]
    DuplicateDomain,
    #[error("the tenant appears more than once in the config")]
    DuplicateTenant,
    #[error("the shard cannot be read ({0})")]
    UnreadableShard(JsonProblem),
}

impl EntryProblem {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_entry",
            Self::NoSigningKey => "no_signing_key",
            Self::BadDomainName => "bad_domain_name",
            Self::SigningKey { .. } => "bad_signing_key",
            Self::PasswordHash => "bad_password_hash",
            Self::DuplicateDomain => "duplicate_domain",
            Self::DuplicateTenant => "duplicate_tenant",
            Self::UnreadableShard(_) => "unreadable_shard",
        }
    }
}

/// Where a JSON document went wrong, without quoting it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonProblem {
    kind: &'static str,
    line: usize,
    column: usize,
}

impl JsonProblem {
    pub fn of(error: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        Self {
            kind: match error.classify() {
                Category::Io => "unreadable",
                Category::Syntax => "not valid JSON",
                Category::Data => "a missing field or a value of the wrong type",
                Category::Eof => "cut short",
            },
            line: error.line(),
            column: error.column(),
        }
    }
}

impl fmt::Display for JsonProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            f.write_str(self.kind)
        } else {
            write!(
                f,
                "{} at line {} column {}",
                self.kind, self.line, self.column
            )
        }
    }
}

/// An entry left out of the snapshot.
#[derive(Debug)]
pub struct Rejection {
    /// The part it came from (a file or `secret/key` name).
    pub part: String,
    /// The domain or username, or `entry N` when the entry is unreadable.
    pub subject: String,
    pub problem: EntryProblem,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} in {}: {}", self.subject, self.part, self.problem)
    }
}

/// Checks a domain entry exactly as the relay loads it, and parses its keys.
/// The operator calls this before rendering an entry.
pub fn validate_domain(entry: &DomainEntry) -> Result<SigningDomain, EntryProblem> {
    let name = &entry.domain;
    if name.is_empty() || name.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err(EntryProblem::BadDomainName);
    }
    if entry.signing_keys.is_empty() {
        return Err(EntryProblem::NoSigningKey);
    }
    let signers = entry
        .signing_keys
        .iter()
        .map(|key| {
            let pem = PrivateKeyPem::new(key.private_key_pem.clone());
            DomainSigner::new(name, &key.selector, key.algorithm, &pem).map_err(
                |error: KeyError| EntryProblem::SigningKey {
                    selector: key.selector.clone(),
                    problem: error.to_string(),
                },
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SigningDomain {
        domain: name.clone(),
        messages_per_minute: entry.messages_per_minute,
        signers,
        return_path: entry
            .return_path
            .as_ref()
            .map(|sub| format!("{}.{name}", sub.to_ascii_lowercase())),
    })
}

/// Checks a tenant entry exactly as the relay loads it.
pub fn validate_tenant(entry: &TenantEntry) -> Result<PasswordHash, EntryProblem> {
    PasswordHash::parse(&entry.password_hash).map_err(|_| EntryProblem::PasswordHash)
}

/// One named part of the config.
#[derive(Clone)]
pub struct ConfigPart {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl fmt::Debug for ConfigPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigPart")
            .field("name", &self.name)
            .field("bytes", &self.bytes.len())
            .finish()
    }
}

/// The config as it arrived: the settings and the shards.
#[derive(Debug, Default)]
pub struct ConfigParts {
    pub settings: Option<ConfigPart>,
    pub shards: Vec<ConfigPart>,
}

/// A shard as loaded: the valid entries, parsed, and what was left out.
#[derive(Debug, Default)]
struct ParsedShard {
    domains: Vec<Arc<SigningDomain>>,
    tenants: Vec<(TenantEntry, PasswordHash)>,
    rejected: Vec<(String, EntryProblem)>,
}

/// The raw shape of a shard: entries are parsed one by one, so one entry of
/// the wrong shape is left out alone.
#[derive(Deserialize)]
struct RawShard {
    #[serde(default)]
    tenants: Vec<serde_json::Value>,
    #[serde(default)]
    domains: Vec<serde_json::Value>,
}

fn parse_shard(bytes: &[u8]) -> ParsedShard {
    let raw: RawShard = match serde_json::from_slice(bytes) {
        Ok(raw) => raw,
        Err(error) => {
            return ParsedShard {
                rejected: vec![(
                    "the whole shard".into(),
                    EntryProblem::UnreadableShard(JsonProblem::of(&error)),
                )],
                ..ParsedShard::default()
            };
        }
    };
    let mut shard = ParsedShard::default();
    for (index, value) in raw.domains.into_iter().enumerate() {
        let subject = entry_subject(&value, "domain", index);
        match serde_json::from_value::<DomainEntry>(value) {
            Ok(entry) => match validate_domain(&entry) {
                Ok(domain) => shard.domains.push(Arc::new(domain)),
                Err(problem) => shard.rejected.push((subject, problem)),
            },
            Err(error) => shard
                .rejected
                .push((subject, EntryProblem::Malformed(JsonProblem::of(&error)))),
        }
    }
    for (index, value) in raw.tenants.into_iter().enumerate() {
        let subject = entry_subject(&value, "username", index);
        match serde_json::from_value::<TenantEntry>(value) {
            Ok(entry) => match validate_tenant(&entry) {
                Ok(hash) => shard.tenants.push((entry, hash)),
                Err(problem) => shard.rejected.push((subject, problem)),
            },
            Err(error) => shard
                .rejected
                .push((subject, EntryProblem::Malformed(JsonProblem::of(&error)))),
        }
    }
    shard
}

/// The name an entry is reported by: its domain or username when that field
/// is a plain, printable string; otherwise its position.
fn entry_subject(value: &serde_json::Value, field: &str, index: usize) -> String {
    value
        .get(field)
        .and_then(serde_json::Value::as_str)
        .filter(|name| {
            !name.is_empty()
                && name.len() <= 320
                && name
                    .bytes()
                    .all(|b| b.is_ascii_graphic() && !b"\"\\".contains(&b))
        })
        .map_or_else(|| format!("entry {index}"), str::to_string)
}

/// Parsed shards by part name, reused while a part's bytes do not change, so
/// a change to one shard re-parses (and re-checks the keys of) that shard
/// alone.
#[derive(Default)]
pub struct ShardCache {
    parsed: HashMap<String, (aws_lc_rs::digest::Digest, Arc<ParsedShard>)>,
}

impl fmt::Debug for ShardCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShardCache")
            .field("shards", &self.parsed.len())
            .finish()
    }
}

impl ShardCache {
    fn get_or_parse(&mut self, part: &ConfigPart) -> Arc<ParsedShard> {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &part.bytes);
        if let Some((known, shard)) = self.parsed.get(&part.name)
            && known.as_ref() == digest.as_ref()
        {
            return shard.clone();
        }
        let shard = Arc::new(parse_shard(&part.bytes));
        self.parsed
            .insert(part.name.clone(), (digest, shard.clone()));
        shard
    }

    fn retain_parts(&mut self, parts: &[ConfigPart]) {
        self.parsed
            .retain(|name, _| parts.iter().any(|part| &part.name == name));
    }
}

/// A snapshot of exactly these settings and shards, for unit tests of what
/// uses one. Panics when an entry would be left out.
#[cfg(test)]
pub fn for_test(settings: &RelaySettings, shards: &[super::config::DomainShard]) -> RelaySnapshot {
    let parts = ConfigParts {
        settings: Some(ConfigPart {
            name: SETTINGS_FILE.into(),
            bytes: serde_json::to_vec(settings).unwrap(),
        }),
        shards: shards
            .iter()
            .enumerate()
            .map(|(i, shard)| ConfigPart {
                name: format!("{SHARD_PREFIX}{i}.json"),
                bytes: serde_json::to_vec(shard).unwrap(),
            })
            .collect(),
    };
    let loaded = build(&parts, &mut ShardCache::default()).unwrap();
    assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
    loaded.snapshot
}

/// A snapshot and what it left out.
#[derive(Debug)]
pub struct Loaded {
    pub snapshot: RelaySnapshot,
    pub rejected: Vec<Rejection>,
}

/// Builds a snapshot from the parts. Fails only when the settings are
/// missing or unusable (the caller keeps its previous snapshot); bad
/// entries are left out and reported.
pub fn build(parts: &ConfigParts, cache: &mut ShardCache) -> Result<Loaded, RelayError> {
    let settings_part = parts.settings.as_ref().ok_or(RelayError::NoSettings)?;
    let settings: RelaySettings =
        serde_json::from_slice(&settings_part.bytes).map_err(|error| RelayError::ConfigParse {
            part: settings_part.name.clone(),
            problem: JsonProblem::of(&error),
        })?;
    if let Some(pem) = &settings.upstream.ca_certificates {
        super::upstream::trusting(pem).map_err(RelayError::UpstreamCa)?;
    }
    cache.retain_parts(&parts.shards);
    let shards: Vec<(&str, Arc<ParsedShard>)> = parts
        .shards
        .iter()
        .map(|part| (part.name.as_str(), cache.get_or_parse(part)))
        .collect();
    Ok(merge(settings, &shards))
}

/// Merges parsed shards. A domain or username that appears twice is a
/// config the operator never renders: both copies are left out rather than
/// guessing which one is meant.
fn merge(settings: RelaySettings, shards: &[(&str, Arc<ParsedShard>)]) -> Loaded {
    let mut rejected = Vec::new();
    let mut domains: HashMap<String, Arc<SigningDomain>> = HashMap::new();
    let mut duplicate_domains = Vec::new();
    let mut tenant_entries: HashMap<&str, (&str, &TenantEntry, &PasswordHash)> = HashMap::new();
    let mut duplicate_tenants = Vec::new();
    for (part, shard) in shards {
        for (subject, problem) in &shard.rejected {
            rejected.push(Rejection {
                part: part.to_string(),
                subject: subject.clone(),
                problem: problem.clone(),
            });
        }
        for domain in &shard.domains {
            if domains
                .insert(domain.domain.clone(), domain.clone())
                .is_some()
            {
                duplicate_domains.push((part.to_string(), domain.domain.clone()));
            }
        }
        for (entry, hash) in &shard.tenants {
            if tenant_entries
                .insert(entry.username.as_str(), (part, entry, hash))
                .is_some()
            {
                duplicate_tenants.push((part.to_string(), entry.username.clone()));
            }
        }
    }
    for (part, domain) in duplicate_domains {
        domains.remove(&domain);
        rejected.push(Rejection {
            part,
            subject: domain,
            problem: EntryProblem::DuplicateDomain,
        });
    }
    for (part, username) in &duplicate_tenants {
        tenant_entries.remove(username.as_str());
        rejected.push(Rejection {
            part: part.clone(),
            subject: username.clone(),
            problem: EntryProblem::DuplicateTenant,
        });
    }
    let tenants = tenant_entries
        .into_values()
        .map(|(_, entry, hash)| {
            let mut grant = Grant::default();
            for name in &entry.domains {
                // Domains that are not served (unverified, in conflict,
                // rejected above) are simply not granted.
                if let Some(domain) = domains.get(&name.to_ascii_lowercase()) {
                    grant.allow(&domain.domain, domain.return_path.as_deref());
                }
            }
            let tenant = Tenant {
                username: entry.username.clone(),
                password_hash: hash.clone(),
                grant,
            };
            (entry.username.clone(), tenant)
        })
        .collect();
    Loaded {
        snapshot: RelaySnapshot {
            settings,
            tenants,
            domains,
        },
        rejected,
    }
}

/// The parts of a config directory: `relay.json` and the `domains-*.json`
/// shards by name. Hidden entries (kubelet's `..data` and timestamped
/// directories) are skipped.
fn dir_part_paths(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>), RelayError> {
    let read_dir = std::fs::read_dir(dir).map_err(|source| RelayError::ConfigRead {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut shards = Vec::new();
    for entry in read_dir {
        let entry = entry.map_err(|source| RelayError::ConfigRead {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(SHARD_PREFIX) && name.ends_with(".json") {
            shards.push(entry.path());
        }
    }
    shards.sort();
    Ok((dir.join(SETTINGS_FILE), shards))
}

fn read_part(path: &Path) -> Result<ConfigPart, RelayError> {
    let bytes = std::fs::read(path).map_err(|source| RelayError::ConfigRead {
        path: path.to_path_buf(),
        source,
    })?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    );
    Ok(ConfigPart { name, bytes })
}

/// Reads a config directory's parts. Blocking: run it off the async runtime.
pub fn read_dir(dir: &Path) -> Result<ConfigParts, RelayError> {
    let (settings_path, shard_paths) = dir_part_paths(dir)?;
    Ok(ConfigParts {
        settings: Some(read_part(&settings_path)?),
        shards: shard_paths
            .iter()
            .map(|path| read_part(path))
            .collect::<Result<_, _>>()?,
    })
}

/// Reads and builds a config directory at once (start-up, tests).
pub fn load_dir(dir: &Path) -> Result<Loaded, RelayError> {
    build(&read_dir(dir)?, &mut ShardCache::default())
}

/// A cheap fingerprint of the config directory: file names, sizes and
/// modification times (following symlinks), plus where kubelet's `..data`
/// link points. Kubelet writes every update into a new directory and swaps
/// `..data` atomically, so any update changes it.
pub fn fingerprint(dir: &Path) -> Result<String, RelayError> {
    let (settings_path, shard_paths) = dir_part_paths(dir)?;
    let mut text = std::fs::read_link(dir.join("..data"))
        .map(|target| target.display().to_string())
        .unwrap_or_default();
    for path in std::iter::once(&settings_path).chain(&shard_paths) {
        let metadata = std::fs::metadata(path).map_err(|source| RelayError::ConfigRead {
            path: path.clone(),
            source,
        })?;
        let modified = metadata
            .modified()
            .ok()
            .and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |since| since.as_nanos());
        text.push_str(&format!(
            "|{}:{}:{modified}",
            path.display(),
            metadata.len()
        ));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyAlgorithm, RelayLimits, UpstreamTls};
    use crate::dkim::{NewKey, generate};
    use crate::relay::auth::hash_password;
    use crate::relay::config::{DomainShard, SigningKeyEntry, UpstreamSettings};
    use crate::relay::message::header_section;
    use crate::relay::path::parse_reverse_path;
    use crate::relay::policy::{check_envelope_sender, check_header_sender};

    fn settings() -> RelaySettings {
        RelaySettings {
            hostname: "relay.test".into(),
            allow_plaintext_auth: false,
            upstream: UpstreamSettings {
                host: "127.0.0.1".into(),
                port: 25,
                tls: UpstreamTls::None,
                auth: None,
                ca_certificates: None,
            },
            limits: RelayLimits::default(),
        }
    }

    fn domain(name: &str, return_path: Option<&str>) -> DomainEntry {
        let key = generate(&NewKey {
            selector: "s1".into(),
            algorithm: KeyAlgorithm::Ed25519,
            size: None,
            generation: 1,
        })
        .unwrap();
        DomainEntry {
            domain: name.into(),
            messages_per_minute: 100,
            signing_keys: vec![SigningKeyEntry {
                selector: "s1".into(),
                algorithm: KeyAlgorithm::Ed25519,
                private_key_pem: key.private_key_pem.expose_secret().to_string(),
            }],
            return_path: return_path.map(str::to_string),
        }
    }

    fn tenant(username: &str, domains: &[&str]) -> TenantEntry {
        TenantEntry {
            username: username.into(),
            password_hash: hash_password("pw", b"salt"),
            domains: domains.iter().map(|d| d.to_string()).collect(),
        }
    }

    fn part(name: &str, value: &impl serde::Serialize) -> ConfigPart {
        ConfigPart {
            name: name.into(),
            bytes: serde_json::to_vec(value).unwrap(),
        }
    }

    fn parts(shards: Vec<ConfigPart>) -> ConfigParts {
        ConfigParts {
            settings: Some(part(SETTINGS_FILE, &settings())),
            shards,
        }
    }

    fn load(shards: Vec<ConfigPart>) -> Loaded {
        build(&parts(shards), &mut ShardCache::default()).unwrap()
    }

    #[test]
    fn shards_are_merged_and_grants_keep_only_served_domains() {
        let loaded = load(vec![
            part(
                "a",
                &DomainShard {
                    tenants: vec![tenant("acme", &["acme.test", "unverified.test"])],
                    domains: vec![domain("acme.test", Some("bounces"))],
                },
            ),
            part(
                "b",
                &DomainShard {
                    tenants: vec![tenant("other", &["other.test"])],
                    domains: vec![domain("other.test", None)],
                },
            ),
        ]);
        assert!(loaded.rejected.is_empty(), "{:?}", loaded.rejected);
        let snapshot = loaded.snapshot;
        assert_eq!(snapshot.domain_count(), 2);
        let acme = snapshot.tenant("acme").unwrap();
        assert!(acme.password_matches(b"pw"));
        assert!(!acme.password_matches(b"wrong"));
        let envelope = |path: &str| {
            let (path, _) = parse_reverse_path(path.as_bytes()).unwrap();
            check_envelope_sender(&acme.grant, &path)
        };
        assert_eq!(envelope("<x@bounces.acme.test>"), Ok(()));
        assert!(envelope("<x@unverified.test>").is_err());
        assert!(envelope("<x@other.test>").is_err());
        let other = header_section(b"From: x@other.test\r\n\r\n").unwrap();
        assert!(check_header_sender(&acme.grant, &other).is_err());
        assert_eq!(snapshot.domain("acme.test").unwrap().signers.len(), 1);
    }

    #[test]
    fn a_bad_entry_is_left_out_alone_and_never_quoted() {
        let mut bad_key = domain("broken.test", None);
        bad_key.signing_keys[0].private_key_pem = "not a key".into();
        let good = domain("good.test", None);
        let shard = serde_json::json!({
            "tenants": [
                tenant("good", &["good.test"]),
                tenant("broken", &["broken.test"]),
                {"username": "badhash", "passwordHash": "sha256$secret-hash-value", "domains": []},
            ],
            "domains": [
                good,
                bad_key,
                // A signing key of the wrong JSON type: serde would quote the
                // PEM in its message.
                {"domain": "typed.test", "messagesPerMinute": 1,
                 "signingKeys": "-----BEGIN PRIVATE KEY-----SECRETPEM"},
                {"domain": "nokey.test", "messagesPerMinute": 1, "signingKeys": []},
            ],
        });
        let loaded = load(vec![part("domains-0000.json", &shard)]);
        let snapshot = &loaded.snapshot;
        assert!(snapshot.domain("good.test").is_some());
        assert!(snapshot.tenant("good").is_some());
        for left_out in ["broken.test", "typed.test", "nokey.test"] {
            assert!(snapshot.domain(left_out).is_none(), "{left_out} served");
        }
        assert!(snapshot.tenant("badhash").is_none());
        let broken = snapshot.tenant("broken").unwrap();
        assert!(broken.grant.is_empty(), "a rejected domain is not granted");
        let reasons: Vec<(&str, &str)> = loaded
            .rejected
            .iter()
            .map(|r| (r.subject.as_str(), r.problem.reason()))
            .collect();
        assert_eq!(
            reasons,
            vec![
                ("broken.test", "bad_signing_key"),
                ("typed.test", "malformed_entry"),
                ("nokey.test", "no_signing_key"),
                ("badhash", "bad_password_hash"),
            ]
        );
        let text: String = loaded
            .rejected
            .iter()
            .map(|r| format!("{r} {r:?}\n"))
            .collect();
        for secret in ["SECRETPEM", "not a key", "secret-hash-value"] {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }

    #[test]
    fn an_unreadable_shard_leaves_the_other_shards_served() {
        let loaded = load(vec![
            ConfigPart {
                name: "domains-0000.json".into(),
                bytes: b"{\"domains\": [\"-----BEGIN PRIVATE KEY-----SECRETPEM".to_vec(),
            },
            part(
                "domains-0001.json",
                &DomainShard {
                    tenants: vec![],
                    domains: vec![domain("ok.test", None)],
                },
            ),
        ]);
        assert!(loaded.snapshot.domain("ok.test").is_some());
        assert_eq!(loaded.rejected.len(), 1);
        assert_eq!(loaded.rejected[0].problem.reason(), "unreadable_shard");
        assert!(!loaded.rejected[0].to_string().contains("SECRETPEM"));
    }

    #[test]
    fn duplicates_are_left_out_on_both_sides() {
        let loaded = load(vec![
            part(
                "a",
                &DomainShard {
                    tenants: vec![tenant("t", &["dup.test"])],
                    domains: vec![domain("dup.test", None), domain("one.test", None)],
                },
            ),
            part(
                "b",
                &DomainShard {
                    tenants: vec![tenant("t", &["dup.test"])],
                    domains: vec![domain("dup.test", None)],
                },
            ),
        ]);
        assert!(loaded.snapshot.domain("dup.test").is_none());
        assert!(loaded.snapshot.domain("one.test").is_some());
        assert!(loaded.snapshot.tenant("t").is_none());
        let mut reasons: Vec<&str> = loaded.rejected.iter().map(|r| r.problem.reason()).collect();
        reasons.sort();
        assert_eq!(reasons, vec!["duplicate_domain", "duplicate_tenant"]);
    }

    #[test]
    fn settings_that_do_not_load_fail_the_build_without_quoting_them() {
        let mut cache = ShardCache::default();
        assert!(matches!(
            build(&ConfigParts::default(), &mut cache),
            Err(RelayError::NoSettings)
        ));
        let bad = ConfigParts {
            settings: Some(ConfigPart {
                name: SETTINGS_FILE.into(),
                bytes: br#"{"hostname": "r", "upstream": {"host": "h", "port": 25, "tls": "None",
                    "auth": {"username": "u", "password": ["TOPSECRET"]}}, "limits": {}}"#
                    .to_vec(),
            }),
            shards: vec![],
        };
        let error = build(&bad, &mut cache).unwrap_err();
        assert!(matches!(error, RelayError::ConfigParse { .. }));
        assert!(!error.to_string().contains("TOPSECRET"), "{error}");

        let mut untrusting = settings();
        untrusting.upstream.ca_certificates = Some("no certificate here".into());
        let parts = ConfigParts {
            settings: Some(part(SETTINGS_FILE, &untrusting)),
            shards: vec![],
        };
        assert!(matches!(
            build(&parts, &mut cache),
            Err(RelayError::UpstreamCa(_))
        ));
    }

    #[test]
    fn an_unchanged_shard_is_not_parsed_again() {
        let mut cache = ShardCache::default();
        let shard = part(
            "domains-0000.json",
            &DomainShard {
                tenants: vec![],
                domains: vec![domain("a.test", None)],
            },
        );
        let first = build(&parts(vec![shard.clone()]), &mut cache).unwrap();
        let second = build(&parts(vec![shard]), &mut cache).unwrap();
        assert!(Arc::ptr_eq(
            &first.snapshot.domains["a.test"],
            &second.snapshot.domains["a.test"]
        ));
        build(&parts(vec![]), &mut cache).unwrap();
        assert!(
            cache.parsed.is_empty(),
            "parts that went away are forgotten"
        );
    }

    #[test]
    fn a_directory_is_loaded_and_its_fingerprint_follows_changes() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(SETTINGS_FILE),
            serde_json::to_vec(&settings()).unwrap(),
        )
        .unwrap();
        let shard = DomainShard {
            tenants: vec![tenant("acme", &["acme.test"])],
            domains: vec![domain("acme.test", None)],
        };
        std::fs::write(
            dir.path().join("domains-0.json"),
            serde_json::to_vec(&shard).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join("unrelated.txt"), "ignored").unwrap();
        let loaded = load_dir(dir.path()).unwrap();
        assert!(loaded.snapshot.tenant("acme").is_some());
        assert_eq!(loaded.snapshot.settings.hostname, "relay.test");

        let before = fingerprint(dir.path()).unwrap();
        std::fs::write(dir.path().join("domains-1.json"), b"{}").unwrap();
        assert_ne!(fingerprint(dir.path()).unwrap(), before);
        assert!(load_dir(dir.path()).unwrap().rejected.is_empty());

        std::fs::write(dir.path().join("domains-2.json"), b"{not json").unwrap();
        let loaded = load_dir(dir.path()).unwrap();
        assert!(loaded.snapshot.tenant("acme").is_some());
        assert_eq!(loaded.rejected.len(), 1);
    }

    #[test]
    fn a_missing_settings_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            load_dir(dir.path()),
            Err(RelayError::ConfigRead { .. })
        ));
    }
}
