//! The Helm chart (`charts/mailauth-operator`) and the image that runs it:
//! the chart lints clean, its schema refuses bad values, what it renders is
//! what the operator needs (leader election, restricted pod security,
//! probes), the API server accepts it (server-side dry-run, with the defaults
//! and with every optional value on), it installs, the binary accepts the
//! arguments it passes, and the Dockerfile ships the binary `make build`
//! builds.
//!
//! Each test works in a namespace of its own and names its release after it,
//! so cluster-scoped objects (ClusterRole, ClusterRoleBinding) never collide
//! and the tests run in parallel.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use support::cluster::{Cluster, cluster};

const CHART: &str = "charts/mailauth-operator";
/// Every optional value switched on (chart-testing's `ci/` convention).
const ALL_OPTIONS_VALUES: &str = "charts/mailauth-operator/ci/all-options-values.yaml";
const SERVICE_MONITOR_CRD: &str = "tests/fixtures/servicemonitor-crd.yaml";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn path_arg(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Runs the control plane's own helm against its kubeconfig.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn assert_success(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// `helm template` for `release` in `namespace`, with extra helm arguments.
fn render(c: &Cluster, release: &str, namespace: &str, extra: &[&str]) -> String {
    let chart = repo_path(CHART);
    let mut args = vec![
        "template",
        release,
        path_arg(&chart),
        "--namespace",
        namespace,
    ];
    args.extend_from_slice(extra);
    let out = c.helm(&args);
    assert_success("helm template", &out);
    text(&out.stdout)
}

/// The rendered documents, as JSON values (empty documents dropped).
fn documents(rendered: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(rendered)
        .map(|doc| Value::deserialize(doc).expect("rendered YAML parses"))
        .filter(|doc| !doc.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Option<&'a Value> {
    docs.iter().find(|d| d["kind"] == kind)
}

fn the<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    find(docs, kind).unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn controller_container(docs: &[Value]) -> &Value {
    let containers = the(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one controller container");
    &containers[0]
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn env_value<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("env {name} missing"))
}

/// `kubectl apply --dry-run=server` of `manifests`: the API server validates
/// and admits every object without storing it.
fn server_side_dry_run(c: &Cluster, namespace: &str, manifests: &str) {
    let out = c.kubectl(
        &[
            "apply",
            "--dry-run=server",
            "--namespace",
            namespace,
            "-f",
            "-",
        ],
        Some(manifests),
    );
    assert_success("kubectl apply --dry-run=server", &out);
}

#[test]
fn lint_is_clean_with_defaults_and_with_every_option_on() {
    let c = cluster();
    let chart = repo_path(CHART);
    let all_options = repo_path(ALL_OPTIONS_VALUES);
    for extra in [vec![], vec!["--values", path_arg(&all_options)]] {
        let mut args = vec!["lint", "--strict", path_arg(&chart)];
        args.extend(extra);
        let out = c.helm(&args);
        assert_success(&format!("helm {}", args.join(" ")), &out);
        let report = text(&out.stdout);
        assert!(
            !report.contains("[WARNING]") && !report.contains("[ERROR]"),
            "helm lint reported problems:\n{report}"
        );
    }
}

#[test]
fn install_without_an_image_fails_saying_how_to_get_one() {
    let c = cluster();
    let chart = repo_path(CHART);
    let out = c.helm_as_given(&["template", "t", path_arg(&chart)]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "rendered without an image");
    assert!(
        stderr.contains("image.repository is required") && stderr.contains("make image"),
        "{stderr}"
    );
    let out = c.helm_as_given(&[
        "template",
        "t",
        path_arg(&chart),
        "--set",
        "image.repository=registry.example/mailauth-operator",
    ]);
    assert_success("helm template with an image", &out);
    assert!(text(&out.stdout).contains("image: \"registry.example/mailauth-operator:"));
}

#[test]
fn schema_refuses_unknown_and_malformed_values() {
    let c = cluster();
    let chart = repo_path(CHART);
    // (value, what the refusal must name)
    let refused = [
        ("replicaCout=2", "replicaCout"),
        ("serviceMonitor.enable=true", "enable"),
        ("dns.servers[0]=ns1.example", "/dns/servers/0"),
        ("logging.format=xml", "/logging/format"),
        (
            "controller.recheckInterval=hourly",
            "/controller/recheckInterval",
        ),
        ("replicaCount=0", "/replicaCount"),
    ];
    for (value, named) in refused {
        let out = c.helm(&["template", "t", path_arg(&chart), "--set", value]);
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "--set {value} was accepted");
        assert!(
            stderr.contains(named),
            "--set {value} refused without naming {named}: {stderr}"
        );
    }
}

#[test]
fn defaults_run_two_leader_elected_restricted_replicas() {
    let c = cluster();
    let docs = documents(&render(c, "ops", "mailauth-system", &[]));

    let deployment = the(&docs, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = controller_container(&docs);
    assert!(
        container["command"].is_null(),
        "the image's entrypoint (the mailauth-operator binary) must run"
    );
    let args = strings(&container["args"]);
    assert_eq!(args.first(), Some(&"controller"));
    assert!(args.contains(&"--leader-election"), "{args:?}");
    assert!(args.contains(&"--metrics-listen=0.0.0.0:8080"), "{args:?}");

    // The Role lets the controller hold exactly the Lease it is told to use.
    let lease_arg = args
        .iter()
        .find_map(|a| a.strip_prefix("--lease-name="))
        .expect("--lease-name");
    let role = the(&docs, "Role");
    let named_rule = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| !r["resourceNames"].is_null())
        .expect("a rule limited by resourceNames");
    assert_eq!(strings(&named_rule["resourceNames"]), vec![lease_arg]);

    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        assert_eq!(
            env_value(container, name)["valueFrom"]["fieldRef"]["fieldPath"],
            field
        );
    }
    assert_eq!(
        env_value(container, "RELAY_IMAGE")["value"],
        container["image"],
        "relays default to the operator's own image"
    );

    let port = &container["ports"][0];
    assert_eq!(port["containerPort"], 8080);
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        assert_eq!(container[probe]["httpGet"]["path"], path);
        assert_eq!(container[probe]["httpGet"]["port"], port["name"]);
    }
    assert!(container["resources"]["requests"]["memory"].is_string());
    assert!(container["resources"]["limits"]["memory"].is_string());

    // Restricted Pod Security Standard.
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let security = &container["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(strings(&security["capabilities"]["drop"]), vec!["ALL"]);
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");

    // The metrics Service reaches the pods on the metrics port.
    let service = the(&docs, "Service");
    assert_eq!(
        service["spec"]["selector"],
        deployment["spec"]["selector"]["matchLabels"]
    );
    assert_eq!(service["spec"]["ports"][0]["targetPort"], port["name"]);

    let budget = the(&docs, "PodDisruptionBudget");
    assert_eq!(budget["spec"]["maxUnavailable"], 1);
    assert_eq!(
        budget["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"]
    );

    for optional in ["ServiceMonitor", "NetworkPolicy"] {
        assert!(
            find(&docs, optional).is_none(),
            "{optional} rendered by default"
        );
    }
}

#[test]
fn every_option_on_reaches_the_rendered_objects() {
    let c = cluster();
    let all_options = repo_path(ALL_OPTIONS_VALUES);
    let docs = documents(&render(
        c,
        "ops",
        "mailauth-system",
        &["--values", path_arg(&all_options)],
    ));

    let container = controller_container(&docs);
    let args = strings(&container["args"]);
    for expected in [
        "--dns-server=10.0.0.53:53",
        "--dns-server=[fd00::53]:5353",
        "--lease-name=mailauth-leader",
        "--metrics-listen=0.0.0.0:9090",
        "--recheck-interval=30m",
        "--concurrency=16",
    ] {
        assert!(args.contains(&expected), "{expected} missing from {args:?}");
    }
    assert_eq!(
        env_value(container, "RELAY_IMAGE")["value"],
        "registry.example/mailauth/relay:0.1.0-relay"
    );
    assert_eq!(
        container["image"],
        "registry.example/mailauth/mailauth-operator:0.1.0-test"
    );

    let monitor = the(&docs, "ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["path"], "/metrics");
    assert_eq!(
        monitor["spec"]["endpoints"][0]["port"],
        the(&docs, "Service")["spec"]["ports"][0]["name"]
    );

    // Egress reaches the API server and the configured DNS servers' ports.
    let policy = the(&docs, "NetworkPolicy");
    let egress_ports: Vec<String> = policy["spec"]["egress"]
        .as_array()
        .expect("egress rules")
        .iter()
        .flat_map(|rule| rule["ports"].as_array().cloned().unwrap_or_default())
        .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
        .collect();
    for expected in ["443/TCP", "53/UDP", "53/TCP", "5353/UDP", "5353/TCP"] {
        assert!(
            egress_ports.iter().any(|p| p == expected),
            "{expected} not in {egress_ports:?}"
        );
    }
}

/// Installs the stand-in ServiceMonitor CRD and waits until it serves.
fn install_service_monitor_crd(c: &Cluster) {
    let crd = repo_path(SERVICE_MONITOR_CRD);
    let out = c.kubectl(
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=mailauth-tests",
            "-f",
            path_arg(&crd),
        ],
        None,
    );
    assert_success("installing the ServiceMonitor CRD", &out);
    let out = c.kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/servicemonitors.monitoring.coreos.com",
        ],
        None,
    );
    assert_success("waiting for the ServiceMonitor CRD", &out);
}

#[tokio::test]
async fn defaults_pass_server_side_dry_run() {
    let c = cluster();
    let ns = c.namespace("chart-dry-run").await;
    let rendered = render(c, &ns.name, &ns.name, &[]);
    server_side_dry_run(c, &ns.name, &rendered);
    ns.delete().await;
}

#[tokio::test]
async fn every_option_on_passes_server_side_dry_run() {
    let c = cluster();
    install_service_monitor_crd(c);
    let ns = c.namespace("chart-dry-run-all").await;
    let all_options = repo_path(ALL_OPTIONS_VALUES);
    // The values file fixes fullnameOverride; name the cluster-scoped objects
    // after this test's namespace instead.
    let fullname = format!("fullnameOverride={}", ns.name);
    let rendered = render(
        c,
        &ns.name,
        &ns.name,
        &["--values", path_arg(&all_options), "--set", &fullname],
    );
    assert!(
        documents(&rendered)
            .iter()
            .any(|d| d["kind"] == "ServiceMonitor")
    );
    server_side_dry_run(c, &ns.name, &rendered);
    ns.delete().await;
}

#[tokio::test]
async fn helm_install_creates_the_controller_and_its_rbac() {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace("chart-install").await;
    let release = ns.name.clone();
    let chart = repo_path(CHART);
    let out = c.helm(&[
        "install",
        &release,
        path_arg(&chart),
        "--namespace",
        &ns.name,
    ]);
    assert_success("helm install", &out);

    // No kubelet runs pods here, so the objects are checked, not readiness.
    let fullname = format!("{release}-mailauth-operator");
    let leader_election = format!("{fullname}-leader-election");
    let metrics = format!("{fullname}-metrics");
    let namespaced = [
        ("deployment", fullname.as_str()),
        ("serviceaccount", fullname.as_str()),
        ("role", leader_election.as_str()),
        ("rolebinding", leader_election.as_str()),
        ("service", metrics.as_str()),
        ("poddisruptionbudget", fullname.as_str()),
    ];
    for (kind, name) in namespaced {
        let out = c.kubectl(
            &["get", kind, name, "--namespace", &ns.name, "-o", "name"],
            None,
        );
        assert_success(&format!("getting {kind}/{name}"), &out);
    }
    for kind in ["clusterrole", "clusterrolebinding"] {
        let out = c.kubectl(&["get", kind, &fullname, "-o", "name"], None);
        assert_success(&format!("getting {kind}/{fullname}"), &out);
    }
    let out = c.kubectl(
        &[
            "get",
            "deployment",
            &fullname,
            "--namespace",
            &ns.name,
            "-o",
            "json",
        ],
        None,
    );
    let deployment: Value = serde_json::from_slice(&out.stdout).expect("deployment JSON");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(
        deployment["spec"]["template"]["spec"]["serviceAccountName"],
        fullname
    );

    // Uninstalling removes the cluster-scoped objects the namespace's
    // deletion would leave behind.
    let out = c.helm(&["uninstall", &release, "--namespace", &ns.name, "--wait"]);
    assert_success("helm uninstall", &out);
    let out = c.kubectl(
        &[
            "get",
            "clusterrole",
            &fullname,
            "--ignore-not-found",
            "-o",
            "name",
        ],
        None,
    );
    assert_success("getting the ClusterRole", &out);
    assert_eq!(
        text(&out.stdout).trim(),
        "",
        "ClusterRole left after uninstall"
    );
    ns.delete().await;
}

fn operator_binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mailauth-operator"))
}

#[test]
fn controller_subcommand_exists() {
    let out = operator_binary()
        .args(["controller", "--help"])
        .output()
        .expect("running mailauth-operator");
    assert_success("mailauth-operator controller --help", &out);
}

/// clap parses every argument before acting on `--help`, so an argument the
/// binary does not know (which would crash-loop the pod) fails here.
#[test]
fn the_binary_accepts_the_arguments_the_chart_passes() {
    let c = cluster();
    let all_options = repo_path(ALL_OPTIONS_VALUES);
    for extra in [vec![], vec!["--values", path_arg(&all_options)]] {
        let docs = documents(&render(c, "ops", "mailauth-system", &extra));
        let args = strings(&controller_container(&docs)["args"]);
        let out = operator_binary()
            .args(&args)
            .arg("--help")
            .env_remove("POD_NAMESPACE")
            .output()
            .expect("running mailauth-operator");
        assert_success(&format!("mailauth-operator {}", args.join(" ")), &out);
    }
}

/// The instruction lines of a Dockerfile whose keyword is `keyword`, with
/// backslash continuations joined.
fn dockerfile_instructions(dockerfile: &str, keyword: &str) -> Vec<String> {
    let joined = dockerfile.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|line| {
            line.split_whitespace()
                .next()
                .is_some_and(|word| word.eq_ignore_ascii_case(keyword))
        })
        .map(str::to_owned)
        .collect()
}

#[test]
fn dockerfile_ships_the_binary_make_build_builds() {
    let dockerfile = std::fs::read_to_string(repo_path("Dockerfile")).expect("reading Dockerfile");
    let makefile = std::fs::read_to_string(repo_path("Makefile")).expect("reading Makefile");
    let binary = Path::new(env!("CARGO_BIN_EXE_mailauth-operator"))
        .file_name()
        .and_then(|n| n.to_str())
        .expect("binary name");

    // Both build the release profile from the lock file.
    let build = "build --release --locked";
    let make_build = makefile
        .split("\nbuild:")
        .nth(1)
        .and_then(|recipe| recipe.lines().nth(1))
        .expect("a `build:` target in the Makefile");
    assert!(make_build.contains(build), "make build runs {make_build:?}");
    assert!(
        dockerfile_instructions(&dockerfile, "RUN")
            .iter()
            .any(|run| run.contains(&format!("cargo {build}"))),
        "the Dockerfile does not run `cargo {build}`"
    );

    // The runtime stage copies that binary and runs it as its entrypoint.
    let built = format!("target/release/{binary}");
    let copy = dockerfile_instructions(&dockerfile, "COPY")
        .into_iter()
        .find(|copy| copy.contains("--from=") && copy.contains(&built))
        .unwrap_or_else(|| panic!("no COPY --from=<builder> of {built}"));
    let installed = copy.split_whitespace().last().expect("COPY destination");
    let entrypoint = dockerfile_instructions(&dockerfile, "ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(
        entrypoint
            .last()
            .expect("an ENTRYPOINT")
            .trim_start_matches("ENTRYPOINT")
            .trim(),
    )
    .expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(entrypoint, vec![installed.to_owned()]);

    // Multi-stage, and the last stage runs as a non-root user.
    let stages = dockerfile_instructions(&dockerfile, "FROM");
    assert!(stages.len() >= 2, "not multi-stage: {stages:?}");
    let user = dockerfile_instructions(&dockerfile, "USER");
    let user = user.last().expect("a USER instruction");
    let uid = user.split_whitespace().nth(1).expect("USER value");
    assert!(
        !matches!(uid.split(':').next(), Some("root" | "0")),
        "runs as {uid}"
    );

    // The build context leaves out local build output and cluster state.
    let dockerignore =
        std::fs::read_to_string(repo_path(".dockerignore")).expect("reading .dockerignore");
    for excluded in ["target/", ".git/"] {
        assert!(
            dockerignore.lines().any(|l| l.trim() == excluded),
            ".dockerignore does not exclude {excluded}"
        );
    }
}
