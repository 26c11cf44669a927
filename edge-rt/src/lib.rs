//! edge-rt: Outrigger's node agent for embedded Linux gateways.
//!
//! The layers below are crates of their own under `edge-rt/crates/`, so the
//! compiler keeps them below: [`sys`] (the fork guard, the reaper, the only
//! ways to run code off the runtime thread) uses none of ours; [`store`]
//! (the SQLite node store) uses only the protocol crate; [`image`] (pull,
//! import, store and garbage-collect OCI images) uses `sys`; [`runtime`]
//! (containers in-process through libcontainer, their sandboxes and
//! [`network`]) uses `image` and `sys`. This crate is the agent on top:
//!
//! - [`supervisor`]: signals, reaping, PID 1 duties.
//! - [`desired`]: what the node should run: the file and store sources,
//!   merged, each pod with its deletion.
//! - [`pods`]: the pod reconciler, status and events.
//! - [`devices`]: the device manager: field devices' twins, through the
//!   drivers of `outrigger-devices` (Modbus RTU and TCP).
//! - [`static_pods`]: the manifest parser (the file source, `edge-rt apply`).
//! - [`api`] and [`cli`]: the local socket and the commands that use it.
//! - [`reporter`]: puts pod status, node status and events in the store's
//!   outbox.
//! - [`link`]: joining a cloud and the mutual-TLS link to cloud-gw.
//! - [`config`]: the node configuration file; [`reset`]: `edge-rt reset`.
//! - [`daemon`]: `edge-rt run`'s wiring and main loop; [`bench`]: `edge-rt bench`.

pub mod accelerators;
pub mod api;
pub mod bench;
pub mod check_kernel;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod devices;
pub mod events;
pub mod link;
pub mod pods;
pub mod reporter;
pub mod reset;
pub mod services;
pub mod static_pods;
pub mod stats;
pub mod supervisor;

// The layers below, crates of their own (edge-rt/crates/), re-exported
// under the names the rest of edge-rt uses.
pub use outrigger_image as image;
pub use outrigger_runtime as runtime;
pub use outrigger_runtime::network;
pub use outrigger_store as store;
pub use outrigger_sys as sys;
