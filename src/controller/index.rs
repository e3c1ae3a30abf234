//! The index: what the cluster looks like, kept apart from what we change.
//!
//! One watch per kind feeds one reflector store that every part of the
//! operator reads (the MailDomain controller, the MailRelay controller and
//! the relay projection), so 10,000 MailDomains and their Secrets are held
//! once, and nothing renders by listing and GETting on every event. Each
//! watch event is also fanned out, already applied to its store, as:
//!
//! - the objects that drive each controller (`Controller::for_stream`);
//! - MailDomains to reconcile because something they depend on changed
//!   (their Secrets, their relay, their namespace's labels, another
//!   MailDomain claiming the same domain);
//! - [`Change`]s for the relay projection.
//!
//! The watches are the operator's only reads of the cluster besides the
//! fresh reads a reconcile makes on purpose (the key Secret, before keys are
//! generated).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use futures::channel::mpsc::{UnboundedReceiver, UnboundedSender, unbounded};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};

use super::membership::relay_of;
use super::secrets::{MAILDOMAIN_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use crate::api::{DNSProvider, MailDomain, MailRelay};
use crate::relay::config::{RELAY_CONFIG_LABEL, RELAY_CONFIG_SHARD_LABEL};

/// Something the relay projection must look at again.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    /// A MailDomain changed or went away.
    Domain(ObjectRef<MailDomain>),
    /// One of a MailDomain's Secrets (keys, credentials) changed.
    DomainSecret(ObjectRef<MailDomain>),
    /// A MailRelay changed or went away.
    Relay(ObjectRef<MailRelay>),
    /// A relay's config Secret changed (ours, normally: checked for drift),
    /// with the shard bucket it holds.
    RelayConfig(ObjectRef<MailRelay>, Option<u8>),
    /// A namespace's labels may have changed.
    Namespace(String),
    /// A watch (re)listed everything.
    Resync,
}

/// The shared stores.
#[derive(Clone)]
pub struct Index {
    pub domains: Store<MailDomain>,
    /// Every Secret this operator manages (label
    /// `app.kubernetes.io/managed-by=mailauth-operator`), without
    /// `managedFields`.
    pub secrets: Store<Secret>,
    pub namespaces: Store<Namespace>,
    pub relays: Store<MailRelay>,
    /// DNSProviders: read by every reconcile that publishes, so a read
    /// costs no request, and a change reaches the MailDomains naming one.
    pub providers: Store<DNSProvider>,
    /// `spec.domain` → the MailDomains that claim it.
    claims: Arc<Mutex<Claims>>,
    /// The uid and generation each relay was last seen at: only a change of
    /// its spec (or a new object under its name) concerns its domains and
    /// its config, not a write of its status.
    relay_generations: Arc<Mutex<HashMap<ObjectRef<MailRelay>, SeenAt>>>,
}

/// A relay's uid and generation.
type SeenAt = (Option<String>, Option<i64>);

/// Who claims which domain, both ways, so noting a claim is O(1).
#[derive(Default)]
struct Claims {
    by_domain: HashMap<String, HashSet<ObjectRef<MailDomain>>>,
    by_object: HashMap<ObjectRef<MailDomain>, String>,
}

impl Index {
    /// Waits until every store has listed its kind once.
    pub async fn ready(&self) {
        let _ = tokio::join!(
            self.domains.wait_until_ready(),
            self.secrets.wait_until_ready(),
            self.namespaces.wait_until_ready(),
            self.relays.wait_until_ready(),
            self.providers.wait_until_ready(),
        );
    }

    /// The Secret `name` in `namespace`, if we manage it.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<Arc<Secret>> {
        self.secrets.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn relay(&self, relay: &ObjectRef<MailRelay>) -> Option<Arc<MailRelay>> {
        self.relays.get(relay)
    }

    /// The DNSProvider `name` in `namespace`, if it exists (and is in the
    /// operator's scope).
    pub fn provider(&self, namespace: &str, name: &str) -> Option<Arc<DNSProvider>> {
        self.providers.get(&ObjectRef::new(name).within(namespace))
    }

    /// The MailDomains that name a DNSProvider, for their records or for
    /// delegated DKIM.
    pub fn domains_of_provider(&self, provider: &ObjectRef<DNSProvider>) -> Vec<Arc<MailDomain>> {
        let names = |md: &MailDomain, r: &crate::api::ProviderRef| {
            r.name == provider.name
                && r.namespace.clone().or_else(|| md.namespace()) == provider.namespace
        };
        self.domains
            .state()
            .into_iter()
            .filter(|md| {
                md.spec
                    .dns
                    .provider_ref
                    .as_ref()
                    .is_some_and(|r| names(md, r))
                    || md
                        .spec
                        .dkim
                        .delegation
                        .as_ref()
                        .is_some_and(|d| names(md, &d.provider_ref))
            })
            .collect()
    }

    /// The labels of a namespace (empty when it is unknown).
    pub fn namespace_labels(&self, namespace: &str) -> BTreeMap<String, String> {
        self.namespaces
            .get(&ObjectRef::new(namespace))
            .map(|ns| ns.labels().clone())
            .unwrap_or_default()
    }

    /// Every MailDomain that claims `domain`.
    pub fn claimants(&self, domain: &str) -> Vec<Arc<MailDomain>> {
        let refs: Vec<ObjectRef<MailDomain>> = self
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .by_domain
            .get(domain)
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default();
        refs.iter().filter_map(|r| self.domains.get(r)).collect()
    }

    /// The MailDomains that name `relay`.
    pub fn domains_of_relay(&self, relay: &ObjectRef<MailRelay>) -> Vec<Arc<MailDomain>> {
        self.domains
            .state()
            .into_iter()
            .filter(|md| relay_of(md).as_ref() == Some(relay))
            .collect()
    }

    fn note_claim(&self, md: &MailDomain, present: bool) {
        let me = ObjectRef::from_obj(md);
        let mut claims = self
            .claims
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A MailDomain claims one domain (spec.domain is immutable), but an
        // object can be re-created under the same name for another domain.
        if let Some(previous) = claims.by_object.remove(&me)
            && let Some(set) = claims.by_domain.get_mut(&previous)
        {
            set.remove(&me);
            if set.is_empty() {
                claims.by_domain.remove(&previous);
            }
        }
        if present {
            claims
                .by_domain
                .entry(md.spec.domain.clone())
                .or_default()
                .insert(me.clone());
            claims.by_object.insert(me, md.spec.domain.clone());
        }
    }
}

/// The MailDomain a managed Secret belongs to, from its label.
pub fn secret_owner(secret: &Secret) -> Option<ObjectRef<MailDomain>> {
    let name = secret.labels().get(MAILDOMAIN_LABEL)?;
    Some(ObjectRef::new(name).within(&secret.namespace()?))
}

/// The MailRelay a relay config Secret belongs to and the shard bucket it
/// holds (none for the settings), from its labels.
pub fn config_owner(secret: &Secret) -> Option<(ObjectRef<MailRelay>, Option<u8>)> {
    let name = secret.labels().get(RELAY_CONFIG_LABEL)?;
    let bucket = secret
        .labels()
        .get(RELAY_CONFIG_SHARD_LABEL)
        .and_then(|hex| u8::from_str_radix(hex, 16).ok());
    Some((ObjectRef::new(name).within(&secret.namespace()?), bucket))
}

/// The receiving ends of the fan-out, one per consumer.
pub struct Feeds {
    /// MailDomains as watched: what drives the MailDomain controller.
    pub domain_objects: UnboundedReceiver<Result<MailDomain, watcher::Error>>,
    /// MailDomains to reconcile because something they depend on changed.
    pub domain_triggers: UnboundedReceiver<ObjectRef<MailDomain>>,
    /// MailRelays as watched: what drives the MailRelay controller.
    pub relay_objects: UnboundedReceiver<Result<MailRelay, watcher::Error>>,
    /// What the relay projection must look at again.
    pub changes: UnboundedReceiver<Change>,
}

/// The sending ends, used by the watch tasks.
#[derive(Clone)]
struct Fanout {
    domain_objects: UnboundedSender<Result<MailDomain, watcher::Error>>,
    domain_triggers: UnboundedSender<ObjectRef<MailDomain>>,
    relay_objects: UnboundedSender<Result<MailRelay, watcher::Error>>,
    changes: UnboundedSender<Change>,
}

impl Fanout {
    fn change(&self, change: Change) {
        let _ = self.changes.unbounded_send(change);
    }

    fn trigger(&self, md: ObjectRef<MailDomain>) {
        let _ = self.domain_triggers.unbounded_send(md);
    }
}

/// Which namespaces the operator watches.
#[derive(Clone, Debug)]
pub enum Scope {
    Cluster,
    Namespaces(Vec<String>),
}

type EventStream<K> = BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>;

impl Scope {
    /// One watch of a namespaced kind over the whole scope.
    fn watch<K>(&self, client: &Client, config: watcher::Config, store: Store<K>) -> EventStream<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + std::fmt::Debug
            + serde::de::DeserializeOwned
            + Send
            + Sync
            + 'static,
    {
        match self {
            Self::Cluster => watcher(Api::<K>::all(client.clone()), config).boxed(),
            Self::Namespaces(namespaces) => merge_watches(
                namespaces
                    .iter()
                    .map(|namespace| {
                        let api = Api::<K>::namespaced(client.clone(), namespace);
                        (namespace.clone(), watcher(api, config.clone()).boxed())
                    })
                    .collect(),
                store,
                |object: &K| object.namespace().unwrap_or_default(),
            ),
        }
    }

    /// The watch of Namespaces themselves over the scope.
    fn watch_namespaces(&self, client: &Client, store: Store<Namespace>) -> EventStream<Namespace> {
        let api = Api::<Namespace>::all(client.clone());
        match self {
            Self::Cluster => watcher(api, watcher::Config::default()).boxed(),
            Self::Namespaces(namespaces) => merge_watches(
                namespaces
                    .iter()
                    .map(|namespace| {
                        let config = watcher::Config::default()
                            .fields(&format!("metadata.name={namespace}"));
                        (namespace.clone(), watcher(api.clone(), config).boxed())
                    })
                    .collect(),
                store,
                |ns: &Namespace| ns.name_any(),
            ),
        }
    }
}

/// Several watches (one per namespace) presented to one store as one
/// watch. A store takes a whole list at once (`Init` .. `InitDone`
/// replaces everything it holds), so the merged stream lists once, when
/// every namespace has listed. Changes that a namespace which has listed
/// already sees meanwhile are held back until then: applied to the store
/// during the list, they would be lost when the list replaces it.
/// Afterwards, a namespace that lists again (its watch was lost) is turned
/// into applies of what it lists and deletes of what it no longer has,
/// touching no other namespace.
fn merge_watches<K>(
    watches: Vec<(String, EventStream<K>)>,
    store: Store<K>,
    key_of: fn(&K) -> String,
) -> EventStream<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let mut waiting_for_first_list: HashSet<String> =
        watches.iter().map(|(ns, _)| ns.clone()).collect();
    let mut relisting: HashMap<String, HashSet<String>> = HashMap::new();
    let mut held: Vec<watcher::Event<K>> = Vec::new();
    // What each namespace listed while the merged list is not complete:
    // what a namespace that lists again no longer has must be deleted
    // after the list. Dropped once the list is complete.
    let mut first_listed: HashMap<String, HashMap<String, K>> = HashMap::new();
    let tagged = futures::stream::select_all(
        watches
            .into_iter()
            .map(|(ns, stream)| stream.map(move |event| (ns.clone(), event))),
    );
    let started = futures::stream::iter([Ok(watcher::Event::Init)]);
    let merged = tagged.flat_map(move |(ns, event)| {
        let out: Vec<Result<watcher::Event<K>, watcher::Error>> = match event {
            Err(error) => vec![Err(error)],
            Ok(watcher::Event::Init) => {
                relisting.insert(ns, HashSet::new());
                Vec::new()
            }
            Ok(watcher::Event::InitApply(object)) => {
                if let Some(seen) = relisting.get_mut(&ns) {
                    seen.insert(object.name_any());
                }
                if waiting_for_first_list.is_empty() {
                    vec![Ok(watcher::Event::Apply(object))]
                } else {
                    first_listed
                        .entry(ns.clone())
                        .or_default()
                        .insert(object.name_any(), object.clone());
                    if waiting_for_first_list.contains(&ns) {
                        vec![Ok(watcher::Event::InitApply(object))]
                    } else {
                        held.push(watcher::Event::Apply(object));
                        Vec::new()
                    }
                }
            }
            Ok(watcher::Event::InitDone) => {
                let seen = relisting.remove(&ns).unwrap_or_default();
                if waiting_for_first_list.remove(&ns) {
                    if waiting_for_first_list.is_empty() {
                        first_listed.clear();
                        std::iter::once(Ok(watcher::Event::InitDone))
                            .chain(held.drain(..).map(Ok))
                            .collect()
                    } else {
                        Vec::new()
                    }
                } else if !waiting_for_first_list.is_empty() {
                    // Listed again before the merged list is complete: what
                    // it listed before and no longer has goes afterwards.
                    for (name, gone) in first_listed.remove(&ns).unwrap_or_default() {
                        if !seen.contains(&name) {
                            held.push(watcher::Event::Delete(gone));
                        }
                    }
                    Vec::new()
                } else {
                    store
                        .state()
                        .into_iter()
                        .filter(|object| key_of(object) == ns && !seen.contains(&object.name_any()))
                        .map(|gone| Ok(watcher::Event::Delete((*gone).clone())))
                        .collect()
                }
            }
            Ok(event) if !waiting_for_first_list.is_empty() => {
                held.push(event);
                Vec::new()
            }
            Ok(event) => vec![Ok(event)],
        };
        futures::stream::iter(out)
    });
    started.chain(merged).boxed()
}

/// Sets up the index: returns the stores, the feeds, and the future that
/// runs the watches (drive it for as long as the controllers run).
pub fn start(
    client: Client,
    scope: Scope,
) -> (Index, Feeds, impl std::future::Future<Output = ()> + Send) {
    let (domains, domains_writer) = reflector::store();
    let (secrets, secrets_writer) = reflector::store();
    let (namespaces, namespaces_writer) = reflector::store();
    let (relays, relays_writer) = reflector::store();
    let (providers, providers_writer) = reflector::store();
    let index = Index {
        domains,
        secrets,
        namespaces,
        relays,
        providers,
        claims: Arc::default(),
        relay_generations: Arc::default(),
    };
    let (domain_objects_tx, domain_objects) = unbounded();
    let (domain_triggers_tx, domain_triggers) = unbounded();
    let (relay_objects_tx, relay_objects) = unbounded();
    let (changes_tx, changes) = unbounded();
    let fanout = Fanout {
        domain_objects: domain_objects_tx,
        domain_triggers: domain_triggers_tx,
        relay_objects: relay_objects_tx,
        changes: changes_tx,
    };

    let domain_watch = {
        let (index, fanout) = (index.clone(), fanout.clone());
        let stream = scope
            .watch(
                &client,
                watcher::Config::default().any_semantic(),
                index.domains.clone(),
            )
            .default_backoff()
            .modify(|md| md.managed_fields_mut().clear())
            .reflect(domains_writer);
        drive(stream, move |event| on_domain(&index, &fanout, event))
    };
    let secret_watch = {
        let (index, fanout) = (index.clone(), fanout.clone());
        let stream = scope
            .watch(
                &client,
                watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")),
                index.secrets.clone(),
            )
            .default_backoff()
            .modify(|secret| secret.managed_fields_mut().clear())
            .reflect(secrets_writer);
        drive(stream, move |event| on_secret(&index, &fanout, event))
    };
    let namespace_watch = {
        let (index, fanout) = (index.clone(), fanout.clone());
        let stream = scope
            .watch_namespaces(&client, index.namespaces.clone())
            .default_backoff()
            .modify(|ns| ns.managed_fields_mut().clear())
            .reflect(namespaces_writer);
        drive(stream, move |event| on_namespace(&index, &fanout, event))
    };
    let provider_watch = {
        let (index, fanout) = (index.clone(), fanout.clone());
        let stream = scope
            .watch(&client, watcher::Config::default(), index.providers.clone())
            .default_backoff()
            .modify(|provider| provider.managed_fields_mut().clear())
            .reflect(providers_writer);
        drive(stream, move |event| on_provider(&index, &fanout, event))
    };
    let relay_watch = {
        let (index, fanout) = (index.clone(), fanout);
        let stream = scope
            .watch(&client, watcher::Config::default(), index.relays.clone())
            .default_backoff()
            .modify(|relay| relay.managed_fields_mut().clear())
            .reflect(relays_writer);
        drive(stream, move |event| on_relay(&index, &fanout, event))
    };
    let run = async move {
        tokio::join!(
            domain_watch,
            secret_watch,
            namespace_watch,
            relay_watch,
            provider_watch
        );
    };
    (
        index,
        Feeds {
            domain_objects,
            domain_triggers,
            relay_objects,
            changes,
        },
        run,
    )
}

/// Runs a reflected watch, handing each event (already in the store) on.
async fn drive<K>(
    stream: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send,
    mut on_event: impl FnMut(Result<&watcher::Event<K>, watcher::Error>) + Send,
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(event) => on_event(Ok(&event)),
            Err(error) => {
                tracing::warn!(%error, "watch failed; retrying");
                on_event(Err(error));
            }
        }
    }
}

fn on_domain(
    index: &Index,
    fanout: &Fanout,
    event: Result<&watcher::Event<MailDomain>, watcher::Error>,
) {
    let event = match event {
        Ok(event) => event,
        Err(error) => {
            let _ = fanout.domain_objects.unbounded_send(Err(error));
            return;
        }
    };
    match event {
        watcher::Event::Apply(md) | watcher::Event::InitApply(md) => {
            index.note_claim(md, true);
            let _ = fanout.domain_objects.unbounded_send(Ok(md.clone()));
            fanout.change(Change::Domain(ObjectRef::from_obj(md)));
            // Another MailDomain claiming the same domain must look again at
            // who owns it.
            let me = ObjectRef::from_obj(md);
            for other in index.claimants(&md.spec.domain) {
                let other = ObjectRef::from_obj(&*other);
                if other != me {
                    fanout.trigger(other);
                }
            }
        }
        watcher::Event::Delete(md) => {
            index.note_claim(md, false);
            fanout.change(Change::Domain(ObjectRef::from_obj(md)));
            for other in index.claimants(&md.spec.domain) {
                fanout.trigger(ObjectRef::from_obj(&*other));
            }
        }
        watcher::Event::InitDone => fanout.change(Change::Resync),
        watcher::Event::Init => {}
    }
}

fn on_secret(
    index: &Index,
    fanout: &Fanout,
    event: Result<&watcher::Event<Secret>, watcher::Error>,
) {
    let Ok(event) = event else { return };
    let _ = index;
    match event {
        watcher::Event::Apply(secret)
        | watcher::Event::InitApply(secret)
        | watcher::Event::Delete(secret) => {
            if let Some(md) = secret_owner(secret) {
                fanout.change(Change::DomainSecret(md.clone()));
                if !matches!(event, watcher::Event::InitApply(_)) {
                    fanout.trigger(md);
                }
            }
            if let Some((relay, bucket)) = config_owner(secret) {
                fanout.change(Change::RelayConfig(relay, bucket));
            }
        }
        watcher::Event::InitDone => fanout.change(Change::Resync),
        watcher::Event::Init => {}
    }
}

fn on_namespace(
    index: &Index,
    fanout: &Fanout,
    event: Result<&watcher::Event<Namespace>, watcher::Error>,
) {
    let Ok(event) = event else { return };
    match event {
        watcher::Event::Apply(ns) | watcher::Event::Delete(ns) => {
            let name = ns.name_any();
            fanout.change(Change::Namespace(name.clone()));
            // Admission by label selector depends on the namespace's labels.
            for md in index.domains.state() {
                if md.namespace().as_deref() == Some(name.as_str()) && md.spec.relay_ref.is_some() {
                    fanout.trigger(ObjectRef::from_obj(&*md));
                }
            }
        }
        watcher::Event::InitDone => fanout.change(Change::Resync),
        watcher::Event::Init | watcher::Event::InitApply(_) => {}
    }
}

/// A DNSProvider created, changed or deleted: the MailDomains naming it
/// publish (or report) again at once. A provider has no status, so every
/// change is one they depend on.
fn on_provider(
    index: &Index,
    fanout: &Fanout,
    event: Result<&watcher::Event<DNSProvider>, watcher::Error>,
) {
    let Ok(event) = event else { return };
    match event {
        watcher::Event::Apply(provider) | watcher::Event::Delete(provider) => {
            for md in index.domains_of_provider(&ObjectRef::from_obj(provider)) {
                fanout.trigger(ObjectRef::from_obj(&*md));
            }
        }
        watcher::Event::Init | watcher::Event::InitApply(_) | watcher::Event::InitDone => {}
    }
}

fn on_relay(
    index: &Index,
    fanout: &Fanout,
    event: Result<&watcher::Event<MailRelay>, watcher::Error>,
) {
    let event = match event {
        Ok(event) => event,
        Err(error) => {
            let _ = fanout.relay_objects.unbounded_send(Err(error));
            return;
        }
    };
    match event {
        watcher::Event::Apply(relay) | watcher::Event::InitApply(relay) => {
            let _ = fanout.relay_objects.unbounded_send(Ok(relay.clone()));
            let me = ObjectRef::from_obj(relay);
            let seen = (relay.metadata.uid.clone(), relay.metadata.generation);
            let previous = index
                .relay_generations
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(me.clone(), seen.clone());
            if matches!(event, watcher::Event::Apply(_)) && previous == Some(seen) {
                // Its own status write (the domains it leaves out): nothing
                // its domains or its config depend on changed. Without this,
                // every status write of a relay with 10,000 domains would
                // reconcile all 10,000.
                return;
            }
            fanout.change(Change::Relay(me.clone()));
            if matches!(event, watcher::Event::Apply(_)) {
                // Its SPF authorization and admission shape the records and
                // conditions of the domains that use it.
                for md in index.domains_of_relay(&me) {
                    fanout.trigger(ObjectRef::from_obj(&*md));
                }
            }
        }
        watcher::Event::Delete(relay) => {
            let me = ObjectRef::from_obj(relay);
            index
                .relay_generations
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&me);
            fanout.change(Change::Relay(me.clone()));
            for md in index.domains_of_relay(&me) {
                fanout.trigger(ObjectRef::from_obj(&*md));
            }
        }
        watcher::Event::InitDone => fanout.change(Change::Resync),
        watcher::Event::Init => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn object(namespace: &str, name: &str) -> ConfigMap {
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            ..ConfigMap::default()
        }
    }

    fn names(store: &Store<ConfigMap>) -> Vec<String> {
        let mut names: Vec<String> = store.state().iter().map(|o| o.name_any()).collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn several_namespaces_list_once_together_and_relist_alone() {
        let (reader, writer) = reflector::store::<ConfigMap>();
        let (a, a_events) = unbounded();
        let (b, b_events) = unbounded();
        let merged = merge_watches(
            vec![
                ("a".to_string(), a_events.boxed()),
                ("b".to_string(), b_events.boxed()),
            ],
            reader.clone(),
            |o: &ConfigMap| o.namespace().unwrap_or_default(),
        );
        let mut reflected = merged.reflect(writer).boxed();
        let mut next = async || reflected.next().await.unwrap().unwrap();

        assert!(matches!(next().await, watcher::Event::Init));
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(object("a", "a1")),
            watcher::Event::InitDone,
        ] {
            a.unbounded_send(Ok(event)).unwrap();
        }
        assert!(matches!(next().await, watcher::Event::InitApply(_)));
        // a has listed and sees a new object while b still lists: held.
        a.unbounded_send(Ok(watcher::Event::Apply(object("a", "a-new"))))
            .unwrap();
        assert!(
            reader.state().is_empty(),
            "nothing is served until every namespace listed"
        );
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(object("b", "b1")),
            watcher::Event::InitDone,
        ] {
            b.unbounded_send(Ok(event)).unwrap();
        }
        assert!(matches!(next().await, watcher::Event::InitApply(_)));
        assert!(matches!(next().await, watcher::Event::InitDone));
        assert!(matches!(next().await, watcher::Event::Apply(_)));
        assert_eq!(names(&reader), ["a-new", "a1", "b1"]);
        a.unbounded_send(Ok(watcher::Event::Delete(object("a", "a-new"))))
            .unwrap();
        assert!(matches!(next().await, watcher::Event::Delete(_)));
        assert_eq!(names(&reader), ["a1", "b1"]);

        // Namespace a loses its watch and lists again: a1 is gone, a2 new;
        // b is untouched.
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(object("a", "a2")),
            watcher::Event::InitDone,
        ] {
            a.unbounded_send(Ok(event)).unwrap();
        }
        assert!(matches!(next().await, watcher::Event::Apply(_)));
        assert!(matches!(next().await, watcher::Event::Delete(_)));
        assert_eq!(names(&reader), ["a2", "b1"]);
        a.unbounded_send(Ok(watcher::Event::Delete(object("a", "a2"))))
            .unwrap();
        assert!(matches!(next().await, watcher::Event::Delete(_)));
        assert_eq!(names(&reader), ["b1"]);
    }

    fn relay(uid: &str, generation: i64) -> MailRelay {
        let mut relay: MailRelay = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay",
            "metadata": {"name": "shared", "namespace": "mail"},
            "spec": {"hostname": "relay.example", "upstream": {"host": "smtp.example", "port": 25},
                     "spf": {"include": "_spf.relay.example"}}
        }))
        .unwrap();
        relay.metadata.uid = Some(uid.into());
        relay.metadata.generation = Some(generation);
        relay
    }

    fn domain_on_shared(name: &str) -> MailDomain {
        let mut md: MailDomain = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain",
            "metadata": {"name": name, "namespace": "tenant"},
            "spec": {"domain": format!("{name}.example"),
                     "relayRef": {"name": "shared", "namespace": "mail"}}
        }))
        .unwrap();
        md.metadata.uid = Some(format!("uid-{name}"));
        md
    }

    #[test]
    fn a_relay_status_write_reconciles_none_of_its_domains_a_spec_change_all() {
        let (domains, mut domains_writer) = reflector::store::<MailDomain>();
        for name in ["a", "b"] {
            domains_writer.apply_watcher_event(&watcher::Event::Apply(domain_on_shared(name)));
        }
        let index = Index {
            domains,
            secrets: reflector::store().0,
            namespaces: reflector::store().0,
            relays: reflector::store().0,
            providers: reflector::store().0,
            claims: Arc::default(),
            relay_generations: Arc::default(),
        };
        let (domain_objects, _domain_objects) = unbounded();
        let (domain_triggers, mut triggers) = unbounded();
        let (relay_objects, _relay_objects) = unbounded();
        let (changes, mut changes_rx) = unbounded();
        let fanout = Fanout {
            domain_objects,
            domain_triggers,
            relay_objects,
            changes,
        };
        let mut drain = || {
            let mut triggered = Vec::new();
            while let Ok(md) = triggers.try_recv() {
                triggered.push(md.name);
            }
            triggered.sort();
            let mut relay_changes = 0;
            while let Ok(change) = changes_rx.try_recv() {
                relay_changes += usize::from(matches!(change, Change::Relay(_)));
            }
            (triggered, relay_changes)
        };
        let apply = |relay: MailRelay| on_relay(&index, &fanout, Ok(&watcher::Event::Apply(relay)));

        apply(relay("uid-1", 1));
        assert_eq!(drain(), (vec!["a".to_string(), "b".to_string()], 1));
        // Its status written: same object, same generation.
        apply(relay("uid-1", 1));
        assert_eq!(drain(), (vec![], 0));
        // Its spec changed.
        apply(relay("uid-1", 2));
        assert_eq!(drain(), (vec!["a".to_string(), "b".to_string()], 1));
        // Deleted and made again under the same name, generation 1 again.
        on_relay(
            &index,
            &fanout,
            Ok(&watcher::Event::Delete(relay("uid-1", 2))),
        );
        assert_eq!(drain(), (vec!["a".to_string(), "b".to_string()], 1));
        apply(relay("uid-2", 1));
        assert_eq!(drain(), (vec!["a".to_string(), "b".to_string()], 1));
        apply(relay("uid-3", 1));
        assert_eq!(drain(), (vec!["a".to_string(), "b".to_string()], 1));
    }

    #[test]
    fn a_provider_change_reconciles_the_maildomains_that_name_it_and_no_others() {
        let (domains, mut domains_writer) = reflector::store::<MailDomain>();
        let domain = |name: &str, namespace: &str, spec: serde_json::Value| -> MailDomain {
            let mut spec = spec;
            spec["domain"] = format!("{name}.example").into();
            serde_json::from_value(serde_json::json!({
                "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain",
                "metadata": {"name": name, "namespace": namespace}, "spec": spec,
            }))
            .unwrap()
        };
        for md in [
            // Its records through the provider in its own namespace.
            domain(
                "own",
                "mail",
                serde_json::json!({"dns": {"providerRef": {"name": "dns"}}}),
            ),
            // Delegated DKIM through it, named with its namespace.
            domain(
                "delegated",
                "tenant",
                serde_json::json!({"dkim": {"delegation": {"providerRef": {"name": "dns", "namespace": "mail"}}}}),
            ),
            // A provider of the same name in its own namespace: not this one.
            domain(
                "other",
                "tenant",
                serde_json::json!({"dns": {"providerRef": {"name": "dns"}}}),
            ),
            domain("manual", "mail", serde_json::json!({})),
        ] {
            domains_writer.apply_watcher_event(&watcher::Event::Apply(md));
        }
        let index = Index {
            domains,
            secrets: reflector::store().0,
            namespaces: reflector::store().0,
            relays: reflector::store().0,
            providers: reflector::store().0,
            claims: Arc::default(),
            relay_generations: Arc::default(),
        };
        let (domain_objects, _domain_objects) = unbounded();
        let (domain_triggers, mut triggers) = unbounded();
        let (relay_objects, _relay_objects) = unbounded();
        let (changes, _changes) = unbounded();
        let fanout = Fanout {
            domain_objects,
            domain_triggers,
            relay_objects,
            changes,
        };
        let provider: DNSProvider = serde_json::from_value(serde_json::json!({
            "apiVersion": "mailauth.dev/v1alpha1", "kind": "DNSProvider",
            "metadata": {"name": "dns", "namespace": "mail"},
            "spec": {"zones": ["example"], "externalDNS": {}}
        }))
        .unwrap();
        let mut drain = || {
            let mut triggered = Vec::new();
            while let Ok(md) = triggers.try_recv() {
                triggered.push(md.name);
            }
            triggered.sort();
            triggered
        };
        on_provider(
            &index,
            &fanout,
            Ok(&watcher::Event::InitApply(provider.clone())),
        );
        assert_eq!(
            drain(),
            Vec::<String>::new(),
            "the first list triggers nothing"
        );
        on_provider(
            &index,
            &fanout,
            Ok(&watcher::Event::Apply(provider.clone())),
        );
        assert_eq!(drain(), ["delegated", "own"]);
        on_provider(&index, &fanout, Ok(&watcher::Event::Delete(provider)));
        assert_eq!(drain(), ["delegated", "own"]);
    }
}
