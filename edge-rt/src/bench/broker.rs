//! `edge-rt bench broker`: the embedded MQTT broker (`edge-rt broker`)
//! side by side with mosquitto on this machine. Publishers each publish
//! on a topic of their own at QoS 1, every subscriber subscribes to all of
//! them at QoS 1, so each message is delivered once per subscriber. Both
//! brokers get the same load from the same client (rumqttc tasks on this
//! process's one thread), so the client's own cost is in both columns.
//!
//! The load is closed-loop: at most `window` messages are out (published
//! and not yet delivered to every subscriber) at any time, so a
//! subscriber that the one-thread client reads slowly is waited for, not
//! dropped by the broker; the figure is what each broker sustains with
//! nothing lost.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

pub struct Load {
    pub publishers: usize,
    pub subscribers: usize,
    /// Per publisher.
    pub messages: usize,
    pub payload_bytes: usize,
    /// Messages out at once (published, not yet delivered to all).
    pub window: usize,
}

struct Outcome {
    publish_secs: f64,
    deliver_secs: f64,
    delivered: u64,
    rss_kib: u64,
    peak_kib: u64,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn wait_listening(port: u16, child: &mut std::process::Child) -> Result<()> {
    let t0 = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if let Some(s) = child.try_wait()? {
            bail!("the broker exited: {s}");
        }
        if t0.elapsed() > Duration::from_secs(10) {
            bail!("the broker did not listen on {port} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn options(id: String, port: u16) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    o
}

async fn drive(port: u16, load: &Load) -> Result<(f64, f64, u64)> {
    let delivered = Arc::new(AtomicU64::new(0));
    let last = Arc::new(std::sync::Mutex::new(Instant::now()));
    let (subscribed_tx, mut subscribed) = tokio::sync::mpsc::channel(load.subscribers);
    let mut tasks = Vec::new();
    for i in 0..load.subscribers {
        let (client, mut ev) = AsyncClient::new(options(format!("bench-sub-{i}"), port), 1000);
        let delivered = delivered.clone();
        let last = last.clone();
        let tx = subscribed_tx.clone();
        tasks.push(tokio::spawn(async move {
            let _client = client.clone();
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = client.subscribe("bench/+", QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = tx.send(()).await;
                    }
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        delivered.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut l) = last.lock() {
                            *l = Instant::now();
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }));
    }
    for _ in 0..load.subscribers {
        tokio::time::timeout(Duration::from_secs(10), subscribed.recv())
            .await
            .context("subscribers did not get their SUBACK within 10 s")?;
    }
    let payload = vec![b'x'; load.payload_bytes];
    let published = Arc::new(AtomicU64::new(0));
    let subs = load.subscribers as u64;
    let window = load.window.max(1) as u64;
    let t0 = Instant::now();
    let mut publishers = Vec::new();
    for i in 0..load.publishers {
        let (client, mut ev) = AsyncClient::new(options(format!("bench-pub-{i}"), port), 1000);
        let payload = payload.clone();
        let n = load.messages;
        let published = published.clone();
        let delivered = delivered.clone();
        publishers.push(tokio::spawn(async move {
            let c = client.clone();
            let sender = tokio::spawn(async move {
                for _ in 0..n {
                    // Wait while the window is full (deliveries behind).
                    while published.load(Ordering::Relaxed) * subs
                        > delivered.load(Ordering::Relaxed) + window * subs
                    {
                        tokio::time::sleep(Duration::from_micros(200)).await;
                    }
                    published.fetch_add(1, Ordering::Relaxed);
                    if c.publish(
                        format!("bench/{i}"),
                        QoS::AtLeastOnce,
                        false,
                        payload.clone(),
                    )
                    .await
                    .is_err()
                    {
                        break;
                    }
                }
            });
            let mut acked = 0;
            while acked < n {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(e) => return Err(anyhow::anyhow!("publisher {i}: {e}")),
                }
            }
            sender.abort();
            Ok(())
        }));
    }
    for p in publishers {
        p.await??;
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    let want = (load.publishers * load.messages * load.subscribers) as u64;
    // Deliveries end when all arrived or none came for 3 s (a broker that
    // drops what a slow subscriber has not read).
    loop {
        let quiet = last.lock().map(|l| l.elapsed()).unwrap_or_default();
        if delivered.load(Ordering::Relaxed) >= want || quiet > Duration::from_secs(3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let deliver_secs = last
        .lock()
        .map(|l| l.duration_since(t0).as_secs_f64())
        .unwrap_or(0.0);
    for t in tasks {
        t.abort();
    }
    Ok((
        publish_secs,
        deliver_secs,
        delivered.load(Ordering::Relaxed),
    ))
}

async fn one(name: &str, mut cmd: Command, port: u16, load: &Load) -> Result<Outcome> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let r = async {
        wait_listening(port, &mut child).await?;
        let (publish_secs, deliver_secs, delivered) = drive(port, load).await?;
        Ok(Outcome {
            publish_secs,
            deliver_secs,
            delivered,
            rss_kib: status_kib(child.id(), "VmRSS:"),
            peak_kib: status_kib(child.id(), "VmHWM:"),
        })
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    r
}

pub async fn run(load: Load) -> Result<()> {
    let exe = std::env::current_exe()?;
    let mut brokers: Vec<(String, Command, u16)> = Vec::new();
    let port = free_port()?;
    let mut c = Command::new(&exe);
    c.args(["broker", "--listen", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "error");
    brokers.push(("edge-rt broker".into(), c, port));
    let port = free_port()?;
    let mut c = Command::new("mosquitto");
    c.args(["-p", &port.to_string()]);
    brokers.push(("mosquitto".into(), c, port));

    let total = load.publishers * load.messages;
    println!(
        "{} publishers x {} messages of {} bytes at QoS 1, {} subscribers to all of them ({} deliveries expected), at most {} messages out at once",
        load.publishers,
        load.messages,
        load.payload_bytes,
        load.subscribers,
        total * load.subscribers,
        load.window
    );
    println!(
        "{:<16} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "broker", "publish/s", "deliver/s", "delivered", "RSS MiB", "peak MiB"
    );
    let mut results: HashMap<String, Outcome> = HashMap::new();
    for (name, cmd, port) in brokers {
        match one(&name, cmd, port, &load).await {
            Ok(o) => {
                println!(
                    "{:<16} {:>12.0} {:>12.0} {:>12} {:>10.1} {:>10.1}",
                    name,
                    total as f64 / o.publish_secs,
                    o.delivered as f64 / o.deliver_secs.max(1e-9),
                    o.delivered,
                    o.rss_kib as f64 / 1024.0,
                    o.peak_kib as f64 / 1024.0
                );
                results.insert(name, o);
            }
            Err(e) => println!("{name:<16} failed: {e:#}"),
        }
    }
    if results.is_empty() {
        bail!("no broker could be measured");
    }
    Ok(())
}
