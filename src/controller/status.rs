//! The one status writer: a typed server-side apply of the whole status with
//! a single field manager, sent only when the status changed, so a reconcile
//! that finds nothing new writes nothing (GitOps tools see no churn).

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::FIELD_MANAGER;

/// Counts the writes this process made, for tests and benchmarks.
#[derive(Default, Debug)]
pub struct WriteCounter {
    pub status: AtomicU64,
    pub secrets: AtomicU64,
    /// Reconciles that ran to the end, written or not.
    pub reconciles: AtomicU64,
}

impl WriteCounter {
    pub fn status_writes(&self) -> u64 {
        self.status.load(Ordering::Relaxed)
    }

    pub fn secret_writes(&self) -> u64 {
        self.secrets.load(Ordering::Relaxed)
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.load(Ordering::Relaxed)
    }
}

/// Applies `desired` as the status of `obj` unless it equals `current`.
/// Returns whether it wrote.
pub async fn write_if_changed<K, S>(
    api: &Api<K>,
    obj: &K,
    current: Option<&S>,
    desired: &S,
    counter: &WriteCounter,
) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if current == Some(desired) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": desired,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    counter.status.fetch_add(1, Ordering::Relaxed);
    Ok(true)
}
