//! cloud-gw: serves edge nodes over mutual-TLS WebSockets (and, with the
//! Kubernetes bridge, makes each an ordinary Node).
//!
//! - [`keeper`]: where secrets live (a directory; a Kubernetes Secret later).
//! - [`pki`]: the link CA, the serving certificate, node certificates.
//! - [`tokens`]: join tokens (hashes, expiry, revocation).
//! - [`server`]: the edge endpoint (`/join`, `/link`).
//! - [`source`]: objects per node from a directory, status into it (until
//!   the Kubernetes bridge).
//! - [`sync`]: one node's delta sync over its link.

pub mod keeper;
pub mod pki;
pub mod server;
pub mod source;
pub mod sync;
pub mod tokens;
