//! `/metrics/resource` as a kubelet serves it: the Prometheus series that
//! metrics-server reads (and so `kubectl top`), made from the node's
//! summary. Samples carry the time they were measured (milliseconds), as
//! the kubelet's do: metrics-server computes rates from them and drops a
//! sample whose time does not advance.

use std::fmt::Write as _;

use outrigger_proto::stats::{CpuStats, MemoryStats, Summary};

pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Milliseconds since the epoch of an RFC 3339 time.
fn millis(t: &str) -> Option<i64> {
    t.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond())
}

fn seconds(t: &str) -> Option<f64> {
    t.parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_millisecond() as f64 / 1000.0)
}

/// A label value, escaped as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

struct Series {
    name: &'static str,
    help: &'static str,
    kind: &'static str,
    samples: Vec<String>,
}

impl Series {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Series {
        Series {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: &str, value: f64, at_ms: Option<i64>) {
        let mut line = format!("{}{labels} {value}", self.name);
        if let Some(t) = at_ms {
            let _ = write!(line, " {t}");
        }
        self.samples.push(line);
    }

    fn cpu(&mut self, labels: &str, c: Option<&CpuStats>) {
        if let Some(c) = c {
            if let Some(ns) = c.usage_core_nano_seconds {
                self.add(labels, ns as f64 / 1e9, millis(&c.time));
            }
        }
    }

    fn memory(&mut self, labels: &str, m: Option<&MemoryStats>) {
        if let Some(m) = m {
            if let Some(b) = m.working_set_bytes {
                self.add(labels, b as f64, millis(&m.time));
            }
        }
    }

    fn write(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} [STABLE] {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for s in &self.samples {
            out.push_str(s);
            out.push('\n');
        }
    }
}

/// The resource metrics of a node's summary, in the Prometheus text format.
pub fn resource_metrics(s: &Summary) -> String {
    let mut node_cpu = Series::new(
        "node_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the node in core-seconds",
    );
    let mut node_mem = Series::new(
        "node_memory_working_set_bytes",
        "gauge",
        "Current working set of the node in bytes",
    );
    let mut pod_cpu = Series::new(
        "pod_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the pod in core-seconds",
    );
    let mut pod_mem = Series::new(
        "pod_memory_working_set_bytes",
        "gauge",
        "Current working set of the pod in bytes",
    );
    let mut c_cpu = Series::new(
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the container in core-seconds",
    );
    let mut c_mem = Series::new(
        "container_memory_working_set_bytes",
        "gauge",
        "Current working set of the container in bytes",
    );
    let mut c_start = Series::new(
        "container_start_time_seconds",
        "gauge",
        "Start time of the container since unix epoch in seconds",
    );
    node_cpu.cpu("", s.node.cpu.as_ref());
    node_mem.memory("", s.node.memory.as_ref());
    for p in &s.pods {
        let (ns, pod) = (escape(&p.pod_ref.namespace), escape(&p.pod_ref.name));
        let labels = format!("{{namespace=\"{ns}\",pod=\"{pod}\"}}");
        pod_cpu.cpu(&labels, p.cpu.as_ref());
        pod_mem.memory(&labels, p.memory.as_ref());
        for c in &p.containers {
            let labels = format!(
                "{{container=\"{}\",namespace=\"{ns}\",pod=\"{pod}\"}}",
                escape(&c.name)
            );
            c_cpu.cpu(&labels, c.cpu.as_ref());
            c_mem.memory(&labels, c.memory.as_ref());
            if let Some(t) = c.start_time.as_deref().and_then(seconds) {
                c_start.add(&labels, t, None);
            }
        }
    }
    let mut out = String::new();
    for series in [
        &c_cpu, &c_mem, &c_start, &node_cpu, &node_mem, &pod_cpu, &pod_mem,
    ] {
        series.write(&mut out);
    }
    let mut err = Series::new(
        "resource_scrape_error",
        "gauge",
        "1 if there was an error while getting container metrics, 0 otherwise",
    );
    err.add("", 0.0, None);
    err.write(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_proto::stats::*;

    #[test]
    fn series_as_metrics_server_reads_them() {
        let t = "2021-06-22T21:31:18.302Z";
        let cpu = |ns| {
            Some(CpuStats {
                time: t.into(),
                usage_core_nano_seconds: Some(ns),
                ..Default::default()
            })
        };
        let mem = |b| {
            Some(MemoryStats {
                time: t.into(),
                working_set_bytes: Some(b),
                ..Default::default()
            })
        };
        let s = Summary {
            node: NodeStats {
                node_name: "gw".into(),
                cpu: cpu(10_000_000_000),
                memory: mem(1000),
                ..Default::default()
            },
            pods: vec![PodStats {
                pod_ref: PodReference {
                    name: "p".into(),
                    namespace: "ns".into(),
                    uid: "u".into(),
                },
                cpu: cpu(2_500_000_000),
                memory: mem(800),
                containers: vec![ContainerStats {
                    name: "c\"x".into(),
                    start_time: Some("2021-06-22T21:30:48.302Z".into()),
                    cpu: cpu(2_000_000_000),
                    memory: mem(700),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        let m = resource_metrics(&s);
        let has = |l: &str| m.lines().any(|x| x == l);
        assert!(has("node_cpu_usage_seconds_total 10 1624397478302"), "{m}");
        assert!(
            has("node_memory_working_set_bytes 1000 1624397478302"),
            "{m}"
        );
        assert!(has(
            "container_cpu_usage_seconds_total{container=\"c\\\"x\",namespace=\"ns\",pod=\"p\"} 2 1624397478302"
        ));
        assert!(has(
            "container_start_time_seconds{container=\"c\\\"x\",namespace=\"ns\",pod=\"p\"} 1624397448.302"
        ));
        assert!(has(
            "pod_memory_working_set_bytes{namespace=\"ns\",pod=\"p\"} 800 1624397478302"
        ));
        assert!(has("# TYPE container_cpu_usage_seconds_total counter"));
        assert!(has("resource_scrape_error 0"));
    }
}
