//! Pulling images from OCI distribution registries.
//!
//! `oci-client` speaks the protocol (auth challenges, bearer tokens, ranges);
//! this module decides what to fetch, streams every blob to a file with
//! resume, checks digest and size before anything uses it, and hands the
//! result to the store to unpack. Manifests are fetched raw and parsed here so
//! that multi-arch indexes resolve with variants (arm/v7) and digests are
//! checked on the exact bytes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use oci_client::client::{
    BlobResponse, Certificate, CertificateEncoding, ClientConfig, ClientProtocol,
};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use oci_spec::image::{ImageIndex, ImageManifest};
use serde::{Deserialize, Serialize};

use super::{ImageError, ImageRecord, ImageStore, Result};

const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// When to contact the registry, as in a Kubernetes container spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// Kubernetes' default: Always for `:latest` or no tag, IfNotPresent otherwise.
    pub fn from_k8s(policy: Option<&str>, image: &str) -> PullPolicy {
        match policy {
            Some("Always") => PullPolicy::Always,
            Some("Never") => PullPolicy::Never,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            _ => {
                let last = image.rsplit('/').next().unwrap_or(image);
                if image.contains('@') || (last.contains(':') && !last.ends_with(":latest")) {
                    PullPolicy::IfNotPresent
                } else {
                    PullPolicy::Always
                }
            }
        }
    }
}

/// Registry settings from the node configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) reached over plain HTTP. Nothing else is.
    pub insecure: Vec<String>,
    /// Extra CA certificates (PEM) trusted besides the system's roots.
    pub ca_bundle: Option<PathBuf>,
    /// Seconds to wait for a TCP connection.
    pub connect_timeout_secs: Option<u64>,
}

/// Username and password for one registry.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// Bytes done and total of a pull, readable while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

impl Progress {
    pub fn snapshot(&self) -> (u64, u64) {
        (
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}

pub struct Puller {
    cfg: RegistryConfig,
    ca_pem: Option<Vec<u8>>,
    inflight: Inflight,
}

/// One pull per reference and one download per blob at a time: two pods
/// naming the same new image (or model) at once share the work instead of
/// racing on the same partial file; the second finds it done.
#[derive(Default)]
struct Inflight(
    std::sync::Mutex<std::collections::HashMap<String, std::sync::Weak<tokio::sync::Mutex<()>>>>,
);

impl Inflight {
    async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let m = {
            let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, w| w.strong_count() > 0);
            match map.get(key).and_then(std::sync::Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = std::sync::Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.to_string(), std::sync::Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }
}

impl Puller {
    pub fn new(cfg: &RegistryConfig) -> Result<Self> {
        let ca_pem = match &cfg.ca_bundle {
            Some(p) => Some(std::fs::read(p).map_err(|e| ImageError::io(p, e))?),
            None => None,
        };
        Ok(Puller {
            cfg: cfg.clone(),
            ca_pem,
            inflight: Inflight::default(),
        })
    }

    /// A client per pull: oci-client keeps the first credentials it sees for
    /// a registry, and each pod may bring its own pull secret.
    fn client(&self) -> oci_client::Client {
        oci_client::Client::new(ClientConfig {
            protocol: if self.cfg.insecure.is_empty() {
                ClientProtocol::Https
            } else {
                ClientProtocol::HttpsExcept(self.cfg.insecure.clone())
            },
            extra_root_certificates: self
                .ca_pem
                .iter()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            platform_resolver: None,
            connect_timeout: Some(Duration::from_secs(
                self.cfg.connect_timeout_secs.unwrap_or(10),
            )),
            read_timeout: Some(Duration::from_secs(60)),
            user_agent: concat!("outrigger-edge-rt/", env!("CARGO_PKG_VERSION")),
            ..Default::default()
        })
    }

    /// Pull `reference` into `store`, returning the complete image.
    pub async fn pull(
        &self,
        store: &ImageStore,
        reference: &str,
        creds: Option<&Credentials>,
        progress: &Progress,
    ) -> Result<ImageRecord> {
        let _pulling = self
            .inflight
            .lock(&super::ImageRef::parse(reference)?.whole())
            .await;
        self.pull_locked(store, reference, creds, progress).await
    }

    /// [`Puller::pull`] with the reference's lock held.
    async fn pull_locked(
        &self,
        store: &ImageStore,
        reference: &str,
        creds: Option<&Credentials>,
        progress: &Progress,
    ) -> Result<ImageRecord> {
        let parsed = super::ImageRef::parse(reference)?;
        let name = parsed.whole();
        let r: Reference = parsed.to_client();
        let auth = match creds {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let map = |e| match (map_error(e, &r), r.digest()) {
            (
                ImageError::NotFound {
                    reference,
                    registry,
                },
                Some(d),
            ) => ImageError::DigestNotFound {
                reference,
                registry,
                digest: d.to_string(),
            },
            (e, _) => e,
        };
        let client = self.client();
        let (mut bytes, _) = client
            .pull_manifest_raw(&r, &auth, MANIFEST_TYPES)
            .await
            .map_err(map)?;
        let mut digest = format!("sha256:{}", super::sha256_hex(&bytes));
        if let Some(want) = r.digest() {
            if want != digest {
                return Err(ImageError::DigestMismatch {
                    what: format!("manifest of {reference}"),
                    expected: want.into(),
                    actual: digest,
                });
            }
        }
        if is_index(&bytes) {
            let index: ImageIndex = serde_json::from_slice(&bytes)
                .map_err(|e| ImageError::BadMetadata(format!("image index of {reference}: {e}")))?;
            let chosen = select_platform(&index)?;
            let by_digest = r.clone_with_digest(chosen.clone());
            let (b, _) = client
                .pull_manifest_raw(&by_digest, &auth, MANIFEST_TYPES)
                .await
                .map_err(map)?;
            let actual = format!("sha256:{}", super::sha256_hex(&b));
            if actual != chosen {
                return Err(ImageError::DigestMismatch {
                    what: format!("platform manifest of {reference}"),
                    expected: chosen,
                    actual,
                });
            }
            bytes = b;
            digest = actual;
        }
        let manifest: ImageManifest = serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::BadMetadata(format!("manifest of {reference}: {e}")))?;

        let total: u64 =
            manifest.layers().iter().map(|l| l.size()).sum::<u64>() + manifest.config().size();
        progress.total.store(total, Ordering::Relaxed);
        progress.done.store(0, Ordering::Relaxed);
        let started = Instant::now();

        // Config (small) then layers, each streamed to tmp/ and verified.
        let cfg = manifest.config();
        self.fetch_blob(
            &client,
            store,
            &r,
            cfg.digest().as_ref(),
            cfg.size(),
            progress,
            reference,
        )
        .await?;
        // An artifact (a model, not a runnable image) has no diff_ids: its
        // blobs are fetched the same verified, resumable way and its files
        // laid out once (after which its blobs are gone: nothing to fetch).
        let artifact = !super::is_image_config(cfg.media_type().as_ref());
        let have: Vec<bool> = if artifact {
            let laid_out = store.record(&digest)?.is_some_and(|r| r.artifact.is_some())
                && store.artifact_dir(&digest)?.is_dir();
            vec![laid_out; manifest.layers().len()]
        } else {
            let config: oci_spec::image::ImageConfiguration =
                serde_json::from_slice(&store.read_blob(cfg.digest().as_ref())?).map_err(|e| {
                    ImageError::BadMetadata(format!("image config of {reference}: {e}"))
                })?;
            let diff_ids = config.rootfs().diff_ids();
            // A layer already unpacked for another image is not fetched again.
            (0..manifest.layers().len())
                .map(|i| diff_ids.get(i).is_some_and(|d| store.has_layer(d)))
                .collect()
        };
        for (l, have) in manifest.layers().iter().zip(have) {
            if have {
                progress.done.fetch_add(l.size(), Ordering::Relaxed);
                continue;
            }
            self.fetch_blob(
                &client,
                store,
                &r,
                l.digest().as_ref(),
                l.size(),
                progress,
                reference,
            )
            .await?;
        }
        store.put_blob(&digest, &bytes)?;
        let record = finish_blocking(store, digest, manifest, vec![name], artifact).await?;
        tracing::info!(
            reference,
            artifact,
            digest = %record.digest,
            bytes = total,
            secs = format!("{:.1}", started.elapsed().as_secs_f64()),
            "pulled"
        );
        Ok(record)
    }

    /// Download one blob unless the store has it (or, for layers, its unpacked
    /// form: then nothing is fetched). Resumes a partial download with a
    /// range request; restarts if the registry ignores the range.
    #[allow(clippy::too_many_arguments)]
    async fn fetch_blob(
        &self,
        client: &oci_client::Client,
        store: &ImageStore,
        r: &Reference,
        digest: &str,
        size: u64,
        progress: &Progress,
        reference: &str,
    ) -> Result<()> {
        let fetching = self.inflight.lock(digest).await;
        if store.has_blob(digest) {
            progress.done.fetch_add(size, Ordering::Relaxed);
            return Ok(());
        }
        let hex = digest.trim_start_matches("sha256:");
        let part = store.tmp_dir().join(format!("{hex}.partial"));
        let have = outrigger_sys::fs::metadata(&part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        let have = if have > size { 0 } else { have };
        let desc = oci_client::manifest::OciDescriptor {
            digest: digest.to_string(),
            size: size as i64,
            ..Default::default()
        };
        if have == size && size > 0 {
            // Complete but never committed (a pull cut off just before).
            match store.commit_blob_file(&part, digest, Some(size)) {
                Err(ImageError::DigestMismatch { .. }) => {} // removed: start over
                other => {
                    progress.done.fetch_add(size, Ordering::Relaxed);
                    return other;
                }
            }
        }
        let offset = if have < size { have } else { 0 };
        let (stream, append) = match client
            .pull_blob_stream_partial(r, &desc, offset, None)
            .await
            .map_err(|e| map_error(e, r))?
        {
            // A registry that ignores the range sends it all: restart.
            BlobResponse::Partial(s) if offset > 0 => (s, true),
            BlobResponse::Partial(s) | BlobResponse::Full(s) => (s, false),
        };
        let mut options = std::fs::OpenOptions::new();
        options
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append);
        let mut file = outrigger_sys::fs::File::open(&part, options)
            .await
            .map_err(|e| ImageError::io(&part, e))?;
        if append {
            tracing::info!(blob = digest, offset = have, "resuming download");
            progress.done.fetch_add(have, Ordering::Relaxed);
        }
        let mut written = if append { have } else { 0 };
        // The digest as the bytes arrive (a resumed one from what is on
        // disk first), so a large model is not read back to be checked.
        let mut hasher = if append {
            let p = part.clone();
            outrigger_sys::blocking(move || super::hash_file(&p))
                .await
                .map_err(|e| ImageError::BadMetadata(format!("hashing task failed: {e}")))??
        } else {
            sha2::Sha256::default()
        };
        let mut last_log = Instant::now();
        let mut stream = stream.stream;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ImageError::Unreachable {
                registry: r.resolve_registry().to_string(),
                detail: format!("while downloading {digest}: {e}"),
            })?;
            written += chunk.len() as u64;
            if written > size {
                drop(file);
                let _ = outrigger_sys::fs::remove_file(&part).await;
                return Err(ImageError::SizeMismatch {
                    what: digest.into(),
                    expected: size,
                    actual: written,
                });
            }
            let n = chunk.len() as u64;
            sha2::Digest::update(&mut hasher, &chunk);
            file.write_all(chunk)
                .await
                .map_err(|e| ImageError::io(&part, e))?;
            progress.done.fetch_add(n, Ordering::Relaxed);
            if last_log.elapsed() > Duration::from_secs(2) {
                let (d, t) = progress.snapshot();
                tracing::info!(image = reference, done = d, total = t, "pulling");
                last_log = Instant::now();
            }
        }
        drop(file);
        let actual = format!("sha256:{}", hex::encode(sha2::Digest::finalize(hasher)));
        let committed = {
            let (root, part, digest) =
                (store.root().to_path_buf(), part.clone(), digest.to_string());
            // fsync and rename off the runtime thread.
            outrigger_sys::blocking(move || {
                ImageStore::open(root)?.commit_verified(&part, &digest, &actual, written, size)
            })
            .await
            .map_err(|e| ImageError::BadMetadata(format!("commit task failed: {e}")))?
        };
        match committed {
            // A resumed download that does not verify (the partial file was
            // bad): the file is gone now; start over once from byte zero.
            Err(ImageError::DigestMismatch { .. }) if append => {
                tracing::warn!(
                    blob = digest,
                    "resumed download did not verify; restarting it"
                );
                progress.done.fetch_sub(
                    written.min(progress.done.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                // The lock is not re-entrant: the retry takes it anew.
                drop(fetching);
                Box::pin(self.fetch_blob(client, store, r, digest, size, progress, reference)).await
            }
            other => other,
        }
    }
}

/// Unpacking is CPU and disk work: keep it off the async threads.
async fn finish_blocking(
    store: &ImageStore,
    digest: String,
    manifest: ImageManifest,
    names: Vec<String>,
    artifact: bool,
) -> Result<ImageRecord> {
    let root = store.root().to_path_buf();
    // Inside the fork guard, giving way at each tar entry: a container
    // creation waits for one entry, not a whole layer.
    outrigger_sys::blocking(move || {
        let store = ImageStore::open(root)?;
        if artifact {
            store.finish_artifact(&digest, &manifest, &names)
        } else {
            store.finish_image(&digest, &manifest, &names)
        }
    })
    .await
    .map_err(|e| ImageError::BadMetadata(format!("unpack task failed: {e}")))?
}

fn is_index(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(bytes) {
        Ok(p) => {
            p.manifests.is_some()
                || p.media_type
                    .as_deref()
                    .is_some_and(|m| m.contains("index") || m.contains("list"))
        }
        Err(_) => false,
    }
}

/// The platform this binary runs on, in OCI terms.
pub fn current_platform() -> (&'static str, &'static str, Option<&'static str>) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        "x86" => "386",
        "riscv64" => "riscv64",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        other => other,
    };
    let variant = match std::env::consts::ARCH {
        "arm" => Some("v7"),
        "aarch64" => Some("v8"),
        _ => None,
    };
    ("linux", arch, variant)
}

/// Choose the manifest for the running platform from an index.
pub fn select_platform(index: &ImageIndex) -> Result<String> {
    let (os, arch, variant) = current_platform();
    let mut fallback = None;
    for m in index.manifests() {
        let Some(p) = m.platform() else { continue };
        if p.os().to_string() != os || p.architecture().to_string() != arch {
            continue;
        }
        match (p.variant().as_deref(), variant) {
            (Some(v), Some(want)) if v == want => return Ok(m.digest().to_string()),
            (None, _) | (Some(_), None) => {
                fallback.get_or_insert_with(|| m.digest().to_string());
            }
            _ => {}
        }
    }
    fallback.ok_or_else(|| {
        ImageError::NoPlatform(format!(
            "{os}/{arch}{}",
            variant.map(|v| format!("/{v}")).unwrap_or_default()
        ))
    })
}

fn map_error(e: OciDistributionError, r: &Reference) -> ImageError {
    let registry = r.resolve_registry().to_string();
    let reference = r.whole();
    match e {
        OciDistributionError::ImageManifestNotFoundError(_) => ImageError::NotFound {
            reference,
            registry,
        },
        OciDistributionError::AuthenticationFailure(detail) => ImageError::Unauthorized {
            reference,
            registry,
            detail,
        },
        OciDistributionError::UnauthorizedError { url } => ImageError::Unauthorized {
            reference,
            registry,
            detail: format!("401 from {url}"),
        },
        OciDistributionError::RegistryError { envelope, url } => {
            let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
            if codes.iter().any(|c| {
                matches!(
                    c,
                    OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound
                        | OciErrorCode::BlobUnknown
                )
            }) {
                ImageError::NotFound {
                    reference,
                    registry,
                }
            } else if codes
                .iter()
                .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
            {
                ImageError::Unauthorized {
                    reference,
                    registry,
                    detail: format!("{envelope} ({url})"),
                }
            } else {
                ImageError::Registry {
                    reference,
                    registry,
                    detail: format!("{envelope} ({url})"),
                }
            }
        }
        OciDistributionError::RequestError(re) if re.is_connect() || re.is_timeout() => {
            let mut detail = re.to_string();
            let mut src = std::error::Error::source(&re);
            while let Some(s) = src {
                detail = format!("{detail}: {s}");
                src = s.source();
            }
            ImageError::Unreachable { registry, detail }
        }
        OciDistributionError::DigestError(d) => ImageError::DigestMismatch {
            what: reference,
            expected: String::new(),
            actual: d.to_string(),
        },
        other => ImageError::Registry {
            reference,
            registry,
            detail: other.to_string(),
        },
    }
}

/// Make sure `reference` is in the store according to `policy`, pulling it
/// if needed.
pub async fn ensure(
    store: &ImageStore,
    puller: &Puller,
    reference: &str,
    policy: PullPolicy,
    creds: Option<&Credentials>,
    progress: &Progress,
) -> Result<ImageRecord> {
    let present = store.resolve(reference)?;
    match (policy, present) {
        (PullPolicy::Never, Some(r)) | (PullPolicy::IfNotPresent, Some(r)) => Ok(r),
        (PullPolicy::Never, None) => Err(ImageError::NeverPull(reference.into())),
        (PullPolicy::IfNotPresent, None) => {
            // Another pod may be pulling it right now: wait for that pull
            // and take its result.
            let _pulling = puller
                .inflight
                .lock(&super::ImageRef::parse(reference)?.whole())
                .await;
            match store.resolve(reference)? {
                Some(r) => Ok(r),
                None => puller.pull_locked(store, reference, creds, progress).await,
            }
        }
        _ => puller.pull(store, reference, creds, progress).await,
    }
}
