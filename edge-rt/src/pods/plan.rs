//! What is due next for a pod's containers, decided without doing it (as
//! the kubelet computes a pod's actions before applying them): pure, from
//! each container's state, unit-tested. The worker carries the plan out.

use std::time::Duration;

/// Which list a container is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Init,
    App,
}

/// What the planner needs to know of one container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    pub running: bool,
    /// The exit code of its last run, if that run is over.
    pub exit_code: Option<i32>,
    /// Its spec changed (or a liveness probe killed it): restart whatever
    /// the policy says, with no back-off.
    pub force_restart: bool,
    /// What is left of its crash-loop back-off.
    pub backoff: Duration,
}

/// The pod's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// As the pod spells it (the API server's default is Always).
    pub fn parse(s: Option<&str>) -> RestartPolicy {
        match s {
            Some("Never") => RestartPolicy::Never,
            Some("OnFailure") => RestartPolicy::OnFailure,
            _ => RestartPolicy::Always,
        }
    }

    /// The pod's own.
    pub fn of(pod: &k8s_openapi::api::core::v1::Pod) -> RestartPolicy {
        RestartPolicy::parse(pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()))
    }

    /// Whether a container that exited with `code` runs again.
    pub fn restarts(self, code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => code != 0,
            RestartPolicy::Never => false,
        }
    }
}

/// One container's next step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Start it now.
    Start,
    /// Start it once its back-off is over (the worker shows why it waits).
    BackOff(Duration),
}

/// What the pod's worker does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing to start: wait for an exit, a probe or a change.
    Wait,
    /// Init container `index` failed and the pod does not restart: the
    /// pod has failed.
    InitFailed { index: usize, code: i32 },
    /// These containers, each with its step (an init container alone:
    /// they run one at a time, in order, before any app container).
    Due(Vec<(Kind, usize, Step)>),
}

fn step(s: &State) -> Step {
    if s.force_restart || s.backoff.is_zero() {
        Step::Start
    } else {
        Step::BackOff(s.backoff)
    }
}

/// The next plan for a pod with these init and app containers.
pub fn plan(policy: RestartPolicy, init: &[State], app: &[State]) -> Plan {
    for (i, s) in init.iter().enumerate() {
        if s.running {
            return Plan::Wait;
        }
        match s.exit_code {
            Some(0) => continue,
            Some(code) if policy == RestartPolicy::Never => {
                return Plan::InitFailed { index: i, code };
            }
            _ => return Plan::Due(vec![(Kind::Init, i, step(s))]),
        }
    }
    let due: Vec<_> = app
        .iter()
        .enumerate()
        .filter(|(_, s)| !s.running)
        .filter(|(_, s)| match s.exit_code {
            None => true,
            Some(code) => s.force_restart || policy.restarts(code),
        })
        .map(|(i, s)| (Kind::App, i, step(s)))
        .collect();
    if due.is_empty() {
        Plan::Wait
    } else {
        Plan::Due(due)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RestartPolicy::*;

    const NEW: State = State {
        running: false,
        exit_code: None,
        force_restart: false,
        backoff: Duration::ZERO,
    };

    fn exited(code: i32) -> State {
        State {
            exit_code: Some(code),
            ..NEW
        }
    }

    fn running() -> State {
        State {
            running: true,
            ..NEW
        }
    }

    #[test]
    fn init_containers_run_one_at_a_time_before_any_app_container() {
        assert_eq!(
            plan(Always, &[NEW, NEW], &[NEW]),
            Plan::Due(vec![(Kind::Init, 0, Step::Start)])
        );
        assert_eq!(plan(Always, &[exited(0), running()], &[NEW]), Plan::Wait);
        assert_eq!(
            plan(Always, &[exited(0), exited(0)], &[NEW, NEW]),
            Plan::Due(vec![
                (Kind::App, 0, Step::Start),
                (Kind::App, 1, Step::Start)
            ])
        );
    }

    #[test]
    fn a_failed_init_container_fails_the_pod_only_under_never() {
        assert_eq!(
            plan(Never, &[exited(0), exited(3)], &[NEW]),
            Plan::InitFailed { index: 1, code: 3 }
        );
        for p in [Always, OnFailure] {
            assert_eq!(
                plan(p, &[exited(3)], &[NEW]),
                Plan::Due(vec![(Kind::Init, 0, Step::Start)])
            );
        }
    }

    #[test]
    fn app_containers_restart_by_policy() {
        let app = [exited(0), exited(1), running()];
        let due = |p| match plan(p, &[], &app) {
            Plan::Due(d) => d.into_iter().map(|(_, i, _)| i).collect::<Vec<_>>(),
            _ => vec![],
        };
        assert_eq!(due(Always), vec![0, 1]);
        assert_eq!(due(OnFailure), vec![1]);
        assert_eq!(due(Never), Vec::<usize>::new());
        assert_eq!(plan(Never, &[], &app), Plan::Wait);
    }

    #[test]
    fn a_changed_spec_restarts_whatever_the_policy_and_skips_the_back_off() {
        let forced = State {
            force_restart: true,
            backoff: Duration::from_secs(40),
            ..exited(0)
        };
        assert_eq!(
            plan(Never, &[], &[forced]),
            Plan::Due(vec![(Kind::App, 0, Step::Start)])
        );
    }

    #[test]
    fn a_container_in_back_off_waits_for_it() {
        let s = State {
            backoff: Duration::from_secs(20),
            ..exited(1)
        };
        assert_eq!(
            plan(Always, &[], &[s]),
            Plan::Due(vec![(Kind::App, 0, Step::BackOff(Duration::from_secs(20)))])
        );
    }

    #[test]
    fn the_policy_is_read_as_the_api_server_defaults_it() {
        assert_eq!(RestartPolicy::parse(None), Always);
        assert_eq!(RestartPolicy::parse(Some("OnFailure")), OnFailure);
        assert_eq!(RestartPolicy::parse(Some("Never")), Never);
    }
}
