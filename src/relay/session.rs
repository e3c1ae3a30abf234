//! One SMTP submission session: commands parsed by smtp-proto, the state
//! machine of EHLO / STARTTLS / AUTH / MAIL / RCPT / DATA, and the path of
//! an accepted message through policy, rate limit, signing and upstream.
//!
//! Replies are collected and written when the input runs dry, which is
//! what PIPELINING needs and saves a write per command. The session keeps
//! the config snapshot it started with until it ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_proto::request::receiver::{DataReceiver, LineReceiver, RequestReceiver};
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_AUTH, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING,
    EXT_SIZE, EXT_START_TLS, EhloResponse, Request,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::auth::{PresentedCredentials, decode_base64_line, decode_plain};
use super::message::check_line_lengths;
use super::metrics::RelayMetrics;
use super::policy::{Refusal, check_envelope_sender, check_header_sender};
use super::rate_limit::RateLimiter;
use super::signing::sign_message;
use super::snapshot::RelaySnapshot;
use super::upstream::{Envelope, ForwardError, Upstream};

/// Wrong passwords allowed per connection before it is closed.
const MAX_AUTH_FAILURES: u32 = 3;
/// Errors allowed per connection before it is closed (a client that
/// speaks something else, or a scanner).
const MAX_ERRORS: u32 = 20;
const READ_BUFFER: usize = 64 * 1024;

/// How long a client may stay silent.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// Waiting for a command (RFC 5321 suggests 5 minutes).
    pub command: Duration,
    /// Waiting for more message data (RFC 5321: 3 minutes per block).
    pub data: Duration,
}

/// What every session shares.
pub struct SessionContext {
    pub upstream: Arc<Upstream>,
    pub rate_limiter: Arc<RateLimiter>,
    pub metrics: Arc<RelayMetrics>,
    pub tls: Option<TlsAcceptor>,
    pub timeouts: Timeouts,
}

/// Runs a session on `tcp` to its end. Never fails: I/O errors end it.
pub async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    snapshot: Arc<RelaySnapshot>,
    context: Arc<SessionContext>,
) {
    let _ = tcp.set_nodelay(true);
    let mut session = Session {
        snapshot,
        context,
        peer,
        tls_active: false,
        helo: None,
        tenant: None,
        transaction: None,
        auth_failures: 0,
        errors: 0,
    };
    let mut tcp = tcp;
    let greeting = format!(
        "220 {} ESMTP mailauth relay\r\n",
        session.snapshot.settings.hostname
    );
    if tcp.write_all(greeting.as_bytes()).await.is_err() {
        return;
    }
    match session.converse(&mut tcp).await {
        Ok(Outcome::StartTls) => {
            let Some(acceptor) = session.context.tls.clone() else {
                return;
            };
            let handshake =
                tokio::time::timeout(session.context.timeouts.command, acceptor.accept(tcp)).await;
            match handshake {
                Ok(Ok(mut tls)) => {
                    // RFC 3207: forget everything learnt before TLS.
                    session.tls_active = true;
                    session.helo = None;
                    session.tenant = None;
                    session.transaction = None;
                    if let Err(error) = session.converse(&mut tls).await {
                        tracing::debug!(peer = %session.peer, %error, "session ended");
                    }
                    let _ = tls.shutdown().await;
                }
                Ok(Err(error)) => {
                    tracing::debug!(peer = %session.peer, %error, "TLS handshake failed");
                }
                Err(_) => tracing::debug!(peer = %session.peer, "TLS handshake timed out"),
            }
        }
        Ok(Outcome::Closed) => {}
        Err(error) => tracing::debug!(peer = %session.peer, %error, "session ended"),
    }
}

enum Outcome {
    Closed,
    StartTls,
}

struct Transaction {
    mail_from: String,
    recipients: Vec<String>,
}

enum Mode {
    Command,
    Data {
        receiver: DataReceiver,
        message: Vec<u8>,
        too_big: bool,
    },
    AuthPlain(LineReceiver<()>),
    AuthLoginUsername(LineReceiver<()>),
    AuthLoginPassword {
        username: String,
        line: LineReceiver<()>,
    },
}

/// What a command asks of the connection after its reply.
enum Next {
    Continue,
    Mode(Mode),
    StartTls,
    Close,
}

struct Session {
    snapshot: Arc<RelaySnapshot>,
    context: Arc<SessionContext>,
    peer: SocketAddr,
    tls_active: bool,
    helo: Option<String>,
    /// The authenticated username.
    tenant: Option<String>,
    transaction: Option<Transaction>,
    auth_failures: u32,
    errors: u32,
}

fn reply(out: &mut Vec<u8>, code: u16, text: &str) {
    out.extend_from_slice(format!("{code} {text}\r\n").as_bytes());
}

/// A DATA receiver that knows it starts at the beginning of a line, so a
/// leading "." line ends the message and a leading ".." is unstuffed
/// (smtp-proto's receiver starts as if in the middle of a line).
fn data_receiver() -> DataReceiver {
    let mut receiver = DataReceiver::new();
    let mut scratch = Vec::new();
    receiver.ingest(&mut b"\r\n".iter(), &mut scratch);
    receiver
}

impl Session {
    fn max_message_bytes(&self) -> usize {
        usize::try_from(self.snapshot.settings.limits.max_message_bytes).unwrap_or(usize::MAX)
    }

    fn auth_allowed(&self) -> bool {
        self.tls_active || self.snapshot.settings.allow_plaintext_auth
    }

    async fn converse<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
    ) -> std::io::Result<Outcome> {
        let mut input = vec![0u8; READ_BUFFER];
        let mut requests = RequestReceiver::default();
        let mut mode = Mode::Command;
        let mut out = Vec::with_capacity(1024);
        loop {
            if !out.is_empty() {
                stream.write_all(&out).await?;
                stream.flush().await?;
                out.clear();
            }
            let timeout = match mode {
                Mode::Data { .. } => self.context.timeouts.data,
                _ => self.context.timeouts.command,
            };
            let read = match tokio::time::timeout(timeout, stream.read(&mut input)).await {
                Ok(read) => read?,
                Err(_) => {
                    self.context.metrics.rejected("timeout");
                    let _ = stream
                        .write_all(b"421 4.4.2 Timeout waiting for input, closing\r\n")
                        .await;
                    return Ok(Outcome::Closed);
                }
            };
            if read == 0 {
                return Ok(Outcome::Closed);
            }
            let mut bytes = input[..read].iter();
            while !bytes.as_slice().is_empty() {
                let next = match &mut mode {
                    Mode::Command => {
                        let before = bytes.as_slice().len();
                        match requests.ingest(&mut bytes) {
                            Ok(request) => {
                                let request = request.into_owned();
                                self.command(request, &mut out)
                            }
                            Err(smtp_proto::Error::NeedsMoreData { .. }) => break,
                            Err(error) => {
                                self.syntax_error(&error, &mut out);
                                if bytes.as_slice().len() == before {
                                    // No progress: drop the rest rather than spin.
                                    bytes = [].iter();
                                }
                                if self.errors > MAX_ERRORS {
                                    reply(&mut out, 421, "4.7.0 Too many errors, closing");
                                    Next::Close
                                } else {
                                    Next::Continue
                                }
                            }
                        }
                    }
                    Mode::Data {
                        receiver,
                        message,
                        too_big,
                    } => {
                        if receiver.ingest(&mut bytes, message) {
                            let message = std::mem::take(message);
                            // A message that arrived in one read was never
                            // measured below: check it here too.
                            let too_big = *too_big || message.len() > self.max_message_bytes();
                            let (code, text) = self.deliver(message, too_big).await;
                            reply(&mut out, code, &text);
                            Next::Mode(Mode::Command)
                        } else {
                            if message.len() > self.max_message_bytes() {
                                // Keep reading to the end of the data, but
                                // stop storing it.
                                *too_big = true;
                                message.clear();
                            }
                            Next::Continue
                        }
                    }
                    Mode::AuthPlain(line) => {
                        if !line.ingest(&mut bytes) {
                            break;
                        }
                        let line = std::mem::take(&mut line.buf);
                        self.auth_plain_response(&line, &mut out)
                    }
                    Mode::AuthLoginUsername(line) => {
                        if !line.ingest(&mut bytes) {
                            break;
                        }
                        let line = std::mem::take(&mut line.buf);
                        self.auth_login_username(&line, &mut out)
                    }
                    Mode::AuthLoginPassword { username, line } => {
                        if !line.ingest(&mut bytes) {
                            break;
                        }
                        let line = std::mem::take(&mut line.buf);
                        let username = std::mem::take(username);
                        self.auth_login_password(username, &line, &mut out)
                    }
                };
                match next {
                    Next::Continue => {}
                    Next::Mode(new_mode) => mode = new_mode,
                    Next::StartTls => {
                        stream.write_all(&out).await?;
                        stream.flush().await?;
                        // Anything the client pipelined after STARTTLS is
                        // dropped: it would be injected into the TLS session.
                        return Ok(Outcome::StartTls);
                    }
                    Next::Close => {
                        stream.write_all(&out).await?;
                        stream.flush().await?;
                        return Ok(Outcome::Closed);
                    }
                }
            }
        }
    }

    fn syntax_error(&mut self, error: &smtp_proto::Error, out: &mut Vec<u8>) {
        use smtp_proto::Error;
        self.errors += 1;
        self.context.metrics.rejected("syntax");
        match error {
            Error::UnknownCommand => reply(out, 500, "5.5.1 Unknown command"),
            Error::InvalidSenderAddress => reply(out, 501, "5.1.7 Bad sender address syntax"),
            Error::InvalidRecipientAddress => reply(out, 501, "5.1.3 Bad recipient address syntax"),
            Error::SyntaxError { syntax } => reply(out, 501, &format!("5.5.4 Syntax: {syntax}")),
            Error::InvalidParameter { param } => {
                reply(out, 501, &format!("5.5.4 Invalid parameter {param}"))
            }
            Error::UnsupportedParameter { param } => {
                let param: String = param
                    .chars()
                    .filter(|c| c.is_ascii_graphic())
                    .take(64)
                    .collect();
                reply(out, 504, &format!("5.5.4 Unsupported parameter {param}"))
            }
            Error::ResponseTooLong => reply(out, 500, "5.5.2 Line too long"),
            _ => reply(out, 500, "5.5.2 Syntax error"),
        }
    }

    /// Counts, logs and words a policy refusal.
    fn refusal_reply(&self, refusal: &Refusal) -> (u16, String) {
        self.context.metrics.rejected(refusal.reason());
        let (code, status) = match refusal {
            Refusal::NotAuthenticated => (530, "5.7.0"),
            Refusal::MalformedMessage(_) => (554, "5.6.0"),
            _ => (550, "5.7.1"),
        };
        tracing::info!(
            peer = %self.peer,
            tenant = self.tenant.as_deref().unwrap_or(""),
            reason = refusal.reason(),
            "sender refused"
        );
        (code, format!("{status} {refusal}"))
    }

    fn refuse(&self, refusal: &Refusal, out: &mut Vec<u8>) {
        let (code, text) = self.refusal_reply(refusal);
        reply(out, code, &text);
    }

    fn command(&mut self, request: Request<String>, out: &mut Vec<u8>) -> Next {
        match request {
            Request::Ehlo { host } => {
                let mut response = EhloResponse::new(self.snapshot.settings.hostname.as_str());
                response.capabilities =
                    EXT_SIZE | EXT_PIPELINING | EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES;
                if self.context.tls.is_some() && !self.tls_active {
                    response.capabilities |= EXT_START_TLS;
                }
                if self.auth_allowed() && self.tenant.is_none() {
                    response.capabilities |= EXT_AUTH;
                    response.auth_mechanisms = AUTH_PLAIN | AUTH_LOGIN;
                }
                response.size = self.max_message_bytes();
                // Writing to a Vec cannot fail.
                let _ = response.write(&mut *out);
                self.helo = Some(host);
                self.transaction = None;
                Next::Continue
            }
            Request::Helo { host } => {
                reply(out, 250, &self.snapshot.settings.hostname);
                self.helo = Some(host);
                self.transaction = None;
                Next::Continue
            }
            Request::StartTls => {
                if self.tls_active {
                    reply(out, 503, "5.5.1 TLS already active");
                    Next::Continue
                } else if self.context.tls.is_none() {
                    reply(out, 454, "4.7.0 TLS not available");
                    Next::Continue
                } else {
                    reply(out, 220, "2.0.0 Ready to start TLS");
                    Next::StartTls
                }
            }
            Request::Auth {
                mechanism,
                initial_response,
            } => self.auth(mechanism, initial_response, out),
            Request::Mail { from } => {
                self.mail_from(from.address, from.size, out);
                Next::Continue
            }
            Request::Rcpt { to } => {
                self.rcpt_to(to.address, out);
                Next::Continue
            }
            Request::Data => match &self.transaction {
                None => {
                    reply(out, 503, "5.5.1 MAIL FROM first");
                    Next::Continue
                }
                Some(transaction) if transaction.recipients.is_empty() => {
                    reply(out, 554, "5.5.1 No valid recipients");
                    Next::Continue
                }
                Some(_) => {
                    reply(out, 354, "Start mail input; end with <CRLF>.<CRLF>");
                    Next::Mode(Mode::Data {
                        receiver: data_receiver(),
                        message: Vec::with_capacity(16 * 1024),
                        too_big: false,
                    })
                }
            },
            Request::Rset => {
                self.transaction = None;
                reply(out, 250, "2.0.0 OK");
                Next::Continue
            }
            Request::Noop { .. } => {
                reply(out, 250, "2.0.0 OK");
                Next::Continue
            }
            Request::Quit => {
                reply(out, 221, "2.0.0 Bye");
                Next::Close
            }
            Request::Vrfy { .. } => {
                reply(out, 252, "2.5.2 Cannot VRFY user");
                Next::Continue
            }
            Request::Bdat { .. } => {
                // Its binary chunk follows at once; without CHUNKING we
                // cannot find the next command, so the session ends.
                reply(out, 502, "5.5.1 CHUNKING not offered, closing");
                Next::Close
            }
            Request::Lhlo { .. }
            | Request::Expn { .. }
            | Request::Help { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                reply(out, 502, "5.5.1 Command not implemented");
                Next::Continue
            }
        }
    }

    fn auth(&mut self, mechanism: u64, initial_response: String, out: &mut Vec<u8>) -> Next {
        if self.tenant.is_some() {
            reply(out, 503, "5.5.1 Already authenticated");
            return Next::Continue;
        }
        if self.transaction.is_some() {
            reply(out, 503, "5.5.1 AUTH not allowed during a mail transaction");
            return Next::Continue;
        }
        if !self.auth_allowed() {
            self.context.metrics.rejected("auth_without_tls");
            reply(out, 538, "5.7.11 Encryption required: use STARTTLS first");
            return Next::Continue;
        }
        match mechanism {
            AUTH_PLAIN if initial_response.is_empty() => {
                reply(out, 334, "");
                Next::Mode(Mode::AuthPlain(LineReceiver::new(())))
            }
            AUTH_PLAIN => self.auth_plain_response(initial_response.as_bytes(), out),
            AUTH_LOGIN if initial_response.is_empty() => {
                reply(out, 334, "VXNlcm5hbWU6");
                Next::Mode(Mode::AuthLoginUsername(LineReceiver::new(())))
            }
            AUTH_LOGIN => self.auth_login_username(initial_response.as_bytes(), out),
            _ => {
                reply(out, 504, "5.5.4 Use AUTH PLAIN or LOGIN");
                Next::Continue
            }
        }
    }

    fn auth_cancelled(line: &[u8], out: &mut Vec<u8>) -> bool {
        if line.trim_ascii() == b"*" {
            reply(out, 501, "5.0.0 Authentication cancelled");
            true
        } else {
            false
        }
    }

    fn auth_plain_response(&mut self, line: &[u8], out: &mut Vec<u8>) -> Next {
        if Self::auth_cancelled(line, out) {
            return Next::Mode(Mode::Command);
        }
        match decode_plain(line) {
            Ok(credentials) => self.check_credentials(credentials, out),
            Err(error) => {
                self.errors += 1;
                reply(out, 501, &format!("5.5.2 {error}"));
                Next::Mode(Mode::Command)
            }
        }
    }

    fn auth_login_username(&mut self, line: &[u8], out: &mut Vec<u8>) -> Next {
        if Self::auth_cancelled(line, out) {
            return Next::Mode(Mode::Command);
        }
        let username = decode_base64_line(line)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        match username {
            Some(username) => {
                reply(out, 334, "UGFzc3dvcmQ6");
                Next::Mode(Mode::AuthLoginPassword {
                    username,
                    line: LineReceiver::new(()),
                })
            }
            None => {
                self.errors += 1;
                reply(out, 501, "5.5.2 The username is not base64 UTF-8");
                Next::Mode(Mode::Command)
            }
        }
    }

    fn auth_login_password(&mut self, username: String, line: &[u8], out: &mut Vec<u8>) -> Next {
        if Self::auth_cancelled(line, out) {
            return Next::Mode(Mode::Command);
        }
        match decode_base64_line(line) {
            Ok(password) => {
                self.check_credentials(PresentedCredentials { username, password }, out)
            }
            Err(error) => {
                self.errors += 1;
                reply(out, 501, &format!("5.5.2 {error}"));
                Next::Mode(Mode::Command)
            }
        }
    }

    fn check_credentials(&mut self, credentials: PresentedCredentials, out: &mut Vec<u8>) -> Next {
        let valid = self
            .snapshot
            .tenant(&credentials.username)
            .is_some_and(|tenant| tenant.password_matches(&credentials.password));
        if valid {
            tracing::debug!(peer = %self.peer, tenant = %credentials.username, "authenticated");
            self.tenant = Some(credentials.username);
            reply(out, 235, "2.7.0 Authentication successful");
            return Next::Mode(Mode::Command);
        }
        self.auth_failures += 1;
        self.context.metrics.rejected("auth_failed");
        tracing::info!(peer = %self.peer, username = %credentials.username, "authentication failed");
        reply(out, 535, "5.7.8 Authentication credentials invalid");
        if self.auth_failures >= MAX_AUTH_FAILURES {
            reply(out, 421, "4.7.0 Too many failed authentications, closing");
            return Next::Close;
        }
        Next::Mode(Mode::Command)
    }

    fn mail_from(&mut self, address: String, declared_size: usize, out: &mut Vec<u8>) {
        if self.helo.is_none() {
            reply(out, 503, "5.5.1 Say EHLO first");
            return;
        }
        if self.transaction.is_some() {
            reply(out, 503, "5.5.1 Nested MAIL command");
            return;
        }
        let Some(tenant) = self
            .tenant
            .as_deref()
            .and_then(|name| self.snapshot.tenant(name))
        else {
            self.refuse(&Refusal::NotAuthenticated, out);
            return;
        };
        if declared_size > self.max_message_bytes() {
            self.context.metrics.rejected("message_too_big");
            reply(out, 552, "5.3.4 Message size exceeds the limit");
            return;
        }
        if let Err(refusal) = check_envelope_sender(&tenant.grant, &address) {
            self.refuse(&refusal, out);
            return;
        }
        self.transaction = Some(Transaction {
            mail_from: address,
            recipients: Vec::new(),
        });
        reply(out, 250, "2.1.0 Sender OK");
    }

    fn rcpt_to(&mut self, address: String, out: &mut Vec<u8>) {
        let max = self.snapshot.settings.limits.max_recipients as usize;
        let Some(transaction) = self.transaction.as_mut() else {
            reply(out, 503, "5.5.1 MAIL FROM first");
            return;
        };
        if address.is_empty() {
            reply(out, 501, "5.1.3 An empty recipient is not allowed");
        } else if transaction.recipients.len() >= max {
            self.context.metrics.rejected("too_many_recipients");
            reply(out, 452, "4.5.3 Too many recipients");
        } else {
            transaction.recipients.push(address);
            reply(out, 250, "2.1.5 Recipient OK");
        }
    }

    /// Everything after the final dot: checks, rate limit, signing and the
    /// upstream. Returns the reply for the client.
    async fn deliver(&mut self, message: Vec<u8>, too_big: bool) -> (u16, String) {
        let Some(transaction) = self.transaction.take() else {
            return (503, "5.5.1 MAIL FROM first".into());
        };
        let metrics = self.context.metrics.clone();
        if too_big {
            metrics.rejected("message_too_big");
            return (552, "5.3.4 Message size exceeds the limit".into());
        }
        if let Err(error) = check_line_lengths(&message) {
            metrics.rejected("line_too_long");
            return (554, format!("5.6.0 {error}"));
        }
        let snapshot = self.snapshot.clone();
        let Some(tenant) = self
            .tenant
            .as_deref()
            .and_then(|name| snapshot.tenant(name))
        else {
            metrics.rejected(Refusal::NotAuthenticated.reason());
            return (530, "5.7.0 Authentication required".into());
        };
        let domain_name = match check_header_sender(&tenant.grant, &message) {
            Ok(domain) => domain,
            Err(refusal) => return self.refusal_reply(&refusal),
        };
        let Some(domain) = snapshot.domain(domain_name) else {
            metrics.rejected("header_domain_not_allowed");
            return (
                550,
                "5.7.1 The From domain is not served by this relay".into(),
            );
        };
        if !self.context.rate_limiter.try_acquire(
            &tenant.username,
            &domain.domain,
            domain.messages_per_minute,
            Instant::now(),
        ) {
            metrics.rejected("rate_limited");
            tracing::info!(tenant = %tenant.username, domain = %domain.domain, "rate limit exceeded");
            return (
                451,
                format!(
                    "4.7.1 Rate limit of {} messages per minute for {} exceeded; try again later",
                    domain.messages_per_minute, domain.domain
                ),
            );
        }
        let signed = match sign_message(&domain.signers, &message) {
            Ok(signed) => signed,
            Err(error) => {
                metrics.rejected("signing_failed");
                tracing::error!(domain = %domain.domain, %error, "signing failed");
                return (451, "4.3.0 Signing failed; try again later".into());
            }
        };
        metrics.signed();
        let envelope = Envelope {
            mail_from: transaction.mail_from,
            recipients: transaction.recipients,
        };
        let started = Instant::now();
        let result = self
            .context
            .upstream
            .forward(
                &snapshot.settings.upstream,
                &snapshot.settings.hostname,
                &envelope,
                &signed,
            )
            .await;
        let latency = started.elapsed();
        match result {
            Ok(()) => {
                metrics.forwarded(latency);
                metrics.accepted();
                tracing::info!(
                    tenant = %tenant.username,
                    domain = %domain.domain,
                    recipients = envelope.recipients.len(),
                    bytes = signed.len(),
                    upstream_ms = latency.as_millis() as u64,
                    "message relayed"
                );
                (250, "2.0.0 Message accepted".into())
            }
            Err(ForwardError::Unavailable(error)) => {
                metrics.upstream_failed(latency);
                metrics.rejected("upstream_unavailable");
                tracing::warn!(%error, "upstream unavailable");
                (451, "4.4.1 Upstream unavailable; try again later".into())
            }
            Err(ForwardError::Refused(response)) => {
                metrics.upstream_failed(latency);
                metrics.rejected(if response.code() >= 500 {
                    "upstream_refused"
                } else {
                    "upstream_deferred"
                });
                tracing::info!(code = response.code(), "upstream refused the message");
                let code = if (400..600).contains(&response.code()) {
                    response.code()
                } else {
                    451
                };
                let [class, subject, detail] = response.esc;
                let status = if class == 0 {
                    format!("{}.0.0", code / 100)
                } else {
                    format!("{class}.{subject}.{detail}")
                };
                let text: String = response
                    .message
                    .chars()
                    .map(|c| if c.is_control() { ' ' } else { c })
                    .collect();
                (code, format!("{status} Upstream: {text}"))
            }
        }
    }
}
