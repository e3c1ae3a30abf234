//! The relay against hostile tenants and strangers (issue 14), with a real
//! Postfix as its smarthost (tests/support/postfix.rs: the relay in
//! `mynetworks`, `smtpd_forbid_bare_newline = no`, every message held in
//! its queue), real knot for the DKIM keys and dkimpy verifying what
//! Postfix would send on.
//!
//! Two tenants share the relay: `tenant-a` sends as `a.test`, `tenant-b`
//! as `b.test`. Each test plays what a tenant (or a stranger) can do and
//! asserts what reaches Postfix. The relay allows plaintext AUTH here (a
//! setting for in-cluster relays): a raw socket then sends exactly the
//! bytes a test needs.

mod support;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use mailauth_operator::api::{KeyAlgorithm, RelayLimits, UpstreamTls};
use mailauth_operator::dkim::{GeneratedKey, NewKey, dkim_txt_value, generate};
use mailauth_operator::relay::config::{
    DomainEntry, DomainShard, RelaySettings, SigningKeyEntry, TenantEntry, UpstreamSettings,
};
use mailauth_operator::relay::hash_password;
use support::dns::{Knot, Zone};
use support::mail::{KubeletDir, Relay, SmtpConnection, dkimpy_verify, reply_code};
use support::postfix::Postfix;
use support::wait::poll_some;

const WAIT: Duration = Duration::from_secs(30);
const RCPT: &str = "bob@example.net";

fn key(selector: &str) -> GeneratedKey {
    // Ed25519: instant to generate, and dkimpy verifies it (RFC 8463).
    generate(&NewKey {
        selector: selector.into(),
        algorithm: KeyAlgorithm::Ed25519,
        size: None,
        generation: 1,
    })
    .expect("generating a key")
}

fn domain_entry(domain: &str, key: &GeneratedKey, per_minute: u32) -> DomainEntry {
    DomainEntry {
        domain: domain.into(),
        messages_per_minute: per_minute,
        signing_keys: vec![SigningKeyEntry {
            selector: key.selector.clone(),
            algorithm: key.algorithm,
            private_key_pem: key.private_key_pem.expose_secret().to_string(),
        }],
        return_path: None,
    }
}

fn password(username: &str) -> String {
    format!("{username}-password-0123456789")
}

fn tenant(username: &str, domains: &[&str]) -> TenantEntry {
    TenantEntry {
        username: username.into(),
        password_hash: hash_password(&password(username), username.as_bytes()),
        domains: domains.iter().map(|d| d.to_string()).collect(),
    }
}

/// What a test may change about the relay.
struct Setup {
    limits: RelayLimits,
    a_per_minute: u32,
    args: Vec<&'static str>,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            limits: RelayLimits::default(),
            a_per_minute: 100_000,
            args: Vec::new(),
        }
    }
}

struct Fixture {
    knot: Knot,
    postfix: Postfix,
    relay: Relay,
    config: KubeletDir,
    settings: RelaySettings,
    a_key: GeneratedKey,
    b_key: GeneratedKey,
    a_per_minute: u32,
}

impl Fixture {
    fn start(setup: Setup) -> Self {
        let a_key = key("a2026");
        let b_key = key("b2026");
        let knot = Knot::start(&[
            Zone::new("a.test").txt(
                "a2026._domainkey",
                &dkim_txt_value(a_key.algorithm, &a_key.public_key),
            ),
            Zone::new("b.test").txt(
                "b2026._domainkey",
                &dkim_txt_value(b_key.algorithm, &b_key.public_key),
            ),
        ]);
        let postfix = Postfix::start();
        let settings = relay_settings(postfix.port, true, setup.limits);
        let mut fixture_config = KubeletDir::new();
        let shard = Self::shard(&a_key, &b_key, setup.a_per_minute);
        fixture_config.write(&files(&settings, &shard));
        let relay = Relay::start_with(fixture_config.path(), None, &setup.args);
        Self {
            knot,
            postfix,
            relay,
            config: fixture_config,
            settings,
            a_key,
            b_key,
            a_per_minute: setup.a_per_minute,
        }
    }

    fn shard(a_key: &GeneratedKey, b_key: &GeneratedKey, a_per_minute: u32) -> DomainShard {
        DomainShard {
            tenants: vec![
                tenant("tenant-a", &["a.test"]),
                tenant("tenant-b", &["b.test"]),
            ],
            domains: vec![
                domain_entry("a.test", a_key, a_per_minute),
                domain_entry("b.test", b_key, 100_000),
            ],
        }
    }

    /// Replaces the relay's config with `shard` and waits until the relay
    /// has loaded it.
    fn reconfigure(&mut self, shard: &DomainShard) {
        let before = self.reloads();
        self.config.write(&files(&self.settings, shard));
        let relay = &self.relay;
        assert!(
            poll_some(WAIT, || (self.reloads() > before).then_some(())).is_some(),
            "the relay did not reload:\n{}",
            relay.log()
        );
    }

    fn reloads(&self) -> u64 {
        let (_, metrics) = self.relay.http_get("/metrics").expect("metrics");
        metrics
            .lines()
            .find(|line| {
                line.starts_with("mailauth_relay_config_reloads_total{result=\"success\"}")
            })
            .and_then(|line| line.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    }

    fn metrics(&self) -> String {
        self.relay.http_get("/metrics").expect("metrics").1
    }

    /// A session authenticated as `username` from 127.0.0.1.
    fn tenant(&self, username: &str) -> SmtpConnection {
        authenticated(self.relay.port, username)
    }

    /// dkimpy's verdicts on what Postfix holds as `queue_id`.
    fn verify(&self, queue_id: &str) -> Vec<support::mail::DkimVerdict> {
        dkimpy_verify(&self.postfix.content(queue_id), self.knot.port())
    }
}

/// The relay forwarding to Postfix on `port`.
fn relay_settings(port: u16, allow_plaintext_auth: bool, limits: RelayLimits) -> RelaySettings {
    RelaySettings {
        hostname: "relay.test".into(),
        allow_plaintext_auth,
        upstream: UpstreamSettings {
            host: "127.0.0.1".into(),
            port,
            tls: UpstreamTls::None,
            auth: None,
            ca_certificates: None,
        },
        limits,
    }
}

fn files(settings: &RelaySettings, shard: &DomainShard) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("relay.json", serde_json::to_vec(settings).expect("json")),
        ("domains-0.json", serde_json::to_vec(shard).expect("json")),
    ]
}

fn authenticated(port: u16, username: &str) -> SmtpConnection {
    let mut connection = SmtpConnection::connect(port).expect("connecting to the relay");
    assert!(
        connection.greeting.starts_with("220 "),
        "{}",
        connection.greeting
    );
    let reply = connection
        .ehlo_and_auth(username, &password(username))
        .expect("AUTH");
    assert!(reply.starts_with("235 "), "{reply}");
    connection
}

/// A message as a mail client writes it; unique by `id`.
fn message(from: &str, id: &str) -> String {
    format!(
        "From: {from}\r\nTo: {RCPT}\r\nSubject: {id}\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\
         Message-ID: <{id}@client.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\nHello Bob,\r\nthis is {id}.\r\n"
    )
}

fn code(reply: &str) -> u16 {
    reply_code(reply).unwrap_or_else(|| panic!("not an SMTP reply: {reply:?}"))
}

/// Sends one transaction and expects the relay's 250 after the dot.
fn send_ok(connection: &mut SmtpConnection, from: &str, id: &str) {
    let reply = connection
        .submit(from, RCPT, &message(from, id))
        .expect("submitting");
    assert_eq!(code(&reply), 250, "{id}: {reply}");
}

// ---------------------------------------------------------------------------
// Envelope injection

#[test]
fn a_quoted_local_part_cannot_put_another_tenants_domain_in_the_envelope() {
    let f = Fixture::start(Setup::default());
    let mut a = f.tenant("tenant-a");
    for (injected, what) in [
        ("<\"ceo@b.test> AUTH=<>\"@a.test>", "AUTH= after the path"),
        ("<\"ceo@b.test> SIZE=1\"@a.test>", "a parameter"),
        ("<\"ceo@b.test>\"@a.test>", "a closing bracket"),
        ("<\"ceo@b.test\r\"@a.test>", "a control character"),
    ] {
        let reply = a.command(&format!("MAIL FROM:{injected}")).expect("MAIL");
        assert_eq!(code(&reply), 501, "{what}, {injected:?}: {reply}");
        assert!(reply.contains("5.1.7"), "{reply}");
        let _ = a.command("RSET");
    }
    // A quoted local part that reads one way only is passed on quoted: the
    // domain Postfix records is still the tenant's own.
    a.command("MAIL FROM:<\"ceo@b.test\"@a.test>")
        .map(|reply| assert_eq!(code(&reply), 250, "{reply}"))
        .expect("MAIL");
    let reply = a.command(&format!("RCPT TO:<{RCPT}>")).expect("RCPT");
    assert_eq!(code(&reply), 250, "{reply}");
    a.command("DATA").expect("DATA");
    a.send_raw(format!("{}.\r\n", message("alice@a.test", "quoted")).as_bytes())
        .expect("data");
    assert_eq!(code(&a.read_reply().expect("reply")), 250);

    let queue = f.postfix.wait_for(1, WAIT);
    assert_eq!(queue.len(), 1, "{queue:?}");
    for queued in &queue {
        assert_eq!(
            queued.sender.rsplit_once('@').map(|(_, d)| d),
            Some("a.test"),
            "{queued:?}"
        );
    }
    let log = f.postfix.log();
    assert!(log.contains("from=<\"ceo@b.test\"@a.test>"), "{log}");
    assert!(!log.contains("from=<ceo@b.test>"), "{log}");
}

#[test]
fn recipient_parameters_cannot_be_injected() {
    let f = Fixture::start(Setup::default());
    let mut a = f.tenant("tenant-a");
    let reply = a.command("MAIL FROM:<alice@a.test>").expect("MAIL");
    assert_eq!(code(&reply), 250, "{reply}");
    for (rcpt, expected) in [
        ("<\"x> ORCPT=rfc822;ceo@b.test\"@example.net>", 501),
        ("<bob@example.net> ORCPT=rfc822;ceo@b.test", 555),
        ("<bob@example.net> NOTIFY=NEVER", 555),
        ("<bob@example.net>\rORCPT=rfc822;ceo@b.test", 501),
    ] {
        let reply = a.command(&format!("RCPT TO:{rcpt}")).expect("RCPT");
        assert_eq!(code(&reply), expected, "{rcpt:?}: {reply}");
    }
    let reply = a.command(&format!("RCPT TO:<{RCPT}>")).expect("RCPT");
    assert_eq!(code(&reply), 250, "{reply}");
    a.command("DATA").expect("DATA");
    a.send_raw(format!("{}.\r\n", message("alice@a.test", "orcpt")).as_bytes())
        .expect("data");
    assert_eq!(code(&a.read_reply().expect("reply")), 250);

    let queue = f.postfix.wait_for(1, WAIT);
    assert_eq!(queue.len(), 1, "{queue:?}");
    assert_eq!(queue[0].recipients, [RCPT], "{queue:?}");
    let envelope = f.postfix.envelope(&queue[0].queue_id);
    assert!(!envelope.contains("b.test"), "{envelope}");
}

// ---------------------------------------------------------------------------
// What is signed is what is shown

/// A copy of `message` with `edit` applied to its text.
fn tampered(message: &[u8], edit: impl Fn(&str) -> String) -> Vec<u8> {
    edit(&String::from_utf8_lossy(message)).into_bytes()
}

/// Inserts `field` just before the first header line that starts with
/// `before` (or at the top of the headers if `before` is empty).
fn insert_before(text: &str, before: &str, field: &str) -> String {
    let at = if before.is_empty() {
        // After Postfix's Received header and the signature: right before
        // the first of the client's own fields.
        text.find("\r\nFrom:").map(|i| i + 2).unwrap_or(0)
    } else {
        text.find(&format!("\r\n{before}"))
            .map(|i| i + 2)
            .expect("field present")
    };
    format!("{}{field}\r\n{}", &text[..at], &text[at..])
}

#[test]
fn a_from_the_signer_would_not_sign_as_from_is_refused() {
    let f = Fixture::start(Setup::default());
    let mut a = f.tenant("tenant-a");
    for from in [
        "From : alice@a.test",
        "From\t: alice@a.test",
        "FROM  : alice@a.test",
    ] {
        let data = message("alice@a.test", "space-colon").replacen("From: alice@a.test", from, 1);
        let reply = a.submit("alice@a.test", RCPT, &data).expect("submitting");
        assert_eq!(code(&reply), 554, "{from:?}: {reply}");
        assert!(reply.contains("not exact"), "{reply}");
    }
    // The one that is accepted is signed as From: rewriting it breaks the
    // signature.
    send_ok(&mut a, "alice@a.test", "plain-from");
    let queue = f.postfix.wait_for(1, WAIT);
    assert_eq!(queue.len(), 1, "{queue:?}");
    let content = f.postfix.content(&queue[0].queue_id);
    let verdicts = dkimpy_verify(&content, f.knot.port());
    assert!(
        verdicts.iter().all(|v| v.pass) && !verdicts.is_empty(),
        "{verdicts:?}"
    );
    let rewritten = tampered(&content, |text| {
        text.replace("From: alice@a.test", "From: ceo@b.test")
    });
    let verdicts = dkimpy_verify(&rewritten, f.knot.port());
    assert!(verdicts.iter().all(|v| !v.pass), "{verdicts:?}");
}

#[test]
fn adding_a_header_that_receivers_show_breaks_the_signature() {
    let f = Fixture::start(Setup::default());
    let mut a = f.tenant("tenant-a");
    send_ok(&mut a, "alice@a.test", "oversigned");
    let queue = f.postfix.wait_for(1, WAIT);
    let content = f.postfix.content(&queue[0].queue_id);
    assert!(
        f.verify(&queue[0].queue_id).iter().all(|v| v.pass),
        "the untouched copy verifies"
    );
    for field in [
        "Subject: Urgent: wire the money",
        "To: everyone@example.net",
        "Cc: everyone@example.net",
        "Date: Fri, 01 Jan 2027 00:00:00 +0000",
        "Content-Type: text/html",
        "MIME-Version: 1.0",
        "Message-ID: <other@evil.test>",
        "Reply-To: ceo@b.test",
        "Sender: ceo@b.test",
        "List-Unsubscribe: <https://evil.test/u>",
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        "From: ceo@b.test",
    ] {
        for before in ["", "Subject:"] {
            let added = tampered(&content, |text| insert_before(text, before, field));
            let verdicts = dkimpy_verify(&added, f.knot.port());
            assert!(
                !verdicts.is_empty() && verdicts.iter().all(|v| !v.pass),
                "adding {field:?} kept the signature valid: {verdicts:?}"
            );
        }
    }
}

#[test]
fn date_and_message_id_are_added_before_signing() {
    let f = Fixture::start(Setup::default());
    let mut a = f.tenant("tenant-a");
    let bare = format!("From: alice@a.test\r\nTo: {RCPT}\r\nSubject: no date\r\n\r\nHello\r\n");
    let reply = a.submit("alice@a.test", RCPT, &bare).expect("submitting");
    assert_eq!(code(&reply), 250, "{reply}");
    let queue = f.postfix.wait_for(1, WAIT);
    let content = String::from_utf8(f.postfix.content(&queue[0].queue_id)).expect("text");
    let headers = content.split("\r\n\r\n").next().unwrap_or_default();
    let count = |name: &str| {
        headers
            .lines()
            .filter(|line| line.to_ascii_lowercase().starts_with(&format!("{name}:")))
            .count()
    };
    assert_eq!(count("date"), 1, "{headers}");
    assert_eq!(count("message-id"), 1, "{headers}");
    assert!(
        headers.contains("@relay.test>"),
        "the relay's Message-ID: {headers}"
    );
    let verdicts = f.verify(&queue[0].queue_id);
    assert!(
        !verdicts.is_empty() && verdicts.iter().all(|v| v.pass),
        "{verdicts:?}\n{content}"
    );
}

#[test]
fn bare_lf_is_made_crlf_before_signing_and_bare_cr_is_refused() {
    let f = Fixture::start(Setup::default());
    let mut a = f.tenant("tenant-a");
    let lf_only = message("alice@a.test", "bare-lf").replace("\r\n", "\n");
    a.command("MAIL FROM:<alice@a.test>").expect("MAIL");
    a.command(&format!("RCPT TO:<{RCPT}>")).expect("RCPT");
    assert_eq!(code(&a.command("DATA").expect("DATA")), 354);
    a.send_raw(format!("{lf_only}\r\n.\r\n").as_bytes())
        .expect("data");
    let reply = a.read_reply().expect("reply");
    assert_eq!(code(&reply), 250, "{reply}");

    let with_cr = message("alice@a.test", "bare-cr").replace("this is", "this\ris");
    let reply = a
        .submit("alice@a.test", RCPT, &with_cr)
        .expect("submitting");
    assert_eq!(code(&reply), 554, "{reply}");
    assert!(reply.contains("bare CR"), "{reply}");

    let queue = f.postfix.wait_for(1, WAIT);
    assert_eq!(queue.len(), 1, "{queue:?}");
    let content = f.postfix.content(&queue[0].queue_id);
    assert!(String::from_utf8_lossy(&content).contains("Subject: bare-lf"));
    let verdicts = f.verify(&queue[0].queue_id);
    assert!(
        !verdicts.is_empty() && verdicts.iter().all(|v| v.pass),
        "{verdicts:?}"
    );
}

/// Every way to write a line end around a dot except the real `CRLF . CRLF`,
/// in every position of a message, followed by a smuggled transaction: each
/// submission is one transaction, and Postfix never holds more than one
/// message for it, nor one from the smuggled sender.
#[test]
fn smuggling_matrix_one_message_per_transaction() {
    let f = Fixture::start(Setup::default());
    let ends: [(&str, &str); 3] = [("CRLF", "\r\n"), ("LF", "\n"), ("CR", "\r")];
    let smuggled = "MAIL FROM:<ceo@b.test>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\n\
                    From: ceo@b.test\r\nTo: victim@example.net\r\nSubject: smuggled\r\n\r\nsmuggled\r\n";
    let headers = "From: alice@a.test\r\nTo: bob@example.net\r\nSubject: matrix\r\n";
    let mut expected = 0;
    let mut a = f.tenant("tenant-a");
    for (before_name, before) in ends {
        for (after_name, after) in ends {
            if before == "\r\n" && after == "\r\n" {
                continue;
            }
            let sequence = format!("{before}.{after}");
            for position in [
                "first line",
                "in the headers",
                "after the headers",
                "in the body",
                "at the end",
            ] {
                let data = match position {
                    "first line" => format!("X-Smuggle: {sequence}{smuggled}{headers}\r\nbody\r\n"),
                    "in the headers" => {
                        format!("{headers}X-Smuggle: {sequence}{smuggled}\r\nbody\r\n")
                    }
                    "after the headers" => format!("{headers}\r\n{sequence}{smuggled}body\r\n"),
                    "in the body" => {
                        format!("{headers}\r\nline one{sequence}{smuggled}line two\r\n")
                    }
                    _ => format!("{headers}\r\nlast line{sequence}{smuggled}"),
                };
                let case = format!("{before_name}.{after_name} {position}");
                let reply = a.command("MAIL FROM:<alice@a.test>").expect("MAIL");
                assert_eq!(code(&reply), 250, "{case}: {reply}");
                let reply = a.command(&format!("RCPT TO:<{RCPT}>")).expect("RCPT");
                assert_eq!(code(&reply), 250, "{case}: {reply}");
                assert_eq!(code(&a.command("DATA").expect("DATA")), 354, "{case}");
                let mut raw = data.into_bytes();
                if !raw.ends_with(b"\r\n") {
                    raw.extend_from_slice(b"\r\n");
                }
                raw.extend_from_slice(b".\r\n");
                a.send_raw(&raw).expect("data");
                let reply = a.read_reply().expect("reply");
                // Taken whole (bare LFs made CRLF) or refused whole, never
                // split: refused for a bare CR, or for a "." line among the
                // headers (not a field), taken otherwise.
                let bare_cr = before == "\r" || after == "\r";
                let in_headers = position == "first line" || position == "in the headers";
                let (want, why) = match (bare_cr, in_headers) {
                    (true, _) => (554, "bare CR"),
                    (false, true) => (554, "neither a field"),
                    (false, false) => (250, ""),
                };
                assert_eq!(code(&reply), want, "{case}: {reply}");
                assert!(reply.contains(why), "{case}: {reply}");
                if want == 250 {
                    expected += 1;
                }
                // The session is still in step: the next command is answered
                // as a command.
                assert_eq!(code(&a.command("NOOP").expect("NOOP")), 250, "{case}");
                // Postfix queued the message before its 250, which came
                // before the relay's.
                let queue = f.postfix.queue();
                assert_eq!(queue.len(), expected, "{case}: {queue:?}");
                assert!(
                    queue
                        .iter()
                        .all(|q| q.sender == "alice@a.test" && q.recipients == [RCPT]),
                    "{case}: a smuggled message reached Postfix: {queue:?}"
                );
            }
        }
    }
    let queue = f.postfix.wait_for(expected, WAIT);
    assert_eq!(queue.len(), expected, "{queue:?}");
    let log = f.postfix.log();
    assert!(!log.contains("from=<ceo@b.test>"), "{log}");
}

// ---------------------------------------------------------------------------
// Per-recipient semantics

#[test]
fn each_recipient_gets_the_smarthosts_own_reply() {
    let f = Fixture::start(Setup::default());
    let mut a = f.tenant("tenant-a");
    let reply = a.command("MAIL FROM:<alice@a.test>").expect("MAIL");
    assert_eq!(code(&reply), 250, "{reply}");
    let refused = a.command("RCPT TO:<refuse@example.net>").expect("RCPT");
    assert_eq!(code(&refused), 550, "{refused}");
    assert!(refused.contains("no such user here"), "{refused}");
    let deferred = a.command("RCPT TO:<defer@example.net>").expect("RCPT");
    assert_eq!(code(&deferred), 450, "{deferred}");
    let accepted = a.command(&format!("RCPT TO:<{RCPT}>")).expect("RCPT");
    assert_eq!(code(&accepted), 250, "{accepted}");
    assert_eq!(code(&a.command("DATA").expect("DATA")), 354);
    a.send_raw(format!("{}.\r\n", message("alice@a.test", "per-rcpt")).as_bytes())
        .expect("data");
    let done = a.read_reply().expect("reply");
    assert_eq!(code(&done), 250, "{done}");
    assert!(done.contains("queued as"), "Postfix's own reply: {done}");

    // Pipelined: the replies come back in order, each the smarthost's.
    a.send_raw(
        format!(
            "MAIL FROM:<alice@a.test>\r\nRCPT TO:<refuse@example.net>\r\nRCPT TO:<{RCPT}>\r\nDATA\r\n"
        )
        .as_bytes(),
    )
    .expect("pipelined");
    let replies: Vec<u16> = (0..4)
        .map(|_| code(&a.read_reply().expect("reply")))
        .collect();
    assert_eq!(replies, [250, 550, 250, 354]);
    a.send_raw(format!("{}.\r\n", message("alice@a.test", "pipelined")).as_bytes())
        .expect("data");
    assert_eq!(code(&a.read_reply().expect("reply")), 250);

    let queue = f.postfix.wait_for(2, WAIT);
    assert_eq!(queue.len(), 2, "{queue:?}");
    assert!(queue.iter().all(|q| q.recipients == [RCPT]), "{queue:?}");
}

// ---------------------------------------------------------------------------
// Strangers holding slots

fn stranger(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

#[test]
fn strangers_cannot_hold_the_slots_tenants_need() {
    let limits = RelayLimits {
        max_connections: 20,
        max_unauthenticated_connections: 4,
        max_unauthenticated_connections_per_source: 2,
        ..RelayLimits::default()
    };
    let f = Fixture::start(Setup {
        limits,
        args: vec!["--auth-timeout", "3s"],
        ..Setup::default()
    });
    let port = f.relay.port;
    // A tenant already logged in is not disturbed by what follows.
    let mut settled = f.tenant("tenant-a");

    // One source may hold two unauthenticated slots, not three.
    let mut strangers = vec![
        SmtpConnection::connect_from(stranger(2), port).expect("connecting"),
        SmtpConnection::connect_from(stranger(2), port).expect("connecting"),
    ];
    let third = SmtpConnection::connect_from(stranger(2), port).expect("connecting");
    assert!(
        third.greeting.starts_with("421 4.7.0 "),
        "{}",
        third.greeting
    );
    assert!(
        third.greeting.contains("from your address"),
        "{}",
        third.greeting
    );
    // The pool of unauthenticated slots fills up...
    strangers.push(SmtpConnection::connect_from(stranger(3), port).expect("connecting"));
    strangers.push(SmtpConnection::connect_from(stranger(4), port).expect("connecting"));
    for connection in &strangers {
        assert!(
            connection.greeting.starts_with("220 "),
            "{}",
            connection.greeting
        );
    }
    let refused = SmtpConnection::connect_from(stranger(5), port).expect("connecting");
    assert!(
        refused.greeting.starts_with("421 4.7.0 "),
        "{}",
        refused.greeting
    );
    send_ok(&mut settled, "alice@a.test", "while-strangers-wait");

    // ...and each stranger is cut at the deadline to authenticate, however
    // busy it keeps itself (NOOP and RSET do not extend it).
    let started = Instant::now();
    for connection in &mut strangers {
        let closed = poll_some(WAIT, || {
            let reply = connection.command("NOOP").unwrap_or_default();
            let reply = if reply.starts_with("250") {
                connection.command("RSET").unwrap_or_default()
            } else {
                reply
            };
            (!reply.starts_with("250")).then_some(reply)
        });
        let reply = closed.expect("a stranger kept its slot");
        assert!(
            reply.is_empty() || reply.starts_with("421 4.4.2 "),
            "{reply:?}"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // The slots are free again: a tenant gets in.
    let mut late = poll_some(WAIT, || {
        let mut connection = SmtpConnection::connect_from(stranger(6), port).ok()?;
        connection.greeting.starts_with("220 ").then_some(())?;
        let reply = connection
            .ehlo_and_auth("tenant-a", &password("tenant-a"))
            .ok()?;
        reply.starts_with("235 ").then_some(connection)
    })
    .expect("a tenant could not get in after the strangers were cut");
    send_ok(&mut late, "alice@a.test", "after-strangers");
    let metrics = f.metrics();
    for reason in [
        "too_many_from_source",
        "too_many_unauthenticated",
        "auth_timeout",
    ] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "{reason}: {metrics}"
        );
    }
}

/// Waits until the relay ends `connection` (EOF or a 421) without the
/// client sending anything; returns how long that took.
fn time_until_closed(connection: &mut SmtpConnection) -> Duration {
    let started = Instant::now();
    loop {
        match connection.read_reply() {
            Ok(reply) if reply.is_empty() => return started.elapsed(),
            Ok(reply) if reply.starts_with("421") => {}
            Ok(reply) => panic!("unexpected {reply:?}"),
            // The read timeout (30 s): still open.
            Err(error) => panic!("still open after {:?}: {error}", started.elapsed()),
        }
    }
}

#[test]
fn a_stalled_tls_handshake_is_cut() {
    use support::mail::self_signed_certificate;
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, tls_key) = self_signed_certificate(dir.path(), "relay.test");
    let postfix = Postfix::start();
    let settings = relay_settings(postfix.port, false, RelayLimits::default());
    let mut config = KubeletDir::new();
    let (a, b) = (key("a2026"), key("b2026"));
    config.write(&files(&settings, &Fixture::shard(&a, &b, 100)));
    let relay = Relay::start_with(
        config.path(),
        Some((&cert, &tls_key)),
        &["--tls-handshake-timeout", "2s"],
    );
    let mut connection = SmtpConnection::connect(relay.port).expect("connecting");
    assert!(
        connection
            .command("EHLO client.test")
            .expect("EHLO")
            .contains("STARTTLS")
    );
    assert_eq!(
        code(&connection.command("STARTTLS").expect("STARTTLS")),
        220
    );
    // No ClientHello ever comes.
    let took = time_until_closed(&mut connection);
    assert!(took < Duration::from_secs(15), "{took:?}");
    let (_, metrics) = relay.http_get("/metrics").expect("metrics");
    assert!(
        metrics.contains("reason=\"tls_handshake_timeout\""),
        "{metrics}"
    );
}

#[test]
fn a_trickle_of_message_data_is_cut() {
    let f = Fixture::start(Setup {
        args: vec!["--min-data-rate", "1000", "--min-data-rate-after", "2s"],
        ..Setup::default()
    });
    let mut a = f.tenant("tenant-a");
    a.command("MAIL FROM:<alice@a.test>").expect("MAIL");
    a.command(&format!("RCPT TO:<{RCPT}>")).expect("RCPT");
    assert_eq!(code(&a.command("DATA").expect("DATA")), 354);
    a.send_raw(b"From: alice@a.test\r\n").expect("data");
    // One byte every poll (20 ms), each well within the per-read timeout:
    // the average rate is what gets it cut. Once the relay has closed, a
    // write fails.
    let started = Instant::now();
    let cut = poll_some(WAIT, || a.send_raw(b"x").is_err().then_some(()));
    assert!(cut.is_some(), "the trickle was never cut");
    let reply = a.read_reply().unwrap_or_default();
    assert!(
        reply.is_empty() || reply.starts_with("421 4.4.2 "),
        "{reply:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(f.metrics().contains("reason=\"data_too_slow\""));
    assert!(f.postfix.queue().is_empty());
}

#[test]
fn a_session_ends_at_its_deadline_however_busy() {
    let f = Fixture::start(Setup {
        args: vec!["--session-timeout", "3s"],
        ..Setup::default()
    });
    let mut a = f.tenant("tenant-a");
    let started = Instant::now();
    let reply = poll_some(WAIT, || {
        let reply = a.command("NOOP").unwrap_or_default();
        (!reply.starts_with("250")).then_some(reply)
    })
    .expect("the session outlived its deadline");
    assert!(
        reply.is_empty() || reply.starts_with("421 4.4.2 "),
        "{reply:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(f.metrics().contains("reason=\"session_timeout\""));
}

// ---------------------------------------------------------------------------
// Limits per tenant

#[test]
fn a_tenant_can_hold_only_its_share_of_sessions() {
    let f = Fixture::start(Setup {
        limits: RelayLimits {
            max_connections_per_tenant: 2,
            ..RelayLimits::default()
        },
        ..Setup::default()
    });
    let mut first = f.tenant("tenant-a");
    let _second = f.tenant("tenant-a");
    let mut third = SmtpConnection::connect(f.relay.port).expect("connecting");
    let reply = third
        .ehlo_and_auth("tenant-a", &password("tenant-a"))
        .expect("AUTH");
    assert_eq!(code(&reply), 454, "{reply}");
    assert!(reply.contains("Too many sessions"), "{reply}");
    // The other tenant is not affected, and the first still sends.
    let mut b = f.tenant("tenant-b");
    send_ok(&mut b, "carol@b.test", "b-unaffected");
    send_ok(&mut first, "alice@a.test", "a-still-sends");
    // A session that ends frees its place.
    drop(first);
    let fourth = poll_some(WAIT, || {
        let mut connection = SmtpConnection::connect(f.relay.port).ok()?;
        let reply = connection
            .ehlo_and_auth("tenant-a", &password("tenant-a"))
            .ok()?;
        reply.starts_with("235").then_some(connection)
    });
    assert!(fourth.is_some(), "the ended session's place never freed");
}

#[test]
fn a_tenants_messages_in_memory_are_bounded() {
    let f = Fixture::start(Setup {
        limits: RelayLimits {
            max_message_bytes: 64 * 1024,
            max_buffered_bytes_per_tenant: 96 * 1024,
            ..RelayLimits::default()
        },
        ..Setup::default()
    });
    let start_data = |connection: &mut SmtpConnection| {
        connection
            .command("MAIL FROM:<alice@a.test>")
            .expect("MAIL");
        connection
            .command(&format!("RCPT TO:<{RCPT}>"))
            .expect("RCPT");
        assert_eq!(code(&connection.command("DATA").expect("DATA")), 354);
    };
    let body = |id: &str| {
        let mut text = message("alice@a.test", id);
        while text.len() < 60 * 1024 {
            text.push_str("A line of padding to make the message large enough.\r\n");
        }
        text
    };
    let mut one = f.tenant("tenant-a");
    let mut two = f.tenant("tenant-a");
    start_data(&mut one);
    one.send_raw(body("held-open").as_bytes()).expect("data");
    // The relay holds the first message's 60 KiB once its gauge says so.
    let relay = &f.relay;
    assert!(
        poll_some(WAIT, || {
            let metrics = relay.http_get("/metrics")?.1;
            let held: f64 = metrics
                .lines()
                .find(|line| line.starts_with("mailauth_relay_buffered_bytes "))?
                .split_whitespace()
                .last()?
                .parse()
                .ok()?;
            (held >= 60.0 * 1024.0).then_some(())
        })
        .is_some(),
        "the relay never held the first message"
    );
    start_data(&mut two);
    two.send_raw(format!("{}.\r\n", body("over-budget")).as_bytes())
        .expect("data");
    let reply = two.read_reply().expect("reply");
    assert_eq!(code(&reply), 452, "{reply}");
    // The other tenant has a budget of its own.
    let mut b = f.tenant("tenant-b");
    send_ok(&mut b, "carol@b.test", "b-own-budget");
    // The first message completes, and then the budget is free again.
    one.send_raw(b".\r\n").expect("dot");
    assert_eq!(code(&one.read_reply().expect("reply")), 250);
    let reply = two
        .submit("alice@a.test", RCPT, &body("after"))
        .expect("submitting");
    assert_eq!(code(&reply), 250, "{reply}");
    assert_eq!(f.postfix.wait_for(3, WAIT).len(), 3);
    assert!(f.metrics().contains("reason=\"tenant_buffer_full\""));
}

fn try_login(source: Ipv4Addr, port: u16, username: &str, password: &str) -> String {
    let mut connection = SmtpConnection::connect_from(source, port).expect("connecting");
    connection.ehlo_and_auth(username, password).expect("AUTH")
}

#[test]
fn failed_logins_are_throttled_across_connections() {
    let f = Fixture::start(Setup::default());
    let port = f.relay.port;
    // tenant-a logs in from its usual address first.
    let home = stranger(10);
    assert_eq!(
        code(&try_login(home, port, "tenant-a", &password("tenant-a"))),
        235
    );
    // One source guessing, over many connections.
    let guesser = stranger(20);
    for n in 0..10 {
        let reply = try_login(guesser, port, &format!("guess-{n}"), "wrong");
        assert_eq!(code(&reply), 535, "{n}: {reply}");
    }
    let reply = try_login(guesser, port, "tenant-b", &password("tenant-b"));
    assert_eq!(
        code(&reply),
        454,
        "even a right password is not tried: {reply}"
    );
    // Many sources guessing one username.
    for n in 0..30u8 {
        let reply = try_login(stranger(100 + n), port, "tenant-a", "wrong");
        assert_eq!(code(&reply), 535, "{n}: {reply}");
    }
    let reply = try_login(stranger(200), port, "tenant-a", &password("tenant-a"));
    assert_eq!(code(&reply), 454, "{reply}");
    // The tenant's own client still gets in, and so does everyone else.
    assert_eq!(
        code(&try_login(home, port, "tenant-a", &password("tenant-a"))),
        235
    );
    assert_eq!(
        code(&try_login(
            stranger(201),
            port,
            "tenant-b",
            &password("tenant-b")
        )),
        235
    );
}

#[test]
fn only_accepted_mail_spends_the_rate_limit() {
    let f = Fixture::start(Setup {
        a_per_minute: 2,
        ..Setup::default()
    });
    let mut a = f.tenant("tenant-a");
    for n in 0..3 {
        let reply = a
            .submit("alice@a.test", RCPT, &message("alice@a.test", "reject-me"))
            .expect("submitting");
        assert_eq!(code(&reply), 550, "{n}: {reply}");
        assert!(reply.contains("content policy"), "{reply}");
    }
    send_ok(&mut a, "alice@a.test", "accepted-1");
    send_ok(&mut a, "alice@a.test", "accepted-2");
    let reply = a
        .submit("alice@a.test", RCPT, &message("alice@a.test", "over"))
        .expect("submitting");
    assert_eq!(code(&reply), 451, "{reply}");
    assert!(reply.contains("Rate limit"), "{reply}");
    assert_eq!(f.postfix.wait_for(2, WAIT).len(), 2);
}

// ---------------------------------------------------------------------------
// Revocation

#[test]
fn a_revoked_domain_or_tenant_stops_sending_with_the_next_message() {
    let mut f = Fixture::start(Setup::default());
    let mut a = f.tenant("tenant-a");
    let mut b = f.tenant("tenant-b");
    let mut c = f.tenant("tenant-b");
    send_ok(&mut a, "alice@a.test", "before");
    send_ok(&mut b, "carol@b.test", "b-before");

    // a.test leaves the relay (in conflict, tampered, namespace no longer
    // admitted...): tenant-a's open session may not send as it any more.
    let mut shard = Fixture::shard(&f.a_key, &f.b_key, f.a_per_minute);
    shard.domains.retain(|domain| domain.domain != "a.test");
    f.reconfigure(&shard);
    let reply = a
        .submit("alice@a.test", RCPT, &message("alice@a.test", "after"))
        .expect("submitting");
    assert_eq!(code(&reply), 550, "{reply}");
    send_ok(&mut b, "carol@b.test", "b-after-a-left");

    // A message already under way when its domain leaves is refused at its
    // end, not sent.
    c.command("MAIL FROM:<carol@b.test>").expect("MAIL");
    c.command(&format!("RCPT TO:<{RCPT}>")).expect("RCPT");
    assert_eq!(code(&c.command("DATA").expect("DATA")), 354);
    shard.domains.retain(|domain| domain.domain != "b.test");
    f.reconfigure(&shard);
    c.send_raw(format!("{}.\r\n", message("carol@b.test", "in-flight")).as_bytes())
        .expect("data");
    assert_eq!(code(&c.read_reply().expect("reply")), 550);

    // A tenant that leaves, or whose password is re-issued, is logged out.
    let mut shard = Fixture::shard(&f.a_key, &f.b_key, f.a_per_minute);
    shard.tenants[1].password_hash = hash_password("a new password", b"salt");
    f.reconfigure(&shard);
    let reply = b.command("MAIL FROM:<carol@b.test>").expect("MAIL");
    assert_eq!(code(&reply), 421, "{reply}");
    assert!(reply.contains("no longer valid"), "{reply}");

    let queue = f.postfix.wait_for(3, WAIT);
    assert_eq!(queue.len(), 3, "{queue:?}");
    let stored: Vec<String> = queue
        .iter()
        .map(|q| String::from_utf8_lossy(&f.postfix.content(&q.queue_id)).into_owned())
        .collect();
    for id in ["Subject: after\r\n", "Subject: in-flight\r\n"] {
        assert!(!stored.iter().any(|m| m.contains(id)), "{id} was sent");
    }
}

// ---------------------------------------------------------------------------
// Logs

#[test]
fn logs_hold_no_key_no_forged_line_and_no_failed_username() {
    let mut f = Fixture::start(Setup::default());
    let port = f.relay.port;
    // A login whose username carries a newline and a fake log line, and
    // one whose username is a password typed into the wrong field.
    let forged = "x\n2026-01-01T00:00:00.000000Z  INFO mailauth_operator: forged line";
    assert_eq!(code(&try_login(stranger(30), port, forged, "wrong")), 535);
    let pasted = "Tr0ub4dor&3-pasted-password";
    assert_eq!(code(&try_login(stranger(30), port, pasted, "wrong")), 535);
    // A known username with a wrong password may be logged: it is a name.
    assert_eq!(
        code(&try_login(stranger(30), port, "tenant-a", "wrong")),
        535
    );

    // A config shard whose signing-key list is a string (the key itself).
    let pem = f.a_key.private_key_pem.expose_secret().to_string();
    let mut broken = serde_json::to_value(Fixture::shard(&f.a_key, &f.b_key, 100)).expect("json");
    broken["domains"][0]["signingKeys"] = serde_json::Value::String(pem.clone());
    let before = f.relay.log().len();
    f.config.write(&[
        ("relay.json", serde_json::to_vec(&f.settings).expect("json")),
        ("domains-0.json", serde_json::to_vec(&broken).expect("json")),
    ]);
    let relay = &f.relay;
    assert!(
        poll_some(WAIT, || relay.log()[before..]
            .contains("relay config")
            .then_some(()))
        .is_some(),
        "the broken config was never reported:\n{}",
        relay.log()
    );
    let log = without_colours(&f.relay.log());
    let key_body = pem.lines().nth(1).expect("a PEM body line");
    assert!(
        !log.contains(key_body),
        "the private key reached the log:\n{log}"
    );
    assert!(!log.contains("PRIVATE KEY"), "{log}");
    assert!(
        !log.lines()
            .any(|line| line.starts_with("2026-01-01T00:00:00.000000Z")),
        "a forged line:\n{log}"
    );
    assert!(!log.contains(pasted), "a failed username in clear:\n{log}");
    assert!(log.contains("username_hash="), "{log}");
    assert!(log.contains("tenant=tenant-a"), "{log}");
}

/// The log as text: the relay colours its fields (ANSI escapes) even into
/// a file.
fn without_colours(log: &str) -> String {
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}
