//! The operator run in-process against the real control plane, watching one
//! test namespace, checking DNS against a test knot, on a clock the test
//! moves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::runtime::wait::await_condition;
use mailauth_operator::api::{Condition, ConditionStatus, ConditionType, MailDomain};
use mailauth_operator::controller::{self, Context, ControllerArgs, ManualClock};
use mailauth_operator::telemetry::ControllerMetrics;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::cluster::cluster;

pub struct Operator {
    pub ctx: Arc<Context>,
    pub clock: Arc<ManualClock>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Operator {
    /// Starts the MailDomain controller for `namespace`, asking `dns`.
    pub async fn start(namespace: &str, dns: SocketAddr) -> Self {
        Self::start_for(&[namespace], dns).await
    }

    /// Starts the operator watching `namespaces` (a platform namespace and
    /// tenants' namespaces, say), asking `dns`.
    pub async fn start_for(namespaces: &[&str], dns: SocketAddr) -> Self {
        mailauth_operator::telemetry::init();
        let clock = Arc::new(ManualClock::new(Timestamp::now()));
        let settings = ControllerArgs {
            dns_servers: vec![dns],
            namespaces: namespaces.iter().map(|ns| ns.to_string()).collect(),
            ..ControllerArgs::default()
        };
        let metrics =
            ControllerMetrics::register(&mut prometheus_client::registry::Registry::default());
        let ctx = Arc::new(
            Context::new(cluster().client().await, clock.clone(), settings, metrics)
                .expect("building the controller context"),
        );
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(controller::run_controllers(ctx.clone(), async move {
            let _ = stopped.await;
        }));
        Self {
            ctx,
            clock,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Moves the injected clock; every MailDomain is then reconciled.
    pub fn advance(&self, by: SignedDuration) {
        self.clock.advance(by);
    }

    /// Stops the controller and waits until it has.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    pub fn status_writes(&self) -> u64 {
        self.ctx.metrics.status_writes.get()
    }

    pub fn reconciles(&self) -> u64 {
        self.ctx.metrics.reconciles.get()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Waits (bounded) until the object (a MailDomain, a MailRelay) satisfies
/// `check`; returns it.
pub async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, check: impl Fn(&K) -> bool) -> K
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug,
    K: serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
{
    let found = tokio::time::timeout(
        Duration::from_secs(90),
        await_condition(api.clone(), name, move |object: Option<&K>| {
            object.is_some_and(&check)
        }),
    )
    .await;
    match found {
        Ok(Ok(Some(object))) => object,
        _ => {
            let status = api
                .get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|object| serde_json::to_value(object).ok())
                .map(|object| object["status"].clone());
            panic!(
                "{} {name}: timed out waiting for {what}; its status is now:\n{}",
                K::kind(&()),
                serde_yaml::to_string(&status).unwrap_or_default()
            );
        }
    }
}

/// The status of a condition of a MailDomain, if present.
pub fn condition(md: &MailDomain, type_: ConditionType) -> Option<ConditionStatus> {
    md.status
        .as_ref()
        .and_then(|s| Condition::find(&s.conditions, type_))
        .map(|c| c.status)
}

pub fn is(md: &MailDomain, type_: ConditionType, status: ConditionStatus) -> bool {
    condition(md, type_) == Some(status)
}
