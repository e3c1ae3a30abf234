//! Controllers: shells that watch the cluster, call the pure core (`dkim`,
//! `dns`, [`conditions`]) and write what it decides. One file per concern:
//!
//! - [`maildomain`]: keys, rotation, DNS verification and status of each
//!   MailDomain.
//! - [`secrets`]: the one place that builds the key Secret.
//! - [`status`]: the one status writer.
//! - [`clock`]: time, injected so tests can move it.

pub mod clock;
pub mod conditions;
pub mod maildomain;
pub mod secrets;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::Semaphore;

use crate::dns::{DnsResolver, ResolverError, ResolverSettings};
pub use clock::{Clock, ManualClock, SystemClock};

/// The field manager for everything this operator writes (server-side apply).
pub const FIELD_MANAGER: &str = "mailauth-operator";

/// Settings of `mailauth-operator controller`.
#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {
    /// DNS server to check records with, `HOST:PORT` (repeatable). Default:
    /// the system resolver.
    #[arg(long = "dns-server", value_parser = crate::dns::resolver::parse_server)]
    pub dns_servers: Vec<SocketAddr>,

    /// Most DNS queries in flight at once across all domains.
    #[arg(long, default_value_t = 64)]
    pub dns_max_concurrent_queries: usize,

    /// How often fully verified domains are re-checked to catch drift.
    #[arg(long, default_value = "1h", value_parser = parse_std_duration)]
    pub recheck_interval: Duration,

    /// Shortest wait before re-checking a record that is not verified yet.
    #[arg(long, default_value = "30s", value_parser = parse_std_duration)]
    pub dns_retry_min: Duration,

    /// Longest wait before re-checking a record that is not verified yet.
    #[arg(long, default_value = "10m", value_parser = parse_std_duration)]
    pub dns_retry_max: Duration,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long)]
    pub namespace: Option<String>,

    /// Most MailDomains reconciled at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u16,
}

impl Default for ControllerArgs {
    fn default() -> Self {
        Self {
            dns_servers: Vec::new(),
            dns_max_concurrent_queries: 64,
            recheck_interval: Duration::from_secs(3600),
            dns_retry_min: Duration::from_secs(30),
            dns_retry_max: Duration::from_secs(600),
            namespace: None,
            concurrency: 64,
        }
    }
}

/// Parses `30s`, `10m`, `1h`, `2d`.
pub fn parse_std_duration(text: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {text:?}: use a number and s, m, h or d, such as 1h");
    let (number, unit) = text
        .split_at_checked(text.len().saturating_sub(1))
        .ok_or_else(err)?;
    let n: u64 = number.parse().map_err(|_| err())?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(err()),
    };
    Ok(Duration::from_secs(seconds))
}

/// Everything that can go wrong while reconciling. Variant names double as
/// the `reason` of Events and metric labels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("setting up DNS: {0}")]
    Resolver(#[from] ResolverError),
    #[error("the MailDomain has no namespace")]
    NotNamespaced,
    #[error("{0}")]
    Rotation(#[from] crate::dkim::RotationError),
    #[error("generating a DKIM key: {0}")]
    KeyGeneration(#[from] crate::dkim::KeyError),
    #[error("key generation task failed: {0}")]
    KeyGenerationTask(#[from] tokio::task::JoinError),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("serializing: {0}")]
    Serialization(#[from] serde_json::Error),
}

impl Error {
    /// A CamelCase word for Events and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubernetesApiError",
            Self::Resolver(_) => "ResolverError",
            Self::NotNamespaced => "NotNamespaced",
            Self::Rotation(_) => "InvalidRotationSpec",
            Self::KeyGeneration(_) | Self::KeyGenerationTask(_) => "KeyGenerationFailed",
            Self::Finalizer(_) => "FinalizerError",
            Self::Serialization(_) => "SerializationError",
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub dns: DnsResolver,
    pub clock: Arc<dyn Clock>,
    pub recorder: Recorder,
    /// Bounds concurrent key generations to the machine's cores, so 10,000
    /// new MailDomains neither flood the blocking pool with threads nor
    /// starve reconciles of domains that need no key.
    pub key_generation: Semaphore,
    pub settings: ControllerArgs,
    pub dns_memo: maildomain::DnsMemo,
    pub writes: status::WriteCounter,
}

impl Context {
    pub fn new(
        client: Client,
        clock: Arc<dyn Clock>,
        settings: ControllerArgs,
    ) -> Result<Self, Error> {
        let dns = DnsResolver::new(&ResolverSettings {
            servers: settings.dns_servers.clone(),
            max_concurrent_queries: settings.dns_max_concurrent_queries,
            ..ResolverSettings::default()
        })?;
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Ok(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            dns,
            clock,
            key_generation: Semaphore::new(cores),
            settings,
            dns_memo: maildomain::DnsMemo::default(),
            writes: status::WriteCounter::default(),
        })
    }
}

/// Runs the operator until SIGTERM or Ctrl-C.
pub async fn run(args: ControllerArgs) -> Result<(), Error> {
    crate::telemetry::init();
    let client = Client::try_default().await?;
    let context = Arc::new(Context::new(client, Arc::new(SystemClock), args)?);
    tracing::info!("starting the MailDomain controller");
    maildomain::run(context, shutdown_signal()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operational_durations() {
        assert_eq!(parse_std_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_std_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_std_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_std_duration("1w").is_err());
        assert!(parse_std_duration("h").is_err());
    }
}
