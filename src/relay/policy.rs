//! The sender policy: which envelope and header senders an authenticated
//! tenant may use. Pure: it sees a [`Grant`] and the message, nothing else.
//!
//! This is what stops one tenant from spoofing another. A tenant may send
//! only as domains that are both its own and served by this relay (the
//! operator renders only verified, non-conflicting domains), with exactly
//! one From header naming exactly one mailbox. Everything ambiguous is
//! refused, because receivers differ in how they read ambiguous headers.

use std::collections::BTreeMap;

use super::address::{Address, AddressError, parse_address_list};
use super::message::{HeaderField, HeaderSection, MalformedMessage};
use super::path::ReversePath;

/// What one tenant may send as: its domains that this relay serves, each
/// with its return-path (MAIL FROM) domain when one is configured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    /// Lowercase domain → lowercase `<returnPath>.<domain>`, if any.
    domains: BTreeMap<String, Option<String>>,
}

impl Grant {
    /// Grants `domain` (with its full return-path domain, if any).
    pub fn allow(&mut self, domain: &str, return_path_domain: Option<&str>) {
        self.domains.insert(
            domain.to_ascii_lowercase(),
            return_path_domain.map(str::to_ascii_lowercase),
        );
    }

    pub fn is_empty(&self) -> bool {
        self.domains.is_empty()
    }

    fn header_domain(&self, domain: &str) -> Option<&str> {
        self.domains.get_key_value(domain).map(|(d, _)| d.as_str())
    }

    fn envelope_domain_allowed(&self, domain: &str) -> bool {
        self.domains.contains_key(domain)
            || self
                .domains
                .values()
                .any(|return_path| return_path.as_deref() == Some(domain))
    }
}

/// Why a sender was refused. Variant names are the `reason` metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("authentication required")]
    NotAuthenticated,
    #[error("MAIL FROM domain {domain} is not one of your verified domains on this relay")]
    EnvelopeDomainNotAllowed { domain: String },
    #[error("the message has no From header")]
    NoFromHeader,
    #[error("the message has {count} From headers; exactly one is required")]
    SeveralFromHeaders { count: usize },
    #[error("the From header must name exactly one address, not a group")]
    FromIsGroup,
    #[error("the From header names {count} addresses; exactly one is required")]
    SeveralFromAddresses { count: usize },
    #[error("the From header cannot be parsed: {0}")]
    UnparseableFrom(AddressError),
    #[error("From domain {domain} is not one of your verified domains on this relay")]
    HeaderDomainNotAllowed { domain: String },
    #[error("malformed message: {0}")]
    MalformedMessage(MalformedMessage),
}

impl Refusal {
    /// A short, stable label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotAuthenticated => "not_authenticated",
            Refusal::EnvelopeDomainNotAllowed { .. } => "envelope_domain_not_allowed",
            Refusal::NoFromHeader => "no_from_header",
            Refusal::SeveralFromHeaders { .. } => "several_from_headers",
            Refusal::FromIsGroup => "from_is_group",
            Refusal::SeveralFromAddresses { .. } => "several_from_addresses",
            Refusal::UnparseableFrom(_) => "unparseable_from",
            Refusal::HeaderDomainNotAllowed { .. } => "header_domain_not_allowed",
            Refusal::MalformedMessage(_) => "malformed_message",
        }
    }
}

/// Checks the MAIL FROM reverse path, as parsed: the domain judged is the
/// one that goes upstream. The null reverse path (`<>`, for bounces and
/// auto-replies) is allowed: the From header check still decides what the
/// message may claim to be.
pub fn check_envelope_sender(grant: &Grant, reverse_path: &ReversePath) -> Result<(), Refusal> {
    let ReversePath::Mailbox(mailbox) = reverse_path else {
        return Ok(());
    };
    if grant.envelope_domain_allowed(mailbox.domain()) {
        Ok(())
    } else {
        Err(Refusal::EnvelopeDomainNotAllowed {
            domain: mailbox.domain().to_string(),
        })
    }
}

/// Checks the message's From header, in the header split the signer uses,
/// and returns the domain to sign for.
pub fn check_header_sender<'g>(
    grant: &'g Grant,
    section: &HeaderSection<'_>,
) -> Result<&'g str, Refusal> {
    let from_fields: Vec<&HeaderField<'_>> = section
        .fields
        .iter()
        .filter(|field| field.name.eq_ignore_ascii_case("From"))
        .collect();
    let from = match from_fields.as_slice() {
        [] => return Err(Refusal::NoFromHeader),
        [one] => one,
        several => {
            return Err(Refusal::SeveralFromHeaders {
                count: several.len(),
            });
        }
    };
    let addresses = parse_address_list(from.value).map_err(Refusal::UnparseableFrom)?;
    let mailbox = match addresses.as_slice() {
        [Address::Mailbox(mailbox)] => mailbox,
        [Address::Group { .. }] => return Err(Refusal::FromIsGroup),
        several => {
            return Err(Refusal::SeveralFromAddresses {
                count: several.len(),
            });
        }
    };
    grant
        .header_domain(&mailbox.domain)
        .ok_or_else(|| Refusal::HeaderDomainNotAllowed {
            domain: mailbox.domain.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::message::header_section;
    use crate::relay::path::parse_reverse_path;

    fn acme() -> Grant {
        let mut grant = Grant::default();
        grant.allow("acme.test", Some("bounces.acme.test"));
        grant.allow("Acme-Mail.test", None);
        grant
    }

    fn message(headers: &str) -> Vec<u8> {
        format!("{headers}To: bob@example.net\r\nSubject: hi\r\n\r\nFrom: body line\r\n")
            .into_bytes()
    }

    fn header_check(headers: &str) -> Result<String, Refusal> {
        header_check_raw(&message(headers))
    }

    fn header_check_raw(message: &[u8]) -> Result<String, Refusal> {
        let section = header_section(message).map_err(Refusal::MalformedMessage)?;
        check_header_sender(&acme(), &section).map(str::to_string)
    }

    fn envelope(grant: &Grant, sender: &str) -> Result<(), Refusal> {
        let path = if sender.is_empty() {
            "<>".to_string()
        } else {
            format!("<{sender}>")
        };
        let (reverse_path, _) = parse_reverse_path(path.as_bytes()).expect("a valid path");
        check_envelope_sender(grant, &reverse_path)
    }

    #[test]
    fn own_domains_and_the_return_path_are_allowed_in_mail_from() {
        let grant = acme();
        assert_eq!(envelope(&grant, "alice@acme.test"), Ok(()));
        assert_eq!(envelope(&grant, "ALICE@ACME.TEST"), Ok(()));
        assert_eq!(envelope(&grant, "b+1@bounces.acme.test"), Ok(()));
        assert_eq!(envelope(&grant, "x@acme-mail.test"), Ok(()));
        assert_eq!(envelope(&grant, ""), Ok(()));
    }

    #[test]
    fn other_domains_are_refused_in_mail_from() {
        let grant = acme();
        for sender in [
            "evil@other.test",
            "alice@sub.acme.test",
            "alice@acme.test.other.test",
            "alice@other-acme.test",
            "\"alice@acme.test\"@other.test",
        ] {
            assert!(
                matches!(
                    envelope(&grant, sender),
                    Err(Refusal::EnvelopeDomainNotAllowed { .. })
                ),
                "{sender}"
            );
        }
    }

    #[test]
    fn a_tenant_without_domains_may_send_as_nobody() {
        let grant = Grant::default();
        assert!(envelope(&grant, "alice@acme.test").is_err());
        let message = message("From: alice@acme.test\r\n");
        let section = header_section(&message).unwrap();
        assert!(check_header_sender(&grant, &section).is_err());
    }

    #[test]
    fn a_single_own_from_address_gives_the_signing_domain() {
        assert_eq!(
            header_check("From: alice@acme.test\r\n"),
            Ok("acme.test".into())
        );
        assert_eq!(
            header_check("From: \"Alice, Inc.\" <alice@ACME.test>\r\n"),
            Ok("acme.test".into())
        );
        assert_eq!(
            header_check("from: Alice\r\n <x@acme-mail.test>\r\n"),
            Ok("acme-mail.test".into())
        );
        assert_eq!(
            header_check("From: =?utf-8?q?Ev=40il?= <alice@acme.test> (comment)\r\n"),
            Ok("acme.test".into())
        );
    }

    #[test]
    fn the_return_path_domain_is_not_a_from_domain() {
        assert_eq!(
            header_check("From: alice@bounces.acme.test\r\n"),
            Err(Refusal::HeaderDomainNotAllowed {
                domain: "bounces.acme.test".into()
            })
        );
    }

    #[test]
    fn another_domain_in_from_is_refused() {
        assert_eq!(
            header_check("From: evil@other.test\r\n"),
            Err(Refusal::HeaderDomainNotAllowed {
                domain: "other.test".into()
            })
        );
    }

    #[test]
    fn display_name_tricks_are_refused() {
        for from in [
            "From: \"alice@acme.test\" <evil@other.test>\r\n",
            "From: \"Alice <alice@acme.test>\" <evil@other.test>\r\n",
            "From: alice@acme.test <evil@other.test>\r\n",
            "From: (alice@acme.test) evil@other.test\r\n",
            "From: =?utf-8?b?YWxpY2VAYWNtZS50ZXN0?= <evil@other.test>\r\n",
            "From: <evil@other.test> alice@acme.test\r\n",
            "From: alice@acme.test@other.test\r\n",
            "From: <@acme.test:evil@other.test>\r\n",
        ] {
            assert!(header_check(from).is_err(), "{from:?} was accepted");
        }
    }

    #[test]
    fn several_from_headers_are_refused() {
        assert_eq!(
            header_check("From: alice@acme.test\r\nFrom: evil@other.test\r\n"),
            Err(Refusal::SeveralFromHeaders { count: 2 })
        );
        assert_eq!(
            header_check("From: alice@acme.test\r\nFROM: alice@acme.test\r\n"),
            Err(Refusal::SeveralFromHeaders { count: 2 })
        );
    }

    #[test]
    fn a_from_the_signer_would_not_see_as_from_is_refused() {
        // The signer matches names exactly: "From " is not From to it, so
        // the policy must not take it for From either.
        for headers in [
            "From : evil@other.test\r\n",
            "From: alice@acme.test\r\nFROM : evil@other.test\r\n",
            "From : alice@acme.test\r\n",
        ] {
            assert!(
                matches!(header_check(headers), Err(Refusal::MalformedMessage(_))),
                "{headers:?}: {:?}",
                header_check(headers)
            );
        }
    }

    #[test]
    fn several_addresses_and_groups_are_refused() {
        assert_eq!(
            header_check("From: alice@acme.test, evil@other.test\r\n"),
            Err(Refusal::SeveralFromAddresses { count: 2 })
        );
        assert_eq!(
            header_check("From: alice@acme.test, bob@acme.test\r\n"),
            Err(Refusal::SeveralFromAddresses { count: 2 })
        );
        assert_eq!(
            header_check("From: Team: alice@acme.test;\r\n"),
            Err(Refusal::FromIsGroup)
        );
        assert_eq!(header_check("From: Team:;\r\n"), Err(Refusal::FromIsGroup));
    }

    #[test]
    fn missing_or_broken_from_is_refused() {
        assert_eq!(header_check(""), Err(Refusal::NoFromHeader));
        assert!(matches!(
            header_check("From: \"alice@acme.test\r\n"),
            Err(Refusal::UnparseableFrom(_))
        ));
        assert!(matches!(
            header_check("From:\r\n"),
            Err(Refusal::UnparseableFrom(AddressError::Empty))
        ));
        assert!(matches!(
            header_check_raw(b"From: alice@acme.test\r\nbroken line\r\n\r\n"),
            Err(Refusal::MalformedMessage(_))
        ));
    }

    #[test]
    fn a_from_line_in_the_body_is_not_a_header() {
        // The body of `message()` has a `From:` line; only one header counts.
        assert_eq!(
            header_check("From: alice@acme.test\r\n"),
            Ok("acme.test".into())
        );
    }
}
