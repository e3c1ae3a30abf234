//! The real local control plane (etcd + kube-apiserver), started once per
//! machine by `tests/controlplane/cluster.sh` and shared by every test. Each
//! test works in a namespace of its own, so tests run in parallel.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{Condition as _, conditions};
use kube::{Client, Config};

use super::wait::eventually;

/// Where the control plane keeps its state and tools.
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The shared control plane, started on first use (or reused when running).
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let script = repo_root().join("tests/controlplane/cluster.sh");
        let status = Command::new(&script)
            .arg("up")
            .status()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(status.success(), "{} up failed: {status}", script.display());
        let dir = std::env::var_os("CLUSTER_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("target/cluster"));
        Cluster {
            kubeconfig: dir.join("kubeconfig"),
            bin: dir.join("bin"),
        }
    })
}

impl Cluster {
    /// A kube client for the admin user.
    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("reading kubeconfig");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("loading kubeconfig");
        Client::try_from(config).expect("building client")
    }

    /// Runs the cluster's own kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        run_with_stdin(
            Command::new(self.bin.join("kubectl"))
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(args),
            stdin,
        )
    }

    /// Runs the cluster's own helm with the admin kubeconfig. The chart has
    /// no default image (none is published), so `install`, `template`,
    /// `upgrade` and `lint` name one (tests/fixtures/chart/image.yaml), as a
    /// platform team must; [`Cluster::helm_as_given`] passes the arguments
    /// as they are.
    pub fn helm(&self, args: &[&str]) -> Output {
        let renders = matches!(
            args.first(),
            Some(&("install" | "template" | "upgrade" | "lint"))
        );
        let image = repo_root().join("tests/fixtures/chart/image.yaml");
        let mut args = args.to_vec();
        if renders {
            // First, so a later `--values` or `--set` of the test wins.
            args.splice(1..1, ["--values", image.to_str().expect("utf-8 path")]);
        }
        self.helm_as_given(&args)
    }

    /// Runs helm with exactly these arguments.
    pub fn helm_as_given(&self, args: &[&str]) -> Output {
        Command::new(self.bin.join("helm"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("running helm")
    }

    /// Installs (server-side apply) the generated CRDs from `crds/` and waits
    /// until they are Established. Safe to call from every test.
    pub async fn install_crds(&self) {
        let out = self.kubectl(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=mailauth-tests",
                "-f",
                repo_root().join("crds").to_str().expect("utf-8 path"),
            ],
            None,
        );
        assert!(
            out.status.success(),
            "installing CRDs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let crds: Api<CustomResourceDefinition> = Api::all(self.client().await);
        for name in [
            "maildomains.mailauth.dev",
            "mailrelays.mailauth.dev",
            "dnsproviders.mailauth.dev",
        ] {
            let crds = &crds;
            eventually(format!("CRD {name} to be Established"))
                .within(Duration::from_secs(60))
                .until_async(move || async move {
                    let crd = crds.get_opt(name).await;
                    match &crd {
                        Ok(found)
                            if conditions::is_crd_established().matches_object(found.as_ref()) =>
                        {
                            Ok(())
                        }
                        _ => Err(crd.map(|found| found.and_then(|crd| crd.status))),
                    }
                })
                .await;
        }
    }

    /// Creates a fresh namespace named `<prefix>-<random>` for one test.
    pub async fn namespace(&self, prefix: &str) -> TestNamespace {
        let name = format!("{prefix}-{:08x}", fastrand::u32(..));
        let api: Api<Namespace> = Api::all(self.client().await);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": { "mailauth.dev/test": prefix } }
        }))
        .expect("namespace manifest");
        api.create(&PostParams::default(), &ns)
            .await
            .expect("creating namespace");
        TestNamespace { name }
    }

    /// A kubeconfig that authenticates as a ServiceAccount (a token from the
    /// TokenRequest API, valid for an hour), so a process run with it has
    /// exactly the RBAC a pod of that account would have. Written into
    /// `dir`.
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        service_account: &str,
        dir: &Path,
    ) -> PathBuf {
        let out = self.kubectl(
            &[
                "-n",
                namespace,
                "create",
                "token",
                service_account,
                "--duration=1h",
            ],
            None,
        );
        assert!(
            out.status.success(),
            "creating a token for {namespace}/{service_account}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).expect("utf-8 token");
        let admin: serde_yaml::Value = serde_yaml::from_str(
            &std::fs::read_to_string(&self.kubeconfig).expect("reading kubeconfig"),
        )
        .expect("parsing kubeconfig");
        let cluster = &admin["clusters"][0]["cluster"];
        let kubeconfig = serde_json::json!({
            "apiVersion": "v1", "kind": "Config",
            "clusters": [{"name": "local", "cluster": {
                "server": cluster["server"].as_str(),
                "certificate-authority-data": cluster["certificate-authority-data"].as_str(),
                "certificate-authority": cluster["certificate-authority"].as_str(),
            }}],
            "users": [{"name": service_account, "user": {"token": token.trim()}}],
            "contexts": [{"name": "sa", "context": {"cluster": "local", "user": service_account, "namespace": namespace}}],
            "current-context": "sa",
        });
        let path = dir.join(format!("{service_account}.kubeconfig"));
        std::fs::write(
            &path,
            serde_yaml::to_string(&kubeconfig).expect("kubeconfig yaml"),
        )
        .expect("writing kubeconfig");
        path
    }

    /// Applies a label to a namespace (server-side apply).
    pub async fn label_namespace(&self, namespace: &str, key: &str, value: &str) {
        let api: Api<Namespace> = Api::all(self.client().await);
        let patch = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": { "name": namespace, "labels": { key: value } }
        });
        api.patch(
            namespace,
            &PatchParams::apply("mailauth-tests"),
            &Patch::Apply(patch),
        )
        .await
        .expect("labelling namespace");
    }
}

/// A namespace owned by one test. Deleted (in the background) when dropped
/// only if the test passed, so a failing test leaves its objects to inspect.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    /// Deletes the namespace. The test control plane has no namespace
    /// controller or garbage collector, so what is in it stays; its
    /// Services are deleted first, as each holds one of the 254 cluster IPs
    /// (`--service-cluster-ip-range=10.0.0.0/24`) until it is.
    pub async fn delete(self) {
        let client = cluster().client().await;
        let services: Api<Service> = Api::namespaced(client.clone(), &self.name);
        if let Ok(list) = services.list(&Default::default()).await {
            for service in list.items {
                if let Some(name) = service.metadata.name {
                    let _ = services.delete(&name, &DeleteParams::background()).await;
                }
            }
        }
        let api: Api<Namespace> = Api::all(client);
        let _ = api.delete(&self.name, &DeleteParams::background()).await;
    }
}

pub fn run_with_stdin(cmd: &mut Command, stdin: Option<&str>) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(input.as_bytes())
            .expect("writing stdin");
    }
    child.wait_with_output().expect("waiting for child")
}
