//! A real Postfix as the relay's smarthost, configured the way platforms
//! often run theirs: the relay's address in `mynetworks`, and the older,
//! permissive `smtpd_forbid_bare_newline = no` (Debian package `postfix`;
//! its own instance with `postfix -c DIR start`, never the system service).
//!
//! Every message it accepts is put on hold (`check_client_access
//! static:HOLD`), so nothing is delivered and the queue shows exactly what
//! the relay handed over: `postqueue -j` for the envelope, `postcat` for
//! the content. Recipients `refuse@example.net` get 550 and
//! `defer@example.net` 450, for tests of per-recipient replies, and a
//! message with `Subject: reject-me` is refused after its data. Its log is
//! a file in its directory.
//!
//! Every wait polls a condition with a deadline; none sleeps blind.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::mail::free_tcp_port;
use super::wait::poll_some;

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One message in Postfix's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub queue_id: String,
    pub queue_name: String,
    /// The envelope sender as Postfix keeps it (unquoted internal form).
    pub sender: String,
    pub recipients: Vec<String>,
}

/// A private Postfix instance listening on a loopback port.
pub struct Postfix {
    pub port: u16,
    dir: tempfile::TempDir,
    running: bool,
}

fn run(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("running {program} (Debian package `postfix`): {error}"))
}

impl Postfix {
    pub fn start() -> Self {
        Self::start_with(|root_text, _port| {
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {root_text}/queue\n\
                 data_directory = {root_text}/data\n\
                 maillog_file = {root_text}/maillog\n\
                 maillog_file_prefixes = {root_text}\n\
                 myhostname = smarthost.test\n\
                 mydomain = smarthost.test\n\
                 myorigin = $myhostname\n\
                 inet_interfaces = 127.0.0.1\n\
                 inet_protocols = ipv4\n\
                 mydestination =\n\
                 relay_domains =\n\
                 relayhost = [127.0.0.1]:9\n\
                 alias_maps =\n\
                 alias_database =\n\
                 local_transport = error:no local delivery\n\
                 # What platforms often run: the relay trusted by address,\n\
                 # and the permissive newline handling of older releases.\n\
                 mynetworks = 127.0.0.0/8\n\
                 smtpd_forbid_bare_newline = no\n\
                 smtpd_forbid_unauth_pipelining = no\n\
                 smtpd_relay_restrictions = permit_mynetworks, reject\n\
                 smtpd_recipient_restrictions = check_recipient_access inline:{{ \
                 {{ refuse@example.net = 550 5.1.1 refuse@example.net: no such user here }}, \
                 {{ defer@example.net = 450 4.2.2 defer@example.net: mailbox full, try later }} }}, \
                 check_client_access static:HOLD, permit_mynetworks, reject\n\
                 header_checks = regexp:{{ {{ /^Subject: reject-me/ REJECT 5.7.1 refused by content policy }} }}\n\
                 smtpd_client_connection_count_limit = 0\n\
                 smtpd_client_message_rate_limit = 0\n\
                 default_process_limit = 20\n"
            )
        })
    }

    /// A Postfix that is the final destination of `example.net`, accepts
    /// every recipient there and delivers locally: mail for a user the
    /// machine does not have is accepted, then bounced by local(8), as a
    /// receiver does whose mailbox check comes after the SMTP dialogue. Its
    /// bounces (RFC 3464 DSNs, written by Postfix's own `bounce` daemon)
    /// go to the envelope sender through `relay_port`, an SMTP sink.
    pub fn start_bouncing(relay_port: u16) -> Self {
        Self::start_with(|root_text, _port| {
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {root_text}/queue\n\
                 data_directory = {root_text}/data\n\
                 maillog_file = {root_text}/maillog\n\
                 maillog_file_prefixes = {root_text}\n\
                 myhostname = mx.example.net\n\
                 mydomain = example.net\n\
                 myorigin = $mydomain\n\
                 inet_interfaces = 127.0.0.1\n\
                 inet_protocols = ipv4\n\
                 mydestination = example.net\n\
                 local_recipient_maps =\n\
                 local_transport = local\n\
                 relay_domains =\n\
                 relayhost = [127.0.0.1]:{relay_port}\n\
                 smtp_tls_security_level = none\n\
                 alias_maps =\n\
                 alias_database =\n\
                 mynetworks = 127.0.0.0/8\n\
                 smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination\n\
                 default_process_limit = 20\n"
            )
        })
    }

    fn start_with(main_cf: impl FnOnce(&str, u16) -> String) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("postfix-")
            .tempdir()
            .expect("temp dir");
        // Postfix's daemons run as user postfix and must reach their
        // directories below this one.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        let root = dir.path();
        for sub in ["etc", "queue", "data"] {
            std::fs::create_dir(root.join(sub)).expect("postfix directories");
        }
        let chown = run(
            "chown",
            &["postfix", &root.join("data").display().to_string()],
        );
        assert!(chown.status.success(), "chown postfix: {chown:?}");
        std::fs::copy("/etc/postfix/master.cf", root.join("etc/master.cf"))
            .expect("copying /etc/postfix/master.cf (Debian package `postfix`)");
        let port = free_tcp_port();
        let root_text = root.display();
        std::fs::write(
            root.join("etc/main.cf"),
            main_cf(&root_text.to_string(), port),
        )
        .expect("main.cf");
        let etc = root.join("etc").display().to_string();
        for args in [
            vec!["-c", etc.as_str(), "-F", "*/*/chroot = n"],
            vec!["-c", etc.as_str(), "-M#", "smtp/inet"],
        ] {
            let output = run("postconf", &args);
            assert!(output.status.success(), "postconf {args:?}: {output:?}");
        }
        let listener = format!("127.0.0.1:{port}/inet = 127.0.0.1:{port} inet n - n - - smtpd");
        let output = run("postconf", &["-c", &etc, "-M", &listener]);
        assert!(output.status.success(), "postconf -M: {output:?}");
        let output = run("postfix", &["-c", &etc, "start"]);
        assert!(
            output.status.success(),
            "postfix start: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut postfix = Self {
            port,
            dir,
            running: true,
        };
        let greeted = poll_some(START_TIMEOUT, || {
            let stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stream), &mut line).ok()?;
            line.starts_with("220 ").then_some(())
        });
        if greeted.is_none() {
            let log = postfix.log();
            postfix.stop();
            panic!("Postfix did not greet on {port}:\n{log}");
        }
        postfix
    }

    fn etc(&self) -> String {
        self.dir.path().join("etc").display().to_string()
    }

    fn queue_dir(&self) -> PathBuf {
        self.dir.path().join("queue")
    }

    /// What Postfix logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    /// Every message in the queue (`postqueue -j`).
    pub fn queue(&self) -> Vec<Queued> {
        let output = run("postqueue", &["-c", &self.etc(), "-j"]);
        assert!(output.status.success(), "postqueue -j: {output:?}");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                let entry: serde_json::Value = serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("postqueue -j line {line:?}: {e}"));
                let text = |key: &str| entry[key].as_str().unwrap_or_default().to_string();
                Queued {
                    queue_id: text("queue_id"),
                    queue_name: text("queue_name"),
                    sender: text("sender"),
                    recipients: entry["recipients"]
                        .as_array()
                        .map(|recipients| {
                            recipients
                                .iter()
                                .map(|r| r["address"].as_str().unwrap_or_default().to_string())
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// Waits until the queue holds at least `count` messages.
    pub fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Queued> {
        poll_some(timeout, || {
            let queue = self.queue();
            (queue.len() >= count).then_some(queue)
        })
        .unwrap_or_else(|| {
            panic!(
                "Postfix queued {} of {count} messages:\n{}",
                self.queue().len(),
                self.log()
            )
        })
    }

    /// A queued message's headers and body as Postfix will send them
    /// (`postcat -hb`), with CRLF line ends.
    pub fn content(&self, queue_id: &str) -> Vec<u8> {
        let output = run("postcat", &["-c", &self.etc(), "-h", "-b", "-q", queue_id]);
        assert!(output.status.success(), "postcat {queue_id}: {output:?}");
        let text = String::from_utf8_lossy(&output.stdout);
        let mut message = String::with_capacity(text.len() + 256);
        for line in text.lines() {
            // postcat marks the start of each section.
            if line.starts_with("*** ") && line.ends_with(" ***") {
                continue;
            }
            message.push_str(line);
            message.push_str("\r\n");
        }
        message.into_bytes()
    }

    /// A queued message's envelope records (`postcat -e`), as text.
    pub fn envelope(&self, queue_id: &str) -> String {
        let output = run("postcat", &["-c", &self.etc(), "-e", "-q", queue_id]);
        assert!(output.status.success(), "postcat -e {queue_id}: {output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Empties the queue (`postsuper -d ALL`).
    pub fn clear(&self) {
        let output = run("postsuper", &["-c", &self.etc(), "-d", "ALL"]);
        assert!(output.status.success(), "postsuper -d ALL: {output:?}");
    }

    fn master_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.queue_dir().join("pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn stop(&mut self) {
        if !std::mem::take(&mut self.running) {
            return;
        }
        let master = self.master_pid();
        let _ = run("postfix", &["-c", &self.etc(), "stop"]);
        // `postfix stop` returns before the master has gone; its directory
        // must not be removed under it.
        if let Some(pid) = master {
            poll_some(Duration::from_secs(20), || {
                (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
            });
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        self.stop();
    }
}
