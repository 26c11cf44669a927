//! The image store: content-addressed blobs, unpacked layers shared between
//! images, image records, and garbage collection under a disk budget.
//!
//! Layout under the store root:
//! ```text
//! blobs/sha256/<hex>        verified manifests, configs (and layers until unpacked)
//! layers/sha256/<hex>/      one unpacked layer per diff_id (an overlay lowerdir)
//! layers/sha256/<hex>.json  its size
//! images/<hex>.json         one record per image (manifest digest); written last
//! tmp/                      downloads and unpacks in progress
//! ```
//! An image exists only once its record is written, and the record is written
//! (atomically, by rename) only after every layer is unpacked and verified, so
//! an interrupted pull or import never leaves a half image that looks complete.

pub mod archive;
pub mod auth;
mod layer;
pub mod registry;
pub mod rootfs;

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use oci_spec::image::{ImageConfiguration, ImageManifest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("invalid image reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    #[error("image {0} not found in the local store")]
    NotPresent(String),
    #[error("image {reference} not found in registry {registry} (manifest unknown)")]
    NotFound { reference: String, registry: String },
    #[error("no manifest with digest {digest} for {reference} in registry {registry}")]
    DigestNotFound {
        reference: String,
        registry: String,
        digest: String,
    },
    #[error("registry {registry} refused the credentials for {reference}: {detail}")]
    Unauthorized {
        reference: String,
        registry: String,
        detail: String,
    },
    #[error("registry {registry} unreachable: {detail}")]
    Unreachable { registry: String, detail: String },
    #[error("registry {registry} error for {reference}: {detail}")]
    Registry {
        reference: String,
        registry: String,
        detail: String,
    },
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    DigestMismatch {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("size mismatch for {what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("refused layer entry {path:?}: {reason}")]
    BadLayer { path: String, reason: String },
    #[error("bad image metadata: {0}")]
    BadMetadata(String),
    #[error("no image for platform {0} in the image index")]
    NoPlatform(String),
    #[error("image {0} is used by a container; stop it first")]
    InUse(String),
    #[error("image {0} is not present and the pull policy is Never")]
    NeverPull(String),
}

impl ImageError {
    pub fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            source,
        }
    }
}

pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// One layer of an image, bottom first in [`ImageRecord::layers`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerInfo {
    pub diff_id: String,
    pub size: u64,
}

/// A complete image in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Manifest digest: the image's identity.
    pub digest: String,
    /// Normalised references (`registry/repo:tag`) that point at it.
    pub names: Vec<String>,
    pub config_digest: String,
    pub layers: Vec<LayerInfo>,
    /// Seconds since the epoch.
    pub added: u64,
    pub last_used: u64,
    /// An OCI artifact (a model pushed with ORAS, a ModelPack): no layers
    /// to stack, its files unpacked once under `artifacts/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactInfo>,
}

/// What an artifact's record says of its content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactInfo {
    /// Bytes of its files.
    pub size: u64,
    /// The manifest's artifactType, or its config's media type.
    pub artifact_type: String,
}

impl ImageRecord {
    pub fn size(&self) -> u64 {
        match &self.artifact {
            Some(a) => a.size,
            None => self.layers.iter().map(|l| l.size).sum(),
        }
    }
}

/// Config media types of runnable images; any other config makes an
/// artifact (ORAS's empty config, ModelPack's and KitOps' model configs).
pub fn is_image_config(media_type: &str) -> bool {
    matches!(
        media_type,
        "application/vnd.oci.image.config.v1+json"
            | "application/vnd.docker.container.image.v1+json"
    )
}

/// An image reference split into its parts, normalised the way Docker and
/// Kubernetes do it (`busybox` is `docker.io/library/busybox:latest`).
///
/// Parsed by hand rather than through `oci_client::Reference::from_str`:
/// that one compiles a Unicode regex whose automaton stays resident at about
/// 4 MB, a quarter of edge-rt's memory on a gateway. The grammar is
/// distribution's (`reference/regexp.go`); a test compares the two parsers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<String>,
}

fn bad_ref(reference: &str, reason: &str) -> ImageError {
    ImageError::BadReference {
        reference: reference.to_string(),
        reason: reason.to_string(),
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`: one path component of a repository.
fn path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator: ".", "_", "__" or a run of "-", between alphanumerics.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || !b.get(i).copied().is_some_and(alnum) {
            return false;
        }
    }
    true
}

/// A registry host: DNS labels separated by dots, and an optional port.
fn domain_ok(d: &str) -> bool {
    let (host, port) = match d.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric()
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_digit()))
}

impl ImageRef {
    pub fn parse(reference: &str) -> Result<ImageRef> {
        if reference.is_empty() {
            return Err(bad_ref(
                reference,
                "repository name must have at least one component",
            ));
        }
        let (name, digest) = match reference.split_once('@') {
            Some((n, d)) => (n, Some(d)),
            None => (reference, None),
        };
        if let Some(d) = digest {
            let (algo, hex) = d
                .split_once(':')
                .ok_or_else(|| bad_ref(reference, "invalid digest format"))?;
            let want = match algo {
                "sha256" => 64,
                "sha384" => 96,
                "sha512" => 128,
                _ => return Err(bad_ref(reference, "unsupported digest algorithm")),
            };
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad_ref(reference, "invalid reference format"));
            }
            if hex.len() != want {
                return Err(bad_ref(reference, "invalid checksum digest length"));
            }
        }
        // A tag follows the last ':' that comes after the last '/'.
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
            None => (name, None),
        };
        if let Some(t) = tag {
            let b = t.as_bytes();
            let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
            if b.is_empty()
                || b.len() > 128
                || !word(b[0])
                || !b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
            {
                return Err(bad_ref(reference, "invalid reference format"));
            }
        }
        let (mut registry, mut repository) = match name.split_once('/') {
            Some((left, right))
                if left.contains('.') || left.contains(':') || left == "localhost" =>
            {
                if !domain_ok(left) {
                    return Err(bad_ref(reference, "invalid reference format"));
                }
                (left.to_string(), right.to_string())
            }
            _ => ("docker.io".to_string(), name.to_string()),
        };
        if !repository.split('/').all(path_component) {
            return Err(bad_ref(reference, "invalid reference format"));
        }
        if registry == "index.docker.io" {
            registry = "docker.io".into();
        }
        if registry == "docker.io" && !repository.contains('/') {
            repository = format!("library/{repository}");
        }
        if repository.len() > 255 {
            return Err(bad_ref(
                reference,
                "repository name must not be more than 255 characters",
            ));
        }
        let tag = match (tag, digest) {
            (None, None) => Some("latest".to_string()),
            (t, _) => t.map(str::to_string),
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_string),
        })
    }

    /// `registry/repository[:tag][@digest]`.
    pub fn whole(&self) -> String {
        let mut s = format!("{}/{}", self.registry, self.repository);
        if let Some(t) = &self.tag {
            s.push(':');
            s.push_str(t);
        }
        if let Some(d) = &self.digest {
            s.push('@');
            s.push_str(d);
        }
        s
    }

    /// The client's reference type, made from the parts (no regex).
    pub fn to_client(&self) -> oci_client::Reference {
        let (r, repo) = (self.registry.clone(), self.repository.clone());
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => {
                oci_client::Reference::with_tag_and_digest(r, repo, t.clone(), d.clone())
            }
            (_, Some(d)) => oci_client::Reference::with_digest(r, repo, d.clone()),
            (t, None) => oci_client::Reference::with_tag(
                r,
                repo,
                t.clone().unwrap_or_else(|| "latest".into()),
            ),
        }
    }
}

/// Normalise a user's image reference the way Docker and Kubernetes do
/// (`busybox` is `docker.io/library/busybox:latest`).
pub fn normalize(reference: &str) -> Result<String> {
    Ok(ImageRef::parse(reference)?.whole())
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn hex_of(digest: &str) -> Result<&str> {
    match digest.strip_prefix("sha256:") {
        Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => Ok(h),
        _ => Err(ImageError::BadMetadata(format!(
            "unsupported digest {digest:?} (only sha256)"
        ))),
    }
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(|e| ImageError::io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| ImageError::io(&tmp, e))?;
    f.sync_all().map_err(|e| ImageError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| ImageError::io(path, e))
}

/// Result of a garbage collection.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub images_removed: Vec<String>,
    pub layers_removed: usize,
    pub bytes_before: u64,
    pub bytes_after: u64,
}

/// What running containers hold: never collected.
#[derive(Debug, Default, Clone)]
pub struct InUse {
    pub images: HashSet<String>,
    pub layers: HashSet<String>,
}

pub struct ImageStore {
    root: PathBuf,
}

/// An exclusive lock on the store for changes to records and for GC, held
/// across processes (the daemon and `edge-rt images` may run at once).
pub struct StoreLock(fs::File);

impl Drop for StoreLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

impl ImageStore {
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        for d in ["blobs/sha256", "layers/sha256", "images", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(|e| ImageError::io(&p, e))?;
        }
        Ok(ImageStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn lock(&self) -> Result<StoreLock> {
        let p = self.root.join(".lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| ImageError::io(&p, e))?;
        f.lock().map_err(|e| ImageError::io(&p, e))?;
        Ok(StoreLock(f))
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    pub fn read_blob(&self, digest: &str) -> Result<Vec<u8>> {
        let p = self.blob_path(digest)?;
        fs::read(&p).map_err(|e| ImageError::io(&p, e))
    }

    /// Store a small blob held in memory after checking its digest.
    pub fn put_blob(&self, digest: &str, bytes: &[u8]) -> Result<()> {
        let actual = format!("sha256:{}", sha256_hex(bytes));
        if actual != digest {
            return Err(ImageError::DigestMismatch {
                what: "blob".into(),
                expected: digest.into(),
                actual,
            });
        }
        write_atomic(&self.blob_path(digest)?, bytes)
    }

    /// Move a downloaded file into the blob store once its size and digest
    /// match the descriptor. On mismatch the file is removed.
    pub fn commit_blob_file(&self, file: &Path, digest: &str, size: Option<u64>) -> Result<()> {
        let check = (|| {
            let mut f = fs::File::open(file).map_err(|e| ImageError::io(file, e))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            let mut n_total = 0u64;
            loop {
                let n = f.read(&mut buf).map_err(|e| ImageError::io(file, e))?;
                if n == 0 {
                    break;
                }
                n_total += n as u64;
                h.update(&buf[..n]);
            }
            if let Some(expected) = size {
                if expected != n_total {
                    return Err(ImageError::SizeMismatch {
                        what: digest.to_string(),
                        expected,
                        actual: n_total,
                    });
                }
            }
            let actual = format!("sha256:{}", hex::encode(h.finalize()));
            if actual != digest {
                return Err(ImageError::DigestMismatch {
                    what: "blob".into(),
                    expected: digest.into(),
                    actual,
                });
            }
            f.sync_all().map_err(|e| ImageError::io(file, e))
        })();
        if let Err(e) = check {
            let _ = fs::remove_file(file);
            return Err(e);
        }
        let dest = self.blob_path(digest)?;
        fs::rename(file, &dest).map_err(|e| ImageError::io(&dest, e))
    }

    /// Move a downloaded file into the blob store, its size and digest
    /// (`actual`, hashed as it was written) checked against the
    /// descriptor's. On mismatch the file is removed.
    pub fn commit_verified(
        &self,
        file: &Path,
        digest: &str,
        actual: &str,
        written: u64,
        size: u64,
    ) -> Result<()> {
        let check = if written != size {
            Err(ImageError::SizeMismatch {
                what: digest.to_string(),
                expected: size,
                actual: written,
            })
        } else if actual != digest {
            Err(ImageError::DigestMismatch {
                what: "blob".into(),
                expected: digest.into(),
                actual: actual.into(),
            })
        } else {
            fs::File::open(file)
                .and_then(|f| f.sync_all())
                .map_err(|e| ImageError::io(file, e))
        };
        if let Err(e) = check {
            let _ = fs::remove_file(file);
            return Err(e);
        }
        let dest = self.blob_path(digest)?;
        fs::rename(file, &dest).map_err(|e| ImageError::io(&dest, e))
    }

    pub fn layer_dir(&self, diff_id: &str) -> Result<PathBuf> {
        Ok(self.root.join("layers/sha256").join(hex_of(diff_id)?))
    }

    fn layer_meta(&self, diff_id: &str) -> Result<PathBuf> {
        Ok(self
            .root
            .join("layers/sha256")
            .join(format!("{}.json", hex_of(diff_id)?)))
    }

    /// A layer is present once its metadata file exists: that file is written
    /// after the directory is complete and renamed into place.
    pub fn has_layer(&self, diff_id: &str) -> bool {
        self.layer_meta(diff_id)
            .map(|p| p.is_file())
            .unwrap_or(false)
    }

    fn layer_size(&self, diff_id: &str) -> Result<u64> {
        let p = self.layer_meta(diff_id)?;
        let v: serde_json::Value =
            serde_json::from_slice(&fs::read(&p).map_err(|e| ImageError::io(&p, e))?)
                .map_err(|e| ImageError::BadMetadata(format!("{}: {e}", p.display())))?;
        Ok(v["size"].as_u64().unwrap_or(0))
    }

    /// Unpack the layer blob `blob_digest` as `diff_id` on top of `lowers`
    /// (their diff_ids, bottom first), unless it is already there.
    pub fn unpack_layer(
        &self,
        blob_digest: &str,
        media_type: &str,
        diff_id: &str,
        lowers: &[String],
    ) -> Result<u64> {
        if self.has_layer(diff_id) {
            return self.layer_size(diff_id);
        }
        let blob = self.blob_path(blob_digest)?;
        let work = self.tmp_dir().join(format!(
            "unpack-{}-{}",
            hex_of(diff_id)?,
            std::process::id()
        ));
        layer::remove_any(&work).map_err(|e| ImageError::io(&work, e))?;
        fs::create_dir_all(&work).map_err(|e| ImageError::io(&work, e))?;
        let lower_dirs: Vec<PathBuf> = lowers
            .iter()
            .rev()
            .map(|d| self.layer_dir(d))
            .collect::<Result<_>>()?;
        let result = layer::unpack(&blob, media_type, &work, &lower_dirs).and_then(|u| {
            if u.diff_id != diff_id {
                Err(ImageError::DigestMismatch {
                    what: format!("uncompressed layer {blob_digest}"),
                    expected: diff_id.into(),
                    actual: u.diff_id,
                })
            } else {
                Ok(u)
            }
        });
        let unpacked = match result {
            Ok(u) => u,
            Err(e) => {
                let _ = layer::remove_any(&work);
                return Err(e);
            }
        };
        // The layer's files on disk before it counts as there: a power cut
        // after this must not leave a layer whose files are empty (a
        // gateway's pods would then fail to start from its store).
        sync_fs(&work)?;
        let dest = self.layer_dir(diff_id)?;
        layer::remove_any(&dest).map_err(|e| ImageError::io(&dest, e))?;
        fs::rename(&work, &dest).map_err(|e| ImageError::io(&dest, e))?;
        sync_dir(dest.parent().unwrap_or(&self.root));
        write_atomic(
            &self.layer_meta(diff_id)?,
            serde_json::json!({ "size": unpacked.size })
                .to_string()
                .as_bytes(),
        )?;
        Ok(unpacked.size)
    }

    /// Where an artifact's files are.
    pub fn artifact_dir(&self, manifest_digest: &str) -> Result<PathBuf> {
        Ok(self
            .root
            .join("artifacts/sha256")
            .join(hex_of(manifest_digest)?))
    }

    /// Complete an artifact whose manifest and blobs are in the store: its
    /// files laid out once in [`ImageStore::artifact_dir`], then its record.
    ///
    /// Each layer becomes files by what its descriptor says: a blob with
    /// `org.opencontainers.image.title` is one file of that name (ORAS's
    /// files, whatever their media type), unless
    /// `io.deis.oras.content.unpack` asks for it to be unpacked (ORAS's
    /// directories); a tar (by media type or by its bytes) is unpacked
    /// (ModelPack's and KitOps' layers); anything else is one file named by
    /// `org.cncf.model.filepath`, or by its digest.
    pub fn finish_artifact(
        &self,
        manifest_digest: &str,
        manifest: &ImageManifest,
        names: &[String],
    ) -> Result<ImageRecord> {
        let dest = self.artifact_dir(manifest_digest)?;
        let artifact_type = manifest
            .artifact_type()
            .as_ref()
            .map(|t| t.to_string())
            .unwrap_or_else(|| manifest.config().media_type().to_string());
        let size = match self.record(manifest_digest)? {
            Some(r) if dest.is_dir() => r.size(),
            _ => {
                let work = self.tmp_dir().join(format!(
                    "artifact-{}-{}",
                    hex_of(manifest_digest)?,
                    std::process::id()
                ));
                layer::remove_any(&work).map_err(|e| ImageError::io(&work, e))?;
                fs::create_dir_all(&work).map_err(|e| ImageError::io(&work, e))?;
                let laid = self.lay_out_artifact(manifest, &work);
                if let Err(e) = laid {
                    let _ = layer::remove_any(&work);
                    return Err(e);
                }
                sync_fs(&work)?;
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
                }
                layer::remove_any(&dest).map_err(|e| ImageError::io(&dest, e))?;
                fs::rename(&work, &dest).map_err(|e| ImageError::io(&dest, e))?;
                sync_dir(dest.parent().unwrap_or(&self.root));
                dir_size(&dest)?
            }
        };
        let artifact = ArtifactInfo {
            size,
            artifact_type,
        };
        self.commit_record(manifest_digest, manifest, vec![], Some(artifact), names)
    }

    fn lay_out_artifact(&self, manifest: &ImageManifest, work: &Path) -> Result<()> {
        for desc in manifest.layers() {
            let digest = desc.digest().to_string();
            let blob = self.blob_path(&digest)?;
            let ann = desc.annotations().clone().unwrap_or_default();
            let media_type = desc.media_type().to_string();
            let title = ann.get("org.opencontainers.image.title");
            let unpack = ann
                .get("io.deis.oras.content.unpack")
                .is_some_and(|v| v == "true");
            let tar_type = media_type.ends_with(".tar")
                || media_type.contains(".tar+")
                || media_type.ends_with("tar.gzip");
            if unpack || (title.is_none() && (tar_type || layer::looks_like_tar(&blob))) {
                layer::unpack(&blob, &media_type, work, &[])?;
                continue;
            }
            let name = title
                .or_else(|| ann.get("org.cncf.model.filepath"))
                .cloned()
                .unwrap_or_else(|| digest.replace(':', "-"));
            let rel = Path::new(&name);
            if name.is_empty()
                || rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(ImageError::BadLayer {
                    path: name.clone(),
                    reason: "an artifact's file name must be a relative path without '..'".into(),
                });
            }
            let target = work.join(rel);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
            }
            // Same filesystem: a link, not a copy of a model of gigabytes.
            fs::hard_link(&blob, &target).map_err(|e| ImageError::io(&target, e))?;
            let _ = fs::set_permissions(&target, fs::Permissions::from_mode(0o444));
        }
        Ok(())
    }

    /// Complete an image whose manifest, config and layer blobs are in the
    /// store: unpack and verify layers, then write its record and names.
    pub fn finish_image(
        &self,
        manifest_digest: &str,
        manifest: &ImageManifest,
        names: &[String],
    ) -> Result<ImageRecord> {
        let config_digest = manifest.config().digest().to_string();
        let config = self.config_by_digest(&config_digest)?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(ImageError::BadMetadata(format!(
                "manifest has {} layers but config lists {} diff_ids",
                manifest.layers().len(),
                diff_ids.len()
            )));
        }
        let mut layers = Vec::new();
        for (i, (desc, diff_id)) in manifest.layers().iter().zip(diff_ids).enumerate() {
            let size = self.unpack_layer(
                desc.digest().as_ref(),
                desc.media_type().as_ref(),
                diff_id,
                &diff_ids[..i],
            )?;
            layers.push(LayerInfo {
                diff_id: diff_id.clone(),
                size,
            });
        }
        self.commit_record(manifest_digest, manifest, layers, None, names)
    }

    /// Write the record of a complete image or artifact (keeping one
    /// written before) with its names, which leave any other record; its
    /// layer blobs are dropped, as the unpacked form is what pods use.
    fn commit_record(
        &self,
        manifest_digest: &str,
        manifest: &ImageManifest,
        layers: Vec<LayerInfo>,
        artifact: Option<ArtifactInfo>,
        names: &[String],
    ) -> Result<ImageRecord> {
        let _lock = self.lock()?;
        // A gateway's disk is small: compressed blobs go once unpacked.
        for desc in manifest.layers() {
            if let Ok(p) = self.blob_path(desc.digest().as_ref()) {
                let _ = fs::remove_file(p);
            }
        }
        let mut record = self.record(manifest_digest)?.unwrap_or(ImageRecord {
            digest: manifest_digest.to_string(),
            names: vec![],
            config_digest: manifest.config().digest().to_string(),
            layers,
            added: now(),
            last_used: now(),
            artifact: None,
        });
        if artifact.is_some() {
            record.artifact = artifact;
        }
        for n in names {
            self.untag_locked(n)?;
            if !record.names.contains(n) {
                record.names.push(n.clone());
            }
        }
        self.save_record(&record)?;
        Ok(record)
    }

    fn record_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self
            .root
            .join("images")
            .join(format!("{}.json", hex_of(digest)?)))
    }

    fn save_record(&self, r: &ImageRecord) -> Result<()> {
        let bytes =
            serde_json::to_vec_pretty(r).map_err(|e| ImageError::BadMetadata(e.to_string()))?;
        write_atomic(&self.record_path(&r.digest)?, &bytes)
    }

    pub fn record(&self, digest: &str) -> Result<Option<ImageRecord>> {
        let p = self.record_path(digest)?;
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ImageError::BadMetadata(format!("{}: {e}", p.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::io(p, e)),
        }
    }

    /// All complete images, newest first.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(|e| ImageError::io(&dir, e))? {
            let e = e.map_err(|e| ImageError::io(&dir, e))?;
            let name = e.file_name();
            let Some(hex) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            if let Some(r) = self.record(&format!("sha256:{hex}"))? {
                out.push(r);
            }
        }
        out.sort_by(|a, b| b.added.cmp(&a.added).then(a.digest.cmp(&b.digest)));
        Ok(out)
    }

    /// Find an image by reference (`name:tag`, `name@digest`), by manifest
    /// digest, or by a unique prefix of its digest's hex.
    pub fn resolve(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let images = self.list()?;
        if let Some(d) = reference
            .split_once('@')
            .map(|(_, d)| d)
            .or_else(|| reference.starts_with("sha256:").then_some(reference))
        {
            return Ok(images.into_iter().find(|i| i.digest == d));
        }
        if reference.len() >= 6 && reference.bytes().all(|b| b.is_ascii_hexdigit()) {
            let hits: Vec<_> = images
                .iter()
                .filter(|i| {
                    i.digest
                        .trim_start_matches("sha256:")
                        .starts_with(reference)
                })
                .collect();
            if hits.len() == 1 {
                return Ok(Some(hits[0].clone()));
            }
        }
        let name = normalize(reference)?;
        Ok(images.into_iter().find(|i| i.names.contains(&name)))
    }

    pub fn config(&self, record: &ImageRecord) -> Result<ImageConfiguration> {
        self.config_by_digest(&record.config_digest)
    }

    fn config_by_digest(&self, digest: &str) -> Result<ImageConfiguration> {
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| ImageError::BadMetadata(format!("image config {digest}: {e}")))
    }

    /// Layer directories of an image, topmost first (overlay lowerdir order).
    pub fn layer_dirs(&self, record: &ImageRecord) -> Result<Vec<PathBuf>> {
        record
            .layers
            .iter()
            .rev()
            .map(|l| self.layer_dir(&l.diff_id))
            .collect()
    }

    pub fn touch(&self, digest: &str) -> Result<()> {
        let _lock = self.lock()?;
        if let Some(mut r) = self.record(digest)? {
            r.last_used = now();
            self.save_record(&r)?;
        }
        Ok(())
    }

    fn untag_locked(&self, name: &str) -> Result<()> {
        for mut r in self.list()? {
            if r.names.iter().any(|n| n == name) {
                r.names.retain(|n| n != name);
                self.save_record(&r)?;
            }
        }
        Ok(())
    }

    /// Remove an image (all its names). Refused while a container uses it.
    pub fn remove(&self, reference: &str, in_use: &InUse) -> Result<ImageRecord> {
        let record = self
            .resolve(reference)?
            .ok_or_else(|| ImageError::NotPresent(reference.to_string()))?;
        if in_use.images.contains(&record.digest) {
            return Err(ImageError::InUse(reference.to_string()));
        }
        let _lock = self.lock()?;
        let p = self.record_path(&record.digest)?;
        fs::remove_file(&p).map_err(|e| ImageError::io(&p, e))?;
        self.sweep_locked(in_use)?;
        Ok(record)
    }

    /// Bytes the store holds on disk (layers as unpacked, plus blobs and
    /// partial downloads).
    pub fn disk_usage(&self) -> Result<u64> {
        Ok(dir_size(&self.root.join("layers"))?
            + dir_size(&self.root.join("artifacts"))?
            + dir_size(&self.root.join("blobs"))?
            + dir_size(&self.tmp_dir())?)
    }

    /// Bring the store under `budget` bytes: remove least recently used images
    /// that no container uses, then every layer and blob nothing references.
    pub fn gc(&self, budget: u64, in_use: &InUse) -> Result<GcReport> {
        let _lock = self.lock()?;
        let mut report = GcReport {
            bytes_before: self.disk_usage()?,
            ..Default::default()
        };
        report.layers_removed += self.sweep_locked(in_use)?;
        let mut usage = self.disk_usage()?;
        let mut candidates: Vec<ImageRecord> = self
            .list()?
            .into_iter()
            .filter(|r| !in_use.images.contains(&r.digest))
            .collect();
        candidates.sort_by_key(|r| r.last_used);
        for r in candidates {
            if usage <= budget {
                break;
            }
            let p = self.record_path(&r.digest)?;
            fs::remove_file(&p).map_err(|e| ImageError::io(&p, e))?;
            report.layers_removed += self.sweep_locked(in_use)?;
            report
                .images_removed
                .push(r.names.first().cloned().unwrap_or(r.digest.clone()));
            usage = self.disk_usage()?;
        }
        report.bytes_after = usage;
        if usage > budget {
            tracing::warn!(
                usage,
                budget,
                "image store is over its budget with only images in use left"
            );
        }
        Ok(report)
    }

    /// Remove layers and blobs no record references. Caller holds the lock.
    fn sweep_locked(&self, in_use: &InUse) -> Result<usize> {
        let records = self.list()?;
        let mut keep_layers: HashSet<String> = in_use.layers.clone();
        let mut keep_blobs: HashSet<String> = HashSet::new();
        for r in &records {
            keep_blobs.insert(r.digest.clone());
            keep_blobs.insert(r.config_digest.clone());
            for l in &r.layers {
                keep_layers.insert(l.diff_id.clone());
            }
        }
        let mut removed = 0;
        // Artifacts' files go with their record (one in use keeps its
        // record: GC never removes those).
        let adir = self.root.join("artifacts/sha256");
        if let Ok(rd) = fs::read_dir(&adir) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let d = format!("sha256:{name}");
                if !records.iter().any(|r| r.digest == d) && !in_use.images.contains(&d) {
                    removed += 1;
                    layer::remove_any(&e.path()).map_err(|err| ImageError::io(e.path(), err))?;
                }
            }
        }
        let ldir = self.root.join("layers/sha256");
        for e in fs::read_dir(&ldir)
            .map_err(|e| ImageError::io(&ldir, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let hex = name.trim_end_matches(".json");
            if !keep_layers.contains(&format!("sha256:{hex}")) {
                if !name.ends_with(".json") {
                    removed += 1;
                }
                layer::remove_any(&e.path()).map_err(|err| ImageError::io(e.path(), err))?;
            }
        }
        // Blobs are only transient (manifests and configs of live images stay);
        // a blob of an image still being pulled is in tmp/ until committed, and
        // a committed layer blob is younger than a minute while it is unpacked.
        let bdir = self.root.join("blobs/sha256");
        for e in fs::read_dir(&bdir)
            .map_err(|e| ImageError::io(&bdir, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            let fresh = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().map(|d| d.as_secs() < 600).unwrap_or(true))
                .unwrap_or(false);
            if !keep_blobs.contains(&format!("sha256:{name}")) && !fresh {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(removed)
    }
}

/// The SHA-256 state after a file's bytes (a partial download's prefix).
pub fn hash_file(path: &Path) -> Result<Sha256> {
    let mut f = fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf).map_err(|e| ImageError::io(path, e))?;
        if n == 0 {
            return Ok(h);
        }
        h.update(&buf[..n]);
    }
}

pub fn dir_size(path: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let rd = match fs::read_dir(&p) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(ImageError::io(&p, e)),
        };
        for e in rd.flatten() {
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    Ok(total)
}

/// Everything written to the file system holding `p`, flushed: one call
/// for a layer's thousands of files rather than an fsync each.
fn sync_fs(p: &Path) -> Result<()> {
    let f = fs::File::open(p).map_err(|e| ImageError::io(p, e))?;
    use std::os::fd::AsRawFd;
    nix::unistd::syncfs(f.as_raw_fd()).map_err(|e| ImageError::io(p, e.into()))
}

fn sync_dir(p: &Path) {
    if let Ok(f) = fs::File::open(p) {
        let _ = f.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-written parser against oci-spec's regex, on valid and
    /// invalid references alike.
    #[test]
    fn references_parse_as_oci_spec_does() {
        let d = "sha256:".to_string() + &"a".repeat(64);
        let cases = [
            "busybox".to_string(),
            "busybox:1.36".into(),
            "library/busybox".into(),
            "index.docker.io/busybox".into(),
            "docker.io/library/busybox:latest".into(),
            "ghcr.io/owner/app:v1.2.3".into(),
            "localhost/app".into(),
            "localhost:5000/a/b/c:tag_1-x.y".into(),
            "127.0.0.1:5000/x/y".into(),
            format!("busybox@{d}"),
            format!("reg.example.com:443/team/app:v2@{d}"),
            "a__b/c.d/e--f".into(),
            "Upper/case".into(),
            "app:".into(),
            "app:-bad".into(),
            ":tag".into(),
            "a//b".into(),
            "app@sha256:123".into(),
            "app@md5:0123456789abcdef0123456789abcdef".into(),
            "-app".into(),
            "app_".into(),
            "a.-b".into(),
            format!("app:{}", "t".repeat(129)),
            format!("app:{}", "t".repeat(128)),
            "reg.io:/x".into(),
            "a___b".into(),
            "my-reg.example.com/x:1".into(),
        ];
        for c in cases {
            let ours = ImageRef::parse(&c).map(|r| r.whole()).ok();
            // oci-spec lets an upper-case first component through as part of
            // a Docker Hub repository; Docker refuses it, and so do we.
            let theirs = match c.as_str() {
                "Upper/case" => None,
                _ => c.parse::<oci_client::Reference>().map(|r| r.whole()).ok(),
            };
            assert_eq!(ours, theirs, "{c}");
            if let Ok(r) = ImageRef::parse(&c) {
                assert_eq!(r.to_client().whole(), r.whole(), "{c}");
            }
        }
    }
}
