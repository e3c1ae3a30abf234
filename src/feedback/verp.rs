//! VERP envelope senders with an authenticated tag.
//!
//! Mail a tenant sends through the relay gets the envelope sender
//! `b+<tag>@<return-path domain>`, one per recipient, where the tag is an
//! HMAC-SHA256 (key kept by the operator in a Secret) over the tenant
//! domain and the recipient, truncated to 128 bits. A bounce or complaint
//! names the recipient (`Final-Recipient`, `Original-Rcpt-To`) and comes
//! back to that address; it counts only when the tag verifies for that
//! domain and recipient, so nobody who has not seen our mail to a
//! recipient can get it suppressed, nor move another tenant's counts.
//!
//! The recipient is not in the address (local parts are limited to 64
//! octets, addresses are not): the report names it, and the tag proves it.

use aws_lc_rs::{constant_time, hmac};

/// The local part's prefix.
pub const PREFIX: &str = "b+";

/// Bytes of the MAC kept in the tag: 128 bits, hex.
const TAG_BYTES: usize = 16;

/// The shortest key accepted.
pub const MIN_KEY_BYTES: usize = 32;

/// The key tags are made and checked with.
pub struct VerpKey(hmac::Key);

impl std::fmt::Debug for VerpKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VerpKey(..)")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a VERP key must have at least {MIN_KEY_BYTES} bytes")]
pub struct ShortKey;

impl VerpKey {
    pub fn new(secret: &[u8]) -> Result<Self, ShortKey> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(ShortKey);
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, secret)))
    }

    /// The tag for mail of `tenant_domain` to `recipient`.
    pub fn tag(&self, tenant_domain: &str, recipient: &str) -> String {
        let mac = hmac::sign(&self.0, &message(tenant_domain, recipient));
        mac.as_ref()[..TAG_BYTES]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The envelope sender for mail of `tenant_domain` to `recipient`, at
    /// the tenant's return-path domain.
    pub fn envelope_sender(
        &self,
        tenant_domain: &str,
        return_path_domain: &str,
        recipient: &str,
    ) -> String {
        format!(
            "{PREFIX}{}@{return_path_domain}",
            self.tag(tenant_domain, recipient)
        )
    }

    /// Whether `address` (where a bounce or complaint came back to, or
    /// the original envelope sender an ARF report names) carries the tag of
    /// `tenant_domain` and `recipient`. Compared in constant time.
    pub fn verify(&self, address: &str, tenant_domain: &str, recipient: &str) -> bool {
        let Some(tag) = tag_of(address) else {
            return false;
        };
        let expected = self.tag(tenant_domain, recipient);
        constant_time::verify_slices_are_equal(tag.as_bytes(), expected.as_bytes()).is_ok()
    }
}

/// The tag of a VERP address (`b+<tag>@domain`, or its local part alone),
/// if it looks like one.
pub fn tag_of(address: &str) -> Option<&str> {
    let address = address.trim().trim_start_matches('<').trim_end_matches('>');
    let local = address.split_once('@').map_or(address, |(local, _)| local);
    let tag = local.strip_prefix(PREFIX)?;
    (tag.len() == TAG_BYTES * 2 && tag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(tag)
}

/// What is MACed: a version, the domain and the recipient, lowercase (the
/// same recipient in another case is the same mailbox in practice, and a
/// receiver may change the case it reports).
fn message(tenant_domain: &str, recipient: &str) -> Vec<u8> {
    format!(
        "mailauth-verp-v1\0{}\0{}",
        tenant_domain.trim_end_matches('.').to_ascii_lowercase(),
        recipient.trim().to_ascii_lowercase()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fill: u8) -> VerpKey {
        VerpKey::new(&[fill; 32]).unwrap()
    }

    #[test]
    fn a_tag_verifies_only_for_its_domain_recipient_and_key() {
        let k = key(1);
        let sender = k.envelope_sender("acme.example", "bounce.acme.example", "bob@example.net");
        assert!(sender.starts_with("b+") && sender.ends_with("@bounce.acme.example"));
        let local = sender.split('@').next().unwrap();
        assert!(
            local.len() <= 64,
            "a local part is at most 64 octets: {local}"
        );
        assert!(k.verify(&sender, "acme.example", "bob@example.net"));
        assert!(k.verify(&format!("<{sender}>"), "acme.example", "Bob@Example.NET"));
        assert!(!k.verify(&sender, "acme.example", "carol@example.net"));
        assert!(!k.verify(&sender, "globex.example", "bob@example.net"));
        assert!(!key(2).verify(&sender, "acme.example", "bob@example.net"));
    }

    #[test]
    fn forged_and_malformed_tags_never_verify() {
        let k = key(1);
        let good = k.tag("acme.example", "bob@example.net");
        let mut flipped = good.clone().into_bytes();
        flipped[0] = if flipped[0] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        for address in [
            format!("b+{flipped}@bounce.acme.example"),
            format!("b+{}@bounce.acme.example", &good[..31]),
            format!("b+{good}0@bounce.acme.example"),
            format!("x+{good}@bounce.acme.example"),
            "b+@bounce.acme.example".to_string(),
            String::new(),
        ] {
            assert!(
                !k.verify(&address, "acme.example", "bob@example.net"),
                "{address}"
            );
        }
    }

    #[test]
    fn short_keys_are_refused() {
        assert_eq!(VerpKey::new(&[0; 31]).unwrap_err(), ShortKey);
        assert_eq!(format!("{:?}", key(9)), "VerpKey(..)");
    }
}
