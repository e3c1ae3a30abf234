//! The SMTP listener: TLS set-up, the concurrent connection limit, and one
//! task per session.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

use super::RelayError;
use super::reload::ConfigStore;
use super::session::{self, SessionContext};

/// A STARTTLS acceptor from PEM files (e.g. a mounted `kubernetes.io/tls`
/// Secret's `tls.crt` and `tls.key`).
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, RelayError> {
    let tls_error = |reason: String| RelayError::Tls {
        cert: cert.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|error| tls_error(format!("reading the certificate: {error}")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| tls_error(format!("parsing the certificate: {error}")))?;
    if chain.is_empty() {
        return Err(tls_error(
            "the certificate file holds no certificate".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|error| tls_error(format!("reading the private key: {error}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| tls_error(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|error| tls_error(format!("certificate and key do not fit: {error}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

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
