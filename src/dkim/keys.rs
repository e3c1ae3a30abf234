//! DKIM key material: generating key pairs, the public key as DNS publishes
//! it, and loading a stored private key back as a signer.
//!
//! Everything here is synchronous and CPU-bound (RSA generation takes tens to
//! hundreds of milliseconds), so async callers run it on a blocking pool.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use mail_auth::common::crypto::{DkimKey, Ed25519Key, RsaKey, Sha256};
use rcgen::{KeyPair, PublicKeyData as _, RsaKeySize};

use crate::api::{DkimKeyStatus, KeyAlgorithm, KeyState};

/// RSA modulus sizes we generate. Anything smaller is refused by receivers
/// (or soon will be); anything larger does not fit comfortably in DNS.
pub const RSA_KEY_SIZES: [u32; 3] = [2048, 3072, 4096];

/// A key the rotation plan wants generated: what to generate and under which
/// selector it will be published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewKey {
    /// The selector the key will be published under; unique for the domain.
    pub selector: String,
    pub algorithm: KeyAlgorithm,
    /// RSA modulus size in bits; `None` for Ed25519.
    pub size: Option<u32>,
    /// Keys generated together (a `Dual` pair) share a generation.
    pub generation: u32,
}

/// A PKCS#8 PEM private key.
///
/// A newtype so the key cannot reach a log by accident: `Debug` and
/// `Display` print a placeholder, and the bytes are only reachable through
/// [`PrivateKeyPem::expose_secret`], which is easy to find in review.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyPem(String);

impl PrivateKeyPem {
    /// Wraps a PEM text, e.g. one read back from the keys Secret.
    pub fn new(pem: String) -> Self {
        Self(pem)
    }

    /// Wraps the raw bytes of a Secret entry, which must be UTF-8 PEM text.
    pub fn from_secret_bytes(bytes: Vec<u8>) -> Result<Self, KeyError> {
        String::from_utf8(bytes)
            .map(Self)
            .map_err(|_| KeyError::PemNotText)
    }

    /// The PEM text itself. Only for writing it to the Secret or handing it
    /// to a signer; never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyPem(<redacted>)")
    }
}

impl fmt::Display for PrivateKeyPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted private key>")
    }
}

/// A freshly generated key: the private half to store in the Secret, the
/// public half to publish.
#[derive(Clone, Debug)]
pub struct GeneratedKey {
    pub selector: String,
    pub algorithm: KeyAlgorithm,
    /// RSA modulus size in bits; `None` for Ed25519.
    pub size: Option<u32>,
    pub private_key_pem: PrivateKeyPem,
    /// The base64 `p=` value of the DKIM record.
    pub public_key: String,
}

impl GeneratedKey {
    /// The status entry for this key once its private key is stored: a
    /// `Pending` key whose record must now be published. Consumes the key so
    /// the private half cannot travel further by mistake.
    pub fn into_status(self, now: Timestamp, generation: u32) -> DkimKeyStatus {
        DkimKeyStatus {
            selector: self.selector,
            algorithm: self.algorithm,
            size: self.size,
            state: KeyState::Pending,
            generation,
            public_key: self.public_key,
            created_at: Time(now),
            verified_at: None,
            activated_at: None,
            retiring_at: None,
            retired_at: None,
        }
    }
}

/// Why a key could not be generated or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unsupported RSA key size {0:?}: use 2048, 3072 or 4096")]
    UnsupportedRsaKeySize(Option<u32>),

    #[error("Ed25519 keys have a fixed size; a size of {0} bits cannot be requested")]
    SizeForEd25519(u32),

    #[error("generating the {algorithm:?} key for selector {selector} failed: {source}")]
    Generation {
        selector: String,
        algorithm: KeyAlgorithm,
        #[source]
        source: rcgen::Error,
    },

    #[error(
        "the stored private key is not UTF-8 PEM text; replace the Secret entry or remove it so the key is regenerated"
    )]
    PemNotText,

    #[error("the stored private key is not a PKCS#8 PEM key: {0}")]
    InvalidPem(#[source] rcgen::Error),

    #[error(
        "the stored private key is not an {expected:?} key; the Secret entry does not belong to this selector"
    )]
    AlgorithmMismatch { expected: KeyAlgorithm },

    #[error("the stored {algorithm:?} private key cannot be used for signing: {source}")]
    Signer {
        algorithm: KeyAlgorithm,
        #[source]
        source: mail_auth::Error,
    },
}

/// Generates the key pair `request` asks for.
///
/// Synchronous and slow for RSA (up to seconds for 4096 bits): call it from a
/// blocking pool, not from the async runtime.
pub fn generate(request: &NewKey) -> Result<GeneratedKey, KeyError> {
    let key_pair = match request.algorithm {
        KeyAlgorithm::Rsa => {
            let size = rsa_key_size(request.size)?;
            KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, size)
        }
        KeyAlgorithm::Ed25519 => {
            if let Some(size) = request.size {
                return Err(KeyError::SizeForEd25519(size));
            }
            KeyPair::generate_for(&rcgen::PKCS_ED25519)
        }
    }
    .map_err(|source| KeyError::Generation {
        selector: request.selector.clone(),
        algorithm: request.algorithm,
        source,
    })?;

    Ok(GeneratedKey {
        selector: request.selector.clone(),
        algorithm: request.algorithm,
        size: request.size,
        private_key_pem: PrivateKeyPem(key_pair.serialize_pem()),
        public_key: dkim_public_key(request.algorithm, &key_pair),
    })
}

fn rsa_key_size(size: Option<u32>) -> Result<RsaKeySize, KeyError> {
    match size {
        Some(2048) => Ok(RsaKeySize::_2048),
        Some(3072) => Ok(RsaKeySize::_3072),
        Some(4096) => Ok(RsaKeySize::_4096),
        other => Err(KeyError::UnsupportedRsaKeySize(other)),
    }
}

/// The base64 `p=` value for a key pair: the SubjectPublicKeyInfo for RSA
/// (RFC 6376), the bare 32-byte key for Ed25519 (RFC 8463).
fn dkim_public_key(algorithm: KeyAlgorithm, key_pair: &KeyPair) -> String {
    match algorithm {
        KeyAlgorithm::Rsa => BASE64.encode(key_pair.subject_public_key_info()),
        KeyAlgorithm::Ed25519 => BASE64.encode(key_pair.public_key_raw()),
    }
}

/// Parses a stored private key and checks it is of the expected algorithm.
fn parse_private_key(algorithm: KeyAlgorithm, pem: &PrivateKeyPem) -> Result<KeyPair, KeyError> {
    let key_pair = KeyPair::from_pem(pem.expose_secret()).map_err(KeyError::InvalidPem)?;
    let found = if key_pair.algorithm() == &rcgen::PKCS_ED25519 {
        KeyAlgorithm::Ed25519
    } else if key_pair.algorithm() == &rcgen::PKCS_RSA_SHA256 {
        KeyAlgorithm::Rsa
    } else {
        return Err(KeyError::AlgorithmMismatch {
            expected: algorithm,
        });
    };
    if found != algorithm {
        return Err(KeyError::AlgorithmMismatch {
            expected: algorithm,
        });
    }
    Ok(key_pair)
}

/// The base64 `p=` value of a stored private key, to check that the Secret
/// still holds the key whose record is published.
pub fn public_key_from_pem(
    algorithm: KeyAlgorithm,
    pem: &PrivateKeyPem,
) -> Result<String, KeyError> {
    parse_private_key(algorithm, pem).map(|key_pair| dkim_public_key(algorithm, &key_pair))
}

/// Loads a stored private key as a mail-auth signing key for the relay.
pub fn signing_key_from_pem(
    algorithm: KeyAlgorithm,
    pem: &PrivateKeyPem,
) -> Result<DkimKey, KeyError> {
    let key_pair = parse_private_key(algorithm, pem)?;
    let signer_error = |source| KeyError::Signer { algorithm, source };
    match algorithm {
        // `from_key_der` replaces this, but it takes a `rustls_pki_types`
        // type, which is not a dependency of this crate; the deprecated
        // constructor does exactly the same for PKCS#8.
        #[allow(deprecated)]
        KeyAlgorithm::Rsa => RsaKey::<Sha256>::from_pkcs8_der(key_pair.serialized_der())
            .map(DkimKey::Rsa)
            .map_err(signer_error),
        KeyAlgorithm::Ed25519 => Ed25519Key::from_pkcs8_der(key_pair.serialized_der())
            .map(DkimKey::Ed25519)
            .map_err(signer_error),
    }
}

/// The value of the DKIM TXT record for a public key, exactly as the
/// operator expects to find it in DNS.
pub fn dkim_txt_value(algorithm: KeyAlgorithm, public_key_b64: &str) -> String {
    let key_type = match algorithm {
        KeyAlgorithm::Rsa => "rsa",
        KeyAlgorithm::Ed25519 => "ed25519",
    };
    format!("v=DKIM1; k={key_type}; p={public_key_b64}")
}

/// The most a single TXT character-string may hold (RFC 1035).
const TXT_STRING_MAX: usize = 255;

/// Splits a TXT value into character-strings of at most 255 bytes, as zone
/// files and some DNS consoles need for 2048-bit and larger RSA keys.
/// Resolvers concatenate them back without separators. An empty value is one
/// empty string.
pub fn split_txt(value: &str) -> Vec<String> {
    let mut strings = Vec::new();
    let mut rest = value;
    while rest.len() > TXT_STRING_MAX {
        // DKIM values are ASCII; stepping back to a char boundary only
        // matters for arbitrary input and keeps the split lossless.
        let mut cut = TXT_STRING_MAX;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let (head, tail) = rest.split_at(cut);
        strings.push(head.to_string());
        rest = tail;
    }
    strings.push(rest.to_string());
    strings
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::common::parse::TxtRecordParser;
    use mail_auth::common::verify::DomainKey;
    use mail_auth::dkim::DkimSigner;
    use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator, ResolverCache, Txt};
    use std::borrow::Borrow;
    use std::collections::HashMap;
    use std::hash::Hash;
    use std::sync::Mutex;

    const DOMAIN: &str = "acme.example";
    const MESSAGE: &str = "From: Alice <alice@acme.example>\r\n\
        To: Bob <bob@example.net>\r\n\
        Subject: key test\r\n\
        \r\n\
        Hello, this message is signed.\r\n";

    fn request(selector: &str, algorithm: KeyAlgorithm, size: Option<u32>) -> NewKey {
        NewKey {
            selector: selector.into(),
            algorithm,
            size,
            generation: 1,
        }
    }

    /// A TXT cache pre-filled with our records, so mail-auth's real DKIM
    /// verifier runs without touching the network.
    struct Records(Mutex<HashMap<Box<str>, Txt>>);

    impl ResolverCache<Box<str>, Txt> for Records {
        fn get<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().get(name).cloned()
        }

        fn remove<Q>(&self, name: &Q) -> Option<Txt>
        where
            Box<str>: Borrow<Q>,
            Q: Hash + Eq + ?Sized,
        {
            self.0.lock().unwrap().remove(name)
        }

        fn insert(&self, key: Box<str>, value: Txt, _valid_until: std::time::Instant) {
            self.0.lock().unwrap().insert(key, value);
        }
    }

    /// Signs `MESSAGE` with the stored private key and verifies it with
    /// mail-auth against the record we would publish.
    async fn sign_and_verify(key: &GeneratedKey, published: &GeneratedKey) -> DkimResult {
        let signer = signing_key_from_pem(key.algorithm, &key.private_key_pem).unwrap();
        let signature = DkimSigner::from_key(signer)
            .domain(DOMAIN)
            .selector(&key.selector)
            .headers(["From", "To", "Subject"])
            .sign(MESSAGE.as_bytes())
            .unwrap();
        let signed = format!("{}{MESSAGE}", signature.to_header());

        let record = dkim_txt_value(published.algorithm, &published.public_key);
        let domain_key = DomainKey::parse(record.as_bytes()).unwrap();
        let records = Records(Mutex::new(HashMap::from([(
            format!("{}._domainkey.{DOMAIN}.", key.selector).into_boxed_str(),
            Txt::from(domain_key),
        )])));

        let message = AuthenticatedMessage::parse(signed.as_bytes()).unwrap();
        // Building the resolver does no I/O; every lookup hits `records`.
        let authenticator = MessageAuthenticator::new_cloudflare().unwrap();
        let outputs = authenticator
            .verify_dkim(mail_auth::Parameters::new(&message).with_txt_cache(&records))
            .await;
        assert_eq!(outputs.len(), 1);
        outputs[0].result().clone()
    }

    #[tokio::test]
    async fn rsa_key_signs_mail_that_verifies_against_its_record() {
        let key = generate(&request("ma20261126a", KeyAlgorithm::Rsa, Some(2048))).unwrap();
        assert_eq!(key.size, Some(2048));
        assert!(
            key.private_key_pem
                .expose_secret()
                .starts_with("-----BEGIN PRIVATE KEY-----")
        );
        assert_eq!(sign_and_verify(&key, &key).await, DkimResult::Pass);
    }

    #[tokio::test]
    async fn ed25519_key_signs_mail_that_verifies_against_its_record() {
        let key = generate(&request("ma20261126a-ed", KeyAlgorithm::Ed25519, None)).unwrap();
        assert_eq!(key.size, None);
        assert_eq!(BASE64.decode(&key.public_key).unwrap().len(), 32);
        assert_eq!(sign_and_verify(&key, &key).await, DkimResult::Pass);
    }

    #[tokio::test]
    async fn a_signature_does_not_verify_against_another_keys_record() {
        let key = generate(&request("ma20261126a", KeyAlgorithm::Ed25519, None)).unwrap();
        let other = generate(&request("ma20261126a", KeyAlgorithm::Ed25519, None)).unwrap();
        assert!(matches!(
            sign_and_verify(&key, &other).await,
            DkimResult::Fail(_)
        ));
    }

    #[test]
    fn the_public_key_is_derived_again_from_the_stored_private_key() {
        for (algorithm, size) in [
            (KeyAlgorithm::Rsa, Some(2048)),
            (KeyAlgorithm::Ed25519, None),
        ] {
            let key = generate(&request("s", algorithm, size)).unwrap();
            assert_eq!(
                public_key_from_pem(algorithm, &key.private_key_pem).unwrap(),
                key.public_key
            );
        }
    }

    #[test]
    fn larger_rsa_sizes_are_generated_at_the_requested_size() {
        // 3072 rather than 4096: same code path, a fraction of the time.
        let key = generate(&request("s", KeyAlgorithm::Rsa, Some(3072))).unwrap();
        let spki = BASE64.decode(&key.public_key).unwrap();
        // 3072-bit modulus (384 bytes) plus ASN.1 framing.
        assert!((384..450).contains(&spki.len()), "{}", spki.len());
    }

    #[test]
    fn unsupported_sizes_are_refused() {
        for size in [None, Some(1024), Some(8192)] {
            assert!(matches!(
                generate(&request("s", KeyAlgorithm::Rsa, size)),
                Err(KeyError::UnsupportedRsaKeySize(s)) if s == size
            ));
        }
        assert!(matches!(
            generate(&request("s", KeyAlgorithm::Ed25519, Some(2048))),
            Err(KeyError::SizeForEd25519(2048))
        ));
    }

    #[test]
    fn a_stored_key_of_the_wrong_algorithm_is_refused() {
        let key = generate(&request("s", KeyAlgorithm::Ed25519, None)).unwrap();
        assert!(matches!(
            signing_key_from_pem(KeyAlgorithm::Rsa, &key.private_key_pem),
            Err(KeyError::AlgorithmMismatch {
                expected: KeyAlgorithm::Rsa
            })
        ));
        assert!(matches!(
            signing_key_from_pem(KeyAlgorithm::Ed25519, &PrivateKeyPem::new("junk".into())),
            Err(KeyError::InvalidPem(_))
        ));
        assert!(matches!(
            PrivateKeyPem::from_secret_bytes(vec![0xff, 0xfe]),
            Err(KeyError::PemNotText)
        ));
    }

    #[test]
    fn the_private_key_never_appears_in_debug_or_display_output() {
        let key = generate(&request("s", KeyAlgorithm::Ed25519, None)).unwrap();
        let pem = key.private_key_pem.expose_secret().to_string();
        let body = pem.lines().nth(1).unwrap();
        for printed in [
            format!("{key:?}"),
            format!("{key:#?}"),
            format!("{}", key.private_key_pem),
            format!("{:?}", key.private_key_pem),
        ] {
            assert!(!printed.contains(body), "leaked: {printed}");
            assert!(!printed.contains("BEGIN"), "leaked: {printed}");
        }
    }

    #[test]
    fn into_status_makes_a_pending_key() {
        let now: Timestamp = "2026-11-26T10:00:00Z".parse().unwrap();
        let key = generate(&request("ma20261126a-ed", KeyAlgorithm::Ed25519, None)).unwrap();
        let public_key = key.public_key.clone();
        let status = key.into_status(now, 3);
        assert_eq!(status.selector, "ma20261126a-ed");
        assert_eq!(status.state, KeyState::Pending);
        assert_eq!(status.generation, 3);
        assert_eq!(status.public_key, public_key);
        assert_eq!(status.created_at, Time(now));
        assert_eq!(status.activated_at, None);
    }

    #[test]
    fn txt_values_match_the_rfcs() {
        assert_eq!(
            dkim_txt_value(KeyAlgorithm::Rsa, "MIIB"),
            "v=DKIM1; k=rsa; p=MIIB"
        );
        assert_eq!(
            dkim_txt_value(KeyAlgorithm::Ed25519, "11qY"),
            "v=DKIM1; k=ed25519; p=11qY"
        );
    }

    #[test]
    fn txt_values_are_split_into_strings_of_at_most_255_bytes() {
        assert_eq!(split_txt(""), vec![String::new()]);
        assert_eq!(split_txt("short"), vec!["short".to_string()]);
        let exact = "a".repeat(255);
        assert_eq!(split_txt(&exact), vec![exact.clone()]);

        let value = "x".repeat(600);
        let strings = split_txt(&value);
        assert_eq!(
            strings.iter().map(String::len).collect::<Vec<_>>(),
            [255, 255, 90]
        );
        assert_eq!(strings.concat(), value);

        // Never splits inside a multi-byte character.
        let wide = "é".repeat(200);
        let strings = split_txt(&wide);
        assert!(strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), wide);
    }
}
