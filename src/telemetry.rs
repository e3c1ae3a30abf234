//! Logs and metrics. Logs are human-readable by default and JSON with
//! `LOG_FORMAT=json`, at the level of `RUST_LOG` (default `info`). Metrics
//! are Prometheus counters and gauges served on `/metrics`; none of them
//! ever carries a key, a password or a message body.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

use crate::api::{DkimKeyStatus, KeyState};

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

/// Every MailDomain's keys as of its last reconcile, reported on each
/// scrape: keys by state, and when the oldest Active key was created (age
/// in PromQL: `time() - mailauth_dkim_oldest_active_key_created_timestamp_seconds`).
///
/// Kept per domain, not as running totals, so a new leader that starts with
/// domains whose keys already exist reports them all.
#[derive(Debug, Default)]
pub struct KeyInventory {
    domains: Mutex<HashMap<String, DomainKeys>>,
}

#[derive(Debug, Default, Clone, PartialEq)]
struct DomainKeys {
    by_state: [i64; KEY_STATES.len()],
    /// Unix seconds of the oldest Active key's creation.
    oldest_active: Option<i64>,
}

const KEY_STATES: [KeyState; 4] = [
    KeyState::Pending,
    KeyState::Active,
    KeyState::Retiring,
    KeyState::Retired,
];

impl KeyInventory {
    /// Records the keys of the MailDomain `domain` (`namespace/name`).
    pub fn record(&self, domain: String, keys: &[DkimKeyStatus]) {
        let mut entry = DomainKeys::default();
        for key in keys {
            if let Some(index) = KEY_STATES.iter().position(|s| *s == key.state) {
                entry.by_state[index] += 1;
            }
            if key.state == KeyState::Active {
                let created = key.created_at.0.as_second();
                entry.oldest_active = Some(entry.oldest_active.map_or(created, |o| o.min(created)));
            }
        }
        self.lock().insert(domain, entry);
    }

    /// Forgets a deleted MailDomain.
    pub fn forget(&self, domain: &str) {
        self.lock().remove(domain);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, DomainKeys>> {
        self.domains.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Collector for KeyInventory {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let (by_state, oldest_active) = {
            let domains = self.lock();
            let mut by_state = [0i64; KEY_STATES.len()];
            for entry in domains.values() {
                for (total, count) in by_state.iter_mut().zip(entry.by_state) {
                    *total += count;
                }
            }
            let oldest = domains.values().filter_map(|e| e.oldest_active).min();
            (by_state, oldest)
        };
        let mut keys =
            encoder.encode_descriptor("keys", "DKIM keys by state", None, MetricType::Gauge)?;
        for (state, count) in KEY_STATES.iter().zip(by_state) {
            let label = KeyStateLabel {
                state: format!("{state:?}"),
            };
            ConstGauge::new(count).encode(keys.encode_family(&label)?)?;
        }
        if let Some(oldest) = oldest_active {
            let gauge = ConstGauge::new(oldest);
            gauge.encode(encoder.encode_descriptor(
                "dkim_oldest_active_key_created_timestamp_seconds",
                "When the oldest key still signing (Active) was created, in Unix seconds",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
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
    /// Keys by state and the oldest Active key, per domain.
    pub keys: Arc<KeyInventory>,
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
            keys: Arc::default(),
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
        r.register_collector(Box::new(metrics.keys.clone()));
        r.register(
            "is_leader",
            "1 when this replica holds the leader lease",
            metrics.is_leader.clone(),
        );
        Arc::new(metrics)
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::api::KeyAlgorithm;

    fn key(selector: &str, state: KeyState, created: &str) -> DkimKeyStatus {
        DkimKeyStatus {
            selector: selector.into(),
            algorithm: KeyAlgorithm::Ed25519,
            size: None,
            state,
            generation: 1,
            public_key: "AAAA".into(),
            created_at: Time(created.parse().expect("time")),
            verified_at: None,
            activated_at: None,
            retiring_at: None,
            retired_at: None,
        }
    }

    fn scrape(metrics: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, metrics).expect("encoding");
        text
    }

    #[test]
    fn key_metrics_follow_each_domains_latest_keys() {
        let mut registry = Registry::default();
        let metrics = ControllerMetrics::register(&mut registry);
        metrics.keys.record(
            "a/acme".into(),
            &[
                key("s2", KeyState::Pending, "2026-03-01T00:00:00Z"),
                key("s1", KeyState::Active, "2026-01-01T00:00:00Z"),
            ],
        );
        metrics.keys.record(
            "b/globex".into(),
            &[key("g1", KeyState::Active, "2026-02-01T00:00:00Z")],
        );
        let text = scrape(&registry);
        assert!(
            text.contains("mailauth_keys{state=\"Active\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("mailauth_keys{state=\"Pending\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("mailauth_dkim_oldest_active_key_created_timestamp_seconds 1767225600\n"),
            "{text}"
        );

        // acme rotated: its new key is Active, the old one Retiring. A
        // record replaces the domain's keys; it never adds to them.
        metrics.keys.record(
            "a/acme".into(),
            &[
                key("s2", KeyState::Active, "2026-03-01T00:00:00Z"),
                key("s1", KeyState::Retiring, "2026-01-01T00:00:00Z"),
            ],
        );
        metrics.keys.forget("b/globex");
        let text = scrape(&registry);
        assert!(
            text.contains("mailauth_keys{state=\"Active\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("mailauth_keys{state=\"Pending\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("mailauth_keys{state=\"Retiring\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("mailauth_dkim_oldest_active_key_created_timestamp_seconds 1772323200\n"),
            "{text}"
        );
    }
}
