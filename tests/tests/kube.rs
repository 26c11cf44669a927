//! Edge nodes as Kubernetes Nodes, driven with kubectl against a real
//! control plane (kube-apiserver, controller-manager and scheduler v1.36,
//! `outrigger_tests::k8s`): real cloud-gw (`run`), real edge-rt running real
//! containers, and the cluster's own scheduler and controllers doing their
//! jobs. `$OUTRIGGER_KUBECONFIG` runs the same against a cluster of yours.
//!
//! Each test owns a namespace and its edge nodes (labelled with the
//! namespace, in a zone of their own), selects only those, and removes
//! them when it ends, so the tests share one control plane.

use std::process::Output;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use outrigger_tests::cloud::*;
use outrigger_tests::k8s::{unique, Cluster, Scope};
use outrigger_tests::util::*;
use serde_json::Value;

/// The label every node of a test carries (its namespace's name).
const SCOPE_LABEL: &str = "outrigger.io/test-scope";

/// An edge: its node directory and its running edge-rt (dropped first, so
/// that it does not restart the containers the node's drop kills).
struct Edge {
    daemon: Option<Daemon>,
    node: Node,
    name: String,
}

/// A cluster, a namespace and nodes of the test's own, cloud-gw bridging
/// to it, and edges joined and running. Dropped in this order: edges,
/// cloud-gw, the namespace and nodes in the cluster, the cluster.
struct Setup {
    edges: Vec<Edge>,
    /// TOML appended to every edge's configuration.
    node_config: String,
    cloud: Cloud,
    scope: Scope,
    _cluster: Cluster,
}

#[derive(Default)]
struct Opts<'a> {
    /// Labels for every edge (`k=v,...`), besides the test's own.
    labels: &'a str,
    edges: usize,
    /// Register cloud-gw's webhook for this test's namespace.
    webhook: bool,
    /// More arguments for `cloud-gw run`.
    cloud_args: &'a [&'a str],
    /// TOML appended to every edge's configuration.
    node_config: &'a str,
    /// Where cloud-gw listens (default 127.0.0.1).
    cloud_addr: Option<&'a str>,
    /// Network namespaces the edges run in, one per edge, in order.
    netns: &'a [&'a str],
}

impl Setup {
    async fn new(o: Opts<'_>) -> Result<Setup> {
        let cluster = Cluster::get()?;
        let scope = Scope::new(&cluster, "kube")?;
        let mut args: Vec<String> = o.cloud_args.iter().map(|a| a.to_string()).collect();
        let mut webhook = None;
        if o.webhook {
            let (name, addr) = register_webhook(&scope)?;
            args.extend(["--webhook-config".to_string(), name]);
            webhook = Some(addr);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let cloud = Cloud::start_kube_at(
            cluster.kubeconfig(),
            o.cloud_addr.unwrap_or("127.0.0.1"),
            &args,
            webhook,
        )
        .await?;
        let mut s = Setup {
            edges: Vec::new(),
            node_config: o.node_config.to_string(),
            cloud,
            scope,
            _cluster: cluster,
        };
        for i in 0..o.edges.max(1) {
            let server = s.cloud.server.clone();
            s.add_edge_in(o.labels, &server, o.netns.get(i).copied())
                .await?;
        }
        Ok(s)
    }

    /// A setup whose Nodes are Ready (and connected).
    async fn ready(o: Opts<'_>) -> Result<Setup> {
        let s = Setup::new(o).await?;
        for e in &s.edges {
            s.ready_node(&e.name).await?;
        }
        Ok(s)
    }

    /// One more edge, joined and running, labelled as this test's, linked
    /// to cloud-gw at `server`.
    async fn add_edge_via(&mut self, labels: &str, server: &str) -> Result<()> {
        self.add_edge_in(labels, server, None).await
    }

    /// The same, its edge-rt in network namespace `netns`.
    async fn add_edge_in(&mut self, labels: &str, server: &str, netns: Option<&str>) -> Result<()> {
        let name = unique("edge");
        self.scope.owns("node", &name);
        let ns = &self.scope.namespace;
        let mut all = format!("{SCOPE_LABEL}={ns},topology.kubernetes.io/zone={ns}");
        if !labels.is_empty() {
            all = format!("{all},{labels}");
        }
        let node = Node::new()?;
        let o = join_with(
            &node,
            server,
            &self.cloud.token("10m")?,
            &name,
            &["--labels", &all],
        )?;
        ensure!(o.status.success(), "join: {}", stderr(&o));
        if !self.node_config.is_empty() {
            let mut cfg = std::fs::read_to_string(&node.config)?;
            if self.node_config.contains("[network]") {
                cfg = cfg.replace("[network]\nenabled = false\n", "");
            }
            cfg.push_str(&format!("\n{}\n", self.node_config));
            std::fs::write(&node.config, cfg)?;
        }
        let daemon = node.start_in(netns).await?;
        self.edges.push(Edge {
            daemon: Some(daemon),
            node,
            name,
        });
        Ok(())
    }

    fn edge(&self) -> &Edge {
        &self.edges[0]
    }

    fn node(&self) -> &Node {
        &self.edge().node
    }

    fn name(&self) -> &str {
        &self.edge().name
    }

    fn ns(&self) -> &str {
        &self.scope.namespace
    }

    fn kubeconfig(&self) -> &std::path::Path {
        self._cluster.kubeconfig()
    }

    /// kubectl in the test's namespace.
    fn kubectl(&self, args: &[&str]) -> Result<Output> {
        Ok(self.scope.kubectl().args(args).output()?)
    }

    /// kubectl that must succeed; its stdout.
    fn kc(&self, args: &[&str]) -> Result<String> {
        let o = self.kubectl(args)?;
        ensure!(
            o.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(text(&o))
    }

    fn apply(&self, yaml: &str) -> Result<String> {
        kubectl_stdin(self.scope.kubectl(), &["apply", "-f", "-"], yaml)
    }

    fn get_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        Ok(serde_json::from_str(&self.kc(&a)?)?)
    }

    fn logs(&self) -> String {
        let mut out = format!("cloud-gw:\n{}\n", self.cloud.log());
        for e in &self.edges {
            out.push_str(&format!("edge-rt {}:\n{}\n", e.name, e.node.daemon_log()));
        }
        out
    }

    /// Wait (30 s) until the Node is Ready.
    async fn ready_node(&self, name: &str) -> Result<Value> {
        wait_for("the Node to be Ready", Duration::from_secs(30), || async {
            let n = self.get_json(&["node", name]).ok()?;
            let up = |t| condition(&n, t).is_some_and(|c| c["status"] == "True");
            (up("Ready") && up("CloudConnected")).then_some(n)
        })
        .await
        .with_context(|| self.logs())
    }

    async fn pod_ready(&self, pod: &str) -> Result<()> {
        let o = self.kubectl(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=60s",
        ])?;
        ensure!(
            o.status.success(),
            "kubectl wait {pod}: {}\n{}",
            String::from_utf8_lossy(&o.stderr),
            self.logs()
        );
        Ok(())
    }

    /// `edge-rt exec` in a pod of the test's namespace on the first edge.
    fn exec(&self, pod: &str, cmd: &[&str]) -> Result<String> {
        exec_on(self.node(), self.ns(), pod, cmd)
    }

    async fn cleanup(mut self) -> Result<()> {
        for e in &mut self.edges {
            e.daemon.take();
            e.node.cleanup().await?;
        }
        Ok(())
    }
}

fn exec_on(node: &Node, ns: &str, pod: &str, cmd: &[&str]) -> Result<String> {
    let mut a = vec!["exec", "-n", ns, pod, "--"];
    a.extend_from_slice(cmd);
    let o = node.cli(&a)?;
    ensure!(o.status.success(), "exec {cmd:?}: {}", stderr(&o));
    Ok(text(&o))
}

fn kubectl_stdin(mut cmd: std::process::Command, args: &[&str], input: &str) -> Result<String> {
    cmd.args(args);
    with_stdin(cmd, input).with_context(|| format!("kubectl {args:?}"))
}

fn condition<'a>(obj: &'a Value, kind: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

/// cloud-gw's webhook, as `cloud-gw manifests` registers it but reached by
/// URL (cloud-gw runs beside the cluster here) and for this namespace only,
/// registered without a caBundle (cloud-gw writes its CA in at start). The
/// configuration's name and the address cloud-gw must listen on.
fn register_webhook(scope: &Scope) -> Result<(String, std::net::SocketAddr)> {
    let name = unique("outrigger-cloud-gw");
    let addr: std::net::SocketAddr =
        format!("127.0.0.1:{}", outrigger_tests::registry::free_port()?).parse()?;
    scope.owns("mutatingwebhookconfiguration", &name);
    let yaml = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{name: {name}}}
webhooks:
- name: edge-autonomy.outrigger.io
  clientConfig: {{url: "https://{addr}/mutate-pods"}}
  rules: [{{operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods]}}]
  namespaceSelector:
    matchLabels: {{kubernetes.io/metadata.name: {ns}}}
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 5
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingWebhookConfiguration
metadata: {{name: {name}}}
webhooks:
- name: devices.outrigger.io
  clientConfig: {{url: "https://{addr}/validate-devices"}}
  rules: [{{operations: [CREATE, UPDATE], apiGroups: [devices.outrigger.io], apiVersions: [v1alpha1], resources: [devices]}}]
  namespaceSelector:
    matchLabels: {{kubernetes.io/metadata.name: {ns}}}
  failurePolicy: Fail
  sideEffects: None
  admissionReviewVersions: [v1]
  timeoutSeconds: 5
"#,
        ns = scope.namespace
    );
    scope.owns("validatingwebhookconfiguration", &name);
    kubectl_stdin(scope.kubectl(), &["apply", "-f", "-"], &yaml)?;
    Ok((name, addr))
}

#[tokio::test]
async fn an_edge_that_joins_is_a_ready_node_with_its_labels_capacity_and_lease() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::new(Opts {
        labels: "site=plant-7,line=2",
        ..Default::default()
    })
    .await?;
    let n = s.ready_node(s.name()).await?;
    let labels = &n["metadata"]["labels"];
    for (k, v) in [
        ("node-role.kubernetes.io/edge", ""),
        ("kubernetes.io/hostname", s.name()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("site", "plant-7"),
        ("line", "2"),
    ] {
        ensure!(labels[k] == v, "label {k}: {labels}");
    }
    let cap = &n["status"]["capacity"];
    let cpus = std::thread::available_parallelism()?.get().to_string();
    ensure!(cap["cpu"] == cpus.as_str(), "capacity: {cap}");
    ensure!(cap["pods"] == "110", "capacity: {cap}");
    ensure!(
        cap["memory"].as_str().is_some_and(|m| m.ends_with("Ki")),
        "capacity: {cap}"
    );
    ensure!(n["status"]["allocatable"] == *cap, "{}", n["status"]);
    let info = &n["status"]["nodeInfo"];
    ensure!(
        info["containerRuntimeVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("outrigger://")),
        "nodeInfo: {info}"
    );
    // The kubelet API the node speaks: the control plane's own minor
    // version here, inside any 1.36+ API server's skew.
    ensure!(info["kubeletVersion"] == "v1.36.0", "nodeInfo: {info}");
    let version: Value = serde_json::from_str(&s.kc(&["version", "-o", "json"])?)?;
    ensure!(
        version["serverVersion"]["minor"] == "36",
        "{}",
        version["serverVersion"]
    );
    ensure!(info["architecture"] == "amd64", "nodeInfo: {info}");
    // Addresses the API server can dial without a resolver.
    for a in n["status"]["addresses"].as_array().into_iter().flatten() {
        ensure!(
            a["address"]
                .as_str()
                .is_some_and(|x| x.parse::<std::net::IpAddr>().is_ok()),
            "a name among the addresses: {a}"
        );
    }
    // kubectl's own table: the node, Ready, its role.
    let table = s.kc(&["get", "nodes", "-l", &format!("{SCOPE_LABEL}={}", s.ns())])?;
    let row = table
        .lines()
        .find(|l| l.starts_with(s.name()))
        .with_context(|| table.clone())?;
    ensure!(row.contains(" Ready ") && row.contains("edge"), "{table}");
    // The Lease is renewed while connected (every 2 s in this suite), and
    // belongs to the Node (it goes with it).
    let lease = || -> Result<Value> {
        let l = s.get_json(&["lease", "-n", "kube-node-lease", s.name()])?;
        ensure!(l["spec"]["holderIdentity"] == s.name(), "{l}");
        Ok(l)
    };
    let first = lease()?;
    ensure!(
        first["metadata"]["ownerReferences"][0]["uid"] == n["metadata"]["uid"],
        "{}",
        first["metadata"]
    );
    let renewed_of = |l: &Value| l["spec"]["renewTime"].as_str().unwrap_or("").to_string();
    let before = renewed_of(&first);
    let renewed = wait_for(
        "the Lease to be renewed",
        Duration::from_secs(10),
        || async {
            lease()
                .ok()
                .map(|l| renewed_of(&l))
                .filter(|t| *t != before)
        },
    )
    .await?;
    ensure!(renewed > before, "{renewed} <= {before}");
    s.cleanup().await
}

fn app(name: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: {name}-cfg}}
data: {{greeting: hello}}
---
apiVersion: v1
kind: Secret
metadata: {{name: {name}-sec}}
stringData: {{token: s3cret}}
---
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: Never
    command: ["sh", "-c", "echo started; while true; do sleep 1; done"]
    env:
    - name: TOKEN
      valueFrom: {{secretKeyRef: {{name: {name}-sec, key: token}}}}
    volumeMounts: [{{name: cfg, mountPath: /cfg}}]
  volumes:
  - name: cfg
    configMap: {{name: {name}-cfg}}
"#
    )
}

#[tokio::test]
async fn a_pod_applied_with_kubectl_runs_on_the_edge_reports_back_and_is_deleted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts::default()).await?;
    let pod = unique("app");
    s.apply(&app(&pod, s.name()))?;
    s.pod_ready(&pod).await?;
    // What the edge reports, through the status subresource.
    let phase = s.kc(&["get", "pod", &pod, "-o", "jsonpath={.status.phase}"])?;
    ensure!(phase == "Running", "phase {phase:?}");
    let p = s.get_json(&["pod", &pod])?;
    let cs = &p["status"]["containerStatuses"][0];
    ensure!(
        cs["ready"] == true && cs["state"]["running"].is_object(),
        "{cs}"
    );
    ensure!(p["status"]["hostIP"].is_string(), "{}", p["status"]);
    // The container got the Secret and the ConfigMap.
    ensure!(s.exec(&pod, &["sh", "-c", "echo $TOKEN"])?.trim() == "s3cret");
    ensure!(s.exec(&pod, &["cat", "/cfg/greeting"])?.trim() == "hello");
    // Events as a kubelet's: kubectl describe shows them.
    let described = wait_for(
        "Started in kubectl describe",
        Duration::from_secs(10),
        || async {
            let d = s.kc(&["describe", "pod", &pod]).ok()?;
            d.contains("Started").then_some(d)
        },
    )
    .await?;
    ensure!(described.contains(s.name()), "{described}");
    // kubectl logs asks the node's kubelet endpoint (cloud-gw's, at an
    // IP address: the API server looks up no name on the way).
    let o = s.kubectl(&["logs", &pod, "--request-timeout=20s"])?;
    ensure!(
        o.status.success(),
        "kubectl logs: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // A ConfigMap update reaches the running container's volume.
    s.kc(&[
        "patch",
        "configmap",
        &format!("{pod}-cfg"),
        "--type=merge",
        "-p",
        r#"{"data":{"greeting":"bonjour"}}"#,
    ])?;
    wait_for(
        "the new ConfigMap in the volume",
        Duration::from_secs(20),
        || async {
            s.exec(&pod, &["cat", "/cfg/greeting"])
                .ok()
                .filter(|g| g.trim() == "bonjour")
        },
    )
    .await?;

    // kubectl delete: the edge stops the container, then the object goes.
    let o = s.kubectl(&["delete", "pod", &pod, "--timeout=60s"])?;
    ensure!(
        o.status.success(),
        "kubectl delete: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.logs()
    );
    let gone = s.kubectl(&["get", "pod", &pod])?;
    ensure!(!gone.status.success(), "the pod is still there");
    ensure!(
        find(&s.node().pods()?, &pod).is_none(),
        "the pod still runs on the edge"
    );
    ensure!(
        s.cloud.log().contains("deletion completed"),
        "{}",
        s.cloud.log()
    );
    s.cleanup().await
}

/// What the API server says of a token (TokenReview, as the admin).
fn review(s: &Setup, token: &str) -> Result<Value> {
    let yaml = format!(
        "apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec: {{token: {token:?}}}\n"
    );
    let out = kubectl_stdin(
        s.scope.kubectl(),
        &["create", "-f", "-", "-o", "json"],
        &yaml,
    )?;
    Ok(serde_json::from_str::<Value>(&out)?["status"].clone())
}

/// A plain Deployment (no special fields but a nodeSelector for edge
/// nodes) placed by the real scheduler, its pods made by the real
/// controllers: they run with the service account token every pod gets,
/// refreshed in place, and a rollout replaces them.
#[tokio::test]
async fn a_plain_deployment_runs_on_the_edge_with_its_service_account_token() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Tokens refreshed every few seconds here (a kubelet: at 80% of their
    // life, or after 24 h).
    let s = Setup::ready(Opts {
        cloud_args: &["--token-max-age", "4s"],
        ..Default::default()
    })
    .await?;
    let d = unique("web");
    let deployment = |version: &str| {
        format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {d}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: {d}}}}}
  template:
    metadata: {{labels: {{app: {d}}}}}
    spec:
      nodeSelector: {{node-role.kubernetes.io/edge: "", {SCOPE_LABEL}: {ns}}}
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: busybox:latest
        imagePullPolicy: Never
        env: [{{name: VERSION, value: "{version}"}}]
        command: ["sh", "-c", "while true; do sleep 1; done"]
"#,
            ns = s.ns()
        )
    };
    let rolled_out = || -> Result<Vec<String>> {
        let o = s.kubectl(&[
            "rollout",
            "status",
            &format!("deployment/{d}"),
            "--timeout=120s",
        ])?;
        ensure!(
            o.status.success(),
            "{}\n{}",
            String::from_utf8_lossy(&o.stderr),
            s.logs()
        );
        let names = s.kc(&[
            "get",
            "pods",
            "-l",
            &format!("app={d}"),
            "--field-selector=status.phase=Running",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        Ok(names.split_whitespace().map(str::to_string).collect())
    };
    s.apply(&deployment("1"))?;
    let first = rolled_out()?;
    ensure!(first.len() == 2, "{first:?}");
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    for p in &first {
        ensure!(s.exec(p, &["sh", "-c", "echo $VERSION"])?.trim() == "1");
        // The kube-api-access volume: token, the cluster's CA, namespace.
        ensure!(s.exec(p, &["cat", &format!("{sa}/namespace")])?.trim() == s.ns());
        let ca = s.exec(p, &["cat", &format!("{sa}/ca.crt")])?;
        ensure!(ca.contains("BEGIN CERTIFICATE"), "{ca}");
        let token = s.exec(p, &["cat", &format!("{sa}/token")])?;
        let r = review(&s, token.trim())?;
        ensure!(r["authenticated"] == true, "{r}");
        ensure!(
            r["user"]["username"] == format!("system:serviceaccount:{}:default", s.ns()).as_str(),
            "{r}"
        );
        ensure!(
            r["user"]["extra"]["authentication.kubernetes.io/pod-name"][0] == p.as_str(),
            "bound to another pod: {r}"
        );
    }
    // Refreshed in the running container, atomically, without a restart.
    let p = &first[0];
    let before = s.exec(p, &["cat", &format!("{sa}/token")])?;
    let after = wait_for("a refreshed token", Duration::from_secs(30), || async {
        s.exec(p, &["cat", &format!("{sa}/token")])
            .ok()
            .filter(|t| !t.is_empty() && *t != before)
    })
    .await
    .with_context(|| s.logs())?;
    ensure!(review(&s, after.trim())?["authenticated"] == true);
    ensure!(restarts(s.node(), p)? == 0, "{p} restarted");

    // The rollout: new template, new pods, old ones deleted.
    s.apply(&deployment("2"))?;
    let second: Vec<String> = rolled_out()?
        .into_iter()
        .filter(|p| !first.contains(p))
        .collect();
    ensure!(second.len() == 2, "{second:?}");
    for p in &second {
        s.pod_ready(p).await?;
        ensure!(s.exec(p, &["sh", "-c", "echo $VERSION"])?.trim() == "2");
    }
    wait_for(
        "the old pods gone, in the cluster and on the edge",
        Duration::from_secs(60),
        || async {
            let listed = s
                .kc(&["get", "pods", "-l", &format!("app={d}"), "-o", "name"])
                .ok()?;
            let on_edge = s.node().pods().ok()?;
            let old_left = first
                .iter()
                .any(|p| listed.contains(p.as_str()) || find(&on_edge, p).is_some());
            (!old_left).then_some(())
        },
    )
    .await?;
    s.kc(&["delete", "deployment", &d])?;
    s.cleanup().await
}

fn busybox_pod(name: &str, node: &str, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {name}}}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 2
{extra_spec}  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: Never
    command: ["sh", "-c", "while true; do sleep 1; done"]
"#
    )
}

/// A busybox pod that logs `line N` twice a second.
fn talking_pod(name: &str, node: &str) -> String {
    busybox_pod(name, node, "").replace(
        "while true; do sleep 1; done",
        "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.5; done",
    )
}

/// A cut of the link (TCP hangs): the Lease stops, pods keep running on the
/// edge untouched, and what changed in the cluster meanwhile (a ConfigMap,
/// a new pod, a pod deleted) applies once it is back.
#[tokio::test]
async fn through_a_cut_the_lease_stops_pods_run_on_and_changes_apply_after() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts::default()).await?;
    let a = unique("keep");
    let gone = unique("gone");
    s.apply(&app(&a, s.name()))?;
    s.apply(&busybox_pod(&gone, s.name(), ""))?;
    s.pod_ready(&a).await?;
    s.pod_ready(&gone).await?;
    let uid = s.kc(&["get", "pod", &a, "-o", "jsonpath={.metadata.uid}"])?;

    let mut cut = PortCut::cut(s.cloud.addr.port())?;
    wait_for(
        "the edge to see the link down",
        Duration::from_secs(20),
        || async {
            s.node()
                .daemon_log()
                .contains("link to cloud-gw down")
                .then_some(())
        },
    )
    .await?;
    s.cloud.logged("silent for two heartbeats").await?;
    // The Lease stops being renewed (every 2 s while connected).
    let renew = || -> Result<String> {
        let l = s.get_json(&["lease", "-n", "kube-node-lease", s.name()])?;
        Ok(l["spec"]["renewTime"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    };
    let before = renew()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    ensure!(renew()? == before, "the Lease was renewed during the cut");

    // Meanwhile in the cluster.
    s.kc(&[
        "patch",
        "configmap",
        &format!("{a}-cfg"),
        "--type=merge",
        "-p",
        r#"{"data":{"greeting":"offline"}}"#,
    ])?;
    let added = unique("added");
    s.apply(&busybox_pod(&added, s.name(), ""))?;
    s.kc(&["delete", "pod", &gone, "--wait=false"])?;
    // On the edge, nothing stops: the deleted pod too runs until the node
    // hears of it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for p in [&a, &gone] {
        let pods = s.node().pods()?;
        let pod = find(&pods, p).with_context(|| format!("{p} gone from the edge"))?;
        ensure!(phase(pod) == "Running", "{p}: {}", phase(pod));
    }
    // Past the node monitor grace period (20 s here) the node lifecycle
    // controller marks the cut node's pods not Ready.
    wait_for(
        "the cluster to mark the pod not Ready",
        Duration::from_secs(60),
        || async {
            let p = s.get_json(&["pod", &a]).ok()?;
            (condition(&p, "Ready")?["status"] == "False").then_some(())
        },
    )
    .await?;

    cut.restore()?;
    s.pod_ready(&added).await?;
    // Ready again as the node says it is, with no change on the node.
    s.pod_ready(&a).await?;
    wait_for(
        "the deleted pod stopped and removed",
        Duration::from_secs(60),
        || async {
            let in_cluster = s.kubectl(&["get", "pod", &gone]).ok()?.status.success();
            let on_edge = find(&s.node().pods().ok()?, &gone).is_some();
            (!in_cluster && !on_edge).then_some(())
        },
    )
    .await
    .with_context(|| s.logs())?;
    wait_for(
        "the ConfigMap changed during the cut",
        Duration::from_secs(30),
        || async {
            s.exec(&a, &["cat", "/cfg/greeting"])
                .ok()
                .filter(|g| g.trim() == "offline")
        },
    )
    .await?;
    // The pod that lived through the cut was never restarted or replaced.
    ensure!(restarts(s.node(), &a)? == 0, "{a} restarted");
    let uid_after = s.kc(&["get", "pod", &a, "-o", "jsonpath={.metadata.uid}"])?;
    ensure!(uid == uid_after, "{a} was replaced");
    s.ready_node(s.name()).await?;
    s.cleanup().await
}

/// The tolerations of a pod, by key: tolerationSeconds (None: unbounded).
fn toleration_seconds(pod: &Value, key: &str) -> Option<Option<i64>> {
    pod["spec"]["tolerations"]
        .as_array()?
        .iter()
        .find(|t| t["key"] == key && t["effect"] == "NoExecute")
        .map(|t| t["tolerationSeconds"].as_i64())
}

/// Pods for edge nodes, created through the real admission chain, get
/// unbounded unreachable/not-ready tolerations from cloud-gw's webhook in
/// place of whatever this cluster's defaults are (60 s here); a user's own
/// bound stays, and an opted-out pod keeps the cluster's default.
#[tokio::test]
async fn the_webhook_replaces_the_clusters_default_tolerations_on_edge_pods() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts {
        webhook: true,
        ..Default::default()
    })
    .await?;
    s.cloud
        .logged("link CA written into the webhook configuration")
        .await?;
    s.cloud.logged("the cluster's default tolerations").await?;
    const KEYS: [&str; 2] = [
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/not-ready",
    ];
    // What this cluster gives a pod that is not bound for the edge.
    let cloud_pod = unique("cloud");
    // (It selects no node at all: it stays Pending.)
    s.apply(
        &busybox_pod(
            &cloud_pod,
            "",
            "  nodeSelector: {outrigger.io/test-nowhere: \"\"}\n",
        )
        .replace("  nodeName: \n", ""),
    )?;
    let p = s.get_json(&["pod", &cloud_pod])?;
    // (60 s on the suites' own control plane, where the API server's own
    // default is 300 s: cloud-gw learned it.)
    let default = toleration_seconds(&p, KEYS[0]).flatten();
    let learned = default.map(|d| format!("unreachable=Some({d})"));
    ensure!(
        learned.is_some_and(|l| s.cloud.log().contains(&l)),
        "the cluster's default {default:?} is not what cloud-gw learned:\n{}",
        s.cloud.log()
    );
    // Bound for an edge node: unbounded.
    let edge = unique("tol");
    s.apply(&busybox_pod(&edge, s.name(), ""))?;
    let p = s.get_json(&["pod", &edge])?;
    for key in KEYS {
        ensure!(
            toleration_seconds(&p, key) == Some(None),
            "{key}: {}",
            p["spec"]["tolerations"]
        );
    }
    // A user's own bound is the user's.
    let own = unique("own");
    s.apply(&busybox_pod(
        &own,
        s.name(),
        "  tolerations:\n  - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 3600}\n",
    ))?;
    let p = s.get_json(&["pod", &own])?;
    ensure!(
        toleration_seconds(&p, KEYS[0]) == Some(Some(3600)),
        "{}",
        p["spec"]["tolerations"]
    );
    ensure!(toleration_seconds(&p, KEYS[1]) == Some(None));
    // Opted out: the cluster's default, then eviction.
    let out = unique("optout");
    s.apply(&busybox_pod(&out, s.name(), "").replace(
        "labels: {app:",
        "annotations: {outrigger.io/autonomy: disabled}, labels: {app:",
    ))?;
    let p = s.get_json(&["pod", &out])?;
    for key in KEYS {
        ensure!(
            toleration_seconds(&p, key) == Some(default),
            "{key}: {}",
            p["spec"]["tolerations"]
        );
    }
    // Metrics tell what went on.
    let metrics = http_get(s.cloud.http, "/metrics")?;
    ensure!(
        metrics.contains("outrigger_cloud_connected_nodes 1"),
        "{metrics}"
    );
    ensure!(http_get(s.cloud.http, "/readyz")?.contains("ok"));
    s.cleanup().await
}

/// Autonomy through a cut long enough for the real node lifecycle
/// controller to taint the node and evict what does not tolerate it: of two
/// edge nodes (one unhealthy node alone would put the controller in
/// disruption mode, tainting nothing), one is cut; its Deployment pod is
/// not evicted, not recreated elsewhere, and runs on in the same container,
/// not restarted when the link is back. An opted-out pod beside it is
/// evicted after the cluster's default toleration: the cut was long enough.
#[tokio::test]
async fn autonomy_holds_through_a_cut_that_gets_the_node_tainted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut s = Setup::new(Opts {
        webhook: true,
        ..Default::default()
    })
    .await?;
    // The second edge links through a relay: it alone is cut.
    let relay = Relay::start(s.cloud.addr)?;
    s.add_edge_via("", &relay.server()).await?;
    s.edges.swap(0, 1);
    for e in &s.edges {
        s.ready_node(&e.name).await?;
    }
    s.cloud.logged("the cluster's default tolerations").await?;
    let (cut_node, other) = (s.edges[0].name.clone(), s.edges[1].name.clone());
    // The Deployment may run on either node; it prefers the one cut.
    let d = unique("steady");
    s.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {d}}}
spec:
  replicas: 1
  selector: {{matchLabels: {{app: {d}}}}}
  template:
    metadata: {{labels: {{app: {d}}}}}
    spec:
      nodeSelector: {{{SCOPE_LABEL}: {ns}}}
      affinity:
        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
          - weight: 100
            preference: {{matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [{cut_node}]}}]}}
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: busybox:latest
        imagePullPolicy: Never
        command: ["sh", "-c", "while true; do sleep 1; done"]
"#,
        ns = s.ns()
    ))?;
    let out = unique("optout");
    s.apply(&busybox_pod(&out, &cut_node, "").replace(
        "labels: {app:",
        "annotations: {outrigger.io/autonomy: disabled}, labels: {app:",
    ))?;
    s.pod_ready(&out).await?;
    let default = toleration_seconds(
        &s.get_json(&["pod", &out])?,
        "node.kubernetes.io/unreachable",
    )
    .flatten()
    .context("the opted-out pod's default toleration")?;
    let o = s.kubectl(&[
        "rollout",
        "status",
        &format!("deployment/{d}"),
        "--timeout=60s",
    ])?;
    ensure!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pods = || -> Result<Vec<Value>> {
        let l = s.get_json(&["pods", "-l", &format!("app={d}")])?;
        Ok(l["items"].as_array().cloned().unwrap_or_default())
    };
    let before = pods()?;
    ensure!(before.len() == 1, "{before:?}");
    let pod = before[0]["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let uid = before[0]["metadata"]["uid"].clone();
    ensure!(
        before[0]["spec"]["nodeName"] == cut_node.as_str(),
        "{}",
        before[0]["spec"]
    );
    let container_of = |node: &Node| {
        node.records()
            .into_iter()
            .find(|r| r.name == "main" && r.pod.name == pod)
            .map(|r| r.id)
    };
    let container =
        container_of(&s.edges[0].node).context("the Deployment's container on the node")?;

    let mut cut = PortCut::cut(relay.port)?;
    // Unreachable: tainted by the node lifecycle controller.
    wait_for(
        "the cut node tainted unreachable",
        Duration::from_secs(120),
        || async {
            let n = s.get_json(&["node", &cut_node]).ok()?;
            n["spec"]["taints"]
                .as_array()?
                .iter()
                .any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute")
                .then_some(())
        },
    )
    .await
    .with_context(|| s.logs())?;
    // The opted-out pod goes once its toleration (the cluster's default,
    // 60 s here) is up; the Deployment's stays.
    wait_for(
        "the opted-out pod evicted",
        Duration::from_secs(default.max(0) as u64 + 90),
        || async {
            let p = s.get_json(&["pod", &out]).ok();
            p.is_none_or(|p| p["metadata"]["deletionTimestamp"].is_string())
                .then_some(())
        },
    )
    .await?;
    let during = pods()?;
    ensure!(
        during.len() == 1
            && during[0]["metadata"]["uid"] == uid
            && during[0]["metadata"]["deletionTimestamp"].is_null(),
        "the Deployment's pod was evicted or replaced: {during:?}"
    );
    let on_other = s.edges[1].node.pods()?;
    ensure!(
        !on_other.iter().any(|p| p
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.get("app") == Some(&d))),
        "recreated on {other}"
    );
    // On the cut node it runs on, untouched.
    let here = find(&s.edges[0].node.pods()?, &pod)
        .cloned()
        .context("gone from the cut node")?;
    ensure!(phase(&here) == "Running");

    cut.restore()?;
    s.ready_node(&cut_node).await?;
    wait_for("the taint gone", Duration::from_secs(60), || async {
        let n = s.get_json(&["node", &cut_node]).ok()?;
        (!n["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == "node.kubernetes.io/unreachable"))
        .then_some(())
    })
    .await?;
    let after = pods()?;
    ensure!(
        after.len() == 1 && after[0]["metadata"]["uid"] == uid,
        "{after:?}"
    );
    ensure!(restarts(&s.edges[0].node, &pod)? == 0, "{pod} restarted");
    let same = container_of(&s.edges[0].node);
    ensure!(
        same.as_ref() == Some(&container),
        "another container: {same:?}"
    );
    s.kc(&["delete", "deployment", &d])?;
    s.cleanup().await
}

/// A plain HTTP GET; the body.
fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr)?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    Ok(out)
}

/// A GET to cloud-gw's kubelet endpoint (HTTPS, no client certificate),
/// with a bearer token if given, sent; the connection to read from.
fn kubelet_request(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>> {
    use std::io::Write;
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut s = outrigger_tests::k8s::insecure_tls(tcp, addr)?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )?;
    Ok(s)
}

/// The kubelet port of the test's node, as its Node says.
fn kubelet_of(s: &Setup) -> Result<std::net::SocketAddr> {
    let n = s.get_json(&["node", s.name()])?;
    let st = &n["status"];
    let ip: std::net::IpAddr = st["addresses"][0]["address"]
        .as_str()
        .context("no address")?
        .parse()?;
    let port = st["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
        .context("no kubelet port")?;
    Ok(std::net::SocketAddr::new(ip, port))
}

/// The same, read to its end: status line, headers and body.
fn kubelet_get(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> Result<String> {
    use std::io::Read;
    let mut s = kubelet_request(addr, path, token)?;
    let mut raw = Vec::new();
    // Closed without close_notify or not, what came is the answer.
    let _ = s.read_to_end(&mut raw);
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

/// A cloud-gw counter or gauge, from its /metrics.
fn metric(cloud: &Cloud, name: &str) -> Option<u64> {
    http_get(cloud.http, "/metrics")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// kubectl logs of a pod on an edge node, as of any pod: the API server
/// calls the Node's kubelet endpoint (cloud-gw, at the address it wrote
/// into the Node), which takes the log from the node down a stream of its
/// link; tail, timestamps, limit and follow as the kubelet has them; a
/// caller the cluster does not let proxy to the node is refused.
#[tokio::test]
async fn kubectl_logs_of_an_edge_pod_come_through_the_link() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts::default()).await?;
    // The Node leads the API server to this cloud-gw.
    let n = s.get_json(&["node", s.name()])?;
    let kubelet = kubelet_of(&s)?;
    ensure!(
        n["status"]["addresses"][0]
            == serde_json::json!({"type": "Hostname", "address": s.cloud.kubelet.to_string()})
            && n["status"]["addresses"][1]
                == serde_json::json!({"type": "InternalIP", "address": s.cloud.kubelet.to_string()})
            && kubelet.port() != 0,
        "{}",
        n["status"]
    );
    let pod = unique("talk");
    s.apply(&talking_pod(&pod, s.name()))?;
    s.pod_ready(&pod).await?;
    // Six seconds of lines: --since=2s has only the last few.
    let all = wait_for(
        "twelve lines in kubectl logs",
        Duration::from_secs(30),
        || async {
            s.kc(&["logs", &pod])
                .ok()
                .filter(|l| l.contains("line 12\n"))
        },
    )
    .await
    .with_context(|| s.logs())?;
    ensure!(all.starts_with("line 1\nline 2\n"), "{all:?}");
    let tail = s.kc(&["logs", &pod, "--tail=2"])?;
    ensure!(tail.lines().count() == 2, "{tail:?}");
    let limited = s.kc(&["logs", &pod, "--limit-bytes=9"])?;
    ensure!(limited == "line 1\nli", "{limited:?}");
    let stamped = s.kc(&["logs", &pod, "--timestamps", "--tail=1"])?;
    let (time, rest) = stamped.split_once(' ').context("no timestamp")?;
    ensure!(
        time.len() >= 20 && time.as_bytes()[10] == b'T' && rest.starts_with("line "),
        "{stamped:?}"
    );
    let recent = s.kc(&["logs", &pod, "--since=2s"])?;
    ensure!(
        !recent.contains("line 1\n") && recent.lines().count() <= 6,
        "{recent:?}"
    );
    // Follow: lines written after kubectl started keep coming.
    let mut f = s
        .scope
        .kubectl()
        .args(["logs", "-f", "--tail=1", &pod])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let out = f.stdout.take().context("stdout")?;
    let followed = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(out)
            .lines()
            .take(4)
            .collect::<Result<Vec<_>, _>>()
    });
    let lines = tokio::time::timeout(Duration::from_secs(20), followed)
        .await
        .context("kubectl logs -f stalled")???;
    let _ = f.kill();
    let _ = f.wait();
    let nums: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
        .collect();
    ensure!(
        nums.len() == 4 && nums.windows(2).all(|w| w[1] == w[0] + 1),
        "{lines:?}"
    );
    // kubectl gone: cloud-gw ends the stream, and the edge its side.
    wait_for("no stream left open", Duration::from_secs(10), || async {
        (metric(&s.cloud, "outrigger_cloud_streams_open") == Some(0)).then_some(())
    })
    .await?;
    // What a kubelet answers for what it does not have.
    let o = s.kubectl(&["logs", &pod, "--previous"])?;
    ensure!(
        !o.status.success()
            && String::from_utf8_lossy(&o.stderr).contains("previous terminated container"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // After a restart, --previous is the attempt before.
    let crash = unique("crash");
    s.apply(&busybox_pod(&crash, s.name(), "").replace(
        "while true; do sleep 1; done",
        "echo started $(cat /proc/uptime); sleep 1; exit 1",
    ))?;
    wait_for("a restart", Duration::from_secs(60), || async {
        let n = s
            .kc(&[
                "get",
                "pod",
                &crash,
                "-o",
                "jsonpath={.status.containerStatuses[0].restartCount}",
            ])
            .ok()?;
        (n.trim().parse::<u32>().ok()? >= 1).then_some(())
    })
    .await
    .with_context(|| s.logs())?;
    let previous = wait_for(
        "the previous attempt's log",
        Duration::from_secs(20),
        || async {
            s.kc(&["logs", &crash, "--previous"])
                .ok()
                .filter(|l| l.starts_with("started "))
        },
    )
    .await?;
    let now = s.kc(&["logs", &crash])?;
    ensure!(previous != now, "--previous {previous:?}, now {now:?}");
    // Nobody else gets in: no credentials, or a token of an account the
    // cluster does not let proxy to nodes.
    let path = format!("/containerLogs/{}/{pod}/main", s.ns());
    let anon = kubelet_get(kubelet, &path, None)?;
    ensure!(anon.starts_with("HTTP/1.1 401"), "{anon}");
    let token = s.kc(&["create", "token", "default"])?;
    let denied = kubelet_get(kubelet, &path, Some(token.trim()))?;
    ensure!(
        denied.starts_with("HTTP/1.1 403") && denied.contains("subresource(s)=[proxy]"),
        "{denied}"
    );

    // The link cut under a followed log: the stream ends, kubectl logs says
    // the node is out of reach, the container runs on, and its log has the
    // lines of the cut once the link is back.
    let mut f = s
        .scope
        .kubectl()
        .args(["logs", "-f", "--tail=1", &pod])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let out = f.stdout.take().context("stdout")?;
    let drained = tokio::task::spawn_blocking(move || std::io::read_to_string(out));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut cut = PortCut::cut(s.cloud.addr.port())?;
    s.cloud.logged("silent for two heartbeats").await?;
    let ended = tokio::time::timeout(Duration::from_secs(20), drained).await;
    let _ = f.kill();
    let _ = f.wait();
    let followed = ended.context("kubectl logs -f went on through the cut")???;
    let o = s.kubectl(&["logs", &pod])?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !o.status.success() && err.contains("has no link"),
        "kubectl logs during the cut: {err}"
    );
    let last = |l: &str| -> u64 {
        l.lines()
            .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
            .max()
            .unwrap_or(0)
    };
    let before = last(&followed);
    tokio::time::sleep(Duration::from_secs(2)).await;
    cut.restore()?;
    s.ready_node(s.name()).await?;
    let after = wait_for(
        "kubectl logs after the cut",
        Duration::from_secs(30),
        || async { s.kc(&["logs", &pod]).ok() },
    )
    .await?;
    // Two lines a second through a cut of more than four.
    ensure!(last(&after) > before + 8, "{before} then {}", last(&after));
    ensure!(
        find(&s.node().pods()?, &pod).is_some_and(|p| phase(p) == "Running"),
        "the pod stopped"
    );
    s.cleanup().await
}

/// A reader that stops reading a 12 MB log holds one stream window of it
/// (and what the sockets buffer), not the log: the link's sync frames,
/// status rows and other streams go on meanwhile, and the whole log comes
/// once the reader reads again.
#[tokio::test]
async fn a_stalled_log_reader_holds_its_window_and_nothing_else() -> Result<()> {
    use std::io::Read;
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts::default()).await?;
    // A caller the cluster lets proxy to nodes, with a token of its own.
    s.kc(&["create", "serviceaccount", "reader"])?;
    let binding = format!("{}-reader", s.ns());
    s.scope.owns("clusterrolebinding", &binding);
    s.kc(&[
        "create",
        "clusterrolebinding",
        &binding,
        "--clusterrole=system:kubelet-api-admin",
        &format!("--serviceaccount={}:reader", s.ns()),
    ])?;
    let token = s.kc(&["create", "token", "reader"])?;
    const XS: usize = 12_000_000;
    let big = unique("big");
    s.apply(&busybox_pod(&big, s.name(), "").replace(
        "while true; do sleep 1; done",
        &format!("head -c {XS} /dev/zero | tr '\\\\0' x | fold -w 99; echo; echo END; sleep 3600"),
    ))?;
    let talk = unique("talk");
    s.apply(&talking_pod(&talk, s.name()))?;
    s.pod_ready(&big).await?;
    s.pod_ready(&talk).await?;
    let seen = std::sync::Mutex::new(String::new());
    wait_for("the whole log written", Duration::from_secs(60), || async {
        let o = s.kubectl(&["logs", &big, "--tail=1"]).ok()?;
        let t = format!("{}{}", text(&o), String::from_utf8_lossy(&o.stderr));
        *seen.lock().unwrap_or_else(|e| e.into_inner()) = t.clone();
        (t == "END\n").then_some(())
    })
    .await
    .with_context(|| {
        format!(
            "last seen: {:?}",
            seen.lock().unwrap_or_else(|e| e.into_inner())
        )
    })?;

    let before = metric(&s.cloud, "outrigger_cloud_stream_bytes_total").context("metric")?;
    let path = format!("/containerLogs/{}/{big}/main", s.ns());
    let mut stalled = kubelet_request(kubelet_of(&s)?, &path, Some(token.trim()))?;
    let mut head = vec![0u8; 1024];
    let n = stalled.read(&mut head)?;
    head.truncate(n);
    ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // Then it reads no more: what reaches cloud-gw comes to a stop.
    let mut last = u64::MAX;
    let held = wait_for(
        "the stalled stream to stop",
        Duration::from_secs(30),
        || {
            let now = metric(&s.cloud, "outrigger_cloud_stream_bytes_total")
                .unwrap_or(0)
                .saturating_sub(before);
            let still = now == last;
            last = now;
            async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                still.then_some(now)
            }
        },
    )
    .await?;
    // One window (256 KiB) plus what the sockets between cloud-gw and the
    // reader hold (Linux grows a send buffer up to tcp_wmem's 4 MiB): far
    // from the log's 12 MB, all of which would come up without credit.
    ensure!(
        held > 0 && (held as usize) < XS / 2,
        "{held} bytes of the log came up with nobody reading them"
    );
    // Meanwhile the same link carries everything else.
    let tail = s.kc(&["logs", &talk, "--tail=1"])?;
    ensure!(tail.starts_with("line "), "{tail:?}");
    let after = unique("after");
    s.apply(&busybox_pod(&after, s.name(), ""))?;
    s.pod_ready(&after).await?;
    // Reading again, the reader gets all of it.
    let rest = tokio::task::spawn_blocking(move || {
        let mut raw = Vec::new();
        let _ = stalled.read_to_end(&mut raw);
        raw
    })
    .await?;
    let mut all = head;
    all.extend_from_slice(&rest);
    let body_at = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let body = &all[body_at..];
    let xs = body.iter().filter(|b| **b == b'x').count();
    ensure!(
        xs == XS && String::from_utf8_lossy(body).contains("END\n"),
        "{xs} of {XS} bytes came"
    );
    s.cleanup().await
}

/// kubectl exec into a pod on an edge node, as into any pod: the Node
/// declares ExtendWebSocketsToKubelet, so the API server passes kubectl's
/// WebSocket (v5) on to cloud-gw, which runs the command on the node
/// through a stream of its link: stdout and stderr apart, stdin and its
/// end, a terminal with its size, the exit code carried to kubectl.
#[tokio::test]
async fn kubectl_exec_into_an_edge_pod_through_the_link() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts::default()).await?;
    let n = s.get_json(&["node", s.name()])?;
    ensure!(
        n["status"]["declaredFeatures"] == serde_json::json!(["ExtendWebSocketsToKubelet"]),
        "{}",
        n["status"]
    );
    let pod = unique("shell");
    s.apply(&busybox_pod(&pod, s.name(), ""))?;
    s.pod_ready(&pod).await?;
    let o = s.kubectl(&[
        "exec",
        &pod,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ])?;
    let (out, err) = (text(&o), String::from_utf8_lossy(&o.stderr).to_string());
    ensure!(
        o.status.code() == Some(3) && out == "out\n" && err.contains("err\n"),
        "exit {:?}, stdout {out:?}, stderr {err:?}\n{}",
        o.status.code(),
        s.logs()
    );
    ensure!(
        err.contains("command terminated with exit code 3"),
        "{err:?}"
    );
    // Stdin, to its end (v5's close of channel 0: cat ends).
    let mut cmd = s.scope.kubectl();
    cmd.args(["exec", "-i", &pod, "--", "sh", "-c", "cat; echo done"]);
    let echoed = with_stdin(cmd, "hello\nworld\n")?;
    ensure!(echoed == "hello\nworld\ndone\n", "{echoed:?}");
    // A terminal, sized as kubectl's own.
    let kubeconfig = s.kubeconfig();
    let line = format!(
        "stty rows 31 cols 107; kubectl --kubeconfig {} -n {} exec -it {pod} -- sh -c 'stty size; tty'",
        kubeconfig.display(),
        s.ns()
    );
    let o = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()?;
    let shown = text(&o);
    ensure!(
        shown.contains("31 107") && shown.contains("/dev/pts/"),
        "{shown:?} {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.logs()
    );
    // A large output comes whole.
    let o = s.kubectl(&[
        "exec",
        &pod,
        "--",
        "sh",
        "-c",
        "head -c 5000000 /dev/zero | tr '\\0' x",
    ])?;
    ensure!(
        o.status.success() && o.stdout.len() == 5_000_000 && o.stdout.iter().all(|b| *b == b'x'),
        "{} bytes: {}",
        o.stdout.len(),
        String::from_utf8_lossy(&o.stderr)
    );
    // What cannot run says why.
    let o = s.kubectl(&["exec", &pod, "--", "/no/such/command"])?;
    ensure!(!o.status.success(), "a missing command succeeded");
    let o = s.kubectl(&["exec", &pod, "-c", "nope", "--", "true"])?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(!o.status.success() && err.contains("nope"), "{err}");
    ensure!(s.kubectl(&["exec", &pod, "--", "true"])?.status.success());
    s.cleanup().await
}

/// A pod that keeps its stdin open and answers each line, until `quit`.
fn echo_pod(name: &str, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  nodeName: {node}
  restartPolicy: Never
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: Never
    stdin: true
    command: ["sh", "-c", "echo ready; while read l; do echo \"got $l\"; echo \"err $l\" >&2; [ \"$l\" = quit ] && exit 0; done"]
"#
    )
}

/// A pod serving `/www` over HTTP on 8080 (busybox httpd), with a 3 MB
/// file of random bytes in it.
fn web_pod(name: &str, node: &str) -> String {
    busybox_pod(name, node, "").replace(
        "while true; do sleep 1; done",
        "mkdir -p /www && head -c 3000000 /dev/urandom > /www/big && echo hello > /www/index.html && exec httpd -f -p 8080 -h /www",
    )
}

/// `kubectl port-forward` to `pod`'s `remote` port on a local port of its
/// choice (`env`: e.g. SPDY instead of a WebSocket); the process and the
/// local port.
fn port_forward(
    s: &Setup,
    pod: &str,
    remote: u16,
    env: &[(&str, &str)],
) -> Result<(std::process::Child, u16)> {
    use std::io::BufRead;
    let mut cmd = s.scope.kubectl();
    cmd.args(["port-forward", &format!("pod/{pod}"), &format!(":{remote}")])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    let out = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    let mut out = std::io::BufReader::new(out);
    out.read_line(&mut line)?;
    // kubectl writes a line per connection: its stdout must stay open (a
    // write to a closed pipe would kill it).
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    // "Forwarding from 127.0.0.1:41235 -> 8080"
    let port = line
        .split("127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok());
    match port {
        Some(p) => Ok((child, p)),
        None => {
            let _ = child.kill();
            let o = child.wait_with_output()?;
            anyhow::bail!(
                "kubectl port-forward said {line:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            )
        }
    }
}

/// An HTTP/1.0 GET through 127.0.0.1:`port`: status line and body.
fn fetch(port: u16, path: &str) -> Result<(String, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(c, "GET {path} HTTP/1.0\r\nHost: pod\r\n\r\n")?;
    let mut raw = Vec::new();
    c.read_to_end(&mut raw)?;
    let at = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .with_context(|| format!("no HTTP answer: {:?}", String::from_utf8_lossy(&raw)))?;
    let status = String::from_utf8_lossy(&raw[..at])
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    Ok((status, raw[at + 4..].to_vec()))
}

/// What the checks of attach and port-forward share, for either way the
/// API server passes them on: attach with stdin, its output and the end
/// of the process; a small page and a 3 MB file through port-forward,
/// checksummed, over a WebSocket and over SPDY.
async fn attach_and_port_forward(s: &Setup, spdy_env: &[(&str, &str)]) -> Result<()> {
    use sha2::Digest;
    let echo = unique("echo");
    s.apply(&echo_pod(&echo, s.name()))?;
    let web = unique("web");
    s.apply(&web_pod(&web, s.name()))?;
    s.pod_ready(&echo).await?;
    s.pod_ready(&web).await?;

    // Attach: input in, the container's own output out (both streams),
    // and the end of its process ends the session with success.
    let mut cmd = s.scope.kubectl();
    cmd.args(["attach", "-i", &echo])
        .envs(spdy_env.iter().copied());
    let o = {
        use std::io::Write;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(b"hello\n")?;
        // The answer to the first line before the last: the session is
        // live, not replayed from the log.
        tokio::time::sleep(Duration::from_secs(1)).await;
        stdin.write_all(b"quit\n")?;
        drop(stdin);
        let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
        tokio::time::timeout(Duration::from_secs(30), waited)
            .await
            .context("kubectl attach did not end with its container")???
    };
    let (out, err) = (text(&o), String::from_utf8_lossy(&o.stderr).to_string());
    ensure!(
        o.status.success() && out.contains("got hello\n") && out.contains("got quit\n"),
        "attach: exit {:?}, stdout {out:?}, stderr {err:?}\n{}",
        o.status.code(),
        s.logs()
    );
    ensure!(!out.contains("ready"), "attach replayed the log: {out:?}");
    ensure!(err.contains("err hello"), "stderr of attach: {err:?}");

    // Port-forward, both ways kubectl speaks it.
    let want = s.kc(&["exec", &web, "--", "sha256sum", "/www/big"])?;
    let want = want.split_whitespace().next().unwrap_or("").to_string();
    for env in [&[][..], spdy_env] {
        let (mut pf, port) = port_forward(s, &web, 8080, env)?;
        let page = fetch(port, "/index.html");
        let big = fetch(port, "/big");
        let _ = pf.kill();
        let o = pf.wait_with_output()?;
        let pf_err = String::from_utf8_lossy(&o.stderr).to_string();
        let (status, body) = page.with_context(|| format!("{pf_err}\n{}", s.logs()))?;
        ensure!(
            status.contains("200") && body == b"hello\n",
            "{status} {body:?} ({env:?})"
        );
        let (status, body) = big.with_context(|| pf_err.clone())?;
        let got = hex::encode(sha2::Sha256::digest(&body));
        ensure!(
            status.contains("200") && body.len() == 3_000_000 && got == want,
            "{status}: {} bytes, sha256 {got}, want {want} ({env:?})\n{pf_err}",
            body.len()
        );
    }
    // A port nothing listens on: the connection closes, kubectl says why.
    let (mut pf, port) = port_forward(s, &web, 9999, &[])?;
    let refused = fetch(port, "/");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = pf.kill();
    let o = pf.wait_with_output()?;
    let pf_err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        refused.is_err() && pf_err.contains("9999") && pf_err.contains("refused"),
        "{refused:?} {pf_err}"
    );
    Ok(())
}

/// kubectl attach and port-forward to pods on an edge node, as to any pod:
/// the Node declares ExtendWebSocketsToKubelet, so kubectl's WebSockets
/// come through as they are (and its SPDY fallback, forced here, too);
/// port-forward reaches a server inside the pod's network namespace. A
/// link cut ends a forwarded connection with an error, and the pod runs
/// on.
#[tokio::test]
async fn kubectl_attach_and_port_forward_to_edge_pods() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts::default()).await?;
    let spdy = [
        ("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"),
        ("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false"),
    ];
    attach_and_port_forward(&s, &spdy).await?;
    // SPDY exec too, with its exit code and stdin.
    let pod = unique("shell");
    s.apply(&busybox_pod(&pod, s.name(), ""))?;
    s.pod_ready(&pod).await?;
    let mut cmd = s.scope.kubectl();
    cmd.args(["exec", "-i", &pod, "--", "sh", "-c", "cat; exit 4"])
        .envs(spdy);
    let o = {
        use std::io::Write;
        let mut child = cmd
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(b"via spdy\n")?;
        child.wait_with_output()?
    };
    ensure!(
        o.status.code() == Some(4) && text(&o) == "via spdy\n",
        "exit {:?} {:?} {}",
        o.status.code(),
        text(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    // A terminal over SPDY: sized through its resize stream.
    let line = format!(
        "stty rows 29 cols 101; KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false kubectl --kubeconfig {} -n {} exec -it {pod} -- sh -c 'stty size; tty'",
        s.kubeconfig().display(),
        s.ns()
    );
    let o = std::process::Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()?;
    let shown = text(&o);
    ensure!(
        shown.contains("29 101") && shown.contains("/dev/pts/"),
        "{shown:?} {}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The link cut under a forward: a new connection through it fails
    // with an error (not a silent empty answer), the pod is untouched.
    let web = unique("web");
    s.apply(&web_pod(&web, s.name()))?;
    s.pod_ready(&web).await?;
    let (mut pf, port) = port_forward(&s, &web, 8080, &[])?;
    ensure!(fetch(port, "/index.html")?.1 == b"hello\n");
    let mut cut = PortCut::cut(s.cloud.addr.port())?;
    s.cloud.logged("silent for two heartbeats").await?;
    let during = fetch(port, "/index.html");
    ensure!(
        during
            .as_ref()
            .map_or(true, |(st, b)| !st.contains("200") || b.is_empty()),
        "a page came through the cut: {during:?}"
    );
    let _ = pf.kill();
    let o = pf.wait_with_output()?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        err.contains("has no link") || err.contains("lost") || err.contains("error"),
        "kubectl port-forward through the cut said: {err}"
    );
    cut.restore()?;
    ensure!(
        find(&s.node().pods()?, &web).is_some_and(|p| phase(p) == "Running"),
        "the pod stopped"
    );
    wait_for(
        "a page once the link is back",
        Duration::from_secs(30),
        || async {
            let (mut pf, port) = port_forward(&s, &web, 8080, &[]).ok()?;
            let after = fetch(port, "/index.html");
            let _ = pf.kill();
            let _ = pf.wait();
            (after.ok()?.1 == b"hello\n").then_some(())
        },
    )
    .await?;
    s.cleanup().await
}

/// With a Node that does not declare ExtendWebSocketsToKubelet (as an
/// older kubelet), the API server translates kubectl's WebSockets into
/// SPDY toward cloud-gw: exec (exit code, stdin), attach and port-forward
/// work the same.
#[tokio::test]
async fn through_an_api_server_that_translates_to_spdy() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts {
        cloud_args: &["--kubelet-websockets", "false"],
        ..Default::default()
    })
    .await?;
    let n = s.get_json(&["node", s.name()])?;
    let declared = n["status"]["declaredFeatures"]
        .as_array()
        .map_or(0, |a| a.len());
    ensure!(declared == 0, "{}", n["status"]);
    let pod = unique("shell");
    s.apply(&busybox_pod(&pod, s.name(), ""))?;
    s.pod_ready(&pod).await?;
    let o = s.kubectl(&[
        "exec",
        &pod,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 3",
    ])?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        o.status.code() == Some(3) && text(&o) == "out\n" && err.contains("err\n"),
        "exit {:?}, stdout {:?}, stderr {err:?}\n{}",
        o.status.code(),
        text(&o),
        s.logs()
    );
    let mut cmd = s.scope.kubectl();
    cmd.args(["exec", "-i", &pod, "--", "sh", "-c", "cat; echo done"]);
    ensure!(with_stdin(cmd, "a\nb\n")? == "a\nb\ndone\n");
    attach_and_port_forward(&s, &[]).await?;
    s.cleanup().await
}

/// Resource metrics of an edge node and its pods, scraped the way
/// metrics-server scrapes a kubelet (GET /metrics/resource at the Node's
/// InternalIP and kubeletEndpoint port, with its service account's token,
/// which may `get nodes/metrics`), twice (the times advance, the CPU
/// counters do not go back); the summary through the API server's
/// nodes/proxy; a token without the right refused.
#[tokio::test]
async fn resource_metrics_of_an_edge_node_as_metrics_server_scrapes_them() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts::default()).await?;
    let pod = unique("busy");
    s.apply(&busybox_pod(&pod, s.name(), ""))?;
    s.pod_ready(&pod).await?;
    // metrics-server's rights, and nothing else.
    let role = format!("{}-metrics", s.ns());
    s.scope.owns("clusterrole", &role);
    s.scope.owns("clusterrolebinding", &role);
    s.kc(&["create", "serviceaccount", "metrics"])?;
    s.kc(&[
        "create",
        "clusterrole",
        &role,
        "--verb=get",
        "--resource=nodes/metrics",
    ])?;
    s.kc(&[
        "create",
        "clusterrolebinding",
        &role,
        &format!("--clusterrole={role}"),
        &format!("--serviceaccount={}:metrics", s.ns()),
    ])?;
    let token = s.kc(&["create", "token", "metrics"])?;
    let n = s.get_json(&["node", s.name()])?;
    let internal = n["status"]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
        .and_then(|a| a["address"].as_str())
        .context("no InternalIP")?
        .to_string();
    let kubelet = kubelet_of(&s)?;
    ensure!(internal == kubelet.ip().to_string(), "{}", n["status"]);

    // A sample: its value and time (ms).
    let sample = |body: &str, name: &str, labels: &str| -> Option<(f64, i64)> {
        body.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = rest.strip_prefix(labels)?;
            let mut it = rest.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        })
    };
    let scrape = || -> Result<String> {
        let r = kubelet_get(kubelet, "/metrics/resource", Some(token.trim()))?;
        ensure!(r.starts_with("HTTP/1.1 200"), "{r}");
        Ok(r)
    };
    let first = scrape()?;
    let labels = format!(
        "{{container=\"main\",namespace=\"{}\",pod=\"{pod}\"}}",
        s.ns()
    );
    let series = |body: &str| -> Result<[(f64, i64); 4]> {
        Ok([
            sample(body, "node_cpu_usage_seconds_total", "").context("node cpu")?,
            sample(body, "node_memory_working_set_bytes", "").context("node memory")?,
            sample(body, "container_cpu_usage_seconds_total", &labels).context("container cpu")?,
            sample(body, "container_memory_working_set_bytes", &labels)
                .context("container memory")?,
        ])
    };
    let a = series(&first).with_context(|| first.clone())?;
    // What metrics-server drops: zero CPU or memory.
    ensure!(a.iter().all(|(v, t)| *v > 0.0 && *t > 0), "{first}");
    ensure!(
        first.contains(&format!("container_start_time_seconds{labels} ")),
        "{first}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = scrape()?;
    let b = series(&second).with_context(|| second.clone())?;
    ensure!(
        a.iter().zip(&b).all(|((_, t0), (_, t1))| t1 > t0) && b[0].0 >= a[0].0 && b[2].0 >= a[2].0,
        "{a:?} then {b:?}"
    );
    // The summary, as Prometheus or a person reaches it: nodes/proxy.
    let raw = s
        .kc(&[
            "get",
            "--raw",
            &format!("/api/v1/nodes/{}/proxy/stats/summary", s.name()),
        ])
        .with_context(|| format!("{}", n["status"]))?;
    let sum: Value = serde_json::from_str(&raw)?;
    ensure!(sum["node"]["nodeName"] == s.name(), "{raw}");
    ensure!(
        sum["node"]["fs"]["capacityBytes"].as_u64() > Some(0),
        "{raw}"
    );
    let p = sum["pods"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["podRef"]["name"] == pod.as_str()))
        .with_context(|| raw.clone())?;
    ensure!(
        p["containers"][0]["name"] == "main"
            && p["containers"][0]["memory"]["workingSetBytes"].as_u64() > Some(0)
            && p["memory"]["workingSetBytes"].as_u64() > Some(0)
            && p["process_stats"]["process_count"].as_u64() >= Some(1),
        "{p}"
    );
    // A token that may not: refused as a kubelet words it.
    let other = s.kc(&["create", "token", "default"])?;
    let r = kubelet_get(kubelet, "/metrics/resource", Some(other.trim()))?;
    ensure!(
        r.starts_with("HTTP/1.1 403") && r.contains("subresource(s)=[metrics]"),
        "{r}"
    );
    s.cleanup().await
}

/// Two replicas racing to start share one CA (made once, in a Secret), and
/// an edge served by one goes on with the other.
#[tokio::test]
async fn two_replicas_share_one_ca_and_an_edge_moves_between_them() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cluster = Cluster::get()?;
    let scope = Scope::new(&cluster, "replicas")?;
    let secret = format!("{}/cloud-gw-pki", scope.namespace);
    let k = cluster.kubeconfig().to_path_buf();
    let (one, two) = tokio::join!(
        Cloud::start_replica(&k, &secret, None),
        Cloud::start_replica(&k, &secret, None)
    );
    let (mut one, two) = (one?, two?);
    let ca = |c: &Cloud| -> Result<String> {
        let o = c.cli(&["token", "create", "--ttl", "5m"])?;
        let t = outrigger_proto::token::JoinToken::parse(text(&o).trim())?;
        Ok(t.ca_pin)
    };
    ensure!(ca(&one)? == ca(&two)?, "the replicas made two CAs");
    ensure!(
        format!("{}{}", one.log(), two.log())
            .matches("link CA created")
            .count()
            == 1,
        "{}\n{}",
        one.log(),
        two.log()
    );
    // An edge joins through the first (with a token made by the second).
    let name = unique("edge");
    scope.owns("node", &name);
    let node = Node::new()?;
    let o = join_with(&node, &one.server, &two.token("10m")?, &name, &[])?;
    ensure!(o.status.success(), "join: {}", stderr(&o));
    let daemon = node.start().await?;
    let wait_ready = |pod: String| {
        let scope = &scope;
        async move {
            let o = scope
                .kubectl()
                .args([
                    "wait",
                    "--for=condition=Ready",
                    &format!("pod/{pod}"),
                    "--timeout=60s",
                ])
                .output()?;
            anyhow::Ok(o)
        }
    };
    let pod = unique("moved");
    kubectl_stdin(
        scope.kubectl(),
        &["apply", "-f", "-"],
        &busybox_pod(&pod, &name, ""),
    )?;
    ensure!(
        wait_ready(pod.clone()).await?.status.success(),
        "{}",
        one.log()
    );
    // The Node leads the API server to the replica holding its link.
    let endpoint = |want: std::net::IpAddr| {
        let scope = &scope;
        let name = &name;
        async move {
            wait_for(
                "the Node to name the replica with the link",
                Duration::from_secs(20),
                || async {
                    let o = scope
                        .kubectl()
                        .args(["get", "node", name, "-o", "json"])
                        .output()
                        .ok()?;
                    let n: Value = serde_json::from_slice(&o.stdout).ok()?;
                    let st = &n["status"];
                    let port = st["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64()?;
                    // Someone listens there: the replica that wrote it
                    // (the other one is gone by then).
                    let at = std::net::SocketAddr::new(want, u16::try_from(port).ok()?);
                    (st["addresses"][0]["address"] == want.to_string()
                        && st["addresses"][0]["type"] == "Hostname"
                        && std::net::TcpStream::connect(at).is_ok())
                    .then_some(())
                },
            )
            .await
        }
    };
    endpoint(one.kubelet).await?;
    // The first replica goes; the second takes its address (as behind a
    // load balancer) and the edge carries on with it.
    let port = one.addr.port();
    let _ = one.child.kill();
    let _ = one.child.wait();
    drop(two);
    let three = Cloud::start_replica(&k, &secret, Some(port)).await?;
    three.logged("node connected").await?;
    let later = unique("later");
    kubectl_stdin(
        scope.kubectl(),
        &["apply", "-f", "-"],
        &busybox_pod(&later, &name, ""),
    )?;
    let o = wait_ready(later.clone()).await?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        three.log()
    );
    ensure!(find(&node.pods()?, &pod).is_some_and(|p| phase(p) == "Running"));
    // kubectl logs follows it there.
    endpoint(three.kubelet).await?;
    let o = scope.kubectl().args(["logs", &later]).output()?;
    ensure!(
        o.status.success(),
        "kubectl logs through the new replica: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(daemon);
    node.cleanup().await
}

/// With its own certificate, a node asks by name for a Secret its pods use
/// (given) and for one that only another node's pod uses (refused, and
/// logged); the same for service account tokens. The edge link has no way
/// to name anything else.
#[tokio::test]
async fn a_node_asking_for_another_nodes_secret_or_token_is_refused() -> Result<()> {
    use outrigger_proto::kinds::Kind;
    use outrigger_proto::message::{Message, Sync};
    let cluster = Cluster::get()?;
    let scope = Scope::new(&cluster, "refused")?;
    let ns = scope.namespace.clone();
    let cloud = Cloud::start_kube(cluster.kubeconfig()).await?;
    let (name, other) = (unique("edge"), unique("other"));
    scope.owns("node", &name);
    let node = Node::new()?;
    let o = join_with(&node, &cloud.server, &cloud.token("10m")?, &name, &[])?;
    ensure!(o.status.success(), "join: {}", stderr(&o));
    let (mine, theirs) = (unique("mine"), unique("theirs"));
    for (pod, secret, on) in [
        (&mine, &mine, name.as_str()),
        (&theirs, &theirs, other.as_str()),
    ] {
        kubectl_stdin(
            scope.kubectl(),
            &["apply", "-f", "-"],
            &format!(
                "apiVersion: v1\nkind: Secret\nmetadata: {{name: {secret}}}\nstringData: {{k: v}}\n---\n{}",
                busybox_pod(pod, on, &format!("  volumes: [{{name: s, secret: {{secretName: {secret}}}}}]\n"))
            ),
        )?;
    }
    // The token the other node's pod would get (cloud-gw names them by
    // pod, audience and lifetime).
    let their_uid = text(
        &scope
            .kubectl()
            .args(["get", "pod", &theirs, "-o", "jsonpath={.metadata.uid}"])
            .output()?,
    );
    let their_token =
        outrigger_proto::kinds::ServiceAccountToken::name_for(&theirs, &their_uid, None, 3607);
    let dir = link_dir(&node);
    let tls = edge_rt::link::tls::link_config(
        &std::fs::read(dir.join("ca.crt"))?,
        &std::fs::read(dir.join("node.crt"))?,
        &std::fs::read(dir.join("node.key"))?,
    )?;
    let mut link = edge_rt::link::join::connect(&cloud.server, "/link", tls).await?;
    edge_rt::link::join::hello(&mut link, &name).await?;
    let mut ask = async |id: u64, kind: Kind, object: &str| -> Result<Sync> {
        link.send(&Message::Sync(Sync::Get {
            id,
            kind,
            namespace: ns.clone(),
            name: object.into(),
        }))
        .await?;
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), link.recv()).await??;
            if let Message::Sync(got @ Sync::Got { .. }) = m {
                return Ok(got);
            }
        }
    };
    let my_uid = text(
        &scope
            .kubectl()
            .args(["get", "pod", &mine, "-o", "jsonpath={.metadata.uid}"])
            .output()?,
    );
    let my_token =
        outrigger_proto::kinds::ServiceAccountToken::name_for(&mine, &my_uid, None, 3607);
    // Its own are given (the cache and the token may lag the apply by a
    // moment).
    for (kind, object) in [
        (Kind::Secret, &mine),
        (Kind::ServiceAccountToken, &my_token),
    ] {
        let mut given = None;
        for _ in 0..100 {
            if let Sync::Got {
                object: Some(o), ..
            } = ask(1, kind, object).await?
            {
                given = Some(o);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ensure!(
            given.is_some(),
            "its own {kind} was not given\n{}",
            cloud.log()
        );
    }
    for (id, kind, object) in [
        (2, Kind::Secret, &theirs),
        (3, Kind::ServiceAccountToken, &their_token),
    ] {
        match ask(id, kind, object).await? {
            Sync::Got {
                id: got,
                object: None,
                refused: Some(r),
            } if got == id => {
                ensure!(r.contains("pods or devices use"), "{r}")
            }
            other => anyhow::bail!("another node's {kind} was answered with {other:?}"),
        }
    }
    cloud.logged("pods or devices use").await?;
    Ok(())
}

/// `kubectl delete --grace-period=N` shorter than the pod's own: the edge
/// stops the container within N seconds, as a kubelet would, not after the
/// pod's 120.
#[tokio::test]
async fn a_shorter_grace_period_on_delete_is_honoured_on_the_edge() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let s = Setup::ready(Opts::default()).await?;
    let pod = unique("stubborn");
    s.apply(
        &busybox_pod(&pod, s.name(), "")
            .replace(
                "terminationGracePeriodSeconds: 2",
                "terminationGracePeriodSeconds: 120",
            )
            .replace(
                "while true; do sleep 1; done",
                "trap '' TERM; while true; do sleep 1; done",
            ),
    )?;
    s.pod_ready(&pod).await?;
    // With the pod's 120 s this would time out.
    let o = s.kubectl(&["delete", "pod", &pod, "--grace-period=2", "--timeout=40s"])?;
    ensure!(
        o.status.success(),
        "kubectl delete: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.logs()
    );
    ensure!(find(&s.node().pods()?, &pod).is_none(), "still on the edge");
    s.cleanup().await
}

/// cloud-gw's image as `cloud-gw/image/build.sh` makes it (an OCI layout,
/// tag "test"): `$OUTRIGGER_CLOUD_GW_IMAGE` (CI builds it before the
/// tests), else built now into the target directory.
fn cloud_gw_image() -> Result<std::path::PathBuf> {
    if let Some(d) = std::env::var_os("OUTRIGGER_CLOUD_GW_IMAGE").filter(|d| !d.is_empty()) {
        return Ok(d.into());
    }
    let target = cloud_gw_bin()
        .parent()
        .and_then(|p| p.parent())
        .context("target directory")?
        .to_path_buf();
    let out = target.join("cloud-gw-image");
    if !out.join("index.json").exists() {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloud-gw/image/build.sh");
        let o = std::process::Command::new("sh")
            .arg(script)
            .arg(&out)
            .arg("test")
            .env("ARCHES", outrigger_tests::fixtures::host_arch())
            .env("CARGO_TARGET_DIR", &target)
            .output()?;
        ensure!(
            o.status.success(),
            "building the image: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(out)
}

/// cloud-gw as a cluster runs it: its own image (built here, pushed to a
/// registry), `cloud-gw manifests` applied client-side and server-side,
/// twice and over each other, its RBAC enough for everything it does (a
/// cloud-gw with the manifests' service account token serves an edge), its
/// Deployment kept off the edge node, and the image runnable.
#[tokio::test]
async fn cloud_gw_runs_from_its_own_image_and_manifests() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Its own control plane: the manifests are cluster-wide.
    let cluster = Cluster::own(&Default::default())?;
    let registry = outrigger_tests::registry::Registry::start(None)?;
    let image = registry.push(&cloud_gw_image()?, "test", "outrigger/cloud-gw")?;
    let manifests = {
        let o = std::process::Command::new(cloud_gw_bin())
            .args([
                "manifests",
                "--image",
                &image,
                "--san",
                "127.0.0.1",
                "--replicas",
                "1",
            ])
            .output()?;
        ensure!(o.status.success(), "{}", stderr(&o));
        text(&o)
    };
    let apply = |how: &[&str]| -> Result<String> {
        let mut a = vec!["apply", "-f", "-"];
        a.extend_from_slice(how);
        kubectl_stdin(cluster.kubectl(), &a, &manifests)
    };
    apply(&[])?;
    apply(&[])?;
    apply(&["--server-side"])?;
    apply(&["--server-side"])?;

    // cloud-gw beside the cluster with its service account's token: what
    // its RBAC allows is all it can do.
    let token = text(
        &cluster
            .kubectl()
            .args([
                "create",
                "token",
                "cloud-gw",
                "-n",
                "outrigger-system",
                "--duration=1h",
            ])
            .output()?,
    );
    let kubeconfig = cluster.kubeconfig().with_file_name("cloud-gw.kubeconfig");
    {
        let admin: Value =
            serde_yaml_ng::from_str(&std::fs::read_to_string(cluster.kubeconfig())?)?;
        let mut k = admin.clone();
        k["users"][0]["user"] = serde_json::json!({"token": token.trim()});
        std::fs::write(&kubeconfig, serde_yaml_ng::to_string(&k)?)?;
    }
    let cloud = Cloud::start_replica(&kubeconfig, "outrigger-system/cloud-gw-pki", None).await?;
    cloud
        .logged("link CA written into the webhook configuration")
        .await?;
    cloud.logged("the cluster's default tolerations").await?;
    // Both kinds of apply again, over cloud-gw's own write: no conflict,
    // and the caBundle stays.
    apply(&[])?;
    apply(&["--server-side"])?;
    let hook: Value = serde_json::from_str(&text(
        &cluster
            .kubectl()
            .args([
                "get",
                "mutatingwebhookconfiguration",
                "outrigger-cloud-gw",
                "-o",
                "json",
            ])
            .output()?,
    ))?;
    ensure!(
        hook["webhooks"][0]["clientConfig"]["caBundle"]
            .as_str()
            .is_some_and(|b| !b.is_empty()),
        "{hook}"
    );

    // An edge, and a pod on it from the image, with its token.
    let name = unique("edge");
    let node = Node::new()?;
    node.trust_registry(&registry.ca_pem)?;
    let o = join_with(&node, &cloud.server, &cloud.token("10m")?, &name, &[])?;
    ensure!(o.status.success(), "join: {}", stderr(&o));
    let daemon = node.start().await?;
    let ns = |args: &[&str]| -> Result<Output> {
        Ok(cluster
            .kubectl()
            .args(["-n", "outrigger-system"])
            .args(args)
            .output()?)
    };
    kubectl_stdin(
        cluster.kubectl(),
        &["apply", "-n", "outrigger-system", "-f", "-"],
        &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: version}}\nspec:\n  nodeName: {name}\n  restartPolicy: Never\n  containers:\n  - {{name: cloud-gw, image: {image:?}, args: [--version]}}\n"
        ),
    )?;
    wait_for(
        "the image's cloud-gw to run and exit 0",
        Duration::from_secs(90),
        || async {
            let o = ns(&["get", "pod", "version", "-o", "jsonpath={.status.phase}"]).ok()?;
            (text(&o) == "Succeeded").then_some(())
        },
    )
    .await
    .with_context(|| {
        format!(
            "cloud-gw:\n{}\nedge-rt:\n{}",
            cloud.log(),
            node.daemon_log()
        )
    })?;
    let logs = node.cli(&["logs", "-n", "outrigger-system", "version"])?;
    ensure!(
        text(&logs).contains(concat!("cloud-gw ", env!("CARGO_PKG_VERSION"))),
        "{}",
        text(&logs)
    );
    // The Deployment is scheduled nowhere: the only node is an edge node
    // (not even tainted), and its affinity keeps off those.
    let msg = wait_for(
        "cloud-gw's pod unschedulable",
        Duration::from_secs(60),
        || async {
            let o = ns(&[
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=cloud-gw",
                "-o",
                "json",
            ])
            .ok()?;
            let v: Value = serde_json::from_str(&text(&o)).ok()?;
            let p = v["items"].as_array()?.first()?.clone();
            ensure_image(&p, &image).ok()?;
            // Until the edge node registers, the scheduler says there are
            // no nodes at all; the message that counts is the one after.
            let c = condition(&p, "PodScheduled")?;
            let msg = c["message"].as_str().unwrap_or("");
            (c["status"] == "False" && msg.contains("affinity")).then(|| msg.to_string())
        },
    )
    .await?;
    ensure!(msg.contains("affinity"), "{msg}");
    drop(daemon);
    node.cleanup().await?;
    drop(cloud);
    Ok(())
}

fn ensure_image(pod: &Value, image: &str) -> Result<()> {
    ensure!(
        pod["spec"]["containers"][0]["image"] == image,
        "{}",
        pod["spec"]
    );
    Ok(())
}

/// The device definitions, as `cloud-gw manifests` has them, in the
/// cluster (before cloud-gw starts, so it watches devices from the first
/// list).
const DEVICE_MODEL: &str = r#"apiVersion: devices.outrigger.io/v1alpha1
kind: DeviceModel
metadata: {name: thermostat}
spec:
  description: a boiler's thermostat
  properties:
  - {name: temperature, type: float, unit: "C", minimum: -40, maximum: 125}
  - {name: setpoint, type: float, access: ReadWrite, minimum: 5, maximum: 30}
  - {name: mode, type: int, access: ReadWrite, minimum: 0, maximum: 3}
"#;

fn kube_device(node: &str, port: &std::path::Path, setpoint: &str) -> String {
    format!(
        r#"apiVersion: devices.outrigger.io/v1alpha1
kind: Device
metadata: {{name: boiler}}
spec:
  model: thermostat
  nodeName: {node}
  protocol:
    modbus:
      rtu: {{port: {port}, baudRate: 115200, parity: None}}
      slaveId: 1
      timeoutMs: 300
  properties:
  - {{name: temperature, collectCycleMs: 100, reportCycleMs: 200, modbus: {{table: InputRegister, address: 0, dataType: int16, scale: 0.1}}}}
  - {{name: setpoint, desired: "{setpoint}", collectCycleMs: 100, reportCycleMs: 200, modbus: {{table: HoldingRegister, address: 10, dataType: float32}}}}
  - {{name: mode, collectCycleMs: 100, reportCycleMs: 200, modbus: {{table: HoldingRegister, address: 20, dataType: uint16}}}}
"#,
        port = port.display()
    )
}

/// `kubectl apply` of a model and a device bound to an edge node: the
/// schema refuses bad devices at apply, the edge polls the device (a
/// pymodbus slave on a PTY) and its readings land in the Device's status;
/// a patched desired value reaches the slave's register.
#[tokio::test]
async fn a_device_applied_with_kubectl_is_polled_on_its_edge_and_patched_from_the_cluster(
) -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    Cluster::get()?.install_device_crds()?;
    let s = Setup::ready(Opts {
        webhook: true,
        ..Default::default()
    })
    .await?;
    // What the API server refuses, with the schema alone.
    for (bad, says) in [
        ("rtu: {port: /dev/ttyUSB0}", "slaveId"),
        ("rtu: {baudRate: 9600}\n      slaveId: 1", "port"),
        ("rtu: {port: ttyUSB0}\n      slaveId: 1", "port"),
        ("rtu: {port: /dev/ttyUSB0}\n      slaveId: 0", "1 to 247"),
    ] {
        let y = format!(
            "apiVersion: devices.outrigger.io/v1alpha1\nkind: Device\nmetadata: {{name: bad}}\nspec:\n  model: thermostat\n  nodeName: {}\n  protocol:\n    modbus:\n      {bad}\n",
            s.name()
        );
        let e = s.apply(&y).expect_err(&format!("accepted: {y}"));
        ensure!(format!("{e:#}").contains(says), "{y}\n{e:#}");
    }
    let table = format!(
        "apiVersion: devices.outrigger.io/v1alpha1\nkind: Device\nmetadata: {{name: bad}}\nspec:\n  model: thermostat\n  nodeName: {}\n  protocol: {{modbus: {{rtu: {{port: /dev/ttyS0}}, slaveId: 1}}}}\n  properties:\n  - {{name: t, modbus: {{table: Register, address: 0}}}}\n",
        s.name()
    );
    let e = s
        .apply(&table)
        .expect_err("a wrong register table was accepted");
    ensure!(format!("{e:#}").contains("table"), "{e:#}");

    let line = outrigger_tests::modbus::Line::new(s.node().dir.path(), "rs485")?;
    let mut slave = outrigger_tests::modbus::Slaves::start(&line, &[1])?;
    slave.set(1, "ir", 0, &[215])?;
    s.apply(DEVICE_MODEL)?;
    // What needs the model too: cloud-gw's webhook checks the device
    // against it (as the edge does).
    // (cloud-gw learns the model from its watch: until it has, a device
    // is let through with a warning; each try is a new value, so each is a
    // request.)
    let mut refused = None;
    for v in 31..60 {
        match s.apply(&kube_device(s.name(), &line.edge, &v.to_string())) {
            Err(e) => {
                refused = Some(format!("{e:#}"));
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let e = refused.context("setpoints out of the model's range were accepted")?;
    ensure!(e.contains("above the maximum 30"), "{e}\n{}", s.logs());
    s.apply(&kube_device(s.name(), &line.edge, "21.5"))?;
    let reported = |want: &'static str| {
        let s = &s;
        move || async move {
            let d = s.get_json(&["device", "boiler"]).ok()?;
            let props = d["status"]["properties"].as_array()?;
            props
                .iter()
                .any(|p| p["name"] == "temperature" && p["value"] == want)
                .then_some(d)
        }
    };
    let d = wait_for(
        "the reading in the Device's status",
        Duration::from_secs(30),
        reported("21.5"),
    )
    .await
    .with_context(|| s.logs())?;
    ensure!(d["status"]["state"] == "Online", "{}", d["status"]);
    ensure!(
        condition(&d, "Reachable").is_some_and(|c| c["status"] == "True"),
        "{}",
        d["status"]
    );
    // The desired value reached the register.
    until_register(&mut slave, 21.5, &s).await?;
    // kubectl get devices: node, protocol, state, values.
    let t = s.kc(&["get", "devices"])?;
    ensure!(
        t.lines().any(|l| l.starts_with("boiler")
            && l.contains(s.name())
            && l.contains("modbus-rtu")
            && l.contains("Online")
            && l.contains("temperature=21.5C")),
        "{t}"
    );
    // A reading that changes on the slave reaches the cluster.
    slave.set(1, "ir", 0, &[230])?;
    wait_for("the new reading", Duration::from_secs(10), reported("23"))
        .await
        .with_context(|| s.logs())?;
    // kubectl patch of the desired value reaches the register.
    s.kc(&[
        "patch",
        "device",
        "boiler",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/spec/properties/1/desired", "value": "18"}]"#,
    ])?;
    until_register(&mut slave, 18.0, &s).await?;
    ensure!(slave.writes(1)? == 2, "writes: {}", slave.writes(1)?);
    drop(slave);
    drop(line);
    s.cleanup().await
}

/// Wait (10 s) until slave 1's setpoint registers hold `v`.
async fn until_register(
    slave: &mut outrigger_tests::modbus::Slaves,
    v: f32,
    s: &Setup,
) -> Result<()> {
    until_registers(slave, 10, &outrigger_tests::modbus::float32_words(v), s).await
}

/// Wait (10 s) until slave 1's holding registers from `address` hold `words`.
async fn until_registers(
    slave: &mut outrigger_tests::modbus::Slaves,
    address: u16,
    words: &[u16],
    s: &Setup,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    loop {
        let got = slave.get(1, "hr", address, words.len() as u16)?;
        if got == words {
            return Ok(());
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(10),
            "{words:?} never reached the slave's registers at {address} ({got:?})\n{}",
            s.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Cut from the cloud, a device goes on, and both sides' changes meet once
/// the link is back: readings that changed on the slave (the status shows
/// the latest), a desired value patched in the cluster (written to the
/// slave), one set at the gateway with `edge-rt device set` (written at
/// once, kept through an edge-rt restart, then taken into the Device's
/// spec), and one changed on both sides (the cluster's wins); each value
/// written once.
#[tokio::test]
async fn a_device_cut_from_the_cloud_goes_on_and_both_sides_converge_after() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    Cluster::get()?.install_device_crds()?;
    let mut s = Setup::ready(Opts::default()).await?;
    let line = outrigger_tests::modbus::Line::new(s.node().dir.path(), "rs485")?;
    let mut slave = outrigger_tests::modbus::Slaves::start(&line, &[1])?;
    slave.set(1, "ir", 0, &[215])?;
    s.apply(DEVICE_MODEL)?;
    s.apply(&kube_device(s.name(), &line.edge, "21.5"))?;
    until_register(&mut slave, 21.5, &s).await?;
    let status = |s: &Setup| -> Result<Value> { s.get_json(&["device", "boiler"]) };
    let prop = |d: &Value, part: &str, name: &str| -> Value {
        d[part]["properties"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == name))
            .cloned()
            .unwrap_or_default()
    };
    wait_for("the first reading", Duration::from_secs(30), || async {
        let d = status(&s).ok()?;
        (prop(&d, "status", "temperature")["value"] == "21.5").then_some(())
    })
    .await
    .with_context(|| s.logs())?;

    let mut cut = PortCut::cut(s.cloud.addr.port())?;
    wait_for(
        "the edge to see the link down",
        Duration::from_secs(20),
        || async {
            s.node()
                .daemon_log()
                .contains("link to cloud-gw down")
                .then_some(())
        },
    )
    .await?;
    // The cluster's side.
    s.kc(&[
        "patch",
        "device",
        "boiler",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/spec/properties/1/desired", "value": "18"}]"#,
    ])?;
    // The gateway's side: refused values first, with why.
    for (bad, says) in [
        ("temperature=30", "ReadOnly"),
        ("mode=9", "maximum 3"),
        ("mode=two", "mode=two"),
        ("valve=1", "no property"),
    ] {
        let o = s
            .node()
            .cli(&["device", "set", "boiler", bad, "-n", s.ns()])?;
        ensure!(!o.status.success(), "{bad} was accepted");
        ensure!(stderr(&o).contains(says), "{bad}: {}", stderr(&o));
    }
    let o = s.node().cli(&[
        "device",
        "set",
        "boiler",
        "mode=2",
        "setpoint=25",
        "-n",
        s.ns(),
    ])?;
    ensure!(o.status.success(), "device set: {}", stderr(&o));
    until_registers(&mut slave, 20, &[2], &s).await?;
    until_register(&mut slave, 25.0, &s).await?;
    // The device's side: readings move on; it stops answering a while.
    slave.set(1, "ir", 0, &[230])?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    slave.set(1, "ir", 0, &[190])?;
    let state = |want: &'static str| {
        let s = &s;
        move || async move {
            let o = s
                .node()
                .cli(&["devices", "-n", s.ns(), "-o", "json"])
                .ok()?;
            let v: Value = serde_json::from_slice(&o.stdout).ok()?;
            (v[0]["status"]["conditions"][0]["reason"] == want).then_some(())
        }
    };
    slave.mute(1, true)?;
    wait_for(
        "the slave's silence seen",
        Duration::from_secs(10),
        state("Timeout"),
    )
    .await?;
    slave.mute(1, false)?;
    wait_for(
        "the slave answering again",
        Duration::from_secs(10),
        state("Answering"),
    )
    .await?;
    // A restart of edge-rt (as its service is restarted), still cut: what
    // was set at the gateway holds.
    if let Some(d) = s.edges[0].daemon.take() {
        d.terminate()?;
    }
    s.edges[0].daemon = Some(s.node().start().await?);
    let d = text(
        &s.node()
            .cli(&["describe", "device", "boiler", "-n", s.ns()])?,
    );
    ensure!(d.contains("mode=2 at"), "{d}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    ensure!(slave.get(1, "hr", 20, 1)? == [2]);
    ensure!(
        slave.writes(1)? == 3,
        "writes before the link is back: {}",
        slave.writes(1)?
    );

    cut.restore()?;
    let d = wait_for(
        "both sides to converge",
        Duration::from_secs(60),
        || async {
            let d = status(&s).ok()?;
            let mode = prop(&d, "spec", "mode");
            let locals = d["status"]["properties"]
                .as_array()?
                .iter()
                .any(|p| !p["localDesired"].is_null());
            (mode["desired"] == "2"
                && prop(&d, "spec", "setpoint")["desired"] == "18"
                && prop(&d, "status", "temperature")["value"] == "19"
                && prop(&d, "status", "setpoint")["observedDesired"] == "18"
                && !locals)
                .then_some(d)
        },
    )
    .await
    .with_context(|| format!("{:#}\n{}", status(&s).unwrap_or_default(), s.logs()))?;
    until_register(&mut slave, 18.0, &s).await?;
    ensure!(slave.get(1, "hr", 20, 1)? == [2], "{d:#}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // 21.5, then offline mode 2 and setpoint 25, then the cluster's 18.
    ensure!(slave.writes(1)? == 4, "writes: {}", slave.writes(1)?);
    let d = text(
        &s.node()
            .cli(&["describe", "device", "boiler", "-n", s.ns()])?,
    );
    ensure!(!d.contains("Set at the node"), "{d}");
    // What happened during the cut, as the Device's Events.
    let events = wait_for("the device's events", Duration::from_secs(20), || async {
        let v = s
            .get_json(&[
                "events",
                "--field-selector",
                "involvedObject.kind=Device,involvedObject.name=boiler",
            ])
            .ok()?;
        let items = v["items"].as_array()?.clone();
        let has = |t: &str, r: &str| items.iter().any(|e| e["type"] == t && e["reason"] == r);
        (has("Warning", "Timeout") && has("Normal", "Reachable") && has("Normal", "DesiredWritten"))
            .then_some(items)
    })
    .await
    .with_context(|| {
        let all = s.kc(&["get", "events", "-o", "json"]).unwrap_or_default();
        format!("{all}\n{}", s.logs())
    })?;
    ensure!(
        events
            .iter()
            .any(|e| e["message"].as_str().is_some_and(|m| m.contains("mode=2"))),
        "{events:#?}"
    );
    drop(slave);
    drop(line);
    s.cleanup().await
}

/// `edge-rt reset` on a joined gateway running a pod on its pod network:
/// refused while edge-rt runs, and without a terminal or `--force`; with
/// `--force` the container is killed and gone with its sandbox, the bridge
/// and its iptables rules, the store and the link identity, the images
/// kept. Provisioned again with a new token under its name, the gateway
/// adopts its Node, and the pod bound to it runs again.
#[tokio::test(flavor = "multi_thread")]
async fn reset_removes_what_edge_rt_made_and_a_new_token_adopts_the_node() -> Result<()> {
    let mut s = Setup::ready(Opts::default()).await?;
    let n = 200 + std::process::id() % 50;
    let bridge = format!("ortrst{n}");
    let cidr = format!("10.{n}.0.0/24");
    let cfg = std::fs::read_to_string(&s.node().config)?;
    std::fs::write(
        &s.node().config,
        cfg.replace(
            "[network]\nenabled = false\n",
            &format!("[network]\nbridge = \"{bridge}\"\npod_cidr = \"{cidr}\"\n"),
        ),
    )?;
    if let Some(d) = s.edges[0].daemon.take() {
        d.terminate()?;
    }
    s.edges[0].daemon = Some(s.node().start().await?);
    let node = s.name().to_string();
    s.apply(&format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  nodeName: {node}
  containers:
  - name: web
    image: busybox:latest
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && echo hi >/www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: [{{containerPort: 8080, hostPort: 18080}}]
"#
    ))?;
    s.pod_ready("web").await?;
    let first = s.node().record("web").context("no container web")?;
    let pid = first.pid.context("no pid")?;
    let link = s.node().dir.path().join("data/link");
    let store = s.node().dir.path().join("data/store.db");
    ensure!(link.exists() && store.exists());
    ensure!(cmd_ok("ip", &["link", "show", &bridge]));

    let o = s.node().cli(&["reset", "--force"])?;
    ensure!(
        !o.status.success() && stderr(&o).contains("edge-rt is running"),
        "{}",
        stderr(&o)
    );
    if let Some(d) = s.edges[0].daemon.take() {
        d.terminate()?;
    }
    let o = std::process::Command::new(edge_rt_bin())
        .arg("--config")
        .arg(&s.node().config)
        .arg("reset")
        .stdin(std::process::Stdio::null())
        .output()?;
    ensure!(
        !o.status.success() && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    ensure!(pid_alive(pid) && store.exists(), "removed without asking");

    let o = s.node().cli(&["reset", "--force"])?;
    ensure!(o.status.success(), "reset: {}", stderr(&o));
    wait_for("the container to die", Duration::from_secs(10), || async {
        (!pid_alive(pid)).then_some(())
    })
    .await?;
    ensure!(!cmd_ok("ip", &["link", "show", &bridge]), "bridge left");
    let nat = std::process::Command::new("iptables")
        .args(["-t", "nat", "-S"])
        .output()?;
    let nat = String::from_utf8_lossy(&nat.stdout);
    ensure!(
        !nat.contains(&cidr) && !nat.contains(":18080"),
        "rules left:\n{nat}"
    );
    ensure!(!link.exists() && !store.exists(), "store or link left");
    ensure!(!s.node().state.exists() && !s.node().logs.exists());
    ensure!(
        s.node().dir.path().join("data/images").exists(),
        "images gone"
    );
    ensure!(s.node().records().is_empty(), "{:?}", s.node().records());

    // Provisioned again: a new token, the same name.
    let o = join_with(
        s.node(),
        &s.cloud.server,
        &s.cloud.token("10m")?,
        &node,
        &["--labels", &format!("{SCOPE_LABEL}={}", s.ns())],
    )?;
    ensure!(o.status.success(), "join again: {}", stderr(&o));
    s.edges[0].daemon = Some(s.node().start().await?);
    s.ready_node(&node).await?;
    let again = wait_for("the pod to run again", Duration::from_secs(60), || async {
        s.node()
            .record("web")
            .filter(|r| r.exit.is_none() && r.pid.is_some())
    })
    .await
    .with_context(|| s.logs())?;
    ensure!(again.id != first.id || again.pid != first.pid);
    // And the test's own clean-up, by the same command.
    if let Some(d) = s.edges[0].daemon.take() {
        d.terminate()?;
    }
    let o = s.node().cli(&["reset", "--force", "--images"])?;
    ensure!(o.status.success(), "reset --images: {}", stderr(&o));
    ensure!(!s.node().dir.path().join("data/images").exists());
    s.cleanup().await
}

fn cmd_ok(cmd: &str, args: &[&str]) -> bool {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn accelerators_are_node_capacity_the_scheduler_places_pods_by() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    use nix::sys::stat::{makedev, mknod, Mode, SFlag};
    let fake = tempfile::tempdir()?;
    let (dev, sys) = (fake.path().join("dev"), fake.path().join("sys"));
    std::fs::create_dir_all(&dev)?;
    std::fs::create_dir_all(&sys)?;
    let gpu = |n: u64| {
        mknod(
            &dev.join(format!("nvidia{n}")),
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(195, n),
        )
    };
    gpu(0)?;
    gpu(1)?;
    let cfg = format!("[accelerators]\ndev_dir = {dev:?}\nsys_dir = {sys:?}\ncdi_spec_dirs = []\n");
    let s = Setup::ready(Opts {
        node_config: &cfg,
        ..Default::default()
    })
    .await?;
    let gpus_of_node = || async {
        let n = s.get_json(&["node", s.name()]).ok()?;
        let st = &n["status"];
        (st["capacity"]["nvidia.com/gpu"] == st["allocatable"]["nvidia.com/gpu"])
            .then(|| st["capacity"]["nvidia.com/gpu"].as_str().map(String::from))
            .flatten()
    };
    wait_for(
        "2 GPUs in the Node's capacity",
        Duration::from_secs(20),
        || async { gpus_of_node().await.filter(|n| n == "2") },
    )
    .await
    .with_context(|| s.logs())?;

    // Three replicas asking for a GPU each: the real scheduler places two.
    let d = unique("infer");
    s.apply(&format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {d}}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: {d}}}}}
  template:
    metadata: {{labels: {{app: {d}}}}}
    spec:
      nodeSelector: {{{SCOPE_LABEL}: {ns}}}
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: busybox:latest
        imagePullPolicy: Never
        command: ["sh", "-c", "echo gpu=$NVIDIA_VISIBLE_DEVICES; while true; do sleep 1; done"]
        resources:
          limits: {{nvidia.com/gpu: 1}}
"#,
        ns = s.ns()
    ))?;
    let pods_by_phase = || -> Result<(Vec<String>, Vec<String>)> {
        let list = s.get_json(&["pods", "-l", &format!("app={d}")])?;
        let mut running = Vec::new();
        let mut pending = Vec::new();
        for p in list["items"].as_array().into_iter().flatten() {
            let name = p["metadata"]["name"].as_str().unwrap_or("").to_string();
            match p["status"]["phase"].as_str() {
                Some("Running") => running.push(name),
                Some("Pending") => pending.push(name),
                _ => {}
            }
        }
        Ok((running, pending))
    };
    let (running, pending) = wait_for(
        "two running, one pending",
        Duration::from_secs(60),
        || async {
            pods_by_phase()
                .ok()
                .filter(|(r, p)| r.len() == 2 && p.len() == 1)
        },
    )
    .await
    .with_context(|| s.logs())?;
    let unschedulable = s.get_json(&["pod", &pending[0]])?;
    let cond = condition(&unschedulable, "PodScheduled")
        .cloned()
        .unwrap_or_default();
    ensure!(
        cond["reason"] == "Unschedulable"
            && cond["message"]
                .as_str()
                .is_some_and(|m| m.contains("Insufficient nvidia.com/gpu")),
        "{cond}"
    );
    let mut seen: Vec<String> = running
        .iter()
        .map(|p| {
            s.exec(
                p,
                &[
                    "sh",
                    "-c",
                    "echo $NVIDIA_VISIBLE_DEVICES; ls /dev | grep nvidia",
                ],
            )
            .map(|o| o.trim().to_string())
        })
        .collect::<Result<_>>()?;
    seen.sort();
    ensure!(
        seen == ["0\nnvidia0", "1\nnvidia1"],
        "each pod its own GPU and only it: {seen:?}"
    );

    // A pod bound to the node by name, past the scheduler: the node keeps
    // it Pending and says why.
    let direct = unique("direct");
    s.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {direct}}}
spec:
  nodeName: {node}
  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: Never
    command: ["sleep", "3600"]
    resources:
      limits: {{nvidia.com/gpu: 1}}
"#,
        node = s.name()
    ))?;
    let why = wait_for(
        "the direct pod waiting for a GPU",
        Duration::from_secs(30),
        || async {
            let p = s.get_json(&["pod", &direct]).ok()?;
            let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
            (w["reason"] == "InsufficientDevices")
                .then(|| w["message"].as_str().unwrap_or("").to_string())
        },
    )
    .await
    .with_context(|| s.logs())?;
    ensure!(
        why.contains("insufficient nvidia.com/gpu") && why.contains("0 of 2 free"),
        "{why}"
    );
    s.kc(&["delete", "pod", &direct, "--wait=false"])?;

    // A GPU plugged in: the Node counts it and the pending replica runs.
    gpu(2)?;
    wait_for(
        "3 GPUs in the Node's capacity",
        Duration::from_secs(20),
        || async { gpus_of_node().await.filter(|n| n == "3") },
    )
    .await
    .with_context(|| s.logs())?;
    wait_for(
        "the third replica running",
        Duration::from_secs(60),
        || async { pods_by_phase().ok().filter(|(r, _)| r.len() == 3) },
    )
    .await
    .with_context(|| s.logs())?;
    let gpu_of_third = s.exec(&pending[0], &["sh", "-c", "echo $NVIDIA_VISIBLE_DEVICES"])?;
    ensure!(gpu_of_third.trim() == "2", "{gpu_of_third}");
    // Unplugged: the Node no longer offers it.
    std::fs::remove_file(dev.join("nvidia2"))?;
    wait_for("2 GPUs again", Duration::from_secs(20), || async {
        gpus_of_node().await.filter(|n| n == "2")
    })
    .await?;
    s.kc(&["delete", "deployment", &d, "--wait=false"])?;
    s.cleanup().await
}

/// The static edge-infer (`tests/inference`) for this machine: built by
/// `.ci/run`, or `cargo build --release --target x86_64-unknown-linux-musl
/// -p outrigger-inference`.
fn edge_infer_bin() -> Result<std::path::PathBuf> {
    let rel = format!(
        "{}-unknown-linux-musl/release/edge-infer",
        std::env::consts::ARCH
    );
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .map(|d| d.join(&rel))
        .find(|p| p.exists())
        .with_context(|| {
            format!("{rel} is missing: cargo build --release --target {}-unknown-linux-musl -p outrigger-inference", std::env::consts::ARCH)
        })
}

#[tokio::test]
async fn the_inference_example_runs_end_to_end() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    use outrigger_tests::fixtures::{self, ArtifactPart, Compression, Entry, ImageSpec, Layer};
    Cluster::get()?.install_device_crds()?;
    // The program's image and the model, in a registry of the site.
    let registry = outrigger_tests::registry::Registry::start(None)?;
    let infer = edge_infer_bin()?;
    let mut spec = ImageSpec::busybox()?;
    spec.layers.push(Layer {
        entries: vec![Entry::File(
            "usr/bin/edge-infer".into(),
            std::fs::read(&infer)?,
            0o755,
        )],
        compression: Compression::Gzip,
    });
    spec.entrypoint = vec!["/usr/bin/edge-infer".into()];
    spec.cmd = vec![];
    let image_layout = tempfile::tempdir()?;
    fixtures::add_to_layout(image_layout.path(), "v1", &spec)?;
    let image = registry.push(image_layout.path(), "v1", "outrigger/edge-infer")?;
    let work = tempfile::tempdir()?;
    let model = work.path().join("model.onnx");
    let made = std::process::Command::new(&infer)
        .args(["make-model", "--out"])
        .arg(&model)
        .output()?;
    ensure!(made.status.success(), "make-model: {}", stderr(&made));
    let model_layout = tempfile::tempdir()?;
    fixtures::add_artifact_to_layout(
        model_layout.path(),
        "v1",
        "application/vnd.example.model.v1",
        &[ArtifactPart::File("model.onnx", &std::fs::read(&model)?)],
    )?;
    let pushed = registry.push(model_layout.path(), "v1", "models/boiler-anomaly")?;
    let reg = image
        .split_once('/')
        .map(|(r, _)| r.to_string())
        .unwrap_or_default();
    ensure!(pushed.starts_with(&reg));

    // A gateway with a stand-in GPU, trusting the registry.
    let fake = tempfile::tempdir()?;
    let dev = fake.path().join("dev");
    std::fs::create_dir_all(&dev)?;
    nix::sys::stat::mknod(
        &dev.join("nvidia0"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(195, 0),
    )?;
    let ca = fake.path().join("registry-ca.pem");
    std::fs::copy(&registry.ca_pem, &ca)?;
    let cfg = format!(
        "[accelerators]\ndev_dir = {dev:?}\nsys_dir = {:?}\ncdi_spec_dirs = []\n\n[registry]\nca_bundle = {ca:?}\n",
        fake.path().join("sys")
    );
    let s = Setup::ready(Opts {
        node_config: &cfg,
        ..Default::default()
    })
    .await?;
    // The probe: a Modbus RTU slave on a PTY, 21.5 °C.
    let line = outrigger_tests::modbus::Line::new(s.node().dir.path(), "rs485")?;
    let mut probe = outrigger_tests::modbus::Slaves::start(&line, &[1])?;
    probe.set(1, "ir", 0, &[215])?;

    // The example, as its README applies it.
    let yaml = include_str!("../../edge-rt/examples/inference/inference.yaml")
        .replace("${REGISTRY}", &reg)
        .replace("${NODE}", s.name())
        .replace("${SERIAL_PORT}", &line.edge.display().to_string())
        .replace("${BROKER_PORT}", &s.node().mqtt_port.to_string())
        .replace("${NAMESPACE}", s.ns());
    ensure!(!yaml.contains("${"), "a placeholder left: {yaml}");
    s.apply(&yaml)?;
    let o = s.kubectl(&[
        "rollout",
        "status",
        "deployment/boiler-anomaly",
        "--timeout=120s",
    ])?;
    ensure!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        s.logs()
    );
    // Placed by its GPU request on the gateway that has one, and given it.
    let pods = s.get_json(&["pods", "-l", "app=boiler-anomaly"])?;
    let pod = pods["items"][0]["metadata"]["name"]
        .as_str()
        .context("the pod")?
        .to_string();
    ensure!(pods["items"][0]["spec"]["nodeName"] == s.name(), "{pods}");
    // The temperature climbs: the model's score goes up to near 1.
    for t in [250u16, 300, 400, 500, 600] {
        tokio::time::sleep(Duration::from_millis(700)).await;
        probe.set(1, "ir", 0, &[t])?;
    }
    let scored = wait_for(
        "a high score in kubectl logs",
        Duration::from_secs(60),
        || async {
            let l = s.kc(&["logs", &pod]).ok()?;
            // `score=S readings=[...]`: the window ending at 60 °C, high.
            l.lines()
                .filter_map(|x| x.strip_prefix("score="))
                .filter(|x| x.ends_with(",60]"))
                .filter_map(|x| x.split_whitespace().next()?.parse::<f64>().ok())
                .any(|v| v > 0.9)
                .then_some(l)
        },
    )
    .await
    .with_context(|| s.logs())?;
    ensure!(scored.contains("edge-infer: connected"), "{scored}");
    // The model came from the artifact, pulled once, mounted read-only.
    let events = s.kc(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={pod}"),
    ])?;
    ensure!(events.contains("models/boiler-anomaly"), "{events}");
    drop(probe);
    s.kc(&["delete", "deployment", "boiler-anomaly", "--wait=false"])?;
    s.cleanup().await
}

/// A Deployment spread over two gateways of one site, its Service, and a
/// client pod on the first gateway.
fn site_app(ns: &str, first: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      nodeSelector: {{"{SCOPE_LABEL}": "{ns}"}}
      topologySpreadConstraints:
      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: web}}}}}}
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: busybox:latest
        imagePullPolicy: Never
        env: [{{name: NODE, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}]
        command: ["sh", "-c", "mkdir -p /www && echo $NODE > /www/index.html && touch /www/ready && exec httpd -f -p 8080 -h /www"]
        ports: [{{name: http, containerPort: 8080}}]
        readinessProbe: {{exec: {{command: ["test", "-f", "/www/ready"]}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  type: NodePort
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  nodeSelector: {{kubernetes.io/hostname: {first}}}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: busybox:latest
    imagePullPolicy: Never
    env: [{{name: NS, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}]
    # The Service's address once, by name; then requests to it for ever.
    command: ["sh", "-c", "until ip=$(nslookup web.$NS.svc.cluster.local | awk '/^Address/ {{a=$2}} END {{print a}}') && [ -n \"$ip\" ] && [ \"${{ip%:53}}\" = \"$ip\" ]; do sleep 1; done; echo at $ip; while true; do if timeout 2 wget -qO- http://$ip/ >/dev/null 2>&1; then echo ok $(date +%T); else echo FAIL $(date +%T); fi; sleep 0.2; done"]
"#
    )
}

/// Services at the edge: two gateways in network namespaces on one site
/// network, pod CIDRs from the node IPAM controller, the Service's
/// EndpointSlice from the real controller. A pod resolves the Service by
/// name at its node's DNS server and reaches it by ClusterIP, served on
/// its own gateway first and by the other gateway once its own endpoint is
/// not ready; a pod on the other gateway is reachable at its own address;
/// through a cut from the cloud all of that goes on (readiness of the
/// node's own pods followed locally); a NodePort answers from the site
/// network; an edge-rt restart leaves the client's requests unbroken.
#[tokio::test]
async fn services_resolve_and_route_across_a_sites_gateways_through_a_cut() -> Result<()> {
    use outrigger_tests::netns::Site;
    let site = Site::new("orsvc", "192.168.77", 2)?;
    let netns: Vec<&str> = site.gateways.iter().map(String::as_str).collect();
    let mut s = Setup::ready(Opts {
        edges: 2,
        cloud_addr: Some("192.168.77.1"),
        netns: &netns,
        node_config: "[network]\nenabled = true\npod_cidr = \"10.98.0.0/24\"\n",
        ..Default::default()
    })
    .await?;
    let names: Vec<String> = s.edges.iter().map(|e| e.name.clone()).collect();
    // Each gateway takes the pod CIDR the cluster allocated it.
    let mut cidrs = Vec::new();
    for (i, e) in s.edges.iter().enumerate() {
        let cidr = wait_for("a pod CIDR", Duration::from_secs(30), || async {
            let n = s.get_json(&["node", &e.name]).ok()?;
            n["spec"]["podCIDR"].as_str().map(String::from)
        })
        .await?;
        wait_for("the pod CIDR adopted", Duration::from_secs(30), || async {
            e.node
                .daemon_log()
                .contains("pod CIDR from the cluster")
                .then_some(())
        })
        .await
        .with_context(|| format!("edge {i}: {}", e.node.daemon_log()))?;
        cidrs.push(cidr);
    }
    ensure!(cidrs[0] != cidrs[1], "{cidrs:?}");
    s.apply(&site_app(s.ns(), &names[0]))?;
    let o = s.kubectl(&[
        "wait",
        "--for=condition=Ready",
        "pod",
        "-l",
        "app=web",
        "--timeout=90s",
    ])?;
    ensure!(o.status.success(), "{}\n{}", stderr(&o), s.logs());
    s.pod_ready("client").await?;
    let pods = s.get_json(&["pods", "-l", "app=web"])?;
    let web_on = |node: &str| -> Option<(String, String)> {
        pods["items"].as_array()?.iter().find_map(|p| {
            (p["spec"]["nodeName"] == node).then(|| {
                (
                    p["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    p["status"]["podIP"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
        })
    };
    let (web_a, _) = web_on(&names[0]).context("no web pod on the first gateway")?;
    let (_, ip_b) = web_on(&names[1]).context("no web pod on the second gateway")?;
    // The real EndpointSlice controller lists both, ready, with their zone.
    let slices = s.get_json(&["endpointslices", "-l", "kubernetes.io/service-name=web"])?;
    let ready = slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|sl| sl["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["conditions"]["ready"] == true && e["zone"] == s.ns())
        .count();
    ensure!(ready == 2, "{slices}");
    let svc = s.get_json(&["service", "web"])?;
    let cluster_ip = svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let node_port = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap_or(0);

    let client = |cmd: &str| exec_on(&s.edges[0].node, s.ns(), "client", &["sh", "-c", cmd]);
    let fqdn = format!("web.{}.svc.cluster.local", s.ns());
    let found = wait_for("the Service by name", Duration::from_secs(30), || async {
        client(&format!("nslookup {fqdn}"))
            .ok()
            .filter(|o| o.contains(&cluster_ip))
    })
    .await
    .with_context(|| s.logs())?;
    ensure!(found.contains(&cluster_ip), "{found}");
    // Served on its own gateway, by name (the search list) and by ClusterIP.
    // (Debian's busybox wget crashes on -T: timeout instead.)
    let get = |url: &str| client(&format!("timeout 3 wget -qO- {url}"));
    let debug = || {
        let rules = site
            .exec(0, "iptables-save")
            .output()
            .map(|o| text(&o))
            .unwrap_or_default();
        let routes = site
            .exec(0, "ip")
            .args(["route"])
            .output()
            .map(|o| text(&o))
            .unwrap_or_default();
        format!(
            "wget: {:?}\nresolv.conf: {:?}\nrules:\n{rules}\nroutes:\n{routes}\n{}",
            client(&format!("timeout 3 wget -O- http://web/ 2>&1; timeout 3 wget -O- http://{cluster_ip}/ 2>&1; timeout 3 wget -O- http://{ip_b}:8080/ 2>&1; echo $?")),
            client("cat /etc/resolv.conf"),
            s.logs()
        )
    };
    let served = wait_for(
        "the Service by its name",
        Duration::from_secs(30),
        || async { get("http://web/").ok().filter(|b| b.trim() == names[0]) },
    )
    .await
    .with_context(debug)?;
    ensure!(served.trim() == names[0]);
    ensure!(get(&format!("http://{cluster_ip}/"))?.trim() == names[0]);
    // The other gateway's pod, straight at its own address.
    ensure!(get(&format!("http://{ip_b}:8080/"))?.trim() == names[1]);
    // A NodePort from the site network.
    let np = http_get(format!("{}:{node_port}", site.address(0)).parse()?, "/")?;
    ensure!(np.contains(&names[0]) || np.contains(&names[1]), "{np}");

    let set_ready = |ready: bool| {
        let cmd = if ready {
            "touch /www/ready"
        } else {
            "rm -f /www/ready"
        };
        exec_on(&s.edges[0].node, s.ns(), &web_a, &["sh", "-c", cmd])
    };
    let served_by = |who: String| {
        let get = &get;
        async move {
            wait_for(
                &format!("the Service served by {who}"),
                Duration::from_secs(30),
                || async { get("http://web/").ok().filter(|b| b.trim() == who) },
            )
            .await
        }
    };
    // Its own endpoint not ready: the other gateway serves.
    set_ready(false)?;
    served_by(names[1].clone())
        .await
        .with_context(|| s.logs())?;

    // Cut from the cloud: names, ClusterIP and the other gateway still
    // work, and its own pod's readiness is followed here.
    let port = s.cloud.addr.port();
    let mut cut = PortCut::cut_on(&site.bridge, port)?;
    wait_for("the link to drop", Duration::from_secs(60), || async {
        s.edges[0]
            .node
            .cli(&["status"])
            .ok()
            .map(|o| text(&o))
            .filter(|t| t.contains("CloudConnected=False"))
    })
    .await
    .with_context(|| {
        format!(
            "{:?}\n{}",
            s.edges[0].node.cli(&["status"]).map(|o| text(&o)),
            s.logs()
        )
    })?;
    set_ready(true)?;
    served_by(names[0].clone())
        .await
        .with_context(|| s.logs())?;
    set_ready(false)?;
    served_by(names[1].clone())
        .await
        .with_context(|| s.logs())?;
    ensure!(client(&format!("nslookup {fqdn}"))?.contains(&cluster_ip));
    cut.restore()?;
    set_ready(true)?;
    served_by(names[0].clone()).await?;

    // An edge-rt restart: the client's requests go on (the rules stay, and
    // are rebuilt the same).
    let client_log = |s: &Setup| {
        s.edges[0]
            .node
            .cli(&["logs", "-n", s.ns(), "client"])
            .map(|o| text(&o))
            .unwrap_or_default()
    };
    let before = client_log(&s).lines().count();
    ensure!(
        client_log(&s).contains(&format!("at {cluster_ip}")),
        "{}",
        client_log(&s)
    );
    if let Some(d) = s.edges[0].daemon.take() {
        d.terminate()?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    s.edges[0].daemon = Some(s.edges[0].node.start_in(Some(netns[0])).await?);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let logs = client_log(&s);
    let after: Vec<&str> = logs.lines().skip(before).collect();
    ensure!(
        after.len() > 10,
        "{after:?}\n{}",
        s.edges[0].node.daemon_log()
    );
    ensure!(
        after.iter().all(|l| l.starts_with("ok ")),
        "requests failed across the restart: {after:?}\n{}",
        s.edges[0].node.daemon_log()
    );
    s.cleanup().await
}
