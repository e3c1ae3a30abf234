//! DMARC: exactly one valid record at `_dmarc.<domain>`, and what it says.
//!
//! Any valid record verifies: the tenant may choose a policy other than the
//! one we recommend. `p=none` is valid but only monitors, and the report
//! says so. A record without `p=` counts as `p=none` (RFC 9989).

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::dmarc::{Alignment, Dmarc, Policy};
use serde::Serialize;

use super::Verdict;
use super::records::dmarc_record_name;
use super::resolver::DnsLookup;

/// The check of a domain's DMARC record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DmarcOutcome {
    /// Where the record was looked up.
    pub name: String,
    pub verdict: Verdict,
    /// The record found, when exactly one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// What the record says, when it parses.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<DmarcPolicyReport>,
}

/// A parsed DMARC record, in words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DmarcPolicyReport {
    /// `none`, `quarantine` or `reject`.
    pub policy: &'static str,
    /// The policy for subdomains (`sp=`, else `p=`).
    pub subdomain_policy: &'static str,
    /// `relaxed` or `strict` (`adkim=`).
    pub dkim_alignment: &'static str,
    /// `relaxed` or `strict` (`aspf=`).
    pub spf_alignment: &'static str,
    pub aggregate_reports_to: Vec<String>,
    pub failure_reports_to: Vec<String>,
    /// `p=none`: receivers report but do not act on failing mail.
    pub monitoring_only: bool,
}

/// Looks up and assesses `_dmarc.<domain>`.
pub async fn check_dmarc(dns: &impl DnsLookup, domain: &str) -> DmarcOutcome {
    check_dmarc_record(dns, &dmarc_record_name(domain)).await
}

/// Looks up and assesses the DMARC record at `name` (a `_dmarc` name).
pub async fn check_dmarc_record(dns: &impl DnsLookup, name: &str) -> DmarcOutcome {
    let name = name.to_string();
    match dns.txt(&name).await {
        Ok(records) => assess_dmarc_records(&name, &records),
        Err(err) => DmarcOutcome {
            verdict: if err.is_absent() {
                Verdict::Missing {
                    reason: err.to_string(),
                }
            } else {
                Verdict::Error {
                    message: err.to_string(),
                }
            },
            name,
            record: None,
            policy: None,
        },
    }
}

/// Judges the TXT records at `name` (a `_dmarc` name).
pub fn assess_dmarc_records(name: &str, txt_records: &[String]) -> DmarcOutcome {
    let outcome = |verdict, record, policy| DmarcOutcome {
        name: name.to_string(),
        verdict,
        record,
        policy,
    };
    let dmarc: Vec<&String> = txt_records.iter().filter(|r| is_dmarc_record(r)).collect();
    let record = match dmarc.as_slice() {
        [] => {
            let reason = format!("{name} has no v=DMARC1 TXT record");
            return outcome(Verdict::Missing { reason }, None, None);
        }
        [record] => (*record).clone(),
        several => {
            let verdict = Verdict::Mismatch {
                found: several
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(" | "),
                problem: format!(
                    "{name} has {} DMARC records; receivers ignore them all, publish exactly one",
                    several.len()
                ),
            };
            return outcome(verdict, None, None);
        }
    };
    match Dmarc::parse(record.as_bytes()) {
        Ok(parsed) => {
            let report = policy_report(&parsed);
            outcome(Verdict::Verified, Some(record), Some(report))
        }
        Err(err) => {
            let verdict = Verdict::Mismatch {
                found: record.clone(),
                problem: format!("not a valid DMARC record ({err})"),
            };
            outcome(verdict, Some(record), None)
        }
    }
}

/// `v=DMARC1` first (RFC 7489 6.3), whitespace around `=` tolerated.
fn is_dmarc_record(record: &str) -> bool {
    let Some((tag, rest)) = record.split_once('=') else {
        return false;
    };
    let version = rest.split(';').next().unwrap_or_default().trim();
    tag.trim().eq_ignore_ascii_case("v") && version == "DMARC1"
}

fn policy_report(dmarc: &Dmarc) -> DmarcPolicyReport {
    let policy = policy_name(dmarc.p);
    DmarcPolicyReport {
        policy,
        subdomain_policy: policy_name(dmarc.sp),
        dkim_alignment: alignment_name(dmarc.adkim),
        spf_alignment: alignment_name(dmarc.aspf),
        aggregate_reports_to: dmarc.rua.iter().map(|uri| uri.uri().to_string()).collect(),
        failure_reports_to: dmarc.ruf.iter().map(|uri| uri.uri().to_string()).collect(),
        monitoring_only: policy == "none",
    }
}

fn policy_name(policy: Policy) -> &'static str {
    match policy {
        // A missing p= means none (RFC 9989 4.7).
        Policy::None | Policy::Unspecified => "none",
        Policy::Quarantine => "quarantine",
        Policy::Reject => "reject",
    }
}

fn alignment_name(alignment: Alignment) -> &'static str {
    match alignment {
        Alignment::Relaxed => "relaxed",
        Alignment::Strict => "strict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAME: &str = "_dmarc.acme.test";

    fn assess(records: &[&str]) -> DmarcOutcome {
        let records: Vec<String> = records.iter().map(|r| r.to_string()).collect();
        assess_dmarc_records(NAME, &records)
    }

    #[test]
    fn an_enforcing_record_is_reported() {
        let outcome = assess(&[
            "v=DMARC1; p=reject; sp=quarantine; adkim=s; rua=mailto:d@acme.test; ruf=mailto:f@acme.test",
        ]);
        assert_eq!(outcome.verdict, Verdict::Verified);
        let policy = outcome.policy.unwrap();
        assert_eq!(policy.policy, "reject");
        assert_eq!(policy.subdomain_policy, "quarantine");
        assert_eq!(policy.dkim_alignment, "strict");
        assert_eq!(policy.spf_alignment, "relaxed");
        assert_eq!(policy.aggregate_reports_to, ["d@acme.test"]);
        assert_eq!(policy.failure_reports_to, ["f@acme.test"]);
        assert!(!policy.monitoring_only);
    }

    #[test]
    fn p_none_is_valid_but_monitoring_only() {
        let outcome = assess(&["v=DMARC1; p=none"]);
        assert_eq!(outcome.verdict, Verdict::Verified);
        let policy = outcome.policy.unwrap();
        assert!(policy.monitoring_only);
        assert_eq!(policy.subdomain_policy, "none");
    }

    #[test]
    fn an_invalid_policy_is_a_mismatch() {
        let outcome = assess(&["v=DMARC1; p=bogus"]);
        assert!(
            matches!(outcome.verdict, Verdict::Mismatch { problem, .. } if problem.contains("not a valid"))
        );
    }

    #[test]
    fn two_records_are_a_mismatch_and_other_txt_is_ignored() {
        let two = assess(&["v=DMARC1; p=none", "v=DMARC1; p=reject"]);
        assert!(
            matches!(two.verdict, Verdict::Mismatch { problem, .. } if problem.contains("2 DMARC records"))
        );
        let with_noise = assess(&["some-verification=1", "v=DMARC1; p=quarantine"]);
        assert_eq!(with_noise.verdict, Verdict::Verified);
    }

    #[test]
    fn no_dmarc_record_among_txt_is_missing() {
        assert!(matches!(
            assess(&["v=spf1 -all"]).verdict,
            Verdict::Missing { .. }
        ));
        assert!(matches!(
            assess(&["v=DMARC10; p=none"]).verdict,
            Verdict::Missing { .. }
        ));
    }
}
