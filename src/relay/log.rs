//! Client-supplied text in logs. A client chooses its EHLO name, AUTH
//! username and addresses; written as they are, a newline in one starts a
//! forged log line in the text format. [`Escaped`] shows control
//! characters escaped (`\n`, `\u{1b}`) and cuts long values.

use std::fmt;

/// Longest client value shown, in characters.
const MAX_SHOWN: usize = 256;

/// Displays a client value with its control characters escaped.
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, c) in self.0.chars().enumerate() {
            if index == MAX_SHOWN {
                return f.write_str("...");
            }
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                write!(f, "{}", c.escape_default())?;
            } else {
                fmt::Write::write_char(f, c)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_cannot_start_a_line() {
        let shown = Escaped("alice\n2026-01-01T00:00:00Z INFO forged\r\x1b[2J").to_string();
        assert_eq!(
            shown,
            "alice\\n2026-01-01T00:00:00Z INFO forged\\r\\u{1b}[2J"
        );
        assert!(!shown.contains(['\n', '\r', '\x1b']));
        assert_eq!(Escaped("Zoë").to_string(), "Zoë");
    }

    #[test]
    fn long_values_are_cut() {
        let shown = Escaped(&"a".repeat(10_000)).to_string();
        assert_eq!(shown.len(), MAX_SHOWN + 3);
    }
}
