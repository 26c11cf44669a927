//! What an edge reports up the status channel, typed once for both sides.
//!
//! The edge makes a [`Report`], turns it into the outbox's envelope
//! ([`Report::class`], [`Report::key`], [`Report::body`]) and sends rows of
//! it ([`crate::message::Row`]); the cloud reads each row back with
//! [`Report::from_row`]. Neither side spells a key or a body by hand, so a
//! field renamed here fails to compile on both sides instead of silently
//! dropping status.
//!
//! The bodies are JSON (the outbox keeps them so, and they are mostly
//! Kubernetes objects); keys say what a newer row replaces: `pod/<uid>`,
//! `node/<name>`, `event/<id>`, `device/<uid>`.
//!
//! Versions: a field added in a minor version has a default (an older
//! peer's rows still read); a variant added in a minor version says so in
//! [`Report::since_minor`] and must not go to a peer of an older minor (the
//! edge's uplink holds such rows back by [`since_minor_of_key`] until it
//! talks to a newer cloud). A row this
//! build cannot read is [`ReportError::Unknown`]: the cloud drops it and
//! says so.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSystemInfo, PodStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde::{Deserialize, Serialize};

use crate::message::Row;

/// How the outbox keeps a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    /// The latest state of something (a pod, the node): a newer one
    /// replaces an unsent older one of the same key.
    Status,
    /// Something that happened; the edge keeps a bounded ring of them.
    Event,
}

impl Class {
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Status => "status",
            Class::Event => "event",
        }
    }

    pub fn from_name(s: &str) -> Option<Class> {
        match s {
            "status" => Some(Class::Status),
            "event" => Some(Class::Event),
            _ => None,
        }
    }
}

/// One thing an edge reports.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// A pod's status as the node runs it (boxed: a status is large).
    Pod(Box<PodReport>),
    /// The node no longer has this pod (stopped and removed): the cloud
    /// completes a deletion that waited for the node.
    PodGone { uid: String },
    /// The node's own status, as a kubelet writes it into its Node.
    Node(Box<NodeReport>),
    /// Something that happened to a pod.
    Event(PodEvent),
    /// What the node last saw of a device (from 1.2). One row per device,
    /// so after a day offline the newest value of each property goes up,
    /// not every sample.
    Device(Box<DeviceReport>),
    /// Something that happened to a device (from 1.2): it stopped
    /// answering and why, it answers again, a desired value not written.
    DeviceEvent(DeviceEvent),
}

/// What the cloud needs to write a device's status back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub status: crate::device::DeviceStatus,
}

/// What the cloud needs to write a pod's status back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PodReport {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub status: Option<PodStatus>,
}

/// What a kubelet puts in its Node's status about the machine, and its
/// conditions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    pub name: String,
    #[serde(default)]
    pub capacity: BTreeMap<String, Quantity>,
    #[serde(default)]
    pub allocatable: BTreeMap<String, Quantity>,
    #[serde(default)]
    pub addresses: Vec<NodeAddress>,
    #[serde(default)]
    pub node_info: Option<NodeSystemInfo>,
    #[serde(default)]
    pub conditions: Vec<NodeCondition>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// A Kubernetes-style event about one pod (Pulling, Started, BackOff,
/// Unhealthy, ...), repeats folded into one with a count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodEvent {
    pub pod_uid: String,
    pub namespace: String,
    pub pod: String,
    /// `spec.containers{name}` as the kubelet writes fieldPath, if any.
    pub container: Option<String>,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub reason: String,
    pub message: String,
    pub count: u32,
    /// RFC 3339.
    pub first_timestamp: String,
    pub last_timestamp: String,
    /// The same for all repeats folded into this event: with the node and
    /// pod, what makes the Event's name (a row sent twice updates one).
    #[serde(default)]
    pub id: u64,
    /// The node's own ordering of its events (not used by the cloud).
    #[serde(default)]
    pub seq: u64,
}

/// A Kubernetes-style event about one device, repeats folded into one
/// with a count (as [`PodEvent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub device_uid: String,
    pub namespace: String,
    pub device: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub reason: String,
    pub message: String,
    pub count: u32,
    /// RFC 3339.
    pub first_timestamp: String,
    pub last_timestamp: String,
    /// The same for all repeats folded into this event.
    #[serde(default)]
    pub id: u64,
    /// The node's own ordering of its events (not used by the cloud).
    #[serde(default)]
    pub seq: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("row {key}: no report of this build has that key (a newer peer's?)")]
    Unknown { key: String },
    #[error("row {key}: {source}")]
    Body {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// The minor version that added the report a row's key is of (0 for a
/// key this build does not know: the peer decides what it can read), so
/// the edge can hold back rows an older cloud would not know.
pub fn since_minor_of_key(key: &str) -> u16 {
    match key.split_once('/').map_or(key, |(k, _)| k) {
        "device" | "deviceevent" => 2,
        _ => 0,
    }
}

/// The body of a pod that is gone.
#[derive(Serialize, Deserialize)]
struct Gone {
    uid: String,
    deleted: bool,
}

impl Report {
    pub fn class(&self) -> Class {
        match self {
            Report::Event(_) | Report::DeviceEvent(_) => Class::Event,
            Report::Pod(_) | Report::PodGone { .. } | Report::Node(_) | Report::Device(_) => {
                Class::Status
            }
        }
    }

    /// What a newer report replaces in the outbox: a pod's status and its
    /// being gone share a key, so the last word on a pod is what goes up.
    pub fn key(&self) -> String {
        match self {
            Report::Pod(p) => format!("pod/{}", p.uid),
            Report::PodGone { uid } => format!("pod/{uid}"),
            Report::Node(n) => format!("node/{}", n.name),
            Report::Event(e) => format!("event/{}", e.id),
            Report::Device(d) => format!("device/{}", d.uid),
            Report::DeviceEvent(e) => format!("deviceevent/{}", e.id),
        }
    }

    /// The minor version of protocol 1 that added the variant.
    pub const fn since_minor(&self) -> u16 {
        match self {
            Report::Pod(_) | Report::PodGone { .. } | Report::Node(_) | Report::Event(_) => 0,
            Report::Device(_) | Report::DeviceEvent(_) => 2,
        }
    }

    /// The body as JSON.
    pub fn body(&self) -> serde_json::Value {
        let v = match self {
            Report::Pod(p) => serde_json::to_value(p),
            Report::PodGone { uid } => serde_json::to_value(Gone {
                uid: uid.clone(),
                deleted: true,
            }),
            Report::Node(n) => serde_json::to_value(n),
            Report::Event(e) => serde_json::to_value(e),
            Report::Device(d) => serde_json::to_value(d),
            Report::DeviceEvent(e) => serde_json::to_value(e),
        };
        // These types always serialize (string keys, no non-finite floats).
        v.unwrap_or_default()
    }

    /// The row that carries it, numbered `seq`.
    pub fn to_row(&self, seq: i64) -> Row {
        Row {
            seq,
            class: self.class(),
            key: self.key(),
            body: serde_json::to_vec(&self.body()).unwrap_or_default(),
        }
    }

    /// A report from its envelope.
    pub fn parse(class: Class, key: &str, body: &[u8]) -> Result<Report, ReportError> {
        let err = |source| ReportError::Body {
            key: key.to_string(),
            source,
        };
        let (kind, _) = key.split_once('/').unwrap_or((key, ""));
        match (class, kind) {
            (Class::Event, "event") => serde_json::from_slice(body).map(Report::Event).map_err(err),
            (Class::Event, "deviceevent") => serde_json::from_slice(body)
                .map(Report::DeviceEvent)
                .map_err(err),
            (Class::Status, "node") => serde_json::from_slice(body)
                .map(|n| Report::Node(Box::new(n)))
                .map_err(err),
            (Class::Status, "device") => serde_json::from_slice(body)
                .map(|d| Report::Device(Box::new(d)))
                .map_err(err),
            (Class::Status, "pod") => {
                let v: serde_json::Value = serde_json::from_slice(body).map_err(err)?;
                if v.get("deleted") == Some(&serde_json::Value::Bool(true)) {
                    let g: Gone = serde_json::from_value(v).map_err(err)?;
                    Ok(Report::PodGone { uid: g.uid })
                } else {
                    serde_json::from_value(v)
                        .map(|p| Report::Pod(Box::new(p)))
                        .map_err(err)
                }
            }
            _ => Err(ReportError::Unknown {
                key: key.to_string(),
            }),
        }
    }

    /// A report from the row that carried it.
    pub fn from_row(row: &Row) -> Result<Report, ReportError> {
        Report::parse(row.class, &row.key, &row.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(r: Report) {
        assert_eq!(Report::from_row(&r.to_row(1)).unwrap(), r);
    }

    #[test]
    fn every_report_reads_back_from_its_row() {
        round_trip(Report::Pod(Box::new(PodReport {
            namespace: "default".into(),
            name: "web".into(),
            uid: "u1".into(),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                ..Default::default()
            }),
        })));
        round_trip(Report::PodGone { uid: "u1".into() });
        round_trip(Report::Node(Box::new(NodeReport {
            name: "edge-1".into(),
            capacity: BTreeMap::from([("cpu".into(), Quantity("2".into()))]),
            addresses: vec![NodeAddress {
                type_: "InternalIP".into(),
                address: "10.0.0.2".into(),
            }],
            ..Default::default()
        })));
        round_trip(Report::Event(PodEvent {
            pod_uid: "u1".into(),
            namespace: "default".into(),
            pod: "web".into(),
            container: Some("spec.containers{web}".into()),
            kind: EventType::Warning,
            reason: "BackOff".into(),
            message: "back-off".into(),
            count: 3,
            first_timestamp: "2026-12-02T00:00:00Z".into(),
            last_timestamp: "2026-12-02T00:01:00Z".into(),
            id: 7,
            seq: 9,
        }));
        let d = Report::Device(Box::new(DeviceReport {
            namespace: "plant".into(),
            name: "boiler".into(),
            uid: "d1".into(),
            status: crate::device::DeviceStatus {
                state: Some("Online".into()),
                properties: vec![crate::device::PropertyStatus {
                    name: "temperature".into(),
                    value: Some("21.5".into()),
                    ..Default::default()
                }],
                ..Default::default()
            },
        }));
        assert_eq!(since_minor_of_key(&d.key()), d.since_minor());
        round_trip(d);
        let e = Report::DeviceEvent(DeviceEvent {
            device_uid: "d1".into(),
            namespace: "plant".into(),
            device: "boiler".into(),
            kind: EventType::Warning,
            reason: "Timeout".into(),
            message: "no answer in 300 ms".into(),
            count: 2,
            first_timestamp: "2026-12-02T10:00:00Z".into(),
            last_timestamp: "2026-12-02T10:01:00Z".into(),
            id: 4,
            seq: 5,
        });
        assert_eq!(since_minor_of_key(&e.key()), e.since_minor());
        round_trip(e);
    }

    #[test]
    fn the_wire_shapes_of_protocol_1_0_still_read() {
        // As 1.0 and 1.1 edges wrote them.
        let gone = Report::parse(Class::Status, "pod/u1", br#"{"uid":"u1","deleted":true}"#);
        assert_eq!(gone.unwrap(), Report::PodGone { uid: "u1".into() });
        let pod = Report::parse(
            Class::Status,
            "pod/u2",
            br#"{"namespace":"n","name":"p","uid":"u2","status":{"phase":"Pending"}}"#,
        )
        .unwrap();
        assert!(
            matches!(pod, Report::Pod(p) if p.status.as_ref().unwrap().phase.as_deref() == Some("Pending"))
        );
        let node = Report::parse(
            Class::Status,
            "node/e",
            br#"{"name":"e","capacity":{"cpu":"4"},"nodeInfo":{"architecture":"arm64","bootID":"","containerRuntimeVersion":"","kernelVersion":"","kubeProxyVersion":"","kubeletVersion":"v1.36.0","machineID":"","operatingSystem":"linux","osImage":"","systemUUID":""},"conditions":[]}"#,
        )
        .unwrap();
        assert!(
            matches!(node, Report::Node(n) if n.node_info.as_ref().unwrap().architecture == "arm64")
        );
    }

    #[test]
    fn unknown_and_broken_rows_are_errors_not_panics() {
        assert!(matches!(
            Report::parse(Class::Status, "gadget/d1", b"{}"),
            Err(ReportError::Unknown { .. })
        ));
        assert!(matches!(
            Report::parse(Class::Status, "device/d1", b"{}"),
            Err(ReportError::Body { .. })
        ));
        assert!(matches!(
            Report::parse(Class::Event, "pod/u", b"{}"),
            Err(ReportError::Unknown { .. })
        ));
        assert!(matches!(
            Report::parse(Class::Status, "pod/u", b"{not json"),
            Err(ReportError::Body { .. })
        ));
        assert!(matches!(
            Report::parse(Class::Status, "node/n", br#"{"name": 3}"#),
            Err(ReportError::Body { .. })
        ));
    }
}
