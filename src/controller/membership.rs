//! Which MailDomains a relay serves, and what it serves for each: the one
//! place that decides it. Pure: it sees the MailDomain, the relay, the
//! namespace's labels and the two Secrets, nothing else.
//!
//! The rule: an entry reaches a relay only from what the operator itself
//! verified at the object's current generation, for exactly that domain.
//!
//! - The status is the operator's record (tenants cannot write status), but
//!   only for the generation it was computed from: a status whose
//!   `observedGeneration` is older than the object describes a spec that no
//!   longer exists, so nothing is served from it.
//! - An Active key is served only if its DKIM record, at the name for
//!   `spec.domain`, is `Verified` with exactly that key, and the private
//!   key in the tenant's Secret is the one whose public half DNS showed.
//! - The SMTP credential served is the hash the operator recorded when it
//!   generated the password, under the username it derives; the tenant's
//!   Secret must still hold exactly that, or the domain is left out.
//! - The entry is validated with the relay's own loader before it is
//!   rendered, so the relay never refuses what the operator renders.
//!
//! Everything that is left out says why, for the MailDomain's
//! `RelayAccepted` condition and the MailRelay's status.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::secrets::{self, CredentialsCheck, StoredKey};
use crate::api::{
    Condition, ConditionStatus, ConditionType, KeyState, MailDomain, MailRelay, Reason,
    RecordPurpose, RecordState,
};
use crate::dkim::dkim_txt_value;
use crate::dns::records::dkim_record_name;
use crate::relay::config::{DomainEntry, SigningKeyEntry, TenantEntry};
use crate::relay::snapshot::{validate_domain, validate_tenant};

/// One domain's part of a relay config: its entry and its tenant's.
pub type DomainConfig = (DomainEntry, TenantEntry);

/// The relay a MailDomain asks for: `spec.relayRef`, its namespace
/// defaulting to the MailDomain's. The only place `relayRef` is resolved.
pub fn relay_of(domain: &MailDomain) -> Option<ObjectRef<MailRelay>> {
    let relay = domain.spec.relay_ref.as_ref()?;
    let namespace = relay.namespace.clone().or_else(|| domain.namespace())?;
    Some(ObjectRef::new(&relay.name).within(&namespace))
}

/// `namespace/name` of a relay, for messages.
pub fn relay_id(relay: &ObjectRef<MailRelay>) -> String {
    format!(
        "{}/{}",
        relay.namespace.as_deref().unwrap_or_default(),
        relay.name
    )
}

/// Whether `relay` admits MailDomains of a namespace with these labels;
/// `Err` says why not, for the tenant.
pub fn admission(
    relay: &MailRelay,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> Result<(), String> {
    let relay_namespace = relay.namespace().unwrap_or_default();
    relay
        .spec
        .allowed_namespaces
        .admits(&relay_namespace, namespace, namespace_labels)
        .map_err(|why| {
            format!(
                "MailRelay {relay_namespace}/{} does not admit this MailDomain: {why}",
                relay.name_any()
            )
        })
}

/// Why a MailDomain that names a relay is not served by it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeftOut {
    RelayNotFound,
    NamespaceNotAllowed(String),
    Deleting,
    /// The status was computed for another generation (or not yet at all).
    NotObserved {
        generation: Option<i64>,
    },
    /// No Active key whose record is verified for this domain.
    NotVerified,
    InConflict,
    KeySecretMissing,
    KeySecretNotOwned,
    ActiveKeyMissing(String),
    ActiveKeyTampered(String),
    CredentialsMissing,
    CredentialsNotOwned,
    CredentialsNotRecorded,
    CredentialsTampered,
    /// The relay's own loader refuses the entry.
    EntryInvalid(String),
    /// The relay's config has no room left (decided by the projection).
    ConfigFull,
}

impl LeftOut {
    /// The `RelayAccepted` reason.
    pub fn reason(&self) -> Reason {
        match self {
            Self::RelayNotFound => Reason::RelayNotFound,
            Self::NamespaceNotAllowed(_) => Reason::NamespaceNotAllowed,
            Self::Deleting => Reason::Deleting,
            Self::NotObserved { .. } | Self::NotVerified => Reason::NotVerifiedYet,
            Self::InConflict => Reason::DomainConflict,
            Self::KeySecretMissing
            | Self::KeySecretNotOwned
            | Self::ActiveKeyMissing(_)
            | Self::ActiveKeyTampered(_) => Reason::KeySecretProblem,
            Self::CredentialsMissing | Self::CredentialsNotRecorded => Reason::CredentialsMissing,
            Self::CredentialsNotOwned => Reason::CredentialsSecretNotOwned,
            Self::CredentialsTampered => Reason::CredentialsTampered,
            Self::EntryInvalid(_) => Reason::EntryInvalid,
            Self::ConfigFull => Reason::ConfigFull,
        }
    }

    /// Whether the domain's own status explains it already (keys, DNS,
    /// conflict), so the relay need not name it among its problems.
    pub fn is_routine(&self) -> bool {
        matches!(
            self,
            Self::NotObserved { .. } | Self::NotVerified | Self::Deleting
        )
    }

    /// What the tenant reads in `RelayAccepted`: what is wrong and what to do.
    pub fn describe(&self, domain: &MailDomain, relay: &str) -> String {
        let keys = secrets::keys_secret_name(domain);
        let credentials = secrets::credentials_secret_name(domain);
        match self {
            Self::RelayNotFound => {
                format!("MailRelay {relay} does not exist: check spec.relayRef")
            }
            Self::NamespaceNotAllowed(why) => why.clone(),
            Self::Deleting => "the MailDomain is being deleted".into(),
            Self::NotObserved { generation } => format!(
                "waiting for the operator to check generation {} of this MailDomain",
                generation.unwrap_or_default()
            ),
            Self::NotVerified => {
                "the active DKIM key is not verified in DNS yet (see DKIMVerified)".into()
            }
            Self::InConflict => "another MailDomain owns this domain (see DomainConflict)".into(),
            Self::KeySecretMissing => format!(
                "the key Secret {keys} is missing: restore it from a backup, or set annotation mailauth.dev/rotate-requested for new keys"
            ),
            Self::KeySecretNotOwned => format!(
                "Secret {keys} was not made by the operator for this MailDomain: delete or rename it"
            ),
            Self::ActiveKeyMissing(selector) => format!(
                "the private key of active selector {selector} is missing from Secret {keys} (see KeysReady)"
            ),
            Self::ActiveKeyTampered(selector) => format!(
                "the private key of active selector {selector} in Secret {keys} is not the key published in DNS; \
                 the relay does not sign with it (see KeysReady)"
            ),
            Self::CredentialsMissing | Self::CredentialsNotRecorded => {
                format!("the SMTP credentials Secret {credentials} is being generated")
            }
            Self::CredentialsNotOwned => format!(
                "Secret {credentials} was not made by the operator for this MailDomain, so no credentials are issued: \
                 delete or rename it and the operator generates them"
            ),
            Self::CredentialsTampered => format!(
                "Secret {credentials} no longer holds the credentials the operator generated (it was edited), \
                 so the relay does not serve this domain: delete the Secret and the operator generates new credentials"
            ),
            Self::EntryInvalid(problem) => format!(
                "the relay cannot load this domain's entry ({problem}): set annotation mailauth.dev/rotate-requested for new keys"
            ),
            Self::ConfigFull => format!(
                "MailRelay {relay} has no room left in its config for this domain: ask the platform team to move MailDomains to another MailRelay"
            ),
        }
    }
}

impl fmt::Display for LeftOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason().as_str())
    }
}

/// Everything one membership decision looks at.
pub struct Candidate<'a> {
    pub domain: &'a MailDomain,
    /// The relay `relay_of(domain)` names, if it exists.
    pub relay: Option<&'a MailRelay>,
    pub namespace_labels: &'a BTreeMap<String, String>,
    /// `<md>-dkim`, if present.
    pub key_secret: Option<&'a Secret>,
    /// `<md>-smtp`, if present.
    pub credentials_secret: Option<&'a Secret>,
}

/// Whether the relay serves this MailDomain, and if so, exactly what.
pub fn membership(candidate: &Candidate<'_>) -> Result<DomainConfig, LeftOut> {
    let md = candidate.domain;
    let relay = candidate.relay.ok_or(LeftOut::RelayNotFound)?;
    if md.meta().deletion_timestamp.is_some() {
        return Err(LeftOut::Deleting);
    }
    admission(
        relay,
        &md.namespace().unwrap_or_default(),
        candidate.namespace_labels,
    )
    .map_err(LeftOut::NamespaceNotAllowed)?;

    let generation = md.meta().generation;
    let status = md
        .status
        .as_ref()
        .filter(|status| status.observed_generation == generation)
        .ok_or(LeftOut::NotObserved { generation })?;
    let conflict = Condition::find(&status.conditions, ConditionType::DomainConflict)
        .filter(|c| c.observed_generation == generation)
        .ok_or(LeftOut::NotObserved { generation })?;
    if conflict.status != ConditionStatus::False {
        return Err(LeftOut::InConflict);
    }

    // The credentials first: a Secret in the way is something the tenant
    // must fix, and says so even before DNS is verified.
    let recorded = status.credentials_hash.as_deref();
    match secrets::check_credentials(candidate.credentials_secret, md, recorded) {
        CredentialsCheck::Matches => {}
        CredentialsCheck::Missing => return Err(LeftOut::CredentialsMissing),
        CredentialsCheck::NotOwned => return Err(LeftOut::CredentialsNotOwned),
        CredentialsCheck::NotRecorded => return Err(LeftOut::CredentialsNotRecorded),
        CredentialsCheck::Tampered => return Err(LeftOut::CredentialsTampered),
    }
    let password_hash = recorded.ok_or(LeftOut::CredentialsNotRecorded)?.to_string();

    let active: Vec<_> = status
        .dkim
        .iter()
        .flat_map(|dkim| dkim.keys.iter())
        .filter(|key| key.state == KeyState::Active)
        .collect();
    // A delegated key's own record, in the platform's zone, is what must be
    // verified for it to sign: the tenant's CNAME to it going missing is
    // reported loudly, and never stops the current key signing.
    let delegated_to = status.dkim.as_ref().and_then(|d| d.delegated_to.as_deref());
    let prefix = &md.spec.dkim.selector_prefix;
    let verified = |key: &&crate::api::DkimKeyStatus| {
        let name = match delegated_to {
            Some(base) if crate::dkim::slot_of(prefix, &key.selector).is_some() => {
                format!("{}.{base}", key.selector)
            }
            _ => dkim_record_name(&key.selector, &md.spec.domain),
        };
        let value = dkim_txt_value(key.algorithm, &key.public_key);
        status.records.iter().any(|record| {
            record.purpose == RecordPurpose::Dkim
                && record.name == name
                && record.value == value
                && record.state == RecordState::Verified
        })
    };
    if active.is_empty() || !active.iter().all(verified) {
        return Err(LeftOut::NotVerified);
    }

    let key_secret = candidate.key_secret.ok_or(LeftOut::KeySecretMissing)?;
    if !secrets::is_ours(key_secret, md) {
        return Err(LeftOut::KeySecretNotOwned);
    }
    let mut signing_keys = Vec::with_capacity(active.len());
    for key in &active {
        match secrets::check_stored_key(key_secret, key) {
            StoredKey::Matches => {}
            StoredKey::Missing => return Err(LeftOut::ActiveKeyMissing(key.selector.clone())),
            StoredKey::Mismatch => return Err(LeftOut::ActiveKeyTampered(key.selector.clone())),
        }
        let pem = secrets::stored_key(key_secret, &key.selector)
            .ok_or_else(|| LeftOut::ActiveKeyMissing(key.selector.clone()))?;
        signing_keys.push(SigningKeyEntry {
            selector: key.selector.clone(),
            algorithm: key.algorithm,
            private_key_pem: pem.expose_secret().to_string(),
        });
    }

    let relay_default = relay.spec.limits.messages_per_minute;
    let entry = DomainEntry {
        domain: md.spec.domain.clone(),
        messages_per_minute: md
            .spec
            .rate_limit
            .as_ref()
            .map_or(relay_default, |r| r.messages_per_minute.min(relay_default)),
        signing_keys,
        return_path: md.spec.return_path.clone(),
    };
    let tenant = TenantEntry {
        username: secrets::smtp_username(md),
        password_hash,
        domains: vec![md.spec.domain.clone()],
    };
    validate_domain(&entry).map_err(|problem| LeftOut::EntryInvalid(problem.to_string()))?;
    validate_tenant(&tenant).map_err(|problem| LeftOut::EntryInvalid(problem.to_string()))?;
    Ok((entry, tenant))
}

/// Who owns a domain among the MailDomains that claim it: of those whose
/// DKIM record is verified at their current generation, the one verified
/// first (then the oldest, then by name). `None` when none is verified.
/// The MailDomain controller turns "not me" into `DomainConflict`; the
/// relay projection serves a domain for its owner only.
pub fn claim_owner<'a>(
    claimants: impl IntoIterator<Item = &'a MailDomain>,
) -> Option<ObjectRef<MailDomain>> {
    claimants
        .into_iter()
        .filter(|md| md.meta().deletion_timestamp.is_none())
        .filter_map(|md| {
            let generation = md.meta().generation;
            let status = md.status.as_ref()?;
            let since =
                Condition::true_at(&status.conditions, ConditionType::DkimVerified, generation)?
                    .last_transition_time
                    .0;
            Some(claim_key(md, since))
        })
        .min()
        .map(|(_, _, namespace, name)| ObjectRef::new(&name).within(&namespace))
}

type ClaimKey = (Timestamp, Option<Timestamp>, String, String);

fn claim_key(md: &MailDomain, verified_since: Timestamp) -> ClaimKey {
    (
        verified_since,
        md.meta().creation_timestamp.as_ref().map(|t| t.0),
        md.namespace().unwrap_or_default(),
        md.name_any(),
    )
}

/// The position of a MailDomain in claim order when it is verified at
/// `since`: for deciding a claim in the same reconcile that verifies it.
pub fn claim_order(md: &MailDomain, verified_since: Timestamp) -> ClaimKey {
    claim_key(md, verified_since)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{
        DkimKeyStatus, DkimStatus, DnsRecordStatus, KeyAlgorithm, MailDomainSpec, MailDomainStatus,
        MailRelaySpec,
    };
    use crate::dkim::{NewKey, generate};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::collections::BTreeMap as Map;

    fn now() -> Time {
        Time(Timestamp::from_second(1_800_000_000).unwrap())
    }

    fn relay(allowed: serde_json::Value) -> MailRelay {
        let spec: MailRelaySpec = serde_json::from_value(serde_json::json!({
            "hostname": "relay.platform.test",
            "upstream": {"host": "smtp.platform.test"},
            "allowedNamespaces": allowed,
        }))
        .unwrap();
        let mut relay = MailRelay::new("shared", spec);
        relay.metadata.namespace = Some("mail".into());
        relay
    }

    /// A verified, Ready-looking MailDomain with its two Secrets, as the
    /// operator leaves them.
    struct Fixture {
        md: MailDomain,
        keys: Secret,
        credentials: Secret,
        relay: MailRelay,
    }

    fn fixture() -> Fixture {
        let spec: MailDomainSpec = serde_json::from_value(serde_json::json!({
            "domain": "acme.example",
            "relayRef": {"name": "shared", "namespace": "mail"},
            "dkim": {"algorithm": "Ed25519"},
        }))
        .unwrap();
        let mut md = MailDomain::new("acme", spec);
        md.metadata.namespace = Some("tenant".into());
        md.metadata.uid = Some("uid-1".into());
        md.metadata.generation = Some(2);
        let key = generate(&NewKey {
            selector: "ma20261126a".into(),
            algorithm: KeyAlgorithm::Ed25519,
            size: None,
            generation: 1,
        })
        .unwrap();
        let key_status = DkimKeyStatus {
            state: KeyState::Active,
            ..key.clone().into_status(now().0, 1)
        };
        let record = DnsRecordStatus {
            name: dkim_record_name("ma20261126a", "acme.example"),
            type_: "TXT".into(),
            value: dkim_txt_value(KeyAlgorithm::Ed25519, &key_status.public_key),
            strings: vec![],
            purpose: RecordPurpose::Dkim,
            state: RecordState::Verified,
            found: None,
            error: None,
            since: Some(now()),
        };
        let password = "generated-password";
        let username = secrets::smtp_username(&md);
        md.status = Some(MailDomainStatus {
            observed_generation: Some(2),
            conditions: vec![Condition::new(
                ConditionType::DomainConflict,
                ConditionStatus::False,
                Reason::NoConflict,
                String::new(),
                Some(2),
                now(),
            )],
            dkim: Some(DkimStatus {
                keys: vec![key_status],
                ..DkimStatus::default()
            }),
            records: vec![record],
            credentials_hash: Some(secrets::credentials_hash(&username, password)),
            ..MailDomainStatus::default()
        });
        let keys = secrets::keys_secret(
            &md,
            &Map::from([("ma20261126a".to_string(), key.private_key_pem.clone())]),
            &[],
        );
        let credentials =
            secrets::credentials_secret(&md, "shared-relay.mail.svc", 587, &username, password);
        Fixture {
            md,
            keys,
            credentials,
            relay: relay(serde_json::json!({"from": "All"})),
        }
    }

    fn decide(f: &Fixture) -> Result<DomainConfig, LeftOut> {
        membership(&Candidate {
            domain: &f.md,
            relay: Some(&f.relay),
            namespace_labels: &Map::new(),
            key_secret: Some(&f.keys),
            credentials_secret: Some(&f.credentials),
        })
    }

    #[test]
    fn a_verified_domain_is_served_with_its_recorded_credential() {
        let f = fixture();
        let (entry, tenant) = decide(&f).unwrap();
        assert_eq!(entry.domain, "acme.example");
        assert_eq!(entry.signing_keys[0].selector, "ma20261126a");
        assert_eq!(tenant.username, "acme.tenant");
        assert_eq!(
            Some(&tenant.password_hash),
            f.md.status.as_ref().unwrap().credentials_hash.as_ref()
        );
        assert_eq!(tenant.domains, vec!["acme.example".to_string()]);
    }

    #[test]
    fn a_status_of_an_older_generation_serves_nothing() {
        let mut f = fixture();
        f.md.metadata.generation = Some(3);
        assert_eq!(
            decide(&f),
            Err(LeftOut::NotObserved {
                generation: Some(3)
            })
        );
    }

    #[test]
    fn a_record_verified_for_another_domain_serves_nothing() {
        // As if spec.domain had been changed under a verified status (the
        // API server refuses that now; this is the second line of defence).
        let mut f = fixture();
        f.md.spec.domain = "victim.example".into();
        assert_eq!(decide(&f), Err(LeftOut::NotVerified));
    }

    #[test]
    fn an_unverified_or_mismatched_record_serves_nothing() {
        let mut f = fixture();
        f.md.status.as_mut().unwrap().records[0].state = RecordState::Missing;
        assert_eq!(decide(&f), Err(LeftOut::NotVerified));
        let mut f = fixture();
        f.md.status.as_mut().unwrap().records[0].value = "v=DKIM1; k=ed25519; p=AAAA".into();
        assert_eq!(decide(&f), Err(LeftOut::NotVerified));
    }

    #[test]
    fn a_replaced_private_key_is_never_served() {
        let mut f = fixture();
        let other = generate(&NewKey {
            selector: "x".into(),
            algorithm: KeyAlgorithm::Ed25519,
            size: None,
            generation: 1,
        })
        .unwrap();
        f.keys = secrets::keys_secret(
            &f.md,
            &Map::from([("ma20261126a".to_string(), other.private_key_pem)]),
            &[],
        );
        assert_eq!(
            decide(&f),
            Err(LeftOut::ActiveKeyTampered("ma20261126a".into()))
        );
        f.keys = secrets::keys_secret(
            &f.md,
            &Map::from([(
                "ma20261126a".to_string(),
                crate::dkim::PrivateKeyPem::new("garbage".into()),
            )]),
            &[],
        );
        assert_eq!(
            decide(&f),
            Err(LeftOut::ActiveKeyTampered("ma20261126a".into()))
        );
        f.keys = secrets::keys_secret(&f.md, &Map::new(), &[]);
        assert_eq!(
            decide(&f),
            Err(LeftOut::ActiveKeyMissing("ma20261126a".into()))
        );
    }

    #[test]
    fn credentials_the_tenant_chose_are_never_served() {
        let mut f = fixture();
        f.credentials = secrets::credentials_secret(
            &f.md,
            "h",
            587,
            &secrets::smtp_username(&f.md),
            "tenant-chosen",
        );
        assert_eq!(decide(&f), Err(LeftOut::CredentialsTampered));
        // Another tenant's username with the recorded password is tampered too.
        let mut f = fixture();
        f.credentials =
            secrets::credentials_secret(&f.md, "h", 587, "victim.other", "generated-password");
        assert_eq!(decide(&f), Err(LeftOut::CredentialsTampered));
        // A foreign Secret of the same name.
        let mut f = fixture();
        f.credentials.metadata.labels = None;
        f.credentials.metadata.owner_references = None;
        assert_eq!(decide(&f), Err(LeftOut::CredentialsNotOwned));
        // No record: nothing is served until the operator generated one.
        let mut f = fixture();
        f.md.status.as_mut().unwrap().credentials_hash = None;
        assert_eq!(decide(&f), Err(LeftOut::CredentialsNotRecorded));
    }

    #[test]
    fn conflicts_deletion_and_admission_leave_the_domain_out() {
        let mut f = fixture();
        f.md.status.as_mut().unwrap().conditions[0].status = ConditionStatus::True;
        assert_eq!(decide(&f), Err(LeftOut::InConflict));

        let mut f = fixture();
        f.md.metadata.deletion_timestamp = Some(now());
        assert_eq!(decide(&f), Err(LeftOut::Deleting));

        let mut f = fixture();
        f.relay = relay(serde_json::json!({}));
        assert!(matches!(decide(&f), Err(LeftOut::NamespaceNotAllowed(_))));

        let f = fixture();
        let missing = membership(&Candidate {
            domain: &f.md,
            relay: None,
            namespace_labels: &Map::new(),
            key_secret: Some(&f.keys),
            credentials_secret: Some(&f.credentials),
        });
        assert_eq!(missing, Err(LeftOut::RelayNotFound));
    }

    #[test]
    fn the_first_domain_verified_at_its_generation_owns_the_claim() {
        let verified = |name: &str, ns: &str, since: i64, generation: i64, observed: i64| {
            let spec: MailDomainSpec =
                serde_json::from_value(serde_json::json!({"domain": "acme.example"})).unwrap();
            let mut md = MailDomain::new(name, spec);
            md.metadata.namespace = Some(ns.into());
            md.metadata.generation = Some(generation);
            md.status = Some(MailDomainStatus {
                conditions: vec![Condition::new(
                    ConditionType::DkimVerified,
                    ConditionStatus::True,
                    Reason::Verified,
                    String::new(),
                    Some(observed),
                    Time(Timestamp::from_second(since).unwrap()),
                )],
                ..MailDomainStatus::default()
            });
            md
        };
        let first = verified("a", "t1", 100, 1, 1);
        let second = verified("b", "t2", 200, 1, 1);
        assert_eq!(
            claim_owner([&second, &first]),
            Some(ObjectRef::new("a").within("t1"))
        );
        // A verdict of an older generation is not a claim.
        let stale = verified("c", "t3", 50, 2, 1);
        assert_eq!(
            claim_owner([&second, &stale]),
            Some(ObjectRef::new("b").within("t2"))
        );
        assert_eq!(claim_owner([&stale]), None);
    }
}
