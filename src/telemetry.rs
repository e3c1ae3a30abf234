//! Logs and metrics. Logs are human-readable by default and JSON with
//! `LOG_FORMAT=json`, at the level of `RUST_LOG` (default `info`). Metrics
//! are Prometheus counters and gauges served on `/metrics`; none of them
//! ever carries a key, a password or a message body.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests running several controllers) is harmless.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyStateLabel {
    pub state: String,
}

/// The controller's metrics.
pub struct ControllerMetrics {
    pub reconciles: Counter<u64, AtomicU64>,
    pub reconcile_errors: Family<ReasonLabel, Counter>,
    pub dns_checks: Family<ResultLabel, Counter>,
    pub status_writes: Counter<u64, AtomicU64>,
    pub secret_writes: Counter<u64, AtomicU64>,
    pub keys_generated: Counter<u64, AtomicU64>,
    pub rotations: Counter<u64, AtomicU64>,
    /// Keys by state, as of each domain's last reconcile.
    pub keys: Family<KeyStateLabel, Gauge>,
    pub is_leader: Gauge,
}

impl ControllerMetrics {
    /// Creates the metrics and registers them under `mailauth_`.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self {
            reconciles: Counter::default(),
            reconcile_errors: Family::default(),
            dns_checks: Family::default(),
            status_writes: Counter::default(),
            secret_writes: Counter::default(),
            keys_generated: Counter::default(),
            rotations: Counter::default(),
            keys: Family::default(),
            is_leader: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("mailauth");
        r.register(
            "reconciles",
            "MailDomain reconciles completed",
            metrics.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Failed reconciles by reason",
            metrics.reconcile_errors.clone(),
        );
        r.register(
            "dns_checks",
            "DNS record checks by result",
            metrics.dns_checks.clone(),
        );
        r.register(
            "status_writes",
            "Status writes (only when something changed)",
            metrics.status_writes.clone(),
        );
        r.register(
            "secret_writes",
            "Key Secret writes",
            metrics.secret_writes.clone(),
        );
        r.register(
            "keys_generated",
            "DKIM keys generated",
            metrics.keys_generated.clone(),
        );
        r.register(
            "rotations",
            "Key rotations started",
            metrics.rotations.clone(),
        );
        r.register("keys", "DKIM keys by state", metrics.keys.clone());
        r.register(
            "is_leader",
            "1 when this replica holds the leader lease",
            metrics.is_leader.clone(),
        );
        Arc::new(metrics)
    }
}
