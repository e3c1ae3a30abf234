//! RFC 3464 delivery status notifications: the per-recipient fields of a
//! `message/delivery-status` part (RFC 6533's `message/global-delivery-
//! status` too), sorted into hard bounces, soft ones and deliveries.

use mail_parser::{MessageParser, MimeHeaders, PartType};

/// What happened to a message for one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A permanent failure (`Action: failed` with a `5.x.x` status): the
    /// recipient is suppressed.
    Hard,
    /// A transient failure or a delay (`4.x.x`, `Action: delayed`):
    /// counted, never suppressing by itself.
    Soft,
    /// Delivered, relayed or expanded: nothing to do.
    Delivered,
}

/// One recipient's block of a DSN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecipientStatus {
    /// The address from `Final-Recipient` (or `Original-Recipient`),
    /// lowercase, without angle brackets.
    pub recipient: String,
    /// The status code, such as `5.1.1`.
    pub status: String,
    pub outcome: Outcome,
    /// `Diagnostic-Code`, as the reporting server gave it (for people; it
    /// is never parsed for decisions).
    pub diagnostic: Option<String>,
}

/// Why a message is not a usable DSN.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DsnError {
    #[error("not a delivery status notification")]
    NotADsn,
    #[error("no recipient block with Final-Recipient, Action and Status")]
    NoRecipients,
    #[error("the recipient block for {recipient} has an invalid Status {status:?}")]
    BadStatus { recipient: String, status: String },
    #[error("the recipient block for {recipient} has an unknown Action {action:?}")]
    BadAction { recipient: String, action: String },
}

/// The most recipient blocks read from one DSN.
pub const MAX_RECIPIENTS: usize = 1000;

/// Reads the delivery status part of a whole message.
pub fn parse_dsn(message: &[u8]) -> Result<Vec<RecipientStatus>, DsnError> {
    let parsed = MessageParser::default()
        .parse(message)
        .ok_or(DsnError::NotADsn)?;
    let raw = parsed.raw_message();
    let part = parsed
        .parts
        .iter()
        .find(|part| {
            part.content_type().is_some_and(|ct| {
                ct.ctype().eq_ignore_ascii_case("message")
                    && ct.subtype().is_some_and(|s| {
                        s.eq_ignore_ascii_case("delivery-status")
                            || s.eq_ignore_ascii_case("global-delivery-status")
                    })
            })
        })
        .ok_or(DsnError::NotADsn)?;
    let text = match &part.body {
        PartType::Text(text) | PartType::Html(text) => text.to_string(),
        PartType::Binary(bytes) | PartType::InlineBinary(bytes) => {
            String::from_utf8_lossy(bytes).into_owned()
        }
        PartType::Message(_) | PartType::Multipart(_) => {
            let start = (part.offset_body as usize).min(raw.len());
            let end = (part.offset_end as usize).clamp(start, raw.len());
            String::from_utf8_lossy(&raw[start..end]).into_owned()
        }
    };
    parse_delivery_status(&text)
}

/// Parses the fields of a `message/delivery-status` body: blocks of
/// header-style fields separated by blank lines, the first per-message,
/// then one per recipient.
pub fn parse_delivery_status(text: &str) -> Result<Vec<RecipientStatus>, DsnError> {
    let mut statuses = Vec::new();
    for block in blocks(text) {
        let field = |name: &str| {
            block
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.trim().to_string())
        };
        let Some(recipient) = field("Final-Recipient")
            .or_else(|| field("Original-Recipient"))
            .map(|value| address_of(&value))
        else {
            continue;
        };
        if recipient.is_empty() {
            continue;
        }
        let (Some(action), Some(status)) = (field("Action"), field("Status")) else {
            continue;
        };
        let status = status
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string();
        let class = status_class(&status).ok_or_else(|| DsnError::BadStatus {
            recipient: recipient.clone(),
            status: status.clone(),
        })?;
        let action = action.to_ascii_lowercase();
        let outcome = match (action.as_str(), class) {
            ("failed", 5) => Outcome::Hard,
            ("failed" | "delayed", _) => Outcome::Soft,
            ("delivered" | "relayed" | "expanded", _) => Outcome::Delivered,
            _ => return Err(DsnError::BadAction { recipient, action }),
        };
        statuses.push(RecipientStatus {
            recipient,
            status,
            outcome,
            diagnostic: field("Diagnostic-Code"),
        });
        if statuses.len() == MAX_RECIPIENTS {
            break;
        }
    }
    if statuses.is_empty() {
        return Err(DsnError::NoRecipients);
    }
    Ok(statuses)
}

/// The class (2, 4 or 5) of an RFC 3463 status code `class.subject.detail`.
fn status_class(status: &str) -> Option<u8> {
    let mut parts = status.split('.');
    let class = parts.next()?;
    let subject = parts.next()?;
    let detail = parts.next()?;
    let digits = |s: &str, max: usize| {
        !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
    };
    if parts.next().is_some() || !digits(subject, 3) || !digits(detail, 3) {
        return None;
    }
    match class {
        "2" => Some(2),
        "4" => Some(4),
        "5" => Some(5),
        _ => None,
    }
}

/// `rfc822; <Bob@Example.net>` (or `<Bob@Example.net>`) →
/// `bob@example.net`.
pub(crate) fn address_of(value: &str) -> String {
    let address = value.split_once(';').map_or(value, |(_, a)| a);
    address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .trim()
        .to_ascii_lowercase()
}

/// The blocks of fields, continuation lines unfolded.
fn blocks(text: &str) -> Vec<Vec<(String, String)>> {
    let mut blocks = Vec::new();
    let mut block: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() {
            if !block.is_empty() {
                blocks.push(std::mem::take(&mut block));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = block.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            block.push((name.trim().to_string(), value.trim().to_string()));
        }
    }
    if !block.is_empty() {
        blocks.push(block);
    }
    blocks
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A bounce as Postfix writes one (RFC 3464 multipart/report).
    pub(crate) const POSTFIX_BOUNCE: &str = "From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\n\
Subject: Undelivered Mail Returned to Sender\r\n\
To: b+00112233445566778899aabbccddeeff@bounce.acme.example\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/report; report-type=delivery-status;\r\n\
\tboundary=\"B1\"\r\n\
\r\n\
--B1\r\n\
Content-Description: Notification\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
I'm sorry to have to inform you that your message could not be delivered.\r\n\
\r\n\
--B1\r\n\
Content-Description: Delivery report\r\n\
Content-Type: message/delivery-status\r\n\
\r\n\
Reporting-MTA: dns; mx.example.net\r\n\
X-Postfix-Queue-ID: 4ABC\r\n\
Arrival-Date: Wed,  2 Dec 2026 10:00:00 +0000 (UTC)\r\n\
\r\n\
Final-Recipient: rfc822; Nobody@Example.NET\r\n\
Original-Recipient: rfc822;nobody@example.net\r\n\
Action: failed\r\n\
Status: 5.1.1\r\n\
Diagnostic-Code: X-Postfix; unknown user: \"nobody\"\r\n\
\r\n\
Final-Recipient: rfc822; slow@example.net\r\n\
Action: delayed\r\n\
Status: 4.4.1\r\n\
Diagnostic-Code: smtp; 421 try again\r\n\
\tlater\r\n\
\r\n\
--B1\r\n\
Content-Description: Undelivered Message Headers\r\n\
Content-Type: text/rfc822-headers\r\n\
\r\n\
From: alice@acme.example\r\n\
\r\n\
--B1--\r\n";

    #[test]
    fn a_postfix_bounce_gives_a_hard_and_a_soft_status() {
        let statuses = parse_dsn(POSTFIX_BOUNCE.as_bytes()).unwrap();
        assert_eq!(
            statuses,
            [
                RecipientStatus {
                    recipient: "nobody@example.net".into(),
                    status: "5.1.1".into(),
                    outcome: Outcome::Hard,
                    diagnostic: Some("X-Postfix; unknown user: \"nobody\"".into()),
                },
                RecipientStatus {
                    recipient: "slow@example.net".into(),
                    status: "4.4.1".into(),
                    outcome: Outcome::Soft,
                    diagnostic: Some("smtp; 421 try again later".into()),
                },
            ]
        );
    }

    #[test]
    fn a_failure_with_a_transient_status_is_soft_and_success_is_delivered() {
        let text = "Reporting-MTA: dns; mx\n\nFinal-Recipient: rfc822; a@b.example\nAction: failed\nStatus: 4.2.2\n\n\
                    Final-Recipient: rfc822; c@b.example\nAction: delivered\nStatus: 2.0.0\n";
        let outcomes: Vec<Outcome> = parse_delivery_status(text)
            .unwrap()
            .into_iter()
            .map(|s| s.outcome)
            .collect();
        assert_eq!(outcomes, [Outcome::Soft, Outcome::Delivered]);
    }

    #[test]
    fn malformed_reports_are_errors_never_bounces() {
        assert_eq!(
            parse_dsn(b"Subject: hello\r\n\r\nnot a report\r\n"),
            Err(DsnError::NotADsn)
        );
        assert_eq!(
            parse_delivery_status("Reporting-MTA: dns; mx\n"),
            Err(DsnError::NoRecipients)
        );
        for status in ["5.1", "6.1.1", "5.x.1", "5.1.1.1", "5.1111.1", ""] {
            let text =
                format!("Final-Recipient: rfc822; a@b.example\nAction: failed\nStatus: {status}\n");
            assert!(
                parse_delivery_status(&text).is_err(),
                "status {status:?} must be refused"
            );
        }
        assert_eq!(
            parse_delivery_status(
                "Final-Recipient: rfc822; a@b.example\nAction: exploded\nStatus: 5.1.1\n"
            ),
            Err(DsnError::BadAction {
                recipient: "a@b.example".into(),
                action: "exploded".into()
            })
        );
    }
}
