//! The STARTTLS certificate, kept current: cert-manager renews the mounted
//! `kubernetes.io/tls` Secret in place, and the relay picks the new
//! certificate up without a restart.
//!
//! As with the config directory, the files are polled (the kubelet swaps a
//! symlink, which no file watch on them sees). Each handshake asks the
//! resolver for the certificate in effect, so a renewal applies to the next
//! STARTTLS; a pair that does not load (a half-written renewal, a key that
//! does not fit) leaves the old one serving.

use std::fmt;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use super::RelayError;
use super::metrics::RelayMetrics;

/// The PEM files of the relay's certificate chain and private key.
#[derive(Clone, Debug)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertificateFiles {
    /// Both files' bytes, hashed: changes when either is replaced.
    fn fingerprint(&self) -> std::io::Result<u64> {
        let mut hasher = DefaultHasher::new();
        std::fs::read(&self.cert)?.hash(&mut hasher);
        std::fs::read(&self.key)?.hash(&mut hasher);
        Ok(hasher.finish())
    }

    /// Reads and checks the pair: a chain of at least one certificate and
    /// the private key that belongs to its first.
    fn load(&self) -> Result<CertifiedKey, RelayError> {
        let tls_error = |reason: String| RelayError::Tls {
            cert: self.cert.clone(),
            reason,
        };
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .map_err(|error| tls_error(format!("reading the certificate: {error}")))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| tls_error(format!("parsing the certificate: {error}")))?;
        if chain.is_empty() {
            return Err(tls_error(
                "the certificate file holds no certificate".into(),
            ));
        }
        // The key's own error names neither the file nor what is wrong with
        // it beyond its PEM shape; the key never reaches a message.
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|error| tls_error(format!("reading the private key: {error}")))?;
        CertifiedKey::from_der(chain, key, &provider())
            .map_err(|error| tls_error(format!("certificate and key do not fit: {error}")))
    }
}

fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// The certificate every handshake is given: the last pair that loaded.
pub struct ReloadingCertificate {
    files: CertificateFiles,
    current: RwLock<Arc<CertifiedKey>>,
    /// The files' fingerprint when the first pair was read.
    initial: Option<u64>,
}

impl fmt::Debug for ReloadingCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadingCertificate")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

impl ReloadingCertificate {
    /// Loads the pair; fails when it does not load, since a relay that
    /// offers STARTTLS must start with a certificate.
    pub fn load(files: CertificateFiles) -> Result<Arc<Self>, RelayError> {
        let initial = files.fingerprint().ok();
        let loaded = files.load()?;
        Ok(Arc::new(Self {
            files,
            current: RwLock::new(Arc::new(loaded)),
            initial,
        }))
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The STARTTLS acceptor that asks this resolver on every handshake.
    pub fn acceptor(self: &Arc<Self>) -> Result<TlsAcceptor, RelayError> {
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(provider()))
            .with_safe_default_protocol_versions()
            .map_err(|error| RelayError::Tls {
                cert: self.files.cert.clone(),
                reason: error.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Loads the pair again when the files changed since `known`; returns
    /// the fingerprint now in effect. As with the config directory, a pair
    /// is only taken when the files did not change while being read.
    fn reload_if_changed(&self, known: Option<u64>, metrics: &RelayMetrics) -> Option<u64> {
        let before = match self.files.fingerprint() {
            Ok(before) => before,
            Err(error) => {
                tracing::warn!(cert = %self.files.cert.display(), %error,
                    "cannot read the TLS certificate files; keeping the current certificate");
                return known;
            }
        };
        if known == Some(before) {
            return known;
        }
        match self.files.load() {
            Ok(loaded) if self.files.fingerprint().ok() == Some(before) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(loaded);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded");
                metrics.tls_reload("success");
                Some(before)
            }
            Ok(_) => known,
            Err(error) => {
                tracing::error!(%error, "the new TLS certificate does not load; keeping the current one");
                metrics.tls_reload("invalid");
                // Logged once per broken pair, not on every poll.
                Some(before)
            }
        }
    }

    /// Polls the files forever, swapping in each renewed pair.
    pub async fn watch(self: Arc<Self>, interval: Duration, metrics: Arc<RelayMetrics>) {
        let mut known = self.initial;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (this, metrics) = (self.clone(), metrics.clone());
            let previous = known;
            match tokio::task::spawn_blocking(move || this.reload_if_changed(previous, &metrics))
                .await
            {
                Ok(now) => known = now,
                Err(error) => tracing::error!(%error, "TLS certificate reload task failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A self-signed pair for `host`, written to `dir`.
    fn write_pair(dir: &Path, host: &str) -> CertificateFiles {
        let issued = rcgen::generate_simple_self_signed(vec![host.to_string()]).expect("cert");
        let files = CertificateFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
        };
        std::fs::write(&files.cert, issued.cert.pem()).expect("cert file");
        std::fs::write(&files.key, issued.signing_key.serialize_pem()).expect("key file");
        files
    }

    fn leaf(cert: &ReloadingCertificate) -> Vec<u8> {
        cert.current().cert[0].to_vec()
    }

    #[test]
    fn a_renewed_pair_replaces_the_served_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = write_pair(dir.path(), "relay.test");
        let cert = ReloadingCertificate::load(files.clone()).expect("loads");
        let first = leaf(&cert);
        let metrics = RelayMetrics::unregistered();
        let known = cert.reload_if_changed(cert.initial, &metrics);
        assert_eq!(known, cert.initial, "unchanged files are not reloaded");
        assert_eq!(leaf(&cert), first);

        write_pair(dir.path(), "relay.test");
        let renewed = cert.reload_if_changed(known, &metrics);
        assert_ne!(renewed, known);
        assert_ne!(leaf(&cert), first, "the renewed certificate is served");
    }

    #[test]
    fn a_pair_that_does_not_fit_keeps_the_old_one_serving() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = write_pair(dir.path(), "relay.test");
        let cert = ReloadingCertificate::load(files.clone()).expect("loads");
        let first = leaf(&cert);
        let other = tempfile::tempdir().expect("temp dir");
        let stranger = write_pair(other.path(), "other.test");
        std::fs::copy(&stranger.key, &files.key).expect("copying the wrong key");

        let error = files.load().expect_err("a key of another certificate");
        assert!(error.to_string().contains("do not fit"), "{error}");
        let known = cert.reload_if_changed(cert.initial, &RelayMetrics::unregistered());
        assert_ne!(
            known, cert.initial,
            "the broken pair is remembered, not retried"
        );
        assert_eq!(leaf(&cert), first, "the old certificate still serves");
    }

    #[test]
    fn a_relay_cannot_start_without_a_certificate_that_loads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = CertificateFiles {
            cert: dir.path().join("missing.crt"),
            key: dir.path().join("missing.key"),
        };
        let error = ReloadingCertificate::load(files).expect_err("no files");
        assert!(error.to_string().contains("missing.crt"), "{error}");
    }
}
