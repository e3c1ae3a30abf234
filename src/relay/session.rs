//! One SMTP session's I/O: the thin shell around [`super::protocol`].
//!
//! It reads client bytes into the protocol, writes its replies, runs the
//! upstream exchanges its actions ask for, does the STARTTLS handshake, and
//! keeps the clocks: the deadline to authenticate, the absolute session
//! deadline, the idle timeouts and the minimum data rate. Replies are
//! written when the input runs dry (one write for a pipelined batch). Each
//! step takes the config snapshot current at that moment.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::limits::ConnectionPermit;
use super::protocol::{Action, Protocol, Shared, Step, UpstreamResult};
use super::reload::ConfigStore;
use super::snapshot::RelaySnapshot;
use super::upstream::{Connection, Upstream};

/// Room made in the input buffer before each read: small while commands
/// come (a thousand idle sessions hold little), large for message data
/// (fewer reads).
const COMMAND_READ: usize = 4 * 1024;
const DATA_READ: usize = 64 * 1024;

/// How long a client may take, and how slowly it may send.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Waiting for a command (RFC 5321 suggests 5 minutes).
    pub command: Duration,
    /// Waiting for more message data (RFC 5321: 3 minutes per block).
    pub data: Duration,
    /// From connecting to a successful AUTH; NOOP and RSET do not extend it.
    pub authentication: Duration,
    /// The STARTTLS handshake.
    pub tls_handshake: Duration,
    /// The whole session, whatever it does.
    pub session: Duration,
    /// Bytes per second a DATA phase must average once it has run for
    /// `min_data_rate_after`; 0 turns the check off.
    pub min_data_rate: u64,
    pub min_data_rate_after: Duration,
}

/// What every session shares.
pub struct SessionContext {
    pub store: Arc<ConfigStore>,
    pub upstream: Arc<Upstream>,
    pub shared: Arc<Shared>,
    pub tls: Option<TlsAcceptor>,
    pub timeouts: Timeouts,
}

enum Outcome {
    Closed,
    StartTls,
}

/// When the next read must have happened, and what to say if not.
struct Deadline {
    at: Instant,
    why: &'static str,
    metric: &'static str,
}

struct Shell {
    context: Arc<SessionContext>,
    protocol: Protocol,
    /// The upstream connection holding this session's open transaction.
    held: Option<Connection>,
    started: Instant,
    data_started: Option<Instant>,
}

/// Runs a session on `tcp` to its end. Never fails: I/O errors end it.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    permit: ConnectionPermit,
    context: Arc<SessionContext>,
) {
    let _ = tcp.set_nodelay(true);
    let Some(snapshot) = context.store.current() else {
        return;
    };
    let mut shell = Shell {
        protocol: Protocol::new(
            context.shared.clone(),
            permit,
            peer.ip(),
            context.tls.is_some(),
        ),
        context,
        held: None,
        started: Instant::now(),
        data_started: None,
    };
    shell.protocol.greet(&step(&snapshot));
    drop(snapshot);
    let mut tcp = tcp;
    match shell.converse(&mut tcp).await {
        Ok(Outcome::StartTls) => {
            if let Some(acceptor) = shell.context.tls.clone() {
                shell.start_tls(acceptor, tcp, peer).await;
            }
        }
        Ok(Outcome::Closed) => {}
        Err(error) => tracing::debug!(%peer, %error, "session ended"),
    }
    shell.finish();
}

fn step(snapshot: &RelaySnapshot) -> Step<'_> {
    Step {
        snapshot,
        now: Instant::now(),
        utc: jiff::Timestamp::now(),
    }
}

impl Shell {
    async fn start_tls(&mut self, acceptor: TlsAcceptor, tcp: TcpStream, peer: SocketAddr) {
        let timeouts = self.context.timeouts;
        let mut limit = timeouts.tls_handshake;
        if !self.protocol.is_authenticated() {
            let left =
                (self.started + timeouts.authentication).saturating_duration_since(Instant::now());
            limit = limit.min(left);
        }
        match tokio::time::timeout(limit, acceptor.accept(tcp)).await {
            Ok(Ok(mut tls)) => {
                self.protocol.tls_started();
                if let Err(error) = self.converse(&mut tls).await {
                    tracing::debug!(%peer, %error, "session ended");
                }
                let _ = tls.shutdown().await;
            }
            Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
            Err(_) => {
                self.context
                    .shared
                    .metrics
                    .rejected("tls_handshake_timeout");
                tracing::debug!(%peer, "TLS handshake timed out");
            }
        }
    }

    /// The upstream connection goes back to the pool (reset first) when the
    /// session ends with a transaction open.
    fn finish(&mut self) {
        if let Some(mut connection) = self.held.take() {
            connection.needs_reset = true;
            self.context.upstream.release(connection);
        }
    }

    /// Once the protocol has no transaction open upstream, the connection
    /// it held is free for others.
    fn release_if_idle(&mut self) {
        if self.held.is_some() && !self.protocol.upstream_transaction_open() {
            self.finish();
        }
    }

    fn deadline(&mut self) -> Deadline {
        let timeouts = self.context.timeouts;
        let now = Instant::now();
        let mut deadline = Deadline {
            at: self.started + timeouts.session,
            why: "Session time limit reached",
            metric: "session_timeout",
        };
        let mut consider = |at: Instant, why, metric| {
            if at < deadline.at {
                deadline = Deadline { at, why, metric };
            }
        };
        if !self.protocol.is_authenticated() {
            consider(
                self.started + timeouts.authentication,
                "Authentication time limit reached",
                "auth_timeout",
            );
        }
        match self.protocol.data_bytes() {
            Some(bytes) => {
                let data_started = *self.data_started.get_or_insert(now);
                consider(
                    now + timeouts.data,
                    "Timeout waiting for message data",
                    "timeout",
                );
                if timeouts.min_data_rate > 0 {
                    let allowed =
                        Duration::from_secs_f64(bytes as f64 / timeouts.min_data_rate as f64);
                    consider(
                        data_started + timeouts.min_data_rate_after + allowed,
                        "Message data is arriving too slowly",
                        "data_too_slow",
                    );
                }
            }
            None => {
                self.data_started = None;
                consider(
                    now + timeouts.command,
                    "Timeout waiting for input",
                    "timeout",
                );
            }
        }
        deadline
    }

    async fn flush<S: AsyncWrite + Unpin>(&mut self, stream: &mut S) -> std::io::Result<()> {
        if !self.protocol.output().is_empty() {
            stream.write_all(self.protocol.output()).await?;
            stream.flush().await?;
            self.protocol.clear_output();
        }
        Ok(())
    }

    async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> std::io::Result<Outcome> {
        loop {
            self.flush(stream).await?;
            let deadline = self.deadline();
            let room = if self.protocol.data_bytes().is_some() {
                DATA_READ
            } else {
                COMMAND_READ
            };
            let input = self.protocol.input();
            input.reserve(room);
            let read = tokio::time::timeout_at(deadline.at.into(), stream.read_buf(input)).await;
            match read {
                Err(_) => {
                    self.protocol.expired(deadline.why, deadline.metric);
                    let _ = self.flush(stream).await;
                    return Ok(Outcome::Closed);
                }
                Ok(Ok(0)) => return Ok(Outcome::Closed),
                Ok(Err(error)) => return Err(error),
                Ok(Ok(_)) => {}
            }
            if let Some(outcome) = self.process().await {
                self.flush(stream).await?;
                return Ok(outcome);
            }
        }
    }

    /// Runs the protocol over the input read so far, with the upstream
    /// exchanges it asks for, until it needs more input.
    async fn process(&mut self) -> Option<Outcome> {
        loop {
            let snapshot = self.context.store.current()?;
            let action = self.protocol.next(&step(&snapshot));
            self.release_if_idle();
            let settings = &snapshot.settings;
            match action {
                Action::NeedInput => return None,
                Action::Envelope(commands) => {
                    let protocol = &self.protocol;
                    let replies = self
                        .context
                        .upstream
                        .envelope(
                            &mut self.held,
                            &settings.upstream,
                            &settings.hostname,
                            || protocol.envelope_so_far(),
                            &commands,
                        )
                        .await;
                    self.protocol
                        .envelope_replies(replies.map_err(|unavailable| unavailable.0));
                }
                Action::Deliver(message) => {
                    let protocol = &self.protocol;
                    let started = Instant::now();
                    let result = self
                        .context
                        .upstream
                        .deliver(
                            &mut self.held,
                            &settings.upstream,
                            &settings.hostname,
                            || protocol.envelope_so_far(),
                            &message,
                        )
                        .await;
                    let metrics = &self.context.shared.metrics;
                    match &result {
                        UpstreamResult::Replied(reply) if (200..300).contains(&reply.code) => {
                            metrics.forwarded(started.elapsed());
                        }
                        _ => metrics.upstream_failed(started.elapsed()),
                    }
                    self.protocol.delivered(result);
                }
                Action::StartTls => return Some(Outcome::StartTls),
                Action::Close => return Some(Outcome::Closed),
            }
        }
    }
}
