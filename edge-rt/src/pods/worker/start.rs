//! The start path of a container: pull, prepare, create. It returns one
//! typed failure ([`StartFailure`]), which the worker turns into an event
//! and a waiting reason in one place ([`Worker::start_failed`]).

use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;

use super::{Kind, Worker};
use crate::image::registry::{self, Progress, PullPolicy};
use crate::pods::events::EventType;
use crate::pods::{describe, env};
use crate::runtime::{ContainerRequest, RuntimeError};

/// Why a container did not get as far as running.
#[derive(Debug)]
pub(super) enum StartFailure {
    /// Its image could not be had (`never`: not on the node, and the
    /// policy says not to pull).
    Pull {
        image: String,
        never: bool,
        error: String,
    },
    /// The pod's sandbox (namespaces, address, hostPorts).
    Sandbox(String),
    /// The pod's volumes (an object or a token not here yet, ...).
    Volumes(String),
    /// Its environment or mounts (a missing key, a bad subPath, ...).
    Config(String),
    /// The runtime refused it (`config`: its configuration).
    Create { config: bool, error: String },
    /// The devices it asks for are not free (it waits for them).
    Devices(String),
}

impl StartFailure {
    /// The pod is not set up yet: tried again soon, with no back-off.
    pub(super) fn is_setup(&self) -> bool {
        matches!(
            self,
            StartFailure::Sandbox(_) | StartFailure::Volumes(_) | StartFailure::Devices(_)
        )
    }

    /// The event: (about the container, not the pod; reason; message).
    fn event(&self) -> (bool, &'static str, String) {
        match self {
            StartFailure::Pull { image, error, .. } => (
                true,
                "Failed",
                format!("Failed to pull image \"{image}\": {error}"),
            ),
            StartFailure::Sandbox(m) => (
                false,
                "FailedCreatePodSandBox",
                format!("Failed to create pod sandbox: {m}"),
            ),
            StartFailure::Volumes(m) => (
                true,
                "FailedMount",
                format!("MountVolume.SetUp failed: {m}"),
            ),
            // The kubelet's admission says OutOf<resource>; a pod here
            // waits for the device instead of failing.
            StartFailure::Devices(m) => (false, "FailedAllocation", m.clone()),
            StartFailure::Config(m) | StartFailure::Create { error: m, .. } => {
                (true, "Failed", format!("Error: {m}"))
            }
        }
    }

    /// The reason (and message) the container waits with, as the kubelet
    /// words them.
    fn waiting(self) -> (&'static str, String) {
        match self {
            StartFailure::Pull {
                never: true, error, ..
            } => ("ErrImageNeverPull", error),
            StartFailure::Pull { error, .. } => ("ErrImagePull", error),
            StartFailure::Sandbox(m) | StartFailure::Volumes(m) => ("ContainerCreating", m),
            StartFailure::Devices(m) => ("InsufficientDevices", m),
            StartFailure::Config(m)
            | StartFailure::Create {
                config: true,
                error: m,
            } => ("CreateContainerConfigError", m),
            StartFailure::Create { error, .. } => ("CreateContainerError", error),
        }
    }
}

impl Worker {
    /// A start that did not get as far as a running container: a Warning
    /// event, and the reason the container waits with.
    pub(super) fn start_failed(&mut self, pod: &Pod, kind: Kind, i: usize, f: StartFailure) {
        let (of_container, reason, message) = f.event();
        let t = self.tracked(kind, i);
        let name = t.spec.name.clone();
        // A pull that may work later backs off as ImagePullBackOff; Never
        // is not one: its reason stays.
        if let StartFailure::Pull { never, image, .. } = &f {
            t.pull_failed = (!*never).then(|| image.clone());
        }
        t.view.waiting = Some({
            let (w, m) = f.waiting();
            (w.into(), m)
        });
        let container = of_container.then_some(name.as_str());
        self.event(pod, container, EventType::Warning, reason, message);
    }

    /// Pull, prepare (sandbox, volumes, environment and mounts) and create
    /// the container; any failure on the way is one [`StartFailure`].
    pub(super) async fn start(
        &mut self,
        pod: &Pod,
        kind: Kind,
        i: usize,
    ) -> Result<(), StartFailure> {
        let pref = self.pod_ref(pod);
        let spec = self.tracked(kind, i).spec.clone();
        let image_ref = spec.image.clone().unwrap_or_default();
        let policy = PullPolicy::from_k8s(spec.image_pull_policy.as_deref(), &image_ref);
        let image = self.pull(pod, Some(&spec.name), &image_ref, policy).await?;
        self.tracked(kind, i).pull_failed = None;
        let edits = self
            .ctx
            .accelerators
            .grant(pod, &spec.name, matches!(kind, Kind::Init))
            .map_err(|e| match e {
                crate::accelerators::GrantError::Shortage(s) => {
                    StartFailure::Devices(s.to_string())
                }
                other => StartFailure::Config(other.to_string()),
            })?;
        self.ensure_network(pod).map_err(StartFailure::Sandbox)?;
        self.ensure_image_volumes(pod).await?;
        self.volumes
            .sync(pod, &self.ctx.objects, &self.ctx.node)
            .map_err(StartFailure::Volumes)?;
        self.volumes_ready = true;
        let mut at = self.ctx.node.clone();
        at.pod_ip = self.pod_ip.map(|ip| ip.to_string());
        let prepared = env::resolve(pod, &spec, &self.ctx.objects, &at)
            .and_then(|e| self.volumes.mounts(pod, &spec).map(|m| (e, m)));
        let (extra_env, mounts) = prepared.map_err(StartFailure::Config)?;
        let t = self.tracked(kind, i);
        let attempt = match &t.view.current {
            Some(_) => t.view.restart_count + 1,
            None => 0,
        };
        let req = ContainerRequest {
            pod: pref,
            container: spec.clone(),
            pod_security: pod.spec.as_ref().and_then(|s| s.security_context.clone()),
            image,
            extra_env,
            mounts,
            attempt,
            edits,
            volume_images: self.volumes.images_of(&spec),
        };
        let rec = self.ctx.rt.run(req).map_err(|e| StartFailure::Create {
            config: matches!(e, RuntimeError::Config(_)),
            error: describe(&e),
        })?;
        self.event(
            pod,
            Some(&spec.name),
            EventType::Normal,
            "Created",
            format!("Created container {}", spec.name),
        );
        self.event(
            pod,
            Some(&spec.name),
            EventType::Normal,
            "Started",
            format!("Started container {}", spec.name),
        );
        self.watch_exit(&rec.id);
        let t = self.tracked(kind, i);
        let older = t.view.previous.take();
        t.view.previous = t.view.current.take();
        t.view.current = Some(rec);
        t.view.restart_count = attempt;
        t.view.waiting = None;
        t.started = Some(Instant::now());
        t.exit_seen = false;
        t.force_restart = false;
        if let Some(old) = older {
            self.forget(&old);
        }
        self.start_probes(pod, kind, i);
        self.post_start(pod, kind, i).await;
        Ok(())
    }

    /// An image for a container (`container`) or an image volume (None),
    /// by its pull policy, with the kubelet's events. Offline, a registry
    /// that cannot be reached (not one that refuses) falls back to the copy
    /// on the node, with a Warning saying so: Always would otherwise keep
    /// a node from running what it has (a `:latest` image after a reboot
    /// with no network).
    async fn pull(
        &mut self,
        pod: &Pod,
        container: Option<&str>,
        image_ref: &str,
        policy: PullPolicy,
    ) -> Result<crate::image::ImageRecord, StartFailure> {
        let present = self.ctx.images.resolve(image_ref).ok().flatten().is_some();
        let will_pull =
            matches!(policy, PullPolicy::Always) || (!present && policy != PullPolicy::Never);
        if will_pull {
            self.event(
                pod,
                container,
                EventType::Normal,
                "Pulling",
                format!("Pulling image \"{image_ref}\""),
            );
        }
        let started = Instant::now();
        let puller = self.ctx.puller();
        let pulled = Box::pin(registry::ensure(
            &self.ctx.images,
            &puller,
            image_ref,
            policy,
            None,
            &Progress::default(),
        ))
        .await;
        let mut from_cache = false;
        let pulled = match pulled {
            Err(crate::image::ImageError::Unreachable { registry, detail }) if present => {
                match self.ctx.images.resolve(image_ref).ok().flatten() {
                    Some(img) => {
                        self.event(
                            pod,
                            container,
                            EventType::Warning,
                            "RegistryUnreachable",
                            format!("registry {registry} unreachable ({detail}); running the copy of \"{image_ref}\" already on the node"),
                        );
                        from_cache = true;
                        Ok(img)
                    }
                    None => Err(crate::image::ImageError::Unreachable { registry, detail }),
                }
            }
            r => r,
        };
        match pulled {
            Ok(img) => {
                if will_pull && !from_cache {
                    self.event(
                        pod,
                        container,
                        EventType::Normal,
                        "Pulled",
                        format!(
                            "Successfully pulled image \"{image_ref}\" in {:.3}s",
                            started.elapsed().as_secs_f64()
                        ),
                    );
                }
                Ok(img)
            }
            Err(e) => Err(StartFailure::Pull {
                image: image_ref.to_string(),
                never: matches!(e, crate::image::ImageError::NeverPull(_)),
                error: e.to_string(),
            }),
        }
    }

    /// The pod's image volumes, pulled (by their own pull policy) and made
    /// ready to mount, once per pod.
    async fn ensure_image_volumes(&mut self, pod: &Pod) -> Result<(), StartFailure> {
        let wanted: Vec<(String, String, Option<String>)> = pod
            .spec
            .iter()
            .flat_map(|s| s.volumes.iter().flatten())
            .filter_map(|v| {
                let i = v.image.as_ref()?;
                Some((
                    v.name.clone(),
                    i.reference.clone().unwrap_or_default(),
                    i.pull_policy.clone(),
                ))
            })
            .filter(|(name, _, _)| !self.volumes.has_image(name))
            .collect();
        for (name, reference, pull_policy) in wanted {
            if reference.is_empty() {
                return Err(StartFailure::Config(format!(
                    "image volume {name}: no reference"
                )));
            }
            let policy = PullPolicy::from_k8s(pull_policy.as_deref(), &reference);
            let record = self.pull(pod, None, &reference, policy).await?;
            self.volumes
                .set_image(&self.ctx.images, &name, record)
                .map_err(StartFailure::Volumes)?;
        }
        Ok(())
    }

    /// The pod's sandbox, address and hostPorts, once, before its first
    /// container starts.
    fn ensure_network(&mut self, pod: &Pod) -> Result<(), String> {
        let Some(net) = self.ctx.network.clone() else {
            return Ok(());
        };
        let pref = self.pod_ref(pod);
        if pref.host_network || self.pod_ip.is_some() {
            return Ok(());
        }
        let netns = self
            .ctx
            .rt
            .ensure_sandbox(&pref)
            .map_err(|e| describe(&e))?
            .ok_or("the pod has no network namespace")?;
        let a = net.attach(&self.uid, &netns).map_err(|e| e.to_string())?;
        let ports: Vec<crate::network::PortMap> = pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(crate::network::PortMap {
                    host_port: u16::try_from(p.host_port?).ok()?,
                    container_port: u16::try_from(p.container_port).ok()?,
                    protocol: p.protocol.as_deref().unwrap_or("TCP").to_lowercase(),
                })
            })
            .collect();
        net.map_ports(&self.uid, a.ip, &ports)
            .map_err(|e| e.to_string())?;
        self.pod_ip = Some(a.ip);
        Ok(())
    }
}
