//! Kubernetes-style events (Pulling, Pulled, Created, Started, Killing,
//! BackOff, Unhealthy, FailedMount, ...; for devices Unreachable and
//! Reachable, DesiredNotWritten) kept in a bounded ring: a node that
//! runs for months never grows it. Repeats of the same event fold into one
//! with a count, as the API server's event aggregation does.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Events kept in all, across pods.
pub const DEFAULT_CAPACITY: usize = 1000;

// What an event is, as the node reports it: the link's type.
pub use outrigger_proto::report::{DeviceEvent, EventType, PodEvent};

/// What the ring needs of an event: what it is about, whether another is
/// a repeat of it, and its counters and times.
pub trait RingEvent: Clone {
    /// The uid of what it is about (a pod, a device).
    fn subject(&self) -> &str;
    /// `other` says the same about the same thing (a repeat, to fold).
    fn repeats(&self, other: &Self) -> bool;
    /// (count, first, last timestamp, id, seq).
    fn counters(&mut self) -> (&mut u32, &mut String, &mut String, &mut u64, &mut u64);
    fn seq(&self) -> u64;
    fn log(&self);
}

impl RingEvent for PodEvent {
    fn subject(&self) -> &str {
        &self.pod_uid
    }
    fn repeats(&self, o: &Self) -> bool {
        self.reason == o.reason && self.container == o.container && self.message == o.message
    }
    fn counters(&mut self) -> (&mut u32, &mut String, &mut String, &mut u64, &mut u64) {
        (
            &mut self.count,
            &mut self.first_timestamp,
            &mut self.last_timestamp,
            &mut self.id,
            &mut self.seq,
        )
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn log(&self) {
        let container = self.container.as_deref().unwrap_or("");
        match self.kind {
            EventType::Normal => {
                tracing::info!(pod = %self.pod, container, reason = %self.reason, "{}", self.message)
            }
            EventType::Warning => {
                tracing::warn!(pod = %self.pod, container, reason = %self.reason, "{}", self.message)
            }
        }
    }
}

impl RingEvent for DeviceEvent {
    fn subject(&self) -> &str {
        &self.device_uid
    }
    fn repeats(&self, o: &Self) -> bool {
        self.reason == o.reason && self.message == o.message
    }
    fn counters(&mut self) -> (&mut u32, &mut String, &mut String, &mut u64, &mut u64) {
        (
            &mut self.count,
            &mut self.first_timestamp,
            &mut self.last_timestamp,
            &mut self.id,
            &mut self.seq,
        )
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn log(&self) {
        match self.kind {
            EventType::Normal => {
                tracing::info!(device = %self.device, namespace = %self.namespace, reason = %self.reason, "{}", self.message)
            }
            EventType::Warning => {
                tracing::warn!(device = %self.device, namespace = %self.namespace, reason = %self.reason, "{}", self.message)
            }
        }
    }
}

pub struct EventRing<E = PodEvent> {
    cap: usize,
    ring: Mutex<(VecDeque<E>, u64)>,
}

impl<E: RingEvent> Default for EventRing<E> {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl<E: RingEvent> EventRing<E> {
    pub fn new(cap: usize) -> EventRing<E> {
        // Ids (and sequence numbers) start at the time in microseconds, not
        // at 0: an event's id keys its outbox row, and a row not yet sent
        // when edge-rt restarts (offline) must not be replaced by a newer
        // event that a restarted count gave the same id. No run emits an
        // event per microsecond, so runs never overlap.
        let start = u64::try_from(jiff::Timestamp::now().as_microsecond()).unwrap_or(0);
        EventRing {
            cap: cap.max(1),
            ring: Mutex::new((VecDeque::new(), start)),
        }
    }

    pub fn push(&self, mut ev: E) {
        let now = format!("{:.0}", jiff::Timestamp::now());
        {
            let (count, first, last, _, _) = ev.counters();
            *first = now.clone();
            *last = now;
            *count = 1;
        }
        ev.log();
        let mut guard = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let (ring, seq) = &mut *guard;
        *seq += 1;
        // The same event again (the latest of its subject): count it.
        if let Some(prev) = ring.iter_mut().rev().find(|e| e.subject() == ev.subject()) {
            if prev.repeats(&ev) {
                let last = ev.counters().2.clone();
                let (count, _, l, _, s) = prev.counters();
                *count += 1;
                *l = last;
                *s = *seq;
                return;
            }
        }
        if ring.len() >= self.cap {
            ring.pop_front();
        }
        {
            let (_, _, _, id, s) = ev.counters();
            *id = *seq;
            *s = *seq;
        }
        ring.push_back(ev);
    }

    /// The sequence number of the latest push or fold.
    pub fn last_seq(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// Events pushed or folded into after `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<E> {
        let guard = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<E> = guard.0.iter().filter(|e| e.seq() > seq).cloned().collect();
        v.sort_by_key(|e| e.seq());
        v
    }

    /// The events of one pod or device, oldest first.
    pub fn about(&self, uid: &str) -> Vec<E> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.0
            .iter()
            .filter(|e| e.subject() == uid)
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<E> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.0.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(pod: &str, reason: &str) -> PodEvent {
        PodEvent {
            pod_uid: pod.into(),
            namespace: "default".into(),
            pod: pod.into(),
            container: None,
            kind: EventType::Normal,
            reason: reason.into(),
            message: format!("{reason} happened"),
            count: 0,
            first_timestamp: String::new(),
            last_timestamp: String::new(),
            id: 0,
            seq: 0,
        }
    }

    #[test]
    fn bounded_and_repeats_fold() {
        let r: EventRing = EventRing::new(3);
        let base = r.last_seq();
        r.push(ev("a", "Pulled"));
        r.push(ev("a", "BackOff"));
        r.push(ev("a", "BackOff"));
        assert_eq!(r.about("a").len(), 2);
        assert_eq!(r.about("a")[1].count, 2);
        r.push(ev("b", "Started"));
        r.push(ev("b", "Killing"));
        let all = r.all();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].reason, "BackOff");
        // The fold moved BackOff past Pulled; b's two are newer still.
        let since: Vec<String> = r.since(base + 2).into_iter().map(|e| e.reason).collect();
        assert_eq!(since, ["BackOff", "Started", "Killing"]);
    }

    #[test]
    fn a_new_run_never_reuses_the_ids_of_the_last() {
        let first: EventRing = EventRing::new(8);
        first.push(ev("a", "Pulled"));
        first.push(ev("a", "Started"));
        let last_id = first.all().iter().map(|e| e.id).max().unwrap_or(0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let second: EventRing = EventRing::new(8);
        second.push(ev("a", "Pulled"));
        assert!(second.all()[0].id > last_id);
    }
}
