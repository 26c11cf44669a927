//! The KubeEdge twin documents edge-rt publishes
//! (edge-rt/crates/devices/src/mqtt/twin.rs, `TwinDocument`): on
//! `$hw/events/device/<id>/twin/update/document` whenever a property's
//! value changes, for MQTT devices (device.rs) and mirrored Modbus ones
//! (mirror.rs) alike. `<id>` is `<namespace>/<name>`, or an MQTT device's
//! `mqtt.deviceId`:
//!
//! ```json
//! {"event_id": "...", "timestamp": 1700000000000,
//!  "twin": {"temperature": {
//!     "last":    {"actual": {"value": "21.5", "metadata": {"timestamp": ...}}, ...},
//!     "current": {"actual": {"value": "23",   "metadata": {"timestamp": ...}},
//!                 "optional": false, "metadata": {"type": "float"}}}}}
//! ```
//!
//! The reading is `twin.<property>.current.actual.value`, a string.

use anyhow::{bail, Result};

/// edge-rt's `twin::PREFIX`.
pub const PREFIX: &str = "$hw/events/device/";

/// The topic edge-rt publishes device `id`'s twin documents on.
pub fn document_topic(id: &str) -> Result<String> {
    if id.is_empty() || id.starts_with('/') || id.ends_with('/') {
        bail!("device id {id:?}: `<namespace>/<name>` or an MQTT device id expected");
    }
    if id.contains(['+', '#', '\0']) {
        bail!("device id {id:?}: '+', '#' and NUL are not allowed in MQTT topics");
    }
    Ok(format!("{PREFIX}{id}/twin/update/document"))
}

/// `property`'s new value in a twin document: None when the document is
/// about other properties, an error when it is not a document or the
/// value is not a finite number.
pub fn reading(payload: &[u8], property: &str) -> Result<Option<f32>> {
    let doc: serde_json::Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(e) => bail!("not a twin document (JSON: {e})"),
    };
    let Some(twins) = doc.get("twin").and_then(|t| t.as_object()) else {
        bail!("not a twin document (no \"twin\" object)");
    };
    let Some(t) = twins.get(property) else {
        return Ok(None);
    };
    let value = &t["current"]["actual"]["value"];
    if value.is_null() {
        // A twin whose value went away (none in edge-rt's documents).
        return Ok(None);
    }
    let Some(text) = value.as_str() else {
        bail!("{property}: value {value} is not a string, as KubeEdge's twin values are");
    };
    match text.trim().parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(Some(v)),
        _ => bail!("{property}: value {text:?} is not a number"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A document exactly as edge-rt serialises `TwinDocument` (mirror.rs:
    /// `Twins::set_actual`'s doc, in a fresh `Base`): field order and all.
    fn document(last: &str, current: &str) -> String {
        format!(
            concat!(
                r#"{{"event_id":"5f0c6a2e-8a49-4bb5-9b44-3f3c2b0e8a11","timestamp":1700000001000,"#,
                r#""twin":{{"temperature":{{"#,
                r#""last":{{"actual":{{"value":"{last}","metadata":{{"timestamp":1700000000000}}}},"optional":false,"metadata":{{"type":"float"}}}},"#,
                r#""current":{{"actual":{{"value":"{current}","metadata":{{"timestamp":1700000001000}}}},"optional":false,"metadata":{{"type":"float"}}}}"#,
                r#"}}}}}}"#
            ),
            last = last,
            current = current,
        )
    }

    #[test]
    fn the_current_actual_value_is_the_reading() {
        let d = document("21.5", "23");
        assert_eq!(reading(d.as_bytes(), "temperature").unwrap(), Some(23.0));
        // Another property's document says nothing of this one.
        assert_eq!(reading(d.as_bytes(), "humidity").unwrap(), None);
    }

    #[test]
    fn the_first_document_has_no_last() {
        // `last` is null when the twin had no value before, and the
        // twin's desired value may come along as `expected`.
        let d = r#"{"event_id":"e","timestamp":1,"twin":{"temperature":{"last":null,"current":{"expected":{"value":"30","metadata":{"timestamp":1}},"actual":{"value":"19.25","metadata":{"timestamp":1}},"optional":false,"metadata":{"type":"float"}}}}}"#;
        assert_eq!(reading(d.as_bytes(), "temperature").unwrap(), Some(19.25));
    }

    #[test]
    fn bad_values_are_refused_not_panicked_on() {
        for v in ["warm", "", "NaN", "inf"] {
            let e = reading(document("1", v).as_bytes(), "temperature").unwrap_err();
            assert!(e.to_string().contains("not a number"), "{e}");
        }
        let number = r#"{"twin":{"temperature":{"current":{"actual":{"value":23}}}}}"#;
        assert!(reading(number.as_bytes(), "temperature").is_err());
        assert!(reading(b"{", "temperature").is_err());
        assert!(reading(b"[1,2]", "temperature").is_err());
        assert!(reading(br#"{"twin":[]}"#, "temperature").is_err());
    }

    #[test]
    fn topics_name_the_device_with_or_without_its_namespace() {
        assert_eq!(
            document_topic("plant/boiler").unwrap(),
            "$hw/events/device/plant/boiler/twin/update/document"
        );
        assert_eq!(
            document_topic("boiler").unwrap(),
            "$hw/events/device/boiler/twin/update/document"
        );
        for bad in ["", "/boiler", "plant/", "plant/+", "#"] {
            assert!(document_topic(bad).is_err(), "{bad:?}");
        }
    }
}
