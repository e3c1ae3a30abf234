//! `MailRelay`: one signing relay deployment run by the platform team.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::condition::Condition;
use super::maildomain::{dns_label_pattern, domain_pattern};

/// A signing SMTP relay: tenants submit mail to it with the credentials the
/// operator gives each MailDomain; it checks the sender, signs with the
/// domain's DKIM key and forwards to the platform's outbound servers.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailauth.dev",
    version = "v1alpha1",
    kind = "MailRelay",
    doc = "A signing SMTP relay: tenants submit with their credentials, it checks the sender, DKIM-signs with the domain's key and forwards upstream.",
    plural = "mailrelays",
    shortname = "mr",
    category = "mailauth",
    namespaced,
    status = "MailRelayStatus",
    printcolumn = r#"{"name":"Hostname","type":"string","jsonPath":".spec.hostname"}"#,
    printcolumn = r#"{"name":"Upstream","type":"string","jsonPath":".spec.upstream.host"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".status.readyReplicas"}"#,
    printcolumn = r#"{"name":"Domains","type":"integer","jsonPath":".status.domains"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MailRelaySpec {
    /// How many relay pods to run.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,

    /// The relay container image; defaults to the image the operator was
    /// installed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// CPU and memory for each relay pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// The name the relay gives in its SMTP greeting and EHLO, such as
    /// `relay.platform.example`.
    #[schemars(length(max = 253))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self.matches('", domain_pattern!(), "')")).message("must be a lowercase fully-qualified host name such as relay.platform.example"))]
    pub hostname: String,

    /// Where tenants submit mail.
    #[serde(default)]
    pub listener: Listener,

    /// Where signed mail is forwarded.
    pub upstream: Upstream,

    /// What each tenant's SPF record must authorize for mail from this
    /// relay to pass SPF. Give an `include` name, egress IPs, or both.
    #[serde(default)]
    pub spf: SpfAuthorization,

    /// Which namespaces' MailDomains may use this relay.
    #[serde(default)]
    pub allowed_namespaces: AllowedNamespaces,

    /// Limits that protect the relay and the platform's reputation.
    #[serde(default)]
    pub limits: RelayLimits,
}

/// The SMTP submission listener.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Listener {
    /// TCP port for SMTP submission: 587 by default.
    #[serde(default = "default_listener_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// A `kubernetes.io/tls` Secret in the relay's namespace (for example one
    /// that cert-manager issues) with the certificate offered by STARTTLS.
    /// A renewed certificate is picked up without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_secret_name: Option<String>,

    /// Allow AUTH without STARTTLS. Only for relays reachable solely from
    /// inside the cluster; passwords then cross the pod network in clear.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
}

/// The next hop for signed mail.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Upstream {
    /// Host name or IP address of the upstream SMTP server.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self.matches('", domain_pattern!(), "') || self.matches('", dns_label_pattern!(), "') || isIP(self)")).message("must be a host name such as smtp.platform.example or an IP address"))]
    pub host: String,

    /// TCP port of the upstream: 25 by default.
    #[serde(default = "default_upstream_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// `StartTLS` (default: required), `TLS` (implicit TLS, e.g. port 465)
    /// or `None` (plain SMTP; only for a server on a trusted network).
    #[serde(default)]
    pub tls: UpstreamTls,

    /// A Secret in the relay's namespace with `username` and `password` to
    /// authenticate to the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_secret_name: Option<String>,

    /// A Secret in the relay's namespace whose `ca.crt` holds the CA
    /// certificate(s) that sign the upstream's certificate, for a smarthost
    /// with a private CA. When set, only these are trusted; without it, the
    /// usual public roots. Changes reach the relay without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_name: Option<String>,
}

/// How the relay secures its connection to the upstream.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum UpstreamTls {
    #[default]
    #[serde(rename = "StartTLS")]
    StartTls,
    #[serde(rename = "TLS")]
    Tls,
    None,
}

/// What tenants' SPF records must authorize.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SpfAuthorization {
    /// A domain to reference with `include:`, such as `_spf.platform.example`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?[.])+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$')").message("must be a lowercase domain name such as _spf.platform.example"))]
    pub include: Option<String>,

    /// The addresses (or CIDR ranges) mail leaves the platform from.
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "egressIPs")]
    #[schemars(length(max = 16), inner(length(max = 43)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(ip, isIP(ip) || isCIDR(ip))").message("each entry must be an IP address or CIDR range such as 192.0.2.10 or 2001:db8::/48"))]
    pub egress_ips: Vec<String>,
}

/// Which namespaces may use a relay, as Gateway API listeners choose routes.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("self.from == 'Selector' ? has(self.selector) : !has(self.selector)").message("selector must be set when from is Selector, and only then").field_path(".selector"))]
pub struct AllowedNamespaces {
    /// `Same` (default: only the relay's own namespace), `All`, or
    /// `Selector` (namespaces whose labels match `selector`).
    #[serde(default)]
    pub from: NamespacesFrom,

    /// The namespace label selector, when `from` is `Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// The namespaces a relay admits.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum NamespacesFrom {
    #[default]
    Same,
    All,
    Selector,
}

/// Relay limits.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RelayLimits {
    /// Largest message accepted, in bytes (SMTP SIZE): 25 MiB by default.
    #[serde(default = "default_max_message_bytes")]
    #[schemars(range(min = 1024, max = 209715200))]
    pub max_message_bytes: u64,

    /// Most recipients per message.
    #[serde(default = "default_max_recipients")]
    #[schemars(range(min = 1, max = 10000))]
    pub max_recipients: u32,

    /// Most concurrent client connections per relay pod.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_connections: u32,

    /// Messages per minute each domain may send, unless its MailDomain asks
    /// for less. Each relay pod counts on its own (see docs/relay.md).
    #[serde(default = "default_messages_per_minute")]
    #[schemars(range(min = 1, max = 1000000))]
    pub messages_per_minute: u32,

    /// Most connections per relay pod that have not authenticated yet,
    /// STARTTLS handshakes included: 100 by default, and never more than
    /// `maxConnections`. Strangers can hold no more than these; the rest of
    /// `maxConnections` stays for tenants that have logged in.
    #[serde(default = "default_max_unauthenticated_connections")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_unauthenticated_connections: u32,

    /// Most not-yet-authenticated connections per relay pod from one IP
    /// address (one /64 network for IPv6): 10 by default.
    #[serde(default = "default_max_unauthenticated_connections_per_source")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_unauthenticated_connections_per_source: u32,

    /// Most concurrent sessions per relay pod of one tenant (one SMTP
    /// username) after it logged in: 100 by default. Past it, AUTH answers
    /// 454 until one of its sessions ends.
    #[serde(default = "default_max_connections_per_tenant")]
    #[schemars(range(min = 1, max = 100000))]
    pub max_connections_per_tenant: u32,

    /// Most message data one tenant's sessions may hold in a relay pod's
    /// memory at once, in bytes: 100 MiB by default, and never less than
    /// `maxMessageBytes`. A message past it gets 452 (try again later).
    #[serde(default = "default_max_buffered_bytes_per_tenant")]
    #[schemars(range(min = 1024, max = 17179869184u64))]
    pub max_buffered_bytes_per_tenant: u64,
}

/// What the operator observed about a MailRelay.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MailRelayStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready` and `Configured`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Relay pods ready to accept mail.
    #[serde(default)]
    pub ready_replicas: i32,

    /// MailDomains this relay signs and sends for.
    #[serde(default)]
    pub domains: i32,

    /// How many MailDomains that name this relay it does not serve, for a
    /// reason their own status does not already explain (not admitted, a
    /// tampered Secret, no room left, ...). Domains still waiting for DNS
    /// verification are not counted.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub domains_left_out: i32,

    /// The first of those MailDomains, by name, and why each is left out.
    /// Each one's `RelayAccepted` condition says the same.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    pub left_out: Vec<LeftOutDomain>,
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

/// A MailDomain a relay does not serve.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeftOutDomain {
    /// `namespace/name` of the MailDomain.
    pub mail_domain: String,
    /// Its domain.
    pub domain: String,
    /// The reason, as in its `RelayAccepted` condition.
    pub reason: String,
}

fn default_replicas() -> i32 {
    2
}

fn default_listener_port() -> u16 {
    587
}

fn default_upstream_port() -> u16 {
    25
}

fn default_max_message_bytes() -> u64 {
    25 * 1024 * 1024
}

fn default_max_recipients() -> u32 {
    100
}

fn default_max_connections() -> u32 {
    1000
}

fn default_messages_per_minute() -> u32 {
    600
}

fn default_max_unauthenticated_connections() -> u32 {
    100
}

fn default_max_unauthenticated_connections_per_source() -> u32 {
    10
}

fn default_max_connections_per_tenant() -> u32 {
    100
}

fn default_max_buffered_bytes_per_tenant() -> u64 {
    100 * 1024 * 1024
}

impl AllowedNamespaces {
    /// Whether a MailDomain in `namespace` (with these labels) may use a
    /// relay in `relay_namespace`. `Err` says why not, for the tenant.
    pub fn admits(
        &self,
        relay_namespace: &str,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Result<(), String> {
        match self.from {
            NamespacesFrom::All => Ok(()),
            NamespacesFrom::Same if namespace == relay_namespace => Ok(()),
            NamespacesFrom::Same => Err(format!(
                "the relay admits only MailDomains in its own namespace {relay_namespace}"
            )),
            NamespacesFrom::Selector => {
                let selector = self
                    .selector
                    .as_ref()
                    .ok_or_else(|| "the relay's namespace selector is empty".to_string())?;
                if selector_matches(selector, labels) {
                    Ok(())
                } else {
                    Err(format!(
                        "namespace {namespace} does not match the relay's allowedNamespaces selector; ask the platform team to label it"
                    ))
                }
            }
        }
    }
}

/// Kubernetes label-selector semantics: every matchLabels pair and every
/// matchExpressions requirement must hold.
fn selector_matches(
    selector: &LabelSelector,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions = selector.match_expressions.iter().flatten().all(|req| {
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" => labels.get(&req.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&req.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&req.key),
            "DoesNotExist" => !labels.contains_key(&req.key),
            _ => false,
        }
    });
    pairs && expressions
}

impl Default for Listener {
    fn default() -> Self {
        Self {
            port: default_listener_port(),
            tls_secret_name: None,
            allow_plaintext_auth: false,
        }
    }
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_message_bytes: default_max_message_bytes(),
            max_recipients: default_max_recipients(),
            max_connections: default_max_connections(),
            messages_per_minute: default_messages_per_minute(),
            max_unauthenticated_connections: default_max_unauthenticated_connections(),
            max_unauthenticated_connections_per_source:
                default_max_unauthenticated_connections_per_source(),
            max_connections_per_tenant: default_max_connections_per_tenant(),
            max_buffered_bytes_per_tenant: default_max_buffered_bytes_per_tenant(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn allowed(value: serde_json::Value) -> AllowedNamespaces {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn namespaces_are_admitted_as_gateway_listeners_do() {
        let labels = BTreeMap::from([("mailauth.dev/relay".to_string(), "shared".to_string())]);
        let none = BTreeMap::new();
        let same = allowed(serde_json::json!({}));
        assert!(same.admits("mail", "mail", &none).is_ok());
        assert!(same.admits("mail", "tenant", &none).is_err());
        assert!(
            allowed(serde_json::json!({"from": "All"}))
                .admits("mail", "tenant", &none)
                .is_ok()
        );
        let by_label = allowed(
            serde_json::json!({"from": "Selector", "selector": {"matchLabels": {"mailauth.dev/relay": "shared"}}}),
        );
        assert!(by_label.admits("mail", "tenant", &labels).is_ok());
        assert!(
            by_label
                .admits("mail", "tenant", &none)
                .unwrap_err()
                .contains("does not match")
        );
        let by_expr = allowed(
            serde_json::json!({"from": "Selector", "selector": {"matchExpressions": [
            {"key": "mailauth.dev/relay", "operator": "In", "values": ["shared", "bulk"]}]}}),
        );
        assert!(by_expr.admits("mail", "tenant", &labels).is_ok());
        assert!(by_expr.admits("mail", "tenant", &none).is_err());
    }
}
