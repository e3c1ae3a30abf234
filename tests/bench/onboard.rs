//! Onboarding benchmark: N MailDomains created at once in an empty namespace
//! that a running controller watches; the time until every one is
//! `KeysReady=True` (or `--condition`, e.g. `Ready` with `--provider` when a
//! DNSProvider publishes the records), seen through a watch (never by
//! polling objects).
//!
//! ```text
//! KUBECONFIG=target/cluster/kubeconfig cargo bench --bench onboard -- \
//!   --namespace bench-x --count 1000 --algorithm RSA \
//!   --controller-pid PID --metrics 127.0.0.1:PORT [--steady-seconds 60]
//! ```
//!
//! Besides the time it samples the controller process (CPU seconds from
//! /proc/PID/stat, peak memory VmHWM from /proc/PID/status), its Prometheus
//! counters, and counts every write the API server made in the namespace by
//! watching MailDomains, Secrets and Events: each watch event after the
//! initial list is one stored change (a server-side apply that changes
//! nothing stores nothing and is not seen). After all are ready it keeps
//! watching for `--steady-seconds` and reports what happened in that window.
//!
//! Exits non-zero (loudly) when a create fails, the controller dies, or not
//! all domains are ready within `--timeout-seconds`. Prints `key value`
//! lines for tests/bench/bench.sh.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Event as KubeEvent, Secret};
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::ApiResource;
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use mailauth_operator::api::MailDomain;
use tokio::sync::{Notify, oneshot};

struct Args {
    namespace: String,
    count: usize,
    algorithm: String,
    concurrency: usize,
    domain_suffix: String,
    /// `spec.dns.providerRef.name` of every MailDomain (publishing bench).
    provider: Option<String>,
    /// The condition that counts as onboarded (`KeysReady`, or `Ready`
    /// when the records are published by a provider).
    condition: String,
    controller_pid: u32,
    metrics: String,
    timeout: Duration,
    steady: Duration,
    /// Other processes whose CPU to report (`LABEL:PID`), e.g. the API server.
    peers: Vec<(String, u32)>,
}

fn parse_args() -> Args {
    let mut args = Args {
        namespace: String::new(),
        count: 1000,
        algorithm: "RSA".into(),
        concurrency: 32,
        domain_suffix: "onboard.test".into(),
        provider: None,
        condition: "KeysReady".into(),
        controller_pid: 0,
        metrics: String::new(),
        timeout: Duration::from_secs(3600),
        steady: Duration::ZERO,
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
            "--namespace" => args.namespace = value(),
            "--count" => args.count = number(value()) as usize,
            "--algorithm" => args.algorithm = value(),
            "--concurrency" => args.concurrency = number(value()).max(1) as usize,
            "--domain-suffix" => args.domain_suffix = value(),
            "--provider" => args.provider = Some(value()),
            "--condition" => args.condition = value(),
            "--controller-pid" => args.controller_pid = number(value()) as u32,
            "--metrics" => args.metrics = value(),
            "--timeout-seconds" => args.timeout = Duration::from_secs(number(value())),
            "--steady-seconds" => args.steady = Duration::from_secs(number(value())),
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
    if args.namespace.is_empty() || args.controller_pid == 0 || args.metrics.is_empty() {
        die("--namespace, --controller-pid and --metrics are required");
    }
    if !["RSA", "Ed25519", "Dual"].contains(&args.algorithm.as_str()) {
        die("--algorithm: RSA, Ed25519 or Dual");
    }
    args
}

fn die(message: &str) -> ! {
    eprintln!("onboard bench: FAILED: {message}");
    std::process::exit(1);
}

/// Changes seen by one watch after its initial list.
#[derive(Default)]
struct Counter {
    applied: AtomicU64,
    deleted: AtomicU64,
    relists: AtomicU64,
}

impl Counter {
    fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
}

/// Readiness as seen by the MailDomain watch.
struct Readiness {
    started: Mutex<Option<Instant>>,
    /// Name -> seconds after the start when it was first seen KeysReady.
    ready_at: Mutex<HashMap<String, f64>>,
    /// The last condition summary of every domain not ready yet.
    last_seen: Mutex<HashMap<String, String>>,
    all_ready: Notify,
    count: usize,
}

fn condition_true(obj: &DynamicObject, condition: &str) -> (bool, String) {
    let conditions = obj.data["status"]["conditions"].as_array();
    let Some(conditions) = conditions else {
        return (false, "no status conditions yet".into());
    };
    for c in conditions {
        if c["type"] == condition {
            let ready = c["status"] == "True";
            return (
                ready,
                format!(
                    "{condition}={} reason={} message={}",
                    c["status"].as_str().unwrap_or("?"),
                    c["reason"].as_str().unwrap_or("?"),
                    c["message"].as_str().unwrap_or("?")
                ),
            );
        }
    }
    (false, format!("no {condition} condition"))
}

/// What /proc says about the controller process.
#[derive(Clone, Copy, Default)]
struct ProcSample {
    cpu_seconds: f64,
    hwm_kib: u64,
    rss_kib: u64,
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

fn sample_proc(pid: u32, ticks: f64) -> ProcSample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| die(&format!("the controller (pid {pid}) is gone: {e}")));
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap_or(0) + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 here (0-based 11, 12).
    let utime: f64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    let stime: f64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0.0);
    if fields.first() == Some(&"Z") {
        die(&format!("the controller (pid {pid}) exited"));
    }
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
        cpu_seconds: (utime + stime) / ticks,
        hwm_kib: kib("VmHWM:"),
        rss_kib: kib("VmRSS:"),
    }
}

/// CPU seconds a process has used, if it still runs.
fn process_cpu(pid: u32, ticks: f64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks)
}

/// Busy and total core-seconds of the whole machine, from /proc/stat.
fn machine_cpu(ticks: f64) -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest is in user).
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / ticks, total / ticks)
}

/// The controller's `mailauth_*` counters, summed over labels.
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let fetch = || -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut body = String::new();
        stream.read_to_string(&mut body)?;
        Ok(body)
    };
    let body = fetch().unwrap_or_else(|e| die(&format!("scraping http://{addr}/metrics: {e}")));
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if !line.starts_with("mailauth_") {
            continue;
        }
        let (name_labels, value) = match line.rsplit_once(' ') {
            Some(pair) => pair,
            None => continue,
        };
        let name = name_labels.split('{').next().unwrap_or(name_labels);
        if let Ok(v) = value.parse::<f64>() {
            *out.entry(name.to_string()).or_insert(0.0) += v;
        }
    }
    out
}

fn delta(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, name: &str) -> f64 {
    after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0)
}

async fn wait_init(rx: oneshot::Receiver<()>, what: &str) {
    match tokio::time::timeout(Duration::from_secs(60), rx).await {
        Ok(Ok(())) => {}
        _ => die(&format!(
            "the {what} watch did not complete its initial list"
        )),
    }
}

/// Counts the changes of a metadata watch after its initial list.
fn count_changes<K>(
    api: Api<PartialObjectMeta<K>>,
    counter: Arc<Counter>,
    what: &'static str,
) -> oneshot::Receiver<()>
where
    K: kube::Resource + Clone + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
    PartialObjectMeta<K>:
        kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    <PartialObjectMeta<K> as kube::Resource>::DynamicType: Default,
{
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut stream = kube::runtime::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listed = false;
        loop {
            match stream.try_next().await {
                Ok(Some(Event::Init)) => {
                    if listed {
                        counter.relists.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Some(Event::InitDone)) => {
                    listed = true;
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(Some(Event::Apply(_))) => {
                    counter.applied.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Event::Delete(_))) => {
                    counter.deleted.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Some(Event::InitApply(_))) => {}
                Ok(None) => break,
                Err(err) => eprintln!("onboard bench: {what} watch error (retrying): {err}"),
            }
        }
    });
    rx
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let ticks = clock_ticks();
    let client = Client::try_default()
        .await
        .unwrap_or_else(|e| die(&format!("kube client (set KUBECONFIG): {e}")));
    let resource = ApiResource::erase::<MailDomain>(&());
    let domains: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &args.namespace, &resource);

    // Watches first, so nothing that happens after the first create is missed.
    let secrets = Arc::new(Counter::default());
    let events = Arc::new(Counter::default());
    let md_changes = Arc::new(Counter::default());
    let secrets_init = count_changes::<Secret>(
        Api::namespaced(client.clone(), &args.namespace),
        secrets.clone(),
        "Secret",
    );
    let events_init = count_changes::<KubeEvent>(
        Api::namespaced(client.clone(), &args.namespace),
        events.clone(),
        "Event",
    );
    let readiness = Arc::new(Readiness {
        started: Mutex::new(None),
        ready_at: Mutex::new(HashMap::new()),
        last_seen: Mutex::new(HashMap::new()),
        all_ready: Notify::new(),
        count: args.count,
    });
    let (md_tx, md_init) = oneshot::channel();
    {
        let readiness = readiness.clone();
        let md_changes = md_changes.clone();
        let domains = domains.clone();
        let condition = args.condition.clone();
        tokio::spawn(async move {
            let mut tx = Some(md_tx);
            let mut stream = kube::runtime::watcher(domains, watcher::Config::default())
                .default_backoff()
                .boxed();
            let mut listed = false;
            loop {
                let obj = match stream.try_next().await {
                    Ok(Some(Event::Init)) => {
                        if listed {
                            md_changes.relists.fetch_add(1, Ordering::Relaxed);
                        }
                        continue;
                    }
                    Ok(Some(Event::InitDone)) => {
                        listed = true;
                        if let Some(tx) = tx.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    Ok(Some(Event::Delete(_))) => {
                        md_changes.deleted.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Ok(Some(Event::Apply(obj))) => {
                        md_changes.applied.fetch_add(1, Ordering::Relaxed);
                        obj
                    }
                    Ok(Some(Event::InitApply(obj))) => obj,
                    Ok(None) => break,
                    Err(err) => {
                        eprintln!("onboard bench: MailDomain watch error (retrying): {err}");
                        continue;
                    }
                };
                let name = obj.name_any();
                let (ready, summary) = condition_true(&obj, &condition);
                if ready {
                    let elapsed = readiness
                        .started
                        .lock()
                        .unwrap()
                        .map_or(0.0, |s| s.elapsed().as_secs_f64());
                    let mut ready_at = readiness.ready_at.lock().unwrap();
                    if !ready_at.contains_key(&name) {
                        ready_at.insert(name.clone(), elapsed);
                        readiness.last_seen.lock().unwrap().remove(&name);
                        if ready_at.len() >= readiness.count {
                            readiness.all_ready.notify_one();
                        }
                    }
                } else {
                    readiness.last_seen.lock().unwrap().insert(name, summary);
                }
            }
        });
    }
    wait_init(md_init, "MailDomain").await;
    wait_init(secrets_init, "Secret").await;
    wait_init(events_init, "Event").await;
    if !readiness.ready_at.lock().unwrap().is_empty()
        || !readiness.last_seen.lock().unwrap().is_empty()
    {
        die(&format!(
            "namespace {} is not empty: use a fresh one",
            args.namespace
        ));
    }

    let proc0 = sample_proc(args.controller_pid, ticks);
    let machine0 = machine_cpu(ticks);
    let peers0: Vec<Option<f64>> = args
        .peers
        .iter()
        .map(|(_, pid)| process_cpu(*pid, ticks))
        .collect();
    let metrics0 = scrape(&args.metrics);
    let started = Instant::now();
    *readiness.started.lock().unwrap() = Some(started);

    // Create them all, `concurrency` requests in flight.
    let algorithm = args.algorithm.clone();
    let suffix = args.domain_suffix.clone();
    let provider = args.provider.clone();
    let create_errors = Arc::new(AtomicU64::new(0));
    let results: Vec<Result<(), String>> = futures::stream::iter(0..args.count)
        .map(|i| {
            let domains = domains.clone();
            let algorithm = algorithm.clone();
            let suffix = suffix.clone();
            let provider = provider.clone();
            let create_errors = create_errors.clone();
            async move {
                let name = format!("d{i:05}");
                let mut manifest = serde_json::json!({
                    "apiVersion": "mailauth.dev/v1alpha1",
                    "kind": "MailDomain",
                    "metadata": { "name": name },
                    "spec": {
                        "domain": format!("{name}.{suffix}"),
                        "dkim": { "algorithm": algorithm },
                    },
                });
                if let Some(provider) = &provider {
                    manifest["spec"]["dns"] =
                        serde_json::json!({"providerRef": {"name": provider}});
                }
                let obj: DynamicObject = serde_json::from_value(manifest)
                    .map_err(|e| format!("building {name}: {e}"))?;
                let mut last = String::new();
                for attempt in 0..5 {
                    match domains.create(&PostParams::default(), &obj).await {
                        Ok(_) => return Ok(()),
                        Err(err) => {
                            create_errors.fetch_add(1, Ordering::Relaxed);
                            last = err.to_string();
                            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                        }
                    }
                }
                Err(format!("creating {name}: {last}"))
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let apply_seconds = started.elapsed().as_secs_f64();
    if let Some(Err(err)) = results.iter().find(|r| r.is_err()) {
        die(err);
    }
    eprintln!(
        "onboard bench: {} MailDomains created in {apply_seconds:.1}s; waiting for KeysReady",
        args.count
    );

    // Wait for all, reporting progress and watching the controller live.
    let deadline = started + args.timeout;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            let ready = readiness.ready_at.lock().unwrap().len();
            let last_seen = readiness.last_seen.lock().unwrap();
            let sample: Vec<String> = last_seen
                .iter()
                .take(5)
                .map(|(n, s)| format!("  {n}: {s}"))
                .collect();
            die(&format!(
                "only {ready}/{} MailDomains KeysReady after {}s; some of the others:\n{}",
                args.count,
                args.timeout.as_secs(),
                sample.join("\n")
            ));
        }
        let tick = remaining.min(Duration::from_secs(10));
        if tokio::time::timeout(tick, readiness.all_ready.notified())
            .await
            .is_ok()
        {
            break;
        }
        if readiness.ready_at.lock().unwrap().len() >= args.count {
            break;
        }
        sample_proc(args.controller_pid, ticks); // dies if the controller is gone
        eprintln!(
            "onboard bench: {}/{} KeysReady after {:.0}s",
            readiness.ready_at.lock().unwrap().len(),
            args.count,
            started.elapsed().as_secs_f64()
        );
    }
    let ready_seconds = started.elapsed().as_secs_f64();
    let proc1 = sample_proc(args.controller_pid, ticks);
    let machine1 = machine_cpu(ticks);
    let peers1: Vec<Option<f64>> = args
        .peers
        .iter()
        .map(|(_, pid)| process_cpu(*pid, ticks))
        .collect();
    let metrics1 = scrape(&args.metrics);
    let md1 = md_changes.applied();
    let secrets1 = secrets.applied();
    let events1 = events.applied();

    let mut times: Vec<f64> = readiness
        .ready_at
        .lock()
        .unwrap()
        .values()
        .copied()
        .collect();
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p).round() as usize];

    let n = args.count as f64;
    println!("algorithm {}", args.algorithm);
    println!("domains {}", args.count);
    println!("apply_seconds {apply_seconds:.3}");
    println!("create_retries {}", create_errors.load(Ordering::Relaxed));
    println!("ready_seconds {ready_seconds:.3}");
    println!("ready_first_seconds {:.3}", pct(0.0));
    println!("ready_p50_seconds {:.3}", pct(0.5));
    println!("ready_p90_seconds {:.3}", pct(0.9));
    println!("domains_per_second {:.1}", n / ready_seconds);
    println!(
        "controller_cpu_seconds {:.2}",
        proc1.cpu_seconds - proc0.cpu_seconds
    );
    println!(
        "controller_cpu_ms_per_domain {:.2}",
        (proc1.cpu_seconds - proc0.cpu_seconds) * 1000.0 / n
    );
    println!("machine_busy_core_seconds {:.2}", machine1.0 - machine0.0);
    println!(
        "machine_busy_percent {:.1}",
        (machine1.0 - machine0.0) * 100.0 / (machine1.1 - machine0.1).max(1e-9)
    );
    for (((label, _), before), after) in args.peers.iter().zip(&peers0).zip(&peers1) {
        if let (Some(before), Some(after)) = (before, after) {
            println!("peer_cpu_seconds_{label} {:.2}", after - before);
        }
    }
    println!(
        "controller_peak_rss_mib {:.1}",
        proc1.hwm_kib as f64 / 1024.0
    );
    println!("controller_rss_mib {:.1}", proc1.rss_kib as f64 / 1024.0);
    for name in [
        "mailauth_reconciles_total",
        "mailauth_keys_generated_total",
        "mailauth_status_writes_total",
        "mailauth_secret_writes_total",
    ] {
        println!("{name} {}", delta(&metrics1, &metrics0, name));
    }
    let counted = delta(&metrics1, &metrics0, "mailauth_status_writes_total")
        + delta(&metrics1, &metrics0, "mailauth_secret_writes_total");
    // Every MailDomain change seen by the watch, minus our own creates: the
    // finalizer patch and the status writes that changed something.
    let md_controller_writes = md1.saturating_sub(args.count as u64);
    println!("watched_maildomain_writes {md_controller_writes}");
    println!("watched_secret_writes {secrets1}");
    println!("watched_event_writes {events1}");
    println!(
        "watched_relists {}",
        md_changes.relists.load(Ordering::Relaxed)
            + secrets.relists.load(Ordering::Relaxed)
            + events.relists.load(Ordering::Relaxed)
    );
    println!("writes_per_domain_metrics {:.2}", counted / n);
    println!(
        "writes_per_domain_metrics_plus_finalizer {:.2}",
        (counted + n) / n
    );
    println!(
        "writes_per_domain_watched {:.2}",
        (md_controller_writes + secrets1) as f64 / n
    );
    println!(
        "writes_per_domain_watched_with_events {:.2}",
        (md_controller_writes + secrets1 + events1) as f64 / n
    );

    if !args.steady.is_zero() {
        eprintln!(
            "onboard bench: all KeysReady; sampling steady state for {}s",
            args.steady.as_secs()
        );
        tokio::time::sleep(args.steady).await;
        let proc2 = sample_proc(args.controller_pid, ticks);
        let metrics2 = scrape(&args.metrics);
        let md2 = md_changes.applied() - md1;
        let secrets2 = secrets.applied() - secrets1;
        let events2 = events.applied() - events1;
        let cpu = proc2.cpu_seconds - proc1.cpu_seconds;
        println!("steady_seconds {}", args.steady.as_secs());
        println!("steady_controller_cpu_seconds {cpu:.2}");
        println!(
            "steady_controller_cpu_percent_of_core {:.2}",
            cpu * 100.0 / args.steady.as_secs_f64()
        );
        println!(
            "steady_controller_peak_rss_mib {:.1}",
            proc2.hwm_kib as f64 / 1024.0
        );
        println!(
            "steady_controller_rss_mib {:.1}",
            proc2.rss_kib as f64 / 1024.0
        );
        for name in [
            "mailauth_reconciles_total",
            "mailauth_status_writes_total",
            "mailauth_secret_writes_total",
        ] {
            println!("steady_{name} {}", delta(&metrics2, &metrics1, name));
        }
        println!("steady_watched_maildomain_writes {md2}");
        println!("steady_watched_secret_writes {secrets2}");
        println!("steady_watched_event_writes {events2}");
        println!(
            "steady_writes_per_domain {:.4}",
            (md2 + secrets2 + events2) as f64 / n
        );
    }
}
