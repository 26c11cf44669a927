//! Services at the edge, the cloud's half: which Services, EndpointSlices
//! and Nodes each edge node gets. Pure data beside the [`super::cache`]:
//! the watches feed it, [`super::cache::Cache::objects`] asks it.
//!
//! The rule: a node gets every Service of the namespaces its pods are in
//! (what those pods may call by short name), every Service annotated
//! [`ALL_EDGE_NODES`]`: "true"` (what edge pods of any namespace call,
//! say a broker in `plant`), and the EndpointSlices of those Services. It
//! gets its own Node and those of its site (the same
//! `topology.kubernetes.io/zone`), reduced to what routes between them
//! need (labels, pod CIDRs, addresses), so that a heartbeat does not send
//! anything down; the cluster's DNS domain and DNS Service address ride on
//! them as annotations.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{json, Value};

use super::cache::{strip, Key, Obj};
use crate::source::Versions;

/// A Service annotated with this (`"true"`) goes to every edge node.
pub const ALL_EDGE_NODES: &str = "outrigger.io/all-edge-nodes";
/// The label that names a node's site.
pub const ZONE: &str = "topology.kubernetes.io/zone";
/// On the Node bodies sent down: the cluster's DNS domain...
pub const CLUSTER_DOMAIN: &str = "outrigger.io/cluster-domain";
/// ... and its DNS Service's addresses (comma-separated).
pub const CLUSTER_DNS: &str = "outrigger.io/cluster-dns";
/// The label an EndpointSlice names its Service with.
const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Where the cluster's DNS lives, as nodes are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDns {
    pub domain: String,
    /// The DNS Service (namespace, name) whose ClusterIPs are the
    /// cluster's DNS address.
    pub service: Key,
}

impl Default for ClusterDns {
    fn default() -> Self {
        ClusterDns {
            domain: "cluster.local".into(),
            service: ("kube-system".into(), "kube-dns".into()),
        }
    }
}

#[derive(Debug, Clone)]
struct Svc {
    obj: Obj,
    everywhere: bool,
    cluster_ips: Vec<String>,
}

#[derive(Debug, Clone)]
struct NodeEntry {
    /// The API object, for rebuilding the body when the cluster DNS moves.
    raw: Value,
    obj: Obj,
    zone: Option<String>,
}

#[derive(Debug, Default)]
pub struct Services {
    pub dns: ClusterDns,
    services: HashMap<Key, Svc>,
    slices: HashMap<Key, (Obj, String)>,
    /// (namespace, service name) -> its slices' names.
    slices_of: HashMap<Key, BTreeSet<String>>,
    nodes: HashMap<String, NodeEntry>,
}

fn key_of(v: &Value) -> Key {
    let m = &v["metadata"];
    (
        m["namespace"].as_str().unwrap_or("default").to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

/// A Service's ClusterIPs ("None" for a headless one is no address).
fn cluster_ips(v: &Value) -> Vec<String> {
    let spec = &v["spec"];
    let mut ips: Vec<String> = spec["clusterIPs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect();
    if ips.is_empty() {
        ips.extend(spec["clusterIP"].as_str().map(String::from));
    }
    ips.retain(|ip| !ip.is_empty() && ip != "None");
    ips
}

impl Services {
    /// The nodes a change in namespace `ns` (or, `everywhere`, anywhere)
    /// concerns, given the nodes with pods there.
    fn concerned(&self, everywhere: bool, with_pods: Vec<String>) -> Vec<String> {
        if !everywhere {
            return with_pods;
        }
        let mut all: BTreeSet<String> = with_pods.into_iter().collect();
        all.extend(self.nodes.keys().cloned());
        all.into_iter().collect()
    }

    /// A Service added or changed. `with_pods`: the nodes with pods in its
    /// namespace. Returns the nodes it concerns.
    pub fn put_service(
        &mut self,
        versions: &Versions,
        v: Value,
        with_pods: Vec<String>,
    ) -> Vec<String> {
        let key = key_of(&v);
        let everywhere = v["metadata"]["annotations"][ALL_EDGE_NODES].as_str() == Some("true");
        let ips = cluster_ips(&v);
        let obj = strip(v, true);
        versions.insert(&obj.version, obj.body.clone());
        let old = self.services.insert(
            key.clone(),
            Svc {
                obj: obj.clone(),
                everywhere,
                cluster_ips: ips.clone(),
            },
        );
        let mut nodes = Vec::new();
        if key == self.dns.service && old.as_ref().map(|o| &o.cluster_ips) != Some(&ips) {
            nodes.extend(self.rebuild_nodes(versions));
        }
        if old.as_ref().is_some_and(|o| o.obj.version == obj.version) {
            return nodes;
        }
        let was_everywhere = old.is_some_and(|o| o.everywhere);
        nodes.extend(self.concerned(everywhere || was_everywhere, with_pods));
        nodes
    }

    pub fn remove_service(
        &mut self,
        versions: &Versions,
        key: &Key,
        with_pods: Vec<String>,
    ) -> Vec<String> {
        let Some(old) = self.services.remove(key) else {
            return Vec::new();
        };
        let mut nodes = Vec::new();
        if *key == self.dns.service {
            nodes.extend(self.rebuild_nodes(versions));
        }
        nodes.extend(self.concerned(old.everywhere, with_pods));
        nodes
    }

    /// The Service a slice belongs to.
    fn slice_service(v: &Value) -> String {
        v["metadata"]["labels"][SERVICE_NAME]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// An EndpointSlice added or changed; the nodes it concerns.
    pub fn put_slice(
        &mut self,
        versions: &Versions,
        v: Value,
        with_pods: Vec<String>,
    ) -> Vec<String> {
        let key = key_of(&v);
        let service = Self::slice_service(&v);
        let obj = strip(v, false);
        versions.insert(&obj.version, obj.body.clone());
        if self
            .slices
            .get(&key)
            .is_some_and(|(o, s)| o.version == obj.version && *s == service)
        {
            return Vec::new();
        }
        let old = self.unindex_slice(&key);
        self.slices_of
            .entry((key.0.clone(), service.clone()))
            .or_default()
            .insert(key.1.clone());
        self.slices.insert(key.clone(), (obj, service.clone()));
        let mut everywhere = self.everywhere(&key.0, &service);
        if let Some(old) = old {
            everywhere |= self.everywhere(&key.0, &old);
        }
        self.concerned(everywhere, with_pods)
    }

    pub fn remove_slice(&mut self, key: &Key, with_pods: Vec<String>) -> Vec<String> {
        match self.unindex_slice(key) {
            Some(service) => {
                let everywhere = self.everywhere(&key.0, &service);
                self.concerned(everywhere, with_pods)
            }
            None => Vec::new(),
        }
    }

    fn unindex_slice(&mut self, key: &Key) -> Option<String> {
        let (_, service) = self.slices.remove(key)?;
        let skey = (key.0.clone(), service.clone());
        if let Some(set) = self.slices_of.get_mut(&skey) {
            set.remove(&key.1);
            if set.is_empty() {
                self.slices_of.remove(&skey);
            }
        }
        Some(service)
    }

    fn everywhere(&self, ns: &str, service: &str) -> bool {
        self.services
            .get(&(ns.to_string(), service.to_string()))
            .is_some_and(|s| s.everywhere)
    }

    /// The cluster DNS addresses now.
    fn dns_ips(&self) -> Vec<String> {
        self.services
            .get(&self.dns.service)
            .map(|s| s.cluster_ips.clone())
            .unwrap_or_default()
    }

    /// What a node is sent of a Node: identity, labels, pod CIDRs,
    /// addresses, and the cluster's DNS settings.
    fn node_body(&self, v: &Value) -> Value {
        let m = &v["metadata"];
        let mut annotations = BTreeMap::new();
        annotations.insert(CLUSTER_DOMAIN.to_string(), self.dns.domain.clone());
        annotations.insert(CLUSTER_DNS.to_string(), self.dns_ips().join(","));
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": m["name"], "uid": m["uid"], "labels": m["labels"],
                         "annotations": annotations},
            "spec": {"podCIDR": v["spec"]["podCIDR"], "podCIDRs": v["spec"]["podCIDRs"]},
            "status": {"addresses": v["status"]["addresses"]},
        })
    }

    fn zone_peers(&self, zone: Option<&str>, node: &str) -> Vec<String> {
        match zone {
            None => vec![node.to_string()],
            Some(z) => self
                .nodes
                .iter()
                .filter(|(_, e)| e.zone.as_deref() == Some(z))
                .map(|(n, _)| n.clone())
                .chain([node.to_string()])
                .collect(),
        }
    }

    /// An edge Node added or changed; the nodes it concerns (its site's).
    pub fn put_node(&mut self, versions: &Versions, v: Value) -> Vec<String> {
        let name = v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let zone = v["metadata"]["labels"][ZONE]
            .as_str()
            .filter(|z| !z.is_empty())
            .map(String::from);
        let obj = strip(self.node_body(&v), false);
        versions.insert(&obj.version, obj.body.clone());
        let old = self.nodes.insert(
            name.clone(),
            NodeEntry {
                raw: v,
                obj: obj.clone(),
                zone: zone.clone(),
            },
        );
        if let Some(o) = &old {
            if o.obj.version == obj.version {
                return Vec::new();
            }
        }
        let mut out: BTreeSet<String> = self
            .zone_peers(zone.as_deref(), &name)
            .into_iter()
            .collect();
        if let Some(o) = old {
            out.extend(self.zone_peers(o.zone.as_deref(), &name));
        }
        out.into_iter().collect()
    }

    pub fn remove_node(&mut self, name: &str) -> Vec<String> {
        match self.nodes.remove(name) {
            Some(o) => self.zone_peers(o.zone.as_deref(), name),
            None => Vec::new(),
        }
    }

    pub fn node_names(&self) -> Vec<Key> {
        self.nodes
            .keys()
            .map(|n| ("default".to_string(), n.clone()))
            .collect()
    }

    pub fn service_keys(&self) -> Vec<Key> {
        self.services.keys().cloned().collect()
    }

    pub fn slice_keys(&self) -> Vec<Key> {
        self.slices.keys().cloned().collect()
    }

    /// Every node's body again (the DNS Service moved); every node.
    fn rebuild_nodes(&mut self, versions: &Versions) -> Vec<String> {
        let names: Vec<String> = self.nodes.keys().cloned().collect();
        for n in &names {
            if let Some(raw) = self.nodes.get(n).map(|e| e.raw.clone()) {
                let obj = strip(self.node_body(&raw), false);
                versions.insert(&obj.version, obj.body.clone());
                if let Some(e) = self.nodes.get_mut(n) {
                    e.obj = obj;
                }
            }
        }
        names
    }

    /// What `node`, with pods in `namespaces`, gets: (Nodes, Services,
    /// EndpointSlices).
    pub fn for_node(
        &self,
        node: &str,
        namespaces: &BTreeSet<String>,
    ) -> (Vec<&Obj>, Vec<&Obj>, Vec<&Obj>) {
        let zone = self.nodes.get(node).and_then(|n| n.zone.as_deref());
        let nodes = match zone {
            Some(z) => self
                .nodes
                .values()
                .filter(|e| e.zone.as_deref() == Some(z))
                .map(|e| &e.obj)
                .collect(),
            None => self.nodes.get(node).map(|e| &e.obj).into_iter().collect(),
        };
        let mut services = Vec::new();
        let mut slices = Vec::new();
        for (key, s) in &self.services {
            if !s.everywhere && !namespaces.contains(&key.0) {
                continue;
            }
            services.push(&s.obj);
            for name in self.slices_of.get(key).into_iter().flatten() {
                if let Some((o, _)) = self.slices.get(&(key.0.clone(), name.clone())) {
                    slices.push(o);
                }
            }
        }
        (nodes, services, slices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, ip: &str, everywhere: bool) -> Value {
        let mut v = json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{ns}-{name}")},
               "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"port": 80}]}});
        if everywhere {
            v["metadata"]["annotations"] = json!({ALL_EDGE_NODES: "true"});
        }
        v
    }

    fn slice(ns: &str, name: &str, service: &str, ip: &str) -> Value {
        json!({"metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"),
                            "labels": {SERVICE_NAME: service}},
               "addressType": "IPv4", "endpoints": [{"addresses": [ip]}]})
    }

    fn node(name: &str, zone: Option<&str>, cidr: &str) -> Value {
        let mut v = json!({"metadata": {"name": name, "uid": format!("uid-{name}"), "labels": {}},
               "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.168.1.2"}],
                          "conditions": [{"type": "Ready", "lastHeartbeatTime": "2026-01-01T00:00:00Z"}]}});
        if let Some(z) = zone {
            v["metadata"]["labels"][ZONE] = z.into();
        }
        v
    }

    fn v() -> Versions {
        Versions::new(64)
    }

    fn names(objs: &[&Obj]) -> Vec<String> {
        let mut v: Vec<String> = objs.iter().map(|o| o.uid.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn a_node_gets_the_services_of_its_namespaces_and_the_annotated_ones() {
        let mut s = Services::default();
        assert_eq!(
            s.put_service(
                &v(),
                svc("plant", "broker", "10.0.0.5", false),
                vec!["n1".into()]
            ),
            vec!["n1"]
        );
        s.put_service(&v(), svc("office", "crm", "10.0.0.6", false), vec![]);
        s.put_node(&v(), node("n1", None, "10.244.1.0/24"));
        s.put_node(&v(), node("n2", None, "10.244.2.0/24"));
        // Annotated: every edge node hears of it.
        let mut touched = s.put_service(&v(), svc("shared", "ntp", "10.0.0.7", true), vec![]);
        touched.sort();
        assert_eq!(touched, vec!["n1", "n2"]);
        s.put_slice(
            &v(),
            slice("plant", "broker-abc", "broker", "10.244.1.5"),
            vec!["n1".into()],
        );
        s.put_slice(
            &v(),
            slice("office", "crm-abc", "crm", "10.244.9.5"),
            vec![],
        );
        let ns: BTreeSet<String> = ["plant".to_string()].into();
        let (_, services, slices) = s.for_node("n1", &ns);
        assert_eq!(names(&services), vec!["uid-plant-broker", "uid-shared-ntp"]);
        assert_eq!(names(&slices), vec!["uid-broker-abc"]);
        // The same slice again: nothing to send.
        assert!(s
            .put_slice(
                &v(),
                slice("plant", "broker-abc", "broker", "10.244.1.5"),
                vec!["n1".into()]
            )
            .is_empty());
        assert_eq!(
            s.remove_slice(&("plant".into(), "broker-abc".into()), vec!["n1".into()]),
            vec!["n1"]
        );
        assert!(s.for_node("n1", &ns).2.is_empty());
    }

    #[test]
    fn a_node_gets_its_site_and_heartbeats_do_not_change_it() {
        let mut s = Services::default();
        s.put_node(&v(), node("a", Some("plant-1"), "10.244.1.0/24"));
        let mut touched = s.put_node(&v(), node("b", Some("plant-1"), "10.244.2.0/24"));
        touched.sort();
        assert_eq!(touched, vec!["a", "b"]);
        s.put_node(&v(), node("c", Some("plant-2"), "10.244.3.0/24"));
        s.put_node(&v(), node("d", None, "10.244.4.0/24"));
        let none = BTreeSet::new();
        assert_eq!(names(&s.for_node("a", &none).0), vec!["uid-a", "uid-b"]);
        assert_eq!(names(&s.for_node("d", &none).0), vec!["uid-d"]);
        // A heartbeat: same body, nobody woken.
        let mut b = node("b", Some("plant-1"), "10.244.2.0/24");
        b["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-01-01T00:01:00Z".into();
        assert!(s.put_node(&v(), b).is_empty());
        // b moves to the other site: both sites hear of it.
        let mut touched = s.put_node(&v(), node("b", Some("plant-2"), "10.244.2.0/24"));
        touched.sort();
        assert_eq!(touched, vec!["a", "b", "c"]);
        assert_eq!(names(&s.for_node("a", &none).0), vec!["uid-a"]);
    }

    #[test]
    fn the_cluster_dns_address_rides_on_the_node_bodies() {
        let mut s = Services::default();
        s.put_node(&v(), node("a", None, "10.244.1.0/24"));
        let body = |s: &Services| -> Value {
            serde_json::from_slice(&s.for_node("a", &BTreeSet::new()).0[0].body).unwrap()
        };
        assert_eq!(body(&s)["metadata"]["annotations"][CLUSTER_DNS], "");
        assert_eq!(
            body(&s)["metadata"]["annotations"][CLUSTER_DOMAIN],
            "cluster.local"
        );
        let touched = s.put_service(
            &v(),
            svc("kube-system", "kube-dns", "10.0.0.10", false),
            vec![],
        );
        assert_eq!(touched, vec!["a"]);
        assert_eq!(
            body(&s)["metadata"]["annotations"][CLUSTER_DNS],
            "10.0.0.10"
        );
        assert!(body(&s)["status"].get("conditions").is_none());
    }
}
