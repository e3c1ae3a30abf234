//! The whole path, as a platform and a tenant would see it: a MailRelay and
//! a MailDomain on the real API server, the records the status asks for
//! published in a real knot, the relay run as a process the way the
//! operator deploys it (watching its config Secrets through the API server,
//! as the relay's own ServiceAccount, so the Role the operator renders is
//! what it runs with), a message submitted with swaks using the tenant's
//! credentials Secret, stored by the SMTP sink (aiosmtpd), and its DKIM
//! signature verified by dkimpy. Then a rotation: the relay picks up the new
//! key without a restart and the next message verifies with it.

mod support;

use jiff::SignedDuration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mailauth_operator::api::{ConditionStatus, ConditionType, KeyState, MailDomain, MailRelay};
use mailauth_operator::dkim::dkim_txt_value;
use mailauth_operator::relay::config::{shard_of, shard_secret_name};
use support::cluster::cluster;
use support::dns::{Knot, Zone, txt_data};
use support::mail::{Relay, SmtpSink, Swaks, dkimpy_verify, self_signed_certificate};
use support::operator::{Operator, is, wait_for};
use support::wait::{accept_if, eventually};

const ZONE: &str = "tenant.test";
const DUE: SignedDuration = SignedDuration::from_secs(11 * 60);

/// Whether a Secret's data mentions `text`.
fn mentions(secret: &Secret, text: &str) -> bool {
    secret
        .data
        .iter()
        .flatten()
        .any(|(_, bytes)| String::from_utf8_lossy(&bytes.0).contains(text))
}

fn field(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().expect("data")[key].0.clone()).expect("utf-8")
}

fn active_selector(md: &MailDomain) -> Option<String> {
    md.status.as_ref()?.dkim.as_ref()?.active_selector.clone()
}

/// Publishes the DKIM record of every Pending key, as a tenant would.
fn publish_pending(knot: &Knot, md: &MailDomain) {
    for key in md
        .status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .map(|d| d.keys.clone())
        .unwrap_or_default()
    {
        if key.state == KeyState::Pending {
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
}

fn message(n: u32) -> String {
    format!(
        "From: Alice <alice@{ZONE}>\r\nTo: Bob <bob@example.net>\r\nSubject: full path {n}\r\n\
         Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <full-{n}@{ZONE}>\r\n\r\nHello from the tenant, {n}.\r\n"
    )
}

#[tokio::test]
async fn a_message_through_the_operator_rendered_relay_arrives_signed_and_verifies() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("fullpath").await;
    let client = c.client().await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let operator = Operator::start(&ns.name, knot.addr()).await;
    let mut sink = SmtpSink::start();

    let relays: Api<MailRelay> = Api::namespaced(client.clone(), &ns.name);
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let relay: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "shared"},
        "spec": {"hostname": "relay.platform.test",
                 "upstream": {"host": "127.0.0.1", "port": sink.port, "tls": "None"},
                 "spf": {"egressIPs": ["127.0.0.1"]}}
    }))
    .expect("MailRelay manifest");
    relays
        .create(&PostParams::default(), &relay)
        .await
        .expect("creating MailRelay");
    let md: MailDomain = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": "tenant"},
        "spec": {"domain": ZONE, "relayRef": {"name": "shared"}, "dkim": {"algorithm": "RSA"}}
    }))
    .expect("MailDomain manifest");
    domains
        .create(&PostParams::default(), &md)
        .await
        .expect("creating MailDomain");

    // The tenant publishes what status asks for; the domain becomes Ready.
    let md = wait_for(&domains, "tenant", "a pending key", |md| {
        md.status
            .as_ref()
            .and_then(|s| s.dkim.as_ref())
            .is_some_and(|d| d.keys.iter().any(|k| k.state == KeyState::Pending))
    })
    .await;
    publish_pending(&knot, &md);
    operator.advance(DUE);
    let md = wait_for(&domains, "tenant", "Ready", |md| {
        is(md, ConditionType::Ready, ConditionStatus::True)
    })
    .await;
    let first = active_selector(&md).expect("an active selector");

    // The relay runs on exactly what the operator rendered, read the way a
    // relay pod reads it: its ServiceAccount watching its namespace.
    let shard = shard_secret_name("shared", shard_of(ZONE));
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        kube::runtime::wait::await_condition(secrets.clone(), &shard, |s: Option<&Secret>| {
            s.is_some_and(|s| mentions(s, ZONE))
        }),
    )
    .await
    .expect("the relay config lists the domain within 60 s")
    .expect("watching the config shard");
    // Its ServiceAccount can read the config once the RoleBinding exists
    // (Relay::start blocks this test's thread, and the operator with it).
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(client.clone(), &ns.name);
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        kube::runtime::wait::await_condition(bindings, "shared-relay", |b: Option<&_>| b.is_some()),
    )
    .await
    .expect("the relay's RoleBinding is rendered within 60 s")
    .expect("watching RoleBindings");
    let tls_dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = c.service_account_kubeconfig(&ns.name, "shared-relay", tls_dir.path());
    let (cert, key) = self_signed_certificate(tls_dir.path(), "relay.platform.test");
    let relay = Relay::start_from_cluster("shared", &ns.name, &kubeconfig, Some((&cert, &key)));
    eventually("the relay to serve the domain")
        .within(std::time::Duration::from_secs(30))
        .until_async(|| async {
            accept_if(
                relay.metrics().value("mailauth_relay_config_domains", &[]),
                |domains| *domains >= 1.0,
            )
        })
        .await;

    let credentials = secrets
        .get("tenant-smtp")
        .await
        .expect("tenant credentials Secret");
    let auth = (
        field(&credentials, "username"),
        field(&credentials, "password"),
    );
    let submit = |n: u32| {
        Swaks {
            port: relay.port,
            mail_from: format!("alice@{ZONE}"),
            rcpt_to: vec!["bob@example.net".into()],
            auth: Some(auth.clone()),
            auth_mechanism: Some("PLAIN".into()),
            starttls: true,
            data: message(n),
        }
        .run()
    };
    let sent = submit(1);
    assert!(
        sent.success,
        "swaks failed:\n{}\nrelay log:\n{}",
        sent.transcript,
        relay.log()
    );
    sink.wait_for(1, std::time::Duration::from_secs(30));
    let verdicts = dkimpy_verify(&sink.last().expect("a stored message"), knot.port());
    assert_eq!(verdicts.len(), 1, "one signature: {verdicts:?}");
    assert!(verdicts[0].pass, "dkimpy must verify: {verdicts:?}");
    assert_eq!(
        (verdicts[0].domain.as_str(), verdicts[0].selector.as_str()),
        (ZONE, first.as_str())
    );

    // A rotation: the new key activates once published, the operator
    // rewrites the domain's shard, the running relay reloads it, and the
    // next message is signed with the new selector. Only the activation
    // changes the shard (a Pending key is not served), so the first reload
    // after the shard carries the new selector is that one.
    let reloads = || {
        relay.metrics().value(
            "mailauth_relay_config_reloads_total",
            &[("result", "success")],
        )
    };
    let reloads_before = reloads();
    let patch =
        serde_json::json!({"metadata": {"annotations": {"mailauth.dev/rotate-requested": "now"}}});
    domains
        .patch("tenant", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotating");
    let md = wait_for(&domains, "tenant", "a new pending key", |md| {
        md.status
            .as_ref()
            .and_then(|s| s.dkim.as_ref())
            .is_some_and(|d| d.keys.iter().any(|k| k.state == KeyState::Pending))
    })
    .await;
    publish_pending(&knot, &md);
    operator.advance(DUE);
    let md = wait_for(&domains, "tenant", "the new key active", |md| {
        active_selector(md).is_some_and(|s| s != first)
    })
    .await;
    let second = active_selector(&md).expect("an active selector");
    tokio::time::timeout(
        std::time::Duration::from_secs(60),
        kube::runtime::wait::await_condition(secrets.clone(), &shard, {
            let second = second.clone();
            move |s: Option<&Secret>| s.is_some_and(|s| mentions(s, &second))
        }),
    )
    .await
    .expect("the relay config carries the new key within 60 s")
    .expect("watching the config shard");
    // Once the relay reports the reload, the very next message is signed
    // with the new selector.
    eventually("the relay to reload the rotated config")
        .within(std::time::Duration::from_secs(30))
        .until_async(|| async { accept_if(reloads(), |n| *n > reloads_before) })
        .await;
    let sent = submit(2);
    assert!(
        sent.success,
        "swaks failed after the reload:\n{}\nrelay log:\n{}",
        sent.transcript,
        relay.log()
    );
    let stored = sink.wait_for(2, std::time::Duration::from_secs(30));
    assert_eq!(stored.len(), 2, "one message per submission");
    let last = sink.last().expect("a stored message");
    assert!(
        String::from_utf8_lossy(&last).contains(&format!("Message-ID: <full-2@{ZONE}>")),
        "the message that arrived last is the one sent last"
    );
    let verdicts = dkimpy_verify(&last, knot.port());
    assert_eq!(verdicts.len(), 1, "one signature: {verdicts:?}");
    assert!(verdicts[0].pass, "dkimpy must verify: {verdicts:?}");
    assert_eq!(
        verdicts[0].selector,
        second,
        "signed with the new key once the relay reported the reload:\n{}",
        relay.log()
    );
    assert!(
        relay
            .http_get("/healthz")
            .is_some_and(|(code, _)| code == 200),
        "the relay kept running"
    );

    operator.stop().await;
    sink.stop();
    ns.delete().await;
}
