//! Fuzzing the parsers that read what strangers send: arbitrary bytes, and
//! valid reports mutated byte by byte, must give a value or an error, never
//! a panic. Bounded (a fixed number of cases, a fixed seed per run of
//! proptest's own), so it runs in `make test`.

use proptest::prelude::*;

use super::{MAX_MESSAGE_BYTES, read};

fn mutated(seed: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let bytes = seed.as_bytes().to_vec();
    let len = bytes.len();
    proptest::collection::vec((0..len, any::<u8>()), 0..32).prop_map(move |edits| {
        let mut bytes = bytes.clone();
        for (at, byte) in edits {
            bytes[at] = byte;
        }
        bytes
    })
}

fn truncated(seed: &'static str) -> impl Strategy<Value = Vec<u8>> {
    (0..=seed.len()).prop_map(move |end| seed.as_bytes()[..end].to_vec())
}

const ARF: &str = "From: abuse@receiver.example\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=feedback-report; boundary=\"A\"\r\n\r\n\
--A\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n\
--A\r\nContent-Type: message/feedback-report\r\n\r\nFeedback-Type: abuse\r\nUser-Agent: x/1\r\nVersion: 1\r\n\
Original-Mail-From: <b+00112233445566778899aabbccddeeff@bounce.acme.example>\r\n\
Original-Rcpt-To: <bob@example.net>\r\n\r\n\
--A\r\nContent-Type: message/rfc822\r\n\r\nFrom: alice@acme.example\r\nSubject: hi\r\n\r\nhi\r\n--A--\r\n";

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = read(&bytes);
    }

    #[test]
    fn mutated_bounces_never_panic(bytes in mutated(super::dsn::tests::POSTFIX_BOUNCE)) {
        let _ = read(&bytes);
    }

    #[test]
    fn truncated_bounces_never_panic(bytes in truncated(super::dsn::tests::POSTFIX_BOUNCE)) {
        let _ = read(&bytes);
    }

    #[test]
    fn mutated_complaints_never_panic(bytes in mutated(ARF)) {
        let _ = read(&bytes);
    }

    #[test]
    fn mutated_aggregate_reports_never_panic(bytes in mutated(super::aggregate::tests::REPORT_XML)) {
        let _ = mail_auth::report::Report::parse_xml(&bytes);
        let _ = read(&bytes);
    }

    #[test]
    fn delivery_status_fields_never_panic(text in "(?s)[ -~\t\r\n:;.<>@]{0,600}") {
        let _ = super::dsn::parse_delivery_status(&text);
    }
}

#[test]
fn the_seeds_parse_as_what_they_are() {
    // The mutations start from real reports: each seed must be read as its
    // kind, or the fuzzing would only exercise the refusal paths.
    assert!(matches!(
        read(super::dsn::tests::POSTFIX_BOUNCE.as_bytes()),
        Ok(super::Feedback::Bounce(_))
    ));
    match read(ARF.as_bytes()) {
        Ok(super::Feedback::Complaint(complaint)) => {
            assert_eq!(complaint.feedback_type, "abuse");
            assert_eq!(
                complaint.original_rcpt_to.as_deref(),
                Some("bob@example.net")
            );
        }
        other => panic!("the ARF seed: {other:?}"),
    }
    assert_eq!(
        read(&vec![b'a'; MAX_MESSAGE_BYTES + 1]),
        Err(super::FeedbackError::TooLarge)
    );
}
