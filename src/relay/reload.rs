//! Keeping the snapshot current, from either config source:
//!
//! - **Secrets** (in a cluster): the relay watches the config Secrets of its
//!   own namespace through the API server. A change reaches the relay within
//!   a second, without the kubelet's Secret-volume sync delay, and while the
//!   API server is away the last good config keeps serving.
//! - **A directory** (outside a cluster, and kubelet-style mounts): the
//!   relay polls a cheap fingerprint once a second. Kubernetes updates Secret
//!   volumes by swapping a symlink, with no inotify event on the files we
//!   read, so polling is both simpler and more reliable than watching.
//!
//! Both end in [`Reloader::apply`]: the same build, the same rules. Sessions
//! hold an `Arc` of a snapshot, so a swap never disturbs mail in flight, and
//! a config whose settings do not load leaves the old one serving.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};

use super::config::{RELAY_CONFIG_LABEL, SETTINGS_FILE, SHARD_PREFIX};
use super::metrics::RelayMetrics;
use super::snapshot::{self, ConfigPart, ConfigParts, RelaySnapshot, ShardCache};

/// The current snapshot, shared by all sessions.
#[derive(Debug, Default)]
pub struct ConfigStore {
    current: RwLock<Option<Arc<RelaySnapshot>>>,
    /// Whether a config was ever loaded: what `/readyz` reports.
    loaded: Arc<AtomicBool>,
}

impl ConfigStore {
    /// The snapshot to use now, if a config was ever loaded.
    pub fn current(&self) -> Option<Arc<RelaySnapshot>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn replace(&self, snapshot: RelaySnapshot) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(snapshot));
        self.loaded.store(true, Ordering::Relaxed);
    }

    /// A flag that turns true once a config is loaded.
    pub fn loaded_flag(&self) -> Arc<AtomicBool> {
        self.loaded.clone()
    }
}

/// Builds snapshots from config parts and swaps them in: one per source.
pub struct Reloader {
    store: Arc<ConfigStore>,
    metrics: Arc<RelayMetrics>,
    cache: ShardCache,
    /// The rejections last logged, so each is logged once, not per reload.
    logged: Vec<String>,
}

impl Reloader {
    pub fn new(store: Arc<ConfigStore>, metrics: Arc<RelayMetrics>) -> Self {
        Self {
            store,
            metrics,
            cache: ShardCache::default(),
            logged: Vec::new(),
        }
    }

    /// Builds and swaps in a snapshot of `parts`; returns whether it did.
    /// CPU-bound for changed shards (key parsing): call it off the async
    /// workers.
    pub fn apply(&mut self, parts: &ConfigParts) -> bool {
        match snapshot::build(parts, &mut self.cache) {
            Ok(loaded) => {
                let snapshot = loaded.snapshot;
                let rejected: Vec<String> = loaded.rejected.iter().map(|r| r.to_string()).collect();
                for (rejection, text) in loaded.rejected.iter().zip(&rejected) {
                    if !self.logged.contains(text) {
                        tracing::error!(
                            part = %rejection.part,
                            entry = %rejection.subject,
                            reason = rejection.problem.reason(),
                            problem = %rejection.problem,
                            "a relay config entry is not served; every other entry is"
                        );
                    }
                }
                self.logged = rejected;
                let reasons: Vec<&str> =
                    loaded.rejected.iter().map(|r| r.problem.reason()).collect();
                self.metrics.config_in_effect(
                    snapshot.domain_count(),
                    snapshot.tenant_count(),
                    &reasons,
                );
                tracing::info!(
                    domains = snapshot.domain_count(),
                    tenants = snapshot.tenant_count(),
                    rejected = reasons.len(),
                    "relay config loaded"
                );
                self.metrics.config_reload("success");
                self.store.replace(snapshot);
                true
            }
            Err(error) => {
                tracing::error!(%error, "the relay config's settings cannot be used; keeping the current config");
                self.metrics.config_reload("invalid");
                false
            }
        }
    }
}

/// Loads `dir` when its fingerprint differs from `known`; returns the
/// fingerprint now in effect. A config is only taken when the fingerprint
/// is the same before and after reading it, so a directory being rewritten
/// file by file is read again on the next poll.
fn reload_dir_if_changed(
    dir: &Path,
    known: Option<&str>,
    reloader: &mut Reloader,
) -> Option<String> {
    let before = match snapshot::fingerprint(dir) {
        Ok(before) => before,
        Err(error) => {
            tracing::warn!(%error, "cannot read the relay config directory; keeping the current config");
            return known.map(str::to_string);
        }
    };
    if known == Some(before.as_str()) {
        return Some(before);
    }
    match snapshot::read_dir(dir) {
        Ok(parts) if snapshot::fingerprint(dir).ok().as_deref() == Some(before.as_str()) => {
            reloader.apply(&parts);
            // A broken config is remembered too, so its error is logged once,
            // not every second.
            Some(before)
        }
        Ok(_) => known.map(str::to_string),
        Err(error) => {
            tracing::error!(%error, "cannot read the relay config; keeping the current config");
            reloader.metrics.config_reload("invalid");
            Some(before)
        }
    }
}

/// Loads a config directory now (blocking), for start-up.
pub fn initial_load_dir(dir: &Path, reloader: &mut Reloader) -> Option<String> {
    reload_dir_if_changed(dir, None, reloader)
}

/// Polls `dir` forever, swapping in new snapshots.
pub async fn watch_dir(
    dir: PathBuf,
    mut known: Option<String>,
    interval: Duration,
    reloader: Reloader,
) {
    let reloader = Arc::new(std::sync::Mutex::new(reloader));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let (dir, reloader, previous) = (dir.clone(), reloader.clone(), known.clone());
        // Key parsing is CPU-bound: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            let mut reloader = reloader
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            reload_dir_if_changed(&dir, previous.as_deref(), &mut reloader)
        })
        .await;
        match result {
            Ok(now) => known = now,
            Err(error) => tracing::error!(%error, "config reload task failed"),
        }
    }
}

/// The config parts held by a set of Secrets: `relay.json` from the one
/// Secret that has it, and every `domains-*.json` data key as a shard named
/// `<secret>/<key>`. Two Secrets with settings is a config the operator
/// never writes: no settings are taken then.
pub fn parts_of_secrets<'a>(secrets: impl IntoIterator<Item = &'a Secret>) -> ConfigParts {
    let mut parts = ConfigParts::default();
    let mut settings_seen = 0;
    for secret in secrets {
        let name = secret.name_any();
        for (key, value) in secret.data.iter().flatten() {
            let part = ConfigPart {
                name: format!("{name}/{key}"),
                bytes: value.0.clone(),
            };
            if key == SETTINGS_FILE {
                settings_seen += 1;
                parts.settings = Some(part);
            } else if key.starts_with(SHARD_PREFIX) && key.ends_with(".json") {
                parts.shards.push(part);
            }
        }
    }
    if settings_seen > 1 {
        tracing::error!(
            "more than one relay config Secret holds {SETTINGS_FILE}; ignoring them all"
        );
        parts.settings = None;
    }
    parts.shards.sort_by(|a, b| a.name.cmp(&b.name));
    parts
}

/// Watches the config Secrets of `relay` in `namespace` and swaps in a new
/// snapshot after each change (changes arriving together are built once).
/// Runs until the process ends; the watch reconnects by itself and the
/// last good snapshot keeps serving meanwhile.
pub async fn watch_secrets(
    client: kube::Client,
    namespace: String,
    relay: String,
    debounce: Duration,
    reloader: Reloader,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{RELAY_CONFIG_LABEL}={relay}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let reloader = Arc::new(std::sync::Mutex::new(reloader));
    let mut secrets: BTreeMap<String, Secret> = BTreeMap::new();
    // A re-list (after the watch was lost) is collected whole before use, so
    // a half-listed set never replaces a complete one.
    let mut relisting: Option<BTreeMap<String, Secret>> = None;
    let mut dirty = false;
    loop {
        let event = if dirty {
            match tokio::time::timeout(debounce, events.next()).await {
                Ok(event) => event,
                Err(_) => {
                    dirty = false;
                    let parts = parts_of_secrets(secrets.values());
                    let reloader = reloader.clone();
                    if let Err(error) = tokio::task::spawn_blocking(move || {
                        reloader
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .apply(&parts)
                    })
                    .await
                    {
                        tracing::error!(%error, "config reload task failed");
                    }
                    continue;
                }
            }
        } else {
            events.next().await
        };
        match event {
            None => return,
            Some(Err(error)) => {
                tracing::warn!(%error, "watching the relay config Secrets failed; keeping the current config and retrying");
            }
            Some(Ok(watcher::Event::Init)) => relisting = Some(BTreeMap::new()),
            Some(Ok(watcher::Event::InitApply(secret))) => {
                relisting
                    .get_or_insert_with(BTreeMap::new)
                    .insert(secret.name_any(), secret);
            }
            Some(Ok(watcher::Event::InitDone)) => {
                secrets = relisting.take().unwrap_or_default();
                dirty = true;
            }
            Some(Ok(watcher::Event::Apply(secret))) => {
                secrets.insert(secret.name_any(), secret);
                dirty = true;
            }
            Some(Ok(watcher::Event::Delete(secret))) => {
                secrets.remove(&secret.name_any());
                dirty = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn secret(name: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        }
    }

    #[test]
    fn secrets_give_the_settings_and_every_shard() {
        let parts = parts_of_secrets(&[
            secret("r-relay-config-01", &[("domains-01.json", b"{}")]),
            secret("r-relay-config", &[("relay.json", b"{}"), ("other", b"x")]),
            secret("r-relay-config-00", &[("domains-00.json", b"{}")]),
        ]);
        assert_eq!(
            parts.settings.map(|p| p.name),
            Some("r-relay-config/relay.json".to_string())
        );
        let shards: Vec<String> = parts.shards.into_iter().map(|p| p.name).collect();
        assert_eq!(
            shards,
            vec![
                "r-relay-config-00/domains-00.json",
                "r-relay-config-01/domains-01.json"
            ]
        );
    }

    #[test]
    fn two_settings_are_no_settings() {
        let parts = parts_of_secrets(&[
            secret("a", &[("relay.json", b"{}")]),
            secret("b", &[("relay.json", b"{}")]),
        ]);
        assert!(parts.settings.is_none());
    }
}
