//! The conditions of a MailDomain, derived from plain facts (pure). Every
//! condition that is not True says in its message what the tenant should do.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    Condition, ConditionStatus, ConditionType, DkimKeyStatus, DnsRecordStatus, KeyState,
    RecordState,
};

/// Something wrong with the key Secret that keeps keys from being ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeysProblem {
    /// A Secret of our name exists and is not ours: we never overwrite it.
    SecretNotOwned { secret: String },
    /// The private key of an Active selector is gone from the Secret.
    ActiveKeyMissing {
        secret: String,
        selectors: Vec<String>,
    },
    /// Generating or storing a key failed.
    GenerationFailed { message: String },
}

/// Whether the referenced relay serves this domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelayFacts {
    /// No `relayRef`.
    NotRequested,
    Accepted {
        relay: String,
    },
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// What the conditions are computed from.
pub struct DomainFacts<'a> {
    pub generation: Option<i64>,
    pub keys: &'a [DkimKeyStatus],
    pub keys_problem: Option<KeysProblem>,
    pub records: &'a [DnsRecordStatus],
    pub relay: RelayFacts,
    /// The MailDomain (`namespace/name`) that verified this domain first,
    /// when it is another one.
    pub conflict_with: Option<String>,
    pub now: Time,
}

/// The full condition list, reusing `previous` transition times where the
/// status did not change.
pub fn conditions(facts: &DomainFacts<'_>, previous: &[Condition]) -> Vec<Condition> {
    let mut list = previous.to_vec();
    let make = |type_, status, reason: &str, message: String| Condition {
        type_,
        status,
        reason: reason.to_string(),
        message,
        observed_generation: facts.generation,
        last_transition_time: facts.now.clone(),
    };

    let keys = keys_ready(facts);
    let dkim = dkim_verified(facts, previous);
    let spf = record_condition(facts, previous, "SPF", ConditionType::SpfVerified);
    let dmarc = record_condition(facts, previous, "DMARC", ConditionType::DmarcVerified);
    let relay = match &facts.relay {
        RelayFacts::NotRequested => None,
        RelayFacts::Accepted { relay } => Some((
            ConditionStatus::True,
            "Accepted",
            format!("MailRelay {relay} serves this domain"),
        )),
        RelayFacts::Refused { reason, message } => {
            Some((ConditionStatus::False, *reason, message.clone()))
        }
    };
    let conflict = match &facts.conflict_with {
        Some(owner) => (
            ConditionStatus::True,
            "DomainClaimed",
            format!(
                "MailDomain {owner} verified {} first and owns it; this one is never given to a relay. Delete one of the two",
                domain_of(facts)
            ),
        ),
        None => (
            ConditionStatus::False,
            "NoConflict",
            "no other MailDomain claims this domain".to_string(),
        ),
    };

    let relay_ok = relay
        .as_ref()
        .is_none_or(|(status, ..)| *status == ConditionStatus::True);
    let ready = if keys.0 != ConditionStatus::True {
        (
            ConditionStatus::False,
            "KeysNotReady",
            format!("keys are not ready: {}", keys.2),
        )
    } else if dkim.0 != ConditionStatus::True {
        (ConditionStatus::False, "DKIMNotVerified", dkim.2.clone())
    } else if facts.conflict_with.is_some() {
        (ConditionStatus::False, "DomainConflict", conflict.2.clone())
    } else if !relay_ok {
        let message = relay.as_ref().map(|r| r.2.clone()).unwrap_or_default();
        (ConditionStatus::False, "RelayNotAccepted", message)
    } else {
        (
            ConditionStatus::True,
            "Ready",
            "the active DKIM key is published and verified; mail can be signed".to_string(),
        )
    };

    for (type_, (status, reason, message)) in [
        (ConditionType::KeysReady, keys),
        (ConditionType::DkimVerified, dkim),
        (ConditionType::SpfVerified, spf),
        (ConditionType::DmarcVerified, dmarc),
        (ConditionType::DomainConflict, conflict),
        (ConditionType::Ready, ready),
    ] {
        Condition::upsert(&mut list, make(type_, status, reason, message));
    }
    match relay {
        Some((status, reason, message)) => Condition::upsert(
            &mut list,
            make(ConditionType::RelayAccepted, status, reason, message),
        ),
        None => list.retain(|c| c.type_ != ConditionType::RelayAccepted),
    }
    list
}

type Verdict = (ConditionStatus, &'static str, String);

fn domain_of(facts: &DomainFacts<'_>) -> String {
    facts
        .records
        .iter()
        .find(|r| r.purpose == "DMARC")
        .map(|r| r.name.trim_start_matches("_dmarc.").to_string())
        .unwrap_or_else(|| "this domain".into())
}

fn keys_ready(facts: &DomainFacts<'_>) -> Verdict {
    match &facts.keys_problem {
        Some(KeysProblem::SecretNotOwned { secret }) => (
            ConditionStatus::False,
            "SecretNotOwned",
            format!(
                "Secret {secret} exists and is not managed by this MailDomain; it is never overwritten. Delete or rename it"
            ),
        ),
        Some(KeysProblem::ActiveKeyMissing { secret, selectors }) => (
            ConditionStatus::False,
            "ActiveKeyMissing",
            format!(
                "the private key of active selector {} is missing from Secret {secret}: restore it from a backup; \
                 to replace the key instead, set annotation mailauth.dev/rotate-requested to a new value and publish the new record",
                selectors.join(", ")
            ),
        ),
        Some(KeysProblem::GenerationFailed { message }) => (
            ConditionStatus::False,
            "KeyGenerationFailed",
            format!("generating keys failed: {message}"),
        ),
        None if facts
            .keys
            .iter()
            .any(|k| matches!(k.state, KeyState::Active | KeyState::Pending)) =>
        {
            let selectors: Vec<&str> = facts
                .keys
                .iter()
                .filter(|k| matches!(k.state, KeyState::Active | KeyState::Pending))
                .map(|k| k.selector.as_str())
                .collect();
            (
                ConditionStatus::True,
                "KeysStored",
                format!("private keys stored for {}", selectors.join(", ")),
            )
        }
        None => (
            ConditionStatus::False,
            "Generating",
            "generating DKIM keys".to_string(),
        ),
    }
}

fn dkim_record<'a>(facts: &'a DomainFacts<'_>, selector: &str) -> Option<&'a DnsRecordStatus> {
    let prefix = format!("{selector}._domainkey.");
    facts
        .records
        .iter()
        .find(|r| r.purpose == "DKIM" && r.name.starts_with(&prefix))
}

fn publish_instruction(record: &DnsRecordStatus) -> String {
    format!(
        "publish {} {} \"{}\"",
        record.type_, record.name, record.value
    )
}

fn what_dns_says(record: &DnsRecordStatus) -> String {
    match record.state {
        RecordState::Mismatch => format!(
            "{} holds something else ({}); {}",
            record.name,
            record.found.as_deref().unwrap_or("?"),
            publish_instruction(record)
        ),
        RecordState::Error => format!(
            "checking {} failed ({}); the verdict will be retried",
            record.name,
            record.error.as_deref().unwrap_or("DNS error")
        ),
        RecordState::Unchecked => format!(
            "{} is not checked yet; {}",
            record.name,
            publish_instruction(record)
        ),
        _ => publish_instruction(record),
    }
}

fn reason_for(state: RecordState) -> &'static str {
    match state {
        RecordState::Verified => "Verified",
        RecordState::Missing => "RecordMissing",
        RecordState::Mismatch => "RecordMismatch",
        RecordState::Error => "DNSError",
        RecordState::Unchecked => "NotChecked",
        RecordState::Removable => "Removable",
    }
}

/// A DNS error keeps a True verdict (never demote on a failed lookup);
/// otherwise an error is Unknown, never "missing".
fn keep_on_error(previous: &[Condition], type_: ConditionType, message: String) -> Verdict {
    if let Some(prev) =
        Condition::find(previous, type_).filter(|c| c.status == ConditionStatus::True)
    {
        (
            ConditionStatus::True,
            "Verified",
            format!(
                "{}; the last check failed ({message}), keeping the previous verdict",
                prev.message
                    .split("; the last check failed")
                    .next()
                    .unwrap_or_default()
            ),
        )
    } else {
        (ConditionStatus::Unknown, "DNSError", message)
    }
}

fn dkim_verified(facts: &DomainFacts<'_>, previous: &[Condition]) -> Verdict {
    let active: Vec<&DkimKeyStatus> = facts
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Active)
        .collect();
    let pending: Vec<&DkimKeyStatus> = facts
        .keys
        .iter()
        .filter(|k| k.state == KeyState::Pending)
        .collect();
    let pending_instructions: Vec<String> = pending
        .iter()
        .filter_map(|k| dkim_record(facts, &k.selector))
        .map(publish_instruction)
        .collect();

    if active.is_empty() {
        return match pending
            .first()
            .and_then(|k| dkim_record(facts, &k.selector))
        {
            Some(record) if record.state == RecordState::Error => {
                (ConditionStatus::Unknown, "DNSError", what_dns_says(record))
            }
            Some(record) => (
                ConditionStatus::False,
                reason_for(record.state),
                format!(
                    "no key is active yet: {}",
                    pending
                        .iter()
                        .filter_map(|k| dkim_record(facts, &k.selector))
                        .map(what_dns_says)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ),
            None => (
                ConditionStatus::False,
                "NoKey",
                "no DKIM key exists yet".to_string(),
            ),
        };
    }

    let records: Vec<&DnsRecordStatus> = active
        .iter()
        .filter_map(|k| dkim_record(facts, &k.selector))
        .collect();
    if let Some(bad) = records
        .iter()
        .find(|r| matches!(r.state, RecordState::Missing | RecordState::Mismatch))
    {
        return (
            ConditionStatus::False,
            reason_for(bad.state),
            what_dns_says(bad),
        );
    }
    if let Some(err) = records.iter().find(|r| r.state == RecordState::Error) {
        return keep_on_error(previous, ConditionType::DkimVerified, what_dns_says(err));
    }
    if records.len() < active.len() || records.iter().any(|r| r.state != RecordState::Verified) {
        return (
            ConditionStatus::Unknown,
            "NotChecked",
            "the active selector's record is not checked yet".into(),
        );
    }
    let selectors: Vec<&str> = active.iter().map(|k| k.selector.as_str()).collect();
    if pending_instructions.is_empty() {
        (
            ConditionStatus::True,
            "Verified",
            format!("active selector {} is published", selectors.join(", ")),
        )
    } else {
        (
            ConditionStatus::True,
            "RotationPending",
            format!(
                "active selector {} is published and keeps signing; to complete the rotation {}",
                selectors.join(", "),
                pending_instructions.join("; ")
            ),
        )
    }
}

fn record_condition(
    facts: &DomainFacts<'_>,
    previous: &[Condition],
    purpose: &str,
    type_: ConditionType,
) -> Verdict {
    let Some(record) = facts.records.iter().find(|r| r.purpose == purpose) else {
        return (
            ConditionStatus::Unknown,
            "NoRelay",
            format!(
                "{purpose} is checked once relayRef names a MailRelay that is accepted: it says what SPF must authorize"
            ),
        );
    };
    match record.state {
        RecordState::Verified => (
            ConditionStatus::True,
            "Verified",
            format!("{} is published", record.name),
        ),
        RecordState::Error => keep_on_error(previous, type_, what_dns_says(record)),
        RecordState::Unchecked => (
            ConditionStatus::Unknown,
            "NotChecked",
            what_dns_says(record),
        ),
        state => (
            ConditionStatus::False,
            reason_for(state),
            what_dns_says(record),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KeyAlgorithm;

    fn now() -> Time {
        Time(jiff::Timestamp::from_second(1_800_000_000).unwrap())
    }

    fn key(selector: &str, state: KeyState) -> DkimKeyStatus {
        DkimKeyStatus {
            selector: selector.into(),
            algorithm: KeyAlgorithm::Rsa,
            size: Some(2048),
            state,
            generation: 1,
            public_key: "AAAA".into(),
            created_at: now(),
            activated_at: None,
            retiring_at: None,
            retired_at: None,
        }
    }

    fn record(name: &str, purpose: &str, state: RecordState) -> DnsRecordStatus {
        DnsRecordStatus {
            name: name.into(),
            type_: "TXT".into(),
            value: "v=DKIM1; k=rsa; p=AAAA".into(),
            strings: vec![],
            purpose: purpose.into(),
            state,
            found: None,
            error: (state == RecordState::Error).then(|| "timed out".to_string()),
            since: Some(now()),
        }
    }

    fn facts<'a>(keys: &'a [DkimKeyStatus], records: &'a [DnsRecordStatus]) -> DomainFacts<'a> {
        DomainFacts {
            generation: Some(3),
            keys,
            keys_problem: None,
            records,
            relay: RelayFacts::NotRequested,
            conflict_with: None,
            now: now(),
        }
    }

    fn get(list: &[Condition], t: ConditionType) -> &Condition {
        Condition::find(list, t).expect("condition present")
    }

    #[test]
    fn pending_key_tells_the_tenant_what_to_publish() {
        let keys = [key("ma20261126a", KeyState::Pending)];
        let records = [record(
            "ma20261126a._domainkey.acme.example",
            "DKIM",
            RecordState::Missing,
        )];
        let list = conditions(&facts(&keys, &records), &[]);
        let dkim = get(&list, ConditionType::DkimVerified);
        assert_eq!(dkim.status, ConditionStatus::False);
        assert!(
            dkim.message.contains(
                "publish TXT ma20261126a._domainkey.acme.example \"v=DKIM1; k=rsa; p=AAAA\""
            ),
            "{}",
            dkim.message
        );
        assert_eq!(
            get(&list, ConditionType::Ready).status,
            ConditionStatus::False
        );
        assert_eq!(
            get(&list, ConditionType::KeysReady).status,
            ConditionStatus::True
        );
        assert!(list.iter().all(|c| c.observed_generation == Some(3)));
    }

    #[test]
    fn verified_active_key_makes_the_domain_ready() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let records = [record(
            "ma20261126a._domainkey.acme.example",
            "DKIM",
            RecordState::Verified,
        )];
        let list = conditions(&facts(&keys, &records), &[]);
        assert_eq!(
            get(&list, ConditionType::Ready).status,
            ConditionStatus::True
        );
        assert!(Condition::find(&list, ConditionType::RelayAccepted).is_none());
    }

    #[test]
    fn dns_error_never_demotes_a_verified_key() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let ok = [record(
            "ma20261126a._domainkey.acme.example",
            "DKIM",
            RecordState::Verified,
        )];
        let before = conditions(&facts(&keys, &ok), &[]);
        let failing = [record(
            "ma20261126a._domainkey.acme.example",
            "DKIM",
            RecordState::Error,
        )];
        let after = conditions(&facts(&keys, &failing), &before);
        assert_eq!(
            get(&after, ConditionType::DkimVerified).status,
            ConditionStatus::True
        );
        assert_eq!(
            get(&after, ConditionType::Ready).status,
            ConditionStatus::True
        );
        // Without a previous verdict an error is Unknown, never Missing.
        let fresh = conditions(&facts(&keys, &failing), &[]);
        assert_eq!(
            get(&fresh, ConditionType::DkimVerified).status,
            ConditionStatus::Unknown
        );
    }

    #[test]
    fn recomputing_the_same_facts_changes_nothing() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let records = [record(
            "ma20261126a._domainkey.acme.example",
            "DKIM",
            RecordState::Verified,
        )];
        let first = conditions(&facts(&keys, &records), &[]);
        let mut later = facts(&keys, &records);
        later.now = Time(jiff::Timestamp::from_second(1_900_000_000).unwrap());
        assert_eq!(conditions(&later, &first), first);
    }

    #[test]
    fn missing_active_key_and_conflicts_block_readiness() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let records = [record(
            "ma20261126a._domainkey.acme.example",
            "DKIM",
            RecordState::Verified,
        )];
        let mut f = facts(&keys, &records);
        f.keys_problem = Some(KeysProblem::ActiveKeyMissing {
            secret: "acme-dkim".into(),
            selectors: vec!["ma20261126a".into()],
        });
        let list = conditions(&f, &[]);
        assert_eq!(
            get(&list, ConditionType::KeysReady).reason,
            "ActiveKeyMissing"
        );
        assert_eq!(
            get(&list, ConditionType::Ready).status,
            ConditionStatus::False
        );

        let mut f = facts(&keys, &records);
        f.conflict_with = Some("other/acme".into());
        let list = conditions(&f, &[]);
        assert_eq!(
            get(&list, ConditionType::DomainConflict).status,
            ConditionStatus::True
        );
        assert_eq!(get(&list, ConditionType::Ready).reason, "DomainConflict");
    }

    #[test]
    fn refused_relay_blocks_readiness_and_says_why() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let records = [record(
            "ma20261126a._domainkey.acme.example",
            "DKIM",
            RecordState::Verified,
        )];
        let mut f = facts(&keys, &records);
        f.relay = RelayFacts::Refused {
            reason: "NamespaceNotAllowed",
            message: "MailRelay mail/shared does not admit namespace t1".into(),
        };
        let list = conditions(&f, &[]);
        assert_eq!(
            get(&list, ConditionType::RelayAccepted).status,
            ConditionStatus::False
        );
        assert!(
            get(&list, ConditionType::Ready)
                .message
                .contains("does not admit")
        );
    }
}
