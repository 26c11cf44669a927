//! The pod manager: the desired set in, one worker per pod.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

use super::worker::Worker;
use super::{name, namespace, uid, Context};
use crate::desired::DesiredPod;

/// What a worker is told to do with its pod.
#[derive(Debug, Clone)]
pub(super) enum Want {
    Run(Arc<Pod>),
    /// Stop and clean up, within the pod's grace period or the deletion's
    /// if that is shorter.
    Stop {
        grace_seconds: Option<i64>,
    },
}

struct Entry {
    desired: watch::Sender<Want>,
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
    /// stopped and removed, and those being deleted are stopped (with the
    /// deletion's grace period) and never started.
    pub fn apply(&self, desired: Vec<DesiredPod>) {
        let mut pods = self.lock();
        self.prune(&mut pods);
        let wanted: BTreeMap<String, DesiredPod> = desired
            .into_iter()
            .map(|p| (uid(&p.pod).to_string(), p))
            .collect();
        for (uid, e) in pods.iter() {
            let stop = match wanted.get(uid) {
                None => Some(None),
                Some(d) => d.deletion.map(|del| del.grace_seconds),
            };
            if let Some(grace_seconds) = stop {
                if matches!(*e.desired.borrow(), Want::Run(_)) {
                    e.desired.send_replace(Want::Stop { grace_seconds });
                }
            }
        }
        for (uid, d) in wanted {
            if d.deletion.is_some() {
                continue;
            }
            let pod = d.pod;
            match pods.get(&uid) {
                Some(e) => {
                    let changed = match &*e.desired.borrow() {
                        Want::Run(cur) => **cur != pod,
                        // Stopping: it finishes, and a pod of the same
                        // uid comes back as a new worker after it.
                        Want::Stop { .. } => false,
                    };
                    if changed {
                        e.desired.send_replace(Want::Run(Arc::new(pod)));
                    }
                }
                None => {
                    let (tx, rx) = watch::channel(Want::Run(Arc::new(pod.clone())));
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
                .any(|e| matches!(*e.desired.borrow(), Want::Stop { .. }) && !e.task.is_finished());
            if !pending {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
