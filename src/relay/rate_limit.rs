//! Per-tenant, per-domain message rate limits: token buckets that refill at
//! the domain's messages-per-minute and hold at most one minute's worth, so
//! a quiet tenant may burst but never exceed its rate over time.
//!
//! Time is passed in, so the buckets are tested without a clock.

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

    /// Takes one token if there is one. The rate is passed on every call so
    /// a config reload that changes it takes effect at once.
    pub fn try_take(&mut self, per_minute: u32, now: Instant) -> bool {
        let capacity = f64::from(per_minute);
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * capacity / 60.0).min(capacity);
        self.refilled_at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// All buckets of the relay, keyed by tenant and domain.
#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<(String, String), TokenBucket>>,
}

impl RateLimiter {
    /// Whether `tenant` may send one more message as `domain` now.
    pub fn try_acquire(&self, tenant: &str, domain: &str, per_minute: u32, now: Instant) -> bool {
        // A poisoned lock only means another session panicked mid-update;
        // the buckets are still usable.
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (tenant.to_string(), domain.to_string());
        buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::new(per_minute, now))
            .try_take(per_minute, now)
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
}
