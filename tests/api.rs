//! The CRDs against the real API server: they install, the examples apply,
//! invalid manifests are refused with the field named, and `kubectl explain`
//! shows the field docs.

mod support;

use support::cluster::cluster;
use support::wait::{Shown, eventually};

const VALID_DOMAIN: &str = r#"
apiVersion: mailauth.dev/v1alpha1
kind: MailDomain
metadata: {name: probe}
spec:
  domain: acme.example
"#;

const VALID_RELAY: &str = r#"
apiVersion: mailauth.dev/v1alpha1
kind: MailRelay
metadata: {name: probe}
spec:
  hostname: relay.platform.example
  upstream: {host: smtp.platform.example}
"#;

/// A manifest that must be refused, and the field path the refusal must name.
struct Invalid {
    what: &'static str,
    manifest: String,
    field: &'static str,
}

fn domain_with(spec_yaml: &str) -> String {
    format!(
        "apiVersion: mailauth.dev/v1alpha1\nkind: MailDomain\nmetadata: {{name: probe}}\nspec:\n{}",
        indent(spec_yaml)
    )
}

fn relay_with(spec_yaml: &str) -> String {
    format!(
        "apiVersion: mailauth.dev/v1alpha1\nkind: MailRelay\nmetadata: {{name: probe}}\nspec:\n{}",
        indent(spec_yaml)
    )
}

fn indent(yaml: &str) -> String {
    yaml.trim().lines().map(|l| format!("  {l}\n")).collect()
}

fn invalid_manifests() -> Vec<Invalid> {
    let long_label = "a".repeat(64);
    let long_name = format!("{}.example", ["abcdefghij"; 23].join("."));
    let domain = |what, domain: &str| Invalid {
        what,
        manifest: domain_with(&format!("domain: {domain:?}")),
        field: "spec.domain",
    };
    let relay = |what, spec: &str, field| Invalid {
        what,
        manifest: relay_with(spec),
        field,
    };
    let md = |what, spec: &str, field| Invalid {
        what,
        manifest: domain_with(spec),
        field,
    };
    vec![
        domain("a mailbox provider's domain", "gmail.com"),
        domain(
            "a subdomain of a mailbox provider's domain",
            "mail.gmail.com",
        ),
        domain("a country domain of a mailbox provider", "hotmail.co.uk"),
        domain("another mailbox provider family", "yahoo.fr"),
        domain("uppercase domain", "Acme.example"),
        domain("domain without a dot", "localhost"),
        domain("label over 63 characters", &format!("{long_label}.example")),
        domain("name over 253 characters", &long_name),
        domain("leading hyphen", "-acme.example"),
        domain("trailing hyphen", "acme-.example"),
        domain("trailing dot", "acme.example."),
        domain("IPv4 literal", "192.0.2.1"),
        domain("IPv6 literal", "2001:db8::1"),
        domain("wildcard", "*.acme.example"),
        domain("empty label", "acme..example"),
        md("missing domain", "dkim: {algorithm: RSA}", "spec.domain"),
        md(
            "RSA key below 2048",
            "domain: acme.example\ndkim: {rsaKeySize: 1024}",
            "spec.dkim.rsaKeySize",
        ),
        md(
            "unknown algorithm",
            "domain: acme.example\ndkim: {algorithm: DSA}",
            "spec.dkim.algorithm",
        ),
        md(
            "malformed rotation period",
            "domain: acme.example\ndkim: {rotation: {period: 90 days}}",
            "spec.dkim.rotation.period",
        ),
        md(
            "rotation period under a day",
            "domain: acme.example\ndkim: {rotation: {period: 12h, overlap: 1h}}",
            "spec.dkim.rotation.period",
        ),
        md(
            "malformed overlap",
            "domain: acme.example\ndkim: {rotation: {overlap: 1w}}",
            "spec.dkim.rotation.overlap",
        ),
        md(
            "overlap not shorter than the period",
            "domain: acme.example\ndkim: {rotation: {period: 30d, overlap: 30d}}",
            "spec.dkim.rotation.overlap",
        ),
        md(
            "selector prefix with bad characters",
            "domain: acme.example\ndkim: {selectorPrefix: Bad_Prefix}",
            "spec.dkim.selectorPrefix",
        ),
        md(
            "relayRef without name",
            "domain: acme.example\nrelayRef: {namespace: mail}",
            "spec.relayRef.name",
        ),
        md(
            "unknown deletionPolicy",
            "domain: acme.example\ndeletionPolicy: Orphan",
            "spec.deletionPolicy",
        ),
        md(
            "unknown DMARC policy",
            "domain: acme.example\ndmarc: {policy: block}",
            "spec.dmarc.policy",
        ),
        md(
            "DMARC report address that is not an address",
            "domain: acme.example\ndmarc: {aggregateReportsTo: [reports]}",
            "spec.dmarc.aggregateReportsTo",
        ),
        md(
            "zero rate limit",
            "domain: acme.example\nrateLimit: {messagesPerMinute: 0}",
            "spec.rateLimit.messagesPerMinute",
        ),
        md(
            "return path with a dot at the end",
            "domain: acme.example\nreturnPath: bounce.",
            "spec.returnPath",
        ),
        relay(
            "listener port 0",
            "hostname: relay.platform.example\nlistener: {port: 0}\nupstream: {host: smtp.platform.example}",
            "spec.listener.port",
        ),
        relay(
            "listener port over 65535",
            "hostname: relay.platform.example\nlistener: {port: 70000}\nupstream: {host: smtp.platform.example}",
            "spec.listener.port",
        ),
        relay(
            "missing upstream",
            "hostname: relay.platform.example",
            "spec.upstream",
        ),
        relay(
            "malformed upstream host",
            "hostname: relay.platform.example\nupstream: {host: smtp..platform.example}",
            "spec.upstream.host",
        ),
        relay(
            "upstream port 0",
            "hostname: relay.platform.example\nupstream: {host: smtp.platform.example, port: 0}",
            "spec.upstream.port",
        ),
        relay(
            "unknown upstream TLS mode",
            "hostname: relay.platform.example\nupstream: {host: smtp.platform.example, tls: Maybe}",
            "spec.upstream.tls",
        ),
        relay(
            "Selector without a selector",
            "hostname: relay.platform.example\nupstream: {host: smtp.platform.example}\nallowedNamespaces: {from: Selector}",
            "spec.allowedNamespaces.selector",
        ),
        relay(
            "egress IP that is not an IP",
            "hostname: relay.platform.example\nupstream: {host: smtp.platform.example}\nspf: {egressIPs: [not-an-ip]}",
            "spec.spf.egressIPs",
        ),
    ]
}

#[tokio::test]
async fn crds_install_and_examples_apply() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("examples").await;
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
    let out = c.kubectl(&["apply", "-n", &ns.name, "-f", examples], None);
    assert!(
        out.status.success(),
        "examples/ must apply: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = c.kubectl(&["get", "md,mr", "-n", &ns.name, "-o", "name"], None);
    let names = String::from_utf8_lossy(&listed.stdout);
    for expected in [
        "maildomain.mailauth.dev/acme",
        "maildomain.mailauth.dev/globex",
        "mailrelay.mailauth.dev/shared",
    ] {
        assert!(names.contains(expected), "{expected} missing from {names}");
    }
    // Defaults are applied by the API server, so GitOps diffs stay quiet.
    let period = c.kubectl(
        &[
            "get",
            "md",
            "acme",
            "-n",
            &ns.name,
            "-o",
            "jsonpath={.spec.deletionPolicy}/{.spec.dkim.selectorPrefix}",
        ],
        None,
    );
    assert_eq!(String::from_utf8_lossy(&period.stdout), "Delete/ma");
    ns.delete().await;
}

#[tokio::test]
async fn valid_minimal_manifests_are_accepted() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("valid").await;
    for manifest in [VALID_DOMAIN, VALID_RELAY] {
        let out = c.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(manifest));
        assert!(
            out.status.success(),
            "{manifest} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ns.delete().await;
}

#[tokio::test]
async fn a_mailbox_providers_domain_is_refused_saying_the_service_needs_the_clients_own() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("freemail").await;
    let out = c.kubectl(
        &["apply", "-n", &ns.name, "-f", "-"],
        Some(&domain_with("domain: outlook.com")),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "outlook.com accepted");
    assert!(
        stderr.contains("the service signs and sends only for the client's own domain"),
        "{stderr}"
    );
    // Names that only look alike are the client's own.
    for own in [
        "notgmail.com",
        "hotmailer.example",
        "gmail.com.acme.example",
    ] {
        let out = c.kubectl(
            &["apply", "--dry-run=server", "-n", &ns.name, "-f", "-"],
            Some(&domain_with(&format!("domain: {own}"))),
        );
        assert!(
            out.status.success(),
            "{own} refused: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ns.delete().await;
}

#[tokio::test]
async fn invalid_manifests_are_refused_naming_the_field() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("invalid").await;
    let cases = invalid_manifests();
    assert!(cases.len() >= 15);
    let mut failures = Vec::new();
    for case in &cases {
        let out = c.kubectl(&["apply", "-n", &ns.name, "-f", "-"], Some(&case.manifest));
        let stderr = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            failures.push(format!("{}: accepted, must be refused", case.what));
        } else if stderr.contains("unknown field") {
            failures.push(format!(
                "{}: refused only as an unknown field (a typo in the test?): {stderr}",
                case.what
            ));
        } else if !stderr.contains(case.field) {
            failures.push(format!(
                "{}: refusal does not name {}: {stderr}",
                case.what, case.field
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let left = c.kubectl(&["get", "md,mr", "-n", &ns.name, "-o", "name"], None);
    assert!(
        left.stdout.is_empty(),
        "nothing invalid may be stored: {}",
        String::from_utf8_lossy(&left.stdout)
    );
    ns.delete().await;
}

#[tokio::test]
async fn kubectl_explain_shows_field_docs() {
    let c = cluster();
    c.install_crds().await;
    // The OpenAPI document kubectl explain reads is published a moment
    // after the CRD is Established: poll for it, bounded.
    let last = eventually("kubectl explain to find maildomain.spec.dkim")
        .within(std::time::Duration::from_secs(10))
        .every(std::time::Duration::from_millis(200))
        .until_async(|| async {
            let out = c.kubectl(&["explain", "maildomain.spec.dkim"], None);
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                Ok(text)
            } else {
                Err(Shown(text))
            }
        })
        .await;
    for text in [
        "How DKIM keys are generated and rotated",
        "rsaKeySize",
        "selectorPrefix",
    ] {
        assert!(
            last.contains(text),
            "kubectl explain lacks {text:?}:\n{last}"
        );
    }
    assert!(
        last.contains("Smaller keys"),
        "kubectl explain lacks the rsaKeySize doc:\n{last}"
    );
}
