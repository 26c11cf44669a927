//! cloud-gw: makes each edge node an ordinary Kubernetes Node and serves
//! edge nodes over mutual-TLS WebSockets.
//!
//! This is the skeleton the workspace builds today: the link (join, mTLS,
//! delta sync) and the Kubernetes bridge come with their own issues.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "cloud-gw",
    version,
    about = "Outrigger's cloud gateway (skeleton: the edge link and Kubernetes bridge are not built yet)"
)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let _cli = Cli::parse();
    tracing::warn!(
        "cloud-gw has no functions yet: the edge link and the Kubernetes bridge are being built"
    );
    Ok(())
}
