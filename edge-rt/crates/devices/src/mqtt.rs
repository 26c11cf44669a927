//! MQTT devices on KubeEdge's twin topics, through one broker connection,
//! and the other devices' twins mirrored onto the same topics.

pub mod device;
pub mod hub;
pub mod mirror;
pub mod plain;
pub mod tls;
pub mod twin;

pub use device::MqttDevice;
pub use hub::{BrokerConfig, Hub, Tls};
