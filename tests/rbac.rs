//! The chart's RBAC, proven on the real API server: the chart is installed
//! into a namespace of its own and `kubectl auth can-i` impersonates its
//! ServiceAccount (with the groups a real token of it carries). Everything
//! the operator does is allowed; what it has no business doing is denied.
//!
//! Two decisions the matrix pins down:
//! - **Secrets are cluster-wide.** DKIM keys and SMTP credentials live next
//!   to each tenant's MailDomain, relay config next to each MailRelay, in
//!   namespaces the operator cannot know in advance, and RBAC cannot narrow
//!   a list or watch to the operator's `managed-by` label. So reading
//!   Secrets in any namespace (kube-system included) is allowed; `update` is
//!   not, because every write is a server-side apply or a merge patch.
//! - **MailDomain spec.** Adding and removing the finalizer is a `patch` of
//!   the MailDomain itself, and RBAC cannot tell a metadata patch from a spec
//!   patch, so `patch` is allowed and "never writes spec" is a property of
//!   the code (status goes through the status subresource, the finalizer is
//!   its only metadata write). `update`, `create` and `delete` are denied.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::cluster::{TestNamespace, cluster};
use support::wait::eventually;

/// A tenant namespace for namespaced questions; it need not exist.
const TENANT: &str = "tenant-a";

/// One `kubectl auth can-i` question.
struct Ask {
    verb: &'static str,
    /// `resource.group`, optionally `/name`.
    resource: String,
    subresource: Option<&'static str>,
    /// `None`: every namespace (or a cluster-scoped resource).
    namespace: Option<String>,
    /// Why the operator needs it, or why it must not have it.
    why: &'static str,
}

fn ask(
    verb: &'static str,
    resource: impl Into<String>,
    namespace: Option<&str>,
    why: &'static str,
) -> Ask {
    Ask {
        verb,
        resource: resource.into(),
        subresource: None,
        namespace: namespace.map(str::to_owned),
        why,
    }
}

fn ask_subresource(
    verb: &'static str,
    resource: &str,
    subresource: &'static str,
    namespace: Option<&str>,
    why: &'static str,
) -> Ask {
    Ask {
        subresource: Some(subresource),
        ..ask(verb, resource, namespace, why)
    }
}

impl std::fmt::Display for Ask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.verb, self.resource)?;
        if let Some(sub) = self.subresource {
            write!(f, " --subresource={sub}")?;
        }
        match &self.namespace {
            Some(ns) => write!(f, " -n {ns}")?,
            None => write!(f, " -A")?,
        }
        write!(f, " ({})", self.why)
    }
}

/// The chart, installed as release `release` in its own namespace.
struct Installed {
    ns: TestNamespace,
    service_account: String,
    lease: String,
}

async fn install_chart(prefix: &str) -> Installed {
    let c = cluster();
    c.install_crds().await;
    let ns = c.namespace(prefix).await;
    // Named after the namespace: its ClusterRole is then unique too.
    let release = ns.name.clone();
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/mailauth-operator");
    let out = c.helm(&[
        "install",
        &release,
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        &ns.name,
    ]);
    assert!(
        out.status.success(),
        "helm install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fullname = format!("{release}-mailauth-operator");
    Installed {
        ns,
        service_account: fullname.clone(),
        lease: fullname,
    }
}

impl Installed {
    /// Whether the ServiceAccount may do `question`, as the API server's
    /// authorizer answers for a token of that ServiceAccount.
    fn can(&self, question: &Ask) -> bool {
        let user = format!(
            "--as=system:serviceaccount:{}:{}",
            self.ns.name, self.service_account
        );
        let namespace_group = format!("--as-group=system:serviceaccounts:{}", self.ns.name);
        let mut args = vec![
            "auth",
            "can-i",
            question.verb,
            &question.resource,
            &user,
            "--as-group=system:serviceaccounts",
            &namespace_group,
            "--as-group=system:authenticated",
        ];
        let subresource = question.subresource.map(|s| format!("--subresource={s}"));
        if let Some(sub) = &subresource {
            args.push(sub);
        }
        match &question.namespace {
            Some(ns) => args.extend(["--namespace", ns]),
            None => args.push("--all-namespaces"),
        }
        let out = cluster().kubectl(&args, None);
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        match (out.status.code(), answer.as_str()) {
            (Some(0), "yes") => true,
            (Some(1), "no") => false,
            _ => panic!(
                "kubectl auth can-i {question}: {} {answer} {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    /// Waits until the RBAC authorizer has seen the chart's bindings (it
    /// works from a watch cache, so a fresh binding takes a moment).
    fn await_bindings(&self) {
        let probes = [
            ask(
                "watch",
                "maildomains.mailauth.dev",
                None,
                "ClusterRoleBinding",
            ),
            ask(
                "create",
                "leases.coordination.k8s.io",
                Some(&self.ns.name),
                "RoleBinding",
            ),
        ];
        eventually("the chart's bindings to take effect")
            .every(Duration::from_millis(100))
            .until(|| {
                let not_yet = self.answered_otherwise(&probes, true);
                if not_yet.is_empty() {
                    Ok(())
                } else {
                    Err(not_yet)
                }
            });
    }

    /// The questions whose answer is not `expected`, one line each.
    fn answered_otherwise(&self, questions: &[Ask], expected: bool) -> Vec<String> {
        questions
            .iter()
            .filter(|question| self.can(question) != expected)
            .map(ToString::to_string)
            .collect()
    }

    async fn uninstall(self) {
        let out = cluster().helm(&["uninstall", &self.ns.name, "--namespace", &self.ns.name]);
        assert!(
            out.status.success(),
            "helm uninstall: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.ns.delete().await;
    }
}

/// Everything the operator does (see `src/controller/`).
fn what_the_operator_does(release_ns: &str, lease: &str) -> Vec<Ask> {
    let md = "maildomains.mailauth.dev";
    let mr = "mailrelays.mailauth.dev";
    let lease_by_name = format!("leases.coordination.k8s.io/{lease}");
    let mut asks = vec![ask(
        "get",
        "dnsproviders.mailauth.dev",
        None,
        "a MailDomain's DNSProvider says where to publish its records",
    )];
    for verb in ["get", "list", "watch"] {
        asks.push(ask(verb, md, None, "MailDomains are watched cluster-wide"));
        asks.push(ask(
            verb,
            mr,
            None,
            "MailRelays admit domains and are rendered",
        ));
        asks.push(ask(
            verb,
            "secrets",
            None,
            "owned Secrets are watched cluster-wide",
        ));
        asks.push(ask(
            verb,
            "namespaces",
            None,
            "namespace labels for relay admission",
        ));
        asks.push(ask(
            verb,
            "deployments.apps",
            None,
            "relay Deployments are owned",
        ));
        asks.push(ask(verb, "services", None, "relay Services are owned"));
    }
    asks.extend([
        ask("patch", md, None, "adding and removing the finalizer"),
        ask_subresource("patch", md, "status", None, "status by server-side apply"),
        ask_subresource("patch", mr, "status", None, "status by server-side apply"),
        ask_subresource(
            "update",
            md,
            "finalizers",
            None,
            "blockOwnerDeletion on owned Secrets",
        ),
        ask_subresource(
            "update",
            mr,
            "finalizers",
            None,
            "blockOwnerDeletion on relay objects",
        ),
        ask(
            "get",
            "secrets",
            Some("kube-system"),
            "by design: Secrets are cluster-wide",
        ),
    ]);
    for verb in ["create", "patch", "delete"] {
        asks.push(ask(
            verb,
            "secrets",
            Some(TENANT),
            "keys and SMTP credentials",
        ));
        asks.push(ask(
            verb,
            "deployments.apps",
            Some(TENANT),
            "relay Deployments",
        ));
        asks.push(ask(verb, "services", Some(TENANT), "relay Services"));
        asks.push(ask(
            verb,
            "serviceaccounts",
            Some(TENANT),
            "the relay's ServiceAccount",
        ));
        asks.push(ask(
            verb,
            "roles.rbac.authorization.k8s.io",
            Some(TENANT),
            "the relay's read-only Role",
        ));
        asks.push(ask(
            verb,
            "rolebindings.rbac.authorization.k8s.io",
            Some(TENANT),
            "binding the relay's Role",
        ));
    }
    for verb in ["create", "patch"] {
        asks.push(ask(
            verb,
            "events.events.k8s.io",
            Some(TENANT),
            "Events for tenants",
        ));
        asks.push(ask(verb, "events", Some(TENANT), "core Events"));
    }
    asks.push(ask(
        "create",
        "leases.coordination.k8s.io",
        Some(release_ns),
        "the first replica creates the Lease",
    ));
    for verb in ["get", "update", "patch"] {
        asks.push(ask(
            verb,
            lease_by_name.clone(),
            Some(release_ns),
            "holding the Lease",
        ));
    }
    asks
}

/// What the operator never needs: a compromised operator must not be able
/// to run code in pods, take over the cluster, or rewrite tenants' objects.
fn what_the_operator_must_not_do(release_ns: &str, lease: &str) -> Vec<Ask> {
    let md = "maildomains.mailauth.dev";
    let mr = "mailrelays.mailauth.dev";
    let mut asks = vec![
        ask("*", "*", None, "no wildcard"),
        ask_subresource("create", "pods", "exec", Some(TENANT), "no code execution"),
        ask_subresource(
            "create",
            "pods",
            "exec",
            Some(release_ns),
            "no code execution",
        ),
        ask("create", "pods", Some(TENANT), "pods come from Deployments"),
        ask("list", "pods", None, "pods are not read"),
        ask("get", "nodes", None, "nodes are none of its business"),
        ask("patch", "nodes", None, "nodes are none of its business"),
        ask(
            "create",
            "clusterroles.rbac.authorization.k8s.io",
            None,
            "no RBAC writes",
        ),
        ask(
            "escalate",
            "clusterroles.rbac.authorization.k8s.io",
            None,
            "no escalation",
        ),
        ask(
            "bind",
            "clusterroles.rbac.authorization.k8s.io",
            None,
            "no escalation",
        ),
        ask(
            "create",
            "clusterrolebindings.rbac.authorization.k8s.io",
            None,
            "no RBAC writes",
        ),
        ask(
            "escalate",
            "roles.rbac.authorization.k8s.io",
            Some(release_ns),
            "no escalation",
        ),
        ask(
            "bind",
            "roles.rbac.authorization.k8s.io",
            Some(TENANT),
            "no binding of roles it does not hold",
        ),
        ask(
            "escalate",
            "roles.rbac.authorization.k8s.io",
            Some(TENANT),
            "no escalation",
        ),
        ask("impersonate", "users", None, "no impersonation"),
        ask("impersonate", "serviceaccounts", None, "no impersonation"),
        ask_subresource(
            "create",
            "serviceaccounts",
            "token",
            Some(TENANT),
            "no tokens",
        ),
        ask("create", "namespaces", None, "namespaces are read-only"),
        ask("patch", "namespaces", None, "namespaces are read-only"),
        ask("delete", "namespaces", None, "namespaces are read-only"),
        ask("create", md, None, "tenants create MailDomains"),
        ask(
            "update",
            md,
            None,
            "a finalizer needs only patch; spec is never written",
        ),
        ask("delete", md, None, "tenants delete MailDomains"),
        ask_subresource(
            "update",
            md,
            "status",
            None,
            "status is server-side applied",
        ),
        ask("create", mr, None, "platform teams own MailRelays"),
        ask("update", mr, None, "platform teams own MailRelays"),
        ask("patch", mr, None, "platform teams own MailRelays"),
        ask("delete", mr, None, "platform teams own MailRelays"),
        ask(
            "update",
            "secrets",
            Some(TENANT),
            "writes are apply or merge patches",
        ),
        ask("get", "configmaps", Some(TENANT), "no ConfigMaps are used"),
        ask(
            "patch",
            "customresourcedefinitions.apiextensions.k8s.io",
            None,
            "Helm installs the CRDs",
        ),
        ask(
            "patch",
            "mutatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
            "no admission control",
        ),
        ask(
            "create",
            "daemonsets.apps",
            Some(TENANT),
            "relays are Deployments",
        ),
        ask(
            "delete",
            "leases.coordination.k8s.io",
            Some(release_ns),
            "Leases expire",
        ),
        ask(
            "create",
            "leases.coordination.k8s.io",
            Some("kube-system"),
            "own namespace only",
        ),
        ask(
            "update",
            "leases.coordination.k8s.io/kube-controller-manager",
            Some("kube-system"),
            "other components' Leases",
        ),
    ];
    for verb in ["get", "update", "patch"] {
        asks.push(ask(
            verb,
            format!("leases.coordination.k8s.io/not-{lease}"),
            Some(release_ns),
            "only its own Lease",
        ));
    }
    asks
}

#[tokio::test]
async fn service_account_may_do_everything_the_operator_does() {
    let installed = install_chart("rbac-allowed").await;
    installed.await_bindings();
    let questions = what_the_operator_does(&installed.ns.name, &installed.lease);
    let refused = installed.answered_otherwise(&questions, true);
    assert!(
        refused.is_empty(),
        "the operator's ServiceAccount is refused what it needs:\n  {}",
        refused.join("\n  ")
    );
    installed.uninstall().await;
}

#[tokio::test]
async fn service_account_may_not_do_what_the_operator_does_not_need() {
    let installed = install_chart("rbac-denied").await;
    // Denials are only meaningful once the grants are in force.
    installed.await_bindings();
    let questions = what_the_operator_must_not_do(&installed.ns.name, &installed.lease);
    let allowed = installed.answered_otherwise(&questions, false);
    assert!(
        allowed.is_empty(),
        "the operator's ServiceAccount is allowed more than it needs:\n  {}",
        allowed.join("\n  ")
    );
    installed.uninstall().await;
}

/// No rule grants a wildcard, and every rule says why it exists.
#[test]
fn cluster_role_has_no_wildcards_and_every_rule_a_reason() {
    let c = cluster();
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/mailauth-operator");
    let out = c.helm(&[
        "template",
        "ops",
        chart.to_str().expect("utf-8 path"),
        "--show-only",
        "templates/rbac.yaml",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout);
    use serde::Deserialize;
    let roles: Vec<Value> = serde_yaml::Deserializer::from_str(&rendered)
        .map(|doc| Value::deserialize(doc).expect("YAML"))
        .filter(|doc| doc["kind"] == "ClusterRole" || doc["kind"] == "Role")
        .collect();
    assert_eq!(roles.len(), 2, "a ClusterRole and the Lease Role");
    for role in &roles {
        for rule in role["rules"].as_array().expect("rules") {
            for field in ["apiGroups", "resources", "verbs"] {
                let values = rule[field].as_array().expect(field);
                assert!(
                    values
                        .iter()
                        .all(|v| v.as_str().is_some_and(|s| !s.contains('*'))),
                    "wildcard in {} rule {rule}",
                    role["metadata"]["name"]
                );
            }
        }
    }

    // Each rule in the template is directly preceded by its comment.
    let template = std::fs::read_to_string(chart.join("templates/rbac.yaml")).expect("rbac.yaml");
    let mut previous = "";
    for line in template.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("- apiGroups:") {
            assert!(
                previous.starts_with('#'),
                "an RBAC rule without a comment on why it exists, after {previous:?}"
            );
        }
        previous = line;
    }
}

/// A tenant given the chart's tenant role in its namespace (what `edit`
/// and `admin` aggregate) may change its MailDomains but never their
/// status, which is the operator's record of what it verified, nor
/// anything in another namespace.
#[tokio::test]
async fn a_tenant_may_change_its_maildomains_but_never_their_status() {
    let installed = install_chart("rbac-tenant").await;
    let c = cluster();
    let tenant_ns = c.namespace("rbac-tenant-ns").await;
    let other_ns = c.namespace("rbac-other-ns").await;
    let role = format!("{}-mailauth-operator-tenant-edit", installed.ns.name);
    let binding = serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "tenant-edit", "namespace": tenant_ns.name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "tenant-alice"}]
    });
    let out = c.kubectl(&["apply", "-f", "-"], Some(&binding.to_string()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let can = |verb: &str, subresource: Option<&str>, namespace: &str| {
        let mut args = vec![
            "auth",
            "can-i",
            verb,
            "maildomains.mailauth.dev",
            "--as=tenant-alice",
            "--namespace",
            namespace,
        ];
        let sub = subresource.map(|s| format!("--subresource={s}"));
        if let Some(sub) = &sub {
            args.push(sub);
        }
        let out = c.kubectl(&args, None);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    eventually("the tenant's binding to take effect")
        .within(Duration::from_secs(30))
        .until(|| {
            if can("patch", None, &tenant_ns.name) {
                Ok(())
            } else {
                Err("kubectl auth can-i patch: no")
            }
        });
    for verb in [
        "create", "update", "patch", "delete", "get", "list", "watch",
    ] {
        assert!(
            can(verb, None, &tenant_ns.name),
            "a tenant may {verb} its MailDomains"
        );
    }
    for verb in ["update", "patch"] {
        assert!(
            !can(verb, Some("status"), &tenant_ns.name),
            "a tenant must never {verb} maildomains/status"
        );
    }
    assert!(
        !can("patch", None, &other_ns.name),
        "nor touch another namespace"
    );

    // The roles aggregate into the built-in ones.
    let out = c.helm(&[
        "template",
        "ops",
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("charts/mailauth-operator")
            .to_str()
            .expect("utf-8 path"),
        "--show-only",
        "templates/tenant-roles.yaml",
    ]);
    let rendered = String::from_utf8_lossy(&out.stdout);
    for label in [
        "aggregate-to-edit",
        "aggregate-to-admin",
        "aggregate-to-view",
    ] {
        assert!(
            rendered.contains(&format!("rbac.authorization.k8s.io/{label}: \"true\"")),
            "{label}"
        );
    }
    assert!(
        !rendered.contains("maildomains/status"),
        "no role grants status:\n{rendered}"
    );
    tenant_ns.delete().await;
    other_ns.delete().await;
    installed.uninstall().await;
}

/// The controller itself, run as a process with a token of the chart's
/// ServiceAccount (not as `system:masters`): a MailDomain with a relay and
/// a DNSProvider goes all the way to Ready, so every request the code makes
/// on that path is one the chart grants. A rule the code needs and the
/// chart lacks fails here, whether or not the matrix above lists it.
#[tokio::test]
async fn the_controller_does_its_job_on_the_charts_own_rbac() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Api, PostParams};
    use mailauth_operator::api::{
        ConditionStatus, ConditionType, DNSProvider, MailDomain, MailRelay,
    };
    use support::dns::{Knot, TSIG_KEY_NAME, Zone};
    use support::operator::{is, wait_for};

    let installed = install_chart("rbac-run").await;
    let c = cluster();
    let tenant = c.namespace("rbac-run-tenant").await;
    let knot = Knot::start(&[Zone::new("rbacrun.test")]);
    let client = c.client().await;
    let pp = PostParams::default();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "tsig"},
        "stringData": {"secret": knot.tsig_secret()},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &tenant.name)
        .create(&pp, &secret)
        .await
        .unwrap();
    let provider: DNSProvider = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "DNSProvider", "metadata": {"name": "dns"},
        "spec": {"zones": ["rbacrun.test"],
                 "rfc2136": {"server": knot.addr().to_string(), "tsigKeyName": TSIG_KEY_NAME,
                             "tsigSecretRef": {"name": "tsig"}}},
    }))
    .unwrap();
    Api::<DNSProvider>::namespaced(client.clone(), &tenant.name)
        .create(&pp, &provider)
        .await
        .unwrap();
    let relay: MailRelay = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailRelay", "metadata": {"name": "relay"},
        "spec": {"hostname": "relay.platform.test",
                 "upstream": {"host": "127.0.0.1", "port": 2525, "tls": "None"},
                 "spf": {"egressIPs": ["127.0.0.1"]}},
    }))
    .unwrap();
    let relays = Api::<MailRelay>::namespaced(client.clone(), &tenant.name);
    relays.create(&pp, &relay).await.unwrap();
    let md: MailDomain = serde_json::from_value(serde_json::json!({
        "apiVersion": "mailauth.dev/v1alpha1", "kind": "MailDomain", "metadata": {"name": "acme"},
        "spec": {"domain": "rbacrun.test", "relayRef": {"name": "relay"},
                 "dkim": {"algorithm": "Ed25519"},
                 "dns": {"providerRef": {"name": "dns"}}},
    }))
    .unwrap();
    let domains = Api::<MailDomain>::namespaced(client.clone(), &tenant.name);
    domains.create(&pp, &md).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let kubeconfig =
        c.service_account_kubeconfig(&installed.ns.name, &installed.service_account, dir.path());
    let log_path = dir.path().join("operator.log");
    let log = std::fs::File::create(&log_path).unwrap();
    /// Stops the operator however the test ends, and shows its log when
    /// the test failed.
    struct Running(std::process::Child, std::path::PathBuf);
    impl Drop for Running {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            if std::thread::panicking() {
                let log = std::fs::read_to_string(&self.1).unwrap_or_default();
                eprintln!("the operator's log:\n{log}");
            }
        }
    }
    let operator = Running(
        std::process::Command::new(env!("CARGO_BIN_EXE_mailauth-operator"))
            .arg("controller")
            .args(["--namespace", &tenant.name])
            .args(["--dns-server", &knot.addr().to_string()])
            .args(["--dns-retry-min", "1s", "--dns-retry-max", "2s"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--leader-election")
            .args(["--lease-name", &installed.lease])
            .args(["--lease-namespace", &installed.ns.name])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("running the operator"),
        log_path.clone(),
    );

    wait_for(
        &domains,
        "acme",
        "Ready, published, served by the relay",
        |md| {
            is(md, ConditionType::Ready, ConditionStatus::True)
                && is(md, ConditionType::DnsPublished, ConditionStatus::True)
                && is(md, ConditionType::RelayAccepted, ConditionStatus::True)
        },
    )
    .await;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        !log.contains("forbidden"),
        "a request was forbidden:\n{log}"
    );
    drop(operator);
    tenant.delete().await;
    installed.uninstall().await;
}
