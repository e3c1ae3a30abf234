//! The one way integration tests wait: poll a probe until it reports
//! success, bounded by a timeout. On timeout the panic says what was waited
//! for, how long, and the last thing the probe saw, so a failing wait
//! explains itself.
//!
//! A probe returns `Ok(value)` when the wait is over, or `Err(observed)`
//! with what it saw instead (printed with `{:#?}` if the wait times out).
//! The same wait runs from plain threads (`until`) and from async tests
//! (`until_async`, which sleeps on tokio and never blocks the runtime):
//!
//! ```ignore
//! let stored = eventually("the sink to store 3 messages")
//!     .within(Duration::from_secs(30))
//!     .until(|| {
//!         let messages = sink.messages();
//!         if messages.len() >= 3 { Ok(messages) } else { Err(messages.len()) }
//!     });
//! ```

use std::fmt::{self, Debug, Display};
use std::future::Future;
use std::time::{Duration, Instant};

/// How long a wait lasts unless told otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a wait sleeps between two probes unless told otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(50);

/// A bounded wait for something, described for the failure message.
#[must_use = "a wait does nothing until `until` or `until_async` runs it"]
pub struct Eventually {
    what: String,
    timeout: Duration,
    interval: Duration,
}

/// Starts describing a wait: `what` completes "timed out waiting for ...".
pub fn eventually(what: impl Into<String>) -> Eventually {
    Eventually {
        what: what.into(),
        timeout: DEFAULT_TIMEOUT,
        interval: DEFAULT_INTERVAL,
    }
}

/// A wait that ran out: what it waited for, for how long, and what the
/// probe saw last.
#[derive(Debug)]
pub struct TimedOut<O> {
    pub what: String,
    pub waited: Duration,
    pub probes: u32,
    pub last: O,
}

impl<O: Debug> Display for TimedOut<O> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:.1?} ({} probes) waiting for {}; last observed:\n{:#?}",
            self.waited, self.probes, self.what, self.last
        )
    }
}

/// Text shown as it is in a timeout message (YAML, a log), where `Debug`
/// of a `String` would escape every line end.
pub struct Shown(pub String);

impl Debug for Shown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Eventually {
    /// Gives up after `timeout` (the probe always runs at least once).
    pub fn within(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sleeps `interval` between probes.
    pub fn every(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }

    /// Probes until `Ok`, from a plain thread; the timeout is returned, not
    /// raised, for callers that recover from it.
    pub fn try_until<T, O>(
        self,
        mut probe: impl FnMut() -> Result<T, O>,
    ) -> Result<T, TimedOut<O>> {
        let started = Instant::now();
        let mut probes = 0;
        loop {
            probes += 1;
            match probe() {
                Ok(value) => return Ok(value),
                Err(last) if started.elapsed() >= self.timeout => {
                    return Err(self.timed_out(started, probes, last));
                }
                Err(_) => std::thread::sleep(self.interval),
            }
        }
    }

    /// Probes until `Ok`, from a plain thread; panics on timeout.
    #[track_caller]
    pub fn until<T, O: Debug>(self, probe: impl FnMut() -> Result<T, O>) -> T {
        self.try_until(probe)
            .unwrap_or_else(|timed_out| panic!("{timed_out}"))
    }

    /// Probes until `Ok` in an async test, sleeping on tokio between
    /// probes; the timeout is returned, not raised.
    pub async fn try_until_async<T, O, F>(
        self,
        mut probe: impl FnMut() -> F,
    ) -> Result<T, TimedOut<O>>
    where
        F: Future<Output = Result<T, O>>,
    {
        let started = Instant::now();
        let mut probes = 0;
        loop {
            probes += 1;
            match probe().await {
                Ok(value) => return Ok(value),
                Err(last) if started.elapsed() >= self.timeout => {
                    return Err(self.timed_out(started, probes, last));
                }
                Err(_) => tokio::time::sleep(self.interval).await,
            }
        }
    }

    /// Probes until `Ok` in an async test; panics on timeout.
    pub async fn until_async<T, O: Debug, F>(self, probe: impl FnMut() -> F) -> T
    where
        F: Future<Output = Result<T, O>>,
    {
        match self.try_until_async(probe).await {
            Ok(value) => value,
            Err(timed_out) => panic!("{timed_out}"),
        }
    }

    fn timed_out<O>(self, started: Instant, probes: u32, last: O) -> TimedOut<O> {
        TimedOut {
            what: self.what,
            waited: started.elapsed(),
            probes,
            last,
        }
    }
}

/// `Ok(value)` when `accept(&value)`, else `Err(value)`: the probe for
/// "observe something until it is right".
pub fn accept_if<V>(value: V, accept: impl FnOnce(&V) -> bool) -> Result<V, V> {
    if accept(&value) {
        Ok(value)
    } else {
        Err(value)
    }
}

/// Probes until `probe` gives `Some`, for at most `timeout`, from a plain
/// thread; `None` when it never did. For callers that report the failure
/// themselves (with a log to show).
pub fn poll_some<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    eventually("a value")
        .within(timeout)
        .try_until(|| probe().ok_or(()))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_first_accepted_value() {
        let mut n = 0;
        let value = eventually("n to reach 3").every(Duration::ZERO).until(|| {
            n += 1;
            accept_if(n, |n| *n >= 3)
        });
        assert_eq!(value, 3);
    }

    #[test]
    fn a_timeout_reports_what_was_awaited_and_the_last_observation() {
        let timed_out = eventually("the impossible")
            .within(Duration::from_millis(30))
            .every(Duration::from_millis(5))
            .try_until(|| Err::<(), _>("still possible"))
            .expect_err("it cannot succeed");
        let message = timed_out.to_string();
        assert!(message.contains("waiting for the impossible"), "{message}");
        assert!(message.contains("still possible"), "{message}");
        assert!(timed_out.probes >= 2, "{message}");
    }
}
