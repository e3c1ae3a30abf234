//! Scale benchmark (issue 9, tests/bench/scale.sh): N MailDomains on one
//! MailRelay, served by a running relay process, then key rotations through
//! to the relay signing with the new key.
//!
//! ```text
//! KUBECONFIG=... cargo bench --bench scale -- \
//!   --tenant-namespace T --relay-namespace R --count 10000 --algorithm Mixed \
//!   --zone scale.test --knot 127.0.0.1:PORT --controller-pid PID \
//!   --controller-metrics 127.0.0.1:PORT --operator-bin target/release/mailauth-operator \
//!   --work DIR [--rotations 100] [--steady-seconds 60]
//! ```
//!
//! What runs where: the shell starts the control plane, knot (updates
//! allowed from 127.0.0.1) and the release controller watching both
//! namespaces. This program creates the MailRelay (admitting the tenant
//! namespace by label), runs the upstream (a minimal SMTP sink that reads
//! each message's DKIM-Signature selector), starts the release relay as
//! the relay's own ServiceAccount (a TokenRequest token, as a pod has),
//! creates the MailDomains, and plays the tenant: every DNS record a
//! MailDomain's status asks for is published in knot (RFC 2136, knsupdate)
//! as soon as the status names it. It measures, through watches and the
//! relay's metrics (never by listing objects in a loop):
//!
//! 1. time until every domain is in the relay's shard Secrets and the
//!    running relay's `mailauth_relay_config_domains` reaches N;
//! 2. API requests counted by the API server (`apiserver_request_total`,
//!    before/after), by verb and resource;
//! 3. the controller's CPU and peak memory (/proc);
//! 4. the relay's memory, its CPU, and reload times: a fresh relay loading
//!    all N domains, and each incremental reload (a shard Secret change
//!    seen by this program's watch to the relay's reload counter);
//! 5. rotations one after another: annotation, Pending key in status, its
//!    record published, Active, the shard rewritten, the relay reloaded, and
//!    the first message the sink receives signed with the new selector.
//!
//! Prints `key value` lines for scale.sh; progress on stderr. Exits
//! non-zero (loudly, with the reason) when a run is broken. Never prints a
//! private key or password.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use mail_send::SmtpClient;
use mail_send::smtp::message::Message;
use mailauth_operator::api::{
    Condition, ConditionType, KeyState, MailDomain, MailRelay, RecordState,
};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

// --- arguments ---------------------------------------------------------------

struct Args {
    tenant_namespace: String,
    relay_namespace: String,
    relay: String,
    count: usize,
    algorithm: String,
    concurrency: usize,
    zone: String,
    knot: String,
    controller_pid: u32,
    controller_metrics: String,
    operator_bin: PathBuf,
    work: PathBuf,
    rotations: usize,
    steady: Duration,
    timeout: Duration,
    peers: Vec<(String, u32)>,
}

fn parse_args() -> Args {
    let mut args = Args {
        tenant_namespace: String::new(),
        relay_namespace: String::new(),
        relay: "shared".into(),
        count: 10_000,
        algorithm: "Mixed".into(),
        concurrency: 32,
        zone: "scale.test".into(),
        knot: String::new(),
        controller_pid: 0,
        controller_metrics: String::new(),
        operator_bin: PathBuf::from("target/release/mailauth-operator"),
        work: std::env::temp_dir(),
        rotations: 100,
        steady: Duration::ZERO,
        timeout: Duration::from_secs(3600),
        peers: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| die(&format!("{arg} needs a value")))
        };
        let number = |text: String| -> u64 {
            text.parse()
                .unwrap_or_else(|_| die(&format!("{arg}: not a number: {text}")))
        };
        match arg.as_str() {
            "--tenant-namespace" => args.tenant_namespace = value(),
            "--relay-namespace" => args.relay_namespace = value(),
            "--relay" => args.relay = value(),
            "--count" => args.count = number(value()) as usize,
            "--algorithm" => args.algorithm = value(),
            "--concurrency" => args.concurrency = number(value()).max(1) as usize,
            "--zone" => args.zone = value(),
            "--knot" => args.knot = value(),
            "--controller-pid" => args.controller_pid = number(value()) as u32,
            "--controller-metrics" => args.controller_metrics = value(),
            "--operator-bin" => args.operator_bin = PathBuf::from(value()),
            "--work" => args.work = PathBuf::from(value()),
            "--rotations" => args.rotations = number(value()) as usize,
            "--steady-seconds" => args.steady = Duration::from_secs(number(value())),
            "--timeout-seconds" => args.timeout = Duration::from_secs(number(value())),
            "--peer-pid" => {
                let text = value();
                let (label, pid) = text
                    .split_once(':')
                    .unwrap_or_else(|| die("--peer-pid: LABEL:PID"));
                args.peers
                    .push((label.to_string(), number(pid.to_string()) as u32));
            }
            "--bench" => {}
            other => die(&format!("unknown argument {other}")),
        }
    }
    if args.tenant_namespace.is_empty()
        || args.relay_namespace.is_empty()
        || args.knot.is_empty()
        || args.controller_pid == 0
        || args.controller_metrics.is_empty()
    {
        die(
            "--tenant-namespace, --relay-namespace, --knot, --controller-pid and --controller-metrics are required",
        );
    }
    if !["RSA", "Ed25519", "Mixed"].contains(&args.algorithm.as_str()) {
        die("--algorithm: RSA, Ed25519 or Mixed (half each)");
    }
    args
}

/// Processes this program started (with their pid files), stopped on
/// every exit.
static CHILDREN: Mutex<Vec<(Child, PathBuf)>> = Mutex::new(Vec::new());

fn stop_children() {
    let mut children = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
    for (child, pid_file) in children.iter_mut() {
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(pid_file);
    }
    children.clear();
}

fn die(message: &str) -> ! {
    eprintln!("scale bench: FAILED: {message}");
    stop_children();
    std::process::exit(1);
}

fn progress(message: &str) {
    eprintln!("scale bench: [{:7.1}s] {message}", now());
}

/// Seconds since the program started: every timestamp below.
fn now() -> f64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs_f64()
}

// --- /proc --------------------------------------------------------------------

#[derive(Clone, Copy, Default)]
struct ProcSample {
    cpu_seconds: f64,
    hwm_kib: u64,
    rss_kib: u64,
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .unwrap_or(100.0)
    })
}

fn sample_proc(pid: u32, what: &str) -> ProcSample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| die(&format!("the {what} (pid {pid}) is gone: {e}")));
    let rest = &stat[stat.rfind(')').unwrap_or(0) + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        die(&format!("the {what} (pid {pid}) exited"));
    }
    let utime: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ProcSample {
        cpu_seconds: (utime + stime) / clock_ticks(),
        hwm_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
    }
}

fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Busy and total core-seconds of the whole machine, from /proc/stat.
fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / clock_ticks(), total / clock_ticks())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// --- metrics ------------------------------------------------------------------

/// `GET /metrics` over plain HTTP/1.0.
async fn http_get(addr: &str, path: &str) -> Result<String, String> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(String::from_utf8_lossy(&body).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| format!("http://{addr}{path}: timed out"))?
}

/// Prometheus text: `name{labels}` (as written) -> value.
fn parse_prometheus(body: &str, prefix: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if !line.starts_with(prefix) {
            continue;
        }
        if let Some((series, value)) = line.rsplit_once(' ')
            && let Ok(v) = value.parse::<f64>()
        {
            out.insert(series.to_string(), v);
        }
    }
    out
}

/// The controller's `mailauth_*` counters, summed over labels.
async fn controller_counters(addr: &str) -> BTreeMap<String, f64> {
    let body = http_get(addr, "/metrics")
        .await
        .unwrap_or_else(|e| die(&format!("scraping the controller: {e}")));
    let mut out = BTreeMap::new();
    for (series, value) in parse_prometheus(&body, "mailauth_") {
        let name = series.split('{').next().unwrap_or(&series).to_string();
        *out.entry(name).or_insert(0.0) += value;
    }
    out
}

fn label<'a>(series: &'a str, name: &str) -> &'a str {
    let needle = format!("{name}=\"");
    series
        .find(&needle)
        .map(|start| {
            let rest = &series[start + needle.len()..];
            &rest[..rest.find('"').unwrap_or(rest.len())]
        })
        .unwrap_or("")
}

/// The API server's `apiserver_request_total`, by `VERB resource[/sub]`.
async fn apiserver_requests(client: &Client) -> BTreeMap<String, f64> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .expect("a request");
    let body = client
        .request_text(request)
        .await
        .unwrap_or_else(|e| die(&format!("reading the API server's /metrics: {e}")));
    let mut out = BTreeMap::new();
    for (series, value) in parse_prometheus(&body, "apiserver_request_total{") {
        let resource = label(&series, "resource");
        let sub = label(&series, "subresource");
        let key = format!(
            "{} {}{}{}",
            label(&series, "verb"),
            resource,
            if sub.is_empty() { "" } else { "/" },
            sub
        );
        *out.entry(key).or_insert(0.0) += value;
    }
    out
}

fn diff(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect()
}

/// Requests of the operator's kinds (and the relay's), without the API
/// server's own lease renewals.
fn counts_for_us(key: &str) -> bool {
    !key.ends_with(" leases") && !key.contains(" leases/")
}

fn report_requests(prefix: &str, delta: &BTreeMap<String, f64>, own_posts: f64, n: f64) {
    let mut by_verb: BTreeMap<String, f64> = BTreeMap::new();
    let mut total = 0.0;
    for (key, value) in delta.iter().filter(|(k, _)| counts_for_us(k)) {
        let verb = key.split(' ').next().unwrap_or("").to_string();
        *by_verb.entry(verb).or_insert(0.0) += value;
        total += value;
        println!("{prefix}_api_{} {value}", key.replace([' ', '/'], "_"));
    }
    // The bench's own creates are requests the tenant makes, not the
    // operator: counted apart.
    let operator_total = total - own_posts;
    let writes: f64 = by_verb
        .iter()
        .filter(|(v, _)| ["POST", "PUT", "PATCH", "APPLY", "DELETE"].contains(&v.as_str()))
        .map(|(_, v)| v)
        .sum::<f64>()
        - own_posts
        + 0.0;
    for (verb, value) in &by_verb {
        println!("{prefix}_api_verb_{verb} {value}");
    }
    println!("{prefix}_api_requests_total {total}");
    println!("{prefix}_api_requests_bench_own {own_posts}");
    println!("{prefix}_api_requests_operator {operator_total}");
    println!("{prefix}_api_writes_operator {writes}");
    if n > 0.0 {
        println!("{prefix}_api_requests_per_domain {:.3}", operator_total / n);
        println!("{prefix}_api_writes_per_domain {:.3}", writes / n);
    }
}

// --- what the watches see -------------------------------------------------------

#[derive(Default)]
struct DomainState {
    keys_ready: Option<f64>,
    ready: Option<f64>,
    active: Option<String>,
    active_since: f64,
    /// Pending selectors, with when they were first seen.
    pending: HashMap<String, f64>,
}

/// A shard as the bench reads it: names and selectors, never keys.
#[derive(Deserialize)]
struct ShardView {
    #[serde(default)]
    domains: Vec<EntryView>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct EntryView {
    domain: String,
    #[serde(default)]
    signing_keys: Vec<KeyView>,
}

#[derive(Deserialize)]
struct KeyView {
    selector: String,
}

#[derive(Default)]
struct Shards {
    /// Secret name -> domain -> selectors (sorted, comma-joined).
    by_secret: HashMap<String, HashMap<String, String>>,
    /// Domain -> (selectors, when first seen with them).
    served: HashMap<String, (String, f64)>,
    total: usize,
    /// When a shard Secret last changed (seen by the watch).
    changes: Vec<f64>,
}

#[derive(Default)]
struct RelaySample {
    domains: f64,
    reloads: f64,
    /// (time, reload count) whenever the count grew.
    reload_times: Vec<(f64, f64)>,
}

struct World {
    domains: Mutex<HashMap<String, DomainState>>,
    shards: Mutex<Shards>,
    /// Record name -> when it was published in knot.
    published: Mutex<HashMap<String, f64>>,
    relay: Mutex<RelaySample>,
    /// Subject -> (selectors, when the sink had the message).
    received: Mutex<HashMap<String, (String, f64)>>,
    changed: Notify,
    poll_ms: AtomicU64,
    publish_batches: AtomicUsize,
    published_records: AtomicUsize,
}

impl World {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            domains: Mutex::default(),
            shards: Mutex::default(),
            published: Mutex::default(),
            relay: Mutex::default(),
            received: Mutex::default(),
            changed: Notify::new(),
            poll_ms: AtomicU64::new(100),
            publish_batches: AtomicUsize::new(0),
            published_records: AtomicUsize::new(0),
        })
    }

    /// Waits (bounded) until `check` holds; `what` names it in the failure.
    async fn until<T>(
        &self,
        limit: Duration,
        what: &str,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let changed = self.changed.notified();
            if let Some(value) = check() {
                return value;
            }
            if tokio::time::Instant::now() >= deadline {
                die(&format!(
                    "timed out after {}s waiting for {what}",
                    limit.as_secs()
                ));
            }
            // Woken by any watch; the timeout bounds a missed wake-up.
            let _ = tokio::time::timeout(Duration::from_millis(200), changed).await;
        }
    }
}

/// One record to publish: owner name (absolute, no dot) and zone-file data.
struct Record {
    name: String,
    rtype: String,
    data: String,
}

fn txt_data(strings: &[String]) -> String {
    strings
        .iter()
        .map(|part| format!("\"{}\"", part.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn watch_domains(
    client: Client,
    namespace: String,
    world: Arc<World>,
    publish: tokio::sync::mpsc::UnboundedSender<Record>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let api: Api<MailDomain> = Api::namespaced(client, &namespace);
        let mut stream = kube::runtime::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut asked: HashSet<(String, String)> = HashSet::new();
        loop {
            let md = match stream.try_next().await {
                Ok(Some(Event::Apply(md) | Event::InitApply(md))) => md,
                Ok(Some(Event::InitDone)) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(err) => {
                    eprintln!("scale bench: MailDomain watch error (retrying): {err}");
                    continue;
                }
            };
            let t = now();
            let Some(status) = md.status.as_ref() else {
                continue;
            };
            // The tenant publishes whatever the status asks for.
            for record in &status.records {
                if matches!(record.state, RecordState::Verified | RecordState::Removable) {
                    continue;
                }
                if !asked.insert((record.name.clone(), record.value.clone())) {
                    continue;
                }
                let data = if record.type_ == "TXT" {
                    let strings = if record.strings.is_empty() {
                        mailauth_operator::dkim::split_txt(&record.value)
                    } else {
                        record.strings.clone()
                    };
                    txt_data(&strings)
                } else {
                    record.value.clone()
                };
                let _ = publish.send(Record {
                    name: record.name.trim_end_matches('.').to_string(),
                    rtype: record.type_.clone(),
                    data,
                });
            }
            let is_true = |t: ConditionType| Condition::is_true(&status.conditions, t);
            let mut domains = world.domains.lock().unwrap();
            let state = domains.entry(md.name_any()).or_default();
            if state.keys_ready.is_none() && is_true(ConditionType::KeysReady) {
                state.keys_ready = Some(t);
            }
            if state.ready.is_none() && is_true(ConditionType::Ready) {
                state.ready = Some(t);
            }
            if let Some(dkim) = status.dkim.as_ref() {
                if dkim.active_selector != state.active {
                    state.active = dkim.active_selector.clone();
                    state.active_since = t;
                }
                for key in dkim.keys.iter().filter(|k| k.state == KeyState::Pending) {
                    state.pending.entry(key.selector.clone()).or_insert(t);
                }
            }
            drop(domains);
            world.changed.notify_waiters();
        }
    });
    rx
}

fn watch_shards(
    client: Client,
    namespace: String,
    relay: String,
    world: Arc<World>,
) -> tokio::sync::oneshot::Receiver<()> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let api: Api<Secret> = Api::namespaced(client, &namespace);
        let config = watcher::Config::default().labels(&format!(
            "{}={relay}",
            mailauth_operator::relay::config::RELAY_CONFIG_LABEL
        ));
        let mut stream = kube::runtime::watcher(api, config)
            .default_backoff()
            .boxed();
        loop {
            let (secret, deleted) = match stream.try_next().await {
                Ok(Some(Event::Apply(s) | Event::InitApply(s))) => (s, false),
                Ok(Some(Event::Delete(s))) => (s, true),
                Ok(Some(Event::InitDone)) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                Ok(Some(_)) => continue,
                Ok(None) => return,
                Err(err) => {
                    eprintln!("scale bench: Secret watch error (retrying): {err}");
                    continue;
                }
            };
            let t = now();
            let mut members: HashMap<String, String> = HashMap::new();
            if !deleted {
                for (key, bytes) in secret.data.iter().flatten() {
                    if !(key.starts_with("domains-") && key.ends_with(".json")) {
                        continue;
                    }
                    match serde_json::from_slice::<ShardView>(&bytes.0) {
                        Ok(shard) => {
                            for entry in shard.domains {
                                let mut selectors: Vec<String> =
                                    entry.signing_keys.into_iter().map(|k| k.selector).collect();
                                selectors.sort();
                                members.insert(entry.domain, selectors.join(","));
                            }
                        }
                        Err(err) => eprintln!(
                            "scale bench: shard {} does not parse: {err}",
                            secret.name_any()
                        ),
                    }
                }
            }
            let mut shards = world.shards.lock().unwrap();
            let name = secret.name_any();
            let old = shards.by_secret.remove(&name).unwrap_or_default();
            for domain in old.keys() {
                if !members.contains_key(domain) {
                    shards.served.remove(domain);
                }
            }
            for (domain, selectors) in &members {
                let known = shards.served.get(domain).map(|(s, _)| s == selectors);
                if known != Some(true) {
                    shards.served.insert(domain.clone(), (selectors.clone(), t));
                }
            }
            shards.by_secret.insert(name, members);
            shards.total = shards.by_secret.values().map(HashMap::len).sum();
            shards.changes.push(t);
            drop(shards);
            world.changed.notify_waiters();
        }
    });
    rx
}

/// Polls the relay's metrics (every `world.poll_ms`), noting each reload.
fn poll_relay(admin: String, world: Arc<World>) {
    tokio::spawn(async move {
        loop {
            if let Ok(body) = http_get(&admin, "/metrics").await {
                let t = now();
                let series = parse_prometheus(&body, "mailauth_relay_config_");
                let domains = series
                    .get("mailauth_relay_config_domains")
                    .copied()
                    .unwrap_or(0.0);
                let reloads = series
                    .get("mailauth_relay_config_reloads_total{result=\"success\"}")
                    .copied()
                    .unwrap_or(0.0);
                let mut relay = world.relay.lock().unwrap();
                if reloads > relay.reloads {
                    relay.reload_times.push((t, reloads));
                }
                relay.domains = domains;
                relay.reloads = reloads;
                drop(relay);
                world.changed.notify_waiters();
            }
            tokio::time::sleep(Duration::from_millis(world.poll_ms.load(Ordering::Relaxed))).await;
        }
    });
}

/// Publishes records in knot with knsupdate over TCP, in batches.
fn publisher(
    knot: String,
    zone: String,
    world: Arc<World>,
    mut records: tokio::sync::mpsc::UnboundedReceiver<Record>,
) {
    tokio::spawn(async move {
        let (host, port) = knot.rsplit_once(':').unwrap_or((&knot, "53"));
        let (host, port) = (host.to_string(), port.to_string());
        while let Some(first) = records.recv().await {
            let mut batch = vec![first];
            // What arrives within 100 ms goes in the same run.
            let window = tokio::time::sleep(Duration::from_millis(100));
            tokio::pin!(window);
            loop {
                tokio::select! {
                    () = &mut window => break,
                    next = records.recv() => match next {
                        Some(record) => batch.push(record),
                        None => break,
                    },
                }
                if batch.len() >= 2000 {
                    break;
                }
            }
            let mut script = format!("server {host} {port}\nzone {zone}.\n");
            let mut bytes = 0;
            for record in &batch {
                let line = format!(
                    "update add {}. 300 {} {}\n",
                    record.name, record.rtype, record.data
                );
                // One UPDATE message stays well under 64 KiB.
                if bytes + line.len() > 40_000 {
                    script.push_str("send\n");
                    bytes = 0;
                }
                bytes += line.len();
                script.push_str(&line);
            }
            script.push_str("send\nquit\n");
            let mut attempt = 0;
            loop {
                attempt += 1;
                let text = script.clone();
                let output = tokio::task::spawn_blocking(move || {
                    // Over TCP: a batch is larger than a UDP message.
                    let mut child = Command::new("knsupdate")
                        .arg("-v")
                        .arg("-t")
                        .arg("10")
                        .stdin(Stdio::piped())
                        .stdout(Stdio::null())
                        .stderr(Stdio::piped())
                        .spawn()?;
                    let mut stdin = child.stdin.take().expect("piped stdin");
                    std::io::Write::write_all(&mut stdin, text.as_bytes())?;
                    drop(stdin);
                    child.wait_with_output()
                })
                .await
                .unwrap_or_else(|e| die(&format!("knsupdate task: {e}")));
                match output {
                    Ok(out) if out.status.success() => break,
                    Ok(out) if attempt < 5 => eprintln!(
                        "scale bench: knsupdate failed (retrying): {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                    Ok(out) => die(&format!(
                        "knsupdate failed 5 times: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )),
                    Err(e) => die(&format!("knsupdate: {e}")),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let t = now();
            world.publish_batches.fetch_add(1, Ordering::Relaxed);
            world
                .published_records
                .fetch_add(batch.len(), Ordering::Relaxed);
            let mut published = world.published.lock().unwrap();
            for record in batch {
                published.entry(record.name).or_insert(t);
            }
            drop(published);
            world.changed.notify_waiters();
        }
    });
}

// --- the upstream: a minimal SMTP sink that reads DKIM selectors ----------------

/// The `s=` of every DKIM-Signature header, sorted and comma-joined, and the
/// Subject.
fn signature_selectors(message: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(message);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let mut headers: Vec<String> = Vec::new();
    for line in head.split("\r\n") {
        if line.starts_with([' ', '\t']) {
            if let Some(last) = headers.last_mut() {
                last.push_str(line);
            }
        } else {
            headers.push(line.to_string());
        }
    }
    let mut selectors = Vec::new();
    let mut subject = String::new();
    for header in &headers {
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("dkim-signature") {
            for tag in value.split(';') {
                let tag: String = tag.chars().filter(|c| !c.is_whitespace()).collect();
                if let Some(s) = tag.strip_prefix("s=") {
                    selectors.push(s.to_string());
                }
            }
        } else if name.eq_ignore_ascii_case("subject") {
            subject = value.trim().to_string();
        }
    }
    selectors.sort();
    (selectors.join(","), subject)
}

async fn sink_session(stream: tokio::net::TcpStream, world: Arc<World>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    write.write_all(b"220 sink.bench ESMTP\r\n").await?;
    let mut line = Vec::new();
    loop {
        line.clear();
        if read.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let command = String::from_utf8_lossy(&line).to_ascii_uppercase();
        if command.starts_with("EHLO") {
            write
                .write_all(b"250-sink.bench\r\n250 8BITMIME\r\n")
                .await?;
        } else if command.starts_with("DATA") {
            write.write_all(b"354 go ahead\r\n").await?;
            let mut message = Vec::new();
            loop {
                line.clear();
                if read.read_until(b'\n', &mut line).await? == 0 {
                    return Ok(());
                }
                if line == b".\r\n" {
                    break;
                }
                let body = if line.starts_with(b"..") {
                    &line[1..]
                } else {
                    &line[..]
                };
                message.extend_from_slice(body);
            }
            let (selectors, subject) = signature_selectors(&message);
            world
                .received
                .lock()
                .unwrap()
                .insert(subject, (selectors, now()));
            world.changed.notify_waiters();
            write.write_all(b"250 2.0.0 stored\r\n").await?;
        } else if command.starts_with("QUIT") {
            write.write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            write.write_all(b"250 ok\r\n").await?;
        }
    }
}

async fn start_sink(world: Arc<World>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| die(&format!("sink: {e}")));
    let port = listener.local_addr().expect("sink address").port();
    tokio::spawn(async move {
        loop {
            if let Ok((stream, _)) = listener.accept().await {
                let world = world.clone();
                tokio::spawn(async move {
                    let _ = sink_session(stream, world).await;
                });
            }
        }
    });
    port
}

// --- the relay process --------------------------------------------------------------

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| die(&format!("a free port: {e}")))
}

struct RelayProcess {
    pid: u32,
    port: u16,
    admin: String,
    log: PathBuf,
}

fn spawn_relay(args: &Args, kubeconfig: &PathBuf, label: &str) -> RelayProcess {
    let port = free_port();
    let admin_port = free_port();
    let log = args.work.join(format!("relay-{label}.log"));
    let file = std::fs::File::create(&log).unwrap_or_else(|e| die(&format!("{log:?}: {e}")));
    let child = Command::new(&args.operator_bin)
        .arg("relay")
        .args(["--config-secrets", &args.relay])
        .args(["--namespace", &args.relay_namespace])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| die(&format!("running {:?} relay: {e}", args.operator_bin)));
    let pid = child.id();
    // For scale.sh, should this program be killed before it stops the relay.
    let pid_file = args.work.join(format!("relay-{label}.pid"));
    std::fs::write(&pid_file, pid.to_string()).ok();
    CHILDREN.lock().unwrap().push((child, pid_file));
    RelayProcess {
        pid,
        port,
        admin: format!("127.0.0.1:{admin_port}"),
        log,
    }
}

fn stop_relay(relay: &RelayProcess) {
    let mut children = CHILDREN.lock().unwrap();
    if let Some(i) = children.iter().position(|(c, _)| c.id() == relay.pid) {
        let (mut child, pid_file) = children.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(pid_file);
    }
}

fn relay_log_tail(relay: &RelayProcess) -> String {
    let text = std::fs::read_to_string(&relay.log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// A kubeconfig that authenticates as the relay's ServiceAccount.
async fn relay_kubeconfig(client: &Client, args: &Args) -> PathBuf {
    let sa = format!("{}-relay", args.relay);
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &args.relay_namespace);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: Some(6 * 3600),
            bound_object_ref: None,
        }),
        ..TokenRequest::default()
    };
    let token = accounts
        .create_token_request(&sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| die(&format!("a token for {sa}: {e}")))
        .status
        .map(|s| s.token)
        .unwrap_or_else(|| die("the TokenRequest returned no token"));
    let admin_path = std::env::var("KUBECONFIG").unwrap_or_else(|_| die("set KUBECONFIG"));
    let admin: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(&admin_path)
            .unwrap_or_else(|e| die(&format!("{admin_path}: {e}"))),
    )
    .unwrap_or_else(|e| die(&format!("{admin_path}: {e}")));
    let cluster = &admin["clusters"][0]["cluster"];
    let kubeconfig = serde_json::json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "local", "cluster": {
            "server": cluster["server"].as_str(),
            "certificate-authority-data": cluster["certificate-authority-data"].as_str(),
        }}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": sa, "namespace": args.relay_namespace}}],
        "current-context": "sa",
    });
    let path = args.work.join("relay.kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kubeconfig).expect("yaml"))
        .unwrap_or_else(|e| die(&format!("{path:?}: {e}")));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    }
    path
}

/// Sends one message as `user` from `from_domain`, subject `subject`.
async fn send_message(
    port: u16,
    user: &str,
    password: &str,
    from_domain: &str,
    subject: &str,
) -> Result<(), String> {
    let run = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        tcp.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut client = SmtpClient {
            stream: tcp,
            timeout: Duration::from_secs(30),
        };
        use mail_send::smtp::AssertReply as _;
        client
            .read()
            .await
            .map_err(|e| e.to_string())?
            .assert_positive_completion()
            .map_err(|e| e.to_string())?;
        let capabilities = client.ehlo("bench.test").await.map_err(|e| e.to_string())?;
        client
            .authenticate(
                mail_send::Credentials::new(user.to_string(), password.to_string()),
                &capabilities,
            )
            .await
            .map_err(|e| format!("AUTH: {e}"))?;
        let from = format!("alice@{from_domain}");
        let body = format!(
            "From: Alice <{from}>\r\nTo: Bob <bob@example.net>\r\nSubject: {subject}\r\n\
             Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{}@{from_domain}>\r\n\r\nRotation probe.\r\n",
            subject.replace(' ', "-")
        );
        client
            .send(Message::new(
                from.as_str(),
                ["bob@example.net"],
                body.as_bytes(),
            ))
            .await
            .map_err(|e| e.to_string())?;
        let _ = client.quit().await;
        Ok::<(), String>(())
    };
    tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .map_err(|_| "timed out".to_string())?
}

// --- statistics ----------------------------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn report_distribution(name: &str, values: &mut [f64]) {
    values.sort_by(f64::total_cmp);
    println!("{name}_count {}", values.len());
    println!("{name}_p50 {:.3}", percentile(values, 0.5));
    println!("{name}_p90 {:.3}", percentile(values, 0.9));
    println!("{name}_p99 {:.3}", percentile(values, 0.99));
    println!(
        "{name}_max {:.3}",
        values.last().copied().unwrap_or(f64::NAN)
    );
    println!(
        "{name}_min {:.3}",
        values.first().copied().unwrap_or(f64::NAN)
    );
}

fn algorithm_of(args: &Args, i: usize) -> &'static str {
    match args.algorithm.as_str() {
        "RSA" => "RSA",
        "Ed25519" => "Ed25519",
        _ if i.is_multiple_of(2) => "RSA",
        _ => "Ed25519",
    }
}

fn md_name(i: usize) -> String {
    format!("d{i:05}")
}

// --- the run ------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let args = parse_args();
    now();
    let client = Client::try_default()
        .await
        .unwrap_or_else(|e| die(&format!("kube client (set KUBECONFIG): {e}")));
    let world = World::new();
    let n = args.count as f64;

    // The upstream, the MailRelay, the relay process.
    let sink_port = start_sink(world.clone()).await;
    let relays: Api<MailRelay> = Api::namespaced(client.clone(), &args.relay_namespace);
    let relay_manifest: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay",
        "metadata": {"name": args.relay},
        "spec": {
            "hostname": "relay.scale.bench",
            "listener": {"allowPlaintextAuth": true},
            "upstream": {"host": "127.0.0.1", "port": sink_port, "tls": "None"},
            "spf": {"egressIPs": ["192.0.2.10"]},
            "allowedNamespaces": {"from": "Selector",
                                  "selector": {"matchLabels": {"mailauth.dev/bench": "scale"}}},
            "limits": {"messagesPerMinute": 6000}
        }
    }))
    .expect("MailRelay manifest");
    relays
        .create(&PostParams::default(), &relay_manifest)
        .await
        .unwrap_or_else(|e| die(&format!("creating the MailRelay: {e}")));
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &args.relay_namespace);
    let binding = format!("{}-relay", args.relay);
    let settings = mailauth_operator::relay::config::settings_secret_name(&args.relay);
    let secrets_relay: Api<Secret> = Api::namespaced(client.clone(), &args.relay_namespace);
    for (what, done) in [
        (
            "the relay's RoleBinding",
            tokio::time::timeout(
                Duration::from_secs(60),
                kube::runtime::wait::await_condition(
                    bindings,
                    &binding,
                    |b: Option<&RoleBinding>| b.is_some(),
                ),
            )
            .await
            .is_ok(),
        ),
        (
            "the relay's settings Secret",
            tokio::time::timeout(
                Duration::from_secs(60),
                kube::runtime::wait::await_condition(
                    secrets_relay.clone(),
                    &settings,
                    |s: Option<&Secret>| s.is_some(),
                ),
            )
            .await
            .is_ok(),
        ),
    ] {
        if !done {
            die(&format!("{what} was not rendered within 60 s"));
        }
    }
    let kubeconfig = relay_kubeconfig(&client, &args).await;
    let relay = spawn_relay(&args, &kubeconfig, "main");
    let ready_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if http_get(&relay.admin, "/readyz")
            .await
            .is_ok_and(|body| body.starts_with("HTTP/1.1 200") || body.starts_with("HTTP/1.0 200"))
        {
            break;
        }
        sample_proc(relay.pid, "relay");
        if Instant::now() > ready_deadline {
            die(&format!(
                "the relay did not become ready within 60 s:\n{}",
                relay_log_tail(&relay)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    progress(&format!(
        "relay pid {} ready on 127.0.0.1:{} (admin {}), upstream sink on {sink_port}",
        relay.pid, relay.port, relay.admin
    ));
    poll_relay(relay.admin.clone(), world.clone());

    // Watches and the tenant's DNS publisher.
    let (publish_tx, publish_rx) = tokio::sync::mpsc::unbounded_channel();
    publisher(
        args.knot.clone(),
        args.zone.clone(),
        world.clone(),
        publish_rx,
    );
    let md_init = watch_domains(
        client.clone(),
        args.tenant_namespace.clone(),
        world.clone(),
        publish_tx,
    );
    let shard_init = watch_shards(
        client.clone(),
        args.relay_namespace.clone(),
        args.relay.clone(),
        world.clone(),
    );
    for (rx, what) in [(md_init, "MailDomain"), (shard_init, "shard Secret")] {
        if tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .is_err()
        {
            die(&format!("the {what} watch did not list within 60 s"));
        }
    }
    if !world.domains.lock().unwrap().is_empty() {
        die("the tenant namespace is not empty: use a fresh one");
    }

    // --- 1-4: onboarding -------------------------------------------------------------
    let controller0 = sample_proc(args.controller_pid, "controller");
    let relay0 = sample_proc(relay.pid, "relay");
    let machine0 = machine_cpu();
    let peers0: Vec<Option<f64>> = args.peers.iter().map(|(_, p)| process_cpu(*p)).collect();
    let counters0 = controller_counters(&args.controller_metrics).await;
    let api0 = apiserver_requests(&client).await;
    let reloads0 = world.relay.lock().unwrap().reloads;
    let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let started = now();
    progress(&format!(
        "creating {} {} MailDomains in {}",
        args.count, args.algorithm, args.tenant_namespace
    ));
    let domains_api: Api<MailDomain> = Api::namespaced(client.clone(), &args.tenant_namespace);
    let create_retries = Arc::new(AtomicU64::new(0));
    let results: Vec<Result<(), String>> = futures::stream::iter(0..args.count)
        .map(|i| {
            let api = domains_api.clone();
            let retries = create_retries.clone();
            let manifest = serde_json::json!({
                "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain",
                "metadata": {"name": md_name(i)},
                "spec": {
                    "domain": format!("{}.{}", md_name(i), args.zone),
                    "relayRef": {"name": args.relay, "namespace": args.relay_namespace},
                    "dkim": {"algorithm": algorithm_of(&args, i)},
                },
            });
            async move {
                let md: MailDomain =
                    serde_json::from_value(manifest).map_err(|e| format!("manifest: {e}"))?;
                let mut last = String::new();
                for attempt in 0..5 {
                    match api.create(&PostParams::default(), &md).await {
                        Ok(_) => return Ok(()),
                        Err(err) => {
                            retries.fetch_add(1, Ordering::Relaxed);
                            last = err.to_string();
                            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                        }
                    }
                }
                Err(format!("creating {}: {last}", md.name_any()))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    if let Some(Err(err)) = results.iter().find(|r| r.is_err()) {
        die(err);
    }
    let created = now();
    progress(&format!("created in {:.1}s", created - started));

    let deadline = Instant::now() + args.timeout;
    let mut next_report = now() + 10.0;
    let (mut all_keys_ready, mut all_ready, mut all_in_config) = (None, None, None);
    loop {
        let changed = world.changed.notified();
        let t = now();
        let (keys_ready, ready) = {
            let domains = world.domains.lock().unwrap();
            (
                domains.values().filter(|d| d.keys_ready.is_some()).count(),
                domains.values().filter(|d| d.ready.is_some()).count(),
            )
        };
        let in_config = world.shards.lock().unwrap().total;
        let served = world.relay.lock().unwrap().domains;
        if all_keys_ready.is_none() && keys_ready >= args.count {
            all_keys_ready = Some(t);
        }
        if all_ready.is_none() && ready >= args.count {
            all_ready = Some(t);
        }
        if all_in_config.is_none() && in_config >= args.count {
            all_in_config = Some(t);
        }
        if served >= n && all_in_config.is_some() {
            break;
        }
        if t >= next_report {
            next_report = t + 10.0;
            let controller = sample_proc(args.controller_pid, "controller");
            sample_proc(relay.pid, "relay");
            progress(&format!(
                "KeysReady {keys_ready}, Ready {ready}, in shards {in_config}, relay serves {served}; \
                 published {} records in {} batches; controller {:.0} CPU s, {:.0} MiB",
                world.published_records.load(Ordering::Relaxed),
                world.publish_batches.load(Ordering::Relaxed),
                controller.cpu_seconds - controller0.cpu_seconds,
                mib(controller.rss_kib)
            ));
        }
        if Instant::now() >= deadline {
            die(&format!(
                "after {}s only {ready}/{} Ready, {in_config} in the relay config, {served} served",
                args.timeout.as_secs(),
                args.count
            ));
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), changed).await;
    }
    let served_at = now();
    let controller1 = sample_proc(args.controller_pid, "controller");
    let relay1 = sample_proc(relay.pid, "relay");
    let machine1 = machine_cpu();
    let peers1: Vec<Option<f64>> = args.peers.iter().map(|(_, p)| process_cpu(*p)).collect();
    let counters1 = controller_counters(&args.controller_metrics).await;
    let api1 = apiserver_requests(&client).await;
    let reloads1 = world.relay.lock().unwrap().reloads;
    progress(&format!(
        "all {} served after {:.1}s",
        args.count,
        served_at - started
    ));

    println!("algorithm {}", args.algorithm);
    println!("domains {}", args.count);
    println!("loadavg_before {}", load0.split(' ').next().unwrap_or("?"));
    println!("create_seconds {:.3}", created - started);
    println!("create_retries {}", create_retries.load(Ordering::Relaxed));
    println!(
        "all_keys_ready_seconds {:.3}",
        all_keys_ready.unwrap_or(served_at) - started
    );
    println!(
        "all_ready_seconds {:.3}",
        all_ready.unwrap_or(served_at) - started
    );
    println!(
        "all_in_config_seconds {:.3}",
        all_in_config.unwrap_or(served_at) - started
    );
    println!("all_served_seconds {:.3}", served_at - started);
    {
        let shards = world.shards.lock().unwrap();
        let mut in_config: Vec<f64> = shards.served.values().map(|(_, t)| t - started).collect();
        report_distribution("in_config_seconds", &mut in_config);
        let domains = world.domains.lock().unwrap();
        let mut ready: Vec<f64> = domains
            .values()
            .filter_map(|d| d.ready)
            .map(|t| t - started)
            .collect();
        report_distribution("ready_seconds", &mut ready);
    }
    println!("domains_per_second {:.1}", n / (served_at - started));
    println!(
        "published_records {}",
        world.published_records.load(Ordering::Relaxed)
    );
    println!(
        "publish_batches {}",
        world.publish_batches.load(Ordering::Relaxed)
    );
    let cpu = controller1.cpu_seconds - controller0.cpu_seconds;
    println!("controller_cpu_seconds {cpu:.2}");
    println!("controller_cpu_ms_per_domain {:.2}", cpu * 1000.0 / n);
    println!("controller_peak_rss_mib {:.1}", mib(controller1.hwm_kib));
    println!("controller_rss_mib {:.1}", mib(controller1.rss_kib));
    println!(
        "relay_onboarding_cpu_seconds {:.2}",
        relay1.cpu_seconds - relay0.cpu_seconds
    );
    println!("relay_onboarding_reloads {}", reloads1 - reloads0);
    println!("relay_rss_mib {:.1}", mib(relay1.rss_kib));
    println!("relay_peak_rss_mib {:.1}", mib(relay1.hwm_kib));
    println!("machine_busy_core_seconds {:.2}", machine1.0 - machine0.0);
    println!(
        "machine_busy_percent {:.1}",
        (machine1.0 - machine0.0) * 100.0 / (machine1.1 - machine0.1).max(1e-9)
    );
    for (((name, _), before), after) in args.peers.iter().zip(&peers0).zip(&peers1) {
        if let (Some(before), Some(after)) = (before, after) {
            println!("peer_cpu_seconds_{name} {:.2}", after - before);
        }
    }
    for name in [
        "mailauth_reconciles_total",
        "mailauth_keys_generated_total",
        "mailauth_status_writes_total",
        "mailauth_secret_writes_total",
        "mailauth_dns_checks_total",
    ] {
        println!(
            "{name} {}",
            counters1.get(name).copied().unwrap_or(0.0)
                - counters0.get(name).copied().unwrap_or(0.0)
        );
    }
    let own_creates = n + create_retries.load(Ordering::Relaxed) as f64;
    report_requests("onboard", &diff(&api1, &api0), own_creates, n);

    // --- steady state -------------------------------------------------------------------
    if !args.steady.is_zero() {
        // Steady means settled: the controller has stopped reconciling
        // (the last status writes of the onboarding set off more), for 10 s.
        let settle_started = now();
        let mut last = controller_counters(&args.controller_metrics)
            .await
            .get("mailauth_reconciles_total")
            .copied()
            .unwrap_or(0.0);
        let mut quiet_since = now();
        while now() - quiet_since < 10.0 && now() - settle_started < 300.0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let reconciles = controller_counters(&args.controller_metrics)
                .await
                .get("mailauth_reconciles_total")
                .copied()
                .unwrap_or(0.0);
            if reconciles != last {
                last = reconciles;
                quiet_since = now();
            }
        }
        println!("settle_seconds {:.1}", now() - settle_started);
        progress(&format!("steady state for {}s", args.steady.as_secs()));
        let c0 = sample_proc(args.controller_pid, "controller");
        let r0 = sample_proc(relay.pid, "relay");
        let k0 = controller_counters(&args.controller_metrics).await;
        let a0 = apiserver_requests(&client).await;
        tokio::time::sleep(args.steady).await;
        let c1 = sample_proc(args.controller_pid, "controller");
        let r1 = sample_proc(relay.pid, "relay");
        let k1 = controller_counters(&args.controller_metrics).await;
        let a1 = apiserver_requests(&client).await;
        let seconds = args.steady.as_secs_f64();
        println!("steady_seconds {seconds}");
        println!(
            "steady_controller_cpu_percent_of_core {:.2}",
            (c1.cpu_seconds - c0.cpu_seconds) * 100.0 / seconds
        );
        println!(
            "steady_relay_cpu_percent_of_core {:.2}",
            (r1.cpu_seconds - r0.cpu_seconds) * 100.0 / seconds
        );
        println!("steady_controller_rss_mib {:.1}", mib(c1.rss_kib));
        println!("steady_relay_rss_mib {:.1}", mib(r1.rss_kib));
        for name in [
            "mailauth_reconciles_total",
            "mailauth_status_writes_total",
            "mailauth_secret_writes_total",
            "mailauth_dns_checks_total",
        ] {
            println!(
                "steady_{name} {}",
                k1.get(name).copied().unwrap_or(0.0) - k0.get(name).copied().unwrap_or(0.0)
            );
        }
        let delta = diff(&a1, &a0);
        report_requests("steady", &delta, 0.0, 0.0);
        let writes: f64 = delta
            .iter()
            .filter(|(k, _)| counts_for_us(k))
            .filter(|(k, _)| {
                ["POST ", "PUT ", "PATCH ", "APPLY ", "DELETE "]
                    .iter()
                    .any(|v| k.starts_with(v))
            })
            .map(|(_, v)| v)
            .sum::<f64>()
            + 0.0;
        println!(
            "steady_writes_per_domain_per_day {:.4}",
            writes / n * 86400.0 / seconds
        );
    }

    // --- 4: a fresh relay loading all N domains -----------------------------------------
    progress("a second relay process loading the whole config");
    let spawned = now();
    let fresh = spawn_relay(&args, &kubeconfig, "fresh");
    let mut fresh_ready = None;
    let fresh_loaded = loop {
        let t = now();
        if let Ok(body) = http_get(&fresh.admin, "/metrics").await {
            let domains = parse_prometheus(&body, "mailauth_relay_config_domains")
                .get("mailauth_relay_config_domains")
                .copied()
                .unwrap_or(0.0);
            if fresh_ready.is_none() && domains > 0.0 {
                fresh_ready = Some(t);
            }
            if domains >= n {
                break t;
            }
        }
        sample_proc(fresh.pid, "second relay");
        if t - spawned > 300.0 {
            die(&format!(
                "the second relay did not load {} domains in 300 s:\n{}",
                args.count,
                relay_log_tail(&fresh)
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let fresh_sample = sample_proc(fresh.pid, "second relay");
    println!("fresh_relay_load_seconds {:.3}", fresh_loaded - spawned);
    println!("fresh_relay_cpu_seconds {:.2}", fresh_sample.cpu_seconds);
    println!("fresh_relay_rss_mib {:.1}", mib(fresh_sample.rss_kib));
    println!("fresh_relay_peak_rss_mib {:.1}", mib(fresh_sample.hwm_kib));
    stop_relay(&fresh);

    // --- 5: rotations, one after another --------------------------------------------------
    if args.rotations > 0 {
        progress(&format!("{} rotations, one after another", args.rotations));
        world.poll_ms.store(10, Ordering::Relaxed);
        let secrets_tenant: Api<Secret> = Api::namespaced(client.clone(), &args.tenant_namespace);
        let relay_before = sample_proc(relay.pid, "relay");
        let controller_before = sample_proc(args.controller_pid, "controller");
        let api_before = apiserver_requests(&client).await;
        let step = (args.count / args.rotations).max(1);
        let mut rows: Vec<[f64; 7]> = Vec::new();
        let mut stale_signatures = 0usize;
        let mut probes = 0usize;
        let mut algorithms: BTreeMap<&str, usize> = BTreeMap::new();
        for r in 0..args.rotations {
            let i = ((r * step) + (r % 2)) % args.count;
            let name = md_name(i);
            let domain = format!("{name}.{}", args.zone);
            *algorithms.entry(algorithm_of(&args, i)).or_default() += 1;
            let credentials = secrets_tenant
                .get(&format!("{name}-smtp"))
                .await
                .unwrap_or_else(|e| die(&format!("{name}-smtp: {e}")));
            let field = |key: &str| -> String {
                credentials
                    .data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .unwrap_or_else(|| die(&format!("{name}-smtp has no {key}")))
            };
            let (user, password) = (field("username"), field("password"));
            let old_active = world
                .domains
                .lock()
                .unwrap()
                .get(&name)
                .and_then(|d| d.active.clone())
                .unwrap_or_else(|| die(&format!("{name} has no active key")));
            let reloads_at_start = world.relay.lock().unwrap().reloads;

            let t_request = now();
            let patch = serde_json::json!({"metadata": {"annotations": {
                mailauth_operator::api::ROTATE_ANNOTATION: format!("scale-{r}-{}", fastrand::u32(..))
            }}});
            domains_api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .unwrap_or_else(|e| die(&format!("annotating {name}: {e}")));
            let what = format!("rotation {r} of {name}: the new key Active");
            let (new_active, t_active, t_pending) = world
                .until(Duration::from_secs(120), &what, || {
                    let domains = world.domains.lock().unwrap();
                    let state = domains.get(&name)?;
                    let active = state.active.clone()?;
                    (active != old_active).then(|| {
                        let pending = active
                            .split(',')
                            .filter_map(|s| state.pending.get(s))
                            .fold(f64::NAN, |a: f64, b| a.min(*b));
                        (active, state.active_since, pending)
                    })
                })
                .await;
            let t_published = {
                let published = world.published.lock().unwrap();
                new_active
                    .split(',')
                    .filter_map(|s| published.get(&format!("{s}._domainkey.{domain}")))
                    .fold(f64::NAN, |a: f64, b| a.max(*b))
            };
            // Probes: one new connection after another, until the sink gets
            // a message signed with the new selector.
            let mut sorted: Vec<&str> = new_active.split(',').collect();
            sorted.sort();
            let wanted = sorted.join(",");
            let t_signed = loop {
                probes += 1;
                let subject = format!("scale rotation {r} probe {probes}");
                if let Err(err) =
                    send_message(relay.port, &user, &password, &domain, &subject).await
                {
                    die(&format!(
                        "rotation {r}: sending as {domain} failed: {err}\n{}",
                        relay_log_tail(&relay)
                    ));
                }
                let (selectors, at) = world
                    .until(
                        Duration::from_secs(30),
                        "the sink to receive a probe",
                        || world.received.lock().unwrap().remove(&subject),
                    )
                    .await;
                if selectors == wanted {
                    break at;
                }
                if selectors != old_active.split(',').collect::<Vec<_>>().join(",") {
                    die(&format!(
                        "rotation {r}: a message from {domain} was signed with {selectors:?}, neither the old nor the new key"
                    ));
                }
                stale_signatures += 1;
                if now() - t_active > 60.0 {
                    die(&format!(
                        "rotation {r}: the relay still signs {domain} with the old key 60 s after activation"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let t_shard = world
                .until(
                    Duration::from_secs(30),
                    "the shard to carry the new key",
                    || {
                        let shards = world.shards.lock().unwrap();
                        shards
                            .served
                            .get(&domain)
                            .filter(|(s, _)| *s == wanted)
                            .map(|(_, t)| *t)
                    },
                )
                .await;
            let t_reload = world
                .until(Duration::from_secs(30), "the relay to reload", || {
                    let relay = world.relay.lock().unwrap();
                    relay
                        .reload_times
                        .iter()
                        .find(|(_, count)| *count > reloads_at_start)
                        .map(|(t, _)| *t)
                })
                .await;
            rows.push([
                t_request,
                t_pending,
                t_published,
                t_active,
                t_shard,
                t_reload,
                t_signed,
            ]);
            if (r + 1) % 10 == 0 {
                progress(&format!(
                    "rotation {}: request to signing {:.2}s (published to signing {:.2}s, active to signing {:.2}s)",
                    r + 1,
                    t_signed - t_request,
                    t_signed - t_published,
                    t_signed - t_active
                ));
            }
        }
        let relay_after = sample_proc(relay.pid, "relay");
        let controller_after = sample_proc(args.controller_pid, "controller");
        let api_after = apiserver_requests(&client).await;
        let column = |f: &dyn Fn(&[f64; 7]) -> f64| -> Vec<f64> { rows.iter().map(f).collect() };
        println!("rotations {}", rows.len());
        for (algorithm, count) in &algorithms {
            println!("rotations_{algorithm} {count}");
        }
        report_distribution("rotation_request_to_signed", &mut column(&|r| r[6] - r[0]));
        report_distribution("rotation_request_to_pending", &mut column(&|r| r[1] - r[0]));
        report_distribution(
            "rotation_pending_to_published",
            &mut column(&|r| r[2] - r[1]),
        );
        report_distribution(
            "rotation_published_to_active",
            &mut column(&|r| r[3] - r[2]),
        );
        report_distribution(
            "rotation_published_to_signed",
            &mut column(&|r| r[6] - r[2]),
        );
        report_distribution("rotation_active_to_shard", &mut column(&|r| r[4] - r[3]));
        report_distribution("rotation_shard_to_reload", &mut column(&|r| r[5] - r[4]));
        report_distribution("rotation_active_to_signed", &mut column(&|r| r[6] - r[3]));
        println!("rotation_probes {probes}");
        println!("rotation_probes_old_key {stale_signatures}");
        println!(
            "relay_rss_after_rotations_mib {:.1}",
            mib(relay_after.rss_kib)
        );
        println!(
            "relay_peak_rss_after_rotations_mib {:.1}",
            mib(relay_after.hwm_kib)
        );
        println!(
            "rotation_relay_cpu_seconds {:.2}",
            relay_after.cpu_seconds - relay_before.cpu_seconds
        );
        println!(
            "rotation_controller_cpu_seconds {:.2}",
            controller_after.cpu_seconds - controller_before.cpu_seconds
        );
        report_requests(
            "rotation",
            &diff(&api_after, &api_before),
            // The bench's own: an annotation patch and a credentials GET
            // per rotation.
            2.0 * rows.len() as f64,
            rows.len() as f64,
        );
        let mut rows_file =
            String::from("rotation request pending published active shard reload signed\n");
        for (i, row) in rows.iter().enumerate() {
            rows_file.push_str(&format!(
                "{i} {}\n",
                row.iter()
                    .map(|t| format!("{t:.3}"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ));
        }
        let _ = std::fs::write(args.work.join("rotations.txt"), rows_file);
    }
    let relay_end = sample_proc(relay.pid, "relay");
    println!("relay_rss_end_mib {:.1}", mib(relay_end.rss_kib));
    println!("relay_peak_rss_end_mib {:.1}", mib(relay_end.hwm_kib));
    stop_children();
}
