//! edge-infer: Outrigger's end-to-end example of a model shipped as an OCI
//! artifact, mounted into a pod as an image volume, and fed from a device
//! twin.
//!
//! `edge-infer make-model --out model.onnx` writes the model (model.rs says
//! what it computes); pushed as an artifact, a pod mounts it read-only
//! and runs `edge-infer run --model /models/model.onnx --broker
//! <gateway>:1883 --device plant/boiler --property temperature`, which
//! follows the device's twin documents on edge-rt's broker (twin.rs),
//! keeps the last `--window` readings, and prints and publishes a score
//! for each full window.

mod model;
mod twin;

use std::collections::VecDeque;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS, SubscribeReasonCode};

#[derive(Parser)]
#[command(name = "edge-infer", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write the example ONNX model: Sigmoid(readings · W + B) of the last
    /// four temperature readings.
    MakeModel {
        /// Where to write it.
        #[arg(long)]
        out: PathBuf,
        /// °C at which a steady temperature scores 0.5.
        #[arg(long, default_value_t = model::DEFAULT_THRESHOLD, allow_negative_numbers = true)]
        threshold: f32,
    },
    /// Score a device's readings as edge-rt publishes its twin documents.
    Run {
        /// The ONNX model (float32 [1, window] in, one float32 out).
        #[arg(long)]
        model: PathBuf,
        /// The MQTT broker, HOST:PORT.
        #[arg(long)]
        broker: String,
        /// The device's id in the twin topics: <namespace>/<name>, or its
        /// mqtt.deviceId.
        #[arg(long)]
        device: String,
        /// The property whose values are read.
        #[arg(long)]
        property: String,
        /// Readings per score: the model's input width.
        #[arg(long, default_value_t = model::WIDTH)]
        window: usize,
        /// Where scores go, as plain text [default:
        /// outrigger/inference/<device>/score].
        #[arg(long)]
        publish_topic: Option<String>,
        /// The MQTT client id [default: edge-infer-<$HOSTNAME or pid>].
        #[arg(long)]
        client_id: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::MakeModel { out, threshold } => make_model(&out, threshold),
        Cmd::Run {
            model,
            broker,
            device,
            property,
            window,
            publish_topic,
            client_id,
        } => run(Run {
            model,
            broker,
            device,
            property,
            window,
            publish_topic,
            client_id,
        }),
    };
    if let Err(e) = r {
        eprintln!("edge-infer: {e:#}");
        std::process::exit(1);
    }
}

fn make_model(out: &std::path::Path, threshold: f32) -> Result<()> {
    let bytes = model::make(threshold)?;
    // What is written loads and runs.
    let s = model::Scorer::from_bytes(&bytes).context("the model made does not load")?;
    let steady = s.score(&[20.0; model::WIDTH])?;
    let rising = s.score(&[20.0, 30.0, 40.0, 50.0])?;
    std::fs::write(out, &bytes).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "edge-infer: wrote {} ({} bytes): W = {:?}, B = {}; steady 20 °C scores {steady:.4}, \
         20-30-40-50 {rising:.4}",
        out.display(),
        bytes.len(),
        model::weights(),
        model::bias(threshold)
    );
    Ok(())
}

struct Run {
    model: PathBuf,
    broker: String,
    device: String,
    property: String,
    window: usize,
    publish_topic: Option<String>,
    client_id: Option<String>,
}

/// `HOST:PORT`, `[v6]:PORT` too.
fn host_port(s: &str) -> Result<(String, u16)> {
    let Some((host, port)) = s.rsplit_once(':') else {
        bail!("broker {s:?}: HOST:PORT expected");
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let port = port
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .with_context(|| format!("broker {s:?}: {port:?} is not a port"))?;
    if host.is_empty() {
        bail!("broker {s:?}: no host");
    }
    Ok((host.to_string(), port))
}

/// The last `n` readings.
struct Window {
    n: usize,
    readings: VecDeque<f32>,
}

impl Window {
    fn new(n: usize) -> Window {
        Window {
            n,
            readings: VecDeque::with_capacity(n),
        }
    }

    /// Add one; the window when it is full.
    fn push(&mut self, v: f32) -> Option<Vec<f32>> {
        if self.readings.len() == self.n {
            self.readings.pop_front();
        }
        self.readings.push_back(v);
        (self.readings.len() == self.n).then(|| self.readings.iter().copied().collect())
    }
}

fn line(score: f32, readings: &[f32]) -> String {
    let r: Vec<String> = readings.iter().map(|v| v.to_string()).collect();
    format!("score={score:.4} readings=[{}]", r.join(","))
}

fn run(a: Run) -> Result<()> {
    let (host, port) = host_port(&a.broker)?;
    let topic = twin::document_topic(&a.device)?;
    if a.property.is_empty() {
        bail!("--property: a property name expected");
    }
    let out_topic = a
        .publish_topic
        .unwrap_or_else(|| format!("outrigger/inference/{}/score", a.device));
    if out_topic.is_empty() || out_topic.contains(['+', '#', '\0']) {
        bail!("--publish-topic {out_topic:?}: not a topic to publish on");
    }
    // Loaded and optimised once; a model that does not load is fatal.
    let scorer = model::Scorer::load(&a.model)?;
    if a.window != scorer.width() {
        bail!(
            "--window {} but the model {} takes {} readings",
            a.window,
            a.model.display(),
            scorer.width()
        );
    }
    let client_id = a.client_id.unwrap_or_else(|| {
        let me = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| std::process::id().to_string());
        format!("edge-infer-{me}")
    });
    let mut opts = MqttOptions::new(client_id, host.clone(), port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut conn) = Client::new(opts, 16);
    eprintln!(
        "edge-infer: {} readings of {:?} from {topic} on {host}:{port}, scores to {out_topic}",
        a.window, a.property
    );

    let mut window = Window::new(a.window);
    let mut stdout = std::io::stdout();
    let mut backoff = Duration::from_secs(1);
    // The iterator ends only when the client is dropped, which it is not:
    // on an error, polling again reconnects.
    for ev in conn.iter() {
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                eprintln!("edge-infer: connected to {host}:{port}");
                backoff = Duration::from_secs(1);
                // A clean session each time: subscribe again.
                if let Err(e) = client.try_subscribe(topic.as_str(), QoS::AtLeastOnce) {
                    bail!("subscribing to {topic}: {e}");
                }
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                if s.return_codes.contains(&SubscribeReasonCode::Failure) {
                    eprintln!("edge-infer: the broker refused the subscription to {topic}");
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                let v = match twin::reading(&p.payload, &a.property) {
                    Ok(Some(v)) => v,
                    Ok(None) => continue,
                    Err(e) => {
                        eprintln!("edge-infer: skipped a message on {topic}: {e:#}");
                        continue;
                    }
                };
                let Some(readings) = window.push(v) else {
                    continue;
                };
                let score = scorer.score(&readings)?;
                let l = line(score, &readings);
                writeln!(stdout, "{l}")
                    .and_then(|_| stdout.flush())
                    .context("writing to stdout")?;
                let text = format!("{score:.4}");
                if let Err(e) =
                    client.try_publish(out_topic.as_str(), QoS::AtLeastOnce, false, text)
                {
                    eprintln!("edge-infer: score not published to {out_topic}: {e}");
                }
            }
            Ok(_) => {}
            Err(e) => {
                eprintln!("edge-infer: broker {host}:{port}: {e}; again in {backoff:?}");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn brokers_are_host_and_port() {
        assert_eq!(
            host_port("10.88.0.1:1883").unwrap(),
            ("10.88.0.1".into(), 1883)
        );
        assert_eq!(host_port("[::1]:1883").unwrap(), ("::1".into(), 1883));
        assert_eq!(host_port("broker:8883").unwrap(), ("broker".into(), 8883));
        for bad in [
            "broker",
            ":1883",
            "broker:",
            "broker:0",
            "broker:x",
            "broker:70000",
        ] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_score_for_each_full_window() {
        let mut w = Window::new(4);
        assert_eq!(w.push(20.0), None);
        assert_eq!(w.push(21.0), None);
        assert_eq!(w.push(22.0), None);
        assert_eq!(w.push(23.5), Some(vec![20.0, 21.0, 22.0, 23.5]));
        assert_eq!(w.push(25.0), Some(vec![21.0, 22.0, 23.5, 25.0]));
        assert_eq!(
            line(0.12345, &[21.0, 22.0, 23.5, 25.0]),
            "score=0.1235 readings=[21,22,23.5,25]"
        );
    }

    #[test]
    fn the_cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "edge-infer",
            "run",
            "--model",
            "/models/model.onnx",
            "--broker",
            "10.88.0.1:1883",
            "--device",
            "plant/boiler",
            "--property",
            "temperature",
        ])
        .unwrap();
        let Cmd::Run {
            window,
            publish_topic,
            ..
        } = c.cmd
        else {
            panic!("not run");
        };
        assert_eq!(window, 4);
        assert_eq!(publish_topic, None);
    }
}
