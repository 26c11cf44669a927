//! Field-device drivers for edge-rt's device manager: each runs as a task
//! on the runtime thread (no threads of its own: see the fork rule in
//! ARCHITECTURE.md), reads a device's properties on their collect cycles,
//! writes the values it is told to, and says what it saw as [`Event`]s.
//! What the events mean for the twin (reported values, conditions,
//! counters) is the manager's business.
//!
//! - [`modbus`]: RTU lines and TCP targets shared by their devices
//!   ([`modbus::bus`]), the register codec ([`modbus::codec`]), read
//!   planning and the device task ([`modbus::device`]).
//! - [`mqtt`]: devices that speak MQTT themselves, on KubeEdge's twin
//!   topics and JSON ([`mqtt::twin`]), through one broker connection per
//!   node ([`mqtt::hub`]).
//! - [`broker`]: the embedded MQTT broker (rumqttd), run in a process of
//!   its own.

pub mod broker;
pub mod modbus;
pub mod mqtt;

pub mod mailbox;

use std::time::Duration;

use outrigger_proto::device::Value;

/// Something a driver saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A property read, and its value.
    Value { property: String, value: Value },
    /// A property could not be read (or decoded).
    ReadFailed { property: String, error: String },
    /// One exchange with the device: whether it answered, and if not why
    /// (`reason` as the Reachable condition puts it).
    Contact {
        ok: bool,
        reason: &'static str,
        message: String,
        latency: Duration,
    },
    /// A desired value the device took.
    Wrote { property: String, value: String },
    /// A desired value that was not written, and why (refused before
    /// writing, or the device said no).
    WriteFailed {
        property: String,
        value: String,
        error: String,
    },
}

/// What a driver is asked to do besides polling.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Write a desired value (as text, its property's type).
    Write { property: String, value: String },
}
