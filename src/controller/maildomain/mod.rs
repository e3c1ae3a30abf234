//! The MailDomain controller: observe, decide, act.
//!
//! - **Observe**: the object (from the index), its key and credentials
//!   Secrets, its relay and namespace (from the index), the other claimants
//!   of its domain, and the DNS outcomes (checked when due, see
//!   [`DnsMemo`]). The Secrets are first taken from the index; a decision
//!   that would write or generate anything is made again from the API
//!   server's copies (a just-stored key must not look missing), so only a
//!   reconcile that changes nothing rests on the cache.
//! - **Decide**: [`decide::decide`], pure, returns the writes in order, the
//!   status, the events and when to look again.
//! - **Act**: carry out the writes in order; if one fails, decide again
//!   with the failure as an observation and carry that out, so a failing
//!   step still ends in a status that says what is wrong.

pub mod decide;
pub mod dns_publish;

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::Event as KubeEvent;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use self::decide::{Fresh, KeySecret, Needs, Observed, RelayView, Write};
use super::membership::{admission, relay_id, relay_of};
use super::secrets;
use super::status::write_if_changed;
use super::{Context, Error, FIELD_MANAGER};
use crate::api::{
    Condition, ConditionStatus, ConditionType, DeletionPolicy, DnsRecordStatus, MailDomain, Reason,
    RecordState,
};
use crate::dkim::{self, GeneratedKey, NewKey};
use crate::dns::{self, ExpectedRecord, RecordOutcome};

/// Finalizer that lets cleanup run (key Secret, relays) before deletion.
pub const FINALIZER: &str = "mailauth.dev/cleanup";

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

/// Runs the controller until `shutdown` resolves: driven by the index's
/// MailDomains, by what they depend on (`triggers`) and by the clock.
pub async fn run(
    ctx: Arc<Context>,
    domains: impl Stream<Item = Result<MailDomain, watcher::Error>> + Send + 'static,
    triggers: impl Stream<Item = ObjectRef<MailDomain>> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let store = ctx.index().domains.clone();
    let clock_ticks = ctx.clock.ticks();
    Controller::for_stream(domains, store)
        .with_config(ControllerConfig::default().concurrency(ctx.settings.concurrency))
        .reconcile_on(triggers)
        .reconcile_all_on(clock_ticks)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "reconcile did not complete");
            }
        })
        .await;
}

fn error_policy(domain: Arc<MailDomain>, error: &Error, ctx: Arc<Context>) -> Action {
    let label = crate::telemetry::ReasonLabel {
        reason: error.reason().to_string(),
    };
    ctx.metrics.reconcile_errors.get_or_create(&label).inc();
    tracing::warn!(maildomain = %domain.name_any(), namespace = ?domain.namespace(), reason = error.reason(), error = %error, "reconcile failed");
    Action::requeue(Duration::from_secs(15))
}

async fn reconcile(domain: Arc<MailDomain>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = domain.namespace().ok_or(Error::NotNamespaced)?;
    let api: Api<MailDomain> = Api::namespaced(ctx.client.clone(), &namespace);
    let result = finalizer(&api, FINALIZER, domain.clone(), |event| async {
        match event {
            Finalizer::Apply(domain) => apply(&domain, &ctx).await,
            Finalizer::Cleanup(domain) => cleanup(&domain, &ctx).await,
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
        Err(FinalizerError::ApplyFailed(err)) => {
            report_failure(&domain, &err, &ctx).await;
            Err(err)
        }
        Err(FinalizerError::CleanupFailed(err)) => Err(err),
        Err(other) => Err(Error::Finalizer(other.to_string())),
    }
}

/// A reconcile that failed for a reason that will not pass by itself (the
/// API server refused a request: RBAC, validation) still says so in
/// `Ready`, so a stale `Ready=True` never outlives the problem. Transient
/// failures (timeouts, 5xx, conflicts) are retried without touching status.
async fn report_failure(domain: &MailDomain, error: &Error, ctx: &Context) {
    let lasting = match error {
        Error::Kube(kube::Error::Api(status)) => {
            (400..500).contains(&status.code) && ![404, 409, 429].contains(&status.code)
        }
        Error::Kube(_) | Error::KeyGenerationTask(_) => false,
        _ => true,
    };
    let Some(namespace) = domain.namespace() else {
        return;
    };
    if !lasting {
        return;
    }
    let message = format!("the operator cannot reconcile this MailDomain: {error}");
    if let Err(error) =
        write_not_ready(domain, &namespace, Reason::ReconcileFailed, message, ctx).await
    {
        tracing::warn!(%error, "could not record the failed reconcile in status");
    }
}

/// Sets `Ready=False` with `reason` and `message` in the status (and the
/// observed generation), leaving the rest as it is.
async fn write_not_ready(
    domain: &MailDomain,
    namespace: &str,
    reason: Reason,
    message: String,
    ctx: &Context,
) -> Result<bool, kube::Error> {
    let mut status = domain.status.clone().unwrap_or_default();
    Condition::upsert(
        &mut status.conditions,
        Condition::new(
            ConditionType::Ready,
            ConditionStatus::False,
            reason,
            message,
            domain.meta().generation,
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(ctx.clock.now()),
        ),
    );
    status.observed_generation = domain.meta().generation;
    let api: Api<MailDomain> = Api::namespaced(ctx.client.clone(), namespace);
    write_if_changed(
        &api,
        domain,
        domain.status.as_ref(),
        &status,
        &ctx.metrics.status_writes,
    )
    .await
}

/// The MailDomain's Secrets, as the shell read them.
struct Reads {
    keys: Option<Secret>,
    credentials: Option<Secret>,
}

impl Reads {
    /// The index's copies: what the watch last delivered.
    fn cached(domain: &MailDomain, namespace: &str, ctx: &Context) -> Self {
        let index = ctx.index();
        let copy = |name: String| index.secret(namespace, &name).map(|s| (*s).clone());
        Self {
            keys: copy(secrets::keys_secret_name(domain)),
            credentials: copy(secrets::credentials_secret_name(domain)),
        }
    }

    /// The API server's copies (a just-stored key must not look missing).
    async fn fetch(domain: &MailDomain, api: &Api<Secret>) -> Result<Self, Error> {
        Ok(Self {
            keys: api.get_opt(&secrets::keys_secret_name(domain)).await?,
            credentials: api
                .get_opt(&secrets::credentials_secret_name(domain))
                .await?,
        })
    }

    fn key_secret(&self, domain: &MailDomain) -> KeySecret<'_> {
        match &self.keys {
            None => KeySecret::Absent,
            Some(secret) if secrets::is_ours(secret, domain) => KeySecret::Ours(secret),
            Some(_) => KeySecret::NotOurs,
        }
    }
}

/// What a decision sees besides the Secrets: the relay and its admission,
/// the other claimants, the room in the relay's config (all from the index).
struct Around {
    relay: Option<Arc<crate::api::MailRelay>>,
    relay_requested: bool,
    relay_name: String,
    labels: std::collections::BTreeMap<String, String>,
    refused: Option<String>,
    claimants: Vec<Arc<MailDomain>>,
    no_room: bool,
}

impl Around {
    fn of(domain: &MailDomain, namespace: &str, ctx: &Context) -> Self {
        let index = ctx.index();
        let relay_ref = relay_of(domain);
        let relay = relay_ref.as_ref().and_then(|r| index.relay(r));
        let labels = index.namespace_labels(namespace);
        let refused = relay
            .as_ref()
            .and_then(|relay| admission(relay, namespace, &labels).err());
        Self {
            relay_requested: relay_ref.is_some(),
            relay_name: relay_ref.as_ref().map(relay_id).unwrap_or_default(),
            relay,
            labels,
            refused,
            claimants: index.claimants(&domain.spec.domain),
            no_room: ctx
                .projection()
                .is_left_out_for_room(&ObjectRef::from_obj(domain)),
        }
    }

    fn observed<'a>(
        &'a self,
        domain: &'a MailDomain,
        now: Timestamp,
        reads: &'a Reads,
        dns: &'a [RecordOutcome],
        publishing: &'a dns_publish::Publishing,
        delegation: &'a dns_publish::Delegation,
    ) -> Observed<'a> {
        Observed {
            domain,
            now,
            keys: reads.key_secret(domain),
            credentials: reads.credentials.as_ref(),
            relay: self.relay_view(),
            dns,
            claimants: &self.claimants,
            no_room: self.no_room,
            publishing,
            delegation,
        }
    }

    fn relay_view(&self) -> RelayView<'_> {
        match (self.relay_requested, &self.relay, &self.refused) {
            (false, _, _) => RelayView::NotRequested,
            (true, None, _) => RelayView::NotFound {
                relay: &self.relay_name,
            },
            (true, Some(_), Some(why)) => RelayView::Refused { why },
            (true, Some(relay), None) => RelayView::Admitted {
                relay,
                namespace_labels: &self.labels,
            },
        }
    }
}

async fn apply(domain: &MailDomain, ctx: &Context) -> Result<Action, Error> {
    let namespace = domain.namespace().ok_or(Error::NotNamespaced)?;
    // A public suffix (`com`, `co.uk`, ...) is nobody's own domain: no key
    // is made for it and nothing is published.
    if dns::dmarc::organizational_domain(&domain.spec.domain).is_none() {
        return not_own_domain(domain, &namespace, ctx).await;
    }
    let now = ctx.clock.now();
    let around = Around::of(domain, &namespace, ctx);
    let previous_records = domain
        .status
        .as_ref()
        .map(|s| s.records.as_slice())
        .unwrap_or_default();
    let delegation = dns_publish::delegation(domain, &namespace, ctx).await;
    let observe = async |reads: &Reads| {
        let expected = decide::records_to_check(
            domain,
            reads.key_secret(domain),
            &around.relay_view(),
            &delegation,
        );
        dns_outcomes(domain, &expected, previous_records, now, ctx).await
    };
    // Most reconciles change nothing (our own writes coming back, the
    // periodic DNS recheck): decided from the index's copies of the
    // Secrets, they cost no read. A reconcile that would write anything,
    // or generate anything, is decided again below from the API server's
    // copies, so no write rests on a cache that may lag behind it.
    let cached = Reads::cached(domain, &namespace, ctx);
    let mut outcomes = observe(&cached).await;
    // Publishing acts on DNS, not on the API server: it follows what the
    // check found, and what it wrote is checked again at once, through the
    // resolver, so the decision sees the records as receivers will.
    let publishing =
        dns_publish::publish_records(domain, &namespace, &outcomes, &delegation, ctx).await;
    if matches!(
        publishing,
        dns_publish::Publishing::Provider { wrote: true, .. }
    ) {
        ctx.dns_memo.forget(&ObjectRef::from_obj(domain));
        outcomes = observe(&cached).await;
    }
    let settled = around.observed(domain, now, &cached, &outcomes, &publishing, &delegation);
    if decide::needs(&settled)?.is_empty() {
        let decision = decide::decide(&settled, &Fresh::default())?;
        if decision.writes.is_empty() && decision.events.is_empty() {
            return Ok(finish(domain, &decision, now, ctx));
        }
    }

    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let reads = Reads::fetch(domain, &secrets_api).await?;
    let outcomes = observe(&reads).await;
    let observed = around.observed(domain, now, &reads, &outcomes, &publishing, &delegation);

    let Needs { keys, password } = decide::needs(&observed)?;
    // Generating is the one step that is not idempotent (new random keys
    // or a new password), so it must never act on a stale copy: a
    // reconcile set off by our own Secret write can run before the watch
    // has delivered the status we just wrote, and would generate a second
    // key, or a second password that a status write losing the race then
    // records as the first's hash (the credentials then look tampered).
    if (!keys.is_empty() || password) && is_stale(domain, ctx).await? {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let mut fresh = Fresh::default();
    if !keys.is_empty() {
        match generate(keys, ctx).await {
            Ok(generated) => fresh.keys = generated,
            Err(error) => fresh.keys_failed = Some(error.to_string()),
        }
    }
    if password {
        fresh.password = Some(secrets::new_password().map_err(|_| Error::Random)?);
    }

    let mut decision = decide::decide(&observed, &fresh)?;
    let mut done = 0;
    while done < decision.writes.len() {
        match carry_out(
            &decision.writes[done],
            domain,
            reads.keys.as_ref(),
            &secrets_api,
            ctx,
        )
        .await
        {
            Ok(()) => done += 1,
            Err(error) => {
                // Decide again with the failure known, and carry out what
                // that decision adds after the writes already made.
                let failed = &decision.writes[done];
                match failed {
                    Write::StoreKeys(_) if fresh.keys_failed.is_none() => {
                        fresh.keys_failed = Some(format!("storing the keys: {error}"));
                    }
                    Write::StoreCredentials { .. } if fresh.credentials_failed.is_none() => {
                        fresh.credentials_failed =
                            Some(format!("storing the credentials: {error}"));
                    }
                    _ => return Err(error),
                }
                let made = decision.writes[..done].to_vec();
                decision = decide::decide(&observed, &fresh)?;
                decision.writes.retain(|write| !made.contains(write));
                done = 0;
            }
        }
    }
    ctx.metrics.keys_generated.inc_by(fresh.keys.len() as u64);
    if fresh.keys_failed.is_none() && decision.rotations > 0 {
        ctx.metrics.rotations.inc();
    }
    for note in &decision.events {
        publish(ctx, domain, note).await;
    }
    Ok(finish(domain, &decision, now, ctx))
}

/// Says in `Ready` that the domain is a public suffix, and does nothing else.
async fn not_own_domain(
    domain: &MailDomain,
    namespace: &str,
    ctx: &Context,
) -> Result<Action, Error> {
    let message = format!(
        "{} is a public suffix (Public Suffix List), not a domain a client can own: use the client's own domain, such as acme.{}",
        domain.spec.domain, domain.spec.domain
    );
    write_not_ready(domain, namespace, Reason::NotOwnDomain, message, ctx).await?;
    ctx.metrics.reconciles.inc();
    Ok(Action::await_change())
}

/// What every reconcile ends with: the metrics, and when to look again.
fn finish(
    domain: &MailDomain,
    decision: &decide::Decision,
    now: Timestamp,
    ctx: &Context,
) -> Action {
    ctx.metrics.reconciles.inc();
    ctx.metrics
        .keys
        .record(inventory_key(domain), decide::keys_of(&decision.status));
    let next_check = ctx
        .dns_memo
        .get(&ObjectRef::from_obj(domain))
        .map(|memo| memo.next_check);
    let wake = [decision.wake_at, next_check].into_iter().flatten().min();
    match wake {
        Some(at) => Action::requeue(until(now, at)),
        None => Action::requeue(ctx.settings.recheck_interval),
    }
}

/// One write of a decision.
async fn carry_out(
    write: &Write,
    domain: &MailDomain,
    keys_read: Option<&Secret>,
    secrets_api: &Api<Secret>,
    ctx: &Context,
) -> Result<(), Error> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    match write {
        Write::StoreKeys(record) | Write::RemovePrivateKeys(record) => {
            let secret = secrets::keys_secret(domain, &record.entries, &record.ledger);
            let name = secrets::keys_secret_name(domain);
            let taken_over = keys_read.is_some_and(|read| !secrets::is_owned_by(read, domain));
            if matches!(write, Write::StoreKeys(_)) && !taken_over {
                secrets_api
                    .patch(&name, &apply, &Patch::Apply(&secret))
                    .await?;
            } else {
                // Removing entries, or taking over a Secret an earlier
                // MailDomain (or a restore) wrote: fields another field
                // manager owns would survive an apply that leaves them
                // out (a second controller owner, a removed key), so the
                // Secret is patched to exactly what is wanted, with every
                // entry that must go named.
                let patch = secrets::exact_patch(&secret, keys_read);
                secrets_api
                    .patch(
                        &name,
                        &PatchParams {
                            field_manager: Some(FIELD_MANAGER.into()),
                            ..PatchParams::default()
                        },
                        &Patch::Merge(&patch),
                    )
                    .await?;
            }
            ctx.metrics.secret_writes.inc();
        }
        Write::StoreCredentials {
            username,
            password,
            host,
            port,
        } => {
            let secret = secrets::credentials_secret(domain, host, *port, username, password);
            secrets_api
                .patch(
                    &secrets::credentials_secret_name(domain),
                    &apply,
                    &Patch::Apply(&secret),
                )
                .await?;
            ctx.metrics.secret_writes.inc();
        }
        Write::Status(status) => {
            let api: Api<MailDomain> = Api::namespaced(
                ctx.client.clone(),
                &domain.namespace().ok_or(Error::NotNamespaced)?,
            );
            write_if_changed(
                &api,
                domain,
                domain.status.as_ref(),
                status.as_ref(),
                &ctx.metrics.status_writes,
            )
            .await?;
        }
    }
    Ok(())
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

/// Generates keys on the bounded blocking pool.
async fn generate(requests: Vec<NewKey>, ctx: &Context) -> Result<Vec<(GeneratedKey, u32)>, Error> {
    let mut generated = Vec::with_capacity(requests.len());
    for request in requests {
        let _permit = ctx
            .key_generation
            .acquire()
            .await
            .map_err(|_| Error::Finalizer("shutting down".into()))?;
        let generation = request.generation;
        let key = tokio::task::spawn_blocking(move || dkim::generate(&request)).await??;
        generated.push((key, generation));
    }
    Ok(generated)
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    let wait = at.duration_since(now);
    Duration::try_from(wait)
        .unwrap_or(Duration::ZERO)
        .max(Duration::from_secs(1))
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
        // What is asked of the record too: a retired key's record keeps
        // its name and value but is no longer checked, and the memo must
        // not hand back outcomes that still ask for it.
        (
            &record.name,
            record.record_type.to_string(),
            &record.value,
            record.is_removable(),
        )
            .hash(&mut hasher);
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

async fn cleanup(domain: &MailDomain, ctx: &Context) -> Result<Action, Error> {
    let namespace = domain.namespace().ok_or(Error::NotNamespaced)?;
    let me = ObjectRef::from_obj(domain);
    // A reconcile queued before the finalizer came off can still find the
    // object in the index: if the API server no longer has it, its cleanup
    // is done, and its records are not removed from DNS a second time. (An
    // object of the same name made since is another one: its own cleanup
    // goes on as before.)
    let api: Api<MailDomain> = Api::namespaced(ctx.client.clone(), &namespace);
    if api.get_opt(&domain.name_any()).await?.is_none() {
        return Ok(Action::await_change());
    }
    // The domain leaves its relay before the finalizer lets go, so the relay
    // never signs for a domain that no longer exists: the projection sees
    // the deletion and rewrites the shard, and cleanup waits for that.
    if !ctx
        .projection()
        .until_not_served(&me, Duration::from_secs(30))
        .await
    {
        return Err(Error::StillServed);
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
    // The records the operator wrote go with the domain. A provider that
    // can no longer remove them does not keep the MailDomain from going:
    // the tenant is told which records stay.
    if let Err(why) = dns_publish::remove_all(domain, &namespace, ctx).await {
        let records: Vec<&str> = domain
            .status
            .iter()
            .flat_map(|s| s.published.iter().map(|r| r.name.as_str()))
            .collect();
        let note = decide::Note {
            warning: true,
            reason: "RecordsLeftInDNS",
            action: "Unpublish",
            message: format!("{why}: remove them by hand: {}", records.join(", ")),
        };
        publish(ctx, domain, &note).await;
    }
    ctx.dns_memo.forget(&me);
    ctx.metrics.keys.forget(&inventory_key(domain));
    Ok(Action::await_change())
}

async fn publish(ctx: &Context, domain: &MailDomain, note: &decide::Note) {
    let event = KubeEvent {
        type_: decide::event_type(note),
        reason: note.reason.to_string(),
        note: Some(note.message.clone()),
        action: note.action.to_string(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&event, &domain.object_ref(&())).await {
        tracing::warn!(error = %err, reason = note.reason, "could not publish event");
    }
}

fn inventory_key(domain: &MailDomain) -> String {
    format!(
        "{}/{}",
        domain.namespace().unwrap_or_default(),
        domain.name_any()
    )
}

/// The requests a reconcile makes, against a mock API server (as kube-rs's
/// controller-rs tests do): the order of writes is what makes a crash at
/// any point harmless, so it is pinned here request by request. Tests
/// against the real API server live in `tests/`.
#[cfg(test)]
mod mock_api_tests {
    use super::*;
    use crate::api::MailDomainSpec;
    use crate::controller::{ControllerArgs, ManualClock};
    use crate::telemetry::ControllerMetrics;
    use http::{Request, Response};
    use kube::client::Body;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn domain() -> MailDomain {
        let spec: MailDomainSpec = serde_json::from_value(serde_json::json!({
            "domain": "acme.example", "dkim": {"algorithm": "Ed25519"}
        }))
        .unwrap();
        let mut md = MailDomain::new("acme", spec);
        md.metadata.namespace = Some("tenant".into());
        md.metadata.uid = Some("uid-1".into());
        md.metadata.generation = Some(1);
        md.metadata.resource_version = Some("7".into());
        md
    }

    fn context() -> (Arc<Context>, Handle) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let clock = Arc::new(ManualClock::new(
            Timestamp::from_second(1_800_000_000).unwrap(),
        ));
        let metrics =
            ControllerMetrics::register(&mut prometheus_client::registry::Registry::default());
        let ctx = Context::new(client, clock, ControllerArgs::default(), metrics).unwrap();
        (Arc::new(ctx), handle)
    }

    #[tokio::test]
    async fn a_reconcile_that_changes_nothing_reads_nothing() {
        let (mut ctx, mut handle) = context();
        let mut secrets = Arc::get_mut(&mut ctx).unwrap().secrets_filled_by_test();
        let mut md = domain();
        no_dns_needed(&ctx, &md);
        let fresh = serde_json::to_value(&md).unwrap();
        let reconcile = tokio::spawn({
            let (ctx, md) = (ctx.clone(), md.clone());
            async move { apply(&md, &ctx).await }
        });
        answer(&mut handle, |_, _| not_found()).await;
        answer(&mut handle, |_, _| not_found()).await;
        answer(&mut handle, |_, _| json(200, fresh.clone())).await;
        let (_, stored) = answer(&mut handle, |_, body| json(201, body.clone())).await;
        let (_, status) = answer(&mut handle, |_, _| json(200, fresh.clone())).await;
        answer(&mut handle, |_, body| json(201, body.clone())).await;
        reconcile.await.unwrap().unwrap();

        // The watch brings back what was written; DNS says the new record
        // is missing: that changes the status, decided from fresh reads.
        let mut secret: Secret = serde_json::from_value(stored).unwrap();
        secret.metadata.namespace = Some("tenant".into());
        secrets.apply_watcher_event(&watcher::Event::Apply(secret.clone()));
        md.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
        let expected = decide::records_to_check(
            &md,
            KeySecret::Ours(&secret),
            &RelayView::NotRequested,
            &dns_publish::Delegation::NotRequested,
        );
        ctx.dns_memo.put(
            ObjectRef::from_obj(&md),
            MemoEntry {
                fingerprint: fingerprint(&expected),
                outcomes: expected
                    .iter()
                    .map(|record| RecordOutcome {
                        record: record.clone(),
                        verdict: Some(dns::Verdict::Missing {
                            reason: "no TXT".into(),
                        }),
                    })
                    .collect(),
                next_check: Timestamp::MAX,
            },
        );
        let reconcile = tokio::spawn({
            let (ctx, md) = (ctx.clone(), md.clone());
            async move { apply(&md, &ctx).await }
        });
        let stored = serde_json::to_value(&secret).unwrap();
        let (first, _) = answer(&mut handle, |_, _| json(200, stored.clone())).await;
        answer(&mut handle, |_, _| not_found()).await;
        let (write, status) = answer(&mut handle, |_, _| json(200, fresh.clone())).await;
        assert_eq!(
            (first, write),
            (format!("GET {KEYS}"), format!("PATCH {STATUS}"))
        );
        reconcile.await.unwrap().unwrap();

        // Now nothing is to change: nothing is read or written (with no
        // API server left, a request would fail the reconcile).
        md.status = Some(serde_json::from_value(status["status"].clone()).unwrap());
        drop(handle);
        apply(&md, &ctx)
            .await
            .expect("decided from the index, without a request");

        // The same reconcile with the Secret gone from the index reads.
        secrets.apply_watcher_event(&watcher::Event::Delete(secret));
        let error = apply(&md, &ctx).await.unwrap_err();
        assert!(matches!(error, Error::Kube(_)), "{error}");
    }

    /// The DNS check is not what these tests are about: answer it from the
    /// memo (nothing published yet).
    fn no_dns_needed(ctx: &Context, md: &MailDomain) {
        let expected = decide::records_to_check(
            md,
            KeySecret::Absent,
            &RelayView::NotRequested,
            &dns_publish::Delegation::NotRequested,
        );
        let outcomes = expected
            .iter()
            .map(|record| RecordOutcome {
                record: record.clone(),
                verdict: Some(dns::Verdict::Missing {
                    reason: "no TXT".into(),
                }),
            })
            .collect();
        ctx.dns_memo.put(
            ObjectRef::from_obj(md),
            MemoEntry {
                fingerprint: fingerprint(&expected),
                outcomes,
                next_check: Timestamp::MAX,
            },
        );
    }

    fn json(status: u16, value: serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&value).unwrap()))
            .unwrap()
    }

    fn not_found() -> Response<Body> {
        json(
            404,
            serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "NotFound", "code": 404, "message": "not found"}),
        )
    }

    /// Answers one request; returns "METHOD path" and the body sent.
    async fn answer(
        handle: &mut Handle,
        respond: impl FnOnce(&str, &serde_json::Value) -> Response<Body>,
    ) -> (String, serde_json::Value) {
        let (request, send) = handle.next_request().await.expect("a request");
        let line = format!("{} {}", request.method(), request.uri().path());
        let bytes = request.into_body().collect_bytes().await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        send.send_response(respond(&line, &body));
        (line, body)
    }

    const KEYS: &str = "/api/v1/namespaces/tenant/secrets/acme-dkim";
    const CREDENTIALS: &str = "/api/v1/namespaces/tenant/secrets/acme-smtp";
    const DOMAIN: &str = "/apis/mailauth.dev/v1alpha1/namespaces/tenant/maildomains/acme";
    const STATUS: &str = "/apis/mailauth.dev/v1alpha1/namespaces/tenant/maildomains/acme/status";

    #[tokio::test]
    async fn a_new_key_is_stored_before_the_status_names_it() {
        let (ctx, mut handle) = context();
        let md = domain();
        no_dns_needed(&ctx, &md);
        let reconcile = tokio::spawn({
            let (ctx, md) = (ctx.clone(), md.clone());
            async move { apply(&md, &ctx).await }
        });
        let fresh = serde_json::to_value(&md).unwrap();
        let mut seen = Vec::new();
        seen.push(answer(&mut handle, |_, _| not_found()).await);
        seen.push(answer(&mut handle, |_, _| not_found()).await);
        // The quorum read before generating: not stale.
        seen.push(answer(&mut handle, |_, _| json(200, fresh.clone())).await);
        seen.push(answer(&mut handle, |_, body| json(201, body.clone())).await);
        seen.push(answer(&mut handle, |_, _| json(200, fresh.clone())).await);
        let lines: Vec<&str> = seen.iter().map(|(line, _)| line.as_str()).collect();
        assert_eq!(
            lines,
            [
                format!("GET {KEYS}"),
                format!("GET {CREDENTIALS}"),
                format!("GET {DOMAIN}"),
                format!("PATCH {KEYS}"),
                format!("PATCH {STATUS}"),
            ]
        );
        let stored = &seen[3].1["data"];
        let status = &seen[4].1["status"];
        let selector = status["dkim"]["keys"][0]["selector"].as_str().unwrap();
        assert_eq!(status["dkim"]["keys"][0]["state"], "Pending");
        assert!(
            stored.get(format!("{selector}.pem")).is_some(),
            "the key the status names is the one stored before it"
        );
        // The KeyGenerated event goes out last.
        let (event, _) = answer(&mut handle, |_, body| json(201, body.clone())).await;
        assert!(event.starts_with("POST /apis/events.k8s.io/"), "{event}");
        reconcile.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_key_that_cannot_be_stored_is_not_named_and_status_says_why() {
        let (ctx, mut handle) = context();
        let md = domain();
        no_dns_needed(&ctx, &md);
        let reconcile = tokio::spawn({
            let (ctx, md) = (ctx.clone(), md.clone());
            async move { apply(&md, &ctx).await }
        });
        let fresh = serde_json::to_value(&md).unwrap();
        answer(&mut handle, |_, _| not_found()).await;
        answer(&mut handle, |_, _| not_found()).await;
        answer(&mut handle, |_, _| json(200, fresh.clone())).await;
        let (store, _) = answer(&mut handle, |_, _| {
            json(
                500,
                serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                   "reason": "InternalError", "code": 500, "message": "etcd is sad"}),
            )
        })
        .await;
        assert_eq!(store, format!("PATCH {KEYS}"));
        let (line, body) = answer(&mut handle, |_, _| json(200, fresh.clone())).await;
        assert_eq!(line, format!("PATCH {STATUS}"), "status is written even so");
        let status = &body["status"];
        assert!(
            status["dkim"]["keys"].as_array().is_none_or(Vec::is_empty),
            "no key that was not stored: {status}"
        );
        let conditions = status["conditions"].as_array().unwrap();
        let keys = conditions
            .iter()
            .find(|c| c["type"] == "KeysReady")
            .unwrap();
        assert_eq!(keys["reason"], "KeyGenerationFailed");
        assert!(keys["message"].as_str().unwrap().contains("etcd is sad"));
        let ready = conditions.iter().find(|c| c["type"] == "Ready").unwrap();
        assert_eq!(ready["status"], "False");
        // One warning event (no "KeyGenerated": no key was made), then done.
        let (event, body) = answer(&mut handle, |_, body| json(201, body.clone())).await;
        assert!(event.starts_with("POST "), "{event}");
        assert_eq!(body["reason"], "KeyGenerationFailed");
        reconcile.await.unwrap().unwrap();
    }
}
