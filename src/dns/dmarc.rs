//! DMARC: exactly one valid record at `_dmarc.<domain>`, and what it says.
//!
//! Any valid record verifies: the tenant may choose a policy other than the
//! one we recommend. `p=none` is valid but only monitors, and the report
//! says so.
//!
//! A record without a valid `p=` (absent, or not `none`, `quarantine` or
//! `reject`), or with an invalid `sp=` or `np=`, is read as RFC 7489 6.6.3
//! tells receivers to: as `p=none` when its `rua` holds at least one valid
//! reporting address, and otherwise as no DMARC policy at all, which is
//! invalid. RFC 9989 readers (checkdmarc among them) take a missing `p=`
//! as `p=none` even without `rua`, but receivers still on RFC 7489 apply
//! no policy at all to such a record: it works nowhere as its owner meant,
//! so it is reported invalid.

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
    /// Why receivers apply `p=none` to a record that does not ask for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_fallback: Option<String>,
}

/// The policy tags receivers act on.
const POLICY_TAGS: [&str; 3] = ["p", "sp", "np"];

/// A policy tag receivers cannot use.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PolicyTagProblem {
    /// `p=` absent or not `none`, `quarantine` or `reject`.
    NoValidPolicy,
    /// `sp=` or `np=` present with a value that is none of them.
    InvalidPolicyTag { tag: String, value: String },
}

impl std::fmt::Display for PolicyTagProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoValidPolicy => f.write_str("no valid p="),
            Self::InvalidPolicyTag { tag, value } => write!(f, "{tag}={value} is not valid"),
        }
    }
}

/// Looks up and assesses `_dmarc.<domain>`.
pub async fn check_dmarc(dns: &impl DnsLookup, domain: &str) -> DmarcOutcome {
    check_dmarc_record(dns, &dmarc_record_name(domain)).await
}

/// Looks up and assesses the DMARC record at `name` (a `_dmarc` name).
/// The DMARC policy that applies to the domain of `name` (`_dmarc.<domain>`),
/// found as receivers find it (RFC 7489 6.6.3): the domain's own record,
/// or, when it has none, its organizational domain's (the registrable
/// domain under the Public Suffix List). A tenant on `mail.globex.example`
/// whose `globex.example` publishes DMARC is covered, not missing.
pub async fn discover_dmarc(dns: &impl DnsLookup, name: &str) -> Verdict {
    let own = check_dmarc_record(dns, name).await.verdict;
    if !matches!(own, Verdict::Missing { .. }) {
        return own;
    }
    let Some(domain) = name.strip_prefix("_dmarc.") else {
        return own;
    };
    match organizational_domain(domain) {
        Some(org) if org != domain => {
            match check_dmarc_record(dns, &format!("_dmarc.{org}"))
                .await
                .verdict
            {
                Verdict::Verified => Verdict::Verified,
                _ => own,
            }
        }
        _ => own,
    }
}

/// The registrable domain of `domain` under the Public Suffix List
/// (`globex.example` for `mail.globex.example`); `None` for a public suffix
/// itself.
pub fn organizational_domain(domain: &str) -> Option<String> {
    psl::domain_str(domain).map(str::to_string)
}

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
    let tags = tag_list(&record);
    let policy_problems = policy_problems(&tags);
    // With an unusable policy tag, receivers read the record as if it had
    // no policy tags: mail-auth parses the rest (and finds what `rua` holds).
    let parsed = if policy_problems.is_empty() {
        Dmarc::parse(record.as_bytes())
    } else {
        let without_policy = tags
            .iter()
            .filter(|(name, _, _)| !POLICY_TAGS.iter().any(|tag| name.eq_ignore_ascii_case(tag)))
            .map(|(_, _, segment)| *segment)
            .collect::<Vec<_>>()
            .join(";");
        Dmarc::parse(without_policy.as_bytes())
    };
    let mismatch = |problem: String| Verdict::Mismatch {
        found: record.clone(),
        problem,
    };
    let parsed = match parsed {
        Ok(parsed) => parsed,
        Err(err) => {
            let verdict = mismatch(format!("not a valid DMARC record ({err})"));
            return outcome(verdict, Some(record), None);
        }
    };
    if policy_problems.is_empty() {
        let report = policy_report(&parsed, None);
        return outcome(Verdict::Verified, Some(record), Some(report));
    }
    let what = policy_problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    // mail-auth keeps only the `mailto:` addresses it can read; `mailto` is
    // the one scheme RFC 7489 6.2 makes receivers support.
    if parsed.rua.is_empty() {
        let verdict = mismatch(format!(
            "invalid: {what} and no valid rua; receivers apply no DMARC policy (RFC 7489 6.6.3): \
             publish p=none, p=quarantine or p=reject"
        ));
        return outcome(verdict, Some(record), None);
    }
    let fallback = format!("{what}; treated as p=none because rua is valid");
    let report = policy_report(&parsed, Some(fallback));
    outcome(Verdict::Verified, Some(record), Some(report))
}

/// The `tag=value` segments of a record: name and value trimmed, and the
/// segment as written. Segments without `=` are kept for mail-auth to judge.
fn tag_list(record: &str) -> Vec<(&str, &str, &str)> {
    record
        .split(';')
        .filter(|segment| !segment.trim().is_empty())
        .map(|segment| {
            let (name, value) = segment.split_once('=').unwrap_or((segment, ""));
            (name.trim(), value.trim(), segment)
        })
        .collect()
}

/// The policy tags receivers cannot use: `p=` absent or invalid, `sp=` or
/// `np=` invalid (RFC 7489 6.6.3; RFC 9989 adds `np`).
fn policy_problems(tags: &[(&str, &str, &str)]) -> Vec<PolicyTagProblem> {
    let value_of = |tag: &str| {
        tags.iter()
            .find(|(name, _, _)| name.eq_ignore_ascii_case(tag))
            .map(|(_, value, _)| *value)
    };
    let is_policy = |value: &str| {
        ["none", "quarantine", "reject"]
            .iter()
            .any(|p| value.eq_ignore_ascii_case(p))
    };
    let mut problems = Vec::new();
    if !value_of("p").is_some_and(is_policy) {
        problems.push(PolicyTagProblem::NoValidPolicy);
    }
    for tag in ["sp", "np"] {
        if let Some(value) = value_of(tag)
            && !is_policy(value)
        {
            problems.push(PolicyTagProblem::InvalidPolicyTag {
                tag: tag.to_string(),
                value: value.to_string(),
            });
        }
    }
    problems
}

/// `v=DMARC1` first (RFC 7489 6.3), whitespace around `=` tolerated.
fn is_dmarc_record(record: &str) -> bool {
    let Some((tag, rest)) = record.split_once('=') else {
        return false;
    };
    let version = rest.split(';').next().unwrap_or_default().trim();
    tag.trim().eq_ignore_ascii_case("v") && version == "DMARC1"
}

fn policy_report(dmarc: &Dmarc, policy_fallback: Option<String>) -> DmarcPolicyReport {
    let policy = policy_name(dmarc.p);
    DmarcPolicyReport {
        policy,
        subdomain_policy: policy_name(dmarc.sp),
        dkim_alignment: alignment_name(dmarc.adkim),
        spf_alignment: alignment_name(dmarc.aspf),
        aggregate_reports_to: dmarc.rua.iter().map(|uri| uri.uri().to_string()).collect(),
        failure_reports_to: dmarc.ruf.iter().map(|uri| uri.uri().to_string()).collect(),
        monitoring_only: policy == "none",
        policy_fallback,
    }
}

fn policy_name(policy: Policy) -> &'static str {
    match policy {
        // Unspecified only reaches here once the policy tags were dropped
        // as unusable, with a valid rua: receivers then act as p=none.
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
    use crate::dns::testing::FakeDns;

    const NAME: &str = "_dmarc.acme.test";

    async fn discover(dns: &FakeDns, name: &str) -> Verdict {
        discover_dmarc(dns, name).await
    }

    #[tokio::test]
    async fn a_subdomain_without_dmarc_is_covered_by_its_organizational_domain() {
        let dns = FakeDns::default().txt("_dmarc.globex.example", "v=DMARC1; p=reject");
        assert_eq!(
            discover(&dns, "_dmarc.mail.globex.example").await,
            Verdict::Verified
        );
        assert_eq!(
            discover(&dns, "_dmarc.globex.example").await,
            Verdict::Verified
        );
        // Not across organizations, nor from a broken record.
        assert!(matches!(
            discover(&dns, "_dmarc.mail.acme.example").await,
            Verdict::Missing { .. }
        ));
        let broken = FakeDns::default().txt("_dmarc.globex.example", "v=DMARC1; p=bogus");
        assert!(matches!(
            discover(&broken, "_dmarc.mail.globex.example").await,
            Verdict::Missing { .. }
        ));
    }

    #[test]
    fn the_organizational_domain_follows_the_public_suffix_list() {
        assert_eq!(
            organizational_domain("mail.globex.example").as_deref(),
            Some("globex.example")
        );
        assert_eq!(
            organizational_domain("a.b.acme.co.uk").as_deref(),
            Some("acme.co.uk")
        );
        assert_eq!(organizational_domain("co.uk"), None);
    }

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

    fn problem(outcome: &DmarcOutcome) -> &str {
        match &outcome.verdict {
            Verdict::Mismatch { problem, .. } => problem,
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[test]
    fn without_a_valid_p_and_without_a_valid_rua_the_record_is_invalid() {
        for record in [
            "v=DMARC1",
            "v=DMARC1; adkim=s",
            "v=DMARC1; p=bogus",
            // Only mailto: counts; this one has no address either.
            "v=DMARC1; rua=https://reports.acme.test/dmarc",
            "v=DMARC1; rua=mailto:nobody",
        ] {
            let outcome = assess(&[record]);
            let text = problem(&outcome);
            assert!(
                text.starts_with("invalid: no valid p= and no valid rua"),
                "{record}: {text}"
            );
            assert_eq!(outcome.record.as_deref(), Some(record));
            assert_eq!(outcome.policy, None);
        }
    }

    #[test]
    fn without_a_valid_p_but_with_a_valid_rua_the_record_is_p_none() {
        for record in [
            "v=DMARC1; rua=mailto:dmarc@acme.test",
            "v=DMARC1; p=bogus; adkim=s; rua=mailto:dmarc@acme.test",
        ] {
            let outcome = assess(&[record]);
            assert_eq!(outcome.verdict, Verdict::Verified, "{record}");
            let policy = outcome.policy.unwrap();
            assert_eq!((policy.policy, policy.subdomain_policy), ("none", "none"));
            assert!(policy.monitoring_only);
            assert_eq!(policy.aggregate_reports_to, ["dmarc@acme.test"]);
            assert_eq!(
                policy.policy_fallback.as_deref(),
                Some("no valid p=; treated as p=none because rua is valid")
            );
        }
        let strict = assess(&["v=DMARC1; p=bogus; adkim=s; rua=mailto:dmarc@acme.test"]);
        assert_eq!(strict.policy.unwrap().dkim_alignment, "strict");
    }

    #[test]
    fn an_invalid_sp_or_np_follows_the_same_rule() {
        let with_rua = assess(&["v=DMARC1; p=reject; sp=bogus; rua=mailto:d@acme.test"]);
        assert_eq!(with_rua.verdict, Verdict::Verified);
        let policy = with_rua.policy.unwrap();
        // Receivers act as if the whole record said p=none.
        assert_eq!((policy.policy, policy.subdomain_policy), ("none", "none"));
        assert_eq!(
            policy.policy_fallback.as_deref(),
            Some("sp=bogus is not valid; treated as p=none because rua is valid")
        );
        let without_rua = assess(&["v=DMARC1; p=reject; np=maybe"]);
        assert!(
            problem(&without_rua).starts_with("invalid: np=maybe is not valid and no valid rua"),
            "{without_rua:?}"
        );
    }

    #[test]
    fn other_syntax_errors_stay_invalid_whatever_p_says() {
        let outcome = assess(&["v=DMARC1; adkim=x; rua=mailto:d@acme.test"]);
        assert!(
            problem(&outcome).contains("not a valid DMARC record"),
            "{outcome:?}"
        );
    }

    #[test]
    fn a_valid_p_needs_no_rua_and_has_no_fallback() {
        let outcome = assess(&["v=DMARC1; p=QUARANTINE"]);
        assert_eq!(outcome.verdict, Verdict::Verified);
        let policy = outcome.policy.unwrap();
        assert_eq!(policy.policy, "quarantine");
        assert_eq!(policy.policy_fallback, None);
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
