//! DNS: the records a domain needs, and checking them through a real resolver.
//!
//! - [`records`] (pure): the records a `MailDomain` needs
//!   ([`expected_records`]) and their `status.records[]` entries
//!   ([`record_statuses`]), stable when nothing changed.
//! - [`resolver`]: the one resolver setup (no cache, capped concurrency,
//!   query counter) and the [`DnsLookup`] trait the checks run on.
//! - [`dkim`], [`spf`], [`dmarc`]: one module per protocol; each separates
//!   judging what DNS returned (pure) from asking for it.
//!
//! Two entry points:
//! - the controller knows the exact records and calls [`check_records`];
//! - the CLI knows a domain and some selectors and calls [`check_domain`].
//!
//! Every check ends in a [`Verdict`]. A timeout, SERVFAIL or REFUSED is a
//! [`Verdict::Error`], never [`Verdict::Missing`]: only NXDOMAIN or an
//! empty answer proves a record is not there.

pub mod dkim;
pub mod dmarc;
pub mod publish;
pub mod records;
pub mod resolver;
pub mod rfc2136;
pub mod spf;
mod verdict;

#[cfg(test)]
mod testing;

use futures::future::join_all;
use serde::Serialize;

pub use dkim::DkimOutcome;
pub use dmarc::DmarcOutcome;
pub use records::{
    ExpectedRecord, Purpose, RecordOutcome, RecordType, Requirement, expected_records,
    record_statuses, return_path_mx_record,
};
pub use resolver::{DnsLookup, DnsResolver, LookupError, ResolverError, ResolverSettings};
pub use spf::{SpfOutcome, SpfRequirement};
pub use verdict::Verdict;

/// Checks each expected record against DNS, concurrently. Removable
/// records (retired keys) are not looked up: their verdict is `None`.
pub async fn check_records(
    dns: &impl DnsLookup,
    expected: &[ExpectedRecord],
) -> Vec<RecordOutcome> {
    join_all(expected.iter().map(|record| async move {
        RecordOutcome {
            record: record.clone(),
            verdict: check_record(dns, record).await,
        }
    }))
    .await
}

async fn check_record(dns: &impl DnsLookup, record: &ExpectedRecord) -> Option<Verdict> {
    let verdict = match &record.requirement {
        Requirement::MayBeRemoved => return None,
        Requirement::DkimPublicKey { public_key, .. } => {
            dkim::check_dkim_record(dns, &record.name, Some(public_key))
                .await
                .verdict
        }
        Requirement::SpfAuthorizes(authorization) => {
            match SpfRequirement::from_authorization(authorization) {
                Ok(requirement) => {
                    spf::check_spf(dns, &record.name, &requirement)
                        .await
                        .verdict
                }
                Err(err) => Verdict::Error {
                    message: format!("the relay's spf.egressIps: {err}"),
                },
            }
        }
        Requirement::DmarcRecord => dmarc::discover_dmarc(dns, &record.name).await,
        Requirement::MailExchanger { exchange } => check_mx(dns, &record.name, exchange).await,
        Requirement::DkimDelegation {
            target, public_key, ..
        } => check_delegation(dns, &record.name, target, public_key.as_deref()).await,
    };
    Some(verdict)
}

/// A delegation CNAME at `name` must lead to `target`, and through it to
/// the slot's key when there is one: the lookup a receiver makes.
async fn check_delegation(
    dns: &impl DnsLookup,
    name: &str,
    target: &str,
    public_key: Option<&str>,
) -> Verdict {
    match dns.cname(name).await {
        Ok(found) if found.eq_ignore_ascii_case(target) => {}
        Ok(found) => {
            return Verdict::Mismatch {
                found: format!("CNAME {found}."),
                problem: format!("the CNAME must point to {target}."),
            };
        }
        Err(err) if err.is_absent() => {
            return Verdict::Missing {
                reason: format!("{name} has no CNAME ({err})"),
            };
        }
        Err(err) => {
            return Verdict::Error {
                message: err.to_string(),
            };
        }
    }
    match public_key {
        None => Verdict::Verified,
        Some(key) => dkim::check_dkim_record(dns, name, Some(key)).await.verdict,
    }
}

/// An MX at `name` must point to `exchange` (other MX hosts may exist).
async fn check_mx(dns: &impl DnsLookup, name: &str, exchange: &str) -> Verdict {
    match dns.mx(name).await {
        Ok(hosts) if hosts.iter().any(|host| host.eq_ignore_ascii_case(exchange)) => {
            Verdict::Verified
        }
        Ok(hosts) => Verdict::Mismatch {
            found: hosts.join(", "),
            problem: format!("no MX points to {exchange}"),
        },
        Err(err) if err.is_absent() => Verdict::Missing {
            reason: err.to_string(),
        },
        Err(err) => Verdict::Error {
            message: err.to_string(),
        },
    }
}

/// What to check about one domain when the exact records are not known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DomainCheck {
    pub domain: String,
    /// DKIM selectors, each with the public key it must carry if known.
    pub selectors: Vec<SelectorCheck>,
    /// What SPF must authorize; empty: only that the record is valid.
    pub spf: SpfRequirement,
}

/// One DKIM selector to check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SelectorCheck {
    pub selector: String,
    pub public_key: Option<String>,
}

/// Everything found about one domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DomainReport {
    pub domain: String,
    pub dkim: Vec<DkimOutcome>,
    pub spf: SpfOutcome,
    pub dmarc: DmarcOutcome,
}

impl DomainReport {
    /// Every check verified: DKIM for each selector asked, SPF, DMARC.
    pub fn passed(&self) -> bool {
        self.dkim
            .iter()
            .all(|outcome| outcome.verdict.is_verified())
            && self.spf.verdict.is_verified()
            && self.dmarc.verdict.is_verified()
    }
}

/// Checks a domain's DKIM selectors, SPF and DMARC, concurrently.
pub async fn check_domain(dns: &impl DnsLookup, check: &DomainCheck) -> DomainReport {
    let domain = check.domain.trim_end_matches('.').to_ascii_lowercase();
    let dkim = join_all(check.selectors.iter().map(|selector| {
        dkim::check_dkim(
            dns,
            &domain,
            &selector.selector,
            selector.public_key.as_deref(),
        )
    }));
    let (dkim, spf, dmarc) = futures::join!(
        dkim,
        spf::check_spf(dns, &domain, &check.spf),
        dmarc::check_dmarc(dns, &domain)
    );
    DomainReport {
        domain,
        dkim,
        spf,
        dmarc,
    }
}

#[cfg(test)]
mod tests {
    use super::testing::FakeDns;
    use super::*;
    use crate::api::{DkimKeyStatus, KeyAlgorithm, KeyState, MailDomainSpec, SpfAuthorization};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    /// An Ed25519 public key as `check` reads one: 32 bytes.
    fn ed25519_key(fill: u8) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([fill; 32])
    }

    fn key(selector: &str, state: KeyState, public_key: &str) -> DkimKeyStatus {
        DkimKeyStatus {
            selector: selector.into(),
            algorithm: KeyAlgorithm::Ed25519,
            size: None,
            state,
            generation: 1,
            public_key: public_key.into(),
            created_at: Time("2026-01-01T00:00:00Z".parse().unwrap()),
            verified_at: None,
            activated_at: None,
            retiring_at: None,
            retired_at: None,
        }
    }

    #[tokio::test]
    async fn expected_records_are_checked_by_meaning() {
        let spec: MailDomainSpec =
            serde_yaml::from_str("{domain: acme.test, returnPath: bounce}").unwrap();
        let relay = SpfAuthorization {
            include: None,
            egress_ips: vec!["192.0.2.10".into()],
        };
        let current = ed25519_key(2);
        let keys = [
            key("new", KeyState::Pending, &ed25519_key(1)),
            key("cur", KeyState::Active, &current),
            key("old", KeyState::Retired, &ed25519_key(3)),
        ];
        let dns = FakeDns::default()
            .txt(
                "cur._domainkey.acme.test",
                &format!("v=DKIM1; k=ed25519; p={current}"),
            )
            .txt("acme.test", "v=spf1 mx ip4:192.0.2.0/24 -all")
            .mx("acme.test", "mx.acme.test")
            .txt("_dmarc.acme.test", "v=DMARC1; p=reject")
            .failing("bounce.acme.test");
        let mut expected = expected_records("acme.test", &spec, &keys, Some(&relay), None);
        expected.extend(return_path_mx_record(
            "acme.test",
            &spec,
            "bounces.relay.test",
        ));
        let outcomes = check_records(&dns, &expected).await;
        let verdicts: Vec<_> = outcomes
            .iter()
            .map(|o| o.verdict.as_ref().map(Verdict::record_state))
            .collect();
        use crate::api::RecordState::*;
        assert_eq!(
            verdicts,
            [
                Some(Missing),  // new: not published yet
                Some(Verified), // cur
                None,           // old: removable, not looked up
                Some(Verified), // SPF authorizes 192.0.2.10
                Some(Verified), // DMARC
                Some(Error),    // return-path SPF: the lookup failed
                Some(Error),    // return-path MX: the lookup failed
            ]
        );
    }

    #[tokio::test]
    async fn a_domain_report_passes_only_when_everything_verifies() {
        let dns = FakeDns::default()
            .txt(
                "s1._domainkey.acme.test",
                &format!("v=DKIM1; k=ed25519; p={}", ed25519_key(1)),
            )
            .txt("acme.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc.acme.test", "v=DMARC1; p=none");
        let mut check = DomainCheck {
            domain: "ACME.test.".into(),
            selectors: vec![SelectorCheck {
                selector: "s1".into(),
                public_key: None,
            }],
            spf: SpfRequirement::default(),
        };
        let report = check_domain(&dns, &check).await;
        assert_eq!(report.domain, "acme.test");
        assert!(report.passed(), "{report:?}");
        assert!(report.dmarc.policy.as_ref().unwrap().monitoring_only);

        check.selectors.push(SelectorCheck {
            selector: "s2".into(),
            public_key: None,
        });
        let report = check_domain(&dns, &check).await;
        assert!(!report.passed());
        assert!(matches!(report.dkim[1].verdict, Verdict::Missing { .. }));
    }

    #[tokio::test]
    async fn a_delegated_key_is_checked_through_the_tenants_cname() {
        let spec: MailDomainSpec = serde_yaml::from_str(
            "{domain: acme.test, dkim: {algorithm: Ed25519, delegation: {providerRef: {name: p}}}}",
        )
        .unwrap();
        let base = "abc.dkim.platform.test";
        let signing = ed25519_key(4);
        let keys = [key("ma1", KeyState::Active, &signing)];
        let value = format!("v=DKIM1; k=ed25519; p={signing}");
        let expected = expected_records("acme.test", &spec, &keys, None, Some(base));
        let names: Vec<(&str, RecordType)> = expected
            .iter()
            .filter(|r| r.purpose == Purpose::Dkim)
            .map(|r| (r.name.as_str(), r.record_type))
            .collect();
        assert_eq!(
            names,
            [
                ("ma1.abc.dkim.platform.test", RecordType::Txt),
                ("ma1._domainkey.acme.test", RecordType::Cname),
                ("ma2._domainkey.acme.test", RecordType::Cname),
            ]
        );
        let verdict = |outcomes: &[RecordOutcome], name: &str| {
            outcomes
                .iter()
                .find(|o| o.record.name == name)
                .and_then(|o| o.verdict.clone())
                .unwrap()
        };

        // Both CNAMEs in place: the key is seen through ma1, and the idle
        // slot ma2 only needs its CNAME.
        let dns = FakeDns::default()
            .txt("ma1.abc.dkim.platform.test", &value)
            .cname("ma1._domainkey.acme.test", "ma1.abc.dkim.platform.test")
            .cname("ma2._domainkey.acme.test", "ma2.abc.dkim.platform.test");
        let outcomes = check_records(&dns, &expected).await;
        assert_eq!(
            verdict(&outcomes, "ma1._domainkey.acme.test"),
            Verdict::Verified
        );
        assert_eq!(
            verdict(&outcomes, "ma2._domainkey.acme.test"),
            Verdict::Verified
        );
        assert_eq!(
            verdict(&outcomes, "ma1.abc.dkim.platform.test"),
            Verdict::Verified
        );

        // The tenant's CNAME gone: missing, though the record itself stays.
        let dns = FakeDns::default()
            .txt("ma1.abc.dkim.platform.test", &value)
            .cname("ma2._domainkey.acme.test", "ma2.abc.dkim.platform.test");
        let outcomes = check_records(&dns, &expected).await;
        assert!(matches!(
            verdict(&outcomes, "ma1._domainkey.acme.test"),
            Verdict::Missing { .. }
        ));
        assert_eq!(
            verdict(&outcomes, "ma1.abc.dkim.platform.test"),
            Verdict::Verified
        );

        // Pointing elsewhere: a mismatch naming what it points to; and a
        // CNAME in place whose record is not there yet is missing.
        let dns = FakeDns::default()
            .cname("ma1._domainkey.acme.test", "ma1.other.dkim.platform.test")
            .cname("ma2._domainkey.acme.test", "ma2.abc.dkim.platform.test");
        let outcomes = check_records(&dns, &expected).await;
        assert_eq!(
            verdict(&outcomes, "ma1._domainkey.acme.test"),
            Verdict::Mismatch {
                found: "CNAME ma1.other.dkim.platform.test.".into(),
                problem: "the CNAME must point to ma1.abc.dkim.platform.test.".into(),
            }
        );
        let dns = FakeDns::default()
            .cname("ma1._domainkey.acme.test", "ma1.abc.dkim.platform.test")
            .cname("ma2._domainkey.acme.test", "ma2.abc.dkim.platform.test");
        let outcomes = check_records(&dns, &expected).await;
        assert!(matches!(
            verdict(&outcomes, "ma1._domainkey.acme.test"),
            Verdict::Missing { .. }
        ));
    }
}
