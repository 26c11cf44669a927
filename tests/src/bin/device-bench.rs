//! device-bench: the device bars of the README, with real parts.
//!
//! `device-bench latency`: a real control plane (v1.36), cloud-gw and an
//! edge-rt whose Modbus slave is pymodbus on a socat PTY pair, collect
//! cycle 100 ms, report cycle 200 ms:
//! - `kubectl patch` of a desired value until the slave's registers hold
//!   it (the bar: a median of at most 300 ms), and from the patch accepted;
//! - a register changed on the slave until a watch on the Device sees the
//!   new reading in its status (the bar: at most 1 s);
//! - side by side, the same on the node alone: `edge-rt device set` to the
//!   register, and the register to `edge-rt devices` showing it.
//!
//! `device-bench scale`: no cloud; 100 Modbus devices on 4 lines (25
//! slaves each) and 100 MQTT devices publishing every second on the
//! embedded broker, collect cycle 1 s: edge-rt's RSS and CPU idle and
//! loaded (the bars: at most 4 MB and 3 % of a core more), and its
//! broker's.
//!
//! As root, after `cargo build --release --workspace --bins`:
//!   target/release/device-bench latency [--iterations 20]
//!   target/release/device-bench scale [--secs 30]

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use futures_util::StreamExt;
use kube::api::{ApiResource, DynamicObject, WatchEvent, WatchParams};
use outrigger_tests::cloud::{join_with, Cloud};
use outrigger_tests::k8s::{Cluster, Scope};
use outrigger_tests::modbus::{float32_words, Line, Slaves};
use outrigger_tests::util::{wait_for, Node};
use serde_json::Value;

#[derive(Parser)]
enum Args {
    /// Desired value down and reading up, through the cluster and locally.
    Latency {
        #[arg(long, default_value_t = 20)]
        iterations: usize,
    },
    /// 100 Modbus and 100 MQTT devices: edge-rt's memory and CPU.
    Scale {
        /// How long each CPU measurement runs.
        #[arg(long, default_value_t = 30)]
        secs: u64,
        /// Modbus devices per line (4 lines).
        #[arg(long, default_value_t = 25)]
        per_line: u8,
        #[arg(long, default_value_t = 100)]
        mqtt: usize,
        /// Modbus twins not mirrored on the broker (`publish_twins = false`).
        #[arg(long)]
        no_mirror: bool,
    },
}

const MODEL: &str = r#"apiVersion: devices.outrigger.io/v1alpha1
kind: DeviceModel
metadata: {name: thermostat, namespace: NS}
spec:
  properties:
  - {name: temperature, type: float, unit: "C", minimum: -40, maximum: 125}
  - {name: setpoint, type: float, access: ReadWrite, minimum: 5, maximum: 30}
"#;

fn modbus_device(
    ns: &str,
    name: &str,
    node: &str,
    port: &std::path::Path,
    slave: u8,
    cycle: u32,
    report: u32,
) -> String {
    format!(
        r#"---
apiVersion: devices.outrigger.io/v1alpha1
kind: Device
metadata: {{name: {name}, namespace: {ns}}}
spec:
  model: thermostat
  nodeName: {node}
  protocol:
    modbus:
      rtu: {{port: {port}, baudRate: 115200, parity: None}}
      slaveId: {slave}
      timeoutMs: 300
  properties:
  - {{name: temperature, collectCycleMs: {cycle}, reportCycleMs: {report}, modbus: {{table: InputRegister, address: 0, dataType: int16, scale: 0.1}}}}
  - {{name: setpoint, desired: "20", collectCycleMs: {cycle}, reportCycleMs: {report}, modbus: {{table: HoldingRegister, address: 10, dataType: float32}}}}
"#,
        port = port.display()
    )
}

fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    use edge_rt::bench::percentile;
    (percentile(v, 0.5), percentile(v, 0.9), percentile(v, 1.0))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn run(mut c: Command, stdin: Option<&str>) -> Result<()> {
    use std::io::Write;
    let mut child = c
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().context("stdin")?;
    if let Some(s) = stdin {
        input.write_all(s.as_bytes())?;
    }
    drop(input);
    let o = child.wait_with_output()?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(())
}

/// Poll the slave's setpoint registers until they hold `v`.
fn until_register(slave: &mut Slaves, v: f32) -> Result<()> {
    let t0 = Instant::now();
    while slave.get(1, "hr", 10, 2)? != float32_words(v) {
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "{v} never reached the slave"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn devices(node: &Node, ns: &str) -> Result<Value> {
    let o = node.cli(&["devices", "-n", ns, "-o", "json"])?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Ok(serde_json::from_slice(&o.stdout)?)
}

fn temperature(status: &Value) -> Option<String> {
    status["properties"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "temperature")?["value"]
        .as_str()
        .map(str::to_string)
}

async fn latency(iterations: usize) -> Result<()> {
    let cluster = Cluster::own(&Default::default())?;
    cluster.install_device_crds()?;
    let scope = Scope::new(&cluster, "bench")?;
    let ns = scope.namespace.clone();
    let cloud = Cloud::start_kube(cluster.kubeconfig()).await?;
    let node = Node::new()?;
    scope.owns("node", "bench-edge");
    let o = join_with(
        &node,
        &cloud.server,
        &cloud.token("10m")?,
        "bench-edge",
        &[],
    )?;
    ensure!(
        o.status.success(),
        "join: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let daemon = node.start().await?;
    let line = Line::new(node.dir.path(), "rs485")?;
    let mut slave = Slaves::start(&line, &[1])?;
    slave.set(1, "ir", 0, &[200])?;
    let mut apply = scope.kubectl();
    apply.args(["apply", "-f", "-"]);
    let yaml = format!(
        "{}{}",
        MODEL.replace("NS", &ns),
        modbus_device(&ns, "boiler", "bench-edge", &line.edge, 1, 100, 200)
    );
    run(apply, Some(&yaml))?;
    until_register(&mut slave, 20.0)?;

    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(cluster.kubeconfig())?,
            &Default::default(),
        )
        .await?,
    )?;
    let ar = ApiResource {
        group: outrigger_proto::device::GROUP.into(),
        version: outrigger_proto::device::VERSION.into(),
        api_version: outrigger_proto::device::API_VERSION.into(),
        kind: "Device".into(),
        plural: "devices".into(),
    };
    let api = kube::Api::<DynamicObject>::namespaced_with(client, &ns, &ar);
    wait_for(
        "the first reading in the cluster",
        Duration::from_secs(30),
        || async {
            let d = api.get("boiler").await.ok()?;
            (temperature(&d.data["status"]).as_deref() == Some("20")).then_some(())
        },
    )
    .await?;

    let (mut patched, mut accepted, mut local_set) = (Vec::new(), Vec::new(), Vec::new());
    let (mut up, mut local_up) = (Vec::new(), Vec::new());
    for i in 0..iterations {
        // Down: a new setpoint each time, 10.5, 11, ...
        let v = 10.0 + (i % 30) as f32 * 0.5 + 0.5;
        let t = Instant::now();
        let mut patch = scope.kubectl();
        patch.args([
            "patch",
            "device",
            "boiler",
            "--type=json",
            "-p",
            &format!(
                r#"[{{"op": "replace", "path": "/spec/properties/1/desired", "value": "{v}"}}]"#
            ),
        ]);
        let t_ok = {
            run(patch, None)?;
            Instant::now()
        };
        until_register(&mut slave, v)?;
        patched.push(ms(t));
        accepted.push(t_ok.elapsed().as_secs_f64() * 1000.0);

        // Up: a new reading, seen by a watch on the Device.
        let raw = 150 + (i as u16 % 50) * 2 + 1;
        let want = format!("{}", raw as f64 / 10.0);
        let rv = api
            .get("boiler")
            .await?
            .metadata
            .resource_version
            .unwrap_or_default();
        let wp = WatchParams::default()
            .fields("metadata.name=boiler")
            .timeout(30);
        let mut watch = api.watch(&wp, &rv).await?.boxed();
        let t = Instant::now();
        slave.set(1, "ir", 0, &[raw])?;
        let mut seen = false;
        while let Some(ev) = watch.next().await {
            if let WatchEvent::Modified(d) = ev? {
                if temperature(&d.data["status"]).as_deref() == Some(want.as_str()) {
                    seen = true;
                    break;
                }
            }
        }
        ensure!(seen, "reading {want} not seen in the cluster within 30 s");
        up.push(ms(t));
    }
    // The same on the node alone.
    for i in 0..iterations {
        let v = 10.0 + (i % 30) as f32 * 0.5 + 0.25;
        let t = Instant::now();
        let o = node.cli(&[
            "device",
            "set",
            "boiler",
            &format!("setpoint={v}"),
            "-n",
            &ns,
        ])?;
        ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        until_register(&mut slave, v)?;
        local_set.push(ms(t));
        let raw = 300 + (i as u16 % 50) * 2 + 1;
        let want = format!("{}", raw as f64 / 10.0);
        let t = Instant::now();
        slave.set(1, "ir", 0, &[raw])?;
        loop {
            let d = devices(&node, &ns)?;
            if temperature(&d[0]["status"]).as_deref() == Some(want.as_str()) {
                break;
            }
            ensure!(
                t.elapsed() < Duration::from_secs(10),
                "{want} not seen on the node"
            );
        }
        local_up.push(ms(t));
    }
    println!(
        "device latency, {iterations} runs each: real control plane v1.36, cloud-gw, edge-rt, a pymodbus slave on a PTY at 115200 baud; collect cycle 100 ms, report cycle 200 ms (ms)"
    );
    println!("{:<58} {:>8} {:>8} {:>8}", "path", "median", "p90", "max");
    for (label, v) in [
        (
            "kubectl patch (process included) -> register written",
            &mut patched,
        ),
        (
            "patch accepted (kubectl returned) -> register written",
            &mut accepted,
        ),
        (
            "baseline: edge-rt device set -> register written",
            &mut local_set,
        ),
        ("register changed -> Device status (API watch)", &mut up),
        (
            "baseline: register changed -> edge-rt devices",
            &mut local_up,
        ),
    ] {
        let (m, p9, x) = stats(v);
        println!("{label:<58} {m:>8.0} {p9:>8.0} {x:>8.0}");
    }
    if std::env::var_os("DEVICE_BENCH_LOGS").is_some() {
        eprintln!(
            "cloud-gw:\n{}\nedge-rt:\n{}",
            cloud.log(),
            node.daemon_log()
        );
    }
    drop(slave);
    drop(line);
    drop(daemon);
    node.cleanup().await
}

/// (RSS bytes, CPU ticks) of a process.
/// A process's resident memory: all of it, and what is not pages of the
/// executable (heap, stacks: what the devices cost; the rest is code
/// touched once, shared and reclaimable).
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    rss: u64,
    anon: u64,
    ticks: u64,
}

fn usage(pid: u32) -> Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = |key: &str| -> Result<u64> {
        Ok(status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .with_context(|| key.to_string())?
            * 1024)
    };
    let (rss, anon) = (kb("VmRSS:")?, kb("RssAnon:")?);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command (which may hold spaces): state is field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    Ok(Usage { rss, anon, ticks })
}

/// The first child of `pid` whose command line has `word` (edge-rt's broker).
fn child_with(pid: u32, word: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(pid) {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            if cmd.split(|b| *b == 0).any(|a| a == word.as_bytes()) {
                return Some(p);
            }
        }
    }
    None
}

/// RSS at the end and CPU % of a core over `secs`, for edge-rt and its broker.
/// Memory at the end and CPU (% of a core) over `secs`, of edge-rt and its
/// broker.
async fn measure(edge: u32, broker: Option<u32>, secs: u64) -> Result<[(Usage, f64); 2]> {
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    let a0 = usage(edge)?;
    let b0 = broker.map(usage).transpose()?.unwrap_or_default();
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let a1 = usage(edge)?;
    let b1 = broker.map(usage).transpose()?.unwrap_or_default();
    let wall = t.elapsed().as_secs_f64();
    let pct = |t0: Usage, t1: Usage| (t1.ticks.saturating_sub(t0.ticks)) as f64 / hz / wall * 100.0;
    Ok([(a1, pct(a0, a1)), (b1, pct(b0, b1))])
}

async fn scale(secs: u64, per_line: u8, mqtt: usize, no_mirror: bool) -> Result<()> {
    let node = Node::new()?;
    if no_mirror {
        let cfg = std::fs::read_to_string(&node.config)?;
        std::fs::write(
            &node.config,
            cfg.replace("[devices]\n", "[devices]\npublish_twins = false\n"),
        )?;
    }
    let ns = "plant";
    let mut lines = Vec::new();
    let mut slaves = Vec::new();
    let ids: Vec<u8> = (1..=per_line).collect();
    for l in 0..4 {
        let line = Line::new(node.dir.path(), &format!("line{l}"))?;
        let mut s = Slaves::start(&line, &ids)?;
        for id in &ids {
            s.set(*id, "ir", 0, &[200 + *id as u16])?;
            s.set(*id, "hr", 10, &float32_words(20.0))?;
        }
        slaves.push(s);
        lines.push(line);
    }
    let daemon = node.start().await?;
    let pid = daemon.child.id();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let broker = child_with(pid, "broker");
    let idle = measure(pid, broker, secs).await?;

    let mut yaml = MODEL.replace("NS", ns);
    for (l, line) in lines.iter().enumerate() {
        for id in &ids {
            yaml.push_str(&modbus_device(
                ns,
                &format!("m{l}-{id}"),
                "gw",
                &line.edge,
                *id,
                1000,
                1000,
            ));
        }
    }
    yaml.push_str(&format!(
        "---\napiVersion: devices.outrigger.io/v1alpha1\nkind: DeviceModel\nmetadata: {{name: sensor, namespace: {ns}}}\nspec:\n  properties:\n  - {{name: temperature, type: float}}\n  - {{name: switch, type: bool, access: ReadWrite}}\n"
    ));
    for i in 0..mqtt {
        yaml.push_str(&format!(
            "---\napiVersion: devices.outrigger.io/v1alpha1\nkind: Device\nmetadata: {{name: q{i}, namespace: {ns}}}\nspec:\n  model: sensor\n  nodeName: gw\n  protocol: {{mqtt: {{}}}}\n  properties:\n  - {{name: temperature, collectCycleMs: 1000}}\n  - {{name: switch, desired: \"true\", collectCycleMs: 1000}}\n"
        ));
    }
    let file = node.dir.path().join("devices.yaml");
    std::fs::write(&file, &yaml)?;
    let o = node.cli(&["apply", "-f", &file.to_string_lossy()])?;
    ensure!(
        o.status.success(),
        "apply: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // 100 MQTT devices' firmware: each publishes its reading every second.
    let port = node.mqtt_port;
    let firmware = tokio::spawn(async move {
        let mut o = rumqttc::MqttOptions::new("bench-firmware", "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(30));
        let (client, mut ev) = rumqttc::AsyncClient::new(o, 512);
        tokio::spawn(async move {
            loop {
                if ev.poll().await.is_err() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        });
        let mut n = 0u64;
        loop {
            for i in 0..mqtt as u64 {
                let body = format!(
                    r#"{{"event_id":"","timestamp":0,"twin":{{"temperature":{{"actual":{{"value":"{}"}}}},"switch":{{"actual":{{"value":"true"}}}}}}}}"#,
                    20.0 + ((n + i) % 50) as f64 / 10.0
                );
                let _ = client
                    .publish(
                        format!("$hw/events/device/plant/q{i}/twin/update"),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        body,
                    )
                    .await;
            }
            n += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    let total = 4 * per_line as usize + mqtt;
    all_online(&node, ns, total, "all devices Online").await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let p0: u64 = polls(&node, ns)?;
    let loaded = measure(pid, broker, secs).await?;
    let p1: u64 = polls(&node, ns)?;
    // The same devices from the store after a restart: no apply's
    // high-water mark in it.
    daemon.terminate()?;
    let daemon = node.start().await?;
    let pid = daemon.child.id();
    all_online(&node, ns, total, "all devices Online after the restart").await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let restarted = measure(pid, child_with(pid, "broker"), secs).await?;
    firmware.abort();
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);
    println!(
        "{} Modbus devices on 4 PTY lines ({per_line} pymodbus slaves each, 115200 baud{}) and {mqtt} MQTT devices publishing every second on the embedded broker; collect cycle 1 s; CPU over {secs} s",
        4 * per_line as usize,
        if no_mirror { ", twins not mirrored" } else { "" }
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "process",
        "idle",
        &format!("{total} dev"),
        "added"
    );
    let row = |what: &str, idle: u64, loaded: u64| {
        println!(
            "{:<34} {:>9.1}M {:>9.1}M {:>9.1}M",
            what,
            mb(idle),
            mb(loaded),
            mb(loaded.saturating_sub(idle))
        )
    };
    row("edge-rt RSS", idle[0].0.rss, loaded[0].0.rss);
    row("  of which anonymous", idle[0].0.anon, loaded[0].0.anon);
    println!(
        "{:<34} {:>9.2}% {:>9.2}% {:>9.2}%",
        "edge-rt CPU (% of a core)",
        idle[0].1,
        loaded[0].1,
        loaded[0].1 - idle[0].1
    );
    row(
        "edge-rt RSS, restarted with them",
        idle[0].0.rss,
        restarted[0].0.rss,
    );
    row("  of which anonymous", idle[0].0.anon, restarted[0].0.anon);
    if broker.is_some() {
        row("edge-rt broker RSS", idle[1].0.rss, loaded[1].0.rss);
        row("  of which anonymous", idle[1].0.anon, loaded[1].0.anon);
        println!(
            "{:<34} {:>9.2}% {:>9.2}% {:>9.2}%",
            "edge-rt broker CPU",
            idle[1].1,
            loaded[1].1,
            loaded[1].1 - idle[1].1
        );
    }
    println!(
        "polls during the measurement: {} ({:.0}/s)",
        p1.saturating_sub(p0),
        p1.saturating_sub(p0) as f64 / secs as f64
    );
    drop(slaves);
    drop(lines);
    drop(daemon);
    node.cleanup().await
}

/// Wait (2 min) until `total` devices of `ns` are Online on the node.
async fn all_online(node: &Node, ns: &str, total: usize, what: &str) -> Result<()> {
    wait_for(what, Duration::from_secs(120), || async {
        let d = devices(node, ns).ok()?;
        let online = d
            .as_array()?
            .iter()
            .filter(|d| d["status"]["state"] == "Online")
            .count();
        (online == total).then_some(())
    })
    .await
    .with_context(|| node.daemon_log())
}

/// Polls counted by the node's twins, all devices.
fn polls(node: &Node, ns: &str) -> Result<u64> {
    let d = devices(node, ns)?;
    Ok(d.as_array()
        .context("devices")?
        .iter()
        .filter_map(|d| d["status"]["counters"]["polls"].as_u64())
        .sum())
}

#[tokio::main]
async fn main() -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("device-bench runs as root (PTYs, edge-rt)");
    }
    match Args::parse() {
        Args::Latency { iterations } => latency(iterations).await,
        Args::Scale {
            secs,
            per_line,
            mqtt,
            no_mirror,
        } => scale(secs, per_line, mqtt, no_mirror).await,
    }
}
