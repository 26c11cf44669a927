//! PodStatus as the kubelet reports it, computed from what a pod worker
//! knows of its containers. Pure: the same inputs give the same status.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

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

fn restart_policy(pod: &Pod) -> &str {
    pod.spec
        .as_ref()
        .and_then(|s| s.restart_policy.as_deref())
        .unwrap_or("Always")
}

/// The pod phase from its containers, as the kubelet's getPhase works it out.
pub fn phase(i: &StatusInput) -> &'static str {
    if i.failed.is_some() {
        return "Failed";
    }
    if !i.initialized {
        return "Pending";
    }
    let policy = restart_policy(i.pod);
    let (mut running, mut waiting, mut succeeded, mut failed) = (0, 0, 0, 0);
    for c in i.app {
        match &c.current {
            Some(r) if r.exit.is_none() => running += 1,
            Some(r) => {
                let ok = r.exit.as_ref().is_some_and(|e| e.exit_code == 0);
                let restarts = match policy {
                    "Never" => false,
                    "OnFailure" => !ok,
                    _ => true,
                };
                if restarts {
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
