//! Models as OCI artifacts in Kubernetes image volumes, on a standalone
//! node pulling from a real registry (Debian's docker-registry, TLS): an
//! artifact as ORAS pushes one (files by title, a directory unpacked) and
//! a layered image, mounted read-only into pods that share one unpacked
//! copy, kept through an offline reboot, refused when tampered with, and
//! removed once no pod needs them.

use std::time::Duration;

use anyhow::{Context, Result};
use outrigger_tests::fixtures::{self, ArtifactPart, Compression, Entry, ImageSpec, Layer};
use outrigger_tests::registry::Registry;
use outrigger_tests::util::*;

/// A pod whose container reads an image volume mounted at /models.
fn model_pod(name: &str, reference: &str, script: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: Never
    command: ["sh", "-c", {script:?}]
    volumeMounts: [{{name: model, mountPath: /models}}]
  volumes:
  - name: model
    image: {{reference: {reference}, pullPolicy: IfNotPresent}}
"#
    )
}

fn artifacts_on(node: &Node) -> usize {
    std::fs::read_dir(node.dir.path().join("data/images/artifacts/sha256"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

const READ: &str = "sha256sum /models/model.bin; cat /models/labels/labels.txt; \
                    touch /models/x 2>&1; echo done; sleep 3600";

#[tokio::test]
async fn a_model_in_an_image_volume_is_shared_read_only_kept_offline_and_collected() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let reg = Registry::start(None)?;
    // The model: one file by title, as `oras push ... model.bin` makes it,
    // and a directory, as `oras push ... labels/` makes it.
    let weights: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let layout = tempfile::tempdir()?;
    fixtures::add_artifact_to_layout(
        layout.path(),
        "v1",
        "application/vnd.example.model.v1",
        &[
            ArtifactPart::File("model.bin", &weights),
            ArtifactPart::Dir("labels", &[("labels.txt", b"cat\ndog\n")]),
        ],
    )?;
    let model = reg.push(layout.path(), "v1", "models/tiny")?;
    // An image of two layers, the second removing a file of the first:
    // mounted as their overlay.
    let image_layout = tempfile::tempdir()?;
    let two = ImageSpec {
        layers: vec![
            Layer {
                entries: vec![
                    Entry::Dir("data".into(), 0o755),
                    Entry::File("data/keep.txt".into(), b"kept\n".to_vec(), 0o644),
                    Entry::File("data/gone.txt".into(), b"gone\n".to_vec(), 0o644),
                ],
                compression: Compression::Gzip,
            },
            Layer {
                entries: vec![
                    Entry::Whiteout("data/gone.txt".into()),
                    Entry::File("data/new.txt".into(), b"new\n".to_vec(), 0o644),
                ],
                compression: Compression::Gzip,
            },
        ],
        ..ImageSpec::busybox()?
    };
    fixtures::add_to_layout(image_layout.path(), "v1", &two)?;
    let data_image = reg.push(image_layout.path(), "v1", "data/layered")?;

    let node = Node::new()?;
    // The CA outlives the registry (the node reboots without it).
    let ca = node.dir.path().join("registry-ca.pem");
    std::fs::copy(&reg.ca_pem, &ca)?;
    node.trust_registry(&ca)?;
    let daemon = node.start().await?;
    let sum = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&weights));

    // Two pods naming the model: one pull, one copy on disk, both read it,
    // neither can write it.
    for p in ["infer-a", "infer-b"] {
        std::fs::write(
            node.manifests.join(format!("{p}.yaml")),
            model_pod(p, &model, READ),
        )?;
    }
    for p in ["infer-a", "infer-b"] {
        let l = node.wait_log(p, "done").await?;
        assert!(l.contains(&sum), "the model's bytes: {l}");
        assert!(l.contains("cat\ndog"), "the unpacked directory: {l}");
        assert!(l.contains("Read-only file system"), "{l}");
    }
    assert_eq!(artifacts_on(&node), 1, "one unpacked copy");
    let list = text(&node.cli(&["images", "list"])?);
    assert!(
        list.lines()
            .any(|l| l.contains("models/tiny") && l.ends_with("artifact")),
        "{list}"
    );
    let pulls = node
        .daemon_log()
        .lines()
        .filter(|l| l.contains(" pulled ") && l.contains("artifact=true"))
        .count();
    assert_eq!(pulls, 1, "one pull:\n{}", node.daemon_log());
    // Pulled and Pulling events, as for container images.
    let d = text(&node.cli(&["describe", "pod", "infer-a"])?);
    let d2 = text(&node.cli(&["describe", "pod", "infer-b"])?);
    assert!(
        (d + &d2).contains(&format!("Successfully pulled image \"{model}\"")),
        "events"
    );

    // The layered image as a volume: its layers' overlay, read-only.
    std::fs::write(
        node.manifests.join("layered.yaml"),
        model_pod(
            "layered",
            &data_image,
            "ls /models/data; cat /models/data/keep.txt; echo done; sleep 3600",
        ),
    )?;
    let l = node.wait_log("layered", "done").await?;
    assert!(
        l.contains("keep.txt") && l.contains("new.txt") && !l.contains("gone.txt"),
        "{l}"
    );

    // The image store refuses to drop what pods mount.
    let rm = node.cli(&["images", "rm", &model])?;
    assert!(!rm.status.success(), "removed while mounted");

    // An offline reboot: the registry gone, every container gone; the pods
    // come back with their model from the node's store.
    drop(daemon);
    drop(reg);
    node.cleanup().await?;
    let daemon = node.start().await?;
    let l = node.wait_log("infer-a", "done").await?;
    assert!(l.contains(&sum), "{l}");

    // No pod needs it any more: removed, files and all.
    for p in ["infer-a", "infer-b"] {
        std::fs::remove_file(node.manifests.join(format!("{p}.yaml")))?;
    }
    wait_for("the pods gone", Duration::from_secs(30), || async {
        (!node
            .records()
            .iter()
            .any(|r| r.pod.name.starts_with("infer")))
        .then_some(())
    })
    .await?;
    // GC down to nothing: the model goes, files and all; the layered
    // image, which the running `layered` pod mounts, stays.
    let gc = node.cli(&["images", "gc", "--budget", "0"])?;
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    assert_eq!(artifacts_on(&node), 0, "{}", text(&gc));
    let left = text(&node.cli(&["images", "list"])?);
    assert!(
        left.contains("data/layered") && !left.contains("models/tiny"),
        "{left}"
    );

    drop(daemon);
    node.cleanup().await?;
    Ok(())
}

#[tokio::test]
async fn a_tampered_model_is_refused_and_an_interrupted_pull_resumes() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let reg = Registry::start(None)?;
    let weights: Vec<u8> = (0..2_000_000u32).map(|i| (i % 253) as u8).collect();
    let layout = tempfile::tempdir()?;
    let md = fixtures::add_artifact_to_layout(
        layout.path(),
        "v1",
        "application/vnd.example.model.v1",
        &[ArtifactPart::File("model.bin", &weights)],
    )?;
    let model = reg.push(layout.path(), "v1", "models/big")?;
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(
        layout
            .path()
            .join("blobs/sha256")
            .join(md.trim_start_matches("sha256:")),
    )?)?;
    let blob = manifest["layers"][0]["digest"]
        .as_str()
        .context("layer digest")?
        .to_string();
    let hex = blob.trim_start_matches("sha256:").to_string();

    let node = Node::new()?;
    node.trust_registry(&reg.ca_pem)?;
    // A pull cut half-way left this (edge-rt's partial download).
    let tmp = node.dir.path().join("data/images/tmp");
    std::fs::create_dir_all(&tmp)?;
    std::fs::write(
        tmp.join(format!("{hex}.partial")),
        &weights[..weights.len() / 2],
    )?;
    let daemon = node.start().await?;
    std::fs::write(
        node.manifests.join("resumed.yaml"),
        model_pod(
            "resumed",
            &model,
            "sha256sum /models/model.bin; echo done; sleep 3600",
        ),
    )?;
    let sum = format!("{:x}", <sha2::Sha256 as sha2::Digest>::digest(&weights));
    let l = node.wait_log("resumed", "done").await?;
    assert!(l.contains(&sum), "{l}");
    assert!(
        node.daemon_log().contains("resuming download"),
        "{}",
        node.daemon_log()
    );

    // The same model with one byte changed in the registry's storage: the
    // pull fails its digest check and the pod waits, with nothing mounted.
    let layout2 = tempfile::tempdir()?;
    let mut other = weights.clone();
    other[0] ^= 1;
    let md2 = fixtures::add_artifact_to_layout(
        layout2.path(),
        "v1",
        "application/vnd.example.model.v1",
        &[ArtifactPart::File("model.bin", &other)],
    )?;
    let model2 = reg.push(layout2.path(), "v1", "models/tampered")?;
    let m2: serde_json::Value = serde_json::from_slice(&std::fs::read(
        layout2
            .path()
            .join("blobs/sha256")
            .join(md2.trim_start_matches("sha256:")),
    )?)?;
    let b2 = m2["layers"][0]["digest"].as_str().context("digest")?;
    let h2 = b2.trim_start_matches("sha256:");
    let stored = reg
        .data_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&h2[..2])
        .join(h2)
        .join("data");
    let mut bytes = std::fs::read(&stored)?;
    bytes[1000] ^= 0xff;
    std::fs::write(&stored, bytes)?;
    std::fs::write(
        node.manifests.join("tampered.yaml"),
        model_pod("tampered", &model2, "echo ran; sleep 3600"),
    )?;
    let p = wait_pod(&node, "tampered", "the tampered pull refused", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .and_then(|s| s.waiting.as_ref())
            .is_some_and(|w| w.message.as_deref().is_some_and(|m| m.contains("digest")))
    })
    .await?;
    assert_eq!(phase(&p), "Pending");
    assert!(!node.pod_logs("tampered").contains("ran"));

    drop(daemon);
    node.cleanup().await?;
    Ok(())
}
