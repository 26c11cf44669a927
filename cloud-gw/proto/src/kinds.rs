//! The object kinds the link carries down to a node, and the one body the
//! link defines itself (a pod's service account token).
//!
//! A kind is new in some minor version of the protocol; it goes only to a
//! node that speaks that minor or a later one ([`kinds_for`]), so an older
//! node never meets a kind its store would refuse.

use serde::{Deserialize, Serialize};

use crate::Version;

/// An object kind the link carries, spelled on the wire (and in stores) as
/// its Kubernetes kind. The order is the order a batch puts them in: what
/// pods use before the pods (deletes go the other way).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Kind {
    ConfigMap,
    Secret,
    /// A pod's service account token ([`ServiceAccountToken`]), from 1.1.
    ServiceAccountToken,
    /// What a kind of device has ([`crate::device::DeviceModel`]), from 1.2.
    DeviceModel,
    /// A field device the node talks to ([`crate::device::Device`]), from 1.2.
    Device,
    /// The node's own Node and those of its site (same
    /// `topology.kubernetes.io/zone`): pod CIDRs and addresses, from 1.4.
    Node,
    /// The Services of the namespaces the node's pods are in, from 1.4.
    Service,
    /// Those Services' EndpointSlices, from 1.4.
    EndpointSlice,
    Pod,
}

impl Kind {
    /// Every kind, in put order.
    pub const ALL: [Kind; 9] = [
        Kind::ConfigMap,
        Kind::Secret,
        Kind::ServiceAccountToken,
        Kind::DeviceModel,
        Kind::Device,
        Kind::Node,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::ConfigMap => "ConfigMap",
            Kind::Secret => "Secret",
            Kind::ServiceAccountToken => "ServiceAccountToken",
            Kind::DeviceModel => "DeviceModel",
            Kind::Device => "Device",
            Kind::Node => "Node",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
        }
    }

    /// The minor version of protocol 1 that added the kind: a peer below
    /// it is never sent one, nor asked about it.
    pub const fn since_minor(self) -> u16 {
        match self {
            Kind::ServiceAccountToken => 1,
            Kind::DeviceModel | Kind::Device => 2,
            Kind::Node | Kind::Service | Kind::EndpointSlice => 4,
            Kind::ConfigMap | Kind::Secret | Kind::Pod => 0,
        }
    }

    /// Credentials: sealed at rest, redacted when shown.
    pub const fn sealed(self) -> bool {
        matches!(self, Kind::Secret | Kind::ServiceAccountToken)
    }

    /// The kind of that exact name (as on the wire, or a manifest's `kind`).
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `#[serde(with = "...")]` for maps keyed by kind that a newer peer may
/// send with kinds this build does not know (the digest rides with the
/// hello, before the version is agreed): those entries are skipped, not an
/// error.
pub mod lenient {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Kind;

    pub fn serialize<S: Serializer, V: Serialize>(
        v: &BTreeMap<Kind, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, V: Deserialize<'de>>(
        d: D,
    ) -> Result<BTreeMap<Kind, V>, D::Error> {
        let m = BTreeMap::<String, V>::deserialize(d)?;
        Ok(m.into_iter()
            .filter_map(|(k, v)| Kind::from_name(&k).map(|k| (k, v)))
            .collect())
    }
}

/// The kinds a peer speaking `v` knows, in put order.
pub fn kinds_for(v: Version) -> Vec<Kind> {
    Kind::ALL
        .into_iter()
        .filter(|k| k.since_minor() <= v.minor)
        .collect()
}

/// A token for a pod's projected `serviceAccountToken` source, as the
/// kubelet gets it through the TokenRequest API: bound to the pod (the API
/// server refuses it once the pod is gone), for the source's audience and
/// lifetime. cloud-gw requests one per (pod, audience, lifetime) and
/// refreshes it before 80% of its life is up; the node writes it into the
/// volume and, like a Secret, keeps it sealed at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountToken {
    pub api_version: String,
    pub kind: String,
    pub metadata: TokenMeta,
    pub spec: TokenSpec,
    pub status: TokenStatus,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenMeta {
    /// `<pod name>.<8 hex digits>`: one name per (pod, audience, lifetime).
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenSpec {
    pub service_account_name: String,
    /// The projection's audience; None: the API server's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// As the projection asks (the API server's default is 3600).
    pub expiration_seconds: i64,
    pub pod_name: String,
    pub pod_uid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    pub token: String,
    /// RFC 3339, as the API server answered.
    pub expiration_timestamp: String,
}

/// What a projection's unset expirationSeconds means (the API server's
/// defaulting sets the same on every pod it stores).
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;

impl ServiceAccountToken {
    pub const API_VERSION: &'static str = "outrigger.io/v1";

    /// The object's name, from what makes a token distinct for a pod.
    pub fn name_for(pod_name: &str, pod_uid: &str, audience: Option<&str>, seconds: i64) -> String {
        format!("{pod_name}.{}", &hex8(&key(pod_uid, audience, seconds)))
    }

    /// Its uid: stable for the same pod, audience and lifetime, so a
    /// refreshed token replaces the old one on the node.
    pub fn uid_for(pod_uid: &str, audience: Option<&str>, seconds: i64) -> String {
        let mut b = [0u8; 16];
        b.copy_from_slice(&key(pod_uid, audience, seconds)[..16]);
        // A name-based UUID's version and variant bits (as version 5 has
        // them, over SHA-256 rather than SHA-1).
        uuid::Builder::from_sha1_bytes(b).into_uuid().to_string()
    }

    /// Whether this is the token for the given projection of pod `pod_uid`.
    pub fn is_for(&self, pod_uid: &str, audience: Option<&str>, seconds: i64) -> bool {
        self.spec.pod_uid == pod_uid
            && self.spec.audience.as_deref().filter(|a| !a.is_empty())
                == audience.filter(|a| !a.is_empty())
            && self.spec.expiration_seconds == seconds
    }
}

fn key(pod_uid: &str, audience: Option<&str>, seconds: i64) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(pod_uid.as_bytes());
    h.update([0]);
    h.update(audience.unwrap_or("").as_bytes());
    h.update([0]);
    h.update(seconds.to_be_bytes());
    h.finalize().into()
}

fn hex8(b: &[u8; 32]) -> String {
    b[..4].iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_node_gets_only_the_kinds_it_knows() {
        let v = |minor| Version { major: 1, minor };
        assert_eq!(
            kinds_for(v(0)),
            vec![Kind::ConfigMap, Kind::Secret, Kind::Pod]
        );
        assert_eq!(
            kinds_for(v(1)),
            vec![
                Kind::ConfigMap,
                Kind::Secret,
                Kind::ServiceAccountToken,
                Kind::Pod
            ]
        );
        assert!(!kinds_for(v(3)).contains(&Kind::Service));
        assert_eq!(kinds_for(v(4)), Kind::ALL.to_vec());
        assert_eq!(kinds_for(crate::VERSION), Kind::ALL.to_vec());
    }

    #[test]
    fn kinds_are_their_names_on_the_wire() {
        for k in Kind::ALL {
            let mut b = Vec::new();
            ciborium::into_writer(&k, &mut b).unwrap();
            let mut s = Vec::new();
            ciborium::into_writer(&k.as_str(), &mut s).unwrap();
            assert_eq!(b, s, "{k}");
            assert_eq!(Kind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(Kind::from_name("Deployment"), None);
    }

    #[test]
    fn a_kind_this_build_does_not_know_is_skipped_in_maps() {
        #[derive(serde::Serialize)]
        struct Newer {
            kinds: std::collections::BTreeMap<&'static str, u8>,
        }
        #[derive(serde::Deserialize)]
        struct Ours {
            #[serde(with = "lenient")]
            kinds: std::collections::BTreeMap<Kind, u8>,
        }
        let mut b = Vec::new();
        let newer = Newer {
            kinds: [("Pod", 1), ("Gadget", 2)].into(),
        };
        ciborium::into_writer(&newer, &mut b).unwrap();
        let ours: Ours = ciborium::from_reader(&b[..]).unwrap();
        assert_eq!(ours.kinds, [(Kind::Pod, 1)].into());
    }

    #[test]
    fn one_token_per_pod_audience_and_lifetime() {
        let a = ServiceAccountToken::uid_for("p1", None, 3607);
        assert_eq!(a, ServiceAccountToken::uid_for("p1", Some(""), 3607));
        assert_ne!(a, ServiceAccountToken::uid_for("p1", Some("vault"), 3607));
        assert_ne!(a, ServiceAccountToken::uid_for("p1", None, 600));
        assert_ne!(a, ServiceAccountToken::uid_for("p2", None, 3607));
        let n = ServiceAccountToken::name_for("web-0", "p1", None, 3607);
        assert!(
            n.starts_with("web-0.") && n.len() == "web-0.".len() + 8,
            "{n}"
        );
        assert_eq!(a.len(), 36);
    }
}
