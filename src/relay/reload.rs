//! Keeping the snapshot current: poll the config directory's fingerprint
//! and swap in a new snapshot when it changes.
//!
//! Kubernetes updates Secret volumes by swapping a symlink, with no inotify
//! event on the files we read, so polling a cheap fingerprint once a second
//! is both simpler and more reliable than watching. Sessions hold an `Arc`
//! of the snapshot they started with, so a swap never disturbs mail in
//! flight, and a broken new config leaves the old one serving.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use super::metrics::RelayMetrics;
use super::snapshot::{RelaySnapshot, fingerprint, load_dir};

/// The current snapshot, shared by all sessions.
#[derive(Debug, Default)]
pub struct ConfigStore {
    current: RwLock<Option<Arc<RelaySnapshot>>>,
    /// Whether a config was ever loaded: what `/readyz` reports.
    loaded: Arc<AtomicBool>,
}

impl ConfigStore {
    /// The snapshot to use for a new session, if a config was ever loaded.
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

/// Loads the directory when its fingerprint differs from `known`; returns
/// the fingerprint now in effect. A config is only taken when the
/// fingerprint is the same before and after reading it, so a directory
/// being rewritten file by file is read again on the next poll.
fn reload_if_changed(
    dir: &Path,
    known: Option<&str>,
    store: &ConfigStore,
    metrics: &RelayMetrics,
) -> Option<String> {
    let before = match fingerprint(dir) {
        Ok(before) => before,
        Err(error) => {
            tracing::warn!(%error, "cannot read the relay config directory; keeping the current config");
            return known.map(str::to_string);
        }
    };
    if known == Some(before.as_str()) {
        return Some(before);
    }
    match load_dir(dir) {
        Ok(snapshot) if fingerprint(dir).ok().as_deref() == Some(before.as_str()) => {
            tracing::info!(domains = snapshot.domain_count(), "relay config loaded");
            metrics.config_reload("success");
            store.replace(snapshot);
            Some(before)
        }
        Ok(_) => known.map(str::to_string),
        Err(error) => {
            tracing::error!(%error, "the relay config is invalid; keeping the current config");
            metrics.config_reload("invalid");
            // Remember the broken fingerprint so the error is logged once,
            // not every second.
            Some(before)
        }
    }
}

/// Loads the config now (blocking), for start-up.
pub fn initial_load(dir: &Path, store: &ConfigStore, metrics: &RelayMetrics) -> Option<String> {
    reload_if_changed(dir, None, store, metrics)
}

/// Polls `dir` forever, swapping in new snapshots.
pub async fn watch(
    dir: PathBuf,
    mut known: Option<String>,
    interval: Duration,
    store: Arc<ConfigStore>,
    metrics: Arc<RelayMetrics>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let dir = dir.clone();
        let store = store.clone();
        let metrics = metrics.clone();
        let previous = known.clone();
        // Key parsing is CPU-bound: keep it off the async workers.
        let result = tokio::task::spawn_blocking(move || {
            reload_if_changed(&dir, previous.as_deref(), &store, &metrics)
        })
        .await;
        match result {
            Ok(now) => known = now,
            Err(error) => tracing::error!(%error, "config reload task failed"),
        }
    }
}
