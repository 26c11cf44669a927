//! A pod's worker: the only code that touches the pod's containers. Its
//! loop takes what the manager wants, asks the planner ([`super::plan`])
//! what is due, carries it out (the start path in [`start`]), and
//! publishes the pod's status after every step.

mod start;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::{mpsc, watch, Notify};

use super::actions;
use super::backoff::Backoff;
use super::events::{EventType, PodEvent};
use super::manager::Want;
use super::plan::{self, Kind, Plan, RestartPolicy, Step};
use super::probes::{self, ProbeTask, Settings, Verdict};
use super::status::{self, ContainerView, StatusInput};
use super::{grace_period, name, namespace, volumes, Context, IDLE, SETUP_RETRY};
use crate::runtime::{ContainerRecord, PodRef};

/// One container of the pod as the worker tracks it.
struct Tracked {
    view: ContainerView,
    spec: Container,
    backoff: Backoff,
    started: Option<Instant>,
    /// The exit of `view.current` went into the back-off already.
    exit_seen: bool,
    /// The last start failed pulling this image (the container's, or an
    /// image volume's).
    pull_failed: Option<String>,
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
            pull_failed: None,
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

pub(super) struct Worker {
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
    pub(super) fn new(ctx: Arc<Context>, uid: &str, view: Arc<Mutex<Pod>>) -> Worker {
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
            resolv_conf: Some(super::dns::resolv_conf(
                pod,
                &self.ctx.dns,
                &std::fs::read_to_string(&self.ctx.dns.resolv_conf).unwrap_or_default(),
            )),
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

    pub(super) async fn run(mut self, mut desired: watch::Receiver<Want>) {
        let mut last: Option<Arc<Pod>> = None;
        let Some(mut verdicts) = self.verdicts_rx.take() else {
            return;
        };
        let notify = self.notify.clone();
        let mut objects = self.ctx.objects.subscribe();
        objects.mark_unchanged();
        loop {
            let want = desired.borrow_and_update().clone();
            let pod = match want {
                Want::Run(pod) => pod,
                Want::Stop { grace_seconds } => {
                    self.stop_all_probes();
                    if let Some(p) = last {
                        Box::pin(self.terminate(&p, grace_seconds)).await;
                    }
                    return;
                }
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
                // A liveness kill restarts whatever the exit code (the kill's), unless
                // the policy is Never, as the kubelet does.
                self.app[i].force_restart = RestartPolicy::of(pod) != RestartPolicy::Never;
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

    /// One pass: look at every container, ask the planner what is due,
    /// and do it. Returns how long until something is due again.
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
        let state = |t: &Tracked| plan::State {
            running: t.view.running(),
            exit_code: t.exit_code(),
            force_restart: t.force_restart,
            backoff: t.backoff.remaining(now),
        };
        let init: Vec<plan::State> = self.init.iter().map(state).collect();
        let app: Vec<plan::State> = self.app.iter().map(state).collect();
        let policy = RestartPolicy::of(pod);
        match plan::plan(policy, &init, &app) {
            Plan::Wait => housekeeping,
            Plan::InitFailed { index, code } => {
                let name = self.init[index].spec.name.clone();
                self.failed = Some((
                    "InitContainerFailed".into(),
                    format!("init container {name} exited with {code}"),
                ));
                IDLE
            }
            Plan::Due(steps) => {
                let mut wake = housekeeping;
                for (kind, i, step) in steps {
                    wake = wake.min(self.carry_out(pod, kind, i, step, now).await);
                }
                wake
            }
        }
    }

    /// Start a container the plan says is due, or show why it waits;
    /// returns when to look again.
    async fn carry_out(
        &mut self,
        pod: &Pod,
        kind: Kind,
        i: usize,
        step: Step,
        now: Instant,
    ) -> Duration {
        if let Step::BackOff(wait) = step {
            self.show_back_off(pod, kind, i);
            return wait;
        }
        let t = self.tracked(kind, i);
        if t.force_restart {
            t.backoff = Backoff::default();
        }
        let failure = match self.start(pod, kind, i).await {
            Ok(()) => return IDLE,
            Err(f) => f,
        };
        // The pod's sandbox or volumes are not ready (an object or a token
        // not here yet): no crash-loop back-off, as the kubelet's volume
        // manager has none; a change of objects wakes the worker at once,
        // and it looks again soon anyway.
        let setup = failure.is_setup();
        self.start_failed(pod, kind, i, failure);
        if setup {
            return SETUP_RETRY;
        }
        // The start failed: try again after the back-off, and look again
        // within a second so the status shows the back-off (ErrImagePull
        // becomes ImagePullBackOff, as the kubelet reports it).
        let t = self.tracked(kind, i);
        t.backoff.record_exit(now, Instant::now());
        t.backoff
            .remaining(Instant::now())
            .min(Duration::from_secs(1))
            .max(Duration::from_millis(10))
    }

    /// A container waiting out its back-off: why, in its status and an
    /// event.
    fn show_back_off(&mut self, pod: &Pod, kind: Kind, i: usize) {
        let t = self.tracked(kind, i);
        let name = t.spec.name.clone();
        let create_failed = t.view.waiting.as_ref().is_some_and(|(r, _)| {
            r.starts_with("CreateContainer") || r == "ContainerCreating" || r == "ErrImageNeverPull"
        });
        if let Some(image) = t.pull_failed.clone() {
            let msg = format!("Back-off pulling image \"{image}\"");
            t.view.waiting = Some(("ImagePullBackOff".into(), msg.clone()));
            self.event(pod, Some(&name), EventType::Warning, "BackOff", msg);
        } else if !create_failed {
            // A start that failed keeps its reason while it waits; a
            // container that ran and ended is in a crash loop.
            let msg = format!(
                "back-off {}s restarting failed container={name} pod={}",
                t.backoff.in_force().as_secs(),
                super::name(pod)
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
    }
    /// The pod was removed: stop its containers (grace period), then remove
    /// them, their logs and the sandbox.
    async fn terminate(&mut self, pod: &Pod, asked: Option<i64>) {
        self.publish(pod, true);
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
        self.ctx.accelerators.release(&self.uid);
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
        // A pod that ran to its end holds no devices, as the kubelet's
        // device manager counts only active pods.
        if matches!(st.phase.as_deref(), Some("Succeeded" | "Failed")) && !terminating {
            self.ctx.accelerators.release(&self.uid);
        }
        let mut p = pod.clone();
        p.status = Some(st);
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = p;
        self.ctx
            .status_generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.ctx.status_changed.notify_one();
    }
}
