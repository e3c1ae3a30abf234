//! The conditions of a MailDomain, derived from plain facts (pure). Every
//! condition that is not True says in its message what the tenant should do.
//!
//! One rule lives elsewhere on purpose: a DNS error never demotes a record
//! that was verified. That is decided per record, in
//! [`crate::dns::record_statuses`] (the record stays `Verified` with the
//! error noted), so a record that was never seen can never inherit a
//! verdict from another one.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::api::{
    Condition, ConditionStatus, ConditionType, DkimKeyStatus, DnsRecordStatus, KeyState, Reason,
    RecordPurpose, RecordState,
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
    /// The private key of an Active selector is in the Secret but is not the
    /// key whose public half was verified in DNS (edited or replaced).
    ActiveKeyTampered {
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
        reason: Reason,
        message: String,
    },
}

/// What the conditions are computed from.
pub struct DomainFacts<'a> {
    pub generation: Option<i64>,
    pub domain: &'a str,
    pub keys: &'a [DkimKeyStatus],
    pub keys_problem: Option<KeysProblem>,
    pub records: &'a [DnsRecordStatus],
    pub relay: RelayFacts,
    /// The MailDomain (`namespace/name`) that verified this domain first,
    /// when it is another one.
    pub conflict_with: Option<String>,
    pub now: Time,
}

type Verdict = (ConditionStatus, Reason, String);

/// The full condition list, reusing `previous` transition times where the
/// status did not change.
pub fn conditions(facts: &DomainFacts<'_>, previous: &[Condition]) -> Vec<Condition> {
    let mut list = previous.to_vec();
    let make = |type_, (status, reason, message): Verdict| {
        Condition::new(
            type_,
            status,
            reason,
            message,
            facts.generation,
            facts.now.clone(),
        )
    };

    let keys = keys_ready(facts);
    let dkim = dkim_verified(facts);
    let spf = record_condition(facts, RecordPurpose::Spf);
    let dmarc = record_condition(facts, RecordPurpose::Dmarc);
    let relay = match &facts.relay {
        RelayFacts::NotRequested => None,
        RelayFacts::Accepted { relay } => Some((
            ConditionStatus::True,
            Reason::Accepted,
            format!("MailRelay {relay} serves this domain"),
        )),
        RelayFacts::Refused { reason, message } => {
            Some((ConditionStatus::False, *reason, message.clone()))
        }
    };
    let conflict = match &facts.conflict_with {
        Some(owner) => (
            ConditionStatus::True,
            Reason::DomainClaimed,
            format!(
                "MailDomain {owner} verified {} first and owns it; this one is never given to a relay. Delete one of the two",
                facts.domain
            ),
        ),
        None => (
            ConditionStatus::False,
            Reason::NoConflict,
            "no other MailDomain claims this domain".to_string(),
        ),
    };

    let ready = if keys.0 != ConditionStatus::True {
        (
            ConditionStatus::False,
            Reason::KeysNotReady,
            format!("keys are not ready: {}", keys.2),
        )
    } else if dkim.0 != ConditionStatus::True {
        (
            ConditionStatus::False,
            Reason::DkimNotVerified,
            dkim.2.clone(),
        )
    } else if facts.conflict_with.is_some() {
        (
            ConditionStatus::False,
            Reason::DomainConflict,
            conflict.2.clone(),
        )
    } else if let Some((ConditionStatus::False | ConditionStatus::Unknown, _, message)) = &relay {
        (
            ConditionStatus::False,
            Reason::RelayNotAccepted,
            message.clone(),
        )
    } else {
        (
            ConditionStatus::True,
            Reason::Ready,
            "the active DKIM key is published and verified; mail can be signed".to_string(),
        )
    };

    for (type_, verdict) in [
        (ConditionType::KeysReady, keys),
        (ConditionType::DkimVerified, dkim),
        (ConditionType::SpfVerified, spf),
        (ConditionType::DmarcVerified, dmarc),
        (ConditionType::DomainConflict, conflict),
        (ConditionType::Ready, ready),
    ] {
        Condition::upsert(&mut list, make(type_, verdict));
    }
    match relay {
        Some(verdict) => Condition::upsert(&mut list, make(ConditionType::RelayAccepted, verdict)),
        None => list.retain(|c| c.type_ != ConditionType::RelayAccepted),
    }
    list
}

fn keys_ready(facts: &DomainFacts<'_>) -> Verdict {
    match &facts.keys_problem {
        Some(KeysProblem::SecretNotOwned { secret }) => (
            ConditionStatus::False,
            Reason::SecretNotOwned,
            format!(
                "Secret {secret} exists and is not managed by this MailDomain; it is never overwritten. Delete or rename it"
            ),
        ),
        Some(KeysProblem::ActiveKeyMissing { secret, selectors }) => (
            ConditionStatus::False,
            Reason::ActiveKeyMissing,
            format!(
                "the private key of active selector {} is missing from Secret {secret}: restore it from a backup; \
                 to replace the key instead, set annotation mailauth.dev/rotate-requested to a new value and publish the new record",
                selectors.join(", ")
            ),
        ),
        Some(KeysProblem::ActiveKeyTampered { secret, selectors }) => (
            ConditionStatus::False,
            Reason::ActiveKeyTampered,
            format!(
                "the private key of active selector {} in Secret {secret} is not the key published in DNS (the Secret was edited): \
                 the domain is not signed with it. Restore the Secret from a backup, or set annotation mailauth.dev/rotate-requested \
                 to a new value and publish the new record",
                selectors.join(", ")
            ),
        ),
        Some(KeysProblem::GenerationFailed { message }) => (
            ConditionStatus::False,
            Reason::KeyGenerationFailed,
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
                Reason::KeysStored,
                format!("private keys stored for {}", selectors.join(", ")),
            )
        }
        None => (
            ConditionStatus::False,
            Reason::Generating,
            "generating DKIM keys".to_string(),
        ),
    }
}

/// The DKIM record of `selector` for this domain, matched by its exact name.
fn dkim_record<'a>(facts: &'a DomainFacts<'_>, selector: &str) -> Option<&'a DnsRecordStatus> {
    let name = crate::dns::records::dkim_record_name(selector, facts.domain);
    facts
        .records
        .iter()
        .find(|r| r.purpose == RecordPurpose::Dkim && r.name == name)
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

/// The note a verified record carries when its last check failed.
fn kept_note(record: &DnsRecordStatus) -> String {
    match (&record.state, &record.error) {
        (RecordState::Verified, Some(error)) => {
            format!("; the last check failed ({error}), keeping the verdict")
        }
        _ => String::new(),
    }
}

fn reason_for(state: RecordState) -> Reason {
    match state {
        RecordState::Verified => Reason::Verified,
        RecordState::Missing => Reason::RecordMissing,
        RecordState::Mismatch => Reason::RecordMismatch,
        RecordState::Error => Reason::DnsError,
        RecordState::Unchecked => Reason::NotChecked,
        RecordState::Removable => Reason::Removable,
    }
}

fn dkim_verified(facts: &DomainFacts<'_>) -> Verdict {
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
            Some(record) if record.state == RecordState::Error => (
                ConditionStatus::Unknown,
                Reason::DnsError,
                what_dns_says(record),
            ),
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
                Reason::NoKey,
                "no DKIM key exists yet".to_string(),
            ),
        };
    }

    // Delegated DKIM: every slot's CNAME must stay, the idle one too, or
    // the next rotation cannot complete.
    if let Some(bad) = facts.records.iter().find(|r| {
        r.purpose == RecordPurpose::Dkim
            && r.type_ == "CNAME"
            && matches!(r.state, RecordState::Missing | RecordState::Mismatch)
    }) {
        return (
            ConditionStatus::False,
            Reason::CnameMissing,
            format!(
                "{}. Mail is still signed with {}, but receivers cannot verify a selector whose CNAME is missing, and a rotation cannot complete without it",
                what_dns_says(bad),
                active
                    .iter()
                    .map(|k| k.selector.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
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
        return (
            ConditionStatus::Unknown,
            Reason::DnsError,
            what_dns_says(err),
        );
    }
    if records.len() < active.len() || records.iter().any(|r| r.state != RecordState::Verified) {
        return (
            ConditionStatus::Unknown,
            Reason::NotChecked,
            "the active selector's record is not checked yet".into(),
        );
    }
    let selectors: Vec<&str> = active.iter().map(|k| k.selector.as_str()).collect();
    let note: String = records.iter().map(|r| kept_note(r)).collect();
    if pending_instructions.is_empty() {
        (
            ConditionStatus::True,
            Reason::Verified,
            format!(
                "active selector {} is published{note}",
                selectors.join(", ")
            ),
        )
    } else {
        (
            ConditionStatus::True,
            Reason::RotationPending,
            format!(
                "active selector {} is published and keeps signing{note}; to complete the rotation {}",
                selectors.join(", "),
                pending_instructions.join("; ")
            ),
        )
    }
}

fn record_condition(facts: &DomainFacts<'_>, purpose: RecordPurpose) -> Verdict {
    let Some(record) = facts.records.iter().find(|r| r.purpose == purpose) else {
        return (
            ConditionStatus::Unknown,
            Reason::NoRelay,
            format!(
                "{purpose} is checked once relayRef names a MailRelay that is accepted: it says what SPF must authorize"
            ),
        );
    };
    match record.state {
        RecordState::Verified => (
            ConditionStatus::True,
            Reason::Verified,
            format!("{} is published{}", record.name, kept_note(record)),
        ),
        RecordState::Error => (
            ConditionStatus::Unknown,
            Reason::DnsError,
            what_dns_says(record),
        ),
        RecordState::Unchecked => (
            ConditionStatus::Unknown,
            Reason::NotChecked,
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
            verified_at: None,
            activated_at: None,
            retiring_at: None,
            retired_at: None,
        }
    }

    fn record(name: &str, purpose: RecordPurpose, state: RecordState) -> DnsRecordStatus {
        DnsRecordStatus {
            name: name.into(),
            type_: "TXT".into(),
            value: "v=DKIM1; k=rsa; p=AAAA".into(),
            strings: vec![],
            purpose,
            state,
            found: None,
            error: (state == RecordState::Error).then(|| "timed out".to_string()),
            since: Some(now()),
        }
    }

    fn facts<'a>(keys: &'a [DkimKeyStatus], records: &'a [DnsRecordStatus]) -> DomainFacts<'a> {
        DomainFacts {
            generation: Some(3),
            domain: "acme.example",
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
            RecordPurpose::Dkim,
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
            RecordPurpose::Dkim,
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
    fn a_record_kept_verified_on_a_dns_error_keeps_the_domain_ready() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let mut kept = record(
            "ma20261126a._domainkey.acme.example",
            RecordPurpose::Dkim,
            RecordState::Verified,
        );
        kept.error = Some("timed out".into());
        let list = conditions(&facts(&keys, std::slice::from_ref(&kept)), &[]);
        let dkim = get(&list, ConditionType::DkimVerified);
        assert_eq!(dkim.status, ConditionStatus::True);
        assert!(
            dkim.message.contains("the last check failed (timed out)"),
            "{}",
            dkim.message
        );
        assert_eq!(
            get(&list, ConditionType::Ready).status,
            ConditionStatus::True
        );
    }

    #[test]
    fn an_error_on_a_record_never_verified_is_unknown_whatever_the_condition_said() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let failing = [record(
            "ma20261126a._domainkey.acme.example",
            RecordPurpose::Dkim,
            RecordState::Error,
        )];
        // A previous True condition (for another record, or another
        // generation) is never inherited.
        let verified_before = conditions(
            &facts(
                &keys,
                &[record(
                    "ma20261126a._domainkey.acme.example",
                    RecordPurpose::Dkim,
                    RecordState::Verified,
                )],
            ),
            &[],
        );
        let after = conditions(&facts(&keys, &failing), &verified_before);
        assert_eq!(
            get(&after, ConditionType::DkimVerified).status,
            ConditionStatus::Unknown
        );
        assert_eq!(
            get(&after, ConditionType::Ready).status,
            ConditionStatus::False
        );
    }

    #[test]
    fn a_record_of_another_domain_does_not_verify_this_one() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let elsewhere = [record(
            "ma20261126a._domainkey.other.example",
            RecordPurpose::Dkim,
            RecordState::Verified,
        )];
        let list = conditions(&facts(&keys, &elsewhere), &[]);
        assert_ne!(
            get(&list, ConditionType::DkimVerified).status,
            ConditionStatus::True
        );
    }

    #[test]
    fn recomputing_the_same_facts_changes_nothing() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let records = [record(
            "ma20261126a._domainkey.acme.example",
            RecordPurpose::Dkim,
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
            RecordPurpose::Dkim,
            RecordState::Verified,
        )];
        let mut f = facts(&keys, &records);
        f.keys_problem = Some(KeysProblem::ActiveKeyMissing {
            secret: "acme-dkim".into(),
            selectors: vec!["ma20261126a".into()],
        });
        let list = conditions(&f, &[]);
        assert!(get(&list, ConditionType::KeysReady).has_reason(Reason::ActiveKeyMissing));
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
        assert!(get(&list, ConditionType::Ready).has_reason(Reason::DomainConflict));
    }

    #[test]
    fn refused_relay_blocks_readiness_and_says_why() {
        let keys = [key("ma20261126a", KeyState::Active)];
        let records = [record(
            "ma20261126a._domainkey.acme.example",
            RecordPurpose::Dkim,
            RecordState::Verified,
        )];
        let mut f = facts(&keys, &records);
        f.relay = RelayFacts::Refused {
            reason: Reason::NamespaceNotAllowed,
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
