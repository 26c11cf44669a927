//! Field devices end to end, with no cloud: `edge-rt run` with Modbus RTU
//! slaves simulated by pymodbus on socat PTY pairs, devices committed with
//! `edge-rt apply` (the node store), observed with `edge-rt devices`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use edge_rt::devices::DeviceView;
use outrigger_tests::modbus::{float32_words, Line, Slaves};
use outrigger_tests::util::*;

const MODEL: &str = r#"apiVersion: devices.outrigger.io/v1alpha1
kind: DeviceModel
metadata: {name: thermostat, namespace: plant}
spec:
  properties:
  - {name: temperature, type: float, unit: "C", minimum: -40, maximum: 125}
  - {name: setpoint, type: float, access: ReadWrite, minimum: 5, maximum: 30}
  - {name: relay, type: bool, access: ReadWrite}
"#;

fn device(name: &str, port: &std::path::Path, slave: u8, setpoint: Option<&str>) -> String {
    let desired = |v: Option<&str>| v.map(|v| format!(", desired: \"{v}\"")).unwrap_or_default();
    format!(
        r#"---
apiVersion: devices.outrigger.io/v1alpha1
kind: Device
metadata: {{name: {name}, namespace: plant}}
spec:
  model: thermostat
  nodeName: gw
  protocol:
    modbus:
      rtu: {{port: {port}, baudRate: 115200, parity: None}}
      slaveId: {slave}
      timeoutMs: 300
  properties:
  - {{name: temperature, collectCycleMs: 100, reportCycleMs: 100, modbus: {{table: InputRegister, address: 0, dataType: int16, scale: 0.1}}}}
  - {{name: setpoint, collectCycleMs: 100{sp}, modbus: {{table: HoldingRegister, address: 10, dataType: float32}}}}
  - {{name: relay, collectCycleMs: 100{relay}, modbus: {{table: Coil, address: 0}}}}
"#,
        port = port.display(),
        sp = desired(setpoint),
        relay = desired(setpoint.map(|_| "true")),
    )
}

fn devices(node: &Node) -> Result<Vec<DeviceView>> {
    let out = node.cli(&["devices", "-A", "-o", "json"])?;
    if !out.status.success() {
        bail!("edge-rt devices: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn value(d: &DeviceView, p: &str) -> Option<String> {
    d.status
        .properties
        .iter()
        .find(|x| x.name == p)
        .and_then(|x| x.value.clone())
}

fn reason(d: &DeviceView) -> String {
    d.status
        .conditions
        .first()
        .map(|c| format!("{}/{}", c.status, c.reason))
        .unwrap_or_default()
}

async fn wait_device(
    node: &Node,
    name: &str,
    what: &str,
    pred: impl Fn(&DeviceView) -> bool,
) -> Result<DeviceView> {
    let r = wait_for(what, Duration::from_secs(20), || async {
        devices(node)
            .ok()?
            .into_iter()
            .find(|d| d.name == name)
            .filter(|d| pred(d))
    })
    .await;
    if r.is_err() {
        let now = devices(node).unwrap_or_default();
        let d = now.iter().find(|d| d.name == name);
        bail!(
            "{what}: {:?}\n{}",
            d.map(|d| (&d.status, &d.recent_errors)),
            node.daemon_log()
        );
    }
    r
}

fn apply(node: &Node, yaml: &str) -> Result<()> {
    let f = node.dir.path().join("apply.yaml");
    std::fs::write(&f, yaml)?;
    let out = node.cli(&["apply", "-f", &f.display().to_string()])?;
    if !out.status.success() {
        bail!("edge-rt apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Two slaves on one line, polled in turn; desired values written once and
/// read back; a slave that stops answering, one that answers garbage, and
/// the line itself gone and back: each says what happened, the other
/// device goes on, and nothing is written twice, not even across a
/// restart of edge-rt.
#[tokio::test]
async fn modbus_rtu_slaves_on_one_line_through_silence_garbage_and_a_lost_port() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let metrics_port = free_port()?;
    let mut cfg = std::fs::read_to_string(&node.config)?;
    cfg.push_str(&format!(
        "\n[api]\nmetrics_listen = \"127.0.0.1:{metrics_port}\"\n"
    ));
    std::fs::write(&node.config, cfg)?;
    let mut line = Line::new(node.dir.path(), "rs485")?;
    let mut slaves = Slaves::start(&line, &[1, 2])?;
    slaves.set(1, "ir", 0, &[215])?;
    slaves.set(2, "ir", 0, &[(-52i16) as u16])?;
    let daemon = node.start().await?;
    // What a pod reads on the node's broker: the Modbus device's twins.
    let broker = Broker::at(node.mqtt_port);
    let twins = node.dir.path().join("twins.txt");
    let topic = "$hw/events/device/plant/boiler";
    wait_for("the embedded broker", Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", node.mqtt_port)).ok()
    })
    .await?;
    let mut sub = broker.subscribe(&format!("{topic}/#"), &twins)?;
    apply(
        &node,
        &format!(
            "{MODEL}{}{}",
            device("boiler", &line.edge, 1, Some("21.5")),
            device("tank", &line.edge, 2, None)
        ),
    )?;

    // Readings, with scale, from both slaves on the one line.
    wait_device(&node, "boiler", "boiler's temperature", |d| {
        value(d, "temperature").as_deref() == Some("21.5")
    })
    .await?;
    wait_device(&node, "tank", "tank's temperature", |d| {
        value(d, "temperature").as_deref() == Some("-5.2")
    })
    .await?;
    // Desired values reach the registers, and read back as reported.
    let b = wait_device(&node, "boiler", "setpoint and relay written", |d| {
        value(d, "setpoint").as_deref() == Some("21.5")
            && value(d, "relay").as_deref() == Some("true")
    })
    .await?;
    assert_eq!(slaves.get(1, "hr", 10, 2)?, float32_words(21.5));
    assert_eq!(slaves.get(1, "co", 0, 1)?, vec![1]);
    assert_eq!(b.status.state.as_deref(), Some("Online"));
    let setpoint = b
        .status
        .properties
        .iter()
        .find(|p| p.name == "setpoint")
        .context("setpoint")?;
    assert_eq!(setpoint.observed_desired.as_deref(), Some("21.5"));
    let written = slaves.writes(1)?;
    assert_eq!(written, 2, "one write per desired value");
    assert_eq!(slaves.writes(2)?, 0);

    // A reading that changes on the slave follows.
    slaves.set(1, "ir", 0, &[230])?;
    wait_device(&node, "boiler", "the new temperature", |d| {
        value(d, "temperature").as_deref() == Some("23")
    })
    .await?;
    // The same on the twin topics, as KubeEdge's edgecore would publish it.
    seen(&twins, "/twin/update/document", |v| {
        v["twin"]["temperature"]["current"]["actual"]["value"] == "23"
            && v["twin"]["temperature"]["last"]["actual"]["value"] == "21.5"
    })
    .await?;
    broker.publish(
        &format!("{topic}/twin/get"),
        r#"{"event_id":"g1","timestamp":0}"#,
    )?;
    let g = seen(&twins, "/twin/get/result", |v| v["event_id"] == "g1").await?;
    assert_eq!(g["twin"]["temperature"]["actual"]["value"], "23", "{g}");
    assert_eq!(g["twin"]["setpoint"]["expected"]["value"], "21.5", "{g}");
    assert_eq!(g["twin"]["relay"]["expected"]["value"], "true", "{g}");
    assert_eq!(g["twin"]["temperature"]["metadata"]["type"], "float", "{g}");
    // Its values come from its registers: an update over MQTT is refused.
    broker.publish(
        &format!("{topic}/twin/update"),
        r#"{"event_id":"u1","timestamp":0,"twin":{"setpoint":{"actual":{"value":"5"}}}}"#,
    )?;
    let r = seen(&twins, "/twin/update/result", |v| v["event_id"] == "u1").await?;
    assert_eq!(r["code"], 400, "{r}");
    let _ = sub.kill();
    assert_eq!(slaves.get(1, "hr", 10, 2)?, float32_words(21.5));

    // Slave 1 goes silent: it says so; slave 2 goes on.
    slaves.mute(1, true)?;
    wait_device(&node, "boiler", "boiler offline by timeout", |d| {
        d.status.state.as_deref() == Some("Offline") && reason(d) == "False/Timeout"
    })
    .await?;
    slaves.set(2, "ir", 0, &[100])?;
    wait_device(&node, "tank", "tank still read", |d| {
        value(d, "temperature").as_deref() == Some("10")
            && d.status.state.as_deref() == Some("Online")
    })
    .await?;
    slaves.mute(1, false)?;
    wait_device(&node, "boiler", "boiler back", |d| {
        d.status.state.as_deref() == Some("Online")
    })
    .await?;

    // Prometheus has it too.
    let m = http_get(metrics_port, "/metrics")?;
    let series = |name: &str, dev: &str| -> Option<f64> {
        m.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "{name}{{namespace=\"plant\",device=\"{dev}\",protocol=\"modbus-rtu\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    assert!(
        series("edge_rt_device_timeouts_total", "boiler").is_some_and(|v| v >= 1.0),
        "{m}"
    );
    assert!(
        series("edge_rt_device_polls_total", "tank").is_some_and(|v| v > 10.0),
        "{m}"
    );
    assert_eq!(series("edge_rt_device_up", "tank"), Some(1.0), "{m}");

    // Answers from the wrong slave address, then with bad CRCs.
    slaves.corrupt("slave")?;
    wait_device(&node, "boiler", "a wrong slave's answer refused", |d| {
        reason(d) == "False/BadResponse"
    })
    .await?;
    slaves.corrupt("crc")?;
    wait_device(&node, "tank", "bad CRCs refused", |d| {
        d.status.state.as_deref() == Some("Offline")
    })
    .await?;
    slaves.corrupt("off")?;
    for n in ["boiler", "tank"] {
        wait_device(&node, n, "answers check again", |d| {
            d.status.state.as_deref() == Some("Online")
        })
        .await?;
    }

    // A desired value out of the model's range is refused, never written.
    apply(
        &node,
        &format!(
            "{MODEL}{}{}",
            device("boiler", &line.edge, 1, Some("99")),
            device("tank", &line.edge, 2, None)
        ),
    )?;
    wait_device(&node, "boiler", "the out-of-range value refused", |d| {
        d.status.properties.iter().any(|p| {
            p.name == "setpoint"
                && p.error
                    .as_deref()
                    .is_some_and(|e| e.contains("above the maximum 30"))
        })
    })
    .await?;
    assert_eq!(slaves.get(1, "hr", 10, 2)?, float32_words(21.5));

    // The port disappears (adapter pulled): both devices say so; back, and
    // both are read again.
    drop(slaves);
    line.cut();
    for n in ["boiler", "tank"] {
        wait_device(&node, n, "the port gone", |d| {
            reason(d) == "False/PortUnavailable"
        })
        .await?;
    }
    // What an operator at the gateway reads of it.
    // (The first failure is the read that broke, "broken pipe"; the reopen
    // that follows finds no port.)
    let described = wait_for("the reopen's error", Duration::from_secs(10), || async {
        let d = text(
            &node
                .cli(&["describe", "device", "tank", "-n", "plant"])
                .ok()?,
        );
        d.contains("unavailable: No such file").then_some(d)
    })
    .await?;
    assert!(
        described.contains("Reachable=False PortUnavailable")
            && described.contains("unavailable: No such file"),
        "{described}"
    );
    line.restore()?;
    let mut slaves = Slaves::start(&line, &[1, 2])?;
    slaves.set(1, "ir", 0, &[240])?;
    slaves.set(1, "hr", 10, &float32_words(21.5))?;
    slaves.set(1, "co", 0, &[1])?;
    slaves.set(2, "ir", 0, &[120])?;
    wait_device(&node, "boiler", "read after the port came back", |d| {
        value(d, "temperature").as_deref() == Some("24")
            && d.status.state.as_deref() == Some("Online")
    })
    .await?;
    wait_device(&node, "tank", "tank read after the port came back", |d| {
        value(d, "temperature").as_deref() == Some("12")
    })
    .await?;

    // edge-rt restarts with no cloud: the devices come from the store and
    // are polled again; the slave already has its desired values, so
    // nothing is written.
    apply(
        &node,
        &format!(
            "{MODEL}{}{}",
            device("boiler", &line.edge, 1, Some("21.5")),
            device("tank", &line.edge, 2, None)
        ),
    )?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = slaves.writes(1)?;
    drop(daemon);
    slaves.set(1, "ir", 0, &[250])?;
    let _daemon = node.start().await?;
    wait_device(&node, "boiler", "polled after the restart", |d| {
        value(d, "temperature").as_deref() == Some("25")
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        slaves.writes(1)?,
        before,
        "the restarted edge-rt wrote what the slave had"
    );

    // What an operator sees at the gateway.
    let table = text(&node.cli(&["devices", "-n", "plant"])?);
    assert!(
        table.lines().any(|l| l.starts_with("boiler")
            && l.contains("modbus-rtu")
            && l.contains("Online")
            && l.contains("temperature=25C")),
        "{table}"
    );
    let described = text(&node.cli(&["describe", "device", "tank", "-n", "plant"])?);
    assert!(
        described.contains("temperature   12") && described.contains("Reachable=True"),
        "{described}"
    );

    // Both devices of the line move to another baud rate in one apply: the
    // line reopens with it (not "LineConflict" against their own old runs).
    apply(
        &node,
        &format!(
            "{MODEL}{}{}",
            device("boiler", &line.edge, 1, Some("21.5")),
            device("tank", &line.edge, 2, None)
        )
        .replace("baudRate: 115200", "baudRate: 57600"),
    )?;
    // Long enough for the restart: a reading after it comes from the new runs.
    tokio::time::sleep(Duration::from_secs(1)).await;
    slaves.set(1, "ir", 0, &[260])?;
    wait_device(&node, "boiler", "polled at the new baud rate", |d| {
        value(d, "temperature").as_deref() == Some("26")
            && d.status.state.as_deref() == Some("Online")
    })
    .await?;
    wait_device(&node, "tank", "tank polled at the new baud rate", |d| {
        d.status.state.as_deref() == Some("Online")
    })
    .await?;
    Ok(())
}

/// mosquitto on a free loopback port, as the node's broker.
struct Broker {
    child: Option<std::process::Child>,
    port: u16,
    /// What mosquitto_pub and mosquitto_sub need besides host and port
    /// (TLS files, a login).
    client_args: Vec<String>,
}

impl Broker {
    /// The clients of a broker someone else runs (edge-rt's own).
    fn at(port: u16) -> Broker {
        Broker {
            child: None,
            port,
            client_args: Vec::new(),
        }
    }

    fn start(port: u16) -> Result<Broker> {
        Broker::run(&["-p", &port.to_string()], port, Vec::new())
    }

    /// mosquitto with a configuration file of its own.
    fn with_config(conf: &std::path::Path, port: u16, client_args: Vec<String>) -> Result<Broker> {
        Broker::run(&["-c", &conf.to_string_lossy()], port, client_args)
    }

    fn run(args: &[&str], port: u16, client_args: Vec<String>) -> Result<Broker> {
        let child = std::process::Command::new("mosquitto")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("mosquitto (Debian's mosquitto package)")?;
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("mosquitto did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Broker {
            child: Some(child),
            port,
            client_args,
        })
    }

    fn stop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `mosquitto_pub`, as a device firmware would publish.
    fn publish(&self, topic: &str, message: &str) -> Result<()> {
        let o = std::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q", "1"])
            .args(&self.client_args)
            .args(["-t", topic, "-m", message])
            .output()?;
        if !o.status.success() {
            bail!("mosquitto_pub: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(())
    }

    /// `mosquitto_sub` on `topic`, its lines (`topic payload`) into a file.
    fn subscribe(&self, topic: &str, out: &std::path::Path) -> Result<std::process::Child> {
        let f = std::fs::File::create(out)?;
        let c = std::process::Command::new("mosquitto_sub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-q",
                "1",
                "-v",
            ])
            .args(&self.client_args)
            .args(["-t", topic])
            .stdout(f)
            .stderr(std::process::Stdio::null())
            .spawn()?;
        Ok(c)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Lines of `file` (what mosquitto_sub saw) for `suffix` whose payload
/// parses, once at least one is there.
async fn seen(
    file: &std::path::Path,
    suffix: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let r = wait_for(suffix, Duration::from_secs(10), || async {
        let text = std::fs::read_to_string(file).ok()?;
        text.lines().find_map(|l| {
            let (topic, payload) = l.split_once(' ')?;
            let v: serde_json::Value = serde_json::from_str(payload).ok()?;
            (topic.ends_with(suffix) && pred(&v)).then_some(v)
        })
    })
    .await;
    r.with_context(|| std::fs::read_to_string(file).unwrap_or_default())
}

const MQTT_MODEL: &str = r#"apiVersion: devices.outrigger.io/v1alpha1
kind: DeviceModel
metadata: {name: sensor, namespace: plant}
spec:
  properties:
  - {name: temperature, type: float, unit: "C"}
  - {name: switch, type: bool, access: ReadWrite}
---
apiVersion: devices.outrigger.io/v1alpha1
kind: Device
metadata: {name: probe, namespace: plant}
spec:
  model: sensor
  nodeName: gw
  protocol: {mqtt: {}}
  properties:
  - {name: temperature, collectCycleMs: 1000, reportCycleMs: 100}
  - {name: switch, desired: "true", collectCycleMs: 1000, reportCycleMs: 100}
"#;

/// A device that speaks KubeEdge's twin topics (mosquitto_pub and
/// mosquitto_sub as its firmware, mosquitto as the broker): its updates
/// become readings and are answered, the desired value goes to it as a
/// delta, bad updates and attempts to set desired values are refused,
/// `twin/get` is answered, silence and a broker that goes away are said.
#[tokio::test]
async fn an_mqtt_device_on_kubeedge_twin_topics_through_mosquitto() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let port = free_port()?;
    let mut broker = Broker::start(port)?;
    node.devices_config(&format!(
        "embedded_broker = false\nmqtt_broker = \"127.0.0.1:{port}\""
    ))?;
    let out = node.dir.path().join("sub.txt");
    let topic = "$hw/events/device/plant/probe";
    let mut sub = broker.subscribe(&format!("{topic}/#"), &out)?;
    let _daemon = node.start().await?;
    apply(&node, MQTT_MODEL)?;

    // The device reports: a reading, answered with the result.
    wait_for(
        "the node's subscriptions",
        Duration::from_secs(10),
        || async {
            broker
                .publish(
                    &format!("{topic}/twin/update"),
                    &update("e1", r#"{"temperature":{"actual":{"value":"21.5"}}}"#),
                )
                .ok()?;
            devices(&node)
                .ok()?
                .into_iter()
                .find(|d| d.name == "probe")
                .filter(|d| value(d, "temperature").as_deref() == Some("21.5"))
        },
    )
    .await?;
    let d = wait_device(&node, "probe", "online", |d| {
        d.status.state.as_deref() == Some("Online")
    })
    .await?;
    assert_eq!(d.status.protocol.as_deref(), Some("mqtt"));
    seen(&out, "/twin/update/result", |v| {
        v["event_id"] == "e1" && v["twin"]["temperature"]["actual"]["value"] == "21.5"
    })
    .await?;
    seen(&out, "/twin/update/document", |v| {
        v["twin"]["temperature"]["current"]["actual"]["value"] == "21.5"
    })
    .await?;
    // The desired value goes down as a delta; the device takes it.
    seen(&out, "/twin/update/delta", |v| {
        v["delta"]["switch"] == "true"
    })
    .await?;
    broker.publish(
        &format!("{topic}/twin/update"),
        &update("e2", r#"{"switch":{"actual":{"value":"true"}}}"#),
    )?;
    wait_device(&node, "probe", "the switch taken", |d| {
        value(d, "switch").as_deref() == Some("true")
            && d.status
                .properties
                .iter()
                .any(|p| p.name == "switch" && p.observed_desired.as_deref() == Some("true"))
    })
    .await?;

    // A value that is not the property's type, a property the model lacks,
    // a desired value set over MQTT: refused, said, nothing taken.
    for (id, twin, says) in [
        (
            "bad1",
            r#"{"temperature":{"actual":{"value":"hot"}}}"#,
            "is not a float",
        ),
        (
            "bad2",
            r#"{"humidity":{"actual":{"value":"40"}}}"#,
            "no property",
        ),
        (
            "bad3",
            r#"{"switch":{"expected":{"value":"false"}}}"#,
            "set on the Device",
        ),
    ] {
        broker.publish(&format!("{topic}/twin/update"), &update(id, twin))?;
        let r = seen(&out, "/twin/update/result", |v| v["event_id"] == id).await?;
        assert_eq!(r["code"], 400, "{r}");
        assert!(r["reason"].as_str().unwrap_or("").contains(says), "{r}");
    }
    let d = wait_device(&node, "probe", "bad updates said", |d| {
        reason(d) == "False/BadResponse"
    })
    .await?;
    assert_eq!(value(&d, "temperature").as_deref(), Some("21.5"));

    // twin/get, as an app on the node asks.
    broker.publish(
        &format!("{topic}/twin/get"),
        r#"{"event_id":"g1","timestamp":0}"#,
    )?;
    let g = seen(&out, "/twin/get/result", |v| v["event_id"] == "g1").await?;
    assert_eq!(g["twin"]["switch"]["expected"]["value"], "true", "{g}");
    assert_eq!(g["twin"]["temperature"]["actual"]["value"], "21.5", "{g}");

    // Silence (three collect cycles, at least 5 s) is said.
    wait_device(&node, "probe", "silence said", |d| {
        reason(d) == "False/Silent"
    })
    .await?;
    // The broker goes away: said; back, and the device is heard again.
    broker.stop();
    let _ = sub.kill();
    wait_device(&node, "probe", "broker gone said", |d| {
        reason(d) == "False/BrokerUnavailable"
    })
    .await?;
    let broker = Broker::start(port)?;
    heard(
        &node,
        &broker,
        "probe",
        "e3",
        "22",
        "heard again after the broker came back",
    )
    .await?;
    // A changed protocol section restarts the device: the new run takes
    // its MQTT id over from the old one (not "DeviceIdTaken") and hears it.
    apply(
        &node,
        &MQTT_MODEL.replace("protocol: {mqtt: {}}", "protocol: {mqtt: {qos: 0}}"),
    )?;
    heard(
        &node,
        &broker,
        "probe",
        "e4",
        "23",
        "heard after a restart with a new protocol section",
    )
    .await?;
    let _ = sub.wait();
    Ok(())
}

/// A device's `twin/update` message.
fn update(id: &str, twin: &str) -> String {
    format!(r#"{{"event_id":"{id}","timestamp":0,"twin":{twin}}}"#)
}

/// Publish device `plant/<name>`'s `twin/update` of temperature `t`
/// (again, as a device reports) until `edge-rt devices` shows it Online
/// with that value.
async fn heard(
    node: &Node,
    broker: &Broker,
    name: &str,
    event_id: &str,
    t: &str,
    what: &str,
) -> Result<()> {
    let body = format!(r#"{{"temperature":{{"actual":{{"value":"{t}"}}}}}}"#);
    let topic = format!("$hw/events/device/plant/{name}/twin/update");
    wait_for(what, Duration::from_secs(20), || async {
        broker.publish(&topic, &update(event_id, &body)).ok()?;
        devices(node)
            .ok()?
            .into_iter()
            .find(|d| d.name == name)
            .filter(|d| {
                value(d, "temperature").as_deref() == Some(t)
                    && d.status.state.as_deref() == Some("Online")
            })
    })
    .await
    .with_context(|| {
        let d = devices(node).unwrap_or_default();
        format!(
            "{:?}\n{}",
            d.iter().find(|d| d.name == name).map(|d| &d.status),
            node.daemon_log()
        )
    })?;
    Ok(())
}

/// The pid of the embedded broker edge-rt runs on `port`.
/// More MQTT devices than the client's queue holds, applied while the
/// broker is not there yet: once it comes, every device's delta goes out
/// and every device is heard (the hub never waits on a full client
/// queue, which would stop it for good).
#[tokio::test]
async fn three_hundred_mqtt_devices_before_the_broker_comes() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let port = free_port()?;
    node.devices_config(&format!(
        "embedded_broker = false\nmqtt_broker = \"127.0.0.1:{port}\""
    ))?;
    let _daemon = node.start().await?;
    let mut yaml = MQTT_MODEL.to_string();
    for i in 0..300 {
        yaml.push_str(
            &MQTT_MODEL[MQTT_MODEL.find("---").unwrap_or(0)..]
                .replace("name: probe", &format!("name: p{i}")),
        );
    }
    apply(&node, &yaml)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let broker = Broker::start(port)?;
    let out = node.dir.path().join("deltas.txt");
    let mut sub = broker.subscribe("$hw/events/device/plant/p299/twin/update/delta", &out)?;
    // The last device is heard (its messages went through the hub after
    // 300 others' deltas)...
    heard(&node, &broker, "p299", "x", "1.5", "the last device heard").await?;
    // ...and its update is answered with the delta of what it lacks.
    seen(&out, "/twin/update/delta", |v| {
        v["delta"]["switch"] == "true"
    })
    .await?;
    let _ = sub.kill();
    Ok(())
}

/// A device that speaks plain values (`format: PlainValue`): its values on
/// `<prefix>/<property>` become readings, its desired value goes to
/// `<prefix>/<property>/set` retained, a value not of its type is said,
/// topics that are not its properties are ignored.
#[tokio::test]
async fn a_plain_value_mqtt_device_through_mosquitto() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let port = free_port()?;
    let broker = Broker::start(port)?;
    node.devices_config(&format!(
        "embedded_broker = false\nmqtt_broker = \"127.0.0.1:{port}\""
    ))?;
    let _daemon = node.start().await?;
    let yaml = MQTT_MODEL.replace(
        "protocol: {mqtt: {}}",
        "protocol: {mqtt: {format: PlainValue, topicPrefix: plant/relay1}}",
    );
    apply(&node, &yaml)?;
    // The desired value, retained: a subscriber that comes later gets it.
    let out = node.dir.path().join("set.txt");
    let mut sub = wait_for(
        "the retained desired value",
        Duration::from_secs(10),
        || async {
            let mut c = broker.subscribe("plant/relay1/+/set", &out).ok()?;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let got = std::fs::read_to_string(&out).ok()?;
            if got.lines().any(|l| l == "plant/relay1/switch/set true") {
                Some(c)
            } else {
                let _ = c.kill();
                None
            }
        },
    )
    .await
    .with_context(|| node.daemon_log())?;
    let _ = sub.kill();
    for (topic, v) in [
        ("plant/relay1/firmware", "1.2.0"),
        ("plant/relay1/temperature", "21.5"),
        ("plant/relay1/switch", "true"),
    ] {
        broker.publish(topic, v)?;
    }
    let d = wait_device(&node, "probe", "plain readings", |d| {
        value(d, "temperature").as_deref() == Some("21.5")
            && value(d, "switch").as_deref() == Some("true")
            && d.status.state.as_deref() == Some("Online")
    })
    .await
    .with_context(|| node.daemon_log())?;
    let sw = d.status.properties.iter().find(|p| p.name == "switch");
    assert_eq!(
        sw.and_then(|p| p.observed_desired.as_deref()),
        Some("true"),
        "{d:?}"
    );
    broker.publish("plant/relay1/temperature", "hot")?;
    wait_device(&node, "probe", "a bad value said", |d| {
        reason(d) == "False/BadResponse"
    })
    .await?;
    Ok(())
}

/// An external broker over TLS that asks a login and a client
/// certificate (mosquitto with `require_certificate`), named by host in
/// `mqtt_broker = "mqtts://localhost:PORT"`: the device is heard through
/// it. A wrong password, a CA that did not sign the broker's certificate
/// and a CA file that is not there are each said in the device's
/// Reachable condition (never a fall-back to plain text).
#[tokio::test]
async fn an_mqtt_device_through_an_external_broker_over_tls_with_a_login() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let d = node.dir.path();
    let write = |name: &str, body: &str| -> Result<std::path::PathBuf> {
        let p = d.join(name);
        std::fs::write(&p, body)?;
        Ok(p)
    };
    let ca = outrigger_tests::pki::Ca::named("plant-mqtt-ca")?;
    let (server_cert, server_key) = ca.server_cert(&[])?;
    let (edge_cert, edge_key) = ca.client_cert("edge-rt", &[])?;
    let (fw_cert, fw_key) = ca.client_cert("probe", &[])?;
    let ca_file = write("ca.pem", &ca.cert_pem)?;
    let other_ca = write(
        "other-ca.pem",
        &outrigger_tests::pki::Ca::named("other")?.cert_pem,
    )?;
    let passwd = d.join("passwd");
    for (i, (user, pw)) in [("edge-rt", "s3cret"), ("probe", "fw-pw")]
        .iter()
        .enumerate()
    {
        let mut c = std::process::Command::new("mosquitto_passwd");
        if i == 0 {
            c.arg("-c");
        }
        let o = c.arg("-b").arg(&passwd).args([user, pw]).output()?;
        anyhow::ensure!(o.status.success(), "mosquitto_passwd: {}", text(&o));
    }
    let port = free_port()?;
    let conf = write(
        "mosquitto.conf",
        &format!(
            "user root\nper_listener_settings true\nlistener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            passwd.display(),
            ca_file.display(),
            write("server.pem", &server_cert)?.display(),
            write("server.key", &server_key)?.display(),
        ),
    )?;
    let fw = |f: &str, body: &str| -> Result<String> {
        Ok(write(f, body)?.to_string_lossy().into_owned())
    };
    let client_args = vec![
        "--cafile".into(),
        ca_file.to_string_lossy().into_owned(),
        "--cert".into(),
        fw("fw.pem", &fw_cert)?,
        "--key".into(),
        fw("fw.key", &fw_key)?,
        "-u".into(),
        "probe".into(),
        "-P".into(),
        "fw-pw".into(),
    ];
    let broker = Broker::with_config(&conf, port, client_args)?;
    let good_pw = write("edge-pw", "s3cret\n")?;
    let settings = format!(
        "embedded_broker = false\nmqtt_broker = \"mqtts://localhost:{port}\"\nmqtt_username = \"edge-rt\"\nmqtt_password_file = {:?}\nmqtt_ca_file = {:?}\nmqtt_cert_file = {:?}\nmqtt_key_file = {:?}\n",
        good_pw,
        ca_file,
        write("edge.pem", &edge_cert)?,
        write("edge.key", &edge_key)?,
    );
    node.devices_config(&settings)?;
    let mut daemon = Some(node.start().await?);
    apply(&node, MQTT_MODEL)?;
    heard(
        &node,
        &broker,
        "probe",
        "t1",
        "19.5",
        "a reading through the TLS broker",
    )
    .await?;

    // Each wrong setting, on a restart: said, and the device not heard.
    let bad_pw = write("bad-pw", "guess\n")?;
    let missing = d.join("no-such-ca.pem");
    for (from, to, says) in [
        (good_pw.clone(), bad_pw, "NotAuthorized"),
        (ca_file.clone(), other_ca, "UnknownIssuer"),
        (ca_file.clone(), missing.clone(), "no-such-ca.pem"),
    ] {
        drop(daemon.take());
        let cfg = std::fs::read_to_string(&node.config)?;
        let changed = cfg.replacen(&format!("{from:?}"), &format!("{to:?}"), 1);
        anyhow::ensure!(changed != cfg, "{from:?} not in the config");
        std::fs::write(&node.config, &changed)?;
        daemon = Some(node.start().await?);
        wait_device(&node, "probe", says, |d| {
            reason(d) == "False/BrokerUnavailable"
                && d.status
                    .conditions
                    .first()
                    .is_some_and(|c| c.message.contains(says))
        })
        .await
        .with_context(|| node.daemon_log())?;
        std::fs::write(&node.config, &cfg)?;
    }
    drop(daemon);
    Ok(())
}

fn broker_pid(port: u16) -> Option<i32> {
    let want = format!("127.0.0.1:{port}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        (args.get(1) == Some(&b"broker".as_slice()) && args.contains(&want.as_bytes()))
            .then_some(pid)
    })
}

/// With no broker on the node, edge-rt's embedded one (a child process)
/// carries an MQTT device's twin topics, for the device and for anyone
/// reading its twin; killed, it is started again and the device is heard
/// again; with edge-rt gone, it goes too.
#[tokio::test]
async fn the_embedded_broker_carries_an_mqtt_device_and_is_kept_running() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let node = Node::new()?;
    let broker = Broker::at(node.mqtt_port);
    let mut daemon = node.start().await?;
    let pid = wait_for("the embedded broker", Duration::from_secs(10), || async {
        let pid = broker_pid(node.mqtt_port)?;
        std::net::TcpStream::connect(("127.0.0.1", node.mqtt_port)).ok()?;
        Some(pid)
    })
    .await?;
    let out = node.dir.path().join("sub.txt");
    let topic = "$hw/events/device/plant/probe";
    let mut sub = broker.subscribe(&format!("{topic}/#"), &out)?;
    apply(&node, MQTT_MODEL)?;
    heard(
        &node,
        &broker,
        "probe",
        "21.5",
        "21.5",
        "a reading through the embedded broker",
    )
    .await?;
    seen(&out, "/twin/update/delta", |v| {
        v["delta"]["switch"] == "true"
    })
    .await?;
    seen(&out, "/twin/update/document", |v| {
        v["twin"]["temperature"]["current"]["actual"]["value"] == "21.5"
    })
    .await?;

    // Killed: edge-rt sees the broker gone, starts another, is heard again.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let _ = sub.kill();
    let _ = sub.wait();
    let again = wait_for(
        "the broker started again",
        Duration::from_secs(15),
        || async { broker_pid(node.mqtt_port).filter(|p| *p != pid) },
    )
    .await?;
    heard(
        &node,
        &broker,
        "probe",
        "22",
        "22",
        "heard again through the new broker",
    )
    .await?;

    // edge-rt gone (no chance to clean up): its broker goes with it.
    let _ = daemon.child.kill();
    let _ = daemon.child.wait();
    wait_for(
        "the broker gone with edge-rt",
        Duration::from_secs(10),
        || async {
            let zombie = std::fs::read_to_string(format!("/proc/{again}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().starts_with('Z'))
                });
            (!pid_alive(again) || zombie == Some(true)).then_some(())
        },
    )
    .await?;
    Ok(())
}

/// A plain HTTP GET on loopback; the body.
fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").context("no HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_string())
}
