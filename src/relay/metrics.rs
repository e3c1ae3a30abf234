//! The relay's Prometheus metrics, registered under `mailauth_relay_`.
//! Labels are closed sets (reasons, results), never tenant data.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::telemetry::{ReasonLabel, ResultLabel};

pub struct RelayMetrics {
    accepted: Counter<u64, AtomicU64>,
    rejected: Family<ReasonLabel, Counter>,
    signed: Counter<u64, AtomicU64>,
    forwarded: Counter<u64, AtomicU64>,
    upstream_latency: Histogram,
    config_reloads: Family<ResultLabel, Counter>,
    tls_reloads: Family<ResultLabel, Counter>,
    connections: Gauge,
    config_domains: Gauge,
    config_tenants: Gauge,
    config_rejected: Family<ReasonLabel, Gauge>,
    buffered_bytes: Gauge,
}

impl RelayMetrics {
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self {
            accepted: Counter::default(),
            rejected: Family::default(),
            signed: Counter::default(),
            forwarded: Counter::default(),
            // 0.5 ms .. ~8 s
            upstream_latency: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            config_reloads: Family::default(),
            tls_reloads: Family::default(),
            connections: Gauge::default(),
            config_domains: Gauge::default(),
            config_tenants: Gauge::default(),
            config_rejected: Family::default(),
            buffered_bytes: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("mailauth_relay");
        r.register(
            "messages_accepted",
            "Messages acknowledged to the client after the upstream accepted them",
            metrics.accepted.clone(),
        );
        r.register(
            "messages_rejected",
            "Commands or messages refused, by reason",
            metrics.rejected.clone(),
        );
        r.register(
            "messages_signed",
            "Messages DKIM-signed",
            metrics.signed.clone(),
        );
        r.register(
            "messages_forwarded",
            "Messages the upstream accepted",
            metrics.forwarded.clone(),
        );
        r.register(
            "upstream_latency_seconds",
            "Time to hand one message to the upstream",
            metrics.upstream_latency.clone(),
        );
        r.register(
            "config_reloads",
            "Config directory loads, by result",
            metrics.config_reloads.clone(),
        );
        r.register(
            "tls_reloads",
            "STARTTLS certificate reloads after the files changed, by result",
            metrics.tls_reloads.clone(),
        );
        r.register(
            "connections",
            "Client connections open",
            metrics.connections.clone(),
        );
        r.register(
            "config_domains",
            "Domains the current config serves",
            metrics.config_domains.clone(),
        );
        r.register(
            "config_tenants",
            "Tenants the current config knows",
            metrics.config_tenants.clone(),
        );
        r.register(
            "config_rejected_entries",
            "Entries of the current config that are not served, by reason",
            metrics.config_rejected.clone(),
        );
        r.register(
            "buffered_bytes",
            "Message data held in memory, all sessions together",
            metrics.buffered_bytes.clone(),
        );
        Arc::new(metrics)
    }

    /// The gauge of buffered message bytes, for the reservations to keep.
    pub fn buffered_bytes(&self) -> Gauge {
        self.buffered_bytes.clone()
    }

    /// Metrics that go nowhere, for tests of parts that need some.
    pub fn unregistered() -> Arc<Self> {
        Self::register(&mut Registry::default())
    }

    pub fn accepted(&self) {
        self.accepted.inc();
    }

    pub fn rejected(&self, reason: &str) {
        self.rejected
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn signed(&self) {
        self.signed.inc();
    }

    pub fn forwarded(&self, latency: Duration) {
        self.forwarded.inc();
        self.upstream_latency.observe(latency.as_secs_f64());
    }

    pub fn upstream_failed(&self, latency: Duration) {
        self.upstream_latency.observe(latency.as_secs_f64());
    }

    pub fn config_reload(&self, result: &str) {
        self.config_reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// What the config now in effect serves and leaves out.
    pub fn config_in_effect(&self, domains: usize, tenants: usize, rejected_reasons: &[&str]) {
        self.config_domains
            .set(i64::try_from(domains).unwrap_or(i64::MAX));
        self.config_tenants
            .set(i64::try_from(tenants).unwrap_or(i64::MAX));
        self.config_rejected.clear();
        for reason in rejected_reasons {
            self.config_rejected
                .get_or_create(&ReasonLabel {
                    reason: (*reason).to_string(),
                })
                .inc();
        }
    }

    pub fn tls_reload(&self, result: &str) {
        self.tls_reloads
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    pub fn connection_closed(&self) {
        self.connections.dec();
    }
}
