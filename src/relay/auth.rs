//! Tenant credentials: the password hash the operator renders into the
//! relay config, and decoding the SMTP AUTH PLAIN and LOGIN exchanges.
//!
//! The password is 32 random bytes the operator generated, so a salted
//! SHA-256 is enough (no slow KDF is needed against guessing a 256-bit
//! secret); what matters is that the relay never holds the password itself
//! and compares in constant time.

use std::fmt;

use aws_lc_rs::digest;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The only scheme we write and accept: `sha256$<salt>$<digest>`.
const SCHEME: &str = "sha256";

/// `sha256$<salt, base64>$<SHA-256(salt || password), base64>`: what the
/// operator stores for a tenant in the relay config.
pub fn hash_password(password: &str, salt: &[u8]) -> String {
    let hash = salted_digest(salt, password.as_bytes());
    format!(
        "{SCHEME}${}${}",
        BASE64.encode(salt),
        BASE64.encode(hash.as_ref())
    )
}

fn salted_digest(salt: &[u8], password: &[u8]) -> digest::Digest {
    let mut context = digest::Context::new(&digest::SHA256);
    context.update(salt);
    context.update(password);
    context.finish()
}

/// A parsed `password_hash`, ready to check passwords against.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash {
    salt: Vec<u8>,
    digest: Vec<u8>,
}

impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

/// Why a stored hash cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("password hash is not `sha256$<salt base64>$<digest base64>` with a 32-byte digest")]
pub struct MalformedPasswordHash;

impl PasswordHash {
    pub fn parse(text: &str) -> Result<Self, MalformedPasswordHash> {
        let mut parts = text.split('$');
        let (Some(SCHEME), Some(salt), Some(digest), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(MalformedPasswordHash);
        };
        let salt = BASE64.decode(salt).map_err(|_| MalformedPasswordHash)?;
        let digest = BASE64.decode(digest).map_err(|_| MalformedPasswordHash)?;
        if digest.len() != digest::SHA256_OUTPUT_LEN {
            return Err(MalformedPasswordHash);
        }
        Ok(Self { salt, digest })
    }

    /// Whether `password` hashes to this value, compared in constant time.
    pub fn matches(&self, password: &[u8]) -> bool {
        let candidate = salted_digest(&self.salt, password);
        aws_lc_rs::constant_time::verify_slices_are_equal(candidate.as_ref(), &self.digest).is_ok()
    }
}

/// A username and password a client presented.
#[derive(Clone, PartialEq, Eq)]
pub struct PresentedCredentials {
    pub username: String,
    pub password: Vec<u8>,
}

impl fmt::Debug for PresentedCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PresentedCredentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// Why an AUTH exchange could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthDecodeError {
    #[error("the AUTH response is not valid base64")]
    NotBase64,
    #[error("the AUTH PLAIN response is not authzid NUL authcid NUL password")]
    MalformedPlain,
    #[error("the username is not UTF-8")]
    UsernameNotText,
    #[error("logging in as another identity (authzid) is not supported")]
    ForeignAuthorizationIdentity,
}

/// Decodes one base64 line of an AUTH exchange.
pub fn decode_base64_line(line: &[u8]) -> Result<Vec<u8>, AuthDecodeError> {
    let trimmed = line.trim_ascii();
    // "=" stands for an empty initial response (RFC 4954).
    if trimmed == b"=" {
        return Ok(Vec::new());
    }
    BASE64
        .decode(trimmed)
        .map_err(|_| AuthDecodeError::NotBase64)
}

/// Decodes an AUTH PLAIN response (RFC 4616): `[authzid] NUL authcid NUL
/// passwd`. An authzid other than the username would let one tenant act as
/// another, so it is refused.
pub fn decode_plain(line: &[u8]) -> Result<PresentedCredentials, AuthDecodeError> {
    let decoded = decode_base64_line(line)?;
    let mut fields = decoded.split(|byte| *byte == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(AuthDecodeError::MalformedPlain);
    };
    if !authzid.is_empty() && authzid != authcid {
        return Err(AuthDecodeError::ForeignAuthorizationIdentity);
    }
    let username =
        String::from_utf8(authcid.to_vec()).map_err(|_| AuthDecodeError::UsernameNotText)?;
    Ok(PresentedCredentials {
        username,
        password: password.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hash_matches_its_password_and_nothing_else() {
        let stored = hash_password("correct horse", b"0123456789abcdef");
        let hash = PasswordHash::parse(&stored).unwrap();
        assert!(hash.matches(b"correct horse"));
        assert!(!hash.matches(b"correct horsf"));
        assert!(!hash.matches(b""));
    }

    #[test]
    fn the_hash_format_is_the_documented_one() {
        let stored = hash_password("pw", b"salt");
        let expected_digest = {
            let mut input = b"salt".to_vec();
            input.extend_from_slice(b"pw");
            BASE64.encode(digest::digest(&digest::SHA256, &input).as_ref())
        };
        assert_eq!(stored, format!("sha256$c2FsdA==${expected_digest}"));
    }

    #[test]
    fn the_salt_changes_the_hash() {
        assert_ne!(hash_password("pw", b"a"), hash_password("pw", b"b"));
    }

    #[test]
    fn malformed_hashes_are_refused() {
        for text in [
            "",
            "sha256$c2FsdA==",
            "md5$c2FsdA==$AAAA",
            "sha256$c2FsdA==$AAAA",
            "sha256$!!$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "sha256$c2FsdA==$AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=$extra",
        ] {
            assert_eq!(
                PasswordHash::parse(text),
                Err(MalformedPasswordHash),
                "{text}"
            );
        }
    }

    #[test]
    fn auth_plain_is_decoded() {
        let line = BASE64.encode(b"\0alice\0secret");
        let creds = decode_plain(line.as_bytes()).unwrap();
        assert_eq!(creds.username, "alice");
        assert_eq!(creds.password, b"secret");

        let same_authzid = BASE64.encode(b"alice\0alice\0secret");
        assert!(decode_plain(same_authzid.as_bytes()).is_ok());
    }

    #[test]
    fn auth_plain_refuses_acting_as_another_identity() {
        let line = BASE64.encode(b"bob\0alice\0secret");
        assert_eq!(
            decode_plain(line.as_bytes()),
            Err(AuthDecodeError::ForeignAuthorizationIdentity)
        );
    }

    #[test]
    fn malformed_auth_plain_is_refused() {
        assert_eq!(decode_plain(b"***"), Err(AuthDecodeError::NotBase64));
        let two_fields = BASE64.encode(b"alice\0secret");
        assert_eq!(
            decode_plain(two_fields.as_bytes()),
            Err(AuthDecodeError::MalformedPlain)
        );
        let four_fields = BASE64.encode(b"\0alice\0secret\0more");
        assert_eq!(
            decode_plain(four_fields.as_bytes()),
            Err(AuthDecodeError::MalformedPlain)
        );
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let creds = PresentedCredentials {
            username: "alice".into(),
            password: b"hunter2".to_vec(),
        };
        assert!(!format!("{creds:?}").contains("hunter2"));
        let hash = PasswordHash::parse(&hash_password("pw", b"salt")).unwrap();
        assert!(!format!("{hash:?}").contains("c2FsdA"));
    }
}
