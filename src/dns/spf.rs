//! SPF: exactly one valid record, within the RFC 7208 lookup limits, that
//! authorizes the relay.
//!
//! Two passes over the same memoized lookups (so the second costs no
//! queries for names the first already asked):
//! 1. **Analysis** walks the whole record tree (includes and redirect),
//!    counting every DNS-querying term (`include`, `a`, `mx`, `ptr`,
//!    `exists`, `redirect`) and void lookups, finding include loops and
//!    terms that authorize everyone. This is a property of the record, the
//!    way receivers' checkers and checkdmarc report it, whatever the
//!    client address.
//! 2. **Evaluation** runs RFC 7208 `check_host()` for each relay address
//!    and must give `pass`. `ptr` never matches (we do no reverse lookups;
//!    RFC 7208 5.5 says not to use it).
//!
//! When the relay names only an `include:`, "authorized" means the record
//! includes that name, directly or through nested includes.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::spf::{Macro, Mechanism, Qualifier, Spf, Variables};
use serde::Serialize;

use super::Verdict;
use super::resolver::{AddressFamily, DnsLookup, LookupError};
use crate::api::SpfAuthorization;

/// RFC 7208 4.6.4: at most 10 DNS-querying terms per evaluation.
pub const MAX_DNS_LOOKUPS: u32 = 10;
/// RFC 7208 4.6.4: at most 2 lookups that return nothing.
pub const MAX_VOID_LOOKUPS: u32 = 2;

/// What a domain's SPF record must authorize.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpfRequirement {
    /// A name the record must include (checked only when there are no
    /// egress ranges, which are the stronger test).
    pub include: Option<String>,
    /// Ranges mail leaves from; each must evaluate to `pass`.
    pub egress: Vec<EgressRange>,
}

/// One egress address or CIDR range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressRange {
    pub network: IpAddr,
    pub prefix: u8,
}

/// An egress entry that is neither an address nor a CIDR range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an IP address or CIDR range such as 192.0.2.10 or 2001:db8::/48")]
pub struct InvalidEgress(pub String);

impl EgressRange {
    pub fn parse(text: &str) -> Result<Self, InvalidEgress> {
        let invalid = || InvalidEgress(text.to_string());
        let (address, prefix) = match text.split_once('/') {
            Some((address, prefix)) => (address, Some(prefix)),
            None => (text, None),
        };
        let network: IpAddr = address.trim().parse().map_err(|_| invalid())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(prefix) => prefix.trim().parse::<u8>().map_err(|_| invalid())?,
            None => max,
        };
        if prefix > max {
            return Err(invalid());
        }
        Ok(Self { network, prefix })
    }

    /// The addresses evaluated for this range: its first and last. A record
    /// that passes both covers the range for every practical record (SPF
    /// ranges are CIDR blocks too).
    pub fn probe_addresses(&self) -> Vec<IpAddr> {
        match self.network {
            IpAddr::V4(network) => {
                let host_bits = 32 - u32::from(self.prefix);
                let mask = u32::MAX.checked_shl(host_bits).unwrap_or(0);
                let first = u32::from(network) & mask;
                let last = first | !mask;
                dedup([first.into(), last.into()].map(IpAddr::V4))
            }
            IpAddr::V6(network) => {
                let host_bits = 128 - u32::from(self.prefix);
                let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
                let first = u128::from(network) & mask;
                let last = first | !mask;
                dedup([first.into(), last.into()].map(IpAddr::V6))
            }
        }
    }
}

fn dedup(addresses: [IpAddr; 2]) -> Vec<IpAddr> {
    if addresses[0] == addresses[1] {
        vec![addresses[0]]
    } else {
        addresses.to_vec()
    }
}

impl SpfRequirement {
    /// What a relay's `spec.spf` asks of tenants.
    pub fn from_authorization(authorization: &SpfAuthorization) -> Result<Self, InvalidEgress> {
        Ok(Self {
            include: authorization.include.as_deref().map(normalize_name),
            egress: authorization
                .egress_ips
                .iter()
                .map(|ip| EgressRange::parse(ip))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.include.is_none() && self.egress.is_empty()
    }
}

/// The result of RFC 7208 `check_host()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

impl From<&Qualifier> for SpfResult {
    fn from(qualifier: &Qualifier) -> Self {
        match qualifier {
            Qualifier::Pass => Self::Pass,
            Qualifier::Fail => Self::Fail,
            Qualifier::SoftFail => Self::SoftFail,
            Qualifier::Neutral => Self::Neutral,
        }
    }
}

/// Something wrong with an SPF record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind")]
pub enum SpfProblem {
    #[error("{name} has {count} v=spf1 records; RFC 7208 allows exactly one (permerror)")]
    MultipleRecords { name: String, count: usize },
    #[error("the SPF record at {name} does not parse: {record}")]
    Syntax { name: String, record: String },
    #[error("the record needs {count} DNS lookups; RFC 7208 allows at most 10 (permerror)")]
    TooManyLookups { count: u32 },
    #[error("the record causes {count} void DNS lookups; RFC 7208 allows at most 2 (permerror)")]
    TooManyVoidLookups { count: u32 },
    #[error("include loop: {}", chain.join(" -> "))]
    IncludeLoop { chain: Vec<String> },
    #[error("include:{target} has no SPF record ({reason}) (permerror)")]
    IncludeWithoutRecord { target: String, reason: String },
    #[error("redirect={target} has no SPF record ({reason}) (permerror)")]
    RedirectWithoutRecord { target: String, reason: String },
    #[error("`{term}` at {name} authorizes the whole internet to send as this domain")]
    AuthorizesEveryone { name: String, term: String },
    #[error("the record does not authorize {ip}: it evaluates to {result:?}")]
    NotAuthorized { ip: String, result: SpfResult },
    #[error("the record does not include {include}")]
    IncludeMissing { include: String },
}

impl SpfProblem {
    /// A problem that makes receivers return permerror: the record is
    /// invalid, not merely insufficient for us.
    pub fn is_permerror(&self) -> bool {
        matches!(
            self,
            Self::MultipleRecords { .. }
                | Self::Syntax { .. }
                | Self::TooManyLookups { .. }
                | Self::TooManyVoidLookups { .. }
                | Self::IncludeLoop { .. }
                | Self::IncludeWithoutRecord { .. }
                | Self::RedirectWithoutRecord { .. }
        )
    }
}

/// How one relay address fares.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AddressResult {
    pub ip: IpAddr,
    pub result: SpfResult,
}

/// The check of a domain's SPF record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpfOutcome {
    pub domain: String,
    pub verdict: Verdict,
    /// The record found, when exactly one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<String>,
    /// DNS-querying terms in the whole record tree.
    pub dns_lookups: u32,
    /// Lookups in the tree that returned nothing.
    pub void_lookups: u32,
    /// Every name included, directly or nested.
    pub includes: Vec<String>,
    pub problems: Vec<SpfProblem>,
    /// `check_host()` for each relay address.
    pub addresses: Vec<AddressResult>,
}

impl SpfOutcome {
    /// Exactly one record that receivers can evaluate (no permerror),
    /// whether or not it authorizes what we need.
    pub fn record_is_valid(&self) -> bool {
        self.record.is_some()
            && !self.problems.iter().any(SpfProblem::is_permerror)
            && !matches!(self.verdict, Verdict::Error { .. })
    }
}

/// Checks the SPF record at `domain` against `requirement`.
pub async fn check_spf(
    dns: &impl DnsLookup,
    domain: &str,
    requirement: &SpfRequirement,
) -> SpfOutcome {
    let domain = normalize_name(domain);
    let mut memo = Memo::new(dns);
    let mut outcome = SpfOutcome {
        domain: domain.clone(),
        verdict: Verdict::Verified,
        record: None,
        dns_lookups: 0,
        void_lookups: 0,
        includes: Vec::new(),
        problems: Vec::new(),
        addresses: Vec::new(),
    };
    let record = match memo.spf_record(&domain).await {
        SpfRecordAt::One(record) => record,
        SpfRecordAt::Absent(reason) => {
            outcome.verdict = Verdict::Missing { reason };
            return outcome;
        }
        SpfRecordAt::Failed(err) => {
            outcome.verdict = Verdict::Error {
                message: err.to_string(),
            };
            return outcome;
        }
        SpfRecordAt::Several(records) => {
            let problem = SpfProblem::MultipleRecords {
                name: domain.clone(),
                count: records.len(),
            };
            outcome.verdict = Verdict::Mismatch {
                found: records.join(" | "),
                problem: problem.to_string(),
            };
            outcome.problems.push(problem);
            return outcome;
        }
    };
    outcome.record = Some(record.clone());

    let mut analysis = Analysis::default();
    analyze(
        &mut memo,
        &mut analysis,
        domain.clone(),
        vec![domain.clone()],
    )
    .await;
    outcome.dns_lookups = analysis.lookups;
    outcome.void_lookups = analysis.voids;
    outcome.includes = analysis.includes.iter().cloned().collect();
    outcome.problems = analysis.problems;
    if analysis.lookups > MAX_DNS_LOOKUPS {
        outcome.problems.push(SpfProblem::TooManyLookups {
            count: analysis.lookups,
        });
    }
    if analysis.voids > MAX_VOID_LOOKUPS {
        outcome.problems.push(SpfProblem::TooManyVoidLookups {
            count: analysis.voids,
        });
    }
    if let Some(err) = analysis.failure {
        outcome.verdict = Verdict::Error {
            message: err.to_string(),
        };
        return outcome;
    }

    let evaluated = outcome.problems.iter().any(SpfProblem::is_permerror);
    if !evaluated {
        for range in &requirement.egress {
            for ip in range.probe_addresses() {
                let mut limits = Limits::default();
                let result = check_host(&mut memo, &mut limits, ip, domain.clone()).await;
                if result == SpfResult::TempError {
                    let message = memo
                        .last_failure
                        .as_ref()
                        .map(LookupError::to_string)
                        .unwrap_or_else(|| format!("temporary DNS error evaluating SPF for {ip}"));
                    outcome.verdict = Verdict::Error { message };
                    outcome.addresses.push(AddressResult { ip, result });
                    return outcome;
                }
                if result != SpfResult::Pass {
                    outcome.problems.push(SpfProblem::NotAuthorized {
                        ip: ip.to_string(),
                        result,
                    });
                }
                outcome.addresses.push(AddressResult { ip, result });
            }
        }
        if requirement.egress.is_empty()
            && let Some(include) = &requirement.include
            && !analysis.includes.contains(include)
        {
            outcome.problems.push(SpfProblem::IncludeMissing {
                include: include.clone(),
            });
        }
    }
    // Permerrors first: they are what to fix first.
    outcome
        .problems
        .sort_by_key(|problem| !problem.is_permerror());
    outcome.verdict = match outcome.problems.first() {
        None => Verdict::Verified,
        Some(_) => Verdict::Mismatch {
            found: record,
            problem: outcome
                .problems
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        },
    };
    outcome
}

/// What is at a name, as far as SPF is concerned.
enum SpfRecordAt {
    One(String),
    Several(Vec<String>),
    /// NXDOMAIN, no TXT, or no `v=spf1` among the TXT records.
    Absent(String),
    Failed(LookupError),
}

/// RFC 7208 4.5: records that start with exactly `v=spf1` (then a space or
/// the end).
pub fn spf_records(txt_records: &[String]) -> Vec<&String> {
    txt_records
        .iter()
        .filter(|record| {
            let lower = record.to_ascii_lowercase();
            lower == "v=spf1" || lower.starts_with("v=spf1 ")
        })
        .collect()
}

/// Lookups made once per check, whatever the number of passes.
struct Memo<'d, L> {
    dns: &'d L,
    txt: HashMap<String, Result<Vec<String>, LookupError>>,
    mx: HashMap<String, Result<Vec<String>, LookupError>>,
    addresses: HashMap<(String, AddressFamily), Result<Vec<IpAddr>, LookupError>>,
    /// The last lookup that failed for an unknown reason, to explain a
    /// temperror.
    last_failure: Option<LookupError>,
}

impl<'d, L: DnsLookup> Memo<'d, L> {
    fn new(dns: &'d L) -> Self {
        Self {
            dns,
            txt: HashMap::new(),
            mx: HashMap::new(),
            addresses: HashMap::new(),
            last_failure: None,
        }
    }

    fn remember<T>(&mut self, result: &Result<T, LookupError>) {
        if let Err(err) = result
            && !err.is_absent()
        {
            self.last_failure = Some(err.clone());
        }
    }

    async fn txt(&mut self, name: &str) -> Result<Vec<String>, LookupError> {
        if let Some(result) = self.txt.get(name) {
            return result.clone();
        }
        let result = self.dns.txt(name).await;
        self.remember(&result);
        self.txt.insert(name.to_string(), result.clone());
        result
    }

    async fn mx(&mut self, name: &str) -> Result<Vec<String>, LookupError> {
        if let Some(result) = self.mx.get(name) {
            return result.clone();
        }
        let result = self.dns.mx(name).await;
        self.remember(&result);
        self.mx.insert(name.to_string(), result.clone());
        result
    }

    async fn addresses(
        &mut self,
        name: &str,
        family: AddressFamily,
    ) -> Result<Vec<IpAddr>, LookupError> {
        let key = (name.to_string(), family);
        if let Some(result) = self.addresses.get(&key) {
            return result.clone();
        }
        let result = self.dns.addresses(name, family).await;
        self.remember(&result);
        self.addresses.insert(key, result.clone());
        result
    }

    async fn spf_record(&mut self, name: &str) -> SpfRecordAt {
        match self.txt(name).await {
            Ok(records) => {
                let spf = spf_records(&records);
                match spf.as_slice() {
                    [] => SpfRecordAt::Absent(format!("{name} has no v=spf1 TXT record")),
                    [one] => SpfRecordAt::One((*one).clone()),
                    several => SpfRecordAt::Several(several.iter().map(|r| (*r).clone()).collect()),
                }
            }
            Err(err) if err.is_absent() => SpfRecordAt::Absent(err.to_string()),
            Err(err) => SpfRecordAt::Failed(err),
        }
    }
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the analysis walk counted and found.
#[derive(Default)]
struct Analysis {
    lookups: u32,
    voids: u32,
    includes: BTreeSet<String>,
    problems: Vec<SpfProblem>,
    /// A lookup that failed for an unknown reason: the counts are then
    /// incomplete and the verdict is an error.
    failure: Option<LookupError>,
}

impl Analysis {
    fn fail(&mut self, err: LookupError) {
        self.failure.get_or_insert(err);
    }
}

/// Walks the record at `domain` (known to exist, `chain` ends with it).
fn analyze<'a, 'd: 'a, L: DnsLookup>(
    memo: &'a mut Memo<'d, L>,
    analysis: &'a mut Analysis,
    domain: String,
    chain: Vec<String>,
) -> BoxFuture<'a, ()> {
    Box::pin(async move {
        let record = match memo.spf_record(&domain).await {
            SpfRecordAt::One(record) => record,
            // Callers only walk names whose record they fetched.
            SpfRecordAt::Absent(_) | SpfRecordAt::Several(_) | SpfRecordAt::Failed(_) => return,
        };
        let spf = match Spf::parse(record.as_bytes()) {
            Ok(spf) => spf,
            Err(_) => {
                analysis.problems.push(SpfProblem::Syntax {
                    name: domain.clone(),
                    record,
                });
                return;
            }
        };
        let mut has_all = false;
        for directive in spf.directives.iter() {
            // Past the limit the record is a permerror anyway; stop asking.
            if analysis.lookups > MAX_DNS_LOOKUPS || analysis.failure.is_some() {
                return;
            }
            let everyone = |term: &str| SpfProblem::AuthorizesEveryone {
                name: domain.clone(),
                term: term.to_string(),
            };
            let passes = directive.qualifier == Qualifier::Pass;
            match &directive.mechanism {
                Mechanism::All => {
                    has_all = true;
                    if passes {
                        analysis.problems.push(everyone("+all"));
                    }
                }
                Mechanism::Ip4 { mask: 0, .. } if passes => {
                    analysis.problems.push(everyone("ip4:0.0.0.0/0"));
                }
                Mechanism::Ip6 { mask: 0, .. } if passes => {
                    analysis.problems.push(everyone("ip6:::/0"));
                }
                Mechanism::Ip4 { .. } | Mechanism::Ip6 { .. } => {}
                Mechanism::Ptr { .. } | Mechanism::Exists { .. } => analysis.lookups += 1,
                Mechanism::A { macro_string, .. } => {
                    analysis.lookups += 1;
                    let Some(target) = literal_target(macro_string, &domain) else {
                        continue;
                    };
                    match memo.addresses(&target, AddressFamily::V4).await {
                        Ok(_) => {}
                        Err(err) if err.is_absent() => {
                            match memo.addresses(&target, AddressFamily::V6).await {
                                Ok(_) => {}
                                Err(err) if err.is_absent() => analysis.voids += 1,
                                Err(err) => analysis.fail(err),
                            }
                        }
                        Err(err) => analysis.fail(err),
                    }
                }
                Mechanism::Mx { macro_string, .. } => {
                    analysis.lookups += 1;
                    let Some(target) = literal_target(macro_string, &domain) else {
                        continue;
                    };
                    match memo.mx(&target).await {
                        Ok(_) => {}
                        Err(err) if err.is_absent() => analysis.voids += 1,
                        Err(err) => analysis.fail(err),
                    }
                }
                Mechanism::Include { macro_string } => {
                    analysis.lookups += 1;
                    let Some(target) = literal_target(macro_string, &domain) else {
                        continue;
                    };
                    follow(memo, analysis, &target, &chain, Follow::Include).await;
                }
            }
        }
        // RFC 7208 6.1: redirect is ignored when the record has `all`.
        if let Some(redirect) = &spf.redirect
            && !has_all
            && analysis.failure.is_none()
        {
            analysis.lookups += 1;
            if let Some(target) = literal_target(redirect, &domain) {
                follow(memo, analysis, &target, &chain, Follow::Redirect).await;
            }
        }
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Follow {
    Include,
    Redirect,
}

/// Fetches the record an include or redirect points to and walks it.
async fn follow<L: DnsLookup>(
    memo: &mut Memo<'_, L>,
    analysis: &mut Analysis,
    target: &str,
    chain: &[String],
    kind: Follow,
) {
    if chain.iter().any(|name| name == target) {
        let mut chain = chain.to_vec();
        chain.push(target.to_string());
        analysis.problems.push(SpfProblem::IncludeLoop { chain });
        return;
    }
    let without_record = |reason: String| match kind {
        Follow::Include => SpfProblem::IncludeWithoutRecord {
            target: target.to_string(),
            reason,
        },
        Follow::Redirect => SpfProblem::RedirectWithoutRecord {
            target: target.to_string(),
            reason,
        },
    };
    match memo.spf_record(target).await {
        SpfRecordAt::One(_) => {
            if kind == Follow::Include {
                analysis.includes.insert(target.to_string());
            }
            let mut chain = chain.to_vec();
            chain.push(target.to_string());
            analyze(memo, analysis, target.to_string(), chain).await;
        }
        SpfRecordAt::Absent(reason) => {
            analysis.voids += 1;
            analysis.problems.push(without_record(reason));
        }
        SpfRecordAt::Several(records) => analysis.problems.push(SpfProblem::MultipleRecords {
            name: target.to_string(),
            count: records.len(),
        }),
        SpfRecordAt::Failed(err) => analysis.fail(err),
    }
}

/// The target of a term when it has no macro to expand: the term's domain,
/// or the current domain when it names none.
fn literal_target(macro_string: &Macro, domain: &str) -> Option<String> {
    match macro_string {
        Macro::None => Some(domain.to_string()),
        Macro::Literal(bytes) => std::str::from_utf8(bytes).ok().map(normalize_name),
        Macro::Variable { .. } | Macro::List(_) => None,
    }
}

/// The lookup counters of one `check_host()` evaluation.
#[derive(Default)]
struct Limits {
    lookups: u32,
    voids: u32,
}

impl Limits {
    /// Counts a DNS-querying term; false once over the limit.
    fn lookup(&mut self) -> bool {
        self.lookups += 1;
        self.lookups <= MAX_DNS_LOOKUPS
    }

    /// Counts a void lookup; false once over the limit.
    fn void(&mut self) -> bool {
        self.voids += 1;
        self.voids <= MAX_VOID_LOOKUPS
    }
}

/// RFC 7208 4 `check_host(ip, domain, sender)`, the sender being
/// `postmaster@<domain>` (what a bounce would carry).
fn check_host<'a, 'd: 'a, L: DnsLookup>(
    memo: &'a mut Memo<'d, L>,
    limits: &'a mut Limits,
    ip: IpAddr,
    domain: String,
) -> BoxFuture<'a, SpfResult> {
    Box::pin(async move {
        let record = match memo.spf_record(&domain).await {
            SpfRecordAt::One(record) => record,
            SpfRecordAt::Absent(_) => return SpfResult::None,
            SpfRecordAt::Several(_) => return SpfResult::PermError,
            SpfRecordAt::Failed(_) => return SpfResult::TempError,
        };
        let Ok(spf) = Spf::parse(record.as_bytes()) else {
            return SpfResult::PermError;
        };
        let family = AddressFamily::of(&ip);
        let mut has_all = false;
        for directive in spf.directives.iter() {
            let matched = match &directive.mechanism {
                Mechanism::All => {
                    has_all = true;
                    true
                }
                Mechanism::Ip4 { addr, mask } => match ip {
                    IpAddr::V4(ip) => u32::from(ip) & mask == u32::from(*addr) & mask,
                    IpAddr::V6(_) => false,
                },
                Mechanism::Ip6 { addr, mask } => match ip {
                    IpAddr::V6(ip) => u128::from(ip) & mask == u128::from(*addr) & mask,
                    IpAddr::V4(_) => false,
                },
                Mechanism::A {
                    macro_string,
                    ip4_mask,
                    ip6_mask,
                } => {
                    if !limits.lookup() {
                        return SpfResult::PermError;
                    }
                    let target = expand(macro_string, &domain, ip);
                    match memo.addresses(&target, family).await {
                        Ok(addresses) => addresses
                            .iter()
                            .any(|candidate| same_network(ip, *candidate, *ip4_mask, *ip6_mask)),
                        Err(err) if err.is_absent() => {
                            if !limits.void() {
                                return SpfResult::PermError;
                            }
                            false
                        }
                        Err(_) => return SpfResult::TempError,
                    }
                }
                Mechanism::Mx {
                    macro_string,
                    ip4_mask,
                    ip6_mask,
                } => {
                    if !limits.lookup() {
                        return SpfResult::PermError;
                    }
                    let target = expand(macro_string, &domain, ip);
                    match memo.mx(&target).await {
                        Ok(hosts) => {
                            // RFC 7208 4.6.4: at most 10 MX names to look up.
                            if hosts.len() > 10 {
                                return SpfResult::PermError;
                            }
                            let mut matched = false;
                            for host in hosts {
                                match memo.addresses(&host, family).await {
                                    Ok(addresses) => {
                                        if addresses.iter().any(|candidate| {
                                            same_network(ip, *candidate, *ip4_mask, *ip6_mask)
                                        }) {
                                            matched = true;
                                            break;
                                        }
                                    }
                                    Err(err) if err.is_absent() => {}
                                    Err(_) => return SpfResult::TempError,
                                }
                            }
                            matched
                        }
                        Err(err) if err.is_absent() => {
                            if !limits.void() {
                                return SpfResult::PermError;
                            }
                            false
                        }
                        Err(_) => return SpfResult::TempError,
                    }
                }
                Mechanism::Include { macro_string } => {
                    if !limits.lookup() {
                        return SpfResult::PermError;
                    }
                    let target = expand(macro_string, &domain, ip);
                    if memo_is_void(memo, &target).await && !limits.void() {
                        return SpfResult::PermError;
                    }
                    match check_host(memo, limits, ip, target).await {
                        SpfResult::Pass => true,
                        SpfResult::Fail | SpfResult::SoftFail | SpfResult::Neutral => false,
                        SpfResult::TempError => return SpfResult::TempError,
                        SpfResult::PermError | SpfResult::None => return SpfResult::PermError,
                    }
                }
                Mechanism::Exists { macro_string } => {
                    if !limits.lookup() {
                        return SpfResult::PermError;
                    }
                    let target = expand(macro_string, &domain, ip);
                    match memo.addresses(&target, AddressFamily::V4).await {
                        Ok(addresses) => !addresses.is_empty(),
                        Err(err) if err.is_absent() => {
                            if !limits.void() {
                                return SpfResult::PermError;
                            }
                            false
                        }
                        Err(_) => return SpfResult::TempError,
                    }
                }
                Mechanism::Ptr { .. } => {
                    if !limits.lookup() {
                        return SpfResult::PermError;
                    }
                    false
                }
            };
            if matched {
                return SpfResult::from(&directive.qualifier);
            }
        }
        match &spf.redirect {
            Some(redirect) if !has_all => {
                if !limits.lookup() {
                    return SpfResult::PermError;
                }
                let target = expand(redirect, &domain, ip);
                if memo_is_void(memo, &target).await && !limits.void() {
                    return SpfResult::PermError;
                }
                match check_host(memo, limits, ip, target).await {
                    // RFC 7208 6.1: a redirect to a name without SPF is a
                    // permerror.
                    SpfResult::None => SpfResult::PermError,
                    other => other,
                }
            }
            _ => SpfResult::Neutral,
        }
    })
}

/// Whether the TXT lookup of `name` is void (NXDOMAIN or empty answer).
async fn memo_is_void<L: DnsLookup>(memo: &mut Memo<'_, L>, name: &str) -> bool {
    matches!(memo.txt(name).await, Err(err) if err.is_absent())
}

fn same_network(ip: IpAddr, candidate: IpAddr, ip4_mask: u32, ip6_mask: u128) -> bool {
    match (ip, candidate) {
        (IpAddr::V4(ip), IpAddr::V4(candidate)) => {
            u32::from(ip) & ip4_mask == u32::from(candidate) & ip4_mask
        }
        (IpAddr::V6(ip), IpAddr::V6(candidate)) => {
            u128::from(ip) & ip6_mask == u128::from(candidate) & ip6_mask
        }
        _ => false,
    }
}

/// Expands a term's domain-spec (RFC 7208 7) for `ip` and `domain`.
fn expand(macro_string: &Macro, domain: &str, ip: IpAddr) -> String {
    if let Some(target) = literal_target(macro_string, domain) {
        return target;
    }
    let mut variables = Variables::new();
    variables.set_ip(&ip);
    variables.set_sender(format!("postmaster@{domain}").into_bytes());
    variables.set_domain(domain.as_bytes().to_vec());
    variables.set_helo_domain(domain.as_bytes().to_vec());
    variables.set_host_domain(b"mailauth-operator".to_vec());
    normalize_name(&macro_string.eval(&variables, domain, true))
}

/// Lowercase, no trailing dot: how names are compared here.
/// How many DNS-querying terms `record` would need if it were the SPF
/// record at `domain` (RFC 7208 4.6.4, counted over the whole tree as
/// [`check_spf`] counts it), its includes resolved through `dns`: for a
/// record the operator proposes before anyone publishes it.
pub async fn lookups_if_published(dns: &impl DnsLookup, domain: &str, record: &str) -> u32 {
    let overlay = Proposed {
        inner: dns,
        name: normalize_name(domain),
        record: record.to_string(),
    };
    check_spf(&overlay, domain, &SpfRequirement::default())
        .await
        .dns_lookups
}

/// `inner`, except that `name` holds exactly the TXT record `record`.
struct Proposed<'a, D> {
    inner: &'a D,
    name: String,
    record: String,
}

impl<D: DnsLookup> DnsLookup for Proposed<'_, D> {
    async fn txt(&self, name: &str) -> Result<Vec<String>, LookupError> {
        if normalize_name(name) == self.name {
            return Ok(vec![self.record.clone()]);
        }
        self.inner.txt(name).await
    }

    async fn mx(&self, name: &str) -> Result<Vec<String>, LookupError> {
        self.inner.mx(name).await
    }

    async fn cname(&self, name: &str) -> Result<String, LookupError> {
        self.inner.cname(name).await
    }

    async fn addresses(
        &self,
        name: &str,
        family: AddressFamily,
    ) -> Result<Vec<IpAddr>, LookupError> {
        self.inner.addresses(name, family).await
    }
}

fn normalize_name(name: &str) -> String {
    name.trim().trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_proposed_record_is_counted_with_its_includes_resolved() {
        let dns = crate::dns::testing::FakeDns::default()
            .txt("acme.test", "v=spf1 -all")
            .txt("_spf.a.test", "v=spf1 include:_spf.b.test -all")
            .txt("_spf.b.test", "v=spf1 ip4:192.0.2.1 -all");
        assert_eq!(
            lookups_if_published(&dns, "acme.test", "v=spf1 mx include:_spf.a.test ~all").await,
            3
        );
        assert_eq!(
            lookups_if_published(&dns, "acme.test", "v=spf1 ip4:192.0.2.7 ~all").await,
            0
        );
    }
    use crate::dns::testing::FakeDns;

    fn requirement(ips: &[&str]) -> SpfRequirement {
        SpfRequirement {
            include: None,
            egress: ips
                .iter()
                .map(|ip| EgressRange::parse(ip).unwrap())
                .collect(),
        }
    }

    async fn check(dns: &FakeDns, ips: &[&str]) -> SpfOutcome {
        check_spf(dns, "acme.test", &requirement(ips)).await
    }

    #[test]
    fn egress_ranges_parse_and_probe_their_ends() {
        let single = EgressRange::parse("192.0.2.10").unwrap();
        assert_eq!(
            single.probe_addresses(),
            ["192.0.2.10".parse::<IpAddr>().unwrap()]
        );
        let block = EgressRange::parse("192.0.2.0/24").unwrap();
        assert_eq!(
            block.probe_addresses(),
            [
                "192.0.2.0".parse::<IpAddr>().unwrap(),
                "192.0.2.255".parse().unwrap()
            ]
        );
        let v6 = EgressRange::parse("2001:db8::/48").unwrap();
        assert_eq!(
            v6.probe_addresses()[1],
            "2001:db8:0:ffff:ffff:ffff:ffff:ffff"
                .parse::<IpAddr>()
                .unwrap()
        );
        assert!(EgressRange::parse("192.0.2.0/33").is_err());
        assert!(EgressRange::parse("relay.example").is_err());
        assert_eq!(
            EgressRange::parse("0.0.0.0/0")
                .unwrap()
                .probe_addresses()
                .len(),
            2
        );
    }

    #[tokio::test]
    async fn authorized_ips_verify_and_the_lookups_are_counted() {
        let dns = FakeDns::default()
            .txt(
                "acme.test",
                "v=spf1 ip4:192.0.2.0/24 include:_spf.relay.test a mx ~all",
            )
            .txt("_spf.relay.test", "v=spf1 ip6:2001:db8::/32 -all")
            .a("acme.test", "198.51.100.1")
            .mx("acme.test", "mail.acme.test")
            .a("mail.acme.test", "198.51.100.2");
        let outcome = check(&dns, &["192.0.2.7", "2001:db8::5", "198.51.100.2"]).await;
        assert_eq!(outcome.verdict, Verdict::Verified, "{outcome:?}");
        assert_eq!(outcome.dns_lookups, 3);
        assert_eq!(outcome.void_lookups, 0);
        assert_eq!(outcome.includes, ["_spf.relay.test"]);
        assert!(
            outcome
                .addresses
                .iter()
                .all(|a| a.result == SpfResult::Pass)
        );
    }

    #[tokio::test]
    async fn an_unlisted_ip_is_a_mismatch_with_its_result() {
        let dns = FakeDns::default().txt("acme.test", "v=spf1 ip4:192.0.2.1 -all");
        let outcome = check(&dns, &["203.0.113.9"]).await;
        assert!(outcome.record_is_valid());
        assert!(
            matches!(&outcome.verdict, Verdict::Mismatch { problem, .. } if problem.contains("203.0.113.9"))
        );
        assert_eq!(outcome.addresses[0].result, SpfResult::Fail);
    }

    #[tokio::test]
    async fn two_records_are_a_permerror() {
        let dns = FakeDns::default()
            .txt("acme.test", "v=spf1 -all")
            .txt("acme.test", "v=spf1 ip4:192.0.2.1 -all")
            .txt("acme.test", "google-site-verification=abc");
        let outcome = check(&dns, &[]).await;
        assert!(!outcome.record_is_valid());
        assert_eq!(
            outcome.problems,
            [SpfProblem::MultipleRecords {
                name: "acme.test".into(),
                count: 2
            }]
        );
    }

    #[tokio::test]
    async fn absent_record_is_missing_but_a_dns_failure_is_an_error() {
        let dns = FakeDns::default().txt("acme.test", "hello");
        assert!(matches!(
            check(&dns, &[]).await.verdict,
            Verdict::Missing { .. }
        ));
        let nx = FakeDns::default();
        assert!(matches!(
            check(&nx, &[]).await.verdict,
            Verdict::Missing { .. }
        ));
        let failing = FakeDns::default().failing("acme.test");
        assert!(matches!(
            check(&failing, &[]).await.verdict,
            Verdict::Error { .. }
        ));
        let failing_include = FakeDns::default()
            .txt("acme.test", "v=spf1 include:_spf.relay.test -all")
            .failing("_spf.relay.test");
        assert!(matches!(
            check(&failing_include, &["192.0.2.1"]).await.verdict,
            Verdict::Error { .. }
        ));
    }

    #[tokio::test]
    async fn more_than_ten_lookups_is_a_permerror() {
        let mut dns = FakeDns::default().txt(
            "acme.test",
            "v=spf1 include:i1.test include:i2.test include:i3.test include:i4.test \
             include:i5.test include:i6.test -all",
        );
        for i in 1..=6 {
            dns = dns
                .txt(&format!("i{i}.test"), &format!("v=spf1 a:h{i}.test -all"))
                .a(&format!("h{i}.test"), "192.0.2.1");
        }
        let outcome = check(&dns, &["192.0.2.1"]).await;
        assert!(outcome.dns_lookups > 10, "{outcome:?}");
        assert!(outcome.problems.contains(&SpfProblem::TooManyLookups {
            count: outcome.dns_lookups
        }));
        assert!(!outcome.record_is_valid());
    }

    #[tokio::test]
    async fn exactly_ten_lookups_is_fine() {
        let mut dns = FakeDns::default().txt(
            "acme.test",
            "v=spf1 include:i1.test include:i2.test include:i3.test include:i4.test \
             include:i5.test -all",
        );
        for i in 1..=5 {
            dns = dns
                .txt(&format!("i{i}.test"), &format!("v=spf1 a:h{i}.test -all"))
                .a(&format!("h{i}.test"), &format!("192.0.2.{i}"));
        }
        let outcome = check(&dns, &["192.0.2.5"]).await;
        assert_eq!(outcome.dns_lookups, 10);
        assert_eq!(outcome.verdict, Verdict::Verified, "{outcome:?}");
    }

    #[tokio::test]
    async fn include_loops_are_found() {
        let dns = FakeDns::default()
            .txt("acme.test", "v=spf1 include:a.test -all")
            .txt("a.test", "v=spf1 include:b.test -all")
            .txt("b.test", "v=spf1 include:a.test -all");
        let outcome = check(&dns, &[]).await;
        assert!(outcome.problems.contains(&SpfProblem::IncludeLoop {
            chain: vec![
                "acme.test".into(),
                "a.test".into(),
                "b.test".into(),
                "a.test".into()
            ]
        }));
        assert!(!outcome.record_is_valid());
    }

    #[tokio::test]
    async fn more_than_two_void_lookups_is_a_permerror() {
        let dns = FakeDns::default().txt(
            "acme.test",
            "v=spf1 a:gone1.test a:gone2.test mx:gone3.test ip4:192.0.2.1 -all",
        );
        let outcome = check(&dns, &["192.0.2.1"]).await;
        assert_eq!(outcome.void_lookups, 3);
        assert!(
            outcome
                .problems
                .contains(&SpfProblem::TooManyVoidLookups { count: 3 })
        );
        let two = FakeDns::default().txt(
            "acme.test",
            "v=spf1 a:gone1.test a:gone2.test ip4:192.0.2.1 -all",
        );
        assert_eq!(check(&two, &["192.0.2.1"]).await.verdict, Verdict::Verified);
    }

    #[tokio::test]
    async fn plus_all_is_flagged_even_though_it_passes() {
        let dns = FakeDns::default().txt("acme.test", "v=spf1 +all");
        let outcome = check(&dns, &["192.0.2.1"]).await;
        assert!(outcome.record_is_valid());
        assert_eq!(outcome.addresses[0].result, SpfResult::Pass);
        assert!(
            matches!(&outcome.verdict, Verdict::Mismatch { problem, .. } if problem.contains("whole internet"))
        );
        let open_range = FakeDns::default().txt("acme.test", "v=spf1 ip4:0.0.0.0/0 -all");
        assert!(!check(&open_range, &[]).await.verdict.is_verified());
    }

    #[tokio::test]
    async fn include_requirement_is_met_by_nested_includes() {
        let dns = FakeDns::default()
            .txt("acme.test", "v=spf1 include:_spf.acme.test -all")
            .txt("_spf.acme.test", "v=spf1 include:_spf.relay.test -all")
            .txt("_spf.relay.test", "v=spf1 ip4:192.0.2.1 -all");
        let wanted = SpfRequirement {
            include: Some("_SPF.relay.test.".into()),
            egress: Vec::new(),
        };
        let wanted = SpfRequirement {
            include: wanted.include.as_deref().map(normalize_name),
            ..wanted
        };
        assert_eq!(
            check_spf(&dns, "acme.test", &wanted).await.verdict,
            Verdict::Verified
        );
        let other = SpfRequirement {
            include: Some("_spf.other.test".into()),
            egress: Vec::new(),
        };
        assert!(matches!(
            check_spf(&dns, "acme.test", &other).await.verdict,
            Verdict::Mismatch { problem, .. } if problem.contains("_spf.other.test")
        ));
    }

    #[tokio::test]
    async fn include_of_a_name_without_spf_is_a_permerror() {
        let dns = FakeDns::default().txt(
            "acme.test",
            "v=spf1 include:nothing.test ip4:192.0.2.1 -all",
        );
        let outcome = check(&dns, &["192.0.2.1"]).await;
        assert!(!outcome.record_is_valid());
        assert_eq!(outcome.void_lookups, 1);
    }

    #[tokio::test]
    async fn redirect_is_followed_and_counted() {
        let dns = FakeDns::default()
            .txt("acme.test", "v=spf1 redirect=_spf.relay.test")
            .txt("_spf.relay.test", "v=spf1 ip4:192.0.2.0/24 -all");
        let outcome = check(&dns, &["192.0.2.9"]).await;
        assert_eq!(outcome.verdict, Verdict::Verified);
        assert_eq!(outcome.dns_lookups, 1);
        let outside = check(&dns, &["198.51.100.1"]).await;
        assert_eq!(outside.addresses[0].result, SpfResult::Fail);
    }

    #[tokio::test]
    async fn exists_with_a_macro_is_expanded_per_address() {
        let dns = FakeDns::default()
            .txt("acme.test", "v=spf1 exists:%{i}._allow.acme.test -all")
            .a("192.0.2.1._allow.acme.test", "127.0.0.2");
        assert_eq!(check(&dns, &["192.0.2.1"]).await.verdict, Verdict::Verified);
        let denied = check(&dns, &["192.0.2.2"]).await;
        assert_eq!(denied.addresses[0].result, SpfResult::Fail);
    }

    #[tokio::test]
    async fn unparsable_record_is_a_permerror() {
        let dns = FakeDns::default().txt("acme.test", "v=spf1 ip4:not-an-ip -all");
        let outcome = check(&dns, &[]).await;
        assert!(matches!(
            outcome.problems.as_slice(),
            [SpfProblem::Syntax { .. }]
        ));
        assert!(!outcome.record_is_valid());
    }
}
