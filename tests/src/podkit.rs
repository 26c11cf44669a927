//! A pod manager on a temporary node for the suites: the reconciler as
//! the daemon runs it, with the helpers that read PodStatus.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use edge_rt::pods::events::EventRing;
use edge_rt::pods::{self, Context, PodManager};
use edge_rt::runtime::Runtime;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use serde_json::json;

use crate::util::{busybox_image, wait_for, Env};

pub struct Harness {
    pub pods: PodManager,
    pub rt: Arc<Runtime>,
    pub env: Env,
}

impl Harness {
    pub fn new() -> Result<Harness> {
        Self::with_network(None)
    }

    /// With pod networking on a bridge of the test's own.
    pub fn with_network(network: Option<edge_rt::network::NetworkConfig>) -> Result<Harness> {
        let env = Env::new()?;
        busybox_image(&env.store)?;
        let rt = env.runtime()?;
        let ctx = Arc::new(Context {
            status_generation: Default::default(),
            status_changed: Default::default(),
            rt: rt.clone(),
            images: env.store.clone(),
            puller: std::sync::Mutex::new(Arc::new(edge_rt::image::registry::Puller::new(
                &Default::default(),
            )?)),
            events: Arc::new(EventRing::default()),
            objects: Arc::new(edge_rt::pods::source::Objects::default()),
            volumes_root: env.dir.path().join("volumes"),
            node: edge_rt::pods::env::Placement::of_this_node(),
            dns: Default::default(),
            // Nothing of the host's /dev or CDI specs: the accelerator
            // suite makes its own.
            accelerators: edge_rt::accelerators::Accelerators::new(
                edge_rt::accelerators::AcceleratorConfig {
                    detect: false,
                    cdi_spec_dirs: vec![],
                    ..Default::default()
                },
                None,
            ),
            network: match network {
                Some(n) => Some(Arc::new(edge_rt::network::Network::new(
                    n,
                    &env.cfg.state_dir,
                )?)),
                None => None,
            },
        });
        Ok(Harness {
            pods: PodManager::new(ctx),
            rt,
            env,
        })
    }

    pub async fn wait(&self, name: &str, what: &str, pred: impl Fn(&Pod) -> bool) -> Result<Pod> {
        let r = wait_for(what, Duration::from_secs(20), || async {
            self.pods.find("default", name).filter(|p| pred(p))
        })
        .await;

        r.with_context(|| {
            format!(
                "pod {name}: {}",
                serde_json::to_string_pretty(
                    &self.pods.find("default", name).and_then(|p| p.status)
                )
                .unwrap_or_default()
            )
        })
    }

    pub fn events(&self, pod: &Pod) -> Vec<(String, Option<String>)> {
        self.pods
            .context()
            .events
            .about(pods::uid(pod))
            .into_iter()
            .map(|e| (e.reason, e.container))
            .collect()
    }

    /// Make these the pods that run (as the daemon hands over its
    /// merged sources).
    pub fn run(&self, pods: Vec<Pod>) {
        self.pods.apply(
            pods.into_iter()
                .map(edge_rt::desired::DesiredPod::from)
                .collect(),
        );
    }

    pub async fn teardown(self) {
        self.run(vec![]);
        self.pods.settle().await;
    }
}

/// A pod from JSON, with a uid as a source would set it.
pub fn pod(v: serde_json::Value) -> Pod {
    let mut p: Pod = serde_json::from_value(v).expect("pod json");
    let name = p.metadata.name.clone().unwrap_or_default();
    p.metadata.uid = Some(format!("{name}-{}", std::process::id()));
    p.metadata.namespace = Some("default".into());
    p
}

pub fn sh(name: &str, script: &str) -> serde_json::Value {
    json!({"name": name, "image": "busybox:latest", "imagePullPolicy": "Never", "command": ["sh", "-c", script]})
}

pub fn phase(p: &Pod) -> &str {
    p.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

pub fn app(p: &Pod, name: &str) -> Option<ContainerStatus> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
        .cloned()
}

pub fn init(p: &Pod, name: &str) -> Option<ContainerStatus> {
    p.status
        .as_ref()?
        .init_container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
        .cloned()
}

pub fn condition(p: &Pod, kind: &str) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

pub fn exit_code(c: &ContainerStatus) -> Option<i32> {
    c.state.as_ref()?.terminated.as_ref().map(|t| t.exit_code)
}
