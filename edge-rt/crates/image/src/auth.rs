//! Registry credentials from `kubernetes.io/dockerconfigjson` (and legacy
//! `kubernetes.io/dockercfg`) secrets, matched to a registry the way the
//! kubelet does: by host, with Docker Hub's several names treated as one.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;

use super::registry::Credentials;
use super::ImageError;

#[derive(Deserialize)]
struct DockerConfig {
    auths: Option<BTreeMap<String, Entry>>,
    #[serde(flatten)]
    legacy: BTreeMap<String, serde_json::Value>,
}

#[derive(Deserialize, Default)]
struct Entry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

const DOCKER_HUB: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];

/// The host part of a config key: `https://host:port/v1/` -> `host:port`.
fn host_of(key: &str) -> &str {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    k.split('/').next().unwrap_or(k)
}

fn same_registry(key: &str, registry: &str) -> bool {
    let h = host_of(key);
    h == registry || (DOCKER_HUB.contains(&h) && DOCKER_HUB.contains(&registry))
}

/// Credentials for `registry` (`host[:port]`) from the secret's JSON data
/// (the value of `.dockerconfigjson` or `.dockercfg`), if it names it.
pub fn credentials_for(json: &[u8], registry: &str) -> Result<Option<Credentials>, ImageError> {
    let cfg: DockerConfig = serde_json::from_slice(json)
        .map_err(|e| ImageError::BadMetadata(format!("docker config secret: {e}")))?;
    let entries: BTreeMap<String, Entry> = match cfg.auths {
        Some(a) => a,
        None => cfg
            .legacy
            .into_iter()
            .filter_map(|(k, v)| serde_json::from_value(v).ok().map(|e| (k, e)))
            .collect(),
    };
    for (key, e) in entries {
        if !same_registry(&key, registry) {
            continue;
        }
        if let (Some(u), Some(p)) = (&e.username, &e.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
        if let Some(a) = e.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|e| {
                    ImageError::BadMetadata(format!("docker config auth for {key}: {e}"))
                })?;
            let s = String::from_utf8(raw).map_err(|_| {
                ImageError::BadMetadata(format!("docker config auth for {key} is not UTF-8"))
            })?;
            let (u, p) = s.split_once(':').ok_or_else(|| {
                ImageError::BadMetadata(format!(
                    "docker config auth for {key} is not user:password"
                ))
            })?;
            return Ok(Some(Credentials {
                username: u.into(),
                password: p.into(),
            }));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_field_and_hub_aliases() {
        let j = br#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"},"reg.local:5000":{"username":"a","password":"b"}}}"#;
        let c = credentials_for(j, "docker.io").unwrap().unwrap();
        assert_eq!((c.username.as_str(), c.password.as_str()), ("user", "pass"));
        let c = credentials_for(j, "reg.local:5000").unwrap().unwrap();
        assert_eq!(c.username, "a");
        assert!(credentials_for(j, "other:5000").unwrap().is_none());
    }

    #[test]
    fn legacy_dockercfg_and_bad_input() {
        let j = br#"{"reg:1":{"auth":"dTpw"}}"#;
        assert_eq!(credentials_for(j, "reg:1").unwrap().unwrap().password, "p");
        assert!(credentials_for(b"not json", "reg:1").is_err());
        assert!(credentials_for(br#"{"auths":{"r":{"auth":"!!"}}}"#, "r").is_err());
    }
}
