//! SMTP command lines, parsed: the verbs a submission server answers and
//! their arguments. Pure; see [`super::path`] for the addresses.
//!
//! smtp-proto's request parser unquotes local parts, which loses the very
//! distinction the sender policy and the upstream's copy of the path depend
//! on, so `MAIL` and `RCPT` (and, for one consistent grammar, every other
//! verb) are parsed here.

use super::path::{Mailbox, PathError, ReversePath, parse_forward_path, parse_reverse_path};

/// `BODY=` of `MAIL FROM` (RFC 6152).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Body {
    #[default]
    SevenBit,
    EightBitMime,
}

/// One command a client sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    StartTls,
    Auth {
        /// Uppercase.
        mechanism: String,
        /// The initial response, as sent (base64 or `=`).
        initial_response: Option<Vec<u8>>,
    },
    Mail {
        from: ReversePath,
        /// The size the client declared (RFC 1870).
        size: Option<u64>,
        body: Body,
    },
    Rcpt {
        to: Mailbox,
    },
    Data,
    Rset,
    Noop,
    Quit,
    Vrfy,
    /// CHUNKING is not offered: its binary chunk follows at once, so the
    /// session cannot find the next command and must end.
    Bdat,
    /// A verb RFC 5321 knows but this relay does not offer.
    NotImplemented,
}

/// Why a command line was refused; each maps to one reply.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("unknown command")]
    Unknown,
    #[error("syntax: {0}")]
    Syntax(&'static str),
    #[error("bad sender address: {0}")]
    Sender(PathError),
    #[error("bad recipient address: {0}")]
    Recipient(PathError),
    #[error("parameter {0} is not supported")]
    UnsupportedParameter(String),
    #[error("parameter {0} has an invalid value")]
    InvalidParameter(String),
}

impl CommandError {
    /// The reply code and enhanced status for this error.
    pub fn reply(&self) -> (u16, &'static str) {
        match self {
            CommandError::Unknown => (500, "5.5.1"),
            CommandError::Syntax(_) => (501, "5.5.4"),
            CommandError::Sender(_) => (501, "5.1.7"),
            CommandError::Recipient(_) => (501, "5.1.3"),
            CommandError::UnsupportedParameter(_) => (555, "5.5.4"),
            CommandError::InvalidParameter(_) => (501, "5.5.4"),
        }
    }
}

/// A printable form of a client's keyword for a reply: at most 32 graphic
/// ASCII characters.
fn shown(text: &[u8]) -> String {
    text.iter()
        .filter(|b| b.is_ascii_graphic())
        .take(32)
        .map(|b| char::from(*b))
        .collect()
}

/// Splits `verb rest`; the verb is returned uppercase.
fn split_verb(line: &[u8]) -> (String, &[u8]) {
    let end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
    let verb = String::from_utf8_lossy(&line[..end]).to_ascii_uppercase();
    (verb, line.get(end + 1..).unwrap_or_default())
}

/// A host name or address literal in EHLO/HELO: one word of graphic ASCII.
fn helo_argument(rest: &[u8]) -> Result<String, CommandError> {
    let word = rest.trim_ascii();
    if word.is_empty() {
        return Err(CommandError::Syntax("EHLO/HELO needs your host name"));
    }
    if !word.iter().all(u8::is_ascii_graphic) {
        return Err(CommandError::Syntax(
            "the host name must be one word of printable ASCII",
        ));
    }
    Ok(String::from_utf8_lossy(word).into_owned())
}

/// `FROM:` or `TO:` (case-insensitive), then optional spaces (tolerated, as
/// many clients send them).
fn after_keyword<'a>(rest: &'a [u8], keyword: &[u8]) -> Option<&'a [u8]> {
    let head = rest.get(..keyword.len())?;
    head.eq_ignore_ascii_case(keyword)
        .then(|| rest[keyword.len()..].trim_ascii_start())
}

/// One ESMTP parameter: its keyword (uppercase) and value, if any.
type Parameter<'a> = (String, Option<&'a [u8]>);

/// `esmtp-param *(SP esmtp-param)` after a path.
fn parameters(rest: &[u8]) -> Result<Vec<Parameter<'_>>, CommandError> {
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    if rest[0] != b' ' {
        return Err(CommandError::Syntax("a space must follow the address"));
    }
    let mut parameters = Vec::new();
    for word in rest.split(|b| *b == b' ').filter(|w| !w.is_empty()) {
        let (keyword, value) = match word.iter().position(|b| *b == b'=') {
            Some(eq) => (&word[..eq], Some(&word[eq + 1..])),
            None => (word, None),
        };
        let keyword_ok = keyword.first().is_some_and(u8::is_ascii_alphanumeric)
            && keyword
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-');
        let value_ok = value.is_none_or(|value| {
            !value.is_empty() && value.iter().all(|b| b.is_ascii_graphic() && *b != b'=')
        });
        if !keyword_ok || !value_ok {
            return Err(CommandError::Syntax("malformed ESMTP parameter"));
        }
        parameters.push((String::from_utf8_lossy(keyword).to_ascii_uppercase(), value));
    }
    Ok(parameters)
}

fn mail(rest: &[u8]) -> Result<Command, CommandError> {
    let path = after_keyword(rest, b"FROM:").ok_or(CommandError::Syntax("MAIL FROM:<address>"))?;
    let (from, rest) = parse_reverse_path(path).map_err(CommandError::Sender)?;
    let mut size = None;
    let mut body = Body::default();
    for (keyword, value) in parameters(rest)? {
        match (keyword.as_str(), value) {
            ("SIZE", Some(value)) => {
                let parsed = std::str::from_utf8(value)
                    .ok()
                    .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| CommandError::InvalidParameter(keyword.clone()))?;
                size = Some(parsed);
            }
            ("BODY", Some(value)) if value.eq_ignore_ascii_case(b"7BIT") => {
                body = Body::SevenBit;
            }
            ("BODY", Some(value)) if value.eq_ignore_ascii_case(b"8BITMIME") => {
                body = Body::EightBitMime;
            }
            // RFC 4954 §5: AUTH= names who submitted a message relayed on
            // behalf of someone; the relay knows who authenticated, and
            // never passes a client's claim on.
            ("AUTH", Some(_)) => {}
            ("SIZE" | "BODY" | "AUTH", _) => {
                return Err(CommandError::InvalidParameter(keyword));
            }
            _ => {
                return Err(CommandError::UnsupportedParameter(shown(
                    keyword.as_bytes(),
                )));
            }
        }
    }
    Ok(Command::Mail { from, size, body })
}

fn rcpt(rest: &[u8]) -> Result<Command, CommandError> {
    let path = after_keyword(rest, b"TO:").ok_or(CommandError::Syntax("RCPT TO:<address>"))?;
    let (to, rest) = parse_forward_path(path).map_err(CommandError::Recipient)?;
    // No extension that defines RCPT parameters (DSN's NOTIFY and ORCPT)
    // is offered.
    if let Some((keyword, _)) = parameters(rest)?.into_iter().next() {
        return Err(CommandError::UnsupportedParameter(shown(
            keyword.as_bytes(),
        )));
    }
    Ok(Command::Rcpt { to })
}

fn no_argument(rest: &[u8], command: Command) -> Result<Command, CommandError> {
    if rest.trim_ascii().is_empty() {
        Ok(command)
    } else {
        Err(CommandError::Syntax("this command takes no argument"))
    }
}

/// Parses one command line, without its line end.
pub fn parse(line: &[u8]) -> Result<Command, CommandError> {
    let (verb, rest) = split_verb(line);
    match verb.as_str() {
        "EHLO" => helo_argument(rest).map(Command::Ehlo),
        "HELO" => helo_argument(rest).map(Command::Helo),
        "MAIL" => mail(rest),
        "RCPT" => rcpt(rest),
        "DATA" => no_argument(rest, Command::Data),
        "RSET" => no_argument(rest, Command::Rset),
        "QUIT" => no_argument(rest, Command::Quit),
        "STARTTLS" => no_argument(rest, Command::StartTls),
        // NOOP may carry a string (RFC 5321 §4.1.1.9), which is ignored.
        "NOOP" => Ok(Command::Noop),
        "VRFY" => Ok(Command::Vrfy),
        "BDAT" => Ok(Command::Bdat),
        "AUTH" => {
            let mut words = rest.split(|b| *b == b' ').filter(|w| !w.is_empty());
            let mechanism = words
                .next()
                .ok_or(CommandError::Syntax("AUTH mechanism [initial-response]"))?;
            let initial_response = words.next().map(<[u8]>::to_vec);
            if words.next().is_some() {
                return Err(CommandError::Syntax("AUTH mechanism [initial-response]"));
            }
            Ok(Command::Auth {
                mechanism: String::from_utf8_lossy(mechanism).to_ascii_uppercase(),
                initial_response,
            })
        }
        "EXPN" | "HELP" | "TURN" | "ETRN" | "ATRN" | "BURL" | "LHLO" | "SEND" | "SOML" | "SAML" => {
            Ok(Command::NotImplemented)
        }
        _ => Err(CommandError::Unknown),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(text: &str) -> Mailbox {
        parse_forward_path(text.as_bytes()).unwrap().0
    }

    #[test]
    fn mail_from_with_the_parameters_we_offer() {
        assert_eq!(
            parse(b"MAIL FROM:<alice@acme.test> SIZE=1000 BODY=8BITMIME"),
            Ok(Command::Mail {
                from: ReversePath::Mailbox(mailbox("<alice@acme.test>")),
                size: Some(1000),
                body: Body::EightBitMime,
            })
        );
        assert_eq!(
            parse(b"mail from: <> body=7bit AUTH=<>"),
            Ok(Command::Mail {
                from: ReversePath::Null,
                size: None,
                body: Body::SevenBit,
            })
        );
    }

    #[test]
    fn parameters_we_do_not_offer_are_refused_not_passed_on() {
        for line in [
            "MAIL FROM:<alice@acme.test> ENVID=x",
            "MAIL FROM:<alice@acme.test> RET=FULL",
            "MAIL FROM:<alice@acme.test> SMTPUTF8",
            "MAIL FROM:<alice@acme.test> REQUIRETLS",
            "RCPT TO:<bob@example.net> ORCPT=rfc822;evil@other.test",
            "RCPT TO:<bob@example.net> NOTIFY=NEVER",
        ] {
            assert!(
                matches!(
                    parse(line.as_bytes()),
                    Err(CommandError::UnsupportedParameter(_))
                ),
                "{line}: {:?}",
                parse(line.as_bytes())
            );
        }
        assert_eq!(
            parse(b"MAIL FROM:<a@acme.test> SIZE=12x"),
            Err(CommandError::InvalidParameter("SIZE".into()))
        );
        assert_eq!(
            parse(b"MAIL FROM:<a@acme.test> BODY=BINARYMIME"),
            Err(CommandError::InvalidParameter("BODY".into()))
        );
        assert!(matches!(
            parse(b"MAIL FROM:<a@acme.test>SIZE=1"),
            Err(CommandError::Syntax(_))
        ));
    }

    #[test]
    fn the_injections_of_the_probe_are_refused() {
        assert!(matches!(
            parse(b"MAIL FROM:<\"ceo@b.test> AUTH=<>\"@a.test>"),
            Err(CommandError::Sender(PathError::UnsafeQuotedLocalPart))
        ));
        assert!(matches!(
            parse(b"RCPT TO:<\"x> ORCPT=rfc822;ceo@b.test\"@example.net>"),
            Err(CommandError::Recipient(PathError::UnsafeQuotedLocalPart))
        ));
        assert!(matches!(
            parse(b"MAIL FROM:alice@acme.test"),
            Err(CommandError::Sender(PathError::NoAngleBrackets))
        ));
        assert!(matches!(
            parse(b"RCPT TO:<>"),
            Err(CommandError::Recipient(PathError::Empty))
        ));
    }

    #[test]
    fn other_verbs() {
        assert_eq!(
            parse(b"EHLO client.test"),
            Ok(Command::Ehlo("client.test".into()))
        );
        assert_eq!(
            parse(b"helo [192.0.2.1]"),
            Ok(Command::Helo("[192.0.2.1]".into()))
        );
        assert!(matches!(parse(b"EHLO"), Err(CommandError::Syntax(_))));
        assert!(matches!(
            parse(b"EHLO a\x01b"),
            Err(CommandError::Syntax(_))
        ));
        assert_eq!(
            parse(b"AUTH plain AGFsaWNlAHB3"),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial_response: Some(b"AGFsaWNlAHB3".to_vec()),
            })
        );
        assert_eq!(
            parse(b"AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: "LOGIN".into(),
                initial_response: None,
            })
        );
        assert_eq!(parse(b"data"), Ok(Command::Data));
        assert!(matches!(parse(b"DATA now"), Err(CommandError::Syntax(_))));
        assert_eq!(parse(b"NOOP anything"), Ok(Command::Noop));
        assert_eq!(parse(b"QUIT"), Ok(Command::Quit));
        assert_eq!(parse(b"BDAT 100 LAST"), Ok(Command::Bdat));
        assert_eq!(parse(b"EXPN list"), Ok(Command::NotImplemented));
        assert_eq!(parse(b"XYZZY"), Err(CommandError::Unknown));
        assert_eq!(parse(b""), Err(CommandError::Unknown));
    }
}
