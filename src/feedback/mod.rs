//! What comes back to the platform about the mail it sent: bounces
//! (RFC 3464 delivery status notifications), complaints (RFC 5965 ARF
//! feedback reports) and DMARC aggregate reports (RFC 7489), read from one
//! received message; and the VERP envelope sender whose authenticated tag
//! ties a bounce or a complaint to the tenant domain and the recipient it is
//! about ([`verp`]).
//!
//! Everything here is pure and bounded: it takes bytes from strangers, so a
//! message is refused above [`MAX_MESSAGE_BYTES`], every parser returns an
//! error rather than panicking on any input (the fuzz tests feed it
//! arbitrary bytes and mutated reports), and nothing is recorded by the
//! caller before [`verp::VerpKey::verify`] has checked the tag.
//!
//! ARF and DMARC aggregate parsing is mail-auth's (the crate already signs
//! and verifies for us); DSNs are parsed here because no maintained crate
//! parses RFC 3464 `message/delivery-status` fields (mail-parser gives the
//! MIME structure, which we use).

pub mod aggregate;
pub mod dsn;
pub mod verp;

pub use aggregate::{AggregateSummary, FailingSource};
pub use dsn::{Outcome, RecipientStatus};

/// The largest message read: aggregate reports of large receivers are
/// compressed well below this.
pub const MAX_MESSAGE_BYTES: usize = 10 * 1024 * 1024;

/// What a received message reports.
#[derive(Clone, Debug, PartialEq)]
pub enum Feedback {
    /// A delivery status notification: one status per recipient.
    Bounce(Vec<RecipientStatus>),
    /// A feedback report (abuse complaint and the like).
    Complaint(Complaint),
    /// A DMARC aggregate report.
    Aggregate(AggregateSummary),
}

/// An ARF report, reduced to what suppression and reputation need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Complaint {
    /// `abuse`, `fraud`, `not-spam`, `virus`, `other`, ...
    pub feedback_type: String,
    /// The envelope sender of the reported message: our VERP address, whose
    /// tag must verify before the complaint counts.
    pub original_mail_from: Option<String>,
    /// The recipient who complained.
    pub original_rcpt_to: Option<String>,
}

/// Why a message could not be read as feedback.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FeedbackError {
    #[error("the message is larger than {MAX_MESSAGE_BYTES} bytes")]
    TooLarge,
    #[error("not a delivery status notification, feedback report or DMARC aggregate report")]
    NotFeedback,
    #[error("malformed delivery status notification: {0}")]
    Dsn(#[from] dsn::DsnError),
}

/// Reads a received message as the feedback it carries.
pub fn read(message: &[u8]) -> Result<Feedback, FeedbackError> {
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(FeedbackError::TooLarge);
    }
    match dsn::parse_dsn(message) {
        Ok(statuses) => return Ok(Feedback::Bounce(statuses)),
        Err(dsn::DsnError::NotADsn) => {}
        Err(error) => return Err(error.into()),
    }
    if let Ok(report) = mail_auth::report::Feedback::parse_rfc5322(message) {
        return Ok(Feedback::Complaint(Complaint {
            feedback_type: format!("{:?}", report.feedback_type()).to_ascii_lowercase(),
            original_mail_from: report.original_mail_from().map(dsn::address_of),
            original_rcpt_to: report.original_rcpt_to().map(dsn::address_of),
        }));
    }
    if let Ok(report) = mail_auth::report::Report::parse_rfc5322(message, MAX_MESSAGE_BYTES) {
        return Ok(Feedback::Aggregate(AggregateSummary::of(&report)));
    }
    Err(FeedbackError::NotFeedback)
}

#[cfg(test)]
mod fuzz;
