//! What the operator renders for a MailRelay, as pure functions of plain
//! data: the relay's settings, its config Secrets (the settings, and one
//! Secret per shard bucket of domains, see [`super::projection`]), the
//! ServiceAccount and namespace-scoped Role with which the relay reads them,
//! the Deployment and the Service.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
    ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    Secret, SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec,
    Sysctl, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::api::MailRelay;
use crate::relay::config::{
    RELAY_CONFIG_LABEL, RELAY_CONFIG_SHARD_LABEL, RelaySettings, SETTINGS_FILE, UpstreamAuth,
    UpstreamSettings, shard_file_name,
};

/// Port of the relay's admin server (health and metrics).
pub const RELAY_ADMIN_PORT: i32 = 9090;
/// The pod-network sysctl below which binding a port needs
/// `CAP_NET_BIND_SERVICE` (1024 unless the runtime lowers it).
const UNPRIVILEGED_PORT_SYSCTL: &str = "net.ipv4.ip_unprivileged_port_start";
const TLS_DIR: &str = "/etc/mailauth/tls";

/// Name of everything rendered for a relay.
pub fn relay_object_name(relay: &MailRelay) -> String {
    format!("{}-relay", relay.name_any())
}

/// The Secret with the relay's settings (`relay.json`).
pub fn config_secret_name(relay: &MailRelay) -> String {
    crate::relay::config::settings_secret_name(&relay.name_any())
}

/// The Secret with one shard bucket of the relay's domains.
pub fn shard_secret_name(relay: &MailRelay, bucket: u8) -> String {
    crate::relay::config::shard_secret_name(&relay.name_any(), bucket)
}

fn labels(relay: &MailRelay) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "mailauth-relay".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), relay.name_any()),
        (
            super::secrets::MANAGED_BY_LABEL.to_string(),
            super::secrets::MANAGED_BY.to_string(),
        ),
    ])
}

fn metadata(relay: &MailRelay, name: String) -> ObjectMeta {
    let owner: Option<OwnerReference> = relay.controller_owner_ref(&());
    ObjectMeta {
        name: Some(name),
        namespace: relay.namespace(),
        labels: Some(labels(relay)),
        owner_references: owner.map(|o| vec![o]),
        ..ObjectMeta::default()
    }
}

/// What the relay's settings take from Secrets the MailRelay names.
#[derive(Clone, Debug, Default)]
pub struct UpstreamSecrets {
    pub auth: Option<UpstreamAuth>,
    pub ca_certificates: Option<String>,
}

/// The relay-wide settings from the MailRelay spec.
pub fn relay_settings(relay: &MailRelay, secrets: UpstreamSecrets) -> RelaySettings {
    let spec = &relay.spec;
    RelaySettings {
        hostname: spec.hostname.clone(),
        allow_plaintext_auth: spec.listener.allow_plaintext_auth,
        upstream: UpstreamSettings {
            host: spec.upstream.host.clone(),
            port: spec.upstream.port,
            tls: spec.upstream.tls,
            auth: secrets.auth,
            ca_certificates: secrets.ca_certificates,
        },
        limits: spec.limits.clone(),
    }
}

fn config_labels(relay: &MailRelay, bucket: Option<u8>) -> BTreeMap<String, String> {
    let mut labels = labels(relay);
    labels.insert(RELAY_CONFIG_LABEL.to_string(), relay.name_any());
    if let Some(bucket) = bucket {
        labels.insert(
            RELAY_CONFIG_SHARD_LABEL.to_string(),
            format!("{bucket:02x}"),
        );
    }
    labels
}

/// The Secret with the relay's settings. Byte-identical for the same
/// settings (no churn).
pub fn settings_secret(
    relay: &MailRelay,
    settings: &RelaySettings,
) -> Result<Secret, serde_json::Error> {
    let mut meta = metadata(relay, config_secret_name(relay));
    meta.labels = Some(config_labels(relay, None));
    Ok(Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            SETTINGS_FILE.to_string(),
            ByteString(serde_json::to_vec_pretty(settings)?),
        )])),
        ..Secret::default()
    })
}

/// The Secret with one shard bucket (`shard` is its rendered JSON).
pub fn shard_secret(relay: &MailRelay, bucket: u8, shard: Vec<u8>) -> Secret {
    let mut meta = metadata(relay, shard_secret_name(relay, bucket));
    meta.labels = Some(config_labels(relay, Some(bucket)));
    Secret {
        metadata: meta,
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            shard_file_name(bucket),
            ByteString(shard),
        )])),
        ..Secret::default()
    }
}

/// The ServiceAccount relay pods run as.
pub fn service_account(relay: &MailRelay) -> ServiceAccount {
    ServiceAccount {
        metadata: metadata(relay, relay_object_name(relay)),
        ..ServiceAccount::default()
    }
}

/// What a relay may do: read the Secrets of its own namespace, to watch its
/// config. RBAC cannot narrow a list or watch to a label, so the relay's
/// namespace should hold only platform Secrets (docs/security.md).
pub fn role(relay: &MailRelay) -> Role {
    Role {
        metadata: metadata(relay, relay_object_name(relay)),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".into()]),
            verbs: vec!["get".into(), "list".into(), "watch".into()],
            ..PolicyRule::default()
        }]),
    }
}

/// Binds [`role`] to [`service_account`].
pub fn role_binding(relay: &MailRelay) -> RoleBinding {
    RoleBinding {
        metadata: metadata(relay, relay_object_name(relay)),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Role".into(),
            name: relay_object_name(relay),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: relay_object_name(relay),
            namespace: relay.namespace(),
            ..Subject::default()
        }]),
    }
}

/// The relay Deployment: restricted pod security, config and TLS mounted
/// read-only, probes on the admin port. `default_image` (pulled with
/// `default_pull_policy`, or the cluster's default policy) runs unless the
/// MailRelay names its own image.
pub fn deployment(
    relay: &MailRelay,
    default_image: &str,
    default_pull_policy: Option<&str>,
) -> Deployment {
    let spec = &relay.spec;
    let port = i32::from(spec.listener.port);
    let mut args = vec![
        "relay".to_string(),
        format!("--config-secrets={}", relay.name_any()),
        format!("--listen=0.0.0.0:{port}"),
        format!("--admin-listen=0.0.0.0:{RELAY_ADMIN_PORT}"),
        // Each replica counts alone: N replicas each allow 1/N, so the
        // relay as a whole keeps every domain's messagesPerMinute.
        format!("--rate-limit-share={}", spec.replicas.max(1)),
    ];
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    if let Some(tls) = &spec.listener.tls_secret_name {
        args.push(format!("--tls-cert={TLS_DIR}/tls.crt"));
        args.push(format!("--tls-key={TLS_DIR}/tls.key"));
        volumes.push(Volume {
            name: "tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(tls.clone()),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "tls".into(),
            mount_path: TLS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(10),
        ..Probe::default()
    };
    let selector = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "mailauth-relay".to_string(),
        ),
        ("app.kubernetes.io/instance".to_string(), relay.name_any()),
    ]);
    Deployment {
        metadata: metadata(relay, relay_object_name(relay)),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(relay)),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    // The relay watches its config Secrets with this
                    // account's token (get/list/watch Secrets in this
                    // namespace, nothing else).
                    service_account_name: Some(relay_object_name(relay)),
                    automount_service_account_token: Some(true),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        sysctls: listener_sysctls(port),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![Container {
                        name: "relay".into(),
                        image: Some(
                            spec.image
                                .clone()
                                .unwrap_or_else(|| default_image.to_string()),
                        ),
                        image_pull_policy: spec
                            .image
                            .is_none()
                            .then_some(default_pull_policy)
                            .flatten()
                            .map(str::to_string),
                        args: Some(args),
                        env: Some(vec![EnvVar {
                            name: "POD_NAMESPACE".into(),
                            value_from: Some(EnvVarSource {
                                field_ref: Some(ObjectFieldSelector {
                                    field_path: "metadata.namespace".into(),
                                    ..ObjectFieldSelector::default()
                                }),
                                ..EnvVarSource::default()
                            }),
                            ..EnvVar::default()
                        }]),
                        ports: Some(vec![
                            ContainerPort {
                                name: Some("submission".into()),
                                container_port: port,
                                ..ContainerPort::default()
                            },
                            ContainerPort {
                                name: Some("admin".into()),
                                container_port: RELAY_ADMIN_PORT,
                                ..ContainerPort::default()
                            },
                        ]),
                        resources: spec.resources.clone(),
                        volume_mounts: (!mounts.is_empty()).then_some(mounts),
                        liveness_probe: Some(probe("/healthz")),
                        readiness_probe: Some(probe("/readyz")),
                        security_context: Some(SecurityContext {
                            allow_privilege_escalation: Some(false),
                            read_only_root_filesystem: Some(true),
                            run_as_non_root: Some(true),
                            capabilities: Some(Capabilities {
                                drop: Some(vec!["ALL".into()]),
                                ..Capabilities::default()
                            }),
                            ..SecurityContext::default()
                        }),
                        ..Container::default()
                    }],
                    volumes: (!volumes.is_empty()).then_some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// A listener port below 1024 (587 by default) cannot be bound by a non-root
/// process with every capability dropped on runtimes that leave
/// `net.ipv4.ip_unprivileged_port_start` at 1024 (containerd 1.6 does), and
/// adding `NET_BIND_SERVICE` does not help a non-root process (runtimes set
/// no ambient capabilities). The pod instead lowers that sysctl, in its own
/// network namespace only, to exactly the listener port: a "safe" sysctl the
/// kubelet allows by default and the restricted Pod Security Standard
/// permits. Newer runtimes lower it to 0 for every pod; this asks less.
fn listener_sysctls(port: i32) -> Option<Vec<Sysctl>> {
    (port < 1024).then(|| {
        vec![Sysctl {
            name: UNPRIVILEGED_PORT_SYSCTL.into(),
            value: port.to_string(),
        }]
    })
}

/// The Service tenants submit to.
pub fn service(relay: &MailRelay) -> Service {
    let port = i32::from(relay.spec.listener.port);
    Service {
        metadata: metadata(relay, relay_object_name(relay)),
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/name".to_string(),
                    "mailauth-relay".to_string(),
                ),
                ("app.kubernetes.io/instance".to_string(), relay.name_any()),
            ])),
            ports: Some(vec![ServicePort {
                name: Some("submission".into()),
                port,
                target_port: Some(IntOrString::String("submission".into())),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::MailRelaySpec;

    fn relay() -> MailRelay {
        let spec: MailRelaySpec = serde_json::from_value(serde_json::json!({
            "hostname": "relay.platform.test",
            "upstream": {"host": "smtp.platform.test"},
            "listener": {"tlsSecretName": "relay-tls"}
        }))
        .unwrap();
        let mut relay = MailRelay::new("shared", spec);
        relay.metadata.namespace = Some("mail".into());
        relay.metadata.uid = Some("relay-uid".into());
        relay
    }

    #[test]
    fn config_secrets_are_labelled_for_the_relay_and_deterministic() {
        let relay = relay();
        let settings = relay_settings(&relay, UpstreamSecrets::default());
        let first = settings_secret(&relay, &settings).unwrap();
        assert_eq!(first, settings_secret(&relay, &settings).unwrap());
        assert_eq!(first.metadata.name.as_deref(), Some("shared-relay-config"));
        let labels = first.metadata.labels.clone().unwrap();
        assert_eq!(labels[RELAY_CONFIG_LABEL], "shared");
        assert!(!labels.contains_key(RELAY_CONFIG_SHARD_LABEL));
        let shard = shard_secret(&relay, 0x3f, b"{}".to_vec());
        assert_eq!(
            shard.metadata.name.as_deref(),
            Some("shared-relay-config-3f")
        );
        assert_eq!(
            shard.metadata.labels.unwrap()[RELAY_CONFIG_SHARD_LABEL],
            "3f"
        );
        assert!(shard.data.unwrap().contains_key("domains-3f.json"));
        assert_eq!(first.metadata.owner_references.unwrap()[0].uid, "relay-uid");
    }

    #[test]
    fn the_relay_may_only_read_secrets_of_its_namespace() {
        let relay = relay();
        let role = role(&relay);
        assert_eq!(role.metadata.namespace.as_deref(), Some("mail"));
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(
            rules[0].resources.as_deref(),
            Some(&["secrets".to_string()][..])
        );
        assert_eq!(rules[0].verbs, vec!["get", "list", "watch"]);
        let binding = role_binding(&relay);
        assert_eq!(binding.role_ref.name, "shared-relay");
        assert_eq!(binding.subjects.unwrap()[0].name, "shared-relay");
    }

    #[test]
    fn deployment_reads_its_config_secrets_with_restricted_security() {
        let mut relay = relay();
        relay.spec.replicas = 3;
        let deployment = deployment(&relay, "example/relay:1", None);
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        let args = container.args.clone().unwrap();
        assert!(args.contains(&"--config-secrets=shared".to_string()));
        assert!(args.contains(&"--tls-cert=/etc/mailauth/tls/tls.crt".to_string()));
        assert!(args.contains(&"--listen=0.0.0.0:587".to_string()));
        assert!(
            args.contains(&"--rate-limit-share=3".to_string()),
            "{args:?}"
        );
        assert_eq!(container.image.as_deref(), Some("example/relay:1"));
        assert_eq!(container.image_pull_policy, None, "the cluster's default");
        assert_eq!(pod.service_account_name.as_deref(), Some("shared-relay"));
        let env = container.env.clone().unwrap();
        assert_eq!(env[0].name, "POD_NAMESPACE");
        let security = container.security_context.clone().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(
            pod.volumes.unwrap().len(),
            1,
            "only the TLS Secret is mounted"
        );
    }

    #[test]
    fn a_privileged_listener_port_is_bindable_without_any_capability() {
        let mut relay = relay();
        let pod = |relay: &MailRelay| {
            deployment(relay, "example/relay:1", None)
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
        };
        let submission = pod(&relay);
        let sysctls = submission.security_context.unwrap().sysctls.unwrap();
        assert_eq!(sysctls.len(), 1);
        assert_eq!(sysctls[0].name, "net.ipv4.ip_unprivileged_port_start");
        assert_eq!(sysctls[0].value, "587", "lowered to the port, not to 0");
        let capabilities = submission.containers[0]
            .security_context
            .clone()
            .unwrap()
            .capabilities
            .unwrap();
        assert_eq!(capabilities.drop, Some(vec!["ALL".to_string()]));
        assert_eq!(capabilities.add, None, "no capability is added back");

        relay.spec.listener.port = 2525;
        let unprivileged = pod(&relay);
        assert_eq!(unprivileged.security_context.unwrap().sysctls, None);
    }

    #[test]
    fn the_default_image_has_the_operators_pull_policy_a_named_one_the_clusters() {
        let mut relay = relay();
        let container = |relay: &MailRelay| {
            deployment(relay, "local/operator:1", Some("Never"))
                .spec
                .unwrap()
                .template
                .spec
                .unwrap()
                .containers
                .remove(0)
        };
        let default = container(&relay);
        assert_eq!(default.image.as_deref(), Some("local/operator:1"));
        assert_eq!(default.image_pull_policy.as_deref(), Some("Never"));

        relay.spec.image = Some("registry.example/relay:2".into());
        let named = container(&relay);
        assert_eq!(named.image.as_deref(), Some("registry.example/relay:2"));
        assert_eq!(named.image_pull_policy, None);
    }
}
