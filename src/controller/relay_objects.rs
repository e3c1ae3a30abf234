//! What the operator renders for a MailRelay, as pure functions of plain
//! data: the relay's configuration (settings and domain shards), the config
//! Secret, the Deployment and the Service.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, SeccompProfile, Secret, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::api::MailRelay;
use crate::relay::config::{
    DomainEntry, DomainShard, RelaySettings, SETTINGS_FILE, SHARD_PREFIX, TenantEntry,
    UpstreamAuth, UpstreamSettings,
};

/// Domains per shard file: a shard of RSA-2048 domains stays well under
/// 1 MiB, the API server's limit for one Secret.
pub const DOMAINS_PER_SHARD: usize = 250;
/// The most config one relay takes: it is one Secret, which the API server
/// caps at 1 MiB; the rest is headroom for JSON framing.
pub const CONFIG_BUDGET: usize = 960 * 1024;
/// Port of the relay's admin server (health and metrics).
pub const RELAY_ADMIN_PORT: i32 = 9090;
const CONFIG_DIR: &str = "/etc/mailauth/relay";
const TLS_DIR: &str = "/etc/mailauth/tls";

/// Name of everything rendered for a relay.
pub fn relay_object_name(relay: &MailRelay) -> String {
    format!("{}-relay", relay.name_any())
}

pub fn config_secret_name(relay: &MailRelay) -> String {
    format!("{}-relay-config", relay.name_any())
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

/// The config directory's files: `relay.json` and the domain shards, sorted
/// so that the same inputs always give byte-identical files (no churn).
pub fn config_files(
    settings: &RelaySettings,
    mut tenants: Vec<TenantEntry>,
    mut domains: Vec<DomainEntry>,
) -> Result<BTreeMap<String, Vec<u8>>, serde_json::Error> {
    tenants.sort_by(|a, b| a.username.cmp(&b.username));
    domains.sort_by(|a, b| a.domain.cmp(&b.domain));
    let mut files = BTreeMap::new();
    files.insert(
        SETTINGS_FILE.to_string(),
        serde_json::to_vec_pretty(settings)?,
    );
    let shard_count = domains.len().div_ceil(DOMAINS_PER_SHARD).max(1);
    for index in 0..shard_count {
        let domains: Vec<DomainEntry> = domains
            .iter()
            .skip(index * DOMAINS_PER_SHARD)
            .take(DOMAINS_PER_SHARD)
            .cloned()
            .collect();
        // A tenant goes in the shard of its first domain, so each shard is
        // self-contained for the domains it carries.
        let tenants: Vec<TenantEntry> = tenants
            .iter()
            .filter(|t| {
                t.domains
                    .iter()
                    .min()
                    .is_some_and(|first| domains.iter().any(|d| &d.domain == first))
                    || (index == 0 && t.domains.is_empty())
            })
            .cloned()
            .collect();
        let shard = DomainShard { tenants, domains };
        files.insert(
            format!("{SHARD_PREFIX}{index:04}.json"),
            serde_json::to_vec(&shard)?,
        );
    }
    Ok(files)
}

/// One domain's part of the relay config: its entry and its tenant's.
pub type DomainConfig = (DomainEntry, Option<TenantEntry>);

/// Splits `entries` (in the order they should keep their place: oldest
/// MailDomain first) into those that fit in `budget` bytes next to
/// `settings`, and the domains left out. The cut is a prefix, so a domain
/// already served is never pushed out by a newer one.
pub fn fit_budget(
    settings: &RelaySettings,
    entries: Vec<DomainConfig>,
    budget: usize,
) -> Result<(Vec<DomainConfig>, Vec<String>), serde_json::Error> {
    let mut used = serde_json::to_vec_pretty(settings)?.len();
    let mut kept = Vec::with_capacity(entries.len());
    let mut left_out = Vec::new();
    for (domain, tenant) in entries {
        // Separators and a shard's own framing stay within this slack.
        let size = serde_json::to_vec(&domain)?.len()
            + tenant
                .as_ref()
                .map_or(Ok(0), |t| serde_json::to_vec(t).map(|v| v.len()))?
            + 64;
        if left_out.is_empty() && used + size <= budget {
            used += size;
            kept.push((domain, tenant));
        } else {
            left_out.push(domain.domain);
        }
    }
    Ok((kept, left_out))
}

/// The Secret the relay mounts as its config directory.
pub fn config_secret(relay: &MailRelay, files: BTreeMap<String, Vec<u8>>) -> Secret {
    Secret {
        metadata: metadata(relay, config_secret_name(relay)),
        type_: Some("Opaque".into()),
        data: Some(
            files
                .into_iter()
                .map(|(name, bytes)| (name, ByteString(bytes)))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// The relay Deployment: restricted pod security, config and TLS mounted
/// read-only, probes on the admin port.
pub fn deployment(relay: &MailRelay, default_image: &str) -> Deployment {
    let spec = &relay.spec;
    let port = i32::from(spec.listener.port);
    let mut args = vec![
        "relay".to_string(),
        format!("--config-dir={CONFIG_DIR}"),
        format!("--listen=0.0.0.0:{port}"),
        format!("--admin-listen=0.0.0.0:{RELAY_ADMIN_PORT}"),
    ];
    let mut volumes = vec![Volume {
        name: "config".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(config_secret_name(relay)),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
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
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![Container {
                        name: "relay".into(),
                        image: Some(
                            spec.image
                                .clone()
                                .unwrap_or_else(|| default_image.to_string()),
                        ),
                        args: Some(args),
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
                        volume_mounts: Some(mounts),
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
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
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
    use crate::api::{KeyAlgorithm, MailRelaySpec};
    use crate::relay::config::SigningKeyEntry;

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

    fn domain(name: &str) -> DomainEntry {
        DomainEntry {
            domain: name.into(),
            messages_per_minute: 600,
            signing_keys: vec![SigningKeyEntry {
                selector: "ma20261126a".into(),
                algorithm: KeyAlgorithm::Ed25519,
                private_key_pem: "PEM".into(),
            }],
            return_path: None,
        }
    }

    #[test]
    fn config_files_are_sharded_and_deterministic() {
        let settings = relay_settings(&relay(), UpstreamSecrets::default());
        let domains: Vec<DomainEntry> =
            (0..600).map(|i| domain(&format!("d{i:04}.test"))).collect();
        let tenants = vec![TenantEntry {
            username: "t".into(),
            password_hash: "sha256$x$y".into(),
            domains: vec!["d0300.test".into()],
        }];
        let files = config_files(&settings, tenants.clone(), domains.clone()).unwrap();
        assert_eq!(
            files.len(),
            4,
            "relay.json and three shards of at most 250 domains"
        );
        let mut reversed = domains.clone();
        reversed.reverse();
        assert_eq!(files, config_files(&settings, tenants, reversed).unwrap());
        let shard: DomainShard = serde_json::from_slice(&files["domains-0001.json"]).unwrap();
        assert_eq!(shard.tenants.len(), 1, "the tenant travels with its domain");
        assert!(shard.domains.iter().any(|d| d.domain == "d0300.test"));
    }

    #[test]
    fn domains_past_the_budget_are_left_out_and_never_push_out_older_ones() {
        let settings = relay_settings(&relay(), UpstreamSecrets::default());
        let entries: Vec<DomainConfig> = (0..100)
            .map(|i| (domain(&format!("d{i:04}.test")), None))
            .collect();
        let (all, none) = fit_budget(&settings, entries.clone(), CONFIG_BUDGET).unwrap();
        assert_eq!((all.len(), none.len()), (100, 0));

        // A budget for about 40 domains: the first 40 stay, in order.
        let per_domain = serde_json::to_vec(&entries[0].0).unwrap().len() + 64;
        let budget = serde_json::to_vec_pretty(&settings).unwrap().len() + 40 * per_domain + 10;
        let (kept, left_out) = fit_budget(&settings, entries.clone(), budget).unwrap();
        assert_eq!(kept.len(), 40);
        assert_eq!(kept[39].0.domain, "d0039.test");
        assert_eq!(left_out.len(), 60);
        assert_eq!(left_out[0], "d0040.test");

        let files = config_files(
            &settings,
            vec![],
            kept.into_iter().map(|(domain, _)| domain).collect(),
        )
        .unwrap();
        let total: usize = files.values().map(Vec::len).sum();
        assert!(
            total <= budget,
            "{total} bytes rendered for a budget of {budget}"
        );
    }

    #[test]
    fn deployment_mounts_config_and_tls_with_restricted_security() {
        let deployment = deployment(&relay(), "example/relay:1");
        let pod = deployment.spec.unwrap().template.spec.unwrap();
        let container = &pod.containers[0];
        let args = container.args.clone().unwrap();
        assert!(args.contains(&"--tls-cert=/etc/mailauth/tls/tls.crt".to_string()));
        assert!(args.contains(&"--listen=0.0.0.0:587".to_string()));
        assert_eq!(container.image.as_deref(), Some("example/relay:1"));
        let security = container.security_context.clone().unwrap();
        assert_eq!(security.read_only_root_filesystem, Some(true));
        assert_eq!(security.allow_privilege_escalation, Some(false));
        assert_eq!(pod.volumes.unwrap().len(), 2);
    }
}
