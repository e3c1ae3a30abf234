//! Reliability against the real control plane: the operator recovers by
//! itself when kube-apiserver restarts under it, and a controller killed at
//! any point of a rotation and restarted never loses an Active key, never
//! reuses a selector, never holds two Pending generations, and converges.
//!
//! The API server restart affects every client of the shared control plane,
//! so this file holds its own test binary (cargo runs test binaries one
//! after another) and its tests run one at a time.

mod support;

use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

use jiff::SignedDuration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mailauth_operator::api::{ConditionStatus, ConditionType, KeyState, MailDomain};
use mailauth_operator::dkim::dkim_txt_value;
use support::cluster::cluster;
use support::dns::{Knot, Zone, txt_data};
use support::operator::{Operator, is, wait_for};
use tokio::sync::Mutex;

/// Tests here disturb shared state (the API server): one at a time.
static SERIAL: Mutex<()> = Mutex::const_new(());
const ZONE: &str = "recover.test";
const DUE: SignedDuration = SignedDuration::from_secs(11 * 60);

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

/// The invariants a crash must never break.
fn check_invariants(md: &MailDomain, secret: Option<&Secret>, seen: &mut HashSet<(String, u32)>) {
    let keys = md
        .status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .map(|d| d.keys.clone())
        .unwrap_or_default();
    let pending: HashSet<u32> = keys
        .iter()
        .filter(|k| k.state == KeyState::Pending)
        .map(|k| k.generation)
        .collect();
    assert!(
        pending.len() <= 1,
        "never more than one Pending generation: {keys:?}"
    );
    let stored: HashSet<String> = secret
        .and_then(|s| s.data.as_ref())
        .map(|d| {
            d.keys()
                .filter_map(|k| k.strip_suffix(".pem"))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    for key in keys.iter().filter(|k| k.state == KeyState::Active) {
        assert!(
            stored.contains(&key.selector),
            "Active key {} lost its private key",
            key.selector
        );
    }
    // A selector names one key forever: same selector, same generation.
    for key in &keys {
        seen.insert((key.selector.clone(), key.generation));
    }
    let selectors: HashSet<&String> = seen.iter().map(|(s, _)| s).collect();
    assert_eq!(
        selectors.len(),
        seen.len(),
        "a selector was reused for another key: {seen:?}"
    );
}

#[tokio::test]
async fn a_controller_killed_anywhere_in_a_rotation_converges_without_losing_a_key() {
    let _serial = SERIAL.lock().await;
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("crash").await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let client = c.client().await;
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client, &ns.name);
    domains
        .create(&PostParams::default(), &manifest("acme"))
        .await
        .expect("create");

    let mut seen = HashSet::new();
    let mut published = HashSet::new();
    for round in 0..6u32 {
        let operator = Operator::start(&ns.name, knot.addr()).await;
        if round > 0 {
            // Start a rotation, then kill the controller a little later:
            // somewhere between planning, generating, storing and writing.
            let patch = serde_json::json!({"metadata": {"annotations": {"mailauth.dev/rotate-requested": format!("round-{round}")}}});
            domains
                .patch("acme", &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .expect("annotate");
            operator.advance(SignedDuration::from_hours(25));
            tokio::time::sleep(Duration::from_millis(u64::from(round) * 40)).await;
            drop(operator);
            let md = domains.get("acme").await.expect("get");
            check_invariants(
                &md,
                secrets
                    .get_opt("acme-dkim")
                    .await
                    .expect("get secret")
                    .as_ref(),
                &mut seen,
            );
        } else {
            drop(operator);
        }

        // A fresh controller converges: publish whatever is pending and
        // wait until it is Active.
        let operator = Operator::start(&ns.name, knot.addr()).await;
        let md = wait_for(&domains, "acme", "a pending or rotated key", |md| {
            md.status
                .as_ref()
                .and_then(|s| s.dkim.as_ref())
                .is_some_and(|d| {
                    d.rotate_requested.as_deref()
                        == (round > 0).then(|| format!("round-{round}")).as_deref()
                        && d.keys.iter().any(|k| k.state == KeyState::Pending)
                })
        })
        .await;
        for key in md
            .status
            .as_ref()
            .unwrap()
            .dkim
            .as_ref()
            .unwrap()
            .keys
            .iter()
            .filter(|k| k.state == KeyState::Pending)
        {
            if published.insert(key.selector.clone()) {
                let value = dkim_txt_value(key.algorithm, &key.public_key);
                knot.add(
                    ZONE,
                    &format!(
                        "{}._domainkey.{ZONE}. 60 TXT {}",
                        key.selector,
                        txt_data(&value)
                    ),
                );
            }
        }
        operator.advance(DUE);
        let md = wait_for(&domains, "acme", "no pending key and Ready", |md| {
            is(md, ConditionType::Ready, ConditionStatus::True)
                && md
                    .status
                    .as_ref()
                    .and_then(|s| s.dkim.as_ref())
                    .is_some_and(|d| d.keys.iter().all(|k| k.state != KeyState::Pending))
        })
        .await;
        check_invariants(
            &md,
            secrets
                .get_opt("acme-dkim")
                .await
                .expect("get secret")
                .as_ref(),
            &mut seen,
        );
        operator.stop().await;
    }
    ns.delete().await;
}
