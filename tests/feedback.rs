//! What comes back, from a real receiver: a Postfix that accepts mail for
//! example.net and then finds no mailbox writes a bounce (its own `bounce`
//! daemon's RFC 3464 DSN) to the VERP envelope sender, and it arrives at an
//! SMTP sink. The operator's reader sorts it into a hard bounce for that
//! recipient, and the tag of the address it came back to verifies for that
//! tenant domain and recipient only.

mod support;

use std::time::Duration;

use mailauth_operator::feedback::verp::VerpKey;
use mailauth_operator::feedback::{self, Feedback, Outcome};
use support::mail::{SmtpSink, Swaks};
use support::postfix::Postfix;

#[test]
fn a_real_postfix_bounce_is_a_hard_bounce_whose_tag_verifies() {
    let sink = SmtpSink::start();
    let mut receiver = Postfix::start_bouncing(sink.port);
    let key = VerpKey::new(&[7u8; 32]).unwrap();
    let sender = key.envelope_sender(
        "acme.example",
        "bounce.acme.example",
        "nosuchuser@example.net",
    );

    let sent = Swaks {
        port: receiver.port,
        mail_from: sender.clone(),
        rcpt_to: vec!["nosuchuser@example.net".into()],
        auth: None,
        auth_mechanism: None,
        starttls: false,
        data: "From: Alice <alice@acme.example>\r\nTo: nosuchuser@example.net\r\n\
               Subject: hello\r\nMessage-ID: <b-1@acme.example>\r\n\r\nHello.\r\n"
            .into(),
    }
    .run();
    assert!(
        sent.success,
        "Postfix accepts it first:\n{}",
        sent.transcript
    );

    let stored = sink.wait_for(1, Duration::from_secs(60));
    let bounce = &stored[0];
    let text = String::from_utf8_lossy(bounce);
    assert!(
        text.contains("report-type=delivery-status"),
        "Postfix wrote a DSN:\n{text}\n{}",
        receiver.log()
    );
    match feedback::read(bounce) {
        Ok(Feedback::Bounce(statuses)) => {
            assert_eq!(statuses.len(), 1, "{statuses:?}");
            assert_eq!(statuses[0].recipient, "nosuchuser@example.net");
            assert_eq!(statuses[0].outcome, Outcome::Hard);
            assert!(statuses[0].status.starts_with("5."), "{statuses:?}");
        }
        other => panic!("not read as a bounce: {other:?}\n{text}"),
    }
    // It came back to the VERP address: the sink's envelope recipient is
    // the To of the bounce.
    assert!(
        text.contains(&sender),
        "the bounce is addressed to {sender}"
    );
    assert!(key.verify(&sender, "acme.example", "nosuchuser@example.net"));
    assert!(!key.verify(&sender, "acme.example", "somebody@example.net"));
    assert!(!key.verify(&sender, "globex.example", "nosuchuser@example.net"));
    receiver.stop();
}
