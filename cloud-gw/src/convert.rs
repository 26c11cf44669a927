//! `cloud-gw convert-kubeedge`: KubeEdge `devices.kubeedge.io/v1beta1`
//! DeviceModels and Devices into ours (`devices.outrigger.io/v1alpha1`).
//!
//! KubeEdge leaves the protocol to its mappers as free-form `configData`;
//! this reads the keys its Modbus mapper uses (`communicateMode`, `ip`,
//! `port`, `slaveID`, `serialName`/`serialPort`, `baudRate`, `dataBits`,
//! `parity`, `stopBits`, `timeout`; per property `register`, `offset`,
//! `limit`, `scale`, `isSwap`, `isRegisterSwap`, `dataType`) and turns them
//! into the typed section. What has no place here (`pushMethod`, `methods`,
//! `reportToCloud`, other protocols) is named in the warnings, never
//! dropped silently.

use serde_json::{json, Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("document {doc}: {message}")]
    Doc { doc: usize, message: String },
    #[error("{0}")]
    Yaml(#[from] serde_yaml_ng::Error),
}

/// What came out: the converted objects and what was left behind.
#[derive(Debug, Default)]
pub struct Converted {
    pub objects: Vec<Value>,
    pub warnings: Vec<String>,
}

/// Convert a YAML stream. Documents of other kinds pass through as they are.
pub fn convert(yaml: &str) -> Result<Converted, ConvertError> {
    use serde::Deserialize;
    let mut out = Converted::default();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(yaml).enumerate() {
        let v = Value::deserialize(doc)?;
        if v.is_null() {
            continue;
        }
        let err = |message: String| ConvertError::Doc {
            doc: i + 1,
            message,
        };
        let api = v["apiVersion"].as_str().unwrap_or("");
        let o = match (api, v["kind"].as_str().unwrap_or("")) {
            ("devices.kubeedge.io/v1beta1", "DeviceModel") => model(&v).map_err(err)?,
            ("devices.kubeedge.io/v1beta1", "Device") => {
                device(&v, &mut out.warnings).map_err(err)?
            }
            _ => v,
        };
        out.objects.push(o);
    }
    Ok(out)
}

fn meta(v: &Value) -> Value {
    let m = &v["metadata"];
    let mut out = Map::new();
    for k in ["name", "namespace", "labels", "annotations"] {
        if !m[k].is_null() {
            out.insert(k.into(), m[k].clone());
        }
    }
    Value::Object(out)
}

/// A number that KubeEdge may write as text.
fn number(v: &Value) -> Option<f64> {
    v.as_f64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
}

fn model(v: &Value) -> Result<Value, String> {
    let mut props = Vec::new();
    for (i, p) in v["spec"]["properties"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let ty = match p["type"].as_str().unwrap_or("").to_ascii_uppercase().as_str() {
            "INT" => "int",
            "FLOAT" | "DOUBLE" => "float",
            "STRING" => "string",
            "BOOLEAN" => "bool",
            "BYTES" => "bytes",
            other => return Err(format!("spec.properties[{i}].type: {other:?} has no equivalent (int, float, double, string, boolean, bytes)")),
        };
        let mut o = json!({"name": p["name"], "type": ty});
        if p["accessMode"] == "ReadWrite" {
            o["access"] = "ReadWrite".into();
        }
        for (from, to) in [("minimum", "minimum"), ("maximum", "maximum")] {
            if let Some(n) = number(&p[from]).filter(|_| ty == "int" || ty == "float") {
                o[to] = json!(n);
            }
        }
        for k in ["unit", "description"] {
            if p[k].as_str().is_some_and(|s| !s.is_empty()) {
                o[k] = p[k].clone();
            }
        }
        props.push(o);
    }
    Ok(json!({
        "apiVersion": outrigger_proto::device::API_VERSION,
        "kind": "DeviceModel",
        "metadata": meta(v),
        "spec": {"properties": props},
    }))
}

fn protocol(
    cfg: &Value,
    name: &str,
    warnings: &mut Vec<String>,
    at: &str,
) -> Result<Value, String> {
    match name.to_ascii_lowercase().as_str() {
        "mqtt" => Ok(json!({"mqtt": {}})),
        "modbus" => {
            let mode = cfg["communicateMode"]
                .as_str()
                .unwrap_or("")
                .to_ascii_uppercase();
            let serial = cfg["serialName"]
                .as_str()
                .or_else(|| cfg["serialPort"].as_str());
            let slave = number(&cfg["slaveID"]).unwrap_or(1.0) as u64;
            let mut m = if mode == "RTU" || (mode.is_empty() && serial.is_some()) {
                let port = serial.ok_or("modbus RTU without serialName")?;
                let mut rtu = json!({"port": port});
                if let Some(b) = number(&cfg["baudRate"]) {
                    rtu["baudRate"] = json!(b as u64);
                }
                if let Some(b) = number(&cfg["dataBits"]) {
                    rtu["dataBits"] = json!(b as u64);
                }
                if let Some(b) = number(&cfg["stopBits"]) {
                    rtu["stopBits"] = json!(b as u64);
                }
                if let Some(p) = cfg["parity"].as_str() {
                    rtu["parity"] = match p.to_ascii_lowercase().as_str() {
                        "e" | "even" => "Even",
                        "o" | "odd" => "Odd",
                        "n" | "none" => "None",
                        other => return Err(format!("parity {other:?}")),
                    }
                    .into();
                }
                json!({"rtu": rtu, "slaveId": slave})
            } else {
                let host = cfg["ip"].as_str().ok_or("modbus TCP without ip")?;
                let port = number(&cfg["port"]).unwrap_or(502.0) as u64;
                json!({"tcp": {"host": host, "port": port}, "slaveId": slave})
            };
            if let Some(t) = number(&cfg["timeout"]) {
                m["timeoutMs"] = json!(t as u64);
            }
            Ok(json!({"modbus": m}))
        }
        other => {
            warnings.push(format!(
                "{at}: protocol {other:?} has no Outrigger driver (modbus, mqtt)"
            ));
            Err(format!("protocol {other:?} is not supported"))
        }
    }
}

fn register(cfg: &Value, ty: &str) -> Result<Value, String> {
    let table = match cfg["register"].as_str().unwrap_or("") {
        "CoilRegister" => "Coil",
        "DiscreteInputRegister" => "DiscreteInput",
        "HoldingRegister" => "HoldingRegister",
        "InputRegister" => "InputRegister",
        other => return Err(format!("register {other:?}")),
    };
    let address = number(&cfg["offset"]).unwrap_or(0.0) as u64;
    let limit = number(&cfg["limit"]).unwrap_or(1.0) as u64;
    let mut r = json!({"table": table, "address": address});
    if table == "Coil" || table == "DiscreteInput" {
        return Ok(r);
    }
    // KubeEdge's mapper reads `limit` registers and decodes them by the
    // property's type; the same registers, typed.
    let dt = match (cfg["dataType"].as_str().unwrap_or(ty), limit) {
        ("float" | "double", 4) => "float64",
        ("float" | "double", _) => "float32",
        ("int", 2) => "int32",
        ("int", 4) => "int64",
        ("int" | "boolean" | "bool", _) => "int16",
        ("string", _) => "string",
        ("bytes", _) => "bytes",
        (other, _) => return Err(format!("dataType {other:?}")),
    };
    r["dataType"] = dt.into();
    if dt == "string" || dt == "bytes" {
        r["count"] = json!(limit);
    }
    if let Some(s) = number(&cfg["scale"]).filter(|s| *s != 1.0 && *s != 0.0) {
        r["scale"] = json!(s);
    }
    if cfg["isSwap"] == true {
        r["byteOrder"] = "LittleEndian".into();
    }
    if cfg["isRegisterSwap"] == true {
        r["wordOrder"] = "LittleEndian".into();
    }
    Ok(r)
}

fn device(v: &Value, warnings: &mut Vec<String>) -> Result<Value, String> {
    let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
    let spec = &v["spec"];
    let model = spec["deviceModelRef"]["name"]
        .as_str()
        .ok_or("spec.deviceModelRef.name is required")?;
    let pname = spec["protocol"]["protocolName"].as_str().unwrap_or("");
    let proto = protocol(&spec["protocol"]["configData"], pname, warnings, &name)?;
    for k in ["methods"] {
        if !spec[k].is_null() {
            warnings.push(format!("{name}: spec.{k} is not carried (no equivalent)"));
        }
    }
    let mut props = Vec::new();
    for (i, p) in spec["properties"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("spec.properties[{i}]");
        let mut o = json!({"name": p["name"]});
        if let Some(d) = p["desired"]["value"].as_str().filter(|s| !s.is_empty()) {
            o["desired"] = d.into();
        }
        for (from, to) in [
            ("collectCycle", "collectCycleMs"),
            ("reportCycle", "reportCycleMs"),
        ] {
            if let Some(n) = number(&p[from]).filter(|n| *n > 0.0) {
                o[to] = json!(n as u64);
            }
        }
        for k in ["pushMethod", "reportToCloud"] {
            if !p[k].is_null() {
                warnings.push(format!(
                    "{name}: {at}.{k} is not carried (every device reports to its status)"
                ));
            }
        }
        if proto.get("modbus").is_some() {
            let cfg = &p["visitors"]["configData"];
            let ty = cfg["dataType"].as_str().unwrap_or("int");
            o["modbus"] =
                register(cfg, ty).map_err(|e| format!("{at}.visitors.configData: {e}"))?;
        }
        props.push(o);
    }
    Ok(json!({
        "apiVersion": outrigger_proto::device::API_VERSION,
        "kind": "Device",
        "metadata": meta(v),
        "spec": {"model": model, "nodeName": spec["nodeName"], "protocol": proto, "properties": props},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KubeEdge's own v1beta1 samples (docs/proposals/sig-device-iot and
    /// kubeedge/examples' temperature demo), converted and then read as our
    /// types and checked with the edge's check.
    #[test]
    fn kubeedge_samples_convert_and_pass_the_check() {
        let yaml = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: temperature-model, namespace: default}
spec:
  properties:
  - {name: temperature, description: the temperature, type: FLOAT, accessMode: ReadWrite, maximum: "100.0", minimum: "0", unit: Celsius}
  - {name: temperature-switch, type: INT, accessMode: ReadWrite}
  protocol: modbus
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: temperature-instance, namespace: default}
spec:
  deviceModelRef: {name: temperature-model}
  nodeName: edge-node
  protocol:
    protocolName: modbus
    configData: {communicateMode: TCP, port: "5502", slaveID: 1, ip: 10.244.1.13}
  properties:
  - name: temperature
    collectCycle: 10000
    reportCycle: 10000
    reportToCloud: true
    visitors:
      protocolName: modbus
      configData: {dataType: float, register: HoldingRegister, offset: 0, limit: 1, scale: 0.1, isSwap: false, isRegisterSwap: false}
  - name: temperature-switch
    desired: {value: "1"}
    visitors:
      protocolName: modbus
      configData: {dataType: int, register: CoilRegister, offset: 0, limit: 1, scale: 1}
  methods: [{name: SwitchControl, propertyNames: [temperature-switch]}]
"#;
        let c = convert(yaml).unwrap();
        assert_eq!(c.objects.len(), 2);
        let model: outrigger_proto::device::DeviceModel =
            serde_json::from_value(c.objects[0].clone()).unwrap();
        let dev: outrigger_proto::device::Device =
            serde_json::from_value(c.objects[1].clone()).unwrap();
        let m = &c.objects[0]["spec"]["properties"][0];
        assert_eq!(
            (m["type"].as_str(), m["maximum"].as_f64()),
            (Some("float"), Some(100.0))
        );
        let p = &c.objects[1]["spec"];
        assert_eq!(
            p["protocol"]["modbus"]["tcp"],
            json!({"host": "10.244.1.13", "port": 5502})
        );
        assert_eq!(p["properties"][0]["modbus"]["dataType"], "float32");
        assert_eq!(p["properties"][0]["modbus"]["scale"], 0.1);
        assert_eq!(p["properties"][0]["collectCycleMs"], 10000);
        assert_eq!(
            p["properties"][1]["modbus"],
            json!({"table": "Coil", "address": 0})
        );
        assert!(
            c.warnings.iter().any(|w| w.contains("reportToCloud")),
            "{:?}",
            c.warnings
        );
        assert!(
            c.warnings.iter().any(|w| w.contains("methods")),
            "{:?}",
            c.warnings
        );
        // The int switch on a coil: ours wants a bool there, and says so.
        let problems = outrigger_proto::device::check(&dev.spec, &model.spec);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].message.contains("holds a bool"), "{problems:?}");
    }

    #[test]
    fn rtu_settings_and_unknown_protocols() {
        let yaml = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: d}
spec:
  deviceModelRef: {name: m}
  nodeName: n
  protocol:
    protocolName: modbus
    configData: {communicateMode: RTU, serialName: /dev/ttyS0, baudRate: 9600, dataBits: 8, parity: even, stopBits: 1, slaveID: 3, timeout: 500}
"#;
        let c = convert(yaml).unwrap();
        assert_eq!(
            c.objects[0]["spec"]["protocol"],
            json!({"modbus": {"rtu": {"port": "/dev/ttyS0", "baudRate": 9600, "dataBits": 8, "parity": "Even", "stopBits": 1}, "slaveId": 3, "timeoutMs": 500}})
        );
        let opcua = yaml.replace("protocolName: modbus", "protocolName: opcua");
        assert!(convert(&opcua).is_err());
        // Other kinds pass through.
        let other = convert("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").unwrap();
        assert_eq!(other.objects[0]["kind"], "ConfigMap");
    }
}
