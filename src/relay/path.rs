//! SMTP envelope paths (RFC 5321 §4.1.2): the one parser for the address in
//! `MAIL FROM` and `RCPT TO`, and the one writer of what goes upstream.
//!
//! The sender policy and the upstream must see the same address. A client's
//! bytes therefore never reach the upstream: the path is parsed into a local
//! part and a domain, the policy judges that parsed [`Mailbox`], and the
//! upstream gets [`Mailbox`]'s own serialisation (quoted when the local part
//! needs it). Quoted local parts that could be read two ways (`<`, `>`,
//! spaces, backslashes, control characters) are refused, as are source
//! routes and address literals, which no submission client needs.

use std::fmt;

/// Longest local part (RFC 5321 §4.5.3.1.1).
const MAX_LOCAL_PART: usize = 64;
/// Longest domain (RFC 5321 §4.5.3.1.2).
const MAX_DOMAIN: usize = 255;

/// An address as the relay understands it: the local part's content
/// (without quotes) and the lowercased domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    local_part: String,
    domain: String,
}

impl Mailbox {
    /// The local part as the user wrote it, unquoted.
    pub fn local_part(&self) -> &str {
        &self.local_part
    }

    /// The domain, lowercase.
    pub fn domain(&self) -> &str {
        &self.domain
    }
}

/// Writes the address as RFC 5321 wants it on the wire: `local@domain`,
/// with the local part quoted unless it is a dot-string.
impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(self.local_part.as_bytes()) {
            write!(f, "{}@{}", self.local_part, self.domain)
        } else {
            // Only characters that need no escape are ever accepted in a
            // quoted local part (see `quoted_local_part`).
            write!(f, "\"{}\"@{}", self.local_part, self.domain)
        }
    }
}

/// A `MAIL FROM` path: a mailbox, or `<>` for bounces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReversePath {
    Null,
    Mailbox(Mailbox),
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Mailbox(mailbox) => write!(f, "<{mailbox}>"),
        }
    }
}

/// Why a path was refused. The text is what the client is told.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the address must be written in angle brackets, as <local@domain>")]
    NoAngleBrackets,
    #[error("the address has no closing '>'")]
    Unterminated,
    #[error("source routes (<@host:...>) are not accepted")]
    SourceRoute,
    #[error("the address has no domain")]
    NoDomain,
    #[error("the domain is not a valid host name")]
    BadDomain,
    #[error("address literals ([...]) are not accepted")]
    AddressLiteral,
    #[error("the local part is not valid")]
    BadLocalPart,
    #[error(
        "a quoted local part may not contain spaces, '<', '>', '\"', '\\' or control characters"
    )]
    UnsafeQuotedLocalPart,
    #[error("the local part is longer than {MAX_LOCAL_PART} characters")]
    LocalPartTooLong,
    #[error("the domain is longer than {MAX_DOMAIN} characters")]
    DomainTooLong,
    #[error("an empty path is not allowed here")]
    Empty,
    #[error("addresses must be ASCII (SMTPUTF8 is not offered)")]
    NotAscii,
}

fn is_atext(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&byte)
}

/// `Atom *("." Atom)`.
fn is_dot_string(text: &[u8]) -> bool {
    !text.is_empty()
        && text
            .split(|b| *b == b'.')
            .all(|atom| !atom.is_empty() && atom.iter().all(|b| is_atext(*b)))
}

/// `sub-domain *("." sub-domain)`, each `Let-dig [Ldh-str]`.
fn is_domain(text: &[u8]) -> bool {
    !text.is_empty()
        && text.split(|b| *b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
                && label.first() != Some(&b'-')
                && label.last() != Some(&b'-')
        })
}

/// Parses the path at the start of `input` (which begins with `<`), and
/// returns it with the rest of the input (the ESMTP parameters). An empty
/// path `<>` is `None`.
fn parse_path(input: &[u8]) -> Result<(Option<Mailbox>, &[u8]), PathError> {
    let Some(rest) = input.strip_prefix(b"<") else {
        return Err(PathError::NoAngleBrackets);
    };
    if let Some(after) = rest.strip_prefix(b">") {
        return Ok((None, after));
    }
    if rest.first() == Some(&b'@') {
        return Err(PathError::SourceRoute);
    }
    let (local_part, rest) = if rest.first() == Some(&b'"') {
        quoted_local_part(&rest[1..])?
    } else {
        let end = rest
            .iter()
            .position(|b| *b == b'@' || *b == b'>')
            .ok_or(PathError::Unterminated)?;
        if !rest[..end].is_ascii() {
            return Err(PathError::NotAscii);
        }
        if !is_dot_string(&rest[..end]) {
            return Err(PathError::BadLocalPart);
        }
        (
            String::from_utf8_lossy(&rest[..end]).into_owned(),
            &rest[end..],
        )
    };
    if local_part.len() > MAX_LOCAL_PART {
        return Err(PathError::LocalPartTooLong);
    }
    let Some(rest) = rest.strip_prefix(b"@") else {
        return Err(PathError::NoDomain);
    };
    let end = rest
        .iter()
        .position(|b| *b == b'>')
        .ok_or(PathError::Unterminated)?;
    let domain = &rest[..end];
    if domain.first() == Some(&b'[') {
        return Err(PathError::AddressLiteral);
    }
    if !domain.is_ascii() {
        return Err(PathError::NotAscii);
    }
    if domain.len() > MAX_DOMAIN {
        return Err(PathError::DomainTooLong);
    }
    if !is_domain(domain) {
        return Err(PathError::BadDomain);
    }
    let mailbox = Mailbox {
        local_part,
        domain: String::from_utf8_lossy(domain).to_ascii_lowercase(),
    };
    Ok((Some(mailbox), &rest[end + 1..]))
}

/// The content of a quoted local part, with `input` just after the opening
/// quote; returns it and the input after the closing quote. Only printable
/// ASCII other than space, `<`, `>`, `"` and `\` is accepted: enough for
/// any real address, and nothing that reads differently unquoted.
fn quoted_local_part(input: &[u8]) -> Result<(String, &[u8]), PathError> {
    let end = input
        .iter()
        .position(|b| *b == b'"')
        .ok_or(PathError::Unterminated)?;
    let content = &input[..end];
    if content.is_empty() {
        return Err(PathError::BadLocalPart);
    }
    if !content.is_ascii() {
        return Err(PathError::NotAscii);
    }
    if content
        .iter()
        .any(|b| !b.is_ascii_graphic() || matches!(b, b'<' | b'>' | b'\\'))
    {
        return Err(PathError::UnsafeQuotedLocalPart);
    }
    Ok((
        String::from_utf8_lossy(content).into_owned(),
        &input[end + 1..],
    ))
}

/// Parses `<path>` as a reverse path and returns the parameters after it.
pub fn parse_reverse_path(input: &[u8]) -> Result<(ReversePath, &[u8]), PathError> {
    let (mailbox, rest) = parse_path(input)?;
    Ok((
        mailbox.map_or(ReversePath::Null, ReversePath::Mailbox),
        rest,
    ))
}

/// Parses `<path>` as a forward path (never empty) and returns the
/// parameters after it.
pub fn parse_forward_path(input: &[u8]) -> Result<(Mailbox, &[u8]), PathError> {
    match parse_path(input)? {
        (Some(mailbox), rest) => Ok((mailbox, rest)),
        (None, _) => Err(PathError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reverse(text: &str) -> Result<(ReversePath, String), PathError> {
        parse_reverse_path(text.as_bytes())
            .map(|(path, rest)| (path, String::from_utf8_lossy(rest).into_owned()))
    }

    fn forward(text: &str) -> Result<String, PathError> {
        parse_forward_path(text.as_bytes()).map(|(mailbox, _)| mailbox.to_string())
    }

    #[test]
    fn plain_paths_are_parsed_and_written_back() {
        let (path, rest) = reverse("<Alice.Smith+tag@Acme.TEST> SIZE=10").unwrap();
        assert_eq!(path.to_string(), "<Alice.Smith+tag@acme.test>");
        assert_eq!(rest, " SIZE=10");
        let ReversePath::Mailbox(mailbox) = path else {
            panic!("not a mailbox")
        };
        assert_eq!(mailbox.local_part(), "Alice.Smith+tag");
        assert_eq!(mailbox.domain(), "acme.test");
        assert_eq!(reverse("<>").unwrap(), (ReversePath::Null, String::new()));
        assert_eq!(forward("<bob@example.net>").unwrap(), "bob@example.net");
    }

    #[test]
    fn a_quoted_local_part_is_kept_quoted_on_the_wire() {
        assert_eq!(
            forward("<\"odd..dots\"@acme.test>").unwrap(),
            "\"odd..dots\"@acme.test"
        );
        // Quoting a dot-string changes nothing about the address.
        assert_eq!(forward("<\"alice\"@acme.test>").unwrap(), "alice@acme.test");
        assert_eq!(forward("<\"a@b\"@acme.test>").unwrap(), "\"a@b\"@acme.test");
    }

    #[test]
    fn the_domain_judged_is_the_one_after_the_path_not_inside_a_quote() {
        let (path, rest) = reverse("<\"ceo@b.test\"@a.test>").unwrap();
        let ReversePath::Mailbox(mailbox) = path else {
            panic!("not a mailbox")
        };
        assert_eq!(mailbox.domain(), "a.test");
        assert_eq!(mailbox.to_string(), "\"ceo@b.test\"@a.test");
        assert_eq!(rest, "");
    }

    #[test]
    fn injection_through_a_quoted_local_part_is_refused() {
        for path in [
            "<\"ceo@b.test> AUTH=<>\"@a.test>",
            "<\"ceo@b.test>\"@a.test>",
            "<\"<ceo@b.test\"@a.test>",
            "<\"a b\"@a.test>",
            "<\"a\\\"b\"@a.test>",
            "<\"a\\\\\"@a.test>",
            "<\"a\tb\"@a.test>",
            "<\"a\r\nRCPT TO:<x@y>\"@a.test>",
            "<\"a\0b\"@a.test>",
        ] {
            assert_eq!(
                reverse(path).map(|(p, _)| p.to_string()),
                Err(PathError::UnsafeQuotedLocalPart),
                "{path:?}"
            );
        }
    }

    #[test]
    fn malformed_paths_are_refused() {
        for (path, error) in [
            ("alice@acme.test", PathError::NoAngleBrackets),
            ("<alice@acme.test", PathError::Unterminated),
            ("<alice>", PathError::NoDomain),
            ("<alice@>", PathError::BadDomain),
            ("<@acme.test:alice@acme.test>", PathError::SourceRoute),
            ("<alice@[192.0.2.1]>", PathError::AddressLiteral),
            ("<alice@acme..test>", PathError::BadDomain),
            ("<alice@-acme.test>", PathError::BadDomain),
            ("<alice@acme_x.test>", PathError::BadDomain),
            ("<alice@acme.test.>", PathError::BadDomain),
            ("<.alice@acme.test>", PathError::BadLocalPart),
            ("<al..ice@acme.test>", PathError::BadLocalPart),
            ("<al ice@acme.test>", PathError::BadLocalPart),
            ("<al(ice@acme.test>", PathError::BadLocalPart),
            ("<\"\"@acme.test>", PathError::BadLocalPart),
            ("<\"alice@acme.test>", PathError::Unterminated),
            ("<\"alice\"x@acme.test>", PathError::NoDomain),
            ("<älice@acme.test>", PathError::NotAscii),
            ("<alice@äcme.test>", PathError::NotAscii),
        ] {
            assert_eq!(
                reverse(path).map(|(p, _)| p.to_string()),
                Err(error),
                "{path:?}"
            );
        }
        let long_local = format!("<{}@acme.test>", "a".repeat(65));
        assert_eq!(forward(&long_local), Err(PathError::LocalPartTooLong));
        let long_domain = format!("<a@{}.test>", vec!["a".repeat(60); 5].join("."));
        assert_eq!(forward(&long_domain), Err(PathError::DomainTooLong));
        assert_eq!(forward("<>"), Err(PathError::Empty));
    }

    #[test]
    fn what_is_written_parses_back_to_the_same_mailbox() {
        for path in [
            "<alice@acme.test>",
            "<\"a@b\"@acme.test>",
            "<\"..\"@acme.test>",
            "<x!#$%&'*+-/=?^_`{|}~@acme.test>",
        ] {
            let (mailbox, _) = parse_forward_path(path.as_bytes()).unwrap();
            let written = format!("<{mailbox}>");
            let (again, rest) = parse_forward_path(written.as_bytes()).unwrap();
            assert_eq!(again, mailbox);
            assert!(rest.is_empty());
        }
    }
}
