//! A real authoritative DNS server for tests: knot (`knotd`, Debian package
//! `knot`; `knotc`, and `kdig`/`knsupdate` from `knot-dnsutils`) on
//! 127.0.0.1 with a free port, zone files in a temp dir.
//!
//! ```ignore
//! let knot = support::dns::Knot::start(&[Zone::new("acme.test").txt("@", "v=spf1 -all")]);
//! knot.add("acme.test", "s1._domainkey.acme.test. 60 TXT \"v=DKIM1; p=...\"");
//! knot.break_zone("acme.test"); // answers SERVFAIL from now on
//! knot.pause();                 // queries time out until resume()
//! ```
//!
//! Records change through RFC 2136 updates signed with a TSIG key (as the
//! operator's own publishing will), so a test sees exactly what a resolver
//! would. Every wait goes through `support::wait`; none sleeps blind.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use base64::Engine as _;

use super::wait::eventually;

/// How long knot may take to start, load zones or apply a change.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);
/// The TSIG key knot accepts updates with (hmac-sha256).
pub const TSIG_KEY_NAME: &str = "mailauth-test";

/// A zone to serve.
#[derive(Clone, Debug)]
pub struct Zone {
    origin: String,
    records: Vec<String>,
    /// Configured without a zone file: knot answers SERVFAIL for it.
    broken: bool,
}

impl Zone {
    /// A zone with its SOA and NS already in place.
    pub fn new(origin: &str) -> Self {
        Self {
            origin: origin.trim_end_matches('.').to_string(),
            records: Vec::new(),
            broken: false,
        }
    }

    /// A zone that fails to load, so every query in it gets SERVFAIL.
    pub fn broken(origin: &str) -> Self {
        Self {
            broken: true,
            ..Self::new(origin)
        }
    }

    /// A zone-file line, names relative to the origin (`@` for the apex).
    pub fn record(mut self, line: &str) -> Self {
        self.records.push(line.to_string());
        self
    }

    /// A TXT record; the value is split into quoted strings of at most 255
    /// bytes, as a zone file needs.
    pub fn txt(self, name: &str, value: &str) -> Self {
        let data = txt_data(value);
        self.record(&format!("{name} TXT {data}"))
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    fn zone_file(&self) -> String {
        let mut text = format!(
            "$ORIGIN {origin}.\n$TTL 60\n@ SOA ns.{origin}. hostmaster.{origin}. 1 3600 600 86400 60\n@ NS ns.{origin}.\nns A 127.0.0.1\n",
            origin = self.origin
        );
        for line in &self.records {
            text.push_str(line);
            text.push('\n');
        }
        text
    }
}

/// `"part1" "part2"`: a TXT value as zone-file character-strings.
pub fn txt_data(value: &str) -> String {
    mailauth_operator::dkim::split_txt(value)
        .iter()
        .map(|part| format!("\"{}\"", part.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A running knotd. Stopped (and its directory removed) on drop.
pub struct Knot {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    tsig_secret: String,
}

impl Knot {
    /// Starts knot serving `zones` and waits until every healthy zone
    /// answers. Panics with knot's log when it does not come up.
    pub fn start(zones: &[Zone]) -> Self {
        let mut last_error = String::new();
        // A free port can be taken between finding and binding it: retry.
        for _ in 0..3 {
            match Self::try_start(zones) {
                Ok(knot) => return knot,
                Err(error) => last_error = error,
            }
        }
        panic!("knot did not start: {last_error}");
    }

    fn try_start(zones: &[Zone]) -> Result<Self, String> {
        let dir = tempfile::Builder::new()
            .prefix("knot-")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let port = free_port()?;
        let secret = {
            let bytes: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
            base64::engine::general_purpose::STANDARD.encode(bytes)
        };
        let root = dir.path();
        for sub in ["zones", "db", "run"] {
            std::fs::create_dir_all(root.join(sub)).map_err(|e| format!("{sub}: {e}"))?;
        }
        for zone in zones.iter().filter(|zone| !zone.broken) {
            let path = zone_path(root, &zone.origin);
            std::fs::write(&path, zone.zone_file()).map_err(|e| format!("{path:?}: {e}"))?;
        }
        let config = config(root, port, &secret, zones);
        let config_path = root.join("knot.conf");
        std::fs::write(&config_path, config).map_err(|e| format!("config: {e}"))?;
        let log = std::fs::File::create(root.join("knot.log")).map_err(|e| format!("log: {e}"))?;
        let child = Command::new("knotd")
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| format!("log: {e}"))?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("running knotd (install Debian package `knot`): {e}"))?;
        let mut knot = Self {
            dir,
            port,
            child: Some(child),
            tsig_secret: secret,
        };
        let healthy: Vec<&Zone> = zones.iter().filter(|zone| !zone.broken).collect();
        let ready = eventually("knot to serve every healthy zone")
            .within(READY_TIMEOUT)
            .every(POLL)
            .try_until(|| {
                if knot.exited() {
                    return Ok(false);
                }
                let answers: Vec<(&str, Option<String>)> = healthy
                    .iter()
                    .map(|zone| (zone.origin.as_str(), knot.query_status(&zone.origin, "SOA")))
                    .collect();
                if answers
                    .iter()
                    .all(|(_, status)| status.as_deref() == Some("NOERROR"))
                {
                    Ok(true)
                } else {
                    Err(format!("SOA answers: {answers:?}"))
                }
            });
        match ready {
            Ok(true) => Ok(knot),
            outcome => {
                let log = knot.log();
                knot.stop();
                let why = match outcome {
                    Err(timed_out) => timed_out.to_string(),
                    Ok(_) => "knotd exited".to_string(),
                };
                Err(format!("{why}; log:\n{log}"))
            }
        }
    }

    /// Where to send queries.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The base64 secret of [`TSIG_KEY_NAME`].
    pub fn tsig_secret(&self) -> &str {
        &self.tsig_secret
    }

    /// knot's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("knot.log")).unwrap_or_default()
    }

    /// Adds a record, given as a zone-file line with an absolute name:
    /// `s1._domainkey.acme.test. 60 TXT "v=DKIM1; ..."`.
    pub fn add(&self, zone: &str, record: &str) {
        self.update(zone, &[format!("update add {record}")]);
    }

    /// Removes every record of `record_type` at `name` (absolute).
    pub fn remove(&self, zone: &str, name: &str, record_type: &str) {
        self.update(zone, &[format!("update delete {name} {record_type}")]);
    }

    /// Sends RFC 2136 update commands (knsupdate syntax) signed with the
    /// TSIG key, and returns once knot has applied them.
    pub fn update(&self, zone: &str, commands: &[String]) {
        let mut script = format!(
            "server 127.0.0.1 {}\nzone {}.\n",
            self.port,
            zone.trim_end_matches('.')
        );
        for command in commands {
            script.push_str(command);
            script.push('\n');
        }
        script.push_str("send\nquit\n");
        let key = format!("hmac-sha256:{TSIG_KEY_NAME}:{}", self.tsig_secret);
        let output = run_with_input(Command::new("knsupdate").arg("-y").arg(key), &script);
        assert!(
            output.status.success(),
            "knsupdate failed:\n{script}\nstdout: {}\nstderr: {}\nknot log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
    }

    /// Expires `zone`: from now on knot answers SERVFAIL for every name in it.
    pub fn break_zone(&self, zone: &str) {
        self.knotc(&["-b", "zone-purge", "-f", zone, "+expire"]);
        let failing = eventually(format!("{zone} to answer SERVFAIL after expiry"))
            .within(READY_TIMEOUT)
            .every(POLL)
            .try_until(|| {
                let status = self.query_status(zone, "SOA");
                if status.as_deref() == Some("SERVFAIL") {
                    Ok(())
                } else {
                    Err(status)
                }
            });
        if let Err(timed_out) = failing {
            panic!("{timed_out}; log:\n{}", self.log());
        }
    }

    /// Freezes knotd (SIGSTOP): queries get no answer and time out, as with
    /// a server that is down or unreachable. Returns once a query has gone
    /// unanswered: right after the signal, knotd was seen answering a query
    /// within the next millisecond.
    pub fn pause(&self) {
        self.signal("-STOP");
        eventually("knotd to stop answering after SIGSTOP")
            .within(READY_TIMEOUT)
            .every(POLL)
            .until(|| match self.query_status(".", "SOA") {
                None => Ok(()),
                Some(status) => Err(status),
            });
    }

    /// Lets a paused knotd answer again.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// Stops knotd and waits for it to exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // A paused server cannot handle SIGTERM until it runs again.
        let pid = child.id().to_string();
        let _ = Command::new("kill").args(["-CONT", &pid]).status();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let exited = eventually("knotd to exit after SIGTERM")
            .within(Duration::from_secs(5))
            .every(POLL)
            .try_until(|| match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                other => Err(format!("{other:?}")),
            });
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(child) => !matches!(child.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("knotd is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {signal} knotd failed");
    }

    fn knotc(&self, args: &[&str]) {
        let socket = self.dir.path().join("run").join("knot.sock");
        let output = Command::new("knotc")
            .arg("-s")
            .arg(&socket)
            .args(args)
            .output()
            .expect("running knotc (Debian package `knot`)");
        assert!(
            output.status.success(),
            "knotc {args:?} failed: {}{}\nknot log:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
    }

    /// The response code kdig gets for `name`/`record_type` (`NOERROR`,
    /// `NXDOMAIN`, `SERVFAIL`, ...), or `None` without an answer.
    pub fn query_status(&self, name: &str, record_type: &str) -> Option<String> {
        let output = Command::new("kdig")
            .arg("@127.0.0.1")
            .args(["-p", &self.port.to_string()])
            .args(["+timeout=1", "+retry=0", "+noall", "+header"])
            .args([name, record_type])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&output.stdout);
        let status = text.split("status: ").nth(1)?;
        Some(status.split(';').next()?.trim().to_string())
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        self.stop();
    }
}

fn zone_path(root: &Path, origin: &str) -> PathBuf {
    root.join("zones").join(format!("{origin}.zone"))
}

/// knot 3.2 configuration: absolute paths everywhere (a relative zone file
/// is resolved against the storage directory), logs on stderr (or a zone
/// that fails to load only shows up as SERVFAIL), one TSIG key allowed to
/// update every zone.
fn config(root: &Path, port: u16, secret: &str, zones: &[Zone]) -> String {
    let root = root.display();
    let mut text = format!(
        "server:
  rundir: {root}/run
  listen: 127.0.0.1@{port}
  udp-workers: 2
  tcp-workers: 2
  background-workers: 1
log:
  - target: stderr
    any: info
database:
  storage: {root}/db
key:
  - id: {TSIG_KEY_NAME}
    algorithm: hmac-sha256
    secret: {secret}
acl:
  - id: tests-update
    key: {TSIG_KEY_NAME}
    action: update
control:
  listen: {root}/run/knot.sock
template:
  - id: default
    storage: {root}/zones
    file: {root}/zones/%s.zone
    acl: tests-update
    zonefile-sync: -1
zone:
"
    );
    for zone in zones {
        text.push_str(&format!("  - domain: {}.\n", zone.origin));
    }
    text
}

/// A port free for both UDP and TCP on 127.0.0.1.
fn free_port() -> Result<u16, String> {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
        let port = udp.local_addr().map_err(|e| format!("bind: {e}"))?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port".into())
}

fn run_with_input(command: &mut Command, input: &str) -> Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running knsupdate (Debian package `knot-dnsutils`)");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input.as_bytes())
        .expect("writing to knsupdate");
    child.wait_with_output().expect("waiting for knsupdate")
}

/// A Secret `name` holding `secret` (a knot TSIG secret) under the key
/// `secret`, as a DNSProvider's `tsigSecretRef` names it.
#[allow(dead_code)]
pub fn tsig_secret(name: &str, secret: &str) -> k8s_openapi::api::core::v1::Secret {
    k8s_openapi::api::core::v1::Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            [(
                "secret".to_string(),
                k8s_openapi::ByteString(secret.as_bytes().to_vec()),
            )]
            .into_iter()
            .collect(),
        ),
        ..Default::default()
    }
}
