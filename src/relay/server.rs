//! The SMTP listener: admission (connection slots, see [`super::limits`])
//! and one task per session.

use std::sync::Arc;

use tokio::net::TcpListener;

use super::limits::Admission;
use super::session::{self, SessionContext};

/// Counts a connection in the metrics for as long as it lives.
struct Counted(Arc<SessionContext>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.shared.metrics.connection_closed();
    }
}

/// Accepts connections forever.
pub async fn accept_loop(
    listener: TcpListener,
    admission: Arc<Admission>,
    context: Arc<SessionContext>,
) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Usually EMFILE: back off a little instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // A refusal is one short line into an empty socket buffer: it is
        // written without waiting (or not at all), never with a task per
        // stranger.
        let Some(snapshot) = context.store.current() else {
            let _ = tcp.try_write(b"421 4.3.0 Relay not configured yet, try again later\r\n");
            continue;
        };
        let permit = match admission.admit(peer.ip(), &snapshot.settings.limits) {
            Ok(permit) => permit,
            Err(refused) => {
                context.shared.metrics.rejected(refused.reason());
                let reply = format!(
                    "421 4.7.0 {}, try again later\r\n",
                    capitalized(&refused.to_string())
                );
                let _ = tcp.try_write(reply.as_bytes());
                continue;
            }
        };
        drop(snapshot);
        context.shared.metrics.connection_opened();
        let counted = Counted(context.clone());
        let context = context.clone();
        tokio::spawn(async move {
            session::serve(tcp, peer, permit, context).await;
            drop(counted);
        });
    }
}

fn capitalized(text: &str) -> String {
    let mut text = text.to_string();
    if let Some(first) = text.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    text
}
