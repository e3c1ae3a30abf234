//! Durations as tenants write them in manifests: `90d`, `36h`.

use std::fmt;
use std::str::FromStr;

/// A whole number of days or hours, written `<n>d` or `<n>h`.
///
/// The same grammar is enforced at the API server, so a
/// value that reaches the controller parses; the parser still reports errors
/// instead of panicking because the `check`/`records` commands read files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration {
    hours: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {0:?}: write a whole number of days or hours such as \"90d\" or \"36h\"")]
pub struct DurationError(String);

impl Duration {
    pub const fn from_hours(hours: u32) -> Self {
        Self { hours }
    }

    pub const fn from_days(days: u32) -> Self {
        Self { hours: days * 24 }
    }

    pub fn to_signed(self) -> jiff::SignedDuration {
        jiff::SignedDuration::from_hours(i64::from(self.hours))
    }
}

impl FromStr for Duration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DurationError(s.to_string());
        let (number, unit) = s
            .split_at_checked(s.len().saturating_sub(1))
            .ok_or_else(err)?;
        if number.is_empty()
            || number.starts_with('0')
            || !number.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(err());
        }
        let n: u32 = number.parse().map_err(|_| err())?;
        match unit {
            "d" => n.checked_mul(24).map(Self::from_hours).ok_or_else(err),
            "h" => Ok(Self::from_hours(n)),
            _ => Err(err()),
        }
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.hours.is_multiple_of(24) {
            write!(f, "{}d", self.hours / 24)
        } else {
            write!(f, "{}h", self.hours)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_days_and_hours() {
        assert_eq!("90d".parse(), Ok(Duration::from_days(90)));
        assert_eq!("36h".parse(), Ok(Duration::from_hours(36)));
        assert_eq!(Duration::from_hours(48).to_string(), "2d");
        assert_eq!(Duration::from_hours(30).to_string(), "30h");
    }

    #[test]
    fn refuses_what_the_schema_refuses() {
        for bad in [
            "",
            "d",
            "0d",
            "07d",
            "1w",
            "1.5d",
            "-1d",
            "90",
            "9999999999d",
        ] {
            assert!(bad.parse::<Duration>().is_err(), "{bad} should not parse");
        }
    }
}
