//! Controllers: shells that watch the cluster, call the pure core (`dkim`,
//! `dns`, [`conditions`]) and write what it decides. One file per concern:
//!
//! - [`index`]: what the cluster looks like (shared reflector stores), apart
//!   from the writers.
//! - [`maildomain`]: keys, rotation, DNS verification and status of each
//!   MailDomain (observe, decide, act).
//! - [`membership`]: the one place that decides which MailDomains a relay
//!   serves and what it serves for each (pure).
//! - [`projection`]: keeps each relay's domain shards equal to that
//!   decision, written in proportion to what changed.
//! - [`mailrelay`]: each relay's Deployment, Service, RBAC, settings and
//!   status.
//! - [`secrets`]: the one place that builds and checks a MailDomain's Secrets.
//! - [`status`]: the one status writer.
//! - [`clock`]: time, injected so tests can move it.

pub mod clock;
pub mod conditions;
pub mod index;
pub mod leader;
pub mod maildomain;
pub mod mailrelay;
pub mod membership;
pub mod projection;
pub mod relay_objects;
pub mod secrets;
pub mod status;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use futures::channel::mpsc::{UnboundedReceiver, unbounded};
use futures::future::BoxFuture;
use kube::Client;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use prometheus_client::registry::Registry;
use tokio::sync::Semaphore;

use crate::api::{MailDomain, MailRelay};
use crate::dns::{DnsResolver, ResolverError, ResolverSettings};
use crate::telemetry::ControllerMetrics;
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

    /// Watch only this namespace (repeatable, for several; default: all
    /// namespaces). MailRelays and tenants' MailDomains must all be in
    /// watched namespaces.
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,

    /// Most MailDomains reconciled at once.
    #[arg(long, default_value_t = 64)]
    pub concurrency: u16,

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,

    /// Run only while holding the leader Lease, so that of several replicas
    /// exactly one writes.
    #[arg(long)]
    pub leader_election: bool,

    /// Name of the leader Lease.
    #[arg(long, default_value = "mailauth-operator")]
    pub lease_name: String,

    /// Namespace of the leader Lease (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,

    /// The image relays run unless a MailRelay names its own.
    #[arg(
        long,
        env = "RELAY_IMAGE",
        default_value = "ghcr.io/mailauth/mailauth-operator:0.1.0"
    )]
    pub relay_image: String,

    /// The pull policy of that default relay image (Always, IfNotPresent or
    /// Never; default: the cluster's). `Never` for an image imported into
    /// the nodes, never pulled from a registry.
    #[arg(
        long,
        env = "RELAY_IMAGE_PULL_POLICY",
        value_parser = ["Always", "IfNotPresent", "Never"]
    )]
    pub relay_image_pull_policy: Option<String>,

    /// This replica's identity in the Lease (in a pod: its name).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
}

impl Default for ControllerArgs {
    fn default() -> Self {
        Self {
            dns_servers: Vec::new(),
            dns_max_concurrent_queries: 64,
            recheck_interval: Duration::from_secs(3600),
            dns_retry_min: Duration::from_secs(30),
            dns_retry_max: Duration::from_secs(600),
            namespaces: Vec::new(),
            concurrency: 64,
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            leader_election: false,
            lease_name: "mailauth-operator".into(),
            lease_namespace: "default".into(),
            identity: None,
            relay_image: "ghcr.io/mailauth/mailauth-operator:0.1.0".into(),
            relay_image_pull_policy: None,
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
    #[error("Secret {0} exists and is not managed by this MailDomain; delete or rename it")]
    SecretNotOwned(String),
    #[error("the system random number generator failed")]
    Random,
    #[error("the relay still serves this MailDomain; its config has not been rewritten yet")]
    StillServed,
    #[error("leader election: {0}")]
    LeaderElection(#[from] kube_lease_manager::LeaseManagerError),
    #[error("lost the leader Lease; exiting so that a fresh process rejoins as a follower")]
    LostLeadership,
    #[error("admin server: {0}")]
    Admin(std::io::Error),
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
            Self::LeaderElection(_) | Self::LostLeadership => "LeaderElection",
            Self::SecretNotOwned(_) => "SecretNotOwned",
            Self::Random => "RandomFailed",
            Self::StillServed => "StillServed",
            Self::Admin(_) => "AdminServer",
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
    pub metrics: Arc<ControllerMetrics>,
    index: index::Index,
    projection: Arc<projection::Projection>,
    /// The watches and channels `run_controllers` starts, once.
    wiring: Mutex<Option<Wiring>>,
}

/// What connects the index to its consumers, taken by `run_controllers`.
struct Wiring {
    feeds: index::Feeds,
    watches: BoxFuture<'static, ()>,
    relay_news: UnboundedReceiver<ObjectRef<MailRelay>>,
    domain_news: UnboundedReceiver<ObjectRef<MailDomain>>,
}

impl Context {
    pub fn new(
        client: Client,
        clock: Arc<dyn Clock>,
        settings: ControllerArgs,
        metrics: Arc<ControllerMetrics>,
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
        let scope = if settings.namespaces.is_empty() {
            index::Scope::Cluster
        } else {
            index::Scope::Namespaces(settings.namespaces.clone())
        };
        let (index, feeds, watches) = index::start(client.clone(), scope);
        let (relay_news_tx, relay_news) = unbounded();
        let (domain_news_tx, domain_news) = unbounded();
        let projection = Arc::new(projection::Projection::new(
            index.clone(),
            relay_news_tx,
            domain_news_tx,
        ));
        Ok(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            dns,
            clock,
            key_generation: Semaphore::new(cores),
            settings,
            dns_memo: maildomain::DnsMemo::default(),
            metrics,
            index,
            projection,
            wiring: Mutex::new(Some(Wiring {
                feeds,
                watches: Box::pin(watches),
                relay_news,
                domain_news,
            })),
        })
    }

    /// The shared view of the cluster.
    pub fn index(&self) -> &index::Index {
        &self.index
    }

    /// What each relay serves.
    pub fn projection(&self) -> &projection::Projection {
        &self.projection
    }

    /// For tests without watches: a Secret store the test fills itself.
    #[cfg(test)]
    pub(crate) fn secrets_filled_by_test(
        &mut self,
    ) -> kube::runtime::reflector::store::Writer<k8s_openapi::api::core::v1::Secret> {
        let (store, writer) = kube::runtime::reflector::store();
        self.index.secrets = store;
        writer
    }
}

/// Runs the operator until SIGTERM or Ctrl-C: the admin server at once,
/// the controllers only while this replica leads (with `--leader-election`).
pub async fn run(args: ControllerArgs) -> Result<(), Error> {
    crate::telemetry::init();
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let metrics = ControllerMetrics::register(&mut registry);
    let ready = Arc::new(AtomicBool::new(false));
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(crate::admin::serve(
        args.metrics_listen,
        Arc::new(registry),
        ready.clone(),
        async move {
            let _ = admin_stopped.await;
        },
    ));

    let leadership = if args.leader_election {
        Some(leader::acquire(client.clone(), &args, &metrics, &ready).await?)
    } else {
        None
    };
    ready.store(true, Ordering::Relaxed);
    metrics.is_leader.set(1);

    let context = Arc::new(Context::new(client, Arc::new(SystemClock), args, metrics)?);
    tracing::info!("starting the MailDomain controller");
    let outcome = match leadership {
        Some(mut lease) => {
            let lost = Arc::new(AtomicBool::new(false));
            let flag = lost.clone();
            let stop = async move {
                tokio::select! {
                    () = shutdown_signal() => {},
                    () = lease.lost() => flag.store(true, Ordering::Relaxed),
                }
            };
            run_controllers(context, stop).await;
            if lost.load(Ordering::Relaxed) {
                Err(Error::LostLeadership)
            } else {
                Ok(())
            }
        }
        None => {
            run_controllers(context, shutdown_signal()).await;
            Ok(())
        }
    };
    tracing::info!("stopped");
    let _ = stop_admin.send(());
    if let Ok(Err(err)) = admin.await {
        return Err(Error::Admin(err));
    }
    outcome
}

/// Runs the index, the MailDomain and MailRelay controllers and the relay
/// projection until `shutdown` resolves. A context runs once.
pub async fn run_controllers(
    context: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let wiring = context
        .wiring
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let Some(Wiring {
        feeds,
        watches,
        relay_news,
        domain_news,
    }) = wiring
    else {
        tracing::error!("the controllers of this context are already running");
        return;
    };
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let signal = |mut receiver: tokio::sync::watch::Receiver<bool>| async move {
        let _ = receiver.wait_for(|stop| *stop).await;
    };
    let domains = maildomain::run(
        context.clone(),
        feeds.domain_objects,
        futures::stream::select(feeds.domain_triggers, domain_news),
        signal(stopped.clone()),
    );
    let relays = mailrelay::run(
        context.clone(),
        context.index.clone(),
        feeds.relay_objects,
        relay_news,
        signal(stopped.clone()),
    );
    let projection = context.projection.clone().run(
        context.client.clone(),
        feeds.changes,
        context.metrics.clone(),
    );
    // The watches and the projection never end by themselves: they stop
    // with the controllers.
    let background = async move {
        tokio::select! {
            () = watches => {},
            () = projection => {},
            () = signal(stopped) => {},
        }
    };
    let trigger = async move {
        shutdown.await;
        let _ = stop.send(true);
    };
    tokio::join!(domains, relays, background, trigger);
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
