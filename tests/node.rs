//! On a real node (tests/controlplane/node.sh; see support::node): the chart's
//! controller pods and a MailRelay's relay pods run the image built from
//! this binary, as users run them. A message goes through a relay pod; a
//! relay pod deleted mid-stream loses no acknowledged message and is
//! replaced; a new TLS certificate reaches the pods through the kubelet's
//! Secret volume and a completed rotation reaches them through the API
//! (both timed, see docs/relay.md); the leader pod killed mid-rotation
//! loses no Active key and the other replica completes the rotation.
//!
//! Every test here brings the node up (as root) or fails saying why; none
//! skips. The chart's operator watches every namespace, so the tests that
//! install it take turns ([`CHART`]).

mod support;

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use mailauth_operator::api::{
    ConditionStatus, ConditionType, DkimKeyStatus, KeyState, MailDomain, MailRelay,
};
use mailauth_operator::dkim::dkim_txt_value;
use support::dns::{Knot, Zone, txt_data};
use support::mail::{DkimVerdict, SmtpSink, dkimpy_verify, self_signed_certificate};
use support::node::{
    Fate, HOST_FROM_PODS, NodeNamespace, Release, SmtpSession, node, scrape_pod,
    served_certificate, swaks_to,
};
use support::operator::is;
use support::wait::{Shown, accept_if, eventually};

const ZONE: &str = "pods.test";
/// Pods start in seconds here; the first check of a just-published key
/// waits for the operator's DNS retry (30 s, then longer).
const POD_TIMEOUT: Duration = Duration::from_secs(120);
const READY_TIMEOUT: Duration = Duration::from_secs(240);

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_ip(pod: &Pod) -> Ipv4Addr {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .expect("a running pod has an IP")
        .parse()
        .expect("an IPv4 pod IP")
}

/// What the pods of `selector` look like, for a timeout message.
fn describe(pods: &[Pod]) -> Shown {
    Shown(
        pods.iter()
            .map(|p| {
                let statuses = p
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.clone())
                    .unwrap_or_default();
                format!(
                    "{} ready={} {:?}",
                    p.name_any(),
                    ready(p),
                    statuses
                        .iter()
                        .map(|c| (c.restart_count, c.state.clone()))
                        .collect::<Vec<_>>()
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

/// Waits until `count` pods of `selector` are Ready, and returns them.
async fn ready_pods(pods: &Api<Pod>, selector: &str, count: usize) -> Vec<Pod> {
    eventually(format!("{count} Ready pod(s) of {selector}"))
        .within(POD_TIMEOUT)
        .every(Duration::from_millis(250))
        .until_async(|| async {
            let list = pods
                .list(&ListParams::default().labels(selector))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            if list.len() == count && list.iter().all(ready) {
                Ok(list)
            } else {
                Err(describe(&list))
            }
        })
        .await
}

fn field(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().expect("data")[key].0.clone()).expect("utf-8")
}

/// The chart's operator watches every namespace: two releases at once would
/// both reconcile every MailDomain, so the tests that install it take turns.
static CHART: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const RELAY_SELECTOR: &str =
    "app.kubernetes.io/instance=shared,app.kubernetes.io/name=mailauth-relay";
const LEASE: &str = "mailauth-mailauth-operator";

/// The chart installed with the node's image, both controller pods Ready
/// under the chart's ServiceAccount, one of them holding the Lease.
struct Operator {
    _release: Release,
    system: NodeNamespace,
    pods: Vec<Pod>,
    holder: String,
}

impl Operator {
    async fn install(
        node: &'static support::node::Node,
        client: &kube::Client,
        knot: &Knot,
    ) -> Self {
        let system = node.namespace("node-operator");
        let dns_server = format!("dns.servers[0]={HOST_FROM_PODS}:{}", knot.port());
        let release = Release::install(node, "mailauth", &system.name, &["--set", &dns_server]);
        let operator_pods: Api<Pod> = Api::namespaced(client.clone(), &system.name);
        let selector = format!("app.kubernetes.io/instance={}", release.name);
        let pods = ready_pods(&operator_pods, &selector, 2).await;
        for pod in &pods {
            let spec = pod.spec.as_ref().expect("pod spec");
            assert_eq!(spec.service_account_name.as_deref(), Some(LEASE));
        }
        let names: Vec<String> = pods.iter().map(ResourceExt::name_any).collect();
        let holder = lease_holder(client, &system.name, |holder| names.contains(holder)).await;
        Self {
            _release: release,
            system,
            pods,
            holder,
        }
    }
}

/// Waits until the operator's Lease is held by a pod that `accept`s.
async fn lease_holder(
    client: &kube::Client,
    namespace: &str,
    accept: impl Fn(&String) -> bool,
) -> String {
    let leases: Api<Lease> = Api::namespaced(client.clone(), namespace);
    eventually("a controller pod to hold the Lease")
        .within(POD_TIMEOUT)
        .every(Duration::from_millis(200))
        .until_async(|| async {
            let holder = leases
                .get_opt(LEASE)
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity);
            match holder {
                Some(holder) if accept(&holder) => Ok(holder),
                other => Err(other),
            }
        })
        .await
}

/// A tenant served by a relay on the node: a MailRelay (`replicas` pods on
/// port 587, STARTTLS with a certificate from a Secret) and a MailDomain
/// whose key the test publishes in knot, Ready through the in-cluster
/// controller; the relay pods Ready and serving the domain.
struct Tenant {
    ns: NodeNamespace,
    username: String,
    password: String,
    selector: String,
    pods: Vec<Pod>,
    _tls_dir: tempfile::TempDir,
}

fn tls_secret(cert: &std::path::Path, key: &std::path::Path) -> Secret {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "relay-tls"},
        "stringData": {
            "tls.crt": std::fs::read_to_string(cert).expect("certificate"),
            "tls.key": std::fs::read_to_string(key).expect("key"),
        }
    }))
    .expect("TLS Secret manifest")
}

fn domain_keys(md: &MailDomain) -> Vec<DkimKeyStatus> {
    md.status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .map(|d| d.keys.clone())
        .unwrap_or_default()
}

fn active_selector(md: &MailDomain) -> Option<String> {
    md.status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .and_then(|d| d.active_selector.clone())
}

/// Waits for a Pending key (other than those in `known`) and publishes its
/// record in knot, as the tenant would.
async fn publish_pending(domains: &Api<MailDomain>, knot: &Knot) -> DkimKeyStatus {
    let pending = eventually("a pending key from the in-cluster controller")
        .within(POD_TIMEOUT)
        .every(Duration::from_millis(100))
        .until_async(|| async {
            let md = domains.get("tenant").await.map_err(|e| e.to_string())?;
            domain_keys(&md)
                .into_iter()
                .find(|k| k.state == KeyState::Pending)
                .ok_or_else(|| format!("{:?}", md.status))
        })
        .await;
    let value = dkim_txt_value(pending.algorithm, &pending.public_key);
    knot.add(
        ZONE,
        &format!(
            "{}._domainkey.{ZONE}. 60 TXT {}",
            pending.selector,
            txt_data(&value)
        ),
    );
    pending
}

/// Waits until `selector` is the domain's Active key and the domain Ready.
async fn active(domains: &Api<MailDomain>, selector: &str) -> MailDomain {
    eventually(format!("{selector} to be Active and the MailDomain Ready"))
        .within(READY_TIMEOUT)
        .every(Duration::from_millis(100))
        .until_async(|| async {
            let md = domains.get("tenant").await.map_err(|e| e.to_string())?;
            if is(&md, ConditionType::Ready, ConditionStatus::True)
                && active_selector(&md).as_deref() == Some(selector)
            {
                Ok(md)
            } else {
                Err(format!("{:?}", md.status))
            }
        })
        .await
}

async fn serving(ip: Ipv4Addr) {
    eventually(format!("the relay pod {ip} to serve the domain"))
        .within(POD_TIMEOUT)
        .until(|| {
            accept_if(
                scrape_pod(ip, 9090).map(|m| m.value("mailauth_relay_config_domains", &[])),
                |domains| domains.is_some_and(|d| d >= 1.0),
            )
        });
}

impl Tenant {
    async fn onboard(
        node: &'static support::node::Node,
        client: &kube::Client,
        knot: &Knot,
        sink: &SmtpSink,
        replicas: u32,
    ) -> Self {
        let ns = node.namespace("node-relay");
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
        let tls_dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = self_signed_certificate(tls_dir.path(), "relay.platform.test");
        secrets
            .create(&PostParams::default(), &tls_secret(&cert, &key))
            .await
            .expect("creating the TLS Secret");
        let relays: Api<MailRelay> = Api::namespaced(client.clone(), &ns.name);
        let relay: MailRelay = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "shared"},
            "spec": {"replicas": replicas, "hostname": "relay.platform.test",
                     "listener": {"port": 587, "tlsSecretName": "relay-tls"},
                     "upstream": {"host": HOST_FROM_PODS.to_string(), "port": sink.port, "tls": "None"},
                     "spf": {"egressIPs": [HOST_FROM_PODS.to_string()]}}
        }))
        .expect("MailRelay manifest");
        relays
            .create(&PostParams::default(), &relay)
            .await
            .expect("creating MailRelay");
        let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);
        let md: MailDomain = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": "tenant"},
            "spec": {"domain": ZONE, "relayRef": {"name": "shared"}, "dkim": {"algorithm": "RSA"}}
        }))
        .expect("MailDomain manifest");
        domains
            .create(&PostParams::default(), &md)
            .await
            .expect("creating MailDomain");

        // The in-cluster controller makes a key; the tenant publishes it;
        // the controller checks it in the knot (through the pods' network)
        // and the domain becomes Ready.
        let pending = publish_pending(&domains, knot).await;
        active(&domains, &pending.selector).await;

        // The relay's Deployment: Ready pods, serving the domain.
        let relay_pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
        let pods = ready_pods(&relay_pods, RELAY_SELECTOR, replicas as usize).await;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
        let deployment = deployments
            .get("shared-relay")
            .await
            .expect("relay Deployment");
        let container = &deployment.spec.unwrap().template.spec.unwrap().containers[0];
        assert_eq!(container.image_pull_policy.as_deref(), Some("Never"));
        for pod in &pods {
            serving(pod_ip(pod)).await;
        }
        let credentials = secrets
            .get("tenant-smtp")
            .await
            .expect("tenant credentials Secret");
        Self {
            username: field(&credentials, "username"),
            password: field(&credentials, "password"),
            selector: pending.selector,
            pods,
            ns,
            _tls_dir: tls_dir,
        }
    }

    /// Deletes the MailDomain and waits until the operator has let it go
    /// (its finalizer), before the operator itself is uninstalled.
    async fn offboard(self, client: &kube::Client) {
        let domains: Api<MailDomain> = Api::namespaced(client.clone(), &self.ns.name);
        let _ = domains.delete("tenant", &DeleteParams::default()).await;
        eventually("the MailDomain to be gone")
            .within(POD_TIMEOUT)
            .until_async(|| async {
                match domains.get_opt("tenant").await {
                    Ok(None) => Ok(()),
                    other => Err(format!(
                        "{:?}",
                        other.map(|md| md.map(|md| md.metadata.finalizers))
                    )),
                }
            })
            .await;
    }

    fn auth(&self) -> (&str, &str) {
        (&self.username, &self.password)
    }
}

/// The stored message whose Message-ID is `<id@ZONE>`.
fn stored(sink: &SmtpSink, id: &str) -> Option<Vec<u8>> {
    let header = format!("<{id}@{ZONE}>");
    sink.messages()
        .into_iter()
        .find(|m| String::from_utf8_lossy(m).contains(&header))
}

fn message_with_id(id: &str) -> String {
    format!(
        "From: Alice <alice@{ZONE}>\r\nTo: Bob <bob@example.net>\r\nSubject: {id}\r\n\
         Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{id}@{ZONE}>\r\n\r\nHello from a pod, {id}.\r\n"
    )
}

/// Submits message `id` to the relay pod at `ip` with swaks (STARTTLS,
/// AUTH) and returns what dkimpy says of the copy the sink stored.
fn send_and_verify(
    tenant: &Tenant,
    sink: &SmtpSink,
    knot: &Knot,
    ip: Ipv4Addr,
    id: &str,
) -> DkimVerdict {
    let (sent, transcript) = swaks_to(
        ip,
        587,
        &format!("alice@{ZONE}"),
        "bob@example.net",
        tenant.auth(),
        &message_with_id(id),
    );
    assert!(sent, "swaks to the relay pod {ip} failed:\n{transcript}");
    // The relay answers 250 only after the sink did, which stores first.
    let message =
        stored(sink, id).unwrap_or_else(|| panic!("{id} was acknowledged but is not in the sink"));
    let verdicts = dkimpy_verify(&message, knot.port());
    assert_eq!(verdicts.len(), 1, "one signature: {verdicts:?}");
    assert!(verdicts[0].pass, "dkimpy must verify {id}: {verdicts:?}");
    assert_eq!(verdicts[0].domain, ZONE);
    verdicts[0].clone()
}

/// Waits for a Ready replacement of `deleted` (not one of `before`), with
/// `count` live Ready pods in all.
async fn replacement(relay_pods: &Api<Pod>, before: &[Pod], deleted: &str, count: usize) -> Pod {
    eventually(format!("a Ready pod to replace {deleted}"))
        .within(POD_TIMEOUT)
        .every(Duration::from_millis(250))
        .until_async(|| async {
            let list = relay_pods
                .list(&ListParams::default().labels(RELAY_SELECTOR))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            let live: Vec<&Pod> = list
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            let new = live.iter().find(|p| {
                p.name_any() != deleted && !before.iter().any(|o| o.name_any() == p.name_any())
            });
            match new {
                Some(pod) if live.len() == count && live.iter().all(|p| ready(p)) => {
                    Ok((*pod).clone())
                }
                _ => Err(describe(&list)),
            }
        })
        .await
}

/// What a stream of submissions came to.
#[derive(Default, Debug)]
struct StreamOutcome {
    /// (Message-ID, pod IP, when the 250 came).
    acknowledged: Vec<(String, Ipv4Addr, Instant)>,
    refused: Vec<(String, u16)>,
    cut: Vec<(String, String)>,
}

/// How many samples the timing measurements below take (each one waits
/// for the kubelet or a DNS check): `NODE_TIMING_SAMPLES`, 1 by default.
fn timing_samples() -> usize {
    std::env::var("NODE_TIMING_SAMPLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .max(1)
}

// Several threads: the stream clients and watchers run while the test
// itself blocks on swaks and dkimpy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_chart_and_a_relay_run_as_pods_and_a_relay_pod_deleted_mid_stream_loses_no_acknowledged_message()
 {
    let _turn = CHART.lock().await;
    let node = node();
    let client = node.cluster.client().await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let _dns = node.expose(knot.port());
    let sink = SmtpSink::start();
    let _upstream = node.expose(sink.port);
    let operator = Operator::install(node, &client, &knot).await;
    let tenant = Tenant::onboard(node, &client, &knot, &sink, 2).await;
    let ns = &tenant.ns.name;

    // A message submitted to a pod over STARTTLS with the tenant's
    // credentials arrives at the upstream signed, and dkimpy verifies it.
    let verdict = send_and_verify(&tenant, &sink, &knot, pod_ip(&tenant.pods[0]), "pod-1");
    assert_eq!(verdict.selector, tenant.selector);

    // A bounded stream (STREAM messages, CLIENTS concurrent sessions of up
    // to PER_SESSION messages each) goes to the relay's Ready pods while
    // one of them is deleted, gracefully, through the API. There is no
    // kube-proxy here: the clients' list of addresses is refreshed from
    // the API (Ready, not terminating), as endpoints would be.
    const STREAM: usize = 200;
    const CLIENTS: usize = 8;
    const PER_SESSION: usize = 5;
    const DELETE_AFTER: usize = 60;
    const PACE: Duration = Duration::from_millis(300);
    let relay_pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let victim = tenant.pods[0].clone();
    let victim_ip = pod_ip(&victim);
    let targets = Arc::new(Mutex::new(
        tenant.pods.iter().map(pod_ip).collect::<Vec<_>>(),
    ));
    let next = Arc::new(AtomicUsize::new(0));
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let outcome = Arc::new(Mutex::new(StreamOutcome::default()));
    let stop_refresh = Arc::new(AtomicBool::new(false));
    let refresh = {
        let (targets, relay_pods, stop) =
            (targets.clone(), relay_pods.clone(), stop_refresh.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(list) = relay_pods
                    .list(&ListParams::default().labels(RELAY_SELECTOR))
                    .await
                {
                    let ips: Vec<Ipv4Addr> = list
                        .items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none() && ready(p))
                        .map(pod_ip)
                        .collect();
                    if !ips.is_empty() {
                        *targets.lock().unwrap_or_else(PoisonError::into_inner) = ips;
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client_number| {
            let (targets, next, acknowledged, outcome) = (
                targets.clone(),
                next.clone(),
                acknowledged.clone(),
                outcome.clone(),
            );
            let auth = (tenant.username.clone(), tenant.password.clone());
            tokio::spawn(async move {
                let take = || {
                    let n = next.fetch_add(1, Ordering::SeqCst);
                    (n < STREAM).then(|| format!("stream-{n}"))
                };
                let mut pending = take();
                'sessions: while let Some(first) = pending.take() {
                    let ip = {
                        let targets = targets.lock().unwrap_or_else(PoisonError::into_inner);
                        targets[client_number % targets.len()]
                    };
                    let mut session = match SmtpSession::open(ip, 587, (&auth.0, &auth.1)).await {
                        Ok(session) => session,
                        Err(fate) => {
                            // The message counts as not taken: recorded
                            // how it failed, never silently dropped.
                            let mut o = outcome.lock().unwrap_or_else(PoisonError::into_inner);
                            match fate {
                                Fate::Refused(code) => o.refused.push((first, code)),
                                other => o.cut.push((first, format!("{other:?}"))),
                            }
                            drop(o);
                            pending = take();
                            continue;
                        }
                    };
                    let mut id = Some(first);
                    for _ in 0..PER_SESSION {
                        let Some(this) = id.take().or_else(take) else {
                            break;
                        };
                        // Paced, so the stream outlasts the deletion's
                        // way to the kubelet and the relay's shutdown.
                        tokio::time::sleep(PACE).await;
                        let fate = session
                            .send(
                                &format!("alice@{ZONE}"),
                                "bob@example.net",
                                &message_with_id(&this),
                            )
                            .await;
                        let mut o = outcome.lock().unwrap_or_else(PoisonError::into_inner);
                        match fate {
                            Fate::Acknowledged => {
                                o.acknowledged.push((this, ip, Instant::now()));
                                acknowledged.fetch_add(1, Ordering::SeqCst);
                            }
                            Fate::Refused(code) => o.refused.push((this, code)),
                            Fate::Cut(why) => {
                                o.cut.push((this, why));
                                drop(o);
                                pending = take();
                                continue 'sessions;
                            }
                        }
                    }
                    session.quit().await;
                    pending = take();
                }
            })
        })
        .collect();
    eventually(format!(
        "{DELETE_AFTER} messages acknowledged before the deletion"
    ))
    .within(POD_TIMEOUT)
    .every(Duration::from_millis(20))
    .until(|| accept_if(acknowledged.load(Ordering::SeqCst), |n| *n >= DELETE_AFTER));
    let deleted_at = Instant::now();
    relay_pods
        .delete(&victim.name_any(), &DeleteParams::default())
        .await
        .expect("deleting a relay pod");
    // When the deleted pod stops accepting connections (its relay got
    // SIGTERM): what it acknowledges after that, it finished while
    // draining.
    let closed = tokio::spawn(async move {
        loop {
            let connect = tokio::net::TcpStream::connect((victim_ip, 587));
            match tokio::time::timeout(Duration::from_secs(1), connect).await {
                Ok(Ok(_)) => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => return Instant::now(),
            }
        }
    });
    for client in clients {
        tokio::time::timeout(POD_TIMEOUT, client)
            .await
            .expect("the stream is bounded in time")
            .expect("a stream client");
    }
    let elapsed = started.elapsed();
    let closed_at = tokio::time::timeout(POD_TIMEOUT, closed)
        .await
        .expect("the deleted pod stops accepting connections")
        .expect("the listener probe");
    stop_refresh.store(true, Ordering::SeqCst);
    let _ = refresh.await;

    let outcome = std::mem::take(&mut *outcome.lock().unwrap_or_else(PoisonError::into_inner));
    let total = outcome.acknowledged.len() + outcome.refused.len() + outcome.cut.len();
    assert_eq!(total, STREAM, "every message is accounted for: {outcome:?}");
    // Nothing acknowledged is lost: the sink stores a message before it
    // answers 250 and the relay answers 250 only after the sink did, so
    // every acknowledged message is in the sink now, with no wait.
    let ids: std::collections::BTreeSet<String> = sink
        .messages()
        .iter()
        .filter_map(|m| {
            let text = String::from_utf8_lossy(m);
            let start = text.find("Message-ID: <")? + "Message-ID: <".len();
            let end = text[start..].find('@')?;
            Some(text[start..start + end].to_string())
        })
        .collect();
    let lost: Vec<&String> = outcome
        .acknowledged
        .iter()
        .map(|(id, _, _)| id)
        .filter(|id| !ids.contains(*id))
        .collect();
    let by_victim = outcome
        .acknowledged
        .iter()
        .filter(|(_, ip, _)| *ip == victim_ip)
        .count();
    let drained = outcome
        .acknowledged
        .iter()
        .filter(|(_, ip, at)| *ip == victim_ip && *at > closed_at)
        .count();
    let after = outcome
        .acknowledged
        .iter()
        .filter(|(_, _, at)| *at > deleted_at)
        .count();
    println!(
        "stream: {STREAM} messages in {:.1} s by {CLIENTS} clients; {} acknowledged \
         ({by_victim} by the deleted pod, {drained} of them on open sessions after it stopped \
         accepting; {after} in all after the deletion), {} refused {:?}, {} cut {:?}; \
         deletion after {:.1} s, the pod stopped accepting {:.1} s later",
        elapsed.as_secs_f64(),
        outcome.acknowledged.len(),
        outcome.refused.len(),
        outcome.refused,
        outcome.cut.len(),
        outcome.cut,
        (deleted_at - started).as_secs_f64(),
        (closed_at - deleted_at).as_secs_f64(),
    );
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages are not in the sink: {lost:?}",
        lost.len(),
        outcome.acknowledged.len()
    );
    assert!(by_victim > 0, "the deleted pod took part in the stream");
    assert!(after > 0, "the stream went on after the deletion");
    assert!(
        closed_at < started + elapsed,
        "the deleted pod stopped accepting while the stream still ran"
    );
    // Sessions open when the relay got SIGTERM were served to their end.
    assert!(
        drained > 0,
        "the deleted pod finished the sessions it had open"
    );
    // A 5xx would be a message the client drops for good: none may come.
    assert!(
        outcome
            .refused
            .iter()
            .all(|(_, code)| (400..500).contains(code)),
        "only temporary refusals: {:?}",
        outcome.refused
    );

    // The Deployment replaces the deleted pod, and the new pod serves as
    // well.
    let new = replacement(&relay_pods, &tenant.pods, &victim.name_any(), 2).await;
    let new_ip = pod_ip(&new);
    serving(new_ip).await;
    let verdict = send_and_verify(&tenant, &sink, &knot, new_ip, "pod-2");
    assert_eq!(verdict.selector, tenant.selector);
    let live = ready_pods(&relay_pods, RELAY_SELECTOR, 2).await;

    // A new TLS certificate in the Secret reaches every running pod through
    // the kubelet's Secret volume (the relay re-reads the mounted files),
    // with no restart.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for sample in 1..=timing_samples() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = self_signed_certificate(dir.path(), "relay.platform.test");
        let pem = std::fs::read_to_string(&cert).expect("certificate");
        let der = pem_to_der(&pem);
        let changed = Instant::now();
        secrets
            .replace(
                "relay-tls",
                &PostParams::default(),
                &tls_secret(&cert, &key),
            )
            .await
            .expect("replacing the TLS Secret");
        for pod in &live {
            let ip = pod_ip(pod);
            let auth = tenant.auth();
            eventually(format!("{} to serve the new certificate", pod.name_any()))
                .within(Duration::from_secs(180))
                .every(Duration::from_millis(250))
                .until_async(|| async {
                    match served_certificate(ip, 587, auth).await {
                        Some(served) if served == der => Ok(()),
                        Some(_) => Err("the old certificate".to_string()),
                        None => Err("no STARTTLS session".to_string()),
                    }
                })
                .await;
            println!(
                "timing: TLS Secret change to the new certificate served by {} in {:.1} s (sample {sample})",
                pod.name_any(),
                changed.elapsed().as_secs_f64()
            );
        }
    }
    let restarts: i32 = relay_pods
        .list(&ListParams::default().labels(RELAY_SELECTOR))
        .await
        .expect("relay pods")
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
        .flatten()
        .map(|c| c.restart_count)
        .sum();
    assert_eq!(restarts, 0, "no relay container restarted");

    // A completed rotation reaches the running pods: the first message
    // signed with the new selector, timed from the status saying it is
    // Active (the relay watches its config Secrets through the API).
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), ns);
    for sample in 1..=timing_samples() {
        let old =
            active_selector(&domains.get("tenant").await.expect("MailDomain")).expect("active");
        annotate_rotation(&domains, &format!("timing-{sample}")).await;
        let pending = publish_pending(&domains, &knot).await;
        active(&domains, &pending.selector).await;
        let activated = Instant::now();
        for pod in &live {
            let ip = pod_ip(pod);
            let mut n = 0;
            let signed_with = eventually(format!(
                "{} to sign with {}",
                pod.name_any(),
                pending.selector
            ))
            .within(Duration::from_secs(60))
            .every(Duration::from_millis(50))
            .until(|| {
                n += 1;
                let id = format!("rotation-{sample}-{}-{n}", pod.name_any());
                let verdict = send_and_verify(&tenant, &sink, &knot, ip, &id);
                if verdict.selector == pending.selector {
                    Ok(verdict.selector)
                } else {
                    assert_eq!(verdict.selector, old, "signed with the old key meanwhile");
                    Err(verdict.selector)
                }
            });
            assert_eq!(signed_with, pending.selector);
            println!(
                "timing: rotation Active in status to the first message signed with it by {} in {:.2} s (sample {sample})",
                pod.name_any(),
                activated.elapsed().as_secs_f64()
            );
        }
    }
    assert!(
        operator
            .pods
            .iter()
            .any(|p| p.name_any() == operator.holder)
    );
    tenant.offboard(&client).await;
    drop(operator);
}

async fn annotate_rotation(domains: &Api<MailDomain>, token: &str) {
    let patch =
        serde_json::json!({"metadata": {"annotations": {"mailauth.dev/rotate-requested": token}}});
    domains
        .patch("tenant", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("requesting a rotation");
}

/// The DER of the first certificate in `pem`.
fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine as _;
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("base64 certificate")
}

// Several threads: the stream clients and watchers run while the test
// itself blocks on swaks and dkimpy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_pod_killed_mid_rotation_the_other_takes_over_and_no_active_key_is_lost() {
    let _turn = CHART.lock().await;
    let node = node();
    let client = node.cluster.client().await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let _dns = node.expose(knot.port());
    let sink = SmtpSink::start();
    let _upstream = node.expose(sink.port);
    let operator = Operator::install(node, &client, &knot).await;
    let tenant = Tenant::onboard(node, &client, &knot, &sink, 1).await;
    let ns = &tenant.ns.name;
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let ip = pod_ip(&tenant.pods[0]);
    let old = tenant.selector.clone();

    // From here to the end, a watcher checks every 100 ms that the status
    // names an Active key and that its private key is in the Secret.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (domains, secrets, stop) = (domains.clone(), secrets.clone(), stop.clone());
        tokio::spawn(async move {
            let mut checks = 0u32;
            let mut violations = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                if let (Ok(md), Ok(secret)) = (
                    domains.get("tenant").await,
                    secrets.get("tenant-dkim").await,
                ) {
                    checks += 1;
                    let actives: Vec<String> = domain_keys(&md)
                        .into_iter()
                        .filter(|k| k.state == KeyState::Active)
                        .map(|k| k.selector)
                        .collect();
                    let entries: Vec<String> =
                        secret.data.unwrap_or_default().into_keys().collect();
                    match actives.as_slice() {
                        [selector] if entries.contains(&format!("{selector}.pem")) => {}
                        _ => violations
                            .push(format!("Active {actives:?}, Secret entries {entries:?}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (checks, violations)
        })
    };

    // A rotation is requested; as soon as its Pending key is in status, the
    // leader pod is killed (no grace period), before the key is published.
    annotate_rotation(&domains, "kill-the-leader").await;
    let pending = eventually("the rotation's Pending key")
        .within(POD_TIMEOUT)
        .every(Duration::from_millis(50))
        .until_async(|| async {
            let md = domains.get("tenant").await.map_err(|e| e.to_string())?;
            domain_keys(&md)
                .into_iter()
                .find(|k| k.state == KeyState::Pending)
                .ok_or_else(|| format!("{:?}", md.status))
        })
        .await;
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), &operator.system.name);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &operator.system.name);
    let leader = leases
        .get(LEASE)
        .await
        .expect("the Lease")
        .spec
        .and_then(|s| s.holder_identity)
        .expect("a holder");
    operator_pods
        .delete(
            &leader,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await
        .expect("killing the leader pod");
    let killed = Instant::now();

    // Mail signed meanwhile verifies, with the old key.
    let verdict = send_and_verify(&tenant, &sink, &knot, ip, "during-1");
    assert_eq!(verdict.selector, old);

    // The tenant publishes the Pending key; the other replica takes the
    // Lease and completes the rotation.
    let value = dkim_txt_value(pending.algorithm, &pending.public_key);
    knot.add(
        ZONE,
        &format!(
            "{}._domainkey.{ZONE}. 60 TXT {}",
            pending.selector,
            txt_data(&value)
        ),
    );
    let new_holder = lease_holder(&client, &operator.system.name, |holder| holder != &leader).await;
    let took_over = killed.elapsed();
    let verdict = send_and_verify(&tenant, &sink, &knot, ip, "during-2");
    assert!(verdict.selector == old || verdict.selector == pending.selector);
    let md = active(&domains, &pending.selector).await;
    let converged = killed.elapsed();
    let keys = domain_keys(&md);
    assert!(
        keys.iter()
            .any(|k| k.selector == old && k.state == KeyState::Retiring),
        "the old key is Retiring: {keys:?}"
    );
    assert_eq!(
        keys.iter().filter(|k| k.state == KeyState::Pending).count(),
        0,
        "no key is left Pending: {keys:?}"
    );
    // Mail after signs with the new key and verifies.
    let mut n = 0;
    eventually(format!("mail signed with {}", pending.selector))
        .within(Duration::from_secs(60))
        .every(Duration::from_millis(100))
        .until(|| {
            n += 1;
            let verdict = send_and_verify(&tenant, &sink, &knot, ip, &format!("after-{n}"));
            accept_if(verdict.selector, |s| *s == pending.selector)
        });
    stop.store(true, Ordering::SeqCst);
    let (checks, violations) = watcher.await.expect("the watcher");
    println!(
        "leader {leader} killed: {new_holder} held the Lease after {:.1} s, the rotation converged after {:.1} s; {checks} checks of the Active key",
        took_over.as_secs_f64(),
        converged.as_secs_f64()
    );
    assert!(checks > 10, "the watcher checked ({checks})");
    assert!(
        violations.is_empty(),
        "the Active key was lost: {violations:?}"
    );
    tenant.offboard(&client).await;
    drop(operator);
}

#[tokio::test]
async fn an_image_that_is_not_imported_is_never_pulled_from_outside() {
    let node = node();
    let client = node.cluster.client().await;
    let ns = node.namespace("node-pull");
    let before = node.refused_egress_packets();
    let pods: Api<Pod> = Api::namespaced(client, &ns.name);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "absent"},
        "spec": {"containers": [{"name": "c", "image": "registry.invalid/absent:1",
                                 "imagePullPolicy": "IfNotPresent"}]}
    }))
    .expect("Pod manifest");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("creating the pod");
    let reason = eventually("the pull of an absent image to fail")
        .within(POD_TIMEOUT)
        .until_async(|| async {
            let pod = pods.get("absent").await.map_err(|e| e.to_string())?;
            let waiting = pod
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.first()?.state.clone()?.waiting);
            match waiting.and_then(|w| w.reason) {
                Some(reason) if reason == "ErrImagePull" || reason == "ImagePullBackOff" => {
                    Ok(reason)
                }
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    assert!(!reason.is_empty());
    // The pull failed because the node's egress rule refused it (the name
    // lookup, or a connection), not for some other reason.
    assert!(
        node.refused_egress_packets() > before,
        "the pull failed without the egress rule refusing anything"
    );
}
