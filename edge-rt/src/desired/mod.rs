//! What the node should run, as the kubelet's `pkg/kubelet/config` merges
//! its sources: the file source ([`files`]: the static pod directory) and
//! the store source ([`stored`]: what the cloud or `edge-rt apply`
//! committed), merged into one [`Desired`] set in which every pod carries
//! its own deletion (a pod the cluster is deleting is still desired: it is
//! to be stopped within the deletion's grace period, never started).
//!
//! Devices come the same way, each with the model it names resolved
//! ([`crate::devices::DesiredDevice`]).
//!
//! Pure data in, data out: the daemon wires the sources to the pod manager
//! and the device manager.

pub mod files;
pub mod stored;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use outrigger_proto::device::{Device, DeviceModel, LocalDesired};
use outrigger_proto::kinds::ServiceAccountToken;

use crate::devices::DesiredDevice;

/// Pods and the objects they use, from one source.
#[derive(Debug, Default, Clone)]
pub struct Objects {
    pub pods: Vec<Pod>,
    pub config_maps: Vec<ConfigMap>,
    pub secrets: Vec<Secret>,
    /// Service account tokens (from the cloud only; manifests have none).
    pub tokens: Vec<ServiceAccountToken>,
    pub devices: Vec<Device>,
    pub device_models: Vec<DeviceModel>,
    /// Desired values set at the node (`edge-rt device set`; the store's).
    pub local_desired: Vec<crate::store::LocalDesired>,
}

/// A pod being deleted in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deletion {
    /// The deletion's own grace period (`kubectl delete --grace-period`),
    /// if it set one; the pod's own applies if shorter or unset.
    pub grace_seconds: Option<i64>,
}

/// One pod the node should have, with its deletion if it is being deleted.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredPod {
    pub pod: Pod,
    pub deletion: Option<Deletion>,
}

impl From<Pod> for DesiredPod {
    /// A pod as its metadata says: being deleted if it has a
    /// deletionTimestamp.
    fn from(pod: Pod) -> DesiredPod {
        let deletion = pod.metadata.deletion_timestamp.as_ref().map(|_| Deletion {
            grace_seconds: pod.metadata.deletion_grace_period_seconds,
        });
        DesiredPod { pod, deletion }
    }
}

/// Everything the node should have, merged.
#[derive(Debug, Default)]
pub struct Desired {
    pub pods: Vec<DesiredPod>,
    pub config_maps: Vec<ConfigMap>,
    pub secrets: Vec<Secret>,
    pub tokens: Vec<ServiceAccountToken>,
    pub devices: Vec<DesiredDevice>,
    /// Desired values set at the node that no longer hold (the spec caught
    /// up with them or changed since, or the device is gone): (device
    /// uid, property), to drop from the store.
    pub stale_local: Vec<(String, String)>,
}

/// The union of the file source and the store source (if the store could
/// be opened). A name the manifest directory defines is the file's: the
/// stored object of that namespace and name is left out, and logged.
pub fn merge(files: &Objects, stored: Option<Objects>) -> Desired {
    let mut d = Desired {
        pods: files.pods.iter().cloned().map(DesiredPod::from).collect(),
        config_maps: files.config_maps.clone(),
        secrets: files.secrets.clone(),
        tokens: Vec::new(),
        devices: Vec::new(),
        stale_local: Vec::new(),
    };
    let mut devices = files.devices.clone();
    let mut models = files.device_models.clone();
    if let Some(s) = &stored {
        devices.extend(named_apart(
            &files.devices,
            &s.devices,
            |d| &d.metadata,
            "Device",
        ));
        models.extend(named_apart(
            &files.device_models,
            &s.device_models,
            |m| &m.metadata,
            "DeviceModel",
        ));
    }
    d.devices = devices
        .into_iter()
        .map(|device| {
            let ns = device
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into());
            let model = models
                .iter()
                .find(|m| {
                    m.metadata.name.as_deref() == Some(device.spec.model.as_str())
                        && m.metadata.namespace.as_deref().unwrap_or("default") == ns
                })
                .cloned();
            DesiredDevice {
                device,
                model,
                local: Default::default(),
            }
        })
        .collect();
    if let Some(s) = &stored {
        d.stale_local = with_local_desired(&mut d.devices, &s.local_desired);
    }
    if let Some(s) = stored {
        d.pods.extend(
            not_in_files(&files.pods, s.pods)
                .into_iter()
                .map(DesiredPod::from),
        );
        d.config_maps
            .extend(not_in_files(&files.config_maps, s.config_maps));
        d.secrets.extend(not_in_files(&files.secrets, s.secrets));
        d.tokens = s.tokens;
    }
    d
}

/// Give each device the desired values set at the node that still hold
/// over its spec ([`LocalDesired::holds_over`]); the (uid, property) of
/// those that do not.
fn with_local_desired(
    devices: &mut [DesiredDevice],
    set: &[crate::store::LocalDesired],
) -> Vec<(String, String)> {
    let mut stale = Vec::new();
    for l in set {
        let spec = devices
            .iter_mut()
            .find(|d| d.device.metadata.uid.as_deref() == Some(l.uid.as_str()))
            .and_then(|d| {
                let p = d
                    .device
                    .spec
                    .properties
                    .iter()
                    .find(|p| p.name == l.property)?;
                Some((p.desired.clone(), &mut d.local))
            });
        let local = LocalDesired {
            value: l.value.clone(),
            base: l.base.clone(),
            time: jiff::Timestamp::from_millisecond(l.set_ms)
                .unwrap_or_default()
                .to_string(),
        };
        match spec {
            Some((spec, map)) if local.holds_over(spec.as_deref()) => {
                map.insert(l.property.clone(), local);
            }
            _ => stale.push((l.uid.clone(), l.property.clone())),
        }
    }
    stale
}

type ObjectMeta = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// As [`not_in_files`], for our own kinds.
fn named_apart<T: Clone>(
    files: &[T],
    stored: &[T],
    meta: fn(&T) -> &ObjectMeta,
    kind: &str,
) -> Vec<T> {
    let key = |m: &ObjectMeta| {
        (
            m.namespace.clone().unwrap_or_else(|| "default".into()),
            m.name.clone().unwrap_or_default(),
        )
    };
    let taken: std::collections::BTreeSet<_> = files.iter().map(|o| key(meta(o))).collect();
    stored
        .iter()
        .filter(|o| {
            let k = key(meta(o));
            let free = !taken.contains(&k);
            if !free {
                tracing::warn!(kind, object = ?k, "a manifest defines this name too; the stored one is left out");
            }
            free
        })
        .cloned()
        .collect()
}

/// The stored objects whose namespace and name no manifest uses (the file
/// on the node wins; the other is logged and left out).
fn not_in_files<T: k8s_openapi::Metadata<Ty = ObjectMeta>>(files: &[T], stored: Vec<T>) -> Vec<T> {
    fn key(m: &ObjectMeta) -> (String, String) {
        (
            m.namespace.clone().unwrap_or_else(|| "default".into()),
            m.name.clone().unwrap_or_default(),
        )
    }
    let taken: std::collections::BTreeSet<_> = files.iter().map(|o| key(o.metadata())).collect();
    stored
        .into_iter()
        .filter(|o| {
            let k = key(o.metadata());
            let free = !taken.contains(&k);
            if !free {
                tracing::warn!(kind = T::KIND, object = ?k, "a manifest defines this name too; the stored one is left out");
            }
            free
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, uid: &str, extra: serde_json::Value) -> Pod {
        let mut v = json!({"metadata": {"name": name, "namespace": "default", "uid": uid},
                           "spec": {"containers": []}});
        if let Some(m) = extra.as_object() {
            for (k, x) in m {
                v["metadata"][k] = x.clone();
            }
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_pod_being_deleted_carries_its_deletion() {
        let stored = Objects {
            pods: vec![
                pod("a", "ua", json!({})),
                pod(
                    "b",
                    "ub",
                    json!({"deletionTimestamp": "2026-12-02T00:00:00Z", "deletionGracePeriodSeconds": 5}),
                ),
                pod(
                    "c",
                    "uc",
                    json!({"deletionTimestamp": "2026-12-02T00:00:00Z"}),
                ),
            ],
            ..Default::default()
        };
        let d = merge(&Objects::default(), Some(stored));
        let by = |n: &str| {
            d.pods
                .iter()
                .find(|p| p.pod.metadata.name.as_deref() == Some(n))
                .unwrap()
                .deletion
        };
        assert_eq!(by("a"), None);
        assert_eq!(
            by("b"),
            Some(Deletion {
                grace_seconds: Some(5)
            })
        );
        assert_eq!(
            by("c"),
            Some(Deletion {
                grace_seconds: None
            })
        );
    }

    #[test]
    fn a_manifest_wins_a_name_over_the_store() {
        let files = Objects {
            pods: vec![pod("web", "file-uid", json!({}))],
            ..Default::default()
        };
        let stored = Objects {
            pods: vec![
                pod("web", "cloud-uid", json!({})),
                pod("db", "db-uid", json!({})),
            ],
            tokens: vec![],
            ..Default::default()
        };
        let d = merge(&files, Some(stored));
        let uids: Vec<_> = d
            .pods
            .iter()
            .map(|p| p.pod.metadata.uid.clone().unwrap())
            .collect();
        assert_eq!(uids, vec!["file-uid", "db-uid"]);
        // No store (it could not be opened): the files alone.
        assert_eq!(merge(&files, None).pods.len(), 1);
    }

    #[test]
    fn a_value_set_at_the_node_holds_until_the_spec_has_it_or_changes() {
        let device = |desired: &str| -> Device {
            serde_json::from_value(json!({
                "metadata": {"name": "boiler", "namespace": "default", "uid": "u1"},
                "spec": {"model": "thermostat", "nodeName": "n",
                         "protocol": {"mqtt": {}},
                         "properties": [{"name": "setpoint", "desired": desired}, {"name": "mode"}]},
            }))
            .unwrap()
        };
        let set = |p: &str, value: &str, base: Option<&str>| crate::store::LocalDesired {
            uid: "u1".into(),
            property: p.into(),
            value: value.into(),
            base: base.map(str::to_string),
            set_ms: 0,
        };
        let local = vec![
            set("setpoint", "25", Some("21")),
            set("mode", "2", None),
            set("gone", "1", None),
        ];
        let with = |spec: &str| {
            merge(
                &Objects::default(),
                Some(Objects {
                    devices: vec![device(spec)],
                    local_desired: local.clone(),
                    ..Default::default()
                }),
            )
        };
        // The spec still has what they were set over: both hold.
        let d = with("21");
        let held: Vec<_> = d.devices[0]
            .local
            .iter()
            .map(|(k, v)| (k.as_str(), v.value.as_str()))
            .collect();
        assert_eq!(held, vec![("mode", "2"), ("setpoint", "25")]);
        assert_eq!(d.stale_local, vec![("u1".to_string(), "gone".to_string())]);
        // The cluster took the node's value, or set another since: the
        // spec's stands and the node's is dropped.
        for spec in ["25", "18"] {
            let d = with(spec);
            assert!(!d.devices[0].local.contains_key("setpoint"), "{spec}");
            assert!(d
                .stale_local
                .contains(&("u1".to_string(), "setpoint".to_string())));
        }
    }
}
