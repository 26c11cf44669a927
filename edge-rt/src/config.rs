//! The node configuration: one TOML file, every key optional.
//!
//! ```toml
//! [node]
//! data_dir = "/var/lib/edge-rt"        # image store and node state
//! manifests_dir = "/etc/edge-rt/pods"  # static pod manifests
//! preload_dir = "/usr/share/edge-rt/images"  # image archives imported at start
//! max_pods = 110                       # the node's pod capacity, as reported
//! extended_resources = {}              # e.g. { "example.com/modbus" = "2" }
//!
//! [images]
//! budget_bytes = 4294967296            # image store disk budget (4 GiB)
//! gc_interval_secs = 300
//!
//! [registry]
//! insecure = []                        # registries reached over plain HTTP
//! ca_bundle = "/etc/edge-rt/registry-ca.pem"
//!
//! [runtime]
//! state_dir = "/run/edge-rt"
//! log_dir = "/var/log/pods"
//! cgroup_parent = "/edge-rt"
//! rootfs = "auto"                      # auto | overlay | copy
//! log_max_bytes = 10485760
//! log_max_files = 3
//! pids_limit = 4096
//!
//! [network]
//! enabled = true                       # false: pods get loopback only
//! bridge = "outrigger0"
//! pod_cidr = "10.88.0.0/16"            # the bridge takes the first address
//! masquerade = true                    # NAT pod traffic leaving the node
//!
//! [store]
//! path = "/var/lib/edge-rt/store.db"   # default: store.db in node.data_dir
//! key_file = "/var/lib/edge-rt/store.key"  # seals Secrets at rest; created if missing
//! min_free_bytes = 4194304             # below this, new objects are refused
//! events_max = 5000                    # unsent events kept (a ring)
//!
//! [api]
//! socket = "/run/edge-rt/edge-rt.sock" # default: edge-rt.sock in runtime.state_dir
//! group = "edge"                       # may also use the CLI (default: root only)
//! metrics_listen = "127.0.0.1:9102"    # Prometheus /metrics (default: off)
//!
//! [devices]
//! embedded_broker = true               # run an MQTT broker (rumqttd) as a child process
//! broker_listen = ["127.0.0.1:1883", "bridge:1883"]  # its listeners; bridge: the pod bridge's
//!                                      # address (left out when pods have no network)
//! broker_users_file = "/etc/edge-rt/mqtt-users"  # user:password lines; default: no login asked
//! mqtt_broker = "127.0.0.1:1883"       # with embedded_broker = false: the broker to use;
//!                                      # "mqtts://broker.plant:8883" for TLS (port default 8883)
//! mqtt_ca_file = "/etc/edge-rt/mqtt-ca.pem"    # TLS: the CAs to trust (default: the system's)
//! mqtt_cert_file = "/etc/edge-rt/mqtt.pem"     # TLS: a client certificate, with mqtt_key_file
//! mqtt_key_file = "/etc/edge-rt/mqtt.key"
//! publish_twins = true                 # Modbus devices' twins on the broker's twin topics too
//! mqtt_client_id = "edge-rt"           # default: edge-rt-<node name>
//! mqtt_username = "edge-rt"            # with mqtt_password_file; default: none
//! mqtt_password_file = "/etc/edge-rt/mqtt-password"
//!
//! [dns]                                # pods' resolv.conf, as the kubelet writes it
//! cluster_domain = "cluster.local"
//! cluster_dns = []                     # ClusterFirst pods' nameservers; empty: the node's DNS server
//!                                      # (below), or the host's without it
//! resolv_conf = "/etc/resolv.conf"     # the host's, for Default, and the node DNS server's upstreams
//!
//! [services]                           # Services at the edge (README, "Services and DNS")
//! dns = true                           # serve cluster DNS to pods
//! dns_listen = []                      # e.g. ["10.0.0.1:53"]; empty: the pod bridge's address
//! rules = true                         # ClusterIP and NodePort rules (iptables)
//! routes = true                        # routes to the pod CIDRs of the site's other gateways
//!
//! [accelerators]
//! detect = true                        # GPUs, NPUs, TPUs of the README's table
//! dev_dir = "/dev"
//! sys_dir = "/sys"
//! cdi_spec_dirs = ["/etc/cdi", "/var/run/cdi"]  # vendors' CDI specs; later ones win a name
//! cdi_annotations = true               # honour cdi.k8s.io/* annotations on pods
//! rename = {}                          # e.g. { "nxp.com/npu" = "example.com/imx-npu" }
//! # [[accelerators.device]]            # devices named here: every node matching
//! # resource = "example.com/camera"    # glob (under dev_dir) is one device of
//! # glob = "video[0-9]*"               # resource, that count containers may
//! # count = 1                          # hold at once
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::image::registry::RegistryConfig;
use crate::runtime::RuntimeConfig;

pub const DEFAULT_PATH: &str = "/etc/edge-rt/config.toml";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeSection {
    pub data_dir: PathBuf,
    pub manifests_dir: PathBuf,
    pub preload_dir: PathBuf,
    /// The node's `pods` capacity, reported to the cluster.
    pub max_pods: u32,
    /// Extended resources the node offers (e.g. `"example.com/modbus" =
    /// "2"`), reported as capacity for the scheduler.
    pub extended_resources: std::collections::BTreeMap<String, String>,
}

impl Default for NodeSection {
    fn default() -> Self {
        NodeSection {
            data_dir: "/var/lib/edge-rt".into(),
            manifests_dir: "/etc/edge-rt/pods".into(),
            preload_dir: "/usr/share/edge-rt/images".into(),
            max_pods: 110,
            extended_resources: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImagesSection {
    pub budget_bytes: u64,
    pub gc_interval_secs: u64,
}

impl Default for ImagesSection {
    fn default() -> Self {
        ImagesSection {
            budget_bytes: 4 << 30,
            gc_interval_secs: 300,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub node: NodeSection,
    pub images: ImagesSection,
    pub registry: RegistryConfig,
    pub runtime: RuntimeConfig,
    pub api: ApiSection,
    pub network: crate::network::NetworkConfig,
    pub store: crate::store::StoreConfig,
    pub devices: DevicesSection,
    pub accelerators: crate::accelerators::AcceleratorConfig,
    pub dns: crate::pods::dns::ClusterDns,
    pub services: crate::services::ServicesConfig,
}

/// How the device manager reaches field devices.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicesSection {
    /// Run the embedded broker (`edge-rt broker`) and use it.
    pub embedded_broker: bool,
    /// The embedded broker's listeners: `ip:port`, or `bridge:port` for
    /// the pod bridge's address. edge-rt connects to the first.
    pub broker_listen: Vec<String>,
    /// `user:password` lines the embedded broker accepts (with edge-rt's
    /// own `mqtt_username`); unset, it asks no login.
    pub broker_users_file: Option<PathBuf>,
    /// `host:port` of an external broker (with `embedded_broker = false`).
    pub mqtt_broker: String,
    pub mqtt_client_id: Option<String>,
    pub mqtt_username: Option<String>,
    /// A file holding the password (not the config: it is often readable).
    pub mqtt_password_file: Option<PathBuf>,
    /// With an `mqtts://` broker: the CAs to trust (PEM); unset, the
    /// system's.
    pub mqtt_ca_file: Option<PathBuf>,
    /// With an `mqtts://` broker: a client certificate chain and its key
    /// (PEM), both or neither.
    pub mqtt_cert_file: Option<PathBuf>,
    pub mqtt_key_file: Option<PathBuf>,
    /// Publish the twins of devices that are not on MQTT (Modbus) on the
    /// broker too, on KubeEdge's twin topics, so pods read every twin one
    /// way.
    pub publish_twins: bool,
}

impl Default for DevicesSection {
    fn default() -> Self {
        DevicesSection {
            embedded_broker: true,
            broker_listen: vec!["127.0.0.1:1883".into(), "bridge:1883".into()],
            broker_users_file: None,
            mqtt_broker: "127.0.0.1:1883".into(),
            mqtt_client_id: None,
            mqtt_username: None,
            mqtt_password_file: None,
            mqtt_ca_file: None,
            mqtt_cert_file: None,
            mqtt_key_file: None,
            publish_twins: true,
        }
    }
}

/// The local API socket the CLI talks to.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSection {
    /// Default: `edge-rt.sock` in the runtime state directory.
    pub socket: Option<PathBuf>,
    /// A group whose members may use the CLI too (socket mode 0660).
    pub group: Option<String>,
    /// `host:port` serving Prometheus metrics at `/metrics` (devices:
    /// polls, errors, latency, reachability). Default: off.
    pub metrics_listen: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

impl Config {
    /// Load `path`; a missing file at the default path means all defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(s) => toml::from_str(&s).map_err(|source| ConfigError::Parse {
                path: path.into(),
                source,
            }),
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound && path == Path::new(DEFAULT_PATH) =>
            {
                Ok(Config::default())
            }
            Err(source) => Err(ConfigError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    pub fn image_dir(&self) -> PathBuf {
        self.node.data_dir.join("images")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults_and_typos_are_refused() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c.runtime.state_dir, PathBuf::from("/run/edge-rt"));
        let e = toml::from_str::<Config>("[runtime]\nstate_dri = \"/x\"\n").unwrap_err();
        assert!(e.to_string().contains("state_dri"));
    }
}
