//! A pod's volumes on the host, bind-mounted into its containers:
//! emptyDir (disk, or tmpfs with medium Memory), hostPath (with its type
//! checks), and configMap, secret, downwardAPI and projected volumes (with
//! service account tokens, as every pod's `kube-api-access-*` has).
//!
//! Volumes made from objects are written the way the kubelet's atomic
//! writer does: files live in a hidden `..<hash>` directory, `..data` points
//! at it, and each visible name is a symlink through `..data`. An update
//! writes a new directory and swaps `..data` with one rename, so a reader
//! inside the container sees the old set or the new one, never a mix.
//! Secret and projected volumes live on tmpfs, never on disk. A token the
//! node does not have (yet, or any more: offline past a refresh) leaves
//! the one already in the volume in place.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, KeyToPath, Pod, Volume};

use super::env::{field, resource, Placement};
use super::source::{config_map_data, secret_data, Objects};
use crate::runtime::spec::{bytes, BindMount};

/// Files of an object volume: relative path -> (content, mode).
type Files = BTreeMap<String, (Vec<u8>, u32)>;

fn safe_relative(p: &str) -> Result<(), String> {
    let path = Path::new(p);
    if p.is_empty()
        || path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "path {p:?} must be relative and must not contain '..'"
        ));
    }
    Ok(())
}

/// Keys (or the listed items) of an object as files.
fn project(
    data: BTreeMap<String, Vec<u8>>,
    items: &Option<Vec<KeyToPath>>,
    mode: u32,
    what: &str,
    files: &mut Files,
) -> Result<(), String> {
    match items {
        None => {
            for (k, v) in data {
                files.insert(k, (v, mode));
            }
        }
        Some(items) => {
            for it in items {
                safe_relative(&it.path)?;
                let v = data
                    .get(&it.key)
                    .ok_or_else(|| format!("configuration of {what}: no key {}", it.key))?;
                let m = it.mode.map(|m| m as u32).unwrap_or(mode);
                files.insert(it.path.clone(), (v.clone(), m));
            }
        }
    }
    Ok(())
}

fn downward(
    pod: &Pod,
    items: &[k8s_openapi::api::core::v1::DownwardAPIVolumeFile],
    containers: &[Container],
    mode: u32,
    at: &Placement,
    files: &mut Files,
) -> Result<(), String> {
    for it in items {
        safe_relative(&it.path)?;
        let m = it.mode.map(|m| m as u32).unwrap_or(mode);
        let text = if let Some(f) = &it.field_ref {
            match f.field_path.as_str() {
                // Whole maps: one `key="value"` per line, sorted.
                "metadata.labels" | "metadata.annotations" => {
                    let map = if f.field_path == "metadata.labels" {
                        &pod.metadata.labels
                    } else {
                        &pod.metadata.annotations
                    };
                    map.iter()
                        .flatten()
                        .map(|(k, v)| format!("{k}={v:?}\n"))
                        .collect::<String>()
                }
                p => field(pod, p, at)?,
            }
        } else if let Some(r) = &it.resource_field_ref {
            let name = r.container_name.clone().unwrap_or_default();
            let c = containers
                .iter()
                .find(|c| c.name == name)
                .ok_or_else(|| format!("resourceFieldRef: no container {name:?}"))?;
            resource(c, r, at)?
        } else {
            continue;
        };
        files.insert(it.path.clone(), (text.into_bytes(), m));
    }
    Ok(())
}

/// The files of an object-backed volume (its directory is `dir`); None for
/// other kinds.
fn object_files(
    v: &Volume,
    pod: &Pod,
    objects: &Objects,
    at: &Placement,
    dir: &Path,
) -> Result<Option<Files>, String> {
    let ns = super::namespace(pod);
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let mut files = Files::new();
    if let Some(cm) = &v.config_map {
        let mode = cm.default_mode.unwrap_or(0o644) as u32;
        match objects.config_map(ns, &cm.name) {
            Some(obj) => project(config_map_data(&obj), &cm.items, mode, &cm.name, &mut files)?,
            None if cm.optional.unwrap_or(false) => {}
            None => return Err(format!("configmap \"{}\" not found", cm.name)),
        }
    } else if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let mode = s.default_mode.unwrap_or(0o644) as u32;
        match objects.secret(ns, &name) {
            Some(obj) => project(secret_data(&obj), &s.items, mode, &name, &mut files)?,
            None if s.optional.unwrap_or(false) => {}
            None => return Err(format!("secret \"{name}\" not found")),
        }
    } else if let Some(d) = &v.downward_api {
        let mode = d.default_mode.unwrap_or(0o644) as u32;
        downward(
            pod,
            d.items.as_deref().unwrap_or_default(),
            &containers,
            mode,
            at,
            &mut files,
        )?;
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.unwrap_or(0o644) as u32;
        for src in p.sources.iter().flatten() {
            if let Some(cm) = &src.config_map {
                match objects.config_map(ns, &cm.name) {
                    Some(obj) => {
                        project(config_map_data(&obj), &cm.items, mode, &cm.name, &mut files)?
                    }
                    None if cm.optional.unwrap_or(false) => {}
                    None => return Err(format!("configmap \"{}\" not found", cm.name)),
                }
            } else if let Some(s) = &src.secret {
                match objects.secret(ns, &s.name) {
                    Some(obj) => project(secret_data(&obj), &s.items, mode, &s.name, &mut files)?,
                    None if s.optional.unwrap_or(false) => {}
                    None => return Err(format!("secret \"{}\" not found", s.name)),
                }
            } else if let Some(d) = &src.downward_api {
                downward(
                    pod,
                    d.items.as_deref().unwrap_or_default(),
                    &containers,
                    mode,
                    at,
                    &mut files,
                )?;
            } else if let Some(t) = &src.service_account_token {
                safe_relative(&t.path)?;
                let seconds = t
                    .expiration_seconds
                    .unwrap_or(outrigger_proto::kinds::DEFAULT_EXPIRATION_SECONDS);
                let audience = t.audience.as_deref().filter(|a| !a.is_empty());
                let token = match objects.token(ns, super::uid(pod), audience, seconds) {
                    Some(token) => token.into_bytes(),
                    None => fs::read(dir.join(&t.path)).map_err(|_| {
                        "no service account token for this pod yet: cloud-gw requests it from the cluster and sends it with the pod".to_string()
                    })?,
                };
                files.insert(t.path.clone(), (token, mode));
            } else {
                return Err("projected volume: a source of a kind not supported (configMap, secret, downwardAPI and serviceAccountToken are)".into());
            }
        }
    } else {
        return Ok(None);
    }
    Ok(Some(files))
}

/// Write `files` into `dir` atomically (see the module doc). Returns
/// whether anything changed.
pub fn write_atomic(dir: &Path, files: &Files) -> io::Result<bool> {
    let mut h = Vec::new();
    for (k, (v, m)) in files {
        h.extend_from_slice(k.as_bytes());
        h.push(0);
        h.extend_from_slice(&m.to_be_bytes());
        h.extend_from_slice(&(v.len() as u64).to_be_bytes());
        h.extend_from_slice(v);
    }
    let name = format!("..{}", &crate::image::sha256_hex(&h)[..16]);
    let data_link = dir.join("..data");
    let current = fs::read_link(&data_link).ok();
    if current.as_deref() == Some(Path::new(&name)) {
        return Ok(false);
    }
    fs::create_dir_all(dir)?;
    let staging = dir.join(format!("{name}.tmp"));
    let _ = fs::remove_dir_all(&staging);
    fs::create_dir_all(&staging)?;
    for (rel, (content, mode)) in files {
        let p = staging.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, content)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode & 0o7777))?;
    }
    fs::set_permissions(&staging, fs::Permissions::from_mode(0o755))?;
    let target = dir.join(&name);
    let _ = fs::remove_dir_all(&target);
    fs::rename(&staging, &target)?;
    let tmp_link = dir.join("..data_tmp");
    let _ = fs::remove_file(&tmp_link);
    std::os::unix::fs::symlink(&name, &tmp_link)?;
    fs::rename(&tmp_link, &data_link)?;
    // Visible names: one symlink per top-level entry, through ..data.
    let tops: std::collections::BTreeSet<String> = files
        .keys()
        .filter_map(|k| k.split('/').next().map(str::to_string))
        .collect();
    for t in &tops {
        let link = dir.join(t);
        if fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(Path::new("..data").join(t), &link)?;
        }
    }
    for e in fs::read_dir(dir)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("..") {
            if n != "..data" && n != name {
                let _ = fs::remove_dir_all(e.path());
            }
        } else if !tops.contains(&n) {
            let _ = fs::remove_file(e.path());
        }
    }
    Ok(true)
}

fn is_mountpoint(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(p), p.parent().map(fs::metadata)) {
        (Ok(a), Some(Ok(b))) => a.dev() != b.dev(),
        _ => false,
    }
}

fn tmpfs(dir: &Path, size: Option<i64>) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if is_mountpoint(dir) {
        return Ok(());
    }
    let mut opts = "mode=0755".to_string();
    if let Some(s) = size {
        opts.push_str(&format!(",size={s}"));
    }
    nix::mount::mount(
        Some("tmpfs"),
        dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .map_err(|e| format!("mounting tmpfs on {}: {e}", dir.display()))
}

fn host_path(path: &str, kind: Option<&str>) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(format!("hostPath {path:?} must be absolute"));
    }
    let meta = fs::metadata(&p);
    let fail = |want: &str| {
        Err(format!(
            "hostPath type check failed: {path} is not a {want}"
        ))
    };
    match kind.unwrap_or("") {
        "" => {}
        "DirectoryOrCreate" => {
            if meta.is_err() {
                fs::create_dir_all(&p).map_err(|e| format!("creating {path}: {e}"))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                    .map_err(|e| e.to_string())?;
            } else if !meta.as_ref().is_ok_and(|m| m.is_dir()) {
                return fail("directory");
            }
        }
        "Directory" => {
            if !meta.is_ok_and(|m| m.is_dir()) {
                return fail("directory");
            }
        }
        "FileOrCreate" => {
            if meta.is_err() {
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&p)
                    .map_err(|e| format!("creating {path}: {e}"))?;
            } else if !meta.as_ref().is_ok_and(|m| m.is_file()) {
                return fail("file");
            }
        }
        "File" => {
            if !meta.is_ok_and(|m| m.is_file()) {
                return fail("file");
            }
        }
        "Socket" => {
            if !meta.is_ok_and(|m| m.file_type().is_socket()) {
                return fail("socket");
            }
        }
        "CharDevice" => {
            if !meta.is_ok_and(|m| m.file_type().is_char_device()) {
                return fail("character device");
            }
        }
        "BlockDevice" => {
            if !meta.is_ok_and(|m| m.file_type().is_block_device()) {
                return fail("block device");
            }
        }
        other => return Err(format!("hostPath type {other:?} is not known")),
    }
    Ok(p)
}

/// A pod's volumes under `root` (one directory per pod).
pub struct PodVolumes {
    pub root: PathBuf,
    /// Volume name -> host path.
    paths: BTreeMap<String, PathBuf>,
    /// Image volumes: name -> the image or artifact and where its content is.
    images: BTreeMap<String, (crate::image::ImageRecord, PathBuf)>,
}

/// Where an image volume's content is on the host: an artifact's
/// directory, an image's only layer, or (several layers) a read-only
/// overlay of them mounted at `dir`, the pod's own mount point. Nothing is
/// copied: every pod naming the image shares the one unpacked copy.
fn image_content(
    images: &crate::image::ImageStore,
    rec: &crate::image::ImageRecord,
    dir: &Path,
) -> Result<PathBuf, String> {
    if rec.artifact.is_some() {
        return images.artifact_dir(&rec.digest).map_err(|e| e.to_string());
    }
    let layers = images.layer_dirs(rec).map_err(|e| e.to_string())?;
    match layers.as_slice() {
        [] => Err(format!("image {} has no layers", rec.digest)),
        [only] => Ok(only.clone()),
        many => {
            fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if !is_mountpoint(dir) {
                // Without an upper directory overlayfs is read-only: the
                // layers are never written through it.
                let lower: Vec<String> = many.iter().map(|p| p.display().to_string()).collect();
                let opts = format!("lowerdir={}", lower.join(":"));
                nix::mount::mount(
                    Some("overlay"),
                    dir,
                    Some("overlay"),
                    nix::mount::MsFlags::MS_RDONLY
                        | nix::mount::MsFlags::MS_NOSUID
                        | nix::mount::MsFlags::MS_NODEV,
                    Some(opts.as_str()),
                )
                .map_err(|e| format!("mounting image {} at {}: {e}", rec.digest, dir.display()))?;
            }
            Ok(dir.to_path_buf())
        }
    }
}

impl PodVolumes {
    pub fn new(root: PathBuf) -> PodVolumes {
        PodVolumes {
            root,
            paths: BTreeMap::new(),
            images: BTreeMap::new(),
        }
    }

    pub fn has_image(&self, volume: &str) -> bool {
        self.images.contains_key(volume)
    }

    /// An image volume's image, pulled: its content made ready to mount.
    pub fn set_image(
        &mut self,
        store: &crate::image::ImageStore,
        volume: &str,
        rec: crate::image::ImageRecord,
    ) -> Result<(), String> {
        let path = image_content(store, &rec, &self.root.join(volume))
            .map_err(|e| format!("image volume {volume}: {e}"))?;
        let _ = store.touch(&rec.digest);
        self.images.insert(volume.to_string(), (rec, path));
        Ok(())
    }

    /// The images a container's image volumes mount.
    pub fn images_of(&self, c: &Container) -> Vec<crate::image::ImageRecord> {
        c.volume_mounts
            .iter()
            .flatten()
            .filter_map(|m| self.images.get(&m.name).map(|(r, _)| r.clone()))
            .collect()
    }

    /// Make (or refresh) every volume of the pod. Object volumes are
    /// rewritten only when their content changed.
    pub fn sync(&mut self, pod: &Pod, objects: &Objects, at: &Placement) -> Result<(), String> {
        for v in pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
        {
            let dir = self.root.join(&v.name);
            let path = if let Some(e) = &v.empty_dir {
                let size = e
                    .size_limit
                    .as_ref()
                    .map(bytes)
                    .transpose()
                    .map_err(|e| e.to_string())?;
                if e.medium.as_deref() == Some("Memory") {
                    tmpfs(&dir, size)?;
                } else {
                    fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                    let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o777));
                }
                dir
            } else if let Some(h) = &v.host_path {
                host_path(&h.path, h.type_.as_deref())?
            } else if v.image.is_some() {
                match self.images.get(&v.name) {
                    Some((_, p)) => p.clone(),
                    None => return Err(format!("image volume {}: not pulled yet", v.name)),
                }
            } else {
                match object_files(v, pod, objects, at, &dir)
                    .map_err(|e| format!("volume {}: {e}", v.name))?
                {
                    Some(files) => {
                        if v.secret.is_some() || v.projected.is_some() {
                            tmpfs(&dir, None)?;
                        }
                        write_atomic(&dir, &files)
                            .map_err(|e| format!("volume {}: {e}", v.name))?;
                        dir
                    }
                    None => {
                        return Err(format!(
                            "volume {}: this kind of volume is not supported",
                            v.name
                        ))
                    }
                }
            };
            self.paths.insert(v.name.clone(), path);
        }
        Ok(())
    }

    /// The bind mounts of a container's volumeMounts.
    pub fn mounts(&self, pod: &Pod, c: &Container) -> Result<Vec<BindMount>, String> {
        let volumes: BTreeMap<&str, &Volume> = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
            .map(|v| (v.name.as_str(), v))
            .collect();
        let mut out = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let (Some(v), Some(src)) = (volumes.get(m.name.as_str()), self.paths.get(&m.name))
            else {
                return Err(format!("volumeMount {}: no volume of that name", m.name));
            };
            let mut source = src.clone();
            if let Some(sub) = m.sub_path.as_deref().filter(|s| !s.is_empty()) {
                safe_relative(sub).map_err(|e| format!("volumeMount {} subPath: {e}", m.name))?;
                source = source.join(sub);
                if !source.exists() && v.empty_dir.is_some() {
                    fs::create_dir_all(&source).map_err(|e| e.to_string())?;
                }
            }
            // Object and image volumes are read-only in containers, as in
            // Kubernetes.
            let from_object = v.config_map.is_some()
                || v.secret.is_some()
                || v.downward_api.is_some()
                || v.projected.is_some()
                || v.image.is_some();
            out.push(BindMount {
                source,
                destination: m.mount_path.clone(),
                read_only: m.read_only.unwrap_or(false) || from_object,
            });
        }
        Ok(out)
    }

    /// Disk emptyDirs with a sizeLimit, if the pod has any: they must be
    /// watched (the kubelet evicts a pod whose emptyDir outgrows its limit;
    /// tmpfs ones are held to it by the kernel).
    pub fn limited(pod: &Pod) -> Vec<(String, i64)> {
        pod.spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let e = v.empty_dir.as_ref()?;
                if e.medium.as_deref() == Some("Memory") {
                    return None;
                }
                Some((v.name.clone(), bytes(e.size_limit.as_ref()?).ok()?))
            })
            .collect()
    }

    /// The first disk emptyDir over its sizeLimit, as an eviction message.
    pub fn over_limit(&self, pod: &Pod) -> Option<String> {
        Self::limited(pod).into_iter().find_map(|(name, limit)| {
            let used = crate::image::dir_size(self.paths.get(&name)?).ok()?;
            (used as i64 > limit).then(|| {
                format!("Usage of EmptyDir volume \"{name}\" exceeds the limit of {limit} bytes ({used} used).")
            })
        })
    }

    /// Remove every volume of the pod (not hostPaths: they are the host's).
    pub fn remove(&self) {
        crate::runtime::unmount_under(&self.root);
        let _ = fs::remove_dir_all(&self.root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_swap_the_whole_set() {
        let d = tempfile::tempdir().unwrap();
        let mut f = Files::new();
        f.insert("a".into(), (b"1".to_vec(), 0o644));
        f.insert("dir/b".into(), (b"2".to_vec(), 0o600));
        assert!(write_atomic(d.path(), &f).unwrap());
        assert!(
            !write_atomic(d.path(), &f).unwrap(),
            "same content: no change"
        );
        assert_eq!(fs::read_to_string(d.path().join("a")).unwrap(), "1");
        assert_eq!(fs::read_to_string(d.path().join("dir/b")).unwrap(), "2");
        f.remove("a");
        f.insert("c".into(), (b"3".to_vec(), 0o644));
        assert!(write_atomic(d.path(), &f).unwrap());
        assert!(!d.path().join("a").exists());
        assert_eq!(fs::read_to_string(d.path().join("c")).unwrap(), "3");
        let hidden: Vec<_> = fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name().to_string_lossy().starts_with("..") && e.file_name() != "..data"
            })
            .collect();
        assert_eq!(hidden.len(), 1, "the old version is gone");
        assert!(safe_relative("../x").is_err() && safe_relative("/x").is_err());
    }

    /// A `kube-api-access-*` volume as the ServiceAccount admission plugin
    /// writes it, with the pod's token present, then gone (offline past a
    /// refresh): the token written stays.
    #[test]
    fn a_projected_token_is_written_and_kept_while_the_node_has_none() {
        use outrigger_proto::kinds::*;
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "uid": "u-1"},
            "spec": {"containers": [{"name": "c"}], "volumes": [{"name": "kube-api-access-x", "projected": {
                "defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}]}
        }))
        .unwrap();
        let token = |pod_uid: &str, seconds: i64, value: &str| ServiceAccountToken {
            api_version: ServiceAccountToken::API_VERSION.into(),
            kind: Kind::ServiceAccountToken.as_str().into(),
            metadata: TokenMeta {
                name: ServiceAccountToken::name_for("web", pod_uid, None, seconds),
                namespace: "shop".into(),
                uid: ServiceAccountToken::uid_for(pod_uid, None, seconds),
            },
            spec: TokenSpec {
                service_account_name: "default".into(),
                audience: None,
                expiration_seconds: seconds,
                pod_name: "web".into(),
                pod_uid: pod_uid.into(),
            },
            status: TokenStatus {
                token: value.into(),
                expiration_timestamp: "2026-12-02T02:00:00Z".into(),
            },
        };
        let objects = Objects::default();
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("kube-api-access-x");
        let v = &pod.spec.as_ref().unwrap().volumes.as_ref().unwrap()[0];
        let at = Placement::default();
        let files = |o: &Objects| object_files(v, &pod, o, &at, &dir);
        // None yet (nor one of another pod, or another lifetime): the pod waits.
        objects.replace(
            vec![],
            vec![],
            vec![token("u-2", 3607, "other"), token("u-1", 600, "short")],
        );
        assert!(files(&objects)
            .unwrap_err()
            .contains("no service account token"));
        objects.replace(vec![], vec![], vec![token("u-1", 3607, "jwt-1")]);
        let f = files(&objects).unwrap().unwrap();
        assert_eq!(f["token"], (b"jwt-1".to_vec(), 0o644));
        assert_eq!(f["namespace"].0, b"shop");
        write_atomic(&dir, &f).unwrap();
        // Gone from the node: the one in the volume stays.
        objects.replace(vec![], vec![], vec![]);
        assert_eq!(files(&objects).unwrap().unwrap()["token"].0, b"jwt-1");
    }
}
