//! The edge end of the cloud link: joining (`edge-rt join`) and the one
//! mutual-TLS WebSocket to cloud-gw that the daemon keeps up.
//!
//! What joining leaves in `<data_dir>/link/`: `link.toml` (server, node
//! name, labels), `ca.crt` (the CA the token pinned), `node.key` (0600) and
//! `node.crt`. The daemon connects when `link.toml` is there.

pub mod client;
pub mod join;
pub mod streams;
pub mod tls;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Url(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error(transparent)]
    Proto(#[from] outrigger_proto::ws::LinkError),
    #[error("cloud-gw refused: {0}")]
    Refused(String),
    #[error("unexpected answer from cloud-gw: {0}")]
    Unexpected(String),
    #[error("{0}")]
    Cert(String),
    #[error("link.toml: {0}")]
    Config(String),
}

/// What `edge-rt join` wrote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// `wss://host:port` of cloud-gw.
    pub server: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

pub fn dir(data_dir: &Path) -> PathBuf {
    data_dir.join("link")
}

impl LinkConfig {
    /// The link settings, if this node has joined.
    pub fn load(data_dir: &Path) -> Result<Option<LinkConfig>, LinkError> {
        let p = dir(data_dir).join("link.toml");
        match std::fs::read_to_string(&p) {
            Ok(s) => toml::from_str(&s)
                .map(Some)
                .map_err(|e| LinkError::Config(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LinkError::Io { path: p, source }),
        }
    }
}

/// `wss://host:port[/...]` to (host, port, authority).
pub fn parse_server(url: &str) -> Result<(String, u16, String), LinkError> {
    let bad = || LinkError::Url(format!("{url:?}: expected wss://HOST:PORT"));
    let rest = url.strip_prefix("wss://").ok_or_else(bad)?;
    let authority = rest.split('/').next().unwrap_or("").to_string();
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, p) = v6.split_once(']').ok_or_else(bad)?;
        (h.to_string(), p.strip_prefix(':').unwrap_or("443"))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p),
            None => (authority.clone(), "443"),
        }
    };
    let port = port.parse().map_err(|_| bad())?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port, authority))
}

/// Write a file atomically (and privately when `private`).
pub(crate) fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), LinkError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| LinkError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_urls() {
        let p = super::parse_server;
        assert_eq!(
            p("wss://10.0.0.1:7443").unwrap(),
            ("10.0.0.1".into(), 7443, "10.0.0.1:7443".into())
        );
        assert_eq!(p("wss://gw.example/x").unwrap().1, 443);
        assert_eq!(p("wss://[::1]:9").unwrap().0, "::1");
        assert!(p("https://x:1").is_err());
        assert!(p("wss://:1").is_err());
    }
}
