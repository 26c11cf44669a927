//! The `cloud-gw` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use cloud_gw::keeper::DirKeeper;
use cloud_gw::pki::Pki;
use cloud_gw::tokens::Tokens;

#[derive(Parser)]
#[command(
    name = "cloud-gw",
    version,
    about = "Outrigger's cloud gateway: serves edge nodes over mutual-TLS WebSockets"
)]
struct Cli {
    /// Where the CA, the serving certificate and the tokens are kept.
    #[arg(
        long,
        global = true,
        env = "CLOUD_GW_DIR",
        default_value = "/var/lib/cloud-gw"
    )]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the link CA and the serving certificate.
    Init {
        /// A DNS name or IP address edges reach cloud-gw by (repeat).
        #[arg(long = "san", required = true)]
        sans: Vec<String>,
        /// Replace an existing CA (every node must join again).
        #[arg(long)]
        force: bool,
    },
    /// Join tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Serve edge nodes: /join and /link over TLS.
    Serve {
        #[arg(long, default_value = "0.0.0.0:7443")]
        listen: std::net::SocketAddr,
        /// Heartbeat period; a link silent for two is dropped.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        heartbeat: Duration,
        /// Lifetime of node certificates.
        #[arg(long, default_value = "90d", value_parser = parse_duration)]
        node_cert_validity: Duration,
        /// Objects to serve: a directory per node name of YAML manifests
        /// (Pods, ConfigMaps, Secrets); status lands in `.status/<node>/`.
        #[arg(long, default_value = "/var/lib/cloud-gw/objects")]
        objects: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a new join token (it pins the CA).
    Create {
        /// How long it may be used, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
    },
    List,
    Revoke {
        id: String,
    },
}

/// One descriptor per node link: lift the soft limit (often 1,024) to the
/// hard one, as servers do.
fn raise_nofile() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain calls with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 30m, 24h, 7d"))?;
    let secs = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: unit must be s, m, h or d")),
    };
    Ok(Duration::from_secs(n * secs))
}

fn main() -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

async fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let keeper = DirKeeper::new(&cli.dir);
    if let Cmd::Serve {
        listen,
        heartbeat,
        node_cert_validity,
        objects,
    } = cli.cmd
    {
        let cfg = cloud_gw::server::ServeConfig {
            heartbeat,
            node_cert_validity,
            objects,
            // inotify brings changes at once; this catches what it misses.
            rescan: Duration::from_secs(30),
        };
        let gw = std::sync::Arc::new(cloud_gw::server::Gateway::new(
            std::sync::Arc::new(keeper),
            cfg,
        )?);
        raise_nofile();
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        tracing::info!(%listen, "serving edge nodes");
        gw.serve(listener).await;
        return Ok(());
    }
    match cli.cmd {
        Cmd::Init { sans, force } => {
            let pki = Pki::init(&keeper, &sans, force)?;
            println!("CA and serving certificate in {}", cli.dir.display());
            println!("CA pin: {}", pki.ca_pin()?);
        }
        Cmd::Token(TokenCmd::Create { ttl }) => {
            let pki = Pki::load(&keeper)?;
            let t = Tokens::new(&keeper).create(ttl, &pki.ca_pin()?)?;
            println!("{t}");
        }
        Cmd::Token(TokenCmd::List) => {
            println!("{:<8} {:<25} {:<8}", "ID", "EXPIRES", "STATE");
            let now = cloud_gw::tokens::now();
            for t in Tokens::new(&keeper).list()? {
                let state = if t.revoked {
                    "revoked"
                } else if t.expires <= now {
                    "expired"
                } else {
                    "valid"
                };
                let exp = time::OffsetDateTime::from_unix_timestamp(t.expires)
                    .ok()
                    .and_then(|d| {
                        d.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
                println!("{:<8} {:<25} {:<8}", t.id, exp, state);
            }
        }
        Cmd::Serve { .. } => {}
        Cmd::Token(TokenCmd::Revoke { id }) => {
            Tokens::new(&keeper)
                .revoke(&id)
                .with_context(|| format!("revoking {id}"))?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}
