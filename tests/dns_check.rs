//! The DNS checks against a real authoritative server (knot on loopback).
//!
//! Every test starts its own knot with the scenario zones below, so tests
//! run in parallel and a test that stops or breaks the server harms no
//! other.

mod support;

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mailauth_operator::api::{
    DkimKeyStatus, KeyAlgorithm, KeyState, MailDomainSpec, RecordState, SpfAuthorization,
};
use mailauth_operator::dkim::{NewKey, generate};
use mailauth_operator::dns::dkim::check_dkim;
use mailauth_operator::dns::dmarc::check_dmarc;
use mailauth_operator::dns::spf::{EgressRange, SpfProblem, SpfResult, check_spf};
use mailauth_operator::dns::{
    DnsResolver, DomainCheck, ResolverSettings, SelectorCheck, SpfRequirement, Verdict,
    check_domain, check_records, expected_records, record_statuses,
};
use support::dns::{Knot, Zone};

/// A fresh RSA-2048 key as the operator publishes it: a SubjectPublicKeyInfo
/// of 294 bytes, 392 base64 characters, so its DKIM record needs two TXT
/// strings. A real key: `check` parses what `p=` holds.
fn rsa_2048_key() -> String {
    let request = NewKey {
        selector: "test".into(),
        algorithm: KeyAlgorithm::Rsa,
        size: Some(2048),
        generation: 1,
    };
    generate(&request).expect("RSA key").public_key
}

struct Keys {
    good: String,
    other: String,
}

impl Keys {
    fn new() -> Self {
        Self {
            good: rsa_2048_key(),
            other: rsa_2048_key(),
        }
    }
}

fn dkim_value(key: &str) -> String {
    mailauth_operator::dkim::dkim_txt_value(KeyAlgorithm::Rsa, key)
}

/// One zone per scenario, under `test` (which is served too: checkdmarc
/// walks up to `_dmarc.test`).
fn scenario_zones(keys: &Keys) -> Vec<Zone> {
    let mut many = Zone::new("many.test").txt(
        "@",
        "v=spf1 include:i1.many.test include:i2.many.test include:i3.many.test \
         include:i4.many.test include:i5.many.test include:i6.many.test -all",
    );
    for i in 1..=6 {
        many = many
            .txt(&format!("i{i}"), &format!("v=spf1 a:h{i}.many.test -all"))
            .record(&format!("h{i} A 192.0.2.{i}"));
    }
    let mut ten = Zone::new("ten.test").txt(
        "@",
        "v=spf1 include:i1.ten.test include:i2.ten.test include:i3.ten.test \
         include:i4.ten.test include:i5.ten.test -all",
    );
    for i in 1..=5 {
        ten = ten
            .txt(&format!("i{i}"), &format!("v=spf1 a:h{i}.ten.test -all"))
            .record(&format!("h{i} A 192.0.2.{i}"));
    }
    vec![
        Zone::new("test"),
        ten.txt("_dmarc", "v=DMARC1; p=reject"),
        Zone::new("onevoid.test")
            .txt("@", "v=spf1 a:nx.onevoid.test mx ip4:192.0.2.1 -all")
            .record("@ MX 10 mail.onevoid.test.")
            .txt(
                "_dmarc",
                "v=DMARC1; p=reject; rua=mailto:dmarc@onevoid.test",
            ),
        Zone::new("relay.test")
            .txt("_spf", "v=spf1 ip4:198.51.100.0/24 -all")
            .txt("s1._domainkey.keys", &dkim_value(&keys.good)),
        Zone::new("good.test")
            .txt("s1._domainkey", &dkim_value(&keys.good))
            .record("s2._domainkey A 127.0.0.1")
            .txt("@", "v=spf1 ip4:192.0.2.0/24 include:_spf.relay.test -all")
            .txt("@", "some-site-verification=abc")
            .txt("_dmarc", "v=DMARC1; p=reject; adkim=s"),
        Zone::new("cname.test")
            .record("s1._domainkey CNAME s1._domainkey.keys.relay.test.")
            .txt("@", "v=spf1 include:_spf.relay.test -all")
            .txt("_dmarc", "v=DMARC1; p=quarantine"),
        Zone::new("twospf.test")
            .txt("@", "v=spf1 ip4:192.0.2.1 -all")
            .txt("@", "v=spf1 ip4:192.0.2.2 -all")
            .txt("_dmarc", "v=DMARC1; p=reject"),
        many.txt("_dmarc", "v=DMARC1; p=reject"),
        Zone::new("loop.test")
            .txt("@", "v=spf1 include:a.loop.test -all")
            .txt("a", "v=spf1 include:b.loop.test -all")
            .txt("b", "v=spf1 include:a.loop.test -all")
            .txt("_dmarc", "v=DMARC1; p=reject"),
        Zone::new("void.test")
            .txt(
                "@",
                "v=spf1 a:nx1.void.test a:nx2.void.test mx:nx3.void.test ip4:192.0.2.1 -all",
            )
            .txt("_dmarc", "v=DMARC1; p=reject"),
        Zone::new("plusall.test")
            .txt("@", "v=spf1 +all")
            .txt("_dmarc", "v=DMARC1; p=reject"),
        Zone::new("nodmarc.test").txt("@", "v=spf1 ip4:192.0.2.1 -all"),
        Zone::new("baddmarc.test")
            .txt("@", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc", "v=DMARC1; p=bogus"),
        Zone::new("monitor.test")
            .txt("@", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc", "v=DMARC1; p=none"),
        Zone::new("ruaonly.test")
            .txt("@", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc", "v=DMARC1; rua=mailto:dmarc@ruaonly.test"),
        Zone::new("badpolicy.test")
            .txt("@", "v=spf1 ip4:192.0.2.1 -all")
            .txt(
                "_dmarc",
                "v=DMARC1; p=bogus; rua=mailto:dmarc@badpolicy.test",
            ),
        Zone::new("nopolicy.test")
            .txt("@", "v=spf1 ip4:192.0.2.1 -all")
            .txt("_dmarc", "v=DMARC1; adkim=s"),
        receiver_zone(),
        Zone::broken("broken.test"),
    ]
}

// Keys made with openssl by tests/fixtures/dkim/generate.sh; the private
// halves sign the messages receivers verify below.
const RSA_2048: &str = include_str!("fixtures/dkim/rsa-2048.spki.b64");
const RSA_2048_PKCS1: &str = include_str!("fixtures/dkim/rsa-2048.pkcs1.b64");
const RSA_1024: &str = include_str!("fixtures/dkim/rsa-1024.spki.b64");
const RSA_512: &str = include_str!("fixtures/dkim/rsa-512.spki.b64");
const ED25519: &str = include_str!("fixtures/dkim/ed25519.raw.b64");

/// The domain whose selectors hold one DKIM key record per class of
/// verdict; its SPF and DMARC are valid, so `check` passes or fails on DKIM
/// alone.
const RECEIVER_DOMAIN: &str = "receiver.test";

/// `(selector, record)` for each class.
fn receiver_dkim_records() -> Vec<(&'static str, String)> {
    let b64 = base64::engine::general_purpose::STANDARD;
    // Valid base64 that starts like an RSA SubjectPublicKeyInfo, with the
    // last byte of the key cut off: what `check` used to call verified.
    let mut cut = b64.decode(RSA_2048).expect("fixture is base64");
    cut.pop();
    let short_ed25519 = &b64.decode(ED25519).expect("fixture is base64")[..31];
    vec![
        ("rsa2048", format!("v=DKIM1; k=rsa; p={RSA_2048}")),
        ("rsa1024", format!("v=DKIM1; k=rsa; p={RSA_1024}")),
        ("rsa512", format!("v=DKIM1; k=rsa; p={RSA_512}")),
        ("pkcs1", format!("v=DKIM1; k=rsa; p={RSA_2048_PKCS1}")),
        ("notakey", format!("v=DKIM1; k=rsa; p={}", b64.encode(&cut))),
        ("revoked", "v=DKIM1; k=rsa; p=".to_string()),
        ("rsaased", format!("v=DKIM1; k=ed25519; p={RSA_2048}")),
        ("edasrsa", format!("v=DKIM1; k=rsa; p={ED25519}")),
        ("ed25519", format!("v=DKIM1; k=ed25519; p={ED25519}")),
        (
            "edshort",
            format!("v=DKIM1; k=ed25519; p={}", b64.encode(short_ed25519)),
        ),
        ("sha1", format!("v=DKIM1; k=rsa; h=sha1; p={RSA_2048}")),
        ("hashfoo", format!("v=DKIM1; k=rsa; h=foo; p={RSA_2048}")),
        ("dsa", format!("v=DKIM1; k=dsa; p={RSA_2048}")),
        ("dkim2", format!("v=DKIM2; k=rsa; p={RSA_2048}")),
    ]
}

fn receiver_zone() -> Zone {
    let mut zone = Zone::new(RECEIVER_DOMAIN)
        .txt("@", "v=spf1 ip4:192.0.2.1 -all")
        .txt("_dmarc", "v=DMARC1; p=reject");
    for (selector, record) in receiver_dkim_records() {
        zone = zone.txt(&format!("{selector}._domainkey"), &record);
    }
    zone
}

/// Every scenario domain, for the checkdmarc comparison.
const SCENARIO_DOMAINS: &[&str] = &[
    "good.test",
    "cname.test",
    "twospf.test",
    "many.test",
    "ten.test",
    "onevoid.test",
    "loop.test",
    "void.test",
    "plusall.test",
    "nodmarc.test",
    "baddmarc.test",
    "monitor.test",
    "ruaonly.test",
    "receiver.test",
    "broken.test",
    // Not compared: nopolicy.test (no p=, no rua) and badpolicy.test
    // (p=bogus with a valid rua). For both we follow RFC 7489 6.6.3, which
    // receivers on RFC 7489 apply (invalid, and p=none); checkdmarc 6
    // follows RFC 9989 (p=none, and invalid).
];

fn start(keys: &Keys) -> Knot {
    Knot::start(&scenario_zones(keys))
}

/// A resolver patient enough for a loaded machine: an answer that comes
/// late must not turn into an error.
fn resolver(knot: &Knot) -> DnsResolver {
    resolver_with(knot, Duration::from_secs(5), 2)
}

/// A resolver with a short timeout and one attempt, for the tests that
/// wait for the timeout.
fn impatient_resolver(knot: &Knot) -> DnsResolver {
    resolver_with(knot, Duration::from_millis(500), 1)
}

fn resolver_with(knot: &Knot, timeout: Duration, attempts: usize) -> DnsResolver {
    DnsResolver::new(&ResolverSettings {
        servers: vec![knot.addr()],
        timeout,
        attempts,
        max_concurrent_queries: 16,
    })
    .expect("resolver")
}

fn requirement(ips: &[&str]) -> SpfRequirement {
    SpfRequirement {
        include: None,
        egress: ips
            .iter()
            .map(|ip| EgressRange::parse(ip).expect("test range"))
            .collect(),
    }
}

#[tokio::test]
async fn dkim_key_split_across_two_strings_verifies() {
    let keys = Keys::new();
    assert!(
        dkim_value(&keys.good).len() > 255,
        "the record must need two strings"
    );
    let knot = start(&keys);
    let dns = resolver(&knot);
    let outcome = check_dkim(&dns, "good.test", "s1", Some(&keys.good)).await;
    assert_eq!(outcome.verdict, Verdict::Verified, "{outcome:?}");
    assert_eq!(outcome.name, "s1._domainkey.good.test");
    assert_eq!(outcome.key_type.as_deref(), Some("rsa"));
}

#[tokio::test]
async fn dkim_wrong_key_is_a_mismatch_showing_what_is_published() {
    let keys = Keys::new();
    let knot = start(&keys);
    let outcome = check_dkim(&resolver(&knot), "good.test", "s1", Some(&keys.other)).await;
    match outcome.verdict {
        Verdict::Mismatch { found, problem } => {
            assert!(found.contains(&keys.good), "found: {found}");
            assert!(problem.contains("different public key"), "{problem}");
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
}

#[tokio::test]
async fn dkim_nxdomain_and_empty_answer_are_both_missing_and_told_apart() {
    let keys = Keys::new();
    let knot = start(&keys);
    let dns = resolver(&knot);
    let nxdomain = check_dkim(&dns, "good.test", "nosuch", Some(&keys.good)).await;
    assert!(
        matches!(&nxdomain.verdict, Verdict::Missing { reason } if reason.contains("NXDOMAIN")),
        "{nxdomain:?}"
    );
    // s2 exists (an A record) but has no TXT: an empty NOERROR answer.
    let empty = check_dkim(&dns, "good.test", "s2", Some(&keys.good)).await;
    assert!(
        matches!(&empty.verdict, Verdict::Missing { reason } if reason.contains("has no TXT")),
        "{empty:?}"
    );
}

#[tokio::test]
async fn dkim_cname_at_the_selector_is_followed() {
    let keys = Keys::new();
    let knot = start(&keys);
    let outcome = check_dkim(&resolver(&knot), "cname.test", "s1", Some(&keys.good)).await;
    assert_eq!(outcome.verdict, Verdict::Verified, "{outcome:?}");
}

#[tokio::test]
async fn a_record_published_or_removed_is_seen_on_the_next_check() {
    let keys = Keys::new();
    let knot = start(&keys);
    let dns = resolver(&knot);
    let before = check_dkim(&dns, "good.test", "s3", Some(&keys.other)).await;
    assert!(
        matches!(before.verdict, Verdict::Missing { .. }),
        "{before:?}"
    );

    let data = support::dns::txt_data(&dkim_value(&keys.other));
    knot.add(
        "good.test",
        &format!("s3._domainkey.good.test. 60 TXT {data}"),
    );
    let published = check_dkim(&dns, "good.test", "s3", Some(&keys.other)).await;
    assert_eq!(published.verdict, Verdict::Verified, "{published:?}");

    knot.remove("good.test", "s3._domainkey.good.test.", "TXT");
    let removed = check_dkim(&dns, "good.test", "s3", Some(&keys.other)).await;
    assert!(
        matches!(removed.verdict, Verdict::Missing { .. }),
        "{removed:?}"
    );
}

#[tokio::test]
async fn spf_authorizing_every_egress_ip_verifies_and_counts_lookups() {
    let keys = Keys::new();
    let knot = start(&keys);
    let outcome = check_spf(
        &resolver(&knot),
        "good.test",
        &requirement(&["192.0.2.10", "198.51.100.0/28"]),
    )
    .await;
    assert_eq!(outcome.verdict, Verdict::Verified, "{outcome:?}");
    assert_eq!(outcome.dns_lookups, 1);
    assert_eq!(outcome.void_lookups, 0);
    assert_eq!(outcome.includes, ["_spf.relay.test"]);
    assert_eq!(outcome.addresses.len(), 3);
    assert!(
        outcome
            .addresses
            .iter()
            .all(|a| a.result == SpfResult::Pass)
    );
}

#[tokio::test]
async fn spf_not_authorizing_an_ip_is_a_mismatch() {
    let keys = Keys::new();
    let knot = start(&keys);
    let outcome = check_spf(
        &resolver(&knot),
        "good.test",
        &requirement(&["203.0.113.5"]),
    )
    .await;
    assert!(outcome.record_is_valid());
    assert!(
        matches!(&outcome.verdict, Verdict::Mismatch { problem, .. } if problem.contains("203.0.113.5")),
        "{outcome:?}"
    );
    assert_eq!(outcome.addresses[0].result, SpfResult::Fail);
}

#[tokio::test]
async fn spf_include_requirement_is_checked_in_the_record_tree() {
    let keys = Keys::new();
    let knot = start(&keys);
    let dns = resolver(&knot);
    let included = SpfRequirement {
        include: Some("_spf.relay.test".into()),
        egress: Vec::new(),
    };
    assert_eq!(
        check_spf(&dns, "cname.test", &included).await.verdict,
        Verdict::Verified
    );
    let not_included = SpfRequirement {
        include: Some("_spf.other.test".into()),
        egress: Vec::new(),
    };
    let outcome = check_spf(&dns, "cname.test", &not_included).await;
    assert!(
        matches!(outcome.verdict, Verdict::Mismatch { .. }),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn spf_problems_found_in_real_records() {
    let keys = Keys::new();
    let knot = start(&keys);
    let dns = resolver(&knot);

    let two = check_spf(&dns, "twospf.test", &SpfRequirement::default()).await;
    assert!(
        two.problems.contains(&SpfProblem::MultipleRecords {
            name: "twospf.test".into(),
            count: 2
        }),
        "{two:?}"
    );
    assert!(!two.record_is_valid());

    let many = check_spf(&dns, "many.test", &requirement(&["192.0.2.1"])).await;
    assert!(many.dns_lookups > 10, "{many:?}");
    assert!(
        many.problems
            .iter()
            .any(|p| matches!(p, SpfProblem::TooManyLookups { .. })),
        "{many:?}"
    );
    assert!(!many.record_is_valid());

    let looped = check_spf(&dns, "loop.test", &SpfRequirement::default()).await;
    assert!(
        looped.problems.contains(&SpfProblem::IncludeLoop {
            chain: vec![
                "loop.test".into(),
                "a.loop.test".into(),
                "b.loop.test".into(),
                "a.loop.test".into()
            ]
        }),
        "{looped:?}"
    );
    assert!(!looped.record_is_valid());

    let void = check_spf(&dns, "void.test", &requirement(&["192.0.2.1"])).await;
    assert_eq!(void.void_lookups, 3, "{void:?}");
    assert!(
        void.problems
            .contains(&SpfProblem::TooManyVoidLookups { count: 3 })
    );
    assert!(!void.record_is_valid());

    let everyone = check_spf(&dns, "plusall.test", &requirement(&["203.0.113.1"])).await;
    assert!(
        everyone.record_is_valid(),
        "+all is valid SPF, just dangerous"
    );
    assert!(
        matches!(&everyone.verdict, Verdict::Mismatch { problem, .. } if problem.contains("whole internet")),
        "{everyone:?}"
    );
}

#[tokio::test]
async fn dmarc_missing_invalid_monitoring_and_enforcing() {
    let keys = Keys::new();
    let knot = start(&keys);
    let dns = resolver(&knot);

    let missing = check_dmarc(&dns, "nodmarc.test").await;
    assert!(
        matches!(&missing.verdict, Verdict::Missing { reason } if reason.contains("NXDOMAIN")),
        "{missing:?}"
    );

    let invalid = check_dmarc(&dns, "baddmarc.test").await;
    assert!(
        matches!(invalid.verdict, Verdict::Mismatch { .. }),
        "{invalid:?}"
    );

    let monitoring = check_dmarc(&dns, "monitor.test").await;
    assert_eq!(monitoring.verdict, Verdict::Verified);
    let policy = monitoring.policy.expect("parsed policy");
    assert_eq!(policy.policy, "none");
    assert!(policy.monitoring_only);

    let enforcing = check_dmarc(&dns, "good.test").await;
    assert_eq!(enforcing.verdict, Verdict::Verified);
    let policy = enforcing.policy.expect("parsed policy");
    assert_eq!(
        (policy.policy, policy.subdomain_policy),
        ("reject", "reject")
    );
    assert_eq!(
        (policy.dkim_alignment, policy.spf_alignment),
        ("strict", "relaxed")
    );
    assert!(!policy.monitoring_only);
}

fn assert_error(verdict: &Verdict, context: &str) {
    assert!(
        matches!(verdict, Verdict::Error { .. }),
        "{context}: expected an error, got {verdict:?}"
    );
}

#[tokio::test]
async fn servfail_is_an_error_never_missing() {
    let keys = Keys::new();
    let knot = start(&keys);
    let dns = resolver(&knot);
    let check = DomainCheck {
        domain: "broken.test".into(),
        selectors: vec![SelectorCheck {
            selector: "s1".into(),
            public_key: Some(keys.good.clone()),
        }],
        spf: SpfRequirement::default(),
    };
    let report = check_domain(&dns, &check).await;
    assert_error(&report.dkim[0].verdict, "DKIM");
    assert_error(&report.spf.verdict, "SPF");
    assert_error(&report.dmarc.verdict, "DMARC");
    assert!(!report.passed());
}

#[tokio::test]
async fn a_zone_that_starts_failing_turns_verified_into_error() {
    let keys = Keys::new();
    let knot = start(&keys);
    let dns = resolver(&knot);
    let before = check_dkim(&dns, "good.test", "s1", Some(&keys.good)).await;
    assert_eq!(before.verdict, Verdict::Verified);
    knot.break_zone("good.test");
    let after = check_dkim(&dns, "good.test", "s1", Some(&keys.good)).await;
    assert_error(&after.verdict, "DKIM after SERVFAIL");
    let spf = check_spf(&dns, "good.test", &requirement(&["192.0.2.1"])).await;
    assert_error(&spf.verdict, "SPF after SERVFAIL");
}

#[tokio::test]
async fn an_unresponsive_server_times_out_into_errors() {
    let keys = Keys::new();
    let knot = start(&keys);
    let dns = impatient_resolver(&knot);
    knot.pause();
    let check = DomainCheck {
        domain: "good.test".into(),
        selectors: vec![SelectorCheck {
            selector: "s1".into(),
            public_key: Some(keys.good.clone()),
        }],
        spf: requirement(&["192.0.2.1"]),
    };
    let report = check_domain(&dns, &check).await;
    knot.resume();
    assert!(
        matches!(&report.dkim[0].verdict, Verdict::Error { message } if message.contains("timed out")),
        "{report:?}"
    );
    assert_error(&report.spf.verdict, "SPF");
    assert_error(&report.dmarc.verdict, "DMARC");

    // Answers again once the server does.
    let again = check_dkim(&resolver(&knot), "good.test", "s1", Some(&keys.good)).await;
    assert_eq!(again.verdict, Verdict::Verified);
}

#[tokio::test]
async fn a_stopped_server_is_an_error() {
    let keys = Keys::new();
    let mut knot = start(&keys);
    let dns = impatient_resolver(&knot);
    knot.stop();
    let outcome = check_dkim(&dns, "good.test", "s1", Some(&keys.good)).await;
    assert_error(&outcome.verdict, "DKIM with the server stopped");
    let dmarc = check_dmarc(&dns, "good.test").await;
    assert_error(&dmarc.verdict, "DMARC with the server stopped");
}

fn key(selector: &str, state: KeyState, public_key: &str) -> DkimKeyStatus {
    DkimKeyStatus {
        selector: selector.into(),
        algorithm: KeyAlgorithm::Rsa,
        size: Some(2048),
        state,
        generation: 1,
        public_key: public_key.into(),
        created_at: Time("2026-01-01T00:00:00Z".parse().expect("time")),
        verified_at: None,
        activated_at: None,
        retiring_at: None,
        retired_at: None,
    }
}

#[tokio::test]
async fn expected_records_of_a_maildomain_are_checked_and_statuses_do_not_churn() {
    let keys = Keys::new();
    let knot = start(&keys);
    let dns = resolver(&knot);
    let spec: MailDomainSpec =
        serde_yaml::from_str("{domain: good.test, dmarc: {policy: reject}}").expect("spec");
    let relay = SpfAuthorization {
        include: Some("_spf.relay.test".into()),
        egress_ips: vec!["198.51.100.20".into()],
    };
    let key_status = [
        key("s9", KeyState::Pending, &keys.other),
        key("s1", KeyState::Active, &keys.good),
        key("s0", KeyState::Retired, "OLD"),
    ];
    let expected = expected_records("good.test", &spec, &key_status, Some(&relay), None);
    let outcomes = check_records(&dns, &expected).await;
    let t1 = Time("2026-03-01T00:00:00Z".parse().expect("time"));
    let statuses = record_statuses(&outcomes, &[], &t1);
    let states: Vec<_> = statuses
        .iter()
        .map(|s| (s.name.as_str(), s.state))
        .collect();
    assert_eq!(
        states,
        [
            ("s9._domainkey.good.test", RecordState::Missing),
            ("s1._domainkey.good.test", RecordState::Verified),
            ("s0._domainkey.good.test", RecordState::Removable),
            ("good.test", RecordState::Verified),
            ("_dmarc.good.test", RecordState::Verified),
        ]
    );
    // Checking again a day later changes nothing.
    let again = check_records(&dns, &expected).await;
    let t2 = Time("2026-03-02T00:00:00Z".parse().expect("time"));
    assert_eq!(record_statuses(&again, &statuses, &t2), statuses);
}

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mailauth-operator"))
}

#[test]
fn records_printed_by_the_cli_load_into_a_zone_and_verify() {
    let keys = Keys::new();
    let ed25519 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    let manifest = format!(
        "apiVersion: mailauth.dev/v1alpha1
kind: MailDomain
metadata: {{name: acme, namespace: tenant}}
spec:
  domain: acme.test
  returnPath: bounce
  dmarc: {{policy: quarantine, aggregateReportsTo: [dmarc@acme.test]}}
status:
  dkim:
    keys:
      - {{selector: ma1b, algorithm: Ed25519, state: Pending, generation: 2, publicKey: '{ed25519}', createdAt: '2026-01-02T00:00:00Z'}}
      - {{selector: ma1a, algorithm: RSA, size: 2048, state: Active, generation: 1, publicKey: '{}', createdAt: '2026-01-01T00:00:00Z'}}
      - {{selector: ma0a, algorithm: RSA, size: 2048, state: Retired, generation: 0, publicKey: 'OLD', createdAt: '2025-01-01T00:00:00Z'}}
",
        keys.good
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("md.yaml");
    std::fs::write(&path, &manifest).expect("manifest");
    let output = binary()
        .args(["records", "-f"])
        .arg(&path)
        .args(["--spf-ip", "192.0.2.10", "--ttl", "300"])
        .output()
        .expect("running records");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let zone_lines = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        zone_lines.contains("; ma0a._domainkey.acme.test. 300 IN TXT"),
        "the retired key is listed as removable, commented out:\n{zone_lines}"
    );
    let mut zone = Zone::new("acme.test");
    for line in zone_lines
        .lines()
        .filter(|l| !l.starts_with(';') && !l.is_empty())
    {
        zone = zone.record(line);
    }
    let knot = Knot::start(&[Zone::new("test"), zone]);

    let settings = format!("127.0.0.1:{}", knot.port());
    let check = binary()
        .args([
            "check",
            "acme.test",
            "--selector",
            "ma1a",
            "--selector",
            "ma1b",
        ])
        .args(["--spf-ip", "192.0.2.10", "--dns-server", &settings])
        .args(["--output", "json"])
        .output()
        .expect("running check");
    let report: serde_json::Value = serde_json::from_slice(&check.stdout).expect("JSON report");
    assert!(check.status.success(), "{report:#}\n{}", knot.log());
    assert_eq!(report["failed"], 0);
    assert_eq!(
        report["domains"][0]["dkim"][0]["verdict"]["state"],
        "Verified"
    );
    assert_eq!(report["domains"][0]["spf"]["verdict"]["state"], "Verified");
    assert_eq!(
        report["domains"][0]["dmarc"]["policy"]["policy"],
        "quarantine"
    );
    // The return-path SPF record is there too.
    assert_eq!(
        knot.query_status("bounce.acme.test", "TXT").as_deref(),
        Some("NOERROR")
    );
}

#[test]
fn check_cli_exits_nonzero_when_any_domain_fails() {
    let keys = Keys::new();
    let knot = start(&keys);
    let server = format!("127.0.0.1:{}", knot.port());
    let domains = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(
        domains.path(),
        "# scenario domains\nmonitor.test\n\nbaddmarc.test # invalid DMARC\n",
    )
    .expect("domains file");
    let failing = binary()
        .args([
            "check",
            "good.test",
            "--selector",
            "s1",
            "--dns-server",
            &server,
        ])
        .arg("--domains-file")
        .arg(domains.path())
        .output()
        .expect("running check");
    let text = String::from_utf8_lossy(&failing.stdout);
    assert_eq!(failing.status.code(), Some(1), "{text}");
    assert!(text.contains("good.test: OK"), "{text}");
    // --selector applies to every domain: monitor.test has no s1.
    assert!(text.contains("monitor.test: FAIL"), "{text}");
    assert!(text.contains("baddmarc.test: FAIL"), "{text}");
    assert!(text.contains("3 domain(s) checked"), "{text}");

    let passing = binary()
        .args([
            "check",
            "good.test",
            "--selector",
            "s1",
            "--dns-server",
            &server,
        ])
        .args(["--spf-ip", "192.0.2.1", "--spf-ip", "198.51.100.1"])
        .output()
        .expect("running check");
    let text = String::from_utf8_lossy(&passing.stdout);
    assert!(passing.status.success(), "{text}");
    assert!(text.contains("good.test: OK"), "{text}");
    assert!(text.contains("1/10 DNS lookups"), "{text}");
}

/// Where checkdmarc (PyPI) is asked the same questions, and must agree on
/// which SPF and DMARC records are valid.
#[test]
fn checkdmarc_agrees_on_spf_and_dmarc_validity() {
    let probe = Command::new("python3")
        .args(["-c", "import checkdmarc"])
        .output()
        .expect("running python3");
    assert!(
        probe.status.success(),
        "checkdmarc is not installed: `pip install checkdmarc` (CI installs it)"
    );
    let keys = Keys::new();
    let knot = start(&keys);
    let script = r#"
import json, sys
import dns.nameserver
from checkdmarc.spf import check_spf
from checkdmarc.dmarc import check_dmarc
ns = [dns.nameserver.Do53Nameserver("127.0.0.1", int(sys.argv[1]))]
out = {}
for domain in sys.argv[2:]:
    spf = check_spf(domain, nameservers=ns, timeout=2.0)
    dmarc = check_dmarc(domain, nameservers=ns, timeout=2.0)
    out[domain] = {"spf": bool(spf["valid"]), "dmarc": bool(dmarc["valid"]),
                   "dns_lookups": spf.get("dns_lookups"),
                   "void_dns_lookups": spf.get("void_dns_lookups"),
                   "spf_error": spf.get("error"), "dmarc_error": dmarc.get("error")}
print(json.dumps(out))
"#;
    let output = Command::new("python3")
        .args(["-c", script, &knot.port().to_string()])
        .args(SCENARIO_DOMAINS)
        .output()
        .expect("running checkdmarc");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let dns = resolver(&knot);
    let mut disagreements = Vec::new();
    let mut valid_spf = 0;
    let mut valid_dmarc = 0;
    for domain in SCENARIO_DOMAINS {
        let check = DomainCheck {
            domain: domain.to_string(),
            selectors: Vec::new(),
            spf: SpfRequirement::default(),
        };
        let ours = runtime.block_on(check_domain(&dns, &check));
        let our_spf = ours.spf.record_is_valid();
        let our_dmarc = ours.dmarc.verdict.is_verified();
        valid_spf += usize::from(our_spf);
        valid_dmarc += usize::from(our_dmarc);
        let their = &theirs[domain];
        if their["spf"].as_bool() != Some(our_spf) {
            disagreements.push(format!(
                "{domain} SPF: ours {our_spf} ({:?}), checkdmarc {their}",
                ours.spf.verdict
            ));
        }
        // For records both find valid, the lookup counts must match too.
        if our_spf
            && their["spf"].as_bool() == Some(true)
            && (their["dns_lookups"].as_u64() != Some(u64::from(ours.spf.dns_lookups))
                || their["void_dns_lookups"].as_u64() != Some(u64::from(ours.spf.void_lookups)))
        {
            disagreements.push(format!(
                "{domain} SPF lookups: ours {}/{} void, checkdmarc {their}",
                ours.spf.dns_lookups, ours.spf.void_lookups
            ));
        }
        if their["dmarc"].as_bool() != Some(our_dmarc) {
            disagreements.push(format!(
                "{domain} DMARC: ours {our_dmarc} ({:?}), checkdmarc {their}",
                ours.dmarc.verdict
            ));
        }
    }
    assert!(disagreements.is_empty(), "{disagreements:#?}");
    // The scenarios cover both answers for each protocol.
    assert!(valid_spf > 0 && valid_spf < SCENARIO_DOMAINS.len());
    assert!(valid_dmarc > 0 && valid_dmarc < SCENARIO_DOMAINS.len());
}

#[test]
fn egress_ranges_from_the_cli_reject_garbage() {
    let output = binary()
        .args([
            "check",
            "good.test",
            "--spf-ip",
            "not-an-ip",
            "--dns-server",
            "127.0.0.1:1",
        ])
        .output()
        .expect("running check");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not-an-ip"), "{stderr}");
}

// ---------------------------------------------------------------------
// DKIM and DMARC verdicts a receiver shares: each class checked by the
// library, by `mailauth-operator check` run as a process, and where a real
// verifier can tell, by that verifier (dkimpy, OpenDKIM).

/// What `mailauth-operator check` says about one selector of
/// receiver.test: its exit status, its text report and its JSON entry.
struct CliVerdict {
    success: bool,
    text: String,
    dkim: serde_json::Value,
}

fn cli_check(knot: &Knot, domain: &str, selector: &str, output: &str) -> std::process::Output {
    binary()
        .args(["check", domain, "--selector", selector])
        .args(["--dns-server", &format!("127.0.0.1:{}", knot.port())])
        .args(["--output", output])
        .output()
        .expect("running check")
}

fn cli_dkim_verdict(knot: &Knot, selector: &str) -> CliVerdict {
    let text = cli_check(knot, RECEIVER_DOMAIN, selector, "text");
    let json = cli_check(knot, RECEIVER_DOMAIN, selector, "json");
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON report");
    assert_eq!(
        text.status.success(),
        json.status.success(),
        "the exit status does not depend on the format"
    );
    CliVerdict {
        success: text.status.success(),
        text: String::from_utf8(text.stdout).expect("utf-8"),
        dkim: report["domains"][0]["dkim"][0].clone(),
    }
}

/// The library and the binary both call the record at `selector` a
/// mismatch whose problem contains `problem`.
async fn assert_dkim_mismatch(knot: &Knot, selector: &str, problem: &str) {
    let outcome = check_dkim(&resolver(knot), RECEIVER_DOMAIN, selector, None).await;
    assert!(
        matches!(&outcome.verdict, Verdict::Mismatch { problem: found, .. } if found.contains(problem)),
        "{selector}: expected a mismatch saying {problem:?}, got {outcome:?}"
    );
    let cli = cli_dkim_verdict(knot, selector);
    assert!(!cli.success, "check must fail:\n{}", cli.text);
    assert_eq!(cli.dkim["verdict"]["state"], "Mismatch", "{}", cli.dkim);
    let text_line =
        format!("DKIM {selector} at {selector}._domainkey.{RECEIVER_DOMAIN}: mismatch: ");
    assert!(
        cli.text.contains(&text_line) && cli.text.contains(problem),
        "{}",
        cli.text
    );
}

/// The library and the binary both verify the record at `selector`, and
/// the binary reports exactly these warning kinds.
async fn assert_dkim_verified(knot: &Knot, selector: &str, warnings: &[&str]) -> CliVerdict {
    let outcome = check_dkim(&resolver(knot), RECEIVER_DOMAIN, selector, None).await;
    assert_eq!(
        outcome.verdict,
        Verdict::Verified,
        "{selector}: {outcome:?}"
    );
    let cli = cli_dkim_verdict(knot, selector);
    assert!(cli.success, "check must pass:\n{}", cli.text);
    assert_eq!(cli.dkim["verdict"]["state"], "Verified", "{}", cli.dkim);
    let kinds: Vec<&str> = cli.dkim["warnings"]
        .as_array()
        .map(|all| all.iter().filter_map(|w| w["kind"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(kinds, warnings, "{}", cli.dkim);
    assert_eq!(
        cli.text.matches("    warning: ").count(),
        warnings.len(),
        "{}",
        cli.text
    );
    cli
}

fn fixture_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dkim")
        .join(name)
}

/// Signs a message as `RECEIVER_DOMAIN` with a fixture's private key under
/// `selector` (both with dkimpy), then verifies it as a receiver: dkimpy
/// fetching the key record from knot.
const DKIMPY_SIGN_AND_VERIFY: &str = r#"
import base64, io, logging, sys, dkim, dns.resolver
port, domain, selector, key_path, algorithm = sys.argv[1:6]
key = open(key_path, "rb").read()
if algorithm == "ed25519-sha256":
    # dkimpy signs with the bare 32-byte seed, which ends a PKCS#8 Ed25519
    # key (RFC 8410).
    body = b"".join(l for l in key.splitlines() if not l.startswith(b"-----"))
    key = base64.b64encode(base64.b64decode(body)[-32:])
message = (b"From: sender@" + domain.encode() + b"\r\nTo: someone@example.test\r\n"
           b"Subject: key record check\r\nMessage-ID: <1@" + domain.encode() + b">\r\n\r\nHello.\r\n")
signature = dkim.sign(message, selector.encode(), domain.encode(), key,
                      signature_algorithm=algorithm.encode(),
                      include_headers=[b"from", b"to", b"subject", b"message-id"])
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = int(port)
resolver.cache = None
def txt(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    answer = resolver.resolve(name, "TXT", lifetime=timeout)
    return b"".join(b"".join(record.strings) for record in answer)
# dkimpy says why a signature fails only in its log.
log = io.StringIO()
logger = logging.getLogger("dkimpy")
logger.addHandler(logging.StreamHandler(log))
logger.setLevel(logging.DEBUG)
try:
    ok = dkim.DKIM(signature + message, logger=logger).verify(dnsfunc=txt)
    reasons = [line for line in log.getvalue().splitlines() if not line.startswith("sig:")]
    print("pass" if ok else "fail: " + " | ".join(reasons))
except dkim.DKIMException as error:
    print("fail: " + str(error))
"#;

/// dkimpy's verdict on a message signed under `selector` with the fixture
/// key `key` (`rsa-2048`, `ed25519`, ...): `Ok` for pass, `Err(reason)`.
fn dkimpy_verdict(knot: &Knot, selector: &str, key: &str) -> Result<(), String> {
    let algorithm = if key == "ed25519" {
        "ed25519-sha256"
    } else {
        "rsa-sha256"
    };
    // The system Python has the Debian packages; a pyenv shim may not.
    let output = Command::new("/usr/bin/python3")
        .args(["-c", DKIMPY_SIGN_AND_VERIFY, &knot.port().to_string()])
        .args([RECEIVER_DOMAIN, selector])
        .arg(fixture_path(&format!("{key}.key.pem")))
        .arg(algorithm)
        .output()
        .expect("running python3 with dkimpy (Debian package `python3-dkim`)");
    assert!(
        output.status.success(),
        "dkimpy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let verdict = String::from_utf8_lossy(&output.stdout).trim().to_string();
    match verdict.as_str() {
        "pass" => Ok(()),
        other => Err(other.to_string()),
    }
}

/// What OpenDKIM's `opendkim-testkey` says about the record at `selector`,
/// compared with the fixture private key `key` when given: `Ok` when it
/// reports `key OK`, `Err(its output)` otherwise. It asks knot through
/// libunbound, whose stub zone points at the test server.
fn opendkim_testkey(knot: &Knot, selector: &str, key: Option<&str>) -> Result<(), String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let unbound = dir.path().join("unbound.conf");
    // unbound answers names under .test itself (RFC 6761) unless told not to.
    std::fs::write(
        &unbound,
        format!(
            "server:\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n  \
             local-zone: \"test.\" nodefault\nstub-zone:\n  name: \"{RECEIVER_DOMAIN}.\"\n  \
             stub-addr: 127.0.0.1@{}\n",
            knot.port()
        ),
    )
    .expect("unbound config");
    let config = dir.path().join("opendkim.conf");
    std::fs::write(
        &config,
        format!("ResolverConfiguration {}\n", unbound.display()),
    )
    .expect("opendkim config");
    let mut command = Command::new("opendkim-testkey");
    command
        .arg("-x")
        .arg(&config)
        .args(["-d", RECEIVER_DOMAIN, "-s", selector, "-vvv"]);
    if let Some(key) = key {
        // OpenDKIM wants a private key only its owner can read.
        use std::os::unix::fs::PermissionsExt as _;
        let path = dir.path().join("key.pem");
        std::fs::copy(fixture_path(&format!("{key}.key.pem")), &path).expect("key copy");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .expect("key permissions");
        command.arg("-k").arg(path);
    }
    let output = command
        .output()
        .expect("running opendkim-testkey (Debian package `opendkim-tools`)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && text.contains("key OK") {
        Ok(())
    } else {
        Err(text)
    }
}

fn assert_receiver_fails(verdict: Result<(), String>, reason: &str) {
    match verdict {
        Ok(()) => panic!("the receiver accepted what `check` calls unusable"),
        Err(text) => assert!(text.contains(reason), "expected {reason:?} in: {text}"),
    }
}

#[tokio::test]
async fn dkim_rsa_key_of_2048_bits_verifies_and_receivers_agree() {
    let knot = start(&Keys::new());
    let cli = assert_dkim_verified(&knot, "rsa2048", &[]).await;
    assert_eq!(cli.dkim["keyBits"], 2048);
    assert!(
        cli.text.contains("verified (k=rsa, 2048 bits)"),
        "{}",
        cli.text
    );
    // The controls: the receivers used below accept a good key.
    assert_eq!(dkimpy_verdict(&knot, "rsa2048", "rsa-2048"), Ok(()));
    assert_eq!(opendkim_testkey(&knot, "rsa2048", Some("rsa-2048")), Ok(()));
}

#[tokio::test]
async fn dkim_rsa_key_of_1024_bits_verifies_with_a_warning() {
    let knot = start(&Keys::new());
    let cli = assert_dkim_verified(&knot, "rsa1024", &["weakRsaKey"]).await;
    assert!(cli.text.contains("has 1024 bits"), "{}", cli.text);
    // Still usable: receivers verify it.
    assert_eq!(dkimpy_verdict(&knot, "rsa1024", "rsa-1024"), Ok(()));
}

#[tokio::test]
async fn dkim_rsa_key_under_1024_bits_is_a_mismatch_receivers_share() {
    let knot = start(&Keys::new());
    assert_dkim_mismatch(&knot, "rsa512", "the RSA key has 512 bits").await;
    assert_receiver_fails(
        dkimpy_verdict(&knot, "rsa512", "rsa-512"),
        "public key too small",
    );
}

#[tokio::test]
async fn dkim_bare_pkcs1_key_verifies_with_a_warning_opendkim_confirms() {
    let knot = start(&Keys::new());
    assert_dkim_verified(&knot, "pkcs1", &["pkcs1Encoding"]).await;
    assert_eq!(dkimpy_verdict(&knot, "pkcs1", "rsa-2048"), Ok(()));
    // What the warning says about OpenDKIM.
    assert_receiver_fails(
        opendkim_testkey(&knot, "pkcs1", Some("rsa-2048")),
        "keys do not match",
    );
}

#[tokio::test]
async fn dkim_p_that_is_base64_but_not_a_key_is_a_mismatch_receivers_share() {
    let knot = start(&Keys::new());
    assert_dkim_mismatch(&knot, "notakey", "is not an RSA public key").await;
    assert_receiver_fails(
        dkimpy_verdict(&knot, "notakey", "rsa-2048"),
        "could not parse RSA public key",
    );
    assert_receiver_fails(
        opendkim_testkey(&knot, "notakey", Some("rsa-2048")),
        "keys do not match",
    );
}

#[tokio::test]
async fn dkim_revoked_key_is_a_mismatch_saying_revoked() {
    let knot = start(&Keys::new());
    assert_dkim_mismatch(&knot, "revoked", "revoked (empty p=)").await;
    assert_receiver_fails(
        dkimpy_verdict(&knot, "revoked", "rsa-2048"),
        "could not parse RSA public key (b'')",
    );
    assert_receiver_fails(opendkim_testkey(&knot, "revoked", None), "Revoked key");
}

#[tokio::test]
async fn dkim_rsa_key_under_k_ed25519_is_a_mismatch_receivers_share() {
    let knot = start(&Keys::new());
    assert_dkim_mismatch(
        &knot,
        "rsaased",
        "k=ed25519 but p= holds an RSA key (2048 bits)",
    )
    .await;
    assert_receiver_fails(
        dkimpy_verdict(&knot, "rsaased", "rsa-2048"),
        "could not parse ed25519 public key",
    );
}

#[tokio::test]
async fn dkim_ed25519_key_under_k_rsa_is_a_mismatch_receivers_share() {
    let knot = start(&Keys::new());
    assert_dkim_mismatch(&knot, "edasrsa", "k=rsa but p= holds an Ed25519 key").await;
    assert_receiver_fails(
        dkimpy_verdict(&knot, "edasrsa", "ed25519"),
        "could not parse RSA public key",
    );
}

#[tokio::test]
async fn dkim_ed25519_key_of_32_bytes_verifies_and_receivers_agree() {
    let knot = start(&Keys::new());
    let cli = assert_dkim_verified(&knot, "ed25519", &[]).await;
    assert!(cli.text.contains("verified (k=ed25519)"), "{}", cli.text);
    assert_eq!(dkimpy_verdict(&knot, "ed25519", "ed25519"), Ok(()));
}

#[tokio::test]
async fn dkim_ed25519_key_of_the_wrong_length_is_a_mismatch_receivers_share() {
    let knot = start(&Keys::new());
    assert_dkim_mismatch(&knot, "edshort", "p= holds 31 bytes").await;
    assert_receiver_fails(
        dkimpy_verdict(&knot, "edshort", "ed25519"),
        "could not parse ed25519 public key",
    );
}

#[tokio::test]
async fn dkim_h_sha1_only_is_a_mismatch() {
    // No independent tool here enforces h= (dkimpy ignores it and
    // opendkim-testkey only reads the record): RFC 8301 3.1 forbids
    // verifying rsa-sha1, and RFC 6376 6.1.2 has verifiers ignore a key
    // whose h= omits the signature's hash.
    let knot = start(&Keys::new());
    assert_dkim_mismatch(&knot, "sha1", "h=sha1 allows only sha1").await;
}

#[tokio::test]
async fn dkim_unknown_hash_is_a_mismatch_opendkim_shares() {
    let knot = start(&Keys::new());
    assert_dkim_mismatch(&knot, "hashfoo", "h=foo names no hash algorithm").await;
    assert_receiver_fails(
        opendkim_testkey(&knot, "hashfoo", None),
        "unknown hash 'foo'",
    );
}

#[tokio::test]
async fn dkim_unknown_key_type_is_a_mismatch_receivers_share() {
    let knot = start(&Keys::new());
    assert_dkim_mismatch(&knot, "dsa", "unknown key type k=dsa").await;
    assert_receiver_fails(
        dkimpy_verdict(&knot, "dsa", "rsa-2048"),
        "unknown algorithm in k= tag",
    );
    assert_receiver_fails(
        opendkim_testkey(&knot, "dsa", None),
        "unknown key type 'dsa'",
    );
}

#[tokio::test]
async fn dkim_unknown_version_is_a_mismatch_receivers_share() {
    let knot = start(&Keys::new());
    assert_dkim_mismatch(&knot, "dkim2", "unknown version v=DKIM2").await;
    assert_receiver_fails(dkimpy_verdict(&knot, "dkim2", "rsa-2048"), "bad version");
    assert_receiver_fails(
        opendkim_testkey(&knot, "dkim2", None),
        "invalid key version 'DKIM2'",
    );
}

#[tokio::test]
async fn dkim_our_key_in_a_record_receivers_cannot_use_is_not_verified() {
    let knot = start(&Keys::new());
    let dns = resolver(&knot);
    let spec: MailDomainSpec =
        serde_yaml::from_str(&format!("{{domain: {RECEIVER_DOMAIN}}}")).expect("spec");
    // Each selector's record carries this very key, under tags receivers
    // reject, except rsa2048.
    let key_status: Vec<DkimKeyStatus> = ["rsa2048", "sha1", "rsaased", "dsa"]
        .iter()
        .map(|selector| key(selector, KeyState::Active, RSA_2048))
        .collect();
    let expected = expected_records(RECEIVER_DOMAIN, &spec, &key_status, None, None);
    let outcomes = check_records(&dns, &expected).await;
    let states: Vec<(&str, Option<RecordState>)> = outcomes
        .iter()
        .filter(|outcome| outcome.record.name.contains("._domainkey."))
        .map(|outcome| {
            (
                outcome.record.name.as_str(),
                outcome.verdict.as_ref().map(Verdict::record_state),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            (
                "rsa2048._domainkey.receiver.test",
                Some(RecordState::Verified)
            ),
            ("sha1._domainkey.receiver.test", Some(RecordState::Mismatch)),
            (
                "rsaased._domainkey.receiver.test",
                Some(RecordState::Mismatch)
            ),
            ("dsa._domainkey.receiver.test", Some(RecordState::Mismatch)),
        ]
    );
}

/// `check` on a domain with no selectors: DMARC (and SPF) only.
fn cli_dmarc(knot: &Knot, domain: &str) -> (bool, String, serde_json::Value) {
    let server = format!("127.0.0.1:{}", knot.port());
    let run = |output: &str| {
        binary()
            .args(["check", domain, "--dns-server", &server, "--output", output])
            .output()
            .expect("running check")
    };
    let text = run("text");
    let json = run("json");
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("JSON report");
    (
        text.status.success(),
        String::from_utf8(text.stdout).expect("utf-8"),
        report["domains"][0]["dmarc"].clone(),
    )
}

#[tokio::test]
async fn dmarc_without_a_valid_p_but_with_a_valid_rua_is_p_none() {
    let knot = start(&Keys::new());
    let dns = resolver(&knot);
    for domain in ["ruaonly.test", "badpolicy.test"] {
        let outcome = check_dmarc(&dns, domain).await;
        assert_eq!(outcome.verdict, Verdict::Verified, "{domain}: {outcome:?}");
        let policy = outcome.policy.expect("parsed policy");
        assert_eq!(policy.policy, "none");
        assert!(policy.monitoring_only);
        assert_eq!(policy.aggregate_reports_to, [format!("dmarc@{domain}")]);

        let (success, text, dmarc) = cli_dmarc(&knot, domain);
        assert!(success, "{text}");
        assert!(
            text.contains(&format!(
                "DMARC at _dmarc.{domain}: verified (no valid p=; treated as p=none because rua is valid)"
            )),
            "{text}"
        );
        assert_eq!(
            dmarc["policy"]["policyFallback"],
            "no valid p=; treated as p=none because rua is valid"
        );
    }
}

#[tokio::test]
async fn dmarc_without_a_valid_p_or_a_valid_rua_is_invalid() {
    let knot = start(&Keys::new());
    let dns = resolver(&knot);
    for domain in ["nopolicy.test", "baddmarc.test"] {
        let outcome = check_dmarc(&dns, domain).await;
        assert!(
            matches!(&outcome.verdict, Verdict::Mismatch { problem, .. }
                if problem.starts_with("invalid: no valid p= and no valid rua")),
            "{domain}: {outcome:?}"
        );
        let (success, text, dmarc) = cli_dmarc(&knot, domain);
        assert!(!success, "{text}");
        assert!(
            text.contains(&format!(
                "DMARC at _dmarc.{domain}: mismatch: invalid: no valid p= and no valid rua"
            )),
            "{text}"
        );
        assert_eq!(dmarc["verdict"]["state"], "Mismatch");
    }
}
