//! What the watches saw, indexed the way the links ask for it: pods and
//! devices by node, and for every ConfigMap, Secret and DeviceModel the
//! nodes whose pods or devices use it.
//! Pure data: the watch tasks feed it, sessions read it, and each change
//! says which nodes it concerns so only their sessions wake.
//!
//! Bodies are kept as the node gets them: without managedFields, the
//! last-applied annotation, the resourceVersion and (for pods) the status,
//! none of which a node acts on. An object's version for the link is a hash
//! of that body, so a status write-back (which bumps the API server's
//! resourceVersion) does not send the pod down again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodSpec};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::source::NodeObjects;

/// (namespace, name).
pub type Key = (String, String);

/// The link's kinds; what pods reference is a ConfigMap or a Secret.
pub use outrigger_proto::kinds::Kind;

/// An object a pod uses.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ref {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone)]
pub struct Obj {
    pub uid: String,
    pub version: String,
    pub body: Arc<[u8]>,
}

#[derive(Debug, Clone)]
pub struct PodEntry {
    pub obj: Obj,
    pub node: String,
    /// Being deleted (deletionTimestamp set): the node stops it.
    pub terminating: bool,
    pub refs: Vec<Ref>,
    /// The service account tokens its projected volumes need.
    pub tokens: Vec<TokenWant>,
    /// Its not-ready/unreachable tolerations are bounded: the autonomy
    /// sweep looks at it.
    pub bounded: bool,
}

/// A device bound to a node, and the model it names.
#[derive(Debug, Clone)]
pub struct DeviceEntry {
    pub obj: Obj,
    pub node: String,
    pub model: Ref,
}

/// A token a pod's projected `serviceAccountToken` source needs: one per
/// (audience, lifetime), named and identified as the node will store it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenWant {
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub audience: Option<String>,
    pub expiration_seconds: i64,
}

/// The tokens a pod's volumes need (none for a pod that mounts none).
pub fn token_wants(pod_name: &str, pod_uid: &str, spec: &PodSpec) -> Vec<TokenWant> {
    use outrigger_proto::kinds::{ServiceAccountToken, DEFAULT_EXPIRATION_SECONDS};
    let sa = spec
        .service_account_name
        .clone()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".into());
    let mut out: Vec<TokenWant> = Vec::new();
    for p in spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| v.projected.as_ref())
        .flat_map(|p| p.sources.iter().flatten())
        .filter_map(|s| s.service_account_token.as_ref())
    {
        let audience = p.audience.clone().filter(|a| !a.is_empty());
        let seconds = p.expiration_seconds.unwrap_or(DEFAULT_EXPIRATION_SECONDS);
        let want = TokenWant {
            name: ServiceAccountToken::name_for(pod_name, pod_uid, audience.as_deref(), seconds),
            uid: ServiceAccountToken::uid_for(pod_uid, audience.as_deref(), seconds),
            service_account: sa.clone(),
            audience,
            expiration_seconds: seconds,
        };
        if !out.contains(&want) {
            out.push(want);
        }
    }
    out
}

pub struct Cache {
    /// Bodies by version, for patches against what a node has.
    pub versions: crate::source::Versions,
    pods: HashMap<Key, PodEntry>,
    pod_keys: HashMap<String, Key>,
    by_node: HashMap<String, BTreeSet<Key>>,
    configs: HashMap<(Kind, Key), Obj>,
    /// Service account tokens by (namespace, name), made for pods of the
    /// nodes this replica serves (see `pod_tokens`).
    tokens: HashMap<Key, Obj>,
    /// What a pod or device uses -> node -> how many of its pods and
    /// devices use it.
    users: HashMap<Ref, HashMap<String, u32>>,
    devices: HashMap<Key, DeviceEntry>,
    device_keys: HashMap<String, Key>,
    devices_by_node: HashMap<String, BTreeSet<Key>>,
    /// namespace -> node -> how many of its pods are there (which nodes a
    /// Service of the namespace concerns).
    namespaces: HashMap<String, HashMap<String, u32>>,
    /// Services, EndpointSlices and edge Nodes, and who gets which.
    pub services: super::services::Services,
}

impl Default for Cache {
    fn default() -> Self {
        Cache {
            versions: crate::source::Versions::new(4096),
            pods: Default::default(),
            pod_keys: Default::default(),
            by_node: Default::default(),
            configs: Default::default(),
            tokens: Default::default(),
            users: Default::default(),
            devices: Default::default(),
            device_keys: Default::default(),
            devices_by_node: Default::default(),
            namespaces: Default::default(),
            services: Default::default(),
        }
    }
}

/// The body a node gets, and its version.
pub fn strip(mut v: Value, drop_status: bool) -> Obj {
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("managedFields");
        m.remove("resourceVersion");
        if let Some(a) = m.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
            if a.is_empty() {
                m.remove("annotations");
            }
        }
    }
    if drop_status {
        if let Some(o) = v.as_object_mut() {
            o.remove("status");
        }
    }
    let uid = v["metadata"]["uid"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let body = serde_json::to_vec(&v).unwrap_or_default();
    let version = hex::encode(&Sha256::digest(&body)[..8]);
    Obj {
        uid,
        version,
        body: body.into(),
    }
}

/// Every ConfigMap and Secret the pod names: volumes (also projected),
/// env, envFrom, image pull secrets. Nothing else is sent to its node.
pub fn refs(namespace: &str, spec: &PodSpec) -> Vec<Ref> {
    let mut out = BTreeSet::new();
    let mut add = |kind, name: &str| {
        if !name.is_empty() {
            out.insert(Ref {
                kind,
                namespace: namespace.to_string(),
                name: name.to_string(),
            });
        }
    };
    for v in spec.volumes.iter().flatten() {
        if let Some(c) = &v.config_map {
            add(Kind::ConfigMap, &c.name);
        }
        if let Some(s) = v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) {
            add(Kind::Secret, s);
        }
        for p in v.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
            if let Some(c) = &p.config_map {
                add(Kind::ConfigMap, &c.name);
            }
            if let Some(s) = &p.secret {
                add(Kind::Secret, &s.name);
            }
        }
    }
    let containers = spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter());
    for c in containers {
        for e in c.env.iter().flatten() {
            if let Some(f) = &e.value_from {
                if let Some(k) = &f.config_map_key_ref {
                    add(Kind::ConfigMap, &k.name);
                }
                if let Some(k) = &f.secret_key_ref {
                    add(Kind::Secret, &k.name);
                }
            }
        }
        for e in c.env_from.iter().flatten() {
            if let Some(r) = &e.config_map_ref {
                add(Kind::ConfigMap, &r.name);
            }
            if let Some(r) = &e.secret_ref {
                add(Kind::Secret, &r.name);
            }
        }
    }
    for s in spec.image_pull_secrets.iter().flatten() {
        add(Kind::Secret, &s.name);
    }
    out.into_iter().collect()
}

fn key_of(v: &Value) -> Key {
    (
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string(),
        v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

impl Cache {
    fn unuse(&mut self, r: &Ref, node: &str) {
        if let Some(nodes) = self.users.get_mut(r) {
            if let Some(n) = nodes.get_mut(node) {
                *n -= 1;
                if *n == 0 {
                    nodes.remove(node);
                }
            }
            if nodes.is_empty() {
                self.users.remove(r);
            }
        }
    }

    fn use_(&mut self, r: &Ref, node: &str) {
        *self
            .users
            .entry(r.clone())
            .or_default()
            .entry(node.to_string())
            .or_default() += 1;
    }

    fn unindex(&mut self, key: &Key) -> Option<PodEntry> {
        let old = self.pods.remove(key)?;
        self.pod_keys.remove(&old.obj.uid);
        if let Some(set) = self.by_node.get_mut(&old.node) {
            set.remove(key);
            if set.is_empty() {
                self.by_node.remove(&old.node);
            }
        }
        if let Some(nodes) = self.namespaces.get_mut(&key.0) {
            if let Some(n) = nodes.get_mut(&old.node) {
                *n -= 1;
                if *n == 0 {
                    nodes.remove(&old.node);
                }
            }
            if nodes.is_empty() {
                self.namespaces.remove(&key.0);
            }
        }
        for r in &old.refs {
            self.unuse(r, &old.node);
        }
        Some(old)
    }

    fn unindex_device(&mut self, key: &Key) -> Option<DeviceEntry> {
        let old = self.devices.remove(key)?;
        self.device_keys.remove(&old.obj.uid);
        if let Some(set) = self.devices_by_node.get_mut(&old.node) {
            set.remove(key);
            if set.is_empty() {
                self.devices_by_node.remove(&old.node);
            }
        }
        self.unuse(&old.model.clone(), &old.node);
        Some(old)
    }

    /// A Device added or changed (as JSON); the nodes it concerns. Its
    /// status stays out of the body: the node's own reports do not come
    /// back down.
    pub fn put_device(&mut self, v: Value) -> Vec<String> {
        let key = key_of(&v);
        let node = v["spec"]["nodeName"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let model = v["spec"]["model"].as_str().unwrap_or_default().to_string();
        let mut nodes = Vec::new();
        if let Some(old) = self.unindex_device(&key) {
            nodes.push(old.node);
        }
        if node.is_empty() {
            return nodes;
        }
        let model = Ref {
            kind: Kind::DeviceModel,
            namespace: key.0.clone(),
            name: model,
        };
        self.use_(&model, &node);
        let obj = strip(v, true);
        self.versions.insert(&obj.version, obj.body.clone());
        self.device_keys.insert(obj.uid.clone(), key.clone());
        self.devices_by_node
            .entry(node.clone())
            .or_default()
            .insert(key.clone());
        self.devices.insert(
            key,
            DeviceEntry {
                obj,
                node: node.clone(),
                model,
            },
        );
        if !nodes.contains(&node) {
            nodes.push(node);
        }
        nodes
    }

    pub fn remove_device(&mut self, key: &Key) -> Vec<String> {
        self.unindex_device(key)
            .map(|d| d.node)
            .into_iter()
            .collect()
    }

    /// A DeviceModel's spec (the webhook checks devices against it).
    pub fn device_model(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<outrigger_proto::device::DeviceModelSpec> {
        let o = self
            .configs
            .get(&(Kind::DeviceModel, (namespace.to_string(), name.to_string())))?;
        let m: outrigger_proto::device::DeviceModel = serde_json::from_slice(&o.body).ok()?;
        Some(m.spec)
    }

    pub fn device_keys(&self) -> Vec<Key> {
        self.devices.keys().cloned().collect()
    }

    pub fn device_by_uid(&self, uid: &str) -> Option<(&Key, &DeviceEntry)> {
        let key = self.device_keys.get(uid)?;
        self.devices.get(key).map(|d| (key, d))
    }

    /// A pod added or changed; returns the nodes it concerns.
    pub fn put_pod(&mut self, pod: &Pod) -> Vec<String> {
        let node = pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let Ok(v) = serde_json::to_value(pod) else {
            return Vec::new();
        };
        let key = key_of(&v);
        let mut nodes = Vec::new();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let tokens = pod
            .spec
            .as_ref()
            .filter(|_| !node.is_empty())
            .map(|s| token_wants(&key.1, &uid, s))
            .unwrap_or_default();
        if let Some(old) = self.unindex(&key) {
            // Tokens it no longer needs go (all of them if this is another
            // pod of the same name: their names include the uid).
            for t in old.tokens.iter().filter(|t| !tokens.contains(t)) {
                self.tokens.remove(&(key.0.clone(), t.name.clone()));
            }
            nodes.push(old.node);
        }
        if node.is_empty() {
            return nodes;
        }
        let refs = pod
            .spec
            .as_ref()
            .map(|s| refs(&key.0, s))
            .unwrap_or_default();
        for r in &refs {
            self.use_(r, &node);
        }
        let obj = strip(v, true);
        self.versions.insert(&obj.version, obj.body.clone());
        self.pod_keys.insert(obj.uid.clone(), key.clone());
        self.by_node
            .entry(node.clone())
            .or_default()
            .insert(key.clone());
        *self
            .namespaces
            .entry(key.0.clone())
            .or_default()
            .entry(node.clone())
            .or_default() += 1;
        self.pods.insert(
            key,
            PodEntry {
                obj,
                node: node.clone(),
                terminating: pod.metadata.deletion_timestamp.is_some(),
                refs,
                tokens,
                bounded: super::admission::bounded(pod),
            },
        );
        if !nodes.contains(&node) {
            nodes.push(node);
        }
        nodes
    }

    pub fn remove_pod(&mut self, key: &Key) -> Vec<String> {
        let Some(old) = self.unindex(key) else {
            return Vec::new();
        };
        for t in &old.tokens {
            self.tokens.remove(&(key.0.clone(), t.name.clone()));
        }
        vec![old.node]
    }

    /// The nodes whose pods use this object.
    fn users_of(&self, kind: Kind, key: &Key) -> Vec<String> {
        let r = Ref {
            kind,
            namespace: key.0.clone(),
            name: key.1.clone(),
        };
        self.users
            .get(&r)
            .map(|n| n.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A ConfigMap, Secret or DeviceModel added or changed (as JSON).
    pub fn put_config(&mut self, kind: Kind, v: Value) -> Vec<String> {
        let key = key_of(&v);
        let obj = strip(v, false);
        self.versions.insert(&obj.version, obj.body.clone());
        let same = self
            .configs
            .get(&(kind, key.clone()))
            .is_some_and(|o| o.version == obj.version);
        self.configs.insert((kind, key.clone()), obj);
        if same {
            return Vec::new();
        }
        self.users_of(kind, &key)
    }

    pub fn remove_config(&mut self, kind: Kind, key: &Key) -> Vec<String> {
        match self.configs.remove(&(kind, key.clone())) {
            Some(_) => self.users_of(kind, key),
            None => Vec::new(),
        }
    }

    /// The nodes with pods in namespace `ns`.
    fn nodes_in(&self, ns: &str) -> Vec<String> {
        self.namespaces
            .get(ns)
            .map(|n| n.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// A Service or EndpointSlice added or changed (as JSON); the nodes it
    /// concerns.
    pub fn put_service(&mut self, kind: Kind, v: Value) -> Vec<String> {
        let with_pods = self.nodes_in(v["metadata"]["namespace"].as_str().unwrap_or("default"));
        match kind {
            Kind::Service => self.services.put_service(&self.versions, v, with_pods),
            _ => self.services.put_slice(&self.versions, v, with_pods),
        }
    }

    pub fn remove_service(&mut self, kind: Kind, key: &Key) -> Vec<String> {
        let with_pods = self.nodes_in(&key.0);
        match kind {
            Kind::Service => self.services.remove_service(&self.versions, key, with_pods),
            _ => self.services.remove_slice(key, with_pods),
        }
    }

    pub fn put_node(&mut self, v: Value) -> Vec<String> {
        self.services.put_node(&self.versions, v)
    }

    /// A token for one of a pod's volumes, fetched or refreshed; the
    /// nodes it concerns (none if the pod is gone meanwhile).
    pub fn put_token(&mut self, pod: &Key, pod_uid: &str, token: Obj) -> Vec<String> {
        let Some(p) = self.pods.get(pod).filter(|p| p.obj.uid == pod_uid) else {
            return Vec::new();
        };
        let Some(want) = p.tokens.iter().find(|t| t.uid == token.uid) else {
            return Vec::new();
        };
        let node = p.node.clone();
        self.versions.insert(&token.version, token.body.clone());
        self.tokens
            .insert((pod.0.clone(), want.name.clone()), token);
        vec![node]
    }

    /// A token's version now, if one is held.
    pub fn token(&self, namespace: &str, name: &str) -> Option<&Obj> {
        self.tokens.get(&(namespace.to_string(), name.to_string()))
    }

    /// The pods of `node` with the tokens they need: (pod key, pod uid,
    /// tokens).
    pub fn token_wants_of(&self, node: &str) -> Vec<(Key, String, Vec<TokenWant>)> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|k| self.pods.get(k).map(|p| (k, p)))
            .filter(|(_, p)| !p.tokens.is_empty())
            .map(|(k, p)| (k.clone(), p.obj.uid.clone(), p.tokens.clone()))
            .collect()
    }

    pub fn pod_keys(&self) -> Vec<Key> {
        self.pods.keys().cloned().collect()
    }

    pub fn config_keys(&self, kind: Kind) -> Vec<Key> {
        self.configs
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| key.clone())
            .collect()
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodEntry> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    pub fn pod_by_uid(&self, uid: &str) -> Option<(&Key, &PodEntry)> {
        let key = self.pod_keys.get(uid)?;
        self.pods.get(key).map(|p| (key, p))
    }

    /// What `node` should have: its pods (those being deleted too: the
    /// node stops them as their deletion says, see [`Cache::terminating`])
    /// and what they use, its devices and their models.
    pub fn objects(&self, node: &str) -> NodeObjects {
        let mut out: NodeObjects = Kind::ALL.iter().map(|k| (*k, Default::default())).collect();
        for d in self
            .devices_by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|k| self.devices.get(k))
        {
            if let Some(m) = out.get_mut(&Kind::Device) {
                m.insert(
                    d.obj.uid.clone(),
                    (d.obj.version.clone(), d.obj.body.clone()),
                );
            }
            let key = (d.model.namespace.clone(), d.model.name.clone());
            if let (Some(o), Some(m)) = (
                self.configs.get(&(Kind::DeviceModel, key)),
                out.get_mut(&Kind::DeviceModel),
            ) {
                m.insert(o.uid.clone(), (o.version.clone(), o.body.clone()));
            }
        }
        let namespaces: BTreeSet<String> = self
            .by_node
            .get(node)
            .into_iter()
            .flatten()
            .map(|k| k.0.clone())
            .collect();
        let (nodes, services, slices) = self.services.for_node(node, &namespaces);
        for (kind, objs) in [
            (Kind::Node, nodes),
            (Kind::Service, services),
            (Kind::EndpointSlice, slices),
        ] {
            if let Some(m) = out.get_mut(&kind) {
                for o in objs {
                    m.insert(o.uid.clone(), (o.version.clone(), o.body.clone()));
                }
            }
        }
        for key in self.by_node.get(node).into_iter().flatten() {
            let Some(p) = self.pods.get(key) else {
                continue;
            };
            if let Some(m) = out.get_mut(&Kind::Pod) {
                m.insert(
                    p.obj.uid.clone(),
                    (p.obj.version.clone(), p.obj.body.clone()),
                );
            }
            for t in &p.tokens {
                let Some(o) = self.tokens.get(&(key.0.clone(), t.name.clone())) else {
                    continue;
                };
                if let Some(m) = out.get_mut(&Kind::ServiceAccountToken) {
                    m.insert(o.uid.clone(), (o.version.clone(), o.body.clone()));
                }
            }
            for r in &p.refs {
                let Some(o) = self
                    .configs
                    .get(&(r.kind, (r.namespace.clone(), r.name.clone())))
                else {
                    continue;
                };
                if let Some(m) = out.get_mut(&r.kind) {
                    m.insert(o.uid.clone(), (o.version.clone(), o.body.clone()));
                }
            }
        }
        out
    }

    /// `node`'s pods whose not-ready/unreachable tolerations are bounded,
    /// as the node gets them (no status, no resourceVersion).
    pub fn bounded_pods(&self, node: &str) -> Vec<Pod> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|k| self.pods.get(k))
            .filter(|p| p.bounded && !p.terminating)
            .filter_map(|p| serde_json::from_slice(&p.obj.body).ok())
            .collect()
    }

    /// `node`'s pods that are being deleted.
    pub fn terminating(&self, node: &str) -> Vec<String> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|k| self.pods.get(k))
            .filter(|p| p.terminating)
            .map(|p| p.obj.uid.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: &str, cm: &str, secret: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                         "resourceVersion": "7", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox",
                "env": [{"name": "S", "valueFrom": {"secretKeyRef": {"name": secret, "key": "k"}}}]}],
                "volumes": [{"name": "v", "configMap": {"name": cm}}]},
            "status": {"phase": "Running"}
        }))
        .unwrap()
    }

    fn config(name: &str, data: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
               "resourceVersion": "9"}, "data": {"a": data}})
    }

    #[test]
    fn a_node_gets_its_pods_and_only_what_they_use() {
        let mut c = Cache::default();
        assert_eq!(c.put_pod(&pod("p1", "n1", "cm1", "s1")), vec!["n1"]);
        c.put_pod(&pod("p2", "n2", "cm2", "s2"));
        for (k, n) in [
            (Kind::ConfigMap, "cm1"),
            (Kind::ConfigMap, "cm2"),
            (Kind::Secret, "s1"),
            (Kind::Secret, "s2"),
            (Kind::Secret, "other"),
        ] {
            c.put_config(k, config(n, "x"));
        }
        let o = c.objects("n1");
        assert_eq!(o[&Kind::Pod].keys().collect::<Vec<_>>(), vec!["uid-p1"]);
        assert_eq!(
            o[&Kind::ConfigMap].keys().collect::<Vec<_>>(),
            vec!["uid-cm1"]
        );
        assert_eq!(o[&Kind::Secret].keys().collect::<Vec<_>>(), vec!["uid-s1"]);
        let body: Value = serde_json::from_slice(&o[&Kind::Pod]["uid-p1"].1).unwrap();
        assert!(body.get("status").is_none());
        assert!(body["metadata"].get("managedFields").is_none());
        // A change to s2 wakes n2 only; an unused secret wakes nobody.
        assert_eq!(c.put_config(Kind::Secret, config("s2", "y")), vec!["n2"]);
        assert!(c.put_config(Kind::Secret, config("other", "y")).is_empty());
        // Same content again: nothing to do.
        assert!(c.put_config(Kind::Secret, config("s2", "y")).is_empty());
    }

    #[test]
    fn status_and_resource_version_do_not_change_a_pods_version() {
        let mut c = Cache::default();
        let mut p = pod("p1", "n1", "cm1", "s1");
        c.put_pod(&p);
        let v1 = c.objects("n1")[&Kind::Pod]["uid-p1"].0.clone();
        p.metadata.resource_version = Some("8".into());
        p.status.as_mut().unwrap().phase = Some("Succeeded".into());
        c.put_pod(&p);
        assert_eq!(c.objects("n1")[&Kind::Pod]["uid-p1"].0, v1);
        p.metadata.labels = Some([("a".to_string(), "b".to_string())].into());
        c.put_pod(&p);
        assert_ne!(c.objects("n1")[&Kind::Pod]["uid-p1"].0, v1);
    }

    #[test]
    fn a_pods_tokens_reach_its_node_outlive_status_updates_and_go_with_it() {
        let mut c = Cache::default();
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p1", "namespace": "default", "uid": "uid-p1"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}],
                     "volumes": [{"name": "kube-api-access-x", "projected": {"sources": [
                        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                        {"serviceAccountToken": {"audience": "vault", "path": "vault"}}]}}]}
        }))
        .unwrap();
        c.put_pod(&p);
        let wants = c.token_wants_of("n1");
        assert_eq!(wants.len(), 1);
        let (key, uid, tokens) = &wants[0];
        assert_eq!(tokens.len(), 2);
        assert_eq!(tokens[1].audience.as_deref(), Some("vault"));
        assert_eq!(tokens[1].expiration_seconds, 3600);
        let token = |want: &TokenWant, t: &str| {
            strip(
                json!({"metadata": {"name": want.name, "namespace": "default", "uid": want.uid},
                         "status": {"token": t}}),
                false,
            )
        };
        // A token for a pod that is not (or no longer) this one: dropped.
        assert!(c
            .put_token(key, "uid-other", token(&tokens[0], "a"))
            .is_empty());
        assert_eq!(c.put_token(key, uid, token(&tokens[0], "a")), vec!["n1"]);
        assert_eq!(c.objects("n1")[&Kind::ServiceAccountToken].len(), 1);
        assert!(c.objects("n2")[&Kind::ServiceAccountToken].is_empty());
        // A status write-back is a pod update: the token stays.
        p.status = serde_json::from_value(json!({"phase": "Running"})).ok();
        c.put_pod(&p);
        assert_eq!(c.objects("n1")[&Kind::ServiceAccountToken].len(), 1);
        // Deleted: the token goes with the pod.
        c.remove_pod(key);
        assert!(c.token(&key.0, &tokens[0].name).is_none());
    }

    #[test]
    fn a_node_gets_its_devices_and_their_models_without_status() {
        let mut c = Cache::default();
        let dev = |name: &str, node: &str, model: &str| {
            json!({"metadata": {"name": name, "namespace": "plant", "uid": format!("uid-{name}")},
                   "spec": {"model": model, "nodeName": node, "protocol": {"mqtt": {}}},
                   "status": {"state": "Online"}})
        };
        let model = |name: &str| {
            json!({"metadata": {"name": name, "namespace": "plant", "uid": format!("uid-{name}")},
                   "spec": {"properties": []}})
        };
        assert_eq!(c.put_device(dev("d1", "n1", "m1")), vec!["n1"]);
        c.put_device(dev("d2", "n2", "m2"));
        assert_eq!(c.put_config(Kind::DeviceModel, model("m1")), vec!["n1"]);
        assert!(c.put_config(Kind::DeviceModel, model("m3")).is_empty());
        c.put_config(Kind::DeviceModel, model("m2"));
        let o = c.objects("n1");
        assert_eq!(o[&Kind::Device].keys().collect::<Vec<_>>(), vec!["uid-d1"]);
        assert_eq!(
            o[&Kind::DeviceModel].keys().collect::<Vec<_>>(),
            vec!["uid-m1"]
        );
        let body: Value = serde_json::from_slice(&o[&Kind::Device]["uid-d1"].1).unwrap();
        assert!(body.get("status").is_none());
        // A status write-back does not change what the node has.
        let v1 = o[&Kind::Device]["uid-d1"].0.clone();
        let mut d = dev("d1", "n1", "m1");
        d["status"]["state"] = "Offline".into();
        c.put_device(d);
        assert_eq!(c.objects("n1")[&Kind::Device]["uid-d1"].0, v1);
        // Moved to another model: the old one is no longer n1's.
        c.put_device(dev("d1", "n1", "m2"));
        assert_eq!(
            c.objects("n1")[&Kind::DeviceModel]
                .keys()
                .collect::<Vec<_>>(),
            vec!["uid-m2"]
        );
        assert!(c.put_config(Kind::DeviceModel, model("m1")).is_empty());
        assert_eq!(c.remove_device(&("plant".into(), "d1".into())), vec!["n1"]);
        assert!(c.objects("n1")[&Kind::Device].is_empty());
        assert!(c.device_by_uid("uid-d1").is_none());
        assert_eq!(
            c.device_by_uid("uid-d2").map(|(_, d)| d.node.as_str()),
            Some("n2")
        );
    }

    #[test]
    fn terminating_pods_are_marked_and_removal_unindexes() {
        let mut c = Cache::default();
        let mut p = pod("p1", "n1", "cm1", "s1");
        c.put_pod(&p);
        c.put_config(Kind::ConfigMap, config("cm1", "x"));
        p.metadata.deletion_timestamp = serde_json::from_value(json!("2026-01-01T00:00:00Z")).ok();
        c.put_pod(&p);
        // Still sent (the node stops it as the deletion says), with what
        // it uses.
        let body: Value = serde_json::from_slice(&c.objects("n1")[&Kind::Pod]["uid-p1"].1).unwrap();
        assert!(body["metadata"]["deletionTimestamp"].is_string());
        assert_eq!(c.objects("n1")[&Kind::ConfigMap].len(), 1);
        assert_eq!(c.terminating("n1"), vec!["uid-p1"]);
        assert_eq!(c.remove_pod(&("default".into(), "p1".into())), vec!["n1"]);
        assert!(c.terminating("n1").is_empty());
        assert!(c.put_config(Kind::ConfigMap, config("cm1", "z")).is_empty());
        assert!(c.pod_by_uid("uid-p1").is_none());
    }
}
