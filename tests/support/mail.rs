//! Real mail peers for relay tests: an aiosmtpd sink as the upstream
//! ([`SmtpSink`], plain or as a TLS+AUTH smarthost), `swaks` as the
//! submitting client, dkimpy (`python3-dkim`,
//! with `python3-dnspython`) to verify stored messages against the test
//! knot, and the relay itself run as the built binary.
//!
//! Every wait goes through `support::wait`; none sleeps blind.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::metrics::{Samples, scrape};
use super::wait::eventually;

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A TCP port nobody listens on right now.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding an ephemeral port")
}

/// The SMTP server relay tests deliver to: `tests/support/smtp_sink.py`
/// (aiosmtpd, Debian package `python3-aiosmtpd`), plain like Postfix's
/// smtp-sink or as a smarthost requiring TLS and AUTH.
///
/// It stores each message whole, under a name that counts up in arrival
/// order, before it answers 250 (see the script): what [`SmtpSink::messages`]
/// returns is exactly what the sink acknowledged (or was about to), never a
/// file cut short by a kill, in the order it arrived.
pub struct SmtpSink {
    pub port: u16,
    dir: tempfile::TempDir,
    /// The script's arguments after `PORT DIR`.
    mode: Vec<String>,
    child: Option<Child>,
}

impl SmtpSink {
    /// A plain sink: no TLS, no AUTH.
    pub fn start() -> Self {
        Self::start_with(vec!["plain".into()])
    }

    /// A smarthost that requires TLS (`starttls` or implicit `tls`) and
    /// AUTH with `credentials`, presenting `cert`/`key`.
    pub fn start_secure(mode: &str, credentials: (&str, &str), cert: &Path, key: &Path) -> Self {
        Self::start_with(vec![
            mode.into(),
            cert.display().to_string(),
            key.display().to_string(),
            credentials.0.into(),
            credentials.1.into(),
        ])
    }

    fn start_with(mode: Vec<String>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("smtp-sink-")
            .tempdir()
            .expect("temp dir");
        let mut sink = Self {
            port: free_tcp_port(),
            dir,
            mode,
            child: None,
        };
        sink.spawn();
        sink
    }

    /// Starts the script on the sink's port and waits until it listens.
    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("sink log file");
        let mut child = Command::new("/usr/bin/python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/support/smtp_sink.py"
            ))
            .arg(self.port.to_string())
            .arg(self.messages_dir())
            .args(&self.mode)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("running aiosmtpd (Debian package `python3-aiosmtpd`)");
        let mut ready = String::new();
        let stdout = child.stdout.as_mut().expect("stdout");
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut ready);
        if ready.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the SMTP sink did not start:\n{}", self.log());
        }
        self.child = Some(child);
    }

    fn messages_dir(&self) -> PathBuf {
        let dir = self.dir.path().join("messages");
        std::fs::create_dir_all(&dir).expect("sink message directory");
        dir
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sink.log")
    }

    /// What the sink logged (aiosmtpd's errors, if any).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Kills the sink (SIGKILL, as a crash would): connections to its port
    /// are refused from now on, and a transaction in flight is lost
    /// without an answer.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the sink again on the same port, keeping what it stored: an
    /// upstream coming back after an outage.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Every message the sink accepted, complete, in arrival order, as it
    /// was received (CRLF line ends, dot-stuffing undone) behind the
    /// `Received` header the sink adds.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(self.messages_dir())
            .expect("reading the sink directory")
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "eml"))
            .collect();
        // Zero-padded arrival numbers: name order is arrival order.
        paths.sort();
        paths
            .iter()
            .map(|path| std::fs::read(path).expect("a stored message"))
            .collect()
    }

    /// How many messages the sink accepted.
    pub fn count(&self) -> usize {
        self.messages().len()
    }

    /// The message that arrived last, if any.
    pub fn last(&self) -> Option<Vec<u8>> {
        self.messages().pop()
    }

    /// Waits until at least `count` messages are stored; returns them all,
    /// in arrival order.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Vec<u8>> {
        eventually(format!("the sink to store {count} messages"))
            .within(timeout)
            .until(|| {
                let messages = self.messages();
                if messages.len() >= count {
                    Ok(messages)
                } else {
                    Err(format!("{} stored", messages.len()))
                }
            })
    }

    /// Whether some stored message has `needle` in its headers or body.
    pub fn contains(&self, needle: &str) -> bool {
        self.messages()
            .iter()
            .any(|message| String::from_utf8_lossy(message).contains(needle))
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A swaks run.
#[derive(Debug)]
pub struct Submission {
    pub success: bool,
    /// swaks' transcript: `<-` lines are the relay's replies, `<~` the same
    /// inside TLS, `<**`/`<~*` are failures.
    pub transcript: String,
}

impl Submission {
    /// The code of the first failure reply swaks reported (`<**` in clear,
    /// `<~*` inside TLS), which is what ended the submission.
    pub fn failure_code(&self) -> Option<u16> {
        self.transcript.lines().find_map(|line| {
            let reply = line
                .strip_prefix("<** ")
                .or_else(|| line.strip_prefix("<~* "))?;
            reply.trim_start().get(..3)?.parse().ok()
        })
    }
}

/// What swaks should do.
#[derive(Clone, Debug, Default)]
pub struct Swaks {
    pub port: u16,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    /// `(username, password)` for AUTH; `None` for no AUTH.
    pub auth: Option<(String, String)>,
    /// `PLAIN` or `LOGIN`.
    pub auth_mechanism: Option<String>,
    pub starttls: bool,
    /// The whole message (headers and body) to send.
    pub data: String,
}

impl Swaks {
    pub fn run(&self) -> Submission {
        let data_file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(data_file.path(), &self.data).expect("writing the message");
        let mut command = Command::new("swaks");
        command
            .args(["--server", &format!("127.0.0.1:{}", self.port)])
            .args(["--from", &self.mail_from])
            .args(["--ehlo", "client.test"])
            .arg("--data")
            .arg(format!("@{}", data_file.path().display()))
            .args(["--timeout", "30"]);
        command.args(["--to", &self.rcpt_to.join(",")]);
        if self.starttls {
            command.arg("--tls");
        }
        // swaks takes a password that starts with `-` (one generated
        // password in 64) for an option, however it is passed on the
        // command line; asked for it, it reads it from stdin as it is.
        let mut password_line = None;
        if let Some((username, password)) = &self.auth {
            let mechanism = self.auth_mechanism.as_deref().unwrap_or("PLAIN");
            command
                .args(["--auth", mechanism])
                // `=` keeps a username that starts with `-` from reading as
                // an option; the password goes on stdin, never in argv.
                .arg(format!("--auth-user={username}"))
                .arg("--auth-password");
            password_line = Some(format!("{password}\n"));
        }
        let output = super::cluster::run_with_stdin(
            &mut command,
            Some(password_line.as_deref().unwrap_or("")),
        );
        Submission {
            success: output.status.success(),
            transcript: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        }
    }
}

/// One DKIM-Signature's verdict from dkimpy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimVerdict {
    pub domain: String,
    pub selector: String,
    pub algorithm: String,
    pub pass: bool,
}

const DKIMPY_VERIFY: &str = r#"
import sys, dkim, dns.resolver
from dkim.util import parse_tag_value
port = int(sys.argv[1])
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers = ["127.0.0.1"]
resolver.port = port
resolver.cache = None
def txt(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    # knot answers a CNAME into another of its zones without the target's
    # records; a recursive resolver follows it, and so does this.
    # No record at all is None, as for dkimpy's own lookup: the signature
    # then fails to verify.
    try:
        for _ in range(8):
            try:
                answer = resolver.resolve(name, "TXT", lifetime=timeout)
                return b"".join(b"".join(record.strings) for record in answer)
            except dns.resolver.NoAnswer:
                name = resolver.resolve(name, "CNAME", lifetime=timeout)[0].target.to_text()
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    return None
def verify(raw, prefix):
    message = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    checker = dkim.DKIM(message)
    signatures = [value for (name, value) in checker.headers if name.lower() == b"dkim-signature"]
    for index, value in enumerate(signatures):
        tags = parse_tag_value(b"".join(value.split()))
        ok = checker.verify(idx=index, dnsfunc=txt)
        print(prefix + tags[b"d"].decode(), tags[b"s"].decode(), tags[b"a"].decode(), "pass" if ok else "fail")
# With paths after the port: each file is one message, each line is
# prefixed with the file's index. Without: one message on stdin.
if len(sys.argv) > 2:
    for number, path in enumerate(sys.argv[2:]):
        with open(path, "rb") as f:
            verify(f.read(), "%d " % number)
else:
    verify(sys.stdin.buffer.read(), "")
"#;

/// Verifies every DKIM signature of `message` with dkimpy, looking keys up
/// in the knot on `dns_port`.
pub fn dkimpy_verify(message: &[u8], dns_port: u16) -> Vec<DkimVerdict> {
    // The system Python has the Debian packages; a pyenv shim may not.
    let mut child = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(DKIMPY_VERIFY)
        .arg(dns_port.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python3 with dkimpy (Debian package `python3-dkim`)");
    child
        .stdin
        .take()
        .expect("stdin piped")
        .write_all(message)
        .expect("writing to dkimpy");
    let output = child.wait_with_output().expect("waiting for dkimpy");
    assert!(
        output.status.success(),
        "dkimpy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            DkimVerdict {
                domain: fields[0].to_string(),
                selector: fields[1].to_string(),
                algorithm: fields[2].to_string(),
                pass: fields[3] == "pass",
            }
        })
        .collect()
}

/// [`dkimpy_verify`] for many messages in one dkimpy run: the verdicts
/// of each message, in order.
pub fn dkimpy_verify_all(messages: &[Vec<u8>], dns_port: u16) -> Vec<Vec<DkimVerdict>> {
    let dir = tempfile::tempdir().expect("temp dir");
    let paths: Vec<PathBuf> = messages
        .iter()
        .enumerate()
        .map(|(n, message)| {
            let path = dir.path().join(format!("{n}.eml"));
            std::fs::write(&path, message).expect("writing a message");
            path
        })
        .collect();
    let output = Command::new("/usr/bin/python3")
        .arg("-c")
        .arg(DKIMPY_VERIFY)
        .arg(dns_port.to_string())
        .args(&paths)
        .stdin(Stdio::null())
        .output()
        .expect("running python3 with dkimpy (Debian package `python3-dkim`)");
    assert!(
        output.status.success(),
        "dkimpy failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut verdicts = vec![Vec::new(); messages.len()];
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let n: usize = fields[0].parse().expect("message number");
        verdicts[n].push(DkimVerdict {
            domain: fields[1].to_string(),
            selector: fields[2].to_string(),
            algorithm: fields[3].to_string(),
            pass: fields[4] == "pass",
        });
    }
    verdicts
}

/// A self-signed certificate and key for STARTTLS, made with openssl.
pub fn self_signed_certificate(dir: &Path, hostname: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join("tls.crt");
    let key = dir.join("tls.key");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", &format!("/CN={hostname}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("running openssl");
    assert!(status.success(), "openssl could not make a certificate");
    (cert, key)
}

/// A directory updated the way kubelet updates a Secret volume: files live
/// in a timestamped directory, `..data` points at it, and each visible name
/// is a symlink through `..data`. An update writes a new directory and
/// swaps `..data` with one atomic rename.
pub struct KubeletDir {
    dir: tempfile::TempDir,
    generation: u32,
}

impl KubeletDir {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("relay-config-")
                .tempdir()
                .expect("temp dir"),
            generation: 0,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Replaces the whole content with `files` (name, content).
    pub fn write(&mut self, files: &[(&str, Vec<u8>)]) {
        self.generation += 1;
        let root = self.dir.path();
        let data_dir_name = format!("..2026_01_01_00_00_00.{}", self.generation);
        let data_dir = root.join(&data_dir_name);
        std::fs::create_dir(&data_dir).expect("data dir");
        for (name, content) in files {
            std::fs::write(data_dir.join(name), content).expect("writing a config file");
        }
        let temporary_link = root.join("..data_tmp");
        let _ = std::fs::remove_file(&temporary_link);
        std::os::unix::fs::symlink(&data_dir_name, &temporary_link).expect("symlink");
        std::fs::rename(&temporary_link, root.join("..data")).expect("swapping ..data");
        for (name, _) in files {
            let link = root.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("symlink");
            }
        }
    }
}

/// `mailauth-operator relay` run as the built binary, killed on drop.
pub struct Relay {
    pub port: u16,
    pub admin_port: u16,
    child: Child,
    log: PathBuf,
    _log_dir: tempfile::TempDir,
}

impl Relay {
    /// Starts the relay on `config_dir` and waits until `/readyz` says its
    /// config is loaded.
    pub fn start(config_dir: &Path, tls: Option<(&Path, &Path)>) -> Self {
        Self::start_with(config_dir, tls, &[])
    }

    /// [`Relay::start`] with more command-line arguments (limits, timeouts).
    pub fn start_with(config_dir: &Path, tls: Option<(&Path, &Path)>, args: &[&str]) -> Self {
        let source = [std::ffi::OsString::from("--config-dir"), config_dir.into()];
        Self::spawn(&source, &[], tls, args)
    }

    /// Starts the relay as the operator deploys it: watching the config
    /// Secrets of MailRelay `relay` in `namespace` through the API server,
    /// authenticated by `kubeconfig` (a ServiceAccount's, so the relay has
    /// exactly the RBAC the operator renders for it).
    pub fn start_from_cluster(
        relay: &str,
        namespace: &str,
        kubeconfig: &Path,
        tls: Option<(&Path, &Path)>,
    ) -> Self {
        let source = [
            std::ffi::OsString::from("--config-secrets"),
            relay.into(),
            "--namespace".into(),
            namespace.into(),
        ];
        Self::spawn(&source, &[("KUBECONFIG", kubeconfig.as_os_str())], tls, &[])
    }

    fn spawn(
        source: &[std::ffi::OsString],
        env: &[(&str, &std::ffi::OsStr)],
        tls: Option<(&Path, &Path)>,
        args: &[&str],
    ) -> Self {
        let log_dir = tempfile::tempdir().expect("temp dir");
        let log = log_dir.path().join("relay.log");
        let port = free_tcp_port();
        let admin_port = free_tcp_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_mailauth-operator"));
        command
            .arg("relay")
            .args(source)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
            .args(["--reload-interval", "1s", "--upstream-timeout", "5s"])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RELAY_RUST_LOG").unwrap_or("info".into()),
            );
        for (name, value) in env {
            command.env(name, value);
        }
        if let Some((cert, key)) = tls {
            command
                .arg("--tls-cert")
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
        }
        let log_file = std::fs::File::create(&log).expect("log file");
        let child = command
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log file"))
            .stderr(log_file)
            .spawn()
            .expect("running the relay binary");
        let relay = Self {
            port,
            admin_port,
            child,
            log,
            _log_dir: log_dir,
        };
        let ready = eventually("the relay to answer /readyz with 200")
            .within(START_TIMEOUT)
            .try_until(|| match relay.http_get("/readyz") {
                Some((200, _)) => Ok(()),
                other => Err(other),
            });
        if let Err(timed_out) = ready {
            panic!("{timed_out}\nrelay log:\n{}", relay.log());
        }
        relay
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The relay's `/metrics`, parsed; panics when it does not answer 200.
    pub fn metrics(&self) -> Samples {
        scrape(self.admin_port)
            .unwrap_or_else(|| panic!("the relay's /metrics did not answer\n{}", self.log()))
    }

    /// `(status, body)` of a GET on the admin port.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.admin_port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_string();
        Some((status, body))
    }

    /// A raw SMTP conversation: sends each line and returns every reply
    /// line the relay sent, in order.
    pub fn converse(&self, lines: &[&str]) -> Vec<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).expect("connecting");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut replies = vec![read_reply(&mut stream)];
        for line in lines {
            stream
                .write_all(format!("{line}\r\n").as_bytes())
                .expect("writing");
            replies.push(read_reply(&mut stream));
        }
        replies
    }
}

/// Reads one (possibly multi-line) SMTP reply.
fn read_reply(stream: &mut TcpStream) -> String {
    let mut reply = String::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(1) => reply.push(char::from(byte[0])),
            _ => return reply,
        }
        // The last line of a reply has a space after its code.
        if reply.ends_with("\r\n") {
            let last = reply.trim_end().lines().last().unwrap_or("");
            if last.len() < 4 || last.as_bytes()[3] == b' ' {
                return reply;
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain-text SMTP client on a raw socket, for tests that need exact
/// reply codes, many submissions quickly (swaks starts a Perl process per
/// message) or bytes no well-behaved client sends. AUTH without STARTTLS
/// needs a relay whose config sets `allowPlaintextAuth`.
pub struct SmtpConnection {
    reader: std::io::BufReader<TcpStream>,
    writer: TcpStream,
    /// The server's greeting.
    pub greeting: String,
}

impl SmtpConnection {
    /// Connects and reads the greeting.
    pub fn connect(port: u16) -> std::io::Result<Self> {
        Self::from_stream(TcpStream::connect(("127.0.0.1", port))?)
    }

    /// Connects from the loopback address `source` (any of 127.0.0.0/8),
    /// as a client on another host would, and reads the greeting.
    pub fn connect_from(source: std::net::Ipv4Addr, port: u16) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind(SocketAddr::from((source, 0)))?;
            socket
                .connect(SocketAddr::from(([127, 0, 0, 1], port)))
                .await
        })?;
        let stream = stream.into_std()?;
        stream.set_nonblocking(false)?;
        Self::from_stream(stream)
    }

    fn from_stream(stream: TcpStream) -> std::io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let writer = stream.try_clone()?;
        let mut connection = Self {
            reader: std::io::BufReader::new(stream),
            writer,
            greeting: String::new(),
        };
        connection.greeting = connection.read_reply()?;
        Ok(connection)
    }

    /// Reads one (possibly multi-line) reply. An empty string means the
    /// server closed the connection.
    pub fn read_reply(&mut self) -> std::io::Result<String> {
        use std::io::BufRead;
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(reply);
            }
            reply.push_str(&line);
            // The last line of a reply has a space (or nothing) after its code.
            if line.len() < 5 || line.as_bytes()[3] != b'-' {
                return Ok(reply);
            }
        }
    }

    /// Writes bytes as they are.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.writer.write_all(bytes)
    }

    /// Sends one command line and reads its reply.
    pub fn command(&mut self, line: &str) -> std::io::Result<String> {
        self.send_raw(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// EHLO then AUTH PLAIN; returns the AUTH reply.
    pub fn ehlo_and_auth(&mut self, username: &str, password: &str) -> std::io::Result<String> {
        use base64::Engine as _;
        let ehlo = self.command("EHLO client.test")?;
        if !ehlo.starts_with("250") {
            return Ok(ehlo);
        }
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{username}\0{password}"));
        self.command(&format!("AUTH PLAIN {token}"))
    }

    /// One transaction: MAIL, RCPT, DATA, the dot-stuffed message (CRLF
    /// line ends) and the final dot. Returns the first reply that is not
    /// a success, or the reply to the final dot: the code that tells the
    /// client whether the message was taken.
    pub fn submit(
        &mut self,
        mail_from: &str,
        rcpt_to: &str,
        data: &str,
    ) -> std::io::Result<String> {
        for (command, expected) in [
            (format!("MAIL FROM:<{mail_from}>"), "250"),
            (format!("RCPT TO:<{rcpt_to}>"), "250"),
            ("DATA".to_string(), "354"),
        ] {
            let reply = self.command(&command)?;
            if !reply.starts_with(expected) {
                if expected != "354" && !reply.is_empty() {
                    // Leave the server ready for the next transaction.
                    let _ = self.command("RSET");
                }
                return Ok(reply);
            }
        }
        let mut stuffed = String::with_capacity(data.len() + 16);
        for line in data.split_inclusive("\r\n") {
            if line.starts_with('.') {
                stuffed.push('.');
            }
            stuffed.push_str(line);
        }
        if !stuffed.ends_with("\r\n") {
            stuffed.push_str("\r\n");
        }
        stuffed.push_str(".\r\n");
        self.send_raw(stuffed.as_bytes())?;
        self.read_reply()
    }
}

/// The three-digit code at the start of a reply, if any.
pub fn reply_code(reply: &str) -> Option<u16> {
    reply.get(..3)?.parse().ok()
}

/// A private CA, as a platform's internal smarthost would use, made with
/// the `openssl` CLI.
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("test-ca-")
            .tempdir()
            .expect("temp dir");
        openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=Test Private CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign",
            ],
        );
        Self { dir }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca.crt")).expect("CA certificate")
    }

    /// A server certificate for the IP address `ip`, signed by this CA:
    /// `(certificate, key)` paths.
    pub fn issue(&self, name: &str, ip: &str) -> (PathBuf, PathBuf) {
        let dir = self.dir.path();
        let (csr, cert, key) = (
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.key"),
        );
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=upstream.test",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        let extensions = format!("{name}.ext");
        std::fs::write(
            dir.join(&extensions),
            format!("subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("extensions file");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &cert,
                "-extfile",
                &extensions,
            ],
        );
        (dir.join(cert), dir.join(key))
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
