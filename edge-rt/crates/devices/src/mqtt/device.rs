//! One MQTT device, as edgecore serves it: the device publishes what it
//! has (`twin/update` with `actual` values), edge-rt answers with the
//! result, publishes a document of what changed, and a delta of the
//! desired values the device lacks, which the device applies and reports
//! back. `twin/get` is answered with every twin. A device that says
//! nothing for three collect cycles (at least 5 s), or says `offline` on
//! `state/update`, is unreachable until it speaks again.

use litemap::LiteMap;
use std::time::Duration;

use crate::mailbox::{recv, Events, Receiver};
use outrigger_proto::device::{
    DeviceModelSpec, DeviceSpec, ModelProperty, Mqtt, PayloadFormat, Protocol, Value,
};
use rumqttc::QoS;
use tokio::time::Instant;

use super::hub::{Hub, Inbound};
use super::twin::{
    self, Base, ErrorResult, StateUpdate, TwinDocument, TwinResult, TwinUpdate, Twins,
};
use crate::{Command, Event};

#[derive(Debug, Clone)]
pub struct MqttDevice {
    /// Its id in the topics.
    pub id: String,
    /// `Some(prefix)`: it speaks plain values on `<prefix>/<property>`
    /// ([`super::plain`]), not KubeEdge's twins.
    pub plain: Option<String>,
    pub qos: QoS,
    /// Sorted Vecs for the few properties of a device (a BTree leaf has
    /// room for 11).
    pub properties: LiteMap<String, ModelProperty>,
    /// Unreachable after this long without a message.
    pub silence: Duration,
}

impl MqttDevice {
    /// The device as its spec and model say; None if it is not an MQTT one.
    pub fn new(
        namespace: &str,
        name: &str,
        spec: &DeviceSpec,
        model: &DeviceModelSpec,
    ) -> Option<MqttDevice> {
        let Protocol::Mqtt(Mqtt {
            device_id,
            qos,
            format,
            topic_prefix,
        }) = &spec.protocol
        else {
            return None;
        };
        let plain = (*format == PayloadFormat::PlainValue).then(|| {
            topic_prefix
                .clone()
                .unwrap_or_else(|| format!("devices/{namespace}/{name}"))
        });
        let properties = spec
            .properties
            .iter()
            .filter_map(|p| Some((p.name.clone(), model.property(&p.name)?.clone())))
            .collect();
        let cycle = spec
            .properties
            .iter()
            .map(|p| p.collect_cycle())
            .max()
            .unwrap_or(Duration::from_secs(1));
        Some(MqttDevice {
            id: device_id
                .clone()
                .unwrap_or_else(|| format!("{namespace}/{name}")),
            plain,
            qos: match qos {
                0 => QoS::AtMostOnce,
                2 => QoS::ExactlyOnce,
                _ => QoS::AtLeastOnce,
            },
            properties,
            silence: (cycle * 3).max(Duration::from_secs(5)),
        })
    }

    /// Why `value` may not be written to `property`, if it may not.
    pub(super) fn refuse_write(&self, property: &str, value: &str) -> Option<String> {
        match self.properties.get(property) {
            None => Some(format!("no property {property:?} on this device")),
            Some(p) => outrigger_proto::device::check_writable(p, property, value).err(),
        }
    }

    /// A desired value as the device will report it (canonical text).
    pub fn normalize(&self, name: &str, v: &Value) -> Result<String, String> {
        self.properties
            .get(name)
            .map(|_| v.to_string())
            .ok_or_else(|| format!("no property {name:?} on this device"))
    }
}

struct Run {
    dev: MqttDevice,
    hub: Hub,
    twins: Twins,
    events: Events,
}

impl Run {
    async fn send<T: serde::Serialize>(&self, suffix: &str, m: &T) -> Result<(), String> {
        let payload = serde_json::to_vec(m).map_err(|e| e.to_string())?;
        self.hub
            .publish(twin::topic(&self.dev.id, suffix), self.dev.qos, payload)
            .await
    }

    async fn event(&self, e: Event) -> bool {
        self.events.send(e).await.is_ok()
    }

    /// The delta, if the device lacks a desired value.
    async fn delta(&self) -> Result<(), String> {
        match self.twins.delta() {
            Some(m) => self.send("twin/update/delta", &m).await,
            None => Ok(()),
        }
    }

    /// A device's `twin/update`: every twin checked against the model
    /// first; all taken or none. None: the manager has gone.
    async fn update(&mut self, payload: &[u8]) -> Option<bool> {
        let m: TwinUpdate = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                return self
                    .refuse(Base::default(), format!("not a twin update: {e}"))
                    .await
            }
        };
        let now = outrigger_sys::now_ms();
        let mut values = Vec::new();
        for (name, t) in &m.twin {
            let Some(p) = self.dev.properties.get(name) else {
                return self
                    .refuse(m.base(), format!("the device has no property {name:?}"))
                    .await;
            };
            let Some(t) = t else {
                return self
                    .refuse(
                        m.base(),
                        format!("{name:?}: twins of a Device are not deleted"),
                    )
                    .await;
            };
            if t.expected.is_some() {
                return self
                    .refuse(
                        m.base(),
                        format!("{name:?}: desired values are set on the Device, not by MQTT"),
                    )
                    .await;
            }
            let Some(text) = t.actual.as_ref().and_then(|a| a.value.as_deref()) else {
                continue;
            };
            match Value::parse(p.type_, text) {
                Ok(v) => values.push((name.clone(), text.to_string(), v)),
                Err(e) => return self.refuse(m.base(), format!("{name:?}: {e}")).await,
            }
        }
        let mut changed = LiteMap::new();
        let mut doc = LiteMap::new();
        for (name, text, v) in values {
            let (cur, d) = self.twins.set_actual(&name, &text, now);
            if let Some(d) = d {
                doc.insert(name.clone(), d);
            }
            changed.insert(name.clone(), cur);
            if !self
                .event(Event::Value {
                    property: name,
                    value: v,
                })
                .await
            {
                return None;
            }
        }
        let answer = Base {
            event_id: m.event_id.clone(),
            timestamp: now,
        };
        let _ = self
            .send(
                "twin/update/result",
                &TwinResult {
                    base: answer,
                    twin: changed,
                },
            )
            .await;
        if !doc.is_empty() {
            let _ = self
                .send(
                    "twin/update/document",
                    &TwinDocument {
                        base: Base::new(),
                        twin: doc,
                    },
                )
                .await;
        }
        let _ = self.delta().await;
        Some(true)
    }

    async fn refuse(&self, b: Base, reason: String) -> Option<bool> {
        let _ = self
            .send(
                "twin/update/result",
                &ErrorResult {
                    base: Base {
                        event_id: b.event_id,
                        timestamp: outrigger_sys::now_ms(),
                    },
                    code: 400,
                    reason: reason.clone(),
                },
            )
            .await;
        self.event(Event::Contact {
            ok: false,
            reason: "BadResponse",
            message: format!("twin/update refused: {reason}"),
            latency: Duration::ZERO,
        })
        .await
        .then_some(false)
    }

    async fn get(&self, payload: &[u8]) {
        let _ = self
            .send("twin/get/result", &self.twins.get_result(payload))
            .await;
    }

    async fn write(&mut self, property: String, value: String) -> bool {
        if let Some(error) = self.dev.refuse_write(&property, &value) {
            return self
                .event(Event::WriteFailed {
                    property,
                    value,
                    error,
                })
                .await;
        }
        self.twins
            .set_expected(&property, Some(&value), outrigger_sys::now_ms());
        match self.delta().await {
            Ok(()) => self.event(Event::Wrote { property, value }).await,
            Err(error) => {
                self.event(Event::WriteFailed {
                    property,
                    value,
                    error,
                })
                .await
            }
        }
    }
}

/// Serve the device until the manager drops its end of `commands`.
pub async fn run(dev: MqttDevice, hub: Hub, mut commands: Receiver<Command>, events: Events) {
    if let Some(prefix) = dev.plain.clone() {
        return super::plain::run(dev, prefix, hub, commands, events).await;
    }
    let owner = events.device().to_string();
    let Some(mut inbox) = hub.register(&dev.id, &owner) else {
        let _ = events
            .send(Event::Contact {
                ok: false,
                reason: "DeviceIdTaken",
                message: format!("another device on this node has the MQTT id {:?}", dev.id),
                latency: Duration::ZERO,
            })
            .await;
        // Hold until stopped: the manager sees the condition.
        while recv(&mut commands).await.is_some() {}
        return;
    };
    let id = dev.id.clone();
    let silence = dev.silence;
    let twins = Twins::new(
        dev.properties
            .iter()
            .map(|(n, p)| (n.clone(), p.type_))
            .collect(),
    );
    let mut r = Run {
        dev,
        hub: hub.clone(),
        twins,
        events,
    };
    let mut heard: Option<Instant> = None;
    let mut silent_said = false;
    loop {
        let quiet_at = heard.map(|h| h + silence);
        tokio::select! {
            c = recv(&mut commands) => match c {
                Some(Command::Write { property, value }) => {
                    if !Box::pin(r.write(property, value)).await { break }
                }
                None => break,
            },
            m = recv(&mut inbox) => match m {
                None => break,
                Some(Inbound::Broker { up: true, .. }) => {
                    // The device may have missed a delta while we were away.
                    let _ = Box::pin(r.delta()).await;
                }
                Some(Inbound::Broker { up: false, reason }) => {
                    if !r.event(Event::Contact { ok: false, reason: "BrokerUnavailable", message: reason, latency: Duration::ZERO }).await { break }
                }
                Some(Inbound::Message { suffix, payload }) => {
                    heard = Some(Instant::now());
                    silent_said = false;
                    match suffix.as_str() {
                        // Boxed: the task idles small (hundreds of devices).
                        "twin/update" => match Box::pin(r.update(&payload)).await {
                            None => break,
                            Some(false) => {}
                            Some(true) => {
                                if !r.event(Event::Contact { ok: true, reason: "Answering", message: String::new(), latency: Duration::ZERO }).await { break }
                            }
                        },
                        "twin/get" => Box::pin(r.get(&payload)).await,
                        "state/update" => {
                            let s: StateUpdate = serde_json::from_slice(&payload).unwrap_or_default();
                            let state = s.state.to_ascii_lowercase();
                            let ok = matches!(state.as_str(), "online" | "ok");
                            let e = Event::Contact {
                                ok,
                                reason: if ok { "Answering" } else { "DeviceReportsOffline" },
                                message: format!("the device says {state:?}"),
                                latency: Duration::ZERO,
                            };
                            if !r.event(e).await { break }
                        }
                        _ => {}
                    }
                }
            },
            _ = async {
                match quiet_at {
                    Some(t) if !silent_said => tokio::time::sleep_until(t).await,
                    _ => std::future::pending().await,
                }
            } => {
                silent_said = true;
                let e = Event::Contact {
                    ok: false,
                    reason: "Silent",
                    message: format!("no message from the device for {}s", silence.as_secs()),
                    latency: Duration::ZERO,
                };
                if !r.event(e).await { break }
            }
        }
    }
    hub.unregister(&id, &owner);
}
