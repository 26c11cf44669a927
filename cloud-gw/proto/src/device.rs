//! Device twins: the `DeviceModel` and `Device` resources
//! (`devices.outrigger.io/v1alpha1`), typed once for cloud-gw (the CRDs, the
//! admission check, the status write-back) and edge-rt (the store, the
//! device manager, the local CLI).
//!
//! A model says what a kind of device has (properties with a type, an
//! access mode, a unit and a range); a device names its model and node and
//! says how to reach it, with a typed protocol section: `mqtt` (KubeEdge's
//! twin topics) or `modbus` (RTU on a serial line, or TCP) with a register
//! map per property. Values are text (`"21.5"`, `"true"`, base64 for
//! bytes), as KubeEdge's twins carry them; [`Value::parse`] reads one as
//! its property's type.
//!
//! [`check`] is the one validation of a device against its model: the
//! cloud's admission webhook refuses what it finds, and the edge refuses
//! to poll or write what it finds (a device applied with the webhook off,
//! or a value set at the gateway).

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "devices.outrigger.io";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "devices.outrigger.io/v1alpha1";

/// A collect or report cycle when the device leaves it out.
pub const DEFAULT_CYCLE_MS: u32 = 1000;
/// The shortest cycle a device may ask for.
pub const MIN_CYCLE_MS: u32 = 50;
/// A Modbus request's answer timeout when the device leaves it out.
pub const DEFAULT_TIMEOUT_MS: u32 = 1000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModel {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "model_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: DeviceModelSpec,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceModelSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub properties: Vec<ModelProperty>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelProperty {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: PropertyType,
    #[serde(default)]
    pub access: Access,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Bounds of a number (inclusive); what is outside is never written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minimum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PropertyType {
    Bool,
    Int,
    Float,
    String,
    Bytes,
}

impl PropertyType {
    pub const ALL: [PropertyType; 5] = [
        PropertyType::Bool,
        PropertyType::Int,
        PropertyType::Float,
        PropertyType::String,
        PropertyType::Bytes,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            PropertyType::Bool => "bool",
            PropertyType::Int => "int",
            PropertyType::Float => "float",
            PropertyType::String => "string",
            PropertyType::Bytes => "bytes",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Access {
    #[default]
    ReadOnly,
    ReadWrite,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    #[serde(default = "api_version")]
    pub api_version: String,
    #[serde(default = "device_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: DeviceSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<DeviceStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceSpec {
    /// The DeviceModel, in the device's namespace.
    pub model: String,
    /// The edge node that talks to the device.
    pub node_name: String,
    pub protocol: Protocol,
    #[serde(default)]
    pub properties: Vec<DeviceProperty>,
}

/// How the node reaches the device: exactly one of these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Protocol {
    Mqtt(Mqtt),
    Modbus(Modbus),
}

impl Protocol {
    /// A short description, for listings: `modbus-rtu /dev/ttyUSB0 #3`.
    pub fn summary(&self) -> String {
        match self {
            Protocol::Mqtt(_) => "mqtt".into(),
            Protocol::Modbus(m) => match &m.transport {
                Transport::Rtu(l) => format!("modbus-rtu {} #{}", l.port, m.slave_id),
                Transport::Tcp(t) => format!("modbus-tcp {}:{} #{}", t.host, t.port, m.slave_id),
            },
        }
    }
}

/// A device that speaks MQTT itself, on KubeEdge's device-twin topics
/// (`$hw/events/device/<id>/twin/...`), so its firmware needs no change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mqtt {
    /// The device id in its topics; the device's name when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(default = "one")]
    pub qos: u8,
    #[serde(default)]
    pub format: PayloadFormat,
    /// PlainValue's topics: `<topicPrefix>/<property>` (default
    /// `devices/<namespace>/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_prefix: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayloadFormat {
    /// KubeEdge's twin messages (`{"event_id", "timestamp", "twin": {...}}`).
    #[default]
    KubeEdgeTwin,
    /// One plain value per property on `<prefix>/<property>`; desired values
    /// on `<prefix>/<property>/set` (what many small firmwares speak).
    PlainValue,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Modbus {
    #[serde(flatten)]
    pub transport: Transport,
    /// The slave address on an RTU line (1..247), or the unit id over TCP.
    pub slave_id: u8,
    #[serde(default = "default_timeout")]
    pub timeout_ms: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Transport {
    Rtu(SerialLine),
    Tcp(TcpTarget),
}

/// An RS-485 or RS-232 line. The defaults are the Modbus standard's
/// (19200 baud, even parity, 8 data bits, 1 stop bit). Devices on the same
/// port share the line and must agree on its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SerialLine {
    pub port: String,
    #[serde(default = "default_baud")]
    pub baud_rate: u32,
    #[serde(default)]
    pub parity: Parity,
    #[serde(default = "eight")]
    pub data_bits: u8,
    #[serde(default = "one")]
    pub stop_bits: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Parity {
    None,
    #[default]
    Even,
    Odd,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TcpTarget {
    pub host: String,
    #[serde(default = "default_modbus_port")]
    pub port: u16,
}

/// One of the model's properties on this device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProperty {
    pub name: String,
    /// The value the user wants (ReadWrite properties only), as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<String>,
    /// How often the node reads the property.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_cycle_ms: Option<u32>,
    /// How often, at most, a changed value is reported to the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_cycle_ms: Option<u32>,
    /// Where the property is on a Modbus device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modbus: Option<Register>,
}

impl DeviceProperty {
    pub fn collect_cycle(&self) -> std::time::Duration {
        cycle(self.collect_cycle_ms)
    }

    pub fn report_cycle(&self) -> std::time::Duration {
        cycle(self.report_cycle_ms)
    }
}

fn cycle(ms: Option<u32>) -> std::time::Duration {
    std::time::Duration::from_millis(ms.unwrap_or(DEFAULT_CYCLE_MS).max(MIN_CYCLE_MS).into())
}

/// A property's place in a Modbus device: the table, the first address,
/// how the registers make a value, and `value = raw * scale + offset`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Register {
    pub table: Table,
    pub address: u16,
    #[serde(default)]
    pub data_type: DataType,
    /// Registers a string or bytes value spans (two bytes each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u16>,
    /// Byte order in a register: the standard's is big-endian.
    #[serde(default)]
    pub byte_order: Order,
    /// Register order in a value of more than one: big-endian is the high
    /// word first.
    #[serde(default)]
    pub word_order: Order,
    #[serde(default = "one_f")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Table {
    Coil,
    DiscreteInput,
    InputRegister,
    HoldingRegister,
}

impl Table {
    /// Whether a master may write it (coils and holding registers).
    pub const fn writable(self) -> bool {
        matches!(self, Table::Coil | Table::HoldingRegister)
    }

    /// Bits, not registers.
    pub const fn bits(self) -> bool {
        matches!(self, Table::Coil | Table::DiscreteInput)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// One bit of a coil or discrete input, or a register that is not zero.
    Bool,
    Int16,
    #[default]
    Uint16,
    Int32,
    Uint32,
    Int64,
    Uint64,
    Float32,
    Float64,
    /// `count` registers of text, NULs at the end dropped.
    String,
    /// `count` registers as they are.
    Bytes,
}

impl DataType {
    /// The registers a value spans (for string and bytes, `count`).
    pub fn registers(self, count: Option<u16>) -> u16 {
        match self {
            DataType::Bool | DataType::Int16 | DataType::Uint16 => 1,
            DataType::Int32 | DataType::Uint32 | DataType::Float32 => 2,
            DataType::Int64 | DataType::Uint64 | DataType::Float64 => 4,
            DataType::String | DataType::Bytes => count.unwrap_or(1),
        }
    }

    pub const fn numeric(self) -> bool {
        !matches!(self, DataType::Bool | DataType::String | DataType::Bytes)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Order {
    #[default]
    BigEndian,
    LittleEndian,
}

/// What the node last saw of a device, written to the status subresource.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// `Online`, `Offline` (the last poll failed) or `Unknown` (none yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// How it is reached, in short (for `kubectl get devices`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// A few values, `name=value unit`, for `kubectl get devices`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// RFC 3339: when the node made this report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_time: Option<String>,
    /// The spec generation the node has applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub properties: Vec<PropertyStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default)]
    pub counters: Counters,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PropertyStatus {
    pub name: String,
    /// The value last read from the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// RFC 3339: when it was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The desired value the device has taken (written and acknowledged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_desired: Option<String>,
    /// Why the last read or write of this property failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// A desired value set at the node (`edge-rt device set`) that the
    /// spec does not have yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_desired: Option<LocalDesired>,
}

/// A desired value an operator set at the gateway, over the spec's.
///
/// It holds while the spec's desired value is still `base` (the one the
/// operator set it over): the node writes it, reports it, and cloud-gw
/// writes it into the spec (only if the spec still has `base`). A spec
/// changed in the cluster since then wins: the node drops the local value
/// and writes the cluster's. Either way both sides end on one value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalDesired {
    pub value: String,
    /// The spec's desired value when it was set (none: the spec had none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// RFC 3339: when it was set.
    pub time: String,
}

impl LocalDesired {
    /// Whether it still holds over the spec's desired value `spec`: the
    /// spec has not changed since it was set, and does not have it yet.
    pub fn holds_over(&self, spec: Option<&str>) -> bool {
        self.base.as_deref() == spec && spec != Some(self.value.as_str())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Counters {
    #[serde(default)]
    pub polls: u64,
    #[serde(default)]
    pub poll_errors: u64,
    #[serde(default)]
    pub timeouts: u64,
    #[serde(default)]
    pub writes: u64,
    #[serde(default)]
    pub write_errors: u64,
}

/// The condition saying whether the node can talk to the device.
pub const REACHABLE: &str = "Reachable";

/// A property's value, as its model's type says.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValueError {
    #[error("{text:?} is not a {ty} (bool: true or false; int: a whole number; float: a number; bytes: base64)")]
    Type { text: String, ty: &'static str },
    #[error("{value} is below the minimum {min}")]
    BelowMinimum { value: f64, min: f64 },
    #[error("{value} is above the maximum {max}")]
    AboveMaximum { value: f64, max: f64 },
}

impl Value {
    /// Text as a value of type `ty`.
    pub fn parse(ty: PropertyType, text: &str) -> Result<Value, ValueError> {
        let bad = || ValueError::Type {
            text: text.to_string(),
            ty: ty.as_str(),
        };
        let t = text.trim();
        Ok(match ty {
            PropertyType::Bool => match t {
                "true" | "True" | "TRUE" | "1" | "on" | "ON" => Value::Bool(true),
                "false" | "False" | "FALSE" | "0" | "off" | "OFF" => Value::Bool(false),
                _ => return Err(bad()),
            },
            PropertyType::Int => Value::Int(t.parse().map_err(|_| bad())?),
            PropertyType::Float => {
                let f: f64 = t.parse().map_err(|_| bad())?;
                if !f.is_finite() {
                    return Err(bad());
                }
                Value::Float(f)
            }
            PropertyType::String => Value::String(text.to_string()),
            PropertyType::Bytes => {
                use base64::Engine;
                Value::Bytes(
                    base64::engine::general_purpose::STANDARD
                        .decode(t)
                        .map_err(|_| bad())?,
                )
            }
        })
    }

    /// The value as a number, if it is one (bools as 0 and 1).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Bool(b) => Some(f64::from(u8::from(*b))),
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            Value::String(_) | Value::Bytes(_) => None,
        }
    }

    /// Within the property's bounds (numbers only; others always are).
    pub fn check_range(&self, p: &ModelProperty) -> Result<(), ValueError> {
        let Some(v) = self.as_f64() else {
            return Ok(());
        };
        if let Some(min) = p.minimum.filter(|m| v < *m) {
            return Err(ValueError::BelowMinimum { value: v, min });
        }
        if let Some(max) = p.maximum.filter(|m| v > *m) {
            return Err(ValueError::AboveMaximum { value: v, max });
        }
        Ok(())
    }
}

/// The canonical text: what goes into status and the twin topics.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::String(s) => f.write_str(s),
            Value::Bytes(b) => {
                use base64::Engine;
                f.write_str(&base64::engine::general_purpose::STANDARD.encode(b))
            }
        }
    }
}

/// One thing wrong with a device, at a field path as kubectl shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl DeviceModelSpec {
    pub fn property(&self, name: &str) -> Option<&ModelProperty> {
        self.properties.iter().find(|p| p.name == name)
    }

    /// What is wrong with the model on its own.
    pub fn check(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        for (i, p) in self.properties.iter().enumerate() {
            let at = |f: &str| format!("spec.properties[{i}].{f}");
            if self.properties[..i].iter().any(|q| q.name == p.name) {
                out.push(problem(at("name"), format!("{:?} is listed twice", p.name)));
            }
            if let (Some(lo), Some(hi)) = (p.minimum, p.maximum) {
                if lo > hi {
                    out.push(problem(
                        at("minimum"),
                        format!("{lo} is above the maximum {hi}"),
                    ));
                }
            }
            if (p.minimum.is_some() || p.maximum.is_some())
                && !matches!(p.type_, PropertyType::Int | PropertyType::Float)
            {
                out.push(problem(
                    at("type"),
                    format!("a {} property has no minimum or maximum", p.type_.as_str()),
                ));
            }
        }
        out
    }
}

/// Everything wrong with `device` given its `model`: the one check the
/// cloud admits by and the edge polls and writes by.
pub fn check(device: &DeviceSpec, model: &DeviceModelSpec) -> Vec<Problem> {
    let mut out = model
        .check()
        .into_iter()
        .map(|p| problem(format!("model {}: {}", device.model, p.field), p.message))
        .collect::<Vec<_>>();
    match &device.protocol {
        Protocol::Modbus(m) => check_modbus(m, &mut out),
        Protocol::Mqtt(m) => {
            if m.qos > 2 {
                out.push(problem("spec.protocol.mqtt.qos", "must be 0, 1 or 2"));
            }
            if let Some(p) = &m.topic_prefix {
                if p.is_empty() || p.starts_with('$') || p.ends_with('/') || p.contains(['#', '+'])
                {
                    out.push(problem(
                        "spec.protocol.mqtt.topicPrefix",
                        format!("{p:?} is not a topic prefix (no wildcards, no leading $, no trailing /)"),
                    ));
                }
            }
        }
    }
    for (i, p) in device.properties.iter().enumerate() {
        let at = |f: &str| format!("spec.properties[{i}].{f}");
        if device.properties[..i].iter().any(|q| q.name == p.name) {
            out.push(problem(at("name"), format!("{:?} is listed twice", p.name)));
        }
        let Some(mp) = model.property(&p.name) else {
            out.push(problem(
                at("name"),
                format!("model {} has no property {:?}", device.model, p.name),
            ));
            continue;
        };
        for (f, ms) in [
            ("collectCycleMs", p.collect_cycle_ms),
            ("reportCycleMs", p.report_cycle_ms),
        ] {
            if let Some(ms) = ms.filter(|ms| *ms < MIN_CYCLE_MS) {
                out.push(problem(
                    at(f),
                    format!("{ms} ms is shorter than the shortest cycle, {MIN_CYCLE_MS} ms"),
                ));
            }
        }
        if let Some(d) = &p.desired {
            if let Err(e) = check_desired(model, &device.model, &p.name, d) {
                out.push(problem(at("desired"), e));
            }
        }
        match (&device.protocol, &p.modbus) {
            (Protocol::Modbus(_), None) => out.push(problem(
                at("modbus"),
                "a property of a Modbus device needs its register",
            )),
            (Protocol::Modbus(_), Some(r)) => check_register(r, mp, &at("modbus"), &mut out),
            (Protocol::Mqtt(_), Some(_)) => out.push(problem(
                at("modbus"),
                "a register is only for a Modbus device",
            )),
            (Protocol::Mqtt(_), None) => {}
        }
    }
    out
}

/// Whether `text` may be property `name`'s desired value under the model
/// (named `model_name`): the model has the property, it is ReadWrite, the
/// text is of its type and in its range.
pub fn check_desired(
    model: &DeviceModelSpec,
    model_name: &str,
    name: &str,
    text: &str,
) -> Result<Value, String> {
    let mp = model
        .property(name)
        .ok_or_else(|| format!("model {model_name} has no property {name:?}"))?;
    check_writable(mp, name, text).map_err(|e| format!("{e} (model {model_name})"))
}

/// The value `text` for property `name` of model property `mp`, or why it
/// must not be written (ReadOnly, not of its type, out of its range): the
/// one rule drivers and the webhook share.
pub fn check_writable(mp: &ModelProperty, name: &str, text: &str) -> Result<Value, String> {
    if mp.access != Access::ReadWrite {
        return Err(format!("{name:?} is ReadOnly"));
    }
    let v = Value::parse(mp.type_, text).map_err(|e| e.to_string())?;
    v.check_range(mp).map_err(|e| e.to_string())?;
    Ok(v)
}

fn check_modbus(m: &Modbus, out: &mut Vec<Problem>) {
    let at = "spec.protocol.modbus";
    match &m.transport {
        Transport::Rtu(l) => {
            if !(1..=247).contains(&m.slave_id) {
                out.push(problem(
                    format!("{at}.slaveId"),
                    format!("{} is not a slave address (1..247)", m.slave_id),
                ));
            }
            if !l.port.starts_with('/') {
                out.push(problem(
                    format!("{at}.rtu.port"),
                    format!("{:?} is not a device path such as /dev/ttyUSB0", l.port),
                ));
            }
            if !(5..=8).contains(&l.data_bits) {
                out.push(problem(format!("{at}.rtu.dataBits"), "must be 5 to 8"));
            }
            if !(1..=2).contains(&l.stop_bits) {
                out.push(problem(format!("{at}.rtu.stopBits"), "must be 1 or 2"));
            }
            if l.baud_rate == 0 {
                out.push(problem(format!("{at}.rtu.baudRate"), "must not be 0"));
            }
        }
        Transport::Tcp(t) => {
            if t.host.is_empty() {
                out.push(problem(format!("{at}.tcp.host"), "must not be empty"));
            }
        }
    }
    if m.timeout_ms == 0 {
        out.push(problem(format!("{at}.timeoutMs"), "must not be 0"));
    }
}

fn check_register(r: &Register, mp: &ModelProperty, at: &str, out: &mut Vec<Problem>) {
    let ty = mp.type_;
    if mp.access == Access::ReadWrite && !r.table.writable() {
        out.push(problem(
            format!("{at}.table"),
            format!(
                "{:?} is ReadWrite but a {:?} cannot be written",
                mp.name, r.table
            ),
        ));
    }
    if r.table.bits() {
        if ty != PropertyType::Bool {
            out.push(problem(
                format!("{at}.table"),
                format!("a {:?} holds a bool, not a {}", r.table, ty.as_str()),
            ));
        }
        if !matches!(r.data_type, DataType::Bool | DataType::Uint16) {
            out.push(problem(
                format!("{at}.dataType"),
                format!("a {:?} holds one bit", r.table),
            ));
        }
        return;
    }
    let fits = match ty {
        PropertyType::Bool => r.data_type == DataType::Bool || r.data_type.numeric(),
        PropertyType::Int | PropertyType::Float => r.data_type.numeric(),
        PropertyType::String => r.data_type == DataType::String,
        PropertyType::Bytes => r.data_type == DataType::Bytes,
    };
    if !fits {
        out.push(problem(
            format!("{at}.dataType"),
            format!("{:?} cannot hold a {} property", r.data_type, ty.as_str()),
        ));
    }
    if matches!(r.data_type, DataType::String | DataType::Bytes) {
        if !r.count.is_some_and(|c| (1..=123).contains(&c)) {
            out.push(problem(
                format!("{at}.count"),
                "string and bytes need the registers they span (1..123)",
            ));
        }
    } else if r.count.is_some_and(|c| c != r.data_type.registers(None)) {
        out.push(problem(
            format!("{at}.count"),
            format!(
                "a {:?} spans {} registers",
                r.data_type,
                r.data_type.registers(None)
            ),
        ));
    }
    if u32::from(r.address) + u32::from(r.data_type.registers(r.count)) > 0x1_0000 {
        out.push(problem(
            format!("{at}.address"),
            "the value runs past the last register (65535)",
        ));
    }
    if r.scale == 0.0 || !r.scale.is_finite() || !r.offset.is_finite() {
        out.push(problem(
            format!("{at}.scale"),
            "scale must be a number other than 0, offset a number",
        ));
    }
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        message: message.into(),
    }
}

fn api_version() -> String {
    API_VERSION.into()
}
fn model_kind() -> String {
    "DeviceModel".into()
}
fn device_kind() -> String {
    "Device".into()
}
fn one() -> u8 {
    1
}
fn eight() -> u8 {
    8
}
fn one_f() -> f64 {
    1.0
}
fn default_baud() -> u32 {
    19200
}
fn default_timeout() -> u32 {
    DEFAULT_TIMEOUT_MS
}
fn default_modbus_port() -> u16 {
    502
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> DeviceModelSpec {
        serde_json::from_value(serde_json::json!({
            "properties": [
                {"name": "temperature", "type": "float", "unit": "°C", "minimum": -40, "maximum": 125},
                {"name": "setpoint", "type": "float", "access": "ReadWrite", "minimum": 5, "maximum": 30},
                {"name": "relay", "type": "bool", "access": "ReadWrite"},
                {"name": "label", "type": "string"}
            ]
        }))
        .unwrap()
    }

    fn device(v: serde_json::Value) -> DeviceSpec {
        serde_json::from_value(v).unwrap()
    }

    fn modbus() -> serde_json::Value {
        serde_json::json!({
            "model": "thermostat", "nodeName": "gw-1",
            "protocol": {"modbus": {"rtu": {"port": "/dev/ttyUSB0"}, "slaveId": 3}},
            "properties": [
                {"name": "temperature", "modbus": {"table": "InputRegister", "address": 0, "dataType": "int16", "scale": 0.1}},
                {"name": "setpoint", "desired": "21.5", "modbus": {"table": "HoldingRegister", "address": 10, "dataType": "float32", "wordOrder": "LittleEndian"}},
                {"name": "relay", "desired": "true", "modbus": {"table": "Coil", "address": 0}},
                {"name": "label", "modbus": {"table": "HoldingRegister", "address": 100, "dataType": "string", "count": 8}}
            ]
        })
    }

    #[test]
    fn a_good_device_passes_and_reads_with_the_standards_defaults() {
        let d = device(modbus());
        assert_eq!(check(&d, &model()), vec![]);
        let Protocol::Modbus(m) = &d.protocol else {
            panic!()
        };
        let Transport::Rtu(l) = &m.transport else {
            panic!()
        };
        assert_eq!(
            (l.baud_rate, l.parity, l.data_bits, l.stop_bits),
            (19200, Parity::Even, 8, 1)
        );
        assert_eq!(m.timeout_ms, DEFAULT_TIMEOUT_MS);
        assert_eq!(d.protocol.summary(), "modbus-rtu /dev/ttyUSB0 #3");
        assert_eq!(
            d.properties[0].collect_cycle(),
            std::time::Duration::from_secs(1)
        );
        // It serializes back to the same shape.
        assert_eq!(
            serde_json::to_value(&d).unwrap()["protocol"]["modbus"]["rtu"]["port"],
            "/dev/ttyUSB0"
        );
    }

    #[test]
    fn what_the_model_forbids_is_named_by_field() {
        let mut v = modbus();
        v["properties"][0]["desired"] = "20".into(); // ReadOnly
        v["properties"][1]["desired"] = "31".into(); // above maximum
        v["properties"][2]["modbus"]["table"] = "DiscreteInput".into(); // cannot be written
        v["properties"][3]["modbus"]["count"] = serde_json::Value::Null; // string needs count
        v["properties"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "nope", "modbus": {"table": "Coil", "address": 1}}));
        let problems = check(&device(v), &model());
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.properties[0].desired",
                "spec.properties[1].desired",
                "spec.properties[2].modbus.table",
                "spec.properties[3].modbus.count",
                "spec.properties[4].name"
            ],
            "{problems:?}"
        );
        assert!(
            problems[1].message.contains("above the maximum 30"),
            "{}",
            problems[1]
        );
    }

    #[test]
    fn register_shapes_are_checked() {
        let mut v = modbus();
        v["properties"][0]["modbus"]["dataType"] = "string".into();
        v["properties"][1]["modbus"]["address"] = 65535.into();
        v["properties"][1]["modbus"]["scale"] = 0.into();
        v["protocol"]["modbus"]["slaveId"] = 0.into();
        let fields: Vec<String> = check(&device(v), &model())
            .into_iter()
            .map(|p| p.field)
            .collect();
        assert_eq!(
            fields,
            [
                "spec.protocol.modbus.slaveId",
                "spec.properties[0].modbus.dataType",
                "spec.properties[0].modbus.count",
                "spec.properties[1].modbus.address",
                "spec.properties[1].modbus.scale"
            ]
        );
    }

    #[test]
    fn values_parse_as_their_type_and_print_canonically() {
        assert_eq!(
            Value::parse(PropertyType::Bool, "on").unwrap(),
            Value::Bool(true)
        );
        assert_eq!(
            Value::parse(PropertyType::Int, " 42 ").unwrap().to_string(),
            "42"
        );
        assert_eq!(
            Value::parse(PropertyType::Float, "21.50")
                .unwrap()
                .to_string(),
            "21.5"
        );
        assert!(Value::parse(PropertyType::Float, "NaN").is_err());
        assert!(Value::parse(PropertyType::Int, "4.2").is_err());
        let b = Value::parse(PropertyType::Bytes, "AAH/").unwrap();
        assert_eq!(b, Value::Bytes(vec![0, 1, 255]));
        assert_eq!(b.to_string(), "AAH/");
    }

    #[test]
    fn an_mqtt_device_has_no_registers() {
        let v = serde_json::json!({
            "model": "thermostat", "nodeName": "gw-1",
            "protocol": {"mqtt": {}},
            "properties": [{"name": "relay", "desired": "false"}, {"name": "label", "modbus": {"table": "Coil", "address": 0}}]
        });
        let d = device(v);
        let Protocol::Mqtt(m) = &d.protocol else {
            panic!()
        };
        assert_eq!((m.qos, m.format), (1, PayloadFormat::KubeEdgeTwin));
        let p = check(&d, &model());
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].field, "spec.properties[1].modbus");
    }
}
