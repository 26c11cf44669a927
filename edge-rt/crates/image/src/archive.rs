//! Importing images without a registry: OCI layout directories, OCI archive
//! tarballs and `docker save` tarballs. Gateway images ship their base images
//! this way (the preload directory) for sites with no registry in reach.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Descriptor, DescriptorBuilder, ImageIndex, ImageManifest, ImageManifestBuilder, MediaType,
};
use serde::Deserialize;

use super::registry::select_platform;
use super::{layer, normalize, ImageError, ImageRecord, ImageStore, Result};

const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Import every image in `path` (a directory or a tarball). `name` overrides
/// the name when the source holds a single image.
pub fn import(store: &ImageStore, path: &Path, name: Option<&str>) -> Result<Vec<ImageRecord>> {
    let meta = fs::metadata(path).map_err(|e| ImageError::io(path, e))?;
    if meta.is_dir() {
        return import_dir(store, path, name, path);
    }
    // A tarball: unpack it to a scratch directory first (plain tar only: its
    // members are the blobs, compressed or not, and are verified later).
    let scratch = store
        .tmp_dir()
        .join(format!("import-{}", std::process::id()));
    layer::remove_any(&scratch).map_err(|e| ImageError::io(&scratch, e))?;
    fs::create_dir_all(&scratch).map_err(|e| ImageError::io(&scratch, e))?;
    let result = (|| {
        let f = fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
        extract_archive(f, &scratch)?;
        import_dir(store, &scratch, name, path)
    })();
    let _ = layer::remove_any(&scratch);
    result
}

/// Plain extraction of an image archive's members (files and directories
/// only; anything else in an image archive is an error).
fn extract_archive(r: impl io::Read, dest: &Path) -> Result<()> {
    let mut a = tar::Archive::new(r);
    for e in a.entries().map_err(|e| ImageError::io(dest, e))? {
        let mut e = e.map_err(|e| ImageError::BadMetadata(format!("archive: {e}")))?;
        let p = e
            .path()
            .map_err(|e| ImageError::BadMetadata(format!("archive path: {e}")))?
            .into_owned();
        let rel = layer::confined(&p).map_err(|r| ImageError::BadLayer {
            path: p.display().to_string(),
            reason: r,
        })?;
        let target = dest.join(&rel);
        match e.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(|e| ImageError::io(&target, e))?
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
                }
                let mut out = fs::File::create(&target).map_err(|e| ImageError::io(&target, e))?;
                io::copy(&mut e, &mut out).map_err(|e| ImageError::io(&target, e))?;
            }
            // docker save writes symlinks between layer directories for shared layers.
            tar::EntryType::Symlink => {
                let link = e.link_name().ok().flatten().ok_or_else(|| {
                    ImageError::BadMetadata("archive symlink without target".into())
                })?;
                let resolved = layer::confined(&rel.parent().unwrap_or(Path::new("")).join(&link))
                    .map_err(|r| ImageError::BadLayer {
                        path: p.display().to_string(),
                        reason: r,
                    })?;
                let src = dest.join(resolved);
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(|e| ImageError::io(parent, e))?;
                }
                if src.is_file() {
                    fs::copy(&src, &target).map_err(|e| ImageError::io(&target, e))?;
                }
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(ImageError::BadMetadata(format!(
                    "unexpected {other:?} entry {} in image archive",
                    p.display()
                )))
            }
        }
    }
    Ok(())
}

fn import_dir(
    store: &ImageStore,
    dir: &Path,
    name: Option<&str>,
    origin: &Path,
) -> Result<Vec<ImageRecord>> {
    if dir.join("index.json").is_file() && dir.join("oci-layout").is_file() {
        import_oci_layout(store, dir, name, origin)
    } else if dir.join("manifest.json").is_file() {
        import_docker_archive(store, dir, name)
    } else {
        Err(ImageError::BadMetadata(format!(
            "{}: neither an OCI layout (oci-layout, index.json) nor a docker archive (manifest.json)",
            origin.display()
        )))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    let bytes = fs::read(p).map_err(|e| ImageError::io(p, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ImageError::BadMetadata(format!("{}: {e}", p.display())))
}

/// Copy a blob from a layout into the store, verifying digest and size.
fn copy_blob(store: &ImageStore, src: &Path, digest: &str, size: Option<u64>) -> Result<()> {
    if store.has_blob(digest) {
        return Ok(());
    }
    let tmp = store
        .tmp_dir()
        .join(format!("{}.import", digest.trim_start_matches("sha256:")));
    fs::copy(src, &tmp).map_err(|e| ImageError::io(src, e))?;
    store.commit_blob_file(&tmp, digest, size)
}

fn layout_blob(dir: &Path, digest: &str) -> Result<PathBuf> {
    let (alg, hex) = digest
        .split_once(':')
        .ok_or_else(|| ImageError::BadMetadata(format!("bad digest {digest:?}")))?;
    if alg != "sha256" || hex.contains('/') || hex.contains("..") {
        return Err(ImageError::BadMetadata(format!("bad digest {digest:?}")));
    }
    Ok(dir.join("blobs").join(alg).join(hex))
}

/// Default name for an image whose archive gives only a tag (or nothing):
/// the file name, e.g. `busybox.tar` -> `busybox:<tag>`.
fn name_from(origin: &Path, tag: Option<&str>) -> String {
    let stem = origin
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let stem = stem
        .trim_end_matches(".tar")
        .trim_end_matches(".oci")
        .to_ascii_lowercase();
    format!("{stem}:{}", tag.unwrap_or("latest"))
}

fn import_oci_layout(
    store: &ImageStore,
    dir: &Path,
    name: Option<&str>,
    origin: &Path,
) -> Result<Vec<ImageRecord>> {
    let index: ImageIndex = read_json(&dir.join("index.json"))?;
    let single = index.manifests().len() == 1;
    let mut out = Vec::new();
    for top in index.manifests() {
        let ann = top.annotations().clone().unwrap_or_default();
        let given = match (name, ann.get(CONTAINERD_NAME), ann.get(REF_NAME)) {
            (Some(n), _, _) if single => n.to_string(),
            (_, Some(full), _) => full.clone(),
            (_, _, Some(r)) if r.contains(':') || r.contains('/') => r.clone(),
            (_, _, r) => name_from(origin, r.map(String::as_str)),
        };
        let name = normalize(&given)?;
        let mut desc = top.clone();
        if is_index_type(desc.media_type()) {
            let p = layout_blob(dir, desc.digest().as_ref())?;
            copy_blob(store, &p, desc.digest().as_ref(), Some(desc.size()))?;
            let nested: ImageIndex =
                serde_json::from_slice(&store.read_blob(desc.digest().as_ref())?)
                    .map_err(|e| ImageError::BadMetadata(format!("nested index: {e}")))?;
            let chosen = select_platform(&nested)?;
            desc = nested
                .manifests()
                .iter()
                .find(|m| m.digest().to_string() == chosen)
                .cloned()
                .ok_or_else(|| ImageError::BadMetadata("chosen manifest vanished".into()))?;
        }
        let mdigest = desc.digest().to_string();
        copy_blob(
            store,
            &layout_blob(dir, &mdigest)?,
            &mdigest,
            Some(desc.size()),
        )?;
        let manifest: ImageManifest = serde_json::from_slice(&store.read_blob(&mdigest)?)
            .map_err(|e| ImageError::BadMetadata(format!("manifest {mdigest}: {e}")))?;
        let cfg = manifest.config();
        copy_blob(
            store,
            &layout_blob(dir, cfg.digest().as_ref())?,
            cfg.digest().as_ref(),
            Some(cfg.size()),
        )?;
        if !super::is_image_config(cfg.media_type().as_ref()) {
            // A model or other artifact, preloaded as a pull would have it.
            for l in manifest.layers() {
                let d = l.digest().to_string();
                copy_blob(store, &layout_blob(dir, &d)?, &d, Some(l.size()))?;
            }
            out.push(store.finish_artifact(&mdigest, &manifest, &[name])?);
            continue;
        }
        import_layers(store, dir, &manifest, |d| layout_blob(dir, d))?;
        out.push(store.finish_image(&mdigest, &manifest, &[name])?);
    }
    Ok(out)
}

/// Copy layer blobs unless the layer is already unpacked in the store.
fn import_layers(
    store: &ImageStore,
    _dir: &Path,
    manifest: &ImageManifest,
    path_of: impl Fn(&str) -> Result<PathBuf>,
) -> Result<()> {
    let config: oci_spec::image::ImageConfiguration =
        serde_json::from_slice(&store.read_blob(manifest.config().digest().as_ref())?)
            .map_err(|e| ImageError::BadMetadata(format!("image config: {e}")))?;
    for (i, l) in manifest.layers().iter().enumerate() {
        if config
            .rootfs()
            .diff_ids()
            .get(i)
            .is_some_and(|d| store.has_layer(d))
        {
            continue;
        }
        copy_blob(
            store,
            &path_of(l.digest().as_ref())?,
            l.digest().as_ref(),
            Some(l.size()),
        )?;
    }
    Ok(())
}

fn is_index_type(m: &MediaType) -> bool {
    matches!(m, MediaType::ImageIndex) || m.to_string().contains("manifest.list")
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn file_digest(p: &Path) -> Result<(String, u64)> {
    use sha2::Digest as _;
    let mut f = fs::File::open(p).map_err(|e| ImageError::io(p, e))?;
    let mut h = sha2::Sha256::new();
    let n = io::copy(&mut f, &mut h).map_err(|e| ImageError::io(p, e))?;
    Ok((format!("sha256:{}", hex::encode(h.finalize())), n))
}

/// `docker save` output: manifest.json lists config and layer files by path.
/// The image gets an OCI manifest synthesised from them.
fn import_docker_archive(
    store: &ImageStore,
    dir: &Path,
    name: Option<&str>,
) -> Result<Vec<ImageRecord>> {
    let entries: Vec<DockerManifestEntry> = read_json(&dir.join("manifest.json"))?;
    let single = entries.len() == 1;
    let mut out = Vec::new();
    for e in entries {
        let member = |rel: &str| -> Result<PathBuf> {
            let r = layer::confined(Path::new(rel)).map_err(|r| ImageError::BadLayer {
                path: rel.into(),
                reason: r,
            })?;
            Ok(dir.join(r))
        };
        let cfg_path = member(&e.config)?;
        let (cfg_digest, cfg_size) = file_digest(&cfg_path)?;
        copy_blob(store, &cfg_path, &cfg_digest, Some(cfg_size))?;
        let mut layers: Vec<Descriptor> = Vec::new();
        let mut paths = std::collections::HashMap::new();
        for l in &e.layers {
            let p = member(l)?;
            let (d, size) = file_digest(&p)?;
            let mut head = [0u8; 4];
            let n = io::Read::read(
                &mut fs::File::open(&p).map_err(|e| ImageError::io(&p, e))?,
                &mut head,
            )
            .map_err(|e| ImageError::io(&p, e))?;
            let mt = match layer::Compression::detect("", &head[..n]) {
                layer::Compression::Gzip => MediaType::ImageLayerGzip,
                layer::Compression::Zstd => MediaType::ImageLayerZstd,
                layer::Compression::None => MediaType::ImageLayer,
            };
            layers.push(
                DescriptorBuilder::default()
                    .media_type(mt)
                    .digest(
                        d.parse::<oci_spec::image::Digest>()
                            .map_err(|e| ImageError::BadMetadata(e.to_string()))?,
                    )
                    .size(size)
                    .build()
                    .map_err(|e| ImageError::BadMetadata(e.to_string()))?,
            );
            paths.insert(d, p);
        }
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(
                DescriptorBuilder::default()
                    .media_type(MediaType::ImageConfig)
                    .digest(
                        cfg_digest
                            .parse::<oci_spec::image::Digest>()
                            .map_err(|e| ImageError::BadMetadata(e.to_string()))?,
                    )
                    .size(cfg_size)
                    .build()
                    .map_err(|e| ImageError::BadMetadata(e.to_string()))?,
            )
            .layers(layers)
            .build()
            .map_err(|e| ImageError::BadMetadata(e.to_string()))?;
        import_layers(store, dir, &manifest, |d| {
            paths
                .get(d)
                .cloned()
                .ok_or_else(|| ImageError::BadMetadata(format!("layer {d} missing")))
        })?;
        let bytes =
            serde_json::to_vec(&manifest).map_err(|e| ImageError::BadMetadata(e.to_string()))?;
        let mdigest = format!("sha256:{}", super::sha256_hex(&bytes));
        store.put_blob(&mdigest, &bytes)?;
        let mut names = Vec::new();
        match (name, e.repo_tags) {
            (Some(n), _) if single => names.push(normalize(n)?),
            (_, Some(tags)) => {
                for t in tags {
                    names.push(normalize(&t)?);
                }
            }
            _ => {}
        }
        out.push(store.finish_image(&mdigest, &manifest, &names)?);
    }
    Ok(out)
}
