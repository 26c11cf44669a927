//! Prometheus metrics over plain HTTP (`[api] metrics_listen`): per device,
//! its exchanges, errors, timeouts, writes, latency and whether it answers.
//! Served on the runtime thread (hyper, no threads of its own).

use std::fmt::Write as _;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::devices::{DeviceManager, DeviceView};

/// The exposition text of `devices`.
pub fn render(devices: &[DeviceView]) -> String {
    let mut out = String::new();
    type Get = fn(&DeviceView) -> f64;
    let families: [(&str, &str, &str, Get); 7] = [
        (
            "edge_rt_device_polls_total",
            "counter",
            "Exchanges with the device (reads and writes).",
            |d| d.status.counters.polls as f64,
        ),
        (
            "edge_rt_device_poll_errors_total",
            "counter",
            "Exchanges that failed (no answer, garbage, exception, port gone).",
            |d| d.status.counters.poll_errors as f64,
        ),
        (
            "edge_rt_device_timeouts_total",
            "counter",
            "Exchanges the device did not answer in time.",
            |d| d.status.counters.timeouts as f64,
        ),
        (
            "edge_rt_device_writes_total",
            "counter",
            "Desired values the device took.",
            |d| d.status.counters.writes as f64,
        ),
        (
            "edge_rt_device_write_errors_total",
            "counter",
            "Desired values refused or not written.",
            |d| d.status.counters.write_errors as f64,
        ),
        (
            "edge_rt_device_latency_seconds_mean",
            "gauge",
            "Mean time of an exchange with the device.",
            |d| d.mean_latency_ms / 1000.0,
        ),
        (
            "edge_rt_device_up",
            "gauge",
            "1 if the device answers (its Reachable condition), else 0.",
            |d| f64::from(u8::from(d.status.state.as_deref() == Some("Online"))),
        ),
    ];
    for (name, kind, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for d in devices {
            let protocol = d
                .status
                .protocol
                .as_deref()
                .and_then(|p| p.split_whitespace().next())
                .unwrap_or("");
            let _ = writeln!(
                out,
                "{name}{{namespace=\"{}\",device=\"{}\",protocol=\"{}\"}} {}",
                escape(&d.namespace),
                escape(&d.name),
                escape(protocol),
                get(d)
            );
        }
    }
    out
}

/// A label value as the exposition format quotes it.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn serve(listener: tokio::net::TcpListener, devices: Arc<DeviceManager>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        };
        let devices = devices.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let devices = devices.clone();
                async move {
                    let (code, body) = if req.uri().path() == "/metrics" {
                        (StatusCode::OK, render(&devices.list()))
                    } else {
                        (StatusCode::NOT_FOUND, "only /metrics here\n".to_string())
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = code;
                    if let Ok(v) = "text/plain; version=0.0.4".parse() {
                        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
                    }
                    Ok::<_, std::convert::Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_series_per_device_with_its_labels() {
        let d = DeviceView {
            namespace: "plant".into(),
            name: "boiler\"1".into(),
            uid: "u".into(),
            model: "m".into(),
            status: outrigger_proto::device::DeviceStatus {
                state: Some("Online".into()),
                protocol: Some("modbus-rtu /dev/ttyUSB0 #3".into()),
                counters: outrigger_proto::device::Counters {
                    polls: 7,
                    ..Default::default()
                },
                ..Default::default()
            },
            recent_errors: vec![],
            mean_latency_ms: 12.0,
            last_read: None,
        };
        let t = render(&[d]);
        assert!(t.contains("edge_rt_device_polls_total{namespace=\"plant\",device=\"boiler\\\"1\",protocol=\"modbus-rtu\"} 7\n"), "{t}");
        assert!(t.contains("edge_rt_device_up{namespace=\"plant\",device=\"boiler\\\"1\",protocol=\"modbus-rtu\"} 1\n"), "{t}");
        assert!(t.contains("edge_rt_device_latency_seconds_mean{namespace=\"plant\",device=\"boiler\\\"1\",protocol=\"modbus-rtu\"} 0.012\n"), "{t}");
        assert!(t.contains("# TYPE edge_rt_device_polls_total counter"));
    }
}
