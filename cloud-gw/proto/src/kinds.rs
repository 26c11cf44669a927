//! The object kinds the link carries down to a node, and the one body the
//! link defines itself (a pod's service account token).
//!
//! A kind is new in some minor version of the protocol; it goes only to a
//! node that speaks that minor or a later one ([`kinds_for`]), so an older
//! node never meets a kind its store would refuse.

use serde::{Deserialize, Serialize};

use crate::Version;

/// Every kind, in the order a batch puts them: what pods use before the
/// pods (deletes go the other way).
pub const KINDS: [&str; 4] = ["ConfigMap", "Secret", SERVICE_ACCOUNT_TOKEN, "Pod"];

/// A service account token bound to one pod ([`ServiceAccountToken`]).
pub const SERVICE_ACCOUNT_TOKEN: &str = "ServiceAccountToken";

/// The minor version of protocol 1 that added `kind`.
fn since_minor(kind: &str) -> u16 {
    match kind {
        SERVICE_ACCOUNT_TOKEN => 1,
        _ => 0,
    }
}

/// The kinds a peer speaking `v` knows, in [`KINDS`] order.
pub fn kinds_for(v: Version) -> Vec<&'static str> {
    KINDS
        .into_iter()
        .filter(|k| since_minor(k) <= v.minor)
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
        b[6] = (b[6] & 0x0f) | 0x50;
        b[8] = (b[8] & 0x3f) | 0x80;
        crate::inventory::uuid_string(&b)
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
        assert_eq!(kinds_for(v(0)), vec!["ConfigMap", "Secret", "Pod"]);
        assert_eq!(kinds_for(v(1)), KINDS.to_vec());
        assert_eq!(kinds_for(crate::VERSION), KINDS.to_vec());
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
