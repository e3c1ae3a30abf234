//! The attack suite of docs/security.md: each case is played as a tenant
//! with edit rights in its own namespace (its MailDomain, every Secret
//! there), against the real API server, a real knot, the relay run as a
//! process reading its config through the API as its own ServiceAccount,
//! smtp-sink and dkimpy. Each case checks three things:
//!
//! 1. what the relay config holds (the shard Secrets the relay reads);
//! 2. what the relay answers when the attacker sends as the victim
//!    (refused, and nothing reaches the sink);
//! 3. that the victim's mail still signs and verifies.
//!
//! Platform namespace `mail-*` runs the relay; `victim-*` and `attacker-*`
//! are two tenants.

mod support;

use std::time::Duration;

use jiff::SignedDuration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use mailauth_operator::api::{
    Condition, ConditionStatus, ConditionType, KeyAlgorithm, KeyState, MailDomain, MailRelay,
};
use mailauth_operator::dkim::{NewKey, dkim_txt_value, generate};
use mailauth_operator::relay::config::{DomainShard, shard_of, shard_secret_name};
use support::cluster::{TestNamespace, cluster};
use support::dns::{Knot, Zone, txt_data};
use support::mail::{Relay, SmtpSink, Swaks, dkimpy_verify, self_signed_certificate};
use support::operator::{Operator, is, wait_for};

const VICTIM: &str = "victim.test";
const ATTACKER: &str = "attacker.test";
const DUE: SignedDuration = SignedDuration::from_secs(11 * 60);

/// A platform with one relay and two Ready tenants.
struct Platform {
    mail: TestNamespace,
    victim_ns: TestNamespace,
    attacker_ns: TestNamespace,
    knot: Knot,
    operator: Operator,
    sink: SmtpSink,
    relay: Relay,
    victim_domains: Api<MailDomain>,
    attacker_domains: Api<MailDomain>,
    attacker_secrets: Api<Secret>,
    relay_secrets: Api<Secret>,
    victim_login: (String, String),
    attacker_login: (String, String),
    _tls: tempfile::TempDir,
}

fn maildomain(name: &str, domain: &str, relay_ns: &str) -> MailDomain {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": name},
        "spec": {"domain": domain, "relayRef": {"name": "shared", "namespace": relay_ns},
                 "dkim": {"algorithm": "Ed25519"}}
    }))
    .expect("MailDomain manifest")
}

fn field(secret: &Secret, key: &str) -> String {
    String::from_utf8(secret.data.as_ref().expect("data")[key].0.clone()).expect("utf-8")
}

fn login(secret: &Secret) -> (String, String) {
    (field(secret, "username"), field(secret, "password"))
}

fn condition(md: &MailDomain, type_: ConditionType) -> Option<Condition> {
    Condition::find(&md.status.as_ref()?.conditions, type_).cloned()
}

fn has_reason(md: &MailDomain, type_: ConditionType, reason: &str) -> bool {
    condition(md, type_).is_some_and(|c| c.reason == reason)
}

fn selectors(md: &MailDomain, state: KeyState) -> Vec<String> {
    md.status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .map(|d| {
            d.keys
                .iter()
                .filter(|k| k.state == state)
                .map(|k| k.selector.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// Publishes every Pending key of `md` in its zone, as its tenant would.
fn publish_pending(knot: &Knot, md: &MailDomain) {
    for key in md
        .status
        .as_ref()
        .and_then(|s| s.dkim.as_ref())
        .map(|d| d.keys.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|k| k.state == KeyState::Pending)
    {
        let zone = md.spec.domain.as_str();
        knot.add(
            zone,
            &format!(
                "{}._domainkey.{zone}. 60 TXT {}",
                key.selector,
                txt_data(&dkim_txt_value(key.algorithm, &key.public_key))
            ),
        );
    }
}

fn message(from_domain: &str, subject: &str) -> String {
    format!(
        "From: Someone <ceo@{from_domain}>\r\nTo: Bob <bob@example.net>\r\nSubject: {subject}\r\n\
         Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@{from_domain}>\r\n\r\nHello.\r\n"
    )
}

/// Waits (up to 60 s) until `check` holds, through the one polling
/// helper: never blocks the in-process operator.
async fn eventually(what: &str, check: impl AsyncFn() -> bool) {
    let check = &check;
    support::wait::eventually(what)
        .within(Duration::from_secs(60))
        .until_async(|| async move {
            if check().await {
                Ok(())
            } else {
                Err("not yet")
            }
        })
        .await;
}

impl Platform {
    async fn start(prefix: &str) -> Self {
        let c = cluster();
        c.install_crds().await;
        let mail = c.namespace(&format!("{prefix}-mail")).await;
        let victim_ns = c.namespace(&format!("{prefix}-victim")).await;
        let attacker_ns = c.namespace(&format!("{prefix}-attacker")).await;
        let client = c.client().await;
        let knot = Knot::start(&[Zone::new(VICTIM), Zone::new(ATTACKER)]);
        let operator = Operator::start_for(
            &[&mail.name, &victim_ns.name, &attacker_ns.name],
            knot.addr(),
        )
        .await;
        let sink = SmtpSink::start();
        let relay: MailRelay = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "shared"},
            "spec": {"hostname": "relay.platform.test",
                     "upstream": {"host": "127.0.0.1", "port": sink.port, "tls": "None"},
                     "spf": {"egressIPs": ["127.0.0.1"]},
                     "allowedNamespaces": {"from": "All"}}
        }))
        .expect("MailRelay manifest");
        Api::<MailRelay>::namespaced(client.clone(), &mail.name)
            .create(&PostParams::default(), &relay)
            .await
            .expect("creating the MailRelay");
        let victim_domains = Api::namespaced(client.clone(), &victim_ns.name);
        let attacker_domains = Api::namespaced(client.clone(), &attacker_ns.name);
        for (api, name, domain) in [
            (&victim_domains, "victim", VICTIM),
            (&attacker_domains, "attacker", ATTACKER),
        ] {
            api.create(
                &PostParams::default(),
                &maildomain(name, domain, &mail.name),
            )
            .await
            .expect("creating a MailDomain");
        }
        for (api, name) in [(&victim_domains, "victim"), (&attacker_domains, "attacker")] {
            let md = wait_for(api, name, "a pending key", |md| {
                !selectors(md, KeyState::Pending).is_empty()
            })
            .await;
            publish_pending(&knot, &md);
        }
        operator.advance(DUE);
        for (api, name) in [(&victim_domains, "victim"), (&attacker_domains, "attacker")] {
            wait_for(api, name, "Ready", |md| {
                is(md, ConditionType::Ready, ConditionStatus::True)
            })
            .await;
        }
        let relay_secrets: Api<Secret> = Api::namespaced(client.clone(), &mail.name);
        let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), &mail.name);
        eventually("the relay's RoleBinding", async || {
            bindings
                .get_opt("shared-relay")
                .await
                .ok()
                .flatten()
                .is_some()
        })
        .await;
        let tls = tempfile::tempdir().expect("temp dir");
        let kubeconfig = c.service_account_kubeconfig(&mail.name, "shared-relay", tls.path());
        let (cert, key) = self_signed_certificate(tls.path(), "relay.platform.test");
        let relay =
            Relay::start_from_cluster("shared", &mail.name, &kubeconfig, Some((&cert, &key)));
        eventually("the relay serving both domains", async || {
            relay.metrics().find("mailauth_relay_config_domains", &[]) == Some(2.0)
        })
        .await;
        let victim_secrets: Api<Secret> = Api::namespaced(client.clone(), &victim_ns.name);
        let attacker_secrets: Api<Secret> = Api::namespaced(client.clone(), &attacker_ns.name);
        let victim_login = login(
            &victim_secrets
                .get("victim-smtp")
                .await
                .expect("victim Secret"),
        );
        let attacker_login = login(
            &attacker_secrets
                .get("attacker-smtp")
                .await
                .expect("attacker Secret"),
        );
        Self {
            mail,
            victim_ns,
            attacker_ns,
            knot,
            operator,
            sink,
            relay,
            victim_domains,
            attacker_domains,
            attacker_secrets,
            relay_secrets,
            victim_login,
            attacker_login,
            _tls: tls,
        }
    }

    /// What the relay config serves for `domain`: its entry in its shard.
    async fn served(&self, domain: &str) -> Option<DomainShard> {
        let secret = self
            .relay_secrets
            .get_opt(&shard_secret_name("shared", shard_of(domain)))
            .await
            .expect("reading the shard")?;
        let shard: DomainShard = secret
            .data
            .iter()
            .flatten()
            .map(|(_, bytes)| serde_json::from_slice(&bytes.0).expect("a shard parses"))
            .next()?;
        shard
            .domains
            .iter()
            .any(|d| d.domain == domain)
            .then_some(shard)
    }

    fn submit(
        &self,
        login: &(String, String),
        from_domain: &str,
        subject: &str,
    ) -> support::mail::Submission {
        Swaks {
            port: self.relay.port,
            mail_from: format!("ceo@{from_domain}"),
            rcpt_to: vec!["bob@example.net".into()],
            auth: Some(login.clone()),
            auth_mechanism: Some("PLAIN".into()),
            starttls: true,
            data: message(from_domain, subject),
        }
        .run()
    }

    /// The attacker, with `login`, sends as the victim: refused, and
    /// nothing reaches the sink.
    fn attacker_cannot_send_as_victim(&self, login: &(String, String), case: &str) {
        let before = self.sink.count();
        let sent = self.submit(login, VICTIM, &format!("{case}-spoof"));
        assert!(
            !sent.success,
            "{case}: the attacker sent as the victim:\n{}",
            sent.transcript
        );
        let code = sent.failure_code().unwrap_or(0);
        assert!(
            (500..600).contains(&code),
            "{case}: refused with a 5xx, got {code}:\n{}",
            sent.transcript
        );
        assert_eq!(
            self.sink.count(),
            before,
            "{case}: nothing reached the sink"
        );
        assert!(
            !self
                .sink
                .messages()
                .iter()
                .any(|m| String::from_utf8_lossy(m).contains(&format!("{case}-spoof"))),
            "{case}: the spoofed message is not in the sink"
        );
    }

    /// The victim's mail still goes through, signed for its domain, and
    /// dkimpy verifies it. Returns the selector it was signed with.
    fn victim_mail_verifies(&self, case: &str) -> String {
        let subject = format!("{case}-victim");
        let sent = self.submit(&self.victim_login, VICTIM, &subject);
        assert!(
            sent.success,
            "{case}: the victim's mail was refused:\n{}\n{}",
            sent.transcript,
            self.relay.log()
        );
        let stored = self
            .sink
            .wait_for(self.sink.count().max(1), Duration::from_secs(30));
        let message = stored
            .iter()
            .find(|m| String::from_utf8_lossy(m).contains(&subject))
            .unwrap_or_else(|| panic!("{case}: the victim's message is in the sink"));
        let verdicts = dkimpy_verify(message, self.knot.port());
        assert_eq!(verdicts.len(), 1, "{case}: one signature: {verdicts:?}");
        assert!(verdicts[0].pass, "{case}: dkimpy verifies: {verdicts:?}");
        assert_eq!(verdicts[0].domain, VICTIM);
        verdicts[0].selector.clone()
    }

    /// Waits until the running relay no longer serves `domain`.
    async fn relay_drops(&self, domain: &str) {
        eventually(&format!("{domain} to leave the relay config"), async || {
            self.served(domain).await.is_none()
        })
        .await;
        eventually("the running relay to serve one domain", async || {
            self.relay
                .metrics()
                .find("mailauth_relay_config_domains", &[])
                == Some(1.0)
        })
        .await;
    }

    async fn stop(self) {
        self.operator.stop().await;
        self.mail.delete().await;
        self.victim_ns.delete().await;
        self.attacker_ns.delete().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changing_spec_domain_to_the_victims_is_refused_by_the_api_server() {
    let p = Platform::start("domain").await;
    let error = p
        .attacker_domains
        .patch(
            "attacker",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"domain": VICTIM}})),
        )
        .await
        .expect_err("spec.domain is immutable");
    let message = error.to_string();
    assert!(
        message.contains("spec.domain") && message.contains("immutable"),
        "{message}"
    );
    // The config still holds exactly one entry for the victim's domain, the
    // victim's, and the attacker's own domain.
    let victim = p.served(VICTIM).await.expect("the victim is served");
    assert_eq!(
        victim
            .tenants
            .iter()
            .filter(|t| t.domains.iter().any(|d| d == VICTIM))
            .count(),
        1
    );
    assert!(
        victim
            .tenants
            .iter()
            .all(|t| t.username != p.attacker_login.0 || !t.domains.iter().any(|d| d == VICTIM))
    );
    p.attacker_cannot_send_as_victim(&p.attacker_login, "domain");
    p.victim_mail_verifies("domain");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_credentials_secret_lets_the_tenant_choose_nothing() {
    let p = Platform::start("creds").await;
    // The attacker replaces its credentials Secret with one of its own,
    // naming the victim's username and a password of its choosing.
    p.attacker_secrets
        .delete("attacker-smtp", &DeleteParams::default())
        .await
        .expect("deleting");
    let chosen = (
        p.victim_login.0.clone(),
        "chosen-by-the-attacker".to_string(),
    );
    let forged: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "attacker-smtp"},
        "stringData": {"username": chosen.0, "password": chosen.1, "host": "x", "port": "587"}
    }))
    .unwrap();
    p.attacker_secrets
        .create(&PostParams::default(), &forged)
        .await
        .expect("creating the forged Secret");
    // Its MailDomain says so, and is not Ready (never a stale Ready=True).
    let md = wait_for(
        &p.attacker_domains,
        "attacker",
        "CredentialsSecretNotOwned",
        |md| {
            has_reason(
                md,
                ConditionType::RelayAccepted,
                "CredentialsSecretNotOwned",
            )
        },
    )
    .await;
    assert!(is(&md, ConditionType::Ready, ConditionStatus::False));
    assert!(
        condition(&md, ConditionType::RelayAccepted)
            .unwrap()
            .message
            .contains("attacker-smtp")
    );
    p.relay_drops(ATTACKER).await;
    let forged_back = p.attacker_secrets.get("attacker-smtp").await.unwrap();
    assert_eq!(
        field(&forged_back, "password"),
        "chosen-by-the-attacker",
        "the operator never writes a Secret it does not own"
    );
    p.attacker_cannot_send_as_victim(&chosen, "creds");
    p.attacker_cannot_send_as_victim(&p.attacker_login, "creds-old");
    p.victim_mail_verifies("creds");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_password_is_not_adopted() {
    let p = Platform::start("password").await;
    p.attacker_secrets
        .patch(
            "attacker-smtp",
            &PatchParams::default(),
            &Patch::Merge(
                serde_json::json!({"stringData": {"password": "chosen-by-the-attacker"}}),
            ),
        )
        .await
        .expect("editing the password");
    let md = wait_for(
        &p.attacker_domains,
        "attacker",
        "CredentialsTampered",
        |md| has_reason(md, ConditionType::RelayAccepted, "CredentialsTampered"),
    )
    .await;
    assert!(is(&md, ConditionType::Ready, ConditionStatus::False));
    p.relay_drops(ATTACKER).await;
    let chosen = (
        p.attacker_login.0.clone(),
        "chosen-by-the-attacker".to_string(),
    );
    let sent = p.submit(&chosen, ATTACKER, "password-own");
    assert!(
        !sent.success,
        "a password the tenant chose never works:\n{}",
        sent.transcript
    );
    p.attacker_cannot_send_as_victim(&chosen, "password");
    p.victim_mail_verifies("password");
    // Deleting the Secret gets new, working credentials.
    p.attacker_secrets
        .delete("attacker-smtp", &DeleteParams::default())
        .await
        .unwrap();
    wait_for(&p.attacker_domains, "attacker", "Ready again", |md| {
        is(md, ConditionType::Ready, ConditionStatus::True)
    })
    .await;
    let fresh = login(&p.attacker_secrets.get("attacker-smtp").await.unwrap());
    assert_ne!(fresh.1, "chosen-by-the-attacker");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_in_one_tenants_key_leaves_only_that_tenant_off_and_others_keep_rotating() {
    let p = Platform::start("garbage").await;
    let attacker = p.attacker_domains.get("attacker").await.unwrap();
    let selector = selectors(&attacker, KeyState::Active)[0].clone();
    p.attacker_secrets
        .patch(
            "attacker-dkim",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {format!("{selector}.pem"): "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"}})),
        )
        .await
        .expect("writing garbage into the key");
    wait_for(&p.attacker_domains, "attacker", "ActiveKeyTampered", |md| {
        has_reason(md, ConditionType::KeysReady, "ActiveKeyTampered")
            && is(md, ConditionType::Ready, ConditionStatus::False)
    })
    .await;
    p.relay_drops(ATTACKER).await;
    assert!(
        p.served(VICTIM).await.is_some(),
        "the victim stays on the relay"
    );
    p.attacker_cannot_send_as_victim(&p.attacker_login, "garbage");
    let first = p.victim_mail_verifies("garbage");

    // The victim rotates: the new key reaches the running relay and signs.
    // Only the activation changes the victim's shard (a Pending key is not
    // served), so the first reload after the shard carries the new key is
    // that one.
    let reloads = || {
        p.relay.metrics().value(
            "mailauth_relay_config_reloads_total",
            &[("result", "success")],
        )
    };
    let before = reloads();
    p.victim_domains
        .patch(
            "victim",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": {"mailauth.dev/rotate-requested": "now"}}})),
        )
        .await
        .unwrap();
    let md = wait_for(&p.victim_domains, "victim", "a new pending key", |md| {
        !selectors(md, KeyState::Pending).is_empty()
    })
    .await;
    publish_pending(&p.knot, &md);
    p.operator.advance(DUE);
    let md = wait_for(&p.victim_domains, "victim", "the new key active", |md| {
        selectors(md, KeyState::Active).iter().all(|s| *s != first)
    })
    .await;
    let second = selectors(&md, KeyState::Active)[0].clone();
    eventually("the victim's shard to carry the new key", async || {
        p.served(VICTIM).await.is_some_and(|shard| {
            shard
                .domains
                .iter()
                .any(|d| d.signing_keys.iter().any(|k| k.selector == second))
        })
    })
    .await;
    eventually("the running relay to reload", async || reloads() > before).await;
    assert_eq!(
        p.victim_mail_verifies("garbage-rotated"),
        second,
        "the victim's next message is signed with its new key"
    );
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_valid_key_in_the_secret_is_not_the_verified_key_and_is_not_served() {
    let p = Platform::start("swap").await;
    let attacker = p.attacker_domains.get("attacker").await.unwrap();
    let selector = selectors(&attacker, KeyState::Active)[0].clone();
    let own = generate(&NewKey {
        selector: selector.clone(),
        algorithm: KeyAlgorithm::Ed25519,
        size: None,
        generation: 1,
    })
    .unwrap();
    p.attacker_secrets
        .patch(
            "attacker-dkim",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"stringData": {format!("{selector}.pem"): own.private_key_pem.expose_secret()}})),
        )
        .await
        .expect("swapping the key");
    wait_for(&p.attacker_domains, "attacker", "ActiveKeyTampered", |md| {
        has_reason(md, ConditionType::KeysReady, "ActiveKeyTampered")
    })
    .await;
    p.relay_drops(ATTACKER).await;
    p.attacker_cannot_send_as_victim(&p.attacker_login, "swap");
    p.victim_mail_verifies("swap");
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maildomain_for_the_victims_domain_never_reaches_the_relay() {
    let p = Platform::start("claim").await;
    p.attacker_domains
        .create(
            &PostParams::default(),
            &maildomain("steal", VICTIM, &p.mail.name),
        )
        .await
        .expect("creating a MailDomain for the victim's domain");
    let steal = wait_for(&p.attacker_domains, "steal", "a pending key", |md| {
        !selectors(md, KeyState::Pending).is_empty()
    })
    .await;
    // It can never verify: the victim's DNS does not carry its key.
    p.operator.advance(DUE);
    let steal = wait_for(&p.attacker_domains, "steal", "its verdict", |md| {
        md.status.as_ref().is_some_and(|s| {
            s.last_checked.is_some()
                && s.last_checked != steal.status.as_ref().unwrap().last_checked
        }) || is(md, ConditionType::DomainConflict, ConditionStatus::True)
    })
    .await;
    assert!(is(&steal, ConditionType::Ready, ConditionStatus::False));
    assert!(!is(
        &steal,
        ConditionType::DkimVerified,
        ConditionStatus::True
    ));
    let shard = p.served(VICTIM).await.expect("the victim is served");
    assert_eq!(
        shard.domains.iter().filter(|d| d.domain == VICTIM).count(),
        1,
        "one entry for the victim's domain"
    );
    let steal_user = format!("steal.{}", p.attacker_ns.name);
    assert!(
        shard.tenants.iter().all(|t| t.username != steal_user),
        "the thief's tenant is not on the relay"
    );
    p.attacker_cannot_send_as_victim(&p.attacker_login, "claim");
    if let Some(secret) = p.attacker_secrets.get_opt("steal-smtp").await.unwrap() {
        p.attacker_cannot_send_as_victim(&login(&secret), "claim-steal");
    }
    p.victim_mail_verifies("claim");
    p.stop().await;
}
