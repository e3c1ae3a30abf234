//! Publishing a MailDomain's records through its DNSProvider: resolve and
//! admit the provider, plan ([`crate::dns::publish::plan`]), carry the plan
//! out, and say what happened in a [`Publishing`] for the decision.
//!
//! Trust: the provider must admit the MailDomain's namespace (as a relay
//! does), every name must lie inside the domain (it does by construction:
//! the expected records are all under `spec.domain`; delegated key records
//! under the MailDomain's own label, a hash the tenant cannot choose) and
//! inside one of the provider's zones, and nothing is written for a domain
//! another MailDomain holds. The TSIG secret is read from the provider's own
//! namespace, never from the MailDomain's.

use std::net::SocketAddr;

use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::Api;

use super::super::Context;
use jiff::SignedDuration;

use crate::api::{
    ConditionStatus, ConditionType, DNSProvider, MailDomain, ProviderRef, PublishedRecord, Reason,
};
use crate::dkim::rotation::Slots;
use crate::dns::publish::{self, Blocked, Precondition, Step};
use crate::dns::rfc2136::{Change, Prerequisite, Rfc2136Client, UpdateError};
use crate::dns::{ExpectedRecord, RecordOutcome, spf};

/// What publishing came to, for the decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Publishing {
    /// No provider: the tenant publishes by hand.
    Manual,
    Provider {
        /// `namespace/name` of the provider(s), comma-separated.
        provider: String,
        /// The records the operator wrote, as they stand now.
        ledger: Vec<PublishedRecord>,
        /// Why something was not (or could not) be written.
        problem: Option<(Reason, String)>,
        /// Records were written in this reconcile.
        wrote: bool,
    },
}

impl Publishing {
    /// The ledger to record in status (the previous one without a provider:
    /// what was written stays known, so it can be removed later).
    pub fn ledger<'a>(&'a self, previous: &'a [PublishedRecord]) -> &'a [PublishedRecord] {
        match self {
            Self::Manual => previous,
            Self::Provider { ledger, .. } => ledger,
        }
    }

    /// The `DNSPublished` verdict, given whether the records the providers
    /// write are all seen by the resolver; `None` without a provider.
    pub fn condition(&self, all_verified: bool) -> Option<(ConditionStatus, Reason, String)> {
        let Self::Provider {
            provider, problem, ..
        } = self
        else {
            return None;
        };
        Some(match problem {
            Some((reason, message)) => (ConditionStatus::False, *reason, message.clone()),
            None if all_verified => (
                ConditionStatus::True,
                Reason::Published,
                format!("DNSProvider {provider} published the records and the resolver sees them"),
            ),
            None => (
                ConditionStatus::False,
                Reason::Publishing,
                format!(
                    "DNSProvider {provider} wrote the records; waiting for the resolver to see them (status.records)"
                ),
            ),
        })
    }
}

/// Delegated DKIM (`spec.dkim.delegation`) as this reconcile finds it.
#[derive(Clone, Debug)]
pub enum Delegation {
    NotRequested,
    /// The provider admits the MailDomain and hosts delegated records.
    To {
        provider: Box<DNSProvider>,
        /// `namespace/name` of the provider.
        id: String,
        /// `<label>.<dkimDelegationZone>`: slot `<s>` is at `<s>.<base>`.
        base: String,
    },
    /// Asked for, and not usable: the keys stay as they are.
    Unusable {
        reason: Reason,
        message: String,
    },
}

impl Delegation {
    /// Where the key records are published, when delegation works.
    pub fn base(&self) -> Option<&str> {
        match self {
            Self::To { base, .. } => Some(base),
            _ => None,
        }
    }

    /// The slot rules for the rotation planner: whenever delegation is
    /// asked for (keys stay in their slots while it is unusable, and DNS
    /// then says nothing new about them).
    pub fn slots(&self) -> Option<Slots> {
        let ttl = match self {
            Self::NotRequested => return None,
            Self::To { provider, .. } => provider.spec.ttl,
            Self::Unusable { .. } => DEFAULT_TTL,
        };
        Some(Slots {
            activation_delay: SignedDuration::from_secs(i64::from(ttl)),
        })
    }
}

/// The provider TTL when none can be read.
const DEFAULT_TTL: u32 = 300;

/// The label of a MailDomain's delegated records: a hash of its namespace,
/// name and domain, so it is the same across restarts and re-creations of
/// the same object, and no tenant can choose (or take) another's.
pub fn delegation_label(namespace: &str, name: &str, domain: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        format!("{namespace}/{name}/{domain}").as_bytes(),
    );
    // 80 bits: no two MailDomains of a platform meet by chance.
    digest.as_ref()[..10]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The provider's id, `namespace/name`, and where to find it.
fn id_of(r: &ProviderRef, namespace: &str) -> (String, String) {
    (
        r.namespace.clone().unwrap_or_else(|| namespace.to_string()),
        r.name.clone(),
    )
}

/// Reads a provider and checks that it admits `namespace`.
fn admitted_provider(
    (provider_namespace, provider_name): &(String, String),
    namespace: &str,
    ctx: &Context,
) -> Result<DNSProvider, (Reason, String)> {
    let id = format!("{provider_namespace}/{provider_name}");
    // From the index: its watch reconciles the MailDomains that name a
    // provider whenever the provider changes, so a provider created after
    // them is used at once.
    let Some(provider) = ctx.index().provider(provider_namespace, provider_name) else {
        return Err((
            Reason::ProviderNotFound,
            format!(
                "DNSProvider {id} does not exist (or is in a namespace the operator does not watch): create it, or fix the providerRef"
            ),
        ));
    };
    let provider = DNSProvider::clone(&provider);
    let labels = ctx.index().namespace_labels(namespace);
    provider
        .spec
        .allowed_namespaces
        .admits(provider_namespace, namespace, &labels)
        .map_err(|why| {
            let why = why.replace("the relay", "the provider");
            (
                Reason::ProviderNotAllowed,
                format!("DNSProvider {id} does not admit this MailDomain: {why}"),
            )
        })?;
    Ok(provider)
}

/// Resolves `spec.dkim.delegation`: the provider must exist, admit the
/// namespace and host delegated records.
pub async fn delegation(domain: &MailDomain, namespace: &str, ctx: &Context) -> Delegation {
    let Some(delegation) = &domain.spec.dkim.delegation else {
        return Delegation::NotRequested;
    };
    let at = id_of(&delegation.provider_ref, namespace);
    let id = format!("{}/{}", at.0, at.1);
    let provider = match admitted_provider(&at, namespace, ctx) {
        Ok(provider) => provider,
        Err((reason, message)) => return Delegation::Unusable { reason, message },
    };
    let Some(zone) = provider.spec.dkim_delegation_zone.clone() else {
        return Delegation::Unusable {
            reason: Reason::ZoneNotGranted,
            message: format!(
                "DNSProvider {id} hosts no delegated DKIM (it has no dkimDelegationZone): ask the platform for one that does, or remove spec.dkim.delegation"
            ),
        };
    };
    let label = delegation_label(namespace, &domain.name_any(), &domain.spec.domain);
    Delegation::To {
        provider: Box::new(provider),
        id,
        base: format!("{label}.{zone}"),
    }
}

/// One provider's share of the records.
struct Target<'a> {
    at: (String, String),
    /// Already read and admitted (the delegation provider).
    provider: Option<&'a DNSProvider>,
    /// Whether a record is this provider's to write.
    takes: Box<dyn Fn(&ExpectedRecord) -> bool + Send + Sync + 'a>,
}

/// Publishes what `outcomes` say is missing, and removes what the ledger
/// holds and nothing needs any more: the domain's own records through
/// `spec.dns.providerRef`, delegated key records through the delegation
/// provider (one pass when both are the same).
pub async fn publish_records(
    domain: &MailDomain,
    namespace: &str,
    outcomes: &[RecordOutcome],
    delegation: &Delegation,
    ctx: &Context,
) -> Publishing {
    let delegated_base = delegation.base().map(|base| format!(".{base}"));
    let is_delegated = move |record: &ExpectedRecord| {
        delegated_base
            .as_deref()
            .is_some_and(|base| record.name.ends_with(base))
    };
    let mut targets: Vec<Target<'_>> = Vec::new();
    let own = domain
        .spec
        .dns
        .provider_ref
        .as_ref()
        .map(|r| id_of(r, namespace));
    let delegated_at = match delegation {
        Delegation::To { provider, id, .. } => {
            let at = id
                .split_once('/')
                .map(|(n, m)| (n.to_string(), m.to_string()));
            at.map(|at| (at, provider.as_ref()))
        }
        _ => None,
    };
    match (own, delegated_at) {
        (Some(own), Some((at, provider))) if own == at => targets.push(Target {
            at,
            provider: Some(provider),
            takes: Box::new(|_| true),
        }),
        (own, delegated) => {
            if let Some(at) = own {
                let is_delegated = is_delegated.clone();
                targets.push(Target {
                    at,
                    provider: None,
                    takes: Box::new(move |r| !is_delegated(r)),
                });
            }
            if let Some((at, provider)) = delegated {
                targets.push(Target {
                    at,
                    provider: Some(provider),
                    takes: Box::new(move |r| is_delegated(r)),
                });
            }
        }
    }
    let previous = domain
        .status
        .as_ref()
        .map(|s| s.published.clone())
        .unwrap_or_default();
    let delegation_problem = match delegation {
        Delegation::Unusable { reason, message } => Some((*reason, message.clone())),
        _ => None,
    };
    if targets.is_empty() {
        return match delegation_problem {
            None => Publishing::Manual,
            Some(problem) => Publishing::Provider {
                provider: domain
                    .spec
                    .dkim
                    .delegation
                    .as_ref()
                    .map(|d| {
                        let (n, m) = id_of(&d.provider_ref, namespace);
                        format!("{n}/{m}")
                    })
                    .unwrap_or_default(),
                ledger: previous,
                problem: Some(problem),
                wrote: false,
            },
        };
    }
    let ids: Vec<String> = targets
        .iter()
        .map(|t| format!("{}/{}", t.at.0, t.at.1))
        .collect();
    let mut ledger: Vec<PublishedRecord> = previous
        .iter()
        .filter(|e| !ids.contains(&e.provider))
        .cloned()
        .collect();
    let mut problem = delegation_problem;
    let mut wrote = false;
    for target in &targets {
        let mine: Vec<RecordOutcome> = outcomes
            .iter()
            .filter(|o| (target.takes)(&o.record))
            .cloned()
            .collect();
        let result = publish_through(domain, namespace, &mine, delegation, target, ctx).await;
        ledger.extend(result.ledger);
        wrote |= result.wrote;
        if problem.is_none() {
            problem = result.problem;
        }
    }
    ledger.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    ledger.dedup();
    Publishing::Provider {
        provider: ids.join(", "),
        ledger,
        problem,
        wrote,
    }
}

/// What one provider wrote: its own ledger entries after this pass.
struct Through {
    ledger: Vec<PublishedRecord>,
    problem: Option<(Reason, String)>,
    wrote: bool,
}

/// Plans and carries out one provider's share.
async fn publish_through(
    domain: &MailDomain,
    namespace: &str,
    outcomes: &[RecordOutcome],
    delegation: &Delegation,
    target: &Target<'_>,
    ctx: &Context,
) -> Through {
    let id = format!("{}/{}", target.at.0, target.at.1);
    let ledger_of = |domain: &MailDomain| -> Vec<PublishedRecord> {
        domain
            .status
            .iter()
            .flat_map(|s| s.published.iter())
            .filter(|e| e.provider == id)
            .cloned()
            .collect()
    };
    let refuse = |reason, message: String| Through {
        ledger: ledger_of(domain),
        problem: Some((reason, message)),
        wrote: false,
    };
    if let Some(conflict) = domain.status.as_ref().and_then(|s| {
        crate::api::Condition::find(&s.conditions, ConditionType::DomainConflict)
            .filter(|c| c.status == ConditionStatus::True)
    }) {
        return refuse(
            Reason::DomainConflict,
            format!(
                "nothing is published while another MailDomain holds the domain: {}",
                conflict.message
            ),
        );
    }
    let read;
    let provider = match target.provider {
        Some(provider) => provider,
        None => match admitted_provider(&target.at, namespace, ctx) {
            Ok(provider) => {
                read = provider;
                &read
            }
            Err((reason, message)) => return refuse(reason, message),
        },
    };

    let plan_for = |domain: &MailDomain, outcomes: &[RecordOutcome]| {
        let mut plan = publish::plan(
            outcomes,
            &ledger_of(domain),
            &provider.spec,
            &id,
            domain.spec.dns.manage_spf,
        );
        adopt_our_dkim_records(&mut plan.kept, outcomes, &provider.spec, &id);
        plan
    };
    let mut plan = plan_for(domain, outcomes);
    // A plan that writes rests on the API server's copy of the status (the
    // ledger and the keys' states), not the index's, which can lag behind
    // our own writes: a record just removed must not be put back from a
    // status that still calls its key Retiring.
    if !plan.steps.is_empty()
        && let Some(fresh) = newer_copy(domain, namespace, ctx).await
    {
        let outcomes: Vec<RecordOutcome> = outcomes_of(&fresh, outcomes, delegation)
            .into_iter()
            .filter(|o| (target.takes)(&o.record))
            .collect();
        plan = plan_for(&fresh, &outcomes);
    }
    // Removals first: a slot's retired record goes before its next key's
    // is added at the same name.
    plan.steps
        .sort_by_key(|step| !matches!(step, Step::Remove(_)));
    // A merged SPF record past the lookup limit would make SPF fail
    // (permerror) for everyone: it is never written, and the tenant is told.
    let mut too_many = None;
    for step in &mut plan.steps {
        if let Step::Replace { record, .. } = step {
            let lookups = spf::lookups_if_published(&ctx.dns, &record.name, &record.value).await;
            if lookups > spf::MAX_DNS_LOOKUPS {
                too_many = Some((record.name.clone(), record.value.clone(), lookups));
            }
        }
    }
    if too_many.is_some() {
        plan.steps.retain(|s| !matches!(s, Step::Replace { .. }));
    }
    for blocked in &plan.blocked {
        if let Blocked::Foreign {
            name,
            merged: Some(merged),
            ..
        } = blocked
        {
            let lookups = spf::lookups_if_published(&ctx.dns, name, merged).await;
            if lookups > spf::MAX_DNS_LOOKUPS {
                too_many = Some((name.clone(), merged.clone(), lookups));
            }
        }
    }
    let mut ledger = plan.kept.clone();
    let mut problem = match too_many {
        Some((name, merged, lookups)) => Some((
            Reason::ForeignRecord,
            format!(
                "{name} has an SPF record the operator did not write that does not authorize the relay, and the merged record \"{merged}\" would need {lookups} DNS lookups (RFC 7208 allows 10): flatten or drop an include from the record, then publish the merged one"
            ),
        )),
        None => blocked_problem(&plan.blocked, &provider.spec),
    };
    let mut wrote = false;
    if !plan.steps.is_empty() {
        match client_for(provider, ctx).await {
            Err(error) => problem = Some(error),
            Ok(client) => {
                for step in &plan.steps {
                    match carry_out(&client, step, provider.spec.ttl).await {
                        Ok(entry) => {
                            wrote = true;
                            match (step, entry) {
                                (Step::Remove(_), _) => {}
                                (_, Some(mut entry)) => {
                                    entry.provider = id.clone();
                                    ledger.push(entry);
                                }
                                (_, None) => {}
                            }
                        }
                        Err(error) => {
                            if let Step::Remove(entry) = step {
                                ledger.push(entry.clone());
                            }
                            problem.get_or_insert_with(|| update_problem(&error, step));
                        }
                    }
                }
            }
        }
    }
    Through {
        ledger,
        problem,
        wrote,
    }
}

/// The API server's copy of the MailDomain, when its status differs from
/// `domain`'s at the same generation.
async fn newer_copy(domain: &MailDomain, namespace: &str, ctx: &Context) -> Option<MailDomain> {
    let fresh = Api::<MailDomain>::namespaced(ctx.client.clone(), namespace)
        .get_opt(&domain.name_any())
        .await
        .ok()??;
    (fresh.metadata.uid == domain.metadata.uid
        && fresh.metadata.generation == domain.metadata.generation
        && fresh.status != domain.status)
        .then_some(fresh)
}

/// The records `domain` needs by its own status, with the verdicts the
/// check found for the same records; one the check did not cover (or that
/// is only removable now) has no verdict, and so is never written.
fn outcomes_of(
    domain: &MailDomain,
    checked: &[RecordOutcome],
    delegation: &Delegation,
) -> Vec<RecordOutcome> {
    let keys = super::decide::known_keys(domain, super::decide::KeySecret::Absent);
    let spf = checked.iter().find_map(|o| match &o.record.requirement {
        crate::dns::Requirement::SpfAuthorizes(a) => Some(a.clone()),
        _ => None,
    });
    crate::dns::expected_records(
        &domain.spec.domain,
        &domain.spec,
        &keys,
        spf.as_ref(),
        delegation.base(),
    )
    .into_iter()
    .map(|record| {
        let verdict = checked
            .iter()
            .find(|o| {
                o.record.name == record.name
                    && o.record.value == record.value
                    && !record.is_removable()
            })
            .and_then(|o| o.verdict.clone());
        RecordOutcome { record, verdict }
    })
    .collect()
}

/// Removes every record the ledger holds (the MailDomain is being deleted),
/// each through the provider that wrote it. Records written through a
/// provider that is gone or no longer admits the namespace stay: there is
/// no way left to remove them, and the tenant is told in an event.
pub async fn remove_all(domain: &MailDomain, namespace: &str, ctx: &Context) -> Result<(), String> {
    let previous = domain
        .status
        .as_ref()
        .map(|s| s.published.clone())
        .unwrap_or_default();
    let mut ids: Vec<&str> = previous.iter().map(|e| e.provider.as_str()).collect();
    ids.sort();
    ids.dedup();
    let mut left = Vec::new();
    for id in ids {
        let Some((provider_namespace, provider_name)) = id.split_once('/') else {
            continue;
        };
        let at = (provider_namespace.to_string(), provider_name.to_string());
        let removed = async {
            let provider = admitted_provider(&at, namespace, ctx).map_err(|(_, why)| why)?;
            let client = client_for(&provider, ctx).await.map_err(|(_, why)| why)?;
            for entry in previous.iter().filter(|e| e.provider == id) {
                carry_out(&client, &Step::Remove(entry.clone()), provider.spec.ttl)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        };
        if let Err(why) = removed.await {
            left.push(format!("{why}; the records DNSProvider {id} wrote stay"));
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(left.join("; "))
    }
}

/// A DKIM record that carries this domain's own public key was written by
/// the operator (nobody else holds the key), even if a crash came between
/// writing it and recording it: it joins the ledger, so it is removed once
/// its key retires. DMARC and SPF records are never adopted: a tenant may
/// have typed the same text by hand, and those stay the tenant's.
fn adopt_our_dkim_records(
    ledger: &mut Vec<PublishedRecord>,
    outcomes: &[RecordOutcome],
    provider: &crate::api::DNSProviderSpec,
    id: &str,
) {
    for outcome in outcomes {
        let record = &outcome.record;
        let verified = outcome.verdict.as_ref().is_some_and(|v| v.is_verified());
        if record.purpose != crate::api::RecordPurpose::Dkim
            || !verified
            || ledger
                .iter()
                .any(|e| e.name == record.name && e.value == record.value)
        {
            continue;
        }
        if let Some(zone) = provider.zone_of(&record.name) {
            ledger.push(PublishedRecord {
                name: record.name.clone(),
                type_: "TXT".into(),
                value: record.value.clone(),
                zone: zone.to_string(),
                provider: id.to_string(),
            });
        }
    }
}

fn blocked_problem(
    blocked: &[Blocked],
    provider: &crate::api::DNSProviderSpec,
) -> Option<(Reason, String)> {
    let first = blocked.first()?;
    Some(match first {
        Blocked::OutsideZones { name } => (
            Reason::ZoneNotGranted,
            format!(
                "{name} is in none of the provider's zones ({}); nothing was written there: ask for a provider that holds the zone",
                provider.zones.join(", ")
            ),
        ),
        Blocked::Foreign {
            name,
            purpose,
            found,
            merged: Some(merged),
        } => (
            Reason::ForeignRecord,
            format!(
                "{name} has an {purpose} record the operator did not write and that does not authorize the relay: \"{found}\". Publish this one record instead: \"{merged}\" (or set spec.dns.manageSPF to let the operator replace it)"
            ),
        ),
        Blocked::Foreign {
            name,
            purpose,
            found,
            merged: None,
        } => (
            Reason::ForeignRecord,
            format!(
                "{name} has a record the operator did not write in the way of the {purpose} record: \"{found}\"; the operator never changes it: fix or remove it"
            ),
        ),
    })
}

fn update_problem(error: &UpdateError, step: &Step) -> (Reason, String) {
    let reason = match error {
        UpdateError::BadTsig { .. } => Reason::BadTsig,
        UpdateError::ZoneNotServed { .. } => Reason::ZoneNotServed,
        UpdateError::Refused { .. } => Reason::UpdateRefused,
        UpdateError::PreconditionFailed { .. } => Reason::ForeignRecord,
        UpdateError::Unreachable { .. } | UpdateError::Failed { .. } | UpdateError::Invalid(_) => {
            Reason::PublishFailed
        }
    };
    let name = match step {
        Step::Add { record, .. } | Step::Replace { record, .. } => record.name.as_str(),
        Step::Remove(entry) => entry.name.as_str(),
    };
    (reason, format!("writing {name}: {error}"))
}

/// The RFC 2136 client of a provider, with its TSIG secret read from the
/// provider's namespace.
async fn client_for(
    provider: &DNSProvider,
    ctx: &Context,
) -> Result<Rfc2136Client, (Reason, String)> {
    let Some(rfc2136) = &provider.spec.rfc2136 else {
        return Err((
            Reason::PublishFailed,
            "externalDNS providers are not supported by this operator version yet".into(),
        ));
    };
    let namespace = provider.namespace().unwrap_or_default();
    let name = &rfc2136.tsig_secret_ref.name;
    let bad = |why: String| {
        (
            Reason::BadTsig,
            format!(
                "the TSIG secret of DNSProvider {namespace}/{}: {why}",
                provider.name_any()
            ),
        )
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| {
            (
                Reason::PublishFailed,
                format!("reading Secret {namespace}/{name}: {e}"),
            )
        })?
        .ok_or_else(|| bad(format!("Secret {name} does not exist")))?;
    let encoded = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&rfc2136.tsig_secret_ref.key))
        .ok_or_else(|| {
            bad(format!(
                "Secret {name} has no key {}",
                rfc2136.tsig_secret_ref.key
            ))
        })?;
    let text = String::from_utf8_lossy(&encoded.0);
    let key = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| {
            bad(format!(
                "{}/{} is not base64",
                name, rfc2136.tsig_secret_ref.key
            ))
        })?;
    let server: SocketAddr = rfc2136.server.parse().map_err(|_| {
        (
            Reason::PublishFailed,
            format!("{} is not an address and port", rfc2136.server),
        )
    })?;
    Rfc2136Client::new(server, &rfc2136.tsig_key_name, rfc2136.tsig_algorithm, key)
        .map_err(|e| (Reason::BadTsig, e.to_string()))
}

/// One step at the server. Returns the ledger entry of what was written.
async fn carry_out(
    client: &Rfc2136Client,
    step: &Step,
    ttl: u32,
) -> Result<Option<PublishedRecord>, UpdateError> {
    let entry = |zone: &str, record: &crate::dns::ExpectedRecord| PublishedRecord {
        name: record.name.clone(),
        type_: "TXT".into(),
        value: record.value.clone(),
        zone: zone.to_string(),
        provider: String::new(),
    };
    match step {
        Step::Add {
            zone,
            record,
            precondition,
        } => {
            let current = client.txt(zone, &record.name).await?;
            if current
                .iter()
                .any(|strings| strings.concat() == record.value)
            {
                // Already there (written before the resolver caught up).
                return Ok(Some(entry(zone, record)));
            }
            let add = [Change::AddTxt {
                name: &record.name,
                strings: &record.strings,
            }];
            let prerequisite = match precondition {
                Precondition::NoTxt => Prerequisite::NoTxt { name: &record.name },
                Precondition::TxtUnchanged if current.is_empty() => {
                    Prerequisite::NoTxt { name: &record.name }
                }
                Precondition::TxtUnchanged => {
                    if current
                        .iter()
                        .any(|s| crate::dns::spf::spf_records(&[s.concat()]).len() == 1)
                    {
                        // An SPF record appeared since the check: never a second.
                        return Err(UpdateError::PreconditionFailed {
                            rcode: "an SPF record is already there".into(),
                        });
                    }
                    Prerequisite::TxtIs {
                        name: &record.name,
                        records: &current,
                    }
                }
            };
            client.update(zone, &[prerequisite], &add, ttl).await?;
            Ok(Some(entry(zone, record)))
        }
        Step::Replace { zone, old, record } => {
            let current = client.txt(zone, &record.name).await?;
            let Some(old_strings) = current.iter().find(|s| s.concat() == *old) else {
                return Err(UpdateError::PreconditionFailed {
                    rcode: "the SPF record changed since it was read".into(),
                });
            };
            client
                .update(
                    zone,
                    &[Prerequisite::TxtIs {
                        name: &record.name,
                        records: &current,
                    }],
                    &[
                        Change::DeleteTxt {
                            name: &record.name,
                            strings: old_strings,
                        },
                        Change::AddTxt {
                            name: &record.name,
                            strings: &record.strings,
                        },
                    ],
                    ttl,
                )
                .await?;
            Ok(Some(entry(zone, record)))
        }
        Step::Remove(published) => {
            // Exactly the value written, as it was split when written.
            let strings = crate::dkim::split_txt(&published.value);
            client
                .update(
                    &published.zone,
                    &[],
                    &[Change::DeleteTxt {
                        name: &published.name,
                        strings: &strings,
                    }],
                    ttl,
                )
                .await?;
            Ok(None)
        }
    }
}
