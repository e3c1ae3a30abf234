//! What to write to DNS for a domain, given what the check found and what
//! the operator wrote before: a pure plan, carried out by a provider
//! ([`super::rfc2136`], or DNSEndpoint objects for external-dns).
//!
//! The rules, each a promise to the tenant:
//! - Only records the operator wrote (the ledger, `status.published`) are
//!   ever changed or removed, and a removal names the exact value written.
//! - DKIM records of Pending, Active and Retiring keys are published; a
//!   Retired key's record is removed (its overlap is over).
//! - DMARC is published only where the domain has no DMARC record.
//! - SPF (at the domain and at the return path) is published only where
//!   there is none. A foreign SPF record that does not authorize the relay
//!   is reported with the merged record to publish; with `manageSPF` it is
//!   replaced by that merged record, atomically against the exact value
//!   found. Two SPF records are never created.
//! - A name outside the provider's granted zones is never written.
//! - Nothing is written on a DNS error or before the first check: an
//!   unknown state is not a missing record.

use crate::api::{DNSProviderSpec, PublishedRecord, RecordPurpose};

use super::records::{ExpectedRecord, RecordType, Requirement};
use super::{RecordOutcome, Verdict};

/// What must hold at the server for an addition to apply (RFC 2136
/// prerequisites), so that a record another party wrote meanwhile is never
/// doubled or overwritten.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Precondition {
    /// No TXT record at the name (RFC 2136 2.4.3).
    NoTxt,
    /// The TXT records at the name are still those read just before the
    /// update (2.4.2): the name holds other TXT records, such as a site
    /// verification, that must stay as they are.
    TxtUnchanged,
}

/// One change to DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Add a TXT record.
    Add {
        zone: String,
        record: ExpectedRecord,
        precondition: Precondition,
    },
    /// Replace a foreign SPF record (only with `manageSPF`): delete exactly
    /// `old`, add `record`, if `old` is still there.
    Replace {
        zone: String,
        old: String,
        record: ExpectedRecord,
    },
    /// Remove a record the operator wrote.
    Remove(PublishedRecord),
}

/// Why a record the operator would publish is left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// The name is in none of the provider's zones.
    OutsideZones { name: String },
    /// A record the operator did not write is in the way.
    Foreign {
        name: String,
        purpose: RecordPurpose,
        found: String,
        /// For SPF: the one record to publish instead, authorizing the relay
        /// and keeping what the found one authorizes.
        merged: Option<String>,
    },
}

/// What to do for one domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub blocked: Vec<Blocked>,
    /// Entries of the ledger that stay (still wanted, still there).
    pub kept: Vec<PublishedRecord>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Plans the changes for the records in `outcomes`, given the ledger of
/// what this provider wrote before.
pub fn plan(
    outcomes: &[RecordOutcome],
    ledger: &[PublishedRecord],
    provider: &DNSProviderSpec,
    provider_id: &str,
    manage_spf: bool,
) -> Plan {
    let mut plan = Plan::default();
    let ours = |record: &ExpectedRecord| {
        ledger
            .iter()
            .find(|entry| entry.name == record.name && entry.value == record.value)
    };
    let mut wanted: Vec<&ExpectedRecord> = Vec::new();
    for outcome in outcomes {
        let record = &outcome.record;
        if record.record_type != RecordType::Txt || record.is_removable() {
            continue;
        }
        wanted.push(record);
        let Some(zone) = provider.zone_of(&record.name) else {
            plan.blocked.push(Blocked::OutsideZones {
                name: record.name.clone(),
            });
            continue;
        };
        let add = |precondition| Step::Add {
            zone: zone.to_string(),
            record: record.clone(),
            precondition,
        };
        match (&outcome.verdict, &record.requirement) {
            // Not looked up yet, or the lookup failed: nothing is known.
            (None | Some(Verdict::Error { .. }), _) => {}
            (Some(Verdict::Verified), _) => {}
            (Some(Verdict::Missing { .. }), Requirement::SpfAuthorizes(_)) => {
                plan.steps.push(add(Precondition::TxtUnchanged));
            }
            (Some(Verdict::Missing { .. }), _) => plan.steps.push(add(Precondition::NoTxt)),
            // Our own record, changed or mangled on the way: reported as
            // Mismatch by the check, never written over blindly.
            (Some(Verdict::Mismatch { .. }), _) if ours(record).is_some() => {}
            (Some(Verdict::Mismatch { found, .. }), Requirement::SpfAuthorizes(_)) => {
                let merged = merged_spf(found, &record.value);
                match (&merged, manage_spf) {
                    (Some(merged), true) => {
                        let mut replacement = record.clone();
                        replacement.value = merged.clone();
                        replacement.strings = crate::dkim::split_txt(merged);
                        plan.steps.push(Step::Replace {
                            zone: zone.to_string(),
                            old: found.clone(),
                            record: replacement,
                        });
                    }
                    _ => plan.blocked.push(Blocked::Foreign {
                        name: record.name.clone(),
                        purpose: record.purpose,
                        found: found.clone(),
                        merged,
                    }),
                }
            }
            (Some(Verdict::Mismatch { found, .. }), _) => plan.blocked.push(Blocked::Foreign {
                name: record.name.clone(),
                purpose: record.purpose,
                found: found.clone(),
                merged: None,
            }),
        }
    }
    for entry in ledger {
        if entry.provider != provider_id {
            // Written through another provider (the ref changed): that one
            // is no longer ours to use, and the record stays listed.
            plan.kept.push(entry.clone());
            continue;
        }
        let still_wanted = wanted
            .iter()
            .any(|r| r.name == entry.name && (r.value == entry.value || merged_is(r, entry)));
        if still_wanted {
            plan.kept.push(entry.clone());
        } else {
            plan.steps.push(Step::Remove(entry.clone()));
        }
    }
    plan
}

/// A ledger entry that is the merged SPF record written for `record`.
fn merged_is(record: &ExpectedRecord, entry: &PublishedRecord) -> bool {
    matches!(record.requirement, Requirement::SpfAuthorizes(_))
        && entry.value.starts_with("v=spf1 ")
        && terms(&record.value)
            .filter(|t| !is_all(t))
            .all(|t| terms(&entry.value).any(|e| e == t))
}

fn terms(record: &str) -> impl Iterator<Item = &str> {
    record.split_ascii_whitespace().skip(1)
}

fn is_all(term: &str) -> bool {
    matches!(term, "all" | "+all" | "-all" | "~all" | "?all")
}

/// The found SPF record with the relay's mechanisms added before its
/// closing `all` (or `redirect=`), so it authorizes the relay and keeps
/// everything it authorized before. `None` when `found` is not one SPF
/// record (several records, or no `v=spf1`): there is no single record to
/// merge into.
pub fn merged_spf(found: &str, ours: &str) -> Option<String> {
    let found = found.trim();
    if found.contains(" | ") || !(found == "v=spf1" || found.starts_with("v=spf1 ")) {
        return None;
    }
    let existing: Vec<&str> = terms(found).collect();
    let adding: Vec<&str> = terms(ours)
        .filter(|t| !is_all(t) && !existing.contains(t))
        .collect();
    let tail_at = existing
        .iter()
        .position(|t| is_all(t) || t.starts_with("redirect="))
        .unwrap_or(existing.len());
    let mut merged = vec!["v=spf1"];
    merged.extend(&existing[..tail_at]);
    merged.extend(adding);
    merged.extend(&existing[tail_at..]);
    if tail_at == existing.len() && !existing.iter().any(|t| t.starts_with("redirect=")) {
        // A record without `all` ends in `?all` by default; keep ours.
        merged.extend(terms(ours).filter(|t| is_all(t)));
    }
    Some(merged.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::SpfAuthorization;

    const PROVIDER: &str = "tenant-a/dns";

    fn provider(zones: &[&str]) -> DNSProviderSpec {
        DNSProviderSpec::for_zones(zones)
    }

    fn txt(name: &str, value: &str, purpose: RecordPurpose, req: Requirement) -> ExpectedRecord {
        ExpectedRecord {
            name: name.into(),
            record_type: RecordType::Txt,
            value: value.into(),
            strings: crate::dkim::split_txt(value),
            purpose,
            requirement: req,
        }
    }

    fn dkim(selector: &str, key: &str) -> ExpectedRecord {
        txt(
            &format!("{selector}._domainkey.acme.example"),
            &format!("v=DKIM1; k=rsa; p={key}"),
            RecordPurpose::Dkim,
            Requirement::DkimPublicKey {
                selector: selector.into(),
                public_key: key.into(),
            },
        )
    }

    fn spf() -> ExpectedRecord {
        txt(
            "acme.example",
            "v=spf1 include:_spf.platform.example ~all",
            RecordPurpose::Spf,
            Requirement::SpfAuthorizes(SpfAuthorization::default()),
        )
    }

    fn dmarc() -> ExpectedRecord {
        txt(
            "_dmarc.acme.example",
            "v=DMARC1; p=none",
            RecordPurpose::Dmarc,
            Requirement::DmarcRecord,
        )
    }

    fn seen(record: ExpectedRecord, verdict: Option<Verdict>) -> RecordOutcome {
        RecordOutcome { record, verdict }
    }

    fn missing() -> Option<Verdict> {
        Some(Verdict::Missing {
            reason: "NXDOMAIN".into(),
        })
    }

    fn mismatch(found: &str) -> Option<Verdict> {
        Some(Verdict::Mismatch {
            found: found.into(),
            problem: "not ours".into(),
        })
    }

    fn entry(record: &ExpectedRecord) -> PublishedRecord {
        PublishedRecord {
            name: record.name.clone(),
            type_: "TXT".into(),
            value: record.value.clone(),
            zone: "acme.example".into(),
            provider: PROVIDER.into(),
        }
    }

    fn added(plan: &Plan) -> Vec<(&str, &Precondition)> {
        plan.steps
            .iter()
            .filter_map(|s| match s {
                Step::Add {
                    record,
                    precondition,
                    ..
                } => Some((record.name.as_str(), precondition)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn missing_records_are_added_only_where_no_record_of_the_kind_exists() {
        let outcomes = [
            seen(dkim("s1", "AAAA"), missing()),
            seen(spf(), missing()),
            seen(dmarc(), missing()),
        ];
        let plan = plan(
            &outcomes,
            &[],
            &provider(&["acme.example"]),
            PROVIDER,
            false,
        );
        assert_eq!(
            added(&plan),
            vec![
                ("s1._domainkey.acme.example", &Precondition::NoTxt),
                ("acme.example", &Precondition::TxtUnchanged),
                ("_dmarc.acme.example", &Precondition::NoTxt),
            ]
        );
        assert!(plan.blocked.is_empty());
    }

    #[test]
    fn nothing_is_written_on_a_dns_error_or_before_the_first_check() {
        let outcomes = [
            seen(
                dkim("s1", "AAAA"),
                Some(Verdict::Error {
                    message: "timeout".into(),
                }),
            ),
            seen(dmarc(), None),
        ];
        let plan = plan(
            &outcomes,
            &[],
            &provider(&["acme.example"]),
            PROVIDER,
            false,
        );
        assert_eq!(plan, Plan::default());
    }

    #[test]
    fn a_name_outside_the_granted_zones_is_never_written() {
        let outcomes = [
            seen(dkim("s1", "AAAA"), missing()),
            seen(dmarc(), missing()),
        ];
        let plan = plan(
            &outcomes,
            &[],
            &provider(&["mail.acme.example"]),
            PROVIDER,
            false,
        );
        assert!(plan.steps.is_empty());
        assert_eq!(plan.blocked.len(), 2);
        assert!(
            matches!(&plan.blocked[0], Blocked::OutsideZones { name } if name == "s1._domainkey.acme.example")
        );
    }

    #[test]
    fn a_foreign_dmarc_or_dkim_record_is_left_alone_and_reported() {
        let outcomes = [
            seen(dmarc(), mismatch("v=DMARC1; p=bogus")),
            seen(dkim("s1", "AAAA"), mismatch("v=DKIM1; p=BBBB")),
        ];
        let plan = plan(&outcomes, &[], &provider(&["acme.example"]), PROVIDER, true);
        assert!(plan.steps.is_empty());
        assert_eq!(plan.blocked.len(), 2);
    }

    #[test]
    fn our_own_mangled_record_is_reported_not_written_over() {
        let record = dkim("s1", "AAAA");
        let outcomes = [seen(record.clone(), mismatch("v=DKIM1; p=AA AA"))];
        let plan = plan(
            &outcomes,
            &[entry(&record)],
            &provider(&["acme.example"]),
            PROVIDER,
            false,
        );
        assert!(plan.steps.is_empty() && plan.blocked.is_empty());
        assert_eq!(plan.kept, vec![entry(&record)]);
    }

    #[test]
    fn a_foreign_spf_record_gets_the_merged_record_and_is_replaced_only_with_manage_spf() {
        let found = "v=spf1 mx include:_spf.google.com -all";
        let outcomes = [seen(spf(), mismatch(found))];
        let zones = provider(&["acme.example"]);
        let reported = plan(&outcomes, &[], &zones, PROVIDER, false);
        assert!(reported.steps.is_empty());
        let merged = "v=spf1 mx include:_spf.google.com include:_spf.platform.example -all";
        assert_eq!(
            reported.blocked,
            vec![Blocked::Foreign {
                name: "acme.example".into(),
                purpose: RecordPurpose::Spf,
                found: found.into(),
                merged: Some(merged.into()),
            }]
        );
        let managed = plan(&outcomes, &[], &zones, PROVIDER, true);
        match &managed.steps[..] {
            [Step::Replace { old, record, .. }] => {
                assert_eq!(old, found);
                assert_eq!(record.value, merged);
            }
            other => panic!("expected one replacement, got {other:?}"),
        }
        // Once replaced, the merged record is ours and stays.
        let mut written = entry(&spf());
        written.value = merged.into();
        let after = plan(
            &[seen(spf(), Some(Verdict::Verified))],
            std::slice::from_ref(&written),
            &zones,
            PROVIDER,
            true,
        );
        assert!(after.steps.is_empty());
        assert_eq!(after.kept, vec![written]);
    }

    #[test]
    fn two_spf_records_get_no_merge() {
        assert_eq!(
            merged_spf("v=spf1 mx -all | v=spf1 a -all", "v=spf1 a ~all"),
            None
        );
        assert_eq!(
            merged_spf(
                "v=spf1 redirect=_spf.acme.example",
                "v=spf1 ip4:192.0.2.1 ~all"
            ),
            Some("v=spf1 ip4:192.0.2.1 redirect=_spf.acme.example".into())
        );
        assert_eq!(
            merged_spf("v=spf1 mx", "v=spf1 ip4:192.0.2.1 ~all"),
            Some("v=spf1 mx ip4:192.0.2.1 ~all".into())
        );
    }

    #[test]
    fn records_no_longer_wanted_are_removed_by_exact_value_and_others_kept() {
        let retired = dkim("s0", "OLD");
        let mut removable = retired.clone();
        removable.requirement = Requirement::MayBeRemoved;
        let active = dkim("s1", "AAAA");
        let mut foreign_provider = entry(&dkim("s9", "ZZZ"));
        foreign_provider.provider = "platform/dns".into();
        let ledger = [entry(&retired), entry(&active), foreign_provider.clone()];
        let outcomes = [
            seen(active.clone(), Some(Verdict::Verified)),
            seen(removable, None),
        ];
        let plan = plan(
            &outcomes,
            &ledger,
            &provider(&["acme.example"]),
            PROVIDER,
            false,
        );
        assert_eq!(plan.steps, vec![Step::Remove(entry(&retired))]);
        assert_eq!(plan.kept, vec![entry(&active), foreign_provider]);
    }
}
