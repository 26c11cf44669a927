//! A pod's `/etc/resolv.conf` by its DNS policy, as the kubelet writes it
//! (pkg/kubelet/network/dns): ClusterFirst gives the cluster's DNS servers
//! with the search list `<ns>.svc.<domain> svc.<domain> <domain>` and the
//! host's after it, and ndots:5; ClusterFirst with hostNetwork, and
//! ClusterFirst on a node that knows no cluster DNS, fall back to Default
//! (the host's file); ClusterFirstWithHostNet keeps the cluster's; None
//! starts empty. The pod's `dnsConfig` is then added for every policy, and
//! the result held to the API's limits (3 nameservers, 32 search domains
//! of 2048 characters in all).

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

/// `[dns]` in the configuration: what the cluster's DNS is for this node's
/// pods (the kubelet's clusterDNS and clusterDomain).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterDns {
    /// The cluster's DNS domain.
    pub cluster_domain: String,
    /// Nameservers for ClusterFirst pods; empty: they get the host's
    /// resolver (Default), as a kubelet without clusterDNS does.
    pub cluster_dns: Vec<String>,
    /// The host's resolver configuration, for Default.
    pub resolv_conf: std::path::PathBuf,
}

impl Default for ClusterDns {
    fn default() -> Self {
        ClusterDns {
            cluster_domain: "cluster.local".into(),
            cluster_dns: Vec::new(),
            resolv_conf: "/etc/resolv.conf".into(),
        }
    }
}

const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;
const MAX_SEARCH_CHARS: usize = 2048;

#[derive(Debug, Default, PartialEq)]
struct Resolv {
    nameservers: Vec<String>,
    searches: Vec<String>,
    options: Vec<String>,
}

/// The parts of a resolv.conf the kubelet keeps: nameservers, search
/// domains (the last `search` or `domain` line wins, as in glibc), options.
fn parse(text: &str) -> Resolv {
    let mut r = Resolv::default();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        match f.next() {
            Some("nameserver") => r.nameservers.extend(f.next().map(String::from)),
            Some("search") | Some("domain") => r.searches = f.map(String::from).collect(),
            Some("options") => r.options.extend(f.map(String::from)),
            _ => {}
        }
    }
    r
}

fn push_unique(v: &mut Vec<String>, items: impl IntoIterator<Item = String>) {
    for i in items {
        if !i.is_empty() && !v.contains(&i) {
            v.push(i);
        }
    }
}

/// The pod's resolv.conf, from its spec, the node's cluster DNS settings
/// and the host's resolv.conf text.
pub fn resolv_conf(pod: &Pod, cluster: &ClusterDns, host: &str) -> String {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .unwrap_or("ClusterFirst");
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let cluster_first = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    } && !cluster.cluster_dns.is_empty();
    let host = parse(host);
    let mut r = if policy == "None" {
        Resolv::default()
    } else if cluster_first {
        let d = cluster.cluster_domain.trim_end_matches('.');
        let mut searches = vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.to_string()];
        push_unique(&mut searches, host.searches);
        Resolv {
            nameservers: cluster.cluster_dns.clone(),
            searches,
            options: vec!["ndots:5".into()],
        }
    } else {
        host
    };
    if let Some(c) = spec.and_then(|s| s.dns_config.as_ref()) {
        push_unique(
            &mut r.nameservers,
            c.nameservers.clone().unwrap_or_default(),
        );
        push_unique(&mut r.searches, c.searches.clone().unwrap_or_default());
        for o in c.options.iter().flatten() {
            let name = o.name.clone().unwrap_or_default();
            if name.is_empty() {
                continue;
            }
            let text = match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.clone(),
            };
            // The pod's value wins over one the policy gave.
            r.options
                .retain(|x| x.split(':').next() != Some(name.as_str()));
            r.options.push(text);
        }
    }
    r.nameservers.truncate(MAX_NAMESERVERS);
    let mut chars = 0;
    let mut kept = Vec::new();
    for s in r.searches.into_iter().take(MAX_SEARCHES) {
        chars += s.len() + usize::from(!kept.is_empty());
        if chars > MAX_SEARCH_CHARS {
            break;
        }
        kept.push(s);
    }
    let mut out = String::new();
    if !kept.is_empty() {
        out.push_str(&format!("search {}\n", kept.join(" ")));
    }
    for n in &r.nameservers {
        out.push_str(&format!("nameserver {n}\n"));
    }
    if !r.options.is_empty() {
        out.push_str(&format!("options {}\n", r.options.join(" ")));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: &str = "# from DHCP\nsearch plant.example\nnameserver 192.168.1.1\nnameserver 192.168.1.2\noptions edns0\n";

    fn pod(v: serde_json::Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn cluster() -> ClusterDns {
        ClusterDns {
            cluster_dns: vec!["10.96.0.10".into()],
            ..Default::default()
        }
    }

    #[test]
    fn cluster_first_gives_the_cluster_dns_and_the_kubelets_search_list() {
        let p = pod(
            serde_json::json!({"metadata": {"namespace": "plant"}, "spec": {"containers": []}}),
        );
        assert_eq!(
            resolv_conf(&p, &cluster(), HOST),
            "search plant.svc.cluster.local svc.cluster.local cluster.local plant.example\nnameserver 10.96.0.10\noptions ndots:5\n"
        );
    }

    #[test]
    fn host_network_and_a_node_without_cluster_dns_fall_back_to_the_host() {
        let host_net = pod(serde_json::json!({"spec": {"hostNetwork": true, "containers": []}}));
        let default =
            "search plant.example\nnameserver 192.168.1.1\nnameserver 192.168.1.2\noptions edns0\n";
        assert_eq!(resolv_conf(&host_net, &cluster(), HOST), default);
        let with_net = pod(
            serde_json::json!({"spec": {"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet", "containers": []}}),
        );
        assert!(resolv_conf(&with_net, &cluster(), HOST).contains("nameserver 10.96.0.10"));
        let plain = pod(serde_json::json!({"spec": {"containers": []}}));
        assert_eq!(resolv_conf(&plain, &ClusterDns::default(), HOST), default);
    }

    #[test]
    fn none_takes_only_the_pods_dns_config_and_options_merge() {
        let p = pod(
            serde_json::json!({"spec": {"dnsPolicy": "None", "containers": [],
            "dnsConfig": {"nameservers": ["1.1.1.1"], "searches": ["a.example"],
                          "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}]}}}),
        );
        assert_eq!(
            resolv_conf(&p, &cluster(), HOST),
            "search a.example\nnameserver 1.1.1.1\noptions ndots:2 edns0\n"
        );
        let q = pod(serde_json::json!({"spec": {"containers": [],
            "dnsConfig": {"nameservers": ["10.96.0.10", "9.9.9.9", "8.8.8.8", "7.7.7.7"],
                          "options": [{"name": "ndots", "value": "1"}]}}}));
        let r = resolv_conf(&q, &cluster(), HOST);
        assert!(
            r.contains("nameserver 10.96.0.10\nnameserver 9.9.9.9\nnameserver 8.8.8.8\n"),
            "{r}"
        );
        assert!(
            !r.contains("7.7.7.7") && r.ends_with("options ndots:1\n"),
            "{r}"
        );
    }

    #[test]
    fn search_lists_are_held_to_the_api_limits() {
        let many: Vec<String> = (0..40).map(|i| format!("d{i}.example")).collect();
        let p = pod(
            serde_json::json!({"spec": {"dnsPolicy": "None", "containers": [],
            "dnsConfig": {"searches": many}}}),
        );
        let r = resolv_conf(&p, &cluster(), "");
        let line = r.lines().next().unwrap();
        assert_eq!(line.split_whitespace().count(), 1 + 32);
    }
}
