//! PodStatus as the kubelet reports it, computed from what a pod worker
//! knows of its containers. Pure: the same inputs give the same status.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::plan::RestartPolicy;
use crate::runtime::ContainerRecord;

/// What the worker knows of one container (init or app).
#[derive(Debug, Clone, Default)]
pub struct ContainerView {
    pub name: String,
    pub image: String,
    /// The latest attempt, running or exited.
    pub current: Option<ContainerRecord>,
    /// The attempt before it, for lastState.
    pub previous: Option<ContainerRecord>,
    pub restart_count: u32,
    /// Why it is not running, when it is not: (reason, message).
    pub waiting: Option<(String, String)>,
    pub ready: bool,
    /// Startup probe passed (or none).
    pub started: bool,
}

fn time(rfc3339: &str) -> Option<Time> {
    rfc3339.parse::<jiff::Timestamp>().ok().map(Time)
}

pub fn container_id(r: &ContainerRecord) -> String {
    format!("edge-rt://{}", r.id)
}

fn terminated(r: &ContainerRecord) -> Option<ContainerState> {
    let e = r.exit.as_ref()?;
    Some(ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: e.exit_code,
            signal: e.signal,
            reason: Some(e.reason.clone()),
            started_at: r.started_at.as_deref().and_then(time),
            finished_at: time(&e.finished_at),
            container_id: Some(container_id(r)),
            message: None,
        }),
        ..Default::default()
    })
}

impl ContainerView {
    pub fn running(&self) -> bool {
        self.current.as_ref().is_some_and(|r| r.exit.is_none())
    }

    pub fn status(&self) -> ContainerStatus {
        let state = match (&self.waiting, &self.current) {
            (Some((reason, message)), _) => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: (!message.is_empty()).then(|| message.clone()),
                }),
                ..Default::default()
            },
            (None, Some(r)) if r.exit.is_none() => ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: r.started_at.as_deref().and_then(time),
                }),
                ..Default::default()
            },
            (None, Some(r)) => terminated(r).unwrap_or_default(),
            (None, None) => ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..Default::default()
            },
        };
        // lastState: the attempt before the one shown in state.
        let last = if self.waiting.is_some() {
            self.current.as_ref().and_then(terminated)
        } else {
            self.previous.as_ref().and_then(terminated)
        };
        ContainerStatus {
            name: self.name.clone(),
            image: self.image.clone(),
            image_id: self
                .current
                .as_ref()
                .map(|r| format!("{}@{}", r.image, r.image_digest))
                .unwrap_or_default(),
            container_id: self.current.as_ref().map(container_id),
            ready: self.ready,
            started: Some(self.running() && self.started),
            restart_count: self.restart_count as i32,
            state: Some(state),
            last_state: last,
            ..Default::default()
        }
    }
}

/// Everything the status is made of.
pub struct StatusInput<'a> {
    pub pod: &'a Pod,
    pub init: &'a [ContainerView],
    pub app: &'a [ContainerView],
    /// All init containers succeeded.
    pub initialized: bool,
    /// The pod failed for good (an init container failed under Never, ...).
    pub failed: Option<(String, String)>,
    pub pod_ips: Vec<String>,
    pub host_ip: Option<String>,
    pub start_time: Option<Time>,
    /// The pod's containers are being stopped for its deletion.
    pub terminating: bool,
}

/// The pod phase from its containers, as the kubelet's getPhase works it out.
pub fn phase(i: &StatusInput) -> &'static str {
    if i.failed.is_some() {
        return "Failed";
    }
    if !i.initialized {
        return "Pending";
    }
    let policy = RestartPolicy::of(i.pod);
    let (mut running, mut waiting, mut succeeded, mut failed) = (0, 0, 0, 0);
    for c in i.app {
        match &c.current {
            Some(r) if r.exit.is_none() => running += 1,
            Some(r) => {
                let code = r.exit.as_ref().map_or(-1, |e| e.exit_code);
                let ok = code == 0;
                if policy.restarts(code) {
                    running += 1; // restarting, as the kubelet counts it
                } else if ok {
                    succeeded += 1;
                } else {
                    failed += 1;
                }
            }
            None => waiting += 1,
        }
    }
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if failed > 0 {
        "Failed"
    } else if succeeded > 0 {
        "Succeeded"
    } else {
        "Pending"
    }
}

fn condition(kind: &str, ok: bool, reason: Option<&str>, since: &Option<Time>) -> PodCondition {
    PodCondition {
        type_: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: if ok { None } else { reason.map(str::to_string) },
        last_transition_time: since.clone(),
        ..Default::default()
    }
}

pub fn pod_status(i: &StatusInput) -> PodStatus {
    let phase = phase(i);
    let done = phase == "Succeeded" || phase == "Failed";
    let containers_ready = !i.terminating && i.app.iter().all(|c| c.ready);
    let not_ready_reason = if done {
        "PodCompleted"
    } else {
        "ContainersNotReady"
    };
    let conditions = vec![
        condition("PodScheduled", true, None, &i.start_time),
        condition(
            "Initialized",
            i.initialized,
            Some("ContainersNotInitialized"),
            &i.start_time,
        ),
        condition(
            "ContainersReady",
            containers_ready,
            Some(not_ready_reason),
            &i.start_time,
        ),
        condition(
            "Ready",
            containers_ready,
            Some(not_ready_reason),
            &i.start_time,
        ),
    ];
    PodStatus {
        phase: Some(phase.into()),
        reason: i.failed.as_ref().map(|f| f.0.clone()),
        message: i.failed.as_ref().map(|f| f.1.clone()),
        conditions: Some(conditions),
        host_ip: i.host_ip.clone(),
        pod_ip: i.pod_ips.first().cloned(),
        pod_ips: (!i.pod_ips.is_empty()).then(|| {
            i.pod_ips
                .iter()
                .map(|ip| PodIP { ip: ip.clone() })
                .collect()
        }),
        start_time: i.start_time.clone(),
        init_container_statuses: (!i.init.is_empty())
            .then(|| i.init.iter().map(ContainerView::status).collect()),
        container_statuses: Some(i.app.iter().map(ContainerView::status).collect()),
        qos_class: Some(qos_class(i.pod).into()),
        ..Default::default()
    }
}

/// Guaranteed, Burstable or BestEffort, from the containers' requests and
/// limits (the kubelet's rules, for cpu and memory).
pub fn qos_class(pod: &Pod) -> &'static str {
    let Some(spec) = pod.spec.as_ref() else {
        return "BestEffort";
    };
    let mut any = false;
    let mut guaranteed = true;
    for c in &spec.containers {
        let r = c.resources.clone().unwrap_or_default();
        let limits = r.limits.unwrap_or_default();
        let requests = r.requests.unwrap_or_default();
        for res in ["cpu", "memory"] {
            let (l, q) = (limits.get(res), requests.get(res).or(limits.get(res)));
            any |= l.is_some() || q.is_some();
            guaranteed &= l.is_some() && l == q;
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::{ExitInfo, PodRef};
    use serde_json::json;

    fn pod(policy: &str, resources: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"restartPolicy": policy, "containers": [{"name": "c", "resources": resources}]}
        }))
        .unwrap()
    }

    fn record(attempt: u32, exit: Option<i32>) -> ContainerRecord {
        ContainerRecord {
            id: format!("c-{attempt}"),
            name: "c".into(),
            pod: PodRef {
                uid: "u".into(),
                name: "p".into(),
                namespace: "default".into(),
                host_network: false,
                resolv_conf: None,
            },
            attempt,
            image: "busybox:latest".into(),
            image_digest: "sha256:ab".into(),
            layers: vec![],
            volume_images: vec![],
            volume_layers: vec![],
            pid: Some(10),
            pid_start: None,
            created_at: "2026-12-02T00:00:00Z".into(),
            started_at: Some("2026-12-02T00:00:01Z".into()),
            log_path: "/dev/null".into(),
            cgroup: String::new(),
            exit: exit.map(|code| ExitInfo {
                exit_code: code,
                signal: None,
                reason: if code == 0 { "Completed" } else { "Error" }.into(),
                finished_at: "2026-12-02T00:00:05Z".into(),
            }),
            seccomp_caps: None,
            drop_sys_admin: false,
        }
    }

    fn view(current: Option<ContainerRecord>) -> ContainerView {
        ContainerView {
            name: "c".into(),
            image: "busybox:latest".into(),
            current,
            started: true,
            ..Default::default()
        }
    }

    fn input<'a>(pod: &'a Pod, app: &'a [ContainerView]) -> StatusInput<'a> {
        StatusInput {
            pod,
            init: &[],
            app,
            initialized: true,
            failed: None,
            pod_ips: vec!["10.88.0.2".into()],
            host_ip: Some("192.168.1.2".into()),
            start_time: None,
            terminating: false,
        }
    }

    #[test]
    fn the_phase_follows_the_containers_and_the_restart_policy() {
        let never = pod("Never", json!({}));
        let always = pod("Always", json!({}));
        let on_failure = pod("OnFailure", json!({}));
        let phase_of = |p: &Pod, v: ContainerView| phase(&input(p, &[v]));
        assert_eq!(phase_of(&always, view(None)), "Pending");
        assert_eq!(phase_of(&always, view(Some(record(0, None)))), "Running");
        assert_eq!(
            phase_of(&never, view(Some(record(0, Some(0))))),
            "Succeeded"
        );
        assert_eq!(phase_of(&never, view(Some(record(0, Some(2))))), "Failed");
        // Exited but restarting: Running, as the kubelet counts it.
        assert_eq!(phase_of(&always, view(Some(record(0, Some(0))))), "Running");
        assert_eq!(
            phase_of(&on_failure, view(Some(record(0, Some(1))))),
            "Running"
        );
        assert_eq!(
            phase_of(&on_failure, view(Some(record(0, Some(0))))),
            "Succeeded"
        );
        let mut i = input(&always, &[]);
        i.initialized = false;
        assert_eq!(phase(&i), "Pending");
        i.failed = Some(("Evicted".into(), "over its limit".into()));
        assert_eq!(phase(&i), "Failed");
    }

    #[test]
    fn a_waiting_container_shows_its_reason_and_the_run_before_as_last_state() {
        let mut v = view(Some(record(1, Some(1))));
        v.previous = Some(record(0, Some(1)));
        v.restart_count = 1;
        v.waiting = Some(("CrashLoopBackOff".into(), "back-off 10s".into()));
        let s = v.status();
        let w = s.state.unwrap().waiting.unwrap();
        assert_eq!(w.reason.as_deref(), Some("CrashLoopBackOff"));
        let last = s.last_state.unwrap().terminated.unwrap();
        assert_eq!(last.container_id.as_deref(), Some("edge-rt://c-1"));
        assert_eq!(s.restart_count, 1);
        assert_eq!(s.started, Some(false));
        assert_eq!(s.image_id, "busybox:latest@sha256:ab");
    }

    #[test]
    fn a_running_container_shows_the_run_before_as_last_state() {
        let mut v = view(Some(record(1, None)));
        v.previous = Some(record(0, Some(137)));
        v.ready = true;
        let s = v.status();
        assert!(s.state.unwrap().running.is_some());
        let last = s.last_state.unwrap().terminated.unwrap();
        assert_eq!(last.exit_code, 137);
        assert_eq!(s.started, Some(true));
        assert!(s.ready);
        // Never run yet: ContainerCreating.
        let s = view(None).status();
        assert_eq!(
            s.state.unwrap().waiting.unwrap().reason.as_deref(),
            Some("ContainerCreating")
        );
    }

    #[test]
    fn ready_conditions_follow_the_containers_and_drop_while_terminating() {
        let p = pod("Always", json!({}));
        let mut v = view(Some(record(0, None)));
        v.ready = true;
        let app = [v];
        let cond = |st: &PodStatus, t: &str| {
            st.conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone()))
                .unwrap()
        };
        let st = pod_status(&input(&p, &app));
        assert_eq!(cond(&st, "Ready"), ("True".into(), None));
        assert_eq!(st.pod_ip.as_deref(), Some("10.88.0.2"));
        assert_eq!(st.host_ip.as_deref(), Some("192.168.1.2"));
        let mut i = input(&p, &app);
        i.terminating = true;
        let st = pod_status(&i);
        assert_eq!(
            cond(&st, "Ready"),
            ("False".into(), Some("ContainersNotReady".into()))
        );
        let done = [view(Some(record(0, Some(0))))];
        let never = pod("Never", json!({}));
        let st = pod_status(&input(&never, &done));
        assert_eq!(
            cond(&st, "ContainersReady"),
            ("False".into(), Some("PodCompleted".into()))
        );
    }

    #[test]
    fn qos_classes_as_the_kubelet_assigns_them() {
        let same = json!({"limits": {"cpu": "1", "memory": "64Mi"}, "requests": {"cpu": "1", "memory": "64Mi"}});
        assert_eq!(qos_class(&pod("Always", same)), "Guaranteed");
        // Limits alone: requests default to them.
        let limits = json!({"limits": {"cpu": "1", "memory": "64Mi"}});
        assert_eq!(qos_class(&pod("Always", limits)), "Guaranteed");
        let requests = json!({"requests": {"cpu": "100m"}});
        assert_eq!(qos_class(&pod("Always", requests)), "Burstable");
        assert_eq!(qos_class(&pod("Always", json!({}))), "BestEffort");
    }
}
