//! A DMARC aggregate report (RFC 7489 appendix C), summarised for the
//! domain it is about: how many messages, how many passed DMARC's DKIM
//! and SPF checks (aligned and passing, as the receiver evaluated them), and
//! which sources failed.

use std::collections::BTreeMap;
use std::net::IpAddr;

use mail_auth::report::{DmarcResult, Report};

/// The most failing sources kept per report, largest first.
pub const TOP_FAILING: usize = 10;

/// One report's numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AggregateSummary {
    /// The domain the report is about (`policy_published.domain`).
    pub domain: String,
    /// Who sent it, and its id: together they identify a report (a
    /// receiver may send the same one twice).
    pub org_name: String,
    pub report_id: String,
    /// The period it covers, seconds since the epoch.
    pub begin: u64,
    pub end: u64,
    pub messages: u64,
    /// Messages whose DKIM result, as DMARC evaluated it, passed (aligned).
    pub dkim_aligned_pass: u64,
    /// Messages whose SPF result, as DMARC evaluated it, passed (aligned).
    pub spf_aligned_pass: u64,
    /// Sources of messages that failed DMARC (neither passed), largest
    /// first, at most [`TOP_FAILING`].
    pub failing: Vec<FailingSource>,
}

/// A source IP whose messages failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailingSource {
    pub ip: Option<IpAddr>,
    pub count: u64,
    /// Failed DKIM (not aligned and passing).
    pub dkim_failed: bool,
    /// Failed SPF (not aligned and passing).
    pub spf_failed: bool,
}

impl AggregateSummary {
    pub fn of(report: &Report) -> Self {
        let mut summary = Self {
            domain: report.domain().trim_end_matches('.').to_ascii_lowercase(),
            org_name: report.org_name().to_string(),
            report_id: report.report_id().to_string(),
            begin: report.date_range_begin(),
            end: report.date_range_end(),
            ..Self::default()
        };
        let mut failing: BTreeMap<Option<IpAddr>, FailingSource> = BTreeMap::new();
        for record in report.records() {
            let count = u64::from(record.count());
            let dkim = record.dmarc_dkim_result() == DmarcResult::Pass;
            let spf = record.dmarc_spf_result() == DmarcResult::Pass;
            summary.messages = summary.messages.saturating_add(count);
            if dkim {
                summary.dkim_aligned_pass = summary.dkim_aligned_pass.saturating_add(count);
            }
            if spf {
                summary.spf_aligned_pass = summary.spf_aligned_pass.saturating_add(count);
            }
            if !dkim && !spf {
                let ip = record.source_ip();
                let source = failing.entry(ip).or_insert(FailingSource {
                    ip,
                    count: 0,
                    dkim_failed: true,
                    spf_failed: true,
                });
                source.count = source.count.saturating_add(count);
            }
        }
        let mut failing: Vec<FailingSource> = failing.into_values().collect();
        failing.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.ip.cmp(&b.ip)));
        failing.truncate(TOP_FAILING);
        summary.failing = failing;
        summary
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const REPORT_XML: &str = r#"<?xml version="1.0" encoding="UTF-8" ?>
<feedback>
  <report_metadata>
    <org_name>receiver.example</org_name>
    <email>noreply-dmarc@receiver.example</email>
    <report_id>r-1</report_id>
    <date_range><begin>1764633600</begin><end>1764720000</end></date_range>
  </report_metadata>
  <policy_published>
    <domain>acme.example</domain><adkim>r</adkim><aspf>r</aspf><p>none</p><sp>none</sp><pct>100</pct>
  </policy_published>
  <record>
    <row><source_ip>192.0.2.10</source_ip><count>90</count>
      <policy_evaluated><disposition>none</disposition><dkim>pass</dkim><spf>pass</spf></policy_evaluated></row>
    <identifiers><header_from>acme.example</header_from></identifiers>
    <auth_results><dkim><domain>acme.example</domain><result>pass</result></dkim>
      <spf><domain>bounce.acme.example</domain><result>pass</result></spf></auth_results>
  </record>
  <record>
    <row><source_ip>198.51.100.7</source_ip><count>8</count>
      <policy_evaluated><disposition>none</disposition><dkim>fail</dkim><spf>fail</spf></policy_evaluated></row>
    <identifiers><header_from>acme.example</header_from></identifiers>
    <auth_results><spf><domain>acme.example</domain><result>fail</result></spf></auth_results>
  </record>
  <record>
    <row><source_ip>192.0.2.11</source_ip><count>2</count>
      <policy_evaluated><disposition>none</disposition><dkim>pass</dkim><spf>fail</spf></policy_evaluated></row>
    <identifiers><header_from>acme.example</header_from></identifiers>
    <auth_results><dkim><domain>acme.example</domain><result>pass</result></dkim></auth_results>
  </record>
</feedback>
"#;

    #[test]
    fn a_report_is_summarised_per_domain_with_its_failing_sources() {
        let report = Report::parse_xml(REPORT_XML.as_bytes()).unwrap();
        let summary = AggregateSummary::of(&report);
        assert_eq!(summary.domain, "acme.example");
        assert_eq!(
            (summary.org_name.as_str(), summary.report_id.as_str()),
            ("receiver.example", "r-1")
        );
        assert_eq!(summary.messages, 100);
        assert_eq!(summary.dkim_aligned_pass, 92);
        assert_eq!(summary.spf_aligned_pass, 90);
        assert_eq!(
            summary.failing,
            [FailingSource {
                ip: Some("198.51.100.7".parse().unwrap()),
                count: 8,
                dkim_failed: true,
                spf_failed: true,
            }]
        );
    }
}
