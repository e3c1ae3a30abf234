//! DKIM keys: generation, selectors and the rotation state machine.
//!
//! This is pure core: no cluster, no network, no clock. Time comes in as a
//! `jiff::Timestamp`, DNS results and the Secret's contents come in as plain
//! data, and the controller carries out what [`rotation::plan`] decides.
//!
//! - [`keys`]: generating key pairs (slow for RSA: run on a blocking pool),
//!   the DKIM TXT value, and loading a stored key as a signer for the relay.
//! - [`selector`]: unique, never reused selector names such as `ma20261126a`.
//! - [`rotation`]: Pending → Active → Retiring → Retired, as one function.

pub mod keys;
pub mod rotation;
pub mod selector;

pub use keys::{
    GeneratedKey, KeyError, NewKey, PrivateKeyPem, dkim_txt_value, generate, public_key_from_pem,
    signing_key_from_pem, split_txt,
};
pub use rotation::{
    DiscardReason, DnsVerdict, GenerationReason, RotationError, RotationEvent, RotationInput,
    RotationPlan, plan,
};
pub use selector::{SLOTS, SelectorError, selectors_for_generation, slot_of, slot_selectors};
