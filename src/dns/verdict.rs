//! The verdict every record check ends in.

use serde::Serialize;

use crate::api::RecordState;

/// What DNS says about one record we need.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state")]
pub enum Verdict {
    /// Published as needed.
    Verified,
    /// DNS positively answered that there is no such record (NXDOMAIN or no
    /// record of the type).
    Missing { reason: String },
    /// A record is there, but it is not what we need.
    Mismatch {
        /// What DNS holds.
        found: String,
        /// Why it does not do, for the tenant to fix.
        problem: String,
    },
    /// We could not find out (timeout, SERVFAIL, REFUSED, network): never
    /// read this as missing.
    Error { message: String },
}

impl Verdict {
    pub fn is_verified(&self) -> bool {
        matches!(self, Self::Verified)
    }

    /// The state shown in `status.records[]`.
    pub fn record_state(&self) -> RecordState {
        match self {
            Self::Verified => RecordState::Verified,
            Self::Missing { .. } => RecordState::Missing,
            Self::Mismatch { .. } => RecordState::Mismatch,
            Self::Error { .. } => RecordState::Error,
        }
    }

    /// One line for people: the state and what to do about it.
    pub fn summary(&self) -> String {
        match self {
            Self::Verified => "verified".to_string(),
            Self::Missing { reason } => format!("missing: {reason}"),
            Self::Mismatch { found, problem } => format!("mismatch: {problem} (found: {found})"),
            Self::Error { message } => format!("error: {message}"),
        }
    }
}
