//! The relay projection: each MailRelay's domain shards, kept equal to a
//! pure function of the index (see [`super::membership`]), rewritten in
//! proportion to what changed.
//!
//! A change (a MailDomain, one of its Secrets, a relay, a namespace's
//! labels) marks the MailDomains it concerns; each marked one is decided
//! again, only if what it is decided from changed; the shard buckets whose
//! content changed are written, each its own small Secret in the relay's
//! namespace, where the relay watches them. Nothing else renders domains
//! for a relay.
//!
//! What each relay serves and leaves out (with the reason) is kept here for
//! the MailRelay's status and for each MailDomain's `RelayAccepted`.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, Resource, ResourceExt};

use super::index::{Change, Index};
use super::membership::{Candidate, DomainConfig, LeftOut, membership, relay_of};
use super::relay_objects;
use super::secrets;
use super::{Error, FIELD_MANAGER};
use crate::api::{MailDomain, MailRelay};
use crate::relay::config::{DomainShard, shard_of};
use crate::telemetry::ControllerMetrics;

/// Changes arriving within this long of each other are decided and written
/// together (an onboarding or rotation wave touches many domains at once).
const BATCH_WINDOW: Duration = Duration::from_millis(200);

/// The most one shard Secret holds; the API server's limit is 1 MiB.
pub const SHARD_BUDGET: usize = 900 * 1024;

/// What one relay serves and leaves out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelaySummary {
    pub served: usize,
    /// `namespace/name`, domain and why, for MailDomains the relay does not
    /// serve for a reason their own status does not already explain.
    pub left_out: Vec<(String, String, LeftOut)>,
}

struct Member {
    /// What the decision was made from; the same inputs decide the same.
    inputs: u64,
    domain: String,
    bucket: u8,
    created: Option<jiff::Timestamp>,
    outcome: Result<Arc<DomainConfig>, LeftOut>,
}

#[derive(Default)]
struct RelayState {
    members: HashMap<ObjectRef<MailDomain>, Member>,
    /// Buckets whose shard must be rendered and compared again.
    dirty: BTreeSet<u8>,
    /// Members the budget of their bucket left out.
    full: HashSet<ObjectRef<MailDomain>>,
    /// By bucket, the members of the shard the relay has been given (as of
    /// the last write that succeeded).
    written: HashMap<u8, HashSet<ObjectRef<MailDomain>>>,
    /// Members of a bucket being written, served once the write succeeds.
    pending: HashMap<u8, Vec<ObjectRef<MailDomain>>>,
}

#[derive(Default)]
struct State {
    relays: HashMap<ObjectRef<MailRelay>, RelayState>,
    /// Which relay each MailDomain was last decided for.
    relay_of: HashMap<ObjectRef<MailDomain>, ObjectRef<MailRelay>>,
    summaries: HashMap<ObjectRef<MailRelay>, RelaySummary>,
}

/// The projection, shared by the controllers (for what it serves) and run
/// as its own task (for what it writes).
pub struct Projection {
    index: Index,
    state: Mutex<State>,
    /// Woken after every write, for [`Projection::until_not_served`].
    written: tokio::sync::Notify,
    relay_triggers: UnboundedSender<ObjectRef<MailRelay>>,
    domain_triggers: UnboundedSender<ObjectRef<MailDomain>>,
}

impl Projection {
    pub fn new(
        index: Index,
        relay_triggers: UnboundedSender<ObjectRef<MailRelay>>,
        domain_triggers: UnboundedSender<ObjectRef<MailDomain>>,
    ) -> Self {
        Self {
            index,
            state: Mutex::default(),
            written: tokio::sync::Notify::new(),
            relay_triggers,
            domain_triggers,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the relay has been given this MailDomain (it is in a written
    /// shard). A MailDomain being deleted waits until it is not.
    pub fn is_served(&self, md: &ObjectRef<MailDomain>) -> bool {
        // Any relay: one it just left may still carry it.
        self.lock()
            .relays
            .values()
            .any(|relay| relay.written.values().any(|members| members.contains(md)))
    }

    /// Waits until no relay carries this MailDomain any more, at most
    /// `limit`; returns whether it is gone.
    pub async fn until_not_served(&self, md: &ObjectRef<MailDomain>, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let written = self.written.notified();
            if !self.is_served(md) {
                return true;
            }
            if tokio::time::timeout_at(deadline, written).await.is_err() {
                return !self.is_served(md);
            }
        }
    }

    /// Whether the relay's config has no room for this MailDomain.
    pub fn is_left_out_for_room(&self, md: &ObjectRef<MailDomain>) -> bool {
        let state = self.lock();
        state
            .relay_of
            .get(md)
            .and_then(|relay| state.relays.get(relay))
            .is_some_and(|relay| relay.full.contains(md))
    }

    /// What a relay serves and leaves out, as of the last write.
    pub fn summary(&self, relay: &ObjectRef<MailRelay>) -> RelaySummary {
        self.lock()
            .summaries
            .get(relay)
            .cloned()
            .unwrap_or_default()
    }

    /// Runs until `changes` ends: decides and writes after each batch.
    pub async fn run(
        self: Arc<Self>,
        client: Client,
        mut changes: UnboundedReceiver<Change>,
        metrics: Arc<ControllerMetrics>,
    ) {
        // Nothing is written before every store has listed once: a shard
        // written from a half-listed index would drop served domains.
        self.index.ready().await;
        let mut pending: HashSet<Change> = HashSet::from([Change::Resync]);
        let mut retry = false;
        loop {
            // Take what arrived together; the first change of a batch is
            // awaited, the rest collected for BATCH_WINDOW.
            if pending.is_empty() && !retry {
                match changes.next().await {
                    Some(change) => {
                        pending.insert(change);
                    }
                    None => return,
                }
            }
            let window = tokio::time::sleep(BATCH_WINDOW);
            tokio::pin!(window);
            loop {
                tokio::select! {
                    () = &mut window => break,
                    change = changes.next() => match change {
                        Some(change) => { pending.insert(change); }
                        None => break,
                    },
                }
            }
            let batch = std::mem::take(&mut pending);
            self.decide(batch);
            retry = false;
            if let Err(error) = self.write(&client, &metrics).await {
                tracing::warn!(%error, "writing relay config shards failed; retrying");
                metrics
                    .reconcile_errors
                    .get_or_create(&crate::telemetry::ReasonLabel {
                        reason: error.reason().to_string(),
                    })
                    .inc();
                // What was decided is kept; the buckets still dirty are
                // written on the next round.
                retry = true;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }

    /// The MailDomains a batch of changes concerns, decided again.
    fn decide(&self, batch: HashSet<Change>) {
        let mut domains: HashSet<ObjectRef<MailDomain>> = HashSet::new();
        let mut full = false;
        for change in batch {
            match change {
                Change::Domain(md) | Change::DomainSecret(md) => {
                    domains.insert(md);
                }
                Change::RelayConfig(relay, bucket) => {
                    // A shard Secret changed: ours (nothing to do once it is
                    // compared again) or someone else's (written back).
                    if let Some(bucket) = bucket {
                        self.lock()
                            .relays
                            .entry(relay)
                            .or_default()
                            .dirty
                            .insert(bucket);
                    }
                }
                Change::Relay(relay) => {
                    // Its limits and admission shape every member's entry.
                    domains.extend(
                        self.index
                            .domains_of_relay(&relay)
                            .iter()
                            .map(|md| ObjectRef::from_obj(&**md)),
                    );
                }
                Change::Namespace(namespace) => domains.extend(
                    self.index
                        .domains
                        .state()
                        .iter()
                        .filter(|md| md.namespace().as_deref() == Some(namespace.as_str()))
                        .map(|md| ObjectRef::from_obj(&**md)),
                ),
                Change::Resync => full = true,
            }
        }
        if full {
            let mut state = self.lock();
            domains.extend(state.relay_of.keys().cloned());
            for relay in state.relays.values_mut() {
                relay.dirty.extend(relay.members.values().map(|m| m.bucket));
            }
            drop(state);
            domains.extend(
                self.index
                    .domains
                    .state()
                    .iter()
                    .map(|md| ObjectRef::from_obj(&**md)),
            );
        }
        for md in domains {
            self.decide_one(&md);
        }
    }

    /// Decides one MailDomain again, if what it is decided from changed.
    fn decide_one(&self, md_ref: &ObjectRef<MailDomain>) {
        let md = self.index.domains.get(md_ref);
        let relay_ref = md.as_deref().and_then(relay_of);
        let mut state = self.lock();
        // A MailDomain that left its relay (deleted, or relayRef changed)
        // leaves that relay's shard.
        if let Some(previous) = state.relay_of.get(md_ref).cloned()
            && Some(&previous) != relay_ref.as_ref()
        {
            if let Some(relay) = state.relays.get_mut(&previous)
                && let Some(member) = relay.members.remove(md_ref)
            {
                relay.dirty.insert(member.bucket);
            }
            state.relay_of.remove(md_ref);
        }
        let (Some(md), Some(relay_ref)) = (md, relay_ref) else {
            return;
        };
        drop(state);

        let relay = self.index.relay(&relay_ref);
        let namespace = md.namespace().unwrap_or_default();
        let labels = self.index.namespace_labels(&namespace);
        let key_secret = self
            .index
            .secret(&namespace, &secrets::keys_secret_name(&md));
        let credentials = self
            .index
            .secret(&namespace, &secrets::credentials_secret_name(&md));
        let inputs = fingerprint(
            &md,
            relay.as_deref(),
            &labels,
            key_secret.as_deref(),
            credentials.as_deref(),
        );
        {
            let state = self.lock();
            if state
                .relays
                .get(&relay_ref)
                .and_then(|r| r.members.get(md_ref))
                .is_some_and(|member| member.inputs == inputs)
            {
                return;
            }
        }
        let outcome = membership(&Candidate {
            domain: &md,
            relay: relay.as_deref(),
            namespace_labels: &labels,
            key_secret: key_secret.as_deref(),
            credentials_secret: credentials.as_deref(),
        })
        .map(Arc::new);
        let domain = md.spec.domain.clone();
        let bucket = shard_of(&domain);
        let mut state = self.lock();
        state.relay_of.insert(md_ref.clone(), relay_ref.clone());
        let relay_state = state.relays.entry(relay_ref).or_default();
        let changed = relay_state.members.get(md_ref).is_none_or(|old| {
            old.outcome != outcome || old.bucket != bucket || old.domain != domain
        });
        if changed {
            relay_state.dirty.insert(bucket);
        }
        relay_state.members.insert(
            md_ref.clone(),
            Member {
                inputs,
                domain,
                bucket,
                created: md.meta().creation_timestamp.as_ref().map(|t| t.0),
                outcome,
            },
        );
    }

    /// Renders and writes every dirty bucket of every relay.
    async fn write(&self, client: &Client, metrics: &ControllerMetrics) -> Result<(), Error> {
        let relays: Vec<ObjectRef<MailRelay>> = {
            let state = self.lock();
            state
                .relays
                .iter()
                .filter(|(_, relay)| !relay.dirty.is_empty())
                .map(|(r, _)| r.clone())
                .collect()
        };
        for relay_ref in relays {
            let Some(relay) = self.index.relay(&relay_ref) else {
                // The relay is gone; its Secrets go with it (owner reference).
                let mut state = self.lock();
                state.relays.remove(&relay_ref);
                state.summaries.remove(&relay_ref);
                continue;
            };
            let shards = self.render(&relay_ref);
            for (bucket, shard) in shards {
                self.write_bucket(client, &relay, bucket, shard, metrics)
                    .await?;
                let mut state = self.lock();
                if let Some(r) = state.relays.get_mut(&relay_ref) {
                    r.dirty.remove(&bucket);
                }
            }
            self.summarise(&relay_ref);
        }
        Ok(())
    }

    /// The content of each dirty bucket: its served members, oldest first
    /// within the budget, one per domain (the claim owner, decided by the
    /// MailDomains' own conditions; a second one is a conflict).
    fn render(&self, relay_ref: &ObjectRef<MailRelay>) -> Vec<(u8, Option<Vec<u8>>)> {
        let mut state = self.lock();
        let Some(relay) = state.relays.get_mut(relay_ref) else {
            return Vec::new();
        };
        let dirty: Vec<u8> = relay.dirty.iter().copied().collect();
        let mut rendered = Vec::with_capacity(dirty.len());
        for bucket in dirty {
            let mut members: Vec<(&ObjectRef<MailDomain>, &Member)> = relay
                .members
                .iter()
                .filter(|(_, m)| m.bucket == bucket && m.outcome.is_ok())
                .collect();
            members.sort_by(|a, b| {
                (a.1.created, &a.0.namespace, &a.0.name).cmp(&(
                    b.1.created,
                    &b.0.namespace,
                    &b.0.name,
                ))
            });
            let mut seen_domains = BTreeSet::new();
            let mut shard = DomainShard::default();
            let mut used = 64;
            let mut kept = Vec::new();
            let mut full = Vec::new();
            for (md, member) in members {
                let Ok(config) = &member.outcome else {
                    continue;
                };
                if !seen_domains.insert(member.domain.clone()) {
                    continue;
                }
                let (entry, tenant) = &**config;
                let size = serde_json::to_vec(entry).map_or(0, |v| v.len())
                    + serde_json::to_vec(tenant).map_or(0, |v| v.len())
                    + 8;
                if used + size > SHARD_BUDGET {
                    full.push(md.clone());
                    continue;
                }
                used += size;
                shard.domains.push(entry.clone());
                shard.tenants.push(tenant.clone());
                kept.push(md.clone());
            }
            relay
                .full
                .retain(|md| relay.members.get(md).is_some_and(|m| m.bucket != bucket));
            relay.full.extend(full);
            // Marked written only once the write succeeds (see write_bucket).
            let bytes = if shard.domains.is_empty() {
                None
            } else {
                shard.domains.sort_by(|a, b| a.domain.cmp(&b.domain));
                shard.tenants.sort_by(|a, b| a.username.cmp(&b.username));
                serde_json::to_vec(&shard).ok()
            };
            relay.pending_written(bucket, kept);
            rendered.push((bucket, bytes));
        }
        rendered
    }

    async fn write_bucket(
        &self,
        client: &Client,
        relay: &MailRelay,
        bucket: u8,
        shard: Option<Vec<u8>>,
        metrics: &ControllerMetrics,
    ) -> Result<(), Error> {
        let namespace = relay.namespace().ok_or(Error::NotNamespaced)?;
        let name = relay_objects::shard_secret_name(relay, bucket);
        let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let existing = self.index.secret(&namespace, &name);
        match shard {
            Some(bytes) => {
                let desired = relay_objects::shard_secret(relay, bucket, bytes);
                let same = existing.as_ref().is_some_and(|secret| {
                    secret.data == desired.data && secret.labels() == desired.labels()
                });
                if !same {
                    api.patch(
                        &name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&desired),
                    )
                    .await?;
                    metrics.secret_writes.inc();
                }
            }
            None => {
                if existing.is_some() {
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {
                            metrics.secret_writes.inc();
                        }
                        Err(kube::Error::Api(status)) if status.code == 404 => {}
                        Err(error) => return Err(error.into()),
                    }
                }
            }
        }
        let mut state = self.lock();
        if let Some(r) = state.relays.get_mut(&ObjectRef::from_obj(relay)) {
            r.commit_written(bucket);
        }
        drop(state);
        self.written.notify_waiters();
        Ok(())
    }

    /// Updates a relay's summary, and tells whoever shows it when it changed.
    fn summarise(&self, relay_ref: &ObjectRef<MailRelay>) {
        let mut state = self.lock();
        let Some(relay) = state.relays.get(relay_ref) else {
            return;
        };
        let mut left_out: Vec<(String, String, LeftOut)> = relay
            .members
            .iter()
            .filter_map(|(md, member)| {
                let why = match &member.outcome {
                    Err(why) if !why.is_routine() => why.clone(),
                    Ok(_) if relay.full.contains(md) => LeftOut::ConfigFull,
                    _ => return None,
                };
                Some((
                    format!(
                        "{}/{}",
                        md.namespace.as_deref().unwrap_or_default(),
                        md.name
                    ),
                    member.domain.clone(),
                    why,
                ))
            })
            .collect();
        left_out.sort_by(|a, b| a.0.cmp(&b.0));
        let full: Vec<ObjectRef<MailDomain>> = relay.full.iter().cloned().collect();
        let summary = RelaySummary {
            served: relay.written.values().map(HashSet::len).sum(),
            left_out,
        };
        let changed = state.summaries.get(relay_ref) != Some(&summary);
        state.summaries.insert(relay_ref.clone(), summary);
        drop(state);
        if changed {
            let _ = self.relay_triggers.unbounded_send(relay_ref.clone());
            for md in full {
                let _ = self.domain_triggers.unbounded_send(md);
            }
        }
    }
}

impl RelayState {
    /// Remembers which members a bucket's write will carry.
    fn pending_written(&mut self, bucket: u8, kept: Vec<ObjectRef<MailDomain>>) {
        self.pending.insert(bucket, kept);
    }

    /// The bucket's write succeeded: its members are what is served.
    fn commit_written(&mut self, bucket: u8) {
        if let Some(kept) = self.pending.remove(&bucket) {
            self.written.insert(bucket, kept.into_iter().collect());
        }
    }
}

/// A hash of everything [`membership`] looks at.
fn fingerprint(
    md: &MailDomain,
    relay: Option<&MailRelay>,
    labels: &BTreeMap<String, String>,
    key_secret: Option<&Secret>,
    credentials: Option<&Secret>,
) -> u64 {
    let mut hasher = DefaultHasher::new();
    md.resource_version().hash(&mut hasher);
    md.meta().deletion_timestamp.is_some().hash(&mut hasher);
    relay.map(|r| r.resource_version()).hash(&mut hasher);
    labels.hash(&mut hasher);
    key_secret.map(|s| s.resource_version()).hash(&mut hasher);
    credentials.map(|s| s.resource_version()).hash(&mut hasher);
    hasher.finish()
}
