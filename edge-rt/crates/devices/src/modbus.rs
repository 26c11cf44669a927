//! Modbus masters: RTU over serial lines, TCP.

pub mod bus;
pub mod codec;
pub mod device;

pub use bus::{Bus, BusError, LineConfig, LineId};
pub use device::ModbusDevice;
