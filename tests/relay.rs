//! The signing relay with real peers: swaks submits with AUTH over
//! STARTTLS, an SMTP sink (aiosmtpd) stores what the relay forwards, dkimpy
//! verifies the stored messages against keys published in a real knot.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mailauth_operator::api::{KeyAlgorithm, RelayLimits, UpstreamTls};
use mailauth_operator::dkim::{GeneratedKey, NewKey, dkim_txt_value, generate};
use mailauth_operator::relay::config::{
    DomainEntry, DomainShard, RelaySettings, SigningKeyEntry, TenantEntry, UpstreamAuth,
    UpstreamSettings,
};
use mailauth_operator::relay::hash_password;
use support::dns::{Knot, Zone};
use support::mail::{
    KubeletDir, Relay, SmtpSink, Swaks, TestCa, dkimpy_verify, self_signed_certificate,
};
use support::wait::{Shown, eventually};

const RELAY_HOST: &str = "relay.test";
const WAIT: Duration = Duration::from_secs(30);

fn key(selector: &str, algorithm: KeyAlgorithm) -> GeneratedKey {
    generate(&NewKey {
        selector: selector.into(),
        algorithm,
        size: (algorithm == KeyAlgorithm::Rsa).then_some(2048),
        generation: 1,
    })
    .expect("generating a key")
}

fn publish(zone: Zone, key: &GeneratedKey) -> Zone {
    zone.txt(
        &format!("{}._domainkey", key.selector),
        &dkim_txt_value(key.algorithm, &key.public_key),
    )
}

fn domain_entry(domain: &str, keys: &[&GeneratedKey]) -> DomainEntry {
    DomainEntry {
        domain: domain.into(),
        messages_per_minute: 100_000,
        signing_keys: keys
            .iter()
            .map(|key| SigningKeyEntry {
                selector: key.selector.clone(),
                algorithm: key.algorithm,
                private_key_pem: key.private_key_pem.expose_secret().to_string(),
            })
            .collect(),
        return_path: Some("bounces".into()),
    }
}

fn tenant(username: &str, password: &str, domains: &[&str]) -> TenantEntry {
    TenantEntry {
        username: username.into(),
        password_hash: hash_password(password, username.as_bytes()),
        domains: domains.iter().map(|d| d.to_string()).collect(),
    }
}

fn settings(upstream_port: u16) -> RelaySettings {
    RelaySettings {
        hostname: RELAY_HOST.into(),
        allow_plaintext_auth: false,
        upstream: UpstreamSettings {
            host: "127.0.0.1".into(),
            port: upstream_port,
            tls: UpstreamTls::None,
            auth: None,
            ca_certificates: None,
        },
        limits: RelayLimits::default(),
    }
}

fn config_files(settings: &RelaySettings, shard: &DomainShard) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("relay.json", serde_json::to_vec(settings).expect("json")),
        ("domains-0.json", serde_json::to_vec(shard).expect("json")),
    ]
}

/// A message as a mail client would write it.
fn message(from: &str, subject: &str) -> String {
    format!(
        "From: {from}\r\nTo: Bob <bob@example.net>\r\nSubject: {subject}\r\n\
         Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@client.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\
         Hello Bob,\r\n.leading dot line\r\n\r\nA body line with trailing space \r\n"
    )
}

fn submission(port: u16, user: &str, password: &str, mail_from: &str, data: String) -> Swaks {
    Swaks {
        port,
        mail_from: mail_from.into(),
        rcpt_to: vec!["bob@example.net".into()],
        auth: Some((user.into(), password.into())),
        auth_mechanism: None,
        starttls: true,
        data,
    }
}

/// Two tenants: `acme` signs with RSA, `dual` with RSA and Ed25519.
struct Fixture {
    knot: Knot,
    sink: SmtpSink,
    config: KubeletDir,
    relay: Relay,
    /// The relay's `kubernetes.io/tls` Secret volume.
    tls: KubeletDir,
}

/// A new self-signed certificate for the relay, as the files of a
/// `kubernetes.io/tls` Secret, and its SHA-256 fingerprint.
fn certificate_files() -> (Vec<(&'static str, Vec<u8>)>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = self_signed_certificate(dir.path(), RELAY_HOST);
    let files = vec![
        ("tls.crt", std::fs::read(&cert).expect("certificate")),
        ("tls.key", std::fs::read(&key).expect("key")),
    ];
    let fingerprint = certificate_fingerprint(&files[0].1).expect("fingerprint");
    (files, fingerprint)
}

/// `openssl x509 -fingerprint` of the first certificate in `pem`.
fn certificate_fingerprint(pem: &[u8]) -> Option<String> {
    use std::io::Write as _;
    let mut x509 = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running openssl");
    let written = x509.stdin.take().map(|mut stdin| stdin.write_all(pem));
    let output = x509.wait_with_output().ok()?;
    written?.ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    Some(text.trim().split_once('=')?.1.to_string())
}

/// The fingerprint of the certificate the relay presents after STARTTLS,
/// as `openssl s_client` sees it.
fn served_fingerprint(port: u16) -> Option<String> {
    let output = std::process::Command::new("openssl")
        .args(["s_client", "-starttls", "smtp", "-servername", RELAY_HOST])
        .args(["-connect", &format!("127.0.0.1:{port}")])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .expect("running openssl s_client");
    certificate_fingerprint(&output.stdout)
}

fn fixture() -> Fixture {
    fixture_with(settings)
}

/// The fixture with the relay settings `settings_for(sink port)`.
fn fixture_with(settings_for: impl FnOnce(u16) -> RelaySettings) -> Fixture {
    let acme_rsa = key("acme2026a", KeyAlgorithm::Rsa);
    let dual_rsa = key("dual2026a", KeyAlgorithm::Rsa);
    let dual_ed = key("dual2026a-ed", KeyAlgorithm::Ed25519);
    let knot = Knot::start(&[
        publish(Zone::new("acme.test"), &acme_rsa),
        publish(publish(Zone::new("dual.test"), &dual_rsa), &dual_ed),
    ]);
    let sink = SmtpSink::start();
    let shard = DomainShard {
        tenants: vec![
            tenant("acme", "acme-password", &["acme.test"]),
            tenant("dual", "dual-password", &["dual.test"]),
        ],
        domains: vec![
            domain_entry("acme.test", &[&acme_rsa]),
            domain_entry("dual.test", &[&dual_rsa, &dual_ed]),
        ],
    };
    let mut config = KubeletDir::new();
    config.write(&config_files(&settings_for(sink.port), &shard));
    let mut tls = KubeletDir::new();
    tls.write(&certificate_files().0);
    let relay = Relay::start(
        config.path(),
        Some((&tls.path().join("tls.crt"), &tls.path().join("tls.key"))),
    );
    Fixture {
        knot,
        sink,
        config,
        relay,
        tls,
    }
}

#[test]
fn mail_submitted_over_starttls_is_signed_and_verifies_with_dkimpy() {
    let f = fixture();
    let acme = submission(
        f.relay.port,
        "acme",
        "acme-password",
        "alice@acme.test",
        message("Alice <alice@acme.test>", "rsa"),
    )
    .run();
    assert!(
        acme.success,
        "{}\nrelay log:\n{}",
        acme.transcript,
        f.relay.log()
    );
    let mut dual = submission(
        f.relay.port,
        "dual",
        "dual-password",
        "bounce+1@bounces.dual.test",
        message("\"Dual, Inc.\" <news@dual.test>", "dual"),
    );
    dual.auth_mechanism = Some("LOGIN".into());
    let dual = dual.run();
    assert!(
        dual.success,
        "{}\nrelay log:\n{}",
        dual.transcript,
        f.relay.log()
    );

    let stored = f.sink.wait_for(2, WAIT);
    assert_eq!(stored.len(), 2);
    let find = |subject: &str| {
        stored
            .iter()
            .find(|m| String::from_utf8_lossy(m).contains(&format!("Subject: {subject}\r\n")))
            .expect("stored message")
    };

    let rsa = find("rsa");
    let verdicts = dkimpy_verify(rsa, f.knot.port());
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert_eq!(verdicts[0].domain, "acme.test");
    assert_eq!(verdicts[0].selector, "acme2026a");
    assert_eq!(verdicts[0].algorithm, "rsa-sha256");
    assert!(verdicts[0].pass, "{verdicts:?}");

    let dual = find("dual");
    let mut verdicts = dkimpy_verify(dual, f.knot.port());
    verdicts.sort_by(|a, b| a.selector.cmp(&b.selector));
    assert_eq!(verdicts.len(), 2, "{verdicts:?}");
    assert_eq!(verdicts[0].algorithm, "rsa-sha256");
    assert_eq!(verdicts[1].algorithm, "ed25519-sha256");
    assert!(
        verdicts.iter().all(|v| v.pass && v.domain == "dual.test"),
        "{verdicts:?}"
    );

    // Nothing but the signatures was added: the body arrives as sent,
    // dot-unstuffed, trailing space kept.
    let text = String::from_utf8_lossy(rsa);
    assert!(text.contains(
        "\r\n\r\nHello Bob,\r\n.leading dot line\r\n\r\nA body line with trailing space \r\n"
    ));

    let metrics = f.relay.metrics();
    assert_eq!(
        metrics.value("mailauth_relay_messages_accepted_total", &[]),
        2.0
    );
    assert_eq!(
        metrics.value("mailauth_relay_messages_signed_total", &[]),
        2.0
    );
    assert_eq!(
        metrics.value("mailauth_relay_upstream_latency_seconds_count", &[]),
        2.0
    );
    let log = f.relay.log();
    assert!(
        !log.contains("acme-password") && !log.contains("Hello Bob"),
        "{log}"
    );
}

#[test]
fn spoofing_attempts_are_refused_and_nothing_reaches_the_sink() {
    let f = fixture();
    let port = f.relay.port;
    let attempts: Vec<(&str, Swaks, u16)> = vec![
        (
            "another tenant's domain in MAIL FROM",
            submission(
                port,
                "acme",
                "acme-password",
                "ceo@dual.test",
                message("alice@acme.test", "a"),
            ),
            550,
        ),
        (
            "another tenant's domain in header From",
            submission(
                port,
                "acme",
                "acme-password",
                "alice@acme.test",
                message("CEO <ceo@dual.test>", "b"),
            ),
            550,
        ),
        (
            "two From headers",
            submission(
                port,
                "acme",
                "acme-password",
                "alice@acme.test",
                format!("From: ceo@dual.test\r\n{}", message("alice@acme.test", "c")),
            ),
            550,
        ),
        (
            "an address in a quoted display name",
            submission(
                port,
                "acme",
                "acme-password",
                "alice@acme.test",
                message("\"alice@acme.test\" <ceo@dual.test>", "d"),
            ),
            550,
        ),
        (
            "two addresses in From",
            submission(
                port,
                "acme",
                "acme-password",
                "alice@acme.test",
                message("alice@acme.test, ceo@dual.test", "e"),
            ),
            550,
        ),
        (
            "a group in From",
            submission(
                port,
                "acme",
                "acme-password",
                "alice@acme.test",
                message("Board: ceo@dual.test;", "f"),
            ),
            550,
        ),
        (
            "a domain the relay does not serve",
            submission(
                port,
                "acme",
                "acme-password",
                "alice@acme.test",
                message("x@unknown.test", "g"),
            ),
            550,
        ),
        (
            "a wrong password",
            submission(
                port,
                "acme",
                "dual-password",
                "alice@acme.test",
                message("alice@acme.test", "h"),
            ),
            535,
        ),
    ];
    for (what, swaks, code) in attempts {
        let result = swaks.run();
        assert!(
            !result.success,
            "{what} was accepted:\n{}",
            result.transcript
        );
        assert_eq!(
            result.failure_code(),
            Some(code),
            "{what}:\n{}",
            result.transcript
        );
    }

    let mut no_auth = submission(
        port,
        "",
        "",
        "alice@acme.test",
        message("alice@acme.test", "i"),
    );
    no_auth.auth = None;
    let result = no_auth.run();
    assert!(!result.success);
    assert_eq!(result.failure_code(), Some(530), "{}", result.transcript);

    // Without STARTTLS, AUTH is not even offered.
    let replies = f.relay.converse(&[
        "EHLO client.test",
        "AUTH PLAIN AGFjbWUAYWNtZS1wYXNzd29yZA==",
        "QUIT",
    ]);
    assert!(!replies[1].contains("AUTH"), "{replies:?}");
    assert!(replies[1].contains("STARTTLS"), "{replies:?}");
    assert!(replies[2].starts_with("538 "), "{replies:?}");

    // A legitimate message afterwards still goes through: the refusals
    // above were decisions, not breakage.
    let ok = submission(
        port,
        "acme",
        "acme-password",
        "alice@acme.test",
        message("alice@acme.test", "ok"),
    )
    .run();
    assert!(ok.success, "{}", ok.transcript);
    let stored = f.sink.wait_for(1, WAIT);
    assert_eq!(stored.len(), 1, "a refused message reached the sink");

    let metrics = f.relay.metrics();
    // One count per refusal above (three of them for the header From).
    for (reason, count) in [
        ("envelope_domain_not_allowed", 1.0),
        ("header_domain_not_allowed", 3.0),
        ("several_from_headers", 1.0),
        ("several_from_addresses", 1.0),
        ("from_is_group", 1.0),
        ("auth_failed", 1.0),
        ("not_authenticated", 1.0),
    ] {
        assert_eq!(
            metrics.value(
                "mailauth_relay_messages_rejected_total",
                &[("reason", reason)]
            ),
            count,
            "{reason}"
        );
    }
}

#[test]
fn malformed_commands_get_a_clear_5xx_and_the_relay_keeps_serving() {
    let f = fixture();
    let replies = f.relay.converse(&[
        "HELLO there",
        "EHLO client.test",
        "MAIL FROM:<broken",
        "MAIL FROM:<alice@acme.test>",
        "RCPT TO:<bob@example.net>",
        "DATA",
        &"X".repeat(5000),
        "NOOP",
        "RSET",
        "QUIT",
    ]);
    assert!(replies[0].starts_with("220 "), "{replies:?}");
    assert!(replies[1].starts_with("500 "), "{replies:?}");
    assert!(replies[2].starts_with("250-"), "{replies:?}");
    assert!(
        replies[2].contains("SIZE ") && replies[2].contains("PIPELINING"),
        "{replies:?}"
    );
    assert!(replies[2].contains("8BITMIME"), "{replies:?}");
    assert!(replies[3].starts_with("501 "), "{replies:?}");
    assert!(replies[4].starts_with("530 "), "{replies:?}");
    assert!(replies[5].starts_with("503 "), "{replies:?}");
    assert!(replies[6].starts_with("503 "), "{replies:?}");
    assert!(replies[7].starts_with("500 "), "{replies:?}");
    assert!(replies[8].starts_with("250 "), "{replies:?}");
    assert!(replies[9].starts_with("250 "), "{replies:?}");
    assert!(replies[10].starts_with("221 "), "{replies:?}");
    assert_eq!(f.relay.http_get("/healthz").map(|(s, _)| s), Some(200));
}

#[test]
fn a_renewed_certificate_is_served_without_a_restart_and_a_broken_one_is_not() {
    let mut f = fixture();
    let before = served_fingerprint(f.relay.port).expect("the relay offers STARTTLS");

    // cert-manager renews the Secret; the kubelet swaps the volume.
    let (renewed, renewed_fingerprint) = certificate_files();
    assert_ne!(before, renewed_fingerprint);
    f.tls.write(&renewed);
    let served = eventually(format!("the relay to serve {renewed_fingerprint}"))
        .within(WAIT)
        .try_until(|| match served_fingerprint(f.relay.port) {
            Some(served) if served == renewed_fingerprint => Ok(()),
            served => Err(served),
        });
    if let Err(timed_out) = served {
        panic!("{timed_out}\nrelay log:\n{}", f.relay.log());
    }
    let sent = submission(
        f.relay.port,
        "acme",
        "acme-password",
        "alice@acme.test",
        message("alice@acme.test", "after renewal"),
    )
    .run();
    assert!(sent.success, "{}", sent.transcript);

    // A key that does not belong to the certificate: refused, logged, and
    // the renewed certificate keeps serving.
    let (stranger, _) = certificate_files();
    f.tls
        .write(&[renewed[0].clone(), ("tls.key", stranger[1].1.clone())]);
    eventually("the relay to log that the new TLS certificate does not load")
        .within(WAIT)
        .until(|| {
            let log = f.relay.log();
            if log.contains("the new TLS certificate does not load") {
                Ok(())
            } else {
                Err(Shown(log))
            }
        });
    assert_eq!(served_fingerprint(f.relay.port), Some(renewed_fingerprint));
    let metrics = f.relay.metrics();
    assert_eq!(
        metrics.value("mailauth_relay_tls_reloads_total", &[("result", "success")]),
        1.0
    );
    assert_eq!(
        metrics.value("mailauth_relay_tls_reloads_total", &[("result", "invalid")]),
        1.0
    );
    assert!(
        !f.relay.log().contains("PRIVATE KEY"),
        "the key never reaches the log"
    );
}

/// Relay settings for the aiosmtpd smarthost on `port`.
fn smarthost(port: u16, tls: UpstreamTls, password: &str, ca: Option<&TestCa>) -> RelaySettings {
    let mut settings = settings(port);
    settings.upstream.tls = tls;
    settings.upstream.auth = Some(UpstreamAuth {
        username: "relay".into(),
        password: password.into(),
    });
    settings.upstream.ca_certificates = ca.map(TestCa::pem);
    settings
}

#[test]
fn a_private_smarthost_gets_signed_mail_over_starttls_or_tls_with_auth() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue("upstream", "127.0.0.1");
    for (mode, tls) in [
        ("starttls", UpstreamTls::StartTls),
        ("tls", UpstreamTls::Tls),
    ] {
        let upstream = SmtpSink::start_secure(mode, ("relay", "smarthost-password"), &cert, &key);
        let f = fixture_with(|_| smarthost(upstream.port, tls, "smarthost-password", Some(&ca)));
        let sent = submission(
            f.relay.port,
            "acme",
            "acme-password",
            "alice@acme.test",
            message("Alice <alice@acme.test>", mode),
        )
        .run();
        assert!(
            sent.success,
            "{mode}: {}\nrelay log:\n{}",
            sent.transcript,
            f.relay.log()
        );
        // The smarthost stores before it answers 250, and the relay answers
        // the client only after that.
        let stored = upstream.messages();
        assert_eq!(stored.len(), 1, "{mode}");
        let verdicts = dkimpy_verify(&stored[0], f.knot.port());
        assert!(
            verdicts.iter().any(|v| v.pass && v.domain == "acme.test"),
            "{mode}: {verdicts:?}"
        );
    }
}

#[test]
fn the_smarthosts_refusal_is_passed_on_and_its_deferral_deferred() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue("upstream", "127.0.0.1");
    let upstream = SmtpSink::start_secure("starttls", ("relay", "smarthost-password"), &cert, &key);
    let f = fixture_with(|_| {
        smarthost(
            upstream.port,
            UpstreamTls::StartTls,
            "smarthost-password",
            Some(&ca),
        )
    });
    for (recipient, code, text) in [
        ("refuse@example.net", 550, "no such user here"),
        ("defer@example.net", 452, "mailbox full"),
    ] {
        let mut swaks = submission(
            f.relay.port,
            "acme",
            "acme-password",
            "alice@acme.test",
            message("alice@acme.test", recipient),
        );
        swaks.rcpt_to = vec![recipient.into()];
        let sent = swaks.run();
        assert_eq!(
            sent.failure_code(),
            Some(code),
            "{recipient}: {}",
            sent.transcript
        );
        assert!(
            sent.transcript.contains(text),
            "the smarthost's reason reaches the client: {}",
            sent.transcript
        );
    }
    assert!(upstream.messages().is_empty());
    let metrics = f.relay.metrics();
    for reason in ["upstream_refused", "upstream_deferred"] {
        assert_eq!(
            metrics.value(
                "mailauth_relay_messages_rejected_total",
                &[("reason", reason)]
            ),
            1.0,
            "{reason}"
        );
    }
}

#[test]
fn a_smarthost_that_is_not_trusted_or_refuses_the_login_defers_mail_and_loses_none() {
    let ca = TestCa::new();
    let (cert, key) = ca.issue("upstream", "127.0.0.1");
    let upstream = SmtpSink::start_secure("starttls", ("relay", "smarthost-password"), &cert, &key);
    let other_ca = TestCa::new();
    let untrusted = fixture_with(|_| {
        smarthost(
            upstream.port,
            UpstreamTls::StartTls,
            "smarthost-password",
            Some(&other_ca),
        )
    });
    let wrong_password = fixture_with(|_| {
        smarthost(
            upstream.port,
            UpstreamTls::StartTls,
            "not-the-password",
            Some(&ca),
        )
    });
    for (case, f) in [
        ("untrusted CA", &untrusted),
        ("wrong password", &wrong_password),
    ] {
        let sent = submission(
            f.relay.port,
            "acme",
            "acme-password",
            "alice@acme.test",
            message("alice@acme.test", case),
        )
        .run();
        assert!(!sent.success, "{case}: {}", sent.transcript);
        assert_eq!(
            sent.failure_code(),
            Some(451),
            "{case}: {}",
            sent.transcript
        );
        assert!(
            !f.relay.log().contains("not-the-password"),
            "the upstream password never reaches the log"
        );
    }
    assert!(upstream.messages().is_empty());
    assert!(
        untrusted.relay.log().contains("invalid peer certificate"),
        "{}",
        untrusted.relay.log()
    );
    assert!(
        wrong_password
            .relay
            .log()
            .contains("authenticating to the upstream: Code: 535"),
        "{}",
        wrong_password.relay.log()
    );
}

#[test]
fn with_the_upstream_down_the_client_gets_4xx_and_nothing_is_stored() {
    let mut f = fixture();
    f.sink.stop();
    let result = submission(
        f.relay.port,
        "acme",
        "acme-password",
        "alice@acme.test",
        message("alice@acme.test", "down"),
    )
    .run();
    assert!(!result.success, "{}", result.transcript);
    assert_eq!(result.failure_code(), Some(451), "{}", result.transcript);
    assert_eq!(f.sink.count(), 0);
    let metrics = f.relay.metrics();
    assert_eq!(
        metrics.value(
            "mailauth_relay_messages_rejected_total",
            &[("reason", "upstream_unavailable")]
        ),
        1.0
    );
    assert_eq!(
        metrics.value("mailauth_relay_messages_accepted_total", &[]),
        0.0
    );
}

#[test]
fn a_key_rotation_during_a_stream_of_messages_loses_none_and_all_verify() {
    let mut f = fixture();
    let port = f.relay.port;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut results = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let result = submission(
                    port,
                    "acme",
                    "acme-password",
                    "alice@acme.test",
                    message("alice@acme.test", &format!("stream-{n}")),
                )
                .run();
                results.push(result);
            }
            results
        })
    };

    f.sink.wait_for(5, WAIT);
    // Rotation: publish the new selector, then swap the config like
    // kubelet does.
    let rotated = key("acme2026b", KeyAlgorithm::Rsa);
    f.knot.add(
        "acme.test",
        &format!(
            "acme2026b._domainkey.acme.test. 60 TXT {}",
            support::dns::txt_data(&dkim_txt_value(rotated.algorithm, &rotated.public_key))
        ),
    );
    let dual_rsa = key("dual2026z", KeyAlgorithm::Rsa);
    let shard = DomainShard {
        tenants: vec![tenant("acme", "acme-password", &["acme.test"])],
        domains: vec![
            domain_entry("acme.test", &[&rotated]),
            domain_entry("dual.test", &[&dual_rsa]),
        ],
    };
    f.config
        .write(&config_files(&settings(f.sink.port), &shard));

    // Keep streaming until messages signed with the new key have arrived.
    let new_selector_seen = eventually("5 messages signed with the new key")
        .within(WAIT)
        .try_until(|| {
            let messages = f.sink.messages();
            let signed_new = messages
                .iter()
                .filter(|m| String::from_utf8_lossy(m).contains("s=acme2026b"))
                .count();
            if signed_new >= 5 {
                Ok(())
            } else {
                Err(signed_new)
            }
        });
    stop.store(true, Ordering::Relaxed);
    let results = sender.join().expect("sender thread");
    if let Err(timed_out) = new_selector_seen {
        panic!("{timed_out}\nrelay log:\n{}", f.relay.log());
    }

    let failures: Vec<_> = results.iter().filter(|r| !r.success).collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        failures.first()
    );
    let stored = f.sink.wait_for(results.len(), WAIT);
    assert_eq!(
        stored.len(),
        results.len(),
        "acknowledged messages were lost"
    );

    let mut selectors = std::collections::BTreeSet::new();
    for message in &stored {
        let verdicts = dkimpy_verify(message, f.knot.port());
        assert_eq!(verdicts.len(), 1, "{verdicts:?}");
        assert!(verdicts[0].pass, "{verdicts:?}");
        selectors.insert(verdicts[0].selector.clone());
    }
    assert_eq!(
        selectors.into_iter().collect::<Vec<_>>(),
        vec!["acme2026a".to_string(), "acme2026b".to_string()]
    );
    assert!(f.relay.log().contains("relay config loaded"));
}
