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
        Zone::broken("broken.test"),
    ]
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
    "broken.test",
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
    let expected = expected_records("good.test", &spec, &key_status, Some(&relay));
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
