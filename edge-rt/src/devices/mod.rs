//! The device manager: the desired devices in (from the store and the
//! manifest directory, through `desired::merge`, so it runs from the first
//! second after a reboot with no cloud), one driver task per device, one
//! task per Modbus line its devices share, a twin per device
//! ([`twin::Twin`]) made from what the drivers see, and the desired values
//! written when the device does not have them.
//!
//! Desired values are level-triggered, the way a controller works: a
//! property whose reported value differs from its desired one is written
//! (compared in the device's own resolution: `21.55` on a register of
//! tenths is `21.6`), once; again only if the device took it and later
//! drifted from it (a power cycle, an operator at the panel), or, if it
//! never showed the value, after a back-off. So a resync or a restart never
//! writes what the device already has, and a newer desired value replaces
//! an older one that was not yet written (in order, the last one wins).

pub mod broker;
pub mod twin;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use litemap::LiteMap;

use outrigger_devices::mailbox::{self, mailbox, Events, Tagged};
use outrigger_devices::modbus::{self, Bus, LineConfig, LineId, ModbusDevice};
use outrigger_devices::mqtt::{self, mirror::Mirror, BrokerConfig, Hub, MqttDevice, Tls};
use outrigger_devices::{Command, Event};
use outrigger_proto::device::{self as api, Device, DeviceModel, Protocol};
use outrigger_proto::report::{DeviceEvent, DeviceReport, EventType};

use crate::events::EventRing;
use tokio::sync::mpsc;

use twin::Twin;

/// A device the node should have, with its model if the node has it.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredDevice {
    pub device: Device,
    pub model: Option<DeviceModel>,
    /// Desired values set at the node that hold over the spec's, by
    /// property (see [`api::LocalDesired`]).
    pub local: BTreeMap<String, api::LocalDesired>,
}

/// Device events kept for the cloud (a ring: a device flapping for a week
/// offline does not fill the disk).
const EVENTS_KEPT: usize = 256;

/// A rewrite of a value the device never showed waits this long, doubling.
const REWRITE_FIRST: i64 = 30_000;
const REWRITE_MAX: i64 = 600_000;

/// Where a desired value stands.
#[derive(Debug, Clone, Default)]
struct Desire {
    /// The desired value in the device's resolution (what a read returns).
    target: Option<String>,
    /// What was last sent for writing, when, and how many times.
    sent: Option<(String, i64, u32)>,
    /// The device showed the sent value since it was sent.
    taken: bool,
}

impl Desire {
    /// Whether to write now, given what the device reports. `read_first`:
    /// a device that is polled is read before it is written (it may have
    /// the value already); one that reports when it likes is not waited for.
    fn due(&mut self, reported: Option<&str>, read_first: bool, now_ms: i64) -> bool {
        let Some(target) = self.target.clone() else {
            return false;
        };
        if reported.is_none() && read_first {
            return false;
        }
        if reported == Some(target.as_str()) {
            if self.sent.as_ref().is_some_and(|(v, _, _)| *v == target) {
                self.taken = true;
            }
            return false;
        }
        let write = match &self.sent {
            Some((v, _, _)) if *v != target => true,
            None => true,
            Some(_) if self.taken => true,
            Some((_, at, n)) => {
                let wait = (REWRITE_FIRST << (*n).min(5)).min(REWRITE_MAX);
                now_ms - at >= wait
            }
        };
        if write {
            let n = match &self.sent {
                Some((v, _, n)) if *v == target && !self.taken => n + 1,
                _ => 0,
            };
            self.sent = Some((target, now_ms, n));
            self.taken = false;
        }
        write
    }
}

struct Running {
    /// Which start of the device this is (events of an older one are
    /// dropped).
    run: u64,
    namespace: String,
    name: String,
    /// What it was started from (a change other than desired values
    /// restarts it): the spec and its model's, not the whole objects.
    spec: api::DeviceSpec,
    model: Option<api::DeviceModelSpec>,
    twin: Twin,
    desires: LiteMap<String, Desire>,
    commands: Option<mailbox::Sender<Command>>,
    driver: Option<Driver>,
    /// Its twins on the broker, for a device that is not on MQTT.
    mirror: Option<mailbox::Sender<Mirror>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The driver a running device has.
enum Driver {
    Modbus(ModbusDevice),
    Mqtt(MqttDevice),
}

impl Driver {
    fn normalize(&self, name: &str, v: &api::Value) -> Result<String, String> {
        match self {
            Driver::Modbus(d) => d.normalize(name, v),
            Driver::Mqtt(d) => d.normalize(name, v),
        }
    }

    fn line(&self) -> Option<LineId> {
        match self {
            Driver::Modbus(d) => Some(d.line.id()),
            Driver::Mqtt(_) => None,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Default)]
struct State {
    /// Boxed: a BTree leaf holds 11 values, most of them empty.
    devices: BTreeMap<String, Box<Running>>,
    /// The number of the next start of a device.
    next_run: u64,
    /// Lines in use: their settings (devices on one must agree) and bus.
    lines: HashMap<LineId, (LineConfig, Bus)>,
    /// The broker connection, once an MQTT device needs it.
    hub: Option<Hub>,
}

/// What `edge-rt devices` and `describe device` show.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DeviceView {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub model: String,
    pub status: api::DeviceStatus,
    /// (RFC 3339, message), newest last.
    pub recent_errors: Vec<(String, String)>,
    /// Mean latency of an exchange with the device, ms.
    pub mean_latency_ms: f64,
    /// RFC 3339: the last successful read of any property.
    pub last_read: Option<String>,
}

/// What [`DeviceManager::plan_set`] found: rows for the store and what to
/// tell the operator.
#[derive(Debug, Default)]
pub struct SetPlan {
    pub put: Vec<crate::store::LocalDesired>,
    /// (uid, property)
    pub drop: Vec<(String, String)>,
    pub said: Vec<String>,
}

pub struct DeviceManager {
    broker: BrokerConfig,
    publish_twins: bool,
    state: Mutex<State>,
    /// A twin changed: the reporter looks.
    pub changed: tokio::sync::Notify,
    /// What happened to devices (unreachable and why, reachable again,
    /// desired values written or not), for the cluster's Events.
    pub events: EventRing<DeviceEvent>,
    generation: std::sync::atomic::AtomicU64,
    /// Every driver's events, into [`Self::on_event`] (one task for all).
    driver_events: mpsc::Sender<Tagged>,
    driver_inbox: Mutex<Option<mpsc::Receiver<Tagged>>>,
}

/// Driver events that may wait for the manager, all devices together.
const DRIVER_EVENTS: usize = 1024;

use outrigger_sys::now_ms;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DeviceManager {
    /// MQTT devices go through `broker` (connected when the first one
    /// comes).
    /// With `publish_twins`, the twins of devices that are not on MQTT go
    /// on the broker too.
    pub fn new(broker: BrokerConfig, publish_twins: bool) -> Arc<DeviceManager> {
        let (driver_events, rx) = mpsc::channel(DRIVER_EVENTS);
        Arc::new(DeviceManager {
            driver_events,
            driver_inbox: Mutex::new(Some(rx)),
            broker,
            publish_twins,
            state: Default::default(),
            changed: Default::default(),
            events: EventRing::new(EVENTS_KEPT),
            generation: Default::default(),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn bump(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.changed.notify_one();
    }

    /// The desired set: devices gone stop, new ones start, changed ones
    /// restart (their twin starts over), desired values are looked at.
    pub fn apply(self: &Arc<Self>, set: Vec<DesiredDevice>) {
        let mut st = lock(&self.state);
        let wanted: BTreeMap<String, DesiredDevice> = set
            .into_iter()
            .filter_map(|d| d.device.metadata.uid.clone().map(|u| (u, d)))
            .collect();
        let gone: Vec<String> = st
            .devices
            .keys()
            .filter(|uid| !wanted.contains_key(*uid))
            .cloned()
            .collect();
        for uid in gone {
            Self::stop(&mut st, &uid);
        }
        let mut restart = Vec::new();
        for (uid, d) in wanted {
            let same = st.devices.get(&uid).is_some_and(|r| {
                r.model.as_ref() == d.model.as_ref().map(|m| &m.spec)
                    && r.spec.protocol == d.device.spec.protocol
                    && {
                        // Only desired values changed: no restart.
                        let strip = |s: &api::DeviceSpec| {
                            let mut s = s.clone();
                            s.properties.iter_mut().for_each(|p| p.desired = None);
                            s
                        };
                        strip(&r.spec) == strip(&d.device.spec)
                    }
                    // Refused for a line another device held: tried again.
                    && r.twin.reachable.as_ref().is_none_or(|re| re.reason != "LineConflict")
            });
            if same {
                if let Some(r) = st.devices.get_mut(&uid) {
                    r.twin.generation = d.device.metadata.generation;
                    set_targets(r, &d);
                    r.spec = d.device.spec;
                }
                self.look(&mut st, &uid);
            } else {
                // Old runs go before any new one starts: their lines and
                // MQTT routes are the new runs' to take (devices of one
                // line changed together reopen it with the new settings;
                // see `start` and `Hub::register`).
                Self::stop(&mut st, &uid);
                restart.push((uid, d));
            }
        }
        for (uid, d) in restart {
            let r = self.start(&mut st, &uid, d);
            // It cannot run (no model, a bad spec, a line taken): say so.
            if let Some(re) = r.twin.reachable.clone().filter(|re| !re.ok) {
                self.event(&uid, &r, EventType::Warning, &re.reason, re.message);
            }
            st.devices.insert(uid.clone(), r);
            self.look(&mut st, &uid);
        }
        // Lines no device uses any more close (their task ends with the
        // last handle).
        let used: Vec<LineId> = st
            .devices
            .values()
            .filter_map(|r| r.driver.as_ref().and_then(Driver::line))
            .collect();
        st.lines.retain(|id, _| used.contains(id));
        if !st
            .devices
            .values()
            .any(|r| matches!(r.driver, Some(Driver::Mqtt(_))) || r.mirror.is_some())
        {
            st.hub = None;
        }
        drop(st);
        self.bump();
    }

    fn start(self: &Arc<Self>, st: &mut State, uid: &str, d: DesiredDevice) -> Box<Running> {
        let now = now_ms();
        self.listen();
        st.next_run += 1;
        let run = st.next_run;
        let events = Events::new(uid.into(), run, self.driver_events.clone());
        let spec = &d.device.spec;
        let units: Vec<(String, Option<String>)> = spec
            .properties
            .iter()
            .map(|p| {
                let unit = d
                    .model
                    .as_ref()
                    .and_then(|m| m.spec.property(&p.name))
                    .and_then(|m| m.unit.clone());
                (p.name.clone(), unit)
            })
            .collect();
        let report_cycle = spec
            .properties
            .iter()
            .map(|p| p.report_cycle())
            .min()
            .unwrap_or(Duration::from_millis(api::DEFAULT_CYCLE_MS.into()));
        let mut twin = Twin::new(spec.protocol.summary(), units, report_cycle);
        twin.generation = d.device.metadata.generation;
        let mut r = Box::new(Running {
            run,
            namespace: d.device.metadata.namespace.clone().unwrap_or_default(),
            name: d.device.metadata.name.clone().unwrap_or_default(),
            spec: d.device.spec.clone(),
            model: d.model.as_ref().map(|m| m.spec.clone()),
            twin,
            desires: LiteMap::new(),
            commands: None,
            driver: None,
            mirror: None,
            tasks: Vec::new(),
        });
        let Some(model) = &d.model else {
            r.twin.refuse(
                "ModelMissing",
                format!(
                    "no DeviceModel {:?} in namespace {:?} on this node",
                    spec.model, r.namespace
                ),
                now,
            );
            return r;
        };
        let problems = api::check(spec, &model.spec);
        // A bad desired value is that property's problem; anything else
        // stops the device from running at all.
        let fatal: Vec<String> = problems
            .iter()
            .filter(|p| !p.field.ends_with(".desired"))
            .map(|p| p.to_string())
            .collect();
        if !fatal.is_empty() {
            r.twin.refuse("InvalidSpec", fatal.join("; "), now);
            return r;
        }
        match &spec.protocol {
            Protocol::Modbus(_) => {
                let Some(dev) = ModbusDevice::new(spec, &model.spec) else {
                    return r;
                };
                let id = dev.line.id();
                // Settings other than the open line's are refused while
                // another device uses it; a device alone on its line (being
                // restarted with new settings) reopens it.
                let shared = st
                    .devices
                    .values()
                    .any(|o| o.driver.as_ref().and_then(Driver::line).as_ref() == Some(&id));
                let bus = match st.lines.get(&id) {
                    Some((cfg, _)) if *cfg != dev.line && shared => {
                        r.twin.refuse(
                            "LineConflict",
                            format!(
                                "line {id} is open with other settings by another device: {cfg:?}"
                            ),
                            now,
                        );
                        return r;
                    }
                    Some((cfg, bus)) if *cfg == dev.line => bus.clone(),
                    _ => {
                        let bus = Bus::start(dev.line.clone());
                        st.lines.insert(id, (dev.line.clone(), bus.clone()));
                        bus
                    }
                };
                let (ctx, crx) = mailbox(16);
                r.tasks.push(tokio::spawn(modbus::device::run(
                    dev.clone(),
                    bus,
                    crx,
                    events,
                )));
                r.commands = Some(ctx);
                r.driver = Some(Driver::Modbus(dev));
                if self.publish_twins {
                    let hub = self.hub(st);
                    let types = spec
                        .properties
                        .iter()
                        .filter_map(|p| Some((p.name.clone(), model.spec.property(&p.name)?.type_)))
                        .collect();
                    let (tx, rx) = mailbox(64);
                    r.tasks.push(tokio::spawn(mqtt::mirror::run(
                        format!("{}/{}", r.namespace, r.name),
                        uid.to_string(),
                        types,
                        hub,
                        rx,
                    )));
                    r.mirror = Some(tx);
                }
            }
            Protocol::Mqtt(_) => {
                let Some(dev) = MqttDevice::new(&r.namespace, &r.name, spec, &model.spec) else {
                    return r;
                };
                let hub = self.hub(st);
                let (ctx, crx) = mailbox(16);
                r.tasks.push(tokio::spawn(mqtt::device::run(
                    dev.clone(),
                    hub,
                    crx,
                    events,
                )));
                r.commands = Some(ctx);
                r.driver = Some(Driver::Mqtt(dev));
            }
        }
        set_targets(&mut r, &d);
        r
    }

    /// Stop a device's run: its tasks are aborted (when it is dropped) and
    /// its MQTT routes go at once, so a plain-value prefix is unsubscribed
    /// and a new run of it registers without waiting for the old task.
    fn stop(st: &mut State, uid: &str) {
        let Some(r) = st.devices.remove(uid) else {
            return;
        };
        let Some(hub) = &st.hub else {
            return;
        };
        match &r.driver {
            Some(Driver::Mqtt(d)) => match &d.plain {
                Some(prefix) => hub.unregister_plain(prefix, uid),
                None => hub.unregister(&d.id, uid),
            },
            Some(Driver::Modbus(_)) if r.mirror.is_some() => {
                hub.unregister(&format!("{}/{}", r.namespace, r.name), uid)
            }
            _ => {}
        }
    }

    /// The broker connection, started when the first device needs it.
    fn hub(&self, st: &mut State) -> Hub {
        st.hub
            .get_or_insert_with(|| Hub::start(self.broker.clone()))
            .clone()
    }

    /// Drivers' events into their twins, for as long as the manager
    /// lives: started with the first device.
    fn listen(self: &Arc<Self>) {
        let Some(mut inbox) = lock(&self.driver_inbox).take() else {
            return;
        };
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(t) = inbox.recv().await {
                let Some(m) = me.upgrade() else {
                    return;
                };
                m.on_event(&t.device, t.run, t.event);
            }
        });
    }

    fn on_event(&self, uid: &str, run: u64, ev: Event) {
        let mut st = lock(&self.state);
        let Some(r) = st.devices.get_mut(uid).filter(|r| r.run == run) else {
            return;
        };
        match &ev {
            Event::Wrote { property, value } => self.event(
                uid,
                r,
                EventType::Normal,
                "DesiredWritten",
                format!("{property}={value} written to the device"),
            ),
            Event::WriteFailed {
                property,
                value,
                error,
            } => self.event(
                uid,
                r,
                EventType::Warning,
                "DesiredNotWritten",
                format!("{property}={value} not written: {error}"),
            ),
            _ => {}
        }
        let was = r.twin.reachable.as_ref().map(|r| (r.ok, r.reason.clone()));
        r.twin.apply(&ev, now_ms());
        let now = r.twin.reachable.as_ref().map(|r| (r.ok, r.reason.clone()));
        if was != now {
            if let Some(re) = r.twin.reachable.clone() {
                // Answering from the start is no news; anything else is.
                match (was, re.ok) {
                    // Answering from the start, or waiting for the broker
                    // connection edge-rt is just making: no news.
                    (None, true) => {}
                    (None, false) if re.reason == "BrokerUnavailable" => {}
                    (_, true) => self.event(uid, r, EventType::Normal, "Reachable", re.message),
                    (_, false) => self.event(uid, r, EventType::Warning, &re.reason, re.message),
                }
            }
        }
        if let Event::Value { property, value } = &ev {
            if let Some(m) = &mut r.mirror {
                // A mirror behind drops a value: the next read brings it.
                let _ = m.try_send(Mirror::Actual {
                    property: property.clone(),
                    value: value.to_string(),
                });
            }
            self.look(&mut st, uid);
        }
        drop(st);
        self.bump();
    }

    /// Note an event about a device (logged by the ring too).
    fn event(&self, uid: &str, r: &Running, kind: EventType, reason: &str, message: String) {
        self.events.push(DeviceEvent {
            device_uid: uid.to_string(),
            namespace: r.namespace.clone(),
            device: r.name.clone(),
            kind,
            reason: reason.to_string(),
            message,
            count: 0,
            first_timestamp: String::new(),
            last_timestamp: String::new(),
            id: 0,
            seq: 0,
        });
    }

    /// Write what is due (see [`Desire::due`]).
    fn look(&self, st: &mut State, uid: &str) {
        let Some(r) = st.devices.get_mut(uid) else {
            return;
        };
        let Running {
            commands: Some(tx),
            driver,
            desires,
            twin,
            ..
        } = &mut **r
        else {
            return;
        };
        let now = now_ms();
        let read_first = matches!(driver, Some(Driver::Modbus(_)));
        for (name, d) in desires.iter_mut() {
            let reported = twin.properties.get(name).and_then(|p| p.value.as_deref());
            if d.due(reported, read_first, now) {
                if let Some((v, _, _)) = &d.sent {
                    let c = Command::Write {
                        property: name.clone(),
                        value: v.clone(),
                    };
                    if tx.try_send(c).is_err() {
                        // The driver is busy: try again at the next read.
                        d.sent = None;
                    }
                }
            }
        }
    }

    /// Devices whose report is due, at most `limit`, as reports; call
    /// [`Self::reported`] with their uids once committed.
    pub fn due(&self, now_ms: i64, limit: usize) -> Vec<DeviceReport> {
        let st = lock(&self.state);
        st.devices
            .iter()
            .filter(|(_, r)| r.twin.due(now_ms))
            .take(limit)
            .map(|(uid, r)| DeviceReport {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                uid: uid.clone(),
                status: r.twin.status(now_ms),
            })
            .collect()
    }

    pub fn reported(&self, uids: &[String], now_ms: i64) {
        let mut st = lock(&self.state);
        for u in uids {
            if let Some(r) = st.devices.get_mut(u) {
                r.twin.reported(now_ms);
            }
        }
    }

    /// What `edge-rt device set` asks, checked against the device as it
    /// runs: for each property a value to set at the node (`Some`) or to
    /// drop so the spec's holds again (`None`). All or nothing: any
    /// property refused refuses the whole request, with every reason.
    pub fn plan_set(
        &self,
        namespace: &str,
        name: &str,
        values: &[(String, Option<String>)],
        now_ms: i64,
    ) -> Result<SetPlan, String> {
        let st = lock(&self.state);
        let (uid, r) = st
            .devices
            .iter()
            .find(|(_, r)| r.namespace == namespace && r.name == name)
            .ok_or_else(|| format!("no device {namespace}/{name} on this node"))?;
        let model = r.model.as_ref().ok_or_else(|| {
            format!(
                "device {namespace}/{name}: its model {:?} is not on this node",
                r.spec.model
            )
        })?;
        let mut plan = SetPlan::default();
        let mut refused = Vec::new();
        for (prop, value) in values {
            let Some(p) = r.spec.properties.iter().find(|p| &p.name == prop) else {
                refused.push(format!("device {name} has no property {prop:?}"));
                continue;
            };
            let spec = p.desired.as_deref().unwrap_or("(none)");
            match value {
                Some(text) => {
                    if let Err(e) = api::check_desired(model, &r.spec.model, prop, text) {
                        refused.push(format!("{prop}={text}: {e}"));
                        continue;
                    }
                    if p.desired.as_deref() == Some(text.as_str()) {
                        plan.drop.push((uid.clone(), prop.clone()));
                        plan.said.push(format!(
                            "{prop}: the spec's desired value is {text} already"
                        ));
                        continue;
                    }
                    plan.put.push(crate::store::LocalDesired {
                        uid: uid.clone(),
                        property: prop.clone(),
                        value: text.clone(),
                        base: p.desired.clone(),
                        set_ms: now_ms,
                    });
                    plan.said.push(format!(
                        "{prop}={text} set at the node (the spec's: {spec}; the cluster's Device takes it when the link is up, unless it is changed there first)"
                    ));
                }
                None => {
                    plan.drop.push((uid.clone(), prop.clone()));
                    plan.said
                        .push(format!("{prop}: back to the spec's desired value, {spec}"));
                }
            }
        }
        if refused.is_empty() {
            Ok(plan)
        } else {
            Err(refused.join("; "))
        }
    }

    pub fn list(&self) -> Vec<DeviceView> {
        let st = lock(&self.state);
        let now = now_ms();
        st.devices
            .iter()
            .map(|(uid, r)| DeviceView {
                namespace: r.namespace.clone(),
                name: r.name.clone(),
                uid: uid.clone(),
                model: r.spec.model.clone(),
                status: r.twin.status(now),
                recent_errors: r
                    .twin
                    .recent_errors
                    .iter()
                    .map(|(ms, m)| {
                        (
                            jiff::Timestamp::from_millisecond(*ms)
                                .unwrap_or_default()
                                .to_string(),
                            m.clone(),
                        )
                    })
                    .collect(),
                last_read: r
                    .twin
                    .properties
                    .values()
                    .filter_map(|p| p.read_ms)
                    .max()
                    .and_then(|ms| jiff::Timestamp::from_millisecond(ms).ok())
                    .map(|t| t.to_string()),
                mean_latency_ms: if r.twin.counters.polls == 0 {
                    0.0
                } else {
                    r.twin.latency_total.as_secs_f64() * 1000.0 / r.twin.counters.polls as f64
                },
            })
            .collect()
    }
}

/// How edge-rt connects to its broker: the embedded one at `embedded`
/// (its first listener), or `mqtt_broker` (`host:port`, a bare host is
/// port 1883; `mqtts://host[:port]` is TLS, port 8883 by default). A
/// password file that cannot be read is logged and the client connects
/// without one; TLS files that cannot be read make the hub refuse to
/// connect at all, and every MQTT device says why.
pub fn broker_config(
    c: &crate::config::DevicesSection,
    node: &str,
    embedded: Option<std::net::SocketAddr>,
) -> BrokerConfig {
    let (host, port, tls) = match embedded {
        Some(a) => (a.ip().to_string(), a.port(), false),
        None => broker_address(&c.mqtt_broker),
    };
    let password = c.mqtt_password_file.as_ref().and_then(|f| {
        std::fs::read_to_string(f)
            .map(|s| s.trim_end().to_string())
            .map_err(|e| tracing::error!(file = %f.display(), error = %e, "the MQTT password cannot be read"))
            .ok()
    });
    BrokerConfig {
        tls: if tls { tls_config(c, &host) } else { Tls::Off },
        host,
        port,
        client_id: c
            .mqtt_client_id
            .clone()
            .unwrap_or_else(|| format!("edge-rt-{node}")),
        username: c.mqtt_username.clone(),
        password,
        keep_alive: Duration::from_secs(30),
    }
}

fn tls_config(c: &crate::config::DevicesSection, host: &str) -> Tls {
    let read =
        |f: &std::path::Path| std::fs::read(f).map_err(|e| format!("TLS: {}: {e}", f.display()));
    let load = || -> Result<_, String> {
        let ca = c.mqtt_ca_file.as_deref().map(read).transpose()?;
        let client = match (&c.mqtt_cert_file, &c.mqtt_key_file) {
            (Some(cert), Some(key)) => Some((read(cert)?, read(key)?)),
            (None, None) => None,
            _ => return Err("TLS: mqtt_cert_file and mqtt_key_file go together".into()),
        };
        mqtt::tls::client_config(
            host,
            ca.as_deref(),
            client.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice())),
        )
        .map_err(|e| format!("TLS: {e}"))
    };
    match load() {
        Ok(c) => Tls::On(c),
        Err(e) => Tls::Broken(e),
    }
}

/// `mqtt_broker` as (host, port, TLS): `host:port` (`[v6]:port`), with an
/// optional `mqtt://` or `mqtts://` in front; no port is MQTT's 1883, or
/// 8883 with TLS.
fn broker_address(s: &str) -> (String, u16, bool) {
    let (rest, tls) = match s.split_once("://") {
        Some(("mqtts" | "ssl" | "tls", r)) => (r, true),
        Some((_, r)) => (r, false),
        None => (s, false),
    };
    let rest = rest.trim_end_matches('/');
    let default = if tls { 8883 } else { 1883 };
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') => match p.parse() {
            Ok(p) => (h.trim_matches(['[', ']']).to_string(), p),
            Err(_) => (rest.to_string(), default),
        },
        _ => (rest.trim_matches(['[', ']']).to_string(), default),
    };
    (host, port, tls)
}

/// Each property's desired value in the device's resolution; a value the
/// model refuses is no target, and the property says why (`desired: ...`)
/// until it is fixed.
fn set_targets(r: &mut Running, d: &DesiredDevice) {
    let Some(model) = &d.model else {
        return;
    };
    let mut seen = Vec::new();
    for p in &d.device.spec.properties {
        seen.push(p.name.clone());
        let local = d.local.get(&p.name);
        let target = local.map(|l| &l.value).or(p.desired.as_ref()).map(|text| {
            let v = api::check_desired(&model.spec, &d.device.spec.model, &p.name, text)?;
            match &r.driver {
                Some(dev) => dev.normalize(&p.name, &v),
                None => Ok(v.to_string()),
            }
        });
        let prop = r.twin.properties.entry(p.name.clone()).or_default();
        prop.local_desired = local.cloned();
        if prop
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("desired: "))
        {
            prop.error = None;
        }
        if let Some(Err(e)) = &target {
            tracing::warn!(device = %r.name, namespace = %r.namespace, property = %p.name, error = %e, "desired value refused");
            prop.error = Some(format!("desired: {e}"));
        }
        let e = r.desires.entry(p.name.clone()).or_default();
        e.target = target.and_then(Result::ok);
        if let Some(m) = &mut r.mirror {
            let _ = m.try_send(Mirror::Expected {
                property: p.name.clone(),
                value: e.target.clone(),
            });
        }
    }
    r.desires.retain(|k, _| seen.contains(k));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_addresses_with_and_without_tls() {
        for (s, want) in [
            ("127.0.0.1:1883", ("127.0.0.1", 1883, false)),
            ("broker.plant", ("broker.plant", 1883, false)),
            ("mqtt://broker.plant:1884", ("broker.plant", 1884, false)),
            ("mqtts://broker.plant", ("broker.plant", 8883, true)),
            ("mqtts://[fd00::5]:8884", ("fd00::5", 8884, true)),
            ("[fd00::5]:1885", ("fd00::5", 1885, false)),
        ] {
            let (h, p, t) = broker_address(s);
            assert_eq!((h.as_str(), p, t), want, "{s}");
        }
    }

    #[test]
    fn a_desired_value_is_written_once_and_again_only_after_a_drift() {
        let mut d = Desire {
            target: Some("21.5".into()),
            ..Default::default()
        };
        // Not read yet: wait (a device that reports by itself is not
        // waited for).
        assert!(!d.due(None, true, 0));
        assert!(Desire {
            target: d.target.clone(),
            ..Default::default()
        }
        .due(None, false, 0));
        // The device already has it: nothing to write, ever.
        assert!(!d.due(Some("21.5"), true, 0));
        // It differs: write once.
        assert!(d.due(Some("20"), true, 10));
        assert!(!d.due(Some("20"), true, 20), "written twice");
        // It took; then someone changed it at the panel: write again.
        assert!(!d.due(Some("21.5"), true, 30));
        assert!(d.due(Some("19"), true, 40));
        // It never shows the value: back off, 30 s, then 60 s.
        assert!(!d.due(Some("19"), true, 40 + 29_000));
        assert!(d.due(Some("19"), true, 40 + 30_000));
        assert!(!d.due(Some("19"), true, 40 + 30_000 + 59_000));
        assert!(d.due(Some("19"), true, 40 + 30_000 + 60_000));
        // A newer desired value goes at once.
        d.target = Some("22".into());
        assert!(d.due(Some("19"), true, 40 + 30_000 + 60_001));
    }
}
