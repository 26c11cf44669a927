//! Kubernetes-style events (Pulling, Pulled, Created, Started, Killing,
//! BackOff, Unhealthy, FailedMount, ...) kept in a bounded ring: a node that
//! runs for months never grows it. Repeats of the same event fold into one
//! with a count, as the API server's event aggregation does.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Events kept in all, across pods.
pub const DEFAULT_CAPACITY: usize = 1000;

// What an event is, as the node reports it: the link's type.
pub use outrigger_proto::report::{EventType, PodEvent};

pub struct EventRing {
    cap: usize,
    ring: Mutex<(VecDeque<PodEvent>, u64)>,
}

impl Default for EventRing {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl EventRing {
    pub fn new(cap: usize) -> EventRing {
        EventRing {
            cap: cap.max(1),
            ring: Mutex::new((VecDeque::new(), 0)),
        }
    }

    pub fn push(&self, mut ev: PodEvent) {
        let now = format!("{:.0}", jiff::Timestamp::now());
        ev.first_timestamp = now.clone();
        ev.last_timestamp = now;
        ev.count = 1;
        let container = ev.container.as_deref().unwrap_or("");
        match ev.kind {
            EventType::Normal => {
                tracing::info!(pod = %ev.pod, container, reason = %ev.reason, "{}", ev.message)
            }
            EventType::Warning => {
                tracing::warn!(pod = %ev.pod, container, reason = %ev.reason, "{}", ev.message)
            }
        }
        let mut guard = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let (ring, seq) = &mut *guard;
        *seq += 1;
        // The same event again (the latest of its pod): count it.
        if let Some(last) = ring.iter_mut().rev().find(|e| e.pod_uid == ev.pod_uid) {
            if last.reason == ev.reason
                && last.container == ev.container
                && last.message == ev.message
            {
                last.count += 1;
                last.last_timestamp = ev.last_timestamp;
                last.seq = *seq;
                return;
            }
        }
        if ring.len() >= self.cap {
            ring.pop_front();
        }
        ev.id = *seq;
        ev.seq = *seq;
        ring.push_back(ev);
    }

    /// The sequence number of the latest push or fold.
    pub fn last_seq(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).1
    }

    /// Events pushed or folded into after `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<PodEvent> {
        let guard = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<PodEvent> = guard.0.iter().filter(|e| e.seq > seq).cloned().collect();
        v.sort_by_key(|e| e.seq);
        v
    }

    /// A pod's events, oldest first.
    pub fn for_pod(&self, uid: &str) -> Vec<PodEvent> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.0
            .iter()
            .filter(|e| e.pod_uid == uid)
            .cloned()
            .collect()
    }

    pub fn all(&self) -> Vec<PodEvent> {
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
        let r = EventRing::new(3);
        r.push(ev("a", "Pulled"));
        r.push(ev("a", "BackOff"));
        r.push(ev("a", "BackOff"));
        assert_eq!(r.for_pod("a").len(), 2);
        assert_eq!(r.for_pod("a")[1].count, 2);
        r.push(ev("b", "Started"));
        r.push(ev("b", "Killing"));
        let all = r.all();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0].reason, "BackOff");
        // The fold moved BackOff past Pulled; b's two are newer still.
        let since: Vec<String> = r.since(2).into_iter().map(|e| e.reason).collect();
        assert_eq!(since, ["BackOff", "Started", "Killing"]);
    }
}
