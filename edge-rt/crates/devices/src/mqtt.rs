//! MQTT devices on KubeEdge's twin topics, through one broker connection.

pub mod device;
pub mod hub;
pub mod twin;

pub use device::MqttDevice;
pub use hub::{BrokerConfig, Hub};
