//! Standard Kubernetes-style conditions, as a list-map keyed by `type`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One aspect of a resource's state, in the shape `kubectl wait
/// --for=condition=...`, Argo CD and Flux understand.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Which aspect this condition describes.
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// A CamelCase word for the cause, stable enough to alert on.
    pub reason: String,
    /// What happened and, when not True, what to do about it.
    pub message: String,
    /// The `metadata.generation` this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// When `status` last changed.
    pub last_transition_time: Time,
}

/// The conditions this operator reports.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum ConditionType {
    /// The domain can send: keys ready, the active selector verified in DNS,
    /// and the relay configured when `relayRef` is set.
    Ready,
    /// Every key the domain signs with exists and its private key is stored.
    KeysReady,
    /// The active DKIM selector's TXT record is published and carries our key.
    #[serde(rename = "DKIMVerified")]
    DkimVerified,
    /// The SPF record authorizes the relay.
    #[serde(rename = "SPFVerified")]
    SpfVerified,
    /// A valid DMARC record is published.
    #[serde(rename = "DMARCVerified")]
    DmarcVerified,
    /// The referenced relay admits this domain and serves it.
    RelayAccepted,
    /// Another MailDomain verified this domain first.
    DomainConflict,
    /// The DNSProvider of `spec.dns.providerRef` wrote every record the
    /// operator publishes, and the resolver sees them.
    #[serde(rename = "DNSPublished")]
    DnsPublished,
    /// (MailRelay) the relay's Deployment, Service and config are rendered.
    Configured,
}

impl ConditionType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::KeysReady => "KeysReady",
            Self::DkimVerified => "DKIMVerified",
            Self::SpfVerified => "SPFVerified",
            Self::DmarcVerified => "DMARCVerified",
            Self::RelayAccepted => "RelayAccepted",
            Self::DomainConflict => "DomainConflict",
            Self::DnsPublished => "DNSPublished",
            Self::Configured => "Configured",
        }
    }
}

/// Why a condition is what it is: the `reason` of conditions this operator
/// writes. On the wire it is the CamelCase word (stable enough to alert on);
/// in code it is this type, so a reason is never matched by its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    // Ready
    Ready,
    KeysNotReady,
    DkimNotVerified,
    DomainConflict,
    RelayNotAccepted,
    ReconcileFailed,
    // KeysReady
    KeysStored,
    Generating,
    SecretNotOwned,
    ActiveKeyMissing,
    ActiveKeyTampered,
    KeyGenerationFailed,
    // record verdicts (DKIMVerified, SPFVerified, DMARCVerified)
    Verified,
    RotationPending,
    RecordMissing,
    RecordMismatch,
    DnsError,
    NotChecked,
    NoKey,
    NoRelay,
    Removable,
    /// A delegated DKIM CNAME is missing or points elsewhere.
    CnameMissing,
    // DomainConflict
    DomainClaimed,
    NoConflict,
    // RelayAccepted
    Accepted,
    RelayNotFound,
    NamespaceNotAllowed,
    NotVerifiedYet,
    Deleting,
    KeySecretProblem,
    CredentialsMissing,
    CredentialsSecretNotOwned,
    CredentialsTampered,
    EntryInvalid,
    ConfigFull,
    // DNSPublished
    Published,
    Publishing,
    ProviderNotFound,
    ProviderNotAllowed,
    ZoneNotGranted,
    BadTsig,
    ZoneNotServed,
    UpdateRefused,
    ForeignRecord,
    PublishFailed,
    // Ready (the domain itself)
    NotOwnDomain,
    // MailRelay
    Rendered,
    UpstreamSecretInvalid,
    DomainsLeftOut,
    Available,
    NoReadyPods,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::KeysNotReady => "KeysNotReady",
            Self::DkimNotVerified => "DKIMNotVerified",
            Self::DomainConflict => "DomainConflict",
            Self::RelayNotAccepted => "RelayNotAccepted",
            Self::ReconcileFailed => "ReconcileFailed",
            Self::KeysStored => "KeysStored",
            Self::Generating => "Generating",
            Self::SecretNotOwned => "SecretNotOwned",
            Self::ActiveKeyMissing => "ActiveKeyMissing",
            Self::ActiveKeyTampered => "ActiveKeyTampered",
            Self::KeyGenerationFailed => "KeyGenerationFailed",
            Self::Verified => "Verified",
            Self::RotationPending => "RotationPending",
            Self::RecordMissing => "RecordMissing",
            Self::RecordMismatch => "RecordMismatch",
            Self::CnameMissing => "CNAMEMissing",
            Self::DnsError => "DNSError",
            Self::NotChecked => "NotChecked",
            Self::NoKey => "NoKey",
            Self::NoRelay => "NoRelay",
            Self::Removable => "Removable",
            Self::DomainClaimed => "DomainClaimed",
            Self::NoConflict => "NoConflict",
            Self::Accepted => "Accepted",
            Self::RelayNotFound => "RelayNotFound",
            Self::NamespaceNotAllowed => "NamespaceNotAllowed",
            Self::NotVerifiedYet => "NotVerifiedYet",
            Self::Deleting => "Deleting",
            Self::KeySecretProblem => "KeySecretProblem",
            Self::CredentialsMissing => "CredentialsMissing",
            Self::CredentialsSecretNotOwned => "CredentialsSecretNotOwned",
            Self::CredentialsTampered => "CredentialsTampered",
            Self::EntryInvalid => "EntryInvalid",
            Self::ConfigFull => "ConfigFull",
            Self::Rendered => "Rendered",
            Self::Published => "Published",
            Self::Publishing => "Publishing",
            Self::ProviderNotFound => "ProviderNotFound",
            Self::ProviderNotAllowed => "ProviderNotAllowed",
            Self::ZoneNotGranted => "ZoneNotGranted",
            Self::BadTsig => "BadTSIG",
            Self::ZoneNotServed => "ZoneNotServed",
            Self::UpdateRefused => "UpdateRefused",
            Self::ForeignRecord => "ForeignRecord",
            Self::PublishFailed => "PublishFailed",
            Self::NotOwnDomain => "NotOwnDomain",
            Self::UpstreamSecretInvalid => "UpstreamSecretInvalid",
            Self::DomainsLeftOut => "DomainsLeftOut",
            Self::Available => "Available",
            Self::NoReadyPods => "NoReadyPods",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status of a condition.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

impl Condition {
    /// A condition computed now from the object at `generation`.
    pub fn new(
        type_: ConditionType,
        status: ConditionStatus,
        reason: Reason,
        message: String,
        generation: Option<i64>,
        now: Time,
    ) -> Self {
        Self {
            type_,
            status,
            reason: reason.as_str().to_string(),
            message,
            observed_generation: generation,
            last_transition_time: now,
        }
    }

    /// Whether this condition's reason is `reason`.
    pub fn has_reason(&self, reason: Reason) -> bool {
        self.reason == reason.as_str()
    }

    /// The condition of this type, if it is present, True, and was
    /// computed for `generation`: the only kind of verdict any decision may
    /// trust. A condition from an older generation describes a spec that no
    /// longer exists.
    pub fn true_at(
        conditions: &[Condition],
        type_: ConditionType,
        generation: Option<i64>,
    ) -> Option<&Condition> {
        Self::find(conditions, type_)
            .filter(|c| c.status == ConditionStatus::True && c.observed_generation == generation)
    }

    /// Sets or replaces the condition of the same type in `conditions`,
    /// keeping `lastTransitionTime` when the status did not change, so that
    /// recomputing the same verdict yields an identical list (no status churn).
    pub fn upsert(conditions: &mut Vec<Condition>, mut new: Condition) {
        match conditions.iter_mut().find(|c| c.type_ == new.type_) {
            Some(existing) => {
                if existing.status == new.status {
                    new.last_transition_time = existing.last_transition_time.clone();
                }
                *existing = new;
            }
            None => {
                conditions.push(new);
                conditions.sort_by_key(|c| c.type_);
            }
        }
    }

    /// The condition of this type, if present.
    pub fn find(conditions: &[Condition], type_: ConditionType) -> Option<&Condition> {
        conditions.iter().find(|c| c.type_ == type_)
    }

    /// Whether the condition of this type is present and True.
    pub fn is_true(conditions: &[Condition], type_: ConditionType) -> bool {
        Self::find(conditions, type_).is_some_and(|c| c.status == ConditionStatus::True)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).unwrap())
    }

    fn cond(status: ConditionStatus, reason: &str, t: i64) -> Condition {
        Condition {
            type_: ConditionType::KeysReady,
            status,
            reason: reason.into(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: at(t),
        }
    }

    #[test]
    fn upsert_keeps_transition_time_when_status_is_unchanged() {
        let mut list = vec![cond(ConditionStatus::True, "Generated", 10)];
        Condition::upsert(&mut list, cond(ConditionStatus::True, "Generated", 99));
        assert_eq!(list[0].last_transition_time, at(10));
        Condition::upsert(&mut list, cond(ConditionStatus::False, "Missing", 120));
        assert_eq!(list[0].last_transition_time, at(120));
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn upsert_keeps_conditions_sorted_by_type() {
        let mut list = vec![cond(ConditionStatus::True, "Generated", 10)];
        let mut ready = cond(ConditionStatus::False, "NotVerified", 10);
        ready.type_ = ConditionType::Ready;
        Condition::upsert(&mut list, ready);
        assert_eq!(list[0].type_, ConditionType::Ready);
        assert!(!Condition::is_true(&list, ConditionType::Ready));
        assert!(Condition::is_true(&list, ConditionType::KeysReady));
    }
}
