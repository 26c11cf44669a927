//! cloud-gw: serves edge nodes over mutual-TLS WebSockets (and, with the
//! Kubernetes bridge, makes each an ordinary Node).
//!
//! - [`bridge`]: the Kubernetes side: Nodes, Leases, pods and what they
//!   use, status and events (a [`source::Source`] over the API server).
//! - [`http`], [`metrics`]: health, readiness, Prometheus metrics and the
//!   admission webhook.
//! - [`convert`]: `cloud-gw convert-kubeedge`, KubeEdge's device objects
//!   into ours.
//! - [`manifests`]: what `kubectl apply` needs to run cloud-gw in a cluster;
//!   [`crds`]: the DeviceModel and Device definitions among them.
//! - [`keeper`]: where secrets live (a directory, memory, or a Kubernetes
//!   Secret through [`bridge`]).
//! - [`pki`]: the link CA, the serving certificate, node certificates.
//! - [`tokens`]: join tokens (hashes, expiry, revocation).
//! - [`server`]: the edge endpoint (`/join`, `/link`).
//! - [`source`]: the trait a link serves from, and its directory
//!   implementation (objects per node from files, status into them).
//! - [`sync`]: one node's delta sync over its link.
//! - [`kubelet`]: the kubelet API of the edge nodes (`kubectl logs`), served
//!   through [`streams`]: streams inside the links held here.

pub mod bridge;
pub mod convert;
pub mod crds;
pub mod http;
pub mod keeper;
pub mod kubelet;
pub mod manifests;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod source;
pub mod streams;
pub mod sync;
pub mod tokens;
