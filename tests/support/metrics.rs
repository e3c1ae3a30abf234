//! Reads Prometheus text exposition (what `/metrics` serves) into samples,
//! so tests check a metric's value, not whether some text occurs: a
//! renamed or missing metric fails [`Samples::value`] instead of making a
//! negative `contains()` pass.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One sample: a metric name, its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Clone, Debug, Default)]
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// Parses the text format; panics (showing the line) on a line that is
    /// not a comment, blank, or `name{labels} value [timestamp]`.
    pub fn parse(text: &str) -> Self {
        Self(
            text.lines()
                .map(str::trim)
                .filter(|line| !line.is_empty() && !line.starts_with('#'))
                .map(|line| {
                    parse_sample(line)
                        .unwrap_or_else(|why| panic!("not a Prometheus sample ({why}): {line:?}"))
                })
                .collect(),
        )
    }

    /// The value of the sample named `name` whose labels include every
    /// `(label, value)` in `labels`; panics when there is none or more than
    /// one, listing the samples of that name. An absent metric is a
    /// failure, never a zero.
    #[track_caller]
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let matching: Vec<&Sample> = self
            .0
            .iter()
            .filter(|sample| sample.name == name && has_labels(sample, labels))
            .collect();
        match matching.as_slice() {
            [sample] => sample.value,
            [] => panic!(
                "no sample {name}{} in the scrape; samples named {name}: {:?}",
                Labels(labels),
                self.named(name)
            ),
            several => panic!(
                "{} samples match {name}{}: {several:?}",
                several.len(),
                Labels(labels)
            ),
        }
    }

    /// Like [`Samples::value`], but `None` when no sample matches.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .iter()
            .find(|sample| sample.name == name && has_labels(sample, labels))
            .map(|sample| sample.value)
    }

    /// Every sample named `name`.
    pub fn named(&self, name: &str) -> Vec<&Sample> {
        self.0.iter().filter(|sample| sample.name == name).collect()
    }
}

/// GETs `/metrics` from `127.0.0.1:port` and parses it; `None` when the
/// server does not answer 200.
pub fn scrape(port: u16) -> Option<Samples> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    if head.split_whitespace().nth(1) != Some("200") {
        return None;
    }
    Some(Samples::parse(body))
}

fn has_labels(sample: &Sample, labels: &[(&str, &str)]) -> bool {
    labels
        .iter()
        .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
}

struct Labels<'a>(&'a [(&'a str, &'a str)]);

impl fmt::Display for Labels<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return Ok(());
        }
        let inner: Vec<String> = self.0.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        write!(f, "{{{}}}", inner.join(","))
    }
}

fn parse_sample(line: &str) -> Result<Sample, &'static str> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty() {
        return Err("no name");
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        rest = parse_labels(after_brace, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = match fields.next().ok_or("no value")? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        number => number.parse().map_err(|_| "value is not a number")?,
    };
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `key="value",...}` and returns what follows the `}`.
fn parse_labels<'a>(
    mut text: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, &'static str> {
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(rest) = text.strip_prefix('}') {
            return Ok(rest);
        }
        let (key, after_key) = text.split_once('=').ok_or("label without =")?;
        let mut chars = after_key
            .strip_prefix('"')
            .ok_or("unquoted label value")?
            .char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next().ok_or("unterminated label value")? {
                (i, '"') => break i,
                (_, '\\') => match chars.next().ok_or("unterminated escape")?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        text = &after_key[1 + end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# HELP mailauth_relay_rejections Rejections.\n\
        # TYPE mailauth_relay_rejections counter\n\
        mailauth_relay_rejections_total{reason=\"rate_limited\"} 3\n\
        mailauth_relay_rejections_total{reason=\"a \\\"quoted\\\", reason\"} 1\n\
        mailauth_relay_messages_accepted_total 0\n\
        mailauth_relay_latency_seconds_bucket{le=\"+Inf\"} 2 1700000000\n";

    #[test]
    fn reads_values_by_name_and_labels() {
        let samples = Samples::parse(SCRAPE);
        assert_eq!(
            samples.value(
                "mailauth_relay_rejections_total",
                &[("reason", "rate_limited")]
            ),
            3.0
        );
        assert_eq!(
            samples.value(
                "mailauth_relay_rejections_total",
                &[("reason", "a \"quoted\", reason")]
            ),
            1.0
        );
        assert_eq!(
            samples.value("mailauth_relay_messages_accepted_total", &[]),
            0.0
        );
        assert_eq!(
            samples.value("mailauth_relay_latency_seconds_bucket", &[("le", "+Inf")]),
            2.0
        );
    }

    #[test]
    #[should_panic(expected = "no sample mailauth_relay_messages_acepted_total")]
    fn a_missing_metric_fails_instead_of_reading_as_zero() {
        Samples::parse(SCRAPE).value("mailauth_relay_messages_acepted_total", &[]);
    }
}
