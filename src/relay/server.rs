//! The SMTP listener: the concurrent connection limit, and one task per
//! session.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use super::reload::ConfigStore;
use super::session::{self, SessionContext};

/// Counts a connection for as long as it lives.
struct ConnectionSlot {
    active: Arc<AtomicUsize>,
    context: Arc<SessionContext>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.context.metrics.connection_closed();
    }
}

/// Accepts connections forever; `active` counts the open ones.
pub async fn accept_loop(
    listener: TcpListener,
    store: Arc<ConfigStore>,
    context: Arc<SessionContext>,
    active: Arc<AtomicUsize>,
) {
    loop {
        let (mut tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually EMFILE: back off a little instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(snapshot) = store.current() else {
            tokio::spawn(async move {
                let _ = tcp
                    .write_all(b"421 4.3.0 Relay not configured yet, try again later\r\n")
                    .await;
            });
            continue;
        };
        let limit = snapshot.settings.limits.max_connections as usize;
        if active.fetch_add(1, Ordering::Relaxed) >= limit {
            active.fetch_sub(1, Ordering::Relaxed);
            context.metrics.rejected("too_many_connections");
            tokio::spawn(async move {
                let _ = tcp
                    .write_all(b"421 4.7.0 Too many connections, try again later\r\n")
                    .await;
            });
            continue;
        }
        context.metrics.connection_opened();
        let slot = ConnectionSlot {
            active: active.clone(),
            context: context.clone(),
        };
        let context = context.clone();
        tokio::spawn(async move {
            session::serve(tcp, peer, snapshot, context).await;
            drop(slot);
        });
    }
}
