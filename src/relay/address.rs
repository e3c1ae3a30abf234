//! A small, strict parser of RFC 5322 address lists, for the From header.
//!
//! The sender policy must see the address a receiver (and DMARC) will see,
//! not one a display name pretends to be. Rather than decoding everything a
//! mail client might show, this parser understands the full syntax that
//! decides *which address* a header names — quoted strings, comments,
//! display names, angle addresses, groups — and refuses anything else
//! (obsolete routes, domain literals, unbalanced quotes or comments), so an
//! ambiguous header never passes.

use std::fmt;

/// One `mailbox`: the part that matters is the domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mailbox {
    /// The local part as written (quoted strings keep their content).
    pub local_part: String,
    /// Lowercased domain.
    pub domain: String,
}

impl fmt::Display for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local_part, self.domain)
    }
}

/// One element of an address list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Mailbox(Mailbox),
    /// `name: member, member;` (possibly with no members).
    Group {
        members: Vec<Mailbox>,
    },
}

/// Why a header value is not an address list we accept.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("unbalanced quotes")]
    UnterminatedQuotedString,
    #[error("unbalanced parentheses in a comment")]
    UnterminatedComment,
    #[error("a domain literal ([...]) is not accepted")]
    DomainLiteral,
    #[error("unexpected {0:?}")]
    Unexpected(String),
    #[error("the address list is empty")]
    Empty,
    #[error("a display name without an address")]
    MissingAddress,
    #[error("an address without a domain")]
    MissingDomain,
    #[error("a control character in the header")]
    ControlCharacter,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Atom(String),
    Quoted(String),
    /// One of `< > @ , ; : .`
    Special(u8),
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Atom(text) => text.clone(),
            Token::Quoted(text) => format!("\"{text}\""),
            Token::Special(byte) => char::from(*byte).to_string(),
        }
    }
}

fn is_atext(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&byte) || byte >= 0x80
}

/// Splits an unfolded header value into tokens, dropping whitespace and
/// (nested) comments.
fn tokenize(value: &[u8]) -> Result<Vec<Token>, AddressError> {
    let mut tokens = Vec::new();
    let mut index = 0;
    while let Some(&byte) = value.get(index) {
        match byte {
            b' ' | b'\t' | b'\r' | b'\n' => index += 1,
            b'(' => index = skip_comment(value, index)?,
            b'"' => {
                let (text, next) = quoted_string(value, index)?;
                tokens.push(Token::Quoted(text));
                index = next;
            }
            b'[' => return Err(AddressError::DomainLiteral),
            b'<' | b'>' | b'@' | b',' | b';' | b':' | b'.' => {
                tokens.push(Token::Special(byte));
                index += 1;
            }
            _ if is_atext(byte) => {
                let start = index;
                while value.get(index).copied().is_some_and(is_atext) {
                    index += 1;
                }
                let atom = String::from_utf8_lossy(&value[start..index]).into_owned();
                tokens.push(Token::Atom(atom));
            }
            _ if byte.is_ascii_control() => return Err(AddressError::ControlCharacter),
            _ => return Err(AddressError::Unexpected(char::from(byte).to_string())),
        }
    }
    Ok(tokens)
}

/// Returns the index just after the comment that opens at `start`.
fn skip_comment(value: &[u8], start: usize) -> Result<usize, AddressError> {
    let mut depth = 0usize;
    let mut index = start;
    while let Some(&byte) = value.get(index) {
        match byte {
            b'\\' => index += 1,
            b'(' => depth += 1,
            b')' => {
                depth -= 1;
                if depth == 0 {
                    return Ok(index + 1);
                }
            }
            _ => {}
        }
        index += 1;
    }
    Err(AddressError::UnterminatedComment)
}

/// Returns the unescaped content of the quoted string at `start` and the
/// index after its closing quote.
fn quoted_string(value: &[u8], start: usize) -> Result<(String, usize), AddressError> {
    let mut content = Vec::new();
    let mut index = start + 1;
    while let Some(&byte) = value.get(index) {
        match byte {
            b'\\' => {
                let escaped = value
                    .get(index + 1)
                    .ok_or(AddressError::UnterminatedQuotedString)?;
                content.push(*escaped);
                index += 2;
            }
            b'"' => return Ok((String::from_utf8_lossy(&content).into_owned(), index + 1)),
            b'\r' | b'\n' => index += 1,
            _ => {
                content.push(byte);
                index += 1;
            }
        }
    }
    Err(AddressError::UnterminatedQuotedString)
}

struct Parser {
    tokens: Vec<Token>,
    position: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.position).cloned();
        self.position += 1;
        token
    }

    fn expect(&mut self, special: u8) -> Result<(), AddressError> {
        match self.next() {
            Some(Token::Special(byte)) if byte == special => Ok(()),
            Some(other) => Err(AddressError::Unexpected(other.describe())),
            None => Err(AddressError::Unexpected("end of header".into())),
        }
    }

    /// Words and dots up to the next other special: a display name, or the
    /// local part of an addr-spec (decided by what follows).
    fn words(&mut self) -> Vec<Token> {
        let mut words = Vec::new();
        while let Some(token) = self.peek() {
            match token {
                Token::Atom(_) | Token::Quoted(_) | Token::Special(b'.') => {
                    words.push(token.clone());
                    self.position += 1;
                }
                _ => break,
            }
        }
        words
    }

    fn address(&mut self) -> Result<Address, AddressError> {
        let words = self.words();
        match self.peek() {
            Some(Token::Special(b'<')) => self.angle_addr().map(Address::Mailbox),
            Some(Token::Special(b'@')) => self.addr_spec_after(words).map(Address::Mailbox),
            Some(Token::Special(b':')) if !words.is_empty() => {
                self.position += 1;
                self.group_members()
            }
            Some(other) => Err(AddressError::Unexpected(other.describe())),
            None if words.is_empty() => Err(AddressError::Empty),
            None => Err(AddressError::MissingAddress),
        }
    }

    fn group_members(&mut self) -> Result<Address, AddressError> {
        let mut members = Vec::new();
        loop {
            if let Some(Token::Special(b';')) = self.peek() {
                self.position += 1;
                return Ok(Address::Group { members });
            }
            if !members.is_empty() {
                self.expect(b',')?;
            }
            let words = self.words();
            let member = match self.peek() {
                Some(Token::Special(b'<')) => self.angle_addr()?,
                Some(Token::Special(b'@')) => self.addr_spec_after(words)?,
                Some(other) => return Err(AddressError::Unexpected(other.describe())),
                None => return Err(AddressError::Unexpected("end of header".into())),
            };
            members.push(member);
        }
    }

    fn angle_addr(&mut self) -> Result<Mailbox, AddressError> {
        self.expect(b'<')?;
        let local = self.words();
        let mailbox = self.addr_spec_after(local)?;
        self.expect(b'>')?;
        Ok(mailbox)
    }

    /// With the local-part words already read and `@` next.
    fn addr_spec_after(&mut self, local: Vec<Token>) -> Result<Mailbox, AddressError> {
        let local_part = dotted(&local, true)?;
        self.expect(b'@')?;
        let domain = self.words();
        if domain.is_empty() {
            return Err(AddressError::MissingDomain);
        }
        let domain = dotted(&domain, false)?;
        Ok(Mailbox {
            local_part,
            domain: domain.to_ascii_lowercase(),
        })
    }
}

/// Joins `word ("." word)*`, refusing empty labels; quoted words are only
/// allowed in a local part.
fn dotted(tokens: &[Token], quoted_allowed: bool) -> Result<String, AddressError> {
    if tokens.is_empty() {
        return Err(AddressError::Unexpected("@".into()));
    }
    let mut text = String::new();
    let mut expect_word = true;
    for token in tokens {
        match (token, expect_word) {
            (Token::Atom(atom), true) => text.push_str(atom),
            (Token::Quoted(content), true) if quoted_allowed => {
                text.push('"');
                text.push_str(content);
                text.push('"');
            }
            (Token::Special(b'.'), false) => text.push('.'),
            (other, _) => return Err(AddressError::Unexpected(other.describe())),
        }
        expect_word = !expect_word;
    }
    if expect_word {
        return Err(AddressError::Unexpected(".".into()));
    }
    Ok(text)
}

/// Parses an (unfolded or folded) header value as an RFC 5322
/// `address-list`.
pub fn parse_address_list(value: &[u8]) -> Result<Vec<Address>, AddressError> {
    let mut parser = Parser {
        tokens: tokenize(value)?,
        position: 0,
    };
    if parser.tokens.is_empty() {
        return Err(AddressError::Empty);
    }
    let mut addresses = vec![parser.address()?];
    while let Some(token) = parser.next() {
        match token {
            Token::Special(b',') => addresses.push(parser.address()?),
            other => return Err(AddressError::Unexpected(other.describe())),
        }
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(local: &str, domain: &str) -> Address {
        Address::Mailbox(Mailbox {
            local_part: local.into(),
            domain: domain.into(),
        })
    }

    fn parse(value: &str) -> Result<Vec<Address>, AddressError> {
        parse_address_list(value.as_bytes())
    }

    #[test]
    fn plain_forms_are_parsed() {
        let alice = vec![mailbox("alice", "acme.test")];
        assert_eq!(parse("alice@acme.test"), Ok(alice.clone()));
        assert_eq!(parse(" <alice@acme.test> "), Ok(alice.clone()));
        assert_eq!(parse("Alice <alice@acme.test>"), Ok(alice.clone()));
        assert_eq!(parse("Alice Smith <alice@ACME.Test>"), Ok(alice.clone()));
        assert_eq!(
            parse("\"Smith, Alice\" <alice@acme.test>"),
            Ok(alice.clone())
        );
        assert_eq!(parse("A. B. Smith <alice@acme.test>"), Ok(alice));
        assert_eq!(
            parse("first.last@sub.acme.test"),
            Ok(vec![mailbox("first.last", "sub.acme.test")])
        );
        assert_eq!(
            parse("\"odd local\"@acme.test"),
            Ok(vec![mailbox("\"odd local\"", "acme.test")])
        );
    }

    #[test]
    fn comments_are_ignored_wherever_they_are() {
        let alice = Ok(vec![mailbox("alice", "acme.test")]);
        assert_eq!(parse("(evil@other.test) alice@acme.test"), alice);
        assert_eq!(parse("alice@acme.test (Alice (the (real) one))"), alice);
        assert_eq!(parse("alice(x)@(y)acme.test"), alice);
        assert_eq!(parse("Alice (<evil@other.test>) <alice@acme.test>"), alice);
        assert_eq!(
            parse("alice@acme.test (unbalanced"),
            Err(AddressError::UnterminatedComment)
        );
        assert_eq!(parse("alice@acme.test (a \\) b)"), alice);
    }

    #[test]
    fn an_address_inside_a_display_name_is_not_the_address() {
        assert_eq!(
            parse("\"alice@acme.test\" <evil@other.test>"),
            Ok(vec![mailbox("evil", "other.test")])
        );
        assert_eq!(
            parse("\"Alice <alice@acme.test>\" <evil@other.test>"),
            Ok(vec![mailbox("evil", "other.test")])
        );
        assert_eq!(
            parse("\"evil@other.test, x\" <alice@acme.test>"),
            Ok(vec![mailbox("alice", "acme.test")])
        );
        assert_eq!(
            parse("\"a \\\" <evil@other.test>\" <alice@acme.test>"),
            Ok(vec![mailbox("alice", "acme.test")])
        );
    }

    #[test]
    fn encoded_words_are_display_names_only() {
        assert_eq!(
            parse("=?utf-8?q?evil=40other.test?= <alice@acme.test>"),
            Ok(vec![mailbox("alice", "acme.test")])
        );
        assert_eq!(
            parse("=?utf-8?b?YWxpY2VAYWNtZS50ZXN0?= <evil@other.test>"),
            Ok(vec![mailbox("evil", "other.test")])
        );
    }

    #[test]
    fn several_addresses_and_groups_are_seen() {
        assert_eq!(
            parse("alice@acme.test, evil@other.test"),
            Ok(vec![
                mailbox("alice", "acme.test"),
                mailbox("evil", "other.test")
            ])
        );
        assert_eq!(
            parse("Friends: alice@acme.test, Bob <bob@acme.test>;"),
            Ok(vec![Address::Group {
                members: vec![
                    Mailbox {
                        local_part: "alice".into(),
                        domain: "acme.test".into()
                    },
                    Mailbox {
                        local_part: "bob".into(),
                        domain: "acme.test".into()
                    }
                ]
            }])
        );
        assert_eq!(
            parse("undisclosed-recipients:;"),
            Ok(vec![Address::Group { members: vec![] }])
        );
    }

    #[test]
    fn ambiguous_or_broken_values_are_refused() {
        for value in [
            "",
            "   ",
            "Alice",
            "alice@acme.test <evil@other.test>",
            "alice@acme.test@other.test",
            "<@route.test:alice@acme.test>",
            "alice@[192.0.2.1]",
            "alice@",
            "@acme.test",
            "alice@acme..test",
            "alice@acme.test.",
            ".alice@acme.test",
            "\"alice@acme.test",
            "<alice@acme.test",
            "alice@acme.test>",
            "alice@acme.test;",
            "alice@acme.test,",
            ", alice@acme.test",
            "Group: alice@acme.test",
            "alice@\"acme.test\"",
            "alice\u{1}@acme.test",
        ] {
            assert!(
                parse(value).is_err(),
                "{value:?} was accepted: {:?}",
                parse(value)
            );
        }
    }

    #[test]
    fn folded_values_are_read_across_lines() {
        assert_eq!(
            parse("Alice\r\n <alice@acme.test>"),
            Ok(vec![mailbox("alice", "acme.test")])
        );
    }
}
