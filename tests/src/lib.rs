//! Test infrastructure for Outrigger's end-to-end suites: fixture images
//! built from Debian's busybox-static, a real OCI registry (Debian's
//! `docker-registry`) with TLS, basic auth or bearer tokens from a token
//! server, helpers to run edge-rt and cloud-gw, and a real Kubernetes
//! control plane (`k8s`).

pub mod cloud;
pub mod fixtures;
pub mod k8s;
pub mod modbus;
pub mod netns;
pub mod pki;
pub mod podkit;
pub mod registry;
pub mod token_server;
pub mod util;
pub mod vm;
