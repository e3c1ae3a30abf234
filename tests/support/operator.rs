//! The operator run in-process against the real control plane, watching one
//! test namespace, checking DNS against a test knot, on a clock the test
//! moves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use mailauth_operator::api::{Condition, ConditionStatus, ConditionType, MailDomain};
use mailauth_operator::controller::{self, Context, ControllerArgs, ManualClock};
use mailauth_operator::telemetry::ControllerMetrics;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::cluster::cluster;
use super::wait::{Shown, eventually};

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

/// How long an object may take to reach what a test waits for.
pub const OBJECT_TIMEOUT: Duration = Duration::from_secs(90);

/// Waits (bounded) until the object (a MailDomain, a MailRelay, a Secret)
/// satisfies `check`; returns it. On timeout the panic shows the object's
/// status (or, for a Secret, the names of its entries, never their values).
pub async fn wait_for<K>(api: &Api<K>, name: &str, what: &str, check: impl Fn(&K) -> bool) -> K
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug,
    K: serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
{
    let check = &check;
    eventually(format!("{} {name}: {what}", K::kind(&())))
        .within(OBJECT_TIMEOUT)
        .every(Duration::from_millis(100))
        .until_async(move || async move {
            match api.get_opt(name).await {
                Ok(Some(object)) if check(&object) => Ok(object),
                Ok(Some(object)) => Err(Shown(describe(&object))),
                Ok(None) => Err(Shown("it does not exist".into())),
                Err(error) => Err(Shown(format!("reading it failed: {error}"))),
            }
        })
        .await
}

/// Waits (bounded) until the object with `uid` is gone (deleted, or
/// replaced by another object of the same name).
pub async fn wait_deleted<K>(api: &Api<K>, name: &str, uid: &str)
where
    K: kube::Resource<DynamicType = ()> + Clone + std::fmt::Debug,
    K: serde::de::DeserializeOwned + serde::Serialize + Send + 'static,
{
    eventually(format!("{} {name} to be deleted", K::kind(&())))
        .within(OBJECT_TIMEOUT)
        .every(Duration::from_millis(100))
        .until_async(move || async move {
            match api.get_opt(name).await {
                Ok(None) => Ok(()),
                Ok(Some(object)) if object.meta().uid.as_deref() != Some(uid) => Ok(()),
                Ok(Some(object)) => Err(Shown(format!(
                    "still there, deletion requested at {:?}, finalizers {:?}",
                    object.meta().deletion_timestamp,
                    object.meta().finalizers
                ))),
                Err(error) => Err(Shown(format!("reading it failed: {error}"))),
            }
        })
        .await
}

/// What a timeout message shows of an object: its status as YAML, or the
/// names of a Secret's entries (their values may be private keys).
fn describe<K: serde::Serialize>(object: &K) -> String {
    let value = serde_json::to_value(object).unwrap_or_default();
    if let Some(data) = value["data"].as_object() {
        let names: Vec<&String> = data.keys().collect();
        return format!("entries: {names:?}");
    }
    format!(
        "status:\n{}",
        serde_yaml::to_string(&value["status"]).unwrap_or_default()
    )
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

/// `mailauth-operator controller` run as the built binary, so that it can
/// be SIGKILLed: one namespace, checking DNS against a test knot, talking
/// to the API server through `kubeconfig` (a fault-injecting proxy's).
///
/// The binary reads the real clock, and a key's overlap is at least an
/// hour, so its time is moved with libfaketime (Debian package
/// `libfaketime`): the realtime clock runs `offset` ahead, set through a
/// file the test rewrites ([`OperatorProcess::move_clock`]); monotonic
/// time, which drives timeouts and requeues, is left alone. Reconciles
/// every 2 s (`--recheck-interval`), so a moved clock is seen promptly.
pub struct OperatorProcess {
    namespace: String,
    dns: SocketAddr,
    dir: tempfile::TempDir,
}

impl OperatorProcess {
    pub fn new(namespace: &str, dns: SocketAddr, kubeconfig: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("operator-")
            .tempdir()
            .expect("temp dir");
        std::fs::write(dir.path().join("kubeconfig"), kubeconfig).expect("writing kubeconfig");
        let process = Self {
            namespace: namespace.to_string(),
            dns,
            dir,
        };
        process.move_clock("+0");
        process
    }

    /// Starts one incarnation; its output is appended to the log.
    pub fn spawn(&self) -> std::process::Child {
        use std::process::{Command, Stdio};
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("operator log");
        Command::new(env!("CARGO_BIN_EXE_mailauth-operator"))
            .arg("controller")
            .args(["--namespace", &self.namespace])
            .args(["--dns-server", &self.dns.to_string()])
            .args(["--dns-retry-min", "1s", "--dns-retry-max", "2s"])
            .args(["--recheck-interval", "2s"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("KUBECONFIG", self.dir.path().join("kubeconfig"))
            .env("RUST_LOG", "info")
            .env("LD_PRELOAD", libfaketime())
            .env("FAKETIME_TIMESTAMP_FILE", self.clock_path())
            .env("FAKETIME_NO_CACHE", "1")
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("operator log"))
            .stderr(log)
            .spawn()
            .expect("running the operator binary")
    }

    /// Sets how far ahead of real time the operator's clock runs, as
    /// libfaketime reads it: `+0`, `+2h`, `+1d`.
    pub fn move_clock(&self, offset: &str) {
        std::fs::write(self.clock_path(), format!("{offset}\n")).expect("writing the clock file");
    }

    /// The last `lines` lines the operator logged, over every incarnation.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn log_path(&self) -> std::path::PathBuf {
        self.dir.path().join("operator.log")
    }

    fn clock_path(&self) -> std::path::PathBuf {
        self.dir.path().join("clock")
    }
}

/// libfaketime's multi-threaded build, wherever Debian put it.
fn libfaketime() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path().join("faketime/libfaketimeMT.so.1"))
        .find(|path| path.exists())
        .expect("libfaketime is missing: install the Debian package `libfaketime`")
}
