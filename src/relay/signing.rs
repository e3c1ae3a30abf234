//! DKIM signing: the domain's Active key(s), relaxed/relaxed, a standard
//! header set with From over-signed. The signature headers are prepended;
//! nothing else in the message changes.

use mail_auth::common::crypto::DkimKey;
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};

use crate::api::KeyAlgorithm;
use crate::dkim::{KeyError, PrivateKeyPem, signing_key_from_pem};

/// Headers we sign. `From` is listed twice: the second, absent instance
/// ("over-signing") makes a verifier fail if anyone adds another From
/// header after us. Listed headers the message lacks are signed as absent
/// too, which stops them being added later.
pub const SIGNED_HEADERS: [&str; 13] = [
    "From",
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

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

/// Returns `message` with one DKIM-Signature header per signer prepended.
pub fn sign_message(signers: &[DomainSigner], message: &[u8]) -> Result<Vec<u8>, mail_auth::Error> {
    let mut signed = Vec::with_capacity(message.len() + 600 * signers.len());
    for signer in signers {
        signer.signer.sign(message)?.write_header(&mut signed);
    }
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

    #[test]
    fn from_is_over_signed() {
        let signed = sign_message(&[signer(KeyAlgorithm::Ed25519)], MESSAGE).unwrap();
        let text = String::from_utf8(signed).unwrap();
        let h = text
            .split("h=")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap()
            .replace(['\r', '\n', ' ', '\t'], "");
        let names: Vec<&str> = h.split(':').collect();
        assert_eq!(
            names
                .iter()
                .filter(|n| n.eq_ignore_ascii_case("From"))
                .count(),
            2,
            "{h}"
        );
    }
}
