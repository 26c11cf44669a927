//! What the node knows of Services, as the DNS server and the ClusterIP
//! rules read it: built from the store's Services, EndpointSlices and site
//! Nodes, with the node's own pods' readiness taken from the pods
//! themselves (what the node sees beats the last slice it heard, above all
//! through a cut). Pure: no I/O.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod, Service as KService};
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The annotations cloud-gw puts on the Node bodies it sends (its
/// `bridge::services` has the same names).
pub const CLUSTER_DOMAIN: &str = "outrigger.io/cluster-domain";
pub const CLUSTER_DNS: &str = "outrigger.io/cluster-dns";
pub const ZONE: &str = "topology.kubernetes.io/zone";
const SERVICE_NAME: &str = "kubernetes.io/service-name";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    fn parse(s: Option<&str>) -> Protocol {
        match s {
            Some("UDP") => Protocol::Udp,
            Some("SCTP") => Protocol::Sctp,
            _ => Protocol::Tcp,
        }
    }

    /// As iptables and SRV names spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub ready: bool,
    /// Shared by the endpoints of a slice (a table holds thousands).
    pub node: Option<Arc<str>>,
    pub zone: Option<Arc<str>>,
    pub hostname: Option<String>,
    /// (name, protocol) -> port: the slice's ports, shared by its endpoints.
    pub ports: Arc<[(String, Protocol, u16)]>,
}

impl Endpoint {
    /// The endpoint's port for a Service port (matched by name, as the
    /// slice controller names them after the Service's).
    pub fn port_for(&self, p: &Port) -> Option<u16> {
        self.ports
            .iter()
            .find(|(n, proto, _)| *n == p.name && *proto == p.protocol)
            .map(|(_, _, port)| *port)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    /// clusterIP None: DNS answers with the endpoints.
    pub headless: bool,
    pub external_name: Option<String>,
    pub ports: Vec<Port>,
    /// sessionAffinity ClientIP's timeout.
    pub affinity_secs: Option<u32>,
    /// externalTrafficPolicy Local: NodePorts go to this node's endpoints
    /// only, keeping the client's address.
    pub external_local: bool,
    pub endpoints: Vec<Endpoint>,
}

impl Service {
    /// Where traffic to the Service goes from this node: its ready
    /// endpoints here if any, else those of its site (`zone`), else all
    /// ready ones.
    pub fn chosen(&self, node: &str, zone: Option<&str>) -> Vec<&Endpoint> {
        let ready: Vec<&Endpoint> = self.endpoints.iter().filter(|e| e.ready).collect();
        let local: Vec<&Endpoint> = ready
            .iter()
            .copied()
            .filter(|e| e.node.as_deref() == Some(node))
            .collect();
        if !local.is_empty() {
            return local;
        }
        if let Some(z) = zone {
            let site: Vec<&Endpoint> = ready
                .iter()
                .copied()
                .filter(|e| e.zone.as_deref() == Some(z))
                .collect();
            if !site.is_empty() {
                return site;
            }
        }
        ready
    }

    /// The ready endpoints on this node (externalTrafficPolicy Local).
    pub fn local(&self, node: &str) -> Vec<&Endpoint> {
        self.endpoints
            .iter()
            .filter(|e| e.ready && e.node.as_deref() == Some(node))
            .collect()
    }
}

/// A gateway of this node's site: where its pods are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    pub pod_cidrs: Vec<String>,
    pub address: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    pub node: String,
    pub zone: Option<String>,
    pub domain: String,
    /// The cluster DNS Service's addresses (pods that name it reach the
    /// node's own server).
    pub cluster_dns: Vec<IpAddr>,
    /// This node's pod CIDR, as the cluster allocated it.
    pub pod_cidr: Option<String>,
    /// The other gateways of the site.
    pub peers: Vec<Peer>,
    pub services: BTreeMap<(String, String), Service>,
}

/// The node's own pods: (namespace, name) -> Ready, from their status.
pub type LocalReady = HashMap<(String, String), bool>;

pub fn local_ready(pods: &[Pod]) -> LocalReady {
    pods.iter()
        .map(|p| {
            let ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (
                (
                    p.metadata.namespace.clone().unwrap_or_default(),
                    p.metadata.name.clone().unwrap_or_default(),
                ),
                ready,
            )
        })
        .collect()
}

/// One `Arc` per distinct name.
fn shared<'a>(names: &mut HashMap<&'a str, Arc<str>>, n: Option<&'a str>) -> Option<Arc<str>> {
    n.map(|n| names.entry(n).or_insert_with(|| n.into()).clone())
}

/// A gateway's own address. Where cloud-gw serves the node's kubelet API
/// the InternalIP is cloud-gw's and the gateway's own is its ExternalIP
/// (cloud-gw's `bridge::nodes::addresses`); else its InternalIP.
fn node_address(n: &Node) -> Option<Ipv4Addr> {
    let addrs = n.status.as_ref()?.addresses.as_ref()?;
    addrs
        .iter()
        .filter(|a| a.type_ == "ExternalIP")
        .chain(addrs.iter().filter(|a| a.type_ == "InternalIP"))
        .find_map(|a| a.address.parse().ok())
}

fn pod_cidrs(n: &Node) -> Vec<String> {
    let spec = n.spec.as_ref();
    let mut v: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if v.is_empty() {
        v.extend(spec.and_then(|s| s.pod_cidr.clone()));
    }
    v.retain(|c| !c.is_empty());
    v
}

impl Table {
    /// The table from what the store holds. `node`: this node's name;
    /// `local`: its pods' readiness.
    pub fn build(
        node: &str,
        nodes: &[Node],
        services: &[KService],
        slices: &[EndpointSlice],
        local: &LocalReady,
    ) -> Table {
        let mut t = Table::new(node, nodes);
        for s in services {
            t.add_service(s);
        }
        for sl in slices {
            t.add_slice(sl, local);
        }
        t.finish()
    }

    /// A table of no Services yet: the node's own facts and its site's
    /// gateways from the Nodes. Services, then their slices, are added one
    /// at a time as the store is read (what is kept is the table's compact
    /// form, never every object at once), then [`Table::finish`].
    pub fn new(node: &str, nodes: &[Node]) -> Table {
        let own = nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(node));
        let annotation = |k: &str| {
            own.and_then(|n| n.metadata.annotations.as_ref())
                .and_then(|a| a.get(k))
                .cloned()
        };
        let zone = own
            .and_then(|n| n.metadata.labels.as_ref())
            .and_then(|l| l.get(ZONE))
            .filter(|z| !z.is_empty())
            .cloned();
        Table {
            node: node.to_string(),
            zone,
            domain: annotation(CLUSTER_DOMAIN)
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| "cluster.local".into()),
            cluster_dns: annotation(CLUSTER_DNS)
                .unwrap_or_default()
                .split(',')
                .filter_map(|s| s.trim().parse().ok())
                .collect(),
            pod_cidr: own.and_then(|n| pod_cidrs(n).into_iter().next()),
            peers: nodes
                .iter()
                .filter(|n| n.metadata.name.as_deref() != Some(node))
                .map(|n| Peer {
                    name: n.metadata.name.clone().unwrap_or_default(),
                    pod_cidrs: pod_cidrs(n),
                    address: node_address(n),
                })
                .collect(),
            services: BTreeMap::new(),
        }
    }

    pub fn add_service(&mut self, s: &KService) {
        let Some(spec) = &s.spec else { return };
        let namespace = s.metadata.namespace.clone().unwrap_or_default();
        let name = s.metadata.name.clone().unwrap_or_default();
        let mut ips: Vec<String> = spec.cluster_ips.clone().unwrap_or_default();
        if ips.is_empty() {
            ips.extend(spec.cluster_ip.clone());
        }
        let headless = ips.iter().any(|i| i == "None");
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        self.services.insert(
            (namespace.clone(), name.clone()),
            Service {
                namespace,
                name,
                cluster_ips: ips.iter().filter_map(|i| i.parse().ok()).collect(),
                headless,
                external_name: (kind == "ExternalName")
                    .then(|| spec.external_name.clone())
                    .flatten(),
                ports: spec
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| {
                        Some(Port {
                            name: p.name.clone().unwrap_or_default(),
                            protocol: Protocol::parse(p.protocol.as_deref()),
                            port: u16::try_from(p.port).ok()?,
                            node_port: p
                                .node_port
                                .and_then(|n| u16::try_from(n).ok())
                                .filter(|_| matches!(kind, "NodePort" | "LoadBalancer")),
                        })
                    })
                    .collect(),
                affinity_secs: (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                    spec.session_affinity_config
                        .as_ref()
                        .and_then(|c| c.client_ip.as_ref())
                        .and_then(|c| c.timeout_seconds)
                        .and_then(|s| u32::try_from(s).ok())
                        .unwrap_or(10800)
                }),
                external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
                endpoints: Vec::new(),
            },
        );
    }

    /// A slice's endpoints onto its Service (added before: a slice of a
    /// Service not in the table is not used).
    pub fn add_slice(&mut self, sl: &EndpointSlice, local: &LocalReady) {
        let Some(svc) = sl
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME))
        else {
            return;
        };
        let ns = sl.metadata.namespace.clone().unwrap_or_default();
        let node = self.node.as_str();
        let Some(s) = self.services.get_mut(&(ns.clone(), svc.clone())) else {
            return;
        };
        let ports: Arc<[(String, Protocol, u16)]> = sl
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    Protocol::parse(p.protocol.as_deref()),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        // One copy of each node and zone name per slice.
        let mut names: HashMap<&str, Arc<str>> = HashMap::new();
        for e in sl.endpoints.iter().flatten() {
            let c = e.conditions.as_ref();
            let mut ready = c.and_then(|c| c.ready).unwrap_or(true);
            let on_this_node = e.node_name.as_deref() == Some(node);
            // A pod of this node: its own status says.
            if let (true, Some(r)) = (on_this_node, e.target_ref.as_ref()) {
                if r.kind.as_deref() == Some("Pod") {
                    let key = (
                        r.namespace.clone().unwrap_or_else(|| ns.clone()),
                        r.name.clone().unwrap_or_default(),
                    );
                    // Gone from the node: not ready, whatever the slice says.
                    ready = local.get(&key).copied().unwrap_or(false);
                }
            }
            let node_name = shared(&mut names, e.node_name.as_deref());
            let zone = shared(&mut names, e.zone.as_deref());
            for a in &e.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                s.endpoints.push(Endpoint {
                    ip,
                    ready,
                    node: node_name.clone(),
                    zone: zone.clone(),
                    hostname: e.hostname.clone(),
                    ports: ports.clone(),
                });
            }
        }
    }

    /// Endpoints in address order, each once (a pod in two slices of a
    /// Service while the controller moves it).
    pub fn finish(mut self) -> Table {
        for s in self.services.values_mut() {
            s.endpoints.sort_by_key(|e| e.ip);
            s.endpoints
                .dedup_by(|a, b| a.ip == b.ip && a.ports == b.ports);
            s.endpoints.shrink_to_fit();
        }
        self
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        self.services
            .get(&(namespace.to_string(), name.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub(crate) fn sample(node: &str, local: &LocalReady) -> Table {
        let nodes: Vec<Node> = serde_json::from_value(json!([
            {"metadata": {"name": "a", "labels": {ZONE: "plant-1"},
                          "annotations": {CLUSTER_DOMAIN: "cluster.local", CLUSTER_DNS: "10.0.0.10"}},
             "spec": {"podCIDR": "10.244.1.0/24"},
             "status": {"addresses": [{"type": "Hostname", "address": "a"}, {"type": "InternalIP", "address": "192.168.50.2"}]}},
            {"metadata": {"name": "b", "labels": {ZONE: "plant-1"}},
             "spec": {"podCIDR": "10.244.2.0/24"},
             "status": {"addresses": [{"type": "InternalIP", "address": "192.168.50.3"}]}}
        ]))
        .unwrap();
        let services: Vec<KService> = serde_json::from_value(json!([
            {"metadata": {"name": "web", "namespace": "plant"},
             "spec": {"clusterIP": "10.0.0.20", "clusterIPs": ["10.0.0.20"], "type": "NodePort",
                      "ports": [{"name": "http", "port": 80, "protocol": "TCP", "nodePort": 30080}]}},
            {"metadata": {"name": "db", "namespace": "plant"},
             "spec": {"clusterIP": "None", "clusterIPs": ["None"],
                      "ports": [{"name": "pg", "port": 5432}]}},
            {"metadata": {"name": "out", "namespace": "plant"},
             "spec": {"type": "ExternalName", "externalName": "example.org"}}
        ]))
        .unwrap();
        let slices: Vec<EndpointSlice> = serde_json::from_value(json!([
            {"metadata": {"name": "web-1", "namespace": "plant", "labels": {SERVICE_NAME: "web"}},
             "addressType": "IPv4", "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
             "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}, "nodeName": "a", "zone": "plant-1",
                 "targetRef": {"kind": "Pod", "namespace": "plant", "name": "web-a"}},
                {"addresses": ["10.244.2.5"], "conditions": {"ready": true}, "nodeName": "b", "zone": "plant-1"},
                {"addresses": ["10.244.9.5"], "conditions": {"ready": true}, "nodeName": "z", "zone": "other"},
                {"addresses": ["10.244.9.6"], "conditions": {"ready": false}, "nodeName": "z", "zone": "other"}]},
            {"metadata": {"name": "db-1", "namespace": "plant", "labels": {SERVICE_NAME: "db"}},
             "addressType": "IPv4", "ports": [{"name": "pg", "port": 5432}],
             "endpoints": [{"addresses": ["10.244.2.7"], "hostname": "db-0", "nodeName": "b"}]}
        ]))
        .unwrap();
        Table::build(node, &nodes, &services, &slices, local)
    }

    #[test]
    fn the_table_holds_services_endpoints_and_the_site() {
        let local: LocalReady = [(("plant".into(), "web-a".into()), true)].into();
        let t = sample("a", &local);
        assert_eq!(t.zone.as_deref(), Some("plant-1"));
        assert_eq!(t.cluster_dns, vec!["10.0.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(t.pod_cidr.as_deref(), Some("10.244.1.0/24"));
        assert_eq!(
            t.peers,
            vec![Peer {
                name: "b".into(),
                pod_cidrs: vec!["10.244.2.0/24".into()],
                address: Some("192.168.50.3".parse().unwrap()),
            }]
        );
        let web = t.service("plant", "web").unwrap();
        assert_eq!(web.ports[0].node_port, Some(30080));
        assert_eq!(web.endpoints[0].port_for(&web.ports[0]), Some(8080));
        let db = t.service("plant", "db").unwrap();
        assert!(db.headless && db.cluster_ips.is_empty());
        assert_eq!(db.endpoints[0].hostname.as_deref(), Some("db-0"));
        assert_eq!(
            t.service("plant", "out").unwrap().external_name.as_deref(),
            Some("example.org")
        );
    }

    #[test]
    fn endpoints_here_then_on_the_site_then_anywhere() {
        let ips = |v: Vec<&Endpoint>| v.iter().map(|e| e.ip.to_string()).collect::<Vec<_>>();
        let mut local: LocalReady = [(("plant".into(), "web-a".into()), true)].into();
        let t = sample("a", &local);
        let web = t.service("plant", "web").unwrap();
        assert_eq!(ips(web.chosen("a", t.zone.as_deref())), vec!["10.244.1.5"]);
        // Its own pod not ready (whatever the slice said): the site's.
        local.insert(("plant".into(), "web-a".into()), false);
        let t = sample("a", &local);
        let web = t.service("plant", "web").unwrap();
        assert_eq!(ips(web.chosen("a", t.zone.as_deref())), vec!["10.244.2.5"]);
        assert!(web.local("a").is_empty());
        // A node of no site: every ready endpoint.
        assert_eq!(ips(web.chosen("q", None)), vec!["10.244.2.5", "10.244.9.5"]);
    }
}
