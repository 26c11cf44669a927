//! Where a node's objects come from and where its status goes, behind one
//! trait ([`Source`]) with two implementations: the Kubernetes API
//! ([`crate::bridge::KubeSource`]), and a directory per node name of YAML
//! manifests (Pods, ConfigMaps, Secrets) with status into `.status/<node>/`
//! ([`DirSource`], for running the link on its own and its tests).
//!
//! Objects get what the API server would give them: a uid (the manifest's,
//! or one derived from node, kind, namespace and name, so it is stable
//! across cloud-gw restarts and replicas) and a resourceVersion (a hash of
//! the content: it changes exactly when the object does). Pods are bound
//! to their node (`spec.nodeName`). Nothing here is per-connection state.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures_util::future::BoxFuture;
use outrigger_proto::message::Row;
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// kind -> uid -> (resourceVersion, body as JSON bytes). Bodies are shared
/// with the source's cache: a look at a node's objects copies none.
pub type NodeObjects = BTreeMap<Kind, BTreeMap<String, (String, std::sync::Arc<[u8]>)>>;

pub use outrigger_proto::kinds::Kind;

/// What a node's link needs from the cloud side. Reads are synchronous
/// (from caches); writes toward the cluster are async.
pub trait Source: Send + Sync {
    /// Every object `node` should have now.
    fn objects(&self, node: &str) -> NodeObjects;
    /// Changes whenever `node`'s objects may have changed.
    fn subscribe(&self, node: &str) -> tokio::sync::watch::Receiver<u64>;
    /// Pods bound to `node` that are being deleted (uids). A node that has
    /// one gets its terminating version and stops it, and it is finalized
    /// when the node reports it gone; one the node never had is not sent,
    /// and is finalized at once.
    fn terminating(&self, _node: &str) -> Vec<String> {
        Vec::new()
    }
    /// Pods of `node` (uids) not to send yet if the node lacks them: what
    /// they need is being made (a first service account token), and they
    /// go together once it is there, or failed.
    fn held_back(&self, _node: &str) -> std::collections::HashSet<String> {
        Default::default()
    }
    /// A terminating pod the node does not have (any more): remove it for
    /// good, as a kubelet does once its containers are gone.
    fn finalize(&self, _node: &str, _uid: &str) {}
    /// Record status rows from `node`; returns the sequence numbers the
    /// node may drop (recorded, or refused for good). Rows that failed for
    /// a passing reason are left out and come again.
    fn record<'a>(&'a self, node: &'a str, rows: Vec<Row>) -> BoxFuture<'a, Vec<i64>>;
    /// A node was admitted with these labels (at join).
    fn joined<'a>(
        &'a self,
        _node: &'a str,
        _labels: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }
    /// `node`'s link is up and about to be synced: make what its objects
    /// need made on demand (service account tokens) before the first look.
    fn prepare<'a>(&'a self, _node: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    /// `node`'s link is up; the returned task (if any) runs while it stays
    /// up (a Lease, periodic node status) and is aborted when it drops.
    fn connected(&self, _node: &str) -> Option<tokio::task::JoinHandle<()>> {
        None
    }
    /// A body this source served recently, by its version (versions are
    /// content hashes): the base a patch is made against.
    fn body_at(&self, _version: &str) -> Option<std::sync::Arc<[u8]>> {
        None
    }
    /// Where `node`'s objects are now in this source's journal (after the
    /// last [`Source::objects`] call): sent with batches as the cursor.
    fn cursor(&self, _node: &str) -> Option<String> {
        None
    }
    /// What changed for `node` since `cursor`, oldest first: (kind, uid,
    /// the version before the change, None if it did not exist). None when
    /// the journal does not reach back that far (or is another process's).
    fn since(&self, _node: &str, _cursor: &str) -> Option<Vec<(Kind, String, Option<String>)>> {
        None
    }
}

/// Bodies by version, the most recent `cap` of them: what a node may still
/// have, so a change can go as a patch against it. Shared by all nodes
/// (a version names its content).
pub struct Versions {
    cap: usize,
    inner: std::sync::Mutex<VersionMap>,
}

/// Bodies by version, and the versions in the order they came.
type VersionMap = (
    std::collections::HashMap<String, std::sync::Arc<[u8]>>,
    std::collections::VecDeque<String>,
);

impl Versions {
    pub fn new(cap: usize) -> Versions {
        Versions {
            cap: cap.max(1),
            inner: Default::default(),
        }
    }

    pub fn insert(&self, version: &str, body: std::sync::Arc<[u8]>) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *g;
        if map.contains_key(version) {
            return;
        }
        map.insert(version.to_string(), body);
        order.push_back(version.to_string());
        while order.len() > self.cap {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
    }

    pub fn get(&self, version: &str) -> Option<std::sync::Arc<[u8]>> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0.get(version).cloned()
    }
}

/// Per node, what the last look at its objects found and what changed
/// between looks (bounded): the source's side of a reconnect's rewind.
#[derive(Default)]
struct Journal {
    /// kind -> uid -> version at the last look.
    last: BTreeMap<Kind, BTreeMap<String, String>>,
    /// (position, kind, uid, version before).
    log: std::collections::VecDeque<(u64, Kind, String, Option<String>)>,
    position: u64,
}

/// Changes kept per node for rewinding: a reconnect after more than this
/// many changes to the node's objects falls back to a query (by then the
/// changes themselves outweigh it). Bounds the journal to ~40 KB a node.
const JOURNAL: usize = 256;

impl Journal {
    /// Record what differs between the last look and `now`.
    fn look(&mut self, now: &NodeObjects) {
        let mut changed = Vec::new();
        for kind in Kind::ALL {
            let before = self.last.get(&kind);
            let after = now.get(&kind);
            for (uid, (v, _)) in after.into_iter().flatten() {
                let old = before.and_then(|b| b.get(uid));
                if old != Some(v) {
                    changed.push((kind, uid.clone(), old.cloned()));
                }
            }
            for (uid, v) in before.into_iter().flatten() {
                if !after.is_some_and(|a| a.contains_key(uid)) {
                    changed.push((kind, uid.clone(), Some(v.clone())));
                }
            }
        }
        for (kind, uid, old) in changed {
            self.position += 1;
            self.log.push_back((self.position, kind, uid, old));
        }
        while self.log.len() > JOURNAL {
            self.log.pop_front();
        }
        self.last = now
            .iter()
            .map(|(k, m)| {
                (
                    *k,
                    m.iter().map(|(u, (v, _))| (u.clone(), v.clone())).collect(),
                )
            })
            .collect();
    }

    fn since(&self, position: u64) -> Option<Vec<(Kind, String, Option<String>)>> {
        if position > self.position {
            return None;
        }
        // The journal must reach back to just after `position`.
        if position < self.position {
            let first = self.log.front().map(|e| e.0)?;
            if first > position + 1 {
                return None;
            }
        }
        Some(
            self.log
                .iter()
                .filter(|e| e.0 > position)
                .map(|(_, k, u, o)| (*k, u.clone(), o.clone()))
                .collect(),
        )
    }
}

/// Per-node change signals: a session subscribes to its node's, a source
/// bumps only the nodes a change concerns.
#[derive(Default)]
pub struct Notifier {
    nodes: std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Sender<u64>>>,
}

impl Notifier {
    fn sender(&self, node: &str) -> tokio::sync::watch::Sender<u64> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .entry(node.to_string())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .clone()
    }

    pub fn subscribe(&self, node: &str) -> tokio::sync::watch::Receiver<u64> {
        self.sender(node).subscribe()
    }

    pub fn changed(&self, node: &str) {
        self.sender(node).send_modify(|g| *g += 1);
    }

    /// Every node anyone subscribed to.
    pub fn all(&self) {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        for s in nodes.values() {
            s.send_modify(|g| *g += 1);
        }
    }
}

/// Every node's [`Journal`], under this process's epoch: what a source
/// keeps to answer [`Source::cursor`] and [`Source::since`].
pub struct Journals {
    map: std::sync::Mutex<std::collections::HashMap<String, Journal>>,
    /// Names this process's journals: a cursor from another process (or
    /// replica) is never taken for one of ours.
    epoch: String,
}

impl Default for Journals {
    fn default() -> Self {
        let mut b = [0u8; 4];
        let _ = aws_lc_rs::rand::fill(&mut b);
        Journals {
            map: Default::default(),
            epoch: hex::encode(b),
        }
    }
}

impl Journals {
    /// Record a look at `node`'s objects.
    pub fn look(&self, node: &str, now: &NodeObjects) {
        let mut j = self.map.lock().unwrap_or_else(|p| p.into_inner());
        j.entry(node.to_string()).or_default().look(now);
    }

    pub fn cursor(&self, node: &str) -> String {
        let j = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let p = j.get(node).map(|j| j.position).unwrap_or(0);
        format!("{}.{p}", self.epoch)
    }

    pub fn since(&self, node: &str, cursor: &str) -> Option<Vec<(Kind, String, Option<String>)>> {
        let (epoch, p) = cursor.split_once('.')?;
        if epoch != self.epoch {
            return None;
        }
        let j = self.map.lock().unwrap_or_else(|p| p.into_inner());
        j.get(node)?.since(p.parse().ok()?)
    }
}

pub struct DirSource {
    root: PathBuf,
    /// Per node, bumped when its directory changes (inotify).
    nodes: Notifier,
    versions: Versions,
    journals: Journals,
}

/// A uid made from a name: stable across restarts and replicas.
pub fn uuid_of(bytes: &[u8]) -> String {
    let mut b = [0u8; 16];
    b.copy_from_slice(&Sha256::digest(bytes)[..16]);
    uuid::Uuid::from_bytes(b).to_string()
}

impl DirSource {
    pub fn new(root: &Path) -> DirSource {
        DirSource {
            root: root.into(),
            nodes: Default::default(),
            versions: Versions::new(8192),
            journals: Default::default(),
        }
    }

    /// Changes whenever `node`'s directory may have changed.
    pub fn subscribe(&self, node: &str) -> tokio::sync::watch::Receiver<u64> {
        self.nodes.subscribe(node)
    }

    fn changed(&self, node: &str) {
        self.nodes.changed(node)
    }

    /// Watch the tree with inotify: the root for node directories coming
    /// and going, each node directory for its files. A push reaches the
    /// node's session in milliseconds, and only that session wakes.
    pub async fn watch(self: std::sync::Arc<Self>) {
        use futures_util::StreamExt;
        use inotify::{Inotify, WatchMask};
        let mask = WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::MOVED_FROM
            | WatchMask::DELETE
            | WatchMask::CREATE;
        let _ = std::fs::create_dir_all(&self.root);
        let ino = match Inotify::init() {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "no inotify: changes are picked up by the periodic rescan only");
                return;
            }
        };
        let mut watches = ino.watches();
        let mut by_wd = std::collections::HashMap::new();
        let root_wd = match watches.add(&self.root, mask) {
            Ok(wd) => wd,
            Err(e) => {
                tracing::warn!(root = %self.root.display(), error = %e, "cannot watch the objects directory");
                return;
            }
        };
        let add = |name: &str,
                   by_wd: &mut std::collections::HashMap<inotify::WatchDescriptor, String>,
                   watches: &mut inotify::Watches| {
            if let Ok(wd) = watches.add(self.root.join(name), mask) {
                by_wd.insert(wd, name.to_string());
            }
        };
        for e in std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
        {
            if e.path().is_dir() {
                add(&e.file_name().to_string_lossy(), &mut by_wd, &mut watches);
            }
        }
        let Ok(mut events) = ino.into_event_stream(vec![0u8; 16384]) else {
            return;
        };
        while let Some(Ok(ev)) = events.next().await {
            if ev.wd == root_wd {
                if let Some(name) = ev.name.as_ref().map(|n| n.to_string_lossy().into_owned()) {
                    if self.root.join(&name).is_dir() {
                        add(&name, &mut by_wd, &mut watches);
                    }
                    self.changed(&name);
                }
            } else if let Some(node) = by_wd.get(&ev.wd) {
                self.changed(node);
            }
        }
    }

    /// Every object for `node`. A document that does not parse is logged
    /// and left out; the others are served.
    pub fn objects(&self, node: &str) -> NodeObjects {
        let out = self.scan(node);
        for (_, (v, body)) in out.values().flatten() {
            self.versions.insert(v, body.clone());
        }
        self.journals.look(node, &out);
        out
    }

    fn scan(&self, node: &str) -> NodeObjects {
        let mut out: NodeObjects = Kind::ALL.iter().map(|k| (*k, BTreeMap::new())).collect();
        let dir = self.root.join(node);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return out;
        };
        let mut files: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
            })
            .collect();
        files.sort();
        for f in files {
            let Ok(text) = std::fs::read_to_string(&f) else {
                continue;
            };
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                let mut v = match serde_json::Value::deserialize(doc) {
                    Ok(serde_json::Value::Null) => continue,
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(file = %f.display(), error = %e, "manifest skipped");
                        break;
                    }
                };
                let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
                let kind = match v["kind"].as_str().and_then(Kind::from_name) {
                    Some(k) if !name.is_empty() => k,
                    _ => {
                        let kind = v["kind"].as_str().unwrap_or("");
                        tracing::warn!(file = %f.display(), kind, name, "not a named Pod, ConfigMap or Secret; skipped");
                        continue;
                    }
                };
                if v["metadata"]["namespace"].as_str().is_none() {
                    v["metadata"]["namespace"] = "default".into();
                }
                let ns = v["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string();
                if kind == Kind::Pod {
                    v["spec"]["nodeName"] = node.into();
                }
                if let Some(m) = v["metadata"].as_object_mut() {
                    m.remove("resourceVersion");
                }
                let uid = match v["metadata"]["uid"].as_str() {
                    Some(u) => u.to_string(),
                    None => uuid_of(format!("{node}/{kind}/{ns}/{name}").as_bytes()),
                };
                v["metadata"]["uid"] = uid.clone().into();
                // The version travels beside the body, not in it (as the
                // Kubernetes source does): a change patches only content.
                let body = serde_json::to_vec(&v).unwrap_or_default();
                let rv = hex::encode(&Sha256::digest(&body)[..8]);
                if let Some(k) = out.get_mut(&kind) {
                    k.insert(uid, (rv, body.into()));
                }
            }
        }
        out
    }

    /// Record a status row the node reported (the stand-in for the API
    /// server's status subresource): `.status/<node>/<key>.json`.
    fn put_status(&self, node: &str, key: &str, body: &[u8]) -> std::io::Result<()> {
        let dir = self.root.join(".status").join(node);
        std::fs::create_dir_all(&dir)?;
        let file: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, body)?;
        std::fs::rename(tmp, dir.join(format!("{file}.json")))
    }
}

impl Source for DirSource {
    fn objects(&self, node: &str) -> NodeObjects {
        DirSource::objects(self, node)
    }

    fn subscribe(&self, node: &str) -> tokio::sync::watch::Receiver<u64> {
        DirSource::subscribe(self, node)
    }

    fn body_at(&self, version: &str) -> Option<std::sync::Arc<[u8]>> {
        self.versions.get(version)
    }

    fn cursor(&self, node: &str) -> Option<String> {
        Some(self.journals.cursor(node))
    }

    fn since(&self, node: &str, cursor: &str) -> Option<Vec<(Kind, String, Option<String>)>> {
        self.journals.since(node, cursor)
    }

    fn record<'a>(&'a self, node: &'a str, rows: Vec<Row>) -> BoxFuture<'a, Vec<i64>> {
        let mut seqs = Vec::with_capacity(rows.len());
        for r in rows {
            // The node's certificate picks the directory: a node can only
            // ever write its own status.
            match self.put_status(node, &r.key, &r.body) {
                Ok(()) => seqs.push(r.seq),
                Err(e) => {
                    tracing::warn!(node, key = r.key, error = %e, "status not recorded; the node keeps it");
                }
            }
        }
        Box::pin(async move { seqs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_stable_and_versions_follow_content() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("gw-1")).unwrap();
        let f = d.path().join("gw-1/app.yaml");
        std::fs::write(&f, "kind: ConfigMap\nmetadata: {name: c}\ndata: {a: '1'}\n---\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n---\nkind: Deployment\nmetadata: {name: d}\n").unwrap();
        let s = DirSource::new(d.path());
        let a = s.objects("gw-1");
        assert_eq!(a[&Kind::ConfigMap].len(), 1);
        assert_eq!(a[&Kind::Pod].len(), 1);
        let (uid, (rv, body)) = a[&Kind::Pod].iter().next().unwrap();
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["spec"]["nodeName"], "gw-1");
        assert_eq!(v["metadata"]["uid"], uid.as_str());
        assert_eq!(s.objects("gw-1"), a);
        assert!(s.objects("gw-2")[&Kind::Pod].is_empty());
        std::fs::write(&f, "kind: ConfigMap\nmetadata: {name: c}\ndata: {a: '2'}\n---\nkind: Pod\nmetadata: {name: p}\nspec: {containers: []}\n").unwrap();
        let b = s.objects("gw-1");
        assert_eq!(b[&Kind::Pod][uid].0, *rv);
        assert_ne!(b[&Kind::ConfigMap], a[&Kind::ConfigMap]);
        assert_eq!(
            b[&Kind::ConfigMap].keys().collect::<Vec<_>>(),
            a[&Kind::ConfigMap].keys().collect::<Vec<_>>()
        );
    }
}
