//! `mailauth-operator check`: what is wrong with a domain's DKIM, SPF and
//! DMARC, without a cluster.

use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use futures::StreamExt;
use serde::Serialize;

use crate::dns::spf::{EgressRange, InvalidEgress};
use crate::dns::{
    DnsResolver, DomainCheck, DomainReport, ResolverError, ResolverSettings, SelectorCheck,
    SpfRequirement, Verdict, resolver::parse_server,
};

/// Settings of `mailauth-operator check`.
#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    /// Domains to check.
    #[arg(value_name = "DOMAIN")]
    pub domains: Vec<String>,

    /// A DKIM selector to check on every domain (repeatable).
    #[arg(long = "selector", value_name = "SELECTOR")]
    pub selectors: Vec<String>,

    /// An address or CIDR range SPF must authorize (repeatable).
    #[arg(long = "spf-ip", value_name = "IP")]
    pub spf_ips: Vec<String>,

    /// A name SPF must include (checked when no --spf-ip is given).
    #[arg(long, value_name = "NAME")]
    pub spf_include: Option<String>,

    /// Nameserver to ask, as IP:PORT (repeatable; default: the system
    /// resolver).
    #[arg(long = "dns-server", value_name = "HOST:PORT")]
    pub dns_servers: Vec<String>,

    /// Read more domains from FILE, one per line (`#` comments); `-` reads
    /// standard input.
    #[arg(long, value_name = "FILE|-")]
    pub domains_file: Option<PathBuf>,

    /// Report format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,

    /// Most DNS queries in flight at once (and domains checked at once).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,

    /// How long to wait for one DNS answer, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub dns_timeout_ms: u64,

    /// How many times a DNS query is sent before giving up.
    #[arg(long, default_value_t = 2)]
    pub dns_attempts: usize,
}

/// The report formats.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

/// Why `check` could not run (a failing domain is not an error: it is the
/// exit code).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Resolver(#[from] ResolverError),
    #[error("--spf-ip: {0}")]
    Egress(#[from] InvalidEgress),
    #[error("reading domains from {path}: {source}")]
    DomainsFile { path: PathBuf, source: io::Error },
    #[error("no domains to check: give DOMAIN arguments or --domains-file")]
    NoDomains,
    #[error("starting the async runtime: {0}")]
    Runtime(io::Error),
    #[error("writing the report: {0}")]
    Output(io::Error),
    #[error("rendering the JSON report: {0}")]
    Json(#[from] serde_json::Error),
}

/// The JSON report.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct JsonReport<'a> {
    domains: &'a [DomainReport],
    failed: usize,
    dns_queries: u64,
}

/// Runs the checks; exits 1 when any required check fails for any domain.
pub fn run(args: CheckArgs) -> Result<ExitCode, CheckError> {
    let domains = domains(&args)?;
    let requirement = SpfRequirement {
        include: args
            .spf_include
            .as_deref()
            .map(|name| name.trim_end_matches('.').to_ascii_lowercase()),
        egress: args
            .spf_ips
            .iter()
            .map(|ip| EgressRange::parse(ip))
            .collect::<Result<_, _>>()?,
    };
    let settings = ResolverSettings {
        servers: args
            .dns_servers
            .iter()
            .map(|server| parse_server(server))
            .collect::<Result<_, _>>()?,
        timeout: Duration::from_millis(args.dns_timeout_ms),
        attempts: args.dns_attempts,
        max_concurrent_queries: usize::from(args.concurrency),
    };
    let checks: Vec<DomainCheck> = domains
        .into_iter()
        .map(|domain| DomainCheck {
            domain,
            selectors: args
                .selectors
                .iter()
                .map(|selector| SelectorCheck {
                    selector: selector.clone(),
                    public_key: None,
                })
                .collect(),
            spf: requirement.clone(),
        })
        .collect();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(CheckError::Runtime)?;
    let (reports, queries) = runtime.block_on(async {
        let dns = Arc::new(DnsResolver::new(&settings)?);
        let reports: Vec<DomainReport> = futures::stream::iter(checks.iter())
            .map(|check| crate::dns::check_domain(dns.as_ref(), check))
            .buffered(usize::from(args.concurrency))
            .collect()
            .await;
        Ok::<_, CheckError>((reports, dns.queries_made()))
    })?;

    let failed = reports.iter().filter(|report| !report.passed()).count();
    let mut stdout = io::stdout().lock();
    match args.output {
        OutputFormat::Json => {
            let report = JsonReport {
                domains: &reports,
                failed,
                dns_queries: queries,
            };
            serde_json::to_writer_pretty(&mut stdout, &report)?;
            writeln!(stdout).map_err(CheckError::Output)?;
        }
        OutputFormat::Text => {
            for report in &reports {
                stdout
                    .write_all(render_text(report).as_bytes())
                    .map_err(CheckError::Output)?;
            }
            writeln!(
                stdout,
                "{} domain(s) checked, {failed} failed, {queries} DNS queries",
                reports.len()
            )
            .map_err(CheckError::Output)?;
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The domains from the arguments and the domains file, in order.
fn domains(args: &CheckArgs) -> Result<Vec<String>, CheckError> {
    let mut domains = args.domains.clone();
    if let Some(path) = &args.domains_file {
        let read_error = |source| CheckError::DomainsFile {
            path: path.clone(),
            source,
        };
        let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
            Box::new(io::stdin().lock())
        } else {
            Box::new(io::BufReader::new(
                std::fs::File::open(path).map_err(read_error)?,
            ))
        };
        for line in reader.lines() {
            let line = line.map_err(read_error)?;
            let domain = line.split('#').next().unwrap_or_default().trim();
            if !domain.is_empty() {
                domains.push(domain.to_string());
            }
        }
    }
    if domains.is_empty() {
        return Err(CheckError::NoDomains);
    }
    Ok(domains)
}

/// A domain's report for people.
pub fn render_text(report: &DomainReport) -> String {
    let status = if report.passed() { "OK" } else { "FAIL" };
    let mut lines = vec![format!("{}: {status}", report.domain)];
    for dkim in &report.dkim {
        let key = match (&dkim.key_type, dkim.key_bits) {
            (Some(k), Some(bits)) => format!(" (k={k}, {bits} bits)"),
            (Some(k), None) => format!(" (k={k})"),
            (None, _) => String::new(),
        };
        lines.push(format!(
            "  DKIM {} at {}: {}{key}",
            dkim.selector,
            dkim.name,
            dkim.verdict.summary()
        ));
        for warning in &dkim.warnings {
            lines.push(format!("    warning: {warning}"));
        }
    }
    let spf = &report.spf;
    lines.push(format!(
        "  SPF at {}: {}",
        spf.domain,
        spf.verdict.summary()
    ));
    lines.push(format!(
        "    {}/10 DNS lookups, {}/2 void lookups",
        spf.dns_lookups, spf.void_lookups
    ));
    if let (Some(record), Verdict::Verified) = (&spf.record, &spf.verdict) {
        lines.push(format!("    record: {record}"));
    }
    for address in &spf.addresses {
        lines.push(format!("    {}: {:?}", address.ip, address.result));
    }
    let dmarc = &report.dmarc;
    // A record receivers read as p=none although it does not say so is
    // verified, and the verdict line says why.
    let fallback = dmarc
        .policy
        .as_ref()
        .and_then(|policy| policy.policy_fallback.as_deref())
        .map(|reason| format!(" ({reason})"))
        .unwrap_or_default();
    lines.push(format!(
        "  DMARC at {}: {}{fallback}",
        dmarc.name,
        dmarc.verdict.summary()
    ));
    if let Some(policy) = &dmarc.policy {
        let reports = if policy.aggregate_reports_to.is_empty() {
            String::new()
        } else {
            format!(" rua={}", policy.aggregate_reports_to.join(","))
        };
        lines.push(format!(
            "    p={} sp={} adkim={} aspf={}{reports}",
            policy.policy, policy.subdomain_policy, policy.dkim_alignment, policy.spf_alignment
        ));
        if policy.monitoring_only {
            lines.push(
                "    monitoring only: p=none asks receivers to report spoofed mail, not to reject or quarantine it"
                    .to_string(),
            );
        }
    }
    lines.push(String::new());
    lines.join("\n")
}
