//! A device that speaks plain values (what many small firmwares do):
//! it publishes each property's value as text on `<prefix>/<property>`
//! (`21.5`, `true`), and takes a desired value on
//! `<prefix>/<property>/set`, published retained so that a device that
//! comes online later gets it. Taken when it reports the value back. A
//! device that says nothing for three collect cycles (at least 5 s) is
//! unreachable until it speaks again.

use std::time::Duration;

use crate::mailbox::{recv, Events, Receiver};
use outrigger_proto::device::Value;
use tokio::time::Instant;

use super::device::MqttDevice;
use super::hub::{Hub, Inbound};
use crate::{Command, Event};

fn contact(ok: bool, reason: &'static str, message: String) -> Event {
    Event::Contact {
        ok,
        reason,
        message,
        latency: Duration::ZERO,
    }
}

/// A message on `<prefix>/<property>`: the event it makes; none for a
/// topic that is not one of the device's properties (firmwares publish
/// more than their values: a status, a version).
fn reading(dev: &MqttDevice, property: &str, payload: &[u8]) -> Option<Event> {
    let p = dev.properties.get(property)?;
    let text = String::from_utf8_lossy(payload);
    Some(match Value::parse(p.type_, text.trim()) {
        Ok(value) => Event::Value {
            property: property.to_string(),
            value,
        },
        Err(e) => Event::ReadFailed {
            property: property.to_string(),
            error: format!("{:?}: {e}", text.trim()),
        },
    })
}

/// Serve the device until the manager drops its end of `commands`.
pub async fn run(
    dev: MqttDevice,
    prefix: String,
    hub: Hub,
    mut commands: Receiver<Command>,
    events: Events,
) {
    let owner = events.device().to_string();
    let Some(mut inbox) = hub.register_plain(&prefix, &owner) else {
        let _ = events
            .send(contact(
                false,
                "DeviceIdTaken",
                format!("another device on this node has the topic prefix {prefix:?}"),
            ))
            .await;
        while recv(&mut commands).await.is_some() {}
        return;
    };
    let mut heard: Option<Instant> = None;
    let mut silent_said = false;
    loop {
        let quiet_at = heard.map(|h| h + dev.silence);
        let ev = tokio::select! {
            c = recv(&mut commands) => match c {
                None => break,
                Some(Command::Write { property, value }) => {
                    let r = match dev.refuse_write(&property, &value) {
                        Some(e) => Err(e),
                        None => hub
                            .publish_retained(format!("{prefix}/{property}/set"), dev.qos, value.clone().into_bytes())
                            .await,
                    };
                    match r {
                        Ok(()) => vec![Event::Wrote { property, value }],
                        Err(error) => vec![Event::WriteFailed { property, value, error }],
                    }
                }
            },
            m = recv(&mut inbox) => match m {
                None => break,
                Some(Inbound::Broker { up: false, reason }) => vec![contact(false, "BrokerUnavailable", reason)],
                Some(Inbound::Broker { up: true, .. }) => vec![],
                Some(Inbound::Message { suffix, payload }) => {
                    heard = Some(Instant::now());
                    silent_said = false;
                    match reading(&dev, &suffix, &payload) {
                        None => vec![contact(true, "Answering", String::new())],
                        Some(e) => {
                            let c = match &e {
                                Event::ReadFailed { property, error } => contact(false, "BadResponse", format!("{prefix}/{property}: {error}")),
                                _ => contact(true, "Answering", String::new()),
                            };
                            vec![e, c]
                        }
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
                vec![contact(false, "Silent", format!("no message from the device for {}s", dev.silence.as_secs()))]
            }
        };
        for e in ev {
            if events.send(e).await.is_err() {
                hub.unregister_plain(&prefix, &owner);
                return;
            }
        }
    }
    hub.unregister_plain(&prefix, &owner);
}

#[cfg(test)]
mod tests {
    use super::*;
    use outrigger_proto::device::{Access, ModelProperty, PropertyType};

    fn dev() -> MqttDevice {
        let p = |type_| ModelProperty {
            name: String::new(),
            type_,
            access: Access::ReadWrite,
            unit: None,
            minimum: None,
            maximum: None,
            description: None,
        };
        MqttDevice {
            id: "plant/relay".into(),
            plain: Some("plant/relay".into()),
            qos: rumqttc::QoS::AtLeastOnce,
            properties: [
                ("on".to_string(), p(PropertyType::Bool)),
                ("t".to_string(), p(PropertyType::Float)),
            ]
            .into_iter()
            .collect(),
            silence: Duration::from_secs(5),
        }
    }

    #[test]
    fn plain_payloads_are_values_of_their_type_or_errors() {
        let d = dev();
        assert_eq!(
            reading(&d, "t", b" 21.5\n"),
            Some(Event::Value {
                property: "t".into(),
                value: Value::parse(PropertyType::Float, "21.5").unwrap()
            })
        );
        assert!(matches!(
            reading(&d, "on", b"maybe"),
            Some(Event::ReadFailed { .. })
        ));
        assert_eq!(reading(&d, "firmware", b"1.2"), None);
    }
}
