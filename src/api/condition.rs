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
            Self::Configured => "Configured",
        }
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
