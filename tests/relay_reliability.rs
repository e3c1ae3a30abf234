//! The relay under stress, with real peers: an SMTP sink as the upstream
//! (aiosmtpd, killed and restarted under load; it stores each message
//! whole before its 250), the relay binary, and a
//! raw-socket SMTP client that can send what well-behaved clients never
//! do. "Reliability" in docs/product.md: every acknowledged message reaches
//! the sink, limits answer with the right codes, and malformed input never
//! crashes the relay.
//!
//! The relay allows plaintext AUTH here (a config setting meant for
//! in-cluster relays): STARTTLS is covered by tests/relay.rs, and without
//! it one client can push hundreds of messages a second.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mailauth_operator::api::{KeyAlgorithm, RelayLimits, UpstreamTls};
use mailauth_operator::dkim::{NewKey, generate};
use mailauth_operator::relay::config::{
    DomainEntry, DomainShard, RelaySettings, SigningKeyEntry, TenantEntry, UpstreamSettings,
};
use mailauth_operator::relay::hash_password;
use support::mail::{KubeletDir, Relay, SmtpConnection, SmtpSink, reply_code};
use support::wait::{accept_if, eventually};

const WAIT: Duration = Duration::from_secs(30);
const RCPT: &str = "bob@example.net";

fn domain(name: &str, messages_per_minute: u32) -> DomainEntry {
    // Ed25519: signing is not what these tests are about, and its keys are
    // generated instantly.
    let key = generate(&NewKey {
        selector: "s1".into(),
        algorithm: KeyAlgorithm::Ed25519,
        size: None,
        generation: 1,
    })
    .expect("generating a key");
    DomainEntry {
        domain: name.into(),
        messages_per_minute,
        signing_keys: vec![SigningKeyEntry {
            selector: key.selector.clone(),
            algorithm: key.algorithm,
            private_key_pem: key.private_key_pem.expose_secret().to_string(),
        }],
        return_path: None,
    }
}

fn tenant(username: &str, domains: &[&str]) -> TenantEntry {
    TenantEntry {
        username: username.into(),
        password_hash: hash_password(&password(username), username.as_bytes()),
        domains: domains.iter().map(|d| d.to_string()).collect(),
    }
}

fn password(username: &str) -> String {
    format!("{username}-password")
}

/// A relay forwarding to a fresh sink; `acme` sends as `acme.test`,
/// `other` as `other.test`.
struct Fixture {
    sink: SmtpSink,
    relay: Relay,
    _config: KubeletDir,
}

fn fixture(limits: RelayLimits, acme_per_minute: u32) -> Fixture {
    let sink = SmtpSink::start();
    let settings = RelaySettings {
        hostname: "relay.test".into(),
        allow_plaintext_auth: true,
        upstream: UpstreamSettings {
            host: "127.0.0.1".into(),
            port: sink.port,
            tls: UpstreamTls::None,
            auth: None,
            ca_certificates: None,
        },
        limits,
    };
    let shard = DomainShard {
        tenants: vec![
            tenant("acme", &["acme.test"]),
            tenant("other", &["other.test"]),
        ],
        domains: vec![
            domain("acme.test", acme_per_minute),
            domain("other.test", 100_000),
        ],
    };
    let mut config = KubeletDir::new();
    config.write(&[
        ("relay.json", serde_json::to_vec(&settings).expect("json")),
        ("domains-0.json", serde_json::to_vec(&shard).expect("json")),
    ]);
    let relay = Relay::start(config.path(), None);
    Fixture {
        sink,
        relay,
        _config: config,
    }
}

fn default_fixture() -> Fixture {
    fixture(RelayLimits::default(), 100_000)
}

/// A message whose Message-ID is `<{id}@client.test>`.
fn message(from: &str, id: &str) -> String {
    format!(
        "From: {from}\r\nTo: {RCPT}\r\nSubject: {id}\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n\
         Message-ID: <{id}@client.test>\r\n\r\nHello Bob,\r\nthis is {id}.\r\n"
    )
}

/// The `{id}` of a stored message's `Message-ID: <{id}@client.test>`.
fn message_id(stored: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(stored);
    let start = text.find("Message-ID: <")? + "Message-ID: <".len();
    let end = start + text[start..].find('@')?;
    Some(text[start..end].to_string())
}

/// Whether a stored copy of [`message`] `id` runs to the end of its body.
fn is_complete(stored: &[u8], id: &str) -> bool {
    stored.ends_with(format!("\r\n\r\nHello Bob,\r\nthis is {id}.\r\n").as_bytes())
}

fn message_id_header(id: &str) -> String {
    format!("Message-ID: <{id}@client.test>")
}

/// A connection authenticated as `username`.
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

/// Submits one good message on a new connection and waits until the sink
/// has it: the relay still works end to end.
fn assert_a_good_message_goes_through(f: &Fixture, id: &str) {
    let mut connection = authenticated(f.relay.port, "acme");
    let reply = connection
        .submit("alice@acme.test", RCPT, &message("alice@acme.test", id))
        .expect("submitting");
    assert!(
        reply.starts_with("250 "),
        "{reply}\nrelay log:\n{}",
        f.relay.log()
    );
    let header = message_id_header(id);
    eventually(format!("{id}, acknowledged, to reach the sink"))
        .within(WAIT)
        .until(|| {
            if f.sink.contains(&header) {
                Ok(())
            } else {
                Err(format!("{} files in the sink", f.sink.count()))
            }
        });
}

fn assert_healthy(relay: &Relay) {
    assert_eq!(
        relay.http_get("/healthz").map(|(status, _)| status),
        Some(200),
        "relay log:\n{}",
        relay.log()
    );
}

/// What the senders saw, per attempt.
#[derive(Default)]
struct Outcomes {
    /// Message-IDs the relay answered 250 for.
    acknowledged: Vec<String>,
    /// Message-IDs refused with a 4xx (the client keeps and retries them).
    deferred: Vec<String>,
    /// Anything else: 5xx, a closed connection, a reply that is not SMTP.
    unexpected: Vec<(String, String)>,
    /// Messages still deferred after every retry: the relay never recovered.
    gave_up: Vec<String>,
}

impl Outcomes {
    fn record(outcomes: &Mutex<Outcomes>, add: impl FnOnce(&mut Outcomes)) {
        add(&mut outcomes.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

#[test]
fn with_a_flapping_upstream_every_acknowledged_message_reaches_the_sink() {
    const SENDERS: usize = 4;
    const OUTAGES: usize = 4;
    // Messages acknowledged between outages, and after the last one: the
    // relay is delivering again before the next outage starts.
    const BETWEEN_OUTAGES: usize = 30;
    // Deferrals each outage must cause before the sink comes back.
    const DEFERRED_PER_OUTAGE: usize = 5;

    let mut f = default_fixture();
    let port = f.relay.port;
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let deferred = Arc::new(AtomicUsize::new(0));
    // Senders keep sending until the last outage is over, so every outage
    // hits transactions in flight however fast or slow the machine is.
    let done = Arc::new(AtomicBool::new(false));

    let senders: Vec<_> = (0..SENDERS)
        .map(|sender| {
            let (outcomes, acknowledged, deferred, done) = (
                outcomes.clone(),
                acknowledged.clone(),
                deferred.clone(),
                done.clone(),
            );
            std::thread::spawn(move || {
                let mut connection = authenticated(port, "acme");
                'messages: for n in 0.. {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    // A sender retries a deferred message as a client's
                    // queue would, for as long as the test waits for
                    // anything else.
                    let give_up_at = Instant::now() + WAIT;
                    for attempt in 0.. {
                        if Instant::now() > give_up_at {
                            break;
                        }
                        // Each attempt has its own Message-ID: a deferred
                        // attempt that still reached the sink must not make
                        // a lost acknowledged one look delivered.
                        let id = format!("flap-{sender}-{n}-{attempt}");
                        let reply = connection
                            .submit("alice@acme.test", RCPT, &message("alice@acme.test", &id))
                            .unwrap_or_else(|error| format!("I/O error: {error}"));
                        match reply_code(&reply) {
                            Some(250) => {
                                Outcomes::record(&outcomes, |o| o.acknowledged.push(id));
                                acknowledged.fetch_add(1, Ordering::SeqCst);
                                continue 'messages;
                            }
                            Some(400..=499) => {
                                Outcomes::record(&outcomes, |o| o.deferred.push(id));
                                deferred.fetch_add(1, Ordering::SeqCst);
                                // A client's retry interval, kept short.
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            _ => {
                                Outcomes::record(&outcomes, |o| o.unexpected.push((id, reply)));
                                return;
                            }
                        }
                    }
                    Outcomes::record(&outcomes, |o| o.gave_up.push(format!("flap-{sender}-{n}")));
                    return;
                }
                let _ = connection.command("QUIT");
            })
        })
        .collect();

    let progress = |outcomes: &Mutex<Outcomes>| {
        let outcomes = outcomes.lock().unwrap_or_else(PoisonError::into_inner);
        format!(
            "{} acknowledged, {} deferred; unexpected: {:?}; gave up: {:?}",
            outcomes.acknowledged.len(),
            outcomes.deferred.len(),
            outcomes.unexpected,
            outcomes.gave_up
        )
    };
    // Wait for the relay to deliver a share of messages, stop the sink,
    // wait for the relay to defer messages because of it, start the sink
    // again; then wait for delivery to resume once more.
    for outage in 1..=OUTAGES + 1 {
        let target = acknowledged.load(Ordering::SeqCst) + BETWEEN_OUTAGES;
        let resumed = eventually(format!("before outage {outage}: {target} acknowledged"))
            .within(WAIT)
            .try_until(|| accept_if(acknowledged.load(Ordering::SeqCst), |n| *n >= target));
        if let Err(timed_out) = resumed {
            panic!(
                "{timed_out}\ndelivery did not resume; {}\nrelay log:\n{}",
                progress(&outcomes),
                f.relay.log()
            );
        }
        if outage > OUTAGES {
            break;
        }
        let target = deferred.load(Ordering::SeqCst) + DEFERRED_PER_OUTAGE;
        f.sink.stop();
        let deferring = eventually(format!("outage {outage}: {target} deferred"))
            .within(WAIT)
            .try_until(|| accept_if(deferred.load(Ordering::SeqCst), |n| *n >= target));
        if let Err(timed_out) = deferring {
            panic!(
                "{timed_out}\nthe relay did not defer messages while the sink was down; {}",
                progress(&outcomes)
            );
        }
        f.sink.restart();
    }
    done.store(true, Ordering::SeqCst);
    for sender in senders {
        sender.join().expect("sender thread");
    }

    let outcomes = outcomes.lock().unwrap_or_else(PoisonError::into_inner);
    assert!(
        outcomes.unexpected.is_empty(),
        "replies other than 250 or 4xx: {:?}",
        outcomes.unexpected
    );
    assert!(
        outcomes.gave_up.is_empty(),
        "messages never acknowledged after the sink came back: {:?}",
        outcomes.gave_up
    );
    assert!(outcomes.acknowledged.len() >= BETWEEN_OUTAGES * (OUTAGES + 1));
    assert!(outcomes.deferred.len() >= DEFERRED_PER_OUTAGE * OUTAGES);

    // Nothing acknowledged is lost. The sink stores a message, whole,
    // before it answers 250, and the relay may answer 250 only after that:
    // every acknowledged message is in the sink already, complete (its
    // body through the last line), with no wait. A copy cut short by a
    // kill is never in `messages()`, and would not count if it were.
    let stored: BTreeMap<String, Vec<u8>> = f
        .sink
        .messages()
        .into_iter()
        .filter_map(|message| Some((message_id(&message)?, message)))
        .collect();
    let lost: Vec<&String> = outcomes
        .acknowledged
        .iter()
        .filter(|id| !stored.get(*id).is_some_and(|m| is_complete(m, id)))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages are not in the sink, complete: {lost:?}",
        lost.len(),
        outcomes.acknowledged.len()
    );
    println!(
        "{} acknowledged, {} deferred (of which {} still reached the sink)",
        outcomes.acknowledged.len(),
        outcomes.deferred.len(),
        outcomes
            .deferred
            .iter()
            .filter(|id| stored.contains_key(*id))
            .count()
    );
    assert_healthy(&f.relay);
}

#[test]
fn past_its_rate_limit_a_tenant_gets_4xx_and_others_are_not_affected() {
    const PER_MINUTE: u32 = 3;
    let f = fixture(RelayLimits::default(), PER_MINUTE);
    let mut acme = authenticated(f.relay.port, "acme");
    for n in 0..PER_MINUTE {
        let id = format!("within-{n}");
        let reply = acme
            .submit("alice@acme.test", RCPT, &message("alice@acme.test", &id))
            .expect("submitting");
        assert!(reply.starts_with("250 "), "message {n}: {reply}");
    }
    // The bucket holds one minute's worth and refills at 3 a minute: the
    // next messages, sent at once, are past the limit.
    for n in 0..3 {
        let id = format!("over-{n}");
        let reply = acme
            .submit("alice@acme.test", RCPT, &message("alice@acme.test", &id))
            .expect("submitting");
        assert!(reply.starts_with("451 4.7.1 "), "{reply}");
        assert!(reply.contains("Rate limit"), "{reply}");
    }
    // Another tenant's bucket is its own.
    let mut other = authenticated(f.relay.port, "other");
    let reply = other
        .submit(
            "carol@other.test",
            RCPT,
            &message("carol@other.test", "other-0"),
        )
        .expect("submitting");
    assert!(reply.starts_with("250 "), "{reply}");

    let stored = f.sink.wait_for(PER_MINUTE as usize + 1, WAIT);
    assert_eq!(stored.len(), PER_MINUTE as usize + 1);
    assert!(
        !f.sink.contains("over-"),
        "a rate-limited message was relayed"
    );
    assert_eq!(
        f.relay.metrics().value(
            "mailauth_relay_messages_rejected_total",
            &[("reason", "rate_limited")]
        ),
        3.0,
        "one count per message over the limit"
    );
}

#[test]
fn past_max_connections_a_client_gets_421_until_a_slot_frees() {
    let limits = RelayLimits {
        max_connections: 2,
        ..RelayLimits::default()
    };
    let f = fixture(limits, 100_000);
    let first = SmtpConnection::connect(f.relay.port).expect("connecting");
    let mut second = SmtpConnection::connect(f.relay.port).expect("connecting");
    assert!(first.greeting.starts_with("220 "), "{}", first.greeting);
    assert!(second.greeting.starts_with("220 "), "{}", second.greeting);

    let mut third = SmtpConnection::connect(f.relay.port).expect("connecting");
    assert!(
        third.greeting.starts_with("421 4.7.0 "),
        "{}",
        third.greeting
    );
    // The relay hangs up after the 421.
    assert_eq!(third.read_reply().expect("reading"), "");

    // The open sessions are not disturbed.
    assert!(second.command("NOOP").expect("NOOP").starts_with("250 "));

    // Closing one frees its slot (asynchronously, when the relay notices).
    drop(first);
    eventually("the closed connection's slot to free")
        .within(WAIT)
        .until(|| match SmtpConnection::connect(f.relay.port) {
            Ok(connection) if connection.greeting.starts_with("220 ") => Ok(()),
            Ok(connection) => Err(connection.greeting),
            Err(error) => Err(error.to_string()),
        });
    // The third connection, and any the wait above made before the slot
    // freed.
    let refused = f.relay.metrics().value(
        "mailauth_relay_messages_rejected_total",
        &[("reason", "too_many_connections")],
    );
    assert!(refused >= 1.0, "{refused}");
}

#[test]
fn a_message_over_the_size_limit_gets_552_and_nothing_reaches_the_sink() {
    const MAX: u64 = 4096;
    let limits = RelayLimits {
        max_message_bytes: MAX,
        ..RelayLimits::default()
    };
    let f = fixture(limits, 100_000);
    let mut connection = authenticated(f.relay.port, "acme");

    // Declared too big in MAIL FROM: refused before any data is sent.
    let reply = connection
        .command(&format!("MAIL FROM:<alice@acme.test> SIZE={}", MAX + 1))
        .expect("MAIL");
    assert!(reply.starts_with("552 "), "{reply}");

    // Not declared, and too big once sent.
    let mut big = message("alice@acme.test", "too-big");
    while big.len() as u64 <= 2 * MAX {
        big.push_str("A line of padding that makes the message larger than allowed.\r\n");
    }
    let reply = connection
        .submit("alice@acme.test", RCPT, &big)
        .expect("submitting");
    assert!(reply.starts_with("552 "), "{reply}");

    // The session is still usable, and the next (small) message is the
    // only one the sink ever sees.
    let reply = connection
        .submit(
            "alice@acme.test",
            RCPT,
            &message("alice@acme.test", "small"),
        )
        .expect("submitting");
    assert!(reply.starts_with("250 "), "{reply}");
    let stored = f.sink.wait_for(1, WAIT);
    assert_eq!(stored.len(), 1, "an oversized message reached the sink");
    assert!(f.sink.contains(&message_id_header("small")));
    assert_eq!(
        f.relay.metrics().value(
            "mailauth_relay_messages_rejected_total",
            &[("reason", "message_too_big")]
        ),
        2.0,
        "the declared SIZE and the message sent too big"
    );
}

#[test]
fn garbage_long_lines_and_bare_lf_never_crash_the_relay() {
    let f = default_fixture();
    let port = f.relay.port;

    // Random bytes, NULs and high bytes included, before any EHLO.
    let mut garbage = Vec::with_capacity(256 * 1024);
    let mut state: u32 = 0x1234_5678;
    for _ in 0..garbage.capacity() {
        // xorshift: reproducible noise without a dependency.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        garbage.push(state as u8);
    }
    let mut connection = SmtpConnection::connect(port).expect("connecting");
    let _ = connection.send_raw(&garbage);
    // Whatever it answers, it answers in SMTP (or hangs up on the noise).
    let reply = connection.read_reply().unwrap_or_default();
    assert!(
        reply.is_empty() || reply_code(&reply).is_some_and(|code| code >= 500 || code == 421),
        "{reply:?}"
    );
    drop(connection);
    assert_healthy(&f.relay);

    // A TLS ClientHello where a command is expected.
    let mut connection = SmtpConnection::connect(port).expect("connecting");
    let _ = connection.send_raw(&[
        0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x00, b'\r', b'\n',
    ]);
    let reply = connection.read_reply().unwrap_or_default();
    assert!(reply.is_empty() || reply.starts_with('5'), "{reply:?}");
    drop(connection);

    // A 2 MiB command line without a line end, then a real command.
    let mut connection = SmtpConnection::connect(port).expect("connecting");
    let _ = connection.send_raw(&vec![b'X'; 2 * 1024 * 1024]);
    let _ = connection.send_raw(b"\r\nNOOP\r\n");
    let reply = connection.read_reply().unwrap_or_default();
    assert!(
        reply.is_empty() || reply.starts_with("500 ") || reply.starts_with("421 "),
        "{reply:?}"
    );
    drop(connection);
    assert_healthy(&f.relay);

    // Commands ended by a bare LF are read as commands.
    let mut connection = SmtpConnection::connect(port).expect("connecting");
    let _ = connection.send_raw(b"EHLO client.test\nNOOP\n");
    let ehlo = connection.read_reply().unwrap_or_default();
    assert!(ehlo.starts_with("250"), "a bare-LF EHLO: {ehlo:?}");
    assert!(
        connection
            .read_reply()
            .unwrap_or_default()
            .starts_with("250 "),
        "a bare-LF NOOP"
    );
    // A message whose lines end in bare LF is taken with its lines made
    // CRLF (docs/relay.md), and its bare-LF "dot" line is content: it
    // neither ends the data here nor anywhere downstream.
    let mut connection = authenticated(port, "acme");
    let bare_lf = format!(
        "From: alice@acme.test\nTo: {RCPT}\nSubject: bare\nMessage-ID: <bare-lf@client.test>\n\n\
         line one\n.\nline after a bare-LF dot\n"
    );
    let reply = connection
        .submit("alice@acme.test", RCPT, &bare_lf)
        .expect("submitting");
    assert!(reply.starts_with("250 "), "{reply:?}");
    let header = message_id_header("bare-lf");
    let relayed = eventually("the bare-LF message to be relayed")
        .within(WAIT)
        .until(|| {
            f.sink
                .messages()
                .into_iter()
                .find(|raw| String::from_utf8_lossy(raw).contains(&header))
                .ok_or("not stored (acknowledged but not relayed)")
        });
    // The sink keeps the message as it came over the wire, dot-stuffing
    // undone: the lines made CRLF and the dot line kept as content.
    let text = String::from_utf8_lossy(&relayed);
    assert!(
        text.contains("\r\nline one\r\n.\r\nline after a bare-LF dot\r\n"),
        "{text:?}"
    );
    // A bare CR is refused, with the reason.
    let bare_cr = message("alice@acme.test", "bare-cr").replace("Hello Bob,", "Hello\rBob,");
    let reply = connection
        .submit("alice@acme.test", RCPT, &bare_cr)
        .expect("submitting");
    assert!(reply.starts_with("554 5.6.0 "), "{reply:?}");
    assert!(reply.contains("bare CR"), "{reply:?}");
    // So is a line over 998 characters, bare LF or not.
    let long_bare_lf = format!(
        "From: alice@acme.test\nTo: {RCPT}\nSubject: long\n\n{}\n",
        "Y".repeat(5000)
    );
    let reply = connection
        .submit("alice@acme.test", RCPT, &long_bare_lf)
        .expect("submitting");
    assert!(reply.starts_with("554 5.6.0 "), "{reply:?}");
    // A line over 998 characters with proper CRLFs is refused.
    let long_line = format!(
        "{}{}\r\n",
        message("alice@acme.test", "long-line"),
        "Z".repeat(20_000)
    );
    let reply = connection
        .submit("alice@acme.test", RCPT, &long_line)
        .expect("submitting");
    assert!(reply.starts_with("554 "), "{reply:?}");

    // A client that vanishes in the middle of DATA.
    let mut connection = authenticated(port, "acme");
    connection
        .command("MAIL FROM:<alice@acme.test>")
        .expect("MAIL");
    connection
        .command(&format!("RCPT TO:<{RCPT}>"))
        .expect("RCPT");
    connection.command("DATA").expect("DATA");
    let _ = connection.send_raw(b"From: alice@acme.test\r\nSubject: cut\r\n\r\nhalf a mes");
    drop(connection);

    // Still alive, and still relaying.
    assert_healthy(&f.relay);
    assert_a_good_message_goes_through(&f, "after-garbage");
    assert!(
        !f.sink.contains("Subject: cut"),
        "a cut-off message was relayed"
    );
    assert!(
        !f.sink.contains("long-line@client.test"),
        "a message with an overlong line was relayed"
    );
}
