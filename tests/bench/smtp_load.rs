//! SMTP load generator for tests/bench/relay.sh: `concurrency` clients
//! (optionally STARTTLS and AUTH PLAIN) submit `messages` messages of about
//! `size` bytes in total, as fast as the server answers. smtp-source cannot
//! authenticate, so the relay and the Postfix comparison both use this one.
//!
//! Two clients:
//! - `--client mail-send` (default): mail-send's SmtpClient, each client on
//!   one connection for all its messages.
//! - `--client lockstep`: one command per round trip and nothing pipelined,
//!   as Go's net/smtp and most application mailers talk: each command is
//!   one write and waits for its reply; the message goes out in 4 KiB
//!   writes (net/smtp's bufio) and its final dot. `--per-connection N`
//!   sends N messages per connection, then QUIT and a new connection (with
//!   its greeting, EHLO, STARTTLS and AUTH again).
//!
//! ```text
//! smtp_load --port P [--messages N] [--concurrency C] [--size BYTES]
//!           [--starttls] [--auth USER:PASSWORD] [--from ADDRESS]
//!           [--client mail-send|lockstep] [--per-connection N]
//! ```
//!
//! Prints one `key=value` line: messages, concurrency, size, elapsed_s,
//! rate (messages/s, from the first connection to the last 250),
//! p50_ms/p99_ms/max_ms (per message: MAIL FROM to the reply after the
//! final dot). Exits non-zero if any message was not accepted.

use std::time::{Duration, Instant};

use mail_send::smtp::AssertReply as _;
use mail_send::smtp::message::Message;
use mail_send::{Credentials, SmtpClient};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

#[derive(Clone, Debug)]
struct Options {
    port: u16,
    messages: usize,
    concurrency: usize,
    size: usize,
    starttls: bool,
    auth: Option<(String, String)>,
    from: String,
    lockstep: bool,
    per_connection: usize,
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "smtp_load: {problem}\nusage: smtp_load --port P [--messages N] [--concurrency C] \
         [--size BYTES] [--starttls] [--auth USER:PASSWORD] [--from ADDRESS] \
         [--client mail-send|lockstep] [--per-connection N]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut options = Options {
        port: 0,
        messages: 1000,
        concurrency: 20,
        size: 10 * 1024,
        starttls: false,
        auth: None,
        from: "alice@bench.test".into(),
        lockstep: false,
        per_connection: usize::MAX,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .unwrap_or_else(|| usage(&format!("{name} needs a value")))
        };
        let number = |name: &str, text: String| -> usize {
            text.parse()
                .unwrap_or_else(|_| usage(&format!("{name}: not a number: {text}")))
        };
        match arg.as_str() {
            "--port" => options.port = number("--port", value("--port")) as u16,
            "--messages" => options.messages = number("--messages", value("--messages")),
            "--concurrency" => {
                options.concurrency = number("--concurrency", value("--concurrency"))
            }
            "--size" => options.size = number("--size", value("--size")),
            "--starttls" => options.starttls = true,
            "--auth" => {
                let credentials = value("--auth");
                let (user, password) = credentials
                    .split_once(':')
                    .unwrap_or_else(|| usage("--auth takes USER:PASSWORD"));
                options.auth = Some((user.into(), password.into()));
            }
            "--from" => options.from = value("--from"),
            "--client" => match value("--client").as_str() {
                "mail-send" => options.lockstep = false,
                "lockstep" => options.lockstep = true,
                other => usage(&format!("unknown client {other}")),
            },
            "--per-connection" => {
                options.per_connection = number("--per-connection", value("--per-connection"))
            }
            // `cargo bench` passes this to harness-less benches.
            "--bench" => {}
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if options.port == 0 {
        usage("--port is required");
    }
    if options.concurrency == 0 || options.messages < options.concurrency {
        usage("need at least one message per client");
    }
    if options.per_connection == 0 {
        usage("--per-connection must be at least 1");
    }
    if options.per_connection != usize::MAX && !options.lockstep {
        usage("--per-connection needs --client lockstep");
    }
    options
}

/// A plain-text message of about `size` bytes with the headers a mail
/// client writes (the ones the relay signs), unique by `id`.
fn message(from: &str, id: usize, size: usize) -> String {
    let mut text = format!(
        "From: Alice <{from}>\r\nTo: Bob <bob@example.net>\r\nSubject: load test message {id}\r\n\
         Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <load-{id}@client.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    );
    const LINE: &str =
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    while text.len() + LINE.len() <= size {
        text.push_str(LINE);
    }
    text
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sends `count` messages on one connection; returns each one's latency.
async fn client(
    options: Options,
    first_id: usize,
    count: usize,
) -> Result<Vec<Duration>, BoxError> {
    // Built by hand rather than with `SmtpClientBuilder` to turn Nagle off:
    // with it, every message waits for a delayed ACK.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", options.port)).await?;
    tcp.set_nodelay(true)?;
    let mut plain = SmtpClient {
        stream: tcp,
        timeout: Duration::from_secs(60),
    };
    plain.read().await?.assert_positive_completion()?;
    let capabilities = plain.ehlo("load.test").await?;
    if options.starttls {
        let connector = mail_send::smtp::tls::build_tls_connector(true)?;
        let mut tls = plain.start_tls(&connector, "relay.bench").await?;
        let capabilities = tls.ehlo("load.test").await?;
        send_all(tls, capabilities, &options, first_id, count).await
    } else {
        send_all(plain, capabilities, &options, first_id, count).await
    }
}

async fn send_all<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: SmtpClient<S>,
    capabilities: smtp_proto::EhloResponse<String>,
    options: &Options,
    first_id: usize,
    count: usize,
) -> Result<Vec<Duration>, BoxError> {
    if let Some((user, password)) = &options.auth {
        client
            .authenticate(
                Credentials::new(user.clone(), password.clone()),
                &capabilities,
            )
            .await?;
    }
    let mut latencies = Vec::with_capacity(count);
    for id in first_id..first_id + count {
        let body = message(&options.from, id, options.size);
        let started = Instant::now();
        client
            .send(Message::new(
                options.from.as_str(),
                ["bob@example.net"],
                body.as_bytes(),
            ))
            .await
            .map_err(|error| format!("message {id}: {error}"))?;
        latencies.push(started.elapsed());
    }
    let _ = client.quit().await;
    Ok(latencies)
}

/// Any stream the lockstep client talks over.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// One SMTP conversation, one command per round trip.
struct Lockstep {
    stream: Box<dyn Stream>,
    buffer: Vec<u8>,
}

impl Lockstep {
    /// Reads one reply (the last line of a multi-line one decides) and
    /// returns its code.
    async fn reply(&mut self) -> Result<u16, BoxError> {
        loop {
            let mut start = 0;
            while let Some(end) = self.buffer[start..].iter().position(|b| *b == b'\n') {
                let line = &self.buffer[start..start + end + 1];
                start += end + 1;
                if line.len() >= 4 && line[3] == b' ' || line.len() < 4 {
                    let code = std::str::from_utf8(&line[..3.min(line.len())])?.parse()?;
                    self.buffer.drain(..start);
                    return Ok(code);
                }
            }
            let mut chunk = [0u8; 4096];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Err("the server closed the connection".into());
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    async fn command(&mut self, line: &str, expected: u16) -> Result<(), BoxError> {
        // One write per command, as a buffered writer flushed per command.
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.stream.write_all(&bytes).await?;
        self.stream.flush().await?;
        let code = self.reply().await?;
        if code != expected {
            return Err(format!("{line:?}: {code}, expected {expected}").into());
        }
        Ok(())
    }
}

/// Opens a connection and gets it ready to send: greeting, EHLO, STARTTLS
/// and EHLO again, AUTH PLAIN.
async fn lockstep_connect(options: &Options) -> Result<Lockstep, BoxError> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", options.port)).await?;
    tcp.set_nodelay(true)?;
    let mut session = Lockstep {
        stream: Box::new(tcp),
        buffer: Vec::with_capacity(4096),
    };
    if session.reply().await? != 220 {
        return Err("no greeting".into());
    }
    session.command("EHLO load.test", 250).await?;
    if options.starttls {
        session.command("STARTTLS", 220).await?;
        let connector = mail_send::smtp::tls::build_tls_connector(true)?;
        let Lockstep { stream, .. } = session;
        let name = rustls_pki_types::ServerName::try_from("relay.bench")?;
        let tls = connector.connect(name, stream).await?;
        session = Lockstep {
            stream: Box::new(tls),
            buffer: Vec::with_capacity(4096),
        };
        session.command("EHLO load.test", 250).await?;
    }
    if let Some((user, password)) = &options.auth {
        use base64::Engine as _;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        // smtp-sink, the direct comparison, answers AUTH with 250.
        session
            .stream
            .write_all(format!("AUTH PLAIN {token}\r\n").as_bytes())
            .await?;
        session.stream.flush().await?;
        let code = session.reply().await?;
        if code != 235 && code != 250 {
            return Err(format!("AUTH: {code}").into());
        }
    }
    Ok(session)
}

/// Sends `count` messages, `per_connection` per connection, one command
/// per round trip; returns each message's latency (MAIL FROM to the reply
/// after the dot).
async fn lockstep_client(
    options: Options,
    first_id: usize,
    count: usize,
) -> Result<Vec<Duration>, BoxError> {
    let mut latencies = Vec::with_capacity(count);
    let mut id = first_id;
    while id < first_id + count {
        let mut session = lockstep_connect(&options).await?;
        let batch = options.per_connection.min(first_id + count - id);
        for _ in 0..batch {
            let body = message(&options.from, id, options.size);
            let started = Instant::now();
            session
                .command(&format!("MAIL FROM:<{}>", options.from), 250)
                .await?;
            session.command("RCPT TO:<bob@example.net>", 250).await?;
            session.command("DATA", 354).await?;
            // The generated message has no line starting with a dot.
            for chunk in body.as_bytes().chunks(4096) {
                session.stream.write_all(chunk).await?;
            }
            session.stream.write_all(b".\r\n").await?;
            session.stream.flush().await?;
            let code = session.reply().await?;
            if code != 250 {
                return Err(format!("message {id}: {code}").into());
            }
            latencies.push(started.elapsed());
            id += 1;
        }
        session.command("QUIT", 221).await?;
    }
    Ok(latencies)
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    let index = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

fn main() {
    let options = parse_options();
    // Two workers: the machine has two cores, shared with the server
    // under test.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let started = Instant::now();
    let results = runtime.block_on(async {
        let per_client = options.messages / options.concurrency;
        let remainder = options.messages % options.concurrency;
        let mut first_id = 0;
        let mut tasks = Vec::with_capacity(options.concurrency);
        for index in 0..options.concurrency {
            let count = per_client + usize::from(index < remainder);
            tasks.push(if options.lockstep {
                tokio::spawn(lockstep_client(options.clone(), first_id, count))
            } else {
                tokio::spawn(client(options.clone(), first_id, count))
            });
            first_id += count;
        }
        let mut results = Vec::with_capacity(tasks.len());
        for task in tasks {
            results.push(task.await.map_err(|error| error.to_string()));
        }
        results
    });
    let elapsed = started.elapsed();

    let mut latencies = Vec::with_capacity(options.messages);
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(Ok(client_latencies)) => latencies.extend(client_latencies),
            Ok(Err(error)) => failures.push(error.to_string()),
            Err(error) => failures.push(error),
        }
    }
    latencies.sort();
    if latencies.is_empty() {
        eprintln!("smtp_load: no message was accepted: {failures:?}");
        std::process::exit(1);
    }
    println!(
        "messages={} concurrency={} size={} elapsed_s={:.3} rate={:.1} p50_ms={:.2} p99_ms={:.2} max_ms={:.2} failed_clients={}",
        latencies.len(),
        options.concurrency,
        message(&options.from, 0, options.size).len(),
        elapsed.as_secs_f64(),
        latencies.len() as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
        failures.len()
    );
    if !failures.is_empty() {
        eprintln!("smtp_load: {} clients failed: {failures:?}", failures.len());
        std::process::exit(1);
    }
}
