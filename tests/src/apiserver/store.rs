//! Storage as etcd gives it to the real API server: one global revision
//! counter (every write takes the next), objects per group-resource, and a
//! bounded history of changes that watches replay from.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use super::resources::StoreKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug)]
pub struct Change {
    pub rv: u64,
    pub key: StoreKey,
    pub kind: ChangeKind,
    /// The object after the change (for Deleted: as it was, with the
    /// deletion's resourceVersion).
    pub obj: Arc<Value>,
    pub old: Option<Arc<Value>>,
}

struct Watcher {
    key: StoreKey,
    tx: mpsc::UnboundedSender<Arc<Change>>,
}

pub struct Store {
    rv: u64,
    objects: HashMap<StoreKey, BTreeMap<(String, String), Arc<Value>>>,
    history: VecDeque<Arc<Change>>,
    /// Every change after this revision is in `history`.
    history_start: u64,
    history_cap: usize,
    watchers: Vec<Watcher>,
}

fn ns_name(obj: &Value) -> (String, String) {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or_default().to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

pub fn rv_of(obj: &Value) -> u64 {
    obj["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

impl Store {
    pub fn new(history_cap: usize) -> Store {
        Store {
            rv: 1,
            objects: HashMap::new(),
            history: VecDeque::new(),
            history_start: 1,
            history_cap: history_cap.max(1),
            watchers: vec![],
        }
    }

    pub fn rv(&self) -> u64 {
        self.rv
    }

    pub fn history_start(&self) -> u64 {
        self.history_start
    }

    pub fn get(&self, key: &StoreKey, ns: &str, name: &str) -> Option<Arc<Value>> {
        self.objects
            .get(key)?
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
    }

    /// Objects in (namespace, name) order; `ns` None = every namespace.
    pub fn list(&self, key: &StoreKey, ns: Option<&str>) -> Vec<Arc<Value>> {
        let Some(m) = self.objects.get(key) else {
            return vec![];
        };
        match ns {
            None => m.values().cloned().collect(),
            Some(ns) => m
                .range((ns.to_string(), String::new())..)
                .take_while(|((n, _), _)| n == ns)
                .map(|(_, v)| v.clone())
                .collect(),
        }
    }

    fn record(&mut self, change: Change) -> Arc<Value> {
        let change = Arc::new(change);
        self.watchers
            .retain(|w| w.key != change.key || w.tx.send(change.clone()).is_ok());
        self.history.push_back(change.clone());
        while self.history.len() > self.history_cap {
            if let Some(c) = self.history.pop_front() {
                self.history_start = c.rv;
            }
        }
        change.obj.clone()
    }

    /// Store `obj` (created or replaced), stamping the next revision.
    pub fn put(&mut self, key: &StoreKey, mut obj: Value) -> Arc<Value> {
        self.rv += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let id = ns_name(&obj);
        let obj = Arc::new(obj);
        let old = self
            .objects
            .entry(key.clone())
            .or_default()
            .insert(id, obj.clone());
        let kind = if old.is_some() {
            ChangeKind::Modified
        } else {
            ChangeKind::Added
        };
        self.record(Change {
            rv: self.rv,
            key: key.clone(),
            kind,
            obj,
            old,
        })
    }

    pub fn delete(&mut self, key: &StoreKey, ns: &str, name: &str) -> Option<Arc<Value>> {
        let old = self
            .objects
            .get_mut(key)?
            .remove(&(ns.to_string(), name.to_string()))?;
        self.rv += 1;
        let mut gone = (*old).clone();
        gone["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        Some(self.record(Change {
            rv: self.rv,
            key: key.clone(),
            kind: ChangeKind::Deleted,
            obj: Arc::new(gone),
            old: Some(old),
        }))
    }

    /// Changes to `key` after `rv`, or None when history no longer
    /// reaches back that far.
    pub fn since(&self, key: &StoreKey, rv: u64) -> Option<Vec<Arc<Change>>> {
        if rv < self.history_start {
            return None;
        }
        Some(
            self.history
                .iter()
                .filter(|c| c.rv > rv && c.key == *key)
                .cloned()
                .collect(),
        )
    }

    pub fn watch(&mut self, key: &StoreKey) -> mpsc::UnboundedReceiver<Arc<Change>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.watchers.push(Watcher {
            key: key.clone(),
            tx,
        });
        rx
    }

    /// Drop a group-resource whole (its CRD went).
    pub fn drop_resource(&mut self, key: &StoreKey) -> Vec<Arc<Value>> {
        let names: Vec<(String, String)> = self
            .objects
            .get(key)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names
            .into_iter()
            .filter_map(|(ns, n)| self.delete(key, &ns, &n))
            .collect()
    }
}
