//! DKIM: is the record at a selector there, usable by receivers, and
//! carrying our key?
//!
//! A record is judged as a receiver reads it (RFC 6376 3.6.1, RFC 8463 for
//! Ed25519, RFC 8301 for sizes and hashes): the key in `p=` must be a key
//! of the type `k=` names, big enough, not revoked, under a version and
//! hash algorithms receivers know. A record receivers cannot use is a
//! `Mismatch` naming what is wrong, with or without an expected key.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::Serialize;

use super::Verdict;
use super::records::dkim_record_name;
use super::resolver::DnsLookup;

/// The smallest RSA modulus receivers accept (RFC 8301 3.2: smaller keys
/// MUST NOT be considered valid).
pub const MIN_RSA_BITS: u32 = 1024;
/// The smallest RSA modulus that draws no warning (RFC 8301 3.2: signers
/// SHOULD use at least 2048 bits).
pub const RECOMMENDED_RSA_BITS: u32 = 2048;
/// The length of an Ed25519 public key as `p=` carries it (RFC 8463 4).
const ED25519_KEY_BYTES: usize = 32;

/// The check of one selector.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DkimOutcome {
    pub selector: String,
    /// Where the record was looked up.
    pub name: String,
    pub verdict: Verdict,
    /// The key type the record declares (`rsa`, `ed25519`), when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
    /// The RSA modulus size in bits, when `p=` is an RSA key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_bits: Option<u32>,
    /// What receivers still accept but should be fixed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<DkimKeyWarning>,
}

/// What was found at one selector: the verdict and what the record says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkimAssessment {
    pub verdict: Verdict,
    /// The key type the record declares (`k=`, `rsa` when absent).
    pub key_type: Option<String>,
    /// The RSA modulus size in bits, when `p=` is an RSA key.
    pub key_bits: Option<u32>,
    pub warnings: Vec<DkimKeyWarning>,
}

impl DkimAssessment {
    fn without_record(verdict: Verdict) -> Self {
        Self {
            verdict,
            key_type: None,
            key_bits: None,
            warnings: Vec::new(),
        }
    }
}

/// The key types receivers verify (`k=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DkimKeyType {
    Rsa,
    Ed25519,
}

impl DkimKeyType {
    fn tag_value(self) -> &'static str {
        match self {
            Self::Rsa => "rsa",
            Self::Ed25519 => "ed25519",
        }
    }
}

/// Why receivers cannot use a DKIM key record: every signature under it
/// fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum DkimKeyProblem {
    #[error("`{segment}` is not a tag=value pair; receivers reject the whole record")]
    NotATag { segment: String },
    #[error("tag {tag}= appears more than once; receivers reject the whole record (RFC 6376 3.2)")]
    DuplicateTag { tag: String },
    #[error("unknown version v={version}; receivers discard key records that are not v=DKIM1")]
    UnknownVersion { version: String },
    #[error("unknown key type k={key_type}; receivers know k=rsa and k=ed25519")]
    UnknownKeyType { key_type: String },
    #[error(
        "h={listed} allows only sha1; receivers following RFC 8301 reject rsa-sha1 signatures: \
         use h=sha256 or drop h="
    )]
    Sha1Only { listed: String },
    #[error("h={listed} names no hash algorithm receivers use (sha256): use h=sha256 or drop h=")]
    NoKnownHash { listed: String },
    #[error("no p= tag: the record carries no public key")]
    NoPublicKey,
    #[error("the key is revoked (empty p=)")]
    Revoked,
    #[error("p= is not base64")]
    NotBase64,
    #[error(
        "k={declared} but p= holds an Ed25519 key; add k=ed25519 (a record without k= means rsa)",
        declared = DkimKeyType::Rsa.tag_value()
    )]
    Ed25519KeyUnderRsa,
    #[error(
        "k={declared} but p= holds an RSA key ({bits} bits); use k=rsa",
        declared = DkimKeyType::Ed25519.tag_value()
    )]
    RsaKeyUnderEd25519 { bits: u32 },
    #[error(
        "p= ({bytes} bytes) is not an RSA public key: neither a SubjectPublicKeyInfo nor a PKCS#1 \
         RSAPublicKey"
    )]
    NotAnRsaKey { bytes: usize },
    #[error(
        "the RSA key has {bits} bits; receivers reject keys under {MIN_RSA_BITS} bits (RFC 8301): \
         publish a {RECOMMENDED_RSA_BITS}-bit key"
    )]
    RsaKeyTooSmall { bits: u32 },
    #[error(
        "p= is an Ed25519 SubjectPublicKeyInfo; k=ed25519 takes the bare {ED25519_KEY_BYTES}-byte \
         key (RFC 8463)"
    )]
    Ed25519KeyInfo,
    #[error("p= holds {bytes} bytes; an Ed25519 key (k=ed25519) is exactly {ED25519_KEY_BYTES}")]
    Ed25519WrongLength { bytes: usize },
}

/// What receivers accept today but the tenant should fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum DkimKeyWarning {
    #[error(
        "the RSA key has {bits} bits: receivers accept it, but RFC 8301 asks for at least \
         {RECOMMENDED_RSA_BITS}; rotate to a {RECOMMENDED_RSA_BITS}-bit key"
    )]
    WeakRsaKey { bits: u32 },
    #[error(
        "p= is a bare PKCS#1 RSAPublicKey: mail-auth and dkimpy accept it, but OpenDKIM's \
         opendkim-testkey does not match it to its private key; publish the SubjectPublicKeyInfo \
         (`openssl pkey -pubout`)"
    )]
    Pkcs1Encoding,
    #[error("h= lists {unknown}, which receivers ignore")]
    UnknownHashIgnored { unknown: String },
}

/// A DKIM key record receivers can use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsableKeyRecord {
    pub key_type: DkimKeyType,
    /// `p=` as published, whitespace removed.
    pub public_key: String,
    /// The RSA modulus size in bits; `None` for Ed25519.
    pub rsa_bits: Option<u32>,
    pub warnings: Vec<DkimKeyWarning>,
}

/// A key record that failed the checks, with what could still be read
/// from it (for the report).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnusableKeyRecord {
    pub problem: DkimKeyProblem,
    /// `k=` as declared (lowercased), `rsa` when absent; `None` when the
    /// record's tags could not be read.
    pub key_type: Option<String>,
    pub rsa_bits: Option<u32>,
}

/// base64 as DNS consoles publish it: padding optional, stray trailing
/// bits tolerated, as the base64 decoders of receivers are.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Looks up `<selector>._domainkey.<domain>` and assesses it. Without an
/// expected key (the CLI only knows selectors) a record receivers can use
/// is verified. A CNAME at the selector is followed by the resolver.
pub async fn check_dkim(
    dns: &impl DnsLookup,
    domain: &str,
    selector: &str,
    expected_public_key: Option<&str>,
) -> DkimOutcome {
    let name = dkim_record_name(selector, domain);
    let assessment = check_dkim_record(dns, &name, expected_public_key).await;
    DkimOutcome {
        selector: selector.to_string(),
        name,
        verdict: assessment.verdict,
        key_type: assessment.key_type,
        key_bits: assessment.key_bits,
        warnings: assessment.warnings,
    }
}

/// The assessment of the DKIM record at `name`.
pub async fn check_dkim_record(
    dns: &impl DnsLookup,
    name: &str,
    expected_public_key: Option<&str>,
) -> DkimAssessment {
    match dns.txt(name).await {
        Ok(records) => assess_dkim_records(&records, expected_public_key),
        Err(err) if err.is_absent() => DkimAssessment::without_record(Verdict::Missing {
            reason: err.to_string(),
        }),
        Err(err) => DkimAssessment::without_record(Verdict::Error {
            message: err.to_string(),
        }),
    }
}

/// Judges the TXT records found at a selector (each one's strings already
/// joined).
pub fn assess_dkim_records(
    records: &[String],
    expected_public_key: Option<&str>,
) -> DkimAssessment {
    match records {
        [] => DkimAssessment::without_record(Verdict::Missing {
            reason: "no TXT record at the selector".to_string(),
        }),
        [record] => assess_dkim_record(record, expected_public_key),
        // Verifiers pick one at random: publishing two is a coin toss.
        several => DkimAssessment::without_record(Verdict::Mismatch {
            found: several.join(" | "),
            problem: format!(
                "{} TXT records at the selector; publish exactly one",
                several.len()
            ),
        }),
    }
}

/// Judges one key record: receivers must be able to use it, and when we
/// know the key it must carry (the operator's own records) `p=` must be
/// that key. A record that carries our key but that receivers cannot use
/// (say under `h=sha1`) is not verified.
pub fn assess_dkim_record(record: &str, expected_public_key: Option<&str>) -> DkimAssessment {
    let mismatch = |problem: String| Verdict::Mismatch {
        found: record.to_string(),
        problem,
    };
    match parse_key_record(record) {
        Err(unusable) => DkimAssessment {
            verdict: mismatch(unusable.problem.to_string()),
            key_type: unusable.key_type,
            key_bits: unusable.rsa_bits,
            warnings: Vec::new(),
        },
        Ok(usable) => {
            let verdict = match expected_public_key {
                Some(expected) if without_whitespace(expected) != usable.public_key => {
                    mismatch("the record carries a different public key (p=)".to_string())
                }
                _ => Verdict::Verified,
            };
            DkimAssessment {
                verdict,
                key_type: Some(usable.key_type.tag_value().to_string()),
                key_bits: usable.rsa_bits,
                warnings: usable.warnings,
            }
        }
    }
}

/// Reads a DKIM key record as receivers do and says whether they can
/// verify signatures with it.
///
/// The tags are read here rather than by mail-auth's `DomainKey` parser:
/// that one keeps neither `p=` nor `h=` where we can see them, and takes any
/// bytes in `p=` as a key.
pub fn parse_key_record(record: &str) -> Result<UsableKeyRecord, UnusableKeyRecord> {
    let tags = tag_list(record).map_err(|problem| UnusableKeyRecord {
        problem,
        key_type: None,
        rsa_bits: None,
    })?;
    // RFC 6376 3.6.1: k= defaults to rsa.
    let declared = tag(&tags, "k").map_or_else(
        || DkimKeyType::Rsa.tag_value().to_string(),
        str::to_ascii_lowercase,
    );
    let unusable = |problem, rsa_bits| UnusableKeyRecord {
        problem,
        key_type: Some(declared.clone()),
        rsa_bits,
    };
    if let Some(version) = tag(&tags, "v")
        && version != "DKIM1"
    {
        return Err(unusable(
            DkimKeyProblem::UnknownVersion {
                version: version.to_string(),
            },
            None,
        ));
    }
    let key_type = match declared.as_str() {
        "rsa" => DkimKeyType::Rsa,
        "ed25519" => DkimKeyType::Ed25519,
        other => {
            return Err(unusable(
                DkimKeyProblem::UnknownKeyType {
                    key_type: other.to_string(),
                },
                None,
            ));
        }
    };
    let public_key = match tag(&tags, "p") {
        None => return Err(unusable(DkimKeyProblem::NoPublicKey, None)),
        Some(p) => without_whitespace(p),
    };
    if public_key.is_empty() {
        return Err(unusable(DkimKeyProblem::Revoked, None));
    }
    let warnings = acceptable_hashes(tag(&tags, "h")).map_err(|problem| unusable(problem, None))?;
    let key_bytes = LENIENT_BASE64
        .decode(&public_key)
        .map_err(|_| unusable(DkimKeyProblem::NotBase64, None))?;
    let rsa_bits = match key_type {
        DkimKeyType::Rsa => read_rsa_key(&key_bytes).map(|rsa| rsa.bits),
        DkimKeyType::Ed25519 => None,
    };
    let key_warnings =
        judge_key(key_type, &key_bytes).map_err(|problem| unusable(problem, rsa_bits))?;
    Ok(UsableKeyRecord {
        key_type,
        public_key,
        rsa_bits,
        warnings: warnings.into_iter().chain(key_warnings).collect(),
    })
}

/// `h=`: the hash algorithms the key may be used with (RFC 6376 3.6.1).
/// Unknown names are ignored, so only a list without sha256 is unusable:
/// sha1 is the only other one defined, and RFC 8301 forbids verifying it.
fn acceptable_hashes(listed: Option<&str>) -> Result<Vec<DkimKeyWarning>, DkimKeyProblem> {
    let Some(listed) = listed else {
        return Ok(Vec::new());
    };
    let names: Vec<String> = listed
        .split(':')
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
        .collect();
    let unknown: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|name| !matches!(*name, "sha256" | "sha1"))
        .collect();
    if names.iter().any(|name| name == "sha256") {
        return Ok(if unknown.is_empty() {
            Vec::new()
        } else {
            vec![DkimKeyWarning::UnknownHashIgnored {
                unknown: unknown.join(":"),
            }]
        });
    }
    let listed = listed.to_string();
    if names.iter().any(|name| name == "sha1") {
        Err(DkimKeyProblem::Sha1Only { listed })
    } else {
        Err(DkimKeyProblem::NoKnownHash { listed })
    }
}

/// Whether `bytes` is a key of `key_type` receivers accept, and what they
/// accept but the tenant should fix.
fn judge_key(key_type: DkimKeyType, bytes: &[u8]) -> Result<Vec<DkimKeyWarning>, DkimKeyProblem> {
    match key_type {
        DkimKeyType::Rsa => {
            let Some(rsa) = read_rsa_key(bytes) else {
                return Err(if is_ed25519_key(bytes) {
                    DkimKeyProblem::Ed25519KeyUnderRsa
                } else {
                    DkimKeyProblem::NotAnRsaKey { bytes: bytes.len() }
                });
            };
            if rsa.bits < MIN_RSA_BITS {
                return Err(DkimKeyProblem::RsaKeyTooSmall { bits: rsa.bits });
            }
            let mut warnings = Vec::new();
            if rsa.bits < RECOMMENDED_RSA_BITS {
                warnings.push(DkimKeyWarning::WeakRsaKey { bits: rsa.bits });
            }
            if rsa.bare_pkcs1 {
                warnings.push(DkimKeyWarning::Pkcs1Encoding);
            }
            Ok(warnings)
        }
        DkimKeyType::Ed25519 if bytes.len() == ED25519_KEY_BYTES => Ok(Vec::new()),
        DkimKeyType::Ed25519 => Err(if let Some(rsa) = read_rsa_key(bytes) {
            DkimKeyProblem::RsaKeyUnderEd25519 { bits: rsa.bits }
        } else if is_ed25519_key(bytes) {
            DkimKeyProblem::Ed25519KeyInfo
        } else {
            DkimKeyProblem::Ed25519WrongLength { bytes: bytes.len() }
        }),
    }
}

/// What an RSA public key in `p=` is.
struct RsaKeyFacts {
    bits: u32,
    /// A bare PKCS#1 RSAPublicKey rather than a SubjectPublicKeyInfo.
    bare_pkcs1: bool,
}

/// Reads an RSA public key in either encoding receivers accept: a
/// SubjectPublicKeyInfo (what `openssl pkey -pubout` and the operator
/// publish) or a bare PKCS#1 RSAPublicKey.
///
/// aws-lc-rs does the reading: it is the crate's one crypto backend, the
/// very parser mail-auth's verifier hands DKIM keys to, and it checks the
/// key itself (RSA_check_key), not just its DER shape. x509-parser is in
/// Cargo.lock only as an optional dependency nothing enables; building it
/// would add a second ASN.1 stack for a question aws-lc already answers.
fn read_rsa_key(bytes: &[u8]) -> Option<RsaKeyFacts> {
    use aws_lc_rs::rsa::PublicKey;
    use aws_lc_rs::signature::RsaParameters;

    // `public_modulus_len` reads only the PKCS#1 form; `from_der` reads
    // both and hands back PKCS#1.
    let bare_pkcs1 = RsaParameters::public_modulus_len(bytes).is_ok();
    let key = PublicKey::from_der(bytes).ok()?;
    let bits = RsaParameters::public_modulus_len(key.as_ref()).ok()?;
    Some(RsaKeyFacts { bits, bare_pkcs1 })
}

/// An Ed25519 public key, bare (32 bytes) or as a SubjectPublicKeyInfo.
fn is_ed25519_key(bytes: &[u8]) -> bool {
    use aws_lc_rs::signature::{ED25519, ParsedPublicKey};
    ParsedPublicKey::new(&ED25519, bytes).is_ok()
}

/// The tags of a `tag=value; ...` list (RFC 6376 3.2): names as written
/// (they are case-sensitive), values trimmed. Empty segments, such as the
/// one a trailing `;` leaves, are skipped, as receivers do.
fn tag_list(record: &str) -> Result<Vec<(&str, &str)>, DkimKeyProblem> {
    let mut tags: Vec<(&str, &str)> = Vec::new();
    for segment in record.split(';') {
        if segment.trim().is_empty() {
            continue;
        }
        let Some((name, value)) = segment.split_once('=') else {
            return Err(DkimKeyProblem::NotATag {
                segment: segment.trim().to_string(),
            });
        };
        let name = name.trim();
        if tags.iter().any(|(seen, _)| *seen == name) {
            return Err(DkimKeyProblem::DuplicateTag {
                tag: name.to_string(),
            });
        }
        tags.push((name, value.trim()));
    }
    Ok(tags)
}

fn tag<'a>(tags: &[(&str, &'a str)], name: &str) -> Option<&'a str> {
    tags.iter()
        .find(|(tag, _)| *tag == name)
        .map(|(_, value)| *value)
}

/// base64 in DNS may be folded.
fn without_whitespace(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Keys made with openssl by tests/fixtures/dkim/generate.sh.
    const RSA_2048: &str = include_str!("../../tests/fixtures/dkim/rsa-2048.spki.b64");
    const RSA_2048_PKCS1: &str = include_str!("../../tests/fixtures/dkim/rsa-2048.pkcs1.b64");
    const RSA_1024: &str = include_str!("../../tests/fixtures/dkim/rsa-1024.spki.b64");
    const RSA_512: &str = include_str!("../../tests/fixtures/dkim/rsa-512.spki.b64");
    const ED25519: &str = include_str!("../../tests/fixtures/dkim/ed25519.raw.b64");
    const ED25519_SPKI: &str = include_str!("../../tests/fixtures/dkim/ed25519.spki.b64");

    fn rsa_record(p: &str) -> String {
        format!("v=DKIM1; k=rsa; p={p}")
    }

    fn assess(record: &str, expected: Option<&str>) -> DkimAssessment {
        assess_dkim_records(&[record.to_string()], expected)
    }

    /// The problem of a record that must be a mismatch.
    fn problem(record: &str) -> String {
        match assess(record, None).verdict {
            Verdict::Mismatch { found, problem } => {
                assert_eq!(found, record);
                problem
            }
            other => panic!("expected a mismatch for {record:?}, got {other:?}"),
        }
    }

    fn base64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    #[test]
    fn a_2048_bit_rsa_key_verifies_without_warnings() {
        let assessment = assess(&rsa_record(RSA_2048), None);
        assert_eq!(assessment.verdict, Verdict::Verified);
        assert_eq!(assessment.key_type.as_deref(), Some("rsa"));
        assert_eq!(assessment.key_bits, Some(2048));
        assert_eq!(assessment.warnings, []);
        // k= defaults to rsa.
        let implicit = assess(&format!("v=DKIM1; p={RSA_2048}"), None);
        assert_eq!(implicit.verdict, Verdict::Verified);
        assert_eq!(implicit.key_type.as_deref(), Some("rsa"));
    }

    #[test]
    fn a_1024_bit_rsa_key_verifies_with_a_warning() {
        let assessment = assess(&rsa_record(RSA_1024), None);
        assert_eq!(assessment.verdict, Verdict::Verified);
        assert_eq!(assessment.key_bits, Some(1024));
        assert_eq!(
            assessment.warnings,
            [DkimKeyWarning::WeakRsaKey { bits: 1024 }]
        );
        assert!(assessment.warnings[0].to_string().contains("at least 2048"));
    }

    #[test]
    fn a_512_bit_rsa_key_is_unusable() {
        let assessment = assess(&rsa_record(RSA_512), None);
        assert_eq!(assessment.key_bits, Some(512));
        let text = problem(&rsa_record(RSA_512));
        assert!(text.contains("512 bits"), "{text}");
        assert!(text.contains("under 1024"), "{text}");
    }

    #[test]
    fn a_bare_pkcs1_rsa_key_verifies_with_a_warning() {
        let assessment = assess(&rsa_record(RSA_2048_PKCS1), None);
        assert_eq!(assessment.verdict, Verdict::Verified);
        assert_eq!(assessment.key_bits, Some(2048));
        assert_eq!(assessment.warnings, [DkimKeyWarning::Pkcs1Encoding]);
    }

    #[test]
    fn base64_that_is_not_a_key_is_unusable() {
        let spki = LENIENT_BASE64.decode(RSA_2048).unwrap();
        // The first bytes of an RSA SubjectPublicKeyInfo, then nothing of
        // the key; and the whole key with its last byte lost. `check` used
        // to call both verified.
        for bytes in [&spki[..40], &spki[..spki.len() - 1]] {
            let text = problem(&rsa_record(&base64(bytes)));
            assert!(
                text.contains(&format!(
                    "p= ({} bytes) is not an RSA public key",
                    bytes.len()
                )),
                "{text}"
            );
        }
        // Any bytes at all.
        let text = problem(&rsa_record(&base64(b"any bytes at all")));
        assert!(text.contains("is not an RSA public key"), "{text}");
        assert!(problem(&rsa_record("@@not-base64@@")).contains("not base64"));
    }

    #[test]
    fn an_ed25519_key_of_32_bytes_verifies() {
        let assessment = assess(&format!("v=DKIM1; k=ed25519; p={ED25519}"), None);
        assert_eq!(assessment.verdict, Verdict::Verified);
        assert_eq!(assessment.key_type.as_deref(), Some("ed25519"));
        assert_eq!(assessment.key_bits, None);
    }

    #[test]
    fn an_ed25519_key_of_the_wrong_length_is_unusable() {
        for length in [31, 33] {
            let record = format!("v=DKIM1; k=ed25519; p={}", base64(&vec![7u8; length]));
            let text = problem(&record);
            assert!(text.contains(&format!("{length} bytes")), "{text}");
            assert!(text.contains("exactly 32"), "{text}");
        }
        let text = problem(&format!("v=DKIM1; k=ed25519; p={ED25519_SPKI}"));
        assert!(text.contains("SubjectPublicKeyInfo"), "{text}");
        assert!(text.contains("bare 32-byte"), "{text}");
    }

    #[test]
    fn k_and_p_disagreeing_is_unusable() {
        let rsa_under_ed25519 = format!("v=DKIM1; k=ed25519; p={RSA_2048}");
        let text = problem(&rsa_under_ed25519);
        assert!(
            text.contains("k=ed25519 but p= holds an RSA key (2048 bits)"),
            "{text}"
        );
        assert_eq!(
            assess(&rsa_under_ed25519, None).key_type.as_deref(),
            Some("ed25519")
        );

        for record in [
            format!("v=DKIM1; k=rsa; p={ED25519}"),
            format!("v=DKIM1; p={ED25519}"),
            format!("v=DKIM1; k=rsa; p={ED25519_SPKI}"),
        ] {
            let text = problem(&record);
            assert!(text.contains("k=rsa but p= holds an Ed25519 key"), "{text}");
        }
    }

    #[test]
    fn a_revoked_key_says_revoked() {
        for expected in [None, Some(RSA_2048)] {
            let assessment = assess("v=DKIM1; k=rsa; p=", expected);
            assert!(
                matches!(&assessment.verdict, Verdict::Mismatch { problem, .. } if problem.contains("revoked")),
                "{assessment:?}"
            );
        }
        assert!(problem("v=DKIM1; k=rsa").contains("no p= tag"));
    }

    #[test]
    fn h_without_sha256_is_unusable() {
        let sha1 = problem(&format!("v=DKIM1; k=rsa; h=sha1; p={RSA_2048}"));
        assert!(sha1.contains("h=sha1 allows only sha1"), "{sha1}");
        assert!(sha1.contains("RFC 8301"), "{sha1}");
        let unknown = problem(&format!("v=DKIM1; k=rsa; h=sha512; p={RSA_2048}"));
        assert!(
            unknown.contains("h=sha512 names no hash algorithm receivers use"),
            "{unknown}"
        );
        assert!(problem(&format!("v=DKIM1; h=sha1:md5; p={RSA_2048}")).contains("only sha1"));
    }

    #[test]
    fn h_with_sha256_is_usable_and_unknown_names_are_flagged() {
        let both = assess(
            &format!("v=DKIM1; k=rsa; h=sha1:sha256; p={RSA_2048}"),
            None,
        );
        assert_eq!(both.verdict, Verdict::Verified);
        assert_eq!(both.warnings, []);
        let with_unknown = assess(
            &format!("v=DKIM1; k=rsa; h = SHA256 : sha3 ; p={RSA_2048}"),
            None,
        );
        assert_eq!(with_unknown.verdict, Verdict::Verified);
        assert_eq!(
            with_unknown.warnings,
            [DkimKeyWarning::UnknownHashIgnored {
                unknown: "sha3".into()
            }]
        );
    }

    #[test]
    fn unknown_k_and_v_are_unusable() {
        let k = problem(&format!("v=DKIM1; k=dsa; p={RSA_2048}"));
        assert!(k.contains("unknown key type k=dsa"), "{k}");
        assert_eq!(
            assess(&format!("v=DKIM1; k=dsa; p={RSA_2048}"), None)
                .key_type
                .as_deref(),
            Some("dsa")
        );
        let v = problem(&format!("v=DKIM2; k=rsa; p={RSA_2048}"));
        assert!(v.contains("unknown version v=DKIM2"), "{v}");
    }

    #[test]
    fn malformed_tag_lists_are_unusable() {
        let twice = problem(&format!("v=DKIM1; p={RSA_2048}; p={RSA_1024}"));
        assert!(twice.contains("tag p= appears more than once"), "{twice}");
        assert!(problem("hello world").contains("not a tag=value pair"));
        // A trailing `;` is fine.
        assert_eq!(
            assess(&format!("v=DKIM1; k=rsa; p={RSA_2048};"), None).verdict,
            Verdict::Verified
        );
    }

    #[test]
    fn our_key_verifies_and_folded_base64_still_matches() {
        assert_eq!(
            assess(&rsa_record(RSA_2048), Some(RSA_2048)).verdict,
            Verdict::Verified
        );
        let folded = rsa_record(&format!("{} {}", &RSA_2048[..100], &RSA_2048[100..]));
        assert_eq!(assess(&folded, Some(RSA_2048)).verdict, Verdict::Verified);
    }

    #[test]
    fn another_usable_key_is_a_mismatch_showing_what_was_found() {
        let record = rsa_record(RSA_1024);
        match assess(&record, Some(RSA_2048)).verdict {
            Verdict::Mismatch { found, problem } => {
                assert!(found.contains(RSA_1024.trim()));
                assert!(problem.contains("different public key"));
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[test]
    fn our_key_in_a_record_receivers_cannot_use_is_not_verified() {
        for record in [
            format!("v=DKIM1; k=rsa; h=sha1; p={RSA_2048}"),
            format!("v=DKIM1; k=ed25519; p={RSA_2048}"),
            format!("v=DKIM1; k=dsa; p={RSA_2048}"),
        ] {
            assert!(
                matches!(
                    assess(&record, Some(RSA_2048)).verdict,
                    Verdict::Mismatch { .. }
                ),
                "{record}"
            );
        }
    }

    #[test]
    fn two_records_at_a_selector_are_a_mismatch() {
        let two = vec![rsa_record(RSA_2048), rsa_record(RSA_1024)];
        assert!(matches!(
            assess_dkim_records(&two, Some(RSA_2048)).verdict,
            Verdict::Mismatch { problem, .. } if problem.contains("2 TXT records")
        ));
    }
}
