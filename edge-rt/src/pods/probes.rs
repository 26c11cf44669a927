//! Liveness, readiness and startup probes as Kubernetes defines them: one
//! task per probe of a running container, probing every periodSeconds after
//! initialDelaySeconds, each try bounded by timeoutSeconds, reporting to the
//! pod worker only when successThreshold or failureThreshold is crossed.
//! Liveness and readiness wait for the startup probe to succeed.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use tokio::sync::{mpsc, watch};

use super::actions::{self, Action, Target};
use super::events::{EventRing, EventType, PodEvent};
use crate::runtime::Runtime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Liveness,
    Readiness,
    Startup,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
            Kind::Startup => "Startup",
        }
    }
}

/// A threshold crossed.
#[derive(Debug)]
pub struct Verdict {
    pub container_id: String,
    pub kind: Kind,
    pub success: bool,
}

/// A probe with the Kubernetes defaults filled in.
#[derive(Debug, Clone)]
pub struct Settings {
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

impl Settings {
    pub fn new(p: &Probe, c: &Container, kind: Kind) -> Result<Settings, String> {
        let secs = |v: Option<i32>, default: i32, min: i32| {
            Duration::from_secs(v.unwrap_or(default).max(min) as u64)
        };
        let success = p.success_threshold.unwrap_or(1).max(1) as u32;
        if kind != Kind::Readiness && success != 1 {
            return Err(format!(
                "{} probe: successThreshold must be 1",
                kind.name().to_lowercase()
            ));
        }
        Ok(Settings {
            action: Action::of_probe(p, c)?,
            initial_delay: secs(p.initial_delay_seconds, 0, 0),
            period: secs(p.period_seconds, 10, 1),
            timeout: secs(p.timeout_seconds, 1, 1),
            success_threshold: success,
            failure_threshold: p.failure_threshold.unwrap_or(3).max(1) as u32,
        })
    }
}

/// Who the probe's events are about.
#[derive(Clone)]
pub struct Subject {
    pub pod_uid: String,
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

pub struct ProbeTask {
    pub rt: Arc<Runtime>,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub pod_ip: Option<IpAddr>,
    pub events: Arc<EventRing>,
    pub subject: Subject,
    pub verdicts: mpsc::UnboundedSender<Verdict>,
    pub notify: Arc<tokio::sync::Notify>,
}

impl ProbeTask {
    /// Probe until the container exits (or, for a startup probe, until it
    /// succeeds; for liveness, until it fails). `started` gates liveness and
    /// readiness.
    pub async fn run(self, kind: Kind, s: Settings, mut started: watch::Receiver<bool>) {
        tokio::time::sleep(s.initial_delay).await;
        if kind != Kind::Startup && started.wait_for(|v| *v).await.is_err() {
            return;
        }
        let (mut ok, mut bad) = (0u32, 0u32);
        let mut reported: Option<bool> = None;
        loop {
            if self
                .rt
                .get(&self.container_id)
                .is_none_or(|r| r.exit.is_some())
            {
                return;
            }
            let target = Target {
                rt: &self.rt,
                container_id: &self.container_id,
                netns: self.netns.clone(),
                pod_ip: self.pod_ip,
            };
            match actions::run(&s.action, &target, s.timeout).await {
                Ok(()) => {
                    ok += 1;
                    bad = 0;
                    if ok >= s.success_threshold && reported != Some(true) {
                        reported = Some(true);
                        self.report(kind, true);
                        if kind == Kind::Startup {
                            return;
                        }
                    }
                }
                Err(msg) => {
                    ok = 0;
                    bad += 1;
                    self.events.push(PodEvent {
                        pod_uid: self.subject.pod_uid.clone(),
                        namespace: self.subject.namespace.clone(),
                        pod: self.subject.pod.clone(),
                        container: Some(self.subject.container.clone()),
                        kind: EventType::Warning,
                        reason: "Unhealthy".into(),
                        message: format!("{} probe failed: {msg}", kind.name()),
                        count: 0,
                        first_timestamp: String::new(),
                        last_timestamp: String::new(),
                        id: 0,
                        seq: 0,
                    });
                    if bad >= s.failure_threshold && reported != Some(false) {
                        reported = Some(false);
                        self.report(kind, false);
                        if kind != Kind::Readiness {
                            return; // the container is about to be killed
                        }
                    }
                }
            }
            tokio::time::sleep(s.period).await;
        }
    }

    fn report(&self, kind: Kind, success: bool) {
        let _ = self.verdicts.send(Verdict {
            container_id: self.container_id.clone(),
            kind,
            success,
        });
        self.notify.notify_one();
    }
}
