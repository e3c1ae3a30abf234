//! Time, injected: the controller asks a [`Clock`], so tests drive rotation
//! and overlap deadlines by moving a [`ManualClock`] instead of sleeping.

use std::pin::Pin;
use std::sync::Mutex;

use futures::Stream;
use jiff::{SignedDuration, Timestamp};
use tokio::sync::watch;

/// A stream that yields whenever the clock jumps.
pub type Ticks = Pin<Box<dyn Stream<Item = ()> + Send>>;

pub trait Clock: Send + Sync {
    fn now(&self) -> Timestamp;

    /// Yields when time jumps, so the controller re-evaluates every object
    /// (a real clock never jumps: it yields nothing).
    fn ticks(&self) -> Ticks {
        Box::pin(futures::stream::pending())
    }
}

/// The real time.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that moves only when told to.
pub struct ManualClock {
    now: Mutex<Timestamp>,
    jumps: watch::Sender<Timestamp>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self {
            now: Mutex::new(start),
            jumps: watch::Sender::new(start),
        }
    }

    pub fn advance(&self, by: SignedDuration) {
        let mut now = self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *now = now.saturating_add(by).unwrap_or(*now);
        self.jumps.send_replace(*now);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        *self
            .now
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ticks(&self) -> Ticks {
        let receiver = self.jumps.subscribe();
        Box::pin(futures::stream::unfold(
            receiver,
            |mut receiver| async move {
                receiver.changed().await.ok()?;
                Some(((), receiver))
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let start = Timestamp::from_second(1_800_000_000).unwrap();
        let clock = ManualClock::new(start);
        assert_eq!(clock.now(), start);
        clock.advance(SignedDuration::from_hours(24));
        assert_eq!(clock.now(), start + SignedDuration::from_hours(24));
    }
}
