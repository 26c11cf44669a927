//! Fixture images, built here from the host's static busybox (Debian's
//! `busybox-static`): OCI layouts and archives with whatever layers a test
//! needs, including whiteouts, opaque directories and hostile entries.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};

pub const BUSYBOX: &str = "/bin/busybox";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// One entry of a layer.
#[derive(Clone, Debug)]
pub enum Entry {
    Dir(String, u32),
    File(String, Vec<u8>, u32),
    Symlink(String, String),
    Hardlink(String, String),
    /// A whiteout for a path of a lower layer.
    Whiteout(String),
    /// Mark a directory opaque: lower layers' contents are hidden.
    Opaque(String),
    /// A character device (must be refused).
    CharDevice(String),
    /// A regular file whose name is written raw, `..` and all (must be refused).
    RawFile(String, Vec<u8>),
}

#[derive(Clone, Debug)]
pub struct Layer {
    pub entries: Vec<Entry>,
    pub compression: Compression,
}

#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub layers: Vec<Layer>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub user: Option<String>,
    pub working_dir: Option<String>,
    pub architecture: String,
}

impl ImageSpec {
    /// A one-layer busybox image running `sh`.
    pub fn busybox() -> Result<ImageSpec> {
        Self::busybox_for(Path::new(BUSYBOX), host_arch())
    }

    /// The same for another architecture: `binary` is a static busybox
    /// built for `arch` (an OCI architecture name, e.g. `arm64`), such as
    /// the one in Debian's `busybox-static:arm64` package.
    pub fn busybox_for(binary: &Path, arch: &str) -> Result<ImageSpec> {
        Ok(ImageSpec {
            layers: vec![busybox_layer_from(binary)?],
            entrypoint: vec![],
            cmd: vec!["sh".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            user: None,
            working_dir: None,
            architecture: arch.into(),
        })
    }
}

pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => other,
    }
}

/// The busybox root filesystem: the binary, a link per applet, /etc files.
pub fn busybox_layer() -> Result<Layer> {
    busybox_layer_from(Path::new(BUSYBOX))
}

/// A busybox layer around `binary`; the applet list comes from the host's
/// busybox (the same Debian package for another architecture has the same
/// applets, and its binary may not run here).
pub fn busybox_layer_from(binary: &Path) -> Result<Layer> {
    if !Path::new(BUSYBOX).exists() {
        bail!("{BUSYBOX} not found: install Debian's busybox-static");
    }
    let binary_bytes =
        fs::read(binary).with_context(|| format!("reading busybox {}", binary.display()))?;
    let out = Command::new(BUSYBOX)
        .arg("--list-full")
        .output()
        .context("busybox --list-full")?;
    let mut entries = vec![
        Entry::Dir("bin".into(), 0o755),
        Entry::Dir("sbin".into(), 0o755),
        Entry::Dir("usr".into(), 0o755),
        Entry::Dir("usr/bin".into(), 0o755),
        Entry::Dir("usr/sbin".into(), 0o755),
        Entry::Dir("etc".into(), 0o755),
        Entry::Dir("tmp".into(), 0o1777),
        Entry::Dir("root".into(), 0o700),
        Entry::Dir("home".into(), 0o755),
        Entry::Dir("proc".into(), 0o755),
        Entry::Dir("sys".into(), 0o755),
        Entry::Dir("dev".into(), 0o755),
        Entry::File("bin/busybox".into(), binary_bytes, 0o755),
        Entry::File(
            "etc/passwd".into(),
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n".to_vec(),
            0o644,
        ),
        Entry::File("etc/group".into(), b"root:x:0:\napp:x:1000:\nnogroup:x:65534:\n".to_vec(), 0o644),
    ];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let p = line.trim().trim_start_matches('/');
        if p.is_empty() || p == "bin/busybox" {
            continue;
        }
        entries.push(Entry::Symlink(p.to_string(), "/bin/busybox".into()));
    }
    Ok(Layer {
        entries,
        compression: Compression::Gzip,
    })
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h
}

/// The uncompressed tar of a layer.
pub fn layer_tar(layer: &Layer) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for e in &layer.entries {
        match e {
            Entry::Dir(p, mode) => {
                let mut h = header(tar::EntryType::Directory, *mode, 0);
                b.append_data(&mut h, format!("{p}/"), std::io::empty())?;
            }
            Entry::File(p, data, mode) => {
                let mut h = header(tar::EntryType::Regular, *mode, data.len() as u64);
                b.append_data(&mut h, p, data.as_slice())?;
            }
            Entry::Symlink(p, target) => {
                let mut h = header(tar::EntryType::Symlink, 0o777, 0);
                b.append_link(&mut h, p, target)?;
            }
            Entry::Hardlink(p, target) => {
                let mut h = header(tar::EntryType::Link, 0o644, 0);
                b.append_link(&mut h, p, target)?;
            }
            Entry::Whiteout(p) => {
                let path = Path::new(p);
                let name = format!(
                    ".wh.{}",
                    path.file_name().context("whiteout name")?.to_string_lossy()
                );
                let full = path
                    .parent()
                    .map(|d| d.join(&name))
                    .unwrap_or_else(|| PathBuf::from(&name));
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, full, std::io::empty())?;
            }
            Entry::Opaque(dir) => {
                let mut h = header(tar::EntryType::Regular, 0o644, 0);
                b.append_data(&mut h, format!("{dir}/.wh..wh..opq"), std::io::empty())?;
            }
            Entry::CharDevice(p) => {
                let mut h = header(tar::EntryType::Char, 0o666, 0);
                h.set_device_major(1)?;
                h.set_device_minor(3)?;
                b.append_data(&mut h, p, std::io::empty())?;
            }
            Entry::RawFile(p, data) => {
                // tar's own path setter refuses "..": write the name bytes directly.
                let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
                let name = &mut h.as_old_mut().name;
                let bytes = p.as_bytes();
                if bytes.len() > name.len() {
                    bail!("raw name too long");
                }
                name[..bytes.len()].copy_from_slice(bytes);
                h.set_cksum();
                b.append(&h, data.as_slice())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

fn sha(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

fn put_blob(dir: &Path, data: &[u8]) -> Result<String> {
    let d = sha(data);
    let p = dir
        .join("blobs/sha256")
        .join(d.trim_start_matches("sha256:"));
    fs::create_dir_all(p.parent().context("blob dir")?)?;
    fs::write(p, data)?;
    Ok(d)
}

fn compress(data: &[u8], c: Compression) -> Result<(Vec<u8>, &'static str)> {
    Ok(match c {
        Compression::None => (data.to_vec(), "application/vnd.oci.image.layer.v1.tar"),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(data)?;
            (e.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
        }
        Compression::Zstd => {
            let out = Command::new("zstd")
                .args(["-q", "-c", "-"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .and_then(|mut ch| {
                    ch.stdin.take().map(|mut i| i.write_all(data)).transpose()?;
                    ch.wait_with_output()
                })
                .context("running zstd (Debian's zstd package)")?;
            (out.stdout, "application/vnd.oci.image.layer.v1.tar+zstd")
        }
    })
}

/// Write `spec` into the OCI layout `dir` (created if needed), tagged `tag`.
/// Returns the manifest digest.
pub fn add_to_layout(dir: &Path, tag: &str, spec: &ImageSpec) -> Result<String> {
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for l in &spec.layers {
        let tar = layer_tar(l)?;
        diff_ids.push(sha(&tar));
        let (blob, mt) = compress(&tar, l.compression)?;
        let d = put_blob(dir, &blob)?;
        layers.push(json!({"mediaType": mt, "digest": d, "size": blob.len()}));
    }
    let mut config = json!({
        "architecture": spec.architecture, "os": "linux",
        "config": {"Env": spec.env, "Cmd": spec.cmd},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    if !spec.entrypoint.is_empty() {
        config["config"]["Entrypoint"] = json!(spec.entrypoint);
    }
    if let Some(u) = &spec.user {
        config["config"]["User"] = json!(u);
    }
    if let Some(w) = &spec.working_dir {
        config["config"]["WorkingDir"] = json!(w);
    }
    let config = serde_json::to_vec(&config)?;
    let cd = put_blob(dir, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": layers,
    }))?;
    let md = put_blob(dir, &manifest)?;
    tag_manifest(dir, tag, &md, manifest.len())?;
    Ok(md)
}

/// Point `tag` of the layout's index at a manifest.
fn tag_manifest(dir: &Path, tag: &str, digest: &str, size: usize) -> Result<()> {
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| json!({"schemaVersion": 2, "manifests": []}));
    let entry = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": digest, "size": size,
        "annotations": {"org.opencontainers.image.ref.name": tag},
    });
    if let Some(list) = index["manifests"].as_array_mut() {
        list.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != tag);
        list.push(entry);
    }
    fs::write(index_path, serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

/// A layer of an OCI artifact, as ORAS pushes them.
pub enum ArtifactPart<'a> {
    /// One file: its bytes as the blob, its name in the title annotation
    /// (ORAS's default media type for files says tar; it is not one).
    File(&'a str, &'a [u8]),
    /// One file copied from disk (large models) by streaming.
    FileFrom(&'a str, &'a Path),
    /// A directory of files, tarred and gzipped, with ORAS's annotation
    /// asking for it to be unpacked (its entries under the directory name).
    Dir(&'a str, &'a [(&'a str, &'a [u8])]),
}

/// Write an OCI artifact (an image manifest with `artifactType` and the
/// empty config, as ORAS 1.x pushes one) into the layout `dir`, tagged
/// `tag`. Returns the manifest digest.
pub fn add_artifact_to_layout(
    dir: &Path,
    tag: &str,
    artifact_type: &str,
    parts: &[ArtifactPart],
) -> Result<String> {
    fs::create_dir_all(dir.join("blobs/sha256"))?;
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    let mut layers = Vec::new();
    for p in parts {
        layers.push(match p {
            ArtifactPart::File(name, bytes) => {
                let d = put_blob(dir, bytes)?;
                json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": bytes.len(),
                       "annotations": {"org.opencontainers.image.title": name}})
            }
            ArtifactPart::FileFrom(name, path) => {
                let mut h = Sha256::new();
                let mut f = fs::File::open(path)?;
                let mut buf = vec![0u8; 1 << 20];
                let mut size = 0u64;
                loop {
                    let n = std::io::Read::read(&mut f, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    size += n as u64;
                }
                let d = format!("sha256:{}", hex::encode(h.finalize()));
                let dest = dir.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
                if fs::hard_link(path, &dest).is_err() {
                    fs::copy(path, &dest)?;
                }
                json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": size,
                       "annotations": {"org.opencontainers.image.title": name}})
            }
            ArtifactPart::Dir(name, files) => {
                let mut b = tar::Builder::new(Vec::new());
                for (f, bytes) in *files {
                    let mut hdr = tar::Header::new_gnu();
                    hdr.set_size(bytes.len() as u64);
                    hdr.set_mode(0o644);
                    hdr.set_uid(0);
                    hdr.set_gid(0);
                    hdr.set_mtime(0);
                    hdr.set_cksum();
                    b.append_data(&mut hdr, format!("{name}/{f}"), *bytes)?;
                }
                let tar = b.into_inner()?;
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                std::io::Write::write_all(&mut gz, &tar)?;
                let blob = gz.finish()?;
                let d = put_blob(dir, &blob)?;
                json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": blob.len(),
                       "annotations": {"org.opencontainers.image.title": name, "io.deis.oras.content.unpack": "true"}})
            }
        });
    }
    let config = b"{}";
    let cd = put_blob(dir, config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": artifact_type,
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": cd, "size": config.len()},
        "layers": layers,
    }))?;
    let md = put_blob(dir, &manifest)?;
    tag_manifest(dir, tag, &md, manifest.len())?;
    Ok(md)
}

/// Write a multi-platform image: one manifest per spec (its architecture
/// goes in the index), under one index tagged `tag`. Returns the index digest.
pub fn add_index_to_layout(dir: &Path, tag: &str, specs: &[ImageSpec]) -> Result<String> {
    let mut manifests = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let d = add_to_layout(dir, &format!("{tag}-platform-{i}"), spec)?;
        let size = fs::metadata(
            dir.join("blobs/sha256")
                .join(d.trim_start_matches("sha256:")),
        )?
        .len();
        manifests.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": d, "size": size,
            "platform": {"architecture": spec.architecture, "os": "linux"},
        }));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))?;
    let d = put_blob(dir, &index)?;
    let index_path = dir.join("index.json");
    let mut top: serde_json::Value = serde_json::from_slice(&fs::read(&index_path)?)?;
    if let Some(list) = top["manifests"].as_array_mut() {
        list.retain(|m| {
            !m["annotations"]["org.opencontainers.image.ref.name"]
                .as_str()
                .is_some_and(|t| t.starts_with(tag))
        });
        list.push(json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": d, "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }));
    }
    fs::write(index_path, serde_json::to_vec_pretty(&top)?)?;
    Ok(d)
}

/// Tar up a layout directory as an OCI archive.
pub fn archive(layout: &Path, out: &Path) -> Result<()> {
    let f = fs::File::create(out)?;
    let mut b = tar::Builder::new(f);
    b.append_dir_all(".", layout)?;
    b.finish()?;
    Ok(())
}

/// Push tag `tag` of a layout to `dest` (`host:port/repo:tag`) with skopeo.
pub fn push(
    layout: &Path,
    tag: &str,
    dest: &str,
    creds: Option<(&str, &str)>,
    ca_dir: Option<&Path>,
) -> Result<()> {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--all", "--preserve-digests"]);
    match ca_dir {
        Some(d) => {
            cmd.arg("--dest-cert-dir").arg(d);
        }
        None => {
            cmd.arg("--dest-tls-verify=false");
        }
    }
    if let Some((u, p)) = creds {
        cmd.arg("--dest-creds").arg(format!("{u}:{p}"));
    }
    cmd.arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{dest}"));
    let out = cmd.output().context("running skopeo")?;
    if !out.status.success() {
        bail!(
            "skopeo copy to {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
