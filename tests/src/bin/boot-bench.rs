//! boot-bench: a gateway's boot under QEMU's software emulation (TCG, no
//! KVM), the QEMU aarch64 board's disk as `boards/qemu-common/make-disk`
//! makes it (BusyBox init starting edge-rt, Debian's kernel):
//!
//! - first boot, provisioned with a join token: QEMU started to "edge-rt
//!   running", and to the pod cloud-gw sent (`cloud-gw serve`, from a file)
//!   serving on its hostPort;
//! - after a power cut (QEMU killed), cut off from the host: to "edge-rt
//!   running", and to the cached pod serving again from the store;
//! - the baseline: Debian's own init (systemd, from `mmdebstrap` of
//!   bookworm's minbase) booting the same kernel with the same modules from
//!   a disk, to systemd's "Reached target multi-user.target" (`--debian
//!   ROOTFS.tar`; skipped without it).
//!
//! And the root filesystem's size. As root, after `.ci/vm-assets` and
//! `cargo build --release --target aarch64-unknown-linux-musl -p edge-rt`:
//!   target/release/boot-bench [--runs 5] [--arch arm64] [--debian /tmp/debian-arm64.tar]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use outrigger_tests::cloud::Cloud;
use outrigger_tests::registry::free_port;
use outrigger_tests::vm::{
    boot_id_pod, busybox_archive, http_get, join_conf, poll, Assets, GatewayDisk, Vm,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// arm64 (the bar's) or amd64.
    #[arg(long, default_value = "arm64")]
    arch: String,
    /// A Debian root filesystem (tar) for the baseline, e.g. made with
    /// `mmdebstrap --variant=minbase --architectures=arm64
    /// --include=systemd-sysv,udev bookworm debian.tar`.
    #[arg(long)]
    debian: Option<PathBuf>,
}

const TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Default)]
struct Times {
    ready: Vec<f64>,
    pod: Vec<f64>,
    offline_ready: Vec<f64>,
    offline_pod: Vec<f64>,
    debian: Vec<f64>,
}

fn since(vm: &Vm) -> f64 {
    vm.started.elapsed().as_secs_f64()
}

async fn one_run(a: &Assets, archive: &std::path::Path, t: &mut Times) -> Result<u64> {
    let cloud = Cloud::start_for(None, &["10.0.2.2"]).await?;
    let node = format!("bench-{}", std::process::id());
    let objects = cloud.dir.path().join("objects").join(&node);
    std::fs::create_dir_all(&objects)?;
    std::fs::write(objects.join("web.yaml"), boot_id_pod(""))?;
    let work = tempfile::tempdir()?;
    let join = work.path().join("join.conf");
    std::fs::write(&join, join_conf(&cloud, &node, "")?)?;
    let disk = GatewayDisk::make(a, Some(&join), &[archive], None)?;
    let http = free_port()?;
    let fwd = [(http, 8080)];

    let mut vm = Vm::boot_disk(a.arch, &disk, &fwd, false)?;
    vm.wait_line(TIMEOUT, |l| l.contains("edge-rt running"))?;
    t.ready.push(since(&vm));
    let first = poll(TIMEOUT, "the pod's page", || http_get(http))
        .with_context(|| vm.console().join("\n"))?;
    t.pod.push(since(&vm));
    vm.power_cut();
    drop(cloud);

    let mut vm = Vm::boot_disk(a.arch, &disk, &fwd, true)?;
    vm.wait_line(TIMEOUT, |l| l.contains("edge-rt running"))?;
    t.offline_ready.push(since(&vm));
    poll(TIMEOUT, "the pod's page after the power cut", || {
        http_get(http).filter(|b| *b != first)
    })
    .with_context(|| vm.console().join("\n"))?;
    t.offline_pod.push(since(&vm));
    vm.power_cut();
    Ok(disk.rootfs_bytes)
}

/// Debian's rootfs on a disk of its own, booted with the gateway disk's
/// kernel and module-loading initramfs (the root partition is found by
/// its label either way).
fn debian_run(a: &Assets, tar: &std::path::Path, t: &mut Times) -> Result<()> {
    let work = tempfile::tempdir()?;
    // The gateway disk gives the kernel, the initramfs and the command line.
    let disk = GatewayDisk::make(a, None, &[], None)?;
    let root = work.path().join("root.ext4");
    let rootfs = work.path().join("rootfs");
    std::fs::create_dir_all(&rootfs)?;
    let ok = std::process::Command::new("tar")
        .arg("-xf")
        .arg(tar)
        .arg("-C")
        .arg(&rootfs)
        .status()?;
    anyhow::ensure!(ok.success(), "unpacking {}", tar.display());
    // Its root password-less on the console, as the gateway's: nothing to
    // wait for but systemd itself.
    let ok = std::process::Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", "root", "-d"])
        .arg(&rootfs)
        .arg(&root)
        .arg("1G")
        .status()?;
    anyhow::ensure!(ok.success(), "mke2fs");
    // The gateway disk with its root partition's label taken away, so
    // the kernel's root=LABEL=root finds Debian's.
    std::fs::copy(&root, disk.dir.path().join("disk.img"))?;
    let cmdline = disk.dir.path().join("cmdline");
    let c = std::fs::read_to_string(&cmdline)?;
    std::fs::write(
        &cmdline,
        format!("{} systemd.show_status=1", c.trim().replace(" quiet", "")),
    )?;
    let mut vm = Vm::boot_disk(a.arch, &disk, &[], true)?;
    vm.wait_line(TIMEOUT, |l| {
        l.contains("Reached target") && l.contains("Multi-User")
    })?;
    t.debian.push(since(&vm));
    vm.power_cut();
    Ok(())
}

fn row(name: &str, v: &mut [f64]) {
    if v.is_empty() {
        println!("{name:<62} {:>8}", "-");
        return;
    }
    v.sort_by(f64::total_cmp);
    println!(
        "{name:<62} {:>8.1} {:>6.1} {:>6.1}",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1]
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let arch: &'static str = match args.arch.as_str() {
        "arm64" => "arm64",
        "amd64" => "amd64",
        a => anyhow::bail!("--arch arm64 or amd64, not {a}"),
    };
    let a = Assets::locate(arch)?;
    let work = tempfile::tempdir()?;
    let archive = busybox_archive(&a, work.path())?;

    let mut t = Times::default();
    let mut rootfs = 0;
    let started = Instant::now();
    for i in 0..args.runs {
        eprintln!("run {}/{}", i + 1, args.runs);
        rootfs = one_run(&a, &archive, &mut t).await?;
        if let Some(tar) = &args.debian {
            debian_run(&a, tar, &mut t)?;
        }
    }
    println!(
        "gateway boot under QEMU {} (TCG, 2 vCPUs, 1 GiB), {} runs each (s from QEMU's start)",
        arch, args.runs
    );
    println!("{:<62} {:>8} {:>6} {:>6}", "path", "median", "min", "max");
    row("first boot, join token: edge-rt running", &mut t.ready);
    row("first boot: the pod cloud-gw sent serving", &mut t.pod);
    row(
        "after a power cut, no cloud: edge-rt running",
        &mut t.offline_ready,
    );
    row(
        "after a power cut, no cloud: cached pod serving",
        &mut t.offline_pod,
    );
    row(
        "baseline: Debian (systemd) to multi-user.target, same kernel",
        &mut t.debian,
    );
    println!(
        "root filesystem (edge-rt, config, busybox, iproute2, iptables, libs): {:.1} MB; static edge-rt {:.1} MB",
        rootfs as f64 / 1e6,
        std::fs::metadata(&a.edge_rt)?.len() as f64 / 1e6
    );
    eprintln!("took {:?}", started.elapsed());
    Ok(())
}
