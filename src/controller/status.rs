//! The one status writer: a typed server-side apply of the whole status with
//! a single field manager, sent only when the status changed, so a reconcile
//! that finds nothing new writes nothing (GitOps tools see no churn).

use std::fmt::Debug;
use std::sync::atomic::AtomicU64;

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::FIELD_MANAGER;

/// Applies `desired` as the status of `obj` unless it equals `current`.
/// Returns whether it wrote.
pub async fn write_if_changed<K, S>(
    api: &Api<K>,
    obj: &K,
    current: Option<&S>,
    desired: &S,
    writes: &Counter<u64, AtomicU64>,
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
    writes.inc();
    Ok(true)
}
