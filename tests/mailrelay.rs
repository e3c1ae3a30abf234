//! The MailRelay controller and the relay projection against the real API
//! server: a Ready MailDomain reaches its relay's config shard with its
//! active key and a credential hash, the tenant gets SMTP credentials, a
//! namespace the relay does not admit is refused with the reason, and a
//! deleted MailDomain leaves the relay before it is gone.

mod support;

use jiff::SignedDuration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use kube::api::{Api, DeleteParams, PostParams};
use mailauth_operator::api::{Condition, ConditionStatus, ConditionType, MailDomain, MailRelay};
use mailauth_operator::dkim::dkim_txt_value;
use mailauth_operator::relay::auth::PasswordHash;
use mailauth_operator::relay::config::{DomainShard, shard_of, shard_secret_name};
use support::cluster::cluster;
use support::dns::{Knot, Zone, txt_data};
use support::operator::{Operator, is, wait_deleted, wait_for};

const ZONE: &str = "relayed.test";
const DUE: SignedDuration = SignedDuration::from_secs(11 * 60);

fn shards(secret: &Secret) -> Vec<DomainShard> {
    secret
        .data
        .iter()
        .flatten()
        .filter(|(name, _)| name.starts_with("domains-"))
        .map(|(_, bytes)| serde_json::from_slice(&bytes.0).expect("shard parses"))
        .collect()
}

/// The Secret that holds a domain's shard on relay `shared`.
fn shard_name(domain: &str) -> String {
    shard_secret_name("shared", shard_of(domain))
}

async fn wait_config(
    api: &Api<Secret>,
    name: &str,
    what: &str,
    check: impl Fn(&[DomainShard]) -> bool,
) -> Vec<DomainShard> {
    shards(&wait_for(api, name, what, |s| check(&shards(s))).await)
}

#[tokio::test]
async fn a_ready_domain_reaches_its_relay_and_leaves_it_on_deletion() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("relay").await;
    let client = c.client().await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let operator = Operator::start(&ns.name, knot.addr()).await;
    let relays: Api<MailRelay> = Api::namespaced(client.clone(), &ns.name);
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);

    let relay: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay",
        "metadata": {"name": "shared"},
        "spec": {"hostname": "relay.platform.test", "upstream": {"host": "127.0.0.1", "port": 2525, "tls": "None"},
                 "spf": {"egressIPs": ["192.0.2.10"]}, "limits": {"messagesPerMinute": 100}}
    }))
    .unwrap();
    relays.create(&PostParams::default(), &relay).await.unwrap();
    let md: MailDomain = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain",
        "metadata": {"name": "acme"},
        "spec": {"domain": ZONE, "relayRef": {"name": "shared"}, "dkim": {"algorithm": "Ed25519"},
                 "rateLimit": {"messagesPerMinute": 40}}
    }))
    .unwrap();
    domains.create(&PostParams::default(), &md).await.unwrap();

    // Admitted (same namespace) and given credentials; not served until
    // DNS verifies its key, and RelayAccepted says so.
    let md = wait_for(&domains, "acme", "credentials and a pending key", |md| {
        md.status.as_ref().is_some_and(|s| {
            s.credentials_hash.is_some() && s.dkim.as_ref().is_some_and(|d| !d.keys.is_empty())
        })
    })
    .await;
    let status = md.status.clone().unwrap();
    assert_eq!(status.credentials_secret.as_deref(), Some("acme-smtp"));
    let accepted = Condition::find(&status.conditions, ConditionType::RelayAccepted).unwrap();
    assert_eq!(
        (accepted.status, accepted.reason.as_str()),
        (ConditionStatus::False, "NotVerifiedYet"),
        "{}",
        accepted.message
    );
    let spf = status
        .records
        .iter()
        .find(|r| r.purpose == mailauth_operator::api::RecordPurpose::Spf)
        .expect("an SPF record once a relay is accepted");
    assert_eq!(spf.value, "v=spf1 ip4:192.0.2.10 ~all");
    let credentials = secrets.get("acme-smtp").await.unwrap();
    let field =
        |k: &str| String::from_utf8(credentials.data.as_ref().unwrap()[k].0.clone()).unwrap();
    assert_eq!(field("host"), format!("shared-relay.{}.svc", ns.name));
    assert_eq!(field("port"), "587");
    let (username, password) = (field("username"), field("password"));

    let settings = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        kube::runtime::wait::await_condition(
            secrets.clone(),
            "shared-relay-config",
            |s: Option<&Secret>| s.is_some(),
        ),
    )
    .await
    .expect("the relay's settings Secret is rendered")
    .expect("watching")
    .expect("settings Secret");
    assert_eq!(
        settings.data.unwrap().keys().collect::<Vec<_>>(),
        vec!["relay.json"]
    );
    assert!(
        secrets.get_opt(&shard_name(ZONE)).await.unwrap().is_none(),
        "an unverified domain never reaches the relay"
    );

    // Publish the key: Active, Ready, and then on the relay with its key,
    // its lowered rate limit and a hash that matches the tenant's password.
    let key = md.status.as_ref().unwrap().dkim.as_ref().unwrap().keys[0].clone();
    knot.add(
        ZONE,
        &format!(
            "{}._domainkey.{ZONE}. 60 TXT {}",
            key.selector,
            txt_data(&dkim_txt_value(key.algorithm, &key.public_key))
        ),
    );
    operator.advance(DUE);
    wait_for(&domains, "acme", "Ready", |md| {
        is(md, ConditionType::Ready, ConditionStatus::True)
    })
    .await;
    let config = wait_config(&secrets, &shard_name(ZONE), "the domain", |s| {
        s.iter().any(|s| !s.domains.is_empty())
    })
    .await;
    let entry = config.iter().flat_map(|s| &s.domains).next().unwrap();
    assert_eq!(entry.domain, ZONE);
    assert_eq!(
        entry.messages_per_minute, 40,
        "a MailDomain can only lower the relay's limit"
    );
    assert_eq!(entry.signing_keys.len(), 1);
    assert_eq!(entry.signing_keys[0].selector, key.selector);
    let tenant = config
        .iter()
        .flat_map(|s| &s.tenants)
        .find(|t| t.username == username)
        .expect("tenant entry");
    assert_eq!(tenant.domains, vec![ZONE.to_string()]);
    let hash = PasswordHash::parse(&tenant.password_hash).expect("hash parses");
    assert!(
        hash.matches(password.as_bytes()),
        "the relay hash matches the tenant password"
    );
    assert!(!hash.matches(b"wrong"));
    let rendered = serde_json::to_string(&config).unwrap();
    assert!(
        !rendered.contains(&password),
        "the relay config never holds the password"
    );

    // The relay's status is written last, after its config, Deployment and
    // Service.
    let relay = wait_for(&relays, "shared", "the domain counted in its status", |r| {
        r.status.as_ref().is_some_and(|s| s.domains == 1)
    })
    .await;
    assert!(Condition::is_true(
        &relay.status.unwrap().conditions,
        ConditionType::Configured
    ));

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns.name);
    let deployment = deployments
        .get("shared-relay")
        .await
        .expect("relay Deployment");
    let args = deployment.spec.unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap();
    assert!(args.iter().any(|a| a == "--config-secrets=shared"));
    let services: Api<Service> = Api::namespaced(client.clone(), &ns.name);
    assert_eq!(
        services
            .get("shared-relay")
            .await
            .unwrap()
            .spec
            .unwrap()
            .ports
            .unwrap()[0]
            .port,
        587
    );

    // Deleted: the domain leaves the relay config before the MailDomain is gone.
    let uid = domains.get("acme").await.unwrap().metadata.uid.unwrap();
    domains
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    wait_deleted(&domains, "acme", &uid).await;
    let after = secrets.get_opt(&shard_name(ZONE)).await.unwrap();
    assert!(
        after.is_none(),
        "the deleted domain is gone from the relay: {:?}",
        after.map(|s| shards(&s))
    );
    operator.stop().await;
    ns.delete().await;
}

#[tokio::test]
async fn a_relay_refuses_namespaces_it_does_not_admit() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("refused").await;
    let client = c.client().await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let operator = Operator::start(&ns.name, knot.addr()).await;
    let relays: Api<MailRelay> = Api::namespaced(client.clone(), &ns.name);
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);
    let relay: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "picky"},
        "spec": {"hostname": "relay.platform.test", "upstream": {"host": "127.0.0.1"},
                 "allowedNamespaces": {"from": "Selector", "selector": {"matchLabels": {"mailauth.dev/relay": "picky"}}}}
    }))
    .unwrap();
    relays.create(&PostParams::default(), &relay).await.unwrap();
    let md: MailDomain = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": "acme"},
        "spec": {"domain": ZONE, "relayRef": {"name": "picky"}, "dkim": {"algorithm": "Ed25519"}}
    }))
    .unwrap();
    domains.create(&PostParams::default(), &md).await.unwrap();
    let md = wait_for(&domains, "acme", "RelayAccepted False", |md| {
        is(md, ConditionType::RelayAccepted, ConditionStatus::False)
    })
    .await;
    let accepted = Condition::find(
        &md.status.as_ref().unwrap().conditions,
        ConditionType::RelayAccepted,
    )
    .unwrap();
    assert_eq!(accepted.reason, "NamespaceNotAllowed");
    assert!(
        accepted.message.contains("does not match"),
        "{}",
        accepted.message
    );
    assert!(
        md.status.as_ref().unwrap().credentials_secret.is_none(),
        "no credentials for a refused domain"
    );

    // Labelling the namespace admits it: credentials are issued, and the
    // relay waits only for DNS now.
    c.label_namespace(&ns.name, "mailauth.dev/relay", "picky")
        .await;
    let md = wait_for(&domains, "acme", "admitted", |md| {
        md.status.as_ref().is_some_and(|s| {
            s.credentials_hash.is_some()
                && Condition::find(&s.conditions, ConditionType::RelayAccepted)
                    .is_some_and(|c| c.reason == "NotVerifiedYet")
        })
    })
    .await;
    assert_eq!(
        md.status.unwrap().credentials_secret.as_deref(),
        Some("acme-smtp")
    );
    operator.stop().await;
    ns.delete().await;
}

fn configured(relay: &MailRelay) -> Option<Condition> {
    Condition::find(
        &relay.status.as_ref()?.conditions,
        ConditionType::Configured,
    )
    .cloned()
}

#[tokio::test]
async fn the_upstream_ca_and_login_come_from_named_secrets_and_a_missing_one_is_reported() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("smarthost").await;
    let client = c.client().await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let operator = Operator::start(&ns.name, knot.addr()).await;
    let relays: Api<MailRelay> = Api::namespaced(client.clone(), &ns.name);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let relay: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "private"},
        "spec": {"hostname": "relay.platform.test",
                 "upstream": {"host": "smtp.internal.test", "tls": "StartTLS",
                              "authSecretName": "smarthost-login", "caSecretName": "smarthost-ca"}}
    }))
    .unwrap();
    relays.create(&PostParams::default(), &relay).await.unwrap();

    // Neither Secret exists yet: Configured=False naming both fields.
    let relay = wait_for(&relays, "private", "Configured False", |r| {
        configured(r).is_some_and(|c| c.status == ConditionStatus::False)
    })
    .await;
    let condition = configured(&relay).unwrap();
    assert_eq!(condition.reason, "UpstreamSecretInvalid");
    for field in ["spec.upstream.authSecretName", "spec.upstream.caSecretName"] {
        assert!(condition.message.contains(field), "{}", condition.message);
    }

    // The platform team creates them; the next reconcile (here started by
    // an annotation, as `kubectl annotate` would) picks them up.
    let ca = support::mail::TestCa::new();
    let secret = |name: &str, data: serde_json::Value| -> Secret {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data
        }))
        .unwrap()
    };
    secrets
        .create(
            &PostParams::default(),
            &secret("smarthost-ca", serde_json::json!({"ca.crt": ca.pem()})),
        )
        .await
        .unwrap();
    secrets
        .create(
            &PostParams::default(),
            &secret(
                "smarthost-login",
                serde_json::json!({"username": "relay", "password": "smarthost-password"}),
            ),
        )
        .await
        .unwrap();
    relays
        .patch(
            "private",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({
                "metadata": {"annotations": {"example.com/poke": "1"}}
            })),
        )
        .await
        .unwrap();
    wait_for(&relays, "private", "Configured True", |r| {
        configured(r).is_some_and(|c| c.status == ConditionStatus::True)
    })
    .await;
    let config = secrets.get("private-relay-config").await.unwrap();
    let settings: mailauth_operator::relay::config::RelaySettings =
        serde_json::from_slice(&config.data.as_ref().unwrap()["relay.json"].0).unwrap();
    assert_eq!(
        settings.upstream.ca_certificates.as_deref(),
        Some(ca.pem().as_str())
    );
    assert_eq!(
        settings.upstream.auth.as_ref().map(|a| a.username.as_str()),
        Some("relay")
    );
    let relay = relays.get("private").await.unwrap();
    assert!(
        !serde_json::to_string(&relay.status)
            .unwrap()
            .contains("smarthost-password"),
        "the password never reaches status"
    );
    operator.stop().await;
    ns.delete().await;
}
