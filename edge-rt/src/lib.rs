//! edge-rt: Outrigger's node agent for embedded Linux gateways.
//!
//! - [`image`]: pull, import, store and garbage-collect OCI images.
//! - [`runtime`]: run containers in-process through libcontainer.
//! - [`supervisor`]: signals, reaping, PID 1 duties.
//! - [`config`]: the node configuration file.

pub mod bench;
pub mod config;
pub mod daemon;
pub mod image;
pub mod pods;
pub mod runtime;
pub mod static_pods;
pub mod supervisor;
