//! Leader election on a coordination.k8s.io Lease: of several replicas only
//! the holder runs the controllers, so only one process ever writes. A
//! replica that loses the Lease stops its controllers and exits; Kubernetes
//! restarts it as a follower.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use tokio::sync::watch;

use super::{ControllerArgs, Error};
use crate::telemetry::ControllerMetrics;

/// How long a Lease stays valid without renewal, and how early the holder
/// renews it: a dead leader is replaced within about this many seconds.
const LEASE_SECONDS: u64 = 15;
const RENEW_GRACE_SECONDS: u64 = 5;

/// The Lease, held.
pub struct Leadership {
    state: watch::Receiver<bool>,
}

/// Waits until this replica holds the Lease. Followers are ready (they
/// serve health and metrics) but run no controller.
pub async fn acquire(
    client: Client,
    args: &ControllerArgs,
    metrics: &ControllerMetrics,
    ready: &Arc<AtomicBool>,
) -> Result<Leadership, Error> {
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("mailauth-operator-{:016x}", fastrand::u64(..)));
    let manager = LeaseManagerBuilder::new(client, &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(RENEW_GRACE_SECONDS)
        .build()
        .await?;
    let (mut state, _task) = manager.watch().await;
    ready.store(true, Ordering::Relaxed);
    metrics.is_leader.set(0);
    tracing::info!(%identity, lease = %args.lease_name, "waiting for the leader Lease");
    while !*state.borrow_and_update() {
        if state.changed().await.is_err() {
            return Err(Error::LostLeadership);
        }
    }
    tracing::info!(%identity, "acquired the leader Lease");
    Ok(Leadership { state })
}

impl Leadership {
    /// Resolves when the Lease is lost (or can no longer be renewed).
    pub async fn lost(&mut self) {
        loop {
            if !*self.state.borrow_and_update() {
                tracing::warn!("lost the leader Lease");
                return;
            }
            if self.state.changed().await.is_err() {
                return;
            }
        }
    }
}
