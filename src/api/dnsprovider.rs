//! `DNSProvider`: how the operator may write DNS records, and which zones it
//! may write, defined by whoever holds the DNS credentials.
//!
//! A tenant defines one in its own namespace with its own credentials ("give
//! us access to your DNS"); a platform team offers one to admitted
//! namespaces, limited to named zones. A MailDomain selects one with
//! `spec.dns.providerRef`; without one, publishing stays manual.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::maildomain::{dns_label_pattern, domain_pattern};
use super::mailrelay::AllowedNamespaces;

/// Where and how DNS records are written.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailauth.dev",
    version = "v1alpha1",
    kind = "DNSProvider",
    doc = "Where the operator writes a domain's DNS records (RFC 2136 with TSIG, or external-dns DNSEndpoint objects) and which zones it may write.",
    plural = "dnsproviders",
    shortname = "dnsp",
    category = "mailauth",
    namespaced,
    printcolumn = r#"{"name":"Zones","type":"string","jsonPath":".spec.zones"}"#,
    printcolumn = r#"{"name":"Server","type":"string","jsonPath":".spec.rfc2136.server"}"#,
    printcolumn = r#"{"name":"Namespaces","type":"string","jsonPath":".spec.allowedNamespaces.from"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.rfc2136) != has(self.externalDNS)").message("set exactly one of rfc2136 and externalDNS"))]
#[x_kube(validation = kube::core::Rule::new("!has(self.dkimDelegationZone) || self.dkimDelegationZone in self.zones").message("must be one of zones").field_path(".dkimDelegationZone"))]
pub struct DNSProviderSpec {
    /// The zones this provider may write, such as `acme.example`. A record
    /// is written only at a name inside one of them (and inside the
    /// MailDomain's own domain); updates name the longest one that holds
    /// the record. A shared provider opens every zone to every admitted
    /// namespace: to serve several tenants from one DNS server, define one
    /// DNSProvider per tenant.
    #[schemars(length(min = 1, max = 50), inner(length(max = 253)))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self.all(z, z.matches('", domain_pattern!(), "'))")).message("each zone must be a lowercase domain name such as acme.example, without a trailing dot"))]
    pub zones: Vec<String>,

    /// Dynamic updates (RFC 2136) signed with TSIG, to any authoritative
    /// server that takes them (BIND, Knot, PowerDNS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rfc2136: Option<Rfc2136>,

    /// `externaldns.k8s.io/v1alpha1` DNSEndpoint objects, written in this
    /// provider's namespace for external-dns (`--source=crd`) to publish.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "externalDNS"
    )]
    pub external_dns: Option<ExternalDns>,

    /// Which namespaces' MailDomains may use this provider: `Same` (default:
    /// only this namespace), `All`, or `Selector`.
    #[serde(default)]
    pub allowed_namespaces: AllowedNamespaces,

    /// A zone among `zones` that hosts delegated DKIM records: a MailDomain
    /// with `spec.dkim.delegation` naming this provider gets its key
    /// records at `<selector>.<label>.<zone>`, where the label is unique to
    /// the MailDomain (a hash of its namespace, name and domain), so no
    /// MailDomain can write another's. Dedicate the zone to this use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 200))]
    #[serde(rename = "dkimDelegationZone")]
    pub dkim_delegation_zone: Option<String>,

    /// TTL of the records written, in seconds (default 300). A delegated
    /// key waits at least this long after its record is seen through the
    /// tenant's CNAME before it signs, since its selector was used before.
    #[serde(default = "default_ttl")]
    #[schemars(range(min = 30, max = 86400))]
    pub ttl: u32,
}

/// An RFC 2136 server and its TSIG key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Rfc2136 {
    /// The primary server, as `address:port` (`192.0.2.53:53`,
    /// `[2001:db8::53]:53`). Updates go over TCP.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^([0-9.]+|\\\\[[0-9a-fA-F:.]+\\\\]):[0-9]{1,5}$')").message("must be an IP address and port such as 192.0.2.53:53 or [2001:db8::53]:53"))]
    pub server: String,

    /// The TSIG key's name, as the server knows it.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9])?$')").message("must be a TSIG key name such as mailauth-key"))]
    pub tsig_key_name: String,

    /// The TSIG algorithm: `hmac-sha256` (default), `hmac-sha384` or
    /// `hmac-sha512`.
    #[serde(default)]
    pub tsig_algorithm: TsigAlgorithm,

    /// The Secret, in this provider's namespace, holding the base64 TSIG
    /// secret (as `keymgr` or `tsig-keygen` print it).
    pub tsig_secret_ref: SecretKeyRef,
}

/// A key of a Secret in the provider's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// The Secret's name.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self.matches('", dns_label_pattern!(), "')")).message("must be the name of a Secret: lowercase letters, digits and inner hyphens"))]
    pub name: String,
    /// The key in the Secret (default `secret`).
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A TSIG MAC algorithm.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum TsigAlgorithm {
    #[default]
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
    #[serde(rename = "hmac-sha384")]
    HmacSha384,
    #[serde(rename = "hmac-sha512")]
    HmacSha512,
}

/// external-dns settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ExternalDns {
    /// Labels put on every DNSEndpoint, for external-dns's
    /// `--label-filter`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn default_ttl() -> u32 {
    300
}

fn default_secret_key() -> String {
    "secret".into()
}

impl DNSProviderSpec {
    /// An externalDNS provider for `zones`, for unit tests.
    #[cfg(test)]
    pub fn for_zones(zones: &[&str]) -> Self {
        Self {
            zones: zones.iter().map(|z| z.to_string()).collect(),
            rfc2136: None,
            external_dns: Some(ExternalDns::default()),
            allowed_namespaces: AllowedNamespaces::default(),
            dkim_delegation_zone: None,
            ttl: 300,
        }
    }

    /// The longest granted zone that holds `name`, if any.
    pub fn zone_of(&self, name: &str) -> Option<&str> {
        self.zones
            .iter()
            .filter(|zone| name == zone.as_str() || name.ends_with(&format!(".{zone}")))
            .max_by_key(|zone| zone.len())
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider(zones: &[&str]) -> DNSProviderSpec {
        DNSProviderSpec::for_zones(zones)
    }

    #[test]
    fn a_name_belongs_to_the_longest_granted_zone_that_holds_it() {
        let p = provider(&["example", "acme.example", "mail.acme.example"]);
        assert_eq!(p.zone_of("acme.example"), Some("acme.example"));
        assert_eq!(
            p.zone_of("s1._domainkey.mail.acme.example"),
            Some("mail.acme.example")
        );
        assert_eq!(p.zone_of("_dmarc.acme.example"), Some("acme.example"));
    }

    #[test]
    fn a_name_that_only_ends_like_a_zone_is_outside_it() {
        let p = provider(&["acme.example"]);
        assert_eq!(p.zone_of("evilacme.example"), None);
        assert_eq!(p.zone_of("globex.example"), None);
        assert_eq!(p.zone_of("example"), None);
    }
}
