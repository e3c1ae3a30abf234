//! The SMTP submission protocol as a pure state machine: client bytes in,
//! replies and [`Action`]s out. No I/O and no clock of its own: the shell
//! ([`super::session`]) reads and writes, talks to the upstream when an
//! action asks, and passes in the config snapshot current at each step and
//! the time.
//!
//! What it decides:
//! - the command grammar ([`super::command`], [`super::path`]) and the
//!   order EHLO / STARTTLS / AUTH / MAIL / RCPT / DATA;
//! - who the client is (AUTH, with the cross-connection throttle and the
//!   tenant's session limit) and whether it still is: every transaction
//!   re-reads the tenant and its grant from the current snapshot, so a
//!   revoked tenant or domain stops sending with its next message;
//! - the sender policy on the parsed envelope and header, which are exactly
//!   what goes upstream and what is signed;
//! - per-recipient semantics: RCPT is proxied to the upstream
//!   ([`Action::Envelope`]), so each reply the client gets to it is the
//!   upstream's; the message is signed and handed over with
//!   [`Action::Deliver`], and the final reply is the upstream's too.
//!
//! MAIL is answered once the policy accepts the sender and goes upstream
//! in front of the first RCPT, in the same write: a client that waits for
//! each reply pays one upstream round trip less, and a refusal of the
//! sender by the upstream reaches it as the reply to each RCPT (as Postfix
//! itself answers by default, `smtpd_delay_reject`). Pipelined RCPT
//! commands are collected into one envelope batch, written upstream at
//! once; any other command waits until the batch's replies are in, so
//! replies always come back in order.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use base64::Engine as _;
use smtp_proto::Response;

use super::auth::{PasswordHash, PresentedCredentials, decode_base64_line, decode_plain};
use super::command::{self, Body, Command, CommandError};
use super::data::DataReceiver;
use super::limits::{AuthThrottle, BufferReservation, ConnectionPermit, Throttled};
use super::log::Escaped;
use super::message::{header_section, missing_fields};
use super::metrics::RelayMetrics;
use super::path::{Mailbox, ReversePath};
use super::policy::{Refusal, check_envelope_sender, check_header_sender};
use super::rate_limit::RateLimiter;
use super::signing::signature_headers;
use super::snapshot::{RelaySnapshot, Tenant};

/// Wrong passwords allowed per connection before it is closed.
const MAX_AUTH_FAILURES: u32 = 3;
/// Errors allowed per connection before it is closed (a client that
/// speaks something else, or a scanner).
const MAX_ERRORS: u32 = 20;
/// Longest command or AUTH line (RFC 4954 §4 allows AUTH lines this long).
const MAX_LINE: usize = 12 * 1024;
/// How much more the signed message may be than what the client declared
/// in SIZE: the DKIM-Signature headers and a Date and Message-ID.
pub const SIGNING_ALLOWANCE: u64 = 4096;

/// Relay-wide state every session uses.
pub struct Shared {
    pub rate_limiter: RateLimiter,
    pub auth_throttle: AuthThrottle,
    pub metrics: Arc<RelayMetrics>,
    /// Each replica enforces `messagesPerMinute / rate_limit_share` (see
    /// docs/relay.md).
    pub rate_limit_share: u32,
}

/// What the protocol is given at each step.
pub struct Step<'a> {
    /// The config in effect now.
    pub snapshot: &'a RelaySnapshot,
    pub now: Instant,
    /// Wall-clock time, for a Date header the client left out.
    pub utc: jiff::Timestamp,
}

/// One command for the upstream's envelope, written from parsed values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvelopeCommand {
    Mail {
        from: ReversePath,
        size: Option<u64>,
        body: Body,
    },
    Rcpt {
        to: Mailbox,
    },
}

/// What the shell must do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send [`Protocol::output`] and read more client input.
    NeedInput,
    /// Write these commands upstream at once, and pass the replies (one
    /// per command) to [`Protocol::envelope_replies`].
    Envelope(Vec<EnvelopeCommand>),
    /// Send this signed message as the transaction's data, and pass the
    /// upstream's final reply to [`Protocol::delivered`].
    Deliver(Signed),
    /// Send the output (a 220), then start TLS and call
    /// [`Protocol::tls_started`].
    StartTls,
    /// Send the output and close the connection.
    Close,
}

/// A signed message: the DKIM-Signature headers, then the message as
/// received (with what a submission server adds), kept apart so neither is
/// copied into the other.
#[derive(Debug, PartialEq, Eq)]
pub struct Signed {
    pub headers: Vec<u8>,
    pub message: Vec<u8>,
}

impl Signed {
    pub fn len(&self) -> usize {
        self.headers.len() + self.message.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Headers and message as one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        [self.headers.as_slice(), self.message.as_slice()].concat()
    }
}

/// How the upstream answered the data, as far as the shell could tell.
#[derive(Debug)]
pub enum UpstreamResult {
    Replied(Response<String>),
    /// No answer we can trust (connection, TLS, timeout): try again later.
    Unavailable(String),
}

struct Authenticated {
    username: String,
    credential: PasswordHash,
}

struct Transaction {
    from: ReversePath,
    size: Option<u64>,
    body: Body,
    /// Recipients the upstream accepted.
    recipients: Vec<Mailbox>,
    /// Whether MAIL has gone upstream (it goes with the first RCPT).
    mail_sent: bool,
    /// Whether the upstream accepted MAIL: its side of the transaction is
    /// open, and must be reset if this one ends without data.
    upstream_open: bool,
    /// The upstream's refusal of the sender, as each RCPT is answered.
    sender_refused: Option<Vec<u8>>,
}

struct DataPhase {
    receiver: DataReceiver,
    budget: Option<BufferReservation>,
    over_budget: bool,
}

enum Phase {
    Command,
    Data(Box<DataPhase>),
    AuthPlain,
    AuthLoginUsername,
    AuthLoginPassword {
        username: String,
    },
    /// Sent a message upstream; waiting for [`Protocol::delivered`].
    Delivering(Box<Delivering>),
}

/// What to remember about a message in flight.
struct Delivering {
    domain: String,
    per_minute: u32,
    recipients: usize,
    bytes: usize,
}

/// One reply owed in an envelope batch, in order: the upstream's reply to
/// a MAIL or RCPT that went upstream, or one of ours for a command that
/// did not (written only after the replies before it).
#[derive(Debug)]
enum Slot {
    /// MAIL, sent in front of the first RCPT; its reply was ours already.
    Mail,
    Rcpt(Mailbox),
    Local(Vec<u8>),
}

/// One SMTP session's protocol state.
pub struct Protocol {
    shared: Arc<Shared>,
    permit: ConnectionPermit,
    peer: IpAddr,
    tls_offered: bool,
    tls_active: bool,
    input: Vec<u8>,
    /// Where unprocessed input starts.
    position: usize,
    /// The command line being handled (kept to reuse its allocation).
    line: Vec<u8>,
    /// Dropping the rest of a line that was too long.
    discarding_line: bool,
    phase: Phase,
    said_hello: bool,
    tenant: Option<Authenticated>,
    transaction: Option<Transaction>,
    /// Replies owed for the MAIL/RCPT commands of the batch being built.
    batch: Vec<Slot>,
    /// What of the batch goes upstream.
    batch_commands: Vec<EnvelopeCommand>,
    out: Vec<u8>,
    auth_failures: u32,
    errors: u32,
    closing: bool,
}

fn reply(out: &mut Vec<u8>, code: u16, text: &str) {
    use std::io::Write as _;
    // Writing to a Vec cannot fail.
    let _ = write!(out, "{code} {text}\r\n");
}

/// An upstream reply as the client gets it: its code, its enhanced status
/// (made up from the code when it has none), and its text on one line
/// without control characters, after `prefix`.
fn passed_on(out: &mut Vec<u8>, response: &Response<String>, prefix: &str) {
    let code = response.code;
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
        .take(400)
        .collect();
    reply(out, code, &format!("{status} {prefix}{text}"));
}

impl Protocol {
    pub fn new(
        shared: Arc<Shared>,
        permit: ConnectionPermit,
        peer: IpAddr,
        tls_offered: bool,
    ) -> Self {
        Self {
            shared,
            permit,
            peer,
            tls_offered,
            tls_active: false,
            input: Vec::with_capacity(4 * 1024),
            position: 0,
            line: Vec::with_capacity(512),
            discarding_line: false,
            phase: Phase::Command,
            said_hello: false,
            tenant: None,
            transaction: None,
            batch: Vec::new(),
            batch_commands: Vec::new(),
            out: Vec::with_capacity(1024),
            auth_failures: 0,
            errors: 0,
            closing: false,
        }
    }

    /// Writes the greeting.
    pub fn greet(&mut self, step: &Step<'_>) {
        let text = format!("{} ESMTP mailauth relay", step.snapshot.settings.hostname);
        reply(&mut self.out, 220, &text);
    }

    /// Replies to send.
    pub fn output(&self) -> &[u8] {
        &self.out
    }

    pub fn clear_output(&mut self) {
        self.out.clear();
    }

    /// The buffer to read client input into (append at its end).
    pub fn input(&mut self) -> &mut Vec<u8> {
        if self.position > 0 {
            self.input.drain(..self.position);
            self.position = 0;
        }
        &mut self.input
    }

    pub fn is_authenticated(&self) -> bool {
        self.tenant.is_some()
    }

    /// Bytes received so far in a DATA phase, if in one.
    pub fn data_bytes(&self) -> Option<usize> {
        match &self.phase {
            Phase::Data(data) => Some(data.receiver.bytes_read),
            _ => None,
        }
    }

    /// Whether the upstream holds an open transaction for this session.
    pub fn upstream_transaction_open(&self) -> bool {
        self.transaction.as_ref().is_some_and(|t| t.upstream_open) || !self.batch.is_empty()
    }

    /// The envelope accepted so far (MAIL and the accepted RCPTs), to
    /// replay on a fresh upstream connection when the one holding the
    /// transaction was lost.
    pub fn envelope_so_far(&self) -> Vec<EnvelopeCommand> {
        let Some(transaction) = &self.transaction else {
            return Vec::new();
        };
        let mut commands = vec![EnvelopeCommand::Mail {
            from: transaction.from.clone(),
            size: transaction.size,
            body: transaction.body,
        }];
        commands.extend(
            transaction
                .recipients
                .iter()
                .map(|to| EnvelopeCommand::Rcpt { to: to.clone() }),
        );
        commands
    }

    /// A limit of the session ran out (the shell's timers): say so and
    /// close.
    pub fn expired(&mut self, why: &str, metric: &str) {
        self.shared.metrics.rejected(metric);
        reply(&mut self.out, 421, &format!("4.4.2 {why}, closing"));
        self.closing = true;
    }

    /// RFC 3207: forget everything learnt before TLS.
    pub fn tls_started(&mut self) {
        self.tls_active = true;
        self.said_hello = false;
        self.transaction = None;
        self.batch.clear();
        self.batch_commands.clear();
        self.phase = Phase::Command;
    }

    fn max_message_bytes(snapshot: &RelaySnapshot) -> usize {
        usize::try_from(snapshot.settings.limits.max_message_bytes).unwrap_or(usize::MAX)
    }

    fn auth_allowed(&self, snapshot: &RelaySnapshot) -> bool {
        self.tls_active || snapshot.settings.allow_plaintext_auth
    }

    /// Moves the next complete line of input (without its line end) into
    /// `line`, if there is one. Lines end at LF; a CR before it is dropped.
    /// A line longer than `MAX_LINE` is refused and skipped.
    fn take_line(&mut self, line: &mut Vec<u8>) -> bool {
        loop {
            let rest = &self.input[self.position..];
            let Some(end) = memchr::memchr(b'\n', rest) else {
                if rest.len() > MAX_LINE {
                    self.position = self.input.len();
                    self.line_too_long();
                }
                return false;
            };
            let content = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
            let discarding = std::mem::take(&mut self.discarding_line);
            if discarding || content.len() > MAX_LINE {
                self.position += end + 1;
                if !discarding {
                    self.line_too_long();
                    self.discarding_line = false;
                }
                continue;
            }
            line.clear();
            line.extend_from_slice(content);
            self.position += end + 1;
            return true;
        }
    }

    /// Refuses a line past `MAX_LINE`; the rest of it, up to its LF, is
    /// dropped.
    fn line_too_long(&mut self) {
        if !self.discarding_line {
            self.discarding_line = true;
            self.errors += 1;
            self.shared.metrics.rejected("syntax");
            reply(&mut self.out, 500, "5.5.2 Line too long");
        }
    }

    /// Whether the next complete line is a MAIL or RCPT command (which may
    /// join an envelope batch), without taking it.
    fn next_line_is_envelope(&self) -> bool {
        let rest = &self.input[self.position..];
        let Some(end) = memchr::memchr(b'\n', rest) else {
            return false;
        };
        let line = &rest[..end];
        line.len() >= 5
            && (line[..5].eq_ignore_ascii_case(b"MAIL ")
                || line[..5].eq_ignore_ascii_case(b"RCPT "))
    }

    /// Writes a reply, after the replies still owed by an envelope batch.
    fn say(&mut self, code: u16, text: &str) {
        if self.batch.is_empty() {
            reply(&mut self.out, code, text);
        } else {
            let mut line = Vec::new();
            reply(&mut line, code, text);
            self.batch.push(Slot::Local(line));
        }
    }

    fn close(&mut self, code: u16, text: &str) -> Action {
        reply(&mut self.out, code, text);
        self.closing = true;
        Action::Close
    }

    /// Processes buffered input until the shell has something to do.
    pub fn next(&mut self, step: &Step<'_>) -> Action {
        loop {
            if self.closing {
                return Action::Close;
            }
            if matches!(self.phase, Phase::Delivering(_)) {
                // The shell is delivering; nothing else happens meanwhile.
                return Action::NeedInput;
            }
            if let Phase::Data(data) = &mut self.phase {
                let (used, done) = data.receiver.feed(&self.input[self.position..]);
                self.position += used;
                if let Some(budget) = data.budget.as_mut()
                    && !data.over_budget
                    && !budget.grow_to(data.receiver.len())
                {
                    data.over_budget = true;
                    data.receiver.discard();
                }
                if !done {
                    return Action::NeedInput;
                }
                if let Phase::Data(data) = std::mem::replace(&mut self.phase, Phase::Command)
                    && let Some(action) = self.finish_data(*data, step)
                {
                    return action;
                }
                continue;
            }
            // Only more MAIL/RCPT commands join an open batch; anything else
            // waits for its replies.
            let joins_batch = matches!(self.phase, Phase::Command) && self.next_line_is_envelope();
            if !self.batch.is_empty() && !joins_batch {
                return Action::Envelope(std::mem::take(&mut self.batch_commands));
            }
            let mut line = std::mem::take(&mut self.line);
            if !self.take_line(&mut line) {
                self.line = line;
                if self.errors > MAX_ERRORS {
                    return self.close(421, "4.7.0 Too many errors, closing");
                }
                return if self.batch.is_empty() {
                    Action::NeedInput
                } else {
                    Action::Envelope(std::mem::take(&mut self.batch_commands))
                };
            }
            let phase = std::mem::replace(&mut self.phase, Phase::Command);
            let action = match phase {
                Phase::Command => self.command(&line, step),
                Phase::AuthPlain => self.auth_plain_response(&line, step),
                Phase::AuthLoginUsername => self.auth_login_username(&line),
                Phase::AuthLoginPassword { username } => {
                    self.auth_login_password(username, &line, step)
                }
                // Handled above; never taken as lines.
                other @ (Phase::Data(_) | Phase::Delivering(_)) => {
                    self.phase = other;
                    None
                }
            };
            // The buffer is kept for the next line; an AUTH line's content
            // does not stay in it.
            line.clear();
            self.line = line;
            if let Some(action) = action {
                return action;
            }
            if self.errors > MAX_ERRORS {
                return self.close(421, "4.7.0 Too many errors, closing");
            }
        }
    }

    fn command(&mut self, line: &[u8], step: &Step<'_>) -> Option<Action> {
        let command = match command::parse(line) {
            Ok(command) => command,
            Err(error) => {
                self.command_error(&error);
                return None;
            }
        };
        let snapshot = step.snapshot;
        match command {
            Command::Ehlo(_) => {
                self.said_hello = true;
                self.transaction = None;
                let mut lines = vec![snapshot.settings.hostname.clone()];
                lines.push("PIPELINING".into());
                lines.push(format!(
                    "SIZE {}",
                    snapshot.settings.limits.max_message_bytes
                ));
                lines.push("8BITMIME".into());
                lines.push("ENHANCEDSTATUSCODES".into());
                if self.tls_offered && !self.tls_active {
                    lines.push("STARTTLS".into());
                }
                if self.auth_allowed(snapshot) && self.tenant.is_none() {
                    lines.push("AUTH PLAIN LOGIN".into());
                }
                let last = lines.len() - 1;
                for (index, line) in lines.iter().enumerate() {
                    let separator = if index == last { ' ' } else { '-' };
                    self.out
                        .extend_from_slice(format!("250{separator}{line}\r\n").as_bytes());
                }
            }
            Command::Helo(_) => {
                self.said_hello = true;
                self.transaction = None;
                reply(&mut self.out, 250, &snapshot.settings.hostname);
            }
            Command::StartTls => {
                if self.tls_active {
                    reply(&mut self.out, 503, "5.5.1 TLS already active");
                } else if !self.tls_offered {
                    reply(&mut self.out, 454, "4.7.0 TLS not available");
                } else if self.tenant.is_some() {
                    // RFC 3207 would have the login forgotten, and the
                    // session already counts as its tenant's: no TLS after
                    // a plaintext AUTH.
                    reply(
                        &mut self.out,
                        503,
                        "5.5.1 STARTTLS after AUTH is not allowed",
                    );
                } else {
                    reply(&mut self.out, 220, "2.0.0 Ready to start TLS");
                    // Anything pipelined after STARTTLS is dropped: it
                    // would be injected into the TLS session.
                    self.input.clear();
                    self.position = 0;
                    return Some(Action::StartTls);
                }
            }
            Command::Auth {
                mechanism,
                initial_response,
            } => return self.auth(&mechanism, initial_response, step),
            Command::Mail { from, size, body } => self.mail(from, size, body, step),
            Command::Rcpt { to } => self.rcpt(to, step),
            Command::Data => return self.data(step),
            Command::Rset => {
                self.transaction = None;
                reply(&mut self.out, 250, "2.0.0 OK");
            }
            Command::Noop => reply(&mut self.out, 250, "2.0.0 OK"),
            Command::Quit => return Some(self.close(221, "2.0.0 Bye")),
            Command::Vrfy => reply(&mut self.out, 252, "2.5.2 Cannot VRFY user"),
            Command::Bdat => {
                return Some(self.close(502, "5.5.1 CHUNKING not offered, closing"));
            }
            Command::NotImplemented => {
                reply(&mut self.out, 502, "5.5.1 Command not implemented");
            }
        }
        None
    }

    fn command_error(&mut self, error: &CommandError) {
        self.errors += 1;
        self.shared.metrics.rejected("syntax");
        let (code, status) = error.reply();
        let text = match error {
            CommandError::Unknown => "Unknown command".to_string(),
            other => {
                let mut text = other.to_string();
                if let Some(first) = text.get_mut(..1) {
                    first.make_ascii_uppercase();
                }
                text
            }
        };
        reply(&mut self.out, code, &format!("{status} {text}"));
    }

    /// Counts, logs and words a policy refusal.
    fn refuse(&mut self, refusal: &Refusal) {
        self.shared.metrics.rejected(refusal.reason());
        let (code, status) = match refusal {
            Refusal::NotAuthenticated => (530, "5.7.0"),
            Refusal::MalformedMessage(_) => (554, "5.6.0"),
            _ => (550, "5.7.1"),
        };
        tracing::info!(
            peer = %self.peer,
            tenant = %Escaped(self.tenant.as_ref().map_or("", |t| t.username.as_str())),
            reason = refusal.reason(),
            "sender refused"
        );
        self.say(code, &format!("{status} {refusal}"));
    }

    /// The authenticated tenant as the current config has it. A tenant
    /// that left the config, or whose password changed, is logged out and
    /// the session closed: it would be refused at AUTH now.
    fn current_tenant<'s>(
        &mut self,
        snapshot: &'s RelaySnapshot,
    ) -> Result<Option<&'s Tenant>, Action> {
        let Some(authenticated) = &self.tenant else {
            return Ok(None);
        };
        match snapshot.tenant(&authenticated.username) {
            Some(tenant) if *tenant.credential() == authenticated.credential => Ok(Some(tenant)),
            _ => {
                tracing::info!(
                    peer = %self.peer,
                    tenant = %Escaped(&authenticated.username),
                    "credentials revoked; closing the session"
                );
                self.tenant = None;
                self.shared.metrics.rejected("credentials_revoked");
                Err(self.close(421, "4.7.0 Your credentials are no longer valid, closing"))
            }
        }
    }

    fn mail(&mut self, from: ReversePath, size: Option<u64>, body: Body, step: &Step<'_>) {
        let snapshot = step.snapshot;
        if !self.said_hello {
            return self.say(503, "5.5.1 Say EHLO first");
        }
        if self.transaction.is_some() {
            return self.say(503, "5.5.1 Nested MAIL command");
        }
        let tenant = match self.current_tenant(snapshot) {
            Ok(Some(tenant)) => tenant,
            Ok(None) => return self.refuse(&Refusal::NotAuthenticated),
            Err(_) => return,
        };
        if size.is_some_and(|size| size > snapshot.settings.limits.max_message_bytes) {
            self.shared.metrics.rejected("message_too_big");
            return self.say(552, "5.3.4 Message size exceeds the limit");
        }
        if let Err(refusal) = check_envelope_sender(&tenant.grant, &from) {
            return self.refuse(&refusal);
        }
        self.transaction = Some(Transaction {
            from,
            size,
            body,
            recipients: Vec::new(),
            mail_sent: false,
            upstream_open: false,
            sender_refused: None,
        });
        self.say(250, "2.1.0 Sender OK");
    }

    fn rcpt(&mut self, to: Mailbox, step: &Step<'_>) {
        let max = step.snapshot.settings.limits.max_recipients as usize;
        let Some(transaction) = self.transaction.as_ref() else {
            return self.say(503, "5.5.1 MAIL FROM first");
        };
        let asked = self
            .batch
            .iter()
            .filter(|slot| matches!(slot, Slot::Rcpt(_)))
            .count();
        if transaction.recipients.len() + asked >= max {
            self.shared.metrics.rejected("too_many_recipients");
            return self.say(452, "4.5.3 Too many recipients");
        }
        if let Some(refusal) = &transaction.sender_refused {
            let refusal = refusal.clone();
            if self.batch.is_empty() {
                self.out.extend_from_slice(&refusal);
            } else {
                self.batch.push(Slot::Local(refusal));
            }
            return;
        }
        if !transaction.mail_sent {
            self.batch_commands.push(EnvelopeCommand::Mail {
                from: transaction.from.clone(),
                size: transaction.size,
                body: transaction.body,
            });
            self.batch.push(Slot::Mail);
            if let Some(transaction) = self.transaction.as_mut() {
                transaction.mail_sent = true;
            }
        }
        self.batch_commands
            .push(EnvelopeCommand::Rcpt { to: to.clone() });
        self.batch.push(Slot::Rcpt(to));
    }

    /// The upstream's replies to the last [`Action::Envelope`] (one per
    /// command, in order), or why there are none.
    pub fn envelope_replies(&mut self, replies: Result<Vec<Response<String>>, String>) {
        let batch = std::mem::take(&mut self.batch);
        self.batch_commands.clear();
        let upstream_slots = batch
            .iter()
            .filter(|slot| !matches!(slot, Slot::Local(_)))
            .count();
        let replies = match replies {
            Ok(replies) if replies.len() == upstream_slots => replies,
            Ok(_) => {
                return self.envelope_unavailable(
                    batch,
                    "the upstream's replies did not match its commands",
                );
            }
            Err(error) => return self.envelope_unavailable(batch, &error),
        };
        let mut replies = replies.into_iter();
        for slot in batch {
            let response = match &slot {
                Slot::Local(line) => {
                    self.out.extend_from_slice(line);
                    continue;
                }
                Slot::Mail | Slot::Rcpt(_) => match replies.next() {
                    Some(response) => response,
                    None => break,
                },
            };
            let positive = (200..300).contains(&response.code);
            match slot {
                Slot::Mail if positive => {
                    if let Some(transaction) = self.transaction.as_mut() {
                        transaction.upstream_open = true;
                    }
                }
                Slot::Mail => {
                    self.shared.metrics.rejected(if response.code >= 500 {
                        "upstream_refused"
                    } else {
                        "upstream_deferred"
                    });
                    let mut refusal = Vec::new();
                    passed_on(&mut refusal, &response, "");
                    if let Some(transaction) = self.transaction.as_mut() {
                        transaction.sender_refused = Some(refusal);
                    }
                }
                Slot::Rcpt(to) => match self.transaction.as_mut() {
                    // The upstream refused the sender: that is the answer
                    // for every recipient (its own reply would be a 503).
                    Some(Transaction {
                        sender_refused: Some(refusal),
                        ..
                    }) => self.out.extend_from_slice(refusal),
                    Some(transaction) if positive => {
                        transaction.recipients.push(to);
                        passed_on(&mut self.out, &response, "");
                    }
                    None if positive => reply(&mut self.out, 503, "5.5.1 MAIL FROM first"),
                    _ => {
                        self.shared.metrics.rejected(if response.code >= 500 {
                            "upstream_refused"
                        } else {
                            "upstream_deferred"
                        });
                        passed_on(&mut self.out, &response, "");
                    }
                },
                Slot::Local(_) => {}
            }
        }
    }

    fn envelope_unavailable(&mut self, batch: Vec<Slot>, error: &str) {
        tracing::warn!(error = %Escaped(error), "upstream unavailable");
        self.shared.metrics.rejected("upstream_unavailable");
        for slot in batch {
            match slot {
                Slot::Local(line) => self.out.extend_from_slice(&line),
                // MAIL goes again with the next RCPT.
                Slot::Mail => {
                    if let Some(transaction) = self.transaction.as_mut() {
                        transaction.mail_sent = false;
                    }
                }
                Slot::Rcpt(_) if self.transaction.is_none() => {
                    reply(&mut self.out, 503, "5.5.1 MAIL FROM first");
                }
                // The transaction stays with the recipients accepted so far;
                // the shell replays it on a fresh connection at DATA.
                Slot::Rcpt(_) => {
                    reply(
                        &mut self.out,
                        451,
                        "4.4.1 Upstream unavailable; try again later",
                    );
                }
            }
        }
    }

    fn data(&mut self, step: &Step<'_>) -> Option<Action> {
        let Some(transaction) = &self.transaction else {
            reply(&mut self.out, 503, "5.5.1 MAIL FROM first");
            return None;
        };
        if transaction.recipients.is_empty() {
            reply(&mut self.out, 554, "5.5.1 No valid recipients");
            return None;
        }
        let limits = &step.snapshot.settings.limits;
        let max = Self::max_message_bytes(step.snapshot);
        let budget = usize::try_from(limits.max_buffered_bytes_per_tenant)
            .unwrap_or(usize::MAX)
            .max(max);
        reply(
            &mut self.out,
            354,
            "Start mail input; end with <CRLF>.<CRLF>",
        );
        self.phase = Phase::Data(Box::new(DataPhase {
            receiver: DataReceiver::new(max, transaction.size),
            budget: self
                .permit
                .buffer(budget, self.shared.metrics.buffered_bytes()),
            over_budget: false,
        }));
        None
    }

    /// Everything after the final dot: checks, rate limit, signing. Returns
    /// the delivery, or writes the refusal.
    fn finish_data(&mut self, data: DataPhase, step: &Step<'_>) -> Option<Action> {
        let transaction = self.transaction.take()?;
        let metrics = self.shared.metrics.clone();
        let (message, found) = data.receiver.into_message();
        // The budget is held until the message is signed and handed over.
        let _budget = data.budget;
        if data.over_budget {
            metrics.rejected("tenant_buffer_full");
            reply(
                &mut self.out,
                452,
                "4.3.1 Too much of your mail is in progress at once; try again later",
            );
            return None;
        }
        if found.too_big {
            metrics.rejected("message_too_big");
            reply(&mut self.out, 552, "5.3.4 Message size exceeds the limit");
            return None;
        }
        if found.bare_cr {
            metrics.rejected("bare_cr");
            reply(
                &mut self.out,
                554,
                "5.6.0 The message contains a bare CR (a CR not followed by LF); end lines with CRLF",
            );
            return None;
        }
        if found.line_too_long {
            metrics.rejected("line_too_long");
            reply(
                &mut self.out,
                554,
                "5.6.0 A line is longer than 998 characters; use a transfer encoding",
            );
            return None;
        }
        let snapshot = step.snapshot;
        // The tenant and its grant as they are now, not as they were at
        // MAIL FROM: revocation applies to the message in hand.
        let tenant = match self.current_tenant(snapshot) {
            Ok(Some(tenant)) => tenant,
            Ok(None) => {
                self.refuse(&Refusal::NotAuthenticated);
                return None;
            }
            Err(action) => return Some(action),
        };
        if let Err(refusal) = check_envelope_sender(&tenant.grant, &transaction.from) {
            self.refuse(&refusal);
            return None;
        }
        let section = match header_section(&message) {
            Ok(section) => section,
            Err(error) => {
                self.refuse(&Refusal::MalformedMessage(error));
                return None;
            }
        };
        let domain_name = match check_header_sender(&tenant.grant, &section) {
            Ok(domain) => domain,
            Err(refusal) => {
                self.refuse(&refusal);
                return None;
            }
        };
        let Some(domain) = snapshot.domain(domain_name) else {
            metrics.rejected("header_domain_not_allowed");
            reply(
                &mut self.out,
                550,
                "5.7.1 The From domain is not served by this relay",
            );
            return None;
        };
        let per_minute = (domain.messages_per_minute / self.shared.rate_limit_share.max(1)).max(1);
        if !self.shared.rate_limiter.try_acquire(
            &tenant.username,
            &domain.domain,
            per_minute,
            step.now,
        ) {
            metrics.rejected("rate_limited");
            tracing::info!(tenant = %Escaped(&tenant.username), domain = %domain.domain, "rate limit exceeded");
            reply(
                &mut self.out,
                451,
                &format!(
                    "4.7.1 Rate limit of {} messages per minute for {} exceeded; try again later",
                    domain.messages_per_minute, domain.domain
                ),
            );
            return None;
        }
        let missing = missing_fields(&section, &snapshot.settings.hostname, step.utc);
        let end = section.end;
        let message = if missing.is_empty() {
            message
        } else {
            let mut completed = Vec::with_capacity(message.len() + missing.len());
            completed.extend_from_slice(&message[..end]);
            completed.extend_from_slice(missing.as_bytes());
            completed.extend_from_slice(&message[end..]);
            completed
        };
        let signed = match signature_headers(&domain.signers, &message) {
            Ok(headers) => Signed { headers, message },
            Err(error) => {
                self.shared
                    .rate_limiter
                    .refund(&tenant.username, &domain.domain, per_minute);
                metrics.rejected("signing_failed");
                tracing::error!(domain = %domain.domain, %error, "signing failed");
                reply(&mut self.out, 451, "4.3.0 Signing failed; try again later");
                return None;
            }
        };
        metrics.signed();
        self.phase = Phase::Delivering(Box::new(Delivering {
            domain: domain.domain.clone(),
            per_minute,
            recipients: transaction.recipients.len(),
            bytes: signed.len(),
        }));
        // The envelope stays for a replay on a fresh connection.
        self.transaction = Some(transaction);
        Some(Action::Deliver(signed))
    }

    /// The upstream's answer to [`Action::Deliver`].
    pub fn delivered(&mut self, result: UpstreamResult) {
        let Phase::Delivering(delivering) = std::mem::replace(&mut self.phase, Phase::Command)
        else {
            return;
        };
        self.transaction = None;
        let metrics = &self.shared.metrics;
        let username = self.tenant.as_ref().map_or("", |t| t.username.as_str());
        let refund = || {
            self.shared
                .rate_limiter
                .refund(username, &delivering.domain, delivering.per_minute);
        };
        match result {
            UpstreamResult::Replied(response) if (200..300).contains(&response.code) => {
                metrics.accepted();
                tracing::info!(
                    tenant = %Escaped(username),
                    domain = %delivering.domain,
                    recipients = delivering.recipients,
                    bytes = delivering.bytes,
                    "message relayed"
                );
                passed_on(&mut self.out, &response, "");
            }
            UpstreamResult::Replied(response) => {
                refund();
                metrics.rejected(if response.code >= 500 {
                    "upstream_refused"
                } else {
                    "upstream_deferred"
                });
                tracing::info!(code = response.code, "upstream refused the message");
                if (400..600).contains(&response.code) {
                    passed_on(&mut self.out, &response, "Upstream: ");
                } else {
                    reply(
                        &mut self.out,
                        451,
                        "4.4.0 Upstream answered unexpectedly; try again later",
                    );
                }
            }
            UpstreamResult::Unavailable(error) => {
                refund();
                metrics.rejected("upstream_unavailable");
                tracing::warn!(error = %Escaped(&error), "upstream unavailable");
                reply(
                    &mut self.out,
                    451,
                    "4.4.1 Upstream unavailable; try again later",
                );
            }
        }
    }

    fn auth(
        &mut self,
        mechanism: &str,
        initial_response: Option<Vec<u8>>,
        step: &Step<'_>,
    ) -> Option<Action> {
        if self.tenant.is_some() {
            reply(&mut self.out, 503, "5.5.1 Already authenticated");
            return None;
        }
        if self.transaction.is_some() {
            reply(
                &mut self.out,
                503,
                "5.5.1 AUTH not allowed during a mail transaction",
            );
            return None;
        }
        if !self.auth_allowed(step.snapshot) {
            self.shared.metrics.rejected("auth_without_tls");
            reply(
                &mut self.out,
                538,
                "5.7.11 Encryption required: use STARTTLS first",
            );
            return None;
        }
        match (mechanism, initial_response) {
            ("PLAIN", None) => {
                reply(&mut self.out, 334, "");
                self.phase = Phase::AuthPlain;
                None
            }
            ("PLAIN", Some(response)) => self.auth_plain_response(&response, step),
            ("LOGIN", None) => {
                reply(&mut self.out, 334, "VXNlcm5hbWU6");
                self.phase = Phase::AuthLoginUsername;
                None
            }
            ("LOGIN", Some(response)) => self.auth_login_username(&response),
            _ => {
                reply(&mut self.out, 504, "5.5.4 Use AUTH PLAIN or LOGIN");
                None
            }
        }
    }

    fn auth_cancelled(&mut self, line: &[u8]) -> bool {
        if line.trim_ascii() == b"*" {
            reply(&mut self.out, 501, "5.0.0 Authentication cancelled");
            true
        } else {
            false
        }
    }

    fn auth_plain_response(&mut self, line: &[u8], step: &Step<'_>) -> Option<Action> {
        if self.auth_cancelled(line) {
            return None;
        }
        match decode_plain(line) {
            Ok(credentials) => self.check_credentials(credentials, step),
            Err(error) => {
                self.errors += 1;
                reply(&mut self.out, 501, &format!("5.5.2 {error}"));
                None
            }
        }
    }

    fn auth_login_username(&mut self, line: &[u8]) -> Option<Action> {
        if self.auth_cancelled(line) {
            return None;
        }
        let username = decode_base64_line(line)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok());
        match username {
            Some(username) => {
                reply(&mut self.out, 334, "UGFzc3dvcmQ6");
                self.phase = Phase::AuthLoginPassword { username };
            }
            None => {
                self.errors += 1;
                reply(&mut self.out, 501, "5.5.2 The username is not base64 UTF-8");
            }
        }
        None
    }

    fn auth_login_password(
        &mut self,
        username: String,
        line: &[u8],
        step: &Step<'_>,
    ) -> Option<Action> {
        if self.auth_cancelled(line) {
            return None;
        }
        match decode_base64_line(line) {
            Ok(password) => {
                self.check_credentials(PresentedCredentials { username, password }, step)
            }
            Err(error) => {
                self.errors += 1;
                reply(&mut self.out, 501, &format!("5.5.2 {error}"));
                None
            }
        }
    }

    fn auth_failed(&mut self) -> Option<Action> {
        self.auth_failures += 1;
        if self.auth_failures >= MAX_AUTH_FAILURES {
            return Some(self.close(421, "4.7.0 Too many failed authentications, closing"));
        }
        None
    }

    fn check_credentials(
        &mut self,
        credentials: PresentedCredentials,
        step: &Step<'_>,
    ) -> Option<Action> {
        let throttle = &self.shared.auth_throttle;
        let key = throttle.username_key(&credentials.username);
        let source = self.permit.source();
        if let Err(throttled) = throttle.check(source, key, step.now) {
            self.shared.metrics.rejected(match throttled {
                Throttled::Source => "auth_throttled_source",
                Throttled::Username => "auth_throttled_username",
            });
            tracing::info!(peer = %self.peer, username_hash = %key, reason = %throttled, "login not tried");
            reply(
                &mut self.out,
                454,
                &format!(
                    "4.7.0 {}; try again later",
                    capitalized(&throttled.to_string())
                ),
            );
            return self.auth_failed();
        }
        let tenant = step.snapshot.tenant(&credentials.username);
        let valid = tenant.is_some_and(|tenant| tenant.password_matches(&credentials.password));
        let Some(tenant) = tenant.filter(|_| valid) else {
            throttle.failed(source, key, step.now);
            self.shared.metrics.rejected("auth_failed");
            // A known username is safe to log; anything else may be a
            // password typed into the wrong field.
            if tenant.is_some() {
                tracing::info!(peer = %self.peer, tenant = %Escaped(&credentials.username), "authentication failed: wrong password");
            } else {
                tracing::info!(peer = %self.peer, username_hash = %key, "authentication failed: unknown username");
            }
            reply(
                &mut self.out,
                535,
                "5.7.8 Authentication credentials invalid",
            );
            return self.auth_failed();
        };
        let max_sessions = step.snapshot.settings.limits.max_connections_per_tenant;
        if self
            .permit
            .authenticate(&tenant.username, max_sessions)
            .is_err()
        {
            self.shared.metrics.rejected("too_many_tenant_sessions");
            tracing::info!(peer = %self.peer, tenant = %Escaped(&tenant.username), "too many sessions");
            reply(
                &mut self.out,
                454,
                &format!(
                    "4.7.0 Too many sessions for this account (at most {max_sessions}); try again later"
                ),
            );
            return None;
        }
        throttle.succeeded(source, key, step.now);
        tracing::debug!(peer = %self.peer, tenant = %Escaped(&tenant.username), "authenticated");
        self.tenant = Some(Authenticated {
            username: tenant.username.clone(),
            credential: tenant.credential().clone(),
        });
        reply(&mut self.out, 235, "2.7.0 Authentication successful");
        None
    }
}

fn capitalized(text: &str) -> String {
    let mut text = text.to_string();
    if let Some(first) = text.get_mut(..1) {
        first.make_ascii_uppercase();
    }
    text
}

/// `AUTH PLAIN` initial response for `username` and `password`.
pub fn plain_token(username: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{username}\0{password}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyAlgorithm, RelayLimits, UpstreamTls};
    use crate::dkim::{NewKey, generate};
    use crate::relay::auth::hash_password;
    use crate::relay::config::{
        DomainEntry, DomainShard, RelaySettings, SigningKeyEntry, TenantEntry, UpstreamSettings,
    };
    use crate::relay::limits::Admission;
    use crate::relay::metrics::RelayMetrics;

    fn snapshot_with(
        limits: RelayLimits,
        per_minute: u32,
        domains: &[&str],
        acme_password: &str,
    ) -> RelaySnapshot {
        let settings = RelaySettings {
            hostname: "relay.test".into(),
            allow_plaintext_auth: true,
            upstream: UpstreamSettings {
                host: "127.0.0.1".into(),
                port: 25,
                tls: UpstreamTls::None,
                auth: None,
                ca_certificates: None,
            },
            limits,
        };
        let domain = |name: &str| {
            let key = generate(&NewKey {
                selector: "s1".into(),
                algorithm: KeyAlgorithm::Ed25519,
                size: None,
                generation: 1,
            })
            .unwrap();
            DomainEntry {
                domain: name.into(),
                messages_per_minute: per_minute,
                signing_keys: vec![SigningKeyEntry {
                    selector: "s1".into(),
                    algorithm: KeyAlgorithm::Ed25519,
                    private_key_pem: key.private_key_pem.expose_secret().to_string(),
                }],
                return_path: None,
            }
        };
        let shard = DomainShard {
            tenants: vec![
                TenantEntry {
                    username: "acme".into(),
                    password_hash: hash_password(acme_password, b"salt"),
                    domains: vec!["acme.test".into()],
                },
                TenantEntry {
                    username: "other".into(),
                    password_hash: hash_password("other-pw", b"salt"),
                    domains: vec!["other.test".into()],
                },
            ],
            domains: domains.iter().map(|name| domain(name)).collect(),
        };
        crate::relay::snapshot::for_test(&settings, &[shard])
    }

    fn snapshot() -> RelaySnapshot {
        snapshot_with(
            RelayLimits::default(),
            1000,
            &["acme.test", "other.test"],
            "acme-pw",
        )
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            rate_limiter: RateLimiter::default(),
            auth_throttle: AuthThrottle::default(),
            metrics: RelayMetrics::unregistered(),
            rate_limit_share: 1,
        })
    }

    /// A session and what it said and asked for.
    struct Harness {
        protocol: Protocol,
        snapshot: RelaySnapshot,
        admission: Arc<Admission>,
    }

    impl Harness {
        fn new(snapshot: RelaySnapshot) -> Self {
            Self::with_shared(snapshot, shared())
        }

        fn with_shared(snapshot: RelaySnapshot, shared: Arc<Shared>) -> Self {
            let admission = Arc::new(Admission::default());
            let peer: IpAddr = "192.0.2.1".parse().unwrap();
            let permit = admission.admit(peer, &snapshot.settings.limits).unwrap();
            let mut protocol = Protocol::new(shared, permit, peer, true);
            protocol.greet(&Step {
                snapshot: &snapshot,
                now: Instant::now(),
                utc: jiff::Timestamp::now(),
            });
            protocol.clear_output();
            Self {
                protocol,
                snapshot,
                admission,
            }
        }

        /// Feeds `bytes` and returns the first action that is not
        /// `NeedInput` (or `NeedInput`).
        fn feed(&mut self, bytes: &str) -> Action {
            self.feed_bytes(bytes.as_bytes())
        }

        fn feed_bytes(&mut self, bytes: &[u8]) -> Action {
            self.protocol.input().extend_from_slice(bytes);
            self.next()
        }

        fn next(&mut self) -> Action {
            self.protocol.next(&Step {
                snapshot: &self.snapshot,
                now: Instant::now(),
                utc: jiff::Timestamp::now(),
            })
        }

        /// The replies written so far, one string per line; cleared.
        fn said(&mut self) -> Vec<String> {
            let text = String::from_utf8(self.protocol.output().to_vec()).unwrap();
            self.protocol.clear_output();
            text.lines().map(str::to_string).collect()
        }

        fn codes(&mut self) -> Vec<u16> {
            self.said()
                .iter()
                .filter(|line| line.as_bytes().get(3) != Some(&b'-'))
                .map(|line| line[..3].parse().unwrap())
                .collect()
        }

        fn login(&mut self) {
            let token = plain_token("acme", "acme-pw");
            assert_eq!(
                self.feed(&format!("EHLO client.test\r\nAUTH PLAIN {token}\r\n")),
                Action::NeedInput
            );
            assert_eq!(self.codes(), [250, 235]);
        }

        /// Answers an envelope batch with `codes`, one per command.
        fn upstream_says(&mut self, codes: &[u16]) {
            let replies = codes
                .iter()
                .map(|code| Response {
                    code: *code,
                    esc: [code / 100, 0, 0].map(|d| d as u8),
                    message: format!("upstream {code}"),
                })
                .collect();
            self.protocol.envelope_replies(Ok(replies));
        }

        /// A whole accepted transaction up to the Deliver action.
        fn transaction(&mut self, message: &str) -> Vec<u8> {
            let action =
                self.feed("MAIL FROM:<alice@acme.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n");
            assert_eq!(
                action,
                Action::Envelope(vec![mail("<alice@acme.test>"), rcpt("<bob@example.net>")])
            );
            self.upstream_says(&[250, 250]);
            assert_eq!(self.next(), Action::NeedInput);
            assert_eq!(self.codes(), [250, 250, 354]);
            match self.feed(&format!("{message}.\r\n")) {
                Action::Deliver(signed) => signed.to_vec(),
                other => panic!("{other:?}: {:?}", self.said()),
            }
        }
    }

    fn mail(path: &str) -> EnvelopeCommand {
        let (from, _) = super::super::path::parse_reverse_path(path.as_bytes()).unwrap();
        EnvelopeCommand::Mail {
            from,
            size: None,
            body: Body::SevenBit,
        }
    }

    fn rcpt(path: &str) -> EnvelopeCommand {
        let (to, _) = super::super::path::parse_forward_path(path.as_bytes()).unwrap();
        EnvelopeCommand::Rcpt { to }
    }

    const MESSAGE: &str =
        "From: Alice <alice@acme.test>\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\nHello\r\n";

    #[test]
    fn ehlo_offers_auth_and_starttls_only_when_they_apply() {
        let mut h = Harness::new(snapshot());
        h.feed("EHLO client.test\r\n");
        let said = h.said().join("\n");
        assert!(
            said.contains("250-STARTTLS") && said.contains("AUTH PLAIN LOGIN"),
            "{said}"
        );
        h.login();
        h.feed("EHLO client.test\r\n");
        assert!(!h.said().join("\n").contains("AUTH"));
    }

    #[test]
    fn nothing_is_sent_before_authentication() {
        let mut h = Harness::new(snapshot());
        assert_eq!(
            h.feed("EHLO c\r\nMAIL FROM:<alice@acme.test>\r\n"),
            Action::NeedInput
        );
        assert_eq!(h.codes(), [250, 530]);
        assert_eq!(
            h.feed("RCPT TO:<bob@example.net>\r\nDATA\r\n"),
            Action::NeedInput
        );
        assert_eq!(h.codes(), [503, 503]);
    }

    #[test]
    fn three_wrong_passwords_close_the_session() {
        let mut h = Harness::new(snapshot());
        let wrong = plain_token("acme", "wrong");
        h.feed("EHLO c\r\n");
        h.said();
        for _ in 0..2 {
            assert_eq!(
                h.feed(&format!("AUTH PLAIN {wrong}\r\n")),
                Action::NeedInput
            );
            assert_eq!(h.codes(), [535]);
        }
        assert_eq!(h.feed(&format!("AUTH PLAIN {wrong}\r\n")), Action::Close);
        assert_eq!(h.codes(), [535, 421]);
    }

    #[test]
    fn pipelined_mail_and_rcpt_go_upstream_in_one_batch_and_replies_stay_in_order() {
        let mut h = Harness::new(snapshot_with(
            RelayLimits {
                max_recipients: 2,
                ..RelayLimits::default()
            },
            1000,
            &["acme.test"],
            "acme-pw",
        ));
        h.login();
        let action = h.feed(
            "MAIL FROM:<alice@acme.test>\r\nRCPT TO:<a@example.net>\r\nRCPT TO:<b@example.net>\r\n\
             RCPT TO:<c@example.net>\r\nDATA\r\n",
        );
        assert_eq!(
            action,
            Action::Envelope(vec![
                mail("<alice@acme.test>"),
                rcpt("<a@example.net>"),
                rcpt("<b@example.net>"),
            ])
        );
        // The sender is answered by the policy; the recipients wait for
        // the upstream.
        assert_eq!(h.said(), ["250 2.1.0 Sender OK"]);
        h.upstream_says(&[250, 550, 250]);
        assert_eq!(h.next(), Action::NeedInput);
        // The third recipient is over the limit: ours, after the others.
        let said = h.said();
        assert_eq!(said[0], "550 5.0.0 upstream 550");
        assert_eq!(said[1], "250 2.0.0 upstream 250");
        assert!(said[2].starts_with("452 4.5.3"), "{said:?}");
        assert!(said[3].starts_with("354 "), "{said:?}");
    }

    #[test]
    fn a_sender_the_upstream_refuses_is_the_answer_to_every_recipient() {
        let mut h = Harness::new(snapshot());
        h.login();
        assert_eq!(h.feed("MAIL FROM:<alice@acme.test>\r\n"), Action::NeedInput);
        assert_eq!(h.codes(), [250]);
        let action = h.feed("RCPT TO:<a@example.net>\r\n");
        assert_eq!(
            action,
            Action::Envelope(vec![mail("<alice@acme.test>"), rcpt("<a@example.net>")])
        );
        h.protocol.envelope_replies(Ok(vec![
            Response {
                code: 550,
                esc: [5, 7, 1],
                message: "sender blocked".into(),
            },
            Response {
                code: 503,
                esc: [5, 5, 1],
                message: "need MAIL".into(),
            },
        ]));
        assert_eq!(h.said(), ["550 5.7.1 sender blocked"]);
        // Later recipients get the same answer without asking again.
        assert_eq!(
            h.feed("RCPT TO:<b@example.net>\r\nDATA\r\n"),
            Action::NeedInput
        );
        let said = h.said();
        assert_eq!(said[0], "550 5.7.1 sender blocked");
        assert!(said[1].starts_with("554 "), "{said:?}");
    }

    #[test]
    fn the_envelope_upstream_is_written_from_the_parsed_path() {
        let mut h = Harness::new(snapshot());
        h.login();
        assert_eq!(
            h.feed("MAIL FROM:<\"ceo@other.test> AUTH=<>\"@acme.test>\r\n"),
            Action::NeedInput
        );
        assert_eq!(h.codes(), [501]);
        let action =
            h.feed("MAIL FROM:<\"ceo@other.test\"@ACME.test>\r\nRCPT TO:<b@example.net>\r\n");
        let Action::Envelope(commands) = action else {
            panic!("{action:?}")
        };
        let EnvelopeCommand::Mail { from, .. } = &commands[0] else {
            panic!("{commands:?}")
        };
        assert_eq!(from.to_string(), "<\"ceo@other.test\"@acme.test>");
        // Another tenant's domain is refused before anything goes upstream.
        h.upstream_says(&[250, 250]);
        h.said();
        h.feed("RSET\r\n");
        assert_eq!(h.feed("MAIL FROM:<ceo@other.test>\r\n"), Action::NeedInput);
        let said = h.said();
        assert!(
            said.iter().any(|line| line.starts_with("550 5.7.1")),
            "{said:?}"
        );
    }

    #[test]
    fn a_message_is_signed_completed_and_the_upstreams_reply_passed_on() {
        let mut h = Harness::new(snapshot());
        h.login();
        let signed = h.transaction(MESSAGE);
        let text = String::from_utf8(signed).unwrap();
        assert!(text.starts_with("DKIM-Signature:"), "{text}");
        assert!(text.contains("\r\nDate: "), "{text}");
        assert!(text.contains("\r\nMessage-ID: <"), "{text}");
        assert!(text.ends_with("\r\n\r\nHello\r\n"), "{text}");
        assert!(h.protocol.upstream_transaction_open());
        h.protocol.delivered(UpstreamResult::Replied(Response {
            code: 250,
            esc: [2, 0, 0],
            message: "Ok: queued as ABC".into(),
        }));
        assert_eq!(h.said(), ["250 2.0.0 Ok: queued as ABC"]);
        assert!(!h.protocol.upstream_transaction_open());
    }

    #[test]
    fn only_accepted_mail_spends_a_token() {
        let mut h = Harness::new(snapshot_with(
            RelayLimits::default(),
            1,
            &["acme.test"],
            "acme-pw",
        ));
        h.login();
        h.transaction(MESSAGE);
        h.protocol.delivered(UpstreamResult::Replied(Response {
            code: 554,
            esc: [5, 7, 1],
            message: "no".into(),
        }));
        assert_eq!(h.said(), ["554 5.7.1 Upstream: no"]);
        h.transaction(MESSAGE);
        h.protocol
            .delivered(UpstreamResult::Unavailable("gone".into()));
        assert_eq!(h.codes(), [451]);
        h.transaction(MESSAGE);
        h.protocol.delivered(UpstreamResult::Replied(Response {
            code: 250,
            esc: [2, 0, 0],
            message: "ok".into(),
        }));
        assert_eq!(h.codes(), [250]);
        // The one token is spent now.
        h.feed("MAIL FROM:<alice@acme.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n");
        h.upstream_says(&[250, 250]);
        h.next();
        h.said();
        assert_eq!(h.feed(&format!("{MESSAGE}.\r\n")), Action::NeedInput);
        assert_eq!(h.codes(), [451]);
    }

    #[test]
    fn a_domain_revoked_during_the_data_is_refused_at_its_end() {
        let mut h = Harness::new(snapshot());
        h.login();
        h.feed("MAIL FROM:<alice@acme.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n");
        h.upstream_says(&[250, 250]);
        h.next();
        h.said();
        h.snapshot = snapshot_with(RelayLimits::default(), 1000, &["other.test"], "acme-pw");
        assert_eq!(h.feed(&format!("{MESSAGE}.\r\n")), Action::NeedInput);
        let said = h.said();
        assert!(said[0].starts_with("550 5.7.1"), "{said:?}");
        assert!(
            !h.protocol.upstream_transaction_open(),
            "the upstream side is to be reset"
        );
    }

    #[test]
    fn a_re_issued_password_ends_the_session_at_its_next_transaction() {
        let mut h = Harness::new(snapshot());
        h.login();
        h.snapshot = snapshot_with(RelayLimits::default(), 1000, &["acme.test"], "new-pw");
        assert_eq!(h.feed("NOOP\r\n"), Action::NeedInput);
        assert_eq!(h.feed("MAIL FROM:<alice@acme.test>\r\n"), Action::Close);
        let said = h.said();
        assert!(said.last().unwrap().starts_with("421 4.7.0"), "{said:?}");
    }

    #[test]
    fn an_unavailable_upstream_defers_the_envelope() {
        let mut h = Harness::new(snapshot());
        h.login();
        h.feed("MAIL FROM:<alice@acme.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n");
        h.protocol.envelope_replies(Err("refused".into()));
        assert_eq!(h.next(), Action::NeedInput);
        // The recipient is deferred; with none accepted, DATA has nothing
        // to send. The next RCPT tries MAIL again.
        assert_eq!(h.codes(), [250, 451, 554]);
        let action = h.feed("RCPT TO:<bob@example.net>\r\n");
        assert_eq!(
            action,
            Action::Envelope(vec![mail("<alice@acme.test>"), rcpt("<bob@example.net>")])
        );
    }

    #[test]
    fn bare_cr_is_refused_and_bare_lf_normalised() {
        let mut h = Harness::new(snapshot());
        h.login();
        // After a bare LF, ". CRLF" is content: the data ends at CRLF . CRLF.
        let signed = h.transaction(&format!("{}\r\n", MESSAGE.replace("\r\n", "\n")));
        assert!(!signed.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'));
        h.protocol
            .delivered(UpstreamResult::Unavailable("x".into()));
        h.said();
        h.feed("MAIL FROM:<alice@acme.test>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n");
        h.upstream_says(&[250, 250]);
        h.next();
        h.said();
        assert_eq!(
            h.feed(&format!("{}.\r\n", MESSAGE.replace("Hello", "Hel\rlo"))),
            Action::NeedInput
        );
        let said = h.said();
        assert!(
            said[0].starts_with("554 5.6.0") && said[0].contains("bare CR"),
            "{said:?}"
        );
    }

    #[test]
    fn starttls_drops_what_was_pipelined_after_it() {
        let mut h = Harness::new(snapshot());
        assert_eq!(
            h.feed("EHLO c\r\nSTARTTLS\r\nMAIL FROM:<x@y.test>\r\n"),
            Action::StartTls
        );
        assert_eq!(h.codes(), [250, 220]);
        h.protocol.tls_started();
        assert_eq!(h.next(), Action::NeedInput);
        assert!(h.said().is_empty());
    }

    #[test]
    fn no_starttls_after_a_plaintext_login() {
        let mut h = Harness::new(snapshot());
        h.login();
        assert_eq!(h.feed("STARTTLS\r\n"), Action::NeedInput);
        assert_eq!(h.codes(), [503]);
    }

    #[test]
    fn a_line_too_long_is_refused_and_the_session_goes_on() {
        let mut h = Harness::new(snapshot());
        assert_eq!(h.feed(&"X".repeat(MAX_LINE + 10)), Action::NeedInput);
        assert_eq!(h.codes(), [500]);
        assert_eq!(h.feed("more of it\r\nNOOP\r\n"), Action::NeedInput);
        assert_eq!(h.codes(), [250]);
        // Also when it arrives whole, with its line end.
        let whole = format!("MAIL FROM:<{}@acme.test>\r\nNOOP\r\n", "a".repeat(MAX_LINE));
        assert_eq!(h.feed(&whole), Action::NeedInput);
        assert_eq!(h.codes(), [500, 250]);
    }

    #[test]
    fn a_tenant_past_its_session_limit_is_told_to_wait() {
        let snapshot = snapshot_with(
            RelayLimits {
                max_connections_per_tenant: 1,
                ..RelayLimits::default()
            },
            1000,
            &["acme.test"],
            "acme-pw",
        );
        let mut h = Harness::new(snapshot);
        h.login();
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let permit = h
            .admission
            .admit(peer, &h.snapshot.settings.limits)
            .unwrap();
        let mut second = Protocol::new(shared(), permit, peer, false);
        second.input().extend_from_slice(
            format!(
                "EHLO c\r\nAUTH PLAIN {}\r\n",
                plain_token("acme", "acme-pw")
            )
            .as_bytes(),
        );
        second.next(&Step {
            snapshot: &h.snapshot,
            now: Instant::now(),
            utc: jiff::Timestamp::now(),
        });
        let said = String::from_utf8(second.output().to_vec()).unwrap();
        assert!(
            said.ends_with("for this account (at most 1); try again later\r\n"),
            "{said}"
        );
        assert!(!second.is_authenticated());
    }

    #[test]
    fn failures_on_other_connections_throttle_this_one() {
        let shared = shared();
        for _ in 0..4 {
            let mut h = Harness::with_shared(snapshot(), shared.clone());
            h.feed("EHLO c\r\n");
            for _ in 0..3 {
                h.feed(&format!("AUTH PLAIN {}\r\n", plain_token("nobody", "x")));
            }
        }
        let mut h = Harness::with_shared(snapshot(), shared);
        h.feed("EHLO c\r\n");
        h.said();
        h.feed(&format!(
            "AUTH PLAIN {}\r\n",
            plain_token("acme", "acme-pw")
        ));
        let said = h.said();
        assert!(
            said[0].starts_with("454 4.7.0 Too many failed logins"),
            "{said:?}"
        );
        assert!(!h.protocol.is_authenticated());
    }
}
