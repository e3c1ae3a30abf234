//! The MailRelay controller: renders each relay's Deployment, Service and
//! config Secret from the MailDomains it serves. A domain reaches a relay
//! only when its MailDomain is Ready (keys, verified active selector, relay
//! admission) and not in conflict; the relay reloads the mounted config when
//! it changes, so rotations never restart it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::relay_objects::{
    self, CONFIG_BUDGET, UpstreamSecrets, config_files, config_secret, relay_settings,
};
use super::secrets::{self, MANAGED_BY, MANAGED_BY_LABEL};
use super::status::write_if_changed;
use super::{Context, Error, FIELD_MANAGER};
use crate::api::{
    Condition, ConditionStatus, ConditionType, KeyState, MailDomain, MailRelay, MailRelayStatus,
};
use crate::relay::auth::hash_password;
use crate::relay::config::{DomainEntry, SigningKeyEntry, TenantEntry, UpstreamAuth};

/// Per-relay render locks (see [`Context::relay_renders`]).
#[derive(Default)]
pub struct RenderLocks(
    std::sync::Mutex<std::collections::HashMap<ObjectRef<MailRelay>, Arc<tokio::sync::Mutex<()>>>>,
);

impl RenderLocks {
    fn for_relay(&self, relay: &MailRelay) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(ObjectRef::from_obj(relay)).or_default().clone()
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let (relays, deployments, secrets, domains) = match &ctx.settings.namespace {
        Some(ns) => (
            Api::<MailRelay>::namespaced(client.clone(), ns),
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<Secret>::namespaced(client.clone(), ns),
            Api::<MailDomain>::namespaced(client, ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client),
        ),
    };
    Controller::new(relays, watcher::Config::default())
        // Many MailDomain events arrive together (a rotation wave, an
        // onboarding): render once for the lot.
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(500)))
        .owns(deployments, managed.clone())
        .owns(secrets, managed)
        .watches(domains, watcher::Config::default(), |md| {
            let relay = md.spec.relay_ref.as_ref()?;
            let namespace = relay.namespace.clone().or_else(|| md.namespace())?;
            Some(ObjectRef::<MailRelay>::new(&relay.name).within(&namespace))
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "relay reconcile did not complete");
            }
        })
        .await;
}

fn error_policy(relay: Arc<MailRelay>, error: &Error, ctx: Arc<Context>) -> Action {
    let label = crate::telemetry::ReasonLabel {
        reason: error.reason().to_string(),
    };
    ctx.metrics.reconcile_errors.get_or_create(&label).inc();
    tracing::warn!(mailrelay = %relay.name_any(), reason = error.reason(), error = %error, "relay reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

async fn reconcile(relay: Arc<MailRelay>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = relay.namespace().ok_or(Error::NotNamespaced)?;
    let rendered = sync(&relay, &ctx, None).await?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let ready_replicas = deployments
        .get_opt(&relay_objects::relay_object_name(&relay))
        .await?
        .and_then(|d| d.status)
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);

    let previous = relay.status.clone().unwrap_or_default();
    let now = Time(ctx.clock.now());
    let generation = relay.meta().generation;
    let mut conditions = previous.conditions.clone();
    let condition = |type_, status, reason: &str, message: String| Condition {
        type_,
        status,
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    let (status, reason, message) = configured(&rendered);
    Condition::upsert(
        &mut conditions,
        condition(ConditionType::Configured, status, reason, message),
    );
    let (status, reason, message) = if ready_replicas > 0 {
        (
            ConditionStatus::True,
            "Available",
            format!("{ready_replicas} relay pod(s) ready"),
        )
    } else {
        (
            ConditionStatus::False,
            "NoReadyPods",
            format!(
                "no relay pod is ready yet: check `kubectl -n {namespace} get pods -l app.kubernetes.io/instance={}`",
                relay.name_any()
            ),
        )
    };
    Condition::upsert(
        &mut conditions,
        condition(ConditionType::Ready, status, reason, message),
    );
    let desired = MailRelayStatus {
        observed_generation: generation,
        conditions,
        ready_replicas,
        domains: i32::try_from(rendered.served).unwrap_or(i32::MAX),
    };
    let api: Api<MailRelay> = Api::namespaced(ctx.client.clone(), &namespace);
    write_if_changed(
        &api,
        &*relay,
        relay.status.as_ref(),
        &desired,
        &ctx.metrics.status_writes,
    )
    .await?;
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// The `Configured` condition for what a render did.
fn configured(rendered: &Rendered) -> (ConditionStatus, &'static str, String) {
    let Rendered {
        served,
        problems,
        left_out,
    } = rendered;
    if !left_out.is_empty() {
        let mut names = left_out
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if left_out.len() > 5 {
            names.push_str(", ...");
        }
        let mut message = format!(
            "{} domain(s) do not fit in the relay's config (one Secret, at most 1 MiB) and are not served: {names}; move some MailDomains to another MailRelay",
            left_out.len()
        );
        if !problems.is_empty() {
            message.push_str(&format!("; also: {}", problems.join("; ")));
        }
        (ConditionStatus::False, "ConfigFull", message)
    } else if !problems.is_empty() {
        (
            ConditionStatus::False,
            "UpstreamSecretInvalid",
            format!(
                "rendered for {served} domain(s), but the relay cannot reach its upstream as intended: {}",
                problems.join("; ")
            ),
        )
    } else {
        (
            ConditionStatus::True,
            "Rendered",
            format!("Deployment, Service and config rendered for {served} domain(s)"),
        )
    }
}

/// What a render did.
pub struct Rendered {
    /// How many domains the relay serves.
    pub served: usize,
    /// Secrets the spec names that are missing or incomplete.
    pub problems: Vec<String>,
    /// Domains that did not fit in the relay's config, newest last.
    pub left_out: Vec<String>,
}

/// Renders and applies everything for `relay` from the MailDomains it
/// serves, leaving out `excluding` (a MailDomain being deleted: its domain
/// leaves the relay before its finalizer lets go).
pub async fn sync(
    relay: &MailRelay,
    ctx: &Context,
    excluding: Option<&ObjectRef<MailDomain>>,
) -> Result<Rendered, Error> {
    let namespace = relay.namespace().ok_or(Error::NotNamespaced)?;
    let lock = ctx.relay_renders.for_relay(relay);
    let _rendering = lock.lock().await;
    let domains_api: Api<MailDomain> = match &ctx.settings.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let serving: Vec<MailDomain> = domains_api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|md| serves(relay, md) && excluding.is_none_or(|ex| *ex != ObjectRef::from_obj(md)))
        .collect();

    // Oldest first: when the config is full, the newest domains wait.
    let mut serving = serving;
    serving.sort_by_cached_key(|md| {
        (
            md.creation_timestamp().map(|t| t.0),
            md.namespace(),
            md.name_any(),
        )
    });
    let mut entries = Vec::with_capacity(serving.len());
    for md in &serving {
        entries.extend(entries_for(relay, md, ctx).await?);
    }
    let (secrets, problems) = upstream_secrets(relay, &namespace, ctx).await?;
    let settings = relay_settings(relay, secrets);
    let (entries, left_out) = relay_objects::fit_budget(&settings, entries, CONFIG_BUDGET)?;
    let served = entries.len();
    tracing::info!(mailrelay = %relay.name_any(), domains = served, left_out = left_out.len(), excluding = ?excluding.map(|e| &e.name), "rendering relay config");
    let (domains, tenants): (Vec<_>, Vec<_>) = entries.into_iter().unzip();
    let files = config_files(&settings, tenants.into_iter().flatten().collect(), domains)?;
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret = config_secret(relay, files);
    secrets_api
        .patch(
            &relay_objects::config_secret_name(relay),
            &apply,
            &Patch::Apply(&secret),
        )
        .await?;
    let deployment = relay_objects::deployment(relay, &ctx.settings.relay_image);
    Api::<Deployment>::namespaced(ctx.client.clone(), &namespace)
        .patch(
            &relay_objects::relay_object_name(relay),
            &apply,
            &Patch::Apply(&deployment),
        )
        .await?;
    let service = relay_objects::service(relay);
    Api::<Service>::namespaced(ctx.client.clone(), &namespace)
        .patch(
            &relay_objects::relay_object_name(relay),
            &apply,
            &Patch::Apply(&service),
        )
        .await?;
    Ok(Rendered {
        served,
        problems,
        left_out,
    })
}

/// Whether a MailDomain belongs on this relay: it references it, is Ready
/// (which includes the relay admitting its namespace), is not in conflict
/// and is not being deleted.
fn serves(relay: &MailRelay, md: &MailDomain) -> bool {
    let references = md.spec.relay_ref.as_ref().is_some_and(|r| {
        r.name == relay.name_any()
            && r.namespace.clone().or_else(|| md.namespace()) == relay.namespace()
    });
    let conditions = md
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    references
        && md.meta().deletion_timestamp.is_none()
        && Condition::is_true(conditions, ConditionType::Ready)
        && !Condition::is_true(conditions, ConditionType::DomainConflict)
}

/// The domain and tenant entries of one MailDomain: its Active keys (read
/// from its key Secret) and its credential's hash.
async fn entries_for(
    relay: &MailRelay,
    md: &MailDomain,
    ctx: &Context,
) -> Result<Option<(DomainEntry, Option<TenantEntry>)>, Error> {
    let namespace = md.namespace().ok_or(Error::NotNamespaced)?;
    let Some(status) = &md.status else {
        return Ok(None);
    };
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(key_secret) = secrets_api.get_opt(&secrets::keys_secret_name(md)).await? else {
        return Ok(None);
    };
    let signing_keys: Vec<SigningKeyEntry> = status
        .dkim
        .iter()
        .flat_map(|d| d.keys.iter())
        .filter(|k| k.state == KeyState::Active)
        .filter_map(|k| {
            secrets::stored_key(&key_secret, &k.selector).map(|pem| SigningKeyEntry {
                selector: k.selector.clone(),
                algorithm: k.algorithm,
                private_key_pem: pem.expose_secret().to_string(),
            })
        })
        .collect();
    if signing_keys.is_empty() {
        return Ok(None);
    }
    let relay_default = relay.spec.limits.messages_per_minute;
    let domain = DomainEntry {
        domain: md.spec.domain.clone(),
        messages_per_minute: md
            .spec
            .rate_limit
            .as_ref()
            .map_or(relay_default, |r| r.messages_per_minute.min(relay_default)),
        signing_keys,
        return_path: md
            .spec
            .return_path
            .as_ref()
            .map(|rp| format!("{rp}.{}", md.spec.domain)),
    };
    let tenant = match secrets_api
        .get_opt(&secrets::credentials_secret_name(md))
        .await?
    {
        Some(credentials) => {
            secrets::credentials_of(&credentials).map(|(username, password)| TenantEntry {
                password_hash: hash_password(&password, &secrets::credential_salt(&username)),
                username,
                domains: vec![md.spec.domain.clone()],
            })
        }
        None => None,
    };
    Ok(Some((domain, tenant)))
}

/// What the relay's settings take from the Secrets its spec names, and,
/// for each named Secret that is missing or lacks its keys, a sentence for
/// the `Configured` condition.
async fn upstream_secrets(
    relay: &MailRelay,
    namespace: &str,
    ctx: &Context,
) -> Result<(UpstreamSecrets, Vec<String>), Error> {
    let api = Api::<Secret>::namespaced(ctx.client.clone(), namespace);
    let upstream = &relay.spec.upstream;
    let mut secrets = UpstreamSecrets::default();
    let mut problems = Vec::new();
    if let Some(name) = &upstream.auth_secret_name {
        let secret = api.get_opt(name).await?;
        let username = secret.as_ref().and_then(|s| secret_text(s, "username"));
        let password = secret.as_ref().and_then(|s| secret_text(s, "password"));
        match (username, password) {
            (Some(username), Some(password)) => {
                secrets.auth = Some(UpstreamAuth { username, password });
            }
            _ => problems.push(format!(
                "spec.upstream.authSecretName: Secret {namespace}/{name} with `username` and `password` not found"
            )),
        }
    }
    if let Some(name) = &upstream.ca_secret_name {
        let secret = api.get_opt(name).await?;
        match secret.as_ref().and_then(|s| secret_text(s, "ca.crt")) {
            Some(pem) => match crate::relay::upstream::trusting(&pem) {
                Ok(_) => secrets.ca_certificates = Some(pem),
                Err(error) => problems.push(format!(
                    "spec.upstream.caSecretName: `ca.crt` of Secret {namespace}/{name}: {error}"
                )),
            },
            None => problems.push(format!(
                "spec.upstream.caSecretName: Secret {namespace}/{name} with `ca.crt` not found"
            )),
        }
    }
    Ok((secrets, problems))
}

fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    let bytes = secret.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(problems: &[&str], left_out: usize) -> Rendered {
        Rendered {
            served: 3,
            problems: problems.iter().map(|p| p.to_string()).collect(),
            left_out: (0..left_out).map(|i| format!("d{i}.test")).collect(),
        }
    }

    #[test]
    fn configured_says_what_keeps_the_relay_from_serving_as_intended() {
        let (status, reason, _) = configured(&rendered(&[], 0));
        assert_eq!((status, reason), (ConditionStatus::True, "Rendered"));

        let (status, reason, message) =
            configured(&rendered(&["spec.upstream.caSecretName: x"], 0));
        assert_eq!(
            (status, reason),
            (ConditionStatus::False, "UpstreamSecretInvalid")
        );
        assert!(message.contains("spec.upstream.caSecretName"), "{message}");

        let (status, reason, message) =
            configured(&rendered(&["spec.upstream.authSecretName: y"], 7));
        assert_eq!((status, reason), (ConditionStatus::False, "ConfigFull"));
        assert!(message.starts_with("7 domain(s)"), "{message}");
        assert!(message.contains("d4.test, ..."), "{message}");
        assert!(!message.contains("d5.test"), "{message}");
        assert!(message.contains("authSecretName"), "{message}");
    }
}
