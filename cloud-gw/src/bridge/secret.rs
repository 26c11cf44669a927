//! cloud-gw's secrets (link CA, serving certificate, join tokens) in one
//! Kubernetes Secret, shared by every replica.
//!
//! The CA is made once: a replica that finds no Secret generates a CA in
//! memory and *creates* the Secret; if another replica created it first,
//! the create fails with AlreadyExists and this one adopts theirs. No
//! replica ever overwrites a CA (KubeEdge lost every edge when racing
//! replicas each wrote a new one). Later writes (tokens) are
//! read-modify-write with the Secret's resourceVersion, retried on a
//! conflict. Every replica follows the Secret with a watch, so a token
//! created through one is accepted by all.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::Api;

use crate::keeper::{Keeper, KeeperError, MemKeeper};
use crate::pki::{Pki, PkiError, CA_CERT};

type Data = BTreeMap<String, Vec<u8>>;

pub struct SecretKeeper {
    api: Api<Secret>,
    name: String,
    data: Arc<Mutex<Data>>,
}

fn data_of(s: &Secret) -> Data {
    s.data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.0.clone()))
        .collect()
}

fn secret(name: &str, data: &Data, rv: Option<String>) -> Secret {
    let mut s = Secret::default();
    s.metadata.name = Some(name.to_string());
    s.metadata.resource_version = rv;
    s.metadata.labels = Some(BTreeMap::from([(
        "app.kubernetes.io/name".to_string(),
        "cloud-gw".to_string(),
    )]));
    s.type_ = Some("Opaque".into());
    s.data = Some(
        data.iter()
            .map(|(k, v)| (k.clone(), ByteString(v.clone())))
            .collect(),
    );
    s
}

fn err(what: &str, e: impl std::fmt::Display) -> KeeperError {
    KeeperError {
        path: what.to_string(),
        source: std::io::Error::other(e.to_string()),
    }
}

impl SecretKeeper {
    /// The Secret `name` in `namespace` (it may not exist yet).
    pub async fn open(
        client: kube::Client,
        namespace: &str,
        name: &str,
    ) -> Result<SecretKeeper, kube::Error> {
        let api = Api::<Secret>::namespaced(client, namespace);
        let data = api
            .get_opt(name)
            .await?
            .map(|s| data_of(&s))
            .unwrap_or_default();
        Ok(SecretKeeper {
            api,
            name: name.to_string(),
            data: Arc::new(Mutex::new(data)),
        })
    }

    fn what(&self) -> String {
        format!("secret {}", self.name)
    }

    /// Follow the Secret: what another replica (or `cloud-gw token
    /// create`) writes is seen here within a moment.
    pub fn follow(&self) -> tokio::task::JoinHandle<()> {
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let stream = watcher::watcher(self.api.clone(), cfg);
        let data = self.data.clone();
        tokio::spawn(async move {
            use kube::runtime::WatchStreamExt;
            let mut s = std::pin::pin!(stream.default_backoff().applied_objects());
            while let Some(ev) = s.next().await {
                match ev {
                    Ok(sec) => {
                        *data.lock().unwrap_or_else(|p| p.into_inner()) = data_of(&sec);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watch of cloud-gw's Secret failed; retrying")
                    }
                }
            }
        })
    }

    /// The link PKI: the one in the Secret, or a new one made here and
    /// created once (whoever creates the Secret first wins; the others
    /// adopt it).
    pub async fn pki(&self, sans: &[String]) -> Result<Pki, PkiError> {
        if self.get(CA_CERT)?.is_some() {
            return Pki::load(self);
        }
        let mem = MemKeeper::default();
        Pki::init(&mem, sans, false)?;
        let made = mem.data.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match self
            .api
            .create(&PostParams::default(), &secret(&self.name, &made, None))
            .await
        {
            Ok(s) => {
                tracing::info!(secret = self.name, "link CA created");
                *self.data.lock().unwrap_or_else(|p| p.into_inner()) = data_of(&s);
            }
            Err(kube::Error::Api(r)) if r.code == 409 => {
                let s = self
                    .api
                    .get(&self.name)
                    .await
                    .map_err(|e| err(&self.what(), e))?;
                tracing::info!(
                    secret = self.name,
                    "another replica created the link CA; using it"
                );
                *self.data.lock().unwrap_or_else(|p| p.into_inner()) = data_of(&s);
            }
            Err(e) => return Err(err(&self.what(), e).into()),
        }
        Pki::load(self)
    }

    async fn put_async(&self, name: &str, value: &[u8]) -> Result<(), KeeperError> {
        // Read, change one key, write back with the version read: a
        // concurrent writer makes this a 409, and it goes round again.
        for _ in 0..10 {
            let current = self
                .api
                .get_opt(&self.name)
                .await
                .map_err(|e| err(&self.what(), e))?;
            let (mut data, rv) = match &current {
                Some(s) => (data_of(s), s.metadata.resource_version.clone()),
                None => (Data::new(), None),
            };
            data.insert(name.to_string(), value.to_vec());
            let s = secret(&self.name, &data, rv.clone());
            let r = match rv {
                Some(_) => {
                    self.api
                        .replace(&self.name, &PostParams::default(), &s)
                        .await
                }
                None => self.api.create(&PostParams::default(), &s).await,
            };
            match r {
                Ok(s) => {
                    *self.data.lock().unwrap_or_else(|p| p.into_inner()) = data_of(&s);
                    return Ok(());
                }
                Err(kube::Error::Api(r)) if r.code == 409 => continue,
                Err(e) => return Err(err(&self.what(), e)),
            }
        }
        Err(err(&self.what(), "kept conflicting with other writers"))
    }
}

impl Keeper for SecretKeeper {
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, KeeperError> {
        Ok(self
            .data
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned())
    }

    /// Blocks the calling thread on the write (the trait is synchronous;
    /// writes are rare: tokens). Needs the multi-threaded runtime.
    fn put(&self, name: &str, value: &[u8]) -> Result<(), KeeperError> {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(self.put_async(name, value))
        })
    }
}
