//! The DNS records a domain needs, and their status: pure functions, no I/O.
//!
//! Decisions kept here:
//! - DKIM: one TXT per `Pending`, `Active` and `Retiring` key at
//!   `<selector>._domainkey.<domain>`. A `Retired` key's record is still
//!   listed (so the tenant knows which one to delete) but is marked
//!   removable and never checked.
//! - Delegated DKIM: a slot key's TXT lives at `<selector>.<delegatedTo>`
//!   in the platform's zone instead, and the tenant publishes, once, one
//!   CNAME per slot selector from `<selector>._domainkey.<domain>` to it.
//!   The CNAME is checked as such, and through it the key it leads to: that
//!   is the check a key must pass to sign, as receivers will follow it.
//! - SPF: only required when the domain has a relay. Without one there is
//!   nothing to authorize, so no SPF record is listed; the tenant's own SPF
//!   record is none of our business then.
//! - DMARC: always listed, with the policy of `spec.dmarc`. Any valid DMARC
//!   record verifies it: the tenant may choose a stricter or looser policy.
//! - Return path (`spec.returnPath`): an SPF TXT at `<returnPath>.<domain>`
//!   authorizing the relay, so SPF aligns. An MX for that name is only
//!   needed where the platform runs a bounce receiver; relays do not today,
//!   so [`expected_records`] does not list one and a caller that knows the
//!   host adds [`return_path_mx_record`].

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde::Serialize;

use super::Verdict;
use crate::api::{
    DkimKeyStatus, DmarcPolicy, DnsRecordStatus, KeyState, MailDomainSpec, RecordState,
    SpfAuthorization,
};
use crate::dkim::{SLOTS, dkim_txt_value, slot_of, slot_selectors, split_txt};

/// The record types we ask tenants to publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum RecordType {
    #[serde(rename = "TXT")]
    Txt,
    #[serde(rename = "MX")]
    Mx,
    #[serde(rename = "CNAME")]
    Cname,
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Txt => "TXT",
            Self::Mx => "MX",
            Self::Cname => "CNAME",
        })
    }
}

/// What a record is for (the type `status.records[].purpose` shows).
pub use crate::api::RecordPurpose as Purpose;

/// What DNS must show for a record to count as published. Checks compare
/// meaning, not text: a tenant's SPF record may authorize other senders too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Requirement {
    /// A DKIM record at the name whose `p=` is this key.
    DkimPublicKey {
        selector: String,
        public_key: String,
    },
    /// Exactly one valid SPF record at the name that authorizes the relay.
    SpfAuthorizes(SpfAuthorization),
    /// Exactly one valid DMARC record at the name.
    DmarcRecord,
    /// An MX at the name pointing to this host.
    MailExchanger { exchange: String },
    /// A CNAME at the name to `target` (delegated DKIM) and, when a key is
    /// in the slot, that key's record reached through it.
    DkimDelegation {
        selector: String,
        target: String,
        public_key: Option<String>,
    },
    /// Nothing: the record belongs to a retired key and may be deleted.
    MayBeRemoved,
}

/// One record the domain needs (or may now delete).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExpectedRecord {
    /// Fully-qualified owner name, without the trailing dot.
    pub name: String,
    #[serde(rename = "type")]
    pub record_type: RecordType,
    /// The whole value, as a DNS console takes it.
    pub value: String,
    /// The value as TXT character-strings of at most 255 bytes; empty for
    /// non-TXT records.
    pub strings: Vec<String>,
    pub purpose: Purpose,
    pub requirement: Requirement,
}

impl ExpectedRecord {
    fn txt(name: String, value: String, purpose: Purpose, requirement: Requirement) -> Self {
        Self {
            strings: split_txt(&value),
            name,
            record_type: RecordType::Txt,
            value,
            purpose,
            requirement,
        }
    }

    /// A record that may be deleted rather than one that must be published.
    pub fn is_removable(&self) -> bool {
        self.requirement == Requirement::MayBeRemoved
    }

    /// The record as a zone-file line, TXT values as quoted strings of at
    /// most 255 bytes.
    pub fn zone_file_line(&self, ttl: u32) -> String {
        let data = match self.record_type {
            RecordType::Txt => self
                .strings
                .iter()
                .map(|part| format!("\"{}\"", part.replace('\\', "\\\\").replace('"', "\\\"")))
                .collect::<Vec<_>>()
                .join(" "),
            RecordType::Mx | RecordType::Cname => self.value.clone(),
        };
        format!("{}. {ttl} IN {} {data}", self.name, self.record_type)
    }
}

/// Every record `domain` needs, given its spec, its keys (from status),
/// what its relay asks SPF to authorize (`None` without a relay) and, for
/// delegated DKIM, where its key records are published (`delegatedTo`).
pub fn expected_records(
    domain: &str,
    spec: &MailDomainSpec,
    keys: &[DkimKeyStatus],
    spf: Option<&SpfAuthorization>,
    delegated_to: Option<&str>,
) -> Vec<ExpectedRecord> {
    let prefix = &spec.dkim.selector_prefix;
    let delegated = |selector: &str| {
        delegated_to
            .filter(|_| slot_of(prefix, selector).is_some())
            .map(|base| format!("{selector}.{base}"))
    };
    let mut records: Vec<ExpectedRecord> = keys
        .iter()
        .map(|key| {
            let requirement = match key.state {
                KeyState::Pending | KeyState::Active | KeyState::Retiring => {
                    Requirement::DkimPublicKey {
                        selector: key.selector.clone(),
                        public_key: key.public_key.clone(),
                    }
                }
                KeyState::Retired => Requirement::MayBeRemoved,
            };
            ExpectedRecord::txt(
                delegated(&key.selector).unwrap_or_else(|| dkim_record_name(&key.selector, domain)),
                dkim_txt_value(key.algorithm, &key.public_key),
                Purpose::Dkim,
                requirement,
            )
        })
        .collect();
    if delegated_to.is_some() {
        for slot in SLOTS {
            let selectors = slot_selectors(prefix, spec.dkim.algorithm, slot).unwrap_or_default();
            for (_, selector) in selectors {
                let Some(target) = delegated(&selector) else {
                    continue;
                };
                let public_key = keys
                    .iter()
                    .find(|key| key.selector == selector && key.state != KeyState::Retired)
                    .map(|key| key.public_key.clone());
                records.push(ExpectedRecord {
                    name: dkim_record_name(&selector, domain),
                    record_type: RecordType::Cname,
                    value: format!("{target}."),
                    strings: Vec::new(),
                    purpose: Purpose::Dkim,
                    requirement: Requirement::DkimDelegation {
                        selector,
                        target,
                        public_key,
                    },
                });
            }
        }
    }
    if let Some(authorization) = spf {
        records.push(ExpectedRecord::txt(
            domain.to_string(),
            spf_value(authorization),
            Purpose::Spf,
            Requirement::SpfAuthorizes(authorization.clone()),
        ));
    }
    records.push(ExpectedRecord::txt(
        dmarc_record_name(domain),
        dmarc_value(&spec.dmarc),
        Purpose::Dmarc,
        Requirement::DmarcRecord,
    ));
    if let (Some(return_path), Some(authorization)) = (&spec.return_path, spf) {
        records.push(ExpectedRecord::txt(
            format!("{return_path}.{domain}"),
            spf_value(authorization),
            Purpose::ReturnPath,
            Requirement::SpfAuthorizes(authorization.clone()),
        ));
    }
    records
}

/// The MX a custom MAIL FROM domain needs so bounces reach `exchange`;
/// `None` when the spec has no `returnPath`.
pub fn return_path_mx_record(
    domain: &str,
    spec: &MailDomainSpec,
    exchange: &str,
) -> Option<ExpectedRecord> {
    let return_path = spec.return_path.as_ref()?;
    let exchange = exchange.trim_end_matches('.').to_ascii_lowercase();
    Some(ExpectedRecord {
        name: format!("{return_path}.{domain}"),
        record_type: RecordType::Mx,
        value: format!("10 {exchange}."),
        strings: Vec::new(),
        purpose: Purpose::ReturnPath,
        requirement: Requirement::MailExchanger { exchange },
    })
}

/// Where a selector's DKIM record lives.
pub fn dkim_record_name(selector: &str, domain: &str) -> String {
    format!("{selector}._domainkey.{domain}")
}

/// Where a domain's DMARC record lives.
pub fn dmarc_record_name(domain: &str) -> String {
    format!("_dmarc.{domain}")
}

/// An SPF record that authorizes the relay and soft-fails everyone else.
pub fn spf_value(authorization: &SpfAuthorization) -> String {
    let mut terms = vec!["v=spf1".to_string()];
    if let Some(include) = &authorization.include {
        terms.push(format!("include:{include}"));
    }
    for ip in &authorization.egress_ips {
        let mechanism = if ip.contains(':') { "ip6" } else { "ip4" };
        terms.push(format!("{mechanism}:{ip}"));
    }
    terms.push("~all".to_string());
    terms.join(" ")
}

/// The recommended DMARC record.
pub fn dmarc_value(dmarc: &crate::api::DmarcSpec) -> String {
    let mut tags = vec![
        "v=DMARC1".to_string(),
        format!("p={}", policy_name(dmarc.policy)),
    ];
    if let Some(subdomain_policy) = dmarc.subdomain_policy {
        tags.push(format!("sp={}", policy_name(subdomain_policy)));
    }
    let mailto = |addresses: &[String]| {
        addresses
            .iter()
            .map(|address| format!("mailto:{address}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    if !dmarc.aggregate_reports_to.is_empty() {
        tags.push(format!("rua={}", mailto(&dmarc.aggregate_reports_to)));
    }
    if !dmarc.failure_reports_to.is_empty() {
        tags.push(format!("ruf={}", mailto(&dmarc.failure_reports_to)));
    }
    tags.join("; ")
}

fn policy_name(policy: DmarcPolicy) -> &'static str {
    match policy {
        DmarcPolicy::None => "none",
        DmarcPolicy::Quarantine => "quarantine",
        DmarcPolicy::Reject => "reject",
    }
}

/// A record and what its check found (`None`: not checked).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecordOutcome {
    pub record: ExpectedRecord,
    pub verdict: Option<Verdict>,
}

/// The `status.records[]` entries for these outcomes. A record whose state
/// is the same as in `previous` keeps its `since`, so recomputing the same
/// verdicts yields an identical status (no write, no churn); a new record
/// or a changed state is stamped `now`.
///
/// A DNS error never demotes a record that was verified: when the lookup of
/// a record fails and `previous` shows *this very record* (same name, type
/// and value) `Verified`, it stays `Verified`, with the error noted. The
/// rule is keyed by the record, so a record never verified cannot inherit a
/// verdict from another record, another key or another domain.
pub fn record_statuses(
    outcomes: &[RecordOutcome],
    previous: &[DnsRecordStatus],
    now: &Time,
) -> Vec<DnsRecordStatus> {
    outcomes
        .iter()
        .map(|outcome| {
            let record = &outcome.record;
            let type_ = record.record_type.to_string();
            let same_record = |old: &&DnsRecordStatus| {
                old.name == record.name && old.type_ == type_ && old.value == record.value
            };
            let (state, found, error) = if record.is_removable() {
                (RecordState::Removable, None, None)
            } else {
                match &outcome.verdict {
                    None => (RecordState::Unchecked, None, None),
                    Some(Verdict::Error { message })
                        if previous
                            .iter()
                            .filter(same_record)
                            .any(|old| old.state == RecordState::Verified) =>
                    {
                        (RecordState::Verified, None, Some(message.clone()))
                    }
                    Some(verdict) => {
                        let (found, error) = match verdict {
                            Verdict::Mismatch { found, .. } => (Some(found.clone()), None),
                            Verdict::Error { message } => (None, Some(message.clone())),
                            Verdict::Verified | Verdict::Missing { .. } => (None, None),
                        };
                        (verdict.record_state(), found, error)
                    }
                }
            };
            let since = previous
                .iter()
                .filter(same_record)
                .find(|old| old.state == state)
                .and_then(|old| old.since.clone())
                .unwrap_or_else(|| now.clone());
            DnsRecordStatus {
                name: record.name.clone(),
                type_,
                value: record.value.clone(),
                strings: match record.record_type {
                    RecordType::Txt => record.strings.clone(),
                    RecordType::Mx | RecordType::Cname => Vec::new(),
                },
                purpose: record.purpose,
                state,
                found,
                error,
                since: Some(since),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{DmarcSpec, DnsRecordStatus, KeyAlgorithm};

    fn spec(yaml: &str) -> MailDomainSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn key(
        selector: &str,
        algorithm: KeyAlgorithm,
        state: KeyState,
        public_key: &str,
    ) -> DkimKeyStatus {
        DkimKeyStatus {
            selector: selector.into(),
            algorithm,
            size: None,
            state,
            generation: 1,
            public_key: public_key.into(),
            created_at: time("2026-01-01T00:00:00Z"),
            verified_at: None,
            activated_at: None,
            retiring_at: None,
            retired_at: None,
        }
    }

    fn time(text: &str) -> Time {
        Time(text.parse().unwrap())
    }

    fn relay() -> SpfAuthorization {
        SpfAuthorization {
            include: Some("_spf.platform.example".into()),
            egress_ips: vec!["192.0.2.10".into(), "2001:db8::/48".into()],
        }
    }

    #[test]
    fn dkim_records_for_every_published_key_and_retired_ones_removable() {
        let keys = [
            key("ma2b", KeyAlgorithm::Ed25519, KeyState::Pending, "ED"),
            key("ma2a", KeyAlgorithm::Rsa, KeyState::Active, "RSA2"),
            key("ma1a", KeyAlgorithm::Rsa, KeyState::Retiring, "RSA1"),
            key("ma0a", KeyAlgorithm::Rsa, KeyState::Retired, "RSA0"),
        ];
        let records = expected_records(
            "acme.example",
            &spec("domain: acme.example"),
            &keys,
            None,
            None,
        );
        let dkim: Vec<_> = records
            .iter()
            .filter(|r| r.purpose == Purpose::Dkim)
            .collect();
        assert_eq!(dkim.len(), 4);
        assert_eq!(dkim[0].name, "ma2b._domainkey.acme.example");
        assert_eq!(dkim[0].value, "v=DKIM1; k=ed25519; p=ED");
        assert_eq!(dkim[1].value, "v=DKIM1; k=rsa; p=RSA2");
        assert_eq!(
            dkim[1].requirement,
            Requirement::DkimPublicKey {
                selector: "ma2a".into(),
                public_key: "RSA2".into()
            }
        );
        assert!(!dkim[2].is_removable());
        assert!(dkim[3].is_removable());
    }

    #[test]
    fn without_a_relay_no_spf_is_required() {
        let records = expected_records(
            "acme.example",
            &spec("{domain: acme.example, returnPath: bounce}"),
            &[],
            None,
            None,
        );
        let purposes: Vec<_> = records.iter().map(|r| r.purpose).collect();
        assert_eq!(purposes, [Purpose::Dmarc]);
    }

    #[test]
    fn spf_authorizes_the_relay_include_and_ips() {
        let records = expected_records(
            "acme.example",
            &spec("domain: acme.example"),
            &[],
            Some(&relay()),
            None,
        );
        let spf = records.iter().find(|r| r.purpose == Purpose::Spf).unwrap();
        assert_eq!(spf.name, "acme.example");
        assert_eq!(
            spf.value,
            "v=spf1 include:_spf.platform.example ip4:192.0.2.10 ip6:2001:db8::/48 ~all"
        );
        assert_eq!(spf.requirement, Requirement::SpfAuthorizes(relay()));
    }

    #[test]
    fn dmarc_carries_policy_and_report_addresses() {
        let spec = spec(
            "{domain: acme.example, dmarc: {policy: quarantine, subdomainPolicy: reject, \
             aggregateReportsTo: [a@acme.example, b@acme.example], failureReportsTo: [f@acme.example]}}",
        );
        let records = expected_records("acme.example", &spec, &[], None, None);
        let dmarc = records
            .iter()
            .find(|r| r.purpose == Purpose::Dmarc)
            .unwrap();
        assert_eq!(dmarc.name, "_dmarc.acme.example");
        assert_eq!(
            dmarc.value,
            "v=DMARC1; p=quarantine; sp=reject; rua=mailto:a@acme.example,mailto:b@acme.example; ruf=mailto:f@acme.example"
        );
        assert_eq!(dmarc_value(&DmarcSpec::default()), "v=DMARC1; p=none");
    }

    #[test]
    fn return_path_gets_spf_and_an_mx_only_when_a_host_is_known() {
        let with_return_path = spec("{domain: acme.example, returnPath: bounce}");
        let records =
            expected_records("acme.example", &with_return_path, &[], Some(&relay()), None);
        let return_path = records
            .iter()
            .find(|r| r.purpose == Purpose::ReturnPath)
            .unwrap();
        assert_eq!(return_path.name, "bounce.acme.example");
        assert_eq!(return_path.record_type, RecordType::Txt);
        assert!(
            return_path
                .value
                .starts_with("v=spf1 include:_spf.platform.example")
        );

        let mx = return_path_mx_record(
            "acme.example",
            &with_return_path,
            "Bounces.Platform.Example.",
        )
        .unwrap();
        assert_eq!(mx.name, "bounce.acme.example");
        assert_eq!(mx.value, "10 bounces.platform.example.");
        assert_eq!(
            mx.zone_file_line(300),
            "bounce.acme.example. 300 IN MX 10 bounces.platform.example."
        );
        let no_return_path = return_path_mx_record(
            "acme.example",
            &spec("domain: acme.example"),
            "bounces.platform.example",
        );
        assert_eq!(no_return_path, None);
    }

    #[test]
    fn long_dkim_values_are_split_into_strings_that_join_back() {
        let public_key = "A".repeat(392);
        let keys = [key("s", KeyAlgorithm::Rsa, KeyState::Active, &public_key)];
        let records = expected_records(
            "acme.example",
            &spec("domain: acme.example"),
            &keys,
            None,
            None,
        );
        let dkim = &records[0];
        assert_eq!(dkim.strings.len(), 2);
        assert!(dkim.strings.iter().all(|s| s.len() <= 255));
        assert_eq!(dkim.strings.concat(), dkim.value);
        assert_eq!(records[1].strings, [records[1].value.clone()]);
    }

    #[test]
    fn zone_file_lines_quote_each_string() {
        let record = ExpectedRecord::txt(
            "s._domainkey.acme.example".into(),
            format!("v=DKIM1; k=rsa; p={}", "B".repeat(300)),
            Purpose::Dkim,
            Requirement::MayBeRemoved,
        );
        let line = record.zone_file_line(3600);
        assert!(line.starts_with("s._domainkey.acme.example. 3600 IN TXT \"v=DKIM1; k=rsa; p=BBB"));
        assert_eq!(line.matches('"').count(), 4);
        let quoted = ExpectedRecord::txt(
            "a.example".into(),
            "say \"hi\"\\".into(),
            Purpose::Spf,
            Requirement::DmarcRecord,
        );
        assert_eq!(
            quoted.zone_file_line(60),
            r#"a.example. 60 IN TXT "say \"hi\"\\""#
        );
    }

    fn outcomes(verdicts: Vec<Option<Verdict>>) -> Vec<RecordOutcome> {
        let keys = [
            key("ma1", KeyAlgorithm::Rsa, KeyState::Active, "K1"),
            key("ma0", KeyAlgorithm::Rsa, KeyState::Retired, "K0"),
        ];
        expected_records(
            "acme.example",
            &spec("domain: acme.example"),
            &keys,
            Some(&relay()),
            None,
        )
        .into_iter()
        .zip(verdicts)
        .map(|(record, verdict)| RecordOutcome { record, verdict })
        .collect()
    }

    #[test]
    fn statuses_map_verdicts_and_mark_retired_records_removable() {
        let statuses = record_statuses(
            &outcomes(vec![
                Some(Verdict::Verified),
                None,
                Some(Verdict::Mismatch {
                    found: "v=spf1 -all".into(),
                    problem: "does not authorize 192.0.2.10".into(),
                }),
                Some(Verdict::Error {
                    message: "timed out".into(),
                }),
            ]),
            &[],
            &time("2026-02-01T00:00:00Z"),
        );
        let states: Vec<_> = statuses.iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                RecordState::Verified,
                RecordState::Removable,
                RecordState::Mismatch,
                RecordState::Error
            ]
        );
        assert_eq!(statuses[2].found.as_deref(), Some("v=spf1 -all"));
        assert_eq!(statuses[3].error.as_deref(), Some("timed out"));
        assert_eq!(statuses[0].type_, "TXT");
        assert_eq!(statuses[0].purpose, Purpose::Dkim);
        assert!(
            statuses
                .iter()
                .all(|s| s.since == Some(time("2026-02-01T00:00:00Z")))
        );
    }

    #[test]
    fn same_verdicts_later_give_identical_status() {
        let verdicts = || {
            vec![
                Some(Verdict::Verified),
                None,
                Some(Verdict::Missing {
                    reason: "no TXT".into(),
                }),
                Some(Verdict::Verified),
            ]
        };
        let first: Vec<DnsRecordStatus> =
            record_statuses(&outcomes(verdicts()), &[], &time("2026-02-01T00:00:00Z"));
        let second = record_statuses(&outcomes(verdicts()), &first, &time("2026-02-02T00:00:00Z"));
        assert_eq!(first, second);
    }

    #[test]
    fn a_changed_state_restamps_only_that_record() {
        let t1 = time("2026-02-01T00:00:00Z");
        let t2 = time("2026-02-02T00:00:00Z");
        let first = record_statuses(
            &outcomes(vec![
                Some(Verdict::Verified),
                None,
                Some(Verdict::Missing {
                    reason: "none".into(),
                }),
                Some(Verdict::Verified),
            ]),
            &[],
            &t1,
        );
        let second = record_statuses(
            &outcomes(vec![
                Some(Verdict::Verified),
                None,
                Some(Verdict::Verified),
                Some(Verdict::Verified),
            ]),
            &first,
            &t2,
        );
        assert_eq!(second[0].since, Some(t1.clone()));
        assert_eq!(second[2].since, Some(t2));
        assert_eq!(second[2].state, RecordState::Verified);
        assert_eq!(second[3].since, Some(t1));
    }

    #[test]
    fn a_dns_error_keeps_exactly_the_record_that_was_verified() {
        let t1 = time("2026-02-01T00:00:00Z");
        let t2 = time("2026-02-02T00:00:00Z");
        let error = || {
            Some(Verdict::Error {
                message: "timed out".into(),
            })
        };
        // DKIM (record 0) verified, DMARC (record 3) missing.
        let first = record_statuses(
            &outcomes(vec![
                Some(Verdict::Verified),
                None,
                Some(Verdict::Verified),
                Some(Verdict::Missing {
                    reason: "none".into(),
                }),
            ]),
            &[],
            &t1,
        );
        let second = record_statuses(
            &outcomes(vec![error(), None, error(), error()]),
            &first,
            &t2,
        );
        assert_eq!(second[0].state, RecordState::Verified);
        assert_eq!(second[0].error.as_deref(), Some("timed out"));
        assert_eq!(second[0].since, Some(t1.clone()), "still verified since t1");
        assert_eq!(second[2].state, RecordState::Verified);
        assert_eq!(
            second[3].state,
            RecordState::Error,
            "a record never verified is not made verified by an error"
        );

        // The same name with another value (a rotated key) is another record.
        let mut other_value = first.clone();
        other_value[0].value.push_str("AAAA");
        let third = record_statuses(
            &outcomes(vec![error(), None, error(), error()]),
            &other_value,
            &t2,
        );
        assert_eq!(third[0].state, RecordState::Error);
    }
}
