//! test-apiserver: the tests' Kubernetes API server (test infrastructure,
//! see `outrigger_tests::apiserver`) as a process, for benchmarks and
//! manual use. Prints the admin kubeconfig's path, serves until killed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use outrigger_tests::apiserver::{Options, TestApiServer};

#[derive(Parser)]
struct Args {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Also copy the admin kubeconfig here.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// Directory for kubeconfigs (default: a temporary one).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Changes kept for watches to resume from.
    #[arg(long, default_value_t = 10_000)]
    history: usize,
    /// Seconds between watch bookmarks.
    #[arg(long, default_value_t = 10)]
    bookmark_interval: u64,
    /// Extra bearer tokens, TOKEN=USER.
    #[arg(long = "token")]
    tokens: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tokens = args
        .tokens
        .iter()
        .map(|t| {
            let (tok, user) = t.split_once('=').context("--token wants TOKEN=USER")?;
            Ok((tok.to_string(), user.to_string(), vec![]))
        })
        .collect::<Result<Vec<_>>>()?;
    let server = TestApiServer::start_with(Options {
        listen: args.listen,
        history: args.history,
        bookmark_interval: Duration::from_secs(args.bookmark_interval),
        tokens,
        dir: args.dir,
        ..Options::default()
    })?;
    let mut path = server.kubeconfig().to_path_buf();
    if let Some(out) = &args.kubeconfig_out {
        std::fs::copy(server.kubeconfig(), out)
            .with_context(|| format!("writing {}", out.display()))?;
        path = out.clone();
    }
    println!("{}", path.display());
    eprintln!("test-apiserver: serving {}", server.url());
    loop {
        std::thread::park();
    }
}
