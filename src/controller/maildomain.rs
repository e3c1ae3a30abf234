//! The MailDomain controller: generates and rotates DKIM keys, checks the DNS
//! records, decides the conditions and writes status. It fetches, calls the
//! pure core (`dkim::plan`, `dns::expected_records`, `conditions`) and writes
//! in a crash-safe order: new keys are stored before status mentions them,
//! and a retired key's private key is deleted only after status says Retired.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use super::conditions::{DomainFacts, KeysProblem, RelayFacts, conditions};
use super::secrets::{self, MANAGED_BY, MANAGED_BY_LABEL};
use super::status::write_if_changed;
use super::{Context, Error, FIELD_MANAGER};
use crate::api::{
    Condition, ConditionStatus, ConditionType, DeletionPolicy, DnsRecordStatus, MailDomain,
    MailDomainStatus, MailRelay, NamespacesFrom, ROTATE_ANNOTATION, RecordState, SpfAuthorization,
};
use crate::dkim::{
    self, DnsVerdict, GeneratedKey, PrivateKeyPem, RotationEvent, RotationInput, RotationPlan,
};
use crate::dns::{self, ExpectedRecord, RecordOutcome, Requirement, Verdict};

/// Finalizer that lets cleanup run (key Secret, relays) before deletion.
pub const FINALIZER: &str = "mailauth.dev/cleanup";

/// `lastChecked` is refreshed at least this often when nothing changes.
const LAST_CHECKED_REFRESH: SignedDuration = SignedDuration::from_hours(24);

/// What the controller's reconciles share besides [`Context`].
pub struct Reconciler {
    pub ctx: Arc<Context>,
    /// Every MailDomain in the cluster, for domain claims.
    pub domains: Store<MailDomain>,
}

/// The last DNS results per MailDomain, so that reconciles caused by our own
/// writes or by Secret events do not query DNS again before it is due.
#[derive(Default)]
pub struct DnsMemo(Mutex<HashMap<ObjectRef<MailDomain>, MemoEntry>>);

#[derive(Clone)]
struct MemoEntry {
    fingerprint: u64,
    outcomes: Vec<RecordOutcome>,
    next_check: Timestamp,
}

impl DnsMemo {
    fn get(&self, key: &ObjectRef<MailDomain>) -> Option<MemoEntry> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    fn put(&self, key: ObjectRef<MailDomain>, entry: MemoEntry) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, entry);
    }

    fn forget(&self, key: &ObjectRef<MailDomain>) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (domains, owned_secrets): (Api<MailDomain>, Api<Secret>) = match &ctx.settings.namespace {
        Some(namespace) => (
            Api::namespaced(client.clone(), namespace),
            Api::namespaced(client.clone(), namespace),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let relays: Api<MailRelay> = Api::all(client);
    let controller = Controller::new(domains, watcher::Config::default().any_semantic())
        .with_config(ControllerConfig::default().concurrency(ctx.settings.concurrency));
    let store = controller.store();
    let by_relay = store.clone();
    let clock_ticks = ctx.clock.ticks();
    let reconciler = Arc::new(Reconciler {
        ctx,
        domains: store,
    });
    controller
        .owns(
            owned_secrets,
            watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
        )
        // A relay's change (its SPF authorization, the namespaces it admits)
        // changes the records and conditions of the domains that use it.
        .watches(relays, watcher::Config::default(), move |relay| {
            let relay_ns = relay.namespace().unwrap_or_default();
            let relay_name = relay.name_any();
            by_relay
                .state()
                .into_iter()
                .filter(|md| {
                    md.spec.relay_ref.as_ref().is_some_and(|r| {
                        r.name == relay_name
                            && r.namespace
                                .as_deref()
                                .or(md.namespace().as_deref())
                                .map(str::to_string)
                                == Some(relay_ns.clone())
                    })
                })
                .map(|md| ObjectRef::from_obj(&*md))
                .collect::<Vec<_>>()
        })
        .reconcile_all_on(clock_ticks)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, reconciler)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile did not complete");
            }
        })
        .await;
}

fn error_policy(domain: Arc<MailDomain>, error: &Error, rec: Arc<Reconciler>) -> Action {
    let label = crate::telemetry::ReasonLabel {
        reason: error.reason().to_string(),
    };
    rec.ctx.metrics.reconcile_errors.get_or_create(&label).inc();
    tracing::warn!(maildomain = %domain.name_any(), namespace = ?domain.namespace(), reason = error.reason(), error = %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

async fn reconcile(domain: Arc<MailDomain>, rec: Arc<Reconciler>) -> Result<Action, Error> {
    let namespace = domain.namespace().ok_or(Error::NotNamespaced)?;
    let api: Api<MailDomain> = Api::namespaced(rec.ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, domain, |event| async {
        match event {
            Finalizer::Apply(domain) => apply(&domain, &rec).await,
            Finalizer::Cleanup(domain) => cleanup(&domain, &rec).await,
        }
    })
    .await;
    use kube::runtime::finalizer::Error as FinalizerError;
    match result {
        Ok(action) => Ok(action),
        // A reconcile queued before the object went away (a Secret event
        // during deletion) finds it already gone: cleanup is done.
        Err(FinalizerError::RemoveFinalizer(kube::Error::Api(status))) if status.code == 404 => {
            Ok(Action::await_change())
        }
        Err(FinalizerError::ApplyFailed(err) | FinalizerError::CleanupFailed(err)) => Err(err),
        Err(other) => Err(Error::Finalizer(other.to_string())),
    }
}

async fn apply(domain: &MailDomain, rec: &Reconciler) -> Result<Action, Error> {
    let ctx = &rec.ctx;
    let namespace = domain.namespace().ok_or(Error::NotNamespaced)?;
    let now = ctx.clock.now();
    let previous = domain.status.clone().unwrap_or_default();
    let previous_dkim = previous.dkim.clone().unwrap_or_default();

    // The Secret is read fresh, never from a cache: a just-stored key must
    // not look missing, or it would be generated again.
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret_name = secrets::keys_secret_name(domain);
    let secret = secrets_api.get_opt(&secret_name).await?;
    let secret_is_ours = secret.as_ref().is_none_or(|s| secrets::is_ours(s, domain));
    let mut stored_entries = secret
        .as_ref()
        .filter(|_| secret_is_ours)
        .map(secrets::stored_entries)
        .unwrap_or_default();
    let stored: std::collections::HashSet<String> = stored_entries.keys().cloned().collect();

    let (relay, admitted_by) = relay_facts(domain, &namespace, ctx).await?;
    let spf: Option<SpfAuthorization> = admitted_by.as_ref().map(|r| r.spec.spf.clone());
    let credentials_secret = match &admitted_by {
        Some(relay) => Some(ensure_credentials(domain, relay, &secrets_api, ctx).await?),
        None => previous.credentials_secret.clone(),
    };

    let expected = dns::expected_records(
        &domain.spec.domain,
        &domain.spec,
        &previous_dkim.keys,
        spf.as_ref(),
    );
    let outcomes = dns_outcomes(domain, &expected, &previous.records, now, ctx).await;
    let verdicts = dkim_verdicts(&outcomes);

    let mut keys_problem = None;
    let mut generated: Vec<(GeneratedKey, u32)> = Vec::new();
    let plan = if secret_is_ours {
        let plan = dkim::plan(&RotationInput {
            now,
            spec: &domain.spec.dkim,
            keys: &previous_dkim.keys,
            rotate_annotation: domain
                .annotations()
                .get(ROTATE_ANNOTATION)
                .map(String::as_str),
            rotate_acted_on: previous_dkim.rotate_requested.as_deref(),
            dns: &verdicts,
            private_keys_present: &stored,
        })?;
        // Generating is the one step that is not idempotent (new random
        // keys), so it must never act on a stale copy: a reconcile set off
        // by our own Secret write can run before the watch has delivered the
        // status we just wrote, and would generate a second key.
        if !plan.generate.is_empty() && is_stale(domain, ctx).await? {
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
        if !plan.generate.is_empty() {
            if !previous_dkim.keys.is_empty() {
                ctx.metrics.rotations.inc();
            }
            match generate_and_store(domain, &plan, &mut stored_entries, &secrets_api, ctx).await {
                Ok(keys) => generated = keys,
                Err(err) => {
                    publish(
                        ctx,
                        domain,
                        EventType::Warning,
                        err.reason(),
                        "Generate",
                        err.to_string(),
                    )
                    .await;
                    keys_problem = Some(KeysProblem::GenerationFailed {
                        message: err.to_string(),
                    });
                }
            }
        }
        if !plan.active_keys_missing.is_empty() {
            keys_problem = Some(KeysProblem::ActiveKeyMissing {
                secret: secret_name.clone(),
                selectors: plan.active_keys_missing.clone(),
            });
        }
        Some(plan)
    } else {
        keys_problem = Some(KeysProblem::SecretNotOwned {
            secret: secret_name.clone(),
        });
        None
    };

    // A failed generation must not record keys that were never stored.
    let dkim_status = match &plan {
        Some(plan) if generated.len() == plan.generate.len() => plan.status(
            generated
                .into_iter()
                .map(|(key, generation)| key.into_status(now, generation)),
        ),
        Some(plan) => {
            let mut unchanged = plan.status(std::iter::empty());
            unchanged.rotate_requested = previous_dkim.rotate_requested.clone();
            unchanged
        }
        None => previous_dkim.clone(),
    };

    // Records for the keys as they are now; new keys are Unchecked until
    // the next check, which their new fingerprint makes due at once.
    let expected_now = dns::expected_records(
        &domain.spec.domain,
        &domain.spec,
        &dkim_status.keys,
        spf.as_ref(),
    );
    let outcomes_now: Vec<RecordOutcome> = expected_now
        .iter()
        .map(|record| RecordOutcome {
            record: record.clone(),
            verdict: outcomes
                .iter()
                .find(|o| same_record(&o.record, record))
                .and_then(|o| o.verdict.clone()),
        })
        .collect();
    let now_time = Time(now);
    let records = dns::record_statuses(&outcomes_now, &previous.records, &now_time);

    let mut facts = DomainFacts {
        generation: domain.meta().generation,
        keys: &dkim_status.keys,
        keys_problem,
        records: &records,
        relay,
        conflict_with: None,
        now: now_time.clone(),
    };
    let mut new_conditions = conditions(&facts, &previous.conditions);
    facts.conflict_with = domain_owner(domain, &new_conditions, &rec.domains);
    if facts.conflict_with.is_some() {
        new_conditions = conditions(&facts, &previous.conditions);
    }

    let last_checked = match &previous.last_checked {
        Some(last)
            if records == previous.records && now.duration_since(last.0) < LAST_CHECKED_REFRESH =>
        {
            Some(last.clone())
        }
        _ if records.iter().any(|r| r.state != RecordState::Unchecked) => Some(now_time.clone()),
        _ => previous.last_checked.clone(),
    };

    let desired = MailDomainStatus {
        observed_generation: domain.meta().generation,
        conditions: new_conditions,
        dkim: Some(dkim_status),
        records,
        last_checked,
        keys_secret: Some(secret_name),
        credentials_secret,
    };
    let api: Api<MailDomain> = Api::namespaced(ctx.client.clone(), &namespace);
    write_if_changed(
        &api,
        domain,
        domain.status.as_ref(),
        &desired,
        &ctx.metrics.status_writes,
    )
    .await?;

    // Only now that status says Retired may the private keys go. The
    // entries are the Secret as this reconcile left it, keys it just
    // generated included.
    if let Some(plan) = &plan {
        let before = stored_entries.len();
        stored_entries.retain(|selector, _| !plan.remove_private_keys.contains(selector));
        if stored_entries.len() != before {
            apply_secret(&secrets_api, domain, &stored_entries, ctx).await?;
        }
    }

    publish_changes(domain, &previous, &desired, plan.as_ref(), ctx).await;
    ctx.metrics.reconciles.inc();
    record_key_states(domain, &desired, ctx);

    let next_check = ctx
        .dns_memo
        .get(&ObjectRef::from_obj(domain))
        .map(|memo| memo.next_check);
    let wake = [plan.as_ref().and_then(|p| p.wake_at), next_check]
        .into_iter()
        .flatten()
        .min();
    Ok(match wake {
        Some(at) => Action::requeue(until(now, at)),
        None => Action::requeue(ctx.settings.recheck_interval),
    })
}

/// Whether the API server holds a newer version of this MailDomain than the
/// one being reconciled (a quorum read, not the cache).
async fn is_stale(domain: &MailDomain, ctx: &Context) -> Result<bool, Error> {
    let api: Api<MailDomain> = Api::namespaced(
        ctx.client.clone(),
        &domain.namespace().ok_or(Error::NotNamespaced)?,
    );
    let fresh = api.get_opt(&domain.name_any()).await?;
    Ok(fresh.is_none_or(|fresh| fresh.resource_version() != domain.resource_version()))
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    let wait = at.duration_since(now);
    Duration::try_from(wait)
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_secs(1))
}

fn same_record(a: &ExpectedRecord, b: &ExpectedRecord) -> bool {
    a.name == b.name && a.record_type == b.record_type && a.value == b.value
}

/// DNS verdicts per DKIM selector, as the rotation planner wants them.
fn dkim_verdicts(outcomes: &[RecordOutcome]) -> HashMap<String, DnsVerdict> {
    outcomes
        .iter()
        .filter_map(|outcome| match &outcome.record.requirement {
            Requirement::DkimPublicKey { selector, .. } => {
                let verdict = match &outcome.verdict {
                    Some(Verdict::Verified) => DnsVerdict::Verified,
                    Some(Verdict::Missing { .. } | Verdict::Mismatch { .. }) => {
                        DnsVerdict::NotVerified
                    }
                    Some(Verdict::Error { .. }) | None => DnsVerdict::Unknown,
                };
                Some((selector.clone(), verdict))
            }
            _ => None,
        })
        .collect()
}

/// The DNS results for `expected`, queried only when due: when the records
/// changed, or when the backoff (unverified) or recheck interval (verified)
/// has passed on the injected clock.
async fn dns_outcomes(
    domain: &MailDomain,
    expected: &[ExpectedRecord],
    previous: &[DnsRecordStatus],
    now: Timestamp,
    ctx: &Context,
) -> Vec<RecordOutcome> {
    let key = ObjectRef::from_obj(domain);
    let fingerprint = fingerprint(expected);
    if let Some(memo) = ctx.dns_memo.get(&key)
        && memo.fingerprint == fingerprint
        && now < memo.next_check
    {
        return memo.outcomes;
    }
    let outcomes = dns::check_records(&ctx.dns, expected).await;
    for outcome in &outcomes {
        if let Some(verdict) = &outcome.verdict {
            let label = crate::telemetry::ResultLabel {
                result: format!("{:?}", verdict.record_state()),
            };
            ctx.metrics.dns_checks.get_or_create(&label).inc();
        }
    }
    let next_check = now + next_check_delay(&outcomes, previous, now, ctx);
    ctx.dns_memo.put(
        key,
        MemoEntry {
            fingerprint,
            outcomes: outcomes.clone(),
            next_check,
        },
    );
    outcomes
}

fn fingerprint(expected: &[ExpectedRecord]) -> u64 {
    let mut hasher = DefaultHasher::new();
    for record in expected {
        (&record.name, record.record_type.to_string(), &record.value).hash(&mut hasher);
    }
    hasher.finish()
}

/// Unverified records are re-checked after about as long as they have been
/// unverified (so the delay doubles), from `dns_retry_min` (30 s) to
/// `dns_retry_max` (10 min); verified domains after `recheck_interval`. Jitter
/// of ±10% keeps 10,000 domains from checking in lockstep.
fn next_check_delay(
    outcomes: &[RecordOutcome],
    previous: &[DnsRecordStatus],
    now: Timestamp,
    ctx: &Context,
) -> SignedDuration {
    let settings = &ctx.settings;
    let unverified: Vec<&RecordOutcome> = outcomes
        .iter()
        .filter(|o| o.verdict.as_ref().is_some_and(|v| !v.is_verified()))
        .collect();
    let base = if unverified.is_empty() {
        settings.recheck_interval
    } else {
        let longest = unverified
            .iter()
            .filter_map(|o| {
                previous
                    .iter()
                    .find(|p| {
                        p.name == o.record.name
                            && p.value == o.record.value
                            && p.state != RecordState::Verified
                    })
                    .and_then(|p| p.since.as_ref())
                    .map(|since| {
                        Duration::try_from(now.duration_since(since.0)).unwrap_or(Duration::ZERO)
                    })
            })
            .max()
            .unwrap_or(Duration::ZERO);
        longest.clamp(settings.dns_retry_min, settings.dns_retry_max)
    };
    let jitter = 0.9 + fastrand::f64() * 0.2;
    SignedDuration::try_from(base.mul_f64(jitter)).unwrap_or(SignedDuration::from_secs(30))
}

/// Generates the planned keys on the bounded blocking pool and stores them,
/// with every key already stored (`entries`, updated in place), in the
/// Secret. Returns them with their generation numbers.
async fn generate_and_store(
    domain: &MailDomain,
    plan: &RotationPlan,
    entries: &mut BTreeMap<String, PrivateKeyPem>,
    secrets_api: &Api<Secret>,
    ctx: &Context,
) -> Result<Vec<(GeneratedKey, u32)>, Error> {
    let mut generated = Vec::with_capacity(plan.generate.len());
    for request in &plan.generate {
        let _permit = ctx
            .key_generation
            .acquire()
            .await
            .map_err(|_| Error::Finalizer("shutting down".into()))?;
        let request = request.clone();
        let generation = request.generation;
        let key = tokio::task::spawn_blocking(move || dkim::generate(&request)).await??;
        ctx.metrics.keys_generated.inc();
        generated.push((key, generation));
    }
    let mut updated = entries.clone();
    for (key, _) in &generated {
        updated.insert(key.selector.clone(), key.private_key_pem.clone());
    }
    apply_secret(secrets_api, domain, &updated, ctx).await?;
    *entries = updated;
    Ok(generated)
}

async fn apply_secret(
    api: &Api<Secret>,
    domain: &MailDomain,
    entries: &BTreeMap<String, PrivateKeyPem>,
    ctx: &Context,
) -> Result<(), Error> {
    let secret = secrets::keys_secret(domain, entries);
    api.patch(
        &secrets::keys_secret_name(domain),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&secret),
    )
    .await?;
    ctx.metrics.secret_writes.inc();
    Ok(())
}

/// Whether `relayRef`'s relay admits this domain, and what SPF must then
/// authorize.
async fn relay_facts(
    domain: &MailDomain,
    namespace: &str,
    ctx: &Context,
) -> Result<(RelayFacts, Option<MailRelay>), Error> {
    let Some(relay_ref) = &domain.spec.relay_ref else {
        return Ok((RelayFacts::NotRequested, None));
    };
    let relay_namespace = relay_ref.namespace.as_deref().unwrap_or(namespace);
    let relay_id = format!("{relay_namespace}/{}", relay_ref.name);
    let relays: Api<MailRelay> = Api::namespaced(ctx.client.clone(), relay_namespace);
    let Some(relay) = relays.get_opt(&relay_ref.name).await? else {
        return Ok((
            RelayFacts::Refused {
                reason: "RelayNotFound",
                message: format!("MailRelay {relay_id} does not exist: check spec.relayRef"),
            },
            None,
        ));
    };
    let labels = if relay.spec.allowed_namespaces.from == NamespacesFrom::Selector {
        let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
        namespaces
            .get_opt(namespace)
            .await?
            .map(|ns| ns.labels().clone())
            .unwrap_or_default()
    } else {
        BTreeMap::new()
    };
    Ok(
        match relay
            .spec
            .allowed_namespaces
            .admits(relay_namespace, namespace, &labels)
        {
            Ok(()) => (RelayFacts::Accepted { relay: relay_id }, Some(relay)),
            Err(why) => (
                RelayFacts::Refused {
                    reason: "NamespaceNotAllowed",
                    message: format!("MailRelay {relay_id} does not admit this MailDomain: {why}"),
                },
                None,
            ),
        },
    )
}

/// Makes sure the tenant's SMTP credentials Secret exists for an admitted
/// domain (a password is generated once and kept) and points at the relay.
/// Returns its name.
async fn ensure_credentials(
    domain: &MailDomain,
    relay: &MailRelay,
    secrets_api: &Api<Secret>,
    ctx: &Context,
) -> Result<String, Error> {
    let name = secrets::credentials_secret_name(domain);
    let existing = secrets_api.get_opt(&name).await?;
    if let Some(secret) = &existing
        && !secrets::is_ours(secret, domain)
    {
        return Err(Error::SecretNotOwned(name));
    }
    let host = format!(
        "{}.{}.svc",
        super::relay_objects::relay_object_name(relay),
        relay.namespace().unwrap_or_default()
    );
    let username = secrets::smtp_username(domain);
    let password = match existing.as_ref().and_then(secrets::credentials_of) {
        Some((_, password)) => password,
        None => secrets::new_password().map_err(|_| Error::Random)?,
    };
    let desired = secrets::credentials_secret(
        domain,
        &host,
        relay.spec.listener.port,
        &username,
        &password,
    );
    if existing.as_ref().is_none_or(|s| s.data != desired.data) {
        secrets_api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&desired),
            )
            .await?;
        ctx.metrics.secret_writes.inc();
    }
    Ok(name)
}

/// The MailDomain (`namespace/name`) that owns this domain when it is
/// another one: of all MailDomains for the same domain whose DKIM record is
/// verified, the one verified first (then the oldest, then by name).
fn domain_owner(
    domain: &MailDomain,
    own_conditions: &[Condition],
    all: &Store<MailDomain>,
) -> Option<String> {
    let me = ObjectRef::from_obj(domain);
    let verified_since = |conditions: &[Condition]| {
        Condition::find(conditions, ConditionType::DkimVerified)
            .filter(|c| c.status == ConditionStatus::True)
            .map(|c| c.last_transition_time.0)
    };
    let mut claims: Vec<(Timestamp, Option<Timestamp>, String, bool)> = all
        .state()
        .into_iter()
        .filter(|other| {
            other.spec.domain == domain.spec.domain && ObjectRef::from_obj(&**other) != me
        })
        .filter(|other| other.meta().deletion_timestamp.is_none())
        .filter_map(|other| {
            let since = verified_since(&other.status.as_ref()?.conditions)?;
            let id = format!(
                "{}/{}",
                other.namespace().unwrap_or_default(),
                other.name_any()
            );
            Some((
                since,
                other.meta().creation_timestamp.as_ref().map(|t| t.0),
                id,
                false,
            ))
        })
        .collect();
    if claims.is_empty() {
        return None;
    }
    if let Some(since) = verified_since(own_conditions) {
        let id = format!(
            "{}/{}",
            domain.namespace().unwrap_or_default(),
            domain.name_any()
        );
        claims.push((
            since,
            domain.meta().creation_timestamp.as_ref().map(|t| t.0),
            id,
            true,
        ));
    }
    claims.sort();
    let (_, _, owner, is_me) = claims.swap_remove(0);
    (!is_me).then_some(owner)
}

async fn cleanup(domain: &MailDomain, rec: &Reconciler) -> Result<Action, Error> {
    let ctx = &rec.ctx;
    let namespace = domain.namespace().ok_or(Error::NotNamespaced)?;
    // The domain leaves its relay before the finalizer lets go, so the relay
    // never signs for a domain that no longer exists.
    if let Some(relay_ref) = &domain.spec.relay_ref {
        let relay_namespace = relay_ref.namespace.as_deref().unwrap_or(&namespace);
        let relays: Api<MailRelay> = Api::namespaced(ctx.client.clone(), relay_namespace);
        if let Some(relay) = relays.get_opt(&relay_ref.name).await? {
            super::mailrelay::sync(&relay, ctx, Some(&ObjectRef::from_obj(domain))).await?;
        }
    }
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = secrets::keys_secret_name(domain);
    if let Some(secret) = secrets_api.get_opt(&name).await?
        && secrets::is_ours(&secret, domain)
    {
        match domain.spec.deletion_policy {
            // Deleted here rather than left to the garbage collector, so the
            // keys are gone when the MailDomain is.
            DeletionPolicy::Delete => {
                secrets_api.delete(&name, &DeleteParams::default()).await?;
            }
            DeletionPolicy::Retain => {
                let patch = serde_json::json!({"metadata": {"ownerReferences": null}});
                secrets_api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
        }
    }
    ctx.dns_memo.forget(&ObjectRef::from_obj(domain));
    ctx.metrics.keys.forget(&inventory_key(domain));
    Ok(Action::await_change())
}

/// Events for what changed: key lifecycle steps from the plan, and records
/// that were verified and are no longer.
async fn publish_changes(
    domain: &MailDomain,
    previous: &MailDomainStatus,
    desired: &MailDomainStatus,
    plan: Option<&RotationPlan>,
    ctx: &Context,
) {
    let previously_missing_active = Condition::find(&previous.conditions, ConditionType::KeysReady)
        .is_some_and(|c| c.reason == "ActiveKeyMissing");
    for event in plan.iter().flat_map(|p| p.events.iter()) {
        if matches!(event, RotationEvent::ActiveKeyMissing { .. }) && previously_missing_active {
            continue;
        }
        let kind = if event.is_warning() {
            EventType::Warning
        } else {
            EventType::Normal
        };
        publish(
            ctx,
            domain,
            kind,
            event.reason(),
            "Rotate",
            event.to_string(),
        )
        .await;
    }
    if let Some(c) = Condition::find(&desired.conditions, ConditionType::KeysReady)
        && c.reason == "SecretNotOwned"
        && Condition::find(&previous.conditions, ConditionType::KeysReady)
            .is_none_or(|p| p.reason != c.reason)
    {
        publish(
            ctx,
            domain,
            EventType::Warning,
            "SecretNotOwned",
            "StoreKeys",
            c.message.clone(),
        )
        .await;
    }
    // A verdict that flips is news; a DNS error in between is not (it keeps
    // the previous verdict), so compare conditions, not record states.
    for type_ in [
        ConditionType::DkimVerified,
        ConditionType::SpfVerified,
        ConditionType::DmarcVerified,
    ] {
        let before = Condition::find(&previous.conditions, type_).map(|c| c.status);
        let Some(after) = Condition::find(&desired.conditions, type_) else {
            continue;
        };
        match (before, after.status) {
            (Some(ConditionStatus::True), ConditionStatus::False) => {
                let note = format!(
                    "{} is no longer verified: {}",
                    type_.as_str(),
                    after.message
                );
                publish(
                    ctx,
                    domain,
                    EventType::Warning,
                    "RecordDisappeared",
                    "CheckDNS",
                    note,
                )
                .await;
            }
            (before, ConditionStatus::True) if before != Some(ConditionStatus::True) => {
                let note = format!("{}: {}", type_.as_str(), after.message);
                publish(
                    ctx,
                    domain,
                    EventType::Normal,
                    "RecordVerified",
                    "CheckDNS",
                    note,
                )
                .await;
            }
            _ => {}
        }
    }
}

async fn publish(
    ctx: &Context,
    domain: &MailDomain,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = KubeEvent {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &domain.object_ref(&())).await {
        tracing::warn!(error = %err, reason, "could not publish event");
    }
}

/// Keeps the key metrics in step with this domain's keys.
fn record_key_states(domain: &MailDomain, desired: &MailDomainStatus, ctx: &Context) {
    let keys = desired.dkim.as_ref().map_or(&[][..], |d| d.keys.as_slice());
    ctx.metrics.keys.record(inventory_key(domain), keys);
}

fn inventory_key(domain: &MailDomain) -> String {
    format!(
        "{}/{}",
        domain.namespace().unwrap_or_default(),
        domain.name_any()
    )
}
