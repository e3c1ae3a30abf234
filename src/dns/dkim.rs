//! DKIM: is the record at a selector there, valid, and carrying our key?

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use serde::Serialize;

use super::Verdict;
use super::records::dkim_record_name;
use super::resolver::DnsLookup;

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
}

/// Looks up `<selector>._domainkey.<domain>` and assesses it. Without an
/// expected key (the CLI only knows selectors) a record that parses is
/// verified. A CNAME at the selector is followed by the resolver.
pub async fn check_dkim(
    dns: &impl DnsLookup,
    domain: &str,
    selector: &str,
    expected_public_key: Option<&str>,
) -> DkimOutcome {
    let name = dkim_record_name(selector, domain);
    let (verdict, key_type) = check_dkim_record(dns, &name, expected_public_key).await;
    DkimOutcome {
        selector: selector.to_string(),
        name,
        verdict,
        key_type,
    }
}

/// The verdict on the DKIM record at `name` and the key type it declares.
pub async fn check_dkim_record(
    dns: &impl DnsLookup,
    name: &str,
    expected_public_key: Option<&str>,
) -> (Verdict, Option<String>) {
    match dns.txt(name).await {
        Ok(records) => assess_dkim_records(&records, expected_public_key),
        Err(err) if err.is_absent() => (
            Verdict::Missing {
                reason: err.to_string(),
            },
            None,
        ),
        Err(err) => (
            Verdict::Error {
                message: err.to_string(),
            },
            None,
        ),
    }
}

/// Judges the TXT records found at a selector (each one's strings already
/// joined). Returns the verdict and the declared key type.
pub fn assess_dkim_records(
    records: &[String],
    expected_public_key: Option<&str>,
) -> (Verdict, Option<String>) {
    let record = match records {
        [] => {
            return (
                Verdict::Missing {
                    reason: "no TXT record at the selector".to_string(),
                },
                None,
            );
        }
        [record] => record,
        several => {
            // Verifiers pick one at random: publishing two is a coin toss.
            return (
                Verdict::Mismatch {
                    found: several.join(" | "),
                    problem: format!(
                        "{} TXT records at the selector; publish exactly one",
                        several.len()
                    ),
                },
                None,
            );
        }
    };
    let key_type = Some(
        tag_value(record, "k")
            .map(|k| k.to_ascii_lowercase())
            .unwrap_or_else(|| "rsa".to_string()),
    );
    let mismatch = |problem: String| Verdict::Mismatch {
        found: record.clone(),
        problem,
    };
    if let Err(err) = DomainKey::parse(record.as_bytes()) {
        let problem = match err {
            mail_auth::Error::Dkim(mail_auth::dkim::DkimError::RevokedPublicKey) => {
                "the key is revoked (empty p=)".to_string()
            }
            other => format!("not a valid DKIM key record: {other}"),
        };
        return (mismatch(problem), key_type);
    }
    let verdict = match (expected_public_key, tag_value(record, "p")) {
        (None, _) => Verdict::Verified,
        (Some(expected), Some(found)) if without_whitespace(expected) == found => Verdict::Verified,
        (Some(_), _) => mismatch("the record carries a different public key (p=)".to_string()),
    };
    (verdict, key_type)
}

/// The value of `tag` in a `tag=value; ...` record, whitespace removed
/// (base64 in DNS may be folded).
fn tag_value(record: &str, tag: &str) -> Option<String> {
    record.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name.trim().eq_ignore_ascii_case(tag)).then(|| without_whitespace(value))
    })
}

fn without_whitespace(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // Any base64 will do: the parser does not check RSA key structure.
    const KEY: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAv1KEY";
    const OTHER: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAv2KEY";

    fn record(p: &str) -> Vec<String> {
        vec![format!("v=DKIM1; k=rsa; p={p}")]
    }

    #[test]
    fn our_key_verifies() {
        let (verdict, key_type) = assess_dkim_records(&record(KEY), Some(KEY));
        assert_eq!(verdict, Verdict::Verified);
        assert_eq!(key_type.as_deref(), Some("rsa"));
    }

    #[test]
    fn folded_base64_still_matches() {
        let folded = vec![format!("v=DKIM1; k=rsa; p={} {}", &KEY[..10], &KEY[10..])];
        assert_eq!(assess_dkim_records(&folded, Some(KEY)).0, Verdict::Verified);
    }

    #[test]
    fn another_key_is_a_mismatch_showing_what_was_found() {
        let (verdict, _) = assess_dkim_records(&record(OTHER), Some(KEY));
        match verdict {
            Verdict::Mismatch { found, problem } => {
                assert!(found.contains(OTHER));
                assert!(problem.contains("different public key"));
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    #[test]
    fn garbage_and_revoked_records_are_mismatches() {
        let garbage = vec!["hello world".to_string()];
        assert!(matches!(
            assess_dkim_records(&garbage, Some(KEY)).0,
            Verdict::Mismatch { .. }
        ));
        let (revoked, _) = assess_dkim_records(&record(""), Some(KEY));
        assert!(
            matches!(revoked, Verdict::Mismatch { problem, .. } if problem.contains("revoked"))
        );
    }

    #[test]
    fn two_records_at_a_selector_are_a_mismatch() {
        let two = vec![record(KEY).remove(0), record(OTHER).remove(0)];
        assert!(matches!(
            assess_dkim_records(&two, Some(KEY)).0,
            Verdict::Mismatch { problem, .. } if problem.contains("2 TXT records")
        ));
    }

    #[test]
    fn without_an_expected_key_a_valid_record_verifies() {
        let ed25519 =
            vec!["v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=".to_string()];
        let (verdict, key_type) = assess_dkim_records(&ed25519, None);
        assert_eq!(verdict, Verdict::Verified);
        assert_eq!(key_type.as_deref(), Some("ed25519"));
    }
}
