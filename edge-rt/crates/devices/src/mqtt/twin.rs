//! KubeEdge's device-twin messages, as edgecore speaks them on MQTT
//! (`edge/pkg/devicetwin/dttype`), so firmware and mappers written for
//! KubeEdge work unchanged.
//!
//! Topics, under `$hw/events/device/<id>/` (`<id>` is `<namespace>/<name>`
//! as KubeEdge 1.17 and later have it, or the Device's `mqtt.deviceId`):
//!
//! | suffix | from | payload |
//! | --- | --- | --- |
//! | `twin/update` | the device | [`TwinUpdate`]: `actual` values it has |
//! | `twin/update/result` | edge-rt | [`TwinResult`] (the twins it changed) or [`ErrorResult`] |
//! | `twin/update/delta` | edge-rt | [`TwinDelta`]: the desired values the device lacks |
//! | `twin/update/document` | edge-rt | [`TwinDocument`]: each changed twin, before and after |
//! | `twin/get` | anyone | [`Base`] |
//! | `twin/get/result` | edge-rt | [`TwinResult`] with every twin |
//! | `state/update` | the device | [`StateUpdate`] (`online`, `offline`, ...) |

use litemap::LiteMap;

use serde::{Deserialize, Deserializer, Serialize};

pub const PREFIX: &str = "$hw/events/device/";

/// `event_id` and `timestamp` (ms), on every message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Base {
    #[serde(default)]
    pub event_id: String,
    #[serde(default, deserialize_with = "millis")]
    pub timestamp: i64,
}

/// KubeEdge's own types say int64; its mapper framework sends a string.
fn millis<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Ms {
        N(i64),
        S(String),
    }
    Ok(match Ms::deserialize(d)? {
        Ms::N(n) => n,
        Ms::S(s) => s.parse().unwrap_or_default(),
    })
}

/// A map as a JSON object, empty too (litemap writes an empty map as a
/// list). The messages' maps are sorted Vecs: a BTreeMap leaf holds room
/// for 11 twins whatever the count, and every message has one or two.
fn object<K: Serialize, V: Serialize, S: serde::Serializer>(
    m: &LiteMap<K, V>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(m.iter())
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueMetadata {
    #[serde(default, deserialize_with = "millis", skip_serializing_if = "is_zero")]
    pub timestamp: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ValueMetadata>,
}

impl TwinValue {
    pub fn at(value: &str, ms: i64) -> TwinValue {
        TwinValue {
            value: Some(value.to_string()),
            metadata: Some(ValueMetadata { timestamp: ms }),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeMetadata {
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub type_: String,
}

/// One twin: what the cloud wants (`expected`) and what the device has
/// (`actual`). Versions, which edgecore keeps for its own sync, are not
/// sent to devices, and ignored when a device sends them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TypeMetadata>,
}

/// What a device sends. Its base's fields are its own, not flattened:
/// serde buffers a whole message to parse a flattened struct, and a node
/// with a hundred devices parses a hundred of these a second.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinUpdate {
    #[serde(default)]
    pub event_id: String,
    #[serde(default, deserialize_with = "millis")]
    pub timestamp: i64,
    /// A twin set to null is a deletion (of an optional twin) in KubeEdge;
    /// here the model says what a device has, so it is refused.
    #[serde(default, serialize_with = "object")]
    pub twin: LiteMap<String, Option<MsgTwin>>,
}

impl TwinUpdate {
    pub fn base(&self) -> Base {
        Base {
            event_id: self.event_id.clone(),
            timestamp: self.timestamp,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinResult {
    #[serde(flatten)]
    pub base: Base,
    #[serde(serialize_with = "object")]
    pub twin: LiteMap<String, MsgTwin>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResult {
    #[serde(flatten)]
    pub base: Base,
    pub code: u16,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinDelta {
    #[serde(flatten)]
    pub base: Base,
    #[serde(serialize_with = "object")]
    pub twin: LiteMap<String, MsgTwin>,
    #[serde(serialize_with = "object")]
    pub delta: LiteMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinDoc {
    pub last: Option<MsgTwin>,
    pub current: Option<MsgTwin>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinDocument {
    #[serde(flatten)]
    pub base: Base,
    #[serde(serialize_with = "object")]
    pub twin: LiteMap<String, TwinDoc>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateUpdate {
    #[serde(flatten)]
    pub base: Base,
    #[serde(default)]
    pub state: String,
}

/// One property's twin: what the cloud wants and what the device has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Twin {
    pub expected: Option<TwinValue>,
    pub actual: Option<TwinValue>,
}

/// A device's twins as edgecore keeps them, with each property's type for
/// the metadata KubeEdge sends along.
#[derive(Debug, Clone, Default)]
pub struct Twins {
    types: LiteMap<String, outrigger_proto::device::PropertyType>,
    /// Sorted Vecs for a device's few properties.
    pub twins: LiteMap<String, Twin>,
}

impl Twins {
    pub fn new(types: LiteMap<String, outrigger_proto::device::PropertyType>) -> Twins {
        Twins {
            types,
            twins: LiteMap::new(),
        }
    }

    fn msg(&self, name: &str, t: &Twin) -> MsgTwin {
        MsgTwin {
            expected: t.expected.clone(),
            actual: t.actual.clone(),
            optional: Some(false),
            metadata: self.types.get(name).map(|t| TypeMetadata {
                type_: type_name(*t).into(),
            }),
        }
    }

    /// Every twin, as `twin/get/result` carries them.
    pub fn all(&self) -> LiteMap<String, MsgTwin> {
        self.twins
            .iter()
            .map(|(n, t)| (n.clone(), self.msg(n, t)))
            .collect()
    }

    /// Take what the device has: the twin as it is now, and the
    /// document's entry if the value changed.
    pub fn set_actual(
        &mut self,
        name: &str,
        text: &str,
        now_ms: i64,
    ) -> (MsgTwin, Option<TwinDoc>) {
        let t = self.twins.entry(name.to_string()).or_default();
        let last = t.clone();
        t.actual = Some(TwinValue::at(text, now_ms));
        let cur = t.clone();
        let changed = last.actual.as_ref().and_then(|a| a.value.as_deref()) != Some(text);
        let doc = changed.then(|| TwinDoc {
            last: last.actual.is_some().then(|| self.msg(name, &last)),
            current: Some(self.msg(name, &cur)),
        });
        (self.msg(name, &cur), doc)
    }

    /// Take what the cloud wants (None: nothing); whether it changed.
    pub fn set_expected(&mut self, name: &str, text: Option<&str>, now_ms: i64) -> bool {
        let t = self.twins.entry(name.to_string()).or_default();
        if t.expected.as_ref().and_then(|v| v.value.as_deref()) == text {
            return false;
        }
        t.expected = text.map(|v| TwinValue::at(v, now_ms));
        true
    }

    /// The desired values the device lacks, if any, with every twin that
    /// has one.
    pub fn delta(&self) -> Option<TwinDelta> {
        let mut delta = LiteMap::new();
        for (n, t) in &self.twins {
            let want = t.expected.as_ref().and_then(|v| v.value.as_deref());
            let have = t.actual.as_ref().and_then(|v| v.value.as_deref());
            if let Some(w) = want {
                if Some(w) != have {
                    delta.insert(n.clone(), w.to_string());
                }
            }
        }
        if delta.is_empty() {
            return None;
        }
        let twin = self
            .twins
            .iter()
            .filter(|(_, t)| t.expected.is_some())
            .map(|(n, t)| (n.clone(), self.msg(n, t)))
            .collect();
        Some(TwinDelta {
            base: Base::new(),
            twin,
            delta,
        })
    }

    /// The answer to a `twin/get` (whose payload carries the event id).
    pub fn get_result(&self, request: &[u8]) -> TwinResult {
        let b: Base = serde_json::from_slice(request).unwrap_or_default();
        TwinResult {
            base: Base {
                event_id: b.event_id,
                timestamp: outrigger_sys::now_ms(),
            },
            twin: self.all(),
        }
    }
}

impl Base {
    /// A new message's: a fresh event id, now.
    pub fn new() -> Base {
        Base {
            event_id: uuid::Uuid::new_v4().to_string(),
            timestamp: outrigger_sys::now_ms(),
        }
    }
}

/// What a topic under [`PREFIX`] is about: the device id and the suffix.
pub fn split(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(PREFIX)?;
    for suffix in ["/twin/update", "/twin/get", "/state/update"] {
        if let Some(id) = rest.strip_suffix(suffix) {
            if !id.is_empty() {
                return Some((id, &suffix[1..]));
            }
        }
    }
    None
}

/// The topic of `suffix` for device `id`.
pub fn topic(id: &str, suffix: &str) -> String {
    format!("{PREFIX}{id}/{suffix}")
}

/// KubeEdge's name of a property type in twin metadata.
pub fn type_name(t: outrigger_proto::device::PropertyType) -> &'static str {
    use outrigger_proto::device::PropertyType as P;
    match t {
        P::Bool => "boolean",
        P::Int => "int",
        P::Float => "float",
        P::String => "string",
        P::Bytes => "bytes",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_as_a_kubeedge_mapper_sends_it() {
        // mapper-framework's shape: a string timestamp, metadata by value.
        let m: TwinUpdate = serde_json::from_str(
            r#"{"event_id":"","timestamp":"1700000000000","twin":{"temperature":{"actual":{"value":"23.5","metadata":{"timestamp":"1700000000000"}},"metadata":{"type":"float"}}}}"#,
        )
        .unwrap();
        assert_eq!(m.timestamp, 1_700_000_000_000);
        let t = m.twin.get("temperature").and_then(|t| t.as_ref()).unwrap();
        assert_eq!(t.actual.as_ref().unwrap().value.as_deref(), Some("23.5"));
        // edgecore's own shape, with versions (ignored).
        let m: TwinUpdate = serde_json::from_str(
            r#"{"event_id":"e1","timestamp":1700000000000,"twin":{"switch":{"expected":{"value":"1"},"optional":true,"metadata":{"type":"int"},"expected_version":{"cloud":3,"edge":1}}}}"#,
        )
        .unwrap();
        assert_eq!(m.event_id, "e1");
        assert!(m
            .twin
            .get("switch")
            .and_then(|t| t.as_ref())
            .unwrap()
            .expected
            .is_some());
    }

    #[test]
    fn twins_are_objects_even_when_there_are_none() {
        let r = TwinResult::default();
        assert_eq!(
            serde_json::to_value(&r).unwrap()["twin"],
            serde_json::json!({})
        );
        let back: TwinResult =
            serde_json::from_str(r#"{"event_id":"","timestamp":0,"twin":{}}"#).unwrap();
        assert!(back.twin.is_empty());
    }

    #[test]
    fn a_delta_is_what_edgecore_publishes() {
        let d = TwinDelta {
            base: Base {
                event_id: "x".into(),
                timestamp: 5,
            },
            twin: [(
                "switch".to_string(),
                MsgTwin {
                    expected: Some(TwinValue::at("1", 5)),
                    actual: Some(TwinValue::at("0", 4)),
                    optional: Some(true),
                    metadata: Some(TypeMetadata {
                        type_: "int".into(),
                    }),
                },
            )]
            .into_iter()
            .collect(),
            delta: [("switch".to_string(), "1".to_string())]
                .into_iter()
                .collect(),
        };
        assert_eq!(
            serde_json::to_value(&d).unwrap(),
            serde_json::json!({"event_id":"x","timestamp":5,
                "twin":{"switch":{"expected":{"value":"1","metadata":{"timestamp":5}},
                                  "actual":{"value":"0","metadata":{"timestamp":4}},
                                  "optional":true,"metadata":{"type":"int"}}},
                "delta":{"switch":"1"}})
        );
    }

    #[test]
    fn topics_name_the_device_with_or_without_its_namespace() {
        assert_eq!(
            split("$hw/events/device/plant/boiler/twin/update"),
            Some(("plant/boiler", "twin/update"))
        );
        assert_eq!(
            split("$hw/events/device/boiler/state/update"),
            Some(("boiler", "state/update"))
        );
        assert_eq!(split("$hw/events/device/boiler/twin/update/delta"), None);
        assert_eq!(split("$hw/events/device//twin/update"), None);
        assert_eq!(
            topic("plant/boiler", "twin/update/delta"),
            "$hw/events/device/plant/boiler/twin/update/delta"
        );
    }
}
