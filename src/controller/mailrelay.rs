//! The MailRelay controller: renders each relay's Deployment, Service,
//! ServiceAccount, Role and settings Secret, and reports in its status what
//! it serves. Which domains it serves, and their shards, are decided and
//! written by the relay projection ([`super::projection`]); this controller
//! only reads its summary.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc::UnboundedReceiver;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::index::Index;
use super::projection::RelaySummary;
use super::relay_objects::{self, UpstreamSecrets, relay_settings};
use super::secrets::{MANAGED_BY, MANAGED_BY_LABEL};
use super::status::write_if_changed;
use super::{Context, Error, FIELD_MANAGER};
use crate::api::{
    Condition, ConditionStatus, ConditionType, LeftOutDomain, MailRelay, MailRelayStatus, Reason,
};
use crate::relay::config::UpstreamAuth;

/// How many left-out MailDomains a MailRelay's status names.
const LEFT_OUT_SHOWN: usize = 50;

/// Runs the controller until `shutdown` resolves: driven by the index's
/// MailRelays, the Deployments it owns, and the projection's news.
pub async fn run(
    ctx: Arc<Context>,
    index: Index,
    relays: UnboundedReceiver<Result<MailRelay, watcher::Error>>,
    summaries_changed: UnboundedReceiver<ObjectRef<MailRelay>>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let mut controller = Controller::for_stream(relays, index.relays.clone())
        .with_config(ControllerConfig::default().debounce(Duration::from_millis(500)));
    if ctx.settings.namespaces.is_empty() {
        controller = controller.owns(Api::<Deployment>::all(client), managed);
    } else {
        for namespace in &ctx.settings.namespaces {
            controller = controller.owns(
                Api::<Deployment>::namespaced(client.clone(), namespace),
                managed.clone(),
            );
        }
    }
    controller
        .reconcile_on(summaries_changed)
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
    let (secrets, problems) = upstream_secrets(&relay, &namespace, &ctx).await?;
    render(&relay, &namespace, secrets, &ctx).await?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let ready_replicas = deployments
        .get_opt(&relay_objects::relay_object_name(&relay))
        .await?
        .and_then(|d| d.status)
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    let summary = ctx.projection().summary(&ObjectRef::from_obj(&*relay));

    let previous = relay.status.clone().unwrap_or_default();
    let now = Time(ctx.clock.now());
    let generation = relay.meta().generation;
    let mut conditions = previous.conditions.clone();
    let (status, reason, message) = configured(&summary, &problems);
    Condition::upsert(
        &mut conditions,
        Condition::new(
            ConditionType::Configured,
            status,
            reason,
            message,
            generation,
            now.clone(),
        ),
    );
    let (status, reason, message) = if ready_replicas > 0 {
        (
            ConditionStatus::True,
            Reason::Available,
            format!("{ready_replicas} relay pod(s) ready"),
        )
    } else {
        (
            ConditionStatus::False,
            Reason::NoReadyPods,
            format!(
                "no relay pod is ready yet: check `kubectl -n {namespace} get pods -l app.kubernetes.io/instance={}`",
                relay.name_any()
            ),
        )
    };
    Condition::upsert(
        &mut conditions,
        Condition::new(
            ConditionType::Ready,
            status,
            reason,
            message,
            generation,
            now,
        ),
    );
    let desired = MailRelayStatus {
        observed_generation: generation,
        conditions,
        ready_replicas,
        domains: i32::try_from(summary.served).unwrap_or(i32::MAX),
        domains_left_out: i32::try_from(summary.left_out.len()).unwrap_or(i32::MAX),
        left_out: summary
            .left_out
            .iter()
            .take(LEFT_OUT_SHOWN)
            .map(|(mail_domain, domain, why)| LeftOutDomain {
                mail_domain: mail_domain.clone(),
                domain: domain.clone(),
                reason: why.reason().as_str().to_string(),
            })
            .collect(),
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
    // The upstream Secrets are not watched (watching every Secret in the
    // cluster is too much): they are read again at least this often.
    Ok(Action::requeue(Duration::from_secs(300)))
}

/// Applies everything rendered for a relay except its domain shards.
async fn render(
    relay: &MailRelay,
    namespace: &str,
    secrets: UpstreamSecrets,
    ctx: &Context,
) -> Result<(), Error> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    let name = relay_objects::relay_object_name(relay);
    let settings = relay_settings(relay, secrets);
    let settings_secret = relay_objects::settings_secret(relay, &settings)?;
    let existing = ctx
        .index()
        .secret(namespace, &relay_objects::config_secret_name(relay));
    if existing
        .is_none_or(|s| s.data != settings_secret.data || s.labels() != settings_secret.labels())
    {
        Api::<Secret>::namespaced(ctx.client.clone(), namespace)
            .patch(
                &relay_objects::config_secret_name(relay),
                &apply,
                &Patch::Apply(&settings_secret),
            )
            .await?;
        ctx.metrics.secret_writes.inc();
    }
    Api::<ServiceAccount>::namespaced(ctx.client.clone(), namespace)
        .patch(
            &name,
            &apply,
            &Patch::Apply(&relay_objects::service_account(relay)),
        )
        .await?;
    Api::<Role>::namespaced(ctx.client.clone(), namespace)
        .patch(&name, &apply, &Patch::Apply(&relay_objects::role(relay)))
        .await?;
    Api::<RoleBinding>::namespaced(ctx.client.clone(), namespace)
        .patch(
            &name,
            &apply,
            &Patch::Apply(&relay_objects::role_binding(relay)),
        )
        .await?;
    let deployment = relay_objects::deployment(
        relay,
        &ctx.settings.relay_image,
        ctx.settings.relay_image_pull_policy.as_deref(),
    );
    Api::<Deployment>::namespaced(ctx.client.clone(), namespace)
        .patch(&name, &apply, &Patch::Apply(&deployment))
        .await?;
    Api::<Service>::namespaced(ctx.client.clone(), namespace)
        .patch(&name, &apply, &Patch::Apply(&relay_objects::service(relay)))
        .await?;
    Ok(())
}

/// The `Configured` condition: what keeps the relay from serving as
/// intended, if anything.
fn configured(summary: &RelaySummary, problems: &[String]) -> (ConditionStatus, Reason, String) {
    if !problems.is_empty() {
        return (
            ConditionStatus::False,
            Reason::UpstreamSecretInvalid,
            format!(
                "serving {} domain(s), but the relay cannot reach its upstream as intended: {}",
                summary.served,
                problems.join("; ")
            ),
        );
    }
    if summary.left_out.is_empty() {
        return (
            ConditionStatus::True,
            Reason::Rendered,
            format!(
                "Deployment, Service and config rendered for {} domain(s)",
                summary.served
            ),
        );
    }
    let mut names = summary
        .left_out
        .iter()
        .take(5)
        .map(|(md, domain, why)| format!("{domain} ({md}: {why})"))
        .collect::<Vec<_>>()
        .join(", ");
    if summary.left_out.len() > 5 {
        names.push_str(", ...");
    }
    (
        ConditionStatus::False,
        Reason::DomainsLeftOut,
        format!(
            "serving {} domain(s); {} MailDomain(s) that name this relay are not served: {names}. \
             Each one's RelayAccepted condition says why and what to do",
            summary.served,
            summary.left_out.len()
        ),
    )
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
    use crate::controller::membership::LeftOut;

    fn summary(left_out: usize) -> RelaySummary {
        RelaySummary {
            served: 3,
            left_out: (0..left_out)
                .map(|i| {
                    (
                        format!("t/d{i}"),
                        format!("d{i}.test"),
                        LeftOut::CredentialsTampered,
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn configured_says_what_keeps_the_relay_from_serving_as_intended() {
        let (status, reason, _) = configured(&summary(0), &[]);
        assert_eq!((status, reason), (ConditionStatus::True, Reason::Rendered));

        let (status, reason, message) =
            configured(&summary(0), &["spec.upstream.caSecretName: x".into()]);
        assert_eq!(
            (status, reason),
            (ConditionStatus::False, Reason::UpstreamSecretInvalid)
        );
        assert!(message.contains("spec.upstream.caSecretName"), "{message}");

        let (status, reason, message) = configured(&summary(7), &[]);
        assert_eq!(
            (status, reason),
            (ConditionStatus::False, Reason::DomainsLeftOut)
        );
        assert!(message.contains("7 MailDomain(s)"), "{message}");
        assert!(
            message.contains("d4.test (t/d4: CredentialsTampered), ..."),
            "{message}"
        );
        assert!(!message.contains("d5.test"), "{message}");
    }
}
