//! Pods as the kubelet runs them: desired pods in, container actions out,
//! status and events out.
//!
//! [`PodManager::apply`] takes the whole desired set ([`crate::desired`]:
//! the manifest directory and the store, merged). Each pod gets a worker
//! task that owns everything about it: it re-adopts containers a previous
//! edge-rt left, runs init containers in order, then the app containers,
//! restarts them by policy with crash-loop back-off, and publishes a
//! Kubernetes PodStatus after every step. Workers never touch each other's
//! containers, so one bad pod cannot disturb another.

pub mod actions;
pub mod attach;
pub mod backoff;
pub mod dns;
pub mod env;
pub mod exec;
pub mod forward;
// Events are kept by one ring type for pods and devices.
pub use crate::events;
pub mod logs;
mod manager;
pub mod plan;
pub mod probes;
pub mod source;
pub mod status;
pub mod volumes;
mod worker;

pub use manager::PodManager;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;

use crate::image::registry::Puller;
use crate::image::ImageStore;
use crate::runtime::Runtime;
use events::EventRing;

/// How long a worker sleeps when nothing is pending (it wakes earlier on
/// any container exit or spec change).
const IDLE: Duration = Duration::from_secs(60);

/// How soon a pod whose volumes or sandbox could not be set up is tried
/// again (sooner when objects change).
const SETUP_RETRY: Duration = Duration::from_secs(1);

const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// What every worker shares.
pub struct Context {
    pub rt: Arc<Runtime>,
    pub images: Arc<ImageStore>,
    pub puller: Mutex<Arc<Puller>>,
    pub events: Arc<EventRing>,
    /// ConfigMaps and Secrets the pods reference.
    pub objects: Arc<source::Objects>,
    /// Where pods' volumes live, a directory per pod uid.
    pub volumes_root: std::path::PathBuf,
    /// This node, for the downward API.
    pub node: env::Placement,
    /// The cluster's DNS for pods (their resolv.conf).
    pub dns: dns::ClusterDns,
    /// The node's accelerators and who holds them.
    pub accelerators: Arc<crate::accelerators::Accelerators>,
    /// Pod networking (None: pods get loopback only).
    pub network: Option<Arc<crate::network::Network>>,
    /// Bumped whenever a worker publishes a status: the reporter skips
    /// its pass when nothing moved.
    pub status_generation: std::sync::atomic::AtomicU64,
    /// Woken with every status published, so the reporter can send a
    /// change at once instead of at its next tick.
    pub status_changed: tokio::sync::Notify,
}

impl Context {
    pub(crate) fn puller(&self) -> Arc<Puller> {
        self.puller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_puller(&self, p: Puller) {
        *self.puller.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
    }
}

pub fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or("")
}

pub fn namespace(pod: &Pod) -> &str {
    pod.metadata.namespace.as_deref().unwrap_or("default")
}

pub fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("")
}

fn grace_period(pod: &Pod) -> Duration {
    pod.spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .map(|s| Duration::from_secs(s.max(0) as u64))
        .unwrap_or(DEFAULT_GRACE)
}

/// An error with its causes, for messages.
pub fn describe(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}
