//! `mailauth-operator records -f FILE`: the DNS records a MailDomain
//! manifest needs, as zone-file lines.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::api::{MailDomain, SpfAuthorization};
use crate::dns::{ExpectedRecord, expected_records, return_path_mx_record};

/// Settings of `mailauth-operator records`.
#[derive(Args, Debug, Clone)]
pub struct RecordsArgs {
    /// A MailDomain manifest (YAML, optionally with the status the cluster
    /// wrote, which holds the DKIM keys); `-` reads standard input.
    #[arg(short = 'f', long = "file", value_name = "FILE|-")]
    pub file: PathBuf,

    /// The `include:` name the relay's SPF authorization gives.
    #[arg(long, value_name = "NAME")]
    pub spf_include: Option<String>,

    /// An egress address or range the relay sends from (repeatable).
    #[arg(long = "spf-ip", value_name = "IP")]
    pub spf_ips: Vec<String>,

    /// The host that receives bounces for `returnPath`, when there is one.
    #[arg(long, value_name = "HOST")]
    pub return_path_mx: Option<String>,

    /// TTL of the printed records, in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u32,
}

/// Why `records` could not print the records.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is not a MailDomain manifest: {source}")]
    Manifest {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("writing the records: {0}")]
    Output(io::Error),
}

pub fn run(args: RecordsArgs) -> Result<ExitCode, RecordsError> {
    let mut text = String::new();
    let read_error = |source| RecordsError::Read {
        path: args.file.clone(),
        source,
    };
    if args.file.as_os_str() == "-" {
        io::stdin().read_to_string(&mut text).map_err(read_error)?;
    } else {
        text = std::fs::read_to_string(&args.file).map_err(read_error)?;
    }
    let mail_domain: MailDomain =
        serde_yaml::from_str(&text).map_err(|source| RecordsError::Manifest {
            path: args.file.clone(),
            source,
        })?;
    let spf = (args.spf_include.is_some() || !args.spf_ips.is_empty()).then(|| SpfAuthorization {
        include: args.spf_include.clone(),
        egress_ips: args.spf_ips.clone(),
    });
    let keys = mail_domain
        .status
        .as_ref()
        .and_then(|status| status.dkim.as_ref())
        .map(|dkim| dkim.keys.as_slice())
        .unwrap_or_default();
    let spec = &mail_domain.spec;
    let mut records = expected_records(&spec.domain, spec, keys, spf.as_ref(), None);
    if let Some(exchange) = &args.return_path_mx {
        records.extend(return_path_mx_record(&spec.domain, spec, exchange));
    }
    let zone = render_zone(&records, args.ttl, keys.is_empty(), spf.is_none());
    io::stdout()
        .lock()
        .write_all(zone.as_bytes())
        .map_err(RecordsError::Output)?;
    Ok(ExitCode::SUCCESS)
}

/// Zone-file lines, with comments saying what each is for and which ones
/// may be deleted.
pub fn render_zone(records: &[ExpectedRecord], ttl: u32, no_keys: bool, no_relay: bool) -> String {
    let mut lines = Vec::new();
    if no_keys {
        lines.push(
            "; No DKIM keys in the manifest's status yet: apply it and run this on `kubectl get md NAME -o yaml`."
                .to_string(),
        );
    }
    if no_relay {
        lines.push(
            "; No SPF record: give the relay's --spf-include and/or --spf-ip to get one."
                .to_string(),
        );
    }
    for record in records {
        if record.is_removable() {
            lines.push(format!(
                "; {}: retired key, this record may be removed:",
                record.purpose
            ));
            lines.push(format!("; {}", record.zone_file_line(ttl)));
        } else {
            lines.push(format!("; {}", record.purpose));
            lines.push(record.zone_file_line(ttl));
        }
    }
    lines.push(String::new());
    lines.join("\n")
}
