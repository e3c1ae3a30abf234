//! The relay's in-memory view of its config directory: tenants by username,
//! domains by name with parsed signing keys. Built once per config change
//! and then shared read-only by every session (see [`super::reload`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::RelayError;
use super::auth::PasswordHash;
use super::config::{DomainShard, RelaySettings, SETTINGS_FILE, SHARD_PREFIX};
use super::policy::Grant;
use super::signing::DomainSigner;
use crate::dkim::PrivateKeyPem;

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
}

/// One consistent config: what a session uses from start to end.
#[derive(Debug)]
pub struct RelaySnapshot {
    pub settings: RelaySettings,
    tenants: HashMap<String, Tenant>,
    domains: HashMap<String, SigningDomain>,
}

impl RelaySnapshot {
    /// Merges the settings and all shards. Strict: a duplicate tenant or
    /// domain, a malformed hash or key makes the whole config invalid, so a
    /// half-applied config never serves mail.
    pub fn build(settings: RelaySettings, shards: Vec<DomainShard>) -> Result<Self, RelayError> {
        if let Some(pem) = &settings.upstream.ca_certificates {
            super::upstream::trusting(pem).map_err(RelayError::UpstreamCa)?;
        }
        let mut domains = HashMap::new();
        let mut tenant_entries = Vec::new();
        for shard in shards {
            tenant_entries.extend(shard.tenants);
            for entry in shard.domains {
                let name = entry.domain.to_ascii_lowercase();
                if entry.signing_keys.is_empty() {
                    return Err(RelayError::NoSigningKey { domain: name });
                }
                let signers = entry
                    .signing_keys
                    .iter()
                    .map(|key| {
                        let pem = PrivateKeyPem::new(key.private_key_pem.clone());
                        DomainSigner::new(&name, &key.selector, key.algorithm, &pem).map_err(
                            |source| RelayError::SigningKey {
                                domain: name.clone(),
                                selector: key.selector.clone(),
                                source,
                            },
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let domain = SigningDomain {
                    domain: name.clone(),
                    messages_per_minute: entry.messages_per_minute,
                    signers,
                };
                let return_path = entry
                    .return_path
                    .map(|sub| format!("{}.{name}", sub.to_ascii_lowercase()));
                if domains
                    .insert(name.clone(), (domain, return_path))
                    .is_some()
                {
                    return Err(RelayError::DuplicateDomain { domain: name });
                }
            }
        }

        let mut tenants = HashMap::new();
        for entry in tenant_entries {
            let password_hash = PasswordHash::parse(&entry.password_hash).map_err(|_| {
                RelayError::InvalidPasswordHash {
                    username: entry.username.clone(),
                }
            })?;
            let mut grant = Grant::default();
            for domain in &entry.domains {
                // Domains the operator did not render (unverified, in
                // conflict) are simply not granted.
                if let Some((_, return_path)) = domains.get(&domain.to_ascii_lowercase()) {
                    grant.allow(domain, return_path.as_deref());
                }
            }
            let tenant = Tenant {
                username: entry.username.clone(),
                password_hash,
                grant,
            };
            if tenants.insert(entry.username.clone(), tenant).is_some() {
                return Err(RelayError::DuplicateTenant {
                    username: entry.username,
                });
            }
        }

        Ok(Self {
            settings,
            tenants,
            domains: domains
                .into_iter()
                .map(|(name, (domain, _))| (name, domain))
                .collect(),
        })
    }

    pub fn tenant(&self, username: &str) -> Option<&Tenant> {
        self.tenants.get(username)
    }

    pub fn domain(&self, domain: &str) -> Option<&SigningDomain> {
        self.domains.get(domain)
    }

    pub fn domain_count(&self) -> usize {
        self.domains.len()
    }
}

/// The files of a config directory, in a stable order: the settings, then
/// the shards by name. Hidden entries (kubelet's `..data` and timestamped
/// directories) are skipped.
fn config_files(dir: &Path) -> Result<(PathBuf, Vec<PathBuf>), RelayError> {
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

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, RelayError> {
    let bytes = std::fs::read(path).map_err(|source| RelayError::ConfigRead {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|error| RelayError::ConfigParse {
        path: path.to_path_buf(),
        detail: json_error(&error),
    })
}

/// What went wrong and where, without serde's message: that quotes the
/// offending value ("invalid type: string \"-----BEGIN PRIVATE KEY...\""),
/// and a config entry's value can be a private key.
fn json_error(error: &serde_json::Error) -> String {
    let what = match error.classify() {
        serde_json::error::Category::Io => "could not be read",
        serde_json::error::Category::Syntax => "is not valid JSON",
        serde_json::error::Category::Eof => "ends too early",
        serde_json::error::Category::Data => {
            "has an entry of the wrong type, or one missing or unknown"
        }
    };
    format!(
        "the file {what} (line {}, column {})",
        error.line(),
        error.column()
    )
}

/// Reads and merges the config directory. Blocking (file reads, key
/// parsing): run it off the async runtime.
pub fn load_dir(dir: &Path) -> Result<RelaySnapshot, RelayError> {
    let (settings_path, shard_paths) = config_files(dir)?;
    let settings: RelaySettings = read_json(&settings_path)?;
    let shards = shard_paths
        .iter()
        .map(|path| read_json::<DomainShard>(path))
        .collect::<Result<Vec<_>, _>>()?;
    RelaySnapshot::build(settings, shards)
}

/// A cheap fingerprint of the config directory: file names, sizes and
/// modification times (following symlinks), plus where kubelet's `..data`
/// link points. Kubelet writes every update into a new directory and swaps
/// `..data` atomically, so any update changes it.
pub fn fingerprint(dir: &Path) -> Result<String, RelayError> {
    let (settings_path, shard_paths) = config_files(dir)?;
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
    use crate::relay::config::{DomainEntry, SigningKeyEntry, TenantEntry, UpstreamSettings};
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

    #[test]
    fn shards_are_merged_and_grants_keep_only_served_domains() {
        let shards = vec![
            DomainShard {
                tenants: vec![tenant("acme", &["acme.test", "unverified.test"])],
                domains: vec![domain("acme.test", Some("bounces"))],
            },
            DomainShard {
                tenants: vec![tenant("other", &["other.test"])],
                domains: vec![domain("other.test", None)],
            },
        ];
        let snapshot = RelaySnapshot::build(settings(), shards).unwrap();
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
    fn duplicates_make_the_config_invalid() {
        let twice = vec![
            DomainShard {
                tenants: vec![],
                domains: vec![domain("acme.test", None)],
            },
            DomainShard {
                tenants: vec![],
                domains: vec![domain("ACME.test", None)],
            },
        ];
        assert!(matches!(
            RelaySnapshot::build(settings(), twice),
            Err(RelayError::DuplicateDomain { .. })
        ));
        let tenant_twice = vec![DomainShard {
            tenants: vec![tenant("acme", &[]), tenant("acme", &[])],
            domains: vec![],
        }];
        assert!(matches!(
            RelaySnapshot::build(settings(), tenant_twice),
            Err(RelayError::DuplicateTenant { .. })
        ));
    }

    #[test]
    fn broken_hashes_and_keys_make_the_config_invalid() {
        let mut bad_tenant = tenant("acme", &[]);
        bad_tenant.password_hash = "plain:pw".into();
        let shards = vec![DomainShard {
            tenants: vec![bad_tenant],
            domains: vec![],
        }];
        assert!(matches!(
            RelaySnapshot::build(settings(), shards),
            Err(RelayError::InvalidPasswordHash { .. })
        ));

        let mut bad_key = domain("acme.test", None);
        bad_key.signing_keys[0].private_key_pem = "not a key".into();
        let shards = vec![DomainShard {
            tenants: vec![],
            domains: vec![bad_key],
        }];
        let error = RelaySnapshot::build(settings(), shards).unwrap_err();
        assert!(matches!(error, RelayError::SigningKey { .. }));
        assert!(!error.to_string().contains("not a key"));

        let mut keyless = domain("acme.test", None);
        keyless.signing_keys.clear();
        let shards = vec![DomainShard {
            tenants: vec![],
            domains: vec![keyless],
        }];
        assert!(matches!(
            RelaySnapshot::build(settings(), shards),
            Err(RelayError::NoSigningKey { .. })
        ));

        let mut untrusting = settings();
        untrusting.upstream.ca_certificates = Some("no certificate here".into());
        assert!(matches!(
            RelaySnapshot::build(untrusting, vec![]),
            Err(RelayError::UpstreamCa(_))
        ));
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
        let snapshot = load_dir(dir.path()).unwrap();
        assert!(snapshot.tenant("acme").is_some());
        assert_eq!(snapshot.settings.hostname, "relay.test");

        let before = fingerprint(dir.path()).unwrap();
        std::fs::write(dir.path().join("domains-1.json"), b"{}").unwrap();
        assert_ne!(fingerprint(dir.path()).unwrap(), before);
        assert!(load_dir(dir.path()).is_ok());

        std::fs::write(dir.path().join("domains-2.json"), b"{not json").unwrap();
        assert!(matches!(
            load_dir(dir.path()),
            Err(RelayError::ConfigParse { .. })
        ));
    }

    #[test]
    fn a_malformed_entry_is_reported_without_its_value() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(SETTINGS_FILE),
            serde_json::to_vec(&settings()).unwrap(),
        )
        .unwrap();
        // A signing-key list where a string is expected to be a list: serde
        // would quote the string, which here is a private key.
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIDoNotLogMe\n-----END PRIVATE KEY-----\n";
        let shard = serde_json::json!({
            "domains": [{"domain": "acme.test", "messagesPerMinute": 1, "signingKeys": pem}]
        });
        std::fs::write(dir.path().join("domains-0.json"), shard.to_string()).unwrap();
        let error = load_dir(dir.path()).unwrap_err();
        let shown = format!("{error} {error:?}");
        assert!(matches!(error, RelayError::ConfigParse { .. }), "{shown}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(!shown.contains("DoNotLogMe"), "{shown}");
        assert!(shown.contains("domains-0.json"), "{shown}");
        assert!(shown.contains("wrong type"), "{shown}");
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
