//! Reliability against the real control plane: the operator recovers by
//! itself when kube-apiserver restarts under it, and the operator binary,
//! SIGKILLed at each mutating request of a full rotation (Pending → Active
//! → Retiring → Retired) and restarted, never loses an Active key, never
//! lets a selector sign before its record is published, and converges.
//!
//! The kills are deterministic: the operator runs as a child process whose
//! kubeconfig points at a fault-injecting proxy (`support::apiserver_proxy`)
//! in front of the real kube-apiserver. A baseline run counts the mutating
//! requests of an undisturbed rotation; then, for every N up to that count,
//! one run kills the operator as its N-th mutating request arrives (before
//! the API server sees it) and one right after the API server applied it
//! (before the response gets back). The proxy keeps every object the API
//! server returned, so the invariants are checked on every version the
//! operator wrote, against what DNS held when it sent the write.
//!
//! The API server restart affects every client of the shared control plane,
//! so this file holds its own test binary (cargo runs test binaries one
//! after another) and its tests run one at a time.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mailauth_operator::api::{
    ConditionStatus, ConditionType, DkimKeyStatus, KeyState, MailDomain, MailRelay, RecordState,
};
use mailauth_operator::dkim::dkim_txt_value;
use mailauth_operator::relay::config::{DomainShard, shard_of, shard_secret_name};
use support::apiserver_proxy::{ApiServerProxy, Kill, KillPoint, Mutation, Target};
use support::cluster::cluster;
use support::dns::{Knot, Zone, txt_data};
use support::operator::{Operator, OperatorProcess, is, wait_for};
use support::wait::{Shown, eventually};
use tokio::sync::Mutex;

/// Tests here disturb shared state (the API server): one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());
const ZONE: &str = "recover.test";
const DOMAIN: &str = "acme";
const RELAY: &str = "shared";
const KEYS_SECRET: &str = "acme-dkim";
/// The relay config shard that lists this test's domain.
fn relay_config() -> String {
    shard_secret_name("shared", shard_of(ZONE))
}
/// Runs of the kill test going on at once (each its own namespace, knot,
/// proxy and operator process).
const PARALLEL_RUNS: usize = 6;
/// How long one run may take to get through the rotation.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn manifest(name: &str) -> MailDomain {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": name},
        "spec": {"domain": ZONE, "dkim": {"algorithm": "Ed25519", "rotation": {"period": "30d", "overlap": "1d"}}}
    }))
    .expect("manifest")
}

#[tokio::test]
async fn the_operator_recovers_by_itself_when_the_api_server_restarts() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("restart").await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let operator = Operator::start(&ns.name, knot.addr()).await;
    let domains: Api<MailDomain> = Api::namespaced(c.client().await, &ns.name);
    domains
        .create(&PostParams::default(), &manifest("before"))
        .await
        .expect("create");
    wait_for(&domains, "before", "KeysReady", |md| {
        is(md, ConditionType::KeysReady, ConditionStatus::True)
    })
    .await;

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/controlplane/cluster.sh");
    let status = Command::new(script)
        .arg("restart-apiserver")
        .status()
        .expect("restarting kube-apiserver");
    assert!(status.success(), "cluster.sh restart-apiserver failed");

    // A MailDomain created after the restart is handled by the same,
    // never-restarted operator: its watches reconnected on their own.
    let domains: Api<MailDomain> = Api::namespaced(c.client().await, &ns.name);
    domains
        .create(&PostParams::default(), &manifest("after"))
        .await
        .expect("create after restart");
    wait_for(&domains, "after", "KeysReady after the restart", |md| {
        is(md, ConditionType::KeysReady, ConditionStatus::True)
    })
    .await;
    operator.stop().await;
    ns.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_killed_at_any_write_of_a_rotation_loses_no_key_and_never_signs_unverified() {
    let _serial = SERIAL.lock().await;
    cluster().install_crds().await;

    let baseline = run_rotation(None).await;
    assert!(
        baseline.violations.is_empty(),
        "without any kill:\n{}",
        baseline.violations.join("\n")
    );
    let writes = baseline.mutations;
    println!(
        "baseline: {writes} mutating requests in {:.1?} for a full rotation",
        baseline.took
    );
    assert!(writes > 0, "the operator wrote nothing");

    let points: Vec<KillAt> = (1..=writes)
        .flat_map(|n| {
            [
                KillAt::Nth(n, KillPoint::BeforeForwarding),
                KillAt::Nth(n, KillPoint::AfterApplied),
            ]
        })
        .collect();
    let mut runs: Vec<Run> = futures::stream::iter(points)
        .map(|at| run_rotation(Some(at)))
        .buffer_unordered(PARALLEL_RUNS)
        .collect()
        .await;
    // Two controllers write in an order that varies a little from run to
    // run, so the n-th request is not always of the same kind: every kind
    // of write the baseline made that no kill landed on yet, both ways, is
    // killed at its first occurrence.
    let killed = |runs: &[Run]| -> BTreeSet<(String, KillPoint)> {
        runs.iter()
            .flat_map(|run| &run.kills)
            .map(|kill| (write_kind(&kill.at), kill.point))
            .collect()
    };
    let kinds: BTreeSet<String> = baseline.log.iter().map(write_kind).collect();
    let already = killed(&runs);
    let missing: Vec<KillAt> = kinds
        .iter()
        .flat_map(|kind| {
            [KillPoint::BeforeForwarding, KillPoint::AfterApplied]
                .map(|point| KillAt::FirstOf(kind.clone(), point))
        })
        .filter(|at| match at {
            KillAt::FirstOf(kind, point) => !already.contains(&(kind.clone(), *point)),
            KillAt::Nth(..) => false,
        })
        .collect();
    println!(
        "{} kinds of write not killed at by index: {missing:?}",
        missing.len()
    );
    runs.extend(
        futures::stream::iter(missing)
            .map(|at| run_rotation(Some(at)))
            .buffer_unordered(PARALLEL_RUNS)
            .collect::<Vec<Run>>()
            .await,
    );

    let mut failures = Vec::new();
    let mut between_secret_and_status = 0;
    let mut landed = 0;
    for run in &runs {
        let at = run.kill_at.as_ref().expect("a kill run");
        for kill in &run.kills {
            landed += 1;
            let situation = situation_at(&run.log, kill);
            if situation == Situation::KeyStoredNotInStatus {
                between_secret_and_status += 1;
            }
            println!(
                "kill at {at:?}: {} {} ({situation:?}); converged {:.1?} later{}",
                kill.at.method,
                short_path(&kill.at.path),
                run.converged_after_kill.unwrap_or_default(),
                if run.orphans.is_empty() {
                    String::new()
                } else {
                    format!("; orphaned private keys {:?}", run.orphans)
                }
            );
        }
        failures.extend(
            run.violations
                .iter()
                .map(|violation| format!("kill at {at:?}: {violation}")),
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {} runs broke an invariant:\n{}",
        runs.iter().filter(|r| !r.violations.is_empty()).count(),
        runs.len(),
        failures.join("\n")
    );
    // Request counts vary a little between runs (two controllers, events):
    // a kill point past the end of a shorter run may not land. Most must,
    // and every kind of write the baseline made was killed at, both ways.
    assert!(
        landed * 10 >= runs.len() * 9,
        "only {landed} of {} kills landed",
        runs.len()
    );
    let killed = killed(&runs);
    for kind in &kinds {
        for point in [KillPoint::BeforeForwarding, KillPoint::AfterApplied] {
            assert!(
                killed.contains(&(kind.clone(), point)),
                "no kill landed {point:?} {kind}"
            );
        }
    }
    assert!(
        between_secret_and_status > 0,
        "no kill landed between storing a new key and the status write that lists it"
    );
    // Issue 12 §2: a kill between storing a new key and the status write
    // that lists it leaves no private key behind that status never lists
    // (the key Secret's ledger has it adopted, or it is removed).
    let orphaned: Vec<String> = runs
        .iter()
        .filter(|run| !run.orphans.is_empty())
        .map(|run| format!("kill at {:?}: {:?}", run.kill_at, run.orphans))
        .collect();
    assert!(
        orphaned.is_empty(),
        "{} runs left private keys status never listed:\n{}",
        orphaned.len(),
        orphaned.join("\n")
    );
}

/// Where a run kills the operator.
#[derive(Clone)]
enum KillAt {
    /// At the n-th mutating request.
    Nth(u64, KillPoint),
    /// At the first mutating request of this kind ([`write_kind`]).
    FirstOf(String, KillPoint),
}

impl std::fmt::Debug for KillAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Nth(n, point) => write!(f, "#{n} {point:?}"),
            Self::FirstOf(kind, point) => write!(f, "first {kind} {point:?}"),
        }
    }
}

/// What the test, as tenant and clock, has done in one run.
#[derive(Default)]
struct Tenant {
    published: BTreeSet<String>,
    first_active: Option<String>,
    rotation_requested: bool,
    clock_moved: bool,
    restarted_at: Option<Instant>,
}

/// What one run saw.
struct Run {
    kill_at: Option<KillAt>,
    /// Mutating requests of the whole run (up to convergence).
    mutations: u64,
    log: Vec<Mutation>,
    kills: Vec<Kill>,
    violations: Vec<String>,
    /// Private keys left in the Secret that status never listed (issue 12
    /// §2: a crash between storing a key and the status write leaves
    /// them). Reported, not yet asserted: see the test.
    orphans: Vec<String>,
    took: Duration,
    converged_after_kill: Option<Duration>,
}

/// One rotation, start to finish, with the operator binary behind the
/// proxy: the test plays the tenant (publishes each Pending key's record
/// once the operator reported it missing, asks for a rotation once the
/// first key is Active) and the clock (two hours on once a key is
/// Retiring, past its one-hour overlap), and restarts the operator after a
/// kill.
async fn run_rotation(kill_at: Option<KillAt>) -> Run {
    let started = Instant::now();
    let c = cluster();
    let ns = c.namespace("crash").await;
    let client = c.client().await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);
    let relays: Api<MailRelay> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let relay: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": RELAY},
        "spec": {"hostname": "relay.platform.test",
                 "upstream": {"host": "127.0.0.1", "port": 2525, "tls": "None"},
                 "spf": {"egressIPs": ["192.0.2.10"]}}
    }))
    .expect("MailRelay manifest");
    relays
        .create(&PostParams::default(), &relay)
        .await
        .expect("creating MailRelay");
    let md: MailDomain = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": DOMAIN},
        "spec": {"domain": ZONE, "relayRef": {"name": RELAY},
                 "dkim": {"algorithm": "Ed25519", "rotation": {"period": "1d", "overlap": "1h"}}}
    }))
    .expect("MailDomain manifest");
    domains
        .create(&PostParams::default(), &md)
        .await
        .expect("creating MailDomain");

    let proxy = ApiServerProxy::start(client.clone()).await;
    match &kill_at {
        None => {}
        Some(KillAt::Nth(n, point)) => proxy.arm(*n, *point),
        Some(KillAt::FirstOf(kind, point)) => {
            let kind = kind.clone();
            proxy.arm_at(
                Target::First(Arc::new(move |method, path| kind_of(method, path) == kind)),
                *point,
            );
        }
    }
    let operator = OperatorProcess::new(&ns.name, knot.addr(), &proxy.kubeconfig());
    proxy.set_victim(operator.spawn());

    let tenant = Mutex::new(Tenant::default());
    let converged = eventually(format!(
        "a full rotation in {} (kill at {kill_at:?})",
        ns.name
    ))
    .within(RUN_TIMEOUT)
    .every(Duration::from_millis(100))
    .try_until_async(|| {
        let (domains, secrets, knot, proxy, operator, tenant) =
            (&domains, &secrets, &knot, &proxy, &operator, &tenant);
        async move {
            let mut tenant = tenant.lock().await;
            if !proxy.victim_alive() {
                proxy.set_victim(operator.spawn());
                tenant.restarted_at = Some(Instant::now());
            }
            let md = domains
                .get(DOMAIN)
                .await
                .map_err(|e| Shown(e.to_string()))?;
            let keys = keys(&md);
            // The tenant publishes a Pending key's record only once the
            // operator has looked and reported it Missing: until then, a
            // key shown Active would have been activated unverified.
            for key in keys.iter().filter(|k| k.state == KeyState::Pending) {
                if !tenant.published.contains(&key.selector) && record_missing(&md, &key.selector) {
                    proxy.note(published_note(&key.selector));
                    proxy.note(published_key_note(&key.selector, &key.public_key));
                    let record = format!(
                        "{}._domainkey.{ZONE}. 60 TXT {}",
                        key.selector,
                        txt_data(&dkim_txt_value(key.algorithm, &key.public_key))
                    );
                    tokio::task::block_in_place(|| knot.add(ZONE, &record));
                    tenant.published.insert(key.selector.clone());
                }
            }
            let active: Vec<&DkimKeyStatus> = keys
                .iter()
                .filter(|k| k.state == KeyState::Active)
                .collect();
            if tenant.first_active.is_none()
                && let [key] = active.as_slice()
            {
                tenant.first_active = Some(key.selector.clone());
            }
            if let Some(first) = tenant.first_active.clone() {
                if !tenant.rotation_requested {
                    let patch = serde_json::json!({"metadata": {"annotations": {
                        "mailauth.dev/rotate-requested": "kill-test"}}});
                    domains
                        .patch(DOMAIN, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map_err(|e| Shown(e.to_string()))?;
                    tenant.rotation_requested = true;
                }
                let first_retiring = keys
                    .iter()
                    .any(|k| k.selector == first && k.state == KeyState::Retiring);
                if first_retiring && !tenant.clock_moved {
                    operator.move_clock("+2h");
                    tenant.clock_moved = true;
                }
            }
            let secret = secrets
                .get_opt(KEYS_SECRET)
                .await
                .map_err(|e| Shown(e.to_string()))?;
            let config = secrets
                .get_opt(&relay_config())
                .await
                .map_err(|e| Shown(e.to_string()))?;
            let done = tenant.first_active.as_deref().is_some_and(|first| {
                rotated(
                    &md,
                    first,
                    &private_keys(secret.as_ref()),
                    &relay_selectors(config.as_ref()),
                )
            });
            if done {
                Ok(md)
            } else {
                Err(Shown(progress(&md, secret.as_ref(), config.as_ref())))
            }
        }
    })
    .await;
    let restarted_at = tenant.lock().await.restarted_at;

    let log = proxy.log();
    let kills = proxy.kills();
    let mut violations = check_history(&log);
    let converged_after_kill = restarted_at.map(|at| at.elapsed());
    let mut run_orphans = Vec::new();
    let final_state = match converged {
        Ok(md) => Some(md),
        Err(timed_out) => {
            violations.push(format!(
                "did not converge: {timed_out}\noperator log:\n{}",
                operator.log_tail(40)
            ));
            None
        }
    };
    if let Some(md) = &final_state {
        // No Active key lost across the kill: every key Active at the kill
        // is still Active, or moved on (Retiring, Retired) in the end.
        for kill in &kills {
            let at_kill = replay(&log, kill_horizon(kill));
            for selector in at_kill.active() {
                let now = keys(md).into_iter().find(|k| k.selector == selector);
                if now.as_ref().is_none_or(|k| k.state == KeyState::Pending) {
                    violations.push(format!(
                        "{selector} was Active when killed and is now {:?}",
                        now.map(|k| k.state)
                    ));
                }
            }
        }
        let secret = secrets.get_opt(KEYS_SECRET).await.expect("reading Secret");
        let listed: BTreeSet<String> = keys(md).into_iter().map(|k| k.selector).collect();
        let orphans: Vec<String> = private_keys(secret.as_ref())
            .into_iter()
            .filter(|selector| !listed.contains(selector))
            .collect();
        run_orphans = orphans;
    }
    let mutations = proxy.mutations();

    // Clean up with the operator running (it removes its finalizer), and
    // no kill left to land.
    proxy.disarm();
    if !proxy.victim_alive() {
        proxy.set_victim(operator.spawn());
    }
    if final_state.is_some() {
        let _ = domains.delete(DOMAIN, &DeleteParams::default()).await;
        let deleted = eventually(format!("MailDomain {DOMAIN} in {} to be deleted", ns.name))
            .within(Duration::from_secs(30))
            .try_until_async(|| async {
                match domains.get_opt(DOMAIN).await {
                    Ok(None) => Ok(()),
                    other => Err(other.map(|md| md.map(|md| md.metadata.finalizers))),
                }
            })
            .await;
        match deleted {
            Ok(()) => {
                proxy.stop_victim();
                ns.delete().await;
            }
            Err(timed_out) => violations.push(format!(
                "cleanup stalled: {timed_out}\noperator log:\n{}",
                operator.log_tail(60)
            )),
        }
    }
    proxy.stop_victim();
    Run {
        kill_at,
        mutations,
        log,
        kills,
        violations,
        orphans: run_orphans,
        took: started.elapsed(),
        converged_after_kill,
    }
}

fn keys(md: &MailDomain) -> Vec<DkimKeyStatus> {
    md.status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .map(|d| d.keys.clone())
        .unwrap_or_default()
}

/// Noted just before a record for `selector` is added to knot.
fn published_note(selector: &str) -> String {
    format!("published {selector}")
}

/// Noted with [`published_note`]: which key that record carries.
fn published_key_note(selector: &str, public_key: &str) -> String {
    format!("published {selector} p={public_key}")
}

fn record_missing(md: &MailDomain, selector: &str) -> bool {
    let name = format!("{selector}._domainkey.{ZONE}");
    md.status.as_ref().is_some_and(|s| {
        s.records
            .iter()
            .any(|r| r.name.trim_end_matches('.') == name && r.state == RecordState::Missing)
    })
}

/// The rotation is over: a second key Active, the first Retired with its
/// private key gone, no Pending key, Ready, and the relay signing with the
/// Active key alone.
fn rotated(
    md: &MailDomain,
    first: &str,
    private_keys: &BTreeSet<String>,
    relay_selectors: &BTreeSet<String>,
) -> bool {
    let keys = keys(md);
    let active: BTreeSet<String> = keys
        .iter()
        .filter(|k| k.state == KeyState::Active)
        .map(|k| k.selector.clone())
        .collect();
    is(md, ConditionType::Ready, ConditionStatus::True)
        && active.len() == 1
        && !active.contains(first)
        && keys
            .iter()
            .any(|k| k.selector == first && k.state == KeyState::Retired)
        && keys.iter().all(|k| k.state != KeyState::Pending)
        && !private_keys.contains(first)
        && active.is_subset(private_keys)
        && *relay_selectors == active
}

fn progress(md: &MailDomain, secret: Option<&Secret>, config: Option<&Secret>) -> String {
    let states: Vec<String> = keys(md)
        .iter()
        .map(|k| format!("{} {:?}", k.selector, k.state))
        .collect();
    let not_true: Vec<String> = md
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .filter(|c| c.status != ConditionStatus::True)
        .map(|c| format!("{:?} {}: {}", c.type_, c.reason, c.message))
        .collect();
    format!(
        "keys {states:?}; Ready {:?} (not True: {not_true:?}); private keys {:?}; relay signs with {:?}",
        support::operator::condition(md, ConditionType::Ready),
        private_keys(secret),
        relay_selectors(config)
    )
}

/// The selectors whose private keys a key Secret holds (names only).
fn private_keys(secret: Option<&Secret>) -> BTreeSet<String> {
    secret
        .and_then(|s| s.data.as_ref())
        .map(|data| {
            data.keys()
                .filter_map(|k| k.strip_suffix(".pem"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// The selectors the relay config signs this domain's mail with.
fn relay_selectors(config: Option<&Secret>) -> BTreeSet<String> {
    config
        .and_then(|s| s.data.as_ref())
        .map(|data| {
            data.iter()
                .filter(|(name, _)| name.starts_with("domains-"))
                .filter_map(|(_, bytes)| serde_json::from_slice::<DomainShard>(&bytes.0).ok())
                .flat_map(|shard| shard.domains)
                .filter(|entry| entry.domain == ZONE)
                .flat_map(|entry| entry.signing_keys)
                .map(|key| key.selector)
                .collect()
        })
        .unwrap_or_default()
}

/// What the operator had written, replayed from the proxy's log.
#[derive(Default)]
struct Written {
    keys: Vec<DkimKeyStatus>,
    private_keys: BTreeSet<String>,
}

impl Written {
    fn active(&self) -> Vec<String> {
        self.keys
            .iter()
            .filter(|k| k.state == KeyState::Active)
            .map(|k| k.selector.clone())
            .collect()
    }

    fn apply(&mut self, written: &Object) {
        match written {
            Object::Domain(md) => self.keys = keys(md),
            Object::KeysSecret(private_keys) => self.private_keys = private_keys.clone(),
            Object::RelayConfig(_) | Object::Other => {}
        }
    }
}

/// An object the API server returned for one of the operator's writes.
enum Object {
    Domain(Box<MailDomain>),
    KeysSecret(BTreeSet<String>),
    RelayConfig(BTreeSet<String>),
    Other,
}

fn object(mutation: &Mutation) -> Object {
    let Some(value) = mutation.object.as_ref().filter(|_| mutation.applied()) else {
        return Object::Other;
    };
    match (value["kind"].as_str(), value["metadata"]["name"].as_str()) {
        (Some("MailDomain"), Some(DOMAIN)) => serde_json::from_value(value.clone())
            .map(|md| Object::Domain(Box::new(md)))
            .unwrap_or(Object::Other),
        // A key Secret write is an apply or a merge patch naming every
        // entry (those that go as null).
        (Some("Secret"), Some(KEYS_SECRET)) => Object::KeysSecret(
            value["data"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(_, v)| !v.is_null())
                .filter_map(|(k, _)| k.strip_suffix(".pem"))
                .map(str::to_string)
                .collect(),
        ),
        (Some("Secret"), Some(name)) if name == relay_config() => {
            match serde_json::from_value::<Secret>(value.clone()) {
                Ok(secret) => Object::RelayConfig(relay_selectors(Some(&secret))),
                Err(_) => Object::Other,
            }
        }
        _ => Object::Other,
    }
}

/// The state the operator had written when `horizon` (a request index)
/// arrived: the writes before it, and it too when `inclusive`.
fn replay(log: &[Mutation], (horizon, inclusive): (u64, bool)) -> Written {
    let mut written = Written::default();
    for mutation in log
        .iter()
        .filter(|m| m.index < horizon || (inclusive && m.index == horizon))
    {
        written.apply(&object(mutation));
    }
    written
}

fn kill_horizon(kill: &Kill) -> (u64, bool) {
    (kill.at.index, kill.point == KillPoint::AfterApplied)
}

/// Where, in the operator's sequence of writes, a kill landed.
#[derive(Debug, PartialEq, Eq)]
enum Situation {
    /// A new private key was stored; no status write lists it yet.
    KeyStoredNotInStatus,
    /// Status lists a key whose private key is not stored.
    StatusAheadOfSecret,
    Consistent,
}

fn situation_at(log: &[Mutation], kill: &Kill) -> Situation {
    let written = replay(log, kill_horizon(kill));
    let listed: BTreeSet<&String> = written.keys.iter().map(|k| &k.selector).collect();
    if written.private_keys.iter().any(|s| !listed.contains(s)) {
        Situation::KeyStoredNotInStatus
    } else if written
        .keys
        .iter()
        .any(|k| k.state != KeyState::Retired && !written.private_keys.contains(&k.selector))
    {
        Situation::StatusAheadOfSecret
    } else {
        Situation::Consistent
    }
}

/// Every invariant, on every version the operator wrote, in order:
/// - a key is Active only if its record was published when the operator
///   sent that status (it cannot have verified a record not yet there);
/// - every Active key's private key is in the key Secret, in every status
///   version and every Secret version;
/// - a key's state only moves forward, an Active key never vanishes, a
///   selector always names the same key, and at most one generation is
///   Pending;
/// - the relay config only carries selectors that are Active in the status
///   the operator had written, and were published when it sent the config.
fn check_history(log: &[Mutation]) -> Vec<String> {
    let mut violations = Vec::new();
    let mut written = Written::default();
    let mut last_state: BTreeMap<String, KeyState> = BTreeMap::new();
    let mut public_keys: BTreeMap<String, String> = BTreeMap::new();
    for mutation in log {
        let object = object(mutation);
        let at = format!(
            "#{} {} {}",
            mutation.index,
            mutation.method,
            short_path(&mutation.path)
        );
        let published = |selector: &str| mutation.notes.contains(&published_note(selector));
        let key_published = |key: &DkimKeyStatus| {
            mutation
                .notes
                .contains(&published_key_note(&key.selector, &key.public_key))
        };
        match &object {
            Object::Domain(md) => {
                let keys = keys(md);
                for key in keys.iter().filter(|k| k.state == KeyState::Active) {
                    if !key_published(key) {
                        violations.push(format!(
                            "{at}: {} Active before a record with its key was published",
                            key.selector
                        ));
                    }
                    if !written.private_keys.contains(&key.selector) {
                        violations.push(format!(
                            "{at}: {} Active without its private key in the Secret",
                            key.selector
                        ));
                    }
                }
                let pending: BTreeSet<u32> = keys
                    .iter()
                    .filter(|k| k.state == KeyState::Pending)
                    .map(|k| k.generation)
                    .collect();
                if pending.len() > 1 {
                    violations.push(format!(
                        "{at}: {} Pending generations at once",
                        pending.len()
                    ));
                }
                let now: BTreeMap<String, KeyState> =
                    keys.iter().map(|k| (k.selector.clone(), k.state)).collect();
                for (selector, before) in &last_state {
                    match now.get(selector) {
                        None if *before != KeyState::Retired => violations.push(format!(
                            "{at}: {selector} vanished from status while {before:?}"
                        )),
                        Some(after) if !moves_forward(*before, *after) => violations.push(format!(
                            "{at}: {selector} went from {before:?} to {after:?}"
                        )),
                        _ => {}
                    }
                }
                for key in &keys {
                    if let Some(before) =
                        public_keys.insert(key.selector.clone(), key.public_key.clone())
                        && before != key.public_key
                    {
                        violations.push(format!(
                            "{at}: selector {} now names another key",
                            key.selector
                        ));
                    }
                }
                last_state = now;
            }
            Object::KeysSecret(private_keys) => {
                for selector in written.active() {
                    if !private_keys.contains(&selector) {
                        violations.push(format!(
                            "{at}: the Secret lost the private key of Active {selector}"
                        ));
                    }
                }
            }
            Object::RelayConfig(selectors) => {
                let active = written.active();
                for selector in selectors {
                    if !active.contains(selector) {
                        violations.push(format!(
                            "{at}: the relay config signs with {selector}, which is not Active"
                        ));
                    }
                    if !published(selector) {
                        violations.push(format!(
                            "{at}: the relay config signs with {selector} before its record was published"
                        ));
                    }
                }
            }
            Object::Other => {}
        }
        written.apply(&object);
    }
    violations
}

fn moves_forward(before: KeyState, after: KeyState) -> bool {
    use KeyState::{Active, Pending, Retired, Retiring};
    matches!(
        (before, after),
        (Pending, Pending | Active | Retired)
            | (Active, Active | Retiring | Retired)
            | (Retiring, Retiring | Retired)
            | (Retired, Retired)
    )
}

/// What a write was, whatever its object's generated name: `PATCH
/// /api/v1/…/secrets/acme-dkim`, `PATCH /apis/events.k8s.io/v1/…/events/*`.
fn write_kind(mutation: &Mutation) -> String {
    kind_of(&mutation.method, &mutation.path)
}

fn kind_of(method: &http::Method, path: &str) -> String {
    let path = short_path(path);
    let path = match path.split_once("/events/") {
        Some((before, _)) => format!("{before}/events/*"),
        None => path,
    };
    format!("{method} {path}")
}

/// A request path without the namespace part, for messages.
fn short_path(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    match path.split_once("/namespaces/") {
        Some((api, rest)) => {
            let rest = rest.split_once('/').map_or("", |(_, rest)| rest);
            format!("{api}/…/{rest}")
        }
        None => path.to_string(),
    }
}
