//! DKIM signing: the domain's Active key(s), relaxed/relaxed, every header
//! a receiver shows or acts on over-signed (RFC 6376 §8.15). The signature
//! headers are prepended; the message is otherwise what the session made of
//! it (see [`super::message::add_missing_fields`]).

use mail_auth::common::crypto::DkimKey;
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};

use crate::api::KeyAlgorithm;
use crate::dkim::{KeyError, PrivateKeyPem, signing_key_from_pem};

/// Headers a receiver shows (From, To, Subject...), acts on (Reply-To,
/// List-Unsubscribe, Content-Type...) or threads by.
pub const OVER_SIGNED_HEADERS: [&str; 16] = [
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
];

/// What the signer is told to sign: each of [`OVER_SIGNED_HEADERS`] twice.
/// mail-auth signs every instance present of a listed name, and lists
/// again, as absent, each listed entry it found no instance for; naming a
/// header twice therefore signs all its instances plus one absent one
/// ("over-signing"), and a verifier fails if anyone adds another instance
/// after us — above the signed ones or anywhere else. A header the message
/// lacks is signed as absent, which stops it being added later.
pub const SIGNED_HEADERS: [&str; 32] = {
    let mut list = [""; 32];
    let mut index = 0;
    while index < OVER_SIGNED_HEADERS.len() {
        list[2 * index] = OVER_SIGNED_HEADERS[index];
        list[2 * index + 1] = OVER_SIGNED_HEADERS[index];
        index += 1;
    }
    list
};

/// One Active key, ready to sign for its domain.
pub struct DomainSigner {
    pub selector: String,
    pub algorithm: KeyAlgorithm,
    signer: DkimSigner<DkimKey, Done>,
}

impl std::fmt::Debug for DomainSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DomainSigner")
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl DomainSigner {
    /// Parses the stored key. CPU-bound (RSA key checks): done at config
    /// load, never per message.
    pub fn new(
        domain: &str,
        selector: &str,
        algorithm: KeyAlgorithm,
        pem: &PrivateKeyPem,
    ) -> Result<Self, KeyError> {
        let key = signing_key_from_pem(algorithm, pem)?;
        let signer = DkimSigner::from_key(key)
            .domain(domain)
            .selector(selector)
            .headers(SIGNED_HEADERS)
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed);
        Ok(Self {
            selector: selector.to_string(),
            algorithm,
            signer,
        })
    }
}

/// One DKIM-Signature header per signer, to go in front of `message`.
pub fn signature_headers(
    signers: &[DomainSigner],
    message: &[u8],
) -> Result<Vec<u8>, mail_auth::Error> {
    let mut headers = Vec::with_capacity(600 * signers.len());
    for signer in signers {
        signer.signer.sign(message)?.write_header(&mut headers);
    }
    Ok(headers)
}

/// Returns `message` with one DKIM-Signature header per signer prepended.
pub fn sign_message(signers: &[DomainSigner], message: &[u8]) -> Result<Vec<u8>, mail_auth::Error> {
    let mut signed = signature_headers(signers, message)?;
    signed.extend_from_slice(message);
    Ok(signed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dkim::{NewKey, generate};

    const MESSAGE: &[u8] = b"From: Alice <alice@acme.test>\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello\r\n.. not a dot\r\n";

    fn signer(algorithm: KeyAlgorithm) -> DomainSigner {
        let key = generate(&NewKey {
            selector: "s1".into(),
            algorithm,
            size: (algorithm == KeyAlgorithm::Rsa).then_some(2048),
            generation: 1,
        })
        .unwrap();
        DomainSigner::new("acme.test", "s1", algorithm, &key.private_key_pem).unwrap()
    }

    #[test]
    fn signatures_are_prepended_and_the_message_is_unchanged() {
        let signers = [signer(KeyAlgorithm::Rsa), signer(KeyAlgorithm::Ed25519)];
        let signed = sign_message(&signers, MESSAGE).unwrap();
        assert!(signed.ends_with(MESSAGE));
        let added = String::from_utf8(signed[..signed.len() - MESSAGE.len()].to_vec()).unwrap();
        assert_eq!(added.matches("DKIM-Signature:").count(), 2);
        assert!(added.contains("a=rsa-sha256"));
        assert!(added.contains("a=ed25519-sha256"));
        assert!(added.contains("c=relaxed/relaxed"));
        assert!(added.contains("d=acme.test"));
        assert!(added.ends_with("\r\n"));
    }

    /// The names in the signature's h= tag, lowercase.
    fn signed_names(signed: &[u8]) -> Vec<String> {
        let text = String::from_utf8(signed.to_vec()).unwrap();
        text.split("h=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap()
            .replace(['\r', '\n', ' ', '\t'], "")
            .split(':')
            .map(str::to_ascii_lowercase)
            .collect()
    }

    #[test]
    fn every_shown_header_is_signed_once_more_than_it_appears() {
        let message = b"From: Alice <alice@acme.test>\r\nTo: bob@example.net\r\nSubject: hi\r\n\
            Subject: again\r\nList-Unsubscribe: <https://acme.test/u>\r\n\r\nHello\r\n";
        let signed = sign_message(&[signer(KeyAlgorithm::Ed25519)], message).unwrap();
        let names = signed_names(&signed);
        let count = |name: &str| names.iter().filter(|n| *n == name).count();
        assert_eq!(count("from"), 2, "{names:?}");
        assert_eq!(count("to"), 2, "{names:?}");
        assert_eq!(count("subject"), 3, "{names:?}");
        assert_eq!(count("list-unsubscribe"), 2, "{names:?}");
        // Absent ones are signed as absent, so they cannot be added.
        for absent in [
            "sender",
            "reply-to",
            "cc",
            "date",
            "content-type",
            "list-unsubscribe-post",
        ] {
            assert!(count(absent) >= 1, "{absent} not in {names:?}");
        }
    }
}
