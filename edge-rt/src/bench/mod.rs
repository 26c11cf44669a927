//! `edge-rt bench`: measurements behind the README's figures.
//!
//! `bench start` runs, interleaved on the same busybox bundle, edge-rt's
//! in-process create/start (libcontainer in this process) and `runc run`
//! (and `crun run` where it works), and prints median and p95 of
//! create-to-running and create-to-exit. `bench rss` starts `edge-rt run`
//! with 20 containers and reports its resident memory. `bench store`
//! measures durable object updates per second, batched against one
//! transaction per update; `bench reboot` cuts power (as far as a process
//! can) under a node with N stored pods and times its way back; `bench
//! broker` ([`broker`]) loads the embedded MQTT broker and mosquitto alike.

mod broker;
mod services;

use std::fs;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use k8s_openapi::api::core::v1::Container;

use crate::config::Config;
use crate::image::rootfs::{self, RootfsMode};
use crate::image::ImageStore;
use crate::runtime::spec::{self, SharedNamespaces, SpecInput};
use crate::runtime::{init, spawn};

#[derive(clap::Subcommand)]
pub enum BenchCmd {
    /// Container start latency: in-process libcontainer vs runc (and crun).
    Start {
        /// Image with /bin/true and /bin/sleep (busybox).
        #[arg(long, default_value = "busybox:latest")]
        image: String,
        #[arg(long, default_value_t = 50)]
        runs: usize,
        /// Scratch directory for bundles and state.
        #[arg(long, default_value = "/tmp/edge-rt-bench")]
        dir: PathBuf,
    },
    /// edge-rt's resident memory idle and with N running pods, and its CPU
    /// while they idle.
    Rss {
        #[arg(long, default_value = "busybox:latest")]
        image: String,
        #[arg(long, default_value_t = 20, alias = "pods")]
        containers: usize,
        /// How long to measure CPU use while the pods idle.
        #[arg(long, default_value_t = 30)]
        idle_secs: u64,
        #[arg(long, default_value = "/tmp/edge-rt-bench-rss")]
        dir: PathBuf,
    },
    /// Durable object updates per second (synchronous=FULL): batched
    /// transactions against one transaction per update.
    Store {
        #[arg(long, default_value_t = 20000)]
        updates: usize,
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// Where the scratch store goes: put it on the device under test.
        #[arg(long, default_value = "/var/tmp/edge-rt-bench-store")]
        dir: PathBuf,
    },
    /// The embedded MQTT broker beside mosquitto: QoS 1 throughput from
    /// N publishers to M subscribers, and each broker's memory.
    Broker {
        #[arg(long, default_value_t = 10)]
        publishers: usize,
        #[arg(long, default_value_t = 10)]
        subscribers: usize,
        /// Messages per publisher.
        #[arg(long, default_value_t = 2000)]
        messages: usize,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        /// Messages out at once (published, not yet delivered to every
        /// subscriber): the load waits rather than overrun a subscriber.
        #[arg(long, default_value_t = 100)]
        window: usize,
    },
    /// What accelerator detection and allocation add to edge-rt's memory:
    /// a node with N stand-in GPUs (device nodes made with mknod) and a
    /// vendor CDI spec for each, N pods holding one each, beside the same
    /// pods on a node with detection off.
    Accelerators {
        #[arg(long, default_value = "busybox:latest")]
        image: String,
        #[arg(long, default_value_t = 16)]
        gpus: usize,
        /// Rounds, the two nodes alternating; medians are printed.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "/var/tmp/edge-rt-bench-accel")]
        dir: PathBuf,
    },
    /// The node's DNS server beside dnsmasq (queries per second and
    /// latency for Service names), and what N Services add to edge-rt's
    /// memory.
    Dns {
        #[arg(long, default_value_t = 1000)]
        services: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value_t = 5)]
        secs: u64,
        /// Memory rounds (with and without the Services, alternating).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "/var/tmp/edge-rt-bench-dns")]
        dir: PathBuf,
    },
    /// A request from a pod on one gateway to a pod on another of its site,
    /// at the pod's address and through a ClusterIP (edge-rt's rules),
    /// in network namespaces.
    ClusterIp {
        #[arg(long, default_value_t = 500)]
        requests: usize,
        #[arg(long, default_value_t = 6)]
        rounds: usize,
        /// Other Services in the rules, ahead of the one measured.
        #[arg(long, default_value_t = 999)]
        others: usize,
    },
    /// Reboot with no cloud: N pods in the store, a power cut (edge-rt and
    /// every container killed, state and mounts gone), then edge-rt start
    /// to all N running; the same N pods as static manifests alongside.
    Reboot {
        #[arg(long, default_value = "busybox:latest")]
        image: String,
        #[arg(long, default_value_t = 20)]
        pods: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        #[arg(long, default_value = "/var/tmp/edge-rt-bench-reboot")]
        dir: PathBuf,
    },
}

pub async fn run(cfg: &Config, cmd: BenchCmd) -> Result<()> {
    match cmd {
        BenchCmd::Start { image, runs, dir } => {
            let run_p50 = start(cfg, &image, runs, &dir)?;
            // The whole path: a manifest appears, the daemon runs its pod.
            for (network, label) in [
                (true, "manifest to running, pod network"),
                (false, "manifest to running, loopback"),
            ] {
                let mut v =
                    manifest_latency(cfg, &image, runs, &dir.with_extension("node"), network)
                        .await?;
                let p50 = percentile(&mut v, 0.5);
                println!(
                    "{:<22} {:>12.1} {:>12.1}   ({label}: median {:+.1} ms over the bare start)",
                    "edge-rt run + manifest",
                    p50,
                    percentile(&mut v, 0.95),
                    p50 - run_p50
                );
            }
            Ok(())
        }
        BenchCmd::Rss {
            image,
            containers,
            idle_secs,
            dir,
        } => rss(cfg, &image, containers, idle_secs, &dir).await,
        BenchCmd::Accelerators {
            image,
            gpus,
            runs,
            dir,
        } => accelerators(cfg, &image, gpus, runs, &dir).await,
        BenchCmd::Dns {
            services: n,
            clients,
            secs,
            runs,
            dir,
        } => services::run(cfg, n, clients, secs, runs, &dir).await,
        BenchCmd::ClusterIp {
            requests,
            rounds,
            others,
        } => crate::sys::blocking(move || services::cluster_ip(requests, rounds, others)).await?,
        BenchCmd::Store {
            updates,
            batch,
            dir,
        } => store_writes(updates, batch, &dir),
        BenchCmd::Reboot {
            image,
            pods,
            runs,
            dir,
        } => reboot(cfg, &image, pods, runs, &dir).await,
        BenchCmd::Broker {
            publishers,
            subscribers,
            messages,
            payload_bytes,
            window,
        } => {
            broker::run(broker::Load {
                publishers,
                subscribers,
                messages,
                payload_bytes,
                window,
            })
            .await
        }
    }
}

/// Object updates committed per second, `batch` per transaction and one
/// per transaction, on a scratch store in `dir`.
fn store_writes(updates: usize, batch: usize, dir: &Path) -> Result<()> {
    use crate::store::{churn, Change, Store, StoreConfig};
    let run = |per_tx: usize, n: usize| -> Result<f64> {
        let _ = fs::remove_dir_all(dir);
        let store = Store::open(&StoreConfig::default(), dir)?;
        let t0 = Instant::now();
        let mut rv = 1u64;
        while (rv as usize) <= n {
            let changes: Vec<Change> = (0..per_tx)
                .map(|k| {
                    let i = (rv + k as u64) % churn::POOL;
                    Change::Put(churn::object(i, rv + k as u64, 800))
                })
                .collect();
            store.apply(&changes, &[])?;
            rv += per_tx as u64;
        }
        Ok((rv - 1) as f64 / t0.elapsed().as_secs_f64())
    };
    let batched = run(batch.max(1), updates)?;
    // One fsync per update: fewer updates, or it takes minutes.
    let single = run(1, (updates / 20).max(100))?;
    let _ = fs::remove_dir_all(dir);
    println!("durable object updates (~1 KB objects, a third of them sealed Secrets; WAL, synchronous=FULL) in {}", dir.display());
    println!(
        "{:<40} {:>12} {:>14}",
        "writer", "updates/s", "us per update"
    );
    for (label, rate) in [
        (format!("batched, {batch} per transaction"), batched),
        ("baseline: one transaction per update".to_string(), single),
    ] {
        println!("{label:<40} {rate:>12.0} {:>14.1}", 1e6 / rate);
    }
    Ok(())
}

/// From spawn to all N pods' containers started (the last start time).
async fn time_to_running(node: &BenchNode, n: usize, t0: jiff::Timestamp) -> Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = node.running();
        if running.len() >= n {
            let last = running
                .iter()
                .filter_map(|r| r.started_at.as_deref())
                .filter_map(|s| s.parse::<jiff::Timestamp>().ok())
                .max()
                .context("no start times")?;
            return Ok(last.duration_since(t0).as_secs_f64());
        }
        if Instant::now() > deadline {
            bail!("only {} of {n} pods running after 120 s", running.len());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn reboot(cfg: &Config, image: &str, n: usize, runs: usize, dir: &Path) -> Result<()> {
    let yaml: String = (0..n)
        .map(|i| format!("---\n{}", pod_yaml(&format!("boot-{i}"), image)))
        .collect();
    let mut rows = Vec::new();
    for from_store in [true, false] {
        let mut node = BenchNode::start(cfg, dir, true).await?;
        if from_store {
            let objects: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&yaml)
                .map(|d| serde::Deserialize::deserialize(d).map_err(anyhow::Error::from))
                .collect::<Result<_>>()?;
            crate::api::call(&node.socket(), &crate::api::Request::Apply { objects }).await?;
        } else {
            fs::write(node.manifests.join("pods.yaml"), &yaml)?;
        }
        time_to_running(&node, n, jiff::Timestamp::now()).await?;
        let mut times = Vec::new();
        for _ in 0..runs {
            node.power_cut().await;
            let t0 = jiff::Timestamp::now();
            node.spawn()?;
            times.push(time_to_running(&node, n, t0).await?);
        }
        node.finish(cfg).await?;
        rows.push((from_store, times));
    }
    println!("reboot with no cloud: edge-rt start to all {n} pods running (pod network; images present), {runs} power cuts");
    println!("{:<40} {:>10} {:>10}", "pods from", "median s", "max s");
    for (from_store, mut t) in rows {
        let label = if from_store {
            "the node store (edge-rt apply)"
        } else {
            "baseline: static manifests"
        };
        let max = t.iter().cloned().fold(0.0, f64::max);
        println!(
            "{label:<40} {:>10.2} {:>10.2}",
            percentile(&mut t, 0.5),
            max
        );
    }
    Ok(())
}

/// The `p` quantile (0..=1) of `v` (sorted here), nearest rank.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[idx]
}

/// Write a bundle whose config runs `args` on the shared root filesystem.
/// A bundle as edge-rt writes it (`for_edge`: its init makes the
/// container-local mounts, see `spec::SpecInput::mounts_by_init`), or in the
/// standard form any OCI runtime can run (for runc: the same container, with
/// every mount in config.json).
struct Bundle {
    dir: PathBuf,
    init: init::PodInit,
}

fn bundle(
    dir: &Path,
    rootfs: &Path,
    image: &oci_spec::image::ImageConfiguration,
    args: &[&str],
    cgroup: &str,
    namespaces: &SharedNamespaces,
    for_edge: bool,
) -> Result<Bundle> {
    let c = Container {
        name: "bench".into(),
        command: Some(args.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    };
    let g = spec::generate(&SpecInput {
        container: &c,
        pod_security: None,
        image,
        rootfs,
        extra_env: &[],
        mounts: &[],
        namespaces,
        host_network: false,
        hostname: "bench",
        cgroups_path: cgroup,
        cgroup_v2: crate::runtime::cgroups::is_unified(),
        mounts_by_init: for_edge,
        pids_limit: None,
        annotations: Default::default(),
    })?;
    fs::create_dir_all(dir)?;
    fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&g.spec)?)?;
    Ok(Bundle {
        dir: dir.to_path_buf(),
        // No seccomp in either bundle: runc would need libseccomp's to match.
        init: init::PodInit {
            exit_fd: -1,
            seccomp: None,
            drop_sys_admin: g.init_sys_admin,
            cgroup_view: g.cgroup_view,
            mounts: g.init_mounts,
        },
    })
}

fn devnull() -> Result<OwnedFd> {
    Ok(OwnedFd::from(
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")?,
    ))
}

/// In-process: create + start through libcontainer; returns (to running, to exit).
fn edge_once(
    id: &str,
    state: &Path,
    bundle: &Bundle,
    wait_exit: bool,
) -> Result<(f64, Option<f64>)> {
    let exit = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(state.join(format!("{id}.exit")))?;
    let t0 = Instant::now();
    let mut c = spawn(
        id,
        state,
        &bundle.dir,
        init::PodInit {
            exit_fd: std::os::fd::AsRawFd::as_raw_fd(&exit),
            ..bundle.init.clone()
        },
        devnull()?,
        devnull()?,
        devnull()?,
    )?;
    c.start().map_err(|e| anyhow::anyhow!("start: {e}"))?;
    let running = t0.elapsed().as_secs_f64() * 1e3;
    let pid = c.pid().context("no pid")?;
    if !wait_exit {
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    let _ = nix::sys::wait::waitpid(pid, None);
    let exited = t0.elapsed().as_secs_f64() * 1e3;
    let _ = c.delete(true);
    let _ = fs::remove_file(state.join(format!("{id}.exit")));
    Ok((running, wait_exit.then_some(exited)))
}

/// An OCI CLI runtime (runc, crun): `run -d` for running, `run` for exit.
fn cli_once(bin: &str, id: &str, root: &Path, bundle: &Path, wait_exit: bool) -> Result<f64> {
    let mut cmd = Command::new(bin);
    cmd.arg("--root").arg(root).arg("run");
    if !wait_exit {
        cmd.arg("-d");
    }
    // A detached container inherits runc's stdio: a pipe here would keep
    // `output()` waiting for as long as the container lives.
    let stderr = if wait_exit {
        Stdio::piped()
    } else {
        Stdio::null()
    };
    cmd.arg("--bundle")
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let t0 = Instant::now();
    let out = cmd.output().with_context(|| format!("running {bin}"))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    if !wait_exit {
        let _ = Command::new(bin)
            .arg("--root")
            .arg(root)
            .args(["kill", id, "KILL"])
            .output();
        for _ in 0..50 {
            let o = Command::new(bin)
                .arg("--root")
                .arg(root)
                .args(["delete", "-f", id])
                .stderr(Stdio::null())
                .output();
            if o.map(|o| o.status.success()).unwrap_or(false) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    } else {
        let _ = Command::new(bin)
            .arg("--root")
            .arg(root)
            .args(["delete", "-f", id])
            .stderr(Stdio::null())
            .output();
    }
    if !out.status.success() && (!wait_exit || out.status.code() != Some(0)) {
        bail!("{bin}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(ms)
}

/// Where `bench start` keeps both runtimes' state: tmpfs.
const RUN_DIR: &str = "/run/edge-rt-bench";

/// Returns edge-rt's create-to-running median (ms).
fn start(cfg: &Config, image: &str, runs: usize, dir: &Path) -> Result<f64> {
    crate::supervisor::become_subreaper()?;
    let store = ImageStore::open(cfg.image_dir())?;
    let rec = store
        .resolve(image)?
        .with_context(|| format!("image {image} is not in the store: import or pull it first"))?;
    let image_cfg = store.config(&rec)?;
    crate::runtime::unmount_under(dir);
    let _ = fs::remove_dir_all(dir);
    let rootfs = dir.join("rootfs");
    rootfs::prepare(
        RootfsMode::Copy,
        &store.layer_dirs(&rec)?,
        &dir.join("scratch"),
        &rootfs,
    )?;
    // Containers join a pod sandbox's network, IPC and UTS namespaces, as
    // every container of a pod does (made once, like a CRI sandbox).
    let sandbox =
        crate::runtime::sandbox::Sandbox::ensure(&dir.join("sandbox"), "bench", false, None)?;
    let ns = sandbox.namespaces();
    let mk = |name: &str, args: &[&str], for_edge: bool| {
        bundle(
            &dir.join(if for_edge {
                name.to_string()
            } else {
                format!("{name}-oci")
            }),
            &rootfs,
            &image_cfg,
            args,
            &format!("/edge-rt-bench/{name}"),
            &ns,
            for_edge,
        )
    };
    let (true_b, sleep_b) = (
        mk("true", &["/bin/true"], true)?,
        mk("sleep", &["/bin/sleep", "60"], true)?,
    );
    let (true_oci, sleep_oci) = (
        mk("true", &["/bin/true"], false)?,
        mk("sleep", &["/bin/sleep", "60"], false)?,
    );
    // Runtime state on tmpfs, where both runtimes keep it in production
    // (edge-rt's state_dir and runc's --root default under /run).
    let run_dir = Path::new(RUN_DIR);
    let _ = fs::remove_dir_all(run_dir);
    let state = run_dir.join("state");
    fs::create_dir_all(&state)?;
    crate::runtime::cgroups::prepare_parent("/edge-rt-bench");

    let mut baselines: Vec<&str> = Vec::new();
    for bin in ["runc", "crun"] {
        match cli_once(bin, "probe", &run_dir.join(bin), &true_oci.dir, true) {
            Ok(_) => baselines.push(bin),
            Err(e) => eprintln!("{bin}: not measured ({e})"),
        }
    }
    let mut edge_run = Vec::new();
    let mut edge_exit = Vec::new();
    let mut base: Vec<(Vec<f64>, Vec<f64>)> = baselines.iter().map(|_| (vec![], vec![])).collect();
    for i in 0..runs {
        let (r, _) = edge_once(&format!("bench-r{i}"), &state, &sleep_b, false)?;
        edge_run.push(r);
        let (_, e) = edge_once(&format!("bench-e{i}"), &state, &true_b, true)?;
        edge_exit.push(e.unwrap_or(f64::NAN));
        for (j, bin) in baselines.iter().enumerate() {
            base[j].0.push(cli_once(
                bin,
                &format!("bench-r{i}"),
                &run_dir.join(bin),
                &sleep_oci.dir,
                false,
            )?);
            base[j].1.push(cli_once(
                bin,
                &format!("bench-e{i}"),
                &run_dir.join(bin),
                &true_oci.dir,
                true,
            )?);
        }
    }
    println!("container start latency, busybox bundle, {runs} runs each, interleaved (ms)");
    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>12}",
        "runtime", "run p50", "run p95", "exit p50", "exit p95"
    );
    let row = |name: &str, r: &mut Vec<f64>, e: &mut Vec<f64>| {
        println!(
            "{:<22} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
            name,
            percentile(r, 0.5),
            percentile(r, 0.95),
            percentile(e, 0.5),
            percentile(e, 0.95)
        );
        percentile(e, 0.5)
    };
    let run_p50 = percentile(&mut edge_run, 0.5);
    let edge_p50 = row("edge-rt (in-process)", &mut edge_run, &mut edge_exit);
    for (j, bin) in baselines.iter().enumerate() {
        let (r, e) = &mut base[j];
        let p50 = row(&format!("{bin} run"), r, e);
        println!(
            "{:<22} create-to-exit median is {:.2}x {bin}'s",
            "",
            edge_p50 / p50
        );
    }
    let _ = rootfs::release(&dir.join("scratch"), &rootfs);
    let _ = sandbox.remove();
    let _ = fs::remove_dir_all(run_dir);
    Ok(run_p50)
}

/// A process's resident memory, from /proc.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// A kB figure of /proc/PID/status (`VmRSS:`, `RssAnon:`).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// An `edge-rt run` child on a scratch node directory.
struct BenchNode {
    child: std::process::Child,
    config: PathBuf,
    dir: PathBuf,
    manifests: PathBuf,
    state: PathBuf,
    cgroup: String,
    network: Option<crate::network::NetworkConfig>,
}

impl BenchNode {
    async fn start(cfg: &Config, dir: &Path, network: bool) -> Result<BenchNode> {
        Self::start_with(cfg, dir, network, "").await
    }

    /// The same, `extra` appended to its configuration.
    async fn start_with(cfg: &Config, dir: &Path, network: bool, extra: &str) -> Result<BenchNode> {
        crate::runtime::unmount_under(dir);
        let _ = fs::remove_dir_all(dir);
        Self::start_keeping(cfg, dir, network, extra).await
    }

    /// The same on `dir` as it is (a store made beforehand stays).
    async fn start_keeping(
        cfg: &Config,
        dir: &Path,
        network: bool,
        extra: &str,
    ) -> Result<BenchNode> {
        let manifests = dir.join("pods");
        fs::create_dir_all(&manifests)?;
        let state = dir.join("run");
        let config = dir.join("config.toml");
        let cgroup = format!(
            "/edge-rt-bench-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("node")
        );
        // The pod network of a default node, on a bridge of the bench's own.
        let net = crate::network::NetworkConfig {
            enabled: network,
            bridge: "ortbench0".into(),
            pod_cidr: "10.89.0.0/16".into(),
            masquerade: true,
        };
        fs::write(
            &config,
            format!(
                "[node]\ndata_dir = {:?}\nmanifests_dir = {:?}\npreload_dir = {:?}\n[runtime]\nstate_dir = {:?}\nlog_dir = {:?}\ncgroup_parent = {cgroup:?}\n[network]\nenabled = {network}\nbridge = {:?}\npod_cidr = {:?}\n[store]\npath = {:?}\nkey_file = {:?}\n",
                cfg.node.data_dir,
                manifests,
                dir.join("none"),
                state,
                dir.join("logs"),
                net.bridge,
                net.pod_cidr,
                dir.join("store.db"),
                dir.join("store.key"),
            ) + extra,
        )?;
        let mut node = BenchNode {
            child: Command::new("true").spawn()?,
            config,
            dir: dir.to_path_buf(),
            manifests,
            state,
            cgroup,
            network: network.then_some(net),
        };
        let _ = node.child.wait();
        node.spawn()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok(node)
    }

    /// Start `edge-rt run` on this node (again).
    fn spawn(&mut self) -> Result<()> {
        self.child = Command::new(std::env::current_exe()?)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env("RUST_LOG", "warn,libcgroups=error,libcontainer=error")
            .stdin(Stdio::null())
            .spawn()?;
        Ok(())
    }

    fn socket(&self) -> PathBuf {
        self.state.join("edge-rt.sock")
    }

    /// The pod bridge's address (where the node's DNS server listens).
    fn gateway(&self) -> Option<std::net::Ipv4Addr> {
        self.network
            .as_ref()
            .and_then(|n| crate::network::gateway_of(&n.pod_cidr))
    }

    /// What a power cut leaves: edge-rt and every container killed at
    /// once, the tmpfs state directory and every mount gone, no bridge.
    async fn power_cut(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for r in crate::runtime::load_records(&self.state) {
            if let Some(pid) = r.pid.filter(|_| r.exit.is_none()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        crate::runtime::unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.state);
        if let Some(n) = &self.network {
            if let Ok(net) = crate::network::Network::new(n.clone(), &self.state) {
                net.remove_bridge();
            }
            let _ = fs::remove_dir_all(&self.state);
        }
    }

    fn running(&self) -> Vec<crate::runtime::ContainerRecord> {
        crate::runtime::load_records(&self.state)
            .into_iter()
            .filter(|r| r.exit.is_none() && r.pid.is_some() && r.started_at.is_some())
            .collect()
    }

    /// CPU time (user + system) of the daemon, in clock ticks.
    fn cpu_ticks(&self) -> u64 {
        fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .ok()
            .and_then(|s| {
                let rest = s[s.rfind(')')? + 2..].to_string();
                let f: Vec<&str> = rest.split(' ').collect();
                Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
            })
            .unwrap_or(0)
    }

    /// Stop the daemon and everything it ran.
    async fn finish(mut self, cfg: &Config) -> Result<()> {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        for r in crate::runtime::load_records(&self.state) {
            if let Some(pid) = r.pid {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let store = std::sync::Arc::new(ImageStore::open(cfg.image_dir())?);
        let rcfg = crate::runtime::RuntimeConfig {
            state_dir: self.state.clone(),
            log_dir: self.dir.join("logs"),
            cgroup_parent: self.cgroup.clone(),
            ..Default::default()
        };
        let rt = crate::runtime::Runtime::open(rcfg, store)?;
        let net = match &self.network {
            Some(n) => Some(crate::network::Network::new(n.clone(), &self.state)?),
            None => None,
        };
        for r in rt.list() {
            let _ = rt.wait(&r.id).await;
            let _ = rt.remove(&r.id);
            if let Some(n) = &net {
                n.detach(&r.pod.uid);
            }
            let _ = rt.remove_sandbox(&r.pod.uid);
        }
        if let Some(n) = net {
            n.remove_bridge();
        }
        crate::runtime::unmount_under(&self.dir);
        Ok(())
    }
}

fn pod_yaml(name: &str, image: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {image}\n    imagePullPolicy: Never\n    command: [\"/bin/sleep\", \"3600\"]\n"
    )
}

/// From a manifest written into the directory to its container started
/// (the record's start time against the write), `runs` times.
async fn manifest_latency(
    cfg: &Config,
    image: &str,
    runs: usize,
    dir: &Path,
    network: bool,
) -> Result<Vec<f64>> {
    let node = BenchNode::start(cfg, dir, network).await?;
    let mut out = Vec::new();
    for i in 0..runs {
        let name = format!("lat-{i}");
        let path = node.manifests.join(format!("{name}.yaml"));
        // Written aside and renamed in: the watcher sees a whole file.
        let tmp = node.dir.join(format!("{name}.tmp"));
        fs::write(&tmp, pod_yaml(&name, image))?;
        let t0 = jiff::Timestamp::now();
        fs::rename(&tmp, &path)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let started = loop {
            if let Some(s) = node
                .running()
                .into_iter()
                .find(|r| r.pod.name == name)
                .and_then(|r| r.started_at)
            {
                break s;
            }
            if Instant::now() > deadline {
                bail!("{name} did not start within 30 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let started: jiff::Timestamp = started.parse()?;
        out.push(started.duration_since(t0).as_secs_f64() * 1000.0);
        fs::remove_file(&path)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while node.running().iter().any(|r| r.pod.name == name) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    node.finish(cfg).await?;
    Ok(out)
}

async fn rss(cfg: &Config, image: &str, n: usize, idle_secs: u64, dir: &Path) -> Result<()> {
    let node = BenchNode::start(cfg, dir, true).await?;
    let idle = vm_rss_kib(node.child.id()).unwrap_or(0);
    let mut yaml = String::new();
    for i in 0..n {
        yaml.push_str("---\n");
        yaml.push_str(&pod_yaml(&format!("rss-{i}"), image));
    }
    fs::write(node.manifests.join("pods.yaml"), yaml)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut running = 0;
    while Instant::now() < deadline {
        running = node.running().len();
        if running >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Settle, then measure memory and the CPU the daemon uses while its
    // pods idle.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let busy = vm_rss_kib(node.child.id()).unwrap_or(0);
    let ticks0 = node.cpu_ticks();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let ticks = node.cpu_ticks().saturating_sub(ticks0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let cpu = ticks as f64 / hz / t0.elapsed().as_secs_f64() * 100.0;
    let busy_end = vm_rss_kib(node.child.id()).unwrap_or(0);
    node.finish(cfg).await?;
    println!("edge-rt resident memory (VmRSS) and CPU, pods on the pod network");
    println!("{:<32} {:>10}", "state", "value");
    println!("{:<32} {:>7.1} MB", "idle, no pods", idle as f64 / 1024.0);
    println!(
        "{:<32} {:>7.1} MB",
        format!("{running} running pods"),
        busy.max(busy_end) as f64 / 1024.0
    );
    println!(
        "{:<32} {:>8.2} % of one core",
        format!("CPU over {idle_secs} s of idle pods"),
        cpu
    );
    if running < n {
        bail!("only {running} of {n} pods started");
    }
    Ok(())
}

/// Make `dir` a stand-in /dev of `gpus` NVIDIA GPUs (their real numbers;
/// no driver is needed to count and allocate them) and a CDI spec
/// directory beside it with a vendor spec for each, as nvidia-ctk writes.
fn fake_gpus(dir: &Path, gpus: usize) -> Result<(PathBuf, PathBuf)> {
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let dev = dir.join("dev");
    let cdi = dir.join("cdi");
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(&dev)?;
    fs::create_dir_all(&cdi)?;
    let node = |name: &str, minor: u64| {
        mknod(
            &dev.join(name),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(195, minor),
        )
        .with_context(|| format!("mknod {name} (run as root)"))
    };
    node("nvidiactl", 255)?;
    let mut devices = String::new();
    for i in 0..gpus {
        node(&format!("nvidia{i}"), i as u64)?;
        devices.push_str(&format!(
            "- name: \"{i}\"\n  containerEdits:\n    env: [\"GPU_INDEX={i}\"]\n"
        ));
    }
    fs::write(
        cdi.join("nvidia.yaml"),
        format!("cdiVersion: \"0.6.0\"\nkind: nvidia.com/gpu\ncontainerEdits:\n  env: [\"NVIDIA_DRIVER_CAPABILITIES=compute\"]\ndevices:\n{devices}"),
    )?;
    Ok((dev, cdi))
}

async fn accelerators(
    cfg: &Config,
    image: &str,
    gpus: usize,
    runs: usize,
    dir: &Path,
) -> Result<()> {
    let (dev, cdi) = fake_gpus(&dir.join("fake"), gpus)?;
    let mut samples: Vec<(&str, Vec<f64>, Vec<f64>)> = Vec::new();
    for (label, extra, limits) in (0..runs.max(1)).flat_map(|_| [
        (
            "detection off, no GPUs asked",
            "\n[accelerators]\ndetect = false\ncdi_spec_dirs = []\n".to_string(),
            false,
        ),
        (
            "GPUs detected, each pod holds one",
            format!("\n[accelerators]\ndev_dir = {dev:?}\nsys_dir = {:?}\ncdi_spec_dirs = [{cdi:?}]\n", dir.join("fake/sys")),
            true,
        ),
    ]) {
        let node = BenchNode::start_with(cfg, &dir.join("node"), false, &extra).await?;
        let idle = vm_rss_kib(node.child.id()).unwrap_or(0);
        let mut yaml = String::new();
        for i in 0..gpus {
            yaml.push_str("---\n");
            yaml.push_str(&pod_yaml(&format!("gpu-{i}"), image));
            if limits {
                yaml.push_str("    resources:\n      limits:\n        nvidia.com/gpu: 1\n");
            }
        }
        fs::write(node.manifests.join("pods.yaml"), yaml)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while node.running().len() < gpus && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let running = node.running().len();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let busy = vm_rss_kib(node.child.id()).unwrap_or(0);
        node.finish(cfg).await?;
        if running < gpus {
            bail!("{label}: only {running} of {gpus} pods started");
        }
        let (i, b) = (idle as f64 / 1024.0, busy as f64 / 1024.0);
        match samples.iter_mut().find(|s| s.0 == label) {
            Some(s) => {
                s.1.push(i);
                s.2.push(b);
            }
            None => samples.push((label, vec![i], vec![b])),
        }
    }
    println!(
        "edge-rt resident memory (VmRSS, median of {runs}), {gpus} pods, {gpus} stand-in GPUs with a CDI spec each"
    );
    println!("{:<36} {:>10} {:>14}", "node", "idle MB", "with pods MB");
    let mut medians = Vec::new();
    for (label, idle, busy) in &mut samples {
        let (i, b) = (percentile(idle, 0.5), percentile(busy, 0.5));
        println!("{:<36} {:>10.1} {:>14.1}", label, i, b);
        medians.push((i, b));
    }
    println!(
        "{:<36} {:>10.1} {:>14.1}   (bar: 1 MB)",
        "added by detection and allocation",
        medians[1].0 - medians[0].0,
        medians[1].1 - medians[0].1
    );
    Ok(())
}
