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
    fn drop(&mut self) {
        let _ = self
            .node
            .cluster
            .helm(&["uninstall", &self.name, "--namespace", &self.namespace]);
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
