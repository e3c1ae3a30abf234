//! Publishing through a DNSProvider: RFC 2136 updates signed with TSIG into
//! a real knot, checked back through the resolver. A tenant's whole life
//! (onboarding, a rotation, deletion) with no manual DNS edit, and each way
//! publishing can be refused, which must publish nothing.

mod support;

use jiff::SignedDuration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mailauth_operator::api::{
    Condition, ConditionStatus, ConditionType, DNSProvider, KeyState, MailDomain, MailRelay,
};
use mailauth_operator::dkim::dkim_txt_value;
use support::cluster::cluster;
use support::dns::{Knot, TSIG_KEY_NAME, Zone, tsig_secret};
use support::operator::{Operator, is, wait_deleted, wait_for};
use support::wait::eventually;

/// Served by knot, granted to the provider.
const ZONE: &str = "pub.test";
/// Served by the resolver's knot, not by the provider's server.
const UNSERVED: &str = "unserved.test";
/// Served by knot, with an SPF record of the tenant's own at its apex.
const FOREIGN: &str = "foreign.test";

/// The TXT values at `name`, each with its character-strings joined, as
/// knot serves them.
fn txt_values(knot: &Knot, name: &str) -> Vec<String> {
    let output = std::process::Command::new("kdig")
        .arg("@127.0.0.1")
        .args(["-p", &knot.port().to_string(), "+short", "+timeout=2"])
        .args([name, "TXT"])
        .output()
        .expect("running kdig");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            line.split('"')
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, part)| part.replace("\\\"", "\""))
                .collect::<String>()
        })
        .filter(|value| !value.is_empty())
        .collect()
}

fn provider(name: &str, knot: &Knot, zones: &[&str], secret: &str) -> DNSProvider {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "DNSProvider",
        "metadata": {"name": name},
        "spec": {
            "zones": zones,
            "rfc2136": {
                "server": knot.addr().to_string(),
                "tsigKeyName": TSIG_KEY_NAME,
                "tsigSecretRef": {"name": secret},
            },
            "ttl": 60,
        }
    }))
    .expect("DNSProvider manifest")
}

fn maildomain(name: &str, spec: serde_json::Value) -> MailDomain {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain",
        "metadata": {"name": name}, "spec": spec,
    }))
    .expect("MailDomain manifest")
}

fn published_reason(md: &MailDomain) -> Option<(ConditionStatus, String, String)> {
    let status = md.status.as_ref()?;
    Condition::find(&status.conditions, ConditionType::DnsPublished)
        .map(|c| (c.status, c.reason.clone(), c.message.clone()))
}

fn has_reason(md: &MailDomain, reason: &str) -> bool {
    published_reason(md)
        .is_some_and(|(status, r, _)| status == ConditionStatus::False && r == reason)
}

fn key_value(md: &MailDomain, state: KeyState) -> Option<(String, String)> {
    let keys = &md.status.as_ref()?.dkim.as_ref()?.keys;
    let key = keys.iter().find(|k| k.state == state)?;
    Some((
        format!("{}._domainkey.{}", key.selector, md.spec.domain),
        dkim_txt_value(key.algorithm, &key.public_key),
    ))
}

#[tokio::test]
async fn a_domain_with_a_provider_onboards_rotates_and_leaves_with_no_manual_dns_step() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("publish").await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let operator = Operator::start(&ns.name, knot.addr()).await;
    let client = c.client().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let providers: Api<DNSProvider> = Api::namespaced(client.clone(), &ns.name);
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);
    let pp = PostParams::default();
    secrets
        .create(&pp, &tsig_secret("tsig", knot.tsig_secret()))
        .await
        .expect("TSIG Secret");
    providers
        .create(&pp, &provider("dns", &knot, &[ZONE], "tsig"))
        .await
        .expect("DNSProvider");
    assert!(txt_values(&knot, &format!("_dmarc.{ZONE}")).is_empty());

    domains
        .create(
            &pp,
            &maildomain(
                "acme",
                serde_json::json!({
                    "domain": ZONE,
                    "dns": {"providerRef": {"name": "dns"}},
                    "dkim": {"rotation": {"period": "30d", "overlap": "2d"}},
                }),
            ),
        )
        .await
        .expect("MailDomain");

    // Onboarding: nobody touches knot, the domain becomes Ready.
    let md = wait_for(
        &domains,
        "acme",
        "Ready and DNSPublished with no manual step",
        |md| {
            is(md, ConditionType::Ready, ConditionStatus::True)
                && is(md, ConditionType::DnsPublished, ConditionStatus::True)
        },
    )
    .await;
    let (first_name, first_value) = key_value(&md, KeyState::Active).expect("an Active key");
    assert_eq!(txt_values(&knot, &first_name), vec![first_value.clone()]);
    let dmarc = txt_values(&knot, &format!("_dmarc.{ZONE}"));
    assert_eq!(dmarc.len(), 1, "one DMARC record: {dmarc:?}");
    assert!(dmarc[0].starts_with("v=DMARC1; p=none"), "{dmarc:?}");
    let ledger: Vec<&str> = md
        .status
        .as_ref()
        .unwrap()
        .published
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert!(
        ledger.contains(&first_name.as_str())
            && ledger.contains(&format!("_dmarc.{ZONE}").as_str()),
        "{ledger:?}"
    );

    // A rotation by annotation completes by itself: the new key is
    // published, verified and signing; the old one stays published for the
    // overlap, then retires and its record leaves knot.
    domains
        .patch(
            "acme",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"mailauth.dev/rotate-requested": "1"}}})),
        )
        .await
        .expect("annotating");
    let md = wait_for(
        &domains,
        "acme",
        "the new key Active, the old Retiring",
        |md| {
            key_value(md, KeyState::Retiring).is_some_and(|(name, _)| name == first_name)
                && key_value(md, KeyState::Active).is_some_and(|(name, _)| name != first_name)
        },
    )
    .await;
    let (second_name, second_value) = key_value(&md, KeyState::Active).unwrap();
    assert_eq!(txt_values(&knot, &second_name), vec![second_value]);
    assert_eq!(
        txt_values(&knot, &first_name),
        vec![first_value.clone()],
        "still published for the overlap"
    );

    operator.advance(SignedDuration::from_hours(49));
    wait_for(&domains, "acme", "the old key Retired", |md| {
        md.status
            .as_ref()
            .and_then(|s| s.dkim.as_ref())
            .is_some_and(|d| d.keys.iter().any(|k| k.state == KeyState::Retired))
    })
    .await;
    // Awaited without blocking: the operator runs on this test's runtime.
    eventually("the retired key's record to leave knot")
        .within(std::time::Duration::from_secs(60))
        .until_async(|| async {
            match txt_values(&knot, &first_name) {
                found if found.is_empty() => Ok(()),
                found => Err(found),
            }
        })
        .await;
    assert_eq!(
        txt_values(&knot, &second_name).len(),
        1,
        "the Active key's record stays"
    );

    // Deleting the MailDomain removes exactly what the operator wrote.
    let uid = md.metadata.uid.clone().unwrap();
    domains
        .delete("acme", &DeleteParams::default())
        .await
        .expect("deleting");
    wait_deleted(&domains, "acme", &uid).await;
    assert!(
        txt_values(&knot, &second_name).is_empty(),
        "DKIM record removed"
    );
    assert!(
        txt_values(&knot, &format!("_dmarc.{ZONE}")).is_empty(),
        "DMARC record removed"
    );

    operator.stop().await;
    ns.delete().await;
}

#[tokio::test]
async fn each_refusal_gives_its_condition_and_publishes_nothing() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("publish-refused").await;
    let other = c.namespace("publish-other").await;
    let foreign_spf = "v=spf1 ip4:192.0.2.1 -all";
    let knot = Knot::start(&[
        Zone::new(ZONE),
        Zone::new(FOREIGN).txt("@", foreign_spf),
        Zone::new(UNSERVED),
    ]);
    // A server that takes this key but is not the primary of UNSERVED (the
    // resolver, the first knot, is).
    let elsewhere = Knot::start(&[Zone::new("elsewhere.test")]);
    let operator = Operator::start_for(&[&ns.name, &other.name], knot.addr()).await;
    let client = c.client().await;
    let pp = PostParams::default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let providers: Api<DNSProvider> = Api::namespaced(client.clone(), &ns.name);
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);
    secrets
        .create(&pp, &tsig_secret("tsig", knot.tsig_secret()))
        .await
        .unwrap();
    secrets
        .create(&pp, &tsig_secret("elsewhere", elsewhere.tsig_secret()))
        .await
        .unwrap();
    // The right key name with another secret: knot answers BADSIG.
    let wrong = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [7u8; 32]);
    secrets
        .create(&pp, &tsig_secret("wrong", &wrong))
        .await
        .unwrap();
    providers
        .create(&pp, &provider("bad-key", &knot, &[ZONE], "wrong"))
        .await
        .unwrap();
    // A zone knot does not serve: NOTAUTH.
    providers
        .create(
            &pp,
            &provider("unserved", &elsewhere, &[UNSERVED], "elsewhere"),
        )
        .await
        .unwrap();
    // Granted only another zone.
    providers
        .create(&pp, &provider("narrow", &knot, &["elsewhere.test"], "tsig"))
        .await
        .unwrap();
    providers
        .create(&pp, &provider("good", &knot, &[ZONE, FOREIGN], "tsig"))
        .await
        .unwrap();
    // A relay, so SPF is wanted at the foreign domain.
    let relay: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "relay"},
        "spec": {"hostname": "relay.platform.test",
                 "upstream": {"host": "127.0.0.1", "port": 2525, "tls": "None"},
                 "spf": {"egressIPs": ["127.0.0.1"]}}
    }))
    .unwrap();
    Api::<MailRelay>::namespaced(client.clone(), &ns.name)
        .create(&pp, &relay)
        .await
        .unwrap();

    let cases = [
        ("bad-key", "bad.pub.test", "bad-key", "BadTSIG"),
        ("unserved", UNSERVED, "unserved", "ZoneNotServed"),
        ("narrow", "narrow.pub.test", "narrow", "ZoneNotGranted"),
        ("foreign", FOREIGN, "good", "ForeignRecord"),
    ];
    for (name, domain, provider_name, _) in cases {
        let mut spec =
            serde_json::json!({"domain": domain, "dns": {"providerRef": {"name": provider_name}}});
        if name == "foreign" {
            spec["relayRef"] = serde_json::json!({"name": "relay"});
        }
        domains.create(&pp, &maildomain(name, spec)).await.unwrap();
    }
    // A tenant in another namespace names this namespace's provider, which
    // admits only its own namespace.
    Api::<MailDomain>::namespaced(client.clone(), &other.name)
        .create(
            &pp,
            &maildomain(
                "intruder",
                serde_json::json!({"domain": "intruder.pub.test",
                    "dns": {"providerRef": {"name": "good", "namespace": ns.name}}}),
            ),
        )
        .await
        .unwrap();

    for (name, domain, _, reason) in cases {
        let md = wait_for(&domains, name, reason, |md| has_reason(md, reason)).await;
        let (_, _, message) = published_reason(&md).unwrap();
        assert!(!message.is_empty());
        if name != "foreign" {
            assert!(
                txt_values(&knot, &format!("_dmarc.{domain}")).is_empty(),
                "{name}: nothing published"
            );
            let (dkim_name, _) = key_value(&md, KeyState::Pending).expect("a Pending key");
            assert!(
                txt_values(&knot, &dkim_name).is_empty(),
                "{name}: no DKIM record"
            );
        } else {
            // Only SPF is in the way: the rest is published.
            assert!(
                message.contains("v=spf1 ip4:192.0.2.1 ip4:127.0.0.1 -all"),
                "the merged record is given: {message}"
            );
            assert_eq!(
                txt_values(&knot, FOREIGN),
                vec![foreign_spf.to_string()],
                "the tenant's SPF record is untouched"
            );
            wait_for(
                &domains,
                name,
                "DMARC published beside the foreign SPF",
                |_| txt_values(&knot, &format!("_dmarc.{domain}")).len() == 1,
            )
            .await;
        }
    }
    let intruders: Api<MailDomain> = Api::namespaced(client.clone(), &other.name);
    wait_for(&intruders, "intruder", "ProviderNotAllowed", |md| {
        has_reason(md, "ProviderNotAllowed")
    })
    .await;
    assert!(txt_values(&knot, "_dmarc.intruder.pub.test").is_empty());

    operator.stop().await;
    ns.delete().await;
    other.delete().await;
}

#[tokio::test]
async fn a_provider_created_after_its_maildomain_is_used_at_once() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("publish-late").await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let operator = Operator::start(&ns.name, knot.addr()).await;
    let client = c.client().await;
    let pp = PostParams::default();
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);
    domains
        .create(
            &pp,
            &maildomain(
                "late",
                serde_json::json!({"domain": ZONE, "dns": {"providerRef": {"name": "dns"}}}),
            ),
        )
        .await
        .unwrap();
    wait_for(&domains, "late", "ProviderNotFound", |md| {
        has_reason(md, "ProviderNotFound")
    })
    .await;
    assert!(txt_values(&knot, &format!("_dmarc.{ZONE}")).is_empty());

    // The clock does not move: the provider's own watch event is what
    // makes the MailDomain publish.
    Api::<Secret>::namespaced(client.clone(), &ns.name)
        .create(&pp, &tsig_secret("tsig", knot.tsig_secret()))
        .await
        .unwrap();
    Api::<DNSProvider>::namespaced(client.clone(), &ns.name)
        .create(&pp, &provider("dns", &knot, &[ZONE], "tsig"))
        .await
        .unwrap();
    wait_for(&domains, "late", "Ready and DNSPublished", |md| {
        is(md, ConditionType::Ready, ConditionStatus::True)
            && is(md, ConditionType::DnsPublished, ConditionStatus::True)
    })
    .await;
    assert_eq!(txt_values(&knot, &format!("_dmarc.{ZONE}")).len(), 1);

    operator.stop().await;
    ns.delete().await;
}
