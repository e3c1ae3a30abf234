//! Controllers: shells that watch the cluster, call the pure core and write
//! status.

use clap::Args;

/// Settings of `mailauth-operator controller`.
#[derive(Args, Debug, Clone)]
pub struct ControllerArgs {}

/// Everything that can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

pub async fn run(_args: ControllerArgs) -> Result<(), Error> {
    let _client = kube::Client::try_default().await?;
    Ok(())
}
