//! Delegated DKIM against a real knot, a real relay process and dkimpy: the
//! tenant publishes its two CNAMEs once, then three rotations follow (the
//! clock is injected) with no change to the tenant's zone at all, while a
//! stream of messages goes through the relay and every one verifies. Then
//! the tenant deletes a CNAME: the condition says so loudly, and the relay
//! keeps signing.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::SignedDuration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use mailauth_operator::api::{
    Condition, ConditionStatus, ConditionType, DNSProvider, DkimKeyStatus, KeyState, MailDomain,
    MailRelay,
};
use mailauth_operator::dkim::dkim_txt_value;
use support::cluster::cluster;
use support::dns::{Knot, TSIG_KEY_NAME, Zone, tsig_secret};
use support::mail::{
    Relay, SmtpSink, Swaks, dkimpy_verify, dkimpy_verify_all, self_signed_certificate,
};
use support::operator::{Operator, is, wait_for};
use support::wait::{accept_if, eventually};

/// The tenant's zone: it changes once, when the tenant adds the CNAMEs.
const TENANT: &str = "deleg.test";
/// The platform's zone for delegated keys, written by the operator.
const PLATFORM: &str = "dkim.platform.test";
/// The provider's TTL: a new key signs this long after it is seen.
const TTL: SignedDuration = SignedDuration::from_secs(60);
/// Past the DNS memo's recheck of records waiting to be published.
const DUE: SignedDuration = SignedDuration::from_secs(11 * 60);
/// The stream is bounded in count as well as by the test's end.
const STREAM_MAX: u32 = 2000;

fn kdig_short(knot: &Knot, name: &str, record_type: &str) -> Vec<String> {
    let output = std::process::Command::new("kdig")
        .arg("@127.0.0.1")
        .args(["-p", &knot.port().to_string(), "+short", "+timeout=2"])
        .args([name, record_type])
        .output()
        .expect("running kdig");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The SOA serial of `zone`: it changes with every change to the zone.
fn serial(knot: &Knot, zone: &str) -> u64 {
    let soa = kdig_short(knot, zone, "SOA");
    soa.first()
        .and_then(|line| line.split_whitespace().nth(2))
        .and_then(|serial| serial.parse().ok())
        .unwrap_or_else(|| panic!("no SOA for {zone}: {soa:?}"))
}

/// The TXT values at `name`, each one's strings joined.
fn txt_values(knot: &Knot, name: &str) -> Vec<String> {
    kdig_short(knot, name, "TXT")
        .iter()
        .map(|line| {
            line.split('"')
                .enumerate()
                .filter(|(i, _)| i % 2 == 1)
                .map(|(_, part)| part.to_string())
                .collect::<String>()
        })
        .filter(|value| !value.is_empty())
        .collect()
}

fn keys(md: &MailDomain) -> Vec<DkimKeyStatus> {
    md.status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .map(|d| d.keys.clone())
        .unwrap_or_default()
}

fn key_in(md: &MailDomain, selector: &str, state: KeyState) -> Option<DkimKeyStatus> {
    keys(md)
        .into_iter()
        .find(|k| k.selector == selector && k.state == state)
}

fn delegated_to(md: &MailDomain) -> Option<String> {
    md.status.as_ref()?.dkim.as_ref()?.delegated_to.clone()
}

fn dkim_condition(md: &MailDomain) -> Option<(ConditionStatus, String, String)> {
    let status = md.status.as_ref()?;
    Condition::find(&status.conditions, ConditionType::DkimVerified)
        .map(|c| (c.status, c.reason.clone(), c.message.clone()))
}

fn field(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().expect("data")[key].0.clone()).expect("utf-8")
}

/// The selector of a stored message's DKIM-Signature (`s=`).
fn signed_selector(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    let header = text.split("\r\n\r\n").next()?.replace("\r\n\t", " ");
    let signature = header
        .lines()
        .find(|line| line.to_ascii_lowercase().starts_with("dkim-signature:"))?
        .to_string();
    signature
        .split(';')
        .map(str::trim)
        .find_map(|tag| tag.strip_prefix("s="))
        .map(str::to_string)
}

#[tokio::test]
async fn three_delegated_rotations_leave_the_tenants_zone_untouched_and_every_message_verifies() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("delegation").await;
    let client = c.client().await;
    let knot = Knot::start(&[Zone::new(TENANT), Zone::new(PLATFORM)]);
    let operator = Operator::start(&ns.name, knot.addr()).await;
    let sink = SmtpSink::start();
    let pp = PostParams::default();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns.name);
    let domains: Api<MailDomain> = Api::namespaced(client.clone(), &ns.name);

    // The platform's provider: it hosts delegated keys under PLATFORM and
    // nothing else; the tenant has no provider for its own zone.
    let tsig = tsig_secret("platform-tsig", knot.tsig_secret());
    secrets.create(&pp, &tsig).await.expect("TSIG Secret");
    let provider: DNSProvider = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "DNSProvider",
        "metadata": {"name": "platform"},
        "spec": {
            "zones": [PLATFORM],
            "dkimDelegationZone": PLATFORM,
            "rfc2136": {"server": knot.addr().to_string(), "tsigKeyName": TSIG_KEY_NAME,
                        "tsigSecretRef": {"name": "platform-tsig"}},
            "ttl": TTL.as_secs(),
        }
    }))
    .unwrap();
    Api::<DNSProvider>::namespaced(client.clone(), &ns.name)
        .create(&pp, &provider)
        .await
        .expect("DNSProvider");
    let relay: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "shared"},
        "spec": {"hostname": "relay.platform.test",
                 "upstream": {"host": "127.0.0.1", "port": sink.port, "tls": "None"},
                 "spf": {"egressIPs": ["127.0.0.1"]}}
    }))
    .unwrap();
    Api::<MailRelay>::namespaced(client.clone(), &ns.name)
        .create(&pp, &relay)
        .await
        .expect("MailRelay");
    let md: MailDomain = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": "tenant"},
        "spec": {"domain": TENANT, "relayRef": {"name": "shared"},
                 "dkim": {"delegation": {"providerRef": {"name": "platform"}},
                          "rotation": {"period": "30d", "overlap": "2d"}}}
    }))
    .unwrap();
    domains.create(&pp, &md).await.expect("MailDomain");

    // Status says exactly which CNAMEs to publish, and the first key's
    // record is already in the platform's zone, written by the operator.
    let md = wait_for(
        &domains,
        "tenant",
        "the CNAMEs listed and ma1 published",
        |md| {
            md.status.as_ref().is_some_and(|s| {
                s.records.iter().filter(|r| r.type_ == "CNAME").count() == 2
                    && s.published.iter().any(|p| p.name.starts_with("ma1."))
            })
        },
    )
    .await;
    let base = delegated_to(&md).expect("status.dkim.delegatedTo");
    assert!(base.ends_with(&format!(".{PLATFORM}")), "{base}");
    let cnames: Vec<(String, String)> = md
        .status
        .as_ref()
        .unwrap()
        .records
        .iter()
        .filter(|r| r.type_ == "CNAME")
        .map(|r| (r.name.clone(), r.value.clone()))
        .collect();
    assert_eq!(
        cnames,
        [
            (format!("ma1._domainkey.{TENANT}"), format!("ma1.{base}.")),
            (format!("ma2._domainkey.{TENANT}"), format!("ma2.{base}.")),
        ]
    );
    let first = key_in(&md, "ma1", KeyState::Pending).expect("ma1 Pending");
    assert_eq!(
        txt_values(&knot, &format!("ma1.{base}")),
        [dkim_txt_value(first.algorithm, &first.public_key)]
    );

    // The tenant's one and only DNS change: the two CNAMEs.
    for (name, target) in &cnames {
        knot.add(TENANT, &format!("{name}. 300 CNAME {target}"));
    }
    let tenant_serial = serial(&knot, TENANT);
    operator.advance(DUE);
    wait_for(&domains, "tenant", "ma1 seen through its CNAME", |md| {
        key_in(md, "ma1", KeyState::Pending).is_some_and(|k| k.verified_at.is_some())
    })
    .await;
    operator.advance(TTL);
    wait_for(&domains, "tenant", "Ready, signing with ma1", |md| {
        is(md, ConditionType::Ready, ConditionStatus::True)
            && key_in(md, "ma1", KeyState::Active).is_some()
    })
    .await;

    // The relay, as the operator deploys it, and a stream of messages
    // through it for the rest of the test.
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(client.clone(), &ns.name);
    tokio::time::timeout(
        Duration::from_secs(60),
        kube::runtime::wait::await_condition(bindings, "shared-relay", |b: Option<&_>| b.is_some()),
    )
    .await
    .expect("the relay's RoleBinding within 60 s")
    .expect("watching RoleBindings");
    let tls_dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = c.service_account_kubeconfig(&ns.name, "shared-relay", tls_dir.path());
    let (cert, key) = self_signed_certificate(tls_dir.path(), "relay.platform.test");
    let relay = Relay::start_from_cluster("shared", &ns.name, &kubeconfig, Some((&cert, &key)));
    eventually("the relay to serve the domain")
        .within(Duration::from_secs(30))
        .until_async(|| async {
            accept_if(
                relay.metrics().value("mailauth_relay_config_domains", &[]),
                |domains| *domains >= 1.0,
            )
        })
        .await;
    let credentials = secrets.get("tenant-smtp").await.expect("credentials");
    let auth = (
        field(&credentials, "username"),
        field(&credentials, "password"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let relay_port = relay.port;
    let stream = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut refused = Vec::new();
            let mut sent = 0;
            while !stop.load(Ordering::Relaxed) && sent < STREAM_MAX {
                sent += 1;
                let submission = Swaks {
                    port: relay_port,
                    mail_from: format!("alice@{TENANT}"),
                    rcpt_to: vec!["bob@example.net".into()],
                    auth: Some(auth.clone()),
                    auth_mechanism: Some("PLAIN".into()),
                    starttls: true,
                    data: format!(
                        "From: Alice <alice@{TENANT}>\r\nTo: Bob <bob@example.net>\r\n\
                         Subject: stream {sent}\r\nMessage-ID: <stream-{sent}@{TENANT}>\r\n\r\n\
                         Message {sent} of the stream.\r\n"
                    ),
                }
                .run();
                if !submission.success {
                    refused.push(submission.transcript);
                }
            }
            (sent, refused)
        }
    });

    // Messages are verified while their key is still published: before the
    // overlap ends and its slot may take the next key.
    let mut verified = 0;
    let mut signed_with: Vec<String> = Vec::new();
    let mut verify_stored = |signed_with: &mut Vec<String>| {
        let stored = sink.messages();
        let fresh = &stored[verified..];
        for (n, verdicts) in dkimpy_verify_all(fresh, knot.port()).iter().enumerate() {
            assert_eq!(verdicts.len(), 1, "message {}: {verdicts:?}", verified + n);
            let verdict = &verdicts[0];
            assert!(
                verdict.pass && verdict.domain == TENANT,
                "message {} must verify for {TENANT}: {verdict:?}",
                verified + n
            );
            if signed_with.last() != Some(&verdict.selector) {
                signed_with.push(verdict.selector.clone());
            }
        }
        verified = stored.len();
    };
    let signed_by = |selector: &'static str| {
        let sink = &sink;
        async move {
            eventually(format!("a message signed with {selector} to arrive"))
                .within(Duration::from_secs(60))
                .until_async(|| async {
                    let last = sink.messages().last().and_then(|m| signed_selector(m));
                    accept_if(last, |s| s.as_deref() == Some(selector))
                })
                .await;
        }
    };
    signed_by("ma1").await;

    for (round, (current, next)) in [("ma1", "ma2"), ("ma2", "ma1"), ("ma1", "ma2")]
        .into_iter()
        .enumerate()
    {
        domains
            .patch(
                "tenant",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                    "mailauth.dev/rotate-requested": format!("round-{round}")}}})),
            )
            .await
            .expect("annotating");
        // Generated into the free slot, published in the platform zone by
        // the operator, seen through the tenant's CNAME; it signs only
        // once the TTL has passed.
        let md = wait_for(&domains, "tenant", "the next key seen", |md| {
            key_in(md, next, KeyState::Pending).is_some_and(|k| k.verified_at.is_some())
        })
        .await;
        let pending = key_in(&md, next, KeyState::Pending).unwrap();
        assert_eq!(
            txt_values(&knot, &format!("{next}.{base}")),
            [dkim_txt_value(pending.algorithm, &pending.public_key)],
            "round {round}: the slot holds exactly the new key"
        );
        operator.advance(TTL);
        wait_for(&domains, "tenant", "the next key signing", |md| {
            key_in(md, next, KeyState::Active).is_some()
                && key_in(md, current, KeyState::Retiring).is_some()
        })
        .await;
        signed_by(next).await;
        verify_stored(&mut signed_with);
        // The overlap ends: the old slot's record leaves the platform zone.
        operator.advance(SignedDuration::from_hours(49));
        wait_for(&domains, "tenant", "the old key retired", |md| {
            key_in(md, current, KeyState::Retired).is_some()
        })
        .await;
        let old = format!("{current}.{base}");
        eventually(format!("{old} to leave knot"))
            .within(Duration::from_secs(60))
            .until_async(|| async {
                match txt_values(&knot, &old) {
                    found if found.is_empty() => Ok(()),
                    found => Err(found),
                }
            })
            .await;
    }
    assert_eq!(
        serial(&knot, TENANT),
        tenant_serial,
        "three rotations changed nothing in the tenant's zone"
    );

    verify_stored(&mut signed_with);

    // The tenant deletes the signing slot's CNAME: a loud condition, and
    // the relay keeps signing with the current key.
    knot.remove(TENANT, &format!("ma2._domainkey.{TENANT}."), "CNAME");
    operator.advance(DUE);
    let md = wait_for(
        &domains,
        "tenant",
        "DKIMVerified=False CNAMEMissing",
        |md| {
            dkim_condition(md).is_some_and(|(status, reason, _)| {
                status == ConditionStatus::False && reason == "CNAMEMissing"
            })
        },
    )
    .await;
    let (_, _, message) = dkim_condition(&md).unwrap();
    assert!(
        message.contains(&format!("ma2._domainkey.{TENANT}"))
            && message.contains("still signed with ma2"),
        "{message}"
    );
    assert!(
        key_in(&md, "ma2", KeyState::Active).is_some(),
        "the key stays Active"
    );
    let arrived = sink.messages().len();
    eventually("messages to keep arriving signed with ma2")
        .within(Duration::from_secs(60))
        .until_async(|| async {
            let stored = sink.messages();
            accept_if(
                stored[arrived..]
                    .iter()
                    .filter(|m| signed_selector(m).as_deref() == Some("ma2"))
                    .count(),
                |n| *n >= 3,
            )
        })
        .await;
    stop.store(true, Ordering::Relaxed);
    let (sent, refused) = stream.join().expect("the stream thread");
    assert!(refused.is_empty(), "refused submissions: {refused:?}");
    let stored = sink.wait_for(sent as usize, Duration::from_secs(30));
    assert_eq!(
        stored.len(),
        sent as usize,
        "every acknowledged message arrived"
    );
    // Without the CNAME a receiver finds no key: what the condition says.
    let last = stored.last().unwrap();
    assert!(!dkimpy_verify(last, knot.port())[0].pass);
    assert_eq!(
        signed_with,
        ["ma1", "ma2", "ma1", "ma2"],
        "each key signed in turn, and every message verified"
    );

    operator.stop().await;
    drop(relay);
    ns.delete().await;
}

#[tokio::test]
async fn delegated_names_are_per_maildomain_and_only_admitted_namespaces_get_them() {
    let c = cluster();
    c.install_crds().await;
    let platform = c.namespace("deleg-platform").await;
    let tenant_a = c.namespace("deleg-a").await;
    let tenant_b = c.namespace("deleg-b").await;
    let client = c.client().await;
    let knot = Knot::start(&[Zone::new(PLATFORM)]);
    let operator = Operator::start_for(
        &[&platform.name, &tenant_a.name, &tenant_b.name],
        knot.addr(),
    )
    .await;
    let pp = PostParams::default();
    let tsig = tsig_secret("tsig", knot.tsig_secret());
    Api::<Secret>::namespaced(client.clone(), &platform.name)
        .create(&pp, &tsig)
        .await
        .unwrap();
    // Offered to tenant A's namespace only.
    let provider: DNSProvider = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "DNSProvider",
        "metadata": {"name": "dkim"},
        "spec": {
            "zones": [PLATFORM], "dkimDelegationZone": PLATFORM,
            "allowedNamespaces": {"from": "Selector", "selector": {"matchLabels": {
                "kubernetes.io/metadata.name": tenant_a.name.clone()}}},
            "rfc2136": {"server": knot.addr().to_string(), "tsigKeyName": TSIG_KEY_NAME,
                        "tsigSecretRef": {"name": "tsig"}},
        }
    }))
    .unwrap();
    Api::<DNSProvider>::namespaced(client.clone(), &platform.name)
        .create(&pp, &provider)
        .await
        .unwrap();
    let md = |domain: &str| -> MailDomain {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": "shop"},
            "spec": {"domain": domain,
                     "dkim": {"delegation": {"providerRef": {"name": "dkim", "namespace": platform.name.clone()}}}}
        }))
        .unwrap()
    };
    let a: Api<MailDomain> = Api::namespaced(client.clone(), &tenant_a.name);
    let b: Api<MailDomain> = Api::namespaced(client.clone(), &tenant_b.name);
    a.create(&pp, &md("shop-a.test")).await.unwrap();
    b.create(&pp, &md("shop-b.test")).await.unwrap();

    let admitted = wait_for(&a, "shop", "A's first key published", |md| {
        md.status
            .as_ref()
            .is_some_and(|s| s.published.iter().any(|p| p.name.starts_with("ma1.")))
    })
    .await;
    let refused = wait_for(&b, "shop", "B refused: ProviderNotAllowed", |md| {
        md.status.as_ref().is_some_and(|s| {
            Condition::find(&s.conditions, ConditionType::DnsPublished)
                .is_some_and(|c| c.reason == "ProviderNotAllowed")
        })
    })
    .await;
    let base = delegated_to(&admitted).expect("A's delegatedTo");
    assert_eq!(
        base,
        format!(
            "{}.{PLATFORM}",
            mailauth_operator::controller::maildomain::dns_publish::delegation_label(
                &tenant_a.name,
                "shop",
                "shop-a.test"
            )
        )
    );
    let status = refused.status.as_ref().unwrap();
    assert!(status.published.is_empty(), "nothing written for B");
    assert_eq!(delegated_to(&refused), None);
    // B's key is not listed for publishing anywhere; A's record is the only
    // one under the platform zone.
    assert!(
        !status.records.iter().any(|r| r.name.ends_with(PLATFORM)),
        "{:?}",
        status.records
    );
    let a_key = key_in(&admitted, "ma1", KeyState::Pending).unwrap();
    assert_eq!(
        txt_values(&knot, &format!("ma1.{base}")),
        [dkim_txt_value(a_key.algorithm, &a_key.public_key)]
    );
    let b_label = mailauth_operator::controller::maildomain::dns_publish::delegation_label(
        &tenant_b.name,
        "shop",
        "shop-b.test",
    );
    assert_ne!(format!("{b_label}.{PLATFORM}"), base);
    assert!(txt_values(&knot, &format!("ma1.{b_label}.{PLATFORM}")).is_empty());

    operator.stop().await;
    for ns in [tenant_a, tenant_b, platform] {
        ns.delete().await;
    }
}
