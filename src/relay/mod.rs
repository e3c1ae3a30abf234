//! The signing relay: SMTP submission, tenant AUTH, sender policy, DKIM
//! signing, forwarding.
//!
//! Pure core: [`protocol`] (the SMTP state machine), [`command`] and
//! [`path`] (command lines and envelope addresses), [`data`] (message
//! data), [`message`] (the header section, as the signer reads it),
//! [`policy`] (who may send as what), [`address`] (From header addresses),
//! [`auth`] (credential hashes), [`limits`] (connection slots, tenant
//! budgets, AUTH throttle), [`rate_limit`], [`snapshot`] (the merged
//! config). Shells: [`session`] (one connection's I/O and clocks),
//! [`server`] (listener and admission), [`upstream`] (the smarthost client
//! and pool), [`reload`] (config directory polling), [`metrics`].
//! docs/relay.md describes the limits and the choices behind them.

pub mod address;
pub mod auth;
pub mod command;
pub mod config;
pub mod data;
pub mod limits;
pub mod log;
pub mod message;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod protocol;
pub mod rate_limit;
pub mod reload;
pub mod server;
pub mod session;
pub mod signing;
pub mod snapshot;
pub mod tls;
pub mod upstream;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use prometheus_client::registry::Registry;

pub use auth::hash_password;

use crate::controller::parse_std_duration;

/// Settings of `mailauth-operator relay`.
#[derive(Args, Debug, Clone)]
pub struct RelayArgs {
    /// Read the config from a directory holding `relay.json` and
    /// `domains-*.json` (a relay outside a cluster, or a mounted Secret).
    /// Re-read when it changes, without a restart.
    #[arg(
        long,
        required_unless_present = "config_secrets",
        conflicts_with = "config_secrets"
    )]
    pub config_dir: Option<PathBuf>,

    /// Read the config from the Secrets of this MailRelay (labelled
    /// `mailauth.dev/relay-config=<name>`) in `--namespace`, watched through
    /// the API server: how the operator runs relays. Changes arrive within a
    /// second; while the API server is away the last good config serves.
    #[arg(long, value_name = "MAILRELAY")]
    pub config_secrets: Option<String>,

    /// The namespace of the config Secrets (in a pod: its own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,

    /// Where SMTP submission is served.
    #[arg(long, default_value = "0.0.0.0:587")]
    pub listen: SocketAddr,

    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub admin_listen: SocketAddr,

    /// PEM certificate chain offered by STARTTLS (e.g. `tls.crt` of a
    /// cert-manager Secret). Without it STARTTLS is not offered.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// How long a client may take to send a command.
    #[arg(long, default_value = "5m", value_parser = parse_std_duration)]
    pub command_timeout: Duration,

    /// How long a client may pause while sending message data.
    #[arg(long, default_value = "3m", value_parser = parse_std_duration)]
    pub data_timeout: Duration,

    /// Timeout of each exchange with the upstream.
    #[arg(long, default_value = "60s", value_parser = parse_std_duration)]
    pub upstream_timeout: Duration,

    /// Idle upstream connections kept open for reuse.
    #[arg(long, default_value_t = 64)]
    pub upstream_pool_size: usize,

    /// How long a client may take from connecting to a successful AUTH
    /// (STARTTLS included). NOOP and RSET do not extend it.
    #[arg(long, default_value = "30s", value_parser = parse_std_duration)]
    pub auth_timeout: Duration,

    /// How long a STARTTLS handshake may take.
    #[arg(long, default_value = "10s", value_parser = parse_std_duration)]
    pub tls_handshake_timeout: Duration,

    /// The longest a session may last, whatever it does.
    #[arg(long, default_value = "30m", value_parser = parse_std_duration)]
    pub session_timeout: Duration,

    /// Bytes per second that message data must average once it has run
    /// for --min-data-rate-after; slower senders get 421. 0 turns the
    /// check off.
    #[arg(long, default_value_t = 1024)]
    pub min_data_rate: u64,

    /// How long message data may run before --min-data-rate applies.
    #[arg(long, default_value = "30s", value_parser = parse_std_duration)]
    pub min_data_rate_after: Duration,

    /// Each replica enforces the per-domain rate limits divided by this:
    /// set it to the number of replicas so the limits hold for the whole
    /// relay (docs/relay.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate_limit_share: u32,

    /// How often the config directory is checked for changes.
    #[arg(long, default_value = "1s", value_parser = parse_std_duration)]
    pub reload_interval: Duration,
}

/// Everything that stops the relay or a config from loading.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("reading relay config {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Never quotes the settings: they hold the upstream password.
    #[error("the relay settings {part} cannot be used: {problem}")]
    ConfigParse {
        part: String,
        problem: snapshot::JsonProblem,
    },
    #[error("the relay config has no {} (settings)", config::SETTINGS_FILE)]
    NoSettings,
    #[error("the upstream CA certificates in the relay config cannot be used: {0}")]
    UpstreamCa(String),
    #[error("connecting to the API server for the config Secrets: {0}")]
    Kube(#[from] kube::Error),
    #[error("TLS certificate {cert}: {reason}")]
    Tls { cert: PathBuf, reason: String },
    #[error("setting up the upstream TLS client: {0}")]
    UpstreamTls(String),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin server: {0}")]
    Admin(std::io::Error),
}

/// Runs the relay until SIGTERM or Ctrl-C, then lets open sessions finish
/// (up to the command timeout).
pub async fn run(args: RelayArgs) -> Result<(), RelayError> {
    crate::telemetry::init();
    let mut registry = Registry::default();
    let metrics = metrics::RelayMetrics::register(&mut registry);
    let store = Arc::new(reload::ConfigStore::default());

    let mut reloader = reload::Reloader::new(store.clone(), metrics.clone());
    let config_source = match (&args.config_dir, &args.config_secrets) {
        (Some(dir), _) => {
            let dir = dir.clone();
            let (known, reloader) = tokio::task::spawn_blocking(move || {
                let known = reload::initial_load_dir(&dir, &mut reloader);
                (known, reloader)
            })
            .await
            .map_err(|error| RelayError::Admin(std::io::Error::other(error)))?;
            ConfigSource::Dir { known, reloader }
        }
        (None, Some(relay)) => ConfigSource::Secrets {
            client: kube::Client::try_default().await?,
            relay: relay.clone(),
            reloader,
        },
        (None, None) => return Err(RelayError::NoSettings),
    };
    if !store
        .loaded_flag()
        .load(std::sync::atomic::Ordering::Relaxed)
    {
        tracing::warn!("no valid relay config yet; waiting for one");
    }

    let certificate = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::ReloadingCertificate::load(tls::CertificateFiles {
            cert: cert.clone(),
            key: key.clone(),
        })?),
        _ => None,
    };
    let tls = certificate
        .as_ref()
        .map(tls::ReloadingCertificate::acceptor)
        .transpose()?;
    let upstream = upstream::Upstream::new(args.upstream_timeout, args.upstream_pool_size)
        .map_err(RelayError::UpstreamTls)?;
    let context = Arc::new(session::SessionContext {
        store: store.clone(),
        upstream: Arc::new(upstream),
        shared: Arc::new(protocol::Shared {
            rate_limiter: rate_limit::RateLimiter::default(),
            auth_throttle: limits::AuthThrottle::default(),
            metrics: metrics.clone(),
            rate_limit_share: args.rate_limit_share,
        }),
        tls,
        timeouts: session::Timeouts {
            command: args.command_timeout,
            data: args.data_timeout,
            authentication: args.auth_timeout,
            tls_handshake: args.tls_handshake_timeout,
            session: args.session_timeout,
            min_data_rate: args.min_data_rate,
            min_data_rate_after: args.min_data_rate_after,
        },
    });

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| RelayError::Listen {
            addr: args.listen,
            source,
        })?;
    tracing::info!(addr = %args.listen, starttls = context.tls.is_some(), "relay listening");

    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin = tokio::spawn(crate::admin::serve(
        args.admin_listen,
        Arc::new(registry),
        store.loaded_flag(),
        async move {
            let _ = admin_stopped.await;
        },
    ));
    let watcher = match config_source {
        ConfigSource::Dir { known, reloader } => tokio::spawn(reload::watch_dir(
            args.config_dir.clone().unwrap_or_default(),
            known,
            args.reload_interval,
            reloader,
        )),
        ConfigSource::Secrets {
            client,
            relay,
            reloader,
        } => tokio::spawn(reload::watch_secrets(
            client,
            args.namespace.clone(),
            relay,
            CONFIG_DEBOUNCE,
            reloader,
        )),
    };
    let certificate_watcher = certificate
        .map(|certificate| tokio::spawn(certificate.watch(args.reload_interval, metrics.clone())));
    let admission = Arc::new(limits::Admission::default());
    let accepting = tokio::spawn(server::accept_loop(listener, admission.clone(), context));

    let result = tokio::select! {
        () = shutdown_signal() => Ok(()),
        admin_result = admin => match admin_result {
            Ok(Err(error)) => Err(RelayError::Admin(error)),
            _ => Ok(()),
        },
    };
    accepting.abort();
    watcher.abort();
    if let Some(certificate_watcher) = certificate_watcher {
        certificate_watcher.abort();
    }
    let _ = stop_admin.send(());
    drain(&admission, args.command_timeout).await;
    result
}

/// Config Secret changes arriving within this long of each other are built
/// into one snapshot (a rotation wave rewrites many shards at once).
const CONFIG_DEBOUNCE: Duration = Duration::from_millis(100);

/// Where the relay's config comes from.
enum ConfigSource {
    Dir {
        known: Option<String>,
        reloader: reload::Reloader,
    },
    Secrets {
        client: kube::Client,
        relay: String,
        reloader: reload::Reloader,
    },
}

/// Waits until open sessions end, at most `limit`.
async fn drain(admission: &limits::Admission, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while admission.open() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
