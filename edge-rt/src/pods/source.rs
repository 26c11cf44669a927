//! What pods' volumes and env are made from: ConfigMaps, Secrets and
//! service account tokens. Workers only read through [`Objects`]; the
//! daemon fills it from the manifest directory and the node store. Every
//! change bumps a generation, so workers know when to refresh their volumes.

use std::collections::BTreeMap;
use std::sync::RwLock;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use outrigger_proto::kinds::ServiceAccountToken;
use tokio::sync::watch;

#[derive(Default)]
struct Maps {
    config_maps: BTreeMap<(String, String), ConfigMap>,
    secrets: BTreeMap<(String, String), Secret>,
    /// By namespace, then name: a pod's are found by its uid.
    tokens: BTreeMap<(String, String), ServiceAccountToken>,
}

/// ConfigMaps and Secrets by namespace and name.
pub struct Objects {
    maps: RwLock<Maps>,
    generation: watch::Sender<u64>,
}

impl Default for Objects {
    fn default() -> Self {
        Objects {
            maps: RwLock::new(Maps::default()),
            generation: watch::channel(0).0,
        }
    }
}

fn key(ns: Option<&String>, name: Option<&String>) -> (String, String) {
    (
        ns.cloned().unwrap_or_else(|| "default".into()),
        name.cloned().unwrap_or_default(),
    )
}

impl Objects {
    /// Replace everything (a source that always knows the whole set).
    pub fn replace(
        &self,
        config_maps: Vec<ConfigMap>,
        secrets: Vec<Secret>,
        tokens: Vec<ServiceAccountToken>,
    ) {
        let next = Maps {
            config_maps: config_maps
                .into_iter()
                .map(|c| {
                    (
                        key(c.metadata.namespace.as_ref(), c.metadata.name.as_ref()),
                        c,
                    )
                })
                .collect(),
            secrets: secrets
                .into_iter()
                .map(|s| {
                    (
                        key(s.metadata.namespace.as_ref(), s.metadata.name.as_ref()),
                        s,
                    )
                })
                .collect(),
            tokens: tokens
                .into_iter()
                .map(|t| ((t.metadata.namespace.clone(), t.metadata.name.clone()), t))
                .collect(),
        };
        let mut maps = self.maps.write().unwrap_or_else(|p| p.into_inner());
        let changed = maps.config_maps != next.config_maps
            || maps.secrets != next.secrets
            || maps.tokens != next.tokens;
        *maps = next;
        drop(maps);
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
    }

    pub fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        let maps = self.maps.read().unwrap_or_else(|p| p.into_inner());
        maps.config_maps
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    pub fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        let maps = self.maps.read().unwrap_or_else(|p| p.into_inner());
        maps.secrets
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// The token for a pod's projected `serviceAccountToken` source.
    pub fn token(
        &self,
        namespace: &str,
        pod_uid: &str,
        audience: Option<&str>,
        expiration_seconds: i64,
    ) -> Option<String> {
        let maps = self.maps.read().unwrap_or_else(|p| p.into_inner());
        maps.tokens
            .range((namespace.to_string(), String::new())..)
            .take_while(|((ns, _), _)| ns == namespace)
            .map(|(_, t)| t)
            .find(|t| t.is_for(pod_uid, audience, expiration_seconds))
            .map(|t| t.status.token.clone())
    }

    /// Changes whenever any object does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

/// A ConfigMap's entries as bytes (data and binaryData).
pub fn config_map_data(c: &ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = c
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    for (k, v) in c.binary_data.iter().flatten() {
        out.insert(k.clone(), v.0.clone());
    }
    out
}

/// A Secret's entries as bytes (data, and stringData as the API server
/// would merge it).
pub fn secret_data(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone().into_bytes());
    }
    out
}
