//! The `edge-rt` command line.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use edge_rt::api::{self, Request};
use edge_rt::cli::human;
use edge_rt::config::{Config, DEFAULT_PATH};
use edge_rt::image::registry::{Credentials, Progress, Puller};
use edge_rt::image::{archive, auth, ImageStore};
use edge_rt::runtime;

/// Objects `edge-rt apply` commits per request.
const APPLY_CHUNK: usize = 16;

#[derive(Parser)]
#[command(
    name = "edge-rt",
    version,
    about = "Outrigger's edge runtime: Kubernetes pods on embedded Linux gateways"
)]
struct Cli {
    /// Node configuration file (TOML; every key optional).
    #[arg(long, global = true, env = "EDGE_RT_CONFIG", default_value = DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent (as a service, or as PID 1 of a gateway image).
    Run,
    /// The embedded MQTT broker (`edge-rt run` starts it as a child with
    /// `[devices]`'s settings; by hand, e.g. to compare it with another).
    Broker {
        /// ip:port to listen on (MQTT 3.1.1); repeat for several.
        #[arg(long, required = true)]
        listen: Vec<std::net::SocketAddr>,
        /// user:password lines; with none, no login is asked.
        #[arg(long)]
        users_file: Option<PathBuf>,
        /// One more user, with its password in --password-file.
        #[arg(long, requires = "password_file")]
        user: Option<String>,
        #[arg(long, requires = "user")]
        password_file: Option<PathBuf>,
    },
    /// List, pull, import, remove and collect images.
    #[command(subcommand)]
    Images(ImagesCmd),
    /// Containers this node runs or ran (read from the state directory).
    Ps {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Pods of this node, as `kubectl get pods` shows them.
    #[command(alias = "po")]
    Pods {
        #[arg(short, long, value_enum, default_value = "table")]
        output: PodsOutput,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        /// Pods of every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Field devices of this node and their last readings, as
    /// `kubectl get devices` shows them.
    #[command(alias = "dev")]
    Devices {
        #[arg(short, long, value_enum, default_value = "table")]
        output: PodsOutput,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Set a device's desired values at the gateway, with or without the
    /// cloud: `edge-rt device set boiler setpoint=21.5`.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// A pod's status, containers and events (`edge-rt describe pod NAME`),
    /// or a device's properties, conditions, counters and recent errors
    /// (`edge-rt describe device NAME`).
    Describe {
        /// What to describe: pod or device.
        #[arg(value_parser = ["pod", "pods", "po", "device", "devices", "dev"])]
        kind: String,
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// A container's log.
    Logs {
        pod: String,
        #[arg(short, long)]
        container: Option<String>,
        /// Go on printing as the container writes, until it ends.
        #[arg(short, long)]
        follow: bool,
        /// The log of the container's previous run.
        #[arg(short, long)]
        previous: bool,
        /// Only the last N lines.
        #[arg(long)]
        tail: Option<usize>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Run a command in a container of a pod: `edge-rt exec POD -- CMD ARGS`.
    Exec {
        pod: String,
        #[arg(short, long)]
        container: Option<String>,
        /// Pass stdin to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        /// Run it on a terminal (with -i: an interactive shell).
        #[arg(short, long)]
        tty: bool,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// CPU and memory of the node or its pods, as `kubectl top` shows
    /// them (measured twice a second apart, for the CPU rate).
    Top {
        /// node, or pods.
        #[arg(value_parser = ["node", "nodes", "no", "pod", "pods", "po"])]
        kind: String,
        #[arg(short, long, value_enum, default_value = "table")]
        output: PodsOutput,
        #[arg(short, long, default_value = "default")]
        namespace: String,
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Remove what edge-rt made here: every pod and container (killed),
    /// the pod network, the node store, the link identity (join again
    /// after), pods' volumes and logs. Asks first; edge-rt must be stopped.
    Reset {
        /// Do not ask.
        #[arg(short, long)]
        force: bool,
        /// Remove the images too.
        #[arg(long)]
        images: bool,
    },
    /// Which kernel options edge-rt needs are missing, by feature: of
    /// FILE (a kernel .config or fragment, gzipped or not), else of the
    /// running kernel (/proc/config.gz or /boot/config-RELEASE). Exits 1
    /// if a required one is.
    CheckKernel { file: Option<PathBuf> },
    /// A summary of the node: pods, containers, images, edge-rt itself.
    Status {
        #[arg(short, long, value_enum, default_value = "table")]
        output: PodsOutput,
    },
    /// Commit Pods, ConfigMaps and Secrets to this node's store, as the
    /// node's own objects: they run offline and survive reboots.
    Apply {
        /// A YAML or JSON file (several documents allowed); - for stdin.
        #[arg(short, long)]
        filename: PathBuf,
    },
    /// Remove an object `edge-rt apply` stored: `edge-rt delete pod NAME`.
    Delete {
        kind: String,
        name: String,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Join a cloud: trust cloud-gw by the token's CA pin, get a node
    /// certificate, write the link settings (`<data_dir>/link/`).
    Join {
        /// cloud-gw's address: wss://HOST:PORT
        #[arg(long)]
        server: String,
        /// From `cloud-gw token create`.
        #[arg(long, env = "EDGE_RT_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Default: this machine's hostname.
        #[arg(long)]
        node_name: Option<String>,
        /// Labels for the node: k=v,k2=v2
        #[arg(long, value_delimiter = ',')]
        labels: Vec<String>,
    },
    /// Inspect the node store (reads the database; no daemon needed).
    #[command(subcommand)]
    Store(StoreCmd),
    /// Benchmarks (see the README).
    #[command(subcommand)]
    Bench(edge_rt::bench::BenchCmd),
}

#[derive(Subcommand)]
enum StoreCmd {
    /// Counts, sizes, sync cursors, outbox depth and the oldest unsent report.
    Stats {
        #[arg(short, long, value_enum, default_value = "table")]
        output: PodsOutput,
    },
    /// Every stored object of a kind (pods, configmaps, secrets) or the
    /// outbox. Secret values are redacted unless --show-secrets.
    Dump {
        kind: String,
        #[arg(short, long, value_enum, default_value = "yaml")]
        output: PodsOutput,
        #[arg(long)]
        show_secrets: bool,
    },
    /// An endless write load on a store (for the crash test): prints each
    /// commit after it returns. Never point it at a node's real store.
    #[command(hide = true)]
    Churn {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Stop after this many rounds (default: run until killed).
        #[arg(long)]
        rounds: Option<u64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum PodsOutput {
    Table,
    Json,
    Yaml,
}

fn print_as<T: serde::Serialize>(v: &T, output: PodsOutput) -> Result<()> {
    match output {
        PodsOutput::Yaml => print!("{}", serde_yaml_ng::to_string(v)?),
        _ => println!("{}", serde_json::to_string_pretty(v)?),
    }
    Ok(())
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Set desired values at the node. They are written at once and kept
    /// in the store; the cluster's Device takes them when the link is up,
    /// unless its desired value was changed there in the meantime (then
    /// the cluster's wins and is written).
    Set {
        name: String,
        /// PROPERTY=VALUE, one or more (all are checked before any is set).
        #[arg(required = true, value_parser = property_value)]
        values: Vec<(String, String)>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Drop values set at the node, so the spec's desired values hold
    /// again.
    Reset {
        name: String,
        #[arg(required = true)]
        properties: Vec<String>,
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
}

fn property_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((p, v)) if !p.trim().is_empty() => Ok((p.trim().to_string(), v.trim().to_string())),
        _ => Err(format!("{s:?} is not PROPERTY=VALUE")),
    }
}

#[derive(Subcommand)]
enum ImagesCmd {
    /// List images in the store.
    #[command(alias = "ls")]
    List {
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Pull an image from a registry.
    Pull {
        reference: String,
        #[arg(long)]
        username: Option<String>,
        /// Read the password from standard input.
        #[arg(long, requires = "username")]
        password_stdin: bool,
        /// A docker config JSON (the `.dockerconfigjson` of a pull secret).
        #[arg(long, conflicts_with = "username")]
        docker_config: Option<PathBuf>,
    },
    /// Import an OCI layout directory, or an OCI or docker archive tarball.
    Import {
        path: PathBuf,
        /// Name for the image (when the source holds one).
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove images.
    #[command(alias = "rm")]
    Remove { references: Vec<String> },
    /// Collect garbage down to the budget.
    Gc {
        /// Budget in bytes (default: the configured one).
        #[arg(long)]
        budget: Option<u64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,libcgroups=error,libcontainer=error")
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_tracing();
    // The broker runs threads of its own: it never shares the process
    // with the runtime (see devices::broker), so it starts before one.
    if let Cmd::Broker {
        listen,
        users_file,
        user,
        password_file,
    } = &cli.cmd
    {
        let s = edge_rt::devices::broker::settings(
            listen.clone(),
            users_file.as_deref(),
            user.as_deref().zip(password_file.as_deref()),
        )?;
        outrigger_devices::broker::serve(&s)?;
        return Ok(());
    }
    // One thread: libcontainer clones the process to create containers, and a
    // single-threaded runtime means no other thread of ours is mid-allocation
    // when it does (see sys::fork_guard).
    let rt = edge_rt::sys::runtime()?;
    rt.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> Result<()> {
    let cfg = Config::load(&cli.config)?;
    match cli.cmd {
        Cmd::Run => edge_rt::daemon::run(cli.config).await,
        // Served in main, before the runtime starts.
        Cmd::Broker { .. } => Ok(()),
        Cmd::Images(c) => images(&cfg, c).await,
        Cmd::Ps { output } => {
            let records = runtime::load_records(&cfg.runtime.state_dir);
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&records)?),
                Output::Table => {
                    println!(
                        "{:<32} {:<20} {:<16} {:<8} {:<24}",
                        "ID", "POD", "CONTAINER", "PID", "STATUS"
                    );
                    for r in records {
                        let status = match &r.exit {
                            Some(e) => format!("Exited ({}) {}", e.exit_code, e.reason),
                            None => "Running".into(),
                        };
                        println!(
                            "{:<32} {:<20} {:<16} {:<8} {:<24}",
                            r.id,
                            r.pod.name,
                            r.name,
                            r.pid.map(|p| p.to_string()).unwrap_or_default(),
                            status
                        );
                    }
                }
            }
            Ok(())
        }
        Cmd::Bench(b) => edge_rt::bench::run(&cfg, b).await,
        Cmd::Apply { filename } => {
            let text = if filename.as_os_str() == "-" {
                let mut t = String::new();
                std::io::stdin().read_to_string(&mut t)?;
                t
            } else {
                std::fs::read_to_string(&filename)
                    .with_context(|| format!("reading {}", filename.display()))?
            };
            let mut objects = Vec::new();
            for doc in serde_yaml_ng::Deserializer::from_str(&text) {
                use serde::Deserialize;
                let v = serde_json::Value::deserialize(doc)
                    .with_context(|| format!("{}", filename.display()))?;
                if !v.is_null() {
                    objects.push(v);
                }
            }
            // Every document checked here first, so a bad one applies none.
            for (i, v) in objects.iter().enumerate() {
                let yaml = serde_yaml_ng::to_value(v)?;
                if let Err(e) = edge_rt::static_pods::parse(yaml) {
                    anyhow::bail!("{} (document {}): {e}", filename.display(), i + 1);
                }
            }
            // Then a few at a time, as kubectl applies object by object:
            // the daemon never holds a large file's worth at once.
            let sock = api::socket_path(&cfg);
            for chunk in objects.chunks(APPLY_CHUNK) {
                let req = Request::Apply {
                    objects: chunk.to_vec(),
                };
                let (v, _) = api::call(&sock, &req).await?;
                for line in v.as_array().into_iter().flatten() {
                    println!("{}", line.as_str().unwrap_or_default());
                }
            }
            Ok(())
        }
        Cmd::Device(c) => {
            let req = match c {
                DeviceCmd::Set {
                    name,
                    values,
                    namespace,
                } => Request::SetDesired {
                    namespace,
                    name,
                    values: values.into_iter().map(|(p, v)| (p, Some(v))).collect(),
                },
                DeviceCmd::Reset {
                    name,
                    properties,
                    namespace,
                } => Request::SetDesired {
                    namespace,
                    name,
                    values: properties.into_iter().map(|p| (p, None)).collect(),
                },
            };
            let (v, _) = api::call(&api::socket_path(&cfg), &req).await?;
            let said: Vec<String> = serde_json::from_value(v)?;
            for s in said {
                println!("{s}");
            }
            Ok(())
        }
        Cmd::Delete {
            kind,
            name,
            namespace,
        } => {
            let req = Request::Delete {
                kind,
                namespace,
                name,
            };
            let (v, _) = api::call(&api::socket_path(&cfg), &req).await?;
            println!("{}", v.as_str().unwrap_or_default());
            Ok(())
        }
        Cmd::Store(c) => store_cmd(&cfg, c),
        Cmd::Join {
            server,
            token,
            node_name,
            labels,
        } => {
            let token = outrigger_proto::token::JoinToken::parse(&token)?;
            let node = match node_name {
                Some(n) => n,
                None => nix::unistd::gethostname()?.to_string_lossy().to_lowercase(),
            };
            let mut map = std::collections::BTreeMap::new();
            for l in labels.iter().filter(|l| !l.is_empty()) {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("label {l:?}: expected key=value"))?;
                map.insert(k.to_string(), v.to_string());
            }
            let cfg = edge_rt::link::join::join(&cfg.node.data_dir, &server, &token, &node, map)
                .await
                .context("join failed")?;
            println!(
                "node {} joined {}; restart edge-rt (or start it) to connect",
                cfg.node, cfg.server
            );
            Ok(())
        }
        Cmd::Pods {
            output,
            namespace,
            all_namespaces,
        } => {
            let (v, _) = api::call(&api::socket_path(&cfg), &Request::Pods).await?;
            let mut pods: Vec<k8s_openapi::api::core::v1::Pod> = serde_json::from_value(v)?;
            if !all_namespaces {
                pods.retain(|p| edge_rt::pods::namespace(p) == namespace);
            }
            match output {
                PodsOutput::Table if pods.is_empty() && all_namespaces => {
                    eprintln!("No resources found")
                }
                PodsOutput::Table if pods.is_empty() => {
                    eprintln!("No resources found in {namespace} namespace.")
                }
                PodsOutput::Table => print!("{}", edge_rt::cli::pods_table(&pods, all_namespaces)),
                // A list as kubectl prints one, so scripts can share jq filters.
                o => print_as(
                    &serde_json::json!({"apiVersion": "v1", "kind": "List", "items": pods}),
                    o,
                )?,
            }
            Ok(())
        }
        Cmd::Devices {
            output,
            namespace,
            all_namespaces,
        } => {
            let (v, _) = api::call(&api::socket_path(&cfg), &Request::Devices).await?;
            let mut devices: Vec<edge_rt::devices::DeviceView> = serde_json::from_value(v)?;
            if !all_namespaces {
                devices.retain(|d| d.namespace == namespace);
            }
            match output {
                PodsOutput::Table if devices.is_empty() => eprintln!("No resources found"),
                PodsOutput::Table => {
                    print!("{}", edge_rt::cli::devices_table(&devices, all_namespaces))
                }
                o => print_as(&serde_json::to_value(&devices)?, o)?,
            }
            Ok(())
        }
        Cmd::Describe {
            kind,
            name,
            namespace,
        } if kind.starts_with("dev") => {
            let (v, _) = api::call(&api::socket_path(&cfg), &Request::Devices).await?;
            let devices: Vec<edge_rt::devices::DeviceView> = serde_json::from_value(v)?;
            let d = devices
                .iter()
                .find(|d| d.name == name && d.namespace == namespace)
                .with_context(|| format!("no device {namespace}/{name} on this node"))?;
            print!("{}", edge_rt::cli::describe_device(d));
            Ok(())
        }
        Cmd::Describe {
            kind: _,
            name,
            namespace,
        } => {
            let (v, _) =
                api::call(&api::socket_path(&cfg), &Request::Pod { namespace, name }).await?;
            let d: api::PodDetail = serde_json::from_value(v)?;
            print!("{}", edge_rt::cli::describe(&d));
            Ok(())
        }
        Cmd::Logs {
            pod,
            container,
            follow,
            previous,
            tail,
            namespace,
        } => {
            let req = Request::Logs {
                namespace,
                name: pod,
                container,
                previous,
                follow,
                tail,
            };
            let (_, mut rest) = api::call(&api::socket_path(&cfg), &req).await?;
            let mut out = tokio::io::stdout();
            tokio::io::copy(&mut rest, &mut out).await?;
            Ok(())
        }
        Cmd::Exec {
            pod,
            container,
            stdin,
            tty,
            namespace,
            command,
        } => {
            let req = Request::Exec {
                namespace,
                name: pod,
                container,
                command,
                stdin,
                tty,
            };
            let code = api::exec::client(&api::socket_path(&cfg), &req, stdin, tty).await?;
            std::process::exit(code);
        }
        Cmd::Top {
            kind,
            output,
            namespace,
            all_namespaces,
        } => {
            let sock = api::socket_path(&cfg);
            api::call(&sock, &Request::Stats).await?;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            let (v, _) = api::call(&sock, &Request::Stats).await?;
            let mut s: outrigger_proto::stats::Summary = serde_json::from_value(v)?;
            if !all_namespaces {
                s.pods.retain(|p| p.pod_ref.namespace == namespace);
            }
            let pods = kind.starts_with('p');
            match output {
                PodsOutput::Table if pods && s.pods.is_empty() => eprintln!("No resources found"),
                PodsOutput::Table => {
                    print!("{}", edge_rt::cli::top_table(&s, pods, all_namespaces))
                }
                o => print_as(&serde_json::to_value(&s)?, o)?,
            }
            Ok(())
        }
        Cmd::Reset { force, images } => {
            if !force && !edge_rt::reset::confirm(&cfg, images)? {
                eprintln!("nothing removed");
                std::process::exit(1);
            }
            edge_rt::reset::reset(&cfg, images).await?;
            for p in edge_rt::reset::plan(&cfg, images) {
                println!("removed {p}");
            }
            Ok(())
        }
        Cmd::CheckKernel { file } => {
            use edge_rt::check_kernel as ck;
            let path = match file {
                Some(p) => p,
                None => ck::running_config().context(
                    "the running kernel's configuration is not at /proc/config.gz (CONFIG_IKCONFIG_PROC) nor /boot/config-RELEASE: give a file",
                )?,
            };
            let cfg = ck::read(&path).with_context(|| format!("reading {}", path.display()))?;
            anyhow::ensure!(
                !cfg.is_empty(),
                "{}: no CONFIG_ lines (not a kernel configuration)",
                path.display()
            );
            let (text, ok) = ck::report(&path.display().to_string(), &ck::check(&cfg));
            print!("{text}");
            if !ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Status { output } => {
            let (v, _) = api::call(&api::socket_path(&cfg), &Request::Status).await?;
            let s: api::NodeStatus = serde_json::from_value(v)?;
            match output {
                PodsOutput::Table => print!("{}", edge_rt::cli::status_text(&s)),
                o => print_as(&s, o)?,
            }
            Ok(())
        }
    }
}

fn store_cmd(cfg: &Config, cmd: StoreCmd) -> Result<()> {
    use edge_rt::store::Store;
    let path = cfg.store.db_path(&cfg.node.data_dir);
    let key = cfg.store.key_path(&cfg.node.data_dir);
    match cmd {
        StoreCmd::Stats { output } => {
            let s = Store::open_read_only(&path, None)?.stats()?;
            match output {
                PodsOutput::Table => print!("{}", edge_rt::cli::store_stats_text(&s)),
                o => print_as(&s, o)?,
            }
        }
        StoreCmd::Dump {
            kind,
            output,
            show_secrets,
        } => {
            // Without the key (not root), Secrets show as sealed.
            let key = edge_rt::store::crypt::Key::load(&key)
                .is_ok()
                .then_some(key.as_path());
            let store = Store::open_read_only(&path, key)?;
            let items: Vec<serde_json::Value> = if kind == "outbox" {
                store
                    .pending(0, usize::MAX >> 1)?
                    .into_iter()
                    .map(|r| serde_json::to_value(r).unwrap_or_default())
                    .collect()
            } else {
                let kind = edge_rt::store::parse_kind(&kind)?;
                store
                    .objects(kind)?
                    .into_iter()
                    .map(|mut o| {
                        if kind.sealed() && !show_secrets {
                            edge_rt::cli::redact_secret(&mut o.body);
                        }
                        serde_json::to_value(o).unwrap_or_default()
                    })
                    .collect()
            };
            print_as(&items, output)?;
        }
        StoreCmd::Churn { seed, rounds } => {
            let store = Store::open(&cfg.store, &cfg.node.data_dir)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            edge_rt::store::churn::run(&store, seed, rounds, &mut out)?;
        }
    }
    Ok(())
}

async fn images(cfg: &Config, cmd: ImagesCmd) -> Result<()> {
    let store = ImageStore::open(cfg.image_dir())?;
    let in_use = || runtime::in_use_by(&runtime::load_records(&cfg.runtime.state_dir));
    match cmd {
        ImagesCmd::List { output } => {
            let list = store.list()?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&list)?),
                Output::Table => {
                    println!("{:<56} {:<19} {:>10}  KIND", "IMAGE", "DIGEST", "SIZE");
                    for i in list {
                        // Artifacts (models) are mounted as volumes, never run.
                        let kind = if i.artifact.is_some() {
                            "artifact"
                        } else {
                            "image"
                        };
                        let names = if i.names.is_empty() {
                            vec!["<none>".to_string()]
                        } else {
                            i.names.clone()
                        };
                        for n in names {
                            println!(
                                "{:<56} {:<19} {:>10}  {kind}",
                                n,
                                &i.digest[..19.min(i.digest.len())],
                                human(i.size())
                            );
                        }
                    }
                }
            }
        }
        ImagesCmd::Pull {
            reference,
            username,
            password_stdin,
            docker_config,
        } => {
            let creds = match (username, docker_config) {
                (Some(u), _) => {
                    let mut p = String::new();
                    if password_stdin {
                        std::io::stdin().read_to_string(&mut p)?;
                    }
                    Some(Credentials {
                        username: u,
                        password: p.trim_end_matches('\n').to_string(),
                    })
                }
                (None, Some(f)) => {
                    let json =
                        std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
                    let r = edge_rt::image::ImageRef::parse(&reference)?.to_client();
                    auth::credentials_for(&json, r.resolve_registry())?
                }
                _ => None,
            };
            let puller = Puller::new(&cfg.registry)?;
            let progress = Arc::new(Progress::default());
            let p2 = progress.clone();
            let ticker = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let (d, t) = p2.snapshot();
                    if t > 0 {
                        eprint!("\r{} / {}   ", human(d), human(t));
                    }
                }
            });
            let r = puller
                .pull(&store, &reference, creds.as_ref(), &progress)
                .await;
            ticker.abort();
            eprintln!();
            let r = r?;
            println!("{} {}", r.names.join(","), r.digest);
        }
        ImagesCmd::Import { path, name } => {
            for r in archive::import(&store, &path, name.as_deref())? {
                println!("{} {}", r.names.join(","), r.digest);
            }
        }
        ImagesCmd::Remove { references } => {
            if references.is_empty() {
                bail!("name at least one image");
            }
            let u = in_use();
            for r in references {
                let rec = store.remove(&r, &u)?;
                println!("removed {} {}", rec.names.join(","), rec.digest);
            }
        }
        ImagesCmd::Gc { budget } => {
            let r = store.gc(budget.unwrap_or(cfg.images.budget_bytes), &in_use())?;
            println!(
                "removed {} image(s), {} layer(s); {} -> {}",
                r.images_removed.len(),
                r.layers_removed,
                human(r.bytes_before),
                human(r.bytes_after)
            );
        }
    }
    Ok(())
}
