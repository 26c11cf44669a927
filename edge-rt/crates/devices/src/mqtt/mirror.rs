//! A device that is not on MQTT (a Modbus one) mirrored onto KubeEdge's
//! twin topics, so that pods on the node read every device's twins one
//! way: `twin/update/document` when a value changes, `twin/get` answered
//! with every twin (desired values as `expected`), and `twin/update`
//! refused: its values come from its registers, and desired values from
//! its Device.

use litemap::LiteMap;

use crate::mailbox::{recv, Receiver};
use outrigger_proto::device::PropertyType;
use rumqttc::QoS;

use super::hub::{Hub, Inbound};
use super::twin::{self, Base, ErrorResult, TwinDocument, Twins};

/// What the device manager tells a mirror.
#[derive(Debug, Clone, PartialEq)]
pub enum Mirror {
    /// A value read from the device.
    Actual { property: String, value: String },
    /// The desired value now in force (None: none).
    Expected {
        property: String,
        value: Option<String>,
    },
}

/// Mirror device `id` (of uid `owner`) until the manager drops its end of
/// `updates`.
pub async fn run(
    id: String,
    owner: String,
    types: LiteMap<String, PropertyType>,
    hub: Hub,
    mut updates: Receiver<Mirror>,
) {
    let Some(mut inbox) = hub.register(&id, &owner) else {
        tracing::warn!(device = %id, "another device on this node has this MQTT id: its twins are not mirrored");
        while recv(&mut updates).await.is_some() {}
        return;
    };
    let mut twins = Twins::new(types);
    // Boxed: the task idles small (one per device not on MQTT).
    let publish = |suffix: &str, payload: Vec<u8>| {
        Box::pin(hub.publish(twin::topic(&id, suffix), QoS::AtLeastOnce, payload))
    };
    loop {
        tokio::select! {
            u = recv(&mut updates) => match u {
                None => break,
                Some(Mirror::Actual { property, value }) => {
                    let (_, doc) = twins.set_actual(&property, &value, outrigger_sys::now_ms());
                    if let Some(doc) = doc {
                        let m = TwinDocument { base: Base::new(), twin: LiteMap::from_iter([(property, doc)]) };
                        if let Ok(p) = serde_json::to_vec(&m) {
                            let _ = publish("twin/update/document", p).await;
                        }
                    }
                }
                Some(Mirror::Expected { property, value }) => {
                    twins.set_expected(&property, value.as_deref(), outrigger_sys::now_ms());
                }
            },
            m = recv(&mut inbox) => match m {
                None => break,
                Some(Inbound::Message { suffix, payload }) => {
                    let answer = match suffix.as_str() {
                        "twin/get" => serde_json::to_vec(&twins.get_result(&payload)).map(|p| ("twin/get/result", p)),
                        "twin/update" => {
                            let b: Base = serde_json::from_slice(&payload).unwrap_or_default();
                            let e = ErrorResult {
                                base: Base { event_id: b.event_id, timestamp: outrigger_sys::now_ms() },
                                code: 400,
                                reason: "not an MQTT device: its values come from the device, its desired values from its Device".into(),
                            };
                            serde_json::to_vec(&e).map(|p| ("twin/update/result", p))
                        }
                        _ => continue,
                    };
                    if let Ok((suffix, p)) = answer {
                        let _ = publish(suffix, p).await;
                    }
                }
                Some(Inbound::Broker { .. }) => {}
            },
        }
    }
    hub.unregister(&id, &owner);
}
