//! The CustomResourceDefinitions of `devices.outrigger.io`: `DeviceModel`
//! and `Device`, with structural schemas the API server validates at
//! `kubectl apply` (types, enums, ranges, one protocol, one transport, a
//! serial port for RTU) and the columns `kubectl get devices` prints.
//!
//! What needs the model as well (a desired value in range, a ReadOnly
//! property left alone, a register that fits the property's type) is
//! checked by the validating webhook with `outrigger_proto::device::check`,
//! which the edge applies too. The schemas are written by hand, field for
//! field after the types in `outrigger_proto::device`: a test applies a
//! device with every field set to a real API server and reads it back, so
//! a field the schema lacks (pruned) fails it.

use outrigger_proto::device::{GROUP, MIN_CYCLE_MS, VERSION};
use serde_json::{json, Value};

/// Both definitions, the model first.
pub fn definitions() -> Vec<Value> {
    vec![device_model(), device()]
}

fn crd(kind: &str, plural: &str, short: &str, schema: Value, columns: Value) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{GROUP}"),
                     "labels": {"app.kubernetes.io/part-of": "outrigger"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": format!("{kind}List"), "plural": plural,
                      "singular": kind.to_lowercase(), "shortNames": [short],
                      "categories": ["outrigger"]},
            "versions": [{
                "name": VERSION, "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": schema},
                "additionalPrinterColumns": columns,
            }],
        },
    })
}

fn string() -> Value {
    json!({"type": "string"})
}

fn int(min: i64, max: i64) -> Value {
    json!({"type": "integer", "minimum": min, "maximum": max})
}

fn one_of(values: &[&str]) -> Value {
    json!({"type": "string", "enum": values})
}

fn name() -> Value {
    // A property's name: what a twin topic and a status entry are keyed by.
    json!({"type": "string", "minLength": 1, "maxLength": 63,
           "pattern": "^[A-Za-z_][A-Za-z0-9_.-]*$"})
}

fn cycle() -> Value {
    int(MIN_CYCLE_MS.into(), 86_400_000)
}

fn device_model() -> Value {
    let property = json!({
        "type": "object",
        "required": ["name", "type"],
        "properties": {
            "name": name(),
            "type": one_of(&["bool", "int", "float", "string", "bytes"]),
            "access": one_of(&["ReadOnly", "ReadWrite"]),
            "unit": string(),
            "minimum": {"type": "number"},
            "maximum": {"type": "number"},
            "description": string(),
        },
        "x-kubernetes-validations": [
            {"rule": "!has(self.minimum) || !has(self.maximum) || self.minimum <= self.maximum",
             "message": "minimum must not be above maximum"},
            {"rule": "(!has(self.minimum) && !has(self.maximum)) || self.type == 'int' || self.type == 'float'",
             "message": "only int and float properties have a minimum or maximum"}
        ],
    });
    let schema = json!({
        "type": "object",
        "description": "What a kind of field device has: its properties, their types, access and ranges.",
        "required": ["spec"],
        "properties": {
            "apiVersion": string(), "kind": string(), "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["properties"],
                "properties": {
                    "description": string(),
                    "properties": {"type": "array", "maxItems": 256, "items": property,
                                   "x-kubernetes-list-type": "map",
                                   "x-kubernetes-list-map-keys": ["name"]},
                },
            },
        },
    });
    crd(
        "DeviceModel",
        "devicemodels",
        "devmodel",
        schema,
        json!([
            {"name": "Description", "type": "string", "jsonPath": ".spec.description"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ]),
    )
}

fn device() -> Value {
    let order = one_of(&["BigEndian", "LittleEndian"]);
    let register = json!({
        "type": "object",
        "description": "Where the property is on a Modbus device; value = raw * scale + offset.",
        "required": ["table", "address"],
        "properties": {
            "table": one_of(&["Coil", "DiscreteInput", "InputRegister", "HoldingRegister"]),
            "address": int(0, 65535),
            "dataType": one_of(&["bool", "int16", "uint16", "int32", "uint32", "int64", "uint64",
                                 "float32", "float64", "string", "bytes"]),
            "count": int(1, 123),
            "byteOrder": order,
            "wordOrder": order,
            "scale": {"type": "number"},
            "offset": {"type": "number"},
        },
        "x-kubernetes-validations": [
            {"rule": "!has(self.scale) || self.scale != 0.0", "message": "scale must not be 0"},
            {"rule": "!(self.table == 'Coil' || self.table == 'DiscreteInput') || !has(self.dataType) || self.dataType == 'bool' || self.dataType == 'uint16'",
             "message": "coils and discrete inputs hold one bit: dataType bool"},
            {"rule": "!has(self.dataType) || !(self.dataType == 'string' || self.dataType == 'bytes') || has(self.count)",
             "message": "string and bytes need count, the registers they span"}
        ],
    });
    let property = json!({
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": name(),
            "desired": {"type": "string", "maxLength": 1024,
                        "description": "The value wanted, as text (true/false, a number, text, base64 for bytes)."},
            "collectCycleMs": cycle(),
            "reportCycleMs": cycle(),
            "modbus": register,
        },
    });
    let serial = json!({
        "type": "object",
        "required": ["port"],
        "properties": {
            "port": {"type": "string", "pattern": "^/", "description": "The serial device, such as /dev/ttyUSB0 or /dev/ttyAMA0."},
            "baudRate": int(50, 4_000_000),
            "parity": one_of(&["None", "Even", "Odd"]),
            "dataBits": int(5, 8),
            "stopBits": int(1, 2),
        },
    });
    let modbus = json!({
        "type": "object",
        "required": ["slaveId"],
        "properties": {
            "rtu": serial,
            "tcp": {"type": "object", "required": ["host"],
                    "properties": {"host": {"type": "string", "minLength": 1}, "port": int(1, 65535)}},
            "slaveId": int(0, 255),
            "timeoutMs": int(1, 60_000),
        },
        "x-kubernetes-validations": [
            {"rule": "has(self.rtu) != has(self.tcp)", "message": "exactly one of rtu and tcp"},
            {"rule": "!has(self.rtu) || (self.slaveId >= 1 && self.slaveId <= 247)",
             "message": "an RTU slave address is 1 to 247"}
        ],
    });
    let mqtt = json!({
        "type": "object",
        "properties": {
            "deviceId": {"type": "string", "minLength": 1, "pattern": "^[^/#+]+$"},
            "qos": int(0, 2),
            "format": one_of(&["KubeEdgeTwin", "PlainValue"]),
            "topicPrefix": {"type": "string", "minLength": 1, "pattern": "^[^#+$]([^#+]*[^#+/])?$"},
        },
    });
    let property_status = json!({
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": string(), "value": string(), "time": {"type": "string", "format": "date-time"},
            "observedDesired": string(), "error": string(),
            "localDesired": {
                "type": "object",
                "required": ["value", "time"],
                "properties": {
                    "value": string(), "base": string(),
                    "time": {"type": "string", "format": "date-time"},
                },
            },
        },
    });
    let condition = json!({
        "type": "object",
        "required": ["type", "status", "lastTransitionTime", "reason", "message"],
        "properties": {
            "type": string(), "status": one_of(&["True", "False", "Unknown"]),
            "observedGeneration": {"type": "integer", "format": "int64"},
            "lastTransitionTime": {"type": "string", "format": "date-time"},
            "reason": string(), "message": string(),
        },
    });
    let counter = json!({"type": "integer", "format": "int64", "minimum": 0});
    let schema = json!({
        "type": "object",
        "description": "A field device an edge node talks to, and what it last saw of it.",
        "required": ["spec"],
        "properties": {
            "apiVersion": string(), "kind": string(), "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["model", "nodeName", "protocol"],
                "properties": {
                    "model": {"type": "string", "minLength": 1, "description": "The DeviceModel, in this namespace."},
                    "nodeName": {"type": "string", "minLength": 1},
                    "protocol": {"type": "object", "minProperties": 1, "maxProperties": 1,
                                 "description": "Exactly one of mqtt and modbus.",
                                 "properties": {"mqtt": mqtt, "modbus": modbus}},
                    "properties": {"type": "array", "maxItems": 256, "items": property,
                                   "x-kubernetes-list-type": "map",
                                   "x-kubernetes-list-map-keys": ["name"]},
                },
                "x-kubernetes-validations": [
                    {"rule": "self.nodeName == oldSelf.nodeName", "message": "nodeName cannot change (delete and create the device on the other node)"}
                ],
            },
            "status": {
                "type": "object",
                "properties": {
                    "state": one_of(&["Online", "Offline", "Unknown"]),
                    "protocol": string(), "summary": string(),
                    "lastReportTime": {"type": "string", "format": "date-time"},
                    "observedGeneration": {"type": "integer", "format": "int64"},
                    "properties": {"type": "array", "items": property_status,
                                   "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
                    "conditions": {"type": "array", "items": condition,
                                   "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
                    "counters": {"type": "object", "properties": {
                        "polls": counter, "pollErrors": counter, "timeouts": counter,
                        "writes": counter, "writeErrors": counter}},
                },
            },
        },
    });
    crd(
        "Device",
        "devices",
        "dev",
        schema,
        json!([
            {"name": "Node", "type": "string", "jsonPath": ".spec.nodeName"},
            {"name": "Protocol", "type": "string", "jsonPath": ".status.protocol"},
            {"name": "State", "type": "string", "jsonPath": ".status.state"},
            {"name": "Reported", "type": "date", "jsonPath": ".status.lastReportTime"},
            {"name": "Values", "type": "string", "jsonPath": ".status.summary"},
            {"name": "Model", "type": "string", "jsonPath": ".spec.model", "priority": 1},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
        ]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field the types serialize has a place in the schema (else the
    /// API server would prune it): walked over a device with all set.
    #[test]
    fn the_schema_knows_every_field_the_types_write() {
        use outrigger_proto::device::*;
        let d = Device {
            api_version: API_VERSION.into(),
            kind: "Device".into(),
            metadata: Default::default(),
            spec: DeviceSpec {
                model: "m".into(),
                node_name: "n".into(),
                protocol: Protocol::Modbus(Modbus {
                    transport: Transport::Rtu(SerialLine {
                        port: "/dev/ttyUSB0".into(),
                        baud_rate: 9600,
                        parity: Parity::None,
                        data_bits: 8,
                        stop_bits: 2,
                    }),
                    slave_id: 1,
                    timeout_ms: 200,
                }),
                properties: vec![DeviceProperty {
                    name: "p".into(),
                    desired: Some("1".into()),
                    collect_cycle_ms: Some(100),
                    report_cycle_ms: Some(200),
                    modbus: Some(Register {
                        table: Table::HoldingRegister,
                        address: 1,
                        data_type: DataType::String,
                        count: Some(2),
                        byte_order: Order::LittleEndian,
                        word_order: Order::LittleEndian,
                        scale: 2.0,
                        offset: 1.0,
                    }),
                }],
            },
            status: Some(DeviceStatus {
                state: Some("Online".into()),
                protocol: Some("x".into()),
                summary: Some("x".into()),
                last_report_time: Some("2026-12-02T00:00:00Z".into()),
                observed_generation: Some(1),
                properties: vec![PropertyStatus {
                    name: "p".into(),
                    value: Some("1".into()),
                    time: Some("2026-12-02T00:00:00Z".into()),
                    observed_desired: Some("1".into()),
                    error: Some("e".into()),
                    local_desired: Some(outrigger_proto::device::LocalDesired {
                        value: "2".into(),
                        base: Some("1".into()),
                        time: "2026-12-02T00:00:00Z".into(),
                    }),
                }],
                conditions: vec![],
                counters: Counters::default(),
            }),
        };
        let schema = &device()["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        walk(&serde_json::to_value(&d).unwrap(), schema, "", &mut missing);
        let mut tcp = serde_json::to_value(&d).unwrap();
        tcp["spec"]["protocol"]["modbus"]["tcp"] = json!({"host": "h", "port": 502});
        walk(&tcp, schema, "", &mut missing);
        let mqtt = serde_json::to_value(Protocol::Mqtt(Mqtt {
            device_id: Some("d".into()),
            qos: 1,
            format: PayloadFormat::PlainValue,
            topic_prefix: Some("plant/boiler".into()),
        }))
        .unwrap();
        walk(
            &mqtt,
            &schema["properties"]["spec"]["properties"]["protocol"],
            ".spec.protocol",
            &mut missing,
        );
        let model = serde_json::to_value(DeviceModelSpec {
            description: Some("d".into()),
            properties: vec![ModelProperty {
                name: "p".into(),
                type_: PropertyType::Float,
                access: Access::ReadWrite,
                unit: Some("V".into()),
                minimum: Some(0.0),
                maximum: Some(1.0),
                description: Some("d".into()),
            }],
        })
        .unwrap();
        walk(
            &model,
            &device_model()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
                ["spec"],
            ".spec",
            &mut missing,
        );
        assert!(missing.is_empty(), "not in the schema: {missing:?}");
    }

    fn walk(v: &Value, schema: &Value, at: &str, missing: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if schema["type"] == "object" && schema.get("properties").is_none() {
                    return; // metadata: the API server's own
                }
                for (k, v) in m {
                    match schema["properties"].get(k) {
                        Some(s) => walk(v, s, &format!("{at}.{k}"), missing),
                        None => missing.push(format!("{at}.{k}")),
                    }
                }
            }
            Value::Array(a) => a
                .iter()
                .for_each(|v| walk(v, &schema["items"], &format!("{at}[]"), missing)),
            _ => {}
        }
    }
}
