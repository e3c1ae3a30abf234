//! `MailDomain`: one client domain whose mail the platform signs and sends.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::condition::Condition;
use super::duration::Duration;

/// A lowercase FQDN: labels of 1-63 letters, digits and inner hyphens, at
/// least two labels, a top-level label that starts with a letter (so IP
/// literals are refused), no trailing dot, no wildcard.
/// (`[.]` rather than an escaped dot, so the text needs no escaping inside
/// a CEL string literal.)
macro_rules! domain_pattern {
    () => {
        "^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?[.])+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$"
    };
}

/// CEL: the domain is not a well-known mailbox provider's domain (nor a
/// subdomain of one). `hotmail.*`-style families are matched with any
/// country suffix of one or two labels.
macro_rules! freemail_rule {
    () => {
        concat!(
            "!['gmail.com', 'googlemail.com', 'outlook.com', 'live.com', 'msn.com', ",
            "'icloud.com', 'me.com', 'aol.com', 'web.de', 'proton.me', 'protonmail.com', ",
            "'mail.ru', 'zoho.com'].exists(d, self == d || self.endsWith('.' + d)) && ",
            "!self.matches('(^|[.])(hotmail|yahoo|gmx|yandex)([.][a-z]{2,3}){1,2}$')"
        )
    };
}

/// One or more DNS labels relative to a domain, such as `bounce`.
macro_rules! relative_name_pattern {
    () => {
        "^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?[.])*[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    };
}

/// A DNS-1123 label (names of Kubernetes objects such as Services).
macro_rules! dns_label_pattern {
    () => {
        "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
    };
}
pub(crate) use {dns_label_pattern, domain_pattern};

/// CEL: the number of hours in a `<n>d`/`<n>h` duration string `x`.
macro_rules! cel_hours {
    ($x:literal) => {
        concat!(
            "(int(",
            $x,
            ".substring(0, ",
            $x,
            ".size() - 1)) * (",
            $x,
            ".endsWith('d') ? 24 : 1))"
        )
    };
}

/// One client domain: DKIM keys generated and rotated for it, the DNS records
/// it must publish and whether they are verified, and (with `relayRef`) a
/// signing relay that sends its mail.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mailauth.dev",
    version = "v1alpha1",
    kind = "MailDomain",
    doc = "One client domain: its DKIM keys, the DNS records it must publish and whether they are verified, and the relay that signs and sends its mail.",
    plural = "maildomains",
    shortname = "md",
    category = "mailauth",
    namespaced,
    status = "MailDomainStatus",
    printcolumn = r#"{"name":"Domain","type":"string","jsonPath":".spec.domain"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"DKIM","type":"string","jsonPath":".status.conditions[?(@.type==\"DKIMVerified\")].status"}"#,
    printcolumn = r#"{"name":"SPF","type":"string","jsonPath":".status.conditions[?(@.type==\"SPFVerified\")].status"}"#,
    printcolumn = r#"{"name":"DMARC","type":"string","jsonPath":".status.conditions[?(@.type==\"DMARCVerified\")].status"}"#,
    printcolumn = r#"{"name":"Selector","type":"string","jsonPath":".status.dkim.activeSelector"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainSpec {
    /// The mail domain, as it appears after the @ in addresses: a lowercase
    /// fully-qualified name such as `acme.example`, without a trailing dot.
    /// Immutable: keys, verified records and the domain's claim belong to
    /// this domain, so another domain needs a new MailDomain.
    #[schemars(length(max = 253))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self.matches('", domain_pattern!(), "')")).message("must be a lowercase fully-qualified domain name such as acme.example: labels of 1-63 letters, digits or inner hyphens separated by dots, no trailing dot, no wildcard, no IP address"))]
    #[x_kube(validation = kube::core::Rule::new("self == oldSelf").message("is immutable: the keys, verified records and claim of a MailDomain belong to its domain; create a new MailDomain for another domain"))]
    #[x_kube(validation = kube::core::Rule::new(freemail_rule!()).message("is a mailbox provider's domain (Gmail, Outlook, Yahoo, ...): the service signs and sends only for the client's own domain; use a domain the client owns"))]
    pub domain: String,

    /// The MailRelay that sends this domain's mail. Without it the operator
    /// still manages the keys and reports the DNS records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_ref: Option<RelayRef>,

    /// How DKIM keys are generated and rotated.
    #[serde(default)]
    pub dkim: DkimSpec,

    /// The DMARC policy the operator recommends publishing at `_dmarc.<domain>`.
    #[serde(default)]
    pub dmarc: DmarcSpec,

    /// A subdomain of `domain` to use as the envelope sender (MAIL FROM,
    /// where bounces go), for example `bounce` for `bounce.acme.example`.
    /// With it SPF aligns with the From domain too. Leave unset to keep the
    /// sender's own address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 190))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self.matches('", relative_name_pattern!(), "')")).message("must be one or more lowercase DNS labels relative to the domain, such as bounce or mail.bounce"))]
    pub return_path: Option<String>,

    /// Sending limit for this domain. It can only lower the relay's own
    /// per-domain limit, never raise it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// How the domain's DNS records are published. Without `providerRef`
    /// the tenant publishes them by hand, as `status.records` lists them.
    #[serde(default, skip_serializing_if = "DnsSpec::is_manual")]
    pub dns: DnsSpec,

    /// What happens to the Secret holding the private keys when this
    /// MailDomain is deleted: `Delete` (default) removes it, `Retain` keeps
    /// it (without an owner) so the keys can be reused.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// How DNS records are published.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DnsSpec {
    /// The DNSProvider that writes this domain's records: DKIM always,
    /// DMARC and SPF only where the domain has none (see `manageSPF`), the
    /// return path's SPF. Records it did not create are never changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_ref: Option<ProviderRef>,

    /// Whether the operator owns the domain's SPF record. By default it
    /// publishes one only where the domain has none, and otherwise reports
    /// the merged record to publish.
    #[serde(
        default,
        rename = "manageSPF",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub manage_spf: bool,
}

impl DnsSpec {
    fn is_manual(&self) -> bool {
        self == &Self::default()
    }
}

/// A reference to a DNSProvider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProviderRef {
    /// Name of the DNSProvider.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self.matches('", dns_label_pattern!(), "')")).message("must be the name of a DNSProvider: lowercase letters, digits and inner hyphens"))]
    pub name: String,
    /// Namespace of the DNSProvider; defaults to this MailDomain's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// A reference to a MailRelay.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RelayRef {
    /// Name of the MailRelay.
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self.matches('", dns_label_pattern!(), "')")).message("must be the name of a MailRelay: lowercase letters, digits and inner hyphens"))]
    pub name: String,
    /// Namespace of the MailRelay; defaults to this MailDomain's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// DKIM key settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DkimSpec {
    /// `RSA` (default; every receiver verifies it), `Ed25519` (small and
    /// fast, RFC 8463, not yet verified everywhere), or `Dual`: sign with
    /// both, so receivers use the best one they understand.
    #[serde(default)]
    pub algorithm: DkimAlgorithm,

    /// RSA modulus size in bits: 2048 (default), 3072 or 4096. Smaller keys
    /// are refused. Ignored for `Ed25519`.
    #[serde(default = "default_rsa_key_size")]
    #[schemars(extend("enum" = [2048, 3072, 4096]))]
    pub rsa_key_size: u32,

    /// The start of every selector name. Selectors are `<prefix><yyyymmdd>
    /// <letter>`, e.g. `ma20261126a`, and are never reused.
    #[serde(default = "default_selector_prefix")]
    #[schemars(length(min = 1, max = 20))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[a-z][a-z0-9]*$')").message("must start with a lowercase letter and contain only lowercase letters and digits"))]
    pub selector_prefix: String,

    /// When keys are replaced.
    #[serde(default)]
    pub rotation: RotationSpec,

    /// Delegated DKIM: the key records live in a zone the platform
    /// controls, published through the named DNSProvider, and the tenant
    /// publishes two CNAMEs once (`status.records` lists them). Keys then
    /// alternate between two fixed selectors, `<prefix>1` and `<prefix>2`,
    /// and rotate with no change to the tenant's DNS ever again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation: Option<DkimDelegation>,
}

/// Where delegated DKIM records are published.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DkimDelegation {
    /// A DNSProvider with `dkimDelegationZone` set, that admits this
    /// namespace.
    pub provider_ref: ProviderRef,
}

/// Key rotation settings.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new(concat!("self.period == 'never' || ", cel_hours!("self.overlap"), " < ", cel_hours!("self.period"))).message("overlap must be shorter than the rotation period").field_path(".overlap"))]
pub struct RotationSpec {
    /// How long a key signs before it is replaced: whole days or hours such
    /// as `90d` (default) or `36h`, at least `1d`; or `never`. To rotate now,
    /// set the annotation `mailauth.dev/rotate-requested` to a new value.
    #[serde(default = "default_rotation_period")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = kube::core::Rule::new(concat!("self == 'never' || (self.matches('^[1-9][0-9]{0,5}[dh]$') && ", cel_hours!("self"), " >= 24)")).message("must be a whole number of days or hours of at least 1d, such as 90d or 36h, or never"))]
    pub period: String,

    /// How long a replaced key stays published in DNS so that mail signed
    /// just before the rotation still verifies: `7d` by default. Must be
    /// shorter than `period`.
    #[serde(default = "default_rotation_overlap")]
    #[schemars(length(max = 8))]
    #[x_kube(validation = kube::core::Rule::new("self.matches('^[1-9][0-9]{0,5}[dh]$')").message("must be a whole number of days or hours such as 7d or 36h"))]
    pub overlap: String,
}

/// The DKIM key algorithm(s) a domain signs with.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum DkimAlgorithm {
    #[default]
    #[serde(rename = "RSA")]
    Rsa,
    Ed25519,
    Dual,
}

/// The DMARC policy to recommend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DmarcSpec {
    /// What receivers should do with mail that fails DMARC: `none`
    /// (default: monitor only), `quarantine` or `reject`.
    #[serde(default)]
    pub policy: DmarcPolicy,

    /// The policy for subdomains, when it differs from `policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subdomain_policy: Option<DmarcPolicy>,

    /// Addresses that receive daily aggregate reports (`rua`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(length(max = 254)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(a, a.matches('^[^@ ;,]+@[^@ ;,]+$'))").message("each entry must be a plain email address such as dmarc@acme.example"))]
    pub aggregate_reports_to: Vec<String>,

    /// Addresses that receive per-message failure reports (`ruf`); many
    /// receivers never send them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10), inner(length(max = 254)))]
    #[x_kube(validation = kube::core::Rule::new("self.all(a, a.matches('^[^@ ;,]+@[^@ ;,]+$'))").message("each entry must be a plain email address such as dmarc@acme.example"))]
    pub failure_reports_to: Vec<String>,
}

/// A DMARC policy (`p=`).
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
#[serde(rename_all = "lowercase")]
pub enum DmarcPolicy {
    #[default]
    None,
    Quarantine,
    Reject,
}

/// A sending limit.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Messages per minute this domain may send through its relay.
    #[schemars(range(min = 1, max = 1000000))]
    pub messages_per_minute: u32,
}

/// What to do with the key Secret when the MailDomain is deleted.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq,
)]
pub enum DeletionPolicy {
    #[default]
    Delete,
    Retain,
}

fn default_rsa_key_size() -> u32 {
    2048
}

fn default_selector_prefix() -> String {
    "ma".into()
}

fn default_rotation_period() -> String {
    "90d".into()
}

fn default_rotation_overlap() -> String {
    "7d".into()
}

impl Default for DkimSpec {
    fn default() -> Self {
        Self {
            algorithm: DkimAlgorithm::default(),
            rsa_key_size: default_rsa_key_size(),
            selector_prefix: default_selector_prefix(),
            rotation: RotationSpec::default(),
            delegation: None,
        }
    }
}

impl Default for RotationSpec {
    fn default() -> Self {
        Self {
            period: default_rotation_period(),
            overlap: default_rotation_overlap(),
        }
    }
}

impl RotationSpec {
    /// The rotation period, or `None` for `never`.
    pub fn period(&self) -> Result<Option<Duration>, super::DurationError> {
        if self.period == "never" {
            return Ok(None);
        }
        self.period.parse().map(Some)
    }

    pub fn overlap(&self) -> Result<Duration, super::DurationError> {
        self.overlap.parse()
    }
}

/// What the operator observed and decided about a MailDomain.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MailDomainStatus {
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// `Ready`, `KeysReady`, `DKIMVerified`, `SPFVerified`, `DMARCVerified`,
    /// `RelayAccepted` and `DomainConflict`. A condition that is not True
    /// says in its message what to do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The DKIM keys and their rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dkim: Option<DkimStatus>,

    /// Every DNS record this domain needs, and whether it is published.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub records: Vec<DnsRecordStatus>,

    /// The records the operator wrote through the DNSProvider (and so may
    /// change or remove): nothing else is ever touched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<PublishedRecord>,

    /// When the DNS records were last checked. Refreshed when a result
    /// changes, and otherwise at most once a day.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checked: Option<Time>,

    /// The Secret, in this namespace, that holds the private keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_secret: Option<String>,

    /// The Secret, in this namespace, with the SMTP credentials for the relay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,

    /// A salted SHA-256 of the password the operator generated into
    /// `credentialsSecret` (never the password). The relay accepts only this
    /// credential: a password changed in the Secret is not used, and takes
    /// the domain off the relay until the Secret is deleted and regenerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_hash: Option<String>,
}

/// DKIM keys and rotation state.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DkimStatus {
    /// The selector(s) mail is signed with now, comma-separated for `Dual`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_selector: Option<String>,

    /// Every key, newest first: `Pending` (publish its record), `Active`
    /// (signing), `Retiring` (replaced, still published for the overlap),
    /// `Retired` (private key deleted; its record may be removed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = kube::core::ListMerge::Map(vec!["selector".into()]))]
    pub keys: Vec<DkimKeyStatus>,

    /// When the active key is due to be replaced (absent with `never`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation: Option<Time>,

    /// The last value of the `mailauth.dev/rotate-requested` annotation that
    /// was acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotate_requested: Option<String>,

    /// Delegated DKIM: the name under which this domain's key records are
    /// published, `<label>.<dkimDelegationZone>`; the selector `<s>` lives
    /// at `<s>.<delegatedTo>`, which `<s>._domainkey.<domain>` must be a
    /// CNAME to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegated_to: Option<String>,
}

/// One DKIM key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DkimKeyStatus {
    /// The selector: the record lives at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// `RSA` or `Ed25519`.
    pub algorithm: KeyAlgorithm,
    /// RSA modulus size in bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// Where the key is in its life.
    pub state: KeyState,
    /// Keys generated together (a `Dual` pair) share a generation number.
    pub generation: u32,
    /// The public key as published in the record's `p=` tag (base64).
    pub public_key: String,
    /// When the key was generated.
    pub created_at: Time,
    /// Delegated keys only: when its record was first seen through the
    /// tenant's CNAME. It starts signing once the provider's TTL has passed
    /// since, so no resolver still holds the slot's earlier record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified_at: Option<Time>,
    /// When the key started signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activated_at: Option<Time>,
    /// When the key was replaced and stopped signing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retiring_at: Option<Time>,
    /// When the private key was deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<Time>,
}

/// A DKIM key algorithm.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    #[serde(rename = "RSA")]
    Rsa,
    Ed25519,
}

/// The life of a DKIM key.
#[derive(
    schemars::JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
)]
pub enum KeyState {
    /// Generated; its record must be published before it can sign.
    Pending,
    /// Its record is verified; the relay signs with it.
    Active,
    /// Replaced; still published for the overlap, no longer signing.
    Retiring,
    /// Private key deleted; its DNS record may be removed.
    Retired,
}

/// One DNS record the domain needs.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DnsRecordStatus {
    /// The fully-qualified owner name.
    pub name: String,
    /// The record type (`TXT`, `MX`, `CNAME`).
    #[serde(rename = "type")]
    pub type_: String,
    /// The record value, whole.
    pub value: String,
    /// The value as strings of at most 255 bytes, for zone files and DNS
    /// consoles that need them split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub strings: Vec<String>,
    /// What the record is for (`DKIM`, `SPF`, `DMARC`, `ReturnPath`).
    pub purpose: RecordPurpose,
    /// `Verified`, `Missing`, `Mismatch` (see `found`), `Error` (see
    /// `error`), `Unchecked` (not looked up yet), or `Removable` (a retired
    /// key's record that may be deleted).
    pub state: RecordState,
    /// What DNS holds instead, when `Mismatch`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub found: Option<String>,
    /// The DNS error, when `Error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Since when the record has been in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// A record the operator wrote.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PublishedRecord {
    /// The fully-qualified owner name.
    pub name: String,
    /// The record type (`TXT`).
    #[serde(rename = "type")]
    pub type_: String,
    /// The value written, whole.
    pub value: String,
    /// The zone it was written to.
    pub zone: String,
    /// The DNSProvider (`namespace/name`) that wrote it.
    pub provider: String,
}

/// What a DNS record is for.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordPurpose {
    /// A DKIM public key at `<selector>._domainkey.<domain>`.
    #[serde(rename = "DKIM")]
    Dkim,
    /// The domain's SPF policy.
    #[serde(rename = "SPF")]
    Spf,
    /// The domain's DMARC policy at `_dmarc.<domain>`.
    #[serde(rename = "DMARC")]
    Dmarc,
    /// The SPF (and MX) of the custom MAIL FROM domain.
    ReturnPath,
}

impl std::fmt::Display for RecordPurpose {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Dkim => "DKIM",
            Self::Spf => "SPF",
            Self::Dmarc => "DMARC",
            Self::ReturnPath => "ReturnPath",
        })
    }
}

/// Whether a DNS record is published as expected.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RecordState {
    Unchecked,
    Verified,
    Missing,
    Mismatch,
    Error,
    Removable,
}

/// The annotation that requests an immediate key rotation when set to a new
/// value.
pub const ROTATE_ANNOTATION: &str = "mailauth.dev/rotate-requested";
