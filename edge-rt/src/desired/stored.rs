//! The store source: what the cloud (or `edge-rt apply`) committed to the
//! node store, typed.

use super::Objects;
use crate::store::{Kind, Store};

/// The store's objects of one kind, typed (what does not parse is logged
/// and skipped).
pub fn load<T: serde::de::DeserializeOwned>(s: &Store, kind: Kind) -> Vec<T> {
    let mut out = Vec::new();
    each(s, kind, |t| out.push(t));
    out
}

/// Each of the store's objects of one kind, typed as its row is read (one
/// JSON tree at a time: what is kept from a large kind is the caller's).
pub fn each<T: serde::de::DeserializeOwned>(s: &Store, kind: Kind, mut f: impl FnMut(T)) {
    let r = s.each_object(kind, |o| {
        let mut body = o.body;
        // The row's identity is the truth (a body may lack it).
        body["metadata"]["uid"] = o.uid.clone().into();
        body["metadata"]["namespace"] = o.namespace.clone().into();
        match serde_json::from_value::<T>(body) {
            Ok(t) => f(t),
            Err(e) => {
                tracing::error!(kind = kind.as_str(), namespace = %o.namespace, name = %o.name, error = %e, "stored object does not parse; skipped");
            }
        }
    });
    if let Err(e) = r {
        tracing::error!(kind = kind.as_str(), error = %e, "reading the store");
    }
}

/// The store's pods, ConfigMaps, Secrets and tokens, typed. An object that does not
/// parse is logged and skipped; the rest run.
pub fn read(s: &Store) -> Objects {
    Objects {
        pods: load(s, Kind::Pod),
        config_maps: load(s, Kind::ConfigMap),
        secrets: load(s, Kind::Secret),
        tokens: load(s, Kind::ServiceAccountToken),
        devices: load(s, Kind::Device),
        device_models: load(s, Kind::DeviceModel),
        local_desired: s.local_desired().unwrap_or_else(|e| {
            tracing::error!(error = %e, "reading the desired values set at the node");
            Vec::new()
        }),
    }
}
