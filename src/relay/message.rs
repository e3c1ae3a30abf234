//! Reading a submitted message without changing it: the header fields the
//! sender policy needs, and the RFC 5321 line-length limit.

/// Longest line SMTP allows, without its CRLF (RFC 5321 4.5.3.1.6).
pub const MAX_LINE_OCTETS: usize = 998;

/// One header field, with its value as written (folded, without the final
/// CRLF).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderField<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
}

/// Why a message's header section cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MalformedMessage {
    #[error("header line {line} is neither a field nor a continuation")]
    HeaderWithoutColon { line: usize },
    #[error("the message starts with a continuation line")]
    LeadingContinuation,
    #[error("a header field name is not printable ASCII")]
    BadFieldName,
    #[error("a line is longer than {MAX_LINE_OCTETS} characters")]
    LineTooLong,
}

/// The header fields of `message`, up to the first empty line (or the end
/// of the message).
pub fn header_fields(message: &[u8]) -> Result<Vec<HeaderField<'_>>, MalformedMessage> {
    let mut fields = Vec::new();
    // The field being read: where its line starts, where its colon is, and
    // where its (possibly folded) value ends so far.
    let mut current: Option<FieldSpan> = None;
    let mut offset = 0;
    let mut line_number = 0;
    while offset < message.len() {
        line_number += 1;
        let line_end = memchr_newline(&message[offset..]).map_or(message.len(), |p| offset + p);
        let content_end = if line_end > offset && message[line_end - 1] == b'\r' {
            line_end - 1
        } else {
            line_end
        };
        let line = &message[offset..content_end];
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            match current.as_mut() {
                Some(span) => span.end = content_end,
                None => return Err(MalformedMessage::LeadingContinuation),
            }
        } else {
            if let Some(span) = current.take() {
                fields.push(span.field(message)?);
            }
            let colon = line
                .iter()
                .position(|b| *b == b':')
                .ok_or(MalformedMessage::HeaderWithoutColon { line: line_number })?;
            current = Some(FieldSpan {
                start: offset,
                colon: offset + colon,
                end: content_end,
            });
        }
        offset = line_end + 1;
    }
    if let Some(span) = current {
        fields.push(span.field(message)?);
    }
    Ok(fields)
}

struct FieldSpan {
    start: usize,
    colon: usize,
    end: usize,
}

impl FieldSpan {
    fn field(self, message: &[u8]) -> Result<HeaderField<'_>, MalformedMessage> {
        let name = std::str::from_utf8(&message[self.start..self.colon])
            .map_err(|_| MalformedMessage::BadFieldName)?
            // Obsolete syntax allows space before the colon; receivers
            // and DKIM's relaxed canonicalization ignore it.
            .trim_end_matches([' ', '\t']);
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(MalformedMessage::BadFieldName);
        }
        Ok(HeaderField {
            name,
            value: &message[self.colon + 1..self.end],
        })
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|b| *b == b'\n')
}

/// Whether every line of `message` fits SMTP's line limit.
pub fn check_line_lengths(message: &[u8]) -> Result<(), MalformedMessage> {
    for line in message.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > MAX_LINE_OCTETS {
            return Err(MalformedMessage::LineTooLong);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_split_and_folded_values_kept() {
        let message =
            b"From: Alice\r\n <alice@acme.test>\r\nSubject: hi\r\n\r\nFrom: not a header\r\n";
        let fields = header_fields(message).unwrap();
        assert_eq!(
            fields,
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
    }

    #[test]
    fn a_space_before_the_colon_still_names_the_field() {
        let fields = header_fields(b"From : evil@other.test\r\n\r\n").unwrap();
        assert_eq!(fields[0].name, "From");
    }

    #[test]
    fn a_message_without_a_body_is_all_headers() {
        let fields = header_fields(b"From: a@b.test\r\nTo: c@d.test").unwrap();
        assert_eq!(fields.len(), 2);
    }

    #[test]
    fn malformed_header_sections_are_refused() {
        assert_eq!(
            header_fields(b"From: a@b.test\r\nnot a field\r\n\r\n"),
            Err(MalformedMessage::HeaderWithoutColon { line: 2 })
        );
        assert_eq!(
            header_fields(b" folded: first\r\n\r\n"),
            Err(MalformedMessage::LeadingContinuation)
        );
        assert_eq!(
            header_fields(b": empty name\r\n\r\n"),
            Err(MalformedMessage::BadFieldName)
        );
    }

    #[test]
    fn long_lines_are_found() {
        let ok = format!("Subject: x\r\n\r\n{}\r\n", "a".repeat(MAX_LINE_OCTETS));
        assert_eq!(check_line_lengths(ok.as_bytes()), Ok(()));
        let long = format!("Subject: x\r\n\r\n{}\r\n", "a".repeat(MAX_LINE_OCTETS + 1));
        assert_eq!(
            check_line_lengths(long.as_bytes()),
            Err(MalformedMessage::LineTooLong)
        );
    }
}
