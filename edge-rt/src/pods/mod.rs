//! Pods as the kubelet runs them: desired pods in, container actions out,
//! status and events out.
//!
//! [`PodManager::apply`] takes the whole desired set from a source (the
//! static manifest directory today; the store later). Each pod gets a worker
//! task that owns everything about it: it re-adopts containers a previous
//! edge-rt left, runs init containers in order, then the app containers,
//! restarts them by policy with crash-loop back-off, and publishes a
//! Kubernetes PodStatus after every step. Workers never touch each other's
//! containers, so one bad pod cannot disturb another.

pub mod actions;
pub mod backoff;
pub mod env;
pub mod events;
pub mod probes;
pub mod source;
pub mod status;
pub mod volumes;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::{mpsc, watch, Notify};

use crate::image::registry::{self, Progress, PullPolicy, Puller};
use crate::image::ImageStore;
use crate::runtime::{ContainerRecord, ContainerRequest, PodRef, Runtime, RuntimeError};
use backoff::Backoff;
use events::{EventRing, EventType, PodEvent};
use probes::{ProbeTask, Settings, Verdict};
use status::{ContainerView, StatusInput};

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
    /// Pod networking (None: pods get loopback only).
    pub network: Option<Arc<crate::network::Network>>,
    /// Bumped whenever a worker publishes a status: the reporter skips
    /// its pass when nothing moved.
    pub status_generation: std::sync::atomic::AtomicU64,
    /// Woken with every status published, so the reporter can send a
    /// change at once instead of at its next tick.
    pub status_changed: tokio::sync::Notify,
    /// Pods being deleted in the cluster with a grace period of their own
    /// (`kubectl delete --grace-period`): uid -> seconds, used when they stop.
    pub deletion_grace: Mutex<HashMap<String, i64>>,
}

impl Context {
    fn puller(&self) -> Arc<Puller> {
        self.puller
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_puller(&self, p: Puller) {
        *self.puller.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
    }
}

struct Entry {
    desired: watch::Sender<Option<Arc<Pod>>>,
    view: Arc<Mutex<Pod>>,
    task: tokio::task::JoinHandle<()>,
}

pub struct PodManager {
    ctx: Arc<Context>,
    pods: Mutex<HashMap<String, Entry>>,
    /// Uids of pods whose workers finished (stopped and cleaned up), until
    /// [`PodManager::take_removed`] collects them.
    removed: Mutex<Vec<String>>,
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

impl PodManager {
    pub fn new(ctx: Arc<Context>) -> PodManager {
        PodManager {
            ctx,
            pods: Mutex::new(HashMap::new()),
            removed: Mutex::new(Vec::new()),
        }
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.pods.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Make the desired set of pods (each with `metadata.uid` set) the one
    /// that runs: new pods start, changed ones are updated, missing ones are
    /// stopped and removed.
    pub fn apply(&self, desired: Vec<Pod>) {
        let mut pods = self.lock();
        self.prune(&mut pods);
        let wanted: BTreeMap<String, Pod> = desired
            .into_iter()
            .map(|p| (uid(&p).to_string(), p))
            .collect();
        for (uid, e) in pods.iter() {
            if !wanted.contains_key(uid) && e.desired.borrow().is_some() {
                e.desired.send_replace(None);
            }
        }
        for (uid, pod) in wanted {
            match pods.get(&uid) {
                Some(e) => {
                    let changed = e.desired.borrow().as_ref().is_none_or(|cur| **cur != pod);
                    if changed {
                        e.desired.send_replace(Some(Arc::new(pod)));
                    }
                }
                None => {
                    let (tx, rx) = watch::channel(Some(Arc::new(pod.clone())));
                    let view = Arc::new(Mutex::new(pod));
                    let worker = Worker::new(self.ctx.clone(), &uid, view.clone());
                    let task = tokio::spawn(worker.run(rx));
                    pods.insert(
                        uid,
                        Entry {
                            desired: tx,
                            view,
                            task,
                        },
                    );
                }
            }
        }
    }

    /// Drop the entries of finished workers, remembering their uids.
    fn prune(&self, pods: &mut HashMap<String, Entry>) {
        let done: Vec<String> = pods
            .iter()
            .filter(|(_, e)| e.task.is_finished())
            .map(|(u, _)| u.clone())
            .collect();
        for u in &done {
            pods.remove(u);
        }
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(done);
    }

    /// How many removed pods wait for [`PodManager::take_removed`], counting
    /// workers that finished since the last prune.
    pub fn removed_pending(&self) -> usize {
        let finished = self
            .lock()
            .values()
            .filter(|e| e.task.is_finished())
            .count();
        finished + self.removed.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Pods removed since the last call (however briefly they ran): what
    /// the reporter tells the cloud is gone.
    pub fn take_removed(&self) -> Vec<String> {
        let mut pods = self.lock();
        self.prune(&mut pods);
        drop(pods);
        std::mem::take(&mut *self.removed.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Every pod with its current status, by namespace and name.
    pub fn list(&self) -> Vec<Pod> {
        let mut v: Vec<Pod> = self
            .lock()
            .values()
            .filter(|e| !e.task.is_finished())
            .map(|e| e.view.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        v.sort_by(|a, b| (namespace(a), name(a)).cmp(&(namespace(b), name(b))));
        v
    }

    pub fn find(&self, namespace_: &str, name_: &str) -> Option<Pod> {
        self.list()
            .into_iter()
            .find(|p| namespace(p) == namespace_ && name(p) == name_)
    }

    /// Wait until every worker whose pod was removed has finished.
    pub async fn settle(&self) {
        loop {
            let pending = self
                .lock()
                .values()
                .any(|e| e.desired.borrow().is_none() && !e.task.is_finished());
            if !pending {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One container of the pod as the worker tracks it.
struct Tracked {
    view: ContainerView,
    spec: Container,
    backoff: Backoff,
    started: Option<Instant>,
    /// The exit of `view.current` went into the back-off already.
    exit_seen: bool,
    /// The last start failed in the image pull.
    pull_failed: bool,
    /// The spec changed: restart whatever the policy says.
    force_restart: bool,
    /// Probe tasks of the current run.
    probes: Vec<tokio::task::AbortHandle>,
    /// Tells liveness and readiness probes the startup probe passed.
    started_tx: Option<watch::Sender<bool>>,
}

impl Tracked {
    fn new(c: &Container) -> Tracked {
        Tracked {
            view: ContainerView {
                name: c.name.clone(),
                image: c.image.clone().unwrap_or_default(),
                started: true,
                ..Default::default()
            },
            spec: c.clone(),
            backoff: Backoff::default(),
            started: None,
            exit_seen: false,
            pull_failed: false,
            force_restart: false,
            probes: vec![],
            started_tx: None,
        }
    }

    fn stop_probes(&mut self) {
        for p in self.probes.drain(..) {
            p.abort();
        }
        self.started_tx = None;
    }

    fn exit_code(&self) -> Option<i32> {
        self.view
            .current
            .as_ref()
            .and_then(|r| r.exit.as_ref())
            .map(|e| e.exit_code)
    }
}

/// Wall-clock RFC 3339 time to a monotonic instant (for containers adopted
/// from a previous edge-rt).
fn instant_of(rfc3339: Option<&str>) -> Option<Instant> {
    let t: jiff::Timestamp = rfc3339?.parse().ok()?;
    let ago =
        std::time::Duration::try_from(jiff::Timestamp::now().duration_since(t)).unwrap_or_default();
    Instant::now().checked_sub(ago)
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Init,
    App,
}

struct Worker {
    ctx: Arc<Context>,
    uid: String,
    init: Vec<Tracked>,
    app: Vec<Tracked>,
    notify: Arc<Notify>,
    start_time: Option<Time>,
    failed: Option<(String, String)>,
    view: Arc<Mutex<Pod>>,
    verdicts: mpsc::UnboundedSender<Verdict>,
    verdicts_rx: Option<mpsc::UnboundedReceiver<Verdict>>,
    volumes: volumes::PodVolumes,
    /// Set once the volumes were made, so object changes refresh them.
    volumes_ready: bool,
    pod_ip: Option<std::net::Ipv4Addr>,
}

impl Worker {
    fn new(ctx: Arc<Context>, uid: &str, view: Arc<Mutex<Pod>>) -> Worker {
        let (tx, rx) = mpsc::unbounded_channel();
        Worker {
            uid: uid.to_string(),
            init: vec![],
            app: vec![],
            notify: Arc::new(Notify::new()),
            start_time: Some(Time(jiff::Timestamp::now())),
            failed: None,
            view,
            verdicts: tx,
            verdicts_rx: Some(rx),
            volumes: volumes::PodVolumes::new(ctx.volumes_root.join(uid)),
            volumes_ready: false,
            pod_ip: None,
            ctx,
        }
    }

    fn pod_ref(&self, pod: &Pod) -> PodRef {
        PodRef {
            uid: self.uid.clone(),
            name: name(pod).to_string(),
            namespace: namespace(pod).to_string(),
            host_network: pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
        }
    }

    fn event(
        &self,
        pod: &Pod,
        container: Option<&str>,
        kind: EventType,
        reason: &str,
        msg: String,
    ) {
        self.ctx.events.push(PodEvent {
            pod_uid: self.uid.clone(),
            namespace: namespace(pod).to_string(),
            pod: name(pod).to_string(),
            container: container.map(str::to_string),
            kind,
            reason: reason.to_string(),
            message: msg,
            count: 0,
            first_timestamp: String::new(),
            last_timestamp: String::new(),
            id: 0,
            seq: 0,
        });
    }

    /// Every tracked container, init ones first.
    fn indices(&self) -> Vec<(Kind, usize)> {
        (0..self.init.len())
            .map(|i| (Kind::Init, i))
            .chain((0..self.app.len()).map(|i| (Kind::App, i)))
            .collect()
    }

    fn tracked(&mut self, kind: Kind, i: usize) -> &mut Tracked {
        match kind {
            Kind::Init => &mut self.init[i],
            Kind::App => &mut self.app[i],
        }
    }

    async fn run(mut self, mut desired: watch::Receiver<Option<Arc<Pod>>>) {
        let mut last: Option<Arc<Pod>> = None;
        let Some(mut verdicts) = self.verdicts_rx.take() else {
            return;
        };
        let notify = self.notify.clone();
        let mut objects = self.ctx.objects.subscribe();
        objects.mark_unchanged();
        loop {
            let pod = desired.borrow_and_update().clone();
            let Some(pod) = pod else {
                self.stop_all_probes();
                if let Some(p) = last {
                    Box::pin(self.terminate(&p)).await;
                }
                return;
            };
            if last.is_none() {
                self.adopt(&pod);
            } else {
                Box::pin(self.update_spec(&pod)).await;
            }
            while let Ok(v) = verdicts.try_recv() {
                Box::pin(self.on_verdict(&pod, v)).await;
            }
            // Boxed: the (large) state of a pass exists only while it runs,
            // so an idle pod's task stays small.
            let wake = Box::pin(self.sync(&pod)).await;
            self.publish(&pod, false);
            last = Some(pod);
            tokio::select! {
                r = desired.changed() => if r.is_err() {
                    // The manager is gone (edge-rt is exiting): leave the
                    // containers running for the next edge-rt to adopt.
                    self.stop_all_probes();
                    return;
                },
                _ = notify.notified() => {}
                _ = objects.changed() => {
                    if let Some(p) = &last {
                        self.refresh_volumes(p);
                    }
                }
                _ = tokio::time::sleep(wake) => {}
            }
        }
    }

    /// Track the pod's containers, re-adopting any a previous edge-rt left.
    fn adopt(&mut self, pod: &Pod) {
        let Some(spec) = pod.spec.as_ref() else {
            return;
        };
        let mut mine: Vec<ContainerRecord> = self
            .ctx
            .rt
            .list()
            .into_iter()
            .filter(|r| r.pod.uid == self.uid)
            .collect();
        mine.sort_by_key(|r| r.attempt);
        let build = |c: &Container, this: &Self| {
            let mut t = Tracked::new(c);
            let attempts: Vec<&ContainerRecord> =
                mine.iter().filter(|r| r.name == c.name).collect();
            if let Some(cur) = attempts.last() {
                t.view.current = Some((*cur).clone());
                t.view.restart_count = cur.attempt;
                t.view.previous = attempts.iter().rev().nth(1).map(|r| (*r).clone());
                t.started = instant_of(cur.started_at.as_deref());
                t.exit_seen = cur.exit.is_some();
                if cur.exit.is_none() {
                    this.watch_exit(&cur.id);
                }
            }
            // Older attempts than the previous one are of no further use.
            for old in attempts.iter().rev().skip(2) {
                this.forget(old);
            }
            t
        };
        self.init = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| build(c, self))
            .collect();
        self.app = spec.containers.iter().map(|c| build(c, self)).collect();
        if !mine.is_empty() {
            tracing::info!(pod = name(pod), containers = mine.len(), "re-adopted pod");
        }
        self.pod_ip = self
            .ctx
            .network
            .as_ref()
            .and_then(|n| n.lease_of(&self.uid));
    }

    /// The same pod with a new spec: containers whose spec changed restart.
    async fn update_spec(&mut self, pod: &Pod) {
        let Some(spec) = pod.spec.as_ref() else {
            return;
        };
        let grace = grace_period(pod);
        for c in &spec.containers {
            let Some(i) = self.app.iter().position(|t| t.spec.name == c.name) else {
                continue;
            };
            if self.app[i].spec == *c {
                continue;
            }
            self.app[i].spec = c.clone();
            self.app[i].view.image = c.image.clone().unwrap_or_default();
            self.app[i].force_restart = true;
            if let Some(id) = self.app[i]
                .view
                .current
                .as_ref()
                .filter(|r| r.exit.is_none())
                .map(|r| r.id.clone())
            {
                self.event(
                    pod,
                    Some(&c.name),
                    EventType::Normal,
                    "Killing",
                    format!("Container {} definition changed, will be restarted", c.name),
                );
                let _ = self.ctx.rt.stop(&id, grace).await;
                self.refresh(Kind::App, i);
            }
        }
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

    /// ConfigMaps or Secrets changed: rewrite the pod's object volumes
    /// (each swap is atomic; unchanged ones are left alone).
    fn refresh_volumes(&mut self, pod: &Pod) {
        if !self.volumes_ready {
            return;
        }
        if let Err(msg) = self.volumes.sync(pod, &self.ctx.objects, &self.ctx.node) {
            self.event(
                pod,
                None,
                EventType::Warning,
                "FailedMount",
                format!("MountVolume.SetUp failed: {msg}"),
            );
        }
    }

    fn stop_all_probes(&mut self) {
        for t in self.init.iter_mut().chain(self.app.iter_mut()) {
            t.stop_probes();
        }
    }

    fn netns(&self, pod: &Pod) -> Option<std::path::PathBuf> {
        let host = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        (!host).then(|| self.ctx.rt.sandbox_dir(&self.uid).join("ns").join("net"))
    }

    /// Start the probes of a container that just started.
    fn start_probes(&mut self, pod: &Pod, kind: Kind, i: usize) {
        let netns = self.netns(pod);
        let (ctx, notify, verdicts, uid) = (
            self.ctx.clone(),
            self.notify.clone(),
            self.verdicts.clone(),
            self.uid.clone(),
        );
        let pod_ip = self.pod_ip.map(std::net::IpAddr::V4);
        let t = self.tracked(kind, i);
        t.stop_probes();
        let spec = t.spec.clone();
        let has_startup = kind == Kind::App && spec.startup_probe.is_some();
        t.view.started = !has_startup;
        t.view.ready = t.view.started && (kind == Kind::Init || spec.readiness_probe.is_none());
        if kind != Kind::App {
            return;
        }
        let Some(id) = t.view.current.as_ref().map(|r| r.id.clone()) else {
            return;
        };
        let (started_tx, started_rx) = watch::channel(!has_startup);
        t.started_tx = Some(started_tx);
        for (pk, probe) in [
            (probes::Kind::Startup, &spec.startup_probe),
            (probes::Kind::Liveness, &spec.liveness_probe),
            (probes::Kind::Readiness, &spec.readiness_probe),
        ] {
            let Some(probe) = probe else { continue };
            let settings = match Settings::new(probe, &spec, pk) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(pod = name(pod), container = %spec.name, error = %e, "probe not run");
                    continue;
                }
            };
            let task = ProbeTask {
                rt: ctx.rt.clone(),
                container_id: id.clone(),
                netns: netns.clone(),
                pod_ip,
                events: ctx.events.clone(),
                subject: probes::Subject {
                    pod_uid: uid.clone(),
                    namespace: namespace(pod).to_string(),
                    pod: name(pod).to_string(),
                    container: spec.name.clone(),
                },
                verdicts: verdicts.clone(),
                notify: notify.clone(),
            };
            let h = tokio::spawn(task.run(pk, settings, started_rx.clone()));
            t.probes.push(h.abort_handle());
        }
    }

    /// A probe crossed a threshold.
    async fn on_verdict(&mut self, pod: &Pod, v: Verdict) {
        let Some(i) = self.app.iter().position(|t| {
            t.view
                .current
                .as_ref()
                .is_some_and(|r| r.id == v.container_id && r.exit.is_none())
        }) else {
            return; // about a run that is over
        };
        let grace = grace_period(pod);
        let t = &mut self.app[i];
        match (v.kind, v.success) {
            (probes::Kind::Startup, true) => {
                t.view.started = true;
                t.view.ready = t.spec.readiness_probe.is_none();
                if let Some(tx) = &t.started_tx {
                    let _ = tx.send(true);
                }
            }
            (probes::Kind::Readiness, ok) => t.view.ready = ok && t.view.started,
            (k, false) => {
                let (name, spec) = (t.spec.name.clone(), t.spec.clone());
                t.view.ready = false;
                let msg = format!(
                    "Container {name} failed {} probe, will be restarted",
                    k.name().to_lowercase()
                );
                self.event(pod, Some(&name), EventType::Normal, "Killing", msg);
                // Liveness kills restart whatever the policy, as the kubelet does.
                self.app[i].force_restart = pod_restarts(pod);
                self.stop_container(pod, &spec, &v.container_id, grace)
                    .await;
                self.refresh(Kind::App, i);
            }
            _ => {}
        }
    }

    /// postStart: run after the start; a failure kills the container.
    async fn post_start(&mut self, pod: &Pod, kind: Kind, i: usize) {
        let t = self.tracked(kind, i);
        let (spec, id) = (
            t.spec.clone(),
            t.view.current.as_ref().map(|r| r.id.clone()),
        );
        let (Some(h), Some(id)) = (
            spec.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()),
            id,
        ) else {
            return;
        };
        let grace = grace_period(pod);
        let r = self
            .run_hook(pod, &spec, &id, h, grace.max(Duration::from_secs(2)))
            .await;
        if let Err(msg) = r {
            self.event(
                pod,
                Some(&spec.name),
                EventType::Warning,
                "FailedPostStartHook",
                format!("PostStartHook failed: {msg}"),
            );
            let _ = self.ctx.rt.stop(&id, grace).await;
            self.refresh(kind, i);
        }
    }

    /// Stop every container for good: the pod is Failed with reason Evicted.
    async fn evict(&mut self, pod: &Pod, msg: String) {
        self.event(pod, None, EventType::Warning, "Evicted", msg.clone());
        self.failed = Some(("Evicted".into(), msg));
        self.stop_all_probes();
        let grace = grace_period(pod);
        let running: Vec<(Container, String)> = self
            .init
            .iter()
            .chain(self.app.iter())
            .filter_map(|t| {
                Some((
                    t.spec.clone(),
                    t.view
                        .current
                        .as_ref()
                        .filter(|r| r.exit.is_none())?
                        .id
                        .clone(),
                ))
            })
            .collect();
        for (spec, id) in running {
            self.event(
                pod,
                Some(&spec.name),
                EventType::Normal,
                "Killing",
                format!("Stopping container {}", spec.name),
            );
            self.stop_container(pod, &spec, &id, grace).await;
        }
        for (kind, i) in self.indices() {
            self.refresh(kind, i);
        }
    }

    /// Run a lifecycle hook against container `id` within `timeout`.
    async fn run_hook(
        &self,
        pod: &Pod,
        spec: &Container,
        id: &str,
        h: &k8s_openapi::api::core::v1::LifecycleHandler,
        timeout: Duration,
    ) -> Result<(), String> {
        let action = actions::Action::of_hook(h, spec)?;
        let target = actions::Target {
            rt: &self.ctx.rt,
            container_id: id,
            netns: self.netns(pod),
            pod_ip: self.pod_ip.map(std::net::IpAddr::V4),
        };
        actions::run(&action, &target, timeout).await
    }

    /// preStop (within the grace period), then SIGTERM with what is left of
    /// it (at least 2 s, as the kubelet allows), then SIGKILL.
    async fn stop_container(&self, pod: &Pod, spec: &Container, id: &str, grace: Duration) {
        let t0 = Instant::now();
        if let Some(h) = spec.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()) {
            if let Err(msg) = self.run_hook(pod, spec, id, h, grace).await {
                self.event(
                    pod,
                    Some(&spec.name),
                    EventType::Warning,
                    "FailedPreStopHook",
                    format!("PreStopHook failed: {msg}"),
                );
            }
        }
        let left = grace
            .saturating_sub(t0.elapsed())
            .max(Duration::from_secs(2).min(grace));
        if let Err(e) = self.ctx.rt.stop(id, left).await {
            tracing::warn!(id, error = %e, "stopping container");
        }
    }

    fn watch_exit(&self, id: &str) {
        let (rt, notify, id) = (self.ctx.rt.clone(), self.notify.clone(), id.to_string());
        tokio::spawn(async move {
            let _ = rt.wait(&id).await;
            notify.notify_one();
        });
    }

    /// Remove a container this worker no longer needs, and its logs.
    fn forget(&self, r: &ContainerRecord) {
        if let Err(e) = self.ctx.rt.remove(&r.id) {
            tracing::warn!(id = %r.id, error = %e, "removing container");
        }
        for p in crate::runtime::logs::files_of(&r.log_path) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Pick up the runtime's latest record of the container (its exit).
    fn refresh(&mut self, kind: Kind, i: usize) {
        let id = self
            .tracked(kind, i)
            .view
            .current
            .as_ref()
            .map(|r| r.id.clone());
        if let Some(r) = id.and_then(|id| self.ctx.rt.get(&id)) {
            self.tracked(kind, i).view.current = Some(r);
        }
    }

    /// One pass: look at every container and do what is due. Returns how
    /// long until something is due again.
    async fn sync(&mut self, pod: &Pod) -> Duration {
        let now = Instant::now();
        for (kind, i) in self.indices() {
            self.refresh(kind, i);
            let t = self.tracked(kind, i);
            if t.exit_code().is_some() && !t.exit_seen {
                t.exit_seen = true;
                t.view.ready = false;
                t.stop_probes();
                let started = t.started.unwrap_or(now);
                t.backoff.record_exit(started, now);
            }
        }
        if self.failed.is_some() {
            return IDLE;
        }
        if let Some(msg) = self.volumes.over_limit(pod) {
            self.evict(pod, msg).await;
            return IDLE;
        }
        // Disk emptyDirs with a limit are measured as the kubelet does, every
        // 10 s.
        let housekeeping = if volumes::PodVolumes::limited(pod).is_empty() {
            IDLE
        } else {
            Duration::from_secs(10)
        };
        let policy = restart_policy(pod);

        for i in 0..self.init.len() {
            let t = &self.init[i];
            if t.view.running() {
                return IDLE;
            }
            match t.exit_code() {
                Some(0) => continue,
                Some(code) if policy == "Never" => {
                    let name = t.spec.name.clone();
                    self.failed = Some((
                        "InitContainerFailed".into(),
                        format!("init container {name} exited with {code}"),
                    ));
                    return IDLE;
                }
                _ => return self.start_or_wait(pod, Kind::Init, i, now).await,
            }
        }

        let mut wake = housekeeping;
        for i in 0..self.app.len() {
            let t = &self.app[i];
            if t.view.running() {
                continue;
            }
            let due = match t.exit_code() {
                None => true,
                Some(code) => {
                    t.force_restart
                        || match policy {
                            "Never" => false,
                            "OnFailure" => code != 0,
                            _ => true,
                        }
                }
            };
            if due {
                wake = wake.min(self.start_or_wait(pod, Kind::App, i, now).await);
            }
        }
        wake
    }

    /// Start the container unless it is in back-off; returns when to look again.
    async fn start_or_wait(&mut self, pod: &Pod, kind: Kind, i: usize, now: Instant) -> Duration {
        let t = self.tracked(kind, i);
        if t.force_restart {
            t.backoff = Backoff::default();
        }
        let wait = t.backoff.remaining(now);
        if !wait.is_zero() {
            let (name, image) = (t.spec.name.clone(), t.view.image.clone());
            let create_failed = t.view.waiting.as_ref().is_some_and(|(r, _)| {
                r.starts_with("CreateContainer")
                    || r == "ContainerCreating"
                    || r == "ErrImageNeverPull"
            });
            if t.pull_failed {
                let msg = format!("Back-off pulling image \"{image}\"");
                t.view.waiting = Some(("ImagePullBackOff".into(), msg.clone()));
                self.event(pod, Some(&name), EventType::Warning, "BackOff", msg);
            } else if !create_failed {
                // A start that failed keeps its reason while it waits; a
                // container that ran and ended is in a crash loop.
                let msg = format!(
                    "back-off {}s restarting failed container={name} pod={}",
                    t.backoff.in_force().as_secs(),
                    self::name(pod)
                );
                t.view.waiting = Some(("CrashLoopBackOff".into(), msg));
                self.event(
                    pod,
                    Some(&name),
                    EventType::Warning,
                    "BackOff",
                    "Back-off restarting failed container".into(),
                );
            }
            return wait;
        }
        self.start(pod, kind, i).await;
        let volumes_ready = self.volumes_ready;
        let t = self.tracked(kind, i);
        if t.view.waiting.is_some() && !volumes_ready && !t.pull_failed {
            // The pod's sandbox or volumes are not ready (an object or a
            // token not here yet): no crash-loop back-off, as the kubelet's
            // volume manager has none; a change of objects wakes the worker
            // at once, and it looks again soon anyway.
            return SETUP_RETRY;
        }
        if t.view.waiting.is_some() {
            // The start failed: try again after the back-off, and look again
            // within a second so the status shows the back-off (ErrImagePull
            // becomes ImagePullBackOff, as the kubelet reports it).
            t.backoff.record_exit(now, Instant::now());
            return t
                .backoff
                .remaining(Instant::now())
                .min(Duration::from_secs(1))
                .max(Duration::from_millis(10));
        }
        IDLE
    }

    /// A start that did not get as far as a running container: a Warning
    /// event, and the reason the container waits with.
    fn start_failed(
        &mut self,
        pod: &Pod,
        kind: Kind,
        i: usize,
        container: Option<&str>,
        (event_reason, event_msg): (&str, String),
        (waiting, msg): (&str, String),
    ) {
        self.event(pod, container, EventType::Warning, event_reason, event_msg);
        self.tracked(kind, i).view.waiting = Some((waiting.into(), msg));
    }

    async fn start(&mut self, pod: &Pod, kind: Kind, i: usize) {
        let pref = self.pod_ref(pod);
        let spec = self.tracked(kind, i).spec.clone();
        let image_ref = spec.image.clone().unwrap_or_default();
        let policy = PullPolicy::from_k8s(spec.image_pull_policy.as_deref(), &image_ref);
        let present = self.ctx.images.resolve(&image_ref).ok().flatten().is_some();
        let will_pull =
            matches!(policy, PullPolicy::Always) || (!present && policy != PullPolicy::Never);
        if will_pull {
            self.event(
                pod,
                Some(&spec.name),
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
            &image_ref,
            policy,
            None,
            &Progress::default(),
        ))
        .await;
        // Offline, Always would keep a node from running what it already
        // has (a `:latest` image after a reboot with no network). A registry
        // that cannot be reached (not one that refuses) falls back to the
        // image on the node, with a Warning saying so.
        let mut from_cache = false;
        let pulled = match pulled {
            Err(crate::image::ImageError::Unreachable { registry, detail }) if present => {
                match self.ctx.images.resolve(&image_ref).ok().flatten() {
                    Some(img) => {
                        self.event(
                            pod,
                            Some(&spec.name),
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
        let image = match pulled {
            Ok(img) => {
                if will_pull && !from_cache {
                    self.event(
                        pod,
                        Some(&spec.name),
                        EventType::Normal,
                        "Pulled",
                        format!(
                            "Successfully pulled image \"{image_ref}\" in {:.3}s",
                            started.elapsed().as_secs_f64()
                        ),
                    );
                }
                img
            }
            Err(e) => {
                let msg = e.to_string();
                let reason = if matches!(e, crate::image::ImageError::NeverPull(_)) {
                    "ErrImageNeverPull"
                } else {
                    "ErrImagePull"
                };
                let ev = format!("Failed to pull image \"{image_ref}\": {msg}");
                self.start_failed(
                    pod,
                    kind,
                    i,
                    Some(&spec.name),
                    ("Failed", ev),
                    (reason, msg),
                );
                // Never is not a pull that may work later: its reason stays.
                self.tracked(kind, i).pull_failed = reason == "ErrImagePull";
                return;
            }
        };
        self.tracked(kind, i).pull_failed = false;
        if let Err(msg) = self.ensure_network(pod) {
            let ev = format!("Failed to create pod sandbox: {msg}");
            self.start_failed(
                pod,
                kind,
                i,
                None,
                ("FailedCreatePodSandBox", ev),
                ("ContainerCreating", msg),
            );
            return;
        }
        if let Err(msg) = self.volumes.sync(pod, &self.ctx.objects, &self.ctx.node) {
            let ev = format!("MountVolume.SetUp failed: {msg}");
            self.start_failed(
                pod,
                kind,
                i,
                Some(&spec.name),
                ("FailedMount", ev),
                ("ContainerCreating", msg),
            );
            return;
        }
        self.volumes_ready = true;
        let mut at = self.ctx.node.clone();
        at.pod_ip = self.pod_ip.map(|ip| ip.to_string());
        let prepared = env::resolve(pod, &spec, &self.ctx.objects, &at)
            .and_then(|e| self.volumes.mounts(pod, &spec).map(|m| (e, m)));
        let (extra_env, mounts) = match prepared {
            Ok(x) => x,
            Err(msg) => {
                let ev = format!("Error: {msg}");
                self.start_failed(
                    pod,
                    kind,
                    i,
                    Some(&spec.name),
                    ("Failed", ev),
                    ("CreateContainerConfigError", msg),
                );
                return;
            }
        };
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
        };
        match self.ctx.rt.run(req) {
            Ok(rec) => {
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
            }
            Err(e) => {
                let reason = match e {
                    RuntimeError::Config(_) => "CreateContainerConfigError",
                    _ => "CreateContainerError",
                };
                let msg = describe(&e);
                let ev = format!("Error: {msg}");
                self.start_failed(
                    pod,
                    kind,
                    i,
                    Some(&spec.name),
                    ("Failed", ev),
                    (reason, msg),
                );
            }
        }
    }

    /// The pod was removed: stop its containers (grace period), then remove
    /// them, their logs and the sandbox.
    async fn terminate(&mut self, pod: &Pod) {
        self.publish(pod, true);
        let asked = self
            .ctx
            .deletion_grace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.uid);
        // The deletion's grace period if shorter, as a kubelet takes it.
        let grace = match asked {
            Some(s) => grace_period(pod).min(Duration::from_secs(s.max(0) as u64)),
            None => grace_period(pod),
        };
        let running: Vec<(String, String)> = self
            .init
            .iter()
            .chain(self.app.iter())
            .filter_map(|t| t.view.current.as_ref())
            .filter(|r| r.exit.is_none())
            .map(|r| (r.id.clone(), r.name.clone()))
            .collect();
        for (_, name) in &running {
            self.event(
                pod,
                Some(name),
                EventType::Normal,
                "Killing",
                format!("Stopping container {name}"),
            );
        }
        let specs: Vec<Container> = self
            .init
            .iter()
            .chain(self.app.iter())
            .map(|t| t.spec.clone())
            .collect();
        let me = &*self;
        futures_util::future::join_all(running.iter().map(|(id, name)| {
            let spec = specs
                .iter()
                .find(|c| &c.name == name)
                .cloned()
                .unwrap_or_default();
            async move { me.stop_container(pod, &spec, id, grace).await }
        }))
        .await;
        let rt = &self.ctx.rt;
        for r in rt.list().into_iter().filter(|r| r.pod.uid == self.uid) {
            self.forget(&r);
        }
        if let Some(n) = &self.ctx.network {
            n.detach(&self.uid);
        }
        if let Err(e) = rt.remove_sandbox(&self.uid) {
            tracing::warn!(pod = name(pod), error = %e, "removing pod sandbox");
        }
        let _ = std::fs::remove_dir_all(rt.pod_log_dir(&self.pod_ref(pod)));
        self.volumes.remove();
        tracing::info!(pod = name(pod), "pod removed");
    }

    fn publish(&self, pod: &Pod, terminating: bool) {
        let initialized = self.init.iter().all(|t| t.exit_code() == Some(0));
        let init: Vec<ContainerView> = self.init.iter().map(|t| t.view.clone()).collect();
        let app: Vec<ContainerView> = self.app.iter().map(|t| t.view.clone()).collect();
        let st = status::pod_status(&StatusInput {
            pod,
            init: &init,
            app: &app,
            initialized,
            failed: self.failed.clone(),
            pod_ips: self.pod_ip.iter().map(|ip| ip.to_string()).collect(),
            host_ip: self.ctx.node.host_ip.clone(),
            start_time: self.start_time.clone(),
            terminating,
        });
        let mut p = pod.clone();
        p.status = Some(st);
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = p;
        self.ctx
            .status_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.ctx.status_changed.notify_one();
    }
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

/// Whether the pod's containers restart at all after a kill.
fn pod_restarts(pod: &Pod) -> bool {
    restart_policy(pod) != "Never"
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
