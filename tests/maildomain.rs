//! The MailDomain controller against the real API server and a real knot:
//! keys generated into Secrets, rotation walked through every state by the
//! injected clock, DNS verdicts, deletion policies, and what happens when
//! others touch our objects.

mod support;

use std::collections::BTreeMap;

use jiff::SignedDuration;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::DkimSigner;
use mail_auth::hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts,
};
use mail_auth::{AuthenticatedMessage, DkimResult, MessageAuthenticator};
use mailauth_operator::api::{
    ConditionStatus, ConditionType, KeyAlgorithm, KeyState, MailDomain, RecordState,
};
use mailauth_operator::dkim::{PrivateKeyPem, dkim_txt_value, signing_key_from_pem};
use support::cluster::cluster;
use support::dns::{Knot, Zone, txt_data};
use support::operator::{Operator, is, wait_deleted, wait_for};
use support::wait::{accept_if, eventually};

const ZONE: &str = "acme.test";
/// Longer than the longest DNS retry backoff (10 min): after moving the
/// clock this far, every record is due for a check.
const DUE: SignedDuration = SignedDuration::from_secs(11 * 60);

struct Fixture {
    ns: support::cluster::TestNamespace,
    knot: Knot,
    operator: Operator,
    domains: Api<MailDomain>,
    secrets: Api<Secret>,
}

async fn fixture(prefix: &str) -> Fixture {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace(prefix).await;
    let knot = Knot::start(&[Zone::new(ZONE)]);
    let operator = Operator::start(&ns.name, knot.addr()).await;
    let client = c.client().await;
    Fixture {
        domains: Api::namespaced(client.clone(), &ns.name),
        secrets: Api::namespaced(client, &ns.name),
        ns,
        knot,
        operator,
    }
}

impl Fixture {
    async fn create(&self, name: &str, spec: serde_json::Value) {
        let md: MailDomain = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailauth.dev/v1alpha1",
            "kind": "MailDomain",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("MailDomain manifest");
        self.domains
            .create(&PostParams::default(), &md)
            .await
            .expect("creating MailDomain");
    }

    /// Publishes in knot every DKIM record the status asks for.
    fn publish_dkim(&self, md: &MailDomain, selector: &str) {
        let key = keys(md)
            .into_iter()
            .find(|k| k.selector == selector)
            .expect("key in status");
        let value = dkim_txt_value(key.algorithm, &key.public_key);
        self.knot.add(
            ZONE,
            &format!("{selector}._domainkey.{ZONE}. 60 TXT {}", txt_data(&value)),
        );
    }

    async fn finish(self) {
        self.operator.stop().await;
        self.ns.delete().await;
    }
}

fn keys(md: &MailDomain) -> Vec<mailauth_operator::api::DkimKeyStatus> {
    md.status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .map(|d| d.keys.clone())
        .unwrap_or_default()
}

fn key_state(md: &MailDomain, selector: &str) -> Option<KeyState> {
    keys(md)
        .into_iter()
        .find(|k| k.selector == selector)
        .map(|k| k.state)
}

fn selectors_in(md: &MailDomain, state: KeyState) -> Vec<String> {
    keys(md)
        .into_iter()
        .filter(|k| k.state == state)
        .map(|k| k.selector)
        .collect()
}

fn stored_pem(secret: &Secret, selector: &str) -> Option<PrivateKeyPem> {
    let bytes = secret.data.as_ref()?.get(&format!("{selector}.pem"))?;
    PrivateKeyPem::from_secret_bytes(bytes.0.clone()).ok()
}

/// Signs a message with the stored private key and verifies it with
/// mail-auth, resolving the public key from knot.
async fn sign_and_verify(
    knot: &Knot,
    algorithm: KeyAlgorithm,
    pem: &PrivateKeyPem,
    selector: &str,
) -> DkimResult {
    let message = format!(
        "From: Alice <alice@{ZONE}>\r\nTo: bob@example.net\r\nSubject: keys work\r\nMessage-ID: <1@{ZONE}>\r\n\r\nHello.\r\n"
    );
    let signer = signing_key_from_pem(algorithm, pem).expect("stored key loads");
    let signature = DkimSigner::from_key(signer)
        .domain(ZONE)
        .selector(selector)
        .headers(["From", "To", "Subject", "Message-ID"])
        .sign(message.as_bytes())
        .expect("signing");
    let signed = format!("{}{message}", signature.to_header());

    let mut udp = ConnectionConfig::udp();
    udp.port = knot.port();
    let server = NameServerConfig::new(knot.addr().ip(), true, vec![udp]);
    let mut options = ResolverOpts::default();
    options.cache_size = 0;
    let authenticator =
        MessageAuthenticator::new(ResolverConfig::from_name_servers(vec![server]), options)
            .expect("resolver");
    let parsed = AuthenticatedMessage::parse(signed.as_bytes()).expect("parsing signed message");
    let outputs = authenticator
        .verify_dkim(mail_auth::Parameters::new(&parsed))
        .await;
    assert_eq!(outputs.len(), 1, "one signature");
    outputs[0].result().clone()
}

#[tokio::test]
async fn stored_private_key_signs_mail_that_verifies_against_the_status_key() {
    let f = fixture("keys").await;
    f.create("acme", serde_json::json!({"domain": ZONE})).await;
    let md = wait_for(&f.domains, "acme", "KeysReady", |md| {
        is(md, ConditionType::KeysReady, ConditionStatus::True)
    })
    .await;
    let pending = selectors_in(&md, KeyState::Pending);
    assert_eq!(pending.len(), 1, "one pending RSA key: {:?}", keys(&md));
    let selector = &pending[0];
    let key = keys(&md)
        .into_iter()
        .find(|k| &k.selector == selector)
        .unwrap();
    assert_eq!((key.algorithm, key.size), (KeyAlgorithm::Rsa, Some(2048)));

    // The record value in status is the key, whole and split.
    let status = md.status.clone().unwrap();
    let record = status
        .records
        .iter()
        .find(|r| r.name.starts_with(selector.as_str()))
        .expect("DKIM record");
    assert_eq!(
        record.value,
        dkim_txt_value(KeyAlgorithm::Rsa, &key.public_key)
    );
    assert_eq!(record.strings.concat(), record.value);
    assert!(record.strings.iter().all(|s| s.len() <= 255));
    assert!(
        record.value.len() > 255,
        "an RSA-2048 record needs splitting"
    );

    let secret = f
        .secrets
        .get(&status.keys_secret.clone().unwrap())
        .await
        .expect("key Secret");
    assert_eq!(
        secret.metadata.owner_references.as_ref().unwrap()[0].uid,
        md.metadata.uid.clone().unwrap(),
        "the Secret is owned by the MailDomain"
    );
    let pem = stored_pem(&secret, selector).expect("private key stored under <selector>.pem");

    f.publish_dkim(&md, selector);
    assert_eq!(
        sign_and_verify(&f.knot, KeyAlgorithm::Rsa, &pem, selector).await,
        DkimResult::Pass
    );

    // A secret must never show up in status.
    let status_text = serde_json::to_string(&status).unwrap();
    assert!(!status_text.contains("PRIVATE KEY"));
    f.finish().await;
}

#[tokio::test]
async fn dual_domain_gets_an_rsa_and_an_ed25519_key_that_both_verify() {
    let f = fixture("dual").await;
    f.create(
        "globex",
        serde_json::json!({"domain": ZONE, "dkim": {"algorithm": "Dual"}}),
    )
    .await;
    let md = wait_for(&f.domains, "globex", "KeysReady", |md| {
        is(md, ConditionType::KeysReady, ConditionStatus::True)
    })
    .await;
    let pending = keys(&md);
    assert_eq!(pending.len(), 2, "{pending:?}");
    assert_eq!(
        pending[0].generation, pending[1].generation,
        "a Dual pair is one generation"
    );
    let secret = f.secrets.get("globex-dkim").await.unwrap();
    for key in &pending {
        f.publish_dkim(&md, &key.selector);
        let pem = stored_pem(&secret, &key.selector).unwrap();
        assert_eq!(
            sign_and_verify(&f.knot, key.algorithm, &pem, &key.selector).await,
            DkimResult::Pass,
            "{key:?}"
        );
    }
    // Both records verified: the pair activates together.
    f.operator.advance(DUE);
    let md = wait_for(&f.domains, "globex", "both keys Active", |md| {
        selectors_in(md, KeyState::Active).len() == 2
    })
    .await;
    assert!(is(&md, ConditionType::Ready, ConditionStatus::True));
    f.finish().await;
}

#[tokio::test]
async fn rotation_walks_pending_active_retiring_retired_and_activates_only_when_verified() {
    let f = fixture("rotate").await;
    f.create(
        "acme",
        serde_json::json!({"domain": ZONE, "dkim": {"algorithm": "Ed25519", "rotation": {"period": "30d", "overlap": "2d"}}}),
    )
    .await;
    let md = wait_for(&f.domains, "acme", "a pending key", |md| {
        selectors_in(md, KeyState::Pending).len() == 1
    })
    .await;
    let first = selectors_in(&md, KeyState::Pending)[0].clone();

    // Not published: time passes, the key stays Pending, and the condition
    // says exactly what to publish.
    f.operator.advance(DUE);
    let md = wait_for(&f.domains, "acme", "record reported missing", |md| {
        md.status.as_ref().is_some_and(|s| {
            s.records
                .iter()
                .any(|r| r.name.starts_with(&first) && r.state == RecordState::Missing)
        })
    })
    .await;
    assert_eq!(key_state(&md, &first), Some(KeyState::Pending));
    let dkim = mailauth_operator::api::Condition::find(
        &md.status.as_ref().unwrap().conditions,
        ConditionType::DkimVerified,
    )
    .unwrap();
    assert!(
        dkim.message
            .contains(&format!("publish TXT {first}._domainkey.{ZONE}")),
        "{}",
        dkim.message
    );

    // Published: the next check activates it.
    f.publish_dkim(&md, &first);
    f.operator.advance(DUE);
    let md = wait_for(&f.domains, "acme", "first key Active and Ready", |md| {
        key_state(md, &first) == Some(KeyState::Active)
            && is(md, ConditionType::Ready, ConditionStatus::True)
    })
    .await;
    assert!(
        md.status
            .as_ref()
            .unwrap()
            .dkim
            .as_ref()
            .unwrap()
            .next_rotation
            .is_some()
    );

    // Rotation requested by annotation: a second key, Pending, while the
    // first keeps signing.
    let patch = serde_json::json!({"metadata": {"annotations": {"mailauth.dev/rotate-requested": "2026-11-26"}}});
    f.domains
        .patch("acme", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    let md = wait_for(&f.domains, "acme", "a second pending key", |md| {
        selectors_in(md, KeyState::Pending).len() == 1
    })
    .await;
    let second = selectors_in(&md, KeyState::Pending)[0].clone();
    assert_ne!(second, first, "selectors are never reused");
    assert_eq!(key_state(&md, &first), Some(KeyState::Active));

    // Unpublished, the new key never activates, however long we wait.
    f.operator.advance(SignedDuration::from_hours(2));
    let md = wait_for(&f.domains, "acme", "second record checked", |md| {
        md.status.as_ref().is_some_and(|s| {
            s.records
                .iter()
                .any(|r| r.name.starts_with(&second) && r.state == RecordState::Missing)
        })
    })
    .await;
    assert_eq!(key_state(&md, &second), Some(KeyState::Pending));
    assert_eq!(key_state(&md, &first), Some(KeyState::Active));

    // Published: second Active, first Retiring (still published, not signing).
    f.publish_dkim(&md, &second);
    f.operator.advance(SignedDuration::from_hours(2));
    let md = wait_for(&f.domains, "acme", "second Active, first Retiring", |md| {
        key_state(md, &second) == Some(KeyState::Active)
            && key_state(md, &first) == Some(KeyState::Retiring)
    })
    .await;
    let secret = f.secrets.get("acme-dkim").await.unwrap();
    assert!(
        stored_pem(&secret, &first).is_some(),
        "a Retiring key is kept during the overlap"
    );
    assert!(
        md.status
            .as_ref()
            .unwrap()
            .dkim
            .as_ref()
            .unwrap()
            .active_selector
            .as_deref()
            == Some(second.as_str())
    );

    // After the overlap: Retired, private key deleted, record removable.
    f.operator.advance(SignedDuration::from_hours(49));
    let md = wait_for(&f.domains, "acme", "first Retired", |md| {
        key_state(md, &first) == Some(KeyState::Retired)
    })
    .await;
    let record = md
        .status
        .as_ref()
        .unwrap()
        .records
        .iter()
        .find(|r| r.name.starts_with(&first))
        .cloned()
        .unwrap();
    assert_eq!(record.state, RecordState::Removable);
    let secret = wait_secret(&f.secrets, "acme-dkim", |s| stored_pem(s, &first).is_none()).await;
    assert!(stored_pem(&secret, &second).is_some());

    // Events are published after the writes they describe.
    let events = wait_events(&f.ns.name, "acme", "KeyRetired").await;
    for reason in ["KeyGenerated", "KeyActivated", "KeyRetiring", "KeyRetired"] {
        assert!(
            events.iter().any(|e| e.0 == reason),
            "no {reason} event in {events:?}"
        );
    }
    f.finish().await;
}

#[tokio::test]
async fn a_record_that_disappears_flips_the_condition_with_an_event_and_dns_errors_demote_nothing()
{
    let f = fixture("drift").await;
    f.create(
        "acme",
        serde_json::json!({"domain": ZONE, "dkim": {"algorithm": "Ed25519"}}),
    )
    .await;
    let md = wait_for(&f.domains, "acme", "a pending key", |md| {
        selectors_in(md, KeyState::Pending).len() == 1
    })
    .await;
    let selector = selectors_in(&md, KeyState::Pending)[0].clone();
    f.publish_dkim(&md, &selector);
    f.operator.advance(DUE);
    let ready = wait_for(&f.domains, "acme", "Ready", |md| {
        is(md, ConditionType::Ready, ConditionStatus::True)
    })
    .await;

    // Quiet: reconciles that find nothing new write nothing. The object's
    // resourceVersion is the judge: the operator's counters are bumped after
    // the API answers, so they can lag the watch that reported Ready. Three
    // rounds, so reconciles already in flight at Ready cannot stand in for
    // the ones the clock starts.
    for _ in 1..=3 {
        let reconciles = f.operator.reconciles();
        f.operator.advance(SignedDuration::from_secs(1));
        eventually(format!("a reconcile after the {reconciles}th"))
            .until_async(|| async { accept_if(f.operator.reconciles(), |now| *now > reconciles) })
            .await;
    }
    let after = f.domains.get("acme").await.expect("reading the MailDomain");
    assert_eq!(
        after.metadata.resource_version, ready.metadata.resource_version,
        "a reconcile that changes nothing must not write: {:?}",
        after.status
    );

    // The DNS server goes away: an error, never Missing, and the record
    // that was verified stays Verified (with the error noted), so the key
    // stays Active and verified.
    let mut knot = f.knot;
    knot.pause();
    let operator = f.operator;
    operator.advance(SignedDuration::from_hours(2));
    let md = wait_for(
        &f.domains,
        "acme",
        "the failed check noted on the verified record",
        |md| {
            md.status.as_ref().is_some_and(|s| {
                s.records.iter().any(|r| {
                    r.name.starts_with(&selector)
                        && r.state == RecordState::Verified
                        && r.error.is_some()
                })
            })
        },
    )
    .await;
    assert_eq!(key_state(&md, &selector), Some(KeyState::Active));
    assert!(is(&md, ConditionType::DkimVerified, ConditionStatus::True));
    knot.resume();

    // The record is removed: DKIMVerified goes False, with an Event.
    knot.remove(ZONE, &format!("{selector}._domainkey.{ZONE}."), "TXT");
    operator.advance(SignedDuration::from_hours(2));
    let md = wait_for(&f.domains, "acme", "DKIMVerified False", |md| {
        is(md, ConditionType::DkimVerified, ConditionStatus::False)
    })
    .await;
    assert_eq!(
        key_state(&md, &selector),
        Some(KeyState::Active),
        "a missing record never demotes the key"
    );
    let events = wait_events(&f.ns.name, "acme", "RecordDisappeared").await;
    assert!(events.iter().any(|e| e.1.contains(&selector)), "{events:?}");
    operator.stop().await;
    knot.stop();
    f.ns.delete().await;
}

#[tokio::test]
async fn missing_active_key_is_reported_and_never_silently_replaced() {
    let f = fixture("lost").await;
    f.create(
        "acme",
        serde_json::json!({"domain": ZONE, "dkim": {"algorithm": "Ed25519"}}),
    )
    .await;
    let md = wait_for(&f.domains, "acme", "a pending key", |md| {
        selectors_in(md, KeyState::Pending).len() == 1
    })
    .await;
    let selector = selectors_in(&md, KeyState::Pending)[0].clone();
    f.publish_dkim(&md, &selector);
    f.operator.advance(DUE);
    wait_for(&f.domains, "acme", "Active", |md| {
        key_state(md, &selector) == Some(KeyState::Active)
    })
    .await;

    f.secrets
        .delete("acme-dkim", &DeleteParams::default())
        .await
        .unwrap();
    let md = wait_for(&f.domains, "acme", "ActiveKeyMissing", |md| {
        md.status
            .as_ref()
            .and_then(|s| {
                mailauth_operator::api::Condition::find(&s.conditions, ConditionType::KeysReady)
            })
            .is_some_and(|c| c.status == ConditionStatus::False && c.reason == "ActiveKeyMissing")
    })
    .await;
    assert_eq!(
        keys(&md).len(),
        1,
        "no replacement key was generated: {:?}",
        keys(&md)
    );
    assert_eq!(key_state(&md, &selector), Some(KeyState::Active));
    assert!(is(&md, ConditionType::Ready, ConditionStatus::False));
    wait_events(&f.ns.name, "acme", "ActiveKeyMissing").await;
    f.finish().await;
}

#[tokio::test]
async fn a_deleted_secret_is_recreated_for_a_pending_key() {
    let f = fixture("regen").await;
    f.create(
        "acme",
        serde_json::json!({"domain": ZONE, "dkim": {"algorithm": "Ed25519"}}),
    )
    .await;
    let md = wait_for(&f.domains, "acme", "a pending key", |md| {
        selectors_in(md, KeyState::Pending).len() == 1
    })
    .await;
    let old = selectors_in(&md, KeyState::Pending)[0].clone();
    f.secrets
        .delete("acme-dkim", &DeleteParams::default())
        .await
        .unwrap();
    let md = wait_for(&f.domains, "acme", "a new pending key", |md| {
        selectors_in(md, KeyState::Pending)
            .first()
            .is_some_and(|s| s != &old)
    })
    .await;
    let new = selectors_in(&md, KeyState::Pending)[0].clone();
    let secret = wait_secret(&f.secrets, "acme-dkim", |s| stored_pem(s, &new).is_some()).await;
    assert!(stored_pem(&secret, &old).is_none());
    f.finish().await;
}

#[tokio::test]
async fn a_secret_we_do_not_own_is_never_overwritten() {
    let f = fixture("foreign").await;
    let foreign = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("acme-dkim".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "note".to_string(),
            ByteString(b"someone else's".to_vec()),
        )])),
        ..Default::default()
    };
    f.secrets
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();
    f.create("acme", serde_json::json!({"domain": ZONE})).await;
    let md = wait_for(&f.domains, "acme", "SecretNotOwned", |md| {
        md.status
            .as_ref()
            .and_then(|s| {
                mailauth_operator::api::Condition::find(&s.conditions, ConditionType::KeysReady)
            })
            .is_some_and(|c| c.reason == "SecretNotOwned")
    })
    .await;
    assert!(keys(&md).is_empty());
    let secret = f.secrets.get("acme-dkim").await.unwrap();
    assert_eq!(secret.data, foreign.data, "the foreign Secret is untouched");
    f.finish().await;
}

#[tokio::test]
async fn deletion_honours_the_deletion_policy() {
    let f = fixture("delete").await;
    f.create(
        "gone",
        serde_json::json!({"domain": ZONE, "dkim": {"algorithm": "Ed25519"}}),
    )
    .await;
    f.create("kept", serde_json::json!({"domain": "kept.test", "dkim": {"algorithm": "Ed25519"}, "deletionPolicy": "Retain"}))
        .await;
    for name in ["gone", "kept"] {
        wait_for(&f.domains, name, "KeysReady", |md| {
            is(md, ConditionType::KeysReady, ConditionStatus::True)
        })
        .await;
    }
    let mut uids = Vec::new();
    for name in ["gone", "kept"] {
        uids.push(f.domains.get(name).await.unwrap().metadata.uid.unwrap());
        f.domains
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for (name, uid) in ["gone", "kept"].into_iter().zip(&uids) {
        wait_deleted(&f.domains, name, uid).await;
    }
    assert!(
        f.secrets.get_opt("gone-dkim").await.unwrap().is_none(),
        "Delete removes the key Secret"
    );
    let kept = f
        .secrets
        .get_opt("kept-dkim")
        .await
        .unwrap()
        .expect("Retain keeps the key Secret");
    assert!(
        kept.metadata
            .owner_references
            .unwrap_or_default()
            .is_empty(),
        "a retained Secret has no owner"
    );
    assert!(kept.data.is_some_and(|d| !d.is_empty()));
    f.finish().await;
}

#[tokio::test]
async fn a_public_suffix_is_reported_and_gets_no_key() {
    let f = fixture("suffix").await;
    f.create("suffix", serde_json::json!({"domain": "co.uk"}))
        .await;
    let md = wait_for(&f.domains, "suffix", "Ready=False NotOwnDomain", |md| {
        md.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == ConditionType::Ready && c.reason == "NotOwnDomain")
        })
    })
    .await;
    let status = md.status.unwrap();
    assert!(
        status.dkim.is_none() && status.records.is_empty(),
        "{status:?}"
    );
    assert!(
        f.secrets.get_opt("suffix-dkim").await.unwrap().is_none(),
        "no key is made for a public suffix"
    );
    f.finish().await;
}

#[tokio::test]
async fn the_first_verified_maildomain_owns_a_domain() {
    let f = fixture("claim").await;
    f.create("first", serde_json::json!({"domain": ZONE, "dkim": {"algorithm": "Ed25519", "selectorPrefix": "one"}})).await;
    f.create("second", serde_json::json!({"domain": ZONE, "dkim": {"algorithm": "Ed25519", "selectorPrefix": "two"}})).await;
    let first = wait_for(&f.domains, "first", "a pending key", |md| {
        selectors_in(md, KeyState::Pending).len() == 1
    })
    .await;
    f.publish_dkim(&first, &selectors_in(&first, KeyState::Pending)[0]);
    f.operator.advance(DUE);
    wait_for(&f.domains, "first", "Ready", |md| {
        is(md, ConditionType::Ready, ConditionStatus::True)
    })
    .await;

    let second = wait_for(&f.domains, "second", "a pending key", |md| {
        selectors_in(md, KeyState::Pending).len() == 1
    })
    .await;
    f.publish_dkim(&second, &selectors_in(&second, KeyState::Pending)[0]);
    f.operator.advance(DUE);
    let second = wait_for(&f.domains, "second", "DomainConflict", |md| {
        is(md, ConditionType::DomainConflict, ConditionStatus::True)
    })
    .await;
    assert!(is(&second, ConditionType::Ready, ConditionStatus::False));
    let first = f.domains.get("first").await.unwrap();
    assert!(is(
        &first,
        ConditionType::DomainConflict,
        ConditionStatus::False
    ));
    assert!(is(&first, ConditionType::Ready, ConditionStatus::True));
    f.finish().await;
}

async fn wait_secret(api: &Api<Secret>, name: &str, check: impl Fn(&Secret) -> bool) -> Secret {
    wait_for(api, name, "the expected entries", check).await
}

/// (reason, note) of the Events about a MailDomain.
async fn events_for(namespace: &str, name: &str) -> Vec<(String, String)> {
    let events: Api<Event> = Api::namespaced(cluster().client().await, namespace);
    events
        .list(&ListParams::default().fields(&format!("involvedObject.name={name}")))
        .await
        .expect("listing events")
        .items
        .into_iter()
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

async fn wait_events(namespace: &str, name: &str, reason: &str) -> Vec<(String, String)> {
    eventually(format!("a {reason} event about {name}"))
        .within(std::time::Duration::from_secs(30))
        .every(std::time::Duration::from_millis(100))
        .until_async(|| async {
            accept_if(events_for(namespace, name).await, |events| {
                events.iter().any(|e| e.0 == reason)
            })
        })
        .await
}

#[tokio::test]
async fn onboarding_many_domains_at_once_generates_exactly_one_key_each() {
    let f = fixture("onboard").await;
    let names: Vec<String> = (0..60).map(|i| format!("d{i:02}")).collect();
    futures::future::join_all(names.iter().map(|name| {
        f.create(name, serde_json::json!({"domain": format!("{name}.{ZONE}"), "dkim": {"algorithm": "Ed25519"}}))
    }))
    .await;
    for name in &names {
        let md = wait_for(&f.domains, name, "KeysReady", |md| {
            is(md, ConditionType::KeysReady, ConditionStatus::True)
        })
        .await;
        let listed: Vec<String> = keys(&md).into_iter().map(|k| k.selector).collect();
        assert_eq!(listed.len(), 1, "{name}: one key in status: {listed:?}");
        let secret = f
            .secrets
            .get(&format!("{name}-dkim"))
            .await
            .expect("key Secret");
        let stored: Vec<String> = secret
            .data
            .unwrap_or_default()
            .keys()
            .map(|k| k.trim_end_matches(".pem").to_string())
            .collect();
        assert_eq!(
            stored, listed,
            "{name}: the Secret holds exactly the keys status lists"
        );
    }
    assert_eq!(
        f.operator.ctx.metrics.keys_generated.get(),
        names.len() as u64,
        "one key generated per domain, none thrown away"
    );
    f.finish().await;
}

/// The domain's one key, Active and Ready, with its record published.
async fn active_and_published(f: &Fixture, name: &str) -> String {
    let md = wait_for(&f.domains, name, "a pending key", |md| {
        selectors_in(md, KeyState::Pending).len() == 1
    })
    .await;
    let first = selectors_in(&md, KeyState::Pending)[0].clone();
    f.publish_dkim(&md, &first);
    f.operator.advance(DUE);
    wait_for(&f.domains, name, "the key Active and Ready", |md| {
        key_state(md, &first) == Some(KeyState::Active)
            && is(md, ConditionType::Ready, ConditionStatus::True)
    })
    .await;
    first
}

/// After a MailDomain comes back without status: the same one key, Active
/// and Ready again, no new key and no record asked for that is not
/// published, and the stored key still signs mail that verifies.
async fn adopted(f: &Fixture, name: &str, selector: &str, uid_before: &str) {
    let md = wait_for(&f.domains, name, "Ready again", |md| {
        md.metadata.uid.as_deref() != Some(uid_before)
            && is(md, ConditionType::Ready, ConditionStatus::True)
    })
    .await;
    let kept: Vec<(String, KeyState)> = keys(&md)
        .into_iter()
        .map(|k| (k.selector, k.state))
        .collect();
    assert_eq!(
        kept,
        [(selector.to_string(), KeyState::Active)],
        "the same key, still Active, and no new one"
    );
    let status = md.status.as_ref().unwrap();
    assert!(
        status
            .records
            .iter()
            .filter(|r| r.name.contains("._domainkey."))
            .all(|r| r.state == RecordState::Verified),
        "no new DKIM record to publish: {:?}",
        status.records
    );
    let secret = f.secrets.get(&format!("{name}-dkim")).await.unwrap();
    assert!(
        secret
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| Some(&o.uid) == md.metadata.uid.as_ref()),
        "the Secret is taken over by the MailDomain that adopted it"
    );
    let pem = stored_pem(&secret, selector).expect("the key is still stored");
    assert_eq!(
        sign_and_verify(&f.knot, KeyAlgorithm::Ed25519, &pem, selector).await,
        DkimResult::Pass
    );
}

#[tokio::test]
async fn keys_survive_a_recreated_and_a_restored_maildomain() {
    let f = fixture("survive").await;
    let spec = serde_json::json!({
        "domain": ZONE,
        "dkim": {"algorithm": "Ed25519"},
        "deletionPolicy": "Retain",
    });
    f.create("acme", spec.clone()).await;
    let first = active_and_published(&f, "acme").await;

    // Deleted with Retain and re-created from Git: status starts empty.
    let uid = f.domains.get("acme").await.unwrap().metadata.uid.unwrap();
    f.domains
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    wait_deleted(&f.domains, "acme", &uid).await;
    f.create("acme", spec.clone()).await;
    adopted(&f, "acme", &first, &uid).await;

    // Restored as a backup tool restores: the Secret as it was saved
    // (owner and all), then the MailDomain, without status.
    let mut saved = f.secrets.get("acme-dkim").await.unwrap();
    let uid = f.domains.get("acme").await.unwrap().metadata.uid.unwrap();
    f.domains
        .delete("acme", &DeleteParams::default())
        .await
        .unwrap();
    wait_deleted(&f.domains, "acme", &uid).await;
    f.secrets
        .delete("acme-dkim", &DeleteParams::default())
        .await
        .unwrap();
    saved.metadata.resource_version = None;
    saved.metadata.uid = None;
    saved.metadata.creation_timestamp = None;
    saved.metadata.managed_fields = None;
    f.secrets
        .create(&PostParams::default(), &saved)
        .await
        .expect("restoring the key Secret");
    f.create("acme", spec).await;
    adopted(&f, "acme", &first, &uid).await;
    f.finish().await;
}
