//! Crash-loop back-off, as the kubelet does it: a container that exits is
//! restarted at once the first time, then after 10 s, 20 s, 40 s ... capped
//! at 5 min; a container that ran for 10 min before it exited starts the
//! sequence over. Pure: times come in as arguments, so the schedule is
//! tested with a fake clock.

use std::time::{Duration, Instant};

pub const INITIAL: Duration = Duration::from_secs(10);
pub const MAX: Duration = Duration::from_secs(300);
/// Running this long counts as healthy: the next crash starts over.
pub const RESET_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Default)]
pub struct Backoff {
    /// The delay the next restart waits (None: restart at once).
    next_delay: Option<Duration>,
    /// Earliest time of the next start.
    not_before: Option<Instant>,
    /// The wait put on the pending restart.
    in_force: Duration,
}

impl Backoff {
    /// A container that started at `started` exited at `finished`: work out
    /// when it may start again.
    pub fn record_exit(&mut self, started: Instant, finished: Instant) {
        if finished.saturating_duration_since(started) >= RESET_AFTER {
            self.next_delay = None;
        }
        match self.next_delay {
            None => {
                self.in_force = Duration::ZERO;
                self.next_delay = Some(INITIAL);
            }
            Some(d) => {
                self.in_force = d;
                self.next_delay = Some((d * 2).min(MAX));
            }
        }
        self.not_before = Some(finished + self.in_force);
    }

    /// How long a start at `now` must still wait (zero: go).
    pub fn remaining(&self, now: Instant) -> Duration {
        self.not_before
            .map(|t| t.saturating_duration_since(now))
            .unwrap_or_default()
    }

    /// The delay in force for the pending restart, for messages
    /// ("back-off 20s restarting failed container").
    pub fn in_force(&self) -> Duration {
        self.in_force
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schedule with a fake clock: exits one second after each start.
    #[test]
    fn schedule_doubles_to_five_minutes_and_resets_after_ten_of_running() {
        let t0 = Instant::now();
        let mut b = Backoff::default();
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let started = now;
            now += Duration::from_secs(1);
            b.record_exit(started, now);
            let w = b.remaining(now);
            waits.push(w.as_secs());
            now += w;
        }
        assert_eq!(waits, vec![0, 10, 20, 40, 80, 160, 300, 300]);

        // Ten minutes of running resets the sequence.
        let started = now;
        now += RESET_AFTER;
        b.record_exit(started, now);
        assert_eq!(b.remaining(now), Duration::ZERO);
        let started = now;
        now += Duration::from_secs(1);
        b.record_exit(started, now);
        assert_eq!(b.remaining(now), INITIAL);
        // Half-way through the wait, half remains.
        assert_eq!(
            b.remaining(now + Duration::from_secs(5)),
            Duration::from_secs(5)
        );
    }
}
