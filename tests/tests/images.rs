//! Images against a real registry (Debian's docker-registry over TLS with a
//! test CA; anonymous, basic auth and bearer tokens), and imports of real
//! archives.

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use base64::Engine as _;
use edge_rt::image::registry::{self, Credentials, Progress, PullPolicy, Puller, RegistryConfig};
use edge_rt::image::rootfs::RootfsMode;
use edge_rt::image::{archive, auth, ImageError, ImageStore, InUse};
use outrigger_tests::fixtures::{self, Compression, Entry, ImageSpec, Layer};
use outrigger_tests::registry::{Auth, Registry};
use outrigger_tests::util::*;

fn puller(reg: &Registry) -> Result<Puller> {
    Ok(Puller::new(&RegistryConfig {
        ca_bundle: Some(reg.ca_pem.clone()),
        ..Default::default()
    })?)
}

/// Anonymous and wrong-password pulls are refused as Unauthorized and leave
/// nothing in the store.
async fn refuses_anonymous_and_wrong_password(p: &Puller, env: &Env, image: &str) -> Result<()> {
    let anon = p
        .pull(&env.store, image, None, &Progress::default())
        .await
        .unwrap_err();
    assert!(
        matches!(anon, ImageError::Unauthorized { .. }),
        "anonymous: {anon}"
    );
    let wrong = Credentials {
        username: "edge".into(),
        password: "wrong".into(),
    };
    let err = p
        .pull(&env.store, image, Some(&wrong), &Progress::default())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ImageError::Unauthorized { .. }),
        "wrong password: {err}"
    );
    assert!(env.store.list()?.is_empty());
    Ok(())
}

fn busybox_layout() -> Result<tempfile::TempDir> {
    let d = tempfile::tempdir()?;
    fixtures::add_to_layout(d.path(), "v1", &ImageSpec::busybox()?)?;
    Ok(d)
}

#[tokio::test]
async fn pull_over_tls_by_tag_and_by_digest_then_run() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let reg = Registry::start(None)?;
    let layout = busybox_layout()?;
    let image = reg.push(layout.path(), "v1", "demo/busybox")?;
    let env = Env::new()?;
    let p = puller(&reg)?;
    let progress = Progress::default();
    let rec = p.pull(&env.store, &image, None, &progress).await?;
    let (done, total) = progress.snapshot();
    assert!(
        total > 1_000_000 && done == total,
        "progress {done}/{total}"
    );
    assert_eq!(rec.names, vec![edge_rt::image::normalize(&image)?]);

    let by_digest = format!("{}/demo/busybox@{}", reg.addr, rec.digest);
    let again = p
        .pull(&env.store, &by_digest, None, &Progress::default())
        .await?;
    assert_eq!(again.digest, rec.digest);
    assert_eq!(env.store.list()?.len(), 1, "one image, two names");

    // Without the CA the registry's certificate is not trusted.
    let untrusting = Puller::new(&RegistryConfig::default())?;
    let err = untrusting
        .pull(&env.store, &image, None, &Progress::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ImageError::Unreachable { .. } | ImageError::Registry { .. }
        ),
        "{err}"
    );
    assert!(
        format!("{err}").to_lowercase().contains("certificate")
            || format!("{err}").to_lowercase().contains("issuer"),
        "{err}"
    );

    let rt = env.runtime()?;
    let mut c = sh("main", "echo pulled-and-ran");
    c.image = Some(image.clone());
    let (_, exit, lines) = run_to_exit(&rt, request(&pod("pulled"), &rec, c)).await?;
    assert_eq!(exit.exit_code, 0);
    assert!(lines.iter().any(|(_, l)| l == "pulled-and-ran"));
    teardown(&rt).await;
    Ok(())
}

#[tokio::test]
async fn basic_auth_and_docker_config_secret() -> Result<()> {
    let reg = Registry::start(Some(("edge", "s3cret")))?;
    let layout = busybox_layout()?;
    let image = reg.push(layout.path(), "v1", "private/busybox")?;
    let env = Env::new()?;
    let p = puller(&reg)?;

    refuses_anonymous_and_wrong_password(&p, &env, &image).await?;

    // A kubernetes.io/dockerconfigjson secret's data, as a pod would reference it.
    let b64 = base64::engine::general_purpose::STANDARD.encode("edge:s3cret");
    let secret = serde_json::json!({"auths": {(format!("https://{}", reg.addr)): {"auth": b64}}})
        .to_string();
    let creds =
        auth::credentials_for(secret.as_bytes(), &reg.addr)?.expect("credentials for the registry");
    let rec = p
        .pull(&env.store, &image, Some(&creds), &Progress::default())
        .await?;
    assert_eq!(
        env.store.resolve(&image)?.map(|r| r.digest),
        Some(rec.digest)
    );
    Ok(())
}

/// Bearer-token auth, the flow of Docker Hub, GHCR and Harbor: the registry
/// sends the client to a token realm, which checks its credentials.
#[tokio::test]
async fn bearer_token_auth() -> Result<()> {
    let reg = Registry::start_with(Auth::Token("edge", "t0ken"))?;
    let layout = busybox_layout()?;
    let image = reg.push(layout.path(), "v1", "private/busybox")?;
    let env = Env::new()?;
    let p = puller(&reg)?;
    let issued = &reg.token_server.as_ref().expect("token server").issued;

    refuses_anonymous_and_wrong_password(&p, &env, &image).await?;

    let before = issued.load(Ordering::Relaxed);
    let right = Credentials {
        username: "edge".into(),
        password: "t0ken".into(),
    };
    let rec = p
        .pull(&env.store, &image, Some(&right), &Progress::default())
        .await?;
    assert!(
        issued.load(Ordering::Relaxed) > before,
        "the pull went through the token server"
    );
    assert_eq!(
        env.store.resolve(&image)?.map(|r| r.digest),
        Some(rec.digest)
    );
    Ok(())
}

#[tokio::test]
async fn pull_failures_are_distinct_and_clear() -> Result<()> {
    let reg = Registry::start(None)?;
    let layout = busybox_layout()?;
    let image = reg.push(layout.path(), "v1", "demo/busybox")?;
    let env = Env::new()?;
    let p = puller(&reg)?;

    let missing = p
        .pull(
            &env.store,
            &format!("{}/demo/nothing:v1", reg.addr),
            None,
            &Progress::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(missing, ImageError::NotFound { .. }), "{missing}");

    let zeros = format!("{}/demo/busybox@sha256:{}", reg.addr, "0".repeat(64));
    let wrong_digest = p
        .pull(&env.store, &zeros, None, &Progress::default())
        .await
        .unwrap_err();
    assert!(
        matches!(wrong_digest, ImageError::DigestNotFound { .. }),
        "{wrong_digest}"
    );

    let port = outrigger_tests::registry::free_port()?;
    let down = p
        .pull(
            &env.store,
            &format!("127.0.0.1:{port}/demo/busybox:v1"),
            None,
            &Progress::default(),
        )
        .await
        .unwrap_err();
    assert!(matches!(down, ImageError::Unreachable { .. }), "{down}");

    let messages = [
        missing.to_string(),
        wrong_digest.to_string(),
        down.to_string(),
    ];
    assert!(
        messages[0].contains("not found")
            && messages[1].contains("digest")
            && messages[2].contains("unreachable"),
        "{messages:?}"
    );

    // Pull policies.
    let never = registry::ensure(
        &env.store,
        &p,
        &image,
        PullPolicy::Never,
        None,
        &Progress::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(never, ImageError::NeverPull(_)), "{never}");
    registry::ensure(
        &env.store,
        &p,
        &image,
        PullPolicy::IfNotPresent,
        None,
        &Progress::default(),
    )
    .await?;
    drop(reg);
    // Present: IfNotPresent and Never need no registry; Always does.
    registry::ensure(
        &env.store,
        &p,
        &image,
        PullPolicy::IfNotPresent,
        None,
        &Progress::default(),
    )
    .await?;
    registry::ensure(
        &env.store,
        &p,
        &image,
        PullPolicy::Never,
        None,
        &Progress::default(),
    )
    .await?;
    let always = registry::ensure(
        &env.store,
        &p,
        &image,
        PullPolicy::Always,
        None,
        &Progress::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(always, ImageError::Unreachable { .. }), "{always}");
    Ok(())
}

/// Registry storage of distribution: blobs/sha256/<2>/<hex>/data.
fn registry_blob(root: &Path, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    root.join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data")
}

/// Digest of the first layer of the first image in an OCI layout.
fn first_layer_digest(layout: &Path) -> Result<String> {
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let mdigest = index["manifests"][0]["digest"].as_str().unwrap_or_default();
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(
        layout
            .join("blobs/sha256")
            .join(mdigest.trim_start_matches("sha256:")),
    )?)?;
    Ok(manifest["layers"][0]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

#[tokio::test]
async fn tampered_blob_is_refused_and_nothing_half_done_remains() -> Result<()> {
    let reg = Registry::start(None)?;
    let layout = busybox_layout()?;
    let image = reg.push(layout.path(), "v1", "demo/busybox")?;
    // Corrupt the layer as the registry stores it (same size, other bytes).
    let layer = first_layer_digest(layout.path())?;
    let path = registry_blob(&reg.data_dir(), &layer);
    let mut bytes = fs::read(&path)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::write(&path, &bytes)?;

    let env = Env::new()?;
    let err = puller(&reg)?
        .pull(&env.store, &image, None, &Progress::default())
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(env.store.list()?.is_empty(), "no image may look complete");
    assert!(!env.store.has_blob(&layer));
    Ok(())
}

#[tokio::test]
async fn interrupted_pull_resumes_or_restarts() -> Result<()> {
    let reg = Registry::start(None)?;
    let layout = busybox_layout()?;
    let image = reg.push(layout.path(), "v1", "demo/busybox")?;
    let layer = first_layer_digest(layout.path())?;
    let blob = fs::read(
        layout
            .path()
            .join("blobs/sha256")
            .join(layer.trim_start_matches("sha256:")),
    )?;

    // What a pull killed half-way leaves: a partial download. It is not an image.
    let env = Env::new()?;
    let partial = env
        .store
        .tmp_dir()
        .join(format!("{}.partial", layer.trim_start_matches("sha256:")));
    fs::write(&partial, &blob[..blob.len() / 2])?;
    assert!(env.store.list()?.is_empty());
    let rec = puller(&reg)?
        .pull(&env.store, &image, None, &Progress::default())
        .await?;
    assert_eq!(rec.layers.len(), 1);
    assert!(!partial.exists());

    // A partial file with wrong bytes: the resumed blob fails its digest and
    // the download restarts from zero.
    let env2 = Env::new()?;
    let partial2 = env2
        .store
        .tmp_dir()
        .join(format!("{}.partial", layer.trim_start_matches("sha256:")));
    fs::write(&partial2, vec![0u8; blob.len() / 2])?;
    let rec2 = puller(&reg)?
        .pull(&env2.store, &image, None, &Progress::default())
        .await?;
    assert_eq!(rec2.digest, rec.digest);
    Ok(())
}

#[tokio::test]
async fn multi_arch_index_resolves_to_the_running_architecture() -> Result<()> {
    let reg = Registry::start(None)?;
    let d = tempfile::tempdir()?;
    let mut specs = Vec::new();
    for arch in ["arm64", "amd64", "riscv64"] {
        let mut s = ImageSpec::busybox()?;
        s.architecture = arch.into();
        s.layers.push(Layer {
            entries: vec![Entry::File("arch".into(), arch.as_bytes().to_vec(), 0o644)],
            compression: Compression::Gzip,
        });
        specs.push(s);
    }
    fixtures::add_index_to_layout(d.path(), "multi", &specs)?;
    let image = reg.push(d.path(), "multi", "demo/multi")?;
    let env = Env::new()?;
    let rec = puller(&reg)?
        .pull(&env.store, &image, None, &Progress::default())
        .await?;
    let cfg = env.store.config(&rec)?;
    assert_eq!(cfg.architecture().to_string(), fixtures::host_arch());
    let top = env.store.layer_dir(&rec.layers[1].diff_id)?;
    assert_eq!(fs::read_to_string(top.join("arch"))?, fixtures::host_arch());
    Ok(())
}

fn whiteout_image() -> Result<ImageSpec> {
    let mut s = ImageSpec::busybox()?;
    s.layers.push(Layer {
        entries: vec![
            Entry::Dir("data".into(), 0o755),
            Entry::File("data/a".into(), b"a".to_vec(), 0o644),
            Entry::File("data/b".into(), b"b".to_vec(), 0o644),
            Entry::Dir("keep".into(), 0o755),
            Entry::File("keep/x".into(), b"x".to_vec(), 0o644),
            Entry::File("keep/y".into(), b"y".to_vec(), 0o644),
            Entry::File("gone".into(), b"gone".to_vec(), 0o644),
        ],
        compression: Compression::Gzip,
    });
    s.layers.push(Layer {
        entries: vec![
            Entry::Whiteout("gone".into()),
            Entry::Whiteout("keep/y".into()),
            Entry::Opaque("data".into()),
            Entry::File("data/c".into(), b"c".to_vec(), 0o644),
            Entry::Hardlink("keep/x-link".into(), "keep/x".into()),
        ],
        compression: Compression::Zstd,
    });
    Ok(s)
}

#[tokio::test]
async fn whiteouts_and_opaque_directories_with_overlay_and_with_copies() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Built here, pushed with skopeo, pulled by edge-rt.
    let reg = Registry::start(None)?;
    let d = tempfile::tempdir()?;
    fixtures::add_to_layout(d.path(), "wh", &whiteout_image()?)?;
    let image = reg.push(d.path(), "wh", "demo/whiteouts")?;
    for mode in [RootfsMode::Overlay, RootfsMode::Copy] {
        let mut env = Env::new()?;
        env.cfg.rootfs = mode;
        let img = puller(&reg)?
            .pull(&env.store, &image, None, &Progress::default())
            .await?;
        assert_eq!(img.layers.len(), 3);
        let rt = env.runtime()?;
        let script = "ls /data | tr '\\n' ' '; echo; ls /keep | tr '\\n' ' '; echo; test -e /gone && echo gone-present || echo gone-absent; cat /keep/x-link";
        let (_, exit, lines) =
            run_to_exit(&rt, request(&pod("wh"), &img, sh("wh", script))).await?;
        assert_eq!(exit.exit_code, 0, "{mode:?} {lines:?}");
        let out: Vec<&str> = lines.iter().map(|(_, l)| l.trim()).collect();
        assert_eq!(out, vec!["c", "x x-link", "gone-absent", "x"], "{mode:?}");
        teardown(&rt).await;
    }
    Ok(())
}

fn try_import(layers: Vec<Entry>) -> Result<(ImageError, Env)> {
    let mut s = ImageSpec::busybox()?;
    s.layers.push(Layer {
        entries: layers,
        compression: Compression::None,
    });
    let d = tempfile::tempdir()?;
    fixtures::add_to_layout(d.path(), "evil", &s)?;
    let env = Env::new()?;
    let err = archive::import(&env.store, d.path(), Some("evil:latest")).unwrap_err();
    assert!(
        env.store.list()?.is_empty(),
        "a refused image is not in the store"
    );
    Ok((err, env))
}

#[tokio::test]
async fn hostile_layers_are_refused_and_nothing_lands_outside() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let outside = tempfile::tempdir()?;
    let victim = outside.path().join("pwned");
    let o = outside.path().display().to_string();
    let depth = "../".repeat(16);
    let cases: Vec<(&str, Vec<Entry>)> = vec![
        (
            "path escape",
            vec![Entry::RawFile(
                format!("{depth}{}/pwned", o.trim_start_matches('/')),
                b"x".to_vec(),
            )],
        ),
        (
            "write through an absolute symlink",
            vec![
                Entry::Symlink("evil".into(), o.clone()),
                Entry::File("evil/pwned".into(), b"x".to_vec(), 0o644),
            ],
        ),
        (
            "relative symlink escape",
            vec![Entry::Symlink("up".into(), format!("{depth}tmp"))],
        ),
        (
            "hard link escape",
            vec![Entry::Hardlink("h".into(), format!("{depth}etc/passwd"))],
        ),
        ("device node", vec![Entry::CharDevice("dev/mem2".into())]),
    ];
    for (what, entries) in cases {
        let (err, _env) = try_import(entries)?;
        assert!(matches!(err, ImageError::BadLayer { .. }), "{what}: {err}");
        assert!(!victim.exists(), "{what}: wrote outside the root");
    }
    Ok(())
}

#[tokio::test]
async fn imports_oci_archive_layout_and_docker_archive() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let layout = busybox_layout()?;
    let env = Env::new()?;
    // OCI layout directory: named after the given name.
    let a = archive::import(&env.store, layout.path(), Some("site/base:1.0"))?;
    assert_eq!(a[0].names, vec!["docker.io/site/base:1.0".to_string()]);
    // OCI archive: tag from the index, name from the file.
    let tar = env.dir.path().join("gateway-base.tar");
    fixtures::archive(layout.path(), &tar)?;
    let b = archive::import(&env.store, &tar, None)?;
    assert!(
        b[0].names
            .contains(&"docker.io/library/gateway-base:v1".to_string()),
        "{:?}",
        b[0].names
    );
    assert_eq!(a[0].digest, b[0].digest);
    // docker save format, written by skopeo.
    let docker_tar = env.dir.path().join("docker.tar");
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:v1", layout.path().display()))
        .arg(format!(
            "docker-archive:{}:legacy/app:2",
            docker_tar.display()
        ))
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c = archive::import(&env.store, &docker_tar, None)?;
    assert_eq!(c[0].names, vec!["docker.io/legacy/app:2".to_string()]);
    assert_eq!(c[0].layers, a[0].layers, "same layers, shared in the store");
    // Shared layers are stored once.
    let layer_dirs = fs::read_dir(env.store.root().join("layers/sha256"))?
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
        .count();
    assert_eq!(layer_dirs, 1);
    // And it runs.
    let rt = env.runtime()?;
    let (_, exit, _) = run_to_exit(&rt, request(&pod("imported"), &c[0], sh("c", "true"))).await?;
    assert_eq!(exit.exit_code, 0);
    teardown(&rt).await;
    Ok(())
}

#[tokio::test]
async fn gc_keeps_the_budget_and_spares_images_in_use() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let env = Env::new()?;
    let busybox = busybox_image(&env.store)?;
    // Three more images, each a busybox base plus 3 MB of its own.
    let mut extra = Vec::new();
    for i in 0..3 {
        let mut s = ImageSpec::busybox()?;
        let blob: Vec<u8> = (0..3_000_000u32)
            .map(|x| (x.wrapping_mul(2654435761).wrapping_add(i) >> 13) as u8)
            .collect();
        s.layers.push(Layer {
            entries: vec![Entry::File(format!("blob{i}"), blob, 0o644)],
            compression: Compression::Gzip,
        });
        let d = tempfile::tempdir()?;
        fixtures::add_to_layout(d.path(), "v1", &s)?;
        extra.push(archive::import(&env.store, d.path(), Some(&format!("extra{i}:v1")))?.remove(0));
        std::thread::sleep(Duration::from_millis(1100)); // distinct last_used seconds
    }
    let rt = env.runtime()?;
    // extra0 (the least recently used) is in use by a running container.
    let mut c = sh("user", "sleep 60");
    c.image = Some("extra0:v1".into());
    let running = rt.run(request(&pod("gc"), &extra[0], c))?;
    let in_use: InUse = rt.in_use();

    let before = env.store.disk_usage()?;
    let budget = before - 4_000_000;
    let report = env.store.gc(budget, &in_use)?;
    assert!(report.bytes_after <= budget, "{report:?}");
    let left: Vec<String> = env
        .store
        .list()?
        .iter()
        .flat_map(|r| r.names.clone())
        .collect();
    assert!(
        left.contains(&"docker.io/library/extra0:v1".to_string()),
        "in use: kept ({left:?})"
    );
    assert!(!report.images_removed.is_empty());
    // The in-use image cannot be removed by hand either.
    assert!(matches!(
        env.store.remove("extra0:v1", &in_use),
        Err(ImageError::InUse(_))
    ));
    // A budget of zero removes everything not in use, and the running
    // container's layers stay.
    env.store.gc(0, &rt.in_use())?;
    let left: Vec<String> = env
        .store
        .list()?
        .iter()
        .flat_map(|r| r.names.clone())
        .collect();
    assert_eq!(left, vec!["docker.io/library/extra0:v1".to_string()]);
    for l in &extra[0].layers {
        assert!(env.store.has_layer(&l.diff_id));
    }
    let _ = busybox;
    rt.stop(&running.id, Duration::from_secs(2)).await?;
    teardown(&rt).await;
    env.store.gc(0, &rt.in_use())?;
    assert!(env.store.list()?.is_empty());
    Ok(())
}

#[test]
fn store_paths_refuse_bad_digests() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = ImageStore::open(d.path()).expect("store");
    assert!(s.blob_path("sha256:../../etc").is_err());
    assert!(s.blob_path("md5:abc").is_err());
}
