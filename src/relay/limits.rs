//! What one client may hold of a relay pod: connection slots (all, not yet
//! authenticated, per source), sessions and buffered bytes per tenant, and
//! how fast AUTH may fail. In-memory and clock-free (time is passed in), so
//! each rule is unit-tested.
//!
//! Strangers are bounded before they log in: at most
//! `maxUnauthenticatedConnections` slots of `maxConnections`, at most
//! `maxUnauthenticatedConnectionsPerSource` from one address, and (in the
//! session) a deadline to authenticate. A session that logs in leaves those
//! pools and counts against its tenant instead. docs/relay.md lists the
//! limits with their defaults.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use prometheus_client::metrics::gauge::Gauge;

use super::rate_limit::TokenBucket;
use crate::api::RelayLimits;

/// Where a connection comes from, for per-source limits: the IPv4 address,
/// or the /64 network of an IPv6 address (what one host usually has).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Source(u128);

impl From<IpAddr> for Source {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => Source(u128::from(u32::from(v4))),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source(u128::from(u32::from(v4))),
                None => Source((u128::from(v6) >> 64 << 64) | 1 << 63),
            },
        }
    }
}

/// Why a new connection is turned away (with a 421).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("too many connections")]
    TooManyConnections,
    #[error("too many connections that have not authenticated")]
    TooManyUnauthenticated,
    #[error("too many connections from your address")]
    TooManyFromSource,
}

impl Refused {
    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::TooManyConnections => "too_many_connections",
            Refused::TooManyUnauthenticated => "too_many_unauthenticated",
            Refused::TooManyFromSource => "too_many_from_source",
        }
    }
}

/// What one tenant holds in this pod right now.
#[derive(Debug, Default)]
pub struct TenantUsage {
    buffered: AtomicUsize,
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    unauthenticated: usize,
    per_source: HashMap<Source, usize>,
    /// Sessions per tenant, with the tenant's shared byte count.
    tenants: HashMap<String, (usize, Arc<TenantUsage>)>,
}

/// The connection slots of a relay pod.
#[derive(Debug, Default)]
pub struct Admission {
    counts: Mutex<Counts>,
}

impl Admission {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts> {
        // The counts stay consistent under a panic elsewhere: every change
        // is one statement.
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a slot for a new, unauthenticated connection from `peer`.
    pub fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        limits: &RelayLimits,
    ) -> Result<ConnectionPermit, Refused> {
        let source = Source::from(peer);
        let mut counts = self.counts();
        let max_unauthenticated = limits
            .max_unauthenticated_connections
            .min(limits.max_connections) as usize;
        if counts.open >= limits.max_connections as usize {
            return Err(Refused::TooManyConnections);
        }
        if counts.unauthenticated >= max_unauthenticated {
            return Err(Refused::TooManyUnauthenticated);
        }
        let from_source = counts.per_source.get(&source).copied().unwrap_or(0);
        if from_source >= limits.max_unauthenticated_connections_per_source as usize {
            return Err(Refused::TooManyFromSource);
        }
        counts.open += 1;
        counts.unauthenticated += 1;
        counts.per_source.insert(source, from_source + 1);
        Ok(ConnectionPermit {
            admission: self.clone(),
            source,
            tenant: None,
        })
    }

    /// Open connections, for tests and metrics.
    pub fn open(&self) -> usize {
        self.counts().open
    }

    fn leave_unauthenticated(counts: &mut Counts, source: Source) {
        counts.unauthenticated -= 1;
        if let Some(count) = counts.per_source.get_mut(&source) {
            *count -= 1;
            if *count == 0 {
                counts.per_source.remove(&source);
            }
        }
    }
}

/// Why AUTH is refused although the password is right (454).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("too many sessions for this account")]
pub struct TooManySessions;

/// One connection's slot; dropping it frees it.
#[derive(Debug)]
pub struct ConnectionPermit {
    admission: Arc<Admission>,
    source: Source,
    /// Set once the session authenticated.
    tenant: Option<(String, Arc<TenantUsage>)>,
}

impl ConnectionPermit {
    pub fn source(&self) -> Source {
        self.source
    }

    pub fn is_authenticated(&self) -> bool {
        self.tenant.is_some()
    }

    /// Moves the connection from the unauthenticated pool to `tenant`'s
    /// sessions, if the tenant has a session left.
    pub fn authenticate(&mut self, tenant: &str, max_sessions: u32) -> Result<(), TooManySessions> {
        if self.tenant.is_some() {
            return Ok(());
        }
        let mut counts = self.admission.counts();
        let (sessions, usage) = counts
            .tenants
            .entry(tenant.to_string())
            .or_insert_with(|| (0, Arc::new(TenantUsage::default())));
        if *sessions >= max_sessions as usize {
            if *sessions == 0 {
                counts.tenants.remove(tenant);
            }
            return Err(TooManySessions);
        }
        *sessions += 1;
        let usage = usage.clone();
        Admission::leave_unauthenticated(&mut counts, self.source);
        self.tenant = Some((tenant.to_string(), usage));
        Ok(())
    }

    /// Space for one message's data in the tenant's byte budget; `gauge`
    /// shows what all reservations hold.
    pub fn buffer(&self, limit: usize, gauge: Gauge) -> Option<BufferReservation> {
        self.tenant.as_ref().map(|(_, usage)| BufferReservation {
            usage: usage.clone(),
            limit,
            held: 0,
            gauge,
        })
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut counts = self.admission.counts();
        counts.open -= 1;
        match self.tenant.take() {
            None => Admission::leave_unauthenticated(&mut counts, self.source),
            Some((tenant, _)) => {
                if let Some((sessions, _)) = counts.tenants.get_mut(&tenant) {
                    *sessions -= 1;
                    if *sessions == 0 {
                        counts.tenants.remove(&tenant);
                    }
                }
            }
        }
    }
}

/// Bytes of one message counted against its tenant's budget; dropping it
/// gives them back.
#[derive(Debug)]
pub struct BufferReservation {
    usage: Arc<TenantUsage>,
    limit: usize,
    held: usize,
    gauge: Gauge,
}

impl BufferReservation {
    /// Grows the reservation to `total` bytes; false (holding nothing more)
    /// when that would pass the tenant's budget.
    pub fn grow_to(&mut self, total: usize) -> bool {
        if total <= self.held {
            return true;
        }
        let more = total - self.held;
        let before = self.usage.buffered.fetch_add(more, Ordering::Relaxed);
        if before + more > self.limit {
            self.usage.buffered.fetch_sub(more, Ordering::Relaxed);
            return false;
        }
        self.held = total;
        self.gauge.inc_by(i64::try_from(more).unwrap_or(i64::MAX));
        true
    }
}

impl Drop for BufferReservation {
    fn drop(&mut self) {
        self.usage.buffered.fetch_sub(self.held, Ordering::Relaxed);
        self.gauge
            .dec_by(i64::try_from(self.held).unwrap_or(i64::MAX));
    }
}

/// Failed logins allowed per source: a burst of this many, then this many
/// per minute.
pub const AUTH_FAILURES_PER_SOURCE: u32 = 10;
/// Failed logins allowed per username, from sources it never logged in
/// from: a burst, then this many per minute.
pub const AUTH_FAILURES_PER_USERNAME: u32 = 30;
/// How long a source that logged in as a username stays exempt from that
/// username's throttle.
const TRUSTED_FOR: Duration = Duration::from_secs(24 * 3600);
/// Sources remembered per username.
const TRUSTED_PER_USERNAME: usize = 8;
/// Entries kept before the full (forgotten) ones are swept.
const MAX_TRACKED: usize = 10_000;

/// Why AUTH is not even tried (454, without checking the password).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Throttled {
    #[error("too many failed logins from your address")]
    Source,
    #[error("too many failed logins for this username")]
    Username,
}

/// A username, keyed-hashed: what the throttle remembers and what logs
/// show for a failed login (people paste passwords into username fields).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UsernameKey([u8; 16]);

impl std::fmt::Display for UsernameKey {
    /// The first 8 hex digits: enough to tell attempts apart in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for byte in &self.0[..4] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct ThrottleState {
    sources: HashMap<Source, TokenBucket>,
    usernames: HashMap<UsernameKey, TokenBucket>,
    /// Sources that logged in as a username, and when.
    trusted: HashMap<UsernameKey, Vec<(Source, Instant)>>,
}

/// Failed AUTH attempts across all connections of a pod.
///
/// A source that keeps failing is refused for a while. A username that
/// keeps failing is refused too. Neither applies to a username logging in
/// from a source it logged in from during the last day: so someone who
/// knows a tenant's username, or shares its address behind a NAT, can slow
/// guessing of its password but cannot lock the tenant's own clients out.
pub struct AuthThrottle {
    key: hmac::Key,
    state: Mutex<ThrottleState>,
}

impl Default for AuthThrottle {
    fn default() -> Self {
        let mut secret = [0u8; 32];
        // Without randomness the key is all zeros: the hashes are then
        // unkeyed, which still keeps usernames out of the logs.
        let _ = aws_lc_rs::rand::fill(&mut secret);
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            state: Mutex::default(),
        }
    }
}

impl std::fmt::Debug for AuthThrottle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthThrottle").finish_non_exhaustive()
    }
}

impl AuthThrottle {
    fn state(&self) -> std::sync::MutexGuard<'_, ThrottleState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The keyed hash of `username`.
    pub fn username_key(&self, username: &str) -> UsernameKey {
        let tag = hmac::sign(&self.key, username.as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&tag.as_ref()[..16]);
        UsernameKey(key)
    }

    /// Whether a login as `username` from `source` may be tried now.
    pub fn check(
        &self,
        source: Source,
        username: UsernameKey,
        now: Instant,
    ) -> Result<(), Throttled> {
        let mut state = self.state();
        // A username logging in from where it logged in before is let
        // through: behind a NAT, tenants share their source with whoever
        // fails there.
        let trusted = state.trusted.get(&username).is_some_and(|sources| {
            sources
                .iter()
                .any(|(s, at)| *s == source && now.saturating_duration_since(*at) < TRUSTED_FOR)
        });
        if trusted {
            return Ok(());
        }
        if let Some(bucket) = state.sources.get_mut(&source)
            && !bucket.has_token(AUTH_FAILURES_PER_SOURCE, now)
        {
            return Err(Throttled::Source);
        }
        if let Some(bucket) = state.usernames.get_mut(&username)
            && !bucket.has_token(AUTH_FAILURES_PER_USERNAME, now)
        {
            return Err(Throttled::Username);
        }
        Ok(())
    }

    /// Counts a failed login.
    pub fn failed(&self, source: Source, username: UsernameKey, now: Instant) {
        let mut state = self.state();
        if state.sources.len() + state.usernames.len() > MAX_TRACKED {
            sweep(&mut state, now);
        }
        state
            .sources
            .entry(source)
            .or_insert_with(|| TokenBucket::new(AUTH_FAILURES_PER_SOURCE, now))
            .try_take(AUTH_FAILURES_PER_SOURCE, now);
        state
            .usernames
            .entry(username)
            .or_insert_with(|| TokenBucket::new(AUTH_FAILURES_PER_USERNAME, now))
            .try_take(AUTH_FAILURES_PER_USERNAME, now);
    }

    /// Remembers that `source` logged in as `username`.
    pub fn succeeded(&self, source: Source, username: UsernameKey, now: Instant) {
        let mut state = self.state();
        let sources = state.trusted.entry(username).or_default();
        sources.retain(|(s, at)| *s != source && now.saturating_duration_since(*at) < TRUSTED_FOR);
        if sources.len() >= TRUSTED_PER_USERNAME {
            sources.remove(0);
        }
        sources.push((source, now));
    }
}

/// Forgets buckets that have refilled (they hold nothing), and if that is
/// not enough, everything: the throttle then starts afresh rather than
/// growing without bound.
fn sweep(state: &mut ThrottleState, now: Instant) {
    state
        .sources
        .retain(|_, bucket| !bucket.is_full(AUTH_FAILURES_PER_SOURCE, now));
    state
        .usernames
        .retain(|_, bucket| !bucket.is_full(AUTH_FAILURES_PER_USERNAME, now));
    if state.sources.len() + state.usernames.len() > MAX_TRACKED {
        tracing::warn!("too many failing sources to track; the AUTH throttle starts afresh");
        state.sources.clear();
        state.usernames.clear();
    }
    if state.trusted.len() > MAX_TRACKED {
        state.trusted.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max: u32, unauthenticated: u32, per_source: u32) -> RelayLimits {
        RelayLimits {
            max_connections: max,
            max_unauthenticated_connections: unauthenticated,
            max_unauthenticated_connections_per_source: per_source,
            ..RelayLimits::default()
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn one_source_cannot_take_more_than_its_share() {
        let admission = Arc::new(Admission::default());
        let limits = limits(100, 50, 2);
        let a1 = admission.admit(ip("192.0.2.1"), &limits).unwrap();
        let _a2 = admission.admit(ip("192.0.2.1"), &limits).unwrap();
        assert_eq!(
            admission.admit(ip("192.0.2.1"), &limits).unwrap_err(),
            Refused::TooManyFromSource
        );
        admission.admit(ip("192.0.2.2"), &limits).unwrap();
        drop(a1);
        admission.admit(ip("192.0.2.1"), &limits).unwrap();
    }

    #[test]
    fn an_ipv6_host_is_its_64_network() {
        assert_eq!(
            Source::from(ip("2001:db8::1")),
            Source::from(ip("2001:db8::ffff:1"))
        );
        assert_ne!(
            Source::from(ip("2001:db8::1")),
            Source::from(ip("2001:db8:0:1::1"))
        );
        assert_eq!(
            Source::from(ip("::ffff:192.0.2.1")),
            Source::from(ip("192.0.2.1"))
        );
        assert_ne!(Source::from(ip("::1")), Source::from(ip("0.0.0.1")));
    }

    #[test]
    fn strangers_leave_slots_for_tenants() {
        let admission = Arc::new(Admission::default());
        let limits = limits(4, 2, 10);
        let mut tenant = admission.admit(ip("192.0.2.9"), &limits).unwrap();
        tenant.authenticate("acme", 10).unwrap();
        let _s1 = admission.admit(ip("192.0.2.1"), &limits).unwrap();
        let _s2 = admission.admit(ip("192.0.2.2"), &limits).unwrap();
        // The unauthenticated pool is full: a third stranger waits...
        assert_eq!(
            admission.admit(ip("192.0.2.3"), &limits).unwrap_err(),
            Refused::TooManyUnauthenticated
        );
        // ...and a tenant's login frees its pre-login slot at once.
        drop(_s2);
        let mut second = admission.admit(ip("192.0.2.9"), &limits).unwrap();
        second.authenticate("acme", 10).unwrap();
        let _s3 = admission.admit(ip("192.0.2.3"), &limits).unwrap();
        assert_eq!(admission.open(), 4);
        assert_eq!(
            admission.admit(ip("192.0.2.4"), &limits).unwrap_err(),
            Refused::TooManyConnections
        );
        drop(second);
        drop(tenant);
        assert_eq!(admission.open(), 2);
    }

    #[test]
    fn a_tenant_has_a_session_limit_of_its_own() {
        let admission = Arc::new(Admission::default());
        let limits = limits(100, 100, 100);
        let mut first = admission.admit(ip("192.0.2.1"), &limits).unwrap();
        first.authenticate("acme", 1).unwrap();
        let mut second = admission.admit(ip("192.0.2.1"), &limits).unwrap();
        assert_eq!(second.authenticate("acme", 1), Err(TooManySessions));
        assert!(!second.is_authenticated());
        let mut other = admission.admit(ip("192.0.2.1"), &limits).unwrap();
        other.authenticate("other", 1).unwrap();
        drop(first);
        second.authenticate("acme", 1).unwrap();
    }

    #[test]
    fn a_tenants_buffered_bytes_are_bounded_across_its_sessions() {
        let admission = Arc::new(Admission::default());
        let limits = limits(100, 100, 100);
        let mut one = admission.admit(ip("192.0.2.1"), &limits).unwrap();
        let mut two = admission.admit(ip("192.0.2.2"), &limits).unwrap();
        one.authenticate("acme", 10).unwrap();
        two.authenticate("acme", 10).unwrap();
        let gauge = Gauge::default();
        assert!(
            admission
                .admit(ip("192.0.2.3"), &limits)
                .unwrap()
                .buffer(100, gauge.clone())
                .is_none()
        );
        let mut first = one.buffer(100, gauge.clone()).unwrap();
        let mut second = two.buffer(100, gauge.clone()).unwrap();
        assert!(first.grow_to(60));
        assert!(!second.grow_to(41));
        assert!(second.grow_to(40));
        assert_eq!(gauge.get(), 100);
        drop(first);
        assert!(second.grow_to(100));
        drop(second);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn failing_sources_are_throttled_across_connections() {
        let throttle = AuthThrottle::default();
        let now = Instant::now();
        let attacker = Source::from(ip("192.0.2.66"));
        let tenant = Source::from(ip("192.0.2.10"));
        for n in 0..AUTH_FAILURES_PER_SOURCE {
            let username = throttle.username_key(&format!("guess-{n}"));
            assert_eq!(throttle.check(attacker, username, now), Ok(()));
            throttle.failed(attacker, username, now);
        }
        let next = throttle.username_key("guess-next");
        assert_eq!(throttle.check(attacker, next, now), Err(Throttled::Source));
        assert_eq!(throttle.check(tenant, next, now), Ok(()));
        // A tenant that logged in from the attacker's address (a NAT)
        // before still gets in from there.
        let acme = throttle.username_key("acme");
        throttle.succeeded(attacker, acme, now - Duration::from_secs(60));
        assert_eq!(throttle.check(attacker, acme, now), Ok(()));
        // A failure a minute later is allowed again.
        let later = now + Duration::from_secs(60);
        assert_eq!(throttle.check(attacker, next, later), Ok(()));
    }

    #[test]
    fn a_guessed_username_is_throttled_but_its_own_clients_get_in() {
        let throttle = AuthThrottle::default();
        let now = Instant::now();
        let acme = throttle.username_key("acme");
        let home = Source::from(ip("192.0.2.10"));
        throttle.succeeded(home, acme, now);
        for n in 0..AUTH_FAILURES_PER_USERNAME {
            // From many sources, so no source is throttled itself.
            let source = Source::from(IpAddr::from([198, 51, 100, n as u8]));
            throttle.failed(source, acme, now);
        }
        let stranger = Source::from(ip("203.0.113.1"));
        assert_eq!(
            throttle.check(stranger, acme, now),
            Err(Throttled::Username)
        );
        assert_eq!(throttle.check(home, acme, now), Ok(()));
        assert_eq!(
            throttle.check(stranger, throttle.username_key("other"), now),
            Ok(())
        );
    }

    #[test]
    fn username_keys_are_keyed_and_short_in_logs() {
        let one = AuthThrottle::default();
        let two = AuthThrottle::default();
        assert_eq!(one.username_key("acme"), one.username_key("acme"));
        assert_ne!(one.username_key("acme"), two.username_key("acme"));
        assert_eq!(one.username_key("acme").to_string().len(), 8);
    }
}
