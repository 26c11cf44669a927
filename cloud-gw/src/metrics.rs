//! cloud-gw's Prometheus metrics: process-wide counters and histograms
//! (atomics; no registry needed for this few), rendered as text.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (seconds) of the latency histograms' buckets.
const BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    const fn new() -> Histogram {
        Histogram {
            counts: [const { AtomicU64::new(0) }; BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i].fetch_add(1, Relaxed);
            }
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (i, b) in BUCKETS.iter().enumerate() {
            out.push_str(&format!(
                "{name}_bucket{{le=\"{b}\"}} {}\n",
                self.counts[i].load(Relaxed)
            ));
        }
        let n = self.count.load(Relaxed);
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {n}\n"));
        out.push_str(&format!(
            "{name}_sum {}\n{name}_count {n}\n",
            self.sum_micros.load(Relaxed) as f64 / 1e6
        ));
    }
}

pub struct Metrics {
    pub connected_nodes: AtomicU64,
    pub changes_pushed: AtomicU64,
    pub batches_acked: AtomicU64,
    pub status_rows_recorded: AtomicU64,
    pub status_rows_retried: AtomicU64,
    pub api_errors: AtomicU64,
    pub streams_open: AtomicU64,
    pub stream_bytes: AtomicU64,
    /// A batch sent to its ack: the node committed it.
    pub push_ack: Histogram,
    /// One write to the API server (status, event, deletion, node, lease).
    pub api_write: Histogram,
}

pub static METRICS: Metrics = Metrics {
    connected_nodes: AtomicU64::new(0),
    changes_pushed: AtomicU64::new(0),
    batches_acked: AtomicU64::new(0),
    status_rows_recorded: AtomicU64::new(0),
    status_rows_retried: AtomicU64::new(0),
    api_errors: AtomicU64::new(0),
    streams_open: AtomicU64::new(0),
    stream_bytes: AtomicU64::new(0),
    push_ack: Histogram::new(),
    api_write: Histogram::new(),
};

/// The Prometheus text exposition of everything above.
pub fn render() -> String {
    let m = &METRICS;
    let mut out = String::new();
    let mut one = |name: &str, kind: &str, help: &str, v: &AtomicU64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}\n",
            v.load(Relaxed)
        ));
    };
    one(
        "outrigger_cloud_connected_nodes",
        "gauge",
        "Edge nodes with a link up.",
        &m.connected_nodes,
    );
    one(
        "outrigger_cloud_changes_pushed_total",
        "counter",
        "Object changes sent to edge nodes.",
        &m.changes_pushed,
    );
    one(
        "outrigger_cloud_batches_acked_total",
        "counter",
        "Batches of changes edge nodes committed and acked.",
        &m.batches_acked,
    );
    one(
        "outrigger_cloud_status_rows_recorded_total",
        "counter",
        "Status and event rows from edge nodes recorded (or refused for good) and acked.",
        &m.status_rows_recorded,
    );
    one(
        "outrigger_cloud_status_rows_retried_total",
        "counter",
        "Status and event rows left unacked after a passing failure.",
        &m.status_rows_retried,
    );
    one(
        "outrigger_cloud_api_errors_total",
        "counter",
        "Errors from the Kubernetes API server.",
        &m.api_errors,
    );
    one(
        "outrigger_cloud_streams_open",
        "gauge",
        "Streams (kubectl logs) open inside edge links, until the edge ended its side.",
        &m.streams_open,
    );
    one(
        "outrigger_cloud_stream_bytes_total",
        "counter",
        "Bytes of stream data (logs) received from edge nodes.",
        &m.stream_bytes,
    );
    m.push_ack.render(
        "outrigger_cloud_push_ack_seconds",
        "From a batch of changes sent to the edge's ack (committed to its store).",
        &mut out,
    );
    m.api_write.render(
        "outrigger_cloud_api_write_seconds",
        "One write to the Kubernetes API server.",
        &mut out,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let h = Histogram::new();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(300));
        let mut s = String::new();
        h.render("x", "help", &mut s);
        assert!(s.contains("x_bucket{le=\"0.001\"} 0\n"));
        assert!(s.contains("x_bucket{le=\"0.005\"} 1\n"));
        assert!(s.contains("x_bucket{le=\"0.5\"} 2\n"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 2\n"));
        assert!(s.contains("x_count 2\n"));
        assert!(render().contains("outrigger_cloud_connected_nodes 0"));
    }
}
