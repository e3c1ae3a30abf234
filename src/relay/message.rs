//! A submitted message's header section, read the way the DKIM signer reads
//! it, and what a submission server adds to it (RFC 6409 §8).
//!
//! The sender policy must judge the From that gets signed. mail-auth's
//! signer splits the header section with its own (private) scanner and
//! matches header names exactly. This parser accepts only header sections
//! that every reader splits the same way, that scanner included, and
//! refuses the rest rather than judge them: a field name that is not
//! exactly RFC 5322 `ftext` up to the colon (such as `From ` with a space
//! before the colon, which the signer would not take for From), a line that
//! is neither a field nor a continuation, a continuation first. The message
//! reaching here has CRLF line ends only (see [`super::data`]); the unit
//! tests check the split against the signer's.

/// Longest line SMTP allows, without its CRLF (RFC 5321 4.5.3.1.6).
pub const MAX_LINE_OCTETS: usize = 998;

/// One header field: its exact name and its value as written (folded,
/// without the final CRLF).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderField<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
}

/// The header fields of a message, and where they end.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderSection<'a> {
    pub fields: Vec<HeaderField<'a>>,
    /// Offset just after the last field: where the empty line before the
    /// body starts, or the end of a message that has no body.
    pub end: usize,
}

impl HeaderSection<'_> {
    /// Whether a field of this name is present.
    pub fn has(&self, name: &str) -> bool {
        self.fields
            .iter()
            .any(|field| field.name.eq_ignore_ascii_case(name))
    }
}

/// Why a message's header section cannot be read one way only.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MalformedMessage {
    #[error("header line {line} is neither a field nor a continuation")]
    HeaderWithoutColon { line: usize },
    #[error("the message starts with a continuation line")]
    LeadingContinuation,
    #[error(
        "header field name {name:?} is not exact (RFC 5322: printable ASCII up to the colon, no spaces)"
    )]
    BadFieldName { name: String },
}

fn is_ftext(byte: u8) -> bool {
    (33..=126).contains(&byte) && byte != b':'
}

/// A field name for an error message: printable, short.
fn shown(name: &[u8]) -> String {
    String::from_utf8_lossy(name)
        .chars()
        .take(40)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Reads the header section of `message` (CRLF line ends) as mail-auth's
/// signer will, refusing anything it could read differently from a
/// receiver.
pub fn header_section(message: &[u8]) -> Result<HeaderSection<'_>, MalformedMessage> {
    let mut fields: Vec<HeaderField<'_>> = Vec::with_capacity(16);
    // The field being read: where its name ends (the colon) and where its
    // value, folded lines included, ends so far.
    let mut current: Option<(usize, usize, usize)> = None;
    let mut offset = 0;
    let mut line_number = 0;
    fn finish<'m>(
        message: &'m [u8],
        fields: &mut Vec<HeaderField<'m>>,
        (start, colon, end): (usize, usize, usize),
    ) {
        // ftext is ASCII.
        let name = std::str::from_utf8(&message[start..colon]).unwrap_or_default();
        fields.push(HeaderField {
            name,
            value: &message[colon + 1..end],
        });
    }
    while offset < message.len() {
        line_number += 1;
        let line_end =
            memchr::memchr(b'\n', &message[offset..]).map_or(message.len(), |p| offset + p + 1);
        let content_end = if message[..line_end].ends_with(b"\r\n") {
            line_end - 2
        } else {
            line_end
        };
        let line = &message[offset..content_end];
        if line.is_empty() {
            if let Some(field) = current.take() {
                finish(message, &mut fields, field);
            }
            return Ok(HeaderSection {
                end: offset,
                fields,
            });
        }
        if line[0] == b' ' || line[0] == b'\t' {
            match current.as_mut() {
                Some((_, _, end)) => *end = content_end,
                None => return Err(MalformedMessage::LeadingContinuation),
            }
        } else {
            if let Some(field) = current.take() {
                finish(message, &mut fields, field);
            }
            let name_end = line
                .iter()
                .position(|b| !is_ftext(*b))
                .unwrap_or(line.len());
            match line.get(name_end) {
                Some(b':') if name_end > 0 => {
                    current = Some((offset, offset + name_end, content_end));
                }
                _ if line.contains(&b':') => {
                    let colon = line.iter().position(|b| *b == b':').unwrap_or(line.len());
                    return Err(MalformedMessage::BadFieldName {
                        name: shown(&line[..colon]),
                    });
                }
                _ => return Err(MalformedMessage::HeaderWithoutColon { line: line_number }),
            }
        }
        offset = line_end;
    }
    if let Some(field) = current.take() {
        finish(message, &mut fields, field);
    }
    Ok(HeaderSection {
        end: message.len(),
        fields,
    })
}

/// What a submission server adds before signing when the client left it
/// out (RFC 6409 §8.2, §8.3): `Date` and `Message-ID` fields, to go at
/// `section.end`. A next hop would add them after the signature, which
/// then fails if they are signed as absent. Empty when nothing is missing.
pub fn missing_fields(section: &HeaderSection<'_>, hostname: &str, now: jiff::Timestamp) -> String {
    let mut added = String::new();
    if !section.has("Date") {
        let utc = now.to_zoned(jiff::tz::TimeZone::UTC);
        // A UTC time always has an RFC 2822 form.
        if let Ok(date) = jiff::fmt::rfc2822::to_string(&utc) {
            added.push_str("Date: ");
            added.push_str(&date);
            added.push_str("\r\n");
        }
    }
    if !section.has("Message-ID") {
        added.push_str("Message-ID: <");
        added.push_str(&unique_id(now));
        added.push('@');
        added.push_str(hostname);
        added.push_str(">\r\n");
    }
    added
}

/// `message` with [`missing_fields`] added.
pub fn add_missing_fields(
    message: Vec<u8>,
    section: &HeaderSection<'_>,
    hostname: &str,
    now: jiff::Timestamp,
) -> Vec<u8> {
    let added = missing_fields(section, hostname, now);
    if added.is_empty() {
        return message;
    }
    let end = section.end;
    let mut completed = Vec::with_capacity(message.len() + added.len());
    completed.extend_from_slice(&message[..end]);
    completed.extend_from_slice(added.as_bytes());
    completed.extend_from_slice(&message[end..]);
    completed
}

/// A Message-ID left part unique across relays and restarts: the time and
/// 96 random bits.
fn unique_id(now: jiff::Timestamp) -> String {
    let mut random = [0u8; 12];
    // The system RNG does not fail on Linux; zeros would still be unique
    // enough with the nanosecond time in front.
    let _ = aws_lc_rs::rand::fill(&mut random);
    let mut id = format!("{}.", now.as_nanosecond());
    for byte in random {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(message: &[u8]) -> Result<Vec<String>, MalformedMessage> {
        header_section(message)
            .map(|section| section.fields.iter().map(|f| f.name.to_string()).collect())
    }

    #[test]
    fn fields_are_split_and_folded_values_kept() {
        let message =
            b"From: Alice\r\n <alice@acme.test>\r\nSubject: hi\r\n\r\nFrom: not a header\r\n";
        let section = header_section(message).unwrap();
        assert_eq!(
            section.fields,
            vec![
                HeaderField {
                    name: "From",
                    value: b" Alice\r\n <alice@acme.test>"
                },
                HeaderField {
                    name: "Subject",
                    value: b" hi"
                },
            ]
        );
        assert!(message[section.end..].starts_with(b"\r\nFrom: not"));
    }

    #[test]
    fn a_name_that_is_not_exact_is_refused() {
        for message in [
            &b"From : evil@other.test\r\n\r\n"[..],
            b"From\t: evil@other.test\r\n\r\n",
            b"Subject: x\r\nFr\x01om: evil@other.test\r\n\r\n",
            b"Subject: x\r\nFr\xc3\xb6m: evil@other.test\r\n\r\n",
        ] {
            assert!(
                matches!(
                    header_section(message),
                    Err(MalformedMessage::BadFieldName { .. })
                ),
                "{message:?}: {:?}",
                header_section(message)
            );
        }
    }

    #[test]
    fn a_line_that_is_not_a_field_is_refused_not_taken_for_the_end() {
        assert_eq!(
            names(b"From: a@b.test\r\nnot a field\r\nFrom: evil@other.test\r\n\r\n"),
            Err(MalformedMessage::HeaderWithoutColon { line: 2 })
        );
        assert_eq!(
            names(b" folded: first\r\n\r\n"),
            Err(MalformedMessage::LeadingContinuation)
        );
        assert!(names(b": empty name\r\n\r\n").is_err());
    }

    #[test]
    fn headers_only_and_empty_messages() {
        assert_eq!(
            names(b"From: a@b.test\r\nTo: c@d.test\r\n").unwrap(),
            ["From", "To"]
        );
        assert!(names(b"").unwrap().is_empty());
        assert!(names(b"\r\nbody\r\n").unwrap().is_empty());
    }

    #[test]
    fn date_and_message_id_are_added_when_missing() {
        let now: jiff::Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let message = b"From: a@acme.test\r\nSubject: s\r\n\r\nbody\r\n".to_vec();
        let section = header_section(&message).unwrap();
        let completed = add_missing_fields(message.clone(), &section, "relay.test", now);
        let text = String::from_utf8(completed.clone()).unwrap();
        assert!(
            text.starts_with(
                "From: a@acme.test\r\nSubject: s\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <"
            ),
            "{text}"
        );
        assert!(text.ends_with("@relay.test>\r\n\r\nbody\r\n"), "{text}");
        let again = header_section(&completed).unwrap();
        assert!(again.has("date") && again.has("message-id"));

        let complete = completed.clone();
        assert_eq!(
            add_missing_fields(complete, &again, "relay.test", now),
            completed
        );
    }

    /// The names mail-auth's signer finds in `message`, bottom up, as its
    /// h= tag lists them before the absent ones.
    fn signer_split(message: &[u8], names: &[&str]) -> Vec<String> {
        use crate::api::KeyAlgorithm;
        use crate::dkim::{NewKey, generate, signing_key_from_pem};
        use mail_auth::dkim::DkimSigner;
        let generated = generate(&NewKey {
            selector: "s".into(),
            algorithm: KeyAlgorithm::Ed25519,
            size: None,
            generation: 1,
        })
        .unwrap();
        let key = signing_key_from_pem(KeyAlgorithm::Ed25519, &generated.private_key_pem).unwrap();
        let signature = DkimSigner::from_key(key)
            .domain("acme.test")
            .selector("s")
            .headers(names.iter().copied())
            .sign(message)
            .unwrap();
        let text = signature.to_string();
        let h = text
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .replace([' ', '\t', '\r', '\n'], "");
        h.split(':').map(str::to_string).collect()
    }

    #[test]
    fn the_split_is_the_signers() {
        let names = ["From", "Subject", "To", "X-Folded", "Empty"];
        for message in [
            &b"From: a@acme.test\r\nSubject: one\r\nTo: b@x.test\r\n\r\nFrom: body\r\n"[..],
            b"X-Folded: a\r\n b\r\n\tc\r\nFrom: a@acme.test\r\nSubject: s\r\nSubject: t\r\n\r\n",
            b"Empty:\r\nFrom:a@acme.test\r\nTo: x\r\n",
            b"From: a@acme.test\r\nSubject: a: b: c\r\n\r\nSubject: in body\r\n",
        ] {
            let section = header_section(message).unwrap();
            let ours: Vec<String> = section
                .fields
                .iter()
                .rev()
                .filter(|f| names.iter().any(|n| n.eq_ignore_ascii_case(f.name)))
                .map(|f| f.name.to_string())
                .collect();
            let theirs = signer_split(message, &names);
            assert_eq!(theirs[..ours.len()], ours[..], "{message:?}");
            let absent = names
                .iter()
                .filter(|n| !section.has(n))
                .map(|n| n.to_string());
            assert_eq!(
                theirs[ours.len()..],
                absent.collect::<Vec<_>>()[..],
                "{message:?}"
            );
        }
    }

    #[test]
    fn message_ids_differ() {
        let now = jiff::Timestamp::now();
        assert_ne!(unique_id(now), unique_id(now));
    }
}
