//! A device's twin: what the node last saw of it, made from its driver's
//! events, and when that is due to be reported. Pure (time comes in as
//! milliseconds), so its rules are unit-tested without a device.
//!
//! Reporting: a change of what the cloud shows (a value, an error, the
//! Reachable condition, a desired value taken) is reported once the
//! device's report cycle has passed since the last report; counters alone
//! (every poll moves them) at most once a minute. One row per device in
//! the outbox, so offline it holds the latest of each property.

use std::collections::VecDeque;

use litemap::LiteMap;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use outrigger_devices::Event;
use outrigger_proto::device::{Counters, DeviceStatus, LocalDesired, PropertyStatus, REACHABLE};

/// Counters alone are reported at most this often.
const COUNTERS_EVERY_MS: i64 = 60_000;
/// Errors kept for `edge-rt describe device`.
const RECENT_ERRORS: usize = 10;
/// Values shown in `kubectl get devices`' Values column.
const SUMMARY_VALUES: usize = 3;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Property {
    pub value: Option<String>,
    /// When the value last changed (ms).
    pub changed_ms: Option<i64>,
    /// When it was last read (ms).
    pub read_ms: Option<i64>,
    pub observed_desired: Option<String>,
    pub error: Option<String>,
    /// A desired value set at the node over the spec's.
    pub local_desired: Option<LocalDesired>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Reachable {
    pub ok: bool,
    pub reason: String,
    pub message: String,
    pub since_ms: i64,
}

#[derive(Debug, Clone)]
pub struct Twin {
    pub protocol: String,
    pub generation: Option<i64>,
    /// Property order and units, as the device lists them.
    pub order: Vec<(String, Option<String>)>,
    /// A sorted Vec: a device has a few properties, and a BTree leaf
    /// holds room for 11.
    pub properties: LiteMap<String, Property>,
    pub reachable: Option<Reachable>,
    pub counters: Counters,
    /// (ms, message), newest last.
    pub recent_errors: VecDeque<(i64, String)>,
    /// Sum of exchange latencies, for the mean in metrics.
    pub latency_total: Duration,
    pub report_cycle_ms: i64,
    /// What the last report showed (without its time), its counters, when.
    /// Kept as a digest of it: a copy of every device's last status would
    /// be most of what a twin holds.
    reported: Option<(u64, Counters, i64)>,
}

impl Twin {
    pub fn new(
        protocol: String,
        order: Vec<(String, Option<String>)>,
        report_cycle: Duration,
    ) -> Twin {
        Twin {
            protocol,
            generation: None,
            properties: order
                .iter()
                .map(|(n, _)| (n.clone(), Property::default()))
                .collect(),
            order,
            reachable: None,
            counters: Counters::default(),
            recent_errors: VecDeque::new(),
            latency_total: Duration::ZERO,
            report_cycle_ms: report_cycle.as_millis() as i64,
            reported: None,
        }
    }

    /// A twin that cannot run (its spec or model is wrong, its line is
    /// taken with other settings): Reachable false with why.
    pub fn refuse(&mut self, reason: &str, message: String, now_ms: i64) {
        self.set_reachable(false, reason, message, now_ms);
    }

    fn set_reachable(&mut self, ok: bool, reason: &str, message: String, now_ms: i64) {
        match &mut self.reachable {
            Some(r) if r.ok == ok && r.reason == reason => r.message = message,
            r => {
                *r = Some(Reachable {
                    ok,
                    reason: reason.to_string(),
                    message,
                    since_ms: now_ms,
                })
            }
        }
    }

    fn error(&mut self, now_ms: i64, message: String) {
        if self.recent_errors.back().map(|(_, m)| m) != Some(&message) {
            self.recent_errors.push_back((now_ms, message));
        }
        while self.recent_errors.len() > RECENT_ERRORS {
            self.recent_errors.pop_front();
        }
    }

    pub fn apply(&mut self, ev: &Event, now_ms: i64) {
        match ev {
            Event::Value { property, value } => {
                let text = value.to_string();
                let p = self.properties.entry(property.clone()).or_default();
                if p.value.as_deref() != Some(text.as_str()) {
                    p.value = Some(text);
                    p.changed_ms = Some(now_ms);
                }
                p.read_ms = Some(now_ms);
                // A refused desired value stays said until it is fixed.
                if !p
                    .error
                    .as_deref()
                    .is_some_and(|e| e.starts_with("desired: "))
                {
                    p.error = None;
                }
            }
            Event::ReadFailed { property, error } => {
                self.properties.entry(property.clone()).or_default().error = Some(error.clone());
                self.error(now_ms, format!("read {property}: {error}"));
            }
            Event::Contact {
                ok,
                reason,
                message,
                latency,
            } => {
                self.counters.polls += 1;
                self.latency_total += *latency;
                if !ok {
                    self.counters.poll_errors += 1;
                    if *reason == "Timeout" {
                        self.counters.timeouts += 1;
                    }
                    self.error(now_ms, message.clone());
                }
                let message = if *ok {
                    "the device answers".to_string()
                } else {
                    message.clone()
                };
                self.set_reachable(*ok, reason, message, now_ms);
            }
            Event::Wrote { property, value } => {
                self.counters.writes += 1;
                let p = self.properties.entry(property.clone()).or_default();
                p.observed_desired = Some(value.clone());
                p.error = None;
            }
            Event::WriteFailed {
                property,
                value,
                error,
            } => {
                self.counters.write_errors += 1;
                let e = format!("write {property}={value}: {error}");
                self.properties.entry(property.clone()).or_default().error = Some(e.clone());
                self.error(now_ms, e);
            }
        }
    }

    /// The status as the cloud shows it (`lastReportTime` is now).
    pub fn status(&self, now_ms: i64) -> DeviceStatus {
        let mut s = self.content();
        s.last_report_time = Some(rfc3339(now_ms));
        s.counters = self.counters;
        s
    }

    /// The status without what changes on every poll.
    fn content(&self) -> DeviceStatus {
        let state = match &self.reachable {
            None => "Unknown",
            Some(r) if r.ok => "Online",
            Some(_) => "Offline",
        };
        let properties: Vec<PropertyStatus> = self
            .order
            .iter()
            .filter_map(|(n, _)| self.properties.get(n).map(|p| (n, p)))
            .map(|(n, p)| PropertyStatus {
                name: n.clone(),
                value: p.value.clone(),
                time: p.changed_ms.map(rfc3339),
                observed_desired: p.observed_desired.clone(),
                error: p.error.clone(),
                local_desired: p.local_desired.clone(),
            })
            .collect();
        let summary: Vec<String> = self
            .order
            .iter()
            .filter_map(|(n, unit)| {
                let v = self.properties.get(n)?.value.as_ref()?;
                Some(match unit {
                    Some(u) => format!("{n}={v}{u}"),
                    None => format!("{n}={v}"),
                })
            })
            .take(SUMMARY_VALUES)
            .collect();
        let conditions = self
            .reachable
            .iter()
            .map(|r| Condition {
                type_: REACHABLE.into(),
                status: if r.ok { "True" } else { "False" }.into(),
                reason: r.reason.clone(),
                message: r.message.clone(),
                last_transition_time: Time(
                    jiff::Timestamp::from_millisecond(r.since_ms).unwrap_or_default(),
                ),
                observed_generation: self.generation,
            })
            .collect();
        DeviceStatus {
            state: Some(state.into()),
            protocol: Some(self.protocol.clone()),
            summary: (!summary.is_empty()).then(|| summary.join(" ")),
            last_report_time: None,
            observed_generation: self.generation,
            properties,
            conditions,
            counters: Counters::default(),
        }
    }

    /// Whether a report is due now.
    pub fn due(&self, now_ms: i64) -> bool {
        match &self.reported {
            None => true,
            Some((last, counters, at)) => {
                let since = now_ms - at;
                (since >= self.report_cycle_ms && *last != self.digest())
                    || (since >= COUNTERS_EVERY_MS && *counters != self.counters)
            }
        }
    }

    /// A report of it was committed to the outbox at `now_ms`.
    pub fn reported(&mut self, now_ms: i64) {
        self.reported = Some((self.digest(), self.counters, now_ms));
    }

    /// What a report would say, hashed as it is serialized (no JSON is
    /// kept; one device's content at a time).
    fn digest(&self) -> u64 {
        use std::hash::Hasher;
        struct Hashing(std::collections::hash_map::DefaultHasher);
        impl std::io::Write for Hashing {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.write(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut h = Hashing(Default::default());
        // Writing into a hasher cannot fail; DeviceStatus always serializes.
        let _ = serde_json::to_writer(&mut h, &self.content());
        h.0.finish()
    }
}

fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .unwrap_or_default()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_proto::device::Value;

    fn twin() -> Twin {
        Twin::new(
            "modbus-rtu /dev/ttyUSB0 #1".into(),
            vec![
                ("temperature".into(), Some("°C".into())),
                ("relay".into(), None),
            ],
            Duration::from_millis(1000),
        )
    }

    fn value(p: &str, v: Value) -> Event {
        Event::Value {
            property: p.into(),
            value: v,
        }
    }

    fn contact(ok: bool) -> Event {
        Event::Contact {
            ok,
            reason: if ok { "Answering" } else { "Timeout" },
            message: if ok {
                String::new()
            } else {
                "no answer within 1s".into()
            },
            latency: Duration::from_millis(5),
        }
    }

    #[test]
    fn values_conditions_and_the_summary() {
        let mut t = twin();
        assert_eq!(t.status(0).state.as_deref(), Some("Unknown"));
        t.apply(&contact(true), 10);
        t.apply(&value("temperature", Value::Float(21.5)), 10);
        t.apply(&value("relay", Value::Bool(true)), 10);
        let s = t.status(20);
        assert_eq!(s.state.as_deref(), Some("Online"));
        assert_eq!(s.summary.as_deref(), Some("temperature=21.5°C relay=true"));
        assert_eq!(s.properties[0].value.as_deref(), Some("21.5"));
        assert_eq!(s.conditions[0].status, "True");
        // It stops answering: Offline, with why, since when.
        t.apply(&contact(false), 30);
        t.apply(&contact(false), 40);
        let s = t.status(50);
        assert_eq!(s.state.as_deref(), Some("Offline"));
        assert_eq!(s.conditions[0].reason, "Timeout");
        assert_eq!(s.conditions[0].last_transition_time.0.as_millisecond(), 30);
        assert_eq!(s.counters.timeouts, 2);
        assert_eq!(s.counters.polls, 3);
        // The last values stay (marked by when they changed).
        assert_eq!(s.properties[0].value.as_deref(), Some("21.5"));
        assert_eq!(t.recent_errors.len(), 1, "{:?}", t.recent_errors);
    }

    #[test]
    fn reports_follow_the_cycle_and_counters_alone_wait_a_minute() {
        let mut t = twin();
        assert!(t.due(0));
        t.apply(&contact(true), 0);
        t.reported(0);
        // Polls that change nothing: not due, even after the cycle.
        t.apply(&contact(true), 500);
        assert!(!t.due(1500));
        // A value changes: due once the cycle has passed, not before.
        t.apply(&value("temperature", Value::Float(22.0)), 600);
        assert!(!t.due(900));
        assert!(t.due(1000));
        t.reported(1000);
        t.apply(&contact(true), 2000);
        assert!(!t.due(30_000));
        assert!(t.due(61_000));
    }

    #[test]
    fn a_write_shows_as_observed_desired_and_a_refusal_as_an_error() {
        let mut t = twin();
        t.apply(
            &Event::Wrote {
                property: "relay".into(),
                value: "true".into(),
            },
            5,
        );
        t.apply(
            &Event::WriteFailed {
                property: "temperature".into(),
                value: "20".into(),
                error: "\"temperature\" is ReadOnly".into(),
            },
            6,
        );
        let s = t.status(7);
        assert_eq!(s.properties[1].observed_desired.as_deref(), Some("true"));
        assert!(s.properties[0]
            .error
            .as_deref()
            .unwrap()
            .contains("ReadOnly"));
        assert_eq!((s.counters.writes, s.counters.write_errors), (1, 1));
    }
}
