//! model-bench: a model as an OCI artifact, from a local registry (Debian's
//! docker-registry over TLS) to ready to mount, beside `skopeo copy` of
//! the same artifact to a local directory; then what a second pod naming
//! the model pays to mount it.
//!
//! - pull: `edge-rt images pull` into an empty image store (download,
//!   digest check, files laid out where pods mount them) against `skopeo
//!   copy docker://... dir:...` (download and digest check), alternating,
//!   `--runs` times each; medians;
//! - mount: a standalone edge-rt with the model in its store starts a pod
//!   whose volume is the model, and the same pod without it: manifest
//!   written to container started, medians over `--pods` pods each; the
//!   difference is the mount.
//!
//! As root, after `cargo build --release -p edge-rt -p outrigger-tests`:
//!   target/release/model-bench [--size-mib 1024] [--runs 3] [--pods 20]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::Parser;
use outrigger_tests::fixtures::{add_artifact_to_layout, ArtifactPart};
use outrigger_tests::registry::Registry;
use outrigger_tests::util::{edge_rt_bin, Node};

#[derive(Parser)]
struct Args {
    /// The model's size.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Pods started for the mount figure (each way).
    #[arg(long, default_value_t = 20)]
    pods: usize,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Incompressible bytes (xorshift), written once.
fn make_model(path: &Path, mib: u64) -> Result<()> {
    use std::io::Write;
    if std::fs::metadata(path).is_ok_and(|m| m.len() == mib << 20) {
        return Ok(());
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        f.write_all(&buf)?;
    }
    f.flush()?;
    Ok(())
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let t0 = Instant::now();
    let out = cmd.output()?;
    if !out.status.success() {
        bail!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(t0.elapsed().as_secs_f64())
}

fn pod(name: &str, model: Option<&str>) -> String {
    let volume = match model {
        Some(m) => format!(
            "    volumeMounts: [{{name: model, mountPath: /models}}]\n  volumes:\n  - name: model\n    image: {{reference: {m}, pullPolicy: IfNotPresent}}\n"
        ),
        None => String::new(),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: busybox:latest\n    imagePullPolicy: Never\n    command: [\"sleep\", \"3600\"]\n{volume}"
    )
}

/// Manifest written (renamed in) to the container's recorded start, ms.
async fn start_ms(node: &Node, name: &str, yaml: &str) -> Result<f64> {
    let tmp = node.dir.path().join(format!("{name}.tmp"));
    std::fs::write(&tmp, yaml)?;
    let t0 = jiff::Timestamp::now();
    std::fs::rename(&tmp, node.manifests.join(format!("{name}.yaml")))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = node
            .records()
            .into_iter()
            .find(|r| r.pod.name == name)
            .and_then(|r| r.started_at)
        {
            let s: jiff::Timestamp = s.parse()?;
            return Ok(s.duration_since(t0).as_secs_f64() * 1000.0);
        }
        if Instant::now() > deadline {
            bail!("{name} did not start:\n{}", node.daemon_log());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let reg = Registry::start(None)?;
    let work = Path::new("/var/tmp/model-bench");
    std::fs::create_dir_all(work)?;
    let model = work.join(format!("model-{}m.bin", args.size_mib));
    make_model(&model, args.size_mib)?;
    let layout = tempfile::tempdir_in(work)?;
    add_artifact_to_layout(
        layout.path(),
        "v1",
        "application/vnd.example.model.v1",
        &[ArtifactPart::FileFrom("model.bin", &model)],
    )?;
    let reference = reg.push(layout.path(), "v1", "models/big")?;
    eprintln!("pushed {reference} ({} MiB)", args.size_mib);

    let mut skopeo = Vec::new();
    let mut edge = Vec::new();
    for run in 0..args.runs {
        let dest = work.join("skopeo-dir");
        let _ = std::fs::remove_dir_all(&dest);
        skopeo.push(timed(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--src-cert-dir"])
                .arg(&reg.ca_dir)
                .arg(format!("docker://{reference}"))
                .arg(format!("dir:{}", dest.display())),
        )?);
        let _ = std::fs::remove_dir_all(&dest);
        let store = work.join("edge-store");
        let _ = std::fs::remove_dir_all(&store);
        std::fs::create_dir_all(&store)?;
        let cfg = store.join("config.toml");
        std::fs::write(
            &cfg,
            format!(
                "[node]\ndata_dir = {:?}\n[registry]\nca_bundle = {:?}\n",
                store.join("data"),
                reg.ca_pem
            ),
        )?;
        edge.push(timed(
            Command::new(edge_rt_bin())
                .arg("--config")
                .arg(&cfg)
                .args(["images", "pull", &reference]),
        )?);
        let laid = store.join("data/images/artifacts/sha256");
        let n = std::fs::read_dir(&laid).map(|r| r.count()).unwrap_or(0);
        if n != 1 {
            bail!("run {run}: the model is not laid out in {}", laid.display());
        }
        let _ = std::fs::remove_dir_all(&store);
        eprintln!(
            "run {run}: skopeo {:.2} s, edge-rt {:.2} s",
            skopeo[run], edge[run]
        );
    }

    // A second pod's mount: the model in the node's store already.
    let node = Node::new()?;
    node.trust_registry(&reg.ca_pem)?;
    let daemon = node.start().await?;
    start_ms(&node, "first", &pod("first", Some(&reference))).await?;
    let mut with = Vec::new();
    let mut without = Vec::new();
    for i in 0..args.pods {
        with.push(
            start_ms(
                &node,
                &format!("m{i}"),
                &pod(&format!("m{i}"), Some(&reference)),
            )
            .await?,
        );
        without.push(start_ms(&node, &format!("p{i}"), &pod(&format!("p{i}"), None)).await?);
    }
    drop(daemon);
    node.cleanup().await?;

    let (s, e) = (median(&mut skopeo), median(&mut edge));
    println!(
        "model of {} MiB (OCI artifact, one file) from a local TLS registry, median of {}",
        args.size_mib, args.runs
    );
    println!("{:<52} {:>10}", "what", "value");
    println!(
        "{:<52} {:>8.2} s",
        "skopeo copy docker:// dir: (baseline)", s
    );
    println!(
        "{:<52} {:>8.2} s",
        "edge-rt images pull (verified, laid out)", e
    );
    println!("{:<52} {:>8.2} x   (bar: 1.5 x)", "edge-rt / skopeo", e / s);
    let (w, wo) = (median(&mut with), median(&mut without));
    println!(
        "{:<52} {:>8.1} ms",
        format!("pod start with the model mounted (median of {})", args.pods),
        w
    );
    println!("{:<52} {:>8.1} ms", "the same pod without it", wo);
    println!(
        "{:<52} {:>8.1} ms   (bar: 50 ms)",
        "a second pod's mount of the model",
        w - wo
    );
    drop(reg);
    Ok(())
}
