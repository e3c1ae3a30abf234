//! The key rotation state machine, as one pure function: [`plan`].
//!
//! A key lives `Pending` (generated, its record must be published) →
//! `Active` (record verified, the relay signs with it) → `Retiring`
//! (replaced, still published for the overlap) → `Retired` (private key
//! deleted, record may be removed). The keys generated together (a `Dual`
//! pair) form a generation and move together.
//!
//! The controller observes (status, annotation, DNS, Secret), calls [`plan`]
//! and carries the plan out. Nothing here reads a clock or the network, so
//! every rule is unit-tested with an injected `now`.
//!
//! The rules that protect mail delivery:
//! - a key starts signing only once its record is verified in DNS, so until
//!   then the old key keeps signing, forever if need be;
//! - an Active key is never replaced or changed because something is wrong
//!   with it; a missing private key is reported, not repaired by surprise;
//! - a DNS answer we could not get ([`DnsVerdict::Unknown`]) changes nothing.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::keys::{NewKey, RSA_KEY_SIZES};
use super::selector::{SLOTS, SelectorError, selectors_for_generation, slot_of, slot_selectors};
use crate::api::{
    DkimAlgorithm, DkimKeyStatus, DkimSpec, DkimStatus, DurationError, KeyAlgorithm, KeyState,
};

/// How long a Retired key stays listed in status, so the tenant sees which
/// record they may delete. Selectors carry their creation date, so dropping
/// the entry cannot lead to a selector being reused.
pub const RETIRED_KEY_RETENTION: SignedDuration = SignedDuration::from_hours(30 * 24);

/// What DNS says about one key's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsVerdict {
    /// The record is published with exactly the expected value.
    Verified,
    /// DNS answered, and the record is absent or different.
    NotVerified,
    /// No usable answer (error, timeout, not checked yet). Never a reason to
    /// change anything.
    Unknown,
}

/// Everything the rotation decision depends on.
#[derive(Clone, Copy, Debug)]
pub struct RotationInput<'a> {
    pub now: Timestamp,
    pub spec: &'a DkimSpec,
    /// The keys in status (`status.dkim.keys`).
    pub keys: &'a [DkimKeyStatus],
    /// The value of the `mailauth.dev/rotate-requested` annotation.
    pub rotate_annotation: Option<&'a str>,
    /// The annotation value last acted on (`status.dkim.rotateRequested`).
    pub rotate_acted_on: Option<&'a str>,
    /// What DNS says per selector; a selector not in the map is `Unknown`.
    pub dns: &'a HashMap<String, DnsVerdict>,
    /// The selectors whose private key is in the keys Secret. Read the
    /// Secret from the API server, not a lagging cache: a Pending key that
    /// looks missing is discarded and regenerated.
    pub private_keys_present: &'a HashSet<String>,
    /// Delegated DKIM (`spec.dkim.delegation`): keys take turns in two
    /// fixed selector slots, and `dns` says what is seen through the
    /// tenant's CNAME.
    pub slots: Option<Slots>,
}

/// How delegated keys use their slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slots {
    /// How long a new key's record must have been seen before the key
    /// signs: the record's TTL. A slot's selector was used before, so a
    /// resolver may still hold its earlier record (or its absence) that
    /// long; signing sooner could make fresh signatures fail.
    pub activation_delay: SignedDuration,
}

impl RotationInput<'_> {
    fn dns_verdict(&self, selector: &str) -> DnsVerdict {
        self.dns
            .get(selector)
            .copied()
            .unwrap_or(DnsVerdict::Unknown)
    }

    fn has_private_key(&self, selector: &str) -> bool {
        self.private_keys_present.contains(selector)
    }
}

/// What the controller must do, and the status that results.
///
/// Carry it out in this order, so a crash at any point is repaired by the
/// next plan: generate the keys in `generate` and store their private keys
/// in the Secret; write the status from [`RotationPlan::status`] with the
/// generated keys; then delete the private keys in `remove_private_keys`.
#[derive(Clone, Debug, PartialEq)]
pub struct RotationPlan {
    /// The keys as they are now, newest generation first. Keys in
    /// `generate` are not in it yet: [`RotationPlan::status`] adds them.
    pub keys: Vec<DkimKeyStatus>,
    /// Keys to generate, all of one new generation.
    pub generate: Vec<NewKey>,
    /// Selectors whose private key must be deleted from the Secret.
    pub remove_private_keys: Vec<String>,
    /// The annotation value acted on, for `status.dkim.rotateRequested`.
    pub rotate_requested: Option<String>,
    /// When the Active generation is due to be replaced; `None` with
    /// `never` or without an Active key. May be in the past while its
    /// replacement waits for DNS.
    pub next_rotation: Option<Timestamp>,
    /// The earliest future time at which planning again changes something
    /// (a rotation falls due, an overlap ends, a Retired key is dropped).
    /// The controller requeues for then.
    pub wake_at: Option<Timestamp>,
    /// The selectors mail is signed with, comma-separated (RSA first), for
    /// `status.dkim.activeSelector`.
    pub active_selector: Option<String>,
    /// What happened, for Kubernetes events.
    pub events: Vec<RotationEvent>,
    /// Active keys whose private key is missing from the Secret: the relay
    /// cannot sign with them. Reported on every plan until fixed.
    pub active_keys_missing: Vec<String>,
}

impl RotationPlan {
    /// `status.dkim` once the keys in `generate` have been generated and
    /// stored: `generated` are their [`GeneratedKey::into_status`] entries.
    ///
    /// [`GeneratedKey::into_status`]: super::keys::GeneratedKey::into_status
    pub fn status(&self, generated: impl IntoIterator<Item = DkimKeyStatus>) -> DkimStatus {
        let mut keys = self.keys.clone();
        keys.extend(generated);
        sort_newest_first(&mut keys);
        DkimStatus {
            active_selector: self.active_selector.clone(),
            keys,
            next_rotation: self.next_rotation.map(Time),
            rotate_requested: self.rotate_requested.clone(),
            delegated_to: None,
        }
    }
}

/// One thing the plan changed or found, about one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotationEvent {
    /// A key is to be generated; its record must then be published.
    Generated {
        selector: String,
        reason: GenerationReason,
    },
    /// The key's record is verified; the relay now signs with it.
    Activated { selector: String },
    /// The key was replaced and stops signing; its record stays published
    /// for the overlap.
    Retiring {
        selector: String,
        replaced_by: String,
    },
    /// The overlap ended; the private key is deleted and the record may be
    /// removed.
    Retired { selector: String },
    /// A Pending key was given up and a replacement generation planned.
    PendingKeyRegenerated {
        selector: String,
        reason: DiscardReason,
    },
    /// An Active key's private key is missing from the Secret.
    ActiveKeyMissing { selector: String },
}

/// Why a new key generation is planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationReason {
    /// The domain has no Active or Pending key.
    NoKey,
    /// The Active key reached the rotation period.
    Age,
    /// The rotate-requested annotation got a new value.
    Requested,
    /// `spec.dkim.algorithm` differs from the Active generation's.
    AlgorithmChanged,
    /// `spec.dkim.rsaKeySize` differs from the Active RSA key's.
    KeySizeChanged,
    /// The Pending generation was discarded and is replaced.
    PendingDiscarded(DiscardReason),
    /// Delegation was turned on (keys move into the slots) or off.
    DelegationChanged,
}

/// Why a Pending generation was discarded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscardReason {
    /// Its private key is missing from the Secret, so it could never sign.
    PrivateKeyMissing,
    /// The spec now asks for another algorithm or key size.
    SpecChanged,
    /// A newer Pending generation exists (only after a manual status edit:
    /// there is never more than one).
    Superseded,
}

impl RotationEvent {
    /// The key the event is about.
    pub fn selector(&self) -> &str {
        match self {
            Self::Generated { selector, .. }
            | Self::Activated { selector }
            | Self::Retiring { selector, .. }
            | Self::Retired { selector }
            | Self::PendingKeyRegenerated { selector, .. }
            | Self::ActiveKeyMissing { selector } => selector,
        }
    }

    /// A CamelCase reason for the Kubernetes event.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Generated { .. } => "KeyGenerated",
            Self::Activated { .. } => "KeyActivated",
            Self::Retiring { .. } => "KeyRetiring",
            Self::Retired { .. } => "KeyRetired",
            Self::PendingKeyRegenerated { .. } => "PendingKeyRegenerated",
            Self::ActiveKeyMissing { .. } => "ActiveKeyMissing",
        }
    }

    /// Whether the event needs a person's attention (a `Warning` event).
    pub fn is_warning(&self) -> bool {
        matches!(
            self,
            Self::ActiveKeyMissing { .. }
                | Self::PendingKeyRegenerated {
                    reason: DiscardReason::PrivateKeyMissing,
                    ..
                }
        )
    }
}

/// The human-readable event message; it says what to do where there is
/// something to do.
impl fmt::Display for RotationEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Generated { selector, reason } => write!(
                f,
                "generated DKIM key {selector} ({reason}); publish its record so it can start signing"
            ),
            Self::Activated { selector } => write!(
                f,
                "DKIM key {selector} is verified in DNS and now signs mail"
            ),
            Self::Retiring {
                selector,
                replaced_by,
            } => write!(
                f,
                "DKIM key {selector} was replaced by {replaced_by}; keep its record published until it is retired"
            ),
            Self::Retired { selector } => write!(
                f,
                "DKIM key {selector} is retired and its private key deleted; its record may be removed"
            ),
            Self::PendingKeyRegenerated { selector, reason } => write!(
                f,
                "pending DKIM key {selector} was discarded ({reason}) and a new key generated; publish the new record instead"
            ),
            Self::ActiveKeyMissing { selector } => write!(
                f,
                "the private key of active DKIM key {selector} is missing from the keys Secret, so mail cannot be signed with it; restore it, or set the annotation mailauth.dev/rotate-requested to a new value to rotate to a new key"
            ),
        }
    }
}

impl fmt::Display for GenerationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoKey => f.write_str("the domain has no key"),
            Self::Age => f.write_str("the active key reached the rotation period"),
            Self::Requested => f.write_str("rotation was requested by annotation"),
            Self::AlgorithmChanged => f.write_str("the algorithm changed"),
            Self::KeySizeChanged => f.write_str("the RSA key size changed"),
            Self::PendingDiscarded(reason) => write!(f, "replaces a pending key: {reason}"),
            Self::DelegationChanged => f.write_str("delegation was turned on or off"),
        }
    }
}

impl fmt::Display for DiscardReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PrivateKeyMissing => "its private key is missing from the keys Secret",
            Self::SpecChanged => "the algorithm, key size or delegation changed",
            Self::Superseded => "a newer pending key exists",
        })
    }
}

/// Why no plan could be made: the spec is invalid. The API server refuses
/// such specs, so this only happens with manifests read from files.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RotationError {
    #[error("spec.dkim.rotation.period: {0}")]
    Period(#[source] DurationError),
    #[error("spec.dkim.rotation.overlap: {0}")]
    Overlap(#[source] DurationError),
    #[error("spec.dkim.rsaKeySize: {0} bits is not supported; use 2048, 3072 or 4096")]
    RsaKeySize(u32),
    #[error("spec.dkim.selectorPrefix: {0}")]
    SelectorPrefix(#[from] SelectorError),
}

/// One key of a generation as the spec describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KeyShape {
    algorithm: KeyAlgorithm,
    /// RSA modulus bits; `None` for Ed25519.
    size: Option<u32>,
}

/// The keys a generation must have under `spec`.
fn desired_shapes(spec: &DkimSpec) -> Result<Vec<KeyShape>, RotationError> {
    let rsa = || {
        if RSA_KEY_SIZES.contains(&spec.rsa_key_size) {
            Ok(KeyShape {
                algorithm: KeyAlgorithm::Rsa,
                size: Some(spec.rsa_key_size),
            })
        } else {
            Err(RotationError::RsaKeySize(spec.rsa_key_size))
        }
    };
    let ed25519 = KeyShape {
        algorithm: KeyAlgorithm::Ed25519,
        size: None,
    };
    Ok(match spec.algorithm {
        DkimAlgorithm::Rsa => vec![rsa()?],
        DkimAlgorithm::Ed25519 => vec![ed25519],
        DkimAlgorithm::Dual => vec![rsa()?, ed25519],
    })
}

/// Why a generation's keys differ from the spec, or `None` if they match.
fn spec_mismatch<'a>(
    generation: impl IntoIterator<Item = &'a DkimKeyStatus>,
    desired: &[KeyShape],
) -> Option<GenerationReason> {
    let shapes: Vec<KeyShape> = generation
        .into_iter()
        .map(|key| KeyShape {
            algorithm: key.algorithm,
            size: key.size,
        })
        .collect();
    let same_algorithms = shapes.len() == desired.len()
        && desired
            .iter()
            .all(|want| shapes.iter().any(|have| have.algorithm == want.algorithm));
    if !same_algorithms {
        Some(GenerationReason::AlgorithmChanged)
    } else if !desired.iter().all(|want| shapes.contains(want)) {
        Some(GenerationReason::KeySizeChanged)
    } else {
        None
    }
}

/// `at + duration`, saturating instead of failing at the end of time.
fn after(at: Timestamp, duration: SignedDuration) -> Timestamp {
    at.saturating_add(duration).unwrap_or(Timestamp::MAX)
}

/// Sorts keys as status lists them: newest generation first, RSA before
/// Ed25519 within a generation.
pub fn sort_newest_first(keys: &mut [DkimKeyStatus]) {
    keys.sort_by(|a, b| {
        b.generation
            .cmp(&a.generation)
            .then_with(|| algorithm_order(a.algorithm).cmp(&algorithm_order(b.algorithm)))
            .then_with(|| a.selector.cmp(&b.selector))
    });
}

fn algorithm_order(algorithm: KeyAlgorithm) -> u8 {
    match algorithm {
        KeyAlgorithm::Rsa => 0,
        KeyAlgorithm::Ed25519 => 1,
    }
}

fn generations_in(keys: &[DkimKeyStatus], state: KeyState) -> BTreeSet<u32> {
    keys.iter()
        .filter(|key| key.state == state)
        .map(|key| key.generation)
        .collect()
}

/// Decides the next step of key rotation. Pure and idempotent: planning
/// again on the result (with the plan carried out) changes nothing more.
pub fn plan(input: &RotationInput<'_>) -> Result<RotationPlan, RotationError> {
    let now = input.now;
    let period = input
        .spec
        .rotation
        .period()
        .map_err(RotationError::Period)?
        .map(|period| period.to_signed());
    let overlap = input
        .spec
        .rotation
        .overlap()
        .map_err(RotationError::Overlap)?
        .to_signed();
    let desired = desired_shapes(input.spec)?;

    let mut step = Step {
        now,
        keys: input.keys.to_vec(),
        events: Vec::new(),
        wake_candidates: Vec::new(),
    };
    let replace_pending = step.discard_unusable_pending(input, &desired);
    step.promote_verified_pending(input);
    step.end_overlaps(overlap);
    // Collected before Retired keys are dropped from the list, so a key that
    // is dropped still has its private key removed.
    let remove_private_keys = step.private_keys_to_remove(input);
    step.drop_old_retired_keys();

    let active_keys_missing = step.report_active_keys_missing(input);
    let active_generation = step.active_generation();
    let next_rotation = period
        .zip(activation_time(&active_generation))
        .map(|(period, activated_at)| after(activated_at, period));

    // A new annotation value is always acted on: either it starts a new
    // generation, or a key newer than the request is already Pending.
    let new_request = input
        .rotate_annotation
        .filter(|token| !token.is_empty() && Some(*token) != input.rotate_acted_on);
    let mut rotate_requested = new_request.or(input.rotate_acted_on).map(str::to_string);

    let has_pending = step.keys.iter().any(|key| key.state == KeyState::Pending);
    let generation_reason = replace_pending.or_else(|| {
        if has_pending {
            // Never a second Pending generation: the one waiting for DNS is
            // already newer than any trigger.
            None
        } else if active_generation.is_empty() {
            Some(GenerationReason::NoKey)
        } else {
            spec_mismatch(&active_generation, &desired)
                .or_else(|| delegation_mismatch(&active_generation, input))
                .or(new_request.map(|_| GenerationReason::Requested))
                .or(next_rotation
                    .filter(|due| now >= *due)
                    .map(|_| GenerationReason::Age))
        }
    });
    let active_selector = active_selector(&active_generation);

    let generate = match generation_reason {
        Some(reason) => {
            let generate = step.new_generation(input, &desired, reason)?;
            if generate.is_empty() {
                // No slot is free (the other one is still in its overlap):
                // the request waits for it rather than being lost.
                rotate_requested = input.rotate_acted_on.map(str::to_string);
            }
            generate
        }
        None => {
            if !has_pending {
                step.wake_candidates.extend(next_rotation);
            }
            Vec::new()
        }
    };

    let Step {
        mut keys,
        events,
        wake_candidates,
        ..
    } = step;
    sort_newest_first(&mut keys);
    Ok(RotationPlan {
        keys,
        generate,
        remove_private_keys,
        rotate_requested,
        next_rotation,
        wake_at: wake_candidates.into_iter().filter(|at| *at > now).min(),
        active_selector,
        events,
        active_keys_missing,
    })
}

/// The keys being planned, what happened to them, and when to look again.
struct Step {
    now: Timestamp,
    keys: Vec<DkimKeyStatus>,
    events: Vec<RotationEvent>,
    /// Times at which something falls due; the earliest future one becomes
    /// `wake_at`.
    wake_candidates: Vec<Timestamp>,
}

impl Step {
    /// Keeps at most one Pending generation, and only one that can still
    /// become Active (private keys present, matching the spec); anything
    /// else is discarded now rather than published for nothing. Returns why
    /// a replacement generation is needed, if one is.
    fn discard_unusable_pending(
        &mut self,
        input: &RotationInput<'_>,
        desired: &[KeyShape],
    ) -> Option<GenerationReason> {
        let pending: Vec<u32> = generations_in(&self.keys, KeyState::Pending)
            .into_iter()
            .collect();
        let (&newest, older) = pending.split_last()?;
        for &generation in older {
            self.discard_generation(generation, DiscardReason::Superseded);
        }
        let members: Vec<&DkimKeyStatus> = self
            .keys
            .iter()
            .filter(|key| key.generation == newest)
            .collect();
        let reason = if members
            .iter()
            .any(|key| !input.has_private_key(&key.selector))
        {
            DiscardReason::PrivateKeyMissing
        } else if spec_mismatch(members.iter().copied(), desired).is_some()
            || delegation_mismatch(members.iter().copied(), input).is_some()
        {
            DiscardReason::SpecChanged
        } else {
            return None;
        };
        self.discard_generation(newest, reason);
        // Whatever made us generate it still holds (an annotation that asked
        // for it has already been recorded), so it is always replaced.
        Some(GenerationReason::PendingDiscarded(reason))
    }

    /// Marks a whole Pending generation Retired; its private keys are then
    /// removed like any Retired key's.
    fn discard_generation(&mut self, generation: u32, reason: DiscardReason) {
        for key in self
            .keys
            .iter_mut()
            .filter(|key| key.generation == generation && key.state == KeyState::Pending)
        {
            key.state = KeyState::Retired;
            key.retired_at = Some(Time(self.now));
            self.events.push(RotationEvent::PendingKeyRegenerated {
                selector: key.selector.clone(),
                reason,
            });
        }
    }

    /// The Pending generation becomes Active once every one of its records
    /// is verified, and the generation it replaces starts its overlap.
    /// Nothing else ever makes a key Active or stops one signing.
    fn promote_verified_pending(&mut self, input: &RotationInput<'_>) {
        let Some(&generation) = generations_in(&self.keys, KeyState::Pending).last() else {
            return;
        };
        if let Some(slots) = input.slots
            && !self.seen_long_enough(input, generation, slots)
        {
            return;
        }
        let members = || self.keys.iter().filter(|key| key.generation == generation);
        if !members().all(|key| input.dns_verdict(&key.selector) == DnsVerdict::Verified) {
            return;
        }
        let replaced_by = members()
            .map(|key| key.selector.as_str())
            .collect::<Vec<_>>()
            .join(",");
        for key in &mut self.keys {
            if key.generation == generation {
                key.state = KeyState::Active;
                key.activated_at = Some(Time(self.now));
                self.events.push(RotationEvent::Activated {
                    selector: key.selector.clone(),
                });
            } else if key.state == KeyState::Active {
                key.state = KeyState::Retiring;
                key.retiring_at = Some(Time(self.now));
                self.events.push(RotationEvent::Retiring {
                    selector: key.selector.clone(),
                    replaced_by: replaced_by.clone(),
                });
            }
        }
    }

    /// Delegated keys: records since when each key of the Pending
    /// `generation` has been seen (forgotten when DNS says it is gone), and
    /// whether all have been seen for the activation delay.
    fn seen_long_enough(
        &mut self,
        input: &RotationInput<'_>,
        generation: u32,
        slots: Slots,
    ) -> bool {
        let now = self.now;
        let mut ready = true;
        for key in self
            .keys
            .iter_mut()
            .filter(|key| key.generation == generation && key.state == KeyState::Pending)
        {
            match input.dns_verdict(&key.selector) {
                DnsVerdict::Verified => {
                    let since = key.verified_at.get_or_insert(Time(now)).0;
                    let due = after(since, slots.activation_delay);
                    if now < due {
                        ready = false;
                        self.wake_candidates.push(due);
                    }
                }
                DnsVerdict::NotVerified => {
                    key.verified_at = None;
                    ready = false;
                }
                DnsVerdict::Unknown => ready = false,
            }
        }
        ready
    }

    /// Retiring keys whose overlap has ended become Retired.
    fn end_overlaps(&mut self, overlap: SignedDuration) {
        let now = self.now;
        for key in self
            .keys
            .iter_mut()
            .filter(|key| key.state == KeyState::Retiring)
        {
            // A Retiring key always has `retiring_at`; if a hand-edited
            // status lost it, the overlap starts now rather than being
            // skipped.
            let since = key.retiring_at.get_or_insert(Time(now)).0;
            let overlap_ends = after(since, overlap);
            if now >= overlap_ends {
                key.state = KeyState::Retired;
                key.retired_at = Some(Time(now));
                self.events.push(RotationEvent::Retired {
                    selector: key.selector.clone(),
                });
            } else {
                self.wake_candidates.push(overlap_ends);
            }
        }
    }

    /// Every Retired key still holding a private key, including any whose
    /// deletion a crash interrupted.
    fn private_keys_to_remove(&self, input: &RotationInput<'_>) -> Vec<String> {
        self.keys
            .iter()
            .filter(|key| key.state == KeyState::Retired && input.has_private_key(&key.selector))
            .map(|key| key.selector.clone())
            .collect()
    }

    /// Retired keys stay listed for [`RETIRED_KEY_RETENTION`] so the tenant
    /// sees which records may be removed, then are dropped.
    fn drop_old_retired_keys(&mut self) {
        let now = self.now;
        let wake_candidates = &mut self.wake_candidates;
        self.keys.retain_mut(|key| {
            if key.state != KeyState::Retired {
                return true;
            }
            // As for `retiring_at`: a lost timestamp restarts the clock.
            let retired_at = key.retired_at.get_or_insert(Time(now)).0;
            let drop_at = after(retired_at, RETIRED_KEY_RETENTION);
            if now >= drop_at {
                false
            } else {
                wake_candidates.push(drop_at);
                true
            }
        });
    }

    /// Active keys whose private key is missing: reported loudly on every
    /// plan, never repaired by replacing the key behind the tenant's back.
    fn report_active_keys_missing(&mut self, input: &RotationInput<'_>) -> Vec<String> {
        let missing: Vec<String> = self
            .keys
            .iter()
            .filter(|key| key.state == KeyState::Active && !input.has_private_key(&key.selector))
            .map(|key| key.selector.clone())
            .collect();
        self.events.extend(
            missing
                .iter()
                .map(|selector| RotationEvent::ActiveKeyMissing {
                    selector: selector.clone(),
                }),
        );
        missing
    }

    /// The keys of the Active generation: the newest generation with an
    /// Active key (there is only one unless status was edited by hand).
    fn active_generation(&self) -> Vec<DkimKeyStatus> {
        let active = || self.keys.iter().filter(|key| key.state == KeyState::Active);
        let Some(newest) = active().map(|key| key.generation).max() else {
            return Vec::new();
        };
        active()
            .filter(|key| key.generation == newest)
            .cloned()
            .collect()
    }

    /// The keys of a new generation, with unique selectors and the next
    /// generation number.
    fn new_generation(
        &mut self,
        input: &RotationInput<'_>,
        desired: &[KeyShape],
        reason: GenerationReason,
    ) -> Result<Vec<NewKey>, RotationError> {
        let generation = input
            .keys
            .iter()
            .map(|key| key.generation)
            .max()
            .unwrap_or(0)
            .saturating_add(1);
        // Every selector ever seen, including keys dropped from the list in
        // this plan and private keys a crashed run stored without status.
        let taken = input
            .keys
            .iter()
            .map(|key| key.selector.as_str())
            .chain(input.private_keys_present.iter().map(String::as_str));
        let selectors = match input.slots {
            None => selectors_for_generation(
                &input.spec.selector_prefix,
                input.spec.algorithm,
                self.now,
                taken,
            )?,
            Some(_) => match self.free_slot(input)? {
                Some(selectors) => selectors,
                None => return Ok(Vec::new()),
            },
        };
        Ok(selectors
            .into_iter()
            .map(|(algorithm, selector)| {
                self.events.push(RotationEvent::Generated {
                    selector: selector.clone(),
                    reason,
                });
                let size = desired
                    .iter()
                    .find(|shape| shape.algorithm == algorithm)
                    .and_then(|shape| shape.size);
                NewKey {
                    selector,
                    algorithm,
                    size,
                    generation,
                }
            })
            .collect())
    }
}

impl Step {
    /// The selectors of a slot a new generation may take: one no Pending,
    /// Active or Retiring key uses, and whose Retired key's private key is
    /// already deleted (so the new key's cannot be deleted in its place).
    /// Prefers the slot the Active generation is not in. The Retired keys
    /// of the slot leave the list: a selector is listed once.
    fn free_slot(
        &mut self,
        input: &RotationInput<'_>,
    ) -> Result<Option<Vec<(KeyAlgorithm, String)>>, RotationError> {
        let prefix = &input.spec.selector_prefix;
        let active_slot = self
            .keys
            .iter()
            .find(|key| key.state == KeyState::Active)
            .and_then(|key| slot_of(prefix, &key.selector));
        let mut candidates: Vec<u8> = SLOTS
            .iter()
            .copied()
            .filter(|slot| Some(*slot) != active_slot)
            .collect();
        candidates.extend(active_slot);
        for slot in candidates {
            let selectors = slot_selectors(prefix, input.spec.algorithm, slot)?;
            let in_use = self.keys.iter().any(|key| {
                slot_of(prefix, &key.selector) == Some(slot)
                    && (key.state != KeyState::Retired || input.has_private_key(&key.selector))
            });
            // A private key stored for the slot that the status does not
            // list (a crash before the status named it): not ours to drop.
            let unlisted = selectors.iter().any(|(_, selector)| {
                input.has_private_key(selector)
                    && !self.keys.iter().any(|key| &key.selector == selector)
            });
            if !in_use && !unlisted {
                self.keys
                    .retain(|key| slot_of(prefix, &key.selector) != Some(slot));
                return Ok(Some(selectors));
            }
        }
        Ok(None)
    }
}

/// Why a generation's selectors do not fit `spec.dkim.delegation`: slot
/// selectors without delegation, or dated ones with it.
fn delegation_mismatch<'a>(
    generation: impl IntoIterator<Item = &'a DkimKeyStatus>,
    input: &RotationInput<'_>,
) -> Option<GenerationReason> {
    let prefix = &input.spec.selector_prefix;
    let delegated = input.slots.is_some();
    generation
        .into_iter()
        .any(|key| slot_of(prefix, &key.selector).is_some() != delegated)
        .then_some(GenerationReason::DelegationChanged)
}

/// When a generation started signing (its keys are activated together).
/// A key without `activated_at` (hand-edited status) counts from creation.
fn activation_time(generation: &[DkimKeyStatus]) -> Option<Timestamp> {
    generation
        .iter()
        .map(|key| key.activated_at.as_ref().unwrap_or(&key.created_at).0)
        .min()
}

/// `status.dkim.activeSelector`: the Active selectors, RSA first.
fn active_selector(active_generation: &[DkimKeyStatus]) -> Option<String> {
    let mut keys: Vec<&DkimKeyStatus> = active_generation.iter().collect();
    keys.sort_by_key(|key| (algorithm_order(key.algorithm), key.selector.as_str()));
    (!keys.is_empty()).then(|| {
        keys.iter()
            .map(|key| key.selector.as_str())
            .collect::<Vec<_>>()
            .join(",")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RotationSpec;
    use crate::dkim::keys::{GeneratedKey, PrivateKeyPem};

    const DAY: SignedDuration = SignedDuration::from_hours(24);
    const HOUR: SignedDuration = SignedDuration::from_hours(1);
    const TTL: SignedDuration = SignedDuration::from_mins(5);

    fn at(ts: &str) -> Timestamp {
        ts.parse().unwrap()
    }

    fn spec(algorithm: DkimAlgorithm) -> DkimSpec {
        DkimSpec {
            algorithm,
            ..DkimSpec::default()
        }
    }

    /// One MailDomain as the controller sees it, with a fake controller that
    /// carries plans out (key generation is faked: these tests are about
    /// states and timestamps, not cryptography).
    struct Domain {
        now: Timestamp,
        spec: DkimSpec,
        keys: Vec<DkimKeyStatus>,
        annotation: Option<String>,
        acted_on: Option<String>,
        dns: HashMap<String, DnsVerdict>,
        secret: HashSet<String>,
        slots: Option<Slots>,
    }

    impl Domain {
        fn new(spec: DkimSpec) -> Self {
            Self {
                now: at("2026-11-26T10:00:00Z"),
                spec,
                keys: Vec::new(),
                annotation: None,
                acted_on: None,
                dns: HashMap::new(),
                secret: HashSet::new(),
                slots: None,
            }
        }

        /// A delegated domain: slots, and a TTL of five minutes.
        fn delegated(spec: DkimSpec) -> Self {
            Self {
                slots: Some(Slots {
                    activation_delay: TTL,
                }),
                ..Self::new(spec)
            }
        }

        fn plan(&self) -> RotationPlan {
            plan(&RotationInput {
                now: self.now,
                spec: &self.spec,
                keys: &self.keys,
                rotate_annotation: self.annotation.as_deref(),
                rotate_acted_on: self.acted_on.as_deref(),
                dns: &self.dns,
                private_keys_present: &self.secret,
                slots: self.slots,
            })
            .unwrap()
        }

        /// Plans, carries the plan out, and checks that planning again
        /// changes nothing (idempotence, on every step of every test).
        fn step(&mut self) -> RotationPlan {
            let plan = self.plan();
            self.apply(&plan);
            let again = self.plan();
            assert_eq!(again.keys, self.keys, "planning again changed the keys");
            assert_eq!(again.generate, [], "planning again generated keys");
            assert_eq!(again.remove_private_keys, Vec::<String>::new());
            assert_eq!(again.rotate_requested, self.acted_on);
            assert!(
                again
                    .events
                    .iter()
                    .all(|event| matches!(event, RotationEvent::ActiveKeyMissing { .. })),
                "planning again produced events: {:?}",
                again.events
            );
            assert_eq!(again.active_keys_missing, plan.active_keys_missing);
            plan
        }

        fn apply(&mut self, plan: &RotationPlan) {
            let generated = plan.generate.iter().map(|new| {
                self.secret.insert(new.selector.clone());
                GeneratedKey {
                    selector: new.selector.clone(),
                    algorithm: new.algorithm,
                    size: new.size,
                    private_key_pem: PrivateKeyPem::new("fake".into()),
                    public_key: format!("pub-{}", new.selector),
                }
                .into_status(self.now, new.generation)
            });
            let status = plan.status(generated.collect::<Vec<_>>());
            for selector in &plan.remove_private_keys {
                self.secret.remove(selector);
            }
            self.keys = status.keys;
            self.acted_on = status.rotate_requested;
        }

        fn publish(&mut self, selector: &str) {
            self.dns.insert(selector.into(), DnsVerdict::Verified);
        }

        fn publish_pending(&mut self) {
            let pending: Vec<String> = self
                .keys
                .iter()
                .filter(|key| key.state == KeyState::Pending)
                .map(|key| key.selector.clone())
                .collect();
            for selector in pending {
                self.publish(&selector);
            }
        }

        /// A domain whose first key (or Dual pair) is Active.
        fn with_active_key(spec: DkimSpec) -> Self {
            let mut domain = Self::new(spec);
            domain.step();
            domain.publish_pending();
            domain.step();
            domain
        }

        fn wait(&mut self, duration: SignedDuration) {
            self.now = after(self.now, duration);
        }

        fn key(&self, selector: &str) -> &DkimKeyStatus {
            self.keys
                .iter()
                .find(|key| key.selector == selector)
                .unwrap_or_else(|| panic!("no key {selector}"))
        }

        fn states(&self) -> Vec<(&str, KeyState)> {
            self.keys
                .iter()
                .map(|key| (key.selector.as_str(), key.state))
                .collect()
        }
    }

    fn generated(plan: &RotationPlan) -> Vec<(&str, KeyAlgorithm, Option<u32>, u32)> {
        plan.generate
            .iter()
            .map(|key| {
                (
                    key.selector.as_str(),
                    key.algorithm,
                    key.size,
                    key.generation,
                )
            })
            .collect()
    }

    #[test]
    fn a_new_domain_gets_generation_one() {
        let mut domain = Domain::new(DkimSpec::default());
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [("ma20261126a", KeyAlgorithm::Rsa, Some(2048), 1)]
        );
        assert_eq!(
            plan.events,
            [RotationEvent::Generated {
                selector: "ma20261126a".into(),
                reason: GenerationReason::NoKey,
            }]
        );
        assert_eq!(plan.active_selector, None);
        assert_eq!(plan.next_rotation, None);
        assert_eq!(domain.states(), [("ma20261126a", KeyState::Pending)]);
        assert_eq!(domain.key("ma20261126a").public_key, "pub-ma20261126a");
    }

    #[test]
    fn a_pending_key_becomes_active_only_once_verified() {
        let mut domain = Domain::new(DkimSpec::default());
        domain.step();

        for verdict in [DnsVerdict::NotVerified, DnsVerdict::Unknown] {
            domain.dns.insert("ma20261126a".into(), verdict);
            domain.wait(DAY * 400);
            let plan = domain.step();
            assert_eq!(domain.states(), [("ma20261126a", KeyState::Pending)]);
            assert_eq!(plan.active_selector, None);
            assert_eq!(plan.events, []);
            assert_eq!(plan.wake_at, None, "nothing is due while DNS is pending");
        }

        domain.publish("ma20261126a");
        let plan = domain.step();
        let key = domain.key("ma20261126a");
        assert_eq!(key.state, KeyState::Active);
        assert_eq!(key.activated_at, Some(Time(domain.now)));
        assert_eq!(plan.active_selector.as_deref(), Some("ma20261126a"));
        assert_eq!(
            plan.events,
            [RotationEvent::Activated {
                selector: "ma20261126a".into()
            }]
        );
        let due = after(domain.now, DAY * 90);
        assert_eq!(plan.next_rotation, Some(due));
        assert_eq!(plan.wake_at, Some(due));
        assert_eq!(plan.status([]).next_rotation, Some(Time(due)));
    }

    #[test]
    fn a_requested_rotation_walks_through_every_state() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        let start = domain.now;

        // The annotation starts a new generation; the old key keeps signing.
        domain.wait(DAY);
        domain.annotation = Some("2026-11-27".into());
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [("ma20261127a", KeyAlgorithm::Rsa, Some(2048), 2)]
        );
        assert_eq!(
            plan.events,
            [RotationEvent::Generated {
                selector: "ma20261127a".into(),
                reason: GenerationReason::Requested,
            }]
        );
        assert_eq!(domain.acted_on.as_deref(), Some("2026-11-27"));
        assert_eq!(
            domain.states(),
            [
                ("ma20261127a", KeyState::Pending),
                ("ma20261126a", KeyState::Active),
            ]
        );
        assert_eq!(plan.active_selector.as_deref(), Some("ma20261126a"));

        // Its record is published: it takes over, the old one retires.
        domain.wait(HOUR);
        domain.publish("ma20261127a");
        let plan = domain.step();
        let rotated_at = domain.now;
        assert_eq!(
            domain.states(),
            [
                ("ma20261127a", KeyState::Active),
                ("ma20261126a", KeyState::Retiring),
            ]
        );
        assert_eq!(
            domain.key("ma20261126a").retiring_at,
            Some(Time(rotated_at))
        );
        assert_eq!(
            domain.key("ma20261126a").activated_at,
            Some(Time(start)),
            "history is kept"
        );
        assert_eq!(
            plan.events,
            [
                RotationEvent::Activated {
                    selector: "ma20261127a".into()
                },
                RotationEvent::Retiring {
                    selector: "ma20261126a".into(),
                    replaced_by: "ma20261127a".into()
                },
            ]
        );
        assert_eq!(plan.active_selector.as_deref(), Some("ma20261127a"));
        assert_eq!(plan.wake_at, Some(after(rotated_at, DAY * 7)));
        assert!(domain.secret.contains("ma20261126a"));

        // Not quite the end of the overlap.
        domain.wait(DAY * 7 - HOUR);
        let plan = domain.step();
        assert_eq!(plan.events, []);
        assert_eq!(domain.key("ma20261126a").state, KeyState::Retiring);

        // Overlap over: retired, private key deleted.
        domain.wait(HOUR);
        let plan = domain.step();
        assert_eq!(domain.key("ma20261126a").state, KeyState::Retired);
        assert_eq!(domain.key("ma20261126a").retired_at, Some(Time(domain.now)));
        assert_eq!(plan.remove_private_keys, ["ma20261126a"]);
        assert_eq!(
            plan.events,
            [RotationEvent::Retired {
                selector: "ma20261126a".into()
            }]
        );
        assert!(!domain.secret.contains("ma20261126a"));
        assert!(domain.secret.contains("ma20261127a"));
        let retired_at = domain.now;
        assert_eq!(plan.wake_at, Some(after(retired_at, RETIRED_KEY_RETENTION)));

        // Thirty days later the entry is dropped.
        domain.wait(RETIRED_KEY_RETENTION - HOUR);
        domain.step();
        assert_eq!(domain.keys.len(), 2);
        domain.wait(HOUR);
        domain.step();
        assert_eq!(domain.states(), [("ma20261127a", KeyState::Active)]);
    }

    #[test]
    fn the_same_annotation_value_rotates_only_once() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.annotation = Some("one".into());
        domain.step();
        domain.publish_pending();
        domain.step();
        assert_eq!(domain.keys.len(), 2);

        domain.wait(DAY);
        let plan = domain.step();
        assert_eq!(plan.generate, []);

        // Removing the annotation keeps the token, and so does an empty one.
        domain.annotation = None;
        assert_eq!(domain.step().rotate_requested.as_deref(), Some("one"));
        domain.annotation = Some(String::new());
        let plan = domain.step();
        assert_eq!(plan.rotate_requested.as_deref(), Some("one"));
        assert_eq!(plan.generate, []);

        // A new value rotates again.
        domain.annotation = Some("two".into());
        let plan = domain.step();
        assert_eq!(generated(&plan).len(), 1);
        assert_eq!(plan.rotate_requested.as_deref(), Some("two"));
    }

    #[test]
    fn an_annotation_while_a_key_is_pending_is_recorded_without_a_second_key() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.annotation = Some("one".into());
        domain.step();
        assert_eq!(domain.keys.len(), 2);

        domain.annotation = Some("two".into());
        let plan = domain.step();
        assert_eq!(plan.generate, []);
        assert_eq!(plan.rotate_requested.as_deref(), Some("two"));
        assert_eq!(
            domain
                .keys
                .iter()
                .filter(|key| key.state == KeyState::Pending)
                .count(),
            1
        );
    }

    #[test]
    fn an_annotation_on_a_new_domain_is_recorded_with_the_first_key() {
        let mut domain = Domain::new(DkimSpec::default());
        domain.annotation = Some("early".into());
        let plan = domain.step();
        assert_eq!(generated(&plan).len(), 1);
        assert_eq!(plan.rotate_requested.as_deref(), Some("early"));
        domain.publish_pending();
        assert_eq!(domain.step().generate, []);
    }

    #[test]
    fn keys_rotate_when_they_reach_the_period() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        let activated = domain.now;
        let due = after(activated, DAY * 90);

        domain.wait(DAY * 90 - HOUR);
        let plan = domain.step();
        assert_eq!(plan.generate, []);
        assert_eq!(plan.next_rotation, Some(due));
        assert_eq!(plan.wake_at, Some(due));

        domain.wait(HOUR);
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [("ma20270224a", KeyAlgorithm::Rsa, Some(2048), 2)]
        );
        assert_eq!(
            plan.events,
            [RotationEvent::Generated {
                selector: "ma20270224a".into(),
                reason: GenerationReason::Age,
            }]
        );
        // While the replacement waits for DNS the rotation stays overdue,
        // and nothing more is generated however long it waits.
        assert_eq!(plan.next_rotation, Some(due));
        assert_eq!(plan.wake_at, None);
        domain.wait(DAY * 365);
        assert_eq!(domain.step().generate, []);
        assert_eq!(domain.key("ma20261126a").state, KeyState::Active);

        domain.publish_pending();
        let plan = domain.step();
        assert_eq!(plan.next_rotation, Some(after(domain.now, DAY * 90)));
    }

    #[test]
    fn hour_periods_are_honoured() {
        let mut domain = Domain::with_active_key(DkimSpec {
            rotation: RotationSpec {
                period: "36h".into(),
                overlap: "12h".into(),
            },
            ..DkimSpec::default()
        });
        domain.wait(HOUR * 36);
        assert_eq!(generated(&domain.step()).len(), 1);
        domain.publish_pending();
        let plan = domain.step();
        assert_eq!(plan.wake_at, Some(after(domain.now, HOUR * 12)));
    }

    #[test]
    fn never_disables_age_rotation_but_not_requests() {
        let mut domain = Domain::with_active_key(DkimSpec {
            rotation: RotationSpec {
                period: "never".into(),
                overlap: "7d".into(),
            },
            ..DkimSpec::default()
        });
        domain.wait(DAY * 3650);
        let plan = domain.step();
        assert_eq!(plan.generate, []);
        assert_eq!(plan.next_rotation, None);
        assert_eq!(plan.wake_at, None);
        assert_eq!(plan.status([]).next_rotation, None);

        domain.annotation = Some("now".into());
        assert_eq!(generated(&domain.step()).len(), 1);
    }

    #[test]
    fn a_dual_generation_is_generated_and_activated_together() {
        let mut domain = Domain::new(spec(DkimAlgorithm::Dual));
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [
                ("ma20261126a", KeyAlgorithm::Rsa, Some(2048), 1),
                ("ma20261126a-ed", KeyAlgorithm::Ed25519, None, 1),
            ]
        );

        // One record verified is not enough.
        domain.publish("ma20261126a");
        domain
            .dns
            .insert("ma20261126a-ed".into(), DnsVerdict::Unknown);
        domain.step();
        assert_eq!(
            domain.states(),
            [
                ("ma20261126a", KeyState::Pending),
                ("ma20261126a-ed", KeyState::Pending),
            ]
        );

        domain.publish("ma20261126a-ed");
        let plan = domain.step();
        assert_eq!(
            domain.states(),
            [
                ("ma20261126a", KeyState::Active),
                ("ma20261126a-ed", KeyState::Active),
            ]
        );
        assert_eq!(
            plan.active_selector.as_deref(),
            Some("ma20261126a,ma20261126a-ed")
        );

        // Rotation replaces and retires the pair as one.
        domain.annotation = Some("r".into());
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [
                ("ma20261126b", KeyAlgorithm::Rsa, Some(2048), 2),
                ("ma20261126b-ed", KeyAlgorithm::Ed25519, None, 2),
            ]
        );
        domain.publish_pending();
        let plan = domain.step();
        assert_eq!(
            domain.states(),
            [
                ("ma20261126b", KeyState::Active),
                ("ma20261126b-ed", KeyState::Active),
                ("ma20261126a", KeyState::Retiring),
                ("ma20261126a-ed", KeyState::Retiring),
            ]
        );
        assert!(plan.events.contains(&RotationEvent::Retiring {
            selector: "ma20261126a-ed".into(),
            replaced_by: "ma20261126b,ma20261126b-ed".into(),
        }));
        domain.wait(DAY * 7);
        let plan = domain.step();
        assert_eq!(plan.remove_private_keys, ["ma20261126a", "ma20261126a-ed"]);
    }

    #[test]
    fn a_lone_ed25519_key_uses_the_plain_selector() {
        let mut domain = Domain::new(spec(DkimAlgorithm::Ed25519));
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [("ma20261126a", KeyAlgorithm::Ed25519, None, 1)]
        );
    }

    #[test]
    fn an_algorithm_change_rotates_to_the_new_algorithm() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.spec.algorithm = DkimAlgorithm::Ed25519;
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [("ma20261126b", KeyAlgorithm::Ed25519, None, 2)]
        );
        assert_eq!(
            plan.events,
            [RotationEvent::Generated {
                selector: "ma20261126b".into(),
                reason: GenerationReason::AlgorithmChanged,
            }]
        );
        // The RSA key signs until the new record is verified.
        assert_eq!(plan.active_selector.as_deref(), Some("ma20261126a"));
        domain.publish_pending();
        domain.step();
        assert_eq!(
            domain.states(),
            [
                ("ma20261126b", KeyState::Active),
                ("ma20261126a", KeyState::Retiring),
            ]
        );

        // Ed25519 → Dual is a change of algorithm too.
        domain.spec.algorithm = DkimAlgorithm::Dual;
        let plan = domain.step();
        assert_eq!(generated(&plan).len(), 2);
        assert!(matches!(
            plan.events[0],
            RotationEvent::Generated {
                reason: GenerationReason::AlgorithmChanged,
                ..
            }
        ));
    }

    #[test]
    fn a_key_size_change_rotates_to_the_new_size() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.spec.rsa_key_size = 4096;
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [("ma20261126b", KeyAlgorithm::Rsa, Some(4096), 2)]
        );
        assert!(matches!(
            plan.events[0],
            RotationEvent::Generated {
                reason: GenerationReason::KeySizeChanged,
                ..
            }
        ));
    }

    #[test]
    fn the_rsa_size_does_not_matter_to_an_ed25519_domain() {
        let mut domain = Domain::with_active_key(spec(DkimAlgorithm::Ed25519));
        domain.spec.rsa_key_size = 4096;
        assert_eq!(domain.step().generate, []);
    }

    #[test]
    fn a_pending_key_that_no_longer_matches_the_spec_is_replaced() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.annotation = Some("r".into());
        domain.step();
        assert!(domain.secret.contains("ma20261126b"));

        domain.spec.algorithm = DkimAlgorithm::Dual;
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [
                ("ma20261126c", KeyAlgorithm::Rsa, Some(2048), 3),
                ("ma20261126c-ed", KeyAlgorithm::Ed25519, None, 3),
            ]
        );
        assert_eq!(plan.remove_private_keys, ["ma20261126b"]);
        assert_eq!(
            plan.events[0],
            RotationEvent::PendingKeyRegenerated {
                selector: "ma20261126b".into(),
                reason: DiscardReason::SpecChanged,
            }
        );
        assert_eq!(
            domain.states(),
            [
                ("ma20261126c", KeyState::Pending),
                ("ma20261126c-ed", KeyState::Pending),
                ("ma20261126b", KeyState::Retired),
                ("ma20261126a", KeyState::Active),
            ]
        );
        assert_eq!(domain.key("ma20261126b").retired_at, Some(Time(domain.now)));
        assert!(!domain.secret.contains("ma20261126b"));

        // A discarded key is never activated, even if its record shows up.
        domain.publish("ma20261126b");
        domain.step();
        assert_eq!(domain.key("ma20261126b").state, KeyState::Retired);
    }

    #[test]
    fn a_first_pending_key_is_replaced_when_the_spec_changes() {
        let mut domain = Domain::new(DkimSpec::default());
        domain.step();
        domain.spec.rsa_key_size = 3072;
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [("ma20261126b", KeyAlgorithm::Rsa, Some(3072), 2)]
        );
        assert_eq!(
            domain.states(),
            [
                ("ma20261126b", KeyState::Pending),
                ("ma20261126a", KeyState::Retired),
            ]
        );
    }

    #[test]
    fn a_pending_key_without_its_private_key_is_regenerated() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.annotation = Some("r".into());
        domain.step();
        domain.secret.remove("ma20261126b");

        // Even with its record published it cannot sign, so it is replaced;
        // the annotation was acted on already, yet a new key is planned.
        domain.publish("ma20261126b");
        let plan = domain.step();
        assert_eq!(
            generated(&plan),
            [("ma20261126c", KeyAlgorithm::Rsa, Some(2048), 3)]
        );
        assert_eq!(
            plan.events,
            [
                RotationEvent::PendingKeyRegenerated {
                    selector: "ma20261126b".into(),
                    reason: DiscardReason::PrivateKeyMissing,
                },
                RotationEvent::Generated {
                    selector: "ma20261126c".into(),
                    reason: GenerationReason::PendingDiscarded(DiscardReason::PrivateKeyMissing),
                },
            ]
        );
        assert!(plan.events[0].is_warning());
        assert_eq!(plan.remove_private_keys, Vec::<String>::new());
        assert_eq!(domain.key("ma20261126b").state, KeyState::Retired);
        assert_eq!(domain.key("ma20261126a").state, KeyState::Active);
    }

    #[test]
    fn half_of_a_dual_pending_pair_missing_discards_the_pair() {
        let mut domain = Domain::new(spec(DkimAlgorithm::Dual));
        domain.step();
        domain.secret.remove("ma20261126a-ed");
        let plan = domain.step();
        assert_eq!(plan.remove_private_keys, ["ma20261126a"]);
        assert_eq!(
            generated(&plan),
            [
                ("ma20261126b", KeyAlgorithm::Rsa, Some(2048), 2),
                ("ma20261126b-ed", KeyAlgorithm::Ed25519, None, 2),
            ]
        );
    }

    #[test]
    fn an_active_key_without_its_private_key_is_reported_never_replaced() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.secret.remove("ma20261126a");

        for _ in 0..2 {
            domain.wait(DAY);
            let plan = domain.step();
            assert_eq!(plan.generate, []);
            assert_eq!(plan.active_keys_missing, ["ma20261126a"]);
            assert_eq!(
                plan.events,
                [RotationEvent::ActiveKeyMissing {
                    selector: "ma20261126a".into()
                }]
            );
            assert!(plan.events[0].is_warning());
            assert!(plan.events[0].to_string().contains("rotate-requested"));
            assert_eq!(domain.states(), [("ma20261126a", KeyState::Active)]);
            assert_eq!(plan.active_selector.as_deref(), Some("ma20261126a"));
        }

        // The tenant asks for a rotation: the missing key is replaced the
        // ordinary way, once the new record is verified.
        domain.annotation = Some("fix".into());
        assert_eq!(generated(&domain.step()).len(), 1);
        domain.publish_pending();
        let plan = domain.step();
        assert_eq!(plan.active_keys_missing, Vec::<String>::new());
        assert_eq!(domain.key("ma20261126a").state, KeyState::Retiring);
        domain.wait(DAY * 7);
        let plan = domain.step();
        assert_eq!(domain.key("ma20261126a").state, KeyState::Retired);
        assert_eq!(plan.remove_private_keys, Vec::<String>::new());
    }

    #[test]
    fn dns_trouble_never_changes_an_active_key() {
        let mut domain = Domain::with_active_key(DkimSpec {
            rotation: RotationSpec {
                period: "never".into(),
                overlap: "7d".into(),
            },
            ..DkimSpec::default()
        });
        for verdict in [DnsVerdict::Unknown, DnsVerdict::NotVerified] {
            domain.dns.insert("ma20261126a".into(), verdict);
            domain.wait(DAY * 100);
            let plan = domain.step();
            assert_eq!(plan.events, []);
            assert_eq!(domain.states(), [("ma20261126a", KeyState::Active)]);
        }
        domain.dns.clear();
        domain.step();
        assert_eq!(domain.states(), [("ma20261126a", KeyState::Active)]);
    }

    #[test]
    fn retired_private_keys_still_present_are_removed_again() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.annotation = Some("r".into());
        domain.step();
        domain.publish_pending();
        domain.step();
        domain.wait(DAY * 7);
        let plan = domain.plan();
        assert_eq!(plan.remove_private_keys, ["ma20261126a"]);

        // The controller wrote the status but crashed before deleting.
        domain.keys = plan.status([]).keys;
        domain.acted_on = plan.rotate_requested.clone();
        domain.wait(DAY);
        let plan = domain.step();
        assert_eq!(plan.remove_private_keys, ["ma20261126a"]);
        assert_eq!(plan.events, []);
        assert!(!domain.secret.contains("ma20261126a"));
    }

    #[test]
    fn a_retired_key_dropped_from_status_still_has_its_private_key_removed() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.annotation = Some("r".into());
        domain.step();
        domain.publish_pending();
        domain.step();
        domain.wait(DAY * 7);
        let plan = domain.plan();
        domain.keys = plan.status([]).keys;
        domain.wait(RETIRED_KEY_RETENTION);
        let plan = domain.step();
        assert_eq!(plan.remove_private_keys, ["ma20261126a"]);
        assert_eq!(domain.keys.len(), 1);
    }

    #[test]
    fn selectors_in_the_secret_are_never_reused() {
        let mut domain = Domain::new(DkimSpec::default());
        // A key stored by a run that crashed before writing status.
        domain.secret.insert("ma20261126a".into());
        let plan = domain.step();
        assert_eq!(generated(&plan)[0].0, "ma20261126b");
    }

    #[test]
    fn there_is_never_more_than_one_pending_generation() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.annotation = Some("one".into());
        domain.step();
        // The other triggers fire too (age, a new request), to no effect.
        domain.wait(DAY * 200);
        domain.annotation = Some("two".into());
        assert_eq!(domain.step().generate, []);

        // A hand-edited status with two Pending generations keeps the newest.
        let mut older = domain.key("ma20261126b").clone();
        older.selector = "ma20261126x".into();
        older.generation = 1;
        domain.secret.insert("ma20261126x".into());
        domain.keys.push(older);
        let plan = domain.step();
        assert_eq!(plan.generate, []);
        assert_eq!(domain.key("ma20261126x").state, KeyState::Retired);
        assert_eq!(domain.key("ma20261126b").state, KeyState::Pending);
        assert!(plan.events.contains(&RotationEvent::PendingKeyRegenerated {
            selector: "ma20261126x".into(),
            reason: DiscardReason::Superseded,
        }));
    }

    #[test]
    fn a_lost_timestamp_restarts_the_clock_instead_of_skipping_the_overlap() {
        let mut domain = Domain::with_active_key(DkimSpec::default());
        domain.annotation = Some("r".into());
        domain.step();
        domain.publish_pending();
        domain.step();
        domain.wait(DAY * 6);
        domain.keys[1].retiring_at = None;
        let plan = domain.step();
        assert_eq!(domain.key("ma20261126a").state, KeyState::Retiring);
        assert_eq!(
            domain.key("ma20261126a").retiring_at,
            Some(Time(domain.now))
        );
        assert_eq!(plan.wake_at, Some(after(domain.now, DAY * 7)));
    }

    #[test]
    fn keys_are_listed_newest_generation_first() {
        let mut domain = Domain::with_active_key(spec(DkimAlgorithm::Dual));
        domain.keys.reverse();
        domain.annotation = Some("r".into());
        domain.step();
        let generations: Vec<u32> = domain.keys.iter().map(|key| key.generation).collect();
        assert_eq!(generations, [2, 2, 1, 1]);
        assert_eq!(domain.keys[0].algorithm, KeyAlgorithm::Rsa);
        assert_eq!(domain.keys[1].algorithm, KeyAlgorithm::Ed25519);
    }

    #[test]
    fn invalid_specs_are_reported_not_planned() {
        let domain = Domain::new(DkimSpec::default());
        let plan_with = |spec: DkimSpec| {
            plan(&RotationInput {
                now: domain.now,
                spec: &spec,
                keys: &[],
                rotate_annotation: None,
                rotate_acted_on: None,
                dns: &domain.dns,
                private_keys_present: &domain.secret,
                slots: None,
            })
        };
        assert_eq!(
            plan_with(DkimSpec {
                rsa_key_size: 1024,
                ..DkimSpec::default()
            }),
            Err(RotationError::RsaKeySize(1024))
        );
        assert!(matches!(
            plan_with(DkimSpec {
                selector_prefix: "Bad".into(),
                ..DkimSpec::default()
            }),
            Err(RotationError::SelectorPrefix(_))
        ));
        assert!(matches!(
            plan_with(DkimSpec {
                rotation: RotationSpec {
                    period: "soon".into(),
                    overlap: "7d".into()
                },
                ..DkimSpec::default()
            }),
            Err(RotationError::Period(_))
        ));
        assert!(matches!(
            plan_with(DkimSpec {
                rotation: RotationSpec {
                    period: "90d".into(),
                    overlap: "1w".into()
                },
                ..DkimSpec::default()
            }),
            Err(RotationError::Overlap(_))
        ));
    }

    #[test]
    fn every_event_names_its_key() {
        let events = [
            RotationEvent::Generated {
                selector: "s".into(),
                reason: GenerationReason::Age,
            },
            RotationEvent::Activated {
                selector: "s".into(),
            },
            RotationEvent::Retiring {
                selector: "s".into(),
                replaced_by: "t".into(),
            },
            RotationEvent::Retired {
                selector: "s".into(),
            },
            RotationEvent::PendingKeyRegenerated {
                selector: "s".into(),
                reason: DiscardReason::SpecChanged,
            },
            RotationEvent::ActiveKeyMissing {
                selector: "s".into(),
            },
        ];
        for event in events {
            assert_eq!(event.selector(), "s");
            assert!(event.to_string().contains(" s "), "{event}");
            assert!(!event.reason().is_empty());
        }
    }

    /// Takes a delegated domain's Pending key through DNS and the TTL wait
    /// to Active, checking it does not sign a second too early.
    fn activate_after_ttl(domain: &mut Domain, selector: &str) {
        domain.publish(selector);
        let seen = domain.step();
        assert_eq!(domain.key(selector).state, KeyState::Pending);
        assert_eq!(domain.key(selector).verified_at, Some(Time(domain.now)));
        assert_eq!(seen.wake_at, Some(after(domain.now, TTL)));
        domain.wait(TTL - SignedDuration::from_secs(1));
        domain.step();
        assert_eq!(domain.key(selector).state, KeyState::Pending, "too early");
        domain.wait(SignedDuration::from_secs(1));
        domain.step();
        assert_eq!(domain.key(selector).state, KeyState::Active);
    }

    #[test]
    fn delegated_keys_take_turns_in_two_slots_and_sign_only_after_the_ttl() {
        let mut domain = Domain::delegated(spec(DkimAlgorithm::Rsa));
        domain.step();
        assert_eq!(domain.states(), [("ma1", KeyState::Pending)]);
        activate_after_ttl(&mut domain, "ma1");

        // Three rotations: ma2, ma1, ma2, each into the slot the signing
        // key is not in, each only once the other slot's overlap is over.
        let mut expected = ["ma2", "ma1", "ma2"].into_iter();
        for round in 1..=3 {
            let next = expected.next().unwrap();
            let current = if next == "ma1" { "ma2" } else { "ma1" };
            // The slot's earlier record was removed when its key retired.
            domain.dns.insert(next.into(), DnsVerdict::NotVerified);
            domain.annotation = Some(format!("round-{round}"));
            domain.step();
            assert_eq!(domain.key(next).state, KeyState::Pending, "round {round}");
            assert_eq!(domain.key(next).verified_at, None, "round {round}");
            assert_eq!(
                domain.keys.iter().filter(|k| k.selector == next).count(),
                1,
                "a selector is listed once"
            );
            activate_after_ttl(&mut domain, next);
            assert_eq!(domain.key(current).state, KeyState::Retiring);

            // Asked to rotate again during the overlap: no slot is free, so
            // nothing is generated and the request is kept for later.
            domain.annotation = Some(format!("early-{round}"));
            let waiting = domain.step();
            assert_eq!(waiting.generate, []);
            assert_eq!(domain.acted_on, Some(format!("round-{round}")));
            domain.annotation = Some(format!("round-{round}"));
            domain.wait(7 * DAY);
            domain.step();
            assert_eq!(domain.key(current).state, KeyState::Retired);
            assert!(!domain.secret.contains(current), "private key deleted");
        }
    }

    #[test]
    fn a_request_made_during_the_overlap_is_carried_out_when_the_slot_frees() {
        let mut domain = Domain::delegated(spec(DkimAlgorithm::Rsa));
        domain.step();
        activate_after_ttl(&mut domain, "ma1");
        domain.annotation = Some("one".into());
        domain.step();
        activate_after_ttl(&mut domain, "ma2");
        domain.annotation = Some("two".into());
        assert_eq!(domain.step().generate, []);
        domain.wait(7 * DAY);
        // The overlap ends: ma1 retires and its private key goes (planning
        // again then does more, so this one is carried out by hand)...
        let retire = domain.plan();
        assert_eq!(retire.generate, []);
        domain.apply(&retire);
        assert_eq!(domain.key("ma1").state, KeyState::Retired);
        // ...and then the waiting request takes the freed slot (whose old
        // record left DNS with its key).
        domain.dns.insert("ma1".into(), DnsVerdict::NotVerified);
        let plan = domain.step();
        assert_eq!(plan.generate.len(), 1);
        assert_eq!(domain.key("ma1").state, KeyState::Pending);
        assert_eq!(domain.acted_on.as_deref(), Some("two"));
    }

    #[test]
    fn a_record_lost_while_waiting_restarts_the_wait() {
        let mut domain = Domain::delegated(spec(DkimAlgorithm::Rsa));
        domain.step();
        domain.publish("ma1");
        domain.step();
        domain.wait(TTL - SignedDuration::from_secs(10));
        // The CNAME is removed: what was seen no longer counts.
        domain.dns.insert("ma1".into(), DnsVerdict::NotVerified);
        domain.step();
        assert_eq!(domain.key("ma1").verified_at, None);
        domain.publish("ma1");
        domain.wait(SignedDuration::from_secs(20));
        domain.step();
        assert_eq!(domain.key("ma1").state, KeyState::Pending);
        // A DNS error keeps what was seen, and never activates.
        domain.dns.insert("ma1".into(), DnsVerdict::Unknown);
        domain.wait(TTL);
        domain.step();
        assert_eq!(domain.key("ma1").state, KeyState::Pending);
        assert!(domain.key("ma1").verified_at.is_some());
        domain.publish("ma1");
        domain.step();
        assert_eq!(domain.key("ma1").state, KeyState::Active);
    }

    #[test]
    fn dual_delegated_keys_share_a_slot() {
        let mut domain = Domain::delegated(spec(DkimAlgorithm::Dual));
        domain.step();
        assert_eq!(
            domain.states(),
            [("ma1", KeyState::Pending), ("ma1-ed", KeyState::Pending)]
        );
        domain.publish("ma1");
        domain.publish("ma1-ed");
        domain.step();
        domain.wait(TTL);
        domain.step();
        assert_eq!(domain.plan().active_selector.as_deref(), Some("ma1,ma1-ed"));
    }

    #[test]
    fn turning_delegation_on_or_off_moves_the_keys_without_a_gap() {
        let mut domain = Domain::with_active_key(spec(DkimAlgorithm::Rsa));
        let dated = domain.keys[0].selector.clone();
        domain.slots = Some(Slots {
            activation_delay: TTL,
        });
        let plan = domain.step();
        assert_eq!(
            plan.events[0],
            RotationEvent::Generated {
                selector: "ma1".into(),
                reason: GenerationReason::DelegationChanged
            }
        );
        // The dated key signs until the slot key is seen through the CNAME.
        assert_eq!(domain.key(&dated).state, KeyState::Active);
        activate_after_ttl(&mut domain, "ma1");
        assert_eq!(domain.key(&dated).state, KeyState::Retiring);

        // Off again: a dated key replaces the slot key, as any rotation.
        domain.slots = None;
        let plan = domain.step();
        assert_eq!(plan.generate.len(), 1);
        assert_eq!(slot_of("ma", &plan.generate[0].selector), None);
        assert_eq!(domain.key("ma1").state, KeyState::Active);
    }
}
