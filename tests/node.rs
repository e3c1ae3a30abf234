//! On a real node (tests/controlplane/node.sh; see support::node): the chart's
//! controller pods and a MailRelay's relay pods run the image built from
//! this binary, as users run them, a message goes through a relay pod, and
//! a deleted relay pod is replaced by one that serves as well.
//!
//! Every test here brings the node up (as root) or fails saying why; none
//! skips. The chart's operator watches every namespace, so only one test
//! installs it (two operators would both reconcile every MailDomain).

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use mailauth_operator::api::{ConditionStatus, ConditionType, KeyState, MailDomain, MailRelay};
use mailauth_operator::dkim::dkim_txt_value;
use support::dns::{Knot, Zone, txt_data};
use support::mail::{SmtpSink, dkimpy_verify, self_signed_certificate};
use support::node::{HOST_FROM_PODS, Release, node, scrape_pod, swaks_to};
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

fn message(n: u32) -> String {
    format!(
        "From: Alice <alice@{ZONE}>\r\nTo: Bob <bob@example.net>\r\nSubject: through a pod {n}\r\n\
         Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <pod-{n}@{ZONE}>\r\n\r\nHello from a pod, {n}.\r\n"
    )
}

fn field(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().expect("data")[key].0.clone()).expect("utf-8")
}

#[tokio::test]
async fn the_chart_and_a_relay_run_as_pods_and_a_message_through_the_relay_pod_verifies() {
    let node = node();
    let c = &node.cluster;
    let client = c.client().await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let _dns = node.expose(knot.port());
    let sink = SmtpSink::start();
    let _upstream = node.expose(sink.port);

    // The chart as a platform team installs it, with the locally built
    // image: both replicas become Ready under the chart's ServiceAccount and
    // RBAC, and one of them holds the Lease.
    let system = node.namespace("node-operator");
    let dns_server = format!("dns.servers[0]={HOST_FROM_PODS}:{}", knot.port());
    let release = Release::install(node, "mailauth", &system.name, &["--set", &dns_server]);
    let operator_pods: Api<Pod> = Api::namespaced(client.clone(), &system.name);
    let selector = format!("app.kubernetes.io/instance={}", release.name);
    let controllers = ready_pods(&operator_pods, &selector, 2).await;
    let names: Vec<String> = controllers.iter().map(ResourceExt::name_any).collect();
    for pod in &controllers {
        let spec = pod.spec.as_ref().expect("pod spec");
        assert_eq!(
            spec.service_account_name.as_deref(),
            Some("mailauth-mailauth-operator")
        );
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), &system.name);
    let holder = eventually("one controller pod to hold the Lease")
        .within(POD_TIMEOUT)
        .until_async(|| async {
            let holder = leases
                .get_opt("mailauth-mailauth-operator")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.holder_identity);
            match holder {
                Some(holder) if names.contains(&holder) => Ok(holder),
                other => Err(other),
            }
        })
        .await;

    // A MailRelay on the submission port (587, below 1024: the pod binds it
    // as non-root with every capability dropped) and a tenant's MailDomain.
    let ns = node.namespace("node-relay");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let tls_dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = self_signed_certificate(tls_dir.path(), "relay.platform.test");
    let tls: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "relay-tls"},
        "stringData": {
            "tls.crt": std::fs::read_to_string(&cert).expect("certificate"),
            "tls.key": std::fs::read_to_string(&key).expect("key"),
        }
    }))
    .expect("TLS Secret manifest");
    secrets
        .create(&PostParams::default(), &tls)
        .await
        .expect("creating the TLS Secret");
    let relays: Api<MailRelay> = Api::namespaced(client.clone(), &ns.name);
    let relay: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "shared"},
        "spec": {"replicas": 2, "hostname": "relay.platform.test",
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

    // The in-cluster controller makes a key; the tenant publishes it; the
    // controller checks it in the knot (through the pods' network) and the
    // domain becomes Ready.
    let pending = eventually("a pending key from the in-cluster controller")
        .within(POD_TIMEOUT)
        .until_async(|| async {
            let md = domains.get("tenant").await.map_err(|e| e.to_string())?;
            let keys = md
                .status
                .as_ref()
                .and_then(|s| s.dkim.as_ref())
                .map(|d| d.keys.clone())
                .unwrap_or_default();
            keys.into_iter()
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
    let md = eventually("the MailDomain to be Ready")
        .within(READY_TIMEOUT)
        .every(Duration::from_secs(1))
        .until_async(|| async {
            let md = domains.get("tenant").await.map_err(|e| e.to_string())?;
            if is(&md, ConditionType::Ready, ConditionStatus::True) {
                Ok(md)
            } else {
                Err(format!("{:?}", md.status))
            }
        })
        .await;
    let selector_name = md
        .status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .and_then(|d| d.active_selector.clone())
        .expect("an active selector");

    // The relay's Deployment: two Ready pods, serving the domain.
    let relay_pods: Api<Pod> = Api::namespaced(client.clone(), &ns.name);
    let relay_selector = "app.kubernetes.io/instance=shared,app.kubernetes.io/name=mailauth-relay";
    let pods = ready_pods(&relay_pods, relay_selector, 2).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let deployment = deployments
        .get("shared-relay")
        .await
        .expect("relay Deployment");
    let container = &deployment.spec.unwrap().template.spec.unwrap().containers[0];
    assert_eq!(container.image_pull_policy.as_deref(), Some("Never"));
    let ip = pod_ip(&pods[0]);
    eventually("the relay pod to serve the domain")
        .within(POD_TIMEOUT)
        .until(|| {
            accept_if(
                scrape_pod(ip, 9090).map(|m| m.value("mailauth_relay_config_domains", &[])),
                |domains| domains.is_some_and(|d| d >= 1.0),
            )
        });

    // A message submitted to the pod over STARTTLS with the tenant's
    // credentials arrives at the upstream signed, and dkimpy verifies it.
    let credentials = secrets
        .get("tenant-smtp")
        .await
        .expect("tenant credentials Secret");
    let (username, password) = (
        field(&credentials, "username"),
        field(&credentials, "password"),
    );
    let send_and_verify = |ip: Ipv4Addr, n: u32| {
        let (sent, transcript) = swaks_to(
            ip,
            587,
            &format!("alice@{ZONE}"),
            "bob@example.net",
            (&username, &password),
            &message(n),
        );
        assert!(sent, "swaks to the relay pod {ip} failed:\n{transcript}");
        let stored = sink.wait_for(n as usize, Duration::from_secs(30));
        let last = stored.last().expect("a stored message");
        assert!(
            String::from_utf8_lossy(last).contains(&format!("<pod-{n}@{ZONE}>")),
            "message {n} is the last one stored"
        );
        let verdicts = dkimpy_verify(last, knot.port());
        assert_eq!(verdicts.len(), 1, "one signature: {verdicts:?}");
        assert!(verdicts[0].pass, "dkimpy must verify: {verdicts:?}");
        assert_eq!(
            (verdicts[0].domain.as_str(), verdicts[0].selector.as_str()),
            (ZONE, selector_name.as_str())
        );
    };
    send_and_verify(ip, 1);

    // A deleted relay pod is replaced by the Deployment, and the new pod
    // serves the domain as well.
    let deleted = pods[0].name_any();
    relay_pods
        .delete(&deleted, &DeleteParams::default())
        .await
        .expect("deleting a relay pod");
    let replacement = eventually(format!("a Ready pod to replace {deleted}"))
        .within(POD_TIMEOUT)
        .every(Duration::from_millis(250))
        .until_async(|| async {
            let list = relay_pods
                .list(&ListParams::default().labels(relay_selector))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            let live: Vec<&Pod> = list
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            let new = live.iter().find(|p| {
                p.name_any() != deleted && !pods.iter().any(|o| o.name_any() == p.name_any())
            });
            match new {
                Some(pod) if live.len() == 2 && live.iter().all(|p| ready(p)) => Ok((*pod).clone()),
                _ => Err(describe(&list)),
            }
        })
        .await;
    let ip = pod_ip(&replacement);
    eventually("the replacement relay pod to serve the domain")
        .within(POD_TIMEOUT)
        .until(|| {
            accept_if(
                scrape_pod(ip, 9090).map(|m| m.value("mailauth_relay_config_domains", &[])),
                |domains| domains.is_some_and(|d| d >= 1.0),
            )
        });
    send_and_verify(ip, 2);
    assert!(names.contains(&holder), "{holder} holds the Lease");
    drop(release);
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
