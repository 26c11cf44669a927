//! The `cloud-gw` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use cloud_gw::bridge::secret::SecretKeeper;
use cloud_gw::keeper::{DirKeeper, Keeper};
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
    /// Keep the CA, serving certificate and tokens in this Kubernetes
    /// Secret (NAMESPACE/NAME) instead of --dir: what replicas share.
    #[arg(long, global = true, env = "CLOUD_GW_SECRET")]
    secret: Option<String>,
    /// The cluster's kubeconfig, for `run` and --secret (default:
    /// $KUBECONFIG, ~/.kube/config, or the in-cluster service account).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
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
    /// KubeEdge v1beta1 DeviceModels and Devices as ours (other documents
    /// as they are), for `kubectl apply -f -`; what has no equivalent is
    /// named on stderr.
    ConvertKubeedge {
        /// A YAML file of KubeEdge objects; - for stdin.
        #[arg(short, long)]
        filename: PathBuf,
    },
    /// Print what a cluster needs to run cloud-gw (CRDs, namespace, RBAC,
    /// Deployment, Services, webhooks), for `kubectl apply -f -`.
    Manifests {
        #[arg(long, default_value = "outrigger-system")]
        namespace: String,
        /// cloud-gw's image, as pushed to a registry the cluster pulls from
        /// (build it with cloud-gw/image/build.sh).
        #[arg(long)]
        image: String,
        #[arg(long, default_value_t = 2)]
        replicas: u32,
        /// A name (DNS or IP) edges reach cloud-gw by (repeat).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Serve edge nodes from the Kubernetes API: each is a Node, its pods
    /// and what they use go down the link, status and events come back.
    Run {
        #[command(flatten)]
        link: LinkArgs,
        /// With --secret and no CA in it yet: names (DNS or IP) edges reach
        /// cloud-gw by, for the serving certificate made then (repeat).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Taint edge nodes node-role.kubernetes.io/edge:NoSchedule.
        #[arg(long)]
        edge_taint: bool,
        /// How often a connected node's Lease is renewed.
        #[arg(long, default_value = "10s", value_parser = parse_duration)]
        lease_period: Duration,
        /// Node status is rewritten at least this often while connected.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        status_period: Duration,
        /// A pod's service account token is requested again at this age,
        /// if 80% of its life has not come first (as a kubelet: 24h).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        token_max_age: Duration,
        /// The admission webhook (HTTPS, the serving certificate); "off"
        /// for none.
        #[arg(long, default_value = "0.0.0.0:8443")]
        webhook_listen: String,
        /// The MutatingWebhookConfiguration to write the link CA into at
        /// start (as caBundle), if it exists.
        #[arg(long, default_value = cloud_gw::manifests::WEBHOOK_CONFIG)]
        webhook_config: String,
        /// The cluster's DNS domain, as edge nodes serve it to their pods.
        #[arg(long, default_value = "cluster.local")]
        cluster_domain: String,
        /// The cluster's DNS Service (namespace/name): its ClusterIP is
        /// the cluster DNS address edge nodes answer on for their pods.
        #[arg(long, default_value = "kube-system/kube-dns")]
        dns_service: String,
        #[command(flatten)]
        kubelet: KubeletArgs,
    },
    /// Serve edge nodes from a directory of manifests (no cluster): the
    /// link on its own, for trials and tests.
    Serve {
        #[command(flatten)]
        link: LinkArgs,
        /// Objects to serve: a directory per node name of YAML manifests
        /// (Pods, ConfigMaps, Secrets); status lands in `.status/<node>/`.
        #[arg(long, default_value = "/var/lib/cloud-gw/objects")]
        objects: PathBuf,
    },
}

/// Where and how edge nodes are served.
#[derive(clap::Args)]
struct LinkArgs {
    /// Where edges connect (TLS; /join and /link).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: std::net::SocketAddr,
    /// Heartbeat period; a link silent for two is dropped.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    heartbeat: Duration,
    /// Lifetime of node certificates.
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    node_cert_validity: Duration,
    /// /healthz, /readyz and /metrics (plain HTTP); "off" for none.
    #[arg(long, default_value = "0.0.0.0:9090")]
    http_listen: String,
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

/// The kubelet endpoint of edge nodes (kubectl logs, exec, attach,
/// port-forward, top).
#[derive(clap::Args)]
struct KubeletArgs {
    /// The address the kubelet ports of edge nodes listen on (HTTPS, a port
    /// per node whose link this replica holds); "off" for none (kubectl
    /// logs, exec and top then cannot reach edge nodes).
    #[arg(long, default_value = "0.0.0.0")]
    kubelet_listen: String,
    /// Which ports: "any" (the kernel's ephemeral ports) or FROM-TO (a
    /// range a firewall can name; one port per node served here).
    #[arg(long, default_value = "any")]
    kubelet_ports: cloud_gw::kubelet::ports::Range,
    /// The IP address the API server reaches this replica's kubelet
    /// ports at, written into the Nodes whose links it holds (default:
    /// $POD_IP, else the --kubelet-listen address if it is not 0.0.0.0,
    /// else the address this host reaches the API server from).
    #[arg(long, env = "POD_IP")]
    kubelet_address: Option<std::net::IpAddr>,
    /// The CA (PEM) whose client certificates name users here: the one
    /// that signed the API server's --kubelet-client-certificate (default:
    /// the cluster's client CA, from kube-system/extension-apiserver-authentication).
    #[arg(long)]
    kubelet_client_ca: Option<PathBuf>,
    /// Let the API server pass kubectl's WebSockets (exec, attach,
    /// port-forward) through to edge nodes as they are: the Nodes declare
    /// ExtendWebSocketsToKubelet. With false it translates them to SPDY,
    /// as for a kubelet older than 1.36 (both are served).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    kubelet_websockets: bool,
}

/// The ports of the kubelet endpoint and what they open, if it is on.
fn kubelet_ports(
    a: &KubeletArgs,
    toward_api: Option<std::net::IpAddr>,
) -> Result<
    Option<(
        std::sync::Arc<cloud_gw::kubelet::ports::Ports>,
        tokio::sync::mpsc::UnboundedReceiver<cloud_gw::kubelet::ports::Opened>,
    )>,
> {
    if a.kubelet_listen == "off" {
        return Ok(None);
    }
    let bind: std::net::IpAddr = a.kubelet_listen.parse().with_context(|| {
        format!(
            "--kubelet-listen {:?}: an IP address (ports are per node: --kubelet-ports)",
            a.kubelet_listen
        )
    })?;
    let advertise = match a.kubelet_address {
        Some(ip) => ip,
        None if !bind.is_unspecified() => bind,
        None => match toward_api {
            Some(ip) => ip,
            None => anyhow::bail!(
                "--kubelet-listen {} needs --kubelet-address (or $POD_IP): the address the API server reaches this replica at",
                a.kubelet_listen
            ),
        },
    };
    let (mut ports, opened) =
        cloud_gw::kubelet::ports::Ports::new(bind, advertise, a.kubelet_ports);
    if !a.kubelet_websockets {
        ports = ports.without_websockets();
    }
    Ok(Some((std::sync::Arc::new(ports), opened)))
}

async fn client(kubeconfig: Option<&std::path::Path>) -> Result<(kube::Client, hyper::Uri)> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("using {}", p.display()))?
        }
        None => kube::Config::infer().await.context(
            "no kubeconfig given and none found (KUBECONFIG, ~/.kube/config, in-cluster)",
        )?,
    };
    tracing::debug!(cluster = %config.cluster_url, "Kubernetes API");
    let url = config.cluster_url.clone();
    Ok((
        kube::Client::try_from(config).context("Kubernetes client")?,
        url,
    ))
}

/// The address this host reaches the API server from: what the API
/// server can most likely reach it at (no packet is sent).
fn address_toward(url: &hyper::Uri) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let port = url.port_u16().unwrap_or(443);
    let server = (url.host()?.trim_matches(['[', ']']), port)
        .to_socket_addrs()
        .ok()?
        .next()?;
    let any: std::net::SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(any).ok()?;
    s.connect(server).ok()?;
    Some(s.local_addr().ok()?.ip())
}

/// Health for `serve`: always ready, no edge nodes to ask about.
struct NoCluster;

impl cloud_gw::http::State for NoCluster {
    fn ready(&self) -> bool {
        true
    }

    fn admission(&self) -> cloud_gw::bridge::admission::Context {
        Default::default()
    }

    fn device_model(&self, _: &str, _: &str) -> Option<outrigger_proto::device::DeviceModelSpec> {
        None
    }
}

async fn listen(addr: &str) -> Result<Option<tokio::net::TcpListener>> {
    if addr == "off" {
        return Ok(None);
    }
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    Ok(Some(l))
}

/// What the kubelet endpoint needs, for `run`.
struct KubeletSetup {
    ports: std::sync::Arc<cloud_gw::kubelet::ports::Ports>,
    opened: tokio::sync::mpsc::UnboundedReceiver<cloud_gw::kubelet::ports::Opened>,
    /// None: the cluster's, read from the API server.
    client_ca: Option<String>,
    pods: std::sync::Arc<dyn cloud_gw::kubelet::Pods>,
    client: kube::Client,
}

async fn serve(
    keeper: std::sync::Arc<dyn Keeper>,
    source: std::sync::Arc<dyn cloud_gw::source::Source>,
    state: std::sync::Arc<dyn cloud_gw::http::State>,
    link: LinkArgs,
    webhook: &str,
    kubelet: Option<KubeletSetup>,
) -> Result<()> {
    let cfg = cloud_gw::server::ServeConfig {
        heartbeat: link.heartbeat,
        node_cert_validity: link.node_cert_validity,
        // Sources push changes at once; this catches what they miss.
        rescan: Duration::from_secs(30),
    };
    let gw = std::sync::Arc::new(cloud_gw::server::Gateway::new(keeper, source, cfg)?);
    raise_nofile();
    if let Some(l) = listen(&link.http_listen).await? {
        tracing::info!(listen = link.http_listen, "health and metrics");
        tokio::spawn(cloud_gw::http::serve(l, None, state.clone()));
    }
    if let Some(l) = listen(webhook).await? {
        tracing::info!(listen = webhook, "admission webhook");
        tokio::spawn(cloud_gw::http::serve(l, Some(gw.webhook_tls()?), state));
    }
    if let Some(k) = kubelet {
        let pki = gw.pki();
        let serving = cloud_gw::kubelet::Serving {
            cert_pem: pki.server_cert_pem.clone(),
            key_pem: pki.server_key_pem.clone(),
            ca: pki.ca_der()?,
        };
        let kl = cloud_gw::kubelet::Kubelet::new(gw.links(), k.pods, k.client);
        tokio::spawn(k.ports.sweeper());
        tokio::spawn(std::sync::Arc::new(kl).start(k.opened, serving, k.client_ca));
    }
    let listener = tokio::net::TcpListener::bind(link.listen)
        .await
        .with_context(|| format!("listening on {}", link.listen))?;
    tracing::info!(listen = %link.listen, "serving edge nodes");
    gw.serve(listener).await;
    Ok(())
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
    let needs_cluster = cli.secret.is_some() || matches!(cli.cmd, Cmd::Run { .. });
    let (client, api_url) = match needs_cluster {
        true => {
            let (c, u) = client(cli.kubeconfig.as_deref()).await?;
            (Some(c), Some(u))
        }
        false => (None, None),
    };
    let (keeper, secret): (std::sync::Arc<dyn Keeper>, _) = match (&cli.secret, &client) {
        (Some(s), Some(c)) => {
            let (ns, name) = s.split_once('/').context("--secret is NAMESPACE/NAME")?;
            let k = std::sync::Arc::new(
                SecretKeeper::open(c.clone(), ns, name)
                    .await
                    .with_context(|| format!("reading secret {s}"))?,
            );
            (k.clone(), Some(k))
        }
        _ => (std::sync::Arc::new(DirKeeper::new(&cli.dir)), None),
    };
    let keeper_name = match &cli.secret {
        Some(s) => format!("secret {s}"),
        None => cli.dir.display().to_string(),
    };
    match cli.cmd {
        Cmd::Serve { link, objects } => {
            let source = std::sync::Arc::new(cloud_gw::source::DirSource::new(&objects));
            tokio::spawn(source.clone().watch());
            return serve(
                keeper,
                source,
                std::sync::Arc::new(NoCluster),
                link,
                "off",
                None,
            )
            .await;
        }
        Cmd::Run {
            link,
            sans,
            edge_taint,
            lease_period,
            status_period,
            token_max_age,
            webhook_listen,
            webhook_config,
            cluster_domain,
            dns_service,
            kubelet,
        } => {
            let client = client.context("a cluster client")?;
            let toward = api_url.as_ref().and_then(address_toward);
            let kubelet_at = kubelet_ports(&kubelet, toward)?;
            let client_ca = match (&kubelet_at, &kubelet.kubelet_client_ca) {
                (Some(_), Some(p)) => Some(
                    std::fs::read_to_string(p)
                        .with_context(|| format!("reading {}", p.display()))?,
                ),
                _ => None,
            };
            if let Some(k) = &secret {
                // Made once across replicas; then followed for tokens.
                if !sans.is_empty() || k.get(cloud_gw::pki::CA_CERT)?.is_some() {
                    k.pki(&sans).await?;
                }
                k.follow();
            }
            if webhook_listen != "off" {
                let ca = Pki::load(keeper.as_ref())?.ca_cert_pem;
                match cloud_gw::manifests::inject_ca_bundle(client.clone(), &webhook_config, &ca)
                    .await
                {
                    Ok(true) => tracing::info!(
                        webhook_config,
                        "link CA written into the webhook configuration"
                    ),
                    Ok(false) => tracing::info!(
                        webhook_config,
                        "no webhook configuration of that name; pods get no autonomy tolerations, devices are checked by their nodes only"
                    ),
                    Err(e) => {
                        tracing::warn!(webhook_config, error = %e, "cannot write the CA into the webhook configuration")
                    }
                }
            }
            // Its own namespace: the Secret's, else the client's (the
            // in-cluster service account's, or the kubeconfig context's).
            let cluster = match &cli.secret {
                Some(s) => s.split('/').next().unwrap_or("default").to_string(),
                None => client.default_namespace().to_string(),
            };
            let bridge = cloud_gw::bridge::BridgeConfig {
                edge_taint,
                lease_period,
                status_period,
                token_max_age,
                namespace: cluster.clone(),
                cluster_dns: cloud_gw::bridge::services::ClusterDns {
                    domain: cluster_domain,
                    service: match dns_service.split_once('/') {
                        Some((ns, name)) => (ns.to_string(), name.to_string()),
                        None => ("kube-system".to_string(), dns_service),
                    },
                },
                kubelet: kubelet_at.as_ref().map(|(p, _)| p.clone()),
            };
            let source = std::sync::Arc::new(cloud_gw::bridge::KubeSource::start(client, bridge));
            tracing::info!(namespace = cluster, "listing pods, ConfigMaps and Secrets");
            // Nodes are served only from complete caches: from half of one
            // a node would be told to delete the pods not listed yet.
            source.ready().await;
            let kubelet = kubelet_at.map(|(ports, opened)| KubeletSetup {
                ports,
                opened,
                client_ca,
                pods: source.clone(),
                client: source.client(),
            });
            return serve(
                keeper,
                source.clone(),
                source,
                link,
                &webhook_listen,
                kubelet,
            )
            .await;
        }
        _ => {}
    }
    match cli.cmd {
        Cmd::Init { sans, force } => {
            let pki = match &secret {
                Some(_) if force => anyhow::bail!(
                    "--force is not offered with --secret: delete the Secret to start a new CA (every node joins again)"
                ),
                Some(k) => k.pki(&sans).await?,
                None => Pki::init(keeper.as_ref(), &sans, force)?,
            };
            println!("CA and serving certificate in {keeper_name}");
            println!("CA pin: {}", pki.ca_pin()?);
        }
        Cmd::Token(TokenCmd::Create { ttl }) => {
            let pki = Pki::load(keeper.as_ref())?;
            let t = Tokens::new(keeper.as_ref()).create(ttl, &pki.ca_pin()?)?;
            println!("{t}");
        }
        Cmd::Token(TokenCmd::List) => {
            println!("{:<8} {:<25} {:<8}", "ID", "EXPIRES", "STATE");
            let now = cloud_gw::tokens::now();
            for t in Tokens::new(keeper.as_ref()).list()? {
                let state = if t.revoked {
                    "revoked"
                } else if t.expires <= now {
                    "expired"
                } else {
                    "valid"
                };
                let exp = jiff::Timestamp::from_second(t.expires)
                    .map(|d| format!("{d:.0}"))
                    .unwrap_or_default();
                println!("{:<8} {:<25} {:<8}", t.id, exp, state);
            }
        }
        Cmd::Serve { .. } | Cmd::Run { .. } => {}
        Cmd::Manifests {
            namespace,
            image,
            replicas,
            sans,
        } => {
            let o = cloud_gw::manifests::Options {
                namespace,
                image,
                replicas,
                sans,
            };
            print!("{}", cloud_gw::manifests::yaml(&o)?);
        }
        Cmd::ConvertKubeedge { filename } => {
            let text = if filename.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin()).context("reading stdin")?
            } else {
                std::fs::read_to_string(&filename)
                    .with_context(|| format!("reading {}", filename.display()))?
            };
            let c = cloud_gw::convert::convert(&text)?;
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            for o in &c.objects {
                print!("---\n{}", serde_yaml_ng::to_string(o)?);
            }
        }
        Cmd::Token(TokenCmd::Revoke { id }) => {
            Tokens::new(keeper.as_ref())
                .revoke(&id)
                .with_context(|| format!("revoking {id}"))?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kubelet_address_defaults_to_the_way_toward_the_api_server() {
        let url: hyper::Uri = "https://127.0.0.1:6443".parse().unwrap();
        assert_eq!(
            super::address_toward(&url),
            Some(std::net::Ipv4Addr::LOCALHOST.into())
        );
    }
}
