//! A real node: `tests/controlplane/node.sh` (containerd, kubelet,
//! controller-manager, scheduler) on a control plane of its own started with
//! `NODE=1` in `target/node-cluster`, apart from the shared one the other
//! tests use (no controller-manager there: its garbage collector and
//! namespace controller would change what they see, and their Deployments
//! would become pods). The operator image is built by
//! `tests/image/build.sh` from the binary these tests were built with and
//! imported into the node's containerd; pods run it with `imagePullPolicy:
//! Never`.
//!
//! Needs root (containerd, network namespaces, iptables). Pods live in
//! 10.88.0.0/16 on the bridge `mailauth0`; the host is 10.88.0.1 to them,
//! and a server a test runs on 127.0.0.1 is reachable from pods once
//! [`Node::expose`]d. There is no kube-proxy: reach pods by their IPs.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use super::cluster::Cluster;
use super::metrics::Samples;

/// The image these tests run in pods (built from this test build's binary).
pub const IMAGE_REPOSITORY: &str = "mailauth.local/mailauth-operator";
pub const IMAGE_TAG: &str = "test";
/// The host, as pods see it.
pub const HOST_FROM_PODS: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);

pub struct Node {
    pub cluster: Cluster,
    pub dir: PathBuf,
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(what: &str, command: &mut Command) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The node, brought up on first use (or reused when it is up), with the
/// image of this build imported. Panics, naming what failed, when it cannot
/// be: these tests never pass without a node.
pub fn node() -> &'static Node {
    static NODE: OnceLock<Node> = OnceLock::new();
    NODE.get_or_init(|| {
        // The effective user (Uid: real effective saved fs): node.sh needs root.
        let uid = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|ids| ids.split_whitespace().nth(1).map(str::to_string))
            })
            .unwrap_or_default();
        assert_eq!(
            uid, "0",
            "the node tests (tests/node.rs) run a real node and need root"
        );
        let dir = repo_root().join("target/node-cluster");
        let scripts = repo_root().join("tests/controlplane");
        run(
            "NODE=1 cluster.sh up",
            Command::new(scripts.join("cluster.sh"))
                .arg("up")
                .env("CLUSTER_DIR", &dir)
                .env("NODE", "1"),
        );
        run(
            "node.sh up",
            Command::new(scripts.join("node.sh"))
                .arg("up")
                .env("CLUSTER_DIR", &dir),
        );
        run(
            "tests/image/build.sh --import",
            Command::new(repo_root().join("tests/image/build.sh"))
                .arg("--import")
                .env("CLUSTER_DIR", &dir)
                .env("BIN", env!("CARGO_BIN_EXE_mailauth-operator"))
                .env("IMAGE", format!("{IMAGE_REPOSITORY}:{IMAGE_TAG}"))
                .env("OUT", dir.join("image")),
        );
        Node {
            cluster: Cluster {
                kubeconfig: dir.join("kubeconfig"),
                bin: dir.join("bin"),
            },
            dir,
        }
    })
}

impl Node {
    fn node_sh(&self, args: &[&str]) {
        run(
            &format!("node.sh {}", args.join(" ")),
            Command::new(repo_root().join("tests/controlplane/node.sh"))
                .args(args)
                .env("CLUSTER_DIR", &self.dir),
        );
    }

    /// Lets pods reach a server on 127.0.0.1:`port` (tcp and udp) as
    /// [`HOST_FROM_PODS`]:`port`, until the guard is dropped.
    pub fn expose(&'static self, port: u16) -> Exposed {
        self.node_sh(&["expose", &port.to_string()]);
        Exposed { node: self, port }
    }

    /// How many packets the node's egress rule refused so far (containerd
    /// or the kubelet trying to leave the machine).
    pub fn refused_egress_packets(&self) -> u64 {
        let output = Command::new("iptables")
            .args(["-L", "MAILAUTH-NODE-EGRESS", "-v", "-x", "-n"])
            .output()
            .expect("running iptables");
        assert!(
            output.status.success(),
            "the node's egress chain is missing"
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| line.contains("REJECT"))
            .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Creates a namespace named `<prefix>-<random>`; [`NodeNamespace`]
    /// deletes it (the namespace controller really does, here) when dropped.
    pub fn namespace(&'static self, prefix: &str) -> NodeNamespace {
        let name = format!("{prefix}-{:08x}", fastrand::u32(..));
        let out = self.cluster.kubectl(&["create", "namespace", &name], None);
        assert!(
            out.status.success(),
            "creating namespace {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NodeNamespace { node: self, name }
    }
}

/// See [`Node::expose`].
pub struct Exposed {
    node: &'static Node,
    port: u16,
}

impl Drop for Exposed {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("tests/controlplane/node.sh"))
            .args(["unexpose", &self.port.to_string()])
            .env("CLUSTER_DIR", &self.node.dir)
            .output();
    }
}

/// A namespace on the node's cluster, deleted with what is in it on drop
/// (also when the test panics).
pub struct NodeNamespace {
    node: &'static Node,
    pub name: String,
}

impl Drop for NodeNamespace {
    fn drop(&mut self) {
        let _ = self
            .node
            .cluster
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"], None);
    }
}

/// A helm release on the node's cluster, uninstalled on drop.
pub struct Release {
    node: &'static Node,
    pub name: String,
    pub namespace: String,
}

impl Release {
    /// `helm install` of `charts/mailauth-operator` with the node's image
    /// (pull policy Never) and `extra` arguments, waiting for nothing: the
    /// caller awaits what it checks.
    pub fn install(node: &'static Node, name: &str, namespace: &str, extra: &[&str]) -> Self {
        let chart = repo_root().join("charts/mailauth-operator");
        let image_repository = format!("image.repository={IMAGE_REPOSITORY}");
        let image_tag = format!("image.tag={IMAGE_TAG}");
        let mut args = vec![
            "install",
            name,
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            namespace,
            "--set",
            &image_repository,
            "--set",
            &image_tag,
            "--set",
            "image.pullPolicy=Never",
        ];
        args.extend_from_slice(extra);
        let out = node.cluster.helm(&args);
        assert!(
            out.status.success(),
            "helm install failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            node,
            name: name.into(),
            namespace: namespace.into(),
        }
    }
}

impl Drop for Release {
    /// Waits until the release's pods are gone: the next test's operator
    /// must not share the cluster with this one's.
    fn drop(&mut self) {
        let _ = self.node.cluster.helm(&[
            "uninstall",
            &self.name,
            "--namespace",
            &self.namespace,
            "--wait",
            "--timeout",
            "120s",
        ]);
    }
}

/// `GET path` from `ip:port` over plain HTTP/1.0: (status, body).
pub fn http_get(ip: Ipv4Addr, port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&(ip, port).into(), Duration::from_secs(2)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

/// The `/metrics` of a pod's admin port.
pub fn scrape_pod(ip: Ipv4Addr, port: u16) -> Option<Samples> {
    match http_get(ip, port, "/metrics")? {
        (200, body) => Some(Samples::parse(&body)),
        _ => None,
    }
}

/// swaks to `ip:port` with STARTTLS (the relay's certificate is not
/// checked: it is the test's self-signed one) and AUTH PLAIN, the password
/// on stdin, never in argv: (success, transcript).
pub fn swaks_to(
    ip: Ipv4Addr,
    port: u16,
    from: &str,
    to: &str,
    auth: (&str, &str),
    data: &str,
) -> (bool, String) {
    let data_file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(data_file.path(), data).expect("writing the message");
    let output = super::cluster::run_with_stdin(
        Command::new("swaks")
            .args(["--server", &format!("{ip}:{port}")])
            .args(["--from", from, "--to", to, "--ehlo", "client.test"])
            .arg("--data")
            .arg(format!("@{}", data_file.path().display()))
            .args(["--timeout", "30", "--tls", "--auth", "PLAIN"])
            .arg(format!("--auth-user={}", auth.0))
            .arg("--auth-password"),
        Some(&format!("{}\n", auth.1)),
    );
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// How a submission ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// 250 after the data's final dot: the relay took responsibility.
    Acknowledged,
    /// A reply that refused it (4xx or 5xx) at any step.
    Refused(u16),
    /// No final reply: the connection was refused, closed or broke first.
    Cut(String),
}

/// Any stream an [`SmtpSession`] talks over (TCP, or TLS over it).
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A client SMTP session to a relay pod, one command per round trip:
/// greeting, EHLO, STARTTLS (the certificate is not checked: it is the
/// test's own), EHLO, AUTH PLAIN. Every step has a deadline.
pub struct SmtpSession {
    stream: Box<dyn Stream>,
    buffer: Vec<u8>,
    /// The leaf certificate the relay presented (DER).
    pub certificate: Vec<u8>,
}

const SESSION_STEP: Duration = Duration::from_secs(20);

impl SmtpSession {
    pub async fn open(ip: Ipv4Addr, port: u16, auth: (&str, &str)) -> Result<Self, Fate> {
        let cut = |what: &str, e: &dyn std::fmt::Display| Fate::Cut(format!("{what}: {e}"));
        let tcp = tokio::time::timeout(SESSION_STEP, tokio::net::TcpStream::connect((ip, port)))
            .await
            .map_err(|e| cut("connect", &e))?
            .map_err(|e| cut("connect", &e))?;
        tcp.set_nodelay(true).map_err(|e| cut("nodelay", &e))?;
        let mut session = Self {
            stream: Box::new(tcp),
            buffer: Vec::new(),
            certificate: Vec::new(),
        };
        session.expect(None, 220).await?;
        session.expect(Some("EHLO client.test"), 250).await?;
        session.expect(Some("STARTTLS"), 220).await?;
        let connector = mail_send::smtp::tls::build_tls_connector(true)
            .map_err(|e| cut("TLS connector", &e))?;
        let name = rustls_pki_types::ServerName::try_from("relay.platform.test")
            .map_err(|e| cut("name", &e))?;
        let Self { stream, .. } = session;
        let tls = tokio::time::timeout(SESSION_STEP, connector.connect(name, stream))
            .await
            .map_err(|e| cut("TLS handshake", &e))?
            .map_err(|e| cut("TLS handshake", &e))?;
        let certificate = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| leaf.to_vec())
            .unwrap_or_default();
        session = Self {
            stream: Box::new(tls),
            buffer: Vec::new(),
            certificate,
        };
        session.expect(Some("EHLO client.test"), 250).await?;
        use base64::Engine as _;
        let token =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{}\0{}", auth.0, auth.1));
        session
            .expect(Some(&format!("AUTH PLAIN {token}")), 235)
            .await?;
        Ok(session)
    }

    /// Reads one reply (its last line decides) and returns its code.
    async fn reply(&mut self) -> Result<u16, Fate> {
        use tokio::io::AsyncReadExt as _;
        loop {
            let mut start = 0;
            while let Some(end) = self.buffer[start..].iter().position(|b| *b == b'\n') {
                let line = self.buffer[start..start + end].to_vec();
                start += end + 1;
                if line.len() < 4 || line[3] != b'-' {
                    self.buffer.drain(..start);
                    return std::str::from_utf8(line.get(..3).unwrap_or_default())
                        .ok()
                        .and_then(|code| code.parse().ok())
                        .ok_or_else(|| {
                            Fate::Cut(format!("not SMTP: {}", String::from_utf8_lossy(&line)))
                        });
                }
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(SESSION_STEP, self.stream.read(&mut chunk))
                .await
                .map_err(|_| Fate::Cut("no reply in time".into()))?
                .map_err(|e| Fate::Cut(format!("reading: {e}")))?;
            if read == 0 {
                return Err(Fate::Cut("the relay closed the connection".into()));
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Fate> {
        use tokio::io::AsyncWriteExt as _;
        let written = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(SESSION_STEP, written)
            .await
            .map_err(|_| Fate::Cut("writing timed out".into()))?
            .map_err(|e| Fate::Cut(format!("writing: {e}")))
    }

    /// Sends `command` (none: reads the greeting) and expects `code`.
    async fn expect(&mut self, command: Option<&str>, code: u16) -> Result<(), Fate> {
        if let Some(command) = command {
            self.write(format!("{command}\r\n").as_bytes()).await?;
        }
        match self.reply().await? {
            got if got == code => Ok(()),
            got => Err(Fate::Refused(got)),
        }
    }

    /// Submits one message (`data` without dot-stuffing needs: no line
    /// starts with a dot) and says how it ended.
    pub async fn send(&mut self, from: &str, to: &str, data: &str) -> Fate {
        let transaction = async {
            self.expect(Some(&format!("MAIL FROM:<{from}>")), 250)
                .await?;
            self.expect(Some(&format!("RCPT TO:<{to}>")), 250).await?;
            self.expect(Some("DATA"), 354).await?;
            let mut body = data.to_string();
            if !body.ends_with("\r\n") {
                body.push_str("\r\n");
            }
            body.push_str(".\r\n");
            self.write(body.as_bytes()).await?;
            self.expect(None, 250).await
        };
        match transaction.await {
            Ok(()) => Fate::Acknowledged,
            Err(fate) => fate,
        }
    }

    pub async fn quit(mut self) {
        let _ = self.expect(Some("QUIT"), 221).await;
    }
}

/// The leaf certificate (DER) the relay at `ip:port` presents in
/// STARTTLS now, if a session gets that far.
pub async fn served_certificate(ip: Ipv4Addr, port: u16, auth: (&str, &str)) -> Option<Vec<u8>> {
    let session = SmtpSession::open(ip, port, auth).await.ok()?;
    let certificate = session.certificate.clone();
    session.quit().await;
    Some(certificate)
}
