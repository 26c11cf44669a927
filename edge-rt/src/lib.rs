//! edge-rt: Outrigger's node agent for embedded Linux gateways.
//!
//! - [`image`]: pull, import, store and garbage-collect OCI images.
//! - [`runtime`]: run containers in-process through libcontainer.
//! - [`supervisor`]: signals, reaping, PID 1 duties.
//! - [`desired`]: what the node should run: the file and store sources,
//!   merged, each pod with its deletion.
//! - [`pods`]: the pod reconciler, status and events.
//! - [`static_pods`]: the manifest parser (the file source, `edge-rt apply`).
//! - [`api`] and [`cli`]: the local socket and the commands that use it.
//! - [`store`]: the SQLite store (objects, cursors, outbox) and [`reporter`],
//!   which puts pod status and events in its outbox.
//! - [`link`]: joining a cloud and the mutual-TLS link to cloud-gw.
//! - [`config`]: the node configuration file.
//! - [`sys`]: the bottom layer: the fork guard, the reaper, and the only
//!   ways to run code off the runtime thread.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod image;
pub mod link;
pub mod network;
pub mod pods;
pub mod reporter;
pub mod runtime;
pub mod static_pods;
pub mod store;
pub mod supervisor;
pub mod sys;
