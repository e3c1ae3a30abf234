//! The upstream side of a session: an SMTP client over a small pool of open
//! connections, driven by the protocol's envelope batches and deliveries
//! (see [`super::protocol`]).
//!
//! mail-send sets a connection up (TLS, EHLO, AUTH); the transaction itself
//! is written here from the protocol's parsed commands, so no client byte
//! reaches the upstream unparsed. Pipelined commands leave in one write.
//!
//! Nothing acknowledged is lost, nothing is sent twice: a connection that
//! turns out to be closed is replaced, and the envelope accepted so far
//! replayed on the new one, only while no message content has gone out on
//! it; once content was sent, a failure is a 451 for the client to retry.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mail_send::{Credentials, SmtpClient};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::{EXT_8BIT_MIME, EXT_CHUNKING, EXT_PIPELINING, EXT_SIZE, EXT_START_TLS, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls;

use super::command::Body;
use super::config::UpstreamSettings;
use super::protocol::{EnvelopeCommand, SIGNING_ALLOWANCE, Signed, UpstreamResult};
use crate::api::UpstreamTls;

/// Any byte stream to the upstream: plain TCP or TLS.
pub trait UpstreamStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> UpstreamStream for T {}

type Client = SmtpClient<Box<dyn UpstreamStream>>;

/// Why the upstream cannot be used now (the client gets a 451).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Unavailable(pub String);

/// What the upstream offered in its EHLO reply.
#[derive(Clone, Copy, Debug, Default)]
struct Capabilities {
    pipelining: bool,
    eight_bit_mime: bool,
    size: bool,
    chunking: bool,
}

/// One open connection to the upstream, between transactions in the pool
/// or held by a session for its transaction.
pub struct Connection {
    stream: Box<dyn UpstreamStream>,
    /// Bytes read but not yet parsed.
    read_buffer: Vec<u8>,
    capabilities: Capabilities,
    settings: UpstreamSettings,
    /// A transaction was left open on it (the client gave up, or the policy
    /// refused the message): RSET before the next.
    pub needs_reset: bool,
    /// When the upstream last answered on it.
    last_reply: Instant,
}

/// How recently a connection must have answered for a message to go as
/// one `BDAT LAST` (RFC 3030) instead of `DATA`: with BDAT the content
/// leaves with the command, so a connection the upstream closed meanwhile
/// would be found dead only after the content was out, when a retry could
/// duplicate. The upstream's idle timeout is minutes.
const BDAT_FRESHNESS: Duration = Duration::from_secs(10);

/// Connections to the upstream, reused across messages.
pub struct Upstream {
    idle: Mutex<Vec<Connection>>,
    max_idle: usize,
    timeout: Duration,
    /// Trusts the system's roots.
    tls: TlsConnector,
    /// Trusts only the config's CA certificates: built once per set.
    private_tls: Mutex<Option<(String, TlsConnector)>>,
}

/// A TLS client that trusts exactly the CA certificates in `pem`, for an
/// upstream whose certificate a private CA signs.
pub fn trusting(pem: &str) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|error| format!("parsing a CA certificate: {error}"))?;
        roots
            .add(cert)
            .map_err(|error| format!("a CA certificate cannot be a trust anchor: {error}"))?;
    }
    if roots.is_empty() {
        return Err("no CA certificate in the PEM text".into());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| error.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

impl Upstream {
    pub fn new(timeout: Duration, max_idle: usize) -> Result<Self, String> {
        Ok(Self {
            idle: Mutex::new(Vec::new()),
            max_idle,
            timeout,
            tls: mail_send::smtp::tls::build_tls_connector(false)?,
            private_tls: Mutex::new(None),
        })
    }

    /// The TLS client for `settings`: the system roots, or its own CAs.
    fn connector(&self, settings: &UpstreamSettings) -> Result<TlsConnector, Unavailable> {
        let Some(pem) = &settings.ca_certificates else {
            return Ok(self.tls.clone());
        };
        let mut cached = self
            .private_tls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((cached_pem, connector)) = cached.as_ref()
            && cached_pem == pem
        {
            return Ok(connector.clone());
        }
        let connector = trusting(pem).map_err(Unavailable)?;
        *cached = Some((pem.clone(), connector.clone()));
        Ok(connector)
    }

    fn take_idle(&self, settings: &UpstreamSettings) -> Option<Connection> {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Connections to a previous upstream (before a config change) are
        // dropped on the way.
        while let Some(connection) = idle.pop() {
            if &connection.settings == settings {
                return Some(connection);
            }
        }
        None
    }

    /// Gives a connection back for reuse once its transaction is over.
    pub fn release(&self, connection: Connection) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < self.max_idle {
            idle.push(connection);
        }
    }

    /// Sends an envelope batch (MAIL and/or RCPTs) on the session's held
    /// connection, or on one from the pool when it holds none, and returns
    /// one reply per command. `replay` is the envelope accepted so far,
    /// sent first when the batch continues a transaction on a connection
    /// that does not hold it (the held one was lost).
    pub async fn envelope(
        &self,
        held: &mut Option<Connection>,
        settings: &UpstreamSettings,
        helo_host: &str,
        replay: impl FnOnce() -> Vec<EnvelopeCommand>,
        commands: &[EnvelopeCommand],
    ) -> Result<Vec<Response<String>>, Unavailable> {
        let starts_transaction = matches!(commands.first(), Some(EnvelopeCommand::Mail { .. }));
        let mut replay = Some(replay);
        let mut envelope = Vec::new();
        let mut connection = match held.take() {
            // A MAIL always starts afresh: whatever the held connection had
            // open is reset first.
            Some(mut connection) => {
                connection.needs_reset |= starts_transaction;
                connection
            }
            None => {
                if !starts_transaction && let Some(replay) = replay.take() {
                    envelope = replay();
                }
                self.checkout(settings, helo_host).await?
            }
        };
        let mut retried = false;
        loop {
            match exchange(&mut connection, &envelope, commands, self.timeout).await {
                Ok(replies) => {
                    *held = Some(connection);
                    return Ok(replies);
                }
                Err(ExchangeError::Refused(error)) => {
                    // This connection holds no transaction of ours now.
                    self.release(connection);
                    return Err(Unavailable(error));
                }
                // A connection closed under us: nothing was accepted on it
                // that matters (no content went out), so start again on a
                // fresh one, once, with the envelope so far.
                Err(ExchangeError::Io(_)) if !retried => {
                    retried = true;
                    if !starts_transaction && let Some(replay) = replay.take() {
                        envelope = replay();
                    }
                    connection = self.connect(settings, helo_host).await?;
                }
                Err(ExchangeError::Io(error)) => return Err(Unavailable(error)),
            }
        }
    }

    /// Sends the signed message of the session's transaction: on its held
    /// connection, or on a fresh one after replaying `replay` (the whole
    /// envelope) when the held one is gone or closed before the content.
    pub async fn deliver(
        &self,
        held: &mut Option<Connection>,
        settings: &UpstreamSettings,
        helo_host: &str,
        replay: impl FnOnce() -> Vec<EnvelopeCommand>,
        message: &Signed,
    ) -> UpstreamResult {
        let mut replay = Some(replay);
        let mut envelope = Vec::new();
        let mut connection = match held.take() {
            Some(connection) => connection,
            None => {
                if let Some(replay) = replay.take() {
                    envelope = replay();
                }
                match self.connect(settings, helo_host).await {
                    Ok(connection) => connection,
                    Err(error) => return UpstreamResult::Unavailable(error.0),
                }
            }
        };
        let mut retried = false;
        loop {
            match transmit(&mut connection, &envelope, message, self.timeout).await {
                Ok(reply) => {
                    self.release(connection);
                    return UpstreamResult::Replied(reply);
                }
                Err(TransmitError::BeforeContent(_)) if !retried => {
                    retried = true;
                    if let Some(replay) = replay.take() {
                        envelope = replay();
                    }
                    connection = match self.connect(settings, helo_host).await {
                        Ok(connection) => connection,
                        Err(error) => return UpstreamResult::Unavailable(error.0),
                    };
                }
                Err(TransmitError::BeforeContent(error) | TransmitError::AfterContent(error)) => {
                    return UpstreamResult::Unavailable(error);
                }
                Err(TransmitError::EnvelopeChanged(error)) => {
                    self.release(connection);
                    return UpstreamResult::Unavailable(error);
                }
            }
        }
    }

    async fn checkout(
        &self,
        settings: &UpstreamSettings,
        helo_host: &str,
    ) -> Result<Connection, Unavailable> {
        match self.take_idle(settings) {
            Some(connection) => Ok(connection),
            None => self.connect(settings, helo_host).await,
        }
    }

    async fn connect(
        &self,
        settings: &UpstreamSettings,
        helo_host: &str,
    ) -> Result<Connection, Unavailable> {
        let unavailable = |error: mail_send::Error| Unavailable(error.to_string());
        let tls = self.connector(settings)?;
        let attempt = async {
            let tcp = TcpStream::connect((settings.host.as_str(), settings.port))
                .await
                .map_err(|error| {
                    Unavailable(format!(
                        "connecting to {}:{}: {error}",
                        settings.host, settings.port
                    ))
                })?;
            // Commands and replies are small and each batch is one write:
            // send at once.
            let _ = tcp.set_nodelay(true);
            let plain = SmtpClient {
                stream: tcp,
                timeout: self.timeout,
            };
            let mut client: Client = match settings.tls {
                UpstreamTls::Tls => {
                    let tls = plain
                        .into_tls(&tls, &settings.host)
                        .await
                        .map_err(unavailable)?;
                    boxed(tls)
                }
                UpstreamTls::StartTls => {
                    let mut plain = plain;
                    expect_greeting(&mut plain).await?;
                    let capabilities = plain.ehlo(helo_host).await.map_err(unavailable)?;
                    if !capabilities.has_capability(EXT_START_TLS) {
                        return Err(Unavailable("the upstream does not offer STARTTLS".into()));
                    }
                    boxed(
                        plain
                            .start_tls(&tls, &settings.host)
                            .await
                            .map_err(unavailable)?,
                    )
                }
                UpstreamTls::None => boxed(plain),
            };
            if settings.tls != UpstreamTls::StartTls {
                expect_greeting(&mut client).await?;
            }
            let capabilities = client.ehlo(helo_host).await.map_err(unavailable)?;
            if let Some(auth) = &settings.auth {
                let credentials = Credentials::new(auth.username.clone(), auth.password.clone());
                client
                    .authenticate(&credentials, &capabilities)
                    .await
                    .map_err(|error| match error {
                        mail_send::Error::AuthenticationFailed(reply) => {
                            Unavailable(format!("authenticating to the upstream: {reply}"))
                        }
                        other => unavailable(other),
                    })?;
            }
            Ok(Connection {
                stream: client.stream,
                read_buffer: Vec::with_capacity(1024),
                capabilities: Capabilities {
                    pipelining: capabilities.has_capability(EXT_PIPELINING),
                    eight_bit_mime: capabilities.has_capability(EXT_8BIT_MIME),
                    size: capabilities.has_capability(EXT_SIZE),
                    chunking: capabilities.has_capability(EXT_CHUNKING),
                },
                last_reply: Instant::now(),
                settings: settings.clone(),
                needs_reset: false,
            })
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| Unavailable("timed out connecting to the upstream".into()))?
    }
}

fn boxed<S: UpstreamStream + 'static>(client: SmtpClient<S>) -> Client {
    SmtpClient {
        stream: Box::new(client.stream),
        timeout: client.timeout,
    }
}

async fn expect_greeting<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut SmtpClient<S>,
) -> Result<(), Unavailable> {
    let greeting = client
        .read()
        .await
        .map_err(|error| Unavailable(error.to_string()))?;
    if greeting.is_positive_completion() {
        Ok(())
    } else {
        Err(Unavailable(format!("the upstream greeted with {greeting}")))
    }
}

/// Writes `command` as the upstream should see it: re-serialised from the
/// parsed path, with only the parameters the relay decides on. `BODY=8BITMIME`
/// is passed on when the client declared it and the upstream offers it;
/// `SIZE` likewise, raised by what signing adds. No other client parameter
/// exists past the parser (see [`super::command`]).
fn write_command(out: &mut Vec<u8>, command: &EnvelopeCommand, capabilities: Capabilities) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    match command {
        EnvelopeCommand::Mail { from, size, body } => {
            let _ = write!(out, "MAIL FROM:{from}");
            if *body == Body::EightBitMime && capabilities.eight_bit_mime {
                out.extend_from_slice(b" BODY=8BITMIME");
            }
            if let Some(size) = size
                && capabilities.size
            {
                let _ = write!(out, " SIZE={}", size.saturating_add(SIGNING_ALLOWANCE));
            }
            out.extend_from_slice(b"\r\n");
        }
        EnvelopeCommand::Rcpt { to } => {
            let _ = write!(out, "RCPT TO:<{to}>\r\n");
        }
    }
}

enum ExchangeError {
    /// The connection failed: nothing can be known of what the upstream
    /// did with the commands.
    Io(String),
    /// The upstream answered the replayed envelope differently than before.
    Refused(String),
}

/// Reads `count` replies, keeping what follows in the connection's buffer.
async fn read_replies(
    connection: &mut Connection,
    count: usize,
) -> std::io::Result<Vec<Response<String>>> {
    let mut replies = Vec::with_capacity(count);
    let mut parser = ResponseReceiver::default();
    while replies.len() < count {
        let mut bytes = connection.read_buffer.iter();
        match parser.parse(&mut bytes) {
            Ok(reply) => {
                let used = connection.read_buffer.len() - bytes.as_slice().len();
                connection.read_buffer.drain(..used);
                connection.last_reply = Instant::now();
                replies.push(reply);
                parser.reset();
                continue;
            }
            Err(smtp_proto::Error::NeedsMoreData { .. }) => {
                // The parser kept the partial reply: drop what it read.
                connection.read_buffer.clear();
            }
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "the upstream's reply is not SMTP",
                ));
            }
        }
        connection.read_buffer.reserve(1024);
        if connection
            .stream
            .read_buf(&mut connection.read_buffer)
            .await?
            == 0
        {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(replies)
}

/// Sends `lines` and reads `count` replies: all in one write when the
/// upstream pipelines, one by one otherwise.
///
/// One write matters: written one by one on a socket without Nagle, each
/// command leaves as its own segment, the server answers the first before
/// the next arrives, and a server that has Nagle on holds its next reply
/// until our delayed ACK, 40 ms later. The relay bench saw that on about 2%
/// of messages (+p99 of 44 ms at one client).
async fn send_commands(
    connection: &mut Connection,
    commands: &[&EnvelopeCommand],
    reset: bool,
    timeout: Duration,
) -> Result<Vec<Response<String>>, String> {
    let capabilities = connection.capabilities;
    tokio::time::timeout(timeout, async {
        let mut replies = Vec::with_capacity(commands.len() + 1);
        if capabilities.pipelining {
            let mut batch = Vec::with_capacity(64 * (commands.len() + 1));
            if reset {
                batch.extend_from_slice(b"RSET\r\n");
            }
            for command in commands {
                write_command(&mut batch, command, capabilities);
            }
            connection.stream.write_all(&batch).await?;
            connection.stream.flush().await?;
            replies = read_replies(connection, commands.len() + usize::from(reset)).await?;
        } else {
            if reset {
                connection.stream.write_all(b"RSET\r\n").await?;
                connection.stream.flush().await?;
                replies.extend(read_replies(connection, 1).await?);
            }
            let mut line = Vec::with_capacity(128);
            for command in commands {
                line.clear();
                write_command(&mut line, command, capabilities);
                connection.stream.write_all(&line).await?;
                connection.stream.flush().await?;
                replies.extend(read_replies(connection, 1).await?);
            }
        }
        Ok::<_, std::io::Error>(replies)
    })
    .await
    .map_err(|_| "timed out waiting for the upstream".to_string())?
    .map_err(|error| format!("talking to the upstream: {error}"))
}

/// RSET if needed, the replay (whose replies must all be positive), then
/// the batch: the batch's replies.
async fn exchange(
    connection: &mut Connection,
    replay: &[EnvelopeCommand],
    commands: &[EnvelopeCommand],
    timeout: Duration,
) -> Result<Vec<Response<String>>, ExchangeError> {
    let reset = std::mem::take(&mut connection.needs_reset);
    let all: Vec<&EnvelopeCommand> = replay.iter().chain(commands).collect();
    let mut replies = send_commands(connection, &all, reset, timeout)
        .await
        .map_err(ExchangeError::Io)?;
    if reset {
        replies.remove(0);
    }
    let rest = replies.split_off(replay.len());
    if let Some(refused) = replies
        .iter()
        .find(|reply| !(200..300).contains(&reply.code))
    {
        connection.needs_reset = true;
        return Err(ExchangeError::Refused(format!(
            "the upstream no longer accepts the envelope: {} {}",
            refused.code, refused.message
        )));
    }
    Ok(rest)
}

enum TransmitError {
    /// Failed before any content was written: safe to try elsewhere.
    BeforeContent(String),
    /// Failed after: the upstream may have the message.
    AfterContent(String),
    /// The replayed envelope was not accepted as before.
    EnvelopeChanged(String),
}

/// The replayed envelope if any, then the message: as one `BDAT LAST` when
/// the upstream offers CHUNKING and the connection just answered, else
/// `DATA`, the dot-stuffed message and the final dot. The upstream's final
/// reply.
async fn transmit(
    connection: &mut Connection,
    replay: &[EnvelopeCommand],
    message: &Signed,
    timeout: Duration,
) -> Result<Response<String>, TransmitError> {
    match exchange(connection, replay, &[], timeout).await {
        Ok(_) => {}
        Err(ExchangeError::Io(error)) => return Err(TransmitError::BeforeContent(error)),
        Err(ExchangeError::Refused(error)) => return Err(TransmitError::EnvelopeChanged(error)),
    }
    let after = |error: String| TransmitError::AfterContent(error);
    if connection.capabilities.chunking && connection.last_reply.elapsed() < BDAT_FRESHNESS {
        let mut wire = Vec::with_capacity(message.len() + 32);
        wire.extend_from_slice(format!("BDAT {} LAST\r\n", message.len()).as_bytes());
        wire.extend_from_slice(&message.headers);
        wire.extend_from_slice(&message.message);
        let reply = tokio::time::timeout(timeout, async {
            connection.stream.write_all(&wire).await?;
            connection.stream.flush().await?;
            read_replies(connection, 1).await
        })
        .await
        .map_err(|_| after("timed out waiting for the upstream".into()))?
        .map_err(|error| after(format!("talking to the upstream: {error}")))?;
        let reply = reply
            .into_iter()
            .next()
            .ok_or_else(|| after("no reply to the message".into()))?;
        if !(200..300).contains(&reply.code) {
            connection.needs_reset = true;
        }
        return Ok(reply);
    }
    let before = |error: String| TransmitError::BeforeContent(error);
    let go_ahead = tokio::time::timeout(timeout, async {
        connection.stream.write_all(b"DATA\r\n").await?;
        connection.stream.flush().await?;
        read_replies(connection, 1).await
    })
    .await
    .map_err(|_| before("timed out waiting for the upstream".into()))?
    .map_err(|error| before(format!("talking to the upstream: {error}")))?;
    let Some(go_ahead) = go_ahead.into_iter().next() else {
        return Err(before("no reply to DATA".into()));
    };
    if go_ahead.code != 354 {
        // A refusal of DATA is the upstream's answer for the message; its
        // transaction may still be open.
        connection.needs_reset = true;
        return Ok(go_ahead);
    }
    let mut content = Vec::with_capacity(message.len() + message.len() / 64 + 8);
    dot_stuff_into(&mut content, &message.headers);
    dot_stuff_into(&mut content, &message.message);
    if !content.is_empty() && !content.ends_with(b"\r\n") {
        content.extend_from_slice(b"\r\n");
    }
    content.extend_from_slice(b".\r\n");
    let reply = tokio::time::timeout(timeout, async {
        connection.stream.write_all(&content).await?;
        connection.stream.flush().await?;
        read_replies(connection, 1).await
    })
    .await
    .map_err(|_| after("timed out waiting for the upstream".into()))?
    .map_err(|error| after(format!("talking to the upstream: {error}")))?;
    reply
        .into_iter()
        .next()
        .ok_or_else(|| after("no reply to the message".into()))
}

/// Appends `text` (which starts at a line start, CRLF line ends) with every
/// line that starts with `.` given another.
fn dot_stuff_into(out: &mut Vec<u8>, text: &[u8]) {
    if text.first() == Some(&b'.') {
        out.push(b'.');
    }
    let mut line_start = 0;
    for position in memchr::memmem::find_iter(text, b"\n.") {
        out.extend_from_slice(&text[line_start..=position]);
        out.push(b'.');
        line_start = position + 1;
    }
    out.extend_from_slice(&text[line_start..]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::path::{parse_forward_path, parse_reverse_path};

    #[test]
    fn commands_are_written_from_the_parsed_paths_with_our_parameters_only() {
        let (from, _) = parse_reverse_path(b"<\"a@b\"@Acme.TEST>").unwrap();
        let (to, _) = parse_forward_path(b"<bob@example.net>").unwrap();
        let all = Capabilities {
            pipelining: true,
            eight_bit_mime: true,
            size: true,
            chunking: true,
        };
        let mut out = Vec::new();
        write_command(
            &mut out,
            &EnvelopeCommand::Mail {
                from: from.clone(),
                size: Some(1000),
                body: Body::EightBitMime,
            },
            all,
        );
        write_command(&mut out, &EnvelopeCommand::Rcpt { to }, all);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!(
                "MAIL FROM:<\"a@b\"@acme.test> BODY=8BITMIME SIZE={}\r\nRCPT TO:<bob@example.net>\r\n",
                1000 + SIGNING_ALLOWANCE
            )
        );
        let mut out = Vec::new();
        write_command(
            &mut out,
            &EnvelopeCommand::Mail {
                from,
                size: Some(1000),
                body: Body::EightBitMime,
            },
            Capabilities::default(),
        );
        assert_eq!(out, b"MAIL FROM:<\"a@b\"@acme.test>\r\n");
    }

    #[test]
    fn dot_stuffing_covers_every_line() {
        let stuffed = |text: &[u8]| {
            let mut out = Vec::new();
            dot_stuff_into(&mut out, text);
            out
        };
        assert_eq!(
            stuffed(b".a\r\nb\r\n.\r\n..c\r\n"),
            b"..a\r\nb\r\n..\r\n...c\r\n"
        );
        assert_eq!(stuffed(b"a\r\n"), b"a\r\n");
        assert_eq!(stuffed(b""), b"");
    }
}
