//! Two controller processes against one control plane: only the holder of
//! the leader Lease writes; killing it hands over to the other.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use mailauth_operator::api::{ConditionStatus, ConditionType, MailDomain};
use support::cluster::cluster;
use support::dns::{Knot, Zone};
use support::mail::free_tcp_port;
use support::metrics::{Samples, scrape};
use support::operator::{is, wait_for};
use support::wait::eventually;

const LEASE: &str = "mailauth-test-leader";

struct Replica {
    identity: String,
    metrics_port: u16,
    child: Child,
}

impl Replica {
    fn start(identity: &str, namespace: &str, dns: &Knot) -> Self {
        let metrics_port = free_tcp_port();
        let child = Command::new(env!("CARGO_BIN_EXE_mailauth-operator"))
            .args(["controller", "--leader-election", "--lease-name", LEASE])
            .args([
                "--lease-namespace",
                namespace,
                "--namespace",
                namespace,
                "--identity",
                identity,
            ])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--dns-server", &dns.addr().to_string()])
            .env("KUBECONFIG", &cluster().kubeconfig)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting a controller replica");
        Self {
            identity: identity.into(),
            metrics_port,
            child,
        }
    }

    /// This replica's /metrics; `None` while it does not answer.
    fn metrics(&self) -> Option<Samples> {
        scrape(self.metrics_port)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases.get_opt(LEASE).await.ok()??.spec?.holder_identity
}

async fn wait_holder(leases: &Api<Lease>, other_than: Option<&str>) -> String {
    // Bounded by the Lease duration (15 s) plus renewal slack.
    eventually(format!(
        "a replica other than {other_than:?} to hold the Lease"
    ))
    .within(Duration::from_secs(60))
    .every(Duration::from_millis(200))
    .until_async(|| async {
        match holder(leases).await {
            Some(h) if Some(h.as_str()) != other_than => Ok(h),
            held_by => Err(held_by),
        }
    })
    .await
}

async fn wait_metric(
    replica: &Replica,
    name: &str,
    labels: &[(&str, &str)],
    check: impl Fn(f64) -> bool,
) {
    eventually(format!(
        "{name} on {} to reach the expected value",
        replica.identity
    ))
    .within(Duration::from_secs(10))
    .every(Duration::from_millis(100))
    .until_async(|| async {
        match replica.metrics().and_then(|m| m.find(name, labels)) {
            Some(value) if check(value) => Ok(()),
            value => Err(value),
        }
    })
    .await
}

async fn create(domains: &Api<MailDomain>, name: &str) {
    let md: MailDomain = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": name},
        "spec": {"domain": format!("{name}.test"), "dkim": {"algorithm": "Ed25519"}}
    }))
    .expect("manifest");
    domains
        .create(&PostParams::default(), &md)
        .await
        .expect("creating MailDomain");
}

#[tokio::test]
async fn only_the_leader_writes_and_killing_it_hands_over() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("leader").await;
    let client = c.client().await;
    let knot = Knot::start(&[Zone::new("test")]);
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns.name);
    let domains: Api<MailDomain> = Api::namespaced(client, &ns.name);

    let mut replicas = vec![
        Replica::start("replica-a", &ns.name, &knot),
        Replica::start("replica-b", &ns.name, &knot),
    ];
    let first = wait_holder(&leases, None).await;

    create(&domains, "one").await;
    wait_for(&domains, "one", "KeysReady", |md| {
        is(md, ConditionType::KeysReady, ConditionStatus::True)
    })
    .await;
    let (leader, follower): (Vec<&Replica>, Vec<&Replica>) =
        replicas.iter().partition(|r| r.identity == first);
    // The counter moves just after the write the watch already reported.
    wait_metric(leader[0], "mailauth_status_writes_total", &[], |n| n > 0.0).await;
    assert_eq!(
        follower[0]
            .metrics()
            .map(|m| m.value("mailauth_is_leader", &[])),
        Some(0.0),
        "the follower knows it follows"
    );
    assert_eq!(
        follower[0]
            .metrics()
            .map(|m| m.value("mailauth_status_writes_total", &[])),
        Some(0.0),
        "the follower never writes"
    );

    // Kill the leader without a chance to release the Lease.
    let index = replicas
        .iter()
        .position(|r| r.identity == first)
        .expect("leader replica");
    let mut dead = replicas.remove(index);
    dead.child.kill().expect("killing the leader");
    let _ = dead.child.wait();
    let second = wait_holder(&leases, Some(&first)).await;
    assert_eq!(second, replicas[0].identity);

    create(&domains, "two").await;
    wait_for(&domains, "two", "KeysReady from the new leader", |md| {
        is(md, ConditionType::KeysReady, ConditionStatus::True)
    })
    .await;
    wait_metric(&replicas[0], "mailauth_status_writes_total", &[], |n| {
        n > 0.0
    })
    .await;
    // The new leader counts the keys it found as well as the one it made.
    wait_metric(
        &replicas[0],
        "mailauth_keys",
        &[("state", "Pending")],
        |n| n == 2.0,
    )
    .await;
    drop(replicas);
    ns.delete().await;
}
