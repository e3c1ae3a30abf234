//! Per-tenant, per-domain message rate limits: token buckets that refill at
//! the domain's messages-per-minute and hold at most one minute's worth, so
//! a quiet tenant may burst but never exceed its rate over time.
//!
//! Time is passed in, so the buckets are tested without a clock. With several
//! relay replicas, each counts for itself: see docs/relay.md.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// One bucket.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    tokens: f64,
    refilled_at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_minute: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(per_minute),
            refilled_at: now,
        }
    }

    /// Refills for the time since the last call. The rate is passed on every
    /// call so a config reload that changes it takes effect at once.
    fn refill(&mut self, per_minute: u32, now: Instant) {
        let capacity = f64::from(per_minute);
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * capacity / 60.0).min(capacity);
        self.refilled_at = now;
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, per_minute: u32, now: Instant) -> bool {
        self.refill(per_minute, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether a token is there, without taking it.
    pub fn has_token(&mut self, per_minute: u32, now: Instant) -> bool {
        self.refill(per_minute, now);
        self.tokens >= 1.0
    }

    /// Whether the bucket is full again (nothing to remember).
    pub fn is_full(&mut self, per_minute: u32, now: Instant) -> bool {
        self.refill(per_minute, now);
        self.tokens >= f64::from(per_minute)
    }

    /// Gives back a token taken for something that did not happen.
    pub fn give_back(&mut self, per_minute: u32) {
        self.tokens = (self.tokens + 1.0).min(f64::from(per_minute));
    }
}

/// All buckets of the relay, keyed by tenant, then domain.
///
/// A token is taken when a message is about to go upstream and given back
/// when the upstream did not accept it, so only accepted mail counts, and
/// concurrent sessions of one tenant cannot all pass on the last token.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, HashMap<String, TokenBucket>>>,
}

impl RateLimiter {
    /// Takes a token for one message of `tenant` as `domain`, if there is
    /// one now.
    pub fn try_acquire(&self, tenant: &str, domain: &str, per_minute: u32, now: Instant) -> bool {
        // A poisoned lock only means another session panicked mid-update;
        // the buckets are still usable.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Look up before inserting: no allocation for a known bucket.
        if let Some(bucket) = buckets
            .get_mut(tenant)
            .and_then(|domains| domains.get_mut(domain))
        {
            return bucket.try_take(per_minute, now);
        }
        buckets
            .entry(tenant.to_string())
            .or_default()
            .entry(domain.to_string())
            .or_insert_with(|| TokenBucket::new(per_minute, now))
            .try_take(per_minute, now)
    }

    /// Gives back the token of a message the upstream did not accept.
    pub fn refund(&self, tenant: &str, domain: &str, per_minute: u32) {
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(bucket) = buckets
            .get_mut(tenant)
            .and_then(|domains| domains.get_mut(domain))
        {
            bucket.give_back(per_minute);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_full_bucket_allows_one_minute_of_messages_then_refuses() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(3, start);
        assert!(bucket.try_take(3, start));
        assert!(bucket.try_take(3, start));
        assert!(bucket.try_take(3, start));
        assert!(!bucket.try_take(3, start));
    }

    #[test]
    fn tokens_come_back_at_the_configured_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(60, start);
        for _ in 0..60 {
            assert!(bucket.try_take(60, start));
        }
        assert!(!bucket.try_take(60, start + Duration::from_millis(500)));
        assert!(bucket.try_take(60, start + Duration::from_millis(1500)));
        assert!(!bucket.try_take(60, start + Duration::from_millis(1600)));
    }

    #[test]
    fn a_long_pause_refills_no_more_than_one_minute() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(2, start);
        assert!(bucket.try_take(2, start));
        assert!(bucket.try_take(2, start));
        let later = start + Duration::from_secs(3600);
        assert!(bucket.try_take(2, later));
        assert!(bucket.try_take(2, later));
        assert!(!bucket.try_take(2, later));
    }

    #[test]
    fn tenants_and_domains_have_separate_buckets() {
        let limiter = RateLimiter::default();
        let now = Instant::now();
        assert!(limiter.try_acquire("acme", "acme.test", 1, now));
        assert!(!limiter.try_acquire("acme", "acme.test", 1, now));
        assert!(limiter.try_acquire("acme", "acme-mail.test", 1, now));
        assert!(limiter.try_acquire("other", "acme.test", 1, now));
    }

    #[test]
    fn a_refunded_token_can_be_used_again_but_never_beyond_the_capacity() {
        let limiter = RateLimiter::default();
        let now = Instant::now();
        assert!(limiter.try_acquire("acme", "acme.test", 2, now));
        assert!(limiter.try_acquire("acme", "acme.test", 2, now));
        assert!(!limiter.try_acquire("acme", "acme.test", 2, now));
        limiter.refund("acme", "acme.test", 2);
        assert!(limiter.try_acquire("acme", "acme.test", 2, now));
        assert!(!limiter.try_acquire("acme", "acme.test", 2, now));
        for _ in 0..5 {
            limiter.refund("acme", "acme.test", 2);
        }
        assert!(limiter.try_acquire("acme", "acme.test", 2, now));
        assert!(limiter.try_acquire("acme", "acme.test", 2, now));
        assert!(!limiter.try_acquire("acme", "acme.test", 2, now));
    }
}
