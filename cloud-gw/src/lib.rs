//! cloud-gw: serves edge nodes over mutual-TLS WebSockets (and, with the
//! Kubernetes bridge, makes each an ordinary Node).
//!
//! - [`keeper`]: where secrets live (a directory; a Kubernetes Secret later).
//! - [`pki`]: the link CA, the serving certificate, node certificates.
//! - [`tokens`]: join tokens (hashes, expiry, revocation).
//! - [`server`]: the edge endpoint (`/join`, `/link`).

pub mod keeper;
pub mod pki;
pub mod server;
pub mod tokens;
