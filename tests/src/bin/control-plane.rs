//! control-plane: a real Kubernetes control plane (see
//! `outrigger_tests::k8s`) kept up until the process `--watch-pid` is gone
//! (a nextest run) or a signal comes, then stopped with its directories
//! removed. The first Kubernetes test of a run starts it; every test of the
//! run shares it. By hand:
//!
//!   control-plane --dir /var/tmp/cp      # kubeconfig path in /var/tmp/cp/ready

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use outrigger_tests::k8s::{ControlPlane, Options};

#[derive(Parser)]
struct Args {
    /// Where `ready` (the admin kubeconfig's path) is written.
    #[arg(long)]
    dir: PathBuf,
    /// Stop once this process has exited.
    #[arg(long)]
    watch_pid: Option<i32>,
    /// The default not-ready and unreachable toleration, in seconds.
    #[arg(long, default_value_t = Options::default().default_toleration_seconds)]
    toleration_seconds: u32,
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn main() -> Result<()> {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    std::fs::create_dir_all(&args.dir)?;
    let opts = Options {
        default_toleration_seconds: args.toleration_seconds,
        ..Options::default()
    };
    let t = std::time::Instant::now();
    let cp = ControlPlane::start(&opts).context("starting the control plane")?;
    eprintln!(
        "control plane up at {} in {:.1} s; logs in {}",
        cp.url(),
        t.elapsed().as_secs_f64(),
        cp.dir().display()
    );
    let ready = args.dir.join("ready");
    std::fs::write(
        args.dir.join("ready.tmp"),
        cp.kubeconfig().display().to_string(),
    )?;
    std::fs::rename(args.dir.join("ready.tmp"), &ready)?;
    while !stop.load(Ordering::Relaxed) && args.watch_pid.is_none_or(alive) {
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = std::fs::remove_file(&ready);
    drop(cp);
    if args.watch_pid.is_some() {
        let _ = std::fs::remove_dir_all(&args.dir);
    }
    Ok(())
}
