//! Where cloud-gw keeps its secrets (the CA key, tokens): behind a small
//! trait, so a Kubernetes Secret holds them in a cluster
//! ([`crate::bridge::secret::SecretKeeper`]) and a directory on a single
//! host and in the link's tests ([`DirKeeper`]).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct KeeperError {
    pub path: String,
    #[source]
    pub source: std::io::Error,
}

/// Named blobs, written atomically.
pub trait Keeper: Send + Sync {
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, KeeperError>;
    fn put(&self, name: &str, value: &[u8]) -> Result<(), KeeperError>;
}

/// A directory of files, mode 0600.
pub struct DirKeeper {
    dir: PathBuf,
}

impl DirKeeper {
    pub fn new(dir: &Path) -> DirKeeper {
        DirKeeper { dir: dir.into() }
    }
}

impl Keeper for DirKeeper {
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, KeeperError> {
        let p = self.dir.join(name);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(KeeperError {
                path: p.display().to_string(),
                source,
            }),
        }
    }

    fn put(&self, name: &str, value: &[u8]) -> Result<(), KeeperError> {
        let p = self.dir.join(name);
        let err = |source| KeeperError {
            path: p.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&self.dir).map_err(err)?;
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        f.write_all(value).and_then(|_| f.sync_all()).map_err(err)?;
        std::fs::rename(&tmp, &p).map_err(err)
    }
}

/// Named blobs in memory: a PKI made here is written to its real keeper
/// in one step (see the Secret keeper's create-once).
#[derive(Default)]
pub struct MemKeeper {
    pub data: std::sync::Mutex<std::collections::BTreeMap<String, Vec<u8>>>,
}

impl Keeper for MemKeeper {
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, KeeperError> {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        Ok(d.get(name).cloned())
    }

    fn put(&self, name: &str, value: &[u8]) -> Result<(), KeeperError> {
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        d.insert(name.to_string(), value.to_vec());
        Ok(())
    }
}
