//! What to do about one MailDomain: a pure function of what was observed.
//!
//! [`decide`] takes the object, its Secrets as read, what its relay says,
//! the DNS outcomes, the other claimants of its domain and the clock, plus
//! the fresh random material the shell generated for it ([`needs`] says
//! which), and returns the writes in the order they must be made, the
//! status, the events and when to look again. The shell only fetches and
//! carries out.
//!
//! The order of the writes is what makes a crash at any point harmless:
//! - new private keys are stored before the status names them;
//! - new credentials are stored before the status records their hash;
//! - a retired key's private key is removed only after the status says
//!   Retired.
//!
//! When a write fails, the shell decides again with the failure as an
//! observation ([`Fresh::keys_failed`], [`Fresh::credentials_failed`]) and
//! carries out that decision, so a failing step still ends in a status
//! that says what is wrong.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;

use super::super::Error;
use super::super::conditions::{DomainFacts, KeysProblem, RelayFacts, conditions};
use super::super::membership::{self, Candidate, LeftOut, claim_owner};
use super::super::secrets::{self, CredentialsCheck, LedgerEntry, StoredKey};
use super::dns_publish::Delegation;
use crate::api::{
    Condition, ConditionStatus, ConditionType, DkimStatus, MailDomain, MailDomainStatus, MailRelay,
    ROTATE_ANNOTATION, Reason, RecordState, SpfAuthorization,
};
use crate::dkim::{
    self, DnsVerdict, GeneratedKey, NewKey, PrivateKeyPem, RotationEvent, RotationInput,
    RotationPlan,
};
use crate::dns::{self, ExpectedRecord, RecordOutcome, Requirement, Verdict};

/// `lastChecked` is refreshed at least this often when nothing changes.
pub const LAST_CHECKED_REFRESH: SignedDuration = SignedDuration::from_hours(24);

/// The key Secret `<md>-dkim`, as read fresh from the API server.
#[derive(Clone, Copy, Debug)]
pub enum KeySecret<'a> {
    Absent,
    /// A Secret of that name we did not make: never written.
    NotOurs,
    Ours(&'a Secret),
}

/// What `relayRef` comes to.
#[derive(Clone, Copy, Debug)]
pub enum RelayView<'a> {
    NotRequested,
    NotFound {
        relay: &'a str,
    },
    /// The relay exists and admits the namespace.
    Admitted {
        relay: &'a MailRelay,
        namespace_labels: &'a BTreeMap<String, String>,
    },
    /// The relay exists and does not admit the namespace.
    Refused {
        why: &'a str,
    },
}

impl RelayView<'_> {
    /// What SPF must authorize: only for an admitted relay.
    pub fn spf(&self) -> Option<&SpfAuthorization> {
        match self {
            Self::Admitted { relay, .. } => Some(&relay.spec.spf),
            _ => None,
        }
    }
}

/// Everything one decision looks at.
pub struct Observed<'a> {
    pub domain: &'a MailDomain,
    pub now: Timestamp,
    pub keys: KeySecret<'a>,
    /// `<md>-smtp`, as read fresh.
    pub credentials: Option<&'a Secret>,
    pub relay: RelayView<'a>,
    /// Outcomes for [`records_to_check`], from the DNS check (or its memo).
    pub dns: &'a [RecordOutcome],
    /// The other MailDomains that claim the same domain.
    pub claimants: &'a [Arc<MailDomain>],
    /// The relay's config has no room for this domain.
    pub no_room: bool,
    /// What publishing through the DNSProvider came to.
    pub publishing: &'a super::dns_publish::Publishing,
    /// Delegated DKIM, as resolved for this reconcile.
    pub delegation: &'a Delegation,
}

/// The random material a decision may need, made by the shell (or why it
/// could not be made or stored).
#[derive(Default)]
pub struct Fresh {
    /// One generated key per [`Needs::keys`] entry, with its generation.
    pub keys: Vec<(GeneratedKey, u32)>,
    /// Generating or storing the keys failed: the message.
    pub keys_failed: Option<String>,
    /// A new password, when [`Needs::password`].
    pub password: Option<String>,
    /// Storing the new credentials failed: the message.
    pub credentials_failed: Option<String>,
}

/// What random material [`decide`] will want.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Needs {
    pub keys: Vec<NewKey>,
    pub password: bool,
}

impl Needs {
    /// Nothing to generate.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && !self.password
    }
}

/// What the key Secret is to hold: the private keys by selector, and their
/// ledger.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRecord {
    pub entries: BTreeMap<String, PrivateKeyPem>,
    pub ledger: Vec<LedgerEntry>,
}

/// One write, in the order of [`Decision::writes`].
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// The key Secret with exactly these entries (new keys included) and
    /// the ledger as the status will have it.
    StoreKeys(KeyRecord),
    /// The credentials Secret.
    StoreCredentials {
        username: String,
        password: String,
        host: String,
        port: u16,
    },
    /// The status, when it changed.
    Status(Box<MailDomainStatus>),
    /// The key Secret without the private keys of retired keys.
    RemovePrivateKeys(KeyRecord),
}

/// An event to publish on the MailDomain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub message: String,
}

/// What to do.
#[derive(Debug)]
pub struct Decision {
    pub writes: Vec<Write>,
    /// The status as it will be (written only if it changed).
    pub status: MailDomainStatus,
    pub events: Vec<Note>,
    /// The earliest time planning again changes something about the keys.
    pub wake_at: Option<Timestamp>,
    /// Rotations started (a new generation while one was Active).
    pub rotations: u32,
}

/// The records to check in DNS before deciding: those of the keys as the
/// operator knows them ([`known_keys`]).
pub fn records_to_check(
    domain: &MailDomain,
    keys: KeySecret<'_>,
    relay: &RelayView<'_>,
    delegation: &Delegation,
) -> Vec<ExpectedRecord> {
    let keys = known_keys(domain, keys);
    expected_records(domain, &keys, relay, delegation)
}

/// The records `domain` needs with these keys. While delegation is asked
/// for and unusable, the slot keys' records are left out: where they live
/// is not known, and nothing about them may change meanwhile.
fn expected_records(
    domain: &MailDomain,
    keys: &[crate::api::DkimKeyStatus],
    relay: &RelayView<'_>,
    delegation: &Delegation,
) -> Vec<ExpectedRecord> {
    let mut records = dns::expected_records(
        &domain.spec.domain,
        &domain.spec,
        keys,
        relay.spf(),
        delegation.base(),
    );
    if matches!(delegation, Delegation::Unusable { .. }) {
        let prefix = &domain.spec.dkim.selector_prefix;
        records.retain(|record| match &record.requirement {
            Requirement::DkimPublicKey { selector, .. } => {
                dkim::slot_of(prefix, selector).is_none()
            }
            _ => true,
        });
    }
    records
}

/// The keys as the operator knows them: the status's, plus those the key
/// Secret's ledger records and the status does not. With no key in status
/// (the MailDomain was re-created over a retained Secret, or restored from
/// a backup without status) every key of the ledger is adopted as it was,
/// so the same selectors keep signing once DNS confirms them and nothing
/// new is asked of the tenant's DNS. Otherwise only Pending ones are: a key
/// stored just before a crash, before the status named it. A key the
/// ledger calls Active and the status does not know is never adopted
/// beside the status's own. Each adopted key's public key is derived from
/// its stored private key.
pub fn known_keys(domain: &MailDomain, keys: KeySecret<'_>) -> Vec<crate::api::DkimKeyStatus> {
    let mut known: Vec<crate::api::DkimKeyStatus> = domain
        .status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .map(|d| d.keys.clone())
        .unwrap_or_default();
    let KeySecret::Ours(secret) = keys else {
        return known;
    };
    let status_had_keys = !known.is_empty();
    for entry in secrets::ledger_of(secret) {
        if known.iter().any(|key| key.selector == entry.selector)
            || (status_had_keys && entry.state != crate::api::KeyState::Pending)
        {
            continue;
        }
        if let Some(key) = secrets::adopt(secret, &entry) {
            known.push(key);
        }
    }
    known.sort_by(|a, b| {
        b.generation
            .cmp(&a.generation)
            .then_with(|| a.selector.cmp(&b.selector))
    });
    known
}

/// The DKIM status as the operator knows it: the status's, with the keys
/// of [`known_keys`].
fn known_dkim(observed: &Observed<'_>) -> DkimStatus {
    let mut dkim = previous_status(observed).dkim.clone().unwrap_or_default();
    dkim.keys = known_keys(observed.domain, observed.keys);
    dkim
}

/// The random material [`decide`] will want for `observed`.
pub fn needs(observed: &Observed<'_>) -> Result<Needs, Error> {
    let plan = rotation_plan(observed)?;
    Ok(Needs {
        keys: plan.map(|p| p.generate).unwrap_or_default(),
        password: matches!(credentials_step(observed), CredentialsStep::Generate),
    })
}

/// What happens to the credentials in this decision.
#[derive(Debug, PartialEq, Eq)]
enum CredentialsStep {
    /// No relay admits the domain: leave whatever exists.
    Untouched,
    /// Ours and as recorded: keep (rewriting host/port if the relay moved).
    Keep,
    /// Generate a new password, store it, record its hash.
    Generate,
    /// The Secret is gone while a hash is recorded: forget the hash first,
    /// so a crash between storing new credentials and recording them can
    /// never look like tampering.
    Forget,
    /// Not ours, or not what we wrote: left alone, reported.
    Refuse,
}

fn credentials_step(observed: &Observed<'_>) -> CredentialsStep {
    if !matches!(observed.relay, RelayView::Admitted { .. }) {
        return CredentialsStep::Untouched;
    }
    let recorded = previous_status(observed).credentials_hash.as_deref();
    match secrets::check_credentials(observed.credentials, observed.domain, recorded) {
        CredentialsCheck::Matches => CredentialsStep::Keep,
        CredentialsCheck::NotRecorded => CredentialsStep::Generate,
        CredentialsCheck::Missing if recorded.is_some() => CredentialsStep::Forget,
        CredentialsCheck::Missing => CredentialsStep::Generate,
        CredentialsCheck::NotOwned | CredentialsCheck::Tampered => CredentialsStep::Refuse,
    }
}

fn previous_status<'a>(observed: &Observed<'a>) -> &'a MailDomainStatus {
    static EMPTY: std::sync::OnceLock<MailDomainStatus> = std::sync::OnceLock::new();
    observed
        .domain
        .status
        .as_ref()
        .unwrap_or_else(|| EMPTY.get_or_init(MailDomainStatus::default))
}

/// What the key Secret holds, by selector: entries that are the key the
/// status records count as present; an entry for a status key that is not
/// that key (edited) is not present. Entries of keys the status does not
/// list count as present, so their selectors are never reused.
fn usable_private_keys(observed: &Observed<'_>) -> (HashSet<String>, Vec<String>) {
    let KeySecret::Ours(secret) = observed.keys else {
        return (HashSet::new(), Vec::new());
    };
    let keys = known_keys(observed.domain, observed.keys);
    let mut present = secrets::stored_selectors(secret);
    let mut tampered = Vec::new();
    for key in &keys {
        if secrets::check_stored_key(secret, key) == StoredKey::Mismatch {
            present.remove(&key.selector);
            tampered.push(key.selector.clone());
        }
    }
    (present, tampered)
}

fn rotation_plan(observed: &Observed<'_>) -> Result<Option<RotationPlan>, Error> {
    if !matches!(observed.keys, KeySecret::Ours(_) | KeySecret::Absent) {
        return Ok(None);
    }
    let dkim = known_dkim(observed);
    let verdicts = dkim_verdicts(observed.dns);
    let (present, _) = usable_private_keys(observed);
    let plan = dkim::plan(&RotationInput {
        now: observed.now,
        spec: &observed.domain.spec.dkim,
        keys: &dkim.keys,
        rotate_annotation: observed
            .domain
            .annotations()
            .get(ROTATE_ANNOTATION)
            .map(String::as_str),
        rotate_acted_on: dkim.rotate_requested.as_deref(),
        dns: &verdicts,
        private_keys_present: &present,
        slots: observed.delegation.slots(),
    })?;
    Ok(Some(plan))
}

/// DNS verdicts per DKIM selector, as the rotation planner wants them. A
/// delegated key's is what its CNAME leads to (what receivers see), not
/// its record in the platform's zone.
fn dkim_verdicts(outcomes: &[RecordOutcome]) -> HashMap<String, DnsVerdict> {
    let verdict_of = |outcome: &RecordOutcome| match &outcome.verdict {
        Some(Verdict::Verified) => DnsVerdict::Verified,
        Some(Verdict::Missing { .. } | Verdict::Mismatch { .. }) => DnsVerdict::NotVerified,
        Some(Verdict::Error { .. }) | None => DnsVerdict::Unknown,
    };
    let mut verdicts: HashMap<String, DnsVerdict> = outcomes
        .iter()
        .filter_map(|outcome| match &outcome.record.requirement {
            Requirement::DkimPublicKey { selector, .. } => {
                Some((selector.clone(), verdict_of(outcome)))
            }
            _ => None,
        })
        .collect();
    for outcome in outcomes {
        if let Requirement::DkimDelegation {
            selector,
            public_key: Some(_),
            ..
        } = &outcome.record.requirement
        {
            verdicts.insert(selector.clone(), verdict_of(outcome));
        }
    }
    verdicts
}

fn same_record(a: &ExpectedRecord, b: &ExpectedRecord) -> bool {
    a.name == b.name && a.record_type == b.record_type && a.value == b.value
}

/// Decides everything for one reconcile.
pub fn decide(observed: &Observed<'_>, fresh: &Fresh) -> Result<Decision, Error> {
    let md = observed.domain;
    let now = observed.now;
    let now_time = Time(now);
    let generation = md.metadata.generation;
    let previous = previous_status(observed);
    let previous_dkim = known_dkim(observed);
    let secret_name = secrets::keys_secret_name(md);
    let mut writes = Vec::new();
    let mut events = Vec::new();

    // Keys.
    let plan = rotation_plan(observed)?;
    let (_, tampered) = usable_private_keys(observed);
    // What the Secret holds now, and what it should hold: with keys in
    // status, an entry that neither the status nor the ledger knows (an
    // orphan, or something the tenant added) goes. With none, nothing is
    // known about unrecorded entries, so they stay.
    let held = match observed.keys {
        KeySecret::Ours(secret) => secrets::stored_entries(secret),
        _ => BTreeMap::new(),
    };
    let mut stored = held.clone();
    if !previous_dkim.keys.is_empty() {
        stored.retain(|selector, _| previous_dkim.keys.iter().any(|k| &k.selector == selector));
    }
    let mut keys_problem = None;
    let mut rotations = 0;
    let mut dkim_status = match &plan {
        None => {
            keys_problem = Some(KeysProblem::SecretNotOwned {
                secret: secret_name.clone(),
            });
            previous_dkim.clone()
        }
        Some(plan) => {
            let generated_all = !plan.generate.is_empty()
                && fresh.keys_failed.is_none()
                && fresh.keys.len() == plan.generate.len();
            if let Some(message) = &fresh.keys_failed {
                keys_problem = Some(KeysProblem::GenerationFailed {
                    message: message.clone(),
                });
                events.push(Note {
                    warning: true,
                    reason: "KeyGenerationFailed",
                    action: "Generate",
                    message: message.clone(),
                });
            }
            if !plan.active_keys_missing.is_empty() {
                let (edited, missing): (Vec<String>, Vec<String>) = plan
                    .active_keys_missing
                    .iter()
                    .cloned()
                    .partition(|selector| tampered.contains(selector));
                keys_problem = Some(if edited.is_empty() {
                    KeysProblem::ActiveKeyMissing {
                        secret: secret_name.clone(),
                        selectors: missing,
                    }
                } else {
                    KeysProblem::ActiveKeyTampered {
                        secret: secret_name.clone(),
                        selectors: edited,
                    }
                });
            }
            if generated_all {
                if !previous_dkim.keys.is_empty() {
                    rotations = 1;
                }
                for (key, _) in &fresh.keys {
                    stored.insert(key.selector.clone(), key.private_key_pem.clone());
                }
                plan.status(
                    fresh
                        .keys
                        .iter()
                        .cloned()
                        .map(|(key, generation)| key.into_status(now, generation)),
                )
            } else if plan.generate.is_empty() {
                plan.status(std::iter::empty())
            } else {
                // Keys were due but not made: nothing new is recorded, and
                // the annotation is not marked as acted on.
                let mut unchanged = plan.status(std::iter::empty());
                unchanged.rotate_requested = previous_dkim.rotate_requested.clone();
                unchanged
            }
        }
    };

    dkim_status.delegated_to = match observed.delegation {
        Delegation::NotRequested => None,
        Delegation::To { base, .. } => Some(base.clone()),
        Delegation::Unusable { .. } => previous_dkim.delegated_to.clone(),
    };

    // The keys and their ledger are stored before the status names them.
    // The ledger is written only with a change of the keys themselves, or
    // to take over a retained or restored Secret (its owner is an earlier
    // MailDomain of this name): a change of state alone is not written
    // there, since DNS says again what a stale ledger state would (an
    // adopted Pending key whose record verifies is activated as usual).
    let removing: BTreeMap<String, PrivateKeyPem> = match &plan {
        Some(plan) => stored
            .iter()
            .filter(|(selector, _)| !plan.remove_private_keys.contains(selector))
            .map(|(selector, pem)| (selector.clone(), pem.clone()))
            .collect(),
        None => stored.clone(),
    };
    if plan.is_some() {
        let taken_over = match observed.keys {
            // A Secret whose key was edited is left as the tenant left it
            // (and reported).
            KeySecret::Ours(secret) => !secrets::is_owned_by(secret, md) && tampered.is_empty(),
            _ => false,
        };
        if stored != held || taken_over {
            writes.push(Write::StoreKeys(KeyRecord {
                ledger: secrets::ledger(&dkim_status.keys, &stored),
                entries: stored.clone(),
            }));
        }
    }

    // Credentials.
    let mut credentials_hash = previous.credentials_hash.clone();
    let mut credentials_secret = previous.credentials_secret.clone();
    let mut credentials_after: Option<Secret> = observed.credentials.cloned();
    if let RelayView::Admitted { relay, .. } = observed.relay {
        let name = secrets::credentials_secret_name(md);
        let host = format!(
            "{}.{}.svc",
            super::super::relay_objects::relay_object_name(relay),
            relay.metadata.namespace.as_deref().unwrap_or_default()
        );
        let port = relay.spec.listener.port;
        let username = secrets::smtp_username(md);
        match credentials_step(observed) {
            CredentialsStep::Generate => match (&fresh.password, &fresh.credentials_failed) {
                (Some(password), None) => {
                    let secret = secrets::credentials_secret(md, &host, port, &username, password);
                    writes.push(Write::StoreCredentials {
                        username: username.clone(),
                        password: password.clone(),
                        host,
                        port,
                    });
                    credentials_hash = Some(secrets::credentials_hash(&username, password));
                    credentials_after = Some(secret);
                    credentials_secret = Some(name);
                }
                _ => {
                    credentials_hash = None;
                    credentials_after = None;
                }
            },
            CredentialsStep::Keep => {
                credentials_secret = Some(name);
                if let Some((_, password)) = observed.credentials.and_then(secrets::credentials_of)
                {
                    let desired =
                        secrets::credentials_secret(md, &host, port, &username, &password);
                    if observed.credentials.is_none_or(|s| s.data != desired.data) {
                        writes.push(Write::StoreCredentials {
                            username,
                            password,
                            host,
                            port,
                        });
                        credentials_after = Some(desired);
                    }
                }
            }
            CredentialsStep::Forget => {
                credentials_hash = None;
                credentials_after = None;
            }
            CredentialsStep::Refuse | CredentialsStep::Untouched => {
                credentials_secret = Some(name);
            }
        }
    }

    // Records for the keys as they are now; new keys are Unchecked until
    // the next check, which their new records make due at once.
    let expected_now =
        expected_records(md, &dkim_status.keys, &observed.relay, observed.delegation);
    let outcomes_now: Vec<RecordOutcome> = expected_now
        .iter()
        .map(|record| RecordOutcome {
            record: record.clone(),
            verdict: observed
                .dns
                .iter()
                .find(|o| same_record(&o.record, record))
                .and_then(|o| o.verdict.clone()),
        })
        .collect();
    let records = dns::record_statuses(&outcomes_now, &previous.records, &now_time);

    let last_checked = match &previous.last_checked {
        Some(last)
            if records == previous.records && now.duration_since(last.0) < LAST_CHECKED_REFRESH =>
        {
            Some(last.clone())
        }
        _ if records.iter().any(|r| r.state != RecordState::Unchecked) => Some(now_time.clone()),
        _ => previous.last_checked.clone(),
    };

    // Conditions: first without the relay's verdict (which depends on the
    // DKIM and conflict verdicts), then with it.
    let mut facts = DomainFacts {
        generation,
        domain: &md.spec.domain,
        keys: &dkim_status.keys,
        keys_problem,
        records: &records,
        relay: RelayFacts::NotRequested,
        conflict_with: None,
        now: now_time.clone(),
    };
    let provisional = conditions(&facts, &previous.conditions);
    facts.conflict_with = conflict_owner(md, &provisional, observed.claimants);
    let mut desired = MailDomainStatus {
        observed_generation: generation,
        conditions: conditions(&facts, &previous.conditions),
        dkim: Some(dkim_status.clone()),
        records: records.clone(),
        published: observed.publishing.ledger(&previous.published).to_vec(),
        last_checked,
        keys_secret: Some(secret_name),
        credentials_secret,
        credentials_hash,
    };
    facts.relay = relay_facts(observed, &desired, credentials_after.as_ref(), &stored);
    desired.conditions = conditions(&facts, &previous.conditions);
    let all_verified = records
        .iter()
        .all(|r| matches!(r.state, RecordState::Verified | RecordState::Removable));
    match observed.publishing.condition(all_verified) {
        None => desired
            .conditions
            .retain(|c| c.type_ != ConditionType::DnsPublished),
        Some((status, reason, message)) => Condition::upsert(
            &mut desired.conditions,
            Condition::new(
                ConditionType::DnsPublished,
                status,
                reason,
                message,
                generation,
                now_time.clone(),
            ),
        ),
    }

    if md.status.as_ref() != Some(&desired) {
        writes.push(Write::Status(Box::new(desired.clone())));
    }

    // Only once status says Retired may the private keys go.
    if removing.len() != stored.len() {
        let ledger = secrets::ledger(&dkim_status.keys, &removing);
        writes.push(Write::RemovePrivateKeys(KeyRecord {
            entries: removing,
            ledger,
        }));
    }

    let keys_made = fresh.keys_failed.is_none();
    events.extend(change_notes(previous, &desired, plan.as_ref(), keys_made));
    Ok(Decision {
        writes,
        status: desired,
        events,
        wake_at: plan.as_ref().and_then(|p| p.wake_at),
        rotations,
    })
}

/// The MailDomain (`namespace/name`) that owns this domain, when another
/// one does: the claim owner among the other claimants and this one with
/// the conditions it is about to have.
fn conflict_owner(
    md: &MailDomain,
    conditions: &[Condition],
    claimants: &[Arc<MailDomain>],
) -> Option<String> {
    let me = ObjectRef::from_obj(md);
    let mut as_decided = md.clone();
    as_decided.status = Some(MailDomainStatus {
        conditions: conditions.to_vec(),
        ..MailDomainStatus::default()
    });
    let others = claimants
        .iter()
        .map(|other| &**other)
        .filter(|other| ObjectRef::from_obj(*other) != me);
    let owner = claim_owner(others.chain(std::iter::once(&as_decided)))?;
    (owner != me).then(|| {
        format!(
            "{}/{}",
            owner.namespace.as_deref().unwrap_or_default(),
            owner.name
        )
    })
}

/// `RelayAccepted`: the relay membership of the MailDomain as it will be
/// once this decision is carried out.
fn relay_facts(
    observed: &Observed<'_>,
    desired: &MailDomainStatus,
    credentials: Option<&Secret>,
    stored_keys: &BTreeMap<String, PrivateKeyPem>,
) -> RelayFacts {
    let md = observed.domain;
    let relay_id = membership::relay_of(md)
        .map(|r| membership::relay_id(&r))
        .unwrap_or_default();
    let (relay, labels) = match observed.relay {
        RelayView::NotRequested => return RelayFacts::NotRequested,
        RelayView::NotFound { .. } => {
            return refused(md, &relay_id, &LeftOut::RelayNotFound);
        }
        RelayView::Refused { why } => {
            return refused(
                md,
                &relay_id,
                &LeftOut::NamespaceNotAllowed(why.to_string()),
            );
        }
        RelayView::Admitted {
            relay,
            namespace_labels,
        } => (relay, namespace_labels),
    };
    let mut as_decided = md.clone();
    as_decided.status = Some(desired.clone());
    let keys_after = match observed.keys {
        KeySecret::Ours(_) | KeySecret::Absent => Some(secrets::keys_secret(md, stored_keys, &[])),
        KeySecret::NotOurs => None,
    };
    let verdict = membership::membership(&Candidate {
        domain: &as_decided,
        relay: Some(relay),
        namespace_labels: labels,
        key_secret: keys_after.as_ref(),
        credentials_secret: credentials,
    });
    match verdict {
        Ok(_) if observed.no_room => refused(md, &relay_id, &LeftOut::ConfigFull),
        Ok(_) => RelayFacts::Accepted { relay: relay_id },
        Err(why) => refused(md, &relay_id, &why),
    }
}

fn refused(md: &MailDomain, relay: &str, why: &LeftOut) -> RelayFacts {
    RelayFacts::Refused {
        reason: why.reason(),
        message: why.describe(md, relay),
    }
}

/// Events for what changed: key lifecycle steps from the plan, Secrets we
/// will not touch, and record verdicts that flipped.
fn change_notes(
    previous: &MailDomainStatus,
    desired: &MailDomainStatus,
    plan: Option<&RotationPlan>,
    keys_made: bool,
) -> Vec<Note> {
    let mut notes = Vec::new();
    let reported_before = |reason: Reason| {
        Condition::find(&previous.conditions, ConditionType::KeysReady)
            .is_some_and(|c| c.has_reason(reason))
    };
    for event in plan.iter().flat_map(|p| p.events.iter()) {
        // A key that could not be made or stored was not generated.
        if !keys_made && matches!(event, RotationEvent::Generated { .. }) {
            continue;
        }
        if matches!(event, RotationEvent::ActiveKeyMissing { .. })
            && (reported_before(Reason::ActiveKeyMissing)
                || reported_before(Reason::ActiveKeyTampered))
        {
            continue;
        }
        notes.push(Note {
            warning: event.is_warning(),
            reason: event.reason(),
            action: "Rotate",
            message: event.to_string(),
        });
    }
    for (reason, action) in [
        (Reason::SecretNotOwned, "StoreKeys"),
        (Reason::ActiveKeyTampered, "CheckKeys"),
    ] {
        if let Some(c) = Condition::find(&desired.conditions, ConditionType::KeysReady)
            && c.has_reason(reason)
            && !reported_before(reason)
        {
            notes.push(Note {
                warning: true,
                reason: reason.as_str(),
                action,
                message: c.message.clone(),
            });
        }
    }
    if let Some(c) = Condition::find(&desired.conditions, ConditionType::RelayAccepted)
        && c.status == ConditionStatus::False
        && (c.has_reason(Reason::CredentialsTampered)
            || c.has_reason(Reason::CredentialsSecretNotOwned))
        && Condition::find(&previous.conditions, ConditionType::RelayAccepted)
            .is_none_or(|p| p.reason != c.reason)
    {
        notes.push(Note {
            warning: true,
            reason: if c.has_reason(Reason::CredentialsTampered) {
                "CredentialsTampered"
            } else {
                "CredentialsSecretNotOwned"
            },
            action: "CheckCredentials",
            message: c.message.clone(),
        });
    }
    // A verdict that flips is news; a DNS error in between is not (the
    // record keeps its verdict), so compare conditions, not record states.
    // What became verified in one reconcile is one event, told with the
    // key it activated when it did (onboarding is then two events, not
    // five: each is a write at the API server).
    let mut verified = Vec::new();
    for type_ in [
        ConditionType::DkimVerified,
        ConditionType::SpfVerified,
        ConditionType::DmarcVerified,
    ] {
        let before = Condition::find(&previous.conditions, type_).map(|c| c.status);
        let Some(after) = Condition::find(&desired.conditions, type_) else {
            continue;
        };
        match (before, after.status) {
            (Some(ConditionStatus::True), ConditionStatus::False) => notes.push(Note {
                warning: true,
                reason: "RecordDisappeared",
                action: "CheckDNS",
                message: format!(
                    "{} is no longer verified: {}",
                    type_.as_str(),
                    after.message
                ),
            }),
            (before, ConditionStatus::True) if before != Some(ConditionStatus::True) => {
                verified.push(format!("{}: {}", type_.as_str(), after.message));
            }
            _ => {}
        }
    }
    if !verified.is_empty() {
        let verified = verified.join("; ");
        match notes.iter_mut().find(|n| n.reason == "KeyActivated") {
            Some(activated) => activated.message = format!("{}; {verified}", activated.message),
            None => notes.push(Note {
                warning: false,
                reason: "RecordVerified",
                action: "CheckDNS",
                message: verified,
            }),
        }
    }
    notes
}

/// The Kubernetes event type of a note.
pub fn event_type(note: &Note) -> EventType {
    if note.warning {
        EventType::Warning
    } else {
        EventType::Normal
    }
}

/// Statuses of the keys a decision would record, for tests and metrics.
pub fn keys_of(status: &MailDomainStatus) -> &[crate::api::DkimKeyStatus] {
    status
        .dkim
        .as_ref()
        .map(|d: &DkimStatus| d.keys.as_slice())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyState, MailDomainSpec, MailRelaySpec, RecordPurpose};
    use crate::dkim::NewKey;
    use crate::dns::records::dkim_record_name;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn domain() -> MailDomain {
        let spec: MailDomainSpec = serde_json::from_value(serde_json::json!({
            "domain": "acme.example",
            "relayRef": {"name": "shared", "namespace": "mail"},
            "dkim": {"algorithm": "Ed25519"},
        }))
        .unwrap();
        let mut md = MailDomain::new("acme", spec);
        md.metadata.namespace = Some("tenant".into());
        md.metadata.uid = Some("uid-1".into());
        md.metadata.generation = Some(1);
        md
    }

    fn relay() -> MailRelay {
        let spec: MailRelaySpec = serde_json::from_value(serde_json::json!({
            "hostname": "relay.platform.test",
            "upstream": {"host": "smtp.platform.test"},
            "spf": {"egressIPs": ["192.0.2.10"]},
            "allowedNamespaces": {"from": "All"},
        }))
        .unwrap();
        let mut relay = MailRelay::new("shared", spec);
        relay.metadata.namespace = Some("mail".into());
        relay
    }

    fn new_key(selector: &str) -> GeneratedKey {
        dkim::generate(&NewKey {
            selector: selector.into(),
            algorithm: crate::api::KeyAlgorithm::Ed25519,
            size: None,
            generation: 1,
        })
        .unwrap()
    }

    /// What a test sees: everything `Observed` borrows, owned.
    struct World {
        md: MailDomain,
        keys: Option<Secret>,
        credentials: Option<Secret>,
        relay: MailRelay,
        labels: BTreeMap<String, String>,
        dns: Vec<RecordOutcome>,
        now: Timestamp,
    }

    impl World {
        fn new() -> Self {
            Self {
                md: domain(),
                keys: None,
                credentials: None,
                relay: relay(),
                labels: BTreeMap::new(),
                dns: Vec::new(),
                now: at(0),
            }
        }

        fn observed(&self) -> Observed<'_> {
            Observed {
                domain: &self.md,
                now: self.now,
                keys: match &self.keys {
                    None => KeySecret::Absent,
                    Some(secret) if secrets::is_ours(secret, &self.md) => KeySecret::Ours(secret),
                    Some(_) => KeySecret::NotOurs,
                },
                credentials: self.credentials.as_ref(),
                relay: RelayView::Admitted {
                    relay: &self.relay,
                    namespace_labels: &self.labels,
                },
                dns: &self.dns,
                claimants: &[],
                no_room: false,
                publishing: &super::super::dns_publish::Publishing::Manual,
                delegation: &Delegation::NotRequested,
            }
        }

        /// Decides with fresh material for whatever is needed, and carries
        /// the writes out on the world (the API server's part).
        fn step(&mut self, keys: &[&str]) -> Decision {
            let needs = needs(&self.observed()).unwrap();
            let fresh = Fresh {
                keys: needs
                    .keys
                    .iter()
                    .zip(keys)
                    .map(|(request, selector)| {
                        let mut key = new_key(&request.selector);
                        key.selector = (*selector).to_string();
                        (key, request.generation)
                    })
                    .collect(),
                password: needs.password.then(|| "p".repeat(64)),
                ..Fresh::default()
            };
            let decision = decide(&self.observed(), &fresh).unwrap();
            self.carry_out(&decision);
            decision
        }

        fn carry_out(&mut self, decision: &Decision) {
            for write in &decision.writes {
                match write {
                    Write::StoreKeys(record) | Write::RemovePrivateKeys(record) => {
                        self.keys = Some(secrets::keys_secret(
                            &self.md,
                            &record.entries,
                            &record.ledger,
                        ));
                    }
                    Write::StoreCredentials {
                        username,
                        password,
                        host,
                        port,
                    } => {
                        self.credentials = Some(secrets::credentials_secret(
                            &self.md, host, *port, username, password,
                        ));
                    }
                    Write::Status(status) => self.md.status = Some((**status).clone()),
                }
            }
        }

        /// DNS answers for what the status asks now: `verified` selectors'
        /// records verified, every other record missing.
        fn dns_says(&mut self, verified: &[&str]) {
            let observed = self.observed();
            let expected = records_to_check(
                &self.md,
                observed.keys,
                &observed.relay,
                &Delegation::NotRequested,
            );
            self.dns = expected
                .into_iter()
                .map(|record| {
                    let ok = match &record.requirement {
                        Requirement::DkimPublicKey { selector, .. } => {
                            verified.contains(&selector.as_str())
                        }
                        Requirement::MayBeRemoved => {
                            return RecordOutcome {
                                record,
                                verdict: None,
                            };
                        }
                        _ => true,
                    };
                    RecordOutcome {
                        record,
                        verdict: Some(if ok {
                            Verdict::Verified
                        } else {
                            Verdict::Missing {
                                reason: "no TXT".into(),
                            }
                        }),
                    }
                })
                .collect();
        }

        fn condition(&self, type_: ConditionType) -> &Condition {
            Condition::find(&self.md.status.as_ref().unwrap().conditions, type_).unwrap()
        }

        fn active(&self) -> Vec<String> {
            keys_of(self.md.status.as_ref().unwrap())
                .iter()
                .filter(|k| k.state == KeyState::Active)
                .map(|k| k.selector.clone())
                .collect()
        }
    }

    fn kinds(decision: &Decision) -> Vec<&'static str> {
        decision
            .writes
            .iter()
            .map(|w| match w {
                Write::StoreKeys(_) => "StoreKeys",
                Write::StoreCredentials { .. } => "StoreCredentials",
                Write::Status(_) => "Status",
                Write::RemovePrivateKeys(_) => "RemovePrivateKeys",
            })
            .collect()
    }

    /// A domain onboarded to Ready: key stored, credentials stored, status.
    fn ready_world() -> World {
        let mut world = World::new();
        let first = world.step(&["ma20270115a"]);
        assert_eq!(
            kinds(&first),
            ["StoreKeys", "StoreCredentials", "Status"],
            "keys and credentials are stored before the status names them"
        );
        world.dns_says(&["ma20270115a"]);
        world.step(&[]);
        assert_eq!(world.active(), ["ma20270115a"]);
        assert_eq!(
            world.condition(ConditionType::Ready).status,
            ConditionStatus::True
        );
        assert!(
            world
                .condition(ConditionType::RelayAccepted)
                .has_reason(Reason::Accepted)
        );
        world
    }

    #[test]
    fn onboarding_stores_before_naming_and_then_changes_nothing() {
        let mut world = ready_world();
        let again = world.step(&[]);
        assert!(again.writes.is_empty(), "{:?}", kinds(&again));
        assert!(again.events.is_empty(), "{:?}", again.events);
    }

    #[test]
    fn onboarding_is_told_in_two_events_the_verified_records_with_the_key_they_activated() {
        let mut world = World::new();
        let first = world.step(&["ma20270115a"]);
        let reasons = |d: &Decision| d.events.iter().map(|e| e.reason).collect::<Vec<_>>();
        assert_eq!(reasons(&first), ["KeyGenerated"]);
        world.dns_says(&["ma20270115a"]);
        let verified = world.step(&[]);
        assert_eq!(reasons(&verified), ["KeyActivated"]);
        let message = &verified.events[0].message;
        for type_ in ["DKIMVerified", "SPFVerified", "DMARCVerified"] {
            assert!(message.contains(type_), "{type_} not told in {message:?}");
        }

        // A record verified later, with no key activated: its own event.
        let mut world = World::new();
        world.step(&["ma20270115a"]);
        world.dns_says(&[]);
        let records_only = world.step(&[]);
        assert_eq!(reasons(&records_only), ["RecordVerified"]);
        assert!(records_only.events[0].message.contains("SPFVerified"));
        assert!(!records_only.events[0].message.contains("DKIMVerified"));
    }

    #[test]
    fn a_key_that_could_not_be_made_is_never_named_and_the_status_says_why() {
        let mut world = World::new();
        let needs = needs(&world.observed()).unwrap();
        assert_eq!(needs.keys.len(), 1);
        let failed = Fresh {
            keys_failed: Some("storing the keys: 500".into()),
            password: Some("p".repeat(64)),
            ..Fresh::default()
        };
        let decision = decide(&world.observed(), &failed).unwrap();
        assert!(!kinds(&decision).contains(&"StoreKeys"));
        world.carry_out(&decision);
        assert!(keys_of(world.md.status.as_ref().unwrap()).is_empty());
        let keys = world.condition(ConditionType::KeysReady);
        assert!(keys.has_reason(Reason::KeyGenerationFailed), "{keys:?}");
        assert!(keys.message.contains("500"));
        assert_eq!(
            world.condition(ConditionType::Ready).status,
            ConditionStatus::False
        );
    }

    #[test]
    fn an_edited_active_key_is_reported_and_not_replaced_or_served() {
        let mut world = ready_world();
        let other = new_key("ma20270115a");
        world.keys = Some(secrets::keys_secret(
            &world.md,
            &BTreeMap::from([("ma20270115a".to_string(), other.private_key_pem)]),
            &[],
        ));
        let decision = world.step(&["never-made"]);
        assert!(
            !kinds(&decision).contains(&"StoreKeys"),
            "no replacement key"
        );
        assert!(
            world
                .condition(ConditionType::KeysReady)
                .has_reason(Reason::ActiveKeyTampered)
        );
        assert!(
            world
                .condition(ConditionType::RelayAccepted)
                .has_reason(Reason::KeySecretProblem)
        );
        assert_eq!(
            world.condition(ConditionType::Ready).status,
            ConditionStatus::False
        );
        assert_eq!(
            world.active(),
            ["ma20270115a"],
            "the Active key stays Active"
        );
        assert!(
            decision
                .events
                .iter()
                .any(|e| e.reason == "ActiveKeyTampered")
        );
        let again = world.step(&[]);
        assert!(
            again.writes.is_empty() && again.events.is_empty(),
            "reported once"
        );
    }

    #[test]
    fn credentials_the_tenant_changed_are_not_adopted_and_take_the_domain_off_the_relay() {
        let mut world = ready_world();
        let username = secrets::smtp_username(&world.md);
        world.credentials = Some(secrets::credentials_secret(
            &world.md,
            "h",
            587,
            &username,
            "chosen-by-the-tenant",
        ));
        let decision = world.step(&[]);
        assert!(!kinds(&decision).contains(&"StoreCredentials"));
        let accepted = world.condition(ConditionType::RelayAccepted);
        assert!(
            accepted.has_reason(Reason::CredentialsTampered),
            "{accepted:?}"
        );
        assert!(accepted.message.contains("acme-smtp"));
        assert_eq!(
            world.condition(ConditionType::Ready).status,
            ConditionStatus::False
        );
        assert_eq!(
            world.md.status.as_ref().unwrap().credentials_hash,
            Some(secrets::credentials_hash(&username, &"p".repeat(64))),
            "the recorded hash is the operator's"
        );
        // Deleting the Secret gets new credentials, in two steps: the record
        // is forgotten first, so a crash can never look like tampering.
        world.credentials = None;
        let forget = world.step(&[]);
        assert_eq!(kinds(&forget), ["Status"]);
        assert!(world.md.status.as_ref().unwrap().credentials_hash.is_none());
        let regenerate = world.step(&[]);
        assert_eq!(kinds(&regenerate), ["StoreCredentials", "Status"]);
        assert_eq!(
            world.condition(ConditionType::Ready).status,
            ConditionStatus::True
        );
    }

    #[test]
    fn a_foreign_secret_in_the_way_is_never_written_and_status_still_says_so() {
        let mut world = World::new();
        let mut foreign = secrets::credentials_secret(&world.md, "h", 1, "x", "y");
        foreign.metadata.labels = None;
        foreign.metadata.owner_references = None;
        world.credentials = Some(foreign.clone());
        let decision = world.step(&["ma20270115a"]);
        assert!(!kinds(&decision).contains(&"StoreCredentials"));
        assert_eq!(world.credentials, Some(foreign));
        assert!(
            world
                .condition(ConditionType::RelayAccepted)
                .has_reason(Reason::CredentialsSecretNotOwned)
        );
    }

    #[test]
    fn a_rotation_keeps_the_old_key_signing_until_the_new_one_verifies() {
        let mut world = ready_world();
        world
            .md
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(ROTATE_ANNOTATION.into(), "now".into());
        world.now = at(60);
        let rotate = world.step(&["ma20270115b"]);
        assert_eq!(kinds(&rotate), ["StoreKeys", "Status"]);
        assert_eq!(rotate.rotations, 1);
        assert_eq!(world.active(), ["ma20270115a"]);
        assert_eq!(
            world.condition(ConditionType::Ready).status,
            ConditionStatus::True
        );
        world.dns_says(&["ma20270115a", "ma20270115b"]);
        world.step(&[]);
        assert_eq!(world.active(), ["ma20270115b"]);
        // Overlap over: Retired, then the private key goes, after the status.
        world.now = at(60 + 8 * 86_400);
        world.dns_says(&["ma20270115a", "ma20270115b"]);
        let retire = world.step(&[]);
        assert_eq!(kinds(&retire), ["Status", "RemovePrivateKeys"]);
        let stored = secrets::stored_selectors(world.keys.as_ref().unwrap());
        assert!(!stored.contains("ma20270115a"));
        assert!(stored.contains("ma20270115b"));
    }

    #[test]
    fn a_verdict_of_another_claimant_at_an_older_generation_is_no_claim() {
        let mut world = ready_world();
        let mut other = domain();
        other.metadata.namespace = Some("other".into());
        other.metadata.name = Some("rival".into());
        other.metadata.generation = Some(2);
        let mut status = world.md.status.clone().unwrap();
        for condition in &mut status.conditions {
            condition.last_transition_time = Time(at(-1000));
        }
        other.status = Some(status);
        let claimants = vec![Arc::new(other.clone())];
        let observed = Observed {
            claimants: &claimants,
            ..world.observed()
        };
        let decision = decide(&observed, &Fresh::default()).unwrap();
        assert!(
            Condition::find(&decision.status.conditions, ConditionType::DomainConflict)
                .is_some_and(|c| c.status == ConditionStatus::False),
            "a rival's verdict for generation 1 when it is at 2 claims nothing"
        );
        // The same rival, verified at its current generation and earlier,
        // owns the domain.
        other.metadata.generation = Some(1);
        let claimants = vec![Arc::new(other)];
        let observed = Observed {
            claimants: &claimants,
            ..world.observed()
        };
        let decision = decide(&observed, &Fresh::default()).unwrap();
        assert!(
            Condition::find(&decision.status.conditions, ConditionType::DomainConflict)
                .is_some_and(|c| c.status == ConditionStatus::True)
        );
        assert!(
            Condition::find(&decision.status.conditions, ConditionType::RelayAccepted)
                .is_some_and(|c| c.has_reason(Reason::DomainConflict))
        );
        world.dns.clear();
    }

    /// The same MailDomain re-created (or restored) without status, over
    /// the key Secret the first one kept.
    fn recreated(world: &World) -> World {
        let mut again = World::new();
        again.md.metadata.uid = Some("uid-2".into());
        again.keys = world.keys.clone();
        again.credentials = world.credentials.clone();
        again
    }

    #[test]
    fn a_maildomain_without_status_adopts_the_keys_its_secret_records() {
        let mut world = ready_world();
        let mut again = recreated(&world);
        again.dns_says(&["ma20270115a"]);
        let adopt = again.step(&["never-made"]);
        assert!(
            !again
                .md
                .status
                .as_ref()
                .unwrap()
                .dkim
                .as_ref()
                .unwrap()
                .keys
                .iter()
                .any(|k| k.selector == "never-made"),
            "no new key"
        );
        assert_eq!(
            again.active(),
            ["ma20270115a"],
            "the same key, still Active"
        );
        assert_eq!(
            again.condition(ConditionType::Ready).status,
            ConditionStatus::True,
            "served again once DNS confirms it: {:?}",
            again.md.status
        );
        // The Secret is taken over by the new MailDomain, keys unchanged.
        let record = adopt
            .writes
            .iter()
            .find_map(|w| match w {
                Write::StoreKeys(record) => Some(record),
                _ => None,
            })
            .expect("the Secret is taken over");
        assert_eq!(record.entries.keys().collect::<Vec<_>>(), ["ma20270115a"]);
        let secret = again.keys.as_ref().unwrap();
        assert!(secrets::is_owned_by(secret, &again.md));
        let settled = again.step(&[]);
        assert!(settled.writes.is_empty(), "{:?}", kinds(&settled));
        // The first one still has its key, the same.
        assert_eq!(world.step(&[]).writes.len(), 0);
    }

    #[test]
    fn an_adopted_key_that_dns_does_not_confirm_is_not_served() {
        let world = ready_world();
        let mut again = recreated(&world);
        again.dns_says(&[]);
        again.step(&["never-made"]);
        let keys = keys_of(again.md.status.as_ref().unwrap());
        assert_eq!(
            keys.iter().map(|k| k.selector.as_str()).collect::<Vec<_>>(),
            ["ma20270115a"],
            "kept, not replaced"
        );
        assert!(
            again.active().is_empty(),
            "not signing before DNS confirms it"
        );
        assert_eq!(
            again.condition(ConditionType::Ready).status,
            ConditionStatus::False
        );
    }

    #[test]
    fn a_key_stored_just_before_a_crash_is_adopted_and_not_made_again() {
        let mut world = ready_world();
        world
            .md
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(ROTATE_ANNOTATION.into(), "now".into());
        world.now = at(60);
        let needs = needs(&world.observed()).unwrap();
        let fresh = Fresh {
            keys: vec![(new_key("ma20270115b"), needs.keys[0].generation)],
            ..Fresh::default()
        };
        let rotate = decide(&world.observed(), &fresh).unwrap();
        // The key is stored; the operator dies before the status write.
        let Write::StoreKeys(record) = &rotate.writes[0] else {
            panic!("{:?}", kinds(&rotate));
        };
        world.keys = Some(secrets::keys_secret(
            &world.md,
            &record.entries,
            &record.ledger,
        ));
        let after = world.step(&["ma20270115c"]);
        assert!(!kinds(&after).contains(&"StoreKeys"), "{:?}", kinds(&after));
        let pending: Vec<_> = keys_of(world.md.status.as_ref().unwrap())
            .iter()
            .filter(|k| k.state == KeyState::Pending)
            .map(|k| k.selector.clone())
            .collect();
        assert_eq!(pending, ["ma20270115b"], "the stored key, not a second");
    }

    #[test]
    fn an_entry_that_neither_status_nor_ledger_records_is_removed() {
        let mut world = ready_world();
        let mut entries = secrets::stored_entries(world.keys.as_ref().unwrap());
        entries.insert("stray".into(), new_key("stray").private_key_pem);
        world.keys = Some(secrets::keys_secret(&world.md, &entries, &[]));
        let decision = world.step(&[]);
        assert_eq!(kinds(&decision), ["StoreKeys"]);
        let stored = secrets::stored_selectors(world.keys.as_ref().unwrap());
        assert_eq!(stored, HashSet::from(["ma20270115a".to_string()]));
        assert_eq!(world.active(), ["ma20270115a"]);
    }

    #[test]
    fn records_are_named_for_the_domain_of_the_spec() {
        let world = ready_world();
        let status = world.md.status.as_ref().unwrap();
        let dkim = status
            .records
            .iter()
            .find(|r| r.purpose == RecordPurpose::Dkim)
            .unwrap();
        assert_eq!(dkim.name, dkim_record_name("ma20270115a", "acme.example"));
    }
}
