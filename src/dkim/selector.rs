//! Selector names: `<prefix><yyyymmdd><counter>`, e.g. `ma20261126a`.
//!
//! The date tells a person reading DNS how old a record is; the counter
//! (`a`..`z`, `aa`, `ab`, ...) makes it unique when several keys are made on
//! one day. A selector is never reused: a resolver or receiver may still
//! cache the old record under it, so reusing it would make fresh signatures
//! fail to verify.

use jiff::Timestamp;

use crate::api::{DkimAlgorithm, KeyAlgorithm};

/// Appended to the Ed25519 selector of a `Dual` generation, so both keys of
/// a generation share a recognisable base.
pub const DUAL_ED25519_SUFFIX: &str = "-ed";

/// The longest selector prefix the API accepts. It keeps every selector a
/// DNS label: 20 + 8 (date) + 3 (`-ed`) leaves 32 letters for the counter,
/// which would take 26^32 keys in one day to exhaust.
const PREFIX_MAX: usize = 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectorError {
    #[error(
        "invalid selector prefix {0:?}: use 1-20 characters, a lowercase letter followed by lowercase letters or digits"
    )]
    InvalidPrefix(String),
}

/// The selectors for a new key generation, one per key the algorithm needs:
/// RSA keys get the base (`ma20261126a`); an Ed25519 key gets the base too
/// when it is alone, and `<base>-ed` in a `Dual` generation.
///
/// `taken` is every selector already in use or on record (all keys in
/// status, whatever their state, and every private key in the Secret); the
/// counter is the first one for which none of the new selectors is taken.
/// The date is the UTC date of `now`.
pub fn selectors_for_generation<'a>(
    prefix: &str,
    algorithm: DkimAlgorithm,
    now: Timestamp,
    taken: impl IntoIterator<Item = &'a str>,
) -> Result<Vec<(KeyAlgorithm, String)>, SelectorError> {
    if !is_valid_prefix(prefix) {
        return Err(SelectorError::InvalidPrefix(prefix.to_string()));
    }
    let taken: Vec<&str> = taken.into_iter().collect();
    let date = now.strftime("%Y%m%d").to_string();

    // Each taken selector rules out at most one base, so one of the first
    // `taken.len() + 1` counters is free: the loop always returns.
    let mut counter = 0;
    loop {
        let base = format!("{prefix}{date}{}", counter_letters(counter));
        let selectors = selectors_from_base(&base, algorithm);
        if selectors
            .iter()
            .all(|(_, selector)| !taken.contains(&selector.as_str()))
        {
            return Ok(selectors);
        }
        counter += 1;
    }
}

/// The two selector slots of delegated DKIM. Keys take turns: a new key
/// takes the slot the signing key is not in.
pub const SLOTS: [u8; 2] = [1, 2];

/// The selectors of delegated slot `slot`: `<prefix><slot>` (`ma1`), and
/// `<prefix><slot>-ed` for the Ed25519 key of a `Dual` generation. Unlike
/// dated selectors these are reused, one key after another: see
/// `docs/delegation.md` for why that is safe.
pub fn slot_selectors(
    prefix: &str,
    algorithm: DkimAlgorithm,
    slot: u8,
) -> Result<Vec<(KeyAlgorithm, String)>, SelectorError> {
    if !is_valid_prefix(prefix) {
        return Err(SelectorError::InvalidPrefix(prefix.to_string()));
    }
    Ok(selectors_from_base(&format!("{prefix}{slot}"), algorithm))
}

/// The slot a selector belongs to, if it is a slot selector of `prefix`
/// (a dated selector has eight digits after the prefix, a slot one).
pub fn slot_of(prefix: &str, selector: &str) -> Option<u8> {
    let rest = selector.strip_prefix(prefix)?;
    let rest = rest.strip_suffix(DUAL_ED25519_SUFFIX).unwrap_or(rest);
    SLOTS
        .iter()
        .copied()
        .find(|slot| rest.len() == 1 && rest == slot.to_string())
}

fn selectors_from_base(base: &str, algorithm: DkimAlgorithm) -> Vec<(KeyAlgorithm, String)> {
    match algorithm {
        DkimAlgorithm::Rsa => vec![(KeyAlgorithm::Rsa, base.to_string())],
        DkimAlgorithm::Ed25519 => vec![(KeyAlgorithm::Ed25519, base.to_string())],
        DkimAlgorithm::Dual => vec![
            (KeyAlgorithm::Rsa, base.to_string()),
            (
                KeyAlgorithm::Ed25519,
                format!("{base}{DUAL_ED25519_SUFFIX}"),
            ),
        ],
    }
}

/// The same rule the API server enforces on `selectorPrefix`, checked again
/// because selectors must be valid DNS labels whatever the input path.
fn is_valid_prefix(prefix: &str) -> bool {
    let mut bytes = prefix.bytes();
    prefix.len() <= PREFIX_MAX
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// `0 → a`, `25 → z`, `26 → aa`, `27 → ab`, ...: bijective base 26, so every
/// counter has exactly one spelling and short ones come first.
fn counter_letters(counter: usize) -> String {
    let mut letters = Vec::new();
    let mut n = counter + 1;
    while n > 0 {
        n -= 1;
        // `n % 26` is below 26, so the cast is lossless.
        letters.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    letters.iter().rev().map(|&b| char::from(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The longest a DNS label may be (RFC 1035).
    const DNS_LABEL_MAX: usize = 63;

    fn at(ts: &str) -> Timestamp {
        ts.parse().unwrap()
    }

    fn names(selectors: Vec<(KeyAlgorithm, String)>) -> Vec<String> {
        selectors.into_iter().map(|(_, s)| s).collect()
    }

    #[test]
    fn slot_selectors_are_the_prefix_and_the_slot_number() {
        assert_eq!(
            names(slot_selectors("ma", DkimAlgorithm::Rsa, 1).unwrap()),
            ["ma1"]
        );
        assert_eq!(
            names(slot_selectors("ma", DkimAlgorithm::Dual, 2).unwrap()),
            ["ma2", "ma2-ed"]
        );
        assert!(slot_selectors("Ma", DkimAlgorithm::Rsa, 1).is_err());
        assert_eq!(slot_of("ma", "ma1"), Some(1));
        assert_eq!(slot_of("ma", "ma2-ed"), Some(2));
        // Dated selectors, other slots and other prefixes are not slots,
        // even with a prefix that ends in a digit.
        assert_eq!(slot_of("ma", "ma20261126a"), None);
        assert_eq!(slot_of("ma", "ma3"), None);
        assert_eq!(slot_of("mb", "ma1"), None);
        assert_eq!(slot_of("ma2", "ma21"), Some(1));
        assert_eq!(slot_of("ma2", "ma220261126a"), None);
    }

    #[test]
    fn counters_run_a_to_z_then_aa() {
        assert_eq!(counter_letters(0), "a");
        assert_eq!(counter_letters(1), "b");
        assert_eq!(counter_letters(25), "z");
        assert_eq!(counter_letters(26), "aa");
        assert_eq!(counter_letters(27), "ab");
        assert_eq!(counter_letters(51), "az");
        assert_eq!(counter_letters(52), "ba");
        assert_eq!(counter_letters(26 + 26 * 26), "aaa");
    }

    #[test]
    fn the_first_selector_of_a_day_gets_a() {
        let selectors =
            selectors_for_generation("ma", DkimAlgorithm::Rsa, at("2026-11-26T10:00:00Z"), [])
                .unwrap();
        assert_eq!(selectors, [(KeyAlgorithm::Rsa, "ma20261126a".to_string())]);
    }

    #[test]
    fn the_date_is_the_utc_date() {
        // 23:30 at UTC-05:00 is already the next day in UTC.
        let now = at("2026-11-26T23:30:00-05:00");
        let selectors = selectors_for_generation("ma", DkimAlgorithm::Rsa, now, []).unwrap();
        assert_eq!(names(selectors), ["ma20261127a"]);
    }

    #[test]
    fn taken_selectors_are_never_reused() {
        let now = at("2026-11-26T10:00:00Z");
        let selectors = selectors_for_generation(
            "ma",
            DkimAlgorithm::Rsa,
            now,
            ["ma20261126a", "ma20261126b", "ma20261125a"],
        )
        .unwrap();
        assert_eq!(names(selectors), ["ma20261126c"]);

        let all_single_letters: Vec<String> = (0..26)
            .map(|n| format!("ma20261126{}", counter_letters(n)))
            .collect();
        let selectors = selectors_for_generation(
            "ma",
            DkimAlgorithm::Rsa,
            now,
            all_single_letters.iter().map(String::as_str),
        )
        .unwrap();
        assert_eq!(names(selectors), ["ma20261126aa"]);
    }

    #[test]
    fn a_dual_generation_shares_one_base() {
        let now = at("2026-11-26T10:00:00Z");
        let selectors = selectors_for_generation("ma", DkimAlgorithm::Dual, now, []).unwrap();
        assert_eq!(
            selectors,
            [
                (KeyAlgorithm::Rsa, "ma20261126a".to_string()),
                (KeyAlgorithm::Ed25519, "ma20261126a-ed".to_string()),
            ]
        );

        // Either half being taken rules the base out.
        let selectors =
            selectors_for_generation("ma", DkimAlgorithm::Dual, now, ["ma20261126a-ed"]).unwrap();
        assert_eq!(names(selectors), ["ma20261126b", "ma20261126b-ed"]);
    }

    #[test]
    fn a_lone_ed25519_key_uses_the_plain_base() {
        let now = at("2026-11-26T10:00:00Z");
        let selectors =
            selectors_for_generation("ma", DkimAlgorithm::Ed25519, now, ["ma20261126a"]).unwrap();
        assert_eq!(
            selectors,
            [(KeyAlgorithm::Ed25519, "ma20261126b".to_string())]
        );
    }

    #[test]
    fn selectors_are_dns_labels() {
        let now = at("2026-11-26T10:00:00Z");
        let prefix = "a".repeat(PREFIX_MAX);
        for selector in
            names(selectors_for_generation(&prefix, DkimAlgorithm::Dual, now, []).unwrap())
        {
            assert!(selector.len() <= DNS_LABEL_MAX);
            assert!(
                selector
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            );
        }
    }

    #[test]
    fn invalid_prefixes_are_refused() {
        let now = at("2026-11-26T10:00:00Z");
        for prefix in ["", "Ma", "1ma", "m-a", "m.a", &"a".repeat(PREFIX_MAX + 1)] {
            assert_eq!(
                selectors_for_generation(prefix, DkimAlgorithm::Rsa, now, []),
                Err(SelectorError::InvalidPrefix(prefix.to_string())),
            );
        }
    }
}
